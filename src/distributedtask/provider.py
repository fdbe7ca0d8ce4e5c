"""What users implement (``Provider``, ``TaskHandle``), what they are given
(``TaskCompletionRecorder``), and ``ThreadProvider``, a ready Provider for function-style tasks.

The three Protocols are Weaviate's interfaces, one job each. The Scheduler calls a Provider from
its single worker thread, never concurrently with itself: ``start_task`` must return at once
(start the work in the background), ``terminate`` must not block for long, ``cleanup_task``
removes the local state of a run that is gone. A Provider may raise from any method; the
Scheduler logs, counts and retries with backoff.

``ThreadProvider`` runs ``fn(task, context)`` on a thread of its own per run; for a unit task it
claims units (``recorder.await_unit``) and calls ``fn`` once per unit with ``context.unit`` set,
up to ``unit_concurrency`` at a time, until the run is no longer STARTED here; a unit's return
or raise records that unit. ``on_group_completed(task, group)`` is its ``group_completed``.
``context.cancelled`` is set by ``terminate()``; ``context.progress(fraction, message)``
reports progress (throttled by the recorder). A normal return records completion, an
exception records failure with its message (:func:`run_outcome`: the rule
:class:`~distributedtask.aio.AsyncThreadProvider` shares), and a run that was terminated
records nothing. Local state is an in-memory set, or, with ``state_dir``, one directory per run
(``<state_dir>/<escaped id>/<version>``) that the function may use and that ``cleanup_task``
removes (:class:`~distributedtask.rundirs.LocalRuns`). ``join(timeout)`` waits for every run
thread to end (after terminating them, a cooperative function returns promptly).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from .model import Task, TaskDescriptor, Unit
from .rundirs import LocalRuns

__all__ = [
    "Provider",
    "TaskCompletionRecorder",
    "TaskContext",
    "TaskHandle",
    "ThreadProvider",
]

log = logging.getLogger("distributedtask.provider")


@runtime_checkable
class TaskHandle(Protocol):
    """A run started by a Provider."""

    def terminate(self) -> None:
        """Stop running; a no-op if it already ended. Keep the local state."""


@runtime_checkable
class TaskCompletionRecorder(Protocol):
    """Given to providers; bound to the local node. Never raises: a record that etcd cannot
    take now is retried in the background until it is taken or no longer matters."""

    def record_completion(self, namespace: str, task_id: str, version: int) -> None: ...

    def record_failure(self, namespace: str, task_id: str, version: int, error: str) -> None: ...

    def record_progress(
        self, namespace: str, task_id: str, version: int, fraction: float, message: str = ""
    ) -> None:
        """Best effort, throttled to one etcd write a second per run; the last value wins."""

    def claim_unit(self, task: Task) -> Unit | None:
        """Claim one unit of a unit task for this node; None when nothing is claimable now.
        May raise :class:`~distributedtask.exceptions.EtcdError`."""

    def await_unit(self, task: Task, stop: threading.Event) -> Unit | None:
        """Like :meth:`claim_unit`, but waits (on the watch) while nothing is claimable and
        the run is STARTED here; None once it is not, or ``stop`` is set."""

    def record_unit_completion(
        self, namespace: str, task_id: str, version: int, unit_id: str
    ) -> None: ...

    def record_unit_failure(
        self, namespace: str, task_id: str, version: int, unit_id: str, error: str
    ) -> None: ...

    def record_unit_progress(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        fraction: float,
        message: str = "",
    ) -> None:
        """Best effort, throttled to one etcd write a second per unit."""


@runtime_checkable
class Provider(Protocol):
    """One per namespace, per node: runs that namespace's tasks locally."""

    def set_completion_recorder(self, recorder: TaskCompletionRecorder) -> None: ...

    def get_local_tasks(self) -> Iterable[TaskDescriptor]:
        """The runs that have local state on this node."""

    def cleanup_task(self, descriptor: TaskDescriptor) -> None:
        """Remove the local state of a run."""

    def start_task(self, task: Task) -> TaskHandle:
        """Start the run in the background and return at once."""

    # Optional: ``group_completed(task, group) -> None``, called on every node of a unit task,
    # once per node per run (at least once: make it idempotent), when every unit of ``group``
    # is COMPLETED; retried with backoff when it raises. Not part of the Protocol, so that
    # providers without units need not define it.


class TaskContext:
    """What a ThreadProvider function gets besides its task: ``cancelled`` (set by
    terminate), ``state_dir``, ``unit`` (the unit to process, for a unit task) and
    :meth:`progress`."""

    def __init__(
        self,
        task: Task,
        recorder: TaskCompletionRecorder | None,
        state_dir: Path | None,
        unit: Unit | None = None,
        cancelled: threading.Event | None = None,
    ) -> None:
        self.task = task
        self.cancelled = threading.Event() if cancelled is None else cancelled
        self.state_dir = state_dir
        self.unit = unit
        self._recorder = recorder

    @property
    def attempt(self) -> int:
        """Which attempt this is: 1, then 2 after a failure its run policy retries, and so on
        — of this run on this node (the Scheduler hands a provider this node's attempts), or
        of :attr:`unit` for a unit task."""
        if self.unit is not None:
            return 1 + self.unit.attempts
        return 1 + max(self.task.attempts.values(), default=0)

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress in [0, 1] (of the unit, for a unit task); throttled, best effort,
        never raises."""
        if self._recorder is None:
            return
        task = self.task
        if self.unit is not None:
            self._recorder.record_unit_progress(
                task.namespace, task.id, task.version, self.unit.id, fraction, message
            )
        else:
            self._recorder.record_progress(task.namespace, task.id, task.version, fraction, message)


def run_outcome(
    task: Task,
    recorder: TaskCompletionRecorder | None,
    *,
    terminated: bool,
    error: Exception | None,
    unit: Unit | None = None,
) -> Callable[[], None] | None:
    """What a function run that ended records, as a call to make: completion when it returned
    (``error`` None), failure when it raised — the message is ``str(error)``, else the
    exception's type name — and nothing (None) when it was terminated or has no recorder.
    With ``unit``, the unit's completion or failure."""
    if terminated or recorder is None:
        return None
    run = (task.namespace, task.id, task.version)
    if error is None:
        if unit is not None:
            return functools.partial(recorder.record_unit_completion, *run, unit.id)
        return functools.partial(recorder.record_completion, *run)
    message = str(error) or type(error).__name__
    if unit is not None:
        log.info("unit %r of %s/%s v%d failed: %s", unit.id, *run, error)
        return functools.partial(recorder.record_unit_failure, *run, unit.id, message)
    log.info("task %s/%s v%d failed: %s", *run, error)
    return functools.partial(recorder.record_failure, *run, message)


class _ThreadHandle:
    def __init__(self, context: TaskContext, threads: list[threading.Thread]) -> None:
        self.context = context
        self.threads = threads

    def terminate(self) -> None:
        self.context.cancelled.set()

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def join(self, timeout: float | None = None) -> bool:
        for thread in self.threads:
            thread.join(timeout)
        return not self.alive()


TaskFunction = Callable[[Task, TaskContext], None]
GroupCallback = Callable[[Task, str], None]


class ThreadProvider:
    """A Provider that runs ``fn(task, context)`` on a thread per run — per unit for a unit
    task, ``unit_concurrency`` at a time — (see the module doc). ``on_group_completed`` is
    called as its ``group_completed`` hook. Raises :class:`ValueError` for a
    ``unit_concurrency`` below 1."""

    def __init__(
        self,
        fn: TaskFunction,
        *,
        state_dir: str | Path | None = None,
        unit_concurrency: int = 1,
        on_group_completed: GroupCallback | None = None,
    ) -> None:
        if not isinstance(unit_concurrency, int) or unit_concurrency < 1:
            raise ValueError(f"unit_concurrency must be an int >= 1: {unit_concurrency!r}")
        self._fn = fn
        self._unit_concurrency = unit_concurrency
        self._on_group_completed = on_group_completed
        self._runs = LocalRuns(state_dir)
        self._recorder: TaskCompletionRecorder | None = None
        self._lock = threading.Lock()
        self._handles: list[_ThreadHandle] = []

    def set_completion_recorder(self, recorder: TaskCompletionRecorder) -> None:
        self._recorder = recorder

    def get_local_tasks(self) -> list[TaskDescriptor]:
        return self._runs.list()

    def cleanup_task(self, descriptor: TaskDescriptor) -> None:
        self._runs.remove(descriptor)

    def group_completed(self, task: Task, group: str) -> None:
        """Call ``on_group_completed(task, group)``, if given."""
        if self._on_group_completed is not None:
            self._on_group_completed(task, group)

    def start_task(self, task: Task) -> TaskHandle:
        context = TaskContext(task, self._recorder, self._runs.open(task.descriptor))
        name = f"dtask-run-{task.namespace}-{task.id}-{task.version}"[:72]
        if task.units:
            threads = [
                threading.Thread(
                    target=self._run_units, args=(context,), name=f"{name}-u{i}", daemon=True
                )
                for i in range(self._unit_concurrency)
            ]
        else:
            threads = [threading.Thread(target=self._run, args=(context,), name=name, daemon=True)]
        handle = _ThreadHandle(context, threads)
        with self._lock:
            self._handles = [h for h in self._handles if h.alive()]
            self._handles.append(handle)
        for thread in threads:
            thread.start()
        return handle

    def _run(self, context: TaskContext) -> None:
        error: Exception | None = None
        try:
            self._fn(context.task, context)
        except Exception as exc:
            error = exc
        record = run_outcome(
            context.task, self._recorder, terminated=context.cancelled.is_set(), error=error
        )
        if record is not None:
            record()

    def _run_units(self, run_context: TaskContext) -> None:
        """One of the run's unit workers: claim, run, record, until nothing is left here."""
        recorder, task = self._recorder, run_context.task
        if recorder is None:
            return
        while not run_context.cancelled.is_set():
            try:
                unit = recorder.await_unit(task, run_context.cancelled)
            except Exception:  # a recorder of another kind: claim_unit may raise
                log.exception("claiming a unit of %s/%s v%d", task.namespace, task.id, task.version)
                return
            if unit is None:
                return
            context = TaskContext(
                task, recorder, run_context.state_dir, unit, run_context.cancelled
            )
            error: Exception | None = None
            try:
                self._fn(task, context)
            except Exception as exc:
                error = exc
            record = run_outcome(
                task, recorder, terminated=context.cancelled.is_set(), error=error, unit=unit
            )
            if record is not None:
                record()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every run thread to end; True if all did within ``timeout``."""
        with self._lock:
            handles = list(self._handles)
        return all(handle.join(timeout) for handle in handles)
