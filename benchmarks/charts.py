"""One PNG chart per case, from the case's JSON entry. Imports matplotlib (the ``bench`` extra),
so it is only imported when charts are drawn (not with ``--no-charts``)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import NullFormatter, ScalarFormatter

OURS = "#1f77b4"
BASE = "#999999"
OTHER = "#d62728"


def draw(key: str, entry: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.png"
    drawer = {
        "propagation": _propagation,
        "throughput": _throughput,
        "fanin": _fanin,
        "idle": _idle,
        "scale": _scale,
        "client": _client,
        "fanout": _fanout,
        "widetask": _widetask,
        "units": _units,
    }[key]
    fig = drawer(entry)
    verdict = {True: "goal met", False: "goal missed", None: "no goal"}[entry.get("met")]
    fig.suptitle(f"{entry['title']}: {verdict}", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cdf(ax: Axes, values: list[float], label: str, color: str | None = None) -> None:
    if not values:
        return
    ordered = sorted(values)
    n = len(ordered)
    ax.step(
        ordered,
        [(i + 1) / n for i in range(n)],
        where="post",
        label=f"{label} (n={n})",
        color=color,
    )


def _propagation(entry: dict[str, Any]) -> Any:
    samples: dict[str, list[float]] = entry["data"]["samples_ms"]
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = {"raw put": BASE, "raw replay": "#555555", "add_task": OURS, "cancel_task": "#2ca02c"}
    for label, values in samples.items():
        color = next((c for prefix, c in colors.items() if label.startswith(prefix)), OTHER)
        _cdf(ax, [max(v, 0.01) for v in values], label, color)
    ax.set_xscale("log")
    ax.set_xlabel("ms from the write being issued (log scale)")
    ax.set_ylabel("fraction of observations")
    ax.axhline(0.5, color="#cccccc", linewidth=0.8)
    ax.axhline(0.99, color="#cccccc", linewidth=0.8)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def _throughput(entry: dict[str, Any]) -> Any:
    data: dict[str, dict[str, dict[str, float]]] = entry["data"]
    fig, axes = plt.subplots(1, len(data), figsize=(11, 4.5), sharey=True)
    if len(data) == 1:
        axes = [axes]
    for ax, (mode, ops) in zip(axes, data.items(), strict=True):
        names = list(ops)
        xs = range(len(names))
        ax.bar(
            [x - 0.2 for x in xs], [ops[n]["ours"] for n in names], 0.4, label="ours", color=OURS
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [ops[n]["raw"] for n in names],
            0.4,
            label="raw etcd3gw, same requests",
            color=BASE,
        )
        for x, name in zip(xs, names, strict=True):
            ratio = ops[name]["ours"] / ops[name]["raw"]
            ax.annotate(
                f"{ratio:.2f}x",
                (x, max(ops[name]["ours"], ops[name]["raw"])),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_title(mode)
        ax.set_ylabel("operations / s")
        ax.legend(fontsize=8)
    return fig


def _fanin(entry: dict[str, Any]) -> Any:
    data = entry["data"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    n = data["n"]
    left.plot(n, data["ours_trips"], "o-", label="ours", color=OURS)
    if data.get("unseen_trips"):
        left.plot(n, data["unseen_trips"], "^:", label="ours, run never seen", color=OURS)
    left.plot(n, data["naive_trips"], "s-", label="CAS on one record", color=BASE)
    left.plot(n, [x + 1 for x in n], "--", label="goal: N + 1", color=OTHER)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("N nodes completing at once")
    left.set_ylabel("etcd round trips (total)")
    left.legend(fontsize=8)
    left.grid(True, which="both", alpha=0.3)
    right.plot(n, data["ours_ms"], "o-", label="ours", color=OURS)
    right.plot(n, data["naive_ms"], "s-", label="CAS on one record", color=BASE)
    right.set_xscale("log", base=2)
    right.set_xlabel("N nodes completing at once")
    right.set_ylabel("ms until FINISHED (median)")
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    return fig


def _bars(ax: Axes, row: dict[str, Any], measured: str, baseline: str) -> None:
    ax.bar([measured, baseline], [row["measured"] or 0, row["baseline"] or 0], color=[OURS, BASE])
    ax.set_title(textwrap.fill(row["name"], 32), fontsize=9)
    ax.set_ylabel(row["unit"])


def _bar_rows(rows: list[dict[str, Any]], baseline: str, width: float = 3.0) -> Any:
    """A pair of bars (ours, ``baseline``) for each row, its goal as a dashed line where it is a
    bound ("< 5 s", "<= 1002")."""
    fig, axes = plt.subplots(1, len(rows), figsize=(width * len(rows), 4))
    for ax, row in zip(axes, rows, strict=True):
        _bars(ax, row, "ours", baseline)
        goal = row.get("goal") or ""
        if goal.startswith("<"):
            ax.axhline(
                float(goal.lstrip("<=").split()[0]), color=OTHER, linestyle="--", label="goal"
            )
            ax.legend(fontsize=8)
    return fig


def _idle(entry: dict[str, Any]) -> Any:
    return _bar_rows([r for r in entry["rows"] if r["baseline"] is not None], "polling 1 s")


def _scale(entry: dict[str, Any]) -> Any:
    return _bar_rows(entry["rows"], "raw")


def _client(entry: dict[str, Any]) -> Any:
    us: dict[str, float] = entry["data"]["us_per_round_trip"]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(us)
    colors = [OURS if "ours" in n else BASE for n in names]
    ax.barh(names, [us[n] for n in names], color=colors)
    for i, name in enumerate(names):
        ax.annotate(f"{us[name]:,.0f} µs", (us[name], i), va="center", fontsize=8)
    ax.set_xlabel("µs per round trip (range of one key)")
    ax.invert_yaxis()
    return fig


def _fanout(entry: dict[str, Any]) -> Any:
    data = entry["data"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
    ks: list[int] = data["k"]
    panels = [
        ("add_kB", "etcd kB sent per add", "goal: 2 x K ratio", lambda k: 2 * k / ks[0]),
        ("progress_kB", "etcd kB sent per progress write", "goal: 2x", lambda k: 2.0),
        ("start_ms", "ms from add until all K started", "goal: 10x", lambda k: 10.0),
    ]
    for ax, (name, label, goal, bound) in zip(axes, panels, strict=True):
        ax.plot(ks, data[name], "o-", label="ours", color=OURS)
        first = data[name][0]
        ax.plot(ks, [first * bound(k) for k in ks], "--", label=goal, color=OTHER)
        ax.plot(ks, [first * k / ks[0] for k in ks], ":", label="linear in K", color=BASE)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("K Schedulers, one task on all")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    return fig


def _widetask(entry: dict[str, Any]) -> Any:
    return _bar_rows(entry["rows"], "raw", width=3.6)


def _units(entry: dict[str, Any]) -> Any:
    data = entry["data"]
    ours: list[dict[str, Any]] = data["ours"]
    raws: list[dict[str, Any]] = data["raw"]

    def raw(name: str) -> float:
        return sum(float(r[name]) for r in raws) / len(raws)

    k0, k1 = ours[0]["k"], ours[-1]["k"]
    names = [f"ours, K={o['k']}" for o in ours] + [f"raw, {k0} threads"]
    colors = [OURS] * len(ours) + [BASE]
    panels = [
        ("round trips per unit", [o["trips_per_unit"] for o in ours] + [2.0], 3.0, "goal: 3"),
        (
            f"s from add to FINISHED, {data['units']:,} units",
            [o["time_s"] for o in ours] + [raw("time_s")],
            2 * raw("time_s"),
            f"goal (K={k0}): 2x raw",
        ),
        (
            "etcd bytes sent per unit transition",
            [o["bytes_per_transition"] for o in ours] + [raw("bytes_per_transition")],
            1.25 * ours[0]["bytes_per_transition"],
            f"goal: K={k1} <= 1.25x K={k0}",
        ),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4.5))
    for ax, (label, values, bound, goal) in zip(axes, panels, strict=True):
        ax.bar(names, values, color=colors)
        for x, value in enumerate(values):
            ax.annotate(f"{value:,.3g}", (x, value), ha="center", va="bottom", fontsize=8)
        ax.axhline(bound, color=OTHER, linestyle="--", label=goal)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=8)
    rest = [o["bytes_per_transition_less_declarations"] for o in ours]
    axes[2].bar(
        names[: len(ours)],
        [o["bytes_per_transition"] - r for o, r in zip(ours, rest, strict=True)],
        bottom=rest,
        color="#aec7e8",
        label="the nodes' reads of the declared units",
    )
    for ax in axes:
        ax.legend(fontsize=8, loc="lower right")
    return fig


def main() -> None:
    """``python -m benchmarks.charts RESULTS.json``: draw the charts of a results file again,
    into ``charts/`` beside it."""
    import json
    import sys

    path = Path(sys.argv[1])
    results = json.loads(path.read_text())
    for key, entry in results["cases"].items():
        if not entry.get("error"):
            print(draw(key, entry, path.parent / "charts"))


if __name__ == "__main__":
    main()
