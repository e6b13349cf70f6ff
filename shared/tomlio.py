"""The one TOML writer (tomli-w): SITE.toml files, run-config overrides and single values for Flower flags.

Hand-built f-string TOML broke on a path holding a quote or a backslash; tomli-w escapes every string, and
what fedst writes parses back (tomllib) to exactly the table it meant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from shared.io import write_text_atomic


def _plain(value: Any) -> Any:
    """Paths as strings (TOML has no path type), recursively through tables and arrays."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dumps(data: Mapping[str, Any]) -> str:
    """``data`` as a TOML document (Path values become strings)."""
    return tomli_w.dumps(_plain(data))


def value(v: Any) -> str:
    """One TOML value (a string quoted and escaped), for ``key=value`` pairs on Flower's command lines."""
    return dumps({"v": v}).removeprefix("v = ").rstrip("\n")


def write_toml(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` to ``path`` atomically, leaving the file (and its mtime) alone when it already says that."""
    text = dumps(data)
    path = Path(path)
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    return path
