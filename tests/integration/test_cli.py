"""``dtask`` as a user runs it: a subprocess (``python -m distributedtask``) against the real
etcd of the fixtures, every subcommand, its output, its exit status and its error lines."""

from __future__ import annotations

import base64
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from tests.support import DtaskProcess as Background
from tests.support import RecordingProvider, clean_env

import distributedtask as dt
from distributedtask.providers import CommandProvider
from distributedtask.testing import free_port, wait_until

NS = "ns"
EXIT_ERROR = 3
EXIT_USAGE = 64
RUN_TIMEOUT = 30  # seconds: a hung dtask fails the test instead of hanging it

Dtask = Callable[..., subprocess.CompletedProcess[str]]


# ---- helpers ---------------------------------------------------------------------------------


def run_dtask(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: str | bytes | None = None,
    timeout: float = RUN_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``dtask args`` to completion; stdout/stderr as text."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [sys.executable, "-m", "distributedtask", *args],
        input=data if data is not None else b"",
        capture_output=True,
        env=clean_env(env),
        timeout=timeout,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


@pytest.fixture
def conn(etcd_endpoint: str, dtask_prefix: str) -> list[str]:
    """The connection options of this test's prefix."""
    return ["--endpoints", etcd_endpoint, "--prefix", dtask_prefix]


@pytest.fixture
def dtask(conn: list[str]) -> Dtask:
    """``dtask(*args, stdin=..., env=...)``: run a subcommand on this test's prefix."""

    def call(*args: str, **options: Any) -> subprocess.CompletedProcess[str]:
        return run_dtask([*conn, *args], **options)

    return call


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """Assert a clean success; return stdout."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == "", result.stderr
    return result.stdout


def error_line(result: subprocess.CompletedProcess[str], status: int = EXIT_ERROR) -> str:
    """Assert exit ``status`` with exactly one ``dtask: ...`` line on stderr; return it."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    prefix = "dtask: error: " if status == EXIT_ERROR else "dtask: usage error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def argparse_error(result: subprocess.CompletedProcess[str]) -> str:
    """Assert a usage error found by argparse (usage lines, then one error line); return it."""
    assert result.returncode == EXIT_USAGE, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("usage: dtask"), result.stderr
    assert re.match(r"dtask( \w+)?: usage error: ", lines[-1]), lines[-1]
    assert sum("usage error" in line for line in lines) == 1, result.stderr
    return lines[-1]


def added_version(stdout: str) -> int:
    match = re.fullmatch(r"added (.+)/(.+) version (\d+) on (.+)\n", stdout)
    assert match, stdout
    return int(match.group(3))


@pytest.fixture
def background(conn: list[str]) -> Iterator[Callable[..., Background]]:
    """Start ``dtask`` subprocesses on this test's prefix; every one is killed after the test."""
    started: list[Background] = []

    def start(*args: str) -> Background:
        proc = Background([*conn, *args])
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()


@pytest.fixture
def scheduler_factory(manager: dt.Manager) -> Iterator[Callable[[str], dt.Scheduler]]:
    """Start real Schedulers (a do-nothing RecordingProvider serving NS); stopped after."""
    made: list[dt.Scheduler] = []

    def start(node_id: str) -> dt.Scheduler:
        scheduler = dt.Scheduler(
            manager,
            node_id=node_id,
            providers={NS: RecordingProvider()},
            registry=CollectorRegistry(),
            member_ttl=timedelta(seconds=2),
            resync_interval=timedelta(hours=1),
        )
        made.append(scheduler)
        scheduler.start()
        return scheduler

    try:
        yield start
    finally:
        for scheduler in made:
            scheduler.stop()


# ---- connection ------------------------------------------------------------------------------


def test_list_says_no_tasks_on_an_empty_prefix(dtask: Dtask) -> None:
    assert ok(dtask("list")) == "no tasks\n"


def test_connection_from_environment_variables(
    etcd_endpoint: str, dtask_prefix: str, manager: dt.Manager
) -> None:
    env = {"DTASK_ENDPOINTS": etcd_endpoint, "DTASK_PREFIX": dtask_prefix}
    out = ok(run_dtask(["add", NS, "t1", "--payload", "x", "--nodes", "n1"], env=env))
    task = manager.get_task(NS, "t1")
    assert task is not None and task.payload == b"x"
    assert added_version(out) == task.version
    listed = orjson.loads(ok(run_dtask(["list", "--json"], env=env)))
    assert [t["ID"] for t in listed["tasks"][NS]] == ["t1"]
    # the environment is only a default: the flags win
    other = ok(run_dtask(["--prefix", dtask_prefix + "-other", "list"], env=env))
    assert other == "no tasks\n"


# ---- list and get ----------------------------------------------------------------------------


def test_list_table_and_namespace_filter(dtask: Dtask, manager: dt.Manager) -> None:
    a = manager.add_task(NS, "t1", b"", nodes=["n1", "n2"])
    manager.record_node_completion(NS, "t1", a.version, "n1")
    b = manager.add_task("other", "t2", b"", nodes=["n1"])
    manager.cancel_task("other", "t2", b.version)

    lines = ok(dtask("list")).splitlines()
    assert lines[0].split() == ["NAMESPACE", "ID", "VERSION", "STATUS", "NODES", "AGE"]
    rows = [line.split() for line in lines[1:]]
    assert [row[:5] for row in rows] == [
        [NS, "t1", str(a.version), "STARTED", "1/2"],
        ["other", "t2", str(b.version), "CANCELLED", "0/1"],
    ]
    assert all(re.fullmatch(r"\d+[smhd]", row[5]) for row in rows), rows

    only = ok(dtask("list", "--namespace", "other")).splitlines()
    assert [line.split()[:2] for line in only[1:]] == [["other", "t2"]]
    assert ok(dtask("list", "--namespace", "nothing-here")) == "no tasks\n"


def test_list_json_shape(dtask: Dtask, manager: dt.Manager) -> None:
    t1 = manager.add_task(NS, "t1", b"\x00\xffbin", nodes=["n2", "n1"])
    manager.record_node_completion(NS, "t1", t1.version, "n1")
    t2 = manager.add_task(NS, "t2", b"x", nodes=["n1"])
    manager.record_node_failure(NS, "t2", t2.version, "n1", "boom")
    manager.add_task("other", "t3", b"", nodes=["n1"])

    data = orjson.loads(ok(dtask("list", "--json")))
    assert set(data) == {"tasks"}
    assert set(data["tasks"]) == {NS, "other"}
    running, failed = data["tasks"][NS]
    assert set(running) == {
        "namespace",
        "ID",
        "version",
        "payload",
        "status",
        "startedAt",
        "finishedAt",
        "finishedNodes",
        "nodes",
    }
    assert running["namespace"] == NS and running["ID"] == "t1"
    assert running["version"] == t1.version
    assert base64.b64decode(running["payload"]) == b"\x00\xffbin"
    assert running["status"] == "STARTED"
    assert running["finishedAt"] == "0001-01-01T00:00:00Z"
    assert running["finishedNodes"] == {"n1": True}
    assert running["nodes"] == ["n1", "n2"]
    assert datetime.fromisoformat(running["startedAt"].replace("Z", "+00:00")) == t1.started_at
    assert failed["ID"] == "t2" and failed["status"] == "FAILED" and failed["error"] == "boom"
    assert failed["failedNode"] == "n1"
    assert failed["finishedAt"] != "0001-01-01T00:00:00Z"
    assert failed["finishedNodes"] == {}
    # the same document as the library's
    assert data == orjson.loads(manager.list_tasks_payload())

    filtered = orjson.loads(ok(dtask("list", "--json", "--namespace", "other")))
    assert list(filtered["tasks"]) == ["other"]
    assert orjson.loads(ok(dtask("list", "--json", "--namespace", "none"))) == {"tasks": {}}


def test_get_prints_the_task_with_progress(dtask: Dtask, manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", b"payload", nodes=["n1", "n2"])
    manager.record_progress(NS, "t1", task.version, "n1", 0.25, "a quarter")
    body = orjson.loads(ok(dtask("get", NS, "t1")))
    assert body["ID"] == "t1" and body["namespace"] == NS
    assert body["version"] == task.version and body["status"] == "STARTED"
    assert base64.b64decode(body["payload"]) == b"payload"
    assert body["nodes"] == ["n1", "n2"] and body["finishedNodes"] == {}
    assert set(body["progress"]) == {"n1"}
    progress = body["progress"]["n1"]
    assert progress["fraction"] == 0.25 and progress["message"] == "a quarter"
    assert datetime.fromisoformat(progress["updatedAt"].replace("Z", "+00:00")).tzinfo


def test_get_and_cancel_of_an_unknown_task(dtask: Dtask, manager: dt.Manager) -> None:
    manager.add_task(NS, "t1", nodes=["n1"])
    for args in (
        ("get", "no-such-namespace", "t1"),
        ("get", NS, "no-such-id"),
        ("cancel", "no-such-namespace", "t1"),
        ("cancel", "no-such-namespace", "t1", "--version", "5"),
        ("pause", "no-such-namespace", "t1"),
        ("pause", NS, "no-such-id", "--version", "5"),
        ("resume", "no-such-namespace", "t1"),
        ("resume", NS, "no-such-id"),
        ("cleanup", "no-such-namespace", "t1"),
        ("wait", "no-such-namespace", "t1"),
    ):
        line = error_line(dtask(*args))
        assert "does not exist" in line, (args, line)
        assert f"{args[1]}/{args[2]}" in line, (args, line)


# ---- add -------------------------------------------------------------------------------------


def test_add_with_payload_text(dtask: Dtask, manager: dt.Manager) -> None:
    out = ok(dtask("add", NS, "t1", "--payload", "héllo wörld", "--nodes", "b, a,"))
    task = manager.get_task(NS, "t1")
    assert task is not None
    assert out == f"added {NS}/t1 version {task.version} on a, b\n"
    assert task.payload == "héllo wörld".encode()
    assert task.nodes == {"a", "b"} and task.status is dt.TaskStatus.STARTED


def test_add_with_payload_file(dtask: Dtask, manager: dt.Manager, tmp_path: Path) -> None:
    payload = CommandProvider.payload(argv=["echo", "hi"], timeout=5)
    path = tmp_path / "payload.json"
    path.write_bytes(payload)
    added_version(ok(dtask("add", NS, "t1", "--payload-file", str(path), "--nodes", "n1")))
    task = manager.get_task(NS, "t1")
    assert task is not None and task.payload == payload and task.nodes == {"n1"}


def test_add_with_payload_from_stdin(dtask: Dtask, manager: dt.Manager) -> None:
    payload = bytes(range(256))
    out = ok(dtask("add", NS, "t1", "--payload-file", "-", "--nodes", "n1", stdin=payload))
    task = manager.get_task(NS, "t1")
    assert task is not None and task.payload == payload
    assert added_version(out) == task.version


def test_add_without_payload_is_empty(dtask: Dtask, manager: dt.Manager) -> None:
    ok(dtask("add", NS, "t1", "--nodes", "n1"))
    task = manager.get_task(NS, "t1")
    assert task is not None and task.payload == b""


def test_add_without_nodes_assigns_the_live_members(
    dtask: Dtask, manager: dt.Manager, scheduler_factory: Callable[[str], dt.Scheduler]
) -> None:
    scheduler_factory("m2")
    scheduler_factory("m1")
    out = ok(dtask("add", NS, "t1", "--payload", "x"))
    task = manager.get_task(NS, "t1")
    assert task is not None and task.nodes == {"m1", "m2"}
    assert out == f"added {NS}/t1 version {task.version} on m1, m2\n"


def test_add_without_nodes_and_no_live_member_fails(dtask: Dtask, manager: dt.Manager) -> None:
    line = error_line(dtask("add", "lonely", "t1", "--payload", "x"))
    assert "no live node serves namespace" in line and "'lonely'" in line
    assert manager.list_tasks() == {}


def test_add_of_a_running_task_fails(dtask: Dtask, manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    line = error_line(dtask("add", NS, "t1", "--nodes", "n1"))
    assert f"already running with version {task.version}" in line
    assert manager.get_task(NS, "t1") == task


def test_add_with_no_node_in_nodes_is_a_usage_error(dtask: Dtask, manager: dt.Manager) -> None:
    line = error_line(dtask("add", NS, "t1", "--nodes", " , "), EXIT_USAGE)
    assert "--nodes" in line
    assert manager.list_tasks() == {}


def test_unreadable_payload_file(dtask: Dtask, manager: dt.Manager, tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    line = error_line(dtask("add", NS, "t1", "--payload-file", str(missing), "--nodes", "n1"), 64)
    assert str(missing) in line and "No such file or directory" in line
    line = error_line(dtask("add", NS, "t1", "--payload-file", str(tmp_path), "--nodes", "n1"), 64)
    assert str(tmp_path) in line
    assert manager.list_tasks() == {}


def test_payload_and_payload_file_are_exclusive(dtask: Dtask, tmp_path: Path) -> None:
    line = argparse_error(dtask("add", NS, "t1", "--payload", "x", "--payload-file", "-"))
    assert "not allowed with" in line


# ---- add with a run policy ------------------------------------------------------------------


def test_add_with_a_run_policy(dtask: Dtask, manager: dt.Manager) -> None:
    out = ok(
        dtask(
            "add", NS, "t1", "--nodes", "n1",
            "--max-attempts", "3", "--retry-backoff", "0.5", "--retry-backoff-max", "4",
            "--deadline", "90.5",
        )
    )  # fmt: skip
    task = manager.get_task(NS, "t1")
    assert task is not None and added_version(out) == task.version
    assert task.policy == dt.RunPolicy(
        max_attempts=3,
        retry_backoff=timedelta(seconds=0.5),
        retry_backoff_max=timedelta(seconds=4),
        deadline=timedelta(seconds=90.5),
    )
    body = orjson.loads(ok(dtask("get", NS, "t1")))
    assert body["policy"] == {
        "maxAttempts": 3,
        "retryBackoff": 0.5,
        "retryBackoffMax": 4.0,
        "deadline": 90.5,
    }


def test_add_with_some_policy_flags_keeps_the_other_defaults(
    dtask: Dtask, manager: dt.Manager
) -> None:
    ok(dtask("add", NS, "t1", "--nodes", "n1", "--max-attempts", "2"))
    ok(dtask("add", NS, "t2", "--nodes", "n1", "--deadline", "5"))
    # a backoff above the default cap (360 s) raises the cap with it
    ok(dtask("add", NS, "t3", "--nodes", "n1", "--retry-backoff", "600"))
    ok(dtask("add", NS, "t4", "--nodes", "n1", "--retry-backoff", "0"))
    tasks = {t.id: t for t in manager.list_tasks()[NS]}
    assert tasks["t1"].policy == dt.RunPolicy(max_attempts=2)
    assert tasks["t2"].policy == dt.RunPolicy(deadline=timedelta(seconds=5))
    assert tasks["t3"].policy == dt.RunPolicy(
        retry_backoff=timedelta(seconds=600), retry_backoff_max=timedelta(seconds=600)
    )
    assert tasks["t4"].policy == dt.RunPolicy(retry_backoff=timedelta(0))
    # no flag: the default policy, and a plain task's JSON (no "policy" key)
    ok(dtask("add", NS, "plain", "--nodes", "n1"))
    plain = manager.get_task(NS, "plain")
    assert plain is not None and plain.policy == dt.RunPolicy()
    assert "policy" not in orjson.loads(ok(dtask("get", NS, "plain")))


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-attempts", "0"),
        ("--max-attempts", "-1"),
        ("--max-attempts", "1001"),
        ("--max-attempts", "2.5"),
        ("--max-attempts", "many"),
        ("--retry-backoff", "-1"),
        ("--retry-backoff", "nan"),
        ("--retry-backoff", "inf"),
        ("--retry-backoff", "soon"),
        ("--retry-backoff-max", "-0.5"),
        ("--retry-backoff-max", "1e10"),
        ("--deadline", "0"),
        ("--deadline", "-5"),
        ("--deadline", "nan"),
        ("--deadline", "inf"),
        ("--deadline", "1e10"),
        ("--deadline", ""),
    ],
)
def test_bad_policy_flags_are_usage_errors_that_write_nothing(
    dtask: Dtask, manager: dt.Manager, flag: str, value: str
) -> None:
    line = argparse_error(dtask("add", NS, "t1", "--nodes", "n1", flag, value))
    assert line.startswith("dtask add: usage error: "), line
    assert flag in line, line
    assert manager.list_tasks() == {}


def test_a_backoff_cap_below_the_backoff_is_a_usage_error(
    dtask: Dtask, manager: dt.Manager
) -> None:
    args = ("add", NS, "t1", "--nodes", "n1", "--retry-backoff", "10", "--retry-backoff-max", "5")
    line = error_line(dtask(*args), EXIT_USAGE)
    assert "--retry-backoff-max" in line and "--retry-backoff" in line
    assert manager.list_tasks() == {}


def test_bad_policy_flags_are_checked_before_connecting() -> None:
    # no etcd at all: still a usage error (64), not "etcd unreachable" (3)
    result = run_dtask(
        ["--endpoints", f"http://127.0.0.1:{free_port()}", "--timeout", "0.5",
         "add", NS, "t1", "--max-attempts", "0"],
        timeout=20,
    )  # fmt: skip
    argparse_error(result)
    result = run_dtask(
        ["--endpoints", f"http://127.0.0.1:{free_port()}", "--timeout", "0.5",
         "add", NS, "t1", "--retry-backoff", "9", "--retry-backoff-max", "1"],
        timeout=20,
    )  # fmt: skip
    error_line(result, EXIT_USAGE)


# ---- pause and resume ------------------------------------------------------------------------


def test_pause_and_resume_the_current_run(dtask: Dtask, manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1", "n2"])
    name = f"{NS}/t1 version {task.version}"
    assert ok(dtask("pause", NS, "t1")) == f"paused {name}\n"
    paused = manager.get_task(NS, "t1")
    assert paused is not None and paused.status is dt.TaskStatus.PAUSED
    assert ok(dtask("pause", NS, "t1")) == f"{name} is already paused\n"

    rows = [line.split() for line in ok(dtask("list")).splitlines()[1:]]
    assert [row[:5] for row in rows] == [[NS, "t1", str(task.version), "PAUSED", "0/2"]]
    assert orjson.loads(ok(dtask("get", NS, "t1")))["status"] == "PAUSED"
    listed = orjson.loads(ok(dtask("list", "--json")))
    assert listed["tasks"][NS][0]["status"] == "PAUSED"
    # PAUSED is not terminal: no add over it, no clean-up
    assert "already running" in error_line(dtask("add", NS, "t1", "--nodes", "n1"))
    assert "still running" in error_line(dtask("cleanup", NS, "t1", "--ttl", "0"))

    assert ok(dtask("resume", NS, "t1")) == f"resumed {name}\n"
    resumed = manager.get_task(NS, "t1")
    assert resumed is not None and resumed.status is dt.TaskStatus.STARTED
    assert ok(dtask("resume", NS, "t1")) == f"{name} is already running\n"
    assert [line.split()[3] for line in ok(dtask("list")).splitlines()[1:]] == ["STARTED"]


def test_pause_and_resume_a_given_version(dtask: Dtask, manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    for command in ("pause", "resume"):
        line = error_line(dtask(command, NS, "t1", "--version", str(task.version + 1000)))
        assert "does not exist" in line and str(task.version + 1000) in line
    assert manager.get_task(NS, "t1") == task
    out = ok(dtask("pause", NS, "t1", "--version", str(task.version)))
    assert out == f"paused {NS}/t1 version {task.version}\n"
    out = ok(dtask("resume", NS, "t1", "--version", str(task.version)))
    assert out == f"resumed {NS}/t1 version {task.version}\n"


@pytest.mark.parametrize("how", ["cancel", "fail", "finish"])
def test_pause_and_resume_of_a_terminal_run_fail_like_cancel(
    dtask: Dtask, manager: dt.Manager, how: str
) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1", "n2"])
    _end(manager, task, how)
    ended = manager.get_task(NS, "t1")
    assert ended is not None and ended.status.terminal
    cancel = dtask("cancel", NS, "t1")
    cancel_line = error_line(cancel)
    assert "no longer running" in cancel_line
    for command in ("pause", "resume"):
        for args in ((), ("--version", str(task.version))):
            result = dtask(command, NS, "t1", *args)
            assert result.returncode == cancel.returncode == EXIT_ERROR
            line = error_line(result)
            assert "no longer running" in line and f"{NS}/t1" in line, line
    assert manager.get_task(NS, "t1") == ended


def test_cancel_of_a_paused_run(dtask: Dtask, manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    ok(dtask("pause", NS, "t1"))
    assert ok(dtask("cancel", NS, "t1")) == f"cancelled {NS}/t1 version {task.version}\n"
    after = manager.get_task(NS, "t1")
    assert after is not None and after.status is dt.TaskStatus.CANCELLED


# ---- attempts in list and get ----------------------------------------------------------------


def test_get_and_list_show_attempts_and_last_errors(dtask: Dtask, manager: dt.Manager) -> None:
    policy = dt.RunPolicy(max_attempts=3)
    task = manager.add_task(NS, "t1", nodes=["n1", "n2", "n3"], policy=policy)
    manager.record_node_failure(NS, "t1", task.version, "n1", "boom")
    manager.record_node_failure(NS, "t1", task.version, "n1", "bang")
    manager.record_node_failure(NS, "t1", task.version, "n2", "crash")
    one = manager.add_task(NS, "t2", nodes=["n1"], policy=policy)
    manager.record_node_failure(NS, "t2", one.version, "n1", "once")
    manager.add_task(NS, "t3", nodes=["n1"])

    body = orjson.loads(ok(dtask("get", NS, "t1")))
    assert body["status"] == "STARTED" and "error" not in body
    assert body["policy"] == {"maxAttempts": 3}
    assert body["attempts"] == {"n1": 2, "n2": 1}
    assert body["lastErrors"] == {"n1": "bang", "n2": "crash"}
    plain = orjson.loads(ok(dtask("get", NS, "t3")))
    assert not {"policy", "attempts", "lastErrors"} & set(plain)

    lines = ok(dtask("list")).splitlines()
    assert lines[0].split() == ["NAMESPACE", "ID", "VERSION", "STATUS", "NODES", "AGE", "ATTEMPTS"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert rows["t1"][3] == "STARTED" and rows["t1"][6:] == ["3", "failed", "on", "2", "nodes"]
    assert rows["t2"][6:] == ["1", "failed", "on", "n1"]
    assert rows["t3"][6:] == ["-"]

    # the failure that uses the last attempt ends the run; list and get say so
    manager.record_node_failure(NS, "t1", task.version, "n1", "final")
    body = orjson.loads(ok(dtask("get", NS, "t1")))
    assert body["status"] == "FAILED" and body["error"] == "final"
    assert body["failedNode"] == "n1" and body["attempts"] == {"n1": 3, "n2": 1}
    rows = {line.split()[1]: line.split() for line in ok(dtask("list")).splitlines()[1:]}
    assert rows["t1"][3] == "FAILED" and rows["t1"][6:] == ["4", "failed", "on", "2", "nodes"]


# ---- cancel and cleanup ----------------------------------------------------------------------


def test_cancel_the_current_run(dtask: Dtask, manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    assert ok(dtask("cancel", NS, "t1")) == f"cancelled {NS}/t1 version {task.version}\n"
    after = manager.get_task(NS, "t1")
    assert after is not None and after.status is dt.TaskStatus.CANCELLED
    line = error_line(dtask("cancel", NS, "t1"))
    assert "no longer running" in line


def test_cancel_a_given_version(dtask: Dtask, manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    line = error_line(dtask("cancel", NS, "t1", "--version", str(task.version + 1000)))
    assert "does not exist" in line and str(task.version + 1000) in line
    assert manager.get_task(NS, "t1") == task
    out = ok(dtask("cancel", NS, "t1", "--version", str(task.version)))
    assert out == f"cancelled {NS}/t1 version {task.version}\n"
    after = manager.get_task(NS, "t1")
    assert after is not None and after.status is dt.TaskStatus.CANCELLED


def test_cleanup_refuses_a_running_task_then_a_fresh_one_then_removes(
    dtask: Dtask, manager: dt.Manager
) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    assert "still running" in error_line(dtask("cleanup", NS, "t1", "--ttl", "0"))
    manager.cancel_task(NS, "t1", task.version)
    assert "too fresh to clean up" in error_line(dtask("cleanup", NS, "t1"))  # TTL: 5 days
    assert "too fresh to clean up" in error_line(dtask("cleanup", NS, "t1", "--ttl", "3600"))
    assert manager.get_task(NS, "t1") is not None
    wrong = error_line(dtask("cleanup", NS, "t1", "--ttl", "0", "--version", "1"))
    assert "does not exist" in wrong
    out = ok(dtask("cleanup", NS, "t1", "--ttl", "0"))
    assert out == f"cleaned up {NS}/t1 version {task.version}\n"
    assert manager.get_task(NS, "t1") is None
    assert "does not exist" in error_line(dtask("cleanup", NS, "t1", "--ttl", "0"))


# ---- wait ------------------------------------------------------------------------------------


def _end(manager: dt.Manager, task: dt.Task, how: str) -> None:
    if how == "finish":
        manager.record_node_completion(NS, task.id, task.version, "n1")
        manager.record_node_completion(NS, task.id, task.version, "n2")
    elif how == "fail":
        manager.record_node_failure(NS, task.id, task.version, "n2", "boom")
    else:
        manager.cancel_task(NS, task.id, task.version)


@pytest.mark.parametrize(
    ("how", "status", "final", "n2_line"),
    [
        ("finish", 0, "FINISHED", "n2: done 100%"),
        ("fail", 1, "FAILED on n2: boom", "n2: failed 0% boom"),
        ("cancel", 2, "CANCELLED", "n2: cancelled 0%"),
    ],
)
def test_wait_exits_by_outcome(
    background: Callable[..., Background],
    manager: dt.Manager,
    how: str,
    status: int,
    final: str,
    n2_line: str,
) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1", "n2"])
    waiter = background("wait", NS, "t1", "--plain")
    # the initial state is printed once every watch has listed: from then on it follows
    wait_until(lambda: "n2: running 0%" in waiter.out, timeout=10, message=str(waiter.err))
    manager.record_progress(NS, "t1", task.version, "n1", 0.5, "half")
    wait_until(lambda: "n1: running 50% half" in waiter.out, timeout=10)
    # ended from another thread while the subprocess waits
    ender = threading.Thread(target=_end, args=(manager, task, how))
    ender.start()
    ender.join(10)
    assert waiter.wait(15) == status, (waiter.out, waiter.err)
    assert waiter.err == []
    out = waiter.out
    assert out[-1] == f"{NS}/t1 v{task.version} {final}"
    assert out[:2] == ["n1: running 0%", "n2: running 0%"]
    assert n2_line in out
    if how == "finish":
        assert "n1: done 100% half" in out
    else:
        stopped = "cancelled" if how == "cancel" else "stopped"
        assert f"n1: {stopped} 50% half" in out
    assert all(re.fullmatch(r"n[12]: \w+ \d+%.*", line) for line in out[:-1]), out


def test_wait_on_a_finished_task_returns_at_once(dtask: Dtask, manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    manager.record_node_failure(NS, "t1", task.version, "n1", "broken")
    result = dtask("wait", NS, "t1", "--version", str(task.version), timeout=15)
    assert result.returncode == 1, result
    assert result.stdout.splitlines()[-1] == f"{NS}/t1 v{task.version} FAILED on n1: broken"


def test_wait_gives_up_after_timeout(dtask: Dtask, manager: dt.Manager) -> None:
    manager.add_task(NS, "t1", nodes=["n1"])
    line = error_line(dtask("wait", NS, "t1", "--plain", "--timeout-after", "0.5", timeout=15))
    assert line == f"dtask: error: {NS}/t1 still running after 0.5s"


def test_wait_for_another_version_fails(dtask: Dtask, manager: dt.Manager) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    line = error_line(dtask("wait", NS, "t1", "--version", str(task.version + 7)))
    assert "does not exist" in line


def test_wait_shows_pause_resume_and_retries(
    background: Callable[..., Background], manager: dt.Manager
) -> None:
    policy = dt.RunPolicy(max_attempts=3)
    task = manager.add_task(NS, "t1", nodes=["n1", "n2"], policy=policy)
    waiter = background("wait", NS, "t1", "--plain")
    wait_until(lambda: "n2: running 0%" in waiter.out, timeout=10, message=str(waiter.err))

    def shows(line: str) -> None:
        wait_until(lambda: line in waiter.out, timeout=10, message=f"{line!r} in {waiter.out}")

    manager.record_progress(NS, "t1", task.version, "n1", 0.25, "first try")
    shows("n1: running 25% first try")
    manager.record_node_failure(NS, "t1", task.version, "n1", "boom")
    shows("n1: retrying 25% (attempt 2 of 3): boom")
    manager.record_progress(NS, "t1", task.version, "n1", 0.5, "second try")
    shows("n1: running 50% second try (attempt 2 of 3)")
    manager.pause_task(NS, "t1", task.version)
    shows("n1: paused 50% second try (attempt 2 of 3)")
    shows("n2: paused 0%")
    manager.resume_task(NS, "t1", task.version)
    shows("n1: running 50% second try (attempt 2 of 3)")
    wait_until(lambda: waiter.out.count("n2: running 0%") == 2, timeout=10)
    manager.record_node_failure(NS, "t1", task.version, "n1", "bang")
    shows("n1: retrying 50% (attempt 3 of 3): bang")
    manager.record_node_completion(NS, "t1", task.version, "n2")
    manager.record_node_failure(NS, "t1", task.version, "n1", "no luck")
    assert waiter.wait(15) == 1, (waiter.out, waiter.err)
    assert waiter.err == []
    assert waiter.out[-1] == f"{NS}/t1 v{task.version} FAILED on n1: no luck"
    assert "n1: failed 50% no luck" in waiter.out and "n2: done 100%" in waiter.out
    assert all(re.fullmatch(r"n[12]: \w+ \d+%.*", line) for line in waiter.out[:-1]), waiter.out


def test_wait_on_a_paused_task_shows_it_paused(
    background: Callable[..., Background], manager: dt.Manager
) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"], policy=dt.RunPolicy(max_attempts=2))
    manager.record_node_failure(NS, "t1", task.version, "n1", "boom")
    manager.pause_task(NS, "t1", task.version)
    waiter = background("wait", NS, "t1", "--plain")
    wait_until(lambda: waiter.out, timeout=10, message=str(waiter.err))
    assert waiter.out[0] == "n1: paused 0% (attempt 2 of 2): boom"
    manager.cancel_task(NS, "t1", task.version)
    assert waiter.wait(15) == 2, (waiter.out, waiter.err)
    assert waiter.out[1:] == ["n1: cancelled 0%", f"{NS}/t1 v{task.version} CANCELLED"]


# ---- watch -----------------------------------------------------------------------------------


def test_watch_prints_a_line_per_change(
    background: Callable[..., Background],
    manager: dt.Manager,
    dtask_prefix: str,
    scheduler_factory: Callable[[str], dt.Scheduler],
) -> None:
    manager.add_task(NS, "before", nodes=["n1"])  # existing tasks print nothing
    watcher = background("watch", "--count", "7")
    wait_until(lambda: watcher.out, timeout=10, message=str(watcher.err))
    assert re.fullmatch(rf"watching {re.escape(dtask_prefix)} from revision \d+", watcher.out[0])

    scheduler = scheduler_factory("m1")
    t1 = manager.add_task(NS, "t1", nodes=["n1", "n2"])
    manager.record_node_completion(NS, "t1", t1.version, "n1")
    manager.record_node_completion(NS, "t1", t1.version, "n2")
    t2 = manager.add_task(NS, "t2", nodes=["n1"])
    manager.record_node_failure(NS, "t2", t2.version, "n1", "boom")
    scheduler.stop()
    assert watcher.wait(15) == 0, (watcher.out, watcher.err)
    assert watcher.err == []
    lines = watcher.out[1:]
    assert lines[0] == f"member m1 joined ({NS})"
    assert lines[1] == f"added {NS}/t1 v{t1.version}"
    assert lines[2] == f"{NS}/t1 completed on n1"
    assert set(lines[3:5]) == {f"{NS}/t1 completed on n2", f"{NS}/t1 FINISHED"}
    assert lines[5] == f"added {NS}/t2 v{t2.version}"
    assert lines[6] == f"{NS}/t2 FAILED on n1: boom"
    assert len(lines) == 7  # --count: it stopped after 7 lines


def test_watch_reports_cancel_removal_and_progress(
    background: Callable[..., Background], manager: dt.Manager
) -> None:
    watcher = background("watch", "--count", "4", "--progress")
    wait_until(lambda: watcher.out, timeout=10, message=str(watcher.err))
    task = manager.add_task(NS, "t1", nodes=["n1"])
    manager.record_progress(NS, "t1", task.version, "n1", 0.5, "half")
    manager.cancel_task(NS, "t1", task.version)
    dt.Manager(
        manager.client, prefix=manager.prefix, completed_task_ttl=timedelta(0)
    ).clean_up_task(NS, "t1", task.version)
    assert watcher.wait(15) == 0, (watcher.out, watcher.err)
    assert watcher.out[1:] == [
        f"added {NS}/t1 v{task.version}",
        f"{NS}/t1 v{task.version} n1 50% half",
        f"{NS}/t1 CANCELLED",
        f"removed {NS}/t1",
    ]


def test_watch_reports_pause_resume_and_retried_failures(
    background: Callable[..., Background], manager: dt.Manager
) -> None:
    watcher = background("watch", "--count", "7")
    wait_until(lambda: watcher.out, timeout=10, message=str(watcher.err))
    task = manager.add_task(NS, "t1", nodes=["n1", "n2"], policy=dt.RunPolicy(max_attempts=2))
    manager.record_node_failure(NS, "t1", task.version, "n1", "boom")
    manager.pause_task(NS, "t1", task.version)
    manager.pause_task(NS, "t1", task.version)  # already paused: nothing written, no line
    manager.resume_task(NS, "t1", task.version)
    manager.record_node_failure(NS, "t1", task.version, "n2", "crash")
    # n1's last attempt: the outcome's line says it, no "attempt 2 failed" line besides
    manager.record_node_failure(NS, "t1", task.version, "n1", "bang")
    plain = manager.add_task(NS, "t2", nodes=["n1"])
    assert watcher.wait(15) == 0, (watcher.out, watcher.err)
    assert watcher.out[1:] == [
        f"added {NS}/t1 v{task.version}",
        f"{NS}/t1 attempt 1 failed on n1: boom",
        f"{NS}/t1 PAUSED",
        f"{NS}/t1 resumed",
        f"{NS}/t1 attempt 1 failed on n2: crash",
        f"{NS}/t1 FAILED on n1: bang",
        f"added {NS}/t2 v{plain.version}",
    ]


# ---- members ---------------------------------------------------------------------------------


def test_members_table_and_json(
    dtask: Dtask, scheduler_factory: Callable[[str], dt.Scheduler], manager: dt.Manager
) -> None:
    assert ok(dtask("members")) == "no live members\n"
    assert orjson.loads(ok(dtask("members", "--json"))) == []
    scheduler = scheduler_factory("node-1")
    lines = ok(dtask("members")).splitlines()
    assert lines[0].split() == ["NODE", "NAMESPACES", "UP"]
    assert [line.split()[:2] for line in lines[1:]] == [["node-1", NS]]
    members = orjson.loads(ok(dtask("members", "--json")))
    assert len(members) == 1
    assert set(members[0]) == {"node", "namespaces", "startedAt"}
    assert members[0]["node"] == "node-1" and members[0]["namespaces"] == [NS]
    started = datetime.fromisoformat(members[0]["startedAt"].replace("Z", "+00:00"))
    assert started == manager.live_members()[0].started_at
    scheduler.stop()
    assert ok(dtask("members")) == "no live members\n"


# ---- export and import -----------------------------------------------------------------------


def _comparable(task: dt.Task) -> tuple[Any, ...]:
    """A task without its version (a STARTED run gets a new one on import)."""
    return (
        task.namespace,
        task.id,
        task.payload,
        task.status,
        task.started_at,
        task.finished_at,
        task.error,
        task.nodes,
        task.finished_nodes,
    )


def _comparable_all(tasks: Mapping[str, list[dt.Task]]) -> dict[str, list[tuple[Any, ...]]]:
    return {ns: [_comparable(t) for t in ts] for ns, ts in tasks.items()}


def test_export_then_import_into_another_prefix(
    dtask: Dtask,
    manager: dt.Manager,
    etcd_client: dt.EtcdClient,
    etcd_endpoint: str,
    dtask_prefix: str,
    tmp_path: Path,
) -> None:
    running = manager.add_task(NS, "running", b"\x00bin", nodes=["n1", "n2"])
    manager.record_node_completion(NS, "running", running.version, "n1")
    failed = manager.add_task(NS, "failed", b"f", nodes=["n1"])
    manager.record_node_failure(NS, "failed", failed.version, "n1", "boom")
    cancelled = manager.add_task("other", "cancelled", b"", nodes=["n3"])
    manager.cancel_task("other", "cancelled", cancelled.version)

    export = tmp_path / "export.json"
    with export.open("wb") as sink:
        proc = subprocess.run(
            [sys.executable, "-m", "distributedtask", "--endpoints", etcd_endpoint,
             "--prefix", dtask_prefix, "export"],
            stdout=sink,
            stderr=subprocess.PIPE,
            env=clean_env(),
            timeout=RUN_TIMEOUT,
            check=False,
        )  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    assert orjson.loads(export.read_bytes()) == orjson.loads(manager.snapshot())

    target_prefix = dtask_prefix + "-copy"
    target = dt.Manager(etcd_client, prefix=target_prefix)
    target.add_task(NS, "replaced", nodes=["n9"])  # import replaces every task
    imported = run_dtask(
        ["--endpoints", etcd_endpoint, "--prefix", target_prefix, "import", str(export)]
    )
    assert ok(imported) == f"imported 3 tasks under {target_prefix}\n"

    source, copy = manager.list_tasks(), target.list_tasks()
    assert _comparable_all(copy) == _comparable_all(source)
    by_id = {t.id: t for ts in copy.values() for t in ts}
    assert by_id["failed"].version == failed.version  # terminal runs keep their version
    assert by_id["cancelled"].version == cancelled.version
    assert by_id["running"].version > running.version  # a STARTED run gets a new one

    # and from stdin, into a third prefix
    third_prefix = dtask_prefix + "-stdin"
    imported = run_dtask(
        ["--endpoints", etcd_endpoint, "--prefix", third_prefix, "import", "-"],
        stdin=export.read_bytes(),
    )
    assert ok(imported) == f"imported 3 tasks under {third_prefix}\n"
    third = dt.Manager(etcd_client, prefix=third_prefix).list_tasks()
    assert _comparable_all(third) == _comparable_all(source)


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"tasks": {"ns": [{"namespace": "ns"}]}}',
        b'{"tasks": []}',
        b"",
    ],
    ids=["not-json", "missing-fields", "wrong-type", "empty"],
)
def test_import_of_a_corrupt_file_writes_nothing(
    dtask: Dtask, manager: dt.Manager, tmp_path: Path, content: bytes
) -> None:
    kept = manager.add_task(NS, "kept", b"k", nodes=["n1"])
    before = manager.snapshot()
    path = tmp_path / "corrupt.json"
    path.write_bytes(content)
    error_line(dtask("import", str(path)))
    assert manager.snapshot() == before
    assert manager.get_task(NS, "kept") == kept


def test_import_of_an_unreadable_file(dtask: Dtask, manager: dt.Manager, tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    line = error_line(dtask("import", str(missing)), EXIT_USAGE)
    assert str(missing) in line


# ---- units -----------------------------------------------------------------------------------


def _claim(manager: dt.Manager, task: dt.Task, node: str, expected: str) -> None:
    """``node`` claims the unit ``expected`` (the only one it may take: see the callers)."""
    unit = manager.claim_unit(NS, task.id, task.version, node)
    assert unit is not None and unit.id == expected, unit


def _complete(manager: dt.Manager, task: dt.Task, node: str, expected: str) -> None:
    _claim(manager, task, node, expected)
    manager.record_unit_completion(NS, task.id, task.version, expected, node)


def test_add_with_units(dtask: Dtask, manager: dt.Manager) -> None:
    out = ok(dtask("add", NS, "t1", "--nodes", "n1,n2", "--units", "a, b,,c"))
    task = manager.get_task(NS, "t1")
    assert task is not None and added_version(out) == task.version
    assert out == f"added {NS}/t1 version {task.version} on n1, n2 with 3 units\n"
    assert task.units == (dt.UnitSpec("a"), dt.UnitSpec("b"), dt.UnitSpec("c"))
    assert orjson.loads(ok(dtask("get", NS, "t1")))["units"] == [
        {"id": u, "group": "", "node": None} for u in "abc"
    ]


def test_add_with_a_units_file(dtask: Dtask, manager: dt.Manager, tmp_path: Path) -> None:
    path = tmp_path / "units.jsonl"
    path.write_text(
        '{"id": "s1", "group": "coll-a", "node": "n1"}\n'
        "\n"
        '  {"id": "s2", "group": "coll-a"}  \r\n'
        "plain-id\n"
        '"quoted id"\n'
        '{"id": "s3", "group": "coll-b", "node": null}\n'
        "   \n"
    )
    out = ok(dtask("add", NS, "t1", "--nodes", "n1,n2", "--units-file", str(path)))
    assert out.endswith(" with 5 units\n"), out
    task = manager.get_task(NS, "t1")
    assert task is not None and task.units == (
        dt.UnitSpec("s1", group="coll-a", node="n1"),
        dt.UnitSpec("s2", group="coll-a"),
        dt.UnitSpec("plain-id"),
        dt.UnitSpec("quoted id"),
        dt.UnitSpec("s3", group="coll-b"),
    )


def test_add_with_units_from_stdin(dtask: Dtask, manager: dt.Manager) -> None:
    ids = [f"u{i}" for i in range(300)]
    out = ok(
        dtask(
            "add", NS, "t1", "--nodes", "n1", "--payload", "p", "--units-file", "-",
            stdin="\n".join(ids) + "\n",
        )
    )  # fmt: skip
    task = manager.get_task(NS, "t1")
    assert task is not None and added_version(out) == task.version
    assert [u.id for u in task.units] == ids and task.payload == b"p"


@pytest.mark.parametrize(
    ("content", "line", "what"),
    [
        (b'a\n{"id": "b"\n', 2, "not valid JSON"),
        (b'a\n\n{"id": "b", "colour": "red"}\n', 3, "unknown field 'colour'"),
        (b'a\n{"id": 7}\n', 2, "string 'id'"),
        (b"a\n[1, 2]\n", 2, "string 'id'"),
        (b"a\nbad\x01id\n", 2, "control character"),
        (b'a\nb\n\n{"id": "a", "group": "g"}\n', 4, "declared twice (first "),
        (b'a\n{"id": "b", "node": "n9"}\n', 2, "'n9', not in --nodes"),
        (b'a\n{"id": "b", "group": ""}\n{"id": "c", "group": "bad\\u0001"}\n', 3, "group"),
        (b"a\n\xff\xfe\n", 2, "not UTF-8"),
    ],
    ids=[
        "bad-json",
        "unknown-field",
        "id-not-a-string",
        "not-an-object",
        "control-character",
        "duplicate",
        "affinity-outside-nodes",
        "bad-group",
        "not-utf8",
    ],
)
def test_bad_units_file_lines_are_usage_errors_naming_the_line(
    dtask: Dtask, manager: dt.Manager, tmp_path: Path, content: bytes, line: int, what: str
) -> None:
    path = tmp_path / "units.txt"
    path.write_bytes(content)
    message = error_line(
        dtask("add", NS, "t1", "--nodes", "n1", "--units-file", str(path)), EXIT_USAGE
    )
    assert f"units file {str(path)!r} line {line}: " in message, message
    assert what in message, message
    assert manager.list_tasks() == {}
    # the same from stdin
    message = error_line(
        dtask("add", NS, "t1", "--nodes", "n1", "--units-file", "-", stdin=content), EXIT_USAGE
    )
    assert f"--units-file stdin line {line}: " in message and what in message, message
    assert manager.list_tasks() == {}


def test_bad_units_are_usage_errors_that_write_nothing(
    dtask: Dtask, manager: dt.Manager, tmp_path: Path
) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    missing = tmp_path / "missing.txt"
    for args, what in (
        (["--units", " , ,"], "--units names no unit"),
        (["--units", "a,b,a"], "--units item 3: unit 'a' is declared twice (first --units item 1)"),
        (["--units", "a,x\x01"], "--units item 2: "),
        (["--units-file", str(blank)], "names no unit"),
        (["--units-file", str(missing)], "No such file or directory"),
        (["--units-file", "-", "--payload-file", "-"], "cannot both read stdin"),
    ):
        message = error_line(dtask("add", NS, "t1", "--nodes", "n1", *args), EXIT_USAGE)
        assert what in message, (args, message)
    line = argparse_error(dtask("add", NS, "t1", "--units", "a", "--units-file", str(blank)))
    assert "not allowed with" in line
    # checked before connecting: no etcd at all is still a usage error
    result = run_dtask(
        ["--endpoints", f"http://127.0.0.1:{free_port()}", "--timeout", "0.5",
         "add", NS, "t1", "--units-file", str(blank)],
        timeout=20,
    )  # fmt: skip
    error_line(result, EXIT_USAGE)
    assert manager.list_tasks() == {}


def test_add_with_units_affine_to_a_node_not_assigned_fails(
    dtask: Dtask, manager: dt.Manager, scheduler_factory: Callable[[str], dt.Scheduler]
) -> None:
    scheduler_factory("m1")  # no --nodes: the Manager checks the affinity against live nodes
    line = error_line(
        dtask("add", NS, "t1", "--units-file", "-", stdin='{"id": "a", "node": "n9"}')
    )
    assert "'n9'" in line
    assert manager.list_tasks() == {}


def _unit_task(manager: dt.Manager) -> dt.Task:
    """A unit task in every state: a1 COMPLETED by n1, a2 IN_PROGRESS on n2 (50% half), b1
    PENDING after a failed attempt on n1 (retried in 5 minutes), b2 and c never claimed.
    Every unit has affinity, so which unit a claim takes does not depend on how units are
    handed out (n3 never claims)."""
    units = [
        dt.UnitSpec("a1", group="coll-a", node="n1"),
        dt.UnitSpec("a2", group="coll-a", node="n2"),
        dt.UnitSpec("b1", group="coll-b", node="n1"),
        dt.UnitSpec("b2", group="coll-b", node="n3"),
        dt.UnitSpec("c", node="n3"),
    ]
    policy = dt.RunPolicy(max_attempts=2, retry_backoff=timedelta(minutes=5))
    task = manager.add_task(NS, "t1", nodes=["n1", "n2", "n3"], policy=policy, units=units)
    _complete(manager, task, "n1", "a1")
    _claim(manager, task, "n2", "a2")
    manager.record_unit_progress(NS, "t1", task.version, "a2", "n2", 0.5, "half")
    _claim(manager, task, "n1", "b1")
    manager.record_unit_failure(NS, "t1", task.version, "b1", "n1", "boom\nand more")
    return task


def test_get_shows_a_summary_of_the_units(dtask: Dtask, manager: dt.Manager) -> None:
    task = _unit_task(manager)
    body = orjson.loads(ok(dtask("get", NS, "t1")))
    assert body["version"] == task.version and len(body["units"]) == 5
    zero = {"COMPLETED": 0, "IN_PROGRESS": 0, "PENDING": 0, "FAILED": 0}
    assert body["unitSummary"] == {
        "total": 5,
        "counts": {**zero, "COMPLETED": 1, "IN_PROGRESS": 1, "PENDING": 3},
        "groups": [
            {"group": "coll-a", "total": 2, "counts": {**zero, "COMPLETED": 1, "IN_PROGRESS": 1}},
            {"group": "coll-b", "total": 2, "counts": {**zero, "PENDING": 2}},
            {"group": "", "total": 1, "counts": {**zero, "PENDING": 1}},
        ],
        "completedByNode": {"n1": 1},
        "inProgressByNode": {"n2": 1},
    }
    manager.add_task(NS, "plain", nodes=["n1"])
    assert "unitSummary" not in orjson.loads(ok(dtask("get", NS, "plain")))


def test_units_table_by_group(dtask: Dtask, manager: dt.Manager) -> None:
    task = _unit_task(manager)
    lines = ok(dtask("units", NS, "t1")).splitlines()
    assert lines[0] == f"{NS}/t1 version {task.version} STARTED: 1/5 units completed"
    assert lines[1].split() == ["UNIT", "STATUS", "NODE", "ATTEMPTS", "ERROR", "PROGRESS"]
    zero = "0 COMPLETED, 0 IN_PROGRESS"
    assert lines[2] == "group coll-a: 2 units, 1 COMPLETED, 1 IN_PROGRESS, 0 PENDING, 0 FAILED"
    assert lines[3].split() == ["a1", "COMPLETED", "n1", "0", "-", "-"]
    assert lines[4].split() == ["a2", "IN_PROGRESS", "n2", "0", "-", "50%", "half"]
    assert lines[5] == f"group coll-b: 2 units, {zero}, 2 PENDING, 0 FAILED"
    assert lines[6].split() == ["b1", "PENDING", "n1", "1", "boom", "and", "more", "-"]
    assert lines[7].split() == ["b2", "PENDING", "-", "0", "-", "-"]
    assert lines[8] == f"group (no group): 1 units, {zero}, 1 PENDING, 0 FAILED"
    assert lines[9].split() == ["c", "PENDING", "-", "0", "-", "-"]
    assert len(lines) == 10
    # the columns line up across groups
    rows = [lines[1], *lines[3:5], *lines[6:8], lines[9]]
    assert len({row.index(row.split()[1]) for row in rows}) == 1, rows
    assert ok(dtask("units", NS, "t1", "--version", str(task.version))).splitlines() == lines


def test_units_json(dtask: Dtask, manager: dt.Manager) -> None:
    task = _unit_task(manager)
    units = orjson.loads(ok(dtask("units", NS, "t1", "--json")))
    assert [u["id"] for u in units] == ["a1", "a2", "b1", "b2", "c"]
    a1, a2, b1, b2, _ = units
    assert a1 == {
        "id": "a1",
        "group": "coll-a",
        "node": "n1",
        "status": "COMPLETED",
        "attempts": 0,
        "error": None,
        "progress": None,
    }
    assert a2["status"] == "IN_PROGRESS" and a2["node"] == "n2"
    assert a2["progress"]["fraction"] == 0.5 and a2["progress"]["message"] == "half"
    assert datetime.fromisoformat(a2["progress"]["updatedAt"].replace("Z", "+00:00")).tzinfo
    assert b1["status"] == "PENDING" and b1["attempts"] == 1 and b1["error"] == "boom\nand more"
    assert b2 == {**b2, "group": "coll-b", "node": None, "status": "PENDING"}
    same = orjson.loads(ok(dtask("units", NS, "t1", "--json", "--version", str(task.version))))
    assert same == units


def test_units_of_a_plain_task_or_another_version_fail(dtask: Dtask, manager: dt.Manager) -> None:
    task = manager.add_task(NS, "plain", nodes=["n1"])
    assert "has no units" in error_line(dtask("units", NS, "plain"))
    line = error_line(dtask("units", NS, "plain", "--version", str(task.version + 9)))
    assert "does not exist" in line
    assert "does not exist" in error_line(dtask("units", NS, "nothing"))


def test_list_shows_units_completed(dtask: Dtask, manager: dt.Manager) -> None:
    running = _unit_task(manager)
    done = manager.add_task(NS, "t2", nodes=["n1"], units=["x", "y"])
    _complete(manager, done, "n1", "x")
    _complete(manager, done, "n1", "y")
    fresh = manager.add_task(NS, "t3", nodes=["n1"], units=["z"])
    manager.add_task(NS, "t4", nodes=["n1", "n2"])
    lines = ok(dtask("list")).splitlines()
    assert lines[0].split() == ["NAMESPACE", "ID", "VERSION", "STATUS", "NODES", "UNITS", "AGE"]
    rows = [line.split()[:6] for line in lines[1:]]
    assert rows == [
        [NS, "t1", str(running.version), "STARTED", "3", "1/5"],
        [NS, "t2", str(done.version), "FINISHED", "1", "2/2"],
        [NS, "t3", str(fresh.version), "STARTED", "1", "0/1"],
        [NS, "t4", rows[3][2], "STARTED", "0/2", "-"],
    ]
    # the JSON stays the library's document
    assert orjson.loads(ok(dtask("list", "--json"))) == orjson.loads(manager.list_tasks_payload())


def test_wait_on_a_unit_task_follows_groups_and_nodes(
    background: Callable[..., Background], manager: dt.Manager
) -> None:
    units = [
        dt.UnitSpec("a1", group="coll-a"),
        dt.UnitSpec("a2", group="coll-a"),
        dt.UnitSpec("b1", group="coll-b"),
        dt.UnitSpec("b2", group="coll-b"),
    ]
    task = manager.add_task(NS, "t1", nodes=["n1", "n2"], units=units)
    waiter = background("wait", NS, "t1", "--plain")
    initial = [
        "units: running 0% 0/4 completed",
        "group coll-a: running 0% 0/2 completed",
        "group coll-b: running 0% 0/2 completed",
        "node n1: idle 0% 0 completed",
        "node n2: idle 0% 0 completed",
    ]
    wait_until(lambda: len(waiter.out) >= 5, timeout=10, message=str(waiter.err))
    assert waiter.out[:5] == initial

    def shows(line: str) -> None:
        wait_until(lambda: line in waiter.out, timeout=10, message=f"{line!r} in {waiter.out}")

    first = manager.claim_unit(NS, "t1", task.version, "n1")
    assert first is not None
    shows("node n1: running 0% 0 completed, 1 in progress")
    shows("units: running 0% 0/4 completed, 1 in progress")
    shows(f"group {first.group}: running 0% 0/2 completed, 1 in progress")
    manager.record_unit_completion(NS, "t1", task.version, first.id, "n1")
    shows("units: running 25% 1/4 completed")
    shows(f"group {first.group}: running 50% 1/2 completed")
    shows("node n1: idle 25% 1 completed")

    ended: list[dt.Task] = []

    def finish() -> None:  # the rest, from another thread while the subprocess waits
        for _ in range(100):  # until the last completion ends the run (bounded: no hang)
            for node in ("n2", "n1"):
                unit = manager.claim_unit(NS, "t1", task.version, node)
                if unit is not None:
                    after = manager.record_unit_completion(NS, "t1", task.version, unit.id, node)
                    if after.status.terminal:
                        ended.append(after)
                        return

    finisher = threading.Thread(target=finish)
    finisher.start()
    finisher.join(20)
    assert not finisher.is_alive()
    assert [t.status for t in ended] == [dt.TaskStatus.FINISHED]
    assert waiter.wait(15) == 0, (waiter.out, waiter.err)
    assert waiter.err == []
    out = waiter.out
    assert out[-1] == f"{NS}/t1 v{task.version} FINISHED"
    by_node = Counter(u.node for u in manager.get_units(NS, "t1", task.version).values())
    assert sum(by_node.values()) == 4 and set(by_node) <= {"n1", "n2"}, by_node
    for line in (
        "group coll-a: done 100% 2/2 completed",
        "units: done 100% 4/4 completed",
        "group coll-b: done 100% 2/2 completed",
        f"node n1: done {by_node['n1'] * 25}% {by_node['n1']} completed",
        f"node n2: done {by_node['n2'] * 25}% {by_node['n2']} completed",
    ):
        assert line in out, (line, out)
    assert all(re.fullmatch(r"(units|group \S+|node n[12]): \w+ \d+%.*", x) for x in out[:-1])


def test_wait_on_a_unit_task_that_fails(
    background: Callable[..., Background], manager: dt.Manager
) -> None:
    units = [dt.UnitSpec("a", node="n2"), dt.UnitSpec("b", node="n1")]
    task = manager.add_task(NS, "t1", nodes=["n1", "n2"], units=units)
    waiter = background("wait", NS, "t1", "--plain")
    wait_until(lambda: len(waiter.out) >= 3, timeout=10, message=str(waiter.err))
    assert waiter.out[:3] == [  # no group named: no line per group
        "units: running 0% 0/2 completed",
        "node n1: idle 0% 0 completed",
        "node n2: idle 0% 0 completed",
    ]
    _complete(manager, task, "n2", "a")
    _claim(manager, task, "n1", "b")
    manager.record_unit_failure(NS, "t1", task.version, "b", "n1", "boom")
    assert waiter.wait(15) == 1, (waiter.out, waiter.err)
    out = waiter.out
    assert out[-1] == f"{NS}/t1 v{task.version} FAILED on n1: boom"
    assert "units: failed 50% 1/2 completed, 1 failed" in out
    assert "node n1: failed 0% 0 completed; unit b: boom" in out
    assert "node n2: stopped 50% 1 completed" in out


# ---- bad input and broken connections --------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["list", "--json"],
        ["get", NS, "t1"],
        ["units", NS, "t1"],
        ["units", NS, "t1", "--json"],
        ["add", NS, "t1", "--payload", "x", "--nodes", "n1"],
        ["add", NS, "t1", "--nodes", "n1", "--units", "a,b"],
        ["add", NS, "t1"],
        ["cancel", NS, "t1"],
        ["pause", NS, "t1"],
        ["resume", NS, "t1", "--version", "3"],
        ["add", NS, "t1", "--nodes", "n1", "--max-attempts", "2", "--deadline", "9"],
        ["cleanup", NS, "t1"],
        ["wait", NS, "t1"],
        ["watch"],
        ["members"],
        ["export"],
    ],
    ids=lambda args: "-".join(args[:2]),
)
def test_etcd_unreachable(args: list[str]) -> None:
    port = free_port()
    result = run_dtask(
        ["--endpoints", f"http://127.0.0.1:{port}", "--timeout", "0.5", *args], timeout=20
    )
    line = error_line(result)
    assert line.startswith("dtask: error: etcd unreachable"), line
    assert str(port) in line
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["get", "", "t1"], "namespace"),
        (["units", "", "t1"], "namespace"),
        (["units", NS, ""], "id"),
        (["add", "", "t1", "--nodes", "n1"], "namespace"),
        (["add", NS, "", "--nodes", "n1"], "id"),
        (["add", NS, "t1", "--nodes", "bad\x01node"], "node"),
        (["cancel", "", "t1", "--version", "3"], "namespace"),
        (["cancel", "", "t1"], "namespace"),
        (["pause", "", "t1"], "namespace"),
        (["resume", NS, ""], "id"),
        (["pause", NS, "", "--version", "3"], "id"),
        (["wait", "", "t1"], "namespace"),
    ],
)
def test_invalid_names(dtask: Dtask, manager: dt.Manager, args: list[str], what: str) -> None:
    line = error_line(dtask(*args))
    assert what in line and ("empty" in line or "control" in line), line
    assert manager.list_tasks() == {}


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        [],
        ["get", NS],
        ["units", NS],
        ["units", NS, "t1", "--version", "x"],
        ["add"],
        ["add", NS, "t1", "--units"],
        ["cancel", NS, "t1", "--version", "abc"],
        ["pause", NS],
        ["resume"],
        ["pause", NS, "t1", "--version", "abc"],
        ["resume", NS, "t1", "--version", "1.5"],
        ["add", NS, "t1", "--max-attempts"],
        ["wait", NS, "t1", "--timeout-after", "soon"],
        ["list", "--bogus"],
        ["--timeout", "abc", "list"],
        ["node", "--provider", "shell=command"],
    ],
    ids=lambda args: "-".join(args) or "nothing",
)
def test_usage_errors(dtask: Dtask, manager: dt.Manager, args: list[str]) -> None:
    argparse_error(dtask(*args))
    assert manager.list_tasks() == {}


def test_bad_timeout_is_a_usage_error(conn: list[str]) -> None:
    line = error_line(run_dtask([*conn, "--timeout", "-1", "list"]), EXIT_USAGE)
    assert "timeout" in line


def test_user_without_password_is_a_usage_error(conn: list[str]) -> None:
    line = error_line(run_dtask([*conn, "--user", "root", "list"]), EXIT_USAGE)
    assert "DTASK_PASSWORD" in line


def test_a_bad_timeout_in_the_environment_is_a_usage_error(conn: list[str]) -> None:
    result = run_dtask([*conn, "list"], env={"DTASK_TIMEOUT": "abc"})
    assert result.returncode == EXIT_USAGE, result
    assert "Traceback" not in result.stderr


def test_cancel_of_version_zero_does_not_cancel_the_current_run(
    dtask: Dtask, manager: dt.Manager
) -> None:
    task = manager.add_task(NS, "t1", nodes=["n1"])
    result = dtask("cancel", NS, "t1", "--version", "0")
    assert manager.get_task(NS, "t1") == task
    assert result.returncode in {EXIT_ERROR, EXIT_USAGE}


@pytest.mark.parametrize("command", [["wait", NS, "t1", "--plain"], ["watch"]])
def test_interrupt_exits_130(
    background: Callable[..., Background], manager: dt.Manager, command: list[str]
) -> None:
    manager.add_task(NS, "t1", nodes=["n1"])
    follower = background(*command)
    wait_until(lambda: follower.out, timeout=10, message=str(follower.err))
    follower.proc.send_signal(signal.SIGINT)
    assert follower.wait(10) == 130
    assert follower.err == ["dtask: interrupted"]


@pytest.mark.parametrize(("namespace", "task_id"), [("ns", "[/]"), ("[bold]ns[/bold]", "t1")])
def test_list_shows_names_with_brackets_verbatim(
    dtask: Dtask, manager: dt.Manager, namespace: str, task_id: str
) -> None:
    manager.add_task(namespace, task_id, nodes=["n1"])
    out = ok(dtask("list"))
    assert out.splitlines()[1].split()[:2] == [namespace, task_id]
