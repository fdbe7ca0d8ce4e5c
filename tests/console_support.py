"""Helpers of the console's tests: a server-sent-events reader and a console on a free port."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import requests

import distributedtask as dt

pytest.importorskip("starlette", reason="the console needs the ui extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="the console needs the ui extra (starlette, uvicorn)")

from distributedtask.console import ConsoleServer

KEEP_ALIVE = 0.5  # seconds: short, so a quiet stream still lets a reader look at its deadline


@contextmanager
def console(manager: dt.Manager, **options: Any) -> Iterator[ConsoleServer]:
    """A started console of ``manager``'s prefix on a free port, stopped on the way out."""
    options.setdefault("port", 0)
    options.setdefault("keep_alive_seconds", KEEP_ALIVE)
    with ConsoleServer(manager, **options) as server:
        yield server


@dataclass(frozen=True)
class Sse:
    """One server-sent event."""

    id: str
    kind: str
    data: Any


class SseReader:
    """Reads ``GET <url>api/events`` event by event (a context manager closing the stream)."""

    def __init__(
        self,
        url: str,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.response = requests.get(
            url + "api/events",
            params=dict(params or {}),
            headers=dict(headers or {}),
            stream=True,
            timeout=(5, 5),
        )
        self.response.raise_for_status()
        self._lines = self.response.iter_lines(decode_unicode=True)
        self.last_id = ""

    def __enter__(self) -> SseReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.response.close()

    def next(self) -> Sse | None:
        """The next event, or None for a keep-alive or a retry line."""
        fields: dict[str, str] = {}
        for line in self._lines:
            if line == "":
                if fields.get("event"):
                    self.last_id = fields.get("id", self.last_id)
                    return Sse(self.last_id, fields["event"], orjson.loads(fields["data"]))
                return None
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        raise EOFError("the event stream ended")

    def until(self, match: Callable[[Sse], bool], timeout: float = 10.0) -> list[Sse]:
        """Every event up to and including the first that ``match`` accepts."""
        deadline = time.monotonic() + timeout
        seen: list[Sse] = []
        while time.monotonic() < deadline:
            event = self.next()
            if event is None:
                continue
            seen.append(event)
            if match(event):
                return seen
        kinds = [(event.kind, event.data) for event in seen]
        raise AssertionError(f"no matching event within {timeout:g}s; saw {kinds!r:.2000}")


def is_task(status: str, task_id: str | None = None) -> Callable[[Sse], bool]:
    """A matcher of the ``task`` event of ``task_id`` (any, when None) with ``status``."""
    return lambda event: (
        event.kind == "task"
        and event.data["task"]["status"] == status
        and (task_id is None or event.data["task"]["ID"] == task_id)
    )
