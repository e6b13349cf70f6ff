"""The typed run config of a federation: nested sections, one validation and coercion path (pydantic v2).

Precedence: the defaults here < ``[tool.flwr.app.config]`` (nested tables) in pyproject.toml < ``flwr run -c
"section.key=value"``. Flower flattens the nested tables to dotted keys (``pretrain.rounds``) in
``context.run_config``; `RunConfig.from_mapping` accepts that flat mapping, a nested one (the experiment's
``[run]`` table) or a mix, plus the legacy flat keys of shared/config/legacy.py. Unknown keys and bad values are
FedstErrors naming the key. The defaults make the main job (`fedst demo`) work. Imports nothing heavy: the
ClientApp reads this in a fresh process for every message.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.config.legacy import ALIASES, UNSET
from shared.errors import ConfigError

PHASES = ("pretrain", "adapt", "synthesize", "downstream")
SECAGG_STRATEGIES = ("fedavg", "fedprox")  # server optimisers need no per-site update, but FedAdam's is not wired


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class Section(BaseModel):
    """A table of the run config: kebab-case keys in TOML, snake_case attributes in Python, no unknown keys."""

    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, populate_by_name=True, coerce_numbers_to_str=True)


class PretrainConfig(Section):
    """Federated pretraining of the central diffusion model on the sites' unlabeled tiles and patches."""

    rounds: int = Field(2, ge=1, description="federated pretraining rounds")
    steps: int = Field(150, ge=1, description="optimiser steps per site per round")
    batch_size: int = Field(16, ge=1, description="images per optimiser step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of pretraining (sites)")
    augmentation: bool = Field(True, description="random flips/rotations of the training images")
    ema_decay: float = Field(
        0.999,
        ge=0,
        lt=1,
        description="EMA of the weights, carried across rounds; adaptation and sampling use it (0: raw weights)",
    )
    prediction_type: str = Field(
        "",
        description="diffusion target of the central model: '' (the preset's, v_prediction) | epsilon | v_prediction",
    )


class AdaptConfig(Section):
    """Gene-conditioned adaptation (the central model frozen, a small modulation network trained per site)."""

    rounds: int = Field(1, ge=1, description="adaptation rounds (> 1 only meaningful with adapt.federated)")
    steps: int = Field(250, ge=1, description="optimiser steps per site per round")
    batch_size: int = Field(16, ge=1, description="paired spots per optimiser step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of adaptation")
    federated: bool = Field(
        False,
        description="average the modulation weights across sites (else they stay on site); needs paths.consortium's "
        "panel.txt on the server",
    )
    cond_dropout: float = Field(0.1, ge=0, le=1, description="probability of dropping a spot's condition (CFG)")
    timestep_power: float = Field(0.3, gt=0, description="timesteps drawn as T * u**power (< 1: more high-noise steps)")
    lora_rank: int = Field(0, ge=0, description="LoRA rank on the central model's attention (0: off)")
    lora_alpha: float = Field(0.0, ge=0, description="LoRA scale numerator (0: the rank)")
    attention_film: bool = Field(
        False, description="the genes also modulate every attention block's input norm (adaLN-style), not only ResNets"
    )
    hidden_dim: int = Field(64, ge=1, description="width of the modulation network")
    embed_dim: int = Field(32, ge=1, description="gene-embedding width of the modulation network")
    augmentation: bool = Field(True, description="random flips/rotations of the spot patches")


class SynthesizeConfig(Section):
    """Synthetic pairs sampled on each site from its adapted model."""

    count: int = Field(64, ge=1, description="synthetic pairs per site")
    steps: int = Field(20, ge=1, description="sampler steps per image (cost is linear)")
    sampler: Literal["ddim", "dpm", "ddpm"] = Field("dpm", description="diffusion sampler")
    guidance: float = Field(1.5, ge=0, description="classifier-free guidance scale (1: none)")
    perturb: Literal["none", "mixup", "noise"] = Field(
        "none", description="conditions: real spots as they are, mixup of two spots, or noised"
    )
    batch_size: int = Field(64, ge=1, description="images sampled at once")


class DPConfig(Section):
    """Example-level differential privacy (DP-SGD) of each site's adaptation."""

    epsilon: float = Field(
        0.0,
        ge=0,
        description="each site's privacy budget over the whole run, every adaptation round (0: DP off); a site's "
        "ledger refuses rounds past it",
    )
    delta: float = Field(1e-5, ge=0, lt=1, description="target delta (0: 0.1 / n_spots, capped at 1e-5)")
    max_grad_norm: float = Field(1.0, gt=0, description="per-example gradient clipping norm")
    deterministic_noise: bool = Field(
        False,
        description="TESTS ONLY: seed the DP noise and Poisson sampling from the run seed (bit-identical adapters; "
        "the server knows the seed, so it could subtract the noise). Default: os.urandom at each site",
    )


class SecureAggregationConfig(Section):
    """Pretraining through Flower's SecAgg+: the server sees only the sum of the sites' models."""

    enabled: bool = Field(False, description="pretrain through SecAgg+ (aggregation.strategy fedavg or fedprox)")
    num_shares: int = Field(3, description="shares of each site's key (neighbours incl. itself); >= 3")
    reconstruction_threshold: int = Field(2, description="shares needed to unmask; >= 2, < num-shares, <= min-sites")
    clipping_range: float = Field(8.0, description="weighted parameters must lie in [-range, range] (site-checked)")
    quantization_range: int = Field(4194304, description="integer levels over the clipping range (2**22)")
    max_weight: float = Field(1000.0, description="a site's num-examples must not exceed it (weights are n / max)")


class AggregationConfig(Section):
    """The server's aggregation of pretraining (and federated adaptation: always fedavg) updates."""

    strategy: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"] = Field(
        "fedavg",
        description="fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg (the last two: robust to a minority of "
        "poisoned updates, unweighted)",
    )
    trim_beta: float = Field(0.2, ge=0, lt=0.5, description="fedtrimmedavg: share trimmed at each end")
    prox_mu: float = Field(0.01, ge=0, description="FedProx proximal weight")
    server_lr: float = Field(0.01, description="FedAdam eta")
    server_beta1: float = Field(0.9, description="FedAdam beta1")
    server_beta2: float = Field(0.99, description="FedAdam beta2")
    server_tau: float = Field(1e-3, description="FedAdam tau")


class PathsConfig(Section):
    """Where the run reads and writes (server side unless noted)."""

    consortium: str = Field("", description="simulation: folder with site-<i>/site.toml (+ panel.txt)")
    out_dir: str = Field("fedst-runs", description="run directory root (absolute, or relative to the ServerApp cwd)")
    run_name: str = Field("", description="run directory name; empty: run-<run id>; set it to resume a run")
    sites_root: str = Field("", description="simulation: where sites' work-dirs go; empty: <run dir>/sites")
    warm_start: str = Field("", description="optional central weights (a c2l save dir or .safetensors)")


class RunConfig(Section):
    """Everything the server and every site need to agree on."""

    backend: str = Field("c2l", description="c2l (the real C2L-ST workflow) | toy (small CNN, mechanics tests)")
    preset: str = Field("tiny", description="C2L-ST model preset: tiny | base | large")
    phases: str = Field(",".join(PHASES), description="comma-separated phases to run, in this order")
    patch_px: int = Field(32, description="patch size in pixels (a multiple of 8)")
    seed: int = Field(0, description="seed of every random stream of the run")
    resume: bool = Field(False, description="continue from the run directory's last checkpoint")
    predictor: str = Field("ridge", description="downstream predictor kind")
    predictor_encoder: str = Field(
        "stats_colour",
        description="patch encoder of the downstream predictor (shared.downstream.encoders); stats_colour: synthetic "
        "pairs are learnable in it (docs/benchmarks.md)",
    )
    min_sites: int = Field(2, ge=1, description="fewer valid replies than this in a round fails the run")
    failure_tolerance: int = Field(1, ge=0, description="more failed sites than this in a round fails the run")
    round_timeout: float = Field(
        900.0, gt=0, description="seconds to wait for a round's replies, and for min-sites connected sites"
    )
    site_worker: Literal["auto", "off", "required"] = Field(
        "auto",
        description="where a site runs each phase in deployment: auto (its long-lived worker when the SuperNode's "
        "node config names 'worker-socket', else a fresh ClientApp process) | off (always the fresh process) | "
        "required (fail a site without a worker)",
    )
    transport: Literal["fedst", "flower"] = Field(
        "fedst",
        description="how the ServerApp moves messages: fedst (models packed into one buffer per dtype, replies "
        "polled promptly; server/transport.py) | flower (Flower's grid as is: one object per tensor, 3 s polls)",
    )
    max_update_norm: float = Field(1e4, gt=0, description="L2 norm of (update - global) above which it is rejected")
    max_update_ratio: float = Field(
        5.0, gt=0, description="reject an update whose L2 distance to the global model exceeds this x the model's norm"
    )
    pretrain: PretrainConfig = PretrainConfig()
    adapt: AdaptConfig = AdaptConfig()
    synthesize: SynthesizeConfig = SynthesizeConfig()
    dp: DPConfig = DPConfig()
    aggregation: AggregationConfig = AggregationConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    paths: PathsConfig = PathsConfig()

    @field_validator("phases")
    @classmethod
    def _phases(cls, value: str) -> str:
        listed = [p.strip() for p in value.split(",") if p.strip()]
        if not listed or any(p not in PHASES for p in listed):
            raise ValueError(f"expected a comma-separated subset of {','.join(PHASES)}")
        return value

    @field_validator("patch_px")
    @classmethod
    def _patch_px(cls, value: int) -> int:
        if value < 8 or value % 8:
            raise ValueError("expected a multiple of 8, >= 8")
        return value

    @model_validator(mode="after")
    def _secure_aggregation(self) -> RunConfig:
        """SecAgg+'s constraints, which span sections (checked only when it is on)."""
        s = self.secure_aggregation
        if not s.enabled:
            return self
        checks = [
            (
                s.num_shares >= 3,
                "secure-aggregation.num-shares",
                "an integer >= 3 (Flower's SecAgg+ needs more than 2)",
            ),
            (
                2 <= s.reconstruction_threshold < s.num_shares,
                "secure-aggregation.reconstruction-threshold",
                f"an integer >= 2 and < secure-aggregation.num-shares ({s.num_shares})",
            ),
            (s.clipping_range > 0, "secure-aggregation.clipping-range", "a positive number"),
            (
                2 <= s.quantization_range <= 2**24,
                "secure-aggregation.quantization-range",
                "an integer in [2, 2**24] (the sum of all sites' levels must stay below Flower's 2**32 modulus)",
            ),
            (s.max_weight > 0, "secure-aggregation.max-weight", "a positive number"),
            (
                self.aggregation.strategy in SECAGG_STRATEGIES,
                "aggregation.strategy",
                f"{' or '.join(SECAGG_STRATEGIES)} with secure-aggregation.enabled = true (SecAgg+ runs on Flower's "
                "legacy "
                "strategies; FedAdam is not supported there)",
            ),
            (
                self.min_sites >= s.reconstruction_threshold,
                "min-sites",
                f">= secure-aggregation.reconstruction-threshold ({s.reconstruction_threshold}): SecAgg+ cannot unmask "
                "a round "
                "with fewer sites",
            ),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"run config key {key!r} is {self.get(key)!r}; expected {expected}")
        return self

    # -- reading ------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> RunConfig:
        """Build from Flower's flat dotted run config, a nested mapping, or legacy flat keys (see legacy.py)."""
        flat, origin = resolve_aliases(flatten(dict(values or {})))
        known = set(DEFAULTS)
        for key in flat:
            if key not in known:
                raise ConfigError(
                    f"run config: unknown key {key!r} (known keys: {', '.join(sorted(known))}; "
                    f"legacy keys: {', '.join(ALIASES)}; see docs/configuration.md)"
                )
        try:
            return cls.model_validate(unflatten(flat))
        except ValidationError as exc:
            raise ConfigError(_explain(exc, origin)) from None

    # -- writing ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The flat dotted mapping Flower gives the apps as ``context.run_config`` (resolved-config.json)."""
        return flatten(self.model_dump(by_alias=True))

    def get(self, dotted: str) -> Any:
        """The value of one dotted key (``pretrain.rounds``)."""
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part.replace("-", "_"))
        return node

    @property
    def phase_list(self) -> list[str]:
        return [p.strip() for p in self.phases.split(",") if p.strip()]

    def fingerprint(self) -> dict[str, Any]:
        """The keys that must match for a resume to continue the same computation (round counts may grow)."""
        skip = {
            "pretrain.rounds",
            "adapt.rounds",
            "resume",
            "round-timeout",
            "phases",
            "paths.out-dir",
            "paths.sites-root",
        }
        return {k: v for k, v in self.to_dict().items() if k not in skip}


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables -> dotted keys, as Flower's ``flatten_dict`` does."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, BaseModel):
            flat.update(flatten(value.model_dump(by_alias=True), f"{name}."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys -> nested tables (Flower's ``unflatten_dict``)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def resolve_aliases(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Replace legacy keys by their dotted keys. Flower's fused config always holds every dotted key at its
    default, so a legacy key wins over a dotted key at its default; a dotted key set to another value that
    disagrees with the legacy key is an error. Returns the resolved mapping and, per dotted key set through a
    legacy key, that key (for error messages)."""
    out = {k: v for k, v in flat.items() if k not in ALIASES}
    origin: dict[str, str] = {}
    for old, value in flat.items():
        if old not in ALIASES or (isinstance(value, str) and value == UNSET):
            continue
        for new in ALIASES[old]:
            given = out.get(new, DEFAULTS[new])
            if new in out and given != value and given != DEFAULTS[new]:
                raise ConfigError(
                    f"run config: legacy key {old!r} = {value!r} conflicts with {new!r} = {given!r} (set only {new!r})"
                )
            out[new] = value
            origin[new] = old
    return out, origin


def _explain(exc: ValidationError, origin: Mapping[str, str]) -> str:
    """Pydantic's errors as 'run config key K is V; what was expected' (never a pydantic traceback). Unknown keys
    never get here: `RunConfig.from_mapping` names them first, with the known keys."""
    problems = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        via = f" (set as legacy key {origin[key]!r})" if key in origin else ""
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"run config key {key!r}{via} is {err.get('input')!r}; {msg[0].lower()}{msg[1:]}")
    return "; ".join(problems)


DEFAULTS: dict[str, Any] = RunConfig().to_dict()
"""Every dotted key with its default (the table pyproject.toml documents)."""
