"""HA enable, disable, emergency disable, boot-time re-arm (ha.md 4.1 to 4.8).

Every step that touches the pool database is its own short transaction, so
readers are never blocked behind a script; every script run goes through
:class:`~xapid.ha.scripts.ClusterStackRunner`.  The failure policy is xapi's:
failures before the per-host stage leave the pool fields written so far
(and the reusable VDIs); a failure from the per-host stage on runs the full
disable and re-raises, so no heartbeat daemon is left and ``ha_enabled``
stays false.
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import structlog

from xapid.api.vdi import create_vdi
from xapid.errors import ApiError, internal
from xapid.ha import conf, stack
from xapid.ha.failover import Failover
from xapid.ha.localdb import LocalDb
from xapid.ha.monitor import Monitor
from xapid.ha.planning import Planning
from xapid.ha.scripts import ClusterStackRunner, ScriptError
from xapid.storage import sm_of
from xapid.store import Transaction, new_ref

if TYPE_CHECKING:
    from xapid.api import Call
    from xapid.daemon import Daemon

log = structlog.get_logger("xapid.ha")

STATEFILE_SIZE = 266_240
METADATA_SIZE = 3_988_783_104
FRESH_PAIR_SPACE = 3_992_977_408
MTC_DAEMON_NOT_PRESENT = 14
MTC_DAEMON_PRESENT = 15
MTC_INVALID_POOL_STATE = 11
MTC_CAN_NOT_ACCESS_STATEFILE = 8
MTC_BOOTJOIN_TIMEOUT = 12


class HaManager:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.store = daemon.store
        cfg = daemon.config
        self.runner = ClusterStackRunner(
            cfg["cluster-stack-root"],
            timeout=cfg["ha-script-timeout"],
            start_timeout=cfg["ha-start-daemon-timeout"],
            state_dir=daemon.state_dir,
        )
        self.local = LocalDb(daemon.state_dir)
        self._op_lock = threading.Lock()
        self._port_lock = threading.Lock()
        self._port_for: tuple[str, int] = ("", 0)
        self.monitor = Monitor(self)
        self.failover = Failover(self)
        self.planning = Planning(daemon)
        daemon.hw.on_power_change(self._on_power_change)

    def _on_power_change(self, host_uuid: str, old: str, new: str) -> None:
        """A host without power, or frozen, runs no monitor (its xapi is gone)."""
        if new in ("off", "fenced"):
            ref = self.store.by_uuid("host", host_uuid)
            if ref is not None:
                self.monitor.signal_stop(ref)

    # -- helpers -------------------------------------------------------------------------------------

    def pool(self) -> dict[str, Any]:
        rec = self.store.get("pool", self.daemon.pool_ref())
        assert rec is not None
        return rec

    def hosts(self) -> list[tuple[str, dict[str, Any]]]:
        return self.store.items("host")

    def host_uuid(self, host: str) -> str:
        rec = self.store.get("host", host)
        assert rec is not None
        return str(rec["uuid"])

    def run(self, host: str, script: str, *args: str) -> str:
        """Run ``script`` for ``host`` with the stack named in that host's local db."""
        uuid = self.host_uuid(host)
        stack_name = self.local.get(uuid, "ha_cluster_stack") or self.pool()["ha_cluster_stack"]
        return self.runner.run(stack_name, script, uuid, self.local.conf_path(uuid), args).stdout

    def try_run(self, host: str, script: str, *args: str, ok: tuple[int, ...] = ()) -> bool:
        """Run a script whose failure is only logged (xapi's "errors logged" steps)."""
        try:
            self.run(host, script, *args)
            return True
        except ScriptError as e:
            if e.exit_code in ok:
                return True
            log.warning("cluster-stack script failed", script=script, host=self.host_uuid(host), error=str(e))
        except ApiError as e:
            log.warning("cluster-stack script failed", script=script, host=self.host_uuid(host), error=str(e))
        return False

    def in_parallel(
        self, hosts: list[str], fn: Callable[[str], Any]
    ) -> list[tuple[str, BaseException | None]]:
        """Run ``fn`` for every host at once; return each host's exception (or None) in host order."""
        if not hosts:
            return []
        with ThreadPoolExecutor(max_workers=len(hosts), thread_name_prefix="ha-host") as pool:
            futures = [(h, pool.submit(fn, h)) for h in hosts]
            return [(h, f.exception()) for h, f in futures]

    # -- the pool operation gate (ha.md 4.1 step 1) ------------------------------------------------------

    def _begin(self, call: Call, op: str) -> str:
        with self.store.transaction() as tx:
            pool_ref = self.daemon.pool_ref()
            pool = tx.get("pool", pool_ref)
            running = set(pool["current_operations"].values())
            if "ha_enable" in running:
                raise ApiError("HA_ENABLE_IN_PROGRESS")
            if "ha_disable" in running:
                raise ApiError("HA_DISABLE_IN_PROGRESS")
            if op == "ha_enable" and pool["ha_enabled"]:
                raise ApiError("HA_IS_ENABLED")
            if op == "ha_disable" and not pool["ha_enabled"]:
                raise ApiError("HA_NOT_ENABLED")
            op_id = call.task or new_ref()
            pool["current_operations"][op_id] = op
            pool["allowed_operations"] = [
                o for o in pool["allowed_operations"] if o not in ("ha_enable", "ha_disable")
            ]
            return op_id

    def _end(self, op_id: str) -> None:
        with self.store.transaction() as tx:
            pool = tx.get("pool", self.daemon.pool_ref())
            pool["current_operations"].pop(op_id, None)
            self._allowed(pool)

    @staticmethod
    def _allowed(pool: dict[str, Any]) -> None:
        ops = [o for o in pool["allowed_operations"] if o not in ("ha_enable", "ha_disable")]
        if not pool["current_operations"]:
            ops.append("ha_disable" if pool["ha_enabled"] else "ha_enable")
        pool["allowed_operations"] = ops

    # -- enable ----------------------------------------------------------------------------------------

    def enable(
        self, call: Call, heartbeat_srs: list[str], configuration: dict[str, str], cluster_stack: str
    ) -> None:
        """``pool.enable_ha`` (ha.md 4.1, with the design's ``cluster_stack`` argument)."""
        op_id = self._begin(call, "ha_enable")
        try:
            with self._op_lock:
                self._enable(heartbeat_srs, configuration, cluster_stack, call.task)
        finally:
            self._end(op_id)

    def _choose_stack(self, tx: Transaction, master: str, requested: str) -> str:
        if requested:
            self.runner.stack_dir(requested)
            stack.check_explicit(tx, master, requested)
            return requested
        chosen = stack.choose(tx, master, self.daemon.config["cluster-stack-default"])
        # The design names a missing stack folder UNKNOWN_CLUSTER_STACK (xapi: INTERNAL_ERROR).
        self.runner.stack_dir(chosen)
        return chosen

    def _enable(self, heartbeat_srs: list[str], configuration: dict[str, str], requested: str,
                task: str | None) -> None:
        master = self.daemon.master_ref()
        pool_ref = self.daemon.pool_ref()
        base_t = configuration.get("timeout", self.pool()["other_config"].get(
            "default_ha_timeout", self.daemon.config["ha_default_timeout_base"]))
        # xapi only notices a bad timeout when writing xhad.conf (after persisting the stack);
        # refusing it first keeps "bad input changes nothing" true.
        conf.timeouts(base_t)
        with self.store.transaction() as tx:
            pool = tx.get("pool", pool_ref)
            if pool["ha_enabled"]:
                raise ApiError("HA_IS_ENABLED")
            unplugged = [
                r for r, p in tx.items("PIF") if p["disallow_unplug"] and not p["currently_attached"]
            ]
            if unplugged:
                raise ApiError("REQUIRED_PIF_IS_UNPLUGGED", *unplugged)
            for href, h in tx.items("host"):
                metrics = tx.read("host_metrics", h["metrics"])
                if metrics is None or not metrics["live"]:
                    raise ApiError("HOST_OFFLINE", href)
            for sr in heartbeat_srs:
                tx.get("SR", sr)
            chosen = self._choose_stack(tx, master, requested)
            pool["ha_cluster_stack"] = chosen
        self.local.set(self.host_uuid(master), ha_cluster_stack=chosen)
        log.info("HA cluster stack chosen", stack=chosen, requested=requested or None)

        with self.store.transaction() as tx:
            candidates = heartbeat_srs[:1] or [r for r, _ in tx.items("SR")]
            sr = None
            first_error: ApiError | None = None
            for candidate in candidates:
                try:
                    self._assert_statefile_sr(tx, candidate, chosen)
                    sr = candidate
                    break
                except ApiError as e:
                    first_error = first_error or e
            if sr is None:
                if heartbeat_srs and first_error is not None:
                    raise first_error
                raise ApiError("CANNOT_CREATE_STATE_FILE")
            statefile = self._find_or_create(
                tx, sr, "ha_statefile", STATEFILE_SIZE, "Statefile for HA", "Used for storage heartbeating"
            )
            metadata = self._find_or_create(
                tx, sr, "redo_log", METADATA_SIZE, "Metadata for HA", "Used for master failover"
            )
            pool = tx.get("pool", pool_ref)
            pool.update(ha_statefiles=[statefile], ha_configuration=dict(configuration), ha_plan_exists_for=0)
            statefile_path = str(
                self.daemon.disks.vdi_path(tx.get("SR", sr)["uuid"], tx.get("VDI", statefile)["uuid"])
            )
        self.planning.update_pool_status()
        generation = str(uuidlib.uuid4())
        self._write_conf(master, generation, base_t, statefile_path)
        self.run(master, "ha_set_pool_state", "init")
        hosts = [r for r, _ in self.hosts()]
        tasks = self.daemon.tasks
        steps = 3 * len(hosts)  # as xapi: preconfigure, join and finish count one step per host
        try:
            # xapi preconfigures host after host; nothing a client sees depends on that order, and
            # doing the hosts at once keeps a 64-host enable from queueing hundreds of fsyncs.
            tasks.check_cancelled(task)
            results = self.in_parallel(hosts, lambda h: self._preconfigure(
                h, chosen, [statefile], metadata, generation, base_t, statefile_path, is_master=h == master))
            failures = [e for _h, e in results if e is not None]
            if failures:
                raise failures[0]
            tasks.progress(task, len(hosts) / steps)
            tasks.check_cancelled(task)
            master_done, master_ok = threading.Event(), threading.Event()
            results = self.in_parallel(hosts, lambda h: self._join(h, master, master_done, master_ok))
            failures = [e for _h, e in results if e is not None]
            if failures:
                raise failures[0]
            tasks.progress(task, 2 * len(hosts) / steps)
            tasks.check_cancelled(task)
            with self.store.transaction() as tx:
                pool = tx.get("pool", pool_ref)
                pool["ha_enabled"] = True
                for vdi in (statefile, metadata):
                    tx.update("VDI", vdi, allowed_operations=["update"])
        except BaseException:
            log.warning("HA enable failed in the per-host stage; disabling")
            self._internal_disable(rollback=True)
            raise
        self.monitor.start()
        log.info("HA enabled", stack=chosen, hosts=len(hosts))

    def _assert_statefile_sr(self, tx: Transaction, sr: str, chosen: str) -> None:
        """The statefile checks of ha.md 4.1 step 12, in order."""
        rec = tx.get("SR", sr)
        pbds = [tx.get("PBD", p) for p in tx.referrers("PBD", "SR", sr)]
        hosts_with = {p["host"] for p in pbds}
        if any(h not in hosts_with for h in tx.refs("host")) or not all(
            p["currently_attached"] for p in pbds
        ):
            raise ApiError("SR_HAS_NO_PBDS", sr)
        supported = self.runner.supported_srs(chosen)
        if supported is not None and rec["type"] not in supported:
            # The design's parameter: the SR type the stack requires (xapi sends the offered type).
            raise ApiError("INCOMPATIBLE_STATEFILE_SR", ",".join(supported))
        sm = sm_of(tx, rec["type"])
        features = sm[1]["features"] if sm else {}
        if "VDI_GENERATE_CONFIG" not in features and "VDI_ATTACH_OFFLINE" not in features:
            raise ApiError("SR_OPERATION_NOT_SUPPORTED", sr)
        if self._reusable(tx, sr, "ha_statefile", STATEFILE_SIZE) is None:
            if rec["physical_size"] - rec["physical_utilisation"] < FRESH_PAIR_SPACE:
                raise ApiError("SR_SOURCE_SPACE_INSUFFICIENT", sr)

    @staticmethod
    def _reusable(tx: Transaction, sr: str, vdi_type: str, size: int) -> str | None:
        for vdi in tx.referrers("VDI", "SR", sr):
            rec = tx.read("VDI", vdi)
            if rec is not None and rec["type"] == vdi_type and rec["virtual_size"] >= size:
                return vdi
        return None

    def _find_or_create(
        self, tx: Transaction, sr: str, vdi_type: str, size: int, label: str, descr: str
    ) -> str:
        found = self._reusable(tx, sr, vdi_type, size)
        if found is not None:
            return found
        rec = tx.get("SR", sr)
        if rec["physical_size"] - rec["physical_utilisation"] < size:
            raise ApiError("SR_SOURCE_SPACE_INSUFFICIENT", sr)
        return create_vdi(
            self.daemon.disks,
            tx,
            {
                "name_label": label,
                "name_description": descr,
                "SR": sr,
                "virtual_size": size,
                "type": vdi_type,
                "sharable": True,
                "read_only": False,
                "sm_config": {"type": "raw"},
            },
        )

    def _udp_port(self, generation: str) -> int:
        """The heartbeat port of the pool for this HA generation: one port, free on every host address."""
        with self._port_lock:
            if self._port_for[0] != generation:
                self._port_for = (generation, conf.free_udp_port([h["address"] for _r, h in self.hosts()]))
            return self._port_for[1]

    def _write_conf(self, host: str, generation: str, base_t: object, statefile_path: str) -> None:
        host_rec = self.store.get("host", host)
        assert host_rec is not None
        bridge, device = "xenbr0", "eth0"
        for pif in self.store.referrers("PIF", "host", host):
            p = self.store.get("PIF", pif)
            if p and p["management"]:
                device = p["device"]
                net = self.store.get("network", p["network"])
                bridge = net["bridge"] if net else bridge
                break
        else:
            raise internal("there is no management interface for heartbeating")
        cfg = self.daemon.config
        text = conf.render(
            generation,
            [(h["uuid"], h["address"]) for _r, h in self.hosts()],
            base_t,
            host_rec["uuid"],
            bridge,
            device,
            statefile_path,
            {
                "XapiHealthCheckInterval": cfg["ha_xapi_healthcheck_interval"],
                "XapiHealthCheckTimeout": cfg["ha_xapi_healthcheck_timeout"],
                "XapiRestartAttempts": cfg["ha_xapi_restart_attempts"],
                "XapiRestartTimeout": cfg["ha_xapi_restart_timeout"],
            },
            udp_port=self._udp_port(generation),
        )
        conf.write(self.local.conf_path(host_rec["uuid"]), text)

    def _preconfigure(
        self,
        host: str,
        chosen: str,
        statefiles: list[str],
        metadata: str,
        generation: str,
        base_t: object,
        statefile_path: str,
        is_master: bool,
    ) -> None:
        """``Host.preconfigure_ha`` (ha.md 4.2)."""
        self.runner.stack_dir(chosen)
        uuid = self.host_uuid(host)
        self.local.set(uuid, ha_cluster_stack=chosen)
        with self.store.transaction() as tx:
            tx.update("host", host, ha_statefiles=list(statefiles))
        if not is_master:
            self._write_conf(host, generation, base_t, statefile_path)
        peers = {h["uuid"]: h["address"] for _r, h in self.hosts()}
        self.local.set(uuid, ha_peers=peers, ha_base_t=int(str(base_t)))

    def _join(self, host: str, master: str, master_done: threading.Event, master_ok: threading.Event) -> None:
        """``Host.ha_join_liveset`` (ha.md 4.3); the master sets ``master_done`` (and ``master_ok``)."""
        if host == master:
            try:
                self._start_and_arm(host)
                self._claim_master(host)
                master_ok.set()
            finally:
                master_done.set()
            return
        self._start_and_arm(host)
        # xapi's slaves poll their liveset every 5 s until the master shows up as master; waiting for
        # the master's own join first keeps a large pool from spawning a query per host per poll.
        master_done.wait(self.daemon.config["ha-script-timeout"])
        if master_done.is_set() and not master_ok.is_set():
            raise internal("the master failed to join the liveset during HA enable")
        master_uuid = self.host_uuid(master)
        deadline = time.monotonic() + self.daemon.config["ha-script-timeout"]
        while True:
            live = self.query(host)
            entry = live.hosts.get(master_uuid)
            if entry is None:
                raise internal("the master is missing from the liveset during HA enable")
            if live.status == "Online" and entry.master and entry.liveness:
                return
            if live.status == "Online" and (not entry.liveness or entry.statefile_corrupted
                                            or not entry.statefile_access or entry.excluded):
                raise internal("existing master failed during HA enable")
            if time.monotonic() > deadline:
                raise internal("timed out waiting for the master to appear in the liveset")
            time.sleep(0.5)

    def _start_and_arm(self, host: str) -> None:
        """``ha_start_daemon`` with xapi's error mapping, then mark the host armed."""
        try:
            self.run(host, "ha_start_daemon")
        except ScriptError as e:
            if e.exit_code == MTC_BOOTJOIN_TIMEOUT:
                raise ApiError("HA_FAILED_TO_FORM_LIVESET") from e
            if e.exit_code == MTC_CAN_NOT_ACCESS_STATEFILE:
                raise ApiError("HA_HOST_CANNOT_ACCESS_STATEFILE") from e
            raise
        self.local.set(self.host_uuid(host), **{"ha.armed": True, "ha.disable_failover_decisions": False})

    def _claim_master(self, host: str) -> None:
        """The master takes the master lock at the end of its join, or the enable fails."""
        if not self._propose(host):
            uuid = self.host_uuid(host)
            stack_name = self.local.get(uuid, "ha_cluster_stack") or self.pool()["ha_cluster_stack"]
            raise internal(f"failed to propose the current master as master: cluster stack script "
                           f"{stack_name}/ha_propose_master on host {uuid} did not print TRUE")

    def _propose(self, host: str) -> bool:
        uuid = self.host_uuid(host)
        stack_name = self.local.get(uuid, "ha_cluster_stack") or self.pool()["ha_cluster_stack"]
        return self.runner.propose_master(stack_name, uuid, self.local.conf_path(uuid))

    def query(self, host: str) -> Any:
        uuid = self.host_uuid(host)
        stack_name = self.local.get(uuid, "ha_cluster_stack") or self.pool()["ha_cluster_stack"]
        return self.runner.query_liveset(stack_name, uuid, self.local.conf_path(uuid))

    # -- disable ---------------------------------------------------------------------------------------

    def disable(self, call: Call) -> None:
        """``pool.disable_ha`` (ha.md 4.4) with bounded retries."""
        op_id = self._begin(call, "ha_disable")
        try:
            with self._op_lock:
                if not self.pool()["ha_enabled"]:
                    raise ApiError("HA_NOT_ENABLED")
                self._internal_disable(rollback=False)
        finally:
            self._end(op_id)

    def _master_has_statefile(self, master: str) -> bool:
        try:
            live = self.query(master)
        except ApiError:
            return False
        me = live.hosts.get(self.host_uuid(master))
        return bool(me and me.statefile_access and not me.statefile_corrupted)

    def _set_enabled(self, value: bool, plan_zero: bool = False) -> None:
        with self.store.transaction() as tx:
            pool = tx.get("pool", self.daemon.pool_ref())
            pool["ha_enabled"] = value
            if plan_zero:
                pool["ha_plan_exists_for"] = 0
            for vdi in pool["ha_statefiles"]:
                if tx.find("VDI", vdi) is not None:
                    tx.update(
                        "VDI",
                        vdi,
                        allowed_operations=[
                            "clone",
                            "copy",
                            "resize",
                            "snapshot",
                            "destroy",
                            "forget",
                            "update",
                        ],
                    )

    def _attempt(self, master: str, hosts: list[str]) -> list[str]:
        """One attempt of the disable procedure; return the uuids of hosts still heartbeating."""
        if self._master_has_statefile(master):
            try:
                self.run(master, "ha_set_pool_state", "invalid")
                self.monitor.stop()
                self._set_enabled(False, plan_zero=True)
                # Every daemon now reads the invalid pool state and exits; xapi waits for that via the
                # statefile on each host.  Stopping each daemon gives the same end state without polling.
                return self._stop_all(hosts)
            except ApiError as e:
                log.warning("disable with statefile failed; trying without", error=str(e))
        for h in hosts:
            self.local.set(self.host_uuid(h), **{"ha.disable_failover_decisions": True})
        self._set_enabled(False)
        self.monitor.stop()
        self.in_parallel(hosts, lambda h: self.try_run(h, "ha_disarm_fencing", ok=(MTC_DAEMON_NOT_PRESENT,)))
        return self._stop_all(hosts)

    def _stop_all(self, hosts: list[str]) -> list[str]:
        """``ha_stop_daemon`` everywhere at once (it succeeds only once the daemon is gone)."""
        failed = []
        for h, error in self.in_parallel(hosts, lambda h: self.run(h, "ha_stop_daemon")):
            if error is not None:
                log.warning("could not stop the heartbeat daemon", host=self.host_uuid(h), error=str(error))
                failed.append(self.host_uuid(h))
        return failed

    def _internal_disable(self, rollback: bool) -> None:
        """The internal disable procedure (ha.md 4.4), also the rollback of a failed enable."""
        master = self.daemon.master_ref()
        hosts = [r for r, _ in self.hosts()]
        retries = max(1, int(self.daemon.config["ha-disable-retries"]))
        left: list[str] = []
        for attempt in range(retries):
            left = self._attempt(master, hosts)
            if not left:
                break
            log.warning(
                "heartbeat daemons still running after disable attempt", attempt=attempt + 1, hosts=left
            )
            time.sleep(self.daemon.config["ha-disable-retry-delay"])
        for h in hosts:
            self.local.set(self.host_uuid(h), **{"ha.armed": False})
        if left and not rollback:
            raise internal(
                f"HA disabled, but the heartbeat daemon could not be stopped on: {', '.join(left)}"
            )

    # -- emergency disable, boot, shutdown -------------------------------------------------------------

    def emergency_disable(self, host: str, soft: bool) -> None:
        """``host.emergency_ha_disable`` (ha.md 4.6): this host only; the pool database is untouched."""
        uuid = self.host_uuid(host)
        if not self.local.get(uuid, "ha.armed", False):
            if soft:
                return
            raise ApiError("HA_NOT_ENABLED")
        self.try_run(host, "ha_disarm_fencing", ok=(MTC_DAEMON_NOT_PRESENT,))
        if host == self.daemon.master_ref():
            self.monitor.stop()
        self.try_run(host, "ha_stop_daemon")
        self.try_run(host, "ha_set_excluded")
        if not soft:
            self.local.set(uuid, **{"ha.armed": False})

    def start(self) -> None:
        """xapi start-up (ha.md 4.8): re-arm armed hosts, reconcile with ``pool.ha_enabled``."""
        pool = self.pool()
        master = self.daemon.master_ref()
        armed = [h for h, rec in self.hosts() if self.local.get(rec["uuid"], "ha.armed", False)]
        if not pool["ha_enabled"]:
            for h in armed:
                self.try_run(h, "ha_stop_daemon")
                self.local.set(self.host_uuid(h), **{"ha.armed": False})
            return
        if master not in armed:
            log.warning("HA enabled but the master is not armed; marking HA disabled")
            self._set_enabled(False)
            return

        def rearm(h: str) -> None:
            try:
                self.run(h, "ha_start_daemon")
            except ScriptError as e:
                if e.exit_code == MTC_DAEMON_PRESENT:
                    return
                if e.exit_code == MTC_INVALID_POOL_STATE:
                    self.local.set(self.host_uuid(h), **{"ha.armed": False})
                    return
                log.error(
                    "HA heartbeat could not start at boot (emergency mode in xapi)",
                    host=self.host_uuid(h),
                    error=str(e),
                )
            except ApiError as e:
                log.error("HA heartbeat could not start at boot", host=self.host_uuid(h), error=str(e))

        self.in_parallel(armed, rearm)
        if not self._propose(master):
            log.warning("the master could not take the HA master lock at boot")
        self.monitor.start()

    def stop(self) -> None:
        """Daemon shutdown: stop the monitor and the heartbeats we started; hosts stay armed."""
        self.monitor.stop()
        if not self.pool()["ha_enabled"]:
            return
        hosts = [h for h, rec in self.hosts() if self.local.get(rec["uuid"], "ha.armed", False)]
        self.in_parallel(hosts, lambda h: self.try_run(h, "ha_stop_daemon"))
