"""The data model: :class:`Task`, :class:`TaskDescriptor`, :class:`TaskStatus`, :class:`Progress`,
name validation, and the public JSON form of a task.

The JSON form is the one of Weaviate's ``distributedtask.Task`` — keys ``namespace``, ``ID``,
``version``, ``payload`` (base64), ``status``, ``startedAt``, ``finishedAt`` (RFC 3339, the Go
zero time ``0001-01-01T00:00:00Z`` while unset), ``error`` (omitted when empty) and
``finishedNodes`` (``{"node": true}``, never null) — plus ``nodes`` (a sorted list), which
Weaviate does not have because its tasks run on every node.

Everything here is pure and immutable: values are safe to share between threads. Decoding
raises :class:`~distributedtask.exceptions.InvalidTaskError` (field ``"data"``) on anything
malformed, never another exception type.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import orjson

from .exceptions import InvalidTaskError

__all__ = [
    "DEFAULT_POLICY",
    "MAX_NAME_BYTES",
    "FrozenMap",
    "Progress",
    "RunPolicy",
    "Task",
    "TaskDescriptor",
    "TaskStatus",
    "Unit",
    "UnitSpec",
    "UnitStatus",
    "format_time",
    "parse_time",
    "task_from_json",
    "task_to_json",
    "truncate_ms",
    "validate_name",
]

MAX_NAME_BYTES = 256
GO_ZERO_TIME = "0001-01-01T00:00:00Z"
_GO_ZERO = datetime(1, 1, 1, tzinfo=timezone.utc)


class TaskStatus(str, enum.Enum):
    """The status of one run of a task. STARTED and PAUSED are live; the others terminal."""

    STARTED = "STARTED"
    FINISHED = "FINISHED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    PAUSED = "PAUSED"

    @property
    def terminal(self) -> bool:
        """True for FINISHED, CANCELLED and FAILED."""
        return self not in (TaskStatus.STARTED, TaskStatus.PAUSED)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, order=True)
class TaskDescriptor:
    """One run of a task within its namespace: ``(id, version)``. Hashable and ordered."""

    id: str
    version: int


_V = TypeVar("_V")


class FrozenMap(Mapping[str, _V]):
    """An immutable, hashable mapping (what :class:`Task` keeps per node)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, items: Mapping[str, _V] | Iterable[tuple[str, _V]] = ()) -> None:
        self._data: dict[str, _V] = dict(items)
        self._hash: int | None = None

    def __getitem__(self, key: str) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


EMPTY: FrozenMap[Any] = FrozenMap()


MAX_DURATION = timedelta(seconds=10**9)
"""The longest backoff or deadline a policy may hold (about 31 years): what its JSON stores."""


@dataclass(frozen=True)
class RunPolicy:
    """How a run is retried and bounded (Kubernetes Job's numbers by default).

    ``max_attempts`` per node (per unit for unit tasks), at least 1; a failed attempt is
    retried after ``retry_backoff``, doubling each time up to ``retry_backoff_max``, jittered;
    ``deadline`` is the running time allowed (time spent PAUSED not counted), ``None`` for
    none. Raises :class:`InvalidTaskError` (field ``"policy"``) for values out of range.
    """

    max_attempts: int = 1
    retry_backoff: timedelta = timedelta(seconds=10)
    retry_backoff_max: timedelta = timedelta(minutes=6)
    deadline: timedelta | None = None

    def __post_init__(self) -> None:
        if type(self.max_attempts) is not int or not 1 <= self.max_attempts <= 1000:
            raise InvalidTaskError(
                f"max_attempts must be an int from 1 to 1000, not {self.max_attempts!r}", "policy"
            )
        for name in ("retry_backoff", "retry_backoff_max"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or not timedelta(0) <= value <= MAX_DURATION:
                raise InvalidTaskError(
                    f"{name} must be a timedelta from 0 to {MAX_DURATION}, not {value!r}",
                    "policy",
                )
        if self.retry_backoff_max < self.retry_backoff:
            raise InvalidTaskError("retry_backoff_max must be >= retry_backoff", "policy")
        if self.deadline is not None and (
            not isinstance(self.deadline, timedelta)
            or not timedelta(0) < self.deadline <= MAX_DURATION
        ):
            raise InvalidTaskError(
                f"deadline must be None or a positive timedelta of at most {MAX_DURATION}, "
                f"not {self.deadline!r}",
                "policy",
            )

    def backoff(self, attempts: int) -> timedelta:
        """The wait before the attempt after ``attempts`` failed ones (>= 1), before jitter:
        ``min(retry_backoff * 2**(attempts-1), retry_backoff_max)``."""
        if attempts < 1:
            return timedelta(0)
        if attempts > 64:
            return self.retry_backoff_max
        doubled: timedelta = self.retry_backoff * 2 ** (attempts - 1)
        return min(doubled, self.retry_backoff_max)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (durations in seconds), only the fields that are not the default."""
        out: dict[str, Any] = {}
        default = DEFAULT_POLICY
        if self.max_attempts != default.max_attempts:
            out["maxAttempts"] = self.max_attempts
        if self.retry_backoff != default.retry_backoff:
            out["retryBackoff"] = self.retry_backoff.total_seconds()
        if self.retry_backoff_max != default.retry_backoff_max:
            out["retryBackoffMax"] = self.retry_backoff_max.total_seconds()
        if self.deadline is not None:
            out["deadline"] = self.deadline.total_seconds()
        return out

    @classmethod
    def from_dict(cls, data: object) -> RunPolicy:
        """Decode :meth:`to_dict`'s form. Raises :class:`InvalidTaskError`."""
        if not isinstance(data, dict):
            raise InvalidTaskError("policy must be a JSON object", "policy")
        unknown = set(data) - {"maxAttempts", "retryBackoff", "retryBackoffMax", "deadline"}
        if unknown:
            raise InvalidTaskError(f"policy has unknown fields {sorted(unknown)}", "policy")

        def seconds(key: str, default: timedelta | None) -> timedelta | None:
            value = data.get(key)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidTaskError(f"policy {key} must be a number of seconds", "policy")
            if not 0 <= value <= MAX_DURATION.total_seconds():
                raise InvalidTaskError(f"policy {key} is out of range: {value!r}", "policy")
            return timedelta(seconds=value)

        base = DEFAULT_POLICY
        backoff = seconds("retryBackoff", base.retry_backoff)
        backoff_max = seconds("retryBackoffMax", base.retry_backoff_max)
        assert backoff is not None and backoff_max is not None
        return cls(
            max_attempts=data.get("maxAttempts", base.max_attempts),
            retry_backoff=backoff,
            retry_backoff_max=backoff_max,
            deadline=seconds("deadline", None),
        )


DEFAULT_POLICY = RunPolicy()


class UnitStatus(str, enum.Enum):
    """Where one unit of a unit task stands."""

    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class UnitSpec:
    """One unit of a task as declared: ``id`` (a name, unique in its task), ``group`` (units
    of a group form a barrier: ``""`` or a name) and ``node`` (affinity: only that node may
    claim it; ``None``: any node of the task).

    Raises :class:`InvalidTaskError` (field ``"units"``) for a bad id, group or node.
    """

    id: str
    group: str = ""
    node: str | None = None

    def __post_init__(self) -> None:
        try:
            validate_name(self.id, "unit_id")
            if self.group != "":
                validate_name(self.group, "group")
            if self.node is not None:
                validate_name(self.node, "node_id")
        except InvalidTaskError as exc:
            raise InvalidTaskError(f"unit {self.id!r}: {exc}", "units") from None

    def to_dict(self) -> dict[str, Any]:
        """``{"id", "group", "node"}`` (the JSON of a declared unit)."""
        return {"id": self.id, "group": self.group, "node": self.node}

    @classmethod
    def from_dict(cls, data: object) -> UnitSpec:
        """Decode ``{"id", "group"?, "node"?}``. Raises :class:`InvalidTaskError`."""
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise InvalidTaskError("a unit must be an object with a string 'id'", "units")
        group = data.get("group") or ""
        node = data.get("node") or None
        if not isinstance(group, str) or not (node is None or isinstance(node, str)):
            raise InvalidTaskError(f"unit {data['id']!r}: group and node must be strings", "units")
        unknown = set(data) - {"id", "group", "node"}
        if unknown:
            raise InvalidTaskError(
                f"unit {data['id']!r}: unknown field {sorted(unknown)[0]!r}", "units"
            )
        return cls(data["id"], group, node)


def unit_specs(units: object, nodes: frozenset[str] | None = None) -> tuple[UnitSpec, ...]:
    """Check a declaration of units — :class:`UnitSpec` values or plain string ids — and
    return it as a tuple: ids unique, affinities within ``nodes`` when given. Raises
    :class:`InvalidTaskError` (field ``"units"``)."""
    if isinstance(units, (str, bytes)) or not isinstance(units, Iterable):
        raise InvalidTaskError("units must be a collection of UnitSpec or str ids", "units")
    out: list[UnitSpec] = []
    seen: set[str] = set()
    for item in units:
        if isinstance(item, str):
            spec = UnitSpec(item)
        elif isinstance(item, UnitSpec):
            spec = item
        else:
            raise InvalidTaskError(
                f"a unit must be a UnitSpec or a str, not {type(item).__name__}", "units"
            )
        if spec.id in seen:
            raise InvalidTaskError(f"unit {spec.id!r} is declared twice", "units")
        if nodes is not None and spec.node is not None and spec.node not in nodes:
            raise InvalidTaskError(
                f"unit {spec.id!r} has affinity to node {spec.node!r}, "
                "which is not one of the task's nodes",
                "units",
            )
        seen.add(spec.id)
        out.append(spec)
    return tuple(out)


@dataclass(frozen=True)
class Task:
    """One run of a task as the cluster sees it.

    ``version`` is the etcd revision of the transaction that added this run; ``nodes`` are the
    nodes that must run it, fixed when it was added; ``finished_nodes`` those that recorded
    completion of this version. ``error`` is the failing node's message verbatim (as in
    Weaviate) and ``failed_node`` that node (``None`` unless a node's failure ended the run).
    ``policy`` is how the run is retried and bounded; ``attempts`` the failed attempts so far
    by node (absent: none) and ``last_errors`` each node's latest failure message. ``units``
    is the declaration of a unit task (``()`` for a plain one) and ``failed_unit`` the unit
    whose last failed attempt made the run FAILED.
    """

    namespace: str
    id: str
    version: int
    payload: bytes
    status: TaskStatus
    started_at: datetime
    finished_at: datetime | None
    error: str | None
    nodes: frozenset[str]
    finished_nodes: frozenset[str]
    failed_node: str | None = None
    policy: RunPolicy = DEFAULT_POLICY
    attempts: Mapping[str, int] = EMPTY
    last_errors: Mapping[str, str] = EMPTY
    units: tuple[UnitSpec, ...] = ()
    failed_unit: str | None = None

    @property
    def descriptor(self) -> TaskDescriptor:
        """``TaskDescriptor(self.id, self.version)``."""
        return TaskDescriptor(self.id, self.version)

    @property
    def pending_nodes(self) -> frozenset[str]:
        """The nodes of this run that have not recorded completion."""
        return self.nodes - self.finished_nodes


@dataclass(frozen=True)
class Progress:
    """The latest progress a node reported for a run: ``fraction`` in [0, 1]."""

    fraction: float
    message: str
    updated_at: datetime


@dataclass(frozen=True)
class Unit:
    """One unit of a unit task as the cluster sees it: ``node`` is its current (or last)
    claimant, ``attempts`` its failed attempts so far, ``error`` the latest failure message,
    ``progress`` the latest progress its claimant reported on it."""

    id: str
    group: str
    node: str | None
    status: UnitStatus
    attempts: int = 0
    error: str | None = None
    progress: Progress | None = None


def validate_name(value: object, field: str) -> str:
    """Check a namespace, task id or node id and return it.

    Raises :class:`InvalidTaskError` unless ``value`` is a non-empty ``str`` of at most 256
    UTF-8 bytes without control characters.
    """
    if not isinstance(value, str):
        raise InvalidTaskError(f"{field} must be a str, not {type(value).__name__}", field)
    if not value:
        raise InvalidTaskError(f"{field} must not be empty", field)
    if value.isascii() and value.isprintable() and len(value) <= MAX_NAME_BYTES:
        return value  # the common case: printable ASCII has no control character
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidTaskError(f"{field} is not valid unicode: {value!r}", field) from None
    if size > MAX_NAME_BYTES:
        raise InvalidTaskError(
            f"{field} is {size} UTF-8 bytes long, more than {MAX_NAME_BYTES}", field
        )
    for ch in value:
        if unicodedata.category(ch) == "Cc":
            raise InvalidTaskError(f"{field} contains a control character: {value!r}", field)
    return value


def truncate_ms(moment: datetime) -> datetime:
    """``moment`` in UTC, truncated to whole milliseconds (the precision we store).

    Raises :class:`InvalidTaskError` for a naive datetime (the clock must be timezone-aware)
    or one that has no UTC equivalent within years 1-9999.
    """
    if moment.tzinfo is None:
        raise InvalidTaskError("clock returned a naive datetime; it must be aware UTC", "clock")
    try:
        moment = moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise InvalidTaskError(f"time out of range: {moment!r}", "data") from None
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def to_epoch_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def from_epoch_ms(ms: int) -> datetime:
    """The aware UTC datetime of ``ms`` milliseconds since the Unix epoch.

    Raises :class:`ValueError` when that lies outside years 1-9999.
    """
    try:
        return _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        raise ValueError(f"{ms} ms since the epoch is out of range") from None


def format_time(moment: datetime | None) -> str:
    """RFC 3339 in UTC as Go's ``time.Time`` marshals it (trailing fraction zeros trimmed)."""
    if moment is None:
        return GO_ZERO_TIME
    moment = truncate_ms(moment)
    text = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )
    if moment.microsecond:
        text += f".{moment.microsecond // 1000:03d}".rstrip("0")
    return text + "Z"


_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)


def parse_time(text: object) -> datetime | None:
    """Parse an RFC 3339 time (``None`` for Go's zero time). Raises :class:`InvalidTaskError`."""
    if not isinstance(text, str):
        raise InvalidTaskError(f"time must be an RFC 3339 string, not {text!r}", "data")
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise InvalidTaskError(f"not an RFC 3339 time: {text!r}", "data")
    day, clock, fraction, offset = match.groups()
    offset = "+00:00" if offset in ("Z", "z") else offset
    micros = (fraction or "").ljust(6, "0")[:6]
    try:
        moment = datetime.fromisoformat(f"{day}T{clock}.{micros}{offset}")
    except ValueError:
        raise InvalidTaskError(f"not an RFC 3339 time: {text!r}", "data") from None
    if moment == _GO_ZERO:
        return None
    return truncate_ms(moment)


def task_to_dict(task: Task) -> dict[str, Any]:
    """The JSON-ready mapping of a task (Weaviate's keys plus ``nodes``)."""
    out: dict[str, Any] = {
        "namespace": task.namespace,
        "ID": task.id,
        "version": task.version,
        "payload": base64.b64encode(task.payload).decode("ascii"),
        "status": task.status.value,
        "startedAt": format_time(task.started_at),
        "finishedAt": format_time(task.finished_at),
    }
    if task.error:
        out["error"] = task.error
    if task.failed_node:
        out["failedNode"] = task.failed_node
    out["finishedNodes"] = {node: True for node in sorted(task.finished_nodes)}
    out["nodes"] = sorted(task.nodes)
    policy = task.policy.to_dict()
    if policy:
        out["policy"] = policy
    if task.attempts:
        out["attempts"] = {node: task.attempts[node] for node in sorted(task.attempts)}
    if task.last_errors:
        out["lastErrors"] = {node: task.last_errors[node] for node in sorted(task.last_errors)}
    if task.units:
        out["units"] = [unit.to_dict() for unit in task.units]
    if task.failed_unit:
        out["failedUnit"] = task.failed_unit
    return out


def task_to_json(task: Task) -> bytes:
    """The JSON form of one task."""
    return orjson.dumps(task_to_dict(task))


def _field(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidTaskError(f"task JSON: {key!r} is missing or of the wrong type", "data")
    return value


def _names(values: Iterable[object], what: str) -> frozenset[str]:
    try:
        return frozenset(validate_name(value, what) for value in values)
    except InvalidTaskError as exc:
        raise InvalidTaskError(f"task JSON: {exc}", "data") from None


def _nodes_from_dict(data: Mapping[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    """``nodes`` and ``finishedNodes`` of a task's JSON, checked."""
    finished = data.get("finishedNodes")
    if finished is None:
        finished = {}
    if not isinstance(finished, dict) or not all(
        v is True or v is False for v in finished.values()
    ):
        raise InvalidTaskError("task JSON: 'finishedNodes' must map node ids to booleans", "data")
    nodes_list = data.get("nodes")
    if not isinstance(nodes_list, list):
        raise InvalidTaskError("task JSON: 'nodes' must be a list", "data")
    nodes = _names(nodes_list, "node_id")
    if not nodes:
        raise InvalidTaskError("task JSON: 'nodes' must not be empty", "data")
    finished_nodes = _names((n for n, done in finished.items() if done), "node_id")
    if not finished_nodes <= nodes:
        raise InvalidTaskError("task JSON: 'finishedNodes' names nodes not in 'nodes'", "data")
    return nodes, finished_nodes


def task_from_dict(data: object) -> Task:
    """Decode one task from its JSON-ready mapping. Raises :class:`InvalidTaskError`."""
    if not isinstance(data, dict):
        raise InvalidTaskError("task JSON must be an object", "data")
    payload_text = data.get("payload")
    if payload_text is None:
        payload_text = ""
    if not isinstance(payload_text, str):
        raise InvalidTaskError("task JSON: 'payload' must be base64 text", "data")
    try:
        payload = base64.b64decode(payload_text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidTaskError("task JSON: 'payload' is not valid base64", "data") from None
    try:
        status = TaskStatus(_field(data, "status", str))
    except ValueError:
        status_text = data.get("status")
        raise InvalidTaskError(f"task JSON: unknown status {status_text!r}", "data") from None
    started_at = parse_time(_field(data, "startedAt", str))
    if started_at is None:
        raise InvalidTaskError("task JSON: 'startedAt' is unset", "data")
    finished_at = parse_time(data.get("finishedAt", GO_ZERO_TIME))
    error = data.get("error")
    if error is not None and not isinstance(error, str):
        raise InvalidTaskError("task JSON: 'error' must be a string", "data")
    failed_node = data.get("failedNode") or None
    if failed_node is not None:
        try:
            failed_node = validate_name(failed_node, "node_id")
        except InvalidTaskError as exc:
            raise InvalidTaskError(f"task JSON: 'failedNode': {exc}", "data") from None
    nodes, finished_nodes = _nodes_from_dict(data)
    version = _field(data, "version", int)
    if version <= 0:
        raise InvalidTaskError("task JSON: 'version' must be positive", "data")
    try:
        namespace = validate_name(_field(data, "namespace", str), "namespace")
        task_id = validate_name(_field(data, "ID", str), "task_id")
    except InvalidTaskError as exc:
        raise InvalidTaskError(f"task JSON: {exc}", "data") from None
    units_data = data.get("units") or []
    if not isinstance(units_data, list):
        raise InvalidTaskError("task JSON: 'units' must be a list", "data")
    failed_unit = data.get("failedUnit") or None
    try:
        units = unit_specs((UnitSpec.from_dict(item) for item in units_data), nodes)
        if failed_unit is not None:
            failed_unit = validate_name(failed_unit, "unit_id")
    except InvalidTaskError as exc:
        raise InvalidTaskError(f"task JSON: {exc}", "data") from None
    return Task(
        namespace=namespace,
        id=task_id,
        version=version,
        payload=payload,
        status=status,
        started_at=started_at,
        finished_at=finished_at,
        error=error or None,
        nodes=nodes,
        finished_nodes=finished_nodes,
        failed_node=failed_node,
        policy=RunPolicy.from_dict(data.get("policy") or {}),
        attempts=FrozenMap(_per_node(data, "attempts", int)),
        last_errors=FrozenMap(_per_node(data, "lastErrors", str)),
        units=units,
        failed_unit=failed_unit,
    )


def _per_node(data: Mapping[str, Any], key: str, kind: type) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise InvalidTaskError(f"task JSON: {key!r} must be an object", "data")
    out: dict[str, Any] = {}
    for node, item in value.items():
        if not isinstance(item, kind) or isinstance(item, bool):
            raise InvalidTaskError(f"task JSON: {key!r} of {node!r} has the wrong type", "data")
        if isinstance(item, int) and item < 0:
            raise InvalidTaskError(f"task JSON: {key!r} of {node!r} is negative", "data")
        try:
            out[validate_name(node, "node_id")] = item
        except InvalidTaskError as exc:
            raise InvalidTaskError(f"task JSON: {exc}", "data") from None
    return out


def task_from_json(data: bytes | str) -> Task:
    """Decode one task from its JSON form. Raises :class:`InvalidTaskError`."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidTaskError("task JSON is not valid JSON", "data") from None
    return task_from_dict(parsed)


def tasks_to_payload(tasks: Mapping[str, list[Task]]) -> bytes:
    """``{"tasks": {namespace: [task JSON, ...]}}``, namespaces and ids sorted."""
    body = {
        "tasks": {
            ns: [task_to_dict(t) for t in sorted(tasks[ns], key=lambda t: t.id)]
            for ns in sorted(tasks)
        }
    }
    return orjson.dumps(body)


def tasks_from_payload(data: bytes | str) -> list[Task]:
    """Every task of a ``{"tasks": {...}}`` document. Raises :class:`InvalidTaskError`."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidTaskError("snapshot is not valid JSON", "data") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("tasks"), dict):
        raise InvalidTaskError('snapshot must be an object {"tasks": {...}}', "data")
    out: list[Task] = []
    seen: set[tuple[str, str]] = set()
    for namespace, items in parsed["tasks"].items():
        if not isinstance(items, list):
            raise InvalidTaskError(f"snapshot: tasks of {namespace!r} must be a list", "data")
        for item in items:
            task = task_from_dict(item)
            if task.namespace != namespace:
                raise InvalidTaskError(
                    f"snapshot: task {task.id!r} filed under {namespace!r} "
                    f"says namespace {task.namespace!r}",
                    "data",
                )
            if (task.namespace, task.id) in seen:
                raise InvalidTaskError(
                    f"snapshot: task {task.namespace}/{task.id} appears twice", "data"
                )
            seen.add((task.namespace, task.id))
            out.append(task)
    return out
