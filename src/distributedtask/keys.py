"""The key schema (layout 2): the only module that builds or parses etcd keys.

Under a prefix ``P`` (``"/distributedtask"`` by default)::

    P/format                                the layout marker (records.FORMAT_MARKER)
    P/cluster/tasks/<ns>/<id>               the task record of the current run: payload, start
                                            time, node count; never rewritten while it exists
    P/cluster/outcomes/<ns>/<id>            how the run ended; absent while it runs
    P/cluster/states/<ns>/<id>              paused or not, and the time spent paused
    P/cluster/members/<node>                a live Scheduler's membership (lease-bound)
    P/assign/<bucket>/<ns>/<id>             the run's nodes whose bucket is <bucket>
    P/nodes/<ns>/<id>                       every node of the run (one key)
    P/done/<ns>/<id>/<node>                 a node's completion of the current run
    P/attempts/<ns>/<id>/<node>             a node's failed attempts (the key's etcd version)
    P/progress/<ns>/<id>/<version>/<node>   a node's latest progress report on a run
    P/units/decl/<ns>/<id>                  a unit task's declared units (compressed, one key)
    P/units/run/<ns>/<id>/...               the state of a unit task's units (see below)
    P/cluster/pool/<ns>/<id>/<unit>         a unit given back to the pool (a retry, a lost
                                            node's unit): claimable again
    P/cluster/groups/<ns>/<id>/<=group>     a group whose units are all COMPLETED

Under ``P/units/run/<ns>/<id>/`` (one range, deleted with the run): ``claim/<unit>`` (a unit's
claim: its status, claimant, attempts), ``ticket`` (the shared counter that hands out the
units without affinity: its etcd version), ``aticket/<node>`` (the same, per node, for the
units with affinity to it), ``held/<node>/<unit>`` (the units a node holds IN_PROGRESS),
``count`` and ``gcount/<=group>`` (completed units, in all and per group: etcd versions),
``progress/<unit>``, ``acks/<node>/<=group>`` (the ``group_completed`` calls a node made) and
``paused`` (present while the task is PAUSED: no unit is handed out then).
No Scheduler watches ``P/units/``: a unit transition reaches only the etcd member that serves
it. A group segment is ``=`` and the escaped group name (``=`` alone: the group ``""``).

The layout follows one rule: *each watcher receives what concerns it*. Every Scheduler watches
``P/cluster/`` — task records, outcomes, run states and members, whose size does not grow
with the number of nodes of a task — and ``P/assign/<its bucket>/``, where a task names only
the nodes of that bucket. A node's bucket is a stable hash of its id into :data:`BUCKETS`
buckets, so one add delivers to each Scheduler a record and at most one short assignment, and
the bytes etcd sends grow with the number of Schedulers, not with its square. Completions
(``done``), failed attempts and progress are watched by no Scheduler: a completer counts the
``done`` keys of its task, and ``wait``, the CLI and whoever asks read or watch them per task.

The add transaction writes the record — which names the nodes of a run of at most
``records.INLINE_NODES`` nodes, so that is all it writes for one — and for a larger run the node
list and one assignment per bucket that has a node (at most :data:`BUCKETS`): a bounded number
of operations whatever the number of nodes, so no cap from etcd's ``--max-txn-ops``. Per-node
keys (``done``, ``attempts``, ``progress``) are written lazily by the node that reports.

Every name segment is percent-encoded (``urllib.parse.quote`` with no safe characters), so a
``/`` inside a namespace, id or node id can never forge another key, and every prefix we range
over ends in ``/`` so id ``a`` never matches id ``ab``. Keys are UTF-8 bytes.

Parsing is total: :meth:`Keys.parse` returns ``None`` for any key that is not ours (foreign keys
under the prefix, bad escapes, wrong shape) rather than raising. Pure functions; thread-safe.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from .exceptions import InvalidTaskError
from .model import validate_name

__all__ = [
    "BUCKETS",
    "AssignKey",
    "AttemptKey",
    "DoneKey",
    "GroupKey",
    "Keys",
    "MemberKey",
    "NodesKey",
    "OutcomeKey",
    "PoolKey",
    "ProgressKey",
    "StateKey",
    "TaskKey",
    "UnitClaimKey",
    "UnitDeclKey",
    "UnitRunKey",
    "bucket_of",
    "prefix_range_end",
]

BUCKETS = 64
"""How many assignment buckets a task's nodes are spread over; part of the layout."""


def _esc(segment: str) -> str:
    return quote(segment, safe="", encoding="utf-8", errors="strict")


_PLAIN = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9_.~-]{0,255}")  # its own escape, a valid name


def _unesc(segment: str) -> str | None:
    """The name a segment encodes, or None if it is not exactly what :func:`_esc` produces
    from a valid name."""
    if _PLAIN.fullmatch(segment) and segment not in (".", ".."):
        return segment  # the common case, without decoding and re-encoding
    return _unesc_general(segment)


@functools.lru_cache(maxsize=4096)
def _unesc_general(segment: str) -> str | None:
    try:
        name = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not name or _esc(name) != segment:
        return None
    try:
        return validate_name(name, "name")
    except InvalidTaskError:
        return None


def _version_segment(segment: str) -> int | None:
    canonical = (
        segment.isascii()
        and segment.isdigit()
        and len(segment) <= 19
        and segment == str(int(segment))
        and 0 < int(segment) < 2**63
    )
    return int(segment) if canonical else None


def _group_segment(group: str) -> str:
    return "=" + _esc(group)


def _group_of(segment: str) -> str | None:
    """The group a group segment names, or None when it is not one."""
    if not segment.startswith("="):
        return None
    return "" if segment == "=" else _unesc(segment[1:])


_UNIT_RUN_SHAPES = {
    "paused": 0,
    "claim": 1,
    "ticket": 0,
    "aticket": 1,
    "held": 2,
    "count": 0,
    "gcount": 1,
    "progress": 1,
    "acks": 2,
}
"""The kinds of key under ``P/units/run/<ns>/<id>/`` and how many segments follow each."""
_GROUP_LAST = frozenset({"gcount", "acks"})
"""The kinds whose last segment is a group."""


def prefix_range_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that makes ``[prefix, range_end)`` exactly the keys under prefix."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


@functools.lru_cache(maxsize=65536)
def bucket_of(node_id: str) -> int:
    """The assignment bucket of a node: a stable hash (CRC-32 of its UTF-8 id) mod BUCKETS."""
    return zlib.crc32(node_id.encode("utf-8")) % BUCKETS


@dataclass(frozen=True)
class TaskKey:
    """``P/cluster/tasks/<namespace>/<task_id>``."""

    namespace: str
    task_id: str


@dataclass(frozen=True)
class OutcomeKey:
    """``P/cluster/outcomes/<namespace>/<task_id>``."""

    namespace: str
    task_id: str


@dataclass(frozen=True)
class StateKey:
    """``P/cluster/states/<namespace>/<task_id>``."""

    namespace: str
    task_id: str


@dataclass(frozen=True)
class AttemptKey:
    """``P/attempts/<namespace>/<task_id>/<node_id>``."""

    namespace: str
    task_id: str
    node_id: str


@dataclass(frozen=True)
class NodesKey:
    """``P/nodes/<namespace>/<task_id>``."""

    namespace: str
    task_id: str


@dataclass(frozen=True)
class AssignKey:
    """``P/assign/<bucket>/<namespace>/<task_id>``."""

    bucket: int
    namespace: str
    task_id: str


@dataclass(frozen=True)
class DoneKey:
    """``P/done/<namespace>/<task_id>/<node_id>``."""

    namespace: str
    task_id: str
    node_id: str


@dataclass(frozen=True)
class ProgressKey:
    """``P/progress/<namespace>/<task_id>/<version>/<node_id>``."""

    namespace: str
    task_id: str
    version: int
    node_id: str


@dataclass(frozen=True)
class MemberKey:
    """``P/cluster/members/<node_id>``."""

    node_id: str


@dataclass(frozen=True)
class UnitDeclKey:
    """``P/units/decl/<namespace>/<task_id>``."""

    namespace: str
    task_id: str


@dataclass(frozen=True)
class UnitClaimKey:
    """``P/units/run/<namespace>/<task_id>/claim/<unit_id>``."""

    namespace: str
    task_id: str
    unit_id: str


@dataclass(frozen=True)
class UnitRunKey:
    """Any other key under ``P/units/run/<namespace>/<task_id>/``: ``kind`` is its first
    segment there and ``names`` the names after it (groups without their ``=``)."""

    namespace: str
    task_id: str
    kind: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class PoolKey:
    """``P/cluster/pool/<namespace>/<task_id>/<unit_id>``."""

    namespace: str
    task_id: str
    unit_id: str


@dataclass(frozen=True)
class GroupKey:
    """``P/cluster/groups/<namespace>/<task_id>/<=group>``."""

    namespace: str
    task_id: str
    group: str


ParsedKey = (
    TaskKey
    | UnitDeclKey
    | UnitClaimKey
    | UnitRunKey
    | PoolKey
    | GroupKey
    | OutcomeKey
    | StateKey
    | NodesKey
    | AssignKey
    | DoneKey
    | AttemptKey
    | ProgressKey
    | MemberKey
)

_BY_ID: dict[str, Callable[[str, str], ParsedKey]] = {
    "cluster/tasks": TaskKey,
    "cluster/outcomes": OutcomeKey,
    "cluster/states": StateKey,
    "nodes": NodesKey,
    "units/decl": UnitDeclKey,
}
"""The kinds of key named by (namespace, task id), by their place under the prefix."""
_BY_NODE: dict[str, Callable[[str, str, str], ParsedKey]] = {
    "done": DoneKey,
    "attempts": AttemptKey,
    "cluster/pool": PoolKey,
}
"""The kinds of key named by (namespace, task id, node id)."""

LAYOUT_SEGMENTS = frozenset(
    {"format", "cluster", "assign", "nodes", "done", "attempts", "progress", "units"}
)
LEGACY_SEGMENTS = frozenset({"tasks", "outcomes", "runs", "members"})
"""The top-level names of the 0.1 layout: still reserved, so a prefix never lies inside one."""
RESERVED_SEGMENTS = LAYOUT_SEGMENTS | LEGACY_SEGMENTS


class Keys:
    """Builds and parses every key under one prefix.

    ``prefix`` must be a non-empty string; a trailing ``/`` is ignored, so ``"/a"`` and
    ``"/a/"`` name the same tree. None of its ``/``-separated segments may be one of the names
    the schema uses below a prefix (:data:`RESERVED_SEGMENTS`): otherwise the tree of prefix
    ``/a/done`` would lie inside the keys of prefix ``/a``, and two prefixes must never meet.
    Raises :class:`ValueError`.
    """

    def __init__(self, prefix: str) -> None:
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ValueError(
                f"prefix must be a non-empty path such as '/distributedtask': {prefix!r}"
            )
        reserved = RESERVED_SEGMENTS.intersection(prefix.split("/"))
        if reserved:
            raise ValueError(f"prefix {prefix!r} uses the reserved segment {sorted(reserved)[0]!r}")
        self.prefix = prefix.rstrip("/")
        self.root = (self.prefix + "/").encode("utf-8")
        self.format = self.root + b"format"
        self.cluster = self.root + b"cluster/"
        self._tasks = self.cluster + b"tasks/"
        self._outcomes = self.cluster + b"outcomes/"
        self._states = self.cluster + b"states/"
        self._attempts = self.root + b"attempts/"
        self._members = self.cluster + b"members/"
        self._assign = self.root + b"assign/"
        self._nodes = self.root + b"nodes/"
        self._done = self.root + b"done/"
        self._progress = self.root + b"progress/"
        self._decls = self.root + b"units/decl/"
        self._unit_runs = self.root + b"units/run/"
        self._pool = self.cluster + b"pool/"
        self._groups = self.cluster + b"groups/"
        self.legacy = tuple(self.root + name.encode() + b"/" for name in sorted(LEGACY_SEGMENTS))
        """The ranges the 0.1 layout wrote (its records, outcomes, runs and members)."""

    def __repr__(self) -> str:
        return f"Keys({self.prefix!r})"

    # ---- builders -------------------------------------------------------------------------

    @staticmethod
    def _id(namespace: str, task_id: str) -> bytes:
        return f"{_esc(namespace)}/{_esc(task_id)}".encode()

    def task(self, namespace: str, task_id: str) -> bytes:
        return self._tasks + self._id(namespace, task_id)

    def all_tasks(self) -> bytes:
        """Prefix of every task record."""
        return self._tasks

    def outcome(self, namespace: str, task_id: str) -> bytes:
        return self._outcomes + self._id(namespace, task_id)

    def all_outcomes(self) -> bytes:
        return self._outcomes

    def state(self, namespace: str, task_id: str) -> bytes:
        return self._states + self._id(namespace, task_id)

    def all_states(self) -> bytes:
        return self._states

    def task_attempts(self, namespace: str, task_id: str) -> bytes:
        """Prefix of the failed-attempt counters of the current run of (ns, id)."""
        return self._attempts + self._id(namespace, task_id) + b"/"

    def attempt(self, namespace: str, task_id: str, node_id: str) -> bytes:
        return self.task_attempts(namespace, task_id) + _esc(node_id).encode()

    def all_attempts(self) -> bytes:
        return self._attempts

    def nodes(self, namespace: str, task_id: str) -> bytes:
        return self._nodes + self._id(namespace, task_id)

    def all_nodes(self) -> bytes:
        return self._nodes

    def bucket(self, bucket: int) -> bytes:
        """Prefix of the assignments of one bucket: what a Scheduler of that bucket watches.
        Raises :class:`ValueError` for a bucket outside ``range(BUCKETS)``."""
        if not 0 <= bucket < BUCKETS:
            raise ValueError(f"bucket must be in range({BUCKETS}), not {bucket!r}")
        return self._assign + b"%02x/" % bucket

    def assign(self, bucket: int, namespace: str, task_id: str) -> bytes:
        return self.bucket(bucket) + self._id(namespace, task_id)

    def all_assignments(self) -> bytes:
        return self._assign

    def task_done(self, namespace: str, task_id: str) -> bytes:
        """Prefix of the completions of the current run of (ns, id)."""
        return self._done + self._id(namespace, task_id) + b"/"

    def done(self, namespace: str, task_id: str, node_id: str) -> bytes:
        return self.task_done(namespace, task_id) + _esc(node_id).encode()

    def all_done(self) -> bytes:
        return self._done

    def all_progress(self) -> bytes:
        """Prefix of every progress key."""
        return self._progress

    def task_progress(self, namespace: str, task_id: str) -> bytes:
        return self._progress + self._id(namespace, task_id) + b"/"

    def version_progress(self, namespace: str, task_id: str, version: int) -> bytes:
        return self.task_progress(namespace, task_id) + f"{version}/".encode()

    def progress(self, namespace: str, task_id: str, version: int, node_id: str) -> bytes:
        return self.version_progress(namespace, task_id, version) + _esc(node_id).encode()

    # ---- units ----

    def unit_decl(self, namespace: str, task_id: str) -> bytes:
        return self._decls + self._id(namespace, task_id)

    def all_unit_decls(self) -> bytes:
        return self._decls

    def unit_run(self, namespace: str, task_id: str) -> bytes:
        """Prefix of every per-unit key of the current run of (ns, id)."""
        return self._unit_runs + self._id(namespace, task_id) + b"/"

    def all_unit_runs(self) -> bytes:
        return self._unit_runs

    def units_paused(self, namespace: str, task_id: str) -> bytes:
        """Present while a unit task is PAUSED: claims compare its absence."""
        return self.unit_run(namespace, task_id) + b"paused"

    def unit_claims(self, namespace: str, task_id: str) -> bytes:
        return self.unit_run(namespace, task_id) + b"claim/"

    def unit_claim(self, namespace: str, task_id: str, unit_id: str) -> bytes:
        return self.unit_claims(namespace, task_id) + _esc(unit_id).encode()

    def unit_ticket(self, namespace: str, task_id: str) -> bytes:
        return self.unit_run(namespace, task_id) + b"ticket"

    def unit_node_ticket(self, namespace: str, task_id: str, node_id: str) -> bytes:
        return self.unit_run(namespace, task_id) + b"aticket/" + _esc(node_id).encode()

    def units_held(self, namespace: str, task_id: str, node_id: str) -> bytes:
        """Prefix of the units ``node_id`` holds IN_PROGRESS."""
        return self.unit_run(namespace, task_id) + b"held/" + _esc(node_id).encode() + b"/"

    def unit_held(self, namespace: str, task_id: str, node_id: str, unit_id: str) -> bytes:
        return self.units_held(namespace, task_id, node_id) + _esc(unit_id).encode()

    def units_completed(self, namespace: str, task_id: str) -> bytes:
        return self.unit_run(namespace, task_id) + b"count"

    def group_counts(self, namespace: str, task_id: str) -> bytes:
        return self.unit_run(namespace, task_id) + b"gcount/"

    def group_count(self, namespace: str, task_id: str, group: str) -> bytes:
        return self.group_counts(namespace, task_id) + _group_segment(group).encode()

    def unit_progresses(self, namespace: str, task_id: str) -> bytes:
        return self.unit_run(namespace, task_id) + b"progress/"

    def unit_progress(self, namespace: str, task_id: str, unit_id: str) -> bytes:
        return self.unit_progresses(namespace, task_id) + _esc(unit_id).encode()

    def group_acks(self, namespace: str, task_id: str, node_id: str) -> bytes:
        return self.unit_run(namespace, task_id) + b"acks/" + _esc(node_id).encode() + b"/"

    def group_ack(self, namespace: str, task_id: str, node_id: str, group: str) -> bytes:
        return self.group_acks(namespace, task_id, node_id) + _group_segment(group).encode()

    def task_pool(self, namespace: str, task_id: str) -> bytes:
        return self._pool + self._id(namespace, task_id) + b"/"

    def pool(self, namespace: str, task_id: str, unit_id: str) -> bytes:
        return self.task_pool(namespace, task_id) + _esc(unit_id).encode()

    def all_pool(self) -> bytes:
        return self._pool

    def task_groups(self, namespace: str, task_id: str) -> bytes:
        return self._groups + self._id(namespace, task_id) + b"/"

    def group(self, namespace: str, task_id: str, group: str) -> bytes:
        return self.task_groups(namespace, task_id) + _group_segment(group).encode()

    def all_groups(self) -> bytes:
        return self._groups

    @staticmethod
    def group_under(prefix: bytes, key: bytes) -> str | None:
        """The group of a key one group segment below ``prefix``, or None."""
        if not key.startswith(prefix):
            return None
        try:
            segment = key[len(prefix) :].decode("ascii")
        except UnicodeDecodeError:
            return None
        return None if "/" in segment else _group_of(segment)

    def member(self, node_id: str) -> bytes:
        return self._members + _esc(node_id).encode()

    def all_members(self) -> bytes:
        return self._members

    # ---- parser ---------------------------------------------------------------------------

    @staticmethod
    def name_under(prefix: bytes, key: bytes) -> str | None:
        """The name of the one segment ``key`` has below ``prefix`` (a prefix ending in
        ``/`` that this class built), or None: what :meth:`parse` would say of that
        segment, without parsing the rest of the key again."""
        if not key.startswith(prefix):
            return None
        try:
            segment = key[len(prefix) :].decode("ascii")
        except UnicodeDecodeError:
            return None
        return None if "/" in segment else _unesc(segment)

    @staticmethod
    def _parse_group(parts: list[str]) -> GroupKey | None:
        if len(parts) != 4:
            return None
        ns, tid, group = _unesc(parts[1]), _unesc(parts[2]), _group_of(parts[3])
        return GroupKey(ns, tid, group) if ns and tid and group is not None else None

    @staticmethod
    def _parse_unit_run(parts: list[str]) -> UnitClaimKey | UnitRunKey | None:
        # parts: ["run", ns, id, kind, *rest]
        if len(parts) < 4:
            return None
        ns, tid, kind, rest = _unesc(parts[1]), _unesc(parts[2]), parts[3], parts[4:]
        if not ns or not tid or _UNIT_RUN_SHAPES.get(kind) != len(rest):
            return None
        names: list[str] = []
        for index, segment in enumerate(rest):
            last_is_group = kind in _GROUP_LAST and index == len(rest) - 1
            name = _group_of(segment) if last_is_group else _unesc(segment)
            if name is None:
                return None
            names.append(name)
        if kind == "claim":
            return UnitClaimKey(ns, tid, names[0])
        return UnitRunKey(ns, tid, kind, tuple(names))

    def parse(self, key: bytes) -> ParsedKey | None:
        """What ``key`` names, or ``None`` if it is not a key of this schema."""
        if not key.startswith(self.root):
            return None
        try:
            rest = key[len(self.root) :].decode("ascii")
        except UnicodeDecodeError:
            return None
        parts = rest.split("/")
        kind = parts[0]
        if kind in ("cluster", "units") and len(parts) >= 2:
            kind, parts = f"{kind}/{parts[1]}", parts[1:]
            if kind == "cluster/members":
                node = _unesc(parts[1]) if len(parts) == 2 else None
                return MemberKey(node) if node else None
            if kind == "cluster/groups":
                return self._parse_group(parts)
            if kind == "units/run":
                return self._parse_unit_run(parts)
        names = [_unesc(p) for p in parts[1:]]
        kind_of_id = _BY_ID.get(kind)
        if kind_of_id is not None and len(names) == 2:
            ns, tid = names
            return kind_of_id(ns, tid) if ns and tid else None
        kind_of_node = _BY_NODE.get(kind)
        if kind_of_node is not None and len(names) == 3:
            ns, tid, node = names
            return kind_of_node(ns, tid, node) if ns and tid and node else None
        if kind == "assign" and len(parts) == 4 and names[1] and names[2]:
            bucket = parts[1]
            hexadecimal = len(bucket) == 2 and all(c in "0123456789abcdef" for c in bucket)
            if hexadecimal and int(bucket, 16) < BUCKETS:
                return AssignKey(int(bucket, 16), names[1], names[2])
            return None
        if kind == "progress" and len(parts) == 5:
            ns, tid, node = names[0], names[1], names[3]
            version = _version_segment(parts[3])
            if ns and tid and node and version is not None:
                return ProgressKey(ns, tid, version, node)
        return None
