"""Unit tests of the data model (src/distributedtask/model.py): the value types (units among
them: UnitSpec, UnitStatus, Unit and the rules of a declaration), name validation, the Go-shaped
RFC 3339 times and the public JSON form of a task (``units`` and ``failedUnit`` included, and
absent from a plain task's). Pure; no etcd."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import unicodedata
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distributedtask.exceptions import DistributedTaskError, InvalidTaskError
from distributedtask.model import (
    MAX_NAME_BYTES,
    Progress,
    Task,
    TaskDescriptor,
    TaskStatus,
    Unit,
    UnitSpec,
    UnitStatus,
    format_time,
    parse_time,
    task_from_dict,
    task_from_json,
    task_to_dict,
    task_to_json,
    tasks_from_payload,
    tasks_to_payload,
    truncate_ms,
    unit_specs,
    validate_name,
)

UTC = timezone.utc
T0 = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
T1 = datetime(2024, 5, 7, 0, 0, 0, tzinfo=UTC)
GO_ZERO = "0001-01-01T00:00:00Z"

API_KEYS = {"namespace", "ID", "version", "payload", "status", "startedAt", "finishedAt"}


def make_task(**changes: Any) -> Task:
    fields: dict[str, Any] = {
        "namespace": "ns",
        "id": "task-1",
        "version": 42,
        "payload": b"\x00payload\xff",
        "status": TaskStatus.STARTED,
        "started_at": T0,
        "finished_at": None,
        "error": None,
        "nodes": frozenset({"n2", "n1", "n3"}),
        "finished_nodes": frozenset(),
    }
    fields.update(changes)
    return Task(**fields)


_DELETE = object()


def task_dict(**changes: Any) -> dict[str, Any]:
    """The JSON-ready mapping of ``make_task()``, with some keys changed (_DELETE deletes)."""
    data: dict[str, Any] = orjson.loads(task_to_json(make_task()))
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    return data


# ---- TaskStatus -------------------------------------------------------------------------------


def test_task_status_members_and_values() -> None:
    assert [s.value for s in TaskStatus] == ["STARTED", "FINISHED", "CANCELLED", "FAILED", "PAUSED"]
    assert [s.value for s in TaskStatus if s.terminal] == ["FINISHED", "CANCELLED", "FAILED"]
    for status in TaskStatus:
        assert status.name == status.value
        assert TaskStatus(status.value) is status


def test_task_status_is_a_str() -> None:
    assert isinstance(TaskStatus.STARTED, str)
    assert TaskStatus.FAILED == "FAILED"
    assert str(TaskStatus.CANCELLED) == "CANCELLED"
    assert f"{TaskStatus.FINISHED}" == "FINISHED"
    assert json.dumps(TaskStatus.STARTED) == '"STARTED"'
    assert orjson.dumps(TaskStatus.FAILED) == b'"FAILED"'


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        (TaskStatus.STARTED, False),
        (TaskStatus.FINISHED, True),
        (TaskStatus.CANCELLED, True),
        (TaskStatus.FAILED, True),
    ],
)
def test_task_status_terminal(status: TaskStatus, terminal: bool) -> None:
    assert status.terminal is terminal


@pytest.mark.parametrize("text", ["started", "RUNNING", "", "FINISHED "])
def test_task_status_rejects_unknown_values(text: str) -> None:
    with pytest.raises(ValueError):
        TaskStatus(text)


# ---- TaskDescriptor ---------------------------------------------------------------------------


def test_task_descriptor_is_frozen() -> None:
    descriptor = TaskDescriptor("a", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        descriptor.id = "b"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        descriptor.version = 2  # type: ignore[misc]


def test_task_descriptor_is_hashable_by_value() -> None:
    a = TaskDescriptor("a", 1)
    assert a == TaskDescriptor("a", 1)
    assert hash(a) == hash(TaskDescriptor("a", 1))
    assert a != TaskDescriptor("a", 2)
    assert a != TaskDescriptor("b", 1)
    assert {a, TaskDescriptor("a", 1), TaskDescriptor("a", 2)} == {
        TaskDescriptor("a", 1),
        TaskDescriptor("a", 2),
    }
    assert {a: "x"}[TaskDescriptor("a", 1)] == "x"


def test_task_descriptor_fields_and_keywords() -> None:
    descriptor = TaskDescriptor(id="x", version=7)
    assert (descriptor.id, descriptor.version) == ("x", 7)
    assert [f.name for f in dataclasses.fields(TaskDescriptor)] == ["id", "version"]


def test_task_descriptor_orders_by_id_then_version() -> None:
    items = [TaskDescriptor("b", 1), TaskDescriptor("a", 3), TaskDescriptor("a", 2)]
    assert sorted(items) == [TaskDescriptor("a", 2), TaskDescriptor("a", 3), TaskDescriptor("b", 1)]


# ---- Task -------------------------------------------------------------------------------------


def test_task_fields_follow_the_contract() -> None:
    assert [f.name for f in dataclasses.fields(Task)] == [
        "namespace",
        "id",
        "version",
        "payload",
        "status",
        "started_at",
        "finished_at",
        "error",
        "nodes",
        "finished_nodes",
        "failed_node",
        "policy",
        "attempts",
        "last_errors",
        "units",
        "failed_unit",
    ]


def test_task_is_frozen_and_hashable() -> None:
    task = make_task()
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.status = TaskStatus.FAILED  # type: ignore[misc]
    assert hash(task) == hash(make_task())
    assert task == make_task()
    assert task != make_task(version=43)
    assert len({task, make_task()}) == 1


def test_task_descriptor_property() -> None:
    task = make_task(id="abc", version=9)
    assert task.descriptor == TaskDescriptor("abc", 9)
    assert isinstance(task.descriptor, TaskDescriptor)


def test_task_pending_nodes() -> None:
    task = make_task(nodes=frozenset({"a", "b", "c"}), finished_nodes=frozenset({"b"}))
    assert task.pending_nodes == frozenset({"a", "c"})
    assert isinstance(task.pending_nodes, frozenset)
    done = make_task(nodes=frozenset({"a"}), finished_nodes=frozenset({"a"}))
    assert done.pending_nodes == frozenset()


# ---- Progress ---------------------------------------------------------------------------------


def test_progress_is_a_frozen_value() -> None:
    progress = Progress(0.5, "half", T0)
    assert (progress.fraction, progress.message, progress.updated_at) == (0.5, "half", T0)
    assert [f.name for f in dataclasses.fields(Progress)] == ["fraction", "message", "updated_at"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        progress.fraction = 1.0  # type: ignore[misc]
    assert progress == Progress(0.5, "half", T0)
    assert hash(progress) == hash(Progress(0.5, "half", T0))


# ---- units ------------------------------------------------------------------------------------


def test_unit_status_members_and_values() -> None:
    assert [s.value for s in UnitStatus] == ["PENDING", "IN_PROGRESS", "COMPLETED", "FAILED"]
    for status in UnitStatus:
        assert status.name == status.value and str(status) == status.value
        assert isinstance(status, str) and UnitStatus(status.value) is status
    assert orjson.dumps(UnitStatus.IN_PROGRESS) == b'"IN_PROGRESS"'


def test_unit_spec_defaults_and_fields() -> None:
    spec = UnitSpec("shard-1")
    assert (spec.id, spec.group, spec.node) == ("shard-1", "", None)
    assert [f.name for f in dataclasses.fields(UnitSpec)] == ["id", "group", "node"]
    assert UnitSpec("a", group="g", node="n") == UnitSpec("a", "g", "n")
    assert hash(UnitSpec("a", "g")) == hash(UnitSpec("a", "g"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.id = "b"  # type: ignore[misc]


def test_unit_fields_follow_the_contract() -> None:
    assert [f.name for f in dataclasses.fields(Unit)] == [
        "id",
        "group",
        "node",
        "status",
        "attempts",
        "error",
        "progress",
    ]
    unit = Unit("u", "", None, UnitStatus.PENDING)
    assert (unit.attempts, unit.error, unit.progress) == (0, None, None)


@pytest.mark.parametrize(
    "spec",
    [
        UnitSpec("a/b", "=", "n/1"),
        UnitSpec("x" * 256, "g" * 256, "n" * 256),
        UnitSpec("ü", "🎉"),
        UnitSpec("=", "==", "="),
        UnitSpec(".", "..", "~"),
    ],
)
def test_unit_spec_accepts_names(spec: UnitSpec) -> None:
    assert UnitSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (("",), "unit_id"),
        (("a\x00",), "unit_id"),
        (("x" * 257,), "unit_id"),
        ((5,), "unit_id"),
        ((None,), "unit_id"),
        (("\ud800",), "unit_id"),
        (("u", "g\n"), "group"),
        (("u", "x" * 257), "group"),
        (("u", None), "group"),  # no group is "", not None
        (("u", 5), "group"),
        (("u", "", ""), "node_id"),  # no affinity is None, not ""
        (("u", "", "n\x7f"), "node_id"),
        (("u", "", 5), "node_id"),
    ],
)
def test_unit_spec_rejects_bad_names(args: tuple[Any, ...], what: str) -> None:
    with pytest.raises(InvalidTaskError) as info:
        UnitSpec(*args)
    assert info.value.field == "units"
    assert what in str(info.value)


def test_unit_spec_json() -> None:
    assert UnitSpec("u").to_dict() == {"id": "u", "group": "", "node": None}
    assert UnitSpec("u", "g", "n").to_dict() == {"id": "u", "group": "g", "node": "n"}
    assert UnitSpec.from_dict({"id": "u"}) == UnitSpec("u")
    assert UnitSpec.from_dict({"id": "u", "group": None, "node": None}) == UnitSpec("u")
    assert UnitSpec.from_dict({"id": "u", "group": "", "node": ""}) == UnitSpec("u")


@pytest.mark.parametrize(
    "data",
    [
        None,
        "u",
        ["u"],
        {},
        {"id": 5},
        {"id": None},
        {"group": "g"},
        {"id": ""},
        {"id": "u", "group": 5},
        {"id": "u", "group": ["g"]},
        {"id": "u", "node": 5},
        {"id": "u", "node": ["n"]},
        {"id": "u", "node": "a\nb"},
        {"id": "u", "extra": 1},
        {"id": "u", "ID": "v"},
    ],
)
def test_unit_spec_from_dict_rejects(data: Any) -> None:
    with pytest.raises(InvalidTaskError) as info:
        UnitSpec.from_dict(data)
    assert info.value.field == "units"


def test_unit_specs_take_specs_and_plain_ids_in_order() -> None:
    declared = unit_specs(["b", UnitSpec("a", "g"), "c"])
    assert declared == (UnitSpec("b"), UnitSpec("a", "g"), UnitSpec("c"))
    assert unit_specs(iter(["x", "y"])) == (UnitSpec("x"), UnitSpec("y"))
    assert unit_specs(u for u in ["z"]) == (UnitSpec("z"),)
    assert unit_specs([]) == ()  # add_task refuses an empty declaration, not unit_specs
    many = unit_specs(f"shard-{i}" for i in range(10_000))
    assert len(many) == 10_000 and many[-1] == UnitSpec("shard-9999")


def test_unit_specs_check_affinity_against_the_nodes() -> None:
    nodes = frozenset({"n1", "n2"})
    assert unit_specs([UnitSpec("u", node="n1")], nodes) == (UnitSpec("u", node="n1"),)
    assert unit_specs([UnitSpec("u", node="zz")]) == (UnitSpec("u", node="zz"),)  # no nodes
    with pytest.raises(InvalidTaskError, match="not one of the task's nodes") as info:
        unit_specs([UnitSpec("u", node="zz")], nodes)
    assert info.value.field == "units"


@pytest.mark.parametrize(
    "units",
    [
        "abc",  # a str is not a collection of ids
        b"abc",
        None,
        5,
        ["a", "a"],
        ["a", UnitSpec("a", "g")],  # an id twice, whatever its group
        [UnitSpec("a", node="n1"), UnitSpec("a", node="n2")],
        [3],
        [None],
        [b"a"],
        [{"id": "a"}],  # JSON goes through UnitSpec.from_dict
        [("a", "g")],
        [""],
        ["a\nb"],
    ],
)
def test_unit_specs_reject(units: Any) -> None:
    with pytest.raises(InvalidTaskError) as info:
        unit_specs(units)
    assert info.value.field == "units"


# ---- validate_name ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "namespace",
        "a/b",
        "/",
        "//",
        "%2F",
        "with space",
        " leading",
        "ünïcödé",
        "日本語",
        "emoji-🎉",
        "\u200b",  # zero width space: a format character, not a control character
        "a" * MAX_NAME_BYTES,
        "é" * (MAX_NAME_BYTES // 2),  # 2 bytes each: exactly 256
        "€" * 85 + "a",  # 3 * 85 + 1 = 256
        "🎉" * 64,  # 4 * 64 = 256
    ],
)
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name, "task_id") is name


def test_max_name_bytes_is_256() -> None:
    assert MAX_NAME_BYTES == 256


@pytest.mark.parametrize(
    "name",
    [
        "a" * 257,
        "é" * 128 + "a",  # 257 bytes, 129 characters
        "€" * 86,  # 258 bytes, 86 characters
        "🎉" * 64 + "a",  # 257 bytes, 65 characters
        "x" * 10_000,
    ],
)
def test_validate_name_rejects_more_than_256_utf8_bytes(name: str) -> None:
    with pytest.raises(InvalidTaskError) as info:
        validate_name(name, "namespace")
    assert info.value.field == "namespace"


@pytest.mark.parametrize(
    "name",
    ["\x00", "a\x00b", "a\nb", "\r", "\t", "tab\t", "\x1b[31m", "\x7f", "a\x85", "\x9f", "\x01"],
)
def test_validate_name_rejects_control_characters(name: str) -> None:
    with pytest.raises(InvalidTaskError) as info:
        validate_name(name, "node_id")
    assert info.value.field == "node_id"


@pytest.mark.parametrize("codepoint", [*range(0x20), *range(0x7F, 0xA0)])
def test_validate_name_rejects_every_c0_and_c1_control(codepoint: int) -> None:
    with pytest.raises(InvalidTaskError):
        validate_name(f"ok{chr(codepoint)}ok", "task_id")


def test_validate_name_rejects_empty() -> None:
    with pytest.raises(InvalidTaskError) as info:
        validate_name("", "task_id")
    assert info.value.field == "task_id"


@pytest.mark.parametrize("value", [None, 1, 1.5, b"bytes", bytearray(b"x"), ["a"], object()])
def test_validate_name_rejects_non_str(value: object) -> None:
    with pytest.raises(InvalidTaskError) as info:
        validate_name(value, "namespace")
    assert info.value.field == "namespace"


@pytest.mark.parametrize("name", ["\ud800", "a\udfffb", "\udc80"])
def test_validate_name_rejects_lone_surrogates(name: str) -> None:
    with pytest.raises(InvalidTaskError) as info:
        validate_name(name, "task_id")
    assert info.value.field == "task_id"


def test_invalid_task_error_is_a_value_error_and_a_distributed_task_error() -> None:
    with pytest.raises(ValueError):
        validate_name("", "namespace")
    with pytest.raises(DistributedTaskError):
        validate_name("", "namespace")


@given(st.text(min_size=1))
@settings(max_examples=200, deadline=None, database=None)
def test_validate_name_agrees_with_the_rule(name: str) -> None:
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        size = None
    ok = (
        size is not None
        and size <= MAX_NAME_BYTES
        and not any(unicodedata.category(c) == "Cc" for c in name)
    )
    if ok:
        assert validate_name(name, "f") == name
    else:
        with pytest.raises(InvalidTaskError):
            validate_name(name, "f")


# ---- format_time / parse_time -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "2024-01-02T03:04:05Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 100000, tzinfo=UTC), "2024-01-02T03:04:05.1Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 120000, tzinfo=UTC), "2024-01-02T03:04:05.12Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=UTC), "2024-01-02T03:04:05.123Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 123999, tzinfo=UTC), "2024-01-02T03:04:05.123Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 999, tzinfo=UTC), "2024-01-02T03:04:05Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 1000, tzinfo=UTC), "2024-01-02T03:04:05.001Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 10000, tzinfo=UTC), "2024-01-02T03:04:05.01Z"),
        (datetime(1970, 1, 1, tzinfo=UTC), "1970-01-01T00:00:00Z"),
        (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "9999-12-31T23:59:59.999Z"),
    ],
)
def test_format_time_go_shape(moment: datetime, text: str) -> None:
    assert format_time(moment) == text


def test_format_time_converts_offsets_to_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    minus530 = timezone(-timedelta(hours=5, minutes=30))
    assert format_time(datetime(2024, 1, 2, 3, 4, 5, tzinfo=plus2)) == "2024-01-02T01:04:05Z"
    assert format_time(datetime(2024, 1, 1, 20, 0, tzinfo=minus530)) == "2024-01-02T01:30:00Z"


def test_format_time_none_is_go_zero_time() -> None:
    assert format_time(None) == GO_ZERO


def test_format_time_rejects_naive() -> None:
    with pytest.raises(InvalidTaskError):
        format_time(datetime(2024, 1, 1))


def test_parse_time_go_zero_time_is_none() -> None:
    assert parse_time(GO_ZERO) is None


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2024-01-02T03:04:05Z", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2024-01-02T03:04:05.1Z", datetime(2024, 1, 2, 3, 4, 5, 100000, tzinfo=UTC)),
        ("2024-01-02T03:04:05.123Z", datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)),
        # Go marshals nanoseconds; we keep milliseconds (truncated).
        ("2024-01-02T03:04:05.123456789Z", datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)),
        ("2024-01-02T03:04:05.9999Z", datetime(2024, 1, 2, 3, 4, 5, 999000, tzinfo=UTC)),
        ("2024-01-02T03:04:05+02:00", datetime(2024, 1, 2, 1, 4, 5, tzinfo=UTC)),
        ("2024-01-02T03:04:05.5-01:30", datetime(2024, 1, 2, 4, 34, 5, 500000, tzinfo=UTC)),
        ("2024-01-02T03:04:05+00:00", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2024-01-02T03:04:05z", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, moment: datetime) -> None:
    parsed = parse_time(text)
    assert parsed == moment
    assert parsed is not None
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text",
    ["", "now", "2024-01-02", "2024-01-02T03:04:05", "2024-13-01T00:00:00Z", "2024-01-02T25:00Z"],
)
def test_parse_time_rejects_garbage_and_naive(text: str) -> None:
    with pytest.raises(InvalidTaskError):
        parse_time(text)


@pytest.mark.parametrize("value", [None, 0, 1.5, b"2024-01-02T03:04:05Z", ["x"], {}])
def test_parse_time_rejects_non_str(value: object) -> None:
    with pytest.raises(InvalidTaskError):
        parse_time(value)


@pytest.mark.parametrize("text", ["0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00"])
def test_parse_time_out_of_range_after_utc_conversion_is_invalid(text: str) -> None:
    with pytest.raises(InvalidTaskError):
        parse_time(text)


@pytest.mark.parametrize("key", ["startedAt", "finishedAt"])
def test_task_from_json_time_out_of_range_after_utc_conversion_is_invalid(key: str) -> None:
    data = task_dict(**{key: "0001-01-01T00:30:00+01:00"})
    with pytest.raises(InvalidTaskError):
        task_from_json(orjson.dumps(data))


def test_format_time_pads_small_years() -> None:
    moment = datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert format_time(moment) == "0999-01-02T03:04:05Z"
    assert parse_time(format_time(moment)) == moment


def test_truncate_ms() -> None:
    plus1 = timezone(timedelta(hours=1))
    moment = datetime(2024, 1, 1, 1, 0, 0, 123456, tzinfo=plus1)
    truncated = truncate_ms(moment)
    assert truncated == datetime(2024, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
    assert truncated.tzinfo == UTC
    with pytest.raises(InvalidTaskError):
        truncate_ms(datetime(2024, 1, 1))


aware_times = st.datetimes(
    min_value=datetime(1000, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.builds(
        timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
    ),
)


@given(aware_times)
@settings(max_examples=200, deadline=None, database=None)
def test_time_round_trip(moment: datetime) -> None:
    text = format_time(moment)
    assert text.endswith("Z")
    assert len(text) in (20, 22, 23, 24)  # ...:SSZ, .d, .dd, .ddd
    if "." in text:
        assert not text[:-1].endswith("0")  # trailing zeros trimmed
    assert parse_time(text) == truncate_ms(moment)
    assert format_time(parse_time(text)) == text


# ---- task JSON --------------------------------------------------------------------------------


def test_task_to_json_exact_keys_when_started() -> None:
    data = orjson.loads(task_to_json(make_task()))
    assert set(data) == API_KEYS | {"finishedNodes", "nodes"}
    assert data == {
        "namespace": "ns",
        "ID": "task-1",
        "version": 42,
        "payload": base64.b64encode(b"\x00payload\xff").decode(),
        "status": "STARTED",
        "startedAt": "2024-05-06T07:08:09.123Z",
        "finishedAt": GO_ZERO,
        "finishedNodes": {},
        "nodes": ["n1", "n2", "n3"],
    }


def test_task_to_json_failed_includes_error_and_finished_nodes() -> None:
    task = make_task(
        status=TaskStatus.FAILED,
        finished_at=T1,
        error="boom",
        finished_nodes=frozenset({"n3", "n1"}),
    )
    data = orjson.loads(task_to_json(task))
    assert set(data) == API_KEYS | {"error", "finishedNodes", "nodes"}
    assert data["status"] == "FAILED"
    assert data["error"] == "boom"
    assert data["finishedAt"] == "2024-05-07T00:00:00Z"
    assert data["finishedNodes"] == {"n1": True, "n3": True}


@pytest.mark.parametrize("error", [None, ""])
def test_task_to_json_omits_empty_error(error: str | None) -> None:
    data = orjson.loads(task_to_json(make_task(status=TaskStatus.CANCELLED, error=error)))
    assert "error" not in data


def test_task_to_json_finished_nodes_never_null_and_payload_empty() -> None:
    data = orjson.loads(task_to_json(make_task(payload=b"")))
    assert data["finishedNodes"] == {}
    assert data["payload"] == ""
    assert b"null" not in task_to_json(make_task())


def test_task_to_json_nodes_sorted() -> None:
    nodes = frozenset({"zz", "a", "m", "B", "é"})
    data = orjson.loads(task_to_json(make_task(nodes=nodes)))
    assert data["nodes"] == sorted(nodes)


@pytest.mark.parametrize(
    "task",
    [
        make_task(),
        make_task(payload=b""),
        make_task(payload=bytes(range(256)) * 10),
        make_task(namespace="a/b", id="c/d%2F", nodes=frozenset({"n/1", "ü"})),
        make_task(status=TaskStatus.FINISHED, finished_at=T1, finished_nodes=frozenset({"n1"})),
        make_task(status=TaskStatus.FAILED, finished_at=T1, error="it broke\nbadly ☹"),
        make_task(status=TaskStatus.CANCELLED, finished_at=T1),
        make_task(version=2**62),
    ],
)
def test_task_json_round_trip(task: Task) -> None:
    raw = task_to_json(task)
    assert isinstance(raw, bytes)
    assert task_from_json(raw) == task
    assert task_from_json(raw.decode()) == task


UNITS = (UnitSpec("shard-1", "coll-a"), UnitSpec("shard-2", "coll-a", "n1"), UnitSpec("u3"))


def test_task_json_of_a_unit_task() -> None:
    task = make_task(units=UNITS)
    data = orjson.loads(task_to_json(task))
    assert set(data) == API_KEYS | {"finishedNodes", "nodes", "units"}
    assert data["units"] == [
        {"id": "shard-1", "group": "coll-a", "node": None},
        {"id": "shard-2", "group": "coll-a", "node": "n1"},
        {"id": "u3", "group": "", "node": None},
    ]
    assert task_from_json(task_to_json(task)) == task
    failed = make_task(
        units=UNITS,
        status=TaskStatus.FAILED,
        finished_at=T1,
        error="boom",
        failed_node="n1",
        failed_unit="shard-2",
    )
    data = orjson.loads(task_to_json(failed))
    assert (data["failedUnit"], data["failedNode"], data["error"]) == ("shard-2", "n1", "boom")
    assert task_from_json(task_to_json(failed)) == failed
    assert task_from_dict(task_to_dict(failed)) == failed


def test_a_plain_tasks_json_has_no_unit_keys() -> None:
    for task in (make_task(), make_task(status=TaskStatus.FAILED, finished_at=T1, error="x")):
        data = task_to_dict(task)
        assert "units" not in data and "failedUnit" not in data
    assert set(task_to_dict(make_task())) == API_KEYS | {"finishedNodes", "nodes"}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"units": []}, ()),
        ({"units": None}, ()),
        ({"failedUnit": None}, None),
        ({"failedUnit": ""}, None),
        ({"units": [{"id": "u"}]}, (UnitSpec("u"),)),
        ({"units": [{"id": "u", "group": None, "node": None}]}, (UnitSpec("u"),)),
    ],
)
def test_task_from_json_reads_empty_unit_keys_as_a_plain_task(
    changes: dict[str, Any], expected: object
) -> None:
    task = task_from_json(orjson.dumps(task_dict(**changes)))
    if "units" in changes:
        assert task.units == expected
    else:
        assert task.failed_unit is expected and task.units == ()


@pytest.mark.parametrize(
    "changes",
    [
        {"units": "u1"},
        {"units": {"u1": {}}},
        {"units": ["u1"]},  # JSON names its units as objects
        {"units": [{"id": "u"}, {"id": "u"}]},
        {"units": [{"id": "u", "node": "stranger"}]},  # affinity to a node not of the task
        {"units": [{"id": ""}]},
        {"units": [{"id": "u", "group": 5}]},
        {"units": [{"id": "u", "shard": 5}]},
        {"failedUnit": 5},
        {"failedUnit": ["u"]},
        {"failedUnit": "a\nb"},
        {"failedUnit": "x" * 257},
    ],
)
def test_task_from_json_rejects_bad_units(changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidTaskError) as info:
        task_from_json(orjson.dumps(task_dict(**changes)))
    assert info.value.field == "data"


def test_tasks_payload_with_unit_tasks_round_trips() -> None:
    unit_task = make_task(id="units", units=UNITS)
    plain = make_task(id="plain")
    raw = tasks_to_payload({"ns": [unit_task, plain]})
    assert tasks_from_payload(raw) == [plain, unit_task]
    items = orjson.loads(raw)["tasks"]["ns"]
    assert ["units" in item for item in items] == [False, True]


names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20)
tasks = st.builds(
    Task,
    namespace=names,
    id=names,
    version=st.integers(1, 2**63 - 1),
    payload=st.binary(max_size=64),
    status=st.sampled_from(TaskStatus),
    started_at=aware_times.map(truncate_ms),
    finished_at=st.none() | aware_times.map(truncate_ms),
    error=st.none() | names,
    nodes=st.frozensets(names, min_size=1, max_size=4),
    finished_nodes=st.just(frozenset()),
)


@given(tasks, st.data())
@settings(max_examples=60, deadline=None, database=None)
def test_task_json_round_trip_property(task: Task, data: st.DataObject) -> None:
    finished = data.draw(st.frozensets(st.sampled_from(sorted(task.nodes))))
    task = dataclasses.replace(task, finished_nodes=finished)
    assert task_from_json(task_to_json(task)) == task


unit_specs_of_nodes = st.builds(
    UnitSpec,
    id=names,
    group=st.just("") | names,
    node=st.none() | st.sampled_from(["n1", "n2", "n3"]),
)


@given(st.lists(unit_specs_of_nodes, max_size=6, unique_by=lambda u: u.id), st.none() | names)
@settings(max_examples=60, deadline=None, database=None)
def test_unit_task_json_round_trip_property(units: list[UnitSpec], failed_unit: str | None) -> None:
    task = make_task(units=tuple(units), failed_unit=failed_unit)
    assert task_from_json(task_to_json(task)) == task
    data = task_to_dict(task)
    assert ("units" in data) == bool(units)
    assert ("failedUnit" in data) == (failed_unit is not None)


def test_task_from_json_accepts_weaviate_shape_without_optional_keys() -> None:
    data = task_dict(finishedAt=_DELETE, finishedNodes=_DELETE, error=_DELETE)
    task = task_from_json(orjson.dumps(data))
    assert task.finished_at is None
    assert task.finished_nodes == frozenset()
    assert task.error is None


def test_task_from_json_null_finished_nodes_is_empty() -> None:
    task = task_from_json(orjson.dumps(task_dict(finishedNodes=None)))
    assert task.finished_nodes == frozenset()


def test_task_from_json_finished_nodes_false_values_are_not_finished() -> None:
    task = task_from_json(orjson.dumps(task_dict(finishedNodes={"n1": True, "n2": False})))
    assert task.finished_nodes == frozenset({"n1"})


def test_task_from_json_returns_aware_utc_times() -> None:
    data = task_dict(startedAt="2024-01-01T02:00:00.5+02:00", finishedAt="2024-01-01T01:00:00Z")
    task = task_from_json(orjson.dumps(data))
    assert task.started_at == datetime(2024, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)
    assert task.started_at.utcoffset() == timedelta(0)
    assert task.finished_at == datetime(2024, 1, 1, 1, tzinfo=UTC)


BAD_TASK_DICTS: list[Any] = [
    None,
    [],
    "task",
    42,
    {},
    task_dict(namespace=_DELETE),
    task_dict(namespace=""),
    task_dict(namespace=7),
    task_dict(namespace="a\x00"),
    task_dict(namespace="x" * 257),
    task_dict(ID=_DELETE),
    task_dict(ID=""),
    task_dict(ID=["a"]),
    task_dict(ID="a\nb"),
    task_dict(version=_DELETE),
    task_dict(version="42"),
    task_dict(version=1.5),
    task_dict(version=True),
    task_dict(version=0),
    task_dict(version=-1),
    task_dict(version=None),
    task_dict(payload="not base64!"),
    task_dict(payload="YQ"),  # bad padding
    task_dict(payload="ünï"),
    task_dict(payload=["YQ=="]),
    task_dict(payload=5),
    task_dict(status=_DELETE),
    task_dict(status="RUNNING"),
    task_dict(status="started"),
    task_dict(status=1),
    task_dict(status=None),
    task_dict(startedAt=_DELETE),
    task_dict(startedAt=GO_ZERO),
    task_dict(startedAt="yesterday"),
    task_dict(startedAt="2024-01-01T00:00:00"),
    task_dict(startedAt=1700000000),
    task_dict(finishedAt="later"),
    task_dict(finishedAt=12),
    task_dict(finishedAt=None),
    task_dict(error=5),
    task_dict(error=["x"]),
    task_dict(finishedNodes=["n1"]),
    task_dict(finishedNodes="n1"),
    task_dict(finishedNodes={"": True}),
    task_dict(finishedNodes={"a\x00": True}),
    task_dict(nodes=_DELETE),
    task_dict(nodes=None),
    task_dict(nodes="n1"),
    task_dict(nodes={"n1": True}),
    task_dict(nodes=[1]),
    task_dict(nodes=[""]),
    task_dict(nodes=["n\n"]),
    task_dict(nodes=[None]),
]


@pytest.mark.parametrize("data", BAD_TASK_DICTS)
def test_task_from_json_rejects_malformed_tasks(data: Any) -> None:
    with pytest.raises(InvalidTaskError):
        task_from_json(orjson.dumps(data))


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"nope", b"\xff\xfe", b"{'a': 1}", b"[1,", "\ud800", b"\x00", b"{}" * 2, "NaN"],
)
def test_task_from_json_rejects_non_json(raw: bytes | str) -> None:
    with pytest.raises(InvalidTaskError) as info:
        task_from_json(raw)
    assert info.value.field == "data"


@pytest.mark.parametrize("raw", [None, 5, 1.0, object()])
def test_task_from_json_rejects_wrong_input_types(raw: Any) -> None:
    with pytest.raises(InvalidTaskError):
        task_from_json(raw)


json_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4)
    ),
    max_leaves=12,
)


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None, database=None)
def test_task_from_json_any_bytes_raise_only_invalid_task_error(raw: bytes) -> None:
    with contextlib.suppress(InvalidTaskError):
        task_from_json(raw)


_FIELD_VALUES = json_values | st.sampled_from(
    ["2024-01-01T00:00:00Z", GO_ZERO, "STARTED", "FAILED", "YQ==", "", "n1"]
)


@given(
    st.fixed_dictionaries(
        {},
        optional={key: _FIELD_VALUES for key in [*API_KEYS, "error", "finishedNodes", "nodes"]},
    )
)
@settings(max_examples=100, deadline=None, database=None)
def test_task_from_json_any_object_raises_only_invalid_task_error(data: dict[str, Any]) -> None:
    try:
        raw = orjson.dumps(data)
    except (TypeError, orjson.JSONEncodeError):  # int too big for JSON, lone surrogates
        return
    with contextlib.suppress(InvalidTaskError):
        task_from_json(raw)


@given(st.sampled_from(BAD_TASK_DICTS[5:]), st.sampled_from(sorted(API_KEYS)), json_values)
@settings(max_examples=100, deadline=None, database=None)
def test_task_from_json_mutated_field_raises_only_invalid_task_error(
    base: dict[str, Any], key: str, value: Any
) -> None:
    data = dict(base)
    data[key] = value
    try:
        raw = orjson.dumps(data)
    except (TypeError, orjson.JSONEncodeError):
        return
    with contextlib.suppress(InvalidTaskError):
        task_from_json(raw)


# ---- tasks_to_payload / tasks_from_payload ----------------------------------------------------


def test_tasks_payload_shape_and_sorting() -> None:
    b2 = make_task(namespace="b", id="2")
    b1 = make_task(namespace="b", id="1")
    a9 = make_task(namespace="a", id="9")
    raw = tasks_to_payload({"b": [b2, b1], "a": [a9]})
    data = orjson.loads(raw)
    assert list(data) == ["tasks"]
    assert list(data["tasks"]) == ["a", "b"]
    assert [t["ID"] for t in data["tasks"]["b"]] == ["1", "2"]
    assert data["tasks"]["a"][0] == orjson.loads(task_to_json(a9))
    assert tasks_from_payload(raw) == [a9, b1, b2]
    assert tasks_from_payload(raw.decode()) == [a9, b1, b2]


def test_tasks_payload_empty() -> None:
    raw = tasks_to_payload({})
    assert orjson.loads(raw) == {"tasks": {}}
    assert tasks_from_payload(raw) == []


@given(st.lists(tasks, max_size=6))
@settings(max_examples=50, deadline=None, database=None)
def test_tasks_payload_round_trip_property(items: list[Task]) -> None:
    unique = {(t.namespace, t.id): t for t in items}
    by_ns: dict[str, list[Task]] = {}
    for task in unique.values():
        by_ns.setdefault(task.namespace, []).append(task)
    decoded = tasks_from_payload(tasks_to_payload(by_ns))
    assert sorted(decoded, key=lambda t: (t.namespace, t.id)) == sorted(
        unique.values(), key=lambda t: (t.namespace, t.id)
    )


def test_tasks_from_payload_rejects_mismatched_namespace() -> None:
    body = {"tasks": {"other": [orjson.loads(task_to_json(make_task(namespace="ns")))]}}
    with pytest.raises(InvalidTaskError) as info:
        tasks_from_payload(orjson.dumps(body))
    assert info.value.field == "data"


def test_tasks_from_payload_rejects_duplicates() -> None:
    item = orjson.loads(task_to_json(make_task()))
    other_version = dict(item, version=99)
    body = {"tasks": {"ns": [item, other_version]}}
    with pytest.raises(InvalidTaskError, match="twice"):
        tasks_from_payload(orjson.dumps(body))


def test_tasks_from_payload_same_id_in_two_namespaces_is_fine() -> None:
    a = make_task(namespace="a", id="same")
    b = make_task(namespace="b", id="same")
    assert tasks_from_payload(tasks_to_payload({"a": [a], "b": [b]})) == [a, b]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b"null",
        b"{}",
        b'{"tasks": []}',
        b'{"tasks": null}',
        b'{"tasks": "x"}',
        b'{"tasks": {"ns": {}}}',
        b'{"tasks": {"ns": "x"}}',
        b'{"tasks": {"ns": [null]}}',
        b'{"tasks": {"ns": [{}]}}',
        b'{"tasks": {"ns": [1, 2]}}',
    ],
)
def test_tasks_from_payload_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(InvalidTaskError):
        tasks_from_payload(raw)


@given(st.binary(max_size=200) | json_values.map(lambda v: orjson.dumps({"tasks": v})))
@settings(max_examples=100, deadline=None, database=None)
def test_tasks_from_payload_raises_only_invalid_task_error(raw: bytes) -> None:
    with contextlib.suppress(InvalidTaskError):
        tasks_from_payload(raw)
