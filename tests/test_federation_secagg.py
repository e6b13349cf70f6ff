"""Optional SecAgg+ for pretraining: the secure aggregate equals plain FedAvg within the quantisation error.

Error bound (per parameter), from Flower's SecAgg+ (client: ``secaggplus_mod``; server: ``SecAggPlusWorkflow``).
Site i with n_i examples uploads Q_i = stochastic_round((d_i p_i + c) T / 2c) where d_i = round(n_i / W * T) / T
is its quantised weight (W = max-weight, T = quantisation range, c = clipping range; no clipping happens: the
site checks |d_i p_i| <= c). The server unmasks sum_i Q_i and returns (sum_i Q_i 2c/T - k c) / D, D = sum_i d_i.
Stochastic rounding moves each Q_i by less than one level (2c/T), so

    |secagg - sum_i d_i p_i / D|  <  k (2c/T) / D                                   (rounding)
    |sum_i d_i p_i / D - sum_i n_i p_i / N|  is computed exactly from the p_i       (weight quantisation)

and |secagg - FedAvg| is below their sum (+ 1e-6 for the float32 cast). The p_i are recomputed here with the
same Flower-free SiteTask, seeds and inputs the sites used.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from shared.backends import toy
from shared.config import NodeConfig, RunConfig
from shared.errors import FedstError
from tests import helpers
from tests.helpers import REPO, TOY_PANEL, TOY_SIZES, write_toy_consortium

PANEL, SIZES = TOY_PANEL, TOY_SIZES
flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Message, RecordDict  # noqa: E402

from client.app import app as client_app  # noqa: E402
from client.handlers import check_secagg_range  # noqa: E402
from client.site import SiteTask  # noqa: E402
from server.checkpoint import load_checkpoint  # noqa: E402
from server.localgrid import LocalGrid  # noqa: E402
from server.results import load_results  # noqa: E402
from server.secagg import screen_reply  # noqa: E402
from server.workflow import Workflow  # noqa: E402


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    return write_toy_consortium(tmp_path_factory.mktemp("secagg-stores"), SIZES)


def toy_config(out: Path, **overrides) -> dict:
    """Pretraining only, one round of 3 steps at lr 0.01 (the SecAgg+ comparisons need a visible update)."""
    secagg_defaults = {"phases": "pretrain", "rounds-pretrain": 1, "local-steps": 3, "lr": 1e-2}
    return helpers.toy_config(out, **{**secagg_defaults, **overrides})


def run_local(stores, out: Path, config: dict, **grid_kwargs):
    nodes = {101 + i: {"data-path": str(p), "work-dir": str(out / f"work-{i}")} for i, p in enumerate(stores)}
    with LocalGrid(client_app, nodes, config, **grid_kwargs) as grid:
        results = Workflow(grid, RunConfig.from_mapping(config), Path(config["out-dir"]) / config["run-name"]).run_all()
    return grid, results


def site_updates(stores, config: dict, start: dict, server_round: int, scratch: Path):
    """What every site computed in ``server_round`` from ``start`` (same task, seeds and inputs as the sites)."""
    run = RunConfig.from_mapping(config)
    prox = run.aggregation.prox_mu if run.aggregation.strategy == "fedprox" else 0.0
    updates, weights = [], []
    for i, store in enumerate(stores):
        node = NodeConfig.from_mapping({"data-path": str(store), "work-dir": str(scratch / f"recompute-{i}")}, run)
        state, metrics = SiteTask(run, node).pretrain(
            {k: v.copy() for k, v in start.items()}, server_round, prox_mu=prox
        )
        updates.append(state)
        weights.append(metrics["num-examples"])
    return updates, weights


def fedavg_and_bound(updates, weights, run: RunConfig):
    """(exact FedAvg in float64, elementwise bound on |secagg - FedAvg|) per the module docstring."""
    t, c, w = (
        run.secure_aggregation.quantization_range,
        run.secure_aggregation.clipping_range,
        run.secure_aggregation.max_weight,
    )
    d = np.array([round(n / w * t) / t for n in weights])
    n = np.array(weights, dtype=np.float64)
    rounding = len(updates) * (2 * c / t) / d.sum()
    exact, bound = {}, {}
    for key in updates[0]:
        stack = np.stack([np.asarray(u[key], np.float64) for u in updates])
        exact[key] = np.tensordot(n / n.sum(), stack, axes=1)
        by_d = np.tensordot(d / d.sum(), stack, axes=1)
        bound[key] = rounding + np.abs(by_d - exact[key]) + 1e-6
    return exact, bound, rounding


def worst(got: dict, exact: dict, bound: dict) -> tuple[float, float]:
    """(max |got - exact|, the largest ratio of that error to its bound; <= 1 means within the bound)."""
    diff = max(float(np.max(np.abs(np.asarray(got[k], np.float64) - exact[k]))) for k in exact)
    ratio = max(float(np.max(np.abs(np.asarray(got[k], np.float64) - exact[k]) / bound[k])) for k in exact)
    return diff, ratio


def checkpoint_model(run_dir: Path, server_round: int) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "checkpoints" / "pretrain" / f"round-{server_round:04d}" / "model.safetensors"))


# -- configuration -----------------------------------------------------------------------------------------
def test_secagg_config_errors_before_the_run():
    ok = RunConfig.from_mapping(
        {
            "secagg": "true",
            "strategy": "fedprox",
            "secagg-num-shares": 5,
            "secagg-reconstruction-threshold": 3,
            "min-sites": 3,
        }
    )
    assert (
        ok.secure_aggregation.enabled
        and ok.secure_aggregation.num_shares == 5
        and ok.secure_aggregation.reconstruction_threshold == 3
    )
    with pytest.raises(
        FedstError,
        match=r"'aggregation.strategy' is 'fedadam'; expected fedavg or fedprox with secure-aggregation.enabled = true",
    ):
        RunConfig.from_mapping({"secagg": True, "strategy": "fedadam"})
    with pytest.raises(
        FedstError,
        match=r"'secure-aggregation.reconstruction-threshold' is 3; expected an integer >= 2 and < "
        r"secure-aggregation.num-shares \(3\)",
    ):
        RunConfig.from_mapping({"secagg": True, "secagg-reconstruction-threshold": 3})
    with pytest.raises(FedstError, match=r"'secure-aggregation.num-shares' is 2"):
        RunConfig.from_mapping({"secagg": True, "secagg-num-shares": 2})
    with pytest.raises(
        FedstError, match=r"'min-sites' is 2; expected >= secure-aggregation.reconstruction-threshold \(3\)"
    ):
        RunConfig.from_mapping({"secagg": True, "secagg-num-shares": 4, "secagg-reconstruction-threshold": 3})
    with pytest.raises(FedstError, match="'secure-aggregation.quantization-range'"):
        RunConfig.from_mapping({"secagg": True, "secagg-quantization-range": 2**30})
    with pytest.raises(FedstError, match="'secure-aggregation.clipping-range'"):
        RunConfig.from_mapping({"secagg": True, "secagg-clipping-range": 0})
    # without secagg the same keys are inert: FedAdam stays available
    assert (
        RunConfig.from_mapping({"strategy": "fedadam", "secagg-reconstruction-threshold": 9}).aggregation.strategy
        == "fedadam"
    )


def test_sites_refuse_what_secagg_would_silently_corrupt():
    run = RunConfig(secure_aggregation={"enabled": True})
    check_secagg_range({"w": np.full(3, 7.9, np.float32)}, 1000, run)  # weight 1.0: 7.9 <= 8 fits
    check_secagg_range({"w": np.full(3, 150.0, np.float32)}, 50, run)  # weight 0.05: 7.5 fits
    with pytest.raises(FedstError, match=r"tensor 'w' .*exceeds run config 'secure-aggregation.clipping-range' \(8\)"):
        check_secagg_range({"w": np.full(3, 170.0, np.float32)}, 50, run)
    with pytest.raises(FedstError, match="num-examples 1001 exceeds run config 'secure-aggregation.max-weight'"):
        check_secagg_range({"w": np.zeros(3, np.float32)}, 1001, run)
    with pytest.raises(FedstError, match="exceeds"):
        check_secagg_range({"w": np.array([np.nan], np.float32)}, 10, run)


def test_a_plain_train_message_is_refused_without_secagg(stores, tmp_path):
    config = toy_config(tmp_path)
    with LocalGrid(client_app, {101: {"data-path": str(stores[0]), "work-dir": str(tmp_path / "w")}}, config) as grid:
        (reply,) = grid.send_and_receive([Message(RecordDict(), message_type="train", dst_node_id=101)])
    assert reply.has_error() and reply.error.reason.endswith("fedst-site-error 11 config-invalid")
    assert "only under SecAgg+" in (tmp_path / "w" / "site-errors.log").read_text()  # the details stay on the site


# -- the aggregate -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_one_round_secagg_equals_fedavg_within_the_quantisation_bound(stores, tmp_path, strategy):
    plain = toy_config(tmp_path / "plain", strategy=strategy)
    secure = toy_config(tmp_path / "secure", strategy=strategy, secagg=True)
    _, plain_results = run_local(stores, tmp_path / "plain", plain)
    grid, results = run_local(stores, tmp_path / "secure", secure)
    start = toy.initial_state(0)
    updates, weights = site_updates(stores, secure, start, 1, tmp_path)
    exact, bound, rounding = fedavg_and_bound(updates, weights, RunConfig.from_mapping(secure))
    fedavg = checkpoint_model(Path(plain["out-dir"]) / "r", 1)
    secagg = checkpoint_model(Path(secure["out-dir"]) / "r", 1)
    assert worst(fedavg, exact, {k: np.full_like(v, 1e-6) for k, v in exact.items()})[1] <= 1  # plain path is FedAvg
    diff, ratio = worst(secagg, exact, bound)
    print(
        f"\n[{strategy}] secagg vs FedAvg: max |diff| {diff:.3g}, "
        f"rounding bound {rounding:.3g}, max diff/bound {ratio:.3f}"
    )
    assert ratio <= 1.0
    assert diff > 0  # it really went through quantisation (not a plaintext shortcut)
    assert set(secagg) == set(fedavg) and all(secagg[k].dtype == fedavg[k].dtype for k in secagg)
    row = results.phases["pretrain"].rounds[0]
    assert results.phases["pretrain"].secure_aggregation == "SecAgg+"
    assert plain_results.phases["pretrain"].secure_aggregation is None
    assert set(row.sites) == {"site-0", "site-1", "site-2"}
    assert row.sites["site-1"]["num-examples"] == 38 and np.isfinite(row.aggregate["loss"])
    assert plain_results.phases["pretrain"].rounds[0].sites.keys() == row.sites.keys()
    # privacy: no reply carried a plaintext tensor; only the protocol's record, scalar metrics and the name
    for reply in grid.replies:
        assert reply.metadata.message_type == "train" and not reply.has_error()
        assert screen_reply(reply.content) == []
        assert all(len(a.data) == 0 for record in reply.content.array_records.values() for a in record.values())
        assert set(reply.content.config_records.keys()) <= {
            "secaggplus_configs",
            "fitres.status",
            "fitres.metrics",
            "site",
        }
    assert len(grid.replies) == 3 * 4  # setup, share keys, collect masked vectors, unmask


def test_two_rounds_each_aggregate_within_the_bound_and_resume_is_identical(stores, tmp_path):
    config = toy_config(tmp_path / "a", secagg=True, **{"rounds-pretrain": 2})
    _, results = run_local(stores, tmp_path / "a", config)
    run_dir = Path(config["out-dir"]) / "r"
    start = toy.initial_state(0)
    for server_round in (1, 2):  # each round's aggregate is FedAvg of that round's site models
        updates, weights = site_updates(stores, config, start, server_round, tmp_path)
        exact, bound, _ = fedavg_and_bound(updates, weights, RunConfig.from_mapping(config))
        got = checkpoint_model(run_dir, server_round)
        assert worst(got, exact, bound)[1] <= 1.0, server_round
        start = got
    assert [r.round for r in results.phases["pretrain"].rounds] == [1, 2]
    # End to end against two plain FedAvg rounds there is no quantisation-scale bound: Adam's normalised steps
    # turn a 1e-4 difference in a near-zero gradient into up to lr per step. The per-round checks above are the
    # exact statement; here only: each Adam step moves a parameter by about lr at most, so the runs cannot drift
    # apart by more than local-steps x lr beyond round 1's quantisation error.
    plain = toy_config(tmp_path / "p", **{"rounds-pretrain": 2})
    run_local(stores, tmp_path / "p", plain)
    gap = max(float(np.max(np.abs(checkpoint_model(Path(plain["out-dir"]) / "r", 2)[k] - start[k]))) for k in start)
    print(f"\ntwo rounds: secagg vs plain FedAvg max |diff| {gap:.3g}")
    assert 0 < gap < config["local-steps"] * config["lr"]
    # interrupted after round 1, resumed to 2: bit-identical (rounding is seeded per site and round)
    resumed = toy_config(tmp_path / "b", secagg=True)
    run_local(stores, tmp_path / "b", resumed)
    grid, results = run_local(stores, tmp_path / "b", {**resumed, "rounds-pretrain": 2, "resume": True})
    again = load_checkpoint(Path(resumed["out-dir"]) / "r", "pretrain")
    assert again[0] == 2
    for key, value in checkpoint_model(run_dir, 2).items():
        np.testing.assert_array_equal(again[1][key], value)
    assert [r.round for r in results.phases["pretrain"].rounds] == [1, 2]
    assert {
        m.content.config_records["fitins.config"]["server-round"]
        for m in grid.sent
        if "fitins.config" in m.content.config_records
    } == {2}  # only round 2 ran again


def test_a_site_leaking_plaintext_is_dropped_and_the_rest_unmasked(stores, tmp_path):
    def leak(node: int, reply: Message) -> Message:
        if node == 103 and "fitres.parameters" in reply.content.array_records:  # the masked-vector stage
            reply.content["leak"] = ArrayRecord({"w": flwr.app.Array(np.ones(4, np.float32))})
        return reply

    config = toy_config(tmp_path, secagg=True)
    _, results = run_local(stores, tmp_path, config, tamper=leak)
    row = results.phases["pretrain"].rounds[0]
    assert set(row.sites) == {"site-0", "site-1"}
    assert "privacy contract" in row.failed["site-2"] and "plaintext tensors" in row.failed["site-2"]
    updates, weights = site_updates(stores[:2], config, toy.initial_state(0), 1, tmp_path)
    exact, bound, _ = fedavg_and_bound(updates, weights, RunConfig.from_mapping(config))
    assert worst(checkpoint_model(Path(config["out-dir"]) / "r", 1), exact, bound)[1] <= 1.0  # dropout recovered


def test_the_aggregate_is_screened_and_a_halted_protocol_fails_clearly(stores, tmp_path):
    config = toy_config(tmp_path / "norm", secagg=True, **{"max-update-norm": 1e-6})
    with pytest.raises(FedstError, match=r"secure aggregate is unusable \(update norm .* exceeds the bound"):
        run_local(stores, tmp_path / "norm", config)
    saved = load_results(Path(config["out-dir"]) / "r")
    assert saved.status == "failed" and "single updates cannot be screened" in saved.error
    # two of three sites fail: 1 left < reconstruction threshold 2 -> the protocol halts; the run says why
    config = toy_config(tmp_path / "halt", secagg=True, **{"failure-tolerance": 2})
    with pytest.raises(FedstError, match=r"(secure aggregation halted|1 valid replies)"):
        run_local(stores, tmp_path / "halt", config, fail={102: "RuntimeError: disk full", 103: "timeout"})


def test_too_few_sites_left_fail_the_secagg_run_at_round_timeout_instead_of_waiting_a_day(stores, tmp_path):
    """Flower's legacy sampling waits 24 h for min_fit_clients; fedst waits round-timeout, then fails clearly."""

    class ShrinkingGrid(LocalGrid):
        gone: set[int] = set()

        def get_node_ids(self):
            return [n for n in super().get_node_ids() if n not in self.gone]

    def leave_after_round_1(node: int, reply: Message) -> Message:
        if node == 103 and "fitres.parameters" in reply.content.array_records:  # its masked vector was sent
            ShrinkingGrid.gone.add(node)
        return reply

    config = toy_config(tmp_path, secagg=True, **{"rounds-pretrain": 2, "min-sites": 3, "round-timeout": 2.0})
    nodes = {101 + i: {"data-path": str(p), "work-dir": str(tmp_path / f"work-{i}")} for i, p in enumerate(stores)}
    started = time.monotonic()
    with ShrinkingGrid(client_app, nodes, config, tamper=leave_after_round_1) as grid:
        with pytest.raises(
            FedstError, match=r"secagg pretrain round 2: only 2 site\(s\) connected after 2 s \(min-sites 3\)"
        ):
            Workflow(grid, RunConfig.from_mapping(config), Path(config["out-dir"]) / config["run-name"]).run_all()
    assert time.monotonic() - started < 120  # the deadline held: no day-long wait
    saved = load_results(Path(config["out-dir"]) / config["run-name"])
    assert saved.status == "failed" and "min-sites 3" in saved.error
    assert len(saved.phases["pretrain"].rounds) == 1  # round 1 (3 sites) was aggregated and kept


# -- real Flower processes -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_flwr_simulation_secagg_pretrain_then_message_api_phases(stores, tmp_path):
    """One `flwr run` (private SuperLink, 3 simulated SuperNodes): two SecAgg+ pretraining rounds, then the
    adapt phase on the message API; the round-1 aggregate matches FedAvg of the sites' models."""
    from server.superlink import SuperLink

    consortium = tmp_path / "consortium"
    for i, store in enumerate(stores):
        shutil.copytree(store, consortium / f"site-{i}")
    (consortium / "panel.txt").write_text("\n".join(PANEL) + "\n")
    config = toy_config(
        tmp_path,
        secagg=True,
        phases="pretrain,adapt",
        consortium=str(consortium),
        **{"rounds-pretrain": 2, "adapt-steps": 2, "sites-root": str(tmp_path / "sites"), "round-timeout": 300.0},
    )
    with SuperLink(tmp_path / "flwr", simulation=True) as link:
        run_id = link.submit(REPO, config, federation_config="num_supernodes=3 client_resources_num_cpus=1")
        info = link.wait(run_id, timeout=360)
        assert info["status"] == "finished:completed", link.logs(run_id)[-4000:]
    run_dir = Path(config["out-dir"]) / "r"
    results = load_results(run_dir)
    assert results.status == "completed" and set(results.phases) == {"pretrain", "adapt"}
    assert results.phases["pretrain"].secure_aggregation == "SecAgg+"
    rows = results.phases["pretrain"].rounds
    assert [r.round for r in rows] == [1, 2]
    assert all(set(r.sites) == {"site-0", "site-1", "site-2"} for r in rows)
    assert set(results.phases["adapt"].last.sites) == {"site-0", "site-1", "site-2"}  # message API after SecAgg+
    assert set(results.sites) == {"site-0", "site-1", "site-2"}
    summary = (run_dir / "summary.md").read_text()
    assert "`site-1`" in summary and "## pretrain (secure aggregation: SecAgg+)" in summary
    updates, weights = site_updates(
        [consortium / f"site-{i}" for i in range(3)], config, toy.initial_state(0), 1, tmp_path
    )
    exact, bound, rounding = fedavg_and_bound(updates, weights, RunConfig.from_mapping(config))
    diff, ratio = worst(checkpoint_model(run_dir, 1), exact, bound)
    print(f"\nflwr simulation: secagg round 1 vs FedAvg max |diff| {diff:.3g}, rounding bound {rounding:.3g}")
    assert ratio <= 1.0 and diff > 0
