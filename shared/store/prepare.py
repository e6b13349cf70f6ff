"""`fedst data prepare`: a site's SITE.toml -> its patch store (patches, tissue tiles, expression on the panel).

Slides are read once here (openslide, best pyramid level, resized); training then reads the store's
memory-mapped arrays and never touches a slide again. The store is written through StoreWriter (atomic) and
carries an input fingerprint, so running prepare again on unchanged inputs returns the existing store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from shared import keys
from shared.errors import FedstError, require
from shared.store.fingerprint import PREPARE_VERSION, input_fingerprint
from shared.store.format import PatchStore, StoreWriter, is_store, read_manifest

if TYPE_CHECKING:
    import anndata

    from shared.genes import GenePanel
    from shared.ingest.section import Section

log = logging.getLogger(__name__)

PATCH_PX_RANGE = (16, 512)
DEFAULT_MAX_TILES = 1000
"""Tiles per section when not given: enough for pretraining variety, bounded disk (1000 x 64 px = 12 MB)."""
HVG_TOP = 200
"""Panel size when a site names no panel and its HVGs are used."""
THUMBNAIL_PX = 1024
RESERVED_OBS = {keys.SECTION, keys.PATCH_INDEX, keys.SYNTHETIC, keys.SITE}


def _check_params(patch_px: int, field_um: float, tile_px: int | None, max_tiles: int | None) -> None:
    require(
        isinstance(patch_px, (int, np.integer)) and PATCH_PX_RANGE[0] <= patch_px <= PATCH_PX_RANGE[1],
        f"patch_px must be an integer in {PATCH_PX_RANGE[0]}..{PATCH_PX_RANGE[1]}, got {patch_px!r}",
    )
    require(
        np.isfinite(field_um) and 10.0 <= field_um <= 2000.0,
        f"field_um must be a physical field in 10..2000 microns, got {field_um!r}",
    )
    require(
        tile_px is None or tile_px == patch_px,
        f"tile_px {tile_px} != patch_px {patch_px}: store format v{1} keeps tiles at the patch size",
    )
    require(
        max_tiles is None or (isinstance(max_tiles, (int, np.integer)) and max_tiles >= 0),
        f"max_tiles_per_section must be an integer >= 0, got {max_tiles!r}",
    )


def _resolve_panel(panel: GenePanel | Sequence[str] | str | os.PathLike | None, site_panel: Path | None):
    """(GenePanel or None for HVG, description of its source)."""
    from shared.genes import GenePanel

    if isinstance(panel, GenePanel):
        return panel, f"argument:{panel.source}"
    if isinstance(panel, (str, os.PathLike)):
        return GenePanel.read(panel), f"file:{Path(panel).resolve()}"
    if panel is not None:
        return GenePanel(list(panel), source="argument"), "argument:list"
    if site_panel is not None:
        return GenePanel.read(site_panel), f"site.toml:{site_panel.resolve()}"
    return None, f"hvg:seurat:top{HVG_TOP}"


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int], Callable[[], None]]]:
    """Yields task(description, total) -> advance(); a rich progress bar when enabled, silent otherwise."""
    if not enabled:
        yield lambda description, total: lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False
    ) as bar:

        def task(description: str, total: int) -> Callable[[], None]:
            task_id = bar.add_task(description, total=total)
            return lambda: bar.advance(task_id)

        yield task


def section_expression(section: Section, panel: GenePanel) -> tuple[anndata.AnnData, int]:
    """The section's spots on the panel: X normalised, layers counts/measured; spots without counts dropped."""
    import anndata as ad

    from shared.genes import library_size, normalise

    adata = section.adata
    counts, measured = panel.align(adata, section=section.section_id)
    size = library_size(adata)
    keep = size > 0
    dropped = int((~keep).sum())
    if dropped:
        log.warning("section %s: %d spot(s) without any counts dropped", section.section_id, dropped)
    require(bool(keep.any()), f"section {section.section_id}: no spot has any counts")
    obs = adata.obs.loc[keep, [c for c in adata.obs.columns if c not in RESERVED_OBS]].copy()
    obs.index = [f"{section.section_id}:{name}" for name in adata.obs_names[keep]]
    spots = ad.AnnData(
        X=normalise(counts[keep], size[keep]),
        obs=obs,
        layers={
            keys.COUNTS: counts[keep].astype(np.float32),
            keys.MEASURED: np.broadcast_to(measured.astype(np.float32), (int(keep.sum()), len(panel))).copy(),
        },
    )
    spots.var_names = list(panel)
    spots.obs[keys.SECTION] = section.section_id
    spots.obs["library_size"] = size[keep].astype(np.float32)
    spots.obsm[keys.SPATIAL] = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64)[keep]
    for name, value in adata.obsm.items():
        if name != keys.SPATIAL and isinstance(value, np.ndarray) and value.ndim == 2:
            spots.obsm[name] = np.asarray(value)[keep]
    return spots, dropped


def prepare_store(
    site_toml: str | os.PathLike,
    out: str | os.PathLike,
    *,
    panel: GenePanel | Sequence[str] | str | os.PathLike | None = None,
    patch_px: int = 64,
    field_um: float = 112.0,
    tile_px: int | None = None,
    max_tiles_per_section: int | None = None,
    mpp: float | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> PatchStore:
    """Build (or find up to date) the patch store of the site a SITE.toml lists.

    ``panel``: a GenePanel, a list of symbols or a panel file; else the SITE.toml's ``panel``; else the site's
    top HVGs (a warning: sites must share one panel). Patches are ``patch_px`` wide over ``field_um`` microns
    centred on each spot; tiles have the same field and size on a grid over the tissue, at most
    ``max_tiles_per_section`` per section (default 1000). ``mpp`` is used for sections with no mpp of their own.
    """
    from shared.ingest.site import FORMATS, load_section, parse_site
    from shared.ingest.slide import check_mpp

    site_toml, out = Path(site_toml), Path(out)
    _check_params(patch_px, field_um, tile_px, max_tiles_per_section)
    check_mpp(mpp, "--mpp")
    max_tiles = DEFAULT_MAX_TILES if max_tiles_per_section is None else int(max_tiles_per_section)
    site_name, site_panel, specs = parse_site(site_toml)
    chosen_panel, panel_source = _resolve_panel(panel, site_panel)
    params: dict[str, Any] = {
        "field_um": float(field_um),
        "patch_px": int(patch_px),
        "tile_field_um": float(field_um),
        "max_tiles_per_section": max_tiles,
        "mpp_override": mpp,
        "panel_source": panel_source,
        "normalisation": f"log1p(counts / library_size * {keys.TARGET_SUM:g}), library size over all source genes",
    }
    path_keys = {fmt: required + optional for fmt, (required, optional) in FORMATS.items()}
    fingerprint = input_fingerprint(
        site_toml, specs, path_keys, list(chosen_panel) if chosen_panel is not None else None, params
    )
    if is_store(out):
        try:
            if read_manifest(out).get("input_fingerprint") == fingerprint:
                log.info("%s: up to date (same inputs and parameters), nothing to do", out)
                return PatchStore(out)
        except FedstError:
            pass  # an incomplete or foreign-version store is simply rebuilt
    import anndata as ad  # heavy imports only once there is work to do (a no-op costs a few stat calls)
    import pandas as pd

    from shared.genes import select_hvg
    from shared.store.tissue import tile_grid, tissue_mask

    sections = [load_section(spec, site_toml.parent, mpp=mpp, cache_dir=cache_dir) for spec in specs]
    if chosen_panel is None:
        chosen_panel = select_hvg([s.adata for s in sections], n_top=HVG_TOP)
        log.warning(
            "%s names no panel: using the site's %d most variable genes. Sites of one consortium must "
            "share a panel: pass --panel or set `panel = ...` in SITE.toml",
            site_toml,
            len(chosen_panel),
        )
    tables, dropped = [], {}
    for section in sections:
        spots, n_dropped = section_expression(section, chosen_panel)
        tables.append(spots)
        dropped[section.section_id] = n_dropped
    spots = ad.concat(tables, join="outer", merge="same") if len(tables) > 1 else tables[0]
    spots.obs[keys.PATCH_INDEX] = np.arange(spots.n_obs, dtype=np.int64)
    spots.obs[keys.SYNTHETIC] = False
    spots.obs[keys.SITE] = pd.Categorical([site_name] * spots.n_obs)
    spots.obs[keys.SECTION] = pd.Categorical(
        spots.obs[keys.SECTION].astype(str), categories=[s.section_id for s in sections]
    )
    spots.strings_to_categoricals()  # what write_h5ad would do anyway, without its log lines
    spots.uns[keys.MPP] = {s.section_id: float(s.mpp) for s in sections}
    spots.uns[keys.PROVENANCE] = {s.section_id: dict(s.adata.uns.get(keys.PROVENANCE, {})) for s in sections}

    slides = {s.section_id: s.open_slide() for s in sections}
    try:
        tile_centres = {}
        for section in sections:
            slide = slides[section.section_id]
            thumb, scale = slide.thumbnail(THUMBNAIL_PX)
            tile_size = field_um / slide.mpp
            tile_centres[section.section_id] = tile_grid(
                tissue_mask(thumb), scale, tile_size, slide.width, slide.height, max_tiles=max_tiles
            )
        tile_table = pd.DataFrame(
            {
                keys.SECTION: [sid for sid, c in tile_centres.items() for _ in range(len(c))],
                "x": np.concatenate([c[:, 0] for c in tile_centres.values()]) if tile_centres else [],
                "y": np.concatenate([c[:, 1] for c in tile_centres.values()]) if tile_centres else [],
            }
        )
        with StoreWriter(out, patch_px=patch_px) as writer, _progress(progress) as task:
            patches = writer.allocate_patches(spots.n_obs)
            row = 0
            for section, table in zip(sections, tables):
                slide, advance = slides[section.section_id], task(f"patches {section.section_id}", table.n_obs)
                for cx, cy in table.obsm[keys.SPATIAL]:
                    patches[row] = slide.read_patch(cx, cy, field_um, patch_px)
                    row += 1
                    advance()
            tiles = writer.allocate_tiles(len(tile_table))
            for sid, centres in tile_centres.items():
                advance = task(f"tiles {sid}", len(centres))
                offset = int(np.flatnonzero(tile_table[keys.SECTION].to_numpy() == sid)[0]) if len(centres) else 0
                for i, (cx, cy) in enumerate(centres):
                    tiles[offset + i] = slides[sid].read_patch(cx, cy, field_um, patch_px)
                    advance()
            writer.set_tile_table(tile_table)
            writer.set_spots(spots)
            writer.manifest.update(
                params={**params, "mpp": {s.section_id: float(s.mpp) for s in sections}},
                provenance={
                    "site": site_name,
                    "site_toml": str(site_toml.resolve()),
                    "prepare": PREPARE_VERSION,
                    "panel_source": panel_source,
                    "spots_dropped_without_counts": dropped,
                    "sections": {
                        s.section_id: {"format": s.format, "slide": str(s.slide_path), "spots": int(t.n_obs)}
                        for s, t in zip(sections, tables)
                    },
                },
                synthetic=False,
                input_fingerprint=fingerprint,
            )
    finally:
        for slide in slides.values():
            slide.close()
    store = PatchStore(out)
    log.info("%s: %d spots, %d tiles, %d genes", out, store.n_spots, store.n_tiles, len(store.panel))
    return store
