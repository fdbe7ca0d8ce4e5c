"""The web console's server against the real etcd of the fixtures: the JSON API, the event
stream (snapshot, changes, resuming with Last-Event-ID), writes and their guards, the security
headers, and ``dtask ui`` / ``dtask demo --ui`` as processes. The pages themselves are driven in
a real browser by tests/browser/."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry
from tests.console_support import SseReader, console, is_task
from tests.support import DtaskProcess, FakeClock, RecordingProvider, Schedulers

import distributedtask as dt
from distributedtask.cli import main as dt_cli
from distributedtask.testing import wait_until

NS = "ns"
HOSTILE = "<script>window.__pwned=1</script>\"'\u202eevil&amp;"


def api(url: str, path: str, **params: str) -> Any:
    response = requests.get(url + path, params=params, timeout=5)
    assert response.headers["content-type"] == "application/json", response.headers
    return response.status_code, response.json()


def listed(url: str, **params: str) -> dict[str, Any]:
    status, body = api(url, "api/tasks", **params)
    assert status == 200, body
    return body  # type: ignore[no-any-return]


@pytest.fixture
def schedulers(manager: dt.Manager) -> Iterator[Schedulers]:
    with Schedulers(manager, CollectorRegistry()) as made:
        yield made


def test_the_api_shows_tasks_one_task_and_members(
    manager: dt.Manager, schedulers: Schedulers
) -> None:
    schedulers.new("node-1", {NS: RecordingProvider(), "other": RecordingProvider()})
    first = manager.add_task(NS, "first", b"12345", nodes=["node-1", "node-2"])
    manager.add_task("other", "second", nodes=["node-1"])
    gone = manager.add_task(NS, "cancelled", nodes=["node-1"])
    manager.cancel_task(NS, "cancelled", gone.version)
    manager.record_progress(NS, "first", first.version, "node-1", 0.5, "half way")
    with console(manager) as server:
        url = server.url
        body = listed(url)
        assert [(t["namespace"], t["ID"], t["status"]) for t in body["tasks"]] == [
            (NS, "cancelled", "CANCELLED"),
            (NS, "first", "STARTED"),
            ("other", "second", "STARTED"),
        ]
        assert body["namespaces"] == [NS, "other"]
        assert body["counts"] == {
            "STARTED": 2,
            "PAUSED": 0,
            "FINISHED": 0,
            "FAILED": 0,
            "CANCELLED": 1,
        }
        summary = next(t for t in body["tasks"] if t["ID"] == "first")
        assert summary["version"] == first.version
        assert (summary["nodeCount"], summary["finishedCount"]) == (2, 0)
        assert summary["progress"] == 0.25 and summary["payloadBytes"] == 5
        assert "payload" not in summary

        # filters and orders
        assert [t["ID"] for t in listed(url, namespace=NS)["tasks"]] == ["cancelled", "first"]
        assert listed(url, namespace=NS)["counts"]["STARTED"] == 1
        assert [t["ID"] for t in listed(url, status="STARTED")["tasks"]] == ["first", "second"]
        assert [t["ID"] for t in listed(url, sort="-name")["tasks"]] == [
            "second",
            "first",
            "cancelled",
        ]
        assert listed(url, sort="version")["tasks"][0]["ID"] == "cancelled"
        for bad in ({"status": "RUNNING"}, {"sort": "size"}):
            status, error = api(url, "api/tasks", **bad)
            assert status == 400 and "unknown" in error["error"]

        # one task, with each node's row
        status, task = api(url, "api/task", namespace=NS, id="first")
        assert status == 200
        assert task["nodeStates"] == [
            {
                "node": "node-1",
                "state": "running",
                "fraction": 0.5,
                "message": "half way",
                "updatedAt": task["nodeStates"][0]["updatedAt"],
                "attempts": 0,
                "lastError": None,
            },
            {
                "node": "node-2",
                "state": "running",
                "fraction": 0.0,
                "message": "",
                "updatedAt": None,
                "attempts": 0,
                "lastError": None,
            },
        ]
        assert task["finishedNodes"] == {}
        assert api(url, "api/task", namespace=NS, id="nope")[0] == 404
        assert api(url, "api/task", namespace=NS)[0] == 400

        # members: namespaces, start time, the lease of their key
        status, members = api(url, "api/members")
        (member,) = members["members"]
        assert member["node"] == "node-1" and member["namespaces"] == [NS, "other"]
        assert re.fullmatch(r"[0-9a-f]+", member["lease"])

        status, state = api(url, "api/status")
        assert state["etcd"] == "live" and state["prefix"] == manager.prefix
        assert state["writes"] is False and state["unreadable"] == 0


def test_events_a_snapshot_then_each_change_and_a_resume_without_reload(
    manager: dt.Manager,
) -> None:
    task = manager.add_task(NS, "job", nodes=["a", "b"])
    with console(manager) as server:
        topic = {"namespace": NS, "id": "job"}
        with SseReader(server.url, topic) as page:
            (snapshot,) = page.until(lambda e: e.kind == "snapshot")
            assert snapshot.data["task"]["status"] == "STARTED"
            assert [row["node"] for row in snapshot.data["task"]["nodeStates"]] == ["a", "b"]
            assert snapshot.data["status"]["etcd"] == "live"

            manager.record_progress(NS, "job", task.version, "a", 0.4, "chunk 2/5")
            events = page.until(lambda e: e.kind == "nodes")
            assert events[0].kind == "task" and events[0].data["task"]["progress"] == 0.2
            (row,) = events[-1].data["nodes"]
            assert (row["node"], row["state"], row["fraction"]) == ("a", "running", 0.4)

            manager.record_node_completion(NS, "job", task.version, "b")
            seen = page.until(lambda e: e.kind == "transition")
            assert seen[-1].data["what"] == "completed on b"
            assert seen[-1].data["line"] == f"{NS}/job completed on b"
            last = page.last_id

        # While the page is away, the run is paused: back with its last id, it gets only that.
        manager.pause_task(NS, "job", task.version)
        wait_until(lambda: listed(server.url)["counts"]["PAUSED"] == 1, timeout=10)
        with SseReader(server.url, topic, {"Last-Event-ID": last}) as page:
            missed = page.until(lambda e: e.kind == "transition")
            assert missed[0].kind != "snapshot"
            assert is_task("PAUSED")(missed[0])
            assert missed[-1].data["what"] == "PAUSED"

        # An id of another process (or junk) gets a snapshot.
        for stale in ("0123456789ab-3", "junk"):
            with SseReader(server.url, topic, {"Last-Event-ID": stale}) as page:
                first = page.until(lambda e: True)[0]
                assert first.kind == "snapshot" and first.data["task"]["status"] == "PAUSED"


def test_a_page_of_the_tasks_gets_no_node_rows_and_a_new_task_at_once(
    manager: dt.Manager,
) -> None:
    with console(manager) as server, SseReader(server.url) as page:
        (snapshot,) = page.until(lambda e: e.kind == "snapshot")
        assert snapshot.data["tasks"] == [] and snapshot.data["task"] is None
        task = manager.add_task(NS, "new", nodes=["a"])
        manager.record_progress(NS, "new", task.version, "a", 0.5)
        manager.cancel_task(NS, "new", task.version)
        seen = page.until(is_task("CANCELLED"))
        assert "nodes" not in {e.kind for e in seen}  # those go to the pages of that run only
        assert [e.data["task"]["progress"] for e in seen if e.kind == "task"] == [0.0, 0.5, 0.5]


def test_removal_and_replacement_of_a_run_reach_its_page(
    manager: dt.Manager, clock: FakeClock
) -> None:
    short = dt.Manager(manager.client, prefix=manager.prefix, clock=clock)
    task = short.add_task(NS, "job", nodes=["a"])
    with console(manager) as server, SseReader(server.url, {"namespace": NS, "id": "job"}) as page:
        page.until(lambda e: e.kind == "snapshot")
        short.cancel_task(NS, "job", task.version)
        clock.advance(timedelta(seconds=1))
        short.clean_up_task(NS, "job", task.version, ttl=timedelta(0))
        removed = page.until(lambda e: e.kind == "removed")[-1]
        assert removed.data == {"namespace": NS, "ID": "job", "version": task.version}
        again = short.add_task(NS, "job", nodes=["b", "c"])
        seen = page.until(lambda e: e.kind == "nodes")
        assert seen[-1].data["reset"] is True and seen[-1].data["version"] == again.version
        assert [row["node"] for row in seen[-1].data["nodes"]] == ["b", "c"]
        assert api(server.url, "api/task", namespace=NS, id="job")[1]["version"] == again.version


def test_hostile_names_come_back_exactly(manager: dt.Manager) -> None:
    long_id = "é" * 128  # 256 UTF-8 bytes: the longest name there is
    manager.add_task(HOSTILE, HOSTILE, nodes=[HOSTILE])
    manager.add_task(NS, long_id, nodes=["a"])
    with console(manager) as server:
        body = wait_until(lambda: len(listed(server.url)["tasks"]) == 2 and listed(server.url))
        assert {(t["namespace"], t["ID"]) for t in body["tasks"]} == {
            (HOSTILE, HOSTILE),
            (NS, long_id),
        }
        status, task = api(server.url, "api/task", namespace=HOSTILE, id=HOSTILE)
        assert status == 200 and task["nodeStates"][0]["node"] == HOSTILE


# ---- units ------------------------------------------------------------------------------------


def test_the_units_of_a_unit_task_by_group(manager: dt.Manager) -> None:
    """A unit task is listed like any task (its declaration counted, not listed), and
    ``/api/units`` has its units by group: counts, and each unit's row."""
    policy = dt.RunPolicy(max_attempts=2, retry_backoff=timedelta(0))
    units = [dt.UnitSpec("s1", group="coll-a"), dt.UnitSpec("s2", group="coll-a"), "s3"]
    task = manager.add_task(NS, "reindex", nodes=["a", "b"], policy=policy, units=units)
    v = task.version
    plain = manager.add_task(NS, "plain", nodes=["a"])
    first = manager.claim_unit(NS, "reindex", v, "a")
    second = manager.claim_unit(NS, "reindex", v, "b")
    assert first is not None and second is not None and (first.id, second.id) == ("s1", "s2")
    manager.record_unit_completion(NS, "reindex", v, "s1", "a")
    manager.record_unit_progress(NS, "reindex", v, "s2", "b", 0.25, "a quarter")
    with console(manager) as server:
        url = server.url
        summary = next(t for t in listed(url)["tasks"] if t["ID"] == "reindex")
        assert (summary["status"], summary["unitCount"]) == ("STARTED", 3)
        assert "units" not in summary  # the declaration may be 10,000 units long
        status, full = api(url, "api/task", namespace=NS, id="reindex")
        assert status == 200 and full["unitCount"] == 3 and "units" not in full

        status, body = api(url, "api/units", namespace=NS, id="reindex")
        assert status == 200
        assert (body["namespace"], body["ID"], body["version"], body["total"]) == (
            NS,
            "reindex",
            v,
            3,
        )
        assert body["counts"] == {"COMPLETED": 1, "IN_PROGRESS": 1, "PENDING": 1, "FAILED": 0}
        assert (body["completedByNode"], body["inProgressByNode"]) == ({"a": 1}, {"b": 1})
        coll, none = body["groups"]
        assert (coll["group"], coll["label"], coll["total"]) == ("coll-a", "coll-a", 2)
        assert coll["counts"] == {"COMPLETED": 1, "IN_PROGRESS": 1, "PENDING": 0, "FAILED": 0}
        assert (none["group"], none["label"], none["total"]) == ("", "(no group)", 1)
        s1, s2 = coll["units"]
        assert {k: s1[k] for k in ("id", "group", "node", "status", "attempts", "error")} == {
            "id": "s1",
            "group": "coll-a",
            "node": "a",
            "status": "COMPLETED",
            "attempts": 0,
            "error": None,
        }
        assert (s2["status"], s2["node"]) == ("IN_PROGRESS", "b")
        assert (s2["progress"]["fraction"], s2["progress"]["message"]) == (0.25, "a quarter")
        (s3,) = none["units"]
        assert (s3["id"], s3["status"], s3["node"], s3["progress"]) == ("s3", "PENDING", None, None)

        # a failed attempt: back to PENDING with its error, counted
        manager.record_unit_failure(NS, "reindex", v, "s2", "b", "disk full")
        status, body = api(url, "api/units", namespace=NS, id="reindex")
        retried = body["groups"][0]["units"][1]
        assert (retried["status"], retried["attempts"], retried["error"]) == (
            "PENDING",
            1,
            "disk full",
        )

        # what is not a unit task, or not a task
        status, error = api(url, "api/units", namespace=NS, id="plain")
        assert status == 404 and "no units" in error["error"]
        assert api(url, "api/units", namespace=NS, id="nope")[0] == 404
        assert api(url, "api/units", namespace=NS)[0] == 400
        assert api(url, "api/units")[0] == 400
    assert plain.units == ()


def test_unit_changes_reach_the_pages_of_their_run_only(manager: dt.Manager) -> None:
    """A unit's claim, progress or outcome becomes a ``units`` event for the pages of its run;
    while no such page is open, none is made."""
    task = manager.add_task(NS, "job", nodes=["a"], units=["u1", "u2"])
    v = task.version
    with console(manager) as server, SseReader(server.url) as tasks_page:
        tasks_page.until(lambda e: e.kind == "snapshot")
        # no page of "job" is open: a unit change makes no event
        head = server.state.log.head
        manager.claim_unit(NS, "job", v, "a")
        manager.add_task(NS, "marker", nodes=["a"])
        tasks_page.until(lambda e: e.kind == "task" and e.data["task"]["ID"] == "marker")
        kinds = [e.kind for e in server.state.log.since(head) or []]
        assert "task" in kinds and "units" not in kinds
        assert server.state.open_pages(NS, "job") == 0

        with SseReader(server.url, {"namespace": NS, "id": "job"}) as page:
            (snapshot,) = page.until(lambda e: e.kind == "snapshot")
            assert snapshot.data["task"]["unitCount"] == 2
            assert server.state.open_pages(NS, "job") == 1
            manager.record_unit_progress(NS, "job", v, "u1", "a", 0.5, "half")
            (event,) = page.until(lambda e: e.kind == "units")
            assert event.data["namespace"] == NS and event.data["ID"] == "job"
            assert event.data["revision"] > 0
            manager.record_unit_completion(NS, "job", v, "u1", "a")
            page.until(lambda e: e.kind == "units")
            second = manager.claim_unit(NS, "job", v, "a")
            assert second is not None
            manager.record_unit_completion(NS, "job", v, second.id, "a")
            seen = page.until(is_task("FINISHED"))
            assert "units" in {e.kind for e in seen}
        wait_until(lambda: server.state.open_pages(NS, "job") == 0)
        tasks_page.until(is_task("FINISHED", "job"))  # the tasks page got no units event


# ---- writes and guards ------------------------------------------------------------------------


def post(
    url: str, action: str, body: object, *, token: str | None, origin: str | None = "same"
) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-CSRF-Token"] = token
    if origin == "same":
        headers["Origin"] = url.rstrip("/")
    elif origin is not None:
        headers["Origin"] = origin
    return requests.post(f"{url}api/task/{action}", json=body, headers=headers, timeout=10)


def csrf_token(url: str) -> str:
    page = requests.get(url, timeout=5).text
    match = re.search(r'<meta name="dtask-csrf" content="([^"]*)">', page)
    assert match is not None, page
    return match.group(1)


def test_a_read_only_console_refuses_every_write(manager: dt.Manager) -> None:
    task = manager.add_task(NS, "job", nodes=["a"])
    body = {"namespace": NS, "id": "job", "version": task.version}
    with console(manager) as server:
        assert csrf_token(server.url) == ""  # no token is handed out at all
        for action in ("cancel", "pause", "resume"):
            response = post(server.url, action, body, token="anything")
            assert response.status_code == 403, response.text
            assert "read-only" in response.json()["error"]
        assert requests.post(server.url + "api/tasks", timeout=5).status_code == 403
    assert manager.get_task(NS, "job") == task


def test_writes_need_the_token_the_same_origin_and_json(manager: dt.Manager) -> None:
    task = manager.add_task(NS, "job", nodes=["a"])
    body = {"namespace": NS, "id": "job", "version": task.version}
    with console(manager, allow_writes=True) as server:
        url = server.url
        token = csrf_token(url)
        assert len(token) >= 32
        refused = {
            "no token": post(url, "cancel", body, token=None),
            "wrong token": post(url, "cancel", body, token=token[:-1] + "x"),
            "no origin": post(url, "cancel", body, token=token, origin=None),
            "other origin": post(url, "cancel", body, token=token, origin="http://evil.example"),
        }
        for why, response in refused.items():
            assert response.status_code == 403, (why, response.text)
        as_form = requests.post(
            url + "api/task/cancel",
            data=body,
            headers={"X-CSRF-Token": token, "Origin": url.rstrip("/")},
            timeout=5,
        )
        assert as_form.status_code == 415
        assert manager.get_task(NS, "job") == task  # nothing was written

        bad = post(url, "pause", {**body, "version": "1"}, token=token)
        assert bad.status_code == 400
        other_run = {**body, "version": task.version + 1}
        assert post(url, "pause", other_run, token=token).status_code == 404
        paused = post(url, "pause", body, token=token)
        assert paused.status_code == 200 and paused.json()["status"] == "PAUSED"
        resumed = post(url, "resume", body, token=token)
        assert resumed.json()["status"] == "STARTED"
        cancelled = post(url, "cancel", body, token=token)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
        again = post(url, "cancel", body, token=token)
        assert again.status_code == 409, again.text
        wait_until(lambda: listed(url)["counts"]["CANCELLED"] == 1, timeout=10)
    ended = manager.get_task(NS, "job")
    assert ended is not None and ended.status is dt.TaskStatus.CANCELLED


def test_host_header_content_types_and_security_headers(manager: dt.Manager) -> None:
    with console(manager) as server:
        url = server.url
        port = server.port
        for host in (f"evil.example:{port}", "127.0.0.1", f"127.0.0.1.evil.example:{port}"):
            response = requests.get(url + "api/tasks", headers={"Host": host}, timeout=5)
            assert response.status_code == 400, host
        assert requests.get(url, headers={"Host": f"localhost:{port}"}, timeout=5).ok
        page = requests.get(url + "task", params={"namespace": NS, "id": "x"}, timeout=5)
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        script = requests.get(url + "static/console.js", timeout=5)
        assert script.headers["content-type"] == "text/javascript; charset=utf-8"
        assert "content-security-policy" in script.headers
        assert requests.get(url + "static/console.html", timeout=5).status_code == 404
        assert requests.get(url + "static/../cli.py", timeout=5).status_code == 404
        missing = requests.get(url + "api/nothing", timeout=5)
        assert missing.status_code == 404 and missing.json() == {"error": "no such API route"}
        # no page loads anything from elsewhere
        assert not re.search(r"(src|href)=\"(https?:)?//", page.text)


# ---- dtask ui and dtask demo --ui -------------------------------------------------------------


def _url_of(process: DtaskProcess, pattern: str) -> str:
    def found() -> str | None:
        for line in process.out:
            match = re.search(pattern, line)
            if match:
                return match.group(1)
        assert process.proc.poll() is None, (process.out, process.err)
        return None

    url = wait_until(found, timeout=30, message="the console's URL")
    assert url is not None
    return url


def test_dtask_ui_serves_until_sigterm(
    etcd_endpoint: str, dtask_prefix: str, manager: dt.Manager
) -> None:
    manager.add_task(NS, "job", nodes=["a"])
    conn = ["--endpoints", etcd_endpoint, "--prefix", dtask_prefix]
    process = DtaskProcess([*conn, "ui", "--port", "0"])
    try:
        url = _url_of(process, r" at (http://127\.0\.0\.1:\d+/) \(read-only\)")
        assert [t["ID"] for t in listed(url)["tasks"]] == ["job"]
        process.proc.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, process.err
        assert process.err == []
    finally:
        process.kill()

    # a port in use is one error line and exit 3
    with console(manager) as server:
        busy = subprocess.run(
            [sys.executable, "-m", "distributedtask", *conn, "ui", "--port", str(server.port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert busy.returncode == 3, busy.stderr
    assert busy.stderr.startswith("dtask: error: ") and len(busy.stderr.splitlines()) == 1
    with pytest.raises(SystemExit) as usage:
        dt_cli(["ui", "--port", "65536"])
    assert usage.value.code == 64


def test_dtask_demo_ui_leaves_the_console_open_until_ctrl_c() -> None:
    process = DtaskProcess(["demo", "--ui", "--ui-port", "0"])
    try:
        url = _url_of(process, r"web console: (http://127\.0\.0\.1:\d+/)")
        with SseReader(url) as viewer:  # a page opens: the demo starts at once
            viewer.until(lambda e: e.kind == "snapshot")
            wait_until(
                lambda: any("stays open" in line for line in process.out),
                timeout=90,
                message="the demo's end",
            )
        ended = {t["ID"]: t["status"] for t in listed(url)["tasks"]}
        assert ended == {
            "checksum": "FINISHED",
            "rebuild": "FINISHED",  # a unit task
            "verify": "FINISHED",
            "backup": "FINISHED",
            "migrate": "FAILED",
            "reindex": "CANCELLED",
        }
        assert api(url, "api/members")[1] == {"members": []}  # the nodes left
        process.proc.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, (process.out, process.err)
        assert "Everything stopped and removed" in process.out[-1]
    finally:
        process.kill()
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=2)


def test_no_console_thread_is_left(manager: dt.Manager) -> None:
    with console(manager) as server, SseReader(server.url) as page:
        page.until(lambda e: e.kind == "snapshot")
    names = [t.name for t in threading.enumerate() if t.name.startswith("dtask-console")]
    assert names == []
