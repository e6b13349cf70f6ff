"""What a site's reply may say, per phase: the metric keys (both sides import this one table).

The privacy contract limits a reply to model tensors, scalar metrics and the site's declared name; this adds
*which* scalars. A key is a name the server will store in results.json and show to anyone who can read it, so
an unknown key (a path, a spot id, a gene name smuggled in as a key) is refused by the server and never written
(server/sites.py), and a site never builds one (client/handlers.py).
"""

from __future__ import annotations

import re

PHASE_METRICS: dict[str, frozenset[str]] = {
    "pretrain": frozenset({"loss", "num-examples", "compute-seconds"}),
    "adapt": frozenset({"loss", "num-examples", "trainable-fraction", "epsilon", "delta", "compute-seconds"}),
    "synthesize": frozenset(
        {"synthetic-pairs", "num-examples", "audit-real-pcc", "audit-synthetic-pcc", "audit-passed"}
    ),
    "downstream": frozenset({"num-examples", "labelled-fraction", "labelled-spots"}),
}
DOWNSTREAM_ARM_METRIC = re.compile(r"(real|augmented)-[a-z][a-z0-9_]{0,39}(-[a-z][a-z0-9_]{0,39})?")
"""The downstream phase's per-arm scores (``real-pcc_per_slide_mean``, ``augmented-gsc``, ...): metric names of
shared.downstream.metrics, lower case, no path or gene characters."""


def metric_key_problems(phase: str, keys: list[str]) -> list[str]:
    """The keys a reply of ``phase`` may not carry (empty: all are declared). An unknown phase declares none."""
    declared = PHASE_METRICS.get(phase, frozenset())
    bad = [
        k
        for k in keys
        if k not in declared and not (phase == "downstream" and DOWNSTREAM_ARM_METRIC.fullmatch(k) is not None)
    ]
    return sorted(bad)
