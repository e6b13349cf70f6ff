"""Save/load of model weights as config JSON + safetensors, and content hashes that tie adapters to centrals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from shared.errors import FedstError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def weights_hash(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor (order-independent, device-independent)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_weights(
    directory: str | Path,
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    weights: str = WEIGHTS,
    config_name: str = CONFIG,
) -> Path:
    """Write `config_name` (JSON) and `weights` (safetensors) into `directory`; return the directory."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out / weights))
    (out / config_name).write_text(json.dumps(dict(config), indent=2, default=_json_default))
    return out


def load_config(directory: str | Path, config_name: str = CONFIG) -> dict[str, Any]:
    path = Path(directory) / config_name
    if not Path(directory).is_dir():
        raise FedstError(f"{directory}: no such model directory")
    if not path.is_file():
        raise FedstError(f"{path}: missing config file (expected a directory written by save_pretrained)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FedstError(f"{path}: corrupt config JSON ({exc.msg} at line {exc.lineno})") from None


def load_weights(directory: str | Path, weights: str = WEIGHTS) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / weights
    if not path.is_file():
        raise FedstError(f"{path}: missing weights file (expected safetensors written by save_pretrained)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise FedstError(f"{path}: unreadable safetensors weights ({exc})") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
