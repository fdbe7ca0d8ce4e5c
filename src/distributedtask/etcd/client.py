"""``EtcdClient``: the only object that talks to etcd — the policy over one transport.

Every request is one :class:`~distributedtask.etcd.transport.Transport` attempt at a time (the
HTTP session, endpoints, TLS and the auth token live there), and every failure arrives already
classified by :mod:`~distributedtask.etcd.errors`. This module decides what to do about it:

* transient — connection refused or reset, a timeout, etcd's UNAVAILABLE / DEADLINE_EXCEEDED /
  RESOURCE_EXHAUSTED (leader change, no leader, request timed out, too many requests): retried
  with jittered exponential backoff (:class:`~distributedtask.etcd.backoff.Backoff`), failing
  over to the next endpoint, until ``timeout`` seconds have passed since the call began; then
  :class:`EtcdError` with ``transient=True``. A call therefore raises at most about
  ``2 * timeout`` after it began.
* an expired or invalid auth token — renewed once by the transport, then the request repeated.
* anything else (TLS failure, wrong password, permission denied, bad request) — raised at once
  as :class:`EtcdError`, no retry.

A request that failed after it may have reached etcd (a read timeout, a reset) might have been
applied. Retrying it is safe for our requests (every write is a compare-and-swap transaction
carrying a per-call token), and :class:`~distributedtask.etcd.txn.TxnResult` reports
``ambiguous`` so the caller can recognise its own earlier write.

Thread-safety: every method may be called from any number of threads. ``close()`` makes every
later call, and every backoff in progress, end with :class:`EtcdError`. Passwords and tokens never
appear in ``repr``, logs or exception messages.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..exceptions import EtcdError
from . import errors
from . import txn as t
from .backoff import Backoff
from .transport import Stream, Transport

__all__ = ["EtcdClient", "Stream"]

_T = TypeVar("_T")

_RETRY_BACKOFF = Backoff(initial=0.05, maximum=1.0)


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number of seconds > 0, not {value!r}")


class EtcdClient:
    """A thread-safe connection to an etcd cluster, shared by Managers and Schedulers.

    ``endpoints`` is one URL or a sequence; requests go to the first that answers and stick to
    it until it fails. ``timeout`` (seconds, finite) bounds one request attempt and the time
    spent retrying transient failures. ``ca_cert``/``cert``/``key`` are paths for TLS;
    ``username``/``password`` enable etcd authentication (the token is obtained on first use
    and renewed when etcd rejects it). ``watch_timeout`` is how long a watch stream may stay
    silent before it is considered dead and re-established: it must exceed etcd's
    ``--experimental-watch-progress-notify-interval`` (10 minutes unless set).

    Raises :class:`ValueError` for malformed arguments. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = "http://127.0.0.1:2379",
        *,
        timeout: float = 5.0,
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        username: str | None = None,
        password: str | None = None,
        watch_timeout: float = 660.0,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        elif isinstance(endpoints, (bytes, bytearray)) or not isinstance(endpoints, Sequence):
            raise ValueError(f"endpoints must be a str or a sequence of str: {endpoints!r}")
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        if not all(isinstance(e, str) for e in endpoints):
            raise ValueError(f"every endpoint must be a str: {endpoints!r}")
        _check_seconds("timeout", timeout)
        _check_seconds("watch_timeout", watch_timeout)
        if (username is None) != (password is None):
            raise ValueError("username and password go together")
        if key is not None and cert is None:
            raise ValueError("a client key needs its certificate (cert=)")
        self.timeout = float(timeout)
        self.watch_timeout = float(watch_timeout)
        self.username = username
        self._closed = threading.Event()
        self._transport = Transport(
            endpoints,
            timeout=self.timeout,
            ca_cert=ca_cert,
            cert=cert,
            key=key,
            username=username,
            password=password,
        )

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return self._transport.urls

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Close the connection pool. Later calls raise :class:`EtcdError`. Idempotent."""
        if not self._closed.is_set():
            self._closed.set()
            self._transport.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        auth = f", username={self.username!r}" if self.username else ""
        return f"EtcdClient({self.endpoints!r}, timeout={self.timeout:g}{auth})"

    # ---- the one request path -------------------------------------------------------------

    def call(self, path: str, body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """POST ``body`` to the gateway's ``/v3/<path>``; retries transient failures.

        Returns the response and whether an earlier attempt may have been applied. Raises
        :class:`EtcdError`.
        """
        maybe_applied = False

        def attempt() -> dict[str, Any]:
            nonlocal maybe_applied
            try:
                return self._transport.post(path, body)
            except errors.RetryableError as retry:
                maybe_applied = maybe_applied or retry.maybe_sent
                raise

        return self._retrying(attempt), maybe_applied

    def _retrying(self, attempt: Callable[[], _T]) -> _T:
        """``attempt()`` until it does not fail transiently or ``timeout`` has passed."""
        began = time.monotonic()
        failures = 0
        while True:
            if self._closed.is_set():
                raise _closed_error()
            try:
                return attempt()
            except errors.RetryableError as retry:
                if self._closed.is_set():
                    raise _closed_error() from None
                if time.monotonic() - began >= self.timeout:
                    raise retry.error from None
            failures += 1
            if self._closed.wait(_RETRY_BACKOFF.delay(failures)):
                raise _closed_error()

    # ---- typed requests -------------------------------------------------------------------

    def txn(
        self,
        compare: Sequence[t.Compare] = (),
        success: Sequence[t.Op] = (),
        failure: Sequence[t.Op] = (),
    ) -> t.TxnResult:
        """One transaction (one round trip). Raises :class:`EtcdError`."""
        body: dict[str, Any] = {"compare": list(compare), "success": list(success)}
        if failure:
            body["failure"] = list(failure)
        data, maybe_applied = self.call("kv/txn", body)
        return t.TxnResult.parse(data, ambiguous=maybe_applied)

    def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        revision: int = 0,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
    ) -> t.RangeResult:
        """A linearizable read of ``[key, range_end)``. Raises :class:`EtcdError`."""
        body = t.range_body(
            key,
            range_end,
            revision=revision,
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
        )
        data, _ = self.call("kv/range", body)
        return t.RangeResult.parse(data)

    def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Put one key; returns the revision of the put. Raises :class:`EtcdError`."""
        data, _ = self.call("kv/put", t.put(key, value, lease=lease)["request_put"])
        return t.header_revision(data)

    def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id. Raises :class:`EtcdError`."""
        data, _ = self.call("lease/grant", {"TTL": int(ttl), "ID": 0})
        lease_id = t.as_int(data.get("ID"))
        if not lease_id:
            raise EtcdError(f"etcd granted no lease: {data.get('error', '')}")
        return lease_id

    def lease_keepalive(self, lease_id: int) -> int:
        """Refresh a lease; returns its remaining TTL, or -1 if it no longer exists."""
        data, _ = self.call("lease/keepalive", {"ID": lease_id})
        result = data.get("result")
        ttl = t.as_int((result if isinstance(result, dict) else data).get("TTL"), default=0)
        return ttl if ttl > 0 else -1

    def lease_revoke(self, lease_id: int) -> None:
        """Revoke a lease, deleting its keys; a lease already gone is not an error."""
        try:
            self.call("lease/revoke", {"ID": lease_id})
        except EtcdError as exc:
            if exc.etcd_message and "lease not found" in exc.etcd_message:
                return
            raise

    def status(self) -> dict[str, Any]:
        """The current endpoint's ``maintenance/status``. Raises :class:`EtcdError`."""
        data, _ = self.call("maintenance/status", {})
        return data

    # ---- streaming (the watch) ------------------------------------------------------------

    def stream(self, path: str, body: Mapping[str, Any], read_timeout: float) -> Stream:
        """Open a streaming POST (``/v3/watch``) whose reads time out after ``read_timeout``.

        Opening is retried like any request. Raises :class:`EtcdError`.
        """
        return self._retrying(lambda: self._transport.open_stream(path, body, read_timeout))

    def classify_frame_error(self, code: int | None, message: str) -> EtcdError:
        """Translate an error carried inside a stream frame into :class:`EtcdError`.

        A rejected auth token is dropped (the next stream obtains a new one) and reported as
        transient.
        """
        outcome = errors.classify_status(
            code, message, self._transport.current_url, auth=self._transport.authenticates
        )
        if isinstance(outcome, errors.TokenRejectedError):
            self._transport.invalidate_token()
        return errors.final(outcome)


def _closed_error() -> EtcdError:
    return EtcdError("the etcd client is closed")
