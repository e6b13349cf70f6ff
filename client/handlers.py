"""Translate Flower messages to the site's Flower-free task (client/site.py) and back.

Privacy contract: a reply carries at most one ArrayRecord whose keys are exactly the keys of the model the
server sent (model parameters), one MetricRecord of scalars, and the site's declared name (one ConfigRecord
``site`` = ``{"name": ...}``, 1-64 letters/digits/``._-``). `reply_record` enforces it, so no handler can
accidentally send expression, coordinates or pixels. On the SecAgg+ path (`secagg_pretrain`) the model leaves
the site only masked, inside Flower's SecAgg+ protocol record; the metrics and the name are the same.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from shared.config import NodeConfig, RunConfig, site_name_problem
from shared.contract import metric_key_problems
from shared.errors import ConfigError, ContractError, FedstError


class SiteTasks:
    """The site worker's memory of `SiteTask` objects (opened store, backend) between messages of one run.

    A fresh ClientApp process builds its task once and exits; the worker lives for many messages, so it keeps
    the task of each (run id, run config, node config, panel, work root) and reopens nothing. Only the last
    ``keep`` are kept, and a task is rebuilt when any of those inputs differs.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._tasks: dict[str, Any] = {}

    def get(self, key: str, build):
        if key not in self._tasks:
            self._tasks[key] = build()
            while len(self._tasks) > self.keep:
                self._tasks.pop(next(iter(self._tasks)))
        return self._tasks[key]


TASKS: SiteTasks | None = None  # set by the site worker (client/worker.py); None in a one-message ClientApp


def site_task(msg: Message, context: Context, config: dict[str, Any] | None = None):
    """The site's task for this message; ``config`` defaults to the message's ConfigRecord ``config``."""
    from client.site import SiteTask

    if config is None:
        record = msg.content.config_records.get("config")
        config = dict(record) if record is not None else {}
    root = config.get("default-work-root")
    panel = list(config["panel"]) if config.get("panel") else None

    def build():
        run = RunConfig.from_mapping(context.run_config)
        node = NodeConfig.from_mapping(context.node_config, run, default_work_root=Path(str(root)) if root else None)
        return SiteTask(run, node, panel=panel)

    if TASKS is None:
        return build(), config
    key = json.dumps(
        [context.run_id, dict(context.run_config), dict(context.node_config), panel, root], sort_keys=True, default=str
    )
    return TASKS.get(key, build), config


def site_record(name: str) -> ConfigRecord:
    """The site's declared name, the only string a reply carries."""
    if (problem := site_name_problem(name)) is not None:
        raise ContractError(f"privacy contract: site name {problem}")
    return ConfigRecord({"name": name})


def scalar_metrics(metrics: dict[str, Any], phase: str | None = None) -> dict[str, float]:
    """The metrics as floats; every key must be one ``phase`` declares (shared/contract.py) when it is given."""
    if phase is not None and (undeclared := metric_key_problems(phase, list(metrics))):
        raise ContractError(f"privacy contract: {len(undeclared)} metric keys the {phase} phase does not declare")
    scalars = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ContractError(f"privacy contract: metric {key!r} is not a scalar number")
        scalars[key] = float(value)
    return scalars


def reply_record(
    metrics: dict[str, Any],
    arrays: dict[str, np.ndarray] | None = None,
    allowed_keys: set[str] | None = None,
    site: str | None = None,
    phase: str | None = None,
) -> RecordDict:
    """The only way a handler builds a reply: model tensors with the sent names + scalar metrics (keys the
    ``phase`` declares) + the site's declared name."""
    content = RecordDict()
    if arrays is not None:
        if allowed_keys is None or set(arrays) != allowed_keys:
            raise ContractError(
                "privacy contract: reply tensors must have exactly the names of the model the server sent"
            )
        import torch  # Flower's named-tensor constructor is ``ArrayRecord(state_dict)``; no copy, same bytes

        content["arrays"] = ArrayRecord(
            {k: torch.from_numpy(np.require(v, requirements=("C", "W"))) for k, v in arrays.items()}
        )
    content["metrics"] = MetricRecord(scalar_metrics(metrics, phase))
    if site is not None:
        content["site"] = site_record(site)
    return content


def _arrays(msg: Message, name: str) -> dict[str, np.ndarray]:
    record = msg.content.array_records.get(name)
    if record is None:
        raise FedstError(f"message {msg.metadata.message_type}: no ArrayRecord {name!r}")
    return dict(zip(record.keys(), record.to_numpy_ndarrays()))


def pretrain(msg: Message, context: Context) -> Message:
    task, config = site_task(msg, context)
    state = _arrays(msg, "arrays")
    new_state, metrics = task.pretrain(
        state, int(config.get("server-round", 1)), prox_mu=float(config.get("proximal-mu", 0.0))
    )
    return Message(reply_record(metrics, new_state, set(state), site=task.node.site, phase="pretrain"), reply_to=msg)


def adapt(msg: Message, context: Context) -> Message:
    task, config = site_task(msg, context)
    central = _arrays(msg, "central")
    federated = "arrays" in msg.content.array_records
    adapter = _arrays(msg, "arrays") if federated else None
    new_adapter, metrics = task.adapt(central, int(config.get("server-round", 1)), adapter=adapter)
    if federated:
        reply = reply_record(metrics, new_adapter, set(adapter or {}), site=task.node.site, phase="adapt")
        return Message(reply, reply_to=msg)
    return Message(reply_record(metrics, site=task.node.site, phase="adapt"), reply_to=msg)  # adapter stays on site


def synthesize(msg: Message, context: Context) -> Message:
    task, _ = site_task(msg, context)
    return Message(reply_record(task.synthesize(), site=task.node.site, phase="synthesize"), reply_to=msg)


def downstream(msg: Message, context: Context) -> Message:
    task, _ = site_task(msg, context)
    return Message(reply_record(task.downstream(), site=task.node.site, phase="downstream"), reply_to=msg)


# -- SecAgg+ (Flower's legacy path) ---------------------------------------------------------------------------
def secagg_pretrain(msg: Message, context: Context) -> Message:
    """Inner handler under ``secaggplus_mod``: a NumPyClient run through Flower's legacy message handling.

    The mod masks the returned parameters (weighted by num-examples, clipped and quantised) and clears the
    plaintext ArrayRecord before anything leaves the site.
    """
    from flwr.client import NumPyClient
    from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype

    run = RunConfig.from_mapping(context.run_config)
    if not run.secure_aggregation.enabled:
        raise ConfigError(
            "this site answers plain 'train' messages only under SecAgg+ "
            "(run config 'secure-aggregation.enabled = true')"
        )
    config = msg.content.config_records.get("fitins.config")
    config = dict(config) if config is not None else {}
    if isinstance(config.get("panel"), str) and config["panel"]:
        config["panel"] = json.loads(config["panel"])
    task, _ = site_task(msg, context, config)

    class PretrainClient(NumPyClient):
        def fit(self, parameters, fit_config):
            names = json.loads(str(fit_config.get("param-names", "[]")))
            if len(names) != len(parameters) or len(set(names)) != len(names):
                raise FedstError(f"secagg: the server sent {len(parameters)} tensors but {len(names)} distinct names")
            state = dict(zip(names, parameters))
            server_round = int(fit_config.get("server-round", 1))
            new_state, metrics = task.pretrain(state, server_round, prox_mu=float(fit_config.get("proximal_mu", 0.0)))
            if set(new_state) != set(names):
                raise ContractError(
                    "privacy contract: reply tensors must have exactly the names of the model the server sent"
                )
            examples = int(round(float(metrics["num-examples"])))
            check_secagg_range(new_state, examples, run)
            # Flower quantises with stochastic rounding from numpy's global RNG: seed it per site and round so a
            # resumed run reproduces the uninterrupted one (the masks come from separate, secret randomness).
            from shared.seeds import site_seed

            np.random.seed(site_seed(run.seed, task.node.site, "secagg-rounding", server_round))
            return [np.asarray(new_state[n]) for n in names], examples, scalar_metrics(metrics, "pretrain")

    reply = handle_legacy_message_from_msgtype(lambda _: PretrainClient().to_client(), msg, context)
    reply.content["site"] = site_record(task.node.site)
    return reply


def check_secagg_range(state: dict[str, np.ndarray], examples: int, run: RunConfig) -> None:
    """Refuse (clearly) what SecAgg+ would silently corrupt: a weight above max-weight, clipped parameters."""
    if examples <= 0:
        raise FedstError("secagg: the site has no training examples")
    if examples > run.secure_aggregation.max_weight:
        raise FedstError(
            f"secagg: this site's num-examples {examples} exceeds run config 'secure-aggregation.max-weight' "
            f"({run.secure_aggregation.max_weight:g}); raise it (the aggregate would overflow)"
        )
    ratio = (
        round(examples / run.secure_aggregation.max_weight * run.secure_aggregation.quantization_range)
        / run.secure_aggregation.quantization_range
    )
    for name, value in state.items():
        peak = float(np.max(np.abs(value))) * ratio if np.size(value) else 0.0
        if not np.isfinite(peak) or peak > run.secure_aggregation.clipping_range:
            raise FedstError(
                f"secagg: tensor {name!r} (max |value| x weight {peak:.4g}) exceeds run config "
                f"'secure-aggregation.clipping-range' ({run.secure_aggregation.clipping_range:g}); "
                "SecAgg+ would clip it"
            )
