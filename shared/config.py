"""The one typed configuration of a federated run: Flower's run config (kebab-case) plus each site's node config.

Precedence: dataclass defaults < ``[tool.flwr.app.config]`` in pyproject.toml < ``flwr run -c "key=value"``.
The defaults make the main job (`fedst demo`) work. Imports nothing heavy: the ClientApp reads this in a
fresh process for every message.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from shared.errors import FedstError

PHASES = ("pretrain", "adapt", "synthesize", "downstream")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
BACKENDS = ("c2l", "toy")
PRESETS = ("tiny", "base", "large")
SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # what a site may declare as its name (it travels to the server)
SECAGG_STRATEGIES = ("fedavg", "fedprox")  # server optimisers need no per-site update, but FedAdam's is not wired


def site_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a site's declared name (None: it can)."""
    if not isinstance(name, str) or SITE_NAME.fullmatch(name) is None:
        return f"{name!r} is not a site name (expected 1-64 letters, digits, '.', '_' or '-')"
    return None


@dataclass
class RunConfig:
    """Everything the server and every site need to agree on. Keys in TOML are the field names with '-'."""

    backend: str = "c2l"  # "c2l": the real C2L-ST workflow; "toy": a small CNN for fast mechanics tests
    preset: str = "tiny"  # C2L-ST model preset
    phases: str = ",".join(PHASES)  # which phases to run, in this order
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam (pretraining)
    rounds_pretrain: int = 4
    rounds_adapt: int = 1  # > 1 only meaningful with federated-adapt
    local_steps: int = 30  # optimiser steps per site per round
    adapt_steps: int = 60
    batch_size: int = 16
    lr: float = 1e-3
    prox_mu: float = 0.01  # FedProx proximal weight
    server_lr: float = 0.01  # FedAdam eta
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    patch_px: int = 32
    dp_epsilon: float = 0.0  # 0 disables DP during adaptation
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    federated_adapt: bool = False  # average the modulation weights across sites (else they stay on site)
    synthetic_count: int = 64
    sample_steps: int = 15
    predictor: str = "ridge"
    consortium: str = ""  # simulation: folder with site-<i>/site.toml; data-path = consortium/site-<partition-id>
    out_dir: str = "fedst-runs"  # server-side run directory root (absolute, or relative to the ServerApp cwd)
    run_name: str = ""  # run directory name; empty: "run-<run id>"
    sites_root: str = ""  # simulation: where sites' work-dirs go; empty: <run dir>/sites
    warm_start: str = ""  # optional central weights (a c2l save dir or .safetensors) on the server
    resume: bool = False  # continue from the run directory's last checkpoint
    min_sites: int = 2  # fewer valid replies than this in a round fails the run
    failure_tolerance: int = 1  # more failed/timed-out/rejected sites than this in a round fails the run
    round_timeout: float = 900.0  # seconds to wait for replies in a round
    max_update_norm: float = 1e4  # L2 norm of (update - global) above which an update is rejected
    secagg: bool = False  # pretrain through Flower's SecAgg+ (the server sees only the sum of the sites' models)
    secagg_num_shares: int = 3  # shares of each site's key (neighbours incl. itself); >= 3
    secagg_reconstruction_threshold: int = 2  # shares needed to unmask; >= 2, < num-shares; sites per round >= it
    secagg_clipping_range: float = 8.0  # every weighted parameter must lie in [-range, range] (checked on the site)
    secagg_quantization_range: int = 4194304  # 2**22 integer levels over the clipping range
    secagg_max_weight: float = 1000.0  # a site's num-examples must not exceed it (weights are quantised as n / max)
    seed: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> RunConfig:
        """Build from Flower's run config (kebab-case); unknown keys and wrong types are FedstErrors."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                choices = ", ".join(sorted(n.replace("_", "-") for n in known))
                raise FedstError(f"run config: unknown key {key!r} (known keys: {choices})")
            kwargs[name] = _coerce(f"run config key {key!r}", value, known[name].type)
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        def check(ok: bool, key: str, expected: str) -> None:
            if not ok:
                value = getattr(self, key.replace("-", "_"))
                raise FedstError(f"run config key {key!r} is {value!r}; expected {expected}")

        check(self.backend in BACKENDS, "backend", " or ".join(BACKENDS))
        check(self.strategy in STRATEGIES, "strategy", " or ".join(STRATEGIES))
        check(self.backend == "toy" or self.preset in PRESETS, "preset", " or ".join(PRESETS))
        bad = [p for p in self.phase_list if p not in PHASES]
        check(not bad and len(self.phase_list) > 0, "phases", f"a comma-separated subset of {','.join(PHASES)}")
        for key in ("rounds-pretrain", "rounds-adapt", "local-steps", "adapt-steps", "batch-size", "min-sites"):
            check(getattr(self, key.replace("-", "_")) >= 1, key, "an integer >= 1")
        check(self.patch_px >= 8 and self.patch_px % 8 == 0, "patch-px", "a multiple of 8, >= 8")
        check(self.failure_tolerance >= 0, "failure-tolerance", "an integer >= 0")
        check(self.dp_epsilon >= 0, "dp-epsilon", "0 (off) or a positive epsilon")
        check(0 < self.dp_delta < 1, "dp-delta", "a number in (0, 1)")
        check(self.lr > 0, "lr", "a positive learning rate")
        check(self.prox_mu >= 0, "prox-mu", ">= 0")
        check(self.max_update_norm > 0, "max-update-norm", "a positive norm bound")
        check(self.round_timeout > 0, "round-timeout", "a positive number of seconds")
        check(self.synthetic_count >= 1, "synthetic-count", "an integer >= 1")
        if self.secagg:
            check(
                self.secagg_num_shares >= 3, "secagg-num-shares", "an integer >= 3 (Flower's SecAgg+ needs more than 2)"
            )
            check(
                2 <= self.secagg_reconstruction_threshold < self.secagg_num_shares,
                "secagg-reconstruction-threshold",
                f"an integer >= 2 and < secagg-num-shares ({self.secagg_num_shares})",
            )
            check(self.secagg_clipping_range > 0, "secagg-clipping-range", "a positive number")
            check(
                2 <= self.secagg_quantization_range <= 2**24,
                "secagg-quantization-range",
                "an integer in [2, 2**24] (the sum of all sites' levels must stay below Flower's 2**32 modulus)",
            )
            check(self.secagg_max_weight > 0, "secagg-max-weight", "a positive number")
            check(
                self.strategy in SECAGG_STRATEGIES,
                "strategy",
                f"{' or '.join(SECAGG_STRATEGIES)} with secagg = true (SecAgg+ runs on Flower's legacy strategies; "
                "FedAdam is not supported there)",
            )
            check(
                self.min_sites >= self.secagg_reconstruction_threshold,
                "min-sites",
                f">= secagg-reconstruction-threshold ({self.secagg_reconstruction_threshold}): SecAgg+ cannot unmask "
                "a round with fewer sites",
            )

    @property
    def phase_list(self) -> list[str]:
        return [p.strip() for p in self.phases.split(",") if p.strip()]

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping, the exact shape of ``[tool.flwr.app.config]`` (written as resolved-config.json)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def fingerprint(self) -> dict[str, Any]:
        """The keys that must match for a resume to continue the same computation (round counts may grow)."""
        skip = {"rounds-pretrain", "rounds-adapt", "resume", "round-timeout", "phases", "out-dir", "sites-root"}
        return {k: v for k, v in self.to_dict().items() if k not in skip}


@dataclass
class NodeConfig:
    """Where a site keeps its data and its work. ``data-path``: a SITE.toml or a prepared store."""

    data_path: Path
    work_dir: Path
    site: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], run: RunConfig, default_work_root: Path | None = None
    ) -> NodeConfig:
        """Read ``data-path`` / ``work-dir`` (deployment), or derive them from ``partition-id`` (simulation)."""
        values = dict(values or {})
        partition = values.get("partition-id")
        data = values.get("data-path")
        if data is None and partition is not None and run.consortium:
            folder = Path(run.consortium) / f"site-{int(partition)}"
            data = str(folder / "site.toml") if (folder / "site.toml").is_file() else str(folder)
        if data is None:
            raise FedstError(
                "node config: 'data-path' is missing (pass --node-config \"data-path='/abs/site.toml' "
                "work-dir='/abs/work'\" to flower-supernode, or set run config 'consortium' in simulation)"
            )
        data_path = Path(str(data)).expanduser()
        if not data_path.exists():
            raise FedstError(f"node config 'data-path': {data_path} does not exist (expected a SITE.toml or a store)")
        declared = values.get("site")
        if declared not in (None, ""):
            if (problem := site_name_problem(str(declared))) is not None:
                raise FedstError(f"node config 'site': {problem}")
            site = str(declared)
        else:
            site = _site_name(data_path)
        work = values.get("work-dir")
        if work is None:
            root = Path(run.sites_root) if run.sites_root else default_work_root
            if root is None:
                raise FedstError("node config: 'work-dir' is missing (a writable folder on the site)")
            work = str(Path(root) / site)
        work_dir = Path(str(work)).expanduser().absolute()
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FedstError(f"node config 'work-dir': cannot create {work_dir} ({exc.strerror})") from None
        extra = {k: v for k, v in values.items() if k not in ("data-path", "work-dir", "site")}
        return cls(data_path=data_path.absolute(), work_dir=work_dir, site=site, extra=extra)


def _site_name(data_path: Path) -> str:
    """The SITE.toml's declared ``site`` (validated), else a name derived from the path (made valid)."""
    if data_path.suffix == ".toml":
        try:
            import tomllib

            declared = tomllib.loads(data_path.read_text()).get("site")
        except (OSError, ValueError):
            declared = None
        if declared:
            if (problem := site_name_problem(declared)) is not None:
                raise FedstError(f"{data_path}: 'site' {problem}")
            return str(declared)
        derived = data_path.parent.name if data_path.stem == "site" else data_path.stem
    else:
        derived = data_path.name
    return re.sub(r"[^A-Za-z0-9._-]", "-", derived)[:64] or "site"


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    kind = {"str": str, "int": int, "float": float, "bool": bool}.get(str(annotation), str)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    else:
        return str(value)
    raise FedstError(f"{where}: {value!r} is not a valid {kind.__name__}")
