"""SITE.toml: the list of a site's sections (format, paths relative to the TOML, optional mpp) -> Site.

site = "site-0"              # optional, default: the TOML's file stem
panel = "../panel.txt"       # optional: consortium gene panel, one symbol per line
[[sections]]
id = "S1"
format = "hest"              # visium | hest | legacy-st | h5ad
h5ad = "S1.h5ad"
image = "S1.tif"
mpp = 0.5                    # optional when the image carries its mpp
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from shared.errors import FedstError
from shared.ingest.section import Section, Site
from shared.ingest.slide import check_mpp, image_mpp

FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # format: (required path keys, optional path keys)
    "visium": (("path",), ("image",)),
    "hest": (("h5ad", "image"), ()),
    "h5ad": (("h5ad", "image"), ()),
    "legacy-st": (("counts", "spots", "image"), ()),
}
COMMON_KEYS = {"id", "format", "mpp"}
TOP_KEYS = {"site", "panel", "sections", "labelled-fraction"}  # labelled-fraction: shared/config/node.py


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FedstError(f"{path}: no such file (expected a SITE.toml listing the site's sections)")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedstError(f"{path}: not valid TOML ({exc})") from None


def check_section_spec(spec: Any, index: int, toml_path: Path) -> dict[str, Any]:
    """The section table with its keys checked (unknown keys are usually typos, so they are errors)."""
    where = f"{toml_path}: sections[{index}]"
    if not isinstance(spec, dict):
        raise FedstError(f"{where}: expected a table ([[sections]]), got {type(spec).__name__}")
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise FedstError(f"{where}: field 'format' is {fmt!r} (expected one of {', '.join(FORMATS)})")
    if not isinstance(spec.get("id", ""), str) or not spec.get("id", "x"):
        raise FedstError(f"{where}: field 'id' is {spec.get('id')!r} (expected a non-empty string)")
    required, optional = FORMATS[fmt]
    for key in required:
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise FedstError(f"{where}: format {fmt!r} needs field {key!r} (a path relative to the TOML)")
    unknown = set(spec) - COMMON_KEYS - set(required) - set(optional)
    if unknown:
        allowed = sorted(COMMON_KEYS | set(required) | set(optional))
        raise FedstError(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))} (format {fmt!r} takes {', '.join(allowed)})"
        )
    if "mpp" in spec:
        check_mpp(spec["mpp"], f"{where}.mpp")
    return spec


def load_section(
    spec: dict[str, Any],
    base: Path,
    *,
    mpp: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    convert: bool = True,
) -> Section:
    """Dispatch one checked section table to its reader; paths resolve against ``base`` (the TOML's folder).
    ``mpp``: site-wide fallback, see `load_site`; ``convert``: see `shared.ingest.section.finish_section`."""
    from shared.ingest.generic import load_h5ad_section
    from shared.ingest.hest import load_hest_section
    from shared.ingest.legacy_st import load_legacy_st_section
    from shared.ingest.visium import load_visium_section

    def at(key: str) -> Path | None:
        return (base / spec[key]) if spec.get(key) else None

    fmt = spec["format"]
    sid = spec.get("id")
    value = spec.get("mpp")
    if value is None and mpp is not None:
        # the site-wide --mpp fills in for images that carry none; it never overrides a scanner's own value
        image = at("image")
        carried = image_mpp(image) if image is not None and image.is_file() else None
        value = mpp if carried is None else None
    where = {"section_id": sid, "mpp": value, "cache_dir": cache_dir, "convert": convert}
    if fmt == "visium":
        return load_visium_section(at("path"), at("image"), **where)
    if fmt == "legacy-st":
        return load_legacy_st_section(at("counts"), at("spots"), at("image"), **where)
    reader = load_hest_section if fmt == "hest" else load_h5ad_section
    return reader(at("h5ad"), at("image"), **where)


def parse_site(site_toml: str | os.PathLike) -> tuple[str, Path | None, list[dict[str, Any]]]:
    """(site name, panel path, checked section tables) without reading any data."""
    path = Path(site_toml)
    doc = read_toml(path)
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise FedstError(
            f"{path}: unknown top-level field(s) {', '.join(sorted(unknown))} (expected {', '.join(sorted(TOP_KEYS))})"
        )
    name = doc.get("site", path.stem)
    if not isinstance(name, str) or not name:
        raise FedstError(f"{path}: field 'site' is {name!r} (expected a non-empty string)")
    panel = doc.get("panel")
    if panel is not None and not isinstance(panel, str):
        raise FedstError(f"{path}: field 'panel' is {panel!r} (expected a path to a gene list)")
    panel_path = (path.parent / panel) if panel else None
    if panel_path is not None and not panel_path.is_file():
        raise FedstError(
            f"{path}: field 'panel' names {panel_path}, which does not exist (expected one symbol per line)"
        )
    sections = doc.get("sections")
    if not isinstance(sections, list) or not sections:
        raise FedstError(f"{path}: no [[sections]] (expected at least one section table)")
    specs = [check_section_spec(spec, index, path) for index, spec in enumerate(sections)]
    for index, spec in enumerate(specs):
        spec.setdefault("id", f"{name}-{index}")
    ids = [spec["id"] for spec in specs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise FedstError(f"{path}: duplicate section id(s) {', '.join(dupes)} (expected unique ids)")
    return name, panel_path, specs


def load_site(
    site_toml: str | os.PathLike,
    mpp: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    convert: bool = True,
) -> Site:
    """Read every section a SITE.toml lists. ``mpp`` (the CLI's --mpp) applies to sections that have no
    ``mpp`` field and whose image carries none; it beats the format's derived estimate (Visium spot size, ST
    pitch). Per-section ``mpp`` fields override everything. ``convert=False`` (`fedst data inspect`): every
    check, but no plain image is converted into the slide cache (`shared.ingest.section.finish_section`)."""
    path = Path(site_toml)
    check_mpp(mpp, "--mpp")
    name, panel_path, specs = parse_site(path)
    sections = [load_section(spec, path.parent, mpp=mpp, cache_dir=cache_dir, convert=convert) for spec in specs]
    return Site(name=name, sections=sections, panel_path=panel_path, toml_path=path, spec={"sections": specs})
