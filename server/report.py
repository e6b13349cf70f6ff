"""The server's run report: results.json, plots, summary.md and its HTML twin summary.html in the run directory.

Everything here reads the typed run record (server/results.py). The server only ever sees per-site scalar
metrics; images appear only in a site's own report (client/report.py). The report leads with the answer: the
per-site real-only vs real+synthetic table (PCC, SSC, GSC, their differences, a verdict, the site's epsilon),
then the phase timings, then each phase in detail. Markdown and HTML are rendered from one sequence of blocks
(`_Doc`), so the two never disagree; every value in the HTML is escaped, since site names and metric names come
from remote sites.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from server.headline import HELPS_BY, effect, headline, write_headline
from server.results import RunRecord, save_results
from server.rounds import PER_SITE_ONLY
from shared.contract import LOSS_CURVE_KEYS
from shared.io import write_text_atomic

SCORES = {"pcc": "PCC", "ssc": "SSC", "gsc": "GSC"}
"""The held-out scores the lead table and plot compare (real-only vs real+synthetic), in this order."""
SCORE_KEYS = {"pcc": ("pcc_per_slide_mean", "pcc"), "ssc": ("ssc",), "gsc": ("gsc",)}
"""Metric names per score: c2l's name first, then the toy backend's."""
SCORE_ARMS = ("real", "augmented")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _score(metrics: dict[str, float], arm: str, score: str) -> float | None:
    for key in SCORE_KEYS[score]:
        if f"{arm}-{key}" in metrics:
            return float(metrics[f"{arm}-{key}"])
    return None


def _downstream(results: RunRecord) -> dict[str, dict[str, float]]:
    block = results.phases.get("downstream")
    return block.last.sites if block is not None and block.last is not None else {}


def _scores_present(sites: dict[str, dict[str, float]]) -> list[str]:
    return [s for s in SCORES if any(_score(m, arm, s) is not None for m in sites.values() for arm in SCORE_ARMS)]


# -- plots ------------------------------------------------------------------------------------------------------
def _loss_points(round_number: int, metrics: dict[str, float]) -> list[tuple[float, float]]:
    """(x, loss) of one site's round: the per-step curve (``loss-step-NN``: the mean over each tenth of the round's
    local steps, shared.contract.loss_curve) placed inside the round on the x axis, else the round's mean loss."""
    curve = [metrics[k] for k in LOSS_CURVE_KEYS if k in metrics]
    if not curve:
        return [(float(round_number), metrics["loss"])] if "loss" in metrics else []
    return [(round_number - 1 + (i + 0.5) / len(curve), value) for i, value in enumerate(curve)]


def plot_losses(results: RunRecord, out: Path) -> Path | None:
    """Local loss per site along the steps of each trained phase, one panel per phase, integer round ticks at
    round ends. Only scalars cross the network, so a round's steps arrive as ten means (each tenth of the round);
    a site that sent none is drawn as one point per round."""
    phases = [p for p in ("pretrain", "adapt") if p in results.phases and results.phases[p].kind == "train"]
    phases = [p for p in phases if results.phases[p].rounds]
    if not phases:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(phases), figsize=(4.5 * len(phases), 3.5), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        per_site: dict[str, list[tuple[float, float]]] = {}
        for row in results.phases[phase].rounds:
            for site, metrics in row.sites.items():
                per_site.setdefault(site, []).extend(_loss_points(row.round, metrics))
        stepwise = any(
            k in m for row in results.phases[phase].rounds for m in row.sites.values() for k in LOSS_CURVE_KEYS
        )
        for site, points in sorted(per_site.items()):
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if not stepwise else ".", markersize=4, label=site)
        title = f"{phase}: local loss along the steps" if stepwise else f"{phase}: local loss per round"
        xlabel = "round (each point: mean over a tenth of the round's steps)" if stepwise else "round"
        ax.set(title=title, xlabel=xlabel, ylabel="loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if stepwise:
            ax.set_xlim(0, max(row.round for row in results.phases[phase].rounds))
        if per_site:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "loss_per_round.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_downstream(results: RunRecord, out: Path) -> Path | None:
    """Held-out PCC, SSC and GSC per site, one panel each: real-only next to real+synthetic, the difference above."""
    sites = _downstream(results)
    scores = _scores_present(sites)
    if not sites or not scores:
        return None
    found = headline(results)
    limited = found["limited_site"] if found is not None else None
    names = sorted(sites)
    plt = _plt()
    width_in = min(15.0, max(8.0, 0.8 * len(names) * len(scores)))  # under 1600 px at 100 dpi
    fig, axes = plt.subplots(1, len(scores), figsize=(width_in, 4), squeeze=False)
    x = np.arange(len(names))
    bar = 0.38
    labels = [f"{n}\n(data-limited)" if n == limited else n for n in names]
    for ax, score in zip(axes[0], scores):
        real = [_score(sites[n], "real", score) for n in names]
        augmented = [_score(sites[n], "augmented", score) for n in names]
        ax.bar(x - bar / 2, [np.nan if v is None else v for v in real], bar, label="real only", color="#9e9e9e")
        ax.bar(
            x + bar / 2, [np.nan if v is None else v for v in augmented], bar, label="real + synthetic", color="#1f77b4"
        )
        for i, (r, a) in enumerate(zip(real, augmented)):
            if r is not None and a is not None:
                ax.annotate(f"{a - r:+.3f}", (x[i], max(r, a, 0.0)), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(x, labels, fontsize=8, rotation=30 if len(names) > 4 else 0)
        ax.set_title(f"held-out {SCORES[score]}")
        ax.margins(y=0.18)
    axes[0][0].set_ylabel("held-out score (higher is better)")
    handles, legend = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, legend, loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path = out / "downstream_per_site.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- one document, two renderings ---------------------------------------------------------------------------------
class _Doc:
    """Blocks rendered at once as Markdown lines and as escaped HTML."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, level: int, text: str) -> None:
        self.md += ["#" * level + " " + _md(text), ""]
        self.html.append(f"<h{level}>{_html(text)}</h{level}>")

    def para(self, text: str, *, strong: bool = False) -> None:
        self.md += [f"**{_md(text)}**" if strong else _md(text), ""]
        body = f"<strong>{_html(text)}</strong>" if strong else _html(text)
        self.html.append(f"<p>{body}</p>")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        def md_row(cells: list[str]) -> str:
            return "| " + " | ".join(_md(c).replace("|", "\\|") for c in cells) + " |"

        self.md += [md_row(header), "|---" * len(header) + "|", *[md_row(r) for r in rows], ""]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def items(self, items: list[tuple[str, list[str]]]) -> None:
        """A list whose items may carry sub-items (a round and its excluded sites)."""
        html_items = []
        for text, subs in items:
            self.md += [f"- {_md(text)}", *[f"  - {_md(s)}" for s in subs]]
            inner = "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in subs) + "</ul>" if subs else ""
            html_items.append(f"<li>{html.escape(text)}{inner}</li>")
        self.md.append("")
        self.html.append("<ul>" + "".join(html_items) + "</ul>")

    def image(self, path: Path) -> None:
        """Markdown links the file next to summary.md; HTML embeds it, so summary.html is one self-contained file."""
        self.md += [f"![{_md(path.stem)}]({_md(path.name)})", ""]
        try:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
        except OSError:
            self.html.append(f"<p>(plot {html.escape(path.name)} is missing)</p>")
            return
        self.html.append(f'<p><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></p>')


def _code(value: Any) -> str:
    """A value shown as code (a backtick span in both renderings); a backtick inside it cannot end the span."""
    return "`" + str(value).replace("`", "'") + "`"


def _html(text: str) -> str:
    """Escaped text with its backtick spans as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _md(text: str) -> str:
    """Markdown renderers pass raw HTML through: a site named ``<script>`` must stay text in summary.md too."""
    return html.escape(text, quote=False)


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "" if value is None else format(value, spec)


def _lead(results: RunRecord, doc: _Doc) -> None:
    """The answer: the verdict, then real-only vs real+synthetic per site, the data-limited site first."""
    found = headline(results)
    if found is None:
        return
    sites = _downstream(results)
    scores = _scores_present(sites)
    with_audit = any(s["audit_real_pcc"] is not None for s in found["sites"].values())
    header = ["site", "labelled"]
    for score in scores:
        name = SCORES[score]
        header += [f"real-only {name}", f"real+synthetic {name}", f"{name} diff"]
        if score == "pcc" and with_audit:
            header.append("audit: real / synthetic probe PCC")
    header += ["verdict (PCC)", "epsilon"]
    order = [found["limited_site"]] + sorted(s for s in found["sites"] if s != found["limited_site"])
    rows = []
    for name in order:
        s, metrics = found["sites"][name], sites[name]
        spots = f" ({s['labelled_spots']} spots)" if s["labelled_spots"] is not None else ""
        row = [
            f"{name} (data-limited)" if name == found["limited_site"] else name,
            f"{s['labelled_fraction']:.0%}{spots}",
        ]
        for score in scores:
            real, augmented = _score(metrics, "real", score), _score(metrics, "augmented", score)
            diff = augmented - real if real is not None and augmented is not None else None
            row += [_fmt(real, ".3f"), _fmt(augmented, ".3f"), _fmt(diff, "+.3f")]
            if score == "pcc" and with_audit:
                passed = {True: " (passed)", False: " (failed)", None: ""}[s["audit_passed"]]
                row.append(
                    f"{s['audit_real_pcc']:.3f} / {s['audit_synthetic_pcc']:.3f}{passed}"
                    if s["audit_real_pcc"] is not None and s["audit_synthetic_pcc"] is not None
                    else ""
                )
        real, augmented = s["real_pcc"], s["augmented_pcc"]
        row.append(
            effect(augmented - real) if real is not None and augmented is not None else "no real+synthetic result"
        )
        row.append("DP off" if s["epsilon"] is None else format(s["epsilon"], ".3g"))
        rows.append(row)
    doc.para(found["verdict"], strong=True)
    doc.table(header, rows)
    doc.para(
        "Held-out sections; diff = real+synthetic minus real-only; the verdict reads the PCC diff "
        f"(under {HELPS_BY:g} either way is within the seed-to-seed spread); PCC is the per-slide mean. "
        "Epsilon is each site's cumulative DP spend in adaptation: a privacy number per site, never averaged."
    )


def _timings(results: RunRecord, doc: _Doc) -> None:
    rows = [
        [phase, block.kind, str(len(block.rounds)), f"{sum(r.wall_seconds for r in block.rounds):.1f}"]
        for phase, block in results.phases.items()
    ]
    if rows:
        doc.heading(2, "phase timings")
        doc.table(["phase", "kind", "rounds", "wall seconds (sum of rounds)"], rows)


def _collapse(keys: list[str], sites: dict[str, dict[str, float]]) -> tuple[list[str], dict[str, list[str]]]:
    """The columns to show and, per shown column, the columns equal to it at every site (one held-out slide makes
    pcc_pooled the per-slide mean; top-k over all genes makes pcc_top_k the same again). Only columns of one arm
    (``real-`` / ``augmented-``) merge: real-only equal to real+synthetic is a finding, not an alias."""
    shown: list[str] = []
    aliases: dict[str, list[str]] = {}
    for key in keys:
        column = [sites[s].get(key) for s in sorted(sites)]
        twin = next(
            (
                k
                for k in shown
                if k.split("-")[0] == key.split("-")[0]
                and all(
                    v is not None and w is not None and math.isclose(v, w, rel_tol=1e-9, abs_tol=1e-12)
                    for v, w in zip(column, [sites[s].get(k) for s in sorted(sites)])
                )
            ),
            None,
        )
        if twin is not None and sites:
            aliases.setdefault(twin, []).append(key)
        else:
            shown.append(key)
    return shown, aliases


def _phase(phase: str, results: RunRecord, doc: _Doc) -> None:
    block = results.phases[phase]
    secure = f" (secure aggregation: {block.secure_aggregation})" if block.secure_aggregation else ""
    doc.heading(2, f"{phase}{secure}")
    if block.kind == "train":
        items = []
        for row in block.rounds:
            agg = ", ".join(
                f"{k}={v:.4g}"
                for k, v in row.aggregate.items()
                if k not in PER_SITE_ONLY and k not in LOSS_CURVE_KEYS  # the curve is in the loss plot
            )
            spent = ", ".join(f"{s} {m['epsilon']:.3g}" for s, m in sorted(row.sites.items()) if "epsilon" in m)
            text = f"round {row.round}: {len(row.sites)} sites accepted; {agg}" + (
                f"; epsilon per site: {spent}" if spent else ""
            )
            items.append((text, [f"{site} excluded: {why}" for site, why in row.excluded().items()]))
        if items:
            doc.items(items)
        return
    row = block.last
    if row is None:
        return
    if row.sites:
        keys, aliases = _collapse(_keys(row.sites), row.sites)
        rows = [[site, *[_fmt(metrics.get(k)) for k in keys]] for site, metrics in sorted(row.sites.items())]
        aggregate = {k: v for k, v in row.aggregate.items() if k not in PER_SITE_ONLY}
        if aggregate:
            rows.append(["weighted", *[_fmt(aggregate.get(k)) for k in keys]])
        doc.table(["site", *keys], rows)
        if aliases:
            doc.para(
                "Equal at every site, shown once: "
                + "; ".join(f"{k} (also {', '.join(v)})" for k, v in aliases.items())
                + "."
            )
    failed = [(f"{site} failed: {why}", []) for site, why in row.excluded().items()]
    if failed:
        doc.items(failed)


def _document(results: RunRecord) -> _Doc:
    doc = _Doc()
    doc.heading(1, f"fedst run {_code(results.run)}")
    doc.para(f"status: {results.status}" + (f" ({results.error})" if results.error else ""))
    _lead(results, doc)
    _timings(results, doc)
    cfg = results.config
    doc.heading(2, "run")
    doc.para(
        f"backend {_code(cfg.get('backend'))}, preset {_code(cfg.get('preset'))}, "
        f"strategy {_code(cfg.get('aggregation.strategy'))}, "
        f"patch {cfg.get('patch-px')} px, seed {cfg.get('seed')}, "
        f"downstream predictor {_code(cfg.get('predictor'))} on {_code(cfg.get('predictor-encoder'))} features"
    )
    if results.sites:
        doc.para("sites (declared names): " + ", ".join(_code(name) for name in sorted(results.sites)))
    for phase in results.phases:
        _phase(phase, results, doc)
    if results.plots:
        doc.heading(2, "plots")
        for plot in results.plots:
            doc.image(Path(plot))
    doc.para("Privacy numbers (epsilon) are per site; a mean across sites is not a privacy statement.")
    return doc


def summary_markdown(results: RunRecord) -> str:
    return "\n".join(_document(results).md).rstrip("\n") + "\n"


_STYLE = (
    "body{font-family:sans-serif;max-width:75em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:0.5em 0}th,td{border:1px solid #bbb;padding:0.2em 0.5em;text-align:left}"
    "th{background:#eee}img{max-width:100%}"
)


def summary_html(results: RunRecord) -> str:
    """summary.md as one self-contained HTML file: the plots inline (base64), every value escaped."""
    body = "\n".join(_document(results).html)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>fedst run {html.escape(results.run)}'
        f"</title><style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


HEADLINE = ("pcc", "mse", "ssc", "gsc", "epsilon", "synthetic-pairs", "num-examples", "loss")


def _keys(sites: dict[str, dict[str, float]]) -> list[str]:
    """The headline columns (PCC, MSE, SSC, GSC, epsilon, ...); everything else is in results.json."""
    keys = sorted({k for m in sites.values() for k in m})
    return [k for k in keys if "per_gene" not in k and any(h in k for h in HEADLINE)]


def write_run_report(run_dir: Path, results: RunRecord) -> RunRecord:
    """Write results.json, the plots, summary.md and summary.html into ``run_dir``; returns the results with plot
    paths."""
    run_dir.mkdir(parents=True, exist_ok=True)
    plots = [p for p in (plot_losses(results, run_dir), plot_downstream(results, run_dir)) if p is not None]
    results.plots = [str(p) for p in plots]
    save_results(run_dir, results)
    write_headline(run_dir, results)
    write_text_atomic(run_dir / "summary.md", summary_markdown(results))
    write_text_atomic(run_dir / "summary.html", summary_html(results))
    return results
