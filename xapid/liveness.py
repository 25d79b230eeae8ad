"""``host_metrics.live`` without HA: xapi's host heartbeat (``db_gc.ml`` check_host_liveness).

A host whose xapi stops sending heartbeats is marked not live after
``host-assumed-dead-interval`` seconds (xapi: 600); a host that boots says hello and is live
again.  While HA is enabled the HA monitor owns the flag instead.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from xapid.daemon import Daemon

log = structlog.get_logger("xapid.liveness")


class HostLiveness:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.interval = float(daemon.config["host-assumed-dead-interval"])
        self._timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()
        daemon.hw.on_power_change(self._changed)

    def _ha_on(self) -> bool:
        pool = self.daemon.store.get("pool", self.daemon.pool_ref())
        return bool(pool and pool["ha_enabled"])

    def _changed(self, uuid: str, old: str, new: str) -> None:
        with self._lock:
            timer = self._timers.pop(uuid, None)
        if timer is not None:
            timer.cancel()
        if new in ("off", "fenced"):
            timer = threading.Timer(self.interval, self._expire, args=(uuid,))
            timer.daemon = True
            with self._lock:
                self._timers[uuid] = timer
            timer.start()
        elif new == "on" and old in ("off", "fenced") and not self._ha_on():
            self._set(uuid, True)

    def _expire(self, uuid: str) -> None:
        with self._lock:
            self._timers.pop(uuid, None)
        if not self.daemon.hw.is_running(uuid) and not self._ha_on():
            log.warning("host assumed dead: no heartbeat", host=uuid, seconds=self.interval)
            self._set(uuid, False)

    def _set(self, uuid: str, live: bool) -> None:
        store = self.daemon.store
        ref = store.by_uuid("host", uuid)
        rec = store.get("host", ref) if ref else None
        if rec is None:
            return
        metrics = store.get("host_metrics", rec["metrics"])
        if metrics is not None and metrics["live"] != live:
            with store.transaction() as tx:
                tx.update("host_metrics", rec["metrics"], live=live)

    def stop(self) -> None:
        with self._lock:
            timers, self._timers = list(self._timers.values()), {}
        for timer in timers:
            timer.cancel()
