"""What we store in etcd values (layout 2): the task record, its node list and assignments,
outcomes, completions, progress, membership and the layout marker.

Every value but the task record is a JSON object (orjson) with a format version ``"v": 2``.
The task record is a JSON header, a newline, then the payload's raw bytes: a payload of up to
1 MiB is neither base64-encoded nor scanned by the JSON parser, and a reader that only needs the
header (``TaskRecord.decode(raw, payload=False)``) never copies it.

A reader meets values it did not write — corrupt JSON, another program's data, a record of
another layout — and must not crash on them: every decoder here raises
:class:`~distributedtask.exceptions.CorruptRecordError` and nothing else, and callers that scan
decide whether to skip (listing, scheduling) or to raise. Records written by a Manager call
carry that call's ``token`` so a retried request can recognise its own earlier write. Pure
functions; thread-safe.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import orjson

from .exceptions import CorruptRecordError, InvalidTaskError
from .keys import BUCKETS, bucket_of
from .model import (
    DEFAULT_POLICY,
    Progress,
    RunPolicy,
    TaskStatus,
    UnitSpec,
    UnitStatus,
    from_epoch_ms,
    to_epoch_ms,
    validate_name,
)

__all__ = [
    "FORMAT_MARKER",
    "FORMAT_VERSION",
    "INLINE_NODES",
    "AttemptRecord",
    "CorruptRecordError",
    "DoneRecord",
    "GroupMark",
    "MemberRecord",
    "NodeList",
    "OutcomeRecord",
    "PoolEntry",
    "RunState",
    "TaskRecord",
    "UnitClaim",
    "UnitDecl",
    "decode_format",
    "decode_progress",
    "encode_progress",
]

INLINE_NODES = 16
"""A run of at most this many nodes carries their names in its record: its add is one key
(and one watch event per Scheduler), and no reader needs another read to know its nodes."""

FORMAT_VERSION = 2
"""The layout this library reads and writes; stored in ``P/format`` and in every value."""

FORMAT_MARKER = orjson.dumps({"layout": FORMAT_VERSION, "buckets": BUCKETS})
"""The exact bytes of ``P/format``: writes compare against them in etcd."""


def decode_format(raw: bytes) -> int | None:
    """The layout number a ``P/format`` value names, or None when it is not a marker at all."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    layout = data.get("layout") if isinstance(data, dict) else None
    return layout if type(layout) is int else None


def _load(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise CorruptRecordError(f"{what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise CorruptRecordError(f"{what} is not a JSON object")
    version = data.get("v")
    if type(version) is not int or version != FORMAT_VERSION:
        if type(version) is int:
            raise CorruptRecordError(f"{what} has format version {version}, not {FORMAT_VERSION}")
        raise CorruptRecordError(f"{what} has no known format version")
    return data


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CorruptRecordError(f"{what}: field {key!r} is missing or has the wrong type")
    return value


def _ms(data: Mapping[str, Any], key: str, what: str) -> datetime:
    try:
        return from_epoch_ms(_get(data, key, int, what))
    except ValueError:
        raise CorruptRecordError(f"{what}: time {key!r} is out of range") from None


def _optional_name(data: Mapping[str, Any], key: str, what: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    try:
        return validate_name(value, key)
    except InvalidTaskError as exc:
        raise CorruptRecordError(f"{what}: {exc}") from None


def _node_names(values: object, what: str) -> frozenset[str]:
    if not isinstance(values, list):
        raise CorruptRecordError(f"{what}: field 'nodes' is missing or has the wrong type")
    try:
        nodes = frozenset(validate_name(v, "node_id") for v in values)
    except InvalidTaskError as exc:
        raise CorruptRecordError(f"{what}: {exc}") from None
    if not nodes:
        raise CorruptRecordError(f"{what}: no nodes")
    return nodes


def _positive_int(data: Mapping[str, Any], key: str, what: str) -> int:
    value = data.get(key)
    if type(value) is not int or not 0 < value < 2**63:  # etcd revisions are int64
        raise CorruptRecordError(f"{what}: bad {key}")
    return value


@dataclass(frozen=True)
class TaskRecord:
    """The stored form of ``P/cluster/tasks/<ns>/<id>``: what a run is, written once.

    ``node_count`` is how many nodes the run has; a run of at most :data:`INLINE_NODES` nodes
    carries their names in ``nodes`` (then there is no ``P/nodes`` or ``P/assign`` key for it),
    a larger one has ``nodes=None`` and its names in ``P/nodes`` and ``P/assign``.
    ``version`` is stored only for a run restored from a snapshot in a terminal state (it keeps
    the version it had); otherwise the version is the record's ``mod_revision``.
    ``unit_count`` is the number of declared units of a unit task (0: a plain task); the
    declaration itself is in ``P/units/decl`` (:class:`UnitDecl`).
    """

    payload: bytes
    started_at: datetime
    node_count: int
    token: str
    version: int | None = None
    policy: RunPolicy = DEFAULT_POLICY
    nodes: frozenset[str] | None = None
    unit_count: int = 0

    def encode(self) -> bytes:
        header: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "startedAt": to_epoch_ms(self.started_at),
            "nodeCount": self.node_count,
            "token": self.token,
        }
        if self.unit_count:
            header["units"] = self.unit_count
        if self.version is not None:
            header["version"] = self.version
        policy = self.policy.to_dict()
        if policy:
            header["policy"] = policy
        if self.nodes is not None:
            header["nodes"] = sorted(self.nodes)
        return orjson.dumps(header) + b"\n" + self.payload

    @classmethod
    def decode(cls, raw: bytes, *, payload: bool = True) -> TaskRecord:
        """Decode a record; with ``payload=False`` the payload is left empty (not copied)."""
        what = "task record"
        end = raw.find(b"\n")
        if end < 0:
            raise CorruptRecordError(f"{what} has no header line")
        data = _load(raw[:end], what)
        version = None if "version" not in data else _positive_int(data, "version", what)
        policy = DEFAULT_POLICY
        if "policy" in data:
            try:
                policy = RunPolicy.from_dict(data["policy"])
            except InvalidTaskError as exc:
                raise CorruptRecordError(f"{what}: {exc}") from None
        nodes = None
        if "nodes" in data:
            nodes = _node_names(data["nodes"], what)
            if len(nodes) != data.get("nodeCount"):
                raise CorruptRecordError(f"{what}: its nodes do not match its node count")
        return cls(
            unit_count=0 if "units" not in data else _positive_int(data, "units", what),
            nodes=nodes,
            policy=policy,
            payload=raw[end + 1 :] if payload else b"",
            started_at=_ms(data, "startedAt", what),
            node_count=_positive_int(data, "nodeCount", what),
            token=_get(data, "token", str, what),
            version=version,
        )

    def version_at(self, mod_revision: int) -> int:
        """The run's version, given the record's etcd ``mod_revision``."""
        return self.version if self.version is not None else mod_revision


@dataclass(frozen=True)
class NodeList:
    """The stored form of ``P/nodes/<ns>/<id>`` (every node of a run) and of
    ``P/assign/<bucket>/<ns>/<id>`` (the nodes of one bucket)."""

    nodes: frozenset[str]

    def encode(self) -> bytes:
        return orjson.dumps({"v": FORMAT_VERSION, "nodes": sorted(self.nodes)})

    @classmethod
    def decode(cls, raw: bytes) -> NodeList:
        what = "node list"
        return cls(_node_names(_load(raw, what).get("nodes"), what))

    @staticmethod
    def by_bucket(nodes: Iterable[str]) -> dict[int, NodeList]:
        """Split ``nodes`` by assignment bucket."""
        out: dict[int, set[str]] = {}
        for node in nodes:
            out.setdefault(bucket_of(node), set()).add(node)
        return {bucket: NodeList(frozenset(names)) for bucket, names in out.items()}


@dataclass(frozen=True)
class OutcomeRecord:
    """The stored form of ``P/cluster/outcomes/<ns>/<id>``: how the current run ended.

    ``node`` is the node whose failure ended it (FAILED by a node only); ``error`` its message,
    verbatim.
    """

    status: TaskStatus
    finished_at: datetime
    token: str
    error: str | None = None
    node: str | None = None
    unit: str | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "status": self.status.value,
            "finishedAt": to_epoch_ms(self.finished_at),
            "token": self.token,
        }
        if self.error is not None:
            body["error"] = self.error
        if self.node is not None:
            body["node"] = self.node
        if self.unit is not None:
            body["unit"] = self.unit
        return orjson.dumps(body)

    @classmethod
    def decode(cls, raw: bytes) -> OutcomeRecord:
        what = "outcome record"
        data = _load(raw, what)
        try:
            status = TaskStatus(_get(data, "status", str, what))
        except ValueError:
            raise CorruptRecordError(f"{what}: unknown status") from None
        if not status.terminal:
            raise CorruptRecordError(f"{what}: status {status.value} is not terminal")
        error = data.get("error")
        if error is not None and not isinstance(error, str):
            raise CorruptRecordError(f"{what}: bad error")
        return cls(
            status=status,
            finished_at=_ms(data, "finishedAt", what),
            token=_get(data, "token", str, what),
            error=error,
            node=_optional_name(data, "node", what),
            unit=_optional_name(data, "unit", what),
        )


@dataclass(frozen=True)
class RunState:
    """The stored form of ``P/cluster/states/<ns>/<id>``: whether the run is paused.

    Absent until the first pause. ``paused_since`` is set while PAUSED; ``paused_ms`` is the
    time spent paused before (what the deadline does not count).
    """

    paused_since: datetime | None
    paused_ms: int
    token: str

    def paused_for(self, now: datetime) -> int:
        """Milliseconds spent paused up to ``now``, the current pause included."""
        extra = (
            0 if self.paused_since is None else to_epoch_ms(now) - to_epoch_ms(self.paused_since)
        )
        return self.paused_ms + max(0, extra)

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "pausedMs": self.paused_ms,
            "token": self.token,
        }
        if self.paused_since is not None:
            body["pausedSince"] = to_epoch_ms(self.paused_since)
        return orjson.dumps(body)

    @classmethod
    def decode(cls, raw: bytes) -> RunState:
        what = "run state"
        data = _load(raw, what)
        paused_ms = data.get("pausedMs")
        if type(paused_ms) is not int or paused_ms < 0:
            raise CorruptRecordError(f"{what}: bad pausedMs")
        return cls(
            paused_since=None if "pausedSince" not in data else _ms(data, "pausedSince", what),
            paused_ms=paused_ms,
            token=_get(data, "token", str, what),
        )


@dataclass(frozen=True)
class AttemptRecord:
    """The stored form of ``P/attempts/<ns>/<id>/<node>``: a node's latest failed attempt.

    Every failed attempt rewrites the key, so its etcd ``version`` (the number of writes since
    it was created) *is* the number of failed attempts: a transaction compares it to decide
    between a retry and the final failure without reading it first.
    """

    error: str
    at: datetime
    token: str

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": FORMAT_VERSION,
                "error": self.error,
                "at": to_epoch_ms(self.at),
                "token": self.token,
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> AttemptRecord:
        what = "attempt record"
        data = _load(raw, what)
        return cls(
            error=_get(data, "error", str, what),
            at=_ms(data, "at", what),
            token=_get(data, "token", str, what),
        )


@dataclass(frozen=True)
class DoneRecord:
    """The stored form of ``P/done/<ns>/<id>/<node>``: the node completed run ``version``."""

    version: int
    at: datetime
    token: str

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": FORMAT_VERSION,
                "version": self.version,
                "at": to_epoch_ms(self.at),
                "token": self.token,
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> DoneRecord:
        what = "completion record"
        data = _load(raw, what)
        return cls(
            version=_positive_int(data, "version", what),
            at=_ms(data, "at", what),
            token=_get(data, "token", str, what),
        )


def encode_progress(progress: Progress) -> bytes:
    """The stored form of ``P/progress/<ns>/<id>/<version>/<node>``."""
    return orjson.dumps(
        {
            "v": FORMAT_VERSION,
            "fraction": progress.fraction,
            "message": progress.message,
            "at": to_epoch_ms(progress.updated_at),
        }
    )


def decode_progress(raw: bytes) -> Progress:
    what = "progress record"
    data = _load(raw, what)
    fraction = _get(data, "fraction", (int, float), what)
    if not 0.0 <= fraction <= 1.0:
        raise CorruptRecordError(f"{what}: fraction {fraction!r} is not in [0, 1]")
    return Progress(
        fraction=float(fraction),
        message=_get(data, "message", str, what),
        updated_at=_ms(data, "at", what),
    )


@dataclass(frozen=True)
class MemberRecord:
    """The stored form of ``P/cluster/members/<node>``: a live Scheduler, bound to its lease."""

    node_id: str
    namespaces: frozenset[str]
    started_at: datetime

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": FORMAT_VERSION,
                "node": self.node_id,
                "namespaces": sorted(self.namespaces),
                "startedAt": to_epoch_ms(self.started_at),
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> MemberRecord:
        what = "member record"
        data = _load(raw, what)
        namespaces = _get(data, "namespaces", list, what)
        try:
            node = validate_name(_get(data, "node", str, what), "node_id")
            for namespace in namespaces:
                validate_name(namespace, "namespace")
        except InvalidTaskError as exc:
            raise CorruptRecordError(f"{what}: {exc}") from None
        return cls(
            node_id=node,
            namespaces=frozenset(namespaces),
            started_at=_ms(data, "startedAt", what),
        )


# ---- units ----------------------------------------------------------------------------------

MAX_DECL_BYTES = 64 * 1024 * 1024
"""The most a declaration may inflate to when read (a guard against a hostile value)."""


@dataclass(frozen=True)
class UnitDecl:
    """The stored form of ``P/units/decl/<ns>/<id>``: the declared units of a unit task, in
    order, as zlib-compressed JSON (ids of a task are alike: shard names compress well).

    The order is the order of the declaration; units are handed out in it: those without
    affinity through the shared ticket (:attr:`free`), those with affinity to a node through
    that node's ticket (:meth:`of_node`).
    """

    units: tuple[UnitSpec, ...]
    by_id: dict[str, UnitSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_id", {unit.id: unit for unit in self.units})

    def encode(self) -> bytes:
        rows = [
            [u.id, u.group, u.node] if u.node is not None else [u.id, u.group] for u in self.units
        ]
        return zlib.compress(orjson.dumps({"v": FORMAT_VERSION, "units": rows}), 6)

    @classmethod
    def decode(cls, raw: bytes) -> UnitDecl:
        what = "unit declaration"
        try:
            inflater = zlib.decompressobj()
            body = inflater.decompress(raw, MAX_DECL_BYTES)
            if inflater.unconsumed_tail:
                raise CorruptRecordError(f"{what} inflates to more than {MAX_DECL_BYTES} bytes")
        except zlib.error:
            raise CorruptRecordError(f"{what} is not zlib data") from None
        rows = _get(_load(body, what), "units", list, what)
        try:
            units = []
            for row in rows:
                if not isinstance(row, list) or len(row) not in (2, 3):
                    raise CorruptRecordError(f"{what}: a unit is not [id, group, node?]")
                units.append(UnitSpec(*row))
        except (InvalidTaskError, TypeError) as exc:
            raise CorruptRecordError(f"{what}: {exc}") from None
        decl = cls(tuple(units))
        if len(decl.by_id) != len(units):
            raise CorruptRecordError(f"{what}: a unit id appears twice")
        return decl

    @cached_property
    def free(self) -> tuple[UnitSpec, ...]:
        """The units without affinity, in order."""
        return tuple(unit for unit in self.units if unit.node is None)

    @cached_property
    def _by_node(self) -> dict[str, tuple[UnitSpec, ...]]:
        out: dict[str, list[UnitSpec]] = {}
        for unit in self.units:
            if unit.node is not None:
                out.setdefault(unit.node, []).append(unit)
        return {node: tuple(units) for node, units in out.items()}

    def of_node(self, node_id: str) -> tuple[UnitSpec, ...]:
        """The units with affinity to ``node_id``, in order."""
        return self._by_node.get(node_id, ())

    @cached_property
    def group_sizes(self) -> dict[str, int]:
        """How many units each group has."""
        out: dict[str, int] = {}
        for unit in self.units:
            out[unit.group] = out.get(unit.group, 0) + 1
        return out


@dataclass(frozen=True)
class UnitClaim:
    """The stored form of ``P/units/run/<ns>/<id>/claim/<unit>``: where a unit of run
    ``version`` stands. Absent: PENDING, never claimed. ``node`` is the current (or last)
    claimant, ``attempts`` the failed attempts so far, ``error`` the latest failure message.
    """

    version: int
    status: UnitStatus
    node: str | None
    attempts: int
    token: str
    error: str | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "version": self.version,
            "status": self.status.value,
            "attempts": self.attempts,
            "token": self.token,
        }
        if self.node is not None:
            body["node"] = self.node
        if self.error is not None:
            body["error"] = self.error
        return orjson.dumps(body)

    @classmethod
    def decode(cls, raw: bytes) -> UnitClaim:
        what = "unit claim"
        data = _load(raw, what)
        try:
            status = UnitStatus(_get(data, "status", str, what))
        except ValueError:
            raise CorruptRecordError(f"{what}: unknown status") from None
        attempts = data.get("attempts")
        if type(attempts) is not int or attempts < 0:
            raise CorruptRecordError(f"{what}: bad attempts")
        error = data.get("error")
        if error is not None and not isinstance(error, str):
            raise CorruptRecordError(f"{what}: bad error")
        return cls(
            version=_positive_int(data, "version", what),
            status=status,
            node=_optional_name(data, "node", what),
            attempts=attempts,
            token=_get(data, "token", str, what),
            error=error,
        )


@dataclass(frozen=True)
class PoolEntry:
    """The stored form of ``P/cluster/pool/<ns>/<id>/<unit>``: a unit of run ``version`` given
    back (a failed attempt with attempts left, a lost claimant's unit, a lost hand-out),
    claimable by ``node`` (its affinity) or any node of the run, after ``delay_ms``
    (the retry backoff; ``not_before`` is the same moment on the writer's clock), with its
    failed ``attempts`` so far and the latest one's ``error``.

    The entry is written in the same transaction as the unit's PENDING claim, so its
    ``mod_revision`` is the claim's: a claim from the pool compares it.
    """

    version: int
    delay_ms: int
    not_before: datetime
    node: str | None = None
    attempts: int = 0
    error: str | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "version": self.version,
            "delayMs": self.delay_ms,
            "notBefore": to_epoch_ms(self.not_before),
            "attempts": self.attempts,
        }
        if self.error is not None:
            body["error"] = self.error
        if self.node is not None:
            body["node"] = self.node
        return orjson.dumps(body)

    @classmethod
    def decode(cls, raw: bytes) -> PoolEntry:
        what = "pool entry"
        data = _load(raw, what)
        delay, attempts = data.get("delayMs"), data.get("attempts")
        if type(delay) is not int or delay < 0:
            raise CorruptRecordError(f"{what}: bad delayMs")
        if type(attempts) is not int or attempts < 0:
            raise CorruptRecordError(f"{what}: bad attempts")
        error = data.get("error")
        if error is not None and not isinstance(error, str):
            raise CorruptRecordError(f"{what}: bad error")
        return cls(
            error=error,
            version=_positive_int(data, "version", what),
            delay_ms=delay,
            not_before=_ms(data, "notBefore", what),
            node=_optional_name(data, "node", what),
            attempts=attempts,
        )


@dataclass(frozen=True)
class GroupMark:
    """The stored form of ``P/cluster/groups/<ns>/<id>/<=group>`` (every unit of the group
    of run ``version`` is COMPLETED) and of a node's acknowledgement of it
    (``P/units/run/<ns>/<id>/acks/<node>/<=group>``)."""

    version: int
    at: datetime

    def encode(self) -> bytes:
        return orjson.dumps(
            {"v": FORMAT_VERSION, "version": self.version, "at": to_epoch_ms(self.at)}
        )

    @classmethod
    def decode(cls, raw: bytes) -> GroupMark:
        what = "group mark"
        data = _load(raw, what)
        return cls(version=_positive_int(data, "version", what), at=_ms(data, "at", what))


def encode_unit_progress(progress: Progress, node_id: str) -> bytes:
    """The stored form of ``P/units/run/<ns>/<id>/progress/<unit>``."""
    return orjson.dumps(
        {
            "v": FORMAT_VERSION,
            "fraction": progress.fraction,
            "message": progress.message,
            "at": to_epoch_ms(progress.updated_at),
            "node": node_id,
        }
    )
