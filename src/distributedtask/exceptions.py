"""The one error tree of distributedtask.

Every error the library raises on purpose derives from :class:`DistributedTaskError`::

    DistributedTaskError
     ├─ TaskNotFoundError        no task (namespace, id) with that version
     ├─ TaskAlreadyRunningError  add_task while that id is STARTED
     ├─ TaskNotRunningError      record/cancel on a terminal version
     ├─ TaskStillRunningError    clean_up_task on a STARTED task
     ├─ TaskTooFreshError        clean_up_task before the TTL has passed
     ├─ InvalidTaskError         (also ValueError) bad namespace/id/node id/payload
     │   └─ UnitClaimError       a unit recorded by a node that does not hold its claim
     ├─ NoEligibleNodesError     add_task without nodes= and no live node serves the namespace
     ├─ CorruptRecordError       a value under the prefix that cannot be read (corrupt, foreign)
     ├─ StorageFormatError       the prefix holds another storage layout (0.1's, or a newer one)
     └─ EtcdError                etcd unreachable, timed out or refused the request

Errors keep the fields they are about as attributes, so callers never parse messages.
Exceptions are plain values: raising them has no side effect and they are safe to share
between threads. ``EtcdError`` never carries a password or an auth token.
"""

from __future__ import annotations

__all__ = [
    "CorruptRecordError",
    "DistributedTaskError",
    "EtcdError",
    "InvalidTaskError",
    "NoEligibleNodesError",
    "StorageFormatError",
    "TaskAlreadyRunningError",
    "TaskNotFoundError",
    "TaskNotRunningError",
    "TaskStillRunningError",
    "TaskTooFreshError",
    "UnitClaimError",
]


class DistributedTaskError(Exception):
    """Root of every error the library raises on purpose."""


class _TaskError(DistributedTaskError):
    """An error about one run ``(namespace, task_id, version)`` of a task."""

    def __init__(
        self, message: str, namespace: str, task_id: str, version: int | None = None
    ) -> None:
        super().__init__(message)
        self.namespace = namespace
        self.task_id = task_id
        self.version = version


class TaskNotFoundError(_TaskError):
    """No task ``(namespace, task_id)`` exists with that version."""

    def __init__(self, namespace: str, task_id: str, version: int | None = None) -> None:
        what = f"task {namespace}/{task_id}"
        if version is not None:
            what += f" with version {version}"
        super().__init__(f"{what} does not exist", namespace, task_id, version)


class TaskAlreadyRunningError(_TaskError):
    """``add_task`` while a run of that id is STARTED; ``version`` is the running one."""

    def __init__(self, namespace: str, task_id: str, version: int) -> None:
        super().__init__(
            f"task {namespace}/{task_id} is already running with version {version}",
            namespace,
            task_id,
            version,
        )


class TaskNotRunningError(_TaskError):
    """A record or cancel on a version that is already terminal; ``status`` says which."""

    def __init__(self, namespace: str, task_id: str, version: int, status: str) -> None:
        super().__init__(
            f"task {namespace}/{task_id} version {version} is no longer running ({status})",
            namespace,
            task_id,
            version,
        )
        self.status = status


class TaskStillRunningError(_TaskError):
    """``clean_up_task`` on a run that is still STARTED."""

    def __init__(self, namespace: str, task_id: str, version: int) -> None:
        super().__init__(
            f"task {namespace}/{task_id} version {version} is still running",
            namespace,
            task_id,
            version,
        )


class TaskTooFreshError(_TaskError):
    """``clean_up_task`` before ``completed_task_ttl`` has passed since ``finished_at``."""

    def __init__(self, namespace: str, task_id: str, version: int, ttl_seconds: float) -> None:
        super().__init__(
            f"task {namespace}/{task_id} version {version} is too fresh to clean up "
            f"(ttl {ttl_seconds:g}s)",
            namespace,
            task_id,
            version,
        )
        self.ttl_seconds = ttl_seconds


class InvalidTaskError(DistributedTaskError, ValueError):
    """Bad namespace, task id, node id or payload. Nothing was written to etcd.

    ``field`` names the argument at fault (``"namespace"``, ``"task_id"``, ``"node_id"``,
    ``"payload"``, ``"nodes"``, ``"data"``).
    """

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class UnitClaimError(InvalidTaskError):
    """A unit was recorded by a node that does not hold its claim (another node claimed it,
    or it is not claimed at all). Nothing was written. ``unit_id`` and ``node_id`` name the
    unit and the caller; ``holder`` is the unit's current claimant (None if unclaimed).
    """

    def __init__(self, unit_id: str, node_id: str, holder: str | None, detail: str = "") -> None:
        held = f"claimed by {holder!r}" if holder else "not claimed"
        super().__init__(
            f"node {node_id!r} does not hold unit {unit_id!r} ({held}{detail})", "unit_id"
        )
        self.unit_id = unit_id
        self.node_id = node_id
        self.holder = holder


class NoEligibleNodesError(DistributedTaskError):
    """``add_task(nodes=None)`` found no live node serving ``namespace``."""

    def __init__(self, namespace: str) -> None:
        super().__init__(f"no live node serves namespace {namespace!r}")
        self.namespace = namespace


class CorruptRecordError(DistributedTaskError):
    """A value under our prefix that we cannot read: corrupt, foreign, or of another format.

    Listing and scheduling skip such values (logged and counted); reading one task raises.
    ``key`` is the etcd key of the value, when known.
    """

    def __init__(self, message: str, key: bytes | None = None) -> None:
        super().__init__(message if key is None else f"{message} (key {key!r})")
        self.key = key


class StorageFormatError(DistributedTaskError):
    """The keys under ``prefix`` are in a storage layout this version does not read.

    ``found`` is the layout met (``1`` for the unmarked layout of distributedtask 0.1, the
    number in a newer marker, or a description of a marker no version writes), ``expected``
    ours. Nothing was written. Layouts are not migrated:
    use another prefix, or empty this one with the version that wrote it.
    """

    def __init__(self, prefix: str, found: int | str, expected: int) -> None:
        if found == 1:
            what = "the unmarked layout of distributedtask 0.1"
        elif isinstance(found, int):
            what = f"storage layout {found}"
        else:
            what = f"an unrecognised layout ({found})"
        super().__init__(
            f"the keys under {prefix!r} are in {what}; this version reads and writes layout "
            f"{expected} only and does not migrate: use another prefix, or empty this one with "
            f"the version that wrote it"
        )
        self.prefix = prefix
        self.found = found
        self.expected = expected


class EtcdError(DistributedTaskError):
    """etcd was unreachable, timed out or refused the request, after any retries.

    ``endpoint`` is the last endpoint tried, ``code`` the gRPC status code etcd returned (or
    ``None`` for transport errors), ``etcd_message`` etcd's own message, and ``transient``
    whether the failure was of the kind that is retried (connection, timeout, unavailable).
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        code: int | None = None,
        etcd_message: str | None = None,
        transient: bool = False,
    ) -> None:
        full = message if endpoint is None else f"{message} (endpoint {endpoint})"
        super().__init__(full)
        self.endpoint = endpoint
        self.code = code
        self.etcd_message = etcd_message
        self.transient = transient
