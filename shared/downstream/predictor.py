"""The one H&E -> expression entry point used by the federation's downstream phase, the experiment and the CLI.

    predictor = train_predictor([store_a, store_b], kind="ridge", encoder="stats", extra_stores=[synthetic])
    pred = predictor.predict(held_out_store)            # (spots x panel genes), store spot order
    metrics = evaluate_predictor(predictor, held_out_store)
    predictor.save_pretrained(out_dir); load_predictor(out_dir)

Kinds: ``ridge`` (HEST protocol: scaler -> PCA -> RidgeCV), ``mlp`` (small torch MLP), ``flag`` (graph
transformer + gene-token DiT, VE-SDE). Features come from ``obsm['X_<encoder>']`` when every store has them
(precomputed by e.g. a pathology foundation model), else from ``create_encoder(encoder, weights)`` on the
store's patches. Targets are the store's ``X`` (log1p-normalised panel expression). Entries a section did
not measure (``layers['measured'] == 0``) are excluded from the MLP/FLAG losses; ridge, which has no
per-entry mask, sees them filled with that gene's mean over measured training spots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from shared import keys
from shared.arrays import dense
from shared.errors import FedstError, require
from shared.persistence import Writer, check_keys, json_file, model_directory, read_config, tensor_file, write_artifact
from shared.store.format import PatchStore

if TYPE_CHECKING:
    from shared.downstream.encoders import ImageEncoder
    from shared.downstream.patch_transforms import PatchTransforms

KINDS = ("ridge", "mlp", "flag")
FORMAT = "fedst-predictor"
FORMAT_VERSION = 1
META = "predictor.json"
MODEL_DIR = "model"  # the model's own save_pretrained layout (ridge/mlp: config.json + weights.safetensors)
ENCODER_WEIGHTS = "encoder.safetensors"
META_KEYS = (
    "format",
    "format_version",
    "kind",
    "genes",
    "encoder",
    "encoder_kw",
    "encoder_weights",
    "feature_key",
    "patch_params",
    "info",
    "patch_transforms",
    "smoothing",
)
META_DEFAULTS: dict[str, Any] = {"patch_transforms": None, "smoothing": None}
"""Keys added after format_version 1 was first written, with the value that reproduces older files' behaviour."""


@dataclass
class SpotBatch:
    """Everything a predictor consumes about a set of spots (one or several stores)."""

    patches: np.ndarray | None  # (N, P, P, 3) uint8, or None when features are given
    coords: np.ndarray  # (N, 2) full-resolution pixels
    sections: np.ndarray  # (N,) str, unique across stores
    mpp: dict[str, float]
    features: np.ndarray | None = None  # (N, D) precomputed


def _open(store: PatchStore | str | os.PathLike) -> PatchStore:
    return store if isinstance(store, PatchStore) else PatchStore(store)


def _section_mpp(spots: Any, store: PatchStore) -> dict[str, float]:
    mpp = spots.uns.get(keys.MPP, store.manifest.get("params", {}).get("mpp"))
    sections = [str(s) for s in np.unique(spots.obs[keys.SECTION].astype(str))]
    if isinstance(mpp, Mapping):
        return {s: float(mpp.get(s, 0.5)) for s in sections}
    return {s: float(mpp) if mpp is not None else 0.5 for s in sections}


def _store_batch(
    store: PatchStore, rows: np.ndarray | None, feature_key: str | None, prefix: str = ""
) -> tuple[SpotBatch, Any]:
    spots = store.spots
    rows = np.arange(spots.n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
    require(
        rows.size == 0 or (rows.min() >= 0 and rows.max() < spots.n_obs),
        f"{store.path}: spot indices outside 0..{spots.n_obs - 1}",
    )
    sub = spots[rows]
    sections = sub.obs[keys.SECTION].astype(str).to_numpy()
    mpp = _section_mpp(spots, store)
    if keys.SPATIAL in sub.obsm:
        coords = np.asarray(sub.obsm[keys.SPATIAL], dtype=np.float64)
    else:  # e.g. synthetic pairs without a layout: every spot its own graph (far apart)
        coords = np.stack([np.arange(len(rows)) * 1e6, np.zeros(len(rows))], 1)
    features = None
    if feature_key is not None:
        require(feature_key in sub.obsm, f"{store.path}: spot table lacks obsm[{feature_key!r}]")
        features = np.asarray(sub.obsm[feature_key], dtype=np.float32)
        patches = None
    else:
        patch_rows = sub.obs[keys.PATCH_INDEX].to_numpy().astype(np.int64) if keys.PATCH_INDEX in sub.obs else rows
        order = np.argsort(patch_rows)
        patches = np.empty((len(rows), *store.patches.shape[1:]), dtype=np.uint8)
        patches[order] = store.patches[patch_rows[order]]
    sections = np.array([prefix + s for s in sections], dtype=object)
    batch = SpotBatch(patches, coords, sections, {prefix + k: v for k, v in mpp.items()}, features)
    return batch, sub


def _concat(batches: list[SpotBatch]) -> SpotBatch:
    feats = [b.features for b in batches]
    return SpotBatch(
        patches=None if any(b.patches is None for b in batches) else np.concatenate([b.patches for b in batches]),
        coords=np.concatenate([b.coords for b in batches]),
        sections=np.concatenate([b.sections for b in batches]),
        mpp={k: v for b in batches for k, v in b.mpp.items()},
        features=None if any(f is None for f in feats) else np.concatenate(feats),
    )


class Predictor:
    """A trained H&E -> expression model with its encoder and gene panel; see module docstring."""

    def __init__(
        self,
        kind: str,
        model: Any,
        genes: list[str],
        encoder: str,
        encoder_kw: dict[str, Any] | None = None,
        feature_key: str | None = None,
        patch_params: dict[str, Any] | None = None,
        encoder_obj: ImageEncoder | None = None,
        info: dict[str, Any] | None = None,
        patch_transforms: PatchTransforms | Mapping[str, Any] | None = None,
        smoothing: Mapping[str, Any] | None = None,
    ):
        from shared.downstream.patch_transforms import PatchTransforms

        self.kind = kind
        self.model = model
        self.genes = list(genes)
        self.encoder = encoder
        self.encoder_kw = dict(encoder_kw or {})
        self.feature_key = feature_key
        self.patch_params = dict(patch_params or {})
        self._encoder = encoder_obj
        self.info = dict(info or {})
        self.patch_transforms = (
            patch_transforms
            if isinstance(patch_transforms, PatchTransforms)
            else PatchTransforms.from_config(patch_transforms)
        )
        # DRIFT in the prediction path: {"features": t | None, "predictions": t | None, "k", "max_edge_um"}
        self.smoothing = _check_smoothing(smoothing)

    # ---- features ----
    def _get_encoder(self) -> ImageEncoder:
        if self._encoder is None:
            from shared.downstream.encoders import create_encoder

            self._encoder = create_encoder(self.encoder, **self.encoder_kw)
        return self._encoder

    def features(self, batch: SpotBatch) -> np.ndarray:
        if batch.features is not None:
            return batch.features
        require(batch.patches is not None, "predictor: neither features nor patches were given")
        from shared.downstream.patch_transforms import embed_patches

        return embed_patches(self._get_encoder(), batch.patches, batch.sections, self.patch_transforms)

    # ---- prediction ----
    def _batch_of(self, data: Any) -> SpotBatch:
        if isinstance(data, SpotBatch):
            return data
        if isinstance(data, (PatchStore, str, os.PathLike)):
            store = _open(data)
            if store.panel != self.genes:
                missing = [g for g in self.genes if g not in set(store.panel)]
                raise FedstError(
                    f"{store.path}: gene panel differs from the predictor's ({len(store.panel)} vs {len(self.genes)} "
                    f"genes; {len(missing)} of the predictor's missing, e.g. {missing[:3]})"
                )
            key = self.feature_key if self.feature_key in store.spots.obsm else None
            require(
                self.feature_key is None or key is not None,
                f"{store.path}: predictor was trained on obsm[{self.feature_key!r}], which this store lacks",
            )
            return _store_batch(store, None, key)[0]
        if isinstance(data, tuple) and len(data) >= 2:
            patches, coords = np.asarray(data[0]), np.asarray(data[1], dtype=np.float64)
            sections = np.asarray(data[2]).astype(str) if len(data) > 2 else np.full(len(coords), "section")
            mpp = data[3] if len(data) > 3 else self.patch_params.get("mpp_default", 0.5)
            mpp_map = dict(mpp) if isinstance(mpp, Mapping) else {str(s): float(mpp) for s in np.unique(sections)}
            require(
                len(patches) == len(coords) == len(sections), "predict: patches, coords and sections differ in length"
            )
            return SpotBatch(patches, coords, sections, mpp_map)
        raise FedstError("predict: expected a PatchStore, a store path, or (patches, coords[, sections[, mpp]])")

    def predict(self, data: PatchStore | str | os.PathLike | tuple | SpotBatch, **kw: Any) -> np.ndarray:
        """(spots x panel genes) float32 normalised expression, in the input's spot order."""
        batch = self._batch_of(data)
        feats = self.features(batch)
        if not self.smoothing:
            return _model_predict(self.kind, self.model, feats, batch, **kw)
        from shared.downstream.spatial_smoothing import smooth, spot_laplacian

        cfg = self.smoothing
        lap = spot_laplacian(batch.coords, batch.sections, batch.mpp, k=cfg["k"], max_edge_um=cfg["max_edge_um"])
        pred = _model_predict(self.kind, self.model, smooth(feats, lap, cfg["features"]), batch, **kw)
        pred = smooth(pred, lap, cfg["predictions"])
        return pred if self.kind == "flag" else np.clip(pred, 0.0, None).astype(np.float32)

    # ---- persistence ----
    def save_pretrained(self, out: str | os.PathLike) -> Path:
        """predictor.json + model/ (the model's config + safetensors) [+ encoder.safetensors], written atomically."""
        files: dict[str, Writer] = {f"{MODEL_DIR}/{name}": w for name, w in self.model.artifact_files().items()}
        state = self._get_encoder().state_dict() if self.feature_key is None else {}
        saved_kw = self._get_encoder().saved_kw() if self.feature_key is None else {}
        if state:
            files[ENCODER_WEIGHTS] = tensor_file(state)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "genes": self.genes,
            "encoder": self.encoder,
            "encoder_kw": {**{k: v for k, v in self.encoder_kw.items() if k != "weights"}, **saved_kw},
            "encoder_weights": ENCODER_WEIGHTS if state else None,
            "feature_key": self.feature_key,
            "patch_params": self.patch_params,
            "info": self.info,
            "patch_transforms": self.patch_transforms.to_config(),
            "smoothing": self.smoothing,
        }
        files[META] = json_file(meta)
        return write_artifact(out, files)

    def __repr__(self) -> str:
        return f"Predictor(kind={self.kind!r}, encoder={self.encoder!r}, genes={len(self.genes)})"


def load_predictor(path: str | os.PathLike, device: str | None = None) -> Predictor:
    """A predictor saved by ``Predictor.save_pretrained``; FedstError naming the file when it is not one."""
    path = model_directory(path, (META, f"{MODEL_DIR}/"))
    meta_path = path / META
    meta = {**META_DEFAULTS, **read_config(meta_path)}
    require(meta.get("format") == FORMAT, f"{meta_path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    require(
        meta.get("format_version") == FORMAT_VERSION,
        f"{meta_path}: unsupported format_version {meta.get('format_version')!r}",
    )
    check_keys(meta_path, meta, META_KEYS, "a saved predictor")
    _check_meta_types(meta_path, meta)
    from shared.downstream.patch_transforms import PatchTransforms

    transforms = PatchTransforms.from_config(meta["patch_transforms"], f"{meta_path}: field 'patch_transforms'")
    kind = meta["kind"]
    require(kind in KINDS, f"{meta_path}: field 'kind' is {kind!r}, expected one of {', '.join(KINDS)}")
    model_cls = _model_class(kind)
    model_dir = path / MODEL_DIR
    model = model_cls.from_pretrained(model_dir, device) if kind == "flag" else model_cls.from_pretrained(model_dir)
    outputs = _n_outputs(model)
    require(
        outputs == len(meta["genes"]),
        f"{meta_path}: field 'genes' names {len(meta['genes'])} genes, but the model in {model_dir} predicts "
        f"{outputs} (a predictor.json from another model?)",
    )
    encoder_kw = dict(meta.get("encoder_kw") or {})
    encoder_obj = None
    if meta.get("feature_key") is None:
        from shared.downstream.encoders import create_encoder

        weights = path / meta["encoder_weights"] if meta.get("encoder_weights") else None
        try:
            encoder_obj = create_encoder(meta["encoder"], weights=weights, **encoder_kw)
        except FedstError as exc:  # an unknown encoder name or bad weights file: say which predictor holds it
            raise FedstError(f"{meta_path}: {exc}") from None
        except TypeError as exc:  # an encoder_kw key the encoder does not take
            raise FedstError(
                f"{meta_path}: field 'encoder_kw' does not fit encoder {meta['encoder']!r} ({exc})"
            ) from None
    return Predictor(
        kind,
        model,
        meta["genes"],
        meta["encoder"],
        encoder_kw,
        meta.get("feature_key"),
        meta.get("patch_params"),
        encoder_obj,
        meta.get("info"),
        transforms,
        _check_smoothing(meta["smoothing"], f"{meta_path}: field 'smoothing'"),
    )


META_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "genes": (list,),
    "encoder": (str,),
    "encoder_kw": (dict, type(None)),
    "encoder_weights": (str, type(None)),
    "feature_key": (str, type(None)),
    "patch_params": (dict, type(None)),
    "info": (dict, type(None)),
    "patch_transforms": (dict, type(None)),
    "smoothing": (dict, type(None)),
}


def _check_meta_types(meta_path: Path, meta: Mapping[str, Any]) -> None:
    """Each predictor.json field has the type save_pretrained wrote: a damaged file fails here, naming the
    field, instead of as a TypeError while the model is rebuilt."""
    for field, types in META_TYPES.items():
        if not isinstance(meta[field], types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise FedstError(f"{meta_path}: field {field!r} is {meta[field]!r:.60}, expected {expected}")
    genes = meta["genes"]
    if not genes or not all(isinstance(g, str) and g for g in genes):
        raise FedstError(f"{meta_path}: field 'genes' must be a non-empty list of gene names")


def _model_predict(kind: str, model: Any, feats: np.ndarray, batch: SpotBatch, **kw: Any) -> np.ndarray:
    """The fitted model's (spots x genes) output on ``feats``; ridge/MLP clipped at 0 as float32."""
    if kind == "flag":
        return model.predict(feats, batch.coords, batch.sections, batch.mpp, **kw)
    return np.clip(model.predict(feats), 0.0, None).astype(np.float32)


def _check_smoothing(config: Mapping[str, Any] | None, where: str = "smoothing") -> dict[str, Any] | None:
    """A smoothing config as saved ({"features", "predictions": t or None, "k", "max_edge_um"}) or None."""
    if config is None:
        return None
    from shared.downstream.spatial_smoothing import K_NEIGHBOURS, MAX_EDGE_UM, parse_setting

    require(isinstance(config, Mapping), f"{where}: expected a mapping, got {config!r:.60}")
    check_keys(Path(where), config, ("features", "predictions", "k", "max_edge_um"), "smoothing")
    out: dict[str, Any] = {"k": K_NEIGHBOURS, "max_edge_um": MAX_EDGE_UM}
    for name in ("features", "predictions"):
        t = parse_setting(config[name], f"{where}: {name}")
        require(t != "auto", f"{where}: {name} is 'auto'; a saved predictor holds the chosen t")
        out[name] = t
    require(isinstance(config["k"], int) and config["k"] >= 1, f"{where}: k must be an integer >= 1")
    require(
        isinstance(config["max_edge_um"], (int, float)) and config["max_edge_um"] > 0,
        f"{where}: max_edge_um must be a positive distance",
    )
    out.update(k=int(config["k"]), max_edge_um=float(config["max_edge_um"]))
    return out


def _n_outputs(model: Any) -> int:
    """How many genes a loaded ridge / MLP / FLAG model predicts (its output width)."""
    if hasattr(model, "W"):
        return int(model.W.shape[1])
    if getattr(model, "model", None) is not None:  # FLAG: the trained FlagModel's config
        return int(model.model.config["n_genes"])
    return int(model.config["out_dim"])


def _model_class(kind: str) -> Any:
    require(kind in KINDS, f"predictor kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "ridge":
        from shared.downstream.baselines import RidgeBaseline

        return RidgeBaseline
    if kind == "mlp":
        from shared.downstream.baselines import MLPRegressor

        return MLPRegressor
    from shared.downstream.flag import FlagRegressor

    return FlagRegressor


def _rows_for(store: PatchStore, spot_indices: Mapping[Any, np.ndarray] | None) -> np.ndarray | None:
    if not spot_indices:
        return None
    for key, rows in spot_indices.items():
        if key is store or (not isinstance(key, PatchStore) and Path(key).resolve() == store.path.resolve()):
            return np.asarray(rows, dtype=np.int64)
    return None


def _targets(subs: list[Any], genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    Y = np.concatenate([dense(s.X, np.float32) for s in subs])
    M = np.concatenate(
        [
            dense(s.layers[keys.MEASURED], np.float32)
            if keys.MEASURED in s.layers
            else np.ones((s.n_obs, len(genes)), np.float32)
            for s in subs
        ]
    )
    require(np.isfinite(Y).all(), "training expression contains NaN or Inf")
    return Y, (M > 0).astype(np.float32)


def train_predictor(
    train_stores: Sequence[PatchStore | str | os.PathLike],
    kind: str = "ridge",
    encoder: str = "stats",
    *,
    extra_stores: Sequence[PatchStore | str | os.PathLike] = (),
    seed: int = 0,
    progress: bool = True,
    spot_indices: Mapping[Any, np.ndarray] | None = None,
    encoder_weights: str | os.PathLike | None = None,
    encoder_kw: Mapping[str, Any] | None = None,
    use_precomputed: bool = True,
    stain_normalise: bool = False,
    tta: bool = False,
    **kw: Any,
) -> Predictor:
    """Train a ``kind`` predictor on the real spots of ``train_stores`` (+ synthetic ``extra_stores``).

    ``spot_indices``: {store or store path: row indices} restricts a store's real spots (spot-fraction
    sweeps); stores not named contribute all spots; extra stores are never subset. Remaining keyword
    arguments go to the model: ridge ``n_components``/``alphas``; mlp ``hidden``, ``layers``, ``dropout``,
    ``epochs``, ``lr``...; flag any ``FlagSettings`` field (``preset``, ``steps``, ``sample_steps``,
    ``n_samples``, ``gene_embeddings``, ``model={...}`` overrides, ...). ``stain_normalise`` (Macenko, fitted
    per section, to the reference stains) and ``tta`` (mean embedding over the 8 flips/rotations) transform the
    patches before the encoder at training and prediction time (``shared.downstream.patch_transforms``); with
    either on, precomputed ``obsm`` features are not used (they were computed without it).
    ``smooth_features`` / ``smooth_predictions``: see :func:`train_predictor_on_batch`.
    """
    require(kind in KINDS, f"predictor kind {kind!r}: expected one of {', '.join(KINDS)}")
    stores = [_open(s) for s in train_stores]
    extras = [_open(s) for s in extra_stores]
    require(len(stores) + len(extras) > 0, "train_predictor: no training store given")
    all_stores = stores + extras
    genes = all_stores[0].panel
    for store in all_stores[1:]:
        require(
            store.panel == genes,
            f"{store.path}: gene panel differs from {all_stores[0].path}'s (stores must share one panel)",
        )
    feature_key = f"X_{encoder}"
    if stain_normalise or tta or not (use_precomputed and all(feature_key in s.spots.obsm for s in all_stores)):
        feature_key = None
    batches, subs = [], []
    for i, store in enumerate(all_stores):
        rows = _rows_for(store, spot_indices) if i < len(stores) else None
        batch, sub = _store_batch(store, rows, feature_key, prefix=f"{i}:")
        batches.append(batch)
        subs.append(sub)
    data = _concat(batches)
    require(len(data.coords) >= 3, f"train_predictor: only {len(data.coords)} training spots")
    Y, M = _targets(subs, genes)
    info = {
        "train_stores": [str(s.path) for s in stores],
        "extra_stores": [str(s.path) for s in extras],
        "n_train_spots": int(len(Y)),
        "n_synthetic_spots": int(sum(s.n_obs for s in subs[len(stores) :])),
    }
    return train_predictor_on_batch(
        data,
        Y,
        genes,
        kind,
        encoder,
        mask=M,
        feature_key=feature_key,
        patch_params=_patch_params(stores[0] if stores else extras[0]),
        info=info,
        seed=seed,
        progress=progress,
        encoder_weights=encoder_weights,
        encoder_kw=encoder_kw,
        stain_normalise=stain_normalise,
        tta=tta,
        **kw,
    )


def train_predictor_on_batch(
    data: SpotBatch,
    Y: np.ndarray,
    genes: Sequence[str],
    kind: str = "ridge",
    encoder: str = "stats",
    *,
    mask: np.ndarray | None = None,
    feature_key: str | None = None,
    patch_params: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
    encoder_weights: str | os.PathLike | None = None,
    encoder_kw: Mapping[str, Any] | None = None,
    stain_normalise: bool = False,
    tta: bool = False,
    smooth_features: float | str | None = None,
    smooth_predictions: float | str | None = None,
    **kw: Any,
) -> Predictor:
    """``train_predictor`` on spots already in memory (``Y``: spots x ``genes`` targets; ``mask``: measured
    entries, default all): the one model path, also used by cross-validation and benchmarks that hold their
    data as arrays. ``feature_key`` names the obsm key ``data.features`` came from (None: encode patches).

    ``smooth_features`` / ``smooth_predictions`` (DRIFT in the prediction path,
    :mod:`shared.downstream.spatial_smoothing`): None/"off", a diffusion time t, or "auto" (t chosen by
    leave-one-training-section-out, the grouping that chooses ridge's alpha). The chosen t is saved."""
    require(kind in KINDS, f"predictor kind {kind!r}: expected one of {', '.join(KINDS)}")
    from shared.downstream.spatial_smoothing import parse_setting

    smooth_features = parse_setting(smooth_features, "smooth_features")
    smooth_predictions = parse_setting(smooth_predictions, "smooth_predictions")
    genes = list(genes)
    Y = np.asarray(Y, dtype=np.float32)
    require(
        Y.ndim == 2 and Y.shape == (len(data.coords), len(genes)),
        f"targets: expected ({len(data.coords)}, {len(genes)}), got {Y.shape}",
    )
    M = np.ones_like(Y) if mask is None else (np.asarray(mask) > 0).astype(np.float32)
    encoder_kw = dict(encoder_kw or {})
    log = _Log(progress)
    predictor = Predictor(
        kind,
        None,
        genes,
        encoder,
        encoder_kw,
        feature_key,
        patch_params=dict(patch_params or {}),
        info={**dict(info or {"n_train_spots": int(len(Y))}), "seed": seed},
        patch_transforms={"stain_normalise": bool(stain_normalise), "tta": bool(tta)},
    )
    if feature_key is None:
        from shared.downstream.encoders import create_encoder

        predictor._encoder = create_encoder(encoder, weights=encoder_weights, **encoder_kw)
    log(f"features: {len(Y)} spots via {'obsm[' + feature_key + ']' if feature_key else 'encoder ' + encoder}")
    feats = predictor.features(data)
    log(f"training {kind} on {feats.shape[1]}-d features -> {len(genes)} genes")
    real = np.arange(len(Y)) < len(Y) - int(predictor.info.get("n_synthetic_spots", 0))  # synthetic: never held out
    if smooth_features is not None or smooth_predictions is not None:
        feats = _setup_smoothing(predictor, feats, Y, M, data, seed, log, kw, real, smooth_features, smooth_predictions)
    predictor.model = _fit(kind, feats, Y, M, data, genes, seed, log, kw, holdout=real)
    selection = getattr(predictor.model, "selection_", None) or getattr(predictor.model, "validation_", None)
    if selection is not None:  # how alpha / the early-stopping split was chosen, for predictor.json readers
        predictor.info["model_selection"] = selection
    return predictor


def _subset(data: SpotBatch, rows: np.ndarray) -> SpotBatch:
    """The spots ``rows`` of ``data`` (features only; patches are not needed once encoded)."""
    feats = None if data.features is None else data.features[rows]
    return SpotBatch(None, data.coords[rows], data.sections[rows], data.mpp, feats)


def _setup_smoothing(
    predictor: Predictor,
    feats: np.ndarray,
    Y: np.ndarray,
    M: np.ndarray,
    data: SpotBatch,
    seed: int,
    log: _Log,
    kw: dict[str, Any],
    real: np.ndarray,
    smooth_features: float | str | None,
    smooth_predictions: float | str | None,
) -> np.ndarray:
    """Resolve "auto" by inner CV on the training sections, store the chosen t on ``predictor.smoothing``
    (saved in predictor.json, logged) and return the training features smoothed with it."""
    from shared.downstream import spatial_smoothing as ss

    kind, genes = predictor.kind, predictor.genes
    t_f, t_p = smooth_features, smooth_predictions
    if ss.AUTO in (t_f, t_p):
        filled = np.where(M > 0, Y, (Y * M).sum(0) / np.maximum(M.sum(0), 1))

        def fit_predict(train: np.ndarray, test: np.ndarray, x_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
            quiet = _Log(False)
            model = _fit(
                kind, x_train, Y[train], M[train], _subset(data, train), genes, seed, quiet, dict(kw), real[train]
            )
            return _model_predict(kind, model, x_test, _subset(data, test))

        selection = ss.choose_times(
            feats,
            filled,
            data.coords,
            data.sections,
            data.mpp,
            fit_predict,
            smooth_features=t_f,
            smooth_predictions=t_p,
            holdout=real,
        )
        t_f, t_p = selection.features, selection.predictions
        predictor.info["smoothing_selection"] = {"scheme": selection.scheme, "scores": selection.scores}
        log(f"smoothing: {selection.summary()}")
    predictor.smoothing = {"features": t_f, "predictions": t_p, "k": ss.K_NEIGHBOURS, "max_edge_um": ss.MAX_EDGE_UM}
    log(
        f"smoothing: features t={t_f}, predictions t={t_p} (heat kernel over each section's {ss.K_NEIGHBOURS}-NN graph)"
    )
    lap = ss.spot_laplacian(data.coords, data.sections, data.mpp)
    return ss.smooth(feats, lap, t_f)


def _patch_params(store: PatchStore) -> dict[str, Any]:
    params = store.manifest.get("params", {})
    return {k: params[k] for k in ("patch_px", "field_um", "tile_px", "max_tiles_per_section") if k in params}


def _fit(
    kind: str,
    feats: np.ndarray,
    Y: np.ndarray,
    M: np.ndarray,
    data: SpotBatch,
    genes: list[str],
    seed: int,
    log: _Log,
    kw: dict[str, Any],
    holdout: np.ndarray | None = None,
) -> Any:
    # hyperparameters are chosen on held-out training SECTIONS (or spatial blocks), never on single spots
    split = {"groups": data.sections, "coords": data.coords, "holdout": holdout}
    if kind == "ridge":
        from shared.downstream.baselines import RidgeBaseline

        filled = np.where(M > 0, Y, (Y * M).sum(0) / np.maximum(M.sum(0), 1))
        model = RidgeBaseline(**kw).fit(feats, filled, **split)
        log(f"ridge: alpha {model.alpha_:g} by {model.selection_}")
        return model
    if kind == "mlp":
        import torch

        from shared.downstream.baselines import MLPRegressor

        arch = {k: kw.pop(k) for k in ("hidden", "layers", "dropout") if k in kw}
        with torch.random.fork_rng():  # the layers' initialisation follows `seed`, not the process's RNG state
            torch.manual_seed(seed)
            model = MLPRegressor(feats.shape[1], Y.shape[1], **arch)
        every = max(1, kw.get("epochs", 200) // 10)
        return model.fit(
            feats,
            Y,
            M,
            seed=seed,
            **split,
            **kw,
            on_epoch=lambda e, tr, va: (
                log(f"mlp epoch {e + 1}: train {tr:.4f} val {va:.4f}") if (e + 1) % every == 0 else None
            ),
        )
    from shared.downstream.flag import FlagRegressor, FlagSettings

    device = kw.pop("device", None)
    settings = FlagSettings(**{"seed": seed, **kw})
    every = max(1, settings.steps // 10)
    mask = None if M.all() else M
    return FlagRegressor(settings, device=device).fit(
        feats,
        Y,
        data.coords,
        data.sections,
        genes,
        data.mpp,
        mask,
        on_step=lambda s, loss: (
            log(f"flag step {s + 1}/{settings.steps}: loss {loss:.4f}") if (s + 1) % every == 0 else None
        ),
    )


class _Log:
    """Concise progress lines on stderr (via logging) when enabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            import logging

            logging.getLogger("fedst.predictor").info(message)
            import sys

            print(f"[predictor] {message}", file=sys.stderr, flush=True)


def evaluate_predictor(
    predictor: Predictor, store: PatchStore | str | os.PathLike, sections: Sequence[str] | None = None
) -> dict[str, Any]:
    """Metrics of ``predictor`` on ``store`` (optionally only ``sections``) via the shared metrics module."""
    from shared.downstream.metrics import evaluate_predictions

    store = _open(store)
    spots = store.spots
    section_of = spots.obs[keys.SECTION].astype(str).to_numpy()
    rows = np.arange(spots.n_obs)
    if sections is not None:
        wanted = [str(s) for s in sections]
        unknown = sorted(set(wanted) - set(section_of))
        require(not unknown, f"{store.path}: no section(s) {unknown} (has {sorted(set(section_of))})")
        rows = np.flatnonzero(np.isin(section_of, wanted))
    pred = predictor.predict(store)[rows]
    truth = dense(spots.X, np.float32)[rows]
    coords = np.asarray(spots.obsm[keys.SPATIAL], dtype=np.float64)[rows]
    return evaluate_predictions(pred, truth, coords, section_of[rows], list(store.panel))


def prediction_adata(
    predictor: Predictor, store: PatchStore | str | os.PathLike, images: bool = True, **predict_kw: Any
) -> Any:
    """AnnData of a prediction: X = prediction (also layers[PREDICTED]); obs section; obsm[SPATIAL] kept;
    measured truth in layers[NORMALISED] and its mask in layers[MEASURED] when the store measured anything;
    with ``images``, uns['spatial'][section] (tissue hires/lowres + scalefactors) where the slide is reachable."""
    import anndata as ad

    store = _open(store)
    spots = store.spots
    pred = predictor.predict(store, **predict_kw)
    out = ad.AnnData(
        X=pred, obs=spots.obs[[c for c in (keys.SECTION, keys.SITE) if c in spots.obs]].copy(), var=spots.var[[]].copy()
    )
    out.obsm[keys.SPATIAL] = np.asarray(spots.obsm[keys.SPATIAL], dtype=np.float64)
    out.layers[keys.PREDICTED] = pred.copy()
    measured = dense(spots.layers[keys.MEASURED], np.float32) if keys.MEASURED in spots.layers else np.zeros_like(pred)
    if measured.any():
        out.layers[keys.NORMALISED] = dense(spots.X, np.float32)
        out.layers[keys.MEASURED] = measured
    if keys.MPP in spots.uns:
        out.uns[keys.MPP] = spots.uns[keys.MPP]
    out.uns["fedst_prediction"] = {
        "kind": predictor.kind,
        "encoder": predictor.encoder,
        "store": str(store.path),
        "target": "log1p(counts / library size * 1e4) on the panel",
        **{k: v for k, v in predictor.info.items() if k != "seed"},
    }
    if images:  # scanpy/squidpy then draw the spots on the tissue; a missing slide is one logged line
        from shared.downstream.spatial_images import add_spatial_images

        add_spatial_images(out, store)
    return out


def plot_prediction(adata: Any, out_png: Path, n_genes: int = 4, section: str | None = None) -> Path:
    """Spatial heatmaps of the most variable genes: predicted (left) vs measured (right) when measured exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sec = adata.obs[keys.SECTION].astype(str).to_numpy()
    section = section or sec[0]
    rows = sec == section
    pred = dense(adata.X, np.float32)[rows]
    truth = dense(adata.layers[keys.NORMALISED], np.float32)[rows] if keys.NORMALISED in adata.layers else None
    ref = truth if truth is not None else pred
    genes = np.argsort(-ref.var(0))[: min(n_genes, ref.shape[1])]
    xy = np.asarray(adata.obsm[keys.SPATIAL])[rows]
    cols = 2 if truth is not None else 1
    fig, axes = plt.subplots(len(genes), cols, figsize=(3.2 * cols, 3.0 * len(genes)), squeeze=False)
    for r, g in enumerate(genes):
        panels = [("predicted", pred[:, g])] + ([("measured", truth[:, g])] if truth is not None else [])
        lo = min(p[1].min() for p in panels)
        hi = max(p[1].max() for p in panels)
        for c, (label, values) in enumerate(panels):
            ax = axes[r, c]
            im = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=8, cmap="viridis", vmin=lo, vmax=hi)
            ax.invert_yaxis()
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{adata.var_names[g]} {label}", fontsize=9)
        fig.colorbar(im, ax=axes[r].tolist(), shrink=0.8)
    fig.suptitle(f"section {section}", fontsize=10)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
