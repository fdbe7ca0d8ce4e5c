"""Fuzzing of everything that reads bytes we did not necessarily write: key parsing, the stored
values of layout 2 (the units' among them, the compressed declaration included), the layout
marker, and the public JSON form of tasks (with ``units`` and ``failedUnit``). Any input gives a
value or *our* error, never another exception; whatever decodes survives its own encoder
unchanged. Pure; no etcd.

Complements tests/unit/test_keys.py, test_records.py and test_model.py (which hold the round
trips of valid keys and records) with stronger properties: parse is canonical (a parsed key
rebuilds to the very same bytes), two prefixes never meet (no key of one parses under another or
lies in a range another reads), and JSON documents with the right keys but values of any JSON
type (huge ints, NaN/Infinity as Python's json module writes them, nested containers) are
refused cleanly.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tests.layout import (
    DECODERS,
    MAX_VERSION,
    built,
    check_parse,
    encode,
    groups,
    in_range,
    moments,
    names,
    node_sets,
    payloads,
    range_roots,
    stored,
    texts,
    tokens,
    versions,
)

from distributedtask.exceptions import InvalidTaskError
from distributedtask.keys import BUCKETS, RESERVED_SEGMENTS, AssignKey, Keys, ProgressKey
from distributedtask.model import (
    MAX_NAME_BYTES,
    Progress,
    Task,
    TaskStatus,
    UnitSpec,
    UnitStatus,
    task_from_json,
    task_to_json,
    tasks_from_payload,
    tasks_to_payload,
    validate_name,
)
from distributedtask.records import (
    CorruptRecordError,
    DoneRecord,
    GroupMark,
    MemberRecord,
    NodeList,
    OutcomeRecord,
    PoolEntry,
    TaskRecord,
    UnitClaim,
    UnitDecl,
    decode_format,
)

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
ROUND_TRIP = settings(max_examples=60, deadline=None, database=None)
KEYS = Keys("/fuzz/p")

# ---- strategies -------------------------------------------------------------------------------

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
        ["", "v", "1", "2", "STARTED", "FINISHED", "=", "AA==", "0001-01-01T00:00:00Z", "n1"]
    ),
    st.sampled_from(["PENDING", "IN_PROGRESS", "COMPLETED", "FAILED", "u1", "g"]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.text(max_size=5), children, max_size=3),
    ),
    max_leaves=8,
)


def stdlib_json(value: Any) -> bytes:
    """JSON as Python's json module writes it: NaN, Infinity and ints of any size included."""
    return json.dumps(value).encode()


_OMIT = object()

# A near miss of each kind: what a buggy or hostile writer would most likely put there.
bad_names = st.sampled_from(["", "a\nb", "\x00", "x" * (MAX_NAME_BYTES + 1), "\x7f"])
near_misses = st.one_of(
    json_values,
    bad_names,
    st.sampled_from(
        [True, False, 1.0, 2.0, "1", "2", 1, -1, 0, 2**64, [], {}, ["n1", 1], [None], "AA="]
    ),
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


def shaped(kind: str, fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    """The stored bytes of :func:`shaped_dicts` of ``kind`` (with a payload after a task
    record's header), written with the stdlib json module."""
    return st.builds(
        lambda data, payload: stored(kind, data, payload, dumps=stdlib_json),
        shaped_dicts(fields),
        payloads,
    )


ms_values = st.integers(-62135596800000, 253402300799999)  # years 1..9999
b64_values = st.binary(max_size=8).map(lambda b: base64.b64encode(b).decode())
V2 = st.just(2)
# Rows of a unit declaration: [id, group] or [id, group, node], now and then a near miss.
unit_rows = st.lists(
    st.one_of(
        st.tuples(names, groups).map(list),
        st.tuples(names, groups, st.none() | names).map(list),
        st.lists(near_misses.filter(lambda v: v is not _OMIT), max_size=4),
        st.sampled_from(["u1", None, {"id": "u1"}, ["u1", "u1"], ["u1", "", ""]]),
    ),
    max_size=4,
)

RECORD_SHAPES: dict[str, st.SearchStrategy[bytes]] = {
    "task": shaped(
        "task",
        {
            "v": V2,
            "startedAt": ms_values,
            "nodeCount": st.integers(1, 2**63),
            "token": tokens,
            "version": versions,
        },
    ),
    "nodes": shaped("nodes", {"v": V2, "nodes": st.lists(names, min_size=1, max_size=3)}),
    "outcome": shaped(
        "outcome",
        {
            "v": V2,
            "status": st.sampled_from([s.value for s in TaskStatus if s.terminal]),
            "finishedAt": ms_values,
            "token": tokens,
            "error": texts,
            "node": names,
        },
    ),
    "done": shaped("done", {"v": V2, "version": versions, "at": ms_values, "token": tokens}),
    "progress": shaped(
        "progress", {"v": V2, "fraction": st.floats(0, 1), "message": texts, "at": ms_values}
    ),
    "member": shaped(
        "member",
        {
            "v": V2,
            "node": names,
            "namespaces": st.lists(names, max_size=3),
            "startedAt": ms_values,
        },
    ),
    "decl": shaped("decl", {"v": V2, "units": unit_rows}),
    "claim": shaped(
        "claim",
        {
            "v": V2,
            "version": versions,
            "status": st.sampled_from([s.value for s in UnitStatus]),
            "attempts": st.integers(0, 2**63),
            "token": tokens,
            "node": names,
            "error": texts,
        },
    ),
    "pool": shaped(
        "pool",
        {
            "v": V2,
            "version": versions,
            "delayMs": st.integers(0, 2**63),
            "notBefore": ms_values,
            "attempts": st.integers(0, 2**63),
            "node": names,
        },
    ),
    "group": shaped("group", {"v": V2, "version": versions, "at": ms_values}),
}
assert set(RECORD_SHAPES) == set(DECODERS)
MARKER_SHAPES = st.builds(
    stdlib_json, shaped_dicts({"layout": st.integers(0, 9), "buckets": st.just(BUCKETS)})
)

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
        "version": versions,
        "payload": b64_values,
        "status": st.sampled_from([s.value for s in TaskStatus]),
        "startedAt": RFC3339,
        "finishedAt": RFC3339,
        "error": texts,
        "failedNode": names,
        "finishedNodes": st.dictionaries(st.sampled_from(["n1", "n2"]), st.booleans()),
        "nodes": st.lists(names, max_size=3).map(lambda nodes: [*nodes, "n1", "n2"]),
        "units": st.lists(
            st.fixed_dictionaries(
                {"id": names},
                optional={"group": groups, "node": st.sampled_from(["n1", "n2", None])},
            ),
            max_size=3,
        ),
        "failedUnit": names,
    }
)
TASK_JSON = TASK_DICTS.map(stdlib_json)


@st.composite
def tasks(draw: st.DrawFn, namespace: str | None = None) -> Task:
    nodes = draw(node_sets)
    status = draw(st.sampled_from(TaskStatus))
    finished_at = draw(st.none() | moments) if status is TaskStatus.STARTED else draw(moments)
    return Task(
        namespace=namespace if namespace is not None else draw(names),
        id=draw(names),
        version=draw(versions),
        payload=draw(st.binary(max_size=64)),
        status=status,
        started_at=draw(moments),
        finished_at=finished_at,
        error=draw(st.none() | st.text(min_size=1, max_size=20)),
        nodes=nodes,
        finished_nodes=draw(st.frozensets(st.sampled_from(sorted(nodes)))),
        failed_node=draw(st.none() | names),
        units=tuple(
            draw(
                st.lists(
                    st.builds(
                        UnitSpec,
                        UNIT_IDS,
                        UNIT_GROUPS,
                        st.none() | st.sampled_from(sorted(nodes)),
                    ),
                    max_size=4,
                    unique_by=lambda u: u.id,
                )
            )
        ),
        failed_unit=draw(st.none() | UNIT_IDS),
    )


# Unit ids and groups of the tasks above: awkward names drawn cheaply (no filtering).
UNIT_IDS = st.sampled_from(["u1", "u2", "shard/1", "=", "%3D", "ü", "🎉", " x ", "x" * 256])
UNIT_GROUPS = st.sampled_from(["", "g", "=", "==", "a/b", "é" * 128])


# ---- key parsing --------------------------------------------------------------------------------

# The top segments under a prefix: layout 2's, 0.1's, and near misses.
TOPS = [
    "cluster/tasks",
    "cluster/outcomes",
    "cluster/members",
    "cluster",
    "nodes",
    "assign",
    "done",
    "progress",
    "format",
    "units",
    "units/decl",
    "units/run",
    "cluster/pool",
    "cluster/groups",
    "tasks",
    "outcomes",
    "runs",
    "members",
    "Cluster",
]
# fmt: off
ODD_SEGMENTS = (
    "%", "%2", "%2F", "%2f", "%zz", "%C3%BC", "%FF", "%C3", "%00", "%7F", "%41", "%25",
    "%E2%82%AC", "€", "0", "01", "1", "-1", "+1", "1.0", " 1", "a", "ab", ".", "..", "",
    "00", "0a", "0A", "3f", "3F", "40", "ff", "%30%30", "100",
    "claim", "ticket", "aticket", "held", "count", "gcount", "progress", "acks", "decl", "run",
    "=", "==", "=g", "=%3D", "=%3d", "=%2F", "=%", "=ü", "%3D", "pool", "groups",
)
# fmt: on
segments = st.one_of(
    st.sampled_from([*TOPS, *ODD_SEGMENTS]),
    st.text(alphabet="%0123456789abcdefABCDEF/-._~", max_size=8),
    st.text(max_size=6),
    st.integers(0, 2**70).map(str),
    st.integers(0, 255).map("{:02x}".format),
)
prefixed_keys = st.lists(segments, min_size=0, max_size=6).map(
    lambda parts: KEYS.root + "/".join(parts).encode("utf-8")
)


@FUZZ
@given(st.binary(max_size=80))
def test_parse_of_any_bytes_returns_none_or_a_canonical_key(raw: bytes) -> None:
    check_parse(KEYS, raw)
    check_parse(KEYS, KEYS.root + raw)


@FUZZ
@given(prefixed_keys)
def test_parse_of_prefix_plus_random_segments_is_canonical(key: bytes) -> None:
    check_parse(KEYS, key)


@FUZZ
@given(st.sampled_from(TOPS), st.lists(segments, min_size=1, max_size=5), st.binary(max_size=4))
def test_parse_of_each_kind_with_random_tails(top: str, parts: list[str], junk: bytes) -> None:
    tail = "/".join(parts).encode("utf-8")
    check_parse(KEYS, KEYS.root + top.encode() + b"/" + tail)
    check_parse(KEYS, KEYS.root + top.encode() + b"/" + tail + junk)


@FUZZ
@given(st.integers(0, 2**70), st.sampled_from(["{}", "{:x}", "{:02x}", "{:03d}", "{:+d}"]))
def test_parse_takes_exactly_the_buckets_and_versions_the_builders_write(
    number: int, shape: str
) -> None:
    """A bucket or version parses iff it is written as the builders write a valid one."""
    text = shape.format(number).encode()
    assign = check_parse(KEYS, KEYS.root + b"assign/" + text + b"/ns/t")
    if number < BUCKETS and text == b"%02x" % number:
        assert assign == AssignKey(number, "ns", "t")
    progress = check_parse(KEYS, KEYS.root + b"progress/ns/t/" + text + b"/n")
    if 0 < number <= MAX_VERSION and text == b"%d" % number:
        assert progress == ProgressKey("ns", "t", number, "n")


# Prefix segments that are not reserved, some of them close to the names the schema uses.
PLAIN_SEGMENTS = ["a", "b", "ab", "x", "%", ".", "ü", "Cluster", "done-x", "formats", "assign2"]
prefixes = st.builds(
    lambda first, rest: "/".join(["", first, *rest]),
    st.sampled_from(PLAIN_SEGMENTS),
    st.lists(st.sampled_from(["", *PLAIN_SEGMENTS]), max_size=2),
)


@FUZZ
@given(st.lists(st.sampled_from(["", *PLAIN_SEGMENTS, *sorted(RESERVED_SEGMENTS)]), max_size=4))
def test_keys_refuses_exactly_the_prefixes_with_a_reserved_segment(parts: list[str]) -> None:
    prefix = "/" + "/".join(parts)
    if RESERVED_SEGMENTS.intersection(parts) or not prefix.strip("/"):
        with pytest.raises(ValueError):
            Keys(prefix)
    else:
        assert Keys(prefix).prefix == prefix.rstrip("/")


@FUZZ
@given(prefixes, prefixes, names, names, names, st.integers(0, BUCKETS - 1))
def test_two_prefixes_never_meet(
    p1: str, p2: str, ns: str, tid: str, node: str, bucket: int
) -> None:
    k1, k2 = Keys(p1), Keys(p2)
    assume(k1.prefix != k2.prefix)
    roots = range_roots(k1)
    theirs = [
        *built(k2, ns, tid, node, bucket=bucket).values(),
        k2.format,
        k2.task_done(ns, tid),
        k2.version_progress(ns, tid, 1),
    ]
    for key in theirs:
        assert k1.parse(key) is None, key
        assert key != k1.format
        for name, root in roots.items():
            assert not in_range(key, root), (name, key)


# ---- record decoders ----------------------------------------------------------------------------


def decode_or_corrupt(kind: str, raw: bytes) -> object | None:
    try:
        return DECODERS[kind](raw)
    except CorruptRecordError:
        return None


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=64))
def test_record_decoders_on_any_bytes_raise_only_corrupt_record_error(
    kind: str, raw: bytes
) -> None:
    check_decoded(kind, raw)


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), json_values, payloads)
def test_record_decoders_on_any_json_raise_only_corrupt_record_error(
    kind: str, value: Any, payload: bytes
) -> None:
    check_decoded(kind, stored(kind, value, payload, dumps=stdlib_json))
    check_decoded(kind, stored(kind, {"v": 2, "x": value}, payload, dumps=stdlib_json))


def _aware_ms(moment: object) -> bool:
    return (
        isinstance(moment, datetime)
        and moment.utcoffset() == timedelta(0)
        and moment.microsecond % 1000 == 0
    )


def _positive(version: object) -> bool:
    return type(version) is int and version > 0


def check_decoded(kind: str, raw: bytes) -> None:
    """Decoding ``raw`` as ``kind`` raises CorruptRecordError or returns a well-typed value
    that survives its own encoder unchanged."""
    value = decode_or_corrupt(kind, raw)
    if value is None:
        return
    if isinstance(value, TaskRecord):
        assert isinstance(value.payload, bytes) and isinstance(value.token, str)
        assert _positive(value.node_count) and _aware_ms(value.started_at)
        assert value.version is None or _positive(value.version)
        assert type(value.unit_count) is int and value.unit_count >= 0
        assert TaskRecord.decode(raw, payload=False) == dataclasses.replace(value, payload=b"")
    elif isinstance(value, NodeList):
        assert value.nodes
        for node in value.nodes:
            validate_name(node, "node_id")
    elif isinstance(value, OutcomeRecord):
        assert value.status.terminal and _aware_ms(value.finished_at)
        assert value.error is None or isinstance(value.error, str)
        assert value.node is None or validate_name(value.node, "node_id")
        assert value.unit is None or validate_name(value.unit, "unit_id")
    elif isinstance(value, DoneRecord):
        assert _positive(value.version) and _aware_ms(value.at)
        assert isinstance(value.token, str)
    elif isinstance(value, UnitDecl):
        assert len(value.by_id) == len(value.units)
        for spec in value.units:
            validate_name(spec.id, "unit_id")
            assert spec.group == "" or validate_name(spec.group, "group")
            assert spec.node is None or validate_name(spec.node, "node_id")
    elif isinstance(value, UnitClaim):
        assert _positive(value.version) and isinstance(value.status, UnitStatus)
        assert type(value.attempts) is int and value.attempts >= 0
        assert isinstance(value.token, str)
        assert value.node is None or validate_name(value.node, "node_id")
        assert value.error is None or isinstance(value.error, str)
    elif isinstance(value, PoolEntry):
        assert _positive(value.version) and _aware_ms(value.not_before)
        assert type(value.delay_ms) is int and value.delay_ms >= 0
        assert type(value.attempts) is int and value.attempts >= 0
        assert value.node is None or validate_name(value.node, "node_id")
    elif isinstance(value, GroupMark):
        assert _positive(value.version) and _aware_ms(value.at)
    elif isinstance(value, Progress):
        assert type(value.fraction) is float and math.isfinite(value.fraction)
        assert 0.0 <= value.fraction <= 1.0
        assert isinstance(value.message, str) and _aware_ms(value.updated_at)
    else:
        assert isinstance(value, MemberRecord), value
        assert validate_name(value.node_id, "node_id") and _aware_ms(value.started_at)
        for namespace in value.namespaces:
            validate_name(namespace, "namespace")
    assert DECODERS[kind](encode(value)) == value


@pytest.mark.parametrize("kind", sorted(RECORD_SHAPES))
@FUZZ
@given(st.data())
def test_record_shaped_json_with_wrong_types_decodes_cleanly(
    kind: str, data: st.DataObject
) -> None:
    check_decoded(kind, data.draw(RECORD_SHAPES[kind]))


@pytest.mark.parametrize("kind", sorted(RECORD_SHAPES))
@FUZZ
@given(st.data())
def test_each_record_decoder_refuses_the_other_kinds(kind: str, data: st.DataObject) -> None:
    """A value of one kind stored under another kind's key: an error or a well-typed value."""
    other = data.draw(st.sampled_from(sorted(set(RECORD_SHAPES) - {kind})))
    raw = data.draw(RECORD_SHAPES[other])
    check_decoded(kind, raw)
    if kind == "task":  # the other kind's JSON as a header line
        check_decoded(kind, raw + b"\n" + data.draw(payloads))


@FUZZ
@given(st.one_of(st.binary(max_size=64), json_values.map(stdlib_json), MARKER_SHAPES))
def test_decode_format_returns_none_or_the_layout(raw: bytes) -> None:
    layout = decode_format(raw)
    assert layout is None or type(layout) is int
    if layout is not None:
        assert json.loads(raw)["layout"] == layout


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
    assert task.failed_node is None or validate_name(task.failed_node, "node_id")
    assert task.failed_unit is None or validate_name(task.failed_unit, "unit_id")
    assert isinstance(task.units, tuple)
    assert len({unit.id for unit in task.units}) == len(task.units)
    for unit in task.units:
        assert isinstance(unit, UnitSpec)
        assert unit.node is None or unit.node in task.nodes
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
