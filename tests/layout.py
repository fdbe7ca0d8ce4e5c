"""Helpers shared by the unit tests of storage layout 2 (tests/unit/test_keys.py, test_records.py
and test_fuzz.py): the key a parsed key stands for, a check that parsing is canonical, one key of
every kind, the stored bytes of a value given as JSON, and hypothesis strategies of valid names,
times and records. Pure; no etcd."""

from __future__ import annotations

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
    Keys,
    MemberKey,
    NodesKey,
    OutcomeKey,
    ParsedKey,
    ProgressKey,
    StateKey,
    TaskKey,
    bucket_of,
    prefix_range_end,
)
from distributedtask.model import Progress, TaskStatus, validate_name
from distributedtask.records import (
    DoneRecord,
    MemberRecord,
    NodeList,
    OutcomeRecord,
    TaskRecord,
    decode_progress,
    encode_progress,
)

UTC = timezone.utc
MAX_VERSION = 2**63 - 1  # versions are etcd revisions: int64

KINDS = ("task", "outcome", "state", "nodes", "assign", "done", "attempt", "progress", "member")
"""The nine kinds of key, in the order of :func:`one_of_each`."""

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
    assert isinstance(parsed, MemberKey), parsed
    return keys.member(parsed.node_id)


def one_of_each(
    ns: str = "a", tid: str = "b", node: str = "c", version: int = 1, bucket: int | None = None
) -> dict[str, ParsedKey]:
    """One parsed key of every kind (the assignment in ``node``'s bucket unless told)."""
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
    }


def built(
    keys: Keys,
    ns: str = "a",
    tid: str = "b",
    node: str = "c",
    version: int = 1,
    bucket: int | None = None,
) -> dict[str, bytes]:
    """One key of every kind, as ``keys`` builds it (see :func:`one_of_each`)."""
    parsed = one_of_each(ns, tid, node, version, bucket)
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
    for name in vars(parsed).values():
        if isinstance(name, str):
            validate_name(name, "name")
    if isinstance(parsed, AssignKey):
        assert type(parsed.bucket) is int and 0 <= parsed.bucket < BUCKETS
    if isinstance(parsed, ProgressKey):
        assert type(parsed.version) is int and 0 < parsed.version <= MAX_VERSION
    return parsed


# ---- stored values ----------------------------------------------------------------------------

Decoder = Callable[[bytes], object]
DECODERS: dict[str, Decoder] = {
    "task": TaskRecord.decode,
    "nodes": NodeList.decode,
    "outcome": OutcomeRecord.decode,
    "done": DoneRecord.decode,
    "progress": decode_progress,
    "member": MemberRecord.decode,
}
"""Every decoder of a stored value, by the kind of value."""


def encode(value: object) -> bytes:
    """The stored bytes of a record (or a Progress)."""
    if isinstance(value, Progress):
        return encode_progress(value)
    assert isinstance(value, (TaskRecord, NodeList, OutcomeRecord, DoneRecord, MemberRecord))
    return value.encode()


def stored(
    kind: str,
    data: object,
    payload: bytes = b"",
    dumps: Callable[[Any], bytes] = orjson.dumps,
) -> bytes:
    """The bytes of a value of ``kind`` whose JSON is ``data``: a task record is that JSON as its
    header line, a newline, then ``payload``; every other value is the JSON alone."""
    return dumps(data) + b"\n" + payload if kind == "task" else dumps(data)


def json_of(kind: str, raw: bytes) -> Any:
    """The JSON of a stored value (the header line of a task record)."""
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
)
node_lists = st.builds(NodeList, node_sets)
outcome_records = st.builds(
    OutcomeRecord,
    status=st.sampled_from([s for s in TaskStatus if s.terminal]),
    finished_at=moments,
    token=tokens,
    error=st.none() | texts,
    node=st.none() | names,
)
done_records = st.builds(DoneRecord, version=versions, at=moments, token=tokens)
progresses = st.builds(
    Progress, fraction=st.floats(0, 1), message=st.text(max_size=40), updated_at=moments
)
member_records = st.builds(
    MemberRecord, node_id=names, namespaces=st.frozensets(names, max_size=4), started_at=moments
)
RECORDS: dict[str, st.SearchStrategy[Any]] = {
    "task": task_records,
    "nodes": node_lists,
    "outcome": outcome_records,
    "done": done_records,
    "progress": progresses,
    "member": member_records,
}
"""A strategy of valid values of every kind of :data:`DECODERS`."""
