"""The resumable prefix watch: a consistent snapshot, then every change after it, forever.

etcd3gw's own watch is unusable (it dies silently on disconnect, hangs on compaction, has no
read timeout); this is our loop on the gateway's streaming ``POST /v3/watch``::

    list the ranges in one transaction (revision R)      -> handler(Snapshot(R, kvs))
    watch [key, range_end) from R + 1, progress_notify
      events                                             -> handler(Changes(rev, events))
      progress notification                              -> remember its revision
      compact_revision frame                             -> list again (a new Snapshot)
      error / cancel frame, EOF, read timeout, refused   -> back off (jittered, exponential),
                                                            watch again from last + 1

The resume point is the ``mod_revision`` of the last event delivered, or the header revision of
a progress notification (etcd sends those only to watchers that are caught up). It is *not* the
header revision of an event response: etcd may split a long catch-up into several responses
that all carry the store's current revision, and resuming from it would skip events.

The handler sees every change exactly once, in revision order, unless a snapshot replaces the
whole view (after compaction, or when :meth:`ResumableWatch.resync` asks for one): handlers must
treat a :class:`Snapshot` as "forget everything, this is the state". A handler that raises is
logged and answered with a fresh snapshot.

Each re-established stream is reported as a :class:`RestartReason`, each snapshot carries its
:class:`SnapshotReason`; both are ``str`` enums, so they serve as metric labels as they are.

Threading: the loop runs on one named daemon thread and calls the handler on it. ``stop()``
closes the live stream (which wakes a blocked read), interrupts any backoff, and joins the
thread (a thread that does not end in time is logged with its stack). A stream that stays
silent longer than the client's ``watch_timeout`` is considered dead, so etcd must send progress
notifications more often than that.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .._threads import stop_and_join
from ..exceptions import EtcdError
from . import txn as t
from .backoff import Backoff
from .client import EtcdClient, Stream

__all__ = [
    "Changes",
    "RestartReason",
    "ResumableWatch",
    "Snapshot",
    "SnapshotReason",
    "WatchEvent",
]

log = logging.getLogger("distributedtask.watch")


class RestartReason(str, enum.Enum):
    """Why the stream was re-established (``on_restart``'s argument, a metric label)."""

    COMPACTED = "compacted"  # the resume revision was compacted away: relisted
    CONNECT = "connect"  # the stream broke, timed out, or could not be opened
    EOF = "eof"  # etcd ended the stream
    CANCELED = "canceled"  # etcd canceled the watch
    ERROR = "error"  # the handler raised: relisted
    RESYNC = "resync"  # resync() asked for a fresh snapshot

    def __str__(self) -> str:
        return self.value


class SnapshotReason(str, enum.Enum):
    """Why a :class:`Snapshot` was taken."""

    INITIAL = "initial"
    COMPACTED = "compacted"
    RESYNC = "resync"
    HANDLER_ERROR = "handler-error"

    def __str__(self) -> str:
        return self.value


# Restarts that are no failure: relist at once, without backoff.
_EXPECTED = frozenset({RestartReason.COMPACTED, RestartReason.RESYNC})


@dataclass(frozen=True)
class WatchEvent:
    """One change of one key. For a delete, ``kv.value`` is empty."""

    kind: Literal["put", "delete"]
    kv: t.KeyValue


@dataclass(frozen=True)
class Snapshot:
    """Every key of the watched ranges at ``revision``; replaces whatever the handler knew."""

    revision: int
    kvs: list[t.KeyValue]
    reason: SnapshotReason


@dataclass(frozen=True)
class Changes:
    """The events of one watch response, in order; ``revision`` is the last event's."""

    revision: int
    events: list[WatchEvent]


Handler = Callable[[Snapshot | Changes], None]


class _RestartError(Exception):
    def __init__(self, reason: RestartReason, relist: SnapshotReason | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.relist = relist


class ResumableWatch:
    """Follow ``[key, range_end)`` from a snapshot of ``list_ranges`` (default: the same range).

    ``on_restart(reason)`` is called on the watch thread each time the stream is re-established,
    with a :class:`RestartReason`; ``on_live()`` each time etcd confirms a stream (the first
    one and every re-established one): from then on, changes reach the handler again. Between
    failed streams the loop backs off (jittered, exponential, at most ``max_backoff`` seconds).
    ``start()`` returns once the first snapshot was delivered, or raises :class:`EtcdError` if
    it could not be listed within the client's timeout.
    """

    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        range_end: bytes,
        handler: Handler,
        *,
        list_ranges: Sequence[tuple[bytes, bytes]] | None = None,
        name: str = "distributedtask-watch",
        on_restart: Callable[[RestartReason], None] | None = None,
        on_live: Callable[[], None] | None = None,
        max_backoff: float = 2.0,
    ) -> None:
        self._client = client
        self._key = key
        self._range_end = range_end
        self._handler = handler
        self._list_ranges = list(list_ranges) if list_ranges else [(key, range_end)]
        self._name = name
        self._on_restart = on_restart
        self._on_live = on_live
        self._backoff = Backoff(initial=0.05, maximum=max_backoff)
        self._stop = threading.Event()
        self._stream_lock = threading.Lock()
        self._stream: Stream | None = None
        self._resync_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self.revision = 0  # the last revision the handler has seen everything up to

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """List once, deliver the snapshot, and start following on the watch thread.

        Raises :class:`EtcdError` if the first list fails (the thread is not started then).
        """
        if self._thread is not None:
            raise RuntimeError("this watch was already started")
        self._deliver_snapshot(SnapshotReason.INITIAL)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop following and join the thread. Idempotent; safe from any thread but the
        handler's own (a handler calling ``stop`` only signals; the loop exits after it)."""
        self._stop.set()
        self._close_stream()
        stop_and_join(self._thread, timeout=timeout, logger=log, what=f"the watch of {self._key!r}")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def resync(self) -> None:
        """Ask for a fresh snapshot (the periodic safety net); returns at once."""
        self._resync_requested.set()
        self._close_stream()

    # ---- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        relist: SnapshotReason | None = None  # the reason for the next snapshot, if one is due
        while not self._stop.is_set():
            reason: RestartReason
            try:
                if self._resync_requested.is_set():
                    self._resync_requested.clear()
                    if relist is None:
                        relist = SnapshotReason.RESYNC
                if relist is not None:
                    self._deliver_snapshot(relist)
                    relist = None
                delivered = self._follow()
                reason = RestartReason.EOF
                if delivered:
                    failures = 0
            except _RestartError as restart:
                reason = restart.reason
                if restart.relist is not None:
                    relist = restart.relist
                if reason in _EXPECTED:
                    failures = 0
            except EtcdError as exc:
                reason = RestartReason.CONNECT
                if not exc.transient:
                    log.warning("watch of %r: %s", self._key, exc)
            except Exception:  # a handler bug must not end the watch
                log.exception("watch handler of %r failed; relisting", self._key)
                reason, relist = RestartReason.ERROR, SnapshotReason.HANDLER_ERROR
            if self._stop.is_set():
                return
            if self._on_restart is not None:
                try:
                    self._on_restart(reason)
                except Exception:
                    log.exception("on_restart callback failed")
            if reason not in _EXPECTED:
                failures += 1
                if self._stop.wait(self._backoff.delay(failures)):
                    return

    def _deliver_snapshot(self, reason: SnapshotReason) -> None:
        ranges = [t.get(start, end) for start, end in self._list_ranges]
        result = self._client.txn(success=ranges)
        kvs: list[t.KeyValue] = []
        for index in range(len(ranges)):
            kvs.extend(result.range(index).kvs)
        self._handler(Snapshot(result.revision, kvs, reason))
        self.revision = result.revision

    def _follow(self) -> bool:
        """Stream from ``revision + 1`` until the stream ends; True if anything arrived."""
        request = {
            "create_request": {
                "key": t.b64(self._key),
                "range_end": t.b64(self._range_end),
                "start_revision": self.revision + 1,
                "progress_notify": True,
            }
        }
        stream = self._client.stream("watch", request, read_timeout=self._client.watch_timeout)
        with self._stream_lock:
            if self._stop.is_set() or self._resync_requested.is_set():
                stream.close()
                raise _RestartError(RestartReason.RESYNC, SnapshotReason.RESYNC)
            self._stream = stream
        delivered = False
        try:
            for frame in stream.lines():
                if self._stop.is_set():
                    break
                self._on_frame(frame)
                delivered = True
        finally:
            self._close_stream()
        if self._resync_requested.is_set():
            raise _RestartError(RestartReason.RESYNC, SnapshotReason.RESYNC)
        if self._stop.is_set():
            return delivered
        raise _RestartError(RestartReason.EOF)

    def _on_frame(self, frame: dict[str, Any]) -> None:
        error = frame.get("error")
        if isinstance(error, dict):
            code = error.get("grpc_code")
            raise self._client.classify_frame_error(
                code if isinstance(code, int) else None, str(error.get("message", error))
            )
        result = frame.get("result")
        if not isinstance(result, dict):
            return
        if t.as_int(result.get("compact_revision")) > 0:
            raise _RestartError(RestartReason.COMPACTED, SnapshotReason.COMPACTED)
        if result.get("canceled"):
            log.info("watch of %r canceled by etcd: %s", self._key, result.get("cancel_reason", ""))
            raise _RestartError(RestartReason.CANCELED)
        events = result.get("events") or []
        if events:
            parsed = [
                WatchEvent(
                    "delete" if event.get("type") == "DELETE" else "put",
                    t.KeyValue.parse(event.get("kv") or {}),
                )
                for event in events
            ]
            last = parsed[-1].kv.mod_revision
            self._handler(Changes(last, parsed))
            self.revision = max(self.revision, last)
        elif result.get("created"):
            if self._on_live is not None:
                self._on_live()
        else:
            # A progress notification: etcd sends them only to caught-up watchers.
            self.revision = max(self.revision, t.header_revision(result))

    def _close_stream(self) -> None:
        with self._stream_lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
