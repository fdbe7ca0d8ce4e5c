"""The web console (``dtask ui``; the optional extra ``ui``: Starlette and uvicorn).

How a change reaches a page, in order:

1. one :class:`~distributedtask.etcd.watch.ResumableWatch` per server process follows the whole
   prefix (:mod:`.live`): the state it keeps is what every page shows — runs assembled by the
   read model, node rows in ``dtask wait``'s words, members;
2. each change becomes numbered events in an :class:`~.events.EventLog` (:mod:`.events`);
3. each open page follows that log over server-sent events (``GET /api/events``): a snapshot
   first, then every event after it; an ``EventSource`` that reconnects sends the id of the
   last event it got and receives only what it missed, so a page never needs a reload;
4. the pages (``static/``: plain HTML, CSS and JavaScript shipped in the wheel, no asset from
   the internet) build their elements from text nodes only, never from markup.

The JSON API (``/api/tasks``, ``/api/task``, ``/api/units``, ``/api/members``,
``/api/events``, ``/api/status``) and the security rules are in :mod:`.app`; the server's
lifecycle and threads in :mod:`.server`. Importing this package needs the ``ui`` extra.
"""

from __future__ import annotations

from .server import ConsoleServer

__all__ = ["ConsoleServer"]
