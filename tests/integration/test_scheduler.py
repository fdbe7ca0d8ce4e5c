"""The Scheduler against a real etcd: Weaviate's scheduler cases, no polling, default nodes,
node loss, provider failures, many nodes, stop, recorder throttling, metrics.

Every Scheduler here runs with ``resync_interval`` of one hour (see ``Schedulers`` in
tests/support.py), so each change reaches the provider through the watch alone.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from tests.support import (
    RecordingProvider,
    Schedulers,
    keys_under,
    metric,
)

import distributedtask as dt
from distributedtask.metrics import METRIC_NAMES
from distributedtask.testing import wait_until
from distributedtask.testing.proxy import TcpProxy

pytestmark = pytest.mark.usefixtures("no_scheduler_thread_left")

NS = "ns"
TTL = timedelta(seconds=1)


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(etcd_endpoint: str) -> Iterator[dt.EtcdClient]:
    with dt.EtcdClient(etcd_endpoint, timeout=5.0, watch_timeout=6.0) as client:
        yield client


@pytest.fixture
def mgr(client: dt.EtcdClient, dtask_prefix: str) -> dt.Manager:
    """A Manager with a long TTL: terminal runs stay unless a test says otherwise."""
    return dt.Manager(client, prefix=dtask_prefix, completed_task_ttl=timedelta(hours=1))


@pytest.fixture
def ttl_mgr(client: dt.EtcdClient, dtask_prefix: str) -> dt.Manager:
    """A Manager (and so Schedulers built on it) with a completed-task TTL of one second."""
    return dt.Manager(client, prefix=dtask_prefix, completed_task_ttl=TTL)


@pytest.fixture
def schedulers(mgr: dt.Manager, registry: CollectorRegistry) -> Iterator[Schedulers]:
    with Schedulers(mgr, registry) as farm:
        yield farm


def running(scheduler: dt.Scheduler, namespace: str = NS) -> set[dt.TaskDescriptor]:
    return scheduler.running().get(namespace, set())


def status(manager: dt.Manager, task_id: str, namespace: str = NS) -> dt.TaskStatus | None:
    task = manager.get_task(namespace, task_id)
    return None if task is None else task.status


# ---- Weaviate's scheduler cases -----------------------------------------------------------


def test_single_node_starts_completes_and_cleans_up_after_the_ttl(
    schedulers: Schedulers, ttl_mgr: dt.Manager, registry: CollectorRegistry
) -> None:
    provider = RecordingProvider()
    node = schedulers.new("node-1", {NS: provider}, manager=ttl_mgr)
    task = ttl_mgr.add_task(NS, "t1", b"payload", nodes=["node-1"])

    wait_until(lambda: provider.starts() == [task.descriptor], timeout=10, message="started")
    started = provider.started_task(task.descriptor)
    assert started.payload == b"payload" and started.status is dt.TaskStatus.STARTED
    wait_until(lambda: running(node) == {task.descriptor}, timeout=5, message="running()")

    provider.complete(task)
    assert status(ttl_mgr, "t1") is dt.TaskStatus.FINISHED  # recorded synchronously
    wait_until(lambda: running(node) == set(), timeout=5, message="handle released")

    # After the TTL the run is removed from the cluster and its local state cleaned up.
    wait_until(lambda: ttl_mgr.get_task(NS, "t1") is None, timeout=10, message="TTL clean-up")
    wait_until(lambda: provider.cleanups() == [task.descriptor], timeout=10, message="local")
    assert provider.local_tasks() == set()
    assert provider.starts() == [task.descriptor]  # never started again
    assert metric(registry, "distributedtask_local_cleanups_total", namespace=NS) == 1


def test_the_schedulers_own_ttl_governs_the_cleanup(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    """API.md: ``Scheduler(completed_task_ttl=...)`` (default: the manager's) is the TTL after
    which terminal tasks are removed; here the Manager's own is an hour."""
    provider = RecordingProvider()
    schedulers.new("node-1", {NS: provider}, completed_task_ttl=TTL)
    task = mgr.add_task(NS, "t1", nodes=["node-1"])
    wait_until(lambda: provider.running() == {task.descriptor}, timeout=10)
    provider.complete(task)
    wait_until(lambda: mgr.get_task(NS, "t1") is None, timeout=6, message="TTL clean-up")
    wait_until(lambda: provider.cleanups() == [task.descriptor], timeout=10)


def test_a_run_past_its_ttl_at_start_is_removed_and_cleaned_up(
    schedulers: Schedulers, ttl_mgr: dt.Manager
) -> None:
    task = ttl_mgr.add_task(NS, "t1", nodes=["node-1"])
    ended = ttl_mgr.cancel_task(NS, "t1", task.version)
    assert ended.finished_at is not None
    finished_at = ended.finished_at
    wait_until(lambda: ttl_mgr.now() - finished_at > TTL, timeout=5, message="TTL passed")
    provider = RecordingProvider(local=[task.descriptor])
    schedulers.new("node-1", {NS: provider}, manager=ttl_mgr)
    assert provider.starts() == []
    wait_until(lambda: ttl_mgr.get_task(NS, "t1") is None, timeout=10, message="TTL clean-up")
    wait_until(lambda: provider.cleanups() == [task.descriptor], timeout=10)


def test_two_nodes_must_both_finish(schedulers: Schedulers, mgr: dt.Manager) -> None:
    p1, p2 = RecordingProvider(), RecordingProvider()
    n1 = schedulers.new("node-1", {NS: p1})
    n2 = schedulers.new("node-2", {NS: p2})
    task = mgr.add_task(NS, "t1", nodes=["node-1", "node-2"])
    wait_until(lambda: p1.running() == p2.running() == {task.descriptor}, timeout=10)

    p1.complete(task)
    after_one = mgr.get_task(NS, "t1")
    assert after_one is not None and after_one.status is dt.TaskStatus.STARTED
    assert after_one.finished_nodes == {"node-1"}
    wait_until(lambda: running(n1) == set(), timeout=5, message="node-1 done")
    assert running(n2) == {task.descriptor}
    assert p2.running() == {task.descriptor}  # node-2 keeps running

    p2.complete(task)
    finished = mgr.get_task(NS, "t1")
    assert finished is not None and finished.status is dt.TaskStatus.FINISHED
    assert finished.finished_nodes == {"node-1", "node-2"}
    wait_until(lambda: running(n2) == set(), timeout=5, message="node-2 done")
    assert p1.starts() == p2.starts() == [task.descriptor]


def test_cancel_terminates_the_local_run(
    schedulers: Schedulers, mgr: dt.Manager, registry: CollectorRegistry
) -> None:
    provider = RecordingProvider()
    node = schedulers.new("node-1", {NS: provider})
    task = mgr.add_task(NS, "t1", nodes=["node-1"])
    wait_until(lambda: provider.running() == {task.descriptor}, timeout=10)

    mgr.cancel_task(NS, "t1", task.version)
    wait_until(lambda: provider.terminations() == [task.descriptor], timeout=10)
    wait_until(lambda: running(node) == set(), timeout=5)
    assert metric(registry, "distributedtask_task_terminations_total", namespace=NS) == 1
    # Terminated, not cleaned up: the cancelled run is still the current one in the cluster.
    assert provider.cleanups() == [] and provider.local_tasks() == {task.descriptor}


def test_failure_on_another_node_terminates_the_local_run(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    p1, p2 = RecordingProvider(), RecordingProvider()
    n1 = schedulers.new("node-1", {NS: p1})
    n2 = schedulers.new("node-2", {NS: p2})
    task = mgr.add_task(NS, "t1", nodes=["node-1", "node-2"])
    wait_until(lambda: p1.running() == p2.running() == {task.descriptor}, timeout=10)

    p2.fail_run(task, "disk full")
    failed = mgr.get_task(NS, "t1")
    assert failed is not None and failed.status is dt.TaskStatus.FAILED
    assert failed.error == "disk full" and failed.failed_node == "node-2"
    wait_until(lambda: p1.terminations() == [task.descriptor], timeout=10)
    wait_until(lambda: running(n1) == running(n2) == set(), timeout=5)
    assert p1.starts() == p2.starts() == [task.descriptor]


def test_local_failure_fails_the_task_and_releases_the_run(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    provider = RecordingProvider()
    node = schedulers.new("node-1", {NS: provider})
    task = mgr.add_task(NS, "t1", nodes=["node-1"])
    wait_until(lambda: provider.running() == {task.descriptor}, timeout=10)

    provider.fail_run(task, "boom")
    failed = mgr.get_task(NS, "t1")
    assert failed is not None and failed.status is dt.TaskStatus.FAILED
    assert failed.error is not None and "boom" in failed.error
    wait_until(lambda: running(node) == set(), timeout=5)
    assert provider.starts() == [task.descriptor]  # a failed run is not started again


def test_five_tasks_present_before_start_are_all_started_before_it_returns(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    tasks = [mgr.add_task(NS, f"t{i}", b"%d" % i, nodes=["node-1"]) for i in range(5)]
    provider = RecordingProvider()
    node = schedulers.new("node-1", {NS: provider})
    # No waiting: start() returns once reconciled.
    assert sorted(provider.starts()) == sorted(task.descriptor for task in tasks)
    assert running(node) == {task.descriptor for task in tasks}


def test_start_cleans_stale_local_runs_and_starts_the_rest(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    old = mgr.add_task(NS, "replaced", b"old", nodes=["node-1"])
    mgr.cancel_task(NS, "replaced", old.version)
    new = mgr.add_task(NS, "replaced", b"new", nodes=["node-1"])
    resumed = mgr.add_task(NS, "resumed", nodes=["node-1"])  # has local state already
    fresh = mgr.add_task(NS, "fresh", nodes=["node-1"])
    done = mgr.add_task(NS, "done", nodes=["node-1"])
    mgr.record_node_completion(NS, "done", done.version, "node-1")
    gone = dt.TaskDescriptor("gone", 1)  # not in the cluster at all
    provider = RecordingProvider(local=[gone, old.descriptor, resumed.descriptor, done.descriptor])

    node = schedulers.new("node-1", {NS: provider})
    assert sorted(provider.cleanups()) == sorted([gone, old.descriptor])
    assert sorted(provider.starts()) == sorted(
        [new.descriptor, resumed.descriptor, fresh.descriptor]
    )
    assert provider.started_task(new.descriptor).payload == b"new"
    # The finished run is still the current one in the cluster: its local state stays.
    assert provider.local_tasks() == {
        new.descriptor,
        resumed.descriptor,
        fresh.descriptor,
        done.descriptor,
    }
    assert running(node) == {new.descriptor, resumed.descriptor, fresh.descriptor}


def test_runtime_cleanup_after_the_ttl(
    schedulers: Schedulers, ttl_mgr: dt.Manager, registry: CollectorRegistry
) -> None:
    p1, p2 = RecordingProvider(), RecordingProvider()
    schedulers.new("node-1", {NS: p1}, manager=ttl_mgr)
    schedulers.new("node-2", {NS: p2}, manager=ttl_mgr)
    finished = ttl_mgr.add_task(NS, "finished", nodes=["node-1", "node-2"])
    cancelled = ttl_mgr.add_task(NS, "cancelled", nodes=["node-1", "node-2"])
    failed = ttl_mgr.add_task(NS, "failed", nodes=["node-1", "node-2"])
    kept = ttl_mgr.add_task(NS, "kept", nodes=["node-1", "node-2"])
    every = {finished.descriptor, cancelled.descriptor, failed.descriptor, kept.descriptor}
    wait_until(lambda: p1.running() == p2.running() == every, timeout=10)

    p1.complete(finished)
    p2.complete(finished)
    ttl_mgr.cancel_task(NS, "cancelled", cancelled.version)
    p1.fail_run(failed, "boom")

    ended = {finished.descriptor, cancelled.descriptor, failed.descriptor}
    for provider in (p1, p2):
        wait_until(
            lambda provider=provider: set(provider.cleanups()) == ended,  # type: ignore[misc]
            timeout=10,
            message="local clean-ups after the TTL",
        )
    assert {task.id for task in ttl_mgr.list_tasks()[NS]} == {"kept"}
    assert p1.running() == p2.running() == {kept.descriptor}
    # Both nodes cleaned up their local state, each once per run.
    assert metric(registry, "distributedtask_local_cleanups_total", namespace=NS) == 6


def test_two_namespaces_with_two_providers(schedulers: Schedulers, mgr: dt.Manager) -> None:
    backups, reindex = RecordingProvider(), RecordingProvider()
    node = schedulers.new("node-1", {"backups": backups, "reindex": reindex})
    b = mgr.add_task("backups", "same-id", b"b", nodes=["node-1"])
    r = mgr.add_task("reindex", "same-id", b"r", nodes=["node-1"])
    wait_until(lambda: backups.running() == {b.descriptor}, timeout=10)
    wait_until(lambda: reindex.running() == {r.descriptor}, timeout=10)
    assert backups.started_task(b.descriptor).namespace == "backups"
    assert reindex.started_task(r.descriptor).payload == b"r"
    wait_until(
        lambda: node.running() == {"backups": {b.descriptor}, "reindex": {r.descriptor}},
        timeout=5,
    )

    mgr.cancel_task("reindex", "same-id", r.version)
    wait_until(lambda: reindex.terminations() == [r.descriptor], timeout=10)
    assert backups.terminations() == [] and backups.running() == {b.descriptor}
    assert len(backups.starts()) == len(reindex.starts()) == 1


def test_a_task_of_a_namespace_without_a_provider_is_ignored(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    provider = RecordingProvider()
    node = schedulers.new("node-1", {NS: provider})
    mgr.add_task("other", "t1", nodes=["node-1"])
    mine = mgr.add_task(NS, "t2", nodes=["node-1"])
    wait_until(lambda: provider.starts() == [mine.descriptor], timeout=10)
    assert set(node.running()) == {NS}


def test_a_new_version_starts_with_the_new_payload_and_the_old_is_cleaned_up(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    provider = RecordingProvider()
    node = schedulers.new("node-1", {NS: provider})
    old = mgr.add_task(NS, "t1", b"old", nodes=["node-1"])
    wait_until(lambda: provider.running() == {old.descriptor}, timeout=10)
    provider.complete(old)
    wait_until(lambda: running(node) == set(), timeout=5)

    new = mgr.add_task(NS, "t1", b"new", nodes=["node-1"])
    assert new.version > old.version
    wait_until(lambda: provider.running() == {new.descriptor}, timeout=10)
    assert provider.started_task(new.descriptor).payload == b"new"
    # The replaced run's local state goes without waiting for any TTL (the Manager's is 1 h).
    wait_until(lambda: provider.cleanups() == [old.descriptor], timeout=10)
    assert provider.local_tasks() == {new.descriptor}
    assert running(node) == {new.descriptor}


def test_a_cancelled_run_replaced_while_running_is_terminated_then_cleaned_up(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    provider = RecordingProvider()
    schedulers.new("node-1", {NS: provider})
    old = mgr.add_task(NS, "t1", b"old", nodes=["node-1"])
    wait_until(lambda: provider.running() == {old.descriptor}, timeout=10)
    mgr.cancel_task(NS, "t1", old.version)
    new = mgr.add_task(NS, "t1", b"new", nodes=["node-1"])  # right away: may be one batch
    wait_until(lambda: provider.running() == {new.descriptor}, timeout=10)
    wait_until(lambda: provider.cleanups() == [old.descriptor], timeout=10)
    ops = [(op, d) for op, d in provider.calls if d == old.descriptor]
    assert ops == [
        ("start", old.descriptor),
        ("terminate", old.descriptor),
        ("cleanup", old.descriptor),
    ]


# ---- no polling ---------------------------------------------------------------------------


def test_every_change_reaches_the_provider_with_an_hourly_resync(
    schedulers: Schedulers, mgr: dt.Manager, registry: CollectorRegistry
) -> None:
    p1, p2 = RecordingProvider(), RecordingProvider()
    schedulers.new("node-1", {NS: p1}, resync_interval=timedelta(hours=1))
    schedulers.new("node-2", {NS: p2}, resync_interval=timedelta(hours=1))

    a = mgr.add_task(NS, "a", nodes=["node-1", "node-2"])
    wait_until(lambda: p1.running() == p2.running() == {a.descriptor}, timeout=10)
    mgr.cancel_task(NS, "a", a.version)
    wait_until(lambda: p1.terminations() == p2.terminations() == [a.descriptor], timeout=10)
    a2 = mgr.add_task(NS, "a", b"v2", nodes=["node-1", "node-2"])
    wait_until(lambda: p1.running() == p2.running() == {a2.descriptor}, timeout=10)
    wait_until(lambda: p1.cleanups() == p2.cleanups() == [a.descriptor], timeout=10)
    p2.fail_run(a2, "boom")
    wait_until(lambda: a2.descriptor in p1.terminations(), timeout=10)

    assert metric(registry, "distributedtask_resyncs_total") == 0


def test_an_idle_scheduler_only_refreshes_its_lease(
    etcd_proxy: TcpProxy, dtask_prefix: str, mgr: dt.Manager, registry: CollectorRegistry
) -> None:
    member_ttl = timedelta(seconds=3)  # refreshed every ttl/3 = 1 s
    refresh_every = member_ttl.total_seconds() / 3
    window = 5.0
    running_task = mgr.add_task(NS, "running", nodes=["idle"])
    done = mgr.add_task(NS, "done", nodes=["idle"])
    mgr.record_node_completion(NS, "done", done.version, "idle")
    provider = RecordingProvider()
    with (
        dt.EtcdClient(etcd_proxy.endpoint, timeout=5.0, watch_timeout=6.0) as proxied,
        Schedulers(mgr, registry) as farm,
    ):
        proxied_mgr = dt.Manager(
            proxied, prefix=dtask_prefix, completed_task_ttl=timedelta(hours=1)
        )
        farm.new("idle", {NS: provider}, manager=proxied_mgr, member_ttl=member_ttl)
        assert provider.running() == {running_task.descriptor}
        etcd_proxy.reset_counts()
        # Waiting a fixed window is the measurement itself, not a wait for a condition.
        threading.Event().wait(window)
        requests = etcd_proxy.requests
        expected = window / refresh_every
        assert expected - 2 <= requests <= expected + 2, (requests, expected)
        assert metric(registry, "distributedtask_resyncs_total") == 0
        assert provider.starts() == [running_task.descriptor]


# ---- membership: default nodes, node loss, late joiners -----------------------------------


def test_default_nodes_are_exactly_the_live_nodes_serving_the_namespace(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    p1, p2, p3 = RecordingProvider(), RecordingProvider(), RecordingProvider()
    schedulers.new("node-1", {NS: p1})
    n2 = schedulers.new("node-2", {NS: p2, "other": RecordingProvider()})
    schedulers.new("node-3", {"other": p3})

    task = mgr.add_task(NS, "t1")
    assert task.nodes == {"node-1", "node-2"}
    wait_until(lambda: p1.running() == p2.running() == {task.descriptor}, timeout=10)
    assert p3.starts() == []

    n2.stop()  # leaves the cluster at once
    later = mgr.add_task(NS, "t2")
    assert later.nodes == {"node-1"}
    with pytest.raises(dt.NoEligibleNodesError):
        mgr.add_task("nobody-serves-this", "t3")


def test_a_node_that_stops_has_its_runs_failed_after_the_grace(
    schedulers: Schedulers, mgr: dt.Manager, registry: CollectorRegistry
) -> None:
    p1, p2 = RecordingProvider(), RecordingProvider()
    schedulers.new("node-1", {NS: p1}, node_loss_grace=timedelta(seconds=2))
    n2 = schedulers.new("node-2", {NS: p2}, node_loss_grace=timedelta(seconds=2))
    task = mgr.add_task(NS, "t1", nodes=["node-1", "node-2"])
    wait_until(lambda: p1.running() == p2.running() == {task.descriptor}, timeout=10)

    n2.stop()
    assert p2.running() == set()  # stop terminated node-2's handle
    assert status(mgr, "t1") is dt.TaskStatus.STARTED  # not before the grace
    wait_until(lambda: status(mgr, "t1") is dt.TaskStatus.FAILED, timeout=15)
    failed = mgr.get_task(NS, "t1")
    assert failed is not None and failed.failed_node == "node-2"
    assert failed.error is not None and failed.error.startswith("node lost: ")
    wait_until(lambda: p1.terminations() == [task.descriptor], timeout=10)
    assert metric(registry, "distributedtask_node_loss_failures_total", namespace=NS) == 1


def test_a_node_that_never_comes_has_its_runs_failed_after_the_grace(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    provider = RecordingProvider()
    schedulers.new("node-1", {NS: provider}, node_loss_grace=timedelta(seconds=1))
    task = mgr.add_task(NS, "t1", nodes=["node-1", "ghost"])
    wait_until(lambda: status(mgr, "t1") is dt.TaskStatus.FAILED, timeout=15)
    failed = mgr.get_task(NS, "t1")
    assert failed is not None and failed.failed_node == "ghost"
    wait_until(lambda: provider.terminations() == [task.descriptor], timeout=10)


def test_a_lost_node_without_a_clean_leave_has_its_runs_failed(
    schedulers: Schedulers,
    mgr: dt.Manager,
    etcd_proxy: TcpProxy,
    dtask_prefix: str,
) -> None:
    p1, p2 = RecordingProvider(), RecordingProvider()
    grace = timedelta(seconds=2)
    schedulers.new("node-1", {NS: p1}, node_loss_grace=grace)
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=2.0, watch_timeout=6.0) as proxied:
        lost_mgr = dt.Manager(proxied, prefix=dtask_prefix, completed_task_ttl=timedelta(hours=1))
        lost = schedulers.new("node-2", {NS: p2}, manager=lost_mgr, node_loss_grace=grace)
        task = mgr.add_task(NS, "t1", nodes=["node-1", "node-2"])
        wait_until(lambda: p1.running() == p2.running() == {task.descriptor}, timeout=10)

        etcd_proxy.block()  # node-2 can neither refresh its lease nor hear anything
        try:
            wait_until(
                lambda: "node-2" not in {m.node_id for m in mgr.live_members()},
                timeout=10,
                message="node-2's lease expired",
            )
            wait_until(lambda: status(mgr, "t1") is dt.TaskStatus.FAILED, timeout=15)
            failed = mgr.get_task(NS, "t1")
            assert failed is not None and failed.failed_node == "node-2"
            wait_until(lambda: p1.terminations() == [task.descriptor], timeout=10)
            assert p2.running() == {task.descriptor}  # it cannot know yet
        finally:
            etcd_proxy.unblock()
        # Back on the network, node-2 registers again and learns the run failed.
        wait_until(lambda: p2.terminations() == [task.descriptor], timeout=20)
        wait_until(
            lambda: "node-2" in {m.node_id for m in mgr.live_members()},
            timeout=10,
            message="node-2 registered again",
        )
        lost.stop()


def test_a_node_that_already_finished_is_not_waited_for(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    p1, p2 = RecordingProvider(), RecordingProvider()
    grace = timedelta(seconds=1)
    schedulers.new("node-1", {NS: p1}, node_loss_grace=grace)
    n2 = schedulers.new("node-2", {NS: p2}, node_loss_grace=grace)
    task = mgr.add_task(NS, "t1", nodes=["node-1", "node-2"])
    wait_until(lambda: p1.running() == p2.running() == {task.descriptor}, timeout=10)
    p2.complete(task)
    n2.stop()
    # A run on a node that never comes tells when a grace has surely passed since node-2 left.
    marker = mgr.add_task(NS, "marker", nodes=["node-1", "ghost"])
    wait_until(lambda: status(mgr, "marker") is dt.TaskStatus.FAILED, timeout=15)
    assert status(mgr, "t1") is dt.TaskStatus.STARTED
    assert p1.running() == {task.descriptor}
    p1.complete(task)
    assert status(mgr, "t1") is dt.TaskStatus.FINISHED
    assert marker.descriptor in p1.starts()


def test_a_node_back_within_the_grace_keeps_its_runs(
    schedulers: Schedulers,
    mgr: dt.Manager,
    etcd_proxy: TcpProxy,
    dtask_prefix: str,
) -> None:
    p1, p2 = RecordingProvider(), RecordingProvider()
    grace = timedelta(seconds=3)
    schedulers.new("node-1", {NS: p1}, node_loss_grace=grace)
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=2.0, watch_timeout=6.0) as proxied:
        flaky_mgr = dt.Manager(proxied, prefix=dtask_prefix, completed_task_ttl=timedelta(hours=1))
        flaky = schedulers.new("node-2", {NS: p2}, manager=flaky_mgr, node_loss_grace=grace)
        task = mgr.add_task(NS, "t1", nodes=["node-1", "node-2"])
        wait_until(lambda: p1.running() == p2.running() == {task.descriptor}, timeout=10)

        etcd_proxy.block()
        try:
            wait_until(
                lambda: "node-2" not in {m.node_id for m in mgr.live_members()},
                timeout=10,
                message="node-2's lease expired",
            )
            # Its grace starts after node-2's: when it ends, node-2's would have ended too.
            marker = mgr.add_task(NS, "marker", nodes=["node-1", "ghost"])
        finally:
            etcd_proxy.unblock()
        wait_until(
            lambda: "node-2" in {m.node_id for m in mgr.live_members()},
            timeout=10,
            message="node-2 registered again",
        )
        wait_until(lambda: status(mgr, "marker") is dt.TaskStatus.FAILED, timeout=15)
        assert status(mgr, "t1") is dt.TaskStatus.STARTED
        assert p1.running() == p2.running() == {task.descriptor}
        assert marker.descriptor in p1.starts()
        flaky.stop()


def test_a_node_that_joins_later_does_not_run_earlier_tasks(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    p1, p2 = RecordingProvider(), RecordingProvider()
    schedulers.new("node-1", {NS: p1})
    earlier = mgr.add_task(NS, "t1")  # assigned to the live nodes: node-1 only
    assert earlier.nodes == {"node-1"}
    wait_until(lambda: p1.running() == {earlier.descriptor}, timeout=10)

    late = schedulers.new("node-2", {NS: p2})
    assert p2.starts() == []  # start() has reconciled: nothing for node-2
    task = mgr.get_task(NS, "t1")
    assert task is not None and task.nodes == {"node-1"}
    newer = mgr.add_task(NS, "t2")
    assert newer.nodes == {"node-1", "node-2"}
    wait_until(lambda: p2.running() == {newer.descriptor}, timeout=10)
    assert running(late) == {newer.descriptor}
    p1.complete(earlier)
    assert status(mgr, "t1") is dt.TaskStatus.FINISHED  # node-2 was never waited for


# ---- provider failures --------------------------------------------------------------------


def test_a_start_that_fails_twice_is_retried_and_the_scheduler_lives(
    schedulers: Schedulers, mgr: dt.Manager, registry: CollectorRegistry
) -> None:
    provider = RecordingProvider(fail={"start": 2})
    node = schedulers.new("node-1", {NS: provider})
    task = mgr.add_task(NS, "t1", nodes=["node-1"])
    wait_until(lambda: provider.running() == {task.descriptor}, timeout=15)
    assert provider.attempts["start"] == 3
    assert provider.starts() == [task.descriptor]
    labels = {"namespace": NS, "operation": "start"}
    assert metric(registry, "distributedtask_provider_errors_total", **labels) == 2
    # Still alive: the next change is acted on.
    mgr.cancel_task(NS, "t1", task.version)
    wait_until(lambda: provider.terminations() == [task.descriptor], timeout=10)
    wait_until(lambda: running(node) == set(), timeout=5)


def test_a_terminate_that_fails_is_retried(
    schedulers: Schedulers, mgr: dt.Manager, registry: CollectorRegistry
) -> None:
    provider = RecordingProvider(fail={"terminate": 2})
    node = schedulers.new("node-1", {NS: provider})
    task = mgr.add_task(NS, "t1", nodes=["node-1"])
    wait_until(lambda: provider.running() == {task.descriptor}, timeout=10)
    mgr.cancel_task(NS, "t1", task.version)
    wait_until(lambda: provider.terminations() == [task.descriptor], timeout=15)
    assert provider.attempts["terminate"] == 3
    wait_until(lambda: running(node) == set(), timeout=5)
    labels = {"namespace": NS, "operation": "terminate"}
    assert metric(registry, "distributedtask_provider_errors_total", **labels) == 2


def test_a_cleanup_that_fails_is_retried(
    schedulers: Schedulers, mgr: dt.Manager, registry: CollectorRegistry
) -> None:
    stale = dt.TaskDescriptor("stale", 7)
    provider = RecordingProvider(local=[stale], fail={"cleanup": 2})
    schedulers.new("node-1", {NS: provider})
    wait_until(lambda: provider.cleanups() == [stale], timeout=15)
    assert provider.attempts["cleanup"] == 3 and provider.local_tasks() == set()
    labels = {"namespace": NS, "operation": "cleanup"}
    assert metric(registry, "distributedtask_provider_errors_total", **labels) == 2

    # Also at runtime: the replaced run's clean-up fails once and is retried.
    old = mgr.add_task(NS, "t1", nodes=["node-1"])
    wait_until(lambda: provider.running() == {old.descriptor}, timeout=10)
    provider.fail_next("cleanup")
    mgr.cancel_task(NS, "t1", old.version)
    new = mgr.add_task(NS, "t1", nodes=["node-1"])
    wait_until(lambda: provider.running() == {new.descriptor}, timeout=10)
    wait_until(lambda: provider.cleanups() == [stale, old.descriptor], timeout=15)
    assert metric(registry, "distributedtask_provider_errors_total", **labels) == 3


def test_a_get_local_tasks_that_fails_at_start_is_retried(
    schedulers: Schedulers, registry: CollectorRegistry
) -> None:
    stale = dt.TaskDescriptor("stale", 3)
    provider = RecordingProvider(local=[stale], fail={"list": 1})
    schedulers.new("node-1", {NS: provider})  # start() still succeeds
    labels = {"namespace": NS, "operation": "get_local_tasks"}
    assert metric(registry, "distributedtask_provider_errors_total", **labels) == 1
    # Retried with backoff (not at the hourly resync): the stale run is found and cleaned up.
    wait_until(lambda: provider.cleanups() == [stale], timeout=10, message="listed again")


# ---- many nodes ---------------------------------------------------------------------------


def test_four_nodes_forty_tasks_each_node_runs_each_task_exactly_once(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    nodes = [f"node-{i}" for i in range(4)]
    runs: collections.Counter[tuple[str, str]] = collections.Counter()
    lock = threading.Lock()

    def runner(node: str) -> dt.ThreadProvider:
        def work(task: dt.Task, context: dt.TaskContext) -> None:
            with lock:
                runs[(node, task.id)] += 1

        return dt.ThreadProvider(work)

    providers = {node: runner(node) for node in nodes}
    for node in nodes:
        schedulers.new(node, {NS: providers[node]})
    tasks = [mgr.add_task(NS, f"t{i:02d}") for i in range(40)]
    assert all(task.nodes == set(nodes) for task in tasks)

    def all_finished() -> bool:
        listed = mgr.list_tasks().get(NS, [])
        return len(listed) == 40 and all(t.status is dt.TaskStatus.FINISHED for t in listed)

    wait_until(all_finished, timeout=60, message="all 40 tasks FINISHED")
    schedulers.close()
    for provider in providers.values():
        assert provider.join(10)
    assert runs == {(node, task.id): 1 for node in nodes for task in tasks}


# ---- stop ---------------------------------------------------------------------------------


def test_stop_leaves_no_thread_is_idempotent_and_leaves_the_cluster_at_once(
    mgr: dt.Manager, client: dt.EtcdClient, dtask_prefix: str, registry: CollectorRegistry
) -> None:
    before = set(threading.enumerate())

    def work(task: dt.Task, context: dt.TaskContext) -> None:
        context.cancelled.wait(60)  # runs until terminated

    provider = dt.ThreadProvider(work)
    scheduler = dt.Scheduler(
        mgr,
        node_id="node-1",
        providers={NS: provider},
        member_ttl=timedelta(seconds=2),
        resync_interval=timedelta(hours=1),
        registry=registry,
    )
    try:
        scheduler.start()
        task = mgr.add_task(NS, "t1", nodes=["node-1"])
        wait_until(lambda: running(scheduler) == {task.descriptor}, timeout=10)
        assert [m.node_id for m in mgr.live_members()] == ["node-1"]
    finally:
        scheduler.stop()
    # Right after stop() returns: no membership (the lease was revoked), no handle.
    assert mgr.live_members() == []
    assert not any(b"/members/" in key for key in keys_under(client, dtask_prefix))
    assert scheduler.running() == {}
    assert provider.join(5)
    assert set(threading.enumerate()) - before == set()

    scheduler.stop()  # idempotent
    assert set(threading.enumerate()) - before == set()
    assert mgr.live_members() == []


def test_stop_before_start_and_context_manager(
    mgr: dt.Manager, registry: CollectorRegistry
) -> None:
    never = dt.Scheduler(
        mgr, node_id="never", providers={NS: RecordingProvider()}, registry=registry
    )
    never.stop()
    never.stop()
    provider = RecordingProvider()
    with dt.Scheduler(
        mgr,
        node_id="node-1",
        providers={NS: provider},
        member_ttl=timedelta(seconds=2),
        registry=registry,
    ) as scheduler:
        assert [m.node_id for m in mgr.live_members()] == ["node-1"]
        task = mgr.add_task(NS, "t1")
        wait_until(lambda: running(scheduler) == {task.descriptor}, timeout=10)
    assert mgr.live_members() == []
    assert provider.terminations() == [task.descriptor]


# ---- recorder, running(), metrics ---------------------------------------------------------


def test_record_progress_is_throttled_and_the_last_value_is_written(
    schedulers: Schedulers, mgr: dt.Manager, client: dt.EtcdClient
) -> None:
    provider = RecordingProvider()
    schedulers.new("node-1", {NS: provider})
    task = mgr.add_task(NS, "t1", nodes=["node-1"])
    wait_until(lambda: provider.running() == {task.descriptor}, timeout=10)

    for i in range(1, 101):
        provider.progress(task, i / 100, f"step {i}")

    def last_written() -> bool:
        progress = mgr.get_progress(NS, "t1", task.version).get("node-1")
        return progress is not None and progress.fraction == 1.0 and progress.message == "step 100"

    wait_until(last_written, timeout=10, message="the last progress value is written")
    key = mgr.keys.progress(NS, "t1", task.version, "node-1")
    kv = client.range(key, key + b"\0").kvs[0]
    # etcd's per-key version counts the writes: the first at once, the last after the throttle.
    assert kv.version <= 3, kv.version


def test_running_reflects_the_handles(schedulers: Schedulers, mgr: dt.Manager) -> None:
    provider = RecordingProvider()
    node = schedulers.new("node-1", {NS: provider, "other": RecordingProvider()})
    assert node.running().get(NS, set()) == set()
    a = mgr.add_task(NS, "a", nodes=["node-1"])
    b = mgr.add_task(NS, "b", nodes=["node-1"])
    wait_until(lambda: running(node) == {a.descriptor, b.descriptor}, timeout=10)
    assert node.running().get("other", set()) == set()
    mgr.cancel_task(NS, "a", a.version)
    wait_until(lambda: running(node) == {b.descriptor}, timeout=10)
    provider.complete(b)
    wait_until(lambda: running(node) == set(), timeout=10)
    # A copy: changing it does not change the scheduler.
    node.running().setdefault(NS, set()).add(a.descriptor)
    assert running(node) == set()


def test_metrics_are_on_the_injected_registry(
    schedulers: Schedulers, mgr: dt.Manager, registry: CollectorRegistry
) -> None:
    provider = RecordingProvider(local=[dt.TaskDescriptor("stale", 1)])
    schedulers.new("node-1", {NS: provider})
    a = mgr.add_task(NS, "a", nodes=["node-1"])
    b = mgr.add_task(NS, "b", nodes=["node-1"])
    wait_until(lambda: provider.running() == {a.descriptor, b.descriptor}, timeout=10)
    wait_until(
        lambda: metric(registry, "distributedtask_tasks_running", namespace=NS) == 2, timeout=5
    )
    mgr.cancel_task(NS, "a", a.version)
    wait_until(
        lambda: metric(registry, "distributedtask_tasks_running", namespace=NS) == 1, timeout=10
    )

    assert metric(registry, "distributedtask_task_starts_total", namespace=NS) == 2
    assert metric(registry, "distributedtask_task_terminations_total", namespace=NS) == 1
    assert metric(registry, "distributedtask_local_cleanups_total", namespace=NS) == 1
    assert metric(registry, "distributedtask_start_latency_seconds_count", namespace=NS) == 2
    assert metric(registry, "distributedtask_members") == 1
    assert registry.get_sample_value("distributedtask_resyncs_total") == 0
    names = {sample.name for family in registry.collect() for sample in family.samples}
    names |= {family.name for family in registry.collect()}
    for name in METRIC_NAMES:
        assert name in names or name.removesuffix("_total") in names, name
