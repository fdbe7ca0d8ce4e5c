"""`make demo` (python -m distributedtask.demo) runs to the end and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _demo_etcds() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if "--name=demo" in line and "etcd" in line]


def test_demo_runs_to_the_end_and_leaves_no_process() -> None:
    if _demo_etcds():
        pytest.skip("another demo etcd is running on this machine")
    result = subprocess.run(
        [sys.executable, "-m", "distributedtask.demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in (
        "FINISHED",
        "CANCELLED",
        "TaskAlreadyRunningError",
        "TaskTooFreshError",
        "cleaned up backup/nightly",
        "(no tasks)",
        "etcd stopped",
    ):
        assert expected in result.stdout
    assert _demo_etcds() == []
