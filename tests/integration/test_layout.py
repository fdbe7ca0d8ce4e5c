"""The layout marker ``P/format`` (storage layout 2), on a real etcd.

A prefix holding keys of the 0.1 layout (``P/tasks/``, ``P/outcomes/``, ``P/runs/``,
``P/members/``, no marker) or a marker of another layout is refused by every call that reads
or writes it — the Manager's and ``Scheduler.start`` — with a StorageFormatError naming what it
found, and nothing is written (the etcd revision does not move). A fresh prefix gets the marker,
byte for byte ``records.FORMAT_MARKER``, from the first add or the first Scheduler; reads alone
never write it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry
from tests.support import RecordingProvider, Schedulers, keys_under

import distributedtask as dt
from distributedtask.exceptions import StorageFormatError
from distributedtask.records import FORMAT_MARKER
from distributedtask.testing import wait_until
from distributedtask.testing.etcd import EtcdServer

pytestmark = pytest.mark.usefixtures("no_scheduler_thread_left")

NS = "ns"
NODE = "n1"

# What distributedtask 0.1 wrote for a task "ns/t" on node n1 (keys after the prefix's root).
LAYOUT_1 = {
    b"tasks/ns/t": (
        b'{"v":1,"payload":"cA==","startedAt":1767323045000,"nodes":["n1"],"token":"x"}'
    ),
    b"outcomes/ns/t": b'{"v":1,"status":"FINISHED","finishedAt":1767323046000,"token":"x"}',
    b"runs/ns/t/n1": b'{"v":1,"outcome":"completed","at":1767323046000,"token":"x"}',
    b"members/n1": b'{"v":1,"node":"n1","namespaces":["ns"],"startedAt":1767323045000}',
}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(etcd_private: EtcdServer) -> Iterator[dt.EtcdClient]:
    """A client of an etcd of this test alone: its revision moves only with this test's
    writes (on the shared one, a lease left by an earlier test may expire at any moment)."""
    with dt.EtcdClient(etcd_private.endpoint, timeout=5.0, watch_timeout=6.0) as client:
        yield client


@pytest.fixture
def mgr(client: dt.EtcdClient, dtask_prefix: str) -> dt.Manager:
    return dt.Manager(client, prefix=dtask_prefix)


@pytest.fixture
def schedulers(mgr: dt.Manager, registry: CollectorRegistry) -> Iterator[Schedulers]:
    with Schedulers(mgr, registry) as farm:
        yield farm


def revision(client: dt.EtcdClient) -> int:
    """etcd's current revision (it moves with every write, anywhere)."""
    return client.range(b"\0").revision


def calls(mgr: dt.Manager, schedulers: Schedulers) -> dict[str, Callable[[], object]]:
    """Every call that must refuse a prefix of another layout."""
    return {
        "add_task": lambda: mgr.add_task(NS, "new", b"p", nodes=[NODE]),
        "add_task of a 0.1 id": lambda: mgr.add_task(NS, "t", nodes=[NODE]),
        "add_task nodes=None": lambda: mgr.add_task(NS, "new"),
        "get_task": lambda: mgr.get_task(NS, "t"),
        "list_tasks": mgr.list_tasks,
        "snapshot": mgr.snapshot,
        "live_members": mgr.live_members,
        "get_progress": lambda: mgr.get_progress(NS, "t", 1),
        "restore": lambda: mgr.restore(b'{"tasks":{}}'),
        "ensure_format": mgr.ensure_format,
        "Scheduler.start": lambda: schedulers.new(NODE, {NS: RecordingProvider()}),
    }


def assert_refused_everywhere(
    mgr: dt.Manager, schedulers: Schedulers, client: dt.EtcdClient, found: int | str, says: str
) -> None:
    keys = keys_under(client, mgr.prefix)
    for name, call in calls(mgr, schedulers).items():
        before = revision(client)
        with pytest.raises(StorageFormatError) as info:
            call()
        assert revision(client) == before, f"{name} wrote"
        error = info.value
        assert isinstance(error, dt.DistributedTaskError)
        assert (error.prefix, error.found, error.expected) == (mgr.prefix, found, 2), name
        assert says in str(error) and mgr.prefix in str(error), name
    assert keys_under(client, mgr.prefix) == keys
    assert [s.running() for s in schedulers.made] == [{}]  # refused before anything ran


@pytest.mark.parametrize("present", [sorted(LAYOUT_1), [b"tasks/ns/t", b"runs/ns/t/n1"]])
def test_a_prefix_of_the_0_1_layout_is_refused_and_left_alone(
    mgr: dt.Manager,
    schedulers: Schedulers,
    client: dt.EtcdClient,
    present: list[bytes],
) -> None:
    for suffix in present:
        client.put(mgr.keys.root + suffix, LAYOUT_1[suffix])
    assert_refused_everywhere(mgr, schedulers, client, 1, "distributedtask 0.1")


@pytest.mark.parametrize("suffix", sorted(LAYOUT_1))
def test_any_one_range_of_the_0_1_layout_is_enough_to_refuse(
    mgr: dt.Manager, client: dt.EtcdClient, suffix: bytes
) -> None:
    client.put(mgr.keys.root + suffix, LAYOUT_1[suffix])
    before = revision(client)
    with pytest.raises(StorageFormatError, match=r"0\.1"):
        mgr.add_task(NS, "new", nodes=[NODE])
    with pytest.raises(StorageFormatError, match=r"0\.1"):
        mgr.list_tasks()
    assert revision(client) == before
    assert keys_under(client, mgr.prefix) == [mgr.keys.root + suffix]


@pytest.mark.parametrize(
    ("marker", "found", "says"),
    [
        (b'{"layout":3,"buckets":64}', 3, "storage layout 3"),
        # A marker no version writes is named as found, never as a layout it is not.
        (b'{"layout":1}', """marker '{"layout":1}'""", "an unrecognised layout"),
        (b"not a marker", "marker 'not a marker'", "an unrecognised layout"),
        # Layout 2 with another bucket count, and our marker with its fields in another order:
        # the marker is compared byte for byte (the add compares it in etcd).
        (
            b'{"layout":2,"buckets":32}',
            """marker '{"layout":2,"buckets":32}'""",
            "an unrecognised layout",
        ),
        (
            b'{"buckets":64,"layout":2}',
            """marker '{"buckets":64,"layout":2}'""",
            "an unrecognised layout",
        ),
    ],
)
def test_a_marker_of_another_layout_is_refused_and_left_alone(
    mgr: dt.Manager,
    schedulers: Schedulers,
    client: dt.EtcdClient,
    marker: bytes,
    found: int | str,
    says: str,
) -> None:
    client.put(mgr.keys.format, marker)
    assert_refused_everywhere(mgr, schedulers, client, found, says)
    kv = client.range(mgr.keys.format).first()
    assert kv is not None and kv.value == marker


def test_reads_of_a_fresh_prefix_write_nothing(mgr: dt.Manager, client: dt.EtcdClient) -> None:
    before = revision(client)
    assert mgr.get_task(NS, "t") is None
    assert mgr.list_tasks() == {}
    assert mgr.live_members() == []
    assert mgr.get_progress(NS, "t", 1) == {}
    assert revision(client) == before
    assert keys_under(client, mgr.prefix) == []


def test_the_first_add_on_a_fresh_prefix_writes_the_marker(
    mgr: dt.Manager, client: dt.EtcdClient
) -> None:
    assert keys_under(client, mgr.prefix) == []
    task = mgr.add_task(NS, "t", nodes=[NODE])
    marker = client.range(mgr.keys.format).first()
    assert marker is not None and marker.value == FORMAT_MARKER
    assert marker.value == b'{"layout":2,"buckets":64}'
    assert marker.mod_revision < task.version  # written first, then the add
    # Later adds, by this Manager or another, compare the marker and leave it as it is.
    other = dt.Manager(client, prefix=mgr.prefix)
    other.add_task(NS, "u", nodes=[NODE])
    mgr.add_task(NS, "v", nodes=[NODE])
    again = client.range(mgr.keys.format).first()
    assert again is not None and again.mod_revision == marker.mod_revision
    assert again.value == FORMAT_MARKER


def test_a_scheduler_starting_on_a_fresh_prefix_writes_the_marker(
    mgr: dt.Manager, schedulers: Schedulers, client: dt.EtcdClient
) -> None:
    provider = RecordingProvider()
    schedulers.new(NODE, {NS: provider})
    marker = client.range(mgr.keys.format).first()
    assert marker is not None and marker.value == FORMAT_MARKER
    task = mgr.add_task(NS, "t", nodes=[NODE])
    wait_until(lambda: task.descriptor in provider.starts(), message="started")
    again = client.range(mgr.keys.format).first()
    assert again is not None and again.mod_revision == marker.mod_revision
