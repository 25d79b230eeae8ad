"""The master's HA monitor (ha.md 4.9): the liveset drives the pool database.

Every ``ha-monitor-interval`` seconds the master queries its liveset and
applies it: ``host_metrics.live`` follows liveness, ``host.ha_statefiles``
follows statefile access, ``host.ha_network_peers`` follows the heartbeat
lists.  Exit 14 (daemon gone) stops the monitor, as in xapi.  Unlike xapi,
other failures (a script error, a malformed liveset) are logged and the next
iteration tries again, so a flapping stack cannot silence the monitor.
Fencing, master failover and VM restart hook in at :meth:`Monitor.apply`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import structlog

from xapid.errors import ApiError
from xapid.ha.liveset import Liveset
from xapid.ha.scripts import ScriptError

if TYPE_CHECKING:
    from xapid.ha.manager import HaManager

log = structlog.get_logger("xapid.ha.monitor")


class Monitor:
    def __init__(self, manager: HaManager) -> None:
        self.manager = manager
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.iterations = 0

    def start(self, host: str | None = None) -> None:
        """Start monitoring for ``host`` (only the master's liveset is read: other hosts are ignored)."""
        if host is not None and host != self.manager.daemon.master_ref():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._loop, args=(self._stop,), name="ha-monitor", daemon=True
            )
            self._thread.start()

    def stop(self, host: str | None = None) -> None:
        """Stop monitoring for ``host`` (None: everywhere)."""
        if host is not None and host != self.manager.daemon.master_ref():
            return
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.manager.daemon.config["ha-script-timeout"] + 5)

    def _loop(self, stop: threading.Event) -> None:
        interval = float(self.manager.daemon.config["ha-monitor-interval"])
        while not stop.wait(interval):
            if not self.manager.pool()["ha_enabled"]:
                continue
            try:
                live = self.manager.query(self.manager.daemon.master_ref())
            except ScriptError as e:
                if e.exit_code == 14:
                    log.warning("HA daemon not present on the master; monitor stops")
                    return
                log.warning("liveset query failed", error=str(e))
                continue
            except ApiError as e:
                log.warning("liveset query failed", error=str(e))
                continue
            if stop.is_set():
                return
            try:
                self.apply(live)
            except ApiError as e:
                log.warning("could not apply liveset", error=str(e))
            self.iterations += 1

    def apply(self, live: Liveset) -> None:
        """Write what the liveset says into the pool database (only fields that change)."""
        m = self.manager
        store = m.store
        pool = m.pool()
        missing = [h["uuid"] for _r, h in store.items("host") if h["uuid"] not in live.hosts]
        if missing:
            # xapi's iteration fails half-way on such a liveset; xapid skips it whole.
            log.warning("liveset does not list every host; ignored", missing=missing)
            return
        unknown = set(live.hosts) - {h["uuid"] for _r, h in store.items("host")}
        if unknown:
            log.warning("liveset lists unknown hosts; they are ignored", unknown=sorted(unknown))
        with store.transaction() as tx:
            for href, h in tx.items("host"):
                entry = live.hosts[h["uuid"]]
                # A host shutting down cleanly stays dead until its xapi starts again (xapi_ha.ml).
                alive = entry.liveness and href not in m.shutting_down
                metrics = tx.read("host_metrics", h["metrics"])
                if metrics is not None and metrics["live"] != alive:
                    log.info("host liveness changed", host=h["uuid"], live=alive)
                    tx.update("host_metrics", h["metrics"], live=alive)
                statefiles = list(pool["ha_statefiles"]) if entry.statefile_access else []
                if h["ha_statefiles"] != statefiles:
                    tx.update("host", href, ha_statefiles=statefiles)
                if live.raw is not None:
                    raw = live.raw.get(h["uuid"])
                    if raw is not None:
                        peers = self._peers(raw)
                        if sorted(h["ha_network_peers"]) != sorted(peers):
                            tx.update("host", href, ha_network_peers=peers)

    @staticmethod
    def _peers(raw: Any) -> list[str]:
        if raw.time_since_last_update_on_statefile < raw.time_since_last_heartbeat:
            return list(raw.heartbeat_active_list_on_statefile)
        return list(raw.heartbeat_active_list_on_heartbeat)
