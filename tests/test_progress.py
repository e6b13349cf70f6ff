"""Live progress of a run: the site's progress record (shared/progress.py), its readers and displays for
`fedst demo` (server/progress.py), and the demo's poll loop, which reads files every second and asks Flower
(`flwr ls`, a process) only every 30 s or when the run's record says it ended (SuperLink.follow)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from server.progress import PlainLines, RunProgress, Snapshot, eta_text, plan_of
from server.results import PhaseRecord, RoundRecord, RunRecord, save_results
from shared.config import NodeConfig, RunConfig
from shared.errors import FedstError
from shared.progress import PROGRESS_FILE, ProgressRecord, read_progress


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def write_record(root: Path, site: str, phase: str, rnd: int, step: int, total: int, *, started, now, state=None):
    """A site's record as ProgressRecord writes it: begun at ``started``, at ``step`` at ``now``."""
    clock = Clock(started)
    record = ProgressRecord(
        root / site, site=site, phase=phase, server_round=rnd, total=total, clock=clock, min_interval=0.0
    )
    record.__enter__()
    clock.now = now
    if state is None:
        record(step)
    else:
        record.step = step
        record.__exit__(None if state == "done" else RuntimeError, None, None)
    return record


# -- the site's record -----------------------------------------------------------------------------------------
def test_progress_record_is_throttled_atomic_and_ends_with_a_final_record(tmp_path):
    clock = Clock()
    path = tmp_path / PROGRESS_FILE
    with ProgressRecord(tmp_path, site="site-0", phase="pretrain", server_round=2, total=100, clock=clock) as record:
        assert record.writes == 1 and read_progress(path)["step"] == 0  # step 0 at the start
        for step in range(1, 40):  # 40 steps in 0.975 s: no write
            clock.now += 0.025
            record(step, 100)
        assert record.writes == 1
        clock.now += 0.05  # 1.025 s after the last write
        record(41, 100)
        assert record.writes == 2
        found = read_progress(path)
        assert (found["phase"], found["round"], found["step"], found["total"], found["state"]) == (
            "pretrain",
            2,
            41,
            100,
            "running",
        )
        assert found["site"] == "site-0" and found["started"] == 1000.0 and found["updated"] == clock.now
        for step in range(42, 101):  # the last step is written whatever the clock says
            clock.now += 0.001
            record(step, 100)
        assert record.writes == 3 and read_progress(path)["step"] == 100
    assert record.writes == 4
    final = json.loads(path.read_text())
    assert final["state"] == "done" and final["step"] == final["total"] == 100 and final["schema"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROGRESS_FILE]  # atomic: no temp file left behind


def test_a_failed_phase_is_marked_and_a_failed_write_never_fails_the_site(tmp_path):
    with pytest.raises(ValueError):
        with ProgressRecord(tmp_path, site="s", phase="adapt", server_round=1, total=5) as record:
            record(2)
            raise ValueError("boom")
    found = read_progress(tmp_path)
    assert found["state"] == "failed" and found["step"] == 2
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with ProgressRecord(blocked, site="s", phase="adapt", total=5) as record:  # its "work dir" is a file
        record(5)
    assert record.writes == 0


def test_read_progress_skips_what_it_cannot_use(tmp_path):
    assert read_progress(tmp_path) is None  # none yet
    (tmp_path / PROGRESS_FILE).write_text("{not json")
    assert read_progress(tmp_path) is None
    (tmp_path / PROGRESS_FILE).write_text(json.dumps({"schema": 2, "state": "running"}))
    assert read_progress(tmp_path) is None
    (tmp_path / PROGRESS_FILE).write_text(json.dumps({"schema": 1, "state": "running", "site": "s"}))
    assert read_progress(tmp_path) is None  # fields missing


def test_step_bar_reports_steps_with_the_bar_off():
    from shared.c2l.progress import StepBar

    seen = []
    with StepBar(3, "pretrain", enabled=False, on_advance=lambda done, total: seen.append((done, total))) as bar:
        for step in range(3):
            bar.advance(step + 1, loss=0.5)
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_a_site_writes_its_record_through_every_phase_of_the_toy_backend(tmp_path):
    from client.site import SiteTask
    from shared.backends import create_backend
    from shared.c2l.toy import write_toy_store

    panel = [f"G{i}" for i in range(6)]
    store = write_toy_store(tmp_path / "store", n_spots=24, n_tiles=8, panel=panel, patch_px=8, seed=0)
    run = RunConfig.from_mapping(
        {"backend": "toy", "patch-px": 8, "pretrain.steps": 3, "adapt.steps": 2, "synthesize.count": 4}
    )
    seen = []
    backend = create_backend("toy", run)
    backend.pretrain(backend.initial_state(0), store, run.pretrain, seed=0, on_advance=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    node = NodeConfig.from_mapping({"data-path": str(store.path), "work-dir": str(tmp_path / "work")}, run)
    task = SiteTask(run, node, panel)
    state, _ = task.pretrain(backend.initial_state(0), 2)
    records = [read_progress(node.work_dir)]
    task.adapt(state, 1)
    records.append(read_progress(node.work_dir))
    task.synthesize()
    records.append(read_progress(node.work_dir))
    task.downstream()
    records.append(read_progress(node.work_dir))
    assert [(r["phase"], r["round"], r["step"], r["total"], r["state"]) for r in records] == [
        ("pretrain", 2, 3, 3, "done"),
        ("adapt", 1, 2, 2, "done"),
        ("synthesize", 0, 4, 4, "done"),
        ("downstream", 0, 1, 1, "done"),
    ]
    assert {r["site"] for r in records} == {node.site}


# -- the demo's view of the records ----------------------------------------------------------------------------
RUN = {
    "backend": "toy",
    "pretrain.rounds": 2,
    "pretrain.steps": 100,
    "adapt.federated": True,
    "adapt.rounds": 2,
    "adapt.steps": 50,
    "synthesize.count": 10,
}


def _results(run_dir: Path, phases: dict, *, status="running", timing=None) -> None:
    save_results(
        run_dir,
        RunRecord(run="7", status=status, config={}, phases=phases, timing=timing or {}, run_dir=str(run_dir)),
    )


def _train(rounds: int, sites=("site-0", "site-1")) -> PhaseRecord:
    rows = [
        RoundRecord(round=r, sites={s: {"loss": 0.5} for s in sites}, aggregate={"loss": 0.5})
        for r in range(1, rounds + 1)
    ]
    return PhaseRecord(kind="train", rounds=rows)


def test_plan_counts_the_work_the_run_config_asks_for():
    plan = plan_of(RunConfig.from_mapping(RUN))
    assert [(p, v.rounds, v.units, v.per_site) for p, v in plan.items()] == [
        ("pretrain", 2, 100, 200),
        ("adapt", 2, 50, 100),
        ("synthesize", 0, 10, 10),
        ("downstream", 0, 1, 1),
    ]
    local = plan_of(RunConfig.from_mapping({**RUN, "adapt.federated": False, "phases": "adapt,downstream"}))
    assert list(local) == ["adapt", "downstream"] and local["adapt"].rounds == 1


def test_phase_sites_elapsed_and_eta_from_the_run_records(tmp_path):
    run_dir, sites = tmp_path / "run", tmp_path / "sites"
    clock = Clock(1000.0)
    watcher = RunProgress(RunConfig.from_mapping(RUN), run_dir, sites, 2, started=995.0, clock=clock)

    first = watcher.poll()  # nothing written yet
    assert first.phase is None and first.eta is None
    assert first.line() == "[0:05] starting (ServerApp, sites' stores) | ETA --"

    # pretrain round 1: site-0 half way after 10 s (50 site-steps: 0.2 s each), site-1 not started
    write_record(sites, "site-0", "pretrain", 1, 50, 100, started=1000.0, now=1010.0)
    clock.now = 1010.0
    snap = watcher.poll()
    assert (snap.phase, snap.round, snap.rounds, snap.unseen) == ("pretrain", 1, 2, 1)
    # left: pretrain 350 x 0.2 + adapt 200 x 0.15 + synthesize 20 x 0.26 + downstream 2 x 0.8 = 106.8 s
    assert snap.eta == pytest.approx(106.8)
    assert snap.line() == "[0:15] pretrain round 1/2: site-0 50/100, 1 more not started | ETA ~2 min"
    assert snap.sites[0].rate == pytest.approx(5.0)

    # pretrain over in 80 s (0.2 s per site-step, from results.json's timing); adapt round 1 under way
    _results(run_dir, {"pretrain": _train(2)}, timing={"pretrain": 80.0})
    write_record(sites, "site-0", "adapt", 1, 50, 50, started=1090.0, now=1100.0, state="done")
    write_record(sites, "site-1", "adapt", 1, 25, 50, started=1095.0, now=1100.0)
    clock.now = 1100.0
    snap = watcher.poll()
    assert (snap.phase, snap.round, snap.rounds, snap.unseen) == ("adapt", 1, 2, 0)
    assert [s.text for s in snap.sites] == ["50/50 done", "25/50"]
    # adapt: 75 site-steps in 10 s; 125 left -> 16.7 s; synthesize / downstream costed from adapt's rate
    rate = 10.0 / 75
    assert snap.eta == pytest.approx(125 * rate + 20 * rate * 1.3 / 0.75 + 2 * rate * 4.0 / 0.75)
    assert snap.lines == ["pretrain round 1: 2 sites, loss 0.5000", "pretrain round 2: 2 sites, loss 0.5000"]

    # adapt round 1 aggregated: round 2 is current, both sites still show round 1 (waiting for their message)
    _results(run_dir, {"pretrain": _train(2), "adapt": _train(1)}, timing={"pretrain": 80.0})
    snap = watcher.poll()
    assert (snap.phase, snap.round) == ("adapt", 2) and [s.text for s in snap.sites] == ["waiting", "waiting"]

    # one-shot phases have no round; the run's end drops the ETA
    timing = {"pretrain": 80.0, "adapt": 200.0}  # adapt: 200 site-steps, 1 s each
    _results(run_dir, {"pretrain": _train(2), "adapt": _train(2)}, timing=timing)
    write_record(sites, "site-0", "synthesize", 0, 4, 10, started=1200.0, now=1201.0)
    clock.now = 1201.0
    snap = watcher.poll()
    # synthesize: 4 pairs in 1 s is too short to be its own rate; costed from adapt (1 s x 1.3 / 0.75 per pair)
    assert snap.eta == pytest.approx(16 * 1.3 / 0.75 + 2 * 4.0 / 0.75)
    assert snap.line() == "[3:26] synthesize: site-0 4/10, site-1 waiting | ETA ~40 s"
    _results(run_dir, {"pretrain": _train(2)}, status="completed", timing={"pretrain": 80.0})
    done = watcher.poll()
    assert done.finished and done.eta is None and done.lines[-1] == "status: completed"
    assert done.line() == "[3:26] run completed"


def test_eta_text_is_an_honest_estimate():
    assert eta_text(None) == "ETA --"
    assert eta_text(3.0) == "ETA <10 s" and eta_text(12.0) == "ETA ~10 s" and eta_text(44.0) == "ETA ~40 s"
    assert eta_text(150.0) == "ETA ~2 min" and eta_text(3600.0) == "ETA ~60 min" and eta_text(9000) == "ETA ~2.5 h"


def test_plain_lines_for_a_log(tmp_path):
    lines: list[str] = []
    clock = Clock(0.0)
    plain = PlainLines(lines.append, every=15.0, clock=clock)

    def snap(step: int, rnd: int = 1, finished: list[str] = ()) -> Snapshot:
        from server.progress import SiteProgress

        return Snapshot(
            clock.now, "pretrain", rnd, 2, [SiteProgress("site-0", step, 100, "running")], 30.0, lines=list(finished)
        )

    plain.show(snap(1))
    clock.now = 5.0
    plain.show(snap(5))  # within 15 s of the last line: nothing
    clock.now = 16.0
    plain.show(snap(20))
    clock.now = 40.0
    plain.show(snap(20))  # nothing but the clock changed: nothing
    plain.show(snap(0, rnd=2, finished=["pretrain round 1: 1 sites, loss 0.5000"]))  # a new round: at once
    plain.show(snap(0, rnd=2, finished=["pretrain round 1: 1 sites, loss 0.5000"]))
    assert lines == [
        "  [0:00] pretrain round 1/2: site-0 1/100 | ETA ~30 s",
        "  [0:16] pretrain round 1/2: site-0 20/100 | ETA ~30 s",
        "  pretrain round 1: 1 sites, loss 0.5000",
        "  [0:40] pretrain round 2/2: site-0 0/100 | ETA ~30 s",
    ]


def test_the_live_view_renders_in_a_terminal():
    from rich.console import Console

    from server.progress import LiveView, SiteProgress

    console = Console(file=io.StringIO(), record=True, width=120, force_terminal=True)
    snapshot = Snapshot(
        75.0, "adapt", 1, 2, [SiteProgress("site-0", 10, 50, "running", 2.5), SiteProgress("site-1")], 200.0
    )
    console.print(LiveView.render(snapshot))
    text = console.export_text()
    assert "[1:15] adapt round 1/2  ETA ~3 min" in text and "10/50" in text and "2.50/s" in text
    assert "site-1" in text and "waiting" in text


# -- the poll loop -----------------------------------------------------------------------------------------------
def _link(tmp_path, statuses: list[str], calls: list[float], clock: Clock):
    from server.superlink import SuperLink

    link = SuperLink(tmp_path / "home", simulation=True)  # not entered: no process is started

    def status(run_id: str) -> dict:
        calls.append(clock.now)
        return {"status": statuses[min(len(calls), len(statuses)) - 1]}

    link.status = status
    return link


def _sleep(clock: Clock):
    def sleep(seconds: float) -> None:
        clock.now += seconds

    return sleep


def test_follow_asks_flower_every_30_s_and_when_the_record_says_the_run_ended(tmp_path):
    clock, calls, polls = Clock(0.0), [], []
    link = _link(tmp_path, ["running"] * 3 + ["finished:completed"], calls, clock)

    def watch() -> bool:
        polls.append(clock.now)
        return len(polls) > 100  # results.json says completed at the 101st poll

    info = link.follow("7", 3600, watch, interval=1.0, status_every=30.0, clock=clock, sleep=_sleep(clock))
    assert info["status"] == "finished:completed"
    assert len(polls) == 101 and calls == [30.0, 60.0, 90.0, 100.0]  # 4 processes for 101 polls, not 101


def test_follow_notices_a_server_app_that_died_without_writing_its_record(tmp_path):
    clock, calls = Clock(0.0), []
    link = _link(tmp_path, ["finished:failed"], calls, clock)
    info = link.follow("7", 3600, lambda: False, interval=1.0, status_every=30.0, clock=clock, sleep=_sleep(clock))
    assert info["status"] == "finished:failed" and calls == [30.0]


def test_follow_stops_a_run_past_its_timeout(tmp_path):
    clock, calls, stopped = Clock(0.0), [], []
    link = _link(tmp_path, ["running"], calls, clock)
    link.flwr = lambda *args, **kw: stopped.append(args)
    with pytest.raises(FedstError, match="did not finish within 100 s"):
        link.follow("7", 100, lambda: False, interval=1.0, status_every=30.0, clock=clock, sleep=_sleep(clock))
    assert stopped == [("stop", "7", "fedst")] and len(calls) == 3


def test_the_demo_reads_records_each_second_and_asks_flower_rarely(tmp_path, monkeypatch):
    """run_demo's loop end to end with a scripted run in place of Flower: per-site lines, finished rounds, and
    4 `flwr ls` calls for about 100 polls."""
    import server.demo as demo
    from server.superlink import SuperLink

    clock = Clock(0.0)
    consortium = tmp_path / "consortium"
    monkeypatch.setattr(demo, "prepare_consortium", lambda *a, **kw: consortium)
    monkeypatch.setattr(demo, "limit_first_site", lambda *a, **kw: None)

    class ScriptedLink(SuperLink):
        """Flower replaced by a script: each poll's sleep moves the run on."""

        status_calls = 0

        def __init__(self, home: Path, **kw):
            super().__init__(home, **kw)
            self.polls = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def submit(self, app, overrides, federation_config=None) -> str:
            self.run_dir = Path(overrides["paths.out-dir"]) / overrides["paths.run-name"]
            self.sites = Path(overrides["paths.sites-root"])
            self.started = time.time()  # the site records' clock is the demo's
            return "7"

        def status(self, run_id: str) -> dict:
            ScriptedLink.status_calls += 1
            path = self.run_dir / "results.json"
            finished = path.is_file() and json.loads(path.read_text())["status"] == "completed"
            return {"status": "finished:completed" if finished else "running"}

        def follow(self, run_id, timeout, watch, **kw):
            return super().follow(run_id, timeout, watch, clock=clock, sleep=self.tick, **kw)

        def tick(self, seconds: float) -> None:
            clock.now += seconds
            self.polls += 1
            if self.polls <= 50:
                for site in ("site-0", "site-1"):
                    write_record(
                        self.sites, site, "pretrain", 1, self.polls * 3, 150, started=self.started, now=time.time()
                    )
            if self.polls == 50:
                _results(self.run_dir, {"pretrain": _train(1)})
            if self.polls == 100:
                _results(self.run_dir, {"pretrain": _train(1)}, status="completed")

    monkeypatch.setattr(demo, "SuperLink", ScriptedLink)
    lines: list[str] = []
    demo.run_demo(tmp_path / "out", sites=2, overrides={"backend": "toy"}, timeout=600, echo=lines.append)
    text = "\n".join(lines)
    assert "  pretrain round 1: 2 sites, loss 0.5000" in lines and "  status: completed" in lines
    progress = [line for line in lines if "pretrain round 1/2: site-0" in line]
    assert progress and "site-1" in progress[0] and "ETA" in progress[0], text
    assert len(progress) <= 6  # at a new round and at most every 15 s, not at every poll
    assert ScriptedLink.status_calls == 4, text  # at 30, 60, 90 s and when results.json said completed
