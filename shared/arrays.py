"""The one conversion of an expression matrix (numpy, scipy-sparse or anndata X/layer) to a dense numpy array."""

from __future__ import annotations

from typing import Any

import numpy as np


def dense(matrix: Any, dtype: Any = None) -> np.ndarray:
    """``matrix`` as a dense numpy array (``dtype`` when given, else its own); sparse matrices are densified.

    anndata keeps ``X`` and layers dense or sparse depending on how a store was written, so every reader goes
    through here instead of branching on the type itself.
    """
    if hasattr(matrix, "toarray"):
        matrix = matrix.toarray()
    return np.asarray(matrix, dtype=dtype)
