"""Case 4, idle cost: etcd requests per second from 3 idle Schedulers holding 1,000 terminal
tasks, against 3 polling schedulers (Weaviate's shape, 1 s tick) holding the same tasks.

The tasks are FINISHED, with the default ``completed_task_ttl`` of 5 days, so nothing is cleaned
up during the measurement. Our Schedulers (default ``member_ttl`` 10 s, so a lease refresh every
3.3 s each) run first, through one TcpProxy counting HTTP requests, and their clients note each
request's path; after they have started and settled, the counts are reset and a window of W
seconds is measured. Then the same window with the 3 polling schedulers, through another proxy.
etcd's own counters (CPU seconds, bytes sent to clients) are read around each window.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks.baselines import NoopProvider, PollingScheduler
from benchmarks.common import (
    NS,
    CaseResult,
    Env,
    RecordingClient,
    Row,
    host_port,
    say,
)
from benchmarks.populate import populate
from distributedtask import Manager, Scheduler
from distributedtask.testing.proxy import TcpProxy

KEY = "idle"
TITLE = "Idle cost"
GOAL = "lease refreshes only"
NODES = ("node-a", "node-b", "node-c")
LEASE = "lease/keepalive"


def _window(
    env: Env, proxy: TcpProxy, clients: list[RecordingClient], seconds: float
) -> dict[str, Any]:
    for client in clients:
        client.reset_paths()
    before = env.metrics()
    cpu0 = time.process_time()
    proxy.reset_counts()
    t0 = time.monotonic()
    time.sleep(seconds)
    requests = proxy.requests
    elapsed = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    after = env.metrics()
    paths: Counter[str] = Counter()
    for client in clients:
        paths.update(client.paths)
    return {
        "seconds": elapsed,
        "requests": requests,
        "paths": dict(paths),
        "etcd_cpu_s": after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"],
        "etcd_sent_bytes": after["etcd_network_client_grpc_sent_bytes_total"]
        - before["etcd_network_client_grpc_sent_bytes_total"],
        "harness_cpu_s": cpu,
    }


def run(env: Env) -> CaseResult:
    count = env.size(1000, 200)
    seconds = env.seconds(20.0, 3.0)
    prefix = env.prefix("idle")
    admin = env.client()
    populate(admin, Manager(admin, prefix=prefix), namespace=NS, count=count, nodes=NODES)
    say(f"idle: {count} FINISHED tasks written; 3 Schedulers, then a {seconds:g}s window")
    proxy = TcpProxy(*host_port(env.endpoint))
    clients = [RecordingClient(proxy.endpoint, timeout=10.0) for _ in NODES]
    schedulers: list[Scheduler] = []
    pollers: list[PollingScheduler] = []
    try:
        for node, client in zip(NODES, clients, strict=True):
            scheduler = Scheduler(
                Manager(client, prefix=prefix),
                node_id=node,
                providers={NS: NoopProvider()},
                registry=CollectorRegistry(),
            )
            scheduler.start()
            schedulers.append(scheduler)
        time.sleep(0.5)
        ours = _window(env, proxy, clients, seconds)
        for scheduler in schedulers:
            scheduler.stop()
        schedulers.clear()
        say(f"idle: ours {ours['requests']} requests {ours['paths']}; now 3 polling schedulers")
        for client in clients:
            client.close()
        proxy.close()
        proxy = TcpProxy(*host_port(env.endpoint))
        clients = [RecordingClient(proxy.endpoint, timeout=10.0) for _ in NODES]
        for node, client in zip(NODES, clients, strict=True):
            poller = PollingScheduler(
                Manager(client, prefix=prefix),
                node_id=node,
                providers={NS: NoopProvider()},
                tick=1.0,
            )
            poller.start()
            pollers.append(poller)
        time.sleep(1.2)  # every poller has ticked once
        polling = _window(env, proxy, clients, seconds)
        say(f"idle: polling {polling['requests']} requests {polling['paths']}")
    finally:
        for scheduler in schedulers:
            scheduler.stop()
        for poller in pollers:
            poller.stop()
        for client in clients:
            client.close()
        admin.close()
        proxy.close()

    def rate(window: dict[str, Any], field: str, scale: float = 1.0) -> float:
        return float(window[field]) * scale / float(window["seconds"])

    non_lease = ours["requests"] - ours["paths"].get(LEASE, 0)
    lease_only = non_lease == 0 and set(ours["paths"]) <= {LEASE}
    rows = [
        Row(
            "requests/s, 3 idle schedulers",
            rate(ours, "requests"),
            rate(polling, "requests"),
            "req/s",
            "polling, 1 s tick",
            GOAL,
            lease_only,
        ),
        Row(
            "requests that are not lease refreshes",
            float(non_lease),
            float(polling["requests"]),
            "requests",
            "polling, 1 s tick",
            "0",
            non_lease == 0,
        ),
        Row(
            "etcd bytes sent to clients/s",
            rate(ours, "etcd_sent_bytes", 1e-3),
            rate(polling, "etcd_sent_bytes", 1e-3),
            "kB/s",
            "polling, 1 s tick",
        ),
        Row(
            "etcd CPU",
            rate(ours, "etcd_cpu_s", 1e3),
            rate(polling, "etcd_cpu_s", 1e3),
            "ms/s",
            "polling, 1 s tick",
        ),
        Row(
            "client-side CPU (benchmark process)",
            rate(ours, "harness_cpu_s", 1e3),
            rate(polling, "harness_cpu_s", 1e3),
            "ms/s",
            "polling, 1 s tick",
        ),
    ]
    data = {"tasks": count, "ours": ours, "polling": polling}
    return CaseResult(KEY, TITLE, GOAL, rows, rows[0].name, data)
