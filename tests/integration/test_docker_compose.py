"""docker/: the three-member etcd cluster of docker/compose.yaml, driven by ``dtask``.

The cluster is brought up from docker/compose.yaml itself with the compose CLI (the ``docker
compose`` plugin, else Debian's ``docker-compose``), under a unique project name; everything —
containers and named volumes — is removed at the end, failed or not. ``dtask`` runs as a
subprocess (``python -m distributedtask``) against it, and so does a ``dtask node`` serving the
example provider of contrib/. Then one member is killed (``docker kill``) and ``dtask`` and the
node go on with the other two.

Skipped, with the reason, when no Docker engine answers, when there is no compose CLI, or when
one of the compose file's fixed ports (127.0.0.1:23791-23793, 23801-23803) is taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from distributedtask.metrics import METRIC_NAMES
from distributedtask.testing import (
    build_image,
    docker_available,
    etcd_image_tag,
    free_port,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
BUILD_SCRIPT = ROOT / "docker" / "build-image.sh"
SERVICES = ("etcd1", "etcd2", "etcd3")
CLIENT_PORTS = (23791, 23792, 23793)
PEER_PORTS = (23801, 23802, 23803)
ENDPOINTS = ",".join(f"http://127.0.0.1:{port}" for port in CLIENT_PORTS)
EXAMPLE = "contrib.providers.example_provider:make_provider"


# ---- the compose file, read as text (no Docker needed) ---------------------------------------


def test_compose_file_describes_the_cluster() -> None:
    text = COMPOSE_FILE.read_text()
    images = set(re.findall(r"^\s*image:\s*(\S+)\s*$", text, re.MULTILINE))
    assert images == {etcd_image_tag()}, "compose.yaml must use the image build_image() builds"
    assert re.search(r"^\s*pull_policy:\s*never\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*network_mode:\s*host\s*$", text, re.MULTILINE)
    assert "--experimental-watch-progress-notify-interval=5s" in text
    initial = ",".join(
        f"{name}=http://127.0.0.1:{port}" for name, port in zip(SERVICES, PEER_PORTS, strict=True)
    )
    assert f"--initial-cluster={initial}" in text
    for name, client, peer in zip(SERVICES, CLIENT_PORTS, PEER_PORTS, strict=True):
        assert re.search(rf"^  {name}:\s*$", text, re.MULTILINE), name
        for flag in ("listen-client-urls", "advertise-client-urls"):
            assert f"--{flag}=http://127.0.0.1:{client}" in text
        for flag in ("listen-peer-urls", "initial-advertise-peer-urls"):
            assert f"--{flag}=http://127.0.0.1:{peer}" in text
        assert f"- {name}-data:/data" in text
    # Only loopback addresses: nothing else may be a network target here.
    assert set(re.findall(r"https?://([\d.]+):", text)) == {"127.0.0.1"}


# ---- Docker and compose ----------------------------------------------------------------------


def compose_cli() -> list[str] | None:
    """``docker compose`` (the plugin) if it answers, else ``docker-compose``, else None."""
    if shutil.which("docker"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run(
                ["docker", "compose", "version"], capture_output=True, timeout=20, check=False
            )
            if probe.returncode == 0:
                return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def taken_ports(ports: Sequence[int]) -> list[int]:
    """The ports something listens on (SO_REUSEADDR, as etcd's Go listeners: connections in
    TIME_WAIT from an earlier run do not count)."""
    taken = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                taken.append(port)
    return taken


def needs_docker() -> None:
    if not docker_available():
        pytest.skip("no Docker engine answers")


def run(
    argv: Sequence[str],
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False
    )


@dataclass
class ComposeCluster:
    cli: list[str]
    project: str

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [*self.cli, "--file", str(COMPOSE_FILE), "--project-name", self.project, *args]
        return run(argv, timeout=timeout, cwd=ROOT)

    def container(self, service: str) -> str:
        result = self.compose("ps", "-q", service)
        assert result.returncode == 0 and result.stdout.strip(), result.stderr
        return result.stdout.strip().splitlines()[0]

    def logs(self) -> str:
        result = self.compose("logs", "--no-color", "--tail", "40")
        return result.stdout + result.stderr

    def leftovers(self) -> list[str]:
        """Containers and volumes of the project still present."""
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in ("container", "volume"):
            extra = ["--all"] if kind == "container" else []
            listing = run(["docker", kind, "ls", *extra, "--quiet", "--filter", label])
            found += [f"{kind} {item}" for item in listing.stdout.split()]
        return found

    def remove(self) -> None:
        """Remove every container and volume of the project, whatever state it is in."""
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "5")
        for item in self.leftovers():  # belt and braces: compose may have failed half-way
            kind, ident = item.split()
            if kind == "container":
                run(["docker", "rm", "--force", "--volumes", ident])
            else:
                run(["docker", "volume", "rm", "--force", ident])


def healthy(port: int) -> bool:
    try:
        response = requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
        return response.status_code == 200 and response.json().get("health") == "true"
    except (requests.RequestException, ValueError):
        return False


@pytest.fixture(scope="module")
def cluster() -> Iterator[ComposeCluster]:
    needs_docker()
    cli = compose_cli()
    if cli is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed "
            "(Debian: apt-get install docker-compose)"
        )
    taken = taken_ports(CLIENT_PORTS + PEER_PORTS)
    if taken:
        pytest.skip(f"ports of docker/compose.yaml already in use on 127.0.0.1: {taken}")
    build_image()  # the image compose.yaml names; never pulled (pull_policy: never)
    cluster = ComposeCluster(cli, f"dtask-test-{uuid.uuid4().hex[:10]}")
    try:
        up = cluster.compose("up", "--detach")
        assert up.returncode == 0, f"compose up failed:\n{up.stdout}{up.stderr}"
        try:
            wait_until(
                lambda: all(healthy(port) for port in CLIENT_PORTS),
                60,
                0.2,
                "all three members healthy",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{cluster.logs()}") from None
        yield cluster
    finally:
        cluster.remove()
        left = cluster.leftovers()
        assert not left, f"left behind: {left}"


# ---- dtask and a node against the cluster ----------------------------------------------------


@dataclass
class Dtask:
    env: dict[str, str]

    def __call__(
        self, *args: str, expect: int | None = 0, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = run(
            [sys.executable, "-m", "distributedtask", *args],
            timeout=timeout,
            env=self.env,
            cwd=ROOT,
        )
        if expect is not None:
            assert result.returncode == expect, (
                f"dtask {' '.join(args)}: exit {result.returncode}, wanted {expect}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def json(self, *args: str) -> object:
        return json.loads(self(*args).stdout)

    def members(self) -> list[str]:
        members = self.json("members", "--json")
        assert isinstance(members, list)
        return [member["node"] for member in members]


@pytest.fixture(scope="module")
def dtask(cluster: ComposeCluster) -> Dtask:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTASK_")}
    env.update(
        DTASK_ENDPOINTS=ENDPOINTS,  # etcd1 first: after it is killed, dtask must fail over
        DTASK_PREFIX=f"/dtask-compose-{uuid.uuid4().hex[:8]}",
        DTASK_TIMEOUT="5",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return Dtask(env)


@dataclass
class Node:
    process: subprocess.Popen[bytes]
    log: Path
    metrics_port: int
    state_dir: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def node(dtask: Dtask, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("compose-node")
    port = free_port()
    with (base / "node.log").open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "distributedtask", "node",
                "--node-id", "node-1",
                "--provider", f"reports={EXAMPLE}",
                "--state-dir", str(base / "state"),
                "--metrics-port", str(port),
                "--node-loss-grace", "-1",
            ],
            env=dtask.env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    node = Node(process, base / "node.log", port, base / "state")
    try:
        try:
            wait_until(lambda: "node-1" in dtask.members(), 30, 0.2, "node-1 is a member")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- node log\n{node.logs()}") from None
        yield node
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def run_report(dtask: Dtask, node: Node, task_id: str) -> dict[str, object]:
    """Add a run of the example provider (assigned to the live nodes), wait for it, return it."""
    added = dtask("add", "reports", task_id, "--payload", '{"steps": 3, "step_seconds": 0.05}')
    assert re.fullmatch(rf"added reports/{task_id} version \d+ on node-1\n", added.stdout)
    waited = dtask("wait", "reports", task_id, "--plain", "--timeout-after", "60", timeout=90)
    assert f"reports/{task_id} v" in waited.stdout and "FINISHED" in waited.stdout, node.logs()
    task = dtask.json("get", "reports", task_id)
    assert isinstance(task, dict)
    assert task["status"] == "FINISHED"
    assert task["finishedNodes"] == {"node-1": True}
    progress = task["progress"]  # best effort and throttled: maybe not the last value
    assert isinstance(progress, dict) and set(progress) <= {"node-1"}
    assert all(0.0 <= p["fraction"] <= 1.0 for p in progress.values())
    return task


@pytest.mark.timeout(300)
def test_dtask_against_the_compose_cluster(
    cluster: ComposeCluster, dtask: Dtask, node: Node
) -> None:
    # members: the node daemon registered, serving its namespace
    members = dtask("members")
    assert "node-1" in members.stdout and "reports" in members.stdout

    # a run of the example provider, assigned to the live nodes serving "reports"
    task = run_report(dtask, node, "daily")
    report = node.state_dir / "reports" / "daily" / str(task["version"]) / "report.txt"
    assert report.read_text().startswith("# report\ntask reports/daily version ")

    # a task for nodes that never come: add, list, get, cancel
    added = dtask("add", "ops", "rotate-keys", "--nodes", "node-1,node-9", "--payload", "v2")
    found = re.fullmatch(r"added ops/rotate-keys version (\d+) on node-1, node-9\n", added.stdout)
    assert found, added.stdout
    version = int(found.group(1))
    listing = dtask("list")
    assert re.search(rf"^ops\s+rotate-keys\s+{version}\s+STARTED\s+0/2", listing.stdout, re.M)
    assert re.search(r"^reports\s+daily\s+\d+\s+FINISHED\s+1/1", listing.stdout, re.M)
    as_json = dtask.json("list", "--json")
    assert isinstance(as_json, dict)
    assert sorted(as_json["tasks"]) == ["ops", "reports"]
    got = dtask.json("get", "ops", "rotate-keys")
    assert isinstance(got, dict)
    assert got["status"] == "STARTED" and got["version"] == version
    assert got["nodes"] == ["node-1", "node-9"]
    assert got["payload"] == "djI="  # base64 of b"v2"
    assert dtask("cancel", "ops", "rotate-keys").stdout == (
        f"cancelled ops/rotate-keys version {version}\n"
    )
    got = dtask.json("get", "ops", "rotate-keys")
    assert isinstance(got, dict) and got["status"] == "CANCELLED"

    # errors: one line on stderr, exit 3
    again = dtask("cancel", "ops", "rotate-keys", expect=3)
    assert "no longer running" in again.stderr and "Traceback" not in again.stderr
    missing = dtask("get", "ops", "no-such-task", expect=3)
    assert "does not exist" in missing.stderr

    # the node's metrics endpoint exports every metric of the library
    exposition = requests.get(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).text
    assert 'distributedtask_task_starts_total{namespace="reports"} 1.0' in exposition
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))
    for name in METRIC_NAMES:  # the text format names a counter family with or without _total
        assert name in types or name.removesuffix("_total") in types, name


@pytest.mark.timeout(300)
def test_dtask_survives_a_killed_member(cluster: ComposeCluster, dtask: Dtask, node: Node) -> None:
    # etcd1 is the first endpoint of DTASK_ENDPOINTS (and of the node's client)
    killed = run(["docker", "kill", cluster.container("etcd1")])
    assert killed.returncode == 0, killed.stderr
    wait_until(lambda: not healthy(CLIENT_PORTS[0]), 30, 0.1, "etcd1 is down")
    # If etcd1 led, the other two elect a new leader first (health is false meanwhile).
    wait_until(
        lambda: healthy(CLIENT_PORTS[1]) and healthy(CLIENT_PORTS[2]),
        30,
        0.2,
        "etcd2 and etcd3 healthy without etcd1",
    )

    # dtask fails over to etcd2/etcd3: add, list, get, cancel, members
    added = dtask("add", "ops", "after-kill", "--nodes", "node-1,node-2")
    assert added.stdout.startswith("added ops/after-kill version ")
    assert re.search(r"^ops\s+after-kill\s+\d+\s+STARTED", dtask("list").stdout, re.M)
    got = dtask.json("get", "ops", "after-kill")
    assert isinstance(got, dict) and got["status"] == "STARTED"
    assert dtask("cancel", "ops", "after-kill").stdout.startswith("cancelled ops/after-kill ")
    wait_until(lambda: "node-1" in dtask.members(), 30, 0.2, "node-1 still a member")

    # the node daemon, whose client also lost etcd1, still runs new tasks
    try:
        run_report(dtask, node, "after-kill")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- node log\n{node.logs()}") from None
    assert node.process.poll() is None, node.logs()

    # and stops cleanly on SIGTERM, leaving the cluster at once
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(30) == 0, node.logs()
    assert dtask.members() == []


# ---- docker/build-image.sh -------------------------------------------------------------------


def test_build_image_script(tmp_path: Path) -> None:
    needs_docker()
    tag = f"distributedtask-etcd:test-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, PYTHON=sys.executable, TAG=tag, TMPDIR=str(tmp_path))
    try:
        built = run(["bash", str(BUILD_SCRIPT)], timeout=300, env=env)
        assert built.returncode == 0, built.stdout + built.stderr
        assert built.stdout.strip() == tag
        version = run(["docker", "run", "--rm", "--network", "none", tag, "--version"])
        expected = etcd_image_tag().split(":", 1)[1]
        assert f"etcd Version: {expected}" in version.stdout, version.stdout + version.stderr
        assert list(tmp_path.iterdir()) == [], "the build context was not removed"
    finally:
        run(["docker", "image", "rm", "--force", tag])
