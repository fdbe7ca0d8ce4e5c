"""Unit tasks on Schedulers with ThreadProviders, on a real etcd: claiming, group callbacks,
retries on an injected clock, pause and resume, node loss (units given back, affinity)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from tests.support import Monotonic, Schedulers, metric

import distributedtask as dt
from distributedtask import TaskStatus, UnitSpec, UnitStatus
from distributedtask.scheduler.timers import TimerKind
from distributedtask.testing.etcd import wait_until
from distributedtask.testing.proxy import TcpProxy

NS = "units"

pytestmark = pytest.mark.usefixtures("no_scheduler_thread_left")


class Units:
    """What unit functions and group callbacks did, by node (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ran: list[tuple[str, str, int]] = []  # node, unit, attempt
        self.groups: list[tuple[str, str]] = []  # node, group
        self.providers: list[dt.ThreadProvider] = []

    def provider(
        self,
        node: str,
        work: Callable[[dt.Task, dt.TaskContext], None] | None = None,
        *,
        concurrency: int = 2,
        on_group: Callable[[dt.Task, str], None] | None = None,
    ) -> dt.ThreadProvider:
        def run(task: dt.Task, ctx: dt.TaskContext) -> None:
            assert ctx.unit is not None
            with self.lock:
                self.ran.append((node, ctx.unit.id, ctx.attempt))
            if work is not None:
                work(task, ctx)

        def group_done(task: dt.Task, group: str) -> None:
            if on_group is not None:
                on_group(task, group)
            with self.lock:
                self.groups.append((node, group))

        provider = dt.ThreadProvider(
            run, unit_concurrency=concurrency, on_group_completed=group_done
        )
        self.providers.append(provider)
        return provider

    def units_ran(self) -> list[str]:
        with self.lock:
            return [unit for _, unit, _ in self.ran]

    def groups_called(self) -> list[tuple[str, str]]:
        with self.lock:
            return sorted(self.groups)

    def join(self) -> None:
        for provider in self.providers:
            assert provider.join(10)


@pytest.fixture
def mgr(etcd_client: dt.EtcdClient, dtask_prefix: str) -> dt.Manager:
    return dt.Manager(etcd_client, prefix=dtask_prefix, completed_task_ttl=timedelta(hours=1))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def schedulers(mgr: dt.Manager, registry: CollectorRegistry) -> Iterator[Schedulers]:
    with Schedulers(mgr, registry) as made:
        yield made


@pytest.fixture
def units() -> Iterator[Units]:
    made = Units()
    yield made
    made.join()


def status(mgr: dt.Manager, task_id: str) -> TaskStatus | None:
    task = mgr.get_task(NS, task_id)
    return None if task is None else task.status


def test_every_unit_runs_once_and_each_node_calls_each_group_hook_once(
    schedulers: Schedulers, mgr: dt.Manager, units: Units, registry: CollectorRegistry
) -> None:
    nodes = ["n1", "n2", "n3"]
    for node in nodes:
        schedulers.new(node, {NS: units.provider(node)})
    declared = [UnitSpec(f"u{i:03d}", group=f"g{i % 3}") for i in range(90)]
    task = mgr.add_task(NS, "t", nodes=nodes, units=declared)
    final = mgr.wait_for_task(NS, "t", task.version, timeout=30)
    assert final.status is TaskStatus.FINISHED and final.finished_nodes == frozenset()
    assert sorted(units.units_ran()) == sorted(u.id for u in declared)
    every = sorted((n, f"g{i}") for n in nodes for i in range(3))
    wait_until(lambda: units.groups_called() == every, timeout=10, message="group hooks")
    assert metric(registry, "distributedtask_units_completed_total", namespace=NS) == 90
    got = mgr.get_units(NS, "t", task.version)
    assert {u.status for u in got.values()} == {UnitStatus.COMPLETED}
    assert {u.node for u in got.values()} <= set(nodes)


def test_a_node_that_ran_none_of_a_groups_units_still_calls_its_hook(
    schedulers: Schedulers, mgr: dt.Manager, units: Units
) -> None:
    for node in ("n1", "n2"):
        schedulers.new(node, {NS: units.provider(node)})
    declared = [UnitSpec(f"u{i}", group="only-n1", node="n1") for i in range(5)]
    task = mgr.add_task(NS, "t", nodes=["n1", "n2"], units=declared)
    assert mgr.wait_for_task(NS, "t", task.version, timeout=30).status is TaskStatus.FINISHED
    with units.lock:
        assert {node for node, _, _ in units.ran} == {"n1"}
    wait_until(
        lambda: units.groups_called() == [("n1", "only-n1"), ("n2", "only-n1")],
        timeout=10,
        message="both nodes' hooks",
    )


def test_a_group_hook_that_never_returned_is_called_again_after_a_restart(
    schedulers: Schedulers, mgr: dt.Manager, units: Units
) -> None:
    failures = Counter[str]()

    def refuse(task: dt.Task, group: str) -> None:
        with units.lock:
            failures[group] += 1
        raise RuntimeError("not now")

    schedulers.new("n1", {NS: units.provider("n1")})
    flaky = schedulers.new("n2", {NS: units.provider("n2", on_group=refuse)})
    task = mgr.add_task(NS, "t", nodes=["n1", "n2"], units=[UnitSpec("a", group="g")])
    assert mgr.wait_for_task(NS, "t", task.version, timeout=30).status is TaskStatus.FINISHED
    wait_until(lambda: ("n1", "g") in units.groups_called(), timeout=10)
    wait_until(lambda: failures["g"] >= 2, timeout=10, message="n2's hook retried")
    flaky.stop()
    assert ("n2", "g") not in units.groups_called()
    schedulers.new("n2", {NS: units.provider("n2")})
    wait_until(lambda: ("n2", "g") in units.groups_called(), timeout=10, message="called again")
    # n1 acknowledged its call: a restart of n1 does not call it again.
    schedulers.new("n1", {NS: units.provider("n1")})  # a second Scheduler for n1's id
    assert units.groups_called().count(("n1", "g")) == 1


def test_a_failed_unit_waits_for_its_backoff_on_the_injected_clock(
    schedulers: Schedulers, mgr: dt.Manager, units: Units
) -> None:
    clock = Monotonic()

    def fail_first(task: dt.Task, ctx: dt.TaskContext) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("flaky")

    scheduler = schedulers.new("n1", {NS: units.provider("n1", fail_first)}, clock=clock)
    policy = dt.RunPolicy(max_attempts=2, retry_backoff=timedelta(seconds=30))
    task = mgr.add_task(NS, "t", nodes=["n1"], units=["only"], policy=policy)

    def waiting_for_backoff() -> bool:
        return any(kind is TimerKind.UNIT_READY for kind, *_ in scheduler.pending_timers())

    wait_until(waiting_for_backoff, timeout=10, message="a UNIT_READY timer")
    unit = mgr.get_units(NS, "t", task.version)["only"]
    assert unit.status is UnitStatus.PENDING and unit.attempts == 1 and unit.error == "flaky"
    assert units.units_ran() == ["only"]  # not again before the backoff
    clock.advance(29)
    scheduler.check_timers()
    assert status(mgr, "t") is TaskStatus.STARTED and units.units_ran() == ["only"]
    clock.advance(2)
    scheduler.check_timers()
    assert mgr.wait_for_task(NS, "t", task.version, timeout=10).status is TaskStatus.FINISHED
    with units.lock:
        assert units.ran == [("n1", "only", 1), ("n1", "only", 2)]


def test_the_last_attempt_of_a_unit_fails_the_task(
    schedulers: Schedulers, mgr: dt.Manager, units: Units
) -> None:
    def always(task: dt.Task, ctx: dt.TaskContext) -> None:
        assert ctx.unit is not None
        if ctx.unit.id == "bad":
            raise RuntimeError(f"bad attempt {ctx.attempt}")

    for node in ("n1", "n2"):
        schedulers.new(node, {NS: units.provider(node, always)})
    policy = dt.RunPolicy(max_attempts=3, retry_backoff=timedelta(0))
    task = mgr.add_task(NS, "t", nodes=["n1", "n2"], units=["ok", "bad"], policy=policy)
    final = mgr.wait_for_task(NS, "t", task.version, timeout=30)
    assert final.status is TaskStatus.FAILED
    assert final.error == "bad attempt 3" and final.failed_unit == "bad"
    assert final.failed_node in {"n1", "n2"}
    assert units.units_ran().count("bad") == 3


def test_pause_stops_unit_work_and_resume_continues_it(
    schedulers: Schedulers, mgr: dt.Manager, units: Units
) -> None:
    gate = threading.Event()

    def held(task: dt.Task, ctx: dt.TaskContext) -> None:
        while not gate.is_set() and not ctx.cancelled.is_set():
            ctx.cancelled.wait(0.05)  # a long unit of work, cooperative with terminate

    schedulers.new("n1", {NS: units.provider("n1", held, concurrency=2)})
    task = mgr.add_task(NS, "t", nodes=["n1"], units=["a", "b", "c"])
    wait_until(lambda: len(units.units_ran()) == 2, timeout=10, message="two units running")
    mgr.pause_task(NS, "t", task.version)
    wait_until(lambda: units.providers[0].join(0), timeout=10, message="workers ended on pause")
    in_progress = [
        u.id
        for u in mgr.get_units(NS, "t", task.version).values()
        if u.status is UnitStatus.IN_PROGRESS
    ]
    assert sorted(in_progress) == ["a", "b"]  # held: they run again at resume
    gate.set()
    mgr.resume_task(NS, "t", task.version)
    assert mgr.wait_for_task(NS, "t", task.version, timeout=30).status is TaskStatus.FINISHED
    ran = Counter(units.units_ran())
    assert ran["a"] == 2 and ran["b"] == 2 and ran["c"] == 1


def test_a_lost_nodes_units_are_given_back_and_finished_by_others(
    schedulers: Schedulers,
    mgr: dt.Manager,
    units: Units,
    etcd_proxy: TcpProxy,
    dtask_prefix: str,
    registry: CollectorRegistry,
) -> None:
    lost_started = threading.Event()
    release = threading.Event()

    def stuck(task: dt.Task, ctx: dt.TaskContext) -> None:
        lost_started.set()
        release.wait(30)  # the lost node never finishes its units while cut off

    grace = timedelta(seconds=1)
    schedulers.new("n1", {NS: units.provider("n1", concurrency=1)}, node_loss_grace=grace)
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=2.0, watch_timeout=6.0) as proxied:
        lost_mgr = dt.Manager(proxied, prefix=dtask_prefix, completed_task_ttl=timedelta(hours=1))
        lost = schedulers.new(
            "n0",
            {NS: units.provider("n0", stuck, concurrency=2)},
            manager=lost_mgr,
            node_loss_grace=grace,
        )
        declared = [UnitSpec(f"u{i}") for i in range(6)]
        task = mgr.add_task(NS, "t", nodes=["n0", "n1"], units=declared)
        wait_until(lost_started.is_set, timeout=10)
        wait_until(
            lambda: (
                sum(
                    u.node == "n0" and u.status is UnitStatus.IN_PROGRESS
                    for u in mgr.get_units(NS, "t", task.version).values()
                )
                == 2
            ),
            timeout=10,
            message="n0 holds two units",
        )
        etcd_proxy.block()
        try:
            final = mgr.wait_for_task(NS, "t", task.version, timeout=30)
            assert final.status is TaskStatus.FINISHED
            got = mgr.get_units(NS, "t", task.version)
            assert {u.node for u in got.values()} == {"n1"}
            assert metric(registry, "distributedtask_units_reassigned_total", namespace=NS) == 2
        finally:
            release.set()
            etcd_proxy.unblock()
        lost.stop()


def test_a_unit_with_affinity_to_a_lost_node_fails_the_task(
    schedulers: Schedulers, mgr: dt.Manager, units: Units
) -> None:
    schedulers.new("n1", {NS: units.provider("n1")}, node_loss_grace=timedelta(seconds=1))
    declared = [UnitSpec("free"), UnitSpec("pinned", node="ghost")]
    task = mgr.add_task(NS, "t", nodes=["n1", "ghost"], units=declared)
    final = mgr.wait_for_task(NS, "t", task.version, timeout=30)
    assert final.status is TaskStatus.FAILED and final.failed_node == "ghost"
    assert final.error is not None and "pinned" in final.error
    assert units.units_ran() == ["free"]


def test_a_lost_node_with_only_completed_affinity_units_does_not_fail_the_task(
    schedulers: Schedulers, mgr: dt.Manager, units: Units
) -> None:
    grace = timedelta(seconds=1)
    schedulers.new("n1", {NS: units.provider("n1")}, node_loss_grace=grace)
    gone = schedulers.new("n2", {NS: units.provider("n2")}, node_loss_grace=grace)
    declared = [UnitSpec("mine", node="n2"), UnitSpec("later", node="n1")]
    task = mgr.add_task(NS, "t", nodes=["n1", "n2"], units=declared)
    wait_until(
        lambda: mgr.get_units(NS, "t", task.version)["mine"].status is UnitStatus.COMPLETED,
        timeout=10,
    )
    gone.stop()
    # A run on a node that never comes tells when a grace has surely passed since n2 left.
    marker = mgr.add_task(NS, "marker", nodes=["n1", "ghost"], units=[UnitSpec("x", node="ghost")])
    assert mgr.wait_for_task(NS, "marker", marker.version, timeout=30).status is TaskStatus.FAILED
    assert mgr.wait_for_task(NS, "t", task.version, timeout=30).status is TaskStatus.FINISHED


def test_a_node_that_stops_gives_its_units_back_at_once(
    schedulers: Schedulers, mgr: dt.Manager, units: Units, registry: CollectorRegistry
) -> None:
    gate = threading.Event()

    def held(task: dt.Task, ctx: dt.TaskContext) -> None:
        while not gate.is_set() and not ctx.cancelled.is_set():
            ctx.cancelled.wait(0.05)

    # No node-loss grace: only the stop itself can give the units back.
    first = schedulers.new(
        "n1", {NS: units.provider("n1", held, concurrency=2)}, node_loss_grace=None
    )
    task = mgr.add_task(NS, "t", nodes=["n1", "n2"], units=["a", "b", "c"])
    wait_until(lambda: len(units.units_ran()) == 2, timeout=10, message="two units running")
    first.stop()  # its handles are terminated, and the two units go back to the pool
    after = mgr.get_units(NS, "t", task.version)
    assert {u.id: (u.status, u.node, u.attempts) for u in after.values() if u.id != "c"} == {
        "a": (UnitStatus.PENDING, "n1", 0),
        "b": (UnitStatus.PENDING, "n1", 0),
    }
    assert metric(registry, "distributedtask_units_reassigned_total", namespace=NS) == 2
    gate.set()
    schedulers.new("n2", {NS: units.provider("n2")}, node_loss_grace=None)
    assert mgr.wait_for_task(NS, "t", task.version, timeout=30).status is TaskStatus.FINISHED
    assert Counter(units.units_ran()) == {"a": 2, "b": 2, "c": 1}
    assert {u.node for u in mgr.get_units(NS, "t", task.version).values()} == {"n2"}


def test_a_unit_handed_out_and_never_claimed_is_given_back(
    schedulers: Schedulers, mgr: dt.Manager, units: Units, registry: CollectorRegistry
) -> None:
    task = mgr.add_task(NS, "t", nodes=["n1", "crashed"], units=["a", "b", "c"])
    # "crashed" took the first ticket and died before claiming its unit.
    ticket = mgr.keys.unit_ticket(NS, "t")
    mgr.client.txn(success=[dt.etcd.txn.put(ticket, b""), dt.etcd.txn.get(ticket)])
    schedulers.new("n1", {NS: units.provider("n1")}, node_loss_grace=None)
    assert mgr.wait_for_task(NS, "t", task.version, timeout=30).status is TaskStatus.FINISHED
    assert sorted(units.units_ran()) == ["a", "b", "c"]
    assert metric(registry, "distributedtask_units_reassigned_total", namespace=NS) == 1


def test_cancel_and_deadline_end_unit_tasks_and_stop_their_units(
    schedulers: Schedulers, mgr: dt.Manager, units: Units
) -> None:
    def forever(task: dt.Task, ctx: dt.TaskContext) -> None:
        ctx.cancelled.wait(30)  # a unit that ends only when its run is terminated

    schedulers.new("n1", {NS: units.provider("n1", forever, concurrency=2)})
    cancelled = mgr.add_task(NS, "c", nodes=["n1"], units=["a", "b", "c"])
    wait_until(lambda: len(units.units_ran()) == 2, timeout=10, message="two units running")
    mgr.cancel_task(NS, "c", cancelled.version)
    wait_until(lambda: units.providers[0].join(0), timeout=10, message="units stopped")
    assert sorted(units.units_ran()) == ["a", "b"]

    policy = dt.RunPolicy(deadline=timedelta(seconds=1))
    bounded = mgr.add_task(NS, "d", nodes=["n1"], units=["x"], policy=policy)
    final = mgr.wait_for_task(NS, "d", bounded.version, timeout=30)
    assert final.status is TaskStatus.FAILED and final.error is not None
    assert final.error.startswith("deadline exceeded") and final.failed_unit is None
    wait_until(lambda: units.providers[0].join(0), timeout=10, message="units stopped")


def test_no_scheduler_receives_a_watch_event_per_unit(
    schedulers: Schedulers, mgr: dt.Manager, units: Units
) -> None:
    nodes = [f"n{i}" for i in range(5)]
    registries = {node: CollectorRegistry() for node in nodes}
    for node in nodes:
        schedulers.new(node, {NS: units.provider(node)}, registry=registries[node])

    def events(node: str) -> float:
        return metric(registries[node], "distributedtask_watch_events_total", range="cluster")

    before = {node: events(node) for node in nodes}
    declared = [UnitSpec(f"u{i:03d}", group=f"g{i % 2}") for i in range(200)]
    task = mgr.add_task(NS, "t", nodes=nodes, units=declared)
    assert mgr.wait_for_task(NS, "t", task.version, timeout=60).status is TaskStatus.FINISHED
    every = sorted((n, f"g{i}") for n in nodes for i in range(2))
    wait_until(lambda: units.groups_called() == every, timeout=10, message="group hooks")
    # Each Scheduler: the record, two group marks and the outcome; 400 unit transitions: none.
    assert {node: events(node) - before[node] for node in nodes} == {node: 4 for node in nodes}
