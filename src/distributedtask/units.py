"""Unit transitions: how the units of a unit task are handed out, claimed, completed, failed,
given back and counted — each an etcd transaction on per-unit keys (keys.py, ``P/units/``).

A unit task declares its units once, in one key written by the add (``P/units/decl``: nothing
per unit in the add transaction). Per-unit keys are written lazily by the nodes that claim
them, under ``P/units/run/<ns>/<id>/``, which no Scheduler watches: a unit transition reaches
the etcd member that serves it and nobody else. What every node must learn — a unit given
back, a group completed — goes to ``P/cluster/`` (the pool and the group marks), and is rare.

Handing out without contention. Units are handed out in declaration order through **tickets**:
a ticket is the etcd *version* of a counter key, so ``put(counter); range(counter)`` in one
transaction returns a number no other caller gets, without a compare that could fail. The
units without affinity share one counter; the units with affinity to a node have a counter of
that node. Ticket *k* names the *k*-th unit of its list, and the node claims it::

    ticket         IF live(V) THEN put counter, range counter (its version: k)        1 trip
    claim          IF live(V) AND create(claim) == 0 THEN put claim IN_PROGRESS,      1 trip
                   put held/<node>/<unit>
    claim from     IF live(V) AND mod(claim) == mod(pool entry) == r THEN put claim   1 trip
     the pool      IN_PROGRESS, put held, delete the pool entry
    complete       IF live(V) AND mod(claim) == r THEN put claim COMPLETED, delete     1 trip
                   held, put count, put gcount/<group>;
                   nested: IF version(count) == units - 1 THEN put outcome FINISHED;
                   nested: IF version(gcount) == group size - 1 THEN put group mark
    fail, attempts IF live(V) AND mod(claim) == r THEN put claim PENDING, delete held, 1 trip
     left          put pool entry (claimable after the backoff)
    fail, last     IF live(V) AND mod(claim) == r THEN put claim FAILED, delete held,  1 trip
                   put outcome FAILED (error verbatim, node, unit)
    give back      IF live(V) AND mod(claim) == mod(held) THEN put claim PENDING,      1 trip
     (lost node)   delete held, put pool entry

So a unit costs three round trips (ticket, claim, completion), whatever the number of units or
nodes, and no two claimants ever compete for a counter. On a Scheduler, a completion also takes
the node's next ticket (``put counter, range counter`` in its success branch), so the node's
next claim is one round trip: two per unit. (Only there: a ticket taken ahead and never used,
its node gone, is a lost hand-out that only the Schedulers' looks find.)

Order: a node takes the units with affinity to it, then the others, in declaration order; then
units of the pool. A Scheduler knows the pool from its watch and takes from it first; a caller
of :meth:`UnitTransitions.claim` without it has the pool read by its first ticket's
transaction. Nested compares are evaluated against
the state before the transaction (etcd), so exactly one completion sees ``units - 1`` earlier
ones: FINISHED is written once, in the same transaction as the last completion, and so is each
group's mark. ``r`` is the revision of the caller's own claim: only the claimant records a
unit (:class:`~distributedtask.exceptions.UnitClaimError` otherwise).

Lost hand-outs. A ticket whose claim never follows (the node died between the two, or the
ticket's response was lost and it took another) leaves a unit that nobody holds. Every claim
key comes from a ticket, so ``count(claims) == tickets handed out`` (clamped to the list
lengths) exactly when nothing is lost: :meth:`UnitTransitions.check_handouts` compares the two
in one small read, and a node with nothing left to claim runs it; when a second look still
finds units handed out and never claimed, it gives them to the pool. A claim still in flight
then loses its compare and its node takes another ticket: no unit is lost, none claimed twice.

Retried requests: every claim carries the call's random token, so a call whose response was
lost recognises its own write. Threading: thread-safe (small locked caches); every method may
raise :class:`~distributedtask.exceptions.EtcdError`.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from .etcd import txn as t
from .exceptions import (
    CorruptRecordError,
    InvalidTaskError,
    TaskNotFoundError,
    TaskNotRunningError,
    UnitClaimError,
)
from .keys import Keys
from .model import Progress, Task, TaskStatus, Unit, UnitSpec, UnitStatus, validate_name
from .readmodel import NO_ATTEMPTS, build_task
from .records import (
    GroupMark,
    OutcomeRecord,
    PoolEntry,
    RunState,
    UnitClaim,
    UnitDecl,
    decode_progress,
    encode_unit_progress,
)

if TYPE_CHECKING:
    from .manager import KnownRun, Manager

__all__ = ["Claim", "PoolItem", "UnitTransitions"]

_CACHE = 65536
_BATCH = t.MAX_TXN_OPS - 4
_AHEAD = 4
"""At most this many tickets taken ahead and not yet used, per node and run."""


class _RunPausedError(Exception):
    """A claim met the run PAUSED: nothing is handed out (not an error for the caller)."""


def _unit_key(run: tuple[str, str, int], unit: str) -> tuple[str, str, int, str]:
    return (run[0], run[1], run[2], unit)


def _token() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Claim:
    """A unit a node holds IN_PROGRESS: its declaration, the ``revision`` of its claim (what
    its completion compares), its failed attempts so far and the latest one's message."""

    spec: UnitSpec
    revision: int
    attempts: int = 0
    error: str | None = None

    def unit(self, node_id: str) -> Unit:
        return Unit(
            self.spec.id,
            self.spec.group,
            node_id,
            UnitStatus.IN_PROGRESS,
            self.attempts,
            self.error,
        )


@dataclass(frozen=True)
class PoolItem:
    """A unit in the pool (``P/cluster/pool``), as a reader saw it: ``revision`` is its
    entry's ``mod_revision``, which is also its PENDING claim's."""

    unit_id: str
    entry: PoolEntry
    revision: int

    def eligible(self, node_id: str) -> bool:
        return self.entry.node is None or self.entry.node == node_id


@dataclass
class _Hand:
    """Where one node stands in handing out one run's units (this process): whether each of
    its two lists is handed out, and the tickets taken ahead by its completions."""

    own_exhausted: bool = False
    free_exhausted: bool = False
    ahead: dict[bool, list[int]] = field(default_factory=lambda: {True: [], False: []})


class UnitTransitions:
    """The unit transitions of one :class:`~distributedtask.manager.Manager` (see the module
    doc). Reached as ``manager.units``."""

    def __init__(self, manager: Manager) -> None:
        self.m = manager
        self.keys: Keys = manager.keys
        self._lock = threading.Lock()
        self._hands: OrderedDict[tuple[str, str, int, str], _Hand] = OrderedDict()
        self._claims: OrderedDict[tuple[str, str, int, str], tuple[str, Claim]] = OrderedDict()
        """(ns, id, version, unit) -> (node, claim): the claims made or read here."""

    # ---- small helpers --------------------------------------------------------------------

    def _hand(self, namespace: str, task_id: str, version: int, node_id: str) -> _Hand:
        key = (namespace, task_id, version, node_id)
        with self._lock:
            hand = self._hands.get(key)
            if hand is None:
                hand = self._hands[key] = _Hand()
                while len(self._hands) > _CACHE:
                    self._hands.popitem(last=False)
            else:
                self._hands.move_to_end(key)
            return hand

    def _remember(self, run: tuple[str, str, int], unit: str, held: tuple[str, Claim]) -> None:
        with self._lock:
            self._claims[_unit_key(run, unit)] = held
            while len(self._claims) > _CACHE:
                self._claims.popitem(last=False)

    def _forget(self, run: tuple[str, str, int], unit: str) -> None:
        with self._lock:
            self._claims.pop(_unit_key(run, unit), None)

    def _held_here(self, run: tuple[str, str, int], unit: str) -> tuple[str, Claim] | None:
        with self._lock:
            return self._claims.get(_unit_key(run, unit))

    @staticmethod
    def decl_of(known: KnownRun, namespace: str, task_id: str) -> UnitDecl:
        if known.decl is None:
            raise InvalidTaskError(f"task {namespace}/{task_id} has no units", "task_id")
        return known.decl

    def _why_reads(self, namespace: str, task_id: str, unit_id: str) -> list[t.Op]:
        """What a failed unit transaction reads to explain itself: [record (keys only),
        outcome, claim]."""
        return [
            t.get(self.keys.task(namespace, task_id), keys_only=True),
            t.get(self.keys.outcome(namespace, task_id)),
            t.get(self.keys.unit_claim(namespace, task_id, unit_id)),
        ]

    def _claim_compares(self, namespace: str, task_id: str, version: int) -> list[t.Compare]:
        """live(V), and not PAUSED: what every hand-out compares."""
        return [
            *self.m._live(namespace, task_id, version),
            t.create_equals(self.keys.units_paused(namespace, task_id), 0),
        ]

    def _claim_why_reads(self, namespace: str, task_id: str, unit_id: str) -> list[t.Op]:
        """:meth:`_why_reads`, and (at 3) whether the run is PAUSED."""
        return [
            *self._why_reads(namespace, task_id, unit_id),
            t.get(self.keys.units_paused(namespace, task_id), keys_only=True),
        ]

    def _check_claimable(
        self, namespace: str, task_id: str, version: int, result: t.TxnResult
    ) -> None:
        """After a hand-out's compare failed (reads of :meth:`_claim_why_reads`): raise why
        the run is not live, or :class:`_RunPausedError`; return if it is neither."""
        self._check_live(namespace, task_id, version, result)
        if result.range(3).first() is not None:
            raise _RunPausedError

    def _check_live(self, namespace: str, task_id: str, version: int, result: t.TxnResult) -> None:
        """Raise why ``version`` is not live, from :meth:`_why_reads` (at 0); return if it
        is."""
        record_kv = result.range(0).first()
        if record_kv is None or record_kv.mod_revision != version:
            raise TaskNotFoundError(namespace, task_id, version)
        outcome_kv = result.range(1).first()
        if outcome_kv is not None:
            try:
                status = OutcomeRecord.decode(outcome_kv.value).status.value
            except CorruptRecordError:
                status = "ended"
            raise TaskNotRunningError(namespace, task_id, version, status)

    def _claim_of(self, kv: t.KeyValue | None) -> UnitClaim | None:
        if kv is None:
            return None
        try:
            return UnitClaim.decode(kv.value)
        except CorruptRecordError as exc:
            self.m._skip(kv.key, exc)
            return None

    def task(
        self,
        namespace: str,
        task_id: str,
        version: int,
        known: KnownRun,
        outcome: OutcomeRecord | None = None,
        state_kv: t.KeyValue | None = None,
        attempt_kvs: Iterable[t.KeyValue] = (),
    ) -> Task:
        """The run, built from what never changes and the outcome, state and node attempts
        just read."""
        state = None
        if state_kv is not None:
            try:
                state = RunState.decode(state_kv.value)
            except CorruptRecordError as exc:
                self.m._skip(state_kv.key, exc)
        try:
            attempts = self.m.read.attempts_from(attempt_kvs)
        except CorruptRecordError as exc:
            self.m._skip(exc.key or b"", exc)
            attempts = NO_ATTEMPTS
        return build_task(
            namespace,
            task_id,
            known.record,
            version,
            known.nodes,
            (),
            outcome,
            state,
            attempts,
            decl=known.decl,
        )

    # ---- handing out ----------------------------------------------------------------------

    def claim(
        self,
        namespace: str,
        task_id: str,
        version: int,
        node_id: str,
        known: KnownRun,
        pool: Sequence[PoolItem] | None = None,
    ) -> Claim | None:
        """Claim one unit for ``node_id`` (a node of the run): the next unit with affinity to
        it, then the next unit without affinity, then a unit of the pool it may take. With
        ``pool`` (what the caller knows of the pool: a Scheduler's view) the pool goes first;
        without, the first ticket's transaction reads it. None when nothing is claimable now.

        Raises :class:`TaskNotFoundError`, :class:`TaskNotRunningError`,
        :class:`InvalidTaskError` (not a unit task), :class:`EtcdError`.
        """
        try:
            return self._claim(namespace, task_id, version, node_id, known, pool)
        except _RunPausedError:
            return None

    def _claim(
        self,
        namespace: str,
        task_id: str,
        version: int,
        node_id: str,
        known: KnownRun,
        pool: Sequence[PoolItem] | None,
    ) -> Claim | None:
        """:meth:`claim`; raises :class:`_RunPausedError` when the run is PAUSED."""
        decl = self.decl_of(known, namespace, task_id)
        if pool is not None:  # the caller's view of the pool costs nothing: it goes first
            got = self._from_pool(namespace, task_id, version, node_id, known, pool)
            if got is not None:
                return got
        read: list[PoolItem] | None = None
        hand = self._hand(namespace, task_id, version, node_id)
        own = decl.of_node(node_id)
        for is_own, units in ((True, own), (False, decl.free)):
            got, items = self._by_ticket(
                namespace,
                task_id,
                version,
                node_id,
                hand,
                is_own,
                units,
                read_pool=pool is None and read is None,
            )
            if items is not None:
                read = items
            if got is not None:
                return got
            if is_own:
                hand.own_exhausted = True
            else:
                hand.free_exhausted = True
        if pool is not None:
            return None
        if read is None:
            # the pool and whether the run is live, in one read: with its tickets handed out,
            # nothing else would ask etcd, and an ended run must raise, not say None
            result = self.m.client.txn(
                success=[
                    t.get(self.keys.task(namespace, task_id), keys_only=True),
                    t.get(self.keys.outcome(namespace, task_id)),
                    t.get_prefix(self.keys.task_pool(namespace, task_id)),
                    t.get(self.keys.units_paused(namespace, task_id), keys_only=True),
                ]
            )
            self._check_live(namespace, task_id, version, result)
            if result.range(3).first() is not None:
                return None
            read = self.pool_items(result.range(2).kvs, version)
        now = self.m.now()
        ready = [item for item in read if item.entry.not_before <= now]
        return self._from_pool(namespace, task_id, version, node_id, known, ready)

    def _from_pool(
        self,
        namespace: str,
        task_id: str,
        version: int,
        node_id: str,
        known: KnownRun,
        pool: Sequence[PoolItem],
    ) -> Claim | None:
        """Claim the first unit of ``pool`` the node may take and nobody took first."""
        assert known.decl is not None
        for item in pool:
            if item.eligible(node_id) and item.unit_id in known.decl.by_id:
                got = self._claim_pooled(namespace, task_id, version, node_id, known, item)
                if got is not None:
                    return got
        return None

    def _ahead_counter(
        self, namespace: str, task_id: str, node_id: str, hand: _Hand, decl: UnitDecl
    ) -> tuple[bool, bytes] | None:
        """The counter a completion takes the node's next ticket of (so that its next claim
        is one round trip), and whether it is the node's own; None when both lists are
        handed out or enough tickets are waiting already."""
        with self._lock:
            if len(hand.ahead[True]) + len(hand.ahead[False]) >= _AHEAD:
                return None
        if decl.of_node(node_id) and not hand.own_exhausted:
            return True, self.keys.unit_node_ticket(namespace, task_id, node_id)
        if decl.free and not hand.free_exhausted:
            return False, self.keys.unit_ticket(namespace, task_id)
        return None

    def exhausted(self, namespace: str, task_id: str, version: int, node_id: str) -> bool:
        """Whether every ticket ``node_id`` could take of this run has been handed out (as
        this process knows)."""
        hand = self._hand(namespace, task_id, version, node_id)
        return hand.own_exhausted and hand.free_exhausted

    def _by_ticket(
        self,
        namespace: str,
        task_id: str,
        version: int,
        node_id: str,
        hand: _Hand,
        own: bool,
        units: Sequence[UnitSpec],
        *,
        read_pool: bool = False,
    ) -> tuple[Claim | None, list[PoolItem] | None]:
        """Claim the unit of a ticket of one of the node's two lists — first of the tickets
        its completions took ahead, then, while the list is not known to be handed out, of
        new ones — until one names a unit still unclaimed; None when none is left. With
        ``read_pool``, the first ticket's transaction also reads the run's pool, returned
        with the claim (None when no ticket was drawn)."""
        read: list[PoolItem] | None = None
        counter = (
            self.keys.unit_node_ticket(namespace, task_id, node_id)
            if own
            else self.keys.unit_ticket(namespace, task_id)
        )
        live = self._claim_compares(namespace, task_id, version)
        while True:
            with self._lock:
                waiting = hand.ahead[own]
                ticket = waiting.pop(waiting.index(min(waiting))) if waiting else None
                exhausted = hand.own_exhausted if own else hand.free_exhausted
            if ticket is None:
                if exhausted or not units:
                    return None, read
                pool_op = [t.get_prefix(self.keys.task_pool(namespace, task_id))]
                result = self.m.client.txn(
                    compare=live,
                    success=[
                        t.put(counter, b""),
                        t.get(counter, keys_only=True),
                        *(pool_op if read_pool and read is None else []),
                    ],
                    failure=self._claim_why_reads(namespace, task_id, units[0].id),
                )
                if not result.succeeded:
                    self._check_claimable(namespace, task_id, version, result)
                    raise TaskNotFoundError(namespace, task_id, version)  # pragma: no cover
                if read_pool and read is None:
                    read = self.pool_items(result.range(2).kvs, version)
                kv = result.range(1).first()
                ticket = 0 if kv is None else kv.version
                if ticket > len(units) or ticket <= 0:
                    return None, read  # the list is handed out (tickets ahead are used first)
            elif ticket > len(units) or ticket <= 0:
                continue
            try:
                got = self._claim_fresh(namespace, task_id, version, node_id, units[ticket - 1])
            except _RunPausedError:
                with self._lock:  # the ticket is this node's still: at the next claim
                    hand.ahead[own].append(ticket)
                raise
            if got is not None:
                return got, read
            # given to the pool by a look for lost hand-outs meanwhile: take the next one

    def _claim_fresh(
        self, namespace: str, task_id: str, version: int, node_id: str, spec: UnitSpec
    ) -> Claim | None:
        keys = self.keys
        claim_key = keys.unit_claim(namespace, task_id, spec.id)
        token = _token()
        claim = UnitClaim(version, UnitStatus.IN_PROGRESS, node_id, 0, token)
        result = self.m.client.txn(
            compare=[
                *self._claim_compares(namespace, task_id, version),
                t.create_equals(claim_key, 0),
            ],
            success=[
                t.put(claim_key, claim.encode()),
                t.put(keys.unit_held(namespace, task_id, node_id, spec.id), b""),
            ],
            failure=self._claim_why_reads(namespace, task_id, spec.id),
        )
        if result.succeeded:
            got = Claim(spec, result.revision)
            self._remember((namespace, task_id, version), spec.id, (node_id, got))
            return got
        self._check_live(namespace, task_id, version, result)
        kv = result.range(2).first()
        existing = self._claim_of(kv)
        if kv is not None and existing is not None and existing.token == token:
            got = Claim(spec, kv.mod_revision)  # ours: the response was lost
            self._remember((namespace, task_id, version), spec.id, (node_id, got))
            return got
        if kv is None:  # unclaimed: the compare that failed was the pause's
            self._check_claimable(namespace, task_id, version, result)
        return None

    def _claim_pooled(
        self,
        namespace: str,
        task_id: str,
        version: int,
        node_id: str,
        known: KnownRun,
        item: PoolItem,
    ) -> Claim | None:
        keys = self.keys
        assert known.decl is not None
        spec = known.decl.by_id[item.unit_id]
        claim_key = keys.unit_claim(namespace, task_id, spec.id)
        pool_key = keys.pool(namespace, task_id, spec.id)
        token = _token()
        attempts, error = item.entry.attempts, item.entry.error
        claim = UnitClaim(version, UnitStatus.IN_PROGRESS, node_id, attempts, token, error)
        result = self.m.client.txn(
            compare=[
                *self._claim_compares(namespace, task_id, version),
                t.mod_equals(claim_key, item.revision),
                t.mod_equals(pool_key, item.revision),
            ],
            success=[
                t.put(claim_key, claim.encode()),
                t.put(keys.unit_held(namespace, task_id, node_id, spec.id), b""),
                t.delete(pool_key),
            ],
            failure=self._claim_why_reads(namespace, task_id, spec.id),
        )
        run = (namespace, task_id, version)
        if result.succeeded:
            got = Claim(spec, result.revision, attempts, error)
            self._remember(run, spec.id, (node_id, got))
            return got
        self._check_live(namespace, task_id, version, result)
        kv = result.range(2).first()
        existing = self._claim_of(kv)
        if kv is not None and existing is not None and existing.token == token:
            got = Claim(spec, kv.mod_revision, attempts, error)
            self._remember(run, spec.id, (node_id, got))
            return got
        if kv is not None and kv.mod_revision == item.revision:
            self._check_claimable(namespace, task_id, version, result)  # untouched: paused?
        return None  # another node took it first

    def read_pool(self, namespace: str, task_id: str, version: int) -> list[PoolItem]:
        """The pool of one run, as stored now (one read)."""
        result = self.m.client.txn(success=[t.get_prefix(self.keys.task_pool(namespace, task_id))])
        return self.pool_items(result.range(0).kvs, version)

    def pool_items(self, kvs: Iterable[t.KeyValue], version: int | None = None) -> list[PoolItem]:
        """Decode pool key-values (of ``version`` when given; others are skipped)."""
        out = []
        for kv in kvs:
            parsed = self.keys.parse(kv.key)
            unit_id = getattr(parsed, "unit_id", None)
            try:
                entry = PoolEntry.decode(kv.value)
            except CorruptRecordError as exc:
                self.m._skip(kv.key, exc)
                continue
            if unit_id is None or (version is not None and entry.version != version):
                continue
            out.append(PoolItem(unit_id, entry, kv.mod_revision))
        return out

    def held(self, namespace: str, task_id: str, version: int, node_id: str) -> list[Claim]:
        """The units ``node_id`` holds IN_PROGRESS in this run (e.g. after a restart, or runs
        terminated by a pause): one read."""
        known = self.m.known_run(namespace, task_id, version)
        decl = self.decl_of(known, namespace, task_id)
        prefix = self.keys.units_held(namespace, task_id, node_id)
        result = self.m.client.txn(
            compare=self.m._live(namespace, task_id, version),
            success=[t.get_prefix(prefix, keys_only=True)],
        )
        if not result.succeeded:
            return []
        ids = [Keys.name_under(prefix, kv.key) for kv in result.range(0).kvs]
        revisions = {uid: kv.mod_revision for uid, kv in zip(ids, result.range(0).kvs, strict=True)}
        wanted = [uid for uid in ids if uid is not None and uid in decl.by_id]
        claims = self._read_claims(namespace, task_id, wanted)
        out = []
        for uid in wanted:
            claim_kv, claim = claims.get(uid, (None, None))
            if claim_kv is None or claim is None or claim_kv.mod_revision != revisions[uid]:
                continue  # released or recorded meanwhile
            if claim.status is not UnitStatus.IN_PROGRESS or claim.node != node_id:
                continue
            got = Claim(decl.by_id[uid], claim_kv.mod_revision, claim.attempts, claim.error)
            self._remember((namespace, task_id, version), uid, (node_id, got))
            out.append(got)
        return out

    def _read_claims(
        self, namespace: str, task_id: str, unit_ids: Sequence[str]
    ) -> dict[str, tuple[t.KeyValue, UnitClaim | None]]:
        out: dict[str, tuple[t.KeyValue, UnitClaim | None]] = {}
        for start in range(0, len(unit_ids), _BATCH):
            batch = unit_ids[start : start + _BATCH]
            result = self.m.client.txn(
                success=[t.get(self.keys.unit_claim(namespace, task_id, uid)) for uid in batch]
            )
            for index, uid in enumerate(batch):
                kv = result.range(index).first()
                if kv is not None:
                    out[uid] = (kv, self._claim_of(kv))
        return out

    # ---- recording ------------------------------------------------------------------------

    def _holder(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        node_id: str,
        claim: Claim | None,
        *,
        completing: bool = True,
    ) -> tuple[Claim, UnitClaim | None]:
        """``node_id``'s claim of ``unit_id``, and the stored claim when it is no longer
        IN_PROGRESS: from the caller, this process's claims, or one read. Raises
        :class:`UnitClaimError` when it does not hold it (the claim is returned as read when it
        is COMPLETED by it), and :class:`TaskNotRunningError` when the run ended (a FINISHED
        one passes when ``completing``: a completion recorded again is a no-op)."""
        run = (namespace, task_id, version)
        if claim is not None:
            return claim, None
        held = self._held_here(run, unit_id)
        if held is not None and held[0] == node_id:
            return held[1], None
        result = self.m.client.txn(success=self._why_reads(namespace, task_id, unit_id))
        if completing:
            self._check_live_or_done(namespace, task_id, version, result)
        else:
            self._check_live(namespace, task_id, version, result)
        kv = result.range(2).first()
        stored = self._claim_of(kv)
        if kv is None or stored is None or stored.version != version:
            raise UnitClaimError(unit_id, node_id, None)
        if stored.node != node_id or stored.status is UnitStatus.PENDING:
            holder = None if stored.status is UnitStatus.PENDING else stored.node  # PENDING: none
            raise UnitClaimError(unit_id, node_id, holder)
        spec = self.decl_of(self.m.known_run(namespace, task_id, version), namespace, task_id)
        got = Claim(spec.by_id[unit_id], kv.mod_revision, stored.attempts, stored.error)
        return got, None if stored.status is UnitStatus.IN_PROGRESS else stored

    def _check_live_or_done(
        self, namespace: str, task_id: str, version: int, result: t.TxnResult
    ) -> None:
        """Like :meth:`_check_live`, but a run FINISHED passes (a completion recorded again
        after the last one is a no-op)."""
        record_kv = result.range(0).first()
        if record_kv is None or record_kv.mod_revision != version:
            raise TaskNotFoundError(namespace, task_id, version)
        outcome_kv = result.range(1).first()
        if outcome_kv is None:
            return
        try:
            status = OutcomeRecord.decode(outcome_kv.value).status
        except CorruptRecordError:
            raise TaskNotRunningError(namespace, task_id, version, "ended") from None
        if status is not TaskStatus.FINISHED:
            raise TaskNotRunningError(namespace, task_id, version, status.value)

    def complete(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        node_id: str,
        known: KnownRun,
        claim: Claim | None = None,
        *,
        take_ahead: bool = False,
    ) -> Task:
        """Record ``unit_id`` COMPLETED by its claimant ``node_id``; FINISHED in the same
        transaction when it is the last unit. ``claim``: the caller's, when it holds it (else
        this process's claims are looked up, or the claim is read). ``take_ahead``: also take
        the node's next ticket, for its next claim through this object (a Scheduler's unit
        desk, which looks for hand-outs lost if it stops first). Returns the run after the
        call.

        Raises :class:`UnitClaimError`, :class:`TaskNotFoundError`,
        :class:`TaskNotRunningError`, :class:`EtcdError`.
        """
        decl = self.decl_of(known, namespace, task_id)
        spec = decl.by_id.get(unit_id)
        if spec is None:
            raise InvalidTaskError(f"task {namespace}/{task_id} has no unit {unit_id!r}", "unit_id")
        run = (namespace, task_id, version)
        held, done = self._holder(namespace, task_id, version, unit_id, node_id, claim)
        claim_revision, attempts = held.revision, held.attempts
        if done is not None:
            return self._settled(namespace, task_id, version, unit_id, node_id, known, done)
        keys = self.keys
        token = _token()
        claim_key = keys.unit_claim(namespace, task_id, unit_id)
        count_key = keys.units_completed(namespace, task_id)
        group_key = keys.group_count(namespace, task_id, spec.group)
        now = self.m.now()
        outcome = OutcomeRecord(TaskStatus.FINISHED, now, token)
        completed = UnitClaim(version, UnitStatus.COMPLETED, node_id, attempts, token, held.error)
        hand = self._hand(namespace, task_id, version, node_id)
        ahead = self._ahead_counter(namespace, task_id, node_id, hand, decl) if take_ahead else None
        ahead_ops = [] if ahead is None else [t.put(ahead[1], b""), t.get(ahead[1], keys_only=True)]
        result = self.m.client.txn(
            compare=[
                *self.m._live(namespace, task_id, version),
                t.mod_equals(claim_key, claim_revision),
            ],
            success=[
                t.put(claim_key, completed.encode()),
                t.delete(keys.unit_held(namespace, task_id, node_id, unit_id)),
                t.put(count_key, b""),
                t.put(group_key, b""),
                t.nested_txn(
                    compare=[t.version_equals(count_key, len(decl.units) - 1)],
                    success=[t.put(keys.outcome(namespace, task_id), outcome.encode())],
                ),
                t.nested_txn(
                    compare=[t.version_equals(group_key, decl.group_sizes[spec.group] - 1)],
                    success=[
                        t.put(
                            keys.group(namespace, task_id, spec.group),
                            GroupMark(version, now).encode(),
                        )
                    ],
                ),
                t.get(keys.state(namespace, task_id)),
                *ahead_ops,
                t.get_prefix(keys.task_attempts(namespace, task_id)),  # node attempts, if any
            ],
            failure=self._why_reads(namespace, task_id, unit_id),
        )
        if result.succeeded:
            self._forget(run, unit_id)
            if ahead is not None:
                kv = result.range(8).first()
                with self._lock:
                    hand.ahead[ahead[0]].append(0 if kv is None else kv.version)
            finished = result.nested(4).succeeded
            return self.task(
                namespace,
                task_id,
                version,
                known,
                outcome if finished else None,
                result.range(6).first(),
                result.range(7 + len(ahead_ops)).kvs,
            )
        again = None
        if claim is None:  # the public path: the node holds whatever claim is current

            def again(held: Claim) -> Task:
                return self.complete(namespace, task_id, version, unit_id, node_id, known, held)

        return self._explain(
            namespace, task_id, version, unit_id, node_id, known, result, token, again
        )

    def _settled(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        node_id: str,
        known: KnownRun,
        claim: UnitClaim,
    ) -> Task:
        """A completion of a unit ``node_id`` already completed: a no-op returning the run."""
        if claim.status is not UnitStatus.COMPLETED:
            raise UnitClaimError(unit_id, node_id, claim.node, f", {claim.status.value}")
        task = self.m.get_task(namespace, task_id)
        if task is None or task.version != version:
            raise TaskNotFoundError(namespace, task_id, version)
        return task

    def _explain(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        node_id: str,
        known: KnownRun,
        result: t.TxnResult,
        token: str,
        again: Callable[[Claim], Task] | None = None,
        *,
        completing: bool = True,
    ) -> Task:
        """After a unit transaction's compare failed: our own earlier write (a lost
        response), or why not — what :meth:`_holder`'s read would have said. ``again``: how
        to record once more when the node holds the unit IN_PROGRESS under another claim
        than the one compared (this process remembered an older one: the unit was given back
        and claimed again by the node elsewhere); None: that is a :class:`UnitClaimError`."""
        self._forget((namespace, task_id, version), unit_id)
        kv = result.range(2).first()
        claim = self._claim_of(kv)
        if claim is not None and claim.token == token:
            task = self.m.get_task(namespace, task_id)
            if task is None or task.version != version:
                raise TaskNotFoundError(namespace, task_id, version)
            return task
        if completing:
            self._check_live_or_done(namespace, task_id, version, result)
        else:
            self._check_live(namespace, task_id, version, result)
        if claim is None or kv is None or claim.version != version:
            raise UnitClaimError(unit_id, node_id, None)
        mine, status = claim.node == node_id, claim.status
        if mine and status is UnitStatus.COMPLETED and completing:
            return self._settled(namespace, task_id, version, unit_id, node_id, known, claim)
        if mine and status is UnitStatus.IN_PROGRESS and again is not None:
            spec = self.decl_of(known, namespace, task_id).by_id[unit_id]
            return again(Claim(spec, kv.mod_revision, claim.attempts, claim.error))
        holder = None if mine or status is UnitStatus.PENDING else claim.node
        state = f", {status.value}"
        if mine and status is not UnitStatus.COMPLETED:
            state += ", given back meanwhile"
        raise UnitClaimError(unit_id, node_id, holder, state)

    def fail(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        node_id: str,
        error: str,
        known: KnownRun,
        claim: Claim | None = None,
    ) -> Task:
        """Record a failed attempt of ``unit_id`` by its claimant. With attempts left
        (``policy.max_attempts`` per unit) the unit goes back to the pool, claimable by any
        eligible node after the backoff; the last attempt makes it FAILED and the run FAILED
        (``error`` verbatim, ``failed_node``, ``failed_unit``).

        Raises :class:`UnitClaimError`, :class:`TaskNotFoundError`,
        :class:`TaskNotRunningError`, :class:`EtcdError`.
        """
        decl = self.decl_of(known, namespace, task_id)
        spec = decl.by_id.get(unit_id)
        if spec is None:
            raise InvalidTaskError(f"task {namespace}/{task_id} has no unit {unit_id!r}", "unit_id")
        held, done = self._holder(
            namespace, task_id, version, unit_id, node_id, claim, completing=False
        )
        claim_revision, attempts = held.revision, held.attempts
        if done is not None:
            raise UnitClaimError(unit_id, node_id, None, f", {done.status.value}")
        keys = self.keys
        token = _token()
        now = self.m.now()
        message = error or "failed"
        policy = known.record.policy
        claim_key = keys.unit_claim(namespace, task_id, unit_id)
        writes: list[t.Op] = [t.delete(keys.unit_held(namespace, task_id, node_id, unit_id))]
        if attempts + 1 < policy.max_attempts:
            delay = policy.backoff(attempts + 1)
            writes += [
                t.put(
                    claim_key,
                    UnitClaim(
                        version, UnitStatus.PENDING, node_id, attempts + 1, token, message
                    ).encode(),
                ),
                t.put(
                    keys.pool(namespace, task_id, unit_id),
                    PoolEntry(
                        version, _ms(delay), now + delay, spec.node, attempts + 1, message
                    ).encode(),
                ),
                t.get(keys.state(namespace, task_id)),
            ]
            outcome = None
        else:
            outcome = OutcomeRecord(
                TaskStatus.FAILED, now, token, message, node=node_id, unit=unit_id
            )
            writes += [
                t.put(
                    claim_key,
                    UnitClaim(
                        version, UnitStatus.FAILED, node_id, attempts + 1, token, message
                    ).encode(),
                ),
                t.put(keys.outcome(namespace, task_id), outcome.encode()),
                t.get(keys.state(namespace, task_id)),
            ]
        writes.append(t.get_prefix(keys.task_attempts(namespace, task_id)))  # node attempts
        result = self.m.client.txn(
            compare=[
                *self.m._live(namespace, task_id, version),
                t.mod_equals(claim_key, claim_revision),
            ],
            success=writes,
            failure=self._why_reads(namespace, task_id, unit_id),
        )
        if result.succeeded:
            self._forget((namespace, task_id, version), unit_id)
            state_kv, attempt_kvs = result.range(3).first(), result.range(4).kvs
            return self.task(namespace, task_id, version, known, outcome, state_kv, attempt_kvs)
        again = None
        if claim is None:  # the public path: the node holds whatever claim is current

            def again(held: Claim) -> Task:
                return self.fail(namespace, task_id, version, unit_id, node_id, error, known, held)

        return self._explain(
            namespace,
            task_id,
            version,
            unit_id,
            node_id,
            known,
            result,
            token,
            again,
            completing=False,
        )

    def progress(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        node_id: str,
        progress: Progress,
    ) -> None:
        """Store the latest progress of a unit (one round trip, while the run is live).
        Raises :class:`TaskNotFoundError`, :class:`TaskNotRunningError`, :class:`EtcdError`."""
        result = self.m.client.txn(
            compare=self.m._live(namespace, task_id, version),
            success=[
                t.put(
                    self.keys.unit_progress(namespace, task_id, unit_id),
                    encode_unit_progress(progress, node_id),
                )
            ],
            failure=self._why_reads(namespace, task_id, unit_id),
        )
        if not result.succeeded:
            self._check_live(namespace, task_id, version, result)

    # ---- reading --------------------------------------------------------------------------

    def get_units(self, namespace: str, task_id: str, version: int) -> dict[str, Unit]:
        """Every unit of ``version`` in declaration order, read at one revision with the run.
        A restored FINISHED run (no claims: a snapshot holds none) shows every unit COMPLETED.
        Raises :class:`TaskNotFoundError`, :class:`InvalidTaskError` (not a unit task),
        :class:`CorruptRecordError` (the run cannot be read), :class:`EtcdError`."""
        keys, read = self.keys, self.m.read
        result = self.m._read(
            [
                *read.run_ops(namespace, task_id),
                t.get_prefix(keys.unit_claims(namespace, task_id)),
                t.get_prefix(keys.unit_progresses(namespace, task_id)),
            ]
        )
        run = read.run_from(namespace, task_id, result)
        if run is None or run.task.version != version:
            raise TaskNotFoundError(namespace, task_id, version)
        if run.decl is None:
            raise InvalidTaskError(f"task {namespace}/{task_id} has no units", "task_id")
        claims: dict[str, UnitClaim] = {}
        prefix = keys.unit_claims(namespace, task_id)
        for kv in result.range(read.RUN_OPS).kvs:
            uid = Keys.name_under(prefix, kv.key)
            claim = self._claim_of(kv)
            if uid is not None and claim is not None and claim.version == version:
                claims[uid] = claim
        progress: dict[str, Progress] = {}
        prefix = keys.unit_progresses(namespace, task_id)
        for kv in result.range(read.RUN_OPS + 1).kvs:
            uid = Keys.name_under(prefix, kv.key)
            if uid is None:
                continue
            try:
                progress[uid] = decode_progress(kv.value)
            except CorruptRecordError as exc:
                self.m._skip(kv.key, exc)
        unclaimed = (
            UnitStatus.COMPLETED if run.task.status is TaskStatus.FINISHED else UnitStatus.PENDING
        )
        out: dict[str, Unit] = {}
        for spec in run.decl.units:
            claim = claims.get(spec.id)
            if claim is None:
                out[spec.id] = Unit(
                    spec.id, spec.group, None, unclaimed, 0, None, progress.get(spec.id)
                )
            else:
                out[spec.id] = Unit(
                    spec.id,
                    spec.group,
                    claim.node,
                    claim.status,
                    claim.attempts,
                    claim.error,
                    progress.get(spec.id),
                )
        return out

    # ---- giving back ----------------------------------------------------------------------

    def release_node(
        self, namespace: str, task_id: str, version: int, node_id: str
    ) -> tuple[int, str | None]:
        """Give the units a lost ``node_id`` holds back to the pool (not an attempt), and say
        whether the run must fail for it: ``(units given back, a unit with affinity to it
        that is not COMPLETED, or None)``. Raises :class:`EtcdError`."""
        try:
            known = self.m.known_run(namespace, task_id, version)
        except (TaskNotFoundError, CorruptRecordError):
            return 0, None
        decl = self.decl_of(known, namespace, task_id)
        released = 0
        prefix = self.keys.units_held(namespace, task_id, node_id)
        result = self.m.client.txn(
            compare=self.m._live(namespace, task_id, version),
            success=[t.get_prefix(prefix, keys_only=True)],
        )
        if not result.succeeded:
            return 0, None
        held = {
            uid: kv.mod_revision
            for kv in result.range(0).kvs
            if (uid := Keys.name_under(prefix, kv.key)) is not None and uid in decl.by_id
        }
        claims = self._read_claims(namespace, task_id, sorted(held))
        for uid, revision in sorted(held.items()):
            kv, claim = claims.get(uid, (None, None))
            if kv is None or claim is None or kv.mod_revision != revision:
                continue
            if self._give_back(
                namespace, task_id, version, decl.by_id[uid], claim, revision, holder=node_id
            ):
                released += 1
        stuck = None
        own = [u.id for u in decl.of_node(node_id)]
        if own:
            claims = self._read_claims(namespace, task_id, own)
            for uid in own:
                claim = claims.get(uid, (None, None))[1]
                if claim is None or claim.status is not UnitStatus.COMPLETED:
                    stuck = uid
                    break
        return released, stuck

    def _give_back(
        self,
        namespace: str,
        task_id: str,
        version: int,
        spec: UnitSpec,
        claim: UnitClaim | None,
        revision: int,
        *,
        holder: str | None,
    ) -> bool:
        """IF live AND the claim is still at ``revision`` (0: absent) THEN PENDING in the pool
        (not an attempt)."""
        keys = self.keys
        claim_key = keys.unit_claim(namespace, task_id, spec.id)
        attempts = 0 if claim is None else claim.attempts
        pending = UnitClaim(
            version,
            UnitStatus.PENDING,
            holder,
            attempts,
            _token(),
            None if claim is None else claim.error,
        )
        writes = [
            t.put(claim_key, pending.encode()),
            t.put(
                keys.pool(namespace, task_id, spec.id),
                PoolEntry(
                    version,
                    0,
                    self.m.now(),
                    spec.node,
                    attempts,
                    None if claim is None else claim.error,
                ).encode(),
            ),
        ]
        if holder is not None:
            writes.append(t.delete(keys.unit_held(namespace, task_id, holder, spec.id)))
        compare = t.mod_equals(claim_key, revision) if revision else t.create_equals(claim_key, 0)
        result = self.m.client.txn(
            compare=[*self.m._live(namespace, task_id, version), compare], success=writes
        )
        return result.succeeded

    def check_handouts(
        self, namespace: str, task_id: str, version: int, *, give_back: Iterable[str] = ()
    ) -> tuple[set[str], int]:
        """Look for units handed out by a ticket and never claimed (see the module doc): one
        small read when none is; otherwise the claim keys are read (keys only). Returns the
        missing units that are not in ``give_back``, and how many units were given to the pool:
        those missing now that are in ``give_back`` (missing at an earlier look too). Raises
        :class:`EtcdError`."""
        try:
            known = self.m.known_run(namespace, task_id, version)
        except (TaskNotFoundError, CorruptRecordError):
            return set(), 0
        decl = self.decl_of(known, namespace, task_id)
        keys = self.keys
        claims = keys.unit_claims(namespace, task_id)
        tickets = keys.unit_run(namespace, task_id) + b"aticket/"
        result = self.m.client.txn(
            compare=self.m._live(namespace, task_id, version),
            success=[
                t.get_prefix(claims, count_only=True),
                t.get(keys.unit_ticket(namespace, task_id), keys_only=True),
                t.get_prefix(tickets, keys_only=True),
            ],
        )
        if not result.succeeded:
            return set(), 0
        free_kv = result.range(1).first()
        issued = list(decl.free[: 0 if free_kv is None else free_kv.version])
        for kv in result.range(2).kvs:
            node = Keys.name_under(tickets, kv.key)
            if node is not None:
                issued += decl.of_node(node)[: kv.version]
        if result.range(0).count >= len(issued):
            return set(), 0
        listing = self.m.client.txn(
            compare=self.m._live(namespace, task_id, version),
            success=[t.get_prefix(claims, keys_only=True)],
        )
        if not listing.succeeded:
            return set(), 0
        present = {Keys.name_under(claims, kv.key) for kv in listing.range(0).kvs}
        missing = {spec.id for spec in issued if spec.id not in present}
        given = 0
        for uid in sorted(missing & set(give_back)):
            spec = decl.by_id[uid]
            given += self._give_back(namespace, task_id, version, spec, None, 0, holder=None)
        return missing - set(give_back), given

    # ---- group acknowledgements -----------------------------------------------------------

    def acked_groups(self, namespace: str, task_id: str, version: int, node_id: str) -> set[str]:
        """The groups ``node_id`` acknowledged (its ``group_completed`` returned) in this
        run. Raises :class:`EtcdError`."""
        prefix = self.keys.group_acks(namespace, task_id, node_id)
        result = self.m.client.txn(success=[t.get_prefix(prefix)])
        out = set()
        for kv in result.range(0).kvs:
            group = Keys.group_under(prefix, kv.key)
            try:
                mark = GroupMark.decode(kv.value)
            except CorruptRecordError as exc:
                self.m._skip(kv.key, exc)
                continue
            if group is not None and mark.version == version:
                out.add(group)
        return out

    def ack_group(
        self, namespace: str, task_id: str, version: int, node_id: str, group: str
    ) -> None:
        """Note that ``node_id``'s ``group_completed`` returned for ``group``: IF the run is
        still this version THEN put the acknowledgement. Raises :class:`EtcdError`."""
        validate_name(node_id, "node_id")
        self.m.client.txn(
            compare=[t.mod_equals(self.keys.task(namespace, task_id), version)],
            success=[
                t.put(
                    self.keys.group_ack(namespace, task_id, node_id, group),
                    GroupMark(version, self.m.now()).encode(),
                )
            ],
        )


def _ms(delay: timedelta) -> int:
    return int(delay.total_seconds() * 1000)
