"""The encoder factory: one name -> one embedding function, random init or a local weights file."""

from __future__ import annotations

import numpy as np
import pytest

from shared.downstream.encoders import create_encoder
from shared.errors import FedstError


def _patches(n: int = 6, px: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, px, px, 3), dtype=np.uint8)


def test_stats_encoder_is_deterministic_and_sees_colour() -> None:
    enc = create_encoder("stats", device="cpu")
    x = _patches()
    a, b = enc.embed(x), enc.embed(x)
    assert a.ndim == 2 and a.shape[0] == len(x) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    pink = np.full((2, 32, 32, 3), (230, 150, 200), np.uint8)
    purple = np.full((2, 32, 32, 3), (90, 60, 150), np.uint8)
    assert not np.allclose(enc.embed(pink), enc.embed(purple))


def test_stats_colour_is_stats_then_the_audits_rotation_invariant_colour_features() -> None:
    from shared.c2l.audit import image_features

    enc = create_encoder("stats_colour", device="cpu")
    x = _patches(n=5, px=48)
    got = enc.embed(x)
    stats = create_encoder("stats", device="cpu").embed(x)
    assert got.shape == (5, enc.dim) and enc.dim == stats.shape[1] + 51 and got.dtype == np.float32
    np.testing.assert_array_equal(got[:, : stats.shape[1]], stats)
    np.testing.assert_allclose(got[:, stats.shape[1] :], image_features(x, 32), rtol=1e-6, atol=1e-6)
    turned = np.rot90(x, 1, axes=(1, 2))  # the colour half does not see orientation; the Gabor bank of stats does
    np.testing.assert_allclose(enc.embed(turned)[:, stats.shape[1] :], got[:, stats.shape[1] :], rtol=1e-5, atol=1e-5)
    assert enc.config() == {"name": "stats_colour"}
    with pytest.raises(FedstError, match="encoder 'stats_colour' has no weights"):
        create_encoder("stats_colour", weights="w.safetensors")


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_timm_encoder_random_init_and_local_weights_round_trip(name: str, tmp_path) -> None:
    import torch

    enc = create_encoder(name, device="cpu", seed=1, input_px=32 if name.startswith("resnet") else 224)
    x = _patches(n=2)
    feats = enc.embed(x)
    assert feats.shape[0] == 2 and feats.shape[1] > 0 and np.isfinite(feats).all()
    weights = tmp_path / "w.pt"
    torch.save(enc.state_dict(), weights)
    other = create_encoder(name, weights=weights, device="cpu", seed=2, input_px=enc.config()["input_px"])
    np.testing.assert_allclose(other.embed(x), feats, rtol=1e-5, atol=1e-5)


def test_bad_names_and_weights_are_clear_errors(tmp_path) -> None:
    import torch

    with pytest.raises(FedstError, match="unknown"):
        create_encoder("no_such_architecture")
    bad = tmp_path / "bad.pt"
    torch.save({"nope.weight": torch.zeros(3)}, bad)
    with pytest.raises(FedstError, match=str(bad.name)):
        create_encoder("resnet18", weights=bad, device="cpu")
    with pytest.raises(FedstError):
        create_encoder("resnet18", weights=tmp_path / "missing.pt", device="cpu")


def test_fixed_size_vit_resizes_default_64px_patches_to_its_native_input() -> None:
    import torch

    torch.set_num_threads(1)
    x = _patches(n=2, px=64)
    vit = create_encoder("vit_tiny_patch16_224", device="cpu", seed=1)  # no input_px: the default store patches
    assert vit.resize_px == 224 and vit.config()["input_px"] is None  # derived, not saved as a choice
    feats = vit.embed(x)  # used to fail: "Input height (64) doesn't match model (224)"
    assert feats.shape == (2, vit.dim) and np.isfinite(feats).all()
    explicit = create_encoder("vit_tiny_patch16_224", device="cpu", seed=1, input_px=224)
    np.testing.assert_allclose(feats, explicit.embed(x), rtol=1e-5, atol=1e-5)  # the same resize to 224
    assert not np.allclose(feats[0], feats[1])  # the patch content still matters after resizing
    built_small = create_encoder("vit_tiny_patch16_224", device="cpu", img_size=64)  # a timm option wins
    assert built_small.resize_px == 64 and built_small.embed(x).shape == (2, built_small.dim)
    assert create_encoder("resnet18", device="cpu").resize_px is None  # convolutional: any size, as given
