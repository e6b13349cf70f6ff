"""The three arms of the experiment as one cell function: ``ArmRunner(config, out)(cell, workdir)``.

- ``local``: each site trains the predictor on its own real training spots at the fraction;
- ``federated``: central diffusion model pretrained through the federation's Flower workflow (once per seed,
  cached: it never sees expression, so it does not depend on the fraction), adapted per site on the
  fraction's spots (optionally DP-SGD), synthetic pairs added to the fraction's real spots;
- ``pooled``: one predictor on every site's real training spots at the fraction (the upper bound).

Every arm scores the same held-out sections with the same genes and the same metric function.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from server.experiment.config import ExperimentConfig
from server.experiment.data import CACHE, SiteData, prepare_sites
from server.experiment.planner import Cell
from shared import keys
from shared.arrays import dense
from shared.c2l.audit import synthesis_audit
from shared.errors import FedstError, require
from shared.io import write_json_atomic
from shared.seeds import site_seed  # the real-spot subset (fraction_rows) keeps the plain cell seed
from shared.store.format import PatchStore
from shared.store.subset import subset_store


def fraction_rows(site: SiteData, fraction: float, seed: int) -> np.ndarray:
    """Nested subset of the site's training spots (rows of its training store) for this fraction and seed."""
    from shared.splits import fraction_subset

    return fraction_subset(site.train.n_spots, fraction, seed=seed)


class ArmRunner:
    """Prepares the data once (lazily) and runs any cell of the grid."""

    def __init__(self, config: ExperimentConfig, out: Path, *, log: Callable[[str], None] = print):
        self.config = config
        self.out = Path(out)
        self.log = log
        self._sites: list[SiteData] | None = None

    # -- data ---------------------------------------------------------------------------------------------
    @property
    def sites(self) -> list[SiteData]:
        if self._sites is None:
            self._sites = prepare_sites(self.config, self.out, self.log)
        return self._sites

    def prepare(self) -> None:
        """Generate / prepare / split every site's data (cached under ``out/cache``)."""
        _ = self.sites

    def report_extras(self) -> dict[str, Any]:
        """Per-site split and genes for the report (only when the data were prepared in this process)."""
        if self._sites is None:
            try:
                _ = self.sites
            except FedstError:
                return {}
        return {
            "sites_detail": {
                s.name: {
                    "train_sections": s.site.train_sections,
                    "held_out": list(s.site.held_out),
                    "train_spots": s.train.n_spots,
                    "test_spots": s.test.n_spots,
                    "n_genes": len(s.genes),
                    "genes": s.genes,
                }
                for s in self.sites
            }
        }

    # -- cells --------------------------------------------------------------------------------------------
    def __call__(self, cell: Cell, workdir: Path) -> dict[str, Any]:
        _seed_everything(cell.seed)
        if cell.arm == "local":
            return self.run_local(cell, workdir)
        if cell.arm == "pooled":
            return self.run_pooled(cell, workdir)
        if cell.arm == "federated":
            return self.run_federated(cell, workdir)
        raise FedstError(f"unknown arm {cell.arm!r}")

    def _train(
        self, stores: list[PatchStore], rows: list[np.ndarray], seed: int, extra: list[PatchStore] | None = None
    ):
        from shared.downstream.predictor import train_predictor

        p = self.config.predictor
        return train_predictor(
            stores,
            kind=p.kind,
            encoder=p.encoder,
            extra_stores=extra or [],
            spot_indices={store: r for store, r in zip(stores, rows)},
            seed=seed,
            progress=False,
            **p.options,
        )

    def _score(
        self, site: SiteData, predictor: Any, workdir: Path, cell: Cell
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Metrics of ``predictor`` on the site's held-out sections, plus the prediction artifact for figures."""
        from shared.downstream.metrics import evaluate_predictions

        pred = np.asarray(predictor.predict(site.test), dtype=np.float32)
        require(
            pred.shape == (site.test.n_spots, len(site.test.panel)),
            f"predictor returned {pred.shape}, expected {(site.test.n_spots, len(site.test.panel))}",
        )
        spots = site.test.spots
        truth = dense(spots.X, np.float32)[:, site.gene_index]
        pred = pred[:, site.gene_index]
        coords = np.asarray(spots.obsm[keys.SPATIAL], dtype=np.float64)
        sections = spots.obs[keys.SECTION].astype(str).to_numpy()
        scores = evaluate_predictions(pred, truth, coords, sections, site.genes)
        metrics = {name: _metric(scores, name) for name in ("PCC", "MSE", "GSC", "SSC")}
        first = sections == sections[0]
        path = workdir / f"pred_{site.name}.npz"
        np.savez_compressed(
            path,
            pred=pred[first],
            truth=truth[first],
            coords=coords[first],
            genes=np.array(site.genes),
            section=np.array(sections[0]),
        )
        return metrics, {"predictions": str(path.relative_to(self.out))}

    def run_local(self, cell: Cell, workdir: Path) -> dict[str, Any]:
        sites, artifacts = {}, {}
        for site in self.sites:
            rows = fraction_rows(site, cell.fraction, cell.seed)
            predictor = self._train([site.train], [rows], cell.seed)
            metrics, artifacts[site.name] = self._score(site, predictor, workdir, cell)
            sites[site.name] = {**metrics, "n_train_spots": int(len(rows))}
        return {"sites": sites, "artifacts": artifacts}

    def run_pooled(self, cell: Cell, workdir: Path) -> dict[str, Any]:
        rows = [fraction_rows(site, cell.fraction, cell.seed) for site in self.sites]
        predictor = self._train([s.train for s in self.sites], rows, cell.seed)
        sites, artifacts = {}, {}
        total = int(sum(len(r) for r in rows))
        for site in self.sites:
            metrics, artifacts[site.name] = self._score(site, predictor, workdir, cell)
            sites[site.name] = {**metrics, "n_train_spots": total}
        return {"sites": sites, "artifacts": artifacts}

    def run_federated(self, cell: Cell, workdir: Path) -> dict[str, Any]:
        from shared.backends.c2l import adapt_model

        run, arm = self.config.run, self.config.federated
        central, pretrain_info = self.central(cell.seed)
        sites, artifacts = {}, {}
        for site in self.sites:
            rows = fraction_rows(site, cell.fraction, cell.seed)
            real = subset_store(
                site.train,
                rows,
                workdir / site.name / "real",
                tile_sections=[],
                note=f"fraction {cell.fraction:g}, seed {cell.seed}",
            )
            started = time.perf_counter()
            adapted, summary = adapt_model(
                central,
                real,
                run.adapt,
                run.dp if cell.dp else None,
                seed=site_seed(cell.seed, site.name, "adapt"),
                batch_size=min(run.adapt.batch_size, max(1, real.n_spots - 1)),
            )
            n_synth = max(arm.min_synthetic, int(round(arm.synthetic_per_spot * real.n_spots)))
            synthetic = self._synthesize(
                central,
                adapted,
                real,
                n_synth,
                workdir / site.name / "synthetic",
                site_seed(cell.seed, site.name, "synthesize"),
            )
            gen_seconds = time.perf_counter() - started
            check = synthesis_audit(real, synthetic, site.gene_index, seed=site_seed(cell.seed, site.name, "audit"))
            predictor = self._train([site.train], [rows], cell.seed, extra=[synthetic])
            metrics, artifacts[site.name] = self._score(site, predictor, workdir, cell)
            grid = workdir / f"patches_{site.name}.npz"
            k = self.config.report.grid_patches
            real_rows = real.spots.obs[keys.PATCH_INDEX].to_numpy()[:k]
            synth_rows = synthetic.spots.obs[keys.PATCH_INDEX].to_numpy()[:k]
            np.savez_compressed(
                grid, real=np.asarray(real.patches[real_rows]), synthetic=np.asarray(synthetic.patches[synth_rows])
            )
            artifacts[site.name]["patches"] = str(grid.relative_to(self.out))
            sites[site.name] = {
                **metrics,
                "n_train_spots": int(len(rows)),
                "n_synthetic": int(synthetic.n_spots),
                "epsilon": summary.get("epsilon"),
                "delta": summary.get("delta"),
                "adapt_final_loss": _last_finite(summary.get("losses", [])),
                "trainable_fraction": summary.get("trainable_fraction"),
                "generation_s": round(gen_seconds, 2),
                **check,
                "adapt_seed": site_seed(cell.seed, site.name, "adapt"),
                "synthesis_seed": site_seed(cell.seed, site.name, "synthesize"),
            }
        return {"sites": sites, "artifacts": artifacts, "pretraining": pretrain_info}

    def _synthesize(self, central: Any, adapted: Any, real: PatchStore, n: int, out: Path, seed: int) -> PatchStore:
        from shared.backends.c2l import synthesize_pairs

        return synthesize_pairs(central, adapted, real, n, out, self.config.run.synthesize, seed=seed)

    # -- central model (federated pretraining, once per seed) ---------------------------------------------
    def central(self, seed: int):
        """The central model of this seed, pretrained through the federation once and cached on disk."""
        from shared.c2l.central import CentralDiffusion

        root = self.out / CACHE / "central" / f"seed-{seed}"
        done = root / "done.json"
        if done.is_file():
            return CentralDiffusion.from_pretrained(root / "model"), json.loads(done.read_text())
        started = time.perf_counter()
        model, info = self._pretrain(seed, root)
        model.save_pretrained(root / "model")
        info = {**info, "seconds": round(time.perf_counter() - started, 2), "seed": seed}
        write_json_atomic(done, info)
        self.log(f"central model (seed {seed}) pretrained in {info['seconds']:.1f} s via {info['route']}")
        return CentralDiffusion.from_pretrained(root / "model"), info

    def _pretrain(self, seed: int, root: Path):
        import torch

        from shared.backends.c2l import central_overrides
        from shared.c2l.central import create_central
        from shared.c2l.ema import sampling_weights

        run = self.config.run
        panel = self.sites[0].train.panel
        model = create_central(run.preset, panel=panel, **central_overrides(run))
        state = sampling_weights(federated_pretrain(self.config, self.sites, seed, root, log=self.log))
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}, strict=True)
        return model, {
            "route": "flower (server.workflow.Workflow over server.localgrid.LocalGrid, client.app)",
            "rounds": run.pretrain.rounds,
            "local_steps": run.pretrain.steps,
            "strategy": run.aggregation.strategy,
            "ema_decay": run.pretrain.ema_decay,
        }


def federated_pretrain(
    config: ExperimentConfig, sites: list[SiteData], seed: int, root: Path, *, log: Callable[[str], None] = print
) -> dict[str, np.ndarray]:
    """Run the federation's pretrain phase (its Workflow, strategies and ClientApp) over the sites' TRAINING
    stores in this process; return the final central state dict (numpy)."""
    from server.checkpoint import load_checkpoint
    from server.components import load_client_app
    from server.localgrid import LocalGrid
    from server.workflow import Workflow
    from shared.config import RunConfig

    # the experiment's [run] sections as they are; the harness decides only what this in-process run is
    run = RunConfig.from_mapping(
        {
            **config.run.to_dict(),
            "backend": "c2l",
            "phases": "pretrain",
            "seed": seed,
            "min-sites": len(sites),
            "failure-tolerance": 0,
            "paths.out-dir": str(root),
            "paths.run-name": "flower-run",
            "paths.sites-root": str(root / "sites"),
        }
    )
    nodes = {
        i + 1: {"data-path": str(s.train.path), "work-dir": str(root / "sites" / s.name), "site": s.name}
        for i, s in enumerate(sites)
    }
    run_dir = root / "flower-run"
    log(
        f"federated pretraining (seed {seed}): {len(sites)} sites, "
        f"{run.pretrain.rounds} rounds x {run.pretrain.steps} steps, {run.aggregation.strategy}"
    )
    with LocalGrid(load_client_app(), nodes, run.to_dict(), run_id=seed + 1) as grid:
        Workflow(grid, run, run_dir, run_id=seed + 1).run_all()
    found = load_checkpoint(run_dir, "pretrain")
    if found is None:
        raise FedstError(f"federated pretraining wrote no checkpoint under {run_dir}")
    return found[1]


METRIC_KEYS = {"PCC": "pcc_per_slide_mean", "MSE": "mse", "GSC": "gsc", "SSC": "ssc"}
"""Report name -> key of ``shared.downstream.metrics.evaluate_predictions``' output."""


def _metric(scores: dict[str, Any], name: str) -> float | None:
    value = scores.get(METRIC_KEYS[name])
    return None if value is None else float(value)


def _last_finite(values: list[float]) -> float | None:
    finite = [v for v in values if v == v]
    return float(finite[-1]) if finite else None


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
