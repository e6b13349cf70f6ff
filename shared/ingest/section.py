"""The data model: a Section (one tissue slide: spots x genes AnnData + its H&E image) and a Site."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared import keys
from shared.ingest import validate

if TYPE_CHECKING:
    import anndata

    from shared.ingest.slide import Slide

READER_VERSION = "fedst.ingest/1"


@dataclass
class Section:
    """One tissue section. ``adata``: raw counts in X, obsm[SPATIAL] in full-resolution pixels of the
    image at ``slide_path``, uns[MPP] == ``mpp``, uns[PROVENANCE] says where it came from. ``slide_path`` is
    openslide-readable, except for a section read with ``convert=False`` (inspect): there a plain JPEG/PNG is
    the source image itself, which `open_slide` converts (once, into the slide cache) when first opened."""

    section_id: str
    adata: anndata.AnnData
    slide_path: Path
    mpp: float

    def open_slide(self) -> Slide:
        from shared.ingest.slide import open_slide

        return open_slide(self.slide_path, mpp=self.mpp)

    @property
    def format(self) -> str:
        return str(self.adata.uns.get(keys.PROVENANCE, {}).get("format", "unknown"))

    def describe(self) -> dict[str, Any]:
        from shared.ingest.slide import image_size

        width, height = image_size(self.slide_path)  # the header: describing a section converts nothing
        return {
            "id": self.section_id,
            "format": self.format,
            "spots": int(self.adata.n_obs),
            "genes": int(self.adata.n_vars),
            "mpp": self.mpp,
            "width": width,
            "height": height,
            "slide": str(self.slide_path),
        }


@dataclass
class Site:
    """A site's sections as listed by its SITE.toml, and the consortium panel it names (if any)."""

    name: str
    sections: list[Section]
    panel_path: Path | None = None
    toml_path: Path | None = None
    spec: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "site",
            "site": self.name,
            "path": str(self.toml_path) if self.toml_path else None,
            "panel": str(self.panel_path) if self.panel_path else None,
            "sections": [section.describe() for section in self.sections],
        }


def finish_section(
    section_id: str,
    adata: anndata.AnnData,
    image: Path,
    mpp: float,
    provenance: dict[str, Any],
    source: str,
    cache_dir: str | os.PathLike | None = None,
    convert: bool = True,
) -> Section:
    """Stamp the data-model keys onto ``adata`` and check it against the image's size; only then convert a
    plain image into the slide cache (so bad input writes nothing) and return the Section.

    ``convert=False`` (`fedst data inspect`): the same checks, the image's included (`check_image`), but a
    plain image is not converted: the Section points at the image itself and nothing is written."""
    from shared.ingest.slide import check_image, ensure_pyramidal, image_size, open_slide

    adata.obsm[keys.SPATIAL] = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64)
    adata.uns[keys.MPP] = float(mpp)
    adata.obs[keys.SECTION] = section_id
    validate.check_section_adata(adata, source)
    width, height = image_size(image)
    validate.check_coordinates(adata.obsm[keys.SPATIAL], width, height, source, str(image))
    if convert:
        slide_path = ensure_pyramidal(image, mpp, cache_dir)
        with open_slide(slide_path, mpp=mpp):
            pass  # fails here, clearly, when the converted or given slide is unreadable
    else:
        slide_path = check_image(image, mpp)
    adata.uns[keys.PROVENANCE] = {
        "section": section_id,
        "reader": READER_VERSION,
        "image": str(Path(image).resolve()),
        "slide": str(slide_path),
        **{key: (str(value) if isinstance(value, Path) else value) for key, value in provenance.items()},
    }
    return Section(section_id=section_id, adata=adata, slide_path=Path(slide_path), mpp=float(mpp))
