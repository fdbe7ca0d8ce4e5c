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
message, and a run that was terminated records nothing. Local state is an in-memory set, or,
with ``state_dir``, one directory per run (``<state_dir>/<escaped id>/<version>``) that the
function may use and that ``cleanup_task`` removes (the layout of
:mod:`distributedtask.rundirs`). ``join(timeout)`` waits for every run
thread to end (after terminating them, a cooperative function returns promptly).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from .model import Task, TaskDescriptor
from .rundirs import RunDirs

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
        self._dirs = RunDirs(state_dir) if state_dir is not None else None
        self._recorder: TaskCompletionRecorder | None = None
        self._lock = threading.Lock()
        self._local: set[TaskDescriptor] = set()
        self._handles: list[_ThreadHandle] = []
        if self._dirs is not None:
            self._dirs.root.mkdir(parents=True, exist_ok=True)

    def set_completion_recorder(self, recorder: TaskCompletionRecorder) -> None:
        self._recorder = recorder

    def get_local_tasks(self) -> list[TaskDescriptor]:
        if self._dirs is not None:
            return self._dirs.list()
        with self._lock:
            return sorted(self._local)

    def cleanup_task(self, descriptor: TaskDescriptor) -> None:
        with self._lock:
            self._local.discard(descriptor)
        if self._dirs is not None:
            self._dirs.remove(descriptor)

    def start_task(self, task: Task) -> TaskHandle:
        run_dir = self._dirs.create(task.descriptor) if self._dirs is not None else None
        context = TaskContext(task, self._recorder, run_dir)
        thread = threading.Thread(
            target=self._run,
            args=(context,),
            name=f"dtask-run-{task.namespace}-{task.id}-{task.version}"[:80],
            daemon=True,
        )
        handle = _ThreadHandle(context, thread)
        with self._lock:
            self._local.add(task.descriptor)
            self._handles = [h for h in self._handles if h.thread.is_alive()]
            self._handles.append(handle)
        thread.start()
        return handle

    def _run(self, context: TaskContext) -> None:
        task = context.task
        try:
            self._fn(task, context)
        except Exception as exc:
            if context.cancelled.is_set():
                return
            log.info("task %s/%s v%d failed: %s", task.namespace, task.id, task.version, exc)
            if self._recorder is not None:
                message = str(exc) or type(exc).__name__
                self._recorder.record_failure(task.namespace, task.id, task.version, message)
            return
        if not context.cancelled.is_set() and self._recorder is not None:
            self._recorder.record_completion(task.namespace, task.id, task.version)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every run thread to end; True if all did within ``timeout``."""
        with self._lock:
            handles = list(self._handles)
        return all(handle.join(timeout) for handle in handles)
