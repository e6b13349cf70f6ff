"""The server's run report (server/report.py): summary.md leads with the real-only vs real+synthetic table, its
HTML twin embeds the plots and escapes what sites sent, and the plots are legible at a normal size."""

from __future__ import annotations

import re
from pathlib import Path

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
