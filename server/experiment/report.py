"""Aggregate finished cells into ``results.json``, ``report.md`` and PNG figures.

Spread is the sample standard deviation over seeds (ddof=1; 0 with one seed). The "overall" rows average
the sites first (within a seed), then take mean and sd over seeds, so every seed weighs the same.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from server.experiment.config import FEDERATED_ARMS, ExperimentConfig, adapt_steps_per_round
from server.experiment.planner import Cell
from shared.c2l.audit import AUDIT_PASS_RATIO
from shared.io import write_json_atomic

METRICS = ("PCC", "MSE", "GSC", "SSC")
HIGHER_IS_BETTER = {"PCC": True, "MSE": False, "GSC": True, "SSC": True}
REPORT_DIR = "report"
EXTRAS = ("epsilon", "audit_real_pcc", "audit_synthetic_pcc", "audit_passed")
"""Per-site numbers of federated cells aggregated like the metrics (audit_passed: mean = share of seeds)."""
VARIANT_ORDER = ("local", "federated", "federated+dp", "federated-adapt", "federated-adapt+dp", "pooled")
MARKERS = {"local": "o", "federated": "^", "federated+dp": "v", "federated-adapt": "s", "federated-adapt+dp": "D"}
"""Marker per arm in the line plots (the two federated arms often score alike: their points must stay apart)."""


def protocol(config: ExperimentConfig) -> dict[str, str]:
    """The evaluation protocol, stated in results.json and report.md."""
    p = config.predictor
    return {
        "splits": "each site is evaluated on its own held-out sections (whole sections, never seen in training, "
        "adaptation, synthesis or gene selection); real-spot fractions are nested random subsets of "
        "the site's training spots (the 10% subset lies inside the 25% one, ...), drawn per seed",
        "gene_selection": f"top {p.top_k} genes per site chosen on that site's training sections only "
        "(highly variable genes of the normalised expression); the same genes for every arm, "
        "DP variant and fraction of the site",
        "normalisation": "library size to 1e4 counts per spot, then log1p (the store's X); predictors are "
        "trained and evaluated on this scale",
        "PCC": "Pearson correlation per gene across the spots of one held-out slide, averaged over genes, "
        "then averaged over the site's held-out slides (zero-variance genes are handled by "
        "shared.downstream.metrics' stated rule)",
        "MSE": "mean squared error on the normalised scale, per slide then averaged",
        "GSC": "Pearson correlation of the upper triangles of the gene-gene correlation matrices of "
        "prediction and truth, per held-out slide, averaged over slides",
        "SSC": "Pearson correlation across genes of Moran's I of prediction and of truth (one fixed 6-NN "
        "row-standardised spatial weight matrix per slide), averaged over slides",
        "metric_code": "shared.downstream.metrics.evaluate_predictions (PCC = pcc_per_slide_mean)",
        "arms": "local = the site's own real spots at the fraction; federated = Flower-pretrained central "
        "diffusion model (once per seed, on every site's unlabeled training tiles), local "
        "gene-conditioned adaptation on the fraction's spots (with/without DP-SGD), synthetic "
        "image-gene pairs added to the fraction's real spots; federated-adapt = the same central model, the "
        f"gene-conditioned modulation adapted through Flower ({config.run.adapt.rounds} FedAvg rounds x "
        f"{adapt_steps_per_round(config.run.adapt.steps, config.run.adapt.rounds)} local steps on every site's "
        f"fraction spots, which never leave their site, vs {config.run.adapt.steps} local steps in federated; with "
        "DP-SGD, the noise calibrated so that all rounds together spend the epsilon), then synthesis and "
        "real+synthetic as in federated; pooled = every site's real spots at the "
        "fraction in one place (an upper bound no consortium may build)",
        "predictor": f"{p.kind} on {p.encoder} features, identical settings in every arm",
    }


def _stats(values: list[float]) -> dict[str, Any]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "sd": sd, "n": int(arr.size)}


def _frac_key(fraction: float) -> str:
    return f"{fraction:g}"


def aggregate(config: ExperimentConfig, cells: list[Cell], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results.json payload (site -> arm -> dp -> fraction -> metric -> mean/sd/per_seed)."""
    by_site: dict[str, Any] = {}
    overall: dict[str, Any] = {}
    epsilon: dict[str, Any] = {}
    groups: dict[tuple[str, bool, float], list[Cell]] = {}
    for cell in cells:
        if cell.key in results:
            groups.setdefault((cell.arm, cell.dp, cell.fraction), []).append(cell)
    for (arm, dp, fraction), group in sorted(groups.items()):
        dp_key = "dp" if dp else "no-dp"
        fk = _frac_key(fraction)
        site_names = sorted({s for c in group for s in results[c.key].get("sites", {})})
        seed_means: dict[str, dict[int, list[float]]] = {m: {} for m in METRICS}
        for site in site_names:
            entry: dict[str, Any] = {}
            for metric in METRICS:
                per_seed = {}
                for c in group:
                    value = results[c.key]["sites"].get(site, {}).get(metric)
                    if value is not None:
                        per_seed[str(c.seed)] = float(value)
                        seed_means[metric].setdefault(c.seed, []).append(float(value))
                entry[metric] = {**_stats(list(per_seed.values())), "per_seed": per_seed}
            for extra in EXTRAS:
                values = {str(c.seed): results[c.key]["sites"].get(site, {}).get(extra) for c in group}
                values = {k: float(v) for k, v in values.items() if v is not None}
                if values:
                    entry[extra] = {**_stats(list(values.values())), "per_seed": values}
            if "epsilon" in entry:
                epsilon.setdefault(site, {}).setdefault(group[0].variant, {})[fk] = entry["epsilon"]
            by_site.setdefault(site, {}).setdefault(arm, {}).setdefault(dp_key, {})[fk] = entry
        variant = group[0].variant
        overall.setdefault(variant, {})[fk] = {
            m: {
                **_stats([float(np.mean(v)) for v in seed_means[m].values()]),
                "per_seed": {str(s): float(np.mean(v)) for s, v in seed_means[m].items()},
            }
            for m in METRICS
        }
    return {
        "experiment": config.name,
        "fingerprint": config.fingerprint(),
        "protocol": protocol(config),
        "metrics": list(METRICS),
        "cells_finished": sum(1 for c in cells if c.key in results),
        "cells_total": len(cells),
        "complete": all(c.key in results for c in cells),
        "sites": by_site,
        "overall": overall,
        "epsilon": epsilon,
        "runtime_s": round(sum(r.get("elapsed_s", 0.0) for r in results.values()), 1),
        "config": config.to_dict(),
    }


def write_report(
    config: ExperimentConfig,
    out: Path,
    cells: list[Cell],
    results: dict[str, dict[str, Any]],
    *,
    context: Any = None,
    log: Callable[[str], None] = print,
    figures: bool = True,
) -> Path:
    """Write results.json, the PNG figures (unless ``figures`` is False) and report.md; return the report path."""
    payload = aggregate(config, cells, results)
    extra = context.report_extras() if context is not None and hasattr(context, "report_extras") else {}
    payload.update(extra)
    write_json_atomic(out / "results.json", payload, sort_keys=True)
    figdir = out / REPORT_DIR
    figdir.mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []
    if figures:
        pngs += plot_headline(payload, figdir)
        pngs += plot_per_site(payload, figdir)
        pngs += plot_heatmaps(config, out, cells, results, figdir)
        pngs += plot_patch_grids(config, out, cells, results, figdir)
        pngs += plot_epsilon(payload, figdir)
    report = out / "report.md"
    report.write_text(render_markdown(config, payload, [f.relative_to(out) for f in pngs]))
    log(f"wrote {out / 'results.json'}, {report} and {len(pngs)} figures in {figdir}")
    return report


# -------------------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _variant_order(variants: list[str]) -> list[str]:
    order = list(VARIANT_ORDER)
    return sorted(variants, key=lambda v: order.index(v) if v in order else len(order))


def _draw_lines(ax, series: dict[str, dict[str, Any]], metric: str) -> None:
    for variant in _variant_order(list(series)):
        fracs = sorted(series[variant], key=float)
        xs, ys, es = [], [], []
        for fk in fracs:
            stat = series[variant][fk][metric]
            if stat["mean"] is None:
                continue
            xs.append(float(fk))
            ys.append(stat["mean"])
            es.append(stat["sd"] or 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker=MARKERS.get(variant, "*"), capsize=3, label=variant, alpha=0.85)
    ax.set_xscale("log")
    ax.set_xlabel("real-spot fraction")
    ax.set_title(f"{metric} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)")
    ax.grid(alpha=0.3)


def plot_headline(payload: dict[str, Any], figdir: Path) -> list[Path]:
    """Metric vs real-spot fraction per arm, sites averaged, error bars = sd over seeds."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, metric in zip(axes, METRICS):
        _draw_lines(ax, payload["overall"], metric)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{payload['experiment']}: held-out metrics vs real-spot fraction (mean over sites)")
    fig.tight_layout()
    path = figdir / "metrics_vs_fraction.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_per_site(payload: dict[str, Any], figdir: Path) -> list[Path]:
    plt = _plt()
    sites = sorted(payload["sites"])
    if not sites:
        return []
    fig, axes = plt.subplots(len(sites), len(METRICS), figsize=(4.2 * len(METRICS), 3.2 * len(sites)), squeeze=False)
    for row, site in enumerate(sites):
        series: dict[str, dict[str, Any]] = {}
        for arm, by_dp in payload["sites"][site].items():
            for dp_key, by_frac in by_dp.items():
                series[f"{arm}+dp" if dp_key == "dp" else arm] = by_frac
        for col, metric in enumerate(METRICS):
            _draw_lines(axes[row][col], series, metric)
            axes[row][col].set_title(f"{site}: {metric}")
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    path = figdir / "metrics_vs_fraction_per_site.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _artifact(out: Path, results: dict[str, Any], cell: Cell, site: str, name: str) -> Path | None:
    record = results.get(cell.key)
    if record is None:
        return None
    rel = record.get("artifacts", {}).get(site, {}).get(name)
    if not rel:
        return None
    path = out / rel
    return path if path.is_file() else None


def _pick(cells: list[Cell], results: dict[str, Any], arm: str, dp: bool | None = None) -> Cell | None:
    """The cell shown in example figures: smallest fraction, first seed (where augmentation matters most)."""
    chosen = [c for c in cells if c.arm == arm and c.key in results and (dp is None or c.dp == dp)]
    return min(chosen, key=lambda c: (c.fraction, c.seed, c.dp)) if chosen else None


def _examples(cells: list[Cell], results: dict[str, Any], arms: tuple[str, ...]) -> list[Cell]:
    """One example cell per arm (without DP where there is one), all at the fraction and seed of the first."""
    picked = [_pick(cells, results, arm, dp=False) or _pick(cells, results, arm) for arm in arms]
    found = [c for c in picked if c is not None]
    if not found:
        return []
    return [c for c in found if (c.fraction, c.seed) == (found[0].fraction, found[0].seed)]


def plot_heatmaps(
    config: ExperimentConfig, out: Path, cells: list[Cell], results: dict[str, Any], figdir: Path
) -> list[Path]:
    """Truth vs local vs the federated arms on one held-out section, for the first genes of the site's top-k."""
    plt = _plt()
    paths = []
    examples = _examples(cells, results, ("local", *FEDERATED_ARMS))
    sites = sorted({s for r in results.values() for s in r.get("artifacts", {})})
    for site in sites:
        columns: list[tuple[str, Path]] = []
        for cell in examples:
            path = _artifact(out, results, cell, site, "predictions")
            if path is not None:
                columns.append((f"{cell.variant} (fraction {cell.fraction:g})", path))
        if not columns:
            continue
        first = np.load(columns[0][1], allow_pickle=False)
        genes = [str(g) for g in first["genes"]][: config.report.heatmap_genes]
        coords = first["coords"]
        panels = [("truth", first["truth"])] + [(label, np.load(p, allow_pickle=False)["pred"]) for label, p in columns]
        fig, axes = plt.subplots(len(genes), len(panels), figsize=(3.2 * len(panels), 3.0 * len(genes)), squeeze=False)
        for r, gene in enumerate(genes):
            vmin, vmax = float(first["truth"][:, r].min()), float(first["truth"][:, r].max())
            for c, (label, matrix) in enumerate(panels):
                ax = axes[r][c]
                sc = ax.scatter(coords[:, 0], coords[:, 1], c=matrix[:, r], s=12, cmap="viridis", vmin=vmin, vmax=vmax)
                ax.invert_yaxis()
                ax.set_aspect("equal")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{gene}: {label}", fontsize=8)
            fig.colorbar(sc, ax=axes[r][-1], fraction=0.046)
        fig.suptitle(f"{site}, held-out section {str(first['section'])}")
        fig.tight_layout()
        path = figdir / f"heatmaps_{site}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_patch_grids(
    config: ExperimentConfig, out: Path, cells: list[Cell], results: dict[str, Any], figdir: Path
) -> list[Path]:
    """Real training patches (top row) above the synthetic ones of each federated arm (one row per arm, the same
    fraction and seed, so the real spots they were conditioned on are the same)."""
    from shared.c2l.plots import image_grid

    paths = []
    examples = _examples(cells, results, FEDERATED_ARMS)
    if not examples:
        return []
    sites = sorted({s for c in examples for s in results[c.key].get("artifacts", {})})
    for site in sites:
        rows: list[tuple[str, np.ndarray]] = []
        for cell in examples:
            path = _artifact(out, results, cell, site, "patches")
            if path is None:
                continue
            data = np.load(path, allow_pickle=False)
            if not rows:
                rows.append(("real", data["real"]))
            rows.append((f"synthetic: {cell.variant}", data["synthetic"]))
        n = min([config.report.grid_patches] + [len(images) for _, images in rows])
        if len(rows) < 2 or n == 0:
            continue
        cell = examples[0]
        out_path = image_grid(
            [(label, images[:n]) for label, images in rows],
            figdir / f"patches_{site}.png",
            f"{site}: real vs synthetic patches (fraction {cell.fraction:g}, seed {cell.seed})",
        )
        paths.append(out_path)
    return paths


def plot_epsilon(payload: dict[str, Any], figdir: Path) -> list[Path]:
    """Epsilon actually spent per site (mean over seeds) at each fraction, one panel per DP variant."""
    eps = payload.get("epsilon", {})
    if not eps:
        return []
    plt = _plt()
    sites = sorted(eps)
    variants = _variant_order(sorted({v for s in sites for v in eps[s]}))
    fig, axes = plt.subplots(
        1, len(variants), figsize=((1.6 + 1.4 * len(sites)) * len(variants), 3.6), squeeze=False, sharey=True
    )
    for ax, variant in zip(axes[0], variants):
        fracs = sorted({fk for s in sites for fk in eps[s].get(variant, {})}, key=float)
        width = 0.8 / max(len(fracs), 1)
        for i, fk in enumerate(fracs):
            values = [eps[s].get(variant, {}).get(fk, {}).get("mean") or 0.0 for s in sites]
            ax.bar(np.arange(len(sites)) + i * width, values, width, label=f"fraction {fk}")
        ax.set_xticks(np.arange(len(sites)) + width * (len(fracs) - 1) / 2)
        ax.set_xticklabels(sites)
        ax.legend(fontsize=7)
        composed = variant.startswith("federated-adapt")
        ax.set_title(f"{variant}" + ("\n(all adapt rounds, composed)" if composed else ""), fontsize=9)
    axes[0][0].set_ylabel("epsilon spent (adaptation)")
    fig.suptitle("Per-site DP epsilon", fontsize=10)
    fig.tight_layout()
    path = figdir / "epsilon_per_site.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


# ------------------------------------------------------------------------------------------- markdown


def _fmt(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}" if stat.get("n", 1) > 1 else f"{stat['mean']:.3f}"


def render_markdown(config: ExperimentConfig, payload: dict[str, Any], figures: list[Path]) -> str:
    lines = [f"# Experiment `{config.name}`", ""]
    status = "complete" if payload["complete"] else "INCOMPLETE (resume to finish)"
    lines += [
        f"Cells finished: {payload['cells_finished']} / {payload['cells_total']} ({status}); "
        f"compute time of the cells: {payload['runtime_s']:.0f} s. Values are mean ± sd over seeds "
        f"{list(config.seeds)}.",
        "",
    ]
    lines += ["## Protocol", ""]
    for key, text in payload["protocol"].items():
        lines.append(f"- **{key}**: {text}")
    lines.append("")
    if payload.get("sites_detail"):
        lines += [
            "## Sites",
            "",
            "| site | training sections | held-out sections | training spots | genes evaluated |",
            "|---|---|---|---|---|",
        ]
        for site, info in payload["sites_detail"].items():
            lines.append(
                f"| {site} | {', '.join(info['train_sections'])} | {', '.join(info['held_out'])} | "
                f"{info.get('train_spots', '-')} | {info.get('n_genes', '-')} |"
            )
        lines.append("")
    fracs = sorted({fk for v in payload["overall"].values() for fk in v}, key=float)
    lines += ["## Headline (sites averaged)", ""]
    for metric in METRICS:
        lines += [
            f"**{metric}** ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)",
            "",
            "| arm | " + " | ".join(f"fraction {f}" for f in fracs) + " |",
            "|---|" + "---|" * len(fracs),
        ]
        for variant in _variant_order(list(payload["overall"])):
            row = [_fmt(payload["overall"][variant].get(f, {}).get(metric)) for f in fracs]
            lines.append(f"| {variant} | " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        "## Per site",
        "",
        "epsilon: what the site's DP accountant reported for its adaptation; for federated-adapt+dp its privacy "
        "ledger after the last round (every round composed; the noise was calibrated for all of them).",
        "",
    ]
    for site in sorted(payload["sites"]):
        lines += [
            f"### {site}",
            "",
            "| arm | fraction | " + " | ".join(METRICS) + " | epsilon |",
            "|---|---|" + "---|" * (len(METRICS) + 1),
        ]
        series = {
            f"{arm}+dp" if dp_key == "dp" else arm: by_frac
            for arm, by_dp in payload["sites"][site].items()
            for dp_key, by_frac in by_dp.items()
        }
        for label in _variant_order(list(series)):
            for fk in sorted(series[label], key=float):
                entry = series[label][fk]
                row = [_fmt(entry[m]) for m in METRICS] + [_fmt(entry.get("epsilon"))]
                lines.append(f"| {label} | {fk} | " + " | ".join(row) + " |")
        lines.append("")
    lines += render_audit(payload)
    lines += ["## Figures", ""]
    for fig in figures:
        lines.append(f"![{fig.stem}]({fig.as_posix()})")
    lines.append("")
    return "\n".join(lines)


def load_results(out: Path) -> dict[str, Any]:
    return json.loads((Path(out) / "results.json").read_text())


def render_audit(payload: dict[str, Any]) -> list[str]:
    """Per site: did the synthetic pairs show their expression (audit), and did adding them beat local?"""
    rows = []
    for site in sorted(payload["sites"]):
        local = payload["sites"][site].get("local", {}).get("no-dp", {})
        arms = [
            (arm, dp_key, by_frac)
            for arm in FEDERATED_ARMS
            for dp_key, by_frac in sorted(payload["sites"][site].get(arm, {}).items())
        ]
        for arm, dp_key, by_frac in arms:
            variant = f"{arm}+dp" if dp_key == "dp" else arm
            for fk in sorted(by_frac, key=float):
                entry = by_frac[fk]
                if "audit_synthetic_pcc" not in entry:
                    continue
                passed = entry.get("audit_passed", {})
                share = "-" if passed.get("mean") is None else f"{round(passed['mean'] * passed['n'])}/{passed['n']}"
                fed, loc = entry["PCC"].get("mean"), local.get(fk, {}).get("PCC", {}).get("mean")
                delta = "-" if fed is None or loc is None else f"{fed - loc:+.3f}"
                rows.append(
                    f"| {site} | {variant} | {fk} | {_fmt(entry.get('audit_real_pcc'))} | "
                    f"{_fmt(entry['audit_synthetic_pcc'])} | {share} | {delta} |"
                )
    if not rows:
        return []
    return [
        "## Synthesis audit: why the federated arms do or do not beat local",
        "",
        "Conditional consistency (the probe of shared.c2l.audit) on each site's evaluated genes: a ridge probe on "
        "colour/texture features is fitted on the real spots the synthesis was conditioned on. *real probe PCC* is "
        "its PCC on held-out real spots (how much expression the image features carry at all), *synthetic probe "
        "PCC* the PCC between what it reads off the synthetic images and the expression they were generated for. "
        f"A cell passes when the synthetic PCC is at least {AUDIT_PASS_RATIO:g} x the real one (and the real one "
        "is positive). Synthetic pairs that fail cannot teach the predictor the image->expression map, so "
        "a federated arm can then at best match local. Delta PCC = that arm (federated: local adaptation; "
        "federated-adapt: adaptation averaged across sites through Flower) - local on the held-out sections.",
        "",
        "| site | arm | fraction | real probe PCC | synthetic probe PCC | passed (seeds) | delta PCC vs local |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
