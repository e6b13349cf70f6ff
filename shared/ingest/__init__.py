"""Reading site data into the fedst data model (see shared/keys.py): a Section is an AnnData (spots x genes,
raw counts) + an openslide-readable image; a Site is the sections a SITE.toml lists.

Imports here are light (no anndata/openslide until a reader runs)."""

from shared.ingest.generic import load_h5ad_section
from shared.ingest.hest import load_hest_section
from shared.ingest.legacy_st import load_legacy_st_section
from shared.ingest.section import Section, Site
from shared.ingest.site import load_section, load_site, parse_site
from shared.ingest.slide import Slide, ensure_pyramidal, open_slide, write_pyramidal_tiff
from shared.ingest.visium import load_visium_section

__all__ = [
    "Section",
    "Site",
    "Slide",
    "ensure_pyramidal",
    "load_h5ad_section",
    "load_hest_section",
    "load_legacy_st_section",
    "load_section",
    "load_site",
    "load_visium_section",
    "open_slide",
    "parse_site",
    "write_pyramidal_tiff",
]
