"""Tests of the harness pieces that need no etcd: waiting, ports, backend choice, etcd command
lines, the request counter and the TCP proxy (against a local echo server)."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import distributedtask.testing as harness
from distributedtask.testing import (
    EtcdCluster,
    EtcdServer,
    RequestCounter,
    TcpProxy,
    free_port,
    prefix_range_end,
    select_backend,
    wait_until,
)
from distributedtask.testing.plugin import ExternalEtcd, _sanitize

# -- wait_until


def test_wait_until_returns_the_first_truthy_value() -> None:
    answers = iter([None, 0, "", "done", "later"])
    assert wait_until(lambda: next(answers), timeout=5.0, interval=0.001) == "done"


def test_wait_until_raises_with_the_message_and_last_value() -> None:
    with pytest.raises(AssertionError, match=r"never ready: not true after 0.05s \(last value 0\)"):
        wait_until(lambda: 0, timeout=0.05, interval=0.01, message="never ready")


def test_wait_until_propagates_errors_unless_ignored() -> None:
    def boom() -> bool:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        wait_until(boom, timeout=1.0)
    with pytest.raises(AssertionError, match="last error ConnectionError") as info:
        wait_until(boom, timeout=0.05, interval=0.01, ignore=(ConnectionError,))
    assert isinstance(info.value.__cause__, ConnectionError)


def test_wait_until_calls_at_once_when_already_true() -> None:
    calls: list[int] = []

    def once() -> bool:
        calls.append(1)
        return True

    assert wait_until(once, timeout=0.0) is True
    assert calls == [1]


# -- ports, backends, command lines


def test_free_port_is_bindable_and_never_repeats() -> None:
    ports = [free_port() for _ in range(30)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("process", "process"),
        ("docker", "docker"),
        ("testcontainers", "docker"),
        (" Process ", "process"),
    ],
)
def test_select_backend_explicit(requested: str, expected: str) -> None:
    assert select_backend(requested) == expected


def test_select_backend_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(harness.BACKEND_ENV, "process")
    assert select_backend() == "process"
    monkeypatch.setenv(harness.BACKEND_ENV, "auto")
    assert select_backend() in ("docker", "process")
    monkeypatch.setenv(harness.BACKEND_ENV, "kubernetes")
    with pytest.raises(ValueError, match="kubernetes"):
        select_backend()


def test_server_command_line() -> None:
    server = EtcdServer(name="n1", backend="process", extra_args=["--log-level=debug"])
    args = server.args()
    assert f"--listen-client-urls=http://127.0.0.1:{server.client_port}" in args
    assert f"--advertise-client-urls={server.endpoint}" in args
    assert f"--initial-cluster=n1=http://127.0.0.1:{server.peer_port}" in args
    assert "--experimental-watch-progress-notify-interval=2s" in args
    assert "--unsafe-no-fsync" in args
    assert args[-1] == "--log-level=debug"  # extra flags come last, so they win
    assert len({server.client_port, server.peer_port, server.metrics_port}) == 3
    assert server.logs() == ""
    assert not server.running
    server.close()  # never started: nothing to remove
    assert server.closed


def test_tls_flags_switch_the_url_schemes() -> None:
    server = EtcdServer(backend="process", extra_args=["--cert-file=/c.pem", "--key-file=/k.pem"])
    assert server.endpoint.startswith("https://")
    assert server.peer_url.startswith("http://")
    assert server.metrics_url.startswith("http://")


def test_cluster_members_share_one_initial_cluster() -> None:
    cluster = EtcdCluster(3, backend="process")
    initial = {arg for m in cluster.members for arg in m.args() if arg.startswith("--initial-c")}
    expected = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in cluster.members)
    assert f"--initial-cluster={expected}" in initial
    assert len([a for a in initial if a.startswith("--initial-cluster=")]) == 1
    assert len(set(cluster.endpoints)) == 3
    assert all("--election-timeout=200" not in m.args() for m in cluster.members)
    cluster.close()


def test_dockerfile_copies_are_identical() -> None:
    packaged = Path(harness.__file__).with_name("etcd.Dockerfile")
    repo = Path(__file__).resolve().parents[2] / "docker" / "etcd" / "Dockerfile"
    assert packaged.read_text() == repo.read_text()
    assert "FROM scratch" in packaged.read_text()


def test_etcd_binary_and_image_tag() -> None:
    assert harness.etcd_binary().is_file()
    assert harness.etcd_image_tag().startswith("distributedtask-etcd:3.5")


def test_prefix_range_end() -> None:
    assert prefix_range_end("/a/") == b"/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff") == b"\x00"


# -- plugin helpers


def test_sanitize_test_names_for_prefixes() -> None:
    assert _sanitize("test_x[a/b c]") == "test_x-a-b-c"
    assert len(_sanitize("x" * 300)) == 64


def test_external_etcd_skips_destructive_calls() -> None:
    external = ExternalEtcd("http://127.0.0.1:2379/")
    assert external.endpoint == "http://127.0.0.1:2379"
    with pytest.raises(pytest.skip.Exception, match="cannot kill"):
        external.kill()
    assert external.logs() == ""


# -- request counting


STREAM = (
    b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    b"GET /health HTTP/1.1\r\n\r\n"
    b"POST /v3/kv/put HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    b"DELETE /x HTTP/1.1\r\n\r\n"
)


def test_request_counter_counts_whole_stream() -> None:
    assert RequestCounter().feed(STREAM) == 4


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11])
def test_request_counter_across_chunk_boundaries(size: int) -> None:
    counter = RequestCounter()
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert sum(counter.feed(chunk) for chunk in chunks) == 4


def test_request_counter_every_split_point() -> None:
    for cut in range(len(STREAM) + 1):
        counter = RequestCounter()
        assert counter.feed(STREAM[:cut]) + counter.feed(STREAM[cut:]) == 4, cut


# -- the proxy, in front of a local echo server


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except ConnectionResetError:
            pass  # the proxy under test cut us


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, name="test-echo", daemon=True)
    thread.start()
    try:
        yield ("127.0.0.1", server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _connect(proxy: TcpProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    return sock


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_proxy_forwards_and_counts(echo: tuple[str, int]) -> None:
    with TcpProxy(*echo) as proxy:
        assert proxy.endpoint == f"http://127.0.0.1:{proxy.port}"
        with _connect(proxy) as sock:
            for i in range(5):
                message = b"POST /v3/kv/range HTTP/1.1\r\n\r\n" + bytes([i]) * 100
                sock.sendall(message)
                assert _recv_exact(sock, len(message)) == message
            big = b"GET /" + b"x" * 3_000_000  # more than the proxy buffers per direction
            sender = threading.Thread(target=sock.sendall, args=(big,), name="test-sender")
            sender.start()
            assert _recv_exact(sock, len(big)) == big
            sender.join(5)
            assert proxy.requests == 6
            assert proxy.accepted == 1
            assert proxy.connections == 1
        wait_until(lambda: proxy.connections == 0, message="closed connection is dropped")
        proxy.reset_counts()
        assert proxy.requests == 0
        assert proxy.accepted == 0


def test_proxy_forwards_half_close(echo: tuple[str, int]) -> None:
    with TcpProxy(*echo) as proxy, _connect(proxy) as sock:
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        assert _recv_exact(sock, 6) == b"hello"  # then EOF: echo closed after our FIN


def test_proxy_cut_resets_connections(echo: tuple[str, int]) -> None:
    with TcpProxy(*echo) as proxy, _connect(proxy) as first, _connect(proxy) as second:
        for sock in (first, second):
            sock.sendall(b"ping")
            assert _recv_exact(sock, 4) == b"ping"
        assert proxy.cut() == 2
        assert proxy.connections == 0
        for sock in (first, second):
            with pytest.raises(ConnectionResetError):
                sock.sendall(b"more")
                sock.recv(10)
        with _connect(proxy) as third:  # new connections still work
            third.sendall(b"again")
            assert _recv_exact(third, 5) == b"again"


def test_proxy_block_refuses_until_unblocked(echo: tuple[str, int]) -> None:
    with TcpProxy(*echo) as proxy:
        live = _connect(proxy)
        live.sendall(b"x")
        assert _recv_exact(live, 1) == b"x"
        assert proxy.block() == 1
        assert proxy.blocked
        with pytest.raises(ConnectionResetError):
            live.recv(10)
        live.close()
        # The reset may even beat connect()'s own check of the handshake.
        with pytest.raises(ConnectionResetError), _connect(proxy) as refused:
            refused.sendall(b"x")
            refused.recv(10)
        proxy.unblock()
        with _connect(proxy) as sock:
            sock.sendall(b"ok")
            assert _recv_exact(sock, 2) == b"ok"


def test_proxy_resets_when_the_target_refuses() -> None:
    with TcpProxy("127.0.0.1", free_port()) as proxy:

        def exchange() -> bytes:
            with _connect(proxy) as sock:
                sock.sendall(b"x")
                return sock.recv(10)

        with pytest.raises(ConnectionResetError):
            exchange()


def test_proxy_close_joins_its_thread(echo: tuple[str, int]) -> None:
    proxy = TcpProxy(*echo)
    sock = _connect(proxy)
    sock.sendall(b"x")
    assert _recv_exact(sock, 1) == b"x"
    name = f"dtask-proxy-{proxy.port}"
    assert any(t.name == name and t.daemon for t in threading.enumerate())
    proxy.close()
    proxy.close()  # idempotent
    assert not any(t.name == name for t in threading.enumerate())
    with pytest.raises(ConnectionResetError):
        sock.recv(10)
    sock.close()
    with pytest.raises(RuntimeError, match="closed"):
        proxy.cut()


def test_proxy_drops_a_response_after_the_request_went_through(echo: tuple[str, int]) -> None:
    with TcpProxy(*echo) as proxy:
        proxy.drop_next_response(skip=1)
        with _connect(proxy) as sock:
            sock.sendall(b"POST /first")
            assert _recv_exact(sock, 11) == b"POST /first"  # skipped: passes
            sock.sendall(b"POST /second")
            with pytest.raises(ConnectionResetError):
                sock.recv(100)
        assert proxy.dropped == 1
        with _connect(proxy) as sock:  # one drop only
            sock.sendall(b"GET /third")
            assert _recv_exact(sock, 10) == b"GET /third"
        assert proxy.requests == 3
        with pytest.raises(ValueError, match="skip"):
            proxy.drop_next_response(skip=-1)
