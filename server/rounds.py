"""Round bookkeeping, once: sort a round's replies, record the round, decide whether the run goes on.

Every path that collects replies (the message-API strategies for pretraining and federated adaptation, the
broadcast phases, the SecAgg+ pretraining) feeds a `RoundTally`: accepted sites with their scalar metrics,
failed sites (error reply, privacy contract) and rejected updates with the reason. `RoundTally.close` counts
every site that was sent a message and never answered as failed (``no reply``), hands the round record to the
phase (so results.json shows the round that stopped the run) and then applies the policy: fewer than
``min-sites`` accepted sites or more than ``failure-tolerance`` failed-or-rejected sites stop the run with an
error naming every excluded site and why.

`wait_for_sites` is the one wait for connected sites, with a deadline: each training round and each broadcast
phase samples the nodes connected at that moment (never the count a phase started with), so a site that died
for good costs a round at most instead of hanging the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.serverapp import Grid
from flwr.supercore import log

from server.results import RoundRecord
from shared.config import RunConfig
from shared.errors import FedstError

NO_REPLY = "no reply before round-timeout"
GONE = "not connected any more (left the federation)"
POLL_SECONDS = 1.0


def wait_for_sites(grid: Grid, min_sites: int, timeout: float, what: str) -> list[int]:
    """The nodes connected now (sorted), as soon as at least ``min_sites`` are; FedstError after ``timeout`` s.

    Flower's own sampling (``sample_nodes`` in its strategies) waits for its minimum with no deadline. A node
    that died is still listed until its heartbeat expires (Flower: 30 s interval, patience 2); the messages sent
    to it come back as Flower's "Node Unavailable" error replies, i.e. a failed site in the round's tally.
    """
    deadline = time.monotonic() + timeout
    logged: tuple[int, float] | None = None
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_sites:
            return nodes
        now = time.monotonic()
        if now >= deadline:
            raise FedstError(
                f"{what}: only {len(nodes)} site(s) connected after {timeout:.0f} s (min-sites {min_sites}); "
                "the run stops (raise round-timeout to wait longer for sites to come back)"
            )
        if logged is None or logged[0] != len(nodes) or now - logged[1] >= 30:
            log(INFO, "%s: waiting for sites: %d connected, min-sites %d", what, len(nodes), min_sites)
            logged = (len(nodes), now)
        time.sleep(min(POLL_SECONDS, max(deadline - now, 0.0)))


@dataclass(frozen=True)
class RoundPolicy:
    """When a round counts: at least ``min_sites`` accepted, at most ``failure_tolerance`` excluded."""

    min_sites: int
    failure_tolerance: int

    @classmethod
    def from_run(cls, run: RunConfig) -> RoundPolicy:
        return cls(min_sites=run.min_sites, failure_tolerance=run.failure_tolerance)

    def problem(self, record: RoundRecord) -> str | None:
        """Why the round fails the policy, or None when the run may go on."""
        excluded = record.excluded()
        if len(record.sites) >= self.min_sites and len(excluded) <= self.failure_tolerance:
            return None
        return (
            f"{len(record.sites)} valid replies (min-sites {self.min_sites}), {len(excluded)} sites failed or "
            f"rejected (failure-tolerance {self.failure_tolerance})"
            + (": " + "; ".join(f"{site}: {why}" for site, why in excluded.items()) if excluded else "")
        )


class RoundTally:
    """The replies of one round of ``what`` (e.g. ``pretrain round 3``), sorted by Flower node id as they are read.

    ``sent`` are the nodes the round's messages went to; one that is neither accepted, failed nor rejected by
    `close` is failed with ``no_reply``. Sites are labelled (``label``, server/sites.py) only in `close`, after
    every reply of the round had the chance to declare its name. ``started`` (``time.perf_counter()`` when the
    round's messages went out; default now) times the round.
    """

    def __init__(
        self,
        what: str,
        number: int,
        sent: Iterable[int],
        label: Callable[[int], str],
        *,
        no_reply: str = NO_REPLY,
        started: float | None = None,
    ):
        self.what = what
        self.number = number
        self.sent = list(sent)
        self.label = label
        self.no_reply = no_reply
        self.sites: dict[int, dict[str, float]] = {}
        self.failed: dict[int, str] = {}
        self.rejected: dict[int, str] = {}
        self.started = time.perf_counter() if started is None else started

    def accept(self, node: int, metrics: Mapping[str, float]) -> None:
        self.sites[node] = {k: float(v) for k, v in metrics.items()}

    def fail(self, node: int, why: str) -> None:
        self.failed[node] = why

    def reject(self, node: int, why: str) -> None:
        self.rejected[node] = why

    def close(self, policy: RoundPolicy, record: Callable[[RoundRecord], None]) -> RoundRecord:
        """The round record, passed to ``record`` first; raises FedstError when ``policy`` stops the run."""
        heard = set(self.sites) | set(self.failed) | set(self.rejected)
        for node in self.sent:
            if node not in heard:
                self.failed[node] = self.no_reply
        label = self.label
        for node, why in self.rejected.items():
            log(WARNING, "%s: rejected the update of %s (node %d): %s", self.what, label(node), node, why)
        for node, why in self.failed.items():
            log(WARNING, "%s: %s failed: %s", self.what, label(node), why)
        row = RoundRecord(
            round=self.number,
            sites={label(n): m for n, m in sorted(self.sites.items())},
            failed={label(n): why for n, why in sorted(self.failed.items())},
            rejected={label(n): why for n, why in sorted(self.rejected.items())},
            wall_seconds=time.perf_counter() - self.started,
        )
        record(row)
        if (problem := policy.problem(row)) is not None:
            raise FedstError(f"{self.what}: {problem}")
        return row


PER_SITE_ONLY = frozenset({"epsilon", "delta"})
"""Metrics that are never averaged across sites: a mean epsilon is not a privacy statement about any site."""


def weighted(sites: Mapping[str, Mapping[str, float]], weight_key: str = "num-examples") -> dict[str, float]:
    """Weighted mean of every metric across sites (by ``weight_key``), privacy numbers excepted (per site only);
    per-site values stay in the round record."""
    total = sum(m.get(weight_key, 1.0) for m in sites.values())
    keys = sorted({k for m in sites.values() for k in m if k != weight_key and k not in PER_SITE_ONLY})
    out = {}
    for key in keys:
        rows = [(m[key], m.get(weight_key, 1.0)) for m in sites.values() if key in m]
        if rows and total > 0:
            out[key] = float(sum(v * w for v, w in rows) / sum(w for _, w in rows))
    return out


FLOWER_ERRORS = {  # flwr.common.constant.ErrorCode: failures of Flower's own machinery, not of the site's code
    1: "clientapp-load-failed",
    3: "message-unavailable",
    4: "reply-unavailable",
    5: "node-unavailable",
    6: "mod-failed",
    7: "invalid-app",
    8: "clientapp-crashed",
}


def failure_reason(error) -> str:
    """What the server records of an error reply: the contract's category (a fedst site's failure) or the name of
    Flower's own error code (a dead node, a crashed ClientApp), and the code; never the reason's free text (a path,
    a spot id or a gene name would reach results.json and ``flwr log``)."""
    from shared.contract import site_error_category

    category = FLOWER_ERRORS.get(int(error.code)) or site_error_category(error.reason)
    return f"error: {category} (code {error.code})"
