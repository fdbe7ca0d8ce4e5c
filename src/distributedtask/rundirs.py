"""``RunDirs``: one directory per run under a provider's state directory; ``LocalRuns``: the runs
a function provider keeps local state for, in such directories or in memory.

Layout: ``<root>/<escaped task id>/<version>/``. The id is percent-encoded with no safe
characters (so ``/`` can never escape the root), ``.`` and ``..`` are escaped as ``%2E``, and an
id whose escape is longer than 200 bytes is stored as ``%~<sha256 of the id>`` with the id in a
``.id`` file, since file names are limited to 255 bytes. ``%~`` is never a canonical escape, so
the two forms cannot collide. Entries that this layout did not produce are ignored by
:meth:`RunDirs.list`, so a state directory may hold other files.

Used by :class:`~distributedtask.provider.ThreadProvider`,
:class:`~distributedtask.aio.AsyncThreadProvider` (both through :class:`LocalRuns`) and
:class:`~distributedtask.providers.command.CommandProvider`. Methods raise :class:`OSError`
only when the file system refuses; they are safe to call from several threads for different
runs (``LocalRuns`` from any threads).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import quote, unquote

from .model import TaskDescriptor

__all__ = ["LocalRuns", "RunDirs"]

ID_FILE = ".id"
MAX_ESCAPED_ID_BYTES = 200
HASHED_ID_PREFIX = "%~"
_VERSION_DIR = re.compile(r"[1-9][0-9]*")


def escape_id(task_id: str) -> str:
    """The directory name of a task id (see the module doc)."""
    escaped = quote(task_id, safe="")
    if escaped in (".", ".."):
        escaped = escaped.replace(".", "%2E")
    if len(escaped.encode()) > MAX_ESCAPED_ID_BYTES:
        return HASHED_ID_PREFIX + hashlib.sha256(task_id.encode()).hexdigest()
    return escaped


def _id_of_dir(id_dir: Path) -> str | None:
    """The task id a directory stands for; None for anything this layout did not make."""
    name = id_dir.name
    if name.startswith(HASHED_ID_PREFIX):
        try:
            task_id = (id_dir / ID_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
    else:
        try:
            task_id = unquote(name, errors="strict")
        except UnicodeDecodeError:
            return None
    return task_id if task_id and escape_id(task_id) == name else None


class RunDirs:
    """The run directories under ``root`` (created on first use)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, descriptor: TaskDescriptor) -> Path:
        """Where the run's directory is (whether or not it exists)."""
        return self.root / escape_id(descriptor.id) / str(descriptor.version)

    def create(self, descriptor: TaskDescriptor) -> Path:
        """Make the run's directory (and record a hashed id); returns it. Idempotent."""
        run_dir = self.path(descriptor)
        id_dir = run_dir.parent
        id_dir.mkdir(parents=True, exist_ok=True)
        if id_dir.name.startswith(HASHED_ID_PREFIX):
            (id_dir / ID_FILE).write_text(descriptor.id, encoding="utf-8")
        run_dir.mkdir(exist_ok=True)
        return run_dir

    def list(self) -> list[TaskDescriptor]:
        """Every run with a directory, sorted; a missing root means none."""
        found: list[TaskDescriptor] = []
        try:
            id_dirs = list(self.root.iterdir())
        except FileNotFoundError:
            return found
        for id_dir in id_dirs:
            if not id_dir.is_dir():
                continue
            task_id = _id_of_dir(id_dir)
            if task_id is None:
                continue
            with contextlib.suppress(OSError):  # removed while we looked
                for version_dir in id_dir.iterdir():
                    if _VERSION_DIR.fullmatch(version_dir.name) and version_dir.is_dir():
                        found.append(TaskDescriptor(task_id, int(version_dir.name)))
        return sorted(found)

    def remove(self, descriptor: TaskDescriptor) -> None:
        """Remove the run's directory, and its id's directory once empty. Idempotent."""
        run_dir = self.path(descriptor)
        try:
            shutil.rmtree(run_dir)
        except FileNotFoundError:
            if run_dir.exists():  # something inside vanished under us: once more
                shutil.rmtree(run_dir)
        id_dir = run_dir.parent
        if id_dir.name.startswith(HASHED_ID_PREFIX):
            with contextlib.suppress(OSError):
                if [entry.name for entry in id_dir.iterdir()] == [ID_FILE]:
                    (id_dir / ID_FILE).unlink()
        with contextlib.suppress(OSError):  # not empty: another version of the id is there
            id_dir.rmdir()


class LocalRuns:
    """The runs a provider keeps local state for: with ``state_dir``, a :class:`RunDirs`
    directory each (which survives a restart); without, an in-memory set."""

    def __init__(self, state_dir: str | Path | None) -> None:
        self.dirs = RunDirs(state_dir) if state_dir is not None else None
        self._lock = threading.Lock()
        self._runs: set[TaskDescriptor] = set()
        if self.dirs is not None:
            self.dirs.root.mkdir(parents=True, exist_ok=True)

    def open(self, descriptor: TaskDescriptor) -> Path | None:
        """Note that the run has local state; its directory (created), or None without one."""
        if self.dirs is not None:
            return self.dirs.create(descriptor)
        with self._lock:
            self._runs.add(descriptor)
        return None

    def list(self) -> list[TaskDescriptor]:
        """Every run with local state, sorted."""
        if self.dirs is not None:
            return self.dirs.list()
        with self._lock:
            return sorted(self._runs)

    def remove(self, descriptor: TaskDescriptor) -> None:
        """Forget the run's local state (remove its directory). Idempotent."""
        if self.dirs is not None:
            self.dirs.remove(descriptor)
            return
        with self._lock:
            self._runs.discard(descriptor)
