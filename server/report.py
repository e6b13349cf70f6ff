"""The server's run report: results.json, plots and summary.md in the run directory.

Everything here reads the typed run record (server/results.py). The server only ever sees per-site scalar
metrics; images appear only in a site's own report (client/report.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from server.headline import headline, headline_markdown, write_headline
from server.results import RunRecord, save_results
from shared.io import write_text_atomic


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(results: RunRecord, out: Path) -> Path | None:
    """Loss per round per site, one panel per trained phase."""
    phases = [p for p in ("pretrain", "adapt") if p in results.phases and results.phases[p].kind == "train"]
    phases = [p for p in phases if results.phases[p].rounds]
    if not phases:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        per_site: dict[str, list[tuple[int, float]]] = {}
        for row in results.phases[phase].rounds:
            for site, metrics in row.sites.items():
                if "loss" in metrics:
                    per_site.setdefault(site, []).append((row.round, metrics["loss"]))
        for site, points in sorted(per_site.items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=site)
        ax.set(title=f"{phase}: local loss per round", xlabel="round", ylabel="loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "loss_per_round.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_downstream(results: RunRecord, out: Path) -> Path | None:
    """Downstream metrics per site: real-only vs real+synthetic."""
    block = results.phases.get("downstream")
    sites = block.last.sites if block is not None and block.last is not None else {}
    metrics = [k for k in _keys(sites) if k != "num-examples" and ("pcc" in k or "ssc" in k or "gsc" in k)]
    if not sites or not metrics:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(metrics) * len(sites)), 3.5))
    names = sorted(sites)
    width = 0.8 / len(names)
    for i, site in enumerate(names):
        ax.bar(np.arange(len(metrics)) + i * width, [sites[site].get(m, np.nan) for m in metrics], width, label=site)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics, rotation=30, ha="right", fontsize=8)
    ax.set(title="downstream metrics per site (held-out sections)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "downstream_per_site.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_markdown(results: RunRecord) -> str:
    lines = [f"# fedst run `{results.run}`", "", f"status: **{results.status}**", ""]
    if (found := headline(results)) is not None:
        lines += headline_markdown(found) + [""]
    cfg = results.config
    lines += [
        f"backend `{cfg.get('backend')}`, preset `{cfg.get('preset')}`, strategy `{cfg.get('aggregation.strategy')}`, "
        f"patch {cfg.get('patch-px')} px, seed {cfg.get('seed')}",
        "",
    ]
    if results.sites:
        lines += ["sites (declared names): " + ", ".join(f"`{name}`" for name in sorted(results.sites)), ""]
    for phase, block in results.phases.items():
        secure = f" (secure aggregation: {block.secure_aggregation})" if block.secure_aggregation else ""
        lines.append(f"## {phase}{secure}")
        if block.kind == "train":
            for row in block.rounds:
                agg = ", ".join(f"{k}={v:.4g}" for k, v in row.aggregate.items())
                lines.append(f"- round {row.round}: {len(row.sites)} sites accepted; {agg}")
                for site, why in row.excluded().items():
                    lines.append(f"  - {site} excluded: {why}")
        elif (row := block.last) is not None:
            keys = _keys(row.sites)
            if row.sites:
                lines += ["", "| site | " + " | ".join(keys) + " |", "|---" * (1 + len(keys)) + "|"]
                for site, metrics in sorted(row.sites.items()):
                    lines.append(f"| {site} | " + " | ".join(_fmt(metrics.get(k)) for k in keys) + " |")
                if row.aggregate:
                    lines.append("| weighted | " + " | ".join(_fmt(row.aggregate.get(k)) for k in keys) + " |")
            for site, why in row.excluded().items():
                lines.append(f"- {site} failed: {why}")
        lines.append("")
    if results.plots:
        lines += ["## plots", *[f"![{Path(p).stem}]({Path(p).name})" for p in results.plots], ""]
    lines.append("Privacy numbers (epsilon) are per site; a mean across sites is not a privacy statement.")
    return "\n".join(lines) + "\n"


HEADLINE = ("pcc", "mse", "ssc", "gsc", "epsilon", "synthetic-pairs", "num-examples", "loss")


def _keys(sites: dict[str, dict[str, float]]) -> list[str]:
    """The headline columns (PCC, MSE, SSC, GSC, epsilon, ...); everything else is in results.json."""
    keys = sorted({k for m in sites.values() for k in m})
    return [k for k in keys if "per_gene" not in k and any(h in k for h in HEADLINE)]


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4g}"


def write_run_report(run_dir: Path, results: RunRecord) -> RunRecord:
    """Write results.json, the plots and summary.md into ``run_dir``; returns the results with plot paths."""
    run_dir.mkdir(parents=True, exist_ok=True)
    plots = [p for p in (plot_losses(results, run_dir), plot_downstream(results, run_dir)) if p is not None]
    results.plots = [str(p) for p in plots]
    save_results(run_dir, results)
    write_headline(run_dir, results)
    write_text_atomic(run_dir / "summary.md", summary_markdown(results))
    return results
