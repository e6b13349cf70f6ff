"""Experiment harness: config parsing and errors, the cell grid, resumability, and a micro end-to-end run."""

from __future__ import annotations

import json
import math
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

from server.experiment.config import load_config, resolve_config_path, resolve_sites
from server.experiment.planner import Cell, plan
from server.experiment.runner import run_experiment
from shared.config import RunConfig
from shared.errors import FedstError


def _site_toml(path: Path, ids: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f'[[sections]]\nid = "{i}"\nformat = "h5ad"\nh5ad = "{i}.h5ad"\nimage = "{i}.tif"\n\n' for i in ids)
    path.write_text(body)
    return path


def _config(tmp_path: Path, body: str) -> Path:
    _site_toml(tmp_path / "a" / "site.toml", ["A1", "A2", "A3"])
    _site_toml(tmp_path / "b" / "site.toml", ["B1", "B2"])
    path = tmp_path / "exp.toml"
    path.write_text(textwrap.dedent(body))
    return path


BASE = """
    name = "t"
    fractions = [0.5, 0.1, 1.0]
    seeds = [0, 1]
    [[sites]]
    name = "hospital-a"
    sections = ["a/site.toml#A1", "a/site.toml#A2", "b/site.toml#B2"]
    held_out = ["A2"]
    [[sites]]
    name = "hospital-b"
    sections = ["b/site.toml#B1", {id = "X9", format = "h5ad", h5ad = "x/X9.h5ad", image = "x/X9.tif"}]
    held_out = ["X9"]
    [run.dp]
    epsilon = 8.0
"""


def test_config_parses_any_split_of_sections(tmp_path):
    config = load_config(_config(tmp_path, BASE))
    assert config.fractions == (0.1, 0.5, 1.0)  # sorted
    assert config.arms == ("local", "federated", "federated-adapt", "pooled") and config.dp == (False, True)
    sites = resolve_sites(config)
    assert [s.name for s in sites] == ["hospital-a", "hospital-b"]
    assert sites[0].section_ids == ["A1", "A2", "B2"] and sites[0].train_sections == ["A1", "B2"]
    assert sites[1].held_out == ("X9",)
    # paths of SITE.toml sections and of inline sections become absolute, relative to their own file
    assert sites[0].sections[0]["h5ad"] == str((tmp_path / "a" / "A1.h5ad").resolve())
    assert sites[1].sections[1]["image"] == str((tmp_path / "x" / "X9.tif").resolve())


def test_cli_overrides_take_precedence_over_file(tmp_path):
    path = _config(tmp_path, BASE + "\n[run.adapt]\nsteps = 7\n")
    overrides = [
        "run.adapt.steps=3",
        "run.synthesize.guidance=1.25",
        "seeds=[5]",
        "predictor.kind=mlp",
        "arms=['local']",
    ]
    config = load_config(path, overrides)
    assert config.run.adapt.steps == 3 and config.seeds == (5,) and config.predictor.kind == "mlp"
    assert config.run.synthesize.guidance == 1.25 and config.arms == ("local",)
    assert load_config(path).run.adapt.steps == 7  # file beats the default (60)
    assert load_config(path).run.pretrain.rounds == RunConfig().pretrain.rounds  # the federation's default
    assert load_config(path, ["run.rounds-pretrain=5"]).run.pretrain.rounds == 5  # legacy keys too (one alias table)


def test_experiment_embeds_the_federation_run_config_unchanged(tmp_path):
    body = BASE.replace("epsilon = 8.0", "epsilon = 4.0") + "\n[run]\npatch-px = 16\n[run.pretrain]\nrounds = 3\n"
    config = load_config(_config(tmp_path, body))
    expected = RunConfig.from_mapping({"patch-px": 16, "pretrain": {"rounds": 3}, "dp": {"epsilon": 4.0}})
    assert config.run == expected
    # the shipped configs set every value where the experiment differs from the federation's defaults
    shipped = load_config("synthetic").run
    assert (shipped.synthesize.guidance, shipped.synthesize.perturb, shipped.synthesize.steps) == (1.5, "mixup", 20)
    assert (shipped.pretrain.rounds, shipped.pretrain.steps, shipped.adapt.steps, shipped.adapt.batch_size) == (
        2,
        150,
        250,
        16,
    )
    assert (shipped.dp.epsilon, shipped.dp.delta, shipped.adapt.lr) == (8.0, 0.0, 1e-3)


@pytest.mark.parametrize(
    "patch, message",
    [
        (BASE.replace('"a/site.toml#A2"', '"a/site.toml#A7"'), "unknown section 'A7'"),
        (BASE.replace('held_out = ["X9"]', 'held_out = ["Q1"]'), "held-out section 'Q1' is not in any site"),
        (BASE.replace('held_out = ["X9"]', 'held_out = ["A1"]'), "belongs to site 'hospital-a'"),
        (BASE.replace('held_out = ["A2"]', 'held_out = ["A1", "A2", "B2"]'), "every section is held out"),
        (BASE.replace('"b/site.toml#B1", ', '"b/site.toml#B2", '), "listed in site 'hospital-a' and again"),
        (BASE.replace("b/site.toml#B1", "nowhere/site.toml"), "does not exist"),
    ],
)
def test_bad_sites_are_clear_errors(tmp_path, patch, message):
    config = load_config(_config(tmp_path, patch))
    with pytest.raises(FedstError, match=message):
        resolve_sites(config)


@pytest.mark.parametrize(
    "patch, message",
    [
        (BASE.replace("[0.5, 0.1, 1.0]", "[0.5, 0.0]"), r"fraction 0.0 .* out of range"),
        (BASE.replace("[0.5, 0.1, 1.0]", "[1.5]"), r"fraction 1.5 .* out of range"),
        (BASE.replace("seeds = [0, 1]", 'arms = ["local", "central"]'), "unknown arm 'central'"),
        (BASE.replace("seeds = [0, 1]", "seedz = [0]"), "unknown key"),
        (BASE + "\n[run.adapt]\nsteps = 'many'\n", r"\[run\]: run config key 'adapt.steps' is 'many'; .*integer"),
        (BASE + "\n[predictor]\ntop_k = 1\n", "top_k must be >= 2"),
        (BASE + "\n[run.adapt]\nstep = 3\n", r"\[run\]: run config: unknown key 'adapt.step'"),
        (BASE + "\n[model]\nadapt_steps = 3\n", r"unknown key\(s\) model .*run"),
        (BASE.replace("epsilon = 8.0", "epsilon = 0.0"), r"\[run.dp\]: epsilon must be > 0"),
        (
            BASE.replace("epsilon = 8.0", "epsilon = 0.0").replace("seeds = [0, 1]", 'arms = ["federated-adapt"]'),
            r"\[run.dp\]: epsilon must be > 0 for the DP variants of the federated arms \(federated-adapt;",
        ),
        (BASE.replace('name = "hospital-b"', 'name = "hospital b/2"'), r"'hospital b/2' is not a site name"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path, patch, message):
    with pytest.raises(FedstError, match=message):
        load_config(_config(tmp_path, patch))


def test_config_accepts_the_federated_adapt_arm(tmp_path):
    from server.experiment.config import adapt_steps_per_round

    path = _config(tmp_path, BASE + "\n[run.adapt]\nsteps = 30\nrounds = 2\n")
    config = load_config(path, ["arms=['local', 'federated-adapt']"])
    assert config.arms == ("local", "federated-adapt") and config.dp == (False, True)
    # epsilon 0 is fine while no DP variant is asked for
    assert load_config(path, ["arms=['federated-adapt']", "dp=false", "run.dp.epsilon=0.0"]).dp == (False,)
    with pytest.raises(FedstError, match=r"unknown arm 'federated_adapt' .*federated, federated-adapt, pooled"):
        load_config(path, ["arms=['federated_adapt']"])
    # the same optimiser steps per site as the federated arm: rounds x ceil(steps / rounds)
    assert adapt_steps_per_round(30, 2) == 15 and adapt_steps_per_round(3, 2) == 2 and adapt_steps_per_round(1, 4) == 1
    for name in ("synthetic", "her2st"):  # read as TOML: her2st's data need not be present for this
        raw = tomllib.loads(resolve_config_path(name).read_text())
        adapt = RunConfig.from_mapping(raw["run"]).adapt
        assert "federated-adapt" in raw["arms"]  # the arm turns adapt.federated on for its inner run
        assert adapt.rounds >= 2 and adapt.rounds * adapt_steps_per_round(adapt.steps, adapt.rounds) == adapt.steps


def test_shipped_configs_resolve_by_name():
    assert resolve_config_path("synthetic").name == "synthetic.toml"
    assert resolve_config_path("her2st").name == "her2st.toml"
    with pytest.raises(FedstError, match="shipped configs: .*her2st.*synthetic"):
        resolve_config_path("nonexistent-config")
    for name in ("synthetic", "her2st"):
        load_config(name)  # parses and validates


def test_her2st_config_sites_are_patient_c_sections(shared_data):
    sites = resolve_sites(load_config("her2st"))
    ids = sorted(i for s in sites for i in s.section_ids)
    assert ids == ["C2", "C3", "C4", "C5", "C6"]
    assert all(s.held_out and s.train_sections for s in sites)
    assert all(Path(t["counts"]).is_file() and Path(t["image"]).is_file() for s in sites for t in s.sections)


def test_planner_grid(tmp_path):
    config = load_config(_config(tmp_path, BASE))
    cells = plan(config)
    # local and pooled: dp off only; federated and federated-adapt: both DP variants
    assert len(cells) == 2 * 3 * (1 + 2 + 2 + 1)
    assert len({c.key for c in cells}) == len(cells)
    assert not any(c.dp for c in cells if c.arm not in ("federated", "federated-adapt"))
    for arm in ("federated", "federated-adapt"):
        assert {(c.dp, c.fraction) for c in cells if c.arm == arm and c.seed == 1} == {
            (dp, f) for dp in (False, True) for f in (0.1, 0.5, 1.0)
        }
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)  # seed-major
    # within a seed: local, federated, federated-adapt (adjacent to federated: one cached central), pooled
    assert list(dict.fromkeys(c.arm for c in cells if c.seed == 0)) == [
        "local",
        "federated",
        "federated-adapt",
        "pooled",
    ]
    adapt_dp = Cell(seed=0, arm="federated-adapt", dp=True, fraction=0.1)
    assert adapt_dp.key == "federated-adapt-dp-f0.1000-s0" and adapt_dp.variant == "federated-adapt+dp"
    assert adapt_dp.key != Cell(seed=0, arm="federated", dp=True, fraction=0.1).key
    only_adapt = plan(load_config(_config(tmp_path, BASE), ["arms=['federated-adapt']", "dp=true"]))
    assert {(c.arm, c.dp) for c in only_adapt} == {("federated-adapt", True)} and len(only_adapt) == 6
    only_local = plan(load_config(_config(tmp_path, BASE), ["arms=['local']", "dp=true"]))
    assert {c.arm for c in only_local} == {"local"} and len(only_local) == 6


def _fake_cell_factory(calls: list[str]):
    """A deterministic cell function: metrics depend only on (arm, dp, fraction, seed)."""

    def cell_fn(cell: Cell, workdir: Path) -> dict:
        calls.append(cell.key)
        rng = np.random.default_rng([cell.seed, int(cell.fraction * 1000), len(cell.arm), int(cell.dp)])
        base = {"local": 0.2, "federated": 0.3, "federated-adapt": 0.35, "pooled": 0.4}[cell.arm] + 0.2 * cell.fraction
        sites = {}
        for site in ("s1", "s2"):
            sites[site] = {"PCC": base + 0.01 * rng.standard_normal(), "MSE": 1 - base, "GSC": base, "SSC": base / 2}
            if cell.dp:
                sites[site]["epsilon"] = 2.0 + cell.fraction
        (workdir / "marker.txt").write_text(cell.key)
        return {"sites": sites}

    return cell_fn


def test_resume_skips_finished_cells_and_gives_identical_results(tmp_path):
    config = load_config(_config(tmp_path, BASE))
    calls_a: list[str] = []
    run_experiment(
        config, tmp_path / "uninterrupted", cell_fn=_fake_cell_factory(calls_a), log=lambda s: None, figures=False
    )
    full = json.loads((tmp_path / "uninterrupted" / "results.json").read_text())

    out = tmp_path / "resumed"
    calls_b: list[str] = []
    run_experiment(
        config, out, cell_fn=_fake_cell_factory(calls_b), log=lambda s: None, limit=5, figures=False
    )  # "killed" after 5
    partial = json.loads((out / "results.json").read_text())
    assert partial["cells_finished"] == 5 and not partial["complete"]
    assert len(calls_b) == 5
    run_experiment(config, out, cell_fn=_fake_cell_factory(calls_b), log=lambda s: None, figures=False)
    assert len(calls_b) == len(calls_a) == len(plan(config))  # the first 5 were not recomputed
    assert len(set(calls_b)) == len(calls_b)
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["complete"] and resumed["sites"] == full["sites"] and resumed["overall"] == full["overall"]

    # a crash in the middle of a cell (a kill) leaves the finished cells and no partial result behind
    crash_out = tmp_path / "crashed"
    calls_d: list[str] = []
    inner = _fake_cell_factory(calls_d)

    def crashing(cell, workdir):
        if len(calls_d) == 3:
            (workdir / "half-written.bin").write_bytes(b"x")
            raise KeyboardInterrupt
        return inner(cell, workdir)

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, crash_out, cell_fn=crashing, log=lambda s: None, figures=False)
    assert len(list((crash_out / "cells").glob("*.json"))) == 3
    run_experiment(config, crash_out, cell_fn=inner, log=lambda s: None, figures=False)
    assert len(calls_d) == len(plan(config)) and len(set(calls_d)) == len(calls_d)
    assert not list((crash_out / "cells").rglob("half-written.bin"))
    assert json.loads((crash_out / "results.json").read_text())["sites"] == full["sites"]

    # a different config must not continue into the same folder; --fresh discards and recomputes
    other = load_config(_config(tmp_path, BASE), ["seeds=[0]"])
    with pytest.raises(FedstError, match="different config"):
        run_experiment(other, out, cell_fn=_fake_cell_factory([]), log=lambda s: None, figures=False)
    calls_c: list[str] = []
    run_experiment(other, out, resume=False, cell_fn=_fake_cell_factory(calls_c), log=lambda s: None, figures=False)
    assert len(calls_c) == len(plan(other))


def test_report_aggregates_mean_sd_and_per_seed(tmp_path):
    config = load_config(_config(tmp_path, BASE))
    out = tmp_path / "run"
    report = run_experiment(config, out, cell_fn=_fake_cell_factory([]), log=lambda s: None)
    results = json.loads((out / "results.json").read_text())
    entry = results["sites"]["s1"]["local"]["no-dp"]["0.1"]["PCC"]
    seeds = [entry["per_seed"]["0"], entry["per_seed"]["1"]]
    assert entry["mean"] == pytest.approx(np.mean(seeds)) and entry["sd"] == pytest.approx(np.std(seeds, ddof=1))
    assert results["sites"]["s2"]["federated"]["dp"]["0.5"]["epsilon"]["mean"] == pytest.approx(2.5)
    assert set(results["overall"]) == {
        "local",
        "federated",
        "federated+dp",
        "federated-adapt",
        "federated-adapt+dp",
        "pooled",
    }
    # per-site epsilon per DP variant (both federated arms report one)
    assert set(results["epsilon"]["s1"]) == {"federated+dp", "federated-adapt+dp"}
    assert results["epsilon"]["s1"]["federated-adapt+dp"]["0.5"]["mean"] == pytest.approx(2.5)
    overall = results["overall"]["pooled"]["1"]["MSE"]
    assert overall["mean"] == pytest.approx(1 - 0.6) and overall["sd"] == pytest.approx(0.0)
    text = report.read_text()
    for phrase in ("## Protocol", "gene_selection", "training sections only", "log1p", "held-out", "per slide"):
        assert phrase in text
    assert "| federated-adapt+dp | 0.1 |" in text and "federated-adapt = the same central model" in text
    assert (out / "report" / "metrics_vs_fraction.png").stat().st_size > 10_000
    assert (out / "report" / "epsilon_per_site.png").is_file()


MICRO = [  # the shipped `synthetic` config, scaled down to about a minute (the full one: README, "experiment")
    "arms=['local', 'federated', 'pooled']",  # federated-adapt: test_federated_adapt_cell_goes_through_flower
    "synthetic.n_sites=2",
    "fractions=[0.1, 1.0]",
    "seeds=[0]",
    "dp=[true]",
    "run.patch-px=16",
    "store.max_tiles_per_section=16",
    "run.pretrain.rounds=1",
    "run.pretrain.steps=2",
    "run.adapt.steps=3",
    "federated.min_synthetic=8",
    "federated.synthetic_per_spot=0.25",
    "run.synthesize.steps=2",
    "predictor.top_k=12",
    "report.heatmap_genes=2",
    "report.grid_patches=4",
]


def test_micro_experiment_end_to_end(tmp_path):
    """The shipped `synthetic` config, scaled down: real arms on a generated 2-site consortium (store prep, Flower
    pretraining, DP adaptation, synthesis, ridge predictors, shared metrics, report). Then checks what the
    generative model guarantees (see below)."""
    config = load_config("synthetic", MICRO)
    assert (config.run.dp.epsilon, config.predictor.kind, config.run.synthesize.perturb) == (8.0, "ridge", "mixup")
    out = tmp_path / "run"
    lines: list[str] = []
    report = run_experiment(config, out, log=lines.append)
    results = json.loads((out / "results.json").read_text())

    # structure
    assert results["complete"] and results["cells_finished"] == results["cells_total"] == 2 + 2 + 2
    assert set(results["sites"]) == {"site-0", "site-1"}
    for site in ("site-0", "site-1"):
        by_arm = results["sites"][site]
        assert set(by_arm) == {"local", "federated", "pooled"} and set(by_arm["federated"]) == {"dp"}
        for arm, dp_key in (("local", "no-dp"), ("pooled", "no-dp"), ("federated", "dp")):
            for fk in ("0.1", "1"):
                entry = by_arm[arm][dp_key][fk]
                for metric in ("PCC", "MSE", "GSC", "SSC"):
                    assert set(entry[metric]) >= {"mean", "sd", "n", "per_seed"} and entry[metric]["n"] == 1
                    assert math.isfinite(entry[metric]["mean"])
                assert -1 <= entry["PCC"]["mean"] <= 1 and entry["MSE"]["mean"] >= 0
        eps = by_arm["federated"]["dp"]["0.1"]["epsilon"]["mean"]
        assert 0 < eps <= 8.0 + 1e-6  # spent epsilon, read from the accountant, within the target
    assert set(results["overall"]) == {"local", "federated+dp", "pooled"}
    assert "held-out" in results["protocol"]["splits"]
    for png in (
        "metrics_vs_fraction.png",
        "metrics_vs_fraction_per_site.png",
        "heatmaps_site-0.png",
        "patches_site-1.png",
        "epsilon_per_site.png",
    ):
        assert (out / "report" / png).stat().st_size > 5_000, png
    text = report.read_text()
    assert "## Protocol" in text and "training sections only" in text and "![metrics_vs_fraction]" in text
    assert any("results.json" in line for line in lines) and any("[6/6]" in line for line in lines)
    central = json.loads((out / "cache" / "central" / "seed-0" / "done.json").read_text())
    assert central["route"].startswith("flower")  # pretrained once for the seed through the federation workflow

    # What the generative model says must hold. Sites share the cell-type biology that ties a spot's nuclei
    # (image) to its expression; sites differ only by stain rotation and per-gene batch factors (an additive
    # shift after log1p, invisible to per-slide PCC). So with the same predictor, more real spots from the same
    # mapping cannot hurt in expectation: pooling both sites' 10% subsets (2x the spots) must score a PCC at
    # least as high as each site's own 10%, averaged over sites (a small tolerance for one seed).
    pcc = {arm: results["overall"][arm]["0.1"]["PCC"]["mean"] for arm in ("local", "pooled")}
    assert pcc["pooled"] >= pcc["local"] - 0.02, pcc
    # and a site's full training section must beat 10% of it for the local arm (by the same argument)
    assert results["overall"]["local"]["1"]["PCC"]["mean"] > pcc["local"], results["overall"]["local"]
    # the predictor genuinely learns the image->expression map on this data (not chance)
    assert results["overall"]["local"]["1"]["PCC"]["mean"] > 0.2

    # resuming a finished experiment recomputes nothing and reports the same numbers
    again: list[str] = []
    run_experiment(config, out, log=again.append)
    assert sum("skipped (finished earlier)" in line for line in again) == 6
    assert json.loads((out / "results.json").read_text())["sites"] == results["sites"]


ADAPT_MICRO = [  # one fraction of the shipped `synthetic` config, the three arms that adapt or compare to local
    "arms=['local', 'federated', 'federated-adapt']",
    "synthetic.n_sites=2",
    "fractions=[0.5]",
    "seeds=[0]",
    "dp=[true]",
    "run.patch-px=16",
    "store.max_tiles_per_section=16",
    "run.pretrain.rounds=1",
    "run.pretrain.steps=2",
    "run.adapt.steps=4",
    "run.adapt.rounds=2",
    "run.dp.deterministic-noise=true",  # so the test can recompute the adapters bit for bit
    "federated.min_synthetic=8",
    "federated.synthetic_per_spot=0.25",
    "run.synthesize.steps=2",
    "predictor.top_k=12",
    "report.heatmap_genes=2",
    "report.grid_patches=4",
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_federated_adapt_cell_goes_through_flower(tmp_path, one_torch_thread):
    """A federated-adapt cell adapts through the federation's Workflow (LocalGrid, the real ClientApp): the inner
    run's adapt phase has rounds x sites accepted updates, the server's average is what every site's last round
    started from (reproduced here from the round-1 checkpoint), the records match the federated arm's plus
    adapt_rounds, and the DP epsilon is the site's ledger after both rounds (calibrated for both together)."""
    from safetensors.numpy import load_file

    from server.results import load_results
    from shared.backends.c2l import C2LBackend
    from shared.seeds import site_seed
    from shared.store.format import PatchStore

    config = load_config("synthetic", ADAPT_MICRO)
    out = tmp_path / "run"
    report = run_experiment(config, out, log=lambda s: None)
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["cells_total"] == 1 + 1 + 1
    assert set(results["overall"]) == {"local", "federated+dp", "federated-adapt+dp"}
    key = Cell(seed=0, arm="federated-adapt", dp=True, fraction=0.5).key
    cell = json.loads((out / "cells" / f"{key}.json").read_text())
    federated = json.loads((out / "cells" / f"{Cell(0, 'federated', True, 0.5).key}.json").read_text())
    sites = ["site-0", "site-1"]

    # it went through Flower: the inner run's adapt phase, 2 rounds, every site accepted in each
    root = out / "cells" / key / "flower"
    run_dir = root / "flower-run"
    assert cell["adaptation"]["route"].startswith("flower") and cell["adaptation"]["run_dir"].endswith("flower-run")
    record = load_results(run_dir)
    assert record.status == "completed" and list(record.phases) == ["adapt"]
    phase = record.phases["adapt"]
    assert phase.kind == "train" and [r.round for r in phase.rounds] == [1, 2]
    for r in phase.rounds:
        assert sorted(r.sites) == sites and not r.failed and not r.rejected
    inner = RunConfig.from_mapping(json.loads((run_dir / "resolved-config.json").read_text()))
    assert inner.adapt.federated and inner.phase_list == ["adapt"] and inner.adapt.steps == 2  # 2 rounds x 2 = 4
    assert inner.paths.warm_start.endswith("cache/central/seed-0/model/model.safetensors")
    assert (Path(inner.paths.consortium) / "panel.txt").read_text().split() == PatchStore(
        out / "cache" / "sites" / "site-0" / "train"
    ).panel

    # per-site records: the federated arm's keys plus adapt_rounds; the same optimiser steps per site
    for site in sites:
        mine, theirs = cell["sites"][site], federated["sites"][site]
        assert set(mine) == set(theirs) | {"adapt_rounds"}, set(mine) ^ set(theirs)
        assert mine["adapt_rounds"] == 2 and mine["adapt_steps"] == theirs["adapt_steps"] == 4
        assert mine["n_train_spots"] == theirs["n_train_spots"] and mine["n_synthetic"] == theirs["n_synthetic"]
        assert math.isfinite(mine["PCC"]) and isinstance(mine["audit_passed"], bool)
        per_round = [r.sites[site]["epsilon"] for r in phase.rounds]  # the site's ledger: cumulative
        assert 0 < per_round[0] < per_round[1] <= 8.0 * (1 + 1e-6) and per_round[1] > 7.5  # calibrated for both
        assert mine["epsilon"] == pytest.approx(per_round[-1])
        assert results["epsilon"][site]["federated-adapt+dp"]["0.5"]["mean"] == pytest.approx(mine["epsilon"])

    # every site's last round started from the round-1 FedAvg of the sites' modulations: adapting that average
    # with the site's round-2 seed reproduces its final adapter; starting from zero (a purely local adaptation
    # with the same seed) does not; and the final average is the spot-weighted mean of the sites' adapters
    backend = C2LBackend(inner)
    central = load_file(str(out / "cache" / "central" / "seed-0" / "model" / "model.safetensors"))
    average_1 = load_file(str(run_dir / "checkpoints" / "adapt" / "round-0001" / "model.safetensors"))
    finals, weights = {}, {}
    for site in sites:
        store = PatchStore(out / "cells" / key / site / "real")
        finals[site] = load_file(str(root / "sites" / site / "adapter.safetensors"))
        weights[site] = phase.rounds[1].sites[site]["num-examples"]
        assert weights[site] == store.n_spots == cell["sites"][site]["n_train_spots"]
        seed = site_seed(0, site, "adapt", 2)
        again, _ = backend.adapt(central, store, inner.adapt, inner.dp, seed=seed, adapter_state=average_1)
        alone, _ = backend.adapt(central, store, inner.adapt, inner.dp, seed=seed)
        assert set(again) == set(finals[site]) == set(average_1)
        for name in finals[site]:
            np.testing.assert_allclose(again[name], finals[site][name], rtol=0, atol=1e-6)
        assert max(float(np.abs(alone[k] - finals[site][k]).max()) for k in alone) > 1e-4
    average_2 = load_file(str(run_dir / "federated-adapter.safetensors"))
    total = sum(weights.values())
    for name, value in average_2.items():
        expected = sum(weights[s] * finals[s][name].astype(np.float64) for s in sites) / total
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)

    # the report shows the new arm: headline and per-site tables, audit, figures
    text = report.read_text()
    assert "| federated-adapt+dp | 0.5 |" in text and "| site-0 | federated-adapt+dp | 0.5 |" in text
    for png in (
        "metrics_vs_fraction.png",
        "metrics_vs_fraction_per_site.png",
        "heatmaps_site-0.png",
        "patches_site-1.png",
        "epsilon_per_site.png",
    ):
        assert (out / "report" / png).stat().st_size > 5_000, png


def test_cli_reports_bad_config_as_one_error_line(tmp_path):
    import subprocess
    import sys

    bad = _config(tmp_path, BASE.replace("[0.5, 0.1, 1.0]", "[2.0]"))
    for target in (str(bad), "no-such-config"):
        proc = subprocess.run(
            [sys.executable, "-m", "shared.cli.main", "experiment", target, "--out", str(tmp_path / "o")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing written for an invalid config


def _paired_store(path: Path, expression: np.ndarray, brightness: np.ndarray, seed: int = 0):
    """A store whose patch brightness is a known function of ``brightness`` (one value per spot)."""
    import anndata

    from shared import keys
    from shared.store.format import PatchStore, StoreWriter

    rng = np.random.default_rng(seed)
    n = len(expression)
    spots = anndata.AnnData(X=expression.astype(np.float32))
    spots.var_names = [f"G{i}" for i in range(expression.shape[1])]
    spots.obs[keys.SECTION] = ["S1"] * n
    spots.obs[keys.PATCH_INDEX] = np.arange(n)
    with StoreWriter(path, patch_px=16) as writer:
        level = np.clip(40 + 170 * brightness[:, None, None, None] + rng.normal(0, 4, (n, 16, 16, 3)), 0, 255)
        writer.allocate_patches(n)[:] = level.astype(np.uint8)
        writer.set_spots(spots)
    return PatchStore(path)


def test_synthesis_audit_tells_faithful_from_unfaithful_synthetic_pairs(tmp_path):
    from shared.c2l.audit import synthesis_audit

    rng = np.random.default_rng(0)
    signal = rng.uniform(0, 1, 80)
    expression = np.stack([signal * 3, 2 - signal, rng.normal(0, 1, 80)], axis=1)  # genes 0, 1 follow the image
    real = _paired_store(tmp_path / "real", expression, signal)
    genes = np.array([0, 1])
    faithful = _paired_store(tmp_path / "faithful", expression[:40], signal[:40], seed=1)  # images show their genes
    shuffled = _paired_store(tmp_path / "shuffled", expression[:40], rng.permutation(signal[:40]), seed=2)
    good = synthesis_audit(real, faithful, genes, seed=0)
    bad = synthesis_audit(real, shuffled, genes, seed=0)
    assert good["audit_real_pcc"] > 0.9 and good["audit_synthetic_pcc"] > 0.9 and good["audit_passed"] is True
    assert bad["audit_real_pcc"] == pytest.approx(good["audit_real_pcc"])  # same real split and probe
    assert abs(bad["audit_synthetic_pcc"]) < 0.4 and bad["audit_passed"] is False
