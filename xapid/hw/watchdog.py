"""One emulated hardware watchdog per host: ``<host folder>/watchdog``, a Unix datagram socket.

A stack's daemon arms it with a timeout and pets it; when an armed watchdog is not petted
in time, or is told ``fence <reason>``, the host is fenced (the callback given to
:class:`Watchdogs`).  The protocol (README "Writing a cluster stack"):

    arm <seconds>    arm or re-arm with this timeout; counts as a pet
    pet              reset the timer (ignored while disarmed)
    disarm           stop the watchdog (a clean stop)
    fence <reason>   reset the host now

State lives in memory only: after a daemon restart every watchdog is disarmed until its
next ``arm``.
"""

from __future__ import annotations

import math
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from xapid import statefiles, unixsock

log = structlog.get_logger("xapid.hw.watchdog")

SOCKET_NAME = "watchdog"
MAX_MESSAGE = 512


def socket_address(folder: Path, dir_fd: int | None) -> str:
    """The address to bind or send to for ``folder/watchdog`` (a /proc/self/fd alias when too long)."""
    path = str(folder / SOCKET_NAME)
    if unixsock.fits(path) or dir_fd is None:
        return path
    return f"/proc/self/fd/{dir_fd}/{SOCKET_NAME}"


@dataclass
class _Dog:
    uuid: str
    folder: Path
    sock: socket.socket
    dir_fd: int
    timeout: float | None = None  # None = disarmed
    deadline: float = math.inf


class Watchdogs:
    """The watchdogs of every host, served by one thread.

    ``fence(host_uuid, reason)`` is called (from the watchdog thread) when a watchdog fires;
    the watchdog is disarmed first, so it fires once.
    """

    def __init__(self, fence: Callable[[str, str], None]) -> None:
        self._fence = fence
        self._dogs: dict[str, _Dog] = {}
        self._by_fd: dict[int, _Dog] = {}
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = False
        self._thread: threading.Thread | None = None

    def add(self, uuid: str, folder: Path) -> None:
        """Create (or recreate) the watchdog socket of host ``uuid`` in ``folder``."""
        statefiles.make_dirs(folder)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        address = socket_address(folder, dir_fd)
        try:
            os.unlink(folder / SOCKET_NAME)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        old = os.umask(0o177)
        try:
            sock.bind(address)
        finally:
            os.umask(old)
        sock.setblocking(False)
        dog = _Dog(uuid, folder, sock, dir_fd)
        with self._lock:
            previous = self._dogs.pop(uuid, None)
            if previous is not None:
                self._drop(previous)
            self._dogs[uuid] = dog
            self._by_fd[sock.fileno()] = dog
            self._sel.register(sock, selectors.EVENT_READ, dog)
        self._poke()

    def _drop(self, dog: _Dog) -> None:
        self._by_fd.pop(dog.sock.fileno(), None)
        try:
            self._sel.unregister(dog.sock)
        except (KeyError, ValueError):
            pass
        dog.sock.close()
        os.close(dog.dir_fd)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hw-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and remove every socket file."""
        self._stop = True
        self._poke()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for dog in list(self._dogs.values()):
                try:
                    os.unlink(dog.folder / SOCKET_NAME)
                except FileNotFoundError:
                    pass
                self._drop(dog)
            self._dogs.clear()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def remove(self, uuid: str) -> None:
        """Host ``uuid`` left the pool: its watchdog goes with it."""
        with self._lock:
            dog = self._dogs.pop(uuid, None)
            if dog is not None:
                self._drop(dog)
        self._poke()

    def disarm(self, uuid: str) -> None:
        """Disarm host ``uuid``'s watchdog (its host lost power: nothing is left to pet it)."""
        with self._lock:
            dog = self._dogs.get(uuid)
            if dog is not None:
                dog.timeout, dog.deadline = None, math.inf

    def state(self, uuid: str) -> float | None:
        """The armed timeout of host ``uuid``'s watchdog, or None when disarmed."""
        with self._lock:
            dog = self._dogs.get(uuid)
            return dog.timeout if dog else None

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                nearest = min((d.deadline for d in self._dogs.values()), default=math.inf)
            wait = None if nearest == math.inf else max(0.0, nearest - time.monotonic())
            for key, _ in self._sel.select(timeout=min(wait, 1.0) if wait is not None else 1.0):
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                    continue
                self._receive(key.data)
            self._expire()

    def _receive(self, dog: _Dog) -> None:
        while True:
            try:
                data = dog.sock.recv(MAX_MESSAGE)
            except (BlockingIOError, OSError):
                return
            words = data.decode("ascii", errors="replace").strip().split(None, 1)
            if not words:
                continue
            verb, rest = words[0], (words[1] if len(words) > 1 else "")
            fence_reason = None
            with self._lock:
                if verb == "arm":
                    try:
                        timeout = float(rest)
                    except ValueError:
                        timeout = math.nan
                    if not math.isfinite(timeout) or timeout <= 0:
                        log.warning("watchdog: bad arm message ignored", host=dog.uuid, message=data[:80])
                        continue
                    if dog.timeout is None:
                        log.info("watchdog armed", host=dog.uuid, timeout=timeout)
                    dog.timeout, dog.deadline = timeout, time.monotonic() + timeout
                elif verb == "pet":
                    if dog.timeout is not None:
                        dog.deadline = time.monotonic() + dog.timeout
                elif verb == "disarm":
                    if dog.timeout is not None:
                        log.info("watchdog disarmed", host=dog.uuid)
                    dog.timeout, dog.deadline = None, math.inf
                elif verb == "fence":
                    dog.timeout, dog.deadline = None, math.inf
                    fence_reason = f"the cluster stack asked its watchdog to fence: {rest[:200] or 'no reason given'}"
                else:
                    log.warning("watchdog: unknown message ignored", host=dog.uuid, message=data[:80])
            if fence_reason is not None:
                self._fire(dog.uuid, fence_reason)

    def _expire(self) -> None:
        now = time.monotonic()
        fired = []
        with self._lock:
            for dog in self._dogs.values():
                if dog.deadline <= now:
                    fired.append((dog.uuid, dog.timeout))
                    dog.timeout, dog.deadline = None, math.inf
        for uuid, timeout in fired:
            self._fire(uuid, f"watchdog expired: not petted for {timeout:g} s")

    def _fire(self, uuid: str, reason: str) -> None:
        try:
            self._fence(uuid, reason)
        except Exception:  # noqa: BLE001 - the watchdog thread must survive a failing fence
            log.exception("fencing failed", host=uuid)
