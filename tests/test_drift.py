"""DRIFT: sparse heat kernel vs the dense oracle, graph invariants, and the CLI on small h5ad files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import expm

from shared import keys
from shared.downstream.drift import drift_adata, drift_matrix, heat_kernel_apply, laplacian
from shared.downstream.graph import global_threshold, moran_weights, spatial_graph
from shared.errors import FedstError


@st.composite
def graphs(draw):
    """A random symmetric 0/1 adjacency (with isolated spots likely), features and a diffusion time."""
    n = draw(st.integers(2, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    density = draw(st.floats(0.0, 0.5))
    upper = np.triu(rng.random((n, n)) < density, 1)
    adj = (upper | upper.T).astype(float)
    x = rng.random((n, draw(st.integers(1, 4)))) * 10
    t = draw(st.floats(0.0, 10.0))
    return adj, x, t


@settings(max_examples=60, deadline=None)
@given(graphs(), st.sampled_from(["unnormalised", "normalised"]), st.sampled_from(["chebyshev", "expm_multiply"]))
def test_sparse_equals_dense_expm(g, kind, method):
    adj, x, t = g
    lap = laplacian(sp.csr_matrix(adj), kind)
    dense = expm(-t * lap.toarray()) @ x
    got = heat_kernel_apply(lap, x, t, method=method, kind=kind)
    assert np.abs(got - dense).max() <= 1e-8 * max(1.0, np.abs(x).max())


@settings(max_examples=40, deadline=None)
@given(graphs())
def test_row_stochastic_totals_preserved_isolated_unchanged(g):
    adj, x, t = g
    lap = laplacian(sp.csr_matrix(adj))
    n = adj.shape[0]
    ones = heat_kernel_apply(lap, np.ones((n, 1)), t)
    assert np.allclose(ones, 1.0, atol=1e-10)  # row sums of exp(-tL) are 1
    out = heat_kernel_apply(lap, x, t)
    assert np.allclose(out.sum(axis=0), x.sum(axis=0), rtol=1e-10)  # per-gene totals
    isolated = adj.sum(axis=1) == 0
    assert np.allclose(out[isolated], x[isolated], atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(1, 5), st.integers(0, 10_000), st.booleans())
def test_threshold_graph_equals_brute_force(n, k, seed, lattice):
    rng = np.random.default_rng(seed)
    coords = rng.integers(0, 6, size=(n, 2)).astype(float) if lattice else rng.random((n, 2)) * 50
    if k * n > n * n:
        k = n
    d = np.sqrt(((coords[:, None] - coords[None]) ** 2).sum(-1))
    ref_thr = np.sort(d.ravel())[k * n - 1]  # the (k*N)-th smallest, self-distances included
    assert global_threshold(coords, k) == ref_thr
    ref = (d <= ref_thr).astype(float)
    np.fill_diagonal(ref, 0)
    adj, info = spatial_graph(coords, kind="threshold", k=k)
    assert np.array_equal(adj.toarray(), ref)
    assert info["n_isolated"] == int((ref.sum(1) == 0).sum())


def test_knn_radius_and_block_diagonal_sections():
    rng = np.random.default_rng(1)
    coords = rng.random((60, 2)) * 10
    sections = np.repeat(["a", "b", "c"], 20)
    coords[20:40] = coords[:20] + 0.01  # section b overlaps a in space: must still not connect
    for kind, kw in (("threshold", {"k": 3}), ("knn", {"k": 4}), ("radius", {"radius": 3.0})):
        adj, _ = spatial_graph(coords, kind=kind, sections=sections, **kw)
        a = adj.toarray()
        assert np.array_equal(a, a.T) and np.all(np.diag(a) == 0)
        for s in range(3):
            for u in range(3):
                if s != u:
                    assert a[20 * s : 20 * s + 20, 20 * u : 20 * u + 20].sum() == 0
    adj, _ = spatial_graph(coords[:20], kind="knn", k=4)
    assert (adj.toarray().sum(1) >= 4).all()
    d = np.sqrt(((coords[:20, None] - coords[None, :20]) ** 2).sum(-1))
    adj, _ = spatial_graph(coords[:20], kind="radius", radius=3.0)
    ref = (d <= 3.0).astype(float)
    np.fill_diagonal(ref, 0)
    assert np.array_equal(adj.toarray(), ref)
    w = moran_weights(coords, k=6, sections=sections)
    assert np.allclose(np.asarray(w.sum(1)).ravel(), 1.0) and w.nnz == 60 * 6
    with pytest.raises(FedstError, match="radius"):
        spatial_graph(coords, kind="radius")


def test_drift_per_section_matches_separate_runs():
    rng = np.random.default_rng(2)
    coords = rng.random((40, 2)) * 5
    x = rng.random((40, 3))
    sections = np.repeat([0, 1], 20)
    joint, _ = drift_matrix(x, coords, t=2, k=3, sections=sections)
    a, _ = drift_matrix(x[:20], coords[:20], t=2, k=3)
    b, _ = drift_matrix(x[20:], coords[20:], t=2, k=3)
    assert np.allclose(joint, np.vstack([a, b]), atol=1e-12)


def _small_adata(sparse: bool):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(3)
    coords = np.stack(np.meshgrid(np.arange(8), np.arange(6)), -1).reshape(-1, 2).astype(float) * 100
    counts = rng.poisson(0.7, size=(48, 5)).astype(np.float32)
    x = sp.csr_matrix(counts) if sparse else counts
    obs = pd.DataFrame({keys.SECTION: ["s1"] * 24 + ["s2"] * 24}, index=[f"spot{i}" for i in range(48)])
    adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(5)]))
    adata.obsm[keys.SPATIAL] = coords
    adata.obsm["X_emb"] = rng.random((48, 4))
    return adata


def test_drift_adata_sparse_in_sparse_out_and_embedding():
    adata = _small_adata(sparse=True)
    out = drift_adata(adata, t=2, k=3, graph="knn")
    assert sp.issparse(out.X) and out.X.shape == adata.X.shape
    assert out.uns[keys.DRIFT]["graph"] == "knn" and out.uns[keys.DRIFT]["t"] == 2.0
    dense = drift_adata(adata, t=2, k=3, graph="knn", method="dense")
    assert np.abs(out.X.toarray() - dense.X.toarray()).max() < 1e-5  # float32 output
    assert np.allclose(np.asarray(out.X.sum(0)), np.asarray(adata.X.sum(0)), rtol=1e-5)
    emb = drift_adata(adata, t=1, graph="knn", k=4, embedding="X_emb")
    assert "X_emb_drift" in emb.obsm and np.array_equal(emb.X.toarray(), adata.X.toarray())
    with pytest.raises(FedstError, match="obsm"):
        drift_adata(adata, embedding="nope")


def test_cli_drift_and_evaluate(tmp_path):
    import json

    import anndata as ad
    from typer.testing import CliRunner

    from shared.cli.main import app

    adata = _small_adata(sparse=True)
    src = tmp_path / "in.h5ad"
    adata.write_h5ad(src)
    runner = CliRunner()
    res = runner.invoke(app, ["drift", str(src), "--t", "2", "--k", "3", "--out", str(tmp_path / "out.h5ad")])
    assert res.exit_code == 0, res.output
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert sp.issparse(out.X) and out.uns[keys.DRIFT]["graph"] == "threshold"
    expected, _ = drift_matrix(adata.X, adata.obsm[keys.SPATIAL], t=2, k=3, sections=adata.obs[keys.SECTION].to_numpy())
    assert np.allclose(out.X.toarray(), expected.toarray(), atol=1e-5)

    # evaluate: pred with shuffled spot order and an extra gene is paired by name
    pred = out[::-1].copy()
    res = runner.invoke(app, ["evaluate", str(tmp_path / "out.h5ad"), str(src), "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n_spots"] == 48 and -1 <= metrics["pcc_per_slide_mean"] <= 1 and "ssc" in metrics
    pred.write_h5ad(tmp_path / "rev.h5ad")
    res = runner.invoke(app, ["evaluate", str(tmp_path / "rev.h5ad"), str(src), "--json", str(tmp_path / "m2.json")])
    assert json.loads((tmp_path / "m2.json").read_text())["pcc_per_slide_mean"] == pytest.approx(
        metrics["pcc_per_slide_mean"]
    )

    other = adata.copy()
    other.var_names = [f"X{j}" for j in range(5)]
    other.write_h5ad(tmp_path / "other.h5ad")
    res = runner.invoke(app, ["evaluate", str(tmp_path / "other.h5ad"), str(src)])
    assert res.exit_code != 0 and "share no gene" in str(res.exception)
    res = runner.invoke(app, ["drift", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "x.h5ad")])
    assert res.exit_code != 0 and "not found" in str(res.exception)


def test_cli_drift_dtype_keeps_float64_on_request(tmp_path):
    import anndata as ad
    from typer.testing import CliRunner

    from shared.cli.main import app

    adata = _small_adata(sparse=False)  # float32 X
    src = tmp_path / "in.h5ad"
    adata.write_h5ad(src)
    runner = CliRunner()
    expected, _ = drift_matrix(
        adata.X.astype(np.float64), adata.obsm[keys.SPATIAL], t=2, k=3, sections=adata.obs[keys.SECTION].to_numpy()
    )
    outs = {}
    for dtype in (None, "float32", "float64"):
        out = tmp_path / f"out-{dtype}.h5ad"
        res = runner.invoke(app, ["drift", str(src), "--out", str(out)] + ([] if dtype is None else ["--dtype", dtype]))
        assert res.exit_code == 0, res.output
        outs[dtype] = ad.read_h5ad(out)
    assert outs[None].X.dtype == np.float32 and "dtype" not in outs[None].uns[keys.DRIFT]  # default as before
    assert outs["float32"].X.dtype == np.float32 and outs["float32"].uns[keys.DRIFT]["dtype"] == "float32"
    assert outs["float64"].X.dtype == np.float64 and outs["float64"].uns[keys.DRIFT]["dtype"] == "float64"
    assert np.abs(outs["float64"].X - expected).max() < 1e-12  # the kernel's float64, not float32 rounding
    assert np.abs(outs["float32"].X - expected).max() > 1e-9
    res = runner.invoke(app, ["drift", str(src), "--embedding", "X_emb", "--dtype", "float32", "--out", str(src)])
    assert res.exit_code == 0 and ad.read_h5ad(src).obsm["X_emb_drift"].dtype == np.float32
    res = runner.invoke(app, ["drift", str(src), "--dtype", "float16", "--out", str(tmp_path / "x.h5ad")])
    assert res.exit_code != 0 and "--dtype" in str(res.exception) and not (tmp_path / "x.h5ad").exists()


def test_cli_evaluate_without_truth_scores_the_own_layer_and_labels_both_protocols(tmp_path):
    import json

    from typer.testing import CliRunner

    from shared.cli.main import app
    from shared.downstream.metrics import pcc_per_slide_mean, pcc_pooled

    adata = _small_adata(sparse=False)
    rng = np.random.default_rng(4)
    truth = np.asarray(adata.X).copy()
    adata.layers[keys.NORMALISED] = truth
    adata.X = (truth + rng.normal(0, 0.5, truth.shape)).astype(np.float32)
    adata.write_h5ad(tmp_path / "pred.h5ad")
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(tmp_path / "pred.h5ad"), "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    sections = adata.obs[keys.SECTION].to_numpy()
    assert metrics["pcc_per_slide_mean"] == pytest.approx(pcc_per_slide_mean(adata.X, truth, sections))
    assert metrics["protocols"]["hest"]["pcc"] == pytest.approx(pcc_pooled(adata.X, truth))
    assert metrics["truth"] == "the prediction's own layers['log1p_norm']"
    assert "protocol per_slide" in res.output and "protocol hest" in res.output and "HEST-Benchmark" in res.output
    # with a truth file, the JSON names it
    adata.write_h5ad(tmp_path / "truth.h5ad")
    res = runner.invoke(
        app, ["evaluate", str(tmp_path / "pred.h5ad"), str(tmp_path / "truth.h5ad"), "--json", str(tmp_path / "t.json")]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "t.json").read_text())["truth"] == str(tmp_path / "truth.h5ad")
    del adata.layers[keys.NORMALISED]
    adata.write_h5ad(tmp_path / "bare.h5ad")
    res = runner.invoke(app, ["evaluate", str(tmp_path / "bare.h5ad")])
    assert res.exit_code != 0 and "pass a TRUTH.h5ad" in str(res.exception)
