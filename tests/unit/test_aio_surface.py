"""The asyncio facade's surface, without etcd: ``AsyncManager`` mirrors every public Manager
method with the same signature, the names are exported from ``distributedtask.aio`` only, and
the lifecycle and argument errors. Behaviour against etcd: tests/integration/test_aio.py."""

from __future__ import annotations

import asyncio
import inspect
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

import distributedtask as dt
from distributedtask import aio

# Public Manager methods that are plumbing of the Scheduler and its recorder (they trust their
# caller's view of a run) or need no etcd, not the API: the facade leaves them out.
NOT_IN_THE_FACADE = {
    "complete",
    "completed_by",
    "fail",
    "fail_deadline",
    "finish_if_complete",
    "known_run",
    "member_from",
    "node_lists",
    "node_reports",
    "now",
    "progress",
    "progress_from",
}


def _public_methods(cls: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(cls, inspect.isfunction) if name[0] != "_"}


FACADE = sorted(_public_methods(dt.Manager) - NOT_IN_THE_FACADE)


def test_every_manager_method_has_a_coroutine() -> None:
    coroutines = {
        name
        for name in _public_methods(aio.AsyncManager)
        if inspect.iscoroutinefunction(getattr(aio.AsyncManager, name))
    }
    assert coroutines - {"aclose"} == set(FACADE)
    assert _public_methods(dt.Manager) >= NOT_IN_THE_FACADE  # the list names real methods


@pytest.mark.parametrize("name", FACADE)
def test_each_coroutine_has_the_managers_signature(name: str) -> None:
    ours = inspect.signature(getattr(aio.AsyncManager, name))
    theirs = inspect.signature(getattr(dt.Manager, name))
    assert list(ours.parameters.values()) == list(theirs.parameters.values())
    assert ours.return_annotation == theirs.return_annotation


def test_all_is_sorted_and_only_in_the_aio_module() -> None:
    assert aio.__all__ == sorted(aio.__all__)
    assert set(aio.__all__) == {"AsyncManager", "AsyncThreadProvider", "running_scheduler"}
    for name in aio.__all__:
        assert getattr(aio, name) is not None
        assert name not in dt.__all__ and not hasattr(dt, name)


def _client() -> dt.EtcdClient:
    return dt.EtcdClient("http://127.0.0.1:9", timeout=1.0)  # never contacted


def test_async_manager_arguments() -> None:
    client = _client()
    built = aio.AsyncManager(client, prefix="/elsewhere", max_payload_bytes=10)
    assert built.manager.client is client
    assert built.manager.prefix.rstrip("/") == "/elsewhere"
    assert built.manager.max_payload_bytes == 10
    manager = dt.Manager(client)
    assert aio.AsyncManager(manager).manager is manager
    with pytest.raises(TypeError):
        aio.AsyncManager(manager, prefix="/x")
    with pytest.raises(TypeError):
        aio.AsyncManager(manager, clock=None)
    with pytest.raises(TypeError):
        aio.AsyncManager("http://127.0.0.1:2379")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_workers"):
        aio.AsyncManager(manager, max_workers=0)


def test_a_closed_async_manager_refuses_calls_and_reopening() -> None:
    before = set(threading.enumerate())

    async def scenario() -> None:
        async with aio.AsyncManager(dt.Manager(_client())) as manager:
            with pytest.raises(dt.InvalidTaskError):  # checked before any request
                await manager.wait_for_task("ns", "t", 0)
            with pytest.raises(dt.InvalidTaskError):  # the Manager's check, in a pool thread
                await manager.get_task("", "t")
        assert "closed" in repr(manager)
        with pytest.raises(RuntimeError, match="closed"):
            await manager.get_task("ns", "t")
        with pytest.raises(RuntimeError, match="closed"):
            await manager.wait_for_task("ns", "t", 1)
        with pytest.raises(RuntimeError, match="closed"):
            async with manager:
                pass
        await manager.aclose()  # idempotent

    asyncio.run(scenario())
    assert set(threading.enumerate()) - before == set()


def test_async_thread_provider_arguments_and_local_state(tmp_path: Path) -> None:
    async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
        pass

    with pytest.raises(TypeError):
        aio.AsyncThreadProvider(None)  # type: ignore[arg-type]
    with aio.AsyncThreadProvider(work, state_dir=tmp_path / "state") as provider:
        assert isinstance(provider, dt.Provider)
        descriptor = dt.TaskDescriptor("a/b", 3)
        (tmp_path / "state" / "a%2Fb" / "3").mkdir(parents=True)
        assert provider.get_local_tasks() == [descriptor]
        provider.cleanup_task(descriptor)
        assert provider.get_local_tasks() == []
    with pytest.raises(RuntimeError, match="closed"):
        provider.start_task(_a_task())


def _a_task(task_id: str = "t", payload: bytes = b"") -> dt.Task:
    return dt.Task(
        namespace="ns",
        id=task_id,
        version=1,
        payload=payload,
        status=dt.TaskStatus.STARTED,
        started_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
        finished_at=None,
        error=None,
        nodes=frozenset({"n"}),
        finished_nodes=frozenset(),
    )


class ListRecorder:
    """A TaskCompletionRecorder that keeps what it is told, and on which thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, object]] = []  # (kind, task id, error or progress)
        self.threads: set[str] = set()
        self.changed = threading.Condition(self.lock)

    def _add(self, kind: str, task_id: str, detail: object) -> None:
        with self.changed:
            self.calls.append((kind, task_id, detail))
            self.threads.add(threading.current_thread().name)
            self.changed.notify_all()

    def record_completion(self, namespace: str, task_id: str, version: int) -> None:
        self._add("complete", task_id, None)

    def record_failure(self, namespace: str, task_id: str, version: int, error: str) -> None:
        self._add("fail", task_id, error)

    def record_progress(
        self, namespace: str, task_id: str, version: int, fraction: float, message: str = ""
    ) -> None:
        self._add("progress", task_id, (fraction, message))

    def wait_for(self, count: int) -> list[tuple[str, str, object]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.calls) >= count, timeout=10)
            return list(self.calls)


def test_own_loop_thread_records_outcomes_off_the_loop_and_terminate_cancels() -> None:
    """No loop given and none running: the provider's own loop thread runs the coroutines;
    return, raise and terminate as in the module doc; close() leaves no thread."""
    before = set(threading.enumerate())
    loops: dict[str, str] = {}
    began = threading.Event()
    ended = threading.Event()

    async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
        loops[task.id] = threading.current_thread().name
        ctx.progress(0.25, "quarter")
        if task.payload == b"raise":
            raise ValueError("broken")
        if task.payload == b"raise-empty":
            raise KeyError
        if task.payload == b"hang":
            began.set()
            try:
                await asyncio.Event().wait()
            finally:
                ended.set()

    recorder = ListRecorder()
    provider = aio.AsyncThreadProvider(work)
    provider.set_completion_recorder(recorder)  # no running loop here: nothing adopted
    provider.start_task(_a_task("ok"))
    provider.start_task(_a_task("bad", b"raise"))
    provider.start_task(_a_task("empty", b"raise-empty"))
    handle = provider.start_task(_a_task("hang", b"hang"))
    assert began.wait(10)
    assert provider.join(0.05) is False  # "hang" runs
    handle.terminate()
    assert ended.wait(10)
    assert provider.join(10)
    handle.terminate()  # a no-op once ended
    calls = recorder.wait_for(7)
    assert sorted(c for c in calls if c[0] != "progress") == [
        ("complete", "ok", None),
        ("fail", "bad", "broken"),
        ("fail", "empty", "KeyError"),
    ]
    assert sorted(c[1] for c in calls if c[0] == "progress") == ["bad", "empty", "hang", "ok"]
    assert set(loops.values()) == {"dtask-run-loop"}
    assert recorder.threads == {"dtask-run-record_0"}
    assert len(calls) == 7  # the terminated run recorded nothing
    provider.close()
    provider.close()  # idempotent
    assert set(threading.enumerate()) - before == set()


def test_close_cancels_what_still_runs_on_the_own_loop_and_records_nothing() -> None:
    began = threading.Event()
    cancelled = threading.Event()

    async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
        began.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    recorder = ListRecorder()
    provider = aio.AsyncThreadProvider(work)
    provider.set_completion_recorder(recorder)
    provider.start_task(_a_task())
    assert began.wait(10)
    provider.close()
    assert cancelled.is_set()
    assert recorder.calls == []


def test_a_run_terminated_before_it_began_never_begins() -> None:
    async def scenario() -> None:
        calls: list[str] = []

        async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
            calls.append(task.id)

        recorder = ListRecorder()
        async with aio.AsyncThreadProvider(work) as provider:
            provider.set_completion_recorder(recorder)  # adopts this running loop
            handle = provider.start_task(_a_task())  # scheduled, not begun: the loop is ours
            handle.terminate()
            await asyncio.sleep(0)  # let the loop run the run's first step
            other = provider.start_task(_a_task("second"))
            assert isinstance(other, aio._CoroutineHandle) and other.future is not None
            await asyncio.wrap_future(other.future)
        assert calls == ["second"]
        assert [c[:2] for c in recorder.calls] == [("complete", "second")]

    asyncio.run(scenario())


def test_a_provider_outliving_its_loop_adopts_the_next_one() -> None:
    ran_on: list[asyncio.AbstractEventLoop] = []

    async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
        ran_on.append(asyncio.get_running_loop())

    provider = aio.AsyncThreadProvider(work)

    async def once(task_id: str) -> asyncio.AbstractEventLoop:
        provider.set_completion_recorder(ListRecorder())
        handle = provider.start_task(_a_task(task_id))
        assert isinstance(handle, aio._CoroutineHandle) and handle.future is not None
        await asyncio.wrap_future(handle.future)
        return asyncio.get_running_loop()

    first, second = asyncio.run(once("a")), asyncio.run(once("b"))
    assert ran_on == [first, second] and first is not second
    provider.close()
