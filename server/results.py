"""results.json: the run's typed record, written and read only here.

One shape for every phase: a phase block is ``{"kind", "secure-aggregation", "rounds"}``; a training phase
(``kind = "train"``) has one round record per federated round, a broadcast phase (``kind = "broadcast"``:
synthesize, downstream, adaptation without ``federated-adapt``) has exactly one. A round record holds the accepted
sites' scalar metrics keyed by declared site name (server/sites.py), the failed sites (error, timeout, privacy
contract) and the rejected updates with their reasons, the aggregate metrics and the round's wall time.

``SCHEMA`` is the version of this layout; `load_results` refuses a file of a newer (or unknown) version, so a
reader never guesses a shape from which keys are present. Keys are hyphenated as in the run config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import FedstError
from shared.io import write_json_atomic

SCHEMA = 1
FILE = "results.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class RoundRecord(_Record):
    """One round (or the one broadcast) of a phase, as the server saw it."""

    round: int = Field(ge=1)
    sites: dict[str, dict[str, float]] = {}  # accepted site -> its scalar metrics
    failed: dict[str, str] = {}  # site -> why it is missing (error reply, no reply, privacy contract)
    rejected: dict[str, str] = {}  # site -> why its update was screened out (NaN, shape, norm, weight)
    aggregate: dict[str, float] = {}  # the aggregate metrics (weighted by num-examples)
    wall_seconds: float = Field(0.0, alias="wall-seconds")

    def excluded(self) -> dict[str, str]:
        """Every site that did not count, with its reason (failed first, then rejected)."""
        return {**self.failed, **self.rejected}


class PhaseRecord(_Record):
    """A phase: its rounds (one for a broadcast phase) and, for SecAgg+ pretraining, the protocol's name."""

    kind: Literal["train", "broadcast"]
    secure_aggregation: str | None = Field(None, alias="secure-aggregation")
    rounds: list[RoundRecord] = []

    @property
    def last(self) -> RoundRecord | None:
        """The latest round (a broadcast phase's only one), None before the first round finished."""
        return self.rounds[-1] if self.rounds else None


class RunRecord(_Record):
    """The whole run: what results.json holds."""

    schema_version: int = Field(SCHEMA, alias="schema")
    run: str
    status: Literal["running", "completed", "failed"] = "running"
    error: str | None = None
    config: dict[str, Any]
    phases: dict[str, PhaseRecord] = {}
    timing: dict[str, float] = {}  # phase -> wall seconds
    sites: dict[str, int] = {}  # declared site label -> Flower node id
    plots: list[str] = []
    run_dir: str = Field(alias="run-dir")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def save_results(run_dir: Path, results: RunRecord) -> Path:
    """Write ``run_dir/results.json`` atomically (a poller sees the previous or the new file, never half)."""
    path = Path(run_dir) / FILE
    write_json_atomic(path, results.to_json())
    return path


def load_results(path: Path) -> RunRecord:
    """The run record in ``path`` (a results.json or the run directory holding it); a clear error naming the file
    when it is missing, not JSON, of another schema version or not of this layout."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FedstError(f"{path}: no results.json (expected a fedst run directory)") from None
    except (OSError, ValueError) as exc:
        raise FedstError(f"{path}: results.json is unreadable or not JSON ({exc})") from None
    version = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise FedstError(f"{path}: results.json has no integer 'schema' version (expected {SCHEMA})")
    if version > SCHEMA:
        raise FedstError(
            f"{path}: results.json has schema {version}, newer than this fedst reads ({SCHEMA}); upgrade fedst"
        )
    if version != SCHEMA:
        raise FedstError(f"{path}: results.json has schema {version}; this fedst reads schema {SCHEMA}")
    try:
        return RunRecord.model_validate(data)
    except ValidationError as exc:
        raise FedstError(f"{path}: results.json does not match schema {SCHEMA}: {_first_problem(exc)}") from None


def rounds_from_json(rows: list[Any], source: Path) -> list[RoundRecord]:
    """Round records stored elsewhere (a checkpoint's history), validated like results.json."""
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(RoundRecord.model_validate(row))
        except ValidationError as exc:
            raise FedstError(
                f"{source}: round history does not match schema {SCHEMA}: row {i}: {_first_problem(exc)}"
            ) from None
    return records


def rounds_to_json(rounds: list[RoundRecord]) -> list[dict[str, Any]]:
    """Round records as stored in a checkpoint's history (read back by `rounds_from_json`)."""
    return [row.model_dump(mode="json", by_alias=True) for row in rounds]


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    return f"{where}: {error['msg']}"
