"""One way to save a model: a local directory with the constructor arguments as JSON and the weights as
safetensors (the diffusers layout), written atomically and read back with one FedstError naming the file for
anything that does not fit (missing or unparsable config, unknown or missing keys, unreadable safetensors,
tensor names or shapes that differ).

Why a small fedst mixin instead of diffusers' ``ModelMixin``/``ConfigMixin`` or huggingface_hub's
``PyTorchModelHubMixin`` (both installed; checked against diffusers 0.42 and huggingface_hub 2.4):

- three of the saved models are not ``nn.Module``s (the ridge baseline is a numpy affine map, the MLP
  regressor an ``nn.Sequential`` plus standardisation tensors, FLAG a network plus its settings) and both
  library mixins assume one;
- both accept what must be an error here: ``ConfigMixin.from_config`` drops unknown config keys with a
  warning and fills missing ones with defaults (a v-prediction model silently loaded as epsilon), and
  ``PyTorchModelHubMixin`` loads weights with ``strict=False`` by default (torch's RuntimeError otherwise);
  neither names the file;
- both write straight into the target directory, so a failed save leaves half an artifact, and both fix the
  weights file name, while the artifacts fedst already promises use ``weights.safetensors`` (baselines, FLAG)
  and ``adapter_config.json`` + ``adapter.safetensors`` (c2l adapters) besides ``model.safetensors``.

The files stay readable without fedst: ``config.json`` is plain JSON (the constructor arguments plus
``kind``), the weights are plain safetensors. Layouts (unchanged file names; ``kind`` is new where marked *,
and a config without it, as written before, still loads):

- central model: ``config.json`` + ``model.safetensors`` (kind ``c2l-central``)
- c2l adapter: ``adapter_config.json`` (+ ``central_hash`` and provenance) + ``adapter.safetensors``
  (kind ``c2l-adapter``)
- SpaDiT: ``config.json`` + ``model.safetensors`` (kind ``spadit``*)
- FLAG: ``settings.json`` + ``config.json`` + ``weights.safetensors`` (kind ``flag``*)
- ridge / MLP baselines: ``config.json`` + ``weights.safetensors`` (kind ``ridge``* / ``mlp``*)
- predictor: ``predictor.json`` + ``model/`` (a ridge, MLP or FLAG directory) [+ ``encoder.safetensors``]
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import uuid
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, TypeVar

from shared.errors import FedstError
from shared.io import json_default
from shared.weights import load_state_strict

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
KIND = "kind"  # config key naming the model class, so one kind's directory is not loaded as another's

Writer = Callable[[Path], None]
T = TypeVar("T", bound="Pretrained")


# ---- writing -----------------------------------------------------------------------------------------------
def json_file(payload: Mapping[str, Any]) -> Writer:
    """A writer of ``payload`` as indented JSON; serialised now, so a bad value fails before anything is written."""
    text = json.dumps(dict(payload), indent=2, default=json_default)
    return lambda path: path.write_text(text)


def tensor_file(tensors: Mapping[str, Any]) -> Writer:
    """A writer of named torch tensors (or numpy arrays, when all are) as safetensors."""
    import numpy as np

    if tensors and all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save_file

        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    else:
        from safetensors.torch import save_file

        arrays = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return lambda path: save_file(arrays, str(path))


def write_artifact(directory: str | Path, files: Mapping[str, Writer]) -> Path:
    """Write ``files`` (relative path -> writer) as the directory ``directory``; return it.

    A new directory is built under a temporary name beside it and renamed into place: a failed save leaves
    nothing. Into an existing directory (a re-save; other files there, e.g. the CLI's plots, are kept) every
    file is first written under a temporary name and only then renamed over the old one, so a failed save
    leaves the previous artifact intact.
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise FedstError(f"{out}: exists and is not a directory; cannot save a model there")
    if out.is_dir():
        _replace_files(out, files)
    else:
        _create_directory(out, files)
    return out


def _write_synced(path: Path, write: Writer) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _create_directory(out: Path, files: Mapping[str, Writer]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        for name, write in files.items():
            _write_synced(tmp / name, write)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_files(out: Path, files: Mapping[str, Writer]) -> None:
    staged: dict[Path, Path] = {}
    try:
        for name, write in files.items():
            target = out / name
            tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
            staged[tmp] = target
            _write_synced(tmp, write)
        for tmp, target in staged.items():
            os.replace(tmp, target)
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)


# ---- reading -----------------------------------------------------------------------------------------------
def model_directory(directory: str | Path, expected: Iterable[str]) -> Path:
    src = Path(directory)
    if not src.is_dir():
        raise FedstError(f"{src}: no such model directory (expected {' + '.join(expected)} written by save_pretrained)")
    return src


def read_config(path: Path, kind: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path``; with ``kind``, one whose ``kind`` (when present) is that kind.

    Files written before fedst recorded ``kind`` (SpaDiT, FLAG, the baselines) have none; their keys are still
    checked against the constructor.
    """
    if not path.is_file():
        raise FedstError(f"{path}: missing config file (expected JSON written by save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FedstError(f"{path}: corrupt config JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise FedstError(f"{path}: corrupt config JSON (not UTF-8 text)") from None
    if not isinstance(config, dict):
        raise FedstError(f"{path}: expected a JSON object, found a JSON {type(config).__name__}")
    found = config.get(KIND, kind)
    if kind is not None and found != kind:
        raise FedstError(f"{path}: holds a {found!r} model, not a {kind!r} one")
    return config


def split_config(
    path: Path, config: Mapping[str, Any], factory: Callable[..., Any], optional: Iterable[str] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the arguments of ``factory`` in ``config``, the other keys but ``kind``); a missing argument (unless
    ``optional``) is a FedstError naming the file and the keys."""
    params = inspect.signature(factory).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [n for n in names if n not in config and n not in set(optional)]
    if missing:
        raise FedstError(f"{path}: missing config key(s) {missing} for {_name(factory)}")
    args = {n: config[n] for n in names if n in config}
    return args, {k: v for k, v in config.items() if k not in args and k != KIND}


def reject_unknown(path: Path, rest: Mapping[str, Any], factory: Callable[..., Any]) -> None:
    if rest:
        raise FedstError(f"{path}: unknown config key(s) {sorted(rest)} for {_name(factory)}")


def check_keys(path: Path, config: Mapping[str, Any], expected: Iterable[str], owner: str) -> None:
    """FedstError naming the file unless ``config`` has exactly the keys ``expected`` (a fixed-schema file)."""
    expected = set(expected)
    missing, unknown = sorted(expected - set(config)), sorted(set(config) - expected)
    if missing:
        raise FedstError(f"{path}: missing config key(s) {missing} for {owner}")
    if unknown:
        raise FedstError(f"{path}: unknown config key(s) {unknown} for {owner}")


def build(path: Path, factory: Callable[..., T], args: Mapping[str, Any]) -> T:
    """``factory(**args)``; a constructor's complaint (bad value or type) re-raised naming the file."""
    try:
        return factory(**args)
    except FedstError as exc:
        raise FedstError(f"{path}: invalid config for {_name(factory)}: {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise FedstError(f"{path}: invalid config for {_name(factory)} ({type(exc).__name__}: {exc})") from None


def read_config_as(path: Path, factory: Callable[..., T]) -> T:
    """``factory`` built from exactly its arguments in the JSON file ``path`` (e.g. a settings dataclass)."""
    args, rest = split_config(path, read_config(path), factory)
    reject_unknown(path, rest, factory)
    return build(path, factory, args)


def read_tensors(path: Path, framework: str = "pt") -> dict[str, Any]:
    """Named tensors of a safetensors file (``framework`` "pt": torch, "np": numpy); FedstError naming it."""
    from safetensors import SafetensorError

    if framework == "np":
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    if not path.is_file():
        raise FedstError(f"{path}: missing weights file (expected safetensors written by save_pretrained)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise FedstError(f"{path}: unreadable safetensors weights ({exc})") from None


def _name(factory: Callable[..., Any]) -> str:
    return getattr(factory, "__name__", type(factory).__name__)


# ---- the mixin ---------------------------------------------------------------------------------------------
class Pretrained:
    """``save_pretrained(dir)`` / ``from_pretrained(dir)`` for a model whose ``config`` (a dict or dataclass) is
    its constructor arguments. Subclasses set ``kind``; file names, keys older configs may omit
    (``optional_config_keys``), fitted attributes kept in the config (``state_config_keys``) and the tensor
    framework are class attributes; ``pretrained_tensors`` / ``load_pretrained_tensors`` default to torch's
    state dict, checked strictly."""

    kind: ClassVar[str]
    config_name: ClassVar[str] = CONFIG
    weights_name: ClassVar[str] = WEIGHTS
    optional_config_keys: ClassVar[tuple[str, ...]] = ()
    state_config_keys: ClassVar[tuple[str, ...]] = ()
    tensor_framework: ClassVar[str] = "pt"

    def pretrained_config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this model (weights aside)."""
        config = self.config  # set by the subclass constructor
        return asdict(config) if is_dataclass(config) else dict(config)

    def pretrained_tensors(self) -> Mapping[str, Any]:
        return self.state_dict()  # nn.Module subclasses; the others define their own

    def load_pretrained_tensors(self, tensors: Mapping[str, Any], source: Path) -> None:
        load_state_strict(self, tensors, source)

    def artifact_files(self, extra_config: Mapping[str, Any] | None = None) -> dict[str, Writer]:
        """Relative path -> writer of this model's files (``extra_config``: metadata stored in its config)."""
        config = json_file(
            {
                KIND: self.kind,
                **(extra_config or {}),
                **self.pretrained_config(),
                **{k: getattr(self, k) for k in self.state_config_keys},
            }
        )
        return {self.weights_name: tensor_file(self.pretrained_tensors()), self.config_name: config}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config_name`` (JSON) + ``weights_name`` (safetensors) atomically into ``directory``."""
        return write_artifact(directory, self.artifact_files())

    @classmethod
    def read_pretrained_config(cls, directory: str | Path) -> tuple[Path, dict[str, Any]]:
        """(config path, config) of a saved ``cls``: the directory exists, the JSON parses, the kind fits."""
        path = model_directory(directory, (cls.config_name, cls.weights_name)) / cls.config_name
        return path, read_config(path, cls.kind)

    @classmethod
    def from_config(cls: type[T], path: Path, config: Mapping[str, Any]) -> tuple[T, dict[str, Any]]:
        """(the model built from ``config``, the keys that are neither arguments nor fitted state)."""
        args, rest = split_config(path, config, cls, cls.optional_config_keys)
        missing = [k for k in cls.state_config_keys if k not in rest]
        if missing:
            raise FedstError(f"{path}: missing config key(s) {missing} for {cls.__name__}")
        model = build(path, cls, args)
        for key in cls.state_config_keys:
            setattr(model, key, rest.pop(key))
        return model, rest

    def load_pretrained_weights(self, directory: str | Path) -> None:
        path = Path(directory) / self.weights_name
        self.load_pretrained_tensors(read_tensors(path, self.tensor_framework), path)

    @classmethod
    def from_pretrained(cls: type[T], directory: str | Path) -> T:
        """The exact model saved by ``save_pretrained(directory)``; FedstError naming the file otherwise."""
        path, config = cls.read_pretrained_config(directory)
        model, rest = cls.from_config(path, config)
        reject_unknown(path, rest, cls)
        model.load_pretrained_weights(directory)
        return model
