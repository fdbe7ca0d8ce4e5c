"""Unit tests of the Scheduler's pure parts (no etcd): the timer heap on an injected clock, the
cluster view fed by watch batches, and the node-loss bookkeeping of a decider."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from distributedtask.etcd import txn as t
from distributedtask.etcd.watch import Changes, Snapshot, SnapshotReason, WatchEvent
from distributedtask.keys import Keys, bucket_of
from distributedtask.model import TaskStatus
from distributedtask.records import MemberRecord, NodeList, OutcomeRecord, TaskRecord
from distributedtask.scheduler.membership import NodeLoss
from distributedtask.scheduler.timers import TimerKind, Timers
from distributedtask.scheduler.view import ClusterView

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
KEYS = Keys("/dt")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- timers ---------------------------------------------------------------------------------


def test_timers_fire_in_order_on_the_injected_clock() -> None:
    clock = Clock()
    timers = Timers(clock)
    assert timers.next_delay() is None and timers.pop_due() == []
    assert timers.add(5.0, TimerKind.TTL, task_id=("ns", "a"), version=7)  # the earliest
    assert timers.add(1.0, TimerKind.RETRY, task_id=("ns", "b"))  # earlier still
    assert not timers.add(3.0, TimerKind.NODE_LOSS, node="n1")
    assert timers.next_delay() == 1.0
    assert timers.pop_due() == []
    clock.now += 3.0
    due = timers.pop_due()
    assert [timer.kind for timer in due] == [TimerKind.RETRY, TimerKind.NODE_LOSS]
    assert due[1].node == "n1"
    assert timers.next_delay() == 2.0
    clock.now += 10.0
    (ttl,) = timers.pop_due()
    assert ttl.kind is TimerKind.TTL and ttl.run == ("ns", "a", 7)
    assert len(timers) == 0


def test_timers_due_at_the_same_moment_keep_their_order_and_a_negative_delay_is_now() -> None:
    clock = Clock()
    timers = Timers(clock)
    for kind in (TimerKind.PROGRESS, TimerKind.RECORD, TimerKind.RESYNC):
        timers.add(2.0, kind)
    timers.add(-5.0, TimerKind.LOCAL_TASKS)
    assert timers.next_delay() == 0.0
    assert [timer.kind for timer in timers.pop_due()] == [TimerKind.LOCAL_TASKS]
    clock.now += 2.0
    kinds = [timer.kind for timer in timers.pop_due()]
    assert kinds == [TimerKind.PROGRESS, TimerKind.RECORD, TimerKind.RESYNC]


# ---- the cluster view -----------------------------------------------------------------------


def kv(key: bytes, value: bytes, revision: int) -> t.KeyValue:
    return t.KeyValue(key, value, revision, revision, 1, 0)


def record(nodes: int = 2) -> bytes:
    return TaskRecord(b"payload", T0, nodes, "tok").encode()


def assignment(*nodes: str) -> bytes:
    return NodeList(frozenset(nodes)).encode()


def member(node: str) -> bytes:
    return MemberRecord(node, frozenset({"ns"}), T0).encode()


def snapshot(revision: int, *kvs: t.KeyValue) -> Snapshot:
    return Snapshot(revision, list(kvs), SnapshotReason.INITIAL)


def changes(*events: tuple[str, t.KeyValue]) -> Changes:
    parsed = [WatchEvent(kind, value) for kind, value in events]  # type: ignore[arg-type]
    return Changes(parsed[-1].kv.mod_revision, parsed)


def view_with_skips() -> tuple[ClusterView, list[bytes]]:
    skipped: list[bytes] = []
    return ClusterView(KEYS, lambda key, exc: skipped.append(key)), skipped


def test_a_run_is_assigned_here_only_with_the_assignment_of_its_own_add() -> None:
    view, skipped = view_with_skips()
    bucket = bucket_of("n1")
    touched = view.apply_cluster(snapshot(10, kv(KEYS.task("ns", "a"), record(), 9)))
    assert touched == {("ns", "a")}
    run = view.run(("ns", "a"))
    assert run is not None and run.version == 9 and run.assigned == frozenset()
    # the assignment arrives on the other watch: now it is assigned
    view.apply_bucket(snapshot(10, kv(KEYS.assign(bucket, "ns", "a"), assignment("n1"), 9)))
    run = view.run(("ns", "a"))
    assert run is not None and run.assigned == {"n1"} and run.status is TaskStatus.STARTED
    assert run.task().nodes == {"n1"} and run.task().payload == b"payload"
    # a newer run of the id whose assignment has not arrived yet is not assigned here
    view.apply_cluster(changes(("put", kv(KEYS.task("ns", "a"), record(), 12))))
    assert view.run(("ns", "a")).assigned == frozenset()  # type: ignore[union-attr]
    assert view.born == {("ns", "a"): 12}
    assert skipped == []


def test_outcomes_members_deletes_and_unreadable_values() -> None:
    view, skipped = view_with_skips()
    view.apply_cluster(
        snapshot(
            20,
            kv(KEYS.task("ns", "a"), record(), 5),
            kv(KEYS.outcome("ns", "a"), OutcomeRecord(TaskStatus.CANCELLED, T0, "x").encode(), 6),
            kv(KEYS.task("ns", "bad"), b"{not a record", 7),
            kv(KEYS.member("n2"), member("n2"), 8),
            kv(KEYS.member("n1"), member("n1"), 8),
            kv(KEYS.member("liar"), member("n3"), 8),
        )
    )
    assert view.run(("ns", "a")).status is TaskStatus.CANCELLED  # type: ignore[union-attr]
    assert view.run(("ns", "bad")) is None
    assert set(view.members) == {"n1", "n2"} and view.deciders(1) == ["n1"]
    assert skipped == [KEYS.task("ns", "bad"), KEYS.member("liar")]
    assert [run.task_id for run in view.started()] == []
    touched = view.apply_cluster(
        changes(
            ("delete", kv(KEYS.task("ns", "a"), b"", 30)),
            ("delete", kv(KEYS.member("n1"), b"", 30)),
        )
    )
    assert touched == {("ns", "a")} and view.run(("ns", "a")) is None
    assert view.deciders() == ["n2"]
    # a snapshot replaces what its watch had told, and touches what it forgot
    touched = view.apply_cluster(snapshot(40, kv(KEYS.task("ns", "c"), record(), 35)))
    assert touched == {("ns", "a"), ("ns", "c")} and view.members == {}


# ---- node loss ------------------------------------------------------------------------------


def test_a_decider_waits_for_the_grace_then_names_the_runs_of_the_lost_node() -> None:
    view, _ = view_with_skips()
    view.apply_cluster(
        snapshot(
            10,
            kv(KEYS.task("ns", "a"), record(), 5),
            kv(KEYS.task("ns", "b"), record(1), 6),
            kv(KEYS.member("n1"), member("n1"), 7),
        )
    )
    loss = NodeLoss(grace=30.0)
    loss.note_all(view)
    assert loss.started and sorted(loss.unknown) == [("ns", "a", 5), ("ns", "b", 6)]
    loss.store_lists({("ns", "a", 5): frozenset({"n1", "n2"})}, [("ns", "a", 5), ("ns", "b", 6)])
    assert loss.unknown == set()  # "b" is gone: an empty list, not read again
    assert loss.awaited == {"n1": 1, "n2": 1}
    assert loss.update(view, now=100.0) == ["n2"]  # awaited, no membership
    assert loss.update(view, now=110.0) == []  # already counting (and nothing changed)
    assert loss.due("n2", now=120.0) == pytest.approx(10.0)
    assert loss.due("n2", now=131.0) == pytest.approx(-1.0)
    assert loss.victims("n2") == [("ns", "a", 5)]
    # the node comes back: its clock stops
    view.apply_cluster(changes(("put", kv(KEYS.member("n2"), member("n2"), 20))))
    assert loss.update(view, now=132.0) == [] and loss.due("n2", now=132.0) is None
    # the run ends: nobody is awaited any more
    finished = OutcomeRecord(TaskStatus.FINISHED, T0, "x").encode()
    touched = view.apply_cluster(changes(("put", kv(KEYS.outcome("ns", "a"), finished, 21))))
    loss.note(view, touched)
    assert loss.node_lists == {("ns", "b", 6): frozenset()}  # "a" ended, "b" names nobody
    assert loss.awaited == {} and loss.victims("n2") == []
    # a node that stops being awaited while missing loses its grace; awaited again, it starts
    # a fresh one
    view.apply_cluster(changes(("delete", kv(KEYS.member("n2"), b"", 22))))
    touched = view.apply_cluster(changes(("put", kv(KEYS.task("ns", "d"), record(), 23))))
    loss.note(view, touched)
    loss.store_lists({("ns", "d", 23): frozenset({"n2"})}, [("ns", "d", 23)])
    assert loss.update(view, now=140.0) == ["n2"]
    touched = view.apply_cluster(changes(("delete", kv(KEYS.task("ns", "d"), b"", 24))))
    loss.note(view, touched)
    assert loss.update(view, now=150.0) == [] and loss.due("n2", now=150.0) is None
    touched = view.apply_cluster(changes(("put", kv(KEYS.task("ns", "e"), record(), 25))))
    loss.note(view, touched)
    loss.store_lists({("ns", "e", 25): frozenset({"n2"})}, [("ns", "e", 25)])
    assert loss.update(view, now=160.0) == ["n2"] and loss.due("n2", now=160.0) == 30.0
    # a new run of an id: a list to read; its replacement forgets the old one
    touched = view.apply_cluster(changes(("put", kv(KEYS.task("ns", "c"), record(), 30))))
    loss.note(view, touched)
    assert loss.unknown == {("ns", "c", 30)}


def test_without_a_grace_no_node_is_ever_lost() -> None:
    view, _ = view_with_skips()
    view.apply_cluster(snapshot(10, kv(KEYS.task("ns", "a"), record(), 5)))
    loss = NodeLoss(grace=None)
    loss.note_all(view)
    loss.store_lists({("ns", "a", 5): frozenset({"gone"})}, [("ns", "a", 5)])
    assert loss.update(view, now=0.0) == [] and loss.due("gone", now=1e9) is None
