"""contrib/: the Grafana dashboard, the Prometheus rules, the systemd unit, the example provider.

- Every series the dashboard and the alert rules query is one the library exports
  (``distributedtask.metrics``), with histogram (``_bucket``/``_sum``/``_count``) and counter
  (``_total``) suffixes checked against each metric's type; the dashboard covers every metric.
- The dashboard is importable JSON: panels, a Prometheus datasource variable, valid PromQL (every
  query is checked by ``promtool`` as a recording rule, Grafana variables substituted).
- The rules parse (``promtool check rules``) and their unit tests pass (``promtool test rules
  contrib/prometheus/alerts_test.yml``). promtool comes from Debian's ``prometheus`` package;
  these tests are skipped only when it is absent.
- The systemd unit passes ``systemd-analyze verify`` (with ExecStart pointed at this venv's
  ``dtask``), else its key directives are checked as INI; its command line and node.env.example
  parse with ``dtask``'s own parser.
- The example provider loads through ``load_provider`` and runs, fails and is cancelled.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from prometheus_client import CollectorRegistry

import distributedtask as dt
from distributedtask.cli import build_parser
from distributedtask.metrics import METRIC_NAMES, Metrics
from distributedtask.node import load_provider
from distributedtask.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "contrib"
DASHBOARD = CONTRIB / "grafana" / "distributedtask.json"
ALERTS = CONTRIB / "prometheus" / "alerts.yml"
ALERTS_TEST = CONTRIB / "prometheus" / "alerts_test.yml"
UNIT = CONTRIB / "systemd" / "dtask-node.service"
NODE_ENV = CONTRIB / "systemd" / "node.env.example"
EXAMPLE = "contrib.providers.example_provider:make_provider"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)


# ---- the metrics the library exports ---------------------------------------------------------


def exported_series() -> dict[str, tuple[str, str]]:
    """Every series name a Scheduler can export -> (its METRIC_NAMES entry, its type)."""
    registry = CollectorRegistry()
    Metrics(registry)
    series: dict[str, tuple[str, str]] = {}
    for family in registry.collect():
        if family.type == "counter":
            series[f"{family.name}_total"] = (f"{family.name}_total", "counter")
        elif family.type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                series[family.name + suffix] = (family.name, "histogram")
        else:
            series[family.name] = (family.name, family.type)
    return series


def test_metric_names_match_the_collectors() -> None:
    assert {name for name, _ in exported_series().values()} == set(METRIC_NAMES)


# ---- PromQL: which metrics an expression reads -----------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][\w:]*")
_KEYWORDS = {
    "and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2", "start", "end",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _RANGE.sub("[]", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(0)
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(name)
    return names


def test_metric_names_parser() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, namespace) (rate(distributedtask_start_latency_"
        'seconds_bucket{job=~"$job", namespace="x y"}[$__rate_interval]))) / on (job) '
        "group_left (instance) max without (le) (up offset 15m) and "
        "increase(distributedtask_task_starts_total[15m]) == bool 0"
    )
    assert metric_names(expr) == {
        "distributedtask_start_latency_seconds_bucket",
        "up",
        "distributedtask_task_starts_total",
    }


def check_series(names: set[str], where: str) -> set[str]:
    """Assert every name is a series the library exports; return their METRIC_NAMES entries."""
    exported = exported_series()
    assert names, f"{where}: no metric found in the expression"
    unknown = sorted(names - set(exported))
    assert not unknown, (
        f"{where} uses {unknown}, not exported by distributedtask.metrics "
        f"(a histogram is queried as _bucket/_sum/_count, a counter as _total)"
    )
    return {exported[name][0] for name in names}


# ---- the dashboard ---------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every panel query and every query variable."""
    queries = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", text.strip())
            assert inner, f"variable {variable['name']}: unexpected query {text!r}"
            queries.append((f"variable {variable['name']}", inner.group(1)))
    return queries


def test_dashboard_is_importable_json() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"] and dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"

    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["type"] in ("timeseries", "stat", "gauge", "table", "bargauge", "heatmap")
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        for ds in [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]:
            assert ds == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]

    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in (
        "running tasks by namespace", "start rate", "termination rate", "start latency",
        "provider errors", "watch restarts", "resyncs", "node-loss", "lease losses",
        "live members", "skipped records", "record retries",
        "units completed", "unit failures", "units reassigned", "group callbacks",
    ):  # fmt: skip
        assert wanted in titles, f"no panel about {wanted!r}"


def test_dashboard_uses_only_our_metrics_and_all_of_them() -> None:
    used: set[str] = set()
    for where, expr in dashboard_queries(load_dashboard()):
        used |= check_series(metric_names(expr), f"dashboard {where}")
    assert used == set(METRIC_NAMES), f"metrics without a panel: {set(METRIC_NAMES) - used}"
    # The latency quantiles come from the histogram's buckets.
    exprs = " ".join(expr for _, expr in dashboard_queries(load_dashboard()))
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    assert "distributedtask_start_latency_seconds_bucket" in exprs


def namespaced_metrics() -> set[str]:
    """The METRIC_NAMES entries whose series carry a ``namespace`` label."""
    registry = CollectorRegistry()
    Metrics(registry).touch(["ns"])
    exported = exported_series()
    return {
        exported[sample.name][0]
        for family in registry.collect()
        for sample in family.samples
        if "namespace" in sample.labels and sample.name in exported
    }


def test_dashboard_shows_every_namespaced_metric_by_namespace() -> None:
    """A metric labelled by namespace (the units' among them) is shown per namespace: some
    query reading it groups ``by (... namespace ...)`` and filters on ``$namespace``."""
    wanted = namespaced_metrics()
    assert {
        "distributedtask_units_completed_total",
        "distributedtask_units_failed_total",
        "distributedtask_units_reassigned_total",
        "distributedtask_group_callbacks_total",
    } <= wanted
    shown: set[str] = set()
    for where, expr in dashboard_queries(load_dashboard()):
        grouped = re.search(r"\bby\s*\([^()]*\bnamespace\b[^()]*\)", expr)
        if grouped and 'namespace=~"$namespace"' in expr:
            shown |= check_series(metric_names(expr), f"dashboard {where}")
    assert wanted <= shown, f"not shown by namespace: {sorted(wanted - shown)}"


@needs_promtool
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    substitutions = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "6h",
        "$datasource": "prometheus",
    }
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (where, query) in enumerate(dashboard_queries(load_dashboard())):
        expr = query
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        expr = re.sub(r"\$\w+", ".*", expr)  # $job, $instance, $namespace in =~ matchers
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
        lines.append(f"        labels: {{where: {json.dumps(where)}}}")
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = run_promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the alert rules -------------------------------------------------------------------------


@dataclass
class Rule:
    name: str
    kind: str  # "alert" or "record"
    fields: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


_ITEM = re.compile(r"^(\s*)- (alert|record):\s*(\S.*)$")
_KEY = re.compile(r"^(\s*)([\w.-]+):\s*(.*)$")


def _scalar(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return str(json.loads(text)) if text[0] == '"' else text[1:-1].replace("''", "'")
    return text


def parse_rules(text: str) -> list[Rule]:
    """The rules of a Prometheus rules file, for the layout alerts.yml uses: ``- alert:`` items
    whose keys are scalars or block scalars (``|``, ``>-``...), and ``labels`` /
    ``annotations`` maps of those. (No YAML library is a dependency; promtool checks the real
    syntax, and the rule count is compared with promtool's.)"""
    rules: list[Rule] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        item = _ITEM.match(lines[i])
        i += 1
        if not item:
            continue
        rule = Rule(_scalar(item.group(3)), item.group(2))
        rules.append(rule)
        key_indent = len(item.group(1)) + 2
        section: dict[str, str] | None = None
        while i < len(lines):
            line = lines[i]
            if not line.strip() or line.lstrip().startswith("#"):
                i += 1
                continue
            indent = len(line) - len(line.lstrip())
            if indent < key_indent or _ITEM.match(line):
                break
            key = _KEY.match(line)
            assert key, f"cannot read line {i + 1}: {line!r}"
            name, value = key.group(2), key.group(3).strip()
            i += 1
            if indent == key_indent:
                section = {"labels": rule.labels, "annotations": rule.annotations}.get(name)
                target = rule.fields
            else:
                assert section is not None, f"line {i}: nested key outside labels/annotations"
                target = section
            if value[:1] in ("|", ">"):
                block = []
                while i < len(lines) and (
                    not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
                ):
                    block.append(lines[i].strip())
                    i += 1
                while block and not block[-1]:
                    block.pop()
                value = ("\n" if value[0] == "|" else " ").join(block)
            elif value:
                value = _scalar(value)
            if value or name not in ("labels", "annotations"):
                target[name] = value
    return rules


def load_rules() -> list[Rule]:
    return parse_rules(ALERTS.read_text())


def test_alert_rules_are_complete() -> None:
    rules = load_rules()
    names = [rule.name for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert rule.kind == "alert"
        assert rule.labels.get("severity") in ("info", "warning", "critical"), rule.name
        assert rule.annotations.get("summary"), rule.name
        assert len(rule.annotations.get("description", "")) > 40, rule.name
    exprs = {rule.name: rule.fields["expr"] for rule in rules}
    about = {
        "tasks stuck STARTED": "distributedtask_tasks_running",
        "provider errors": "distributedtask_provider_errors_total",
        "watch restarts": "distributedtask_watch_restarts_total",
        "node loss": "distributedtask_node_loss_failures_total",
        "lease losses": "distributedtask_lease_losses_total",
        "members dropping": "distributedtask_members",
        "units failing": "distributedtask_units_failed_total",
        "units given back": "distributedtask_units_reassigned_total",
    }
    for what, metric in about.items():
        assert any(metric in expr for expr in exprs.values()), f"no alert about {what}"


def test_alert_rules_use_only_our_metrics() -> None:
    for rule in load_rules():
        check_series(metric_names(rule.fields["expr"]), f"alert {rule.name}")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


@needs_promtool
def test_alert_rules_parse_with_promtool() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    found = re.search(r"SUCCESS: (\d+) rules found", output)
    assert found, output
    assert int(found.group(1)) == len(load_rules()), "the test's rule parser missed rules"


@needs_promtool
def test_alert_rules_unit_tests() -> None:
    text = ALERTS_TEST.read_text()
    for alert in (
        "DistributedTaskNodeLoss",
        "DistributedTaskProviderErrors",
        "DistributedTaskUnitsFailing",
        "DistributedTaskUnitsReassigned",
    ):
        assert re.search(rf"alertname: {alert}\n\s+exp_alerts:\n\s+- exp_labels", text), (
            f"alerts_test.yml does not show {alert} firing"
        )
    result = run_promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the systemd unit ------------------------------------------------------------------------


def read_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    return unit


def test_systemd_unit_directives() -> None:
    unit = read_unit()
    service = unit["Service"]
    assert service["ExecStart"].split()[:2] == ["/opt/distributedtask/bin/dtask", "node"]
    assert service["EnvironmentFile"] == "/etc/distributedtask/node.env"
    assert service["StateDirectory"] == "distributedtask"
    assert service.get("DynamicUser") == "yes" or service.get("User")
    expected = {
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }
    for key, value in expected.items():
        assert service.get(key) == value, key
    assert service["TimeoutStopSec"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_command_line_and_env_example_parse() -> None:
    env: dict[str, str] = {}
    for raw in NODE_ENV.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), raw
            env[key] = value
    for key in env:
        assert key.startswith("DTASK_") or key == "PYTHONPATH", key
    assert env["DTASK_ENDPOINTS"].startswith("http")
    service = read_unit()["Service"]
    env.setdefault("DTASK_NODE_ID", "node-1")
    argv = []
    for word in service["ExecStart"].split()[1:]:
        if word.startswith("${"):
            argv.append(env[word[2:-1]])
        elif word.startswith("$"):
            argv.extend(env[word[1:]].split())
        else:
            argv.append(word)
    args = build_parser().parse_args(argv)
    assert args.command == "node" and args.node_id == "node-1"
    assert args.state_dir == "/var/lib/distributedtask"
    assert "reports=contrib.providers.example_provider:make_provider" in args.provider
    assert args.metrics_port == 9464


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (the INI checks above still ran)")
    # verify insists that ExecStart's binary exists: point it at this venv's dtask.
    dtask = Path(sys.executable).with_name("dtask")
    assert dtask.exists(), dtask
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/distributedtask/bin/dtask", str(dtask)))
    result = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # Unknown or misspelt directives are only warnings on stderr: treat any output as failure.
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr
    security = subprocess.run(
        [tool, "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    if level is not None:  # systemd >= 250 rates a unit file offline
        assert float(level.group(1)) <= 2.0, security.stdout


# ---- the example provider --------------------------------------------------------------------


class FakeRecorder:
    """A TaskCompletionRecorder that remembers every call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.completions: list[tuple[str, str, int]] = []
        self.failures: list[tuple[str, str, int, str]] = []
        self.progress: list[tuple[float, str]] = []

    def record_completion(self, namespace: str, task_id: str, version: int) -> None:
        with self.lock:
            self.completions.append((namespace, task_id, version))

    def record_failure(self, namespace: str, task_id: str, version: int, error: str) -> None:
        with self.lock:
            self.failures.append((namespace, task_id, version, error))

    def record_progress(
        self, namespace: str, task_id: str, version: int, fraction: float, message: str = ""
    ) -> None:
        with self.lock:
            self.progress.append((fraction, message))


def make_task(task_id: str, version: int, payload: dict[str, Any] | bytes) -> dt.Task:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return dt.Task(
        namespace="reports",
        id=task_id,
        version=version,
        payload=raw,
        status=dt.TaskStatus.STARTED,
        started_at=datetime.now(timezone.utc),
        finished_at=None,
        error=None,
        nodes=frozenset({"node-1"}),
        finished_nodes=frozenset(),
    )


@pytest.fixture
def example(tmp_path: Path) -> tuple[Any, FakeRecorder, Path]:
    state_dir = tmp_path / "state" / "reports"
    provider = load_provider(EXAMPLE, state_dir)
    assert isinstance(provider, dt.Provider)
    recorder = FakeRecorder()
    provider.set_completion_recorder(recorder)
    return provider, recorder, state_dir


def test_example_provider_runs_a_task(
    example: tuple[Any, FakeRecorder, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, recorder, state_dir = example
    monkeypatch.setenv("DTASK_NODE_ID", "node-1")
    task = make_task("nightly/2026", 7, {"title": "Nightly", "steps": 3, "step_seconds": 0})
    provider.start_task(task)
    wait_until(lambda: recorder.completions, 10, message="completion recorded")
    assert recorder.completions == [("reports", "nightly/2026", 7)]
    assert recorder.failures == []
    assert recorder.progress[0] == (0.0, "starting")
    assert recorder.progress[-1] == (1.0, "step 3/3")
    report = state_dir / quote("nightly/2026", safe="") / "7" / "report.txt"
    text = report.read_text()
    assert text.startswith("# Nightly\n")
    assert "task reports/nightly/2026 version 7 on node node-1" in text
    assert text.count("\nstep ") == 3
    assert provider.get_local_tasks() == [dt.TaskDescriptor("nightly/2026", 7)]
    provider.cleanup_task(dt.TaskDescriptor("nightly/2026", 7))
    assert not report.exists()
    assert provider.get_local_tasks() == []
    assert provider.join(5)


def test_example_provider_honours_cancellation(example: tuple[Any, FakeRecorder, Path]) -> None:
    provider, recorder, state_dir = example
    task = make_task("long", 3, {"steps": 1000, "step_seconds": 60})
    handle = provider.start_task(task)
    wait_until(lambda: recorder.progress, 10, message="first progress report")
    handle.terminate()
    assert provider.join(5), "the run did not stop within 5s of terminate()"
    assert recorder.completions == [] and recorder.failures == []
    assert not (state_dir / "long" / "3" / "report.txt").exists()
    assert provider.get_local_tasks() == [dt.TaskDescriptor("long", 3)]  # state is kept
    handle.terminate()  # a second terminate is a no-op


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"steps": 3, "step_seconds": 0, "fail_at": 2}, "step 2 failed on purpose"),
        (b"not json", "payload is not JSON"),
        ({"steps": 0}, "steps must be an integer in 1..1000"),
        ({"stpes": 3}, "unknown payload keys: stpes"),
    ],
)
def test_example_provider_records_failures(
    example: tuple[Any, FakeRecorder, Path], payload: dict[str, Any] | bytes, error: str
) -> None:
    provider, recorder, _ = example
    provider.start_task(make_task("bad", 5, payload))
    wait_until(lambda: recorder.failures, 10, message="failure recorded")
    ((namespace, task_id, version, message),) = recorder.failures
    assert (namespace, task_id, version) == ("reports", "bad", 5)
    assert error in message
    assert recorder.completions == []
    assert provider.join(5)


def test_example_provider_empty_payload_means_defaults() -> None:
    from contrib.providers.example_provider import ReportRequest, parse_payload

    assert parse_payload(b"") == ReportRequest()
    assert parse_payload(b'{"title": "t", "steps": 2, "step_seconds": 1}') == ReportRequest(
        "t", 2, 1.0, None
    )
