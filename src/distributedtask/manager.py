"""``Manager``: every state transition of a task, each an etcd compare-and-swap transaction.

A run is stored in the keys of layout 2 (keys.py has the schema, readmodel.py the rules that
turn them into a :class:`~distributedtask.model.Task`): the task record, written once when the
run is added and never rewritten while it exists, so its ``mod_revision`` *is* the version (it
names the nodes of a run of at most 16; a larger run has a node list and per-bucket
assignments); one completion key per node that completed; one attempt key per node that
failed with attempts left; the run state, once paused; and the outcome key, which exists once
the run has ended. "Version V is live" (STARTED or PAUSED), written ``live(V)`` below, is
therefore two compares, ``mod(task) == V`` and ``create(outcome) == 0``, and every transition is
guarded by them::

    add            IF create(task) == 0 AND format is ours                          1 trip
                   THEN put record (and, over 16 nodes, node list and an assignment
                   per bucket, <= 64) ELSE range record, outcome, format
    add over a     the above; then IF mod(task) == observed AND mod(outcome) ==      3 trips
     terminal run  observed THEN delete the old run; then the create again
    complete       IF live(V) THEN put done/node, range done/ (keys only)           1 trip
                   ... and when that range holds every node:
                   IF live(V) THEN put outcome FINISHED                             +1 trip
    fail           IF live(V) THEN put outcome FAILED (error verbatim, node)        1 trip
                   (with retries: nested, IF version(attempts/node) < max - 1
                   THEN put attempts/node ELSE put attempts/node and the outcome)
    cancel         IF live(V) THEN put outcome CANCELLED                            1 trip
    pause, resume  range the run; IF live(V) AND mod(state) == observed           2 trips
                   THEN put state
    clean up       range the run; IF mod(task) == observed AND exists(outcome)      2 trips
                   THEN delete the run's keys
    units          a ticket, then a claim; a completion (FINISHED with the last);  1 trip each
                   a failure; progress — see units.py (``manager.units``)

A unit task's add also writes its declared units, compressed, as one key; its per-unit keys are
written lazily by the nodes that claim the units.

Nothing in a transaction grows with the number of nodes: the add writes at most 64 assignments
whatever the node count (no cap from etcd's 128 operations per transaction), completions are
written lazily by each node, and deciding FINISHED needs no contended key. Each completer writes
its own key and reads the completion keys of the run in the same transaction; etcd orders the
transactions, so exactly one completer sees every node (the last), and it writes FINISHED
guarded by "still live" — one winner among finish, cancel and failure. Fan-in is N + 1 round
trips for N nodes. A completer that dies between the two leaves every node completed and the run
STARTED: :meth:`Manager.finish_if_complete` repairs that, and Schedulers call it when they see
such a run (the restarted completer at its start, the deciders when they look at a lost node's
work).

Whether a node is one of a run's nodes is checked against the node list before anything is
written (etcd cannot compare a value with a list): the list of a version never changes, so the
Manager keeps the runs it added or read in a small cache, and a completion costs a read only
the first time a Manager meets a run.

The layout marker ``P/format`` must be ours: the add compares it (so etcd refuses to add to a
prefix of another layout), reads check it, and :class:`StorageFormatError` is raised, with
nothing written, when the prefix holds another layout, 0.1's included.

Retries: :class:`~distributedtask.etcd.client.EtcdClient` retries transient failures, so a
request may be applied although its response was lost. Every value a call writes carries that
call's random ``token``; a call that finds its own token recognises its earlier write and
succeeds. Deletes carry no token: a clean-up that finds the run gone after an ambiguous attempt
succeeds.

Threading: a Manager holds its configuration and a cache of immutable run records; share it
freely between threads. Every method raises :class:`~distributedtask.exceptions.EtcdError` when
etcd cannot answer within the client's timeout, and
:class:`~distributedtask.exceptions.InvalidTaskError` (nothing written) for bad arguments.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from .etcd import txn as t
from .etcd.client import EtcdClient
from .exceptions import (
    CorruptRecordError,
    EtcdError,
    InvalidTaskError,
    NoEligibleNodesError,
    TaskAlreadyRunningError,
    TaskNotFoundError,
    TaskNotRunningError,
    TaskStillRunningError,
    TaskTooFreshError,
)
from .follower import RunFollower
from .keys import BUCKETS, Keys, MemberKey, ProgressKey, prefix_range_end
from .model import (
    DEFAULT_POLICY,
    Progress,
    RunPolicy,
    Task,
    TaskStatus,
    Unit,
    UnitSpec,
    tasks_from_payload,
    tasks_to_payload,
    truncate_ms,
    unit_specs,
    validate_name,
)
from .readmodel import Attempts, ReadModel, Run, build_task
from .records import (
    FORMAT_MARKER,
    INLINE_NODES,
    AttemptRecord,
    DoneRecord,
    MemberRecord,
    NodeList,
    OutcomeRecord,
    RunState,
    TaskRecord,
    UnitDecl,
    decode_progress,
    encode_progress,
)
from .units import UnitTransitions

__all__ = ["Manager"]

log = logging.getLogger("distributedtask.manager")

MAX_MESSAGE_CHARS = 4096
MAX_DECL_STORED = 1024 * 1024
"""The most a task's declared units may take, compressed (they are written in its add)."""
"""Error and progress messages are cut to this many characters."""

_RACE_ATTEMPTS = 16
_CACHE_RUNS = 1024
_CACHE_PAYLOAD_BYTES = 64 * 1024 * 1024
"""What the cache of runs may hold: payloads and declared units (about 150 bytes a unit)."""


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _new_token() -> str:
    return secrets.token_hex(8)


def _clip(text: str) -> str:
    """A message fit to store: lone surrogates (undecodable file names, say) replaced, and
    cut to ``MAX_MESSAGE_CHARS``."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def _check_progress(fraction: object, message: object) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or math.isnan(fraction):
        raise InvalidTaskError(f"fraction must be a number, not {fraction!r}", "fraction")
    if not isinstance(message, str):
        raise InvalidTaskError("message must be a str", "message")


def _batches(ops: Sequence[t.Op]) -> Iterable[Sequence[t.Op]]:
    for start in range(0, len(ops), t.MAX_TXN_OPS):
        yield ops[start : start + t.MAX_TXN_OPS]


@dataclass(frozen=True)
class KnownRun:
    """What never changes about one version of a run: its record, nodes and, for a unit task,
    its declared units."""

    record: TaskRecord
    nodes: frozenset[str]
    decl: UnitDecl | None = None

    @property
    def size(self) -> int:
        """Roughly what it holds, in bytes (for the cache's bound)."""
        return len(self.record.payload) + (0 if self.decl is None else 150 * len(self.decl.units))


@dataclass(frozen=True)
class NodeReport:
    """What one node recorded of a run: completed, and its failed attempts so far (the
    latest message and when)."""

    done: bool
    attempts: int = 0
    error: str = ""
    at: datetime | None = None


class _RunCache:
    """Least-recently-used :class:`KnownRun` by ``(namespace, id, version)``, bounded in entries
    and payload bytes. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: OrderedDict[tuple[str, str, int], KnownRun] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[str, str, int]) -> KnownRun | None:
        with self._lock:
            run = self._runs.get(key)
            if run is not None:
                self._runs.move_to_end(key)
            return run

    def put(self, key: tuple[str, str, int], run: KnownRun) -> None:
        size = run.size
        if len(run.record.payload) > _CACHE_PAYLOAD_BYTES // 8 or size > _CACHE_PAYLOAD_BYTES // 2:
            return
        with self._lock:
            old = self._runs.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._runs[key] = run
            self._bytes += size
            while len(self._runs) > _CACHE_RUNS or self._bytes > _CACHE_PAYLOAD_BYTES:
                _, evicted = self._runs.popitem(last=False)
                self._bytes -= evicted.size


class Manager:
    """Adds, cancels, records, lists, exports and cleans up tasks under one key prefix.

    ``prefix`` roots every key (two prefixes never meet); ``completed_task_ttl`` is how long a
    terminal run stays before :meth:`clean_up_task` may remove it; ``clock`` returns the aware
    UTC now (inject one in tests); ``max_payload_bytes`` bounds a payload.

    Raises :class:`ValueError` for a bad prefix or configuration.
    """

    def __init__(
        self,
        client: EtcdClient,
        *,
        prefix: str = "/distributedtask",
        completed_task_ttl: timedelta = timedelta(days=5),
        clock: Callable[[], datetime] | None = None,
        max_payload_bytes: int = 1024 * 1024,
    ) -> None:
        if not isinstance(completed_task_ttl, timedelta) or completed_task_ttl < timedelta(0):
            raise ValueError(f"completed_task_ttl must be a timedelta >= 0: {completed_task_ttl!r}")
        if not isinstance(max_payload_bytes, int) or max_payload_bytes < 0:
            raise ValueError(f"max_payload_bytes must be an int >= 0: {max_payload_bytes!r}")
        self.client = client
        self.keys = Keys(prefix)
        self.read = ReadModel(self.keys)
        self.prefix = self.keys.prefix
        self.completed_task_ttl = completed_task_ttl
        self.max_payload_bytes = max_payload_bytes
        self._clock = clock or _utcnow
        self.skipped_records = 0  # corrupt or foreign values met while reading (logged)
        self._skip_lock = threading.Lock()
        self._known = _RunCache()
        self.units = UnitTransitions(self)
        """The unit transitions (units.py): what the unit methods below and Schedulers use."""

    def __repr__(self) -> str:
        return f"Manager({self.client!r}, prefix={self.prefix!r})"

    def now(self) -> datetime:
        """The clock's now, aware UTC, truncated to milliseconds."""
        return truncate_ms(self._clock())

    # ---- validation -----------------------------------------------------------------------

    def _payload(self, payload: object) -> bytes:
        if isinstance(payload, (bytearray, memoryview)):
            payload = bytes(payload)
        if not isinstance(payload, bytes):
            raise InvalidTaskError(
                f"payload must be bytes, not {type(payload).__name__}", "payload"
            )
        if len(payload) > self.max_payload_bytes:
            raise InvalidTaskError(
                f"payload is {len(payload)} bytes, more than max_payload_bytes "
                f"({self.max_payload_bytes})",
                "payload",
            )
        return payload

    @staticmethod
    def _nodes(nodes: object) -> frozenset[str]:
        if isinstance(nodes, (str, bytes)) or not isinstance(nodes, Iterable):
            raise InvalidTaskError("nodes must be a collection of node ids", "nodes")
        result = frozenset(validate_name(node, "node_id") for node in nodes)
        if not result:
            raise InvalidTaskError("nodes must not be empty", "nodes")
        return result

    @staticmethod
    def _version(version: object) -> int:
        if not isinstance(version, int) or isinstance(version, bool) or version <= 0:
            raise InvalidTaskError(f"version must be a positive int, not {version!r}", "version")
        return version

    def _check_run_args(
        self, namespace: str, task_id: str, version: object, node_id: str | None = None
    ) -> int:
        validate_name(namespace, "namespace")
        validate_name(task_id, "task_id")
        if node_id is not None:
            validate_name(node_id, "node_id")
        return self._version(version)

    def _skip(self, key: bytes, exc: Exception) -> None:
        with self._skip_lock:
            self.skipped_records += 1
        log.warning("skipping unreadable value under %s: %s (key %r)", self.prefix, exc, key)

    # ---- the layout marker ----------------------------------------------------------------

    def ensure_format(self) -> None:
        """Write the layout marker on a prefix that has none and holds no 0.1 keys; check it
        otherwise. Called by the first add on a fresh prefix and by a starting Scheduler.

        Raises :class:`StorageFormatError` (another layout; nothing written), :class:`EtcdError`.
        """
        result = self.client.txn(
            compare=[
                t.create_equals(self.keys.format, 0),
                *(
                    t.create_equals(legacy, 0, range_end=prefix_range_end(legacy))
                    for legacy in self.keys.legacy
                ),
            ],
            success=[t.put(self.keys.format, FORMAT_MARKER)],
            failure=self.read.format_ops(),
        )
        if not result.succeeded:
            self.read.check_format(result, 0)

    def _read(self, ops: Sequence[t.Op]) -> t.TxnResult:
        """One read transaction of ``ops`` followed by the layout check (results of ``ops``
        keep their indexes). Raises :class:`StorageFormatError`, :class:`EtcdError`."""
        result = self.client.txn(success=[*ops, *self.read.format_ops()])
        self.read.check_format(result, len(ops))
        return result

    # ---- reading --------------------------------------------------------------------------

    def _read_run(self, namespace: str, task_id: str, extra: Sequence[t.Op] = ()) -> Run | None:
        result = self._read([*self.read.run_ops(namespace, task_id), *extra])
        run = self.read.run_from(namespace, task_id, result)
        if run is not None:
            self._remember(run.task, run.record, run.decl)
        return run

    def _remember(self, task: Task, record: TaskRecord, decl: UnitDecl | None = None) -> None:
        self._known.put((task.namespace, task.id, task.version), KnownRun(record, task.nodes, decl))

    def get_task(self, namespace: str, task_id: str) -> Task | None:
        """The current run of ``(namespace, task_id)``, or ``None``. One round trip.

        Raises :class:`InvalidTaskError`, :class:`EtcdError`, :class:`StorageFormatError`, and
        :class:`CorruptRecordError` if the stored run cannot be read.
        """
        validate_name(namespace, "namespace")
        validate_name(task_id, "task_id")
        run = self._read_run(namespace, task_id)
        return None if run is None else run.task

    def list_tasks(self) -> dict[str, list[Task]]:
        """Every task, by namespace, each list sorted by id; read at one etcd revision.

        Values that cannot be read (corrupt, foreign) are skipped with a log line and counted
        in ``skipped_records``. Raises :class:`EtcdError`, :class:`StorageFormatError`.
        """
        return self.read.tasks_from(self._read(self.read.list_ops()), 0, self._skip)

    def list_tasks_payload(self) -> bytes:
        """``{"tasks": {namespace: [task JSON, ...]}}`` (see API.md). Raises :class:`EtcdError`."""
        return tasks_to_payload(self.list_tasks())

    def live_members(self) -> list[MemberRecord]:
        """The membership records of the live Schedulers, sorted by node id.

        Raises :class:`EtcdError`, :class:`StorageFormatError`.
        """
        result = self._read([t.get_prefix(self.keys.all_members())])
        members = []
        for kv in result.range(0).kvs:
            member = self.member_from(kv, self._skip)
            if member is not None:
                members.append(member)
        return sorted(members, key=lambda m: m.node_id)

    def member_from(
        self, kv: t.KeyValue, on_skip: Callable[[bytes, Exception], None]
    ) -> MemberRecord | None:
        """Decode a membership key-value; an unreadable one goes to ``on_skip``."""
        parsed = self.keys.parse(kv.key)
        try:
            member = MemberRecord.decode(kv.value)
            if not isinstance(parsed, MemberKey) or parsed.node_id != member.node_id:
                raise CorruptRecordError("a member record under another node's key")
        except CorruptRecordError as exc:
            on_skip(kv.key, exc)
            return None
        return member

    # ---- adding ---------------------------------------------------------------------------

    def add_task(
        self,
        namespace: str,
        task_id: str,
        payload: bytes = b"",
        *,
        nodes: Iterable[str] | None = None,
        policy: RunPolicy | None = None,
        units: Iterable[UnitSpec | str] | None = None,
    ) -> Task:
        """Add a new STARTED run of ``(namespace, task_id)`` and return it.

        ``nodes=None`` assigns the run to the nodes whose live Scheduler serves ``namespace``
        now. ``policy`` says how the run is retried and bounded (default: one attempt, no
        deadline: the behaviour and JSON of a plain task). ``units`` splits the run into
        units (:class:`UnitSpec` or plain ids; see :meth:`claim_unit`): it is FINISHED when
        every unit is COMPLETED, and its nodes record units, not completions. A terminal run
        of the same id is replaced, with a higher version. There is no fixed bound on the
        number of nodes or units; the add must fit in one etcd request (by default 1.5 MiB:
        the payload, twice the node ids and the compressed declaration of the units).

        Raises :class:`InvalidTaskError` (nothing written), :class:`NoEligibleNodesError`,
        :class:`TaskAlreadyRunningError`, :class:`StorageFormatError`, :class:`EtcdError`.
        """
        validate_name(namespace, "namespace")
        validate_name(task_id, "task_id")
        data = self._payload(payload)
        if policy is None:
            policy = DEFAULT_POLICY
        elif not isinstance(policy, RunPolicy):
            raise InvalidTaskError(
                f"policy must be a RunPolicy, not {type(policy).__name__}", "policy"
            )
        if nodes is None:
            eligible = {m.node_id for m in self.live_members() if namespace in m.namespaces}
            if not eligible:
                raise NoEligibleNodesError(namespace)
            assigned = self._nodes(eligible)
        else:
            assigned = self._nodes(nodes)
        decl = None
        if units is not None:
            decl = UnitDecl(unit_specs(units, assigned))
            if not decl.units:
                raise InvalidTaskError(
                    "units must not be empty (omit it for a plain task)", "units"
                )
            stored = len(decl.encode())
            if stored > MAX_DECL_STORED:
                raise InvalidTaskError(
                    f"the {len(decl.units)} units compress to {stored} bytes, more than "
                    f"{MAX_DECL_STORED} (one etcd request): split the work into fewer units",
                    "units",
                )
        record = TaskRecord(
            payload=data,
            started_at=self.now(),
            node_count=len(assigned),
            token=_new_token(),
            policy=policy,
            unit_count=0 if decl is None else len(decl.units),
        )
        return self._create(namespace, task_id, record, assigned, decl=decl)

    def _create(
        self,
        namespace: str,
        task_id: str,
        record: TaskRecord,
        nodes: frozenset[str],
        outcome: OutcomeRecord | None = None,
        *,
        decl: UnitDecl | None = None,
    ) -> Task:
        """Write a run — record, node list, assignments, declared units, and ``outcome`` if
        given — replacing a terminal (or unreadable) one, and return it. See
        :meth:`add_task`."""
        keys = self.keys
        key = keys.task(namespace, task_id)
        outcome_key = keys.outcome(namespace, task_id)
        if len(nodes) <= INLINE_NODES:
            record = replace(record, nodes=nodes)
            writes = [t.put(key, record.encode())]
        else:
            writes = [
                t.put(key, replace(record, nodes=None).encode()),
                t.put(keys.nodes(namespace, task_id), NodeList(nodes).encode()),
                *(
                    t.put(keys.assign(bucket, namespace, task_id), part.encode())
                    for bucket, part in sorted(NodeList.by_bucket(nodes).items())
                ),
            ]
        if decl is not None:
            writes.append(t.put(keys.unit_decl(namespace, task_id), decl.encode()))
        if outcome is not None:
            writes.append(t.put(outcome_key, outcome.encode()))
        for _ in range(_RACE_ATTEMPTS):
            result = self.client.txn(
                compare=[t.create_equals(key, 0), t.value_equals(keys.format, FORMAT_MARKER)],
                success=writes,
                failure=[t.get(key), t.get(outcome_key), t.get(keys.format)],
            )
            if result.succeeded:
                task = build_task(
                    namespace, task_id, record, result.revision, nodes, (), outcome, decl=decl
                )
                self._remember(task, record, decl)
                return task
            marker = result.range(2).first()
            if marker is None or marker.value != FORMAT_MARKER:
                self.ensure_format()  # writes the marker on a fresh prefix, or raises
                continue
            kv = result.range(0).first()
            if kv is None:
                continue  # removed meanwhile: create again
            outcome_kv = result.range(1).first()
            guard = [t.mod_equals(key, kv.mod_revision)]
            try:
                existing = TaskRecord.decode(kv.value, payload=False)
            except CorruptRecordError as exc:  # unreadable: it must not block the id forever
                self._skip(kv.key, exc)
                log.warning("replacing the unreadable record of %s/%s", namespace, task_id)
            else:
                if existing.token == record.token:  # our own write, whose response was lost
                    task = build_task(
                        namespace, task_id, record, kv.mod_revision, nodes, (), outcome, decl=decl
                    )
                    self._remember(task, record, decl)
                    return task
                if outcome_kv is None:
                    raise TaskAlreadyRunningError(
                        namespace, task_id, existing.version_at(kv.mod_revision)
                    )
                guard.append(t.mod_equals(outcome_key, outcome_kv.mod_revision))
            self.client.txn(compare=guard, success=self._delete_run_ops(namespace, task_id))
        raise EtcdError(  # pragma: no cover - a livelock against other writers
            f"could not add task {namespace}/{task_id}: it kept changing under us"
        )

    def _delete_run_ops(self, namespace: str, task_id: str) -> list[t.Op]:
        """Delete every key of a run: a bounded number of operations (75) whatever its size."""
        keys = self.keys
        return [
            t.delete(keys.unit_decl(namespace, task_id)),
            t.delete_prefix(keys.unit_run(namespace, task_id)),
            t.delete_prefix(keys.task_pool(namespace, task_id)),
            t.delete_prefix(keys.task_groups(namespace, task_id)),
            t.delete(keys.task(namespace, task_id)),
            t.delete(keys.outcome(namespace, task_id)),
            t.delete(keys.nodes(namespace, task_id)),
            t.delete_prefix(keys.task_done(namespace, task_id)),
            t.delete_prefix(keys.task_progress(namespace, task_id)),
            t.delete(keys.state(namespace, task_id)),
            t.delete_prefix(keys.task_attempts(namespace, task_id)),
            *(t.delete(keys.assign(bucket, namespace, task_id)) for bucket in range(BUCKETS)),
        ]

    # ---- transitions of a running version -------------------------------------------------

    def _live(self, namespace: str, task_id: str, version: int) -> list[t.Compare]:
        """Compares that hold exactly while ``version`` is the current run and has not ended
        (STARTED or PAUSED)."""
        return [
            t.mod_equals(self.keys.task(namespace, task_id), version),
            t.create_equals(self.keys.outcome(namespace, task_id), 0),
        ]

    def known_run(
        self, namespace: str, task_id: str, version: int, node_id: str | None = None
    ) -> KnownRun:
        """The record and nodes of ``version``, from the cache or one read; with ``node_id``,
        checked to be one of its nodes. Raises :class:`TaskNotFoundError`,
        :class:`InvalidTaskError` (not one of its nodes), :class:`CorruptRecordError`,
        :class:`EtcdError`."""
        known = self._known.get((namespace, task_id, version))
        if known is None:
            run = self._read_run(namespace, task_id)
            if run is None or run.task.version != version:
                raise TaskNotFoundError(namespace, task_id, version)
            known = KnownRun(run.record, run.task.nodes, run.decl)
        if node_id is not None and node_id not in known.nodes:
            # A terminal or replaced run says so first, as a transition's compares would.
            run = self._read_run(namespace, task_id)
            if run is None or run.task.version != version:
                raise TaskNotFoundError(namespace, task_id, version)
            if run.outcome is not None:
                raise TaskNotRunningError(namespace, task_id, version, run.outcome.status.value)
            raise InvalidTaskError(
                f"node {node_id!r} is not one of the nodes of task {namespace}/{task_id} "
                f"version {version}",
                "node_id",
            )
        return known

    def _explain_reads(self, namespace: str, task_id: str, node_id: str | None) -> list[t.Op]:
        """The failure branch :meth:`_explain` reads: the run, and the node's completion."""
        done = (
            self.keys.done(namespace, task_id, node_id)
            if node_id is not None
            else self.keys.task_done(namespace, task_id)  # a key that never exists
        )
        return [*self.read.run_ops(namespace, task_id), t.get(done)]

    def _explain(
        self,
        namespace: str,
        task_id: str,
        version: int,
        result: t.TxnResult,
        token: str,
        node_id: str | None = None,
    ) -> Task:
        """After a failed compare: return our own earlier write, or raise why not.

        The failure branch must be :meth:`_explain_reads`.
        """
        run = self.read.run_from(namespace, task_id, result)
        if run is None or run.task.version != version:
            raise TaskNotFoundError(namespace, task_id, version)
        outcome = run.outcome
        if outcome is None:  # pragma: no cover - the compares said it is not STARTED
            raise TaskNotFoundError(namespace, task_id, version)
        if outcome.token == token:
            return run.task
        done = result.range(self.read.RUN_OPS).first()
        try:
            if done is not None and token and DoneRecord.decode(done.value).token == token:
                return run.task  # our completion counted; the run ended after it
        except CorruptRecordError:
            pass
        raise TaskNotRunningError(namespace, task_id, version, outcome.status.value)

    def record_node_completion(
        self, namespace: str, task_id: str, version: int, node_id: str
    ) -> Task:
        """Record that ``node_id`` finished ``version``; FINISHED once every node has.

        One transaction, and a second one by the completion that leaves no node pending (it
        writes FINISHED). Idempotent for a node while the run is STARTED. Returns the run
        after the call. Raises :class:`TaskNotFoundError` (no such id or another version),
        :class:`TaskNotRunningError` (that version is terminal), :class:`InvalidTaskError`
        (``node_id`` is not one of the task's nodes, or the task is made of units; nothing
        written), :class:`EtcdError`.
        """
        version = self._check_run_args(namespace, task_id, version, node_id)
        known = self.known_run(namespace, task_id, version, node_id)
        if known.decl is not None:
            raise InvalidTaskError(
                f"task {namespace}/{task_id} is made of units: record unit completions "
                "(record_unit_completion), not node completions",
                "task_id",
            )
        return self.complete(namespace, task_id, version, node_id, known)

    def complete(
        self, namespace: str, task_id: str, version: int, node_id: str, known: KnownRun
    ) -> Task:
        """:meth:`record_node_completion` for a caller that knows the run (a Scheduler):
        ``node_id`` is not checked against the node list again."""
        token = _new_token()
        done_key = self.keys.done(namespace, task_id, node_id)
        result = self.client.txn(
            compare=self._live(namespace, task_id, version),
            success=[
                t.put(done_key, DoneRecord(version, self.now(), token).encode()),
                t.get_prefix(self.keys.task_done(namespace, task_id), keys_only=True),
                *self._extras_reads(namespace, task_id),
            ],
            failure=self._explain_reads(namespace, task_id, node_id),
        )
        if not result.succeeded:
            return self._explain(namespace, task_id, version, result, token, node_id)
        finished = self.read.done_nodes(
            result.range(1).kvs, self.keys.task_done(namespace, task_id)
        )
        if len(finished) >= known.record.node_count:
            return self._finish(namespace, task_id, version, known, finished, token, node_id)
        state, attempts = self._extras(result, 2)
        return build_task(
            namespace,
            task_id,
            known.record,
            version,
            known.nodes,
            finished,
            None,
            state,
            attempts,
        )

    def _extras_reads(self, namespace: str, task_id: str) -> list[t.Op]:
        """Reads of a run's state and attempts, for a transition that returns the run."""
        return [
            t.get(self.keys.state(namespace, task_id)),
            t.get_prefix(self.keys.task_attempts(namespace, task_id)),
        ]

    def _extras(self, result: t.TxnResult, at: int) -> tuple[RunState | None, Attempts]:
        """What :meth:`_extras_reads` read at ``at`` (unreadable values count as absent)."""
        state_kv = result.range(at).first()
        try:
            state = None if state_kv is None else RunState.decode(state_kv.value)
            attempts = self.read.attempts_from(result.range(at + 1).kvs)
        except CorruptRecordError as exc:
            self._skip(exc.key or b"", exc)
            return None, Attempts()
        return state, attempts

    def _finish(
        self,
        namespace: str,
        task_id: str,
        version: int,
        known: KnownRun,
        finished: Iterable[str],
        token: str,
        node_id: str | None,
    ) -> Task:
        """IF still STARTED THEN put outcome FINISHED; exactly one caller wins."""
        outcome = OutcomeRecord(TaskStatus.FINISHED, self.now(), token)
        result = self.client.txn(
            compare=self._live(namespace, task_id, version),
            success=[
                t.put(self.keys.outcome(namespace, task_id), outcome.encode()),
                *self._extras_reads(namespace, task_id),
            ],
            failure=self._explain_reads(namespace, task_id, node_id),
        )
        if not result.succeeded:
            return self._explain(namespace, task_id, version, result, token, node_id)
        _, attempts = self._extras(result, 1)
        return build_task(
            namespace,
            task_id,
            known.record,
            version,
            known.nodes,
            finished,
            outcome,
            attempts=attempts,
        )

    def finish_if_complete(self, namespace: str, task_id: str, version: int) -> Task | None:
        """Write FINISHED for a STARTED run whose nodes have all completed (a completer died
        between its completion and the finishing write); returns the run when it did, else
        None. Two round trips. Raises :class:`EtcdError`."""
        try:
            known = self.known_run(namespace, task_id, version)
        except (TaskNotFoundError, CorruptRecordError):
            return None
        result = self.client.txn(
            compare=self._live(namespace, task_id, version),
            success=[t.get_prefix(self.keys.task_done(namespace, task_id), keys_only=True)],
        )
        if not result.succeeded:
            return None
        finished = self.read.done_nodes(result.range(0).kvs)
        if len(finished) < known.record.node_count:
            return None
        try:
            return self._finish(namespace, task_id, version, known, finished, _new_token(), None)
        except (TaskNotFoundError, TaskNotRunningError):
            return None

    def completed_by(
        self, node_id: str, runs: Iterable[tuple[str, str, int]]
    ) -> set[tuple[str, str, int]]:
        """Which of ``runs`` ``node_id`` has completed: a read of that node's completion keys,
        64 runs to a transaction. Raises :class:`EtcdError`."""
        return {run for run, report in self.node_reports(node_id, runs).items() if report.done}

    def node_reports(
        self, node_id: str, runs: Iterable[tuple[str, str, int]]
    ) -> dict[tuple[str, str, int], NodeReport]:
        """What ``node_id`` recorded of each of ``runs``: its completion and failed attempts —
        a read of that node's own keys, 64 runs to a transaction (runs it never reported on
        are absent). Unreadable values are skipped (logged, counted). Raises
        :class:`EtcdError`."""
        wanted = list(runs)
        per_txn = t.MAX_TXN_OPS // 2
        out: dict[tuple[str, str, int], NodeReport] = {}
        for start in range(0, len(wanted), per_txn):
            batch = wanted[start : start + per_txn]
            ops = [
                op
                for ns, tid, _ in batch
                for op in (
                    t.get(self.keys.done(ns, tid, node_id)),
                    t.get(self.keys.attempt(ns, tid, node_id)),
                )
            ]
            result = self.client.txn(success=ops)
            for index, run in enumerate(batch):
                report = self._report(run, result.range(2 * index), result.range(2 * index + 1))
                if report is not None:
                    out[run] = report
        return out

    def _report(
        self, run: tuple[str, str, int], done: t.RangeResult, attempt: t.RangeResult
    ) -> NodeReport | None:
        done_kv, attempt_kv = done.first(), attempt.first()
        completed = False
        if done_kv is not None:
            try:
                completed = DoneRecord.decode(done_kv.value).version == run[2]
            except CorruptRecordError as exc:
                self._skip(done_kv.key, exc)
        failures, error, at = 0, "", None
        if attempt_kv is not None:
            try:
                record = AttemptRecord.decode(attempt_kv.value)
                failures, error, at = attempt_kv.version, record.error, record.at
            except CorruptRecordError as exc:
                self._skip(attempt_kv.key, exc)
        if not completed and not failures:
            return None
        return NodeReport(completed, failures, error, at)

    def node_lists(
        self, runs: Iterable[tuple[str, str, int]]
    ) -> dict[tuple[str, str, int], frozenset[str]]:
        """The nodes of each of ``runs`` that still exists at that version, 128 reads to a
        transaction (the version is checked with the record's). Raises :class:`EtcdError`."""
        wanted = list(runs)
        ops = [
            op
            for ns, tid, _ in wanted
            for op in (
                t.get(self.keys.task(ns, tid), keys_only=True),
                t.get(self.keys.nodes(ns, tid)),
            )
        ]
        out: dict[tuple[str, str, int], frozenset[str]] = {}
        per_txn = t.MAX_TXN_OPS // 2 * 2
        for start in range(0, len(ops), per_txn):
            batch = ops[start : start + per_txn]
            result = self.client.txn(success=batch)
            for index in range(0, len(batch), 2):
                run = wanted[(start + index) // 2]
                record_kv, nodes_kv = result.range(index).first(), result.range(index + 1).first()
                if record_kv is None or nodes_kv is None or record_kv.mod_revision != run[2]:
                    continue  # gone, replaced, or a restored terminal run
                try:
                    out[run] = NodeList.decode(nodes_kv.value).nodes
                except CorruptRecordError as exc:
                    self._skip(nodes_kv.key, exc)
        return out

    def record_node_failure(
        self, namespace: str, task_id: str, version: int, node_id: str, error: str
    ) -> Task:
        """Record that ``node_id`` failed ``version``.

        With attempts left (``attempts[node] + 1 < policy.max_attempts``) the attempt is
        counted, ``error`` kept in ``last_errors``, and the run stays as it is (the node's
        Scheduler starts it again after the backoff). The failure that uses the last attempt
        makes the run FAILED with ``error`` verbatim and ``failed_node`` set. Nodes that
        completed before stay in ``finished_nodes``. One transaction either way: etcd compares
        the node's attempt count (the version of its attempt key) and takes one branch.

        Raises :class:`TaskNotFoundError`, :class:`TaskNotRunningError`,
        :class:`InvalidTaskError` (not one of the task's nodes, ``error`` not a str, or a task
        made of units: its units fail, not its nodes), :class:`EtcdError`.
        """
        version = self._check_run_args(namespace, task_id, version, node_id)
        if not isinstance(error, str):
            raise InvalidTaskError(f"error must be a str, not {type(error).__name__}", "error")
        known = self.known_run(namespace, task_id, version, node_id)
        if known.decl is not None:
            raise InvalidTaskError(
                f"task {namespace}/{task_id} is made of units: record unit failures "
                "(record_unit_failure), not node failures",
                "task_id",
            )
        return self.fail(
            namespace,
            task_id,
            version,
            node_id,
            error,
            max_attempts=known.record.policy.max_attempts,
        )

    def fail(
        self,
        namespace: str,
        task_id: str,
        version: int,
        node_id: str,
        error: str,
        *,
        max_attempts: int = 1,
    ) -> Task:
        """:meth:`record_node_failure` for a caller that knows ``node_id`` is one of the run's
        nodes (a Scheduler); ``max_attempts=1`` fails the run at once (a lost node)."""
        message = _clip(error) or "failed"
        token = _new_token()
        outcome = OutcomeRecord(TaskStatus.FAILED, self.now(), token, message, node=node_id)
        if max_attempts <= 1:
            return self._end_run(namespace, task_id, version, outcome, node_id=node_id)
        attempt_key = self.keys.attempt(namespace, task_id, node_id)
        attempt = AttemptRecord(message, outcome.finished_at, token).encode()
        outcome_key = self.keys.outcome(namespace, task_id)
        # IF this very write is there already (a retried request) THEN nothing
        # ELSE IF attempts so far + 1 < max_attempts THEN count it ELSE count it and fail.
        count = t.nested_txn(
            compare=[t.version_less(attempt_key, max_attempts - 1)],
            success=[t.put(attempt_key, attempt)],
            failure=[t.put(attempt_key, attempt), t.put(outcome_key, outcome.encode())],
        )
        once = t.nested_txn(
            compare=[t.value_equals(attempt_key, attempt)], success=[], failure=[count]
        )
        result = self.client.txn(
            compare=self._live(namespace, task_id, version),
            success=[once, *self.read.run_ops(namespace, task_id)],
            failure=self._explain_reads(namespace, task_id, node_id),
        )
        if not result.succeeded:
            return self._explain(namespace, task_id, version, result, token, node_id)
        return self._read_back(namespace, task_id, result, "updated")

    def fail_deadline(
        self, namespace: str, task_id: str, version: int, state_revision: int, deadline: float
    ) -> Task | None:
        """Fail ``version`` for its deadline: IF still live AND its run state is still at
        ``state_revision`` (not paused or resumed since) THEN FAILED ``"deadline exceeded"``.
        Returns the run when this call ended it, None when something else came first.
        Raises :class:`EtcdError`."""
        outcome = OutcomeRecord(
            TaskStatus.FAILED, self.now(), _new_token(), f"deadline exceeded ({deadline:g}s)"
        )
        result = self.client.txn(
            compare=[
                *self._live(namespace, task_id, version),
                t.mod_equals(self.keys.state(namespace, task_id), state_revision),
            ],
            success=[
                t.put(self.keys.outcome(namespace, task_id), outcome.encode()),
                *self.read.run_ops(namespace, task_id),
            ],
        )
        if not result.succeeded:
            return None
        run = self.read.run_from(namespace, task_id, result, at=1)
        return None if run is None else run.task

    def pause_task(self, namespace: str, task_id: str, version: int) -> Task:
        """STARTED -> PAUSED: Schedulers terminate the local runs (their local state is kept);
        completions and failures recorded while PAUSED count as usual, node loss and the
        deadline's clock stop. Pausing a PAUSED run returns it unchanged.

        Raises :class:`TaskNotFoundError`, :class:`TaskNotRunningError` (terminal),
        :class:`EtcdError`.
        """
        return self._set_paused(namespace, task_id, version, paused=True)

    def resume_task(self, namespace: str, task_id: str, version: int) -> Task:
        """PAUSED -> STARTED: runs start again on every node that has not finished. Resuming
        a STARTED run returns it unchanged.

        Raises :class:`TaskNotFoundError`, :class:`TaskNotRunningError` (terminal),
        :class:`EtcdError`.
        """
        return self._set_paused(namespace, task_id, version, paused=False)

    def _set_paused(self, namespace: str, task_id: str, version: int, *, paused: bool) -> Task:
        """Read the run, then IF it is still live with that run state THEN write the new one;
        again if the state moved meanwhile (another pause or resume)."""
        version = self._check_run_args(namespace, task_id, version)
        key = self.keys.state(namespace, task_id)
        for _ in range(_RACE_ATTEMPTS):
            run = self._read_run(namespace, task_id)
            if run is None or run.task.version != version:
                raise TaskNotFoundError(namespace, task_id, version)
            if run.outcome is not None:
                raise TaskNotRunningError(namespace, task_id, version, run.outcome.status.value)
            if (run.task.status is TaskStatus.PAUSED) is paused:
                return run.task
            now = self.now()
            before = run.state
            paused_ms = 0 if before is None else before.paused_for(now)
            state = RunState(now if paused else None, paused_ms, _new_token())
            result = self.client.txn(
                compare=[
                    *self._live(namespace, task_id, version),
                    t.mod_equals(key, 0 if run.state_kv is None else run.state_kv.mod_revision),
                ],
                success=[
                    t.put(key, state.encode()),
                    *self.read.run_ops(namespace, task_id),
                    *self._pause_units(namespace, task_id, run, paused=paused),
                ],
            )
            if result.succeeded:
                changed = self.read.run_from(namespace, task_id, result, at=1)
                assert changed is not None
                return changed.task
            if result.ambiguous:
                current = self._read_run(namespace, task_id)
                now_state = None if current is None else current.state
                if current is not None and now_state is not None and now_state.token == state.token:
                    return current.task  # our write, whose response was lost
        raise EtcdError(  # pragma: no cover - a livelock against other writers
            f"could not change task {namespace}/{task_id}: it kept changing under us"
        )

    def _pause_units(self, namespace: str, task_id: str, run: Run, *, paused: bool) -> list[t.Op]:
        """For a unit task, the marker its claims compare: no unit is handed out while
        PAUSED."""
        if run.decl is None:
            return []
        marker = self.keys.units_paused(namespace, task_id)
        return [t.put(marker, b"") if paused else t.delete(marker)]

    def cancel_task(self, namespace: str, task_id: str, version: int) -> Task:
        """Cancel ``version``: STARTED -> CANCELLED. Returns the run after the call.

        Raises :class:`TaskNotFoundError`, :class:`TaskNotRunningError`, :class:`EtcdError`,
        and :class:`CorruptRecordError` when the run's stored keys cannot be read: it is
        cancelled all the same (so an unreadable run can be cleared), the error says so.
        """
        version = self._check_run_args(namespace, task_id, version)
        outcome = OutcomeRecord(TaskStatus.CANCELLED, self.now(), _new_token())
        return self._end_run(namespace, task_id, version, outcome)

    def _end_run(
        self,
        namespace: str,
        task_id: str,
        version: int,
        outcome: OutcomeRecord,
        *,
        node_id: str | None = None,
    ) -> Task:
        """One transaction: IF ``version`` is STARTED THEN write its outcome."""
        result = self.client.txn(
            compare=self._live(namespace, task_id, version),
            success=[
                t.put(self.keys.outcome(namespace, task_id), outcome.encode()),
                *self.read.run_ops(namespace, task_id),
            ],
            failure=self._explain_reads(namespace, task_id, node_id),
        )
        if not result.succeeded:
            return self._explain(namespace, task_id, version, result, outcome.token, node_id)
        return self._read_back(namespace, task_id, result, outcome.status.value)

    def _read_back(self, namespace: str, task_id: str, result: t.TxnResult, what: str) -> Task:
        """The run a successful transition read back after its write (at index 1). A run whose
        stored keys cannot be read ends all the same (that is how an operator clears one):
        then :class:`CorruptRecordError` says the transition was applied."""
        try:
            run = self.read.run_from(namespace, task_id, result, at=1)
        except CorruptRecordError as exc:
            raise CorruptRecordError(
                f"task {namespace}/{task_id} is now {what}, but it cannot be read back: {exc}",
                exc.key,
            ) from None
        assert run is not None
        return run.task

    # ---- progress -------------------------------------------------------------------------

    def record_progress(
        self,
        namespace: str,
        task_id: str,
        version: int,
        node_id: str,
        fraction: float,
        message: str = "",
    ) -> None:
        """Store ``node_id``'s latest progress on a STARTED run (one round trip).

        ``fraction`` is clamped to [0, 1]. No Scheduler watches progress: it reaches only
        :meth:`get_progress`, ``dtask wait`` and whoever watches the run's progress keys.
        Raises :class:`InvalidTaskError` (bad arguments, or not one of the task's nodes),
        :class:`TaskNotFoundError`, :class:`TaskNotRunningError`, :class:`EtcdError`.
        """
        version = self._check_run_args(namespace, task_id, version, node_id)
        _check_progress(fraction, message)
        self.known_run(namespace, task_id, version, node_id)
        self.progress(namespace, task_id, version, node_id, fraction, message)

    def progress(
        self,
        namespace: str,
        task_id: str,
        version: int,
        node_id: str,
        fraction: float,
        message: str,
    ) -> None:
        """:meth:`record_progress` for a caller that knows ``node_id`` is one of the run's
        nodes (a Scheduler's recorder)."""
        _check_progress(fraction, message)
        progress = Progress(min(1.0, max(0.0, float(fraction))), _clip(message), self.now())
        result = self.client.txn(
            compare=self._live(namespace, task_id, version),
            success=[
                t.put(
                    self.keys.progress(namespace, task_id, version, node_id),
                    encode_progress(progress),
                )
            ],
            failure=self._explain_reads(namespace, task_id, node_id),
        )
        if not result.succeeded:
            self._explain(namespace, task_id, version, result, "", node_id)

    def get_progress(self, namespace: str, task_id: str, version: int) -> dict[str, Progress]:
        """The latest progress each node reported for ``version`` (nodes that never reported
        are absent). Raises :class:`InvalidTaskError`, :class:`EtcdError`."""
        version = self._check_run_args(namespace, task_id, version)
        result = self._read([t.get_prefix(self.keys.version_progress(namespace, task_id, version))])
        return self.progress_from(result.range(0).kvs)

    def progress_from(self, kvs: Iterable[t.KeyValue]) -> dict[str, Progress]:
        """Progress by node from progress key-values (others are ignored, unreadable skipped)."""
        out: dict[str, Progress] = {}
        for kv in kvs:
            parsed = self.keys.parse(kv.key)
            if not isinstance(parsed, ProgressKey):
                continue
            try:
                out[parsed.node_id] = decode_progress(kv.value)
            except CorruptRecordError as exc:
                self._skip(kv.key, exc)
        return out

    # ---- units ----------------------------------------------------------------------------

    def _unit_run(
        self, namespace: str, task_id: str, version: object, node_id: str, unit_id: str | None
    ) -> tuple[int, KnownRun]:
        version = self._check_run_args(namespace, task_id, version, node_id)
        if unit_id is not None:
            validate_name(unit_id, "unit_id")
        known = self.known_run(namespace, task_id, version, node_id)
        if known.decl is None:
            raise InvalidTaskError(f"task {namespace}/{task_id} has no units", "task_id")
        if unit_id is not None and unit_id not in known.decl.by_id:
            raise InvalidTaskError(f"task {namespace}/{task_id} has no unit {unit_id!r}", "unit_id")
        return version, known

    def claim_unit(self, namespace: str, task_id: str, version: int, node_id: str) -> Unit | None:
        """Claim for ``node_id`` one PENDING unit it may take (no affinity, or affinity to it)
        and return it IN_PROGRESS under its name; None when nothing is claimable now (every
        unit it could take is claimed, or waits for its retry backoff). Two claimants of one
        unit: one wins. Units are handed out in declaration order (see units.py) — first those
        with affinity to ``node_id``, then the others — and then units given back to the pool
        (a retry after its backoff, a lost node's unit). Three round trips a unit with its
        completion: a ticket (which also reads the pool), the claim, the completion.

        Raises :class:`InvalidTaskError` (``node_id`` not one of the task's nodes, or not a
        unit task; nothing written), :class:`TaskNotFoundError`, :class:`TaskNotRunningError`,
        :class:`EtcdError`.
        """
        version, known = self._unit_run(namespace, task_id, version, node_id, None)
        claim = self.units.claim(namespace, task_id, version, node_id, known)
        return None if claim is None else claim.unit(node_id)

    def record_unit_completion(
        self, namespace: str, task_id: str, version: int, unit_id: str, node_id: str
    ) -> Task:
        """Record that ``node_id``, the unit's claimant, completed ``unit_id``; the run is
        FINISHED, in the same transaction, when it was the last unit. Recording the same
        completion again is a no-op. Returns the run after the call.

        Raises :class:`UnitClaimError` (``node_id`` does not hold the unit; nothing written),
        :class:`InvalidTaskError`, :class:`TaskNotFoundError`, :class:`TaskNotRunningError`,
        :class:`EtcdError`.
        """
        version, known = self._unit_run(namespace, task_id, version, node_id, unit_id)
        return self.units.complete(namespace, task_id, version, unit_id, node_id, known)

    def record_unit_failure(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        node_id: str,
        error: str,
    ) -> Task:
        """Record a failed attempt of ``unit_id`` by its claimant ``node_id``. With attempts
        left (``policy.max_attempts``, per unit) the unit goes back to PENDING, claimable by
        any eligible node after ``policy.backoff``; the last attempt makes the unit FAILED and
        the run FAILED with ``error`` verbatim, ``failed_node`` and ``failed_unit``. Returns
        the run after the call.

        Raises :class:`UnitClaimError`, :class:`InvalidTaskError` (also for an ``error``
        that is not a str), :class:`TaskNotFoundError`, :class:`TaskNotRunningError`,
        :class:`EtcdError`.
        """
        if not isinstance(error, str):
            raise InvalidTaskError(f"error must be a str, not {type(error).__name__}", "error")
        version, known = self._unit_run(namespace, task_id, version, node_id, unit_id)
        return self.units.fail(namespace, task_id, version, unit_id, node_id, _clip(error), known)

    def record_unit_progress(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        node_id: str,
        fraction: float,
        message: str = "",
    ) -> None:
        """Store the latest progress of ``unit_id`` (one round trip; ``fraction`` clamped to
        [0, 1]). No Scheduler watches it: :meth:`get_units`, ``dtask units`` and the console
        read it.

        Raises :class:`InvalidTaskError`, :class:`TaskNotFoundError`,
        :class:`TaskNotRunningError`, :class:`EtcdError`.
        """
        _check_progress(fraction, message)
        version, _ = self._unit_run(namespace, task_id, version, node_id, unit_id)
        progress = Progress(min(1.0, max(0.0, float(fraction))), _clip(message), self.now())
        self.units.progress(namespace, task_id, version, unit_id, node_id, progress)

    def units_completed(self, tasks: Iterable[Task]) -> dict[tuple[str, str], int]:
        """How many units each unit task of ``tasks`` has COMPLETED, by ``(namespace, id)``
        (plain tasks are left out): a FINISHED run has completed them all (no read); the
        others' counts are the etcd versions of their completion counters, read keys only,
        128 to a transaction. Raises :class:`EtcdError`, :class:`StorageFormatError`."""
        out: dict[tuple[str, str], int] = {}
        unread = []
        for task in tasks:
            if not task.units:
                continue
            if task.status is TaskStatus.FINISHED:
                out[task.namespace, task.id] = len(task.units)
            else:
                unread.append(task)
        per_txn = t.MAX_TXN_OPS - len(self.read.format_ops())
        for start in range(0, len(unread), per_txn):
            batch = unread[start : start + per_txn]
            result = self._read(
                [t.get(self.keys.units_completed(u.namespace, u.id), keys_only=True) for u in batch]
            )
            for index, task in enumerate(batch):
                kv = result.range(index).first()
                # clamped: the run may have been replaced since it was listed
                out[task.namespace, task.id] = min(len(task.units), 0 if kv is None else kv.version)
        return out

    def get_units(self, namespace: str, task_id: str, version: int) -> dict[str, Unit]:
        """Every unit of ``version``, in declaration order, read at one revision: status,
        claimant, failed attempts, latest error and progress.

        Raises :class:`InvalidTaskError` (bad arguments, or not a unit task),
        :class:`TaskNotFoundError`, :class:`StorageFormatError`, :class:`EtcdError`.
        """
        version = self._check_run_args(namespace, task_id, version)
        return self.units.get_units(namespace, task_id, version)

    # ---- clean-up -------------------------------------------------------------------------

    def clean_up_task(
        self, namespace: str, task_id: str, version: int, *, ttl: timedelta | None = None
    ) -> None:
        """Remove the terminal run ``version`` from the cluster (two round trips).

        ``ttl`` overrides ``completed_task_ttl`` for this call (a Scheduler passes its own).
        Raises :class:`TaskNotFoundError` (no such id or another version),
        :class:`TaskStillRunningError`, :class:`TaskTooFreshError` (``now - finished_at <=
        ttl``), :class:`EtcdError`.
        """
        version = self._check_run_args(namespace, task_id, version)
        ttl = self.completed_task_ttl if ttl is None else ttl
        key = self.keys.task(namespace, task_id)
        run = self._read_run(namespace, task_id)
        if run is None or run.task.version != version:
            raise TaskNotFoundError(namespace, task_id, version)
        if run.outcome is None:
            raise TaskStillRunningError(namespace, task_id, version)
        if self.now() - run.outcome.finished_at <= ttl:
            raise TaskTooFreshError(namespace, task_id, version, ttl.total_seconds())
        result = self.client.txn(
            compare=[
                t.mod_equals(key, run.record_kv.mod_revision),
                t.exists(self.keys.outcome(namespace, task_id)),
            ],
            success=self._delete_run_ops(namespace, task_id),
            failure=[t.get(key)],
        )
        if result.succeeded:
            return
        current = result.range(0).first()
        if current is None and result.ambiguous:
            return  # our earlier attempt deleted it; its response was lost
        raise TaskNotFoundError(namespace, task_id, version)

    # ---- waiting --------------------------------------------------------------------------

    def wait_for_task(
        self, namespace: str, task_id: str, version: int, timeout: float | None = None
    ) -> Task:
        """Block until ``version`` is terminal and return it; follows an etcd watch.

        Raises :class:`TaskNotFoundError` if that version does not exist or is removed or
        replaced before it ends, :class:`TimeoutError` after ``timeout`` seconds,
        :class:`EtcdError` if etcd cannot be reached to start watching.
        """
        version = self._check_run_args(namespace, task_id, version)
        with RunFollower(self, namespace, task_id, version) as follower:
            follower.wait(timeout)
        task = self.get_task(namespace, task_id)
        if task is None or task.version != version or not task.status.terminal:
            raise TaskNotFoundError(namespace, task_id, version)
        return task

    # ---- snapshot / restore ---------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Every task, in the JSON of :meth:`list_tasks_payload`. Raises :class:`EtcdError`."""
        return self.list_tasks_payload()

    def restore(self, data: bytes | str) -> None:
        """Replace every task under the prefix with those of a :meth:`snapshot`.

        The document is checked whole before anything is written (:class:`InvalidTaskError`).
        Terminal runs keep their version; a STARTED run gets a new one (versions are revisions
        of the etcd the run lives in), keeping its nodes, finished nodes and start time (a
        unit task keeps its declared units; the state of each unit is not in a snapshot, so a
        restored STARTED unit task runs its units again from PENDING). Not
        atomic across tasks (each run is its own transactions): run it while no Scheduler
        serves the prefix. Raises :class:`InvalidTaskError`, :class:`StorageFormatError`,
        :class:`EtcdError`.
        """
        tasks = tasks_from_payload(data)
        for task in tasks:
            validate_name(task.namespace, "namespace")
            if task.status.terminal and task.finished_at is None:
                raise InvalidTaskError(
                    f"task {task.namespace}/{task.id} is {task.status.value} without finishedAt",
                    "data",
                )
        self.ensure_format()
        keys = self.keys
        self.client.txn(
            success=[
                t.delete_prefix(prefix)
                for prefix in (
                    keys.all_tasks(),
                    keys.all_outcomes(),
                    keys.all_nodes(),
                    keys.all_assignments(),
                    keys.all_done(),
                    keys.all_progress(),
                    keys.all_unit_decls(),
                    keys.all_unit_runs(),
                    keys.all_pool(),
                    keys.all_groups(),
                )
            ]
        )
        for task in tasks:
            self._restore_one(task)

    def _restore_one(self, task: Task) -> None:
        token = _new_token()
        status, finished_at = task.status, task.finished_at
        if not status.terminal and task.finished_nodes >= task.nodes:
            status, finished_at = TaskStatus.FINISHED, self.now()  # it had just finished
        outcome = None
        if status.terminal:
            assert finished_at is not None
            outcome = OutcomeRecord(
                status, finished_at, token, task.error, task.failed_node, task.failed_unit
            )
        record = TaskRecord(
            payload=task.payload,
            started_at=task.started_at,
            node_count=len(task.nodes),
            token=token,
            version=task.version if status.terminal else None,
            policy=task.policy,
            unit_count=len(task.units),
        )
        decl = UnitDecl(task.units) if task.units else None
        created = self._create(task.namespace, task.id, record, task.nodes, outcome, decl=decl)
        keys, ns, tid = self.keys, task.namespace, task.id
        if status is TaskStatus.PAUSED:
            state = RunState(self.now(), 0, token)
            marker = [t.put(keys.units_paused(ns, tid), b"")] if task.units else []
            self.client.txn(success=[t.put(keys.state(ns, tid), state.encode()), *marker])
        # An attempt count is the version of its key: one write per failed attempt.
        for count in range(1, max(task.attempts.values(), default=0) + 1):
            writes = [
                t.put(
                    keys.attempt(ns, tid, node),
                    AttemptRecord(task.last_errors.get(node, ""), self.now(), token).encode(),
                )
                for node in sorted(task.attempts)
                if task.attempts[node] >= count
            ]
            for batch in _batches(writes):
                self.client.txn(success=list(batch))
        done = [
            t.put(
                self.keys.done(task.namespace, task.id, node),
                DoneRecord(created.version, record.started_at, token).encode(),
            )
            for node in sorted(task.finished_nodes)
        ]
        for batch in _batches(done):
            self.client.txn(success=list(batch))
