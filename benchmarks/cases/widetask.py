"""Case 8, wide task: one task on N = 1,000 nodes (200 with --quick), through the Manager alone.

``add_task`` of nodes node-0000..node-0999, then N ``record_node_completion`` calls, one per
node, from 16 threads sharing one client, each thread taking every 16th node. The client is a
:class:`~benchmarks.common.RecordingClient`, which counts every request our code sends to etcd.
Figures: those round trips from the add to FINISHED (and the add's own), the time from the
release of the threads until the call that made the task FINISHED returned, and the time of
``add_task``. etcd's own count of the unary requests it handled is read around both sides, as a
check.

The prefix is in use before anything is measured: a warm-up add of another id (one node) writes
the layout marker, as the first add on a fresh prefix does (two more round trips, reported as a
row of their own). The Manager knows the run from its own add, so no completion reads it first.

Baselines in the same run, interleaved with ours: raw etcd3gw doing the minimum, one put of a
record key, then N puts of one key each from 16 threads sharing one client; and, for the time of
the add, a raw replay of the very transaction our ``add_task`` sent (same bytes: the record, the
node list and an assignment per bucket), under a prefix of the same length holding the marker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import (
    NS,
    CaseResult,
    Env,
    RecordingClient,
    Row,
    median,
    ms,
    raw_gateway,
    rewrite_body,
    run_threads_at,
    say,
    series_sum,
)
from distributedtask import Manager, TaskStatus

KEY = "widetask"
TITLE = "Wide task"
GOAL = "N + 2 etcd round trips at most from add_task to FINISHED, N = 1,000 nodes"
THREADS = 16
TIMEOUT = 120.0


def _unary(env: Env) -> float:
    """The unary requests (puts, transactions, ranges, lease calls) etcd has handled so far."""
    return series_sum(env.metrics(), "grpc_server_started_total", grpc_type="unary")


def _by_thread(items: Sequence[str]) -> list[list[str]]:
    return [list(items[i::THREADS]) for i in range(THREADS)]


def _ours(
    env: Env, client: RecordingClient, manager: Manager, nodes: Sequence[str], task_id: str
) -> dict[str, Any]:
    """One wide task from add to FINISHED: its figures, and the add's request as sent."""
    client.reset_paths()
    etcd0 = _unary(env)
    log: list[Any] = []
    client.capture(log)
    t0 = time.perf_counter()
    task = manager.add_task(NS, task_id, nodes=nodes)
    added = time.perf_counter() - t0
    client.capture(None)
    add_trips = sum(client.paths.values())
    finished: list[float] = []

    def job(group: list[str]) -> Callable[[], None]:
        def complete() -> None:
            for node in group:
                got = manager.record_node_completion(NS, task.id, task.version, node)
                if got.status is TaskStatus.FINISHED:
                    finished.append(time.perf_counter())

        return complete

    released, _ = run_threads_at([job(group) for group in _by_thread(nodes)])
    paths = dict(client.paths)
    etcd_requests = _unary(env) - etcd0
    if not finished:  # no call said so itself: wait until the task is seen FINISHED
        manager.wait_for_task(NS, task.id, task.version, timeout=TIMEOUT)
        finished.append(time.perf_counter())
    final = manager.get_task(NS, task.id)
    assert final is not None and final.status is TaskStatus.FINISHED, final
    assert final.finished_nodes == frozenset(nodes), len(final.finished_nodes)
    return {
        "trips": sum(paths.values()),
        "add_trips": add_trips,
        "paths": paths,
        "etcd_requests": etcd_requests,
        "finished_s": min(finished) - released,
        "add_s": added,
        "add_request": log,
    }


def _raw(env: Env, gw: Any, prefix: str, nodes: Sequence[str]) -> dict[str, Any]:
    """The minimum: one put for the task, one put of one key for each node, same threads."""
    etcd0 = _unary(env)
    t0 = time.perf_counter()
    gw.put(f"{prefix}/task", "record")
    added = time.perf_counter() - t0

    def job(group: list[str]) -> Callable[[], None]:
        def put() -> None:
            for node in group:
                gw.put(f"{prefix}/run/{node}", "completed")

        return put

    released, ended = run_threads_at([job(group) for group in _by_thread(nodes)])
    return {"etcd_requests": _unary(env) - etcd0, "finished_s": ended - released, "add_s": added}


def _replay_add(gw: Any, log: list[Any], old: str, new: str) -> float:
    """The raw replay of our add's one transaction under ``new``; its time."""
    ((path, body, data),) = log
    assert path == "kv/txn", path
    request = rewrite_body(body, old.encode(), new.encode(), {})
    t0 = time.perf_counter()
    answer = gw.transaction(request)
    took = time.perf_counter() - t0
    if bool(answer.get("succeeded", False)) != bool(data.get("succeeded", False)):
        raise AssertionError("raw replay of add_task took another branch")
    return took


def run(env: Env) -> CaseResult:
    n = env.size(1000, 200)
    reps = env.size(3, 1)
    nodes = [f"node-{i:04d}" for i in range(n)]
    prefix = env.prefix("wide")
    replay_prefix = prefix.replace("/bench/wide-", "/bench/widr-")  # same length, same bytes
    client = RecordingClient(env.endpoint, timeout=30.0)
    manager = Manager(client, prefix=prefix)
    gw = raw_gateway(env.endpoint)
    ours: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    replays: list[float] = []
    say(f"wide task: {n} nodes, {THREADS} threads, {reps} runs of ours and of raw etcd3gw")
    try:
        client.reset_paths()
        manager.add_task(NS, "warm-up", nodes=[nodes[0]])  # writes the layout marker
        first_add = dict(client.paths)
        Manager(client, prefix=replay_prefix).ensure_format()
        for rep in range(reps):
            ours.append(_ours(env, client, manager, nodes, f"wide-{rep}"))
            replays.append(_replay_add(gw, ours[-1].pop("add_request"), prefix, replay_prefix))
            raw.append(_raw(env, gw, f"{env.prefix('wideraw')}/{rep}", nodes))
            say(
                f"wide task: run {rep + 1}: raw {raw[-1]['etcd_requests']:.0f} requests, "
                f"{ms(raw[-1]['finished_s']):,.0f} ms; ours {ours[-1]['trips']} round trips "
                f"(add {ours[-1]['add_trips']}), FINISHED after "
                f"{ms(ours[-1]['finished_s']):,.0f} ms"
            )
    finally:
        client.close()
        gw.session.close()

    def figure(samples: list[dict[str, Any]], name: str, scale: float = 1.0) -> float:
        return median([s[name] for s in samples]) * scale

    def worst(samples: list[dict[str, Any]], name: str) -> float:
        return float(max(s[name] for s in samples))

    trips = worst(ours, "trips")
    note = ""
    if trips > n + 2:  # what was sent, for the reader to see why
        most = max(ours, key=lambda sample: int(sample["trips"]))["paths"]
        note = "Requests by path: " + ", ".join(f"{p} {c}" for p, c in sorted(most.items())) + "."
    rows = [
        Row(
            f"N={n}: round trips, add + N completions",
            trips,
            worst(raw, "etcd_requests"),
            "trips",
            "raw: 1 + N puts",
            f"<= {n + 2}",
            trips <= n + 2,
            note,
        ),
        Row(f"N={n}: round trips of add_task", worst(ours, "add_trips"), 1, "trips", "raw: 1 put"),
        Row(
            "round trips of the first add on a fresh prefix (1 node; writes the layout marker)",
            sum(first_add.values()),
            1,
            "trips",
            "raw: 1 put",
        ),
        Row(
            f"N={n}: release -> FINISHED, {THREADS} threads",
            figure(ours, "finished_s", 1e3),
            figure(raw, "finished_s", 1e3),
            "ms",
            f"raw: N puts from {THREADS} threads",
        ),
        Row(
            f"N={n}: add_task",
            figure(ours, "add_s", 1e3),
            figure(raw, "add_s", 1e3),
            "ms",
            "raw put of one key",
        ),
        Row(
            f"N={n}: add_task (vs the same txn)",
            figure(ours, "add_s", 1e3),
            ms(median(replays)),
            "ms",
            "raw replay of the same txn",
        ),
        Row(
            f"N={n}: requests etcd counted",
            worst(ours, "etcd_requests"),
            worst(raw, "etcd_requests"),
            "requests",
            "raw: 1 + N puts",
        ),
    ]
    data = {
        "n": n,
        "threads": THREADS,
        "first_add_paths": first_add,
        "ours": ours,
        "raw": raw,
        "replay_add_s": replays,
    }
    return CaseResult(KEY, TITLE, GOAL, rows, rows[0].name, data)
