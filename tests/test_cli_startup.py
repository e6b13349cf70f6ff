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


def _fedst(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli.main", *argv], capture_output=True, text=True, timeout=60)


def test_version() -> None:
    from importlib.metadata import version

    result = _fedst("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"fedst {version('fedst')}"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--backend", "foo"], "error: run config key 'backend' is 'foo'; expected one of c2l, toy"),
        (
            ["--backend", "toy", "--dp-epsilon", "8"],
            "error: run config key 'dp.epsilon': the toy backend has no DP-SGD",
        ),
        (["--strategy", "fedsgd"], "error: run config key 'aggregation.strategy'"),
    ],
)
def test_demo_refuses_bad_or_ignored_options_before_generating_anything(tmp_path, argv, message) -> None:
    out = tmp_path / "demo"
    result = _fedst("demo", *argv, "--out", str(out))
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert "\x1b[" not in result.stderr and not out.exists()  # plain text, nothing generated or started
