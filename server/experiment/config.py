"""Typed experiment configuration read from CONFIG.toml (precedence: defaults < file < CLI overrides).

A config names the sites, the sections each site holds and which of them are held out for evaluation, the
arms to compare, the real-spot fractions, the seeds, the DP variants of the federated arms, the predictor settings
and, in ``[run]``, the federation's run config itself (the same nested sections as ``[tool.flwr.app.config]``,
validated by shared.config.RunConfig: ``[run.pretrain]``, ``[run.adapt]``, ``[run.synthesize]``, ``[run.dp]``...,
reference: docs/configuration.md) and ``[federated]``, the federated arms' synthetic-pair count rule. Sites are
arbitrary groups of sections so that new data can be evaluated without code changes. Each entry of a site's
``sections`` is one of:

- an inline table in the SITE.toml ``[[sections]]`` format (paths relative to the config's folder);
- ``"path/to/site.toml"``: every section of that SITE.toml;
- ``"path/to/site.toml#ID"``: one section of it.

With ``[synthetic]`` the data come from ``shared.synthetic.generate_consortium`` (generated once under the
output folder); sites without an explicit ``sections`` list then default to the generated site of the same
name, and ``{consortium}`` in a path expands to the generated folder.

This module only parses and validates; nothing here touches data beyond reading SITE.toml files for ids.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import RunConfig, site_name_problem
from shared.errors import FedstError, require

ARMS = ("local", "federated", "federated-adapt", "pooled")
FEDERATED_ARMS = ("federated", "federated-adapt")
"""The arms that adapt a central model and add synthetic pairs; the ``dp`` variants apply to these."""
SHIPPED_DIR = Path(__file__).resolve().parent / "configs"
CONSORTIUM_TOKEN = "{consortium}"
CELL_PROTOCOL = 3
"""Version of what a cell computes from its config, part of the fingerprint: bump it when a code change alters
cell results, so a resumed run never mixes cells of two versions (2: per-site adaptation/synthesis seeds;
3: v-prediction presets and high-noise timestep sampling in adaptation)."""


def adapt_steps_per_round(steps: int, rounds: int) -> int:
    """Local steps per round of the federated-adapt arm: the federated arm's ``run.adapt.steps`` (one local
    adaptation) spread over ``run.adapt.rounds`` rounds, rounded up, so both arms spend the same optimiser steps
    per site when ``rounds`` divides ``steps`` (else federated-adapt spends fewer than ``rounds`` more)."""
    return max(1, -(-steps // rounds))


@dataclass(frozen=True)
class StoreSettings:
    """How each site's sections become a patch store (passed to ``prepare_store``; the patch size is the run
    config's ``patch-px``)."""

    field_um: float = 112.0
    max_tiles_per_section: int = 64


@dataclass(frozen=True)
class FederatedArmSettings:
    """How many synthetic pairs the federated arms add per site: ``max(min_synthetic, synthetic_per_spot *
    real spots)`` (the experiment's rule, in place of the run config's fixed ``synthesize.count``)."""

    synthetic_per_spot: float = 1.0
    min_synthetic: int = 16


@dataclass(frozen=True)
class PredictorSettings:
    """Downstream predictor trained by every arm (``shared.downstream.predictor.train_predictor``)."""

    kind: str = "ridge"
    encoder: str = "stats"
    top_k: int = 50
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SyntheticSource:
    """Generate the consortium with ``shared.synthetic.generate_consortium`` instead of reading real data."""

    n_sites: int = 3
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteSpec:
    """A site as written in the config: section references (resolved later) and held-out section ids."""

    name: str
    sections: tuple[Any, ...]
    held_out: tuple[str, ...]
    held_out_last: int = 0


@dataclass(frozen=True)
class ReportSettings:
    heatmap_genes: int = 3
    grid_patches: int = 8


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    base_dir: Path
    sites: tuple[SiteSpec, ...]
    arms: tuple[str, ...] = ARMS
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    seeds: tuple[int, ...] = (0, 1)
    dp: tuple[bool, ...] = (False, True)
    panel: Path | None = None
    synthetic: SyntheticSource | None = None
    store: StoreSettings = StoreSettings()
    run: RunConfig = field(default_factory=RunConfig)
    federated: FederatedArmSettings = FederatedArmSettings()
    predictor: PredictorSettings = PredictorSettings()
    report: ReportSettings = ReportSettings()
    source: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def fingerprint(self) -> str:
        """Hash of everything that changes a cell's result (not the report settings)."""
        data = self.to_dict()
        data.pop("report", None)
        data.pop("source", None)
        data["cell_protocol"] = CELL_PROTOCOL
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, RunConfig):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------- loading


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A CONFIG.toml path, or the name of a shipped config (``synthetic``, ``her2st``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path.resolve()
    shipped = SHIPPED_DIR / f"{path.name}.toml" if path.suffix == "" else SHIPPED_DIR / path.name
    if len(path.parts) == 1 and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))
    raise FedstError(f"{name_or_path}: no such config file (shipped configs: {', '.join(names)})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=VALUE`` -> (["a", "b"], value); VALUE is read as a TOML value, else kept as a string."""
    require("=" in text, f"override {text!r}: expected KEY=VALUE (e.g. run.adapt.steps=20)")
    key, raw = text.split("=", 1)
    key = key.strip()
    require(bool(key), f"override {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def load_config(
    name_or_path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    *,
    data: dict[str, Any] | None = None,
    base_dir: Path | None = None,
) -> ExperimentConfig:
    """Read a config file (or a dict), apply ``KEY=VALUE`` overrides, validate, return typed settings."""
    source: Path | None = None
    if data is None:
        require(name_or_path is not None, "load_config: give a config path or a data dict")
        source = resolve_config_path(name_or_path)  # type: ignore[arg-type]
        try:
            data = tomllib.loads(source.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise FedstError(f"{source}: invalid TOML ({exc})") from None
        base_dir = source.parent
    data = copy.deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), f"override {item!r}: {part!r} is not a table")
        node[path[-1]] = value
    where = str(source) if source else "config"
    return _build(data, base_dir or Path.cwd(), where, source)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    require(
        not unknown, f"{where}: unknown key(s) {', '.join(unknown)} (expected some of: {', '.join(sorted(allowed))})"
    )


def _section_from(cls: type, table: Any, where: str, extra_field: str | None = None) -> Any:
    """Typed fields from ``table``; ``extra_field`` names a sub-table passed through verbatim (e.g. keyword
    arguments of a library call). Any other key is an error, so a typo never goes unnoticed."""
    if table is None:
        return cls()
    require(isinstance(table, dict), f"{where}: expected a table")
    names = {f.name for f in dataclasses.fields(cls)} - {extra_field}
    allowed = names | ({extra_field} if extra_field else set())
    _check_keys({k.replace("-", "_"): v for k, v in table.items()}, allowed, where)
    typed: dict[str, Any] = {}
    for key, value in table.items():
        attr = key.replace("-", "_")
        if attr in names:
            typed[attr] = _coerce(cls, attr, value, f"{where}.{key}")
        else:
            require(isinstance(value, dict), f"{where}.{key}: expected a table")
            typed[attr] = dict(value)
    return cls(**typed)


def _coerce(cls: type, attr: str, value: Any, where: str) -> Any:
    default = next(f for f in dataclasses.fields(cls) if f.name == attr)
    kind = default.type if isinstance(default.type, str) else getattr(default.type, "__name__", "")
    if kind.startswith("int"):
        require(isinstance(value, int) and not isinstance(value, bool), f"{where}: expected an integer, got {value!r}")
    elif kind.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok or (value is None and "None" in kind), f"{where}: expected a number, got {value!r}")
        value = float(value) if value is not None else None
    elif kind.startswith("str"):
        require(isinstance(value, str), f"{where}: expected a string, got {value!r}")
    return value


TOP_KEYS = {
    "name",
    "data_root",
    "sites",
    "arms",
    "fractions",
    "seeds",
    "dp",
    "panel",
    "synthetic",
    "store",
    "run",
    "federated",
    "predictor",
    "report",
}


def _build(data: dict[str, Any], base_dir: Path, where: str, source: Path | None) -> ExperimentConfig:
    _check_keys(data, TOP_KEYS, where)
    name = data.get("name", source.stem if source else "experiment")
    require(isinstance(name, str) and name, f"{where}: 'name' must be a non-empty string")

    arms = data.get("arms", list(ARMS))
    require(isinstance(arms, list) and arms, f"{where}: 'arms' must be a non-empty list")
    for arm in arms:
        require(arm in ARMS, f"{where}: unknown arm {arm!r} in 'arms' (expected some of {', '.join(ARMS)})")
    require(len(set(arms)) == len(arms), f"{where}: 'arms' lists an arm twice")

    fractions = data.get("fractions", [0.1, 0.25, 0.5, 1.0])
    require(isinstance(fractions, list) and fractions, f"{where}: 'fractions' must be a non-empty list")
    for f in fractions:
        ok = isinstance(f, (int, float)) and not isinstance(f, bool) and 0.0 < float(f) <= 1.0
        require(ok, f"{where}: spot fraction {f!r} in 'fractions' is out of range (expected 0 < fraction <= 1)")
    fractions = sorted({float(f) for f in fractions})

    seeds = data.get("seeds", [0, 1])
    require(
        isinstance(seeds, list)
        and seeds
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds),
        f"{where}: 'seeds' must be a non-empty list of non-negative integers, got {seeds!r}",
    )
    require(len(set(seeds)) == len(seeds), f"{where}: 'seeds' lists a seed twice")

    dp = data.get("dp", [False, True])
    if isinstance(dp, bool):
        dp = [dp]
    require(
        isinstance(dp, list) and dp and all(isinstance(v, bool) for v in dp),
        f"{where}: 'dp' must be true, false or a list of them (DP variants of the federated arms)",
    )
    dp = sorted(set(dp))

    data_root = data.get("data_root")
    if data_root is not None:
        require(isinstance(data_root, str) and data_root, f"{where}: 'data_root' must be a path string")
        base_dir = (base_dir / os.path.expandvars(data_root)).resolve()
    panel = data.get("panel")
    if panel is not None:
        require(isinstance(panel, str), f"{where}: 'panel' must be a path string")
        panel = (base_dir / panel).resolve()
        require(panel.is_file(), f"{where}: panel file {panel} does not exist")

    synthetic = None
    if "synthetic" in data:
        synthetic = _section_from(SyntheticSource, data["synthetic"], f"{where} [synthetic]", extra_field="options")
        require(synthetic.n_sites >= 1, f"{where} [synthetic]: n_sites must be >= 1")

    raw_sites = data.get("sites")
    if raw_sites is None and synthetic is not None:
        raw_sites = [{"name": f"site-{i}"} for i in range(synthetic.n_sites)]
    require(isinstance(raw_sites, list) and raw_sites, f"{where}: expected at least one [[sites]] table")
    sites = []
    for i, raw in enumerate(raw_sites):
        sw = f"{where} sites[{i}]"
        require(isinstance(raw, dict), f"{sw}: expected a table")
        _check_keys(raw, {"name", "sections", "held_out", "held_out_last"}, sw)
        site_name = raw.get("name", f"site-{i}")
        problem = site_name_problem(site_name)  # the federated arms send it to the server as the site's label
        require(problem is None, f"{sw}: 'name' {problem}")
        sections = raw.get("sections")
        if sections is None:
            require(
                synthetic is not None,
                f"{sw} ({site_name}): 'sections' is required (a list of section tables or SITE.toml paths)",
            )
            sections = [f"{CONSORTIUM_TOKEN}/{site_name}/site.toml"]
        require(isinstance(sections, list) and sections, f"{sw} ({site_name}): 'sections' must be a non-empty list")
        held_out = raw.get("held_out", [])
        require(
            isinstance(held_out, list) and all(isinstance(h, str) for h in held_out),
            f"{sw} ({site_name}): 'held_out' must be a list of section ids",
        )
        held_out_last = raw.get("held_out_last", 0 if held_out else 1)
        require(
            isinstance(held_out_last, int) and held_out_last >= 0,
            f"{sw} ({site_name}): 'held_out_last' must be an integer >= 0",
        )
        sites.append(
            SiteSpec(
                site_name,
                tuple(_normalise_ref(s, base_dir, f"{sw} ({site_name})") for s in sections),
                tuple(held_out),
                held_out_last if not held_out else 0,
            )
        )
    names = [s.name for s in sites]
    require(len(set(names)) == len(names), f"{where}: two sites share a name ({names})")

    raw_run = data.get("run", {})
    require(isinstance(raw_run, dict), f"{where} [run]: expected a table (the federation's run config sections)")
    try:
        run = RunConfig.from_mapping(raw_run)
    except FedstError as exc:
        raise FedstError(f"{where} [run]: {exc}") from None
    federated_arms = [a for a in arms if a in FEDERATED_ARMS]
    require(
        run.dp.epsilon > 0 or not federated_arms or True not in dp,
        f"{where} [run.dp]: epsilon must be > 0 for the DP variants of the federated arms "
        f"({', '.join(federated_arms)}; dp = [..., true])",
    )
    federated = _section_from(FederatedArmSettings, data.get("federated"), f"{where} [federated]")
    require(
        federated.synthetic_per_spot > 0 and federated.min_synthetic >= 1,
        f"{where} [federated]: synthetic_per_spot must be > 0 and min_synthetic >= 1",
    )
    predictor = _section_from(PredictorSettings, data.get("predictor"), f"{where} [predictor]", extra_field="options")
    require(predictor.top_k >= 2, f"{where} [predictor]: top_k must be >= 2 (GSC needs gene pairs)")
    store = _section_from(StoreSettings, data.get("store"), f"{where} [store]")
    report = _section_from(ReportSettings, data.get("report"), f"{where} [report]")
    return ExperimentConfig(
        name=name,
        base_dir=base_dir,
        sites=tuple(sites),
        arms=tuple(arms),
        fractions=tuple(fractions),
        seeds=tuple(seeds),
        dp=tuple(dp),
        panel=panel,
        synthetic=synthetic,
        store=store,
        run=run,
        federated=federated,
        predictor=predictor,
        report=report,
        source=source,
    )


def _normalise_ref(ref: Any, base_dir: Path, where: str) -> Any:
    """Make paths absolute now so that resolution does not depend on the working directory."""
    if isinstance(ref, str):
        require(bool(ref.strip()), f"{where}: empty section reference")
        path, _, section = ref.partition("#")
        if not path.startswith(CONSORTIUM_TOKEN):
            path = str((base_dir / path).resolve())
        return f"{path}#{section}" if section else path
    require(
        isinstance(ref, dict), f"{where}: a section must be a table (SITE.toml format) or a SITE.toml path, got {ref!r}"
    )
    require(isinstance(ref.get("id"), str) and ref["id"], f"{where}: a section table needs a string 'id'")
    require(
        isinstance(ref.get("format"), str),
        f"{where}: section {ref['id']!r} needs a 'format' (visium | hest | legacy-st | h5ad)",
    )
    return {k: _absolute(v, base_dir) if k in PATH_KEYS else v for k, v in ref.items()}


PATH_KEYS = {"h5ad", "image", "path", "counts", "spots"}


def _absolute(value: Any, base_dir: Path) -> Any:
    if isinstance(value, str) and not value.startswith(CONSORTIUM_TOKEN):
        return str((base_dir / value).resolve())
    return value


# ------------------------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class ResolvedSite:
    """A site with concrete SITE.toml section tables (absolute paths) and its split into train / held out."""

    name: str
    sections: tuple[dict[str, Any], ...]
    held_out: tuple[str, ...]
    panel: Path | None = None

    @property
    def section_ids(self) -> list[str]:
        return [s["id"] for s in self.sections]

    @property
    def train_sections(self) -> list[str]:
        return [s for s in self.section_ids if s not in self.held_out]


def resolve_sites(config: ExperimentConfig, consortium: Path | None = None) -> list[ResolvedSite]:
    """Expand section references into SITE.toml tables and check every id (FedstError names the culprit)."""
    owner: dict[str, str] = {}
    resolved = []
    for spec in config.sites:
        tables: list[dict[str, Any]] = []
        panel: Path | None = None
        for ref in spec.sections:
            if isinstance(ref, str):
                more, site_panel = _read_site_toml(ref, consortium, spec.name)
                tables.extend(more)
                panel = panel or site_panel
            else:
                tables.append({k: _expand(v, consortium) for k, v in ref.items()})
        for table in tables:
            sid = table["id"]
            require(
                sid not in owner,
                f"section {sid!r} is listed in site {owner.get(sid)!r} and again in site {spec.name!r}",
            )
            owner[sid] = spec.name
        ids = [t["id"] for t in tables]
        held = (
            list(spec.held_out) if spec.held_out else ids[len(ids) - spec.held_out_last :] if spec.held_out_last else []
        )
        resolved.append((spec, tables, held, panel))
    sites = []
    for spec, tables, held, panel in resolved:
        ids = [t["id"] for t in tables]
        for sid in held:
            if sid not in owner:
                raise FedstError(
                    f"site {spec.name!r}: held-out section {sid!r} is not "
                    f"in any site (known sections: {', '.join(owner)})"
                )
            require(
                sid in ids,
                f"site {spec.name!r}: held-out section {sid!r} belongs to site {owner[sid]!r}, not to this site",
            )
        require(
            bool(held),
            f"site {spec.name!r}: no held-out section (set 'held_out' or "
            "'held_out_last'); every site is evaluated on its own held-out sections",
        )
        require(len(held) < len(ids), f"site {spec.name!r}: every section is held out, none is left to train on")
        sites.append(ResolvedSite(spec.name, tuple(tables), tuple(held), config.panel or panel))
    return sites


def _expand(value: Any, consortium: Path | None) -> Any:
    if isinstance(value, str) and value.startswith(CONSORTIUM_TOKEN):
        require(consortium is not None, f"{value}: {CONSORTIUM_TOKEN} is only defined with a [synthetic] source")
        return str(Path(str(consortium)) / value[len(CONSORTIUM_TOKEN) :].lstrip("/"))
    return value


def _read_site_toml(ref: str, consortium: Path | None, site: str) -> tuple[list[dict[str, Any]], Path | None]:
    path_text, _, wanted = ref.partition("#")
    path = Path(_expand(path_text, consortium))
    require(path.is_file(), f"site {site!r}: SITE.toml {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise FedstError(f"{path}: invalid TOML ({exc})") from None
    sections = data.get("sections")
    require(isinstance(sections, list) and sections, f"{path}: expected [[sections]] tables")
    tables = []
    for i, table in enumerate(sections):
        require(
            isinstance(table, dict) and isinstance(table.get("id"), str), f"{path}: sections[{i}] needs a string 'id'"
        )
        tables.append(
            {
                k: str((path.parent / v).resolve()) if k in PATH_KEYS and isinstance(v, str) else v
                for k, v in table.items()
            }
        )
    panel = data.get("panel")
    panel_path = (path.parent / panel).resolve() if isinstance(panel, str) else None
    if wanted:
        chosen = [t for t in tables if t["id"] == wanted]
        require(
            bool(chosen),
            f"site {site!r}: unknown section {wanted!r} in {path} (it has: {', '.join(t['id'] for t in tables)})",
        )
        return chosen, panel_path
    return tables, panel_path
