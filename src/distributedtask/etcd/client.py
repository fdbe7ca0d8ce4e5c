"""``EtcdClient``: the only object that talks to etcd.

Unary calls and transactions go through etcd3gw (its ``Etcd3Client.post``) over one
``requests.Session`` shared by every endpoint: ``trust_env = False`` (requests otherwise reads
proxy and netrc settings on every call), a pool large enough for the threads of a node, a finite
``(connect, read)`` timeout, and the gateway path fixed to ``/v3/`` (no discovery round trip).
The watch stream (:meth:`EtcdClient.stream`) uses the same session directly, since etcd3gw's
watch is unusable (see DESIGN.md).

Failure semantics, decided in one place (:meth:`EtcdClient._classify`):

* transient — connection refused or reset, a timeout, etcd's UNAVAILABLE / DEADLINE_EXCEEDED /
  RESOURCE_EXHAUSTED (leader change, no leader, request timed out, too many requests): retried
  with jittered exponential backoff (tenacity), failing over to the next endpoint, until
  ``timeout`` seconds have passed since the call began; then :class:`EtcdError` with
  ``transient=True``. A call therefore raises at most about ``2 * timeout`` after it began.
* an expired or invalid auth token — renewed once, then the request is repeated.
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

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import etcd3gw
import orjson
import requests
import requests.adapters
import tenacity
from etcd3gw import exceptions as gw_exceptions

from ..exceptions import EtcdError
from . import txn as t

__all__ = ["EtcdClient", "Stream"]

log = logging.getLogger("distributedtask.etcd")

_T = TypeVar("_T")

# gRPC status codes etcd returns through the gateway.
_INVALID_ARGUMENT = 3
_DEADLINE_EXCEEDED = 4
_PERMISSION_DENIED = 7
_RESOURCE_EXHAUSTED = 8
_FAILED_PRECONDITION = 9
_UNAVAILABLE = 14
_UNAUTHENTICATED = 16
_TRANSIENT_CODES = frozenset({_DEADLINE_EXCEEDED, _RESOURCE_EXHAUSTED, _UNAVAILABLE})
_TOKEN_MESSAGES = ("invalid auth token", "auth token", "revision of auth store is old")

_MAX_CONNECT_TIMEOUT = 2.0


@dataclass(frozen=True)
class _Endpoint:
    url: str
    gateway: Any  # etcd3gw.Etcd3Client (untyped library)


class _RetryableError(Exception):
    """Internal: one attempt failed transiently; ``error`` is what to raise if we give up."""

    def __init__(self, error: EtcdError, *, maybe_sent: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.maybe_sent = maybe_sent


class _TokenRejectedError(Exception):
    """Internal: etcd rejected our auth token."""


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number of seconds > 0, not {value!r}")


def _parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    text = endpoint.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an etcd endpoint (http[s]://host:port): {endpoint!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"an etcd endpoint has no path or query: {endpoint!r}")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError(f"bad port in etcd endpoint {endpoint!r}") from None
    return parts.scheme, parts.hostname, port


class Stream:
    """A streaming gateway response (the watch), read line by line with a read timeout.

    ``lines()`` yields each JSON frame, parsed. It raises :class:`EtcdError` (``transient=True``)
    when the stream breaks or stays silent for longer than the read timeout, and ends when the
    server ends the stream. ``close()`` may be called from another thread: it shuts the socket
    down, which wakes a reader blocked in ``lines()``.
    """

    def __init__(self, response: requests.Response, endpoint: str) -> None:
        self._response = response
        self._endpoint = endpoint
        self._closed = threading.Event()

    def lines(self) -> Iterator[dict[str, Any]]:
        try:
            for line in self._response.iter_lines(chunk_size=None):
                if not line:
                    continue
                try:
                    frame = orjson.loads(line)
                except orjson.JSONDecodeError:
                    raise EtcdError(
                        "malformed watch frame", endpoint=self._endpoint, transient=True
                    ) from None
                if isinstance(frame, dict):
                    yield frame
        except (requests.RequestException, OSError, ValueError, AttributeError) as exc:
            if self._closed.is_set():
                return
            raise EtcdError(
                f"watch stream broke: {type(exc).__name__}",
                endpoint=self._endpoint,
                transient=True,
            ) from None

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        sock = _socket_of(self._response)
        if sock is not None:
            try:
                import socket

                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._response.close()


def _socket_of(response: requests.Response) -> Any:
    raw = response.raw
    for holder in (getattr(raw, "_connection", None), getattr(raw, "connection", None)):
        sock = getattr(holder, "sock", None)
        if sock is not None:
            return sock
    fp = getattr(raw, "_fp", None)
    fp = getattr(fp, "fp", None)
    raw_io = getattr(fp, "raw", None)
    return getattr(raw_io, "_sock", None)


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
        self._password = password
        self._token: str | None = None
        self._token_lock = threading.Lock()
        self._closed = threading.Event()

        session = requests.Session()
        session.trust_env = False
        adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=64, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if ca_cert is not None:
            session.verify = ca_cert
        if cert is not None:
            session.cert = (cert, key) if key is not None else cert
        self._session = session
        request_timeout = (min(self.timeout, _MAX_CONNECT_TIMEOUT), self.timeout)

        self._endpoints: list[_Endpoint] = []
        for endpoint in endpoints:
            scheme, host, port = _parse_endpoint(endpoint)
            gateway = etcd3gw.Etcd3Client(
                host=host,
                port=port,
                protocol=scheme,
                # requests takes a (connect, read) pair; etcd3gw passes it through untouched.
                timeout=request_timeout,  # type: ignore[arg-type]
                api_path="/v3/",
                session=session,
            )
            self._endpoints.append(_Endpoint(f"{scheme}://{host}:{port}", gateway))
        self._current = 0
        self._current_lock = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [e.url for e in self._endpoints]

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Close the connection pool. Later calls raise :class:`EtcdError`. Idempotent."""
        if not self._closed.is_set():
            self._closed.set()
            self._session.close()

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
                return self._attempt(
                    lambda ep, headers: ep.gateway.post(
                        ep.gateway.get_url(path), json=body, headers=headers
                    )
                )
            except _RetryableError as retry:
                maybe_applied = maybe_applied or retry.maybe_sent
                raise

        return self._retrying(attempt), maybe_applied

    def _retrying(self, fn: Callable[[], _T]) -> _T:
        if self._closed.is_set():
            raise EtcdError("the etcd client is closed")
        began = time.monotonic()
        try:
            return fn()  # the common case, without building a retry loop
        except _RetryableError as first:
            remaining = self.timeout - (time.monotonic() - began)
            if remaining <= 0:
                raise first.error from None
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_delay(remaining),
            wait=tenacity.wait_random_exponential(multiplier=0.05, max=1.0),
            retry=tenacity.retry_if_exception_type(_RetryableError),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(self._after_backoff(fn))
        except _RetryableError as retry:
            if self._closed.is_set():
                raise EtcdError("the etcd client is closed") from None
            raise retry.error from None

    def _after_backoff(self, fn: Callable[[], _T]) -> Callable[[], _T]:
        """``fn``, but its first call is preceded by one backoff (the attempt already made)."""
        waited = False

        def call() -> _T:
            nonlocal waited
            if not waited:
                waited = True
                self._sleep(random.uniform(0, 0.05))
            return fn()

        return call

    def _sleep(self, seconds: float) -> None:
        if self._closed.wait(seconds):
            raise EtcdError("the etcd client is closed")

    def _attempt(self, send: Callable[[_Endpoint, dict[str, str]], _T]) -> _T:
        """One request to the current endpoint (and a second after renewing the token)."""
        if self._closed.is_set():
            raise EtcdError("the etcd client is closed")
        with self._current_lock:
            index = self._current
        endpoint = self._endpoints[index]
        for renewal in (False, True):
            try:
                try:
                    return send(endpoint, self._auth_headers(endpoint))
                except gw_exceptions.Etcd3Exception as exc:
                    raise self._classify(exc, endpoint) from None
                except requests.RequestException as exc:  # raised outside etcd3gw's handling
                    raise self._classify_transport(exc, endpoint) from None
            except _TokenRejectedError:
                if renewal:
                    raise EtcdError(
                        "etcd rejected a freshly obtained auth token", endpoint=endpoint.url
                    ) from None
                self._invalidate_token()
            except _RetryableError:
                self._fail_over(index)
                raise
        raise AssertionError("unreachable")

    def _fail_over(self, failed_index: int) -> None:
        if len(self._endpoints) > 1:
            with self._current_lock:
                if self._current == failed_index:
                    self._current = (failed_index + 1) % len(self._endpoints)

    # ---- error translation: the one place ---------------------------------------------------

    def _classify(self, exc: gw_exceptions.Etcd3Exception, endpoint: _Endpoint) -> Exception:
        """Turn an etcd3gw exception into a retry, a token renewal, or :class:`EtcdError`."""
        cause = exc.__context__
        if isinstance(cause, requests.RequestException):
            return self._classify_transport(cause, endpoint)
        detail = exc.detail_text or ""
        code: int | None = None
        message = detail.strip() or type(exc).__name__
        try:
            data = orjson.loads(detail) if detail else None
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            raw_code = data.get("code")
            code = raw_code if isinstance(raw_code, int) else None
            message = str(data.get("message") or data.get("error") or message)
        return self._classify_status(code, message, endpoint, http_error=type(exc).__name__)

    def _classify_status(
        self, code: int | None, message: str, endpoint: _Endpoint, http_error: str = ""
    ) -> Exception:
        if (
            code == _UNAUTHENTICATED
            or (code == _FAILED_PRECONDITION and "auth store" in message)
            or "user name is empty" in message  # auth is on and we sent no token
        ):
            if self._password is not None and any(m in message for m in _TOKEN_MESSAGES):
                return _TokenRejectedError()
            return EtcdError(
                f"etcd requires authentication: {message}",
                endpoint=endpoint.url,
                code=code,
                etcd_message=message,
            )
        if code == _PERMISSION_DENIED:
            return EtcdError(
                f"etcd denied permission: {message}",
                endpoint=endpoint.url,
                code=code,
                etcd_message=message,
            )
        if code == _RESOURCE_EXHAUSTED and "larger than max" in message:
            code_transient = False  # a request over gRPC's message size: resending cannot help
        else:
            code_transient = code in _TRANSIENT_CODES
        transient = code_transient or (
            code is None and http_error in ("ConnectionFailedError", "ConnectionTimeoutError")
        )
        error = EtcdError(
            f"etcd refused the request: {message}" if not transient else f"etcd: {message}",
            endpoint=endpoint.url,
            code=code,
            etcd_message=message,
            transient=transient,
        )
        if transient:
            return _RetryableError(error, maybe_sent=True)
        return error

    def _classify_transport(self, exc: requests.RequestException, endpoint: _Endpoint) -> Exception:
        if isinstance(exc, requests.exceptions.SSLError):
            return EtcdError(
                f"TLS handshake with etcd failed: {_reason(exc)}", endpoint=endpoint.url
            )
        not_sent = isinstance(exc, requests.exceptions.ConnectTimeout) or (
            isinstance(exc, requests.exceptions.ConnectionError) and _is_connect_failure(exc)
        )
        kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "unreachable"
        error = EtcdError(f"etcd {kind}: {_reason(exc)}", endpoint=endpoint.url, transient=True)
        return _RetryableError(error, maybe_sent=not not_sent)

    # ---- authentication -------------------------------------------------------------------

    def _auth_headers(self, endpoint: _Endpoint) -> dict[str, str]:
        if self._password is None:
            return {}
        with self._token_lock:
            if self._token is None:
                self._token = self._authenticate(endpoint)
            return {"Authorization": self._token}

    def _invalidate_token(self) -> None:
        with self._token_lock:
            self._token = None

    def _authenticate(self, endpoint: _Endpoint) -> str:
        gateway = endpoint.gateway
        try:
            data = gateway.post(
                gateway.get_url("/auth/authenticate"),
                json={"name": self.username, "password": self._password},
            )
        except gw_exceptions.Etcd3Exception as exc:
            error = self._classify(exc, endpoint)
            refused = (_INVALID_ARGUMENT, _FAILED_PRECONDITION)
            if isinstance(error, EtcdError) and error.code in refused:
                raise EtcdError(
                    f"etcd authentication failed for user {self.username!r}: {error.etcd_message}",
                    endpoint=endpoint.url,
                    code=error.code,
                    etcd_message=error.etcd_message,
                ) from None
            raise error from None
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise EtcdError("etcd returned no auth token", endpoint=endpoint.url)
        return token

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

        def send(endpoint: _Endpoint, headers: dict[str, str]) -> Stream:
            try:
                response = self._session.post(
                    endpoint.url + "/v3/" + path,
                    data=orjson.dumps(dict(body)),
                    headers={"Content-Type": "application/json", **headers},
                    stream=True,
                    timeout=(min(self.timeout, _MAX_CONNECT_TIMEOUT), read_timeout),
                )
            except requests.exceptions.Timeout as exc:
                raise gw_exceptions.ConnectionTimeoutError(str(exc)) from exc
            except requests.exceptions.ConnectionError as exc:
                raise gw_exceptions.ConnectionFailedError(str(exc)) from exc
            if response.status_code != 200:
                text = response.text
                response.close()
                name = "ConnectionFailedError" if response.status_code == 503 else "Etcd3Exception"
                raise getattr(gw_exceptions, name)(text, response.reason)
            return Stream(response, endpoint.url)

        return self._retrying(lambda: self._attempt(send))

    def classify_frame_error(self, code: int | None, message: str) -> EtcdError:
        """Translate an error carried inside a stream frame into :class:`EtcdError`."""
        endpoint = self._endpoints[self._current]
        error = self._classify_status(code, message, endpoint)
        if isinstance(error, _TokenRejectedError):
            self._invalidate_token()
            return EtcdError(f"etcd: {message}", endpoint=endpoint.url, code=code, transient=True)
        if isinstance(error, _RetryableError):
            return error.error
        assert isinstance(error, EtcdError)
        return error


def _is_connect_failure(exc: requests.RequestException) -> bool:
    text = repr(exc)
    return any(
        marker in text
        for marker in ("NewConnectionError", "Connection refused", "Failed to establish")
    )


_REASONS = (
    ("alert bad certificate", "etcd rejected the client certificate (or none was given)"),
    ("alert certificate required", "etcd requires a client certificate"),
    ("certificate required", "etcd requires a client certificate"),
    ("alert unknown ca", "etcd does not trust the CA of the client certificate"),
    ("CERTIFICATE_VERIFY_FAILED", "the server certificate is not signed by the given CA"),
    ("alert handshake failure", "the TLS handshake failed"),
    ("Connection refused", "Connection refused"),
    ("Read timed out", "Read timed out"),
    ("timed out", "timed out"),
    ("Connection reset", "Connection reset"),
    ("Connection aborted", "Connection aborted"),
    ("RemoteDisconnected", "the connection was closed"),
    ("Name or service not known", "Name or service not known"),
)


def _reason(exc: BaseException) -> str:
    """A short human reason for a transport error (urllib3's own text is long and says
    "Max retries exceeded" although nothing was retried)."""
    text = str(exc)
    for marker, reason in _REASONS:
        if marker in text:
            return reason
    inner = text.rpartition("Caused by ")[2] or text
    return inner.rstrip(")")[:200]
