"""DP-SGD for adaptation (Opacus): noise calibrated once for the whole run (every planned round), epsilon from the
RDP accountant, and a per-site privacy ledger that composes every round the site ever ran on its data."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from shared.errors import FedstError, PrivacyBudgetError

GRAD_SAMPLE_MODES = ("hooks", "functorch")


@dataclass(frozen=True)
class DPConfig:
    """Example-level DP for adaptation: either a target (epsilon, delta) or a fixed noise multiplier.

    `target_delta=None` means 0.1 / n_spots (capped at 1e-5 from above), i.e. well below 1 / N.
    `calibration_steps`: the steps the target budget must cover (federated adaptation: every planned round's
    steps; None: this call's steps). `deterministic`: seed the DP noise and the Poisson sampling from the
    caller's seed (bit-identical reruns, for tests only: whoever knows the seed can subtract the noise); by default
    both come from the operating system's entropy (os.urandom), unknown to the server.
    """

    target_epsilon: float | None = None
    target_delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "hooks"
    calibration_steps: int | None = None
    deterministic: bool = False

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
    calibrated = max(int(dp.calibration_steps or steps), steps)
    if not (eps > 0 and math.isfinite(eps)):
        raise FedstError(f"DP target epsilon must be a positive finite number, got {dp.target_epsilon}")
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sigma = get_noise_multiplier(
                target_epsilon=eps, target_delta=delta, sample_rate=sample_rate, steps=calibrated, accountant="rdp"
            )
        except ValueError as exc:
            raise FedstError(
                f"DP target epsilon={eps:g}, delta={delta:g} is infeasible for {calibrated} steps at sample rate "
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


def rdp_epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a composition of (noise multiplier, sample rate, steps) mechanisms (Opacus' RDP accountant)."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


BUDGET_SLACK = 1e-6
"""Relative tolerance on the budget (the calibrated plan lands just below its target, never above it)."""


class PrivacyLedger:
    """Every DP-SGD run a site made on its data, composed (``privacy-ledger.json`` in the site's work dir).

    A round is recorded before its first step (conservative: a crash after it still counts), and refused when the
    composition of everything recorded plus this round would exceed the budget. So a server that asks for more
    rounds than planned, or replays a round, or a second run on the same work dir, cannot make the site spend more
    than its epsilon: the operator has to raise ``dp.epsilon`` knowingly (a new budget), and the ledger still
    counts what was spent before. The file holds only public mechanism parameters (noise multiplier, sample rate,
    steps), never data; its errors name the file, not the site's path (they travel to the server).
    """

    def __init__(self, path):
        from pathlib import Path

        self.path = Path(path)

    def entries(self) -> list[dict[str, Any]]:
        import json

        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"]
            for e in entries:
                float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FedstError(
                f"the site's {self.path.name} (privacy ledger) is unreadable ({type(exc).__name__}); refusing DP "
                "training (never delete it to reset a budget: the spend on this data is real)"
            ) from None
        return list(entries)

    @staticmethod
    def _history(entries: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]

    def spent(self, delta: float) -> float:
        return rdp_epsilon_of(self._history(self.entries()), delta)

    def spend(self, dp_plan: DPPlan, steps: int, *, budget: float, label: str) -> float:
        """Record ``steps`` steps of ``dp_plan``'s mechanism; the cumulative epsilon after them.

        FedstError (nothing recorded) when that would exceed ``budget``."""
        from shared.io import write_json_atomic

        entries = self.entries()
        before = rdp_epsilon_of(self._history(entries), dp_plan.delta)
        entry = {
            "label": label,
            "noise_multiplier": dp_plan.noise_multiplier,
            "sample_rate": dp_plan.sample_rate,
            "steps": int(steps),
            "delta": dp_plan.delta,
        }
        after = rdp_epsilon_of(self._history([*entries, entry]), dp_plan.delta)
        if after > budget * (1 + BUDGET_SLACK):
            raise PrivacyBudgetError(
                f"DP budget: this site has spent epsilon {before:.4g} of its budget {budget:g} on this data "
                f"({len(entries)} earlier runs/rounds in its {self.path.name}); {label} would bring it to {after:.4g}. "
                "Refused (a larger dp.epsilon is a new, larger budget; the ledger keeps counting)"
            )
        write_json_atomic(self.path, {"entries": [*entries, entry], "epsilon_after_last": after})
        return after
