"""``Scheduler``: runs, on one node, the tasks the cluster wants there. Every provider call is here.

The flow, in the manner of Weaviate's scheduler, but driven by an etcd watch instead of a tick:

1. ``start()`` grants this node a lease and writes its membership record under it (a
   :class:`~distributedtask.etcd.lease.LeaseKeeper` thread keeps it alive), gives every provider
   its recorder, and lists the cluster once (the first snapshot of the watch).
2. Still in ``start()``, for each namespace it has a provider for: every local run
   (``get_local_tasks``) that is not the current run of its id in the cluster is
   ``cleanup_task``-ed; every run that should run here (STARTED, this node assigned, not finished
   here) is ``start_task``-ed. Then it returns: the node is registered, reconciled, watching.
3. The watch thread (:class:`~distributedtask.etcd.watch.ResumableWatch`) only updates the
   in-memory view — tasks, run keys, outcomes, members — and marks the ids a response touched.
4. The worker thread reconciles each marked id, level-based: desired state from the view against
   the handles it holds. A run that should run and has no handle is started; a handle whose run
   stopped being wanted (cancelled, failed, finished here, replaced, deleted) is terminated; the
   local state of a run that is no longer the current one in the cluster is cleaned up.
5. Timers live in one heap served by the worker; nothing polls:
   - TTL: at ``finished_at + completed_task_ttl`` the run is removed from the cluster
     (``clean_up_task``; every node tries, one wins, the others' errors are harmless); the
     deletion then reaches every node through the watch and step 4 cleans the local state.
   - node loss: when a node assigned to a STARTED run has had no membership for
     ``node_loss_grace``, the run is failed, naming that node (every live node tries; one wins).
   - retries: a provider call that raised is retried with jittered exponential backoff.
   - progress: the recorder writes at most once a second per run; the last value is flushed.
6. The periodic resync (``resync_interval``) asks the watch for a fresh snapshot and reconciles
   everything: a safety net, not the mechanism. The watch itself resumes after disconnects, etcd
   restarts and leader changes from the last revision it delivered, and relists after compaction.
7. ``stop()`` stops the watch and the worker, terminates every running handle, revokes the lease
   (the membership record goes at once) and joins every thread it started.

Recorder semantics: ``record_completion`` / ``record_failure`` write synchronously on the
caller's thread; when etcd cannot take them (:class:`EtcdError`) they are queued and retried by
the worker until they are taken or no longer matter (the run ended or was replaced). A run this
node has recorded is never started again here, even before etcd confirms it. A run is therefore
started at least once, and at most once per process, on each of its nodes: after a crash the
restarted node runs again whatever it had not recorded.

Threading: the watch thread never calls a provider; the worker thread makes every provider
call after ``start()`` returns, so a provider is never called concurrently with itself by the
Scheduler. Provider exceptions are logged with the task, counted
(``distributedtask_provider_errors_total``), and retried; they never stop the Scheduler.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

import tenacity
from prometheus_client import CollectorRegistry

from .etcd import txn as t
from .etcd.lease import LeaseKeeper
from .etcd.watch import Changes, ResumableWatch, Snapshot
from .exceptions import (
    DistributedTaskError,
    EtcdError,
    InvalidTaskError,
    TaskNotFoundError,
    TaskNotRunningError,
    TaskTooFreshError,
)
from .keys import MemberKey, OutcomeKey, ProgressKey, RunKey, TaskKey, prefix_range_end
from .manager import Manager
from .metrics import Metrics, metrics_for
from .model import Task, TaskDescriptor, TaskStatus, validate_name
from .provider import Provider, TaskHandle
from .records import CorruptRecordError, MemberRecord

__all__ = ["Scheduler"]

TaskId = tuple[str, str]  # (namespace, task id)
_T = TypeVar("_T")


@dataclass(order=True)
class _Timer:
    due: float
    seq: int
    kind: str = field(compare=False)  # "ttl", "loss", "retry", "progress", "record", "resync"
    task_id: TaskId = field(compare=False, default=("", ""))
    version: int = field(compare=False, default=0)
    node: str = field(compare=False, default="")
    attempt: int = field(compare=False, default=0)

    @property
    def run(self) -> tuple[str, str, int]:
        return (self.task_id[0], self.task_id[1], self.version)


@dataclass
class _Running:
    version: int
    handle: TaskHandle


@dataclass
class _View:
    """What the watch has told us. Guarded by ``Scheduler._lock``."""

    records: dict[TaskId, t.KeyValue] = field(default_factory=dict)
    outcomes: dict[TaskId, t.KeyValue] = field(default_factory=dict)
    runs: dict[TaskId, dict[str, t.KeyValue]] = field(default_factory=dict)
    tasks: dict[TaskId, Task] = field(default_factory=dict)
    members: dict[str, MemberRecord] = field(default_factory=dict)
    awaited: dict[str, int] = field(default_factory=dict)  # node -> STARTED runs pending on it
    revision: int = 0


class _Recorder:
    """The TaskCompletionRecorder given to providers, bound to this node."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def record_completion(self, namespace: str, task_id: str, version: int) -> None:
        self._scheduler._record(("complete", namespace, task_id, version, ""))

    def record_failure(self, namespace: str, task_id: str, version: int, error: str) -> None:
        self._scheduler._record(("fail", namespace, task_id, version, str(error)))

    def record_progress(
        self, namespace: str, task_id: str, version: int, fraction: float, message: str = ""
    ) -> None:
        self._scheduler._progress(namespace, task_id, version, fraction, message)


_Record = tuple[str, str, str, int, str]  # (operation, namespace, task id, version, error)


class Scheduler:
    """Runs, on node ``node_id``, the runs the cluster assigns to it (see the module doc).

    ``providers`` maps each namespace this node serves to its Provider. ``completed_task_ttl``
    defaults to the manager's. ``member_ttl`` is the lease of this node's membership;
    ``node_loss_grace`` how long an assigned node may be without membership before its
    STARTED runs fail (``None``: wait forever). ``registry`` receives the metrics (default:
    prometheus-client's global registry).

    Raises :class:`InvalidTaskError` for a bad node id or namespace, :class:`ValueError` for
    other bad arguments. Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        manager: Manager,
        *,
        node_id: str,
        providers: Mapping[str, Provider],
        completed_task_ttl: timedelta | None = None,
        resync_interval: timedelta = timedelta(minutes=5),
        member_ttl: timedelta = timedelta(seconds=10),
        node_loss_grace: timedelta | None = timedelta(seconds=60),
        registry: CollectorRegistry | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.node_id = validate_name(node_id, "node_id")
        for namespace in providers:
            validate_name(namespace, "namespace")
        if resync_interval <= timedelta(0):
            raise ValueError("resync_interval must be positive")
        if member_ttl < timedelta(seconds=1):
            raise ValueError("member_ttl must be at least one second")
        if node_loss_grace is not None and node_loss_grace < timedelta(0):
            raise ValueError("node_loss_grace must be >= 0 or None")
        self.manager = manager
        self.providers = dict(providers)
        self.completed_task_ttl = (
            manager.completed_task_ttl if completed_task_ttl is None else completed_task_ttl
        )
        self.resync_interval = resync_interval
        self.member_ttl = member_ttl
        self.node_loss_grace = node_loss_grace
        self.log = logger or logging.getLogger("distributedtask.scheduler")
        self.metrics: Metrics = metrics_for(registry)
        self.metrics.touch(self.providers)
        self._keys = manager.keys
        self._recorder = _Recorder(self)

        self._lock = threading.Lock()  # guards the view, the queue, the timers
        self._wake = threading.Condition(self._lock)
        self._view = _View()
        self._dirty: set[TaskId] = set()
        self._full_reconcile = False
        self._timers: list[_Timer] = []
        self._seq = itertools.count()
        self._lost_since: dict[str, float] = {}  # node -> monotonic time first seen missing
        self._outbox: dict[tuple[str, str, int], _Record] = {}
        self._progress_state: dict[
            tuple[str, str, int], tuple[float, tuple[float, str] | None]
        ] = {}
        self._skipped_keys: set[bytes] = set()
        self._ttl_timers: set[tuple[TaskId, int]] = set()

        # Owned by the worker thread (and by start()/stop() before/after it runs).
        self._running: dict[TaskId, _Running] = {}
        self._local: dict[str, set[TaskDescriptor]] = {ns: set() for ns in self.providers}
        self._recorded: set[tuple[str, str, int]] = set()  # runs this node recorded
        self._attempts: dict[TaskId, int] = {}
        self._local_failures = 0
        self._running_snapshot: dict[str, set[TaskDescriptor]] = {}

        self._stopping = threading.Event()
        self._state = "new"
        self._lease: LeaseKeeper | None = None
        self._watch: ResumableWatch | None = None
        self._worker: threading.Thread | None = None
        self._retry_wait = tenacity.wait_random_exponential(multiplier=0.1, max=30)
        self._retrying = tenacity.Retrying(wait=self._retry_wait)
        self._started_at: datetime | None = None

    def __repr__(self) -> str:
        namespaces = sorted(self.providers)
        return f"Scheduler(node_id={self.node_id!r}, namespaces={namespaces}, {self._state})"

    # ---- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Scheduler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Register, reconcile, and follow the watch (see the module doc); returns when done.

        Raises :class:`EtcdError` if etcd cannot be reached (nothing is left running then),
        :class:`RuntimeError` if already started.
        """
        if self._state != "new":
            raise RuntimeError(f"this scheduler was already started ({self._state})")
        self._state = "starting"
        self._started_at = self.manager.now()
        try:
            self._lease = LeaseKeeper(
                self.manager.client,
                max(1, math.ceil(self.member_ttl.total_seconds())),
                self._register,
                on_lost=self.metrics.lease_losses.inc,
                name=f"dtask-lease-{self.node_id}"[:60],
            )
            self._lease.start()
            for provider in self.providers.values():
                provider.set_completion_recorder(self._recorder)
            root = self._keys.root
            ranges = [*self.manager.list_ranges(), self._range(self._keys.all_members())]
            self._watch = ResumableWatch(
                self.manager.client,
                root,
                prefix_range_end(root),
                self._on_watch,
                list_ranges=ranges,
                name=f"dtask-watch-{self.node_id}"[:60],
                on_restart=self._on_watch_restart,
            )
            self._watch.start()  # the first snapshot is applied before this returns
            self._reconcile_pending()  # a full one: the snapshot asked for it
        except BaseException:
            self._shutdown()
            self._state = "stopped"
            raise
        self._worker = threading.Thread(
            target=self._work, name=f"dtask-worker-{self.node_id}"[:60], daemon=True
        )
        self._state = "running"
        self._worker.start()
        with self._lock:
            self._add_timer(self.resync_interval.total_seconds(), "resync")

    def stop(self) -> None:
        """Terminate running handles, leave the cluster, join every thread. Idempotent."""
        if self._state in ("stopped", "new"):
            self._state = "stopped"
            return
        self._shutdown()
        self._state = "stopped"

    def _shutdown(self) -> None:
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        if self._watch is not None:
            self._watch.stop()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(30)
        for (namespace, task_id), running in list(self._running.items()):
            self._terminate(namespace, task_id, running, count=False)
        self._running.clear()
        self._publish_running()
        self._flush_outbox_once()
        if self._lease is not None:
            self._lease.stop()

    def running(self) -> dict[str, set[TaskDescriptor]]:
        """The runs this node has started and not terminated, by namespace."""
        with self._lock:
            return {ns: set(items) for ns, items in self._running_snapshot.items() if items}

    def members(self) -> dict[str, MemberRecord]:
        """The live members this node currently sees, by node id."""
        with self._lock:
            return dict(self._view.members)

    # ---- membership -----------------------------------------------------------------------

    def _register(self, lease_id: int) -> None:
        assert self._started_at is not None
        record = MemberRecord(self.node_id, frozenset(self.providers), self._started_at)
        self.manager.client.put(self._keys.member(self.node_id), record.encode(), lease=lease_id)

    @staticmethod
    def _range(prefix: bytes) -> tuple[bytes, bytes]:
        return prefix, prefix_range_end(prefix)

    # ---- the watch thread: update the view, mark what changed -----------------------------

    def _on_watch_restart(self, reason: str) -> None:
        self.metrics.watch_restarts.labels(reason=reason).inc()
        if reason in ("compacted", "resync"):
            self.metrics.resyncs.inc()

    def _on_watch(self, batch: Snapshot | Changes) -> None:
        with self._lock:
            view = self._view
            if isinstance(batch, Snapshot):
                touched = set(view.records) | set(view.outcomes) | set(view.runs)
                self._view = view = _View()
                for kv in batch.kvs:
                    touched |= self._apply(view, kv, deleted=False)
                self._full_reconcile = True
            else:
                touched = set()
                for event in batch.events:
                    touched |= self._apply(view, event.kv, deleted=event.kind == "delete")
            view.revision = batch.revision
            for task_id in touched:
                self._rebuild(view, task_id)
            self._dirty |= touched
            self._check_members()
            self.metrics.members.set(len(view.members))
            self._wake.notify_all()

    def _apply(self, view: _View, kv: t.KeyValue, *, deleted: bool) -> set[TaskId]:
        parsed = self._keys.parse(kv.key)
        if isinstance(parsed, MemberKey):
            if deleted:
                view.members.pop(parsed.node_id, None)
            else:
                try:
                    member = MemberRecord.decode(kv.value)
                    if member.node_id != parsed.node_id:
                        raise CorruptRecordError("a member record under another node's key")
                    view.members[parsed.node_id] = member
                except CorruptRecordError as exc:
                    view.members.pop(parsed.node_id, None)
                    self._skip(kv.key, exc)
            return set()
        if isinstance(parsed, ProgressKey):
            return set()
        if parsed is None:
            self._skip(kv.key, CorruptRecordError("not a key of ours"))
            return set()
        task_id = (parsed.namespace, parsed.task_id)
        if isinstance(parsed, TaskKey):
            target: dict[TaskId, t.KeyValue] = view.records
        elif isinstance(parsed, OutcomeKey):
            target = view.outcomes
        else:
            assert isinstance(parsed, RunKey)
            runs = view.runs.setdefault(task_id, {})
            if deleted:
                runs.pop(parsed.node_id, None)
                if not runs:
                    del view.runs[task_id]
            else:
                runs[parsed.node_id] = kv
            return {task_id}
        if deleted:
            target.pop(task_id, None)
        else:
            target[task_id] = kv
        return {task_id}

    def _rebuild(self, view: _View, task_id: TaskId) -> None:
        self._await(view, view.tasks.get(task_id), -1)
        kv = view.records.get(task_id)
        if kv is None:
            view.tasks.pop(task_id, None)
            return
        try:
            _, _, task = self.manager.assemble(
                task_id[0],
                task_id[1],
                kv,
                view.outcomes.get(task_id),
                view.runs.get(task_id, {}),
                on_skip=self._skip,
            )
        except CorruptRecordError as exc:
            self._skip(kv.key, exc)
            view.tasks.pop(task_id, None)
            return
        view.tasks[task_id] = task
        self._await(view, task, +1)
        ttl_key = (task_id, task.version)
        if task.finished_at is not None and ttl_key not in self._ttl_timers:
            self._ttl_timers.add(ttl_key)
            expires = task.finished_at + self.completed_task_ttl
            delay = (expires - self.manager.now()).total_seconds()
            self._add_timer(max(0.0, delay) + 0.005, "ttl", task_id=task_id, version=task.version)

    def _skip(self, key: bytes, exc: Exception) -> None:
        if key not in self._skipped_keys:
            self._skipped_keys.add(key)
            self.metrics.skipped_records.inc()
            self.log.warning("skipping unreadable value %r: %s", key, exc)

    @staticmethod
    def _await(view: _View, task: Task | None, delta: int) -> None:
        """Count, per node, the STARTED runs still waiting for it (the nodes we watch for)."""
        if task is None or task.status is not TaskStatus.STARTED:
            return
        for node in task.pending_nodes:
            count = view.awaited.get(node, 0) + delta
            if count > 0:
                view.awaited[node] = count
            else:
                view.awaited.pop(node, None)

    def _check_members(self) -> None:
        """Note assigned nodes that lost membership; schedule their node-loss deadline."""
        if self.node_loss_grace is None:
            return
        now = time.monotonic()
        members = self._view.members
        wanted = set(self._view.awaited)
        for node in list(self._lost_since):
            if node in members or node not in wanted:
                del self._lost_since[node]
        for node in wanted - set(members):
            if node not in self._lost_since:
                self._lost_since[node] = now
                self._add_timer(self.node_loss_grace.total_seconds(), "loss", node=node)

    # ---- timers ---------------------------------------------------------------------------

    def _add_timer(
        self,
        delay: float,
        kind: str,
        *,
        task_id: TaskId = ("", ""),
        version: int = 0,
        node: str = "",
        attempt: int = 0,
    ) -> None:
        """Schedule a timer; caller holds the lock."""
        timer = _Timer(
            time.monotonic() + delay, next(self._seq), kind, task_id, version, node, attempt
        )
        heapq.heappush(self._timers, timer)
        if self._timers[0] is timer:  # the worker sleeps until the earliest timer: wake it
            self._wake.notify_all()

    def _backoff(self, attempt: int) -> float:
        state = tenacity.RetryCallState(self._retrying, None, (), {})
        state.attempt_number = attempt
        return float(self._retry_wait(state))

    # ---- the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            due: list[_Timer] = []
            with self._wake:
                while not self._stopping.is_set():
                    now = time.monotonic()
                    while self._timers and self._timers[0].due <= now:
                        due.append(heapq.heappop(self._timers))
                    if due or self._dirty or self._full_reconcile:
                        break
                    timeout = self._timers[0].due - now if self._timers else None
                    self._wake.wait(timeout)
            if self._stopping.is_set():
                return
            try:
                for timer in due:
                    self._fire(timer)
                self._reconcile_pending()
            except Exception:  # a bug of ours must not end the worker
                self.log.exception("scheduler worker error; continuing")

    def _fire(self, timer: _Timer) -> None:
        if timer.kind == "ttl":
            self._ttl_cleanup(timer.task_id, timer.version, timer.attempt)
        elif timer.kind == "loss":
            self._node_loss(timer.node)
        elif timer.kind == "retry":
            with self._lock:
                self._dirty.add(timer.task_id)
        elif timer.kind == "progress":
            self._flush_progress(timer.run)
        elif timer.kind == "record":
            self._retry_record(timer.run, timer.attempt)
        elif timer.kind == "full":
            with self._lock:
                self._full_reconcile = True
        elif timer.kind == "resync":
            if self._watch is not None:
                self._watch.resync()
            with self._lock:
                self._add_timer(self.resync_interval.total_seconds(), "resync")

    def _ttl_cleanup(self, task_id: TaskId, version: int, attempt: int) -> None:
        with self._lock:
            task = self._view.tasks.get(task_id)
            if task is None or task.version != version or not task.status.terminal:
                self._ttl_timers.discard((task_id, version))
                return
        try:
            self.manager.clean_up_task(*task_id, version, ttl=self.completed_task_ttl)
            self.log.info("cleaned up %s/%s v%d after its TTL", task_id[0], task_id[1], version)
        except (TaskNotFoundError, TaskNotRunningError):
            pass  # another node won; the deletion reaches us through the watch
        except (TaskTooFreshError, EtcdError, CorruptRecordError) as exc:
            # too fresh: only at the TTL's boundary, the clock being the one that scheduled it
            self.log.info("TTL clean-up of %s/%s: %s; retrying", *task_id, exc)
            with self._lock:
                self._add_timer(
                    self._backoff(attempt + 1),
                    "ttl",
                    task_id=task_id,
                    version=version,
                    attempt=attempt + 1,
                )

    def _node_loss(self, node: str) -> None:
        grace = self.node_loss_grace
        with self._lock:
            since = self._lost_since.get(node)
            if since is None or grace is None:
                return  # back, or no longer awaited
            left = since + grace.total_seconds() - time.monotonic()
            if left > 0:
                self._add_timer(left, "loss", node=node)
                return
            victims = [
                task
                for task in self._view.tasks.values()
                if task.status is TaskStatus.STARTED and node in task.pending_nodes
            ]
        for task in victims:
            error = f"node lost: no membership for {grace.total_seconds():g}s"
            try:
                self.manager.record_node_failure(task.namespace, task.id, task.version, node, error)
                self.metrics.node_loss_failures.labels(namespace=task.namespace).inc()
                self.log.warning(
                    "failed %s/%s v%d: %s", task.namespace, task.id, task.version, error
                )
            except (TaskNotFoundError, TaskNotRunningError, InvalidTaskError):
                pass  # ended meanwhile, or another node did it
            except EtcdError as exc:
                self.log.warning("could not fail runs of lost node %s (%s); retrying", node, exc)
                with self._lock:
                    self._add_timer(self._backoff(3), "loss", node=node)
                return

    # ---- reconciliation (worker thread, or start() before the worker runs) ---------------

    def _reconcile_pending(self) -> None:
        with self._lock:
            full, self._full_reconcile = self._full_reconcile, False
            dirty = {key for key in self._dirty if key[0] in self.providers}
            self._dirty = set()
            if full:
                dirty |= {key for key in self._view.tasks if key[0] in self.providers}
            tasks = {key: self._view.tasks.get(key) for key in dirty}
        if full:
            failed = False
            for namespace, provider in self.providers.items():
                listed, local = self._call(namespace, "get_local_tasks", provider.get_local_tasks)
                if listed and local is not None:
                    self._local[namespace] = set(local)
                else:
                    failed = True
            if failed:  # reconcile everything again, with backoff, once the provider can list
                self._local_failures += 1
                with self._lock:
                    self._add_timer(self._backoff(self._local_failures), "full")
            else:
                self._local_failures = 0
            extra = set(self._running)
            extra |= {(ns, d.id) for ns, local_set in self._local.items() for d in local_set}
            with self._lock:
                tasks.update({key: self._view.tasks.get(key) for key in extra - dirty})
            dirty |= extra
        for task_id in sorted(dirty):
            if self._stopping.is_set():
                return
            self._reconcile(task_id, tasks.get(task_id))
        self._publish_running()

    def _reconcile(self, task_id: TaskId, task: Task | None) -> None:
        namespace, tid = task_id
        provider = self.providers.get(namespace)
        if provider is None:
            return
        ok = True
        running = self._running.get(task_id)
        wanted = (
            task is not None
            and task.should_run_on(self.node_id)
            and (namespace, tid, task.version) not in self._recorded
        )
        # 1. terminate a handle whose run is no longer wanted here
        keep = (
            wanted and task is not None and running is not None and running.version == task.version
        )
        if running is not None and not keep:
            if self._terminate(namespace, tid, running, count=True):
                del self._running[task_id]
            else:
                ok = False
        # 2. clean up local state of runs that are no longer the current one in the cluster
        current = task.version if task is not None else None
        for descriptor in [
            d for d in self._local[namespace] if d.id == tid and d.version != current
        ]:
            if (task_id in self._running) and self._running[task_id].version == descriptor.version:
                continue  # its termination failed above; retry both later
            cleanup = functools.partial(provider.cleanup_task, descriptor)
            cleaned, _ = self._call(namespace, "cleanup", cleanup, task_id)
            if cleaned:
                self._local[namespace].discard(descriptor)
                self.metrics.local_cleanups.labels(namespace=namespace).inc()
                self.log.info(
                    "cleaned up local state of %s/%s v%d", namespace, tid, descriptor.version
                )
                with self._lock:
                    self._recorded.discard((namespace, tid, descriptor.version))
                    self._progress_state.pop((namespace, tid, descriptor.version), None)
            else:
                ok = False
        # 3. start a run that should run here
        if wanted and task is not None and task_id not in self._running:
            started, handle = self._call(
                namespace, "start", lambda: provider.start_task(task), task_id
            )
            if started and handle is not None:
                self._running[task_id] = _Running(task.version, handle)
                self._local[namespace].add(task.descriptor)
                self.metrics.task_starts.labels(namespace=namespace).inc()
                latency = (self.manager.now() - task.started_at).total_seconds()
                self.metrics.start_latency.labels(namespace=namespace).observe(max(0.0, latency))
                self.log.info("started %s/%s v%d", namespace, tid, task.version)
            else:
                ok = False
        if ok:
            self._attempts.pop(task_id, None)
        else:
            attempt = self._attempts[task_id] = self._attempts.get(task_id, 0) + 1
            with self._lock:
                self._add_timer(self._backoff(attempt), "retry", task_id=task_id)

    def _terminate(self, namespace: str, task_id: str, running: _Running, *, count: bool) -> bool:
        done, _ = self._call(namespace, "terminate", running.handle.terminate, (namespace, task_id))
        if not done:
            return False
        if count and (namespace, task_id, running.version) not in self._recorded:
            self.metrics.task_terminations.labels(namespace=namespace).inc()
            self.log.info("terminated %s/%s v%d", namespace, task_id, running.version)
        return True

    def _call(
        self,
        namespace: str,
        operation: str,
        fn: Callable[[], _T],
        task_id: TaskId | None = None,
    ) -> tuple[bool, _T | None]:
        """Call a provider: ``(True, result)``, or on an exception log, count, ``(False, None)``."""
        try:
            return True, fn()
        except Exception:
            self.metrics.provider_errors.labels(namespace=namespace, operation=operation).inc()
            self.log.exception(
                "provider %r %s failed%s",
                namespace,
                operation,
                f" for {task_id[1]!r}" if task_id else "",
            )
            return False, None

    def _publish_running(self) -> None:
        snapshot: dict[str, set[TaskDescriptor]] = {ns: set() for ns in self.providers}
        for (namespace, task_id), running in self._running.items():
            snapshot[namespace].add(TaskDescriptor(task_id, running.version))
        with self._lock:
            self._running_snapshot = snapshot
        for namespace, items in snapshot.items():
            self.metrics.tasks_running.labels(namespace=namespace).set(len(items))

    # ---- the recorder ---------------------------------------------------------------------

    def _record(self, record: _Record) -> None:
        operation, namespace, task_id, version, _ = record
        with self._lock:
            self._recorded.add((namespace, task_id, version))
            self._dirty.add((namespace, task_id))
            self._wake.notify_all()
        self._flush_progress((namespace, task_id, version))  # the last value is always written
        if not self._send(record):
            self.metrics.record_retries.labels(operation=operation).inc()
            with self._lock:
                self._outbox[(namespace, task_id, version)] = record
                self._add_timer(
                    self._backoff(1),
                    "record",
                    task_id=(namespace, task_id),
                    version=version,
                    attempt=1,
                )

    def _send(self, record: _Record) -> bool:
        """Write a completion or failure; True when done or moot, False to retry later."""
        operation, namespace, task_id, version, error = record
        try:
            if operation == "complete":
                self.manager.record_node_completion(namespace, task_id, version, self.node_id)
            else:
                self.manager.record_node_failure(namespace, task_id, version, self.node_id, error)
        except (TaskNotFoundError, TaskNotRunningError) as exc:
            self.log.info("record %s of %s/%s v%d: %s", operation, namespace, task_id, version, exc)
        except InvalidTaskError as exc:
            self.log.error(
                "record %s of %s/%s v%d refused: %s", operation, namespace, task_id, version, exc
            )
        except DistributedTaskError as exc:
            self.log.warning(
                "record %s of %s/%s v%d failed (%s); will retry",
                operation,
                namespace,
                task_id,
                version,
                exc,
            )
            return False
        except Exception:  # a bug: retrying will not help, and the recorder must not raise
            self.log.exception(
                "record %s of %s/%s v%d failed", operation, namespace, task_id, version
            )
        return True

    def _retry_record(self, run: tuple[str, str, int], attempt: int) -> None:
        with self._lock:
            record = self._outbox.get(run)
        if record is None:
            return
        if self._send(record):
            with self._lock:
                self._outbox.pop(run, None)
        else:
            with self._lock:
                self._add_timer(
                    self._backoff(attempt + 1),
                    "record",
                    task_id=run[:2],
                    version=run[2],
                    attempt=attempt + 1,
                )

    def _flush_outbox_once(self) -> None:
        with self._lock:
            pending = list(self._outbox.values())
            self._outbox.clear()
        for record in pending:
            if not self._send(record):
                self.log.error("lost record %s of %s/%s v%d at stop: etcd unreachable", *record[:4])

    def _progress(
        self, namespace: str, task_id: str, version: int, fraction: float, message: str
    ) -> None:
        run = (namespace, task_id, version)
        now = time.monotonic()
        with self._lock:
            last, pending = self._progress_state.get(run, (0.0, None))
            if now - last < 1.0:
                if pending is None:
                    self._add_timer(last + 1.0 - now, "progress", task_id=run[:2], version=run[2])
                self._progress_state[run] = (last, (fraction, message))
                return
            self._progress_state[run] = (now, None)
        self._write_progress(run, fraction, message)

    def _flush_progress(self, run: tuple[str, str, int]) -> None:
        with self._lock:
            _, pending = self._progress_state.get(run, (0.0, None))
            if pending is None:
                return
            self._progress_state[run] = (time.monotonic(), None)
        self._write_progress(run, *pending)

    def _write_progress(self, run: tuple[str, str, int], fraction: float, message: str) -> None:
        namespace, task_id, version = run
        try:
            self.manager.record_progress(
                namespace, task_id, version, self.node_id, fraction, message
            )
        except (TaskNotFoundError, TaskNotRunningError):
            with self._lock:
                self._progress_state.pop(run, None)
        except DistributedTaskError as exc:
            self.metrics.record_retries.labels(operation="progress").inc()
            self.log.info("progress of %s/%s v%d not written: %s", namespace, task_id, version, exc)
