"""Train/val/test splits by section, and nested spot-fraction subsets for data-limited experiments.

Splits are by section (never by spot inside a section: neighbouring spots share tissue, so a spot split
leaks). Fraction subsets are nested (the 10% subset lies inside the 25% subset) so that a sweep over
fractions measures the effect of data size, not of which spots were drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from shared import keys
from shared.errors import FedstError, require

if TYPE_CHECKING:
    import anndata

    from shared.store.format import PatchStore


@dataclass(frozen=True)
class SectionSplit:
    """Section ids of each part; disjoint, every section in exactly one part."""

    train: list[str]
    val: list[str]
    test: list[str]

    def part_of(self, section: str) -> str:
        for name in ("train", "val", "test"):
            if section in getattr(self, name):
                return name
        raise FedstError(f"section {section!r} is in no part of this split")


def _count(value: float | int, n: int, name: str) -> int:
    """A float below 1 is a fraction of n; anything else is a whole number of sections."""
    if isinstance(value, float) and value < 1.0:
        require(value >= 0.0, f"split: {name} fraction must be in [0, 1), got {value}")
        return int(round(value * n))
    require(
        float(value).is_integer() and value >= 0,
        f"split: {name} must be a fraction in [0, 1) or a count >= 0, got {value}",
    )
    return int(value)


def split_sections(
    sections: Sequence[str], *, val: float | int = 0.0, test: float | int = 0.2, seed: int = 0
) -> SectionSplit:
    """Deterministic split of section ids (fractions in [0, 1) or integer counts); train keeps >= 1 section.

    The result depends only on the SET of sections and the seed (input order does not matter). A non-zero
    fraction gets at least one section when that still leaves one for training.
    """
    unique = sorted(dict.fromkeys(str(s) for s in sections))
    require(len(unique) == len(sections), f"split: duplicate section ids in {list(sections)}")
    n = len(unique)
    require(n > 0, "split: no sections given")
    n_test = _count(test, n, "test")
    n_val = _count(val, n, "val")
    if n_test == 0 and test and n - n_val > 1:
        n_test = 1
    if n_val == 0 and val and n - n_test > 1:
        n_val = 1
    require(n_test + n_val < n, f"split: {n_test} test + {n_val} val sections leave none of {n} for training")
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [unique[i] for i in order]
    test_ids = sorted(shuffled[:n_test])
    val_ids = sorted(shuffled[n_test : n_test + n_val])
    train_ids = sorted(shuffled[n_test + n_val :])
    return SectionSplit(train=train_ids, val=val_ids, test=test_ids)


def _spot_table(source: PatchStore | anndata.AnnData) -> anndata.AnnData:
    return source.spots if hasattr(source, "spots") and hasattr(source, "manifest") else source  # type: ignore[return-value]


def section_indices(source: PatchStore | anndata.AnnData, sections: Sequence[str]) -> np.ndarray:
    """Row indices (sorted, int64) of the spots of ``sections`` in a store's spot table (or an AnnData)."""
    obs = _spot_table(source).obs
    require(keys.SECTION in obs, f"spot table has no obs[{keys.SECTION!r}]")
    present = set(obs[keys.SECTION].astype(str))
    unknown = [s for s in sections if str(s) not in present]
    require(not unknown, f"split: sections {unknown} not in the spot table (has {sorted(present)})")
    mask = obs[keys.SECTION].astype(str).isin([str(s) for s in sections]).to_numpy()
    return np.flatnonzero(mask).astype(np.int64)


def fraction_subset(indices: np.ndarray | int, fraction: float, *, seed: int = 0) -> np.ndarray:
    """A seeded subset of ``indices`` (or of range(n)) with ceil(fraction * n) elements, sorted.

    Nested by construction: every fraction takes a prefix of the same seeded permutation, so for one seed
    and one index set, subset(0.1) is inside subset(0.25) is inside subset(1.0).
    """
    pool = np.arange(indices) if isinstance(indices, (int, np.integer)) else np.asarray(indices, dtype=np.int64)
    require(pool.ndim == 1, f"fraction_subset: indices must be 1-D, got shape {pool.shape}")
    require(0.0 < fraction <= 1.0, f"fraction_subset: fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(len(pool))
    take = min(len(pool), math.ceil(fraction * len(pool) - 1e-9))
    return np.sort(pool[order[:take]])


def store_split(
    store: PatchStore | anndata.AnnData,
    *,
    val: float | int = 0.0,
    test: float | int = 0.2,
    seed: int = 0,
    train_fraction: float = 1.0,
) -> dict[str, np.ndarray]:
    """Spot indices of a store for train (optionally a nested fraction), val and test, split by section."""
    obs = _spot_table(store).obs
    sections = list(dict.fromkeys(obs[keys.SECTION].astype(str)))
    split = split_sections(sections, val=val, test=test, seed=seed)
    train = section_indices(store, split.train)
    if train_fraction < 1.0:
        train = fraction_subset(train, train_fraction, seed=seed)
    return {
        "train": train,
        "val": section_indices(store, split.val) if split.val else np.zeros(0, dtype=np.int64),
        "test": section_indices(store, split.test) if split.test else np.zeros(0, dtype=np.int64),
    }


def downstream_held_out(sections: Sequence[str]) -> str | None:
    """The section a site's federated downstream phase evaluates on: the last by name (None: only one section).

    One rule for every phase: adaptation and synthesis must not see this section's expression either, or the
    synthetic pairs would carry the test labels into the predictor's training data.
    """
    names = sorted({str(s) for s in sections})
    return names[-1] if len(names) > 1 else None
