"""``RunFollower``: follows one run until it ends — what ``Manager.wait_for_task`` and
``dtask wait`` both stand on.

It watches the run's outcome key (listed together with its record, so a run that is already
over, removed or replaced is noticed at once) and its record key (``restore`` replaces a live
run), and, on request, the run's completion keys, progress keys, run state (paused or not),
failed-attempt counters and, for a unit task, its units' claim keys. These are per-run keys:
following a run costs what that run writes, whatever else the cluster does; a follower with no
options (``Manager.wait_for_task``'s) watches the two keys alone. Each range is a
:class:`~distributedtask.etcd.watch.ResumableWatch`, so a follower survives disconnects, etcd
restarts and compaction like every other watcher.

Threading: the watches call back on their own threads; :attr:`state` is guarded by
:attr:`lock` and :attr:`changed` is set on every change. :meth:`wait` blocks in slices so a
signal handler of the caller's main thread runs promptly. :meth:`close` (or leaving the
``with`` block) stops and joins every watch thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from .etcd import txn as t
from .etcd.watch import Changes, ResumableWatch, Snapshot
from .exceptions import CorruptRecordError
from .keys import AttemptKey, DoneKey, OutcomeKey, TaskKey, UnitClaimKey, prefix_range_end
from .model import Progress
from .records import AttemptRecord, OutcomeRecord, RunState, TaskRecord, UnitClaim

if TYPE_CHECKING:
    from .manager import Manager

__all__ = ["FailedAttempts", "FollowedRun", "RunFollower"]


@dataclass(frozen=True)
class FailedAttempts:
    """A node's failed attempts of a run: how many, the latest one's message and time
    (``None`` when its record is unreadable: the count, the key's etcd version, still holds)."""

    count: int
    error: str
    at: datetime | None


@dataclass
class FollowedRun:
    """What a follower knows of its run. ``gone``: removed or replaced before it ended.
    ``paused``, ``attempts`` (by node; absent: none failed) and ``unit_claims`` (the claim
    records of the run's units by unit id; absent: never claimed, PENDING) are followed on
    request."""

    completed: set[str] = field(default_factory=set)
    progress: dict[str, Progress] = field(default_factory=dict)
    outcome: OutcomeRecord | None = None
    gone: bool = False
    paused: bool = False
    attempts: dict[str, FailedAttempts] = field(default_factory=dict)
    unit_claims: dict[str, UnitClaim] = field(default_factory=dict)

    @property
    def over(self) -> bool:
        return self.outcome is not None or self.gone


def _kvs(batch: Snapshot | Changes) -> list[tuple[bool, t.KeyValue]]:
    """``(deleted, kv)`` of a batch; a snapshot is all puts."""
    if isinstance(batch, Snapshot):
        return [(False, kv) for kv in batch.kvs]
    return [(event.kind == "delete", event.kv) for event in batch.events]


class RunFollower:
    """Follow run ``version`` of ``(namespace, task_id)``; see the module doc.

    ``completions``, ``progress``, ``pauses`` (the run state key: :attr:`FollowedRun.paused`)
    ``attempts`` (the failed-attempt counters: :attr:`FollowedRun.attempts`) and ``units``
    (the units' claims of a unit task: :attr:`FollowedRun.unit_claims`) add a watch each on
    those keys of the run; ``on_change`` is called (on a watch thread) after every
    change. :meth:`start` raises :class:`~distributedtask.exceptions.EtcdError` if etcd cannot
    be read to start.
    """

    def __init__(
        self,
        manager: Manager,
        namespace: str,
        task_id: str,
        version: int,
        *,
        completions: bool = False,
        progress: bool = False,
        pauses: bool = False,
        attempts: bool = False,
        units: bool = False,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.manager = manager
        self.version = version
        self.state = FollowedRun()
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.over = threading.Event()
        self._on_change = on_change
        keys = manager.keys
        record, outcome = keys.task(namespace, task_id), keys.outcome(namespace, task_id)
        self._watches = [
            self._watch(
                outcome,
                outcome + b"\0",
                self._on_outcome,
                list_ranges=[(outcome, outcome + b"\0"), (record, record + b"\0")],
            ),
            # A run is removed or replaced after it ended, but ``restore`` replaces a live one:
            # its record is the only key that says so.
            self._watch(record, record + b"\0", self._on_record),
        ]
        if completions:
            done = keys.task_done(namespace, task_id)
            self._watches.append(self._watch(done, prefix_range_end(done), self._on_done))
        if progress:
            prefix = keys.version_progress(namespace, task_id, version)
            self._watches.append(self._watch(prefix, prefix_range_end(prefix), self._on_progress))
        if pauses:
            state = keys.state(namespace, task_id)
            self._watches.append(self._watch(state, state + b"\0", self._on_state))
        if attempts:
            prefix = keys.task_attempts(namespace, task_id)
            self._watches.append(self._watch(prefix, prefix_range_end(prefix), self._on_attempts))
        if units:
            prefix = keys.unit_claims(namespace, task_id)
            self._watches.append(self._watch(prefix, prefix_range_end(prefix), self._on_claims))

    def _watch(
        self,
        key: bytes,
        range_end: bytes,
        handler: Callable[[Snapshot | Changes], None],
        list_ranges: list[tuple[bytes, bytes]] | None = None,
    ) -> ResumableWatch:
        return ResumableWatch(
            self.manager.client,
            key,
            range_end,
            handler,
            list_ranges=list_ranges,
            name="distributedtask-follow",
        )

    def __enter__(self) -> RunFollower:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """List and start following each range. Raises :class:`EtcdError`."""
        try:
            for watch in self._watches:
                watch.start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop and join every watch. Idempotent."""
        for watch in self._watches:
            watch.stop()

    def wait(self, timeout: float | None = None) -> FollowedRun:
        """Block until the run is over (ended, removed or replaced); return the state.
        Raises :class:`TimeoutError` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # In slices, so a Ctrl-C in the caller's main thread is handled promptly (a signal
        # delivered to another thread only runs its handler when this one runs code).
        while not self.over.wait(
            0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
        ):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run version {self.version} did not end within {timeout:g}s")
        with self.lock:
            return self.state

    # ---- handlers (watch threads) ---------------------------------------------------------

    def _notify(self) -> None:
        if self.state.over:
            self.over.set()
        self.changed.set()
        if self._on_change is not None:
            self._on_change()

    def _on_outcome(self, batch: Snapshot | Changes) -> None:
        parse = self.manager.keys.parse
        with self.lock:
            state = self.state
            if isinstance(batch, Snapshot):
                record = outcome = None
                for kv in batch.kvs:
                    parsed = parse(kv.key)
                    if isinstance(parsed, TaskKey):
                        record = kv
                    elif isinstance(parsed, OutcomeKey):
                        outcome = kv
                try:
                    version = (
                        None
                        if record is None
                        else TaskRecord.decode(record.value, payload=False).version_at(
                            record.mod_revision
                        )
                    )
                    if version != self.version:
                        state.gone = True
                    elif outcome is not None:
                        state.outcome = OutcomeRecord.decode(outcome.value)
                except CorruptRecordError:
                    state.gone = True
            else:
                for deleted, kv in _kvs(batch):
                    if deleted:
                        state.gone = state.gone or state.outcome is None
                        continue
                    try:
                        state.outcome = OutcomeRecord.decode(kv.value)
                    except CorruptRecordError:
                        state.gone = True
            self._notify()

    def _on_record(self, batch: Snapshot | Changes) -> None:
        with self.lock:
            state = self.state
            if isinstance(batch, Snapshot):
                current = batch.kvs[0] if batch.kvs else None
                try:
                    version = (
                        None
                        if current is None
                        else TaskRecord.decode(current.value, payload=False).version_at(
                            current.mod_revision
                        )
                    )
                except CorruptRecordError:
                    version = None
                gone = version != self.version
            else:
                gone = bool(batch.events)  # deleted, or a new run of the id
            if gone and state.outcome is None:
                state.gone = True
            self._notify()

    def _on_done(self, batch: Snapshot | Changes) -> None:
        parse = self.manager.keys.parse
        with self.lock:
            if isinstance(batch, Snapshot):
                self.state.completed.clear()
            for deleted, kv in _kvs(batch):
                parsed = parse(kv.key)
                if isinstance(parsed, DoneKey) and not deleted:
                    self.state.completed.add(parsed.node_id)
            self._notify()

    def _on_progress(self, batch: Snapshot | Changes) -> None:
        with self.lock:
            puts = [kv for deleted, kv in _kvs(batch) if not deleted]
            self.state.progress.update(self.manager.progress_from(puts))
            self._notify()

    def _on_state(self, batch: Snapshot | Changes) -> None:
        with self.lock:
            if isinstance(batch, Snapshot):
                self.state.paused = False  # no state key: never paused
            for deleted, kv in _kvs(batch):
                if deleted:  # the run was removed: the outcome watch says so
                    self.state.paused = False
                    continue
                with contextlib.suppress(CorruptRecordError):  # unreadable: keep what we knew
                    self.state.paused = RunState.decode(kv.value).paused_since is not None
            self._notify()

    def _on_attempts(self, batch: Snapshot | Changes) -> None:
        parse = self.manager.keys.parse
        with self.lock:
            attempts = self.state.attempts
            if isinstance(batch, Snapshot):
                attempts.clear()
            for deleted, kv in _kvs(batch):
                parsed = parse(kv.key)
                if not isinstance(parsed, AttemptKey):
                    continue
                if deleted:
                    attempts.pop(parsed.node_id, None)
                    continue
                try:
                    record = AttemptRecord.decode(kv.value)
                except CorruptRecordError:
                    attempts[parsed.node_id] = FailedAttempts(kv.version, "(unreadable)", None)
                else:
                    attempts[parsed.node_id] = FailedAttempts(kv.version, record.error, record.at)
            self._notify()

    def _on_claims(self, batch: Snapshot | Changes) -> None:
        parse = self.manager.keys.parse
        with self.lock:
            claims = self.state.unit_claims
            if isinstance(batch, Snapshot):
                claims.clear()
            for deleted, kv in _kvs(batch):
                parsed = parse(kv.key)
                if not isinstance(parsed, UnitClaimKey):
                    continue
                if deleted:  # the run was removed: the outcome watch says so
                    claims.pop(parsed.unit_id, None)
                    continue
                try:
                    claim = UnitClaim.decode(kv.value)
                except CorruptRecordError:  # unreadable: keep what we knew
                    continue
                if claim.version == self.version:
                    claims[parsed.unit_id] = claim
            self._notify()
