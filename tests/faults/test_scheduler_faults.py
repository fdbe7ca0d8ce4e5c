"""The Scheduler under faults: an etcd restart, a cut connection during which tasks are added,
cancelled and the keyspace compacted, and the loss of the leader of a three-member cluster.

Schedulers run with ``resync_interval`` of one hour: recovery comes from the watch itself.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from tests.support import RecordingProvider, Schedulers, metric, scheduler_threads

import distributedtask as dt
from distributedtask.testing import compact, wait_until
from distributedtask.testing.etcd import EtcdCluster, EtcdServer
from distributedtask.testing.proxy import TcpProxy

pytestmark = pytest.mark.usefixtures("no_scheduler_thread_left")

NS = "ns"
PREFIX = "/dtask-faults"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def status(manager: dt.Manager, task_id: str) -> dt.TaskStatus | None:
    task = manager.get_task(NS, task_id)
    return None if task is None else task.status


def test_the_scheduler_keeps_working_across_an_etcd_restart(
    etcd_private: EtcdServer, registry: CollectorRegistry
) -> None:
    provider = RecordingProvider()
    with (
        dt.EtcdClient(etcd_private.endpoint, timeout=2.0, watch_timeout=6.0) as client,
        Schedulers(dt.Manager(client, prefix=PREFIX), registry) as farm,
    ):
        mgr = farm.manager
        node = farm.new("node-1", {NS: provider}, node_loss_grace=timedelta(seconds=30))
        first = mgr.add_task(NS, "t1", nodes=["node-1"])
        wait_until(lambda: provider.running() == {first.descriptor}, timeout=10)

        etcd_private.kill()
        etcd_private.restart()

        second = mgr.add_task(NS, "t2", b"after", nodes=["node-1"])
        wait_until(
            lambda: provider.running() == {first.descriptor, second.descriptor},
            timeout=20,
            message="a task added after the restart is started",
        )
        mgr.cancel_task(NS, "t1", first.version)
        wait_until(lambda: provider.terminations() == [first.descriptor], timeout=10)
        provider.complete(second)
        assert status(mgr, "t2") is dt.TaskStatus.FINISHED
        wait_until(lambda: node.running().get(NS, set()) == set(), timeout=10)
        wait_until(
            lambda: [m.node_id for m in mgr.live_members()] == ["node-1"],
            timeout=10,
            message="the node is (again) a member",
        )
        assert provider.starts() == [first.descriptor, second.descriptor]
        assert (
            sum(
                metric(registry, "distributedtask_watch_restarts_total", reason=reason)
                for reason in ("broken", "eof", "canceled", "error", "connect", "compacted")
            )
            >= 1
        )


def test_a_cut_connection_with_adds_cancels_and_compaction_ends_with_the_right_runs(
    etcd_endpoint: str,
    etcd_client: dt.EtcdClient,
    etcd_proxy: TcpProxy,
    dtask_prefix: str,
    registry: CollectorRegistry,
) -> None:
    mgr = dt.Manager(etcd_client, prefix=dtask_prefix, completed_task_ttl=timedelta(hours=1))
    provider = RecordingProvider()
    with (
        dt.EtcdClient(etcd_proxy.endpoint, timeout=2.0, watch_timeout=6.0) as proxied,
        Schedulers(dt.Manager(proxied, prefix=dtask_prefix), registry) as farm,
    ):
        # A long grace: the node's own lease may expire while cut off; that is not a loss.
        node = farm.new("node-1", {NS: provider}, node_loss_grace=timedelta(seconds=60))
        keep = mgr.add_task(NS, "keep", nodes=["node-1"])
        cancel = mgr.add_task(NS, "cancel", nodes=["node-1"])
        replace = mgr.add_task(NS, "replace", b"old", nodes=["node-1"])
        before = {keep.descriptor, cancel.descriptor, replace.descriptor}
        wait_until(lambda: provider.running() == before, timeout=10)

        etcd_proxy.block()
        try:
            mgr.cancel_task(NS, "cancel", cancel.version)
            mgr.cancel_task(NS, "replace", replace.version)
            replaced = mgr.add_task(NS, "replace", b"new", nodes=["node-1"])
            added = mgr.add_task(NS, "added", nodes=["node-1"])
            ephemeral = mgr.add_task(NS, "ephemeral", nodes=["node-1"])
            mgr.cancel_task(NS, "ephemeral", ephemeral.version)  # never seen running
            compact(etcd_endpoint)
        finally:
            etcd_proxy.unblock()

        want = {keep.descriptor, replaced.descriptor, added.descriptor}
        wait_until(
            lambda: provider.running() == want,
            timeout=20,
            message="exactly the right runs after the cut",
        )
        wait_until(lambda: node.running().get(NS, set()) == want, timeout=10)
        wait_until(lambda: provider.cleanups() == [replace.descriptor], timeout=10)
        assert sorted(provider.terminations()) == sorted([cancel.descriptor, replace.descriptor])
        assert ephemeral.descriptor not in provider.starts()
        assert provider.started_task(replaced.descriptor).payload == b"new"
        assert sorted(provider.starts()) == sorted(before | want)
        assert metric(registry, "distributedtask_watch_restarts_total", reason="compacted") >= 1
        # Still following the watch: a later change arrives.
        mgr.cancel_task(NS, "added", added.version)
        wait_until(lambda: added.descriptor in provider.terminations(), timeout=10)


@pytest.mark.cluster
def test_the_scheduler_survives_the_loss_of_the_cluster_leader(
    etcd_cluster: EtcdCluster, registry: CollectorRegistry
) -> None:
    leader = etcd_cluster.wait_for_leader()
    # The leader first, so that clients must fail over when it dies.
    endpoints = [etcd_cluster.endpoints[leader]] + [
        e for i, e in enumerate(etcd_cluster.endpoints) if i != leader
    ]
    p1, p2 = RecordingProvider(), RecordingProvider()
    with (
        dt.EtcdClient(endpoints, timeout=5.0, watch_timeout=6.0) as client,
        dt.EtcdClient(endpoints, timeout=5.0, watch_timeout=6.0) as client1,
        dt.EtcdClient(endpoints, timeout=5.0, watch_timeout=6.0) as client2,
        Schedulers(dt.Manager(client, prefix=PREFIX), registry) as farm,
    ):
        mgr = farm.manager
        grace = timedelta(seconds=30)
        farm.new(
            "node-1", {NS: p1}, manager=dt.Manager(client1, prefix=PREFIX), node_loss_grace=grace
        )
        farm.new(
            "node-2", {NS: p2}, manager=dt.Manager(client2, prefix=PREFIX), node_loss_grace=grace
        )
        first = mgr.add_task(NS, "t1")
        assert first.nodes == {"node-1", "node-2"}
        wait_until(lambda: p1.running() == p2.running() == {first.descriptor}, timeout=10)

        etcd_cluster.kill(leader)
        etcd_cluster.wait_for_leader(not_index=leader)

        second = mgr.add_task(NS, "t2", nodes=["node-1", "node-2"])
        both = {first.descriptor, second.descriptor}
        wait_until(lambda: p1.running() == p2.running() == both, timeout=30)
        mgr.cancel_task(NS, "t1", first.version)
        wait_until(lambda: p1.terminations() == p2.terminations() == [first.descriptor], timeout=20)
        p1.complete(second)
        p2.complete(second)
        assert status(mgr, "t2") is dt.TaskStatus.FINISHED
        wait_until(lambda: p1.running() == p2.running() == set(), timeout=20)
        assert p1.starts() == p2.starts() == [first.descriptor, second.descriptor]
        wait_until(
            lambda: [m.node_id for m in mgr.live_members()] == ["node-1", "node-2"],
            timeout=20,
            message="both nodes are members",
        )


def test_a_completion_recorded_while_cut_off_is_retried_and_never_raises(
    etcd_client: dt.EtcdClient,
    etcd_proxy: TcpProxy,
    dtask_prefix: str,
    registry: CollectorRegistry,
) -> None:
    mgr = dt.Manager(etcd_client, prefix=dtask_prefix, completed_task_ttl=timedelta(hours=1))
    provider = RecordingProvider()
    with (
        dt.EtcdClient(etcd_proxy.endpoint, timeout=1.0, watch_timeout=6.0) as proxied,
        Schedulers(dt.Manager(proxied, prefix=dtask_prefix), registry) as farm,
    ):
        node = farm.new("node-1", {NS: provider}, node_loss_grace=timedelta(seconds=60))
        task = mgr.add_task(NS, "t1", nodes=["node-1"])
        wait_until(lambda: provider.running() == {task.descriptor}, timeout=10)

        etcd_proxy.block()
        try:
            provider.complete(task)  # etcd cannot take it now: queued, no exception
            assert status(mgr, "t1") is dt.TaskStatus.STARTED
        finally:
            etcd_proxy.unblock()
        wait_until(lambda: status(mgr, "t1") is dt.TaskStatus.FINISHED, timeout=20)
        wait_until(lambda: node.running().get(NS, set()) == set(), timeout=10)
        assert provider.starts() == [task.descriptor]  # a recorded run is not started again
        assert metric(registry, "distributedtask_record_retries_total", operation="complete") >= 1


def test_start_raises_etcd_error_when_etcd_is_unreachable_and_leaves_nothing_running(
    etcd_proxy: TcpProxy, dtask_prefix: str, registry: CollectorRegistry
) -> None:
    provider = RecordingProvider()
    before = scheduler_threads()
    etcd_proxy.block()
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=1.0, watch_timeout=6.0) as proxied:
        scheduler = dt.Scheduler(
            dt.Manager(proxied, prefix=dtask_prefix),
            node_id="node-1",
            providers={NS: provider},
            member_ttl=timedelta(seconds=2),
            registry=registry,
        )
        try:
            with pytest.raises(dt.EtcdError):
                scheduler.start()
            assert scheduler_threads() == before
            assert provider.calls == []
        finally:
            scheduler.stop()
