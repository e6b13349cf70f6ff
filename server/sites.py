"""Which site a Flower node is, and what a site's reply may contain (the server side of the privacy contract).

Flower node ids are meaningless to a consortium lead, so every reply carries the site's declared name in one
ConfigRecord ``site`` = ``{"name": ...}`` (node config ``site`` or the SITE.toml's ``site``, validated against
``shared.config.SITE_NAME``). Reports label a site by that name; a node that never replied keeps ``node-<id>``
(or the name it declared in an earlier phase); two nodes declaring the same name are told apart by node id.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from shared.config import site_name_problem
from shared.contract import metric_key_problems

SITE_RECORD = "site"


def site_label(node_id: int) -> str:
    """The fallback label of a node that has not (validly) declared a name."""
    return f"node-{node_id}"


def answering_node(reply: Message, sent: Iterable[Message]) -> int:
    """The node a reply answers for: its sender, except for the error replies the SuperLink writes itself in a
    node's place ("Node Unavailable" once the node's heartbeat expired, "Reply Message Unavailable"). Those come
    from ``SUPERLINK_NODE_ID`` and answer for the node the message they reply to went to (``sent``, whose message
    ids Flower set when it pushed them); else one dead site would count twice, as an error of node 1 and as a
    node that never replied."""
    node = reply.metadata.src_node_id
    if node != SUPERLINK_NODE_ID:
        return node
    for msg in sent:
        if msg.metadata.message_id and msg.metadata.message_id == reply.metadata.reply_to_message_id:
            return msg.metadata.dst_node_id
    return node


def declared_name(content: RecordDict) -> tuple[str | None, str | None]:
    """(name, problem) from a reply's ``site`` ConfigRecord; (None, None) when it has none."""
    record = content.config_records.get(SITE_RECORD)
    if record is None:
        return None, None
    if set(record.keys()) != {"name"}:
        return None, f"ConfigRecord 'site' must hold exactly one key 'name', got {sorted(record.keys())}"
    name = record["name"]
    problem = site_name_problem(name)
    return (None, f"declared site {problem}") if problem else (str(name), None)


def contract_problems(
    content: RecordDict,
    *,
    arrays: int,
    phase: str | None = None,
    extra_configs: frozenset[str] = frozenset(),
    metric_records: int = 1,
) -> list[str]:
    """Why a reply breaks the privacy contract: model tensors (``arrays`` ArrayRecords, names checked by the
    caller), ``metric_records`` MetricRecords of scalar numbers whose keys the ``phase`` declares
    (shared/contract.py; every key when ``phase`` is None), and no ConfigRecord but ``site`` (plus
    ``extra_configs``, e.g. the SecAgg+ protocol's own)."""
    problems = []
    if len(content.array_records) != arrays:
        problems.append(f"expected {arrays} ArrayRecord(s), got {len(content.array_records)}")
    if len(content.metric_records) != metric_records:
        problems.append(f"expected {metric_records} MetricRecord(s), got {len(content.metric_records)}")
    for name, record in content.metric_records.items():
        bad = [k for k, v in record.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            problems.append(f"MetricRecord {name!r}: {len(bad)} values are not scalar numbers")
        undeclared = metric_key_problems(phase, list(record.keys())) if phase is not None else []
        if undeclared:  # counted, not quoted: an undeclared key may be what must not reach results.json
            problems.append(f"MetricRecord {name!r}: {len(undeclared)} keys the {phase} phase does not declare")
    unexpected = sorted(set(content.config_records.keys()) - {SITE_RECORD, *extra_configs})
    if unexpected:
        problems.append(f"unexpected ConfigRecord(s) {unexpected}")
    _, problem = declared_name(content)
    if problem:
        problems.append(problem)
    return problems


class SiteNames:
    """Node id -> declared site name, learned from replies over the whole run (all phases)."""

    def __init__(self) -> None:
        self.declared: dict[int, str] = {}

    def learn(self, node_id: int, content: RecordDict) -> None:
        name, problem = declared_name(content)
        if name is not None and problem is None:
            self.declared[node_id] = name

    def label(self, node_id: int) -> str:
        name = self.declared.get(node_id)
        if name is None:
            return site_label(node_id)
        if any(other != node_id and declared == name for other, declared in self.declared.items()):
            return f"{name}@{site_label(node_id)}"  # two nodes declared the same name
        return name

    def table(self) -> dict[str, int]:
        """Label -> node id for every node that declared a name (written to results.json)."""
        return {self.label(node): node for node in sorted(self.declared)}
