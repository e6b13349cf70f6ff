"""The central denoiser: a diffusers UNet2DModel over H&E patches whose constructor args are its saved config."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from shared.c2l import checkpoint
from shared.c2l.presets import preset_config
from shared.errors import FedstError
from shared.persistence import Pretrained

PREDICTION_TYPES = ("epsilon", "v_prediction")


class CentralDiffusion(nn.Module, Pretrained):
    """Unconditional pixel-space denoiser (GroupNorm, timestep embedding, attention at low resolution).

    `forward(x, t)` is pure and returns the model output (epsilon or v, by `prediction_type`). The noise
    schedule parameters live in the config too, so a saved model carries everything needed to sample.
    `save_pretrained(dir)` writes config.json (constructor args) + model.safetensors (shared/persistence.py).
    """

    kind = "c2l-central"

    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        block_out_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D"),
        up_block_types: Sequence[str] = ("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups: int = 8,
        attention_head_dim: int = 8,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        panel: Sequence[str] | None = None,
    ):
        super().__init__()
        from diffusers import UNet2DModel

        if prediction_type not in PREDICTION_TYPES:
            raise FedstError(f"prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
        if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
            raise FedstError("central config: down/up block types must have one entry per block_out_channels")
        if sample_size % (2 ** (len(block_out_channels) - 1)):
            raise FedstError(f"central config: sample_size {sample_size} not divisible by the UNet's downsampling")
        self.config: dict[str, Any] = dict(
            sample_size=int(sample_size),
            in_channels=int(in_channels),
            block_out_channels=[int(c) for c in block_out_channels],
            layers_per_block=int(layers_per_block),
            down_block_types=list(down_block_types),
            up_block_types=list(up_block_types),
            norm_num_groups=int(norm_num_groups),
            attention_head_dim=int(attention_head_dim),
            prediction_type=prediction_type,
            num_train_timesteps=int(num_train_timesteps),
            beta_schedule=beta_schedule,
            panel=None if panel is None else [str(g) for g in panel],
        )
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            norm_num_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
        )

    @property
    def sample_size(self) -> int:
        return self.config["sample_size"]

    @property
    def panel(self) -> list[str] | None:
        return self.config["panel"]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def weights_hash(self) -> str:
        return checkpoint.weights_hash(self.state_dict())


def create_central(preset: str = "tiny", **overrides: Any) -> CentralDiffusion:
    """A freshly initialised central model of a named preset (random init; nothing is downloaded)."""
    return CentralDiffusion(**preset_config(preset, **overrides))
