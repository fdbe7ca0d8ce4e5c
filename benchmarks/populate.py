"""Fill a prefix with many tasks quickly: batched raw transactions of the records the Manager
would write (``records.py``, ``keys.py``), about 25 tasks per transaction, on a few threads.

A task written here reads exactly as one the Manager added: its record (version = the
record's ``mod_revision``), one run key per node, and for a terminal task its outcome key.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from datetime import datetime, timezone

from distributedtask import EtcdClient, Manager, TaskStatus
from distributedtask.etcd import txn as t
from distributedtask.records import COMPLETED, PENDING, OutcomeRecord, RunRecord, TaskRecord

PAYLOAD = b'{"collection":"Articles","tenant":"tenant-0042","operation":"reindex","shards":8}'


def task_ops(
    manager: Manager,
    namespace: str,
    task_id: str,
    nodes: frozenset[str],
    *,
    terminal: bool,
    now: datetime,
) -> list[t.Op]:
    keys = manager.keys
    token = secrets.token_hex(8)
    record = TaskRecord(payload=PAYLOAD, started_at=now, nodes=nodes, token=token)
    ops = [t.put(keys.task(namespace, task_id), record.encode())]
    state = COMPLETED if terminal else PENDING
    for node in sorted(nodes):
        ops.append(t.put(keys.run(namespace, task_id, node), RunRecord(state, now, token).encode()))
    if terminal:
        outcome = OutcomeRecord(TaskStatus.FINISHED, now, token)
        ops.append(t.put(keys.outcome(namespace, task_id), outcome.encode()))
    return ops


def populate(
    client: EtcdClient,
    manager: Manager,
    *,
    namespace: str,
    count: int,
    nodes: Sequence[str],
    started: int = 0,
    threads: int = 4,
    max_ops: int = 120,
) -> None:
    """Write ``count`` tasks ``t00000``...: the first ``started`` STARTED, the rest FINISHED."""
    now = datetime.now(timezone.utc)
    node_set = frozenset(nodes)
    batches: list[list[t.Op]] = [[]]
    for i in range(count):
        ops = task_ops(manager, namespace, f"t{i:05d}", node_set, terminal=i >= started, now=now)
        if len(batches[-1]) + len(ops) > max_ops:
            batches.append([])
        batches[-1].extend(ops)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                if not batches or errors:
                    return
                batch = batches.pop()
            try:
                client.txn(success=batch)
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                return

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
