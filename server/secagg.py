"""Pretraining through Flower's SecAgg+ — the server only ever sees the sum of the sites' (weighted) models.

Flower implements SecAgg+ only on its legacy path: ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``
driving a legacy ``flwr.server.strategy.FedAvg``/``FedProx`` through a ``LegacyContext``; the sites answer
plain ``train`` messages with ``secaggplus_mod`` around a NumPyClient (client/app.py). This module runs that
workflow for the ``pretrain`` phase inside the fedst run and keeps what the message-API path gives:

- parameters travel as an ordered list; the server sends the ordered tensor names in the fit config
  (``param-names``, JSON) so a site maps them back unambiguously, and the aggregate gets the names back here;
- rounds are numbered globally (``round_offset``) and a checkpoint is written after every round from the
  legacy strategy's ``evaluate`` hook, so ``resume`` works as on the normal path;
- round records (per-site scalar metrics, failed sites with the reason) go through the same bookkeeping as the
  message-API path (server/rounds.py) to the workflow's results.json.

The workflow hands this module a `SecAggContext` (grid, run config, connected nodes, site names, round offset and
two callbacks: checkpoint and record), never itself.

Trade-off: per-update screening (NaN/Inf, shapes, norm) is impossible when the server only receives the
masked sum, so the *aggregate* is screened instead (names/shapes/finite/norm of aggregate - global against
``max-update-norm``); one bad site then spoils the round, which fails the run with a clear error rather than
being excluded. Every reply is still checked against the privacy contract (``ObservedGrid``): no plaintext
tensors (the masked vector travels inside the protocol's ConfigRecord), scalar metrics, the declared name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from server.results import RoundRecord
from server.rounds import RoundPolicy, RoundTally, failure_reason, wait_for_sites, weighted
from server.sites import SiteNames, contract_problems
from server.validate import update_problems
from shared.config import RunConfig
from shared.errors import FedstError

# What a site's reply may hold on the SecAgg+ path (Flower's FitRes encoding + the protocol's record).
PROTOCOL_RECORD = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS
LEGACY_CONFIGS = frozenset({PROTOCOL_RECORD, "fitres.status", "fitres.metrics"})
DROPPED = "dropped out during secure aggregation"


@dataclass(frozen=True)
class SecAggContext:
    """What SecAgg+ pretraining needs from the workflow, and nothing more."""

    grid: Grid
    run: RunConfig
    run_id: int
    nodes: list[int]  # the connected sites (the workflow waited for min-sites)
    sites: SiteNames  # node id -> declared name, shared with the rest of the run
    site_config: dict[str, Any]  # the workflow's per-message config (work root, panel)
    round_offset: int  # rounds already done (resume); rounds are numbered globally
    checkpoint: Callable[[int, dict[str, np.ndarray]], None]  # (global round, central weights) after every round
    record: Callable[[RoundRecord], None]  # every round record, for results.json


class ObservedGrid(Grid):
    """The run's Grid, seen through the privacy contract: every reply is screened and names are learned.

    A reply that breaks the contract (e.g. plaintext tensors) becomes an error reply, so the SecAgg+ workflow
    treats that site as dropped; errors and timeouts are remembered per node for the round's history.
    """

    def __init__(self, grid: Grid, sites: SiteNames):
        self.inner = grid
        self.sites = sites
        self.problems: dict[int, str] = {}
        self.closed = False

    def set_run(self, run_id: int) -> None:  # pragma: no cover - the workflow never calls it
        self.inner.set_run(run_id)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        if self.closed:  # stops Flower's client-manager thread once the phase is over
            from flwr.supercore.run import RunNotRunningException

            raise RunNotRunningException
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError("the SecAgg+ workflow uses send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("the SecAgg+ workflow uses send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = {m.metadata.dst_node_id: m for m in messages}
        replies = []
        for reply in self.inner.send_and_receive(list(sent.values()), timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.problems[node] = failure_reason(reply.error)
                replies.append(reply)
                continue
            self.sites.learn(node, reply.content)
            problems = screen_reply(reply.content)
            if problems and node in sent:
                self.problems[node] = "privacy contract (reply discarded): " + "; ".join(problems)
                log(WARNING, "secagg: %s broke the privacy contract: %s", self.sites.label(node), self.problems[node])
                replies.append(Message(Error(code=0, reason=self.problems[node]), reply_to=sent[node]))
                continue
            replies.append(reply)
        answered = {r.metadata.src_node_id for r in replies}
        for node in sent:
            if node not in answered:
                self.problems.setdefault(node, "no reply before round-timeout")
        return replies


def screen_reply(content: RecordDict) -> list[str]:
    """The SecAgg+ reply contract: no plaintext tensor values (Flower's FitRes keeps an empty ArrayRecord),
    scalar metrics, the protocol's ConfigRecord (keys, encrypted shares, the masked vector) and the name."""
    arrays = len(content.array_records)
    problems = contract_problems(
        content, arrays=arrays, extra_configs=LEGACY_CONFIGS, metric_records=len(content.metric_records)
    )
    for name, record in content.array_records.items():
        if any(len(array.data) for array in record.values()):
            problems.append(f"ArrayRecord {name!r} carries plaintext tensors")
    metrics = content.config_records.get("fitres.metrics")
    if metrics is not None:
        bad = [k for k, v in metrics.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            problems.append(f"fit metrics {bad[:3]} are not scalar numbers")
    return problems


def _legacy_strategy_class(kind: str):
    from flwr.server.strategy import FedAvg, FedProx

    return {"fedavg": FedAvg, "fedprox": FedProx}[kind]


def make_secagg_strategy(ctx: SecAggContext, names: list[str], reference: dict[str, np.ndarray], grid: ObservedGrid):
    """A legacy FedAvg/FedProx that speaks fedst: names, global rounds, screening, round records, checkpoints."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    run = ctx.run
    offset = ctx.round_offset
    base = _legacy_strategy_class(run.aggregation.strategy)

    class SecAggStrategy(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            kwargs: dict[str, Any] = dict(
                fraction_fit=1.0,
                fraction_evaluate=0.0,
                min_fit_clients=run.min_sites,
                min_evaluate_clients=0,
                min_available_clients=run.min_sites,
                accept_failures=True,
                initial_parameters=ndarrays_to_parameters([reference[n] for n in names]),
            )
            if base.__name__ == "FedProx":
                kwargs["proximal_mu"] = run.aggregation.prox_mu
            super().__init__(**kwargs)
            self.reference = reference
            self.aggregated: set[int] = set()
            self.sent: list[int] = []

        def configure_fit(self, server_round, parameters, client_manager):
            # Flower's legacy sampling waits for min_fit_clients with a 24 h deadline: wait with the run's own
            # (round-timeout) and fail the run clearly when too few sites are left
            wait_for_sites(grid, run.min_sites, run.round_timeout, f"secagg pretrain round {server_round + offset}")
            client_manager.num_available()  # Flower's wrapper syncs its registry with the grid's nodes here
            pairs = super().configure_fit(server_round, parameters, client_manager)
            extra = {"server-round": server_round + offset, "param-names": json.dumps(names)}
            for key, value in ctx.site_config.items():
                extra[key] = json.dumps(value) if isinstance(value, list) else value
            for _, fit_ins in pairs:
                fit_ins.config.update(extra)
            self.sent = sorted(proxy.node_id for proxy, _ in pairs)
            grid.problems.clear()
            self.started = time.perf_counter()
            return pairs

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []  # fedst evaluates in its own downstream phase

        def aggregate_fit(self, server_round, results, failures):
            global_round = server_round + offset
            tally = RoundTally(
                f"pretrain round {global_round} (secagg)",
                global_round,
                self.sent,
                ctx.sites.label,
                no_reply=DROPPED,
                started=self.started,
            )
            results = sorted(results, key=lambda r: r[0].node_id)
            for proxy, res in results:
                tally.accept(proxy.node_id, _fit_metrics(res))
            for node in self.sent:
                if node not in tally.sites and node in grid.problems:
                    tally.fail(node, grid.problems[node])
            row = tally.close(RoundPolicy.from_run(run), ctx.record)
            # SecAgg+ hands every result the same unmasked aggregate; screen that (individual updates are hidden).
            arrays = parameters_to_ndarrays(results[0][1].parameters)
            if len(arrays) != len(names):
                raise FedstError(
                    f"pretrain round {global_round} (secagg): aggregate "
                    f"has {len(arrays)} tensors, the model {len(names)}"
                )
            aggregate = {n: _as_reference(a, reference[n]) for n, a in zip(names, arrays)}
            problems = update_problems(aggregate, self.reference, run.max_update_norm, run.max_update_ratio)
            if problems:
                raise FedstError(
                    f"pretrain round {global_round} (secagg): the secure "
                    f"aggregate is unusable ({'; '.join(problems)}); "
                    "under SecAgg+ single updates cannot be screened or excluded, so the round cannot be repaired "
                    "(check the sites' logs, lower lr, or raise max-update-norm if the bound is too tight)"
                )
            row.aggregate = weighted(row.sites)
            self.reference = aggregate
            self.aggregated.add(server_round)
            log(INFO, "pretrain round %d (secagg): aggregated %d sites", global_round, len(row.sites))
            return ndarrays_to_parameters([aggregate[n] for n in names]), dict(row.aggregate)

        def evaluate(self, server_round, parameters):
            if server_round == 0:
                return None
            if server_round not in self.aggregated:
                why = (
                    "; ".join(f"{ctx.sites.label(n)}: {v}" for n, v in sorted(grid.problems.items()))
                    or "see the server log"
                )
                raise FedstError(
                    f"pretrain round {server_round + offset} (secagg): "
                    "secure aggregation halted before unmasking — fewer "
                    "than secure-aggregation.reconstruction-threshold "
                    f"({run.secure_aggregation.reconstruction_threshold}) sites stayed in the "
                    f"protocol ({why})"
                )
            ctx.checkpoint(server_round + offset, self.reference)
            return None

    return SecAggStrategy()


def _fit_metrics(res) -> dict[str, float]:
    metrics = {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.setdefault("num-examples", float(res.num_examples))
    return metrics


def _as_reference(array: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The dequantised aggregate (float64) in the model's dtype; integer buffers are rounded."""
    array = np.asarray(array)
    if array.shape != np.shape(reference):
        return array  # reported by update_problems with the tensor's name
    if np.issubdtype(np.asarray(reference).dtype, np.integer):
        array = np.rint(array)
    return array.astype(np.asarray(reference).dtype)


def secagg_train(ctx: SecAggContext, rounds: int, initial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``rounds - round_offset`` SecAgg+ pretraining rounds from ``initial``; returns the final central weights."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    run = ctx.run
    if len(ctx.nodes) < run.secure_aggregation.reconstruction_threshold:
        raise FedstError(
            f"secagg: {len(ctx.nodes)} sites connected, fewer than secure-aggregation.reconstruction-threshold "
            f"({run.secure_aggregation.reconstruction_threshold})"
        )
    remaining = rounds - ctx.round_offset
    if remaining <= 0:
        return initial
    names = sorted(
        initial
    )  # one canonical order (a checkpoint reloads keys sorted): rounding draws are order-dependent
    grid = ObservedGrid(ctx.grid, ctx.sites)
    strategy = make_secagg_strategy(ctx, names, initial, grid)
    context = LegacyContext(
        context=Context(
            run_id=int(ctx.run_id or 0),
            node_id=0,
            node_config={},
            state=RecordDict(),
            run_config=dict(run.to_dict()),
        ),
        config=ServerConfig(num_rounds=remaining, round_timeout=run.round_timeout),
        strategy=strategy,
    )
    fit = SecAggPlusWorkflow(
        num_shares=run.secure_aggregation.num_shares,
        reconstruction_threshold=run.secure_aggregation.reconstruction_threshold,
        max_weight=run.secure_aggregation.max_weight,
        clipping_range=run.secure_aggregation.clipping_range,
        quantization_range=run.secure_aggregation.quantization_range,
        timeout=run.round_timeout,
    )
    log(
        INFO,
        "fedst: pretrain through SecAgg+ (%d rounds, %d shares, threshold %d)",
        remaining,
        run.secure_aggregation.num_shares,
        run.secure_aggregation.reconstruction_threshold,
    )
    try:
        DefaultWorkflow(fit_workflow=fit)(grid, context)
    finally:
        grid.closed = True
    final = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    )
    return {n: _as_reference(a, initial[n]) for n, a in zip(names, final)}
