"""The grid of experiment cells: one cell = (arm, dp, fraction, seed), evaluated at every site.

DP only applies to the adaptation of the federated arms (``federated``, ``federated-adapt``), so ``local`` and
``pooled`` get dp=False only. Cells are ordered seed-major then arm, so that a partial run already holds complete
comparisons for the first seeds, and the federated cells of one seed are adjacent (both federated arms share one
cached central model per seed).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.experiment.config import FEDERATED_ARMS, ExperimentConfig


@dataclass(frozen=True, order=True)
class Cell:
    seed: int
    arm: str
    dp: bool
    fraction: float

    @property
    def key(self) -> str:
        """Stable file-system name of the cell (its result is ``cells/<key>.json``)."""
        dp = "dp" if self.dp else "nodp"
        return f"{self.arm}-{dp}-f{self.fraction:.4f}-s{self.seed}"

    @property
    def variant(self) -> str:
        """Arm label used in tables and plots: ``local``, ``pooled``, ``federated``, ``federated+dp``,
        ``federated-adapt``, ``federated-adapt+dp``."""
        return f"{self.arm}+dp" if self.dp else self.arm


ARM_ORDER = {"local": 0, "federated": 1, "federated-adapt": 2, "pooled": 3}


def plan(config: ExperimentConfig) -> list[Cell]:
    """Every cell the config asks for, in execution order, without duplicates."""
    cells = []
    for seed in config.seeds:
        for arm in sorted(config.arms, key=ARM_ORDER.__getitem__):
            dps = config.dp if arm in FEDERATED_ARMS else (False,)
            for dp in dps:
                for fraction in config.fractions:
                    cells.append(Cell(seed=seed, arm=arm, dp=dp, fraction=fraction))
    return cells
