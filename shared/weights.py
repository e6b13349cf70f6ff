"""Does a set of named tensors fit a model? One FedstError naming the source instead of torch's RuntimeError."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from shared.errors import FedstError


def check_state(
    expected: Mapping[str, Sequence[int | None]], found: Mapping[str, Any], source: str | Path, owner: str
) -> None:
    """FedstError naming `source` when `found` lacks, adds or misshapes a tensor of `expected` (name -> shape;
    a None dimension matches any size), showing the expected and the found shape."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and not _fits(expected[k], tuple(found[k].shape))]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if wrong:
        k = wrong[0]
        shape = tuple("any" if d is None else d for d in expected[k])
        parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: expected {shape}, found {tuple(found[k].shape)})")
    raise FedstError(f"{source}: weights do not match {owner}: " + "; ".join(parts))


def _fits(expected: Sequence[int | None], found: tuple[int, ...]) -> bool:
    return len(expected) == len(found) and all(e is None or e == f for e, f in zip(expected, found))


def load_state_strict(module: Any, state_dict: Mapping[str, Any], source: str | Path) -> None:
    """load_state_dict that reports missing/unexpected/misshaped tensors as one FedstError naming `source`."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_state(own, state_dict, source, type(module).__name__)
    module.load_state_dict(state_dict, strict=True)
