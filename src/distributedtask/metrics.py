"""Prometheus metrics, created against an injected registry.

One :class:`Metrics` object per registry (created on first use and shared), so several
Schedulers in one process — or a Scheduler restarted — never register a metric twice. Every
name below is part of the contract (API.md) and is used by ``contrib/`` (dashboard, alerts):

=========================================================  =========  =======================
name                                                       type       labels
=========================================================  =========  =======================
distributedtask_tasks_running                              gauge      namespace
distributedtask_task_starts_total                          counter    namespace
distributedtask_task_terminations_total                    counter    namespace
distributedtask_local_cleanups_total                       counter    namespace
distributedtask_provider_errors_total                      counter    namespace, operation
distributedtask_start_latency_seconds                      histogram  namespace
distributedtask_watch_restarts_total                       counter    reason
distributedtask_resyncs_total                              counter
distributedtask_node_loss_failures_total                   counter    namespace
distributedtask_lease_losses_total                         counter
distributedtask_skipped_records_total                      counter
distributedtask_members                                    gauge
distributedtask_record_retries_total                       counter    operation
distributedtask_watch_events_total                         counter    range
distributedtask_retries_total                              counter    namespace
distributedtask_deadline_failures_total                    counter    namespace
distributedtask_pauses_total                               counter    namespace
distributedtask_oldest_pause_timestamp_seconds             gauge      namespace
distributedtask_units_completed_total                      counter    namespace
distributedtask_units_failed_total                         counter    namespace
distributedtask_units_reassigned_total                     counter    namespace
distributedtask_group_callbacks_total                      counter    namespace
=========================================================  =========  =======================

prometheus-client collectors are thread-safe; so is this module.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from .etcd.watch import RestartReason

__all__ = ["METRIC_NAMES", "Metrics", "metrics_for"]

METRIC_NAMES = (
    "distributedtask_tasks_running",
    "distributedtask_task_starts_total",
    "distributedtask_task_terminations_total",
    "distributedtask_local_cleanups_total",
    "distributedtask_provider_errors_total",
    "distributedtask_start_latency_seconds",
    "distributedtask_watch_restarts_total",
    "distributedtask_resyncs_total",
    "distributedtask_node_loss_failures_total",
    "distributedtask_lease_losses_total",
    "distributedtask_skipped_records_total",
    "distributedtask_members",
    "distributedtask_record_retries_total",
    "distributedtask_watch_events_total",
    "distributedtask_retries_total",
    "distributedtask_deadline_failures_total",
    "distributedtask_pauses_total",
    "distributedtask_oldest_pause_timestamp_seconds",
    "distributedtask_units_completed_total",
    "distributedtask_units_failed_total",
    "distributedtask_units_reassigned_total",
    "distributedtask_group_callbacks_total",
)


class Metrics:
    """The collectors of one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        ns = ("namespace",)
        self.tasks_running = Gauge(
            "distributedtask_tasks_running",
            "Runs this node has started and not yet terminated",
            ns,
            registry=registry,
        )
        self.task_starts = Counter(
            "distributedtask_task_starts_total", "Runs started on this node", ns, registry=registry
        )
        self.task_terminations = Counter(
            "distributedtask_task_terminations_total",
            "Runs terminated because they stopped being wanted (cancelled, failed elsewhere, "
            "replaced, removed)",
            ns,
            registry=registry,
        )
        self.local_cleanups = Counter(
            "distributedtask_local_cleanups_total",
            "Local states of runs removed by the provider",
            ns,
            registry=registry,
        )
        self.provider_errors = Counter(
            "distributedtask_provider_errors_total",
            "Exceptions raised by provider calls (each is retried with backoff)",
            (*ns, "operation"),
            registry=registry,
        )
        self.start_latency = Histogram(
            "distributedtask_start_latency_seconds",
            "From a run's startedAt to its local start",
            ns,
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.watch_restarts = Counter(
            "distributedtask_watch_restarts_total",
            "Times the etcd watch was re-established, by reason",
            ("reason",),
            registry=registry,
        )
        self.resyncs = Counter(
            "distributedtask_resyncs_total", "Full relists of the cluster state", registry=registry
        )
        self.node_loss_failures = Counter(
            "distributedtask_node_loss_failures_total",
            "Runs this node marked FAILED because an assigned node was lost",
            ns,
            registry=registry,
        )
        self.lease_losses = Counter(
            "distributedtask_lease_losses_total",
            "Times this node's membership lease was lost and granted anew",
            registry=registry,
        )
        self.skipped_records = Counter(
            "distributedtask_skipped_records_total",
            "Values under the prefix that could not be read and were skipped",
            registry=registry,
        )
        self.members = Gauge(
            "distributedtask_members", "Live members seen by this node", registry=registry
        )
        self.record_retries = Counter(
            "distributedtask_record_retries_total",
            "Completion, failure and progress records that etcd could not take at once and "
            "were retried in the background",
            ("operation",),
            registry=registry,
        )

        self.watch_events = Counter(
            "distributedtask_watch_events_total",
            "Key changes the Scheduler's watches received, by range (cluster: task records, "
            "outcomes, members; assign: this node's assignment bucket)",
            ("range",),
            registry=registry,
        )

        self.retries = Counter(
            "distributedtask_retries_total",
            "Failed attempts of this node that its run policy retries",
            ns,
            registry=registry,
        )
        self.deadline_failures = Counter(
            "distributedtask_deadline_failures_total",
            "Runs this node marked FAILED because their deadline passed",
            ns,
            registry=registry,
        )
        self.pauses = Counter(
            "distributedtask_pauses_total",
            "Runs this node terminated because their task was paused",
            ns,
            registry=registry,
        )
        self.oldest_pause = Gauge(
            "distributedtask_oldest_pause_timestamp_seconds",
            "When the longest-paused task of the namespace was paused (Unix time; 0: none)",
            ns,
            registry=registry,
        )

        self.units_completed = Counter(
            "distributedtask_units_completed_total",
            "Units this node completed",
            ns,
            registry=registry,
        )
        self.units_failed = Counter(
            "distributedtask_units_failed_total",
            "Failed attempts of units on this node (retried or final)",
            ns,
            registry=registry,
        )
        self.units_reassigned = Counter(
            "distributedtask_units_reassigned_total",
            "Units a lost node held, or never claimed, that this node gave back to the pool",
            ns,
            registry=registry,
        )
        self.group_callbacks = Counter(
            "distributedtask_group_callbacks_total",
            "group_completed calls this node's providers returned from",
            ns,
            registry=registry,
        )

    def touch(self, namespaces: Iterable[str]) -> None:
        """Create every labelled series of these namespaces at 0.

        A series appears at its first increment otherwise, and ``increase()`` cannot see that
        first event: a rare one (a node loss) would never alert.
        """
        for namespace in namespaces:
            for counter in (
                self.task_starts,
                self.task_terminations,
                self.local_cleanups,
                self.node_loss_failures,
                self.retries,
                self.deadline_failures,
                self.pauses,
                self.units_completed,
                self.units_failed,
                self.units_reassigned,
                self.group_callbacks,
            ):
                counter.labels(namespace=namespace)
            self.tasks_running.labels(namespace=namespace)
            self.oldest_pause.labels(namespace=namespace)
            self.start_latency.labels(namespace=namespace)
            for operation in PROVIDER_OPERATIONS:
                self.provider_errors.labels(namespace=namespace, operation=operation)
        for operation in ("complete", "fail", "progress", "unit"):
            self.record_retries.labels(operation=operation)
        for reason in WATCH_RESTART_REASONS:
            self.watch_restarts.labels(reason=reason)
        for watched in ("cluster", "assign"):
            self.watch_events.labels(range=watched)


PROVIDER_OPERATIONS = ("start", "terminate", "cleanup", "get_local_tasks", "group_completed")
WATCH_RESTART_REASONS = tuple(reason.value for reason in RestartReason)

_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()


def metrics_for(registry: CollectorRegistry | None) -> Metrics:
    """The :class:`Metrics` of ``registry`` (default: prometheus-client's global one)."""
    registry = REGISTRY if registry is None else registry
    with _lock:
        found = _by_registry.get(registry)
        if found is None:
            found = _by_registry[registry] = Metrics(registry)
        return found
