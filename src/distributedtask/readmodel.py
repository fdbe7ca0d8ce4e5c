"""The read model: how the keys of a run become a :class:`~distributedtask.model.Task`.

One place for the rules every reader shares — the Manager, the Scheduler, ``dtask`` and
``wait``:

- A run is its task record (``P/cluster/tasks``), its node list (``P/nodes``), the completions
  its nodes wrote (``P/done``), its nodes' failed attempts (``P/attempts``), its run state
  (``P/cluster/states``, once paused) and, once it ended, its outcome (``P/cluster/outcomes``).
- **The STARTED rule:** a run whose record exists and whose outcome does not is STARTED, or
  PAUSED while its run state says so; with an outcome, its status is the outcome's. Its
  version is the record's ``mod_revision`` (the record is never rewritten while the run
  exists), or the version stored in a restored terminal record.
- ``finished_nodes`` are the nodes with a completion key, within ``nodes``; ``attempts`` of a
  node is the etcd version of its attempt key (one write per failed attempt), ``last_errors``
  that key's message.
- A unit task's record counts its units; their declaration is ``P/units/decl`` (``Task.units``),
  and a unit task has no ``finished_nodes``: its units are what completes.
- The layout marker (``P/format``) must be ours; without one, keys of the 0.1 layout under the
  prefix mean another layout (:class:`~distributedtask.exceptions.StorageFormatError`).

Readers that scan (listing, scheduling) skip values they cannot read, through an ``on_skip``
callback; readers of one run raise :class:`~distributedtask.exceptions.CorruptRecordError`.
Pure functions over already-read key-values, plus the read operations to send; thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .etcd import txn as t
from .exceptions import CorruptRecordError, StorageFormatError
from .keys import (
    AttemptKey,
    DoneKey,
    Keys,
    NodesKey,
    OutcomeKey,
    StateKey,
    TaskKey,
    UnitDeclKey,
)
from .model import FrozenMap, Task, TaskStatus
from .records import (
    FORMAT_MARKER,
    FORMAT_VERSION,
    AttemptRecord,
    NodeList,
    OutcomeRecord,
    RunState,
    TaskRecord,
    UnitDecl,
    decode_format,
)

__all__ = ["ReadModel", "Run", "SkipHandler", "status_of"]

SkipHandler = Callable[[bytes, Exception], None]
TaskId = tuple[str, str]


def status_of(outcome: OutcomeRecord | None, state: RunState | None = None) -> TaskStatus:
    """The STARTED rule: with an outcome, its status; else PAUSED while the run state says
    so; else STARTED."""
    if outcome is not None:
        return outcome.status
    if state is not None and state.paused_since is not None:
        return TaskStatus.PAUSED
    return TaskStatus.STARTED


@dataclass(frozen=True)
class Attempts:
    """The failed attempts of a run's nodes: counts and latest messages."""

    counts: FrozenMap[int] = field(default_factory=FrozenMap)
    errors: FrozenMap[str] = field(default_factory=FrozenMap)

    @classmethod
    def of(cls, items: Iterable[tuple[str, int, str]]) -> Attempts:
        """From ``(node, attempts, error)`` triples."""
        listed = list(items)
        return cls(
            FrozenMap((node, count) for node, count, _ in listed),
            FrozenMap((node, error) for node, _, error in listed),
        )


NO_ATTEMPTS = Attempts()


def build_task(
    namespace: str,
    task_id: str,
    record: TaskRecord,
    mod_revision: int,
    nodes: frozenset[str],
    finished: Iterable[str],
    outcome: OutcomeRecord | None,
    state: RunState | None = None,
    attempts: Attempts = NO_ATTEMPTS,
    decl: UnitDecl | None = None,
) -> Task:
    """A :class:`Task` from its decoded parts (see the module doc for the rules)."""
    return Task(
        namespace=namespace,
        id=task_id,
        version=record.version_at(mod_revision),
        payload=record.payload,
        status=status_of(outcome, state),
        started_at=record.started_at,
        finished_at=None if outcome is None else outcome.finished_at,
        error=None if outcome is None else outcome.error,
        nodes=nodes,
        finished_nodes=frozenset(finished) & nodes,
        failed_node=None if outcome is None else outcome.node,
        policy=record.policy,
        attempts=attempts.counts,
        last_errors=attempts.errors,
        units=() if decl is None else decl.units,
        failed_unit=None if outcome is None else outcome.unit,
    )


@dataclass(frozen=True)
class Run:
    """One run as read: its record key-value and decoded parts, and the resulting task."""

    record_kv: t.KeyValue
    record: TaskRecord
    outcome_kv: t.KeyValue | None
    outcome: OutcomeRecord | None
    state_kv: t.KeyValue | None
    state: RunState | None
    task: Task
    decl: UnitDecl | None = None


class ReadModel:
    """The read operations of one prefix and the assembly of their results."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    # ---- the layout marker ----------------------------------------------------------------

    def format_ops(self) -> list[t.Op]:
        """Reads that tell the layout: the marker, and whether 0.1's keys are there."""
        return [
            t.get(self.keys.format),
            *(t.get_prefix(legacy, count_only=True) for legacy in self.keys.legacy),
        ]

    def check_format(self, result: t.TxnResult, at: int) -> bool:
        """Check the reads of :meth:`format_ops` placed at ``at``: True when the marker is ours,
        False when there is none and nothing of another layout. Raises
        :class:`StorageFormatError` otherwise."""
        marker = result.range(at).first()
        if marker is not None:
            if marker.value == FORMAT_MARKER:
                return True
            layout = decode_format(marker.value)
            if layout is None or layout <= FORMAT_VERSION:  # not a marker any version writes
                shown = marker.value[:80].decode("utf-8", "replace")
                raise StorageFormatError(self.keys.prefix, f"marker {shown!r}", FORMAT_VERSION)
            raise StorageFormatError(self.keys.prefix, layout, FORMAT_VERSION)
        if any(result.range(at + 1 + i).count for i in range(len(self.keys.legacy))):
            raise StorageFormatError(self.keys.prefix, 1, FORMAT_VERSION)
        return False

    # ---- one run --------------------------------------------------------------------------

    def run_ops(self, namespace: str, task_id: str) -> list[t.Op]:
        """``[record, outcome, node list, completions (keys only), state, attempts, unit
        declaration]`` of one id."""
        return [
            t.get(self.keys.task(namespace, task_id)),
            t.get(self.keys.outcome(namespace, task_id)),
            t.get(self.keys.nodes(namespace, task_id)),
            t.get_prefix(self.keys.task_done(namespace, task_id), keys_only=True),
            t.get(self.keys.state(namespace, task_id)),
            t.get_prefix(self.keys.task_attempts(namespace, task_id)),
            t.get(self.keys.unit_decl(namespace, task_id)),
        ]

    RUN_OPS = 7
    """How many operations :meth:`run_ops` returns."""

    def run_from(
        self, namespace: str, task_id: str, result: t.TxnResult, at: int = 0
    ) -> Run | None:
        """The run read by :meth:`run_ops` at ``at`` of a transaction's responses, or None.

        Raises :class:`CorruptRecordError` when its record, outcome or node list is unreadable.
        """
        record_kv = result.range(at).first()
        if record_kv is None:
            return None
        outcome_kv = result.range(at + 1).first()
        nodes_kv = result.range(at + 2).first()
        finished = self.done_nodes(
            result.range(at + 3).kvs, self.keys.task_done(namespace, task_id)
        )
        state_kv = result.range(at + 4).first()
        attempts = self.attempts_from(result.range(at + 5).kvs)
        decl_kv = result.range(at + 6).first()
        return self.assemble(
            namespace,
            task_id,
            record_kv,
            outcome_kv,
            nodes_kv,
            finished,
            state_kv,
            attempts,
            decl_kv,
        )

    def assemble(
        self,
        namespace: str,
        task_id: str,
        record_kv: t.KeyValue,
        outcome_kv: t.KeyValue | None,
        nodes_kv: t.KeyValue | None,
        finished: Iterable[str],
        state_kv: t.KeyValue | None = None,
        attempts: Attempts = NO_ATTEMPTS,
        decl_kv: t.KeyValue | None = None,
    ) -> Run:
        """Decode a run from its key-values. Raises :class:`CorruptRecordError`."""
        record = TaskRecord.decode(record_kv.value)
        decl = None
        if record.unit_count:
            if decl_kv is None:
                raise CorruptRecordError("a unit task without its declaration", record_kv.key)
            decl = UnitDecl.decode(decl_kv.value)
            if len(decl.units) != record.unit_count:
                raise CorruptRecordError(
                    "a declaration that does not match its record", decl_kv.key
                )
            finished = ()
        outcome = None if outcome_kv is None else OutcomeRecord.decode(outcome_kv.value)
        state = None if state_kv is None else RunState.decode(state_kv.value)
        if record.nodes is not None:
            nodes = record.nodes
        elif nodes_kv is None:
            raise CorruptRecordError("a task record without its node list", record_kv.key)
        else:
            nodes = NodeList.decode(nodes_kv.value).nodes
            if len(nodes) != record.node_count:
                raise CorruptRecordError("a node list that does not match its record", nodes_kv.key)
        task = build_task(
            namespace,
            task_id,
            record,
            record_kv.mod_revision,
            nodes,
            finished,
            outcome,
            state,
            attempts,
            decl,
        )
        return Run(record_kv, record, outcome_kv, outcome, state_kv, state, task, decl)

    def attempts_from(self, kvs: Iterable[t.KeyValue]) -> Attempts:
        """The attempts of the attempt key-values of one run (others ignored). Raises
        :class:`CorruptRecordError` for an unreadable one."""
        items = []
        for kv in kvs:
            parsed = self.keys.parse(kv.key)
            if isinstance(parsed, AttemptKey):
                attempt = AttemptRecord.decode(kv.value)
                items.append((parsed.node_id, kv.version, attempt.error))
        return Attempts.of(items)

    def done_nodes(self, kvs: Iterable[t.KeyValue], prefix: bytes | None = None) -> set[str]:
        """The node ids named by completion keys (other keys are ignored); with the run's
        ``prefix`` (``keys.task_done``), read from the last segment alone — what a completion
        does for every key of its run."""
        out = set()
        for kv in kvs:
            if prefix is not None:
                node = Keys.name_under(prefix, kv.key)
                if node is not None:
                    out.add(node)
                continue
            parsed = self.keys.parse(kv.key)
            if isinstance(parsed, DoneKey):
                out.add(parsed.node_id)
        return out

    # ---- every run ------------------------------------------------------------------------

    def list_ops(self) -> list[t.Op]:
        """Reads of every run: records, outcomes, node lists, completions (keys only)."""
        keys = self.keys
        return [
            t.get_prefix(keys.all_tasks()),
            t.get_prefix(keys.all_outcomes()),
            t.get_prefix(keys.all_nodes()),
            t.get_prefix(keys.all_done(), keys_only=True),
            t.get_prefix(keys.all_states()),
            t.get_prefix(keys.all_attempts()),
            t.get_prefix(keys.all_unit_decls()),
        ]

    def tasks_from(
        self, result: t.TxnResult, at: int, on_skip: SkipHandler
    ) -> dict[str, list[Task]]:
        """Every task read by :meth:`list_ops` at ``at``, by namespace, sorted by id.
        Unreadable values go to ``on_skip`` and their run is left out."""
        kvs = [kv for i in range(7) for kv in result.range(at + i).kvs]
        return self.tasks_from_kvs(kvs, on_skip)

    def tasks_from_kvs(
        self, kvs: Iterable[t.KeyValue], on_skip: SkipHandler
    ) -> dict[str, list[Task]]:
        """Assemble tasks from any mix of record, outcome, node-list and completion keys."""
        records: dict[TaskId, t.KeyValue] = {}
        outcomes: dict[TaskId, t.KeyValue] = {}
        node_lists: dict[TaskId, t.KeyValue] = {}
        done: dict[TaskId, set[str]] = {}
        states: dict[TaskId, t.KeyValue] = {}
        attempts: dict[TaskId, list[t.KeyValue]] = {}
        decls: dict[TaskId, t.KeyValue] = {}
        parse = self.keys.parse
        for kv in kvs:
            parsed = parse(kv.key)
            if isinstance(parsed, TaskKey):
                records[(parsed.namespace, parsed.task_id)] = kv
            elif isinstance(parsed, OutcomeKey):
                outcomes[(parsed.namespace, parsed.task_id)] = kv
            elif isinstance(parsed, NodesKey):
                node_lists[(parsed.namespace, parsed.task_id)] = kv
            elif isinstance(parsed, DoneKey):
                done.setdefault((parsed.namespace, parsed.task_id), set()).add(parsed.node_id)
            elif isinstance(parsed, StateKey):
                states[(parsed.namespace, parsed.task_id)] = kv
            elif isinstance(parsed, AttemptKey):
                attempts.setdefault((parsed.namespace, parsed.task_id), []).append(kv)
            elif isinstance(parsed, UnitDeclKey):
                decls[(parsed.namespace, parsed.task_id)] = kv
            elif parsed is None:
                on_skip(kv.key, CorruptRecordError("not a key of ours"))
        out: dict[str, list[Task]] = {}
        for (ns, tid), kv in records.items():
            try:
                run = self.assemble(
                    ns,
                    tid,
                    kv,
                    outcomes.get((ns, tid)),
                    node_lists.get((ns, tid)),
                    done.get((ns, tid), ()),
                    states.get((ns, tid)),
                    self.attempts_from(attempts.get((ns, tid), ())),
                    decls.get((ns, tid)),
                )
            except CorruptRecordError as exc:
                on_skip(exc.key or kv.key, exc)
                continue
            out.setdefault(ns, []).append(run.task)
        for tasks in out.values():
            tasks.sort(key=lambda task: task.id)
        return out
