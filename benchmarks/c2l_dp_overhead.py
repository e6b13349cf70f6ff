"""DP overhead of adapter-only DP-SGD: mean adaptation step time with DP / without, measured in the same run.

    python benchmarks/c2l_dp_overhead.py [--preset tiny] [--steps 10] [--batch 16]
Target: ratio <= 2 (per-example gradients are only needed for the small FiLM/encoder layers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from shared.c2l.adapt import adapt
from shared.c2l.central import create_central
from shared.c2l.dp import DPConfig
from shared.c2l.toy import write_toy_store
from shared.c2l.train import default_device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    dev = default_device(None)
    torch.manual_seed(0)
    central = create_central(args.preset)
    times = {"plain": [], "dp": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = write_toy_store(Path(tmp) / "s", n_spots=256, n_tiles=0, patch_px=central.sample_size)
        for _ in range(args.repeats):  # interleaved so load changes hit both arms alike
            for arm, dp in (("plain", None), ("dp", DPConfig(target_epsilon=8.0))):
                _, summary = adapt(
                    central, store, steps=args.steps, batch_size=args.batch, seed=0, dp=dp, device=dev, progress=False
                )
                times[arm].append(summary["mean_step_seconds"])
                if dp is not None:
                    eps, sigma = summary["epsilon"], summary["dp"]["noise_multiplier"]
    plain, private = min(times["plain"]), min(times["dp"])
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(
        json.dumps(
            {
                "preset": args.preset,
                "device": device_name,
                "batch": args.batch,
                "trainable_fraction": summary["trainable_fraction"],
                "step_s_without_dp": plain,
                "step_s_with_dp": private,
                "ratio": private / plain,
                "target_ratio": 2.0,
                "epsilon": eps,
                "noise_multiplier": sigma,
                "delta": summary["delta"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
