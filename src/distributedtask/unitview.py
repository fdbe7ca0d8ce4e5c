"""The units of a unit task in counts: what ``dtask get``, ``dtask units``, ``dtask wait`` (and
the web console) show of them, computed in one place so that they never disagree.

- :func:`summarize_units` — units (``Manager.get_units``' values, in declaration order) as a
  :class:`UnitSummary`: counts by status in all and per group (groups in order of their first
  unit), units completed and held by each node;
- :func:`units_from_claims` — the units of a declaration and the claims a watch followed (what
  ``dtask wait`` has, without reading every unit again);
- :func:`summary_to_dict`, :func:`unit_to_dict` — their JSON (``unitSummary`` of ``dtask get``,
  ``dtask units --json``);
- :func:`group_name` — a group as shown to a person (``(no group)`` for ``""``).

Pure functions over values of :mod:`distributedtask.model`; thread-safe.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .model import Unit, UnitSpec, UnitStatus, format_time
from .records import UnitClaim

__all__ = [
    "NO_GROUP",
    "STATUSES",
    "GroupSummary",
    "UnitSummary",
    "group_name",
    "summarize_units",
    "summary_to_dict",
    "unit_to_dict",
    "units_from_claims",
]

STATUSES = (
    UnitStatus.COMPLETED,
    UnitStatus.IN_PROGRESS,
    UnitStatus.PENDING,
    UnitStatus.FAILED,
)
"""The statuses in the order they are shown."""

NO_GROUP = "(no group)"
"""How the group ``""`` is shown."""


def group_name(group: str) -> str:
    """A group as shown to a person: its name, or ``(no group)`` for ``""``."""
    return group or NO_GROUP


def _zero() -> dict[UnitStatus, int]:
    return dict.fromkeys(STATUSES, 0)


@dataclass(frozen=True)
class GroupSummary:
    """The units of one group (declaration order) and their count by status (every status
    present, zeros included)."""

    group: str
    units: tuple[Unit, ...]
    counts: Mapping[UnitStatus, int]

    @property
    def total(self) -> int:
        return len(self.units)

    @property
    def completed(self) -> int:
        return self.counts[UnitStatus.COMPLETED]


@dataclass(frozen=True)
class UnitSummary:
    """Every unit of a task in counts: ``counts`` by status (every status present),
    ``groups`` in order of their first unit, ``completed_by_node`` (units each node completed)
    and ``held_by_node`` (units each node holds IN_PROGRESS), both sorted by node."""

    groups: tuple[GroupSummary, ...]
    counts: Mapping[UnitStatus, int]
    completed_by_node: Mapping[str, int]
    held_by_node: Mapping[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def completed(self) -> int:
        return self.counts[UnitStatus.COMPLETED]


def summarize_units(units: Iterable[Unit]) -> UnitSummary:
    """The :class:`UnitSummary` of ``units`` (in declaration order)."""
    by_group: dict[str, list[Unit]] = {}
    group_counts: dict[str, dict[UnitStatus, int]] = {}
    counts = _zero()
    completed: dict[str, int] = {}
    held: dict[str, int] = {}
    for unit in units:
        members = by_group.get(unit.group)
        if members is None:
            members = by_group[unit.group] = []
            group_counts[unit.group] = _zero()
        members.append(unit)
        group_counts[unit.group][unit.status] += 1
        counts[unit.status] += 1
        if unit.node is not None:
            if unit.status is UnitStatus.COMPLETED:
                completed[unit.node] = completed.get(unit.node, 0) + 1
            elif unit.status is UnitStatus.IN_PROGRESS:
                held[unit.node] = held.get(unit.node, 0) + 1
    return UnitSummary(
        groups=tuple(
            GroupSummary(group, tuple(members), group_counts[group])
            for group, members in by_group.items()
        ),
        counts=counts,
        completed_by_node=dict(sorted(completed.items())),
        held_by_node=dict(sorted(held.items())),
    )


def units_from_claims(specs: Sequence[UnitSpec], claims: Mapping[str, UnitClaim]) -> list[Unit]:
    """The units of a declaration (in its order) as ``claims`` (claim records by unit id, of
    the run followed) say they stand; a unit without a claim is PENDING. No progress."""
    out = []
    for spec in specs:
        claim = claims.get(spec.id)
        if claim is None:
            out.append(Unit(spec.id, spec.group, None, UnitStatus.PENDING))
        else:
            out.append(
                Unit(spec.id, spec.group, claim.node, claim.status, claim.attempts, claim.error)
            )
    return out


def _counts_to_dict(counts: Mapping[UnitStatus, int]) -> dict[str, int]:
    return {status.value: counts[status] for status in STATUSES}


def summary_to_dict(summary: UnitSummary) -> dict[str, Any]:
    """The JSON of a summary (``unitSummary`` of ``dtask get``)::

    {"total": 5, "counts": {"COMPLETED": 2, "IN_PROGRESS": 1, "PENDING": 2, "FAILED": 0},
     "groups": [{"group": "a", "total": 3, "counts": {...}}, ...],
     "completedByNode": {"n1": 2}, "inProgressByNode": {"n2": 1}}
    """
    return {
        "total": summary.total,
        "counts": _counts_to_dict(summary.counts),
        "groups": [
            {"group": g.group, "total": g.total, "counts": _counts_to_dict(g.counts)}
            for g in summary.groups
        ],
        "completedByNode": dict(summary.completed_by_node),
        "inProgressByNode": dict(summary.held_by_node),
    }


def unit_to_dict(unit: Unit) -> dict[str, Any]:
    """The JSON of a unit (``dtask units --json``)::

    {"id", "group", "node" (null: never claimed), "status", "attempts", "error" (or null),
     "progress": {"fraction", "message", "updatedAt"} or null}
    """
    progress = unit.progress
    return {
        "id": unit.id,
        "group": unit.group,
        "node": unit.node,
        "status": unit.status.value,
        "attempts": unit.attempts,
        "error": unit.error,
        "progress": None
        if progress is None
        else {
            "fraction": progress.fraction,
            "message": progress.message,
            "updatedAt": format_time(progress.updated_at),
        },
    }
