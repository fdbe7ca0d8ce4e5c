"""``dtask``: the command line of distributedtask.

Every subcommand connects with the same options, each also read from the environment:
``--endpoints`` (``DTASK_ENDPOINTS``, comma-separated), ``--prefix`` (``DTASK_PREFIX``),
``--timeout`` (``DTASK_TIMEOUT``), ``--ca-cert`` / ``--cert`` / ``--key`` (``DTASK_CA_CERT``,
``DTASK_CERT``, ``DTASK_KEY``), ``--user`` (``DTASK_USER``) and ``--password-file``
(``DTASK_PASSWORD_FILE``) or ``DTASK_PASSWORD`` (no ``--password`` flag: a password on the
command line is visible to every user of the machine).

Exit status: 0 success; for ``wait``, 0 FINISHED, 1 FAILED, 2 CANCELLED; 3 for an error of
ours (etcd unreachable, no such task, task still running, task no longer running, the port of
``ui`` in use, its ``ui`` extra not installed...), printed
as one line ``dtask: error: ...`` on stderr, never a traceback; 64 for bad usage; 130 when
interrupted.

Units: ``add --units a,b`` or ``--units-file F`` declares a unit task (``F``: one unit a line,
a plain id or a JSON object ``{"id", "group", "node"}``; blank lines ignored; a bad line is a
usage error naming it, and nothing is written); ``get`` adds ``unitSummary`` (unitview.py),
``units`` shows them one by one, ``list`` adds a UNITS column (completed/declared: one small
read per batch of unit tasks) and ``wait`` follows them (a line or bar for all the units, each
group and each node, from a watch of the units' claim keys).

Threading: the CLI is single-threaded except where it follows a watch or serves (``wait``,
``watch``, ``node``, ``ui``, ``demo``), whose threads are stopped and joined before it exits.
``node`` and ``ui`` stop on SIGTERM or SIGINT and exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import orjson

from .describe import NodeState, describe_changes, failed_attempts, node_state, unit_states
from .etcd.client import EtcdClient
from .etcd.watch import Changes, ResumableWatch, Snapshot
from .exceptions import DistributedTaskError, InvalidTaskError, TaskNotFoundError
from .follower import FollowedRun, RunFollower
from .keys import prefix_range_end
from .manager import Manager
from .model import (
    DEFAULT_POLICY,
    RunPolicy,
    Task,
    TaskStatus,
    Unit,
    UnitSpec,
    format_time,
    task_to_dict,
)
from .unitview import (
    STATUSES,
    group_name,
    summarize_units,
    summary_to_dict,
    unit_to_dict,
    units_from_claims,
)

if TYPE_CHECKING:
    from rich.progress import TaskID

    from .console import ConsoleServer

__all__ = ["main"]

EXIT_ERROR = 3
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130
WAIT_EXIT = {TaskStatus.FINISHED: 0, TaskStatus.FAILED: 1, TaskStatus.CANCELLED: 2}


class UsageError(Exception):
    """Bad command-line usage: exit 64."""


class MissingExtraError(Exception):
    """A command needs an optional extra that is not installed: exit 3."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: usage error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


MAX_ATTEMPTS = 1000  # RunPolicy's bound
MAX_SECONDS = 10**9  # the bound of a policy duration in the JSON form (RunPolicy.from_dict)


def _attempts(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_ATTEMPTS:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_ATTEMPTS}, not {value}")
    return value


def _seconds(*, zero: bool) -> Callable[[str], float]:
    """A number of seconds: finite, at most MAX_SECONDS, and > 0 (or >= 0 with ``zero``)."""

    def parse(text: str) -> float:
        value = float(text)
        low_ok = value >= 0 if zero else value > 0
        if not (math.isfinite(value) and low_ok and value <= MAX_SECONDS):
            bound = ">= 0" if zero else "> 0"
            raise argparse.ArgumentTypeError(
                f"must be a number of seconds {bound} and at most {MAX_SECONDS}, not {text!r}"
            )
        return value

    parse.__name__ = "seconds"  # argparse names the type in its message: "invalid seconds value"
    return parse


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, not {value}")
    return value


def _name(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one flat declaration per subcommand
    parser = _Parser(
        prog="dtask",
        description="Coordinate tasks every node of a cluster must run, through etcd.",
    )
    conn = parser.add_argument_group("connection (each also read from the environment)")
    conn.add_argument(
        "--endpoints",
        default=_env("DTASK_ENDPOINTS", "http://127.0.0.1:2379"),
        help="etcd endpoints, comma-separated [DTASK_ENDPOINTS]",
    )
    conn.add_argument(
        "--prefix",
        default=_env("DTASK_PREFIX", "/distributedtask"),
        help="key prefix of the task tree [DTASK_PREFIX]",
    )
    conn.add_argument(
        "--timeout",
        type=float,
        default=_env("DTASK_TIMEOUT", "5"),  # a string default goes through type=, as usage
        help="seconds per etcd request [DTASK_TIMEOUT]",
    )
    conn.add_argument("--ca-cert", default=_env("DTASK_CA_CERT"), help="CA bundle [DTASK_CA_CERT]")
    conn.add_argument("--cert", default=_env("DTASK_CERT"), help="client certificate [DTASK_CERT]")
    conn.add_argument("--key", default=_env("DTASK_KEY"), help="client key [DTASK_KEY]")
    conn.add_argument("--user", default=_env("DTASK_USER"), help="etcd user [DTASK_USER]")
    conn.add_argument(
        "--password-file",
        default=_env("DTASK_PASSWORD_FILE"),
        help="file holding the etcd password [DTASK_PASSWORD_FILE]; or set DTASK_PASSWORD",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("list", help="a table of every task")
    p.add_argument("--json", action="store_true", help="the JSON of list_tasks_payload")
    p.add_argument("--namespace", type=_name, help="only this namespace")
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("get", help="one task as JSON, with each node's progress")
    p.add_argument("namespace")
    p.add_argument("task_id")
    p.set_defaults(run=cmd_get)

    p = sub.add_parser("units", help="the units of a unit task, by group")
    p.add_argument("namespace")
    p.add_argument("task_id")
    p.add_argument("--version", type=int, help="the run (default: the current one)")
    p.add_argument("--json", action="store_true", help="the list of units as JSON")
    p.set_defaults(run=cmd_units)

    p = sub.add_parser("add", help="add a run of a task")
    p.add_argument("namespace")
    p.add_argument("task_id")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--payload", help="the payload, as text")
    source.add_argument("--payload-file", help="read the payload from a file ('-': stdin)")
    p.add_argument("--nodes", help="comma-separated node ids (default: the live nodes)")
    units = p.add_mutually_exclusive_group()
    units.add_argument(
        "--units", metavar="IDS", help="split the run into units: comma-separated ids"
    )
    units.add_argument(
        "--units-file",
        metavar="F",
        help='the units, one a line: an id or {"id", "group", "node"} (\'-\': stdin)',
    )
    policy = p.add_argument_group("run policy")
    for flag, kind, metavar, what in (
        ("--max-attempts", _attempts, "N", "attempts per node before the run fails (default 1)"),
        (
            "--retry-backoff",
            _seconds(zero=True),
            "S",
            "seconds before attempt 2, doubling after each failure (default 10)",
        ),
        (
            "--retry-backoff-max",
            _seconds(zero=True),
            "S",
            "the backoff's cap in seconds (default 360, or --retry-backoff if larger)",
        ),
        (
            "--deadline",
            _seconds(zero=False),
            "S",
            "seconds the run may be running, paused time not counted (default: none)",
        ),
    ):
        policy.add_argument(flag, type=kind, metavar=metavar, help=what)
    p.set_defaults(run=cmd_add)

    for name, run, what in (
        ("cancel", cmd_cancel, "cancel a running or paused task"),
        ("pause", cmd_pause, "pause a running task: its nodes stop their runs"),
        ("resume", cmd_resume, "resume a paused task: its unfinished nodes start again"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("namespace")
        p.add_argument("task_id")
        p.add_argument("--version", type=int, help=f"the run to {name} (default: the current one)")
        p.set_defaults(run=run)

    p = sub.add_parser("cleanup", help="remove a terminal task whose TTL has passed")
    p.add_argument("namespace")
    p.add_argument("task_id")
    p.add_argument("--version", type=int, help="the run (default: the current one)")
    p.add_argument(
        "--ttl", type=float, default=None, help="completed-task TTL in seconds (default 5 days)"
    )
    p.set_defaults(run=cmd_cleanup)

    p = sub.add_parser("wait", help="follow a task with live progress; exit 0/1/2 by outcome")
    p.add_argument("namespace")
    p.add_argument("task_id")
    p.add_argument("--version", type=int, help="the run (default: the current one)")
    p.add_argument("--timeout-after", type=float, default=None, help="give up after N seconds")
    p.add_argument("--plain", action="store_true", help="lines instead of progress bars")
    p.set_defaults(run=cmd_wait)

    p = sub.add_parser("watch", help="print a line for every change")
    p.add_argument("--count", type=_positive_int, default=None, help="exit after N lines")
    p.add_argument("--progress", action="store_true", help="include progress reports")
    p.set_defaults(run=cmd_watch)

    p = sub.add_parser("members", help="the live nodes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_members)

    p = sub.add_parser("export", help="write every task as JSON to stdout")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("import", help="replace every task with those of an export")
    p.add_argument("file", help="an export file ('-': stdin)")
    p.set_defaults(run=cmd_import)

    p = sub.add_parser("node", help="run a node daemon (a Scheduler) until SIGTERM")
    p.add_argument("--node-id", required=True)
    p.add_argument(
        "--provider",
        action="append",
        required=True,
        metavar="NS=SPEC",
        help="NS=command, or NS=module:factory; repeat for more namespaces",
    )
    p.add_argument("--state-dir", default=None, help="providers' local state (default ./state)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--member-ttl", type=float, default=10.0, help="seconds")
    p.add_argument("--node-loss-grace", type=float, default=60.0, help="seconds; <0: forever")
    p.add_argument("--ttl", type=float, default=None, help="completed-task TTL, seconds")
    p.add_argument("--resync", type=float, default=300.0, help="full relist interval, seconds")
    p.add_argument("--log-level", default="info")
    p.set_defaults(run=cmd_node)

    p = sub.add_parser(
        "ui", help="the web console: tasks, one task, members, live (needs the ui extra)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=_port, default=8080, help="port to listen on (default 8080)")
    p.add_argument(
        "--allow-writes",
        action="store_true",
        help="let the pages cancel, pause and resume tasks (each asks for a confirmation)",
    )
    p.set_defaults(run=cmd_ui)

    p = sub.add_parser("demo", help="the guided demo on an embedded etcd and three nodes")
    p.add_argument(
        "--ui",
        action="store_true",
        help="open the web console on the demo's etcd, and leave it open after the demo",
    )
    p.add_argument("--ui-port", type=_port, default=8080, help="the console's port (default 8080)")
    p.set_defaults(run=cmd_demo)
    return parser


# ---- connection ------------------------------------------------------------------------------


def connect(args: argparse.Namespace, *, ttl: float | None = None) -> tuple[EtcdClient, Manager]:
    password = _env("DTASK_PASSWORD")
    if args.password_file:
        try:
            password = Path(args.password_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --password-file: {exc.strerror}") from None
    if args.user and password is None:
        raise UsageError("--user needs DTASK_PASSWORD or --password-file")
    try:
        client = EtcdClient(
            args.endpoints,
            timeout=args.timeout,
            ca_cert=args.ca_cert,
            cert=args.cert,
            key=args.key,
            username=args.user,
            password=password if args.user else None,
        )
        options: dict[str, Any] = {"prefix": args.prefix}
        if ttl is not None:
            options["completed_task_ttl"] = timedelta(seconds=ttl)
        return client, Manager(client, **options)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _current(manager: Manager, namespace: str, task_id: str, version: int | None) -> Task:
    task = manager.get_task(namespace, task_id)
    if task is None or (version is not None and task.version != version):
        raise TaskNotFoundError(namespace, task_id, version)
    return task


# ---- output helpers --------------------------------------------------------------------------


def _age(moment: datetime) -> str:
    seconds = max(0, int((datetime.now(timezone.utc) - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(rows: list[list[str]], headers: list[str], out: TextIO) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the cli extra is not installed: plain columns
        widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
        for row in [headers, *rows]:
            cells = (str(c).ljust(w) for c, w in zip(row, widths, strict=True))
            print("  ".join(cells).rstrip(), file=out)
        return
    from rich.text import Text

    table = Table(*headers, box=None, header_style="bold", pad_edge=False)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # names are data, never markup
    Console(file=out, width=200 if not out.isatty() else None).print(table)


def _write_json(data: object, out: TextIO) -> None:
    out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


# ---- commands --------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    _, manager = connect(args)
    tasks = manager.list_tasks()
    if args.namespace:
        tasks = {k: v for k, v in tasks.items() if k == args.namespace}
    if args.json:
        from .model import tasks_to_payload

        sys.stdout.write(
            orjson.dumps(orjson.loads(tasks_to_payload(tasks)), option=orjson.OPT_INDENT_2).decode()
            + "\n"
        )
        return 0
    listed = [task for namespace in sorted(tasks) for task in tasks[namespace]]
    if not listed:
        print("no tasks")
        return 0
    headers = ["NAMESPACE", "ID", "VERSION", "STATUS", "NODES", "AGE"]
    rows = [
        [
            task.namespace,
            task.id,
            str(task.version),
            task.status.value,
            # a unit task's nodes complete units, not the run: the number of its nodes
            str(len(task.nodes)) if task.units else f"{len(task.finished_nodes)}/{len(task.nodes)}",
            _age(task.started_at),
        ]
        for task in listed
    ]
    if any(task.units for task in listed):  # a column only when some task has units
        headers.insert(5, "UNITS")
        completed = manager.units_completed(listed)
        for row, task in zip(rows, listed, strict=True):
            cell = f"{completed[task.namespace, task.id]}/{len(task.units)}" if task.units else "-"
            row.insert(5, cell)
    if any(task.attempts for task in listed):  # a column only when some node failed an attempt
        headers.append("ATTEMPTS")
        for row, task in zip(rows, listed, strict=True):
            row.append(failed_attempts(task))
    _table(rows, headers, sys.stdout)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    _, manager = connect(args)
    task = _current(manager, args.namespace, args.task_id, None)
    body = task_to_dict(task)
    body["progress"] = {
        node: {"fraction": p.fraction, "message": p.message, "updatedAt": format_time(p.updated_at)}
        for node, p in sorted(manager.get_progress(task.namespace, task.id, task.version).items())
    }
    if task.units:
        units = manager.get_units(task.namespace, task.id, task.version)
        body["unitSummary"] = summary_to_dict(summarize_units(units.values()))
    _write_json(body, sys.stdout)
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _unit_row(unit: Unit) -> list[str]:
    progress = unit.progress
    return [
        unit.id,
        unit.status.value,
        unit.node or "-",
        str(unit.attempts),
        _one_line(unit.error) if unit.error else "-",
        "-"
        if progress is None
        else f"{progress.fraction:.0%} {_one_line(progress.message)}".rstrip(),
    ]


def cmd_units(args: argparse.Namespace) -> int:
    _, manager = connect(args)
    task = _current(manager, args.namespace, args.task_id, args.version)
    units = list(manager.get_units(task.namespace, task.id, task.version).values())
    if args.json:
        _write_json([unit_to_dict(unit) for unit in units], sys.stdout)
        return 0
    summary = summarize_units(units)
    out = sys.stdout
    print(
        f"{task.namespace}/{task.id} version {task.version} {task.status.value}: "
        f"{summary.completed}/{summary.total} units completed",
        file=out,
    )
    # One table for every group, so the columns line up; each group's rows under its line.
    headers = ["UNIT", "STATUS", "NODE", "ATTEMPTS", "ERROR", "PROGRESS"]
    rows = {unit.id: _unit_row(unit) for unit in units}
    widths = [max(len(c) for c in col) for col in zip(headers, *rows.values(), strict=True)]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    print(line(headers), file=out)
    for group in summary.groups:
        counts = ", ".join(f"{group.counts[status]} {status.value}" for status in STATUSES)
        print(f"group {group_name(group.group)}: {group.total} units, {counts}", file=out)
        for unit in group.units:
            print(line(rows[unit.id]), file=out)
    return 0


def _read_payload(args: argparse.Namespace) -> bytes:
    if args.payload is not None:
        return str(args.payload).encode()
    if args.payload_file is None:
        return b""
    if args.payload_file == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(args.payload_file).read_bytes()
    except OSError as exc:
        raise UsageError(
            f"cannot read payload file {args.payload_file!r}: {exc.strerror}"
        ) from None


def _policy(args: argparse.Namespace) -> RunPolicy | None:
    """The run policy of ``dtask add``'s flags; None when none is given. Raises UsageError."""
    given = (args.max_attempts, args.retry_backoff, args.retry_backoff_max, args.deadline)
    if all(value is None for value in given):
        return None
    base = DEFAULT_POLICY
    backoff = (
        base.retry_backoff if args.retry_backoff is None else timedelta(seconds=args.retry_backoff)
    )
    if args.retry_backoff_max is not None:
        backoff_max = timedelta(seconds=args.retry_backoff_max)
        if backoff_max < backoff:
            raise UsageError("--retry-backoff-max must be at least --retry-backoff")
    else:
        backoff_max = max(base.retry_backoff_max, backoff)
    try:
        return RunPolicy(
            max_attempts=base.max_attempts if args.max_attempts is None else args.max_attempts,
            retry_backoff=backoff,
            retry_backoff_max=backoff_max,
            deadline=None if args.deadline is None else timedelta(seconds=args.deadline),
        )
    except InvalidTaskError as exc:  # pragma: no cover - the flags' types check the same
        raise UsageError(str(exc)) from None


def _unit_specs(lines: Sequence[tuple[str, str]], nodes: Sequence[str] | None) -> list[UnitSpec]:
    """The units of ``(where, text)`` lines (blank ones skipped): a plain id, or JSON — an
    object ``{"id", "group", "node"}`` or a string id — when it starts with ``{``, ``[`` or
    ``"``. Raises UsageError naming the line for a bad one, a unit declared twice, or an
    affinity outside ``nodes`` (when given)."""
    specs: list[UnitSpec] = []
    first: dict[str, str] = {}
    for where, raw in lines:
        text = raw.strip()
        if not text:
            continue
        try:
            if text[0] in '{["':
                try:
                    data = orjson.loads(text)
                except orjson.JSONDecodeError as exc:
                    raise UsageError(
                        f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
                    ) from None
                spec = UnitSpec(data) if isinstance(data, str) else UnitSpec.from_dict(data)
            else:
                spec = UnitSpec(text)
        except InvalidTaskError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if spec.id in first:
            raise UsageError(
                f"{where}: unit {spec.id!r} is declared twice (first {first[spec.id]})"
            )
        if nodes is not None and spec.node is not None and spec.node not in nodes:
            raise UsageError(
                f"{where}: unit {spec.id!r} has affinity to node {spec.node!r}, not in --nodes"
            )
        first[spec.id] = where
        specs.append(spec)
    return specs


def _read_units(args: argparse.Namespace, nodes: Sequence[str] | None) -> list[UnitSpec] | None:
    """The units of ``dtask add``'s ``--units`` or ``--units-file``; None for a plain task.
    Raises UsageError (nothing is written then)."""
    if args.units is not None:
        parts = [part for part in args.units.split(",") if part.strip()]
        specs = _unit_specs([(f"--units item {n}", p) for n, p in enumerate(parts, 1)], nodes)
        if not specs:
            raise UsageError("--units names no unit")
        return specs
    if args.units_file is None:
        return None
    name = args.units_file
    if name == "-":
        data = sys.stdin.buffer.read()
        source = "--units-file stdin"
    else:
        try:
            data = Path(name).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read units file {name!r}: {exc.strerror}") from None
        source = f"units file {name!r}"
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append((f"{source} line {number}", raw.decode("utf-8")))
        except UnicodeDecodeError:
            raise UsageError(f"{source} line {number}: not UTF-8") from None
    specs = _unit_specs(lines, nodes)
    if not specs:
        raise UsageError(f"{source} names no unit")
    return specs


def cmd_add(args: argparse.Namespace) -> int:
    if args.payload_file == "-" and args.units_file == "-":
        raise UsageError("--payload-file and --units-file cannot both read stdin")
    nodes = None
    if args.nodes is not None:
        nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
        if not nodes:
            raise UsageError("--nodes names no node")
    units = _read_units(args, nodes)
    payload = _read_payload(args)
    policy = _policy(args)
    _, manager = connect(args)
    task = manager.add_task(
        args.namespace, args.task_id, payload, nodes=nodes, policy=policy, units=units
    )
    with_units = f" with {len(task.units)} units" if task.units else ""
    print(
        f"added {task.namespace}/{task.id} version {task.version} "
        f"on {', '.join(sorted(task.nodes))}{with_units}"
    )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    _, manager = connect(args)
    version = args.version
    if version is None:
        version = _current(manager, args.namespace, args.task_id, None).version
    task = manager.cancel_task(args.namespace, args.task_id, version)
    print(f"cancelled {task.namespace}/{task.id} version {task.version}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    return _set_paused(args, paused=True)


def cmd_resume(args: argparse.Namespace) -> int:
    return _set_paused(args, paused=False)


def _set_paused(args: argparse.Namespace, *, paused: bool) -> int:
    """``dtask pause`` / ``dtask resume``: like ``cancel``, and a run already in the wanted
    state is left as it is (exit 0, said so)."""
    _, manager = connect(args)
    before = _current(manager, args.namespace, args.task_id, args.version)
    change = manager.pause_task if paused else manager.resume_task
    task = change(args.namespace, args.task_id, before.version)
    name = f"{task.namespace}/{task.id} version {task.version}"
    if (before.status is TaskStatus.PAUSED) is paused:
        print(f"{name} is already {'paused' if paused else 'running'}")
    else:
        print(f"{'paused' if paused else 'resumed'} {name}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    _, manager = connect(args, ttl=args.ttl)
    version = args.version
    if version is None:
        version = _current(manager, args.namespace, args.task_id, None).version
    manager.clean_up_task(args.namespace, args.task_id, version)
    print(f"cleaned up {args.namespace}/{args.task_id} version {version}")
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    _, manager = connect(args)
    members = manager.live_members()
    if args.json:
        _write_json(
            [
                {
                    "node": m.node_id,
                    "namespaces": sorted(m.namespaces),
                    "startedAt": format_time(m.started_at),
                }
                for m in members
            ],
            sys.stdout,
        )
        return 0
    if not members:
        print("no live members")
        return 0
    rows = [[m.node_id, ", ".join(sorted(m.namespaces)), _age(m.started_at)] for m in members]
    _table(rows, ["NODE", "NAMESPACES", "UP"], sys.stdout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _, manager = connect(args)
    sys.stdout.buffer.write(manager.snapshot() + b"\n")
    sys.stdout.flush()
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.file!r}: {exc.strerror}") from None
    _, manager = connect(args)
    manager.restore(data)
    count = sum(len(v) for v in manager.list_tasks().values())
    print(f"imported {count} tasks under {manager.prefix}")
    return 0


# ---- following changes: watch and wait -------------------------------------------------------


def _follow(
    manager: Manager,
    key: bytes,
    range_end: bytes,
    handler: Callable[[Snapshot | Changes], None],
    list_ranges: Sequence[tuple[bytes, bytes]] | None = None,
) -> ResumableWatch:
    watch = ResumableWatch(
        manager.client, key, range_end, handler, list_ranges=list_ranges, name="dtask-cli-watch"
    )
    watch.start()
    return watch


def cmd_watch(args: argparse.Namespace) -> int:
    _, manager = connect(args)
    done = threading.Event()
    printed = 0

    def handle(batch: Snapshot | Changes) -> None:
        nonlocal printed
        if isinstance(batch, Snapshot):
            if batch.reason != "initial":
                print(f"(relisted at revision {batch.revision}: {batch.reason})", flush=True)
            return
        for change in describe_changes(manager.keys, batch.events, args.progress):
            if done.is_set():
                return
            print(change.line, flush=True)
            printed += 1
            if args.count is not None and printed >= args.count:
                done.set()

    root = manager.keys.root
    watch = _follow(manager, root, prefix_range_end(root), handle, list_ranges=[(root, root)])
    print(f"watching {manager.prefix} from revision {watch.revision}", flush=True)
    try:
        _wait_interruptibly(done)
    finally:
        watch.stop()
    return 0


def _wait_interruptibly(event: threading.Event, timeout: float | None = None) -> bool:
    # Event.wait in short slices so Ctrl-C (KeyboardInterrupt) is delivered promptly.
    deadline = None if timeout is None else time.monotonic() + timeout
    while not event.wait(
        0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
    ):
        if deadline is not None and time.monotonic() >= deadline:
            return False
    return True


def cmd_wait(args: argparse.Namespace) -> int:
    _, manager = connect(args)
    task = _current(manager, args.namespace, args.task_id, args.version)
    plain = args.plain or not sys.stdout.isatty()
    renderer: _PlainRenderer | _RichRenderer = (
        _PlainRenderer(sys.stdout) if plain else _RichRenderer()
    )
    per_node = not task.units  # a unit task's nodes record units, not completions or attempts
    follower = RunFollower(
        manager,
        task.namespace,
        task.id,
        task.version,
        completions=per_node,
        progress=per_node,
        pauses=True,
        attempts=per_node,
        units=not per_node,
    )
    follower.state.completed.update(task.finished_nodes)
    follower.start()
    try:
        renderer.start()
        deadline = None if args.timeout_after is None else time.monotonic() + args.timeout_after
        while not follower.over.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                renderer.stop()  # before the message, so it is not drawn over
                print(
                    f"dtask: error: {task.namespace}/{task.id} still running after "
                    f"{args.timeout_after:g}s",
                    file=sys.stderr,
                )
                return EXIT_ERROR
            follower.changed.wait(0.2 if remaining is None else min(0.2, remaining))
            follower.changed.clear()
            with follower.lock:
                rows = _wait_rows(task, follower.state)
            renderer.update(rows)
        final: list[Unit] | None = None
        if task.units:
            # The units' watch may lag the outcome's (two streams): the end is shown as one
            # read of every unit says it is, not as the watch last saw it.
            with contextlib.suppress(DistributedTaskError):
                final = list(manager.get_units(task.namespace, task.id, task.version).values())
        with follower.lock:
            rows = _wait_rows(task, follower.state, final)
            outcome = follower.state.outcome
        renderer.update(rows)
    finally:
        renderer.stop()  # also on Ctrl-C: a live display must not keep redrawing
        follower.close()
    if outcome is None:
        raise TaskNotFoundError(task.namespace, task.id, task.version)
    error = f": {outcome.error}" if outcome.error else ""
    on = f" on {outcome.node}" if outcome.node else ""
    print(f"{task.namespace}/{task.id} v{task.version} {outcome.status.value}{on}{error}")
    return WAIT_EXIT[outcome.status]


def _wait_rows(
    task: Task, state: FollowedRun, units: Sequence[Unit] | None = None
) -> list[tuple[str, NodeState]]:
    """``dtask wait``'s lines: one per node of a plain task; for a unit task, all its units,
    each group and each node (``units``: every unit as read; default: as the watch saw them)."""
    if not task.units:
        return [
            (node, node_state(state, node, task.policy.max_attempts)) for node in sorted(task.nodes)
        ]
    if units is None:
        units = units_from_claims(task.units, state.unit_claims)
    return unit_states(state, summarize_units(units), task.nodes)


class _PlainRenderer:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.seen: dict[str, NodeState] = {}

    def start(self) -> None:
        pass

    def update(self, rows: Sequence[tuple[str, NodeState]]) -> None:
        for name, line in rows:
            if self.seen.get(name) != line:
                self.seen[name] = line
                fraction, label, message = line
                print(
                    f"{name}: {label} {fraction:.0%} {message}".rstrip(), file=self.out, flush=True
                )

    def stop(self) -> None:
        pass


class _RichRenderer:
    BAR_WIDTH = 12
    OTHER_COLUMNS = 34 + BAR_WIDTH  # node (16), bar, percentage, label, the gaps, one spare

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self.bars = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(bar_width=self.BAR_WIDTH),
            TaskProgressColumn(),
            TextColumn("{task.fields[label]:<9} {task.fields[message]}"),
        )
        from rich.markup import escape

        self.escape = escape
        self.ids: dict[str, TaskID] = {}  # a bar per line, added in the order of the first rows

    def start(self) -> None:
        self.bars.start()

    def update(self, rows: Sequence[tuple[str, NodeState]]) -> None:
        # Messages are cut to the terminal's width, not the bars: rich would squeeze every
        # column of the table for one long message (a retry's error, say).
        limit = max(10, min(60, self.bars.console.width - self.OTHER_COLUMNS))
        for name, (fraction, label, text) in rows:
            bar = self.ids.get(name)
            if bar is None:
                bar = self.ids[name] = self.bars.add_task(
                    self.escape(name), total=1.0, label="", message=""
                )
            message = text if len(text) <= limit else text[: limit - 1] + "…"
            self.bars.update(bar, completed=fraction, label=label, message=self.escape(message))

    def stop(self) -> None:
        self.bars.stop()


# ---- node and demo ---------------------------------------------------------------------------


def cmd_node(args: argparse.Namespace) -> int:
    from .node import JsonLogFormatter, NodeDaemon, load_provider, parse_provider_spec

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = logging.getLevelName(str(args.log_level).upper())
    if not isinstance(level, int):
        raise UsageError(f"unknown --log-level {args.log_level!r}")
    root.setLevel(level)
    state_dir = Path(args.state_dir or "state")
    providers = {}
    for spec in args.provider:
        try:
            namespace, what = parse_provider_spec(spec)
            providers[namespace] = load_provider(what, state_dir / namespace)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    _, manager = connect(args, ttl=args.ttl)
    os.environ["DTASK_NODE_ID"] = args.node_id  # commands run by providers see their node
    daemon = NodeDaemon(
        manager,
        node_id=args.node_id,
        providers=providers,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        member_ttl=timedelta(seconds=args.member_ttl),
        node_loss_grace=None
        if args.node_loss_grace < 0
        else timedelta(seconds=args.node_loss_grace),
        resync_interval=timedelta(seconds=args.resync),
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.request_stop())
    daemon.run()
    return 0


def _console_server() -> type[ConsoleServer]:
    """The console's server class; raises MissingExtraError without the ``ui`` extra."""
    try:
        from .console import ConsoleServer
    except ImportError as exc:
        raise MissingExtraError(
            f"the web console needs the 'ui' extra: pip install 'distributedtask[ui]' ({exc})"
        ) from None
    return ConsoleServer


def cmd_ui(args: argparse.Namespace) -> int:
    server_class = _console_server()
    _, manager = connect(args)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = server_class(manager, host=args.host, port=args.port, allow_writes=args.allow_writes)
    server.start()
    try:
        mode = "writes allowed" if args.allow_writes else "read-only"
        print(f"console of {manager.prefix} at {server.url} ({mode}); Ctrl-C stops it", flush=True)
        if not server.loopback:
            print(
                f"dtask: warning: listening on {args.host}: whoever reaches it sees every task"
                + (" and can cancel, pause and resume them" if args.allow_writes else ""),
                file=sys.stderr,
                flush=True,
            )
        _wait_interruptibly(stop)
    finally:
        server.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main  # lazily: only ``dtask demo`` needs it

    console = _console_server() if args.ui else None
    # The demo runs its ``dtask`` commands in this process through the entry point it is
    # given, so it never imports this module back (no cli <-> demo cycle).
    return demo_main(main, console=console, console_port=args.ui_port)


# ---- entry point -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dtask``; returns the exit status (see the module doc)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="dtask: %(levelname)s: %(message)s")
    try:
        result: int = args.run(args)
        return result
    except UsageError as exc:
        print(f"dtask: usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (InvalidTaskError, MissingExtraError) as exc:
        print(f"dtask: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except DistributedTaskError as exc:
        print(f"dtask: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("dtask: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # e.g. the metrics port of `dtask node` is taken
        if isinstance(exc, BrokenPipeError):
            return 0
        print(f"dtask: error: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR


def run() -> None:
    """Console-script entry: ``sys.exit(main())``."""
    sys.exit(main())
