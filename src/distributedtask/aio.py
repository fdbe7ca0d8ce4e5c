"""The asyncio facade: ``AsyncManager``, ``AsyncThreadProvider``, ``running_scheduler``.

The library underneath is threads and blocking etcd requests; this module puts an event loop in
front of it without ever blocking the loop on etcd:

- :class:`AsyncManager` offers every public :class:`~distributedtask.manager.Manager` method as
  a coroutine, with the same arguments and the same errors. Each request runs in a bounded
  thread pool of its own (``max_workers`` threads named ``dtask-aio_N``). Cancelling such a
  coroutine before its request started drops the request; once started, the request completes
  in its thread (bounded by the client's ``timeout``) and its outcome is dropped — so a
  cancelled ``add_task`` may still have added the run, as with any request whose answer is
  lost. ``wait_for_task`` holds no thread while it waits: it follows the run with a
  :class:`~distributedtask.follower.RunFollower` whose watch callback wakes the loop
  (``call_soon_threadsafe``); cancelling it (``task.cancel()``, ``asyncio.wait_for``, a
  ``TaskGroup``) closes the follower and joins its watch threads before the cancellation
  propagates — within a second on a reachable etcd, and no thread is left behind.
  ``async with`` (or :meth:`AsyncManager.aclose`) shuts the pool down and joins its threads.
- :class:`AsyncThreadProvider` is a Provider that runs ``async def fn(task, ctx)`` per run on an
  event loop: the one given, else the one running when the Scheduler starts (see
  :func:`running_scheduler`), else a loop thread of its own (``dtask-run-loop``, started at the
  first run, stopped by :meth:`~AsyncThreadProvider.close`). A return records completion, an
  exception records failure (``str(exc)``, else the type name: the rule of ``ThreadProvider``),
  ``terminate()`` cancels the coroutine and a terminated or cancelled run records nothing. The
  recorder writes to etcd on the calling thread, so the outcome and ``ctx.progress(...)`` are
  handed to one recording thread per provider (``dtask-run-record_0``), in order: the loop never
  waits on etcd, and ``ctx.progress`` returns at once. A unit task runs like ``ThreadProvider``
  runs it: ``unit_concurrency`` unit workers (coroutines) each claim a unit
  (``recorder.await_unit``, on a short-lived claim thread ``dtask-run-<ns>-<id>-<v>-cN`` joined
  before the worker goes on), await ``fn(task, ctx)`` with ``ctx.unit`` set, record the unit's
  outcome, and claim again until the recorder has nothing more for this node; ``terminate()``
  stops the claims and cancels the unit coroutines. ``on_group_completed`` (a function or an
  ``async def``, run on the loop) is the provider's ``group_completed`` hook.
- :func:`running_scheduler` starts a :class:`~distributedtask.scheduler.Scheduler` on a thread
  of its own, so the loop keeps running while it registers and reconciles, and stops it the same
  way on exit.

Threading: the provider's Scheduler-facing methods are called on the Scheduler's threads and
only hand work to the loop (``run_coroutine_threadsafe``, ``call_soon_threadsafe``) — but for
``group_completed`` with an ``async def`` callback, which waits on the Scheduler's thread for the
callback to end on the loop, as a plain callback would run there; every blocking step of this
module happens on a named daemon thread that is joined before the coroutine that started it
returns. A unit worker cancelled while its claim waits (the loop shutting down) stops claiming,
but its claim thread ends only once the recorder wakes it: the Scheduler does so when it
terminates the run or stops, so stop the Scheduler before the provider's loop. Calling the
blocking :meth:`AsyncThreadProvider.join` or :meth:`~AsyncThreadProvider.close` on the loop
the runs use would wait on the loop it blocks: use :meth:`~AsyncThreadProvider.aclose` there.

Failure semantics: errors are the Manager's and the Scheduler's, raised in the awaiting
coroutine. A call on a closed :class:`AsyncManager` raises :class:`RuntimeError`. A run whose
loop is closed cannot start: ``start_task`` raises :class:`RuntimeError` and the Scheduler
retries it with backoff, as for any provider error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from ._threads import stop_and_join
from .etcd.client import EtcdClient
from .exceptions import TaskNotFoundError
from .follower import RunFollower
from .manager import Manager
from .model import Progress, RunPolicy, Task, TaskDescriptor, Unit, UnitSpec
from .provider import Provider, TaskCompletionRecorder, TaskContext, TaskHandle, run_outcome
from .records import MemberRecord
from .rundirs import LocalRuns
from .scheduler import Scheduler

__all__ = ["AsyncManager", "AsyncThreadProvider", "running_scheduler"]

log = logging.getLogger("distributedtask.aio")

P = ParamSpec("P")
T = TypeVar("T")

AsyncTaskFunction = Callable[[Task, TaskContext], Awaitable[None]]

AsyncGroupCallback = Callable[[Task, str], Awaitable[None] | None]

_JOIN_TIMEOUT = 10.0
_LOOP_CHECK = 1.0  # how often a thread waiting on a loop looks whether it closed meanwhile


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _to_the_end(future: asyncio.Future[T], on_cancel: Callable[[], None] | None = None) -> T:
    """Await ``future`` to its end even if the caller is cancelled meanwhile (the cancellation
    is raised once it ended; ``on_cancel`` is called when it comes, to hurry the end): for the
    steps that must finish, such as closing a follower."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])  # never cancels ``future`` itself
        except asyncio.CancelledError:
            if not cancelled and on_cancel is not None:
                on_cancel()
            cancelled = True
    if cancelled:
        if not future.cancelled():
            future.exception()  # retrieved: what it raised no longer has anyone to tell
        raise asyncio.CancelledError
    return future.result()


async def _in_thread(
    fn: Callable[[], T], name: str, on_cancel: Callable[[], None] | None = None
) -> T:
    """Run ``fn`` on a daemon thread of its own, to the end (see :func:`_to_the_end`), and join
    the thread before returning: nothing of it is left when this returns."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, functools.partial(future.set_exception, exc))
        else:
            loop.call_soon_threadsafe(settle, functools.partial(future.set_result, result))

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        return await _to_the_end(future, on_cancel)
    finally:
        thread.join()  # it has settled the future: only its return is left


# ---- the Manager ------------------------------------------------------------------------------


class AsyncManager:
    """Every public :class:`Manager` method as a coroutine (see the module doc).

    ``manager`` is a :class:`Manager`, or an :class:`EtcdClient` to build one on with
    ``prefix`` (default ``"/distributedtask"``) and ``manager_kwargs`` (``completed_task_ttl``,
    ``clock``, ``max_payload_bytes``); passing those with a Manager is a :class:`TypeError`.
    ``max_workers`` bounds the threads that carry requests. Open from construction; ``async
    with`` returns it and closes it on exit (:meth:`aclose`), after which every call raises
    :class:`RuntimeError`. The client is the caller's: closing this does not close it.
    """

    def __init__(
        self,
        manager: Manager | EtcdClient,
        *,
        prefix: str | None = None,
        max_workers: int = 8,
        **manager_kwargs: Any,
    ) -> None:
        if isinstance(manager, Manager):
            if prefix is not None or manager_kwargs:
                raise TypeError("prefix and Manager options go to the Manager, not with one")
            self.manager = manager
        elif isinstance(manager, EtcdClient):
            options = dict(manager_kwargs)
            if prefix is not None:
                options["prefix"] = prefix
            self.manager = Manager(manager, **options)
        else:
            raise TypeError(f"expected a Manager or an EtcdClient, not {type(manager).__name__}")
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1: {max_workers!r}")
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="dtask-aio"
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncManager({self.manager!r}{', closed' if self._closed else ''})"

    async def __aenter__(self) -> AsyncManager:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Refuse new calls, let the running ones finish, and join the pool's threads.
        Idempotent. Coroutines still waiting in :meth:`wait_for_task` keep their follower
        until they end or are cancelled."""
        self._closed = True
        await _in_thread(
            functools.partial(self._executor.shutdown, wait=True), "dtask-aio-shutdown"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def _call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        self._check_open()
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    # ---- the Manager's methods, in its order ----------------------------------------------

    async def ensure_format(self) -> None:
        """:meth:`Manager.ensure_format`."""
        return await self._call(self.manager.ensure_format)

    async def get_task(self, namespace: str, task_id: str) -> Task | None:
        """:meth:`Manager.get_task`."""
        return await self._call(self.manager.get_task, namespace, task_id)

    async def list_tasks(self) -> dict[str, list[Task]]:
        """:meth:`Manager.list_tasks`."""
        return await self._call(self.manager.list_tasks)

    async def list_tasks_payload(self) -> bytes:
        """:meth:`Manager.list_tasks_payload`."""
        return await self._call(self.manager.list_tasks_payload)

    async def live_members(self) -> list[MemberRecord]:
        """:meth:`Manager.live_members`."""
        return await self._call(self.manager.live_members)

    async def add_task(
        self,
        namespace: str,
        task_id: str,
        payload: bytes = b"",
        *,
        nodes: Iterable[str] | None = None,
        policy: RunPolicy | None = None,
        units: Iterable[UnitSpec | str] | None = None,
    ) -> Task:
        """:meth:`Manager.add_task`."""
        return await self._call(
            self.manager.add_task,
            namespace,
            task_id,
            payload,
            nodes=nodes,
            policy=policy,
            units=units,
        )

    async def record_node_completion(
        self, namespace: str, task_id: str, version: int, node_id: str
    ) -> Task:
        """:meth:`Manager.record_node_completion`."""
        return await self._call(
            self.manager.record_node_completion, namespace, task_id, version, node_id
        )

    async def record_node_failure(
        self, namespace: str, task_id: str, version: int, node_id: str, error: str
    ) -> Task:
        """:meth:`Manager.record_node_failure`."""
        return await self._call(
            self.manager.record_node_failure, namespace, task_id, version, node_id, error
        )

    async def pause_task(self, namespace: str, task_id: str, version: int) -> Task:
        """:meth:`Manager.pause_task`."""
        return await self._call(self.manager.pause_task, namespace, task_id, version)

    async def resume_task(self, namespace: str, task_id: str, version: int) -> Task:
        """:meth:`Manager.resume_task`."""
        return await self._call(self.manager.resume_task, namespace, task_id, version)

    async def cancel_task(self, namespace: str, task_id: str, version: int) -> Task:
        """:meth:`Manager.cancel_task`."""
        return await self._call(self.manager.cancel_task, namespace, task_id, version)

    async def record_progress(
        self,
        namespace: str,
        task_id: str,
        version: int,
        node_id: str,
        fraction: float,
        message: str = "",
    ) -> None:
        """:meth:`Manager.record_progress`."""
        return await self._call(
            self.manager.record_progress, namespace, task_id, version, node_id, fraction, message
        )

    async def get_progress(self, namespace: str, task_id: str, version: int) -> dict[str, Progress]:
        """:meth:`Manager.get_progress`."""
        return await self._call(self.manager.get_progress, namespace, task_id, version)

    async def claim_unit(
        self, namespace: str, task_id: str, version: int, node_id: str
    ) -> Unit | None:
        """:meth:`Manager.claim_unit`."""
        return await self._call(self.manager.claim_unit, namespace, task_id, version, node_id)

    async def record_unit_completion(
        self, namespace: str, task_id: str, version: int, unit_id: str, node_id: str
    ) -> Task:
        """:meth:`Manager.record_unit_completion`."""
        return await self._call(
            self.manager.record_unit_completion, namespace, task_id, version, unit_id, node_id
        )

    async def record_unit_failure(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        node_id: str,
        error: str,
    ) -> Task:
        """:meth:`Manager.record_unit_failure`."""
        return await self._call(
            self.manager.record_unit_failure, namespace, task_id, version, unit_id, node_id, error
        )

    async def record_unit_progress(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        node_id: str,
        fraction: float,
        message: str = "",
    ) -> None:
        """:meth:`Manager.record_unit_progress`."""
        return await self._call(
            self.manager.record_unit_progress,
            namespace,
            task_id,
            version,
            unit_id,
            node_id,
            fraction,
            message,
        )

    async def get_units(self, namespace: str, task_id: str, version: int) -> dict[str, Unit]:
        """:meth:`Manager.get_units`."""
        return await self._call(self.manager.get_units, namespace, task_id, version)

    async def units_completed(self, tasks: Iterable[Task]) -> dict[tuple[str, str], int]:
        """:meth:`Manager.units_completed`."""
        return await self._call(self.manager.units_completed, list(tasks))

    async def clean_up_task(
        self, namespace: str, task_id: str, version: int, *, ttl: timedelta | None = None
    ) -> None:
        """:meth:`Manager.clean_up_task`."""
        return await self._call(self.manager.clean_up_task, namespace, task_id, version, ttl=ttl)

    async def wait_for_task(
        self, namespace: str, task_id: str, version: int, timeout: float | None = None
    ) -> Task:
        """Wait until ``version`` is terminal and return it, following an etcd watch; no thread
        waits meanwhile, and cancelling closes the watch before the cancellation propagates.

        Raises what :meth:`Manager.wait_for_task` raises: :class:`TaskNotFoundError` if that
        version does not exist or is removed or replaced before it ends, :class:`TimeoutError`
        after ``timeout`` seconds, :class:`EtcdError` if etcd cannot be read to start watching,
        :class:`InvalidTaskError` for bad arguments.
        """
        self._check_open()
        # The Manager's own argument check: one rule, in one place.
        version = self.manager._check_run_args(namespace, task_id, version)
        loop = asyncio.get_running_loop()
        over = asyncio.Event()

        def on_change() -> None:  # on a watch thread (or the one starting the follower)
            if follower.over.is_set():
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits now
                    loop.call_soon_threadsafe(over.set)

        follower = RunFollower(self.manager, namespace, task_id, version, on_change=on_change)
        try:
            await _to_the_end(self._call(follower.start))
            try:
                await asyncio.wait_for(over.wait(), timeout)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                raise TimeoutError(
                    f"run version {version} did not end within {timeout:g}s"
                ) from None
        finally:
            # On a thread of its own rather than the pool: it must happen even after aclose().
            await _in_thread(follower.close, "dtask-aio-unwatch")
        task = await self.get_task(namespace, task_id)
        if task is None or task.version != version or not task.status.terminal:
            raise TaskNotFoundError(namespace, task_id, version)
        return task

    async def snapshot(self) -> bytes:
        """:meth:`Manager.snapshot`."""
        return await self._call(self.manager.snapshot)

    async def restore(self, data: bytes | str) -> None:
        """:meth:`Manager.restore`."""
        return await self._call(self.manager.restore, data)


# ---- the provider -----------------------------------------------------------------------------


class _Recording:
    """The recorder's calls, made in order on one thread of their own: the recorder writes to
    etcd on the calling thread, and that must not be an event loop's. Given to each run's
    :class:`TaskContext` as its recorder, so ``ctx.progress`` returns at once; the ``record_*``
    calls never raise. The claims (``claim_unit``, ``await_unit``) are the recorder's own, made
    on the calling thread: the provider makes them on claim threads, never on the loop."""

    def __init__(self) -> None:
        self.recorder: TaskCompletionRecorder | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="dtask-run-record"
        )

    def submit(self, call: Callable[[], None]) -> concurrent.futures.Future[None] | None:
        """Queue ``call``; None once closed (logged: a record the provider can no longer make)."""
        try:
            return self._executor.submit(call)
        except RuntimeError:
            log.warning("provider closed: dropped %r", call)
            return None

    def close(self) -> None:
        """Make the queued calls, then join the thread. Idempotent."""
        self._executor.shutdown(wait=True)

    # ---- TaskCompletionRecorder (for TaskContext) -----------------------------------------

    def record_completion(self, namespace: str, task_id: str, version: int) -> None:
        if self.recorder is not None:
            self.submit(
                functools.partial(self.recorder.record_completion, namespace, task_id, version)
            )

    def record_failure(self, namespace: str, task_id: str, version: int, error: str) -> None:
        if self.recorder is not None:
            self.submit(
                functools.partial(self.recorder.record_failure, namespace, task_id, version, error)
            )

    def record_progress(
        self, namespace: str, task_id: str, version: int, fraction: float, message: str = ""
    ) -> None:
        if self.recorder is not None:
            self.submit(
                functools.partial(
                    self.recorder.record_progress, namespace, task_id, version, fraction, message
                )
            )

    def claim_unit(self, task: Task) -> Unit | None:
        """The recorder's claim, on the calling thread (it blocks on etcd: never call it on a
        loop); None without a recorder."""
        return None if self.recorder is None else self.recorder.claim_unit(task)

    def await_unit(self, task: Task, stop: threading.Event) -> Unit | None:
        """The recorder's waiting claim, on the calling thread (it blocks until a unit is
        claimable or the run is no longer STARTED here: never call it on a loop)."""
        return None if self.recorder is None else self.recorder.await_unit(task, stop)

    def record_unit_completion(
        self, namespace: str, task_id: str, version: int, unit_id: str
    ) -> None:
        if self.recorder is not None:
            self.submit(
                functools.partial(
                    self.recorder.record_unit_completion, namespace, task_id, version, unit_id
                )
            )

    def record_unit_failure(
        self, namespace: str, task_id: str, version: int, unit_id: str, error: str
    ) -> None:
        if self.recorder is not None:
            self.submit(
                functools.partial(
                    self.recorder.record_unit_failure, namespace, task_id, version, unit_id, error
                )
            )

    def record_unit_progress(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        fraction: float,
        message: str = "",
    ) -> None:
        if self.recorder is not None:
            self.submit(
                functools.partial(
                    self.recorder.record_unit_progress,
                    namespace,
                    task_id,
                    version,
                    unit_id,
                    fraction,
                    message,
                )
            )


class _LoopThread:
    """An event loop on a daemon thread of its own, for a provider given no loop."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            # Stopped: cancel what still runs (a cancelled run records nothing), let it unwind.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def stop(self, timeout: float | None) -> None:
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        stop_and_join(self._thread, timeout=timeout, logger=log, what="the provider's event loop")


class _CoroutineHandle:
    """A run's coroutine on its loop. ``terminate`` sets ``context.cancelled`` and cancels the
    coroutine, from the loop's own thread (a run not yet begun never begins)."""

    def __init__(self, context: TaskContext, loop: asyncio.AbstractEventLoop) -> None:
        self.context = context
        self.loop = loop
        self.task: asyncio.Task[None] | None = None  # set by the run, on the loop
        self.future: concurrent.futures.Future[None] | None = None  # done once the run ended

    def terminate(self) -> None:
        self.context.cancelled.set()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs there now
            self.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class AsyncThreadProvider:
    """A Provider that runs ``await fn(task, ctx)`` per run on an event loop (see the module doc).

    ``loop``: the loop to run on; default the loop running when the Scheduler starts (the one
    :meth:`set_completion_recorder` is called on, or the one :func:`running_scheduler` runs
    on), else a loop thread of its own. ``ctx`` is a :class:`TaskContext`: ``cancelled`` (set
    by ``terminate``, which also cancels the coroutine), ``progress(fraction, message)`` (never
    blocks), ``attempt`` and ``state_dir``. Local state is that of ``ThreadProvider``: an
    in-memory set, or with ``state_dir`` one directory per run, removed by ``cleanup_task``.
    ``close()`` (or ``with``/``async with``) stops its own loop thread, if it started one, and
    its recording thread; call it once its Scheduler stopped.

    Units: for a unit task, ``fn`` is awaited once per claimed unit (``ctx.unit`` set,
    ``ctx.progress`` reports the unit's progress, ``ctx.attempt`` counts the unit's attempts),
    up to ``unit_concurrency`` at a time; ``on_group_completed(task, group)``, a function or a
    coroutine function, is called as ``group_completed`` (see :meth:`group_completed`).
    Raises :class:`TypeError` for an ``fn`` or ``on_group_completed`` that is not callable and
    :class:`ValueError` for a ``unit_concurrency`` below 1.
    """

    def __init__(
        self,
        fn: AsyncTaskFunction,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        state_dir: str | Path | None = None,
        unit_concurrency: int = 1,
        on_group_completed: AsyncGroupCallback | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be an async function, not {type(fn).__name__}")
        if not isinstance(unit_concurrency, int) or unit_concurrency < 1:
            raise ValueError(f"unit_concurrency must be an int >= 1: {unit_concurrency!r}")
        if on_group_completed is not None and not callable(on_group_completed):
            raise TypeError(
                f"on_group_completed must be callable, not {type(on_group_completed).__name__}"
            )
        self._fn = fn
        self._unit_concurrency = unit_concurrency
        self._on_group_completed = on_group_completed
        self._loop = loop
        self._loop_given = loop is not None
        self._runs = LocalRuns(state_dir)
        self._recording = _Recording()
        self._lock = threading.Lock()
        self._own_loop: _LoopThread | None = None
        self._handles: list[_CoroutineHandle] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncThreadProvider({self._fn!r})"

    def __enter__(self) -> AsyncThreadProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> AsyncThreadProvider:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def adopt_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on ``loop`` unless a loop was given, another open one adopted, or the own loop
        thread started (:func:`running_scheduler` calls this with its loop before starting the
        Scheduler; a provider outliving its ``asyncio.run`` adopts the next one)."""
        with self._lock:
            if self._loop_given or self._own_loop is not None:
                return
            if self._loop is None or self._loop.is_closed():
                self._loop = loop

    # ---- the Provider protocol -------------------------------------------------------------

    def set_completion_recorder(self, recorder: TaskCompletionRecorder) -> None:
        self._recording.recorder = recorder
        with contextlib.suppress(RuntimeError):  # no loop running on this thread
            self.adopt_loop(asyncio.get_running_loop())

    def get_local_tasks(self) -> list[TaskDescriptor]:
        return self._runs.list()

    def cleanup_task(self, descriptor: TaskDescriptor) -> None:
        self._runs.remove(descriptor)

    def start_task(self, task: Task) -> TaskHandle:
        """Schedule the run on the loop and return at once. Raises :class:`RuntimeError` if the
        loop is closed or the provider is (the Scheduler retries)."""
        loop = self._run_loop()
        context = TaskContext(task, self._recording, self._runs.open(task.descriptor))
        handle = _CoroutineHandle(context, loop)
        run = self._run_units(handle) if task.units else self._run(handle)
        try:
            handle.future = asyncio.run_coroutine_threadsafe(run, loop)
        except BaseException:
            run.close()  # never scheduled: no "never awaited" warning
            raise
        with self._lock:
            self._handles = [h for h in self._handles if h.future and not h.future.done()]
            self._handles.append(handle)
        return handle

    def _run_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self._loop is not None:
                return self._loop
            if self._own_loop is None:
                self._own_loop = _LoopThread("dtask-run-loop")
            return self._own_loop.loop

    async def _run(self, handle: _CoroutineHandle) -> None:
        context = handle.context
        handle.task = asyncio.current_task()
        if context.cancelled.is_set():  # terminated before it began
            return
        error: Exception | None = None
        try:
            await self._fn(context.task, context)
        except Exception as exc:
            error = exc
        # A CancelledError (terminate, or the loop shutting down) propagates: nothing recorded.
        await self._record(
            run_outcome(
                context.task,
                self._recording.recorder,
                terminated=context.cancelled.is_set(),
                error=error,
            )
        )

    async def _run_units(self, handle: _CoroutineHandle) -> None:
        """A unit task's run: ``unit_concurrency`` unit workers, to the end of the last one
        (cancelling the run cancels them, and it ends once each has joined its claim thread)."""
        context = handle.context
        handle.task = asyncio.current_task()
        if context.cancelled.is_set():  # terminated before it began
            return
        task = context.task
        name = f"dtask-run-{task.namespace}-{task.id}-{task.version}"[:72]
        workers = [
            asyncio.ensure_future(self._unit_worker(context, f"{name}-c{i}"))
            for i in range(self._unit_concurrency)
        ]
        for outcome in await asyncio.gather(*workers, return_exceptions=True):
            if isinstance(outcome, BaseException):  # a bug: the workers catch the fn's errors
                log.error(
                    "unit worker of %s/%s v%d failed",
                    task.namespace,
                    task.id,
                    task.version,
                    exc_info=outcome,
                )

    async def _unit_worker(self, run_context: TaskContext, thread_name: str) -> None:
        """Claim (on a thread named ``thread_name``, joined before this goes on), run, record,
        until the recorder has nothing more for this node or the run is terminated."""
        task, cancelled, recording = run_context.task, run_context.cancelled, self._recording
        while not cancelled.is_set():
            try:
                # Cancelled while it waits (the loop shutting down): no more claims.
                unit = await _in_thread(
                    functools.partial(recording.await_unit, task, cancelled),
                    thread_name,
                    on_cancel=cancelled.set,
                )
            except Exception:  # a recorder of another kind: claim_unit may raise
                log.exception("claiming a unit of %s/%s v%d", task.namespace, task.id, task.version)
                return
            if unit is None or cancelled.is_set():
                return
            context = TaskContext(task, recording, run_context.state_dir, unit, cancelled)
            error: Exception | None = None
            try:
                await self._fn(task, context)
            except Exception as exc:
                error = exc
            # A CancelledError (terminate, or the loop shutting down) propagates: nothing recorded.
            await self._record(
                run_outcome(
                    task,
                    recording.recorder,
                    terminated=cancelled.is_set(),
                    error=error,
                    unit=unit,
                )
            )

    async def _record(self, record: Callable[[], None] | None) -> None:
        """Hand ``record`` to the recording thread and wait until it is made."""
        if record is None:
            return
        recorded = self._recording.submit(record)
        if recorded is not None:  # a terminate arriving now must not drop the record
            await _to_the_end(asyncio.wrap_future(recorded))

    def group_completed(self, task: Task, group: str) -> None:
        """Call ``on_group_completed(task, group)``, if given, on the calling (Scheduler's)
        thread; when it returns an awaitable (an ``async def``), that is run on the provider's
        loop and waited for while the loop is open. Raises what the callback raises, and
        :class:`RuntimeError` when the loop is closed or is the calling thread's (it would
        wait on itself): the Scheduler retries with backoff."""
        callback = self._on_group_completed
        if callback is None:
            return
        result = callback(task, group)
        if result is None or not inspect.isawaitable(result):
            return
        awaitable: Awaitable[object] = result

        async def awaited() -> None:
            await awaitable

        coroutine = awaited()
        try:
            loop = self._run_loop()
            if _running_loop() is loop:
                raise RuntimeError(f"{self!r}: group_completed called on its own loop's thread")
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except BaseException:
            coroutine.close()  # never scheduled: no "never awaited" warning
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            raise
        while not concurrent.futures.wait([future], _LOOP_CHECK).done:
            if loop.is_closed():  # what it had not begun never will
                future.cancel()
                raise RuntimeError(f"{self!r}: the loop closed before group {group!r} was done")
        future.result()

    # ---- lifecycle ------------------------------------------------------------------------

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every run to end (its outcome recorded); True if all did within
        ``timeout``. Not on the loop the runs use (it would wait on itself)."""
        with self._lock:
            futures = [h.future for h in self._handles if h.future is not None]
        _, not_done = concurrent.futures.wait(futures, timeout)
        return not not_done

    def close(self, timeout: float | None = _JOIN_TIMEOUT) -> None:
        """Stop the own loop thread (its runs are cancelled and record nothing), make the
        queued records, and join both threads. Later ``start_task`` calls raise. Idempotent."""
        with self._lock:
            self._closed = True
            own, self._own_loop = self._own_loop, None
        if own is not None:
            own.stop(timeout)
        self._recording.close()

    async def aclose(self) -> None:
        """:meth:`close` from a coroutine: on a thread of its own, joined before it returns."""
        await _in_thread(self.close, "dtask-run-close")


# ---- the Scheduler ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_scheduler(
    manager: Manager | AsyncManager,
    *,
    node_id: str,
    providers: Mapping[str, Provider],
    **options: Any,
) -> AsyncIterator[Scheduler]:
    """``async with running_scheduler(manager, node_id=..., providers=...) as scheduler:`` —
    a :class:`Scheduler` (``options`` are its keyword arguments) started on a thread of its
    own, so the loop runs meanwhile, and stopped the same way on exit, even when cancelled.
    Every :class:`AsyncThreadProvider` given no loop runs its coroutines on the calling loop.

    Raises what :class:`Scheduler` and :meth:`Scheduler.start` raise (nothing is left running
    then); a cancellation during the start stops the Scheduler before it propagates.
    """
    if isinstance(manager, AsyncManager):
        manager = manager.manager
    scheduler = Scheduler(manager, node_id=node_id, providers=providers, **options)
    loop = asyncio.get_running_loop()
    for provider in scheduler.providers.values():
        if isinstance(provider, AsyncThreadProvider):
            provider.adopt_loop(loop)
    name = f"dtask-aio-scheduler-{node_id}"[:60]
    try:
        await _in_thread(scheduler.start, name)
        yield scheduler
    finally:
        await _in_thread(scheduler.stop, name)
