"""The one table of legacy run-config keys: the flat kebab-case keys of fedst <= 0.x, each mapped to the dotted
key(s) of the nested config that replaced it.

Old scripts (``flwr run . -c "federated-adapt=true rounds-adapt=3"``, ``fedst demo`` overrides, Python
mappings) keep working. A legacy key set to ``""`` is unset: pyproject.toml lists the legacy keys with that
value because Flower refuses a ``-c`` override whose key its fused config lacks (so no section may be named like
a legacy key: ``strategy`` and ``secagg`` became ``[aggregation]`` and ``[secure-aggregation]``).
"""

from __future__ import annotations

ALIASES: dict[str, tuple[str, ...]] = {
    "rounds-pretrain": ("pretrain.rounds",),
    "local-steps": ("pretrain.steps",),
    "batch-size": ("pretrain.batch-size", "adapt.batch-size"),
    "lr": ("pretrain.lr", "adapt.lr"),
    "rounds-adapt": ("adapt.rounds",),
    "adapt-steps": ("adapt.steps",),
    "federated-adapt": ("adapt.federated",),
    "synthetic-count": ("synthesize.count",),
    "sample-steps": ("synthesize.steps",),
    "dp-epsilon": ("dp.epsilon",),
    "dp-delta": ("dp.delta",),
    "dp-max-grad-norm": ("dp.max-grad-norm",),
    "strategy": ("aggregation.strategy",),
    "prox-mu": ("aggregation.prox-mu",),
    "server-lr": ("aggregation.server-lr",),
    "server-beta1": ("aggregation.server-beta1",),
    "server-beta2": ("aggregation.server-beta2",),
    "server-tau": ("aggregation.server-tau",),
    "secagg": ("secure-aggregation.enabled",),
    "secagg-num-shares": ("secure-aggregation.num-shares",),
    "secagg-reconstruction-threshold": ("secure-aggregation.reconstruction-threshold",),
    "secagg-clipping-range": ("secure-aggregation.clipping-range",),
    "secagg-quantization-range": ("secure-aggregation.quantization-range",),
    "secagg-max-weight": ("secure-aggregation.max-weight",),
    "consortium": ("paths.consortium",),
    "out-dir": ("paths.out-dir",),
    "run-name": ("paths.run-name",),
    "sites-root": ("paths.sites-root",),
    "warm-start": ("paths.warm-start",),
}
"""Legacy key -> the dotted key(s) it sets (``lr`` and ``batch-size`` set both pretraining and adaptation)."""

UNSET = ""
"""Value of a legacy key that sets nothing (what pyproject.toml lists, so that Flower accepts `-c` on it)."""


def legacy_names(dotted: str) -> list[str]:
    """The legacy keys that set ``dotted`` (for the reference page and error messages)."""
    return [old for old, new in ALIASES.items() if dotted in new]
