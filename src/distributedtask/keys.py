"""The key schema: the only module that builds or parses etcd keys.

Under a prefix ``P`` (``"/distributedtask"`` by default)::

    P/tasks/<ns>/<id>                       the task record: the current run of (ns, id);
                                            never rewritten while the run exists
    P/outcomes/<ns>/<id>                    how the run ended: FINISHED, FAILED or CANCELLED;
                                            absent while it is STARTED
    P/runs/<ns>/<id>/<node>                 one node's part in the current run: pending
                                            (written with the task record) or completed
    P/progress/<ns>/<id>/<version>/<node>   one node's latest progress report for a run
    P/members/<node>                        a live Scheduler's membership (lease-bound)

The run keys of the DESIGN carried the version in the key; they do not here, and that is
deliberate: the run's node keys are written *in the same transaction as the task record*, when
the version (that transaction's revision) is not yet known. Having one key per assigned node
lets etcd itself enforce "only an assigned node may record" with a compare
(``create_revision > 0``), and tell "no node is pending" with another (a pending key's
``mod_revision`` is the version), in the one round trip of a completion; replacing or removing
a run deletes them atomically, so they always belong to the current run.

Every name segment is percent-encoded (``urllib.parse.quote`` with no safe characters), so a
``/`` inside a namespace, id or node id can never forge another key, and every prefix we range
over ends in ``/`` so id ``a`` never matches id ``ab``. Keys are UTF-8 bytes.

Parsing is total: :meth:`Keys.parse` returns ``None`` for any key that is not ours (foreign keys
under the prefix, bad escapes, wrong shape) rather than raising. Pure functions; thread-safe.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from .exceptions import InvalidTaskError
from .model import validate_name

__all__ = [
    "Keys",
    "MemberKey",
    "OutcomeKey",
    "ProgressKey",
    "RunKey",
    "TaskKey",
    "prefix_range_end",
]


def _esc(segment: str) -> str:
    return quote(segment, safe="", encoding="utf-8", errors="strict")


_PLAIN = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9_.~-]{0,255}")  # its own escape, a valid name


def _unesc(segment: str) -> str | None:
    """The name a segment encodes, or None if it is not exactly what :func:`_esc` produces
    from a valid name."""
    if _PLAIN.fullmatch(segment) and segment not in (".", ".."):
        return segment  # the common case, without decoding and re-encoding
    return _unesc_general(segment)


@functools.lru_cache(maxsize=4096)
def _unesc_general(segment: str) -> str | None:
    try:
        name = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not name or _esc(name) != segment:
        return None
    try:
        return validate_name(name, "name")
    except InvalidTaskError:
        return None


def prefix_range_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that makes ``[prefix, range_end)`` exactly the keys under prefix."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


@dataclass(frozen=True)
class TaskKey:
    """``P/tasks/<namespace>/<task_id>``."""

    namespace: str
    task_id: str


@dataclass(frozen=True)
class OutcomeKey:
    """``P/outcomes/<namespace>/<task_id>``."""

    namespace: str
    task_id: str


@dataclass(frozen=True)
class RunKey:
    """``P/runs/<namespace>/<task_id>/<node_id>``."""

    namespace: str
    task_id: str
    node_id: str


@dataclass(frozen=True)
class ProgressKey:
    """``P/progress/<namespace>/<task_id>/<version>/<node_id>``."""

    namespace: str
    task_id: str
    version: int
    node_id: str


@dataclass(frozen=True)
class MemberKey:
    """``P/members/<node_id>``."""

    node_id: str


ParsedKey = TaskKey | OutcomeKey | RunKey | ProgressKey | MemberKey


RESERVED_SEGMENTS = frozenset({"tasks", "outcomes", "runs", "progress", "members"})


class Keys:
    """Builds and parses every key under one prefix.

    ``prefix`` must be a non-empty string; a trailing ``/`` is ignored, so ``"/a"`` and
    ``"/a/"`` name the same tree. None of its ``/``-separated segments may be one of the names
    the schema uses below a prefix (``tasks``, ``outcomes``, ``runs``, ``progress``,
    ``members``): otherwise the tree of prefix ``/a/runs`` would lie inside the run keys of
    prefix ``/a``, and two prefixes must never meet. Raises :class:`ValueError`.
    """

    def __init__(self, prefix: str) -> None:
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ValueError(
                f"prefix must be a non-empty path such as '/distributedtask': {prefix!r}"
            )
        reserved = RESERVED_SEGMENTS.intersection(prefix.split("/"))
        if reserved:
            raise ValueError(f"prefix {prefix!r} uses the reserved segment {sorted(reserved)[0]!r}")
        self.prefix = prefix.rstrip("/")
        self.root = (self.prefix + "/").encode("utf-8")
        self._tasks = self.root + b"tasks/"
        self._outcomes = self.root + b"outcomes/"
        self._runs = self.root + b"runs/"
        self._progress = self.root + b"progress/"
        self._members = self.root + b"members/"

    def __repr__(self) -> str:
        return f"Keys({self.prefix!r})"

    # ---- builders -------------------------------------------------------------------------

    def task(self, namespace: str, task_id: str) -> bytes:
        return self._tasks + f"{_esc(namespace)}/{_esc(task_id)}".encode()

    def all_tasks(self) -> bytes:
        """Prefix of every task record."""
        return self._tasks

    def outcome(self, namespace: str, task_id: str) -> bytes:
        return self._outcomes + f"{_esc(namespace)}/{_esc(task_id)}".encode()

    def all_outcomes(self) -> bytes:
        return self._outcomes

    def task_runs(self, namespace: str, task_id: str) -> bytes:
        """Prefix of the node keys of the current run of (ns, id)."""
        return self._runs + f"{_esc(namespace)}/{_esc(task_id)}/".encode()

    def run(self, namespace: str, task_id: str, node_id: str) -> bytes:
        return self.task_runs(namespace, task_id) + _esc(node_id).encode()

    def all_runs(self) -> bytes:
        return self._runs

    def task_progress_root(self) -> bytes:
        """Prefix of every progress key."""
        return self._progress

    def task_progress(self, namespace: str, task_id: str) -> bytes:
        return self._progress + f"{_esc(namespace)}/{_esc(task_id)}/".encode()

    def version_progress(self, namespace: str, task_id: str, version: int) -> bytes:
        return self.task_progress(namespace, task_id) + f"{version}/".encode()

    def progress(self, namespace: str, task_id: str, version: int, node_id: str) -> bytes:
        return self.version_progress(namespace, task_id, version) + _esc(node_id).encode()

    def member(self, node_id: str) -> bytes:
        return self._members + _esc(node_id).encode()

    def all_members(self) -> bytes:
        return self._members

    # ---- parser ---------------------------------------------------------------------------

    def parse(self, key: bytes) -> ParsedKey | None:
        """What ``key`` names, or ``None`` if it is not a key of this schema."""
        if not key.startswith(self.root):
            return None
        try:
            rest = key[len(self.root) :].decode("ascii")
        except UnicodeDecodeError:
            return None
        kind, _, tail = rest.partition("/")
        parts = tail.split("/")
        if kind in ("tasks", "outcomes") and len(parts) == 2:
            ns, tid = (_unesc(p) for p in parts)
            if not (ns and tid):
                return None
            return TaskKey(ns, tid) if kind == "tasks" else OutcomeKey(ns, tid)
        if kind == "runs" and len(parts) == 3:
            ns, tid, node = (_unesc(p) for p in parts)
            return RunKey(ns, tid, node) if ns and tid and node else None
        if kind == "progress" and len(parts) == 4:
            ns, tid, node = _unesc(parts[0]), _unesc(parts[1]), _unesc(parts[3])
            version = parts[2]
            canonical = (
                version.isascii()
                and version.isdigit()
                and len(version) <= 19
                and version == str(int(version))
                and int(version) < 2**63
                and int(version) > 0
            )
            if not (ns and tid and node and canonical):
                return None
            return ProgressKey(ns, tid, int(version), node)
        if kind == "members" and len(parts) == 1:
            node = _unesc(parts[0])
            return MemberKey(node) if node else None
        return None
