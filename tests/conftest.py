"""Shared fixtures: the real data in ../shared/data (skipped cleanly when absent) and a generated consortium."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import shared_path


@pytest.fixture
def shared_data() -> Path:
    return shared_path()


@pytest.fixture(scope="session")
def synthetic_consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated consortium (3 sites, fixed seed) in the real on-disk formats, shared by the session."""
    from shared.synthetic import generate_consortium

    out = tmp_path_factory.mktemp("consortium")
    generate_consortium(out, n_sites=3, seed=0)
    return out


@pytest.fixture(scope="session")
def synthetic_stores(synthetic_consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    """The generated consortium's sites prepared as 32 px patch stores (the tiny preset's resolution)."""
    from shared.store.prepare import prepare_store

    out = tmp_path_factory.mktemp("stores")
    return [
        prepare_store(site / "site.toml", out / site.name, patch_px=32, progress=False)
        for site in sorted(synthetic_consortium.glob("site-*"))
    ]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread: small models on 2 cores run several times faster than with 2 oversubscribed threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
