"""The default main job's backend (c2l) for real, at a tiny budget: `fedst demo`'s code path (server.demo.run_demo:
a private SuperLink with the simulation runtime, 2 SuperNodes) drives every phase of the C2L-ST workflow on the
generated consortium; the budget is shrunk only through run-config overrides, exactly as `fedst demo -c` does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.demo import run_demo

pytestmark = pytest.mark.slow
PHASES = ["pretrain", "adapt", "synthesize", "downstream"]
TINY_BUDGET = {
    "backend": "c2l",
    "rounds-pretrain": 1,
    "local-steps": 2,
    "adapt-steps": 2,
    "batch-size": 4,
    "synthetic-count": 4,
    "sample-steps": 2,
}


@pytest.mark.timeout(300)
def test_c2l_backend_runs_every_phase_through_a_flower_simulation(tmp_path: Path):
    lines: list[str] = []
    run_dir = run_demo(tmp_path / "demo", sites=2, overrides=TINY_BUDGET, timeout=240, echo=lines.append)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed", lines
    assert {k: results["config"][k] for k in TINY_BUDGET} == TINY_BUDGET
    assert list(results["phases"]) == PHASES
    phases = results["phases"]
    (round_1,) = phases["pretrain"]["rounds"]
    per_site = {"pretrain": round_1["sites"], **{phase: phases[phase]["sites"] for phase in PHASES[1:]}}
    failed = {"pretrain": round_1["failed"], **{phase: phases[phase]["failed"] for phase in PHASES[1:]}}
    assert failed == {phase: {} for phase in PHASES} and round_1["rejected"] == {}
    for phase in PHASES:
        assert sorted(per_site[phase]) == ["site-0", "site-1"], phase
    for site in ("site-0", "site-1"):
        assert np.isfinite(per_site["pretrain"][site]["loss"]) and per_site["pretrain"][site]["num-examples"] > 0
        assert np.isfinite(per_site["adapt"][site]["loss"]) and 0 < per_site["adapt"][site]["trainable-fraction"] < 1
        assert per_site["synthesize"][site]["synthetic-pairs"] == TINY_BUDGET["synthetic-count"]
        downstream = per_site["downstream"][site]
        assert downstream["real-n_genes"] == downstream["augmented-n_genes"] == 48  # the generated panel
        assert downstream["real-n_spots"] == downstream["augmented-n_spots"] == downstream["num-examples"] > 0
        for arm in ("real", "augmented"):  # the predictor trained on real, and on real + synthetic pairs
            assert -1 <= downstream[f"{arm}-pcc_pooled"] <= 1 and np.isfinite(downstream[f"{arm}-mse"])
    assert (run_dir / "summary.md").is_file()
    sites_root = Path(results["config"]["sites-root"])
    assert sorted(p.relative_to(sites_root).as_posix() for p in sites_root.glob("*/report/report.md")) == [
        "site-0/report/report.md",
        "site-1/report/report.md",
    ]
    assert any(line.strip() == "status: completed" for line in lines)
