"""Server checkpoints: global model, completed round, strategy state (FedAdam moments) and run config.

Layout: ``<run>/checkpoints/<phase>/round-<k>/{model.safetensors, strategy.safetensors, state.json}`` plus
``<run>/checkpoints/<phase>/latest.json`` naming the newest complete one.

Integrity: state.json records the SHA-256 of both weight files and latest.json that of state.json, so a file that
changed after it was written (a truncation, or one flipped byte that still decodes to finite weights) is an error
naming it, never a resumed model that silently differs. Writes are all-or-nothing: a round goes into a temp folder
(every file fsynced), which is renamed into place, and only then is latest.json (itself written atomically) pointed
at it; a write that fails removes its temp folder and leaves the previous checkpoint the latest.

`claim_run_dir` is the run directory's gate before a run writes anything: a resumed run must have a checkpoint to
continue from, a fresh run must not land on an existing one (both used to restart silently from round 1).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from server.results import FILE as RESULTS
from shared.config import PHASES
from shared.errors import FedstError
from shared.io import json_default, write_bytes_atomic, write_json_atomic

MODEL, STRATEGY, STATE, LATEST = "model.safetensors", "strategy.safetensors", "state.json", "latest.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    root: Path,
    phase: str,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    strategy_state: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
) -> Path:
    """Write one checkpoint (with its checksums) and point ``latest.json`` at it; returns its folder."""
    from safetensors.numpy import save

    base = Path(root) / "checkpoints" / phase
    folder = base / f"round-{server_round:04d}"
    for leftover in base.glob(".round-*.tmp"):  # a write that was killed before it could clean up
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = base / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        blobs = {
            MODEL: save({k: np.ascontiguousarray(v) for k, v in arrays.items()}),
            STRATEGY: save({k: np.ascontiguousarray(v) for k, v in strategy_state.items()}),
        }
        for name, data in blobs.items():
            write_bytes_atomic(tmp / name, data)
        state = {
            **dict(meta),
            "phase": phase,
            "round": server_round,
            "checksums": {n: sha256(d) for n, d in blobs.items()},
        }
        state_bytes = json.dumps(state, indent=2, sort_keys=True, default=json_default).encode()
        write_bytes_atomic(tmp / STATE, state_bytes)
        if folder.exists():  # a round written before but never pointed at (interrupted before latest.json)
            shutil.rmtree(folder)
        tmp.rename(folder)
        pointer = {"round": server_round, "path": folder.name, "state-sha256": sha256(state_bytes)}
        write_json_atomic(base / LATEST, pointer, sort_keys=True)
    except OSError as exc:
        raise FedstError(
            f"{folder}: checkpoint could not be written ({exc}); the previous checkpoint stays the latest"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_checkpoint(
    root: Path, phase: str
) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]] | None:
    """(round, arrays, strategy state, meta) of the newest checkpoint of ``phase``, or None when there is none.

    Every file is checked against the checksum recorded when it was written, before it is decoded."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    base = Path(root) / "checkpoints" / phase
    latest = base / LATEST
    if not latest.is_file():
        return None
    current = latest
    try:
        pointer = json.loads(latest.read_text())
        folder, state_sum = base / pointer["path"], pointer["state-sha256"]
        current = folder / STATE
        meta = json.loads(_verified(current, state_sum, LATEST))
        round_, model_sum, strategy_sum = int(meta["round"]), meta["checksums"][MODEL], meta["checksums"][STRATEGY]
        current = folder / MODEL
        arrays = load(_verified(current, model_sum, STATE))
        current = folder / STRATEGY
        strategy = load(_verified(current, strategy_sum, STATE))
    except KeyError as exc:
        raise FedstError(
            f"{current}: checkpoint is unreadable (no {exc.args[0]!r} entry); restore it, or start afresh under "
            "another paths.run-name"
        ) from None
    except (OSError, TypeError, ValueError, SafetensorError) as exc:
        raise FedstError(
            f"{current}: checkpoint is unreadable ({exc}); restore it, or start afresh under another paths.run-name"
        ) from None
    return round_, arrays, strategy, meta


def _verified(path: Path, expected: Any, recorded_in: str) -> bytes:
    """The bytes of ``path`` if their SHA-256 is ``expected`` (the checksum recorded in ``recorded_in``)."""
    data = path.read_bytes()
    if (digest := sha256(data)) != expected:
        raise ValueError(
            f"SHA-256 {digest[:16]}... differs from {str(expected)[:16]}... recorded in {recorded_in}: "
            "the file changed after it was written"
        )
    return data


def checkpointed_phases(root: Path) -> list[str]:
    """The phases (workflow order) with a checkpoint under ``root``."""
    return [phase for phase in PHASES if (Path(root) / "checkpoints" / phase / LATEST).is_file()]


def claim_run_dir(root: Path, first_phase: str, *, resume: bool) -> None:
    """Refuse, before anything is written, a run that would silently restart or overwrite another.

    ``resume``: ``root`` must hold a checkpoint of ``first_phase`` or of an earlier phase (a run resumed after
    pretraining finished continues with adaptation from the pretraining checkpoint). Not ``resume``: ``root`` must
    not hold a run (results.json or a checkpoint): its records and checkpoints would be overwritten or mixed."""
    root = Path(root)
    held = checkpointed_phases(root)
    if resume:
        usable = PHASES[: PHASES.index(first_phase) + 1]
        if any(phase in usable for phase in held):
            return
        if not root.exists():
            raise FedstError(
                f"resume: {root} does not exist, so there is no run to resume; check paths.run-name (resume needs "
                "the interrupted run's name; an empty one means run-<run id>, new for every run), or set "
                "resume = false to start a new run"
            )
        searched = " or ".join(f"checkpoints/{phase}/{LATEST}" for phase in usable)
        found = f" (it has checkpoints of {', '.join(held)} only)" if held else ""
        if (root / RESULTS).exists():  # a run that a fresh start would overwrite
            stopped = "" if held else "the run stopped before its first checkpoint: "
            advice = f"{stopped}start afresh under another paths.run-name"
        else:
            advice = "set resume = false to start it afresh"
        raise FedstError(
            f"resume: {root} has no checkpoint to resume {first_phase} from (no {searched}){found}; {advice}"
        )
    if held or (root / RESULTS).exists():
        raise FedstError(
            f"{root} already holds a run ({RESULTS if (root / RESULTS).exists() else 'checkpoints'}): set "
            "resume = true to continue it, or choose another paths.run-name"
        )
