"""Run policy against a real etcd: retries with backoff, deadlines, pause and resume — the
Manager's rules and races, and the Schedulers that act on them. Timings are driven through
injected clocks (the Manager's wall clock, the Scheduler's monotonic one), never by sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from tests.support import (
    FakeClock,
    Monotonic,
    RecordingProvider,
    Schedulers,
    metric,
)

import distributedtask as dt
from distributedtask.scheduler.timers import TimerKind
from distributedtask.testing import wait_until
from distributedtask.testing.proxy import TcpProxy

pytestmark = pytest.mark.usefixtures("no_scheduler_thread_left")

NS = "ns"
RETRY3 = dt.RunPolicy(max_attempts=3, retry_backoff=timedelta(seconds=10))


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mono() -> Monotonic:
    return Monotonic()


@pytest.fixture
def mgr(etcd_client: dt.EtcdClient, dtask_prefix: str, wall: FakeClock) -> dt.Manager:
    return dt.Manager(
        etcd_client, prefix=dtask_prefix, clock=wall, completed_task_ttl=timedelta(hours=1)
    )


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def schedulers(mgr: dt.Manager, registry: CollectorRegistry) -> Iterator[Schedulers]:
    with Schedulers(mgr, registry) as farm:
        yield farm


# ---- the Manager's rules ----------------------------------------------------------------------


def test_a_plain_task_serialises_exactly_as_before(mgr: dt.Manager) -> None:
    task = mgr.add_task(NS, "plain", nodes=["n1"])
    failed = mgr.record_node_failure(NS, "plain", task.version, "n1", "boom")
    assert failed.policy == dt.RunPolicy() and failed.attempts == {} and failed.last_errors == {}
    body = orjson.loads(mgr.list_tasks_payload())["tasks"][NS][0]
    assert set(body) == {
        "namespace",
        "ID",
        "version",
        "payload",
        "status",
        "startedAt",
        "finishedAt",
        "error",
        "failedNode",
        "finishedNodes",
        "nodes",
    }


def test_failures_with_attempts_left_keep_the_run_started_then_the_last_fails_it(
    mgr: dt.Manager,
) -> None:
    task = mgr.add_task(NS, "t", nodes=["n1", "n2"], policy=RETRY3)
    assert task.policy == RETRY3
    first = mgr.record_node_failure(NS, "t", task.version, "n1", "flaky 1")
    assert first.status is dt.TaskStatus.STARTED
    assert first.attempts == {"n1": 1} and first.last_errors == {"n1": "flaky 1"}
    other = mgr.record_node_failure(NS, "t", task.version, "n2", "other")
    assert other.attempts == {"n1": 1, "n2": 1} and other.status is dt.TaskStatus.STARTED
    second = mgr.record_node_failure(NS, "t", task.version, "n1", "flaky 2")
    assert second.attempts["n1"] == 2 and second.last_errors["n1"] == "flaky 2"
    last = mgr.record_node_failure(NS, "t", task.version, "n1", "flaky 3")
    assert last.status is dt.TaskStatus.FAILED
    assert (last.error, last.failed_node) == ("flaky 3", "n1")
    assert last.attempts == {"n1": 3, "n2": 1}
    assert mgr.get_task(NS, "t") == last
    with pytest.raises(dt.TaskNotRunningError):
        mgr.record_node_failure(NS, "t", task.version, "n2", "late")
    body = orjson.loads(mgr.list_tasks_payload())["tasks"][NS][0]
    assert body["policy"] == {"maxAttempts": 3}
    assert body["attempts"] == {"n1": 3, "n2": 1}
    assert body["lastErrors"] == {"n1": "flaky 3", "n2": "other"}
    assert dt.Task.__hash__(last)  # still hashable with its per-node maps


def test_a_retried_failure_whose_response_was_lost_counts_once(
    proxied_manager: dt.Manager, etcd_proxy: TcpProxy
) -> None:
    task = proxied_manager.add_task(NS, "t", nodes=["n1"], policy=RETRY3)
    etcd_proxy.drop_next_response()
    after = proxied_manager.record_node_failure(NS, "t", task.version, "n1", "once")
    assert etcd_proxy.dropped == 1
    assert after.attempts == {"n1": 1} and after.status is dt.TaskStatus.STARTED


def test_pause_and_resume_rules(mgr: dt.Manager) -> None:
    task = mgr.add_task(NS, "t", nodes=["n1", "n2"])
    paused = mgr.pause_task(NS, "t", task.version)
    assert paused.status is dt.TaskStatus.PAUSED and not paused.status.terminal
    assert mgr.pause_task(NS, "t", task.version) == paused  # unchanged
    with pytest.raises(dt.TaskAlreadyRunningError):
        mgr.add_task(NS, "t", nodes=["n1"])
    with pytest.raises(dt.TaskStillRunningError):
        mgr.clean_up_task(NS, "t", task.version)
    # completions and failures recorded while PAUSED count as usual
    done = mgr.record_node_completion(NS, "t", task.version, "n1")
    assert done.status is dt.TaskStatus.PAUSED and done.finished_nodes == {"n1"}
    resumed = mgr.resume_task(NS, "t", task.version)
    assert resumed.status is dt.TaskStatus.STARTED and resumed.finished_nodes == {"n1"}
    assert mgr.resume_task(NS, "t", task.version) == resumed  # unchanged
    mgr.pause_task(NS, "t", task.version)
    cancelled = mgr.cancel_task(NS, "t", task.version)  # cancel works from PAUSED
    assert cancelled.status is dt.TaskStatus.CANCELLED
    for call in (mgr.pause_task, mgr.resume_task):
        with pytest.raises(dt.TaskNotRunningError):
            call(NS, "t", task.version)
    with pytest.raises(dt.TaskNotFoundError):
        mgr.pause_task(NS, "t", task.version + 100)


def test_the_last_completion_while_paused_finishes_the_run(mgr: dt.Manager) -> None:
    task = mgr.add_task(NS, "t", nodes=["n1"])
    mgr.pause_task(NS, "t", task.version)
    done = mgr.record_node_completion(NS, "t", task.version, "n1")
    assert done.status is dt.TaskStatus.FINISHED


def test_snapshot_and_restore_keep_policy_attempts_and_pause(
    mgr: dt.Manager, etcd_client: dt.EtcdClient, dtask_prefix: str
) -> None:
    task = mgr.add_task(NS, "t", b"p", nodes=["n1", "n2"], policy=RETRY3)
    mgr.record_node_failure(NS, "t", task.version, "n1", "e1")
    mgr.record_node_failure(NS, "t", task.version, "n1", "e2")
    mgr.pause_task(NS, "t", task.version)
    data = mgr.snapshot()
    other = dt.Manager(etcd_client, prefix=dtask_prefix + "-restored")
    other.restore(data)
    restored = other.get_task(NS, "t")
    assert restored is not None and restored.status is dt.TaskStatus.PAUSED
    assert restored.policy == RETRY3
    assert restored.attempts == {"n1": 2} and restored.last_errors == {"n1": "e2"}
    # the attempts really are counted in etcd: one more failure is the last
    other.resume_task(NS, "t", restored.version)
    last = other.record_node_failure(NS, "t", restored.version, "n1", "e3")
    assert last.status is dt.TaskStatus.FAILED


def test_a_deadline_failure_is_refused_once_the_run_was_paused_since(mgr: dt.Manager) -> None:
    task = mgr.add_task(NS, "t", nodes=["n1"], policy=dt.RunPolicy(deadline=timedelta(seconds=5)))
    assert mgr.fail_deadline(NS, "t", task.version, 0, 5.0) is not None
    failed = mgr.get_task(NS, "t")
    assert failed is not None and failed.status is dt.TaskStatus.FAILED
    assert failed.error == "deadline exceeded (5s)" and failed.failed_node is None
    again = mgr.add_task(NS, "u", nodes=["n1"])
    mgr.pause_task(NS, "u", again.version)
    mgr.resume_task(NS, "u", again.version)
    assert mgr.fail_deadline(NS, "u", again.version, 0, 5.0) is None  # the state moved
    assert mgr.get_task(NS, "u").status is dt.TaskStatus.STARTED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "race",
    ["failure-vs-pause", "resume-vs-cancel", "deadline-vs-last-completion"],
)
def test_races_have_one_winner(mgr: dt.Manager, race: str) -> None:
    outcomes: dict[str, int] = {}
    for i in range(20):
        tid = f"{race}-{i}"
        policy = dt.RunPolicy(deadline=timedelta(seconds=1))
        task = mgr.add_task(NS, tid, nodes=["n1"], policy=policy)
        if race == "resume-vs-cancel":
            mgr.pause_task(NS, tid, task.version)
        calls: dict[str, Callable[[], Any]] = {
            "failure-vs-pause": {
                "fail": lambda t=tid, v=task.version: mgr.record_node_failure(NS, t, v, "n1", "x"),
                "pause": lambda t=tid, v=task.version: mgr.pause_task(NS, t, v),
            },
            "resume-vs-cancel": {
                "resume": lambda t=tid, v=task.version: mgr.resume_task(NS, t, v),
                "cancel": lambda t=tid, v=task.version: mgr.cancel_task(NS, t, v),
            },
            "deadline-vs-last-completion": {
                "deadline": lambda t=tid, v=task.version: mgr.fail_deadline(NS, t, v, 0, 1.0),
                "complete": lambda t=tid, v=task.version: mgr.record_node_completion(
                    NS, t, v, "n1"
                ),
            },
        }[race]
        results = _race(calls)
        final = mgr.get_task(NS, tid)
        assert final is not None
        outcomes[final.status.value] = outcomes.get(final.status.value, 0) + 1
        if race == "failure-vs-pause":
            # the failure ends the run whether or not the pause came first; a pause that came
            # after it is refused
            assert final.status is dt.TaskStatus.FAILED and final.failed_node == "n1"
            assert isinstance(results["pause"], (dt.Task, dt.TaskNotRunningError))
        elif race == "resume-vs-cancel":
            assert final.status is dt.TaskStatus.CANCELLED
            assert isinstance(results["cancel"], dt.Task)
        else:
            # exactly one of the two decides the outcome
            assert final.status in (dt.TaskStatus.FINISHED, dt.TaskStatus.FAILED)
            if final.status is dt.TaskStatus.FAILED:
                assert final.error == "deadline exceeded (1s)"
                assert isinstance(results["deadline"], dt.Task)
            else:
                assert results["deadline"] is None
    assert sum(outcomes.values()) == 20


def _race(calls: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    barrier = threading.Barrier(len(calls))
    results: dict[str, Any] = {}

    def run(name: str, call: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[name] = call()
        except dt.DistributedTaskError as exc:
            results[name] = exc

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


# ---- the Schedulers -----------------------------------------------------------------------------


def _next_attempt_in(scheduler: dt.Scheduler, task: dt.Task) -> float | None:
    for kind, task_id, version, left in scheduler.pending_timers():
        if kind is TimerKind.NEXT_ATTEMPT and (task_id, version) == ((NS, task.id), task.version):
            return left
    return None


def test_a_failed_attempt_starts_again_after_the_doubling_backoff(
    schedulers: Schedulers, mgr: dt.Manager, mono: Monotonic, registry: CollectorRegistry
) -> None:
    provider = RecordingProvider()
    scheduler = schedulers.new("n1", {NS: provider}, clock=mono)
    task = mgr.add_task(NS, "t", nodes=["n1"], policy=RETRY3)
    wait_until(lambda: len(provider.starts()) == 1, timeout=10)
    first = provider.started_task(task.descriptor)
    assert first.attempts == {}
    provider.fail_run(first, "flaky")
    wait_until(lambda: _next_attempt_in(scheduler, task) is not None, timeout=10)
    left = _next_attempt_in(scheduler, task)
    assert left is not None and 9.0 <= left <= 11.0  # 10 s, jittered by 10 %
    wait_until(lambda: provider.running() == set(), timeout=10)
    assert len(provider.starts()) == 1
    mono.advance(11.5)
    scheduler.check_timers()
    wait_until(lambda: len(provider.starts()) == 2, timeout=10)
    second = provider.tasks[-1]
    assert second.version == task.version and second.attempts == {"n1": 1}
    provider.fail_run(second, "flaky again")
    wait_until(lambda: _next_attempt_in(scheduler, task) is not None, timeout=10)
    left = _next_attempt_in(scheduler, task)
    assert left is not None and 18.0 <= left <= 22.0  # doubled
    mono.advance(22.5)
    scheduler.check_timers()
    wait_until(lambda: len(provider.starts()) == 3, timeout=10)
    provider.fail_run(provider.tasks[-1], "third time")
    final = mgr.wait_for_task(NS, "t", task.version, timeout=10)
    assert final.status is dt.TaskStatus.FAILED and final.attempts == {"n1": 3}
    assert metric(registry, "distributedtask_retries_total", namespace=NS) == 2


def test_a_thread_provider_function_sees_its_attempt_and_succeeds_on_the_retry(
    schedulers: Schedulers, mgr: dt.Manager, mono: Monotonic
) -> None:
    seen: list[int] = []

    def flaky(task: dt.Task, ctx: dt.TaskContext) -> None:
        seen.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")

    provider = dt.ThreadProvider(flaky)
    scheduler = schedulers.new("n1", {NS: provider}, clock=mono)
    policy = dt.RunPolicy(max_attempts=2, retry_backoff=timedelta(seconds=1))
    task = mgr.add_task(NS, "t", nodes=["n1"], policy=policy)
    wait_until(lambda: _next_attempt_in(scheduler, task) is not None, timeout=10)
    mono.advance(2)
    scheduler.check_timers()
    done = mgr.wait_for_task(NS, "t", task.version, timeout=10)
    assert done.status is dt.TaskStatus.FINISHED and seen == [1, 2]
    assert done.attempts == {"n1": 1} and done.last_errors == {"n1": "first attempt fails"}
    assert provider.join(10)


def test_attempts_survive_a_scheduler_restart(
    schedulers: Schedulers, mgr: dt.Manager, mono: Monotonic, wall: FakeClock
) -> None:
    provider = RecordingProvider()
    first = schedulers.new("n1", {NS: provider}, clock=mono)
    task = mgr.add_task(NS, "t", nodes=["n1"], policy=RETRY3)
    wait_until(lambda: len(provider.starts()) == 1, timeout=10)
    provider.fail_run(provider.started_task(task.descriptor), "before the restart")
    wait_until(lambda: _next_attempt_in(first, task) is not None, timeout=10)
    first.stop()
    # a new process: nothing in memory; the attempt and when it failed are in etcd
    again = RecordingProvider(local=[task.descriptor])
    second = schedulers.new("n1", {NS: again}, clock=mono)
    left = _next_attempt_in(second, task)
    assert left is not None and 9.0 <= left <= 10.5  # the whole backoff is still ahead
    assert again.starts() == []
    wall.advance(timedelta(seconds=11))
    mono.advance(11)
    second.check_timers()
    wait_until(lambda: len(again.starts()) == 1, timeout=10)
    assert again.tasks[0].attempts == {"n1": 1}


def test_pause_terminates_local_runs_and_resume_starts_them_again(
    schedulers: Schedulers, mgr: dt.Manager, registry: CollectorRegistry
) -> None:
    providers = {node: RecordingProvider() for node in ("n1", "n2")}
    for node, provider in providers.items():
        schedulers.new(node, {NS: provider})
    task = mgr.add_task(NS, "t", nodes=["n1", "n2"])
    wait_until(lambda: all(len(p.starts()) == 1 for p in providers.values()), timeout=10)
    providers["n1"].complete(providers["n1"].started_task(task.descriptor))
    wait_until(lambda: providers["n1"].running() == set(), timeout=10)
    mgr.pause_task(NS, "t", task.version)
    wait_until(lambda: providers["n2"].running() == set(), timeout=10)
    assert providers["n2"].terminations() == [task.descriptor]
    assert providers["n2"].local_tasks() == {task.descriptor}  # local state kept
    assert metric(registry, "distributedtask_pauses_total", namespace=NS) == 1
    assert metric(registry, "distributedtask_oldest_pause_timestamp_seconds", namespace=NS) > 0
    mgr.resume_task(NS, "t", task.version)
    wait_until(lambda: len(providers["n2"].starts()) == 2, timeout=10)
    assert len(providers["n1"].starts()) == 1  # it had finished: not started again
    wait_until(
        lambda: (
            metric(registry, "distributedtask_oldest_pause_timestamp_seconds", namespace=NS) == 0
        ),
        timeout=10,
    )
    providers["n2"].complete(providers["n2"].tasks[-1])
    assert mgr.wait_for_task(NS, "t", task.version, timeout=10).status is dt.TaskStatus.FINISHED


def test_node_loss_does_not_fail_a_paused_task_and_its_grace_starts_again_at_resume(
    schedulers: Schedulers, mgr: dt.Manager, mono: Monotonic
) -> None:
    provider = RecordingProvider()
    watcher = schedulers.new("n1", {NS: provider}, clock=mono)
    task = mgr.add_task(NS, "t", nodes=["n1", "ghost"])
    wait_until(lambda: len(provider.starts()) == 1, timeout=10)
    wait_until(
        lambda: any(k is TimerKind.NODE_LOSS for k, *_ in watcher.pending_timers()), timeout=10
    )
    mgr.pause_task(NS, "t", task.version)
    wait_until(lambda: provider.running() == set(), timeout=10)
    mono.advance(3600)  # far past the grace: the node is not awaited while PAUSED
    watcher.check_timers()
    mgr.resume_task(NS, "t", task.version)
    wait_until(lambda: len(provider.starts()) == 2, timeout=10)
    assert mgr.get_task(NS, "t").status is dt.TaskStatus.STARTED  # type: ignore[union-attr]
    wait_until(
        lambda: any(
            kind is TimerKind.NODE_LOSS and left > 2.0
            for kind, _, _, left in watcher.pending_timers()
        ),
        timeout=10,
    )  # a fresh grace of 3 s
    mono.advance(4)
    watcher.check_timers()
    failed = mgr.wait_for_task(NS, "t", task.version, timeout=10)
    assert failed.status is dt.TaskStatus.FAILED and failed.failed_node == "ghost"


def test_a_deadline_fails_the_run_paused_time_excluded_even_with_no_node_of_it_alive(
    schedulers: Schedulers,
    mgr: dt.Manager,
    mono: Monotonic,
    wall: FakeClock,
    registry: CollectorRegistry,
) -> None:
    # The only Scheduler serves another namespace: none of the task's nodes is alive.
    bystander = schedulers.new(
        "bystander", {"other": RecordingProvider()}, clock=mono, node_loss_grace=None
    )
    policy = dt.RunPolicy(deadline=timedelta(seconds=60))
    task = mgr.add_task(NS, "t", nodes=["away"], policy=policy)

    def deadline_timers() -> list[float]:
        return [
            left
            for kind, task_id, _, left in bystander.pending_timers()
            if kind is TimerKind.DEADLINE and task_id == (NS, "t")
        ]

    wait_until(lambda: len(deadline_timers()) == 1, timeout=10)
    assert 59.0 <= deadline_timers()[0] <= 61.0
    wall.advance(timedelta(seconds=30))
    mgr.pause_task(NS, "t", task.version)
    wall.advance(timedelta(seconds=100))  # paused: not counted
    mgr.resume_task(NS, "t", task.version)
    # a timer for the new run state (the one armed before the pause is stale and does nothing)
    wait_until(lambda: len(deadline_timers()) == 2, timeout=10)
    left = min(deadline_timers())
    assert 29.0 <= left <= 31.0  # 60 s allowed, 30 s run, the 100 s paused not counted
    assert mgr.get_task(NS, "t").status is dt.TaskStatus.STARTED  # type: ignore[union-attr]
    wall.advance(timedelta(seconds=left + 1))
    mono.advance(left + 1)
    bystander.check_timers()
    failed = mgr.wait_for_task(NS, "t", task.version, timeout=10)
    assert failed.status is dt.TaskStatus.FAILED
    assert failed.error == "deadline exceeded (60s)" and failed.failed_node is None
    assert metric(registry, "distributedtask_deadline_failures_total", namespace=NS) == 1
