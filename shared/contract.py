"""What a site's reply may say, per phase: the metric keys and the error codes (both sides import these tables).

The privacy contract limits a reply to model tensors, scalar metrics and the site's declared name; this adds
*which* scalars. A key is a name the server will store in results.json and show to anyone who can read it, so
an unknown key (a path, a spot id, a gene name smuggled in as a key) is refused by the server and never written
(server/sites.py), and a site never builds one (client/handlers.py).

A failing site's reply says only a fixed code and category (`site_error_reason`): an exception's message names
files, spot ids and genes, so it stays in the site's own log. The server keeps only what `site_error_category`
recognises, whatever text a (modified) site sends.
"""

from __future__ import annotations

import re

LOSS_CURVE_POINTS = 10
LOSS_CURVE_KEYS = tuple(f"loss-step-{i + 1:02d}" for i in range(LOSS_CURVE_POINTS))
"""A trained phase's per-step curve as scalars: the mean local loss over each tenth of the round's steps
(``loss_curve``), so the lead can plot learning within a round without any per-step data leaving a site."""

PHASE_METRICS: dict[str, frozenset[str]] = {
    "pretrain": frozenset({"loss", "num-examples", "compute-seconds", *LOSS_CURVE_KEYS}),
    "adapt": frozenset(
        {"loss", "num-examples", "trainable-fraction", "epsilon", "delta", "compute-seconds", *LOSS_CURVE_KEYS}
    ),
    "synthesize": frozenset(
        {"synthetic-pairs", "num-examples", "audit-real-pcc", "audit-synthetic-pcc", "audit-passed"}
    ),
    "downstream": frozenset({"num-examples", "labelled-fraction", "labelled-spots"}),
}
DOWNSTREAM_ARM_METRIC = re.compile(r"(real|augmented)-[a-z][a-z0-9_]{0,39}(-[a-z][a-z0-9_]{0,39})?")
"""The downstream phase's per-arm scores (``real-pcc_per_slide_mean``, ``augmented-gsc``, ...): metric names of
shared.downstream.metrics, lower case, no path or gene characters."""


def loss_curve(losses: list[float]) -> dict[str, float]:
    """``LOSS_CURVE_KEYS`` -> mean of the finite losses in each tenth of ``losses`` (fewer points when there are
    fewer steps; a tenth with no finite loss, e.g. DP-skipped steps, is left out)."""
    import numpy as np

    values = np.asarray(losses, dtype=np.float64)
    if values.size == 0:
        return {}
    chunks = np.array_split(values, min(LOSS_CURVE_POINTS, values.size))
    curve = {}
    for key, chunk in zip(LOSS_CURVE_KEYS, chunks):
        finite = chunk[np.isfinite(chunk)]
        if finite.size:
            curve[key] = float(finite.mean())
    return curve


def metric_key_problems(phase: str, keys: list[str]) -> list[str]:
    """The keys a reply of ``phase`` may not carry (empty: all are declared). An unknown phase declares none."""
    declared = PHASE_METRICS.get(phase, frozenset())
    bad = [
        k
        for k in keys
        if k not in declared and not (phase == "downstream" and DOWNSTREAM_ARM_METRIC.fullmatch(k) is not None)
    ]
    return sorted(bad)


SITE_ERROR_CODES: dict[str, int] = {
    "data-invalid": 10,  # the site's data is missing, unreadable or not what the phase needs
    "config-invalid": 11,  # a run-config or node-config value is wrong
    "panel-mismatch": 12,  # the site's gene panel differs from the consortium's
    "privacy-budget": 13,  # the round would exceed the site's DP budget
    "contract": 14,  # the reply would break the privacy contract
    "out-of-memory": 15,
    "site-worker": 16,  # the site's worker process is missing, stopped or refused the message
    "internal": 19,  # anything else (a bug): the site's log has the traceback
}
SITE_ERROR_PREFIX = "fedst-site-error"
_SITE_ERROR = re.compile(rf"{SITE_ERROR_PREFIX} (\d{{2}}) ([a-z-]{{1,20}})")


def site_error_reason(category: str) -> str:
    """The whole text a failing site sends: ``fedst-site-error <code> <category>``."""
    if category not in SITE_ERROR_CODES:
        category = "internal"
    return f"{SITE_ERROR_PREFIX} {SITE_ERROR_CODES[category]} {category}"


def site_error_category(reason: str) -> str:
    """The category inside a failed reply's reason, or ``unrecognised``: never any other text of it (Flower wraps
    the reason as ``<class ...>:<'...'>``, and a site not running fedst's guard could send anything)."""
    match = _SITE_ERROR.search(reason or "")
    if match is None or SITE_ERROR_CODES.get(match.group(2)) != int(match.group(1)):
        return "unrecognised"
    return match.group(2)
