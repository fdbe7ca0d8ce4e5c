"""The Scheduler's timers: one heap, one clock, served by the worker thread; nothing polls.

Every delayed action of a Scheduler is a :class:`Timer` of a :class:`TimerKind` in one
:class:`Timers` heap. The worker sleeps until the earliest one is due (or until woken by the
watch), pops every due timer and acts on it. The clock is injectable (``clock``: monotonic
seconds), so tests drive backoffs and graces without sleeping.

Not thread-safe by itself: the Scheduler guards it with its lock. :meth:`Timers.add` says
whether the new timer became the earliest, so the caller knows to wake the worker.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Clock", "Timer", "TimerKind", "Timers"]

Clock = Callable[[], float]
"""Monotonic seconds (``time.monotonic`` by default)."""

TaskId = tuple[str, str]


class TimerKind(enum.Enum):
    """What a timer does when it is due."""

    TTL = "ttl"  # remove a terminal run from the cluster after the TTL
    NODE_LOSS = "node-loss"  # fail the runs still waiting for a node gone for the grace
    RETRY = "retry"  # reconcile a run again after a provider call failed
    NEXT_ATTEMPT = "next-attempt"  # a failed attempt's backoff is over: start the run again
    DEADLINE = "deadline"  # fail a run STARTED for longer than its policy's deadline
    PROGRESS = "progress"  # write the throttled progress of a run
    RECORD = "record"  # send again a completion or failure etcd could not take
    LOCAL_TASKS = "local-tasks"  # list the providers' local runs again after a failure
    RESYNC = "resync"  # the periodic full relist, a safety net under the watch
    UNIT_READY = "unit-ready"  # a unit of the pool may be claimed (its retry backoff is over)
    UNIT_CHECK = "unit-check"  # look for units handed out and never claimed
    UNIT_RECORD = "unit-record"  # send again a unit's completion or failure


@dataclass(order=True)
class Timer:
    """One scheduled action; the fields after ``kind`` say what it is about."""

    due: float
    seq: int
    kind: TimerKind = field(compare=False)
    task_id: TaskId = field(compare=False, default=("", ""))
    version: int = field(compare=False, default=0)
    node: str = field(compare=False, default="")
    attempt: int = field(compare=False, default=0)
    revision: int = field(compare=False, default=0)  # DEADLINE: the run state it was armed for
    unit: str = field(compare=False, default="")  # UNIT_RECORD: the unit

    @property
    def run(self) -> tuple[str, str, int]:
        return (self.task_id[0], self.task_id[1], self.version)


class Timers:
    """A heap of :class:`Timer` on one clock."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._heap: list[Timer] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def add(
        self,
        delay: float,
        kind: TimerKind,
        *,
        task_id: TaskId = ("", ""),
        version: int = 0,
        node: str = "",
        attempt: int = 0,
        revision: int = 0,
        unit: str = "",
    ) -> bool:
        """Schedule ``kind`` in ``delay`` seconds; True when it is now the earliest timer."""
        timer = Timer(
            self.clock() + max(0.0, delay),
            next(self._seq),
            kind,
            task_id,
            version,
            node,
            attempt,
            revision,
            unit,
        )
        heapq.heappush(self._heap, timer)
        return self._heap[0] is timer

    def pop_due(self) -> list[Timer]:
        """Every timer due now, earliest first."""
        now = self.clock()
        due = []
        while self._heap and self._heap[0].due <= now:
            due.append(heapq.heappop(self._heap))
        return due

    def next_delay(self) -> float | None:
        """Seconds until the earliest timer (0 if due), or None when there is none."""
        if not self._heap:
            return None
        return max(0.0, self._heap[0].due - self.clock())

    def pending(self) -> list[tuple[TimerKind, TaskId, int, float]]:
        """``(kind, task id, version, seconds left)`` of every pending timer, earliest first."""
        now = self.clock()
        return [
            (timer.kind, timer.task_id, timer.version, timer.due - now)
            for timer in sorted(self._heap)
        ]
