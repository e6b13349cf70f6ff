"""Server checkpoints: global model, completed round, strategy state (FedAdam moments) and run config.

Layout: ``<run>/checkpoints/<phase>/round-<k>/{model.safetensors, strategy.safetensors, state.json}`` plus
``<run>/checkpoints/<phase>/latest.json`` naming the newest complete one (written last, atomically).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from shared.errors import FedstError
from shared.io import write_json_atomic


def save_checkpoint(
    root: Path,
    phase: str,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    strategy_state: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
) -> Path:
    """Write one checkpoint and point ``latest.json`` at it; returns its folder."""
    from safetensors.numpy import save_file

    folder = Path(root) / "checkpoints" / phase / f"round-{server_round:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(folder / "model.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in strategy_state.items()}, str(folder / "strategy.safetensors"))
    write_json_atomic(folder / "state.json", {"phase": phase, "round": server_round, **dict(meta)}, sort_keys=True)
    write_json_atomic(folder.parent / "latest.json", {"round": server_round, "path": folder.name}, sort_keys=True)
    return folder


def load_checkpoint(
    root: Path, phase: str
) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]] | None:
    """(round, arrays, strategy state, meta) of the newest checkpoint of ``phase``, or None when there is none."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    base = Path(root) / "checkpoints" / phase
    latest = base / "latest.json"
    if not latest.is_file():
        return None
    current = latest
    try:
        pointer = json.loads(latest.read_text())
        folder = base / pointer["path"]
        current = folder / "state.json"
        meta = json.loads(current.read_text())
        current = folder / "model.safetensors"
        arrays = load_file(str(current))
        current = folder / "strategy.safetensors"
        strategy = load_file(str(current))
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as exc:
        raise FedstError(f"{current}: checkpoint is unreadable ({exc}); delete it or start without resume") from None
    return int(meta["round"]), arrays, strategy, meta
