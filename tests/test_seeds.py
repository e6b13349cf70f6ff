"""The one per-site seed derivation, shared by the federation (per round and phase) and the experiment."""

from __future__ import annotations

import zlib

from shared.seeds import site_seed


def test_site_seeds_differ_per_site_and_are_reproducible():
    seeds = {site: site_seed(3, site, "adapt") for site in ("site-0", "site-1", "site-2", "her2st-a")}
    assert len(set(seeds.values())) == len(seeds)  # every site draws its own noise
    assert site_seed(3, "site-0", "adapt") == seeds["site-0"]  # same in every call / process (crc32, not hash)
    assert (
        site_seed(3, "site-0", "adapt") != site_seed(3, "site-0", "synthesize") != site_seed(4, "site-0", "synthesize")
    )
    assert site_seed(3, "site-0", "adapt", 1) != site_seed(3, "site-0", "adapt", 2)
    assert all(0 <= s < 2**31 - 1 for s in seeds.values())


def test_site_seed_reproduces_the_federation_and_experiment_streams():
    """Values of the two former functions (client/site.py per round and phase, server/experiment/arms.py per
    purpose), computed before they were merged: neither random stream changed."""
    assert site_seed(7, "site-1", "pretrain", 3) == 718905811  # federation: pretrain round 3
    assert site_seed(0, "site-0", "synthesize") == 343104735  # federation: one-shot phases use round 0
    assert site_seed(2**40, "her2st-1", "secagg-rounding", 12) == 1108669487
    assert site_seed(7, "site-1", "adapt") == 1366470917  # experiment cell seeds
    assert site_seed(3, "site-0", "audit") == 38565975
    assert site_seed(0, "site-0", "adapt") == zlib.crc32(b"site-0/adapt") % (2**31 - 1)
