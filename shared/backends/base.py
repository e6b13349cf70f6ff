"""The one interface of a workflow backend and the registry that names them (``register_backend``,
``create_backend``, as timm's model registry does). Nothing outside this module branches on a backend's name.

A backend is built from the run config (``create_backend(run.backend, run)``); its phase methods take the
typed section of their phase, so every knob comes from shared/config/run.py and nowhere else. State crosses as
plain numpy state dicts (what Flower's ArrayRecord carries). The training phases take an optional
``on_advance(done, total)`` callback (shared.progress.Advance) that they call as their steps (or synthetic pairs)
complete; a site's task passes its progress record (shared.progress.ProgressRecord) there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from shared.errors import FedstError

if TYPE_CHECKING:
    from shared.config import AdaptConfig, DPConfig, PretrainConfig, RunConfig, SynthesizeConfig
    from shared.progress import Advance
    from shared.store.format import PatchStore

State = dict[str, np.ndarray]
Metrics = dict[str, float]


class Backend(Protocol):
    """What the server (initial models) and a site's task (phases) ask of a backend."""

    def initial_state(self, seed: int) -> State:
        """The central model's initial training state (identical for every party with the same seed)."""

    def training_state(self, weights: State) -> State:
        """A model's weights (a warm start) as the state federated pretraining carries (e.g. plus an EMA)."""

    def sampling_state(self, state: State) -> State:
        """The weights of a pretraining state that adaptation and synthesis use (e.g. its EMA)."""

    def initial_adapter(self, central: State, panel: list[str]) -> State:
        """The initial adapter (modulation) weights for the consortium's gene panel (federated adaptation)."""

    def pretrain(
        self,
        state: State,
        store: PatchStore,
        settings: PretrainConfig,
        *,
        seed: int,
        prox_mu: float = 0.0,
        server_round: int = 1,
        on_advance: Advance | None = None,
    ) -> tuple[State, Metrics]:
        """Local pretraining steps from ``state`` in (global) round ``server_round``; ``prox_mu`` > 0 adds
        FedProx's proximal term; ``on_advance(step, settings.steps)`` after each step."""

    def adapt(
        self,
        central: State,
        store: PatchStore,
        settings: AdaptConfig,
        dp: DPConfig,
        *,
        seed: int,
        adapter_state: State | None = None,
        work_dir: Path | None = None,
        server_round: int = 1,
        on_advance: Advance | None = None,
    ) -> tuple[State, Metrics]:
        """Train the adapter on the site's paired spots (central frozen) in round ``server_round``; returns the
        adapter's weights. With DP, ``epsilon`` is the site's cumulative spend (its ledger in ``work_dir``).
        ``on_advance(step, settings.steps)`` after each step."""

    def synthesize(
        self,
        central: State,
        adapter_state: State,
        store: PatchStore,
        out: Path,
        settings: SynthesizeConfig,
        *,
        seed: int,
        on_advance: Advance | None = None,
    ) -> PatchStore:
        """Write synthetic pairs conditioned on the site's spots as a store flagged synthetic;
        ``on_advance(pairs, settings.count)`` as pairs are generated."""

    def downstream(
        self,
        store: PatchStore,
        synthetic: PatchStore | None,
        *,
        seed: int,
        predictor: str,
        train_rows: np.ndarray | None = None,
    ) -> Metrics:
        """Real-only vs real+synthetic predictor scored on the held-out section (scalars only), trained on the
        store's ``train_rows`` (default: every spot outside the held-out section)."""


_REGISTRY: dict[str, Callable[[RunConfig], Backend]] = {}


def register_backend(name: str) -> Callable[[Callable[[RunConfig], Backend]], Callable[[RunConfig], Backend]]:
    """Class decorator: make ``run config backend = name`` build this backend (its constructor takes the RunConfig)."""

    def register(factory: Callable[[RunConfig], Backend]) -> Callable[[RunConfig], Backend]:
        if name in _REGISTRY:
            raise FedstError(f"backend {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return register


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def create_backend(name: str, config: RunConfig) -> Backend:
    """The backend called ``name`` for this run; an unknown name is a FedstError listing the registered ones."""
    if name not in _REGISTRY:
        raise FedstError(f"run config key 'backend' is {name!r}; expected one of {', '.join(backend_names())}")
    return _REGISTRY[name](config)
