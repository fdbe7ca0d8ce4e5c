"""A fresh process for the scale case, so the harness's own memory does not count.

``python -m benchmarks.scale_child MODE --endpoint URL --prefix P --node ID`` prints one JSON
line: ``seconds`` and ``cpu_seconds`` (of the timed part; CPU of every thread of the process),
``rss_before_kb`` (after imports, before it),
``rss_after_kb`` and ``hwm_kb`` (peak resident) from ``/proc/self/status``. MODE is
``scheduler`` (a Scheduler's ``start()``, with a provider that does nothing) or ``raw`` (the
baseline: the ranges that Scheduler lists, ``P/cluster/`` and ``P/assign/<its bucket>/``,
in one raw etcd3gw transaction, the decoded JSON kept). Both modes import the same modules
first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks.baselines import NoopProvider
from benchmarks.common import NS, b64, range_end, raw_gateway
from distributedtask import EtcdClient, Manager, Scheduler
from distributedtask.keys import bucket_of


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("scheduler", "raw"))
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--node", required=True)
    args = parser.parse_args()
    client = EtcdClient(args.endpoint, timeout=30.0)
    manager = Manager(client, prefix=args.prefix)
    out: dict[str, Any] = {"mode": args.mode}
    keep: Any = None
    if args.mode == "scheduler":
        provider = NoopProvider()
        scheduler = Scheduler(
            manager, node_id=args.node, providers={NS: provider}, registry=CollectorRegistry()
        )
        out["rss_before_kb"] = status_kb("VmRSS")
        c0, t0 = time.process_time(), time.perf_counter()
        scheduler.start()
        out["seconds"] = time.perf_counter() - t0
        out["cpu_seconds"] = time.process_time() - c0
        out["rss_after_kb"] = status_kb("VmRSS")
        out["hwm_kb"] = status_kb("VmHWM")
        out["starts"] = provider.starts
        keep = scheduler
        scheduler.stop()
    else:
        gw = raw_gateway(args.endpoint)
        body = {
            "success": [
                {"request_range": {"key": b64(start), "range_end": b64(range_end(start))}}
                for start in (manager.keys.cluster, manager.keys.bucket(bucket_of(args.node)))
            ]
        }
        out["rss_before_kb"] = status_kb("VmRSS")
        c0, t0 = time.process_time(), time.perf_counter()
        keep = gw.transaction(body)
        out["seconds"] = time.perf_counter() - t0
        out["cpu_seconds"] = time.process_time() - c0
        out["rss_after_kb"] = status_kb("VmRSS")
        out["hwm_kb"] = status_kb("VmHWM")
        out["kvs"] = sum(len(r["response_range"].get("kvs", [])) for r in keep["responses"])
    del keep
    client.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
