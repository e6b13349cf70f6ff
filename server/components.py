"""Load the consortium's ClientApp by its component reference, as Flower does, instead of importing it.

The server layer never imports ``client`` (an import-linter contract in pyproject.toml): an in-process run (the
experiment's LocalGrid) resolves ``[tool.flwr.app.components] clientapp`` from the app's pyproject.toml, so the
ServerApp side works with whatever ClientApp the app declares.
"""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path
from typing import Any

from shared.errors import FedstError

APP_DIR = Path(__file__).resolve().parents[1]
DEFAULT_CLIENTAPP = "client.app:app"


def component_reference(name: str = "clientapp", app_dir: Path = APP_DIR) -> str:
    """``module:attribute`` of a component in the app's pyproject.toml (the default when no pyproject ships)."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        return DEFAULT_CLIENTAPP
    components = (
        tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    )
    reference = components.get(name)
    if not isinstance(reference, str) or ":" not in reference:
        raise FedstError(
            f"{pyproject}: [tool.flwr.app.components] {name} must be 'module:attribute', got {reference!r}"
        )
    return reference


def load_component(reference: str) -> Any:
    """Import ``module:attribute`` and return the attribute (a ClientApp or ServerApp)."""
    module_name, _, attribute = reference.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise FedstError(f"component {reference!r} cannot be loaded ({exc})") from None


def load_client_app(app_dir: Path = APP_DIR) -> Any:
    return load_component(component_reference("clientapp", app_dir))
