"""Chaos run: three Schedulers on a three-member etcd cluster under random faults, then invariants.

What runs (everything on 127.0.0.1):

- a three-member `EtcdCluster`;
- three Schedulers (``node-a``, ``node-b``, ``node-c``), each with its own `EtcdClient` on all
  three members (each starting on a different one). ``node-c`` reaches each member through a
  `TcpProxy` of its own, so the fault loop can cut it off from the whole cluster;
- per node a `ChaosProvider`: a `ThreadProvider` whose function, for each attempt, completes,
  fails or hangs (waits on ``context.cancelled``), chosen by a RNG seeded with
  ``(seed, node, task id, version, context.attempt)``, after a random short delay (a first
  attempt of a run whose policy retries fails more often, so retries sometimes succeed); it
  is instrumented (see `NodeLedger`): starts (with their attempt), terminations, recorder
  calls, concurrency. For a unit task it runs ``unit_concurrency`` (1-3 per node, from the
  seed) unit functions at a time, each completing or failing (never hanging) after a short
  delay, seeded with ``(seed, node, task id, version, unit, attempt)``; its ledger has every
  unit call (attempt, outcome, times), every ``record_unit_completion`` (with the attempt) and
  ``record_unit_failure``, and every ``group_completed`` call, some of which raise (injected:
  the Scheduler retries them);
- a client thread that makes ``tasks`` adds (``nodes=None``: the live nodes) over the fault
  phase, some of them on an id used before (a new run replaces a terminal one; a STARTED one
  refuses), a share of them with a `RunPolicy` (2-3 attempts, a short backoff, some with a
  deadline of a few seconds); it cancels a random fraction of the runs a little later, and
  pauses others (a third of those with a policy, a tenth of the rest), then resumes them (or
  cancels them while PAUSED); every call and what it returned (ok / refused / ambiguous) is
  in its `ClientLedger`. A share of the adds (``unit_fraction``) are unit tasks: 5-40 units,
  in 1-4 groups or none, sometimes a quarter of them bound to a node (an add whose affinity
  names a node that is not live, node-c cut off, is refused), most with 2-4 attempts per unit
  and a short backoff, some with a deadline; they are cancelled and paused like the others;
- an observer: a `ResumableWatch` of the whole prefix on its own client, recording every run's
  history (the terminal state it reached, when it was seen PAUSED and STARTED again, its run
  state and attempt counters, and the membership changes), since terminal runs are removed
  after ``completed_task_ttl``; of unit tasks, the declaration, every value of every unit's
  claim key (``P/units/run/.../claim/<unit>``: status, claimant, attempts), the group marks
  and the nodes' acknowledgements of them. A `UnitReader` thread reads ``get_units`` of each
  unit run the observer sees FINISHED, before its TTL removes it;
- the fault loop (the calling thread): kill the leader, kill a follower, pause a member, cut
  ``node-c`` off (block its three proxies) for ``cut_seconds`` > ``member_ttl`` (sometimes
  killing the leader during the cut), with short calm periods between faults. A member that
  crashes on etcd's own bug etcd-io/etcd#14110 (etcd before 3.5.5: a read-only transaction
  whose client gave up while the member was frozen panics it when thawed) is restarted, and
  logged as a fault of its own (``etcd-crash``); any other harness trouble is raised.

Then the end phase: heal everything, let the client finish, wait until every STARTED run waits
only on hanging functions (a STARTED unit run never does: its units never hang, so it must end
by itself — one that does not is a lost unit, and the message says where each unfinished unit
stands and what each node did with it), cancel those runs (the one way a hang ends) and any
run still PAUSED, wait until every run is terminal and the cluster holds no task after the TTL,
and check:

1. every run the observer saw is terminal, with the status its history implies: a cancel that
   returned means CANCELLED; CANCELLED only after a cancel call; FINISHED only when every
   assigned node's provider recorded completion (and ``finished_nodes`` says so); FAILED with
   the error a provider recorded on the node's last attempt (or a legitimate node loss, see
   below, or its deadline, see 6); and nothing lost: all completions and no cancel =>
   FINISHED, a node's failure on its last attempt and no cancel => FAILED, while a failure
   with attempts left never makes the run FAILED; once terminal, a run never changes status;
2. per node: a run starts again in one process only as a retry (the attempt grows by one,
   after this node recorded the failure of the previous attempt) or after a resume (same
   attempt, and a resume call of the client that may have applied between the two starts);
   anything else is "started twice"; never two runs of one task id at once (a run is active
   from ``start_task`` until its function returns or its handle is terminated); providers
   were only given runs assigned to their node;
3. every add that returned is a run the observer saw, and every run seen was added (or comes
   from an add that raised EtcdError, which may have been applied);
4. after the TTL: no task, outcome, run state, attempt, run, progress, unit declaration, unit,
   pool or group key left; every ThreadProvider's local set empty and ``Scheduler.running()``
   empty; after ``stop()``: no key at all under the prefix (memberships revoked) and no thread
   of ours left;
5. the cut really outlasted ``node-c``'s member TTL: the observer saw its membership go during
   a cut, and it came back;
6. the run policy (see `check_policy`): no run starts on a node while its task is PAUSED (the
   Task a provider is given is never PAUSED, and no start falls inside a pause the observer
   saw, past a detection latency ``pause_latency`` and any fault that may have delayed that
   node's view); no run stays STARTED past its deadline plus `ChaosConfig.deadline_slack`, and
   a run FAILED ``deadline exceeded`` ran at least its deadline; attempts never exceed
   ``max_attempts`` (the counters, and a node's starts of a run are at most ``max_attempts``
   plus the run's resumes; this scenario restarts no Scheduler). A unit run's starts are its
   sessions (``start_task`` to ``terminate``), and its unit functions are checked like starts
   for pauses (those that began with the session already terminated return at once);
7. units (see `check_units`): every value of a claim key follows from the one before by a
   legal transition (absent -> IN_PROGRESS; a lost hand-out absent -> PENDING; PENDING ->
   IN_PROGRESS, same attempts; IN_PROGRESS -> COMPLETED by its claimant, -> PENDING with one
   more attempt (a failure with attempts left), -> FAILED on the last attempt, -> PENDING with
   the same attempts only when its claimant is node-c lost in a long cut; nothing after
   COMPLETED or FAILED), on an assigned node and the unit's affinity; every counted failure is
   one the claimant's provider recorded (same attempt, same message); a unit is COMPLETED at
   most once (one COMPLETED value of its key), by a node whose provider recorded its
   completion at that attempt; a run whose units are all COMPLETED is FINISHED; a FINISHED run
   has every unit COMPLETED, by the watch and by ``get_units`` (which names the same
   claimants), ``finished_nodes`` empty and every group mark; a unit run FAILED only by a
   deadline, by a unit's last attempt (``failed_unit``, ``failed_node`` and the error its
   provider recorded on attempt ``max_attempts``, the unit's claim FAILED), or by node-c's loss
   in a long cut while a unit with affinity to it was not COMPLETED; no unit function runs on
   two nodes at once for one unit (unless a long cut lost the first); a unit function is only
   given units of its node (or without affinity), at most ``max_attempts``, at most
   ``unit_concurrency`` at once per session; ``group_completed`` is called only for a group
   whose units are all COMPLETED, on a node of the run, an acknowledgement only after a call
   returned, and, for a FINISHED run, on every node of the run live at the end. Excused (listed
   in ``report.excused``, not violations), since a run's removal waits for no callback: a node
   whose call raised and whose retry came after the removal (the TTL is 3 s here), a node that
   never called it while a fault may have delayed it until the removal, and a run that a new
   run of its id replaced right after it finished.

Node-loss semantics checked: by default every cut is shorter than ``node_loss_grace``
(``cut_seconds`` < grace), so no run may fail for node loss at all, and the cut node's runs
(including hanging ones) go on and end normally: its completions and failures recorded while
cut off are delivered afterwards, and it never starts a run a second time. With
``loss_cut_every=N`` (the by-hand mode's default), every N-th cut lasts longer than member TTL +
grace: then a FAILED run with ``failed_node`` node-c and an error ``node lost: ...`` is
legitimate exactly when such a
long cut overlapped its life; a node-loss failure naming any other node, or outside a long cut,
is a violation. A unit run does not wait for nodes but for units: the units node-c held
IN_PROGRESS go back to the pool (PENDING, same attempts) and the others finish them; it fails
only for a unit with affinity to node-c that was not COMPLETED.

Run by hand: ``python -m tests.faults.chaos --duration 600 --seed N`` (``--help`` for more);
exit status 0 when every invariant held, 1 otherwise. The test (tests/faults/test_chaos.py)
runs a bounded version.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import logging
import math
import os
import queue
import random
import re
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry
from tests.support import run_keys_under

import distributedtask as dt
from distributedtask.etcd.watch import Changes, ResumableWatch, Snapshot
from distributedtask.keys import (
    AttemptKey,
    DoneKey,
    GroupKey,
    MemberKey,
    NodesKey,
    OutcomeKey,
    StateKey,
    TaskKey,
    UnitClaimKey,
    UnitDeclKey,
    UnitRunKey,
    prefix_range_end,
)
from distributedtask.records import GroupMark, RunState, UnitClaim, UnitDecl
from distributedtask.testing.etcd import EtcdCluster, EtcdHarnessError, wait_until
from distributedtask.testing.proxy import TcpProxy

__all__ = ["ChaosConfig", "ChaosReport", "main", "run_chaos"]

log = logging.getLogger("tests.chaos")

NS = "chaos"
NODES = ("node-a", "node-b", "node-c")
CUT_NODE = "node-c"
OUR_THREAD_PREFIXES = ("dtask-", "distributedtask-", "chaos-")
_LOSS = re.compile(r"^node lost")
_DEADLINE = re.compile(r"^deadline exceeded")
_STUCK_UNIT = re.compile(r"unit '([^']*)' can run only there")
_ETCD_TXN_PANIC = "unexpected error during txn"  # etcd-io/etcd#14110

Run = tuple[str, int]  # (task id, version)


def _pace(seconds: float) -> None:
    """Fault-loop and client pacing: a plain timed wait, not a wait for a condition."""
    threading.Event().wait(max(0.0, seconds))


@dataclass
class ChaosConfig:
    seed: int
    duration: float = 45.0  # seconds of faults (the client adds its tasks meanwhile)
    tasks: int = 200
    cancel_fraction: float = 0.2  # of the tasks added, cancelled 0-3 s later
    reuse_fraction: float = 0.3  # adds that reuse an earlier id (a new run replaces its last)
    p_fail: float = 0.05  # per node and attempt
    p_fail_first: float = 0.35  # per node, on attempt 1 of a run whose policy retries
    p_fail_retry: float = 0.25  # per node, on its later attempts (some fail on the last)
    p_hang: float = 0.15  # per node and attempt
    policy_fraction: float = 0.3  # adds with a RunPolicy: 2-3 attempts, backoff 0.2-0.5 s
    deadline_fraction: float = 0.4  # of those, with a deadline of 2-6 s
    pause_fraction: float = 0.1  # of the plain runs added, paused 0-2 s later, for 0.5-3 s
    pause_policy_fraction: float = 0.35  # the same, of the runs with a policy (retries, deadline)
    pause_cancel_fraction: float = 0.3  # of the paused runs, cancelled instead of resumed
    pause_latency: float = 1.0  # L: how long a Scheduler may take to act on a pause it saw
    member_ttl: float = 2.0
    node_loss_grace: float = 20.0
    cut_seconds: float = 5.0  # > member_ttl, < node_loss_grace
    loss_cut_every: int = 0  # 0: never; N: every N-th cut lasts member_ttl + grace + 5 s
    completed_ttl: float = 3.0
    client_timeout: float = 2.0
    watch_timeout: float = 6.0  # > the harness's 2 s progress-notify interval
    settle_timeout: float = 120.0
    prefix: str = ""
    # unit tasks (a share of the adds; see _unit_plan)
    unit_fraction: float = 0.3  # of the adds
    unit_counts: tuple[int, int] = (5, 40)  # units per unit task
    unit_group_fraction: float = 0.6  # of unit tasks, in 1-4 groups (else all in group "")
    unit_affinity_fraction: float = 0.3  # of unit tasks, a quarter of the units bound to a node
    unit_policy_fraction: float = 0.7  # of unit tasks, with retries: 2-4 attempts per unit
    unit_deadline_fraction: float = 0.15  # of unit tasks, with a deadline of 3-8 s
    p_unit_fail: float = 0.12  # per unit attempt that has attempts left after it
    p_unit_fail_last: float = 0.03  # per last attempt of a retried unit
    p_unit_fail_single: float = 0.004  # per unit, without retries (it fails the run)
    unit_delay: tuple[float, float] = (0.02, 0.4)  # seconds a unit function takes
    p_group_raise: float = 0.15  # a group_completed call raises (the Scheduler retries it)

    def __post_init__(self) -> None:
        if not self.prefix:
            self.prefix = f"/dtask-chaos/{self.seed}-{uuid.uuid4().hex[:8]}"
        if not self.member_ttl < self.cut_seconds < self.node_loss_grace:
            raise ValueError("want member_ttl < cut_seconds < node_loss_grace")

    @property
    def long_cut_seconds(self) -> float:
        return self.member_ttl + self.node_loss_grace + 5.0

    @property
    def deadline_slack(self) -> float:
        """How late a deadline may be enforced, by the stored times (outcome minus start).

        Every Scheduler arms a timer at the deadline and the deciders race to fail the run;
        what can delay the winner: a decider that does not see itself as one re-checks only
        after ``3 * member_ttl``; its ``fail_deadline`` request may hang on a frozen or killed
        member for ``client_timeout`` and be retried on another (twice: ``2 *
        client_timeout``); and a leader kill stops every write for its election (the fault
        loop kills for 1-3 s): 3 s more.
        """
        return 3 * self.member_ttl + 2 * self.client_timeout + 3.0

    @property
    def observed_deadline_slack(self) -> float:
        """`deadline_slack` as the observer measures it: its watch may see the outcome late,
        by up to ``watch_timeout`` (a stream on a frozen member), and the first sight is late
        too (which only shortens what it measures)."""
        return self.deadline_slack + self.watch_timeout


# ---- the instrumented provider ----------------------------------------------------------------


@dataclass
class _RunState:
    """One start of a run on a node: active from ``start_task`` until its function returns or
    its handle is terminated."""

    run: Run
    attempt: int  # context.attempt: 1 + this node's failed attempts the Scheduler handed over
    at: float  # time.monotonic() of start_task
    active: bool = True


@dataclass
class UnitCall:
    """One call of a unit function on a node (monotonic times)."""

    run: Run
    unit: str
    attempt: int  # context.attempt: 1 + the unit's failed attempts when it was claimed
    node: str
    began: float
    born_cancelled: bool  # its session was terminated before it began (it returns at once)
    ended: float | None = None
    outcome: str = ""  # "ok" (returned), "failed" (raised), "cancelled" (terminated)


_ATTEMPT = re.compile(r" attempt (\d+)$")


class NodeLedger:
    """Everything one node's provider did, thread-safe."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.lock = threading.Lock()
        self.starts: list[_RunState] = []  # in order
        self.active: Counter[str] = Counter()  # task id -> runs active now
        self.max_active = 0
        self.terminations = 0
        self.completions: set[Run] = set()  # recorder.record_completion calls
        self.failures: dict[Run, dict[int, str]] = {}  # record_failure calls: attempt -> error
        self.hanging: dict[Run, _RunState] = {}  # functions waiting on context.cancelled now
        self.violations: list[str] = []
        # unit tasks
        self.unit_calls: list[UnitCall] = []  # in order
        self.unit_active: Counter[int] = Counter()  # session (its cancelled event) -> calls now
        self.max_unit_active = 0
        # record_unit_completion calls: the attempts; record_unit_failure: attempt -> error
        self.unit_completions: dict[tuple[Run, str], list[int]] = {}
        self.unit_failures: dict[tuple[Run, str], dict[int, str]] = {}
        self.returned = threading.local()  # (run, unit, attempt) a unit function returned
        self.group_tries: Counter[tuple[Run, str]] = Counter()  # group_completed calls
        self.groups: Counter[tuple[Run, str]] = Counter()  # ... that returned
        self.group_raises = 0

    def start(self, task: dt.Task, attempt: int) -> _RunState:
        run = (task.id, task.version)
        with self.lock:
            state = _RunState(run, attempt, time.monotonic())
            self.starts.append(state)
            if self.node not in task.nodes:
                self.violations.append(f"{self.node}: given {run}, assigned to {task.nodes}")
            if task.status is not dt.TaskStatus.STARTED:
                self.violations.append(
                    f"{self.node}: given {run} (attempt {attempt}) to start while it is "
                    f"{task.status.value}"
                )
            self.active[task.id] += 1
            if self.active[task.id] > 1:
                self.violations.append(
                    f"{self.node}: {self.active[task.id]} runs of {task.id} at once (new {run})"
                )
            self.max_active = max(self.max_active, self.active[task.id])
            return state

    def end(self, state: _RunState, *, terminated: bool = False) -> None:
        with self.lock:
            if terminated:
                self.terminations += 1
            if state.active:
                state.active = False
                self.active[state.run[0]] -= 1

    def starts_of(self) -> dict[Run, list[_RunState]]:
        """Each run's starts on this node, in order."""
        out: dict[Run, list[_RunState]] = {}
        with self.lock:
            for state in self.starts:
                out.setdefault(state.run, []).append(state)
        return out

    def unit_begin(self, task: dt.Task, context: dt.TaskContext, concurrency: int) -> UnitCall:
        """A unit function begins: note it and check what it was given."""
        unit = context.unit
        assert unit is not None
        run = (task.id, task.version)
        session = id(context.cancelled)
        with self.lock:
            call = UnitCall(
                run,
                unit.id,
                context.attempt,
                self.node,
                time.monotonic(),
                context.cancelled.is_set(),
            )
            self.unit_calls.append(call)
            spec = {u.id: u for u in task.units}.get(unit.id)
            what = f"{self.node}: given unit {unit.id!r} of {run} (attempt {call.attempt})"
            if spec is None:
                self.violations.append(f"{what}, not one of its {len(task.units)} units")
            elif spec.node not in (None, self.node):
                self.violations.append(f"{what}, which has affinity to {spec.node}")
            if self.node not in task.nodes:
                self.violations.append(f"{what}, assigned to {sorted(task.nodes)}")
            if call.attempt > task.policy.max_attempts:
                self.violations.append(f"{what}: max_attempts {task.policy.max_attempts}")
            self.unit_active[session] += 1
            if self.unit_active[session] > concurrency:
                self.violations.append(
                    f"{what}: {self.unit_active[session]} unit functions of one session at "
                    f"once, unit_concurrency {concurrency}"
                )
            self.max_unit_active = max(self.max_unit_active, self.unit_active[session])
            return call

    def unit_end(self, call: UnitCall, context: dt.TaskContext, outcome: str) -> None:
        session = id(context.cancelled)
        with self.lock:
            call.ended, call.outcome = time.monotonic(), outcome
            self.unit_active[session] -= 1
            if self.unit_active[session] <= 0:
                del self.unit_active[session]

    def unit_calls_by_run(self) -> dict[Run, list[UnitCall]]:
        out: dict[Run, list[UnitCall]] = {}
        with self.lock:
            for call in self.unit_calls:
                out.setdefault(call.run, []).append(call)
        return out


class _LedgerRecorder:
    def __init__(self, inner: dt.TaskCompletionRecorder, ledger: NodeLedger) -> None:
        self._inner = inner
        self._ledger = ledger

    def record_completion(self, namespace: str, task_id: str, version: int) -> None:
        with self._ledger.lock:
            self._ledger.completions.add((task_id, version))
        self._inner.record_completion(namespace, task_id, version)

    def record_failure(self, namespace: str, task_id: str, version: int, error: str) -> None:
        found = _ATTEMPT.search(error)  # every failure is ours, and says which attempt failed
        attempt = int(found.group(1)) if found else 0
        with self._ledger.lock:
            self._ledger.failures.setdefault((task_id, version), {})[attempt] = error
        self._inner.record_failure(namespace, task_id, version, error)

    def record_progress(
        self, namespace: str, task_id: str, version: int, fraction: float, message: str = ""
    ) -> None:
        self._inner.record_progress(namespace, task_id, version, fraction, message)

    def claim_unit(self, task: dt.Task) -> dt.Unit | None:
        return self._inner.claim_unit(task)

    def await_unit(self, task: dt.Task, stop: threading.Event) -> dt.Unit | None:
        return self._inner.await_unit(task, stop)

    def record_unit_completion(
        self, namespace: str, task_id: str, version: int, unit_id: str
    ) -> None:
        run = (task_id, version)
        returned = getattr(self._ledger.returned, "value", None)  # set by the unit function
        attempt = returned[2] if returned is not None and returned[:2] == (run, unit_id) else 0
        with self._ledger.lock:
            self._ledger.unit_completions.setdefault((run, unit_id), []).append(attempt)
        self._inner.record_unit_completion(namespace, task_id, version, unit_id)

    def record_unit_failure(
        self, namespace: str, task_id: str, version: int, unit_id: str, error: str
    ) -> None:
        found = _ATTEMPT.search(error)  # every failure is ours, and says which attempt failed
        attempt = int(found.group(1)) if found else 0
        with self._ledger.lock:
            self._ledger.unit_failures.setdefault(((task_id, version), unit_id), {})[attempt] = (
                error
            )
        self._inner.record_unit_failure(namespace, task_id, version, unit_id, error)

    def record_unit_progress(
        self,
        namespace: str,
        task_id: str,
        version: int,
        unit_id: str,
        fraction: float,
        message: str = "",
    ) -> None:
        self._inner.record_unit_progress(namespace, task_id, version, unit_id, fraction, message)


class _Handle:
    def __init__(self, inner: dt.TaskHandle, state: _RunState, ledger: NodeLedger) -> None:
        self._inner = inner
        self._state = state
        self._ledger = ledger

    def terminate(self) -> None:
        self._ledger.end(self._state, terminated=True)  # before the next start can happen
        self._inner.terminate()


def behaviour(config: ChaosConfig, node: str, task: dt.Task, attempt: int) -> tuple[str, float]:
    """What ``node``'s function does for this attempt: complete, fail or hang, after a delay.

    The same for a run started again after a resume (same attempt). A run whose policy
    retries fails more often on its first attempt (``p_fail_first``) than on the next ones
    (``p_fail_retry``): its retries often succeed, and some fail on the last attempt.
    """
    rng = random.Random(f"{config.seed}/{node}/{task.id}/{task.version}/{attempt}")
    p_fail = config.p_fail
    if task.policy.max_attempts > 1:
        p_fail = config.p_fail_first if attempt == 1 else config.p_fail_retry
    x = rng.random()
    kind = "fail" if x < p_fail else "hang" if x < p_fail + config.p_hang else "ok"
    return kind, rng.uniform(0.0, 1.5)


def unit_behaviour(
    config: ChaosConfig, node: str, task: dt.Task, unit_id: str, attempt: int
) -> tuple[bool, float]:
    """Whether ``node``'s function fails this attempt of a unit, and after how long. Without
    retries a unit rarely fails (that fails the run); with them, an attempt that has attempts
    left after it fails often (``p_unit_fail``), a last one seldom."""
    rng = random.Random(f"{config.seed}/{node}/{task.id}/{task.version}/{unit_id}/{attempt}")
    max_attempts = task.policy.max_attempts
    if max_attempts == 1:
        p_fail = config.p_unit_fail_single
    else:
        p_fail = config.p_unit_fail if attempt < max_attempts else config.p_unit_fail_last
    return rng.random() < p_fail, rng.uniform(*config.unit_delay)


def attempt_of(task: dt.Task) -> int:
    """``TaskContext.attempt`` of a run started with ``task``."""
    return 1 + max(task.attempts.values(), default=0)


class ChaosProvider(dt.ThreadProvider):
    """A ThreadProvider whose runs complete, fail or hang at random, and that keeps a ledger.

    For a unit task, the session (``start_task`` to ``terminate``) is the run's start; its
    unit functions (``unit_concurrency`` 1-3 per node, drawn from the seed) complete or fail
    after a short delay, and never hang. ``group_completed`` sometimes raises (the Scheduler
    retries it); the calls that returned are in the ledger."""

    def __init__(self, node: str, config: ChaosConfig) -> None:
        concurrency = random.Random(f"{config.seed}/{node}/concurrency").randint(1, 3)
        super().__init__(
            self._function, unit_concurrency=concurrency, on_group_completed=self._group_done
        )
        self.node = node
        self.config = config
        self.unit_concurrency = concurrency
        self.ledger = NodeLedger(node)
        self._states: dict[int, _RunState] = {}  # id() of the Task given -> its start

    def set_completion_recorder(self, recorder: dt.TaskCompletionRecorder) -> None:
        super().set_completion_recorder(_LedgerRecorder(recorder, self.ledger))

    def start_task(self, task: dt.Task) -> dt.TaskHandle:
        state = self.ledger.start(task, attempt_of(task))  # active from here
        if not task.units:  # a unit session is active until its handle is terminated
            with self.ledger.lock:
                # by the Task object: a run started again must not find an earlier start's state
                self._states[id(task)] = state
        return _Handle(super().start_task(task), state, self.ledger)

    def _group_done(self, task: dt.Task, group: str) -> None:
        run = (task.id, task.version)
        with self.ledger.lock:
            self.ledger.group_tries[(run, group)] += 1
            tries = self.ledger.group_tries[(run, group)]
            if self.node not in task.nodes:
                self.ledger.violations.append(
                    f"{self.node}: group_completed({group!r}) of {run}, assigned to "
                    f"{sorted(task.nodes)}"
                )
            if group not in {u.group for u in task.units}:
                self.ledger.violations.append(
                    f"{self.node}: group_completed({group!r}) of {run}, not one of its groups"
                )
        rng = random.Random(f"{self.config.seed}/{self.node}/{task.id}/{task.version}/{group}")
        if [rng.random() for _ in range(tries)][-1] < self.config.p_group_raise:  # call n: draw n
            with self.ledger.lock:
                self.ledger.group_raises += 1
            raise RuntimeError(f"injected group_completed failure on {self.node} (call {tries})")
        with self.ledger.lock:
            self.ledger.groups[(run, group)] += 1

    def _unit_function(self, task: dt.Task, context: dt.TaskContext) -> None:
        assert context.unit is not None
        unit_id = context.unit.id
        call = self.ledger.unit_begin(task, context, self.unit_concurrency)
        fail, delay = unit_behaviour(self.config, self.node, task, unit_id, context.attempt)
        outcome = "cancelled"
        try:
            if context.cancelled.wait(delay):
                return  # terminated meanwhile: nothing is recorded
            context.progress(0.5, "half way")
            if fail:
                outcome = "failed"
                raise RuntimeError(
                    f"injected unit failure on {self.node}: {task.id} v{task.version} unit "
                    f"{unit_id} attempt {context.attempt}"
                )
            outcome = "ok"
            self.ledger.returned.value = ((task.id, task.version), unit_id, context.attempt)
        finally:
            self.ledger.unit_end(call, context, outcome)

    def _function(self, task: dt.Task, context: dt.TaskContext) -> None:
        if context.unit is not None:
            self._unit_function(task, context)
            return
        run = (task.id, task.version)
        with self.ledger.lock:
            state = self._states.pop(id(task))
        kind, delay = behaviour(self.config, self.node, task, context.attempt)
        try:
            if kind == "hang":
                with self.ledger.lock:
                    self.ledger.hanging[run] = state
                context.cancelled.wait()  # only terminate() ends it
                return
            if context.cancelled.wait(delay):
                return  # terminated meanwhile: nothing is recorded
            context.progress(0.5, "half way")
            if kind == "fail":
                raise RuntimeError(
                    f"injected failure on {self.node}: {task.id} v{task.version} "
                    f"attempt {context.attempt}"
                )
        finally:
            with self.ledger.lock:
                if self.ledger.hanging.get(run) is state:
                    del self.ledger.hanging[run]
            self.ledger.end(state)


# ---- the observer -----------------------------------------------------------------------------


@dataclass
class Pause:
    """A pause of a run as the observer saw it (monotonic times)."""

    seen: float  # when it first saw the run PAUSED
    revision: int  # the pause's etcd revision (the run state's mod_revision)
    ended: float | None = None  # when it first saw it STARTED again (or terminal)


@dataclass
class RunHistory:
    run: Run
    nodes: frozenset[str]
    policy: dt.RunPolicy
    first_seen: float
    final: dt.Task | None = None
    ended_at: float | None = None
    pauses: list[Pause] = field(default_factory=list)
    state: RunState | None = None  # the latest run state seen (the one at the end, once final)
    state_writes: int = 0  # the state key's etcd version: pauses + resumes, alternating
    attempts: dict[str, int] = field(default_factory=dict)  # the highest count seen per node
    decl: UnitDecl | None = None  # a unit task's declared units
    removed_at: float | None = None  # when its record was seen deleted (TTL or replacement)

    @property
    def resumes(self) -> int:
        """How many times the run was resumed: the state key is written by pause, resume,
        pause, ... (a write only when the status changes), so even pauses and resumes the
        observer did not see one by one (inside a snapshot) are counted."""
        return self.state_writes // 2

    def paused_seconds(self) -> float:
        """The time the run spent PAUSED, as stored (the run state, to its end)."""
        if self.state is None:
            return 0.0
        end = self.final.finished_at if self.final is not None else None
        if end is None:
            return self.state.paused_ms / 1000
        return self.state.paused_for(end) / 1000


@dataclass(frozen=True)
class ClaimSeen:
    """A value of a unit's claim key the observer saw."""

    version: int  # the key's etcd version: a run's puts of it are 1, 2, 3, ...
    revision: int  # its mod_revision
    claim: UnitClaim
    seen: float  # monotonic


class UnitReader:
    """Reads ``get_units`` of each FINISHED unit run the observer saw end, before the TTL
    removes it, on a thread of its own (``chaos-units``): the API's view of its units."""

    def __init__(self, manager: dt.Manager) -> None:
        self.manager = manager
        self.queue: queue.Queue[Run | None] = queue.Queue()
        self.lock = threading.Lock()
        self.results: dict[Run, dict[str, dt.Unit] | str] = {}
        self._thread = threading.Thread(target=self._loop, name="chaos-units", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Read what is queued, then end the thread and join it. Idempotent."""
        if self._thread.is_alive():
            self.queue.put(None)
            self._thread.join(60)

    def _loop(self) -> None:
        while (run := self.queue.get()) is not None:
            result: dict[str, dt.Unit] | str = "not read"
            for _ in range(3):
                try:
                    result = self.manager.get_units(NS, *run)
                except dt.TaskNotFoundError:
                    result = "gone"  # removed (its TTL) before the read
                except dt.DistributedTaskError as exc:
                    result = f"error: {exc!r}"
                    continue
                break
            with self.lock:
                self.results[run] = result

    def snapshot(self) -> dict[Run, dict[str, dt.Unit] | str]:
        with self.lock:
            return dict(self.results)


class Observer:
    """Follows the whole prefix; keeps every run's history and membership changes, and of unit
    tasks their declarations, every claim value, group marks and acknowledgements."""

    def __init__(
        self, client: dt.EtcdClient, manager: dt.Manager, reader: UnitReader | None = None
    ) -> None:
        self.manager = manager
        self.reader = reader
        self.decls: dict[Run, UnitDecl] = {}
        self.claims: dict[Run, dict[str, dict[int, ClaimSeen]]] = {}  # unit -> revision -> seen
        self.marks: dict[Run, dict[str, float]] = {}  # group -> when its mark was written
        self.acks: dict[Run, set[tuple[str, str]]] = {}  # (node, group) acknowledgements
        self.removed: dict[Run, float] = {}  # when a run's record was seen deleted
        self.decl_kvs: dict[str, Any] = {}  # by task id, as stored now
        self._wall_offset = time.time() - time.monotonic()
        keys = manager.keys
        self._keys = keys
        self.lock = threading.Lock()
        self.records: dict[str, Any] = {}
        self.outcomes: dict[str, Any] = {}
        self.node_lists: dict[str, Any] = {}
        self.states: dict[str, Any] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self.attempts: dict[str, dict[str, Any]] = {}
        self.members: set[str] = set()
        self.member_events: list[tuple[float, str, str]] = []  # (when, node, "up"/"down")
        self.history: dict[Run, RunHistory] = {}
        self.violations: list[str] = []
        self.restarts: Counter[str] = Counter()
        self._watch = ResumableWatch(
            client,
            keys.root,
            prefix_range_end(keys.root),
            self._on_batch,
            list_ranges=[(keys.root, prefix_range_end(keys.root))],
            name="chaos-observer",
            on_restart=self._on_restart,
        )

    def start(self) -> None:
        self._watch.start()

    def stop(self) -> None:
        self._watch.stop()

    @property
    def running(self) -> bool:
        return self._watch.running

    def _on_restart(self, reason: str) -> None:
        with self.lock:
            self.restarts[reason] += 1

    def _on_batch(self, batch: Snapshot | Changes) -> None:
        now = time.monotonic()
        with self.lock:
            if isinstance(batch, Snapshot):
                touched = set(self.records)
                before = self.records
                self.records, self.outcomes, self.node_lists = {}, {}, {}
                self.states, self.done, self.attempts = {}, {}, {}
                self.decl_kvs = {}
                members: set[str] = set()
                for kv in batch.kvs:
                    touched |= self._apply(kv, deleted=False, members=members, now=now)
                for task_id, kv in before.items():
                    still = self.records.get(task_id)
                    if still is None or still.mod_revision != kv.mod_revision:
                        self._removed((task_id, kv.mod_revision), now)
                for node in members - self.members:
                    self.member_events.append((now, node, "up"))
                for node in self.members - members:
                    self.member_events.append((now, node, "down"))
                self.members = members
            else:
                # one transaction (revision) at a time: a response that holds a run's end and
                # its removal (a stream that caught up after a frozen member) shows both
                touched = set()
                revision = None
                for event in batch.events:
                    if revision is not None and event.kv.mod_revision != revision:
                        for task_id in touched:
                            self._note(task_id, now)
                        touched = set()
                    revision = event.kv.mod_revision
                    touched |= self._apply(
                        event.kv, deleted=event.kind == "delete", members=None, now=now
                    )
            for task_id in touched:
                self._note(task_id, now)

    def _apply(
        self, kv: Any, *, deleted: bool, members: set[str] | None, now: float = 0.0
    ) -> set[str]:
        parsed = self._keys.parse(kv.key)
        if isinstance(parsed, MemberKey):
            if members is not None:
                members.add(parsed.node_id)
            elif deleted:
                self.members.discard(parsed.node_id)
                self.member_events.append((now, parsed.node_id, "down"))
            elif parsed.node_id not in self.members:
                self.members.add(parsed.node_id)
                self.member_events.append((now, parsed.node_id, "up"))
            return set()
        if isinstance(parsed, UnitDeclKey):
            if deleted:
                self.decl_kvs.pop(parsed.task_id, None)
            else:
                self.decl_kvs[parsed.task_id] = kv
        if isinstance(parsed, UnitDeclKey | UnitClaimKey | GroupKey | UnitRunKey):
            if not deleted:
                try:
                    self._apply_unit(parsed, kv, now)
                except dt.CorruptRecordError as exc:
                    self.violations.append(f"observer: unreadable value at {kv.key!r}: {exc}")
            return set()
        if isinstance(parsed, TaskKey) and deleted and parsed.task_id in self.records:
            self._removed((parsed.task_id, self.records[parsed.task_id].mod_revision), now)
        if isinstance(parsed, TaskKey | OutcomeKey | NodesKey | StateKey):
            target = (
                self.records
                if isinstance(parsed, TaskKey)
                else self.outcomes
                if isinstance(parsed, OutcomeKey)
                else self.node_lists
                if isinstance(parsed, NodesKey)
                else self.states
            )
            if deleted:
                target.pop(parsed.task_id, None)
            else:
                target[parsed.task_id] = kv
            return {parsed.task_id}
        if isinstance(parsed, DoneKey | AttemptKey):
            per_node = (self.done if isinstance(parsed, DoneKey) else self.attempts).setdefault(
                parsed.task_id, {}
            )
            if deleted:
                per_node.pop(parsed.node_id, None)
            else:
                per_node[parsed.node_id] = kv
            return {parsed.task_id}
        return set()

    def _apply_unit(
        self, parsed: UnitDeclKey | UnitClaimKey | GroupKey | UnitRunKey, kv: Any, now: float
    ) -> None:
        """A unit key put: the declaration (written by the add: its revision is the run's
        version), a claim, a group mark, a node's acknowledgement of a group."""
        if isinstance(parsed, UnitDeclKey):
            self.decls[(parsed.task_id, kv.mod_revision)] = UnitDecl.decode(kv.value)
        elif isinstance(parsed, UnitClaimKey):
            claim = UnitClaim.decode(kv.value)
            by_unit = self.claims.setdefault((parsed.task_id, claim.version), {})
            seen = by_unit.setdefault(parsed.unit_id, {})
            if kv.mod_revision not in seen:
                seen[kv.mod_revision] = ClaimSeen(kv.version, kv.mod_revision, claim, now)
        elif isinstance(parsed, GroupKey):
            mark = GroupMark.decode(kv.value)
            at = min(now, mark.at.timestamp() - self._wall_offset)  # written (same host's clock)
            self.marks.setdefault((parsed.task_id, mark.version), {}).setdefault(parsed.group, at)
        elif parsed.kind == "acks" and len(parsed.names) == 2:
            mark = GroupMark.decode(kv.value)
            node, group = parsed.names
            self.acks.setdefault((parsed.task_id, mark.version), set()).add((node, group))

    def _removed(self, run: Run, now: float) -> None:
        self.removed.setdefault(run, now)
        history = self.history.get(run)
        if history is not None and history.removed_at is None:
            history.removed_at = now

    def _note(self, task_id: str, now: float) -> None:
        record = self.records.get(task_id)
        if record is None:
            return
        kvs = [
            record,
            *self.done.get(task_id, {}).values(),
            *self.attempts.get(task_id, {}).values(),
        ]
        for part in (self.outcomes, self.node_lists, self.states, self.decl_kvs):
            if task_id in part:
                kvs.append(part[task_id])
        tasks = self.manager.read.tasks_from_kvs(kvs, self._unreadable).get(NS, [])
        if len(tasks) != 1:
            self.violations.append(f"observer: cannot read {task_id} ({len(tasks)} tasks)")
            return
        task = tasks[0]
        run = (task.id, task.version)
        history = self.history.get(run)
        if history is None:
            history = self.history[run] = RunHistory(run, task.nodes, task.policy, now)
        if history.decl is None:
            history.decl = self.decls.get(run)
        if history.final is None:
            for node, count in task.attempts.items():
                history.attempts[node] = max(history.attempts.get(node, 0), count)
            state_kv = self.states.get(task_id)
            if state_kv is not None:
                history.state = RunState.decode(state_kv.value)
                history.state_writes = max(history.state_writes, state_kv.version)
            paused = bool(history.pauses) and history.pauses[-1].ended is None
            if task.status is dt.TaskStatus.PAUSED and not paused and state_kv is not None:
                history.pauses.append(Pause(now, state_kv.mod_revision))
            elif task.status is not dt.TaskStatus.PAUSED and paused:
                history.pauses[-1].ended = now
        if not task.status.terminal:
            if history.final is not None:
                self.violations.append(
                    f"{run}: {task.status.value} again after {history.final.status.value}"
                )
            return
        if history.final is None:
            history.final, history.ended_at = task, now
            finished = task.status is dt.TaskStatus.FINISHED
            if finished and history.decl is not None and self.reader is not None:
                self.reader.queue.put(run)
        elif (history.final.status, history.final.error) != (task.status, task.error):
            self.violations.append(
                f"{run}: terminal state changed from {history.final.status.value} "
                f"({history.final.error}) to {task.status.value} ({task.error})"
            )
        elif history.final.finished_nodes != task.finished_nodes:
            self.violations.append(f"{run}: finished nodes changed after it ended")

    def _unreadable(self, key: bytes, exc: Exception) -> None:
        self.violations.append(f"observer: unreadable value at {key!r}: {exc}")

    def snapshot(self) -> dict[Run, RunHistory]:
        with self.lock:
            return dict(self.history)

    def unit_state(self, run: Run) -> str | None:
        """Where a unit run's units stand (None: not a unit run), for the settle message."""
        with self.lock:
            decl = self.decls.get(run)
            if decl is None:
                return None
            claims = self.claims.get(run, {})
            latest = {u: max(by.values(), key=lambda c: c.revision) for u, by in claims.items()}
        done = sum(c.claim.status is dt.UnitStatus.COMPLETED for c in latest.values())
        rest = [
            f"{u.id} {_claim_text(latest[u.id]) if u.id in latest else 'never claimed'}"
            + (f" (affinity {u.node})" if u.node else "")
            for u in decl.units
            if u.id not in latest or latest[u.id].claim.status is not dt.UnitStatus.COMPLETED
        ]
        return f"{done} of {len(decl.units)} units COMPLETED; {', '.join(rest[:4])}"

    def pauses_of(self, run: Run) -> int:
        with self.lock:
            history = self.history.get(run)
            return 0 if history is None else len(history.pauses)

    def unfinished_units(self, run: Run) -> list[str]:
        """The units of a unit run not seen COMPLETED, in declaration order."""
        with self.lock:
            decl = self.decls.get(run)
            claims = self.claims.get(run, {})
            done = {
                u
                for u, by in claims.items()
                if any(c.claim.status is dt.UnitStatus.COMPLETED for c in by.values())
            }
        return [] if decl is None else [u.id for u in decl.units if u.id not in done]

    def units_seen(self) -> UnitsSeen:
        """A copy of what it saw of unit tasks."""
        with self.lock:
            return UnitsSeen(
                {
                    run: {u: list(by.values()) for u, by in c.items()}
                    for run, c in self.claims.items()
                },
                {run: dict(m) for run, m in self.marks.items()},
                {run: set(a) for run, a in self.acks.items()},
            )

    def lapses(self, node: str) -> list[float]:
        """When ``node``'s membership disappeared."""
        with self.lock:
            return [when for when, n, what in self.member_events if n == node and what == "down"]


@dataclass
class UnitsSeen:
    """What the observer saw of unit tasks, by run: each unit's claim values (in revision
    order), the groups whose mark it saw (and when), the acknowledgements (node, group)."""

    claims: dict[Run, dict[str, list[ClaimSeen]]]
    marks: dict[Run, dict[str, float]]
    acks: dict[Run, set[tuple[str, str]]]

    def __post_init__(self) -> None:
        for by_unit in self.claims.values():
            for seq in by_unit.values():
                seq.sort(key=lambda c: c.revision)

    def completed(self, run: Run) -> dict[str, list[ClaimSeen]]:
        """unit -> its COMPLETED claim values (one, if any: a completion is final)."""
        return {
            unit: done
            for unit, seq in self.claims.get(run, {}).items()
            if (done := [c for c in seq if c.claim.status is dt.UnitStatus.COMPLETED])
        }


# ---- the client -------------------------------------------------------------------------------


@dataclass
class Control:
    """A pause or resume call of the client and what it returned (monotonic times)."""

    kind: str  # "pause" or "resume"
    outcome: str  # "ok"; "refused": the run had ended or was replaced; "ambiguous": EtcdError
    began: float
    ended: float


class ClientLedger:
    """What the client did and what etcd answered, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.added: dict[Run, dt.Task] = {}
        self.ambiguous_adds: list[str] = []  # ids of adds that raised EtcdError (may have applied)
        self.refused_adds: Counter[str] = Counter()
        self.cancels: dict[Run, str] = {}  # "ok", "not-running", "not-found", "ambiguous"
        self.final_cancels = 0
        self.controls: dict[Run, list[Control]] = {}  # pause and resume calls, in order
        self.paused_cancels = 0  # runs cancelled (instead of resumed) after a pause

    def cancel(self, manager: dt.Manager, run: Run, *, final: bool = False) -> str:
        try:
            task = manager.cancel_task(NS, run[0], run[1])
            outcome = "ok" if task.status is dt.TaskStatus.CANCELLED else f"bad:{task.status}"
        except dt.TaskNotRunningError:
            outcome = "not-running"
        except dt.TaskNotFoundError:
            outcome = "not-found"
        except dt.EtcdError:
            outcome = "ambiguous"
        with self.lock:
            # an earlier "ok" or "ambiguous" must not be hidden by a later "not-running"
            if self.cancels.get(run) not in ("ok", "ambiguous"):
                self.cancels[run] = outcome
            if final:
                self.final_cancels += 1
        return outcome

    def control(self, manager: dt.Manager, run: Run, kind: str) -> str:
        """``pause_task`` or ``resume_task`` of ``run``; returns and records the outcome."""
        call = manager.pause_task if kind == "pause" else manager.resume_task
        want = dt.TaskStatus.PAUSED if kind == "pause" else dt.TaskStatus.STARTED
        began = time.monotonic()
        try:
            task = call(NS, run[0], run[1])
            outcome = "ok" if task.status is want else f"bad:{task.status.value}"
        except (dt.TaskNotRunningError, dt.TaskNotFoundError):
            outcome = "refused"
        except dt.EtcdError:
            outcome = "ambiguous"
        with self.lock:
            self.controls.setdefault(run, []).append(
                Control(kind, outcome, began, time.monotonic())
            )
        return outcome

    def control_counts(self) -> Counter[str]:
        """``"<kind> <outcome>"`` -> calls."""
        with self.lock:
            return Counter(f"{c.kind} {c.outcome}" for cs in self.controls.values() for c in cs)


@dataclass
class _Plan:
    """What the client does with its i-th add, drawn before it (the same for a seed, whatever
    etcd answers)."""

    task_id: str
    payload: bytes
    policy: dt.RunPolicy | None
    cancel_after: float | None  # seconds after the add
    pause_after: float | None  # seconds after the add
    hold: float  # seconds between the pause and its resume (or cancel)
    cancel_paused: bool  # cancel instead of resuming
    units: list[dt.UnitSpec] | None = None  # a unit task's units


def _plan(config: ChaosConfig, rng: random.Random, i: int, used: list[str]) -> _Plan:
    reuse = used and rng.random() < config.reuse_fraction
    task_id = rng.choice(used) if reuse else f"t{i:04d}"
    used.append(task_id)
    payload = rng.randbytes(rng.randrange(0, 64))
    policy = None
    if rng.random() < config.policy_fraction:
        deadline = round(rng.uniform(2.0, 6.0), 1) if rng.random() < config.deadline_fraction else 0
        policy = dt.RunPolicy(
            max_attempts=rng.choice((2, 3)),
            retry_backoff=timedelta(seconds=round(rng.uniform(0.2, 0.5), 2)),
            retry_backoff_max=timedelta(seconds=2),
            deadline=timedelta(seconds=deadline) if deadline else None,
        )
    cancel_after = rng.uniform(0, 3) if rng.random() < config.cancel_fraction else None
    p_pause = config.pause_fraction if policy is None else config.pause_policy_fraction
    pause_after = rng.uniform(0, 2) if rng.random() < p_pause else None
    hold = rng.uniform(0.5, 3.0)
    cancel_paused = rng.random() < config.pause_cancel_fraction
    plan = _Plan(task_id, payload, policy, cancel_after, pause_after, hold, cancel_paused)
    _unit_plan(config, random.Random(f"{config.seed}/units/{i}"), plan)
    return plan


def _unit_plan(config: ChaosConfig, rng: random.Random, plan: _Plan) -> None:
    """Make a share of the adds unit tasks (their own RNG: the plain draws stay as they were):
    5-40 units, in groups or not, some bound to a node, most with retries."""
    if rng.random() >= config.unit_fraction:
        return
    groups = [""]
    if rng.random() < config.unit_group_fraction:
        groups = [f"g{k}" for k in range(rng.randint(1, 4))]
    affinity = rng.random() < config.unit_affinity_fraction
    plan.units = [
        dt.UnitSpec(
            f"u{j:02d}",
            group=rng.choice(groups),
            node=rng.choice(NODES) if affinity and rng.random() < 0.25 else None,
        )
        for j in range(rng.randint(*config.unit_counts))
    ]
    deadline = None
    if rng.random() < config.unit_deadline_fraction:
        deadline = timedelta(seconds=round(rng.uniform(3.0, 8.0), 1))
    max_attempts = rng.choice((2, 3, 4)) if rng.random() < config.unit_policy_fraction else 1
    plan.policy = dt.RunPolicy(
        max_attempts=max_attempts,
        retry_backoff=timedelta(seconds=round(rng.uniform(0.1, 0.3), 2)),
        retry_backoff_max=timedelta(seconds=1),
        deadline=deadline,
    )


def client_loop(
    config: ChaosConfig, manager: dt.Manager, ledger: ClientLedger, errors: list[str]
) -> None:
    rng = random.Random(f"{config.seed}/client")
    spread = config.duration * 0.85
    interval = spread / max(1, config.tasks)
    due: list[tuple[float, int, str, Run, float]] = []  # (when, seq, action, run, hold)
    seq = iter(range(2**62))
    began = time.monotonic()

    def later(delay: float, action: str, run: Run, hold: float = 0.0) -> None:
        heapq.heappush(due, (time.monotonic() + delay, next(seq), action, run, hold))

    def act_due(until: float) -> None:
        while due and due[0][0] <= until:
            _, _, action, run, hold = heapq.heappop(due)
            if action == "cancel":
                ledger.cancel(manager, run)
            elif action == "pause":
                if ledger.control(manager, run, "pause") != "refused":  # ok, or maybe applied
                    later(hold, "resume", run)
            elif action == "pause-then-cancel":
                if ledger.control(manager, run, "pause") != "refused":
                    later(hold, "cancel-paused", run)
            elif action == "cancel-paused":
                with ledger.lock:
                    ledger.paused_cancels += 1
                ledger.cancel(manager, run)
            else:  # resume, again while it is ambiguous: a run must not stay PAUSED
                for _ in range(3):
                    if ledger.control(manager, run, "resume") != "ambiguous":
                        break
                    _pace(0.5)  # client pacing: etcd is in trouble

    try:
        used: list[str] = []
        for i in range(config.tasks):
            plan = _plan(config, rng, i, used)
            try:
                task = manager.add_task(
                    NS, plan.task_id, plan.payload, policy=plan.policy, units=plan.units
                )
            except dt.EtcdError:
                with ledger.lock:
                    ledger.ambiguous_adds.append(plan.task_id)
            except dt.NoEligibleNodesError:
                with ledger.lock:
                    ledger.refused_adds["no eligible nodes"] += 1
            except dt.TaskAlreadyRunningError:
                with ledger.lock:
                    ledger.refused_adds["already running"] += 1
            except dt.InvalidTaskError:
                if not any(u.node for u in plan.units or ()):
                    raise
                with ledger.lock:  # a unit bound to a node that was not live (node-c cut off)
                    ledger.refused_adds["unit affinity to a node not live"] += 1
            else:
                run = _run_of(task)
                with ledger.lock:
                    if run in ledger.added:
                        errors.append(f"add_task returned {run} a second time")
                    ledger.added[run] = task
                if plan.cancel_after is not None:
                    later(plan.cancel_after, "cancel", run)
                if plan.pause_after is not None:
                    then = "pause-then-cancel" if plan.cancel_paused else "pause"
                    later(plan.pause_after, then, run, plan.hold)
            act_due(time.monotonic())
            _pace(began + (i + 1) * interval - time.monotonic())  # client pacing
        while due:
            _pace(due[0][0] - time.monotonic())  # client pacing
            act_due(time.monotonic())
    except Exception as exc:  # reported, never silently ending the client
        errors.append(f"client loop died: {exc!r}")


def _run_of(task: dt.Task) -> Run:
    return (task.id, task.version)


# ---- the fault loop ---------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    detail: str
    began: float
    ended: float = 0.0


class FaultLoop:
    def __init__(self, config: ChaosConfig, cluster: EtcdCluster, proxies: list[TcpProxy]) -> None:
        self.config = config
        self.cluster = cluster
        self.proxies = proxies
        self.rng = random.Random(f"{config.seed}/faults")
        self.faults: list[Fault] = []
        self.cuts = 0

    def run(self, deadline: float) -> None:
        kinds = ["kill-leader", "kill-follower", "pause", "cut"]
        order = list(kinds)
        self.rng.shuffle(order)  # every kind once first, then at random
        while time.monotonic() < deadline:
            kind = order.pop(0) if order else self.rng.choice(kinds)
            getattr(self, "_" + kind.replace("-", "_"))()
            _pace(self.rng.uniform(0.5, 2.0))  # fault-loop pacing: a calm period

    def heal(self) -> None:
        for proxy in self.proxies:
            proxy.unblock()
        for i, member in enumerate(self.cluster.members):
            if member.paused:
                self.cluster.unpause(i)
            if not member.running:
                self.cluster.restart(i)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        """``cluster.wait_healthy()``; a member that crashed on etcd's own bug
        (etcd-io/etcd#14110, fixed in 3.5.5: a read-only transaction whose client gave up
        while the member was frozen panics it when thawed) is restarted, as a fault of its own
        (``etcd-crash``, a kill as far as nodes can tell). Anything else is raised."""
        for _ in self.cluster.members:
            try:
                self.cluster.wait_healthy()
                return
            except EtcdHarnessError as exc:
                text = str(exc)
                crashed = [
                    i
                    for i, member in enumerate(self.cluster.members)
                    if f"<EtcdServer {member.name} " in text
                ]
                if not crashed or _ETCD_TXN_PANIC not in text:
                    raise
                fault = self._log("etcd-crash", f"m{crashed[0]} (etcd-io/etcd#14110)")
                self.cluster.restart(crashed[0])
                fault.ended = time.monotonic()
        self.cluster.wait_healthy()

    def _log(self, kind: str, detail: str) -> Fault:
        fault = Fault(kind, detail, time.monotonic())
        self.faults.append(fault)
        log.warning("chaos fault: %s %s", kind, detail)
        return fault

    def _kill(self, i: int, kind: str, leader: bool) -> None:
        fault = self._log(kind, f"m{i}{' (leader)' if leader else ''}")
        self.cluster.kill(i)
        _pace(self.rng.uniform(1.0, 3.0))  # fault-loop pacing: how long it stays dead
        self.cluster.restart(i)
        fault.ended = time.monotonic()

    def _kill_leader(self) -> None:
        self._kill(self.cluster.wait_for_leader(), "kill-leader", True)

    def _kill_follower(self) -> None:
        leader = self.cluster.wait_for_leader()
        follower = self.rng.choice([i for i in range(3) if i != leader])
        self._kill(follower, "kill-follower", False)

    def _pause(self) -> None:
        i = self.rng.randrange(3)
        leader = self.cluster.leader_index() == i
        fault = self._log("pause", f"m{i}{' (leader)' if leader else ''}")
        self.cluster.pause(i)
        _pace(self.rng.uniform(2.0, 4.0))  # fault-loop pacing: how long it stays frozen
        self.cluster.unpause(i)
        self._wait_healthy()
        fault.ended = time.monotonic()

    def _cut(self) -> None:
        self.cuts += 1
        long_cut = self.config.loss_cut_every > 0 and self.cuts % self.config.loss_cut_every == 0
        seconds = self.config.long_cut_seconds if long_cut else self.config.cut_seconds
        with_kill = self.rng.random() < 0.5
        detail = f"{CUT_NODE} for {seconds:g}s{' + kill-leader' if with_kill else ''}"
        fault = self._log("long-cut" if long_cut else "cut", detail)
        for proxy in self.proxies:
            proxy.block()
        try:
            if with_kill:
                leader = self.cluster.wait_for_leader()
                self._log("kill-leader", f"m{leader} (leader, during the cut)")
                self.cluster.kill(leader)
                _pace(self.rng.uniform(1.0, 2.0))  # fault-loop pacing
                self.cluster.restart(leader)
                self.faults[-1].ended = time.monotonic()
            _pace(fault.began + seconds - time.monotonic())  # fault-loop pacing: the cut
        finally:
            for proxy in self.proxies:
                proxy.unblock()
        fault.ended = time.monotonic()

    def counts(self) -> Counter[str]:
        return Counter(f.kind for f in self.faults)

    def long_cuts(self) -> list[Fault]:
        return [f for f in self.faults if f.kind == "long-cut"]

    def cuts_of(self) -> list[Fault]:
        return [f for f in self.faults if f.kind in ("cut", "long-cut")]


# ---- checking ---------------------------------------------------------------------------------


@dataclass
class ChaosReport:
    config: ChaosConfig
    violations: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    runs: int = 0
    added: int = 0
    ambiguous_adds: int = 0
    refused_adds: int = 0
    refused_why: str = ""
    replaced_ids: int = 0  # runs that replaced an earlier run of their id
    client_cancels: int = 0
    final_cancels: int = 0
    starts: dict[str, int] = field(default_factory=dict)
    max_concurrent: int = 0
    terminations: int = 0
    cut_lapses: int = 0
    loss_failures: int = 0
    policy_runs: int = 0  # runs whose policy retries (max_attempts > 1)
    deadline_runs: int = 0  # runs with a deadline
    retries: int = 0  # starts of a run again on a node after its failed attempt was counted
    last_attempt_failures: int = 0  # retried runs FAILED by a node's last attempt
    controls: Counter[str] = field(default_factory=Counter)  # "pause ok" -> calls, ...
    pauses_seen: int = 0  # pauses the observer saw
    resume_starts: int = 0  # starts of a run again on a node after a resume
    paused_cancels: int = 0  # runs cancelled (instead of resumed) after a pause
    left_paused: int = 0  # runs still PAUSED at the end (a resume that did not apply)
    deadline_failures: int = 0
    deadline_late: float = 0.0  # the most a deadline failure came after its deadline (stored)
    # unit tasks
    unit_runs: int = 0
    unit_statuses: Counter[str] = field(default_factory=Counter)
    units_declared: int = 0
    unit_calls: int = 0  # unit functions called
    units_completed: int = 0  # units seen COMPLETED
    unit_retries: int = 0  # unit failures with attempts left: back to the pool
    unit_last_failures: int = 0  # unit runs FAILED by a unit's last attempt
    units_given_back: int = 0  # a lost node's IN_PROGRESS units given back to the pool
    lost_handouts: int = 0  # units handed out by a ticket, never claimed, given back
    unit_overlaps: int = 0  # a unit on two nodes at once, during a long cut (not violations)
    unit_reads: Counter[str] = field(default_factory=Counter)  # get_units of FINISHED runs
    group_callbacks: int = 0  # group_completed calls that returned
    group_raises: int = 0  # ... that raised (injected)
    missed_groups: int = 0  # group_completed never called: a fault delayed it, or replaced
    unreturned_groups: int = 0  # ... called, raised, and the run removed before its retry
    unit_concurrency: dict[str, int] = field(default_factory=dict)
    max_unit_active: int = 0
    # starts inside a pause, on a node a fault may have kept behind, and group callbacks a
    # node kept behind missed (not violations)
    excused: list[str] = field(default_factory=list)
    began: float = 0.0  # time.monotonic() at the start of the run
    elapsed: float = 0.0
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        c = self.config
        faults = " ".join(f"{k}x{v}" for k, v in sorted(self.faults.items()))
        statuses = " ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        starts = "/".join(str(self.starts.get(n, 0)) for n in NODES)
        verdict = "OK" if self.ok else f"{len(self.violations)} VIOLATIONS"
        return (
            f"chaos seed={c.seed} faults {c.duration:g}s total {self.elapsed:.0f}s: "
            f"injected [{faults}] (cut {c.cut_seconds:g}s > member_ttl {c.member_ttl:g}s, "
            f"grace {c.node_loss_grace:g}s, node-c lapses {self.cut_lapses}); "
            f"client: {c.tasks} adds: {self.added} new runs ({self.replaced_ids} replacing an "
            f"earlier run of their id), {self.ambiguous_adds} ambiguous (EtcdError), "
            f"{self.refused_adds} refused ({self.refused_why or 'none'}); "
            f"{self.client_cancels} cancelled at random, "
            f"{self.final_cancels} hung runs cancelled at the end; "
            f"runs {self.runs}: {statuses}, node-loss failures {self.loss_failures}; "
            f"policy: {self.policy_runs} runs with retries ({self.retries} retries, "
            f"{self.last_attempt_failures} FAILED on a last attempt), {self.deadline_runs} "
            f"with a deadline ({self.deadline_failures} deadline failures, at most "
            f"{self.deadline_late:.1f}s late); pauses: "
            f"{self._calls('pause')} pause calls, {self._calls('resume')} resume calls, "
            f"{self.pauses_seen} pauses seen, {self.resume_starts} restarts after a resume, "
            f"{self.paused_cancels} cancelled while paused, {self.left_paused} left paused, "
            f"{len(self.excused) - self.missed_groups - self.unreturned_groups} starts in a "
            "pause excused by a fault; "
            f"{self._units()}; "
            f"starts a/b/c {starts}, terminations {self.terminations}, max concurrent "
            f"{self.max_concurrent}; checked [{', '.join(self.checked)}] -> {verdict}"
        )

    def _units(self) -> str:
        statuses = " ".join(f"{k} {v}" for k, v in sorted(self.unit_statuses.items()))
        reads = "/".join(str(self.unit_reads.get(k, 0)) for k in ("ok", "gone", "error"))
        concurrency = "/".join(str(self.unit_concurrency.get(n, 0)) for n in NODES)
        return (
            f"units: {self.unit_runs} unit runs ({statuses or 'none'}) of "
            f"{self.units_declared} units, {self.unit_calls} unit calls, "
            f"{self.units_completed} COMPLETED, {self.unit_retries} retried, "
            f"{self.unit_last_failures} runs FAILED on a unit's last attempt, "
            f"{self.units_given_back} given back from a lost node, {self.lost_handouts} lost "
            f"hand-outs given back, {self.unit_overlaps} on two nodes in a long cut; get_units "
            f"of FINISHED runs {reads} ok/gone/error; group callbacks {self.group_callbacks} "
            f"returned, {self.group_raises} raised ({self.unreturned_groups} runs removed "
            f"before the retry), {self.missed_groups} never called (a fault delayed the node, "
            f"or a new run replaced it at once); "
            f"unit_concurrency a/b/c {concurrency} (at most {self.max_unit_active} "
            "at once)"
        )

    def _calls(self, kind: str) -> str:
        outcomes = ("ok", "ambiguous", "refused")
        counts = "/".join(str(self.controls.get(f"{kind} {o}", 0)) for o in outcomes)
        return f"{counts} {'/'.join(outcomes)}"


def _overlaps(fault: Fault, begin: float, end: float) -> bool:
    return fault.began <= end and (fault.ended or time.monotonic()) >= begin


def _deadline_failure(task: dt.Task) -> bool:
    return (
        task.status is dt.TaskStatus.FAILED
        and task.failed_node is None
        and _DEADLINE.search(task.error or "") is not None
    )


def check_runs(
    config: ChaosConfig,
    history: dict[Run, RunHistory],
    ledgers: dict[str, NodeLedger],
    client: ClientLedger,
    long_cuts: list[Fault],
    report: ChaosReport,
) -> None:
    v = report.violations
    report.runs = len(history)
    for run, h in sorted(history.items()):
        if h.final is None:
            v.append(f"{run}: never terminal")
            continue
        task = h.final
        status = task.status
        report.statuses[status.value] += 1
        max_attempts = task.policy.max_attempts
        units = h.decl is not None  # its units are checked by check_units
        completed = {n for n in NODES if run in ledgers[n].completions}
        # every failure each node recorded, by attempt; the Manager stores a node's failure
        # verbatim, the node in failed_node
        failures = {n: ledgers[n].failures.get(run, {}) for n in NODES}
        failed_errors: dict[tuple[str | None, str | None], int] = {
            (n, e): a for n, by in failures.items() for a, e in by.items()
        }
        # only a failure on a node's last attempt fails the run
        finally_failed = {n for n, by in failures.items() if any(a >= max_attempts for a in by)}
        failure = (task.failed_node, task.error)
        cancel = client.cancels.get(run)
        cancel_ok = cancel == "ok"
        cancel_maybe = cancel in ("ok", "ambiguous")
        deadline_failed = _deadline_failure(task)
        strays = (completed | {n for n, by in failures.items() if by}) - set(task.nodes)
        if strays:
            v.append(f"{run}: recorded by unassigned nodes {sorted(strays)}")
        loss_node = None
        if status is dt.TaskStatus.FAILED and task.error:
            loss = _LOSS.search(task.error) is not None and failure not in failed_errors
            loss_node = task.failed_node if loss else None
        loss_ok = loss_node == CUT_NODE and any(
            _overlaps(f, h.first_seen, h.ended_at or time.monotonic()) for f in long_cuts
        )
        if loss_node is not None:
            report.loss_failures += 1
            if not loss_ok:
                v.append(f"{run}: failed for the loss of {loss_node} without a long cut of it")
        if cancel_ok and status is not dt.TaskStatus.CANCELLED:
            v.append(f"{run}: cancel_task returned but it ended {status.value} (lost cancel)")
        if status is dt.TaskStatus.CANCELLED and not cancel_maybe:
            v.append(f"{run}: CANCELLED though the client never cancelled it ({cancel})")
        if status is dt.TaskStatus.FINISHED and not units:
            if completed != set(task.nodes):
                v.append(f"{run}: FINISHED but only {sorted(completed)} of {sorted(task.nodes)}")
            if task.finished_nodes != task.nodes:
                v.append(f"{run}: FINISHED with finished_nodes {sorted(task.finished_nodes)}")
        if status is dt.TaskStatus.FAILED and loss_node is None and not deadline_failed and units:
            pass  # a unit's failure: check_units
        elif status is dt.TaskStatus.FAILED and loss_node is None and not deadline_failed:
            attempt = failed_errors.get(failure)
            if attempt is None:
                v.append(f"{run}: FAILED with {task.error!r}, which no provider recorded")
            elif attempt < max_attempts:
                v.append(
                    f"{run}: FAILED by {task.failed_node}'s attempt {attempt} of "
                    f"{max_attempts}: a failure with attempts left ended the run"
                )
            elif max_attempts > 1:
                report.last_attempt_failures += 1
        if not cancel_maybe and not loss_ok and not units:
            if finally_failed and status is not dt.TaskStatus.FAILED:
                v.append(
                    f"{run}: {sorted(finally_failed)} recorded failure on the last attempt "
                    f"(of {max_attempts}); ended {status.value}"
                )
            lost = status is not dt.TaskStatus.FINISHED and not deadline_failed
            if completed >= set(task.nodes) and lost:
                v.append(f"{run}: every node completed; ended {status.value} (lost completion)")
    report.checked.append(f"{len(history)} runs terminal with the status of their history")

    for run in client.added:
        if run not in history:
            v.append(f"{run}: added but never seen by the observer")
    for run in set(history) - set(client.added):
        if run[0] not in client.ambiguous_adds:
            v.append(f"{run}: a run nobody added")
    report.replaced_ids = sum(n - 1 for n in Counter(run[0] for run in history).values())
    report.checked.append("adds == runs seen")


def _unit_transition(prev: UnitClaim, cur: UnitClaim, max_attempts: int) -> str:
    """What took a unit's claim from ``prev`` to ``cur`` (two consecutive puts of its key):
    ``claim`` (from the pool), ``complete``, ``retry`` (a failure with attempts left),
    ``fail`` (the last attempt), ``give-back`` (a lost claimant's unit), or ``bad: why``."""
    pending, in_progress = dt.UnitStatus.PENDING, dt.UnitStatus.IN_PROGRESS
    if prev.status in (dt.UnitStatus.COMPLETED, dt.UnitStatus.FAILED):
        return f"bad: written again after {prev.status.value}"
    if prev.status is pending:
        if cur.status is in_progress and cur.attempts == prev.attempts:
            return "claim"
        return "bad: a PENDING unit can only be claimed"
    if cur.status is in_progress:
        return "bad: claimed again while IN_PROGRESS (handed out twice)"
    if cur.node != prev.node:
        return f"bad: recorded by {cur.node}, claimed by {prev.node}"
    if cur.status is dt.UnitStatus.COMPLETED and cur.attempts == prev.attempts:
        return "complete"
    if cur.status is pending and cur.attempts == prev.attempts + 1 < max_attempts:
        return "retry"
    if cur.status is pending and cur.attempts == prev.attempts:
        return "give-back"
    if cur.status is dt.UnitStatus.FAILED and cur.attempts == prev.attempts + 1 == max_attempts:
        return "fail"
    return f"bad: attempts {prev.attempts} -> {cur.attempts} of {max_attempts}"


def _claim_text(seen: ClaimSeen) -> str:
    c = seen.claim
    return f"{c.status.value} {c.node} attempts {c.attempts} (version {seen.version})"


def check_units(
    config: ChaosConfig,
    history: dict[Run, RunHistory],
    seen: UnitsSeen,
    reads: dict[Run, dict[str, dt.Unit] | str],
    ledgers: dict[str, NodeLedger],
    faults: list[Fault],
    live_at_end: set[str],
    report: ChaosReport,
) -> None:
    """The unit invariants (the module doc's 7); see each message."""
    v = report.violations
    began = report.began
    long_cuts = [f for f in faults if f.kind == "long-cut"]
    lag_faults = {  # the faults that may delay a node's worker (every etcd fault; cuts: node-c)
        node: [f for f in faults if f.kind not in ("cut", "long-cut") or node == CUT_NODE]
        for node in NODES
    }
    calls_of = {node: ledgers[node].unit_calls_by_run() for node in NODES}
    wall_offset = time.time() - time.monotonic()
    groups_of: dict[Run, dict[tuple[str, str], int]] = {}  # run -> (node, group) -> returns
    tries_of: dict[Run, dict[tuple[str, str], int]] = {}  # the same, calls (some raised)
    for node in NODES:
        report.group_raises += ledgers[node].group_raises
        for (run, group), n in ledgers[node].groups.items():
            groups_of.setdefault(run, {})[(node, group)] = n
            report.group_callbacks += n
        for (run, group), n in ledgers[node].group_tries.items():
            tries_of.setdefault(run, {})[(node, group)] = n
    for run, h in sorted(history.items()):
        decl, task = h.decl, h.final
        if decl is None or task is None:
            continue
        status = task.status
        report.unit_runs += 1
        report.unit_statuses[status.value] += 1
        report.units_declared += len(decl.units)
        max_attempts = h.policy.max_attempts
        specs = decl.by_id
        calls = [call for node in NODES for call in calls_of[node].get(run, [])]
        report.unit_calls += len(calls)

        # every claim value: where it may stand, and how it got there
        for unit_id, seq in sorted(seen.claims.get(run, {}).items()):
            spec = specs.get(unit_id)
            if spec is None:
                v.append(f"{run}: a claim of {unit_id!r}, not one of its units")
                continue
            where = f"{run} unit {unit_id}"
            first = seq[0]
            if first.version == 1:
                fresh = first.claim.status is dt.UnitStatus.IN_PROGRESS
                lost = first.claim.status is dt.UnitStatus.PENDING and first.claim.node is None
                if first.claim.attempts != 0 or not (fresh or lost):
                    v.append(f"{where}: first claim {_claim_text(first)}")
                report.lost_handouts += lost
            for value in seq:
                claim = value.claim
                if claim.attempts > max_attempts:
                    v.append(f"{where}: {_claim_text(value)}, max_attempts {max_attempts}")
                if claim.status is dt.UnitStatus.PENDING:
                    continue
                if claim.node not in h.nodes:
                    v.append(f"{where}: {_claim_text(value)}, assigned to {sorted(h.nodes)}")
                if spec.node is not None and claim.node != spec.node:
                    v.append(f"{where}: {_claim_text(value)}, affinity to {spec.node}")
                if claim.status is dt.UnitStatus.FAILED and claim.attempts != max_attempts:
                    v.append(f"{where}: {_claim_text(value)}, max_attempts {max_attempts}")
            for prev, cur in itertools.pairwise(seq):
                if cur.version != prev.version + 1:
                    continue  # not seen one by one (a relist)
                kind = _unit_transition(prev.claim, cur.claim, max_attempts)
                claimant = cur.claim.node
                if kind.startswith("bad: "):
                    v.append(f"{where}: {_claim_text(prev)} -> {_claim_text(cur)}: {kind[5:]}")
                elif kind in ("retry", "fail"):
                    report.unit_retries += kind == "retry"
                    errors = (
                        ledgers[claimant].unit_failures.get((run, unit_id), {})
                        if claimant in ledgers
                        else {}
                    )
                    if errors.get(cur.claim.attempts) != cur.claim.error:
                        v.append(
                            f"{where}: failed attempt {cur.claim.attempts} counted on {claimant} "
                            f"with {cur.claim.error!r}; its provider recorded {errors}"
                        )
                elif kind == "give-back":
                    report.units_given_back += 1
                    if claimant != CUT_NODE or not any(
                        f.began <= cur.seen <= f.ended + 5.0 for f in long_cuts
                    ):
                        v.append(
                            f"{where}: given back from {claimant} at +{cur.seen - began:.1f}s, "
                            "which was not lost (no long cut of it then)"
                        )

        # completed exactly once, by a node whose provider completed it
        completed = seen.completed(run)
        report.units_completed += len(completed)
        for unit_id, done in sorted(completed.items()):
            if len(done) > 1:
                v.append(
                    f"{run} unit {unit_id}: COMPLETED {len(done)} times: "
                    + ", ".join(_claim_text(d) for d in done)
                )
            claim = done[0].claim
            recorded = (
                ledgers[claim.node].unit_completions.get((run, unit_id), [])
                if claim.node in ledgers
                else []
            )
            if claim.attempts + 1 not in recorded:
                v.append(
                    f"{run} unit {unit_id}: COMPLETED by {claim.node} at attempt "
                    f"{claim.attempts + 1}; its provider recorded completions at {recorded}"
                )
        if len(completed) == len(decl.units) and status is not dt.TaskStatus.FINISHED:
            v.append(f"{run}: every unit COMPLETED, yet it ended {status.value}")

        # one unit never runs on two nodes at once (unless its first node was lost)
        by_unit: dict[str, list[UnitCall]] = {}
        for call in calls:
            by_unit.setdefault(call.unit, []).append(call)
        for unit_id, unit_calls in sorted(by_unit.items()):
            for a, b in itertools.combinations(sorted(unit_calls, key=lambda c: c.began), 2):
                if a.node == b.node or (a.ended or math.inf) <= b.began:
                    continue
                what = (
                    f"{run} unit {unit_id}: ran on {a.node} (attempt {a.attempt}, "
                    f"+{a.began - began:.1f}s to +{(a.ended or math.inf) - began:.1f}s) and on "
                    f"{b.node} (attempt {b.attempt}, from +{b.began - began:.1f}s) at once"
                )
                if any(_overlaps(f, a.began, b.ended or math.inf) for f in long_cuts):
                    report.unit_overlaps += 1
                else:
                    v.append(what)

        # group callbacks: only for a group whose units are all COMPLETED; an acknowledgement
        # only after a call returned; for a FINISHED run, on every live node of the run
        returned = groups_of.get(run, {})
        tried = tries_of.get(run, {})
        for (node, group), _ in sorted(tried.items()):
            not_done = [u.id for u in decl.units if u.group == group and u.id not in completed]
            if not_done:
                v.append(
                    f"{node}: group_completed({group!r}) of {run} called, but units "
                    f"{not_done[:5]} were never COMPLETED"
                )
        for node, group in sorted(seen.acks.get(run, set())):
            if (node, group) not in returned:
                v.append(f"{node}: acknowledged group {group!r} of {run}, no call returned")
        marks = seen.marks.get(run, {})
        for group in sorted(set(marks) - set(decl.group_sizes)):
            v.append(f"{run}: a mark of group {group!r}, not one of its groups")

        if status is dt.TaskStatus.FINISHED:
            missing = [u.id for u in decl.units if u.id not in completed]
            if missing:
                v.append(f"{run}: FINISHED, units {missing[:5]} never seen COMPLETED")
            if task.finished_nodes:
                v.append(f"{run}: a unit run FINISHED with {sorted(task.finished_nodes)}")
            read = reads.get(run)
            if read is None:
                v.append(f"{run}: FINISHED, never read with get_units")
            elif isinstance(read, str):
                report.unit_reads[read.split(":")[0]] += 1
            else:
                report.unit_reads["ok"] += 1
                not_done = [
                    u for u, unit in read.items() if unit.status is not dt.UnitStatus.COMPLETED
                ]
                if not_done or list(read) != [u.id for u in decl.units]:
                    v.append(
                        f"{run}: FINISHED, get_units says {len(not_done)} of {len(read)} units "
                        f"not COMPLETED ({not_done[:5]}), {len(decl.units)} declared"
                    )
                for unit_id, unit in read.items():
                    seen_done = completed.get(unit_id)
                    if seen_done and unit.node != seen_done[0].claim.node:
                        v.append(
                            f"{run} unit {unit_id}: get_units says completed by {unit.node}, "
                            f"its claim said {seen_done[0].claim.node}"
                        )
            for group in sorted(decl.group_sizes):
                mark = marks.get(group)
                if mark is None:
                    v.append(f"{run}: FINISHED, no mark of group {group!r} seen")
                    mark = h.ended_at or time.monotonic()
                removed = h.removed_at or time.monotonic()
                assert task.finished_at is not None
                replaced = removed - (task.finished_at.timestamp() - wall_offset) < (
                    config.completed_ttl - 0.5
                )  # removed before its TTL: a new run of its id replaced it
                for node in sorted(h.nodes & live_at_end):
                    if (node, group) in returned:
                        continue
                    what = (
                        f"{run}: group {group!r} completed (at +{mark - began:.1f}s), yet "
                        f"{node}'s group_completed {{}} before the run was removed "
                        f"(+{removed - began:.1f}s, its TTL {config.completed_ttl:g}s)"
                    )
                    if (node, group) in tried:  # it raised: removed before the retry
                        report.excused.append(what.format("raised, never retried"))
                        report.unreturned_groups += 1
                    elif replaced:
                        report.excused.append(
                            what.format("was never called") + ": replaced by a new run"
                        )
                        report.missed_groups += 1
                    elif any(_overlaps(f, mark, removed) for f in lag_faults[node]):
                        report.excused.append(
                            what.format("was never called") + ": a fault delayed that node"
                        )
                        report.missed_groups += 1
                    else:
                        v.append(what.format("was never called"))
        elif status is dt.TaskStatus.FAILED and not _deadline_failure(task):
            if _LOSS.search(task.error or ""):  # the lost node was awaited for a unit
                found = _STUCK_UNIT.search(task.error or "")
                stuck = specs.get(found.group(1)) if found else None
                if stuck is None or stuck.node != task.failed_node:
                    v.append(f"{run}: FAILED {task.error!r}: no unit with affinity to it")
                elif stuck.id in completed:
                    v.append(f"{run}: FAILED {task.error!r}, yet {stuck.id} was COMPLETED")
                continue
            failed_unit, failed_node = task.failed_unit or "", task.failed_node or ""
            errors = (
                ledgers[failed_node].unit_failures.get((run, failed_unit), {})
                if failed_node in ledgers
                else {}
            )
            if failed_unit not in specs or errors.get(max_attempts) != task.error:
                v.append(
                    f"{run}: FAILED by unit {failed_unit!r} on {failed_node} with "
                    f"{task.error!r}, not a failure its provider recorded on the last attempt "
                    f"({errors})"
                )
            else:
                report.unit_last_failures += 1
                last = seen.claims.get(run, {}).get(failed_unit, [])
                if not last or last[-1].claim.status is not dt.UnitStatus.FAILED:
                    v.append(f"{run}: FAILED by unit {failed_unit!r}, whose claim is not FAILED")
    report.checked.append(
        "units: claims move only by legal transitions, COMPLETED exactly once by a node that "
        "completed them, attempts <= max_attempts, FINISHED runs all COMPLETED in get_units, "
        "FAILED only by a unit's last attempt (or affinity to a lost node, or a deadline), "
        "no unit on two nodes at once, group callbacks on every live node"
    )


def lag_windows(faults: list[Fault]) -> dict[str, list[tuple[float, float]]]:
    """When a fault may have kept a node's view of the cluster behind (monotonic times).

    A frozen member: a watch stream on it is silent until it is thawed (2-4 s, less than
    ``watch_timeout``), and a request to it hangs meanwhile, so any node's (we do not know
    which member each one's watch is on). A killed member: a stream on it breaks at once and
    the watch starts again on another member within its backoff (at most 2 s). A cut: node-c
    sees nothing until the proxies let it through again, then within that backoff.
    """
    reconnect = 2.0  # ResumableWatch's max_backoff
    out: dict[str, list[tuple[float, float]]] = {node: [] for node in NODES}
    for fault in faults:
        ended = fault.ended or time.monotonic()
        if fault.kind == "pause":
            for node in NODES:
                out[node].append((fault.began, ended))
        elif fault.kind in ("kill-leader", "kill-follower", "etcd-crash"):
            for node in NODES:
                out[node].append((fault.began, min(ended, fault.began + reconnect)))
        elif fault.kind in ("cut", "long-cut"):
            out[CUT_NODE].append((fault.began, ended + reconnect))
    for windows in out.values():
        windows.sort()
    return out


def _view_revisions(seq: list[_RunState]) -> list[tuple[float, int]]:
    """``(time, revision)``: by each start of ``seq`` (a node's starts, in order), the node's
    view of ``P/cluster/`` had reached at least the highest version started so far (a
    version is its record's revision, and the view applies that watch in revision order)."""
    out, highest = [], 0
    for state in seq:
        highest = max(highest, state.run[1])
        out.append((state.at, highest))
    return out


def _learnt_by(seen: float, latency: float, windows: list[tuple[float, float]]) -> float:
    """When a node must have acted on a change the observer saw at ``seen``: ``latency``
    later, or ``latency`` after the end of a lag window of that node that overlaps the wait."""
    by = seen + latency
    for begin, end in windows:  # sorted by begin: ``by`` only grows
        if begin <= by and end >= seen:
            by = max(by, end + latency)
    return by


def check_policy(
    config: ChaosConfig,
    history: dict[Run, RunHistory],
    ledgers: dict[str, NodeLedger],
    client: ClientLedger,
    faults: list[Fault],
    report: ChaosReport,
) -> None:
    """The run-policy invariants (the module doc's 2 and 6); see each message."""
    v = report.violations
    began = report.began  # times in messages are "+seconds" from it, as in the fault log
    starts = {node: ledgers[node].starts_of() for node in NODES}
    unit_calls = {node: ledgers[node].unit_calls_by_run() for node in NODES}
    revisions = {node: _view_revisions(ledgers[node].starts) for node in NODES}

    def failers(task: dt.Task) -> set[str]:
        """The nodes whose provider recorded the error the run FAILED with."""
        run = _run_of(task)
        return {n for n in NODES if task.error in ledgers[n].failures.get(run, {}).values()}

    windows = lag_windows(faults)
    latency = config.pause_latency
    for run, h in sorted(history.items()):
        policy = h.policy
        max_attempts = policy.max_attempts
        report.policy_runs += max_attempts > 1
        report.pauses_seen += len(h.pauses)
        controls = client.controls.get(run, [])
        resumes = [c for c in controls if c.kind == "resume" and c.outcome != "refused"]
        pause_calls = [c for c in controls if c.kind == "pause" and c.outcome != "refused"]

        # attempts never exceed max_attempts; each counted attempt is a failure recorded
        for node, count in sorted(h.attempts.items()):
            recorded = len(ledgers[node].failures.get(run, {}))
            if count > max_attempts:
                v.append(f"{run}: {count} attempts counted on {node}, max_attempts {max_attempts}")
            if count > recorded:
                v.append(f"{run}: {count} attempts counted on {node}, which failed {recorded}")
        final = h.final
        if final is not None and max_attempts > 1 and final.failed_node in failers(final):
            counted = final.attempts.get(final.failed_node, 0)
            if counted != max_attempts:
                v.append(
                    f"{run}: FAILED by {final.failed_node}'s failure with {counted} attempts "
                    f"counted, not max_attempts {max_attempts}"
                )

        # per node: a run starts again only as a retry or after a resume, never past the bound
        for node in NODES:
            seq = starts[node].get(run, [])
            if not seq:
                continue
            if seq[0].attempt != 1:
                v.append(f"{node}: {run} first started as attempt {seq[0].attempt}")
            beyond = sorted({s.attempt for s in seq if s.attempt > max_attempts})
            if beyond:
                v.append(f"{node}: started {run} as attempt {beyond}, max_attempts {max_attempts}")
            bound = max_attempts + h.resumes  # this scenario restarts no Scheduler
            if len(seq) > bound:
                v.append(
                    f"{node}: started {run} {len(seq)} times: more than max_attempts "
                    f"{max_attempts} + {h.resumes} resumes"
                )
            failed = ledgers[node].failures.get(run, {})
            for prev, cur in itertools.pairwise(seq):
                if cur.attempt == prev.attempt + 1 and prev.attempt in failed:
                    report.retries += 1
                elif cur.attempt == prev.attempt and any(
                    c.began < cur.at and c.ended > prev.at for c in resumes
                ):
                    report.resume_starts += 1
                else:
                    why = (
                        "no resume between"
                        if cur.attempt == prev.attempt
                        else f"failures recorded on attempts {sorted(failed)}"
                    )
                    v.append(
                        f"{node}: started {run} twice in one process: attempt {prev.attempt} at "
                        f"+{prev.at - began:.1f}s, attempt {cur.attempt} at +{cur.at - began:.1f}s "
                        f"({why})"
                    )

            # no start while the run is PAUSED: from the observer's sight of the pause (plus
            # the detection latency) until the resume (the client's call, or the observer's
            # sight of it if that came first). A start there is excused only while a fault may
            # have kept this node's view behind, and never once the node had started a run
            # added after the pause: then its view held the pause. The same for the unit
            # functions of a unit run (but those that began terminated: they return at once).
            checked = [(state.at, f"{run} (attempt {state.attempt})") for state in seq] + [
                (call.began, f"unit {call.unit!r} of {run} (attempt {call.attempt})")
                for call in unit_calls[node].get(run, [])
                if not call.born_cancelled
            ]
            for pause in h.pauses:
                calls = [c for c in pause_calls if c.began <= pause.seen]
                after = calls[-1].began if calls else -1.0
                until = min(
                    [pause.ended or math.inf, *(c.began for c in resumes if c.began >= after)]
                )
                learnt = _learnt_by(pause.seen, latency, windows[node])
                for at, started in checked:
                    if not pause.seen + latency < at < until:
                        continue
                    known = max((r for when, r in revisions[node] if when <= at), default=0)
                    what = (
                        f"{node}: started {started} at "
                        f"+{at - began:.1f}s while PAUSED: seen paused at "
                        f"+{pause.seen - began:.1f}s (revision {pause.revision}), resumed at "
                        f"+{until - began:.1f}s"
                    )
                    if at <= learnt and known < pause.revision:
                        report.excused.append(
                            f"{what} (a fault kept it behind until +{learnt - began:.1f}s, "
                            f"its view known at revision {known})"
                        )
                    elif known >= pause.revision:
                        v.append(f"{what} (its view was at revision {known})")
                    else:
                        v.append(f"{what} (latency {latency:g}s, no fault kept this node behind)")

        # the deadline: enforced within the slack, never early
        if final is None:
            continue
        deadline_failed = _deadline_failure(final)
        report.deadline_failures += deadline_failed
        if policy.deadline is None:
            if deadline_failed:
                v.append(f"{run}: FAILED {final.error!r} with no deadline")
            continue
        report.deadline_runs += 1
        deadline = policy.deadline.total_seconds()
        paused = h.paused_seconds()
        assert final.finished_at is not None
        stored = (final.finished_at - final.started_at).total_seconds() - paused
        observed = (h.ended_at or time.monotonic()) - h.first_seen - paused
        if deadline_failed:
            report.deadline_late = max(report.deadline_late, stored - deadline)
        if stored > deadline + config.deadline_slack:
            v.append(
                f"{run}: STARTED for {stored:.1f}s (by its stored times, {paused:.1f}s paused "
                f"not counted), past its deadline {deadline:g}s + {config.deadline_slack:g}s"
            )
        if observed > deadline + config.observed_deadline_slack:
            v.append(
                f"{run}: seen STARTED for {observed:.1f}s ({paused:.1f}s paused not counted), "
                f"past its deadline {deadline:g}s + {config.observed_deadline_slack:g}s"
            )
        if deadline_failed and stored < deadline - 0.05:
            v.append(
                f"{run}: FAILED {final.error!r} after running only {stored:.2f}s "
                f"({paused:.1f}s paused not counted)"
            )
    report.controls = client.control_counts()
    report.paused_cancels = client.paused_cancels
    report.checked.append(
        "starts only as a retry or after a resume, none while PAUSED, deadlines kept, "
        "attempts <= max_attempts"
    )


def _sessions(run: Run, ledgers: dict[str, NodeLedger], stuck: list[str]) -> str:
    """Each node's sessions of a unit run and its unit calls (those of the ``stuck`` units in
    full), for a settle message."""
    out = []
    for node, ledger in ledgers.items():
        with ledger.lock:
            sessions = [s for s in ledger.starts if s.run == run]
            calls = [c for c in ledger.unit_calls if c.run == run]
        active = sum(s.active for s in sessions)
        running = sum(c.ended is None for c in calls)
        ran = [
            f"{c.unit} attempt {c.attempt} {c.outcome or 'running'}"
            + (" (began terminated)" if c.born_cancelled else "")
            for c in calls
            if c.unit in stuck
        ]
        out.append(
            f"{node}: {len(sessions)} sessions ({active} active), {len(calls)} unit calls "
            f"({running} running){': ' if ran else ''}{', '.join(ran)}"
        )
    return "; ".join(out)


def _settled(
    manager: dt.Manager, ledgers: dict[str, NodeLedger], observer: Observer, pending: list[str]
) -> tuple[list[dt.Task], list[dt.Task]] | None:
    """``(STARTED tasks, PAUSED tasks)`` when each STARTED one waits only on hanging
    functions (their current attempt: an earlier one may have failed), else None. A STARTED
    unit run never settles: its units never hang, so it must end by itself."""
    pending.clear()
    tasks = manager.list_tasks().get(NS, [])
    started = [t for t in tasks if t.status is dt.TaskStatus.STARTED]
    paused = [t for t in tasks if t.status is dt.TaskStatus.PAUSED]
    for task in started:
        run = _run_of(task)
        units = observer.unit_state(run)
        if units is not None:
            stuck = observer.unfinished_units(run)[:4]
            pending.append(
                f"{run}: unit run STARTED ({observer.pauses_of(run)} pauses seen): {units}; "
                f"{_sessions(run, ledgers, stuck)}"
            )
            continue
        for node in sorted(task.nodes - task.finished_nodes):
            ledger = ledgers[node]
            with ledger.lock:
                hanging = run in ledger.hanging
                completed = run in ledger.completions
                starts = [(s.attempt, s.active) for s in ledger.starts if s.run == run]
                failed = sorted(ledger.failures.get(run, {}))
            if not hanging or completed:
                what = (
                    "completed, not yet delivered"
                    if completed
                    else "not hanging there (running, backing off, or failure not delivered)"
                )
                pending.append(
                    f"{run} on {node}: {what}; started {len(starts)} times (attempt, active: "
                    f"{starts}), failures recorded on attempts {failed}, attempts counted "
                    f"{dict(task.attempts)}"
                )
    return None if pending else (started, paused)


def _cluster_tasks_empty(client: dt.EtcdClient, manager: dt.Manager) -> bool:
    keys = manager.keys
    roots = (
        keys.all_tasks(),
        keys.all_outcomes(),
        keys.all_nodes(),
        keys.all_done(),
        keys.all_progress(),
        keys.all_states(),
        keys.all_attempts(),
        keys.all_unit_decls(),
        keys.all_unit_runs(),
        keys.all_pool(),
        keys.all_groups(),
    )
    for root in roots:
        if client.range(root, prefix_range_end(root), count_only=True).count:
            return False
    return True


def our_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(OUR_THREAD_PREFIXES)}


def _soft_wait(report: ChaosReport, what: str, predicate: Callable[[], Any], timeout: float) -> Any:
    try:
        return wait_until(predicate, timeout, 0.1, what, ignore=(dt.EtcdError,))
    except AssertionError as exc:
        report.violations.append(str(exc))
        return None


# ---- the run ----------------------------------------------------------------------------------


def run_chaos(cluster: EtcdCluster, config: ChaosConfig) -> ChaosReport:
    """Run the whole chaos scenario on ``cluster`` (started, three members); see the module doc.

    Returns the report; every invariant that failed is one line in ``report.violations``.
    Raises only for harness trouble (a member that does not come back, ...). Everything it
    started is stopped and joined before it returns.
    """
    began = time.monotonic()
    report = ChaosReport(config, began=began)
    log.warning("chaos seed %d prefix %s", config.seed, config.prefix)
    threads_before = our_threads()
    endpoints = cluster.endpoints
    ttl = timedelta(seconds=config.completed_ttl)
    proxies: list[TcpProxy] = []
    clients: list[dt.EtcdClient] = []
    schedulers: list[dt.Scheduler] = []
    providers = {node: ChaosProvider(node, config) for node in NODES}
    observer: Observer | None = None
    reader: UnitReader | None = None
    faults = FaultLoop(config, cluster, proxies)
    client_errors: list[str] = []
    ledger = ClientLedger()

    def new_client(urls: list[str]) -> dt.EtcdClient:
        client = dt.EtcdClient(
            urls, timeout=config.client_timeout, watch_timeout=config.watch_timeout
        )
        clients.append(client)
        return client

    try:
        for member in cluster.members:
            proxies.append(TcpProxy("127.0.0.1", member.client_port))
        driver = dt.Manager(new_client(endpoints), prefix=config.prefix, completed_task_ttl=ttl)
        watcher = dt.Manager(
            new_client(endpoints[2:] + endpoints[:2]), prefix=config.prefix, completed_task_ttl=ttl
        )
        reader = UnitReader(watcher)
        reader.start()
        observer = Observer(clients[-1], watcher, reader)
        observer.start()
        routes = {
            "node-a": endpoints,
            "node-b": endpoints[1:] + endpoints[:1],
            "node-c": [p.endpoint for p in proxies[2:] + proxies[:2]],
        }
        for node in NODES:
            manager = dt.Manager(new_client(routes[node]), prefix=config.prefix)
            scheduler = dt.Scheduler(
                manager,
                node_id=node,
                providers={NS: providers[node]},
                completed_task_ttl=ttl,
                member_ttl=timedelta(seconds=config.member_ttl),
                node_loss_grace=timedelta(seconds=config.node_loss_grace),
                resync_interval=timedelta(hours=1),  # recovery must come from the watch
                registry=CollectorRegistry(),
            )
            schedulers.append(scheduler)
            scheduler.start()
        wait_until(lambda: len(driver.live_members()) == 3, 10, 0.05, "three members")

        # ---- the fault phase
        client_thread = threading.Thread(
            target=client_loop,
            args=(config, driver, ledger, client_errors),
            name="chaos-client",
            daemon=True,
        )
        client_thread.start()
        try:
            faults.run(time.monotonic() + config.duration)
        finally:
            faults.heal()
        client_thread.join(config.duration + 60)
        if client_thread.is_alive():
            report.violations.append("the client did not finish its adds and cancels")
        report.violations.extend(client_errors)
        report.checked.append("faults healed, client done")

        # ---- the end phase: hanging runs get cancelled, everything ends and is cleaned up
        pending: list[str] = []
        settled = _soft_wait(
            report,
            "every STARTED run waits only on hanging functions",
            lambda: _settled(driver, providers_ledgers(providers), observer, pending),
            config.settle_timeout,
        )
        if settled is not None:
            started, paused = settled
        else:
            report.violations.extend(f"  unsettled: {p}" for p in pending[:30])
            tasks = driver.list_tasks().get(NS, [])
            started = [t for t in tasks if t.status is dt.TaskStatus.STARTED]
            paused = [t for t in tasks if t.status is dt.TaskStatus.PAUSED]
        for task in paused:  # its resume did not apply (it raised EtcdError three times)
            run = _run_of(task)
            with ledger.lock:
                calls = ledger.controls.get(run, [])
            if calls and calls[-1].kind == "resume" and calls[-1].outcome == "ok":
                report.violations.append(f"{run}: resume_task returned, yet it is PAUSED")
        report.left_paused = len(paused)
        for task in started + paused:
            outcome = ledger.cancel(driver, _run_of(task), final=True)
            if outcome != "ok":
                report.violations.append(f"final cancel of {_run_of(task)}: {outcome}")
        _soft_wait(
            report,
            "every run seen is terminal",
            lambda: all(h.final is not None for h in observer.snapshot().values()),
            30,
        )
        _soft_wait(
            report,
            "no task left in the cluster after the TTL",
            lambda: _cluster_tasks_empty(clients[0], driver),
            config.completed_ttl + 60,
        )
        report.checked.append("cluster empty after the TTL")
        _soft_wait(
            report,
            "every provider's local state is cleaned up and nothing runs",
            lambda: all(
                not p.get_local_tasks() and not s.running().get(NS)
                for p, s in zip(providers.values(), schedulers, strict=True)
            ),
            30,
        )
        for provider in providers.values():
            with provider.ledger.lock:
                still = sorted(k for k, n in provider.ledger.active.items() if n)
            if still:
                report.violations.append(f"{provider.node}: runs still active: {still[:10]}")
        report.checked.append("local state empty, running() empty, no run active")
        _soft_wait(
            report,
            "all three nodes are members again",
            lambda: len(driver.live_members()) == 3,
            30,
        )
        live_at_end = {m.node_id for m in driver.live_members()}
        reader.stop()  # what it was given to read is read

        # ---- invariants
        history = observer.snapshot()
        report.violations.extend(observer.violations)
        check_runs(
            config, history, providers_ledgers(providers), ledger, faults.long_cuts(), report
        )
        for provider in providers.values():
            report.violations.extend(provider.ledger.violations)
            report.starts[provider.node] = len(provider.ledger.starts)
            report.max_concurrent = max(report.max_concurrent, provider.ledger.max_active)
            report.terminations += provider.ledger.terminations
        report.checked.append("never 2 runs of a task at once, none given PAUSED")
        check_policy(config, history, providers_ledgers(providers), ledger, faults.faults, report)
        check_units(
            config,
            history,
            observer.units_seen(),
            reader.snapshot(),
            providers_ledgers(providers),
            faults.faults,
            live_at_end,
            report,
        )
        for provider in providers.values():
            report.unit_concurrency[provider.node] = provider.unit_concurrency
            report.max_unit_active = max(report.max_unit_active, provider.ledger.max_unit_active)
        lapses = observer.lapses(CUT_NODE)
        report.cut_lapses = sum(
            1 for when in lapses if any(f.began <= when <= f.ended + 1 for f in faults.cuts_of())
        )
        if faults.cuts_of() and report.cut_lapses == 0:
            report.violations.append(f"{CUT_NODE}'s membership never lapsed during a cut")
        report.checked.append("the cut outlasted the member TTL")
    finally:
        for scheduler in schedulers:
            scheduler.stop()
        for provider in providers.values():
            if not provider.join(10):
                report.violations.append(f"{provider.node}: a run thread did not end")
        if observer is not None:
            observer.stop()
        if reader is not None:
            reader.stop()
        if schedulers and clients:
            _soft_wait(  # stop() revokes the leases: the memberships go at once
                report,
                "no key left under the prefix after stop()",
                lambda: not run_keys_under(clients[0], config.prefix),
                5,
            )
        for client in clients:
            client.close()
        for proxy in proxies:
            proxy.close()
        _soft_wait(report, "no thread of ours left", lambda: our_threads() <= threads_before, 10)
        report.checked.append("no key and no thread left after stop()")
    report.faults = faults.counts()
    report.fault_log = [
        f"{f.kind} {f.detail} at +{f.began - began:.1f}s for {f.ended - f.began:.1f}s"
        for f in faults.faults
    ]
    report.added = len(ledger.added)
    report.ambiguous_adds = len(ledger.ambiguous_adds)
    report.refused_adds = sum(ledger.refused_adds.values())
    report.refused_why = ", ".join(f"{n} {why}" for why, n in sorted(ledger.refused_adds.items()))
    report.final_cancels = ledger.final_cancels
    report.client_cancels = len(ledger.cancels) - ledger.final_cancels
    report.elapsed = time.monotonic() - began
    return report


def providers_ledgers(providers: dict[str, ChaosProvider]) -> dict[str, NodeLedger]:
    return {node: provider.ledger for node, provider in providers.items()}


# ---- by hand ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.chaos",
        description="Three Schedulers on a three-member etcd under random faults; invariants.",
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of faults")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument(
        "--loss-cut-every",
        type=int,
        default=3,
        help="every N-th cut outlasts member TTL + grace (node-loss failures); 0: never",
    )
    parser.add_argument("--backend", default=None, help="process|docker|auto (default: env)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(threadName)s %(levelname)s %(message)s"
    )
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"chaos seed {seed}", flush=True)
    config = ChaosConfig(
        seed=seed, duration=args.duration, tasks=args.tasks, loss_cut_every=args.loss_cut_every
    )
    with EtcdCluster(3, backend=args.backend) as cluster:
        report = run_chaos(cluster, config)
    for line in report.fault_log:
        print("fault:", line)
    for line in report.excused:
        print("excused:", line)
    for line in report.violations:
        print("VIOLATION:", line)
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    sys.exit(main())
