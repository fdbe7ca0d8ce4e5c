"""RunDirs: one directory per run that no task id can escape, shared by both providers."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributedtask import TaskDescriptor, ThreadProvider
from distributedtask.rundirs import RunDirs

HOSTILE_IDS = [".", "..", "a/../../b", "x" * 256, "é" * 120, "%2E", "%~abc", "plain", "sp ace"]


@pytest.mark.parametrize("task_id", HOSTILE_IDS)
def test_every_id_stays_inside_the_root_and_round_trips(tmp_path: Path, task_id: str) -> None:
    dirs = RunDirs(tmp_path / "state")
    descriptor = TaskDescriptor(task_id, 7)
    run_dir = dirs.create(descriptor)
    assert run_dir.resolve().is_relative_to((tmp_path / "state").resolve())
    assert len(run_dir.parent.name.encode()) <= 255
    assert dirs.list() == [descriptor]
    dirs.remove(descriptor)
    dirs.remove(descriptor)  # idempotent
    assert dirs.list() == []
    assert list((tmp_path / "state").iterdir()) == []


def test_foreign_entries_are_ignored(tmp_path: Path) -> None:
    dirs = RunDirs(tmp_path)
    dirs.create(TaskDescriptor("a", 1))
    (tmp_path / "README").write_text("not a run")
    (tmp_path / "a" / "²").mkdir()  # a unicode digit is no version
    (tmp_path / "a" / "01").mkdir()  # nor a non-canonical number
    (tmp_path / "%zz").mkdir()  # nor a bad escape
    assert dirs.list() == [TaskDescriptor("a", 1)]
    assert RunDirs(tmp_path / "missing").list() == []


def test_versions_of_one_id_live_side_by_side(tmp_path: Path) -> None:
    dirs = RunDirs(tmp_path)
    for version in (1, 2):
        dirs.create(TaskDescriptor("t", version))
    dirs.remove(TaskDescriptor("t", 1))
    assert dirs.list() == [TaskDescriptor("t", 2)]


def test_thread_provider_uses_the_same_layout(tmp_path: Path) -> None:
    provider = ThreadProvider(lambda task, ctx: None, state_dir=tmp_path)
    for task_id in HOSTILE_IDS:
        RunDirs(tmp_path).create(TaskDescriptor(task_id, 3))
    assert provider.get_local_tasks() == sorted(TaskDescriptor(i, 3) for i in HOSTILE_IDS)
    for descriptor in provider.get_local_tasks():
        provider.cleanup_task(descriptor)
    assert provider.get_local_tasks() == []
    assert tmp_path.exists() and list(tmp_path.iterdir()) == []
