"""Key names of the fedst data model, defined once.

A section is an AnnData (spots x genes) plus a handle to its H&E image:
- ``X``: raw counts (non-negative, finite);
- ``obsm[SPATIAL]``: spot centres in full-resolution image pixels as (x = column, y = row);
- ``uns[MPP]``: microns per full-resolution pixel of the image;
- ``uns[PROVENANCE]``: where the section came from (format, source paths, reader version).
A patch store's spot table adds the normalised matrix on the consortium gene panel and a measured mask.
"""

SPATIAL = "spatial"
"""obsm key: (n_spots, 2) float array, x = column, y = row, full-resolution pixels."""

MPP = "mpp"
"""uns key: microns per pixel of the full-resolution image (float)."""

PROVENANCE = "fedst_provenance"
"""uns key: dict describing the source (format, files, section id)."""

SECTION = "section"
"""obs key: section (tissue slide) identifier of each spot."""

SITE = "site"
"""obs key: site (institution) identifier, where a table pools several sites."""

COUNTS = "counts"
"""layers key: raw counts on the consortium gene panel (float32, 0 where not measured)."""

MEASURED = "measured"
"""layers key: 1 where the gene was measured for the spot's section, 0 where the source lacks it."""

NORMALISED = "log1p_norm"
"""layers key: log1p(counts / library size * TARGET_SUM); also the store's ``X``."""

TARGET_SUM = 1e4
"""Library-size target of the normalisation (counts per 10k, the scanpy convention)."""

GENE_IDS = "gene_ids"
"""var key: Ensembl ids when the source carries them."""

PATCH_INDEX = "patch_index"
"""obs key of a store's spot table: row of the spot's patch in ``patches.npy``."""

SYNTHETIC = "synthetic"
"""obs key / manifest flag: True for generated (not measured) image-gene pairs."""

PREDICTED = "predicted"
"""layers key: predicted expression written by ``fedst predict`` / ``fedst impute``."""

DRIFT = "drift"
"""uns key: DRIFT parameters recorded on its output."""

PREDICTED_BASELINE = "predicted_knn"
"""layers key: the kNN cell-to-spot baseline's imputation, written beside SpaDiT's by ``fedst impute``."""

SPADIT = "spadit"
"""uns key: SpaDiT parameters, metrics and timings recorded on ``fedst impute`` output."""

SITE_CENTRAL = "central.safetensors"
"""File in a site's work dir: the central weights the site adapted on (written by its adapt phase)."""

SITE_ADAPTER = "adapter.safetensors"
"""File in a site's work dir: the site's adapter (modulation) weights after its last adapt round; read by its
synthesize phase and by the experiment's federated-adapt arm, which plays every site in one process."""

WORKER_SOCKET = "worker-socket"
"""node config key: the site worker's Unix socket (client/worker.py), read by the ClientApp shim."""
