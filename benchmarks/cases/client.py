"""Case 6, client overhead: one round trip (a range of one key) through our ``EtcdClient``,
through raw etcd3gw on a session configured like ours, through raw etcd3gw with its defaults,
and through plain ``http.client`` on one keep-alive connection, all to the same etcd.

The four run in turn, in blocks of 50 round trips, the order rotating, so noise is shared; the
figure of each is the median over its blocks of the mean time per round trip. The differences
say where the time goes: ``http.client`` is etcd plus HTTP (the floor); tuned etcd3gw minus
that is requests and etcd3gw; etcd3gw's defaults minus tuned is the session settings
(proxy/netrc lookups per call); ours minus tuned etcd3gw is our wrapper (retry policy, error
translation, result parsing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import (
    CaseResult,
    Env,
    PlainHttp,
    Row,
    b64,
    median,
    raw_gateway,
    say,
)

KEY = "client"
TITLE = "Client overhead"
GOAL = "no goal in the issue: where the time goes; ours should be <= 1x raw etcd3gw defaults"
BLOCK = 50


def run(env: Env) -> CaseResult:
    blocks = env.size(30, 8)
    key = env.prefix("client").encode() + b"/k"
    body = {"key": b64(key)}
    ours = env.client()
    ours.put(key, b"value")
    tuned = raw_gateway(env.endpoint)
    defaults = raw_gateway(env.endpoint, tuned=False)
    plain = PlainHttp(env.endpoint)
    tuned_url = tuned.get_url("/kv/range")
    clients: dict[str, Callable[[], Any]] = {
        "EtcdClient (ours)": lambda: ours.range(key),
        "etcd3gw, tuned session": lambda: tuned.post(tuned_url, json=body),
        "etcd3gw, defaults": lambda: defaults.post(defaults.get_url("/kv/range"), json=body),
        "http.client keep-alive": lambda: plain.post("kv/range", body),
    }
    per_op: dict[str, list[float]] = {name: [] for name in clients}
    say(f"client: {blocks} blocks of {BLOCK} round trips per client, interleaved")
    try:
        for call in clients.values():  # warm: connections, API discovery
            for _ in range(5):
                call()
        names = list(clients)
        for block in range(blocks):  # rotate the order, so none always follows the same one
            for name in names[block % len(names) :] + names[: block % len(names)]:
                call = clients[name]
                t0 = time.perf_counter()
                for _ in range(BLOCK):
                    call()
                per_op[name].append((time.perf_counter() - t0) / BLOCK * 1e6)
    finally:
        ours.close()
        tuned.session.close()
        defaults.session.close()
        plain.close()
    us = {name: median(values) for name, values in per_op.items()}
    mine, tune, default, floor = (us[name] for name in clients)
    rows = [
        Row(
            "EtcdClient round trip",
            mine,
            default,
            "µs",
            "etcd3gw defaults",
            "<= 1x",
            mine <= default,
        ),
        Row("EtcdClient round trip vs the floor", mine, floor, "µs", "http.client keep-alive"),
        Row("etcd3gw tuned session round trip", tune, floor, "µs", "http.client keep-alive"),
        Row("etcd3gw defaults round trip", default, floor, "µs", "http.client keep-alive"),
        Row("where: etcd + HTTP (http.client)", floor, None, "µs"),
        Row("where: requests + etcd3gw (tuned - http.client)", tune - floor, None, "µs"),
        Row("where: etcd3gw default session (defaults - tuned)", default - tune, None, "µs"),
        Row("where: our wrapper (ours - tuned)", mine - tune, None, "µs"),
    ]
    data = {"us_per_round_trip": us, "blocks_us": per_op}
    return CaseResult(KEY, TITLE, GOAL, rows, rows[0].name, data)
