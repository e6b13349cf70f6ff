"""Translate Flower messages to the site's Flower-free task (shared/federation/site.py) and back.

Privacy contract: a reply carries at most one ArrayRecord whose keys are exactly the keys of the model the
server sent (model parameters), plus one MetricRecord of scalars. `reply_record` enforces it, so no handler
can accidentally send expression, coordinates or pixels.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from shared.config import NodeConfig, RunConfig
from shared.errors import FedstError


def site_task(msg: Message, context: Context):
    from shared.federation.site import SiteTask

    run = RunConfig.from_mapping(context.run_config)
    config = msg.content.config_records.get("config")
    config = dict(config) if config is not None else {}
    root = config.get("default-work-root")
    node = NodeConfig.from_mapping(context.node_config, run, default_work_root=Path(str(root)) if root else None)
    panel = config.get("panel")
    return SiteTask(run, node, panel=list(panel) if panel else None), config


def reply_record(metrics: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
                 allowed_keys: set[str] | None = None) -> RecordDict:
    """The only way a handler builds a reply: model tensors with the sent names + scalar metrics."""
    content = RecordDict()
    if arrays is not None:
        if allowed_keys is None or set(arrays) != allowed_keys:
            raise FedstError("privacy contract: reply tensors must have exactly the names of the model the server sent")
        content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    scalars = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise FedstError(f"privacy contract: metric {key!r} is not a scalar number")
        scalars[key] = float(value)
    content["metrics"] = MetricRecord(scalars)
    return content


def _arrays(msg: Message, name: str) -> dict[str, np.ndarray]:
    record = msg.content.array_records.get(name)
    if record is None:
        raise FedstError(f"message {msg.metadata.message_type}: no ArrayRecord {name!r}")
    return {k: v.numpy() for k, v in record.items()}


def pretrain(msg: Message, context: Context) -> Message:
    task, config = site_task(msg, context)
    state = _arrays(msg, "arrays")
    new_state, metrics = task.pretrain(state, int(config.get("server-round", 1)), prox_mu=float(config.get("proximal-mu", 0.0)))
    return Message(reply_record(metrics, new_state, set(state)), reply_to=msg)


def adapt(msg: Message, context: Context) -> Message:
    task, config = site_task(msg, context)
    central = _arrays(msg, "central")
    federated = "arrays" in msg.content.array_records
    adapter = _arrays(msg, "arrays") if federated else None
    new_adapter, metrics = task.adapt(central, int(config.get("server-round", 1)), adapter=adapter)
    if federated:
        return Message(reply_record(metrics, new_adapter, set(adapter or {})), reply_to=msg)
    return Message(reply_record(metrics), reply_to=msg)  # the adapter stays on the site


def synthesize(msg: Message, context: Context) -> Message:
    task, _ = site_task(msg, context)
    return Message(reply_record(task.synthesize()), reply_to=msg)


def downstream(msg: Message, context: Context) -> Message:
    task, _ = site_task(msg, context)
    return Message(reply_record(task.downstream()), reply_to=msg)
