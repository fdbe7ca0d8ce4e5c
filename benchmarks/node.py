"""Nodes of the propagation and fan-out cases, in a process of their own, as in a real cluster.

``python -m benchmarks.node MODE --endpoint URL --prefix P --node ID[,ID...] [--tick S]
[--member-ttl S]`` where MODE is ``scheduler`` (our Scheduler), ``poll`` (the polling baseline)
or ``raw`` (a raw streaming watch of the prefix). Each id is one node (its own client, provider
and, for a Scheduler, its own CollectorRegistry), all in this process; the propagation case
runs one node a process, the fan-out case many. It prints ``ready`` once every node follows
etcd, then one line per observation, ``kind<TAB>key<TAB>node<TAB>perf_counter`` (kinds
``start``, ``stop``, ``raw``), and stops its nodes when its stdin closes. ``perf_counter`` is
CLOCK_MONOTONIC on Linux, so the parent compares these times with its own.
:class:`NodeProcess` is the parent's side.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from benchmarks.baselines import PollingScheduler, RawWatcher, StampBook, StampProvider
from benchmarks.common import NS

ROOT = Path(__file__).resolve().parent.parent


class _PrintSink:
    def __init__(self) -> None:
        self._lock = threading.Lock()

    def stamp(self, kind: str, key: str, who: str) -> None:
        now = time.perf_counter()
        with self._lock:
            sys.stdout.write(f"{kind}\t{key}\t{who}\t{now!r}\n")
            sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("scheduler", "poll", "raw"))
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--node", required=True, help="a node id, or several, comma-separated")
    parser.add_argument("--tick", type=float, default=1.0)
    parser.add_argument("--member-ttl", type=float, default=10.0)
    args = parser.parse_args()
    sink = _PrintSink()
    runners: list[Any] = []
    try:
        for node in args.node.split(","):
            runners.append(_runner(args, node, sink))
            runners[-1].start()
        print("ready", flush=True)
        sys.stdin.read()  # until the parent closes it
    finally:
        for runner in reversed(runners):
            if not isinstance(runner, RawWatcher):  # its daemon thread ends with the process
                runner.stop()


def _runner(args: argparse.Namespace, node: str, sink: _PrintSink) -> Any:
    """One node: a RawWatcher, a Scheduler or a PollingScheduler, not started yet."""
    if args.mode == "raw":
        return RawWatcher(args.endpoint, args.prefix.encode(), sink, node)
    from prometheus_client import CollectorRegistry

    from distributedtask import EtcdClient, Manager, Scheduler

    manager = Manager(EtcdClient(args.endpoint, timeout=10.0), prefix=args.prefix)
    provider = StampProvider(node, sink)
    if args.mode == "poll":
        return PollingScheduler(manager, node_id=node, providers={NS: provider}, tick=args.tick)
    return Scheduler(
        manager,
        node_id=node,
        providers={NS: provider},
        registry=CollectorRegistry(),
        member_ttl=timedelta(seconds=args.member_ttl),
    )


class NodeProcess:
    """Runs ``python -m benchmarks.node`` and feeds what it prints into ``book``."""

    def __init__(
        self,
        mode: str,
        *,
        endpoint: str,
        prefix: str,
        node: str,
        book: StampBook,
        tick: float = 1.0,
        member_ttl: float = 10.0,
    ) -> None:
        self.node = node
        self.mode = mode
        self._book = book
        self._ready = threading.Event()
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.node",
                mode,
                "--endpoint",
                endpoint,
                "--prefix",
                prefix,
                "--node",
                node,
                "--tick",
                str(tick),
                "--member-ttl",
                str(member_ttl),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"node-{node}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw_line in self._proc.stdout:
            line = raw_line.rstrip("\n")
            if line == "ready":
                self._ready.set()
                continue
            kind, key, who, at = line.split("\t")
            self._book.stamp(kind, key, who, float(at))
        self._ready.set()

    def cpu_seconds(self) -> float:
        """User + system CPU the process has used so far (``/proc/<pid>/stat``)."""
        fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_ready(self, timeout: float = 30.0) -> None:
        if not self._ready.wait(timeout) or self._proc.poll() is not None:
            raise RuntimeError(f"node {self.node} did not start (exit {self._proc.poll()})")

    def release(self) -> None:
        """Tell the process to stop its nodes and exit (close its stdin); :meth:`stop` waits."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()

    def stop(self, timeout: float = 15.0) -> None:
        self.release()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(2)


def stop_all(nodes: Sequence[NodeProcess], timeout: float = 15.0) -> None:
    """Stop every process of ``nodes`` at once (each stops its nodes meanwhile) and wait."""
    for node in nodes:
        node.release()
    for node in nodes:
        node.stop(timeout)


if __name__ == "__main__":
    main()
