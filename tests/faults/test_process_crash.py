"""A node process that dies: ``python -m distributedtask node`` killed with SIGKILL (no stop, no
lease revoke), next to a live in-process Scheduler.

- Not restarted: its lease expires (its membership goes after its member TTL), the run stays
  STARTED during the grace, then the live node fails every STARTED run still waiting for it,
  with failed_node naming it (API.md: node loss), and terminates its own part of the shared run.
- Restarted with the same node id and state dir after its lease expired but before the grace:
  the run is not failed; the new process lists its local run and starts it again
  (at-least-once: the run's command is started twice, once per process) and its completion
  finishes the run.

The node serves the namespace with the built-in CommandProvider; each run's command writes
``start <version> <pid>`` to a file and loops until a "go" file exists. A command outlives a
SIGKILLed node (it leads its own process group), so the test ends each one it started by creating
the go file and waits until its pid is gone.
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from tests.support import RecordingProvider, Schedulers

import distributedtask as dt
from distributedtask.providers import CommandProvider
from distributedtask.testing import wait_until

pytestmark = pytest.mark.usefixtures("no_scheduler_thread_left")

NS = "jobs"
NODE = "crashy"
MEMBER_TTL = 1  # seconds, of the node process


@dataclass
class Work:
    """Where the runs' commands leave their traces, and how to let them finish."""

    dir: Path

    @property
    def starts_file(self) -> Path:
        return self.dir / "starts"

    @property
    def go_file(self) -> Path:
        return self.dir / "go"

    def payload(self) -> bytes:
        starts, go = shlex.quote(str(self.starts_file)), shlex.quote(str(self.go_file))
        return CommandProvider.payload(
            shell=f'echo "start $DTASK_TASK_VERSION $$" >> {starts}; '
            f"while [ ! -e {go} ]; do sleep 0.05; done"
        )

    def starts(self) -> list[tuple[int, int]]:
        """``(version, pid)`` of every command started so far."""
        if not self.starts_file.exists():
            return []
        lines = self.starts_file.read_text().splitlines()
        return [(int(v), int(pid)) for _, v, pid in (line.split() for line in lines)]

    def release(self) -> None:
        """Let every command end, and wait until each is gone."""
        self.go_file.touch()
        for _, pid in self.starts():
            wait_until(functools.partial(_gone, pid), timeout=10, message=f"command {pid} ended")


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"  # a zombie has ended


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Work]:
    work = Work(tmp_path / "work")
    work.dir.mkdir()
    try:
        yield work
    finally:
        work.release()


class NodeProcess:
    """``python -m distributedtask node`` serving NS with the command provider."""

    def __init__(self, endpoint: str, prefix: str, state_dir: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DTASK_")}
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributedtask",
                    "--endpoints",
                    endpoint,
                    "--prefix",
                    prefix,
                    "--timeout",
                    "2",
                    "node",
                    "--node-id",
                    NODE,
                    "--provider",
                    f"{NS}=command",
                    "--state-dir",
                    str(state_dir),
                    "--member-ttl",
                    str(MEMBER_TTL),
                    "--node-loss-grace",
                    "-1",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=state_dir.parent,
            )

    def kill(self) -> None:
        """SIGKILL: no stop, no lease revoke."""
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for node in started:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()


def members(mgr: dt.Manager) -> list[str]:
    return [m.node_id for m in mgr.live_members()]


def wait_members(mgr: dt.Manager, want: list[str], node: NodeProcess) -> None:
    try:
        wait_until(lambda: members(mgr) == want, timeout=30, message=f"members {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the node's output:\n{node.output()}") from None


def test_a_killed_node_process_has_its_runs_failed_after_the_grace(
    etcd_endpoint: str,
    etcd_client: dt.EtcdClient,
    dtask_prefix: str,
    tmp_path: Path,
    work: Work,
    nodes: list[NodeProcess],
) -> None:
    grace = timedelta(seconds=3)
    mgr = dt.Manager(etcd_client, prefix=dtask_prefix, completed_task_ttl=timedelta(hours=1))
    steady = RecordingProvider()
    with Schedulers(mgr, CollectorRegistry()) as farm:
        farm.new("steady", {NS: steady}, node_loss_grace=grace)
        crashy = NodeProcess(etcd_endpoint, dtask_prefix, tmp_path / "state", tmp_path / "n1.log")
        nodes.append(crashy)
        wait_members(mgr, [NODE, "steady"], crashy)

        shared = mgr.add_task(NS, "shared", work.payload())
        assert shared.nodes == {NODE, "steady"}
        solo = mgr.add_task(NS, "solo", work.payload(), nodes=[NODE])
        wait_until(
            lambda: sorted(v for v, _ in work.starts()) == sorted([shared.version, solo.version]),
            timeout=20,
            message="the node process started both runs",
        )
        wait_until(lambda: steady.running() == {shared.descriptor}, timeout=10)

        crashy.kill()
        wait_until(
            lambda: members(mgr) == ["steady"],
            timeout=MEMBER_TTL + 10,
            message="its lease expired",
        )
        # its membership is gone, but the grace has not passed: nothing failed yet
        for task in (shared, solo):
            assert mgr.get_task(NS, task.id).status is dt.TaskStatus.STARTED  # type: ignore[union-attr]

        for task in (shared, solo):
            ended = mgr.wait_for_task(NS, task.id, task.version, timeout=grace.seconds + 15)
            assert ended.status is dt.TaskStatus.FAILED
            assert ended.failed_node == NODE
            assert ended.error is not None and ended.error.startswith("node lost"), ended.error
            assert ended.finished_nodes == frozenset()
        wait_until(lambda: steady.terminations() == [shared.descriptor], timeout=10)
        assert steady.starts() == [shared.descriptor]
        assert len(work.starts()) == 2  # each run's command started once, by the dead process


def test_a_node_process_restarted_before_the_grace_takes_its_run_back(
    etcd_endpoint: str,
    etcd_client: dt.EtcdClient,
    dtask_prefix: str,
    tmp_path: Path,
    work: Work,
    nodes: list[NodeProcess],
) -> None:
    grace = timedelta(seconds=30)
    mgr = dt.Manager(etcd_client, prefix=dtask_prefix, completed_task_ttl=timedelta(hours=1))
    steady = RecordingProvider()
    state = tmp_path / "state"
    with Schedulers(mgr, CollectorRegistry()) as farm:
        farm.new("steady", {NS: steady}, node_loss_grace=grace)
        first = NodeProcess(etcd_endpoint, dtask_prefix, state, tmp_path / "n1.log")
        nodes.append(first)
        wait_members(mgr, [NODE, "steady"], first)
        task = mgr.add_task(NS, "job", work.payload())
        assert task.nodes == {NODE, "steady"}
        wait_until(lambda: [v for v, _ in work.starts()] == [task.version], timeout=20)

        first.kill()
        wait_until(
            lambda: members(mgr) == ["steady"],
            timeout=MEMBER_TTL + 10,
            message="its lease expired: the grace is counting",
        )
        second = NodeProcess(etcd_endpoint, dtask_prefix, state, tmp_path / "n2.log")
        nodes.append(second)
        wait_until(
            lambda: [v for v, _ in work.starts()] == [task.version, task.version],
            timeout=30,
            message="the restarted process starts its run again (at-least-once)",
        )
        wait_until(lambda: members(mgr) == [NODE, "steady"], timeout=10)
        current = mgr.get_task(NS, "job")
        assert current is not None and current.status is dt.TaskStatus.STARTED
        assert current.version == task.version  # the same run, not failed, not replaced

        work.release()  # both commands end; only the second process records its run
        wait_until(
            lambda: mgr.get_task(NS, "job").finished_nodes == {NODE},  # type: ignore[union-attr]
            timeout=20,
            message="the restarted node recorded completion",
        )
        steady.complete(task)
        done = mgr.wait_for_task(NS, "job", task.version, timeout=20)
        assert done.status is dt.TaskStatus.FINISHED and done.error is None
        assert done.finished_nodes == {NODE, "steady"}
        assert steady.starts() == [task.descriptor]
        assert steady.terminations() == [task.descriptor]  # released once it completed

        assert second.stop() == 0, second.output()
        assert "Traceback" not in second.output()
        assert members(mgr) == ["steady"]  # a clean stop revokes the lease at once
