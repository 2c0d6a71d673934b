"""The audit log: who did what, from where, as a hash chain.

Each record carries the SHA-256 of the record before it and its own, over every field, so
`verify` finds a record edited, deleted or added out of order. Records are appended in
the same transaction as the change they record (the stores do that, given an `Entry`).
Retention removes whole records from the start of the chain and appends a `pruned` record
naming the last one removed, which is where the chain then starts.

A chain anyone with write access to the store could recompute, so it is evident, not
proof, against such a person: the service logs the chain's head at start and stop, and a
copy of those lines kept elsewhere pins what the chain was.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

GENESIS = "0" * 64  # the previous hash of the first record
SERVICE = "service"  # the actor and `via` of what the service does by itself


class AuditAction(StrEnum):
    STARTED = "started"
    RERUN = "rerun"
    CANCELLED = "cancelled"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    REFUSED = "refused"
    TOKEN_ISSUED = "token_issued"
    TOKEN_REVOKED = "token_revoked"
    SCHEDULE_PAUSED = "schedule_paused"
    SCHEDULE_RESUMED = "schedule_resumed"
    SERVICE_STARTED = "service_started"
    SERVICE_STOPPED = "service_stopped"
    PRUNED = "pruned"


@dataclass(frozen=True, slots=True)
class Entry:
    """What to record; the store gives it its place in the chain."""

    action: AuditAction
    actor: str  # a Matrix user id, "admin" (the API's token), "service"
    via: str  # room, api, cli, mcp, service
    subject: str | None = None  # j12, b3
    target: str | None = None  # the target (a batch's: space-separated)
    room_id: str | None = None
    event_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def about(self, subject: str) -> Entry:
        return replace(self, subject=subject)


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    at: float
    action: str
    actor: str
    via: str
    subject: str | None
    target: str | None
    room_id: str | None
    event_id: str | None
    detail: str  # canonical JSON
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at, "action": self.action, "actor": self.actor,
                "via": self.via, "subject": self.subject, "target": self.target,
                "roomId": self.room_id, "eventId": self.event_id,
                "detail": json.loads(self.detail), "prevHash": self.prev_hash,
                "hash": self.hash}


# The stores' column order for a record.
COLUMNS = ("seq, at, action, actor, via, subject, target, room_id, event_id, detail, "
           "prev_hash, hash")


def canonical(detail: Mapping[str, Any]) -> str:
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def digest(seq: int, at: float, entry_fields: tuple[Any, ...], detail: str,
           prev_hash: str) -> str:
    body = json.dumps([seq, at, *entry_fields, detail, prev_hash], separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def chained(entry: Entry, seq: int, at: float, prev_hash: str) -> Record:
    """`entry` as the record after the one whose hash is `prev_hash`."""
    detail = canonical(entry.detail)
    fields = (str(entry.action), entry.actor, entry.via, entry.subject, entry.target,
              entry.room_id, entry.event_id)
    return Record(seq, at, *fields, detail, prev_hash,
                  digest(seq, at, fields, detail, prev_hash))


def record_of(row: tuple[Any, ...]) -> Record:
    return Record(int(row[0]), float(row[1]), *row[2:])


def values(record: Record) -> tuple[Any, ...]:
    """The row of COLUMNS for `record`."""
    return (record.seq, record.at, record.action, record.actor, record.via, record.subject,
            record.target, record.room_id, record.event_id, record.detail, record.prev_hash,
            record.hash)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which records to read: after a seq or since a time, by whom, what, on which target;
    at most `limit`: the first of those after `after` when it is given (a follower asking
    again with the last seq it saw misses none), else the newest."""

    after: int | None = None
    since: float | None = None
    user: str | None = None
    action: str | None = None
    target: str | None = None
    limit: int = 100

    @property
    def forward(self) -> bool:
        """Whether the first `limit` records after `after` are asked for, not the newest."""
        return self.after is not None


def audit_filter(query: AuditQuery, placeholder: str) -> tuple[str, list[Any]]:
    """The WHERE clause (and its parameters) of `query`, in the driver's placeholder."""
    clauses, params = [], []
    for clause, value in (("seq > {p}", query.after), ("at >= {p}", query.since),
                          ("actor = {p}", query.user), ("action = {p}", query.action),
                          ("(' ' || target || ' ') LIKE {p}",
                           None if query.target is None else f"% {query.target} %")):
        if value is not None:
            clauses.append(clause.format(p=placeholder))
            params.append(value)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def pruned(last: Record, count: int) -> Entry:
    """The record retention appends after removing `count` records up to `last`."""
    return Entry(AuditAction.PRUNED, SERVICE, SERVICE,
                 detail={"through": last.seq, "hash": last.hash, "removed": count})


@dataclass(slots=True)
class Verdict:
    records: int = 0
    first: int | None = None
    last: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(records: Iterable[Record], head: tuple[int, str]) -> Verdict:
    """Check a chain read in `seq` order against the head the store keeps (seq, hash of
    its last record): every hash, every link, no gap, nothing cut off at either end."""
    verdict = Verdict()
    previous: Record | None = None
    first_prev = GENESIS
    anchors: dict[int, str] = {}  # seq -> hash, as pruned records name them
    for record in records:
        verdict.records += 1
        if previous is None:
            verdict.first, first_prev = record.seq, record.prev_hash
            expected = GENESIS if record.seq == 1 else None
        elif record.seq != previous.seq + 1:
            expected = None  # its link leads into the gap, said once here
            verdict.problems.append(f"records {previous.seq + 1}-{record.seq - 1} are "
                                    "missing")
        else:
            expected = previous.hash
        if expected is not None and record.prev_hash != expected:
            verdict.problems.append(f"record {record.seq} does not follow record "
                                    f"{record.seq - 1} (its previous hash differs)")
        fields = (record.action, record.actor, record.via, record.subject, record.target,
                  record.room_id, record.event_id)
        if digest(record.seq, record.at, fields, record.detail, record.prev_hash) \
                != record.hash:
            verdict.problems.append(f"record {record.seq} was changed (its hash differs)")
        if record.action == AuditAction.PRUNED:
            detail = json.loads(record.detail)
            anchors[int(detail["through"])] = str(detail["hash"])
        previous = record
    if verdict.first not in (None, 1) and anchors.get(verdict.first - 1) != first_prev:
        verdict.problems.append(f"records before {verdict.first} were removed without a "
                                "pruned record saying so")
    verdict.last = previous.seq if previous is not None else None
    seq, hash_ = head
    if previous is None:
        if seq != 0:
            verdict.problems.append(f"the chain ends at record {seq}, but no record is left")
    elif (previous.seq, previous.hash) != (seq, hash_):
        verdict.problems.append(f"the chain should end at record {seq}; it ends at "
                                f"{previous.seq}")
    return verdict

