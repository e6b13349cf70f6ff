"""Sampling cost vs quality: DDIM / DPM-Solver++ at 25-50 steps against ancestral DDPM at 1000 steps.

Quality proxy: 1-D Wasserstein distance to the exact toy distribution (pixels i.i.d. from a two-Gaussian
mixture) when sampling with its Bayes-optimal denoiser, so only the sampler's discretisation error shows.
Cost: wall time per image with the `tiny` UNet (random init; cost does not depend on the weights).

    python benchmarks/c2l_sampling.py
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from shared.c2l.central import create_central
from shared.c2l.sampling import sample_central
from shared.c2l.schedule import sample
from shared.c2l.toy import mixture_denoiser, mixture_samples
from shared.c2l.train import default_device

RUNS = (("ddpm", 1000), ("ddim", 50), ("ddim", 25), ("dpm", 50), ("dpm", 25))


def main() -> None:
    config = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}
    fn = mixture_denoiser(config)
    reference = mixture_samples(200_000, np.random.default_rng(1))
    dev = default_device(None)
    model = create_central("tiny").to(dev)
    rows = {}
    for sampler, steps in RUNS:
        x = sample(fn, (64, 1, 8, 8), config, sampler=sampler, steps=steps, seed=0).flatten().numpy()
        start = time.perf_counter()
        sample_central(model, 4, sampler=sampler, steps=steps, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rows[f"{sampler}-{steps}"] = {
            "toy_w1": wasserstein_distance(x, reference),
            "tiny_unet_s_per_image": (time.perf_counter() - start) / 4,
        }
    ddpm = rows["ddpm-1000"]["tiny_unet_s_per_image"]
    for row in rows.values():
        row["speedup_vs_ddpm1000"] = ddpm / row["tiny_unet_s_per_image"]
    exact = wasserstein_distance(mixture_samples(4096, np.random.default_rng(2)), reference)
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if dev.type == "cuda" else "CPU",
                "exact_draws_w1 (noise floor)": exact,
                "runs": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
