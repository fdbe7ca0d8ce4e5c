"""The JSON the console serves: a run's summary, its node rows, a member, and the filters and
orders of ``GET /api/tasks``.

A *summary* is the JSON of ``dtask get`` without the payload, the per-node maps and the
declared units, plus ``nodeCount``, ``finishedCount``, ``progress`` (the mean of the nodes'
fractions, a node done counting 1), ``failedAttempts`` (``dtask list``'s ATTEMPTS cell, or
null), ``payloadBytes`` and ``unitCount`` (the declared units; 0: a plain task). A *node row*
is one node as ``dtask wait`` shows it: ``state`` (running, retrying, paused, done, failed,
cancelled, stopped), ``fraction``, ``message``, ``updatedAt`` of its last progress report,
``attempts`` failed and ``lastError``. The *units* of a unit task (``GET /api/units``) are
:func:`units`: their counts by group, and each unit's row.

Pure functions; thread-safe. The dicts they return are never changed afterwards, so they may
be shared between threads and serialized outside any lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..describe import failed_attempts, node_state
from ..follower import FailedAttempts, FollowedRun
from ..model import Progress, Task, TaskStatus, Unit, format_time, task_to_dict
from ..records import MemberRecord, OutcomeRecord
from ..unitview import group_name, summarize_units, summary_to_dict, unit_to_dict

__all__ = [
    "SORTS",
    "full",
    "member_row",
    "node_rows",
    "select_tasks",
    "status_counts",
    "summary",
    "units",
]

Json = dict[str, Any]

_NOT_IN_SUMMARY = ("payload", "nodes", "finishedNodes", "attempts", "lastErrors", "units")


def node_rows(
    task: Task,
    outcome: OutcomeRecord | None,
    progress: Mapping[str, Progress],
    attempts: Mapping[str, FailedAttempts],
    nodes: Iterable[str],
) -> dict[str, Json]:
    """The rows of ``nodes`` (nodes of ``task``) from what is known of its run: its outcome,
    the current version's progress by node, the failed attempts by node."""
    followed = FollowedRun(
        completed=set(task.finished_nodes),
        progress=dict(progress),
        outcome=outcome,
        paused=task.status is TaskStatus.PAUSED,
        attempts=dict(attempts),
    )
    rows = {}
    for node in nodes:
        fraction, label, message = node_state(followed, node, task.policy.max_attempts)
        report = progress.get(node)
        rows[node] = {
            "node": node,
            "state": label,
            "fraction": fraction,
            "message": message,
            "updatedAt": None if report is None else format_time(report.updated_at),
            "attempts": task.attempts.get(node, 0),
            "lastError": task.last_errors.get(node),
        }
    return rows


def summary(task: Task, rows: Mapping[str, Json], payload_bytes: int) -> Json:
    """The summary of a run whose node rows are ``rows`` (one per node of the task)."""
    out = {k: v for k, v in task_to_dict(task).items() if k not in _NOT_IN_SUMMARY}
    fractions = [float(rows[node]["fraction"]) for node in task.nodes if node in rows]
    cell = failed_attempts(task)
    out.update(
        nodeCount=len(task.nodes),
        finishedCount=len(task.finished_nodes),
        progress=sum(fractions) / len(task.nodes) if task.nodes else 0.0,
        failedAttempts=None if cell == "-" else cell,
        payloadBytes=payload_bytes,
        unitCount=len(task.units),
    )
    return out


def full(task: Task, summary_json: Json, rows: Mapping[str, Json]) -> Json:
    """``GET /api/task``: the summary, every node row (``nodeStates``, by node id) and the
    per-node maps of ``dtask get`` (``finishedNodes``, ``attempts``, ``lastErrors``)."""
    whole = task_to_dict(task)
    out = dict(summary_json)
    for key in ("finishedNodes", "attempts", "lastErrors"):
        if key in whole:
            out[key] = whole[key]
    out["nodeStates"] = [rows[node] for node in sorted(rows)]
    return out


def units(namespace: str, task_id: str, version: int, found: Mapping[str, Unit]) -> Json:
    """``GET /api/units``: the units of a run (``Manager.get_units``), counted as ``dtask get``
    counts them (``unitSummary``: ``total``, ``counts``, ``completedByNode``,
    ``inProgressByNode``), with each group's units (``dtask units --json`` rows) under its
    entry of ``groups``, and ``label``, its name as shown (``(no group)`` for ``""``)::

        {"namespace", "ID", "version", "total", "counts": {"COMPLETED": 2, ...},
         "groups": [{"group", "label", "total", "counts", "units": [{"id", "status", ...}]}],
         "completedByNode", "inProgressByNode"}
    """
    summary = summarize_units(found.values())
    out: Json = {"namespace": namespace, "ID": task_id, "version": version}
    out.update(summary_to_dict(summary))
    out["groups"] = [
        {**entry, "label": group_name(group.group), "units": [unit_to_dict(u) for u in group.units]}
        for entry, group in zip(out["groups"], summary.groups, strict=True)
    ]
    return out


def member_row(member: MemberRecord, lease: int) -> Json:
    """A live member: ``node``, ``namespaces``, ``startedAt``, ``lease`` (hex, as etcdctl)."""
    return {
        "node": member.node_id,
        "namespaces": sorted(member.namespaces),
        "startedAt": format_time(member.started_at),
        "lease": f"{lease:x}" if lease else None,
    }


def status_counts(tasks: Iterable[Json]) -> dict[str, int]:
    """How many of ``tasks`` (summaries) have each status (every status named, 0 included)."""
    counts = {status.value: 0 for status in TaskStatus}
    for task in tasks:
        counts[task["status"]] = counts.get(task["status"], 0) + 1
    return counts


def _by_name(task: Json) -> tuple[str, str]:
    return (task["namespace"], task["ID"])


SORTS = {
    "name": (_by_name, False),
    "status": (lambda task: (task["status"], *_by_name(task)), False),
    "started": (lambda task: (task["startedAt"], *_by_name(task)), True),  # newest first
    "progress": (lambda task: (task["progress"], *_by_name(task)), False),
    "version": (lambda task: (task["version"], *_by_name(task)), True),
}
"""The orders of ``GET /api/tasks?sort=``: key and whether it is descending by default; a
leading ``-`` reverses it. RFC 3339 times in UTC sort as text."""


def select_tasks(
    tasks: Iterable[Json],
    *,
    namespace: str | None = None,
    status: str | None = None,
    sort: str = "name",
) -> list[Json]:
    """Summaries of ``namespace`` and ``status`` (None: any), in the order ``sort`` names.
    Raises :class:`ValueError` for an unknown status or order."""
    if status is not None and status not in TaskStatus.__members__:
        raise ValueError(f"unknown status {status!r}: one of {', '.join(TaskStatus.__members__)}")
    name = sort.removeprefix("-")
    if name not in SORTS:
        raise ValueError(f"unknown sort {sort!r}: one of {', '.join(SORTS)} (or -name...)")
    key, descending = SORTS[name]
    chosen = [
        task
        for task in tasks
        if (namespace is None or task["namespace"] == namespace)
        and (status is None or task["status"] == status)
    ]
    return sorted(chosen, key=key, reverse=descending != sort.startswith("-"))
