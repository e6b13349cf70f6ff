"""Loading weights into a module with one clear error instead of torch's multi-line RuntimeError."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from shared.errors import FedstError


def load_state_strict(module: Any, state_dict: Mapping[str, Any], source: str | Path) -> None:
    """load_state_dict that reports missing/unexpected/misshaped tensors as one FedstError naming `source`."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise FedstError(f"{source}: weights do not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)
