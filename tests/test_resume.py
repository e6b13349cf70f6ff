"""Resume never silently restarts: checksummed checkpoints, all-or-nothing writes, and a run directory gate.

Unit tests on server/checkpoint.py, then the real Workflow over the in-process grid with the toy backend (as in
tests/test_federation_core.py): resuming a run that has no checkpoint, or starting afresh over an existing one,
is a clear error before any message is sent or any file written; a run resumed after pretraining finished
continues with adaptation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from shared.config import RunConfig
from shared.errors import FedstError
from tests.helpers import TOY_PANEL, toy_config, write_toy_consortium

pytest.importorskip("flwr")

from server import checkpoint  # noqa: E402
from server.checkpoint import claim_run_dir, load_checkpoint, save_checkpoint  # noqa: E402

WEIGHTS = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
MOMENTS = {"m_t/w": np.full((2, 3), 0.5, np.float32)}


def _save(root: Path, server_round: int = 1) -> Path:
    return save_checkpoint(root, "pretrain", server_round, WEIGHTS, MOMENTS, {"fingerprint": {"seed": 0}})


def _flip_low_bit_of_first_weight(path: Path) -> None:
    """Change one tensor byte so the file still decodes, to finite values (the lowest mantissa bit of a float32)."""
    data = bytearray(path.read_bytes())
    (header,) = struct.unpack("<Q", data[:8])
    data[8 + header] ^= 0x01
    path.write_bytes(bytes(data))


# -- checksums -------------------------------------------------------------------------------------------------
def test_every_checkpoint_records_the_checksums_of_its_files(tmp_path):
    folder = _save(tmp_path)
    state = json.loads((folder / "state.json").read_text())
    for name in ("model.safetensors", "strategy.safetensors"):
        assert state["checksums"][name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    latest = json.loads((folder.parent / "latest.json").read_text())
    assert latest == {
        "round": 1,
        "path": "round-0001",
        "state-sha256": hashlib.sha256((folder / "state.json").read_bytes()).hexdigest(),
    }
    round_, arrays, moments, meta = load_checkpoint(tmp_path, "pretrain")
    assert round_ == 1 and meta["fingerprint"] == {"seed": 0}
    for key, value in WEIGHTS.items():
        np.testing.assert_array_equal(arrays[key], value)
    np.testing.assert_array_equal(moments["m_t/w"], MOMENTS["m_t/w"])


@pytest.mark.parametrize("name", ["model.safetensors", "strategy.safetensors"])
def test_a_flipped_finite_byte_is_an_error_naming_the_file(tmp_path, name):
    from safetensors.numpy import load

    path = _save(tmp_path) / name
    _flip_low_bit_of_first_weight(path)
    tampered = load(path.read_bytes())  # still a valid file of finite weights: only the checksum tells
    assert all(np.isfinite(v).all() for v in tampered.values())
    with pytest.raises(
        FedstError, match=rf"{re.escape(str(path))}: checkpoint is unreadable \(SHA-256 .* recorded in state.json"
    ):
        load_checkpoint(tmp_path, "pretrain")


def test_an_edited_state_json_is_an_error_naming_it(tmp_path):
    path = _save(tmp_path) / "state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "round": 7}, indent=2, sort_keys=True))  # valid JSON, another round
    with pytest.raises(
        FedstError, match=rf"{re.escape(str(path))}: checkpoint is unreadable \(SHA-256 .* recorded in latest.json"
    ):
        load_checkpoint(tmp_path, "pretrain")


@pytest.mark.parametrize(("name", "entry"), [("latest.json", "state-sha256"), ("state.json", "checksums")])
def test_a_checkpoint_without_its_checksums_is_refused(tmp_path, name, entry):
    folder = _save(tmp_path)
    path = folder.parent / name if name == "latest.json" else folder / name
    data = json.loads(path.read_text())
    del data[entry]
    path.write_text(json.dumps(data))
    if name == "state.json":  # keep latest.json's checksum of it current: only the missing entry is wrong
        latest = json.loads((folder.parent / "latest.json").read_text())
        latest["state-sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (folder.parent / "latest.json").write_text(json.dumps(latest))
    with pytest.raises(FedstError, match=rf"{re.escape(str(path))}: checkpoint is unreadable \(no '{entry}' entry\)"):
        load_checkpoint(tmp_path, "pretrain")


# -- all-or-nothing writes -------------------------------------------------------------------------------------
def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "checkpoints" / "pretrain").iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("failing", ["strategy.safetensors", "latest.json"])
def test_a_failed_write_leaves_no_temp_files_and_the_previous_checkpoint_latest(tmp_path, monkeypatch, failing):
    _save(tmp_path, 1)
    real_bytes, real_json = checkpoint.write_bytes_atomic, checkpoint.write_json_atomic

    def writer(real):
        def write(path, *args, **kwargs):
            if Path(path).name == failing:
                raise OSError(28, "No space left on device")
            return real(path, *args, **kwargs)

        return write

    monkeypatch.setattr(checkpoint, "write_bytes_atomic", writer(real_bytes))
    monkeypatch.setattr(checkpoint, "write_json_atomic", writer(real_json))
    folder = tmp_path / "checkpoints" / "pretrain" / "round-0002"
    with pytest.raises(
        FedstError, match=rf"{re.escape(str(folder))}: checkpoint could not be written \(.*No space left on device"
    ):
        _save(tmp_path, 2)
    assert _leftovers(tmp_path) == []
    assert load_checkpoint(tmp_path, "pretrain")[0] == 1  # the last complete checkpoint is still the one resumed
    monkeypatch.undo()
    _save(tmp_path, 2)  # the next attempt writes the round (replacing a folder latest.json never pointed at)
    assert load_checkpoint(tmp_path, "pretrain")[0] == 2


def test_a_killed_writes_temp_folder_is_swept_by_the_next_write(tmp_path):
    _save(tmp_path, 1)
    killed = tmp_path / "checkpoints" / "pretrain" / ".round-0002.deadbeef.tmp"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    _save(tmp_path, 2)
    assert _leftovers(tmp_path) == [] and load_checkpoint(tmp_path, "pretrain")[0] == 2


# -- the run directory gate ------------------------------------------------------------------------------------
def _run_dir(root: Path, *, results: bool = False, checkpoints: tuple[str, ...] = (), pointer: bool = True) -> Path:
    run_dir = root / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "resolved-config.json").write_text("{}")
    if results:
        (run_dir / "results.json").write_text("{}")
    for phase in checkpoints:
        save_checkpoint(run_dir, phase, 1, WEIGHTS, {}, {})
        if not pointer:
            (run_dir / "checkpoints" / phase / "latest.json").unlink()
    return run_dir


@pytest.mark.parametrize(
    ("layout", "first", "message"),
    [
        (None, "pretrain", r"resume: .*/runs/r does not exist, so there is no run to resume; check paths.run-name"),
        ({}, "pretrain", r"no checkpoint to resume pretrain from .*; set resume = false to start it afresh"),
        (
            {"results": True},
            "pretrain",
            r"no checkpoints/pretrain/latest.json\); the run stopped before its first checkpoint: start afresh under",
        ),
        ({"checkpoints": ("pretrain",), "pointer": False}, "pretrain", r"no checkpoint to resume pretrain from"),
        (
            {"checkpoints": ("adapt",)},
            "pretrain",
            r"\(no checkpoints/pretrain/latest.json\) \(it has checkpoints of adapt only\)",
        ),
        (
            {},
            "adapt",
            r"\(no checkpoints/pretrain/latest.json or checkpoints/adapt/latest.json\)",
        ),
    ],
)
def test_resume_without_a_checkpoint_to_continue_from_is_an_error(tmp_path, layout, first, message):
    run_dir = tmp_path / "runs" / "r" if layout is None else _run_dir(tmp_path, **layout)
    with pytest.raises(FedstError, match=message):
        claim_run_dir(run_dir, first, resume=True)
    assert run_dir.exists() == (layout is not None)  # the gate creates nothing


@pytest.mark.parametrize(
    ("checkpoints", "first"),
    [(("pretrain",), "pretrain"), (("pretrain",), "adapt"), (("pretrain", "adapt"), "adapt"), (("adapt",), "adapt")]
    + [(("pretrain",), "synthesize"), (("adapt",), "downstream")],
)
def test_resume_continues_from_a_checkpoint_of_its_first_phase_or_an_earlier_one(tmp_path, checkpoints, first):
    claim_run_dir(_run_dir(tmp_path, checkpoints=checkpoints), first, resume=True)


def test_a_fresh_run_over_an_existing_one_is_an_error_and_a_new_folder_is_fine(tmp_path):
    with pytest.raises(FedstError, match=r"/runs/r already holds a run \(results.json\): set resume = true to contin"):
        claim_run_dir(_run_dir(tmp_path / "a", results=True), "pretrain", resume=False)
    with pytest.raises(FedstError, match=r"already holds a run \(checkpoints\): .* or choose another paths.run-name"):
        claim_run_dir(_run_dir(tmp_path / "b", checkpoints=("pretrain",)), "adapt", resume=False)
    claim_run_dir(_run_dir(tmp_path / "c"), "pretrain", resume=False)  # killed before its first record: no run yet
    claim_run_dir(tmp_path / "d" / "runs" / "r", "pretrain", resume=False)


# -- through the Workflow (toy backend, in-process grid, the real ClientApp) -------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    return write_toy_consortium(tmp_path_factory.mktemp("resume-stores"))


def make_grid(stores, tmp_path: Path, config: dict):
    from client.app import app as client_app
    from server.localgrid import LocalGrid

    nodes = {101 + i: {"data-path": str(p), "work-dir": str(tmp_path / f"work-{i}")} for i, p in enumerate(stores)}
    return LocalGrid(client_app, nodes, config)


def workflow(grid, config: dict):
    from server.workflow import Workflow

    return Workflow(grid, RunConfig.from_mapping(config), Path(config["out-dir"]) / config["run-name"])


def test_workflow_resume_without_a_checkpoint_fails_before_anything_is_sent_or_written(stores, tmp_path):
    config = toy_config(tmp_path, phases="pretrain", resume=True, **{"run-name": "typo"})
    with make_grid(stores, tmp_path, config) as grid:
        with pytest.raises(FedstError, match=r"resume: .*/runs/typo does not exist, so there is no run to resume"):
            workflow(grid, config).run_all()
    assert grid.sent == [] and not (tmp_path / "runs").exists()


def test_workflow_fresh_run_over_an_existing_one_fails_and_keeps_its_records(stores, tmp_path):
    config = toy_config(tmp_path, phases="pretrain", **{"rounds-pretrain": 1})
    with make_grid(stores, tmp_path, config) as grid:
        workflow(grid, config).run_all()
    run_dir = tmp_path / "runs" / "r"
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    with make_grid(stores, tmp_path, config) as grid:
        with pytest.raises(FedstError, match=rf"{re.escape(str(run_dir))} already holds a run \(results.json\)"):
            workflow(grid, config).run_all()
    assert grid.sent == []
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before  # nothing overwritten


@pytest.mark.parametrize("phases", ["pretrain,adapt", "adapt"])
def test_workflow_resumed_after_pretraining_continues_with_adaptation(stores, tmp_path, phases):
    """Interrupted between the phases (pretraining done, adaptation not started): resume runs no pretraining round
    again and adapts federatedly from round 1, from the pretraining checkpoint's central model, whether the
    resumed run still lists pretraining or starts at adaptation."""
    from server.strategy import arrays_to_numpy
    from shared.backends import create_backend

    consortium = tmp_path / "consortium"
    consortium.mkdir()
    (consortium / "panel.txt").write_text("\n".join(TOY_PANEL) + "\n")
    config = toy_config(tmp_path, consortium=str(consortium), **{"federated-adapt": True, "rounds-adapt": 1})
    with make_grid(stores, tmp_path, config) as grid:
        workflow(grid, {**config, "phases": "pretrain"}).run_all()
    run_dir = tmp_path / "runs" / "r"
    assert not (run_dir / "checkpoints" / "adapt").exists()
    resumed = {**config, "phases": phases, "resume": True}
    with make_grid(stores, tmp_path, resumed) as grid:
        results = workflow(grid, resumed).run_all()
    assert {m.metadata.message_type for m in grid.sent} == {"train.adapt"}
    assert [m.content["config"]["server-round"] for m in grid.sent] == [1, 1, 1]
    if "pretrain" in phases:
        assert [r.round for r in results.phases["pretrain"].rounds] == [1, 2]  # from the checkpoint's history
    assert [r.round for r in results.phases["adapt"].rounds] == [1] and results.status == "completed"
    assert load_checkpoint(run_dir, "adapt")[0] == 1
    run = RunConfig.from_mapping(config)
    central = create_backend(run.backend, run).sampling_state(load_checkpoint(run_dir, "pretrain")[1])
    for message in grid.sent:
        sent = arrays_to_numpy(message.content["central"])
        assert set(sent) == set(central)
        for key, value in central.items():
            np.testing.assert_array_equal(sent[key], value)


def test_the_server_app_fails_the_run_with_the_one_line_reason(tmp_path, caplog):
    from flwr.app import Context, RecordDict

    from server.app import main

    config = RunConfig.from_mapping(toy_config(tmp_path, resume=True)).to_dict()
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    with caplog.at_level(logging.ERROR), pytest.raises(FedstError, match="resume: .* no run to resume"):
        main(grid=None, context=context)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fedst: ")]
    assert len(lines) == 1 and lines[0].startswith("fedst: resume: ") and "/runs/r does not exist" in lines[0]
