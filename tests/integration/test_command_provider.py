"""CommandProvider (src/distributedtask/providers/command.py) running real processes.

Every test but the last drives the provider directly with a fake recorder; the last runs it
under a Scheduler on the real etcd. Nothing here sleeps to wait: the tests wait on handles,
or with ``wait_until``.

"Alive" means a process that exists and is not a zombie: where PID 1 does not reap orphans
(this sandbox; many containers), a killed grandchild stays a zombie for good, so
``os.kill(pid, 0)`` / ``os.killpg(pgid, 0)`` keep succeeding although nothing runs any more.
On Linux the helpers below read ``/proc`` instead.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from prometheus_client import CollectorRegistry

import distributedtask as dt
from distributedtask.model import parse_time
from distributedtask.providers import CommandProvider
from distributedtask.providers.command import CommandHandle
from distributedtask.testing import wait_until

NS = "cmd"
PROC = Path("/proc/self/stat").exists()

payload = CommandProvider.payload
MakeProvider = Callable[..., CommandProvider]


# ---- helpers -----------------------------------------------------------------------------


class FakeRecorder:
    """A TaskCompletionRecorder that keeps every call, thread-safely."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[tuple[object, ...]] = []

    def record_completion(self, namespace: str, task_id: str, version: int) -> None:
        with self._lock:
            self.calls.append(("complete", namespace, task_id, version))

    def record_failure(self, namespace: str, task_id: str, version: int, error: str) -> None:
        with self._lock:
            self.calls.append(("fail", namespace, task_id, version, error))

    def record_progress(
        self, namespace: str, task_id: str, version: int, fraction: float, message: str = ""
    ) -> None:
        with self._lock:
            self.calls.append(("progress", namespace, task_id, version, fraction, message))

    def of(self, kind: str) -> list[tuple[object, ...]]:
        with self._lock:
            return [call[1:] for call in self.calls if call[0] == kind]

    def outcomes(self) -> list[tuple[object, ...]]:
        with self._lock:
            return [call for call in self.calls if call[0] != "progress"]

    def errors(self) -> list[str]:
        return [str(call[-1]) for call in self.of("fail")]

    def progress(self) -> list[tuple[float, str]]:
        return [(float(str(c[-2])), str(c[-1])) for c in self.of("progress")]


def make_task(data: bytes, task_id: str = "t1", version: int = 1) -> dt.Task:
    return dt.Task(
        namespace=NS,
        id=task_id,
        version=version,
        payload=data,
        status=dt.TaskStatus.STARTED,
        started_at=datetime.now(timezone.utc),
        finished_at=None,
        error=None,
        nodes=frozenset({"n1"}),
        finished_nodes=frozenset(),
    )


def _stat_fields(pid: int) -> list[str] | None:
    """``[state, ppid, pgrp, ...]`` from /proc/<pid>/stat, None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    if PROC:
        fields = _stat_fields(pid)
        return fields is not None and fields[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    """Some process of the group exists and is not a zombie."""
    if PROC:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _stat_fields(int(entry.name))
                if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def read_output(handle: CommandHandle) -> str:
    return (handle.run_dir / "output.log").read_text()


def read_status(handle: CommandHandle) -> dict[str, object]:
    data = orjson.loads((handle.run_dir / "status.json").read_bytes())
    assert isinstance(data, dict)
    return data


def printed_pid(handle: CommandHandle, label: str) -> int:
    """Wait for the command to print ``<label> <pid>`` and return the pid."""

    def find() -> int | None:
        match = re.search(rf"^{label} (\d+)$", read_output(handle), re.MULTILINE)
        return int(match.group(1)) if match else None

    pid = wait_until(find, timeout=2, message=f"{label} pid printed")
    assert pid is not None
    return pid


@pytest.fixture
def recorder() -> FakeRecorder:
    return FakeRecorder()


@pytest.fixture
def providers(tmp_path: Path, recorder: FakeRecorder) -> Iterator[list[CommandProvider]]:
    """Every provider a test makes, terminated and joined after it."""
    made: list[CommandProvider] = []
    yield made
    for provider in made:
        for handle in provider.running():
            handle.terminate()
    for provider in made:
        assert provider.join(10), "a watcher thread outlived its test"


@pytest.fixture
def new_provider(
    tmp_path: Path, recorder: FakeRecorder, providers: list[CommandProvider]
) -> MakeProvider:
    """``new_provider(**options)``: a provider on ``tmp_path/state`` with the fake recorder."""

    def make(**options: Any) -> CommandProvider:
        provider = CommandProvider(tmp_path / "state", **options)
        provider.set_completion_recorder(recorder)
        providers.append(provider)
        return provider

    return make


@pytest.fixture
def provider(new_provider: MakeProvider) -> CommandProvider:
    """A provider with the default kill_grace of 5 s: a test that ends sooner ended by TERM."""
    return new_provider()


# ---- outcomes ----------------------------------------------------------------------------


def test_exit_zero_records_completion_and_keeps_output_and_status(
    provider: CommandProvider, recorder: FakeRecorder
) -> None:
    task = make_task(payload(argv=["sh", "-c", "echo hello; echo oops >&2"]), "job", 7)
    handle = provider.start_task(task)
    assert isinstance(handle, dt.TaskHandle)
    assert handle.wait(2)
    assert recorder.outcomes() == [("complete", NS, "job", 7)]
    assert handle.run_dir == provider.state_dir / "job" / "7"
    assert read_output(handle) == "hello\noops\n"
    status = read_status(handle)
    assert status["exit_code"] == 0
    assert status["signal"] is None
    assert status["timed_out"] is False
    assert status["terminated"] is False
    assert status["error"] is None
    assert status["pid"] == handle.pid
    started_at, ended_at = parse_time(status["started_at"]), parse_time(status["ended_at"])
    assert started_at is not None and ended_at is not None
    assert started_at <= ended_at <= datetime.now(timezone.utc)
    assert provider.get_local_tasks() == [dt.TaskDescriptor("job", 7)]


def test_non_zero_exit_records_failure_with_the_output_tail(
    new_provider: MakeProvider, recorder: FakeRecorder
) -> None:
    provider = new_provider(output_tail_lines=2)
    script = "for i in 1 2 3 4 5; do echo line$i; done; exit 3"
    handle = provider.start_task(make_task(payload(shell=script)))
    assert handle.wait(2)
    assert recorder.outcomes() == [("fail", NS, "t1", 1, "exit status 3: line4\nline5")]
    status = read_status(handle)
    assert status["exit_code"] == 3
    assert status["error"] == "exit status 3: line4\nline5"
    assert read_output(handle).splitlines() == [f"line{i}" for i in range(1, 6)]


def test_death_by_signal_records_failure(provider: CommandProvider, recorder: FakeRecorder) -> None:
    handle = provider.start_task(make_task(payload(shell="echo bye; kill -KILL $$")))
    assert handle.wait(2)
    assert recorder.errors() == ["killed by signal 9 (SIGKILL): bye"]
    status = read_status(handle)
    assert (status["exit_code"], status["signal"]) == (None, 9)


def test_progress_lines_are_reported_as_they_come(
    provider: CommandProvider, recorder: FakeRecorder
) -> None:
    script = (
        "echo 'progress: 0.25 starting up'; echo 'progress: .5' >&2; echo 'progress: abc no';"
        " echo 'progress: 7 over the top'; echo 'not progress: 0.9'; sleep 300"
    )
    handle = provider.start_task(make_task(payload(shell=script)))
    wait_until(lambda: len(recorder.progress()) == 3, timeout=2, message="progress reported")
    assert not handle.done  # reported while the command still runs
    assert recorder.progress() == [(0.25, "starting up"), (0.5, ""), (1.0, "over the top")]
    assert recorder.of("progress")[0][:3] == (NS, "t1", 1)
    handle.terminate()
    assert handle.wait(2)
    assert recorder.outcomes() == []  # terminated: nothing recorded
    assert "progress: abc no\n" in read_output(handle)


# ---- terminate, grace, timeout -------------------------------------------------------------


def test_terminate_kills_the_whole_process_group(
    provider: CommandProvider, recorder: FakeRecorder
) -> None:
    handle = provider.start_task(make_task(payload(shell="sleep 300 & echo child $!; sleep 300")))
    child = printed_pid(handle, "child")
    assert handle.pid is not None
    pgid = handle.pid
    assert os.getpgid(child) == pgid != os.getpgid(0)
    started = time.monotonic()
    handle.terminate()
    assert time.monotonic() - started < 0.5  # terminate never blocks
    assert handle.wait(2)  # well within kill_grace=5: SIGTERM did it
    wait_until(lambda: not alive(handle.pid or 0) and not alive(child), timeout=2)
    wait_until(lambda: not group_alive(pgid), timeout=2, message="process group gone")
    assert recorder.outcomes() == []
    status = read_status(handle)
    assert status["terminated"] is True
    assert status["signal"] == 15
    handle.terminate()  # no-op once ended


def test_a_command_ignoring_sigterm_is_killed_after_the_grace(
    new_provider: MakeProvider, recorder: FakeRecorder
) -> None:
    provider = new_provider(kill_grace=0.5)
    handle = provider.start_task(make_task(payload(shell="trap '' TERM; echo ready; sleep 300")))
    wait_until(lambda: "ready" in read_output(handle), timeout=2)
    pgid = handle.pid
    assert pgid is not None
    started = time.monotonic()
    handle.terminate()
    assert time.monotonic() - started < 0.2  # the grace is the watcher's, not the caller's
    assert not handle.wait(0.3)
    assert handle.wait(2)
    assert time.monotonic() - started >= 0.5
    assert read_status(handle)["signal"] == 9
    wait_until(lambda: not group_alive(pgid), timeout=2)
    assert recorder.outcomes() == []


def test_what_the_command_leaves_in_its_group_is_stopped_when_it_exits(
    new_provider: MakeProvider, recorder: FakeRecorder
) -> None:
    provider = new_provider(kill_grace=0.5)
    script = "(trap '' TERM; exec sleep 300) & echo child $!; exit 0"
    handle = provider.start_task(make_task(payload(shell=script)))
    assert handle.wait(2)
    child = printed_pid(handle, "child")
    assert recorder.outcomes() == [("complete", NS, "t1", 1)]
    wait_until(lambda: not alive(child), timeout=2, message="leftover child killed")


def test_timeout_kills_the_group_and_records_failure(
    provider: CommandProvider, recorder: FakeRecorder
) -> None:
    handle = provider.start_task(
        make_task(payload(shell="echo started; sleep 300 & sleep 300", timeout=0.3))
    )
    started = time.monotonic()
    assert handle.wait(2)
    assert time.monotonic() - started >= 0.25
    assert recorder.errors() == ["timed out after 0.3s: started"]
    status = read_status(handle)
    assert status["timed_out"] is True
    assert status["terminated"] is False
    assert handle.pid is not None
    wait_until(lambda: not group_alive(handle.pid or 0), timeout=2)


def test_terminate_after_the_end_changes_nothing(
    provider: CommandProvider, recorder: FakeRecorder
) -> None:
    handle = provider.start_task(make_task(payload(argv=["true"])))
    assert handle.wait(2)
    handle.terminate()
    assert recorder.outcomes() == [("complete", NS, "t1", 1)]
    assert read_status(handle)["terminated"] is False


# ---- bad payloads and commands that cannot start -----------------------------------------


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"", "not JSON"),
        (b'["ls"]', "expected a JSON object"),
        (b"{}", "exactly one of 'argv' and 'shell'"),
        (b'{"argv": ["ls"], "shell": "ls"}', "exactly one of 'argv' and 'shell'"),
        (b'{"argv": "ls"}', "argv must be a list"),
        (b'{"argv": []}', "argv must not be empty"),
        (b'{"argv": ["ls", 1]}', "argv[1] must be a string"),
        (b'{"shell": 3}', "shell must be a string"),
        (b'{"shell": "ls", "env": {"A": 1}}', "env['A'] must be a string"),
        (b'{"shell": "ls", "env": ["A"]}', "env must be an object"),
        (b'{"shell": "ls", "cwd": 5}', "cwd must be a string"),
        (b'{"shell": "ls", "timeout": -1}', "timeout must be a positive number"),
        (b'{"shell": "ls", "timeout": true}', "timeout must be a number"),
        (b'{"shell": "ls", "timout": 5}', "unknown keys ['timout']"),
    ],
)
def test_a_bad_payload_records_a_failure_and_returns_a_finished_handle(
    provider: CommandProvider, recorder: FakeRecorder, data: bytes, detail: str
) -> None:
    handle = provider.start_task(make_task(data))
    assert handle.done and handle.wait(0)
    assert handle.pid is None
    [error] = recorder.errors()
    assert error.startswith("invalid command payload: ")
    assert detail in error
    assert read_status(handle)["error"] == error
    assert provider.get_local_tasks() == [dt.TaskDescriptor("t1", 1)]


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (payload(argv=["/nonexistent/program"]), "cannot start '/nonexistent/program'"),
        (payload(shell="true", cwd="/nonexistent/dir"), "cannot start '/bin/sh'"),
    ],
)
def test_a_command_that_cannot_start_records_a_failure(
    provider: CommandProvider, recorder: FakeRecorder, data: bytes, detail: str
) -> None:
    handle = provider.start_task(make_task(data))
    assert handle.wait(0)
    [error] = recorder.errors()
    assert error.startswith(detail)
    assert "No such file or directory" in error


# ---- environment and working directory ---------------------------------------------------


def test_env_and_cwd_are_honoured(
    new_provider: MakeProvider, recorder: FakeRecorder, tmp_path: Path
) -> None:
    provider = new_provider(env={"BASE": "from provider", "OVER": "provider"})
    work = tmp_path / "work dir"
    work.mkdir()
    script = (
        'printf "%s|%s|%s|%s\\n" "$BASE" "$OVER" "$EXTRA" "$(pwd)";'
        ' printf "%s|%s|%s|%s\\n" "$DTASK_NAMESPACE" "$DTASK_TASK_ID" "$DTASK_TASK_VERSION"'
        ' "$DTASK_RUN_DIR"; test -n "$PATH"'
    )
    data = payload(shell=script, env={"OVER": "payload", "EXTRA": "x y"}, cwd=work)
    handle = provider.start_task(make_task(data, "a/b", 3))
    assert handle.wait(2)
    assert recorder.outcomes() == [("complete", NS, "a/b", 3)]
    assert read_output(handle).splitlines() == [
        f"from provider|payload|x y|{work}",
        f"{NS}|a/b|3|{handle.run_dir}",
    ]


# ---- local state ---------------------------------------------------------------------------


def test_cleanup_removes_the_run_directory_and_is_idempotent(
    provider: CommandProvider, recorder: FakeRecorder
) -> None:
    first = provider.start_task(make_task(payload(argv=["true"]), "x", 1))
    second = provider.start_task(make_task(payload(argv=["true"]), "x", 2))
    assert first.wait(2) and second.wait(2)
    id_dir = provider.state_dir / "x"
    assert sorted(p.name for p in id_dir.iterdir()) == ["1", "2"]
    provider.cleanup_task(dt.TaskDescriptor("x", 1))
    assert not first.run_dir.exists()
    assert second.run_dir.exists()  # the id's directory stays for version 2
    provider.cleanup_task(dt.TaskDescriptor("x", 2))
    assert not id_dir.exists()
    provider.cleanup_task(dt.TaskDescriptor("x", 2))  # again: nothing to do
    provider.cleanup_task(dt.TaskDescriptor("never", 9))
    assert provider.get_local_tasks() == []
    assert list(provider.state_dir.iterdir()) == []


def test_cleanup_of_a_running_run_terminates_it(
    provider: CommandProvider, recorder: FakeRecorder
) -> None:
    handle = provider.start_task(make_task(payload(shell="echo up; sleep 300")))
    wait_until(lambda: "up" in read_output(handle), timeout=2)
    provider.cleanup_task(dt.TaskDescriptor("t1", 1))
    assert handle.wait(2)
    assert not handle.run_dir.exists()
    assert not handle.run_dir.parent.exists()
    assert recorder.outcomes() == []


def test_a_new_provider_lists_the_runs_it_finds(
    new_provider: MakeProvider, recorder: FakeRecorder
) -> None:
    provider = new_provider()
    long_id = "ü" * 120  # 240 UTF-8 bytes, 720 once escaped: stored under a hash
    ids = ["plain", "a/b", "..", ".", "%41", long_id, "with space"]
    handles = [
        provider.start_task(make_task(payload(argv=["true"]), task_id, version))
        for version, task_id in enumerate(ids, start=10)
    ]
    assert all(handle.wait(2) for handle in handles)
    state = provider.state_dir
    assert all(handle.run_dir.parent.parent == state for handle in handles)  # never outside
    assert (state / quote("a/b", safe="")).is_dir()
    # what this provider did not make is ignored
    (state / "lost+found").mkdir()
    (state / "README").write_text("not a run")
    (state / "plain" / "not-a-version").mkdir()
    (state / "plain" / "007").mkdir()
    (state / "%zz").mkdir()
    (state / "%~deadbeef").mkdir()

    expected = sorted(dt.TaskDescriptor(task_id, v) for v, task_id in enumerate(ids, start=10))
    restarted = new_provider()
    assert restarted.get_local_tasks() == expected
    for descriptor in expected:
        restarted.cleanup_task(descriptor)
    assert restarted.get_local_tasks() == []
    left = ["%zz", "%~deadbeef", "README", "lost+found", "plain"]
    assert sorted(p.name for p in state.iterdir()) == left  # "plain" still holds foreign dirs
    assert sorted(p.name for p in (state / "plain").iterdir()) == ["007", "not-a-version"]
    assert CommandProvider(state / "missing-later").get_local_tasks() == []


def test_a_second_start_of_a_run_empties_its_directory(
    provider: CommandProvider, recorder: FakeRecorder
) -> None:
    task = make_task(payload(shell="echo run; exit 1"))
    first = provider.start_task(task)
    assert first.wait(2)
    second = provider.start_task(task)  # e.g. after a restart of the node
    assert second is not first
    assert second.wait(2)
    assert read_output(second) == "run\n"
    assert recorder.errors() == ["exit status 1: run", "exit status 1: run"]


def test_starting_a_running_run_again_returns_its_handle(provider: CommandProvider) -> None:
    task = make_task(payload(shell="sleep 300"))
    handle = provider.start_task(task)
    assert provider.start_task(task) is handle
    assert provider.running() == [handle]
    handle.terminate()
    assert handle.wait(2)
    assert provider.running() == []


def test_a_run_started_while_it_is_still_terminating_waits_for_the_old_one(
    new_provider: MakeProvider, recorder: FakeRecorder
) -> None:
    provider = new_provider(kill_grace=0.3)
    task = make_task(payload(shell="trap '' TERM; echo ready; sleep 300"))
    old = provider.start_task(task)
    wait_until(lambda: "ready" in read_output(old), timeout=2)
    old.terminate()
    new = provider.start_task(task)
    assert new is not old
    assert new.pid is None  # not spawned while the old process group is alive
    wait_until(lambda: new.pid is not None, timeout=2)
    assert old.done
    wait_until(lambda: "ready" in read_output(new), timeout=2)
    new.terminate()
    assert new.wait(2)
    assert recorder.outcomes() == []


def test_join_waits_for_every_watcher(provider: CommandProvider) -> None:
    handles = [
        provider.start_task(make_task(payload(shell="sleep 300"), f"t{i}")) for i in range(3)
    ]
    assert not provider.join(0.05)
    for handle in handles:
        handle.terminate()
    assert provider.join(2)
    assert all(handle.done for handle in handles)
    assert not [t for t in threading.enumerate() if t.name.startswith("dtask-cmd-")]


# ---- under a Scheduler, on the real etcd ------------------------------------------------------


def test_a_scheduler_runs_a_command_to_finished_with_progress(
    manager: dt.Manager, tmp_path: Path
) -> None:
    provider = CommandProvider(tmp_path / "state")
    scheduler = dt.Scheduler(
        manager,
        node_id="n1",
        providers={NS: provider},
        registry=CollectorRegistry(),
        member_ttl=timedelta(seconds=2),
    )
    try:
        scheduler.start()
        data = payload(shell="echo 'progress: 0.5 halfway'; echo done")
        task = manager.add_task(NS, "job", data, nodes=["n1"])
        final = manager.wait_for_task(NS, "job", task.version, timeout=10)
        assert final.status is dt.TaskStatus.FINISHED
        assert final.finished_nodes == {"n1"}
        progress = manager.get_progress(NS, "job", task.version)
        assert (progress["n1"].fraction, progress["n1"].message) == (0.5, "halfway")
        assert provider.get_local_tasks() == [task.descriptor]
    finally:
        scheduler.stop()
    assert provider.join(5)
