"""The node daemon behind ``dtask node``: a Scheduler, its providers, a metrics endpoint, logs.

:class:`NodeDaemon` owns one :class:`~distributedtask.scheduler.Scheduler` and, optionally, a
Prometheus HTTP server on 127.0.0.1 (or ``metrics_host``) serving the metrics of a registry of its
own. :meth:`NodeDaemon.run` starts both, blocks until :meth:`NodeDaemon.request_stop` is called
(the CLI wires SIGTERM and SIGINT to it), then stops the Scheduler (terminating running
handles, revoking the lease), waits for providers that can be joined, and shuts the HTTP
server down. Nothing it started outlives ``run``.

Providers are named ``NS=SPEC``. ``SPEC`` is ``command`` (the built-in
:class:`~distributedtask.providers.command.CommandProvider`, its state in
``<state_dir>/<NS>``) or ``module:attribute``: a Provider instance, or a callable returning one,
called with ``state_dir=<state_dir>/<NS>`` if it accepts that keyword and with no argument
otherwise. :func:`load_provider` raises :class:`ValueError` with a clear message on any problem.

:class:`JsonLogFormatter` writes one JSON object per log line (``ts``, ``level``, ``logger``,
``msg``, and ``exc`` when there is a traceback) — the structured logs of the daemon.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_http_server

from .manager import Manager
from .provider import Provider
from .scheduler import Scheduler

__all__ = ["JsonLogFormatter", "NodeDaemon", "load_provider", "parse_provider_spec"]

log = logging.getLogger("distributedtask.node")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339 UTC), level, logger, thread, msg[, exc]."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def parse_provider_spec(text: str) -> tuple[str, str]:
    """Split ``NS=SPEC``. Raises :class:`ValueError`."""
    namespace, sep, spec = text.partition("=")
    if not sep or not namespace or not spec:
        raise ValueError(f"--provider wants NS=command or NS=module:factory, not {text!r}")
    return namespace, spec


def load_provider(spec: str, state_dir: Path) -> Provider:
    """Build the Provider named by ``spec`` (see the module doc). Raises :class:`ValueError`."""
    if spec == "command":
        from .providers.command import CommandProvider

        return CommandProvider(state_dir)
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"provider {spec!r} is not 'command' or 'module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import provider module {module_name!r}: {exc}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if callable(target) and not _is_provider(target):
        try:
            accepts_dir = "state_dir" in inspect.signature(target).parameters
        except (TypeError, ValueError):
            accepts_dir = False
        try:
            target = target(state_dir=state_dir) if accepts_dir else target()
        except Exception as exc:
            raise ValueError(f"provider factory {spec!r} failed: {exc}") from exc
    if not _is_provider(target):
        raise ValueError(f"{spec!r} did not give a Provider (got {type(target).__name__})")
    provider: Provider = target
    return provider


def _is_provider(value: object) -> bool:
    return all(
        callable(getattr(value, name, None))
        for name in ("set_completion_recorder", "get_local_tasks", "cleanup_task", "start_task")
    ) and not isinstance(value, type)


class NodeDaemon:
    """Run a Scheduler until asked to stop; serve its metrics (see the module doc)."""

    def __init__(
        self,
        manager: Manager,
        *,
        node_id: str,
        providers: Mapping[str, Provider],
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        **scheduler_options: Any,
    ) -> None:
        self.registry = CollectorRegistry()
        self.scheduler = Scheduler(
            manager,
            node_id=node_id,
            providers=providers,
            registry=self.registry,
            **scheduler_options,
        )
        self.providers = dict(providers)
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self._stop = threading.Event()
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    def request_stop(self) -> None:
        """Ask :meth:`run` to return; safe from a signal handler or any thread."""
        self._stop.set()

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def run(self, ready: threading.Event | None = None) -> None:
        """Start, block until :meth:`request_stop`, stop everything.

        Raises :class:`~distributedtask.exceptions.EtcdError` if the Scheduler cannot start,
        :class:`OSError` if the metrics port cannot be bound.
        """
        if self.metrics_port is not None:
            try:
                self._server, self._server_thread = start_http_server(
                    self.metrics_port, addr=self.metrics_host, registry=self.registry
                )
            except OSError as exc:
                where = f"{self.metrics_host}:{self.metrics_port}"
                raise OSError(
                    exc.errno, f"cannot serve metrics on {where}: {exc.strerror}"
                ) from None
            host, port = self.metrics_address or ("", 0)
            log.info("serving metrics on http://%s:%d/metrics", host, port)
        try:
            began = time.monotonic()
            self.scheduler.start()
            log.info(
                "node %s started in %.2fs serving %s",
                self.scheduler.node_id,
                time.monotonic() - began,
                ", ".join(sorted(self.providers)),
            )
            if ready is not None:
                ready.set()
            # In slices: a signal the kernel delivers to another thread only sets a flag, and
            # the handler (request_stop) runs when the main thread next executes Python code;
            # an unbounded wait could block it forever.
            while not self._stop.wait(0.2):
                pass
            log.info("node %s stopping", self.scheduler.node_id)
        finally:
            self.scheduler.stop()
            for provider in self.providers.values():
                join = getattr(provider, "join", None)
                if callable(join):
                    join(10.0)
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                if self._server_thread is not None:
                    self._server_thread.join(5)
            log.info("node %s stopped", self.scheduler.node_id)
