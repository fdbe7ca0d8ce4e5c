"""Case 3, fan-in: N = 1, 4, 16, 64 nodes record completion of one task at once.

Each node has its own EtcdClient and Manager (as on its own machine), all through one
:class:`~distributedtask.testing.proxy.TcpProxy` that counts HTTP requests. The task is added
first (not counted); every node's Manager reads it once (``get_task``, not counted), as a node
that runs a task has seen it (a Scheduler completes from its view, with no read), and this warms
its connection; the counts are reset; then N threads are released together, each calling
``record_node_completion`` once. Figures: etcd round trips in total, and the time from the
release until the call that made the task FINISHED returned. An informative row repeats it with
Managers that never saw the run: each first reads it (one more round trip a node).

Baseline in the same run, same proxy, same threads: the design DESIGN.md rejects, one record
holding the set of finished nodes, each node doing compare-and-swap on it with raw etcd3gw (read,
then ``IF mod == seen THEN put ELSE range``, again until it wins).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

from benchmarks.common import (
    NS,
    CaseResult,
    Env,
    Row,
    b64,
    host_port,
    median,
    ms,
    raw_gateway,
    run_threads_at,
    say,
)
from distributedtask import EtcdClient, Manager, TaskStatus
from distributedtask.testing.proxy import TcpProxy

KEY = "fanin"
TITLE = "Fan-in"
GOAL = "N + 1 etcd round trips at most, whatever N"


def _ours(
    proxy: TcpProxy, clients: list[EtcdClient], admin: Manager, n: int, tag: str, *, seen: bool
) -> tuple[int, float]:
    """N nodes, each with a Manager of its own, complete one task at once; the round trips
    and the time until FINISHED. ``seen``: each node's Manager has read the run before (as a
    Scheduler that started it knows it); otherwise its first call reads the run."""
    nodes = [f"n{i:02d}" for i in range(n)]
    task = admin.add_task(NS, f"fan-{tag}", nodes=nodes)
    managers = [Manager(client, prefix=admin.prefix) for client in clients[:n]]
    for manager in managers:
        if seen:
            manager.get_task(NS, task.id)  # the node has seen the run; warms the connection
        else:
            manager.client.range(b"/bench/warm")
    finished: list[float] = []

    def node(i: int) -> Any:
        def job() -> None:
            got = managers[i].record_node_completion(NS, task.id, task.version, nodes[i])
            if got.status is TaskStatus.FINISHED:
                finished.append(time.perf_counter())

        return job

    proxy.reset_counts()
    t0, _ = run_threads_at([node(i) for i in range(n)])
    trips = proxy.requests
    final = admin.get_task(NS, task.id)
    assert final is not None and final.status is TaskStatus.FINISHED, final
    assert len(finished) == 1, finished
    return trips, finished[0] - t0


def _naive(
    env: Env, proxy: TcpProxy, gws: list[Any], admin_gw: Any, n: int, tag: str
) -> tuple[int, float]:
    key = f"/bench/fan-naive/{tag}".encode()
    admin_gw.put(key, json.dumps({"finished": []}))
    for gw in gws[:n]:
        gw.post(gw.get_url("/kv/range"), json={"key": b64(b"/bench/warm")})
    finished: list[float] = []
    lock = threading.Lock()

    def node(i: int) -> Any:
        gw = gws[i]
        name = f"n{i:02d}"

        def job() -> None:
            got = gw.post(gw.get_url("/kv/range"), json={"key": b64(key)})["kvs"][0]
            while True:
                value = json.loads(base64.b64decode(got["value"]))
                done = sorted({*value["finished"], name})
                answer = gw.transaction(
                    {
                        "compare": [
                            {
                                "key": b64(key),
                                "target": "MOD",
                                "result": "EQUAL",
                                "mod_revision": got["mod_revision"],
                            }
                        ],
                        "success": [
                            {
                                "request_put": {
                                    "key": b64(key),
                                    "value": b64(json.dumps({"finished": done})),
                                }
                            }
                        ],
                        "failure": [{"request_range": {"key": b64(key)}}],
                    }
                )
                if answer.get("succeeded"):
                    if len(done) == n:
                        with lock:
                            finished.append(time.perf_counter())
                    return
                got = answer["responses"][0]["response_range"]["kvs"][0]

        return job

    proxy.reset_counts()
    t0, _ = run_threads_at([node(i) for i in range(n)])
    trips = proxy.requests
    assert len(finished) == 1, finished
    return trips, finished[0] - t0


def run(env: Env) -> CaseResult:
    sizes = [1, 4, 16, 64] if not env.quick else [1, 4, 16]
    reps = env.size(3, 1)
    proxy = TcpProxy(*host_port(env.endpoint))
    biggest = max(sizes)
    clients = [EtcdClient(proxy.endpoint, timeout=10.0) for _ in range(biggest)]
    admin_client = env.client()
    prefix = env.prefix("fan")
    admin = Manager(admin_client, prefix=prefix)
    gws = [raw_gateway(proxy.endpoint) for _ in range(biggest)]
    admin_gw = raw_gateway(env.endpoint)
    rows: list[Row] = []
    data: dict[str, Any] = {
        "n": [],
        "ours_trips": [],
        "naive_trips": [],
        "ours_ms": [],
        "naive_ms": [],
        "unseen_trips": [],
        "unseen_ms": [],
    }
    try:
        for n in sizes:
            ours_trips, ours_time, naive_trips, naive_time = [], [], [], []
            unseen_trips, unseen_time = [], []
            for rep in range(reps):
                trips, took = _ours(proxy, clients, admin, n, f"{n}-{rep}", seen=True)
                ours_trips.append(trips)
                ours_time.append(took)
                trips, took = _ours(proxy, clients, admin, n, f"{n}-{rep}-u", seen=False)
                unseen_trips.append(trips)
                unseen_time.append(took)
                trips, took = _naive(env, proxy, gws, admin_gw, n, f"{n}-{rep}")
                naive_trips.append(trips)
                naive_time.append(took)
            say(
                f"fan-in: N={n}: ours {max(ours_trips)} trips, {ms(median(ours_time)):.1f} ms; "
                f"CAS on one record {max(naive_trips)} trips, {ms(median(naive_time)):.1f} ms; "
                f"Managers that never saw the run {max(unseen_trips)} trips"
            )
            rows.append(
                Row(
                    f"N={n}: round trips",
                    max(ours_trips),
                    max(naive_trips),
                    "trips",
                    "CAS on one record",
                    f"<= {n + 1}",
                    max(ours_trips) <= n + 1,
                )
            )
            rows.append(
                Row(
                    f"N={n}: time until FINISHED",
                    ms(median(ours_time)),
                    ms(median(naive_time)),
                    "ms",
                    "CAS on one record",
                )
            )
            rows.append(
                Row(
                    f"N={n}: round trips, Managers that never saw the run",
                    max(unseen_trips),
                    max(naive_trips),
                    "trips",
                    "CAS on one record",
                )
            )
            data["n"].append(n)
            data["unseen_trips"].append(max(unseen_trips))
            data["unseen_ms"].append(ms(median(unseen_time)))
            data["ours_trips"].append(max(ours_trips))
            data["naive_trips"].append(max(naive_trips))
            data["ours_ms"].append(ms(median(ours_time)))
            data["naive_ms"].append(ms(median(naive_time)))
    finally:
        for client in clients:
            client.close()
        admin_client.close()
        for gw in [*gws, admin_gw]:
            gw.session.close()
        proxy.close()
    head = rows[-3]
    rows.insert(
        0,
        Row(
            f"largest N ({sizes[-1]}): round trips",
            head.measured,
            head.baseline,
            head.unit,
            head.baseline_name,
            "<= N + 1 for every N",
            all(r.met for r in rows if r.met is not None),
        ),
    )
    return CaseResult(KEY, TITLE, GOAL, rows, rows[0].name, data)
