"""One thread waiting on every idle keep-alive connection (``epoll``), for :mod:`xapid.server`.

Why: with a thread per connection, eight busy clients make eight threads hand the GIL to each
other on every ``recv``, ``poll`` and ``send`` (about one context switch per call, +35-45 % server
CPU per read).  Here the connections that wait for their next request are *parked*: one thread
waits on all of them with one ``epoll_wait``, and whatever it reports ready is handled in a batch
by the server's ``ready`` callback, in this thread.  The callback either serves the request at
once (a call that cannot block) and leaves the connection parked, or asks for it to be detached
and hands it to a thread, which parks it again after its answer.  An ``after`` callback, if
given, runs in this thread after each batch (the server writes the batch's changes there, once).

The reactor knows nothing of HTTP: an entry is any object with ``fd`` (its descriptor),
``idle_until`` (a :func:`time.monotonic` deadline, which the owner may push back at any time while
the entry is parked) and ``heaped`` (the reactor's: whether a deadline of it is queued, so that an
entry parked again and again holds one queued deadline, not one per parking); at the deadline the
entry is detached and given to ``expire``.
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

log = structlog.get_logger("xapid.reactor")

MAX_WAIT = 1.0  # seconds between looks at the clock when no deadline is nearer
BATCH = 256  # events taken from one epoll_wait


class Entry(Protocol):
    fd: int
    idle_until: float
    heaped: bool


# ready(entry): None to keep the entry parked, or a callable run after the entry is detached (it
# takes the entry elsewhere: a thread, or the close).
Ready = Callable[[Any], Callable[[], None] | None]


class Reactor:
    """Parked entries, watched for input by one thread (:meth:`start`) until :meth:`close`."""

    def __init__(self, ready: Ready, expire: Callable[[Any], None], name: str = "reactor",
                 after: Callable[[], None] | None = None) -> None:
        self._ready = ready
        self._expire = expire
        self._after = after  # run in the loop's thread after each batch of ready entries
        self._ep = select.epoll()
        self._entries: dict[int, Any] = {}
        self._deadlines: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()  # park / detach / close against each other
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._ep.register(self._wake_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def __len__(self) -> int:
        return len(self._entries)

    def park(self, entry: Any) -> bool:
        """Watch ``entry`` until it has input (or its deadline passes); False once the reactor is
        closed (the caller keeps the entry and must end it itself)."""
        with self._lock:
            if self._closed:
                return False
            fd = entry.fd
            self._entries[fd] = entry
            wake = False
            if not entry.heaped:
                entry.heaped = True
                heapq.heappush(self._deadlines, (entry.idle_until, next(self._seq), entry))
                wake = self._deadlines[0][2] is entry  # the loop may be waiting past it
            try:
                self._ep.register(fd, select.EPOLLIN)
            except FileExistsError:  # a closed descriptor's number reused before epoll forgot it
                self._ep.modify(fd, select.EPOLLIN)
            except OSError:
                del self._entries[fd]
                return False
            if wake:
                self._wake()
        return True

    def _wake(self) -> None:
        """Make the loop look at its deadlines again (under the lock, while the pipe is open)."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full: it will wake anyway
            pass

    def detach(self, entry: Any) -> bool:
        """Stop watching ``entry`` (from the loop's thread: its ``ready`` or ``after`` callback);
        False if it was not parked (any more)."""
        return self._detach(entry)

    def _detach(self, entry: Any) -> bool:
        """Stop watching ``entry``; False if it was not parked (any more)."""
        with self._lock:
            fd = entry.fd
            if self._entries.get(fd) is not entry:
                return False
            del self._entries[fd]
            try:
                self._ep.unregister(fd)
            except OSError:  # already closed: epoll dropped it
                pass
        return True

    def close(self) -> list[Any]:
        """Stop the thread; return the entries still parked (detached: the caller ends them)."""
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            left = list(self._entries.values())
            self._entries.clear()
            if self._thread.ident is None:  # never started: nothing else will close these
                self._ep.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
            else:
                self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(MAX_WAIT + 1.0)
        return left

    def _run(self) -> None:
        ep = self._ep
        entries = self._entries
        wake = self._wake_r
        try:
            while not self._closed:
                timeout = MAX_WAIT
                if self._deadlines:
                    timeout = min(MAX_WAIT, max(0.0, self._deadlines[0][0] - time.monotonic()))
                try:
                    events = ep.poll(timeout, BATCH)
                except InterruptedError:
                    continue
                for fd, _mask in events:
                    if fd == wake:
                        try:
                            os.read(wake, 4096)
                        except BlockingIOError:
                            pass
                        continue
                    entry = entries.get(fd)
                    if entry is None:
                        continue
                    try:
                        then = self._ready(entry)
                    except Exception:  # noqa: BLE001 - one connection's failure must not stop the others
                        log.exception("unexpected exception in the reactor")
                        then = None
                        if self._detach(entry):
                            self._expire(entry)
                        continue
                    if then is not None and self._detach(entry):
                        then()
                if self._after is not None and events:
                    try:
                        self._after()
                    except Exception:  # noqa: BLE001 - the loop goes on
                        log.exception("unexpected exception after a batch in the reactor")
                self._expire_due()
        finally:
            for entry in self.close_left():
                self._expire(entry)
            with self._lock:
                ep.close()
                os.close(self._wake_r)
                os.close(self._wake_w)

    def close_left(self) -> list[Any]:
        """What the loop's end leaves parked (the close's list when :meth:`close` ran first)."""
        with self._lock:
            self._closed = True
            left = list(self._entries.values())
            self._entries.clear()
        return left

    def _expire_due(self) -> None:
        deadlines = self._deadlines
        now = time.monotonic()
        if not deadlines or deadlines[0][0] > now:
            return
        due = []
        with self._lock:
            while deadlines and deadlines[0][0] <= now:
                _when, _seq, entry = heapq.heappop(deadlines)
                entry.heaped = False
                fd = entry.fd
                if self._entries.get(fd) is not entry:
                    continue  # not parked now: queued again when it is
                if entry.idle_until > now:  # pushed back while parked
                    entry.heaped = True
                    heapq.heappush(deadlines, (entry.idle_until, next(self._seq), entry))
                    continue
                del self._entries[fd]
                try:
                    self._ep.unregister(fd)
                except OSError:
                    pass
                due.append(entry)
        for entry in due:
            self._expire(entry)
