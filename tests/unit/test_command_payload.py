"""Unit tests of CommandProvider's payload and progress parsing
(src/distributedtask/providers/command.py). Pure; no processes, no etcd."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest

import distributedtask as dt
from distributedtask.providers import CommandProvider
from distributedtask.providers.command import CommandSpec, parse_payload, parse_progress

payload = CommandProvider.payload


def test_payload_round_trips_through_parse_payload() -> None:
    data = payload(argv=["prog", "", "x y"], env={"A": "1", "B": ""}, cwd=Path("/tmp"), timeout=3)
    assert orjson.loads(data) == {
        "argv": ["prog", "", "x y"],
        "env": {"A": "1", "B": ""},
        "cwd": "/tmp",
        "timeout": 3.0,
    }
    spec = parse_payload(data)
    assert spec == CommandSpec(
        argv=("prog", "", "x y"), env={"A": "1", "B": ""}, cwd="/tmp", timeout=3.0
    )
    assert spec.args == ["prog", "", "x y"]
    assert parse_payload(spec.to_json()) == spec


def test_a_shell_payload_runs_under_bin_sh() -> None:
    spec = parse_payload(payload(shell="echo hi | wc -c"))
    assert spec.args == ["/bin/sh", "-c", "echo hi | wc -c"]
    assert orjson.loads(payload(shell="true")) == {"shell": "true"}


def test_null_counts_as_absent() -> None:
    data = b'{"argv": null, "shell": "true", "env": null, "cwd": null, "timeout": null}'
    assert parse_payload(data) == CommandSpec(shell="true")


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        ({}, "exactly one of 'argv' and 'shell'"),
        ({"argv": ["a"], "shell": "a"}, "exactly one of 'argv' and 'shell'"),
        ({"argv": "ls -l"}, "not a single string"),
        ({"argv": []}, "argv must not be empty"),
        ({"argv": [""]}, "argv[0] must not be empty"),
        ({"argv": ["ls", None]}, "argv[1] must be a string"),
        ({"argv": ["l\0s"]}, "NUL"),
        ({"shell": ""}, "shell must not be empty"),
        ({"shell": b"ls"}, "shell must be a string"),
        ({"shell": "ls", "env": {"A=B": "c"}}, "must not contain '='"),
        ({"shell": "ls", "env": {"": "c"}}, "env name must not be empty"),
        ({"shell": "ls", "env": {"A": 1}}, "env['A'] must be a string"),
        ({"shell": "ls", "env": [("A", "b")]}, "env must be an object"),
        ({"shell": "ls", "cwd": ""}, "cwd must not be empty"),
        ({"shell": "ls", "timeout": 0}, "positive"),
        ({"shell": "ls", "timeout": -2.5}, "positive"),
        ({"shell": "ls", "timeout": math.inf}, "positive"),
        ({"shell": "ls", "timeout": math.nan}, "positive"),
        ({"shell": "ls", "timeout": "5"}, "timeout must be a number"),
        ({"shell": "ls", "timeout": True}, "timeout must be a number"),
    ],
)
def test_payload_refuses_what_the_provider_would_refuse(
    kwargs: dict[str, Any], detail: str
) -> None:
    with pytest.raises(dt.InvalidTaskError) as caught:
        payload(**kwargs)
    assert isinstance(caught.value, ValueError)
    assert caught.value.field == "payload"
    assert str(caught.value).startswith("invalid command payload: ")
    assert detail in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [b"", b"nope", b"\xff", b"[1]", b"null", b'"ls"', b'{"argv": ["ls"], "extra": 1}', b"{}"],
)
def test_parse_payload_raises_invalid_task_error(data: bytes) -> None:
    with pytest.raises(dt.InvalidTaskError, match=r"^invalid command payload: "):
        parse_payload(data)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("progress: 0.42 some message", (0.42, "some message")),
        ("progress: 1", (1.0, "")),
        ("progress:0.5", (0.5, "")),
        ("  progress: .5   trailing spaces  ", (0.5, "trailing spaces")),
        ("progress: 1e-1 sci", (0.1, "sci")),
        ("progress: 7 clamped", (1.0, "clamped")),
        ("progress: -1 clamped", (0.0, "clamped")),
        ("progress: 0.3\tafter a tab", (0.3, "after a tab")),
        ("progress: abc", None),
        ("progress:", None),
        ("progress: 0.5x", None),
        ("progress: 1e999", None),
        ("Progress: 0.5", None),
        ("my progress: 0.5", None),
        ("", None),
    ],
)
def test_parse_progress(line: str, expected: tuple[float, str] | None) -> None:
    assert parse_progress(line) == expected


@pytest.mark.parametrize(
    "options",
    [
        {"kill_grace": -1},
        {"kill_grace": math.nan},
        {"kill_grace": "5"},
        {"output_tail_lines": -1},
        {"output_tail_lines": 2.5},
        {"output_tail_lines": True},
        {"env": {"A": 1}},
        {"env": ["A"]},
    ],
)
def test_bad_provider_arguments_raise_value_error(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CommandProvider(tmp_path, **options)


def test_the_provider_is_a_provider(tmp_path: Path) -> None:
    assert isinstance(CommandProvider(tmp_path), dt.Provider)
