"""Hostile data under our prefix, on a real etcd: keys that are not ours, corrupt JSON, records
of a future format (``"v": 2``), values of the wrong shape for each kind of key (task, outcome,
run, progress, member), a value at etcd's request-size limit, and payloads at and over the
limits. Readers skip what they cannot read with one log line and a counter; they never crash,
and valid tasks next to the garbage keep working, on the Manager and on a running Scheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from prometheus_client import CollectorRegistry
from tests.support import RecordingProvider, Schedulers, keys_under, metric

import distributedtask as dt
from distributedtask.model import Progress
from distributedtask.records import (
    CorruptRecordError,
    MemberRecord,
    OutcomeRecord,
    RunRecord,
    TaskRecord,
    encode_progress,
)
from distributedtask.testing import wait_until
from distributedtask.testing.proxy import TcpProxy

NS = "ns"
NODE = "node-1"
MiB = 1024 * 1024
ETCD_MAX_REQUEST_BYTES = 3 * MiB // 2  # etcd's default --max-request-bytes (1.5 MiB)
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
SKIPPED = "distributedtask_skipped_records_total"

RECORD = orjson.loads(
    TaskRecord(payload=b"p", started_at=T0, nodes=frozenset({NODE}), token="x").encode()
)
OUTCOME = orjson.loads(OutcomeRecord(dt.TaskStatus.CANCELLED, T0, "x").encode())
RUN = orjson.loads(RunRecord("completed", T0, "x").encode())
MEMBER = orjson.loads(MemberRecord("member-1", frozenset({NS}), T0).encode())
PROGRESS = orjson.loads(encode_progress(Progress(0.5, "half", T0)))


def js(base: dict[str, object], **changes: object) -> bytes:
    return orjson.dumps({**base, **changes})


# Keys under tasks/, outcomes/ and runs/ (the ranges every reader lists) that are not ours.
FOREIGN_IN_RANGES = {
    b"tasks/only-one-segment": js(RECORD),
    b"tasks/ns/x/extra": js(RECORD),
    b"tasks/%zz/x": js(RECORD),  # a bad escape
    b"tasks/ns/%61": js(RECORD),  # "a", escaped where our keys never escape it
    b"tasks/\xff\xfe/x": js(RECORD),  # not UTF-8
    b"tasks/ns/": js(RECORD),  # empty id
    b"outcomes/ns": js(OUTCOME),
    b"runs/ns/good1": js(RUN),  # a run key without its node
    b"runs/ns/x/%2": js(RUN),
}
# Task records that cannot be read.
CORRUPT_TASKS = {
    "bad-json": b"{not json",
    "empty": b"",
    "future": js(RECORD, v=2),
    "no-version": js({k: v for k, v in RECORD.items() if k != "v"}),
    "array": b"[1, 2, 3]",
    "payload-int": js(RECORD, payload=5),
    "payload-not-b64": js(RECORD, payload="@@@"),
    "nodes-str": js(RECORD, nodes="node-1"),
    "no-nodes": js(RECORD, nodes=[]),
    "bad-node": js(RECORD, nodes=["a\nb"]),
    "time-str": js(RECORD, startedAt="2026-01-02T03:04:05Z"),
    "time-huge": js(RECORD, startedAt=2**62),
    "version-bool": js(RECORD, version=True),
    "at-the-limit": b"\xff",  # replaced by a value as large as etcd accepts, see plant()
}
# Outcome values that make their (valid) task unreadable; the task record's key is reported.
CORRUPT_OUTCOMES = {
    "outcome-json": b"42",
    "outcome-future": js(OUTCOME, v=2),
    "outcome-started": js(OUTCOME, status="STARTED"),
    "outcome-status": js(OUTCOME, status="DONE"),
    "outcome-time": js(OUTCOME, finishedAt=None),
    "outcome-error": js(OUTCOME, error=["boom"]),
}
CORRUPT_MEMBERS = {
    b"members/ghost": b"junk",
    b"members/future": js(MEMBER, v=2, node="future"),
    b"members/ns-str": js(MEMBER, node="ns-str", namespaces=NS),
    b"members/null": b"null",
    b"members/bad-node": js(MEMBER, node=""),
    b"members/a/b": b"{}",  # not a key of ours either
}
# Under the progress prefix of good1's version (key suffix after ".../<version>/").
CORRUPT_PROGRESS = {
    b"node-2": b"{",
    b"node-3": js(PROGRESS, v=2),
    b"node-4": js(PROGRESS, fraction="half"),
    b"node-5": b"null",
}


@dataclass
class Planted:
    """What :func:`plant` wrote, and what readers should make of it."""

    good: list[dt.Task]
    bad_run: dt.Task  # a valid task whose second node's run key is garbage
    bad_run_key: bytes
    skipped_by_listing: set[bytes] = field(default_factory=set)  # keys list_tasks must skip
    unreadable_ids: list[str] = field(default_factory=list)  # get_task raises for these
    member_keys: set[bytes] = field(default_factory=set)
    progress_keys: set[bytes] = field(default_factory=set)


def largest_value(key: bytes) -> int:
    """The largest value etcd (default limits) takes for a put of ``key``: measured, 69 bytes
    of request overhead with a 45-byte key; we leave a margin of 256 bytes for other keys."""
    return ETCD_MAX_REQUEST_BYTES - len(key) - 256


def plant(manager: dt.Manager, client: dt.EtcdClient, *, big_payload: bytes = b"") -> Planted:
    """Two good tasks (good2 carrying ``big_payload``), a task with a corrupt run key, and every
    kind of garbage above, written straight to etcd."""
    keys = manager.keys
    root = keys.root
    good1 = manager.add_task(NS, "good1", b"one", nodes=[NODE])
    good2 = manager.add_task(NS, "good2", big_payload, nodes=[NODE])
    bad_run = manager.add_task(NS, "bad-run", b"r", nodes=[NODE, "ghost"])
    bad_run_key = keys.run(NS, "bad-run", "ghost")
    client.put(bad_run_key, b'"a string"')
    planted = Planted([good1, good2], bad_run, bad_run_key)
    planted.skipped_by_listing.add(bad_run_key)
    for suffix, value in FOREIGN_IN_RANGES.items():
        client.put(root + suffix, value)
        planted.skipped_by_listing.add(root + suffix)
    for task_id, value in CORRUPT_TASKS.items():
        key = keys.task(NS, task_id)
        at_the_limit = b"\xff" * largest_value(key) if task_id == "at-the-limit" else None
        client.put(key, value if at_the_limit is None else at_the_limit)
        planted.skipped_by_listing.add(key)
        planted.unreadable_ids.append(task_id)
    for task_id, value in CORRUPT_OUTCOMES.items():
        client.put(keys.task(NS, task_id), js(RECORD))
        client.put(keys.outcome(NS, task_id), value)
        planted.skipped_by_listing.add(keys.task(NS, task_id))
        planted.unreadable_ids.append(task_id)
    # Orphans: well-formed keys of a run that does not exist. Ignored, not counted.
    client.put(keys.outcome(NS, "orphan"), js(OUTCOME))
    client.put(keys.run(NS, "orphan", NODE), js(RUN))
    # Membership: one valid record (no lease: it stays) and garbage.
    client.put(keys.member("member-1"), js(MEMBER))
    for suffix, value in CORRUPT_MEMBERS.items():
        client.put(root + suffix, value)
        planted.member_keys.add(root + suffix)
    # Progress of good1: one valid report, garbage, and a key that is not ours.
    manager.record_progress(NS, "good1", good1.version, NODE, 0.5, "half")
    version_prefix = keys.version_progress(NS, "good1", good1.version)
    for suffix, value in CORRUPT_PROGRESS.items():
        client.put(version_prefix + suffix, value)
        planted.progress_keys.add(version_prefix + suffix)
    client.put(version_prefix + b"%zz", js(PROGRESS))  # not ours: ignored
    # Keys outside every listed range.
    client.put(root + b"foreign", b"hello")
    client.put(root + b"progress/ns/good1/not-a-version/node-1", js(PROGRESS))
    return planted


def skip_lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == logger and r.levelno == logging.WARNING and "skipping" in r.getMessage()
    ]


def manager_skipped_keys(caplog: pytest.LogCaptureFixture) -> list[bytes]:
    """The key of each skip line of the Manager (its last log argument)."""
    return [r.args[-1] for r in skip_lines(caplog, "distributedtask.manager")]  # type: ignore[index]


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(etcd_endpoint: str) -> Iterator[dt.EtcdClient]:
    with dt.EtcdClient(etcd_endpoint, timeout=5.0, watch_timeout=6.0) as client:
        yield client


@pytest.fixture
def mgr(client: dt.EtcdClient, dtask_prefix: str) -> dt.Manager:
    return dt.Manager(client, prefix=dtask_prefix, completed_task_ttl=timedelta(hours=1))


@pytest.fixture
def schedulers(mgr: dt.Manager, registry: CollectorRegistry) -> Iterator[Schedulers]:
    with Schedulers(mgr, registry) as farm:
        yield farm


# ---- the Manager --------------------------------------------------------------------------------


def test_listing_skips_every_unreadable_value_once_and_keeps_the_good_tasks(
    mgr: dt.Manager, client: dt.EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    planted = plant(mgr, client)
    caplog.clear()
    caplog.set_level(logging.WARNING)
    before = mgr.skipped_records
    listed = mgr.list_tasks()
    current = [mgr.get_task(NS, t.id) for t in [planted.bad_run, *planted.good]]
    assert listed == {NS: current}
    assert [t.id for t in listed[NS]] == ["bad-run", "good1", "good2"]
    assert listed[NS][1] == planted.good[0]  # untouched by the garbage around it
    bad_run = listed[NS][0]
    assert bad_run.status is dt.TaskStatus.STARTED and bad_run.finished_nodes == frozenset()
    # Each unreadable value: one log line naming its key, one count.
    assert mgr.skipped_records - before == len(planted.skipped_by_listing) + 1  # + get_task
    keys = manager_skipped_keys(caplog)
    assert set(keys) == planted.skipped_by_listing
    assert len(keys) == len(planted.skipped_by_listing) + 1
    assert keys.count(planted.bad_run_key) == 2  # by list_tasks, then by get_task of bad-run
    # The same through the JSON payload (the CLI's and snapshot()'s view).
    payload = orjson.loads(mgr.list_tasks_payload())
    assert [item["ID"] for item in payload["tasks"][NS]] == ["bad-run", "good1", "good2"]


def test_get_task_of_an_unreadable_record_raises_corrupt_record_error(
    mgr: dt.Manager, client: dt.EtcdClient
) -> None:
    """Documented in Manager.get_task: a record it cannot read is a CorruptRecordError (a
    DistributedTaskError), not a crash; the valid tasks next to it read fine."""
    planted = plant(mgr, client)
    for task_id in planted.unreadable_ids:
        with pytest.raises(CorruptRecordError):
            mgr.get_task(NS, task_id)
    for task in planted.good:
        assert mgr.get_task(NS, task.id) == task
    assert mgr.get_task(NS, "orphan") is None


def test_transitions_of_good_tasks_work_next_to_garbage(
    mgr: dt.Manager, client: dt.EtcdClient
) -> None:
    planted = plant(mgr, client)
    good1, good2 = planted.good
    done = mgr.record_node_completion(NS, "good1", good1.version, NODE)
    assert done.status is dt.TaskStatus.FINISHED
    cancelled = mgr.cancel_task(NS, "good2", good2.version)
    assert cancelled.status is dt.TaskStatus.CANCELLED
    again = mgr.add_task(NS, "good1", b"again", nodes=[NODE])
    assert again.version > good1.version
    # The task with a corrupt run key still ends: the node whose key is garbage can fail it.
    failed = mgr.record_node_failure(NS, "bad-run", planted.bad_run.version, "ghost", "x")
    assert failed.status is dt.TaskStatus.FAILED


def test_live_members_skips_unreadable_members(
    mgr: dt.Manager, client: dt.EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    planted = plant(mgr, client)
    caplog.clear()
    caplog.set_level(logging.WARNING)
    before = mgr.skipped_records
    members = mgr.live_members()
    assert [m.node_id for m in members] == ["member-1"]
    assert mgr.skipped_records - before == len(planted.member_keys)
    assert sorted(manager_skipped_keys(caplog)) == sorted(planted.member_keys)
    # add_task with nodes=None picks the one readable member serving the namespace.
    task = mgr.add_task(NS, "auto", nodes=None)
    assert task.nodes == {"member-1"}


def test_get_progress_skips_unreadable_reports(
    mgr: dt.Manager, client: dt.EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    planted = plant(mgr, client)
    caplog.clear()
    caplog.set_level(logging.WARNING)
    before = mgr.skipped_records
    progress = mgr.get_progress(NS, "good1", planted.good[0].version)
    assert list(progress) == [NODE]
    assert progress[NODE].fraction == 0.5 and progress[NODE].message == "half"
    # Unreadable values are counted and logged; the key that is not ours (".../%zz") is
    # ignored silently.
    assert mgr.skipped_records - before == len(planted.progress_keys)
    assert sorted(manager_skipped_keys(caplog)) == sorted(planted.progress_keys)


def test_a_value_at_etcds_request_limit_is_stored_and_one_byte_more_is_refused(
    client: dt.EtcdClient, dtask_prefix: str
) -> None:
    """Pins the size plant() uses: etcd takes it, and refuses a request 257 bytes larger."""
    key = dt.Manager(client, prefix=dtask_prefix).keys.task(NS, "at-the-limit")
    client.put(key, b"\xff" * largest_value(key))
    with pytest.raises(dt.EtcdError, match="request is too large"):
        client.put(key, b"\xff" * (largest_value(key) + 257))


# ---- payload limits -----------------------------------------------------------------------------


def test_a_payload_over_max_payload_bytes_is_refused_before_anything_is_sent(
    etcd_proxy: TcpProxy, dtask_prefix: str, client: dt.EtcdClient
) -> None:
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=5.0) as proxied:
        manager = dt.Manager(proxied, prefix=dtask_prefix)
        assert manager.max_payload_bytes == MiB
        etcd_proxy.reset_counts()
        with pytest.raises(dt.InvalidTaskError) as info:
            manager.add_task(NS, "too-big", b"\0" * (MiB + 1), nodes=[NODE])
        assert info.value.field == "payload"
        assert etcd_proxy.requests == 0
        with pytest.raises(dt.InvalidTaskError):
            manager.add_task(NS, "too-big", bytearray(MiB + 1), nodes=[NODE])
        assert etcd_proxy.requests == 0
    assert keys_under(client, dtask_prefix) == []


def test_a_payload_of_exactly_max_payload_bytes_works_end_to_end(
    etcd_proxy: TcpProxy, dtask_prefix: str
) -> None:
    payload = bytes(range(256)) * (MiB // 256)
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=5.0) as proxied:
        manager = dt.Manager(proxied, prefix=dtask_prefix)
        etcd_proxy.reset_counts()
        task = manager.add_task(NS, "one-mib", payload, nodes=[NODE])
        assert etcd_proxy.requests == 1  # one transaction, however large
        assert task.payload == payload
        assert manager.get_task(NS, "one-mib") == task
        assert manager.list_tasks() == {NS: [task]}
        snapshot = manager.snapshot()
        manager.restore(snapshot)
        restored = manager.get_task(NS, "one-mib")
        assert restored is not None and restored.payload == payload
        done = manager.record_node_completion(NS, "one-mib", restored.version, NODE)
        assert done.status is dt.TaskStatus.FINISHED


@pytest.mark.parametrize("size", [1_200_000, 1_400_000])
def test_a_payload_etcd_cannot_take_fails_with_etcd_error_and_writes_nothing(
    client: dt.EtcdClient, dtask_prefix: str, size: int
) -> None:
    """FINDING: with ``max_payload_bytes`` above what etcd takes (a 1.5 MiB request, and the
    record holds the payload in base64, so ~1.17 MB), add_task sends the request and etcd
    refuses it: ``EtcdError('etcd refused the request: etcdserver: request is too large')``,
    code 3 (INVALID_ARGUMENT), not an InvalidTaskError before sending. Nothing is written."""
    manager = dt.Manager(client, prefix=dtask_prefix, max_payload_bytes=2 * MiB)
    with pytest.raises(dt.EtcdError, match="request is too large") as info:
        manager.add_task(NS, "huge", b"\0" * size, nodes=[NODE])
    assert info.value.code == 3 and not info.value.transient
    assert keys_under(client, dtask_prefix) == []


def test_a_request_over_grpcs_limit_is_not_retried(etcd_proxy: TcpProxy, dtask_prefix: str) -> None:
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=1.0) as proxied:
        manager = dt.Manager(proxied, prefix=dtask_prefix, max_payload_bytes=4 * MiB)
        etcd_proxy.reset_counts()
        with pytest.raises(dt.EtcdError, match="larger than max") as info:
            manager.add_task(NS, "huge", b"\0" * (3 * MiB // 2), nodes=[NODE])
        assert info.value.code == 8
        assert etcd_proxy.requests == 1


# ---- a running Scheduler ------------------------------------------------------------------------


def scheduler_skip_keys(caplog: pytest.LogCaptureFixture) -> list[bytes]:
    return [r.args[0] for r in skip_lines(caplog, "distributedtask.scheduler")]  # type: ignore[index]


def test_a_scheduler_skips_garbage_once_and_runs_the_good_tasks(
    schedulers: Schedulers,
    mgr: dt.Manager,
    client: dt.EtcdClient,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    big = bytes(range(256)) * (MiB // 256)  # a payload of exactly max_payload_bytes
    planted = plant(mgr, client, big_payload=big)
    provider = RecordingProvider()
    # node_loss_grace=None: "ghost", the second node of bad-run, never joins.
    scheduler = schedulers.new(NODE, {NS: provider}, node_loss_grace=None)
    good1, good2 = planted.good
    wanted = {good1.descriptor, good2.descriptor, planted.bad_run.descriptor}
    assert set(provider.starts()) == wanted and len(provider.starts()) == 3
    assert provider.started_task(good2.descriptor).payload == big
    assert scheduler.running() == {NS: wanted}

    # What the first listing read: tasks/, outcomes/, runs/ and members/ (not progress/, and
    # not the keys outside those ranges), the corrupt run key included.
    read_at_start = planted.skipped_by_listing | planted.member_keys
    assert metric(registry, SKIPPED) == len(read_at_start)
    assert sorted(scheduler_skip_keys(caplog)) == sorted(read_at_start)

    # Garbage arriving through the watch: counted once per key, even when rewritten.
    root = mgr.keys.root
    late = {
        root + b"foreign-late": b"x",
        root + b"progress/ns/good1/0/node-1": js(PROGRESS),  # version 0: not ours
        mgr.keys.task(NS, "late-bad"): b"{",
        mgr.keys.member("late"): b"[]",
    }
    for key, value in late.items():
        client.put(key, value)
    client.put(mgr.keys.task(NS, "late-bad"), js(RECORD, v=3))  # rewritten: not counted again
    # ... while good tasks keep flowing: a new one starts, a cancelled one is terminated.
    good3 = mgr.add_task(NS, "good3", b"three", nodes=[NODE])
    wait_until(lambda: good3.descriptor in provider.starts(), message="good3 started")
    mgr.cancel_task(NS, "good1", good1.version)
    wait_until(lambda: good1.descriptor in provider.terminations(), message="good1 terminated")
    expected = read_at_start | set(late)
    wait_until(lambda: metric(registry, SKIPPED) == len(expected), message="late garbage counted")
    assert sorted(scheduler_skip_keys(caplog)) == sorted(expected)  # one line per key
    assert metric(registry, "distributedtask_watch_restarts_total", reason="error") == 0

    # A full resync reads everything again: nothing is counted or logged twice.
    scheduler._watch.resync()  # type: ignore[union-attr]
    wait_until(lambda: metric(registry, "distributedtask_resyncs_total") >= 1, message="resync")
    mgr.cancel_task(NS, "good3", good3.version)
    wait_until(lambda: good3.descriptor in provider.terminations(), message="good3 terminated")
    assert metric(registry, SKIPPED) == len(expected)
    assert sorted(scheduler_skip_keys(caplog)) == sorted(expected)
    assert scheduler.running() == {NS: {good2.descriptor, planted.bad_run.descriptor}}


def test_a_scheduler_reports_a_corrupt_run_key_once_on_its_own_counter(
    schedulers: Schedulers,
    mgr: dt.Manager,
    client: dt.EtcdClient,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    task = mgr.add_task(NS, "bad-run", nodes=[NODE, "ghost", "other"])
    bad_key = mgr.keys.run(NS, "bad-run", "ghost")
    client.put(bad_key, b"junk")
    provider = RecordingProvider()
    schedulers.new(NODE, {NS: provider}, node_loss_grace=None)
    assert provider.starts() == [task.descriptor]
    # Every change to the task rebuilds it from its keys (here: another node completes).
    mgr.record_node_completion(NS, "bad-run", task.version, "other")
    mgr.record_progress(NS, "bad-run", task.version, NODE, 0.5)
    mgr.record_node_completion(NS, "bad-run", task.version, NODE)
    wait_until(lambda: task.descriptor in provider.terminations(), message="finished here")
    lines = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name == "distributedtask.scheduler"
        and repr(bad_key) in r.getMessage()
    ]
    assert len(lines) == 1  # the test's own Manager calls log it too, each time
    assert metric(registry, SKIPPED) == 1


def test_a_scheduler_skips_a_progress_key_with_a_huge_version(
    schedulers: Schedulers,
    mgr: dt.Manager,
    client: dt.EtcdClient,
    registry: CollectorRegistry,
) -> None:
    provider = RecordingProvider()
    schedulers.new(NODE, {NS: provider})
    client.put(mgr.keys.root + b"progress/ns/t/" + b"1" * 5000 + b"/node-1", b"{}")
    # The Scheduler lives on either way: a task added after the hostile key still starts.
    task = mgr.add_task(NS, "after", nodes=[NODE])
    wait_until(lambda: task.descriptor in provider.starts(), message="started after the key")
    assert metric(registry, "distributedtask_watch_restarts_total", reason="error") == 0
    assert metric(registry, SKIPPED) == 1


# ---- text etcd cannot carry ---------------------------------------------------------------------

UNDECODABLE = "cannot open /data/caf\udce9.txt"  # what os.fsdecode makes of a latin-1 file name


@pytest.mark.parametrize("call", ["failure", "progress"])
def test_an_error_message_with_a_lone_surrogate_is_stored_or_refused(
    mgr: dt.Manager, call: str
) -> None:
    task = mgr.add_task(NS, "t", nodes=[NODE])
    try:
        if call == "failure":
            mgr.record_node_failure(NS, "t", task.version, NODE, UNDECODABLE)
        else:
            mgr.record_progress(NS, "t", task.version, NODE, 0.5, UNDECODABLE)
    except dt.InvalidTaskError:
        return  # refused cleanly: acceptable
    if call == "failure":
        failed = mgr.get_task(NS, "t")
        assert failed is not None and failed.status is dt.TaskStatus.FAILED
        assert failed.error is not None and "cannot open /data/caf" in failed.error
    else:
        assert list(mgr.get_progress(NS, "t", task.version)) == [NODE]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_task_failing_with_an_undecodable_message_becomes_failed(
    schedulers: Schedulers, mgr: dt.Manager
) -> None:
    def fn(task: dt.Task, context: dt.TaskContext) -> None:
        raise OSError(UNDECODABLE)

    provider = dt.ThreadProvider(fn)
    schedulers.new(NODE, {NS: provider})
    task = mgr.add_task(NS, "t", nodes=[NODE])
    try:
        wait_until(
            lambda: mgr.get_task(NS, "t").status is dt.TaskStatus.FAILED,  # type: ignore[union-attr]
            timeout=3.0,
            message="the run is failed",
        )
    finally:
        provider.join(5.0)
    failed = mgr.get_task(NS, "t")
    assert failed is not None and failed.version == task.version
