"""Quorum loss: two of the three members of the cluster down at once.

While the cluster has no quorum, every Manager call ends with a (transient) EtcdError within a
bounded time instead of hanging, a Scheduler cannot start (and leaves nothing behind), and the
running Schedulers keep their runs: ``running()`` unchanged, no ``terminate`` called, the
recorder takes a completion without raising. When quorum returns, the same Schedulers (no
restart) go on: the completion recorded during the outage is delivered, a task added afterwards
starts on both nodes, a cancel terminates, and runs finish.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from tests.support import RecordingProvider, Schedulers, metric, scheduler_threads

import distributedtask as dt
from distributedtask.testing import wait_until
from distributedtask.testing.etcd import EtcdCluster

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("no_scheduler_thread_left")]

NS = "ns"
TIMEOUT = 1.0  # the clients' request timeout
BOUND = 2 * TIMEOUT + 2.0  # EtcdClient: "raises at most about 2 * timeout after it began"


def timed_etcd_error(call: Callable[[], Any]) -> tuple[dt.EtcdError, float]:
    began = time.monotonic()
    with pytest.raises(dt.EtcdError) as info:
        call()
    return info.value, time.monotonic() - began


def test_without_quorum_calls_fail_fast_runs_are_kept_and_everything_resumes(
    etcd_cluster: EtcdCluster, dtask_prefix: str
) -> None:
    endpoints = etcd_cluster.endpoints
    registries = {node: CollectorRegistry() for node in ("node-1", "node-2")}
    p1, p2 = RecordingProvider(), RecordingProvider()

    def client(rotate: int) -> dt.EtcdClient:
        return dt.EtcdClient(
            endpoints[rotate:] + endpoints[:rotate], timeout=TIMEOUT, watch_timeout=6.0
        )

    with (
        client(0) as c0,
        client(1) as c1,
        client(2) as c2,
        Schedulers(dt.Manager(c0, prefix=dtask_prefix), CollectorRegistry()) as farm,
    ):
        mgr = farm.manager
        s1 = farm.new(
            "node-1",
            {NS: p1},
            manager=dt.Manager(c1, prefix=dtask_prefix),
            node_loss_grace=timedelta(seconds=60),
            registry=registries["node-1"],
        )
        s2 = farm.new(
            "node-2",
            {NS: p2},
            manager=dt.Manager(c2, prefix=dtask_prefix),
            node_loss_grace=timedelta(seconds=60),
            registry=registries["node-2"],
        )
        both = mgr.add_task(NS, "both")
        assert both.nodes == {"node-1", "node-2"}
        only2 = mgr.add_task(NS, "only-2", nodes=["node-2"])
        wait_until(
            lambda: (
                p1.running() == {both.descriptor}
                and p2.running() == {both.descriptor, only2.descriptor}
            ),
            timeout=10,
        )
        running = (s1.running(), s2.running())
        assert running == ({NS: {both.descriptor}}, {NS: {both.descriptor, only2.descriptor}})

        leader = etcd_cluster.wait_for_leader()
        down = [leader, (leader + 1) % 3]
        for i in down:
            etcd_cluster.kill(i)
        try:
            # ---- every Manager call: a transient EtcdError, in bounded time
            calls: dict[str, Callable[[], Any]] = {
                "add_task": lambda: mgr.add_task(NS, "new", nodes=["node-1"]),
                "add_task(nodes=None)": lambda: mgr.add_task(NS, "new"),
                "get_task": lambda: mgr.get_task(NS, "both"),
                "list_tasks": mgr.list_tasks,
                "cancel_task": lambda: mgr.cancel_task(NS, "only-2", only2.version),
                "record_node_completion": lambda: mgr.record_node_completion(
                    NS, "both", both.version, "node-2"
                ),
                "live_members": mgr.live_members,
            }
            for name, call in calls.items():
                error, elapsed = timed_etcd_error(call)
                print(f"{name}: EtcdError after {elapsed:.2f}s: {error}")
                assert error.transient, (name, error)
                assert elapsed < BOUND, f"{name} took {elapsed:.1f}s"

            # ---- a Scheduler cannot start, and leaves no thread behind
            before = scheduler_threads()
            error, elapsed = timed_etcd_error(
                farm.new("node-3", {NS: RecordingProvider()}, start=False).start
            )
            assert elapsed < 3 * BOUND and scheduler_threads() == before

            # ---- the outage lasts beyond the member TTL: both lease keepers noticed
            wait_until(
                lambda: all(
                    metric(r, "distributedtask_lease_losses_total") >= 1
                    for r in registries.values()
                ),
                timeout=20,
                message="both nodes lost their lease",
            )
            assert (s1.running(), s2.running()) == running
            assert p1.terminations() == p2.terminations() == []
            assert p1.running() == {both.descriptor}
            assert p2.running() == {both.descriptor, only2.descriptor}

            # ---- the recorder takes a completion without raising; it is queued
            p1.complete(both)
            retries = metric(
                registries["node-1"], "distributedtask_record_retries_total", operation="complete"
            )
            assert retries >= 1

            # the run is over on node-1 (it recorded it): its handle is released, node-2 keeps all
            wait_until(lambda: s1.running() == {}, timeout=10)
            assert p1.terminations() == [both.descriptor] and p2.terminations() == []
            assert s2.running() == running[1]
        finally:
            for i in down:
                etcd_cluster.restart(i)

        # ---- quorum is back: the same Schedulers go on
        wait_until(
            lambda: (
                (task := mgr.get_task(NS, "both")) is not None and task.finished_nodes == {"node-1"}
            ),
            timeout=30,
            ignore=(dt.EtcdError,),
            message="the completion recorded during the outage is delivered",
        )
        assert mgr.get_task(NS, "both").status is dt.TaskStatus.STARTED  # type: ignore[union-attr]
        wait_until(
            lambda: [m.node_id for m in mgr.live_members()] == ["node-1", "node-2"],
            timeout=20,
            ignore=(dt.EtcdError,),
            message="both nodes are members again",
        )
        after = mgr.add_task(NS, "after")
        assert after.nodes == {"node-1", "node-2"}
        wait_until(
            lambda: after.descriptor in p1.running() and after.descriptor in p2.running(),
            timeout=20,
            message="a task added after the outage starts on both nodes",
        )
        mgr.cancel_task(NS, "only-2", only2.version)
        wait_until(lambda: p2.terminations() == [only2.descriptor], timeout=20)
        p2.complete(both)
        p1.complete(after)
        p2.complete(after)
        for task in (both, after):
            done = mgr.wait_for_task(NS, task.id, task.version, timeout=20)
            assert done.status is dt.TaskStatus.FINISHED
            assert done.finished_nodes == {"node-1", "node-2"}
        wait_until(lambda: s1.running() == s2.running() == {}, timeout=20)
        # one start per run: nothing was restarted, the recorded run was not started again
        assert p1.starts() == [both.descriptor, after.descriptor]
        assert p2.starts() == [both.descriptor, only2.descriptor, after.descriptor]
        # a handle is released only once its run ended (recorded here, or cancelled)
        assert p1.terminations() == [both.descriptor, after.descriptor]
        assert p2.terminations() == [only2.descriptor, both.descriptor, after.descriptor]
