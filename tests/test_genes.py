"""Gene panel matching, normalisation (library size over all genes) and HVG selection."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from shared import keys
from shared.errors import FedstError
from shared.genes import GenePanel, library_size, normalise, select_hvg


def _adata(counts, genes, gene_ids=None, section="S1") -> ad.AnnData:
    var = pd.DataFrame(index=pd.Index(genes))
    if gene_ids is not None:
        var[keys.GENE_IDS] = gene_ids
    adata = ad.AnnData(np.asarray(counts, dtype=np.float32), var=var)
    adata.obs_names = [f"spot{i}" for i in range(adata.n_obs)]
    adata.uns[keys.PROVENANCE] = {"section": section}
    return adata


def test_panel_file_round_trip_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "panel.txt"
    path.write_text("# consortium panel\nEPCAM\n\n  KRT8 \nPTPRC\n")
    panel = GenePanel.read(path)
    assert list(panel) == ["EPCAM", "KRT8", "PTPRC"]
    out = panel.write(tmp_path / "copy.txt")
    assert GenePanel.read(out) == panel
    assert out.read_text() == "EPCAM\nKRT8\nPTPRC\n"


def test_panel_reads_numpy_symbol_array(tmp_path):
    np.save(tmp_path / "genes.npy", np.array(["A", "B", "C"]))
    assert list(GenePanel.read(tmp_path / "genes.npy")) == ["A", "B", "C"]


@pytest.mark.parametrize(
    "text, message",
    [("EPCAM\nepcam\n", "duplicates 'EPCAM'"), ("\n# nothing\n", "no gene symbols")],
)
def test_bad_panel_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "panel.txt"
    path.write_text(text)
    with pytest.raises(FedstError, match=message) as info:
        GenePanel.read(path)
    assert str(path) in str(info.value)


def test_missing_panel_file_is_a_clear_error(tmp_path):
    with pytest.raises(FedstError, match="gene panel file not found"):
        GenePanel.read(tmp_path / "absent.txt")


def test_align_is_case_insensitive_and_masks_unmeasured_genes():
    adata = _adata([[1, 2, 3], [4, 5, 6]], ["epcam", "Krt8", "ACTB"])
    counts, measured = GenePanel(["KRT8", "EPCAM", "PTPRC"]).align(adata)
    np.testing.assert_array_equal(counts, [[2, 1, 0], [5, 4, 0]])
    np.testing.assert_array_equal(measured, [True, True, False])
    assert counts.dtype == np.float32


def test_align_accepts_ensembl_ids_with_or_without_version():
    adata = _adata([[1, 2], [3, 4]], ["sym_a", "sym_b"], gene_ids=["ENSG00000119888.11", "ENSG00000170421"])
    counts, measured = GenePanel(["ENSG00000170421.3", "ensg00000119888"]).align(adata)
    np.testing.assert_array_equal(counts, [[2, 1], [4, 3]])
    assert measured.all()


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_align_sums_duplicate_source_columns():
    adata = _adata([[1, 2, 10]], ["A", "B", "B"])
    counts, _ = GenePanel(["B", "A"]).align(adata)
    np.testing.assert_array_equal(counts, [[12, 1]])


def test_align_without_overlap_names_the_section():
    adata = _adata([[1, 2]], ["X1", "X2"], section="C2")
    with pytest.raises(FedstError, match=r"section C2: no gene overlap with the panel"):
        GenePanel(["EPCAM", "KRT8"]).align(adata)


def test_normalise_uses_all_source_genes_like_scanpy():
    import scanpy as sc

    rng = np.random.default_rng(0)
    full = _adata(rng.poisson(5.0, size=(20, 30)), [f"G{i}" for i in range(30)])
    full.X[0, :] += 1  # no empty spot
    panel = GenePanel(["G3", "G7", "G11"])
    counts, _ = panel.align(full)
    ours = normalise(counts, library_size(full))
    reference = full.copy()
    sc.pp.normalize_total(reference, target_sum=keys.TARGET_SUM)
    sc.pp.log1p(reference)
    np.testing.assert_allclose(ours, reference[:, ["G3", "G7", "G11"]].X, rtol=1e-5, atol=1e-6)
    # the panel holds 3 of 30 genes: its share of the 10k target is the panel's share of the library
    share = counts.sum(1) / full.X.sum(1)
    np.testing.assert_allclose(np.expm1(ours).sum(1), share * keys.TARGET_SUM, rtol=1e-4)


def test_normalise_refuses_empty_library():
    with pytest.raises(FedstError, match="library sizes must be > 0"):
        normalise(np.ones((2, 3)), np.array([3.0, 0.0]))


def test_select_hvg_finds_planted_variable_genes_and_skips_mt_ribo():
    rng = np.random.default_rng(1)
    n, genes = 300, [f"G{i:03d}" for i in range(400)] + ["MT-CO1", "RPL13"]
    means = rng.lognormal(2.0, 1.0, size=len(genes))
    base = rng.poisson(means, size=(n, len(genes))).astype(np.float32)
    group = rng.integers(0, 2, size=n).astype(bool)
    planted = ["G005", "G117", "G233", "G350"]
    for gene in [*planted, "MT-CO1"]:  # bimodal: far more variable than any gene of similar mean
        base[group, genes.index(gene)] *= 1.9
        base[~group, genes.index(gene)] *= 0.1
    first, second = _adata(base[:150], genes), _adata(base[150:], [g.lower() for g in genes])
    panel = select_hvg([first, second], n_top=8)
    assert len(panel) == 8
    assert set(planted) <= set(panel)
    assert "MT-CO1" not in panel and "RPL13" not in panel
    assert "MT-CO1" in select_hvg([first], n_top=8, exclude_prefixes=None)


def test_select_hvg_only_considers_genes_every_source_has():
    rng = np.random.default_rng(2)
    a = _adata(rng.poisson(10, size=(50, 4)) + 1, ["A", "B", "C", "ONLY_A"])
    b = _adata(rng.poisson(10, size=(50, 3)) + 1, ["a", "b", "c"])
    assert set(select_hvg([a, b], n_top=10)) <= {"A", "B", "C"}


def test_align_reads_sparse_counts_like_dense():
    from scipy import sparse

    rng = np.random.default_rng(3)
    dense = rng.poisson(2.0, size=(6, 5)).astype(np.float32)
    genes = ["A", "B", "C", "D", "E"]
    panel = GenePanel(["E", "missing", "A"])
    sparse_adata = _adata(dense, genes)
    sparse_adata.X = sparse.csr_matrix(dense)
    from_sparse, mask = panel.align(sparse_adata)
    from_dense, _ = panel.align(_adata(dense, genes))
    np.testing.assert_array_equal(from_sparse, from_dense)
    np.testing.assert_array_equal(from_dense[:, [0, 2]], dense[:, [4, 0]])
    np.testing.assert_array_equal(library_size(sparse_adata), dense.sum(axis=1))
    assert list(mask) == [True, False, True]
