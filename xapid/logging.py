"""structlog set-up: JSON lines when stderr is not a terminal, readable lines when it is."""

from __future__ import annotations

import atexit
import collections
import datetime
import json
import json.encoder
import logging
import math
import os
import sys
import threading
import time
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer


class FdLogger:
    """A structlog logger that writes each line with one ``write(2)`` on a file descriptor.

    One call, one line: with stderr in append mode (or a pipe, for lines under PIPE_BUF) whole
    lines never interleave, so unlike structlog's PrintLogger no lock and no flush are needed on
    the per-call hot path.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def msg(self, message: str) -> None:
        data = (message + "\n").encode("utf-8", "replace")
        while data:
            try:
                written = os.write(self.fd, data)
            except InterruptedError:
                continue
            except OSError:
                return  # a closed or broken stderr must not fail a call
            data = data[written:]

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def fd_logger_factory(*_args: Any) -> Any:
    """An :class:`FdLogger` on stderr, or structlog's PrintLogger when stderr has no descriptor."""
    try:
        return FdLogger(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return structlog.PrintLogger(sys.stderr)


# -- the access log: one line per call, written off the request threads -------------------------------

_dumps_str = json.encoder.encode_basestring_ascii  # what json.dumps does to a str (ensure_ascii)
BATCH_BYTES = 4096  # one write(2) carries whole lines up to this much (PIPE_BUF: pipes keep them whole)


_isfinite = math.isfinite
_modf = math.modf


def _number(x: float) -> str:
    """``json.dumps`` of a number (a finite float is its repr)."""
    return float.__repr__(x) if type(x) is float and _isfinite(x) else json.dumps(x)


def _utc_iso_slow(t: float) -> str:
    """structlog's ``TimeStamper(fmt="iso", utc=True)`` text of the instant ``t``."""
    return datetime.datetime.fromtimestamp(t, tz=datetime.UTC).isoformat().replace("+00:00", "Z")


_second: tuple[float, str] = (-1.0, "")  # the last whole second met, and its text up to the seconds


def _utc_iso(t: float) -> str:
    """:func:`_utc_iso_slow`, the date and time of day formatted once per second.

    The microseconds are split off as ``datetime.fromtimestamp`` does (``modf``, then rounding
    half to even, a carry into the next second at 1,000,000), so the text is the same.
    """
    global _second
    frac, whole = _modf(t)
    if frac < 0:
        return _utc_iso_slow(t)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        whole += 1.0
        us -= 1_000_000
    seen, text = _second  # one tuple: read and replaced whole, whatever the threads
    if seen != whole:
        text = datetime.datetime.fromtimestamp(whole, tz=datetime.UTC).isoformat()[:19]
        _second = (whole, text)
    return f"{text}.{us:06d}Z" if us else f"{text}Z"


HEADS = 4096  # the line beginnings kept (AccessLog.render), all dropped when full
_heads: dict[tuple[str, str, str, str], str] = {}


class AccessLog:
    """The ``call`` lines, queued by the request threads and written by a thread of their own.

    A request thread only appends a tuple to a deque (no rendering, no lock, no system call);
    the writer renders each line exactly as the JSON renderer would (the same keys in the same
    order, the same time stamp taken at the call) and writes whole lines, several per ``write``.
    While calls keep coming the writer drains every ``interval`` seconds (10 ms: each wakeup costs
    the process a context switch and the GIL, so a busy daemon pays for a few per second, not one
    per call or per millisecond); after ``idle_after`` of silence it sleeps until the next call
    wakes it, so a lone call's line is out at once.
    :meth:`flush` (the server's stop, and the interpreter's exit) writes whatever is queued: no
    line is lost at a clean stop.  Other log lines are written directly, so a ``call`` line may
    follow a line logged a moment after it.
    """

    def __init__(self, fd: int, interval: float = 0.01, idle_after: float = 0.05) -> None:
        self.fd = fd
        self.interval = interval
        self.idle_rounds = max(1, int(idle_after / interval))
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._idle = True
        self._wake = threading.Lock()
        self._wake.acquire()  # held while the writer sleeps; a call releases it
        self._write_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def call(self, method: str, user: str, session: str, result: str, duration_ms: float) -> None:
        """Queue the line of one call (``session`` already shortened for the log)."""
        self._queue.append((method, user, session, result, duration_ms, time.time()))
        if self._idle:
            self._idle = False
            try:
                self._wake.release()
            except RuntimeError:  # another call woke it already
                pass

    @staticmethod
    def render(entry: tuple[Any, ...]) -> str:
        """The JSON line structlog's processors make of ``log.info("call", ...)`` with these fields."""
        method, user, session, result, duration_ms, t = entry
        key = (method, user, session, result)
        head = _heads.get(key)
        if head is None:  # calls repeat: the same method, user, session and result, encoded once
            head = (f'{{"method": {_dumps_str(method)}, "user": {_dumps_str(user)}, '
                    f'"session": {_dumps_str(session)}, "result": {_dumps_str(result)}, "duration_ms": ')
            if len(_heads) >= HEADS:
                _heads.clear()
            _heads[key] = head
        return f'{head}{_number(duration_ms)}, "event": "call", "level": "info", "timestamp": "{_utc_iso(t)}"}}'

    def flush(self) -> None:
        """Write every queued line now (from any thread)."""
        with self._write_lock:
            queue = self._queue
            lines = []
            while queue:
                lines.append(self.render(queue.popleft()))
            if lines:
                self._write(lines)

    def _write(self, lines: list[str]) -> None:
        chunk: list[str] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) >= BATCH_BYTES:
                _write_all(self.fd, ("\n".join(chunk) + "\n").encode("utf-8", "replace"))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1
        if chunk:
            _write_all(self.fd, ("\n".join(chunk) + "\n").encode("utf-8", "replace"))

    def _run(self) -> None:
        while True:
            self._wake.acquire()
            quiet = 0
            while quiet < self.idle_rounds:
                if self._queue:
                    quiet = 0
                    try:
                        self.flush()
                    except Exception:  # noqa: BLE001 - the log must never stop the writer
                        pass
                else:
                    quiet += 1
                time.sleep(self.interval)
            self._idle = True
            if self._queue:  # a call queued after the last drain may have seen the writer busy
                self._idle = False
                try:
                    self._wake.release()
                except RuntimeError:
                    pass


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            written = os.write(fd, data)
        except InterruptedError:
            continue
        except OSError:
            return  # a closed or broken stderr must not fail a call
        data = data[written:]


_access: AccessLog | None = None
_atexit_registered = False


def access_log() -> AccessLog | None:
    """The background writer of ``call`` lines, if :func:`configure` set up JSON lines on a
    descriptor at a level that keeps them (else None: log them through structlog)."""
    return _access


def flush() -> None:
    """Write the queued ``call`` lines (a clean stop calls this; so does the interpreter's exit)."""
    if _access is not None:
        _access.flush()


def configure(level: str = "info") -> None:
    """Route structlog (and stdlib logging) to stderr at ``level``."""
    global _access, _atexit_registered
    lvl = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(message)s")
    # Tracebacks never carry local variables: they would put passwords and session refs in the log.
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
        if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    )
    tracebacks = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            tracebacks if not sys.stderr.isatty() else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=fd_logger_factory,
        cache_logger_on_first_use=True,
    )
    fd: int | None = None
    if lvl <= logging.INFO and not sys.stderr.isatty():
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
            fd = None
    if _access is not None and _access.fd != fd:
        _access.flush()
        _access = None
    if fd is not None and _access is None:
        if not _atexit_registered:
            atexit.register(flush)
            _atexit_registered = True
        _access = AccessLog(fd)
