"""The asyncio facade against a real etcd: every AsyncManager coroutine, waiting without a
parked thread, cancelling and timing out ``wait_for_task`` (its watch stops within a second and
no thread is left), and an AsyncThreadProvider run through a real Scheduler on the test's own
loop — started, progressing, completed, failed, terminated — inside ``running_scheduler``.

Each test is a coroutine run by ``asyncio.run``; waiting is on events or on conditions checked
in a loop (:func:`eventually`), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from tests.support import FakeClock

import distributedtask as dt
from distributedtask import aio

pytestmark = pytest.mark.usefixtures("no_scheduler_thread_left")

NS = "ns"
STARTED, PAUSED = dt.TaskStatus.STARTED, dt.TaskStatus.PAUSED
FINISHED, FAILED, CANCELLED = dt.TaskStatus.FINISHED, dt.TaskStatus.FAILED, dt.TaskStatus.CANCELLED
FOLLOW_THREAD = "distributedtask-follow"  # RunFollower's watch threads


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """``check()`` (awaited when it returns an awaitable) until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout}s: {what or check}"
        await asyncio.sleep(0.02)


def follow_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == FOLLOW_THREAD]


def new_threads(before: set[threading.Thread]) -> set[str]:
    return {t.name for t in threading.enumerate() if t not in before}


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


# ---- AsyncManager -----------------------------------------------------------------------------


def test_every_coroutine_against_etcd(etcd_client: dt.EtcdClient, dtask_prefix: str) -> None:
    wall = FakeClock()

    async def scenario() -> None:
        async with aio.AsyncManager(
            etcd_client, prefix=dtask_prefix, clock=wall, completed_task_ttl=timedelta(hours=1)
        ) as m:
            await m.ensure_format()
            assert await m.list_tasks() == {}
            assert await m.live_members() == []
            with pytest.raises(dt.NoEligibleNodesError):
                await m.add_task(NS, "nobody")

            policy = dt.RunPolicy(max_attempts=2)
            task = await m.add_task(NS, "job", b"data", nodes=["a", "b"], policy=policy)
            v = task.version
            assert (task.status, task.nodes, task.policy) == (STARTED, {"a", "b"}, policy)
            assert await m.get_task(NS, "job") == task
            with pytest.raises(dt.TaskAlreadyRunningError):
                await m.add_task(NS, "job", nodes=["a"])

            await m.record_progress(NS, "job", v, "a", 0.5, "half")
            progress = await m.get_progress(NS, "job", v)
            assert (progress["a"].fraction, progress["a"].message) == (0.5, "half")

            assert (await m.pause_task(NS, "job", v)).status is PAUSED
            assert (await m.resume_task(NS, "job", v)).status is STARTED
            assert (await m.record_node_completion(NS, "job", v, "a")).finished_nodes == {"a"}
            retried = await m.record_node_failure(NS, "job", v, "b", "first")
            assert (retried.status, dict(retried.attempts)) == (STARTED, {"b": 1})
            failed = await m.record_node_failure(NS, "job", v, "b", "second")
            assert (failed.status, failed.error, failed.failed_node) == (FAILED, "second", "b")
            assert await m.wait_for_task(NS, "job", v) == failed  # already over: at once
            with pytest.raises(dt.TaskNotRunningError):
                await m.cancel_task(NS, "job", v)

            other = await m.add_task(NS, "other", nodes=["a"])
            cancelled = await m.cancel_task(NS, "other", other.version)
            assert cancelled.status is CANCELLED
            assert [t.id for t in (await m.list_tasks())[NS]] == ["job", "other"]
            listed = orjson.loads(await m.list_tasks_payload())
            snapshot = await m.snapshot()
            assert orjson.loads(snapshot) == listed
            assert [t["ID"] for t in listed["tasks"][NS]] == ["job", "other"]

            with pytest.raises(dt.TaskTooFreshError):
                await m.clean_up_task(NS, "other", other.version)
            wall.advance(timedelta(hours=2))
            with pytest.raises(dt.TaskTooFreshError):
                await m.clean_up_task(NS, "other", other.version, ttl=timedelta(hours=3))
            await m.clean_up_task(NS, "other", other.version)
            await m.clean_up_task(NS, "job", v)
            assert await m.list_tasks() == {}
            await m.restore(snapshot)
            assert await m.get_task(NS, "other") == cancelled  # terminal: same version
            assert (await m.get_task(NS, "job")) == failed

            # the Manager's errors, raised in the awaiting coroutine
            with pytest.raises(dt.InvalidTaskError):
                await m.get_task("", "job")
            with pytest.raises(dt.TaskNotFoundError):
                await m.cancel_task(NS, "missing", 1)
            with pytest.raises(dt.TaskNotFoundError):
                await m.wait_for_task(NS, "job", v + 1000)
            third = await m.add_task(NS, "third", nodes=["a"])
            with pytest.raises(dt.InvalidTaskError):
                await m.record_node_completion(NS, "third", third.version, "stranger")

    run(scenario)


def test_wait_for_task_returns_when_the_run_ends_and_holds_no_thread(
    etcd_client: dt.EtcdClient, dtask_prefix: str
) -> None:
    """Five waiters and other calls share a pool of one thread: no waiter parks on it."""

    async def scenario() -> None:
        async with aio.AsyncManager(etcd_client, prefix=dtask_prefix, max_workers=1) as m:
            tasks = [await m.add_task(NS, f"t{i}", nodes=["a"]) for i in range(5)]
            waiters = [
                asyncio.create_task(m.wait_for_task(NS, t.id, t.version, timeout=30)) for t in tasks
            ]
            # each follower watches the run's outcome and its record: two threads
            await eventually(lambda: len(follow_threads()) == 10, what="five followers")
            assert not any(w.done() for w in waiters)
            for task in tasks:
                await m.record_node_completion(NS, task.id, task.version, "a")
            done = await asyncio.gather(*waiters)
            assert [t.status for t in done] == [FINISHED] * 5
            assert follow_threads() == []

    run(scenario)


def test_cancelling_wait_for_task_stops_its_watch_within_a_second_and_leaves_no_thread(
    etcd_client: dt.EtcdClient, dtask_prefix: str
) -> None:
    before = set(threading.enumerate())

    async def scenario() -> None:
        async with aio.AsyncManager(etcd_client, prefix=dtask_prefix) as m:
            task = await m.add_task(NS, "job", nodes=["a"])

            waiter = asyncio.create_task(m.wait_for_task(NS, "job", task.version))
            await eventually(follow_threads, what="the follower's watch")
            started = time.monotonic()
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert time.monotonic() - started < 1.0
            assert follow_threads() == []
            assert {n for n in new_threads(before) if not n.startswith("dtask-aio_")} == set()

            # cancelled by asyncio.wait_for's timeout: the same
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(m.wait_for_task(NS, "job", task.version), 0.3)
            assert time.monotonic() - started < 1.3
            assert follow_threads() == []

            # the run is untouched and can still be waited for
            assert (await m.get_task(NS, "job")) == task

        assert new_threads(before) == set()  # the pool's threads were joined by the exit

    run(scenario)
    assert new_threads(before) == set()


def test_wait_for_task_timeout_and_a_version_that_is_not_the_current_one(
    etcd_client: dt.EtcdClient, dtask_prefix: str
) -> None:
    async def scenario() -> None:
        async with aio.AsyncManager(etcd_client, prefix=dtask_prefix) as m:
            task = await m.add_task(NS, "job", nodes=["a"])
            started = time.monotonic()
            with pytest.raises(TimeoutError, match=r"did not end within 0\.2s"):
                await m.wait_for_task(NS, "job", task.version, timeout=0.2)
            assert 0.2 <= time.monotonic() - started < 1.2
            assert follow_threads() == []

            await m.cancel_task(NS, "job", task.version)
            replacement = await m.add_task(NS, "job", nodes=["a"])
            with pytest.raises(dt.TaskNotFoundError):
                await m.wait_for_task(NS, "job", task.version)
            with pytest.raises(dt.TaskNotFoundError):
                await m.wait_for_task(NS, "never", 1)
            assert follow_threads() == []
            assert replacement.version > task.version

    run(scenario)


# ---- AsyncThreadProvider through a real Scheduler ------------------------------------------


def test_async_provider_runs_on_the_schedulers_loop(
    etcd_client: dt.EtcdClient,
    dtask_prefix: str,
    registry: CollectorRegistry,
    tmp_path: Path,
) -> None:
    """Started, progressing, completed, failed (message, or the type name), terminated by a
    cancel and by a pause (coroutine cancelled, nothing recorded), resumed."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        began: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        release: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(
            asyncio.Event
        )
        interrupted: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(
            asyncio.Event
        )
        seen: dict[str, tuple[Any, ...]] = {}

        async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
            seen[task.id] = (asyncio.get_running_loop(), threading.current_thread(), ctx)
            began[task.id].set()
            if task.payload == b"fail":
                raise ValueError("boom")
            if task.payload == b"fail-silently":
                raise KeyError
            ctx.progress(0.5, "half")
            try:
                await release[task.id].wait()
            except asyncio.CancelledError:
                interrupted[task.id].set()
                if task.payload == b"swallow":
                    return  # a terminated run that returns records nothing either
                raise

        async def status(task_id: str) -> dt.Task:
            task = await m.get_task(NS, task_id)
            assert task is not None
            return task

        provider = aio.AsyncThreadProvider(work, state_dir=tmp_path)
        async with aio.AsyncManager(etcd_client, prefix=dtask_prefix) as m, provider:
            async with aio.running_scheduler(
                m,
                node_id="n1",
                providers={NS: provider},
                registry=registry,
                resync_interval=timedelta(hours=1),
                member_ttl=timedelta(seconds=2),
            ) as scheduler:
                assert [member.node_id for member in await m.live_members()] == ["n1"]

                # started and progressing, on this loop's thread
                task = await m.add_task(NS, "ok")  # nodes: the live Schedulers of NS
                await asyncio.wait_for(began["ok"].wait(), 10)
                on_loop, on_thread, ctx = seen["ok"]
                assert on_loop is loop and on_thread is threading.current_thread()
                assert ctx.attempt == 1 and not ctx.cancelled.is_set()
                assert ctx.state_dir is not None and ctx.state_dir.is_dir()
                assert ctx.state_dir.is_relative_to(tmp_path)
                assert provider.get_local_tasks() == [task.descriptor]
                assert scheduler.running() == {NS: {task.descriptor}}
                progress = await eventually(lambda: m.get_progress(NS, "ok", task.version))
                assert (progress["n1"].fraction, progress["n1"].message) == (0.5, "half")

                # completed
                release["ok"].set()
                done = await m.wait_for_task(NS, "ok", task.version, timeout=10)
                assert (done.status, done.finished_nodes) == (FINISHED, {"n1"})

                # failed: the message verbatim, or the exception's type name
                task = await m.add_task(NS, "bad", b"fail")
                done = await m.wait_for_task(NS, "bad", task.version, timeout=10)
                assert (done.status, done.error, done.failed_node) == (FAILED, "boom", "n1")
                task = await m.add_task(NS, "quiet", b"fail-silently")
                done = await m.wait_for_task(NS, "quiet", task.version, timeout=10)
                assert (done.status, done.error) == (FAILED, "KeyError")

                # terminated by a cancel: the coroutine is cancelled, nothing recorded
                task = await m.add_task(NS, "stop")
                await asyncio.wait_for(began["stop"].wait(), 10)
                await m.cancel_task(NS, "stop", task.version)
                await asyncio.wait_for(interrupted["stop"].wait(), 10)
                assert seen["stop"][2].cancelled.is_set()
                assert (await status("stop")).finished_nodes == set()

                # terminated by a pause: records would count while PAUSED, and none is made
                task = await m.add_task(NS, "held", b"swallow")
                await asyncio.wait_for(began["held"].wait(), 10)
                began["held"].clear()
                await m.pause_task(NS, "held", task.version)
                await asyncio.wait_for(interrupted["held"].wait(), 10)
                assert await asyncio.to_thread(provider.join, 10)  # every run has ended
                held = await status("held")
                assert (held.status, held.finished_nodes) == (PAUSED, set())
                assert dict(held.attempts) == {}
                await eventually(lambda: not scheduler.running().get(NS), what="no run here")

                # resumed: started again, same version, and completes
                await m.resume_task(NS, "held", task.version)
                await asyncio.wait_for(began["held"].wait(), 10)
                release["held"].set()
                done = await m.wait_for_task(NS, "held", task.version, timeout=10)
                assert (done.status, done.finished_nodes) == (FINISHED, {"n1"})

            # the Scheduler stopped on exit: the node left the cluster at once
            assert await m.live_members() == []
            assert scheduler.running() == {}

    run(scenario)


def test_running_scheduler_stops_when_its_body_raises_and_accepts_a_manager(
    etcd_client: dt.EtcdClient, dtask_prefix: str, registry: CollectorRegistry
) -> None:
    async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
        pass

    async def scenario() -> None:
        manager = dt.Manager(etcd_client, prefix=dtask_prefix)
        async with aio.AsyncThreadProvider(work) as provider:
            with pytest.raises(LookupError):
                async with aio.running_scheduler(
                    manager, node_id="n2", providers={NS: provider}, registry=registry
                ):
                    assert [m.node_id for m in manager.live_members()] == ["n2"]
                    raise LookupError
        assert manager.live_members() == []
        with pytest.raises(dt.InvalidTaskError):
            async with aio.running_scheduler(manager, node_id="", providers={}):
                pass

    run(scenario)


# ---- units ------------------------------------------------------------------------------------

IN_PROGRESS, PENDING = dt.UnitStatus.IN_PROGRESS, dt.UnitStatus.PENDING
COMPLETED = dt.UnitStatus.COMPLETED


def test_unit_coroutines_against_etcd(etcd_client: dt.EtcdClient, dtask_prefix: str) -> None:
    async def scenario() -> None:
        async with aio.AsyncManager(etcd_client, prefix=dtask_prefix) as m:
            policy = dt.RunPolicy(max_attempts=2, retry_backoff=timedelta(0))
            units: list[dt.UnitSpec | str] = [
                dt.UnitSpec("u1", group="g"),
                dt.UnitSpec("u2", group="g", node="b"),
                "u3",
            ]
            task = await m.add_task(NS, "job", b"p", nodes=["a", "b"], policy=policy, units=units)
            v = task.version
            assert task.units == (units[0], units[1], dt.UnitSpec("u3"))
            assert [u.status for u in (await m.get_units(NS, "job", v)).values()] == [PENDING] * 3

            first = await m.claim_unit(NS, "job", v, "a")
            assert first is not None and (first.id, first.status, first.node) == (
                "u1",
                IN_PROGRESS,
                "a",
            )
            await m.record_unit_progress(NS, "job", v, "u1", "a", 0.25, "quarter")
            got = await m.get_units(NS, "job", v)
            assert list(got) == ["u1", "u2", "u3"]
            assert got["u1"].progress is not None
            assert (got["u1"].progress.fraction, got["u1"].progress.message) == (0.25, "quarter")

            # the Manager's errors, raised in the awaiting coroutine
            with pytest.raises(dt.UnitClaimError):
                await m.record_unit_completion(NS, "job", v, "u1", "b")
            with pytest.raises(dt.InvalidTaskError):
                await m.claim_unit(NS, "job", v, "stranger")
            plain = await m.add_task(NS, "plain", nodes=["a"])
            with pytest.raises(dt.InvalidTaskError):
                await m.get_units(NS, "plain", plain.version)

            # a failure with an attempt left: back to the pool, claimed once tickets are out
            retried = await m.record_unit_failure(NS, "job", v, "u1", "a", "flaky")
            assert retried.status is STARTED
            pooled = (await m.get_units(NS, "job", v))["u1"]
            assert (pooled.status, pooled.attempts, pooled.error) == (PENDING, 1, "flaky")
            third = await m.claim_unit(NS, "job", v, "a")
            assert third is not None and third.id == "u3"
            again = await m.claim_unit(NS, "job", v, "a")
            assert again is not None and (again.id, again.attempts) == ("u1", 1)
            assert await m.claim_unit(NS, "job", v, "a") is None  # u2 is b's
            second = await m.claim_unit(NS, "job", v, "b")
            assert second is not None and second.id == "u2"

            await m.record_unit_completion(NS, "job", v, "u1", "a")
            await m.record_unit_completion(NS, "job", v, "u3", "a")
            assert (await m.get_task(NS, "job")) == retried  # not FINISHED: u2 is left
            done = await m.record_unit_completion(NS, "job", v, "u2", "b")
            assert (done.status, done.finished_nodes) == (FINISHED, set())
            assert await m.wait_for_task(NS, "job", v) == done
            assert {u.status for u in (await m.get_units(NS, "job", v)).values()} == {COMPLETED}

    run(scenario)


def test_async_provider_runs_a_unit_task_on_three_schedulers_with_group_callbacks(
    etcd_client: dt.EtcdClient, dtask_prefix: str
) -> None:
    """Every unit once (a failed attempt retried), on this loop, two at a time per node at
    most; each node's group callback — async on two nodes, plain on the third — once per group
    after the groups complete."""
    nodes = ["n1", "n2", "n3"]
    units = [dt.UnitSpec(f"u{i:02d}", group=f"g{i % 3}") for i in range(24)]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        lock = threading.Lock()  # the plain callback runs on a Scheduler's thread
        done: list[tuple[str, str, int]] = []
        groups: list[tuple[str, str]] = []
        running = dict.fromkeys(nodes, 0)
        peak = dict.fromkeys(nodes, 0)
        threads: set[threading.Thread] = set()

        def provider(node: str) -> aio.AsyncThreadProvider:
            async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
                assert ctx.unit is not None and ctx.unit.node == node
                threads.add(threading.current_thread())
                running[node] += 1
                peak[node] = max(peak[node], running[node])
                try:
                    ctx.progress(0.5, f"half of {ctx.unit.id}")
                    await asyncio.sleep(0)  # let the other units of the loop in
                    if ctx.unit.id == "u07" and ctx.attempt == 1:
                        raise ValueError("flaky")
                    done.append((node, ctx.unit.id, ctx.attempt))
                finally:
                    running[node] -= 1

            async def group_done(task: dt.Task, group: str) -> None:
                assert asyncio.get_running_loop() is loop  # run on the provider's loop
                assert task.units == tuple(units)
                groups.append((node, group))

            def plain_group_done(task: dt.Task, group: str) -> None:
                with lock:
                    groups.append((node, group))

            return aio.AsyncThreadProvider(
                work,
                unit_concurrency=2,
                on_group_completed=plain_group_done if node == "n3" else group_done,
            )

        providers = {node: provider(node) for node in nodes}
        policy = dt.RunPolicy(max_attempts=2, retry_backoff=timedelta(0))
        async with contextlib.AsyncExitStack() as stack:
            m = await stack.enter_async_context(aio.AsyncManager(etcd_client, prefix=dtask_prefix))
            for node in nodes:
                await stack.enter_async_context(providers[node])
            for node in nodes:
                await stack.enter_async_context(
                    aio.running_scheduler(
                        m,
                        node_id=node,
                        providers={NS: providers[node]},
                        registry=CollectorRegistry(),
                        resync_interval=timedelta(hours=1),
                    )
                )
            task = await m.add_task(NS, "units", policy=policy, units=units)
            assert task.nodes == set(nodes)
            final = await m.wait_for_task(NS, "units", task.version, timeout=30)
            assert (final.status, final.finished_nodes) == (FINISHED, set())

            assert sorted(u for _, u, _ in done) == [u.id for u in units]  # each once
            assert [(u, attempt) for _, u, attempt in done if u == "u07"] == [("u07", 2)]
            assert threads == {threading.current_thread()}
            assert all(1 <= peak[node] <= 2 for node in nodes if peak[node])
            got = await m.get_units(NS, "units", task.version)
            assert {u.status for u in got.values()} == {COMPLETED}
            assert got["u07"].attempts == 1
            for unit in got.values():  # the last progress is written before the completion
                assert unit.progress is not None
                assert unit.progress.message == f"half of {unit.id}"

            want = sorted((node, f"g{i}") for node in nodes for i in range(3))
            await eventually(lambda: len(groups) >= len(want), what="every group callback")
            assert sorted(groups) == want
            for provider_ in providers.values():
                assert await asyncio.to_thread(provider_.join, 10)

    run(scenario)


def test_cancelling_a_unit_task_cancels_its_unit_coroutines_and_leaves_no_thread(
    etcd_client: dt.EtcdClient, dtask_prefix: str
) -> None:
    """Three units on two nodes claiming two at a time: three coroutines run and one claim
    waits on its thread; a cancel ends all four, records nothing, and claims nothing more."""
    nodes = ["n1", "n2"]
    before = set(threading.enumerate())

    def run_threads(task_id: str) -> list[str]:
        return [
            t.name for t in threading.enumerate() if t.name.startswith(f"dtask-run-{NS}-{task_id}-")
        ]

    async def scenario() -> None:
        began: list[tuple[str, str]] = []
        contexts: list[dt.TaskContext] = []
        interrupted: list[str] = []

        def provider(node: str) -> aio.AsyncThreadProvider:
            async def work(task: dt.Task, ctx: dt.TaskContext) -> None:
                assert ctx.unit is not None
                began.append((node, ctx.unit.id))
                contexts.append(ctx)
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    interrupted.append(ctx.unit.id)
                    raise

            return aio.AsyncThreadProvider(work, unit_concurrency=2)

        providers = {node: provider(node) for node in nodes}
        async with contextlib.AsyncExitStack() as stack:
            m = await stack.enter_async_context(aio.AsyncManager(etcd_client, prefix=dtask_prefix))
            for node in nodes:
                await stack.enter_async_context(providers[node])
            for node in nodes:
                await stack.enter_async_context(
                    aio.running_scheduler(
                        m,
                        node_id=node,
                        providers={NS: providers[node]},
                        registry=CollectorRegistry(),
                        resync_interval=timedelta(hours=1),
                    )
                )
            task = await m.add_task(NS, "stop", units=["u1", "u2", "u3"])
            await eventually(lambda: len(began) == 3, what="three units running")
            # the fourth worker waits for a claim, on its claim thread
            await eventually(lambda: len(run_threads("stop")) == 1, what="a waiting claim")
            assert sorted(u for _, u in began) == ["u1", "u2", "u3"]

            await m.cancel_task(NS, "stop", task.version)
            await eventually(lambda: len(interrupted) == 3, what="three coroutines cancelled")
            for provider_ in providers.values():
                assert await asyncio.to_thread(provider_.join, 10)
            assert run_threads("stop") == []
            assert all(ctx.cancelled.is_set() for ctx in contexts)
            assert len(began) == 3  # nothing claimed after the cancel
            got = await m.get_units(NS, "stop", task.version)
            assert {u.status for u in got.values()} == {IN_PROGRESS}  # nothing recorded
            assert {u.attempts for u in got.values()} == {0}
            assert (await m.get_task(NS, "stop")) == await m.wait_for_task(NS, "stop", task.version)
        assert {n for n in new_threads(before) if not n.startswith("asyncio_")} == set()

    run(scenario)
    assert new_threads(before) == set()
