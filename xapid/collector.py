"""Garbage collection of memory-only objects, as xapi's ``Db_gc`` thread (``ocaml/xapi/db_gc.ml``).

A background pass every ``gc-interval`` seconds (xapi: 30) destroys sessions idle longer than
``session-idle-timeout``, tasks past their timeouts (:meth:`xapid.tasks.Tasks.collect`) and messages
beyond ``message_limit`` (``Xapi_message.gc``: the oldest first).  The limits that bound memory are
also applied at once where objects are made (a login, a finished task, ``message.create``), so no
burst between two passes can exceed them.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

import structlog

from xapid.api.host_config import expire_ssh
from xapid.store import Change

if TYPE_CHECKING:
    from xapid.daemon import Daemon

log = structlog.get_logger("xapid.gc")


class Collector:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.store = daemon.store
        self.interval = float(daemon.config["gc-interval"])
        self.message_limit = int(daemon.config["message_limit"])
        self._messages: deque[str] = deque(self.store.refs("message"))  # creation order, oldest first
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with self.store.lock:
            self.store.listeners.append(self._on_commit)

    def _on_commit(self, _gen: int, changes: list[Change]) -> None:
        for cls, ref, op, _old, _new in changes:
            if cls == "message" and op == "add":
                self._messages.append(ref)

    def trim_messages(self) -> int:
        """Destroy the oldest messages beyond ``message_limit``; return how many went."""
        store = self.store
        with self._lock:
            excess = store.count("message") - self.message_limit
            victims: list[str] = []
            while excess > len(victims) and self._messages:
                ref = self._messages.popleft()
                if store.exists("message", ref):
                    victims.append(ref)
            if len(self._messages) > 2 * self.message_limit + 1024:  # refs of messages destroyed by clients
                self._messages = deque(r for r in self._messages if store.exists("message", r))
        if victims:
            with store.transaction() as tx:
                for ref in victims:
                    if tx.find("message", ref) is not None:
                        tx.delete("message", ref)
            log.info("messages over the limit destroyed, oldest first", count=len(victims),
                     limit=self.message_limit)
        return len(victims)

    def collect(self) -> None:
        """One pass over everything collected."""
        self.daemon.sessions.expire_idle()
        self.daemon.tasks.collect()
        self.trim_messages()
        expire_ssh(self.store)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.collect()
            except Exception:  # noqa: BLE001 - the collector must keep running (xapi logs and goes on)
                log.exception("garbage collection pass failed")

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gc", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

