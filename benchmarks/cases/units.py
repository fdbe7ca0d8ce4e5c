"""Case 9, units: one task of 10,000 units on K = 10 nodes, a unit function that does nothing.

Our side: K Schedulers in this process (node-000, node-001, ...), each with its own EtcdClient,
Manager and CollectorRegistry (as on its own machine), serving one namespace with
``ThreadProvider(nothing, unit_concurrency=4)``; default options otherwise. An admin Manager
adds one task of U units (``u00000``, ``u00001``, ...) on the K nodes and waits for it
(``wait_for_task``); the figure is the time from the add being issued until that returns.
Every node's client (:class:`UnitCounter`) counts the requests it sends, by kind
(:func:`kind_of`): a unit's **ticket**, **claim**, **completion** (which may also take the
node's next ticket, units.py) and progress write; and what a node costs once per run, whatever
the number of units: the read of the run and its declared units, the read of the units it
holds, the look for lost hand-outs, tickets drawn past the end of the list, the
acknowledgement of the completed group. Lease refreshes are counted apart (per node and time).

- round trips per unit: (tickets that named a unit + claims + completions + unit progress
  writes) / U; the run's cost per node is a row of its own, and so is everything from the add
  to FINISHED, over U.
- etcd bytes sent per unit transition (a claim or a completion: 2 per unit): etcd's
  ``etcd_network_client_grpc_sent_bytes_total`` from the add to FINISHED (what the HTTP gateway
  serves included: fan-out case), less what an idle window of the same Schedulers just before
  the add sent at that rate (lease refreshes, progress notifications), over 2U. At K = 10 and
  K = 50 (4 and 8 with --quick), same U; the goal is that it stays flat in K: a transition
  reaches the etcd member that serves it and no Scheduler (no watch covers unit keys), and
  what every node costs once per run is spread over the units. An informative row takes out
  the reads of the declared units that were counted (one per node, one by the admin), at the
  stored declaration's size (read back after the run): every node makes one, of O(U) bytes.

Baseline, raw etcd3gw doing the minimum, in the same run: K threads (K = 10), each with its own
client (a session configured as ours), taking every K-th of the same U unit ids, and for each
one CAS claim (``IF create_revision(key) == 0 THEN put key IN_PROGRESS``) and one put (the
completion): two round trips a unit, from the release until the last thread ended. It runs
before and after our K = 10 run, and our time is compared with the mean of the two, so a
change of the machine's load during the case hits both sides alike. The CPU this process
used (``time.process_time``, every thread) and etcd's own CPU are reported for both, per unit.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks.common import (
    NS,
    CaseResult,
    Env,
    Row,
    b64,
    ms,
    raw_gateway,
    run_threads,
    run_threads_at,
    say,
    series_sum,
)
from distributedtask import EtcdClient, Manager, Scheduler, Task, TaskStatus, ThreadProvider
from distributedtask.keys import Keys

KEY = "units"
TITLE = "Units"
GOAL = (
    "<= 3 round trips per unit; add -> FINISHED <= 2x raw (a CAS claim and a put per unit); "
    "etcd bytes per unit transition flat in the number of nodes"
)
CONCURRENCY = 4  # unit_concurrency of every node's ThreadProvider
TRIPS_GOAL = 3.0
TIME_FACTOR = 2.0
FLAT = 1.25  # "flat": bytes per transition at the largest K within 1.25x those at the smallest
TIMEOUT = 900.0
TASK_ID = "units"
SENT = "etcd_network_client_grpc_sent_bytes_total"
CPU = "process_cpu_seconds_total"

UNIT_KINDS = ("ticket", "claim", "completion", "progress")
"""The kinds of request a unit costs (:func:`kind_of`)."""


def _nothing(task: Task, context: Any) -> None:
    """The unit function: does nothing, reports no progress."""


# ---- counting requests by kind -----------------------------------------------------------


def _key(op: Mapping[str, Any]) -> bytes:
    body: Any = next(iter(op.values()), {}) if op else {}
    return base64.b64decode(body.get("key", "")) if isinstance(body, dict) else b""


@dataclass(frozen=True)
class RunKeys:
    """The keys of one unit run that :func:`kind_of` tells requests apart by."""

    run: bytes  # Keys.unit_run: prefix of every per-unit key of the run
    decl: bytes  # Keys.unit_decl: the declared units
    units: int  # how many units the run has (none with affinity)

    @classmethod
    def of(cls, keys: Keys, namespace: str, task_id: str, units: int) -> RunKeys:
        return cls(keys.unit_run(namespace, task_id), keys.unit_decl(namespace, task_id), units)


def _ticket(data: Mapping[str, Any]) -> int:
    """The number a ticket request drew (the counter's version in its second response)."""
    try:
        kvs = data["responses"][1]["response_range"].get("kvs") or []
        return int(kvs[0]["version"]) if kvs else 0
    except (KeyError, IndexError, TypeError, ValueError):
        return 0


def kind_of(path: str, body: Mapping[str, Any], run: RunKeys, data: Mapping[str, Any]) -> str:
    """What a request is: ``ticket``, ``claim``, ``completion``, ``progress`` (a unit's; a
    completion may also take the node's next ticket); ``ticket past the end`` (a ticket of a
    list already handed out: one per node or worker, as its list runs out);
    ``declaration read`` (a read of the run that includes its declared units), ``held read``
    (the units a node holds), ``hand-out check`` and ``claim listing`` (the look for lost
    hand-outs: a count, then the claim keys when the count is short), ``group
    acknowledgement`` (a node's read or write of the groups whose ``group_completed`` it
    ran), ``unit other`` (another write or read of the run's unit keys: a failure, a
    give-back, a pooled claim); ``lease`` (grant, refresh, revoke) or ``other <path>``."""
    if path.startswith("lease/"):
        return "lease"
    if path != "kv/txn":
        return f"other {path}"
    success = body.get("success") or []
    if not success:
        return "other kv/txn"
    if any("request_range" in o and _key(o) == run.decl for o in success):
        return "declaration read"
    first, op = _key(success[0]), next(iter(success[0]))
    if not first.startswith(run.run):
        return "other kv/txn"
    rest = first[len(run.run) :]
    if op == "request_put" and rest == b"ticket":
        return "ticket" if 0 < _ticket(data) <= run.units else "ticket past the end"
    if op == "request_put" and rest.startswith(b"aticket/"):
        return "ticket"
    if op == "request_put" and rest.startswith(b"claim/"):
        if any(
            c.get("target") == "CREATE" and _key({"": c}) == first
            for c in body.get("compare") or []
        ):
            return "claim"
        if any("request_put" in o and _key(o) == run.run + b"count" for o in success):
            return "completion"
    if op == "request_put" and rest.startswith(b"progress/"):
        return "progress"
    if rest.startswith(b"acks/"):
        return "group acknowledgement"
    if op == "request_range":
        if rest.startswith(b"held/"):
            return "held read"
        if rest == b"claim/":
            return "hand-out check" if success[0][op].get("count_only") else "claim listing"
    return "unit other"


class UnitCounter(EtcdClient):
    """An EtcdClient that counts its requests by :func:`kind_of` (streams as ``watch``) once
    ``run`` is set. The extra cost is a few dict lookups per call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run: RunKeys | None = None
        self._lock = threading.Lock()
        self.kinds: Counter[str] = Counter()

    def call(self, path: str, body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        data, ambiguous = super().call(path, body)
        if self.run is not None:
            kind = kind_of(path, body, self.run, data)
            with self._lock:
                self.kinds[kind] += 1
        return data, ambiguous

    def stream(self, path: str, body: Mapping[str, Any], read_timeout: float) -> Any:
        if self.run is not None:
            with self._lock:
                self.kinds["watch"] += 1
        return super().stream(path, body, read_timeout)

    def take(self) -> Counter[str]:
        """The counts so far, and start again from zero."""
        with self._lock:
            out, self.kinds = self.kinds, Counter()
        return out


# ---- our side ------------------------------------------------------------------------------


def _counters(env: Env) -> tuple[float, float]:
    metrics = env.metrics()
    return metrics[SENT], metrics[CPU]


def _ours(env: Env, k: int, units: Sequence[str], idle: float) -> dict[str, Any]:
    """One task of ``units`` on ``k`` Schedulers, from add to FINISHED: its figures."""
    nodes = [f"node-{i:03d}" for i in range(k)]
    prefix = env.prefix("units")
    clients = [UnitCounter(env.endpoint, timeout=30.0) for _ in nodes]
    admin = UnitCounter(env.endpoint, timeout=30.0)
    manager = Manager(admin, prefix=prefix)
    manager.ensure_format()  # the prefix is in use: the add is one transaction
    providers = [ThreadProvider(_nothing, unit_concurrency=CONCURRENCY) for _ in nodes]
    schedulers = [
        Scheduler(
            Manager(client, prefix=prefix),
            node_id=node,
            providers={NS: provider},
            registry=CollectorRegistry(),
        )
        for client, node, provider in zip(clients, nodes, providers, strict=True)
    ]
    started: list[Scheduler] = []
    lock = threading.Lock()

    def start(scheduler: Scheduler) -> Callable[[], None]:
        def go() -> None:
            scheduler.start()
            with lock:
                started.append(scheduler)

        return go

    run = RunKeys.of(manager.keys, NS, TASK_ID, len(units))
    try:
        run_threads([start(s) for s in schedulers])
        time.sleep(idle)  # settled: the starts' requests and events are over
        for client in [*clients, admin]:
            client.run = run
            client.take()
        idle0, t_idle0 = _counters(env), time.perf_counter()
        time.sleep(idle)
        idle1, t_idle1 = _counters(env), time.perf_counter()
        idle_kinds = Counter[str]()
        for client in clients:
            idle_kinds.update(client.take())
        admin.take()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        task = manager.add_task(NS, TASK_ID, nodes=nodes, units=units)
        final = manager.wait_for_task(NS, task.id, task.version, timeout=TIMEOUT)
        t1 = time.perf_counter()
        cpu1 = time.process_time()
        busy, t_busy = _counters(env), time.perf_counter()
        kinds = Counter[str]()
        for client in clients:
            kinds.update(client.take())
        admin_kinds = admin.take()
        assert final.status is TaskStatus.FINISHED, final
        decl = admin.range(manager.keys.unit_decl(NS, TASK_ID)).first()
        assert decl is not None
    finally:
        run_threads([s.stop for s in started] or [lambda: None])
        for client in [*clients, admin]:
            client.close()
    took = t1 - t0
    rate = (idle1[0] - idle0[0]) / (t_idle1 - t_idle0)
    sent = busy[0] - idle1[0] - rate * (t_busy - t_idle1)
    reads = kinds["declaration read"] + admin_kinds["declaration read"]
    unit_trips = sum(kinds[kind] for kind in UNIT_KINDS)
    fixed = {
        kind: count for kind, count in kinds.items() if kind not in (*UNIT_KINDS, "lease", "watch")
    }
    unary_admin = sum(c for kind, c in admin_kinds.items() if kind != "watch")
    all_trips = sum(c for kind, c in kinds.items() if kind not in ("lease", "watch"))
    return {
        "k": k,
        "units": len(units),
        "time_s": took,
        "kinds": dict(kinds),
        "admin_kinds": dict(admin_kinds),
        "idle_kinds": dict(idle_kinds),
        "trips_per_unit": unit_trips / len(units),
        "all_trips_per_unit": (all_trips + unary_admin) / len(units),
        "fixed_per_node": sum(fixed.values()) / k,
        "fixed": fixed,
        "lease_per_node_s": kinds["lease"] / k / took,
        "sent_bytes": sent,
        "idle_bytes_s": rate,
        "bytes_per_transition": sent / (2 * len(units)),
        "declaration_bytes": len(decl.value),
        "declaration_reads": reads,
        "bytes_per_transition_less_declarations": (sent - reads * len(decl.value))
        / (2 * len(units)),
        "client_cpu_s": cpu1 - cpu0,
        "etcd_cpu_s": busy[1] - idle1[1],
    }


# ---- the raw baseline ------------------------------------------------------------------------


def _raw(env: Env, threads: int, units: Sequence[str]) -> dict[str, Any]:
    """The minimum, with raw etcd3gw: per unit one CAS claim and one put, from ``threads``
    threads with a client each, every thread taking every ``threads``-th unit."""
    prefix = env.prefix("unitsraw")
    gws = [raw_gateway(env.endpoint) for _ in range(threads)]
    for gw in gws:  # a connection each, as our clients have theirs
        gw.post(gw.get_url("/kv/range"), json={"key": b64(f"{prefix}/warm")})

    def job(i: int) -> Callable[[], None]:
        gw = gws[i]
        node = f"node-{i:03d}"
        claimed = json.dumps({"status": "IN_PROGRESS", "node": node})
        completed = json.dumps({"status": "COMPLETED", "node": node})

        def work() -> None:
            for unit in units[i::threads]:
                key = b64(f"{prefix}/claim/{unit}")
                answer = gw.transaction(
                    {
                        "compare": [
                            {
                                "key": key,
                                "target": "CREATE",
                                "result": "EQUAL",
                                "create_revision": 0,
                            }
                        ],
                        "success": [{"request_put": {"key": key, "value": b64(claimed)}}],
                        "failure": [],
                    }
                )
                if not answer.get("succeeded"):
                    raise AssertionError(f"raw claim of {unit} lost")
                gw.put(f"{prefix}/claim/{unit}", completed)

        return work

    try:
        metrics0 = env.metrics()
        cpu0 = time.process_time()
        t0, t1 = run_threads_at([job(i) for i in range(threads)])
        cpu1 = time.process_time()
        metrics1 = env.metrics()
    finally:
        for gw in gws:
            gw.session.close()

    def delta(name: str, **labels: str) -> float:
        return series_sum(metrics1, name, **labels) - series_sum(metrics0, name, **labels)

    return {
        "units": len(units),
        "time_s": t1 - t0,
        "etcd_requests": delta("grpc_server_started_total", grpc_type="unary"),
        "bytes_per_transition": delta(SENT) / (2 * len(units)),
        "client_cpu_s": cpu1 - cpu0,
        "etcd_cpu_s": delta(CPU),
    }


# ---- the case ------------------------------------------------------------------------------


def run(env: Env) -> CaseResult:
    n = env.size(10_000, 200)
    ks = [10, 50] if not env.quick else [4, 8]
    idle = env.seconds(2.0, 0.5)
    units = [f"u{i:05d}" for i in range(n)]
    k0, k1 = ks
    say(f"units: {n} units; raw etcd3gw ({k0} threads), ours on {k0} nodes, raw again")
    raws = [_raw(env, k0, units)]
    say(f"units: raw {ms(raws[0]['time_s']):,.0f} ms")
    small = _ours(env, k0, units, idle)
    say(
        f"units: K={k0}: {ms(small['time_s']):,.0f} ms to FINISHED, "
        f"{small['trips_per_unit']:.3f} round trips per unit, "
        f"{small['bytes_per_transition']:.0f} bytes per transition; requests {small['kinds']}"
    )
    raws.append(_raw(env, k0, units))
    say(f"units: raw again {ms(raws[1]['time_s']):,.0f} ms")
    large = _ours(env, k1, units, idle)
    say(
        f"units: K={k1}: {ms(large['time_s']):,.0f} ms to FINISHED, "
        f"{large['trips_per_unit']:.3f} round trips per unit, "
        f"{large['bytes_per_transition']:.0f} bytes per transition; requests {large['kinds']}"
    )

    def mean(name: str) -> float:
        return sum(float(r[name]) for r in raws) / len(raws)

    raw_name = f"raw etcd3gw, {k0} threads: CAS claim + put"

    def trips_note(sample: dict[str, Any]) -> str:
        if sample["trips_per_unit"] <= TRIPS_GOAL:
            return ""
        return "Requests by kind: " + ", ".join(
            f"{kind} {count}" for kind, count in sorted(sample["kinds"].items())
        )

    def per_node(sample: dict[str, Any]) -> str:
        return "per node: " + ", ".join(
            f"{kind} {count / sample['k']:.1f}" for kind, count in sorted(sample["fixed"].items())
        )

    def bytes_note(sample: dict[str, Any]) -> str:
        if flat <= FLAT:
            return ""
        size = sample["declaration_bytes"]
        return (
            f"The declared units: {size:,} bytes for {n:,} units, {size / (2 * n):.2f} B per "
            "transition for each node that reads them."
        )

    time_met = small["time_s"] <= TIME_FACTOR * mean("time_s")
    flat = large["bytes_per_transition"] / small["bytes_per_transition"]
    trips = "round trips per unit (tickets, claims, completions)"
    rows = [
        Row(
            f"add -> FINISHED, {n:,} units on K={k0}",
            small["time_s"],
            mean("time_s"),
            "s",
            raw_name,
            f"<= {TIME_FACTOR:g}x raw",
            time_met,
        ),
        Row(
            f"{trips}, K={k0}",
            small["trips_per_unit"],
            2.0,
            "trips",
            "raw: CAS claim + put",
            f"<= {TRIPS_GOAL:g}",
            small["trips_per_unit"] <= TRIPS_GOAL,
            trips_note(small),
        ),
        Row(
            f"{trips}, K={k1}",
            large["trips_per_unit"],
            2.0,
            "trips",
            "raw: CAS claim + put",
            f"<= {TRIPS_GOAL:g}",
            large["trips_per_unit"] <= TRIPS_GOAL,
            trips_note(large),
        ),
        Row(
            f"etcd bytes sent per unit transition, K={k1}",
            large["bytes_per_transition"],
            small["bytes_per_transition"],
            "B",
            f"K={k0}, same run",
            f"<= {FLAT:g}x (flat in K)",
            flat <= FLAT,
            bytes_note(small),
        ),
        Row(
            f"the same, less the reads of the declared units (one per node), K={k1}",
            large["bytes_per_transition_less_declarations"],
            small["bytes_per_transition_less_declarations"],
            "B",
            f"K={k0}, same run",
        ),
        Row(
            f"etcd bytes sent per unit transition, K={k0}",
            small["bytes_per_transition"],
            mean("bytes_per_transition"),
            "B",
            "raw: CAS claim or put",
        ),
        Row(
            f"all round trips from add to FINISHED, per unit, K={k0}",
            small["all_trips_per_unit"],
            mean("etcd_requests") / n,
            "trips",
            "raw, counted by etcd",
        ),
        Row(
            f"all round trips from add to FINISHED, per unit, K={k1}",
            large["all_trips_per_unit"],
            mean("etcd_requests") / n,
            "trips",
            "raw, counted by etcd",
        ),
        Row(
            f"round trips of the run per node, not per unit, K={k0}",
            small["fixed_per_node"],
            None,
            "trips",
            note=per_node(small),
        ),
        Row(
            f"round trips of the run per node, not per unit, K={k1}",
            large["fixed_per_node"],
            None,
            "trips",
            note=per_node(large),
        ),
        Row(
            f"add -> FINISHED, {n:,} units on K={k1}",
            large["time_s"],
            mean("time_s"),
            "s",
            raw_name,
        ),
        Row(
            f"CPU of this process per unit, K={k0}",
            ms(small["client_cpu_s"]) / n,
            ms(mean("client_cpu_s")) / n,
            "ms",
            raw_name,
        ),
        Row(
            f"etcd CPU per unit, K={k0}",
            ms(small["etcd_cpu_s"]) / n,
            ms(mean("etcd_cpu_s")) / n,
            "ms",
            raw_name,
        ),
    ]
    data = {"units": n, "k": ks, "concurrency": CONCURRENCY, "ours": [small, large], "raw": raws}
    return CaseResult(KEY, TITLE, GOAL, rows, rows[0].name, data)
