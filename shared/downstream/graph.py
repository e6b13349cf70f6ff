"""Spatial graphs over spots as scipy.sparse matrices, never an N x N dense array.

Three adjacency rules (unweighted, symmetric, zero diagonal, CSR float64):

- ``threshold`` — DRIFT's faithful mode: ONE distance threshold per section, equal to the (k*N)-th smallest
  entry (1-indexed) of that section's full N x N distance matrix with the N zero self-distances included;
  spots closer than or at the threshold are linked. Mean degree is about k-1 and some spots may get no
  neighbour (the reference's behaviour). See :func:`global_threshold` for how it is found without N x N.
- ``knn`` — every spot linked to its k nearest other spots, then symmetrised (A = max(A, A^T)).
- ``radius`` — every pair at distance <= r.

With ``sections`` given, each section gets its own graph and the result is block-diagonal: two sections
(slides, hospitals) are never connected. Distances are Euclidean in the units of ``coords``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

from shared.errors import require

GraphKind = Literal["threshold", "knn", "radius"]


def _check_coords(coords: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)
    require(
        coords.ndim == 2 and coords.shape[1] >= 1, f"coords: expected an (n_spots, 2) array, got shape {coords.shape}"
    )
    require(bool(np.isfinite(coords).all()), "coords: contains NaN or infinite values")
    return coords


def _section_groups(n: int, sections: np.ndarray | None) -> list[np.ndarray]:
    """Row indices of each section (one group of all rows when sections is None), in order of appearance."""
    if sections is None:
        return [np.arange(n)]
    sections = np.asarray(sections)
    require(sections.shape == (n,), f"sections: expected {n} labels (one per spot), got shape {sections.shape}")
    _, first, inverse = np.unique(sections, return_index=True, return_inverse=True)
    order = np.argsort(first)  # keep the order in which sections appear
    return [np.flatnonzero(inverse == g) for g in order]


def _pair_distances(coords: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    diff = coords[i] - coords[j]
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def global_threshold(coords: np.ndarray, k: int) -> float:
    """The (k*N)-th smallest entry (1-indexed) of the N x N distance matrix, self-distances included.

    The reference sorts all N^2 distances. Here, without any N x N array: (1) every spot's m = 3k+2 nearest
    distances (self included) come from a KD-tree, and v = the (k*N)-th smallest of these N*m candidates;
    (2) rows whose m-th distance is below v may hide more entries <= v, so their complete lists of
    distances <= v are fetched (``query_ball_point``) and v is taken again over the enlarged candidates.
    Every row's candidates are then complete below v, so #(entries < v) < k*N <= #(entries <= v) holds for
    the full matrix too: v is exactly the dense answer. Memory O(k*N + entries of the re-fetched rows).
    """
    from scipy.spatial import cKDTree

    coords = _check_coords(coords)
    n = coords.shape[0]
    require(k >= 1, f"k: expected an integer >= 1, got {k}")
    target = k * n
    require(target <= n * n, f"k: k*N = {target} exceeds the N^2 = {n * n} entries of the distance matrix")
    if target <= n:
        return 0.0  # the N self-distances are the smallest entries
    tree = cKDTree(coords)
    m = min(3 * k + 2, n)
    nn_d, nn_i = tree.query(coords, k=m)
    nn_d = nn_d.reshape(n, m)
    # recompute with the exact pair formula so ties compare exactly like the brute force
    nn_d = _pair_distances(coords, np.repeat(np.arange(n), m), nn_i.reshape(-1)).reshape(n, m)
    nn_d.sort(axis=1)
    v = float(np.partition(nn_d.ravel(), target - 1)[target - 1])
    short = np.flatnonzero(nn_d[:, -1] < v) if m < n else np.empty(0, dtype=np.int64)
    if short.size == 0:
        return v
    extra = []
    for i, js in zip(short, tree.query_ball_point(coords[short], v * (1 + 1e-9))):
        js = np.asarray(js, dtype=np.int64)
        extra.append(_pair_distances(coords, np.full(js.size, i), js))
    cand = np.concatenate([np.delete(nn_d, short, axis=0).ravel(), *extra])
    return float(np.partition(cand, target - 1)[target - 1])


def _knn_pairs(coords: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) for the k nearest OTHER spots j of every spot i (robust to duplicate coordinates)."""
    from scipy.spatial import cKDTree

    n = coords.shape[0]
    _, idx = cKDTree(coords).query(coords, k=k + 1)
    idx = idx.reshape(n, k + 1)
    other = idx != np.arange(n)[:, None]
    keep = other & (np.cumsum(other, axis=1) <= k)
    i = np.broadcast_to(np.arange(n)[:, None], idx.shape)[keep]
    return i, idx[keep]


def _symmetric_csr(i: np.ndarray, j: np.ndarray, n: int) -> sp.csr_matrix:
    rows = np.concatenate([i, j])
    cols = np.concatenate([j, i])
    a = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n)).tocsr()
    a.sum_duplicates()
    a.data[:] = 1.0
    a.setdiag(0)
    a.eliminate_zeros()
    return a


def threshold_graph(coords: np.ndarray, k: int = 3) -> tuple[sp.csr_matrix, float]:
    """DRIFT's graph for one section: link i != j when d_ij <= :func:`global_threshold`; returns (A, threshold)."""
    from scipy.spatial import cKDTree

    coords = _check_coords(coords)
    n = coords.shape[0]
    thr = global_threshold(coords, k)
    pairs = cKDTree(coords).query_pairs(thr * (1 + 1e-9), output_type="ndarray")
    if len(pairs):
        # the tree compares squared distances; recheck with the very formula the threshold came from
        keep = _pair_distances(coords, pairs[:, 0], pairs[:, 1]) <= thr
        pairs = pairs[keep]
    else:
        pairs = np.empty((0, 2), dtype=np.int64)
    return _symmetric_csr(pairs[:, 0], pairs[:, 1], n), thr


def knn_graph(coords: np.ndarray, k: int = 6) -> sp.csr_matrix:
    """Each spot linked to its k nearest other spots (fewer when the section is smaller), symmetrised."""
    coords = _check_coords(coords)
    n = coords.shape[0]
    require(k >= 1, f"k: expected an integer >= 1, got {k}")
    kk = min(k, n - 1)
    if kk < 1:
        return sp.csr_matrix((n, n))
    i, j = _knn_pairs(coords, kk)
    return _symmetric_csr(i, j, n)


def radius_graph(coords: np.ndarray, radius: float) -> sp.csr_matrix:
    """Every pair of distinct spots at distance <= radius."""
    from scipy.spatial import cKDTree

    coords = _check_coords(coords)
    require(radius is not None and radius > 0, f"radius: expected a positive distance, got {radius}")
    pairs = cKDTree(coords).query_pairs(float(radius), output_type="ndarray")
    if len(pairs) == 0:
        pairs = np.empty((0, 2), dtype=np.int64)
    return _symmetric_csr(pairs[:, 0], pairs[:, 1], coords.shape[0])


def spatial_graph(
    coords: np.ndarray,
    *,
    kind: GraphKind = "threshold",
    k: int = 3,
    radius: float | None = None,
    sections: np.ndarray | None = None,
) -> tuple[sp.csr_matrix, dict]:
    """Block-diagonal adjacency over all spots (one block per section) and a summary dict.

    The summary holds ``n_edges`` (undirected), ``n_isolated`` and, for ``threshold``, the per-section
    ``thresholds``.
    """
    coords = _check_coords(coords)
    n = coords.shape[0]
    require(kind in ("threshold", "knn", "radius"), f"graph: expected threshold, knn or radius, got {kind!r}")
    if kind == "radius":
        require(radius is not None, "radius: the radius graph needs --radius (a distance in coordinate units)")
    groups = _section_groups(n, sections)
    rows, cols = [], []
    thresholds: list[float] = []
    for idx in groups:
        c = coords[idx]
        if kind == "threshold":
            a, thr = threshold_graph(c, k)
            thresholds.append(thr)
        elif kind == "knn":
            a = knn_graph(c, k)
        else:
            a = radius_graph(c, radius)  # type: ignore[arg-type]
        a = a.tocoo()
        rows.append(idx[a.row])
        cols.append(idx[a.col])
    r = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
    c_ = np.concatenate(cols) if cols else np.empty(0, dtype=np.int64)
    adj = sp.csr_matrix((np.ones(r.size), (r, c_)), shape=(n, n))
    degree = np.asarray(adj.sum(axis=1)).ravel()
    info = {"n_edges": int(adj.nnz // 2), "n_isolated": int((degree == 0).sum())}
    if kind == "threshold":
        info["thresholds"] = thresholds
    return adj, info


def moran_weights(coords: np.ndarray, k: int = 6, sections: np.ndarray | None = None) -> sp.csr_matrix:
    """Row-standardised k-nearest-neighbour weights (not symmetrised: each row sums to 1) for Moran's I.

    Row i puts 1/k on each of its k nearest other spots of the same section (fewer in a tiny section).
    """
    coords = _check_coords(coords)
    n = coords.shape[0]
    rows, cols = [], []
    for idx in _section_groups(n, sections):
        m = idx.size
        kk = min(k, m - 1)
        if kk < 1:
            continue
        i, j = _knn_pairs(coords[idx], kk)
        rows.append(idx[i])
        cols.append(idx[j])
    r = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.empty(0, dtype=np.int64)
    w = sp.csr_matrix((np.ones(r.size), (r, c)), shape=(n, n))
    deg = np.asarray(w.sum(axis=1)).ravel()
    inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)
    return sp.diags(inv) @ w
