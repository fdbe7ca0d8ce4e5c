"""``Scheduler``: runs, on one node, the tasks the cluster wants there.

The flow, in the manner of Weaviate's scheduler, but driven by etcd watches instead of a tick:

1. ``start()`` checks the prefix's layout marker, grants this node a lease and writes its
   membership record under it (a lease keeper thread keeps it alive), gives every provider its
   recorder (:mod:`.recorder`), and lists what it follows: ``P/cluster/`` (task records,
   outcomes, members) and ``P/assign/<its bucket>/`` (which runs name nodes of its bucket).
2. Still in ``start()``, for each namespace it has a provider for: every local run
   (``get_local_tasks``) that is not the current run of its id in the cluster is
   ``cleanup_task``-ed; every run that should run here (STARTED, this node assigned, not
   completed here) is ``start_task``-ed. Whether this node completed a run listed at start is
   one read of its own completion keys (128 runs to a transaction). Then it returns: the node is
   registered, reconciled, watching.
3. The two watch threads only update the :class:`~.view.ClusterView` and mark the ids a
   response touched. Progress and other nodes' completions are in ranges no Scheduler
   watches: what etcd sends a node grows with the cluster's runs, not with its node count.
4. The worker thread reconciles each marked id, level-based: desired state from the view
   against the handles it holds. A run that should run and has no handle is started; a handle
   whose run stopped being wanted (cancelled, failed, completed here, replaced, deleted) is
   terminated; the local state of a run that is no longer the current one is cleaned up. Every
   provider call goes through :mod:`.calls`.
5. Timers (:mod:`.timers`, one heap on an injectable clock) are served by the worker; nothing
   polls:
   - TTL: at ``finished_at + completed_task_ttl`` the deciders (:mod:`.membership`: the first
     three live members) remove the run from the cluster; the deletion reaches every node
     through the watch and step 4 cleans the local state;
   - node loss: a decider fails the runs a node gone for ``node_loss_grace`` had not completed;
   - retries: a provider call that raised is retried with jittered exponential backoff;
   - the recorder's progress flushes and the re-sends of its outbox;
   - units (:mod:`.unitdesk`): a unit of the pool becoming claimable after its backoff, looks
     for units handed out and never claimed, re-sends of unit records.
6. The periodic resync (``resync_interval``) asks both watches for a fresh snapshot and
   reconciles everything: a safety net, not the mechanism. The watches resume after
   disconnects, etcd restarts and leader changes, and relist after compaction.
7. ``stop()`` stops the watches and the worker, terminates every running handle, gives the
   units this node holds back to the pool, revokes the lease (the membership record goes at
   once) and joins every thread it started.

A run is started at least once, and at most once per process, on each of its nodes: after a
crash the restarted node runs again whatever it had not recorded.

Unit tasks: a node runs a unit task while it is STARTED (its provider claims units through the
recorder's :class:`~.unitdesk.UnitDesk`, which its waiting claimants wake on every watch
change); the task ends when its last unit completes. When every unit of a group is COMPLETED
(a mark under ``P/cluster/groups``), the worker calls the provider's optional
``group_completed(task, group)`` once per node per run, retried with backoff, and writes an
acknowledgement, so a restarted node calls it again only if it had not returned. The deciders
give a lost node's units back to the pool after ``node_loss_grace`` (:mod:`.membership`).

Threading: the watch threads never call a provider; the worker thread makes every provider
call after ``start()`` returns. Provider exceptions are logged with the task, counted
(``distributedtask_provider_errors_total``) and retried; they never stop the Scheduler.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry

from .._threads import stop_and_join
from ..etcd.backoff import Backoff, jittered
from ..etcd.lease import LeaseKeeper
from ..etcd.watch import Changes, RestartReason, ResumableWatch, Snapshot
from ..exceptions import (
    CorruptRecordError,
    EtcdError,
    TaskNotFoundError,
    TaskNotRunningError,
    TaskTooFreshError,
)
from ..keys import bucket_of, prefix_range_end
from ..manager import Manager, NodeReport
from ..metrics import Metrics, metrics_for
from ..model import RunPolicy, Task, TaskDescriptor, TaskStatus, validate_name
from ..provider import Provider, TaskHandle
from ..records import MemberRecord
from ..units import PoolItem
from .calls import ProviderCalls
from .membership import NodeLoss
from .recorder import NodeRecorder
from .timers import Clock, Timer, TimerKind, Timers
from .unitdesk import UnitDesk
from .view import ClusterView, ViewRun

__all__ = ["Scheduler"]

TaskId = tuple[str, str]
RunKey = tuple[str, str, int]


def _check_options(
    providers: Mapping[str, Provider],
    resync_interval: timedelta,
    member_ttl: timedelta,
    node_loss_grace: timedelta | None,
) -> None:
    for namespace in providers:
        validate_name(namespace, "namespace")
    if resync_interval <= timedelta(0):
        raise ValueError("resync_interval must be positive")
    if member_ttl < timedelta(seconds=1):
        raise ValueError("member_ttl must be at least one second")
    if node_loss_grace is not None and node_loss_grace < timedelta(0):
        raise ValueError("node_loss_grace must be >= 0 or None")


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass
class _Running:
    version: int
    handle: TaskHandle
    units: bool = False


class Scheduler:
    """Runs, on node ``node_id``, the runs the cluster assigns to it (see the module doc).

    ``providers`` maps each namespace this node serves to its Provider. ``completed_task_ttl``
    defaults to the manager's. ``member_ttl`` is the lease of this node's membership;
    ``node_loss_grace`` how long an assigned node may be without membership before its
    STARTED runs fail (``None``: wait forever). ``registry`` receives the metrics (default:
    prometheus-client's global registry). ``clock`` (monotonic seconds) drives every timer.

    Raises :class:`InvalidTaskError` for a bad node id or namespace, :class:`ValueError` for
    other bad arguments. Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    RETRY_BACKOFF = Backoff(initial=0.1, maximum=30.0)
    DECIDERS = 3

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
        clock: Clock = time.monotonic,
    ) -> None:
        self.node_id = validate_name(node_id, "node_id")
        _check_options(providers, resync_interval, member_ttl, node_loss_grace)
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
        self.bucket = bucket_of(self.node_id)
        self._keys = manager.keys
        self._calls = ProviderCalls(self.providers, self.metrics, self.log)

        self._lock = threading.Lock()  # guards the view, the marks, the timers, node loss
        self._wake = threading.Condition(self._lock)
        self._timers = Timers(clock)
        self._view = ClusterView(self._keys, self._skip)
        self._dirty: set[TaskId] = set()
        self._full_reconcile = False
        self._decide = False  # membership or runs changed: look at node loss again
        self._decide_ids: set[TaskId] = set()  # the ids touched since the last look
        self._loss = NodeLoss(None if node_loss_grace is None else node_loss_grace.total_seconds())
        self._skipped_keys: set[bytes] = set()
        self._ttl_armed: set[RunKey] = set()
        self._deadline_armed: set[tuple[TaskId, int, int]] = set()  # (id, version, state rev)
        self._members_seen = -1
        self._desk = UnitDesk(
            manager,
            self.node_id,
            metrics=self.metrics,
            log=self.log,
            lookup=self._lookup,
            pool=self._pool_of,
            schedule=self._schedule,
            backoff=self.RETRY_BACKOFF,
            clock=clock,
        )
        self._recorder = NodeRecorder(
            manager,
            self.node_id,
            metrics=self.metrics,
            log=self.log,
            lookup=self._lookup,
            on_recorded=self._on_recorded,
            on_retry=self._on_retry,
            schedule=self._schedule,
            backoff=self.RETRY_BACKOFF,
            clock=clock,
            desk=self._desk,
        )

        # Owned by the worker thread (and by start()/stop() before/after it runs).
        self._running: dict[TaskId, _Running] = {}
        # the providers' local runs: namespace -> task id -> versions with local state
        self._local: dict[str, dict[str, set[int]]] = {ns: {} for ns in self.providers}
        self._done_here: dict[TaskId, int] = {}  # the runs this node's completion keys name
        self._attempts_here: dict[TaskId, tuple[int, int, str]] = {}  # version, count, error
        self._backing_off: dict[TaskId, int] = {}  # runs waiting for their next attempt
        self._retried: list[tuple[RunKey, int, str]] = []  # from the recorder, under the lock
        self._done_checked: dict[TaskId, int] = {}  # ... as far as read since the last snapshot
        self._recheck_done = False  # set by a snapshot: read this node's completions again
        self._first_check = True
        self._attempts: dict[TaskId, int] = {}
        self._local_failures = 0
        self._running_snapshot: dict[str, set[TaskDescriptor]] = {}
        self._groups_called: dict[TaskId, tuple[int, set[str]]] = {}  # acknowledged groups

        self._stopping = threading.Event()
        self._state = _State.NEW
        self._lease: LeaseKeeper | None = None
        self._watches: list[ResumableWatch] = []
        self._worker: threading.Thread | None = None
        self._started_at: datetime | None = None

    def __repr__(self) -> str:
        namespaces = sorted(self.providers)
        return f"Scheduler(node_id={self.node_id!r}, namespaces={namespaces}, {self._state.value})"

    # ---- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Scheduler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Register, reconcile, and follow the watches (see the module doc); returns when done.

        Raises :class:`EtcdError` if etcd cannot be reached, :class:`StorageFormatError` if
        the prefix holds another storage layout (nothing is written or left running then),
        :class:`RuntimeError` if already started.
        """
        if self._state is not _State.NEW:
            raise RuntimeError(f"this scheduler was already started ({self._state.value})")
        self._state = _State.STARTING
        self._started_at = self.manager.now()
        try:
            self.manager.ensure_format()
            self._lease = LeaseKeeper(
                self.manager.client,
                max(1, math.ceil(self.member_ttl.total_seconds())),
                self._register,
                on_lost=self.metrics.lease_losses.inc,
                name=f"dtask-lease-{self.node_id}"[:60],
            )
            self._lease.start()
            self._calls.set_recorder(self._recorder)
            self._watches = [
                self._follow(self._keys.cluster, self._on_cluster, "watch"),
                self._follow(self._keys.bucket(self.bucket), self._on_bucket, "assign"),
            ]
            for watch in self._watches:
                watch.start()  # its first snapshot is applied before this returns
            self._reconcile_pending()  # a full one: the snapshots asked for it
        except BaseException:
            self._shutdown()
            self._state = _State.STOPPED
            raise
        self._worker = threading.Thread(
            target=self._work, name=f"dtask-worker-{self.node_id}"[:60], daemon=True
        )
        self._state = _State.RUNNING
        self._worker.start()
        with self._lock:
            self._add_timer(self.resync_interval.total_seconds(), TimerKind.RESYNC)

    def _follow(
        self, prefix: bytes, handler: Callable[[Snapshot | Changes], None], what: str
    ) -> ResumableWatch:
        return ResumableWatch(
            self.manager.client,
            prefix,
            prefix_range_end(prefix),
            handler,
            name=f"dtask-{what}-{self.node_id}"[:60],
            on_restart=self._on_watch_restart,
        )

    def stop(self) -> None:
        """Terminate running handles, leave the cluster, join every thread. Idempotent."""
        if self._state in (_State.STOPPED, _State.NEW):
            self._state = _State.STOPPED
            return
        self._shutdown()
        self._state = _State.STOPPED

    def _shutdown(self) -> None:
        self._stopping.set()
        self._desk.close()
        with self._wake:
            self._wake.notify_all()
        for watch in self._watches:
            watch.stop()
        stop_and_join(self._worker, timeout=30, logger=self.log, what="scheduler worker")
        for (namespace, task_id), running in list(self._running.items()):
            self._terminate(namespace, task_id, running, count=False)
        unit_runs = [
            (ns, tid, running.version)
            for (ns, tid), running in self._running.items()
            if running.units
        ]
        self._running.clear()
        self._publish_running()
        self._recorder.flush_outbox()
        self._desk.flush_outbox()
        self._give_back_units(unit_runs)
        if self._lease is not None:
            self._lease.stop()

    def _give_back_units(self, runs: list[RunKey]) -> None:
        """At stop: the units this node holds go back to the pool for the other nodes (a
        node that leaves does not make them wait for its node-loss grace). Best effort: what
        etcd does not take now is given back by the deciders after the grace."""
        for run in runs:
            try:
                released, _ = self.manager.units.release_node(*run, self.node_id)
            except EtcdError as exc:
                self.log.warning("could not give back the units of %s/%s v%d: %s", *run, exc)
                continue
            if released:
                self.metrics.units_reassigned.labels(namespace=run[0]).inc(released)
                self.log.info("gave back %d unit(s) of %s/%s v%d at stop", released, *run)

    def check_timers(self) -> None:
        """Look at the timers now. The worker sleeps until the earliest timer is due by the
        clock's own reckoning; with an injected ``clock`` that a test moves forward, call this
        after moving it."""
        with self._wake:
            self._wake.notify_all()

    def pending_timers(self) -> list[tuple[TimerKind, TaskId, int, float]]:
        """What this node waits for: ``(kind, (namespace, id), version, seconds left)`` of
        every pending timer, earliest first (for debugging and tests)."""
        with self._lock:
            return self._timers.pending()

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

    def _is_decider(self) -> bool:
        """Caller holds the lock."""
        return self.node_id in self._view.deciders(self.DECIDERS)

    # ---- the watch threads: update the view, mark what changed ----------------------------

    def _on_watch_restart(self, reason: RestartReason) -> None:
        self.metrics.watch_restarts.labels(reason=reason.value).inc()
        if reason in (RestartReason.COMPACTED, RestartReason.RESYNC):
            self.metrics.resyncs.inc()

    def _on_cluster(self, batch: Snapshot | Changes) -> None:
        if isinstance(batch, Changes):
            self.metrics.watch_events.labels(range="cluster").inc(len(batch.events))
        with self._lock:
            touched = self._view.apply_cluster(batch)
            if isinstance(batch, Snapshot):
                self._full_reconcile = True
                self._recheck_done = True
            self._after_batch(touched)

    def _on_bucket(self, batch: Snapshot | Changes) -> None:
        if isinstance(batch, Changes):
            self.metrics.watch_events.labels(range="assign").inc(len(batch.events))
        with self._lock:
            touched = self._view.apply_bucket(batch)
            if isinstance(batch, Snapshot):
                self._full_reconcile = True
            self._after_batch(touched)

    def _after_batch(self, touched: set[TaskId]) -> None:
        """Caller holds the lock."""
        units = False
        for task_id in touched:
            run = self._view.run(task_id)
            if run is not None and run.outcome is not None:
                self._arm_ttl(run)
            elif run is not None and run.status is TaskStatus.STARTED:
                self._arm_deadline(run)
            if run is not None and run.record.unit_count:
                units = True
                self._note_pool(run)
        if self._members_seen != self._view.members_version:
            self._members_seen = self._view.members_version
            self._desk.members_changed()
        elif units:
            self._desk.changed()
        self._publish_pauses()
        self._dirty |= touched
        self._decide = True
        self._decide_ids |= touched
        self.metrics.members.set(len(self._view.members))
        self._wake.notify_all()

    def _note_pool(self, run: ViewRun) -> None:
        """Caller holds the lock: arm a UNIT_READY timer for each unit of the pool that waits
        for its retry backoff."""
        key = (run.namespace, run.task_id, run.version)
        items = self._view.pool(key[:2], run.version)
        for delay, unit in self._desk.note_pool(key, items):
            self._add_timer(delay, TimerKind.UNIT_READY, task_id=key[:2], version=key[2], unit=unit)

    def _pool_of(self, run: RunKey) -> list[PoolItem]:
        """The view's pool of ``run`` (the desk's way to read it; any thread)."""
        with self._lock:
            return self._view.pool(run[:2], run[2])

    def _arm_ttl(self, run: ViewRun) -> None:
        key = (run.namespace, run.task_id, run.version)
        if key in self._ttl_armed or run.outcome is None:
            return
        self._ttl_armed.add(key)
        expires = run.outcome.finished_at + self.completed_task_ttl
        delay = (expires - self.manager.now()).total_seconds()
        self._add_timer(
            max(0.0, delay) + 0.005, TimerKind.TTL, task_id=key[:2], version=run.version
        )

    def _arm_deadline(self, run: ViewRun) -> None:
        """Caller holds the lock. One timer per (run, run state): a pause or resume moves the
        state's revision, and the new state arms anew."""
        deadline = run.record.policy.deadline
        if deadline is None:
            return
        key = ((run.namespace, run.task_id), run.version, run.state_revision)
        if key in self._deadline_armed:
            return
        self._deadline_armed.add(key)
        paused = timedelta(milliseconds=0 if run.state is None else run.state.paused_ms)
        due = run.record.started_at + deadline + paused
        self._add_timer(
            max(0.0, (due - self.manager.now()).total_seconds()) + 0.005,
            TimerKind.DEADLINE,
            task_id=key[0],
            version=run.version,
            revision=run.state_revision,
        )

    def _publish_pauses(self) -> None:
        """Caller holds the lock: the oldest pause start per namespace (0 when none)."""
        oldest: dict[str, float] = {}
        for (namespace, task_id), (_, state) in self._view.states.items():
            run = self._view.run((namespace, task_id))
            if state.paused_since is None or run is None or run.outcome is not None:
                continue
            since = state.paused_since.timestamp()
            oldest[namespace] = min(oldest.get(namespace, since), since)
        for namespace in self.providers:
            self.metrics.oldest_pause.labels(namespace=namespace).set(oldest.get(namespace, 0))

    def _skip(self, key: bytes, exc: Exception) -> None:
        if key not in self._skipped_keys:
            self._skipped_keys.add(key)
            self.metrics.skipped_records.inc()
            self.log.warning("skipping unreadable value %r: %s", key, exc)

    # ---- timers ---------------------------------------------------------------------------

    def _add_timer(self, delay: float, kind: TimerKind, **about: object) -> None:
        """Schedule a timer; caller holds the lock."""
        if self._timers.add(delay, kind, **about):  # type: ignore[arg-type]
            self._wake.notify_all()  # the worker sleeps until the earliest timer: wake it

    def _schedule(
        self, delay: float, kind: TimerKind, run: RunKey, attempt: int, unit: str = ""
    ) -> None:
        """The recorder's (and unit desk's) way to arm a timer (any thread)."""
        with self._lock:
            self._add_timer(
                delay, kind, task_id=run[:2], version=run[2], attempt=attempt, unit=unit
            )

    # ---- the recorder's view of the cluster -----------------------------------------------

    def _lookup(self, run: RunKey) -> ViewRun | None:
        with self._lock:
            found = self._view.run(run[:2])
        if found is None or found.version != run[2] or self.node_id not in found.assigned:
            return None
        return found

    def _on_recorded(self, run: RunKey) -> None:
        with self._lock:
            self._dirty.add(run[:2])
            self._wake.notify_all()

    def _on_retry(self, run: RunKey, attempts: int, error: str, policy: RunPolicy) -> None:
        """A failure of ``run`` here was counted with attempts left: start it again after
        the backoff (any thread)."""
        self.metrics.retries.labels(namespace=run[0]).inc()
        delay = jittered(policy.backoff(attempts).total_seconds())
        self.log.info(
            "%s/%s v%d failed (attempt %d of %d): %s; again in %.1fs",
            *run,
            attempts,
            policy.max_attempts,
            error,
            delay,
        )
        with self._lock:
            self._retried.append((run, attempts, error))
            self._add_timer(delay, TimerKind.NEXT_ATTEMPT, task_id=run[:2], version=run[2])

    # ---- the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            with self._wake:
                while not self._stopping.is_set():
                    due = self._timers.pop_due()
                    if due or self._dirty or self._full_reconcile or self._decide:
                        break
                    self._wake.wait(self._timers.next_delay())
            if self._stopping.is_set():
                return
            try:
                for timer in due:
                    self._fire(timer)
                self._reconcile_pending()
                self._look_at_node_loss()
            except Exception:  # a bug of ours must not end the worker
                self.log.exception("scheduler worker error; continuing")

    def _fire(self, timer: Timer) -> None:
        kind = timer.kind
        if kind is TimerKind.TTL:
            self._ttl_cleanup(timer)
        elif kind is TimerKind.NODE_LOSS:
            self._node_loss(timer.node, timer.attempt)
        elif kind is TimerKind.RETRY:
            with self._lock:
                self._dirty.add(timer.task_id)
        elif kind is TimerKind.NEXT_ATTEMPT:
            self._next_attempt(timer)
        elif kind is TimerKind.DEADLINE:
            self._deadline(timer)
        elif kind is TimerKind.PROGRESS:
            self._recorder.flush_progress(timer.run)
        elif kind is TimerKind.RECORD:
            self._recorder.retry(timer.run, timer.attempt)
        elif kind is TimerKind.LOCAL_TASKS:
            with self._lock:
                self._full_reconcile = True
        elif kind is TimerKind.UNIT_READY:
            self._desk.changed()
        elif kind is TimerKind.UNIT_CHECK:
            self._desk.check(timer.run, timer.attempt)
        elif kind is TimerKind.UNIT_RECORD:
            self._desk.retry(timer.run, timer.unit, timer.attempt)
        elif kind is TimerKind.RESYNC:
            for watch in self._watches:
                watch.resync()
            with self._lock:
                self._add_timer(self.resync_interval.total_seconds(), TimerKind.RESYNC)

    def _ttl_cleanup(self, timer: Timer) -> None:
        key = timer.run
        with self._lock:
            run = self._view.run(timer.task_id)
            if run is None or run.version != timer.version or run.outcome is None:
                self._ttl_armed.discard(key)
                return
            decider = self._is_decider()
            if not decider:  # look again later, in case the deciders are gone by then
                recheck = 3 * self.member_ttl.total_seconds()
                self._add_timer(recheck, TimerKind.TTL, task_id=key[:2], version=key[2])
                return
        try:
            self.manager.clean_up_task(*key, ttl=self.completed_task_ttl)
            self.log.info("cleaned up %s/%s v%d after its TTL", *key)
        except (TaskNotFoundError, TaskNotRunningError):
            pass  # another decider won; the deletion reaches us through the watch
        except (TaskTooFreshError, EtcdError, CorruptRecordError) as exc:
            # too fresh: only at the TTL's boundary, the clock being the one that scheduled it
            self.log.info("TTL clean-up of %s/%s: %s; retrying", key[0], key[1], exc)
            with self._lock:
                self._add_timer(
                    self.RETRY_BACKOFF.delay(timer.attempt + 1),
                    TimerKind.TTL,
                    task_id=key[:2],
                    version=key[2],
                    attempt=timer.attempt + 1,
                )

    def _next_attempt(self, timer: Timer) -> None:
        """The backoff of a failed attempt is over: the run may start here again."""
        self._backing_off.pop(timer.task_id, None)
        self._recorder.forget_record(timer.run)
        with self._lock:
            self._dirty.add(timer.task_id)

    def _rearm(self, timer: Timer, delay: float) -> None:
        """Schedule ``timer`` again, as it is, in ``delay`` seconds; caller holds the lock."""
        self._add_timer(
            delay,
            timer.kind,
            task_id=timer.task_id,
            version=timer.version,
            node=timer.node,
            attempt=timer.attempt,
            revision=timer.revision,
        )

    def _deadline(self, timer: Timer) -> None:
        key = (timer.task_id, timer.version, timer.revision)
        with self._lock:
            run = self._view.run(timer.task_id)
            current = (
                run is not None
                and run.version == timer.version
                and run.state_revision == timer.revision
                and run.status is TaskStatus.STARTED
            )
            if not current:
                self._deadline_armed.discard(key)
                return
            if not self._is_decider():  # look again later, in case the deciders are gone
                self._rearm(timer, 3 * self.member_ttl.total_seconds())
                return
            assert run is not None and run.record.policy.deadline is not None
            deadline = run.record.policy.deadline.total_seconds()
        try:
            ended = self.manager.fail_deadline(*timer.run, timer.revision, deadline)
        except EtcdError as exc:
            self.log.info("deadline of %s/%s: %s; retrying", *timer.task_id, exc)
            with self._lock:
                self._rearm(timer, self.RETRY_BACKOFF.delay(3))
            return
        if ended is not None:
            self.metrics.deadline_failures.labels(namespace=timer.task_id[0]).inc()
            self.log.warning("failed %s/%s v%d: %s", *timer.run, ended.error)

    # ---- node loss (deciders) -------------------------------------------------------------

    def _look_at_node_loss(self) -> None:
        with self._lock:
            if not self._decide:
                return
            self._decide = False
            touched, self._decide_ids = self._decide_ids, set()
            if not self._is_decider() or self.node_loss_grace is None:
                self._loss.reset()
                return
            if self._loss.started:
                self._loss.note(self._view, touched)
            else:
                self._loss.note_all(self._view)
            unknown = sorted(self._loss.unknown)
        lists = {}
        if unknown:
            try:
                lists = self.manager.node_lists(unknown)
            except EtcdError as exc:
                self.log.info("could not read node lists (%s); retrying", exc)
                with self._lock:
                    self._decide = True
                    self._add_timer(self.RETRY_BACKOFF.delay(3), TimerKind.RETRY)
                return
        with self._lock:
            self._loss.store_lists(lists, unknown)
            for node in self._loss.update(self._view, self._timers.clock()):
                assert self._loss.grace is not None
                self._add_timer(self._loss.grace, TimerKind.NODE_LOSS, node=node)

    def _node_loss(self, node: str, attempt: int) -> None:
        with self._lock:
            left = self._loss.due(node, self._timers.clock())
            if left is None:
                return  # back, or no longer awaited
            if left > 0:
                self._add_timer(left, TimerKind.NODE_LOSS, node=node)
                return
            if not self._is_decider():
                return
            runs = self._loss.victims(node)
            grace = self._loss.grace or 0.0
        try:
            NodeLoss.act(self.manager, node, runs, grace=grace, metrics=self.metrics, log=self.log)
        except EtcdError as exc:
            self.log.warning("could not fail runs of lost node %s (%s); retrying", node, exc)
            with self._lock:
                self._add_timer(
                    self.RETRY_BACKOFF.delay(attempt + 1),
                    TimerKind.NODE_LOSS,
                    node=node,
                    attempt=attempt + 1,
                )

    # ---- reconciliation (worker thread, or start() before the worker runs) ---------------

    def _reconcile_pending(self) -> None:
        with self._lock:
            for run, count, error in self._retried:
                self._attempts_here[run[:2]] = (run[2], count, error)
            self._retried.clear()
            full, self._full_reconcile = self._full_reconcile, False
            dirty = {key for key in self._dirty if key[0] in self.providers}
            self._dirty = set()
            if full:
                dirty |= {key for key in self._view.records if key[0] in self.providers}
        if full:
            self._list_local_tasks()
            dirty |= set(self._running)
            dirty |= {(ns, tid) for ns, local in self._local.items() for tid in local}
        with self._lock:
            runs = {key: self._view.run(key) for key in dirty}
            born = dict(self._view.born)
            if self._recheck_done:
                self._recheck_done = False
                self._done_checked.clear()
        if not self._check_done_here(runs, born):
            return  # etcd did not answer: everything stays marked and is retried
        for task_id in sorted(dirty):
            if self._stopping.is_set():
                return
            self._reconcile(task_id, runs.get(task_id))
        self._publish_running()

    def _list_local_tasks(self) -> None:
        failed = False
        for namespace in self.providers:
            local = self._calls.local_tasks(namespace)
            if local is None:
                failed = True
            else:
                by_id: dict[str, set[int]] = {}
                for descriptor in local:
                    by_id.setdefault(descriptor.id, set()).add(descriptor.version)
                self._local[namespace] = by_id
        if failed:  # reconcile everything again, with backoff, once the provider can list
            self._local_failures += 1
            with self._lock:
                self._add_timer(
                    self.RETRY_BACKOFF.delay(self._local_failures), TimerKind.LOCAL_TASKS
                )
        else:
            self._local_failures = 0

    def _assigned_here(self, run: ViewRun | None) -> bool:
        return run is not None and run.outcome is None and self.node_id in run.assigned

    def _check_done_here(
        self, runs: Mapping[TaskId, ViewRun | None], born: Mapping[TaskId, int]
    ) -> bool:
        """Learn, with one read per 128 runs, which runs listed in a snapshot this node had
        completed before (a restart, or a completion recorded for it elsewhere). False when
        etcd could not answer (the runs stay marked and are retried)."""
        unknown = [
            (run.namespace, run.task_id, run.version)
            for key, run in runs.items()
            if run is not None
            and self._assigned_here(run)
            and born.get(key) != run.version
            and self._done_checked.get(key) != run.version
        ]
        if not unknown:
            return True
        try:
            reports = self.manager.node_reports(self.node_id, unknown)
        except EtcdError as exc:
            self.log.info("could not read this node's completions (%s); retrying", exc)
            with self._lock:
                self._dirty |= set(runs)
                self._add_timer(self.RETRY_BACKOFF.delay(3), TimerKind.RETRY)
            return False
        self._done_checked.update(((ns, tid), version) for ns, tid, version in unknown)
        for (ns, tid, version), report in sorted(reports.items()):
            if report.done:
                self._done_here[(ns, tid)] = version
                if self._first_check:  # after a restart: finish what a crash left undone
                    self.manager.finish_if_complete(ns, tid, version)
            elif report.attempts:
                self._resume_backoff((ns, tid, version), report, runs[(ns, tid)])
        self._first_check = False
        return True

    def _resume_backoff(self, run: RunKey, report: NodeReport, view_run: ViewRun | None) -> None:
        """A run this node failed before (this process or an earlier one): it starts again
        once the backoff of its last failed attempt is over."""
        self._attempts_here[run[:2]] = (run[2], report.attempts, report.error)
        if view_run is None or report.at is None or run[:2] in self._backing_off:
            return
        policy = view_run.record.policy
        due = report.at + policy.backoff(report.attempts)
        left = (due - self.manager.now()).total_seconds()
        if left > 0:
            self._backing_off[run[:2]] = run[2]
            with self._lock:
                self._add_timer(left, TimerKind.NEXT_ATTEMPT, task_id=run[:2], version=run[2])

    def _wanted(self, run: ViewRun | None) -> bool:
        if run is None or not self._assigned_here(run) or run.status is not TaskStatus.STARTED:
            return False
        task_id = (run.namespace, run.task_id)
        if self._done_here.get(task_id) == run.version:
            return False
        if self._backing_off.get(task_id) == run.version:
            return False
        return not self._recorder.recorded((run.namespace, run.task_id, run.version))

    def _reconcile(self, task_id: TaskId, run: ViewRun | None) -> None:
        """Bring one id's local runs in line with the cluster's (step 4 of the flow)."""
        if task_id[0] not in self.providers:
            return
        if run is None:
            for known in (self._done_here, self._attempts_here, self._backing_off):
                known.pop(task_id, None)
        else:
            self._forget_other_versions(task_id, run.version)
        wanted = self._wanted(run)
        ok = self._terminate_unwanted(task_id, run, wanted)
        ok = self._clean_up_old(task_id, run) and ok
        if wanted and run is not None and task_id not in self._running:
            ok = self._start(task_id, run) and ok
        if run is not None and run.record.unit_count:
            ok = self._call_groups(task_id, run) and ok
        if ok:
            self._attempts.pop(task_id, None)
        else:
            attempt = self._attempts[task_id] = self._attempts.get(task_id, 0) + 1
            with self._lock:
                self._add_timer(self.RETRY_BACKOFF.delay(attempt), TimerKind.RETRY, task_id=task_id)

    def _terminate_unwanted(self, task_id: TaskId, run: ViewRun | None, wanted: bool) -> bool:
        """1. Terminate a handle whose run is no longer wanted here; False if that failed."""
        running = self._running.get(task_id)
        if running is None or (wanted and run is not None and running.version == run.version):
            return True
        if not self._terminate(*task_id, running, count=True):
            return False
        del self._running[task_id]
        if run is not None and run.status is TaskStatus.PAUSED:
            self.metrics.pauses.labels(namespace=task_id[0]).inc()
        return True

    def _clean_up_old(self, task_id: TaskId, run: ViewRun | None) -> bool:
        """2. Clean up the local state of runs that are no longer the current one."""
        namespace, tid = task_id
        local = self._local[namespace].get(tid, set())
        ok = True
        for version in sorted(local - {None if run is None else run.version}):
            if task_id in self._running and self._running[task_id].version == version:
                continue  # its termination failed above; retry both later
            if not self._calls.cleanup(namespace, TaskDescriptor(tid, version)):
                ok = False
                continue
            local.discard(version)
            if not local:
                self._local[namespace].pop(tid, None)
            self.metrics.local_cleanups.labels(namespace=namespace).inc()
            self.log.info("cleaned up local state of %s/%s v%d", namespace, tid, version)
            self._recorder.forget((namespace, tid, version))
            self._desk.forget((namespace, tid, version))
        return ok

    def _start(self, task_id: TaskId, run: ViewRun) -> bool:
        """3. Start a run that should run here; False if the provider raised."""
        namespace, tid = task_id
        attempts = self._attempts_here.get(task_id)
        task = run.task({} if attempts is None else {self.node_id: attempts[1:]})
        if run.record.unit_count:
            unit_task = self._unit_task(task)
            if unit_task is None:
                return False
            task = unit_task
            self._desk.session((namespace, tid, run.version))
        handle = self._calls.start(task)
        if handle is None:
            return False
        self._running[task_id] = _Running(run.version, handle, bool(run.record.unit_count))
        self._local[namespace].setdefault(tid, set()).add(run.version)
        self.metrics.task_starts.labels(namespace=namespace).inc()
        latency = (self.manager.now() - task.started_at).total_seconds()
        self.metrics.start_latency.labels(namespace=namespace).observe(max(0.0, latency))
        self.log.info("started %s/%s v%d", namespace, tid, run.version)
        return True

    def _unit_task(self, task: Task) -> Task | None:
        """``task`` with its declared units (read once per run, then cached by the Manager);
        None when they cannot be read now (the caller retries)."""
        try:
            known = self.manager.known_run(task.namespace, task.id, task.version)
        except (EtcdError, TaskNotFoundError, CorruptRecordError) as exc:
            self.log.info(
                "could not read the units of %s/%s v%d: %s",
                task.namespace,
                task.id,
                task.version,
                exc,
            )
            return None
        return task if known.decl is None else replace(task, units=known.decl.units)

    def _call_groups(self, task_id: TaskId, run: ViewRun) -> bool:
        """Call ``group_completed`` for each completed group of a unit run this node has not
        acknowledged; False when a call or a read failed (retried with backoff)."""
        if self.node_id not in run.assigned:
            return True
        provider = self.providers[task_id[0]]
        hook = getattr(provider, "group_completed", None)
        with self._lock:
            completed = self._view.completed_groups(task_id, run.version)
        if hook is None or not completed:
            return True
        known = self._groups_called.get(task_id)
        if known is None or known[0] != run.version:
            try:
                acked = self.manager.units.acked_groups(*task_id, run.version, self.node_id)
            except EtcdError as exc:
                self.log.info("could not read acknowledged groups of %s/%s: %s", *task_id, exc)
                return False
            known = self._groups_called[task_id] = (run.version, acked)
        todo = sorted(completed - known[1])
        if not todo:
            return True
        task = self._unit_task(run.task())
        if task is None:
            return False
        ok = True
        for group in todo:
            call = self._calls.group_completed(task_id[0], hook, task, group)
            if not call:
                ok = False
                continue
            try:
                self.manager.units.ack_group(*task_id, run.version, self.node_id, group)
            except EtcdError as exc:
                self.log.info("could not acknowledge group %r of %s/%s: %s", group, *task_id, exc)
                ok = False
                continue
            known[1].add(group)
            self.metrics.group_callbacks.labels(namespace=task_id[0]).inc()
            self.log.info("group %r of %s/%s v%d completed", group, *task_id, run.version)
        return ok

    def _forget_other_versions(self, task_id: TaskId, version: int) -> None:
        for known in (self._done_here, self._backing_off):
            if known.get(task_id, version) != version:
                del known[task_id]
        attempts = self._attempts_here.get(task_id)
        if attempts is not None and attempts[0] != version:
            del self._attempts_here[task_id]

    def _terminate(self, namespace: str, task_id: str, running: _Running, *, count: bool) -> bool:
        if not self._calls.terminate(namespace, task_id, running.handle):
            return False
        self._desk.ended((namespace, task_id, running.version))
        if count and not self._recorder.recorded((namespace, task_id, running.version)):
            self.metrics.task_terminations.labels(namespace=namespace).inc()
            self.log.info("terminated %s/%s v%d", namespace, task_id, running.version)
        return True

    def _publish_running(self) -> None:
        snapshot: dict[str, set[TaskDescriptor]] = {ns: set() for ns in self.providers}
        for (namespace, task_id), running in self._running.items():
            snapshot[namespace].add(TaskDescriptor(task_id, running.version))
        with self._lock:
            self._running_snapshot = snapshot
        for namespace, items in snapshot.items():
            self.metrics.tasks_running.labels(namespace=namespace).set(len(items))
