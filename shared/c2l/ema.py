"""Exponential moving average of the central model's weights: diffusers' EMAModel with fedst's warm-up."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel
    from torch import nn


def create_ema(model: nn.Module, decay: float = 0.999) -> EMAModel:
    """An EMA of ``model``'s parameters whose n-th ``step`` uses d_n = min(decay, (1 + n) / (10 + n)):
    shadow <- shadow - (1 - d_n) * (shadow - weights), so early shadows are not stuck at the initial weights.

    diffusers starts that warm-up one update later by default (d_1 = 0, d_n = n / (9 + n));
    ``update_after_step=-1`` keeps the schedule fedst has always used (pinned in tests/test_c2l_core.py).
    The central model has no buffers and trains every parameter, so the shadow parameters are its whole
    state dict.
    """
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=float(decay), update_after_step=-1)
