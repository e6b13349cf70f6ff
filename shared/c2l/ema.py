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


EMA_PREFIX = "ema."
"""Federated pretraining carries the EMA shadow beside the weights in one state dict: ``ema.<parameter name>``."""


def with_ema(state: dict, decay: float) -> dict:
    """``state`` plus an EMA shadow equal to the weights (the start of a run), unless ``decay`` is 0 or it has one."""
    if decay <= 0 or any(k.startswith(EMA_PREFIX) for k in state):
        return dict(state)
    return {**state, **{EMA_PREFIX + k: v.copy() if hasattr(v, "copy") else v.clone() for k, v in state.items()}}


def split_ema(state: dict) -> tuple[dict, dict | None]:
    """(the weights, the EMA shadow by parameter name or None) of a federated pretraining state."""
    weights = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    shadow = {k[len(EMA_PREFIX) :]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    return weights, shadow or None


def sampling_weights(state: dict) -> dict:
    """The weights to adapt and sample from: the EMA shadow when the state carries one, else the weights."""
    weights, shadow = split_ema(state)
    return shadow if shadow is not None else weights


def resume_ema(model: nn.Module, shadow: dict, decay: float, steps_done: int) -> EMAModel:
    """An EMA of ``model`` that continues a shadow averaged over ``steps_done`` earlier optimiser steps.

    Each round a site starts from the consortium's averaged shadow, and the warm-up continues where the
    previous rounds left it (d_n with n counted over all rounds), so R rounds of S steps average like one run of
    R x S steps. Averaging the sites' shadows (FedAvg) is the same linear combination as averaging weights.
    """
    import torch

    ema = create_ema(model, decay)
    params = dict(model.named_parameters())
    missing = sorted(set(params) ^ set(shadow))
    if missing:
        from shared.errors import FedstError

        raise FedstError(f"EMA shadow does not match the central model (e.g. tensor {missing[0]!r})")
    ema.shadow_params = [torch.as_tensor(shadow[n]).to(p.dtype).clone() for n, p in params.items()]
    ema.optimization_step = int(steps_done)
    return ema


def shadow_state(ema: EMAModel, model: nn.Module) -> dict:
    """The shadow as a state dict keyed by parameter name (``ema.`` not prefixed)."""
    return {name: s.detach().clone() for (name, _), s in zip(model.named_parameters(), ema.shadow_params)}
