"""C2L-ST: central histology diffusion model, gene-conditioned local modulation, DP adaptation, synthesis.

Flower-free (the federation drives these functions with plain torch state dicts). Torch and diffusers are
imported lazily: `from shared.c2l import create_central` loads them only when the name is first used.
`adapt`, `synthesize` and `audit` are imported from their modules (`from shared.c2l.adapt import adapt`):
a package attribute of the same name as a submodule would change meaning once that submodule is imported.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "create_central": "shared.c2l.central",
    "CentralDiffusion": "shared.c2l.central",
    "train_central": "shared.c2l.train",
    "DPConfig": "shared.c2l.dp",
    "ConditionedDiffusion": "shared.c2l.modulation",
    "create_conditioned": "shared.c2l.modulation",
    "save_adapter": "shared.c2l.modulation",
    "load_adapter": "shared.c2l.modulation",
    "create_ema": "shared.c2l.ema",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'shared.c2l' has no attribute {name!r}")
