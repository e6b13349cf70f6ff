"""Server-side screening of one site's model update before it is aggregated."""

from __future__ import annotations

from typing import Mapping

import numpy as np


def update_problems(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    max_norm: float,
    max_ratio: float | None = None,
) -> list[str]:
    """Why ``update`` must not be aggregated (empty list: it is acceptable).

    Checks, in order: the tensor names equal the global model's, every shape and dtype matches (an int, bool or
    complex tensor in place of a float one is refused, not cast), every value is finite,
    and the L2 norm of (update - reference) over all tensors is at most ``max_norm`` and, with ``max_ratio``, at
    most ``max_ratio`` x the norm of the reference model itself: an absolute bound cannot know the model's size
    (an update of norm 9000 passed 1e4 against a model of norm 3.4), a relative one catches scaled or poisoned
    updates without knowing the data (measured: a 150-step tiny-preset pretraining round moves the model by 0.15 x
    its norm, a 125-step federated adaptation round the modulation by 0.69 x; the default bound is 5 x).
    """
    problems: list[str] = []
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing:
        problems.append(f"missing tensors {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:3]}{'...' if len(extra) > 3 else ''}")
    if problems:
        return problems
    squared = model_squared = 0.0
    for name, ref in reference.items():
        value = np.asarray(update[name])
        if value.shape != np.shape(ref):
            problems.append(f"tensor {name!r} has shape {value.shape}, expected {np.shape(ref)}")
            continue
        if value.dtype.kind != np.asarray(ref).dtype.kind:  # float widths may differ (FedAdam keeps float64)
            problems.append(f"tensor {name!r} has dtype {value.dtype}, expected {np.asarray(ref).dtype}")
            continue
        if not np.all(np.isfinite(value)):
            problems.append(f"tensor {name!r} contains NaN or Inf")
            continue
        reference_value = np.asarray(ref, dtype=np.float64)
        diff = value.astype(np.float64) - reference_value
        squared += float(np.sum(diff * diff))
        model_squared += float(np.sum(reference_value * reference_value))
    if not problems:
        norm = squared**0.5
        if norm > max_norm:
            problems.append(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")
        elif max_ratio is not None and model_squared > 0 and norm > max_ratio * model_squared**0.5:
            problems.append(
                f"update norm {norm:.4g} exceeds {max_ratio:g} x the global model's norm {model_squared**0.5:.4g}"
            )
    return problems


def weighted_mean(updates: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Reference FedAvg: sum_i w_i x_i / sum_i w_i, in float64, cast back to each tensor's dtype."""
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    total = float(sum(weights))
    out = {}
    for name in updates[0]:
        acc = sum(np.asarray(u[name], dtype=np.float64) * (w / total) for u, w in zip(updates, weights))
        out[name] = np.asarray(acc).astype(np.asarray(updates[0][name]).dtype)
    return out
