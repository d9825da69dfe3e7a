"""The one way this project starts a child process and talks to it.

Every process of ours speaks in JSON lines on its standard output, one event per line, with
the event's name in `"event"`:

    {"event": "ready", "node_id": "12D3KooW…", "addrs": ["/ip4/127.0.0.1/tcp/…/p2p/…"], ...}
    {"event": "error", "message": "…"}                      # it could not start

(`print_event` writes them.) What a process is told, it reads as JSON lines on its standard
input; standard input closing is its signal to leave. `Launched` starts a process, reads its
lines on a thread into a history (`seen`) and keeps the tail of its standard error (or sends
it to a log file), and `expect` waits, with a bound, for the line that says what happened:
a process that exits or reports an error first raises `LaunchError`, which names it and
ends with what it wrote to standard error.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "STDERR_TAIL",
    "LaunchError",
    "Launched",
    "child_environment",
    "print_event",
    "python_module",
    "stop_all",
]

STDERR_TAIL = 200  # lines of standard error kept per process
_EOF = object()


def print_event(event: str, **fields: Any) -> None:
    """Print one event line, `{"event": event, **fields}`, for the launcher to read."""
    try:
        print(json.dumps({"event": event, **fields}), flush=True)
    except (OSError, ValueError):
        pass  # a detached process's launcher is gone: nobody reads these lines any more


class LaunchError(RuntimeError):
    """A launched process exited, reported an error, or stayed silent too long."""


class Launched:
    """A child process whose standard output carries JSON event lines.

    Args:
        argv: the command line.
        label: how messages name the process, e.g. "node 1 (stage 1, layers 4-7)".
        env: its environment (default: this process's).
        cwd: its working directory.
        log_path: standard error goes to this file (else a tail is kept in memory).
        new_session: its own session and process group (it outlives this process).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        label: str,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_path: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.label = label
        self.log_path = log_path
        self.seen: list[dict[str, Any]] = []
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self._lines: queue.Queue[Any] = queue.Queue()
        self._ended = False
        log = open(log_path, "w") if log_path is not None else None
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log if log is not None else subprocess.PIPE,
                text=True,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=new_session,
            )
        finally:
            if log is not None:
                log.close()  # the child keeps its own copy
        assert self.proc.stdout is not None
        threading.Thread(target=self._read_lines, args=(self.proc.stdout,), daemon=True).start()
        if self.proc.stderr is not None:
            threading.Thread(
                target=_tail, args=(self.proc.stderr, self.stderr_tail), daemon=True
            ).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.proc.poll() is None

    # -- reading ---------------------------------------------------------------------------

    def expect(
        self,
        match: str | Callable[[dict[str, Any]], bool],
        timeout: float | None = None,
        *,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """The first JSON line, seen before or arriving in time, that `match`es: an event
        name, or a predicate on the line.

        Raises `LaunchError` on an error event, when the process exits first, or when
        `timeout` seconds (or the `time.monotonic()` `deadline`) pass."""
        test = match if callable(match) else (lambda line: line.get("event") == match)
        for line in self.seen:
            if test(line):
                return line
        end = _deadline(timeout, deadline)
        while True:
            line = self._next(end, f"did not print {_name(match)}")
            if test(line):
                return line

    def read(self, timeout: float | None = None) -> dict[str, Any]:
        """The next JSON line not seen before (an answer to what was just sent)."""
        return self._next(_deadline(timeout, None), "did not answer")

    def fresh(self) -> list[dict[str, Any]]:
        """The lines that arrived since the last look, added to `seen` (without waiting)."""
        out: list[dict[str, Any]] = []
        while True:
            try:
                item = self._lines.get_nowait()
            except queue.Empty:
                return out
            if item is _EOF:
                self._lines.put(_EOF)
                return out
            self.seen.append(item)
            out.append(item)

    def _next(self, end: float, failure: str) -> dict[str, Any]:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise LaunchError(f"{self.label} {failure} in time{self._stderr_note()}")
            try:
                item = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if item is _EOF:
                self._lines.put(_EOF)  # every later read ends here too
                code = self.proc.wait()
                raise LaunchError(
                    f"{self.label} exited with status {code} ({failure}){self._stderr_note()}"
                )
            self.seen.append(item)
            if item.get("event") == "error":
                raise LaunchError(f"{self.label} failed: {item.get('message')}")
            return dict(item)

    def _read_lines(self, stream: IO[str]) -> None:
        try:
            for text in stream:
                if not text.startswith("{"):
                    continue  # not one of ours (a library printing to stdout)
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(line, dict):
                    self._lines.put(line)
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put(_EOF)

    def stderr_text(self, lines: int = 30) -> str:
        """The last lines the process wrote to its standard error."""
        if self.log_path is not None and self.log_path.exists():
            text = self.log_path.read_text(errors="replace")
            return "".join(text.splitlines(True)[-lines:])
        return "".join(list(self.stderr_tail)[-lines:])

    def _stderr_note(self) -> str:
        text = self.stderr_text()
        return f"; its stderr ends with:\n{text}" if text else ""

    # -- telling and stopping --------------------------------------------------------------

    def send(self, message: Mapping[str, Any] | str) -> None:
        """One line to the process's standard input (a JSON object, or text as it is)."""
        assert self.proc.stdin is not None
        text = message if isinstance(message, str) else json.dumps(message)
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        """Close the process's standard input: our processes take it as the signal to leave
        (a detached one runs on until SIGTERM)."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()

    def signal(self, sig: int) -> None:
        """Send `sig` (SIGSTOP to hang it, SIGCONT to resume it…) if it still runs."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (no goodbye: its sockets just close), and reap it."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 15.0, terminate: bool = True) -> int:
        """Close its standard input (and send SIGTERM, with `terminate`), wait up to
        `timeout` seconds, then SIGKILL; its exit status."""
        self.close_stdin()
        if terminate and self.running():
            self.signal(signal.SIGCONT)  # a hung (stopped) process cannot act on SIGTERM
            self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def __enter__(self) -> Launched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all(processes: Iterable[Launched], timeout: float = 15.0, terminate: bool = True) -> None:
    """Stop several processes at once: all are told first (each takes a moment to close its
    connections), then each is waited for."""
    processes = list(processes)
    for process in processes:
        process.close_stdin()
        if terminate and process.running():
            process.signal(signal.SIGCONT)
            process.signal(signal.SIGTERM)
    end = time.monotonic() + timeout
    for process in processes:
        process.stop(max(0.1, end - time.monotonic()), terminate=False)


def python_module(module: str, *args: str) -> list[str]:
    """The command line that runs `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus `extra`, unbuffered (lines arrive as printed)."""
    return {**os.environ, **(extra or {}), "PYTHONUNBUFFERED": "1"}


def _tail(stream: IO[str], sink: deque[str]) -> None:
    try:
        for line in stream:
            sink.append(line)
    except (OSError, ValueError):
        pass


def _deadline(timeout: float | None, deadline: float | None) -> float:
    ends = [d for d in (deadline,) if d is not None]
    if timeout is not None:
        ends.append(time.monotonic() + timeout)
    return min(ends) if ends else float("inf")


def _name(match: str | Callable[[dict[str, Any]], bool]) -> str:
    return f"its {match!r} event" if isinstance(match, str) else "the line awaited"
