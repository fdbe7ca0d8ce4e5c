"""Case 2, Manager throughput: operations per second of add, complete, cancel and list,
sequential and with 8 threads, against raw etcd3gw transactions of the same size.

Same size means the same bytes: every request our Manager sends is captured
(:class:`~benchmarks.common.RecordingClient`) and the baseline replays it with raw etcd3gw
(``Etcd3Client.transaction``, on a session configured like ours) under a prefix of the same
length, with each compare's ``mod_revision`` mapped to the revision the raw replay of that
task's add got, so every compare takes the same branch as ours did. Each raw phase runs right
after our phase, on the same number of threads, and is timed the same way: from the moment all
threads are released until the last ends. Tasks have 3 nodes; "complete" records a node that is
not the last (one transaction); "complete, last node" is the one that finishes the task (two).
Both prefixes hold the layout marker before anything is timed (the first add on a fresh prefix
writes it, two more round trips), so every add is the one transaction of a prefix in use; the
Manager knows each run from its own add, so a completion reads nothing first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from benchmarks.common import (
    NS,
    CaseResult,
    Env,
    RecordingClient,
    Row,
    median,
    raw_gateway,
    rewrite_body,
    run_threads,
    say,
)
from distributedtask import Manager, Task

KEY = "throughput"
TITLE = "Manager throughput"
GOAL = "each single-transaction operation >= 0.8x of raw etcd3gw transactions of the same size"
NODES = ("n1", "n2", "n3")
FACTOR = 0.8
SINGLE = ("add", "complete", "cancel", "list")

Captured = list[tuple[str, Any, Any]]


class _Run:
    """One mode (sequential or threaded): our Manager and the raw replay, phase by phase."""

    def __init__(self, env: Env, threads: int, per_thread: int, lists: int, chunk: int) -> None:
        self.threads = threads
        self.per_thread = per_thread
        self.lists = lists
        ours = env.prefix("tp")
        raw = ours.replace("/bench/tp-", "/bench/tr-")
        assert len(ours) == len(raw)
        self.old, self.new = ours.encode(), raw.encode()
        self.client = RecordingClient(env.endpoint, timeout=10.0)
        self.manager = Manager(self.client, prefix=ours)
        # Both prefixes hold the layout marker, as a prefix in use does: the first add on a
        # fresh prefix writes it (two more round trips), which is not what is measured here.
        self.manager.ensure_format()
        Manager(self.client, prefix=raw).ensure_format()
        self.gw = raw_gateway(env.endpoint)
        self.revisions: dict[int, int] = {}
        self.lock = threading.Lock()
        self.tasks: list[list[Task]] = [[] for _ in range(threads)]
        self.cancel_tasks: list[list[Task]] = [[] for _ in range(threads)]
        self.chunk = chunk
        self.chunks: dict[str, list[tuple[float, float]]] = {}  # op -> [(ours, raw) ops/s]

    def close(self) -> None:
        self.client.close()
        self.gw.session.close()

    def phase(self, op: str, work: Callable[[int], list[Callable[[], Any]]]) -> None:
        """Time ``work(w)``'s calls on each worker w, chunk by chunk: ours, then the raw
        replay of the very requests that chunk sent."""
        work_lists = [work(w) for w in range(self.threads)]
        size = max(1, min(self.chunk, len(work_lists[0])))
        for start in range(0, len(work_lists[0]), size):
            chunk = [calls[start : start + size] for calls in work_lists]
            self._chunk(op, chunk)

    def _chunk(self, op: str, chunk: list[list[Callable[[], Any]]]) -> None:
        logs: list[Captured] = [[] for _ in range(self.threads)]

        def ours_job(w: int) -> Callable[[], None]:
            def job() -> None:
                self.client.capture(logs[w])
                try:
                    for call in chunk[w]:
                        call()
                finally:
                    self.client.capture(None)

            return job

        ours = run_threads([ours_job(w) for w in range(self.threads)])
        bodies = [
            [
                (rewrite_body(body, self.old, self.new, self.revisions), data)
                for path, body, data in log
                if path == "kv/txn"
            ]
            for log in logs
        ]
        assert all(len(log) == len(b) for log, b in zip(logs, bodies, strict=True))

        def raw_job(w: int) -> Callable[[], None]:
            def job() -> None:
                transaction = self.gw.transaction
                got = [transaction(body) for body, _ in bodies[w]]
                if op == "add":
                    with self.lock:
                        for (_, data), answer in zip(bodies[w], got, strict=True):
                            self.revisions[int(data["header"]["revision"])] = int(
                                answer["header"]["revision"]
                            )
                for (_, data), answer in zip(bodies[w], got, strict=True):
                    if bool(data.get("succeeded", False)) != bool(answer.get("succeeded", False)):
                        raise AssertionError(f"raw replay of {op} took another branch")

            return job

        raw = run_threads([raw_job(w) for w in range(self.threads)])
        count = sum(len(calls) for calls in chunk)
        self.chunks.setdefault(op, []).append((count / ours, count / raw))

    def run(self) -> None:
        m = self.manager
        n = self.per_thread

        def add(w: int) -> list[Callable[[], Any]]:
            def one(i: int) -> Callable[[], None]:
                def call() -> None:
                    task = m.add_task(NS, f"w{w}-{i:05d}", b"{}", nodes=NODES)
                    (self.tasks if i % 2 == 0 else self.cancel_tasks)[w].append(task)

                return call

            return [one(i) for i in range(2 * n)]

        def complete(node: str, op: str) -> Callable[[int], list[Callable[[], Any]]]:
            def work(w: int) -> list[Callable[[], Any]]:
                return [
                    lambda task=task: m.record_node_completion(NS, task.id, task.version, node)
                    for task in self.tasks[w]
                ]

            work.__name__ = op
            return work

        def cancel(w: int) -> list[Callable[[], Any]]:
            return [
                lambda task=task: m.cancel_task(NS, task.id, task.version)
                for task in self.cancel_tasks[w]
            ]

        def listing(w: int) -> list[Callable[[], Any]]:
            return [m.list_tasks for _ in range(self.lists)]

        self.phase("add", add)
        self.phase("complete", complete("n1", "complete"))
        self.phase("cancel", cancel)
        self.phase("complete", complete("n2", "complete"))
        self.phase("complete, last node", complete("n3", "complete, last node"))
        self.phase("list", listing)


def run(env: Env) -> CaseResult:
    modes = [  # label, threads, tasks per thread (x2), lists per thread, chunk per thread
        ("sequential", 1, env.size(150, 25), env.size(40, 8), 10),
        ("8 threads", 8, env.size(30, 5), env.size(8, 2), 3),
    ]
    rows: list[Row] = []
    data: dict[str, Any] = {}
    for label, threads, per_thread, lists, chunk in modes:
        say(f"throughput: {label}, {threads * per_thread * 2} tasks, ours then raw by chunks")
        run_ = _Run(env, threads, per_thread, lists, chunk)
        try:
            run_.run()
        finally:
            run_.close()
        tasks = threads * per_thread * 2
        for op, chunks in run_.chunks.items():
            name = op if op != "list" else f"list ({tasks} tasks)"
            single = op in SINGLE
            measured = median([ours for ours, _ in chunks])
            baseline = median([raw for _, raw in chunks])
            rows.append(
                Row(
                    f"{name}, {label}",
                    measured,
                    baseline,
                    "ops/s",
                    "raw etcd3gw, same requests",
                    f">= {FACTOR}x raw" if single else "",
                    measured >= FACTOR * baseline if single else None,
                )
            )
            data.setdefault(label, {})[op] = {
                "ours": measured,
                "raw": baseline,
                "chunks": len(chunks),
            }
    worst = min((row for row in rows if row.met is not None), key=lambda row: row.ratio or 0)
    rows.insert(
        0,
        Row(
            f"lowest ratio: {worst.name}",
            worst.measured,
            worst.baseline,
            worst.unit,
            worst.baseline_name,
            worst.goal,
            worst.met,
        ),
    )
    return CaseResult(KEY, TITLE, GOAL, rows, rows[0].name, data)
