"""Named size presets of the central diffusion model: constructor arguments of `CentralDiffusion`.

`tiny` trains for real on 2 CPU cores (tests, demo); `base` and `large` are for GPUs. Every preset predicts v:
gene-conditioned adaptation learns from the high-noise timesteps, where an epsilon target carries almost none
of the image's signal (shared.c2l.adapt, README "Learning the gene signal quickly").
"""

from __future__ import annotations

from typing import Any

from shared.errors import FedstError

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,  # 2 heads at 64 channels: 1.4x the training steps/s of 8 heads of 8 on CPU
        prediction_type="v_prediction",
    ),
    "base": dict(
        sample_size=128,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=32,
        prediction_type="v_prediction",
    ),
    "large": dict(
        sample_size=256,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 2,
        up_block_types=("AttnUpBlock2D",) * 2 + ("UpBlock2D",) * 4,
        norm_num_groups=32,
        attention_head_dim=64,
        prediction_type="v_prediction",
    ),
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The constructor arguments of preset `name` with `overrides` applied."""
    if name not in PRESETS:
        raise FedstError(f"unknown c2l preset {name!r}; expected one of {', '.join(PRESETS)}")
    config = dict(PRESETS[name])
    config.update(overrides)
    return config
