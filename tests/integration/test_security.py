"""TLS and authentication end to end: one etcd with client TLS (``--client-cert-auth``,
certificates made in the test with trustme) and auth enabled, users limited to one prefix.

- the right credentials: Manager, Scheduler (lease, watch, recorder) and ``dtask`` (a
  subprocess: ``--ca-cert/--cert/--key``, ``--user`` with ``DTASK_PASSWORD`` or
  ``--password-file``) all work, also after etcd restarted and forgot every auth token;
- wrong password, wrong CA, missing client certificate: each is one clear, non-transient
  EtcdError (for ``dtask``: exit 3 and one line), raised at once: one connection through a
  TcpProxy (TLS passes through it; the proxy cannot read requests inside TLS, so etcd's own gRPC
  counters tell how many requests reached it);
- a user limited to one prefix can neither read nor write another (one request each, refused);
- ``dtask ui`` connects like every command (its console serves what the user may read; a wrong
  password is one error line, and nothing is served);
- no password or token appears in any log record (DEBUG over a whole run, urllib3 included),
  exception or ``repr``.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry
from tests.support import DtaskProcess, RecordingProvider, scheduler_threads

import distributedtask as dt
from distributedtask.testing import wait_until
from distributedtask.testing.etcd import EtcdServer, prefix_range_end
from distributedtask.testing.proxy import TcpProxy

pytestmark = pytest.mark.usefixtures("no_scheduler_thread_left")

trustme = pytest.importorskip("trustme")

NS = "ns"
EXIT_ERROR = 3
RUN_TIMEOUT = 30
ALICE_PREFIX = "/alice/"
BOB_PREFIX = "/bob/"


@dataclass
class Secure:
    """The TLS + auth etcd and everything needed to talk to it."""

    server: EtcdServer
    dir: Path
    passwords: dict[str, str]

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def client(
        self,
        user: str | None = "alice",
        *,
        endpoint: str | None = None,
        password: str | None = None,
        ca: str = "ca.pem",
        client_cert: bool = True,
        timeout: float = 5.0,
        watch_timeout: float = 660.0,
    ) -> dt.EtcdClient:
        """A client of this etcd (or of ``endpoint``), TLS files from the PKI dir."""
        return dt.EtcdClient(
            endpoint or self.endpoint,
            ca_cert=str(self.dir / ca),
            cert=str(self.dir / "client.pem") if client_cert else None,
            key=str(self.dir / "client.key") if client_cert else None,
            username=user,
            password=None if user is None else (password or self.passwords[user]),
            timeout=timeout,
            watch_timeout=watch_timeout,
        )

    def grpc_calls(self) -> Counter[str]:
        """Requests etcd handled, by gRPC method (the gateway turns each into one)."""
        text = requests.get(f"{self.server.metrics_url}/metrics", timeout=5).text
        counts: Counter[str] = Counter()
        for line in text.splitlines():
            match = re.match(r'grpc_server_handled_total\{.*grpc_method="(\w+)".*\} (\S+)', line)
            if match:
                counts[match.group(1)] += int(float(match.group(2)))
        return counts

    def secrets(self) -> list[str]:
        return list(self.passwords.values())


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("dtask-client")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server_cert.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server_cert.private_key_pem.write_to_path(str(d / "server.key"))
    client_cert.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client_cert.private_key_pem.write_to_path(str(d / "client.key"))
    trustme.CA().cert_pem.write_to_path(str(d / "other-ca.pem"))
    server = EtcdServer(
        name="secure",
        extra_args=[
            f"--cert-file={d}/server.pem",
            f"--key-file={d}/server.key",
            f"--trusted-ca-file={d}/ca.pem",
            "--client-cert-auth",
        ],
        mounts={str(d): str(d)},  # the docker backend sees the certificates at the same path
    )
    passwords = {name: f"{name}-pw-{secrets.token_hex(8)}" for name in ("root", "alice", "bob")}
    with server:
        secure = Secure(server, d, passwords)
        # users and roles, over TLS, then auth on (the harness's enable_auth speaks plain http)
        with secure.client(None) as admin:
            admin.call("auth/user/add", {"name": "root", "password": passwords["root"]})
            admin.call("auth/role/add", {"name": "root"})
            admin.call("auth/user/grant", {"user": "root", "role": "root"})
            for user, prefix in (("alice", ALICE_PREFIX), ("bob", BOB_PREFIX)):
                admin.call("auth/user/add", {"name": user, "password": passwords[user]})
                admin.call("auth/role/add", {"name": f"{user}-rw"})
                perm = {
                    "permType": "READWRITE",
                    "key": _b64(prefix),
                    "range_end": _b64(prefix_range_end(prefix)),
                }
                admin.call("auth/role/grant", {"name": f"{user}-rw", "perm": perm})
                admin.call("auth/user/grant", {"user": user, "role": f"{user}-rw"})
            admin.call("auth/enable", {})
        yield secure


@pytest.fixture
def proxy(secure: Secure) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", secure.server.client_port) as proxy:
        yield proxy


def https(proxy: TcpProxy) -> str:
    return f"https://127.0.0.1:{proxy.port}"


def prefix_of(user: str) -> str:
    return f"/{user}/dtask-{uuid.uuid4().hex[:8]}"


# ---- dtask ------------------------------------------------------------------------------------


def dtask(
    args: Sequence[str], env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DTASK_")}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "distributedtask", *args],
        capture_output=True,
        text=True,
        env=clean,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def conn_args(
    secure: Secure,
    *,
    endpoint: str | None = None,
    prefix: str,
    user: str | None = "alice",
    ca: str = "ca.pem",
    client_cert: bool = True,
    password_file: Path | None = None,
) -> list[str]:
    args = ["--endpoints", endpoint or secure.endpoint, "--prefix", prefix, "--timeout", "5"]
    args += ["--ca-cert", str(secure.dir / ca)]
    if client_cert:
        args += ["--cert", str(secure.dir / "client.pem"), "--key", str(secure.dir / "client.key")]
    if user is not None:
        args += ["--user", user]
    if password_file is not None:
        args += ["--password-file", str(password_file)]
    return args


def ok(result: subprocess.CompletedProcess[str], secure: Secure) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == "", result.stderr
    assert_no_secret(result.stdout, secure)
    return result.stdout


def one_error_line(result: subprocess.CompletedProcess[str], secure: Secure) -> str:
    assert result.returncode == EXIT_ERROR, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtask: error: "), result.stderr
    assert result.stdout == ""
    assert_no_secret(result.stderr, secure)
    return lines[0]


def assert_no_secret(text: str, secure: Secure, tokens: Sequence[str] = ()) -> None:
    for secret in [*secure.secrets(), *tokens]:
        assert secret not in text, f"a secret leaked into: {text[:300]}"


# ---- the right credentials, and no secret anywhere --------------------------------------------


def test_manager_scheduler_and_dtask_work_and_no_secret_is_ever_logged(
    secure: Secure, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the root: every logger, urllib3's and requests' included
    for name in ("urllib3", "requests", "distributedtask", "etcd3gw"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    prefix = prefix_of("alice")
    provider = RecordingProvider()
    tokens: set[str] = set()
    errors: list[BaseException] = []

    def remember_token(client: dt.EtcdClient) -> None:
        token = client._transport._token  # private: the one place the token lives
        if token:
            tokens.add(token)

    try:
        with secure.client("alice", timeout=5.0, watch_timeout=6.0) as client:
            manager = dt.Manager(client, prefix=prefix)
            scheduler = dt.Scheduler(
                manager,
                node_id="node-1",
                providers={NS: provider},
                member_ttl=timedelta(seconds=2),
                resync_interval=timedelta(hours=1),
                registry=CollectorRegistry(),
            )
            with scheduler:
                first = manager.add_task(NS, "t1", b"over tls")
                assert first.nodes == {"node-1"}
                remember_token(client)
                wait_until(lambda: provider.running() == {first.descriptor}, timeout=10)
                provider.complete(first)
                assert manager.wait_for_task(NS, "t1", first.version, timeout=10).status is (
                    dt.TaskStatus.FINISHED
                )

                # etcd forgets every (simple) token when it restarts: renewed, transparently
                secure.server.restart()
                second = manager.add_task(NS, "t2", nodes=["node-1"])
                remember_token(client)
                wait_until(
                    lambda: second.descriptor in provider.running(),
                    timeout=20,
                    message="the watch came back with a renewed token",
                )

                # dtask: password from the environment, then from a file
                env = {"DTASK_PASSWORD": secure.passwords["alice"]}
                listed = ok(dtask([*conn_args(secure, prefix=prefix), "list"], env), secure)
                assert "t1" in listed and "FINISHED" in listed and "t2" in listed
                password_file = tmp_path / "password"
                password_file.write_text(secure.passwords["alice"] + "\n")
                password_file.chmod(0o600)
                with_file = conn_args(secure, prefix=prefix, password_file=password_file)
                out = ok(dtask([*with_file, "add", NS, "t3", "--nodes", "node-1"]), secure)
                assert out.startswith(f"added {NS}/t3 version ")
                assert "node-1" in ok(dtask([*with_file, "members"]), secure)
                third = manager.get_task(NS, "t3")
                assert third is not None
                wait_until(lambda: third.descriptor in provider.running(), timeout=10)
                provider.complete(second)
                provider.complete(third)
                waited = dtask([*with_file, "wait", NS, "t3", "--plain", "--timeout-after", "20"])
                assert waited.returncode == 0, waited
                assert_no_secret(waited.stdout + waited.stderr, secure)
                remember_token(client)
                texts = [repr(client), repr(manager), repr(scheduler)]
            # stopped: every thread joined, the lease revoked (a write alice may do)
            assert manager.live_members() == []
            remember_token(client)
    except BaseException as exc:
        errors.append(exc)
        raise
    finally:
        for name in ("urllib3", "requests", "distributedtask", "etcd3gw"):
            logging.getLogger(name).setLevel(logging.NOTSET)
        records = caplog.records
        formatter = logging.Formatter()
        for record in records:
            text = record.getMessage() + repr(record.args)
            if record.exc_info:
                text += formatter.formatException(record.exc_info)
            assert_no_secret(text, secure, sorted(tokens))
        for error in errors:
            assert_no_secret(f"{error!s} {error!r}", secure, sorted(tokens))
    assert tokens, "no auth token was ever obtained"
    assert any(r.name.startswith("urllib3") for r in records), "urllib3 was not captured"
    assert any(r.name.startswith("distributedtask") for r in records)
    for text in texts:
        assert_no_secret(text, secure, sorted(tokens))
        assert "alice" in texts[0]  # the user name is shown, never the password


# ---- wrong credentials ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    expected: str  # what the error message says
    password: str | None = None  # None: the right one
    ca: str = "ca.pem"
    client_cert: bool = True


CASES = {
    "wrong password": Case("authentication failed", password="not-the-password"),
    "wrong CA": Case("TLS", ca="other-ca.pem"),
    "no client certificate": Case("TLS", client_cert=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrong_credentials_give_one_clear_error_at_once(
    case: str, secure: Secure, proxy: TcpProxy, tmp_path: Path
) -> None:
    bad = CASES[case]
    expected = bad.expected
    endpoint = https(proxy)
    password = bad.password or secure.passwords["alice"]
    prefix = prefix_of("alice")

    # ---- the library
    proxy.reset_counts()
    calls = secure.grpc_calls()
    with secure.client(
        "alice", endpoint=endpoint, password=password, ca=bad.ca, client_cert=bad.client_cert
    ) as client:
        manager = dt.Manager(client, prefix=prefix)
        began = time.monotonic()
        with pytest.raises(dt.EtcdError) as info:
            manager.list_tasks()
        elapsed = time.monotonic() - began
        error = info.value
        assert expected in str(error), str(error)
        assert "\n" not in str(error)
        assert not error.transient and error.endpoint == endpoint
        assert elapsed < 3.0, f"{elapsed:.1f}s: retried instead of failing at once"
        assert proxy.accepted == 1  # one connection: no retry, no fail-over storm
        handled = secure.grpc_calls() - calls
        assert handled == (Counter({"Authenticate": 1}) if case == "wrong password" else Counter())
        for text in (str(error), repr(error), repr(client), repr(manager)):
            assert password not in text and secure.passwords["alice"] not in text
        # a Scheduler cannot start with these credentials either, and leaves nothing running
        scheduler = dt.Scheduler(
            manager,
            node_id="node-1",
            providers={NS: RecordingProvider()},
            registry=CollectorRegistry(),
        )
        with pytest.raises(dt.EtcdError, match=expected):
            scheduler.start()
        scheduler.stop()

    # ---- dtask
    password_file = tmp_path / "password"
    password_file.write_text(password)
    proxy.reset_counts()
    calls = secure.grpc_calls()
    args = conn_args(
        secure,
        endpoint=endpoint,
        prefix=prefix,
        ca=bad.ca,
        client_cert=bad.client_cert,
        password_file=password_file,
    )
    line = one_error_line(dtask([*args, "list"]), secure)
    assert expected in line
    assert password not in line
    assert proxy.accepted == 1
    handled = secure.grpc_calls() - calls
    assert handled == (Counter({"Authenticate": 1}) if case == "wrong password" else Counter())


def test_a_missing_client_certificate_is_named_plainly(secure: Secure) -> None:
    with (
        secure.client("alice", client_cert=False) as client,
        pytest.raises(dt.EtcdError) as info,
    ):
        client.range(b"/alice/x")
    message = str(info.value)
    assert "certificate" in message.lower()
    assert "Max retries exceeded" not in message  # urllib3's wording: there was no retry
    assert message.count("(") == message.count(")")  # not cut in the middle


def test_no_credentials_at_all_is_refused_clearly(secure: Secure, proxy: TcpProxy) -> None:
    with secure.client(None, endpoint=https(proxy)) as anonymous:
        with pytest.raises(dt.EtcdError, match="authentication") as info:
            dt.Manager(anonymous, prefix=prefix_of("alice")).list_tasks()
        assert not info.value.transient
    assert proxy.accepted == 1


# ---- one prefix per user ----------------------------------------------------------------------


def test_a_user_limited_to_one_prefix_cannot_read_or_write_another(secure: Secure) -> None:
    bob_prefix = prefix_of("bob")
    with secure.client("bob") as bob_client, secure.client("alice") as alice_client:
        bob = dt.Manager(bob_client, prefix=bob_prefix)
        task = bob.add_task(NS, "bobs", b"private", nodes=["b1"])
        alice_own = dt.Manager(alice_client, prefix=prefix_of("alice"))
        alice_own.add_task(NS, "mine", nodes=["a1"])  # her own prefix works
        alice = dt.Manager(alice_client, prefix=bob_prefix)

        attempts = {
            "list_tasks": alice.list_tasks,
            "get_task": lambda: alice.get_task(NS, "bobs"),
            "add_task": lambda: alice.add_task(NS, "intruder", nodes=["a1"]),
            "cancel_task": lambda: alice.cancel_task(NS, "bobs", task.version),
            "record_node_completion": lambda: alice.record_node_completion(
                NS, "bobs", task.version, "b1"
            ),
            "live_members": alice.live_members,
            "snapshot": alice.snapshot,
        }
        for name, attempt in attempts.items():
            calls = secure.grpc_calls()
            with pytest.raises(dt.EtcdError, match="permission denied") as info:
                attempt()
            assert not info.value.transient, name
            handled = sum((secure.grpc_calls() - calls).values())
            assert handled == 1, f"{name}: {handled} requests, want one refused request"

        # a Scheduler of alice's on bob's prefix cannot start
        before = scheduler_threads()
        scheduler = dt.Scheduler(
            alice, node_id="a1", providers={NS: RecordingProvider()}, registry=CollectorRegistry()
        )
        with pytest.raises(dt.EtcdError, match="permission denied"):
            scheduler.start()
        scheduler.stop()
        assert scheduler_threads() == before

        # nor can dtask
        env = {"DTASK_PASSWORD": secure.passwords["alice"]}
        line = one_error_line(dtask([*conn_args(secure, prefix=bob_prefix), "list"], env), secure)
        assert "permission denied" in line

        # bob's task is untouched, and bob sees nothing of alice's
        assert bob.get_task(NS, "bobs") == task
        assert bob.get_task(NS, "intruder") is None
        with pytest.raises(dt.EtcdError, match="permission denied"):
            dt.Manager(bob_client, prefix=ALICE_PREFIX + "x").list_tasks()


# ---- the web console --------------------------------------------------------------------------


def test_dtask_ui_connects_with_tls_and_auth_like_every_command(
    secure: Secure, tmp_path: Path
) -> None:
    pytest.importorskip("starlette", reason="dtask ui needs the ui extra")
    prefix = prefix_of("alice")
    with secure.client("alice") as client:
        dt.Manager(client, prefix=prefix).add_task(NS, "job", nodes=["node-1"])
    password_file = tmp_path / "password"
    password_file.write_text(secure.passwords["alice"])
    args = [*conn_args(secure, prefix=prefix, password_file=password_file), "ui", "--port", "0"]
    process = DtaskProcess(args)
    try:

        def url() -> str | None:
            found = [re.search(r" at (http://\S+/) ", line) for line in process.out]
            assert process.proc.poll() is None, process.err
            return next((match.group(1) for match in found if match), None)

        served = wait_until(url, timeout=30, message="the console's URL")
        tasks = requests.get(f"{served}api/tasks", timeout=5).json()["tasks"]
        assert [(task["namespace"], task["ID"]) for task in tasks] == [(NS, "job")]
        process.proc.terminate()
        assert process.wait(20) == 0, process.err
        assert_no_secret("\n".join([*process.out, *process.err]), secure)
    finally:
        process.kill()

    password_file.write_text("not-the-password")
    line = one_error_line(dtask(args), secure)
    assert "authentication failed" in line
