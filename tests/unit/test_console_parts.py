"""The console's parts that need no etcd and no browser: the event log and its wire form, the
JSON views and filters, the Host rule, and the static files (no markup built from data, no
inline script, nothing from elsewhere)."""

from __future__ import annotations

import asyncio
import importlib.resources
import re
from datetime import datetime, timedelta, timezone

import pytest

pytest.importorskip("starlette", reason="the console needs the ui extra")

import distributedtask as dt
from distributedtask.console.app import allowed_hosts, is_loopback
from distributedtask.console.events import EventLog, Waiter, sse_frame
from distributedtask.console.views import select_tasks, status_counts, summary
from distributedtask.follower import FailedAttempts
from distributedtask.model import FrozenMap, Progress

STATIC = importlib.resources.files("distributedtask.console").joinpath("static")


# ---- the event log ----------------------------------------------------------------------------


def test_the_log_numbers_events_and_gives_what_follows_a_place() -> None:
    log = EventLog(capacity=3)
    assert log.head == 0 and log.since(0) == []
    for kind in ("a", "b", "c", "d"):
        log.append(kind, b"{}")
    assert log.head == 4
    assert [e.kind for e in log.since(3) or []] == ["d"]
    assert [e.kind for e in log.since(1) or []] == ["b", "c", "d"]
    assert log.since(0) is None  # event 1 is no longer kept: the page needs a snapshot
    assert log.since(4) == [] and log.since(5) is None


def test_event_ids_are_of_one_process() -> None:
    log, other = EventLog(), EventLog()
    log.append("a", b"{}")
    log.append("b", b"{}")
    assert log.parse_id(log.event_id(2)) == 2
    assert log.parse_id(other.event_id(1)) is None  # a restarted server's id
    for junk in (None, "", "2", f"{log.epoch}-", f"{log.epoch}-x", f"{log.epoch}-9", "a-b-c"):
        assert log.parse_id(junk) is None, junk
    with pytest.raises(ValueError):
        EventLog(capacity=0)


def test_an_sse_frame_is_one_event() -> None:
    frame = sse_frame("e-1", "task", b'{"a":"line\\nbreak"}')
    assert frame == b'id: e-1\nevent: task\ndata: {"a":"line\\nbreak"}\n\n'


def test_a_waiter_is_woken_from_another_thread_and_not_after_its_loop_closed() -> None:
    async def scenario() -> Waiter:
        waiter = Waiter()
        log = EventLog()
        log.add_waiter(waiter)
        await asyncio.get_running_loop().run_in_executor(None, log.wake)
        await asyncio.wait_for(waiter.event.wait(), 5)
        log.remove_waiter(waiter)
        assert log.waiters == 0
        return waiter

    waiter = asyncio.run(scenario())
    waiter.wake()  # its loop is closed: nothing happens, nothing raises


# ---- views ------------------------------------------------------------------------------------


def _task(task_id: str, status: dt.TaskStatus, started: int, **fields: object) -> dt.Task:
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    values: dict[str, object] = {
        "namespace": "ns",
        "id": task_id,
        "version": started,
        "payload": b"",
        "status": status,
        "started_at": base + timedelta(minutes=started),
        "finished_at": None,
        "error": None,
        "nodes": frozenset({"a", "b"}),
        "finished_nodes": frozenset(),
    }
    values.update(fields)
    return dt.Task(**values)  # type: ignore[arg-type]


def test_a_summary_counts_nodes_progress_and_attempts() -> None:
    from distributedtask.console.views import node_rows

    task = _task(
        "t",
        dt.TaskStatus.STARTED,
        1,
        finished_nodes=frozenset({"b"}),
        attempts=FrozenMap({"a": 1}),
        last_errors=FrozenMap({"a": "disk full"}),
        policy=dt.RunPolicy(max_attempts=3),
    )
    now = datetime(2026, 1, 1, 1, tzinfo=timezone.utc)
    rows = node_rows(
        task,
        None,
        {"a": Progress(0.5, "half", now)},
        {"a": FailedAttempts(1, "disk full", now - timedelta(seconds=1))},
        task.nodes,
    )
    assert rows["a"]["state"] == "running" and rows["a"]["message"] == "half (attempt 2 of 3)"
    assert rows["a"]["lastError"] == "disk full" and rows["a"]["attempts"] == 1
    assert rows["b"]["state"] == "done" and rows["b"]["fraction"] == 1.0
    out = summary(task, rows, 12)
    assert out["progress"] == 0.75 and out["finishedCount"] == 1 and out["nodeCount"] == 2
    assert out["failedAttempts"] == "1 failed on a" and out["payloadBytes"] == 12
    assert out["policy"] == {"maxAttempts": 3}
    assert not {"payload", "nodes", "finishedNodes", "attempts", "lastErrors"} & out.keys()


def test_tasks_are_filtered_and_sorted() -> None:
    tasks = [
        {"namespace": "b", "ID": "x", "status": "STARTED", "startedAt": "2", "progress": 0.5,
         "version": 2},
        {"namespace": "a", "ID": "y", "status": "FAILED", "startedAt": "3", "progress": 0.1,
         "version": 3},
        {"namespace": "a", "ID": "x", "status": "STARTED", "startedAt": "1", "progress": 0.9,
         "version": 1},
    ]  # fmt: skip
    names = lambda chosen: [(t["namespace"], t["ID"]) for t in chosen]  # noqa: E731
    assert names(select_tasks(tasks)) == [("a", "x"), ("a", "y"), ("b", "x")]
    assert names(select_tasks(tasks, sort="-name")) == [("b", "x"), ("a", "y"), ("a", "x")]
    assert names(select_tasks(tasks, sort="started")) == [("a", "y"), ("b", "x"), ("a", "x")]
    assert names(select_tasks(tasks, sort="-started"))[0] == ("a", "x")
    assert names(select_tasks(tasks, sort="progress"))[0] == ("a", "y")
    assert names(select_tasks(tasks, namespace="a", status="STARTED")) == [("a", "x")]
    assert status_counts(tasks) == {
        "STARTED": 2,
        "FINISHED": 0,
        "CANCELLED": 0,
        "FAILED": 1,
        "PAUSED": 0,
    }
    for bad in ({"status": "started"}, {"sort": "size"}, {"sort": "--name"}):
        with pytest.raises(ValueError):
            select_tasks(tasks, **bad)  # type: ignore[arg-type]


def test_the_host_rule() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")
    hosts = allowed_hosts("127.0.0.1", 8080)
    assert hosts is not None
    assert {"127.0.0.1:8080", "localhost:8080", "[::1]:8080"} <= hosts
    assert "127.0.0.1" not in hosts and "evil.example:8080" not in hosts
    assert "[::1]:9" in (allowed_hosts("::1", 9) or set())
    assert allowed_hosts("0.0.0.0", 8080) is None  # reached by names it cannot know


# ---- the static files -------------------------------------------------------------------------


def _static(name: str) -> str:
    return STATIC.joinpath(name).read_text(encoding="utf-8")


def test_the_script_never_builds_markup_from_text() -> None:
    script = _static("console.js")
    code = "\n".join(line for line in script.splitlines() if not line.strip().startswith("//"))
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "createContextualFragment",
        "DOMParser",
        "srcdoc",
        'setAttribute("style"',
    ):
        assert sink not in code, sink
    assert "textContent" in code and "createTextNode" in code


def test_the_page_has_no_inline_script_or_style_and_nothing_from_elsewhere() -> None:
    page = _static("console.html")
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/console.js" defer>']
    assert "<style" not in page and " style=" not in page
    assert not re.search(r"\son[a-z]+=", page, re.IGNORECASE)  # no inline event handler
    for text in (page, _static("console.css"), _static("console.js")):
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), "an outside URL"
        assert "@import" not in text
    for name in re.findall(r'(?:src|href)="/static/([^"]+)"', page):
        assert STATIC.joinpath(name).is_file(), name
