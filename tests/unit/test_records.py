"""Unit tests of the stored values (src/distributedtask/records.py): encode/decode round trips,
the format version, and that every decoder raises CorruptRecordError and nothing else on values
it cannot read. Pure; no etcd."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distributedtask.exceptions import DistributedTaskError
from distributedtask.model import Progress, TaskStatus, truncate_ms
from distributedtask.records import (
    COMPLETED,
    FORMAT_VERSION,
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
T0 = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
T1 = datetime(2024, 5, 7, 0, 0, 0, tzinfo=UTC)
T0_MS = 1714979289123

Decoder = Callable[[bytes], object]

TASK = TaskRecord(payload=b"\x00p\xff", started_at=T0, nodes=frozenset({"n2", "n1"}), token="tok")
OUTCOME = OutcomeRecord(status=TaskStatus.FAILED, finished_at=T1, token="tok", error="boom")
RUN = RunRecord(outcome=COMPLETED, at=T1, token="tok")
PROGRESS = Progress(fraction=0.25, message="a quarter", updated_at=T0)
MEMBER = MemberRecord(node_id="node-1", namespaces=frozenset({"b", "a"}), started_at=T0)

# Each decoder with the encoded form of a valid record, as a dict to corrupt field by field.
VALID: dict[str, tuple[Decoder, dict[str, Any]]] = {
    "task": (TaskRecord.decode, orjson.loads(TASK.encode())),
    "outcome": (OutcomeRecord.decode, orjson.loads(OUTCOME.encode())),
    "run": (RunRecord.decode, orjson.loads(RUN.encode())),
    "progress": (decode_progress, orjson.loads(encode_progress(PROGRESS))),
    "member": (MemberRecord.decode, orjson.loads(MEMBER.encode())),
}
DECODERS = [decoder for decoder, _ in VALID.values()]
DECODER_IDS = list(VALID)

_DELETE = object()


def variant(kind: str, **changes: Any) -> tuple[Decoder, bytes]:
    decoder, base = VALID[kind]
    data = dict(base)
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    return decoder, orjson.dumps(data)


# ---- CorruptRecordError -----------------------------------------------------------------------


def test_corrupt_record_error_is_a_distributed_task_error() -> None:
    assert issubclass(CorruptRecordError, DistributedTaskError)
    error = CorruptRecordError("bad value")
    assert str(error) == "bad value"
    assert error.key is None


def test_corrupt_record_error_names_its_key() -> None:
    error = CorruptRecordError("bad value", key=b"/dt/tasks/a/b")
    assert error.key == b"/dt/tasks/a/b"
    assert "/dt/tasks/a/b" in str(error)


def test_format_version_is_one() -> None:
    assert FORMAT_VERSION == 1


# ---- TaskRecord -------------------------------------------------------------------------------


def test_task_record_encoding() -> None:
    assert orjson.loads(TASK.encode()) == {
        "v": 1,
        "payload": base64.b64encode(b"\x00p\xff").decode(),
        "startedAt": T0_MS,
        "nodes": ["n1", "n2"],
        "token": "tok",
    }
    restored = TaskRecord(b"", T0, frozenset({"n"}), "t", version=17)
    assert orjson.loads(restored.encode())["version"] == 17


@pytest.mark.parametrize(
    "record",
    [
        TASK,
        TaskRecord(b"", T0, frozenset({"n"}), ""),
        TaskRecord(bytes(range(256)), T1, frozenset({"a/b", "ü", "🎉"}), "t", version=5),
        TaskRecord(b"x", datetime(1969, 12, 31, 23, 59, 59, 1000, tzinfo=UTC), frozenset("a"), "t"),
    ],
)
def test_task_record_round_trip(record: TaskRecord) -> None:
    assert TaskRecord.decode(record.encode()) == record


def test_task_record_times_are_stored_in_ms() -> None:
    plus2 = timezone(timedelta(hours=2))
    record = TaskRecord(
        b"", datetime(2024, 1, 1, 2, 0, 0, 123456, tzinfo=plus2), frozenset("a"), ""
    )
    decoded = TaskRecord.decode(record.encode())
    assert decoded.started_at == datetime(2024, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
    assert decoded.started_at.utcoffset() == timedelta(0)


def test_task_record_version_at() -> None:
    assert TASK.version is None
    assert TASK.version_at(123) == 123
    assert TASK.version_at(1) == 1
    restored = TaskRecord(b"", T0, frozenset({"n"}), "t", version=7)
    assert restored.version_at(123) == 7
    assert TaskRecord.decode(restored.encode()).version_at(999) == 7
    assert TaskRecord.decode(TASK.encode()).version_at(999) == 999


def test_task_record_to_task_started() -> None:
    task = TASK.to_task("ns", "id", 55, ["n1", "stranger"], None)
    assert task.namespace == "ns"
    assert task.id == "id"
    assert task.version == 55
    assert task.payload == TASK.payload
    assert task.status is TaskStatus.STARTED
    assert task.started_at == T0
    assert task.finished_at is None
    assert task.error is None
    assert task.nodes == frozenset({"n1", "n2"})
    assert task.finished_nodes == frozenset({"n1"})  # only assigned nodes count


def test_task_record_to_task_with_outcome() -> None:
    restored = TaskRecord(b"", T0, frozenset({"n"}), "t", version=7)
    task = restored.to_task("ns", "id", 99, [], OUTCOME)
    assert task.version == 7
    assert task.status is TaskStatus.FAILED
    assert task.finished_at == T1
    assert task.error == "boom"


# ---- OutcomeRecord ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [s for s in TaskStatus if s.terminal])
@pytest.mark.parametrize("error", [None, "", "it broke ☹\n"])
def test_outcome_record_round_trip(status: TaskStatus, error: str | None) -> None:
    record = OutcomeRecord(status=status, finished_at=T1, token="t", error=error)
    decoded = OutcomeRecord.decode(record.encode())
    assert decoded == record
    assert decoded.status is status


def test_outcome_record_encoding() -> None:
    assert orjson.loads(OUTCOME.encode()) == {
        "v": 1,
        "status": "FAILED",
        "finishedAt": 1715040000000,
        "token": "tok",
        "error": "boom",
    }
    no_error = OutcomeRecord(TaskStatus.FINISHED, T1, "t")
    assert "error" not in orjson.loads(no_error.encode())


def test_outcome_record_rejects_a_non_terminal_status() -> None:
    decoder, raw = variant("outcome", status="STARTED")
    with pytest.raises(CorruptRecordError, match="not terminal"):
        decoder(raw)


# ---- RunRecord --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        RunRecord(PENDING, T0, "t"),
        RunRecord(COMPLETED, T1, "tok"),
    ],
)
def test_run_record_round_trip(record: RunRecord) -> None:
    assert RunRecord.decode(record.encode()) == record


def test_run_record_outcomes() -> None:
    assert (PENDING, COMPLETED) == ("pending", "completed")
    assert orjson.loads(RUN.encode()) == {
        "v": 1,
        "outcome": "completed",
        "at": 1715040000000,
        "token": "tok",
    }


# ---- progress ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "progress",
    [PROGRESS, Progress(0.0, "", T1), Progress(1.0, "done ✓", T1), Progress(1 / 3, "x", T0)],
)
def test_progress_round_trip(progress: Progress) -> None:
    assert decode_progress(encode_progress(progress)) == progress


def test_progress_integer_fraction_decodes_as_float() -> None:
    _, raw = variant("progress", fraction=1)
    progress = decode_progress(raw)
    assert progress.fraction == 1.0
    assert isinstance(progress.fraction, float)


def test_progress_encoding() -> None:
    assert orjson.loads(encode_progress(PROGRESS)) == {
        "v": 1,
        "fraction": 0.25,
        "message": "a quarter",
        "at": T0_MS,
    }


# ---- MemberRecord -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        MEMBER,
        MemberRecord("n", frozenset(), T1),
        MemberRecord("a/b ü", frozenset({"x/y", "🎉"}), T0),
    ],
)
def test_member_record_round_trip(record: MemberRecord) -> None:
    assert MemberRecord.decode(record.encode()) == record


def test_member_record_encoding() -> None:
    assert orjson.loads(MEMBER.encode()) == {
        "v": 1,
        "node": "node-1",
        "namespaces": ["a", "b"],
        "startedAt": T0_MS,
    }


# ---- corrupt values ---------------------------------------------------------------------------

GARBAGE = [
    b"",
    b" ",
    b"{",
    b"not json",
    b"\xff\xfe\x00",
    b"{'v': 1}",
    b"NaN",
    b"null",
    b"true",
    b"1",
    b'"v"',
    b"[]",
    b'[{"v": 1}]',
    b"{}",
    b"[" * 5000 + b"]" * 5000,  # deeper than orjson's recursion limit
]


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_IDS)
@pytest.mark.parametrize("raw", GARBAGE)
def test_decoders_reject_garbage(decoder: Decoder, raw: bytes) -> None:
    with pytest.raises(CorruptRecordError):
        decoder(raw)


@pytest.mark.parametrize("kind", DECODER_IDS)
@pytest.mark.parametrize("version", [_DELETE, None, 0, -1, 2, 99, "1", [1], {"v": 1}, 2**63])
def test_decoders_reject_unknown_format_versions(kind: str, version: Any) -> None:
    decoder, raw = variant(kind, v=version)
    with pytest.raises(CorruptRecordError):
        decoder(raw)


@pytest.mark.parametrize("kind", DECODER_IDS)
def test_future_format_version_is_named_in_the_error(kind: str) -> None:
    decoder, raw = variant(kind, v=2)
    with pytest.raises(CorruptRecordError, match="newer"):
        decoder(raw)


@pytest.mark.parametrize("kind", DECODER_IDS)
@pytest.mark.parametrize("version", [True, 1.0])
def test_decoders_reject_format_version_of_the_wrong_type(kind: str, version: Any) -> None:
    decoder, raw = variant(kind, v=version)
    with pytest.raises(CorruptRecordError):
        decoder(raw)


BAD_FIELDS: list[tuple[str, dict[str, Any]]] = [
    # task record
    ("task", {"payload": _DELETE}),
    ("task", {"payload": None}),
    ("task", {"payload": 5}),
    ("task", {"payload": "not base64!"}),
    ("task", {"payload": "YQ"}),
    ("task", {"payload": "ünï"}),
    ("task", {"startedAt": _DELETE}),
    ("task", {"startedAt": "2024-01-01T00:00:00Z"}),
    ("task", {"startedAt": 1.5}),
    ("task", {"startedAt": True}),
    ("task", {"startedAt": None}),
    ("task", {"nodes": _DELETE}),
    ("task", {"nodes": []}),
    ("task", {"nodes": "n1"}),
    ("task", {"nodes": {"n1": True}}),
    ("task", {"nodes": [1]}),
    ("task", {"nodes": [""]}),
    ("task", {"nodes": ["a\x00"]}),
    ("task", {"nodes": ["x" * 257]}),
    ("task", {"token": _DELETE}),
    ("task", {"token": 1}),
    ("task", {"token": None}),
    ("task", {"version": 0}),
    ("task", {"version": -5}),
    ("task", {"version": "5"}),
    ("task", {"version": 1.5}),
    ("task", {"version": True}),
    ("task", {"version": [5]}),
    # outcome record
    ("outcome", {"status": _DELETE}),
    ("outcome", {"status": "STARTED"}),
    ("outcome", {"status": "DONE"}),
    ("outcome", {"status": "failed"}),
    ("outcome", {"status": 3}),
    ("outcome", {"status": None}),
    ("outcome", {"finishedAt": _DELETE}),
    ("outcome", {"finishedAt": "2024-01-01T00:00:00Z"}),
    ("outcome", {"finishedAt": False}),
    ("outcome", {"finishedAt": 1.0}),
    ("outcome", {"token": _DELETE}),
    ("outcome", {"token": 7}),
    ("outcome", {"error": 5}),
    ("outcome", {"error": ["boom"]}),
    # run record
    ("run", {"outcome": _DELETE}),
    ("run", {"outcome": "PENDING"}),
    ("run", {"outcome": "done"}),
    ("run", {"outcome": 1}),
    ("run", {"at": _DELETE}),
    ("run", {"at": "now"}),
    ("run", {"at": True}),
    ("run", {"at": 2.5}),
    ("run", {"token": _DELETE}),
    ("run", {"token": False}),
    # progress
    ("progress", {"fraction": _DELETE}),
    ("progress", {"fraction": "0.5"}),
    ("progress", {"fraction": True}),
    ("progress", {"fraction": None}),
    ("progress", {"message": _DELETE}),
    ("progress", {"message": 5}),
    ("progress", {"message": None}),
    ("progress", {"at": _DELETE}),
    ("progress", {"at": 1.5}),
    ("progress", {"at": "x"}),
    # member record
    ("member", {"node": _DELETE}),
    ("member", {"node": ""}),
    ("member", {"node": 5}),
    ("member", {"node": "a\nb"}),
    ("member", {"namespaces": _DELETE}),
    ("member", {"namespaces": "a"}),
    ("member", {"namespaces": {"a": True}}),
    ("member", {"namespaces": [1]}),
    ("member", {"namespaces": [None]}),
    ("member", {"startedAt": _DELETE}),
    ("member", {"startedAt": "x"}),
    ("member", {"startedAt": True}),
]


@pytest.mark.parametrize(
    ("kind", "changes"), BAD_FIELDS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD_FIELDS)]
)
def test_decoders_reject_missing_or_wrong_fields(kind: str, changes: dict[str, Any]) -> None:
    decoder, raw = variant(kind, **changes)
    with pytest.raises(CorruptRecordError):
        decoder(raw)


@pytest.mark.parametrize("kind", DECODER_IDS)
def test_decoders_ignore_unknown_fields(kind: str) -> None:
    decoder, base = VALID[kind]
    assert decoder(orjson.dumps({**base, "extra": [1, 2]})) == decoder(orjson.dumps(base))


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_IDS)
def test_decoders_reject_records_of_another_kind(decoder: Decoder) -> None:
    for other_decoder, base in VALID.values():
        if other_decoder is decoder:
            continue
        with pytest.raises(CorruptRecordError):
            decoder(orjson.dumps(base))


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("task", "startedAt"),
        ("outcome", "finishedAt"),
        ("run", "at"),
        ("progress", "at"),
        ("member", "startedAt"),
    ],
)
@pytest.mark.parametrize("ms", [10**17, -(10**17), 2**64 - 1, -(2**63)])
def test_decoders_reject_times_out_of_range(kind: str, field: str, ms: int) -> None:
    decoder, raw = variant(kind, **{field: ms})
    with pytest.raises(CorruptRecordError):
        decoder(raw)


# ---- properties -------------------------------------------------------------------------------

json_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
# Times within the years datetime can represent, so that only the decoders' own checks fire
# (out-of-range times are the known bug above).
safe_ms = st.integers(min_value=-62_000_000_000_000, max_value=250_000_000_000_000)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | safe_ms
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
    | st.sampled_from(["YQ==", "n1", "STARTED", "FAILED", "pending", ""]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(json_text, children, max_size=3)
    ),
    max_leaves=8,
)


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_IDS)
@given(raw=st.binary(max_size=100))
@settings(max_examples=100, deadline=None, database=None)
def test_any_bytes_raise_only_corrupt_record_error(decoder: Decoder, raw: bytes) -> None:
    with contextlib.suppress(CorruptRecordError):
        decoder(raw)


@pytest.mark.parametrize("kind", DECODER_IDS)
@given(data=st.data())
@settings(max_examples=80, deadline=None, database=None)
def test_any_mutated_record_raises_only_corrupt_record_error(
    kind: str, data: st.DataObject
) -> None:
    decoder, base = VALID[kind]
    record = dict(base)
    keys = [*base, "version", "error", "extra"]
    for key in data.draw(st.lists(st.sampled_from(keys), max_size=3)):
        if data.draw(st.booleans()):
            record.pop(key, None)
        else:
            record[key] = data.draw(json_values)
    with contextlib.suppress(CorruptRecordError):
        decoder(orjson.dumps(record))


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_IDS)
@given(value=json_values)
@settings(max_examples=50, deadline=None, database=None)
def test_any_json_value_raises_only_corrupt_record_error(decoder: Decoder, value: Any) -> None:
    with contextlib.suppress(CorruptRecordError):
        decoder(orjson.dumps(value))


names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=16)
moments = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.just(UTC),
).map(truncate_ms)


@given(
    st.builds(
        TaskRecord,
        payload=st.binary(max_size=64),
        started_at=moments,
        nodes=st.frozensets(names, min_size=1, max_size=4),
        token=json_text,
        version=st.none() | st.integers(1, 2**63 - 1),
    )
)
@settings(max_examples=100, deadline=None, database=None)
def test_task_record_round_trip_property(record: TaskRecord) -> None:
    assert TaskRecord.decode(record.encode()) == record


@given(
    st.builds(
        OutcomeRecord,
        status=st.sampled_from([s for s in TaskStatus if s.terminal]),
        finished_at=moments,
        token=json_text,
        error=st.none() | json_text,
    ),
    st.builds(
        RunRecord,
        outcome=st.sampled_from([PENDING, COMPLETED]),
        at=moments,
        token=json_text,
    ),
    st.builds(
        Progress,
        fraction=st.floats(0, 1),
        message=json_text,
        updated_at=moments,
    ),
    st.builds(
        MemberRecord,
        node_id=names,
        namespaces=st.frozensets(names, max_size=4),
        started_at=moments,
    ),
)
@settings(max_examples=100, deadline=None, database=None)
def test_other_records_round_trip_property(
    outcome: OutcomeRecord, run: RunRecord, progress: Progress, member: MemberRecord
) -> None:
    assert OutcomeRecord.decode(outcome.encode()) == outcome
    assert RunRecord.decode(run.encode()) == run
    assert decode_progress(encode_progress(progress)) == progress
    assert MemberRecord.decode(member.encode()) == member
