"""shared.arrays.dense: the one dense conversion of expression matrices."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from shared.arrays import dense


def test_dense_converts_sparse_and_keeps_or_sets_the_dtype():
    x = np.array([[0, 1.5], [2, 0]], dtype=np.float32)
    for matrix in (x, sp.csr_matrix(x), sp.csc_array(x)):
        out = dense(matrix)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        np.testing.assert_array_equal(out, x)
        assert dense(matrix, np.float64).dtype == np.float64
    assert dense([[1, 2]], np.float32).dtype == np.float32
