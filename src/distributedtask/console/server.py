"""``ConsoleServer``: the console of one prefix, served over HTTP by uvicorn on a thread.

:meth:`ConsoleServer.start` binds the listening socket (so a port in use fails at once, as an
:class:`OSError`), starts the live state (its watch lists the prefix: :class:`EtcdError`,
:class:`StorageFormatError`), then runs uvicorn's event loop on the named daemon thread
``dtask-console-http`` and returns once it accepts connections. Manager calls run on the
executors' threads: ``dtask-console-write_N`` (writes) and ``dtask-console-read_N`` (units).
:meth:`stop` ends every page's event stream, stops the watch, lets uvicorn close its
connections, joins the thread and shuts both executors down; it is idempotent, and the server
cannot be started again.

The server never installs signal handlers (it does not run on the main thread): its owner
decides what a signal means (``dtask ui`` stops on SIGINT and SIGTERM and exits 0).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import uvicorn

from .._threads import stop_and_join
from ..manager import Manager
from .app import KEEP_ALIVE_SECONDS, build_app, is_loopback
from .live import LiveState

__all__ = ["ConsoleServer"]

log = logging.getLogger("distributedtask.console")


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling a thread when it accepts connections."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._ready.set()


class ConsoleServer:
    """The web console of ``manager``'s prefix on ``host:port`` (port 0: any free port, see
    :attr:`url`). Read-only unless ``allow_writes``. A context manager (start, stop)."""

    def __init__(
        self,
        manager: Manager,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        allow_writes: bool = False,
        keep_alive_seconds: float = KEEP_ALIVE_SECONDS,
    ) -> None:
        self.manager = manager
        self.host = host
        self.port = port
        self.allow_writes = allow_writes
        self.state = LiveState(manager)
        self._keep_alive = keep_alive_seconds
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dtask-console-write")
        self._reads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dtask-console-read")
        self._ready = threading.Event()
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        """``http://host:port/`` with the port actually bound (after :meth:`start`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def loopback(self) -> bool:
        """Whether it listens on this machine only."""
        return is_loopback(self.host)

    def __enter__(self) -> ConsoleServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind, start the live state, serve; return once connections are accepted.

        Raises :class:`OSError` (the address cannot be bound), :class:`EtcdError`,
        :class:`StorageFormatError`, :class:`RuntimeError` (started twice, or uvicorn failed
        to start). Nothing is left running when it raises.
        """
        if self._thread is not None or self._stopped:
            raise RuntimeError("a ConsoleServer is started once")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
            self.port = sock.getsockname()[1]
            self.state.start()
        except BaseException:
            sock.close()
            self._executor.shutdown()
            self._reads.shutdown()
            raise
        app = build_app(
            self.state,
            host=self.host,
            port=self.port,
            allow_writes=self.allow_writes,
            executor=self._executor,
            read_executor=self._reads,
            keep_alive_seconds=self._keep_alive,
        )
        config = uvicorn.Config(
            app,
            log_level="warning",
            log_config=None,  # leave the process's logging as its owner set it up
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            loop="asyncio",
            server_header=False,
            timeout_graceful_shutdown=3,
        )
        self._server = _Uvicorn(config, self._ready)
        self._thread = threading.Thread(
            target=self._serve, args=(sock,), name="dtask-console-http", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self.stop()
            raise RuntimeError(f"the console's server did not start: {self._failure!r}")

    def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        try:
            asyncio.run(self._server.serve(sockets=[sock]))
        except BaseException as exc:  # SystemExit included: uvicorn exits when startup fails
            self._failure = exc
            log.exception("the console's server failed")
        finally:
            sock.close()
            self._ready.set()

    def wait_for_viewer(self, timeout: float) -> bool:
        """Block until a page has opened the event stream, or ``timeout`` seconds passed."""
        return self.state.viewer.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """End the pages' streams, stop the watch and the server, join the thread."""
        self._stopped = True
        self.state.stop()
        if self._server is not None:
            self._server.should_exit = True
        stop_and_join(self._thread, timeout=timeout, logger=log, what="the console's server")
        self._executor.shutdown(wait=True)
        self._reads.shutdown(wait=True)
