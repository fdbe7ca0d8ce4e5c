"""Helpers of our own suite (imported by tests; the etcd fixtures come from the plugin)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import IO, Any

from prometheus_client import CollectorRegistry

import distributedtask as dt
from distributedtask.keys import prefix_range_end


class Monotonic:
    """An injected monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class FakeClock:
    """A settable clock for the Manager: aware UTC, moves only when told."""

    def __init__(self) -> None:
        self._now = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta


def keys_under(client: dt.EtcdClient, prefix: str) -> list[bytes]:
    """Every key under ``prefix`` (a test's own prefix), read directly."""
    root = (prefix.rstrip("/") + "/").encode()
    return [kv.key for kv in client.range(root, prefix_range_end(root), keys_only=True).kvs]


def run_keys_under(client: dt.EtcdClient, prefix: str) -> list[bytes]:
    """The keys under ``prefix`` but the layout marker: what runs and members left behind."""
    marker = (prefix.rstrip("/") + "/format").encode()
    return [key for key in keys_under(client, prefix) if key != marker]


# ---- Scheduler test helpers ------------------------------------------------------------------

SCHEDULER_THREAD_PREFIXES = (
    "dtask-worker-",
    "dtask-watch-",
    "dtask-assign-",
    "dtask-lease-",
    "dtask-run-",
)


def scheduler_threads() -> list[str]:
    """Names of live threads a Scheduler (or a ThreadProvider run) started."""
    return sorted(
        thread.name
        for thread in threading.enumerate()
        if thread.name.startswith(SCHEDULER_THREAD_PREFIXES)
    )


class InjectedError(RuntimeError):
    """What a RecordingProvider raises when told to fail."""


class RecordingHandle:
    """The handle of a RecordingProvider run: ``terminated`` is set by ``terminate()``."""

    def __init__(self, provider: RecordingProvider, task: dt.Task) -> None:
        self.task = task
        self.terminated = threading.Event()
        self._provider = provider

    def terminate(self) -> None:
        self._provider._terminate(self)


class RecordingProvider:
    """A Provider that records every call, thread-safely, and fails on demand.

    ``local`` is the local state it starts with (what ``get_local_tasks`` reports); a start adds
    the run to it and a clean-up removes it. ``fail`` maps an operation (``"start"``,
    ``"terminate"``, ``"cleanup"``, ``"list"``) to how many of its next calls raise
    :class:`InjectedError`. Runs do nothing by themselves: tests end them through
    :meth:`complete` / :meth:`fail_run`, which use the recorder the Scheduler gave.
    """

    def __init__(
        self, local: Iterable[dt.TaskDescriptor] = (), *, fail: dict[str, int] | None = None
    ) -> None:
        self.lock = threading.Lock()
        self.recorder: dt.TaskCompletionRecorder | None = None
        self.local: set[dt.TaskDescriptor] = set(local)
        self.calls: list[tuple[str, dt.TaskDescriptor]] = []  # successful calls, in order
        self.attempts: dict[str, int] = {}  # every call, failed ones included
        self.tasks: list[dt.Task] = []  # what start_task was given, in order
        self.handles: list[RecordingHandle] = []
        self._fail = dict(fail or {})

    def _enter(self, operation: str) -> None:
        """Count an attempt and raise if told to; caller holds the lock."""
        self.attempts[operation] = self.attempts.get(operation, 0) + 1
        if self._fail.get(operation, 0) > 0:
            self._fail[operation] -= 1
            raise InjectedError(f"injected {operation} failure")

    # ---- the Provider protocol ---------------------------------------------------------------

    def set_completion_recorder(self, recorder: dt.TaskCompletionRecorder) -> None:
        with self.lock:
            self.recorder = recorder

    def get_local_tasks(self) -> list[dt.TaskDescriptor]:
        with self.lock:
            self._enter("list")
            return sorted(self.local)

    def cleanup_task(self, descriptor: dt.TaskDescriptor) -> None:
        with self.lock:
            self._enter("cleanup")
            self.calls.append(("cleanup", descriptor))
            self.local.discard(descriptor)

    def start_task(self, task: dt.Task) -> RecordingHandle:
        with self.lock:
            self._enter("start")
            self.calls.append(("start", task.descriptor))
            self.tasks.append(task)
            self.local.add(task.descriptor)
            handle = RecordingHandle(self, task)
            self.handles.append(handle)
            return handle

    def _terminate(self, handle: RecordingHandle) -> None:
        with self.lock:
            self._enter("terminate")
            self.calls.append(("terminate", handle.task.descriptor))
            handle.terminated.set()

    # ---- what tests read -----------------------------------------------------------------------

    def _of(self, operation: str) -> list[dt.TaskDescriptor]:
        with self.lock:
            return [d for op, d in self.calls if op == operation]

    def starts(self) -> list[dt.TaskDescriptor]:
        return self._of("start")

    def terminations(self) -> list[dt.TaskDescriptor]:
        return self._of("terminate")

    def cleanups(self) -> list[dt.TaskDescriptor]:
        return self._of("cleanup")

    def running(self) -> set[dt.TaskDescriptor]:
        """Runs started and not terminated."""
        with self.lock:
            return {h.task.descriptor for h in self.handles if not h.terminated.is_set()}

    def local_tasks(self) -> set[dt.TaskDescriptor]:
        with self.lock:
            return set(self.local)

    def started_task(self, descriptor: dt.TaskDescriptor) -> dt.Task:
        with self.lock:
            return next(task for task in self.tasks if task.descriptor == descriptor)

    def fail_next(self, operation: str, times: int = 1) -> None:
        with self.lock:
            self._fail[operation] = self._fail.get(operation, 0) + times

    # ---- ending runs through the recorder --------------------------------------------------------

    def _recorder(self) -> dt.TaskCompletionRecorder:
        with self.lock:
            assert self.recorder is not None, "the Scheduler never gave a recorder"
            return self.recorder

    def complete(self, task: dt.Task) -> None:
        self._recorder().record_completion(task.namespace, task.id, task.version)

    def fail_run(self, task: dt.Task, error: str) -> None:
        self._recorder().record_failure(task.namespace, task.id, task.version, error)

    def progress(self, task: dt.Task, fraction: float, message: str = "") -> None:
        self._recorder().record_progress(task.namespace, task.id, task.version, fraction, message)


class Schedulers:
    """Builds Schedulers with the suite's short timings and stops every one on ``close()``.

    Defaults: ``member_ttl`` 2 s, ``node_loss_grace`` 3 s, ``resync_interval`` one hour (so
    every behaviour tested is driven by the watch, never by the periodic resync), and the
    ``registry`` given (one per test).
    """

    def __init__(self, manager: dt.Manager, registry: CollectorRegistry) -> None:
        self.manager = manager
        self.registry = registry
        self.made: list[dt.Scheduler] = []

    def new(
        self,
        node_id: str,
        providers: Mapping[str, dt.Provider],
        *,
        manager: dt.Manager | None = None,
        start: bool = True,
        **options: Any,
    ) -> dt.Scheduler:
        options.setdefault("member_ttl", timedelta(seconds=2))
        options.setdefault("node_loss_grace", timedelta(seconds=3))
        options.setdefault("resync_interval", timedelta(hours=1))
        options.setdefault("registry", self.registry)
        scheduler = dt.Scheduler(
            manager or self.manager, node_id=node_id, providers=providers, **options
        )
        self.made.append(scheduler)
        if start:
            scheduler.start()
        return scheduler

    def close(self) -> None:
        errors = []
        for scheduler in reversed(self.made):
            try:
                scheduler.stop()
            except Exception as exc:  # stop the others anyway
                errors.append(exc)
        self.made.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> Schedulers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value on ``registry``; 0.0 when the labelled child does not exist yet."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any DTASK_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTASK_")}
    env.update(extra or {})
    return env


class DtaskProcess:
    """A ``dtask`` subprocess (``python -m distributedtask ARGS``, environment without any
    DTASK_* variable plus ``env``) whose stdout and stderr lines are collected as they come."""

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distributedtask", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(env),
        )
        self._lock = threading.Lock()
        self._out: list[str] = []
        self._err: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str], into: list[str]) -> None:
        for line in stream:
            with self._lock:
                into.append(line.rstrip("\n"))

    @property
    def out(self) -> list[str]:
        with self._lock:
            return list(self._out)

    @property
    def err(self) -> list[str]:
        with self._lock:
            return list(self._err)

    def wait(self, timeout: float = 60.0) -> int:
        status = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for reader in self._readers:
            reader.join(5)
