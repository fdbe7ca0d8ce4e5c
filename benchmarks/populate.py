"""Fill a prefix with many tasks quickly: batched raw transactions of the values the Manager
would write (storage layout 2: ``records.py``, ``keys.py``), on a few threads.

A task written here reads exactly as one the Manager added and its nodes completed:

- the layout marker ``P/format`` (:data:`~distributedtask.records.FORMAT_MARKER`), once;
- the add: its record (``node_count``, no node list; version = the record's ``mod_revision``),
  its node list and one assignment per bucket that has a node
  (:meth:`~distributedtask.records.NodeList.by_bucket`), as one ``add_task`` writes them;
- for a FINISHED task, then: one completion key per node (a
  :class:`~distributedtask.records.DoneRecord` of that version, each with its own token) and
  the outcome, carrying the token of the completion that wrote it, as the last completer does.

The version a completion names is the revision of the transaction that wrote its record, so
the adds go first, in batches of whole tasks (at most ``max_ops`` operations), and the
completions and outcomes after them.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from datetime import datetime

from distributedtask import EtcdClient, Manager, TaskStatus
from distributedtask.etcd import txn as t
from distributedtask.records import (
    FORMAT_MARKER,
    DoneRecord,
    NodeList,
    OutcomeRecord,
    TaskRecord,
)

PAYLOAD = b'{"collection":"Articles","tenant":"tenant-0042","operation":"reindex","shards":8}'


def add_ops(
    manager: Manager, namespace: str, task_id: str, nodes: frozenset[str], now: datetime
) -> list[t.Op]:
    """The writes of ``add_task``: record, node list, an assignment per bucket."""
    keys = manager.keys
    record = TaskRecord(
        payload=PAYLOAD, started_at=now, node_count=len(nodes), token=secrets.token_hex(8)
    )
    return [
        t.put(keys.task(namespace, task_id), record.encode()),
        t.put(keys.nodes(namespace, task_id), NodeList(nodes).encode()),
        *(
            t.put(keys.assign(bucket, namespace, task_id), part.encode())
            for bucket, part in sorted(NodeList.by_bucket(nodes).items())
        ),
    ]


def finish_ops(
    manager: Manager,
    namespace: str,
    task_id: str,
    version: int,
    nodes: frozenset[str],
    now: datetime,
) -> list[t.Op]:
    """The writes of the N completions of ``version`` and of the outcome FINISHED."""
    keys = manager.keys
    ops = []
    token = ""
    for node in sorted(nodes):
        token = secrets.token_hex(8)
        done = DoneRecord(version, now, token)
        ops.append(t.put(keys.done(namespace, task_id, node), done.encode()))
    outcome = OutcomeRecord(TaskStatus.FINISHED, now, token)
    ops.append(t.put(keys.outcome(namespace, task_id), outcome.encode()))
    return ops


Batch = list[tuple[str, list[t.Op]]]
"""Whole tasks' operations, by task id, written in one transaction."""


def _batches(items: Batch, max_ops: int) -> list[Batch]:
    """Group whole tasks' operations into transactions of at most ``max_ops`` operations."""
    batches: list[Batch] = [[]]
    size = 0
    for item in items:
        if batches[-1] and size + len(item[1]) > max_ops:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += len(item[1])
    return batches


def _write(client: EtcdClient, batches: list[Batch], threads: int) -> dict[str, int]:
    """Write each batch in one transaction, on ``threads`` threads; the revision each task's
    operations were written at."""
    lock = threading.Lock()
    errors: list[BaseException] = []
    revisions: dict[str, int] = {}
    todo = list(batches)

    def work() -> None:
        while True:
            with lock:
                if not todo or errors:
                    return
                batch = todo.pop()
            try:
                result = client.txn(success=[op for _, ops in batch for op in ops])
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                return
            with lock:
                for task_id, _ in batch:
                    revisions[task_id] = result.revision

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return revisions


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
    now = manager.now()
    node_set = frozenset(nodes)
    client.txn(success=[t.put(manager.keys.format, FORMAT_MARKER)])
    ids = [f"t{i:05d}" for i in range(count)]
    adds = [(task_id, add_ops(manager, namespace, task_id, node_set, now)) for task_id in ids]
    versions = _write(client, _batches(adds, max_ops), threads)
    finishes = [
        (task_id, finish_ops(manager, namespace, task_id, versions[task_id], node_set, now))
        for task_id in ids[started:]
    ]
    _write(client, _batches(finishes, max_ops), threads)
