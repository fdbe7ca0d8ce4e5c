"""``dtask node`` as an operator runs it: a subprocess serving a namespace with the built-in
CommandProvider (or a provider factory of one's own), its /metrics endpoint, its JSON logs, and
a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from tests.support import DtaskProcess

import distributedtask as dt
from distributedtask.providers import CommandProvider
from distributedtask.testing import free_port, wait_until

NS = "shell"
EXIT_ERROR = 3
EXIT_USAGE = 64
METRIC_FAMILIES = (
    "distributedtask_tasks_running",
    "distributedtask_task_starts_total",
    "distributedtask_task_terminations_total",
    "distributedtask_local_cleanups_total",
    "distributedtask_provider_errors_total",
    "distributedtask_start_latency_seconds",
    "distributedtask_watch_restarts_total",
    "distributedtask_resyncs_total",
)


class Node(DtaskProcess):
    """A ``dtask node`` subprocess; its stdout and stderr lines are collected as they come."""

    def logs(self) -> list[dict[str, Any]]:
        """stderr, each line parsed as the JSON object it must be."""
        return [json.loads(line) for line in self.err]

    def messages(self) -> list[str]:
        return [str(entry.get("msg")) for entry in self.logs()]


@pytest.fixture
def start_node(etcd_endpoint: str, dtask_prefix: str) -> Iterator[Any]:
    """``start_node(*args, env=...)``: ``dtask node`` on this test's prefix; killed after."""
    nodes: list[Node] = []

    def start(*args: str, env: Mapping[str, str] | None = None) -> Node:
        node = Node(
            ["--endpoints", etcd_endpoint, "--prefix", dtask_prefix, "node", *args], env=env
        )
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.kill()


def get_metrics(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None


def live_nodes(manager: dt.Manager) -> list[str]:
    return [member.node_id for member in manager.live_members()]


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (or is a zombie no one has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_started(node: Node, manager: dt.Manager, node_id: str, port: int | None = None) -> None:
    def ready() -> bool:
        if node.proc.poll() is not None:
            raise AssertionError(f"dtask node exited {node.proc.returncode}: {node.err}")
        return node_id in live_nodes(manager) and (port is None or get_metrics(port) is not None)

    wait_until(ready, timeout=15, message=f"node {node_id} registered and serving metrics")


def test_node_runs_a_command_task_serves_metrics_and_stops_on_sigterm(
    start_node: Any, manager: dt.Manager, etcd_client: dt.EtcdClient, tmp_path: Path
) -> None:
    port = free_port()
    state = tmp_path / "state"
    node = start_node(
        "--node-id", "n1",
        "--provider", f"{NS}=command",
        "--state-dir", str(state),
        "--metrics-port", str(port),
        "--member-ttl", "2",
    )  # fmt: skip
    wait_started(node, manager, "n1", port)
    member = manager.live_members()[0]
    assert member.namespaces == {NS}

    # a task that reports progress and succeeds
    payload = CommandProvider.payload(shell="echo 'progress: 0.5 half'; echo node=$DTASK_NODE_ID")
    task = manager.add_task(NS, "quick", payload, nodes=["n1"])
    done = manager.wait_for_task(NS, "quick", task.version, timeout=10)
    assert done.status is dt.TaskStatus.FINISHED, done.error
    assert done.finished_nodes == {"n1"}
    progress = manager.get_progress(NS, "quick", task.version)
    assert progress["n1"].fraction == 0.5 and progress["n1"].message == "half"
    run_dirs = list(state.glob(f"{NS}/quick/*/output.log"))
    assert len(run_dirs) == 1
    assert run_dirs[0].read_text() == "progress: 0.5 half\nnode=n1\n"

    metrics = get_metrics(port)
    assert metrics is not None
    assert f'distributedtask_task_starts_total{{namespace="{NS}"}} 1.0' in metrics.splitlines()
    for family in METRIC_FAMILIES:
        assert f"# TYPE {family} " in metrics, family
    assert f'distributedtask_tasks_running{{namespace="{NS}"}}' in metrics
    assert "distributedtask_start_latency_seconds_count" in metrics

    # every log line is a JSON object
    logs = node.logs()
    assert logs, "no log line"
    for entry in logs:
        assert {"ts", "level", "logger", "msg"} <= set(entry), entry
        assert entry["ts"].endswith("+00:00") and entry["level"] in {"debug", "info", "warning"}
    assert any(m == f"serving metrics on http://127.0.0.1:{port}/metrics" for m in node.messages())
    assert any(m.startswith("node n1 started") for m in node.messages())

    # a long task: SIGTERM stops it, the node leaves at once and exits 0
    pid_file = tmp_path / "long.pid"
    long_payload = CommandProvider.payload(shell=f"echo $$ > {pid_file}; exec sleep 60")
    long_task = manager.add_task(NS, "long", long_payload, nodes=["n1"])
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=10))
    assert not process_gone(pid)
    lease = etcd_client.range(manager.keys.member("n1")).kvs[0].lease
    assert lease

    began = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    assert node.wait(10) == 0, node.err
    stopped_in = time.monotonic() - began
    assert stopped_in < 5, stopped_in
    # gone at once: the lease was revoked (it would otherwise live up to 2 s more)
    assert manager.live_members() == []
    ttl, _ = etcd_client.call("lease/timetolive", {"ID": lease})
    assert int(ttl.get("TTL", -1)) == -1, ttl
    assert process_gone(pid)
    messages = node.messages()
    assert "node n1 stopping" in messages
    assert messages[-1] == "node n1 stopped"
    assert f"{NS}/long v{long_task.version} terminated" in messages
    assert node.out == []
    # terminating is not an outcome: the task is still running, for the node to resume
    after = manager.get_task(NS, "long")
    assert after is not None and after.status is dt.TaskStatus.STARTED


def test_node_with_sigint_also_stops_cleanly(
    start_node: Any, manager: dt.Manager, tmp_path: Path
) -> None:
    node = start_node(
        "--node-id", "n2", "--provider", f"{NS}=command", "--state-dir", str(tmp_path),
        "--member-ttl", "30",
    )  # fmt: skip
    wait_started(node, manager, "n2")
    node.proc.send_signal(signal.SIGINT)
    assert node.wait(10) == 0, node.err
    assert manager.live_members() == []  # a 30 s lease: only a revocation explains this
    assert node.messages()[-1] == "node n2 stopped"


PROVIDER_MODULE = '''
"""A tiny provider: writes the payload to <state_dir>/<id>.out and completes at once."""

import threading
from pathlib import Path


class Handle:
    def terminate(self):
        pass


class TinyProvider:
    def __init__(self, state_dir):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.recorder = None

    def set_completion_recorder(self, recorder):
        self.recorder = recorder

    def get_local_tasks(self):
        return []

    def cleanup_task(self, descriptor):
        pass

    def start_task(self, task):
        (self.state_dir / f"{task.id}.out").write_bytes(task.payload)
        threading.Thread(
            target=self.recorder.record_completion,
            args=(task.namespace, task.id, task.version),
        ).start()
        return Handle()


def make(state_dir):
    return TinyProvider(state_dir)


not_a_provider = 42
'''


def test_provider_factory_from_a_module(
    start_node: Any, manager: dt.Manager, tmp_path: Path
) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "tiny_dtask_provider.py").write_text(textwrap.dedent(PROVIDER_MODULE))
    state = tmp_path / "state"
    env = {"PYTHONPATH": os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", "")])}
    node = start_node(
        "--node-id", "n1",
        "--provider", "tiny=tiny_dtask_provider:make",
        "--provider", f"{NS}=command",
        "--state-dir", str(state),
        "--member-ttl", "2",
        env=env,
    )  # fmt: skip
    wait_started(node, manager, "n1")
    assert manager.live_members()[0].namespaces == {"tiny", NS}
    task = manager.add_task("tiny", "t1", b"hello from the test")  # nodes: the live ones
    assert task.nodes == {"n1"}
    done = manager.wait_for_task("tiny", "t1", task.version, timeout=10)
    assert done.status is dt.TaskStatus.FINISHED
    # the factory was given state_dir=<state-dir>/<namespace>
    assert (state / "tiny" / "t1.out").read_bytes() == b"hello from the test"
    node.proc.send_signal(signal.SIGTERM)
    assert node.wait(10) == 0, node.err


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("x=nosuchmodule_dtask:f", "cannot import provider module 'nosuchmodule_dtask'"),
        ("x=tiny_dtask_provider:nothing", "has no attribute 'nothing'"),
        ("x=tiny_dtask_provider:not_a_provider", "did not give a Provider"),
        ("x=tiny_dtask_provider", "is not 'command' or 'module:factory'"),
        ("nosign", "--provider wants NS=command or NS=module:factory"),
        ("=command", "--provider wants NS=command or NS=module:factory"),
    ],
)
def test_bad_provider_spec_is_a_usage_error(
    start_node: Any, manager: dt.Manager, tmp_path: Path, spec: str, fragment: str
) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "tiny_dtask_provider.py").write_text(textwrap.dedent(PROVIDER_MODULE))
    node = start_node(
        "--node-id", "n1", "--provider", spec, "--state-dir", str(tmp_path / "state"),
        env={"PYTHONPATH": str(modules)},
    )  # fmt: skip
    assert node.wait(15) == EXIT_USAGE, node.err
    err = node.err
    assert not any("Traceback" in line for line in err), err
    assert len(err) == 1, err
    assert err[0].startswith("dtask: usage error: ") and fragment in err[0], err
    assert manager.live_members() == []


def test_bad_log_level_is_a_usage_error(start_node: Any, tmp_path: Path) -> None:
    node = start_node(
        "--node-id", "n1", "--provider", f"{NS}=command", "--state-dir", str(tmp_path),
        "--log-level", "loud",
    )  # fmt: skip
    assert node.wait(15) == EXIT_USAGE
    assert node.err == ["dtask: usage error: unknown --log-level 'loud'"]


def test_node_with_etcd_unreachable_exits_with_an_error(tmp_path: Path) -> None:
    node = Node(
        [
            "--endpoints", f"http://127.0.0.1:{free_port()}", "--timeout", "0.5",
            "node", "--node-id", "n1", "--provider", f"{NS}=command",
            "--state-dir", str(tmp_path),
        ]
    )  # fmt: skip
    try:
        assert node.wait(30) == EXIT_ERROR, node.err
    finally:
        node.kill()
    err = node.err
    assert err[-1].startswith("dtask: error: etcd unreachable"), err
    assert not any("Traceback" in line for line in err), err


def test_node_with_a_taken_metrics_port_is_an_error(start_node: Any, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = start_node(
            "--node-id", "n1", "--provider", f"{NS}=command", "--state-dir", str(tmp_path),
            "--metrics-port", str(port),
        )  # fmt: skip
        status = node.wait(15)
    err = node.err
    assert not any("Traceback" in line for line in err), err
    assert status in {EXIT_ERROR, EXIT_USAGE}, (status, err)


_SIGNAL_TO_ANOTHER_THREAD = """
import signal, sys, threading
from datetime import timedelta
import distributedtask as dt
from distributedtask.node import NodeDaemon
from distributedtask.providers import CommandProvider

endpoint, prefix, state = sys.argv[1:4]
with dt.EtcdClient(endpoint) as client:
    manager = dt.Manager(client, prefix=prefix)
    daemon = NodeDaemon(
        manager, node_id="n1", providers={"x": CommandProvider(state)},
        member_ttl=timedelta(seconds=2),
    )
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
    ready = threading.Event()

    def kick() -> None:  # SIGTERM delivered to this thread, not to the main one
        ready.wait(30)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    kicker = threading.Thread(target=kick)
    kicker.start()
    daemon.run(ready)
    kicker.join()
    print("stopped")
"""


def test_a_sigterm_delivered_to_another_thread_still_stops_the_node(
    etcd_endpoint: str, dtask_prefix: str, tmp_path: Path
) -> None:
    # The kernel may deliver a process signal to any thread; Python runs the handler in the
    # main thread only when that thread runs code, so the daemon must not block unboundedly.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _SIGNAL_TO_ANOTHER_THREAD,
            etcd_endpoint,
            dtask_prefix,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stopped"
