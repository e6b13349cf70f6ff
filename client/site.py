"""What a site does in each phase, without Flower: open (or prepare) its store, train, synthesize, evaluate.

State that must survive between messages (a ClientApp is a fresh process per message in deployment) lives in
the site's work directory: the prepared store, the last central weights, the adapter, the synthetic store,
``metrics.json`` and the local report. Only model tensors and scalar metrics are returned to the caller. While a
phase runs the site also keeps ``progress.json`` there (shared/progress.py: phase, round, steps; never sent).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from shared import keys
from shared.config import NodeConfig, RunConfig
from shared.errors import FedstError, PanelMismatchError
from shared.io import write_json_atomic
from shared.progress import ProgressRecord
from shared.seeds import site_seed

CENTRAL = keys.SITE_CENTRAL
ADAPTER = keys.SITE_ADAPTER
SYNTHETIC = "synthetic-store"
PAIRED = "paired-store"  # the store without the downstream phase's held-out section (adaptation, synthesis)
METRICS = "metrics.json"


def open_store(node: NodeConfig, run: RunConfig, panel: list[str] | None = None):
    """The site's patch store: ``data-path`` is a store, or a SITE.toml prepared once into ``work-dir/store``."""
    from shared.store.format import PatchStore, has_manifest

    path = node.data_path
    if has_manifest(path):  # opened as a store even when its manifest is damaged, so that is what is reported
        store = PatchStore(path)
    elif path.suffix == ".toml":
        try:
            from shared.store.prepare import prepare_store
        except ImportError as exc:
            raise FedstError(
                f"site {node.site}: cannot prepare {path}: shared.store.prepare unavailable ({exc})"
            ) from None
        store = prepare_store(path, node.work_dir / "store", panel=panel, patch_px=run.patch_px, progress=False)
    else:
        raise FedstError(
            f"node config 'data-path' {path}: expected a SITE.toml or a fedst patch store (a folder with manifest.json)"
        )
    if store.patch_px != run.patch_px:
        raise FedstError(
            f"site {node.site}: store {store.path} has patch size "
            f"{store.patch_px} px, run config 'patch-px' is {run.patch_px}"
        )
    if panel is not None and list(store.panel) != list(panel):
        mine, theirs = list(store.panel), list(panel)
        first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        raise PanelMismatchError(
            f"site {node.site}: gene panel of store {store.path} differs from the consortium panel "
            f"({len(mine)} vs {len(theirs)} genes; at position {first} the store has "
            f"{mine[first] if first < len(mine) else '<end>'!r} where the consortium has "
            f"{theirs[first] if first < len(theirs) else '<end>'!r})"
        )
    if store.n_spots == 0 and store.n_tiles == 0:
        raise FedstError(f"site {node.site}: store {store.path} holds no spots and no tiles")
    return store


class SiteTask:
    """One site's side of the workflow; every method reads and writes only ``node.work_dir``."""

    def __init__(self, run: RunConfig, node: NodeConfig, panel: list[str] | None = None):
        self.run = run
        self.node = node
        self.panel = panel
        self.work = node.work_dir

    @cached_property
    def store(self):
        return open_store(self.node, self.run, self.panel)

    @cached_property
    def labelled_rows(self) -> np.ndarray:
        """Rows of the store whose expression adaptation, synthesis and the real-only predictor may use.

        Every section but the one downstream evaluates on (else the held-out section's expression would
        condition the synthetic pairs the real+synthetic predictor trains on: test labels in the training data),
        and of those a seeded, nested subset when the site declares a ``labelled-fraction`` below 1. With node
        config ``hold-out = false`` (a store of training sections only) every section counts.
        """
        from shared.splits import downstream_held_out, fraction_subset

        sections = self.store.spots.obs[keys.SECTION].astype(str).to_numpy()
        held_out = downstream_held_out(sections) if self.node.hold_out else None
        rows = np.arange(len(sections)) if held_out is None else np.flatnonzero(sections != held_out)
        if self.node.labelled_fraction < 1.0:
            rows = fraction_subset(
                rows, self.node.labelled_fraction, seed=site_seed(self.run.seed, self.node.site, "labelled")
            )
        return rows

    @cached_property
    def paired_store(self):
        """The store of the labelled rows: what adaptation and synthesis see."""
        from shared.store.subset import subset_store

        if len(self.labelled_rows) == self.store.n_spots:
            return self.store
        return subset_store(
            self.store,
            self.labelled_rows,
            self.work / PAIRED,
            tile_sections=[],
            note=f"{len(self.labelled_rows)} labelled training spots (labelled-fraction "
            f"{self.node.labelled_fraction:g}), without the downstream held-out section",
        )

    @cached_property
    def backend(self):
        from shared.backends import create_backend

        return create_backend(self.run.backend, self.run)

    # -- phases -----------------------------------------------------------------------------------------
    def pretrain(self, state: dict[str, np.ndarray], server_round: int, prox_mu: float = 0.0):
        import time

        seed = site_seed(self.run.seed, self.node.site, "pretrain", server_round)
        _ = self.store  # opening/preparing the store is not training time
        started = time.perf_counter()
        with self.progress("pretrain", server_round, self.run.pretrain.steps) as progress:
            new_state, metrics = self.backend.pretrain(
                state,
                self.store,
                self.run.pretrain,
                seed=seed,
                prox_mu=prox_mu,
                server_round=server_round,
                on_advance=progress,
            )
        metrics = {**metrics, "compute-seconds": time.perf_counter() - started}
        self._record("pretrain", server_round, metrics)
        return new_state, metrics

    def adapt(self, central: dict[str, np.ndarray], server_round: int, adapter: dict[str, np.ndarray] | None = None):
        from safetensors.numpy import save_file

        _save(self.work / CENTRAL, central, save_file)
        seed = site_seed(self.run.seed, self.node.site, "adapt", server_round)
        _ = self.paired_store  # subsetting the store is not training time
        with self.progress("adapt", server_round, self.run.adapt.steps) as progress:
            adapter_state, metrics = self.backend.adapt(
                central,
                self.paired_store,
                self.run.adapt,
                self.run.dp,
                seed=seed,
                adapter_state=adapter,
                work_dir=self.work,
                server_round=server_round,
                on_advance=progress,
            )
        _save(self.work / ADAPTER, adapter_state, save_file)
        self._record("adapt", server_round, metrics)
        return adapter_state, metrics

    def synthesize(self) -> dict[str, float]:
        from safetensors.numpy import load_file

        for name in (CENTRAL, ADAPTER):
            if not (self.work / name).is_file():
                raise FedstError(f"site {self.node.site}: {self.work / name} is missing; run the adapt phase first")
        seed = site_seed(self.run.seed, self.node.site, "synthesize")
        _ = self.paired_store
        with self.progress("synthesize", 0, self.run.synthesize.count) as progress:  # the audit runs at the last step
            synthetic = self.backend.synthesize(
                load_file(str(self.work / CENTRAL)),
                load_file(str(self.work / ADAPTER)),
                self.paired_store,
                self.work / SYNTHETIC,
                self.run.synthesize,
                seed=seed,
                on_advance=progress,
            )
            metrics = {"synthetic-pairs": float(synthetic.n_spots), "num-examples": float(synthetic.n_spots)}
            metrics.update(self.audit(synthetic))
        self._record("synthesize", 0, metrics)
        return metrics

    def downstream(self) -> dict[str, float]:
        from shared.store.format import PatchStore, is_store

        synthetic = PatchStore(self.work / SYNTHETIC) if is_store(self.work / SYNTHETIC) else None
        seed = site_seed(self.run.seed, self.node.site, "downstream")
        _ = self.labelled_rows
        with self.progress("downstream", 0, 1):  # one step: the predictors, real-only and real+synthetic
            metrics = self.backend.downstream(
                self.store, synthetic, seed=seed, predictor=self.run.predictor, train_rows=self.labelled_rows
            )
        metrics = {
            **metrics,
            "labelled-fraction": self.node.labelled_fraction,
            "labelled-spots": float(len(self.labelled_rows)),
        }
        self._record("downstream", 0, metrics)
        self.write_report()
        return metrics

    def audit(self, synthetic) -> dict[str, float]:
        """Do the synthetic images show their expression? (shared.c2l.audit.synthesis_audit: a probe fitted on
        the labelled real spots, read back on the synthetic ones). Scalars only; a key is left out where the
        probe is undefined (e.g. no expressed gene)."""
        from shared.c2l.audit import synthesis_audit

        found = synthesis_audit(self.paired_store, synthetic, seed=site_seed(self.run.seed, self.node.site, "audit"))
        return {key.replace("_", "-"): float(value) for key, value in found.items() if value is not None}

    # -- local record and report --------------------------------------------------------------------------
    def progress(self, phase: str, server_round: int, total: int) -> ProgressRecord:
        """The site's live progress record for one phase round (``work_dir/progress.json``; local, never sent)."""
        return ProgressRecord(self.work, site=self.node.site, phase=phase, server_round=server_round, total=total)

    def _record(self, phase: str, server_round: int, metrics: dict[str, float]) -> None:
        path = self.work / METRICS
        history = json.loads(path.read_text()) if path.is_file() else []
        history = [h for h in history if not (h["phase"] == phase and h["round"] == server_round)]
        history.append({"phase": phase, "round": server_round, **{k: float(v) for k, v in metrics.items()}})
        write_json_atomic(path, history)

    def write_report(self) -> Path:
        """The site's own report (never sent): real vs synthetic sample grid, its metrics, its epsilon."""
        from client.report import site_report

        return site_report(self.work, self.store, self.node.site)


def _save(path: Path, state: dict[str, np.ndarray], save_file) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
    tmp.replace(path)
