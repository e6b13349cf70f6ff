"""The server's run report (server/report.py): summary.md leads with the real-only vs real+synthetic table, its
HTML twin embeds the plots and escapes what sites sent, and the plots are legible at a normal size."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
PIL = pytest.importorskip("PIL.Image")

from server.report import summary_markdown, write_run_report  # noqa: E402
from server.results import PhaseRecord, RoundRecord, RunRecord  # noqa: E402

HOSTILE = "<script>alert(1)</script>"


def _arm(arm: str, pcc: float, ssc: float, gsc: float) -> dict[str, float]:
    # one held-out slide, top-k = all genes: the three PCCs coincide, as in a real c2l run
    return {
        f"{arm}-pcc_per_slide_mean": pcc,
        f"{arm}-pcc_pooled": pcc,
        f"{arm}-pcc_top_k": pcc,
        f"{arm}-ssc": ssc,
        f"{arm}-gsc": gsc,
        f"{arm}-mse": 1.0 - pcc,
    }


def realistic_run(run_dir: Path, third: str = "zurich") -> RunRecord:
    """3 sites, pretrain 2 rounds, federated adapt 3 rounds with DP, synthesis audit, downstream real/augmented."""
    names = ("basel", "geneva", third)
    pretrain = PhaseRecord(
        kind="train",
        rounds=[
            RoundRecord(
                round=r,
                sites={n: {"loss": (1.2 + i * 0.1) / r, "num-examples": 100.0 + 50 * i} for i, n in enumerate(names)},
                aggregate={"loss": 1.3 / r},
                wall_seconds=10.0 + r,
            )
            for r in (1, 2)
        ],
    )
    epsilon = {"basel": 2.5, "geneva": 7.5, third: 4.0}
    adapt = PhaseRecord(
        kind="train",
        rounds=[
            RoundRecord(
                round=r,
                sites={
                    n: {"loss": 0.9 - 0.1 * r + 0.05 * i, "epsilon": epsilon[n] * (r - 2) / 3, "num-examples": 60.0}
                    for i, n in enumerate(names)
                },
                aggregate={"loss": 0.9 - 0.1 * r, "epsilon": 4.67},  # Flower's default aggregation means epsilon
                wall_seconds=5.0,
            )
            for r in (3, 4, 5)
        ],
    )
    synthesize = PhaseRecord(
        kind="broadcast",
        rounds=[
            RoundRecord(
                round=1,
                sites={
                    n: {"synthetic-pairs": 64.0, "audit-real-pcc": 0.4, "audit-synthetic-pcc": 0.3, "audit-passed": 1.0}
                    for n in names
                },
                wall_seconds=30.0,
            )
        ],
    )
    scores = {
        "basel": {**_arm("real", 0.42, 0.30, 0.50), **_arm("augmented", 0.43, 0.31, 0.52)},
        "geneva": {**_arm("real", 0.20, 0.10, 0.25), **_arm("augmented", 0.26, 0.18, 0.24)},
        third: {**_arm("real", 0.35, 0.22, 0.40), **_arm("augmented", 0.31, 0.20, 0.41)},
    }
    fractions = {"basel": (1.0, 400), "geneva": (0.25, 48), third: (1.0, 300)}
    for n, (fraction, spots) in fractions.items():
        scores[n] |= {"labelled-fraction": fraction, "labelled-spots": float(spots), "num-examples": float(spots)}
    downstream = PhaseRecord(kind="broadcast", rounds=[RoundRecord(round=1, sites=scores, wall_seconds=8.0)])
    return RunRecord(
        run="42",
        status="completed",
        config={"backend": "c2l", "seed": 0},
        phases={"pretrain": pretrain, "adapt": adapt, "synthesize": synthesize, "downstream": downstream},
        sites={n: 100 + i for i, n in enumerate(names)},
        run_dir=str(run_dir),
    )


def _tables(text: str) -> list[list[list[str]]]:
    """Markdown tables as rows of cells (header first, separator dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip("|").split(" | ")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_summary_leads_with_real_vs_augmented_per_site_without_a_mean_epsilon(tmp_path):
    text = summary_markdown(realistic_run(tmp_path))
    first = _tables(text)[0]
    header, rows = first[0], {r[0]: dict(zip(first[0], r)) for r in first[1:]}
    assert header[:2] == ["site", "labelled"] and header[-2:] == ["verdict (PCC)", "epsilon"]
    for score in ("PCC", "SSC", "GSC"):
        assert {f"real-only {score}", f"real+synthetic {score}", f"{score} diff"} <= set(header)
    assert first[1][0] == "geneva (data-limited)"  # the site the product exists for comes first
    geneva = rows["geneva (data-limited)"]
    assert (geneva["PCC diff"], geneva["SSC diff"], geneva["GSC diff"]) == ("+0.060", "+0.080", "-0.010")
    assert geneva["verdict (PCC)"] == "the synthetic pairs help" and geneva["epsilon"] == "7.5"
    assert geneva["audit: real / synthetic probe PCC"] == "0.400 / 0.300 (passed)"
    assert rows["zurich"]["PCC diff"] == "-0.040" and rows["zurich"]["verdict (PCC)"] == "the synthetic pairs hurt"
    assert rows["basel"]["verdict (PCC)"].startswith("no clear effect") and rows["basel"]["epsilon"] == "2.5"
    # epsilon: per site only; the mean Flower put into the adapt aggregate is not shown anywhere
    assert "4.67" not in text and "epsilon=" not in text
    assert "epsilon per site: basel 2.5, geneva 7.5, zurich 4" in text
    # phase timings are the sums of the rounds' wall seconds
    timings = next(t for t in _tables(text) if t[0][0] == "phase")
    assert {r[0]: r[3] for r in timings[1:]} == {"pretrain": "23.0", "adapt": "15.0", "synthesize": "30.0",
                                                  "downstream": "8.0"}  # fmt: skip


def test_identical_columns_are_shown_once_with_their_aliases(tmp_path):
    text = summary_markdown(realistic_run(tmp_path))
    downstream = text.split("## downstream")[1]
    header = _tables(downstream)[0][0]
    assert "real-pcc_per_slide_mean" in header and "augmented-pcc_per_slide_mean" in header
    assert not any("pcc_pooled" in h or "pcc_top_k" in h for h in header)
    assert "real-mse" in header and "real-ssc" in header  # different values stay
    assert "real-pcc_per_slide_mean (also real-pcc_pooled, real-pcc_top_k)" in downstream


def test_html_twin_escapes_site_names_embeds_the_plots_and_has_the_same_numbers(tmp_path):
    results = write_run_report(tmp_path, realistic_run(tmp_path, third=HOSTILE))
    page = (tmp_path / "summary.html").read_text()
    assert HOSTILE not in page and html_escaped(HOSTILE) in page
    assert page.count("data:image/png;base64,") == 2 and 'src="loss' not in page  # no external assets
    markdown = (tmp_path / "summary.md").read_text()
    assert HOSTILE not in markdown and html_escaped(HOSTILE) in markdown  # renderers pass raw HTML through
    numbers = set(re.findall(r"[+-]?\d+\.\d{3}", markdown))
    assert numbers and numbers <= set(re.findall(r"[+-]?\d+\.\d{3}", page))
    assert [Path(p).name for p in results.plots] == ["loss_per_round.png", "downstream_per_site.png"]
    assert "sites (declared names): <code>&lt;script&gt;" in page  # code spans survive the escaping


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_plots_have_a_normal_size(tmp_path):
    results = write_run_report(tmp_path, realistic_run(tmp_path))
    for plot in results.plots:
        with PIL.open(plot) as image:
            width, height = image.size
        assert 400 <= width < 1600 and 250 <= height < 1000, (plot, image.size)


def test_loss_plot_draws_the_per_step_curve_sites_send_and_the_text_leaves_it_out(tmp_path, monkeypatch):
    from server import report
    from shared.contract import LOSS_CURVE_KEYS, loss_curve, metric_key_problems

    # a site's 250 adaptation steps become 10 declared scalars: the means of each tenth, in order
    losses = list(np.linspace(1.0, 0.1, 250))
    curve = loss_curve(losses)
    assert list(curve) == list(LOSS_CURVE_KEYS) and metric_key_problems("adapt", list(curve)) == []
    assert (
        curve["loss-step-01"] == pytest.approx(np.mean(losses[:25])) and curve["loss-step-10"] < curve["loss-step-01"]
    )
    assert list(loss_curve([0.5, float("nan"), 0.3])) == ["loss-step-01", "loss-step-03"]  # a NaN (DP skip) is left out
    assert loss_curve([]) == {}

    run = realistic_run(tmp_path)
    for row in run.phases["adapt"].rounds:
        for metrics in row.sites.values():
            metrics.update(loss_curve(list(np.linspace(metrics["loss"] + 0.2, metrics["loss"], 50))))
        row.aggregate.update(loss_curve(list(np.linspace(0.5, 0.3, 50))))
    drawn: dict[str, list] = {}
    real_plot = report._plt()

    class Recorder:
        def __getattr__(self, name):
            return getattr(real_plot, name)

        def subplots(self, *args, **kwargs):
            fig, axes = real_plot.subplots(*args, **kwargs)
            for ax in axes[0]:
                original = ax.plot

                def plot(xs, ys, *a, _ax=ax, _original=original, **kw):
                    drawn.setdefault(kw.get("label"), []).append((_ax, list(xs)))
                    return _original(xs, ys, *a, **kw)

                ax.plot = plot
            return fig, axes

    monkeypatch.setattr(report, "_plt", lambda: Recorder())
    results = write_run_report(tmp_path, run)
    assert (tmp_path / "loss_per_round.png").is_file()
    adapt_lines = [xs for site in ("basel", "geneva", "zurich") for ax, xs in drawn[site] if "adapt" in ax.get_title()]
    assert [len(xs) for xs in adapt_lines] == [30, 30, 30]  # 3 rounds x 10 points per site
    assert adapt_lines[0][0] == pytest.approx(2.05) and adapt_lines[0][-1] == pytest.approx(4.95)  # inside rounds 3-5
    pretrain_lines = [xs for ax, xs in drawn["basel"] if "pretrain" in ax.get_title()]
    assert pretrain_lines == [[1.0, 2.0]]  # no curve sent: one point per round, as before
    assert "loss-step" not in summary_markdown(results)  # the curve is in the plot, not in the round lines
