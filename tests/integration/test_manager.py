"""The Manager against a real etcd: every rule of API.md, Weaviate's manager cases, races,
round trips and bad input."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import orjson
import pytest
from tests.support import FakeClock, keys_under, run_keys_under

import distributedtask as dt
from distributedtask.etcd import txn as t
from distributedtask.testing.proxy import TcpProxy

pytestmark = pytest.mark.manager

NS = "ns"


def test_add_returns_started_run_whose_version_is_the_etcd_revision(
    manager: dt.Manager, etcd_client: dt.EtcdClient
) -> None:
    task = manager.add_task(NS, "t1", b"payload", nodes=["n1", "n2"])
    revision_now = etcd_client.range(b"/", b"/").revision  # an empty range: just the header
    assert task.version == revision_now
    assert task.status is dt.TaskStatus.STARTED
    assert task.payload == b"payload"
    assert task.nodes == {"n1", "n2"}
    assert task.finished_nodes == frozenset()
    assert task.finished_at is None and task.error is None
    assert task.started_at.tzinfo is not None and task.started_at.microsecond % 1000 == 0
    assert manager.get_task(NS, "t1") == task


def test_adding_a_running_id_twice_is_refused(manager: dt.Manager) -> None:
    first = manager.add_task(NS, "t1", nodes=["n1"])
    with pytest.raises(
        dt.TaskAlreadyRunningError, match=f"already running with version {first.version}"
    ) as info:
        manager.add_task(NS, "t1", b"other", nodes=["n1"])
    assert (info.value.namespace, info.value.task_id, info.value.version) == (
        NS,
        "t1",
        first.version,
    )
    assert manager.get_task(NS, "t1") == first


@pytest.mark.parametrize("end", ["cancel", "fail", "finish"])
def test_readding_after_a_terminal_run_gets_a_higher_version(manager: dt.Manager, end: str) -> None:
    old = manager.add_task(NS, "t1", b"old", nodes=["n1", "n2"])
    manager.record_progress(NS, "t1", old.version, "n1", 0.5, "half")
    if end == "cancel":
        manager.cancel_task(NS, "t1", old.version)
    elif end == "fail":
        manager.record_node_failure(NS, "t1", old.version, "n1", "boom")
    else:
        manager.record_node_completion(NS, "t1", old.version, "n1")
        manager.record_node_completion(NS, "t1", old.version, "n2")
    new = manager.add_task(NS, "t1", b"new", nodes=["n3"])
    assert new.version > old.version
    assert new.status is dt.TaskStatus.STARTED
    assert new.payload == b"new" and new.nodes == {"n3"} and new.finished_nodes == frozenset()
    assert manager.get_task(NS, "t1") == new
    assert manager.get_progress(NS, "t1", old.version) == {}
    with pytest.raises(dt.TaskNotFoundError):
        manager.record_node_completion(NS, "t1", old.version, "n1")


def _ops(manager: dt.Manager) -> dict[str, Callable[[str, int], Any]]:
    return {
        "complete": lambda tid, v: manager.record_node_completion(NS, tid, v, "n1"),
        "fail": lambda tid, v: manager.record_node_failure(NS, tid, v, "n1", "boom"),
        "cancel": lambda tid, v: manager.cancel_task(NS, tid, v),
        "cleanup": lambda tid, v: manager.clean_up_task(NS, tid, v),
        "progress": lambda tid, v: manager.record_progress(NS, tid, v, "n1", 0.1),
    }


@pytest.mark.parametrize("op", ["complete", "fail", "cancel", "cleanup", "progress"])
def test_ops_on_a_missing_id_or_another_version_do_not_exist(manager: dt.Manager, op: str) -> None:
    run = _ops(manager)[op]
    with pytest.raises(dt.TaskNotFoundError, match="does not exist") as info:
        run("missing", 42)
    assert (info.value.namespace, info.value.task_id, info.value.version) == (NS, "missing", 42)
    task = manager.add_task(NS, "t1", nodes=["n1"])
    with pytest.raises(dt.TaskNotFoundError, match="does not exist"):
        run("t1", task.version + 1000)
    with pytest.raises(dt.TaskNotFoundError, match="does not exist"):
        run("t1", task.version - 1)
    assert manager.get_task(NS, "t1") == task


@pytest.mark.parametrize("end", ["cancel", "fail", "finish"])
@pytest.mark.parametrize("op", ["complete", "fail", "cancel", "progress"])
def test_ops_after_terminal_are_no_longer_running(manager: dt.Manager, end: str, op: str) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    if end == "cancel":
        manager.cancel_task(NS, "t1", task.version)
    elif end == "fail":
        manager.record_node_failure(NS, "t1", task.version, "n1", "boom")
    else:
        manager.record_node_completion(NS, "t1", task.version, "n1")
    before = manager.get_task(NS, "t1")
    with pytest.raises(dt.TaskNotRunningError, match="no longer running"):
        _ops(manager)[op]("t1", task.version)
    assert manager.get_task(NS, "t1") == before


def test_cleanup_rules_with_an_injected_clock(
    etcd_client: dt.EtcdClient, dtask_prefix: str, clock: FakeClock
) -> None:
    manager = dt.Manager(
        etcd_client, prefix=dtask_prefix, completed_task_ttl=timedelta(hours=1), clock=clock
    )
    task = manager.add_task(NS, "t1", nodes=["n1"])
    manager.record_progress(NS, "t1", task.version, "n1", 0.3)
    with pytest.raises(dt.TaskStillRunningError, match="still running"):
        manager.clean_up_task(NS, "t1", task.version)
    ended = manager.cancel_task(NS, "t1", task.version)
    assert ended.finished_at == clock()
    with pytest.raises(dt.TaskTooFreshError, match="too fresh to clean up"):
        manager.clean_up_task(NS, "t1", task.version)
    clock.advance(timedelta(hours=1))  # now - finished_at == ttl: still too fresh
    with pytest.raises(dt.TaskTooFreshError):
        manager.clean_up_task(NS, "t1", task.version)
    clock.advance(timedelta(milliseconds=1))
    manager.clean_up_task(NS, "t1", task.version)
    assert manager.get_task(NS, "t1") is None
    assert run_keys_under(etcd_client, dtask_prefix) == []
    with pytest.raises(dt.TaskNotFoundError):
        manager.clean_up_task(NS, "t1", task.version)


def test_completion_finishes_when_every_node_has_completed(manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1", "n2", "n3"])
    after = manager.record_node_completion(NS, "t1", task.version, "n2")
    assert after.status is dt.TaskStatus.STARTED and after.finished_nodes == {"n2"}
    again = manager.record_node_completion(NS, "t1", task.version, "n2")  # idempotent
    assert again.finished_nodes == {"n2"}
    manager.record_node_completion(NS, "t1", task.version, "n1")
    done = manager.record_node_completion(NS, "t1", task.version, "n3")
    assert done.status is dt.TaskStatus.FINISHED
    assert done.finished_nodes == {"n1", "n2", "n3"}
    assert done.finished_at is not None
    assert manager.get_task(NS, "t1") == done


def test_failure_makes_the_task_failed_with_the_error(manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1", "n2"])
    manager.record_node_completion(NS, "t1", task.version, "n2")
    failed = manager.record_node_failure(NS, "t1", task.version, "n1", "disk full")
    assert failed.status is dt.TaskStatus.FAILED
    assert failed.error == "disk full"  # verbatim, as in Weaviate
    assert failed.failed_node == "n1"
    assert failed.finished_nodes == {"n2"}
    assert manager.get_task(NS, "t1") == failed


def test_list_tasks_groups_by_namespace_sorted_by_id(manager: dt.Manager) -> None:
    assert manager.list_tasks() == {}
    for ns, tid in [("b", "z"), ("a", "y"), ("b", "c"), ("a", "x/1")]:
        manager.add_task(ns, tid, nodes=["n1"])
    listed = manager.list_tasks()
    assert sorted(listed) == ["a", "b"]
    assert [t.id for t in listed["a"]] == ["x/1", "y"]
    assert [t.id for t in listed["b"]] == ["c", "z"]
    assert listed["b"][0] == manager.get_task("b", "c")


def test_list_tasks_payload_has_weaviates_json_shape(manager: dt.Manager) -> None:
    running = manager.add_task(NS, "run", b"\x00\xffbin", nodes=["n2", "n1"])
    failed = manager.add_task(NS, "bad", nodes=["n1"])
    manager.record_node_failure(NS, "bad", failed.version, "n1", "boom")
    body = orjson.loads(manager.list_tasks_payload())
    assert list(body) == ["tasks"] and list(body["tasks"]) == [NS]
    by_id = {item["ID"]: item for item in body["tasks"][NS]}
    item = by_id["run"]
    assert set(item) == {
        "namespace",
        "ID",
        "version",
        "payload",
        "status",
        "startedAt",
        "finishedAt",
        "finishedNodes",
        "nodes",
    }
    assert item["version"] == running.version
    assert base64.b64decode(item["payload"]) == b"\x00\xffbin"
    assert item["status"] == "STARTED"
    assert item["finishedAt"] == "0001-01-01T00:00:00Z"
    assert item["startedAt"].endswith("Z")
    assert item["finishedNodes"] == {}
    assert item["nodes"] == ["n1", "n2"]
    assert by_id["bad"]["error"] == "boom"
    assert by_id["bad"]["failedNode"] == "n1"
    assert by_id["bad"]["status"] == "FAILED"
    assert by_id["bad"]["finishedAt"] != "0001-01-01T00:00:00Z"


def test_snapshot_then_restore_into_a_fresh_prefix(
    manager: dt.Manager, etcd_client: dt.EtcdClient, dtask_prefix: str
) -> None:
    running = manager.add_task(NS, "run", b"r", nodes=["n1", "n2"])
    manager.record_node_completion(NS, "run", running.version, "n1")
    done = manager.add_task(NS, "done", b"d", nodes=["n1"])
    manager.record_node_completion(NS, "done", done.version, "n1")
    failed = manager.add_task("other", "bad", nodes=["n1"])
    manager.record_node_failure("other", "bad", failed.version, "n1", "boom")
    data = manager.snapshot()

    target = dt.Manager(etcd_client, prefix=dtask_prefix + "-restored")
    target.add_task(NS, "stale", nodes=["n9"])  # replaced: not in the snapshot
    target.restore(data)
    restored = target.list_tasks()
    original = manager.list_tasks()
    assert sorted(restored) == sorted(original)
    assert [t.id for t in restored[NS]] == ["done", "run"]
    by_id = {t.id: t for t in restored[NS]}
    assert by_id["done"] == manager.get_task(NS, "done")  # terminal: everything kept
    assert restored["other"] == original["other"]
    run = by_id["run"]
    assert run.version > running.version  # STARTED: a new version in its new home
    assert run.status is dt.TaskStatus.STARTED
    assert (run.payload, run.nodes, run.finished_nodes, run.started_at) == (
        b"r",
        {"n1", "n2"},
        {"n1"},
        running.started_at,
    )
    finished = target.record_node_completion(NS, "run", run.version, "n2")
    assert finished.status is dt.TaskStatus.FINISHED
    assert target.snapshot() != data


def test_restore_of_bad_data_writes_nothing(
    manager: dt.Manager, etcd_client: dt.EtcdClient, dtask_prefix: str
) -> None:
    manager.add_task(NS, "keep", nodes=["n1"])
    before = keys_under(etcd_client, dtask_prefix)
    for bad in [b"not json", b"[]", b'{"tasks": {"ns": [{"ID": "x"}]}}', b'{"tasks": 3}']:
        with pytest.raises(dt.InvalidTaskError):
            manager.restore(bad)
    assert keys_under(etcd_client, dtask_prefix) == before


def test_wait_for_task_follows_the_run_to_its_end(manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    timer = threading.Timer(0.2, manager.record_node_completion, (NS, "t1", task.version, "n1"))
    timer.start()
    try:
        done = manager.wait_for_task(NS, "t1", task.version, timeout=10)
    finally:
        timer.join()
    assert done.status is dt.TaskStatus.FINISHED and done.finished_nodes == {"n1"}
    assert manager.wait_for_task(NS, "t1", task.version, timeout=1) == done  # already over


def test_wait_for_task_times_out_and_reports_missing(manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    with pytest.raises(TimeoutError):
        manager.wait_for_task(NS, "t1", task.version, timeout=0.3)
    with pytest.raises(dt.TaskNotFoundError):
        manager.wait_for_task(NS, "nope", 7, timeout=1)
    with pytest.raises(dt.TaskNotFoundError):
        manager.wait_for_task(NS, "t1", task.version + 1, timeout=1)
    threads_before = {th.name for th in threading.enumerate()}
    assert not any(name.startswith("distributedtask-wait") for name in threads_before)


def test_wait_for_task_watches_instead_of_polling(
    proxied_manager: dt.Manager, etcd_proxy: TcpProxy, manager: dt.Manager
) -> None:
    # `manager` writes directly; only the waiter's requests cross the proxy.
    waiter = dt.Manager(proxied_manager.client, prefix=manager.prefix)
    task = manager.add_task(NS, "t1", nodes=["n1", "n2"])
    etcd_proxy.reset_counts()
    result: list[dt.Task] = []
    thread = threading.Thread(
        target=lambda: result.append(waiter.wait_for_task(NS, "t1", task.version, timeout=20))
    )
    thread.start()
    for node in ("n1", "n2"):
        manager.record_progress(NS, "t1", task.version, node, 0.5)
        manager.record_node_completion(NS, "t1", task.version, node)
    thread.join(30)
    assert result and result[0].status is dt.TaskStatus.FINISHED
    # for the outcome and for the record: one list and one watch stream each, then one final
    # read, however long it waited
    assert etcd_proxy.requests == 5


def test_wait_for_task_sees_a_live_run_replaced_by_a_restore(manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    snapshot = manager.snapshot()
    failures: list[BaseException] = []

    def wait() -> None:
        try:
            manager.wait_for_task(NS, "t1", task.version, timeout=20)
        except BaseException as exc:
            failures.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    manager.restore(snapshot)  # the STARTED run comes back with a new version
    waiter.join(30)
    assert len(failures) == 1 and isinstance(failures[0], dt.TaskNotFoundError)
    restored = manager.get_task(NS, "t1")
    assert restored is not None and restored.version > task.version


def test_twelve_nodes_completing_at_once_finish_once(
    manager: dt.Manager, etcd_client: dt.EtcdClient
) -> None:
    nodes = [f"n{i}" for i in range(12)]
    task = manager.add_task(NS, "fan", nodes=nodes)
    barrier = threading.Barrier(len(nodes))
    results: dict[str, dt.Task] = {}
    errors: list[BaseException] = []

    def complete(node: str) -> None:
        barrier.wait()
        try:
            results[node] = manager.record_node_completion(NS, "fan", task.version, node)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=complete, args=(n,)) for n in nodes]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert errors == []
    final = manager.get_task(NS, "fan")
    assert final is not None and final.status is dt.TaskStatus.FINISHED
    assert final.finished_nodes == set(nodes)
    assert any(r.status is dt.TaskStatus.FINISHED for r in results.values())
    outcome = etcd_client.range(manager.keys.outcome(NS, "fan")).first()
    assert outcome is not None and outcome.version == 1  # written exactly once


def _race_once(manager: dt.Manager, tid: str) -> str:
    """Complete the last node and cancel at once; returns the final status."""
    task = manager.add_task(NS, tid, nodes=["n1", "n2"])
    manager.record_node_completion(NS, tid, task.version, "n1")
    barrier = threading.Barrier(2)
    raised: list[str] = []
    succeeded: list[str] = []

    def run(name: str, call: Callable[[], dt.Task]) -> None:
        barrier.wait()
        try:
            call()
            succeeded.append(name)
        except dt.TaskNotRunningError:
            raised.append(name)

    calls = {
        "complete": lambda: manager.record_node_completion(NS, tid, task.version, "n2"),
        "cancel": lambda: manager.cancel_task(NS, tid, task.version),
    }
    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    final = manager.get_task(NS, tid)
    assert final is not None
    if sorted(succeeded) == ["cancel", "complete"]:
        # The cancel landed between the completion and its finishing write: the cancel won,
        # and the completion (whose own write counted) returned the cancelled run.
        assert raised == [] and final.status is dt.TaskStatus.CANCELLED
        assert final.finished_nodes == {"n1", "n2"}
        return "CANCELLED (between)"
    assert len(raised) == 1 and len(succeeded) == 1, (raised, succeeded)
    assert final.status.value == ("FINISHED" if succeeded == ["complete"] else "CANCELLED")
    return final.status.value


def test_cancel_racing_the_last_completion_has_one_winner(manager: dt.Manager) -> None:
    outcomes = [_race_once(manager, f"race{i}") for i in range(10)]
    assert set(outcomes) <= {"FINISHED", "CANCELLED", "CANCELLED (between)"}


def test_round_trips_per_operation(proxied_manager: dt.Manager, etcd_proxy: TcpProxy) -> None:
    m = proxied_manager

    def trips(call: Callable[[], object]) -> int:
        etcd_proxy.reset_counts()
        call()
        return etcd_proxy.requests

    # A fresh prefix: the add finds no layout marker, writes it, and adds again.
    assert trips(lambda: m.add_task(NS, "first", nodes=["n1"])) == 3
    assert trips(lambda: m.add_task(NS, "a", nodes=["n1", "n2"])) == 1
    version = m.get_task(NS, "a").version  # type: ignore[union-attr]
    assert trips(lambda: m.get_task(NS, "a")) == 1
    assert trips(lambda: m.record_node_completion(NS, "a", version, "n1")) == 1
    # The completion that leaves no node pending writes FINISHED in a second transaction.
    assert trips(lambda: m.record_node_completion(NS, "a", version, "n2")) == 2
    # A Manager that meets a run for the first time reads its node list once.
    other = dt.Manager(m.client, prefix=m.prefix)
    e = m.add_task(NS, "e", nodes=["n1", "n2"])
    assert trips(lambda: other.record_node_completion(NS, "e", e.version, "n1")) == 2
    assert trips(lambda: other.record_node_completion(NS, "e", e.version, "n1")) == 1
    assert trips(lambda: m.add_task(NS, "b", nodes=["n1"])) == 1
    vb = m.get_task(NS, "b").version  # type: ignore[union-attr]
    assert trips(lambda: m.record_node_failure(NS, "b", vb, "n1", "x")) == 1
    assert trips(lambda: m.add_task(NS, "c", nodes=["n1"])) == 1
    vc = m.get_task(NS, "c").version  # type: ignore[union-attr]
    assert trips(lambda: m.cancel_task(NS, "c", vc)) == 1
    d = m.add_task(NS, "d", nodes=["n1"])
    assert trips(lambda: m.record_progress(NS, "d", d.version, "n1", 0.5)) == 1
    assert trips(m.list_tasks) == 1
    assert trips(lambda: m.add_task(NS, "c", nodes=["n1"])) == 3  # over a terminal run


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"namespace": ""}, "namespace"),
        ({"namespace": "a\x00b"}, "namespace"),
        ({"task_id": "line\nbreak"}, "task_id"),
        ({"task_id": "x" * 257}, "task_id"),
        ({"task_id": "é" * 129}, "task_id"),  # 258 UTF-8 bytes
        ({"payload": b"x" * 1025}, "payload"),
        ({"payload": "text"}, "payload"),
        ({"nodes": []}, "nodes"),
        ({"nodes": "n1"}, "nodes"),
        ({"nodes": ["ok", ""]}, "node_id"),
        ({"nodes": ["ok", "tab\t"]}, "node_id"),
        ({"nodes": ["ok", 7]}, "node_id"),
    ],
)
def test_bad_input_writes_nothing(
    etcd_client: dt.EtcdClient, dtask_prefix: str, kwargs: dict[str, Any], field: str
) -> None:
    manager = dt.Manager(etcd_client, prefix=dtask_prefix, max_payload_bytes=1024)
    args: dict[str, Any] = {"namespace": NS, "task_id": "t", "payload": b"", "nodes": ["n1"]}
    args.update(kwargs)
    revision = etcd_client.range(b"/", b"/").revision
    with pytest.raises(dt.InvalidTaskError) as info:
        manager.add_task(args["namespace"], args["task_id"], args["payload"], nodes=args["nodes"])
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    assert keys_under(etcd_client, dtask_prefix) == []
    assert etcd_client.range(b"/", b"/").revision == revision


def test_payload_of_exactly_the_limit_is_accepted(
    etcd_client: dt.EtcdClient, dtask_prefix: str
) -> None:
    manager = dt.Manager(etcd_client, prefix=dtask_prefix, max_payload_bytes=1024)
    assert manager.add_task(NS, "t", b"x" * 1024, nodes=["n1"]).payload == b"x" * 1024


def test_default_payload_limit_of_one_mib_fits_etcd(manager: dt.Manager) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    task = manager.add_task(NS, "big", payload, nodes=["n1"])
    got = manager.get_task(NS, "big")
    assert got is not None and got.payload == payload and got.version == task.version


def test_a_node_that_is_not_assigned_cannot_record(
    manager: dt.Manager, etcd_client: dt.EtcdClient, dtask_prefix: str
) -> None:
    task = manager.add_task(NS, "t", nodes=["n1"])
    before = keys_under(etcd_client, dtask_prefix)
    revision = etcd_client.range(b"/", b"/").revision
    for call in (
        lambda: manager.record_node_completion(NS, "t", task.version, "intruder"),
        lambda: manager.record_node_failure(NS, "t", task.version, "intruder", "x"),
        lambda: manager.record_progress(NS, "t", task.version, "intruder", 0.5),
    ):
        with pytest.raises(dt.InvalidTaskError) as info:
            call()
        assert info.value.field == "node_id"
    assert keys_under(etcd_client, dtask_prefix) == before
    assert etcd_client.range(b"/", b"/").revision == revision
    assert manager.get_task(NS, "t") == task


def test_names_with_slashes_and_unicode_round_trip_without_colliding(manager: dt.Manager) -> None:
    pairs = [
        ("a/b", "c"),
        ("a", "b/c"),
        ("a", "b"),
        ("a", "b%2Fc"),
        ("日本", "タスク/1"),
        ("sp ace", ".."),
    ]
    added = {pair: manager.add_task(*pair, nodes=["n/1", "ü"]) for pair in pairs}
    for (ns, tid), task in added.items():
        got = manager.get_task(ns, tid)
        assert got == task and (got.namespace, got.id) == (ns, tid)
    listed = manager.list_tasks()
    assert sum(len(v) for v in listed.values()) == len(pairs)
    task = added[("a", "b")]
    done = manager.record_node_completion("a", "b", task.version, "n/1")
    assert done.finished_nodes == {"n/1"}
    assert manager.get_task("a", "b/c").finished_nodes == frozenset()  # type: ignore[union-attr]


def test_two_prefixes_never_meet(etcd_client: dt.EtcdClient, dtask_prefix: str) -> None:
    one = dt.Manager(etcd_client, prefix=dtask_prefix + "/one")
    other = dt.Manager(etcd_client, prefix=dtask_prefix + "/one-more")
    one.add_task(NS, "t", nodes=["n1"])
    assert other.list_tasks() == {}
    assert other.get_task(NS, "t") is None


def test_add_with_default_nodes_uses_live_members_serving_the_namespace(
    manager: dt.Manager, etcd_client: dt.EtcdClient
) -> None:
    from distributedtask.records import MemberRecord

    with pytest.raises(dt.NoEligibleNodesError) as info:
        manager.add_task(NS, "t")
    assert info.value.namespace == NS
    lease = etcd_client.lease_grant(30)
    try:
        for node, namespaces in [("n1", {NS}), ("n2", {NS, "x"}), ("n3", {"x"})]:
            record = MemberRecord(node, frozenset(namespaces), manager.now())
            etcd_client.put(manager.keys.member(node), record.encode(), lease=lease)
        task = manager.add_task(NS, "t")
        assert task.nodes == {"n1", "n2"}
    finally:
        etcd_client.lease_revoke(lease)
    with pytest.raises(dt.NoEligibleNodesError):
        manager.add_task("x", "t")


def test_progress_is_stored_per_node(manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t", nodes=["n1", "n2"])
    manager.record_progress(NS, "t", task.version, "n1", 0.25, "a quarter")
    manager.record_progress(NS, "t", task.version, "n1", 0.5, "half")
    manager.record_progress(NS, "t", task.version, "n2", 7, "clamped")
    progress = manager.get_progress(NS, "t", task.version)
    assert set(progress) == {"n1", "n2"}
    assert (progress["n1"].fraction, progress["n1"].message) == (0.5, "half")
    assert progress["n2"].fraction == 1.0
    assert progress["n1"].updated_at.tzinfo is not None


def test_corrupt_and_foreign_values_are_skipped_when_listing(
    manager: dt.Manager, etcd_client: dt.EtcdClient
) -> None:
    good = manager.add_task(NS, "good", nodes=["n1"])
    etcd_client.put(manager.keys.task(NS, "corrupt"), b"{not json")
    etcd_client.put(manager.keys.task(NS, "future"), orjson.dumps({"v": 99}))
    etcd_client.put(manager.keys.all_tasks() + b"no-slash", b"{}")
    listed = manager.list_tasks()
    assert listed == {NS: [good]}
    assert manager.skipped_records >= 3


def test_a_lost_response_is_recognised_on_retry(
    etcd_client: dt.EtcdClient, dtask_prefix: str, etcd_proxy: TcpProxy
) -> None:
    if not hasattr(etcd_proxy, "drop_next_response"):
        pytest.fail("the proxy cannot drop a response")
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=5.0) as client:
        manager = dt.Manager(client, prefix=dtask_prefix)
        direct = dt.Manager(etcd_client, prefix=dtask_prefix)
        etcd_proxy.drop_next_response()
        task = manager.add_task(NS, "t", nodes=["n1", "n2"])  # committed, reply lost, retried
        assert direct.get_task(NS, "t") == task
        etcd_proxy.drop_next_response()
        assert manager.record_node_completion(NS, "t", task.version, "n1").finished_nodes == {"n1"}
        etcd_proxy.drop_next_response()
        failed = manager.record_node_failure(NS, "t", task.version, "n2", "boom")
        assert failed.status is dt.TaskStatus.FAILED
        other = manager.add_task(NS, "u", nodes=["n1"])
        etcd_proxy.drop_next_response()
        assert manager.cancel_task(NS, "u", other.version).status is dt.TaskStatus.CANCELLED
        direct_mgr = dt.Manager(client, prefix=dtask_prefix, completed_task_ttl=timedelta(0))
        etcd_proxy.drop_next_response(skip=1)  # the read passes, the delete's reply is lost
        direct_mgr.clean_up_task(NS, "u", other.version)
        assert direct.get_task(NS, "u") is None
    assert etcd_proxy.dropped >= 5


def test_txn_builders_are_what_etcd_expects(etcd_client: dt.EtcdClient, dtask_prefix: str) -> None:
    key = (dtask_prefix + "/raw").encode()
    first = etcd_client.txn(compare=[t.create_equals(key, 0)], success=[t.put(key, b"1")])
    assert first.succeeded
    again = etcd_client.txn(
        compare=[t.create_equals(key, 0)], success=[t.put(key, b"2")], failure=[t.get(key)]
    )
    assert not again.succeeded
    kv = again.range(0).first()
    assert kv is not None and kv.value == b"1" and kv.mod_revision == first.revision
