"""Error classification: the one boundary where a failure talking to etcd becomes ours.

Every requests exception, etcd3gw exception, non-200 gateway answer and gRPC status (of a
unary response or of a watch frame) is translated here and nowhere else. One failed attempt
comes out as one of three :data:`Outcome` s::

    EtcdError            final: raised at once, never retried
    RetryableError       transient: retry (and fail over); .error (transient=True) is raised
                         when the caller gives up; .maybe_sent says the request may have
                         reached etcd, so a write may have been applied
    TokenRejectedError   etcd rejected our auth token: renew it and repeat once; .error is
                         raised when that is not possible

    what went wrong                                          outcome
    connection refused, could not connect, connect timeout   RetryableError, not sent
    read timeout, reset, any other transport error           RetryableError, maybe sent
    TLS handshake                                            EtcdError
    UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED       RetryableError, maybe sent
      (but a request over gRPC's message size)               EtcdError
    a gateway error with no gRPC code (503, refused)         RetryableError
    UNAUTHENTICATED / "auth store" with a token message      TokenRejectedError if we log in,
                                                             else EtcdError
    PERMISSION_DENIED, INVALID_ARGUMENT, anything else       EtcdError

:class:`RetryableError` and :class:`TokenRejectedError` are signals inside ``etcd/`` and never
leave it. Messages are built from etcd's message and the exception's class and text, which hold
no password or token (those travel in a request body or header). Pure functions; thread-safe.
"""

from __future__ import annotations

from typing import TypeAlias

import orjson
import requests

from ..exceptions import EtcdError

__all__ = [
    "Outcome",
    "RetryableError",
    "TokenRejectedError",
    "authentication_failed",
    "classify_gateway",
    "classify_response",
    "classify_status",
    "classify_transport",
    "final",
    "malformed_frame",
    "stream_broken",
]

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
# etcd3gw's names for a gateway that could not be reached or did not answer in time.
_UNREACHABLE_GATEWAY = ("ConnectionFailedError", "ConnectionTimeoutError")


class RetryableError(Exception):
    """One attempt failed transiently; ``error`` is what to raise if the caller gives up."""

    def __init__(self, error: EtcdError, *, maybe_sent: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.maybe_sent = maybe_sent


class TokenRejectedError(Exception):
    """etcd rejected our auth token; ``error`` is what to raise if it cannot be renewed."""

    def __init__(self, error: EtcdError) -> None:
        super().__init__(str(error))
        self.error = error


Outcome: TypeAlias = EtcdError | RetryableError | TokenRejectedError


def final(outcome: Outcome) -> EtcdError:
    """The :class:`EtcdError` an outcome amounts to when nothing more will be tried."""
    return outcome if isinstance(outcome, EtcdError) else outcome.error


def classify_gateway(exc: Exception, endpoint: str, *, auth: bool) -> Outcome:
    """An exception raised by etcd3gw (an ``Etcd3Exception``); ``auth``: we log in."""
    cause = exc.__context__
    if isinstance(cause, requests.RequestException):
        return classify_transport(cause, endpoint)
    detail = getattr(exc, "detail_text", None)
    return _classify_body(
        detail if isinstance(detail, str) else "",
        endpoint,
        auth=auth,
        http_error=type(exc).__name__,
    )


def classify_response(status: int, text: str, endpoint: str, *, auth: bool) -> Outcome:
    """A non-200 answer to a request sent without etcd3gw (the watch), read as etcd3gw would."""
    http_error = "ConnectionFailedError" if status == 503 else "Etcd3Exception"
    return _classify_body(text, endpoint, auth=auth, http_error=http_error)


def _classify_body(detail: str, endpoint: str, *, auth: bool, http_error: str) -> Outcome:
    code: int | None = None
    message = detail.strip() or http_error
    try:
        data = orjson.loads(detail) if detail else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        raw_code = data.get("code")
        code = raw_code if isinstance(raw_code, int) else None
        message = str(data.get("message") or data.get("error") or message)
    return classify_status(code, message, endpoint, auth=auth, http_error=http_error)


def classify_status(
    code: int | None, message: str, endpoint: str, *, auth: bool, http_error: str = ""
) -> Outcome:
    """etcd's gRPC ``code`` and ``message`` (of a response, or of a watch frame's error)."""
    if (
        code == _UNAUTHENTICATED
        or (code == _FAILED_PRECONDITION and "auth store" in message)
        or "user name is empty" in message  # auth is on and we sent no token
    ):
        if auth and any(m in message for m in _TOKEN_MESSAGES):
            return TokenRejectedError(
                EtcdError(f"etcd: {message}", endpoint=endpoint, code=code, transient=True)
            )
        return EtcdError(
            f"etcd requires authentication: {message}",
            endpoint=endpoint,
            code=code,
            etcd_message=message,
        )
    if code == _PERMISSION_DENIED:
        return EtcdError(
            f"etcd denied permission: {message}",
            endpoint=endpoint,
            code=code,
            etcd_message=message,
        )
    if code == _RESOURCE_EXHAUSTED and "larger than max" in message:
        code_transient = False  # a request over gRPC's message size: resending cannot help
    else:
        code_transient = code in _TRANSIENT_CODES
    transient = code_transient or (code is None and http_error in _UNREACHABLE_GATEWAY)
    error = EtcdError(
        f"etcd refused the request: {message}" if not transient else f"etcd: {message}",
        endpoint=endpoint,
        code=code,
        etcd_message=message,
        transient=transient,
    )
    if transient:
        return RetryableError(error, maybe_sent=True)
    return error


def classify_transport(exc: requests.RequestException, endpoint: str) -> EtcdError | RetryableError:
    """A requests exception: TLS failures are final, everything else is retried."""
    if isinstance(exc, requests.exceptions.SSLError):
        return EtcdError(f"TLS handshake with etcd failed: {_reason(exc)}", endpoint=endpoint)
    not_sent = isinstance(exc, requests.exceptions.ConnectTimeout) or (
        isinstance(exc, requests.exceptions.ConnectionError) and _is_connect_failure(exc)
    )
    kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "unreachable"
    error = EtcdError(f"etcd {kind}: {_reason(exc)}", endpoint=endpoint, transient=True)
    return RetryableError(error, maybe_sent=not not_sent)


def authentication_failed(outcome: Outcome, username: str | None, endpoint: str) -> Outcome:
    """The outcome of a failed ``auth/authenticate``: a refusal names the user."""
    if isinstance(outcome, EtcdError) and outcome.code in (_INVALID_ARGUMENT, _FAILED_PRECONDITION):
        return EtcdError(
            f"etcd authentication failed for user {username!r}: {outcome.etcd_message}",
            endpoint=endpoint,
            code=outcome.code,
            etcd_message=outcome.etcd_message,
        )
    return outcome


def stream_broken(exc: BaseException, endpoint: str) -> EtcdError:
    """A watch stream that broke or stayed silent past its read timeout."""
    return EtcdError(f"watch stream broke: {type(exc).__name__}", endpoint=endpoint, transient=True)


def malformed_frame(endpoint: str) -> EtcdError:
    return EtcdError("malformed watch frame", endpoint=endpoint, transient=True)


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
