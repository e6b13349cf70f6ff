"""The one typed configuration of fedst: the run config (nested sections, shared/config/run.py) every party
agrees on, its legacy flat keys (legacy.py), and each site's node config / SITE.toml name (node.py).
The reference page docs/configuration.md is generated from these models (``python -m shared.config.reference``).
"""

from shared.config.node import SITE_NAME, NodeConfig, site_name_problem
from shared.config.run import (
    DEFAULTS,
    PHASES,
    AdaptConfig,
    AggregationConfig,
    DPConfig,
    PathsConfig,
    PretrainConfig,
    RunConfig,
    SecureAggregationConfig,
    SynthesizeConfig,
)

__all__ = [
    "DEFAULTS",
    "PHASES",
    "SITE_NAME",
    "AdaptConfig",
    "DPConfig",
    "NodeConfig",
    "PathsConfig",
    "PretrainConfig",
    "RunConfig",
    "SecureAggregationConfig",
    "AggregationConfig",
    "SynthesizeConfig",
    "site_name_problem",
]
