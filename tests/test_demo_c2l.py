"""The default main job's backend (c2l) for real, at a tiny budget: `fedst demo`'s code path (server.demo.run_demo:
a private SuperLink with the simulation runtime, 2 SuperNodes) drives every phase of the C2L-ST workflow on the
generated consortium; the budget is shrunk only through run-config overrides, exactly as `flwr run -c` does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.demo import run_demo, simulation_resources
from server.results import load_results

pytestmark = pytest.mark.slow
PHASES = ["pretrain", "adapt", "synthesize", "downstream"]
TINY_BUDGET = {
    "backend": "c2l",
    "pretrain.rounds": 1,
    "pretrain.steps": 2,
    "adapt.steps": 2,
    "adapt.rounds": 1,  # the demo adapts federatedly; one round keeps one record per phase
    "pretrain.batch-size": 4,
    "adapt.batch-size": 4,
    "synthesize.count": 4,
    "synthesize.steps": 2,
}


@pytest.mark.timeout(300)
def test_c2l_backend_runs_every_phase_through_a_flower_simulation(tmp_path: Path):
    lines: list[str] = []
    run_dir = run_demo(tmp_path / "demo", sites=2, overrides=TINY_BUDGET, timeout=240, echo=lines.append)
    results = load_results(run_dir / "results.json")
    assert results.status == "completed", lines
    assert {k: results.config[k] for k in TINY_BUDGET} == TINY_BUDGET
    assert list(results.phases) == PHASES
    rounds = {phase: results.phases[phase].rounds for phase in PHASES}
    assert [len(rounds[phase]) for phase in PHASES] == [1, 1, 1, 1]
    for phase in PHASES:
        (row,) = rounds[phase]
        assert row.failed == {} and row.rejected == {}, phase
        assert sorted(row.sites) == ["site-0", "site-1"], phase
    per_site = {phase: rounds[phase][0].sites for phase in PHASES}
    for site in ("site-0", "site-1"):
        assert np.isfinite(per_site["pretrain"][site]["loss"]) and per_site["pretrain"][site]["num-examples"] > 0
        assert np.isfinite(per_site["adapt"][site]["loss"]) and 0 < per_site["adapt"][site]["trainable-fraction"] < 1
        assert per_site["synthesize"][site]["synthetic-pairs"] == TINY_BUDGET["synthesize.count"]
        downstream = per_site["downstream"][site]
        assert downstream["real-n_genes"] == downstream["augmented-n_genes"] == 48  # the generated panel
        assert downstream["real-n_spots"] == downstream["augmented-n_spots"] == downstream["num-examples"] > 0
        for arm in ("real", "augmented"):  # the predictor trained on real, and on real + synthetic pairs
            assert -1 <= downstream[f"{arm}-pcc_pooled"] <= 1 and np.isfinite(downstream[f"{arm}-mse"])
    assert (run_dir / "summary.md").is_file()
    sites_root = Path(results.config["paths.sites-root"])
    assert sorted(p.relative_to(sites_root).as_posix() for p in sites_root.glob("*/report/report.md")) == [
        "site-0/report/report.md",
        "site-1/report/report.md",
    ]
    assert any(line.strip() == "status: completed" for line in lines)


@pytest.mark.parametrize(
    ("sites", "cpus", "expected"),
    [
        (3, 2, "num_supernodes=3 client_resources_num_cpus=1 init_args_num_cpus=3"),  # no site waits for a core
        (2, 2, "num_supernodes=2 client_resources_num_cpus=1 init_args_num_cpus=2"),
        (3, 16, "num_supernodes=3 client_resources_num_cpus=5 init_args_num_cpus=16"),  # cores shared out
        (1, 1, "num_supernodes=1 client_resources_num_cpus=1 init_args_num_cpus=1"),
    ],
)
def test_every_simulated_site_runs_at_once_with_its_share_of_the_cores(sites: int, cpus: int, expected: str):
    assert simulation_resources(sites, cpus) == expected
