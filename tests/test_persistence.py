"""One way to save a model (shared/persistence.py): every model kind round-trips to identical outputs, every
corrupt or mismatched artifact is a FedstError naming the file, and a failed save leaves nothing behind."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from shared.errors import FedstError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_CENTRAL = dict(sample_size=16, block_out_channels=(16, 32), norm_num_groups=4)


@dataclass
class Kind:
    """How to make, save, load and run one kind of saved model; ``config``/``weights``: its files, relative."""

    make: Callable[[], Any]
    save: Callable[[Any, Path], Any]
    load: Callable[[Path], Any]
    run: Callable[[Any], np.ndarray]
    config: str
    weights: str
    required_key: str  # a config key whose absence must be an error


def _scramble(module: torch.nn.Module, seed: int) -> None:
    """Move every weight off its (often zero) init, so equal outputs after loading mean the weights loaded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _central():
    from shared.c2l.central import create_central

    torch.manual_seed(0)
    return create_central("tiny", **SMALL_CENTRAL)


def _run_central(model) -> np.ndarray:
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([10, 900])
    with torch.no_grad():
        return model.eval()(x, t).numpy()


@functools.cache
def _adapter_central():
    """One central for the adapter kind: adapters are tied to its weights by hash."""
    return _central()


def _adapter():
    from shared.c2l.modulation import create_conditioned

    model = create_conditioned(_adapter_central(), ["G0", "G1", "G2"], hidden_dim=8, embed_dim=4, lora_rank=2)
    _scramble(model.modulation, 2)
    return model


def _save_adapter(model, path: Path) -> None:
    from shared.c2l.modulation import save_adapter

    save_adapter(model, path, store="site-a")


def _load_adapter(path: Path):
    from shared.c2l.modulation import load_adapter

    return load_adapter(_adapter_central(), path)


def _run_adapter(model) -> np.ndarray:
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([5, 700])
    expression, mask = torch.rand(2, 3, generator=gen), torch.ones(2, 3)
    with torch.no_grad():
        return model.eval()(x, t, expression, mask).numpy()


def _spadit():
    from shared.downstream.spadit.model import create_spadit

    torch.manual_seed(4)
    model = create_spadit("tiny", n_spots=20, n_cells=30, n_ref_genes=8, depth=1)
    _scramble(model, 5)
    return model


def _run_spadit(model) -> np.ndarray:
    gen = torch.Generator().manual_seed(6)
    st, sc, ref = (
        torch.randn(3, 20, generator=gen),
        torch.randn(3, 30, generator=gen),
        torch.randn(8, 30, generator=gen),
    )
    prior = torch.randn(3, 20, generator=gen)
    with torch.no_grad():
        return model.eval()(st, torch.tensor([3, 300, 900]), sc, model.encode_reference(ref), prior).numpy()


def _spots(n: int = 40, d: int = 6, g: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    expr = np.log1p(np.exp(feats @ rng.normal(size=(d, g)))).astype(np.float32)
    coords = np.stack([np.arange(n) % 8, np.arange(n) // 8], 1) * 150.0
    return feats, expr, coords, np.array(["a"] * n), [f"G{i}" for i in range(g)]


def _flag():
    from shared.downstream.flag import FlagRegressor, FlagSettings

    settings = FlagSettings(preset="tiny", steps=3, batch_crops=1, sample_steps=2, n_samples=1, max_spots=16)
    return FlagRegressor(settings, device="cpu").fit(*_spots(), mpp=1.0)


def _load_flag(path: Path):
    from shared.downstream.flag import FlagRegressor

    return FlagRegressor.from_pretrained(path, device="cpu")


def _run_flag(reg) -> np.ndarray:
    feats, _, coords, sections, _ = _spots()
    return reg.predict(feats, coords, sections, mpp=1.0, seed=7)


def _ridge():
    from shared.downstream.baselines import RidgeBaseline

    feats, expr, *_ = _spots()
    return RidgeBaseline(n_components=4).fit(feats, expr)


def _mlp():
    from shared.downstream.baselines import MLPRegressor

    feats, expr, *_ = _spots()
    torch.manual_seed(8)  # the MLP initialises its layers in the constructor, from torch's global generator
    return MLPRegressor(6, 3, hidden=8).fit(feats, expr, epochs=2, batch_size=16)


def _run_regressor(model) -> np.ndarray:
    return model.predict(_spots()[0])


def _predictor():
    from shared.downstream.predictor import Predictor

    return Predictor("mlp", _mlp(), ["G0", "G1", "G2"], "stats", feature_key="X_stats", info={"seed": 0})


def _load_predictor(path: Path):
    from shared.downstream.predictor import load_predictor

    return load_predictor(path)


def _run_predictor(predictor) -> np.ndarray:
    return predictor.model.predict(_spots()[0])


def _from_pretrained(module: str, name: str) -> Callable[[Path], Any]:
    def load(path: Path):
        import importlib

        return getattr(importlib.import_module(module), name).from_pretrained(path)

    return load


def _save_pretrained(model, path: Path) -> None:
    model.save_pretrained(path)


KINDS = {
    "central": Kind(
        _central,
        _save_pretrained,
        _from_pretrained("shared.c2l.central", "CentralDiffusion"),
        _run_central,
        "config.json",
        "model.safetensors",
        "prediction_type",
    ),
    "adapter": Kind(
        _adapter, _save_adapter, _load_adapter, _run_adapter, "adapter_config.json", "adapter.safetensors", "channels"
    ),
    "spadit": Kind(
        _spadit,
        _save_pretrained,
        _from_pretrained("shared.downstream.spadit.model", "SpaDiT"),
        _run_spadit,
        "config.json",
        "model.safetensors",
        "n_spots",
    ),
    "flag": Kind(_flag, _save_pretrained, _load_flag, _run_flag, "config.json", "weights.safetensors", "n_genes"),
    "ridge": Kind(
        _ridge,
        _save_pretrained,
        _from_pretrained("shared.downstream.baselines", "RidgeBaseline"),
        _run_regressor,
        "config.json",
        "weights.safetensors",
        "n_components",
    ),
    "mlp": Kind(
        _mlp,
        _save_pretrained,
        _from_pretrained("shared.downstream.baselines", "MLPRegressor"),
        _run_regressor,
        "config.json",
        "weights.safetensors",
        "in_dim",
    ),
    "predictor": Kind(
        _predictor,
        _save_pretrained,
        _load_predictor,
        _run_predictor,
        "predictor.json",
        "model/weights.safetensors",
        "genes",
    ),
}


@pytest.fixture(scope="module", params=sorted(KINDS))
def saved(request, tmp_path_factory) -> tuple[Kind, Any, np.ndarray, Path]:
    """(kind, model, its outputs, a pristine saved copy) once per kind; tests corrupt copies of it."""
    kind = KINDS[request.param]
    model = kind.make()
    path = tmp_path_factory.mktemp(request.param) / "saved"
    kind.save(model, path)
    return kind, model, kind.run(model), path


@pytest.fixture
def copy(saved, tmp_path) -> tuple[Kind, Path]:
    import shutil

    kind, _, _, path = saved
    return kind, Path(shutil.copytree(path, tmp_path / "m"))


def test_round_trip_gives_identical_outputs(saved) -> None:
    kind, model, outputs, path = saved
    assert (path / kind.config).is_file() and (path / kind.weights).is_file()
    assert not [p for p in path.parent.iterdir() if p.name != "saved"]  # no temp files left beside it
    np.testing.assert_array_equal(kind.run(kind.load(path)), outputs)
    assert outputs.size and np.isfinite(outputs).all()


def test_a_config_without_kind_is_read_as_before(saved, copy) -> None:
    """Artifacts written before `kind` existed (SpaDiT, FLAG, baselines, predictor models) still load."""
    kind, path = copy
    config_path = path / (kind.config if kind.config != "predictor.json" else "model/config.json")
    config = json.loads(config_path.read_text())
    assert config.pop("kind")
    config_path.write_text(json.dumps(config))
    np.testing.assert_array_equal(kind.run(kind.load(path)), saved[2])


def _error(kind: Kind, path: Path, file: Path, match: str) -> None:
    with pytest.raises(FedstError, match=match) as info:
        kind.load(path)
    assert str(file) in str(info.value), str(info.value)


def test_missing_directory(saved, tmp_path) -> None:
    kind = saved[0]
    _error(kind, tmp_path / "absent", tmp_path / "absent", "no such model directory")


def test_missing_config(copy) -> None:
    kind, path = copy
    (path / kind.config).unlink()
    _error(kind, path, path / kind.config, "missing config file")


def test_unparsable_config(copy) -> None:
    kind, path = copy
    (path / kind.config).write_text('{"sample_size": 16,')
    _error(kind, path, path / kind.config, "corrupt config JSON")


def test_config_that_is_not_an_object(copy) -> None:
    kind, path = copy
    (path / kind.config).write_text("[1, 2]")
    _error(kind, path, path / kind.config, "expected a JSON object")


def test_missing_config_key(copy) -> None:
    kind, path = copy
    config = json.loads((path / kind.config).read_text())
    del config[kind.required_key]
    (path / kind.config).write_text(json.dumps(config))
    _error(kind, path, path / kind.config, rf"missing config key\(s\) \['{kind.required_key}'\]")


def test_unknown_config_key(copy) -> None:
    kind, path = copy
    config = json.loads((path / kind.config).read_text())
    (path / kind.config).write_text(json.dumps({**config, "bogus": 1}))
    if kind.config == "adapter_config.json":  # an adapter's non-constructor keys are its provenance metadata
        assert kind.load(path).info["bogus"] == 1
        return
    _error(kind, path, path / kind.config, r"unknown config key\(s\) \['bogus'\]")


def test_config_of_another_kind(copy) -> None:
    kind, path = copy
    if kind.config == "predictor.json":
        config_path = path / "model" / "config.json"  # the predictor's model directory is checked too
    else:
        config_path = path / kind.config
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "kind": "c2l-central" if config["kind"] != "c2l-central" else "mlp"}))
    _error(kind, path, config_path, "model, not a")


def test_invalid_config_value(copy) -> None:
    kind, path = copy
    config = json.loads((path / kind.config).read_text())
    if kind.config == "predictor.json":
        config["format_version"] = 99
        match = "unsupported format_version"
    else:
        config[kind.required_key] = "not a number" if kind.required_key != "prediction_type" else "x0"
        match = "invalid config"
    (path / kind.config).write_text(json.dumps(config))
    _error(kind, path, path / kind.config, match)


def test_missing_weights(copy) -> None:
    kind, path = copy
    (path / kind.weights).unlink()
    _error(kind, path, path / kind.weights, "missing weights file")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_safetensors(copy, damage) -> None:
    kind, path = copy
    data = (path / kind.weights).read_bytes()
    broken = {"truncated": data[: len(data) // 2], "garbage": b"not safetensors at all", "empty": b""}[damage]
    (path / kind.weights).write_bytes(broken)
    _error(kind, path, path / kind.weights, "unreadable safetensors weights")


def _rewrite_weights(path: Path, change: Callable[[dict], dict]) -> None:
    from safetensors.torch import load_file, save_file

    save_file(change(load_file(str(path))), str(path))


def test_renamed_tensor(copy) -> None:
    kind, path = copy

    def rename(state: dict) -> dict:
        name = sorted(state)[0]
        state[name + "_renamed"] = state.pop(name)
        return state

    _rewrite_weights(path / kind.weights, rename)
    _error(kind, path, path / kind.weights, r"1 missing .*1 unexpected .*_renamed")


def test_misshaped_tensor_shows_expected_and_found(copy) -> None:
    kind, path = copy
    name = {}

    def grow(state: dict) -> dict:
        name["k"] = k = sorted(k for k, v in state.items() if v.ndim >= 1)[-1]
        state[k] = torch.zeros(state[k].shape[0] + 1, *state[k].shape[1:], dtype=state[k].dtype)
        return state

    _rewrite_weights(path / kind.weights, grow)
    with pytest.raises(FedstError, match="wrong shape") as info:
        kind.load(path)
    message = str(info.value)
    assert str(path / kind.weights) in message and name["k"] in message
    assert "expected (" in message and "found (" in message, message


def test_flag_settings_are_checked_like_a_config(tmp_path) -> None:
    _flag().save_pretrained(tmp_path / "f")
    settings = json.loads((tmp_path / "f" / "settings.json").read_text())
    (tmp_path / "f" / "settings.json").write_text(json.dumps({**settings, "stepz": 3}))
    _error(KINDS["flag"], tmp_path / "f", tmp_path / "f" / "settings.json", r"unknown config key\(s\) \['stepz'\]")
    (tmp_path / "f" / "settings.json").unlink()
    _error(KINDS["flag"], tmp_path / "f", tmp_path / "f" / "settings.json", "missing config file")


@pytest.mark.parametrize("make", [_flag, _ridge], ids=["flag", "ridge"])
def test_predictor_directory_round_trips_every_model_kind(tmp_path, make) -> None:
    from shared.downstream.predictor import Predictor, load_predictor

    model = make()
    kind = "flag" if make is _flag else "ridge"
    Predictor(kind, model, ["G0", "G1", "G2"], "stats", feature_key="X_stats").save_pretrained(tmp_path / "p")
    back = load_predictor(tmp_path / "p", device="cpu")
    run = _run_flag if kind == "flag" else _run_regressor
    assert (
        back.kind == kind and back.genes == ["G0", "G1", "G2"] and (tmp_path / "p" / "model" / "config.json").is_file()
    )
    np.testing.assert_array_equal(run(back.model), run(model))


def test_ridge_needs_its_fitted_alpha(tmp_path) -> None:
    from shared.downstream.baselines import RidgeBaseline

    _ridge().save_pretrained(tmp_path / "r")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert set(config) == {"kind", "n_components", "alphas", "alpha_", "selection_"}
    del config["alpha_"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FedstError, match=r"config.json: missing config key\(s\) \['alpha_'\]"):
        RidgeBaseline.from_pretrained(tmp_path / "r")


def test_adapter_metadata_round_trips_and_the_central_hash_is_checked(tmp_path) -> None:
    from shared.c2l.modulation import load_adapter, load_adapter_config, save_adapter

    model = _adapter()
    save_adapter(model, tmp_path / "ad", store="site-a", epsilon=np.float64(2.5))
    config = load_adapter_config(tmp_path / "ad")
    assert config["kind"] == "c2l-adapter" and config["lora_rank"] == 2 and config["epsilon"] == 2.5
    loaded = load_adapter(_adapter_central(), tmp_path / "ad")
    assert loaded.info["store"] == "site-a" and loaded.info["central_hash"] == _adapter_central().weights_hash()
    save_adapter(loaded, tmp_path / "again")  # the loaded info (incl. the hash) is saved again, not doubled
    assert load_adapter_config(tmp_path / "again") == config
    other = _central()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(FedstError, match="belongs to central weights") as info:
        load_adapter(other, tmp_path / "ad")
    assert str(tmp_path / "ad" / "adapter_config.json") in str(info.value)


def test_adapter_without_lora_keeps_its_config_keys(tmp_path) -> None:
    from shared.c2l.modulation import create_conditioned, load_adapter, load_adapter_config, save_adapter

    model = create_conditioned(_adapter_central(), ["G0", "G1"], hidden_dim=8, embed_dim=4)
    save_adapter(model, tmp_path / "ad")
    config = load_adapter_config(tmp_path / "ad")
    assert "lora_rank" not in config and config["channels"] == model.modulation.config["channels"]
    assert load_adapter(_adapter_central(), tmp_path / "ad").modulation.config == model.modulation.config
    model.info = {"lora_rank": 0, "store": "site-b"}  # what `adapt` records: provenance, kept as such
    save_adapter(model, tmp_path / "ad2")
    loaded = load_adapter(_adapter_central(), tmp_path / "ad2")
    assert loaded.modulation.lora_rank == 0 and loaded.info["lora_rank"] == 0 and loaded.info["store"] == "site-b"


# ---- atomic writes ---------------------------------------------------------------------------------------
def _failing_safetensors(monkeypatch) -> None:
    import safetensors.torch

    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)


def test_a_failed_save_leaves_no_directory(tmp_path, monkeypatch) -> None:
    model = _central()
    _failing_safetensors(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(tmp_path / "out" / "m")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failed_resave_leaves_the_previous_artifact(tmp_path, monkeypatch) -> None:
    from shared.c2l.central import CentralDiffusion

    model = _central()
    model.save_pretrained(tmp_path / "m")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    expected = _run_central(model)
    _scramble(model, 9)
    _failing_safetensors(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before  # no temp files either
    np.testing.assert_array_equal(_run_central(CentralDiffusion.from_pretrained(tmp_path / "m")), expected)


def test_an_unserialisable_config_writes_nothing(tmp_path) -> None:
    from shared.c2l.modulation import save_adapter

    with pytest.raises(TypeError, match="not JSON serialisable"):
        save_adapter(_adapter(), tmp_path / "ad", store=object())
    assert list(tmp_path.iterdir()) == []


def test_a_resave_replaces_the_artifact_and_keeps_other_files(tmp_path) -> None:
    from shared.c2l.central import CentralDiffusion

    model = _central()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "samples.png").write_bytes(b"png")  # what `fedst c2l pretrain` writes beside the model
    _scramble(model, 10)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "samples.png").read_bytes() == b"png"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "samples.png"]
    np.testing.assert_array_equal(_run_central(CentralDiffusion.from_pretrained(tmp_path / "m")), _run_central(model))


def test_saving_onto_a_file_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "m").write_text("a file")
    with pytest.raises(FedstError, match="not a directory"):
        _central().save_pretrained(tmp_path / "m")
    assert (tmp_path / "m").read_text() == "a file"
