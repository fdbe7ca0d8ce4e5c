"""``Manager``: every state transition of a task, each an etcd compare-and-swap transaction.

A run is stored as (keys.py has the schema): the task record (written once when the run is
added, never rewritten while it exists, so its ``mod_revision`` *is* the version), one run key
per assigned node (pending / completed), and the outcome key, which exists once the run has
ended. "Version V is STARTED" is therefore two compares, ``mod(task) == V`` and
``create(outcome) == 0``, and every transition is one transaction guarded by them::

    add (new id)      IF create(task) == 0 THEN put record + a pending key per node      1 trip
                      ELSE range record
    add (over a       the above; then IF mod(task) == observed THEN delete the old run;  3 trips
     terminal run)    then the create again (watchers see the old run go, the new come)
    complete          IF started(V) AND exists(runs/node) THEN put runs/node,            1 trip
                        and, nested: IF no other run key has mod == V (none pending)
                                     THEN put outcome FINISHED
                      ELSE range record, outcome, runs/
    fail              IF started(V) AND exists(runs/node) THEN put outcome FAILED (node) 1 trip
    cancel            IF started(V) THEN put outcome CANCELLED                           1 trip
    clean up          range record + outcome; IF mod(task) == observed AND               2 trips
                      exists(outcome) THEN delete the run's keys

A pending run key is written in the transaction that adds the run, so its ``mod_revision`` is
the version; a completion rewrites it. The completion that leaves no key pending writes FINISHED
in the same transaction (a nested one, etcd >= 3.3, whose compares see the state before the
outer writes): the last completion and a racing cancel are decided by etcd, one of them wins.
A failure does not touch the run keys, so nodes that completed stay in ``finished_nodes``.

This deviates from DESIGN.md, which rewrote the task record with the terminal state (that needs
the record's fields, a payload of up to 1 MiB, in hand: a cancel or a failure would have cost a
read first, or written the payload again) and finished a task in a second transaction (which
leaves a window where every node has completed but the run is still STARTED, and a cancel in
it wins against a completion already recorded). Here every transition is one round trip that
writes a few hundred bytes, and etcd itself refuses a node that was not assigned (its run key
does not exist). On a failed compare the failure branch reads what is
needed to say why (``does not exist``, ``no longer running``, not an assigned node).

Retries: :class:`~distributedtask.etcd.client.EtcdClient` retries transient failures, so a
request may be applied although its response was lost. Every value a call writes carries that
call's random ``token``; a call that finds its own token recognises its earlier write and
succeeds. Deletes carry no token: a clean-up that finds the run gone after an ambiguous attempt
succeeds.

Threading: a Manager holds no state but its configuration; share it freely between threads.
Every method raises :class:`~distributedtask.exceptions.EtcdError` when etcd cannot answer
within the client's timeout, and :class:`~distributedtask.exceptions.InvalidTaskError`
(nothing written) for bad arguments.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone

from .etcd import txn as t
from .etcd.client import EtcdClient
from .etcd.watch import Changes, ResumableWatch, Snapshot
from .exceptions import (
    EtcdError,
    InvalidTaskError,
    NoEligibleNodesError,
    TaskAlreadyRunningError,
    TaskNotFoundError,
    TaskNotRunningError,
    TaskStillRunningError,
    TaskTooFreshError,
)
from .keys import Keys, MemberKey, OutcomeKey, ProgressKey, RunKey, TaskKey, prefix_range_end
from .model import (
    Progress,
    Task,
    TaskStatus,
    tasks_from_payload,
    tasks_to_payload,
    truncate_ms,
    validate_name,
)
from .records import (
    COMPLETED,
    PENDING,
    CorruptRecordError,
    MemberRecord,
    OutcomeRecord,
    RunRecord,
    TaskRecord,
    decode_progress,
    encode_progress,
    run_completed,
)

__all__ = ["Manager"]

log = logging.getLogger("distributedtask.manager")

MAX_NODES = t.MAX_TXN_OPS - 1
"""The most nodes a task may have: the add transaction writes the record and one key a node."""

MAX_MESSAGE_CHARS = 4096
"""Error and progress messages are cut to this many characters."""

_RACE_ATTEMPTS = 16


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _new_token() -> str:
    return secrets.token_hex(8)


def _clip(text: str) -> str:
    """A message fit to store: lone surrogates (undecodable file names, say) replaced, and
    cut to ``MAX_MESSAGE_CHARS``."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


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
        self.prefix = self.keys.prefix
        self.completed_task_ttl = completed_task_ttl
        self.max_payload_bytes = max_payload_bytes
        self._clock = clock or _utcnow
        self.skipped_records = 0  # corrupt or foreign values met while reading (logged)
        self._skip_lock = threading.Lock()

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
        if len(result) > MAX_NODES:
            raise InvalidTaskError(
                f"a task may have at most {MAX_NODES} nodes, not {len(result)}", "nodes"
            )
        return result

    @staticmethod
    def _version(version: object) -> int:
        if not isinstance(version, int) or isinstance(version, bool) or version <= 0:
            raise InvalidTaskError(f"version must be a positive int, not {version!r}", "version")
        return version

    def _skip(self, key: bytes, exc: Exception) -> None:
        with self._skip_lock:
            self.skipped_records += 1
        log.warning("skipping unreadable value under %s: %s (key %r)", self.prefix, exc, key)

    # ---- reading --------------------------------------------------------------------------

    def _finished(
        self, runs: Mapping[str, t.KeyValue], on_skip: Callable[[bytes, Exception], None]
    ) -> set[str]:
        done = set()
        for node, kv in runs.items():
            try:
                if run_completed(kv.value):
                    done.add(node)
            except CorruptRecordError as exc:
                on_skip(kv.key, exc)
        return done

    def runs_by_node(self, kvs: Iterable[t.KeyValue]) -> dict[str, t.KeyValue]:
        """The run keys of one task, by node id (keys that are not run keys are ignored)."""
        out = {}
        for kv in kvs:
            parsed = self.keys.parse(kv.key)
            if isinstance(parsed, RunKey):
                out[parsed.node_id] = kv
        return out

    def assemble(
        self,
        namespace: str,
        task_id: str,
        kv: t.KeyValue,
        outcome_kv: t.KeyValue | None,
        runs: Mapping[str, t.KeyValue],
        *,
        on_skip: Callable[[bytes, Exception], None] | None = None,
    ) -> tuple[TaskRecord, OutcomeRecord | None, Task]:
        """Decode a run from its keys: the record, the outcome (if any) and the run keys by
        node (for views built from a watch). An unreadable run key is reported to ``on_skip``
        (default: logged and counted in ``skipped_records``) and read as pending. Raises
        ``CorruptRecordError`` for an unreadable record or outcome."""
        record = TaskRecord.decode(kv.value)
        outcome = None if outcome_kv is None else OutcomeRecord.decode(outcome_kv.value)
        finished = self._finished(runs, on_skip or self._skip)
        task = record.to_task(namespace, task_id, kv.mod_revision, finished, outcome)
        return record, outcome, task

    def _reads(self, namespace: str, task_id: str) -> list[t.Op]:
        """``[range record, range outcome, range runs/]`` of one id."""
        return [
            t.get(self.keys.task(namespace, task_id)),
            t.get(self.keys.outcome(namespace, task_id)),
            t.get_prefix(self.keys.task_runs(namespace, task_id)),
        ]

    def _from_reads(
        self, namespace: str, task_id: str, result: t.TxnResult, at: int = 0
    ) -> tuple[t.KeyValue, OutcomeRecord | None, Task] | None:
        """The run read by :meth:`_reads` placed at ``at`` in a transaction's responses."""
        kv = result.range(at).first()
        if kv is None:
            return None
        runs = self.runs_by_node(result.range(at + 2).kvs)
        _, outcome, task = self.assemble(namespace, task_id, kv, result.range(at + 1).first(), runs)
        return kv, outcome, task

    def get_task(self, namespace: str, task_id: str) -> Task | None:
        """The current run of ``(namespace, task_id)``, or ``None``. One round trip.

        Raises :class:`InvalidTaskError`, :class:`EtcdError`, and ``CorruptRecordError`` (a
        :class:`DistributedTaskError`) if the stored record cannot be read.
        """
        validate_name(namespace, "namespace")
        validate_name(task_id, "task_id")
        found = self._from_reads(
            namespace, task_id, self.client.txn(success=self._reads(namespace, task_id))
        )
        return None if found is None else found[2]

    def list_ranges(self) -> list[tuple[bytes, bytes]]:
        """The key ranges that hold every task: records, outcomes and run keys."""
        return [
            (prefix, prefix_range_end(prefix))
            for prefix in (self.keys.all_tasks(), self.keys.all_outcomes(), self.keys.all_runs())
        ]

    def list_tasks(self) -> dict[str, list[Task]]:
        """Every task, by namespace, each list sorted by id; read at one etcd revision.

        Values that cannot be read (corrupt, foreign, newer format) are skipped with a log
        line and counted in ``skipped_records``. Raises :class:`EtcdError`.
        """
        result = self.client.txn(success=[t.get(a, b) for a, b in self.list_ranges()])
        return self.tasks_from_kvs(
            [*result.range(0).kvs, *result.range(1).kvs, *result.range(2).kvs]
        )

    def tasks_from_kvs(self, kvs: Iterable[t.KeyValue]) -> dict[str, list[Task]]:
        """Assemble tasks from the keys of :meth:`list_ranges` (e.g. a watch snapshot).

        Unreadable values are skipped (logged, counted). Returns tasks by namespace, sorted.
        """
        records: dict[tuple[str, str], t.KeyValue] = {}
        outcomes: dict[tuple[str, str], t.KeyValue] = {}
        runs: dict[tuple[str, str], dict[str, t.KeyValue]] = {}
        for kv in kvs:
            parsed = self.keys.parse(kv.key)
            if isinstance(parsed, TaskKey):
                records[(parsed.namespace, parsed.task_id)] = kv
            elif isinstance(parsed, OutcomeKey):
                outcomes[(parsed.namespace, parsed.task_id)] = kv
            elif isinstance(parsed, RunKey):
                runs.setdefault((parsed.namespace, parsed.task_id), {})[parsed.node_id] = kv
            elif parsed is None:
                self._skip(kv.key, CorruptRecordError("not a key of ours"))
        out: dict[str, list[Task]] = {}
        for (ns, tid), kv in records.items():
            try:
                _, _, task = self.assemble(
                    ns, tid, kv, outcomes.get((ns, tid)), runs.get((ns, tid), {})
                )
            except CorruptRecordError as exc:
                self._skip(kv.key, exc)
                continue
            out.setdefault(ns, []).append(task)
        for tasks in out.values():
            tasks.sort(key=lambda task: task.id)
        return out

    def list_tasks_payload(self) -> bytes:
        """``{"tasks": {namespace: [task JSON, ...]}}`` (see API.md). Raises :class:`EtcdError`."""
        return tasks_to_payload(self.list_tasks())

    def live_members(self) -> list[MemberRecord]:
        """The membership records of the live Schedulers, sorted by node id.

        Raises :class:`EtcdError`.
        """
        members_prefix = self.keys.all_members()
        result = self.client.range(members_prefix, prefix_range_end(members_prefix))
        members = []
        for kv in result.kvs:
            parsed = self.keys.parse(kv.key)
            try:
                member = MemberRecord.decode(kv.value)
                if not isinstance(parsed, MemberKey) or parsed.node_id != member.node_id:
                    raise CorruptRecordError("a member record under another node's key")
            except CorruptRecordError as exc:
                self._skip(kv.key, exc)
                continue
            members.append(member)
        return sorted(members, key=lambda m: m.node_id)

    # ---- adding ---------------------------------------------------------------------------

    def add_task(
        self,
        namespace: str,
        task_id: str,
        payload: bytes = b"",
        *,
        nodes: Iterable[str] | None = None,
    ) -> Task:
        """Add a new STARTED run of ``(namespace, task_id)`` and return it.

        ``nodes=None`` assigns the run to the nodes whose live Scheduler serves ``namespace``
        now. A terminal run of the same id is replaced, with a higher version.

        Raises :class:`InvalidTaskError` (nothing written), :class:`NoEligibleNodesError`,
        :class:`TaskAlreadyRunningError`, :class:`EtcdError`.
        """
        validate_name(namespace, "namespace")
        validate_name(task_id, "task_id")
        data = self._payload(payload)
        if nodes is None:
            eligible = {m.node_id for m in self.live_members() if namespace in m.namespaces}
            if not eligible:
                raise NoEligibleNodesError(namespace)
            assigned = self._nodes(eligible)
        else:
            assigned = self._nodes(nodes)
        record = TaskRecord(payload=data, started_at=self.now(), nodes=assigned, token=_new_token())
        return self._create(namespace, task_id, record)

    def _create(
        self,
        namespace: str,
        task_id: str,
        record: TaskRecord,
        outcome: OutcomeRecord | None = None,
    ) -> Task:
        """Write a run — the record, a pending key per node, and ``outcome`` if given —
        replacing a terminal (or unreadable) one, and return it. See :meth:`add_task`."""
        key = self.keys.task(namespace, task_id)
        outcome_key = self.keys.outcome(namespace, task_id)
        pending = RunRecord(PENDING, record.started_at, record.token).encode()
        writes = [t.put(key, record.encode())]
        writes += [
            t.put(self.keys.run(namespace, task_id, n), pending) for n in sorted(record.nodes)
        ]
        if outcome is not None:
            writes.append(t.put(outcome_key, outcome.encode()))
        for _ in range(_RACE_ATTEMPTS):
            result = self.client.txn(
                compare=[t.create_equals(key, 0)],
                success=writes,
                failure=[t.get(key), t.get(outcome_key)],
            )
            if result.succeeded:
                return record.to_task(namespace, task_id, result.revision, (), outcome)
            kv = result.range(0).first()
            if kv is None:
                continue  # removed meanwhile: create again
            outcome_kv = result.range(1).first()
            guard = [t.mod_equals(key, kv.mod_revision)]
            try:
                existing = TaskRecord.decode(kv.value)
            except CorruptRecordError as exc:  # unreadable: it must not block the id forever
                self._skip(kv.key, exc)
                log.warning("replacing the unreadable record of %s/%s", namespace, task_id)
            else:
                if existing.token == record.token:  # our own write, whose response was lost
                    return existing.to_task(namespace, task_id, kv.mod_revision, (), outcome)
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
        return [
            t.delete(self.keys.task(namespace, task_id)),
            t.delete(self.keys.outcome(namespace, task_id)),
            t.delete_prefix(self.keys.task_runs(namespace, task_id)),
            t.delete_prefix(self.keys.task_progress(namespace, task_id)),
        ]

    # ---- transitions of a running version -------------------------------------------------

    def _started(self, namespace: str, task_id: str, version: int) -> list[t.Compare]:
        """Compares that hold exactly while ``version`` is the current, STARTED run."""
        return [
            t.mod_equals(self.keys.task(namespace, task_id), version),
            t.create_equals(self.keys.outcome(namespace, task_id), 0),
        ]

    def _check_run_args(
        self, namespace: str, task_id: str, version: object, node_id: str | None = None
    ) -> int:
        validate_name(namespace, "namespace")
        validate_name(task_id, "task_id")
        if node_id is not None:
            validate_name(node_id, "node_id")
        return self._version(version)

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

        The failure branch must be :meth:`_reads`.
        """
        found = self._from_reads(namespace, task_id, result)
        if found is None or found[2].version != version:
            raise TaskNotFoundError(namespace, task_id, version)
        _, outcome, task = found
        if outcome is None:  # STARTED at that version: the node's run key is missing
            raise InvalidTaskError(
                f"node {node_id!r} is not one of the nodes of task {namespace}/{task_id} "
                f"version {version}",
                "node_id",
            )
        if outcome.token == token:
            return task
        if node_id is not None and outcome.status is TaskStatus.FINISHED:
            for kv in result.range(2).kvs:
                parsed = self.keys.parse(kv.key)
                if isinstance(parsed, RunKey) and parsed.node_id == node_id:
                    try:
                        if RunRecord.decode(kv.value).token == token:
                            return task  # our completion counted; another node finished it
                    except CorruptRecordError:
                        pass
        raise TaskNotRunningError(namespace, task_id, version, outcome.status.value)

    def record_node_completion(
        self, namespace: str, task_id: str, version: int, node_id: str
    ) -> Task:
        """Record that ``node_id`` finished ``version``; FINISHED once every node has.

        One transaction, also for the completion that finishes the run: a nested transaction
        writes the FINISHED outcome when no other node's run key is still pending. Idempotent
        for a node while the run is STARTED. Returns the run after the call.
        Raises :class:`TaskNotFoundError` (no such id or another version),
        :class:`TaskNotRunningError` (that version is terminal), :class:`InvalidTaskError`
        (``node_id`` is not one of the task's nodes; nothing written), :class:`EtcdError`.
        """
        version = self._check_run_args(namespace, task_id, version, node_id)
        token = _new_token()
        run_key = self.keys.run(namespace, task_id, node_id)
        runs = self.keys.task_runs(namespace, task_id)
        now = self.now()
        finished = OutcomeRecord(TaskStatus.FINISHED, now, token)
        # A pending run key was written with the record, so its mod_revision is the version;
        # a completed one was rewritten later. "Every other node completed" is therefore
        # "no other run key has mod_revision == version", which also holds for no keys at all.
        last = t.nested_txn(
            compare=[
                t.mod_not_equal(runs, version, range_end=run_key),
                t.mod_not_equal(run_key + b"\0", version, range_end=prefix_range_end(runs)),
            ],
            success=[t.put(self.keys.outcome(namespace, task_id), finished.encode())],
        )
        reads = self._reads(namespace, task_id)
        result = self.client.txn(
            compare=[*self._started(namespace, task_id, version), t.exists(run_key)],
            success=[t.put(run_key, RunRecord(COMPLETED, now, token).encode()), last, *reads],
            failure=reads,
        )
        if not result.succeeded:
            return self._explain(namespace, task_id, version, result, token, node_id)
        found = self._from_reads(namespace, task_id, result, at=2)
        assert found is not None
        return found[2]

    def record_node_failure(
        self, namespace: str, task_id: str, version: int, node_id: str, error: str
    ) -> Task:
        """Record that ``node_id`` failed ``version``: the run becomes FAILED with ``error``,
        prefixed with the node id (``"node-b: disk full"``). Nodes that completed before stay
        in ``finished_nodes``.

        Raises :class:`TaskNotFoundError`, :class:`TaskNotRunningError`,
        :class:`InvalidTaskError` (not one of the task's nodes, or ``error`` not a str),
        :class:`EtcdError`.
        """
        version = self._check_run_args(namespace, task_id, version, node_id)
        if not isinstance(error, str):
            raise InvalidTaskError(f"error must be a str, not {type(error).__name__}", "error")
        message = _clip(error) or "failed"
        outcome = OutcomeRecord(
            TaskStatus.FAILED, self.now(), _new_token(), f"{node_id}: {message}", node=node_id
        )
        run_key = self.keys.run(namespace, task_id, node_id)
        return self._end_run(
            namespace,
            task_id,
            version,
            outcome,
            extra_compare=[t.exists(run_key)],
            node_id=node_id,
        )

    def cancel_task(self, namespace: str, task_id: str, version: int) -> Task:
        """Cancel ``version``: STARTED -> CANCELLED. Returns the run after the call.

        Raises :class:`TaskNotFoundError`, :class:`TaskNotRunningError`, :class:`EtcdError`.
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
        extra_compare: Iterable[t.Compare] = (),
        node_id: str | None = None,
    ) -> Task:
        """One transaction: IF ``version`` is STARTED THEN write its outcome."""
        reads = self._reads(namespace, task_id)
        result = self.client.txn(
            compare=[*self._started(namespace, task_id, version), *extra_compare],
            success=[t.put(self.keys.outcome(namespace, task_id), outcome.encode()), *reads],
            failure=reads,
        )
        if not result.succeeded:
            return self._explain(namespace, task_id, version, result, outcome.token, node_id)
        found = self._from_reads(namespace, task_id, result, at=1)
        assert found is not None
        return found[2]

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

        ``fraction`` is clamped to [0, 1]. Raises :class:`InvalidTaskError` (bad arguments, or
        not one of the task's nodes), :class:`TaskNotFoundError`,
        :class:`TaskNotRunningError`, :class:`EtcdError`.
        """
        version = self._check_run_args(namespace, task_id, version, node_id)
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or math.isnan(fraction)
        ):
            raise InvalidTaskError(f"fraction must be a number, not {fraction!r}", "fraction")
        if not isinstance(message, str):
            raise InvalidTaskError("message must be a str", "message")
        progress = Progress(min(1.0, max(0.0, float(fraction))), _clip(message), self.now())
        reads = self._reads(namespace, task_id)
        result = self.client.txn(
            compare=[
                *self._started(namespace, task_id, version),
                t.exists(self.keys.run(namespace, task_id, node_id)),
            ],
            success=[
                t.put(
                    self.keys.progress(namespace, task_id, version, node_id),
                    encode_progress(progress),
                )
            ],
            failure=reads,
        )
        if not result.succeeded:
            self._explain(namespace, task_id, version, result, "", node_id)

    def get_progress(self, namespace: str, task_id: str, version: int) -> dict[str, Progress]:
        """The latest progress each node reported for ``version`` (nodes that never reported
        are absent). Raises :class:`InvalidTaskError`, :class:`EtcdError`."""
        version = self._check_run_args(namespace, task_id, version)
        prefix = self.keys.version_progress(namespace, task_id, version)
        out: dict[str, Progress] = {}
        for kv in self.client.range(prefix, prefix_range_end(prefix)).kvs:
            parsed = self.keys.parse(kv.key)
            if not isinstance(parsed, ProgressKey):
                continue
            try:
                out[parsed.node_id] = decode_progress(kv.value)
            except CorruptRecordError as exc:
                self._skip(kv.key, exc)
        return out

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
        outcome_key = self.keys.outcome(namespace, task_id)
        found = self._from_reads(
            namespace, task_id, self.client.txn(success=self._reads(namespace, task_id))
        )
        if found is None or found[2].version != version:
            raise TaskNotFoundError(namespace, task_id, version)
        kv, outcome, _ = found
        if outcome is None:
            raise TaskStillRunningError(namespace, task_id, version)
        if self.now() - outcome.finished_at <= ttl:
            raise TaskTooFreshError(namespace, task_id, version, ttl.total_seconds())
        result = self.client.txn(
            compare=[
                t.mod_equals(key, kv.mod_revision),
                t.exists(outcome_key),
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
        key = self.keys.task(namespace, task_id)
        outcome_key = self.keys.outcome(namespace, task_id)
        state: dict[bytes, t.KeyValue] = {}
        done = threading.Event()

        def handle(batch: Snapshot | Changes) -> None:
            # A run can only be replaced or removed after it ended, and an end is the put of
            # its outcome key: the snapshot (record + outcome) and that one key's events tell
            # everything. After a compaction the watch delivers a fresh snapshot.
            if isinstance(batch, Snapshot):
                state.clear()
                state.update({kv.key: kv for kv in batch.kvs})
                record_kv = state.get(key)
                if (
                    record_kv is None
                    or outcome_key in state
                    or TaskRecord.decode(record_kv.value).version_at(record_kv.mod_revision)
                    != version
                ):
                    done.set()
            elif batch.events:
                done.set()

        watch = ResumableWatch(
            self.client,
            outcome_key,
            outcome_key + b"\0",
            handle,
            list_ranges=[(key, key + b"\0"), (outcome_key, outcome_key + b"\0")],
            name="distributedtask-wait",
        )
        watch.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # In slices, so a Ctrl-C in the caller's main thread is handled promptly (a signal
            # delivered to another thread only runs its handler when this one runs code).
            while not done.wait(0.5 if deadline is None else min(0.5, deadline - time.monotonic())):
                if deadline is not None and time.monotonic() >= deadline:
                    break
            if not done.is_set():
                raise TimeoutError(
                    f"task {namespace}/{task_id} version {version} did not end within {timeout:g}s"
                )
        finally:
            watch.stop()
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
        of the etcd the run lives in), keeping its nodes, finished nodes and start time. Not
        atomic across tasks (etcd bounds a transaction to 128 operations): run it while no
        Scheduler serves the prefix. Raises :class:`InvalidTaskError`, :class:`EtcdError`.
        """
        tasks = tasks_from_payload(data)
        for task in tasks:
            validate_name(task.namespace, "namespace")
            if len(task.nodes) > MAX_NODES or not task.nodes:
                raise InvalidTaskError(
                    f"task {task.namespace}/{task.id} has {len(task.nodes)} nodes", "data"
                )
            if task.status.terminal and task.finished_at is None:
                raise InvalidTaskError(
                    f"task {task.namespace}/{task.id} is {task.status.value} without finishedAt",
                    "data",
                )
        self.client.txn(
            success=[
                t.delete_prefix(prefix)
                for prefix in (
                    self.keys.all_tasks(),
                    self.keys.all_outcomes(),
                    self.keys.all_runs(),
                    self.keys.task_progress_root(),
                )
            ]
        )
        for task in tasks:
            token = _new_token()
            status, finished_at = task.status, task.finished_at
            if status is TaskStatus.STARTED and task.finished_nodes >= task.nodes:
                status, finished_at = TaskStatus.FINISHED, self.now()  # it had just finished
            outcome = None
            if status.terminal:
                assert finished_at is not None
                outcome = OutcomeRecord(status, finished_at, token, task.error)
            record = TaskRecord(
                payload=task.payload,
                started_at=task.started_at,
                nodes=task.nodes,
                token=token,
                version=task.version if status.terminal else None,
            )
            self._create(task.namespace, task.id, record, outcome)
            if task.finished_nodes:  # after the create: a completed key's revision is later
                done = RunRecord(COMPLETED, record.started_at, token).encode()
                self.client.txn(
                    success=[
                        t.put(self.keys.run(task.namespace, task.id, node), done)
                        for node in sorted(task.finished_nodes)
                    ]
                )
