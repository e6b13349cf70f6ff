"""`fedst c2l ...`: central pretraining, gene-conditioned adaptation, synthesis and audit."""

from pathlib import Path
from typing import List

import typer

from shared.io import write_json_atomic

app = typer.Typer(
    help="C2L-ST: central diffusion model, local gene-conditioned adaptation, synthesis.", no_args_is_help=True
)


@app.command()
def pretrain(
    stores: List[Path] = typer.Argument(..., help="patch stores whose tiles (and spot patches) to train on"),
    out: Path = typer.Option(..., "--out", help="model directory (config.json + model.safetensors)"),
    preset: str = typer.Option("tiny", help="tiny | base | large"),
    steps: int = typer.Option(500, help="optimizer steps"),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(2e-4),
    seed: int = typer.Option(0),
    ema_decay: float = typer.Option(0.0, help="> 0 saves EMA weights (e.g. 0.999)"),
    prediction: str = typer.Option("v_prediction", help="v_prediction | epsilon"),
    init: Path | None = typer.Option(None, help="continue from this central model directory"),
    sample_size: int | None = typer.Option(None, help="override the preset's resolution (px)"),
    channels: str | None = typer.Option(None, help="override block_out_channels, e.g. 16,32"),
    device: str | None = typer.Option(None, help="cpu | cuda (default: cuda when present)"),
) -> None:
    """Pretrain the central diffusion model on unlabeled H&E tiles."""
    import numpy as np
    import torch

    from shared.c2l.central import CentralDiffusion, create_central
    from shared.c2l.ema import create_ema
    from shared.c2l.plots import image_grid, loss_curve
    from shared.c2l.sampling import sample_central
    from shared.c2l.schedule import to_uint8
    from shared.c2l.train import train_central
    from shared.store.format import PatchStore

    opened = [PatchStore(s) for s in stores]
    overrides: dict = {"prediction_type": prediction}
    if sample_size:
        overrides["sample_size"] = sample_size
    if channels:
        overrides["block_out_channels"] = [int(c) for c in channels.split(",")]
        overrides["norm_num_groups"] = min(8, min(overrides["block_out_channels"]) // 4)
    torch.manual_seed(seed)
    model = CentralDiffusion.from_pretrained(init) if init else create_central(preset, **overrides)
    ema = create_ema(model, ema_decay) if ema_decay > 0 else None
    summary = train_central(model, opened, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device, ema=ema)
    if ema is not None:
        ema.copy_to(model.parameters())
    model.save_pretrained(out)
    samples = to_uint8(sample_central(model, 8, sampler="ddim", steps=25, seed=seed))
    real = opened[0].tiles[:8] if opened[0].n_tiles else opened[0].patches[:8]
    image_grid(
        [("real tiles", np.asarray(real)), ("central samples (DDIM 25)", samples)], out / "samples.png", "central model"
    )
    loss_curve(summary["losses"], out / "loss.png", "central pretraining")
    summary.update(
        preset=preset,
        stores=[str(s) for s in stores],
        params=model.num_parameters(),
        weights_hash=model.weights_hash(),
        ema_decay=ema_decay,
    )
    write_json_atomic(out / "summary.json", summary)
    typer.echo(
        f"central model -> {out} (loss {summary['losses'][0]:.4f} -> {summary['losses'][-1]:.4f}, "
        f"{summary['steps_per_s']:.2f} steps/s on {summary['device']})"
    )


@app.command()
def adapt(
    central: Path = typer.Option(..., "--central", help="central model directory"),
    store: Path = typer.Option(..., "--store", help="the site's patch store with paired spots"),
    out: Path = typer.Option(..., "--out", help="adapter directory"),
    steps: int = typer.Option(300),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(1e-3),
    seed: int = typer.Option(0),
    cond_dropout: float = typer.Option(0.1, help="probability of the null condition (classifier-free guidance)"),
    timestep_power: float = typer.Option(
        0.3, help="t = T u^power: < 1 favours the high-noise steps where the genes matter"
    ),
    lora_rank: int = typer.Option(0, min=0, help="also train rank-r LoRA on the attention projections (0: FiLM only)"),
    attention_film: bool = typer.Option(
        False, "--attention-film", help="the genes also modulate every attention block's input norm (adaLN-style)"
    ),
    dp_epsilon: float | None = typer.Option(None, "--dp-epsilon", help="train with DP-SGD to this epsilon"),
    dp_delta: float | None = typer.Option(None, "--dp-delta", help="default: min(1e-5, 0.1 / n_spots)"),
    dp_max_grad_norm: float = typer.Option(1.0, "--dp-max-grad-norm"),
    guidance: float = typer.Option(2.0, help="guidance of the preview samples"),
    device: str | None = typer.Option(None),
) -> None:
    """Adapt the frozen central model to a site with gene-conditioned FiLM modulation."""
    import torch

    from shared.c2l.adapt import adapt as run_adapt
    from shared.c2l.central import CentralDiffusion
    from shared.c2l.data import PairedSpots
    from shared.c2l.dp import DPConfig
    from shared.c2l.modulation import save_adapter
    from shared.c2l.plots import image_grid, loss_curve
    from shared.c2l.sampling import sample_conditioned
    from shared.c2l.schedule import to_uint8
    from shared.store.format import PatchStore

    model_c = CentralDiffusion.from_pretrained(central)
    site = PatchStore(store)
    dp = (
        DPConfig(target_epsilon=dp_epsilon, target_delta=dp_delta, max_grad_norm=dp_max_grad_norm)
        if dp_epsilon
        else None
    )
    model, summary = run_adapt(
        model_c,
        site,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        dp=dp,
        cond_dropout=cond_dropout,
        device=device,
        timestep_power=timestep_power,
        lora_rank=lora_rank,
        attention_film=attention_film,
    )
    save_adapter(model, out, central_dir=str(central))
    loss_curve(summary["losses"], out / "loss.png", "adaptation" + (" (DP)" if dp else ""))
    pairs = PairedSpots(site, model_c.sample_size)
    idx = torch.arange(min(8, len(pairs)))
    real, expr, mask = pairs.batch(idx)
    synth = to_uint8(sample_conditioned(model, expr, mask, steps=25, guidance=guidance, seed=seed))
    image_grid(
        [("real spot patches", to_uint8(real)), (f"conditioned on their expression (g={guidance})", synth)],
        out / "samples.png",
        "adapted site model",
    )
    write_json_atomic(out / "summary.json", summary)
    eps = f", epsilon {summary['epsilon']:.3f} (delta {summary['delta']:.1e})" if dp else ""
    typer.echo(
        f"adapter -> {out} (trainable {summary['trainable_params']} params = "
        f"{100 * summary['trainable_fraction']:.2f}% of central{eps})"
    )


@app.command()
def synthesize(
    central: Path = typer.Option(..., "--central"),
    adapter: Path = typer.Option(..., "--adapter"),
    n: int = typer.Option(..., "--n", help="number of image-gene pairs"),
    out: Path = typer.Option(..., "--out", help="synthetic patch store to write"),
    store: Path | None = typer.Option(None, "--store", help="conditions' source (default: the adapter's store)"),
    sampler: str = typer.Option("dpm", help="dpm | ddim | ddpm"),
    steps: int | None = typer.Option(None, help="default: ddim 50, dpm 25, ddpm 1000"),
    guidance: float = typer.Option(1.5),
    seed: int = typer.Option(0),
    perturb: str = typer.Option("none", help="none | mixup | noise"),
    device: str | None = typer.Option(None),
) -> None:
    """Generate N synthetic image-gene pairs as a patch store flagged synthetic.

    Beside the store (which holds only the files its manifest checksums): OUT_samples.png (each conditioning
    spot's real patch above its synthetic image) and OUT_summary.json (count, time, images/s, provenance)."""
    import time

    import numpy as np

    from shared.c2l.central import CentralDiffusion
    from shared.c2l.modulation import load_adapter, load_adapter_config
    from shared.c2l.plots import image_grid
    from shared.c2l.synthesize import synthesize as run_synthesize
    from shared.errors import FedstError
    from shared.store.format import PatchStore

    model_c = CentralDiffusion.from_pretrained(central)
    source = store or load_adapter_config(adapter).get("store")
    if source is None:
        raise FedstError(f"{adapter}: adapter records no store; pass --store")
    site = PatchStore(source)
    model = load_adapter(model_c, adapter)
    start = time.perf_counter()
    result = run_synthesize(
        model_c,
        model,
        site,
        n,
        out,
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        seed=seed,
        perturb=perturb,
        device=device,
    )
    seconds = time.perf_counter() - start
    k = min(8, n)
    obs = result.spots.obs
    rows = site.spots.obs_names.get_indexer(obs["source_spot"].to_numpy()[:k])
    real = np.asarray(site.patches[site.spots.obs["patch_index"].to_numpy()[rows]])
    samples, summary_path = synthesis_outputs(out)
    image_grid(
        [("real patch of the conditioning spot", real), (f"synthetic ({perturb})", np.asarray(result.patches[:k]))],
        samples,
        "real vs synthetic, per condition",
    )
    summary = {
        "store": str(out),
        "n": n,
        "seconds": seconds,
        "images_per_s": n / seconds,
        "provenance": result.manifest["provenance"],
    }
    write_json_atomic(summary_path, summary)
    typer.echo(f"synthetic store -> {out} ({n} pairs, {n / seconds:.2f} images/s); {samples.name}, {summary_path.name}")


def synthesis_outputs(out: Path) -> tuple[Path, Path]:
    """Where `fedst c2l synthesize --out OUT` puts its sample grid and summary: beside the store, not in it."""
    return out.parent / f"{out.name}_samples.png", out.parent / f"{out.name}_summary.json"


def kid_line(kid: dict) -> str:
    """The audit's KID as printed: its value and subset spread on the x1 scale (no x1000 as some papers use),
    the feature space it is computed in, and the real-vs-real floor it should be read against."""
    return (
        f"KID {kid['value']:.3f} +- {kid['std']:.3f} (x1, colour/texture features standardised on the real set; "
        f"real-vs-real floor {kid['real_half_vs_half']:.3f})"
    )


@app.command()
def audit(
    central: Path = typer.Option(..., "--central"),
    adapter: Path = typer.Option(..., "--adapter"),
    real: Path = typer.Option(..., "--real", help="the real store the adapter was trained on"),
    synthetic: Path = typer.Option(..., "--synthetic"),
    out: Path = typer.Option(..., "--out", help="report directory"),
    baseline: bool = typer.Option(True, help="also score the unconditioned central model on the same conditions"),
    seed: int = typer.Option(0),
) -> None:
    """Conditional consistency, KID and memorisation of a synthetic store (no downloaded weights).

    Writes OUT/audit.json and OUT/samples.png (real, synthetic and, with the baseline, unconditioned patches)."""
    import shutil

    import numpy as np

    from shared.c2l.audit import audit as run_audit
    from shared.c2l.audit import conditional_consistency
    from shared.c2l.central import CentralDiffusion
    from shared.c2l.checkpoint import weights_hash
    from shared.c2l.modulation import create_conditioned, load_adapter
    from shared.c2l.plots import image_grid
    from shared.c2l.synthesize import synthesize as run_synthesize
    from shared.errors import FedstError
    from shared.store.format import PatchStore

    model_c = CentralDiffusion.from_pretrained(central)
    model = load_adapter(model_c, adapter)
    real_store, syn_store = PatchStore(real), PatchStore(synthetic)
    prov = syn_store.manifest.get("provenance", {})
    if prov.get("adapter_hash") not in (None, weights_hash(model.modulation.state_dict())):
        raise FedstError(f"{synthetic}: provenance adapter hash differs from {adapter}")
    out.mkdir(parents=True, exist_ok=True)
    report = run_audit(real_store, syn_store, seed=seed)
    rows = [("real", np.asarray(real_store.patches[:8])), ("synthetic", np.asarray(syn_store.patches[:8]))]
    if baseline:
        tmp = out / "unconditioned_store"
        base = run_synthesize(
            model_c,
            create_conditioned(model_c, real_store.panel),
            real_store,
            syn_store.n_spots,
            tmp,
            sampler=prov.get("sampler", "ddim"),
            steps=prov.get("steps"),
            guidance=1.0,
            seed=prov.get("seed", seed),
            perturb=prov.get("perturb", "none"),
        )
        report["unconditioned_baseline"] = conditional_consistency(real_store, base, syn_store.patch_px, seed)
        rows.append(("unconditioned central", np.array(base.patches[:8])))  # a copy: its store is removed next
        shutil.rmtree(tmp, ignore_errors=True)
    image_grid(rows, out / "samples.png", "audit")
    write_json_atomic(out / "audit.json", report)
    cc = report["conditional_consistency"]
    line = f"conditional consistency PCC {cc['pcc_mean']:.3f} (real hold-out {cc['real_holdout_pcc_mean']:.3f}"
    if baseline:
        line += f", unconditioned {report['unconditioned_baseline']['pcc_mean']:.3f}"
    typer.echo(
        line + f"); {kid_line(report['kid'])}; near-copies {report['memorisation']['near_copies']}"
        f" -> {out / 'audit.json'}"
    )


def register(root: typer.Typer) -> None:
    """Add `fedst c2l ...` to the top-level app."""
    root.add_typer(app, name="c2l")
