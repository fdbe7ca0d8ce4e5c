"""Unit tests of the stored values of layout 2 (src/distributedtask/records.py): encode/decode
round trips, the task record's header line and raw payload, node lists and their buckets, the
format version and the layout marker, the values of units (the zlib-compressed declaration and
its inflation guard, claims, pool entries, group marks, a unit's progress), and that every
decoder raises CorruptRecordError and nothing else on values it cannot read (garbage, layout 1's
values, wrong fields, truncated or inflating zlib). Pure; no etcd."""

from __future__ import annotations

import contextlib
import dataclasses
import tracemalloc
import zlib
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.layout import (
    DECODERS,
    RECORDS,
    encode,
    json_of,
    names,
    stored,
    task_records,
)

from distributedtask import exceptions, records
from distributedtask.exceptions import DistributedTaskError
from distributedtask.keys import BUCKETS, bucket_of
from distributedtask.model import Progress, TaskStatus, UnitSpec, UnitStatus
from distributedtask.records import (
    FORMAT_MARKER,
    FORMAT_VERSION,
    MAX_DECL_BYTES,
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
    decode_progress,
    encode_progress,
    encode_unit_progress,
)

UTC = timezone.utc
T0 = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
T1 = datetime(2024, 5, 7, 0, 0, 0, tzinfo=UTC)
T0_MS = 1714979289123
T1_MS = 1715040000000
PROPERTY = settings(max_examples=100, deadline=None, database=None)

TASK = TaskRecord(payload=b"\x00p\n\xff", started_at=T0, node_count=2, token="tok")
SAMPLES: dict[str, Any] = {
    "task": TASK,
    "nodes": NodeList(frozenset({"n2", "n1"})),
    "outcome": OutcomeRecord(TaskStatus.FAILED, T1, "tok", error="boom", node="n1"),
    "done": DoneRecord(version=42, at=T1, token="tok"),
    "progress": Progress(fraction=0.25, message="a quarter", updated_at=T0),
    "member": MemberRecord(node_id="node-1", namespaces=frozenset({"b", "a"}), started_at=T0),
    "decl": UnitDecl(
        (UnitSpec("shard-1", "coll-a"), UnitSpec("shard-2", "coll-a", "n1"), UnitSpec("u3"))
    ),
    "claim": UnitClaim(42, UnitStatus.FAILED, "n1", 2, "tok", "boom"),
    "pool": PoolEntry(42, 1500, T1, "n1", 2),
    "group": GroupMark(42, T1),
}
KINDS = list(DECODERS)
assert set(SAMPLES) == set(KINDS)

# Each kind's JSON as a valid value encodes it, to corrupt field by field.
VALID: dict[str, dict[str, Any]] = {kind: json_of(kind, encode(SAMPLES[kind])) for kind in KINDS}

# The values distributedtask 0.1 (layout 1, "v": 1) wrote: a record, an outcome, a node's run
# record, progress and a membership.
LAYOUT_1_VALUES = [
    b'{"v":1,"payload":"AHD/","startedAt":1714979289123,"nodes":["n1","n2"],"token":"tok"}',
    b'{"v":1,"status":"FAILED","finishedAt":1715040000000,"token":"tok","error":"boom"}',
    b'{"v":1,"outcome":"completed","at":1715040000000,"token":"tok"}',
    b'{"v":1,"fraction":0.25,"message":"a quarter","at":1714979289123}',
    b'{"v":1,"node":"node-1","namespaces":["a","b"],"startedAt":1714979289123}',
]

_DELETE = object()


def variant(kind: str, **changes: Any) -> bytes:
    """The stored bytes of the sample of ``kind`` with some JSON fields changed or deleted."""
    data = dict(VALID[kind])
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    return stored(kind, data, payload=TASK.payload)


def corrupt(kind: str, raw: bytes, match: str | None = None) -> None:
    with pytest.raises(CorruptRecordError, match=match):
        DECODERS[kind](raw)


# ---- errors, version and marker ---------------------------------------------------------------


def test_corrupt_record_error_is_a_distributed_task_error() -> None:
    assert issubclass(CorruptRecordError, DistributedTaskError)
    error = CorruptRecordError("bad value")
    assert str(error) == "bad value"
    assert error.key is None


def test_corrupt_record_error_lives_in_exceptions_and_is_re_exported() -> None:
    assert records.CorruptRecordError is exceptions.CorruptRecordError
    assert "CorruptRecordError" in records.__all__
    assert "CorruptRecordError" in exceptions.__all__


def test_corrupt_record_error_names_its_key() -> None:
    error = CorruptRecordError("bad value", key=b"/dt/cluster/tasks/a/b")
    assert error.key == b"/dt/cluster/tasks/a/b"
    assert "/dt/cluster/tasks/a/b" in str(error)


def test_format_version_is_two() -> None:
    assert FORMAT_VERSION == 2


def test_format_marker() -> None:
    assert FORMAT_MARKER == b'{"layout":2,"buckets":64}'
    assert orjson.loads(FORMAT_MARKER) == {"layout": FORMAT_VERSION, "buckets": BUCKETS}
    assert decode_format(FORMAT_MARKER) == 2


@pytest.mark.parametrize(
    ("raw", "layout"),
    [
        (b'{"layout":3,"buckets":128}', 3),
        (b'{"layout":1}', 1),
        (b'{"buckets":64,"layout":2,"extra":[1]}', 2),
        (b' {"layout" : 2} ', 2),
    ],
)
def test_decode_format_names_the_layout_of_any_marker(raw: bytes, layout: int) -> None:
    assert decode_format(raw) == layout


GARBAGE = [
    b"",
    b" ",
    b"{",
    b"\n",
    b"not json",
    b"\xff\xfe\x00",
    b"{'v': 2}",
    b"NaN",
    b"null",
    b"true",
    b"1",
    b"2",
    b'"v"',
    b"[]",
    b'[{"v": 2}]',
    b"{}",
    b"[" * 5000 + b"]" * 5000,  # deeper than orjson's recursion limit
]


@pytest.mark.parametrize(
    "raw",
    [
        *GARBAGE,
        *LAYOUT_1_VALUES,
        b"[2]",
        b'{"layout":"2"}',
        b'{"layout":2.0}',
        b'{"layout":true}',
        b'{"layout":null}',
        b'{"layout":[2]}',
        b'{"v":2}',
        TASK.encode(),
    ],
)
def test_decode_format_of_anything_else_is_none(raw: bytes) -> None:
    assert decode_format(raw) is None


# ---- TaskRecord -------------------------------------------------------------------------------


def test_task_record_encoding_is_a_header_line_then_the_raw_payload() -> None:
    raw = TASK.encode()
    assert raw == b'{"v":2,"startedAt":1714979289123,"nodeCount":2,"token":"tok"}\n\x00p\n\xff'
    header, newline, payload = raw.partition(b"\n")
    assert newline == b"\n"
    assert payload == b"\x00p\n\xff"  # neither base64 nor JSON: the bytes themselves
    assert orjson.loads(header) == {"v": 2, "startedAt": T0_MS, "nodeCount": 2, "token": "tok"}
    restored = TaskRecord(b"", T0, 1, "t", version=17)
    assert json_of("task", restored.encode())["version"] == 17
    assert restored.encode().endswith(b"}\n")


def test_task_record_header_never_holds_a_newline() -> None:
    record = TaskRecord(b"\n", T0, 1, "to\nk\r\n\u2028")
    raw = record.encode()
    assert raw.count(b"\n") == 2  # the separator and the payload's
    assert TaskRecord.decode(raw) == record


@pytest.mark.parametrize(
    "record",
    [
        TASK,
        TaskRecord(b"", T0, 1, ""),
        TaskRecord(b"\n", T0, 1, "t"),
        TaskRecord(b"\n\n\r\n", T0, 3, "t"),
        TaskRecord(b'{"v":2}\n{"v":1}', T0, 1, "t"),  # a payload that looks like a header
        TaskRecord(TASK.encode(), T1, 7, "t"),  # ... or like a whole record
        TaskRecord(bytes(range(256)) * 4, T1, 2**31, "ü🎉", version=5),
        TaskRecord(b"x", datetime(1969, 12, 31, 23, 59, 59, 1000, tzinfo=UTC), 1, "t"),
        TaskRecord(b"\x00" * 100_000, T0, 100_000, "t", version=2**63 - 1),
    ],
)
def test_task_record_round_trip(record: TaskRecord) -> None:
    assert TaskRecord.decode(record.encode()) == record
    header_only = TaskRecord.decode(record.encode(), payload=False)
    assert header_only == dataclasses.replace(record, payload=b"")


def test_task_record_without_payload_leaves_it_empty() -> None:
    decoded = TaskRecord.decode(TASK.encode(), payload=False)
    assert decoded.payload == b""
    assert (decoded.started_at, decoded.node_count, decoded.token, decoded.version) == (
        T0,
        2,
        "tok",
        None,
    )


def test_task_record_without_payload_does_not_copy_it() -> None:
    size = 1 << 20
    raw = TaskRecord(b"x" * size, T0, 1, "t").encode()
    tracemalloc.start()
    try:
        TaskRecord.decode(raw, payload=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size // 2


def test_task_record_without_payload_still_checks_the_header() -> None:
    for raw in (b"{}\npayload", variant("task", v=1), variant("task", nodeCount=0), b"payload"):
        with pytest.raises(CorruptRecordError):
            TaskRecord.decode(raw, payload=False)


def test_task_record_splits_at_the_first_newline() -> None:
    corrupt("task", b"\n" + TASK.encode())  # an empty header line: the record is the payload
    corrupt("task", TASK.encode().replace(b"\n", b"", 1))  # no separator: JSON then garbage
    corrupt("task", TASK.encode().split(b"\n")[0], match="no header line")


def test_task_record_times_are_stored_in_ms() -> None:
    plus2 = timezone(timedelta(hours=2))
    record = TaskRecord(b"", datetime(2024, 1, 1, 2, 0, 0, 123456, tzinfo=plus2), 1, "")
    decoded = TaskRecord.decode(record.encode())
    assert decoded.started_at == datetime(2024, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
    assert decoded.started_at.utcoffset() == timedelta(0)


def test_task_record_version_at() -> None:
    assert TASK.version is None
    assert TASK.version_at(123) == 123
    assert TASK.version_at(1) == 1
    restored = TaskRecord(b"", T0, 1, "t", version=7)
    assert restored.version_at(123) == 7
    assert TaskRecord.decode(restored.encode()).version_at(999) == 7
    assert TaskRecord.decode(TASK.encode()).version_at(999) == 999


# ---- NodeList ---------------------------------------------------------------------------------


def test_node_list_encoding() -> None:
    assert SAMPLES["nodes"].encode() == b'{"v":2,"nodes":["n1","n2"]}'


@pytest.mark.parametrize(
    "nodes",
    [{"n"}, {"a/b", "ü", "🎉", "x" * 256}, {f"node-{i}" for i in range(2000)}],
)
def test_node_list_round_trip(nodes: set[str]) -> None:
    record = NodeList(frozenset(nodes))
    assert NodeList.decode(record.encode()) == record


def test_node_list_by_bucket() -> None:
    # node-1, node-2 and a fall in buckets 31, 37 and 3 (see test_keys.test_bucket_of_is_stable)
    assert NodeList.by_bucket(["node-1", "node-2", "a", "a"]) == {
        31: NodeList(frozenset({"node-1"})),
        37: NodeList(frozenset({"node-2"})),
        3: NodeList(frozenset({"a"})),
    }
    assert NodeList.by_bucket([]) == {}


def check_partition(nodes: frozenset[str]) -> None:
    parts = NodeList.by_bucket(nodes)
    assert all(0 <= bucket < BUCKETS for bucket in parts)
    assert all(part.nodes for part in parts.values())  # no empty assignment
    for bucket, part in parts.items():
        assert {bucket_of(node) for node in part.nodes} == {bucket}
    union = frozenset().union(*(part.nodes for part in parts.values()))
    assert union == nodes
    assert sum(len(part.nodes) for part in parts.values()) == len(nodes)  # disjoint
    for part in parts.values():
        assert NodeList.decode(part.encode()) == part


def test_node_list_by_bucket_of_many_nodes_uses_every_bucket() -> None:
    nodes = frozenset(f"node-{i}" for i in range(5000))
    check_partition(nodes)
    assert len(NodeList.by_bucket(nodes)) == BUCKETS


@given(st.frozensets(names, max_size=40))
@PROPERTY
def test_node_list_by_bucket_partitions_the_nodes(nodes: frozenset[str]) -> None:
    check_partition(nodes)


# ---- OutcomeRecord ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [s for s in TaskStatus if s.terminal])
@pytest.mark.parametrize("error", [None, "", "it broke ☹\n"])
@pytest.mark.parametrize("node", [None, "n1", "a/b ü"])
def test_outcome_record_round_trip(status: TaskStatus, error: str | None, node: str | None) -> None:
    record = OutcomeRecord(status=status, finished_at=T1, token="t", error=error, node=node)
    decoded = OutcomeRecord.decode(record.encode())
    assert decoded == record
    assert decoded.status is status


def test_outcome_record_encoding() -> None:
    assert orjson.loads(SAMPLES["outcome"].encode()) == {
        "v": 2,
        "status": "FAILED",
        "finishedAt": T1_MS,
        "token": "tok",
        "error": "boom",
        "node": "n1",
    }
    plain = orjson.loads(OutcomeRecord(TaskStatus.FINISHED, T1, "t").encode())
    assert "error" not in plain
    assert "node" not in plain


def test_outcome_record_rejects_a_non_terminal_status() -> None:
    corrupt("outcome", variant("outcome", status="STARTED"), match="not terminal")


# ---- DoneRecord -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record", [SAMPLES["done"], DoneRecord(1, T0, ""), DoneRecord(2**63 - 1, T1, "ü")]
)
def test_done_record_round_trip(record: DoneRecord) -> None:
    assert DoneRecord.decode(record.encode()) == record


def test_done_record_encoding() -> None:
    assert orjson.loads(SAMPLES["done"].encode()) == {
        "v": 2,
        "version": 42,
        "at": T1_MS,
        "token": "tok",
    }


# ---- progress ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "progress",
    [
        SAMPLES["progress"],
        Progress(0.0, "", T1),
        Progress(1.0, "done ✓", T1),
        Progress(1 / 3, "x", T0),
    ],
)
def test_progress_round_trip(progress: Progress) -> None:
    assert decode_progress(encode_progress(progress)) == progress


def test_progress_integer_fraction_decodes_as_float() -> None:
    progress = decode_progress(variant("progress", fraction=1))
    assert progress.fraction == 1.0
    assert isinstance(progress.fraction, float)


def test_progress_encoding() -> None:
    assert orjson.loads(encode_progress(SAMPLES["progress"])) == {
        "v": 2,
        "fraction": 0.25,
        "message": "a quarter",
        "at": T0_MS,
    }


# ---- MemberRecord -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        SAMPLES["member"],
        MemberRecord("n", frozenset(), T1),
        MemberRecord("a/b ü", frozenset({"x/y", "🎉"}), T0),
    ],
)
def test_member_record_round_trip(record: MemberRecord) -> None:
    assert MemberRecord.decode(record.encode()) == record


def test_member_record_encoding() -> None:
    assert orjson.loads(SAMPLES["member"].encode()) == {
        "v": 2,
        "node": "node-1",
        "namespaces": ["a", "b"],
        "startedAt": T0_MS,
    }


# ---- units: the task record's count and the outcome's unit -----------------------------------


def test_task_record_of_a_unit_task_counts_its_units() -> None:
    record = TaskRecord(b"p", T0, 2, "tok", unit_count=10_000)
    assert json_of("task", record.encode())["units"] == 10_000
    assert TaskRecord.decode(record.encode()) == record
    assert TaskRecord.decode(record.encode(), payload=False).unit_count == 10_000
    assert "units" not in json_of("task", TASK.encode())  # a plain task's header is unchanged
    assert TaskRecord.decode(TASK.encode()).unit_count == 0


@pytest.mark.parametrize("unit", ["u1", "a/b =ü", "x" * 256])
def test_outcome_record_names_the_failed_unit(unit: str) -> None:
    record = OutcomeRecord(TaskStatus.FAILED, T1, "t", "boom", node="n1", unit=unit)
    assert json_of("outcome", record.encode())["unit"] == unit
    assert OutcomeRecord.decode(record.encode()) == record
    assert "unit" not in json_of("outcome", SAMPLES["outcome"].encode())


# ---- UnitDecl ---------------------------------------------------------------------------------


def test_unit_decl_encoding_is_compressed_rows() -> None:
    raw = SAMPLES["decl"].encode()
    assert zlib.decompress(raw) == (
        b'{"v":2,"units":[["shard-1","coll-a"],["shard-2","coll-a","n1"],["u3",""]]}'
    )


@pytest.mark.parametrize(
    "units",
    [
        (UnitSpec("u"),),
        (UnitSpec("a/b", "=", "n/1"), UnitSpec("=", "/", None), UnitSpec("ü", "🎉" * 64)),
        tuple(UnitSpec(f"shard-{i:05d}", f"coll-{i % 7}") for i in range(10_000)),
        tuple(UnitSpec("x" * 255 + c, "g" * 256, "n" * 256) for c in "abc"),
    ],
)
def test_unit_decl_round_trip(units: tuple[UnitSpec, ...]) -> None:
    decl = UnitDecl(units)
    decoded = UnitDecl.decode(decl.encode())
    assert decoded == decl and decoded.units == units
    assert list(decoded.by_id) == [u.id for u in units]


def test_unit_decl_of_many_alike_ids_compresses_well() -> None:
    decl = UnitDecl(tuple(UnitSpec(f"shard-{i:05d}", "collection-a") for i in range(10_000)))
    raw = decl.encode()
    assert len(raw) < 64 * 1024  # what an add carries for 10,000 shards
    assert len(zlib.decompress(raw)) > 5 * len(raw)


def test_unit_decl_lists_by_affinity_and_group() -> None:
    decl = UnitDecl(
        (
            UnitSpec("a", "g1"),
            UnitSpec("b", "g1", "n1"),
            UnitSpec("c", "", "n2"),
            UnitSpec("d"),
            UnitSpec("e", "g1", "n1"),
        )
    )
    assert [u.id for u in decl.free] == ["a", "d"]
    assert [u.id for u in decl.of_node("n1")] == ["b", "e"]
    assert [u.id for u in decl.of_node("n2")] == ["c"]
    assert decl.of_node("n3") == ()
    assert decl.group_sizes == {"g1": 3, "": 2}
    assert decl.by_id["c"] == UnitSpec("c", "", "n2")


def test_unit_decl_with_a_null_node_decodes_as_no_affinity() -> None:
    raw = stored("decl", {"v": 2, "units": [["u", "g", None], ["v", ""]]})
    assert UnitDecl.decode(raw) == UnitDecl((UnitSpec("u", "g"), UnitSpec("v")))


@pytest.mark.parametrize("raw", GARBAGE)
def test_unit_decl_rejects_garbage_inside_zlib(raw: bytes) -> None:
    corrupt("decl", zlib.compress(raw))
    corrupt("decl", zlib.compress(raw, 0))


@pytest.mark.parametrize("raw", [TASK.encode(), *LAYOUT_1_VALUES, FORMAT_MARKER])
def test_unit_decl_rejects_values_that_are_not_zlib(raw: bytes) -> None:
    corrupt("decl", raw, match="not zlib data")


def test_unit_decl_rejects_duplicate_ids() -> None:
    raw = stored("decl", {"v": 2, "units": [["u", ""], ["v", ""], ["u", "g"]]})
    corrupt("decl", raw, match="appears twice")


def test_unit_decl_truncated_raises_or_is_the_whole_declaration() -> None:
    """Every truncation raises CorruptRecordError, or — when only the zlib trailer (the
    Adler-32 checksum) is cut and the JSON inside is whole — decodes to the same declaration:
    a prefix of the JSON is never a JSON document."""
    decl = UnitDecl(tuple(UnitSpec(f"shard-{i}", f"g{i % 3}") for i in range(200)))
    raw = decl.encode()
    whole = 0
    for end in range(len(raw)):
        try:
            decoded = UnitDecl.decode(raw[:end])
        except CorruptRecordError:
            continue
        assert decoded == decl, end
        assert end >= len(raw) - 8, end  # at most the end of the stream and its checksum
        whole += 1
    assert whole < 8


def test_unit_decl_with_bytes_after_the_stream_decodes_the_stream() -> None:
    decl = SAMPLES["decl"]
    assert UnitDecl.decode(decl.encode() + b"junk") == decl


def test_unit_decl_flipped_bytes_raise_only_corrupt_record_error() -> None:
    raw = SAMPLES["decl"].encode()
    for index in range(len(raw)):
        for flip in (0x01, 0x80, 0xFF):
            changed = bytearray(raw)
            changed[index] ^= flip
            with contextlib.suppress(CorruptRecordError):
                UnitDecl.decode(bytes(changed))


def _bomb(inflated: int, prefix: bytes = b"") -> bytes:
    """zlib data that inflates to ``prefix`` then spaces, ``inflated`` bytes in all, built
    without holding the inflated bytes."""
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(prefix)]
    chunk = b" " * (1 << 20)
    left = inflated - len(prefix)
    while left > 0:
        parts.append(compressor.compress(chunk[: min(left, len(chunk))]))
        left -= len(chunk)
    parts.append(compressor.flush())
    return b"".join(parts)


def test_unit_decl_inflating_past_the_limit_is_refused_with_bounded_memory() -> None:
    bomb = _bomb(4 * MAX_DECL_BYTES, b'{"v":2,"units":[')
    assert len(bomb) < MAX_DECL_BYTES // 100
    tracemalloc.start()
    try:
        with pytest.raises(CorruptRecordError, match=f"inflates to more than {MAX_DECL_BYTES}"):
            UnitDecl.decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The inflater holds at most about twice the limit while it grows its buffer: never the
    # four times the limit the value inflates to.
    assert peak < 3 * MAX_DECL_BYTES


def test_unit_decl_limit_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = SAMPLES["decl"].encode()
    size = len(zlib.decompress(raw))
    monkeypatch.setattr(records, "MAX_DECL_BYTES", size)
    assert UnitDecl.decode(raw) == SAMPLES["decl"]
    monkeypatch.setattr(records, "MAX_DECL_BYTES", size - 1)
    corrupt("decl", raw, match="inflates to more than")
    corrupt("decl", _bomb(10 * size), match="inflates to more than")


# ---- UnitClaim, PoolEntry, GroupMark, a unit's progress ----------------------------------------


@pytest.mark.parametrize("status", list(UnitStatus))
@pytest.mark.parametrize(("node", "error"), [(None, None), ("n1", None), ("a/b ü", "it broke\n")])
def test_unit_claim_round_trip(status: UnitStatus, node: str | None, error: str | None) -> None:
    claim = UnitClaim(2**63 - 1, status, node, 3, "tök", error)
    decoded = UnitClaim.decode(claim.encode())
    assert decoded == claim and decoded.status is status


def test_unit_claim_encoding() -> None:
    assert orjson.loads(SAMPLES["claim"].encode()) == {
        "v": 2,
        "version": 42,
        "status": "FAILED",
        "attempts": 2,
        "token": "tok",
        "node": "n1",
        "error": "boom",
    }
    plain = orjson.loads(UnitClaim(1, UnitStatus.PENDING, None, 0, "t").encode())
    assert plain == {"v": 2, "version": 1, "status": "PENDING", "attempts": 0, "token": "t"}


@pytest.mark.parametrize(
    "entry",
    [SAMPLES["pool"], PoolEntry(1, 0, T0), PoolEntry(2**63 - 1, 2**40, T1, "a/b ü", 2**31)],
)
def test_pool_entry_round_trip(entry: PoolEntry) -> None:
    assert PoolEntry.decode(entry.encode()) == entry


def test_pool_entry_encoding() -> None:
    assert orjson.loads(SAMPLES["pool"].encode()) == {
        "v": 2,
        "version": 42,
        "delayMs": 1500,
        "notBefore": T1_MS,
        "attempts": 2,
        "node": "n1",
    }
    assert "node" not in orjson.loads(PoolEntry(1, 0, T0).encode())


@pytest.mark.parametrize("mark", [SAMPLES["group"], GroupMark(1, T0), GroupMark(2**63 - 1, T1)])
def test_group_mark_round_trip(mark: GroupMark) -> None:
    assert GroupMark.decode(mark.encode()) == mark


def test_group_mark_encoding() -> None:
    assert orjson.loads(SAMPLES["group"].encode()) == {"v": 2, "version": 42, "at": T1_MS}


def test_unit_progress_is_a_progress_record_that_names_its_node() -> None:
    progress = Progress(0.5, "half ✓", T0)
    raw = encode_unit_progress(progress, "n/1")
    assert orjson.loads(raw) == {
        "v": 2,
        "fraction": 0.5,
        "message": "half ✓",
        "at": T0_MS,
        "node": "n/1",
    }
    assert decode_progress(raw) == progress


# ---- corrupt values ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("raw", GARBAGE)
def test_decoders_reject_garbage(kind: str, raw: bytes) -> None:
    corrupt(kind, raw)
    corrupt(kind, raw + b"\npayload")  # garbage as the task record's header line


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("raw", LAYOUT_1_VALUES)
def test_decoders_reject_the_values_of_layout_1(kind: str, raw: bytes) -> None:
    corrupt(kind, raw)
    corrupt(kind, raw + b"\n")


@pytest.mark.parametrize("kind", KINDS)
def test_format_version_1_is_named_in_the_error(kind: str) -> None:
    corrupt(kind, variant(kind, v=1), match="format version 1")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "version", [_DELETE, None, 0, -1, 1, 3, 99, "2", [2], {"v": 2}, 2**63, True, 2.0]
)
def test_decoders_reject_other_format_versions(kind: str, version: Any) -> None:
    corrupt(kind, variant(kind, v=version))


# Wrong values of each kind of field (_DELETE: the field is missing).
NOT_POSITIVE_INTS = [_DELETE, 0, -1, "2", 2.0, 1.5, True, None, [2]]
NOT_TIMES = [_DELETE, "2024-01-01T00:00:00Z", 1.5, 1.0, True, None, [1]]
NOT_TOKENS = [_DELETE, 1, False, None, ["tok"]]
NOT_NAMES = ["", 5, "a\nb", "a\x00", "x" * 257, ["n1"], {"n1": True}]
NOT_NAME_LISTS = [_DELETE, None, "n1", {"n1": True}, [None], [""], *([n] for n in NOT_NAMES)]
NOT_COUNTS = [_DELETE, -1, "1", 1.5, 1.0, True, None, [1]]
NOT_UNIT_ROWS = [
    _DELETE,
    None,
    "u",
    {"u": ""},
    ["u"],  # a row is a list
    [None],
    [[]],
    [["u"]],  # [id, group] at least
    [["u", "", "n", "x"]],  # ... and at most [id, group, node]
    [{"id": "u", "group": ""}],
    [[1, ""]],
    [["", ""]],
    [["u", None]],  # the group "" is "", not null
    [["u", 5]],
    [["u", ["g"]]],
    [["u", "", ""]],  # no affinity is null, not ""
    [["u", "", 5]],
    [["a\nb", ""]],
    [["u", "g\x00"]],
    [["x" * 257, ""]],
    [["u", "", "n\n"]],
    [["u", "g"], ["v", "g"], ["u", "h"]],  # a unit id twice
]
BAD_VALUES: list[tuple[str, str, list[Any]]] = [
    ("task", "startedAt", NOT_TIMES),
    ("task", "nodeCount", NOT_POSITIVE_INTS),
    ("task", "token", NOT_TOKENS),
    ("task", "version", NOT_POSITIVE_INTS[1:]),  # a missing version is a run's mod_revision
    ("nodes", "nodes", [*NOT_NAME_LISTS, [], ["n1", ""], ["n1", 2]]),
    ("outcome", "status", [_DELETE, "STARTED", "DONE", "failed", 3, None]),
    ("outcome", "finishedAt", NOT_TIMES),
    ("outcome", "token", NOT_TOKENS),
    ("outcome", "error", [5, True, ["boom"]]),
    ("outcome", "node", NOT_NAMES),  # null or missing: no node failed
    ("done", "version", NOT_POSITIVE_INTS),
    ("done", "at", NOT_TIMES),
    ("done", "token", NOT_TOKENS),
    ("progress", "fraction", [_DELETE, "0.5", True, None, -0.5, 1.5, 2, -1]),
    ("progress", "message", [_DELETE, 5, None]),
    ("progress", "at", NOT_TIMES),
    ("member", "node", [_DELETE, None, *NOT_NAMES]),
    ("member", "namespaces", NOT_NAME_LISTS),
    ("member", "startedAt", NOT_TIMES),
    ("task", "units", NOT_POSITIVE_INTS[1:]),  # a missing count is a plain task
    ("outcome", "unit", NOT_NAMES),  # null or missing: no unit failed
    ("decl", "units", NOT_UNIT_ROWS),
    ("claim", "version", NOT_POSITIVE_INTS),
    ("claim", "status", [_DELETE, "STARTED", "DONE", "pending", "in_progress", 3, None]),
    ("claim", "attempts", NOT_COUNTS),
    ("claim", "token", NOT_TOKENS),
    ("claim", "error", [5, True, ["boom"]]),
    ("claim", "node", NOT_NAMES),
    ("pool", "version", NOT_POSITIVE_INTS),
    ("pool", "delayMs", NOT_COUNTS),
    ("pool", "notBefore", NOT_TIMES),
    ("pool", "node", NOT_NAMES),
    ("pool", "attempts", NOT_COUNTS),
    ("group", "version", NOT_POSITIVE_INTS),
    ("group", "at", NOT_TIMES),
]
BAD_FIELDS = [(kind, field, value) for kind, field, values in BAD_VALUES for value in values]


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    BAD_FIELDS,
    ids=[f"{kind}-{field}-{i}" for i, (kind, field, _) in enumerate(BAD_FIELDS)],
)
def test_decoders_reject_missing_or_wrong_fields(kind: str, field: str, value: Any) -> None:
    corrupt(kind, variant(kind, **{field: value}))


@pytest.mark.parametrize("kind", KINDS)
def test_decoders_ignore_unknown_fields(kind: str) -> None:
    decoder = DECODERS[kind]
    assert decoder(variant(kind, extra=[1, 2], payload="AA==")) == decoder(variant(kind))


# A completion record holds every field of a group mark (version, at): their keys tell them apart.
DECODES_AS = {("group", "done")}


@pytest.mark.parametrize("kind", KINDS)
def test_decoders_reject_values_of_another_kind(kind: str) -> None:
    for other in KINDS:
        if other != kind and (kind, other) not in DECODES_AS:
            corrupt(kind, encode(SAMPLES[other]))  # as stored
            corrupt(kind, stored(kind, VALID[other], payload=TASK.payload))  # framed as ours


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("task", "startedAt"),
        ("outcome", "finishedAt"),
        ("done", "at"),
        ("progress", "at"),
        ("member", "startedAt"),
        ("pool", "notBefore"),
        ("group", "at"),
    ],
)
@pytest.mark.parametrize("ms", [10**17, -(10**17), 2**64 - 1, -(2**63)])
def test_decoders_reject_times_out_of_range(kind: str, field: str, ms: int) -> None:
    corrupt(kind, variant(kind, **{field: ms}))


# ---- properties -------------------------------------------------------------------------------

json_text = st.text(max_size=12)  # without surrogates, which JSON cannot carry
# Times within the years datetime can represent, so that only the decoders' own checks fire.
safe_ms = st.integers(min_value=-62_000_000_000_000, max_value=250_000_000_000_000)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | safe_ms
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
    | st.sampled_from(["n1", "STARTED", "FAILED", "completed", ""]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(json_text, children, max_size=3)
    ),
    max_leaves=8,
)


@pytest.mark.parametrize("kind", KINDS)
@given(raw=st.binary(max_size=100))
@PROPERTY
def test_any_bytes_raise_only_corrupt_record_error(kind: str, raw: bytes) -> None:
    with contextlib.suppress(CorruptRecordError):
        DECODERS[kind](raw)


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
@settings(max_examples=80, deadline=None, database=None)
def test_any_mutated_record_raises_only_corrupt_record_error(
    kind: str, data: st.DataObject
) -> None:
    record = dict(VALID[kind])
    fields = [*record, "v", "version", "error", "node", "nodes", "extra"]
    for key in data.draw(st.lists(st.sampled_from(fields), max_size=3)):
        if data.draw(st.booleans()):
            record.pop(key, None)
        else:
            record[key] = data.draw(json_values)
    with contextlib.suppress(CorruptRecordError):
        DECODERS[kind](stored(kind, record, payload=data.draw(st.binary(max_size=8))))


@pytest.mark.parametrize("kind", KINDS)
@given(value=json_values)
@settings(max_examples=50, deadline=None, database=None)
def test_any_json_value_raises_only_corrupt_record_error(kind: str, value: Any) -> None:
    with contextlib.suppress(CorruptRecordError):
        DECODERS[kind](stored(kind, value))


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
@PROPERTY
def test_every_record_round_trips(kind: str, data: st.DataObject) -> None:
    record = data.draw(RECORDS[kind])
    assert DECODERS[kind](encode(record)) == record


@given(task_records)
@PROPERTY
def test_task_record_without_payload_is_the_record_but_its_payload(record: TaskRecord) -> None:
    assert TaskRecord.decode(record.encode(), payload=False) == dataclasses.replace(
        record, payload=b""
    )
