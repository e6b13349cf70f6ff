"""Flower strategies for fedst: route each phase to its named client action, screen updates, tolerate failures.

`make_strategy(run, federated)` returns FedAvg, FedProx, FedAdam or a robust FedMedian / FedTrimmedAvg with
`PhaseMixin` in front. The mixin
- sends ``train.<action>`` messages (Flower's strategies always send plain ``train``),
- numbers rounds globally (``round_offset``), so a resumed run sends the same round numbers and FedAdam's
  bias correction sees the same step as an uninterrupted run,
- rejects updates with NaN/Inf, wrong names/shapes/dtypes, an out-of-bound norm or a num-examples above what the
  site declared in its first round, and replies that break the privacy contract (anything but the model tensors,
  the phase's declared scalar metrics and the site's declared name) — logged, kept in the history,
- labels sites by their declared names (server/sites.py), not by Flower node ids,
- samples every round from the sites connected at that moment, waiting at most ``round-timeout`` for
  ``min-sites`` of them (Flower's own sampling waits for its minimum forever: one dead site hung the run),
- counts errors, timeouts and sites of the phase that are no longer connected as failed sites and stops the run
  with a clear error only when fewer than ``min-sites`` valid updates remain or more than ``failure-tolerance``
  sites failed (server/rounds.py),
- aggregates replies in node-id order (deterministic float sums),
- exports/imports its optimiser state (FedAdam moments) for checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg
from flwr.supercore import log

from server.results import RoundRecord
from server.rounds import GONE, PER_SITE_ONLY, RoundPolicy, RoundTally, failure_reason, wait_for_sites
from server.sites import SiteNames, answering_node, contract_problems
from server.validate import update_problems
from shared.config import RunConfig


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The server's one ArrayRecord -> named numpy path: Flower's `to_numpy_ndarrays` in the record's key order."""
    return dict(zip(record.keys(), record.to_numpy_ndarrays()))


def numpy_to_arrays(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The server's one named numpy -> ArrayRecord path: Flower's ``ArrayRecord(state_dict)``.

    The tensors wrap the numpy buffers (no copy unless a buffer is read-only or not C-contiguous), so names,
    order, dtypes and bytes are those of ``state``.
    """
    import torch

    return ArrayRecord({k: torch.from_numpy(np.require(v, requirements=("C", "W"))) for k, v in state.items()})


class LiveNodes:
    """The nodes one round goes to, fixed once fedst has waited for them (with a deadline).

    Flower's ``FedAvg.configure_train`` reads only ``get_node_ids()`` from the grid it is given and samples
    through ``sample_nodes``, which waits without a deadline whenever fewer nodes are listed than its minimum:
    handing it this snapshot (never smaller than that minimum) means it never waits.
    """

    def __init__(self, nodes: Iterable[int]):
        self.nodes = sorted(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


class PhaseMixin:
    """See the module docstring. Call `setup_phase` before `start`."""

    action = "default"
    round_offset = 0
    extra_records: dict[str, Any] = {}

    def setup_phase(
        self,
        action: str,
        run: RunConfig,
        round_offset: int = 0,
        extra_records: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
        sites: SiteNames | None = None,
        record: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        """``record`` receives every round record (the workflow's results.json phase); by default they are kept
        in ``history``."""
        self.action = action
        self.sites = sites if sites is not None else SiteNames()
        self.run_config = run
        self.round_offset = round_offset
        self.extra_records = dict(extra_records or {})
        self.extra_config = dict(extra_config or {})
        self.history: list[RoundRecord] = []
        self.record = record if record is not None else self.history.append
        self._messages: list[Message] = []
        self._sent: list[int] = []
        self._roster: set[int] = set()  # every node this phase has sent a round to
        self._gone: list[int] = []  # of those, the ones not connected when the current round was sampled
        self._started = time.perf_counter()
        self._reference: dict[str, np.ndarray] = {}
        self._first_examples: dict[int, float] = {}  # node -> num-examples it declared in its first round

    # -- sending --------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        for key, value in self.extra_config.items():
            config[key] = value
        self._reference = arrays_to_numpy(arrays)
        global_round = server_round + self.round_offset
        run = self.run_config
        live = wait_for_sites(grid, run.min_sites, run.round_timeout, f"{self.action} round {global_round}")
        self._gone = sorted(self._roster - set(live))
        self._roster.update(live)
        snapshot = cast(Grid, LiveNodes(live))
        messages = list(super().configure_train(global_round, arrays, config, snapshot))  # type: ignore[misc]
        routed = []
        for msg in messages:
            content = msg.content
            for name, record in self.extra_records.items():
                content[name] = record
            routed.append(
                Message(content=content, message_type=f"train.{self.action}", dst_node_id=msg.metadata.dst_node_id)
            )
        self._messages = routed  # their message ids, set when Flower pushes them, tell whom a SuperLink error is for
        self._sent = sorted(m.metadata.dst_node_id for m in routed)
        self._started = time.perf_counter()
        return routed

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # fedst evaluates in its own downstream phase

    # -- receiving ------------------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        global_round = server_round + self.round_offset
        tally = RoundTally(
            f"{self.action} round {global_round}", global_round, self._sent, self.sites.label, started=self._started
        )
        for node in self._gone:  # a site of this phase that left counts against failure-tolerance, as in-round
            tally.fail(node, GONE)
        accepted: list[Message] = []
        answered = [(answering_node(msg, self._messages), msg) for msg in replies]
        for node, msg in answered:
            if not msg.has_error():
                self.sites.learn(node, msg.content)
        # Aggregate in the order of the sites' declared names: Flower sums the updates in list order, float
        # addition is not associative, and node ids (random per run in simulation) would make the same seed
        # give different weights in the last bits from run to run.
        for node, msg in sorted(answered, key=lambda pair: (self.sites.label(pair[0]), pair[0])):
            if msg.has_error():
                tally.fail(node, failure_reason(msg.error))
                continue
            problems = self._screen(msg)
            if problems:
                tally.reject(node, "; ".join(problems))
            else:
                tally.accept(node, _metrics(msg))
                accepted.append(msg)
        row = tally.close(RoundPolicy.from_run(self.run_config), self.record)
        arrays, metrics = super().aggregate_train(global_round, accepted)  # type: ignore[misc]
        if metrics is not None:  # Flower averages every metric; a mean epsilon is not a privacy statement
            metrics = MetricRecord({k: v for k, v in metrics.items() if k not in PER_SITE_ONLY})
        row.aggregate = dict(metrics or {})
        log(INFO, "%s round %d: aggregated %d sites", self.action, global_round, len(accepted))
        return arrays, metrics

    def _screen(self, msg: Message) -> list[str]:
        content = msg.content
        problems = contract_problems(content, arrays=1, phase=self.action)
        if problems:
            return [f"privacy contract: {p}" for p in problems]
        metrics = next(iter(content.metric_records.values()))
        weight = metrics.get(self.weighted_by_key)  # type: ignore[attr-defined]
        if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
            return [f"metric {self.weighted_by_key!r} must be a positive number, got {weight!r}"]  # type: ignore[attr-defined]
        # A site's weight cannot grow past what it declared in its first round of the phase (its data does not
        # grow mid-run): else one site could claim 1e9 examples and make the average its own model.
        first = self._first_examples.setdefault(msg.metadata.src_node_id, float(weight))
        if weight > first:
            return [f"metric {self.weighted_by_key!r} {weight:g} exceeds the {first:g} the site declared first"]  # type: ignore[attr-defined]
        update = arrays_to_numpy(next(iter(content.array_records.values())))
        return update_problems(
            update, self._reference, self.run_config.max_update_norm, self.run_config.max_update_ratio
        )

    # -- optimiser state for checkpoints ---------------------------------------------------------------
    def export_state(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        for prefix in ("m_t", "v_t"):
            moments = getattr(self, prefix, None)
            for key, value in (moments or {}).items():
                state[f"{prefix}/{key}"] = np.asarray(value)
        return state

    def import_state(self, state: dict[str, np.ndarray]) -> None:
        for prefix in ("m_t", "v_t"):
            moments = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(prefix + "/")}
            if hasattr(self, prefix):
                setattr(self, prefix, moments or None)


def _metrics(msg: Message) -> dict[str, float]:
    record = next(iter(msg.content.metric_records.values()), {})
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}


class PhaseFedAvg(PhaseMixin, FedAvg):
    pass


class PhaseFedProx(PhaseMixin, FedProx):
    pass


class PhaseFedAdam(PhaseMixin, FedAdam):
    pass


class PhaseFedMedian(PhaseMixin, FedMedian):
    """Coordinate-wise median of the accepted updates: robust to a minority of poisoned sites, ignores weights."""


class PhaseFedTrimmedAvg(PhaseMixin, FedTrimmedAvg):
    """Coordinate-wise mean after dropping the ``trim-beta`` share of highest and lowest values."""


def make_strategy(run: RunConfig, federated: str = "pretrain") -> PhaseMixin:
    """The configured strategy for a training phase; FedProx/FedAdam only for pretraining.

    Every round goes to all connected sites (``fraction_train`` 1); ``min-sites`` is Flower's minimum too, and
    `PhaseMixin.configure_train` has waited for it (with a deadline) before Flower samples."""
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=run.min_sites,
        min_evaluate_nodes=0,
        min_available_nodes=run.min_sites,
    )
    kind = run.aggregation.strategy if federated == "pretrain" else "fedavg"
    if kind == "fedprox":
        return PhaseFedProx(proximal_mu=run.aggregation.prox_mu, **common)
    if kind == "fedmedian":
        return PhaseFedMedian(**common)
    if kind == "fedtrimmedavg":
        return PhaseFedTrimmedAvg(beta=run.aggregation.trim_beta, **common)
    if kind == "fedadam":
        return PhaseFedAdam(
            eta=run.aggregation.server_lr,
            eta_l=run.pretrain.lr,
            beta_1=run.aggregation.server_beta1,
            beta_2=run.aggregation.server_beta2,
            tau=run.aggregation.server_tau,
            **common,
        )
    return PhaseFedAvg(**common)
