"""A synthetic consortium in the real on-disk formats: learnable, deterministic by seed (model: README, data)."""

from shared.synthetic.consortium import generate_consortium
from shared.synthetic.model import CELL_TYPES, GROUND_TRUTH, TYPE_LABEL, TYPE_MIXTURE, marker_genes, panel_genes

__all__ = [
    "CELL_TYPES",
    "GROUND_TRUTH",
    "TYPE_LABEL",
    "TYPE_MIXTURE",
    "generate_consortium",
    "marker_genes",
    "panel_genes",
]
