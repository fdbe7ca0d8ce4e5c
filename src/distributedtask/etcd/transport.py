"""The HTTP layer under :class:`~distributedtask.etcd.client.EtcdClient`: one attempt at a time.

One ``requests.Session`` serves every endpoint: ``trust_env = False`` (requests otherwise reads
proxy and netrc settings on every call), a pool large enough for the threads of a node, no
urllib3 retries, a finite ``(connect, read)`` timeout, TLS files when given. Unary calls go
through etcd3gw (``Etcd3Client.post``) with the gateway path fixed to ``/v3/`` (no discovery
round trip); the watch is a streaming POST on the same session (:class:`Stream`), since
etcd3gw's watch is unusable (see DESIGN.md).

:meth:`Transport.post` and :meth:`Transport.open_stream` make one attempt against the current
endpoint. Whatever goes wrong is translated by :mod:`~distributedtask.etcd.errors` and raised as
one of its outcomes: a transient failure (:class:`~distributedtask.etcd.errors.RetryableError`)
first moves the current endpoint to the next one, so the caller's retry fails over. Retrying,
backing off and deadlines are the caller's policy, not this layer's.

Authentication: with a password, a token is obtained on first use and sent with every request;
when etcd rejects it, it is dropped, obtained anew and the request repeated once.

Thread-safety: every method may be called from any number of threads; the current endpoint and
the token are each behind a lock. Passwords and tokens never appear in ``repr``, logs or
exception messages.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit

import etcd3gw
import orjson
import requests
import requests.adapters
from etcd3gw import exceptions as gw_exceptions

from ..exceptions import EtcdError
from . import errors

__all__ = ["Stream", "Transport", "parse_endpoint"]

_T = TypeVar("_T")

MAX_CONNECT_TIMEOUT = 2.0


class _Gateway(Protocol):
    """The part of ``etcd3gw.Etcd3Client`` we use (etcd3gw is untyped)."""

    def post(
        self, url: str, *, json: object, headers: Mapping[str, str] | None = None
    ) -> object: ...


@runtime_checkable
class _Shutdownable(Protocol):
    def shutdown(self, how: int, /) -> None: ...


@dataclass(frozen=True)
class _Endpoint:
    url: str
    gateway: _Gateway

    def api(self, path: str) -> str:
        return f"{self.url}/v3/{path.lstrip('/')}"


def parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of ``[http[s]://]host[:port]``. Raises :class:`ValueError`."""
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


def _session(ca_cert: str | None, cert: str | None, key: str | None) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=64, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if ca_cert is not None:
        session.verify = ca_cert
    if cert is not None:
        session.cert = (cert, key) if key is not None else cert
    return session


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
                    raise errors.malformed_frame(self._endpoint) from None
                if isinstance(frame, dict):
                    yield frame
        except (requests.RequestException, OSError, ValueError, AttributeError) as exc:
            if self._closed.is_set():
                return
            raise errors.stream_broken(exc, self._endpoint) from None

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        sock = _socket_of(self._response)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._response.close()


def _socket_of(response: requests.Response) -> _Shutdownable | None:
    """The socket under a streaming response (urllib3 hides it in different places)."""
    raw = response.raw
    for holder in (getattr(raw, "_connection", None), getattr(raw, "connection", None)):
        sock = getattr(holder, "sock", None)
        if sock is not None:
            return sock if isinstance(sock, _Shutdownable) else None
    fp = getattr(raw, "_fp", None)
    fp = getattr(fp, "fp", None)
    sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock if isinstance(sock, _Shutdownable) else None


class Transport:
    """The endpoints, the session and the auth token of one client (see module doc).

    Raises :class:`ValueError` for a malformed endpoint.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float,
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        parsed = [parse_endpoint(endpoint) for endpoint in endpoints]
        self._connect_timeout = min(timeout, MAX_CONNECT_TIMEOUT)
        self._session = _session(ca_cert, cert, key)
        self._endpoints: list[_Endpoint] = []
        for scheme, host, port in parsed:
            gateway: _Gateway = etcd3gw.Etcd3Client(
                host=host,
                port=port,
                protocol=scheme,
                # requests takes a (connect, read) pair; etcd3gw passes it through untouched.
                timeout=(self._connect_timeout, timeout),  # type: ignore[arg-type]
                api_path="/v3/",
                session=self._session,
            )
            self._endpoints.append(_Endpoint(f"{scheme}://{host}:{port}", gateway))
        self._current = 0
        self._current_lock = threading.Lock()
        self._username = username
        self._password = password
        self._token: str | None = None
        self._token_lock = threading.Lock()

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self._endpoints]

    @property
    def current_url(self) -> str:
        with self._current_lock:
            return self._endpoints[self._current].url

    @property
    def authenticates(self) -> bool:
        return self._password is not None

    def close(self) -> None:
        self._session.close()

    # ---- one attempt ----------------------------------------------------------------------

    def post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>`` of the current endpoint; the decoded response.

        Raises an :data:`~distributedtask.etcd.errors.Outcome`.
        """

        def send(endpoint: _Endpoint, headers: dict[str, str]) -> dict[str, Any]:
            data = endpoint.gateway.post(endpoint.api(path), json=body, headers=headers)
            if not isinstance(data, dict):
                raise EtcdError(f"malformed etcd response to {path}", endpoint=endpoint.url)
            return data

        return self._attempt(send)

    def open_stream(self, path: str, body: Mapping[str, Any], read_timeout: float) -> Stream:
        """A streaming POST to ``/v3/<path>`` whose reads time out after ``read_timeout``.

        Raises an :data:`~distributedtask.etcd.errors.Outcome`.
        """

        def send(endpoint: _Endpoint, headers: dict[str, str]) -> Stream:
            response = self._session.post(
                endpoint.api(path),
                data=orjson.dumps(dict(body)),
                headers={"Content-Type": "application/json", **headers},
                stream=True,
                timeout=(self._connect_timeout, read_timeout),
            )
            if response.status_code != 200:
                text = response.text
                response.close()
                raise errors.classify_response(
                    response.status_code, text, endpoint.url, auth=self.authenticates
                )
            return Stream(response, endpoint.url)

        return self._attempt(send)

    def _attempt(self, send: Callable[[_Endpoint, dict[str, str]], _T]) -> _T:
        """``send`` to the current endpoint (and again after renewing a rejected token)."""
        with self._current_lock:
            index = self._current
        endpoint = self._endpoints[index]
        for renewal in (False, True):
            try:
                try:
                    return send(endpoint, self._auth_headers(endpoint))
                except gw_exceptions.Etcd3Exception as exc:
                    raise errors.classify_gateway(
                        exc, endpoint.url, auth=self.authenticates
                    ) from None
                except requests.RequestException as exc:  # raised outside etcd3gw's handling
                    raise errors.classify_transport(exc, endpoint.url) from None
            except errors.TokenRejectedError:
                if renewal:
                    raise EtcdError(
                        "etcd rejected a freshly obtained auth token", endpoint=endpoint.url
                    ) from None
                self.invalidate_token()
            except errors.RetryableError:
                self._fail_over(index)
                raise
        raise AssertionError("unreachable")

    def _fail_over(self, failed_index: int) -> None:
        if len(self._endpoints) > 1:
            with self._current_lock:
                if self._current == failed_index:
                    self._current = (failed_index + 1) % len(self._endpoints)

    # ---- authentication -------------------------------------------------------------------

    def invalidate_token(self) -> None:
        """Forget the token: the next request obtains a new one."""
        with self._token_lock:
            self._token = None

    def _auth_headers(self, endpoint: _Endpoint) -> dict[str, str]:
        if self._password is None:
            return {}
        with self._token_lock:
            if self._token is None:
                self._token = self._authenticate(endpoint)
            return {"Authorization": self._token}

    def _authenticate(self, endpoint: _Endpoint) -> str:
        try:
            data = endpoint.gateway.post(
                endpoint.api("auth/authenticate"),
                json={"name": self._username, "password": self._password},
            )
        except gw_exceptions.Etcd3Exception as exc:
            outcome = errors.classify_gateway(exc, endpoint.url, auth=True)
            raise errors.authentication_failed(outcome, self._username, endpoint.url) from None
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise EtcdError("etcd returned no auth token", endpoint=endpoint.url)
        return token
