"""Case 1, propagation latency: from ``add_task`` to ``start_task`` being called on each of 3
Schedulers, and from ``cancel_task`` to ``terminate()``.

Every node is a process of its own (:mod:`benchmarks.node`), as in a cluster; times are
``perf_counter`` (CLOCK_MONOTONIC) in every process. Baseline, interleaved with the measurement
(one raw round before each of ours): a raw etcd3gw put, then the time until 3 raw streaming
watches (:class:`~benchmarks.baselines.RawWatcher`, one process each) see its event.

The clock starts when the write is *issued*: measured from the write's *return*, the raw
baseline is negative (etcd's watch event reaches a watcher before the put's response has been
read), so no ratio can be formed from it. The from-return figures are reported too.

Also a polling scheduler in Weaviate's style (list every tick) with a 1 s tick, for the shape.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import Any

from benchmarks.baselines import StampBook
from benchmarks.common import (
    NS,
    CaseResult,
    Env,
    RecordingClient,
    Row,
    ms,
    percentile,
    raw_gateway,
    rewrite_body,
    say,
)
from benchmarks.node import NodeProcess
from distributedtask import Manager

KEY = "propagation"
TITLE = "Propagation latency"
GOAL = "p50 within 1.5x of the raw put -> watch event baseline"
NODES = ("node-a", "node-b", "node-c")
FACTOR = 1.5
SETTLE = 0.003  # let the previous round's threads go quiet before the next write
TIMEOUT = 10.0


def _settle() -> None:
    time.sleep(SETTLE)


def _start(nodes: list[NodeProcess]) -> list[NodeProcess]:
    for node in nodes:
        node.wait_ready()
    return nodes


def run(env: Env) -> CaseResult:
    count = env.size(200, 30)
    warmup = env.size(10, 5)
    samples: dict[str, list[float]] = defaultdict(list)
    cpu_ms: dict[str, list[float]] = defaultdict(list)
    prefix = env.prefix("prop")
    raw_root = prefix.replace("/bench/prop-", "/bench/prow-")  # same length: same-size replay
    raw_prefix = raw_root + "/"
    poll_prefix = env.prefix("poll")
    gw = raw_gateway(env.endpoint)
    admin = RecordingClient(env.endpoint, timeout=10.0)
    book = StampBook()
    nodes: list[NodeProcess] = []
    revisions: dict[int, int] = {}
    try:
        manager = Manager(admin, prefix=prefix)
        # The replay's prefix holds the layout marker, as ours does once a Scheduler started
        # on it: the add compares it, so the replay takes the branch ours took.
        Manager(admin, prefix=raw_root).ensure_format()
        say("propagation: starting 3 scheduler processes and 3 raw watch processes")
        for node in NODES:
            nodes.append(
                NodeProcess("scheduler", endpoint=env.endpoint, prefix=prefix, node=node, book=book)
            )
            nodes.append(
                NodeProcess("raw", endpoint=env.endpoint, prefix=raw_prefix, node=node, book=book)
            )
        _start(nodes)

        def raw_round(tag: str, keep: bool) -> None:
            key = raw_prefix + "put/" + tag
            _settle()
            t0 = time.perf_counter()
            gw.put(key, "x")
            t1 = time.perf_counter()
            seen = book.wait("raw", key, len(NODES), TIMEOUT)
            if keep:
                samples["raw"].extend(ms(at - t1) for at in seen.values())
                samples["raw call"].extend(ms(at - t0) for at in seen.values())
                samples["raw put"].append(ms(t1 - t0))

        def replay(log: list[Any], watch_key: bytes, name: str, keep: bool) -> None:
            """The raw etcd3gw replay of the transaction ``log`` captured, renamed."""
            ((_, body, data),) = log
            request = rewrite_body(body, prefix.encode(), raw_root.encode(), revisions)
            key = raw_root + watch_key.decode()[len(prefix) :]
            _settle()
            t0 = time.perf_counter()
            answer = gw.transaction(request)
            t1 = time.perf_counter()
            revisions[int(data["header"]["revision"])] = int(answer["header"]["revision"])
            seen = book.wait("raw", key, len(NODES), TIMEOUT)
            if keep:
                samples[f"same {name} call"].extend(ms(at - t0) for at in seen.values())
                samples[f"same {name}"].append(ms(t1 - t0))

        say(f"propagation: {count} tasks on 3 schedulers, interleaved with raw put -> watch")
        cpu: dict[str, float] = {}
        for i in range(warmup + count):
            keep = i >= warmup
            if i == warmup:
                cpu = {f"{n.mode} {n.node}": n.cpu_seconds() for n in nodes}
            raw_round(f"{i}a", keep)
            log: list[Any] = []
            admin.capture(log)
            _settle()
            t0 = time.perf_counter()
            task = manager.add_task(NS, f"t{i:04d}", nodes=NODES)
            t1 = time.perf_counter()
            admin.capture(None)
            seen = book.wait("start", task.id, len(NODES), TIMEOUT)
            if keep:
                samples["add"].append(ms(t1 - t0))
                for node, at in seen.items():
                    samples[f"start {node}"].append(ms(at - t1))
                    samples[f"start call {node}"].append(ms(at - t0))
            replay(log, manager.keys.task(NS, task.id), "add", keep)
            raw_round(f"{i}b", keep)
            log = []
            admin.capture(log)
            _settle()
            t0 = time.perf_counter()
            manager.cancel_task(NS, task.id, task.version)
            t1 = time.perf_counter()
            admin.capture(None)
            seen = book.wait("stop", task.id, len(NODES), TIMEOUT)
            if keep:
                samples["cancel"].append(ms(t1 - t0))
                for node, at in seen.items():
                    samples[f"stop {node}"].append(ms(at - t1))
                    samples[f"stop call {node}"].append(ms(at - t0))
            replay(log, manager.keys.outcome(NS, task.id), "cancel", keep)
            if (i + 1 - warmup) % 50 == 0 and keep:
                say(f"propagation: {i + 1 - warmup} tasks")
        for n in nodes:  # CPU per write each node observed: 2 for a scheduler, 4 for raw
            writes = count * (2 if n.mode == "scheduler" else 4)
            cpu_ms[n.mode].append(ms(n.cpu_seconds() - cpu[f"{n.mode} {n.node}"]) / writes)
        for node in nodes:
            node.stop()
        nodes.clear()

        # The polling scheduler, for the shape: tasks added at random moments.
        tick = 1.0
        poll_book = StampBook()
        for node in NODES:
            nodes.append(
                NodeProcess(
                    "poll",
                    endpoint=env.endpoint,
                    prefix=poll_prefix,
                    node=node,
                    book=poll_book,
                    tick=tick,
                )
            )
        _start(nodes)
        poll_manager = Manager(admin, prefix=poll_prefix)
        poll_manager.ensure_format()  # a prefix in use: no add below writes the marker
        poll_count = env.size(200, 15)
        gap = env.seconds(0.06, 0.1)
        say(f"propagation: polling scheduler, tick {tick:g}s, {poll_count} tasks")
        added = []
        for i in range(poll_count):
            t0 = time.perf_counter()
            task = poll_manager.add_task(NS, f"p{i:04d}", nodes=NODES)
            added.append((task, t0, time.perf_counter()))
            time.sleep(random.uniform(0, gap))
        for task, t0, t1 in added:
            seen = poll_book.wait("start", task.id, len(NODES), 2 * tick + TIMEOUT)
            samples["poll start"].extend(ms(at - t1) for at in seen.values())
            samples["poll start call"].extend(ms(at - t0) for at in seen.values())
        cancelled = []
        for task, _, _ in added:
            t0 = time.perf_counter()
            poll_manager.cancel_task(NS, task.id, task.version)
            cancelled.append((task, t0, time.perf_counter()))
            time.sleep(random.uniform(0, gap))
        for task, t0, t1 in cancelled:
            seen = poll_book.wait("stop", task.id, len(NODES), 2 * tick + TIMEOUT)
            samples["poll stop"].extend(ms(at - t1) for at in seen.values())
            samples["poll stop call"].extend(ms(at - t0) for at in seen.values())
    finally:
        for node in nodes:
            node.stop()
        admin.close()
        gw.session.close()

    return _result(count, samples, cpu_ms)


def _result(
    count: int, samples: dict[str, list[float]], cpu_ms: dict[str, list[float]]
) -> CaseResult:
    def p(name: str, q: float = 50) -> float:
        return percentile(samples[name], q)

    goal = f"<= {FACTOR}x raw p50"
    raw = "raw put->event p50"
    raw99 = "raw put->event p99"
    rows: list[Row] = []
    starts = {node: p(f"start call {node}") for node in NODES}
    slowest = max(starts, key=lambda node: starts[node])
    rows.append(
        Row(
            "add->start p50, slowest scheduler",
            starts[slowest],
            p("raw call"),
            "ms",
            raw,
            goal,
            starts[slowest] <= FACTOR * p("raw call"),
        )
    )
    for node in NODES:
        rows.append(
            Row(
                f"add->start p50 {node}",
                starts[node],
                p("raw call"),
                "ms",
                raw,
                goal,
                starts[node] <= FACTOR * p("raw call"),
            )
        )
    for node in NODES:
        rows.append(
            Row(
                f"add->start p99 {node}",
                p(f"start call {node}", 99),
                p("raw call", 99),
                "ms",
                raw99,
            )
        )
    for node in NODES:
        value = p(f"stop call {node}")
        rows.append(
            Row(
                f"cancel->terminate p50 {node}",
                value,
                p("raw call"),
                "ms",
                raw,
                goal,
                value <= FACTOR * p("raw call"),
            )
        )
    stops = [v for node in NODES for v in samples[f"stop call {node}"]]
    rows.append(
        Row(
            "cancel->terminate p99, all nodes",
            percentile(stops, 99),
            p("raw call", 99),
            "ms",
            raw99,
        )
    )
    after_add = [v for node in NODES for v in samples[f"start {node}"]]
    after_cancel = [v for node in NODES for v in samples[f"stop {node}"]]
    after = "raw put return->event p50"
    rows.append(
        Row("start p50 after add_task returned", percentile(after_add, 50), p("raw"), "ms", after)
    )
    rows.append(
        Row(
            "terminate p50 after cancel_task returned",
            percentile(after_cancel, 50),
            p("raw"),
            "ms",
            after,
        )
    )
    same = "raw replay of the same txn ->event p50"
    all_starts = [v for node in NODES for v in samples[f"start call {node}"]]
    rows.append(
        Row("add->start p50, all nodes", percentile(all_starts, 50), p("same add call"), "ms", same)
    )
    rows.append(
        Row(
            "cancel->terminate p50, all nodes",
            percentile(stops, 50),
            p("same cancel call"),
            "ms",
            same,
        )
    )
    rows.append(Row("add_task call p50", p("add"), p("raw put"), "ms", "raw put call p50"))
    rows.append(
        Row(
            "add_task call p50 (vs the same txn)",
            p("add"),
            p("same add"),
            "ms",
            "raw replay of the same txn",
        )
    )
    rows.append(
        Row(
            "cancel_task call p50 (vs the same txn)",
            p("cancel"),
            p("same cancel"),
            "ms",
            "raw replay of the same txn",
        )
    )
    rows.append(
        Row(
            "CPU per write observed, per node process",
            max(cpu_ms["scheduler"]),
            max(cpu_ms["raw"]),
            "ms",
            "raw watch process",
        )
    )
    rows.append(
        Row("polling 1 s tick: add->start p50", p("poll start call"), p("raw call"), "ms", raw)
    )
    rows.append(
        Row(
            "polling 1 s tick: add->start p99",
            p("poll start call", 99),
            p("raw call", 99),
            "ms",
            raw99,
        )
    )
    rows.append(
        Row(
            "polling 1 s tick: cancel->terminate p50", p("poll stop call"), p("raw call"), "ms", raw
        )
    )

    def series(values: list[float]) -> list[float]:
        return [round(v, 4) for v in values]

    data = {
        "tasks": count,
        "samples_ms": {
            "raw put -> watch event": series(samples["raw call"]),
            "raw replay of our add txn -> watch event": series(samples["same add call"]),
            "add_task -> start_task (3 schedulers)": series(
                [v for node in NODES for v in samples[f"start call {node}"]]
            ),
            "cancel_task -> terminate (3 schedulers)": series(stops),
            "polling, 1 s tick: add_task -> start_task": series(samples["poll start call"]),
        },
    }
    return CaseResult(KEY, TITLE, GOAL, rows, rows[0].name, data)
