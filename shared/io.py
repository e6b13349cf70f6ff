"""One way to write a file that readers may see at any moment: temp file in the same folder, fsync, rename.

A reader (a resumed run, `fedst federation status`, a dashboard polling results.json) sees either the previous
complete file or the new complete one, never a partial write; a failed write leaves no temp file behind.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def json_default(value: Any) -> Any:
    """JSON for the values fedst writes besides plain Python: numpy scalars/arrays, paths, tuples."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, payload: Any, *, sort_keys: bool = False) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=sort_keys, default=json_default))


def write_h5ad_atomic(adata: Any, path: Path) -> None:
    """Write an AnnData to ``path`` atomically (anndata writes in place: a crash would leave half an HDF5)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp.h5ad"
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
