"""The data-limited site, end to end in miniature: its declaration (SITE.toml / node config ``labelled-fraction``),
what its task trains on, and the run's answer (server/headline.py: headline.json, summary.md's first lines)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.config import NodeConfig, RunConfig
from shared.errors import FedstError

pytest.importorskip("flwr")

from server.headline import headline, write_headline  # noqa: E402
from server.report import summary_markdown  # noqa: E402
from server.results import PhaseRecord, RoundRecord, RunRecord  # noqa: E402


def _run(downstream: dict, synthesize: dict, adapt: dict | None = None) -> RunRecord:
    return RunRecord(
        run="1",
        status="completed",
        config={},
        run_dir="/nowhere",
        phases={
            "adapt": PhaseRecord(kind="train", rounds=[RoundRecord(round=2, sites=adapt or {})]),
            "synthesize": PhaseRecord(kind="broadcast", rounds=[RoundRecord(round=1, sites=synthesize)]),
            "downstream": PhaseRecord(kind="broadcast", rounds=[RoundRecord(round=1, sites=downstream)]),
        },
    )


def _scores(fraction: float, spots: int, real: float, augmented: float) -> dict[str, float]:
    return {
        "labelled-fraction": fraction,
        "labelled-spots": float(spots),
        "real-pcc_per_slide_mean": real,
        "augmented-pcc_per_slide_mean": augmented,
    }


def test_headline_names_the_site_with_fewest_labelled_spots_and_says_what_the_synthetic_pairs_did(tmp_path):
    results = _run(
        {
            "basel": _scores(1.0, 190, 0.44, 0.43),
            "geneva": _scores(0.25, 48, 0.30, 0.34),
            "bern": _scores(1.0, 60, 0.40, 0.40),  # fewer spots than basel, but fully labelled: not the limited one
        },
        {
            "basel": {"audit-real-pcc": 0.5, "audit-synthetic-pcc": 0.3, "audit-passed": 1.0},
            "geneva": {"audit-real-pcc": 0.4, "audit-synthetic-pcc": 0.1, "audit-passed": 0.0},
        },
        {"geneva": {"epsilon": 7.99, "num-examples": 48.0}, "basel": {"epsilon": 2.0, "num-examples": 190.0}},
    )
    found = write_headline(tmp_path, results)
    assert json.loads((tmp_path / "headline.json").read_text()) == found
    assert found["limited_site"] == "geneva"
    geneva = found["sites"]["geneva"]
    assert geneva == {
        "labelled_fraction": 0.25,
        "labelled_spots": 48,
        "real_pcc": 0.30,
        "augmented_pcc": 0.34,
        "audit_real_pcc": 0.4,
        "audit_synthetic_pcc": 0.1,
        "audit_passed": False,
        "epsilon": 7.99,
    }
    assert found["sites"]["bern"]["audit_passed"] is None  # no audit reported: unknown, not failed
    assert found["sites"]["bern"]["epsilon"] is None and found["sites"]["basel"]["epsilon"] == 2.0
    from server.rounds import weighted

    assert "epsilon" not in weighted(results.phases["adapt"].last.sites)  # per site, never a mean
    assert found["verdict"] == (
        "data-limited site geneva (25% labelled, 48 spots): held-out PCC real+synthetic 0.340 vs real-only 0.300 "
        "(+0.040): the synthetic pairs help; audit FAILED"
    )
    summary = summary_markdown(results).splitlines()
    assert summary[4] == f"**{found['verdict']}**"
    assert summary[8].startswith("| geneva (data-limited) | 25% (48 spots) | 0.300 | 0.340 | +0.040 | 0.400 / 0.100")


@pytest.mark.parametrize(
    ("real", "augmented", "effect"),
    [(0.30, 0.29, "no clear effect"), (0.30, 0.27, "the synthetic pairs hurt"), (0.30, 0.32, "help")],
)
def test_the_verdict_needs_two_points_of_pcc_either_way(real, augmented, effect):
    found = headline(_run({"a": _scores(0.25, 10, real, augmented)}, {}))
    assert effect in found["verdict"] and "no audit" in found["verdict"]


def test_no_downstream_results_no_headline(tmp_path):
    assert (
        write_headline(tmp_path, RunRecord(run="1", status="failed", config={}, run_dir=str(tmp_path), phases={}))
        is None
    )
    assert not (tmp_path / "headline.json").exists()


def _site_toml(tmp_path, extra: str = "") -> str:
    path = tmp_path / "site.toml"
    path.write_text(f'site = "geneva"\n{extra}\n[[sections]]\nid = "A"\nformat = "h5ad"\nh5ad = "a.h5ad"\n')
    return str(path)


def test_labelled_fraction_is_read_from_site_toml_or_node_config_and_checked(tmp_path):
    run = RunConfig()
    work = str(tmp_path / "work")
    assert NodeConfig.from_mapping({"data-path": _site_toml(tmp_path), "work-dir": work}, run).labelled_fraction == 1
    declared = _site_toml(tmp_path, "labelled-fraction = 0.25")
    assert NodeConfig.from_mapping({"data-path": declared, "work-dir": work}, run).labelled_fraction == 0.25
    node = NodeConfig.from_mapping({"data-path": declared, "work-dir": work, "labelled-fraction": 0.5}, run)
    assert node.labelled_fraction == 0.5 and "labelled-fraction" not in node.extra  # the node config wins
    for bad in (0, 1.5, "a lot", True):
        with pytest.raises(
            FedstError, match=r"node config 'labelled-fraction' is .* \(expected a fraction in \(0, 1\]"
        ):
            NodeConfig.from_mapping({"data-path": declared, "work-dir": work, "labelled-fraction": bad}, run)
    with pytest.raises(FedstError, match=r"site.toml: field 'labelled-fraction' is -0.1"):
        NodeConfig.from_mapping({"data-path": _site_toml(tmp_path, "labelled-fraction = -0.1"), "work-dir": work}, run)


def test_a_limited_site_trains_on_a_nested_subset_of_its_training_spots_and_keeps_the_held_out_section(tmp_path):
    """Adaptation, synthesis and the real-only predictor see ceil(f * n) of the n training spots (a nested subset:
    the 25% spots are inside the 50% ones); the held-out section is untouched; the counts reach the metrics."""
    from client.site import SiteTask
    from shared import keys
    from shared.c2l.toy import write_toy_store

    panel = [f"G{i}" for i in range(6)]
    store = write_toy_store(tmp_path / "store", n_spots=40, n_tiles=4, panel=panel, patch_px=8, seed=0)
    run = RunConfig.from_mapping({"backend": "toy", "patch-px": 8})
    sections = store.spots.obs[keys.SECTION].astype(str).to_numpy()
    held_out = sorted(set(sections))[-1]
    training = np.flatnonzero(sections != held_out)
    rows = {}
    for fraction in (0.25, 0.5, 1.0):
        node = NodeConfig.from_mapping(
            {"data-path": str(store.path), "work-dir": str(tmp_path / f"w{fraction}"), "labelled-fraction": fraction},
            run,
        )
        task = SiteTask(run, node, panel)
        rows[fraction] = task.labelled_rows
        assert len(rows[fraction]) == int(np.ceil(fraction * len(training)))
        assert task.paired_store.n_spots == len(rows[fraction])
        assert held_out not in set(task.paired_store.spots.obs[keys.SECTION].astype(str))
    assert set(rows[0.25]) < set(rows[0.5]) < set(rows[1.0]) == set(training)
    every = NodeConfig.from_mapping(
        {"data-path": str(store.path), "work-dir": str(tmp_path / "all"), "hold-out": False}, run
    )
    assert len(SiteTask(run, every, panel).labelled_rows) == store.n_spots  # a training-only store: nothing held out
    with pytest.raises(FedstError, match="node config 'hold-out' is 'no' \\(expected true or false\\)"):
        NodeConfig.from_mapping({"data-path": str(store.path), "work-dir": str(tmp_path), "hold-out": "no"}, run)
    scores = task.downstream()
    assert scores["labelled-fraction"] == 1.0 and scores["labelled-spots"] == len(training)
    assert scores["num-examples"] == int((sections == held_out).sum())
