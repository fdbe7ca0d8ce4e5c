"""The results table (markdown) and the rewrite of ``benchmarks/README.md`` between its markers.

Where a goal is missed, :data:`MISSED` holds the reason found by profiling; it is written next
to the figure (the row's ``note``), in the JSON and in the README table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

NONE = "\N{EN DASH}"  # an empty cell
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"

_PROPAGATION = (
    "Missed: all 3 Schedulers are deciders and, with the default node_loss_grace, each reads "
    "the node list of every new run (a round trip per add) and walks every run of its view on "
    "every watch response: ~3x the CPU per write of node_loss_grace=None. An add reaches a "
    "Scheduler on two watch streams (record, assignment), the second ~0.7-0.9 ms after the "
    "first. See Findings 1."
)
_LIST = (
    "Missed: raw only JSON-decodes; we decode 3 + N keys per task (record, outcome, node list, "
    "a completion per node) into a Task in pure Python, ~80% of the call. See Findings 2."
)
_SINGLE = (
    "Missed on this run: within the +-0.15 run-to-run noise of this loaded machine; ours adds "
    "encoding the records and building the returned Task (GIL-bound with 8 threads). "
    "See Findings 3."
)
_FANOUT = (
    "Missed: the rows of watch events say how far each write reached (layout 2: 2 per node and "
    "add, the record and its bucket's assignment; none per progress write). See Findings 7."
)
_WIDE = "Missed: the note gives the requests sent, by path. See Findings 8."
_UNITS_BYTES = (
    "Missed: every node reads the run with its declared units once (compressed, ~2.3 bytes a "
    "unit here): O(units) per node, O(nodes) per transition. The transitions themselves are "
    "flat (the row that takes those reads out). See Findings 9."
)
_UNITS_TRIPS = "Missed: the note gives the requests by kind. See Findings 9."
_UNITS_TIME = "Missed: see Findings 9 for where the time goes."

MISSED: list[tuple[str, str, str]] = [
    ("propagation", "add->start p50", _PROPAGATION),
    ("propagation", "cancel->terminate p50", _PROPAGATION),
    ("throughput", "list", _LIST),
    ("throughput", "lowest ratio: list", _LIST),
    ("throughput", "", _SINGLE),
    ("fanout", "", _FANOUT),
    ("widetask", "", _WIDE),
    ("units", "etcd bytes sent per unit transition", _UNITS_BYTES),
    ("units", "round trips per unit", _UNITS_TRIPS),
    ("units", "add -> FINISHED", _UNITS_TIME),
]
"""``(case, row name prefix, reason)``: the first that matches a missed row is written next
to it."""

ALWAYS: list[tuple[str, str, str]] = [
    (
        "propagation",
        "start p50 after add_task returned",
        "No ratio: the raw event arrives before the raw put returns.",
    ),
]
"""``(case, row name prefix, note)`` shown whatever the verdict."""


def _note(table: list[tuple[str, str, str]], case: str, name: str) -> str:
    for key, prefix, text in table:
        if key == case and name.startswith(prefix):
            return text
    return ""


def attach_notes(case: str, entry: dict[str, Any]) -> None:
    """Write the notes that apply next to each row; a reason already given above in the same
    case is referred to, not repeated."""
    given: set[str] = set()
    for row in entry.get("rows", []):
        notes = [row.get("note") or "", _note(ALWAYS, case, row["name"])]
        if row.get("met") is False:
            reason = _note(MISSED, case, row["name"])
            notes.append("Missed: same reason as above." if reason in given else reason)
            given.add(reason)
        row["note"] = " ".join(n for n in notes if n)


def verdict(entry: dict[str, Any]) -> str:
    if entry.get("error"):
        return "ERROR"
    met = entry.get("met")
    return "goal met" if met else "goal missed" if met is False else "no goal"


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return NONE
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()


def _met(value: bool | None) -> str:
    return "yes" if value else "**no**" if value is False else NONE


def table(results: dict[str, Any], *, output: Path, base: Path) -> str:
    """The results as one markdown table; chart links are relative to ``base``."""
    lines = [
        "| case | figure | measured | baseline (same run) | ratio | goal | met | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["cases"].values():
        title = entry.get("title", "?")
        chart = entry.get("chart")
        if chart:
            link = os.path.relpath(output / chart, base).replace(os.sep, "/")
            title = f"[{title}]({link})"
        if entry.get("error"):
            last = entry["error"].strip().splitlines()[-1]
            lines.append(f"| {title} | ERROR | | | | | | {last} |")
            continue
        for i, row in enumerate(entry["rows"]):
            unit = row.get("unit", "")
            baseline = _num(row.get("baseline"), unit)
            if row.get("baseline_name") and row.get("baseline") is not None:
                baseline += f" ({row['baseline_name']})"
            ratio = row.get("ratio")
            cells = [
                title if i == 0 else "",
                row["name"],
                _num(row.get("measured"), unit),
                baseline,
                NONE if ratio is None else f"{ratio:.2f}x",
                row.get("goal") or "",
                _met(row.get("met")),
                (row.get("note") or "").replace("|", "/"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    env = results.get("environment", {})
    mode = "quick" if results.get("quick") else "full"
    load = env.get("load_average")
    busy = f", load average {load:.1f} at the start" if isinstance(load, (int, float)) else ""
    return (
        f"Run of {results['started_at']} ({mode}, {results.get('duration_s', '?')} s) on "
        f"{env.get('cpus', '?')} CPUs{busy}, Python {env.get('python', '?')}, etcd "
        f"{env.get('etcd', '?')} ({env.get('etcd_args', '')}), etcd3gw {env.get('etcd3gw', '?')}."
    )


def rewrite_readme(readme: Path, results: dict[str, Any], result_path: Path, output: Path) -> None:
    """Replace the text between the results markers of ``readme`` (append them if missing)."""
    base = readme.parent
    link = os.path.relpath(result_path, base).replace(os.sep, "/")
    verdicts = ", ".join(
        f"{entry.get('title', key)}: {verdict(entry)}" for key, entry in results["cases"].items()
    )
    block = "\n".join(
        [
            BEGIN,
            "",
            f"{summary(results)} Raw figures: [{link}]({link}).",
            "",
            f"Goals: {verdicts}.",
            "",
            table(results, output=output, base=base),
            "",
            END,
        ]
    )
    text = readme.read_text() if readme.exists() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Results\n\n" + block + "\n"
    readme.write_text(text)
