"""Each site's node config (``flower-supernode --node-config``, or derived from ``partition-id`` in simulation)
and the site's declared name (SITE.toml ``site``, validated here for every reader of a node's name)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from shared import keys
from shared.errors import ConfigError

if TYPE_CHECKING:
    from shared.config.run import RunConfig

SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # what a site may declare as its name (it travels to the server)


def site_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a site's declared name (None: it can)."""
    if not isinstance(name, str) or SITE_NAME.fullmatch(name) is None:
        return f"{name!r} is not a site name (expected 1-64 letters, digits, '.', '_' or '-')"
    return None


@dataclass
class NodeConfig:
    """Where a site keeps its data and its work. ``data-path``: a SITE.toml or a prepared store."""

    data_path: Path
    work_dir: Path
    site: str = ""
    labelled_fraction: float = 1.0
    hold_out: bool = True
    """False: the store holds training sections only (a harness evaluates elsewhere, e.g. the experiment), so
    adaptation and synthesis use every section and no section is held out for the downstream phase."""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], run: RunConfig, default_work_root: Path | None = None
    ) -> NodeConfig:
        """Read ``data-path`` / ``work-dir`` (deployment), or derive them from ``partition-id`` (simulation)."""
        values = dict(values or {})
        partition = values.get("partition-id")
        data = values.get("data-path")
        if data is None and partition is not None and run.paths.consortium:
            folder = Path(run.paths.consortium) / f"site-{int(partition)}"
            data = str(folder / "site.toml") if (folder / "site.toml").is_file() else str(folder)
        if data is None:
            raise ConfigError(
                "node config: 'data-path' is missing (pass --node-config \"data-path='/abs/site.toml' "
                "work-dir='/abs/work'\" to flower-supernode, or set run config 'paths.consortium' in simulation)"
            )
        data_path = Path(str(data)).expanduser()
        if not data_path.exists():
            raise ConfigError(f"node config 'data-path': {data_path} does not exist (expected a SITE.toml or a store)")
        declared = values.get("site")
        if declared not in (None, ""):
            if (problem := site_name_problem(str(declared))) is not None:
                raise ConfigError(f"node config 'site': {problem}")
            site = str(declared)
        else:
            site = _site_name(data_path)
        work = values.get("work-dir")
        if work is None:
            root = Path(run.paths.sites_root) if run.paths.sites_root else default_work_root
            if root is None:
                raise ConfigError("node config: 'work-dir' is missing (a writable folder on the site)")
            work = str(Path(root) / site)
        work_dir = Path(str(work)).expanduser().absolute()
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"node config 'work-dir': cannot create {work_dir} ({exc.strerror})") from None
        fraction = _labelled_fraction(values, data_path)
        hold_out = values.get(HOLD_OUT, True)
        if not isinstance(hold_out, bool):
            raise ConfigError(f"node config {HOLD_OUT!r} is {hold_out!r} (expected true or false)")
        known = ("data-path", "work-dir", "site", LABELLED_FRACTION, HOLD_OUT, keys.WORKER_SOCKET)
        extra = {k: v for k, v in values.items() if k not in known}
        return cls(
            data_path=data_path.absolute(),
            work_dir=work_dir,
            site=site,
            labelled_fraction=fraction,
            hold_out=hold_out,
            extra=extra,
        )


LABELLED_FRACTION = "labelled-fraction"
HOLD_OUT = "hold-out"


def _labelled_fraction(values: Mapping[str, Any], data_path: Path) -> float:
    """The share of the site's training spots whose expression it uses (node config, else SITE.toml; default 1).

    Below 1 the site behaves as a data-limited site: adaptation, synthesis and the real-only predictor see a
    seeded subset of its paired spots, the rest are images only (pretraining still uses every image). The demo's
    limited site is made this way; the held-out section is always fully labelled.
    """
    value, where = values.get(LABELLED_FRACTION), f"node config {LABELLED_FRACTION!r}"
    if value is None and data_path.suffix == ".toml":
        from shared.ingest.site import read_toml

        value, where = read_toml(data_path).get(LABELLED_FRACTION), f"{data_path}: field {LABELLED_FRACTION!r}"
    if value is None:
        return 1.0
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = float("nan")
    if isinstance(value, bool) or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{where} is {value!r} (expected a fraction in (0, 1])")
    return fraction


def _site_name(data_path: Path) -> str:
    """The SITE.toml's declared ``site`` (validated), else a name derived from the path (made valid). The TOML is
    read by the ingest's reader, the one SITE.toml parser (a broken file is the same clear error everywhere)."""
    if data_path.suffix == ".toml":
        from shared.ingest.site import read_toml

        declared = read_toml(data_path).get("site")
        if declared:
            if (problem := site_name_problem(declared)) is not None:
                raise ConfigError(f"{data_path}: 'site' {problem}")
            return str(declared)
        derived = data_path.parent.name if data_path.stem == "site" else data_path.stem
    else:
        derived = data_path.name
    return re.sub(r"[^A-Za-z0-9._-]", "-", derived)[:64] or "site"
