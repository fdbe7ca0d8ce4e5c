"""The asyncio facade's surface, without etcd: ``AsyncManager`` mirrors every public Manager
method with the same signature, the names are exported from ``distributedtask.aio`` only, and
the lifecycle and argument errors. Behaviour against etcd: tests/integration/test_aio.py."""

from __future__ import annotations

import asyncio
import dataclasses
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


# ---- units ------------------------------------------------------------------------------------


def _a_unit_task(task_id: str = "u") -> dt.Task:
    return dataclasses.replace(
        _a_task(task_id), units=tuple(dt.UnitSpec(f"u{i}", group="g") for i in range(5))
    )


class UnitRecorder(ListRecorder):
    """A ListRecorder that hands out ``units`` from ``await_unit``, then None at once — or,
    with ``block``, once ``stop`` is set (a run still STARTED with nothing to claim)."""

    def __init__(self, units: list[str], *, block: bool = False) -> None:
        super().__init__()
        self.units = list(units)
        self.block = block
        self.waiting = threading.Event()
        self.claim_threads: set[str] = set()

    def claim_unit(self, task: dt.Task) -> dt.Unit | None:
        with self.lock:
            if not self.units:
                return None
            unit_id = self.units.pop(0)
        return dt.Unit(unit_id, "g", "n", dt.UnitStatus.IN_PROGRESS, 0, None, None)

    def await_unit(self, task: dt.Task, stop: threading.Event) -> dt.Unit | None:
        with self.lock:
            self.claim_threads.add(threading.current_thread().name)
        unit = self.claim_unit(task)
        if unit is None and self.block:
            self.waiting.set()
            stop.wait()
        return unit

    def record_unit_completion(
        self, namespace: str, task_id: str, version: int, unit_id: str
    ) -> None:
        self._add("unit-complete", unit_id, None)

    def record_unit_failure(
        self, namespace: str, task_id: str, version: int, unit_id: str, error: str
    ) -> None:
        self._add("unit-fail", unit_id, error)

    def record_unit_progress(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        fraction: float,
        message: str = "",
    ) -> None:
        self._add("unit-progress", unit_id, (fraction, message))


def test_unit_arguments() -> None:
    async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
        pass

    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="unit_concurrency"):
            aio.AsyncThreadProvider(work, unit_concurrency=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_group_completed"):
        aio.AsyncThreadProvider(work, on_group_completed="x")  # type: ignore[arg-type]


def test_units_run_on_the_loop_at_most_unit_concurrency_at_a_time() -> None:
    before = set(threading.enumerate())
    running = 0
    peak = 0

    async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
        nonlocal running, peak
        assert ctx.unit is not None
        assert threading.current_thread().name == "dtask-run-loop"
        running += 1
        peak = max(peak, running)
        try:
            ctx.progress(0.5, ctx.unit.id)
            for _ in range(3):
                await asyncio.sleep(0)  # the other worker claims and begins meanwhile
            if ctx.unit.id == "u3":
                raise ValueError("broken")
        finally:
            running -= 1

    recorder = UnitRecorder([f"u{i}" for i in range(5)])
    provider = aio.AsyncThreadProvider(work, unit_concurrency=2)
    provider.set_completion_recorder(recorder)
    provider.start_task(_a_unit_task())
    assert provider.join(10)
    calls = recorder.wait_for(10)
    assert sorted(c for c in calls if c[0] != "unit-progress") == [
        ("unit-complete", "u0", None),
        ("unit-complete", "u1", None),
        ("unit-complete", "u2", None),
        ("unit-complete", "u4", None),
        ("unit-fail", "u3", "broken"),
    ]
    progress = [c for c in calls if c[0] == "unit-progress"]
    assert sorted(progress) == [("unit-progress", f"u{i}", (0.5, f"u{i}")) for i in range(5)]
    for unit_id in ("u0", "u3"):  # each unit's progress is recorded before its outcome
        kinds = [c[0] for c in calls if c[1] == unit_id]
        assert kinds[0] == "unit-progress"
    assert peak == 2
    assert recorder.threads == {"dtask-run-record_0"}
    assert recorder.claim_threads == {"dtask-run-ns-u-1-c0", "dtask-run-ns-u-1-c1"}
    provider.close()
    assert set(threading.enumerate()) - before == set()


def test_terminate_and_close_stop_waiting_claims_and_cancel_units() -> None:
    before = set(threading.enumerate())
    began = threading.Event()
    cancelled: list[str] = []

    async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
        assert ctx.unit is not None
        began.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(ctx.unit.id)
            raise

    # terminate: the running unit is cancelled, the waiting claim told to stop
    recorder = UnitRecorder(["u0"], block=True)
    provider = aio.AsyncThreadProvider(work, unit_concurrency=2)
    provider.set_completion_recorder(recorder)
    handle = provider.start_task(_a_unit_task())
    assert began.wait(10) and recorder.waiting.wait(10)
    handle.terminate()
    assert provider.join(10)
    assert cancelled == ["u0"] and recorder.calls == []

    # close() of the own loop thread while a claim waits: the claim stops too
    recorder.waiting.clear()
    provider.start_task(_a_unit_task("v"))
    assert recorder.waiting.wait(10)
    provider.close()
    assert recorder.calls == []
    assert set(threading.enumerate()) - before == set()


def test_group_completed_plain_or_async() -> None:
    seen: list[tuple[str, str, str]] = []

    async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
        pass

    async def on_group(task: dt.Task, group: str) -> None:
        await asyncio.sleep(0)
        if group == "bad":
            raise LookupError(group)
        seen.append(("async", group, threading.current_thread().name))

    def plain(task: dt.Task, group: str) -> None:
        seen.append(("plain", group, threading.current_thread().name))

    with aio.AsyncThreadProvider(work) as provider:
        provider.group_completed(_a_unit_task(), "g")  # no callback: nothing to do
    with aio.AsyncThreadProvider(work, on_group_completed=plain) as provider:
        provider.group_completed(_a_unit_task(), "g")
    with aio.AsyncThreadProvider(work, on_group_completed=on_group) as provider:
        provider.group_completed(_a_unit_task(), "g")  # on the own loop thread, waited for
        with pytest.raises(LookupError):
            provider.group_completed(_a_unit_task(), "bad")
    with pytest.raises(RuntimeError, match="closed"):
        provider.group_completed(_a_unit_task(), "g")
    assert seen == [
        ("plain", "g", threading.current_thread().name),
        ("async", "g", "dtask-run-loop"),
    ]

    async def on_its_own_loop() -> None:
        async with aio.AsyncThreadProvider(work, on_group_completed=on_group) as provider:
            provider.adopt_loop(asyncio.get_running_loop())
            with pytest.raises(RuntimeError, match="own loop"):
                provider.group_completed(_a_unit_task(), "g")  # would wait on itself
            # from another thread, it runs on this loop
            await asyncio.to_thread(provider.group_completed, _a_unit_task(), "h")
            assert seen[-1] == ("async", "h", threading.current_thread().name)

    asyncio.run(on_its_own_loop())
