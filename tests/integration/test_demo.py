"""`dtask demo` (what `make demo` runs) goes to the end and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _ours() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [
        line
        for line in out.stdout.splitlines()
        if ("--name=demo" in line and "etcd" in line) or "--prefix /demo node" in line
    ]


def test_demo_runs_to_the_end_and_leaves_no_process_or_file() -> None:
    before = set(Path(tempfile.gettempdir()).glob("dtask-demo-*"))
    result = subprocess.run(
        [sys.executable, "-m", "distributedtask", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in (
        "node-a  demo, shell",
        "demo/checksum v",
        "chunk 8/8",
        "FINISHED",
        "FAILED on node-b: exit status 3: disk /data is full",
        "node-a: shell/migrate",
        "terminated",
        "CANCELLED",
        # the retried task: node-b's first attempt fails, its second succeeds
        "added demo/verify version",
        "failed (attempt 1 of 2): chunk 5: read error (a flaky disk); again in ",
        "demo/verify v",
        "1 failed on node-b",
        # the paused task: paused, each node's run terminated, PAUSED, resumed, finished
        "paused demo/backup version",
        "node-a: terminated demo/backup v",
        "resumed demo/backup version",
        "node-a exited 0, node-b exited 0, node-c exited 0",
        "Stopped the nodes",
        "Everything stopped and removed",
    ):
        assert expected in out, expected
    for line in (  # node-b's lines in `dtask wait`: backing off, then its second attempt running
        r"node-b: retrying \d+% \(attempt 2 of 2\): chunk 5: read error \(a flaky disk\)",
        r"node-b: running \d+% chunk [5-8]/8 \w+ \(attempt 2 of 2\)",
    ):
        assert re.search(f"^{line}$", out, re.MULTILINE), line
    assert re.search(r"^demo +backup +\d+ +PAUSED ", out, re.MULTILINE), out
    for task in ("verify", "backup"):
        assert re.search(rf"^demo/{task} v\d+ FINISHED$", out, re.MULTILINE), task
    assert _ours() == []
    assert set(Path(tempfile.gettempdir()).glob("dtask-demo-*")) == before


def test_an_interrupted_demo_leaves_nothing_behind() -> None:
    import signal

    from distributedtask.testing import wait_until

    before = set(Path(tempfile.gettempdir()).glob("dtask-demo-*"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "distributedtask", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # interrupt once the nodes run a task
            if line.startswith("added demo/checksum"):
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "Stopped the nodes" in out
    wait_until(lambda: _ours() == [], timeout=10, message="a demo process is left")
    assert set(Path(tempfile.gettempdir()).glob("dtask-demo-*")) == before
