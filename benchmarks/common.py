"""What every case shares: result rows, statistics, the etcd under test, the raw clients.

A case is a function ``run(env) -> CaseResult``. Its figures are :class:`Row` s: a measured value,
a baseline value measured in the same run on the same etcd, their ratio, and a goal with whether
it is met (``met is None`` for a figure that is only informative).
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import etcd3gw
import requests
import requests.adapters

from distributedtask import EtcdClient
from distributedtask.testing.etcd import EtcdServer

NS = "bench"
"""The namespace of every benchmark task."""


# ---- results ------------------------------------------------------------------------------


@dataclass
class Row:
    """One figure: ``measured`` against ``baseline`` (same unit), and the goal it must show."""

    name: str
    measured: float | None
    baseline: float | None
    unit: str
    baseline_name: str = ""
    goal: str = ""  # "" = informative, no goal
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.measured is None or self.baseline is None or self.baseline <= 0:
            return None
        return self.measured / self.baseline

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": _round(self.measured),
            "baseline": _round(self.baseline),
            "ratio": _round(self.ratio),
            "unit": self.unit,
            "baseline_name": self.baseline_name,
            "goal": self.goal,
            "met": self.met,
            "note": self.note,
        }


@dataclass
class CaseResult:
    """A case's figures. ``headline`` names the row that stands for the case as a whole."""

    key: str
    title: str
    goal: str
    rows: list[Row]
    headline: str
    data: dict[str, Any] = field(default_factory=dict)  # raw series, for the charts

    @property
    def met(self) -> bool | None:
        verdicts = [row.met for row in self.rows if row.met is not None]
        return all(verdicts) if verdicts else None

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        head = self.row(self.headline)
        return {
            "title": self.title,
            "goal": self.goal,
            "met": self.met,
            "headline": head.name,
            "measured": _round(head.measured),
            "baseline": _round(head.baseline),
            "ratio": _round(head.ratio),
            "unit": head.unit,
            "baseline_name": head.baseline_name,
            "rows": [row.to_json() for row in self.rows],
            "data": self.data,
        }


def _round(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    if value == 0:
        return 0.0
    digits = max(3, 4 - math.floor(math.log10(abs(value))))
    return round(value, digits)


# ---- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ms(seconds: float) -> float:
    return seconds * 1000.0


# ---- progress -----------------------------------------------------------------------------

_T0 = time.monotonic()


def say(message: str) -> None:
    """One progress line on stderr, with the time since the run began."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# ---- the etcd under test, and clients of it ---------------------------------------------


METRICS = (
    "process_cpu_seconds_total",
    "etcd_network_client_grpc_sent_bytes_total",
    "etcd_network_client_grpc_received_bytes_total",
    "etcd_debugging_mvcc_events_total",
    "grpc_server_started_total",
)
"""The etcd metrics :meth:`Env.metrics` reads."""


@dataclass
class Env:
    """The etcd every case runs against, and the sizes of this run (quick or full)."""

    server: EtcdServer
    quick: bool

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def seconds(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    @staticmethod
    def prefix(name: str) -> str:
        """A fresh key prefix (same length for the same name) no other case uses."""
        return f"/bench/{name}-{uuid.uuid4().hex[:10]}"

    def client(self, endpoint: str | None = None) -> EtcdClient:
        return EtcdClient(endpoint or self.endpoint, timeout=10.0)

    def metrics(self) -> dict[str, float]:
        """etcd's own counters from its metrics listener: CPU, bytes to and from clients (the
        HTTP gateway's included: it is a gRPC client of etcd in the same process), watch events
        delivered (one per key and watcher), and gRPC requests by method. A labelled series is
        keyed as etcd prints it, e.g. ``grpc_server_started_total{grpc_method="Put",...}``; see
        :func:`series_sum`."""
        text = requests.get(f"{self.server.metrics_url}/metrics", timeout=5).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name.partition("{")[0] in METRICS:
                out[name] = float(value)
        return out


def series_sum(metrics: Mapping[str, float], name: str, **labels: str) -> float:
    """The sum of the series of ``name`` in ``metrics`` (:meth:`Env.metrics`) that carry every
    label given, e.g. ``series_sum(m, "grpc_server_started_total", grpc_type="unary")``: the
    unary requests etcd has handled."""
    wanted = [f'{label}="{value}"' for label, value in labels.items()]
    total = 0.0
    for series, value in metrics.items():
        base, _, rest = series.partition("{")
        if base == name and all(w in rest.rstrip("}").split(",") for w in wanted):
            total += value
    return total


def host_port(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def tuned_session() -> requests.Session:
    """A session configured as EtcdClient configures its own (DESIGN.md): the fair baseline."""
    session = requests.Session()
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=64, max_retries=0)
    session.mount("http://", adapter)
    return session


def raw_gateway(endpoint: str, *, tuned: bool = True) -> etcd3gw.Etcd3Client:
    """A raw etcd3gw client: ``tuned`` = the session and api path EtcdClient uses; otherwise
    etcd3gw's defaults (its own session with trust_env, API version discovery, no timeout)."""
    host, port = host_port(endpoint)
    if not tuned:
        return etcd3gw.Etcd3Client(host=host, port=port)
    return etcd3gw.Etcd3Client(
        host=host, port=port, timeout=(2.0, 10.0), api_path="/v3/", session=tuned_session()
    )


class PlainHttp:
    """The floor: one keep-alive ``http.client`` connection posting JSON to the gateway."""

    def __init__(self, endpoint: str) -> None:
        host, port = host_port(endpoint)
        self._conn = http.client.HTTPConnection(host, port, timeout=10)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        self._conn.request(
            "POST",
            "/v3/" + path,
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        response = self._conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
        return json.loads(data)

    def close(self) -> None:
        self._conn.close()


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def range_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def rewrite_body(node: Any, old: bytes, new: bytes, revisions: Mapping[int, int]) -> Any:
    """A copy of a gateway request body for another prefix: every ``key``/``range_end`` that
    starts with ``old`` starts with ``new`` instead (same length, same size), and each MOD
    compare's ``mod_revision`` is mapped through ``revisions`` (ours -> the replay's)."""
    if isinstance(node, list):
        return [rewrite_body(item, old, new, revisions) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for field_name, value in node.items():
        if field_name in ("key", "range_end") and isinstance(value, str):
            raw = base64.b64decode(value)
            if raw.startswith(old):
                raw = new + raw[len(old) :]
            out[field_name] = base64.b64encode(raw).decode("ascii")
        elif field_name == "mod_revision" and node.get("target") == "MOD":
            out[field_name] = revisions.get(int(value), int(value))
        else:
            out[field_name] = rewrite_body(value, old, new, revisions)
    return out


class RecordingClient(EtcdClient):
    """An EtcdClient that remembers what it sent.

    ``capture(log)`` makes the calling thread append ``(path, body, response)`` of each of its
    unary calls to ``log`` (``None`` stops); ``paths`` counts every call and stream by path.
    The extra cost is a dict update and a list append per call.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._local = threading.local()
        self._paths_lock = threading.Lock()
        self.paths: Counter[str] = Counter()

    def capture(self, log: list[tuple[str, Any, Any]] | None) -> None:
        self._local.log = log

    def call(self, path: str, body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        data, ambiguous = super().call(path, body)
        with self._paths_lock:
            self.paths[path] += 1
        log = getattr(self._local, "log", None)
        if log is not None:
            log.append((path, body, data))
        return data, ambiguous

    def stream(self, path: str, body: Mapping[str, Any], read_timeout: float) -> Any:
        with self._paths_lock:
            self.paths[path] += 1
        return super().stream(path, body, read_timeout)

    def reset_paths(self) -> None:
        with self._paths_lock:
            self.paths.clear()


# ---- running things at once ---------------------------------------------------------------


def run_threads(jobs: Sequence[Callable[[], None]]) -> float:
    """Run each job on its own thread, released together; the wall time until all end."""
    t0, t1 = run_threads_at(jobs)
    return t1 - t0


def run_threads_at(jobs: Sequence[Callable[[], None]]) -> tuple[float, float]:
    """Run each job on its own thread, released together; ``perf_counter`` at the release and
    when the last ended. Raises the first exception a job raised."""
    barrier = threading.Barrier(len(jobs) + 1)
    errors: list[BaseException] = []

    def wrap(job: Callable[[], None]) -> None:
        barrier.wait()
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(job,), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    barrier.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    t1 = time.perf_counter()
    if errors:
        raise errors[0]
    return t0, t1
