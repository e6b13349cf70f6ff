"""DP-SGD for adaptation (Opacus): noise calibrated once for the whole run, epsilon from the RDP accountant."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from shared.errors import FedstError

GRAD_SAMPLE_MODES = ("hooks", "functorch")


@dataclass(frozen=True)
class DPConfig:
    """Example-level DP for adaptation: either a target (epsilon, delta) or a fixed noise multiplier.

    `target_delta=None` means 0.1 / n_spots (capped at 1e-5 from above), i.e. well below 1 / N.
    """

    target_epsilon: float | None = None
    target_delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "hooks"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DPPlan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    target_epsilon: float | None


def default_delta(n_examples: int) -> float:
    return min(1e-5, 0.1 / max(n_examples, 1))


def plan(dp: DPConfig, *, n_examples: int, batch_size: int, steps: int) -> DPPlan:
    """Validate the request and calibrate the noise; FedstError (before any training) when infeasible."""
    if n_examples < 2:
        raise FedstError(f"DP adaptation needs at least 2 spots, the store has {n_examples}")
    if batch_size > n_examples:
        raise FedstError(f"DP batch size {batch_size} exceeds the {n_examples} spots (sample rate must be < 1)")
    if dp.max_grad_norm <= 0 or not math.isfinite(dp.max_grad_norm):
        raise FedstError(f"DP max_grad_norm must be a positive number, got {dp.max_grad_norm}")
    if dp.grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise FedstError(f"DP grad_sample_mode {dp.grad_sample_mode!r}: expected one of {GRAD_SAMPLE_MODES}")
    delta = default_delta(n_examples) if dp.target_delta is None else float(dp.target_delta)
    if not 0 < delta < 1.0 / n_examples:
        raise FedstError(f"DP delta {delta:g} must lie in (0, 1/n_spots = {1.0 / n_examples:g})")
    sample_rate = 1.0 / math.ceil(n_examples / batch_size)  # what Opacus' Poisson loader uses
    if (dp.target_epsilon is None) == (dp.noise_multiplier is None):
        raise FedstError("DP config: give exactly one of target_epsilon or noise_multiplier")
    if dp.noise_multiplier is not None:
        if dp.noise_multiplier <= 0:
            raise FedstError(f"DP noise_multiplier must be > 0, got {dp.noise_multiplier}")
        return DPPlan(float(dp.noise_multiplier), sample_rate, steps, delta, None)
    eps = float(dp.target_epsilon)
    if not (eps > 0 and math.isfinite(eps)):
        raise FedstError(f"DP target epsilon must be a positive finite number, got {dp.target_epsilon}")
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sigma = get_noise_multiplier(
                target_epsilon=eps, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"
            )
        except ValueError as exc:
            raise FedstError(
                f"DP target epsilon={eps:g}, delta={delta:g} is infeasible for {steps} steps at sample rate "
                f"{sample_rate:.4g} ({exc}); raise epsilon or lower steps/batch size"
            ) from None
    return DPPlan(float(sigma), sample_rate, steps, delta, eps)


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps by Opacus' RDP accountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))
