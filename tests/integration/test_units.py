"""Units through the Manager, on a real etcd: every rule of API.md "Units"."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

import distributedtask as dt
from distributedtask import TaskStatus, UnitSpec, UnitStatus
from distributedtask.testing.proxy import TcpProxy

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
    fresh = manager.claim_unit("ns", "t", task.version, "b")  # tickets first, then the pool
    assert fresh is not None and fresh.id == "u2"
    again = manager.claim_unit("ns", "t", task.version, "b")  # any node may take it
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


# ---- scale: 8 nodes, 1,000 units, round trips counted -----------------------------------------

SCALE_NODES = [f"node-{i}" for i in range(8)]
SCALE_UNITS = 1000


def _run_nodes(
    client: dt.EtcdClient, prefix: str, task: dt.Task, *, pool_from_view: bool
) -> tuple[dict[str, list[str]], list[dt.Task], list[BaseException]]:
    """Each node a thread with its own Manager over ``client`` (as separate processes would
    have), looping claim / complete until nothing is left. ``pool_from_view``: claim as a
    Scheduler does, with the pool it knows from its watch (here: empty), instead of
    ``Manager.claim_unit``, which reads the pool first."""
    completed: dict[str, list[str]] = {node: [] for node in SCALE_NODES}
    finished: list[dt.Task] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(SCALE_NODES))

    def node(name: str) -> None:
        manager = dt.Manager(client, prefix=prefix)
        barrier.wait()
        try:
            while True:
                try:
                    claim = None
                    if pool_from_view:
                        known = manager.known_run("ns", "t", task.version, name)
                        claim = manager.units.claim("ns", "t", task.version, name, known, pool=[])
                        unit_id = None if claim is None else claim.spec.id
                    else:
                        unit = manager.claim_unit("ns", "t", task.version, name)
                        unit_id = None if unit is None else unit.id
                except dt.TaskNotRunningError:
                    return  # the last unit completed meanwhile
                if unit_id is None:
                    return
                if claim is not None:  # as a Scheduler's unit desk: with the next ticket
                    after = manager.units.complete(
                        "ns", "t", task.version, unit_id, name, known, claim, take_ahead=True
                    )
                else:
                    after = manager.record_unit_completion("ns", "t", task.version, unit_id, name)
                with lock:
                    completed[name].append(unit_id)
                    if after.status is TaskStatus.FINISHED:
                        finished.append(after)
        except BaseException as exc:  # reported by the test
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=node, args=(name,)) for name in SCALE_NODES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return completed, finished, errors


@pytest.mark.parametrize("pool_from_view", [False, True], ids=["claim_unit", "scheduler-path"])
def test_eight_nodes_complete_1000_units_each_once_in_at_most_three_round_trips_a_unit(
    proxied_client: dt.EtcdClient,
    etcd_proxy: TcpProxy,
    dtask_prefix: str,
    pool_from_view: bool,
) -> None:
    """Every unit is completed exactly once, by the node that claimed it; FINISHED is written
    once (one completion returns it); and the round trips are counted at the proxy.

    Through the Manager: a ticket (whose transaction also reads the pool), a claim and a
    completion: 3 round trips a unit. As a Scheduler's unit desk (which knows the pool from its
    watch): a claim and a completion that takes the node's next ticket in its own transaction:
    2 round trips a unit. Besides, each node reads the run once (its
    Manager knows nothing of it), takes its first ticket, and one past the end of the list (or
    meets the FINISHED run) before it stops: at most 4 per node, whatever the number of
    units."""
    manager = dt.Manager(proxied_client, prefix=dtask_prefix)
    units = [UnitSpec(f"shard-{i:04d}", group=f"coll-{i % 10}") for i in range(SCALE_UNITS)]
    task = manager.add_task("ns", "t", b"p", nodes=SCALE_NODES, units=units)
    etcd_proxy.reset_counts()

    completed, finished, errors = _run_nodes(
        proxied_client, dtask_prefix, task, pool_from_view=pool_from_view
    )
    trips = etcd_proxy.requests
    assert errors == []
    every = [unit for done in completed.values() for unit in done]
    assert len(every) == SCALE_UNITS and set(every) == {u.id for u in units}  # each once
    assert sum(1 for done in completed.values() if done) >= 2  # the work was shared
    assert len(finished) == 1 and finished[0].finished_nodes == frozenset()

    per_unit = 2 if pool_from_view else 3
    assert per_unit * SCALE_UNITS <= trips <= per_unit * SCALE_UNITS + 4 * len(SCALE_NODES)

    final = manager.get_task("ns", "t")
    assert final is not None and final.status is TaskStatus.FINISHED
    assert final.finished_at == finished[0].finished_at
    stored = manager.get_units("ns", "t", task.version)
    assert list(stored) == [u.id for u in units]
    assert {u.status for u in stored.values()} == {UnitStatus.COMPLETED}
    by_node = {u.id: u.node for u in stored.values()}
    assert by_node == {unit: node for node, done in completed.items() for unit in done}
    groups = manager.client.txn(
        success=[dt.etcd.txn.get_prefix(manager.keys.task_groups("ns", "t"), keys_only=True)]
    )
    assert len(groups.range(0).kvs) == 10  # every group marked, once each


# ---- lost hand-outs ------------------------------------------------------------------------------


def test_a_ticket_taken_and_never_claimed_is_found_then_given_to_the_pool(
    proxied_manager: dt.Manager, etcd_proxy: TcpProxy
) -> None:
    manager = proxied_manager
    task = add(manager, ["a", "b", UnitSpec("x", node="b"), "c"], nodes=["a", "b"])
    assert manager.units.check_handouts("ns", "t", task.version) == (set(), 0)
    # A node took a ticket of each list and died before claiming what they named.
    free, own = manager.keys.unit_ticket("ns", "t"), manager.keys.unit_node_ticket("ns", "t", "b")
    put, get = dt.etcd.txn.put, dt.etcd.txn.get
    manager.client.txn(success=[put(free, b""), get(free), put(own, b""), get(own)])
    etcd_proxy.reset_counts()
    assert manager.units.check_handouts("ns", "t", task.version) == ({"a", "x"}, 0)
    assert etcd_proxy.requests == 2  # the small read, then the claim keys
    units = manager.get_units("ns", "t", task.version)
    assert (units["a"].status, units["a"].node) == (UnitStatus.PENDING, None)

    # Meanwhile node "a" claims: the next ticket, "b". Nothing claimed is ever missing.
    first = manager.claim_unit("ns", "t", task.version, "a")
    assert first is not None and first.id == "b"
    # The second look still finds them: given to the pool (not an attempt).
    assert manager.units.check_handouts("ns", "t", task.version, give_back={"a", "x"}) == (
        set(),
        2,
    )
    assert {item.unit_id for item in manager.units.read_pool("ns", "t", task.version)} == {
        "a",
        "x",
    }
    etcd_proxy.reset_counts()
    assert manager.units.check_handouts("ns", "t", task.version) == (set(), 0)
    assert etcd_proxy.requests == 1  # nothing missing: one small read
    # The ticket's owner, back too late, loses its claim: no unit is claimed twice.
    assert manager.units._claim_fresh("ns", "t", task.version, "b", UnitSpec("a")) is None

    # Another node claims them from the pool, once the tickets are handed out ("x" only by
    # "b", its affinity); the task ends.
    second = manager.claim_unit("ns", "t", task.version, "a")
    assert second is not None and second.id == "c"
    third = manager.claim_unit("ns", "t", task.version, "a")
    assert third is not None and (third.id, third.attempts) == ("a", 0)
    assert manager.claim_unit("ns", "t", task.version, "a") is None
    mine = manager.claim_unit("ns", "t", task.version, "b")
    assert mine is not None and mine.id == "x"
    assert manager.claim_unit("ns", "t", task.version, "b") is None
    for unit, node in [("b", "a"), ("a", "a"), ("c", "a")]:
        assert manager.record_unit_completion("ns", "t", task.version, unit, node).status is (
            TaskStatus.STARTED
        )
    done = manager.record_unit_completion("ns", "t", task.version, "x", "b")
    assert done.status is TaskStatus.FINISHED
    assert manager.units.read_pool("ns", "t", task.version) == []
    assert {u.node for u in manager.get_units("ns", "t", task.version).values()} == {"a", "b"}


def test_check_handouts_of_an_ended_or_plain_run(manager: dt.Manager) -> None:
    task = add(manager, ["a"])
    manager.cancel_task("ns", "t", task.version)
    assert manager.units.check_handouts("ns", "t", task.version, give_back={"a"}) == (set(), 0)
    assert manager.units.check_handouts("ns", "t", task.version + 999) == (set(), 0)
    plain = manager.add_task("ns", "plain", nodes=["a"])
    with pytest.raises(dt.InvalidTaskError):
        manager.units.check_handouts("ns", "plain", plain.version)


# ---- snapshot and restore -----------------------------------------------------------------------


def test_snapshot_and_restore_keep_unit_tasks(manager: dt.Manager) -> None:
    """A restored unit task keeps its declaration: a STARTED one gets a new version and runs
    its units again from PENDING (their state is not in a snapshot); a terminal one keeps its
    version, status, error, failed node and failed unit."""
    declared = [UnitSpec("u1", "g"), UnitSpec("u2", "g", node="b"), UnitSpec("u3")]
    running = manager.add_task("ns", "running", b"r", nodes=NODES, units=declared)
    unit = manager.claim_unit("ns", "running", running.version, "a")
    assert unit is not None
    manager.record_unit_completion("ns", "running", running.version, unit.id, "a")
    manager.claim_unit("ns", "running", running.version, "c")  # IN_PROGRESS when snapshotted

    done = manager.add_task("ns", "done", nodes=["a"], units=["x", "y"])
    for _ in range(2):
        got = manager.claim_unit("ns", "done", done.version, "a")
        assert got is not None
        finished = manager.record_unit_completion("ns", "done", done.version, got.id, "a")
    assert finished.status is TaskStatus.FINISHED

    failing = manager.add_task("ns", "failed", nodes=["a", "b"], units=["f1", "f2"])
    got = manager.claim_unit("ns", "failed", failing.version, "b")
    assert got is not None and got.id == "f1"
    failed = manager.record_unit_failure("ns", "failed", failing.version, "f1", "b", "boom\n!")
    assert (failed.status, failed.failed_unit, failed.failed_node) == (
        TaskStatus.FAILED,
        "f1",
        "b",
    )

    snapshot = manager.snapshot()
    manager.restore(snapshot)
    restored = {t.id: t for t in manager.list_tasks()["ns"]}
    assert sorted(restored) == ["done", "failed", "running"]

    again = restored["running"]
    assert again.status is TaskStatus.STARTED and again.version > running.version
    assert again.units == tuple(declared) and again.payload == b"r" and again.nodes == set(NODES)
    assert again.started_at == running.started_at
    units = manager.get_units("ns", "running", again.version)
    assert {u.status for u in units.values()} == {UnitStatus.PENDING}
    with pytest.raises(dt.TaskNotFoundError):
        manager.get_units("ns", "running", running.version)
    for node in ["a", "b", "a"]:
        got = manager.claim_unit("ns", "running", again.version, node)
        assert got is not None
        final = manager.record_unit_completion("ns", "running", again.version, got.id, node)
    assert final.status is TaskStatus.FINISHED

    assert restored["done"] == finished
    assert restored["done"].units == (UnitSpec("x"), UnitSpec("y"))
    assert list(manager.get_units("ns", "done", done.version)) == ["x", "y"]

    lost = restored["failed"]
    assert lost == failed
    assert (lost.version, lost.error, lost.failed_node, lost.failed_unit) == (
        failing.version,
        "boom\n!",
        "b",
        "f1",
    )
    # A snapshot of what was restored gives the terminal runs as they were.
    first = {t.id: t for t in dt.model.tasks_from_payload(snapshot)}
    second = {t.id: t for t in dt.model.tasks_from_payload(manager.snapshot())}
    assert (second["done"], second["failed"]) == (first["done"], first["failed"])
    assert second["running"].units == first["running"].units


def test_a_declaration_too_large_for_one_request_is_refused(manager: dt.Manager) -> None:
    import secrets

    units = [secrets.token_hex(120) for _ in range(10_000)]  # random: ~1.2 MB compressed
    with pytest.raises(dt.InvalidTaskError, match="compress to") as info:
        add(manager, units)
    assert info.value.field == "units"
    assert manager.get_task("ns", "t") is None


def test_ten_thousand_units_in_one_task(manager: dt.Manager) -> None:
    units = [UnitSpec(f"shard-{i:05d}", group=f"coll-{i % 7}") for i in range(10_000)]
    task = add(manager, units)
    assert len(task.units) == 10_000
    stored = manager.get_task("ns", "t")
    assert stored is not None and stored.units == task.units
    unit = manager.claim_unit("ns", "t", task.version, "a")
    assert unit is not None and unit.id == "shard-00000" and unit.group == "coll-0"
    assert len(manager.get_units("ns", "t", task.version)) == 10_000


def test_a_unit_is_handed_out_again_after_its_claimants_manager_is_gone(
    etcd_client: dt.EtcdClient, dtask_prefix: str
) -> None:
    """API.md: claim_unit returns None "when nothing is claimable now". A node completes a unit
    and restarts (a new Manager); every other unit must still be claimable by someone."""
    first = dt.Manager(etcd_client, prefix=dtask_prefix)
    task = first.add_task("ns", "t", nodes=["a", "b"], units=["u1", "u2", "u3"])
    unit = first.claim_unit("ns", "t", task.version, "a")
    assert unit is not None
    first.record_unit_completion("ns", "t", task.version, unit.id, "a")
    restarted = dt.Manager(etcd_client, prefix=dtask_prefix)
    for node in ["a", "b"]:  # the Manager path takes no ticket ahead: nothing is held back
        got = restarted.claim_unit("ns", "t", task.version, node)
        assert got is not None
        restarted.record_unit_completion("ns", "t", task.version, got.id, node)
    final = restarted.get_task("ns", "t")
    assert final is not None and final.status is TaskStatus.FINISHED


def test_a_unit_keeps_its_latest_error_through_its_retry(manager: dt.Manager) -> None:
    policy = dt.RunPolicy(max_attempts=3, retry_backoff=timedelta(0))
    task = add(manager, ["u1"], policy=policy)
    assert manager.claim_unit("ns", "t", task.version, "a") is not None
    manager.record_unit_failure("ns", "t", task.version, "u1", "a", "first")
    again = manager.claim_unit("ns", "t", task.version, "b")
    assert again is not None and (again.attempts, again.error) == (1, "first")
    in_progress = manager.get_units("ns", "t", task.version)["u1"]
    assert (in_progress.status, in_progress.error) == (UnitStatus.IN_PROGRESS, "first")
    done = manager.record_unit_completion("ns", "t", task.version, "u1", "b")
    assert done.status is TaskStatus.FINISHED
    unit = manager.get_units("ns", "t", task.version)["u1"]
    assert (unit.status, unit.node, unit.attempts, unit.error) == (
        UnitStatus.COMPLETED,
        "b",
        1,
        "first",
    )


def test_no_unit_is_handed_out_while_paused(manager: dt.Manager) -> None:
    task = add(manager, ["u1", "u2", "u3"])
    held = manager.claim_unit("ns", "t", task.version, "a")
    assert held is not None
    manager.pause_task("ns", "t", task.version)
    other = dt.Manager(manager.client, prefix=manager.prefix)  # knows nothing of the run
    for claimant in (manager, other):
        assert claimant.claim_unit("ns", "t", task.version, "b") is None
    paused = manager.record_unit_completion("ns", "t", task.version, held.id, "a")  # counts
    assert paused.status is TaskStatus.PAUSED
    manager.resume_task("ns", "t", task.version)
    got = [manager.claim_unit("ns", "t", task.version, "b") for _ in range(3)]
    assert sorted(u.id for u in got if u is not None) == ["u2", "u3"]


def test_nodes_of_a_unit_task_record_units_not_completions_or_failures(
    manager: dt.Manager,
) -> None:
    task = add(manager, ["u1"])
    with pytest.raises(dt.InvalidTaskError, match="record_unit_completion"):
        manager.record_node_completion("ns", "t", task.version, "a")
    with pytest.raises(dt.InvalidTaskError, match="record_unit_failure"):
        manager.record_node_failure("ns", "t", task.version, "a", "boom")
    stored = manager.get_task("ns", "t")
    assert stored is not None and stored.status is TaskStatus.STARTED and not stored.attempts


def test_units_completed_counts_each_unit_tasks_completions(manager: dt.Manager) -> None:
    task = add(manager, ["u1", "u2", "u3"])
    plain = manager.add_task("ns", "plain", nodes=["a"])
    unit = manager.claim_unit("ns", "t", task.version, "a")
    assert unit is not None
    manager.record_unit_completion("ns", "t", task.version, unit.id, "a")
    listed = manager.list_tasks()["ns"]
    assert manager.units_completed(listed) == {("ns", "t"): 1}
    assert plain.id not in {tid for _, tid in manager.units_completed(listed)}
