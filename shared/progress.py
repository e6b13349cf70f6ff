"""A site's live progress record: ``<work_dir>/progress.json``, rewritten while a phase runs.

The record is local to the site: it is written into the site's work directory, never sent over the network and
never leaves the site (it holds a phase name, step counts and times, nothing about the data). `fedst demo` reads
it only because in the demo every simulated site's work directory is on the lead's own machine; a real
consortium's lead sees rounds in results.json and nothing of this file.

One record per site, the phase round it is in (or last finished)::

    {"schema": 1, "site": "site-0", "phase": "pretrain", "round": 2, "step": 87, "total": 150,
     "state": "running", "started": 1764662400.1, "updated": 1764662431.7}

``round`` is 0 for one-shot phases (synthesize, downstream); ``state`` is running, done or failed; times are
``time.time()`` seconds. Writes are atomic (shared/io.py: a reader sees the previous or the new record) and
throttled to one per ``min_interval`` seconds plus the first, the last step and the end, so a loop of thousands
of steps costs a handful of small writes. Progress is a display aid: a write that fails (disk full, folder
removed) turns the record off for the rest of the phase instead of failing the site's training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from shared.io import write_json_atomic

PROGRESS_FILE = "progress.json"
SCHEMA = 1
STATES = ("running", "done", "failed")

Advance = Callable[[int, int], None]
"""``on_advance(done, total)``: what a training loop calls after each step (or batch) with its step counts."""


class ProgressRecord:
    """Writes one site's progress record for one phase round; use as a context manager around the phase's work.

    Calling the record (``record(done, total)``) is the ``on_advance`` callback the backends and
    shared.c2l's `StepBar` take. Entering writes step 0; leaving writes the final record (``done``, or ``failed``
    when the block raised).
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        site: str,
        phase: str,
        server_round: int = 0,
        total: int = 0,
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        self.path = Path(work_dir) / PROGRESS_FILE
        self.site, self.phase, self.round = site, phase, int(server_round)
        self.step, self.total = 0, int(total)
        self.min_interval, self.clock = float(min_interval), clock
        self.started = self.clock()
        self.state = "running"
        self.writes = 0
        self._last_write: float | None = None
        self._enabled = True

    def __enter__(self) -> ProgressRecord:
        self.started = self.clock()
        self._write(self.started)
        return self

    def __call__(self, done: int, total: int | None = None) -> None:
        self.step = int(done)
        if total is not None:
            self.total = int(total)
        now = self.clock()
        final = self.total > 0 and self.step >= self.total
        if final or self._last_write is None or now - self._last_write >= self.min_interval:
            self._write(now)

    def __exit__(self, exc_type, *exc: Any) -> None:
        if exc_type is None:
            self.state = "done"
            if self.total > 0:
                self.step = max(self.step, self.total)
        else:
            self.state = "failed"
        self._write()

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "site": self.site,
            "phase": self.phase,
            "round": self.round,
            "step": self.step,
            "total": self.total,
            "state": self.state,
            "started": self.started,
            "updated": self.clock() if now is None else now,
        }

    def _write(self, now: float | None = None) -> None:
        if not self._enabled:
            return
        now = self.clock() if now is None else now
        try:
            write_json_atomic(self.path, self.to_json(now))
        except OSError:
            self._enabled = False  # a display aid never fails the site's work (module docstring)
            return
        self._last_write = now
        self.writes += 1


def read_progress(path: Path) -> dict[str, Any] | None:
    """The record in ``path`` (a progress.json or the work dir holding it), or None when there is none yet or it
    is not a record of this schema (a reader polls: it must not stop on a file it cannot use)."""
    path = Path(path)
    if path.is_dir():
        path = path / PROGRESS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("state") not in STATES:
        return None
    try:
        return {
            **data,
            "site": str(data["site"]),
            "phase": str(data["phase"]),
            "round": int(data["round"]),
            "step": int(data["step"]),
            "total": int(data["total"]),
            "started": float(data["started"]),
            "updated": float(data["updated"]),
        }
    except (KeyError, TypeError, ValueError):
        return None
