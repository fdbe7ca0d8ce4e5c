"""``ClusterView``: what one Scheduler knows of the cluster, built only from its watches.

A Scheduler follows two ranges (keys.py): ``P/cluster/`` — task records, outcomes, run states,
members, and for unit tasks the pool of units given back and the marks of completed groups —
and ``P/assign/<its bucket>/`` — which runs name which nodes of its bucket. The view applies
the batches of both watches (a :class:`~distributedtask.etcd.watch.Snapshot` replaces what
that watch had told, :class:`~distributedtask.etcd.watch.Changes` apply in order) and answers
the questions the Scheduler asks: which runs exist, their status, whether this node is one of
a run's nodes, who is a live member.

An assignment belongs to the current run of its id when it was written in the same
transaction as the record (equal ``mod_revision``); the two watches deliver independently, so
for a moment a record may be known without its assignment or the other way round: the view
then says "not assigned here", and the late half marks the run touched again.

Pure and single-threaded: the Scheduler calls it under its lock. Unreadable values are
reported to ``on_skip`` and treated as absent.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ..etcd import txn as t
from ..etcd.watch import Changes, Snapshot
from ..exceptions import CorruptRecordError
from ..keys import AssignKey, GroupKey, Keys, MemberKey, OutcomeKey, PoolKey, StateKey, TaskKey
from ..model import FrozenMap, Task, TaskStatus
from ..readmodel import Attempts, build_task, status_of
from ..records import (
    GroupMark,
    MemberRecord,
    NodeList,
    OutcomeRecord,
    PoolEntry,
    RunState,
    TaskRecord,
)
from ..units import PoolItem

__all__ = ["ClusterView", "ViewRun"]

TaskId = tuple[str, str]
SkipHandler = Callable[[bytes, Exception], None]


@dataclass(frozen=True)
class ViewRun:
    """The current run of an id as this node sees it; ``assigned`` are the nodes that must run
    it that this node knows of — all of them for a run small enough to carry them in its
    record, else those of this node's bucket (empty when none, or not known yet); ``state`` its run
    state (paused or not) and ``state_revision`` that key's ``mod_revision`` (0: none)."""

    namespace: str
    task_id: str
    version: int
    record: TaskRecord
    outcome: OutcomeRecord | None
    assigned: frozenset[str]
    state: RunState | None = None
    state_revision: int = 0

    @property
    def status(self) -> TaskStatus:
        return status_of(self.outcome, self.state)

    def task(self, attempts: Mapping[str, tuple[int, str]] | None = None) -> Task:
        """The run as handed to a provider: ``nodes`` are :attr:`assigned` (every node of a
        small run; of a large one, those of this node's bucket: the full list is
        ``Manager.get_task``'s), ``finished_nodes`` empty, ``attempts`` and
        ``last_errors`` what this node knows: its own."""
        items = [(node, count, error) for node, (count, error) in (attempts or {}).items()]
        return build_task(
            self.namespace,
            self.task_id,
            self.record,
            self.version,
            self.assigned,
            (),
            self.outcome,
            self.state,
            Attempts.of(items) if items else Attempts(FrozenMap(), FrozenMap()),
        )


@dataclass
class _Record:
    mod_revision: int
    record: TaskRecord


@dataclass
class ClusterView:
    """Records, outcomes, this bucket's assignments and members, from the two watches."""

    keys: Keys
    on_skip: SkipHandler
    records: dict[TaskId, _Record] = field(default_factory=dict)
    outcomes: dict[TaskId, OutcomeRecord] = field(default_factory=dict)
    states: dict[TaskId, tuple[int, RunState]] = field(default_factory=dict)
    assignments: dict[TaskId, tuple[int, frozenset[str]]] = field(default_factory=dict)
    members: dict[str, MemberRecord] = field(default_factory=dict)
    pools: dict[TaskId, dict[str, PoolItem]] = field(default_factory=dict)
    """Units given back to the pool, by run id and unit id."""
    groups: dict[TaskId, dict[str, GroupMark]] = field(default_factory=dict)
    """Groups whose units are all COMPLETED, by run id and group."""
    members_version: int = 0
    """Bumped at every change of ``members``."""
    _deciders: tuple[tuple[int, int], list[str]] | None = None
    born: dict[TaskId, int] = field(default_factory=dict)
    """Runs (id -> version) created after the cluster snapshot: nothing of theirs predates
    this view."""

    # ---- applying watch batches -----------------------------------------------------------

    def apply_cluster(self, batch: Snapshot | Changes) -> set[TaskId]:
        """Apply a batch of the ``P/cluster/`` watch; returns the ids it touched."""
        touched: set[TaskId] = set()
        if isinstance(batch, Snapshot):
            touched = (
                set(self.records)
                | set(self.outcomes)
                | set(self.states)
                | set(self.pools)
                | set(self.groups)
            )
            self.records.clear()
            self.outcomes.clear()
            self.states.clear()
            self.pools.clear()
            self.groups.clear()
            self.members.clear()
            self.members_version += 1
            self.born.clear()
            for kv in batch.kvs:
                touched |= self._apply(kv, deleted=False, live=False)
        else:
            for event in batch.events:
                touched |= self._apply(event.kv, deleted=event.kind == "delete", live=True)
        return touched

    def apply_bucket(self, batch: Snapshot | Changes) -> set[TaskId]:
        """Apply a batch of this node's ``P/assign/<bucket>/`` watch; returns touched ids."""
        touched: set[TaskId] = set()
        if isinstance(batch, Snapshot):
            touched = set(self.assignments)
            self.assignments.clear()
            items: Iterable[tuple[bool, t.KeyValue]] = ((False, kv) for kv in batch.kvs)
        else:
            items = ((event.kind == "delete", event.kv) for event in batch.events)
        for deleted, kv in items:
            parsed = self.keys.parse(kv.key)
            if not isinstance(parsed, AssignKey):
                self.on_skip(kv.key, CorruptRecordError("not a key of ours"))
                continue
            task_id = (parsed.namespace, parsed.task_id)
            touched.add(task_id)
            if deleted:
                self.assignments.pop(task_id, None)
                continue
            try:
                nodes = NodeList.decode(kv.value).nodes
            except CorruptRecordError as exc:
                self.on_skip(kv.key, exc)
                self.assignments.pop(task_id, None)
                continue
            self.assignments[task_id] = (kv.mod_revision, nodes)
        return touched

    def _apply(self, kv: t.KeyValue, *, deleted: bool, live: bool) -> set[TaskId]:
        parsed = self.keys.parse(kv.key)
        if isinstance(parsed, MemberKey):
            self.members_version += 1
            self.members.pop(parsed.node_id, None)
            if not deleted:
                try:
                    member = MemberRecord.decode(kv.value)
                    if member.node_id != parsed.node_id:
                        raise CorruptRecordError("a member record under another node's key")
                    self.members[parsed.node_id] = member
                except CorruptRecordError as exc:
                    self.on_skip(kv.key, exc)
            return set()
        if isinstance(parsed, StateKey):
            task_id = (parsed.namespace, parsed.task_id)
            self.states.pop(task_id, None)
            if not deleted:
                try:
                    self.states[task_id] = (kv.mod_revision, RunState.decode(kv.value))
                except CorruptRecordError as exc:
                    self.on_skip(kv.key, exc)
            return {task_id}
        if isinstance(parsed, (PoolKey, GroupKey)):
            return self._apply_unit_key(parsed, kv, deleted=deleted)
        if not isinstance(parsed, (TaskKey, OutcomeKey)):
            self.on_skip(kv.key, CorruptRecordError("not a key of ours"))
            return set()
        task_id = (parsed.namespace, parsed.task_id)
        target: dict[TaskId, _Record] | dict[TaskId, OutcomeRecord]
        target = self.records if isinstance(parsed, TaskKey) else self.outcomes
        target.pop(task_id, None)
        if isinstance(parsed, TaskKey):
            self.born.pop(task_id, None)
        if deleted:
            return {task_id}
        try:
            if isinstance(parsed, TaskKey):
                record = TaskRecord.decode(kv.value)
                self.records[task_id] = _Record(kv.mod_revision, record)
                if live:
                    self.born[task_id] = record.version_at(kv.mod_revision)
            else:
                self.outcomes[task_id] = OutcomeRecord.decode(kv.value)
        except CorruptRecordError as exc:
            self.on_skip(kv.key, exc)
        return {task_id}

    def _apply_unit_key(
        self, parsed: PoolKey | GroupKey, kv: t.KeyValue, *, deleted: bool
    ) -> set[TaskId]:
        task_id = (parsed.namespace, parsed.task_id)
        if isinstance(parsed, PoolKey):
            pool = self.pools.setdefault(task_id, {})
            pool.pop(parsed.unit_id, None)
            if not deleted:
                try:
                    entry = PoolEntry.decode(kv.value)
                    pool[parsed.unit_id] = PoolItem(parsed.unit_id, entry, kv.mod_revision)
                except CorruptRecordError as exc:
                    self.on_skip(kv.key, exc)
            if not pool:
                del self.pools[task_id]
            return {task_id}
        marks = self.groups.setdefault(task_id, {})
        marks.pop(parsed.group, None)
        if not deleted:
            try:
                marks[parsed.group] = GroupMark.decode(kv.value)
            except CorruptRecordError as exc:
                self.on_skip(kv.key, exc)
        if not marks:
            del self.groups[task_id]
        return {task_id}

    # ---- questions ------------------------------------------------------------------------

    def pool(self, task_id: TaskId, version: int) -> list[PoolItem]:
        """The units of run ``version`` of ``task_id`` in the pool."""
        items = self.pools.get(task_id, {}).values()
        return [item for item in items if item.entry.version == version]

    def completed_groups(self, task_id: TaskId, version: int) -> set[str]:
        """The groups of run ``version`` of ``task_id`` whose units are all COMPLETED."""
        marks = self.groups.get(task_id, {})
        return {group for group, mark in marks.items() if mark.version == version}

    def run(self, task_id: TaskId) -> ViewRun | None:
        """The current run of ``task_id``, or None."""
        stored = self.records.get(task_id)
        if stored is None:
            return None
        assigned: frozenset[str] = frozenset()
        if stored.record.nodes is not None:
            assigned = stored.record.nodes  # a small run: every node, in its record
        else:
            assignment = self.assignments.get(task_id)
            if assignment is not None and assignment[0] == stored.mod_revision:
                assigned = assignment[1]
        state_revision, state = self.states.get(task_id, (0, None))
        return ViewRun(
            task_id[0],
            task_id[1],
            stored.record.version_at(stored.mod_revision),
            stored.record,
            self.outcomes.get(task_id),
            assigned,
            state,
            state_revision,
        )

    def runs(self) -> list[ViewRun]:
        """Every current run."""
        return [run for task_id in self.records if (run := self.run(task_id)) is not None]

    def started(self) -> list[ViewRun]:
        """Every STARTED run (not PAUSED, not ended)."""
        return [run for run in self.runs() if run.status is TaskStatus.STARTED]

    def deciders(self, count: int = 3) -> list[str]:
        """The live members that act for the cluster (TTL clean-up, node loss): the first
        ``count`` by node id, the same on every node that sees the same members."""
        cached = self._deciders
        if cached is None or cached[0] != (self.members_version, count):
            cached = self._deciders = (
                (self.members_version, count),
                heapq.nsmallest(count, self.members),
            )
        return list(cached[1])
