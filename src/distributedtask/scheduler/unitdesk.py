"""``UnitDesk``: how a node's providers take and record the units of unit tasks.

The desk is the unit half of the node's recorder (:mod:`.recorder` delegates to it):

- ``claim(task)`` hands the provider one unit: first a unit this node still holds from an
  earlier session of the run (a restart, or a run terminated by a pause: its held keys say so),
  then one from the pool this node may take and whose retry backoff is over (the Scheduler's
  view has the pool: no read), then the next unit by ticket (units.py). One or two round trips.
- ``await_unit(task, stop)`` claims, and while nothing is claimable and the run is still
  live here, *waits on the watch*: a unit given back to the pool, a backoff ending, a pause,
  an outcome, a member leaving — every change the Scheduler's watch brings — wakes it
  (:meth:`UnitDesk.changed`). While the run is PAUSED it claims nothing and waits. It returns
  None once the run has ended, is gone or replaced, or ``stop`` is set (the Scheduler
  terminates a paused run's handle, and wakes waiters after terminating a handle).
- What this node holds is read again whenever it may hold a unit it does not know of: at each
  session, after a claim that failed with an error (applied, its answer lost), after a claim
  that found nothing (a claim applied late), and after a claim that returned once its session
  had ended (handed to the next session).
- A node that has nothing to claim and has seen every ticket handed out looks for lost
  hand-outs (``Manager.units.check_handouts``: one small read) and, while some are missing,
  looks again after a backoff, giving back to the pool what is still missing; a member leaving
  starts a new look.
- ``record_*`` write at once on the caller's thread with the claim the desk handed out (one
  transaction); what etcd cannot take goes to an outbox, sent again from the Scheduler's timers
  until taken or moot (a unit given back meanwhile is refused: logged, dropped). Unit progress
  is throttled to a write a second per unit; the last value is written before the unit's
  completion or failure.

Never raises into a provider but from ``claim`` (:class:`~distributedtask.exceptions.EtcdError`
when etcd cannot answer). Threading: any thread; the desk's state is guarded by its condition.
Lock order: the Scheduler's lock, then the desk's; the desk never calls back into the Scheduler
(``lookup``, ``pool``, ``schedule``) while it holds its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..etcd.backoff import Backoff, jittered
from ..exceptions import (
    DistributedTaskError,
    EtcdError,
    InvalidTaskError,
    TaskNotFoundError,
    TaskNotRunningError,
    UnitClaimError,
)
from ..manager import Manager
from ..metrics import Metrics
from ..model import Progress, Task, TaskStatus, Unit
from ..units import Claim, PoolItem
from .timers import Clock, TimerKind
from .view import ViewRun

__all__ = ["UnitDesk"]

RunKey = tuple[str, str, int]
Schedule = Callable[..., None]


@dataclass(frozen=True)
class _Pending:
    """A unit record etcd could not take yet."""

    failed: bool
    claim: Claim | None
    error: str = ""


def _run(task: Task) -> RunKey:
    return (task.namespace, task.id, task.version)


class UnitDesk:
    """See the module doc. ``lookup`` gives the view's run, ``pool`` the view's pool of a
    run, ``schedule(delay, kind, run, attempt, unit="")`` arms a Scheduler timer."""

    SAFETY_WAIT = 60.0
    """A waiting claimant looks again after this long without news (a safety net)."""
    CHECK_DELAY = (3.0, 30.0)
    """Between two looks for lost hand-outs, doubling from the first to the second, jittered:
    a unit missing at both is given back, so the first must well exceed the time a live node
    takes from its ticket to its claim."""
    PROGRESS_INTERVAL = 1.0
    LATE_WRITE = 15.0
    """After a claim failed with an error: when to look again at what this node holds (a
    request stuck in a member that was frozen is applied when it thaws)."""

    def __init__(
        self,
        manager: Manager,
        node_id: str,
        *,
        metrics: Metrics,
        log: logging.Logger,
        lookup: Callable[[RunKey], ViewRun | None],
        pool: Callable[[RunKey], list[PoolItem]],
        schedule: Schedule,
        backoff: Backoff,
        clock: Clock,
    ) -> None:
        self._manager = manager
        self._units = manager.units
        self._node = node_id
        self._metrics = metrics
        self._log = log
        self._lookup = lookup
        self._pool = pool
        self._schedule = schedule
        self._backoff = backoff
        self._clock = clock
        self._cond = threading.Condition()
        self._generation = 0
        self._closed = False
        self._ready_at: dict[tuple[RunKey, str], float] = {}
        self._out: dict[RunKey, dict[str, Claim]] = {}
        self._held_read: set[RunKey] = set()
        self._held_reading: set[RunKey] = set()  # read by one worker while the others wait
        self._sessions: dict[RunKey, int] = {}  # bumped when a run's handle is terminated
        self._given: dict[RunKey, set[tuple[str, int]]] = {}  # (unit, claim revision) handed
        # out in this session: a claim is run once per session, even once recorded
        self._orphans: dict[RunKey, list[Claim]] = {}
        self._checks: dict[RunKey, set[str] | None] = {}  # None: looked, nothing missing
        self._outbox: dict[tuple[RunKey, str], _Pending] = {}
        self._progress: dict[tuple[RunKey, str], tuple[float, tuple[float, str] | None]] = {}

    # ---- for providers --------------------------------------------------------------------

    def claim(self, task: Task) -> Unit | None:
        """One unit for this node, or None when nothing is claimable now. Raises
        :class:`EtcdError`, :class:`TaskNotFoundError`, :class:`TaskNotRunningError`,
        :class:`InvalidTaskError` (not a unit task, or not one of its nodes)."""
        run = _run(task)
        namespace, task_id, version = run
        orphan = self._orphan(run)
        if orphan is not None:
            return orphan.unit(self._node)
        with self._cond:
            session = self._sessions.get(run, 0)
        known = self._manager.known_run(namespace, task_id, version, self._node)
        now = self._clock()
        items = self._pool(run)  # takes the Scheduler's lock: never under the desk's
        with self._cond:
            pool = [i for i in items if self._ready_at.get((run, i.unit_id), 0.0) <= now]
        try:
            got = self._units.claim(namespace, task_id, version, self._node, known, pool=pool)
        except EtcdError:
            # The claim may have been applied, its answer lost — or be applied later, by a
            # member that was stuck: this node would then hold a unit it does not know of.
            # Read what it holds again at the next claim, and wake the claimants once more
            # when a late write would have landed.
            with self._cond:
                self._held_read.discard(run)
            self._schedule(self.LATE_WRITE, TimerKind.UNIT_READY, run, 0)
            raise
        if got is None:
            with self._cond:  # nothing now: at the next claim, look at what it holds again
                self._held_read.discard(run)  # (a claim applied late after a lost answer)
            return None
        with self._cond:
            twice = False
            if self._sessions.get(run, 0) != session:
                # The run's handle was terminated while this claim was under way: the unit is
                # held in etcd, and the next session's claimants take it (read again).
                self._held_read.discard(run)
                self._generation += 1
                self._cond.notify_all()
            else:
                given = self._given.setdefault(run, set())
                # Read as held by another worker while this claim was under way, and handed
                # out already: one run of a claim here is enough.
                twice = (got.spec.id, got.revision) in given
                if not twice:
                    given.add((got.spec.id, got.revision))
                    self._out.setdefault(run, {})[got.spec.id] = got
        return self.claim(task) if twice else got.unit(self._node)

    def _orphan(self, run: RunKey) -> Claim | None:
        """A unit this node holds in etcd and no worker of this session was handed (read
        once per session, and again when it may hold one it does not know of), or None."""
        namespace, task_id, version = run
        with self._cond:
            while run in self._held_reading:  # another worker of this node reads them
                self._cond.wait()
            first = run not in self._held_read
            if first:
                self._held_reading.add(run)
        if first:
            try:
                held = self._units.held(namespace, task_id, version, self._node)
            finally:
                with self._cond:
                    self._held_reading.discard(run)
                    self._cond.notify_all()
            with self._cond:
                if run not in self._held_read:
                    self._held_read.add(run)
                    given = self._given.setdefault(run, set())
                    self._orphans[run] = [c for c in held if (c.spec.id, c.revision) not in given]
        with self._cond:
            orphans = self._orphans.get(run, [])
            given = self._given.setdefault(run, set())
            while orphans:
                claim = orphans.pop(0)
                if (claim.spec.id, claim.revision) not in given:  # not handed out meanwhile
                    given.add((claim.spec.id, claim.revision))
                    self._out.setdefault(run, {})[claim.spec.id] = claim
                    return claim
        return None

    def await_unit(self, task: Task, stop: threading.Event) -> Unit | None:
        """Claim a unit, waiting on the watch while none is claimable (see the module doc);
        None once the run is no longer STARTED here, ``stop`` is set or the desk closed."""
        run = _run(task)
        failures = 0
        while True:
            with self._cond:
                generation = self._generation
                if self._closed or stop.is_set():
                    return None
            current = self._lookup(run)
            if current is None or current.outcome is not None:
                return None  # ended, removed or replaced
            wait = self.SAFETY_WAIT
            if current.status is TaskStatus.PAUSED:
                # Claim nothing, but stay: the Scheduler terminates this session (``stop``);
                # if it sees the resume first, the session goes on.
                with self._cond:
                    while generation == self._generation and not self._closed and not stop.is_set():
                        if not self._cond.wait(wait):
                            break
                continue
            try:
                unit = self.claim(task)
            except (TaskNotFoundError, TaskNotRunningError, InvalidTaskError):
                return None
            except EtcdError as exc:
                failures += 1
                wait = self._backoff.delay(failures)
                self._log.info("claiming a unit of %s/%s v%d: %s", *run, exc)
            else:
                failures = 0
                if unit is not None:
                    return unit
                self._idle(run)
            with self._cond:
                while generation == self._generation and not self._closed and not stop.is_set():
                    if not self._cond.wait(wait):
                        break

    def record_completion(self, run: RunKey, unit_id: str) -> None:
        self._record(run, unit_id, _Pending(False, self._hand_back(run, unit_id)))

    def record_failure(self, run: RunKey, unit_id: str, error: str) -> None:
        claim = self._hand_back(run, unit_id)
        if claim is None:
            # Not handed out by this session (its handle was terminated, or the failure is
            # recorded twice): counting it could count an attempt this node runs now.
            self._log.warning(
                "failure of unit %r of %s/%s v%d not recorded: not held by this session",
                unit_id,
                *run,
            )
            return
        self._record(run, unit_id, _Pending(True, claim, str(error)))

    def record_progress(self, run: RunKey, unit_id: str, fraction: float, message: str) -> None:
        now = self._clock()
        key = (run, unit_id)
        with self._cond:
            last, _ = self._progress.get(key, (-1e18, None))
            if now - last < self.PROGRESS_INTERVAL:
                self._progress[key] = (last, (fraction, message))
                return
            self._progress[key] = (now, None)
        self._write_progress(run, unit_id, fraction, message)

    # ---- for the Scheduler ----------------------------------------------------------------

    def changed(self) -> None:
        """Something the waiting claimants may care about changed: wake them."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def members_changed(self) -> None:
        """A member came or went: runs looked at and found whole are looked at again when a
        claimant next finds nothing (a node that left may have lost a hand-out)."""
        with self._cond:
            for run in [run for run, missing in self._checks.items() if missing is None]:
                del self._checks[run]
            self._generation += 1
            self._cond.notify_all()

    def note_pool(self, run: RunKey, items: list[PoolItem]) -> list[tuple[float, str]]:
        """Note when the pool items of ``run`` become claimable here; returns ``(delay,
        unit)`` of those that are not yet (the caller arms UNIT_READY timers)."""
        wall = self._manager.now()
        now = self._clock()
        later = []
        with self._cond:
            for item in items:
                key = (run, item.unit_id)
                if key in self._ready_at:
                    continue
                left = (item.entry.not_before - wall).total_seconds()
                delay = min(max(0.0, left), item.entry.delay_ms / 1000)
                self._ready_at[key] = now + delay
                if delay > 0:
                    later.append((delay, item.unit_id))
        return later

    def session(self, run: RunKey) -> None:
        """A run starts here (again): units this node holds in etcd are handed out first."""
        with self._cond:
            self._sessions[run] = self._sessions.get(run, 0) + 1
            self._given.pop(run, None)
            self._out.pop(run, None)
            self._held_read.discard(run)
            self._orphans.pop(run, None)

    def ended(self, run: RunKey) -> None:
        """The run's handle was terminated here: what it was handed and did not record is
        held again (handed out again at the next session), and its claimants wake."""
        with self._cond:
            self._sessions[run] = self._sessions.get(run, 0) + 1
            self._given.pop(run, None)
            self._out.pop(run, None)
            self._held_read.discard(run)
            self._orphans.pop(run, None)
            self._generation += 1
            self._cond.notify_all()

    def forget(self, run: RunKey) -> None:
        """The run is gone: drop everything about it."""
        with self._cond:
            self._out.pop(run, None)
            self._orphans.pop(run, None)
            self._checks.pop(run, None)
            self._sessions.pop(run, None)
            self._given.pop(run, None)
            self._held_read.discard(run)
            self._ready_at = {k: v for k, v in self._ready_at.items() if k[0] != run}
            self._progress = {k: v for k, v in self._progress.items() if k[0] != run}
            self._outbox = {k: v for k, v in self._outbox.items() if k[0] != run}

    def close(self) -> None:
        """Wake and release every waiting claimant (the Scheduler stops)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def check(self, run: RunKey, attempt: int) -> None:
        """A UNIT_CHECK timer: look for lost hand-outs of ``run`` (see the module doc)."""
        with self._cond:
            if run not in self._checks:
                return
            before = self._checks[run] or set()
        current = self._lookup(run)
        if current is None or current.outcome is not None:
            with self._cond:
                self._checks.pop(run, None)
            return
        try:
            missing, given = self._units.check_handouts(*run, give_back=before)
        except EtcdError as exc:
            self._log.info("looking for lost units of %s/%s v%d: %s", *run, exc)
            self._schedule(self._check_delay(attempt + 1), TimerKind.UNIT_CHECK, run, attempt + 1)
            return
        if given:
            self._metrics.units_reassigned.labels(namespace=run[0]).inc(given)
            self._log.warning(
                "gave back %d unit(s) of %s/%s v%d handed out and never claimed", given, *run
            )
        with self._cond:
            if run not in self._checks:
                return
            self._checks[run] = missing or None
        if missing:
            self._schedule(self._check_delay(attempt + 1), TimerKind.UNIT_CHECK, run, attempt + 1)

    def retry(self, run: RunKey, unit_id: str, attempt: int) -> None:
        """A UNIT_RECORD timer: send a queued unit record again."""
        with self._cond:
            pending = self._outbox.get((run, unit_id))
        if pending is None:
            return
        if self._send(run, unit_id, pending):
            with self._cond:
                self._outbox.pop((run, unit_id), None)
        else:
            self._schedule(
                self._backoff.delay(attempt + 1),
                TimerKind.UNIT_RECORD,
                run,
                attempt + 1,
                unit=unit_id,
            )

    def flush_outbox(self) -> None:
        """One last try of every queued unit record (at stop)."""
        with self._cond:
            pending = list(self._outbox.items())
            self._outbox.clear()
        for (run, unit_id), record in pending:
            if not self._send(run, unit_id, record):
                self._log.error("lost the record of unit %r of %s/%s v%d at stop", unit_id, *run)

    # ---- internals ------------------------------------------------------------------------

    def _check_delay(self, attempt: int) -> float:
        first, most = self.CHECK_DELAY
        return jittered(min(most, first * 2 ** (attempt - 1)))

    def _idle(self, run: RunKey) -> None:
        """Nothing to claim: once every ticket is handed out, look for lost hand-outs."""
        if not self._units.exhausted(*run, self._node):
            return
        with self._cond:
            if run in self._checks:
                return
            self._checks[run] = set()
        self._schedule(0.0, TimerKind.UNIT_CHECK, run, 0)

    def _hand_back(self, run: RunKey, unit_id: str) -> Claim | None:
        with self._cond:
            claim = self._out.get(run, {}).pop(unit_id, None)
            pending = self._progress.pop((run, unit_id), None)
        if pending is not None and pending[1] is not None:
            self._write_progress(run, unit_id, *pending[1])
        return claim

    def _record(self, run: RunKey, unit_id: str, record: _Pending) -> None:
        if self._send(run, unit_id, record):
            return
        self._metrics.record_retries.labels(operation="unit").inc()
        with self._cond:
            self._outbox[(run, unit_id)] = record
        self._schedule(self._backoff.delay(1), TimerKind.UNIT_RECORD, run, 1, unit=unit_id)

    def _send(self, run: RunKey, unit_id: str, record: _Pending) -> bool:
        """Write a unit's completion or failure; True when done or moot, False to retry."""
        namespace, task_id, version = run
        what = "failure" if record.failed else "completion"
        try:
            known = self._manager.known_run(namespace, task_id, version)
            if record.failed:
                self._units.fail(
                    namespace,
                    task_id,
                    version,
                    unit_id,
                    self._node,
                    record.error,
                    known,
                    record.claim,
                )
                self._metrics.units_failed.labels(namespace=namespace).inc()
            else:
                self._units.complete(
                    namespace,
                    task_id,
                    version,
                    unit_id,
                    self._node,
                    known,
                    record.claim,
                    take_ahead=True,
                )
                self._metrics.units_completed.labels(namespace=namespace).inc()
        except UnitClaimError as exc:
            self._log.warning("%s of unit %r of %s/%s v%d refused: %s", what, unit_id, *run, exc)
        except (TaskNotFoundError, TaskNotRunningError) as exc:
            self._log.info("%s of unit %r of %s/%s v%d: %s", what, unit_id, *run, exc)
        except InvalidTaskError as exc:
            self._log.error("%s of unit %r of %s/%s v%d refused: %s", what, unit_id, *run, exc)
        except DistributedTaskError as exc:
            self._log.warning(
                "%s of unit %r of %s/%s v%d failed (%s); will retry", what, unit_id, *run, exc
            )
            return False
        except Exception:  # a bug: retrying will not help, and the recorder must not raise
            self._log.exception("%s of unit %r of %s/%s v%d failed", what, unit_id, *run)
        return True

    def _write_progress(self, run: RunKey, unit_id: str, fraction: float, message: str) -> None:
        try:
            progress = Progress(
                min(1.0, max(0.0, float(fraction))), str(message)[:4096], self._manager.now()
            )
            self._units.progress(*run, unit_id, self._node, progress)
        except (TaskNotFoundError, TaskNotRunningError):
            pass
        except DistributedTaskError as exc:
            self._log.info("progress of unit %r of %s/%s v%d not written: %s", unit_id, *run, exc)
        except Exception:  # the recorder must not raise into a provider
            self._log.exception("progress of unit %r of %s/%s v%d not written", unit_id, *run)
