"""How runs and their changes are told to a person: the one place for the words.

Shared by the command line and the web console, so that ``dtask watch``'s lines, a task page's
timeline, ``dtask wait``'s node states and a node's row on a task page never disagree:

- :func:`describe_changes` — the changes of one watch response as :class:`Change` lines
  (``added shell/migrate v42``, ``shell/migrate attempt 1 failed on node-b: ...``,
  ``shell/migrate CANCELLED``, ``member node-a joined (demo, shell)`` ...);
- :func:`node_state` — one node of a followed run as ``(fraction, label, message)``, the label
  one of ``running``, ``retrying``, ``paused``, ``done``, ``failed``, ``cancelled``,
  ``stopped``;
- :func:`unit_states` — the lines of a followed unit task (``dtask wait``'s): all its units,
  each group, each node, as ``(name, (fraction, label, message))`` (a node's label also
  ``idle``: it holds no unit now);
- :func:`failed_attempts` — the ATTEMPTS cell of ``dtask list`` (``1 failed on n1``).

Pure functions over decoded values; thread-safe. Values that cannot be decoded are told as
such (``unreadable value at ...``), never raised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .etcd import txn as t
from .etcd.watch import WatchEvent
from .exceptions import CorruptRecordError
from .follower import FollowedRun
from .keys import (
    AttemptKey,
    DoneKey,
    Keys,
    MemberKey,
    OutcomeKey,
    ProgressKey,
    StateKey,
    TaskKey,
)
from .model import Task, TaskStatus, Unit, UnitStatus
from .records import AttemptRecord, MemberRecord, OutcomeRecord, RunState, decode_progress
from .unitview import UnitSummary, group_name

__all__ = [
    "Change",
    "describe_change",
    "describe_changes",
    "failed_attempts",
    "node_state",
    "unit_states",
]

NodeState = tuple[float, str, str]
"""``(fraction, label, message)`` of one node of a run."""


@dataclass(frozen=True)
class Change:
    """One change told in words. ``line`` is ``dtask watch``'s line; ``what`` the same
    without the run's name, for a page about that run (``namespace`` and ``task_id`` name it;
    both None for a change of membership)."""

    line: str
    what: str
    namespace: str | None = None
    task_id: str | None = None


def _of_task(namespace: str, task_id: str, what: str) -> Change:
    return Change(f"{namespace}/{task_id} {what}", what, namespace, task_id)


def describe_change(keys: Keys, kind: str, kv: t.KeyValue, progress: bool) -> Change | None:
    """One change of one key (``kind`` ``"put"`` or ``"delete"``), or None for a change not
    worth a line (assignments, node lists, deletes of per-node keys; progress unless
    ``progress``)."""
    parsed = keys.parse(kv.key)
    try:
        if isinstance(parsed, TaskKey):
            ns, tid = parsed.namespace, parsed.task_id
            if kind == "put":
                what = f"added v{kv.mod_revision}"
                return Change(f"added {ns}/{tid} v{kv.mod_revision}", what, ns, tid)
            return Change(f"removed {ns}/{tid}", "removed", ns, tid)
        if isinstance(parsed, OutcomeKey) and kind == "put":
            outcome = OutcomeRecord.decode(kv.value)
            error = f": {outcome.error}" if outcome.error else ""
            on = f" on {outcome.node}" if outcome.node else ""
            return _of_task(parsed.namespace, parsed.task_id, f"{outcome.status.value}{on}{error}")
        if isinstance(parsed, DoneKey) and kind == "put":
            return _of_task(parsed.namespace, parsed.task_id, f"completed on {parsed.node_id}")
        if isinstance(parsed, StateKey) and kind == "put":
            paused = RunState.decode(kv.value).paused_since is not None
            return _of_task(parsed.namespace, parsed.task_id, "PAUSED" if paused else "resumed")
        if isinstance(parsed, AttemptKey) and kind == "put":
            attempt = AttemptRecord.decode(kv.value)
            what = f"attempt {kv.version} failed on {parsed.node_id}: {attempt.error}"
            return _of_task(parsed.namespace, parsed.task_id, what)
        if isinstance(parsed, ProgressKey) and kind == "put" and progress:
            p = decode_progress(kv.value)
            what = f"v{parsed.version} {parsed.node_id} {p.fraction:.0%} {p.message}".rstrip()
            return _of_task(parsed.namespace, parsed.task_id, what)
        if isinstance(parsed, MemberKey):
            if kind == "delete":
                text = f"member {parsed.node_id} left"
            else:
                member = MemberRecord.decode(kv.value)
                text = f"member {member.node_id} joined ({', '.join(sorted(member.namespaces))})"
            return Change(text, text)
    except CorruptRecordError as exc:
        text = f"unreadable value at {kv.key!r}: {exc}"
        namespace = getattr(parsed, "namespace", None)
        task_id = getattr(parsed, "task_id", None)
        return Change(text, text, namespace, task_id)
    return None


def describe_changes(keys: Keys, events: Iterable[WatchEvent], progress: bool) -> list[Change]:
    """The changes of one watch response, in order.

    The failure that uses a node's last attempt also counts it, in the transaction that writes
    the outcome: the outcome's line says it, so that attempt's line is left out.
    """
    listed = list(events)
    ended = {
        (event.kv.mod_revision, parsed.namespace, parsed.task_id)
        for event in listed
        if event.kind == "put" and isinstance(parsed := keys.parse(event.kv.key), OutcomeKey)
    }
    out = []
    for event in listed:
        if ended:
            parsed = keys.parse(event.kv.key)
            if isinstance(parsed, AttemptKey) and (
                (event.kv.mod_revision, parsed.namespace, parsed.task_id) in ended
            ):
                continue
        change = describe_change(keys, event.kind, event.kv, progress)
        if change is not None:
            out.append(change)
    return out


def node_state(state: FollowedRun, node: str, max_attempts: int) -> NodeState:
    """``(fraction, label, message)`` of one node of a run (``dtask wait``'s line of it)."""
    progress = state.progress.get(node)
    fraction = progress.fraction if progress else 0.0
    message = progress.message if progress else ""
    finished = state.outcome is not None and state.outcome.status is TaskStatus.FINISHED
    if node in state.completed or finished:  # FINISHED: every node completed
        return 1.0, "done", message
    if state.outcome is not None and state.outcome.node == node:
        return fraction, "failed", state.outcome.error or "failed"
    if state.outcome is not None:  # ended elsewhere: this node's run was stopped
        label = "cancelled" if state.outcome.status is TaskStatus.CANCELLED else "stopped"
        return fraction, label, message
    failed = state.attempts.get(node)
    if failed is not None and failed.count > 0:
        attempt = f"attempt {failed.count + 1} of {max(max_attempts, failed.count + 1)}"
        # The next attempt runs once the node reports after its failure (one node's clock).
        reported = (
            progress is not None and failed.at is not None and progress.updated_at > failed.at
        )
        message = f"{message} ({attempt})".lstrip() if reported else f"({attempt}): {failed.error}"
        if state.paused:
            return fraction, "paused", message
        return fraction, "running" if reported else "retrying", message
    return fraction, "paused" if state.paused else "running", message


def _count_state(
    state: FollowedRun, counts: Mapping[UnitStatus, int], units: Iterable[Unit]
) -> NodeState:
    """``(fraction, label, message)`` of some units (all of a task's, or a group's)."""
    total = sum(counts.values())
    completed = counts[UnitStatus.COMPLETED]
    finished = state.outcome is not None and state.outcome.status is TaskStatus.FINISHED
    if finished or completed == total:  # FINISHED: every unit completed
        return 1.0, "done", f"{total}/{total} completed"
    parts = [f"{completed}/{total} completed"]
    if counts[UnitStatus.IN_PROGRESS]:
        parts.append(f"{counts[UnitStatus.IN_PROGRESS]} in progress")
    retrying = sum(1 for u in units if u.status is UnitStatus.PENDING and u.attempts > 0)
    if retrying:
        parts.append(f"{retrying} retrying")
    if counts[UnitStatus.FAILED]:
        parts.append(f"{counts[UnitStatus.FAILED]} failed")
    fraction = completed / total if total else 0.0
    if counts[UnitStatus.FAILED]:
        label = "failed"
    elif state.outcome is not None:
        label = "cancelled" if state.outcome.status is TaskStatus.CANCELLED else "stopped"
    else:
        label = "paused" if state.paused else "running"
    return fraction, label, ", ".join(parts)


def _unit_node_state(state: FollowedRun, summary: UnitSummary, node: str) -> NodeState:
    """``(fraction, label, message)`` of one node of a unit task: its share of the units
    completed."""
    completed = summary.completed_by_node.get(node, 0)
    held = summary.held_by_node.get(node, 0)
    fraction = completed / summary.total if summary.total else 0.0
    message = f"{completed} completed" + (f", {held} in progress" if held else "")
    outcome = state.outcome
    if outcome is not None:
        if outcome.status is TaskStatus.FINISHED:
            return fraction, "done", message
        if outcome.node == node:
            unit = f"unit {outcome.unit}: " if outcome.unit else ""
            return fraction, "failed", f"{message}; {unit}{outcome.error or 'failed'}"
        label = "cancelled" if outcome.status is TaskStatus.CANCELLED else "stopped"
        return fraction, label, message
    if state.paused:
        return fraction, "paused", message
    return fraction, "running" if held else "idle", message


def unit_states(
    state: FollowedRun, summary: UnitSummary, nodes: Iterable[str]
) -> list[tuple[str, NodeState]]:
    """The lines of a followed unit task (``dtask wait``'s): ``units`` (every unit), then
    ``group G`` per group when some group is named (``group (no group)`` for the units of
    none), then ``node N`` per node of ``nodes`` (sorted), whose fraction is its share of the
    task's units completed. ``summary`` is of the run's units as the follower last saw them."""
    everything = [unit for group in summary.groups for unit in group.units]
    out = [("units", _count_state(state, summary.counts, everything))]
    if any(group.group for group in summary.groups):
        out.extend(
            (f"group {group_name(g.group)}", _count_state(state, g.counts, g.units))
            for g in summary.groups
        )
    out.extend((f"node {node}", _unit_node_state(state, summary, node)) for node in sorted(nodes))
    return out


def failed_attempts(task: Task) -> str:
    """The ATTEMPTS cell of ``dtask list``: ``-``, ``2 failed on n1``, ``5 failed on 3 nodes``."""
    failed = {node: count for node, count in task.attempts.items() if count > 0}
    if not failed:
        return "-"
    where = next(iter(failed)) if len(failed) == 1 else f"{len(failed)} nodes"
    return f"{sum(failed.values())} failed on {where}"
