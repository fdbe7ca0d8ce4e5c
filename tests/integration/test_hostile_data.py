"""Hostile data under our prefix (storage layout 2), on a real etcd: keys that are not ours in
every range a reader lists or watches, corrupt JSON, values of another format version (``"v":
1`` or ``"v": 3``), values of the wrong shape for each kind of key (task record, outcome, node
list, assignment, completion, progress, member), a node list that does not match its record's
``nodeCount``, a value at etcd's request-size limit, and payloads at and over the limits.
Readers skip what they cannot read with one log line and a counter; they never crash, and valid
tasks next to the garbage keep working, on the Manager and on a running Scheduler.

Who reads what (keys.py): the Manager lists ``P/cluster/tasks/``, ``P/cluster/outcomes/``,
``P/nodes/`` and the keys (not the values) of ``P/done/``; ``live_members`` lists
``P/cluster/members/``; ``get_progress`` one run's ``P/progress/<ns>/<id>/<version>/``. A
Scheduler watches ``P/cluster/`` and ``P/assign/<its bucket>/`` only. Nothing is planted under
the ranges of the 0.1 layout (``P/tasks/``, ``P/runs/``, ...): a key there makes the prefix one
of another layout (tests/integration/test_layout.py).

Units (the last sections): a unit task's declaration (``P/units/decl/``, zlib) is read with its
run — unreadable, it makes the run unreadable; claims (``P/units/run/<ns>/<id>/claim/``) are
read by ``get_units`` and the unit transitions, which skip what they cannot read; the pool
(``P/cluster/pool/``) is read by ``claim_unit`` and watched by every Scheduler, with the group
marks (``P/cluster/groups/``); a node's acknowledgements of groups are read by
``acked_groups``. The unit tests here count skips with ``Manager.skipped_records`` and the
Scheduler's metric (no log capture), so they also run with ``-p no:logging``.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from prometheus_client import CollectorRegistry
from tests.support import RecordingProvider, Schedulers, keys_under, metric

import distributedtask as dt
from distributedtask.etcd import txn
from distributedtask.exceptions import CorruptRecordError
from distributedtask.keys import BUCKETS, bucket_of, prefix_range_end
from distributedtask.model import Progress, UnitSpec, UnitStatus
from distributedtask.records import (
    INLINE_NODES,
    MAX_DECL_BYTES,
    DoneRecord,
    GroupMark,
    MemberRecord,
    NodeList,
    OutcomeRecord,
    PoolEntry,
    TaskRecord,
    UnitClaim,
    UnitDecl,
    encode_progress,
)
from distributedtask.testing import wait_until
from distributedtask.testing.proxy import TcpProxy

NS = "ns"
NODE = "node-1"
FILLER = [f"filler-{i:02d}" for i in range(INLINE_NODES)]  # makes a run too big to be inline
GHOST = "ghost"  # a node that never joins
BUCKET = bucket_of(NODE)  # the assignment bucket NODE's Scheduler watches
OTHER_BUCKET = (BUCKET + 1) % BUCKETS
MiB = 1024 * 1024
ETCD_MAX_REQUEST_BYTES = 3 * MiB // 2  # etcd's default --max-request-bytes (1.5 MiB)
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
SKIPPED = "distributedtask_skipped_records_total"

HEADER = orjson.loads(
    TaskRecord(payload=b"p", started_at=T0, node_count=1, token="x").encode().split(b"\n")[0]
)
NODES = orjson.loads(NodeList(frozenset({NODE})).encode())
OUTCOME = orjson.loads(OutcomeRecord(dt.TaskStatus.CANCELLED, T0, "x").encode())
DONE = orjson.loads(DoneRecord(1, T0, "x").encode())
MEMBER = orjson.loads(MemberRecord("member-1", frozenset({NS}), T0).encode())
PROGRESS = orjson.loads(encode_progress(Progress(0.5, "half", T0)))
# A whole task record of the 0.1 layout: one JSON object, the payload and nodes inside.
LAYOUT_1_RECORD = (
    b'{"v":1,"payload":"cA==","startedAt":1767323045000,"nodes":["node-1"],"token":"x"}'
)


def js(base: dict[str, object], **changes: object) -> bytes:
    return orjson.dumps({**base, **changes})


def without(base: dict[str, object], name: str) -> bytes:
    return orjson.dumps({k: v for k, v in base.items() if k != name})


def record(header: bytes) -> bytes:
    """A task record whose header line is ``header`` (payload ``p``)."""
    return header + b"\n" + b"p"


# Keys that are not ours, by the readers that meet them (suffixes after the prefix's root).
# Under P/cluster/tasks/ and P/cluster/outcomes/: listed by the Manager, watched by Schedulers.
FOREIGN_LISTED_AND_WATCHED = {
    b"cluster/tasks/only-one-segment": record(js(HEADER)),
    b"cluster/tasks/ns/x/extra": record(js(HEADER)),
    b"cluster/tasks/%zz/x": record(js(HEADER)),  # a bad escape
    b"cluster/tasks/ns/%61": record(js(HEADER)),  # "a", escaped where our keys never escape it
    b"cluster/tasks/\xff\xfe/x": record(js(HEADER)),  # not UTF-8
    b"cluster/tasks/ns/": record(js(HEADER)),  # empty id
    b"cluster/outcomes/ns": js(OUTCOME),
    b"cluster/outcomes/ns/x/extra": js(OUTCOME),
}
# Elsewhere under P/cluster/: watched by Schedulers only.
FOREIGN_WATCHED = {
    b"cluster/": b"x",
    b"cluster/tasks": b"x",
    b"cluster/foreign": b"hello",
}
# Under P/nodes/ and P/done/: listed by the Manager only (completions by their keys alone).
FOREIGN_LISTED = {
    b"nodes/ns": js(NODES),
    b"nodes/ns/x/extra": js(NODES),
    b"nodes/%zz/x": js(NODES),
    b"done/ns/good1": js(DONE),  # a completion key without its node
    b"done/ns/x/%2": js(DONE),
    b"done/ns/x/n/extra": js(DONE),
}
# Under ranges no reader lists or watches: ignored by everyone, never counted.
FOREIGN_UNREAD = {
    b"foreign": b"hello",
    b"cluster": b"not under cluster/",
    b"formats": b"{}",
    b"assign/40/ns/x": js(NODES),  # bucket 64: out of range
    b"assign/zz/ns/x": js(NODES),
    b"assign/%02x/ns/x" % OTHER_BUCKET: b"junk",  # another Scheduler's bucket
    b"progress/ns/good1/not-a-version/node-1": js(PROGRESS),
}
# Task records that cannot be read (each with a valid node list, and a valid assignment in
# NODE's bucket: an assignment does not make a run of an unreadable record).
CORRUPT_TASKS = {
    "bad-json": b"{not json\np",
    "empty": b"",
    "no-header-line": js(HEADER),
    "layout-1": LAYOUT_1_RECORD,
    "past": record(js(HEADER, v=1)),
    "future": record(js(HEADER, v=3)),
    "no-version": record(without(HEADER, "v")),
    "version-str": record(js(HEADER, v="2")),
    "array": b"[1, 2, 3]\np",
    "header-not-utf8": b"\xff\xfe\np",
    "count-str": record(js(HEADER, nodeCount="1")),
    "count-zero": record(js(HEADER, nodeCount=0)),
    "count-bool": record(js(HEADER, nodeCount=True)),
    "no-count": record(without(HEADER, "nodeCount")),
    "token-int": record(js(HEADER, token=5)),
    "time-str": record(js(HEADER, startedAt="2026-01-02T03:04:05Z")),
    "time-huge": record(js(HEADER, startedAt=2**62)),
    "version-bool": record(js(HEADER, version=True)),
    "version-zero": record(js(HEADER, version=0)),
    "at-the-limit": b"\xff",  # replaced by a value as large as etcd accepts, see plant()
}
# Outcome values that make their (valid) run unreadable. The Manager reports the task record's
# key (the run it skips); a Scheduler the outcome's.
CORRUPT_OUTCOMES = {
    "outcome-json": b"42",
    "outcome-past": js(OUTCOME, v=1),
    "outcome-future": js(OUTCOME, v=3),
    "outcome-started": js(OUTCOME, status="STARTED"),
    "outcome-status": js(OUTCOME, status="DONE"),
    "outcome-time": js(OUTCOME, finishedAt=None),
    "outcome-error": js(OUTCOME, error=["boom"]),
    "outcome-node": js(OUTCOME, status="FAILED", error="x", node="a\nb"),
    "outcome-record": record(js(HEADER)),  # a task record under the outcome key
}
# Node lists that make their (valid) run unreadable (None: no node list at all). The Manager
# reports the task record's key, but for a list that does not match the record's nodeCount (1):
# the node list's key. No Scheduler reads node lists.
CORRUPT_NODE_LISTS: dict[str, bytes | None] = {
    "nodes-json": b"{",
    "nodes-past": js(NODES, v=1),
    "nodes-future": js(NODES, v=3),
    "nodes-str": js(NODES, nodes=NODE),
    "nodes-empty": js(NODES, nodes=[]),
    "nodes-bad-name": js(NODES, nodes=["a\nb"]),
    "nodes-int": js(NODES, nodes=[1]),
    "nodes-null": b"null",
    "nodes-missing": None,
    "nodes-mismatch": js(NODES, nodes=[NODE, "node-2"]),
}
NODE_LIST_KEY_REPORTED = {"nodes-mismatch"}
# Assignments in NODE's bucket that its Scheduler cannot read, of runs added by the Manager
# (readable there: the Manager never reads assignments).
CORRUPT_ASSIGNMENTS = {
    "assign-json": b"{",
    "assign-past": js(NODES, v=1),
    "assign-future": js(NODES, v=3),
    "assign-str": js(NODES, nodes=NODE),
    "assign-empty": js(NODES, nodes=[]),
    "assign-null": b"null",
}
# Keys in NODE's bucket that are not ours (suffix after P/assign/<bucket>/).
FOREIGN_IN_BUCKET = {
    b"ns": js(NODES),
    b"ns/": js(NODES),
    b"ns/x/extra": js(NODES),
    b"%zz/x": js(NODES),
}
# Under P/cluster/members/: read by live_members and watched by Schedulers.
CORRUPT_MEMBERS = {
    b"ghost": b"junk",
    b"past": js(MEMBER, v=1, node="past"),
    b"future": js(MEMBER, v=3, node="future"),
    b"ns-str": js(MEMBER, node="ns-str", namespaces=NS),
    b"null": b"null",
    b"bad-node": js(MEMBER, node=""),
    b"someone-else": js(MEMBER),  # member-1's record under another node's key
    b"a/b": b"{}",  # not a key of ours either
}
# Under the progress prefix of good1's version (key suffix after ".../<version>/").
CORRUPT_PROGRESS = {
    b"node-2": b"{",
    b"node-3": js(PROGRESS, v=1),
    b"node-4": js(PROGRESS, v=3),
    b"node-5": js(PROGRESS, fraction="half"),
    b"node-6": js(PROGRESS, fraction=2),
    b"node-7": b"null",
}


@dataclass
class Planted:
    """What :func:`plant` wrote, and what readers should make of it."""

    good: list[dt.Task]  # good1, good2
    bad_done: dt.Task  # a valid task whose second node's completion value is garbage
    bad_done_key: bytes
    listed: list[str] = field(default_factory=list)  # the ids list_tasks returns, sorted
    listing_skips: set[bytes] = field(default_factory=set)  # the keys list_tasks reports
    unreadable_ids: list[str] = field(default_factory=list)  # get_task raises for these
    unassigned: list[dt.Task] = field(default_factory=list)  # their assignment is garbage
    scheduler_skips: set[bytes] = field(default_factory=set)  # NODE's Scheduler, at start
    member_keys: set[bytes] = field(default_factory=set)
    progress_keys: set[bytes] = field(default_factory=set)


def largest_value(key: bytes) -> int:
    """The largest value etcd (default limits) takes for a put of ``key``: measured, 69 bytes
    of request overhead with a 45-byte key; we leave a margin of 256 bytes for other keys."""
    return ETCD_MAX_REQUEST_BYTES - len(key) - 256


def plant(manager: dt.Manager, client: dt.EtcdClient, *, big_payload: bytes = b"") -> Planted:
    """Two good tasks (good2 carrying ``big_payload``), a task with a corrupt completion value,
    and every kind of garbage above, written straight to etcd."""
    keys = manager.keys
    root = keys.root
    good1 = manager.add_task(NS, "good1", b"one", nodes=[NODE])  # writes the layout marker
    good2 = manager.add_task(NS, "good2", big_payload, nodes=[NODE])
    bad_done = manager.add_task(NS, "bad-done", b"r", nodes=[NODE, GHOST])
    bad_done_key = keys.done(NS, "bad-done", GHOST)
    client.put(bad_done_key, b'"a string"')  # never listed: completions are listed by key
    planted = Planted([good1, good2], bad_done, bad_done_key, ["bad-done", "good1", "good2"])
    for suffix, value in FOREIGN_LISTED_AND_WATCHED.items():
        client.put(root + suffix, value)
        planted.listing_skips.add(root + suffix)
        planted.scheduler_skips.add(root + suffix)
    for suffix, value in FOREIGN_WATCHED.items():
        client.put(root + suffix, value)
        planted.scheduler_skips.add(root + suffix)
    for suffix, value in FOREIGN_LISTED.items():
        client.put(root + suffix, value)
        planted.listing_skips.add(root + suffix)
    for suffix, value in FOREIGN_UNREAD.items():
        client.put(root + suffix, value)
    for task_id, value in CORRUPT_TASKS.items():
        key = keys.task(NS, task_id)
        at_the_limit = b"\xff" * largest_value(key) if task_id == "at-the-limit" else None
        client.put(key, value if at_the_limit is None else at_the_limit)
        client.put(keys.nodes(NS, task_id), js(NODES))
        client.put(keys.assign(BUCKET, NS, task_id), js(NODES))
        planted.listing_skips.add(key)
        planted.scheduler_skips.add(key)
        planted.unreadable_ids.append(task_id)
    for task_id, value in CORRUPT_OUTCOMES.items():
        client.put(keys.task(NS, task_id), record(js(HEADER)))
        client.put(keys.nodes(NS, task_id), js(NODES))
        client.put(keys.outcome(NS, task_id), value)
        planted.listing_skips.add(keys.task(NS, task_id))
        planted.scheduler_skips.add(keys.outcome(NS, task_id))
        planted.unreadable_ids.append(task_id)
    for task_id, nodes in CORRUPT_NODE_LISTS.items():
        client.put(keys.task(NS, task_id), record(js(HEADER)))
        if nodes is not None:
            client.put(keys.nodes(NS, task_id), nodes)
        reported = NODE_LIST_KEY_REPORTED
        planted.listing_skips.add((keys.nodes if task_id in reported else keys.task)(NS, task_id))
        planted.unreadable_ids.append(task_id)
    for task_id, value in CORRUPT_ASSIGNMENTS.items():
        # more nodes than a record carries: the Scheduler learns its nodes from assignments
        planted.unassigned.append(manager.add_task(NS, task_id, nodes=[NODE, *FILLER]))
        client.put(keys.assign(BUCKET, NS, task_id), value)
        planted.scheduler_skips.add(keys.assign(BUCKET, NS, task_id))
        planted.listed.append(task_id)
    planted.listed.sort()
    for suffix, value in FOREIGN_IN_BUCKET.items():
        client.put(keys.bucket(BUCKET) + suffix, value)
        planted.scheduler_skips.add(keys.bucket(BUCKET) + suffix)
    # Orphans: well-formed keys of a run that does not exist, and a completion of a node that
    # is not one of the run's. Ignored, not counted.
    client.put(keys.outcome(NS, "orphan"), js(OUTCOME))
    client.put(keys.nodes(NS, "orphan"), js(NODES))
    client.put(keys.assign(BUCKET, NS, "orphan"), js(NODES))
    client.put(keys.done(NS, "orphan", NODE), js(DONE))
    client.put(keys.done(NS, "good1", "stranger"), js(DONE))
    # Membership: one valid record (no lease: it stays) and garbage.
    client.put(keys.member("member-1"), js(MEMBER))
    for suffix, value in CORRUPT_MEMBERS.items():
        client.put(keys.all_members() + suffix, value)
        planted.member_keys.add(keys.all_members() + suffix)
        planted.scheduler_skips.add(keys.all_members() + suffix)
    # Progress of good1: one valid report, garbage, and a key that is not ours.
    manager.record_progress(NS, "good1", good1.version, NODE, 0.5, "half")
    version_prefix = keys.version_progress(NS, "good1", good1.version)
    for suffix, value in CORRUPT_PROGRESS.items():
        client.put(version_prefix + suffix, value)
        planted.progress_keys.add(version_prefix + suffix)
    client.put(version_prefix + b"%zz", js(PROGRESS))  # not ours: ignored
    return planted


def skip_lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == logger and r.levelno == logging.WARNING and "skipping" in r.getMessage()
    ]


def manager_skipped_keys(caplog: pytest.LogCaptureFixture) -> list[bytes]:
    """The key of each skip line of the Manager (its last log argument)."""
    return [r.args[-1] for r in skip_lines(caplog, "distributedtask.manager")]  # type: ignore[index,misc]


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
    assert list(listed) == [NS]
    assert [t.id for t in listed[NS]] == planted.listed
    assert listed[NS] == [mgr.get_task(NS, task_id) for task_id in planted.listed]
    by_id = {t.id: t for t in listed[NS]}
    assert by_id["good1"] == planted.good[0]  # untouched by the garbage around it
    assert by_id["good1"].finished_nodes == frozenset()  # "stranger" is not one of its nodes
    bad_done = by_id["bad-done"]
    assert bad_done.status is dt.TaskStatus.STARTED
    assert bad_done.finished_nodes == {GHOST}  # a completion by its key; its value is not read
    # Each unreadable value: one log line naming its key, one count; get_task, which reads
    # nothing unreadable here, adds none.
    assert mgr.skipped_records - before == len(planted.listing_skips)
    assert sorted(manager_skipped_keys(caplog)) == sorted(planted.listing_skips)
    # The same through the JSON payload (the CLI's and snapshot()'s view).
    payload = orjson.loads(mgr.list_tasks_payload())
    assert [item["ID"] for item in payload["tasks"][NS]] == planted.listed


def test_get_task_of_an_unreadable_record_raises_corrupt_record_error(
    mgr: dt.Manager, client: dt.EtcdClient
) -> None:
    """Documented in Manager.get_task: a run it cannot read (record, outcome or node list) is
    a CorruptRecordError (a DistributedTaskError), not a crash; the valid tasks next to it, the
    runs whose assignment is garbage included, read fine."""
    planted = plant(mgr, client)
    for task_id in planted.unreadable_ids:
        with pytest.raises(CorruptRecordError):
            mgr.get_task(NS, task_id)
    for task in [*planted.good, planted.bad_done, *planted.unassigned]:
        current = mgr.get_task(NS, task.id)
        assert current is not None and current.version == task.version
    assert mgr.get_task(NS, "good1") == planted.good[0]
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
    # The task with a corrupt completion still ends: the node whose value is garbage fails it.
    failed = mgr.record_node_failure(NS, "bad-done", planted.bad_done.version, GHOST, "x")
    assert failed.status is dt.TaskStatus.FAILED
    assert (failed.error, failed.failed_node) == ("x", GHOST)
    # An unreadable record or outcome does not block its id: a new add replaces the run.
    for task_id in ["bad-json", "layout-1", "at-the-limit", "outcome-future"]:
        fresh = mgr.add_task(NS, task_id, b"new", nodes=[NODE])
        assert mgr.get_task(NS, task_id) == fresh
    # A run whose assignment is garbage is a valid run to the Manager.
    unassigned = planted.unassigned[0]
    for node in [*FILLER, NODE]:
        done = mgr.record_node_completion(NS, unassigned.id, unassigned.version, node)
    assert done.status is dt.TaskStatus.FINISHED


def test_a_corrupt_completion_value_counts_by_its_key_and_is_skipped_where_it_is_read(
    mgr: dt.Manager, client: dt.EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    """FINDING: completions are counted by their keys (readmodel.py: ``finished_nodes`` are the
    nodes with a completion key; the completer counts keys to decide FINISHED), so a garbage
    value at a well-formed completion key counts as that node's completion for the listing and
    for FINISHED; only ``completed_by`` (a Scheduler's own completions at start, a decider's
    look at a lost node's work) reads the value, and skips it as not completed."""
    task = mgr.add_task(NS, "t", nodes=[NODE, GHOST])
    key = mgr.keys.done(NS, "t", GHOST)
    client.put(key, b'"a string"')
    caplog.set_level(logging.WARNING)
    before = mgr.skipped_records
    listed = mgr.get_task(NS, "t")
    assert listed is not None and listed.finished_nodes == {GHOST}
    assert mgr.list_tasks() == {NS: [listed]}
    assert mgr.skipped_records == before
    assert mgr.completed_by(GHOST, [(NS, "t", task.version)]) == set()
    assert mgr.skipped_records - before == 1
    assert manager_skipped_keys(caplog) == [key]
    done = mgr.record_node_completion(NS, "t", task.version, NODE)
    assert done.status is dt.TaskStatus.FINISHED and done.finished_nodes == {NODE, GHOST}


def test_a_run_whose_node_list_is_unreadable_can_be_cancelled_and_replaced(
    mgr: dt.Manager, client: dt.EtcdClient
) -> None:
    """A valid record whose node list is garbage keeps its id busy (it is STARTED: the add
    says so, with its version); cancelling that version ends it, and the id is free again.

    The cancel cannot return the run (it cannot be assembled): it raises CorruptRecordError
    saying the run is now CANCELLED, as ``cancel_task`` documents."""
    keys = mgr.keys
    version = client.put(keys.task(NS, "t"), record(js(HEADER)))
    client.put(keys.nodes(NS, "t"), js(NODES, nodes=[NODE, "node-2"]))  # nodeCount is 1
    with pytest.raises(dt.TaskAlreadyRunningError) as info:
        mgr.add_task(NS, "t", nodes=[NODE])
    assert info.value.version == version
    with pytest.raises(CorruptRecordError, match="is now CANCELLED, but it cannot be read back"):
        mgr.cancel_task(NS, "t", version)
    outcome = client.range(keys.outcome(NS, "t")).first()
    assert outcome is not None
    assert OutcomeRecord.decode(outcome.value).status is dt.TaskStatus.CANCELLED
    fresh = mgr.add_task(NS, "t", b"new", nodes=[NODE])
    assert mgr.get_task(NS, "t") == fresh


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
            manager.add_task(NS, "too-big", bytearray(MiB + 1), nodes=[NODE])  # type: ignore[arg-type]
        assert etcd_proxy.requests == 0
    assert keys_under(client, dtask_prefix) == []  # not even the layout marker


def test_a_payload_of_exactly_max_payload_bytes_works_end_to_end(
    etcd_proxy: TcpProxy, dtask_prefix: str
) -> None:
    payload = bytes(range(256)) * (MiB // 256)  # newlines and every other byte included
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=5.0) as proxied:
        manager = dt.Manager(proxied, prefix=dtask_prefix)
        manager.ensure_format()  # the first add on a fresh prefix also writes the marker
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


def test_a_payload_above_max_payload_bytes_that_etcd_takes_is_stored_raw(
    client: dt.EtcdClient, dtask_prefix: str
) -> None:
    """With ``max_payload_bytes`` raised, a payload as large as etcd's request limit allows
    (less the header, node list and assignment) is stored: the record holds it raw, not in
    base64 (layout 0.1 refused this size)."""
    manager = dt.Manager(client, prefix=dtask_prefix, max_payload_bytes=2 * MiB)
    payload = b"\n" * 1_500_000
    task = manager.add_task(NS, "large", payload, nodes=[NODE])
    assert manager.get_task(NS, "large") == task and task.payload == payload


@pytest.mark.parametrize("size", [1_600_000, 1_900_000])
def test_a_payload_etcd_cannot_take_fails_with_etcd_error_and_writes_nothing(
    client: dt.EtcdClient, dtask_prefix: str, size: int
) -> None:
    """FINDING: with ``max_payload_bytes`` above what etcd takes (a 1.5 MiB request), add_task
    sends the request and etcd refuses it: ``EtcdError('etcd refused the request: etcdserver:
    request is too large')``, code 3 (INVALID_ARGUMENT), not an InvalidTaskError before
    sending. Nothing is written, not even the layout marker."""
    manager = dt.Manager(client, prefix=dtask_prefix, max_payload_bytes=4 * MiB)
    with pytest.raises(dt.EtcdError, match="request is too large") as info:
        manager.add_task(NS, "huge", b"\0" * size, nodes=[NODE])
    assert info.value.code == 3 and not info.value.transient
    assert keys_under(client, dtask_prefix) == []


def test_a_request_over_grpcs_limit_is_not_retried(etcd_proxy: TcpProxy, dtask_prefix: str) -> None:
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=1.0) as proxied:
        manager = dt.Manager(proxied, prefix=dtask_prefix, max_payload_bytes=4 * MiB)
        etcd_proxy.reset_counts()
        with pytest.raises(dt.EtcdError, match="larger than max") as info:
            manager.add_task(NS, "huge", b"\0" * (5 * MiB // 2), nodes=[NODE])
        assert info.value.code == 8
        assert etcd_proxy.requests == 1


# ---- a running Scheduler ------------------------------------------------------------------------


def scheduler_skip_keys(caplog: pytest.LogCaptureFixture) -> list[bytes]:
    return [r.args[0] for r in skip_lines(caplog, "distributedtask.scheduler")]  # type: ignore[index,misc]


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
    # node_loss_grace=None: GHOST, the second node of bad-done, never joins.
    scheduler = schedulers.new(NODE, {NS: provider}, node_loss_grace=None)
    good1, good2 = planted.good
    wanted = {good1.descriptor, good2.descriptor, planted.bad_done.descriptor}
    assert set(provider.starts()) == wanted and len(provider.starts()) == 3
    assert provider.started_task(good2.descriptor).payload == big
    assert scheduler.running() == {NS: wanted}  # not the runs whose assignment is garbage

    # What the first listing read: P/cluster/ and NODE's bucket (not nodes/, done/, progress/,
    # other buckets, nor the keys outside those ranges).
    assert metric(registry, SKIPPED) == len(planted.scheduler_skips)
    assert sorted(scheduler_skip_keys(caplog)) == sorted(planted.scheduler_skips)

    # Garbage arriving through the watches: counted once per key, even when rewritten.
    keys = mgr.keys
    late_seen = {
        keys.cluster + b"foreign-late": b"x",
        keys.task(NS, "late-bad"): b"{",
        keys.outcome(NS, "good2"): b"[]",  # good2's run becomes unreadable: it keeps running
        keys.member("late"): b"[]",
        keys.assign(BUCKET, NS, "late-assign"): b"{",
        keys.bucket(BUCKET) + b"late/x/y": b"{}",
    }
    late_unseen = {  # in ranges no Scheduler watches
        keys.root + b"foreign-late": b"x",
        keys.progress(NS, "good1", good1.version, NODE): b"{",
        keys.done(NS, "late-done", NODE): b"{",
        keys.nodes(NS, "late-nodes"): b"{",
        keys.assign(OTHER_BUCKET, NS, "late-assign"): b"{",
    }
    for key, value in {**late_seen, **late_unseen}.items():
        client.put(key, value)
    client.put(keys.task(NS, "late-bad"), record(js(HEADER, v=3)))  # rewritten: not counted again
    client.put(keys.assign(BUCKET, NS, "late-assign"), b"[]")  # the same
    # ... while good tasks keep flowing: a new one starts, a cancelled one is terminated.
    good3 = mgr.add_task(NS, "good3", b"three", nodes=[NODE])
    wait_until(lambda: good3.descriptor in provider.starts(), message="good3 started")
    mgr.cancel_task(NS, "good1", good1.version)
    wait_until(lambda: good1.descriptor in provider.terminations(), message="good1 terminated")
    expected = planted.scheduler_skips | set(late_seen)
    wait_until(lambda: metric(registry, SKIPPED) == len(expected), message="late garbage counted")
    assert sorted(scheduler_skip_keys(caplog)) == sorted(expected)  # one line per key
    assert metric(registry, "distributedtask_watch_restarts_total", reason="error") == 0

    # A full resync reads everything again: nothing is counted or logged twice.
    for watch in scheduler._watches:
        watch.resync()
    wait_until(lambda: metric(registry, "distributedtask_resyncs_total") >= 2, message="resync")
    mgr.cancel_task(NS, "good3", good3.version)  # through the cluster watch, after its snapshot
    good4 = mgr.add_task(NS, "good4", nodes=[NODE])  # through both watches
    wait_until(lambda: good3.descriptor in provider.terminations(), message="good3 terminated")
    wait_until(lambda: good4.descriptor in provider.starts(), message="good4 started")
    assert metric(registry, SKIPPED) == len(expected)
    assert sorted(scheduler_skip_keys(caplog)) == sorted(expected)
    assert scheduler.running() == {
        NS: {good2.descriptor, planted.bad_done.descriptor, good4.descriptor}
    }
    assert len(provider.starts()) == 5  # nothing started twice


def test_a_scheduler_reports_a_corrupt_assignment_once_on_its_own_counter(
    schedulers: Schedulers,
    mgr: dt.Manager,
    client: dt.EtcdClient,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    other = "other"
    assert bucket_of(other) != BUCKET
    task = mgr.add_task(NS, "bad-assign", nodes=[NODE, other, *FILLER])
    for node in FILLER:
        mgr.record_node_completion(NS, "bad-assign", task.version, node)
    bad_key = mgr.keys.assign(BUCKET, NS, "bad-assign")
    client.put(bad_key, b"junk")
    good = mgr.add_task(NS, "good", nodes=[NODE])
    provider = RecordingProvider()
    schedulers.new(NODE, {NS: provider}, node_loss_grace=None)
    assert provider.starts() == [good.descriptor]  # NODE cannot tell it is one of bad-assign's
    # Every change to the run touches it again (here: its nodes complete, the Manager's way,
    # and its assignment is rewritten with other garbage); a task added after, in the same
    # bucket, starts once all that went through the watches.
    mgr.record_node_completion(NS, "bad-assign", task.version, other)
    client.put(bad_key, orjson.dumps({"v": 3, "nodes": [NODE]}))
    mgr.record_node_completion(NS, "bad-assign", task.version, NODE)
    later = mgr.add_task(NS, "later", nodes=[NODE])
    wait_until(lambda: later.descriptor in provider.starts(), message="later started")
    # A new run of the id writes a readable assignment: NODE runs it.
    again = mgr.add_task(NS, "bad-assign", nodes=[NODE, other, *FILLER])
    wait_until(lambda: again.descriptor in provider.starts(), message="the new run started")
    lines = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name == "distributedtask.scheduler"
        and repr(bad_key) in r.getMessage()
    ]
    assert len(lines) == 1
    assert metric(registry, SKIPPED) == 1
    assert provider.starts() == [good.descriptor, later.descriptor, again.descriptor]


def test_a_scheduler_skips_a_key_with_a_huge_version_or_name(
    schedulers: Schedulers,
    mgr: dt.Manager,
    client: dt.EtcdClient,
    registry: CollectorRegistry,
) -> None:
    """A progress key with a 5000-digit version is in no range a Scheduler watches (it is not
    counted); a 5000-character name in its bucket is counted once. Either way the Scheduler
    lives on, and get_progress of the task is unaffected."""
    provider = RecordingProvider()
    schedulers.new(NODE, {NS: provider})
    task = mgr.add_task(NS, "t", nodes=[NODE])
    wait_until(lambda: task.descriptor in provider.starts(), message="started")
    mgr.record_progress(NS, "t", task.version, NODE, 0.5)
    client.put(mgr.keys.task_progress(NS, "t") + b"1" * 5000 + b"/node-1", b"{}")
    client.put(mgr.keys.bucket(BUCKET) + b"ns/" + b"1" * 5000, b"{}")
    # The Scheduler lives on: a task added after the hostile keys still starts.
    after = mgr.add_task(NS, "after", nodes=[NODE])
    wait_until(lambda: after.descriptor in provider.starts(), message="started after the keys")
    assert metric(registry, "distributedtask_watch_restarts_total", reason="error") == 0
    assert metric(registry, SKIPPED) == 1
    assert list(mgr.get_progress(NS, "t", task.version)) == [NODE]


# ---- text etcd cannot carry ---------------------------------------------------------------------

UNDECODABLE = "cannot open /data/caf\udce9.txt"  # what os.fsdecode makes of a latin-1 file name
STORED = "cannot open /data/caf?.txt"  # the lone surrogate replaced


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
        assert (failed.error, failed.failed_node) == (STORED, NODE)
    else:
        progress = mgr.get_progress(NS, "t", task.version)
        assert list(progress) == [NODE] and progress[NODE].message == STORED


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
            message="the run is failed",
        )
    finally:
        provider.join(5.0)
    failed = mgr.get_task(NS, "t")
    assert failed is not None and failed.version == task.version
    assert (failed.error, failed.failed_node) == (STORED, NODE)


# ---- units: declarations ------------------------------------------------------------------------

UNITS = ["a", "b", "c"]
CLAIM = orjson.loads(UnitClaim(1, UnitStatus.IN_PROGRESS, NODE, 0, "x").encode())
POOL = orjson.loads(PoolEntry(1, 0, T0).encode())
MARK = orjson.loads(GroupMark(1, T0).encode())


def compressed(data: object) -> bytes:
    return zlib.compress(orjson.dumps(data))


def inflating_past_the_limit() -> bytes:
    """zlib data that inflates to more than MAX_DECL_BYTES (about 64 KiB of it)."""
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(b'{"v":2,"units":[')]
    chunk = b" " * (1 << 20)
    parts += [compressor.compress(chunk) for _ in range(MAX_DECL_BYTES // len(chunk) + 1)]
    parts.append(compressor.flush())
    return b"".join(parts)


# Declarations that make their unit task (added by the Manager: a record of 3 units) unreadable;
# None: the declaration is deleted. The listing reports the task record's key, but for a
# declaration that does not match the record's count of units: the declaration's key.
CORRUPT_DECLS: dict[str, bytes | None] = {
    "decl-missing": None,
    "decl-empty": b"",
    "decl-not-zlib": orjson.dumps({"v": 2, "units": [[u, ""] for u in UNITS]}),
    "decl-truncated": UnitDecl(tuple(UnitSpec(u) for u in UNITS)).encode()[:12],
    "decl-json": zlib.compress(b"{"),
    "decl-null": zlib.compress(b"null"),
    "decl-past": compressed({"v": 1, "units": [[u, ""] for u in UNITS]}),
    "decl-future": compressed({"v": 3, "units": [[u, ""] for u in UNITS]}),
    "decl-rows": compressed({"v": 2, "units": "a,b,c"}),
    "decl-row": compressed({"v": 2, "units": [["a", ""], ["b", 5], ["c", ""]]}),
    "decl-name": compressed({"v": 2, "units": [["a", ""], ["b\n", ""], ["c", ""]]}),
    "decl-twice": compressed({"v": 2, "units": [["a", ""], ["b", ""], ["a", ""]]}),
    "decl-bomb": inflating_past_the_limit(),
    "decl-mismatch": UnitDecl((UnitSpec("a"), UnitSpec("b"))).encode(),
}
DECL_KEY_REPORTED = {"decl-mismatch"}


def plant_unit_tasks(mgr: dt.Manager, client: dt.EtcdClient) -> dict[str, bytes]:
    """A good unit task and one per CORRUPT_DECLS; returns the key list_tasks reports for each
    corrupt one."""
    keys = mgr.keys
    mgr.add_task(NS, "good-units", nodes=[NODE], units=UNITS)
    reported = {}
    for task_id, value in CORRUPT_DECLS.items():
        mgr.add_task(NS, task_id, nodes=[NODE], units=UNITS)
        decl_key = keys.unit_decl(NS, task_id)
        if value is None:
            client.txn(success=[txn.delete(decl_key)])
        else:
            client.put(decl_key, value)
        reported[task_id] = decl_key if task_id in DECL_KEY_REPORTED else keys.task(NS, task_id)
    return reported


def test_a_unit_task_with_an_unreadable_declaration_is_unreadable_and_skipped(
    mgr: dt.Manager, client: dt.EtcdClient, dtask_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported = plant_unit_tasks(mgr, client)
    other = dt.Manager(client, prefix=dtask_prefix)  # another process: nothing cached
    for task_id in CORRUPT_DECLS:
        with pytest.raises(CorruptRecordError):
            other.get_task(NS, task_id)
    skipped: list[bytes] = []
    monkeypatch.setattr(other, "_skip", lambda key, exc: skipped.append(key))
    listed = other.list_tasks()
    assert [t.id for t in listed[NS]] == ["good-units"]
    assert listed[NS][0].units == tuple(UnitSpec(u) for u in UNITS)
    assert sorted(skipped) == sorted(reported.values())  # each run once, by the key to blame
    payload = orjson.loads(other.snapshot())
    assert [item["ID"] for item in payload["tasks"][NS]] == ["good-units"]


@pytest.mark.parametrize("task_id", sorted(CORRUPT_DECLS))
def test_unit_calls_on_a_run_with_an_unreadable_declaration_raise_our_errors(
    mgr: dt.Manager, client: dt.EtcdClient, dtask_prefix: str, task_id: str
) -> None:
    """A Manager that did not add the run (another process) cannot claim or record its units:
    CorruptRecordError, nothing written. ``get_units`` reads the run with the read model's
    checks: CorruptRecordError too (a missing declaration, one that does not match the
    record's count of units)."""
    task = mgr.add_task(NS, task_id, nodes=[NODE], units=UNITS)
    value = CORRUPT_DECLS[task_id]
    decl_key = mgr.keys.unit_decl(NS, task_id)
    if value is None:
        client.txn(success=[txn.delete(decl_key)])
    else:
        client.put(decl_key, value)
    other = dt.Manager(client, prefix=dtask_prefix)
    with pytest.raises(CorruptRecordError):
        other.claim_unit(NS, task_id, task.version, NODE)
    with pytest.raises(CorruptRecordError):
        other.record_unit_completion(NS, task_id, task.version, "a", NODE)
    with pytest.raises(CorruptRecordError):
        other.record_unit_failure(NS, task_id, task.version, "a", NODE, "x")
    with pytest.raises(CorruptRecordError):
        other.get_units(NS, task_id, task.version)
    assert unit_run_keys(client, other, task_id) == []  # no claim, no ticket


def unit_run_keys(client: dt.EtcdClient, manager: dt.Manager, task_id: str) -> list[bytes]:
    """The keys under ``P/units/run/<ns>/<task_id>/``."""
    prefix = manager.keys.unit_run(NS, task_id)
    return [kv.key for kv in client.range(prefix, prefix_range_end(prefix), keys_only=True).kvs]


def test_a_unit_task_with_an_unreadable_declaration_can_be_cancelled_and_replaced(
    mgr: dt.Manager, client: dt.EtcdClient, dtask_prefix: str
) -> None:
    task = mgr.add_task(NS, "t", nodes=[NODE], units=UNITS)
    client.put(mgr.keys.unit_decl(NS, "t"), b"garbage")
    other = dt.Manager(client, prefix=dtask_prefix)
    with pytest.raises(dt.TaskAlreadyRunningError):
        other.add_task(NS, "t", nodes=[NODE], units=UNITS)
    with pytest.raises(CorruptRecordError, match="is now CANCELLED, but it cannot be read back"):
        other.cancel_task(NS, "t", task.version)
    fresh = other.add_task(NS, "t", nodes=[NODE], units=["x"])
    assert other.get_task(NS, "t") == fresh and fresh.units == (UnitSpec("x"),)
    unit = other.claim_unit(NS, "t", fresh.version, NODE)
    assert unit is not None and unit.id == "x"
    done = other.record_unit_completion(NS, "t", fresh.version, "x", NODE)
    assert done.status is dt.TaskStatus.FINISHED


# ---- units: claims ------------------------------------------------------------------------------

CORRUPT_CLAIMS = {
    "b": b"{",
    "d": js(CLAIM, v=3),
    "e": js(CLAIM, status="DONE"),
    "f": js(CLAIM, attempts=-1),
    "g": b"null",
}


def test_unreadable_claims_are_skipped_and_their_units_never_handed_out(
    mgr: dt.Manager, client: dt.EtcdClient
) -> None:
    """A claim value that cannot be read is skipped (counted) wherever it is read: get_units
    shows its unit PENDING and unclaimed; claim_unit hands out the other units (a claim key
    exists, so the unit is never claimed again); only the claimant records a unit, and nobody
    holds these: UnitClaimError. The run cannot finish, and can be cancelled."""
    declared = ["a", *CORRUPT_CLAIMS, "h"]
    task = mgr.add_task(NS, "t", nodes=[NODE, "node-2"], units=declared)
    keys = mgr.keys
    for unit, value in CORRUPT_CLAIMS.items():
        client.put(keys.unit_claim(NS, "t", unit), value)
    client.put(keys.unit_claims(NS, "t") + b"%zz", js(CLAIM))  # not a unit's key: ignored
    before = mgr.skipped_records
    units = mgr.get_units(NS, "t", task.version)
    assert list(units) == declared
    for unit in CORRUPT_CLAIMS:
        assert (units[unit].status, units[unit].node) == (UnitStatus.PENDING, None)
    assert mgr.skipped_records - before == len(CORRUPT_CLAIMS)

    claimed = []
    while (got := mgr.claim_unit(NS, "t", task.version, NODE)) is not None:
        claimed.append(got.id)
    assert claimed == ["a", "h"]
    assert mgr.claim_unit(NS, "t", task.version, "node-2") is None
    for unit in CORRUPT_CLAIMS:
        with pytest.raises(dt.UnitClaimError):
            mgr.record_unit_completion(NS, "t", task.version, unit, NODE)
        with pytest.raises(dt.UnitClaimError):
            mgr.record_unit_failure(NS, "t", task.version, unit, NODE, "x")
    for unit in claimed:
        after = mgr.record_unit_completion(NS, "t", task.version, unit, NODE)
    assert after.status is dt.TaskStatus.STARTED
    assert mgr.cancel_task(NS, "t", task.version).status is dt.TaskStatus.CANCELLED


def test_a_claim_overwritten_with_garbage_while_held_cannot_be_recorded(
    mgr: dt.Manager, client: dt.EtcdClient, dtask_prefix: str
) -> None:
    task = mgr.add_task(NS, "t", nodes=[NODE], units=["a", "b"])
    unit = mgr.claim_unit(NS, "t", task.version, NODE)
    assert unit is not None and unit.id == "a"
    client.put(mgr.keys.unit_claim(NS, "t", "a"), b"[]")
    with pytest.raises(dt.UnitClaimError):
        mgr.record_unit_completion(NS, "t", task.version, "a", NODE)  # its claim, remembered
    other = dt.Manager(client, prefix=dtask_prefix)
    with pytest.raises(dt.UnitClaimError):
        other.record_unit_completion(NS, "t", task.version, "a", NODE)  # its claim, read
    # The held units of the node (a restart's view) skip it too; the other unit works.
    assert other.units.held(NS, "t", task.version, NODE) == []
    second = other.claim_unit(NS, "t", task.version, NODE)
    assert second is not None and second.id == "b"
    assert other.record_unit_completion(NS, "t", task.version, "b", NODE).status is (
        dt.TaskStatus.STARTED
    )


def test_unreadable_unit_progress_and_acknowledgements_are_skipped(
    mgr: dt.Manager, client: dt.EtcdClient
) -> None:
    task = mgr.add_task(NS, "t", nodes=[NODE], units=[UnitSpec("a", "g1"), UnitSpec("b", "g2")])
    keys = mgr.keys
    mgr.record_unit_progress(NS, "t", task.version, "a", NODE, 0.5, "half")
    client.put(keys.unit_progress(NS, "t", "b"), js(PROGRESS, fraction=2))
    client.put(keys.unit_progresses(NS, "t") + b"%zz", js(PROGRESS))  # not a unit's: ignored
    before = mgr.skipped_records
    units = mgr.get_units(NS, "t", task.version)
    progress = units["a"].progress
    assert progress is not None and progress.message == "half"
    assert units["b"].progress is None
    assert mgr.skipped_records - before == 1

    mgr.units.ack_group(NS, "t", task.version, NODE, "g1")
    client.put(keys.group_ack(NS, "t", NODE, "g2"), b"{")
    client.put(keys.group_ack(NS, "t", NODE, ""), js(MARK, version=task.version + 1))  # stale
    client.put(keys.group_acks(NS, "t", NODE) + b"g3", js(MARK, version=task.version))  # no "="
    before = mgr.skipped_records
    assert mgr.units.acked_groups(NS, "t", task.version, NODE) == {"g1"}
    assert mgr.skipped_records - before == 1


# ---- units: the pool and group marks ------------------------------------------------------------


def test_claim_unit_skips_garbage_in_the_pool(mgr: dt.Manager, client: dt.EtcdClient) -> None:
    policy = dt.RunPolicy(max_attempts=2, retry_backoff=timedelta(0))
    task = mgr.add_task(NS, "t", nodes=[NODE], units=["a", "b"], policy=policy)
    keys = mgr.keys
    client.put(keys.pool(NS, "t", "a"), b"{")  # unreadable: skipped, counted
    client.put(keys.pool(NS, "t", "b"), js(POOL, version=task.version))  # no PENDING claim
    client.put(keys.pool(NS, "t", "ghost"), js(POOL, version=task.version))  # not declared
    client.put(keys.pool(NS, "t", "c"), js(POOL, version=task.version + 1))  # another run's
    client.put(keys.task_pool(NS, "t") + b"%zz", js(POOL, version=task.version))  # not ours
    client.put(keys.task_pool(NS, "t") + b"a/b", js(POOL, version=task.version))  # not ours
    before = mgr.skipped_records
    first = mgr.claim_unit(NS, "t", task.version, NODE)
    assert first is not None and first.id == "a"  # by ticket: no pool entry was claimable
    assert mgr.skipped_records - before == 1
    assert mgr.units.read_pool(NS, "t", task.version) != []  # "b", which cannot be claimed
    # A real failure puts "a" in the pool (its garbage overwritten); it is claimed from there.
    mgr.record_unit_failure(NS, "t", task.version, "a", NODE, "boom")
    second = mgr.claim_unit(NS, "t", task.version, NODE)  # tickets first
    assert second is not None and second.id == "b"
    again = mgr.claim_unit(NS, "t", task.version, NODE)  # then the pool
    assert again is not None and (again.id, again.attempts) == ("a", 1)
    assert mgr.claim_unit(NS, "t", task.version, NODE) is None
    mgr.record_unit_completion(NS, "t", task.version, "a", NODE)
    done = mgr.record_unit_completion(NS, "t", task.version, "b", NODE)
    assert done.status is dt.TaskStatus.FINISHED


# Under P/cluster/pool/ and P/cluster/groups/: watched by every Scheduler. Suffixes after the
# prefix's root; each unreadable value, and each key that is not ours, is counted once.
UNIT_GARBAGE_WATCHED = {
    b"cluster/pool/ns/good/a": b"{",
    b"cluster/pool/ns/good/b": js(POOL, v=3),
    b"cluster/pool/ns/good/c": js(POOL, delayMs=-1),
    b"cluster/pool/ns/orphan/a": b"null",
    b"cluster/pool/ns/good": js(POOL),  # not ours: too short
    b"cluster/pool/ns/good/a/x": js(POOL),  # too long
    b"cluster/pool/ns/good/%zz": js(POOL),  # a bad escape
    b"cluster/pool/ns/good/=a": js(POOL),  # "=" is not a unit's escape
    b"cluster/groups/ns/good/=g": b"{",
    b"cluster/groups/ns/good/=": js(MARK, version="1"),
    b"cluster/groups/ns/orphan/=g": js(MARK, at=None),
    b"cluster/groups/ns/good/g": js(MARK),  # not ours: a group segment starts with "="
    b"cluster/groups/ns/good/==": js(MARK),
    b"cluster/groups/ns/good": js(MARK),
    b"cluster/groups/": js(MARK),
}
# Well-formed and readable, but naming no unit that can be claimed: not counted.
UNIT_PHANTOMS_WATCHED = {
    b"cluster/pool/ns/good/ghost": js(POOL),  # a unit nobody declared, of version 1
    b"cluster/groups/ns/good/=ghost": js(MARK),  # a group of version 1
}


class UnitWork:
    """A ThreadProvider's unit function and group hook that remember what they did."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.units: list[tuple[str, str]] = []  # task id, unit id
        self.groups: list[tuple[str, str]] = []  # task id, group

    def run(self, task: dt.Task, ctx: dt.TaskContext) -> None:
        assert ctx.unit is not None
        with self.lock:
            self.units.append((task.id, ctx.unit.id))

    def group(self, task: dt.Task, group: str) -> None:
        with self.lock:
            self.groups.append((task.id, group))

    def ran(self, task_id: str) -> list[str]:
        with self.lock:
            return sorted(unit for tid, unit in self.units if tid == task_id)

    def grouped(self, task_id: str) -> list[str]:
        with self.lock:
            return sorted(group for tid, group in self.groups if tid == task_id)


def test_a_scheduler_skips_garbage_pool_entries_and_group_marks_and_runs_unit_tasks(
    schedulers: Schedulers,
    mgr: dt.Manager,
    client: dt.EtcdClient,
    registry: CollectorRegistry,
    dtask_prefix: str,
) -> None:
    """Garbage under P/cluster/pool/ and P/cluster/groups/, there when the Scheduler starts and
    arriving through its watch, is counted once per key; the Scheduler keeps running unit
    tasks, next to the garbage (the same ids) and after it; a unit task whose declaration is
    unreadable is not run (and not counted: it is not in a watched range), and does not stop
    the others."""
    root = mgr.keys.root
    mgr.ensure_format()
    for suffix, value in {**UNIT_GARBAGE_WATCHED, **UNIT_PHANTOMS_WATCHED}.items():
        client.put(root + suffix, value)
    broken = mgr.add_task(NS, "broken", nodes=[NODE], units=UNITS)
    client.put(mgr.keys.unit_decl(NS, "broken"), b"garbage")
    work = UnitWork()
    provider = dt.ThreadProvider(work.run, unit_concurrency=2, on_group_completed=work.group)
    try:
        # Its own Manager, as in another process: nothing of "broken" is cached there.
        own = dt.Manager(client, prefix=dtask_prefix)
        scheduler = schedulers.new(NODE, {NS: provider}, manager=own, node_loss_grace=None)
        assert metric(registry, SKIPPED) == len(UNIT_GARBAGE_WATCHED)

        units = [UnitSpec(f"u{i}", group=f"g{i % 2}") for i in range(6)]
        good = mgr.add_task(NS, "good", nodes=[NODE], units=units)
        final = mgr.wait_for_task(NS, "good", good.version, timeout=30)
        assert final.status is dt.TaskStatus.FINISHED
        assert work.ran("good") == sorted(u.id for u in units)
        wait_until(lambda: work.grouped("good") == ["g0", "g1"], 30, message="group hooks")

        # More garbage through the watch, then another unit task: it runs too.
        late = {
            root + b"cluster/pool/ns/good/late": b"{",
            root + b"cluster/groups/ns/good/=late": b"[]",
            root + b"cluster/pool/x": b"{}",
        }
        for key, value in late.items():
            client.put(key, value)
        client.put(root + b"cluster/pool/ns/good/late", b"{{")  # rewritten: not counted again
        after = mgr.add_task(NS, "after", nodes=[NODE], units=["x", "y"])
        final = mgr.wait_for_task(NS, "after", after.version, timeout=30)
        assert final.status is dt.TaskStatus.FINISHED and work.ran("after") == ["x", "y"]
        expected = len(UNIT_GARBAGE_WATCHED) + len(late)
        wait_until(
            lambda: metric(registry, SKIPPED) == expected, 30, message="late garbage counted"
        )
        assert metric(registry, "distributedtask_watch_restarts_total", reason="error") == 0
        assert work.ran("broken") == []
        assert client.range(mgr.keys.outcome(NS, "broken")).first() is None  # still STARTED
        assert broken.descriptor not in scheduler.running().get(NS, set())
    finally:
        schedulers.close()
        assert provider.join(10)
