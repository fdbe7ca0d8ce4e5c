"""What users implement (``Provider``, ``TaskHandle``), what they are given
(``TaskCompletionRecorder``), and ``ThreadProvider``, a ready Provider for function-style tasks.

The three Protocols are Weaviate's interfaces, one job each. The Scheduler calls a Provider from
its single worker thread, never concurrently with itself: ``start_task`` must return at once
(start the work in the background), ``terminate`` must not block for long, ``cleanup_task``
removes the local state of a run that is gone. A Provider may raise from any method; the
Scheduler logs, counts and retries with backoff.

``ThreadProvider`` runs ``fn(task, context)`` on a thread of its own per run. ``context.cancelled``
is set by ``terminate()``; ``context.progress(fraction, message)`` reports progress (throttled
by the recorder). A normal return records completion, an exception records failure with its
message (:func:`run_outcome`: the rule :class:`~distributedtask.aio.AsyncThreadProvider`
shares), and a run that was terminated records nothing. Local state is an in-memory set, or,
with ``state_dir``, one directory per run (``<state_dir>/<escaped id>/<version>``) that the
function may use and that ``cleanup_task`` removes (:class:`~distributedtask.rundirs.LocalRuns`).
``join(timeout)`` waits for every run thread to end (after terminating them, a cooperative
function returns promptly).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from .model import Task, TaskDescriptor
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


class TaskContext:
    """What a ThreadProvider function gets besides its task."""

    def __init__(
        self,
        task: Task,
        recorder: TaskCompletionRecorder | None,
        state_dir: Path | None,
    ) -> None:
        self.task = task
        self.cancelled = threading.Event()
        self.state_dir = state_dir
        self._recorder = recorder

    @property
    def attempt(self) -> int:
        """Which attempt of this run on this node this is: 1, then 2 after a failure its run
        policy retries, and so on (the Scheduler hands a provider this node's attempts)."""
        return 1 + max(self.task.attempts.values(), default=0)

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress in [0, 1]; throttled, best effort, never raises."""
        if self._recorder is not None:
            task = self.task
            self._recorder.record_progress(task.namespace, task.id, task.version, fraction, message)


def run_outcome(
    task: Task,
    recorder: TaskCompletionRecorder | None,
    *,
    terminated: bool,
    error: Exception | None,
) -> Callable[[], None] | None:
    """What a function run that ended records, as a call to make: completion when it returned
    (``error`` None), failure when it raised — the message is ``str(error)``, else the
    exception's type name — and nothing (None) when it was terminated or has no recorder."""
    if terminated or recorder is None:
        return None
    if error is None:
        return functools.partial(recorder.record_completion, task.namespace, task.id, task.version)
    log.info("task %s/%s v%d failed: %s", task.namespace, task.id, task.version, error)
    message = str(error) or type(error).__name__
    return functools.partial(
        recorder.record_failure, task.namespace, task.id, task.version, message
    )


class _ThreadHandle:
    def __init__(self, context: TaskContext, thread: threading.Thread) -> None:
        self.context = context
        self.thread = thread

    def terminate(self) -> None:
        self.context.cancelled.set()

    def join(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


TaskFunction = Callable[[Task, TaskContext], None]


class ThreadProvider:
    """A Provider that runs ``fn(task, context)`` on a thread per run (see the module doc)."""

    def __init__(self, fn: TaskFunction, *, state_dir: str | Path | None = None) -> None:
        self._fn = fn
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

    def start_task(self, task: Task) -> TaskHandle:
        context = TaskContext(task, self._recorder, self._runs.open(task.descriptor))
        thread = threading.Thread(
            target=self._run,
            args=(context,),
            name=f"dtask-run-{task.namespace}-{task.id}-{task.version}"[:80],
            daemon=True,
        )
        handle = _ThreadHandle(context, thread)
        with self._lock:
            self._handles = [h for h in self._handles if h.thread.is_alive()]
            self._handles.append(handle)
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

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every run thread to end; True if all did within ``timeout``."""
        with self._lock:
            handles = list(self._handles)
        return all(handle.join(timeout) for handle in handles)
