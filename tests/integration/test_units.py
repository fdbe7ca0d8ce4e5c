"""Units through the Manager, on a real etcd: every rule of API.md "Units"."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

import distributedtask as dt
from distributedtask import TaskStatus, UnitSpec, UnitStatus

NODES = ["a", "b", "c"]


def add(manager: dt.Manager, units: object, **kwargs: object) -> dt.Task:
    nodes = kwargs.pop("nodes", NODES)
    return manager.add_task("ns", "t", b"p", nodes=nodes, units=units, **kwargs)  # type: ignore[arg-type]


def test_a_unit_task_finishes_when_its_last_unit_completes(manager: dt.Manager) -> None:
    task = add(manager, ["u1", "u2", UnitSpec("u3", group="g")])
    assert task.units == (UnitSpec("u1"), UnitSpec("u2"), UnitSpec("u3", group="g"))
    assert task.status is TaskStatus.STARTED
    seen = []
    for node in ("a", "b", "c"):
        unit = manager.claim_unit("ns", "t", task.version, node)
        assert unit is not None and unit.status is UnitStatus.IN_PROGRESS and unit.node == node
        seen.append(unit)
    assert [u.id for u in seen] == ["u1", "u2", "u3"]
    assert manager.claim_unit("ns", "t", task.version, "a") is None
    units = manager.get_units("ns", "t", task.version)
    assert {u.status for u in units.values()} == {UnitStatus.IN_PROGRESS}
    after = manager.record_unit_completion("ns", "t", task.version, "u1", "a")
    assert after.status is TaskStatus.STARTED
    manager.record_unit_completion("ns", "t", task.version, "u2", "b")
    done = manager.record_unit_completion("ns", "t", task.version, "u3", "c")
    assert done.status is TaskStatus.FINISHED
    assert done.finished_nodes == frozenset()
    again = manager.record_unit_completion("ns", "t", task.version, "u3", "c")
    assert again.status is TaskStatus.FINISHED
    stored = manager.get_task("ns", "t")
    assert stored is not None and stored.status is TaskStatus.FINISHED
    assert stored.units == task.units
    assert {u.status for u in manager.get_units("ns", "t", task.version).values()} == {
        UnitStatus.COMPLETED
    }


def test_only_the_claimant_records_a_unit(manager: dt.Manager) -> None:
    task = add(manager, ["u1", "u2"])
    unit = manager.claim_unit("ns", "t", task.version, "a")
    assert unit is not None
    with pytest.raises(dt.UnitClaimError) as info:
        manager.record_unit_completion("ns", "t", task.version, unit.id, "b")
    assert info.value.holder == "a"
    with pytest.raises(dt.UnitClaimError):
        manager.record_unit_completion("ns", "t", task.version, "u2", "a")  # not claimed
    with pytest.raises(dt.InvalidTaskError):
        manager.claim_unit("ns", "t", task.version, "stranger")
    with pytest.raises(dt.InvalidTaskError):
        manager.record_node_completion("ns", "t", task.version, "a")


def test_affinity_is_respected(manager: dt.Manager) -> None:
    task = add(manager, [UnitSpec("x", node="b"), UnitSpec("y", node="b"), "z"])
    first = manager.claim_unit("ns", "t", task.version, "a")
    assert first is not None and first.id == "z"
    assert manager.claim_unit("ns", "t", task.version, "a") is None
    got = [manager.claim_unit("ns", "t", task.version, "b") for _ in range(3)]
    assert [u.id if u else None for u in got] == ["x", "y", None]


def test_bad_declarations_write_nothing(manager: dt.Manager) -> None:
    for bad in ([], ["a", "a"], [UnitSpec("x", node="zz")], "abc", [3]):
        with pytest.raises(dt.InvalidTaskError):
            add(manager, bad)
    assert manager.get_task("ns", "t") is None
    with pytest.raises(dt.InvalidTaskError):
        UnitSpec("bad\x00")
    with pytest.raises(dt.InvalidTaskError):
        UnitSpec("")


def test_retry_then_the_last_attempt_fails_the_task(manager: dt.Manager) -> None:
    policy = dt.RunPolicy(max_attempts=2, retry_backoff=timedelta(0))
    task = add(manager, ["u1", "u2"], policy=policy)
    unit = manager.claim_unit("ns", "t", task.version, "a")
    assert unit is not None and unit.id == "u1"
    after = manager.record_unit_failure("ns", "t", task.version, "u1", "a", "boom")
    assert after.status is TaskStatus.STARTED
    units = manager.get_units("ns", "t", task.version)
    assert units["u1"].status is UnitStatus.PENDING
    assert units["u1"].attempts == 1 and units["u1"].error == "boom"
    again = manager.claim_unit("ns", "t", task.version, "b")  # the pool first, any node
    assert again is not None and again.id == "u1" and again.attempts == 1
    failed = manager.record_unit_failure("ns", "t", task.version, "u1", "b", "boom twice")
    assert failed.status is TaskStatus.FAILED
    assert failed.error == "boom twice" and failed.failed_node == "b" and failed.failed_unit == "u1"
    stored = manager.get_task("ns", "t")
    assert stored is not None and stored.failed_unit == "u1"
    assert manager.get_units("ns", "t", task.version)["u1"].status is UnitStatus.FAILED


def test_sixteen_claimants_of_one_unit_one_winner(manager: dt.Manager) -> None:
    nodes = [f"n{i}" for i in range(16)]
    task = add(manager, ["only"], nodes=nodes)
    barrier = threading.Barrier(16)
    got: list[dt.Unit | None] = []
    lock = threading.Lock()

    def claim(node: str) -> None:
        barrier.wait()
        unit = manager.claim_unit("ns", "t", task.version, node)
        with lock:
            got.append(unit)

    threads = [threading.Thread(target=claim, args=(n,)) for n in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [u for u in got if u is not None]
    assert len(winners) == 1 and len(got) == 16


def test_unit_progress_and_json(manager: dt.Manager) -> None:
    task = add(manager, [UnitSpec("u1", group="g", node="a")])
    unit = manager.claim_unit("ns", "t", task.version, "a")
    assert unit is not None
    manager.record_unit_progress("ns", "t", task.version, "u1", "a", 0.5, "half")
    progress = manager.get_units("ns", "t", task.version)["u1"].progress
    assert progress is not None and progress.fraction == 0.5 and progress.message == "half"
    data = dt.model.task_to_dict(task)
    assert data["units"] == [{"id": "u1", "group": "g", "node": "a"}]
    assert dt.model.task_from_dict(data) == task
