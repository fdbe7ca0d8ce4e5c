"""An example Provider: every node writes a small report file, step by step.

Use it as a template for your own provider. It shows the four things a provider must get right:

1. **Start in the background.** ``start_task`` must return at once; ``ThreadProvider`` runs the
   function below on a thread of its own per run.
2. **Report progress.** ``context.progress(fraction, message)`` (throttled, best effort); ``dtask
   wait`` and ``Manager.get_progress`` show it.
3. **Honour cancellation.** When the task is cancelled, fails on another node, or is replaced,
   the Scheduler calls ``terminate()`` on the handle, which sets ``context.cancelled``. The
   function waits on that event instead of sleeping, so it stops within one step; a terminated
   run records nothing.
4. **Keep local state per run, and let it be cleaned up.** With a ``state_dir`` every run gets a
   directory ``<state_dir>/<escaped id>/<version>/`` (``context.state_dir``); the report is
   written there, and ``cleanup_task`` removes it once the task is gone from the cluster (after
   ``completed_task_ttl``). ``get_local_tasks`` lists the runs found there, so a restarted node
   cleans up what it left behind.

A normal return records completion of this node; an exception records a failure (the task
becomes FAILED with the exception's message).

The payload is an optional JSON object (an empty payload means all defaults)::

    {"title": "nightly", "steps": 5, "step_seconds": 1.0, "fail_at": null}

``steps`` (1..1000, default 5) lines are written, one every ``step_seconds`` (0..60, default
0.5); ``fail_at`` (a step number) makes the run fail at that step, to try out failures.

Running it (from a checkout; ``contrib`` must be importable, so put the repository root on
``PYTHONPATH``, or copy this file into a package of your own and name that instead)::

    PYTHONPATH=/path/to/distributedtask dtask node --node-id node-1 \\
        --provider reports=contrib.providers.example_provider:make_provider --state-dir ./state
    dtask add reports nightly --payload '{"title": "nightly", "steps": 10}'
    dtask wait reports nightly
    cat state/reports/nightly/<version>/report.txt

``dtask node`` calls ``make_provider(state_dir=<--state-dir>/<namespace>)`` because the factory
accepts a ``state_dir`` keyword (see ``distributedtask.node.load_provider``).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from distributedtask import Task, TaskContext, ThreadProvider

__all__ = ["REPORT_NAME", "ReportRequest", "make_provider", "parse_payload", "write_report"]

REPORT_NAME = "report.txt"
MAX_STEPS = 1000
MAX_STEP_SECONDS = 60.0


@dataclass(frozen=True)
class ReportRequest:
    """What the payload asks for."""

    title: str = "report"
    steps: int = 5
    step_seconds: float = 0.5
    fail_at: int | None = None


def parse_payload(payload: bytes) -> ReportRequest:
    """Decode and check the payload. Raises :class:`ValueError` with a readable message.

    Every node gets the same payload, so a bad one fails the task on the first node that reads
    it, with this message as the task's error.
    """
    if not payload.strip():
        return ReportRequest()
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("payload must be a JSON object")
    unknown = set(data) - {"title", "steps", "step_seconds", "fail_at"}
    if unknown:
        raise ValueError(f"unknown payload keys: {', '.join(sorted(unknown))}")
    title = data.get("title", "report")
    steps = data.get("steps", 5)
    step_seconds = data.get("step_seconds", 0.5)
    fail_at = data.get("fail_at")
    if not isinstance(title, str):
        raise ValueError("title must be a string")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer in 1..{MAX_STEPS}")
    if (
        isinstance(step_seconds, bool)
        or not isinstance(step_seconds, (int, float))
        or not 0 <= step_seconds <= MAX_STEP_SECONDS
    ):
        raise ValueError(f"step_seconds must be a number in 0..{MAX_STEP_SECONDS:g}")
    if fail_at is not None and (isinstance(fail_at, bool) or not isinstance(fail_at, int)):
        raise ValueError("fail_at must be an integer or null")
    return ReportRequest(title, steps, float(step_seconds), fail_at)


def write_report(task: Task, context: TaskContext) -> None:
    """The work of one run on this node (called by ThreadProvider on a thread of its own)."""
    request = parse_payload(task.payload)  # ValueError -> the run fails with that message
    node = os.environ.get("DTASK_NODE_ID") or socket.gethostname()  # `dtask node` sets it
    lines = [
        f"# {request.title}",
        f"task {task.namespace}/{task.id} version {task.version} on node {node}",
        f"started by the cluster at {task.started_at.isoformat()}",
    ]
    context.progress(0.0, "starting")
    for step in range(1, request.steps + 1):
        # Wait on the cancellation event rather than sleeping: terminate() wakes us at once.
        if context.cancelled.wait(request.step_seconds):
            return  # terminated: record nothing, keep the partial state for cleanup_task
        if request.fail_at == step:
            raise RuntimeError(f"{request.title}: step {step} failed on purpose (fail_at)")
        lines.append(f"step {step}/{request.steps} done at {_now()}")
        context.progress(step / request.steps, f"step {step}/{request.steps}")
    lines.append(f"finished at {_now()}")
    if context.state_dir is not None:
        _write_atomically(context.state_dir / REPORT_NAME, "\n".join(lines) + "\n")
    # Returning records completion of this node (unless terminate() came meanwhile).


def make_provider(state_dir: str | Path | None = None) -> ThreadProvider:
    """The factory ``dtask node --provider NS=contrib.providers.example_provider:make_provider``
    calls, with ``state_dir=<--state-dir>/<NS>``. Without a ``state_dir`` runs keep no files
    (local state is then an in-memory set, lost on restart)."""
    return ThreadProvider(write_report, state_dir=state_dir)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _write_atomically(path: Path, text: str) -> None:
    # A reader (or a crash) never sees half a report: write a temp file, then rename it.
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)
