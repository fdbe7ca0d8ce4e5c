"""``CommandProvider``: a ready Provider that runs a command on every node (POSIX only).

The payload of a task is a JSON object (build it with :meth:`CommandProvider.payload`)::

    {"argv": ["prog", "arg", ...]}          exactly one of "argv" and "shell"
    {"shell": "prog arg | other"}            run as ["/bin/sh", "-c", shell]
     "env": {"NAME": "value", ...}           optional, added to the environment
     "cwd": "/some/dir"                      optional, default: the provider's working directory
     "timeout": 30                           optional, seconds (> 0) from the start of the command

A ``null`` value counts as absent; any other key is an error, so that a misspelt ``"timout"``
does not silently run without a timeout.

The command's environment is this process's, then the provider's ``env``, then the payload's
``env``, then ``DTASK_NAMESPACE``, ``DTASK_TASK_ID``, ``DTASK_TASK_VERSION`` and
``DTASK_RUN_DIR`` (the run's directory, scratch space the command may use). Its stdin is
``/dev/null``; stdout and stderr are merged into one pipe.

Local state: one directory per run, ``<state_dir>/<escaped id>/<version>/`` (the layout of
:mod:`distributedtask.rundirs`), with
``output.log`` (everything the command printed) and ``status.json`` (written when the run is
over: ``pid``, ``exit_code``, ``signal``, ``timed_out``, ``terminated``, ``error``,
``started_at``, ``ended_at``). The id is percent-escaped (``quote(id, safe="")``, and ``.`` /
``..`` as ``%2E``); an id whose escape is longer than 200 bytes is stored as ``%~<sha256>`` with
the id in a ``.id`` file, because file names are limited to 255 bytes. A new provider on the
same ``state_dir`` lists the runs it finds (:meth:`~CommandProvider.get_local_tasks`); a
second start of a run (after a restart) empties its directory first. One provider instance
serves one namespace (the directory layout has no namespace level).

Threading: ``start_task`` spawns the command (``start_new_session=True``: the command leads
a process group of its own) and returns at once; a named daemon watcher thread per run
(``dtask-cmd-...``) reads the output line by line as it comes, writes it to ``output.log``,
turns ``progress: <fraction> [message]`` lines (on stdout or stderr) into
``record_progress``, enforces the timeout, and sends every signal. The watcher is the only
thread that signals or reaps the command, and it reaps the group leader last, so the process
group id can never be reused while it still signals it. Recorder calls are made on the
watcher thread: a slow recorder delays reading the output (the command blocks on a full pipe)
but loses nothing. :meth:`CommandHandle.terminate` only flags the run and wakes the watcher;
it never blocks.

A run is its process group. It ends in one of these ways, decided once, first come:

- the command exits: exit status 0 records completion; a non-zero status or a signal records
  a failure (``"exit status 3: <tail>"``, ``"killed by signal 9 (SIGKILL): <tail>"``);
- the payload's ``timeout`` passes: the group gets SIGTERM, SIGKILL after ``kill_grace``
  seconds, and a failure ``"timed out after 30s: <tail>"`` is recorded;
- ``terminate()``: SIGTERM to the group, SIGKILL after ``kill_grace`` seconds if the command
  or anything holding its output is still alive; nothing is recorded.

``<tail>`` is the last ``output_tail_lines`` lines of output (progress lines included; each
line cut at 1000 characters, the whole kept to its last 3500, as the Manager keeps only the
first 4096 characters of an error). When
the command has exited, whatever it left running in its group is stopped too: SIGTERM, then,
once nothing holds the output pipe any more (or after ``kill_grace``), SIGKILL to what is left.
A process meant to outlive its task must leave the group (``setsid``).

Failure semantics: a payload that does not parse, or a command that cannot be started
(missing executable or ``cwd``), records a failure with the reason; ``start_task`` then
returns a handle that has already finished, and never raises for the task's own faults. It
raises :class:`OSError` only when the run's directory cannot be created (a problem of this
node: the Scheduler retries with backoff). Recorder exceptions are logged, never propagated.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import io
import logging
import math
import os
import re
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import orjson

from ..exceptions import InvalidTaskError
from ..model import Task, TaskDescriptor, format_time
from ..provider import TaskCompletionRecorder
from ..rundirs import RunDirs

__all__ = ["CommandHandle", "CommandProvider", "CommandSpec", "parse_payload", "parse_progress"]

log = logging.getLogger("distributedtask.providers.command")

SHELL = "/bin/sh"
OUTPUT_LOG = "output.log"
STATUS_JSON = "status.json"

_PAYLOAD_KEYS = ("argv", "shell", "env", "cwd", "timeout")
_PROGRESS = re.compile(r"progress:[ \t]*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?:[ \t]+(.*))?")
_MAX_LINE_BYTES = 64 * 1024  # a longer line without a newline is cut there (tail and progress)
_MAX_TAIL_LINE_CHARS = 1000
# the Manager keeps the first 4096 characters of an error; the end of the output matters most
_MAX_TAIL_CHARS = 3500
_READ_SIZE = 64 * 1024
_MAX_SELECT_WAIT = 3600.0  # epoll refuses very large timeouts; the loop recomputes anyway
_EXIT_POLL = 0.05  # how often to look for the exit where no pidfd tells us


class _Ready(enum.Enum):
    """What a ready file descriptor of a run's wait loop is."""

    OUTPUT = "output"  # the child's stdout/stderr pipe
    WAKE = "wake"  # terminate() asked the loop to look
    EXIT = "exit"  # the child's pidfd: it exited


# ---- the payload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandSpec:
    """A parsed payload: exactly one of ``argv`` and ``shell`` is set."""

    argv: tuple[str, ...] | None = None
    shell: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = None

    @property
    def args(self) -> list[str]:
        """What is executed: ``argv``, or ``[/bin/sh, -c, shell]``."""
        if self.argv is not None:
            return list(self.argv)
        assert self.shell is not None
        return [SHELL, "-c", self.shell]

    def to_json(self) -> bytes:
        """The payload form (keys that are unset are left out)."""
        data: dict[str, object] = {}
        if self.argv is not None:
            data["argv"] = list(self.argv)
        if self.shell is not None:
            data["shell"] = self.shell
        if self.env:
            data["env"] = dict(self.env)
        if self.cwd is not None:
            data["cwd"] = self.cwd
        if self.timeout is not None:
            data["timeout"] = self.timeout
        return orjson.dumps(data)


class _BadPayloadError(ValueError):
    """A payload fault, before it is worded as an InvalidTaskError (or a ValueError)."""


def _invalid(detail: str) -> InvalidTaskError:
    return InvalidTaskError(f"invalid command payload: {detail}", "payload")


def _check_text(value: object, what: str, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _BadPayloadError(f"{what} must be a string, not {type(value).__name__}")
    if not value and not empty:
        raise _BadPayloadError(f"{what} must not be empty")
    if "\0" in value:
        raise _BadPayloadError(f"{what} must not contain a NUL character")
    return value


def _check_env(value: object, what: str = "env") -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise _BadPayloadError(f"{what} must be an object of strings, not {type(value).__name__}")
    env: dict[str, str] = {}
    for name, text in value.items():
        _check_text(name, f"{what} name")
        if "=" in name:
            raise _BadPayloadError(f"{what} name {name!r} must not contain '='")
        env[name] = _check_text(text, f"{what}[{name!r}]", empty=True)
    return env


def _spec_from(data: object) -> CommandSpec:
    """Validate a decoded payload. Raises :class:`InvalidTaskError` (field ``"payload"``)."""
    try:
        return _checked_spec(data)
    except _BadPayloadError as exc:
        raise _invalid(str(exc)) from None


def _checked_spec(data: object) -> CommandSpec:
    if not isinstance(data, dict):
        raise _BadPayloadError(f"expected a JSON object, not {type(data).__name__}")
    unknown = sorted(str(key) for key in data if key not in _PAYLOAD_KEYS)
    if unknown:
        raise _BadPayloadError(f"unknown keys {unknown}; allowed: {list(_PAYLOAD_KEYS)}")
    argv, shell = data.get("argv"), data.get("shell")
    if (argv is None) == (shell is None):
        raise _BadPayloadError("needs exactly one of 'argv' and 'shell'")
    checked_argv: tuple[str, ...] | None = None
    if argv is not None:
        if not isinstance(argv, (list, tuple)):
            raise _BadPayloadError(f"argv must be a list of strings, not {type(argv).__name__}")
        if not argv:
            raise _BadPayloadError("argv must not be empty")
        checked_argv = tuple(
            _check_text(arg, f"argv[{i}]", empty=i > 0) for i, arg in enumerate(argv)
        )
    if shell is not None:
        shell = _check_text(shell, "shell")
    env = _check_env(data["env"]) if data.get("env") is not None else {}
    cwd = _check_text(data["cwd"], "cwd") if data.get("cwd") is not None else None
    timeout = data.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise _BadPayloadError(f"timeout must be a number of seconds, not {timeout!r}")
        if not math.isfinite(timeout) or timeout <= 0:
            raise _BadPayloadError(f"timeout must be a positive number of seconds, not {timeout!r}")
        timeout = float(timeout)
    return CommandSpec(argv=checked_argv, shell=shell, env=env, cwd=cwd, timeout=timeout)


def parse_payload(payload: bytes) -> CommandSpec:
    """Parse a task payload (see the module doc).

    Raises :class:`~distributedtask.InvalidTaskError` (field ``"payload"``, message starting
    with ``"invalid command payload"``) for anything else than a valid JSON command object.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise _invalid(f"expected bytes, not {type(payload).__name__}")
    try:
        data = orjson.loads(bytes(payload))
    except orjson.JSONDecodeError as exc:
        raise _invalid(f"not JSON ({exc})") from None
    return _spec_from(data)


# ---- the local state -----------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _write_json_atomically(path: Path, data: Mapping[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    os.replace(tmp, path)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ---- one run -------------------------------------------------------------------------------


class _Outcome:
    EXITED = "exited"
    TIMED_OUT = "timed out"
    TERMINATED = "terminated"


class _Lines:
    """Splits the output stream into lines; keeps the tail and finds progress lines."""

    def __init__(self, tail_lines: int) -> None:
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._partial = b""

    def feed(self, chunk: bytes) -> list[str]:
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        while len(self._partial) > _MAX_LINE_BYTES:
            complete.append(self._partial[:_MAX_LINE_BYTES])
            self._partial = self._partial[_MAX_LINE_BYTES:]
        return [self._line(raw) for raw in complete]

    def close(self) -> list[str]:
        rest, self._partial = self._partial, b""
        return [self._line(rest)] if rest else []

    def _line(self, raw: bytes) -> str:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if self.tail.maxlen:
            self.tail.append(text[:_MAX_TAIL_LINE_CHARS])
        return text


def parse_progress(line: str) -> tuple[float, str] | None:
    """``(fraction, message)`` for a line ``progress: <fraction> [message]``, else None.

    The fraction is clamped to [0, 1]; a line whose number is not finite is not progress.
    """
    match = _PROGRESS.fullmatch(line.strip())
    if match is None:
        return None
    fraction = float(match.group(1))
    if not math.isfinite(fraction):
        return None
    return min(1.0, max(0.0, fraction)), (match.group(2) or "").strip()


class CommandHandle:
    """One run of a command (a :class:`~distributedtask.TaskHandle`).

    ``pid`` is the command's process id (also its process group id) once spawned;
    ``returncode`` is set when it was reaped (negative: killed by that signal); ``error`` is
    the failure recorded, if any. :meth:`terminate` never blocks; :meth:`wait` does.
    """

    def __init__(
        self,
        provider: CommandProvider,
        task: Task,
        run_dir: Path,
        spec: CommandSpec | None,
        previous: CommandHandle | None = None,
    ) -> None:
        self.task = task
        self.run_dir = run_dir
        self.pid: int | None = None
        self.returncode: int | None = None
        self.error: str | None = None
        self.outcome: str | None = None
        self._provider = provider
        self._spec = spec
        self._previous = previous
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._terminate_requested = False
        self._wake_r = self._wake_w = -1
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: io.BufferedWriter | None = None
        self._started_at: datetime | None = None
        self._started_mono = 0.0
        self._thread: threading.Thread | None = None
        self._reaped_elsewhere = False

    def __repr__(self) -> str:
        task = self.task
        state = "done" if self._done.is_set() else "running"
        return f"<CommandHandle {task.namespace}/{task.id} v{task.version} pid={self.pid} {state}>"

    # ---- the public face ----------------------------------------------------------------

    def terminate(self) -> None:
        """Stop the run: SIGTERM to its process group now, SIGKILL after ``kill_grace``
        (sent by the watcher thread). Returns at once; a no-op if the run already ended.
        Nothing is recorded for a terminated run. The local state is kept. Never raises."""
        with self._lock:
            if self._done.is_set() or self._terminate_requested:
                return
            self._terminate_requested = True
            if self._wake_w >= 0:
                with contextlib.suppress(OSError):  # a full pipe wakes the watcher already
                    os.write(self._wake_w, b"x")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the run is over (reaped, ``status.json`` written, outcome recorded);
        True if it is, False after ``timeout`` seconds."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        """Whether the run is over."""
        return self._done.is_set()

    @property
    def terminating(self) -> bool:
        """Whether :meth:`terminate` was called."""
        with self._lock:
            return self._terminate_requested

    # ---- start ----------------------------------------------------------------------------

    def _start(self, invalid: str | None) -> None:
        """Called by the provider: fail at once, or spawn now, or let the watcher spawn
        once the previous handle of the same run is over."""
        if invalid is not None:
            if self._prepare_log(invalid):
                self._finish(_Outcome.EXITED, invalid)
            self._done.set()
            return
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        task = self.task
        try:
            if self._previous is None and not self._spawn():
                self._close_wake()
                self._done.set()
                self._provider._forget(self)
                return
            self._thread = threading.Thread(
                target=self._watch,
                name=f"dtask-cmd-{task.namespace}-{task.id}-{task.version}"[:80],
                daemon=True,
            )
            self._thread.start()
        except BaseException:  # no watcher: leave nothing running behind
            self._kill_and_reap()
            self._close_wake()
            self._done.set()
            self._provider._forget(self)
            raise

    def _close_wake(self) -> None:
        with self._lock:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def _prepare_log(self, first_line: str | None = None) -> bool:
        """(Re)create the run directory and an empty output.log; False (recorded) if not."""
        self._started_at = _now()
        self._started_mono = time.monotonic()
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / STATUS_JSON).unlink()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.run_dir / OUTPUT_LOG, "wb")  # noqa: SIM115 closed by _finish
            if first_line is not None:
                self._log_file.write(first_line.encode() + b"\n")
        except OSError as exc:
            self._finish(_Outcome.EXITED, f"cannot write {OUTPUT_LOG}: {exc}")
            return False
        return True

    def _log(self) -> io.BufferedWriter:
        assert self._log_file is not None
        return self._log_file

    def _spawn(self) -> bool:
        """Start the command; False when it could not start (the failure is recorded)."""
        spec = self._spec
        assert spec is not None
        if not self._prepare_log():
            return False
        task = self.task
        env = dict(os.environ)
        env.update(self._provider._env)
        env.update(spec.env)
        env.update(
            DTASK_NAMESPACE=task.namespace,
            DTASK_TASK_ID=task.id,
            DTASK_TASK_VERSION=str(task.version),
            DTASK_RUN_DIR=str(self.run_dir),
        )
        try:
            proc = subprocess.Popen(
                spec.args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=spec.cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            message = f"cannot start {spec.args[0]!r}: {exc}"
            with contextlib.suppress(OSError):
                self._log().write(message.encode() + b"\n")
            self._finish(_Outcome.EXITED, message)
            return False
        self._proc = proc
        self.pid = proc.pid
        # the program only: arguments and environment may hold secrets
        log.info(
            "started %s/%s v%d: pid %d, %s",
            task.namespace,
            task.id,
            task.version,
            proc.pid,
            spec.args[0] if spec.argv is not None else "shell command",
        )
        return True

    # ---- the watcher thread ---------------------------------------------------------------

    def _watch(self) -> None:
        try:
            previous, self._previous = self._previous, None
            if previous is not None:
                previous.wait()
                if self.terminating or not self._spawn():
                    return
            self._supervise()
        except Exception as exc:  # the watcher must always reap and tell
            log.exception("watcher of %s failed", self)
            self._kill_and_reap()
            self._finish(
                _Outcome.TERMINATED if self.terminating else _Outcome.EXITED,
                f"command watcher failed: {exc!r}",
            )
        finally:
            self._close_wake()
            self._done.set()
            self._provider._forget(self)

    def _supervise(self) -> None:  # noqa: PLR0915 - one select loop; its state is its locals
        proc, spec = self._proc, self._spec
        assert proc is not None and proc.stdout is not None and spec is not None
        grace = self._provider.kill_grace
        out_fd = proc.stdout.fileno()
        os.set_blocking(out_fd, False)
        lines = _Lines(self._provider.output_tail_lines)
        deadline = self._started_mono + spec.timeout if spec.timeout is not None else None
        outcome: str | None = None
        exited = eof = kill_sent = False
        term_at: float | None = None
        pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # pidfd: Linux >= 5.3
            pidfd = os.pidfd_open(proc.pid)
        with selectors.DefaultSelector() as selector:
            selector.register(out_fd, selectors.EVENT_READ, _Ready.OUTPUT)
            selector.register(self._wake_r, selectors.EVENT_READ, _Ready.WAKE)
            if pidfd is not None:
                selector.register(pidfd, selectors.EVENT_READ, _Ready.EXIT)
            try:
                while True:
                    now = time.monotonic()
                    if outcome is None:
                        if self.terminating:
                            outcome = _Outcome.TERMINATED
                        elif deadline is not None and now >= deadline:
                            outcome = _Outcome.TIMED_OUT
                            log.info("%s timed out after %gs", self, spec.timeout)
                        if outcome is not None and term_at is None:
                            self._signal_group(signal.SIGTERM)
                            term_at = now
                    if not exited and self._leader_exited():
                        exited = True
                        eof = eof or self._drain(out_fd, lines, limit=64)
                        if outcome is None:
                            outcome = _Outcome.EXITED
                        if not eof and term_at is None:  # it left something in its group
                            self._signal_group(signal.SIGTERM)
                            term_at = now
                    if term_at is not None and not kill_sent and now >= term_at + grace:
                        self._signal_group(signal.SIGKILL)
                        kill_sent = True
                    if exited and (eof or kill_sent):
                        break
                    waits = [_MAX_SELECT_WAIT]
                    if outcome is None and deadline is not None:
                        waits.append(deadline - now)
                    if term_at is not None and not kill_sent:
                        waits.append(term_at + grace - now)
                    if not exited and pidfd is None:
                        waits.append(_EXIT_POLL)
                    for key, _ in selector.select(max(0.0, min(waits))):
                        if key.data is _Ready.OUTPUT:
                            if self._read(out_fd, lines):
                                eof = True
                                selector.unregister(out_fd)
                        elif key.data is _Ready.WAKE:
                            with contextlib.suppress(OSError):
                                os.read(self._wake_r, 4096)
                        elif key.data is _Ready.EXIT and pidfd is not None:
                            # readable for good once it exited: look at it once, then
                            # fall back to the poll in case waitid disagrees
                            selector.unregister(pidfd)
                            os.close(pidfd)
                            pidfd = None
                if not eof:
                    self._drain(out_fd, lines, limit=16)
            finally:
                if pidfd is not None:
                    os.close(pidfd)
        self._emit(lines.close())
        assert outcome is not None
        proc.stdout.close()
        if self._reaped_elsewhere:  # its group id is free for reuse: signal nothing more
            proc.returncode = -1
            error: str | None = "exit status unknown: the process was reaped by another waiter"
            self._finish(outcome, None if outcome == _Outcome.TERMINATED else error)
            return
        # The leader is still an unreaped zombie, so its process group id cannot have been
        # reused: a last SIGKILL reaches whatever of the run is left, whatever its output.
        self._signal_group(signal.SIGKILL)
        proc.wait()
        self.returncode = proc.returncode
        self._finish(outcome, self._error(outcome, proc.returncode, lines, spec.timeout))

    def _leader_exited(self) -> bool:
        """Whether the command has exited, without reaping it (WNOWAIT keeps the zombie)."""
        proc = self._proc
        assert proc is not None
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # someone else in this process reaped it
            self._reaped_elsewhere = True
            return True
        return info is not None

    def _signal_group(self, sig: signal.Signals) -> None:
        proc = self._proc
        assert proc is not None
        if self._reaped_elsewhere:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.warning("cannot send %s to the process group of %s: %s", sig.name, self, exc)

    def _kill_and_reap(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            self._signal_group(signal.SIGKILL)
            proc.wait()
            self.returncode = proc.returncode

    def _read(self, fd: int, lines: _Lines, *, flush: bool = True) -> bool | None:
        """One read of the output pipe: True at end of file, False after some output, None
        when there is nothing to read now."""
        try:
            chunk = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return None
        if not chunk:
            return True
        self._log().write(chunk)
        if flush:
            self._log().flush()
        self._emit(lines.feed(chunk))
        return False

    def _drain(self, fd: int, lines: _Lines, *, limit: int) -> bool:
        """Read what is in the pipe now (at most ``limit`` reads); True at end of file."""
        try:
            for _ in range(limit):
                got = self._read(fd, lines, flush=False)
                if got is not False:
                    return bool(got)
            return False
        finally:
            self._log().flush()

    def _emit(self, lines: Iterable[str]) -> None:
        recorder = self._provider._recorder
        if recorder is None:
            return
        task = self.task
        for line in lines:
            progress = parse_progress(line)
            if progress is None:
                continue
            try:
                recorder.record_progress(task.namespace, task.id, task.version, *progress)
            except Exception:
                log.exception("record_progress of %s failed", self)

    @staticmethod
    def _error(outcome: str, returncode: int, lines: _Lines, timeout: float | None) -> str | None:
        if outcome == _Outcome.TERMINATED:
            return None
        if outcome == _Outcome.TIMED_OUT:
            reason = f"timed out after {timeout:g}s"
        elif returncode == 0:
            return None
        elif returncode < 0:
            reason = f"killed by signal {-returncode} ({_signal_name(-returncode)})"
        else:
            reason = f"exit status {returncode}"
        tail = "\n".join(lines.tail)
        if len(tail) > _MAX_TAIL_CHARS:
            tail = "…" + tail[-(_MAX_TAIL_CHARS - 1) :]
        return f"{reason}: {tail}" if tail else reason

    # ---- the end ----------------------------------------------------------------------------

    def _finish(self, outcome: str, error: str | None) -> None:
        """Close the log, write status.json, record the outcome (unless terminated)."""
        self.outcome = outcome
        self.error = error
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
        returncode = self.returncode
        status = {
            "namespace": self.task.namespace,
            "id": self.task.id,
            "version": self.task.version,
            "pid": self.pid,
            "exit_code": returncode if returncode is not None and returncode >= 0 else None,
            "signal": -returncode if returncode is not None and returncode < 0 else None,
            "timed_out": outcome == _Outcome.TIMED_OUT,
            "terminated": outcome == _Outcome.TERMINATED,
            "error": error,
            "started_at": format_time(self._started_at or _now()),
            "ended_at": format_time(_now()),
        }
        try:
            _write_json_atomically(self.run_dir / STATUS_JSON, status)
        except FileNotFoundError:
            log.debug("%s: run directory gone (cleaned up); no status.json", self)
        except OSError as exc:
            log.warning("%s: cannot write status.json: %s", self, exc)
        task = self.task
        if outcome == _Outcome.TERMINATED:
            log.info("%s/%s v%d terminated", task.namespace, task.id, task.version)
            return
        recorder = self._provider._recorder
        if recorder is None:
            log.warning("%s ended (%s) but no recorder was set", self, error or "success")
            return
        try:
            if error is None:
                recorder.record_completion(task.namespace, task.id, task.version)
            else:
                log.info("%s/%s v%d failed: %s", task.namespace, task.id, task.version, error)
                recorder.record_failure(task.namespace, task.id, task.version, error)
        except Exception:
            log.exception("recording the outcome of %s failed", self)


# ---- the provider --------------------------------------------------------------------------


class CommandProvider:
    """A Provider that runs the command in each task's payload (see the module doc).

    ``state_dir`` holds one directory per run; ``kill_grace`` is how many seconds a process
    group has between SIGTERM and SIGKILL; ``output_tail_lines`` how many last lines of
    output a failure message carries; ``env`` is added to every command's environment.

    Raises :class:`ValueError` for a bad ``kill_grace`` or ``output_tail_lines``, or
    a bad ``env`` (not a mapping of strings), and :class:`OSError` if ``state_dir`` cannot be
    created.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        kill_grace: float = 5.0,
        output_tail_lines: int = 20,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if (
            isinstance(kill_grace, bool)
            or not isinstance(kill_grace, (int, float))
            or not math.isfinite(kill_grace)
            or kill_grace < 0
        ):
            raise ValueError(f"kill_grace must be a finite number >= 0, not {kill_grace!r}")
        if (
            isinstance(output_tail_lines, bool)
            or not isinstance(output_tail_lines, int)
            or output_tail_lines < 0
        ):
            raise ValueError(f"output_tail_lines must be an int >= 0, not {output_tail_lines!r}")
        self.state_dir = Path(state_dir)
        self._dirs = RunDirs(self.state_dir)
        self.kill_grace = float(kill_grace)
        self.output_tail_lines = output_tail_lines
        try:
            self._env = _check_env(env if env is not None else {})
        except _BadPayloadError as exc:
            raise ValueError(f"bad provider {exc}") from None
        self._recorder: TaskCompletionRecorder | None = None
        self._lock = threading.Lock()
        self._live: dict[TaskDescriptor, CommandHandle] = {}
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"<CommandProvider {self.state_dir}>"

    @staticmethod
    def payload(
        argv: Sequence[str] | None = None,
        shell: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """The payload of a task running ``argv`` or ``shell`` (exactly one of them).

        Raises :class:`~distributedtask.InvalidTaskError` (field ``"payload"``) for anything
        the provider would refuse: both or neither command, an empty or non-string argv (a
        bare string is refused too), a bad env, a timeout that is not a positive number.
        """
        if isinstance(argv, (str, bytes)):
            raise _invalid("argv must be a list of strings, not a single string")
        data: dict[str, object] = {
            "argv": list(argv) if argv is not None else None,
            "shell": shell,
            "env": env,
            "cwd": os.fspath(cwd) if cwd is not None else None,
            "timeout": timeout,
        }
        return _spec_from(data).to_json()

    # ---- the Provider protocol ----------------------------------------------------------

    def set_completion_recorder(self, recorder: TaskCompletionRecorder) -> None:
        self._recorder = recorder

    def get_local_tasks(self) -> list[TaskDescriptor]:
        """Every run with a directory under ``state_dir`` (running or not), sorted.
        Entries this provider did not make are ignored. Raises :class:`OSError` only if
        ``state_dir`` exists and cannot be read."""
        return self._dirs.list()

    def cleanup_task(self, descriptor: TaskDescriptor) -> None:
        """Remove the directory of a run (and its id's directory once empty); idempotent.

        A run still going is terminated first (without waiting). Raises :class:`OSError`
        when the directory exists and cannot be removed.
        """
        with self._lock:
            live = self._live.get(descriptor)
        if live is not None:
            live.terminate()
        self._dirs.remove(descriptor)

    def start_task(self, task: Task) -> CommandHandle:
        """Start ``task``'s command in the background and return its handle at once.

        A bad payload or a command that cannot start records a failure and returns a handle
        that has already finished. Starting a run that is already going here returns its
        handle; a run still being terminated is started again once it is over. Raises
        :class:`OSError` only when the run's directory cannot be created.
        """
        run_dir = self._dirs.create(task.descriptor)
        invalid: str | None = None
        spec: CommandSpec | None = None
        try:
            spec = parse_payload(task.payload)
        except InvalidTaskError as exc:
            invalid = str(exc)
        with self._lock:
            previous = self._live.get(task.descriptor)
            if previous is not None and previous.done:
                previous = None
            if previous is not None and not previous.terminating:
                return previous
            handle = CommandHandle(self, task, run_dir, spec, previous)
            if invalid is None:
                self._live[task.descriptor] = handle
        handle._start(invalid)
        return handle

    def _forget(self, handle: CommandHandle) -> None:
        with self._lock:
            if self._live.get(handle.task.descriptor) is handle:
                del self._live[handle.task.descriptor]

    # ---- for tests and shutdown ---------------------------------------------------------

    def running(self) -> list[CommandHandle]:
        """The handles of runs that are not over yet."""
        with self._lock:
            return [handle for handle in self._live.values() if not handle.done]

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every run's watcher thread to end; True if all did within ``timeout``
        seconds (in total). Terminate the runs first to make them end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            handles = self.running()
            if not handles:
                return True
            for handle in handles:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not handle.wait(left):
                    return False
