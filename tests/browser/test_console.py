"""The web console in a real browser: Playwright driving Debian's Chromium (``/usr/bin/chromium``,
or ``$DTASK_CHROMIUM``) against a console of the real etcd of the fixtures.

Skipped, saying why, when Playwright, Chromium or the ``ui`` extra is missing; with
``DTASK_REQUIRE_BROWSER=1`` (set by ``.ci/run``) a missing piece is an error instead, so CI never
skips them. Every wait is Playwright's ``expect`` (it retries until its timeout), never a sleep.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

import distributedtask as dt
from distributedtask.testing import wait_until

CHROMIUM = os.environ.get("DTASK_CHROMIUM", "/usr/bin/chromium")
REQUIRE = "DTASK_REQUIRE_BROWSER"
# Chromium's own background connections would be refused by a closed network, and slow it down.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing() -> str | None:
    for module, what in (
        ("playwright", "the Python package playwright (in the dev extra)"),
        ("starlette", "the ui extra (starlette)"),
        ("uvicorn", "the ui extra (uvicorn)"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
    return None


MISSING = _missing()
if MISSING and os.environ.get(REQUIRE) == "1":
    pytest.fail(f"browser tests are required here ({REQUIRE}=1) but {MISSING}", pytrace=False)
if MISSING:
    pytest.skip(f"browser tests skipped: {MISSING}", allow_module_level=True)

from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from tests.console_support import console  # noqa: E402
from tests.support import RecordingProvider, Schedulers  # noqa: E402

from distributedtask.testing.etcd import EtcdServer  # noqa: E402

NS = "ns"
HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">\'\u202eevil'
SECOND = 1000  # Playwright counts milliseconds


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page; the test fails if a script error or a CSP violation happened on it."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(f"console {message.type}: {message.text}")
            if message.type == "error"
            else None
        ),
    )
    yield page
    context.close()
    # Left out: an HTTP error status (a refused write says why on the page) and a stream cut
    # when its console stops (the browser logs it, and reconnects). A CSP violation or a script
    # error is still a failure.
    problems = [
        p
        for p in problems
        if "Failed to load resource" not in p and "ERR_" not in p and "EventSource" not in p
    ]
    assert problems == []


def mark_page(page: Page) -> None:
    """Put a marker in the page's window: it survives anything but a reload."""
    page.evaluate("window.__notReloaded = true")


def not_reloaded(page: Page) -> bool:
    return bool(page.evaluate("window.__notReloaded === true"))


def task_row(page: Page, task_id: str):  # type: ignore[no-untyped-def]
    return page.locator("#tasks tbody tr").filter(has=page.locator(f'[data-name="{task_id}"]'))


def test_a_new_task_appears_within_a_second_and_its_bar_moves(
    page: Page, manager: dt.Manager
) -> None:
    with console(manager) as server:
        page.goto(server.url)
        expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        expect(page.locator("#table-note")).to_contain_text("No tasks")
        mark_page(page)

        task = manager.add_task(NS, "reindex", nodes=["node-a", "node-b"])
        row = task_row(page, "reindex")
        expect(row).to_have_count(1, timeout=SECOND)
        bar = row.get_by_role("progressbar")
        expect(bar).to_have_attribute("aria-valuenow", "0")
        expect(row.locator(".status")).to_have_text("STARTED")

        manager.record_progress(NS, "reindex", task.version, "node-a", 0.5, "half")
        expect(bar).to_have_attribute("aria-valuenow", "25", timeout=SECOND)
        manager.record_progress(NS, "reindex", task.version, "node-b", 1.0, "all")
        expect(bar).to_have_attribute("aria-valuenow", "75", timeout=SECOND)
        expect(page.locator(".chip[data-status=STARTED] .count")).to_have_text("1")

        # filters by status, kept in the URL
        page.locator(".chip[data-status=FINISHED]").click()
        expect(page.locator("#table-note")).to_have_text("No task matches these filters.")
        assert page.url.endswith("/?status=FINISHED")
        page.locator(".chip[data-status=ALL]").click()
        expect(row).to_have_count(1)

        # its own page: one bar per node, moving too
        row.get_by_role("link").click()
        expect(page.locator("#nodes tbody tr")).to_have_count(2)
        node_a = page.get_by_role("progressbar", name="progress of node-a")
        expect(node_a).to_have_attribute("aria-valuenow", "50")
        mark_page(page)
        manager.record_progress(NS, "reindex", task.version, "node-a", 0.9, "nearly")
        expect(node_a).to_have_attribute("aria-valuenow", "90", timeout=SECOND)
        expect(page.locator("#nodes tbody tr").first).to_contain_text("nearly")
        manager.record_node_completion(NS, "reindex", task.version, "node-a")
        expect(page.locator("#timeline")).to_contain_text("completed on node-a")
        assert not_reloaded(page)


def test_a_cancel_from_the_page_asks_first_then_cancels(page: Page, manager: dt.Manager) -> None:
    task = manager.add_task(NS, "migrate", nodes=["node-a"])
    with console(manager, allow_writes=True) as server:
        page.goto(f"{server.url}task?namespace={NS}&id=migrate")
        title = page.locator("h1 .status")
        expect(title).to_have_text("STARTED")
        expect(page.locator("#mode")).to_have_text("writes enabled")

        # The confirmation says what will happen; "Keep it" writes nothing.
        page.locator("[data-action=cancel]").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("Cancel this task?")
        expect(dialog).to_contain_text(f"version {task.version}")
        dialog.get_by_role("button", name="Keep it").click()
        expect(dialog).to_have_count(0)
        current = manager.get_task(NS, "migrate")
        assert current is not None and current.status is dt.TaskStatus.STARTED

        page.locator("[data-action=cancel]").click()
        page.get_by_role("dialog").locator("[data-confirm=cancel]").click()
        expect(title).to_have_text("CANCELLED")
        expect(page.locator("#message")).to_contain_text("now CANCELLED")
        expect(page.locator("#timeline")).to_contain_text("CANCELLED")
        expect(page.locator("[data-action]")).to_have_count(0)  # nothing left to do to it
        ended = manager.get_task(NS, "migrate")
        assert ended is not None and ended.status is dt.TaskStatus.CANCELLED


def test_a_read_only_console_has_no_write_control_and_refuses_a_forged_post(
    page: Page, manager: dt.Manager
) -> None:
    task = manager.add_task(NS, "backup", nodes=["node-a"])
    with console(manager) as server:
        page.goto(f"{server.url}task?namespace={NS}&id=backup")
        expect(page.locator("h1 .status")).to_have_text("STARTED")
        expect(page.locator("#mode")).to_have_text("read-only")
        expect(page.locator("#nodes tbody tr")).to_have_count(1)
        assert page.locator("[data-action]").count() == 0
        assert page.get_by_role("button", name=re.compile("Cancel|Pause|Resume")).count() == 0
        forged = page.evaluate(
            """async (version) => {
                const response = await fetch("/api/task/cancel", {
                    method: "POST",
                    headers: {"Content-Type": "application/json", "X-CSRF-Token": "guess"},
                    body: JSON.stringify({namespace: "ns", id: "backup", version}),
                });
                return [response.status, (await response.json()).error];
            }""",
            task.version,
        )
        assert forged[0] == 403 and "read-only" in forged[1]
    assert manager.get_task(NS, "backup") == task


def test_a_hostile_task_id_is_shown_literally_and_runs_no_script(
    page: Page, manager: dt.Manager
) -> None:
    long_id = "\u05d0" * 128  # 256 UTF-8 bytes of Hebrew: the longest name, right to left
    manager.add_task(HOSTILE, HOSTILE, nodes=[HOSTILE])
    manager.add_task(NS, long_id, nodes=["node-a"])
    with console(manager) as server:
        page.goto(server.url)
        expect(page.locator("#tasks tbody tr")).to_have_count(2)
        link = page.locator("#tasks a bdi.name")
        names = link.evaluate_all("nodes => nodes.map(node => node.dataset.name)")
        assert sorted(names) == sorted([HOSTILE, long_id])
        # the text is the name itself, the bidi override shown as its code point
        shown = HOSTILE.replace("\u202e", "U+202E")
        expect(page.locator("#tasks").get_by_text(shown, exact=True)).to_have_count(2)
        expect(page.locator("#tasks").get_by_text(long_id, exact=True)).to_have_count(1)

        task_link = page.locator("#tasks a").filter(has=page.locator(".ctl"))
        task_link.click()
        expect(page.locator("h1 .status")).to_have_text("STARTED")
        expect(page.locator("#nodes tbody tr")).to_contain_text(shown)
        assert "U+202E" in page.title() and "\u202e" not in page.title()
        assert page.evaluate("window.__pwned") is None
        assert page.evaluate("document.scripts.length") == 1  # ours, and nothing else
        assert page.locator("img[src=x]").count() == 0


def test_the_page_recovers_by_itself_after_an_etcd_restart(
    page: Page, etcd_private: EtcdServer
) -> None:
    with dt.EtcdClient(etcd_private.endpoint, timeout=2.0, watch_timeout=6.0) as client:
        manager = dt.Manager(client, prefix="/console-restart")
        manager.add_task(NS, "before", nodes=["node-a"])
        with console(manager) as server:
            page.goto(server.url)
            conn = page.locator("#conn")
            expect(conn).to_have_attribute("data-state", "live")
            expect(task_row(page, "before")).to_have_count(1)
            mark_page(page)

            etcd_private.kill()
            expect(conn).to_have_attribute("data-state", "etcd-down", timeout=10 * SECOND)
            expect(conn).to_have_text("etcd unreachable, reconnecting…")
            etcd_private.restart()
            expect(conn).to_have_attribute("data-state", "live", timeout=20 * SECOND)

            wait_until(lambda: manager.add_task(NS, "after", nodes=["node-a"]), timeout=20,
                       ignore=(dt.EtcdError,))  # fmt: skip
            expect(task_row(page, "after")).to_have_count(1, timeout=5 * SECOND)
            expect(task_row(page, "before")).to_have_count(1)
            assert not_reloaded(page)


def test_members_come_and_go_on_their_page(page: Page, manager: dt.Manager) -> None:
    with Schedulers(manager, CollectorRegistry()) as schedulers, console(manager) as server:
        page.goto(f"{server.url}members")
        rows = page.locator("#members tbody tr")
        expect(rows).to_have_count(0)
        node = schedulers.new("node-a", {NS: RecordingProvider(), "other": RecordingProvider()})
        expect(rows).to_have_count(1, timeout=SECOND)
        expect(rows.first).to_contain_text("node-a")
        expect(rows.first).to_contain_text(f"{NS}, other")
        expect(rows.first.locator(".mono")).to_have_text(re.compile(r"^[0-9a-f]+$"))
        node.stop()  # it revokes its lease: its key goes at once
        expect(rows).to_have_count(0, timeout=5 * SECOND)


def test_a_unit_task_page_shows_its_groups_and_counts_as_units_complete(
    page: Page, manager: dt.Manager
) -> None:
    units = [dt.UnitSpec(f"a{i}", group="articles") for i in range(3)]
    units += [dt.UnitSpec("c0", group="comments"), dt.UnitSpec("loose")]
    policy = dt.RunPolicy(max_attempts=2, retry_backoff=timedelta(0))
    task = manager.add_task(NS, "rebuild", nodes=["node-a", "node-b"], policy=policy, units=units)
    v = task.version

    def counts(group: str):  # type: ignore[no-untyped-def]
        return page.locator(f'.unit-group[data-group="{group}"] .ucount')

    def count(group: str, status: str):  # type: ignore[no-untyped-def]
        return page.locator(f'.unit-group[data-group="{group}"] .ucount[data-status={status}] .n')

    with console(manager) as server:
        page.goto(f"{server.url}task?namespace={NS}&id=rebuild")
        expect(page.locator("h1 .status")).to_have_text("STARTED")
        groups = page.locator("#unit-groups .unit-group")
        expect(groups).to_have_count(3)
        assert groups.evaluate_all("nodes => nodes.map(node => node.dataset.group)") == [
            "articles",
            "comments",
            "",
        ]
        expect(groups.nth(2).locator(".group-name")).to_have_text("(no group)")
        expect(counts("articles")).to_have_text(
            ["0 completed", "0 in progress", "3 pending", "0 failed"]
        )
        expect(page.locator("#unit-totals")).to_contain_text("5 units in 3 groups")
        mark_page(page)

        # units claimed, progressing, completed and failed through the Manager: the page follows
        first = manager.claim_unit(NS, "rebuild", v, "node-a")
        second = manager.claim_unit(NS, "rebuild", v, "node-b")
        assert first is not None and second is not None and (first.id, second.id) == ("a0", "a1")
        expect(count("articles", "IN_PROGRESS")).to_have_text("2")
        manager.record_unit_completion(NS, "rebuild", v, "a0", "node-a")
        expect(count("articles", "COMPLETED")).to_have_text("1")
        expect(count("articles", "IN_PROGRESS")).to_have_text("1")
        bar = page.get_by_role("progressbar", name="completed units of articles")
        expect(bar).to_have_attribute("aria-valuenow", "33")

        # the list of a group's units, kept open while it changes
        page.locator('.unit-group[data-group="articles"] summary').click()
        rows = page.locator('.unit-group[data-group="articles"] tbody tr')
        expect(rows).to_have_count(3)
        expect(rows.nth(0)).to_contain_text("completed")
        expect(rows.nth(0)).to_contain_text("node-a")
        manager.record_unit_progress(NS, "rebuild", v, "a1", "node-b", 0.4, "copying")
        expect(rows.nth(1).get_by_role("progressbar")).to_have_attribute("aria-valuenow", "40")
        expect(rows.nth(1)).to_contain_text("copying")
        manager.record_unit_failure(NS, "rebuild", v, "a1", "node-b", "disk full")
        expect(rows.nth(1)).to_contain_text("pending")
        expect(rows.nth(1)).to_contain_text("disk full")
        expect(rows.nth(1).locator("td.num")).to_have_text("1")  # one failed attempt
        expect(counts("articles")).to_have_text(
            ["1 completed", "0 in progress", "2 pending", "0 failed"]
        )
        facts = page.locator(".facts")
        expect(facts).to_contain_text("1 failed on 1 unit")
        expect(facts).to_contain_text("2 attempts per unit")
        expect(page.locator("#nodes td.units-cell")).to_have_text(["1 completed", "0 completed"])

        # every unit completed: the task is FINISHED, every group full
        done = manager.get_task(NS, "rebuild")
        for node in ("node-b", "node-a"):  # node-a's completion took the ticket of a2 ahead
            while done is not None and done.status is dt.TaskStatus.STARTED:
                unit = manager.claim_unit(NS, "rebuild", v, node)
                if unit is None:
                    break
                done = manager.record_unit_completion(NS, "rebuild", v, unit.id, node)
        assert done is not None and done.status is dt.TaskStatus.FINISHED
        expect(page.locator("h1 .status")).to_have_text("FINISHED")
        for group in ("articles", "comments", ""):
            expect(count(group, "COMPLETED")).to_have_text("3" if group == "articles" else "1")
        expect(rows).to_have_count(3)  # still open
        expect(rows.nth(1)).to_contain_text("completed")
        expect(page.locator("#unit-totals")).to_contain_text("5 completed")
        assert not_reloaded(page)
