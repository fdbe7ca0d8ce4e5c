"""The resumable watch under faults: etcd restart, cut connections, compaction, pause."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import distributedtask as dt
from distributedtask.etcd.watch import Changes, ResumableWatch, Snapshot
from distributedtask.keys import prefix_range_end
from distributedtask.testing.etcd import EtcdServer, compact, wait_until
from distributedtask.testing.proxy import TcpProxy


class View:
    """What a watch handler knows: key -> value, plus every batch seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: dict[bytes, bytes] = {}
        self.puts: list[bytes] = []
        self.snapshots: list[str] = []
        self.restarts: list[str] = []
        self.lives = 0  # streams etcd confirmed (on_live)

    def live(self) -> None:
        with self.lock:
            self.lives += 1

    def __call__(self, batch: Snapshot | Changes) -> None:
        with self.lock:
            if isinstance(batch, Snapshot):
                self.snapshots.append(batch.reason)
                self.state = {kv.key: kv.value for kv in batch.kvs}
                return
            for event in batch.events:
                if event.kind == "put":
                    self.state[event.kv.key] = event.kv.value
                    self.puts.append(event.kv.value)
                else:
                    self.state.pop(event.kv.key, None)

    def get(self) -> dict[bytes, bytes]:
        with self.lock:
            return dict(self.state)


def truth(client: dt.EtcdClient, prefix: bytes) -> dict[bytes, bytes]:
    return {kv.key: kv.value for kv in client.range(prefix, prefix_range_end(prefix)).kvs}


@pytest.fixture
def watched(etcd_client: dt.EtcdClient, dtask_prefix: str) -> Iterator[tuple[bytes, View]]:
    prefix = (dtask_prefix + "/").encode()
    yield prefix, View()


def start_watch(client: dt.EtcdClient, prefix: bytes, view: View) -> ResumableWatch:
    watch = ResumableWatch(
        client,
        prefix,
        prefix_range_end(prefix),
        view,
        on_restart=view.restarts.append,
        on_live=view.live,
    )
    watch.start()
    return watch


def test_snapshot_then_every_change_in_order(
    etcd_client: dt.EtcdClient, watched: tuple[bytes, View]
) -> None:
    prefix, view = watched
    etcd_client.put(prefix + b"before", b"0")
    watch = start_watch(etcd_client, prefix, view)
    try:
        assert view.snapshots == ["initial"] and view.get() == {prefix + b"before": b"0"}
        for i in range(20):
            etcd_client.put(prefix + b"k%d" % (i % 5), b"%d" % i)
        etcd_client.txn(success=[{"request_delete_range": {"key": _b64(prefix + b"before")}}])
        wait_until(lambda: view.get() == truth(etcd_client, prefix), timeout=10)
        assert view.puts == [b"%d" % i for i in range(20)]
    finally:
        watch.stop()
    assert not watch.running


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_survives_a_cut_connection_without_gaps_or_duplicates(
    etcd_client: dt.EtcdClient, etcd_proxy: TcpProxy, watched: tuple[bytes, View]
) -> None:
    prefix, view = watched
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=2.0, watch_timeout=6.0) as client:
        watch = start_watch(client, prefix, view)
        try:
            for round_ in range(3):
                for i in range(10):
                    etcd_client.put(prefix + b"k", b"%d-%d" % (round_, i))
                etcd_proxy.cut()
            wait_until(lambda: len(view.puts) >= 30, timeout=15)
            assert view.puts == [b"%d-%d" % (r, i) for r in range(3) for i in range(10)]
            assert view.restarts  # the cuts were noticed
        finally:
            watch.stop()


def test_relists_after_compaction_while_disconnected(
    etcd_client: dt.EtcdClient,
    etcd_endpoint: str,
    etcd_proxy: TcpProxy,
    watched: tuple[bytes, View],
) -> None:
    prefix, view = watched
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=2.0, watch_timeout=6.0) as client:
        etcd_client.put(prefix + b"gone", b"x")
        watch = start_watch(client, prefix, view)
        try:
            etcd_proxy.block()
            etcd_client.put(prefix + b"new", b"y")
            etcd_client.txn(success=[{"request_delete_range": {"key": _b64(prefix + b"gone")}}])
            compact(etcd_endpoint)
            etcd_proxy.unblock()
            wait_until(lambda: "compacted" in view.snapshots, timeout=15)
            wait_until(lambda: view.get() == truth(etcd_client, prefix), timeout=10)
            assert view.get() == {prefix + b"new": b"y"}
            assert "compacted" in view.restarts
        finally:
            watch.stop()


def test_survives_an_etcd_restart(etcd_private: EtcdServer) -> None:
    prefix = b"/restart/"
    view = View()
    with dt.EtcdClient(etcd_private.endpoint, timeout=2.0, watch_timeout=6.0) as client:
        watch = start_watch(client, prefix, view)
        try:
            client.put(prefix + b"a", b"1")
            wait_until(lambda: view.puts == [b"1"], timeout=10)
            assert view.lives == 1  # the first stream, confirmed
            etcd_private.kill()
            wait_until(lambda: "connect" in view.restarts, timeout=10)
            etcd_private.restart()
            # told once etcd confirms the new stream, before any change comes through it
            wait_until(lambda: view.lives >= 2, timeout=20)
            client.put(prefix + b"a", b"2")
            client.put(prefix + b"b", b"3")
            wait_until(lambda: view.puts == [b"1", b"2", b"3"], timeout=20)
        finally:
            watch.stop()


def test_a_silent_stream_is_noticed_and_resumed(etcd_private: EtcdServer) -> None:
    prefix = b"/paused/"
    view = View()
    with dt.EtcdClient(etcd_private.endpoint, timeout=2.0, watch_timeout=3.0) as client:
        watch = start_watch(client, prefix, view)
        try:
            etcd_private.pause()
            wait_until(lambda: view.restarts, timeout=15)  # the read timed out
            etcd_private.unpause()
            client.put(prefix + b"k", b"after")
            wait_until(lambda: view.puts == [b"after"], timeout=20)
        finally:
            watch.stop()


def test_progress_notifications_advance_the_revision(
    etcd_client: dt.EtcdClient, watched: tuple[bytes, View]
) -> None:
    prefix, view = watched
    with dt.EtcdClient(etcd_client.endpoints, timeout=2.0, watch_timeout=6.0) as client:
        watch = start_watch(client, prefix, view)
        try:
            elsewhere = client.put(prefix[:-1] + b"-outside-the-range", b"x")
            wait_until(lambda: watch.revision >= elsewhere, timeout=15)
            assert view.puts == []
        finally:
            watch.stop()


def test_stop_is_prompt_and_leaves_no_thread(
    etcd_client: dt.EtcdClient, watched: tuple[bytes, View]
) -> None:
    prefix, view = watched
    watch = start_watch(etcd_client, prefix, view)
    watch.stop(timeout=5)
    watch.stop()
    assert not any(t.name == "distributedtask-watch" for t in threading.enumerate())


def test_a_failing_handler_gets_a_fresh_snapshot(
    etcd_client: dt.EtcdClient, watched: tuple[bytes, View]
) -> None:
    prefix, view = watched
    failures = []

    def flaky(batch: Snapshot | Changes) -> None:
        if isinstance(batch, Changes) and not failures:
            failures.append(batch)
            raise RuntimeError("handler bug")
        view(batch)

    watch = ResumableWatch(etcd_client, prefix, prefix_range_end(prefix), flaky)
    watch.start()
    try:
        etcd_client.put(prefix + b"k", b"v")
        wait_until(lambda: view.get() == {prefix + b"k": b"v"}, timeout=10)
        assert view.snapshots[-1] == "handler-error"
    finally:
        watch.stop()
