"""Federation mechanics against the real Flower strategies and ClientApp, driven in-process (server/localgrid.py).

The toy backend (shared/backends/toy.py) keeps these fast; the same code paths run the C2L-ST backend.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from shared.c2l.toy import write_toy_store
from shared.config import NodeConfig, RunConfig
from shared.config.legacy import ALIASES
from shared.errors import FedstError
from tests.helpers import REPO, TOY_PANEL, TOY_SIZES, toy_config, write_toy_consortium

PANEL, SIZES = TOY_PANEL, TOY_SIZES
flwr = pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from client.app import app as client_app  # noqa: E402
from client.handlers import reply_record  # noqa: E402
from server.localgrid import LocalGrid  # noqa: E402
from server.results import load_results  # noqa: E402
from server.rounds import NO_REPLY  # noqa: E402
from server.strategy import make_strategy, numpy_to_arrays  # noqa: E402
from server.validate import update_problems, weighted_mean  # noqa: E402
from server.workflow import Workflow  # noqa: E402
from shared.backends import toy  # noqa: E402


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    return write_toy_consortium(tmp_path_factory.mktemp("toy-stores"))


def make_grid(stores, tmp_path, run_config, **kwargs) -> LocalGrid:
    nodes = {101 + i: {"data-path": str(p), "work-dir": str(tmp_path / f"work-{i}")} for i, p in enumerate(stores)}
    return LocalGrid(client_app, nodes, run_config, **kwargs)


def run_workflow(stores, tmp_path, config, **grid_kwargs):
    with make_grid(stores, tmp_path, config, **grid_kwargs) as grid:
        run = RunConfig.from_mapping(config)
        results = Workflow(grid, run, Path(config["out-dir"]) / config["run-name"]).run_all()
    return grid, results


# -- config ----------------------------------------------------------------------------------------------
def test_pyproject_run_config_parses_to_defaults():
    from flwr.common.config import flatten_dict

    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_mapping(table) == RunConfig()  # the nested tables document exactly the defaults
    flat = flatten_dict(table)  # what Flower hands the apps as context.run_config
    assert RunConfig.from_mapping(flat) == RunConfig()
    legacy = {k for k, v in flat.items() if k in ALIASES and v == ""}
    assert set(flat) - legacy == set(RunConfig().to_dict())  # every key overridable with `flwr run -c`
    assert legacy == set(ALIASES)  # Flower accepts `-c old-key=value` for every legacy key


def test_flwr_run_overrides_flow_through_flowers_own_parsing():
    from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

    table = flatten_dict(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    new = fuse_dicts(table, parse_config_args(["adapt.federated=true adapt.rounds=3 synthesize.guidance=1.5"]))
    old = fuse_dicts(table, parse_config_args(["federated-adapt=true rounds-adapt=3 lr=0.01 strategy='fedprox'"]))
    for run in (RunConfig.from_mapping(new), RunConfig.from_mapping(old)):
        assert (run.adapt.federated, run.adapt.rounds) == (True, 3)
    assert RunConfig.from_mapping(new).synthesize.guidance == 1.5
    assert (RunConfig.from_mapping(old).pretrain.lr, RunConfig.from_mapping(old).adapt.lr) == (0.01, 0.01)
    assert RunConfig.from_mapping(old).aggregation.strategy == "fedprox"
    secure = fuse_dicts(table, parse_config_args(["secagg=true secagg-num-shares=4 min-sites=3"]))  # deploy/README.md
    assert RunConfig.from_mapping(secure).secure_aggregation.enabled is True
    with pytest.raises(FedstError, match="legacy key 'rounds-adapt' = 3 conflicts with 'adapt.rounds' = 2"):
        RunConfig.from_mapping(fuse_dicts(table, parse_config_args(["rounds-adapt=3 adapt.rounds=2"])))


def test_flwr_run_packs_the_code_not_what_runs_write_into_the_checkout():
    """`flwr run .` builds the FAB from the checkout (Flower's own builder, .gitignore honoured): the app's code
    goes; a generated consortium (its SITE.toml files), run directories and Flower's home do not, whatever the
    `flwr run` recipe of docs/federation.md or `fedst demo` leave in the checkout."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_files

    code = {
        p.relative_to(REPO).as_posix(): p for pkg in ("server", "client", "shared") for p in (REPO / pkg).rglob("*.py")
    }
    written = [
        "consortium/panel.txt",
        "consortium/site-0/site.toml",
        "runs/r/results.json",
        "runs/r/summary.md",
        "fedst-runs/r/results.json",
        "fedst-demo/consortium/site-0/site.toml",
        ".flwr/config.toml",
    ]
    files = {"pyproject.toml": REPO / "pyproject.toml", ".gitignore": REPO / ".gitignore", **code}
    files.update({name: b"x = 1\n" for name in written})
    fab, _ = build_fab_from_files(files)
    packed = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert set(code) <= packed
    assert not packed & set(written)


def test_run_config_coerces_and_rejects():
    config = RunConfig.from_mapping({"rounds-pretrain": "3", "lr": 1, "federated-adapt": "true", "strategy": "fedprox"})
    assert (config.pretrain.rounds, config.pretrain.lr, config.adapt.lr, config.adapt.federated) == (3, 1.0, 1.0, True)
    assert config.aggregation.strategy == "fedprox" and config.paths == RunConfig().paths
    nested = RunConfig.from_mapping({"pretrain": {"rounds": 2, "lr": 2e-4}, "adapt.lr": 5e-4, "paths": {"run-name": 7}})
    assert (nested.pretrain.rounds, nested.pretrain.lr, nested.adapt.lr, nested.paths.run_name) == (2, 2e-4, 5e-4, "7")
    assert RunConfig.from_mapping(nested.to_dict()) == nested
    with pytest.raises(
        FedstError, match=r"unknown key 'round-pretrain' \(known keys: adapt.attention-film, adapt.augmentation"
    ):
        RunConfig.from_mapping({"round-pretrain": 3})
    with pytest.raises(FedstError, match="unknown key 'pretrain.round'"):
        RunConfig.from_mapping({"pretrain": {"round": 3}})
    with pytest.raises(
        FedstError,
        match="'aggregation.strategy' .set as legacy key 'strategy'. is 'fedsgd'; input should be 'fedavg', 'fedprox'",
    ):
        RunConfig.from_mapping({"strategy": "fedsgd"})
    with pytest.raises(FedstError, match="'pretrain.rounds' .set as legacy key 'rounds-pretrain'. is 'two'; .*integer"):
        RunConfig.from_mapping({"rounds-pretrain": "two"})
    with pytest.raises(FedstError, match="'adapt.steps' is 0; input should be greater than or equal to 1"):
        RunConfig.from_mapping({"adapt.steps": 0})
    with pytest.raises(FedstError, match="'synthesize.sampler' is 'euler'"):
        RunConfig.from_mapping({"synthesize.sampler": "euler"})
    with pytest.raises(FedstError, match="'patch-px' is 30; expected a multiple of 8"):
        RunConfig.from_mapping({"patch-px": 30})


def test_legacy_aliases_name_real_keys_and_the_reference_page_is_current():
    from shared.config import DEFAULTS
    from shared.config.reference import reference

    assert all(new in DEFAULTS for targets in ALIASES.values() for new in targets)
    assert not set(ALIASES) & set(DEFAULTS)  # a legacy key is never also a current key
    page = reference()
    assert all(f"`{key}`" in page for key in (*DEFAULTS, *ALIASES))
    assert (REPO / "docs" / "configuration.md").read_text() == page, "run: python -m shared.config.reference"


def test_unknown_backend_is_a_clean_error_listing_the_registered_ones():
    from shared.backends import backend_names, create_backend

    assert backend_names() == ["c2l", "toy"]
    with pytest.raises(FedstError, match="'backend' is 'c3l'; expected one of c2l, toy"):
        create_backend("c3l", RunConfig(backend="c3l"))
    with pytest.raises(FedstError, match="'preset' is 'huge'; expected one of tiny, base, large"):
        create_backend("c2l", RunConfig(preset="huge"))


def test_no_backend_name_branches_outside_the_registry():
    import re

    pattern = re.compile(r"""backend\s*[!=]=\s*["']|["'](toy|c2l)["']\s*[!=]=""")
    offenders = [
        f"{path.relative_to(REPO)}:{i}"
        for folder in ("shared", "server", "client")
        for path in sorted((REPO / folder).rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_node_config_errors_name_the_field(tmp_path):
    run = RunConfig()
    with pytest.raises(FedstError, match="'data-path' is missing"):
        NodeConfig.from_mapping({"work-dir": str(tmp_path)}, run)
    with pytest.raises(FedstError, match=r"'data-path': .*nowhere.toml does not exist"):
        NodeConfig.from_mapping({"data-path": str(tmp_path / "nowhere.toml"), "work-dir": str(tmp_path)}, run)
    (tmp_path / "c" / "site-1").mkdir(parents=True)
    (tmp_path / "c" / "site-1" / "site.toml").write_text('site = "st-gallen"\n')
    node = NodeConfig.from_mapping(
        {"partition-id": 1}, RunConfig(paths={"consortium": str(tmp_path / "c")}), tmp_path / "w"
    )
    assert node.site == "st-gallen" and node.work_dir == (tmp_path / "w" / "st-gallen")


def test_gene_panel_mismatch_is_a_clear_error(stores, tmp_path):
    from client.site import open_store

    run = RunConfig(backend="toy", patch_px=16)
    node = NodeConfig.from_mapping({"data-path": str(stores[0]), "work-dir": str(tmp_path)}, run)
    assert open_store(node, run, PANEL).panel == PANEL
    with pytest.raises(
        FedstError, match=r"gene panel .* differs .*position 2 the store has 'G2' where the consortium has 'X2'"
    ):
        open_store(node, run, ["G0", "G1", "X2", "G3", "G4", "G5"])
    with pytest.raises(FedstError, match="patch size 16 px, run config 'patch-px' is 32"):
        open_store(node, RunConfig(backend="toy", patch_px=32), None)


# -- aggregation and validation ----------------------------------------------------------------------------
def _reply(node: int, state: dict, weight: float, action: str = "pretrain") -> Message:
    inst = Message(content=RecordDict(), message_type=f"train.{action}", dst_node_id=node)
    return Message(
        RecordDict({"arrays": numpy_to_arrays(state), "metrics": MetricRecord({"num-examples": weight, "loss": 1.0})}),
        reply_to=inst,
    )


def _prime(strategy, grid, reference: dict) -> None:
    list(strategy.configure_train(1, numpy_to_arrays(reference), ConfigRecord(), grid))


def test_fedavg_equals_hand_computed_weighted_mean(stores, tmp_path):
    with make_grid(stores, tmp_path, toy_config(tmp_path)) as grid:
        run = RunConfig.from_mapping(toy_config(tmp_path))
        strategy = make_strategy(run)
        strategy.setup_phase("pretrain", run)
        rng = np.random.default_rng(0)
        base = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
        _prime(strategy, grid, base)
        updates = [{k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()} for _ in range(3)]
        weights = [10.0, 30.0, 60.0]
        arrays, metrics = strategy.aggregate_train(
            1, [_reply(101 + i, u, w) for i, (u, w) in enumerate(zip(updates, weights))]
        )
        got = {k: v.numpy() for k, v in arrays.items()}
        by_hand = {k: (10 * updates[0][k] + 30 * updates[1][k] + 60 * updates[2][k]) / 100 for k in base}
        for k in base:
            np.testing.assert_allclose(got[k], by_hand[k], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(weighted_mean(updates, weights)[k], by_hand[k], rtol=1e-6)
        assert metrics["loss"] == pytest.approx(1.0)


def test_fedavg_aggregates_in_site_name_order_whatever_the_node_ids(stores, tmp_path):
    """Flower sums updates in list order and float addition is not associative: with node ids drawn at random
    per run (simulation), ordering by node id made the same seed give different weights in the last bits."""
    rng = np.random.default_rng(1)
    base = {"w": np.zeros(4096, np.float32)}
    scales = {"basel": 1e6, "geneva": 1.0, "zurich": 1e-3}  # magnitudes whose float32 sums depend on the order
    updates = {name: {"w": (rng.normal(size=4096) * scale).astype(np.float32)} for name, scale in scales.items()}

    def aggregate(node_of: dict[str, int]) -> np.ndarray:
        with make_grid(stores, tmp_path, toy_config(tmp_path)) as grid:
            run = RunConfig.from_mapping(toy_config(tmp_path, **{"max-update-norm": 1e12}))
            strategy = make_strategy(run)
            strategy.setup_phase("pretrain", run)
            _prime(strategy, grid, base)
            replies = []
            for name, node in node_of.items():
                reply = _reply(node, updates[name], 1.0 + len(name))
                reply.content["site"] = ConfigRecord({"name": name})
                replies.append(reply)
            arrays, _ = strategy.aggregate_train(1, replies)
            return arrays["w"].numpy()

    first = aggregate({"basel": 101, "geneva": 102, "zurich": 103})
    np.testing.assert_array_equal(first, aggregate({"zurich": 101, "basel": 103, "geneva": 102}))
    np.testing.assert_array_equal(first, aggregate({"geneva": 103, "zurich": 102, "basel": 101}))


def test_update_problems_detects_nan_shape_names_and_norm():
    ref = {"a": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    assert update_problems({"a": np.ones((2, 2), np.float32), "b": np.ones(3, np.float32)}, ref, 10.0) == []
    for dtype in (np.int32, np.bool_, np.complex64):  # refused, never cast
        found = update_problems({"a": np.ones((2, 2), dtype), "b": np.ones(3, np.float32)}, ref, 10.0)
        assert found == [f"tensor 'a' has dtype {np.dtype(dtype)}, expected float32"]
    assert (
        "NaN or Inf"
        in update_problems({"a": np.full((2, 2), np.nan, np.float32), "b": np.ones(3, np.float32)}, ref, 10.0)[0]
    )
    assert (
        "NaN or Inf"
        in update_problems({"a": np.full((2, 2), np.inf, np.float32), "b": np.ones(3, np.float32)}, ref, 10.0)[0]
    )
    assert (
        "shape (3, 2), expected (2, 2)"
        in update_problems({"a": np.ones((3, 2), np.float32), "b": np.ones(3, np.float32)}, ref, 10.0)[0]
    )
    assert "missing tensors ['b']" in update_problems({"a": np.ones((2, 2), np.float32)}, ref, 10.0)[0]
    assert "unexpected tensors ['pixels']" in update_problems({**ref, "pixels": np.ones(4)}, ref, 10.0)[0]
    # norm of the difference is sqrt(7 * 4^2) = 10.58 > 10
    assert (
        "exceeds the bound"
        in update_problems({"a": np.full((2, 2), 4.0, np.float32), "b": np.full(3, 4.0, np.float32)}, ref, 10.0)[0]
    )


def test_update_norm_bound_relative_to_the_model():
    """The issue's attack: an update of norm 9000, under the absolute 1e4 bound, against a model of norm 3.4."""
    ref = {"w": np.full(4, 1.7, np.float32)}  # norm 3.4
    attack = {"w": np.full(4, 1.7 + 4500.0, np.float32)}  # distance 9000
    assert update_problems(attack, ref, 1e4) == []  # what the absolute bound alone let through
    (problem,) = update_problems(attack, ref, 1e4, 2.0)
    assert problem == "update norm 9000 exceeds 2 x the global model's norm 3.4"
    assert update_problems({"w": np.full(4, 1.7 + 3.3, np.float32)}, ref, 1e4, 2.0) == []  # 6.6 <= 6.8
    assert update_problems({"w": np.ones(4, np.float32)}, {"w": np.zeros(4, np.float32)}, 1e4, 2.0) == []  # zero model


def test_bad_updates_are_rejected_logged_and_excluded(stores, tmp_path):
    run = RunConfig.from_mapping(toy_config(tmp_path, **{"failure-tolerance": 2, "max-update-norm": 100.0}))
    with make_grid(stores, tmp_path, run.to_dict()) as grid:
        strategy = make_strategy(run)
        strategy.setup_phase("pretrain", run)
        base = {"w": np.zeros((2, 2), np.float32)}
        _prime(strategy, grid, base)
        replies = [
            _reply(101, {"w": np.ones((2, 2), np.float32)}, 1.0),
            _reply(102, {"w": np.full((2, 2), np.nan, np.float32)}, 1.0),
            _reply(103, {"w": np.full((2, 2), 1e3, np.float32)}, 1.0),
        ]
        with pytest.raises(FedstError, match="1 valid replies"):  # min-sites 2
            strategy.aggregate_train(1, replies)
        row = strategy.history[-1]
        assert set(row.rejected) == {"node-102", "node-103"} and "NaN" in row.rejected["node-102"]  # no name declared
        assert "exceeds the bound" in row.rejected["node-103"]
        strategy.run_config.min_sites = 1
        arrays, _ = strategy.aggregate_train(1, replies)
        np.testing.assert_array_equal(arrays["w"].numpy(), np.ones((2, 2), np.float32))  # only the good update


def test_a_site_cannot_outweigh_the_others_or_smuggle_metric_keys(stores, tmp_path):
    """num-examples may not grow past what the site declared in its first round (1e9 would make the FedAvg its
    own model); a reply with a metric key the phase does not declare is rejected, and the key (which could hold a
    path or a spot id) is not written into the round record; the site side refuses to build such a reply."""
    run = RunConfig.from_mapping(toy_config(tmp_path, **{"failure-tolerance": 2, "min-sites": 1}))
    with make_grid(stores, tmp_path, run.to_dict()) as grid:
        strategy = make_strategy(run)
        strategy.setup_phase("pretrain", run)
        base = {"w": np.zeros((2, 2), np.float32)}
        _prime(strategy, grid, base)
        good = [_reply(node, {"w": np.full((2, 2), 0.1 * (node - 100), np.float32)}, 10.0) for node in (101, 102, 103)]
        strategy.aggregate_train(1, good)
        heavy = _reply(103, {"w": np.full((2, 2), 5.0, np.float32)}, 1e9)
        leaky = _reply(102, {"w": np.ones((2, 2), np.float32)}, 10.0)
        leaky.content["metrics"]["/data/hospital-b/S1.h5ad:spot-AAAC"] = 3.0
        arrays, _ = strategy.aggregate_train(2, [good[0], leaky, heavy])
        row = strategy.history[-1]
        assert set(row.rejected) == {"node-102", "node-103"}
        assert "exceeds the 10 the site declared first" in row.rejected["node-103"]
        assert "1 keys the pretrain phase does not declare" in row.rejected["node-102"]
        assert "hospital-b" not in json.dumps(row.model_dump(mode="json"))
        np.testing.assert_array_equal(arrays["w"].numpy(), good[0].content["arrays"]["w"].numpy())
    with pytest.raises(FedstError, match="privacy contract: 1 metric keys the pretrain phase does not declare"):
        reply_record({"loss": 1.0, "path-/data/x": 1.0}, phase="pretrain")
    assert reply_record({"real-pcc_per_slide_mean": 0.3, "labelled-spots": 49.0}, phase="downstream")


@pytest.mark.parametrize(("kind", "expected"), [("fedmedian", 2.0), ("fedtrimmedavg", 2.0), ("fedavg", 334.33)])
def test_robust_aggregation_ignores_a_poisoned_minority(stores, tmp_path, kind, expected):
    """One site sends a large update under the norm bound: FedAvg moves to a third of it, the coordinate-wise
    median and the trimmed mean (beta 0.34 of 3 sites: one trimmed at each end) stay with the honest sites."""
    run = RunConfig.from_mapping(
        toy_config(tmp_path, **{"strategy": kind, "aggregation.trim-beta": 0.34, "max-update-norm": 1e4})
    )
    with make_grid(stores, tmp_path, run.to_dict()) as grid:
        strategy = make_strategy(run)
        strategy.setup_phase("pretrain", run)
        _prime(strategy, grid, {"w": np.zeros(4, np.float32)})
        values = {101: 1.0, 102: 2.0, 103: 1000.0}
        arrays, _ = strategy.aggregate_train(
            1, [_reply(node, {"w": np.full(4, v, np.float32)}, 10.0) for node, v in values.items()]
        )
        np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, expected), rtol=1e-4)


# -- workflow: resume, failures, privacy -------------------------------------------------------------------
def _final(run_dir: Path) -> dict:
    from server.checkpoint import load_checkpoint

    return load_checkpoint(run_dir, "pretrain")


@pytest.mark.parametrize("strategy", ["fedadam", "fedprox"])
def test_resume_is_bit_identical_to_uninterrupted(stores, tmp_path, strategy):
    phases = {"phases": "pretrain", "strategy": strategy}
    run_workflow(stores, tmp_path / "a", toy_config(tmp_path / "a", **phases, **{"rounds-pretrain": 3}))
    # "interrupted" after round 2, then resumed to 3 rounds from the checkpoint (moments included)
    run_workflow(stores, tmp_path / "b", toy_config(tmp_path / "b", **phases, **{"rounds-pretrain": 2}))
    grid, results = run_workflow(
        stores, tmp_path / "b", toy_config(tmp_path / "b", **phases, **{"rounds-pretrain": 3, "resume": True})
    )
    assert [m.content["config"]["server-round"] for m in grid.sent] == [3, 3, 3]  # only round 3 ran again
    a, b = _final(tmp_path / "a" / "runs" / "r"), _final(tmp_path / "b" / "runs" / "r")
    assert a[0] == b[0] == 3
    for key in a[1]:
        np.testing.assert_array_equal(a[1][key], b[1][key])
    for key in a[2]:  # optimiser state too
        np.testing.assert_array_equal(a[2][key], b[2][key])
    if strategy == "fedadam":
        assert any(k.startswith("m_t/") for k in a[2])
    assert [r.round for r in results.phases["pretrain"].rounds] == [1, 2, 3]


def test_resume_refuses_a_changed_config(stores, tmp_path):
    run_workflow(stores, tmp_path, toy_config(tmp_path, phases="pretrain", **{"rounds-pretrain": 1}))
    with pytest.raises(FedstError, match=r"resume: run config differs .*\['adapt.lr', 'pretrain.lr'\]"):
        run_workflow(stores, tmp_path, toy_config(tmp_path, phases="pretrain", lr=0.5, resume=True))


def test_failing_and_silent_sites_do_not_crash_the_run(stores, tmp_path):
    config = toy_config(tmp_path, **{"failure-tolerance": 1})
    grid, results = run_workflow(stores, tmp_path, config, fail={102: "RuntimeError: disk full"})
    assert results.status == "completed"
    for row in results.phases["pretrain"].rounds:  # sites by declared name; one that never replied by node id
        assert set(row.sites) == {"site-0", "site-2"}
        assert row.failed["node-102"] == "error: unrecognised (code 0)"  # the reason's free text is never stored
    assert set(results.phases["downstream"].last.sites) == {"site-0", "site-2"}
    assert results.sites == {"site-0": 101, "site-2": 103}
    # a silent site (timeout) counts as failed the same way
    _, results = run_workflow(
        stores, tmp_path / "t", toy_config(tmp_path / "t", phases="pretrain"), fail={103: "timeout"}
    )
    assert results.phases["pretrain"].rounds[0].failed == {"node-103": "no reply before round-timeout"}
    assert set(results.phases["pretrain"].rounds[0].sites) == {"site-0", "site-1"}
    # beyond the tolerance the run stops with a clear error and a results.json saying so
    with pytest.raises(FedstError, match="2 sites failed or rejected \\(failure-tolerance 1\\)"):
        run_workflow(
            stores, tmp_path / "f", toy_config(tmp_path / "f", phases="pretrain"), fail={102: "x", 103: "timeout"}
        )
    saved = load_results(tmp_path / "f" / "runs" / "r" / "results.json")
    assert saved.status == "failed" and "failure-tolerance" in saved.error
    assert saved.phases["pretrain"].rounds[-1].failed == {
        "node-102": "error: unrecognised (code 0)",
        "node-103": NO_REPLY,
    }  # the last round


def test_a_site_with_the_wrong_panel_is_excluded_with_its_reason(stores, tmp_path):
    consortium = tmp_path / "consortium"
    consortium.mkdir()
    (consortium / "panel.txt").write_text("\n".join(PANEL) + "\n")
    other = write_toy_store(
        tmp_path / "other",
        n_spots=24,
        n_tiles=16,
        panel=[*PANEL[:-1], "XIST"],
        patch_px=16,
        missing_gene_in_section_b=False,
    )
    config = toy_config(tmp_path, phases="pretrain", consortium=str(consortium))
    _, results = run_workflow([stores[0], stores[1], other.path], tmp_path, config)
    row = results.phases["pretrain"].rounds[0]
    assert row.failed["node-103"] == "error: panel-mismatch (code 0)"  # the category leaves the site, not the genes
    saved = (tmp_path / "runs" / "r" / "results.json").read_text()
    assert "XIST" not in saved and str(other.path) not in saved
    local = (tmp_path / "work-2" / "site-errors.log").read_text()  # the details stay on the site
    assert "has 'XIST' where the consortium has 'G5'" in local and "Traceback" in local


def _tensor_count(state: dict) -> int:
    return sum(int(np.prod(v.shape)) for v in state.values())


@pytest.mark.parametrize("federated_adapt", [False, True])
def test_privacy_contract_every_reply(stores, tmp_path, federated_adapt):
    consortium = tmp_path / "consortium"
    consortium.mkdir()
    (consortium / "panel.txt").write_text("\n".join(PANEL) + "\n")
    config = toy_config(tmp_path, consortium=str(consortium), **{"federated-adapt": federated_adapt})
    grid, results = run_workflow(stores, tmp_path, config)
    assert results.status == "completed"
    central = set(toy.initial_state(0))
    adapter = set(toy.build_adapter(len(PANEL)).state_dict())
    assert len(grid.replies) == 3 * (2 + 1 + 1 + 1)
    for reply in grid.replies:
        kind = reply.metadata.message_type
        content = reply.content
        assert not reply.has_error(), reply.error
        assert list(content.config_records.keys()) == ["site"]  # the declared name, nothing else
        assert dict(content.config_records["site"]) == {"name": f"site-{reply.metadata.src_node_id - 101}"}
        assert len(content.metric_records) == 1
        for value in next(iter(content.metric_records.values())).values():
            assert isinstance(value, (int, float))  # scalars only, no lists
        if kind == "train.pretrain":
            (record,) = content.array_records.values()
            assert set(record.keys()) == central
        elif kind == "train.adapt" and federated_adapt:
            (record,) = content.array_records.values()
            assert set(record.keys()) == adapter
        else:
            assert len(content.array_records) == 0, kind
    # nothing of the data crosses: the bytes sent are model-sized
    for reply in grid.replies:
        for record in reply.content.array_records.values():
            assert _tensor_count({k: v.numpy() for k, v in record.items()}) <= _tensor_count(toy.initial_state(0))


def test_reply_record_refuses_non_model_tensors_and_non_scalars():
    state = {"w": np.zeros(2)}
    with pytest.raises(FedstError, match="privacy contract"):
        reply_record({"loss": 1.0}, {"w": np.zeros(2), "expression": np.ones(5)}, allowed_keys={"w"})
    with pytest.raises(FedstError, match="metric 'coords' is not a scalar"):
        reply_record({"coords": [1.0, 2.0]}, state, allowed_keys={"w"})
    assert set(reply_record({"loss": 1}, state, {"w"}).array_records["arrays"].keys()) == {"w"}
    assert dict(reply_record({"loss": 1}, site="st-gallen_2.a").config_records["site"]) == {"name": "st-gallen_2.a"}
    for bad in ("St Gallen", "x" * 65, "", "a/b", "ü"):
        with pytest.raises(FedstError, match="not a site name"):
            reply_record({"loss": 1}, site=bad)


def test_run_directory_and_site_reports(stores, tmp_path):
    _, results = run_workflow(stores, tmp_path, toy_config(tmp_path))
    run_dir = tmp_path / "runs" / "r"
    for name in ("results.json", "resolved-config.json", "summary.md", "loss_per_round.png", "downstream_per_site.png"):
        assert (run_dir / name).is_file(), name
    saved = load_results(run_dir)
    assert saved == results and saved.status == "completed" and len(saved.phases["downstream"].last.sites) == 3
    assert {"real-pcc", "augmented-pcc"} <= set(saved.phases["downstream"].last.aggregate)
    assert [block.kind for block in saved.phases.values()] == ["train", "broadcast", "broadcast", "broadcast"]
    assert (run_dir / "checkpoints" / "pretrain" / "round-0002" / "model.safetensors").is_file()
    for i in range(3):
        report = tmp_path / f"work-{i}" / "report"
        assert (report / "samples_real_vs_synthetic.png").is_file() and "DP" in (report / "report.md").read_text()
    summary = (run_dir / "summary.md").read_text()
    assert "| site-0 |" in summary and "| site-2 |" in summary and "node-10" not in summary
    assert "backend `toy`, preset `tiny`, strategy `fedavg`, patch 16 px, seed 0" in summary


# -- site names in reports ---------------------------------------------------------------------------------
def test_site_names_declared_validated_and_derived(tmp_path):
    run = RunConfig()
    node = NodeConfig.from_mapping(
        {"data-path": str(tmp_path), "work-dir": str(tmp_path / "w"), "site": "basel-2"}, run
    )
    assert node.site == "basel-2"
    with pytest.raises(FedstError, match=r"node config 'site': 'Basel Hospital' is not a site name \(expected 1-64"):
        NodeConfig.from_mapping(
            {"data-path": str(tmp_path), "work-dir": str(tmp_path / "w"), "site": "Basel Hospital"}, run
        )
    toml = tmp_path / "bad" / "site.toml"
    toml.parent.mkdir()
    toml.write_text('site = "zürich/1"\n')
    with pytest.raises(FedstError, match=r"site.toml: 'site' 'zürich/1' is not a site name"):
        NodeConfig.from_mapping({"data-path": str(toml), "work-dir": str(tmp_path / "w")}, run)
    toml.write_text('site = "basel\n')  # read by the ingest's SITE.toml reader: the same error as `fedst prepare`
    with pytest.raises(FedstError, match=r"site.toml: not valid TOML"):
        NodeConfig.from_mapping({"data-path": str(toml), "work-dir": str(tmp_path / "w")}, run)
    derived = tmp_path / "my store (v2)"
    derived.mkdir()
    assert (
        NodeConfig.from_mapping({"data-path": str(derived), "work-dir": str(tmp_path / "w")}, run).site
        == "my-store--v2-"
    )


def test_reports_use_declared_names_duplicates_and_earlier_names(stores, tmp_path):
    config = toy_config(tmp_path, phases="pretrain,downstream", **{"rounds-pretrain": 1})
    nodes = {
        101: {"data-path": str(stores[0]), "work-dir": str(tmp_path / "w0"), "site": "basel"},
        102: {"data-path": str(stores[1]), "work-dir": str(tmp_path / "w1"), "site": "basel"},
        103: {"data-path": str(stores[2]), "work-dir": str(tmp_path / "w2"), "site": "geneva"},
    }
    with LocalGrid(client_app, nodes, config) as grid:
        workflow = Workflow(grid, RunConfig.from_mapping(config), tmp_path / "runs" / "r")
        workflow.pretrain()
        row = workflow.results.phases["pretrain"].rounds[0]
        assert set(row.sites) == {"basel@node-101", "basel@node-102", "geneva"}  # duplicates told apart
        grid.fail[103] = "timeout"  # silent in a later phase: keeps the name it declared earlier
        block = workflow.broadcast("downstream", "evaluate.downstream", RecordDict())
        assert block.failed == {"geneva": "no reply before round-timeout"}
        assert set(block.sites) == {"basel@node-101", "basel@node-102"}


def test_server_discards_replies_with_a_bad_name_or_extra_records(stores, tmp_path):
    def tamper(node: int, reply: Message) -> Message:
        if reply.has_error():
            return reply
        if node == 102:
            reply.content["site"] = ConfigRecord({"name": "Basel; DROP TABLE"})
        if node == 103:
            reply.content["coords"] = ConfigRecord({"x": [1.0, 2.0]})
        return reply

    config = toy_config(
        tmp_path, phases="pretrain,downstream", **{"rounds-pretrain": 1, "min-sites": 1, "failure-tolerance": 2}
    )
    _, results = run_workflow(stores, tmp_path, config, tamper=tamper)
    row = results.phases["pretrain"].rounds[0]
    assert set(row.sites) == {"site-0"}
    assert "is not a site name" in row.rejected["node-102"]  # an invalid name is not learned
    assert "unexpected ConfigRecord(s) ['coords']" in row.rejected["site-2"]
    failed = results.phases["downstream"].last.failed
    assert "privacy contract" in failed["node-102"] and "coords" in failed["site-2"]


def test_local_grid_scopes_flowers_task_identity(stores, tmp_path):
    """The in-process grid lends the ServerApp side an identity for its block only; Flower's class keeps its own."""
    from flwr.supercore.task_identity import TaskIdentity

    before = {name: vars(TaskIdentity)[name] for name in ("_run_id", "_node_id", "_task_id")}
    with make_grid(stores, tmp_path, toy_config(tmp_path), run_id=7):
        assert (TaskIdentity.run_id, TaskIdentity.node_id) == (7, 0)
        assert Message(RecordDict(), message_type="train.pretrain", dst_node_id=101).metadata.run_id == 7
    assert {name: vars(TaskIdentity)[name] for name in before} == before


@pytest.mark.parametrize("damaged", ["model.safetensors", "strategy.safetensors", "state.json"])
def test_truncated_checkpoint_is_an_error_naming_the_file(tmp_path, damaged):
    from server.checkpoint import load_checkpoint, save_checkpoint

    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    folder = save_checkpoint(tmp_path, "pretrain", 1, weights, {"m": np.zeros(3, np.float32)}, {"fingerprint": {}})
    round_, arrays, _, _ = load_checkpoint(tmp_path, "pretrain")
    assert round_ == 1 and np.array_equal(arrays["w"], weights["w"])
    path = folder / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(FedstError, match=rf"{path}: checkpoint is unreadable"):
        load_checkpoint(tmp_path, "pretrain")
