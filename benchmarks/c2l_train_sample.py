"""C2L central model throughput: training steps/s and sampling images/s (DDIM) for a preset, CPU or GPU.

python benchmarks/c2l_train_sample.py [--preset tiny] [--steps 20] [--batch 16] [--n 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from shared.c2l.central import create_central
from shared.c2l.sampling import sample_central
from shared.c2l.toy import write_toy_store
from shared.c2l.train import default_device, train_central


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n", type=int, default=16, help="images sampled")
    parser.add_argument("--sample-steps", type=int, default=25)
    args = parser.parse_args()
    dev = default_device(None)
    torch.manual_seed(0)
    model = create_central(args.preset)
    px = model.sample_size
    with tempfile.TemporaryDirectory() as tmp:
        store = write_toy_store(Path(tmp) / "s", n_spots=64, n_tiles=128, patch_px=px)
        train_central(model, [store], steps=2, batch_size=args.batch, seed=0, device=dev, progress=False)  # warm-up
        summary = train_central(
            model, [store], steps=args.steps, batch_size=args.batch, seed=1, device=dev, progress=False
        )
    model.to(dev)
    sample_central(model, 2, steps=2, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    sample_central(model, args.n, sampler="ddim", steps=args.sample_steps, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "preset": args.preset,
        "device": device_name,
        "px": px,
        "params": model.num_parameters(),
        "batch": args.batch,
        "train_steps_per_s": summary["steps_per_s"],
        "train_images_per_s": summary["steps_per_s"] * args.batch,
        "sampling": f"DDIM {args.sample_steps} steps, batch {args.n}",
        "sample_images_per_s": args.n / seconds,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
