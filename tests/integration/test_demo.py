"""`dtask demo` (what `make demo` runs) goes to the end and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _ours(out: str) -> list[str]:
    """The processes of the demo that printed ``out``: its etcd and its nodes, which name its
    etcd's endpoint (``-ww``: whole command lines, which ps cuts at 80 columns without a
    terminal; another demo, running or left behind by another run, does not count)."""
    endpoint = re.search(r"^etcd (http://\S+) \(embedded", out, re.MULTILINE)
    assert endpoint, out
    mine = re.compile(re.escape(endpoint.group(1)) + r"(?!\d)")
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in ps.stdout.splitlines() if mine.search(line)]


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
        # the unit task: node-c killed mid-way, its units given back and finished by the others
        "added demo/rebuild version",
        "killed node-c (SIGKILL) with ",
        "held by lost node node-c",
        "node-a exited 0, node-b exited 0 (node-c was killed in step 7)",
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
    for task in ("verify", "backup", "rebuild"):
        assert re.search(rf"^demo/{task} v\d+ FINISHED$", out, re.MULTILINE), task
    assert re.search(r"^demo +rebuild +\d+ +FINISHED +3 +24/24 ", out, re.MULTILINE), out
    _check_units(out)
    assert _ours(out) == []
    assert set(Path(tempfile.gettempdir()).glob("dtask-demo-*")) == before


def _check_units(out: str) -> None:
    """Step 7 of the demo: every unit completed exactly once, node-c's units (at least one)
    completed by the others, group_completed called once per group on each node left."""
    groups = ("articles", "authors", "comments")
    completed: dict[str, str] = {}  # unit -> the node that completed it
    for node, count, listing in re.findall(
        r"^  (node-[abc]) completed (\d+) units(?: before it was killed)?: (.*)$", out, re.MULTILINE
    ):
        units = [
            f"{group}-{n}"
            for part in listing.split("; ")
            for group, numbers in [part.split(" ")]
            for n in numbers.split(",")
        ]
        assert len(units) == int(count), listing
        for unit in units:
            assert unit not in completed, f"{unit} completed twice"
            completed[unit] = node
    assert sorted(completed) == sorted(f"{g}-{n}" for g in groups for n in range(1, 9))
    killed = r"^  killed node-c \(SIGKILL\) with (\d+)/24 units completed; it held (.+)$"
    held = re.search(killed, out, re.MULTILINE)
    assert held, out
    assert 0 < int(held.group(1)) < 24, held.group(0)
    # What it held (rarely none: it may complete them just as it dies) the others completed.
    reassigned = [] if held.group(2) == "none" else held.group(2).split(", ")
    for unit in reassigned:
        line = re.search(
            rf"^  {unit}: held by node-c when it died, completed by (node-[ab])$", out, re.MULTILINE
        )
        assert line and completed[unit] == line.group(1), unit
    for node in ("node-a", "node-b"):
        called = re.search(rf"^  {node}: group_completed called for (.+)$", out, re.MULTILINE)
        assert called and sorted(called.group(1).split(", ")) == list(groups), node
    assert re.search(
        r"^  node-c: group_completed (called for .+|not called) before it was killed$",
        out,
        re.MULTILINE,
    )


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
        seen = []
        for line in proc.stdout:  # interrupt once the nodes run a task
            seen.append(line)
            if line.startswith("added demo/checksum"):
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        out = "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "Stopped the nodes" in out
    wait_until(lambda: _ours(out) == [], timeout=10, message="a demo process is left")
    assert set(Path(tempfile.gettempdir()).glob("dtask-demo-*")) == before
