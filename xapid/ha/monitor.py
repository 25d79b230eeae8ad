"""The HA monitor (ha.md 4.9): one thread per running, armed host, as each real host's xapi has.

Every ``ha-monitor-interval`` seconds each host queries its own liveset.  Every host acts on
its liveset warnings (edge-triggered).  A slave checks that the master is live and holds the
master lock; if not it runs the master-failure procedure (:mod:`xapid.ha.failover`).  The
master applies the liveset to the pool database: dead hosts, VM reset and restart,
``host_metrics.live``, ``host.ha_statefiles``, ``host.ha_network_peers``,
``HA_STATEFILE_LOST``, and the periodic plan recomputation.

As in xapi a failed query with exit 14 (daemon not running) stops that host's monitor: a
host whose heartbeat daemon died is fenced by its watchdog and starts a new monitor when it
boots.  Unlike xapi, other failures (a script error, a malformed liveset) are logged and the
next iteration tries again, so a flapping stack cannot silence the monitor.  A hung host's
monitor does nothing while it is frozen; a host without power has no monitor.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import structlog

from xapid.api.message import create_message
from xapid.errors import ApiError
from xapid.ha.liveset import Liveset
from xapid.ha.scripts import ScriptError

if TYPE_CHECKING:
    from xapid.ha.manager import HaManager

log = structlog.get_logger("xapid.ha.monitor")

MTC_DAEMON_NOT_PRESENT = 14
WARNINGS = ("statefile_lost", "heartbeat_approaching_timeout", "statefile_approaching_timeout",
            "Xapi_healthcheck_approaching_timeout", "network_bonding_error")
STATEFILE_LOST_BODY = "All live servers have lost access to the HA statefile"


class Monitor:
    """The monitor threads of every host, and the master's memory between iterations."""

    def __init__(self, manager: HaManager) -> None:
        self.manager = manager
        self._threads: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._lock = threading.Lock()
        # Held by the master's processing; ha_prevent_restarts_for waits for it (xapi: the monitor mutex).
        self.iteration_lock = threading.Lock()
        self._prevent_until = 0.0
        self._last_live: set[str] | None = None
        self._warnings: dict[str, set[str]] = {}
        self._statefile_lost = False
        self.iterations = 0

    # -- threads ----------------------------------------------------------------------------------

    def start(self, host: str | None = None) -> None:
        """Start the monitor of ``host`` (None: of every armed, running host)."""
        m = self.manager
        hosts = [host] if host is not None else [
            ref for ref, rec in m.hosts()
            if m.local.get(rec["uuid"], "ha.armed", False) and m.daemon.hw.is_running(rec["uuid"])]
        with self._lock:
            for ref in hosts:
                current = self._threads.get(ref)
                if current is not None and current[0].is_alive() and not current[1].is_set():
                    continue
                stop = threading.Event()
                thread = threading.Thread(target=self._loop, args=(ref, stop), daemon=True,
                                          name=f"ha-monitor-{m.host_uuid(ref)[:8]}")
                self._threads[ref] = (thread, stop)
                thread.start()

    def signal_stop(self, host: str) -> None:
        """Ask ``host``'s monitor to stop, without waiting (safe from any thread)."""
        with self._lock:
            entry = self._threads.pop(host, None)
        if entry is not None:
            entry[1].set()

    def stop(self, host: str | None = None) -> None:
        """Stop the monitor of ``host`` (None: all) and wait for it, unless called from it."""
        with self._lock:
            refs = [host] if host is not None else list(self._threads)
            entries = [self._threads.pop(r) for r in refs if r in self._threads]
            if host is None:
                self._last_live = None
        for _thread, stop in entries:
            stop.set()
        timeout = self.manager.daemon.config["ha-script-timeout"] + 5
        for thread, _stop in entries:
            if thread is not threading.current_thread():
                thread.join(timeout=timeout)

    def running(self, host: str) -> bool:
        with self._lock:
            entry = self._threads.get(host)
        return entry is not None and entry[0].is_alive() and not entry[1].is_set()

    def prevent_restarts_for(self, seconds: int) -> None:
        """``pool.ha_prevent_restarts_for``: no master processing until now + seconds (< 1 lifts it).

        Waits for a master iteration in progress to finish, as xapi does.
        """
        with self.iteration_lock:
            self._prevent_until = time.monotonic() + seconds if seconds >= 1 else 0.0
        log.info("HA restarts prevented" if seconds >= 1 else "HA restarts allowed again", seconds=seconds)

    def restarts_prevented(self) -> bool:
        return time.monotonic() < self._prevent_until

    def _loop(self, host: str, stop: threading.Event) -> None:
        m = self.manager
        uuid = m.host_uuid(host)
        interval = float(m.daemon.config["ha-monitor-interval"])
        while not stop.wait(interval):
            power = m.daemon.hw.power(uuid)
            if power in ("off", "fenced"):
                return
            if power == "hung" or not m.pool()["ha_enabled"]:
                continue
            try:
                live = m.query(host)
            except ScriptError as e:
                if e.exit_code == MTC_DAEMON_NOT_PRESENT:
                    log.warning("HA daemon not present; this host's monitor stops", host=uuid)
                    return
                log.warning("liveset query failed", host=uuid, error=str(e))
                continue
            except ApiError as e:
                log.warning("liveset query failed", host=uuid, error=str(e))
                continue
            if stop.is_set() or not m.daemon.hw.is_running(uuid):
                continue
            try:
                self._warn(host, uuid, live)
                if m.daemon.master_ref() == host:
                    self.master_processing(host, live)
                else:
                    m.failover.slave_processing(host, live, stop)
            except ApiError as e:
                log.warning("could not process the liveset", host=uuid, error=str(e))
            except Exception:  # noqa: BLE001 - the monitor must outlive any bug in one iteration
                log.exception("liveset processing failed", host=uuid)
            self.iterations += 1

    # -- every host -------------------------------------------------------------------------------

    def _warn(self, host: str, uuid: str, live: Liveset) -> None:
        """Edge-triggered warnings (ha.md 4.9): log each false→true; bonding errors become messages."""
        raised = {name for name, on in (live.warnings or {}).items() if on}
        previous = self._warnings.get(host, set())
        self._warnings[host] = raised
        for name in sorted(raised - previous):
            log.warning("HA warning on local host", host=uuid, warning=name)
            if name == "network_bonding_error":
                create_message(self.manager.store, "HA_NETWORK_BONDING_ERROR", 3, "Host", uuid,
                               "HA network heartbeat interface bonding error")

    # -- the master -------------------------------------------------------------------------------

    def master_processing(self, master: str, live: Liveset) -> None:
        """Apply the master's liveset (ha.md 4.9 master processing, steps 1 to 7)."""
        m = self.manager
        if self.restarts_prevented():
            log.info("master processing skipped: ha_prevent_restarts_for is in force")
            return
        with self.iteration_lock:
            hosts = m.hosts()
            missing = [h["uuid"] for _r, h in hosts if h["uuid"] not in live.hosts]
            if missing:
                # xapi's iteration fails half-way on such a liveset; xapid skips it whole.
                log.warning("liveset does not list every host; ignored", missing=missing)
                return
            unknown = set(live.hosts) - {h["uuid"] for _r, h in hosts}
            if unknown:
                log.warning("liveset lists unknown hosts; they are ignored", unknown=sorted(unknown))
            live_set = {ref for ref, h in hosts if live.hosts[h["uuid"]].liveness}
            if self._last_live is not None and live_set != self._last_live:
                m.planning.schedule_recomputation()
            if not m.local.get(m.host_uuid(master), "ha.disable_failover_decisions", False):
                m.failover.restart_auto_run_vms(live_set, self._last_live)
            self._last_live = live_set
            self.apply(live, live_set)
            m.planning.recompute_if_due(live_set)

    def apply(self, live: Liveset, live_set: set[str]) -> None:
        """Write what the liveset says into the pool database (only fields that change)."""
        m = self.manager
        store = m.store
        pool = m.pool()
        shutting_down = set(getattr(m, "shutting_down", ()))
        with store.transaction() as tx:
            for href, h in tx.items("host"):
                entry = live.hosts[h["uuid"]]
                alive = href in live_set and href not in shutting_down
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
        entries = list(live.hosts.values())
        all_lost = bool(entries) and all(e.liveness and not e.statefile_access for e in entries)
        if all_lost and not self._statefile_lost:
            master_uuid = m.host_uuid(m.daemon.master_ref())
            log.warning("all live hosts lost the HA statefile")
            create_message(store, "HA_STATEFILE_LOST", 2, "Host", master_uuid, STATEFILE_LOST_BODY)
        self._statefile_lost = all_lost

    @staticmethod
    def _peers(raw: Any) -> list[str]:
        if raw.time_since_last_update_on_statefile < raw.time_since_last_heartbeat:
            return list(raw.heartbeat_active_list_on_statefile)
        return list(raw.heartbeat_active_list_on_heartbeat)
