"""What we store in etcd values: the task record, per-node run outcomes, progress, membership.

Every value is a JSON object (orjson) with a format version ``"v": 1``. A reader meets values it
did not write — corrupt JSON, another program's data, a record written by a future version of
this library — and must not crash on them: every decoder here raises
:class:`CorruptRecordError` (a :class:`~distributedtask.exceptions.DistributedTaskError`) and
nothing else, and callers that scan decide whether to skip (listing, scheduling) or to raise.

A run is stored as three kinds of value: the task record (what the run is; written once, never
rewritten while the run exists, so its etcd ``mod_revision`` *is* the version), one run record
per assigned node (pending, completed or failed), and, once the run has ended, its outcome
record (status, finish time, error). Records written by a Manager call carry that call's
``token`` so a retried request can recognise its own earlier write. Pure functions;
thread-safe.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from .exceptions import DistributedTaskError, InvalidTaskError
from .model import Progress, Task, TaskStatus, from_epoch_ms, to_epoch_ms, validate_name

__all__ = [
    "FORMAT_VERSION",
    "CorruptRecordError",
    "MemberRecord",
    "OutcomeRecord",
    "RunRecord",
    "TaskRecord",
    "run_completed",
]

FORMAT_VERSION = 1


class CorruptRecordError(DistributedTaskError):
    """A value under our prefix that we cannot read: corrupt, foreign, or from a newer format."""

    def __init__(self, message: str, key: bytes | None = None) -> None:
        super().__init__(message if key is None else f"{message} (key {key!r})")
        self.key = key


def _load(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise CorruptRecordError(f"{what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise CorruptRecordError(f"{what} is not a JSON object")
    version = data.get("v")
    if type(version) is not int or version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise CorruptRecordError(f"{what} has format version {version}, newer than ours")
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


def _names(values: object, what: str) -> frozenset[str]:
    if not isinstance(values, list):
        raise CorruptRecordError(f"{what}: node list is not a list")
    try:
        return frozenset(validate_name(v, "node_id") for v in values)
    except InvalidTaskError as exc:
        raise CorruptRecordError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class TaskRecord:
    """The stored form of ``P/tasks/<ns>/<id>``: what a run is, written once when it is added.

    ``version`` is stored only for a run restored from a snapshot in a terminal state (it keeps
    the version it had); otherwise the version is the record's ``mod_revision``.
    """

    payload: bytes
    started_at: datetime
    nodes: frozenset[str]
    token: str
    version: int | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "startedAt": to_epoch_ms(self.started_at),
            "nodes": sorted(self.nodes),
            "token": self.token,
        }
        if self.version is not None:
            body["version"] = self.version
        return orjson.dumps(body)

    @classmethod
    def decode(cls, raw: bytes) -> TaskRecord:
        what = "task record"
        data = _load(raw, what)
        try:
            payload = base64.b64decode(_get(data, "payload", str, what), validate=True)
        except (ValueError, binascii.Error):
            raise CorruptRecordError(f"{what}: payload is not base64") from None
        version = data.get("version")
        if version is not None and (
            not isinstance(version, int) or isinstance(version, bool) or version <= 0
        ):
            raise CorruptRecordError(f"{what}: bad version")
        nodes = _names(data.get("nodes"), what)
        if not nodes:
            raise CorruptRecordError(f"{what}: no nodes")
        return cls(
            payload=payload,
            started_at=_ms(data, "startedAt", what),
            nodes=nodes,
            token=_get(data, "token", str, what),
            version=version,
        )

    def version_at(self, mod_revision: int) -> int:
        """The run's version, given the record's etcd ``mod_revision``."""
        return self.version if self.version is not None else mod_revision

    def to_task(
        self,
        namespace: str,
        task_id: str,
        mod_revision: int,
        finished_nodes: Iterable[str],
        outcome: OutcomeRecord | None,
    ) -> Task:
        return Task(
            namespace=namespace,
            id=task_id,
            version=self.version_at(mod_revision),
            payload=self.payload,
            status=TaskStatus.STARTED if outcome is None else outcome.status,
            started_at=self.started_at,
            finished_at=None if outcome is None else outcome.finished_at,
            error=None if outcome is None else outcome.error,
            nodes=self.nodes,
            finished_nodes=frozenset(finished_nodes) & self.nodes,
        )


@dataclass(frozen=True)
class OutcomeRecord:
    """The stored form of ``P/outcomes/<ns>/<id>``: how the current run ended; ``node`` is the
    node whose failure ended it (FAILED only)."""

    status: TaskStatus
    finished_at: datetime
    token: str
    error: str | None = None
    node: str | None = None

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
        node = data.get("node")
        if node is not None:
            try:
                validate_name(node, "node_id")
            except InvalidTaskError as exc:
                raise CorruptRecordError(f"{what}: {exc}") from None
        return cls(
            status=status,
            finished_at=_ms(data, "finishedAt", what),
            token=_get(data, "token", str, what),
            error=error,
            node=node,
        )


PENDING = "pending"
COMPLETED = "completed"


@dataclass(frozen=True)
class RunRecord:
    """The stored form of ``P/runs/<ns>/<id>/<node>``: one assigned node's part in the run.

    Written PENDING with the task record (in the same transaction, so its ``mod_revision`` is
    the run's version) and rewritten COMPLETED by the node; a failure does not touch it (the
    outcome names the failing node).
    """

    outcome: str  # PENDING or COMPLETED
    at: datetime
    token: str

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "outcome": self.outcome,
            "at": to_epoch_ms(self.at),
            "token": self.token,
        }
        return orjson.dumps(body)

    @classmethod
    def decode(cls, raw: bytes) -> RunRecord:
        what = "run record"
        data = _load(raw, what)
        outcome = _get(data, "outcome", str, what)
        if outcome not in (PENDING, COMPLETED):
            raise CorruptRecordError(f"{what}: unknown outcome {outcome!r}")
        return cls(outcome=outcome, at=_ms(data, "at", what), token=_get(data, "token", str, what))


def run_completed(raw: bytes) -> bool:
    """Whether a run key's value says COMPLETED: what a listing needs of it, read without
    building a :class:`RunRecord`. Raises :class:`CorruptRecordError` like its decoder."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise CorruptRecordError("run record is not valid JSON") from None
    if not isinstance(data, dict) or type(data.get("v")) is not int or data["v"] != FORMAT_VERSION:
        return RunRecord.decode(raw).outcome == COMPLETED  # says precisely what is wrong
    outcome = data.get("outcome")
    if outcome == COMPLETED:
        return True
    if outcome == PENDING:
        return False
    raise CorruptRecordError(f"run record: unknown outcome {outcome!r}")


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
    """The stored form of ``P/members/<node>``: a live Scheduler, bound to its lease."""

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
