"""The baselines our code is measured against, and the providers the benchmarks use.

- :class:`RawWatcher`: the floor our watch stands on. A minimal streaming ``POST /v3/watch``
  with requests (``stream=True``, ``iter_lines``), on a thread, stamping each event's arrival.
  etcd3gw's own watch is unusable (DESIGN.md), so this is the raw baseline.
- :class:`PollingScheduler`: a scheduler in the style of Weaviate's (v1.31-v1.36), which lists
  every task each tick (their default tick is 60 s) and diffs; no watch.
- :class:`StampBook`, :class:`StampProvider`: a provider that records when ``start_task`` and
  ``terminate`` are called (``time.perf_counter``), and lets the benchmark wait for them.
- :class:`NoopProvider`: a provider that does nothing and counts its starts.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import requests

from benchmarks.common import b64, range_end, tuned_session
from distributedtask import Manager, Task, TaskDescriptor, TaskStatus
from distributedtask.provider import Provider, TaskCompletionRecorder, TaskHandle


class Sink(Protocol):
    def stamp(self, kind: str, key: str, who: str) -> None: ...


class StampBook:
    """``stamp(kind, key, who)`` notes the first time ``who`` saw ``(kind, key)``;
    ``wait(kind, key, count)`` blocks until ``count`` parties have, and returns their times."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._times: dict[tuple[str, str], dict[str, float]] = {}

    def stamp(self, kind: str, key: str, who: str, at: float | None = None) -> None:
        """Note that ``who`` saw ``(kind, key)`` at ``at`` (default: now; ``perf_counter``,
        which is CLOCK_MONOTONIC on Linux, so times from other processes compare)."""
        now = time.perf_counter() if at is None else at
        with self._cond:
            self._times.setdefault((kind, key), {}).setdefault(who, now)
            self._cond.notify_all()

    def wait(self, kind: str, key: str, count: int, timeout: float) -> dict[str, float]:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len(self._times.get((kind, key), {})) >= count, timeout
            )
            seen = dict(self._times.get((kind, key), {}))
        if not ok:
            raise TimeoutError(f"{kind} {key}: {len(seen)} of {count} within {timeout:g}s")
        return seen


class _StampHandle:
    def __init__(self, book: Sink, task_id: str, node: str) -> None:
        self._book, self._task_id, self._node = book, task_id, node

    def terminate(self) -> None:
        self._book.stamp("stop", self._task_id, self._node)


class StampProvider:
    """Starts nothing: stamps ``start_task`` and ``terminate`` calls in a :class:`StampBook`."""

    def __init__(self, node: str, book: Sink) -> None:
        self.node, self.book = node, book

    def set_completion_recorder(self, recorder: TaskCompletionRecorder) -> None:
        pass

    def get_local_tasks(self) -> Iterable[TaskDescriptor]:
        return ()

    def cleanup_task(self, descriptor: TaskDescriptor) -> None:
        pass

    def start_task(self, task: Task) -> TaskHandle:
        self.book.stamp("start", task.id, self.node)
        return _StampHandle(self.book, task.id, self.node)


class _NoopHandle:
    def terminate(self) -> None:
        pass


class NoopProvider:
    """Does nothing; ``starts`` counts ``start_task`` calls."""

    def __init__(self) -> None:
        self.starts = 0

    def set_completion_recorder(self, recorder: TaskCompletionRecorder) -> None:
        pass

    def get_local_tasks(self) -> Iterable[TaskDescriptor]:
        return ()

    def cleanup_task(self, descriptor: TaskDescriptor) -> None:
        pass

    def start_task(self, task: Task) -> TaskHandle:
        self.starts += 1
        return _NoopHandle()


class RawWatcher:
    """Watch ``prefix`` with one raw streaming request; stamp ``("raw", key, name)`` per event.

    ``stop_key`` (a key under the prefix) ends the thread when it is put. Threading: one daemon
    thread; ``start()`` returns once etcd confirmed the watch.
    """

    def __init__(self, endpoint: str, prefix: bytes, book: Sink, name: str) -> None:
        self._url = endpoint + "/v3/watch"
        self._prefix = prefix
        self._book = book
        self.name = name
        self.stop_key = (prefix + b"stop-" + name.encode()).decode()
        self._created = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"raw-watch-{name}", daemon=True)
        self._session = tuned_session()
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()
        if not self._created.wait(10):
            raise RuntimeError(f"raw watch {self.name} was not created: {self.error!r}")

    def _run(self) -> None:
        body = {
            "create_request": {"key": b64(self._prefix), "range_end": b64(range_end(self._prefix))}
        }
        try:
            with self._session.post(self._url, json=body, stream=True, timeout=(2, 60)) as response:
                for line in response.iter_lines(chunk_size=None):
                    if not line:
                        continue
                    result: dict[str, Any] = json.loads(line).get("result", {})
                    if result.get("created"):
                        self._created.set()
                    for event in result.get("events") or ():
                        key = base64.b64decode(event["kv"]["key"]).decode()
                        if key == self.stop_key:
                            return
                        self._book.stamp("raw", key, self.name)
        except (requests.RequestException, OSError, ValueError) as exc:
            self.error = exc
        finally:
            self._created.set()
            self._session.close()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


class PollingScheduler:
    """A scheduler that lists every task each ``tick`` seconds and diffs (Weaviate's shape).

    Each tick: ``manager.list_tasks()``; start what should run here and is not running; terminate
    what runs here and should not. The first tick comes after a random fraction of a tick, as
    nodes are not in phase. Threading: one daemon thread; ``stop()`` joins it.
    """

    def __init__(
        self,
        manager: Manager,
        *,
        node_id: str,
        providers: Mapping[str, Provider],
        tick: float,
    ) -> None:
        self.manager = manager
        self.node_id = node_id
        self.providers = dict(providers)
        self.tick = tick
        self.ticks = 0
        self._running: dict[tuple[str, str], tuple[int, TaskHandle]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"poll-{node_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for _, handle in self._running.values():
            handle.terminate()
        self._running.clear()

    def _run(self) -> None:
        if self._stop.wait(random.uniform(0, self.tick)):
            return
        while not self._stop.is_set():
            began = time.monotonic()
            self._tick()
            self.ticks += 1
            self._stop.wait(max(0.0, self.tick - (time.monotonic() - began)))

    def _tick(self) -> None:
        tasks = self.manager.list_tasks()
        for namespace, provider in self.providers.items():
            wanted = {
                (namespace, task.id): task
                for task in tasks.get(namespace, ())
                if task.status is TaskStatus.STARTED
                and self.node_id in task.pending_nodes
            }
            for key in [k for k in self._running if k[0] == namespace]:
                version, handle = self._running[key]
                task = wanted.get(key)
                if task is None or task.version != version:
                    handle.terminate()
                    del self._running[key]
            for key, task in wanted.items():
                if key not in self._running:
                    self._running[key] = (task.version, provider.start_task(task))
