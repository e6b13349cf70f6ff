"""Resumable execution of the cell grid.

Every finished cell writes ``cells/<key>.json`` atomically (temporary file + rename), after its artifacts
(``cells/<key>/``) are complete; a restarted experiment skips cells whose JSON exists. ``experiment.json``
records the config fingerprint: resuming into a folder made by a different config is refused, so results of
two configs are never mixed. Cell functions derive all randomness from the cell's seed, so a resumed run
gives the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from server.experiment.config import ExperimentConfig
from server.experiment.planner import Cell, plan
from shared.errors import FedstError
from shared.io import write_json_atomic

CELLS = "cells"
STATE = "experiment.json"


class CellFunction(Protocol):
    def __call__(self, cell: Cell, workdir: Path) -> dict[str, Any]:
        """Run one cell; return ``{"sites": {site: {metric: value, ...}}, ...}`` (JSON-serialisable)."""


def cell_result_path(out: Path, cell: Cell) -> Path:
    return out / CELLS / f"{cell.key}.json"


def load_finished(out: Path, cells: list[Cell]) -> dict[str, dict[str, Any]]:
    """Results of the cells that already finished under ``out`` (unreadable files count as unfinished)."""
    done = {}
    for cell in cells:
        path = cell_result_path(out, cell)
        if path.is_file():
            try:
                done[cell.key] = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
    return done


def init_output(out: Path, config: ExperimentConfig, *, resume: bool) -> None:
    """Claim ``out`` for this config: refuse a folder of another config unless starting fresh."""
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE
    fingerprint = config.fingerprint()
    if state_path.is_file():
        previous = json.loads(state_path.read_text())
        if not resume:
            for name in (CELLS, "cache", "report"):
                shutil.rmtree(out / name, ignore_errors=True)
        elif previous.get("fingerprint") != fingerprint:
            raise FedstError(
                f"{out}: holds results of a different config (fingerprint {previous.get('fingerprint')} != "
                f"{fingerprint}); pass --fresh to discard them or choose another --out"
            )
    elif (out / CELLS).exists() and any((out / CELLS).iterdir()):
        raise FedstError(f"{out}: has a {CELLS}/ folder but no {STATE}; refusing to mix results")
    write_json_atomic(state_path, {"fingerprint": fingerprint, "config": config.to_dict()}, sort_keys=True)


def run_cells(
    out: Path,
    cells: list[Cell],
    cell_fn: CellFunction,
    *,
    log: Callable[[str], None] = print,
    limit: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every unfinished cell (at most ``limit`` of them), return the results of all finished cells."""
    results = load_finished(out, cells)
    todo = [c for c in cells if c.key not in results]
    log(f"{len(cells)} cells: {len(results)} finished, {len(todo)} to run")
    prepare = getattr(cell_fn, "prepare", None)
    if todo and (limit is None or limit > 0) and callable(prepare):
        started = time.perf_counter()
        prepare()  # shared data preparation is not charged to the first cell's time
        log(f"data ready in {time.perf_counter() - started:.1f} s")
    ran = 0
    for index, cell in enumerate(cells, 1):
        tag = f"[{index}/{len(cells)}] {cell.variant:<18} fraction={cell.fraction:<5g} seed={cell.seed}"
        if cell.key in results:
            log(f"{tag}  skipped (finished earlier)")
            continue
        if limit is not None and ran >= limit:
            break
        workdir = out / CELLS / cell.key
        shutil.rmtree(workdir, ignore_errors=True)  # leftovers of an interrupted attempt
        workdir.mkdir(parents=True)
        started = time.perf_counter()
        payload = cell_fn(cell, workdir)
        elapsed = time.perf_counter() - started
        record = {
            "cell": {"arm": cell.arm, "dp": cell.dp, "fraction": cell.fraction, "seed": cell.seed, "key": cell.key},
            "elapsed_s": round(elapsed, 3),
            **payload,
        }
        write_json_atomic(cell_result_path(out, cell), record, sort_keys=True)
        results[cell.key] = json.loads(cell_result_path(out, cell).read_text())
        ran += 1
        log(f"{tag}  done in {elapsed:.1f} s  {_summary(record)}")
    return results


def _summary(record: dict[str, Any]) -> str:
    sites = record.get("sites", {})
    values = [m.get("PCC") for m in sites.values() if isinstance(m.get("PCC"), (int, float))]
    if not values:
        return ""
    return f"mean PCC over {len(values)} site(s) = {sum(values) / len(values):.3f}"


def run_experiment(
    config: ExperimentConfig,
    out: Path,
    *,
    resume: bool = True,
    cell_fn: CellFunction | None = None,
    log: Callable[[str], None] = print,
    limit: int | None = None,
    figures: bool = True,
) -> Path:
    """Run (or continue) the experiment into ``out``; return the path of the report (``report.md``).

    ``cell_fn`` defaults to the real arms (``server.experiment.arms.ArmRunner``); tests pass their own.
    ``limit`` stops after that many newly run cells (the rest run on the next resume).
    """
    from server.experiment.report import write_report

    out = Path(out).absolute()
    init_output(out, config, resume=resume)
    cells = plan(config)
    context = None
    if cell_fn is None:
        from server.experiment.arms import ArmRunner

        context = ArmRunner(config, out, log=log)
        cell_fn = context
    results = run_cells(out, cells, cell_fn, log=log, limit=limit)
    return write_report(config, out, cells, results, context=context, log=log, figures=figures)
