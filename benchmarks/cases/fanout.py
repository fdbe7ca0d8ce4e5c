"""Case 7, fan-out: one task on all K nodes, K = 10, 50, 200 Schedulers (4, 8, 16 with --quick).

The K Schedulers (node-000, node-001, ...) run in 4 child processes (:mod:`benchmarks.node`, K/4
each), every one with its own EtcdClient and CollectorRegistry, serving one namespace with a
provider that only notes when ``start_task`` is called and never completes the run (a completion
would write in turn and fan out again, mixing into the figures). Their ``member_ttl`` is 120 s,
so lease refreshes are rare (one every 40 s a node).

For each K, on a fresh prefix, ``reps`` times: add one task on all K nodes, then 10
``record_progress`` calls for node-000 of that task. Each of the two is measured in a window of
etcd's own counters (its metrics listener): after a quiet period, an idle window of W seconds,
then the write's window, W or, if the write's effect (all K started, for the add) takes longer,
the next multiple of W. W is 2 s, the interval at which the benchmark etcd sends a progress
notification to each caught-up watcher (``--experimental-watch-progress-notify-interval`` of
:class:`~distributedtask.testing.etcd.EtcdServer`), so each window holds one per watcher and the
idle window cancels them (0.25 s with --quick: less exact). Figures:

- the bytes etcd sent to its clients (``etcd_network_client_grpc_sent_bytes_total``: the HTTP
  gateway is a gRPC client of etcd in the same process, so the watch streams and responses it
  serves are counted) in the write's window minus the idle window's, scaled to the same length,
  so lease refreshes and progress notifications do not count;
- the watch events etcd delivered (``etcd_debugging_mvcc_events_total``: one per key and
  watcher), which says how many nodes the write reached and with how many keys;
- the time from ``add_task`` being issued until the last of the K ``start_task`` calls.

Medians over ``reps``. Baseline: the same figures at the smallest K, in the same run. Goals, for
the largest K: bytes per add at most 2 x (K / K_min) those at K_min (linear in K, with room),
bytes per progress write at most 2x, all K started within 10x the K_min time.

The Schedulers write the layout marker when they start, so each add is the one transaction of a
prefix in use, and the Manager knows the run from its add, so a progress write reads nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

from benchmarks.baselines import StampBook
from benchmarks.common import (
    NS,
    CaseResult,
    Env,
    Row,
    median,
    ms,
    say,
)
from benchmarks.node import NodeProcess, stop_all
from distributedtask import EtcdClient, Manager, Task

KEY = "fanout"
TITLE = "Fan-out"
GOAL = (
    "largest K against the smallest: bytes per add <= 2 x their ratio, bytes per progress "
    "write <= 2x, all started <= 10x the time"
)
PROCESSES = 4
MEMBER_TTL = 120.0
PROGRESS_WRITES = 10
ADD_SLACK = 2.0  # bytes per add may grow 2x faster than K
PROGRESS_FACTOR = 2.0
START_FACTOR = 10.0
TIMEOUT = 120.0
WINDOW = 2.0  # the benchmark etcd's --experimental-watch-progress-notify-interval
SENT = "etcd_network_client_grpc_sent_bytes_total"
EVENTS = "etcd_debugging_mvcc_events_total"

FIELDS = (
    "add_bytes",
    "add_bytes_per_node",
    "add_events",
    "progress_bytes",
    "progress_events",
    "start_s",
)
"""The samples of one K, a list of ``reps`` each."""

T = TypeVar("T")


def _counters(env: Env) -> tuple[float, float]:
    """etcd's bytes sent to clients and watch events delivered, so far."""
    metrics = env.metrics()
    return metrics[SENT], metrics[EVENTS]


def _window(
    env: Env, seconds: float, quiet: float, action: Callable[[], T]
) -> tuple[T, float, float]:
    """Run ``action`` in a window of etcd's counters; return its result, and the bytes etcd sent
    and the watch events it delivered because of it.

    After ``quiet`` seconds, an idle window of ``seconds``; then the action's, ``seconds`` or the
    next multiple of it if the action takes longer. The idle counts, scaled to its length, are
    subtracted from the action's."""
    time.sleep(quiet)  # what the previous step caused has been sent
    idle0, i0 = _counters(env), time.monotonic()
    time.sleep(seconds)
    idle1, i1 = _counters(env), time.monotonic()
    result = action()
    took = time.monotonic() - i1
    time.sleep(max(1, math.ceil(took / seconds)) * seconds - took)
    busy, i2 = _counters(env), time.monotonic()
    scale = (i2 - i1) / (i1 - i0)
    sent = busy[0] - idle1[0] - scale * (idle1[0] - idle0[0])
    events = busy[1] - idle1[1] - scale * (idle1[1] - idle0[1])
    return result, sent, events


def _measure(
    env: Env, admin: EtcdClient, k: int, reps: int, seconds: float, quiet: float
) -> dict[str, Any]:
    """The samples of one K (lists of ``reps``)."""
    nodes = [f"node-{i:03d}" for i in range(k)]
    prefix = env.prefix("fanout")
    manager = Manager(admin, prefix=prefix)
    book = StampBook()
    out: dict[str, Any] = {"k": k}
    for name in FIELDS:
        out[name] = []
    procs: list[NodeProcess] = []
    say(f"fan-out: K={k}: starting {k} Schedulers in {min(PROCESSES, k)} processes")
    try:
        for i in range(min(PROCESSES, k)):
            procs.append(
                NodeProcess(
                    "scheduler",
                    endpoint=env.endpoint,
                    prefix=prefix,
                    node=",".join(nodes[i::PROCESSES]),
                    book=book,
                    member_ttl=MEMBER_TTL,
                )
            )
        for proc in procs:
            proc.wait_ready(TIMEOUT)
        for rep in range(reps):
            task_id = f"fan-{rep}"

            def add(task_id: str = task_id) -> tuple[Task, float]:
                t0 = time.perf_counter()
                task = manager.add_task(NS, task_id, nodes=nodes)
                seen = book.wait("start", task_id, k, TIMEOUT)
                return task, max(seen.values()) - t0

            (task, started), add_bytes, add_events = _window(env, seconds, quiet, add)

            def progress(task: Task = task) -> None:
                for i in range(PROGRESS_WRITES):
                    fraction = (i + 1) / PROGRESS_WRITES
                    manager.record_progress(NS, task.id, task.version, nodes[0], fraction, "fan")

            _, progress_bytes, progress_events = _window(env, seconds, quiet, progress)
            out["add_bytes"].append(add_bytes)
            out["add_bytes_per_node"].append(add_bytes / k)
            out["add_events"].append(add_events)
            out["progress_bytes"].append(progress_bytes / PROGRESS_WRITES)
            out["progress_events"].append(progress_events / PROGRESS_WRITES)
            out["start_s"].append(started)
            say(
                f"fan-out: K={k}: add {add_bytes / 1e3:,.1f} kB, {add_events:.0f} watch "
                f"events, all started in {ms(started):.1f} ms; progress write "
                f"{progress_bytes / PROGRESS_WRITES / 1e3:,.2f} kB, "
                f"{progress_events / PROGRESS_WRITES:.1f} watch events"
            )
    finally:
        stop_all(procs, TIMEOUT)
    return out


def _value(sample: dict[str, Any], name: str, scale: float = 1.0) -> float:
    return float(median(sample[name]) * scale)


class _Rows:
    """Builds the rows comparing one K with the smallest."""

    def __init__(self, first: dict[str, Any]) -> None:
        self.first = first
        self.rows: list[Row] = []

    def add(
        self,
        sample: dict[str, Any],
        name: str,
        field: str,
        unit: str,
        scale: float = 1.0,
        bound: float | None = None,
        goal: str = "",
        note: str = "",
    ) -> None:
        row = Row(
            name,
            _value(sample, field, scale),
            _value(self.first, field, scale),
            unit,
            f"K={self.first['k']}",
            goal,
            note=note,
        )
        if bound is not None:
            row.met = row.ratio is not None and row.ratio <= bound
        self.rows.append(row)


def run(env: Env) -> CaseResult:
    sizes = [4, 8, 16] if env.quick else [10, 50, 200]
    reps = env.size(3, 1)
    seconds = env.seconds(WINDOW, 0.25)
    quiet = env.seconds(0.5, 0.1)
    admin = env.client()
    samples: list[dict[str, Any]] = []
    try:
        for k in sizes:
            samples.append(_measure(env, admin, k, reps, seconds, quiet))
    finally:
        admin.close()

    first, last = samples[0], samples[-1]
    k0, kn = first["k"], last["k"]
    add_bound = ADD_SLACK * kn / k0
    table = _Rows(first)
    table.add(
        last,
        f"bytes per add, K={kn}",
        "add_bytes",
        "kB",
        1e-3,
        add_bound,
        f"<= {add_bound:g}x (2 x {kn}/{k0})",
    )
    table.add(
        last,
        f"bytes per progress write, K={kn}",
        "progress_bytes",
        "kB",
        1e-3,
        PROGRESS_FACTOR,
        f"<= {PROGRESS_FACTOR:g}x",
    )
    table.add(
        last,
        f"add -> all {kn} started",
        "start_s",
        "ms",
        1e3,
        START_FACTOR,
        f"<= {START_FACTOR:g}x",
    )
    for sample in samples[1:-1]:
        k = sample["k"]
        bound = f"the goal's bound at this K would be {ADD_SLACK * k / k0:g}x"
        table.add(sample, f"K={k}: bytes per add", "add_bytes", "kB", 1e-3, note=bound)
        table.add(sample, f"K={k}: bytes per progress write", "progress_bytes", "kB", 1e-3)
        table.add(sample, f"K={k}: add -> all started", "start_s", "ms", 1e3)
    for sample in samples[1:]:
        k = sample["k"]
        table.add(sample, f"K={k}: watch events delivered per add", "add_events", "events")
        table.add(sample, f"K={k}: watch events per progress write", "progress_events", "events")
        table.add(sample, f"K={k}: bytes per add per node", "add_bytes_per_node", "kB", 1e-3)

    def series(name: str, scale: float = 1.0) -> list[float]:
        return [_value(sample, name, scale) for sample in samples]

    data = {
        "k": sizes,
        "reps": reps,
        "window_s": seconds,
        "add_kB": series("add_bytes", 1e-3),
        "progress_kB": series("progress_bytes", 1e-3),
        "start_ms": series("start_s", 1e3),
        "watch_events_per_add": series("add_events"),
        "watch_events_per_progress_write": series("progress_events"),
        "samples": samples,
    }
    return CaseResult(KEY, TITLE, GOAL, table.rows, table.rows[0].name, data)
