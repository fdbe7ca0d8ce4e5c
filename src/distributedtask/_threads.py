"""Stopping a background thread: join it with a bound, and say where it is stuck if it will not end.

Every background thread of the library is named and daemonic and waits on an ``Event``; its
owner's ``stop()`` sets the event, wakes whatever the thread blocks on, then calls
:func:`stop_and_join`. A thread still alive after the timeout is left running (being daemonic,
it cannot keep the process alive) and reported with a WARNING that carries its current stack:
the blocking call is what one needs to see. Thread-safe; never raises.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback

__all__ = ["stop_and_join"]


def stop_and_join(
    thread: threading.Thread | None,
    *,
    timeout: float | None,
    logger: logging.Logger,
    what: str,
) -> bool:
    """Join ``thread`` for up to ``timeout`` seconds (None: without bound); True if it ended.

    Nothing to join — None, a thread never started, or the calling thread itself (an owner
    stopped from its own thread's callback: the thread ends once the callback returns) — is
    True. A thread still alive after ``timeout`` is logged on ``logger`` as a WARNING naming
    ``what``, the thread and its current stack, and the result is False.
    """
    if thread is None or thread.ident is None or thread is threading.current_thread():
        return True
    thread.join(timeout)
    if not thread.is_alive():
        return True
    frame = sys._current_frames().get(thread.ident)
    stack = "".join(traceback.format_stack(frame)).rstrip() if frame is not None else "?"
    logger.warning(
        "%s (thread %s) did not stop within %s s; it is at:\n%s", what, thread.name, timeout, stack
    )
    return False
