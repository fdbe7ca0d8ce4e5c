"""Fuzzing of everything that reads bytes we did not necessarily write: key parsing, the stored
records, and the public JSON form of tasks. Any input gives a value or *our* error, never another
exception; valid values survive an encode/decode round trip unchanged. Pure; no etcd.

Complements tests/unit/test_keys.py, test_records.py and test_model.py with stronger properties:
parse is canonical (a parsed key rebuilds to the very same bytes), keys of one prefix never parse
under another, and JSON documents with the right keys but values of any JSON type (huge ints,
NaN/Infinity as Python's json module writes them, nested containers) are refused cleanly.
"""

from __future__ import annotations

import base64
import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from distributedtask.exceptions import InvalidTaskError
from distributedtask.keys import (
    Keys,
    MemberKey,
    OutcomeKey,
    ProgressKey,
    RunKey,
    TaskKey,
)
from distributedtask.model import (
    MAX_NAME_BYTES,
    Progress,
    Task,
    TaskStatus,
    task_from_json,
    task_to_json,
    tasks_from_payload,
    tasks_to_payload,
    validate_name,
)
from distributedtask.records import (
    COMPLETED,
    PENDING,
    CorruptRecordError,
    MemberRecord,
    OutcomeRecord,
    RunRecord,
    TaskRecord,
    decode_progress,
    encode_progress,
)

UTC = timezone.utc
FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
ROUND_TRIP = settings(max_examples=60, deadline=None, database=None)
PREFIX = "/fuzz/p"
KEYS = Keys(PREFIX)

# ---- strategies -------------------------------------------------------------------------------


def _valid(name: str) -> bool:
    try:
        validate_name(name, "name")
    except InvalidTaskError:
        return False
    return True


# Names with the characters that matter to the key schema and the JSON form mixed in.
names = st.text(
    alphabet=st.one_of(st.sampled_from("/%.~ -_aZ09ü€😀"), st.characters()),
    min_size=1,
    max_size=12,
).filter(_valid)

# Milliseconds in the range the records and RFC 3339 can carry (years 1..9999), aware UTC.
_MIN = datetime(1, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)  # not Go's zero time: that means "unset"
_MAX = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
_SPAN_MS = (_MAX - _MIN) // timedelta(milliseconds=1)
moments = st.integers(0, _SPAN_MS).map(lambda ms: _MIN + timedelta(milliseconds=ms))

texts = st.text(max_size=20)
tokens = st.text(max_size=16)
node_sets = st.frozensets(names, min_size=1, max_size=4)
positive_versions = st.integers(1, 2**63 - 1)

# Any JSON value, including what orjson refuses (NaN, Infinity, ints beyond 64 bits) and what
# the decoders might trip on (bools where ints are expected, nested containers, huge numbers).
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from(
        ["", "v", "1", "STARTED", "FINISHED", "completed", "=", "AA==", "0001-01-01T00:00:00Z"]
    ),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.text(max_size=5), children, max_size=3),
    ),
    max_leaves=8,
)

_OMIT = object()

# A near miss of each kind: what a buggy or hostile writer would most likely put there.
bad_names = st.sampled_from(["", "a\nb", "\x00", "x" * (MAX_NAME_BYTES + 1), "\x7f"])
near_misses = st.one_of(
    json_values,
    bad_names,
    st.sampled_from([True, False, 1.0, "1", -1, 0, 2**64, [], {}, ["n1", 1], [None], "AA=", "@@"]),
    st.just(_OMIT),
)


def shaped_dicts(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with exactly the keys of a record: a few fields (possibly none) get a near miss,
    any JSON value, or are left out; the others a valid value, so decoding often gets far."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        broken = draw(st.sets(st.sampled_from(sorted(fields)), max_size=2))
        out: dict[str, Any] = {}
        for key, valid in fields.items():
            value = draw(near_misses if key in broken else valid)
            if value is not _OMIT:
                out[key] = value
        return out

    return build()


def shaped(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    """:func:`shaped_dicts` written with the stdlib json module (NaN, Infinity, big ints)."""
    return shaped_dicts(fields).map(lambda data: json.dumps(data).encode())


ms_values = st.integers(-62135596800000, 253402300799999)  # years 1..9999
b64_values = st.binary(max_size=8).map(lambda b: base64.b64encode(b).decode())
V1 = st.just(1)

RECORD_SHAPES: dict[str, tuple[Any, st.SearchStrategy[bytes]]] = {
    "task": (
        TaskRecord.decode,
        shaped(
            {
                "v": V1,
                "payload": b64_values,
                "startedAt": ms_values,
                "nodes": st.lists(names, min_size=1, max_size=3),
                "token": tokens,
                "version": positive_versions,
            }
        ),
    ),
    "outcome": (
        OutcomeRecord.decode,
        shaped(
            {
                "v": V1,
                "status": st.sampled_from([s.value for s in TaskStatus if s.terminal]),
                "finishedAt": ms_values,
                "token": tokens,
                "error": texts,
            }
        ),
    ),
    "run": (
        RunRecord.decode,
        shaped(
            {
                "v": V1,
                "outcome": st.sampled_from([PENDING, COMPLETED]),
                "at": ms_values,
                "token": tokens,
                "error": texts,
            }
        ),
    ),
    "progress": (
        decode_progress,
        shaped({"v": V1, "fraction": st.floats(0, 1), "message": texts, "at": ms_values}),
    ),
    "member": (
        MemberRecord.decode,
        shaped(
            {
                "v": V1,
                "node": names,
                "namespaces": st.lists(names, max_size=3),
                "startedAt": ms_values,
            }
        ),
    ),
}

RFC3339 = st.one_of(
    moments.map(lambda m: m.isoformat().replace("+00:00", "Z")),
    moments.map(lambda m: m.strftime("%Y-%m-%dT%H:%M:%S+00:00")),
    st.sampled_from(
        [
            "0001-01-01T00:00:00Z",
            "2024-02-30T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "2024-01-01T00:00:00.123456789+14:00",
            "2024-01-01t00:00:00z",
            "\u0662\u0660\u0662\u0664-01-01T00:00:00Z",
            "2024-01-01 00:00:00Z",
        ]
    ),
)
TASK_DICTS = shaped_dicts(
    {
        "namespace": names,
        "ID": names,
        "version": positive_versions,
        "payload": b64_values,
        "status": st.sampled_from([s.value for s in TaskStatus]),
        "startedAt": RFC3339,
        "finishedAt": RFC3339,
        "error": texts,
        "finishedNodes": st.dictionaries(st.sampled_from(["n1", "n2"]), st.booleans()),
        "nodes": st.lists(names, max_size=3).map(lambda nodes: [*nodes, "n1", "n2"]),
    }
)
TASK_JSON = TASK_DICTS.map(lambda data: json.dumps(data).encode())


@st.composite
def tasks(draw: st.DrawFn, namespace: str | None = None) -> Task:
    nodes = draw(node_sets)
    status = draw(st.sampled_from(TaskStatus))
    finished_at = draw(st.none() | moments) if status is TaskStatus.STARTED else draw(moments)
    return Task(
        namespace=namespace if namespace is not None else draw(names),
        id=draw(names),
        version=draw(positive_versions),
        payload=draw(st.binary(max_size=64)),
        status=status,
        started_at=draw(moments),
        finished_at=finished_at,
        error=draw(st.none() | st.text(min_size=1, max_size=20)),
        nodes=nodes,
        finished_nodes=draw(st.frozensets(st.sampled_from(sorted(nodes)))),
    )


# ---- key parsing --------------------------------------------------------------------------------

KINDS = ["tasks", "outcomes", "runs", "progress", "members"]
# fmt: off
ODD_SEGMENTS = (
    "%", "%2", "%2F", "%2f", "%zz", "%C3%BC", "%FF", "%C3", "%00", "%7F", "%41", "%25",
    "%E2%82%AC", "€", "0", "01", "1", "-1", "+1", "1.0", " 1", "a", "ab", ".", "..", "",
)
# fmt: on
segments = st.one_of(
    st.sampled_from([*KINDS, *ODD_SEGMENTS]),
    st.text(alphabet="%0123456789abcdefABCDEF/-._~", max_size=8),
    st.text(max_size=6),
    st.integers(0, 2**70).map(str),
)
prefixed_keys = st.lists(segments, min_size=0, max_size=6).map(
    lambda parts: KEYS.root + "/".join(parts).encode("utf-8")
)


def rebuild(parsed: object) -> bytes:
    """The key the builders make for a parsed key."""
    if isinstance(parsed, TaskKey):
        return KEYS.task(parsed.namespace, parsed.task_id)
    if isinstance(parsed, OutcomeKey):
        return KEYS.outcome(parsed.namespace, parsed.task_id)
    if isinstance(parsed, RunKey):
        return KEYS.run(parsed.namespace, parsed.task_id, parsed.node_id)
    if isinstance(parsed, ProgressKey):
        return KEYS.progress(parsed.namespace, parsed.task_id, parsed.version, parsed.node_id)
    assert isinstance(parsed, MemberKey), parsed
    return KEYS.member(parsed.node_id)


def check_parse(key: bytes) -> None:
    parsed = KEYS.parse(key)
    if parsed is None:
        return
    # Canonical: only the bytes our builders produce parse, so one name has exactly one key.
    assert rebuild(parsed) == key
    for name in vars(parsed).values():
        if isinstance(name, str):
            validate_name(name, "name")


@FUZZ
@given(st.binary(max_size=80))
def test_parse_of_any_bytes_returns_none_or_a_canonical_key(raw: bytes) -> None:
    check_parse(raw)
    check_parse(KEYS.root + raw)


@FUZZ
@given(prefixed_keys)
def test_parse_of_prefix_plus_random_segments_is_canonical(key: bytes) -> None:
    check_parse(key)


@FUZZ
@given(st.sampled_from(KINDS), st.lists(segments, min_size=1, max_size=5), st.binary(max_size=4))
def test_parse_of_each_kind_with_random_tails(kind: str, parts: list[str], junk: bytes) -> None:
    tail = "/".join(parts).encode("utf-8")
    check_parse(KEYS.root + kind.encode() + b"/" + tail)
    check_parse(KEYS.root + kind.encode() + b"/" + tail + junk)


def test_parse_of_a_progress_key_with_a_huge_version_returns_none() -> None:
    key = KEYS.root + b"progress/ns/t/" + b"1" * 5000 + b"/n"
    assert KEYS.parse(key) is None


def test_parse_of_a_progress_key_takes_versions_up_to_int64() -> None:
    top = 2**63 - 1  # versions are etcd revisions, int64
    assert KEYS.parse(KEYS.progress("ns", "t", top, "n")) == ProgressKey("ns", "t", top, "n")
    assert KEYS.parse(KEYS.progress("ns", "t", top + 1, "n")) is None
    assert KEYS.parse(KEYS.progress("ns", "t", int("9" * 100), "n")) is None


@FUZZ
@given(names, names, names, st.integers(1, 2**63 - 1))
def test_built_keys_parse_back(ns: str, tid: str, node: str, version: int) -> None:
    assert KEYS.parse(KEYS.task(ns, tid)) == TaskKey(ns, tid)
    assert KEYS.parse(KEYS.outcome(ns, tid)) == OutcomeKey(ns, tid)
    assert KEYS.parse(KEYS.run(ns, tid, node)) == RunKey(ns, tid, node)
    assert KEYS.parse(KEYS.progress(ns, tid, version, node)) == ProgressKey(ns, tid, version, node)
    assert KEYS.parse(KEYS.member(node)) == MemberKey(node)


prefixes = st.lists(
    st.sampled_from(["a", "b", "ab", "x", "%", "", "ü", "tasks", "runs"]), min_size=1, max_size=3
).map(lambda parts: "/" + "/".join(parts))


@FUZZ
@given(prefixes, prefixes, names, names, names)
def test_keys_of_one_prefix_never_parse_under_another(
    p1: str, p2: str, ns: str, tid: str, node: str
) -> None:
    try:
        k1, k2 = Keys(p1), Keys(p2)
    except ValueError:
        assume(False)
        raise
    assume(k1.prefix != k2.prefix)
    for key in (
        k2.task(ns, tid),
        k2.outcome(ns, tid),
        k2.run(ns, tid, node),
        k2.progress(ns, tid, 1, node),
        k2.member(node),
    ):
        assert k1.parse(key) is None


# ---- record decoders ----------------------------------------------------------------------------

DECODERS = {kind: decoder for kind, (decoder, _) in RECORD_SHAPES.items()}


def decode_or_corrupt(decoder: Any, raw: bytes) -> object | None:
    try:
        return decoder(raw)
    except CorruptRecordError:
        return None


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=64))
def test_record_decoders_on_any_bytes_raise_only_corrupt_record_error(
    kind: str, raw: bytes
) -> None:
    decode_or_corrupt(DECODERS[kind], raw)


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), json_values)
def test_record_decoders_on_any_json_raise_only_corrupt_record_error(kind: str, value: Any) -> None:
    decode_or_corrupt(DECODERS[kind], json.dumps(value).encode())
    decode_or_corrupt(DECODERS[kind], json.dumps({"v": 1, "x": value}).encode())


def _aware_ms(moment: object) -> bool:
    return (
        isinstance(moment, datetime)
        and moment.utcoffset() == timedelta(0)
        and moment.microsecond % 1000 == 0
    )


def check_decoded(value: object) -> None:
    """A value a decoder returned is well-typed and survives its own encoder unchanged."""
    if isinstance(value, TaskRecord):
        assert isinstance(value.payload, bytes) and isinstance(value.token, str)
        assert value.nodes and all(isinstance(n, str) for n in value.nodes)
        assert _aware_ms(value.started_at)
        assert value.version is None or (type(value.version) is int and value.version > 0)
        assert TaskRecord.decode(value.encode()) == value
    elif isinstance(value, OutcomeRecord):
        assert value.status.terminal and _aware_ms(value.finished_at)
        assert value.error is None or isinstance(value.error, str)
        assert OutcomeRecord.decode(value.encode()) == value
    elif isinstance(value, RunRecord):
        assert value.outcome in (PENDING, COMPLETED) and _aware_ms(value.at)
        assert RunRecord.decode(value.encode()) == value
    elif isinstance(value, Progress):
        assert type(value.fraction) is float and math.isfinite(value.fraction)
        assert isinstance(value.message, str) and _aware_ms(value.updated_at)
        assert decode_progress(encode_progress(value)) == value
    elif isinstance(value, MemberRecord):
        assert isinstance(value.node_id, str) and _aware_ms(value.started_at)
        assert all(isinstance(ns, str) for ns in value.namespaces)
        assert MemberRecord.decode(value.encode()) == value
    else:
        assert value is None, value


@pytest.mark.parametrize("kind", sorted(RECORD_SHAPES))
@FUZZ
@given(st.data())
def test_record_shaped_json_with_wrong_types_decodes_cleanly(
    kind: str, data: st.DataObject
) -> None:
    decoder, strategy = RECORD_SHAPES[kind]
    raw = data.draw(strategy)
    check_decoded(decode_or_corrupt(decoder, raw))


@pytest.mark.parametrize("kind", sorted(RECORD_SHAPES))
@FUZZ
@given(st.data())
def test_each_record_decoder_refuses_the_other_kinds(kind: str, data: st.DataObject) -> None:
    """A value of one kind stored under another kind's key: an error or a well-typed value."""
    other = data.draw(st.sampled_from(sorted(set(RECORD_SHAPES) - {kind})))
    raw = data.draw(RECORD_SHAPES[other][1])
    check_decoded(decode_or_corrupt(DECODERS[kind], raw))


# ---- records round trip -------------------------------------------------------------------------

task_records = st.builds(
    TaskRecord,
    payload=st.binary(max_size=64),
    started_at=moments,
    nodes=node_sets,
    token=tokens,
    version=st.none() | positive_versions,
)
outcome_records = st.builds(
    OutcomeRecord,
    status=st.sampled_from([s for s in TaskStatus if s.terminal]),
    finished_at=moments,
    token=tokens,
    error=st.none() | texts,
)
run_records = st.builds(
    RunRecord,
    outcome=st.sampled_from([PENDING, COMPLETED]),
    at=moments,
    token=tokens,
)
member_records = st.builds(
    MemberRecord, node_id=names, namespaces=st.frozensets(names, max_size=4), started_at=moments
)
progresses = st.builds(
    Progress, fraction=st.floats(0, 1), message=st.text(max_size=40), updated_at=moments
)


@ROUND_TRIP
@given(st.one_of(task_records, outcome_records, run_records, member_records))
def test_records_round_trip(record: Any) -> None:
    assert type(record).decode(record.encode()) == record


@ROUND_TRIP
@given(progresses)
def test_progress_round_trips(progress: Progress) -> None:
    assert decode_progress(encode_progress(progress)) == progress


# ---- the public JSON form of tasks --------------------------------------------------------------


def decode_task_or_invalid(raw: bytes | str) -> Task | None:
    try:
        return task_from_json(raw)
    except InvalidTaskError:
        return None


def check_task(task: Task | None) -> None:
    if task is None:
        return
    validate_name(task.namespace, "namespace")
    validate_name(task.id, "task_id")
    assert type(task.version) is int and task.version > 0
    assert isinstance(task.payload, bytes) and isinstance(task.status, TaskStatus)
    assert _aware_ms(task.started_at)
    assert task.finished_at is None or _aware_ms(task.finished_at)
    assert task.error is None or (isinstance(task.error, str) and task.error)
    assert task.nodes and task.finished_nodes <= task.nodes
    # Whatever decodes is a Task the encoder can write again, unchanged.
    assert task_from_json(task_to_json(task)) == task


@FUZZ
@given(st.binary(max_size=64))
def test_task_from_json_on_any_bytes_raises_only_invalid_task_error(raw: bytes) -> None:
    check_task(decode_task_or_invalid(raw))


@FUZZ
@given(st.text(max_size=40))
def test_task_from_json_on_any_text_raises_only_invalid_task_error(text: str) -> None:
    check_task(decode_task_or_invalid(text))


@FUZZ
@given(TASK_JSON)
def test_task_shaped_json_with_wrong_types_decodes_cleanly(raw: bytes) -> None:
    check_task(decode_task_or_invalid(raw))


@FUZZ
@given(json_values)
def test_task_from_json_on_any_json_value_raises_only_invalid_task_error(value: Any) -> None:
    check_task(decode_task_or_invalid(json.dumps(value)))


def decode_payload_or_invalid(raw: bytes | str) -> list[Task] | None:
    try:
        return tasks_from_payload(raw)
    except InvalidTaskError:
        return None


@FUZZ
@given(st.one_of(st.binary(max_size=64), json_values.map(json.dumps)))
def test_tasks_from_payload_on_any_input_raises_only_invalid_task_error(raw: bytes | str) -> None:
    for task in decode_payload_or_invalid(raw) or []:
        check_task(task)


@FUZZ
@given(
    st.dictionaries(
        st.one_of(names, st.just("")),
        st.one_of(st.lists(TASK_DICTS, max_size=3), json_values),
        max_size=3,
    ),
    st.sampled_from(["tasks", "Tasks", "task"]),
)
def test_snapshot_shaped_json_with_wrong_types_decodes_cleanly(
    body: dict[str, Any], top: str
) -> None:
    for task in decode_payload_or_invalid(json.dumps({top: body})) or []:
        check_task(task)


@ROUND_TRIP
@given(tasks())
def test_task_json_round_trip_is_identity(task: Task) -> None:
    assert task_from_json(task_to_json(task)) == task


@ROUND_TRIP
@given(st.lists(tasks(), max_size=5))
def test_tasks_payload_round_trip_is_identity(items: list[Task]) -> None:
    by_ns: dict[str, list[Task]] = {}
    seen = set()
    for task in items:
        if (task.namespace, task.id) not in seen:
            seen.add((task.namespace, task.id))
            by_ns.setdefault(task.namespace, []).append(task)
    decoded = tasks_from_payload(tasks_to_payload(by_ns))
    assert sorted(decoded, key=lambda t: (t.namespace, t.id)) == sorted(
        (t for ts in by_ns.values() for t in ts), key=lambda t: (t.namespace, t.id)
    )
