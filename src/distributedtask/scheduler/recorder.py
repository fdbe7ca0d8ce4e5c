"""``NodeRecorder``: the :class:`~distributedtask.provider.TaskCompletionRecorder` a Scheduler
gives its providers, bound to its node.

- ``record_completion`` / ``record_failure`` write synchronously on the caller's thread. When
  etcd cannot take them (:class:`~distributedtask.exceptions.EtcdError`) they go to an outbox
  and are sent again, with backoff, from the Scheduler's timers, until taken or moot (the run
  ended or was replaced). A run this node has recorded is never started again here, even before
  etcd confirms it (:meth:`NodeRecorder.recorded`) — unless its run policy retries the failure
  it recorded: ``on_retry`` tells the Scheduler, which starts it again after the backoff.
- ``record_progress`` is throttled to one write a second per run; the last value is always
  written (by a timer, and before the run's completion or failure).
- Writes use what the Scheduler's view knows of the run (its record), so a completion is one
  transaction and needs no read of the node list; a run the view no longer knows is recorded
  through the Manager's checked methods.
- The unit methods (``claim_unit``, ``await_unit``, ``record_unit_*``) are the node's
  :class:`~.unitdesk.UnitDesk`.

The recorder never raises into a provider. Threading: any thread may call it; its state is
guarded by its own lock, and it schedules its retries through the ``schedule`` callback.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..etcd.backoff import Backoff
from ..exceptions import (
    DistributedTaskError,
    InvalidTaskError,
    TaskNotFoundError,
    TaskNotRunningError,
)
from ..manager import KnownRun, Manager
from ..metrics import Metrics
from ..model import RunPolicy, Task, Unit
from .timers import Clock, TimerKind
from .unitdesk import UnitDesk
from .view import ViewRun

__all__ = ["NodeRecorder", "RecordKind"]

RunKey = tuple[str, str, int]  # (namespace, task id, version)


class RecordKind(str, enum.Enum):
    """What a node records of a run; the values label ``record_retries_total``."""

    COMPLETE = "complete"
    FAIL = "fail"
    PROGRESS = "progress"


@dataclass(frozen=True)
class _Record:
    kind: RecordKind
    run: RunKey
    error: str = ""


@dataclass
class _Throttle:
    last: float  # when progress was last written (clock seconds)
    pending: tuple[float, str] | None = None


class NodeRecorder:
    """See the module doc. ``lookup`` returns the view's run for a key (or None);
    ``on_recorded`` is told of each run recorded (the Scheduler reconciles it);
    ``schedule(delay, kind, run, attempt)`` arms a timer."""

    PROGRESS_INTERVAL = 1.0

    def __init__(
        self,
        manager: Manager,
        node_id: str,
        *,
        metrics: Metrics,
        log: logging.Logger,
        lookup: Callable[[RunKey], ViewRun | None],
        on_recorded: Callable[[RunKey], None],
        on_retry: Callable[[RunKey, int, str, RunPolicy], None],
        schedule: Callable[[float, TimerKind, RunKey, int], None],
        backoff: Backoff,
        clock: Clock,
        desk: UnitDesk,
    ) -> None:
        self._manager = manager
        self.desk = desk
        self._node = node_id
        self._metrics = metrics
        self._log = log
        self._lookup = lookup
        self._on_recorded = on_recorded
        self._on_retry = on_retry
        self._schedule = schedule
        self._backoff = backoff
        self._clock = clock
        self._lock = threading.Lock()
        self._recorded: set[RunKey] = set()
        self._outbox: dict[RunKey, _Record] = {}
        self._throttles: dict[RunKey, _Throttle] = {}

    # ---- the TaskCompletionRecorder protocol ----------------------------------------------

    def record_completion(self, namespace: str, task_id: str, version: int) -> None:
        self._record(_Record(RecordKind.COMPLETE, (namespace, task_id, version)))

    def record_failure(self, namespace: str, task_id: str, version: int, error: str) -> None:
        self._record(_Record(RecordKind.FAIL, (namespace, task_id, version), str(error)))

    def record_progress(
        self, namespace: str, task_id: str, version: int, fraction: float, message: str = ""
    ) -> None:
        run = (namespace, task_id, version)
        now = self._clock()
        with self._lock:
            throttle = self._throttles.get(run)
            if throttle is not None and now - throttle.last < self.PROGRESS_INTERVAL:
                if throttle.pending is None:
                    delay = throttle.last + self.PROGRESS_INTERVAL - now
                    self._schedule(delay, TimerKind.PROGRESS, run, 0)
                throttle.pending = (fraction, message)
                return
            self._throttles[run] = _Throttle(now)
        self._write_progress(run, fraction, message)

    def claim_unit(self, task: Task) -> Unit | None:
        """Claim one unit of ``task`` for this node (None: nothing claimable now). Raises
        :class:`~distributedtask.exceptions.EtcdError` when etcd cannot answer."""
        return self.desk.claim(task)

    def await_unit(self, task: Task, stop: threading.Event) -> Unit | None:
        """Claim one unit, waiting on the watch while none is claimable and the run is
        STARTED; None once it is not (ended, paused, gone) or ``stop`` is set."""
        return self.desk.await_unit(task, stop)

    def record_unit_completion(
        self, namespace: str, task_id: str, version: int, unit_id: str
    ) -> None:
        self.desk.record_completion((namespace, task_id, version), unit_id)

    def record_unit_failure(
        self, namespace: str, task_id: str, version: int, unit_id: str, error: str
    ) -> None:
        self.desk.record_failure((namespace, task_id, version), unit_id, error)

    def record_unit_progress(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        fraction: float,
        message: str = "",
    ) -> None:
        self.desk.record_progress((namespace, task_id, version), unit_id, fraction, message)

    # ---- for the Scheduler ----------------------------------------------------------------

    def recorded(self, run: RunKey) -> bool:
        """Whether this node recorded ``run`` (so it must not start it again)."""
        with self._lock:
            return run in self._recorded

    def forget_record(self, run: RunKey) -> None:
        """Let ``run`` be started here again: its failed attempt was counted and its
        backoff is over."""
        with self._lock:
            self._recorded.discard(run)

    def forget(self, run: RunKey) -> None:
        """Drop what is kept about ``run`` (its local state was cleaned up)."""
        with self._lock:
            self._recorded.discard(run)
            self._throttles.pop(run, None)

    def flush_progress(self, run: RunKey) -> None:
        """Write the pending progress of ``run``, if any (a PROGRESS timer)."""
        with self._lock:
            throttle = self._throttles.get(run)
            if throttle is None or throttle.pending is None:
                return
            pending, throttle.pending, throttle.last = throttle.pending, None, self._clock()
        self._write_progress(run, *pending)

    def retry(self, run: RunKey, attempt: int) -> None:
        """Send the outbox entry of ``run`` again (a RECORD timer)."""
        with self._lock:
            record = self._outbox.get(run)
        if record is None:
            return
        if self._send(record):
            with self._lock:
                self._outbox.pop(run, None)
        else:
            self._schedule(self._backoff.delay(attempt + 1), TimerKind.RECORD, run, attempt + 1)

    def flush_outbox(self) -> None:
        """One last try of every queued record (at stop)."""
        with self._lock:
            pending = list(self._outbox.values())
            self._outbox.clear()
        for record in pending:
            if not self._send(record):
                self._log.error(
                    "lost %s of %s/%s v%d at stop: etcd unreachable", record.kind.value, *record.run
                )

    # ---- internals ------------------------------------------------------------------------

    def _record(self, record: _Record) -> None:
        with self._lock:
            self._recorded.add(record.run)
        self._on_recorded(record.run)
        self.flush_progress(record.run)  # the last value is always written, and first
        if not self._send(record):
            self._metrics.record_retries.labels(operation=record.kind.value).inc()
            with self._lock:
                self._outbox[record.run] = record
            self._schedule(self._backoff.delay(1), TimerKind.RECORD, record.run, 1)

    def _known(self, run: RunKey) -> KnownRun | None:
        view_run = self._lookup(run)
        if view_run is None or view_run.version != run[2]:
            return None
        return KnownRun(view_run.record, view_run.assigned)

    def _send(self, record: _Record) -> bool:
        """Write a completion or failure; True when done or moot, False to retry later."""
        namespace, task_id, version = record.run
        manager, node = self._manager, self._node
        try:
            known = self._known(record.run)
            if record.kind is RecordKind.COMPLETE:
                if known is None:
                    manager.record_node_completion(namespace, task_id, version, node)
                else:
                    manager.complete(namespace, task_id, version, node, known)
            else:
                if known is None:
                    after = manager.record_node_failure(
                        namespace, task_id, version, node, record.error
                    )
                else:
                    after = manager.fail(
                        namespace,
                        task_id,
                        version,
                        node,
                        record.error,
                        max_attempts=known.record.policy.max_attempts,
                    )
                if not after.status.terminal:  # counted, with attempts left: a retry
                    self._on_retry(
                        record.run, after.attempts.get(node, 0), record.error, after.policy
                    )
        except (TaskNotFoundError, TaskNotRunningError) as exc:
            self._log.info("record %s of %s/%s v%d: %s", record.kind.value, *record.run, exc)
        except InvalidTaskError as exc:
            self._log.error(
                "record %s of %s/%s v%d refused: %s", record.kind.value, *record.run, exc
            )
        except DistributedTaskError as exc:
            self._log.warning(
                "record %s of %s/%s v%d failed (%s); will retry",
                record.kind.value,
                *record.run,
                exc,
            )
            return False
        except Exception:  # a bug: retrying will not help, and the recorder must not raise
            self._log.exception("record %s of %s/%s v%d failed", record.kind.value, *record.run)
        return True

    def _write_progress(self, run: RunKey, fraction: float, message: str) -> None:
        namespace, task_id, version = run
        try:
            if self._known(run) is None:
                self._manager.record_progress(
                    namespace, task_id, version, self._node, fraction, message
                )
            else:
                self._manager.progress(namespace, task_id, version, self._node, fraction, message)
        except (TaskNotFoundError, TaskNotRunningError):
            with self._lock:
                self._throttles.pop(run, None)
        except DistributedTaskError as exc:
            self._metrics.record_retries.labels(operation=RecordKind.PROGRESS.value).inc()
            self._log.info("progress of %s/%s v%d not written: %s", *run, exc)
        except Exception:  # the recorder must not raise into a provider
            self._log.exception("progress of %s/%s v%d not written", *run)
