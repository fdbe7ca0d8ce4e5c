"""A TCP forwarder on 127.0.0.1 that tests put between a client and etcd to break the network.

`TcpProxy` accepts connections on a free loopback port and forwards each to the target. Tests
can then `~TcpProxy.cut` every current connection (an RST, as when a middlebox drops state),
`~TcpProxy.block` the path (new connections are accepted and reset at once, current ones are
cut) and `~TcpProxy.unblock` it, lose the response to a request that the server did handle
(`~TcpProxy.drop_next_response`), and read how many HTTP requests clients sent
(`~TcpProxy.requests`), to assert on round trips rather than on timings.

Threading: one named daemon thread (``dtask-proxy-<port>``) runs a selector loop that owns
every socket; it does no polling, a socketpair wakes it. Every public method may be called
from any thread; `cut`, `block`, `unblock` and `drop_next_response` run inside the loop and
return once done, so after ``cut()`` returns, the cut connections are gone. `close` stops the
loop on a `threading.Event`, joins the thread and resets whatever is still open.

Failure semantics: an upstream that refuses or resets is passed on to the client as a reset.
Half-closes are forwarded. If the loop itself fails (a harness bug), every connection is reset
and `close` raises `RuntimeError` so the test notices. Per direction at most 1 MiB is buffered;
beyond that the proxy stops reading from the sender, like a real network.

Request counting looks for request-line starts (``POST /``, ``GET /``, ``PUT /``,
``DELETE /``) in the client-to-server byte stream, across read boundaries. That is exact for
etcd's JSON gateway, whose bodies are JSON with base64 keys and values.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

__all__ = ["RequestCounter", "TcpProxy"]

_CHUNK = 64 * 1024
_BUFFER_LIMIT = 1024 * 1024
_COMMAND_TIMEOUT = 10.0
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on with timeout 0: close() sends RST

T = TypeVar("T")


class RequestCounter:
    """Counts HTTP request-line starts in a byte stream fed in arbitrary chunks."""

    PATTERNS = (b"POST /", b"GET /", b"PUT /", b"DELETE /")
    _KEEP = max(len(p) for p in PATTERNS) - 1

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> int:
        """Return the number of request starts that end inside ``data``."""
        buf = self._tail + data
        found = 0
        for pattern in self.PATTERNS:
            # Skip matches lying wholly in the tail kept from the previous chunk: counted then.
            found += buf.count(pattern, max(0, len(self._tail) - len(pattern) + 1))
        self._tail = buf[-self._KEEP :]
        return found


class _Conn:
    __slots__ = (
        "client",
        "client_eof",
        "client_shut",
        "connected",
        "counter",
        "doomed",
        "doomed_answered",
        "masks",
        "to_client",
        "to_upstream",
        "upstream",
        "upstream_eof",
        "upstream_shut",
    )

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.connected = False
        self.to_upstream = bytearray()
        self.to_client = bytearray()
        self.client_eof = False
        self.upstream_eof = False
        self.client_shut = False
        self.upstream_shut = False
        self.counter = RequestCounter()
        self.doomed = False
        self.doomed_answered = False
        self.masks: dict[socket.socket, int] = {client: 0, upstream: 0}


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    sock.close()


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``; see the module docstring.

    Args:
        target_host, target_port: where connections go.
        port: the listening port; 0 (default) lets the kernel pick a free one.

    Raises:
        OSError: the listening socket cannot be created or the target cannot be resolved.
    """

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        info = socket.getaddrinfo(target_host, target_port, type=socket.SOCK_STREAM)[0]
        self._family, self._target = info[0], info[4]
        self.target_host = target_host
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._conns: dict[socket.socket, _Conn] = {}
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._requests = 0
        self._accepted = 0
        self._bytes_down = 0
        self._blocked = False
        self._drop_countdown: int | None = None
        self._dropped = 0
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"dtask-proxy-{self.port}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"<TcpProxy {self.endpoint} -> {self.target_host}:{self.target_port}>"

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> int:
        """HTTP requests clients sent through the proxy since creation or `reset_counts`."""
        with self._lock:
            return self._requests

    @property
    def bytes_down(self) -> int:
        """Bytes etcd sent to clients through the proxy since creation or `reset_counts`
        (HTTP framing included): what a watcher behind the proxy received."""
        with self._lock:
            return self._bytes_down

    @property
    def accepted(self) -> int:
        """Connections accepted since creation or `reset_counts` (blocked ones included)."""
        with self._lock:
            return self._accepted

    @property
    def connections(self) -> int:
        """Connections open through the proxy now (0 once closed)."""
        if self._closed:
            return 0
        return self._call(lambda: len(self._conns) // 2)

    @property
    def dropped(self) -> int:
        """Responses lost on purpose (see `drop_next_response`) since creation or reset."""
        with self._lock:
            return self._dropped

    @property
    def blocked(self) -> bool:
        return self._blocked

    def reset_counts(self) -> None:
        """Set `requests`, `accepted`, `bytes_down` and `dropped` to zero."""
        with self._lock:
            self._requests = 0
            self._bytes_down = 0
            self._accepted = 0
            self._dropped = 0

    def drop_next_response(self, skip: int = 0) -> None:
        """Lose the response to a coming request, as when the network fails after the send.

        The next ``skip`` requests (on any connection) pass; the one after reaches the server,
        which handles it (a write takes effect), but when its response arrives the proxy resets
        that connection instead of passing the response on. Replaces a drop still pending.

        Raises:
            ValueError: ``skip`` is negative.
            RuntimeError: the proxy is closed or its loop failed.
        """
        if skip < 0:
            raise ValueError("skip must be >= 0")

        def arm() -> None:
            self._drop_countdown = skip

        self._call(arm)

    def cut(self) -> int:
        """Reset every current connection (RST both ways); return how many were cut.

        Raises:
            RuntimeError: the proxy is closed or its loop failed.
        """
        return self._call(self._cut_all)

    def block(self) -> int:
        """Cut every current connection and reset new ones as soon as they are accepted.

        Returns how many connections were cut.

        Raises:
            RuntimeError: the proxy is closed or its loop failed.
        """

        def block() -> int:
            self._blocked = True
            return self._cut_all()

        return self._call(block)

    def unblock(self) -> None:
        """Forward new connections again.

        Raises:
            RuntimeError: the proxy is closed or its loop failed.
        """

        def unblock() -> None:
            self._blocked = False

        self._call(unblock)

    def close(self) -> None:
        """Stop the loop, join its thread, reset every connection. Idempotent.

        Raises:
            RuntimeError: the loop had failed (the harness has a bug); raised once.
        """
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._wake()
        self._thread.join(_COMMAND_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError(f"{self!r}: loop thread did not stop")
        self._cut_all()
        self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        if self._error is not None:
            raise RuntimeError(f"{self!r}: forwarding loop failed") from self._error

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- commands run inside the loop

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _call(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        if self._closed or self._error is not None or not self._thread.is_alive():
            raise RuntimeError(f"{self!r} is closed or failed")
        done = threading.Event()
        result: list[T] = []
        errors: list[BaseException] = []

        def command() -> None:
            try:
                result.append(fn())
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        self._commands.put(command)
        self._wake()
        if not done.wait(_COMMAND_TIMEOUT):
            raise RuntimeError(f"{self!r}: loop did not run the command")
        if errors:
            raise errors[0]
        return result[0]

    def _cut_all(self) -> int:
        conns = {id(c): c for c in self._conns.values()}
        for conn in conns.values():
            self._drop(conn)
        return len(conns)

    # -- the loop

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, mask in self._selector.select():
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        self._accept()
                    elif sock is self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            while self._wake_r.recv(4096):
                                pass
                    elif sock in self._conns:  # may have been dropped by an earlier event
                        self._service(self._conns[sock], sock, mask)
                while True:
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    command()
        except BaseException as exc:  # a harness bug: record it, reset everything
            self._error = exc
            with contextlib.suppress(Exception):
                self._cut_all()
        finally:
            # Release callers waiting on commands that will now never run.
            while True:
                try:
                    self._commands.get_nowait()()
                except queue.Empty:
                    break
                except Exception:
                    continue

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE; keep serving the others
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                    return
                raise
            with self._lock:
                self._accepted += 1
            if self._blocked:
                _reset(client)
                continue
            client.setblocking(False)
            upstream = socket.socket(self._family, socket.SOCK_STREAM)
            upstream.setblocking(False)
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client, upstream)
            self._conns[client] = conn
            self._conns[upstream] = conn
            err = upstream.connect_ex(self._target)
            if err == 0:
                conn.connected = True
            elif err not in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                self._drop(conn)
                continue
            self._update(conn)

    def _service(self, conn: _Conn, sock: socket.socket, mask: int) -> None:
        is_client = sock is conn.client
        try:
            if not is_client and not conn.connected:
                if mask & selectors.EVENT_WRITE:
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        self._drop(conn)  # upstream refused: the client sees a reset
                        return
                    conn.connected = True
            else:
                if mask & selectors.EVENT_READ:
                    self._read(conn, is_client)
                    if conn.doomed_answered:
                        with self._lock:  # count first: the reset wakes the client up
                            self._dropped += 1
                        self._drop(conn)  # the response is lost: the client sees a reset
                        return
                if mask & selectors.EVENT_WRITE:
                    self._write(conn, is_client)
            self._half_close(conn)
        except OSError:
            self._drop(conn)
            return
        if conn.client_shut and conn.upstream_shut:
            self._drop(conn, reset=False)
        else:
            self._update(conn)

    def _read(self, conn: _Conn, is_client: bool) -> None:
        sock = conn.client if is_client else conn.upstream
        try:
            data = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            if is_client:
                conn.client_eof = True
            else:
                conn.upstream_eof = True
            return
        if is_client:
            found = conn.counter.feed(data)
            if found:
                with self._lock:
                    self._requests += found
                self._arm(conn, found)
            conn.to_upstream += data
        elif conn.doomed:
            conn.doomed_answered = True  # etcd has handled the request; do not pass it on
        else:
            with self._lock:
                self._bytes_down += len(data)
            conn.to_client += data

    def _arm(self, conn: _Conn, found: int) -> None:
        # HTTP clients do not pipeline, so the next bytes from upstream on this connection
        # answer the request that starts in this chunk.
        for _ in range(found):
            if self._drop_countdown is None:
                return
            if self._drop_countdown == 0:
                self._drop_countdown = None
                conn.doomed = True
                return
            self._drop_countdown -= 1

    def _write(self, conn: _Conn, is_client: bool) -> None:
        sock, buf = (
            (conn.client, conn.to_client) if is_client else (conn.upstream, conn.to_upstream)
        )
        if not buf:
            return
        try:
            sent = sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        del buf[:sent]

    def _half_close(self, conn: _Conn) -> None:
        if conn.client_eof and not conn.to_upstream and conn.connected and not conn.upstream_shut:
            conn.upstream.shutdown(socket.SHUT_WR)
            conn.upstream_shut = True
        if conn.upstream_eof and not conn.to_client and not conn.client_shut:
            conn.client.shutdown(socket.SHUT_WR)
            conn.client_shut = True

    def _update(self, conn: _Conn) -> None:
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        client = (read if not conn.client_eof and len(conn.to_upstream) < _BUFFER_LIMIT else 0) | (
            write if conn.to_client else 0
        )
        if not conn.connected:
            upstream = write
        else:
            upstream = (
                read if not conn.upstream_eof and len(conn.to_client) < _BUFFER_LIMIT else 0
            ) | (write if conn.to_upstream else 0)
        for sock, mask in ((conn.client, client), (conn.upstream, upstream)):
            old = conn.masks[sock]
            if mask == old:
                continue
            if not old:
                self._selector.register(sock, mask)
            elif not mask:
                self._selector.unregister(sock)
            else:
                self._selector.modify(sock, mask)
            conn.masks[sock] = mask

    def _drop(self, conn: _Conn, *, reset: bool = True) -> None:
        for sock in (conn.client, conn.upstream):
            if conn.masks.get(sock):
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
                conn.masks[sock] = 0
            self._conns.pop(sock, None)
            if reset:
                _reset(sock)
            else:
                sock.close()
