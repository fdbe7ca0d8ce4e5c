"""The console's ASGI application (Starlette): pages, the JSON API, the event stream, writes.

Routes (every response carries the headers of :data:`SECURITY_HEADERS`)::

    GET  /  /task?namespace=NS&id=ID  /members   the pages (one HTML shell, static/console.js)
    GET  /static/<file>                         the page's script, style sheet and icon
    GET  /api/status                            etcd reachable or not, revision, prefix, writes
    GET  /api/tasks[?namespace=&status=&sort=]  summaries, counts by status, namespaces
    GET  /api/task?namespace=NS&id=ID           one run with every node row (404: no such run)
    GET  /api/units?namespace=NS&id=ID          the units of a unit task, by group (404: no
                                                such run, or not a unit task; 503: etcd down)
    GET  /api/members                           the live members
    GET  /api/events[?namespace=NS&id=ID]       server-sent events (see console.events)
    POST /api/task/cancel|pause|resume          {"namespace", "id", "version"}: only with
                                                --allow-writes, the CSRF token and same origin

Everything read comes from the :class:`~distributedtask.console.live.LiveState` (its one
watch), but the units of a run: ``/api/units`` is one ``Manager.get_units`` read of the run's
current version (a page reads it when the stream says they changed), run on a worker thread of
the server's read executor. A write is one Manager call, run on a worker thread of the server's
write executor; its effect reaches the pages through the watch like any other change.

Security, by layer:

- **Host** — when the server listens on a loopback address, a request whose ``Host`` is not
  that address (or ``localhost``) at the server's port is refused (400): a page of another site
  cannot reach the console by DNS rebinding.
- **Writes** — refused (403) unless the server was started with ``allow_writes``; then each
  POST needs the server process's CSRF token (in the page's ``<meta name="dtask-csrf">``, sent
  back as ``X-CSRF-Token``), an ``Origin`` of this very host, a JSON body, and names the run's
  version, so it acts only on the run the user confirmed.
- **Markup** — the pages build every element with ``textContent`` (never ``innerHTML``), and the
  Content-Security-Policy allows scripts from this server only (no inline script), so nothing
  from etcd is ever executed or read as markup. JSON goes out as ``application/json``.

Threading: the app runs on the server's event loop; see :mod:`~distributedtask.console.server`.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import ipaddress
import secrets
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..exceptions import (
    DistributedTaskError,
    EtcdError,
    InvalidTaskError,
    TaskNotFoundError,
    TaskNotRunningError,
)
from ..manager import Manager
from ..model import Task
from . import views
from .events import keep_alive
from .live import LiveState

__all__ = ["SECURITY_HEADERS", "allowed_hosts", "build_app", "is_loopback"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Mapping[str, str] = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-store",
}
JSON = "application/json"
KEEP_ALIVE_SECONDS = 15.0
MAX_BODY = 4096
PAGES = ("/", "/task", "/members")
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=JSON)


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def _static_files() -> dict[str, tuple[bytes, str]]:
    """Every file of ``console/static`` (in the wheel), by name, with its content type."""
    folder = importlib.resources.files("distributedtask.console").joinpath("static")
    out = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in STATIC_TYPES:
            out[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    return out


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address to listen on) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The ``Host`` headers a server listening on ``host:port`` accepts; None: any (it listens
    on a non-loopback address, reached by names it cannot know)."""
    if not is_loopback(host):
        return None
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    names = {"127.0.0.1", "localhost", "[::1]", bracketed}
    return frozenset(f"{name}:{port}" for name in names) | (
        frozenset(names) if port == 80 else frozenset()
    )


class _Guard:
    """Outermost ASGI layer: refuses unexpected ``Host`` headers and adds the security headers
    to every response."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        if self.hosts is not None and host not in self.hosts:
            response = Response("unexpected Host header\n", 400, media_type="text/plain")
            await response(scope, receive, self._send_with_headers(send))
            return
        await self.app(scope, receive, self._send_with_headers(send))

    @staticmethod
    def _send_with_headers(send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.decode("latin-1").lower() not in SECURITY_HEADERS
                ]
                headers.extend((k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items())
                message = {**message, "headers": headers}
            await send(message)

        return wrapped


def _topic(request: Request) -> tuple[str, str] | Response | None:
    """The run a request names by ``namespace`` and ``id`` (both or neither), or a 400."""
    namespace = request.query_params.get("namespace")
    task_id = request.query_params.get("id")
    if namespace is None and task_id is None:
        return None
    if not namespace or not task_id:
        return _error(400, "give both namespace and id, or neither")
    return namespace, task_id


_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"x-accel-buffering", b"no"),  # a proxy in front must not hold events back
]


class _EventStream:
    """``GET /api/events``: one page's server-sent events (a raw ASGI endpoint, so that a
    client that goes away wakes the stream at once instead of at its next keep-alive)."""

    def __init__(self, state: LiveState, keep_alive_seconds: float) -> None:
        self.state = state
        self.keep_alive_seconds = keep_alive_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        topic = _topic(request)
        if isinstance(topic, Response):
            await topic(scope, receive, send)
            return
        if scope["method"] == "HEAD":  # the headers of a stream, without the endless body
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        last = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
        subscription = self.state.subscribe(topic, last)
        gone = False

        async def listen() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            subscription.waiter.event.set()

        listener = asyncio.create_task(listen())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            # A reconnecting EventSource waits this long (ms) after losing the stream.
            await self._send(send, b"retry: 1000\n\n")
            while not gone and not subscription.closed:
                subscription.waiter.event.clear()
                chunk = subscription.take()
                if chunk:
                    await self._send(send, chunk)
                    continue
                try:
                    await asyncio.wait_for(
                        subscription.waiter.event.wait(), self.keep_alive_seconds
                    )
                except asyncio.TimeoutError:
                    await self._send(send, keep_alive())
            if not gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we wrote
            pass
        finally:
            listener.cancel()
            subscription.close()

    @staticmethod
    async def _send(send: Send, body: bytes) -> None:
        await send({"type": "http.response.body", "body": body, "more_body": True})


class _Units:
    """``GET /api/units``: one ``Manager.get_units`` read of the run's current version."""

    def __init__(self, state: LiveState, executor: Executor) -> None:
        self.state = state
        self.executor = executor

    async def handle(self, request: Request) -> Response:
        topic = _topic(request)
        if isinstance(topic, Response):
            return topic
        if topic is None:
            return _error(400, "give namespace and id")
        namespace, task_id = topic
        found = self.state.task(namespace, task_id)
        if found is None:
            return _error(404, f"no task {namespace}/{task_id}")
        if not found["unitCount"]:
            return _error(404, f"task {namespace}/{task_id} has no units")
        version = found["version"]
        loop = asyncio.get_running_loop()
        get_units = self.state.manager.get_units
        try:
            got = await loop.run_in_executor(self.executor, get_units, namespace, task_id, version)
        except (TaskNotFoundError, InvalidTaskError) as exc:  # replaced or removed meanwhile
            return _error(404, str(exc))
        except EtcdError as exc:
            return _error(503, str(exc))
        except DistributedTaskError as exc:  # an unreadable value
            return _error(500, str(exc))
        return _json(views.units(namespace, task_id, version, got))


class _Writes:
    """``POST /api/task/{cancel,pause,resume}`` and the checks before them."""

    def __init__(
        self,
        manager: Manager,
        allow: bool,
        token: str,
        executor: Executor,
    ) -> None:
        self.allow = allow
        self.token = token
        self.executor = executor
        self.actions: dict[str, Callable[[str, str, int], Task]] = {
            "cancel": manager.cancel_task,
            "pause": manager.pause_task,
            "resume": manager.resume_task,
        }

    def refusal(self, request: Request) -> Response | None:
        """Why this POST may not write (a 403 or 415), or None."""
        if not self.allow:
            return _error(403, "this console is read-only: start it with --allow-writes")
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin not in (f"http://{host}", f"https://{host}"):
            return _error(403, "cross-origin request refused")
        if request.headers.get("sec-fetch-site", "same-origin") != "same-origin":
            return _error(403, "cross-site request refused")
        sent = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent.encode(), self.token.encode()):
            return _error(403, "missing or wrong CSRF token")
        if request.headers.get("content-type", "").split(";")[0].strip() != JSON:
            return _error(415, "the body must be application/json")
        return None

    async def handle(self, request: Request) -> Response:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        action = self.actions.get(request.path_params["action"])
        if action is None:
            return _error(404, "no such action: cancel, pause or resume")
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(413, "body too large")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "the body is not JSON")
        if not isinstance(data, dict):
            return _error(400, 'the body must be {"namespace", "id", "version"}')
        namespace, task_id, version = data.get("namespace"), data.get("id"), data.get("version")
        if not (
            isinstance(namespace, str)
            and isinstance(task_id, str)
            and type(version) is int
            and version > 0
        ):
            return _error(400, "namespace and id must be strings, version a positive integer")
        loop = asyncio.get_running_loop()
        try:
            task = await loop.run_in_executor(self.executor, action, namespace, task_id, version)
        except TaskNotFoundError as exc:
            return _error(404, str(exc))
        except InvalidTaskError as exc:
            return _error(400, str(exc))
        except TaskNotRunningError as exc:
            return _error(409, str(exc))
        except EtcdError as exc:
            return _error(503, str(exc))
        except DistributedTaskError as exc:
            return _error(409, str(exc))
        return _json(
            {
                "namespace": task.namespace,
                "ID": task.id,
                "version": task.version,
                "status": task.status.value,
            }
        )


def build_app(
    state: LiveState,
    *,
    host: str,
    port: int,
    allow_writes: bool,
    executor: Executor,
    read_executor: Executor | None = None,
    keep_alive_seconds: float = KEEP_ALIVE_SECONDS,
) -> ASGIApp:
    """The console of ``state`` as an ASGI app, for a server listening on ``host:port``.

    ``allow_writes`` enables the POST routes; ``executor`` runs their Manager calls, and
    ``read_executor`` (default: ``executor``) the reads of ``/api/units`` (their owner shuts
    them down). Raises :class:`FileNotFoundError` if the static files are missing (a broken
    install).
    """
    reads = executor if read_executor is None else read_executor
    token = secrets.token_urlsafe(32) if allow_writes else ""
    files = _static_files()
    if "console.html" not in files:
        raise FileNotFoundError("distributedtask/console/static/console.html is not installed")
    shell = (
        files["console.html"][0]
        .replace(b"{{writes}}", b"true" if allow_writes else b"false")
        .replace(b"{{csrf}}", token.encode())
    )
    writes = _Writes(state.manager, allow_writes, token, executor)

    async def page(request: Request) -> Response:
        return Response(shell, media_type=STATIC_TYPES[".html"])

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        found = files.get(name)
        if found is None or name == "console.html":  # the shell is served filled in, above
            return Response("not found\n", 404, media_type="text/plain")
        return Response(found[0], media_type=found[1])

    async def status(request: Request) -> Response:
        return _json({**state.status(), "writes": allow_writes})

    async def tasks(request: Request) -> Response:
        params = request.query_params
        revision, every = state.tasks()
        namespace = params.get("namespace") or None
        try:
            chosen = views.select_tasks(
                every,
                namespace=namespace,
                status=params.get("status") or None,
                sort=params.get("sort") or "name",
            )
        except ValueError as exc:
            return _error(400, str(exc))
        in_namespace = [t for t in every if namespace is None or t["namespace"] == namespace]
        return _json(
            {
                "revision": revision,
                "namespaces": sorted({t["namespace"] for t in every}),
                "counts": views.status_counts(in_namespace),
                "tasks": chosen,
            }
        )

    async def task(request: Request) -> Response:
        topic = _topic(request)
        if isinstance(topic, Response):
            return topic
        if topic is None:
            return _error(400, "give namespace and id")
        found = state.task(*topic)
        if found is None:
            return _error(404, f"no task {topic[0]}/{topic[1]}")
        return _json(found)

    async def members(request: Request) -> Response:
        return _json({"members": state.members()})

    async def not_found(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/api/"):
            return _error(404, "no such API route")
        return Response("not found\n", 404, media_type="text/plain")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        if request.method == "POST":  # a forged POST to a read route: say why, as for writes
            refused = writes.refusal(request)
            if refused is not None:
                return refused
        return _error(405, "method not allowed")

    routes = [
        *(Route(path, page, methods=["GET"]) for path in PAGES),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/api/status", status, methods=["GET"]),
        Route("/api/tasks", tasks, methods=["GET"]),
        Route("/api/task", task, methods=["GET"]),
        Route("/api/units", _Units(state, reads).handle, methods=["GET"]),
        Route("/api/members", members, methods=["GET"]),
        Route("/api/events", _EventStream(state, keep_alive_seconds), methods=["GET"]),
        Route("/api/task/{action}", writes.handle, methods=["POST"]),
    ]
    handlers: dict[Any, Callable[..., Any]] = {404: not_found, 405: not_allowed}
    app = Starlette(routes=routes, exception_handlers=handlers)
    return _Guard(app, allowed_hosts(host, port))
