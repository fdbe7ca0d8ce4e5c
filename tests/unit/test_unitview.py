"""unitview.py (a unit task's units in counts) and describe.unit_states (dtask wait's lines of
a unit task): pure, no etcd."""

from __future__ import annotations

from datetime import datetime, timezone

from distributedtask.describe import unit_states
from distributedtask.follower import FollowedRun
from distributedtask.model import Progress, TaskStatus, Unit, UnitSpec, UnitStatus
from distributedtask.records import OutcomeRecord, UnitClaim
from distributedtask.unitview import (
    group_name,
    summarize_units,
    summary_to_dict,
    unit_to_dict,
    units_from_claims,
)

AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
C, R, P, F = (
    UnitStatus.COMPLETED,
    UnitStatus.IN_PROGRESS,
    UnitStatus.PENDING,
    UnitStatus.FAILED,
)


def _units() -> list[Unit]:
    return [
        Unit("a1", "a", "n1", C),
        Unit("b1", "b", "n2", R),
        Unit("a2", "a", "n1", C),
        Unit("x", "", None, P),
        Unit("b2", "b", "n1", P, attempts=1, error="boom"),
    ]


def test_summary_counts_by_status_group_and_node() -> None:
    summary = summarize_units(_units())
    assert summary.total == 5 and summary.completed == 2
    assert [g.group for g in summary.groups] == ["a", "b", ""]  # first-declared order
    assert [u.id for u in summary.groups[1].units] == ["b1", "b2"]
    zero = {"COMPLETED": 0, "IN_PROGRESS": 0, "PENDING": 0, "FAILED": 0}
    assert summary_to_dict(summary) == {
        "total": 5,
        "counts": {"COMPLETED": 2, "IN_PROGRESS": 1, "PENDING": 2, "FAILED": 0},
        "groups": [
            {"group": "a", "total": 2, "counts": {**zero, "COMPLETED": 2}},
            {"group": "b", "total": 2, "counts": {**zero, "IN_PROGRESS": 1, "PENDING": 1}},
            {"group": "", "total": 1, "counts": {**zero, "PENDING": 1}},
        ],
        "completedByNode": {"n1": 2},
        "inProgressByNode": {"n2": 1},
    }
    assert group_name("") == "(no group)" and group_name("a") == "a"
    empty = summarize_units([])
    assert empty.total == 0 and empty.groups == ()


def test_units_from_claims_and_their_json() -> None:
    specs = (UnitSpec("a", group="g"), UnitSpec("b", node="n2"))
    claims = {"a": UnitClaim(7, F, "n1", 3, "tok", "bad")}
    a, b = units_from_claims(specs, claims)
    assert a == Unit("a", "g", "n1", F, 3, "bad")
    assert b == Unit("b", "", None, P)
    assert unit_to_dict(b) == {
        "id": "b",
        "group": "",
        "node": None,
        "status": "PENDING",
        "attempts": 0,
        "error": None,
        "progress": None,
    }
    with_progress = Unit("c", "", "n1", R, progress=Progress(0.5, "half", AT))
    assert unit_to_dict(with_progress)["progress"] == {
        "fraction": 0.5,
        "message": "half",
        "updatedAt": "2026-01-02T03:04:05Z",
    }


def test_unit_states_while_running_paused_and_after_the_end() -> None:
    summary = summarize_units(_units())
    state = FollowedRun()
    assert unit_states(state, summary, ["n2", "n1", "n3"]) == [
        ("units", (0.4, "running", "2/5 completed, 1 in progress, 1 retrying")),
        ("group a", (1.0, "done", "2/2 completed")),
        ("group b", (0.0, "running", "0/2 completed, 1 in progress, 1 retrying")),
        ("group (no group)", (0.0, "running", "0/1 completed")),
        ("node n1", (0.4, "idle", "2 completed")),
        ("node n2", (0.0, "running", "0 completed, 1 in progress")),
        ("node n3", (0.0, "idle", "0 completed")),
    ]
    state.paused = True
    assert {label for _, (_, label, _) in unit_states(state, summary, ["n1"])} == {
        "paused",
        "done",
    }
    state.paused = False
    state.outcome = OutcomeRecord(TaskStatus.CANCELLED, AT, "tok")
    rows = dict(unit_states(state, summary, ["n1"]))
    assert rows["units"][1] == rows["node n1"][1] == "cancelled"
    state.outcome = OutcomeRecord(TaskStatus.FAILED, AT, "tok", "boom", "n2", "b1")
    rows = dict(unit_states(state, summary, ["n1", "n2"]))
    assert rows["node n2"] == (0.0, "failed", "0 completed, 1 in progress; unit b1: boom")
    assert rows["node n1"][1] == "stopped" and rows["units"][1] == "stopped"
    state.outcome = OutcomeRecord(TaskStatus.FINISHED, AT, "tok")
    rows = dict(unit_states(state, summary, ["n1"]))
    assert rows["units"] == (1.0, "done", "5/5 completed")
    assert rows["node n1"] == (0.4, "done", "2 completed")
    # no named group: no line per group
    plain = summarize_units([Unit("x", "", None, P)])
    assert [name for name, _ in unit_states(FollowedRun(), plain, ["n1"])] == ["units", "node n1"]
