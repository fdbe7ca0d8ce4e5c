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
  calls, concurrency;
- a client thread that makes ``tasks`` adds (``nodes=None``: the live nodes) over the fault
  phase, some of them on an id used before (a new run replaces a terminal one; a STARTED one
  refuses), a share of them with a `RunPolicy` (2-3 attempts, a short backoff, some with a
  deadline of a few seconds); it cancels a random fraction of the runs a little later, and
  pauses others (a third of those with a policy, a tenth of the rest), then resumes them (or
  cancels them while PAUSED); every call and what it returned (ok / refused / ambiguous) is
  in its `ClientLedger`;
- an observer: a `ResumableWatch` of the whole prefix on its own client, recording every run's
  history (the terminal state it reached, when it was seen PAUSED and STARTED again, its run
  state and attempt counters, and the membership changes), since terminal runs are removed
  after ``completed_task_ttl``;
- the fault loop (the calling thread): kill the leader, kill a follower, pause a member, cut
  ``node-c`` off (block its three proxies) for ``cut_seconds`` > ``member_ttl`` (sometimes
  killing the leader during the cut), with short calm periods between faults.

Then the end phase: heal everything, let the client finish, wait until every STARTED run waits
only on hanging functions, cancel those runs (the one way a hang ends) and any run still PAUSED,
wait until every run is terminal and the cluster holds no task after the TTL, and check:

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
4. after the TTL: no task, outcome, run state, attempt, run or progress key left; every
   ThreadProvider's local set empty and ``Scheduler.running()`` empty; after ``stop()``: no key
   at all under the prefix (memberships revoked) and no thread of ours left;
5. the cut really outlasted ``node-c``'s member TTL: the observer saw its membership go during
   a cut, and it came back;
6. the run policy (see `check_policy`): no run starts on a node while its task is PAUSED (the
   Task a provider is given is never PAUSED, and no start falls inside a pause the observer
   saw, past a detection latency ``pause_latency`` and any fault that may have delayed that
   node's view); no run stays STARTED past its deadline plus `ChaosConfig.deadline_slack`, and
   a run FAILED ``deadline exceeded`` ran at least its deadline; attempts never exceed
   ``max_attempts`` (the counters, and a node's starts of a run are at most ``max_attempts``
   plus the run's resumes; this scenario restarts no Scheduler).

Node-loss semantics checked: by default every cut is shorter than ``node_loss_grace``
(``cut_seconds`` < grace), so no run may fail for node loss at all, and the cut node's runs
(including hanging ones) go on and end normally: its completions and failures recorded while
cut off are delivered afterwards, and it never starts a run a second time. With
``loss_cut_every=N`` (the by-hand mode's default), every N-th cut lasts longer than member TTL +
grace: then a FAILED run with ``failed_node`` node-c and an error ``node lost: ...`` is
legitimate exactly when such a
long cut overlapped its life; a node-loss failure naming any other node, or outside a long cut,
is a violation.

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
    MemberKey,
    NodesKey,
    OutcomeKey,
    StateKey,
    TaskKey,
    prefix_range_end,
)
from distributedtask.records import RunState
from distributedtask.testing.etcd import EtcdCluster, wait_until
from distributedtask.testing.proxy import TcpProxy

__all__ = ["ChaosConfig", "ChaosReport", "main", "run_chaos"]

log = logging.getLogger("tests.chaos")

NS = "chaos"
NODES = ("node-a", "node-b", "node-c")
CUT_NODE = "node-c"
OUR_THREAD_PREFIXES = ("dtask-", "distributedtask-", "chaos-")
_LOSS = re.compile(r"^node lost")
_DEADLINE = re.compile(r"^deadline exceeded")

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


def attempt_of(task: dt.Task) -> int:
    """``TaskContext.attempt`` of a run started with ``task``."""
    return 1 + max(task.attempts.values(), default=0)


class ChaosProvider(dt.ThreadProvider):
    """A ThreadProvider whose runs complete, fail or hang at random, and that keeps a ledger."""

    def __init__(self, node: str, config: ChaosConfig) -> None:
        super().__init__(self._function)
        self.node = node
        self.config = config
        self.ledger = NodeLedger(node)
        self._states: dict[int, _RunState] = {}  # id() of the Task given -> its start

    def set_completion_recorder(self, recorder: dt.TaskCompletionRecorder) -> None:
        super().set_completion_recorder(_LedgerRecorder(recorder, self.ledger))

    def start_task(self, task: dt.Task) -> dt.TaskHandle:
        state = self.ledger.start(task, attempt_of(task))  # active from here
        with self.ledger.lock:
            # by the Task object: a run started again must not find an earlier start's state
            self._states[id(task)] = state
        return _Handle(super().start_task(task), state, self.ledger)

    def _function(self, task: dt.Task, context: dt.TaskContext) -> None:
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


class Observer:
    """Follows the whole prefix; keeps every run's history and membership changes."""

    def __init__(self, client: dt.EtcdClient, manager: dt.Manager) -> None:
        self.manager = manager
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
                self.records, self.outcomes, self.node_lists = {}, {}, {}
                self.states, self.done, self.attempts = {}, {}, {}
                members: set[str] = set()
                for kv in batch.kvs:
                    touched |= self._apply(kv, deleted=False, members=members)
                for node in members - self.members:
                    self.member_events.append((now, node, "up"))
                for node in self.members - members:
                    self.member_events.append((now, node, "down"))
                self.members = members
            else:
                touched = set()
                for event in batch.events:
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

    def _note(self, task_id: str, now: float) -> None:
        record = self.records.get(task_id)
        if record is None:
            return
        kvs = [
            record,
            *self.done.get(task_id, {}).values(),
            *self.attempts.get(task_id, {}).values(),
        ]
        for part in (self.outcomes, self.node_lists, self.states):
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

    def lapses(self, node: str) -> list[float]:
        """When ``node``'s membership disappeared."""
        with self.lock:
            return [when for when, n, what in self.member_events if n == node and what == "down"]


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
    return _Plan(task_id, payload, policy, cancel_after, pause_after, hold, cancel_paused)


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
                task = manager.add_task(NS, plan.task_id, plan.payload, policy=plan.policy)
            except dt.EtcdError:
                with ledger.lock:
                    ledger.ambiguous_adds.append(plan.task_id)
            except dt.NoEligibleNodesError:
                with ledger.lock:
                    ledger.refused_adds["no eligible nodes"] += 1
            except dt.TaskAlreadyRunningError:
                with ledger.lock:
                    ledger.refused_adds["already running"] += 1
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
        self.cluster.wait_healthy()
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
    # starts inside a pause, on a node a fault may have kept behind (not violations)
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
            f"{len(self.excused)} starts in a pause excused by a fault; "
            f"starts a/b/c {starts}, terminations {self.terminations}, max concurrent "
            f"{self.max_concurrent}; checked [{', '.join(self.checked)}] -> {verdict}"
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
        if status is dt.TaskStatus.FINISHED:
            if completed != set(task.nodes):
                v.append(f"{run}: FINISHED but only {sorted(completed)} of {sorted(task.nodes)}")
            if task.finished_nodes != task.nodes:
                v.append(f"{run}: FINISHED with finished_nodes {sorted(task.finished_nodes)}")
        if status is dt.TaskStatus.FAILED and loss_node is None and not deadline_failed:
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
        if not cancel_maybe and not loss_ok:
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
        elif fault.kind in ("kill-leader", "kill-follower"):
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
            # added after the pause: then its view held the pause.
            for pause in h.pauses:
                calls = [c for c in pause_calls if c.began <= pause.seen]
                after = calls[-1].began if calls else -1.0
                until = min(
                    [pause.ended or math.inf, *(c.began for c in resumes if c.began >= after)]
                )
                learnt = _learnt_by(pause.seen, latency, windows[node])
                for state in seq:
                    if not pause.seen + latency < state.at < until:
                        continue
                    known = max((r for at, r in revisions[node] if at <= state.at), default=0)
                    what = (
                        f"{node}: started {run} (attempt {state.attempt}) at "
                        f"+{state.at - began:.1f}s while PAUSED: seen paused at "
                        f"+{pause.seen - began:.1f}s (revision {pause.revision}), resumed at "
                        f"+{until - began:.1f}s"
                    )
                    if state.at <= learnt and known < pause.revision:
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


def _settled(
    manager: dt.Manager, ledgers: dict[str, NodeLedger], pending: list[str]
) -> tuple[list[dt.Task], list[dt.Task]] | None:
    """``(STARTED tasks, PAUSED tasks)`` when each STARTED one waits only on hanging
    functions (their current attempt: an earlier one may have failed), else None."""
    pending.clear()
    tasks = manager.list_tasks().get(NS, [])
    started = [t for t in tasks if t.status is dt.TaskStatus.STARTED]
    paused = [t for t in tasks if t.status is dt.TaskStatus.PAUSED]
    for task in started:
        run = _run_of(task)
        for node in sorted(task.nodes - task.finished_nodes):
            ledger = ledgers[node]
            with ledger.lock:
                hanging = run in ledger.hanging
                completed = run in ledger.completions
            if not hanging or completed:
                what = (
                    "completed, not yet delivered"
                    if completed
                    else "not hanging there (running, backing off, or failure not delivered)"
                )
                pending.append(f"{run} on {node}: {what}")
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
        observer = Observer(
            new_client(endpoints[2:] + endpoints[:2]),
            dt.Manager(clients[-1], prefix=config.prefix, completed_task_ttl=ttl),
        )
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
            lambda: _settled(driver, providers_ledgers(providers), pending),
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
