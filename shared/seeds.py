"""Per-site seeds: the one derivation the federation (per round and phase) and the experiment (per purpose) use."""

from __future__ import annotations

import zlib


def site_seed(seed: int, site: str, purpose: str, server_round: int = 0) -> int:
    """``seed`` made distinct per site, purpose (phase) and Flower round, identical in every run and process.

    crc32 is stable across processes, unlike ``hash``. Sites must not share noise: with one seed every site
    would draw the same batch order and the same diffusion noise, correlating their "independent" updates and
    synthetic sets. Round 0 (the default) is the value for one-shot purposes (synthesis, downstream, the
    experiment's cells), so the federation's and the experiment's streams both stay what they were.
    """
    return (int(seed) * 1_000_003 + zlib.crc32(f"{site}/{purpose}".encode()) + int(server_round) * 7919) % (2**31 - 1)
