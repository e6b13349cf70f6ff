"""The arms of the experiment as one cell function: ``ArmRunner(config, out)(cell, workdir)``.

- ``local``: each site trains the predictor on its own real training spots at the fraction;
- ``federated``: central diffusion model pretrained through the federation's Flower workflow (once per seed,
  cached: it never sees expression, so it does not depend on the fraction), adapted per site on the
  fraction's spots (optionally DP-SGD), synthetic pairs added to the fraction's real spots;
- ``federated-adapt``: the same cached central model, but the gene-conditioned modulation is adapted through the
  federation's Flower workflow too (the ``adapt`` phase with ``adapt.federated``: every round each site adapts
  the averaged modulation on its fraction's spots, the server FedAvgs the sites' modulations), so a data-limited
  site learns the gene->morphology mapping from every site's pairs without seeing them; each site then
  synthesizes from its own last-round adapter, exactly as in ``federated``;
- ``pooled``: one predictor on every site's real training spots at the fraction (the upper bound).

Every arm scores the same held-out sections with the same genes and the same metric function; both federated
arms share one tail (synthesis, audit, predictor on real+synthetic, scores, patch grid: ``_augment_and_score``).
Both spend the same optimiser steps per site: ``federated`` adapts once for ``run.adapt.steps`` steps,
``federated-adapt`` runs ``run.adapt.rounds`` rounds of ``ceil(steps / rounds)`` steps (``adapt_steps_per_round``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from server.experiment.config import ExperimentConfig, adapt_steps_per_round
from server.experiment.data import CACHE, SiteData, prepare_sites
from server.experiment.planner import Cell
from shared import keys
from shared.arrays import dense
from shared.c2l.audit import synthesis_audit
from shared.config.node import HOLD_OUT
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
        if cell.arm == "federated-adapt":
            return self.run_federated_adapt(cell, workdir)
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

    def _real_store(self, site: SiteData, cell: Cell, workdir: Path) -> tuple[np.ndarray, PatchStore]:
        """The fraction's real spots of the site (rows of its training store) and their subset store: what the
        federated arms adapt and condition synthesis on."""
        rows = fraction_rows(site, cell.fraction, cell.seed)
        real = subset_store(
            site.train,
            rows,
            workdir / site.name / "real",
            tile_sections=[],
            note=f"fraction {cell.fraction:g}, seed {cell.seed}",
        )
        return rows, real

    def run_federated(self, cell: Cell, workdir: Path) -> dict[str, Any]:
        from shared.backends.c2l import adapt_model

        run = self.config.run
        central, pretrain_info = self.central(cell.seed)
        sites, artifacts = {}, {}
        for site in self.sites:
            rows, real = self._real_store(site, cell, workdir)
            started = time.perf_counter()
            adapted, summary = adapt_model(
                central,
                real,
                run.adapt,
                run.dp if cell.dp else None,
                seed=site_seed(cell.seed, site.name, "adapt"),
                batch_size=min(run.adapt.batch_size, max(1, real.n_spots - 1)),
            )
            adaptation = {
                "epsilon": summary.get("epsilon"),
                "delta": summary.get("delta"),
                "adapt_final_loss": _last_finite(summary.get("losses", [])),
                "trainable_fraction": summary.get("trainable_fraction"),
                "adapt_steps": int(summary.get("steps", run.adapt.steps)),
                "adapt_seed": site_seed(cell.seed, site.name, "adapt"),
            }
            sites[site.name], artifacts[site.name] = self._augment_and_score(
                cell, site, rows, real, adapted, workdir, adaptation, time.perf_counter() - started
            )
        return {"sites": sites, "artifacts": artifacts, "pretraining": pretrain_info}

    def run_federated_adapt(self, cell: Cell, workdir: Path) -> dict[str, Any]:
        """Federated adaptation through the Flower workflow, then the federated arm's tail at every site.

        Each site's fraction store (built as in ``run_federated``) is a node's ``data-path``; the workflow's
        ``adapt`` phase starts from the cached central model of the seed (``paths.warm-start``) and runs
        ``run.adapt.rounds`` FedAvg rounds of ``adapt_steps_per_round`` local steps (with the DP variant, DP-SGD
        with the noise calibrated for every round's steps together). Afterwards each site's work dir holds
        ``central.safetensors`` and ``adapter.safetensors`` (its adapter after its last local round, which started
        from the round's average); the conditioned model
        built from them synthesizes that site's pairs. Per-site record: the federated arm's keys, where
        ``epsilon``/``delta`` are what the site's privacy ledger reported after the last round (all rounds
        composed), ``adapt_final_loss`` is the site's mean loss of its last round, ``adapt_seed`` the per-round seeds,
        ``generation_s`` the federated adaptation's wall time (all sites, in this process) plus the site's
        synthesis; plus ``adapt_rounds``.
        """
        from safetensors.numpy import load_file

        from server.results import load_results
        from shared.backends.c2l import C2LBackend

        _, pretrain_info = self.central(cell.seed)  # pretrained (and cached) once per seed, shared with `federated`
        reals = {site.name: self._real_store(site, cell, workdir) for site in self.sites}
        root = workdir / "flower"
        started = time.perf_counter()
        run, run_dir = federated_adapt(
            self.config,
            {name: real for name, (_, real) in reals.items()},
            cell.seed,
            root,
            warm_start=self.central_weights(cell.seed),
            dp=cell.dp,
            log=self.log,
        )
        adapt_seconds = time.perf_counter() - started
        record = load_results(run_dir)
        rounds = adapt_rounds(record, [s.name for s in self.sites], run.adapt.rounds, run_dir)
        backend = C2LBackend(run)
        sites, artifacts = {}, {}
        for site in self.sites:
            rows, real = reals[site.name]
            work = root / "sites" / site.name
            central_file = work / keys.SITE_CENTRAL
            adapted = backend.conditioned(
                load_file(str(central_file)), load_file(str(work / keys.SITE_ADAPTER)), real.panel
            )
            central_file.unlink()  # a copy of the cached central's weights (cache/central/seed-N), ~MBs per site
            per_round = [r.sites[site.name] for r in rounds]
            adaptation = {
                **dp_spent(per_round, cell.dp),
                "adapt_final_loss": per_round[-1].get("loss"),
                "trainable_fraction": per_round[-1].get("trainable-fraction"),
                "adapt_steps": run.adapt.rounds * run.adapt.steps,
                "adapt_rounds": run.adapt.rounds,
                "adapt_seed": [site_seed(cell.seed, site.name, "adapt", r.round) for r in rounds],
            }
            sites[site.name], artifacts[site.name] = self._augment_and_score(
                cell, site, rows, real, adapted, workdir, adaptation, adapt_seconds
            )
        adaptation_info = {
            "route": FLOWER_ROUTE,
            "rounds": run.adapt.rounds,
            "local_steps": run.adapt.steps,
            "batch_size": run.adapt.batch_size,
            "strategy": "fedavg",
            "epsilon_budget": run.dp.epsilon,
            "seconds": round(adapt_seconds, 2),
            "run_dir": str(run_dir.relative_to(self.out)),
        }
        return {"sites": sites, "artifacts": artifacts, "pretraining": pretrain_info, "adaptation": adaptation_info}

    def _augment_and_score(
        self,
        cell: Cell,
        site: SiteData,
        rows: np.ndarray,
        real: PatchStore,
        adapted: Any,
        workdir: Path,
        adaptation: dict[str, Any],
        adapt_seconds: float,
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """What both federated arms do once a site holds its adapted model (a ConditionedDiffusion): synthesize
        ``max(min_synthetic, synthetic_per_spot * real spots)`` pairs conditioned on the fraction's real spots,
        audit them, train the predictor on real + synthetic, score it on the held-out sections, keep a patch grid.
        Returns the site's record (metrics, counts, ``adaptation``'s entries, audit, seeds) and its artifacts."""
        arm = self.config.federated
        started = time.perf_counter()
        n_synth = max(arm.min_synthetic, int(round(arm.synthetic_per_spot * real.n_spots)))
        synthetic = self._synthesize(
            adapted.central,
            adapted,
            real,
            n_synth,
            workdir / site.name / "synthetic",
            site_seed(cell.seed, site.name, "synthesize"),
        )
        gen_seconds = adapt_seconds + time.perf_counter() - started
        check = synthesis_audit(real, synthetic, site.gene_index, seed=site_seed(cell.seed, site.name, "audit"))
        predictor = self._train([site.train], [rows], cell.seed, extra=[synthetic])
        metrics, artifacts = self._score(site, predictor, workdir, cell)
        grid = workdir / f"patches_{site.name}.npz"
        k = self.config.report.grid_patches
        real_rows = real.spots.obs[keys.PATCH_INDEX].to_numpy()[:k]
        synth_rows = synthetic.spots.obs[keys.PATCH_INDEX].to_numpy()[:k]
        np.savez_compressed(
            grid, real=np.asarray(real.patches[real_rows]), synthetic=np.asarray(synthetic.patches[synth_rows])
        )
        artifacts["patches"] = str(grid.relative_to(self.out))
        record = {
            **metrics,
            "n_train_spots": int(len(rows)),
            "n_synthetic": int(synthetic.n_spots),
            **adaptation,
            "generation_s": round(gen_seconds, 2),
            **check,
            "synthesis_seed": site_seed(cell.seed, site.name, "synthesize"),
        }
        return record, artifacts

    def _synthesize(self, central: Any, adapted: Any, real: PatchStore, n: int, out: Path, seed: int) -> PatchStore:
        from shared.backends.c2l import synthesize_pairs

        return synthesize_pairs(central, adapted, real, n, out, self.config.run.synthesize, seed=seed)

    # -- central model (federated pretraining, once per seed) ---------------------------------------------
    def central(self, seed: int):
        """The central model of this seed, pretrained through the federation once and cached on disk."""
        from shared.c2l.central import CentralDiffusion

        root = self._central_root(seed)
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

    def _central_root(self, seed: int) -> Path:
        return self.out / CACHE / "central" / f"seed-{seed}"

    def central_weights(self, seed: int) -> Path:
        """The safetensors file of the seed's cached central model (after ``central(seed)``): its sampling weights,
        which the federated-adapt arm's workflow takes as ``paths.warm-start``."""
        from shared.persistence import WEIGHTS

        path = self._central_root(seed) / "model" / WEIGHTS
        require(path.is_file(), f"{path}: the central model of seed {seed} is not cached yet")
        return path

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
            "route": FLOWER_ROUTE,
            "rounds": run.pretrain.rounds,
            "local_steps": run.pretrain.steps,
            "strategy": run.aggregation.strategy,
            "ema_decay": run.pretrain.ema_decay,
        }


FLOWER_ROUTE = "flower (server.workflow.Workflow over server.localgrid.LocalGrid, client.app)"
FLOWER_RUN = "flower-run"
"""The run directory of an in-process Flower run under its root (results.json, checkpoints, report)."""


def flower_run(
    config: ExperimentConfig,
    nodes: list[dict[str, Any]],
    seed: int,
    root: Path,
    *,
    phases: str,
    overrides: dict[str, Any] | None = None,
):
    """Run the federation's Workflow (its phases, strategies and the real ClientApp) over ``nodes`` in this
    process, through ``server.localgrid.LocalGrid``; return (the run config, the run directory).

    ``nodes``: one node config per site (``data-path``, ``site``, ...; ``work-dir`` defaults to
    ``root/sites/<site>``). The run config is the experiment's ``[run]`` sections as they are; the harness
    decides only what this in-process run is (``phases``, the seed, every site required, where it writes, a fresh
    start: the run directory of an interrupted attempt is cleared, the Workflow refuses to run over it) and the
    ``overrides`` (dotted run-config keys) of the calling arm.
    """
    from server.components import load_client_app
    from server.localgrid import LocalGrid
    from server.workflow import Workflow
    from shared.config import RunConfig

    run = RunConfig.from_mapping(
        {
            **config.run.to_dict(),
            "backend": "c2l",
            "phases": phases,
            "seed": seed,
            "min-sites": len(nodes),
            "failure-tolerance": 0,
            "resume": False,  # every inner run starts afresh (its run dir is cleared below)
            "paths.out-dir": str(root),
            "paths.run-name": FLOWER_RUN,
            "paths.sites-root": str(root / "sites"),
            **(overrides or {}),
        }
    )
    node_configs = {i + 1: {"work-dir": str(root / "sites" / node["site"]), **node} for i, node in enumerate(nodes)}
    run_dir = root / FLOWER_RUN
    shutil.rmtree(run_dir, ignore_errors=True)  # the harness owns it: an interrupted attempt's run starts afresh
    with LocalGrid(load_client_app(), node_configs, run.to_dict(), run_id=seed + 1) as grid:
        Workflow(grid, run, run_dir, run_id=seed + 1).run_all()
    return run, run_dir


def federated_pretrain(
    config: ExperimentConfig, sites: list[SiteData], seed: int, root: Path, *, log: Callable[[str], None] = print
) -> dict[str, np.ndarray]:
    """Run the federation's pretrain phase over the sites' TRAINING stores in this process (``flower_run``);
    return the final central state dict (numpy)."""
    from server.checkpoint import load_checkpoint

    run = config.run
    log(
        f"federated pretraining (seed {seed}): {len(sites)} sites, "
        f"{run.pretrain.rounds} rounds x {run.pretrain.steps} steps, {run.aggregation.strategy}"
    )
    nodes = [{"data-path": str(s.train.path), "site": s.name} for s in sites]
    _, run_dir = flower_run(config, nodes, seed, root, phases="pretrain")
    found = load_checkpoint(run_dir, "pretrain")
    if found is None:
        raise FedstError(f"federated pretraining wrote no checkpoint under {run_dir}")
    return found[1]


def federated_adapt(
    config: ExperimentConfig,
    stores: dict[str, PatchStore],
    seed: int,
    root: Path,
    *,
    warm_start: Path,
    dp: bool,
    log: Callable[[str], None] = print,
):
    """Run the federation's adapt phase with ``adapt.federated`` over ``stores`` (site name -> its store of
    training spots; every spot is paired and nothing is held out: node config ``hold-out = false``) in this
    process, starting from the central weights ``warm_start``; return (the run config, the run directory).

    Rounds: ``run.adapt.rounds`` of ``adapt_steps_per_round`` local steps, FedAvg (weighted by spots). The
    batch size is capped at (smallest store - 1) for every site (one run config for all; the federated arm caps
    per site). DP (``dp``): ``run.dp.epsilon`` is each site's budget for all rounds together (its ledger).
    The consortium panel (the stores' common panel) goes to ``root/consortium/panel.txt``.
    """
    run = config.run
    panels = {tuple(store.panel) for store in stores.values()}
    require(len(panels) == 1, "federated adaptation needs one gene panel at every site")
    consortium = root / "consortium"
    consortium.mkdir(parents=True, exist_ok=True)
    (consortium / "panel.txt").write_text("".join(f"{gene}\n" for gene in next(iter(panels))))
    steps = adapt_steps_per_round(run.adapt.steps, run.adapt.rounds)
    smallest = min(store.n_spots for store in stores.values())
    overrides = {
        "adapt.federated": True,
        "adapt.steps": steps,
        "adapt.batch-size": min(run.adapt.batch_size, max(1, smallest - 1)),
        "dp.epsilon": run.dp.epsilon if dp else 0.0,
        "paths.warm-start": str(warm_start),
        "paths.consortium": str(consortium),
    }
    log(
        f"federated adaptation (seed {seed}{', DP' if dp else ''}): {len(stores)} sites, "
        f"{run.adapt.rounds} rounds x {steps} steps, fedavg"
    )
    nodes = [{"data-path": str(store.path), "site": name, HOLD_OUT: False} for name, store in stores.items()]
    return flower_run(config, nodes, seed, root, phases="adapt", overrides=overrides)


def adapt_rounds(record: Any, sites: list[str], rounds: int, run_dir: Path) -> list[Any]:
    """The adapt phase's round records of a finished run, checked: a training phase of ``rounds`` rounds in
    which every site's update was accepted (FedstError naming the run otherwise)."""
    phase = record.phases.get("adapt")
    require(
        phase is not None and phase.kind == "train",
        f"{run_dir}: the run recorded no federated adapt phase (phases: {sorted(record.phases)})",
    )
    require(len(phase.rounds) == rounds, f"{run_dir}: {len(phase.rounds)} adapt rounds recorded, expected {rounds}")
    for r in phase.rounds:
        missing = sorted(set(sites) - set(r.sites))
        require(not missing, f"{run_dir}: adapt round {r.round} lacks sites {missing} ({r.excluded()})")
    return list(phase.rounds)


def dp_spent(per_round: list[dict[str, float]], dp: bool) -> dict[str, float | None]:
    """A site's epsilon and delta over the federated adapt rounds: what its privacy ledger reported after the last
    round (the RDP composition of every round, the noise calibrated for all of them: shared.c2l.dp). None
    without DP."""
    if not dp:
        return {"epsilon": None, "delta": None}
    require(
        all("epsilon" in r and "delta" in r for r in per_round),
        "a DP federated-adapt round reported no epsilon/delta for a site",
    )
    return {"epsilon": float(per_round[-1]["epsilon"]), "delta": float(per_round[-1]["delta"])}


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
