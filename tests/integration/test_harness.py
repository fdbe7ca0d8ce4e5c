"""Tests of the harness against real etcd (whichever backend DTASK_ETCD_BACKEND selects).

They speak to etcd only through its HTTP gateway with `requests`, never through the library,
so a bug in the library cannot hide a bug in the harness.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests

from distributedtask.testing import (
    EtcdCluster,
    EtcdHarnessError,
    EtcdHttpError,
    EtcdServer,
    TcpProxy,
    auth_token,
    compact,
    current_revision,
    enable_auth,
    kv_get,
    kv_put,
    wait_until,
)


def _answers(endpoint: str) -> bool:
    return current_revision(endpoint) > 0


# -- single server


def test_kill_and_restart_keep_data_and_ports(etcd_private: EtcdServer) -> None:
    endpoint = etcd_private.endpoint
    revision = kv_put(endpoint, "/k", "v1")
    etcd_private.kill()
    assert not etcd_private.running
    with pytest.raises(requests.ConnectionError):
        kv_get(endpoint, "/k", timeout=1.0)
    etcd_private.restart()
    assert etcd_private.endpoint == endpoint
    assert kv_get(endpoint, "/k") == b"v1"
    assert kv_put(endpoint, "/k", "v2") == revision + 1
    etcd_private.stop()  # graceful, then start again
    etcd_private.start()
    assert kv_get(endpoint, "/k") == b"v2"
    assert "ready to serve client requests" in etcd_private.logs()


def test_pause_makes_requests_hang_until_unpause(etcd_private: EtcdServer) -> None:
    kv_put(etcd_private.endpoint, "/p", "x")
    etcd_private.pause()
    assert etcd_private.paused
    with pytest.raises(requests.Timeout):
        kv_get(etcd_private.endpoint, "/p", timeout=0.3)
    etcd_private.unpause()
    assert kv_get(etcd_private.endpoint, "/p") == b"x"


def test_kill_while_paused(etcd_private: EtcdServer) -> None:
    etcd_private.pause()
    etcd_private.kill()
    etcd_private.restart()
    assert _answers(etcd_private.endpoint)


def test_close_keeps_the_last_logs_and_removes_everything() -> None:
    server = EtcdServer(name="closing")
    with server:
        kv_put(server.endpoint, "/a", "b")
        data_dir = server.data_dir
    assert server.closed
    assert "ready to serve client requests" in server.logs()
    if server.backend == "process":
        assert data_dir is not None
        assert not Path(data_dir).exists()
    with pytest.raises(requests.ConnectionError):
        current_revision(server.endpoint)


def test_start_failure_reports_the_etcd_log(etcd_private: EtcdServer) -> None:
    clash = EtcdServer(name="clash", client_port=etcd_private.client_port)
    with pytest.raises(EtcdHarnessError, match="exited while starting") as info:
        clash.start(timeout=20)
    clash.close()
    assert "address already in use" in str(info.value)


def test_tls_server_with_mounted_certificates(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    server = EtcdServer(
        name="tls",
        extra_args=[f"--cert-file={cert_file}", f"--key-file={key_file}"],
        mounts={str(tmp_path): str(tmp_path)},
    )
    with server:
        assert server.endpoint.startswith("https://127.0.0.1:")
        response = requests.post(
            f"{server.endpoint}/v3/maintenance/status", json={}, verify=str(ca_file), timeout=5
        )
        response.raise_for_status()
        assert response.json()["version"].startswith("3.5")
        with pytest.raises(requests.exceptions.SSLError):
            requests.post(f"{server.endpoint}/v3/maintenance/status", json={}, timeout=5)


def test_compaction_makes_old_revisions_unreadable(etcd_private: EtcdServer) -> None:
    endpoint = etcd_private.endpoint
    first = kv_put(endpoint, "/c", "1")
    kv_put(endpoint, "/c", "2")
    last = kv_put(endpoint, "/c", "3")
    assert current_revision(endpoint) == last
    assert kv_get(endpoint, "/c", revision=first) == b"1"
    assert compact(endpoint) == last
    with pytest.raises(EtcdHttpError, match="required revision has been compacted") as info:
        kv_get(endpoint, "/c", revision=first)
    assert info.value.status == 400
    assert info.value.code == 11  # OUT_OF_RANGE
    assert kv_get(endpoint, "/c", revision=last) == b"3"

    # A watch from before the compaction is cancelled with the compact revision.
    key = base64.b64encode(b"/c").decode()
    body = {"create_request": {"key": key, "start_revision": str(first)}}
    with requests.post(f"{endpoint}/v3/watch", json=body, stream=True, timeout=5) as response:
        for line in response.iter_lines():
            result = json.loads(line)["result"]
            if result.get("canceled"):
                assert int(result["compact_revision"]) == last
                break
        else:
            pytest.fail("the watch ended without being cancelled")


def test_enable_auth_limits_users_to_their_prefix(etcd_private: EtcdServer) -> None:
    endpoint = etcd_private.endpoint
    enable_auth(endpoint, "rootpw", {"alice": ("alicepw", "/alice/")})
    with pytest.raises(EtcdHttpError, match="user name is empty"):
        kv_put(endpoint, "/alice/x", "1")
    alice = auth_token(endpoint, "alice", "alicepw")
    kv_put(endpoint, "/alice/x", "1", token=alice)
    assert kv_get(endpoint, "/alice/x", token=alice) == b"1"
    with pytest.raises(EtcdHttpError, match="permission denied"):
        kv_put(endpoint, "/bob/x", "1", token=alice)
    with pytest.raises(EtcdHttpError, match="authentication failed"):
        auth_token(endpoint, "alice", "wrong")
    root = auth_token(endpoint, "root", "rootpw")
    kv_put(endpoint, "/bob/x", "2", token=root)
    etcd_private.restart()  # readiness checks work with auth on
    assert kv_get(endpoint, "/alice/x", token=auth_token(endpoint, "alice", "alicepw")) == b"1"


# -- cluster


@pytest.mark.cluster
def test_cluster_fails_over_and_rejoins(etcd_cluster: EtcdCluster) -> None:
    leader = etcd_cluster.wait_for_leader()
    assert etcd_cluster.leader_index() == leader
    endpoints = etcd_cluster.endpoints
    kv_put(endpoints[leader], "/x", "before")

    etcd_cluster.kill(leader)
    successor = etcd_cluster.wait_for_leader(not_index=leader)
    assert successor != leader
    kv_put(endpoints[successor], "/x", "after")

    etcd_cluster.restart(leader)
    etcd_cluster.wait_healthy()
    for endpoint in endpoints:  # linearizable reads, so every member answers the latest
        assert kv_get(endpoint, "/x") == b"after"


@pytest.mark.cluster
def test_cluster_paused_leader_is_replaced(etcd_cluster: EtcdCluster) -> None:
    leader = etcd_cluster.wait_for_leader()
    etcd_cluster.pause(leader)
    successor = etcd_cluster.wait_for_leader(not_index=leader)
    kv_put(etcd_cluster.endpoints[successor], "/y", "1")
    etcd_cluster.unpause(leader)
    etcd_cluster.wait_healthy()
    assert kv_get(etcd_cluster.endpoints[leader], "/y") == b"1"
    assert "became leader" in etcd_cluster.logs()


# -- proxy in front of the session etcd


def test_proxy_counts_requests(etcd_proxy: TcpProxy, dtask_prefix: str) -> None:
    etcd_proxy.reset_counts()
    with requests.Session() as session:
        for i in range(5):
            response = session.post(
                f"{etcd_proxy.endpoint}/v3/kv/put",
                json={
                    "key": base64.b64encode(f"{dtask_prefix}/{i}".encode()).decode(),
                    "value": base64.b64encode(b"v").decode(),
                },
                timeout=5,
            )
            response.raise_for_status()
    assert etcd_proxy.requests == 5
    assert etcd_proxy.accepted == 1  # keep-alive: one connection
    assert kv_get(etcd_proxy.endpoint, f"{dtask_prefix}/4") == b"v"
    assert etcd_proxy.requests == 6


def test_proxy_cut_breaks_a_watch_stream(etcd_proxy: TcpProxy, dtask_prefix: str) -> None:
    key = base64.b64encode(dtask_prefix.encode()).decode()
    with requests.post(
        f"{etcd_proxy.endpoint}/v3/watch",
        json={"create_request": {"key": key}},
        stream=True,
        timeout=10,
    ) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["result"]["created"]
        assert etcd_proxy.connections == 1
        assert etcd_proxy.cut() == 1
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            next(lines)
    assert etcd_proxy.connections == 0
    assert _answers(etcd_proxy.endpoint)  # new connections work at once


def test_proxy_block_refuses_until_unblocked(etcd_proxy: TcpProxy) -> None:
    assert _answers(etcd_proxy.endpoint)
    etcd_proxy.block()
    with pytest.raises(requests.ConnectionError):
        current_revision(etcd_proxy.endpoint)
    etcd_proxy.unblock()
    assert wait_until(lambda: _answers(etcd_proxy.endpoint), ignore=(requests.ConnectionError,))


def test_proxy_loses_a_response_but_the_write_happened(
    etcd_proxy: TcpProxy, etcd_endpoint: str, dtask_prefix: str
) -> None:
    etcd_proxy.drop_next_response()
    with pytest.raises(requests.ConnectionError):
        kv_put(etcd_proxy.endpoint, f"{dtask_prefix}/lost", "written")
    assert etcd_proxy.dropped == 1
    assert kv_get(etcd_endpoint, f"{dtask_prefix}/lost") == b"written"
    assert kv_get(etcd_proxy.endpoint, f"{dtask_prefix}/lost") == b"written"


def test_proxy_in_front_of_a_killed_server(etcd_private: EtcdServer) -> None:
    with TcpProxy("127.0.0.1", etcd_private.client_port) as proxy:
        assert _answers(proxy.endpoint)
        etcd_private.kill()
        with pytest.raises(requests.ConnectionError):
            current_revision(proxy.endpoint)
        etcd_private.restart()
        assert _answers(proxy.endpoint)


# -- the plugin itself, in a pytest of its own


INNER_TESTS = """
import os
import requests
from distributedtask.testing import kv_put


def test_external(etcd_server, etcd_endpoint, etcd_backend):
    assert etcd_endpoint == os.environ["DTASK_ETCD_ENDPOINT"]
    assert etcd_backend == "external"
    etcd_server.kill()  # skips


def test_prefix(dtask_prefix):
    assert dtask_prefix.startswith("/dtask-test/test_prefix-")


def test_fails_with_logs(etcd_private):
    kv_put(etcd_private.endpoint, "/k", "v")
    assert False, "on purpose"
"""


def test_plugin_reports_etcd_logs_and_honours_an_external_endpoint(
    etcd_private: EtcdServer, tmp_path: Path
) -> None:
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    entry_points = importlib.metadata.entry_points(group="pytest11")
    installed = any(ep.value == "distributedtask.testing.plugin" for ep in entry_points)
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "test_inner.py"]
    if not installed:
        command[3:3] = ["-p", "distributedtask.testing.plugin"]
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {
        **os.environ,
        "DTASK_ETCD_ENDPOINT": etcd_private.endpoint,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "1 failed, 1 passed, 1 skipped" in output, output
    assert "cannot kill the etcd at $DTASK_ETCD_ENDPOINT" in output, output
    assert "etcd log: private etcd" in output, output
    assert "ready to serve client requests" in output, output
