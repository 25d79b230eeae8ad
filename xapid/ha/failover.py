"""What HA does when hosts fail (ha.md 4.9): dead hosts, VM reset, protected-VM restart, master failover.

The master's monitor calls :meth:`Failover.restart_auto_run_vms` with the live set of each
iteration (xapi's ``Xapi_ha_vm_failover.restart_auto_run_vms``); every slave's monitor calls
:meth:`Failover.slave_processing`, which runs the master-failure procedure
(``Xapi_ha.on_master_failure``) when the master has left the liveset.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from itertools import groupby
from typing import TYPE_CHECKING, Any

import structlog

from xapid.api import vm as vm_api
from xapid.api.message import create_message
from xapid.api.pool import transition_master
from xapid.errors import ApiError
from xapid.ha import hooks
from xapid.ha.liveset import Liveset

if TYPE_CHECKING:
    from xapid.ha.manager import HaManager

log = structlog.get_logger("xapid.ha.failover")

RESTART_RETRY_GATE = 120.0  # xapi: a protected VM is not retried within 2 minutes of its last attempt
BEST_EFFORT_MAX_TRIES = 2  # xapi: ha_best_effort_max_retries
MASTER_POLL = 5.0  # xapi: wait 5 s when no live master is in the liveset


def is_protected(vm: dict[str, Any]) -> bool:
    """xapi's ``Helpers.vm_should_always_run``: ha_always_run and restart priority ``restart``."""
    return (bool(vm["ha_always_run"]) and vm["ha_restart_priority"] == "restart"
            and not vm["is_a_template"] and not vm["is_control_domain"])


def order_key(item: tuple[str, dict[str, Any]]) -> tuple[int, int]:
    """VM.order ascending, negative orders last (xapi's ``by_order``)."""
    order = int(item[1]["order"])
    return (1, 0) if order < 0 else (0, order)


class Failover:
    def __init__(self, manager: HaManager) -> None:
        self.manager = manager
        self.hooks_dir = manager.daemon.state_dir / "hooks"
        self._last_attempt: dict[str, float] = {}
        self._alerted: set[str] = set()
        self._best_effort_tried: dict[str, int] = {}
        self._become_master_lock = threading.Lock()
        self._memory_of: str | None = None  # the master whose xapi remembers the tables above
        self._live_set: set[str] = set()

    def _forget_if_new_master(self) -> None:
        """A new master is another xapi process: it starts with empty retry and alert tables."""
        master = self.manager.daemon.master_ref()
        if self._memory_of != master:
            self._memory_of = master
            self._last_attempt.clear()
            self._alerted.clear()
            self._best_effort_tried.clear()

    # -- the master: dead hosts and restarts ------------------------------------------------------

    def restart_auto_run_vms(self, live_set: set[str], last_live: set[str] | None) -> None:
        """Declare hosts outside ``live_set`` dead, reset their VMs, restart protected VMs, then best-effort ones."""
        m = self.manager
        store = m.store
        self._forget_if_new_master()
        shutting_down = set(getattr(m, "shutting_down", ()))
        reset_candidates: list[str] = []
        newly_dead: list[tuple[str, str]] = []
        for href, h in m.hosts():
            if href in live_set:
                continue
            reset_candidates += [v for v in store.referrers("VM", "resident_on", href)
                                 if not (store.get("VM", v) or {}).get("is_control_domain", True)]
            metrics = store.get("host_metrics", h["metrics"])
            if metrics is None or not metrics["live"]:
                continue
            if href not in shutting_down:
                log.warning("host failed", host=h["uuid"], name=h["name_label"])
                create_message(store, "HA_HOST_FAILED", 3, "Host", h["uuid"],
                               f"Server '{h['name_label']}' has failed")
            try:
                hooks.run_checked(self.hooks_dir, hooks.HOST_PRE_DECLARE_DEAD, hooks.REASON_FENCED, h["uuid"])
            except ApiError as e:
                # As xapi_ha_vm_failover.ml: the host is left out of this round's dead hosts (no
                # post hook), though its VMs are still reset and restarted; the liveset pass that
                # follows (xapi_ha.ml) records it as not live, so the hook is not run again.
                log.error("host-pre-declare-dead hook failed", host=h["uuid"], error=e.params)
                continue
            with store.transaction() as tx:
                tx.update("host_metrics", h["metrics"], live=False)
            newly_dead.append((href, h["uuid"]))
        reset: list[str] = []
        with store.transaction() as tx:
            for vm in reset_candidates:
                rec = tx.find("VM", vm)
                if rec is not None and rec["power_state"] in ("Running", "Paused"):
                    vm_api.reset_vm_to_halted(tx, vm)
                    reset.append(vm)
        if reset:
            log.warning("VMs of dead hosts reset to Halted", vms=[store.get("VM", v)["uuid"] for v in reset])
        for _href, uuid in newly_dead:
            hooks.run(self.hooks_dir, hooks.HOST_POST_DECLARE_DEAD, hooks.REASON_FENCED, uuid)
        if reset:
            m.planning.update_pool_status(live_set)
        self._live_set = live_set
        all_ok = self._restart_protected(live_set, bool(reset))
        self._restart_best_effort(live_set, last_live or set(), all_ok, reset)

    def _placeable_hosts(self, live_set: set[str]) -> list[str]:
        return [h for h in live_set if (self.manager.store.get("host", h) or {}).get("enabled")]

    def _restart_protected(self, live_set: set[str], something_reset: bool) -> bool:
        """Start every halted protected VM, in VM.order groups; True if all of them run now."""
        m = self.manager
        store = m.store
        halted = [(r, v) for r, v in store.items("VM") if is_protected(v) and v["power_state"] == "Halted"]
        # Forget VMs that are no longer halted and protected (xapi's gc_table): a VM that ran again
        # meanwhile gets a fresh 120 s budget and a fresh alert.
        known = {r for r, _ in halted}
        self._last_attempt = {v: t for v, t in self._last_attempt.items() if v in known}
        self._alerted &= known
        if not halted:
            return True
        targets = self._placeable_hosts(live_set)
        plan, unplaced = m.planning.restart_plan([r for r, _ in halted], targets)
        if hooks.exists(self.hooks_dir, hooks.POOL_PRE_HA_VM_RESTART) and (plan or something_reset):
            hooks.run(self.hooks_dir, hooks.POOL_PRE_HA_VM_RESTART, hooks.REASON_NONE)
            plan, unplaced = m.planning.restart_plan([r for r, _ in halted], targets)
        complete = not unplaced
        if not complete:
            log.warning("no complete plan to restart every protected VM: plain VM.start in order",
                        unplaced=[store.get("VM", v)["uuid"] for v in unplaced])
        results: dict[str, bool] = {}
        for _order, group in groupby(sorted(halted, key=order_key), key=order_key):
            vms = [r for r, _ in group]
            threads = []
            for vm in vms:
                host = plan.get(vm) if complete else None
                t = threading.Thread(target=lambda v=vm, h=host: results.__setitem__(v, self._restart_one(v, h)),
                                     name="ha-restart", daemon=True)
                t.start()
                threads.append(t)
            for t in threads:
                t.join()
        for vm, started in results.items():
            if started:
                self._alerted.discard(vm)
            elif vm not in self._alerted:
                self._alerted.add(vm)
                rec = store.get("VM", vm)
                if rec is not None:
                    log.error("protected VM could not be restarted", vm=rec["uuid"])
                    create_message(store, "HA_PROTECTED_VM_RESTART_FAILED", 2, "VM", rec["uuid"], "")
        return all(results.values())

    def _restart_one(self, vm: str, host: str | None) -> bool:
        """One protected VM: the planned start (if not tried in the last 120 s), then one more plain start."""
        now = time.monotonic()
        last = self._last_attempt.get(vm)
        if last is not None and now - last < RESTART_RETRY_GATE:
            log.info("protected VM restart delayed: tried less than 120 s ago", vm=vm)
            return False
        self._last_attempt[vm] = now

        def attempt(on: str | None) -> bool:
            try:
                vm_api.start_vm(self.manager.daemon, vm, on, paused=False, force=True)
                return True
            except ApiError as e:
                if e.code == "HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN":
                    log.error("restart refused by overcommit protection: pool marked overcommitted, retrying")
                    self.manager.planning.mark_overcommitted(self._live_set)
                    try:
                        vm_api.start_vm(self.manager.daemon, vm, on, paused=False, force=True)
                        return True
                    except ApiError as again:
                        e = again
                log.warning("protected VM restart failed", vm=vm, host=on, error=e.description)
                return False

        if attempt(host):
            log.info("protected VM restarted", vm=vm, host=host)
            return True
        return attempt(None)

    def _restart_best_effort(self, live_set: set[str], last_live: set[str], all_ok: bool, reset: list[str]) -> None:
        """ha.md 4.9 step 7: which halted best-effort VMs to try, and trying them (plain VM.start)."""
        store = self.manager.store
        if all_ok and len(live_set) > len(last_live):
            candidates = [r for r, v in store.items("VM") if v["power_state"] == "Halted"
                          and v["ha_restart_priority"] == "best-effort" and not v["is_a_template"]]
        elif live_set == last_live:
            candidates = list(self._best_effort_tried)
        else:
            self._best_effort_tried.clear()
            candidates = reset
        for vm in candidates:
            rec = store.get("VM", vm)
            if rec is None or rec["power_state"] != "Halted" or rec["ha_restart_priority"] != "best-effort":
                self._best_effort_tried.pop(vm, None)
                continue
            try:
                vm_api.start_vm(self.manager.daemon, vm, None, paused=False, force=True)
                self._best_effort_tried.pop(vm, None)
                log.info("best-effort VM restarted", vm=rec["uuid"])
            except ApiError as e:
                tries = self._best_effort_tried.get(vm, 0) + 1
                log.warning("best-effort VM restart failed", vm=rec["uuid"], error=e.description, tries=tries)
                if tries >= BEST_EFFORT_MAX_TRIES:
                    self._best_effort_tried.pop(vm, None)
                else:
                    self._best_effort_tried[vm] = tries

    # -- slaves: the master-failure procedure -----------------------------------------------------

    def slave_processing(self, host: str, live: Liveset, stop: threading.Event | None = None) -> None:
        """If the master is not live and holding the master lock in ``host``'s liveset, find a new one."""
        m = self.manager
        entry = live.hosts.get(m.host_uuid(m.daemon.master_ref()))
        if entry is not None and entry.liveness and entry.master:
            return
        log.warning("the master is not live in this host's liveset: master-failure procedure",
                    host=m.host_uuid(host))
        self.master_failure(host, stop)

    def master_failure(self, host: str, stop: threading.Event | None = None) -> None:
        """``on_master_failure``: propose this host as master, or follow the one live master."""
        m = self.manager
        uuid = m.host_uuid(host)
        poll = min(MASTER_POLL, float(m.daemon.config["ha-monitor-interval"]) * 2)
        wait: Callable[[float], bool] = stop.wait if stop is not None else lambda s: bool(time.sleep(s))
        while m.daemon.hw.is_running(uuid) and m.pool()["ha_enabled"]:
            if stop is not None and stop.is_set():
                return
            if not m.local.get(uuid, "ha.disable_failover_decisions", False) and m._propose(host):
                self.become_master(host)
                return
            try:
                live = m.query(host)
            except ApiError as e:
                log.warning("master-failure procedure: liveset query failed", host=uuid, error=str(e))
                return
            masters = [u for u, e in live.hosts.items() if e.master and e.liveness]
            if len(masters) == 1:
                ref = m.store.by_uuid("host", masters[0])
                if ref is not None and ref != m.daemon.master_ref():
                    log.info("following the new master", host=uuid, master=masters[0])
                return
            if len(masters) > 1:
                log.error("more than one live master in the liveset", host=uuid, masters=masters)
                return
            if wait(poll):
                return

    def become_master(self, host: str) -> None:
        """This host holds the master lock: it is the pool's master now (:func:`transition_master`:
        every host follows it, no session survives, ``POOL_MASTER_TRANSITION``)."""
        m = self.manager
        with self._become_master_lock:
            old = m.daemon.master_ref()
            if old == host:
                return
            transition_master(m.daemon, host)
            log.warning("this host became the pool master", host=m.host_uuid(host), previous=m.host_uuid(old))
