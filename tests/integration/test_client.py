"""EtcdClient against real etcd: unreachable, restarted, paused, fail-over, auth, TLS."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import distributedtask as dt
from distributedtask.testing.etcd import EtcdServer, enable_auth, free_port
from distributedtask.testing.proxy import TcpProxy

pytestmark = pytest.mark.manager


def test_unreachable_etcd_gives_etcd_error_within_a_bounded_time() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    with dt.EtcdClient(endpoint, timeout=1.0) as client:
        manager = dt.Manager(client, prefix="/unreachable")
        began = time.monotonic()
        with pytest.raises(dt.EtcdError) as info:
            manager.add_task("ns", "t", nodes=["n1"])
        elapsed = time.monotonic() - began
    assert info.value.transient and info.value.endpoint == endpoint
    assert "unreachable" in str(info.value)
    assert elapsed < 10  # retried for about `timeout`, never a hang


def test_paused_etcd_gives_etcd_error_not_a_hang(etcd_private: EtcdServer) -> None:
    with dt.EtcdClient(etcd_private.endpoint, timeout=1.0) as client:
        client.status()
        etcd_private.pause()
        try:
            began = time.monotonic()
            with pytest.raises(dt.EtcdError, match="timed out"):
                client.range(b"/x")
            assert time.monotonic() - began < 10
        finally:
            etcd_private.unpause()
        client.range(b"/x")  # and it recovers


def test_etcd_restarted_between_two_calls(etcd_private: EtcdServer, dtask_prefix: str) -> None:
    with dt.EtcdClient(etcd_private.endpoint, timeout=5.0) as client:
        manager = dt.Manager(client, prefix=dtask_prefix)
        task = manager.add_task("ns", "t", nodes=["n1"])
        etcd_private.restart()
        assert manager.get_task("ns", "t") == task  # the pooled connection died; retried
        etcd_private.kill()
        etcd_private.restart()
        assert manager.record_node_completion("ns", "t", task.version, "n1").status.value == (
            "FINISHED"
        )


def test_fail_over_to_the_next_endpoint(etcd_endpoint: str, dtask_prefix: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with dt.EtcdClient([dead, etcd_endpoint], timeout=2.0) as client:
        manager = dt.Manager(client, prefix=dtask_prefix)
        manager.add_task("ns", "t", nodes=["n1"])
        assert manager.get_task("ns", "t") is not None


def test_fail_over_when_the_current_endpoint_goes_away(
    etcd_endpoint: str, etcd_proxy: TcpProxy, dtask_prefix: str
) -> None:
    with dt.EtcdClient([etcd_proxy.endpoint, etcd_endpoint], timeout=2.0) as client:
        manager = dt.Manager(client, prefix=dtask_prefix)
        manager.add_task("ns", "t", nodes=["n1"])
        etcd_proxy.block()
        assert manager.get_task("ns", "t") is not None


def test_closed_client_refuses_calls(etcd_endpoint: str) -> None:
    client = dt.EtcdClient(etcd_endpoint)
    client.close()
    client.close()
    with pytest.raises(dt.EtcdError, match="closed"):
        client.range(b"/x")


def test_bad_request_is_not_retried(etcd_proxy: TcpProxy) -> None:
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=2.0) as client:
        etcd_proxy.reset_counts()
        with pytest.raises(dt.EtcdError) as info:
            client.range(b"/x", revision=10**12)  # a future revision: etcd refuses
        assert not info.value.transient and info.value.code == 11
        assert "future revision" in str(info.value)
        assert etcd_proxy.requests == 1


@pytest.fixture
def auth_etcd(etcd_private: EtcdServer) -> EtcdServer:
    enable_auth(
        etcd_private.endpoint,
        "root-secret",
        {"alice": ("alice-secret", "/alice/"), "bob": ("bob-secret", "/bob/")},
    )
    return etcd_private


def test_auth_right_password_works_and_a_wrong_one_fails_at_once(auth_etcd: EtcdServer) -> None:
    with dt.EtcdClient(auth_etcd.endpoint, username="alice", password="alice-secret") as client:
        manager = dt.Manager(client, prefix="/alice/dtask")
        task = manager.add_task("ns", "t", b"x", nodes=["n1"])
        assert manager.get_task("ns", "t") == task
        assert "alice-secret" not in repr(client)
        # a prefix alice has no role for
        other = dt.Manager(client, prefix="/bob/dtask")
        with pytest.raises(dt.EtcdError, match="permission") as denied:
            other.list_tasks()
        assert not denied.value.transient

    with (
        TcpProxy("127.0.0.1", auth_etcd.client_port) as proxy,
        dt.EtcdClient(
            proxy.endpoint, username="alice", password="wrong-password", timeout=5.0
        ) as client,
    ):
        began = time.monotonic()
        with pytest.raises(dt.EtcdError, match="authentication failed") as info:
            dt.Manager(client, prefix="/alice/dtask").list_tasks()
        assert time.monotonic() - began < 3
        assert proxy.requests == 1  # no retry storm
        assert "wrong-password" not in str(info.value) and "wrong-password" not in repr(client)

    with (
        dt.EtcdClient(auth_etcd.endpoint) as anonymous,
        pytest.raises(dt.EtcdError, match="authentication"),
    ):
        anonymous.range(b"/alice/x")


def test_auth_token_is_renewed_when_etcd_forgets_it(auth_etcd: EtcdServer) -> None:
    with dt.EtcdClient(auth_etcd.endpoint, username="alice", password="alice-secret") as client:
        manager = dt.Manager(client, prefix="/alice/dtask")
        task = manager.add_task("ns", "t", nodes=["n1"])
        auth_etcd.restart()  # simple tokens live in memory: every one is now invalid
        assert manager.get_task("ns", "t") == task


def test_tls_with_client_certificates(tmp_path: Path, dtask_prefix: str) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client")
    files = {
        "ca.pem": ca.cert_pem,
        "server.pem": server_cert.cert_chain_pems[0],
        "server.key": server_cert.private_key_pem,
        "client.pem": client_cert.cert_chain_pems[0],
        "client.key": client_cert.private_key_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / name))
    other_ca = trustme.CA()
    other_ca.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    d = str(tmp_path)
    server = EtcdServer(
        name="tls",
        extra_args=[
            f"--cert-file={d}/server.pem",
            f"--key-file={d}/server.key",
            f"--trusted-ca-file={d}/ca.pem",
            "--client-cert-auth",
        ],
        mounts={d: d},
    )
    with server:
        assert server.endpoint.startswith("https://")
        with dt.EtcdClient(
            server.endpoint, ca_cert=f"{d}/ca.pem", cert=f"{d}/client.pem", key=f"{d}/client.key"
        ) as client:
            manager = dt.Manager(client, prefix=dtask_prefix)
            assert manager.add_task("ns", "t", nodes=["n1"]).status is dt.TaskStatus.STARTED
        with dt.EtcdClient(
            server.endpoint,
            ca_cert=f"{d}/other-ca.pem",
            cert=f"{d}/client.pem",
            key=f"{d}/client.key",
            timeout=5.0,
        ) as wrong_ca:
            began = time.monotonic()
            with pytest.raises(dt.EtcdError, match="TLS") as info:
                wrong_ca.range(b"/x")
            assert not info.value.transient and time.monotonic() - began < 3
        with (
            dt.EtcdClient(server.endpoint, ca_cert=f"{d}/ca.pem", timeout=5.0) as no_cert,
            pytest.raises(dt.EtcdError) as missing,
        ):
            no_cert.range(b"/x")
        assert not missing.value.transient
