"""Conditioning strength: FiLM after the ResNet blocks alone vs also the adaptive norm in attention (adaLN-style).

Reads a finished `fedst demo`'s site directories (each site's EMA central `central.safetensors` and its
`paired-store`), adapts each site locally with and without `attention_film` at the same seed and budget,
synthesises pairs as the federation does and prints the synthesis audit (the probe's PCC on the synthetic images
against its PCC on held-out real spots) with the ratio of the two variants.

python benchmarks/c2l_attention_film.py fedst-demo/sites/<run name> --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from shared.backends.c2l import synthesize_pairs
from shared.c2l.adapt import adapt
from shared.c2l.audit import synthesis_audit
from shared.c2l.central import create_central
from shared.config import RunConfig
from shared.store.format import PatchStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sites", type=Path, help="a demo's sites/<run name> folder")
    parser.add_argument("--out", type=Path, default=Path("/tmp/c2l_attention_film"))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    synth_settings = RunConfig().synthesize
    rows = []
    for site in sorted(p for p in args.sites.iterdir() if (p / "central.safetensors").is_file()):
        central = create_central("tiny")
        central.load_state_dict(load_file(site / "central.safetensors"))
        store = PatchStore(site / "paired-store")
        found = {}
        for attention_film in (False, True):
            start = time.perf_counter()
            model, summary = adapt(
                central, store, steps=args.steps, seed=args.seed, attention_film=attention_film, progress=False
            )
            synthetic = synthesize_pairs(
                central,
                model,
                store,
                args.pairs,
                args.out / f"{site.name}-{attention_film}",
                synth_settings,
                seed=args.seed,
            )
            audit = synthesis_audit(store, synthetic, seed=args.seed)
            found[attention_film] = audit["audit_synthetic_pcc"]
            rows.append(
                dict(
                    site=site.name,
                    attention_film=attention_film,
                    trainable=summary["trainable_params"],
                    seconds=round(time.perf_counter() - start),
                    **audit,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
        print(
            f"{site.name}: synthetic probe PCC {found[False]:.3f} -> {found[True]:.3f} with attention FiLM "
            f"(ratio {found[True] / found[False]:.2f})"
        )
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
