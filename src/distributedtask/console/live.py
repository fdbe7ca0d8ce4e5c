"""The console's live state: one etcd watch over the prefix, what every page shows, and the
events that keep the pages current.

1. :meth:`LiveState.start` checks the layout marker (another layout raises
   :class:`~distributedtask.exceptions.StorageFormatError`, as every ``dtask`` command does),
   then starts one :class:`~distributedtask.etcd.watch.ResumableWatch` over ``P/``. It lists the
   ranges pages show — the marker, ``P/cluster/`` (records, outcomes, run states, members),
   ``P/nodes/``, ``P/done/``, ``P/attempts/``, ``P/progress/``, ``P/units/decl/`` (a unit
   task's declaration: one key per task) — and not ``P/assign/``, which only Schedulers need
   (its changes are ignored), nor ``P/units/run/``, every unit of every task (see 5).
2. Each watch response updates the key-values of the runs and members it touches. A run is
   assembled again by the read model (:class:`~distributedtask.readmodel.ReadModel`: the STARTED
   rule, finished nodes, attempts) when one of its keys other than progress changed; its node
   rows (:func:`~distributedtask.console.views.node_rows`, ``dtask wait``'s words) are
   recomputed for the nodes the response touched.
3. What changed is appended to the :class:`~distributedtask.console.events.EventLog`:
   ``task`` (a run's new summary), ``removed``, ``nodes`` (the changed node rows of one run),
   ``transition`` (a line of :func:`~distributedtask.describe.describe_changes`: ``added``,
   ``completed on``, ``attempt 1 failed on``, ``PAUSED``, ``CANCELLED`` ...), ``members``,
   ``status`` (etcd reachable or not) and ``resync`` (the watch relisted: pages take a fresh
   snapshot). Then every waiting page is woken.
4. Pages read :meth:`tasks`, :meth:`task` and :meth:`members` (the JSON API) and follow the log
   through a :class:`Subscription` (server-sent events): a snapshot, then the events after it.
5. Units. The watch over ``P/`` delivers the changes of ``P/units/run/`` too (it always did:
   they were ignored); nothing of them is kept. A change to a unit's claim (its status,
   claimant, attempts) or progress becomes a ``units`` event (``{"namespace", "ID",
   "revision"}``, one per run and watch response) for the pages of that run only, and only while
   such a page is open (:meth:`open_pages`): a page then reads ``GET /api/units``
   (``Manager.get_units``, one etcd read), as it does on its snapshot and on each ``task`` event
   of its run. So the event log carries unit events of the runs someone looks at, and the
   memory of the console does not grow with the number of units.

Nothing here polls etcd: after the first list, every byte comes from the watch (the units of a
run, read on a page's request, are the exception). When etcd is
unreachable the watch backs off and resumes from the last revision it delivered (or relists
after compaction); the pages are told ``reconnecting`` meanwhile and ``live`` again once etcd
confirms the new stream.

Threading: the watch thread writes; any thread reads. One lock guards the runs, the members and
the log, so a snapshot and the cursor it starts from always agree. The JSON values handed out
are never changed afterwards (a change builds new ones). :meth:`stop` ends every page's stream
and stops and joins the watch thread. Values that cannot be read are skipped with a log line
and counted (``unreadable`` in :meth:`status`), never fatal.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..describe import describe_changes
from ..etcd import txn as t
from ..etcd.watch import Changes, RestartReason, ResumableWatch, Snapshot, SnapshotReason
from ..exceptions import CorruptRecordError
from ..follower import FailedAttempts
from ..keys import (
    AttemptKey,
    DoneKey,
    MemberKey,
    NodesKey,
    OutcomeKey,
    ProgressKey,
    StateKey,
    TaskKey,
    UnitClaimKey,
    UnitDeclKey,
    UnitRunKey,
    prefix_range_end,
)
from ..manager import Manager
from ..model import format_time
from ..readmodel import Run
from ..records import AttemptRecord
from . import views
from .events import EventLog, Topic, Waiter, frames, sse_frame

__all__ = ["LiveState", "Subscription"]

log = logging.getLogger("distributedtask.console")

Json = dict[str, Any]

# Restarts that are no trouble with etcd: the pages are not told "reconnecting" for them.
_ROUTINE = frozenset({RestartReason.COMPACTED, RestartReason.RESYNC})


def _strip_payload(kv: t.KeyValue) -> tuple[t.KeyValue, int]:
    """A task record without its payload (the console shows its size only), and that size:
    a record is a header line, then the payload."""
    end = kv.value.find(b"\n")
    if end < 0:
        return kv, 0  # unreadable: the read model says so
    return dataclasses.replace(kv, value=kv.value[: end + 1]), len(kv.value) - end - 1


@dataclass
class _View:
    """One run as the pages show it."""

    run: Run
    rows: dict[str, Json]
    summary: Json


@dataclass
class _Keys:
    """The key-values of one ``(namespace, id)`` that the watch delivered."""

    record: t.KeyValue | None = None
    payload_bytes: int = 0
    outcome: t.KeyValue | None = None
    nodes: t.KeyValue | None = None
    state: t.KeyValue | None = None
    decl: t.KeyValue | None = None  # a unit task's declaration
    done: dict[str, t.KeyValue] = field(default_factory=dict)
    attempts: dict[str, t.KeyValue] = field(default_factory=dict)
    progress: dict[tuple[int, str], t.KeyValue] = field(default_factory=dict)
    stale: bool = True  # a key other than progress changed: assemble the run again
    view: _View | None = None

    def empty(self) -> bool:
        singles = (self.record, self.outcome, self.nodes, self.state, self.decl)
        return all(kv is None for kv in singles) and not (
            self.done or self.attempts or self.progress
        )


class LiveState:
    """Everything the console shows of ``manager``'s prefix, kept current by one watch; see the
    module doc. ``capacity`` is how many events the log keeps for reconnecting pages."""

    def __init__(self, manager: Manager, *, capacity: int = 4096) -> None:
        self.manager = manager
        self.keys = manager.keys
        self.log = EventLog(capacity)
        self.viewer = threading.Event()
        """Set once a page has subscribed (``dtask demo --ui`` waits for one)."""
        self._lock = threading.Lock()
        self._runs: dict[Topic, _Keys] = {}
        self._members: dict[str, Json] = {}
        self._open: dict[Topic, int] = {}  # how many pages of each run are open
        self._unreadable: set[bytes] = set()
        self._revision = 0
        self._live = False
        self._since = manager.now()
        self._closed = False
        keys = self.keys
        ranges = [(keys.format, keys.format + b"\0")] + [
            (start, prefix_range_end(start))
            for start in (
                keys.cluster,
                keys.all_nodes(),
                keys.all_done(),
                keys.all_attempts(),
                keys.all_progress(),
                keys.all_unit_decls(),
            )
        ]
        self._watch = ResumableWatch(
            manager.client,
            keys.root,
            prefix_range_end(keys.root),
            self._on_batch,
            list_ranges=ranges,
            name="dtask-console-watch",
            on_restart=self._on_restart,
            on_live=self._on_live,
        )

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Check the layout and start the watch (its first list is delivered on return).

        Raises :class:`StorageFormatError` (another layout under the prefix) and
        :class:`EtcdError` (etcd could not be read within the client's timeout).
        """
        read = self.manager.read
        read.check_format(self.manager.client.txn(success=read.format_ops()), 0)
        self._watch.start()

    def stop(self) -> None:
        """End every page's stream, then stop and join the watch. Idempotent."""
        with self._lock:
            self._closed = True
        self.log.wake()
        self._watch.stop()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- what the API reads ---------------------------------------------------------------

    def status(self) -> Json:
        """``{"etcd": "live" | "reconnecting", "since", "revision", "prefix", "unreadable"}``."""
        with self._lock:
            return self._status_locked()

    def _status_locked(self) -> Json:
        return {
            "etcd": "live" if self._live else "reconnecting",
            "since": format_time(self._since),
            "revision": self._revision,
            "prefix": self.manager.prefix,
            "unreadable": len(self._unreadable),
        }

    def tasks(self) -> tuple[int, list[Json]]:
        """The revision seen and every run's summary, by namespace and id."""
        with self._lock:
            return self._revision, self._summaries_locked()

    def _summaries_locked(self) -> list[Json]:
        return [
            keys.view.summary for _, keys in sorted(self._runs.items()) if keys.view is not None
        ]

    def task(self, namespace: str, task_id: str) -> Json | None:
        """One run with every node row (:func:`views.full`), or None."""
        with self._lock:
            return self._full_locked((namespace, task_id))

    def _full_locked(self, topic: Topic) -> Json | None:
        keys = self._runs.get(topic)
        if keys is None or keys.view is None:
            return None
        view = keys.view
        return views.full(view.run.task, view.summary, view.rows)

    def members(self) -> list[Json]:
        """The live members, by node id."""
        with self._lock:
            return [self._members[node] for node in sorted(self._members)]

    def open_pages(self, namespace: str, task_id: str) -> int:
        """How many pages of the run ``(namespace, task_id)`` follow the event stream now."""
        with self._lock:
            return self._open.get((namespace, task_id), 0)

    def subscribe(self, topic: Topic | None, last_event_id: str | None) -> Subscription:
        """A page's stream (call on the event loop that will wait for it): a snapshot, unless
        ``last_event_id`` is an event of this process still in the log; then the events after
        it. ``topic``: the run the page shows (it also gets that run's ``nodes`` events)."""
        subscription = Subscription(self, topic, last_event_id)
        self.viewer.set()
        return subscription

    # ---- the watch's handlers (watch thread) ----------------------------------------------

    def _on_batch(self, batch: Snapshot | Changes) -> None:
        with self._lock:
            self._revision = max(self._revision, batch.revision)
            if not self._live:
                self._set_live(True)
            if isinstance(batch, Snapshot):
                self._reset(batch.kvs)
                if batch.reason is not SnapshotReason.INITIAL:
                    self._append("resync", {"revision": batch.revision, "reason": batch.reason})
            else:
                self._apply(batch)
        self.log.wake()

    def _on_restart(self, reason: RestartReason) -> None:
        if reason in _ROUTINE:
            return
        with self._lock:
            if not self._live:
                return
            self._set_live(False, reason)
        self.log.wake()

    def _on_live(self) -> None:
        with self._lock:
            if self._live:
                return
            self._set_live(True)
        self.log.wake()

    def _set_live(self, live: bool, reason: RestartReason | None = None) -> None:
        self._live = live
        self._since = self.manager.now()
        status = self._status_locked()
        if reason is not None:
            status["reason"] = reason.value
        self._append("status", status)

    def _append(self, kind: str, data: Json, topic: Topic | None = None) -> None:
        self.log.append(kind, orjson.dumps(data), topic)

    # ---- keeping the key-values -----------------------------------------------------------

    def _reset(self, kvs: Iterable[t.KeyValue]) -> None:
        self._runs.clear()
        self._members.clear()
        self._unreadable.clear()
        for kv in kvs:
            self._put(kv, deleted=False)
        for topic in list(self._runs):
            self._refresh(topic, None, announce=False)

    def _apply(self, batch: Changes) -> None:
        touched: dict[Topic, set[str]] = {}  # the nodes of each run the batch touched
        whole: set[Topic] = set()  # runs touched as a whole (record, outcome, state, nodes)
        units: dict[Topic, None] = {}  # runs whose units changed, in order
        members = False
        for event in batch.events:
            unit_topic = self._unit_change(event.kv.key)
            if unit_topic is not None:
                units[unit_topic] = None
                continue
            where = self._put(event.kv, deleted=event.kind == "delete")
            if where == "member":
                members = True
            elif isinstance(where, tuple):
                topic, node = where
                touched.setdefault(topic, set())
                if node is None:
                    whole.add(topic)
                else:
                    touched[topic].add(node)
        for topic, nodes in touched.items():
            self._refresh(topic, None if topic in whole else nodes, announce=True)
        now = format_time(self.manager.now())
        for change in describe_changes(self.keys, batch.events, progress=False):
            self._append(
                "transition",
                {
                    "namespace": change.namespace,
                    "ID": change.task_id,
                    "what": change.what,
                    "line": change.line,
                    "at": now,
                    "revision": batch.revision,
                },
            )
        if members:
            self._append("members", {"members": [self._members[n] for n in sorted(self._members)]})
        for namespace, task_id in units:
            data = {"namespace": namespace, "ID": task_id, "revision": batch.revision}
            self._append("units", data, (namespace, task_id))

    def _unit_change(self, key: bytes) -> Topic | None:
        """The run a unit key is of when a page of that run is open and the key is a unit's
        claim or progress (what a page shows of a unit); else None."""
        if not self._open or not key.startswith(self.keys.all_unit_runs()):
            return None
        parsed = self.keys.parse(key)
        if isinstance(parsed, UnitClaimKey) or (
            isinstance(parsed, UnitRunKey) and parsed.kind == "progress"
        ):
            topic = (parsed.namespace, parsed.task_id)
            return topic if topic in self._open else None
        return None

    def _put(self, kv: t.KeyValue, *, deleted: bool) -> tuple[Topic, str | None] | str | None:
        """Keep (or drop) one key-value; returns what it touched: ``(topic, node)`` (node None:
        the whole run), ``"member"``, or None (a key the console does not show)."""
        parsed = self.keys.parse(kv.key)
        if isinstance(parsed, MemberKey):
            self._unreadable.discard(kv.key)
            if deleted:
                self._members.pop(parsed.node_id, None)
                return "member"
            member = self.manager.member_from(kv, self._skip)
            if member is None:
                self._members.pop(parsed.node_id, None)
            else:
                self._members[parsed.node_id] = views.member_row(member, kv.lease)
            return "member"
        if not isinstance(
            parsed,
            (
                TaskKey,
                OutcomeKey,
                StateKey,
                NodesKey,
                DoneKey,
                AttemptKey,
                ProgressKey,
                UnitDeclKey,
            ),
        ):
            return None
        topic = (parsed.namespace, parsed.task_id)
        keys = self._runs.setdefault(topic, _Keys())
        value = None if deleted else kv
        if isinstance(parsed, ProgressKey):
            slot = (parsed.version, parsed.node_id)
            if value is None:
                keys.progress.pop(slot, None)
            else:
                keys.progress[slot] = value
            return topic, parsed.node_id
        keys.stale = True
        if isinstance(parsed, (DoneKey, AttemptKey)):
            per_node = keys.done if isinstance(parsed, DoneKey) else keys.attempts
            if value is None:
                per_node.pop(parsed.node_id, None)
            else:
                per_node[parsed.node_id] = value
            return topic, parsed.node_id
        if isinstance(parsed, TaskKey):
            keys.record, keys.payload_bytes = (None, 0) if value is None else _strip_payload(value)
        elif isinstance(parsed, OutcomeKey):
            keys.outcome = value
        elif isinstance(parsed, StateKey):
            keys.state = value
        elif isinstance(parsed, UnitDeclKey):
            keys.decl = value
        else:
            keys.nodes = value
        return topic, None

    def _skip(self, key: bytes, exc: Exception) -> None:
        if key not in self._unreadable:
            self._unreadable.add(key)
            log.warning("console: skipping unreadable value at %r: %s", key, exc)

    # ---- assembling runs ------------------------------------------------------------------

    def _refresh(self, topic: Topic, nodes: set[str] | None, *, announce: bool) -> None:
        """Assemble ``topic`` again after a change to ``nodes`` (None: all); with ``announce``,
        append the events of what changed."""
        keys = self._runs.get(topic)
        if keys is None:
            return
        old = keys.view
        new = None if keys.empty() else self._view(topic, keys, old, nodes)
        keys.view = new
        if keys.empty():
            del self._runs[topic]
        if not announce:
            return
        namespace, task_id = topic
        if new is None:
            if old is not None:
                self._append(
                    "removed",
                    {"namespace": namespace, "ID": task_id, "version": old.run.task.version},
                )
            return
        if old is None or new.summary != old.summary:
            self._append("task", {"revision": self._revision, "task": new.summary})
        reset = old is None or old.run.task.version != new.run.task.version
        if old is None or reset:
            changed = [new.rows[node] for node in sorted(new.rows)]
        else:
            near = sorted(new.rows) if nodes is None else sorted(nodes & new.rows.keys())
            changed = [new.rows[node] for node in near if old.rows.get(node) != new.rows[node]]
        if changed or reset:
            data = {"namespace": namespace, "ID": task_id, "version": new.run.task.version}
            self._append("nodes", {**data, "reset": reset, "nodes": changed}, topic)

    def _view(
        self, topic: Topic, keys: _Keys, old: _View | None, nodes: set[str] | None
    ) -> _View | None:
        if keys.record is None:
            return None
        namespace, task_id = topic
        read = self.manager.read
        if keys.stale or old is None:
            try:
                run = read.assemble(
                    namespace,
                    task_id,
                    keys.record,
                    keys.outcome,
                    keys.nodes,
                    keys.done,
                    keys.state,
                    read.attempts_from(keys.attempts.values()),
                    keys.decl,
                )
            except CorruptRecordError as exc:
                self._skip(exc.key or keys.record.key, exc)
                return None
            self._unreadable.discard(keys.record.key)
            keys.stale = False
        else:
            run = old.run
        task = run.task
        if nodes is None or old is None or old.run.task.version != task.version:
            old_rows: dict[str, Json] = {}
            wanted = task.nodes
        else:
            old_rows, wanted = old.rows, task.nodes & nodes
        progress = self.manager.progress_from(
            kv for (version, node), kv in keys.progress.items()
            if version == task.version and node in wanted
        )  # fmt: skip
        attempts = {}
        for node, kv in keys.attempts.items():
            if node in wanted:
                try:
                    record = AttemptRecord.decode(kv.value)
                except CorruptRecordError:  # pragma: no cover - the assembly refused it
                    continue
                attempts[node] = FailedAttempts(kv.version, record.error, record.at)
        fresh = views.node_rows(task, run.outcome, progress, attempts, wanted)
        rows = {**old_rows, **fresh}
        return _View(run, rows, views.summary(task, rows, keys.payload_bytes))

    # ---- snapshots (under the lock) -------------------------------------------------------

    def _snapshot_locked(self, topic: Topic | None) -> Json:
        return {
            "status": self._status_locked(),
            "tasks": self._summaries_locked(),
            "members": [self._members[node] for node in sorted(self._members)],
            "task": None if topic is None else self._full_locked(topic),
        }


class Subscription:
    """One page's place in the event log (see :mod:`~distributedtask.console.events`).

    Made by :meth:`LiveState.subscribe` on the event loop that serves the page; :meth:`take`
    returns what to send now, :attr:`waiter` is woken when there may be more, :meth:`close`
    forgets the page.
    """

    def __init__(self, state: LiveState, topic: Topic | None, last_event_id: str | None) -> None:
        self._state = state
        self.topic = topic
        self.waiter = Waiter()
        self._open = True
        with state._lock:
            self._cursor = state.log.parse_id(last_event_id)
            state.log.add_waiter(self.waiter)
            if topic is not None:
                state._open[topic] = state._open.get(topic, 0) + 1

    @property
    def closed(self) -> bool:
        return self._state.closed

    def take(self) -> bytes:
        """The frames the page has not had yet (``b""``: none): a ``snapshot`` when it has no
        place in the log (new, too far behind, or after a ``resync``), else the events after
        its place."""
        state, log_ = self._state, self._state.log
        with state._lock:
            pending = None if self._cursor is None else log_.since(self._cursor)
            if pending is None or any(event.kind == "resync" for event in pending):
                snapshot = state._snapshot_locked(self.topic)
                self._cursor = head = log_.head
            else:
                snapshot = None
                self._cursor = log_.head
        if snapshot is not None:
            return sse_frame(log_.event_id(head), "snapshot", orjson.dumps(snapshot))
        assert pending is not None
        return frames(log_, (e for e in pending if e.topic is None or e.topic == self.topic))

    def close(self) -> None:
        """Forget the page. Idempotent."""
        state = self._state
        with state._lock:
            if not self._open:
                return
            self._open = False
            state.log.remove_waiter(self.waiter)
            if self.topic is not None:
                left = state._open.pop(self.topic, 0) - 1
                if left > 0:
                    state._open[self.topic] = left
