"""``ProviderCalls``: the one place where a Scheduler calls its providers.

Every call — ``set_completion_recorder``, ``get_local_tasks``, ``start_task``, a handle's
``terminate``, ``cleanup_task`` — goes through :meth:`ProviderCalls.call`, which never raises:
an exception of the provider is logged with the operation and the task, counted in
``distributedtask_provider_errors_total{namespace, operation}``, and reported as a failed call
so the caller retries with backoff. A provider therefore cannot stop a Scheduler.

Threading: the Scheduler makes every call from its worker thread after ``start()`` returns (and
from the thread calling ``start``/``stop`` before and after it), so a provider is never called
concurrently with itself by a Scheduler.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..metrics import Metrics
from ..model import Task, TaskDescriptor
from ..provider import Provider, TaskCompletionRecorder, TaskHandle

__all__ = ["CallResult", "ProviderCalls", "ProviderOp"]

_T = TypeVar("_T")


class ProviderOp(str, enum.Enum):
    """The provider operations; the values are the ``operation`` label of the error metric."""

    GET_LOCAL_TASKS = "get_local_tasks"
    START = "start"
    TERMINATE = "terminate"
    CLEANUP = "cleanup"
    GROUP_COMPLETED = "group_completed"


@dataclass(frozen=True)
class CallResult(Generic[_T]):
    ok: bool
    value: _T | None = None


class ProviderCalls:
    """Calls the provider of each namespace; see the module doc."""

    def __init__(
        self, providers: Mapping[str, Provider], metrics: Metrics, log: logging.Logger
    ) -> None:
        self.providers = dict(providers)
        self._metrics = metrics
        self._log = log

    def call(
        self,
        namespace: str,
        op: ProviderOp,
        fn: Callable[[], _T],
        task_id: str | None = None,
    ) -> CallResult[_T]:
        """Call ``fn``; on an exception log it, count it and return a failed result."""
        try:
            return CallResult(True, fn())
        except Exception:
            self._metrics.provider_errors.labels(namespace=namespace, operation=op.value).inc()
            about = f" for {task_id!r}" if task_id is not None else ""
            self._log.exception("provider %r %s failed%s", namespace, op.value, about)
            return CallResult(False)

    def set_recorder(self, recorder: TaskCompletionRecorder) -> None:
        """Give every provider its recorder; an exception here propagates (to ``start()``):
        a provider that cannot record must not run anything."""
        for provider in self.providers.values():
            provider.set_completion_recorder(recorder)

    def group_completed(
        self, namespace: str, hook: Callable[[Task, str], object], task: Task, group: str
    ) -> bool:
        """The provider's ``group_completed(task, group)``; False when it raised."""
        return self.call(
            namespace, ProviderOp.GROUP_COMPLETED, lambda: hook(task, group), task.id
        ).ok

    def local_tasks(self, namespace: str) -> set[TaskDescriptor] | None:
        """The provider's local runs, or None when it failed to list them."""
        provider = self.providers[namespace]
        result = self.call(namespace, ProviderOp.GET_LOCAL_TASKS, provider.get_local_tasks)
        return None if not result.ok or result.value is None else set(result.value)

    def start(self, task: Task) -> TaskHandle | None:
        provider = self.providers[task.namespace]
        result = self.call(
            task.namespace, ProviderOp.START, lambda: provider.start_task(task), task.id
        )
        return result.value if result.ok else None

    def terminate(self, namespace: str, task_id: str, handle: TaskHandle) -> bool:
        return self.call(namespace, ProviderOp.TERMINATE, handle.terminate, task_id).ok

    def cleanup(self, namespace: str, descriptor: TaskDescriptor) -> bool:
        provider = self.providers[namespace]
        return self.call(
            namespace, ProviderOp.CLEANUP, lambda: provider.cleanup_task(descriptor), descriptor.id
        ).ok
