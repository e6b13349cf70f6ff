"""The generative model of the synthetic consortium: cell types with an expression AND a visual signature.

Everything a test may rely on is a constant here (and stated in README, section data): the types, their
marker genes, their nuclei appearance, the panel, and the magnitudes of the site effects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TYPE_MIXTURE = "synthetic_type_mixture"
"""obsm key of a generated section: (n_spots, K) true cell-type proportions of each spot (rows sum to 1)."""
TYPE_LABEL = "synthetic_type"
"""obs key of a generated section: the spot's dominant cell type (categorical)."""
GROUND_TRUTH = "synthetic_model"
"""uns key of a generated section: the model's parameters that produced it (types, markers, site effects)."""


@dataclass(frozen=True)
class CellType:
    """One latent cell type. Visual signature: nuclei per 1000 um^2, nucleus radius (geometric mean of the
    semi-axes, um), elongation (major/minor axis ratio), hematoxylin OD of its nuclei, eosin OD of its stroma,
    amplitude of the stroma's fibrous texture."""

    name: str
    markers: tuple[str, ...]
    density: float
    radius_um: float
    elongation: float
    hematoxylin: float
    eosin: float
    texture: float  # amplitude of the fibrous eosin texture (collagen fibres, fat vacuoles)
    aligned: bool = False  # nuclei follow the local fibre orientation (stroma, muscle)


CELL_TYPES: tuple[CellType, ...] = (
    CellType("tumour", ("EPCAM", "KRT8", "KRT18", "ERBB2"), 9.0, 4.6, 1.3, 1.05, 0.50, 0.15),
    CellType("stroma", ("COL1A1", "COL1A2", "DCN", "LUM"), 2.2, 3.0, 3.2, 0.85, 0.90, 0.70, aligned=True),
    CellType("immune", ("PTPRC", "CD3E", "MS4A1", "CD74"), 20.0, 2.4, 1.0, 1.60, 0.15, 0.10),
    CellType("adipose", ("ADIPOQ", "PLIN1", "FABP4", "LEP"), 0.7, 3.0, 1.8, 0.75, 0.10, 0.90),
    CellType("muscle", ("ACTA2", "MYH11", "DES", "TAGLN"), 4.0, 4.2, 4.5, 0.70, 1.40, 0.20, aligned=True),
)
"""K = 5 types. Visual contrasts: tumour = dense large round dark nuclei on pale pink; stroma = sparse
spindle nuclei on pink fibres; immune = very dense small round very dark nuclei; adipose = almost empty,
pale; muscle = elongated aligned nuclei on deep eosin."""

BACKGROUND_GENES: tuple[str, ...] = (
    "ACTB",
    "GAPDH",
    "B2M",
    "MALAT1",
    "EEF1A1",
    "TPT1",
    "FTL",
    "FTH1",
    "TMSB4X",
    "UBC",
    "HSPA8",
    "PPIA",
    "MYL6",
    "SRGN",
    "VIM",
    "S100A6",
    "LGALS1",
    "CST3",
    "TIMP1",
    "SPARC",
    "IGKC",
    "MGP",
    "CD24",
    "KRT19",
)
HOUSEKEEPING_GENES: tuple[str, ...] = ("MT-CO1", "MT-ND1", "RPL13", "RPS6")
"""Abundant mitochondrial/ribosomal genes (what `select_hvg(exclude_prefixes=...)` leaves out)."""
OFF_PANEL_GENES: tuple[str, ...] = tuple(f"OFFPANEL{i:02d}" for i in range(1, 17))
"""Measured by every section but NOT in panel.txt: they make the library size differ from the panel sum."""

MARKER_LOGFOLD = 2.5
"""A marker's log mean is raised by this (x12) in its own type."""
TYPE_NOISE_SD = 0.35
"""Per (type, gene) log-mean jitter of non-marker genes: background genes vary weakly between types."""
BASE_LOG_SD = 0.8
HOUSEKEEPING_SHIFT = 1.5
LIBRARY_MEAN = 2500.0
"""Mean total counts of a spot (over all source genes, panel + off-panel)."""
LIBRARY_LOG_SD = 0.25
NB_DISPERSION = 8.0
"""Negative binomial size parameter: var = mu + mu^2 / 8."""
STAIN_ROTATION_RAD = 0.12
"""Site stain vectors are rotated by an angle uniform in +-this (radians) around a random axis."""
STAIN_SCALE_RANGE = (0.8, 1.2)
"""Site hematoxylin / eosin intensity factors, uniform in this range (independently)."""
BATCH_LOG_SD = 0.15
"""Per-site per-gene multiplicative batch factor exp(N(0, this))."""
SITE_TYPE_BIAS_SD = 0.5
"""Per-site shift of each type's logit: sites differ in composition (non-IID)."""
DOMAIN_SIGMA_UM = 180.0
"""Gaussian smoothing of the type fields: domains are a few hundred microns across."""
DOMAIN_TEMPERATURE = 2.5
"""Softmax sharpness over the standardised fields (higher = purer domains)."""

HE_STAIN = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])
"""Ruifrok & Johnston H&E optical-density vectors (rows: hematoxylin, eosin), before normalisation."""


def panel_genes() -> list[str]:
    """The consortium panel (48 genes): markers by type, then background, then housekeeping."""
    markers = [g for t in CELL_TYPES for g in t.markers]
    return [*markers, *BACKGROUND_GENES, *HOUSEKEEPING_GENES]


def source_genes() -> list[str]:
    """Every gene a generated section measures: the panel + OFF_PANEL_GENES (64)."""
    return [*panel_genes(), *OFF_PANEL_GENES]


def marker_genes() -> dict[str, list[str]]:
    return {t.name: list(t.markers) for t in CELL_TYPES}


def expression_signatures(rng: np.random.Generator) -> np.ndarray:
    """(K, n_source_genes) expression profiles: each row sums to 1 (a type's share of a spot's library)."""
    genes = source_genes()
    base = rng.normal(0.0, BASE_LOG_SD, size=len(genes))
    for j, gene in enumerate(genes):
        if gene in HOUSEKEEPING_GENES:
            base[j] += HOUSEKEEPING_SHIFT
    index = {g: j for j, g in enumerate(genes)}
    log_mean = np.tile(base, (len(CELL_TYPES), 1)) + rng.normal(0.0, TYPE_NOISE_SD, size=(len(CELL_TYPES), len(genes)))
    for k, cell_type in enumerate(CELL_TYPES):
        for marker in cell_type.markers:
            log_mean[k, index[marker]] = base[index[marker]] + MARKER_LOGFOLD
        # markers of OTHER types are low here: no jitter can make them look like markers of this type
        for other in CELL_TYPES:
            if other is not cell_type:
                for marker in other.markers:
                    log_mean[k, index[marker]] = base[index[marker]] - 0.5
    profile = np.exp(log_mean)
    return profile / profile.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class SiteEffects:
    """What makes one site look and measure differently from another."""

    stain: np.ndarray  # (2, 3) unit OD vectors (hematoxylin, eosin) after rotation
    stain_scale: np.ndarray  # (2,) intensity factors
    gene_batch: np.ndarray  # (n_source_genes,) multiplicative factors
    type_bias: np.ndarray  # (K,) logit shifts

    def as_dict(self) -> dict[str, list]:
        return {
            name: np.asarray(getattr(self, name)).round(6).tolist()
            for name in ("stain", "stain_scale", "gene_batch", "type_bias")
        }


def _rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def site_effects(rng: np.random.Generator) -> SiteEffects:
    stain = HE_STAIN / np.linalg.norm(HE_STAIN, axis=1, keepdims=True)
    rotated = stain @ _rotation(rng, STAIN_ROTATION_RAD).T
    rotated = np.abs(rotated)  # optical densities stay non-negative
    rotated /= np.linalg.norm(rotated, axis=1, keepdims=True)
    return SiteEffects(
        stain=rotated,
        stain_scale=rng.uniform(*STAIN_SCALE_RANGE, size=2),
        gene_batch=np.exp(rng.normal(0.0, BATCH_LOG_SD, size=len(source_genes()))),
        type_bias=rng.normal(0.0, SITE_TYPE_BIAS_SD, size=len(CELL_TYPES)),
    )
