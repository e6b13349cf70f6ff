"""Live progress of a local run (`fedst demo`): phase, round k/n, each site's steps, elapsed time and an ETA.

Read from the run's own records, never from a process per poll: the lead's ``results.json`` (finished rounds,
per-phase wall time, status) and each site's ``progress.json`` in its work dir (shared/progress.py). The site
records are local to each site and never sent; the demo can read them only because its simulated sites' work
dirs are on this machine. A real consortium's lead sees the rounds of results.json and nothing else.

The ETA is an estimate, shown as ``ETA ~``: the planned work (pretrain rounds x steps, adapt rounds x steps,
synthetic pairs, one downstream step, each per site) times the wall seconds per unit observed for each phase (the
run's phase timing once a phase is over). A phase not yet seen is costed from the latest observed one through
the relative costs measured on the default c2l demo (``PRIOR_COST``); before any site has taken a step the ETA is
``ETA --``. Start-up, store preparation and process launches are not in the plan, so it reads low early on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from server.results import RunRecord, load_results
from shared.config import RunConfig
from shared.progress import PROGRESS_FILE, read_progress

PRIOR_COST = {"pretrain": 1.0, "adapt": 0.75, "synthesize": 1.3, "downstream": 4.0}
"""Wall seconds per site-unit of each phase relative to a pretraining step, from the default c2l demo on 2 cores
(docs/benchmarks.md, 2026-12-02: pretrain 248 s / 900 site-steps, adapt 157 s / 750, synthesis with its audit and
downstream about 75 s / 192 pairs; a downstream step about 4 pretraining steps). Used only for phases not yet seen."""
MIN_OBSERVED_SECONDS = 2.0  # a phase's own rate counts once it has run this long
PLAIN_EVERY_SECONDS = 15.0  # plain (log) output: per-site progress at most this often within a phase round


@dataclass(frozen=True)
class PhasePlan:
    """A phase's planned work per site: ``rounds`` rounds (0: one-shot) of ``units`` steps (or pairs)."""

    rounds: int
    units: int

    @property
    def per_site(self) -> int:
        return max(self.rounds, 1) * self.units


def plan_of(run: RunConfig) -> dict[str, PhasePlan]:
    """The phases the run config will run, in order, with their planned work per site."""
    plans = {
        "pretrain": PhasePlan(run.pretrain.rounds, run.pretrain.steps),
        "adapt": PhasePlan(run.adapt.rounds if run.adapt.federated else 1, run.adapt.steps),
        "synthesize": PhasePlan(0, run.synthesize.count),
        "downstream": PhasePlan(0, 1),
    }
    return {phase: plans[phase] for phase in run.phase_list if phase in plans}


@dataclass(frozen=True)
class SiteProgress:
    """One site's line: its record when it is for the current phase round, else it is waiting."""

    site: str
    step: int = 0
    total: int = 0
    state: str = "waiting"  # waiting, running, done, failed
    rate: float | None = None  # steps (pairs) per second in this round

    @property
    def text(self) -> str:
        if self.state == "waiting":
            return "waiting"
        counts = f"{self.step}/{self.total}" if self.total else f"{self.step}"
        return counts if self.state == "running" else f"{counts} {self.state}"


@dataclass(frozen=True)
class Snapshot:
    """What the display shows after one poll."""

    elapsed: float
    phase: str | None = None  # None: before the first record, or every planned phase is over
    round: int = 0  # 0: a one-shot phase
    rounds: int = 0
    sites: list[SiteProgress] = field(default_factory=list)
    eta: float | None = None  # seconds left for the whole run; None: unknown
    status: str | None = None  # results.json's status; None before it exists
    lines: list[str] = field(default_factory=list)  # every finished round so far (progress_lines)
    unseen: int = 0  # sites that have written no record yet

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    @property
    def headline(self) -> str:
        if self.finished:
            where = f"run {self.status}"
        elif self.phase is None:
            where = "starting (ServerApp, sites' stores)" if self.status is None else "finishing"
        else:
            where = self.phase + (f" round {self.round}/{self.rounds}" if self.rounds else "")
        return f"[{clock_text(self.elapsed)}] {where}"

    @property
    def site_text(self) -> str:
        parts = [f"{s.site} {s.text}" for s in self.sites]
        if self.unseen:
            parts.append(f"{self.unseen} more not started")
        return ", ".join(parts)

    def line(self) -> str:
        """One plain line: where the run is, each site's steps, the ETA (for a log)."""
        sites = f": {self.site_text}" if self.phase and self.site_text and not self.finished else ""
        return f"{self.headline}{sites}" + ("" if self.finished else f" | {eta_text(self.eta)}")


def clock_text(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def eta_text(seconds: float | None) -> str:
    """``ETA ~40 s``, ``ETA ~6 min``, ``ETA ~1.5 h``; ``ETA --`` when unknown (honest about being an estimate)."""
    if seconds is None:
        return "ETA --"
    if seconds < 10:
        return "ETA <10 s"
    if seconds < 90:
        return f"ETA ~{round(seconds / 10) * 10} s"
    if seconds < 5400:
        return f"ETA ~{round(seconds / 60)} min"
    return f"ETA ~{seconds / 3600:.1f} h"


def progress_lines(results: RunRecord | Path) -> list[str]:
    """One line per finished round or broadcast phase, read through the schema (server/results.py).

    Given a path: the run writes results.json after every round; before the first write there is nothing to
    show, and a file of another schema is a real error.
    """
    if isinstance(results, Path):
        if not results.is_file():
            return []
        results = load_results(results)
    lines = []
    for phase, block in results.phases.items():
        if block.kind == "train":
            for row in block.rounds:
                loss = f", loss {row.aggregate['loss']:.4f}" if "loss" in row.aggregate else ""
                lines.append(f"{phase} round {row.round}: {len(row.sites)} sites{loss}")
        elif (row := block.last) is not None and row.sites:
            lines.append(
                f"{phase}: done on {len(row.sites)} sites" + (f", {len(row.failed)} failed" if row.failed else "")
            )
    if results.status in ("completed", "failed"):
        lines.append(f"status: {results.status}")
    return lines


class RunProgress:
    """Reads a run's results.json and its sites' progress.json files (one read each per poll) into a Snapshot."""

    def __init__(
        self,
        run: RunConfig,
        run_dir: Path,
        sites_root: Path,
        n_sites: int,
        *,
        started: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.plan = plan_of(run)
        self.order = list(self.plan)
        self.run_dir, self.sites_root, self.n_sites = Path(run_dir), Path(sites_root), int(n_sites)
        self.clock = clock
        self.started = clock() if started is None else started
        self.phase_start: dict[str, float] = {}  # earliest site record start seen per phase (time.time())

    # -- reading ------------------------------------------------------------------------------------------
    def results(self) -> RunRecord | None:
        path = self.run_dir / "results.json"
        return load_results(path) if path.is_file() else None

    def records(self) -> dict[str, dict]:
        """Each site's latest record, by site name."""
        found = {}
        for path in sorted(self.sites_root.glob(f"*/{PROGRESS_FILE}")):
            if (record := read_progress(path)) is not None and record["phase"] in self.plan:
                found[record["site"]] = record
        return found

    def poll(self) -> Snapshot:
        return self.snapshot(self.results(), self.records())

    # -- the arithmetic (pure, given the records) ---------------------------------------------------------
    def completed_rounds(self, results: RunRecord | None, phase: str) -> int:
        if results is None or (block := results.phases.get(phase)) is None:
            return 0
        return min(len(block.rounds), max(self.plan[phase].rounds, 1))

    def _key(self, phase: str, server_round: int) -> tuple[int, int]:
        return self.order.index(phase), max(server_round, 1)

    def current(self, results: RunRecord | None, records: dict[str, dict]) -> tuple[str, int] | None:
        """The furthest (phase, round) any record shows started: a site's record, or the round after the last
        finished one in results.json. None before anything started, and after the last planned round."""
        candidates = [(r["phase"], max(r["round"], 1)) for r in records.values()]
        if results is not None:
            for phase in reversed(self.order):
                done = self.completed_rounds(results, phase)
                if done:
                    if done < max(self.plan[phase].rounds, 1):
                        candidates.append((phase, done + 1))
                    elif (i := self.order.index(phase)) + 1 < len(self.order):
                        candidates.append((self.order[i + 1], 1))
                    else:
                        return None  # every planned phase is over
                    break
        if not candidates:
            return None
        return max(candidates, key=lambda c: self._key(*c))

    def done_units(self, results: RunRecord | None, records: dict[str, dict]) -> dict[str, int]:
        """Site-units of work done per phase: finished rounds (results.json) plus each site's steps in the
        round it is in (its record, until results.json has that round)."""
        done = {}
        for phase, plan in self.plan.items():
            rounds = self.completed_rounds(results, phase)
            units = rounds * plan.units * self.n_sites
            for record in records.values():
                if record["phase"] == phase and max(record["round"], 1) > rounds:
                    units += min(record["step"], plan.units)
            done[phase] = min(units, plan.per_site * self.n_sites)
        return done

    def eta(self, results: RunRecord | None, records: dict[str, dict], now: float) -> float | None:
        """Seconds left for the planned work (module docstring); None when no phase has a rate yet."""
        done = self.done_units(results, records)
        timing = results.timing if results is not None else {}
        rates: dict[str, float] = {}
        for phase, plan in self.plan.items():
            planned = plan.per_site * self.n_sites
            if phase in timing and planned:
                rates[phase] = timing[phase] / planned
            elif phase in self.phase_start and done[phase] > 0:
                seconds = now - self.phase_start[phase]
                if seconds >= MIN_OBSERVED_SECONDS:
                    rates[phase] = seconds / done[phase]
        if not rates:
            return None
        reference = max(rates, key=self.order.index)  # the latest phase with a rate of its own
        remaining = 0.0
        for phase, plan in self.plan.items():
            left = plan.per_site * self.n_sites - done[phase]
            if left > 0:
                rate = rates.get(phase)
                if rate is None:
                    rate = rates[reference] * PRIOR_COST.get(phase, 1.0) / PRIOR_COST.get(reference, 1.0)
                remaining += left * rate
        return remaining

    def snapshot(self, results: RunRecord | None, records: dict[str, dict]) -> Snapshot:
        now = self.clock()
        for record in records.values():  # a phase's start: the earliest round start any poll saw
            start = self.phase_start.get(record["phase"], record["started"])
            self.phase_start[record["phase"]] = min(start, record["started"])
        status = results.status if results is not None else None
        lines = progress_lines(results) if results is not None else []
        eta = self.eta(results, records, now) if status not in ("completed", "failed") else None
        current = self.current(results, records)
        if current is None:
            return Snapshot(now - self.started, status=status, lines=lines, eta=eta)
        phase, server_round = current
        plan = self.plan[phase]
        sites = []
        for name, record in sorted(records.items()):
            if self._key(record["phase"], record["round"]) != self._key(phase, server_round):
                sites.append(SiteProgress(name))
                continue
            seconds = record["updated"] - record["started"]
            rate = record["step"] / seconds if record["step"] and seconds > 0 else None
            sites.append(SiteProgress(name, record["step"], record["total"], record["state"], rate))
        return Snapshot(
            now - self.started,
            phase=phase,
            round=server_round if plan.rounds else 0,
            rounds=plan.rounds,
            sites=sites,
            eta=eta,
            status=status,
            lines=lines,
            unseen=max(self.n_sites - len(records), 0),
        )


# -- displays --------------------------------------------------------------------------------------------------
class PlainLines:
    """Log-friendly output: each finished round once, a status line at each new phase round and at most every
    ``every`` seconds within one (only when something but the clock changed)."""

    def __init__(self, echo: Callable[[str], None], every: float = PLAIN_EVERY_SECONDS, clock=time.monotonic):
        self.echo, self.every, self.clock = echo, every, clock
        self.seen: set[str] = set()
        self._where: tuple | None = None
        self._body: str | None = None
        self._last = float("-inf")

    def __enter__(self) -> PlainLines:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def show(self, snapshot: Snapshot) -> None:
        for line in snapshot.lines:
            if line not in self.seen:
                self.seen.add(line)
                self.echo(f"  {line}")
        if snapshot.finished:
            return
        where = (snapshot.phase, snapshot.round)
        body = snapshot.site_text
        now = self.clock()
        if where != self._where or (body != self._body and now - self._last >= self.every):
            self.echo(f"  {snapshot.line()}")
            self._where, self._body, self._last = where, body, now


class LiveView:
    """A terminal's display: a rich Live panel (headline, one bar per site), finished rounds printed above it."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console()
        self.seen: set[str] = set()
        self._live = None

    def __enter__(self) -> LiveView:
        from rich.live import Live

        self._live = Live(self.render(None), console=self.console, auto_refresh=False, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def show(self, snapshot: Snapshot) -> None:
        for line in snapshot.lines:
            if line not in self.seen:
                self.seen.add(line)
                self.console.print(f"  {line}", markup=False, highlight=False)
        if self._live is not None:
            self._live.update(self.render(snapshot), refresh=True)

    @staticmethod
    def render(snapshot: Snapshot | None):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        if snapshot is None:
            return Text("  waiting for the run to start ...")
        eta = "" if snapshot.finished else f"  {eta_text(snapshot.eta)}"
        head = Text(f"  {snapshot.headline}{eta}", style="bold")
        if snapshot.phase is None or snapshot.finished or not snapshot.sites:
            return head
        table = Table.grid(padding=(0, 2))
        for _ in range(4):
            table.add_column()
        for site in snapshot.sites:
            bar = ProgressBar(total=max(site.total, 1), completed=site.step if site.total else 0, width=30)
            rate = f"{site.rate:.2f}/s" if site.rate and site.state == "running" else ""
            table.add_row(Text(f"  {site.site}"), bar, Text(site.text), Text(rate))
        if snapshot.unseen:
            table.add_row(Text(f"  ({snapshot.unseen} more not started)"), Text(""), Text(""), Text(""))
        return Group(head, table)
