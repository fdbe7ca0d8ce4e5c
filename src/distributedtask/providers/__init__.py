"""Ready providers: register one per namespace with a ``Scheduler``.

- :class:`CommandProvider` (``distributedtask.providers.command``): the payload names a
  command (JSON ``{"argv": [...]}`` or ``{"shell": "..."}``, with optional ``env``, ``cwd``,
  ``timeout``); every node runs it in a process group of its own, keeps its output and exit
  status in a directory per run, reports ``progress: <fraction> [message]`` lines, and records
  exit status 0 as completion, anything else (with the tail of the output) as failure.
- :class:`~distributedtask.ThreadProvider` (``distributedtask.provider``): runs a Python
  function ``fn(task, context)`` on a thread per run.

Each module's docstring states its threading and failure semantics.
"""

from .command import CommandProvider

__all__ = ["CommandProvider"]
