"""results.json schema (server/results.py), the one round bookkeeping (server/rounds.py), its readers, and the one
numpy <-> ArrayRecord path (server/strategy.py, client/handlers.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from shared.errors import FedstError

flwr = pytest.importorskip("flwr")

from flwr.app import Array, RecordDict  # noqa: E402

from client.handlers import reply_record  # noqa: E402
from server.results import (  # noqa: E402
    SCHEMA,
    PhaseRecord,
    RoundRecord,
    RunRecord,
    load_results,
    rounds_from_json,
    rounds_to_json,
    save_results,
)
from server.rounds import NO_REPLY, RoundPolicy, RoundTally, weighted  # noqa: E402
from server.sites import SiteNames  # noqa: E402
from server.strategy import arrays_to_numpy, numpy_to_arrays  # noqa: E402


def sample_run(run_dir: Path) -> RunRecord:
    pretrain = PhaseRecord(
        kind="train",
        secure_aggregation="SecAgg+",
        rounds=[
            RoundRecord(
                round=r,
                sites={"basel": {"loss": 1.0 / r, "num-examples": 40.0}, "geneva": {"loss": 2.0 / r}},
                failed={"node-103": NO_REPLY},
                aggregate={"loss": 1.5 / r},
                wall_seconds=0.25,
            )
            for r in (1, 2)
        ],
    )
    downstream = PhaseRecord(
        kind="broadcast",
        rounds=[RoundRecord(round=1, sites={"basel": {"real-pcc": 0.3}}, failed={"geneva": "error: disk full"})],
    )
    return RunRecord(
        run="7",
        status="failed",
        error="downstream: boom",
        config={"backend": "toy", "seed": 0},
        phases={"pretrain": pretrain, "downstream": downstream},
        timing={"pretrain": 1.5},
        sites={"basel": 101, "geneva": 102},
        plots=[str(run_dir / "loss_per_round.png")],
        run_dir=str(run_dir),
    )


# -- schema -------------------------------------------------------------------------------------------------
def test_schema_round_trip_keeps_todays_keys(tmp_path):
    record = sample_run(tmp_path)
    path = save_results(tmp_path, record)
    assert path == tmp_path / "results.json"
    raw = json.loads(path.read_text())
    assert raw["schema"] == SCHEMA == 1 and raw["run-dir"] == str(tmp_path) and raw["run"] == "7"
    assert raw["phases"]["pretrain"]["rounds"][1]["sites"]["basel"] == {"loss": 0.5, "num-examples": 40.0}
    assert raw["phases"]["pretrain"]["rounds"][0]["wall-seconds"] == 0.25
    assert raw["phases"]["pretrain"]["secure-aggregation"] == "SecAgg+"
    # one shape for every phase: a broadcast phase is one round, with the same fields
    assert (
        set(raw["phases"]["downstream"]) == set(raw["phases"]["pretrain"]) == {"kind", "secure-aggregation", "rounds"}
    )
    assert set(raw["phases"]["downstream"]["rounds"][0]) == set(raw["phases"]["pretrain"]["rounds"][0])
    loaded = load_results(tmp_path)  # a run directory or the file itself
    assert loaded == record == load_results(path)
    assert loaded.phases["downstream"].last.failed == {"geneva": "error: disk full"}
    assert loaded.phases["pretrain"].last.round == 2 and PhaseRecord(kind="train").last is None


def test_reader_refuses_missing_corrupt_newer_and_malformed_files(tmp_path):
    path = tmp_path / "results.json"
    with pytest.raises(FedstError, match=r"results.json: no results.json \(expected a fedst run directory\)"):
        load_results(tmp_path)
    path.write_text('{"schema": 1, "run": ')
    with pytest.raises(FedstError, match=rf"{path}: results.json is unreadable or not JSON"):
        load_results(path)
    raw = sample_run(tmp_path).to_json()
    path.write_text(json.dumps({**raw, "schema": 2}))
    with pytest.raises(FedstError, match=rf"{path}: results.json has schema 2, newer than this fedst reads \(1\)"):
        load_results(path)
    path.write_text(json.dumps({k: v for k, v in raw.items() if k != "schema"}))
    with pytest.raises(FedstError, match="has no integer 'schema' version"):
        load_results(path)
    path.write_text(json.dumps({**raw, "schema": 0}))
    with pytest.raises(FedstError, match="has schema 0; this fedst reads schema 1"):
        load_results(path)
    raw["phases"]["pretrain"]["rounds"][0]["sites"]["basel"]["loss"] = "low"
    path.write_text(json.dumps(raw))
    with pytest.raises(FedstError, match=r"does not match schema 1: phases.pretrain.rounds.0.sites.basel.loss"):
        load_results(path)
    raw = sample_run(tmp_path).to_json()
    raw["phases"]["downstream"]["weighted"] = {}  # the old broadcast shape is not this schema
    path.write_text(json.dumps(raw))
    with pytest.raises(FedstError, match=r"phases.downstream.weighted: Extra inputs are not permitted"):
        load_results(path)


def test_checkpoint_history_is_validated_like_results_json(tmp_path):
    rows = [RoundRecord(round=1, sites={"a": {"loss": 1.0}}, aggregate={"loss": 1.0})]
    assert rounds_from_json(rounds_to_json(rows), tmp_path) == rows
    with pytest.raises(
        FedstError, match=rf"{tmp_path}: round history does not match schema 1: row 0: secure-aggregation: Extra"
    ):
        rounds_from_json([{"round": 1, "secure-aggregation": True}], tmp_path)  # a pre-schema SecAgg+ row


# -- round bookkeeping ------------------------------------------------------------------------------------------
def test_round_policy_known_answers():
    ok = RoundRecord(round=1, sites={"a": {}, "b": {}}, failed={"c": "x"})
    assert RoundPolicy(min_sites=2, failure_tolerance=1).problem(ok) is None
    assert RoundPolicy(min_sites=3, failure_tolerance=1).problem(ok) == (
        "2 valid replies (min-sites 3), 1 sites failed or rejected (failure-tolerance 1): c: x"
    )
    both = RoundRecord(round=1, sites={"a": {}, "b": {}}, failed={"c": "x"}, rejected={"d": "NaN"})
    assert "2 sites failed or rejected (failure-tolerance 1): c: x; d: NaN" in RoundPolicy(2, 1).problem(both)
    assert RoundPolicy(2, 2).problem(both) is None  # rejected updates count against the tolerance too
    assert RoundPolicy(1, 0).problem(RoundRecord(round=1)) == (
        "0 valid replies (min-sites 1), 0 sites failed or rejected (failure-tolerance 0)"
    )


def _sites(**declared: int) -> SiteNames:
    sites = SiteNames()
    for name, node in declared.items():
        sites.declared[node] = name
    return sites


def test_round_tally_counts_timeouts_labels_late_names_and_records_before_failing():
    sites = _sites(basel=1)
    tally = RoundTally("pretrain round 4", 4, [1, 2, 3, 4], sites.label, started=0.0)
    tally.accept(2, {"loss": 1, "num-examples": 10})
    tally.fail(3, "error: disk full")
    tally.accept(1, {"loss": 3, "num-examples": 30})
    sites.declared[2] = "geneva"  # declared in this round's reply: the record already uses the name
    rows: list[RoundRecord] = []
    row = tally.close(RoundPolicy(min_sites=2, failure_tolerance=2), rows.append)
    assert rows == [row] and row.round == 4 and row.wall_seconds > 0
    assert list(row.sites) == ["basel", "geneva"]  # node-id order
    assert row.sites["geneva"] == {"loss": 1.0, "num-examples": 10.0}
    assert row.failed == {"node-3": "error: disk full", "node-4": NO_REPLY}  # silent node 4 counts as failed
    assert weighted(row.sites) == {"loss": pytest.approx((1 * 10 + 3 * 30) / 40)}

    tally = RoundTally("query.synthesize", 1, [1, 2, 3], sites.label)
    tally.accept(1, {})
    tally.reject(2, "norm 12 exceeds the bound 10")
    rows.clear()
    with pytest.raises(FedstError, match=r"^query.synthesize: 1 valid replies \(min-sites 2\), 2 sites failed"):
        tally.close(RoundPolicy(min_sites=2, failure_tolerance=5), rows.append)
    (recorded,) = rows  # the round that stopped the run is in the record
    assert recorded.rejected == {"geneva": "norm 12 exceeds the bound 10"} and recorded.failed == {"node-3": NO_REPLY}


def test_round_tally_tolerance_and_a_custom_no_reply_reason():
    tally = RoundTally("pretrain round 1 (secagg)", 1, [1, 2, 3], _sites().label, no_reply="dropped out")
    tally.accept(1, {"num-examples": 4})
    tally.accept(2, {"num-examples": 4})
    rows: list[RoundRecord] = []
    with pytest.raises(FedstError, match=r"1 sites failed or rejected \(failure-tolerance 0\): node-3: dropped out"):
        tally.close(RoundPolicy(min_sites=1, failure_tolerance=0), rows.append)
    assert rows[0].failed == {"node-3": "dropped out"}


def test_weighted_means_by_num_examples():
    sites = {"a": {"pcc": 0.2, "num-examples": 1.0}, "b": {"pcc": 0.8, "mse": 2.0, "num-examples": 3.0}}
    assert weighted(sites) == {"pcc": pytest.approx(0.65), "mse": 2.0}
    assert weighted({}) == {}


# -- readers ----------------------------------------------------------------------------------------------------
def test_demo_progress_and_federation_status_read_through_the_schema(tmp_path, capsys):
    from server.cli import status
    from server.progress import progress_lines

    assert progress_lines(tmp_path / "results.json") == []  # not written yet
    save_results(tmp_path, sample_run(tmp_path))
    assert progress_lines(tmp_path / "results.json") == [
        "pretrain round 1: 2 sites, loss 1.5000",
        "pretrain round 2: 2 sites, loss 0.7500",
        "downstream: done on 1 sites, 1 failed",
        "status: failed",
    ]
    capsys.readouterr()
    status(tmp_path)
    assert capsys.readouterr().out.splitlines() == [
        "run 7: failed (downstream: boom)",
        "  pretrain: 2 rounds",
        "    basel: loss=0.5, num-examples=40",
        "    geneva: loss=1",
        "    node-103 FAILED: no reply before round-timeout",
        "  downstream",
        "    basel: real-pcc=0.3",
        "    geneva FAILED: error: disk full",
    ]
    (tmp_path / "results.json").write_text(json.dumps({**sample_run(tmp_path).to_json(), "schema": 9}))
    with pytest.raises(FedstError, match="schema 9, newer than this fedst reads"):
        status(tmp_path)


def test_summary_markdown_one_table_per_broadcast_and_rounds_per_training_phase(tmp_path):
    from server.report import summary_markdown

    text = summary_markdown(sample_run(tmp_path))
    assert "## pretrain (secure aggregation: SecAgg+)" in text
    assert "- round 2: 2 sites accepted; loss=0.75" in text and "  - node-103 excluded: no reply" in text
    assert "| basel | 0.3 |" in text and "- geneva failed: error: disk full" in text


# -- one numpy <-> ArrayRecord path -----------------------------------------------------------------------------
def test_numpy_array_record_round_trip_keeps_order_dtypes_and_bytes():
    state = {
        "z.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a.bias": np.array([1.5, -2.0], dtype=np.float64),
        "m.count": np.array([3, 4], dtype=np.int64),
        "h.half": np.ones((2, 2), dtype=np.float16),
        "t.view": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
    }
    frozen = state["z.weight"].copy()
    frozen.setflags(write=False)  # what Flower's Array.numpy() hands back
    state["f.frozen"] = frozen
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torch "non-writable array" warning
        record = numpy_to_arrays(state)
        back = arrays_to_numpy(record)
    assert list(record.keys()) == list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value)
        # the same bytes the hand-written path put on the wire
        assert record[key].data == Array(np.ascontiguousarray(value)).data, key
    # the client's reply uses the same Flower calls
    reply = reply_record({"loss": 1.0}, state, allowed_keys=set(state))
    assert list(reply.array_records["arrays"].keys()) == list(state)
    assert all(reply.array_records["arrays"][k].data == record[k].data for k in state)


def test_client_reads_arrays_by_name():
    from client.handlers import _arrays

    state = {"b": np.ones(2, np.float32), "a": np.zeros((1, 2), np.float32)}
    # only content and metadata are read; a real Message needs a Flower run id (set by a grid)
    msg = SimpleNamespace(content=RecordDict({"arrays": numpy_to_arrays(state)}), metadata=None)
    got = _arrays(msg, "arrays")
    assert list(got) == ["b", "a"] and all(np.array_equal(got[k], state[k]) for k in state)
