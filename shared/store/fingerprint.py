"""The input fingerprint of a store: what must change for `prepare` to do the work again.

Hashes the SITE.toml's bytes, the size and modification time of every file its sections name (a Space
Ranger folder: every file under it), the panel's symbols and the preparation parameters. Sizes + mtimes,
not content hashes: a whole-slide image is gigabytes and re-hashing it to find nothing changed would cost
as much as the work the no-op saves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

PREPARE_VERSION = "fedst.prepare/1"
"""Part of the fingerprint: bump when the store's content for the same inputs changes."""


def _file_entry(path: Path, base: Path) -> dict[str, Any]:
    try:
        name = str(path.relative_to(base))
    except ValueError:
        name = str(path)
    if not path.exists():
        return {"path": name, "missing": True}
    stat = path.stat()
    return {"path": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def input_files(specs: list[dict[str, Any]], base: Path, path_keys: dict[str, tuple[str, ...]]) -> list[Path]:
    """Every input file the section tables name (folders expanded), in a stable order."""
    files: list[Path] = []
    for spec in specs:
        for key in path_keys.get(spec["format"], ()):
            if not spec.get(key):
                continue
            path = (base / spec[key]).resolve()
            if path.is_dir():
                files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
            else:
                files.append(path)
    return files


def input_fingerprint(
    site_toml: Path,
    specs: list[dict[str, Any]],
    path_keys: dict[str, tuple[str, ...]],
    panel: list[str] | None,
    params: dict[str, Any],
) -> str:
    """SHA-256 (hex) of everything that determines a store's content."""
    site_toml = Path(site_toml).resolve()
    base = site_toml.parent
    record = {
        "version": PREPARE_VERSION,
        "site_toml": hashlib.sha256(site_toml.read_bytes()).hexdigest(),
        "files": [_file_entry(p, base) for p in input_files(specs, base, path_keys)],
        "panel": panel,
        "params": params,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
