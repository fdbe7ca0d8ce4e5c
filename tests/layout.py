"""Helpers shared by the unit tests of storage layout 2 (tests/unit/test_keys.py, test_records.py
and test_fuzz.py): the key a parsed key stands for, a check that parsing is canonical, one key of
every kind, the stored bytes of a value given as JSON, and hypothesis strategies of valid names,
times and records. Pure; no etcd."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import strategies as st

from distributedtask.exceptions import InvalidTaskError
from distributedtask.keys import (
    BUCKETS,
    AssignKey,
    AttemptKey,
    DoneKey,
    GroupKey,
    Keys,
    MemberKey,
    NodesKey,
    OutcomeKey,
    ParsedKey,
    PoolKey,
    ProgressKey,
    StateKey,
    TaskKey,
    UnitClaimKey,
    UnitDeclKey,
    UnitRunKey,
    bucket_of,
    prefix_range_end,
)
from distributedtask.model import Progress, TaskStatus, UnitSpec, UnitStatus, validate_name
from distributedtask.records import (
    DoneRecord,
    GroupMark,
    MemberRecord,
    NodeList,
    OutcomeRecord,
    PoolEntry,
    TaskRecord,
    UnitClaim,
    UnitDecl,
    decode_progress,
    encode_progress,
)

UTC = timezone.utc
MAX_VERSION = 2**63 - 1  # versions are etcd revisions: int64

KINDS = (
    "task",
    "outcome",
    "state",
    "nodes",
    "assign",
    "done",
    "attempt",
    "progress",
    "member",
    "unit-decl",
    "unit-claim",
    "unit-ticket",
    "unit-aticket",
    "unit-held",
    "unit-count",
    "unit-gcount",
    "unit-progress",
    "unit-acks",
    "pool",
    "group",
)
"""Every kind of key, in the order of :func:`one_of_each` (the ``unit-`` kinds but the
declaration lie under ``P/units/run/``)."""

UNIT_RUN_KINDS = ("ticket", "aticket", "held", "count", "gcount", "progress", "acks")
"""The kinds of :class:`UnitRunKey` (a claim is a :class:`UnitClaimKey`)."""


def range_of(kind: str) -> str:
    """The name, in :func:`range_roots`, of the one range of its own that holds ``kind``."""
    return "unit-run" if kind.startswith("unit-") and kind != "unit-decl" else kind


# ---- keys -------------------------------------------------------------------------------------


def valid_name(name: str) -> bool:
    try:
        validate_name(name, "name")
    except InvalidTaskError:
        return False
    return True


def in_range(key: bytes, prefix: bytes) -> bool:
    """Whether etcd's range ``[prefix, prefix_range_end(prefix))`` holds ``key``."""
    return prefix <= key < prefix_range_end(prefix)


def rebuild(keys: Keys, parsed: ParsedKey) -> bytes:
    """The key ``keys`` builds for what a key parsed to."""
    if isinstance(parsed, TaskKey):
        return keys.task(parsed.namespace, parsed.task_id)
    if isinstance(parsed, OutcomeKey):
        return keys.outcome(parsed.namespace, parsed.task_id)
    if isinstance(parsed, StateKey):
        return keys.state(parsed.namespace, parsed.task_id)
    if isinstance(parsed, AttemptKey):
        return keys.attempt(parsed.namespace, parsed.task_id, parsed.node_id)
    if isinstance(parsed, NodesKey):
        return keys.nodes(parsed.namespace, parsed.task_id)
    if isinstance(parsed, AssignKey):
        return keys.assign(parsed.bucket, parsed.namespace, parsed.task_id)
    if isinstance(parsed, DoneKey):
        return keys.done(parsed.namespace, parsed.task_id, parsed.node_id)
    if isinstance(parsed, ProgressKey):
        return keys.progress(parsed.namespace, parsed.task_id, parsed.version, parsed.node_id)
    if isinstance(parsed, UnitDeclKey):
        return keys.unit_decl(parsed.namespace, parsed.task_id)
    if isinstance(parsed, UnitClaimKey):
        return keys.unit_claim(parsed.namespace, parsed.task_id, parsed.unit_id)
    if isinstance(parsed, UnitRunKey):
        return _rebuild_unit_run(keys, parsed)
    if isinstance(parsed, PoolKey):
        return keys.pool(parsed.namespace, parsed.task_id, parsed.unit_id)
    if isinstance(parsed, GroupKey):
        return keys.group(parsed.namespace, parsed.task_id, parsed.group)
    assert isinstance(parsed, MemberKey), parsed
    return keys.member(parsed.node_id)


def _rebuild_unit_run(keys: Keys, parsed: UnitRunKey) -> bytes:
    ns, tid, names = parsed.namespace, parsed.task_id, parsed.names
    builders: dict[str, Callable[..., bytes]] = {
        "ticket": keys.unit_ticket,
        "aticket": keys.unit_node_ticket,
        "held": keys.unit_held,
        "count": keys.units_completed,
        "gcount": keys.group_count,
        "progress": keys.unit_progress,
        "acks": keys.group_ack,
    }
    return builders[parsed.kind](ns, tid, *names)


def one_of_each(
    ns: str = "a",
    tid: str = "b",
    node: str = "c",
    version: int = 1,
    bucket: int | None = None,
    unit: str | None = None,
    group: str | None = None,
) -> dict[str, ParsedKey]:
    """One parsed key of every kind (the assignment in ``node``'s bucket unless told; the unit
    and the group named ``node`` unless told)."""
    unit = node if unit is None else unit
    group = node if group is None else group
    return {
        "task": TaskKey(ns, tid),
        "outcome": OutcomeKey(ns, tid),
        "state": StateKey(ns, tid),
        "nodes": NodesKey(ns, tid),
        "assign": AssignKey(bucket_of(node) if bucket is None else bucket, ns, tid),
        "done": DoneKey(ns, tid, node),
        "attempt": AttemptKey(ns, tid, node),
        "progress": ProgressKey(ns, tid, version, node),
        "member": MemberKey(node),
        "unit-decl": UnitDeclKey(ns, tid),
        "unit-claim": UnitClaimKey(ns, tid, unit),
        "unit-ticket": UnitRunKey(ns, tid, "ticket", ()),
        "unit-aticket": UnitRunKey(ns, tid, "aticket", (node,)),
        "unit-held": UnitRunKey(ns, tid, "held", (node, unit)),
        "unit-count": UnitRunKey(ns, tid, "count", ()),
        "unit-gcount": UnitRunKey(ns, tid, "gcount", (group,)),
        "unit-progress": UnitRunKey(ns, tid, "progress", (unit,)),
        "unit-acks": UnitRunKey(ns, tid, "acks", (node, group)),
        "pool": PoolKey(ns, tid, unit),
        "group": GroupKey(ns, tid, group),
    }


def built(
    keys: Keys,
    ns: str = "a",
    tid: str = "b",
    node: str = "c",
    version: int = 1,
    bucket: int | None = None,
    unit: str | None = None,
    group: str | None = None,
) -> dict[str, bytes]:
    """One key of every kind, as ``keys`` builds it (see :func:`one_of_each`)."""
    parsed = one_of_each(ns, tid, node, version, bucket, unit, group)
    return {kind: rebuild(keys, key) for kind, key in parsed.items()}


def range_roots(keys: Keys) -> dict[str, bytes]:
    """Every prefix a reader ranges over or watches, by what it holds."""
    roots = {
        "cluster": keys.cluster,
        "task": keys.all_tasks(),
        "outcome": keys.all_outcomes(),
        "state": keys.all_states(),
        "member": keys.all_members(),
        "nodes": keys.all_nodes(),
        "assign": keys.all_assignments(),
        "done": keys.all_done(),
        "attempt": keys.all_attempts(),
        "progress": keys.all_progress(),
        "unit-decl": keys.all_unit_decls(),
        "unit-run": keys.all_unit_runs(),
        "pool": keys.all_pool(),
        "group": keys.all_groups(),
    }
    roots.update({f"bucket {b}": keys.bucket(b) for b in range(BUCKETS)})
    roots.update({f"legacy {root!r}": root for root in keys.legacy})
    return roots


def check_parse(keys: Keys, key: bytes) -> ParsedKey | None:
    """Parse ``key`` and check the answer is canonical: ``None``, or a key of valid names that
    the builders make byte for byte (so one thing has exactly one key)."""
    parsed = keys.parse(key)
    if parsed is None:
        return None
    assert rebuild(keys, parsed) == key
    groups = _groups_of(parsed)
    values = list(vars(parsed).values())
    if isinstance(parsed, UnitRunKey):
        assert parsed.kind in UNIT_RUN_KINDS, parsed
        values = [parsed.namespace, parsed.task_id, *parsed.names]
    for name in values:
        if isinstance(name, str) and not (name == "" and name in groups):
            validate_name(name, "name")
    if isinstance(parsed, AssignKey):
        assert type(parsed.bucket) is int and 0 <= parsed.bucket < BUCKETS
    if isinstance(parsed, ProgressKey):
        assert type(parsed.version) is int and 0 < parsed.version <= MAX_VERSION
    return parsed


def _groups_of(parsed: ParsedKey) -> list[str]:
    """The group names a parsed key holds (the only names that may be ``""``)."""
    if isinstance(parsed, GroupKey):
        return [parsed.group]
    if isinstance(parsed, UnitRunKey) and parsed.kind in ("gcount", "acks"):
        return [parsed.names[-1]]
    return []


# ---- stored values ----------------------------------------------------------------------------

Decoder = Callable[[bytes], object]
DECODERS: dict[str, Decoder] = {
    "task": TaskRecord.decode,
    "nodes": NodeList.decode,
    "outcome": OutcomeRecord.decode,
    "done": DoneRecord.decode,
    "progress": decode_progress,
    "member": MemberRecord.decode,
    "decl": UnitDecl.decode,
    "claim": UnitClaim.decode,
    "pool": PoolEntry.decode,
    "group": GroupMark.decode,
}
"""Every decoder of a stored value, by the kind of value (a unit's progress is decoded as a
node's: ``decode_progress``)."""

RECORD_TYPES = (
    TaskRecord,
    NodeList,
    OutcomeRecord,
    DoneRecord,
    MemberRecord,
    UnitDecl,
    UnitClaim,
    PoolEntry,
    GroupMark,
)


def encode(value: object) -> bytes:
    """The stored bytes of a record (or a Progress)."""
    if isinstance(value, Progress):
        return encode_progress(value)
    assert isinstance(value, RECORD_TYPES)
    return value.encode()


def stored(
    kind: str,
    data: object,
    payload: bytes = b"",
    dumps: Callable[[Any], bytes] = orjson.dumps,
) -> bytes:
    """The bytes of a value of ``kind`` whose JSON is ``data``: a task record is that JSON as its
    header line, a newline, then ``payload``; a unit declaration is that JSON compressed
    (zlib); every other value is the JSON alone."""
    if kind == "task":
        return dumps(data) + b"\n" + payload
    if kind == "decl":
        return zlib.compress(dumps(data))
    return dumps(data)


def json_of(kind: str, raw: bytes) -> Any:
    """The JSON of a stored value (the header line of a task record, the inflated JSON of a
    unit declaration)."""
    if kind == "decl":
        return orjson.loads(zlib.decompress(raw))
    return orjson.loads(raw.split(b"\n", 1)[0] if kind == "task" else raw)


# ---- strategies -------------------------------------------------------------------------------

# Names with the characters that matter to the key schema and the JSON forms mixed in.
names = st.text(
    alphabet=st.one_of(st.sampled_from("/%.~ -_aZ09ü€😀"), st.characters()),
    min_size=1,
    max_size=16,
).filter(valid_name)
versions = st.integers(1, MAX_VERSION)
buckets = st.integers(0, BUCKETS - 1)
tokens = st.text(max_size=16)
texts = st.text(max_size=20)

# Milliseconds in the range the records and RFC 3339 can carry (years 1..9999), aware UTC.
_MIN = datetime(1, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)  # not Go's zero time: that means "unset"
_MAX = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
moments = st.integers(0, (_MAX - _MIN) // timedelta(milliseconds=1)).map(
    lambda ms: _MIN + timedelta(milliseconds=ms)
)

# Payloads are raw bytes after the header line: newlines and JSON-looking bytes included.
payloads = st.one_of(
    st.binary(max_size=64),
    st.lists(
        st.sampled_from([b"\n", b"\r\n", b"{", b"}", b'{"v":2}', b"\x00", b"\xff", b"p"]),
        max_size=8,
    ).map(b"".join),
)
node_sets = st.frozensets(names, min_size=1, max_size=6)

task_records = st.builds(
    TaskRecord,
    payload=payloads,
    started_at=moments,
    node_count=st.integers(1, 2**31),
    token=tokens,
    version=st.none() | versions,
    unit_count=st.just(0) | st.integers(1, 2**31),
)
node_lists = st.builds(NodeList, node_sets)
outcome_records = st.builds(
    OutcomeRecord,
    status=st.sampled_from([s for s in TaskStatus if s.terminal]),
    finished_at=moments,
    token=tokens,
    error=st.none() | texts,
    node=st.none() | names,
    unit=st.none() | names,
)
done_records = st.builds(DoneRecord, version=versions, at=moments, token=tokens)
progresses = st.builds(
    Progress, fraction=st.floats(0, 1), message=st.text(max_size=40), updated_at=moments
)
member_records = st.builds(
    MemberRecord, node_id=names, namespaces=st.frozensets(names, max_size=4), started_at=moments
)
groups = st.just("") | names
"""A unit's group: ``""`` (no group) or a name."""
unit_specs = st.builds(UnitSpec, id=names, group=groups, node=st.none() | names)
unit_decls = st.lists(unit_specs, min_size=1, max_size=8, unique_by=lambda u: u.id).map(
    lambda units: UnitDecl(tuple(units))
)
unit_claims = st.builds(
    UnitClaim,
    version=versions,
    status=st.sampled_from(UnitStatus),
    node=st.none() | names,
    attempts=st.integers(0, 2**31),
    token=tokens,
    error=st.none() | texts,
)
pool_entries = st.builds(
    PoolEntry,
    version=versions,
    delay_ms=st.integers(0, 2**40),
    not_before=moments,
    node=st.none() | names,
    attempts=st.integers(0, 2**31),
)
group_marks = st.builds(GroupMark, version=versions, at=moments)
RECORDS: dict[str, st.SearchStrategy[Any]] = {
    "task": task_records,
    "nodes": node_lists,
    "outcome": outcome_records,
    "done": done_records,
    "progress": progresses,
    "member": member_records,
    "decl": unit_decls,
    "claim": unit_claims,
    "pool": pool_entries,
    "group": group_marks,
}
"""A strategy of valid values of every kind of :data:`DECODERS`."""
