"""Storage layout 2 at scale, on a real etcd: a task of 1,000 nodes through the Manager, and
150 live Schedulers, each receiving only what concerns it.

What is asserted are counts — round trips through a counting proxy, watch events the
Schedulers received (``distributedtask_watch_events_total``) — never timings.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from tests.support import RecordingProvider, Schedulers, metric

import distributedtask as dt
from distributedtask.testing import wait_until
from distributedtask.testing.proxy import TcpProxy

NS = "ns"
EVENTS = "distributedtask_watch_events_total"


def test_a_task_of_1000_nodes_finishes_once_with_n_plus_one_round_trips(
    proxied_manager: dt.Manager, etcd_proxy: TcpProxy
) -> None:
    nodes = [f"node-{i:04d}" for i in range(1000)]
    proxied_manager.add_task(NS, "warm-up", nodes=["w"])  # the layout marker is written
    task = proxied_manager.add_task(NS, "wide", b"payload", nodes=nodes)
    assert task.nodes == frozenset(nodes) and task.status is dt.TaskStatus.STARTED
    etcd_proxy.reset_counts()
    finished: list[dt.Task] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def complete(part: list[str]) -> None:
        for node in part:
            try:
                result = proxied_manager.record_node_completion(NS, "wide", task.version, node)
            except BaseException as exc:  # reported below
                errors.append(exc)
                return
            if result.status is dt.TaskStatus.FINISHED:
                with lock:
                    finished.append(result)

    threads = [threading.Thread(target=complete, args=(nodes[i::16],)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # N completions and one finishing write (the Manager knows the run from its add).
    assert etcd_proxy.requests == len(nodes) + 1
    # Only the completion that saw every node wrote FINISHED; a racing one may also return
    # the FINISHED run (its own completion counted), never a second outcome.
    assert 1 <= len(finished) <= 16 and len({f.finished_at for f in finished}) == 1
    final = proxied_manager.get_task(NS, "wide")
    assert final is not None and final.status is dt.TaskStatus.FINISHED
    assert final.finished_nodes == frozenset(nodes)
    assert final.payload == b"payload"
    assert [t.id for t in proxied_manager.list_tasks()[NS]] == ["warm-up", "wide"]


@pytest.fixture
def farm(
    etcd_client: dt.EtcdClient, dtask_prefix: str
) -> Iterator[tuple[Schedulers, CollectorRegistry]]:
    registry = CollectorRegistry()
    manager = dt.Manager(etcd_client, prefix=dtask_prefix)
    with Schedulers(manager, registry) as schedulers:
        yield schedulers, registry


def _events(registry: CollectorRegistry) -> tuple[float, float]:
    return metric(registry, EVENTS, range="cluster"), metric(registry, EVENTS, range="assign")


def test_150_live_schedulers_each_receive_what_concerns_them(
    farm: tuple[Schedulers, CollectorRegistry], etcd_client: dt.EtcdClient, dtask_prefix: str
) -> None:
    schedulers, registry = farm
    k = 150
    names = [f"node-{i:03d}" for i in range(k)]
    providers = {name: RecordingProvider() for name in names}
    for name in names:
        # A long lease: the test counts events, and only joins and leaves touch members.
        schedulers.new(name, {NS: providers[name]}, member_ttl=timedelta(seconds=30))
    manager = dt.Manager(etcd_client, prefix=dtask_prefix)
    wait_until(
        lambda: all(len(s.members()) == k for s in schedulers.made),
        timeout=30,
        message="every Scheduler sees every member",
    )
    cluster0, assign0 = _events(registry)

    # One add of a task on every live node: each Scheduler receives its record and one
    # assignment (its bucket's): 2K events in all, not K * K.
    task = manager.add_task(NS, "all", nodes=None)
    assert task.nodes == frozenset(names)
    wait_until(
        lambda: all(p.starts() == [task.descriptor] for p in providers.values()),
        timeout=30,
        message="all 150 started the task",
    )
    wait_until(lambda: _events(registry) == (cluster0 + k, assign0 + k), timeout=10)

    # Progress reaches no Scheduler. A later add of a one-node task is the barrier: once every
    # Scheduler has its record, anything written before it would have arrived too.
    for i in range(20):
        manager.record_progress(NS, "all", task.version, names[i], i / 20, "working")
    # (a run of few nodes carries them in its record: one event per Scheduler, no assignment)
    marker = manager.add_task(NS, "marker", nodes=[names[0]])
    expected = (cluster0 + 2 * k, assign0 + k)
    wait_until(lambda: _events(registry) == expected, timeout=10)
    assert providers[names[0]].starts() == [task.descriptor, marker.descriptor]

    # Every node completes: the completions reach no Scheduler; the outcome reaches each once.
    threads = [threading.Thread(target=providers[name].complete, args=(task,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = manager.get_task(NS, "all")
    assert final is not None and final.status is dt.TaskStatus.FINISHED
    assert final.finished_nodes == frozenset(names)
    expected = (expected[0] + k, expected[1])
    wait_until(lambda: _events(registry) == expected, timeout=10)
    assert _events(registry) == expected
