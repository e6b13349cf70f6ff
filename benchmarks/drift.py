"""DRIFT benchmark: sparse heat kernel (fedst) vs the reference's dense route, time and peak memory.

Sparse route (fedst): KD-tree threshold graph (no N x N matrix) + sparse Laplacian + Chebyshev expansion.
Dense route (the reference algorithm): full N x N distance matrix, sort for the (k*N)-th distance, dense
adjacency and Laplacian, scipy.linalg.expm, dense product. Each measurement runs in a fresh process so
its peak resident memory (ru_maxrss) is its own; tracemalloc's peak of numpy allocations is also shown.

    python benchmarks/drift.py                    # 5k (+ dense), 100k, 1M spots x 50 genes
    python benchmarks/drift.py --sizes 5000,100000 --threads 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def _data(n: int, genes: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    side = np.sqrt(n)  # unit density, like a Visium/MERFISH layout
    coords = rng.random((n, 2)) * side
    x = rng.poisson(1.0, size=(n, genes)).astype(np.float64)
    return coords, x


def _run(route: str, n: int, genes: int, t: float, k: int, queue) -> None:
    import resource
    import tracemalloc

    import numpy as np

    coords, x = _data(n, genes)
    # import everything before the clock starts: only the computation is timed
    import concurrent.futures  # noqa: F401

    import scipy.linalg  # noqa: F401
    import scipy.spatial  # noqa: F401
    import scipy.special  # noqa: F401

    import shared.downstream.drift  # noqa: F401
    import shared.downstream.graph  # noqa: F401

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    if route == "sparse":
        from shared.downstream.drift import drift_matrix

        out, params = drift_matrix(x, coords, t=t, k=k, graph="threshold")
        edges = params["n_edges"]
    else:
        from scipy.linalg import expm

        d = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))
        thr = np.sort(d.ravel())[k * n - 1]
        a = (d <= thr).astype(np.float64)
        np.fill_diagonal(a, 0)
        del d
        lap = np.diag(a.sum(1)) - a
        out = expm(-t * lap) @ x
        edges = int(a.sum() // 2)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(os.environ["DRIFT_BENCH_OUT"] + f"/{route}_{n}.npy", out[: min(n, 5000)])
    queue.put(
        {
            "seconds": elapsed,
            "traced_peak_mb": peak / 2**20,
            "rss_peak_mb": rss / 1024,
            "rss_added_mb": (rss - base_rss) / 1024,
            "edges": edges,
        }
    )


def measure(route: str, n: int, genes: int, t: float, k: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(route, n, genes, t, k, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    import tempfile

    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,100000,1000000", help="comma-separated spot counts")
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--t", type=float, default=2.0)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument(
        "--dense-at", type=int, default=5000, help="also run the dense reference at this size (0: never)"
    )
    parser.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads and cores (taskset) to use")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    try:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
    except (AttributeError, OSError):
        pass
    tmp = tempfile.mkdtemp(prefix="drift_bench_")
    os.environ["DRIFT_BENCH_OUT"] = tmp
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(f"DRIFT benchmark: {args.genes} genes, t={args.t}, k={args.k}, threshold graph, {args.threads} cores")
    print(f"{'route':<8}{'spots':>10}{'edges':>10}{'seconds':>10}{'rss MB':>10}{'+rss MB':>10}{'traced MB':>11}")
    rows = {}
    for n in sizes:
        routes = ["sparse"] + (["dense"] if n == args.dense_at else [])
        for route in routes:
            r = measure(route, n, args.genes, args.t, args.k)
            rows[(route, n)] = r
            print(
                f"{route:<8}{n:>10}{r['edges']:>10}{r['seconds']:>10.2f}{r['rss_peak_mb']:>10.0f}"
                f"{r['rss_added_mb']:>10.0f}{r['traced_peak_mb']:>11.0f}",
                flush=True,
            )
    if ("dense", args.dense_at) in rows:
        n = args.dense_at
        a = np.load(f"{tmp}/sparse_{n}.npy")
        b = np.load(f"{tmp}/dense_{n}.npy")
        ratio = rows[("dense", n)]["seconds"] / rows[("sparse", n)]["seconds"]
        print(
            f"at {n} spots: dense/sparse time ratio = {ratio:.1f}x (target >= 50x); "
            f"max |sparse - dense| = {np.abs(a - b).max():.2e}"
        )
    for n in sizes:
        r = rows[("sparse", n)]
        print(f"sparse {n}: {r['traced_peak_mb'] * 2**20 / (r['edges'] + n):.0f} traced bytes per (edge + spot)")


if __name__ == "__main__":
    main()
