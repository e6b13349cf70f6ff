"""Flower strategies for fedst: route each phase to its named client action, screen updates, tolerate failures.

`make_strategy(run, action)` returns FedAvg, FedProx or FedAdam with `PhaseMixin` in front. The mixin
- sends ``train.<action>`` messages (Flower's strategies always send plain ``train``),
- numbers rounds globally (``round_offset``), so a resumed run sends the same round numbers and FedAdam's
  bias correction sees the same step as an uninterrupted run,
- rejects updates with NaN/Inf, wrong names/shapes or an out-of-bound norm, and replies that break the privacy
  contract (anything but the model tensors, scalar metrics and the site's declared name) — logged, kept in the
  history,
- labels sites by their declared names (server/sites.py), not by Flower node ids,
- counts errors and timeouts as failed sites and stops the run with a clear error only when fewer than
  ``min-sites`` valid updates remain or more than ``failure-tolerance`` sites failed,
- aggregates replies in node-id order (deterministic float sums),
- exports/imports its optimiser state (FedAdam moments) for checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.supercore import log

from server.sites import SiteNames, contract_problems
from server.validate import update_problems
from shared.config import RunConfig
from shared.errors import FedstError


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


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
    ) -> None:
        self.action = action
        self.sites = sites if sites is not None else SiteNames()
        self.run_config = run
        self.round_offset = round_offset
        self.extra_records = dict(extra_records or {})
        self.extra_config = dict(extra_config or {})
        self.history: list[dict[str, Any]] = []
        self._sent: list[int] = []
        self._reference: dict[str, np.ndarray] = {}

    # -- sending --------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        for key, value in self.extra_config.items():
            config[key] = value
        self._reference = arrays_to_numpy(arrays)
        messages = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))  # type: ignore[misc]
        routed = []
        for msg in messages:
            content = msg.content
            for name, record in self.extra_records.items():
                content[name] = record
            routed.append(
                Message(content=content, message_type=f"train.{self.action}", dst_node_id=msg.metadata.dst_node_id)
            )
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
        replies = sorted(replies, key=lambda m: m.metadata.src_node_id)
        failed: dict[str, str] = {}
        rejected: dict[str, str] = {}
        accepted: list[Message] = []
        answered = set()
        label = self.sites.label
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error():
                failed[label(node)] = f"error: {msg.error.reason}"
                continue
            self.sites.learn(node, msg.content)
            problems = self._screen(msg)
            if problems:
                rejected[label(node)] = "; ".join(problems)
                log(
                    WARNING,
                    "%s round %d: rejected update from %s (node %d): %s",
                    self.action,
                    global_round,
                    label(node),
                    node,
                    rejected[label(node)],
                )
            else:
                accepted.append(msg)
        for node in self._sent:
            if node not in answered:
                failed[label(node)] = "no reply before round-timeout"
        for site, why in failed.items():
            log(WARNING, "%s round %d: %s failed: %s", self.action, global_round, site, why)
        row: dict[str, Any] = {
            "round": global_round,
            "sites": {label(m.metadata.src_node_id): _metrics(m) for m in accepted},
            "failed": failed,
            "rejected": rejected,
            "wall-seconds": time.perf_counter() - getattr(self, "_started", time.perf_counter()),
        }
        self.history.append(row)
        run = self.run_config
        excluded = len(failed) + len(rejected)
        if len(accepted) < run.min_sites or excluded > run.failure_tolerance:
            raise FedstError(
                f"{self.action} round {global_round}: {len(accepted)} valid updates (min-sites {run.min_sites}), "
                f"{excluded} sites failed or rejected (failure-tolerance {run.failure_tolerance}): "
                + "; ".join(f"{k}: {v}" for k, v in {**failed, **rejected}.items())
            )
        arrays, metrics = super().aggregate_train(global_round, accepted)  # type: ignore[misc]
        row["aggregate"] = dict(metrics or {})
        log(INFO, "%s round %d: aggregated %d sites", self.action, global_round, len(accepted))
        return arrays, metrics

    def _screen(self, msg: Message) -> list[str]:
        content = msg.content
        problems = contract_problems(content, arrays=1)
        if problems:
            return [f"privacy contract: {p}" for p in problems]
        metrics = next(iter(content.metric_records.values()))
        weight = metrics.get(self.weighted_by_key)  # type: ignore[attr-defined]
        if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
            return [f"metric {self.weighted_by_key!r} must be a positive number, got {weight!r}"]  # type: ignore[attr-defined]
        update = arrays_to_numpy(next(iter(content.array_records.values())))
        return update_problems(update, self._reference, self.run_config.max_update_norm)

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


def make_strategy(run: RunConfig, n_sites: int, federated: str = "pretrain") -> PhaseMixin:
    """The configured strategy for a training phase; FedProx/FedAdam only for pretraining."""
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=n_sites,
        min_evaluate_nodes=0,
        min_available_nodes=n_sites,
    )
    kind = run.aggregation.strategy if federated == "pretrain" else "fedavg"
    if kind == "fedprox":
        return PhaseFedProx(proximal_mu=run.aggregation.prox_mu, **common)
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
