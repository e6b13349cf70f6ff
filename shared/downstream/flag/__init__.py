"""FLAG (arXiv 2605.18055): spatial graph transformer + gene-token DiT + VE-SDE for H&E -> expression.

Modules, top-down: ``regressor`` (fit/predict/save/load), ``model`` (graph transformer, adaLN-Zero DiT),
``sde`` (loss, Heun sampler), ``graph`` (crops and edge conditions), ``gene_embeddings`` (alignment targets).
Importing this package imports torch: import it lazily.
"""

from .model import PRESETS, FlagModel
from .regressor import FlagRegressor, FlagSettings

__all__ = ["PRESETS", "FlagModel", "FlagRegressor", "FlagSettings"]
