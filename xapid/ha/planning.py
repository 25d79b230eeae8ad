"""HA planning against the pool database (ha.md 4.9 step 7, 4.10, 5.2): ``daemon.ha.planning``.

This is the impure half of :mod:`xapid.ha.planner`: it reads a snapshot of the store, asks the
pure planner, and writes ``ha_plan_exists_for`` / ``ha_overcommitted`` back with xapi's alerts
(``xapi_ha_vm_failover.ml`` ``update_pool_status``, ``mark_pool_as_overcommitted``,
``assert_configuration_change_preserves_ha_plan``; ``xapi_pool.ml`` for the pool calls).

Locking: the store's lock is the only one.  The guards (``assert_*``) only read and may run
inside a store transaction (VM.start calls them in its own); :meth:`update_pool_status`
computes and writes inside one transaction, so concurrent callers serialise and the last one
writes what the latest state gives.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog

from xapid.api.message import create_message
from xapid.errors import ApiError
from xapid.ha import hooks, planner
from xapid.ha.planner import Change, Pool, Verdict

if TYPE_CHECKING:
    from xapid.daemon import Daemon
    from xapid.store import Store

log = structlog.get_logger("xapid.ha.planning")

NULL_REF = planner.NULL_REF
RESTART_PRIORITIES = ("restart", "best-effort", "")
RECOMPUTE_INTERVAL = 1800.0  # xapi's monitor recomputes a plan older than this (ha.md 4.9 step 7)
BREAKS_PLAN = "HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN"
OVERCOMMITTED = ("HA_POOL_OVERCOMMITTED", 3)
DROP_IN_PLAN = ("HA_POOL_DROP_IN_PLAN_EXISTS_FOR", 3)


def host_record(ref: str, rec: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> planner.Host:
    """A store ``host`` (and its ``host_metrics``) as the planner sees it."""
    return planner.Host(ref=ref, uuid=str(rec["uuid"]), memory_total=int(metrics["memory_total"]) if metrics else 0,
                        memory_overhead=int(rec.get("memory_overhead") or 0), enabled=bool(rec["enabled"]),
                        live=bool(metrics and metrics["live"]))


def vm_record(ref: str, rec: Mapping[str, Any], srs: tuple[str, ...] = (),
              networks: tuple[str, ...] = ()) -> planner.Vm:
    """A store ``VM`` as the planner sees it (``srs``/``networks`` only matter for agility)."""
    return planner.Vm(
        ref=ref, uuid=str(rec["uuid"]), static_max=int(rec["memory_static_max"]),
        dynamic_max=int(rec["memory_dynamic_max"]), dynamic_min=int(rec["memory_dynamic_min"]),
        overhead=int(rec.get("memory_overhead") or 0), domain_type=str(rec.get("domain_type") or "hvm"),
        power_state=str(rec["power_state"]), resident_on=str(rec["resident_on"]),
        scheduled_on=str(rec.get("scheduled_to_be_resident_on") or NULL_REF), always_run=bool(rec["ha_always_run"]),
        restart_priority=str(rec["ha_restart_priority"]), is_control_domain=bool(rec["is_control_domain"]),
        is_template=bool(rec["is_a_template"] or rec.get("is_a_snapshot")), srs=srs, networks=networks)


def _protected_rec(rec: Mapping[str, Any]) -> bool:
    return (bool(rec["ha_always_run"]) and rec["ha_restart_priority"] == "restart"
            and not rec["is_a_template"] and not rec["is_control_domain"])


class Planning:
    """Planning status of the pool: the pool calls, the guards and the plan upkeep."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.store: Store = daemon.store
        self._out_of_date = True  # as xapi's monitor: the first iteration recomputes
        self._computed_at = time.monotonic()
        # The planner's view of the store, kept current by a commit listener so that a snapshot
        # costs a dict copy rather than a rebuild (VM.start asks for two or three of them).
        self._vms: dict[str, planner.Vm] | None = None
        self._dirty_vms: set[str] = set()
        self._hosts: dict[str, planner.Host] | None = None
        self._topology: planner.Topology | None = None
        self._snapshot: tuple[int, Pool] | None = None  # (store generation, snapshot)
        self._base_plan: tuple[Pool, planner.RestartPlan] | None = None
        self.store.listeners.append(self._on_commit)

    # -- snapshots -------------------------------------------------------------------------------

    def _on_commit(self, _generation: int, changes: list[Any]) -> None:
        """Mark what a commit changed (called under the store lock, after the records are in)."""
        try:
            self._mark(changes)
        except Exception:  # noqa: BLE001 - the commit is done; never fail it, rebuild from scratch instead
            log.exception("planning cache update failed; it will be rebuilt")
            self._vms = None
            self._hosts = None
            self._topology = None

    def _mark(self, changes: list[Any]) -> None:
        for cls, ref, _op, old, new in changes:
            if cls == "VM":
                self._dirty_vms.add(ref)
            elif cls in ("VBD", "VIF"):
                for rec in (old, new):
                    if rec is not None:
                        self._dirty_vms.add(rec["VM"])
            elif cls == "VDI":
                for vbd in self.store.referrers("VBD", "VDI", ref):
                    rec = self.store.get("VBD", vbd)
                    if rec is not None:
                        self._dirty_vms.add(rec["VM"])
            if cls in ("host", "host_metrics"):
                self._hosts = None
            if cls in ("host", "SR", "PBD", "PIF", "network"):
                self._topology = None

    def _devices(self, vm: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The SRs of a VM's non-empty disks and the networks of its VIFs."""
        store = self.store
        srs: list[str] = []
        for vbd in store.referrers("VBD", "VM", vm):
            rec = store.get("VBD", vbd)
            if rec is None or rec["empty"]:
                continue
            vdi = store.get("VDI", rec["VDI"])
            if vdi is not None and vdi["SR"] not in srs:
                srs.append(vdi["SR"])
        nets: list[str] = []
        for vif in store.referrers("VIF", "VM", vm):
            rec = store.get("VIF", vif)
            if rec is not None and rec["network"] not in nets:
                nets.append(rec["network"])
        return tuple(srs), tuple(nets)

    def _vm(self, ref: str) -> planner.Vm | None:
        rec = self.store.get("VM", ref)
        return None if rec is None else vm_record(ref, rec, *self._devices(ref))

    def _build_topology(self, hosts: Mapping[str, planner.Host]) -> planner.Topology:
        store = self.store
        attached: dict[str, set[str]] = {}
        for _ref, pbd in store.items("PBD"):
            if pbd["currently_attached"]:
                attached.setdefault(pbd["SR"], set()).add(pbd["host"])
        nets: dict[str, set[str]] = {}
        for _ref, pif in store.items("PIF"):
            if pif.get("bond_slave_of", NULL_REF) in (NULL_REF, "", None):
                nets.setdefault(pif["network"], set()).add(pif["host"])
        return planner.Topology(
            enabled_hosts=frozenset(h.ref for h in hosts.values() if h.enabled),
            sr_shared={ref: bool(sr["shared"]) for ref, sr in store.items("SR")},
            sr_attached={sr: frozenset(h) for sr, h in attached.items()},
            network_hosts={net: frozenset(h) for net, h in nets.items()})

    def snapshot(self) -> Pool:
        """The pool as the planner sees it now (committed state).  Shared while the store does not
        change: callers must not modify it."""
        store = self.store
        with store.lock:
            generation = store.generation
            if self._snapshot is not None and self._snapshot[0] == generation:
                return self._snapshot[1]
            if self._vms is None:
                self._vms = {ref: vm_record(ref, rec, *self._devices(ref)) for ref, rec in store.items("VM")}
                self._dirty_vms.clear()
            for ref in self._dirty_vms:
                vm = self._vm(ref)
                if vm is None:
                    self._vms.pop(ref, None)
                else:
                    self._vms[ref] = vm
            self._dirty_vms.clear()
            if self._hosts is None:
                self._hosts = {ref: host_record(ref, rec, store.get("host_metrics", rec["metrics"]))
                               for ref, rec in store.items("host")}
            if self._topology is None:
                self._topology = self._build_topology(self._hosts)
            pool = Pool(dict(self._hosts), dict(self._vms), self._topology)
            self._snapshot = (generation, pool)
            return pool

    def _restart_plan(self, pool: Pool, live_set: list[str] | None = None) -> planner.RestartPlan:
        """The restart plan of the pool as it is (cached per snapshot when no live set is given)."""
        cached = self._base_plan
        if live_set is None and cached is not None and cached[0] is pool:
            return cached[1]
        rp = planner.restart_plan(pool, self.protected(pool), live_set)
        if live_set is None:
            self._base_plan = (pool, rp)
        return rp

    def _upper(self, pool: Pool) -> int:
        cap = self._cap()
        return len(pool.hosts) if cap is None else cap

    @staticmethod
    def protected(pool: Pool) -> list[str]:
        return [ref for ref, vm in pool.vms.items() if planner.is_protected(vm)]

    def _cap(self) -> int | None:
        """Corosync's quorum limit when a ``Cluster`` exists (``xapi_clustering.ml``), else None."""
        if not self.store.refs("Cluster"):
            return None
        hosts = self.store.refs("host")
        clustered = {ch["host"] for _r, ch in self.store.items("Cluster_host") if ch["enabled"]}
        return planner.corosync_cap(len(hosts), sum(1 for h in hosts if h not in clustered))

    def _pool(self) -> dict[str, Any]:
        rec = self.store.get("pool", self.daemon.pool_ref())
        assert rec is not None
        return rec

    def _vm_refs(self, refs: Iterable[str]) -> list[str]:
        out = []
        for ref in refs:
            if self.store.get("VM", ref) is None:
                raise ApiError("HANDLE_INVALID", "VM", ref)
            out.append(ref)
        return out

    # -- the questions ---------------------------------------------------------------------------

    def plan_exists(self, n: int) -> bool:
        """``pool.ha_failover_plan_exists``: true only if every protected VM is covered."""
        return planner.verdict(self._restart_plan(self.snapshot()), int(n)) is Verdict.ALL

    def compute_max_failures(self, update: bool = False) -> int:
        """The most host failures a plan survives; with ``update`` the side effects of the pool call.

        ``pool.ha_compute_max_host_failures_to_tolerate`` (xapi_pool.ml): when HA is enabled,
        ``ha_overcommitted := ha_host_failures_to_tolerate > result``, and a changed result moves
        ``ha_plan_exists_for`` to ``min(tolerate, result)``, alerting when it dropped.
        """
        if not update:
            pool = self.snapshot()
            return planner.max_failures_of(self._restart_plan(pool), self._upper(pool))
        messages: list[tuple[tuple[str, int], str]] = []
        with self.store.transaction() as tx:
            pool = self.snapshot()
            best = planner.max_failures_of(self._restart_plan(pool), self._upper(pool))
            rec = tx.get("pool", self.daemon.pool_ref())
            if rec["ha_enabled"]:
                tolerate = int(rec["ha_host_failures_to_tolerate"])
                rec["ha_overcommitted"] = tolerate > best
                current = int(rec["ha_plan_exists_for"])
                if current != best:
                    rec["ha_plan_exists_for"] = min(tolerate, best)
                    if best < current:
                        messages.append((DROP_IN_PLAN, str(best)))
            uuid = str(rec["uuid"])
        self._alert(uuid, messages)
        return best

    def hypothetical_max_failures(self, configuration: Mapping[str, str]) -> int:
        """``pool.ha_compute_hypothetical_max_host_failures_to_tolerate``: only ``restart`` entries count."""
        for priority in configuration.values():
            if priority not in RESTART_PRIORITIES:
                raise ApiError("INVALID_VALUE", "ha_restart_priority", priority)
        refs = self._vm_refs(configuration)
        chosen = [ref for ref in refs if configuration[ref] == "restart"]
        shared = self.snapshot()
        pool = Pool(dict(shared.hosts), dict(shared.vms), shared.topology)
        # The chosen VMs are planned exactly as they are, as if protected (xapi passes their records).
        for ref in chosen:
            pool.vms[ref] = replace(pool.vms[ref], always_run=True, restart_priority="restart")
        return planner.max_failures(pool, chosen, cap=self._cap())

    def failover_plan(self, failed_hosts: Iterable[str], failed_vms: Iterable[str]) -> dict[str, dict[str, str]]:
        """``pool.ha_compute_vm_failover_plan``: VM -> ``{host: ref}`` or ``{error_code: code}``."""
        vms = self._vm_refs(failed_vms)
        return planner.failover_plan(self.snapshot(), list(failed_hosts), vms)

    def restart_plan(self, vm_refs: list[str], live_host_refs: list[str]) -> tuple[dict[str, str], list[str]]:
        """Where HA should restart ``vm_refs`` on the live hosts: (VM -> host, VMs that fit nowhere).

        As xapi's ``compute_restart_plan``, every other offline protected VM is planned too (its
        memory is reserved), and the VMs already running stay where they are.
        """
        vms = self._vm_refs(vm_refs)
        pool = self.snapshot()
        tolerate = int(self._pool()["ha_host_failures_to_tolerate"])
        return planner.restart_placement(pool, self.protected(pool), vms, live_host_refs, tolerate)

    def agility_error(self, vm: str) -> tuple[str, str] | None:
        """Why ``vm`` is not agile (``VM.assert_agile``), or None."""
        self._vm_refs([vm])
        pool = self.snapshot()
        return planner.agility_error(pool.vms[vm], pool.topology)

    # -- upkeep ----------------------------------------------------------------------------------

    def schedule_recomputation(self) -> None:
        """Mark the plan out of date; the master's monitor recomputes it on its next iteration."""
        self._out_of_date = True

    def recompute_if_due(self, live_set: Iterable[str] | None = None) -> bool:
        """Recompute planning status if it is out of date or older than 1800 s; true if it ran."""
        if not self._out_of_date and time.monotonic() - self._computed_at < RECOMPUTE_INTERVAL:
            return False
        self.update_pool_status(live_set)
        return True

    def mark_overcommitted(self, live_set: Iterable[str] | None = None) -> bool:
        """xapi's ``mark_pool_as_overcommitted``: the overcommitted branch of :meth:`update_pool_status`,
        whatever the plan says (HA restart calls it when overcommit protection refused a start)."""
        return self.update_pool_status(live_set, force_overcommitted=True)

    def update_pool_status(self, live_set: Iterable[str] | None = None, force_overcommitted: bool = False) -> bool:
        """Bring ``ha_plan_exists_for`` / ``ha_overcommitted`` up to date; true if either changed.

        With n = ``ha_host_failures_to_tolerate``: a plan for n failures covering every protected VM
        clears ``ha_overcommitted`` and sets ``ha_plan_exists_for := n``.  Otherwise the pool is
        marked overcommitted: ``ha_plan_exists_for`` follows the maximum (at most n), with
        ``HA_POOL_DROP_IN_PLAN_EXISTS_FOR`` when it drops, and ``HA_POOL_OVERCOMMITTED`` on the
        false -> true change of ``ha_overcommitted``, then the ``pool-ha-overcommitted`` hooks.  Must
        not be called inside a store transaction.
        """
        live = None if live_set is None else list(live_set)
        messages: list[tuple[tuple[str, int], str]] = []
        with self.store.transaction() as tx:
            rec = tx.get("pool", self.daemon.pool_ref())
            pool = self.snapshot()
            rp = self._restart_plan(pool, live)
            tolerate = int(rec["ha_host_failures_to_tolerate"])
            planned = int(rec["ha_plan_exists_for"])
            overcommitted = bool(rec["ha_overcommitted"])
            if not force_overcommitted and planner.verdict(rp, tolerate) is Verdict.ALL:
                rec.update(ha_overcommitted=False, ha_plan_exists_for=tolerate)
                changed = overcommitted or planned != tolerate
            else:
                best = planner.max_failures_of(rp, self._upper(pool))
                if planned != best:
                    rec["ha_plan_exists_for"] = min(tolerate, best)
                    if best < planned:
                        messages.append((DROP_IN_PLAN, str(best)))
                if not overcommitted:
                    rec["ha_overcommitted"] = True
                    messages.append((OVERCOMMITTED, (
                        f"The failover tolerance for pool '{rec['name_label']}' has dropped and the initially "
                        "specified number of host failures to tolerate can no longer be guaranteed")))
                changed = planned != best or not overcommitted
            self._out_of_date = False
            self._computed_at = time.monotonic()
            uuid = str(rec["uuid"])
            now = (bool(rec["ha_overcommitted"]), int(rec["ha_plan_exists_for"]))
        if changed:
            log.info("HA planning status changed", overcommitted=now[0], plan_exists_for=now[1])
        self._alert(uuid, messages)
        if now[0] and not overcommitted:
            # A chance for someone to bring more capacity online (xapi_hooks.ml pool_ha_overcommitted_hook).
            hooks.run(self.daemon.state_dir / "hooks", hooks.POOL_HA_OVERCOMMITTED, hooks.REASON_NONE)
        return changed

    def _alert(self, pool_uuid: str, messages: list[tuple[tuple[str, int], str]]) -> None:
        for (name, priority), body in messages:
            create_message(self.store, name, priority, "Pool", pool_uuid, body)

    # -- overcommit protection -------------------------------------------------------------------

    def _assert_change(self, change: Change) -> None:
        """Refuse a change that would break the plan that exists now (ha.md 4.10)."""
        rec = self._pool()
        if not rec["ha_enabled"] or rec["ha_allow_overcommit"]:
            return
        n = int(rec["ha_plan_exists_for"])
        pool = self.snapshot()
        if planner.verdict(self._restart_plan(pool), n) is not Verdict.ALL:
            return  # no plan now: it cannot get worse, and blocking everything would not help
        if planner.plan_for_n_failures(pool, self.protected(pool), n, change=change) is not Verdict.ALL:
            raise ApiError(BREAKS_PLAN)

    def assert_vm_start_preserves_plan(self, vm_ref: str, host_ref: str) -> None:
        """VM.start/start_on on ``host_ref`` (message_forwarding.ml ``check_vm_preserves_ha_plan``)."""
        rec = self.store.get("VM", vm_ref)
        if rec is None:
            raise ApiError("HANDLE_INVALID", "VM", vm_ref)
        if rec["ha_restart_priority"] == "restart" and not rec["ha_always_run"]:
            self.assert_new_vm_preserves_plan(vm_ref)
        else:
            self._assert_change(Change(arriving={vm_ref: host_ref}))

    def assert_new_vm_preserves_plan(self, vm_ref: str) -> None:
        """A VM about to become protected (its own place is the planner's choice)."""
        self._assert_change(Change(new_vms_to_protect=(vm_ref,)))

    def assert_host_change_preserves_plan(self, host_ref: str) -> None:
        """host.disable / host.evacuate: the plan must survive without ``host_ref``."""
        if self.store.get("host", host_ref) is None:
            raise ApiError("HANDLE_INVALID", "host", host_ref)
        self._assert_change(Change(hosts_to_disable=frozenset({host_ref})))

    def assert_nfailures_change_preserves_plan(self, n: int) -> None:
        """pool.set_ha_host_failures_to_tolerate to ``n``."""
        self._assert_change(Change(num_failures=int(n)))
