"""Splits by section (deterministic, disjoint) and nested spot-fraction subsets."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from shared import keys
from shared.errors import FedstError
from shared.splits import fraction_subset, section_indices, split_sections, store_split

SECTIONS = [f"S{i}" for i in range(10)]


def test_section_split_is_a_deterministic_partition():
    split = split_sections(SECTIONS, val=0.2, test=0.2, seed=3)
    assert (len(split.train), len(split.val), len(split.test)) == (6, 2, 2)
    assert sorted(split.train + split.val + split.test) == sorted(SECTIONS)
    assert split == split_sections(list(reversed(SECTIONS)), val=0.2, test=0.2, seed=3)  # order-free
    assert split != split_sections(SECTIONS, val=0.2, test=0.2, seed=4)
    assert split.part_of(split.test[0]) == "test"


def test_integer_counts_and_minimum_one_section():
    split = split_sections(SECTIONS[:3], val=1, test=1)
    assert (len(split.train), len(split.val), len(split.test)) == (1, 1, 1)
    # a small non-zero fraction of 3 sections still yields one test section
    assert len(split_sections(SECTIONS[:3], test=0.1).test) == 1
    # a single section stays in train rather than failing on a default test fraction
    assert split_sections(["only"], test=0.0).train == ["only"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"test": 2, "val": 1}, "leave none"),
        ({"test": -1}, "count >= 0"),
        ({"test": 1.5}, "fraction in"),
    ],
)
def test_bad_split_requests(kwargs, message):
    with pytest.raises(FedstError, match=message):
        split_sections(SECTIONS[:3], **kwargs)


def test_duplicate_sections_are_refused():
    with pytest.raises(FedstError, match="duplicate section ids"):
        split_sections(["A", "A", "B"])


def test_fraction_subsets_are_nested_seeded_and_sized():
    pool = np.arange(100, 300)
    subsets = {f: fraction_subset(pool, f, seed=7) for f in (0.1, 0.25, 0.5, 1.0)}
    assert [len(s) for s in subsets.values()] == [20, 50, 100, 200]
    assert set(subsets[0.1]) <= set(subsets[0.25]) <= set(subsets[0.5]) <= set(subsets[1.0]) == set(pool)
    assert all(np.all(np.diff(s) > 0) for s in subsets.values())  # sorted, unique
    np.testing.assert_array_equal(subsets[0.25], fraction_subset(pool, 0.25, seed=7))
    assert not np.array_equal(subsets[0.25], fraction_subset(pool, 0.25, seed=8))
    assert len(fraction_subset(10, 0.01)) == 1  # ceil: never empty
    with pytest.raises(FedstError, match="fraction must be in"):
        fraction_subset(pool, 0.0)


def _spots() -> ad.AnnData:
    sections = np.repeat(["A", "B", "C", "D", "E"], [3, 4, 5, 6, 7])
    adata = ad.AnnData(np.zeros((len(sections), 2), dtype=np.float32))
    adata.obs = pd.DataFrame({keys.SECTION: sections}, index=[f"s{i}" for i in range(len(sections))])
    return adata


def test_section_indices_and_store_split_follow_sections():
    spots = _spots()
    np.testing.assert_array_equal(section_indices(spots, ["B", "D"]), [3, 4, 5, 6, 12, 13, 14, 15, 16, 17])
    with pytest.raises(FedstError, match=r"sections \['Z'\] not in the spot table"):
        section_indices(spots, ["Z"])
    parts = store_split(spots, val=1, test=1, seed=0)
    sections = spots.obs[keys.SECTION].to_numpy()
    groups = {name: set(sections[idx]) for name, idx in parts.items()}
    assert len(groups["val"]) == 1 and len(groups["test"]) == 1 and len(groups["train"]) == 3
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"])
    assert sum(len(i) for i in parts.values()) == spots.n_obs
    half = store_split(spots, val=1, test=1, seed=0, train_fraction=0.5)
    assert set(half["train"]) <= set(parts["train"])
    assert len(half["train"]) == int(np.ceil(len(parts["train"]) / 2))
