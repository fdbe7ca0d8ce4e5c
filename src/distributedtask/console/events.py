"""The console's numbered events and their wire form (server-sent events).

Every change the console's watch delivers becomes one or more :class:`Event` records in an
:class:`EventLog`, numbered ``1, 2, 3 ...`` within one server process. The log keeps the last
``capacity`` of them. A page reads it through a cursor — the number of the last event it got —
so one watch serves any number of pages without a queue per page, and a slow page cannot make
the server hold more than ``capacity`` events:

- a page that connects gets a *snapshot* (everything it shows), numbered with the log's head;
- then every event after its cursor, in order (events about one run that the page does not show
  — a ``nodes`` or ``units`` event of another run — are skipped);
- an ``EventSource`` that reconnects sends the id of the last event it got (``Last-Event-ID``):
  when that id is of this process (its :attr:`EventLog.epoch`) and still in the log, the page
  gets only what it missed; otherwise (an older id, a restarted server) a fresh snapshot;
- a ``resync`` event (the watch relisted: compaction, a handler error) sends every page a fresh
  snapshot too.

An event id on the wire is ``<epoch>-<number>``; the epoch is random per process, so an id of
another process is never taken for one of ours.

Not thread-safe by itself: its owner (:class:`~distributedtask.console.live.LiveState`) guards it
with the lock that guards the state the events describe, so that a snapshot and the cursor it
starts from always agree. Waking the pages is thread-safe (:meth:`EventLog.wake`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Event", "EventLog", "Waiter", "keep_alive", "sse_frame"]

Topic = tuple[str, str]
"""A run, ``(namespace, task_id)``: what a ``nodes`` or ``units`` event is only for."""


@dataclass(frozen=True)
class Event:
    """One numbered event: its SSE ``kind`` (``task``, ``removed``, ``nodes``, ``units``,
    ``transition``, ``members``, ``status``, ``resync``), its JSON ``data``, and the run it is
    only for (``topic``; None: for every page)."""

    seq: int
    kind: str
    data: bytes
    topic: Topic | None = None


class Waiter:
    """How a page's stream is woken: an ``asyncio.Event`` set from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def wake(self) -> None:
        """Set the event on its loop; a no-op once that loop is closed."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self.event.set)


class EventLog:
    """The last ``capacity`` events of this process, and the pages waiting for more."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity!r}")
        self.epoch = secrets.token_hex(6)
        self._events: deque[Event] = deque(maxlen=capacity)
        self._head = 0
        self._waiters: set[Waiter] = set()

    @property
    def head(self) -> int:
        """The number of the last event (0 before the first)."""
        return self._head

    def append(self, kind: str, data: bytes, topic: Topic | None = None) -> Event:
        """Number and keep an event (call :meth:`wake` once a batch is appended)."""
        self._head += 1
        event = Event(self._head, kind, data, topic)
        self._events.append(event)
        return event

    def since(self, seq: int) -> list[Event] | None:
        """The events after number ``seq``, or None when some of them are no longer kept."""
        if seq > self._head:
            return None  # not a number this log gave
        if seq == self._head:
            return []
        oldest = self._events[0].seq if self._events else self._head + 1
        if seq + 1 < oldest:
            return None
        return [event for event in self._events if event.seq > seq]

    def event_id(self, seq: int) -> str:
        """The wire id of event number ``seq``."""
        return f"{self.epoch}-{seq}"

    def parse_id(self, text: str | None) -> int | None:
        """The number an id of this process names, or None (no id, another process's, junk)."""
        if not text:
            return None
        epoch, _, number = text.strip().partition("-")
        if epoch != self.epoch or not number.isascii() or not number.isdigit():
            return None
        seq = int(number)
        return seq if seq <= self._head else None

    # ---- waiting pages --------------------------------------------------------------------

    def add_waiter(self, waiter: Waiter) -> None:
        self._waiters.add(waiter)

    def remove_waiter(self, waiter: Waiter) -> None:
        self._waiters.discard(waiter)

    @property
    def waiters(self) -> int:
        return len(self._waiters)

    def wake(self) -> None:
        """Wake every waiting page (thread-safe through each page's loop)."""
        for waiter in list(self._waiters):
            waiter.wake()


def sse_frame(event_id: str, kind: str, data: bytes) -> bytes:
    """One server-sent event. ``data`` is one line of JSON (orjson escapes CR and LF)."""
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id.encode(), kind.encode(), data)


def keep_alive() -> bytes:
    """A comment line: keeps proxies and the browser from taking a quiet stream for dead."""
    return b": keep-alive\n\n"


def frames(log: EventLog, events: Iterable[Event]) -> bytes:
    """The wire form of ``events``."""
    return b"".join(sse_frame(log.event_id(e.seq), e.kind, e.data) for e in events)
