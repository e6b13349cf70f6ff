"""`fedst --help` must stay instant: command modules import only typer; heavy libraries load inside commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "openslide", "scanpy", "anndata", "sklearn", "diffusers", "opacus", "timm", "flwr", "matplotlib")


def test_cli_import_loads_no_heavy_library() -> None:
    code = f"import sys, json; import shared.cli.main; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == []


@pytest.mark.parametrize(
    "argv",
    [[], ["data"], ["c2l"], ["drift"], ["evaluate"], ["predict"], ["impute"], ["demo"], ["experiment"]],
)
def test_help_of_every_command(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli.main", *argv, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
