"""The experiment's data: per site a prepared store, split by section into a training and a held-out store.

Everything lives under ``<out>/cache`` and is reused by a resumed run. The held-out store never feeds
pretraining, adaptation, synthesis or gene selection: it exists only to be predicted and scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from server.experiment.config import ExperimentConfig, ResolvedSite, resolve_sites
from shared import keys
from shared.arrays import dense
from shared.errors import FedstError, require
from shared.io import write_json_atomic
from shared.store.format import PatchStore
from shared.store.subset import subset_store
from shared.tomlio import write_toml

CACHE = "cache"


@dataclass
class SiteData:
    """One site's stores and its evaluation genes (top-k chosen on its training sections only)."""

    site: ResolvedSite
    full: PatchStore
    train: PatchStore
    test: PatchStore
    genes: list[str]
    gene_index: np.ndarray  # columns of the panel that are evaluated

    @property
    def name(self) -> str:
        return self.site.name


def ensure_consortium(config: ExperimentConfig, out: Path, log: Callable[[str], None] = print) -> Path | None:
    """Generate the synthetic consortium once (a marker records the parameters it was made with)."""
    if config.synthetic is None:
        return None
    from shared.synthetic import generate_consortium

    root = out / CACHE / "consortium"
    params = {"n_sites": config.synthetic.n_sites, "seed": config.synthetic.seed, **config.synthetic.options}
    marker = root / ".generated.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    log(f"generating synthetic consortium ({config.synthetic.n_sites} sites, seed {config.synthetic.seed}) in {root}")
    generate_consortium(root, **params)
    write_json_atomic(marker, params)
    return root


def write_site_toml(site: ResolvedSite, path: Path, panel: Path | None) -> Path:
    """A SITE.toml with absolute paths holding exactly the site's sections (train and held-out)."""
    table: dict[str, Any] = {"site": site.name}
    if panel is not None:
        table["panel"] = panel
    table["sections"] = [dict(section) for section in site.sections]
    return write_toml(path, table)  # unchanged text keeps its mtime, so prepare_store stays a no-op


def select_genes(train: PatchStore, test: PatchStore, top_k: int) -> tuple[list[str], np.ndarray]:
    """Top-k highly variable genes of the TRAINING sections' counts (one batch per section).

    Candidates are genes measured in every section of the site (the measured mask is metadata, not values),
    so every evaluated gene has a truth on the held-out sections.
    """
    import anndata as ad

    from shared.genes import select_hvg

    panel = train.panel
    measured = np.ones(len(panel), dtype=bool)
    for store in (train, test):
        if keys.MEASURED in store.spots.layers:
            measured &= dense(store.spots.layers[keys.MEASURED]).min(axis=0) > 0
    candidates = [g for g, m in zip(panel, measured) if m]
    require(len(candidates) >= 2, f"{train.path}: fewer than 2 genes are measured in every section of the site")
    spots = train.spots
    counts = dense(spots.layers[keys.COUNTS]).astype(np.float32)
    index = {g: i for i, g in enumerate(panel)}
    cols = [index[g] for g in candidates]
    parts = []
    sections = spots.obs[keys.SECTION].astype(str).to_numpy()
    for section in dict.fromkeys(sections):
        part = ad.AnnData(counts[sections == section][:, cols])
        part.var_names = candidates
        parts.append(part)
    chosen = list(select_hvg(parts, n_top=top_k, exclude_prefixes=None))[:top_k]
    require(len(chosen) >= 2, f"{train.path}: gene selection returned {len(chosen)} genes (need >= 2)")
    return chosen, np.array([index[g] for g in chosen], dtype=np.int64)


def prepare_sites(config: ExperimentConfig, out: Path, log: Callable[[str], None] = print) -> list[SiteData]:
    """Resolve, prepare and split every site's data (cached under ``out/cache``)."""
    from shared.splits import section_indices
    from shared.store.prepare import prepare_store

    consortium = ensure_consortium(config, out, log)
    sites = resolve_sites(config, consortium)
    panel = config.panel or next((s.panel for s in sites if s.panel is not None), None)
    if panel is None and consortium is not None and (consortium / "panel.txt").is_file():
        panel = consortium / "panel.txt"
    result = []
    for site in sites:
        root = out / CACHE / "sites" / site.name
        toml = write_site_toml(site, root / "site.toml", panel)
        log(f"preparing store of {site.name} ({len(site.sections)} sections)")
        full = prepare_store(
            toml,
            root / "store",
            panel=panel,
            patch_px=config.run.patch_px,
            field_um=config.store.field_um,
            max_tiles_per_section=config.store.max_tiles_per_section,
            progress=False,
        )
        missing = [s for s in site.section_ids if s not in full.sections]
        require(not missing, f"site {site.name!r}: prepared store {full.path} lacks sections {missing}")
        train_rows = section_indices(full, site.train_sections)
        test_rows = section_indices(full, list(site.held_out))
        require(
            len(train_rows) >= 2,
            f"site {site.name!r}: training sections {site.train_sections} hold {len(train_rows)} spots",
        )
        require(
            len(test_rows) >= 3,
            f"site {site.name!r}: held-out sections {list(site.held_out)} hold {len(test_rows)} spots",
        )
        train = subset_store(
            full, train_rows, root / "train", tile_sections=site.train_sections, note="training sections"
        )
        test = subset_store(full, test_rows, root / "test", tile_sections=[], note="held-out sections")
        genes, gene_index = select_genes(train, test, config.predictor.top_k)
        result.append(SiteData(site, full, train, test, genes, gene_index))
    panels = {tuple(s.full.panel) for s in result}
    if len(panels) > 1:
        raise FedstError(
            "the sites' stores have different gene panels; give the consortium panel with 'panel' in the config"
        )
    return result
