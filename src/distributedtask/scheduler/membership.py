"""Membership and node loss.

**Membership.** A Scheduler registers its node with a lease-bound record
``P/cluster/members/<node>`` naming the namespaces it serves; a
:class:`~distributedtask.etcd.lease.LeaseKeeper` thread keeps the lease alive and registers again
when it is lost. Every Scheduler sees every member through its watch of ``P/cluster/``.

**Deciders.** Work done *for* the cluster — removing a run after its TTL, failing the runs a
lost node leaves behind — is done by the first three live members by node id (every node
computes the same three from the same members), not by every node: at a thousand nodes that is
three attempts instead of a thousand. A node that is not a decider does nothing for it; when
deciders change, the new ones pick the work up from their own view.

**Node loss** (:class:`NodeLoss`, deciders only). A decider knows the nodes of each STARTED
run — from its record for a small run, else by reading ``P/nodes`` once — and so which nodes
the cluster waits for. A node it waits for that has no membership starts a grace period
(``node_loss_grace``); when the grace ends and the node is still missing, the decider reads
that node's completion keys for the runs that name it — a read of the lost node's own work,
not of every node's — and fails each run it has not completed, with ``failed_node`` set to it
and the error ``"node lost: ..."``. A run it had completed while the cluster still shows it
STARTED is one whose finishing write was lost with its completer: the decider finishes it
(``Manager.finish_if_complete``). PAUSED runs are not awaited: their grace starts at resume.

A unit task does not wait for a node but for its units: a lost node's IN_PROGRESS units go back
to the pool (not an attempt: ``distributedtask_units_reassigned_total``), and the run fails
only when a unit with affinity to the lost node is not COMPLETED (no other node may take it).

Threading: the Scheduler calls :class:`NodeLoss` under its lock (pure bookkeeping) except
:meth:`NodeLoss.act`, which talks to etcd and runs on the worker thread without the lock.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..exceptions import (
    CorruptRecordError,
    InvalidTaskError,
    TaskNotFoundError,
    TaskNotRunningError,
)
from ..manager import Manager
from ..metrics import Metrics
from ..model import TaskStatus
from .view import ClusterView, ViewRun

__all__ = ["NodeLoss"]

TaskId = tuple[str, str]
RunKey = tuple[str, str, int]


def _key(run: ViewRun) -> RunKey:
    return (run.namespace, run.task_id, run.version)


@dataclass
class NodeLoss:
    """The node-loss bookkeeping of one decider (see the module doc). Incremental: a watch
    response costs what it touched, not a walk of every run."""

    grace: float | None  # seconds; None: wait forever
    node_lists: dict[RunKey, frozenset[str]] = field(default_factory=dict)
    awaited: Counter[str] = field(default_factory=Counter)  # node -> STARTED runs naming it
    lost_since: dict[str, float] = field(default_factory=dict)
    unknown: set[RunKey] = field(default_factory=set)  # STARTED runs whose list is not read
    started: bool = False  # whether it has taken in every run since it became a decider
    _by_id: dict[TaskId, RunKey] = field(default_factory=dict)
    _members_seen: int | None = None  # the view's members_version at the last look
    _stale: bool = True  # the awaited nodes changed since the last look

    def reset(self) -> None:
        """Forget everything (this node stopped being a decider)."""
        self.node_lists.clear()
        self.awaited.clear()
        self.lost_since.clear()
        self.unknown.clear()
        self._by_id.clear()
        self.started = False
        self._members_seen = None
        self._stale = True

    def note(self, view: ClusterView, touched: Iterable[TaskId]) -> None:
        """Take in what a watch response touched: new STARTED runs are to be read, runs that
        ended, were paused or replaced are no longer awaited."""
        for task_id in touched:
            run = view.run(task_id)
            key = None if run is None or run.status is not TaskStatus.STARTED else _key(run)
            known = self._by_id.get(task_id)
            if known is not None and known != key:
                self._forget(task_id, known)
            if key is not None and key not in self.node_lists:
                self._by_id[task_id] = key
                self.unknown.add(key)
                assert run is not None
                if run.record.nodes is not None:  # a small run: its record names its nodes
                    self.store_lists({key: run.record.nodes}, [key])

    def note_all(self, view: ClusterView) -> None:
        """Take in every run (on becoming a decider)."""
        self.note(view, list(view.records))
        self.started = True

    def _forget(self, task_id: TaskId, key: RunKey) -> None:
        del self._by_id[task_id]
        self.unknown.discard(key)
        for node in self.node_lists.pop(key, frozenset()):
            self.awaited[node] -= 1
            if self.awaited[node] <= 0:
                del self.awaited[node]
                self._stale = True  # a node no longer awaited: its grace ends (and restarts)

    def store_lists(self, lists: dict[RunKey, frozenset[str]], asked: Iterable[RunKey]) -> None:
        """Keep read node lists; a run asked for but not found gets an empty list (gone)."""
        for run in asked:
            if run not in self.unknown:
                continue  # it ended or was replaced while its list was being read
            self.unknown.discard(run)
            nodes = lists.get(run, frozenset())
            self.node_lists[run] = nodes
            self.awaited.update(nodes)
            self._stale = True

    def update(self, view: ClusterView, now: float) -> list[str]:
        """Note awaited nodes that have no membership (when the members or the awaited
        nodes changed since the last look); returns the nodes newly found missing (the
        caller arms their grace timers)."""
        if self.grace is None:
            return []
        if not self._stale and self._members_seen == view.members_version:
            return []
        self._members_seen, self._stale = view.members_version, False
        for node in list(self.lost_since):
            if node in view.members or node not in self.awaited:
                del self.lost_since[node]
        fresh = sorted(
            node
            for node in self.awaited
            if node not in view.members and node not in self.lost_since
        )
        for node in fresh:
            self.lost_since[node] = now
        return fresh

    def due(self, node: str, now: float) -> float | None:
        """Seconds left of ``node``'s grace (<= 0: act now); None when it is back or no longer
        awaited."""
        since = self.lost_since.get(node)
        if since is None or self.grace is None:
            return None
        return since + self.grace - now

    def victims(self, node: str) -> list[RunKey]:
        """The STARTED runs that name ``node``."""
        return sorted(run for run, nodes in self.node_lists.items() if node in nodes)

    @staticmethod
    def act(
        manager: Manager,
        node: str,
        runs: list[RunKey],
        *,
        grace: float,
        metrics: Metrics,
        log: logging.Logger,
    ) -> None:
        """Fail ``runs`` that ``node`` has not completed; finish those it completed whose
        finishing write was lost. Raises :class:`EtcdError` (the caller retries)."""
        completed = manager.completed_by(node, runs)
        error = f"node lost: no membership for {grace:g}s"
        for namespace, task_id, version in runs:
            try:
                unit_task = manager.known_run(namespace, task_id, version).decl is not None
            except (TaskNotFoundError, CorruptRecordError):
                continue
            if unit_task:
                NodeLoss._release_units(
                    manager, node, (namespace, task_id, version), error, metrics=metrics, log=log
                )
                continue
            if (namespace, task_id, version) in completed:
                if manager.finish_if_complete(namespace, task_id, version) is not None:
                    log.warning(
                        "finished %s/%s v%d: every node had completed", namespace, task_id, version
                    )
                continue
            try:
                manager.fail(namespace, task_id, version, node, error)
            except (TaskNotFoundError, TaskNotRunningError, InvalidTaskError):
                continue  # ended meanwhile, or another decider did it
            metrics.node_loss_failures.labels(namespace=namespace).inc()
            log.warning("failed %s/%s v%d: %s: %s", namespace, task_id, version, node, error)

    @staticmethod
    def _release_units(
        manager: Manager,
        node: str,
        run: RunKey,
        error: str,
        *,
        metrics: Metrics,
        log: logging.Logger,
    ) -> None:
        """Give a lost node's units of a unit run back; fail the run if one of its units has
        affinity to that node and is not COMPLETED. Raises :class:`EtcdError`."""
        released, stuck = manager.units.release_node(*run, node)
        if released:
            metrics.units_reassigned.labels(namespace=run[0]).inc(released)
            log.warning(
                "gave back %d unit(s) of %s/%s v%d held by lost node %s", released, *run, node
            )
        if stuck is None:
            return
        try:
            manager.fail(*run, node, f"{error}; unit {stuck!r} can run only there")
        except (TaskNotFoundError, TaskNotRunningError, InvalidTaskError):
            return
        metrics.node_loss_failures.labels(namespace=run[0]).inc()
        log.warning("failed %s/%s v%d: %s: unit %r had affinity to it", *run, node, stuck)
