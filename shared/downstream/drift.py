"""DRIFT: heat-kernel diffusion of spot features over the spatial graph, X_t = exp(-t L) X.

L is the graph Laplacian of a spatial graph from :mod:`shared.downstream.graph` (unnormalised L = D - A by
default, the paper's operator; or the normalised L = I - D^-1/2 A D^-1/2). For the unnormalised L the
operator exp(-tL) is symmetric and row-stochastic: per-gene totals are preserved and isolated spots are left
unchanged. Sections never exchange signal (the graph is block-diagonal).

Methods (all give the same numbers; the tests hold them to 1e-8 of each other):

- ``chebyshev`` (default): exp(-tL) X ~ sum_{j<=K} c_j T_j(L~) X with L~ = 2L/lmax - I and
  c_j = (2 - [j == 0]) (-1)^j e^{-a} I_j(a), a = t lmax / 2 (I_j: modified Bessel). lmax is an upper bound of
  the spectrum (max over edges of d_i + d_j for D - A, 2 for the normalised L). Because |T_j| <= 1 on the
  spectrum, ``||exp(-tL) x - p_K(L) x||_2 <= (sum_{j>K} |c_j|) ||x||_2`` for every column x; K is the
  smallest degree making that tail <= ``tol`` (default 1e-13). Cost: K sparse products, memory O(nnz + N G).
- ``expm_multiply``: scipy.sparse.linalg.expm_multiply (Al-Mohy & Higham), the library route.
- ``dense``: scipy.linalg.expm on the dense N x N Laplacian, the reference algorithm — parity checks only
  (O(N^3) time, O(N^2) memory; refused above ``DENSE_MAX_SPOTS``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from shared import keys
from shared.arrays import dense
from shared.errors import FedstError, require

Method = Literal["chebyshev", "expm_multiply", "dense"]
LaplacianKind = Literal["unnormalised", "normalised"]

DENSE_MAX_SPOTS = 20_000
"""Largest N the dense route accepts (an N x N float64 matrix is 3.2 GB at 20k)."""


def laplacian(adjacency: sp.spmatrix, kind: LaplacianKind = "unnormalised") -> sp.csr_matrix:
    """L = D - A, or I - D^-1/2 A D^-1/2 with the rows/columns of isolated spots left at 0 (so they stay put)."""
    a = sp.csr_matrix(adjacency, dtype=np.float64)
    require(a.shape[0] == a.shape[1], f"adjacency: expected a square matrix, got {a.shape}")
    deg = np.asarray(a.sum(axis=1)).ravel()
    if kind == "unnormalised":
        return (sp.diags(deg) - a).tocsr()
    if kind == "normalised":
        inv_sqrt = np.divide(1.0, np.sqrt(deg), out=np.zeros_like(deg), where=deg > 0)
        d = sp.diags(inv_sqrt)
        return (sp.diags((deg > 0).astype(np.float64)) - d @ a @ d).tocsr()
    raise FedstError(f"laplacian: expected 'unnormalised' or 'normalised', got {kind!r}")


def spectral_bound(lap: sp.csr_matrix, kind: LaplacianKind = "unnormalised") -> float:
    """An upper bound of the largest eigenvalue of L (Anderson-Morley max_{ij in E} d_i + d_j, or 2)."""
    if kind == "normalised":
        return 2.0
    deg = lap.diagonal()
    off = lap.tocoo()
    mask = off.row != off.col
    if not mask.any():
        return 0.0
    return float((deg[off.row[mask]] + deg[off.col[mask]]).max())


def chebyshev_coefficients(t: float, lmax: float, tol: float = 1e-13) -> tuple[np.ndarray, float]:
    """Coefficients c_0..c_K of exp(-t x) on [0, lmax] and the proven bound sum_{j>K} |c_j| (<= tol)."""
    from scipy.special import ive

    a = 0.5 * t * lmax
    if a == 0.0:
        return np.array([1.0]), 0.0
    n_max = int(a + 40 + 10 * np.sqrt(a)) + 50
    j = np.arange(n_max + 1)
    mags = 2.0 * ive(j, a)  # e^{-a} I_j(a) without overflow
    mags[0] *= 0.5
    # tails[K] = sum_{j>K} |c_j|; terms past n_max are below 1e-300 relative (I_j(a) ~ (a/2)^j / j!)
    tails = np.concatenate([np.cumsum(mags[::-1])[::-1][1:], [0.0]])
    degree = int(np.argmax(tails <= tol))
    coefs = mags[: degree + 1] * (-1.0) ** j[: degree + 1]
    return coefs, float(tails[degree])


def heat_kernel_apply(
    lap: sp.spmatrix,
    x: np.ndarray,
    t: float,
    *,
    method: Method = "chebyshev",
    kind: LaplacianKind = "unnormalised",
    tol: float = 1e-13,
    column_block: int = 25,
    n_jobs: int | None = None,
) -> np.ndarray:
    """exp(-t L) @ x for a dense (N, G) or (N,) x; see the module docstring for the methods.

    The Chebyshev route works on ``column_block`` columns at a time, on ``n_jobs`` threads (default: the
    cores this process may use), which bounds its working memory to a few (N, column_block) arrays.
    """
    require(t >= 0, f"t: expected a diffusion time >= 0, got {t}")
    x = np.asarray(x, dtype=np.float64)
    n = lap.shape[0]
    require(x.shape[0] == n, f"features: expected {n} rows (one per spot), got {x.shape[0]}")
    if t == 0:
        return x.copy()
    if method == "dense":
        from scipy.linalg import expm

        require(n <= DENSE_MAX_SPOTS, f"dense DRIFT: {n} spots exceed {DENSE_MAX_SPOTS}; use method='chebyshev'")
        return expm(-t * dense(lap)) @ x
    lap = sp.csr_matrix(lap, dtype=np.float64)
    if method == "expm_multiply":
        from scipy.sparse.linalg import expm_multiply

        return np.asarray(expm_multiply(-t * lap, x))
    if method != "chebyshev":
        raise FedstError(f"method: expected chebyshev, expm_multiply or dense, got {method!r}")
    lmax = spectral_bound(lap, kind)
    coefs, _ = chebyshev_coefficients(t, lmax, tol)
    if len(coefs) == 1:
        return coefs[0] * x
    shifted = (lap * (2.0 / lmax) - sp.identity(n, format="csr")).tocsr()  # L~, spectrum in [-1, 1]
    flat = x.ndim == 1
    x2 = np.ascontiguousarray(x.reshape(n, -1))
    out = np.empty_like(x2)
    blocks = [slice(s, min(s + column_block, x2.shape[1])) for s in range(0, x2.shape[1], column_block)]

    def run(cols: slice) -> None:
        out[:, cols] = _chebyshev_block(shifted, np.ascontiguousarray(x2[:, cols]), coefs)

    workers = min(n_jobs or _available_cores(), len(blocks))
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        # scipy's sparse products and numpy's ufuncs release the GIL, so threads use several cores
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, blocks))
    else:
        for cols in blocks:
            run(cols)
    return out.reshape(x.shape) if flat else out


def _available_cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _chebyshev_block(shifted: sp.csr_matrix, x: np.ndarray, coefs: np.ndarray) -> np.ndarray:
    """sum_j c_j T_j(L~) x by the three-term recurrence, in place (three work arrays of x's size)."""
    t_prev = x
    t_cur = shifted @ x
    out = coefs[0] * x
    out += coefs[1] * t_cur
    for c in coefs[2:]:
        t_next = shifted @ t_cur
        t_next *= 2.0
        t_next -= t_prev
        out += c * t_next
        t_prev, t_cur = t_cur, t_next
    return out


def drift_matrix(
    x: np.ndarray | sp.spmatrix,
    coords: np.ndarray,
    *,
    t: float = 2.0,
    k: int = 3,
    graph: str = "threshold",
    radius: float | None = None,
    sections: np.ndarray | None = None,
    laplacian_kind: LaplacianKind = "unnormalised",
    method: Method = "chebyshev",
    gene_block: int = 512,
) -> tuple[np.ndarray | sp.csr_matrix, dict[str, Any]]:
    """Diffuse the columns of x (spots x features) over the spatial graph; returns (x_t, parameters).

    A sparse x is processed ``gene_block`` columns at a time and returned as CSR (exact zeros dropped), so
    memory stays O(N * gene_block) beside the input. The dict is what :func:`drift_adata` records in uns.
    """
    from shared.downstream.graph import spatial_graph

    n = coords.shape[0]
    require(x.shape[0] == n, f"features: {x.shape[0]} rows but {n} spot coordinates")
    adj, info = spatial_graph(coords, kind=graph, k=k, radius=radius, sections=sections)  # type: ignore[arg-type]
    lap = laplacian(adj, laplacian_kind)
    params: dict[str, Any] = {
        "t": float(t),
        "k": int(k),
        "graph": graph,
        "radius": None if radius is None else float(radius),
        "laplacian": laplacian_kind,
        "method": method,
        "per_section": sections is not None,
        **info,
    }
    if method == "chebyshev":
        coefs, bound = chebyshev_coefficients(t, spectral_bound(lap, laplacian_kind))
        params["chebyshev_degree"] = len(coefs) - 1
        params["error_bound_rel_l2"] = bound
    if sp.issparse(x):
        x = sp.csc_matrix(x)
        blocks = []
        for start in range(0, x.shape[1], gene_block):
            block = dense(x[:, start : start + gene_block], np.float64)
            out = heat_kernel_apply(lap, block, t, method=method, kind=laplacian_kind)
            blocks.append(sp.csr_matrix(out))
        result: np.ndarray | sp.csr_matrix = sp.hstack(blocks, format="csr") if blocks else sp.csr_matrix(x.shape)
        result.eliminate_zeros()
    else:
        arr = np.asarray(x)
        require(bool(np.isfinite(arr).all()), "features: contains NaN or infinite values")
        result = heat_kernel_apply(lap, arr, t, method=method, kind=laplacian_kind)
    return result, params


def drift_adata(
    adata,
    t: float = 2.0,
    k: int = 3,
    graph: str = "threshold",
    *,
    radius: float | None = None,
    laplacian_kind: LaplacianKind = "unnormalised",
    embedding: str | None = None,
    layer: str | None = None,
    per_section: bool = True,
    method: Method = "chebyshev",
):
    """A copy of ``adata`` with DRIFT applied; parameters in ``uns[keys.DRIFT]``.

    Input level (default): ``X`` (or ``layers[layer]``) is replaced by its diffusion, keeping its dtype
    family (sparse in, sparse out). Embedding level: ``obsm[embedding]`` is diffused into
    ``obsm[embedding + '_drift']``. Coordinates come from ``obsm[keys.SPATIAL]``; with ``per_section`` and
    ``obs[keys.SECTION]`` present, each section is its own graph.
    """
    require(keys.SPATIAL in adata.obsm, f"AnnData: obsm['{keys.SPATIAL}'] (spot coordinates) is missing")
    coords = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64)
    require(
        coords.ndim == 2 and coords.shape[1] == 2, f"obsm['{keys.SPATIAL}']: expected (n_spots, 2), got {coords.shape}"
    )
    sections = None
    if per_section and keys.SECTION in adata.obs:
        sections = adata.obs[keys.SECTION].astype(str).to_numpy()
    out = adata.copy()
    if embedding is not None:
        require(embedding in adata.obsm, f"AnnData: obsm['{embedding}'] not found (have {sorted(adata.obsm.keys())})")
        source = np.asarray(adata.obsm[embedding], dtype=np.float64)
        target = f"obsm['{embedding}_drift']"
    elif layer is not None:
        require(layer in adata.layers, f"AnnData: layers['{layer}'] not found (have {sorted(adata.layers.keys())})")
        source = adata.layers[layer]
        target = f"layers['{layer}']"
    else:
        source = adata.X
        target = "X"
    result, params = drift_matrix(
        source,
        coords,
        t=t,
        k=k,
        graph=graph,
        radius=radius,
        sections=sections,
        laplacian_kind=laplacian_kind,
        method=method,
    )
    if not sp.issparse(result) and not sp.issparse(source) and np.asarray(source).dtype == np.float32:
        result = result.astype(np.float32)
    elif sp.issparse(result) and source.dtype == np.float32:
        result = result.astype(np.float32)
    if embedding is not None:
        out.obsm[f"{embedding}_drift"] = result
    elif layer is not None:
        out.layers[layer] = result
    else:
        out.X = result
    params["target"] = target
    params = {key: value for key, value in params.items() if value is not None}
    out.uns[keys.DRIFT] = params
    return out
