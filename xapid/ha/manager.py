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
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

import structlog

from xapid.api.host import update_allowed_operations
from xapid.api.message import create_message
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
# Seconds a slave's liveset may take to show the master live after the master joined (see _join).
MASTER_SETTLE = 3.0


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
            hardware=self._hardware,
        )
        self.local = LocalDb(daemon.state_dir)
        self._op_lock = threading.Lock()
        self._port_lock = threading.Lock()
        self._join_aborted = threading.Event()
        self._port_for: tuple[str, int] = ("", 0)
        self.monitor = Monitor(self)
        self.failover = Failover(self)
        self.planning = Planning(daemon)
        daemon.hw.on_power_change(self._on_power_change)
        # Hosts going down cleanly: the master counts them dead until their xapi starts again.
        self.shutting_down: set[str] = set()
        # Hosts their user disabled since their xapi started (xapi_host_helpers user_requested_host_disable).
        self.user_disabled: set[str] = set()
        self._lifecycle_lock = threading.Lock()
        self._starting: set[str] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        daemon.hw.on_boot(self._on_boot)

    def _on_boot(self, host_uuid: str) -> None:
        """The emulated hardware booted a host (in a thread of its own): xapi starts on it."""
        ref = self.store.by_uuid("host", host_uuid)
        if ref is None:
            return
        try:
            self.host_started(ref, system_boot=True)
        except ApiError as e:
            log.error("xapi start-up failed", host=host_uuid, error=str(e))

    def _on_power_change(self, host_uuid: str, old: str, new: str) -> None:
        """A host without power, or frozen, runs no monitor (its xapi is gone)."""
        if new in ("off", "fenced"):
            ref = self.store.by_uuid("host", host_uuid)
            if ref is not None:
                self.monitor.signal_stop(ref)

    def _hardware(self, need: str, host_uuid: str, create: bool) -> dict[str, str]:
        """The adapter's hook for stacks that need emulated hardware (``xapid-hardware``)."""
        if need == "netns":
            return self.daemon.hw.cluster_network(host_uuid, create)
        return {}

    def release_hardware(self) -> None:
        """HA is off: the cluster network goes unless a clustered pool (``Cluster``) still uses it."""
        if not self.store.refs("Cluster"):
            self.daemon.hw.release_cluster_network()

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

    def _set_local_all(self, hosts: list[str], **values: Any) -> None:
        """``local.set`` on every host at once (their fsyncs overlap); raises the first failure."""
        for _h, error in self.in_parallel(hosts, lambda h: self.local.set(self.host_uuid(h), **values)):
            if error is not None:
                raise error

    def _join_all(self, hosts: list[str], master: str, master_done: threading.Event,
                  master_ok: threading.Event) -> BaseException | None:
        """Join every host at once; on the first failure the other joins are cut short; that failure.

        With real xhad the other hosts would wait out EnableJoinTimeout for the missing one and fail
        too; the enable fails either way, with the first host's error, so xapid does not wait.
        """
        first: BaseException | None = None
        self._join_aborted.clear()
        with ThreadPoolExecutor(max_workers=len(hosts), thread_name_prefix="ha-join") as pool:
            futures = {pool.submit(self._join, h, master, master_done, master_ok): h for h in hosts}
            for future in as_completed(futures):
                error = future.exception()
                if error is not None and first is None:
                    first = error
                    log.warning("a host failed to join; cutting the other joins short",
                                host=self.host_uuid(futures[future]), error=str(error))
                    self._join_aborted.set()
                    master_done.set()
                    for h in hosts:
                        self.runner.cancel(self.host_uuid(h))
        return first

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
        pool_hosts = self.hosts()
        members = [(h["uuid"], h["address"]) for _r, h in pool_hosts]
        self._write_conf(master, generation, base_t, statefile_path, members)
        self.run(master, "ha_set_pool_state", "init")
        hosts = [r for r, _ in pool_hosts]
        tasks = self.daemon.tasks
        steps = 3 * len(hosts)  # as xapi: preconfigure, join and finish count one step per host
        try:
            # xapi preconfigures host after host; nothing a client sees depends on that order, and
            # doing the hosts at once keeps a 64-host enable from queueing hundreds of fsyncs.
            tasks.check_cancelled(task)
            # Each host's Host.preconfigure_ha sets its own ha_statefiles in xapi: one transaction
            # here, so that 64 hosts do not queue 64 commits before their files are written.
            with self.store.transaction() as tx:
                for h in hosts:
                    tx.update("host", h, ha_statefiles=[statefile])
            results = self.in_parallel(hosts, lambda h: self._preconfigure(
                h, chosen, generation, base_t, statefile_path, members, is_master=h == master))
            failures = [e for _h, e in results if e is not None]
            if failures:
                raise failures[0]
            tasks.progress(task, len(hosts) / steps)
            tasks.check_cancelled(task)
            master_done, master_ok = threading.Event(), threading.Event()
            first = self._join_all(hosts, master, master_done, master_ok)
            if first is not None:
                raise first
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
        for h in hosts:
            self._monitor_start(h)
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

    def _write_conf(self, host: str, generation: str, base_t: object, statefile_path: str,
                    members: list[tuple[str, str]]) -> None:
        """Write ``host``'s xhad.conf for the pool ``members`` (UUID and address of each host)."""
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
            members,
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
        generation: str,
        base_t: object,
        statefile_path: str,
        members: list[tuple[str, str]],
        is_master: bool,
    ) -> None:
        """The files of ``Host.preconfigure_ha`` (ha.md 4.2): xhad.conf and the local database;
        the caller has set the host's ``ha_statefiles``."""
        self.runner.stack_dir(chosen)
        uuid = self.host_uuid(host)
        if not is_master:
            self._write_conf(host, generation, base_t, statefile_path, members)
        peers = dict(members)
        # One durable write per host: until it lands, run() falls back on the pool's stack.
        self.local.set(uuid, ha_cluster_stack=chosen, ha_peers=peers, ha_base_t=int(str(base_t)))

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
        # A host that went Online before the master joined counts the master live only once its
        # daemon has heard of that join (a datagram and an evaluation later); xhad's livesets agree
        # by then, the emulated daemons' views may not yet.  Not live within this window means "look
        # again", after it "failed", as in xapi_ha.ml join_liveset.
        settle_until = time.monotonic() + MASTER_SETTLE
        while True:
            if self._join_aborted.is_set():
                raise internal("HA enable aborted: another host failed to join")
            live = self.query(host)
            # xapi_ha.ml join_liveset looks at the master's entry only once the liveset is Online;
            # a Starting liveset (which may not list the master yet) means "look again".
            if live.status == "Online":
                entry = live.hosts.get(master_uuid)
                if entry is None:
                    raise internal("the master is missing from the liveset during HA enable")
                if entry.master and entry.liveness:
                    return
                settling = not entry.liveness and time.monotonic() < settle_until
                if not settling and (not entry.liveness or entry.statefile_corrupted or not entry.statefile_access
                                     or entry.excluded):
                    raise internal("existing master failed during HA enable")
            if time.monotonic() > deadline:
                raise internal("timed out waiting for the master to appear in the liveset")
            # xapi polls every 5 s; the liveset is a local read here, so look again soon.
            time.sleep(0.2)

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
        self._leave_emergency(host)

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
            self._allowed(pool)
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
                self._monitor_stop()
                self._set_enabled(False, plan_zero=True)
                # Every daemon now reads the invalid pool state and exits; xapi waits for that via the
                # statefile on each host.  Stopping each daemon gives the same end state without polling.
                return self._stop_all(hosts)
            except ApiError as e:
                log.warning("disable with statefile failed; trying without", error=str(e))
        self._set_local_all(hosts, **{"ha.disable_failover_decisions": True})
        self._set_enabled(False)
        self._monitor_stop()
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
        self._set_local_all(hosts, **{"ha.armed": False})
        if not left:
            self.release_hardware()
        if left and not rollback:
            raise internal(
                f"HA disabled, but the heartbeat daemon could not be stopped on: {', '.join(left)}"
            )

    # -- per-host state, emulated hardware ---------------------------------------------------------------

    def power(self, host: str) -> str:
        """The host's power state: on, off, fenced or hung (hw-contract.md)."""
        return str(self.daemon.hw.power(self.host_uuid(host)))

    def is_running(self, host: str) -> bool:
        """True iff the host is powered on and not hung: its xapi would answer."""
        return bool(self.daemon.hw.is_running(self.host_uuid(host)))

    def armed(self, host: str) -> bool:
        return bool(self.local.get(self.host_uuid(host), "ha.armed", False))

    def emergency_error(self, host: str) -> ApiError | None:
        """The error this host's API answers with while it is in emergency mode (ha.md 4.8), else None."""
        error = self.local.get(self.host_uuid(host), "ha.emergency_error")
        return ApiError(*error) if error else None

    def starting(self, host: str) -> bool:
        """True while the host's xapi start-up (:meth:`host_started`) runs."""
        with self._lifecycle_lock:
            return host in self._starting

    def _enter_emergency(self, host: str, code: str, cause: BaseException) -> None:
        uuid = self.host_uuid(host)
        if self.local.get(uuid, "ha.emergency_error") != [code]:
            log.error("host enters emergency mode", host=uuid, error=code, cause=str(cause))
            self.local.set(uuid, **{"ha.emergency_error": [code]})

    def _leave_emergency(self, host: str) -> None:
        uuid = self.host_uuid(host)
        if self.local.get(uuid, "ha.emergency_error"):
            log.info("host leaves emergency mode", host=uuid)
            self.local.set(uuid, **{"ha.emergency_error": None})

    def _monitor_start(self, host: str) -> None:
        self.monitor.start(host)

    def _monitor_stop(self, host: str | None = None) -> None:
        self.monitor.stop(host)

    def _master_failure(self, host: str) -> None:
        """The master-failure procedure of ha.md 4.9 for ``host`` (xapi_ha.ml on_master_failure)."""
        failover = getattr(self, "failover", None)
        procedure = getattr(failover, "master_failure", None)
        if procedure is None:
            log.warning("no master-failure procedure available; the host stays as it is", host=self.host_uuid(host))
            return
        procedure(host)

    def _failover_decisions_ok(self, host: str) -> bool:
        return not self.local.get(self.host_uuid(host), "ha.disable_failover_decisions", False)

    def mark_dead(self, tx: Transaction, host: str) -> None:
        """``host_metrics.live := false`` inside ``tx`` (no message: the host is known to go down)."""
        metrics = tx.read("host_metrics", tx.get("host", host)["metrics"])
        if metrics is not None and metrics["live"]:
            tx.update("host_metrics", tx.get("host", host)["metrics"], live=False)

    # -- xapi start-up of one host (ha.md 4.8) -------------------------------------------------------------

    def host_started(self, host: str, system_boot: bool = True) -> None:
        """The xapi start-up of ``host``; returns once it is done or given up.

        Called for every powered-on host at daemon start (``system_boot`` false: only xapi restarted)
        and by the emulated hardware after a boot (``system_boot`` true).  An armed host starts its
        heartbeat daemon, retrying every ``ha-boot-retry-delay`` seconds in emergency mode
        (xapi_ha.ml on_server_restart); its ``ha.armed`` is then reconciled with ``pool.ha_enabled``
        (xapi.ml resynchronise_ha_state); ``HA_HOST_WAS_FENCED`` is raised after a boot that no clean
        shutdown preceded (xapi_host_crashdump.ml); last the host enables itself unless something
        keeps it disabled (xapi_host_helpers.ml consider_enabling_host).
        """
        uuid = self.host_uuid(host)
        with self._lifecycle_lock:
            if host in self._starting:
                log.info("xapi start-up already running on this host", host=uuid)
                return
            self._starting.add(host)
            # Pool.hello from the restarted host: the master may count it live again.
            self.shutting_down.discard(host)
            self.user_disabled.discard(host)
        try:
            log.info("xapi start-up", host=uuid, system_boot=system_boot)
            self._leave_emergency(host)  # a new xapi process: emergency mode is found again, or not
            clean = bool(self.local.get(uuid, "host_restarted_cleanly", False))
            if system_boot:
                self.local.set(uuid, host_restarted_cleanly=False)
            self._hello(host)
            if system_boot and self.pool()["ha_enabled"] and not clean:
                create_message(self.store, "HA_HOST_WAS_FENCED", 4, "Host", uuid, "")
            # xapi_cluster_host.ml resync_host: a clustered host's corosync comes back before HA does.
            self.daemon.clusterd.resync_host(host)
            if self.armed(host) and not self._start_ha(host):
                if self._stopping.is_set():
                    return
            self._resynchronise(host)
            if self.emergency_error(host) is None:
                self.consider_enabling_host(host, system_boot)
        finally:
            with self._lifecycle_lock:
                self._starting.discard(host)

    def _hello(self, host: str) -> None:
        """What ``Pool.hello`` and the start-up do to the pool database for a host that came up."""
        with self.store.transaction() as tx:
            h = tx.get("host", host)
            dom0 = tx.read("VM", h["control_domain"])
            if dom0 is not None and dom0["power_state"] != "Running":
                tx.update("VM", h["control_domain"], power_state="Running", resident_on=host)
            if not tx.get("pool", self.daemon.pool_ref())["ha_enabled"]:
                # Without HA, XenAPI heartbeats drive liveness: a host that says hello is live.
                metrics = tx.read("host_metrics", h["metrics"])
                if metrics is not None and not metrics["live"]:
                    tx.update("host_metrics", h["metrics"], live=True)

    def _start_ha(self, host: str) -> bool:
        """The armed branch of the start-up; True once the heartbeat runs and the monitor started."""
        uuid = self.host_uuid(host)
        delay = float(self.daemon.config["ha-boot-retry-delay"])
        vanished = 0
        while True:
            if self._stopping.is_set():
                return False
            if not self.armed(host):
                log.warning("HA start-up aborted: the host was disarmed (emergency_ha_disable)", host=uuid)
                return False
            if not self.is_running(host):
                log.warning("HA start-up aborted: the host is not running", host=uuid)
                return False
            try:
                try:
                    self.run(host, "ha_start_daemon")
                except ScriptError as e:
                    if e.exit_code != MTC_DAEMON_PRESENT:
                        raise
                    # An adopted daemon may have seen an invalid pool state and be on its way out.
                    self.query(host)
                    log.info("heartbeat daemon already running; adopted", host=uuid)
                break
            except ScriptError as e:
                if e.exit_code == MTC_DAEMON_NOT_PRESENT and vanished < 3:
                    vanished += 1
                    log.info("heartbeat daemon went away right after its start; starting it again", host=uuid)
                    continue
                if e.exit_code == MTC_INVALID_POOL_STATE:
                    log.warning("ha_start_daemon: invalid pool state; disarming this host", host=uuid)
                    self.local.set(uuid, **{"ha.armed": False})
                    self._leave_emergency(host)
                    return False
                if e.exit_code == MTC_CAN_NOT_ACCESS_STATEFILE:
                    if not self.pool()["ha_enabled"]:
                        log.info("statefile unreachable and HA is off pool-wide; disarming", host=uuid)
                        self.local.set(uuid, **{"ha.armed": False})
                        self._leave_emergency(host)
                        return False
                    self._enter_emergency(host, "HA_HOST_CANNOT_ACCESS_STATEFILE", e)
                else:
                    self._enter_emergency(host, "HA_HEARTBEAT_DAEMON_STARTUP_FAILED", e)
            except ApiError as e:
                self._enter_emergency(host, "HA_HEARTBEAT_DAEMON_STARTUP_FAILED", e)
            if self._stopping.wait(delay):
                return False
        self._leave_emergency(host)
        if host == self.daemon.master_ref():
            if self._failover_decisions_ok(host) and self._propose(host):
                log.info("ha_propose_master succeeded; continuing as master", host=uuid)
            else:
                log.warning("the master could not take the HA master lock at start-up", host=uuid)
                self._master_failure(host)
        self._monitor_start(host)
        return True

    def _resynchronise(self, host: str) -> None:
        """``ha.armed`` against ``pool.ha_enabled`` (xapi.ml resynchronise_ha_state)."""
        uuid = self.host_uuid(host)
        master = self.daemon.master_ref()
        if host != master and not self.armed(host) and self.pool()["ha_enabled"]:
            # The master's own start-up may be about to switch HA off (a master found disarmed): a slave
            # decides after it, as a real slave only reaches this point once it can talk to its master.
            deadline = time.monotonic() + float(self.daemon.config["ha-start-daemon-timeout"])
            while self.starting(master) and time.monotonic() < deadline and not self._stopping.is_set():
                time.sleep(0.05)
        armed = self.armed(host)
        enabled = bool(self.pool()["ha_enabled"])
        if armed and not enabled:
            log.info("HA was disabled on the pool while this host was away; disarming it", host=uuid)
            self._monitor_stop(host)
            self.try_run(host, "ha_stop_daemon")
            self.local.set(uuid, **{"ha.armed": False})
        elif enabled and not armed:
            if host == self.daemon.master_ref():
                log.warning("HA is enabled but the master is disarmed; disabling HA on the pool", host=uuid)
                self._set_enabled(False)
                self._ensure_fully_off()
            else:
                log.warning("HA is enabled but this slave is disarmed: emergency mode", host=uuid)
                self._enter_emergency(host, "HA_POOL_IS_ENABLED_BUT_HOST_IS_DISABLED",
                                      internal("host disarmed while pool HA is on"))

    def consider_enabling_host(self, host: str, system_boot: bool) -> None:
        """Set ``host.enabled`` unless something keeps the host disabled (xapi_host_helpers.ml).

        A host stays disabled if its user disabled it since its xapi started, if it is armed and a PBD
        is unplugged, if ``host_auto_enable`` is false in its local db, or (outside a boot) if a clean
        shutdown was under way (``host_disabled_until_reboot``).  A boot clears that flag.
        """
        uuid = self.host_uuid(host)
        if host in self.user_disabled:
            return
        if self.armed(host) and not all(
            (p := self.store.get("PBD", pbd)) is not None and p["currently_attached"]
            for pbd in self.store.referrers("PBD", "host", host)
        ):
            log.info("a PBD is unplugged and HA is armed: the host stays disabled", host=uuid)
            return
        local = self.local.read(uuid)
        if system_boot:
            if local.get("host_disabled_until_reboot"):
                self.local.set(uuid, host_disabled_until_reboot=False)
        elif local.get("host_disabled_until_reboot"):
            log.info("a clean shutdown was under way: the host stays disabled until it reboots", host=uuid)
            return
        if not local.get("host_auto_enable", True):
            log.info("host_auto_enable is false: the host stays disabled until host.enable", host=uuid)
            return
        with self.store.transaction() as tx:
            if not tx.get("host", host)["enabled"]:
                log.info("host enabled", host=uuid)
                tx.update("host", host, enabled=True)
                update_allowed_operations(tx, host)
        if self.pool()["ha_enabled"]:
            self.planning.update_pool_status()

    # -- daemon start and stop -----------------------------------------------------------------------------

    def start(self) -> None:
        """Daemon start-up: reconcile what a crash left, then start every powered-on host's xapi.

        Operations of calls that no longer run are dropped (xapi cancels every task at start); every
        host is disabled until its start-up enables it (ha.md 4.8).  With HA off, every heartbeat
        daemon of every host is stopped and every host disarmed; with HA on, each armed host adopts
        or restarts its heartbeat (:meth:`host_started`, on a thread per host, so that a host stuck
        in emergency mode never holds the daemon back).
        """
        self._stopping.clear()
        self.runner.reap_orphans()
        self._reconcile_operations()
        with self.store.transaction() as tx:
            for href, h in tx.items("host"):
                if h["enabled"]:
                    tx.update("host", href, enabled=False)
                update_allowed_operations(tx, href)
        if not self.pool()["ha_enabled"]:
            self._ensure_fully_off()
        for host, _rec in self.hosts():
            if self.power(host) != "on":
                continue
            if self.armed(host):
                self.spawn_start(host, system_boot=False)
            else:
                self.host_started(host, system_boot=False)

    def spawn_start(self, host: str, system_boot: bool) -> threading.Thread:
        """Run :meth:`host_started` on a thread of its own (joined by :meth:`stop`)."""
        thread = threading.Thread(target=self._start_thread, args=(host, system_boot),
                                  name=f"ha-start-{self.host_uuid(host)[:8]}", daemon=True)
        with self._lifecycle_lock:
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(thread)
        thread.start()
        return thread

    def _start_thread(self, host: str, system_boot: bool) -> None:
        try:
            self.host_started(host, system_boot)
        except ApiError as e:
            log.error("xapi start-up failed", host=self.host_uuid(host), error=str(e))

    def _reconcile_operations(self) -> None:
        """Drop ``current_operations`` of the pool and hosts: no call of a previous run still runs."""
        with self.store.transaction() as tx:
            pool = tx.get("pool", self.daemon.pool_ref())
            if pool["current_operations"]:
                log.warning("dropping operations of calls that ended with the previous run",
                            operations=sorted(pool["current_operations"].values()))
                pool["current_operations"] = {}
            self._allowed(pool)
            for href, h in tx.items("host"):
                if h["current_operations"]:
                    tx.update("host", href, current_operations={})

    def _configured(self, host: str) -> bool:
        """True iff the host was ever given a cluster stack (only then can a heartbeat run for it)."""
        uuid = self.host_uuid(host)
        return bool(self.local.get(uuid, "ha_cluster_stack")) and self.local.conf_path(uuid).exists()

    def _ensure_fully_off(self) -> None:
        """HA off everywhere: every monitor stopped, every heartbeat daemon stopped, every host disarmed."""
        self._monitor_stop()
        hosts = [h for h, _rec in self.hosts() if self._configured(h)]

        def off(h: str) -> None:
            self.try_run(h, "ha_disarm_fencing", ok=(MTC_DAEMON_NOT_PRESENT,))
            self.try_run(h, "ha_stop_daemon")
            self.local.set(self.host_uuid(h), **{"ha.armed": False})
            self._leave_emergency(h)

        self.in_parallel(hosts, off)
        for h in hosts:
            # A script of a killed daemon may still be running and start a heartbeat later: with HA off
            # nothing may run for a host (hw-contract.md: its processes carry XAPID_HOST_DIR).
            left = self.daemon.hw.end_processes(self.host_uuid(h))
            if left:
                log.warning("killed processes left behind for a host while HA is off", host=self.host_uuid(h),
                            processes=left)
        self.release_hardware()

    def stop(self) -> None:
        """Daemon shutdown: end the start-up threads, the monitor and the heartbeats; hosts stay armed."""
        self._stopping.set()
        with self._lifecycle_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=self.daemon.config["ha-start-daemon-timeout"] + 5)
        self._monitor_stop()
        hosts = [h for h, rec in self.hosts() if self.local.get(rec["uuid"], "ha.armed", False)]
        try:
            if self.pool()["ha_enabled"]:
                self.in_parallel(hosts, lambda h: self.try_run(h, "ha_stop_daemon"))
        finally:
            self.runner.close()

    # -- emergency disable, clean shutdown (ha.md 4.6, 4.7) --------------------------------------------------

    def emergency_disable(self, host: str, soft: bool) -> None:
        """``host.emergency_ha_disable`` (ha.md 4.6): this host only; the pool database is untouched."""
        uuid = self.host_uuid(host)
        if not self.armed(host):
            if soft:
                return
            raise ApiError("HA_NOT_ENABLED")
        log.warning("emergency_ha_disable: HA is switched off on this host only", host=uuid, soft=soft)
        self.try_run(host, "ha_disarm_fencing", ok=(MTC_DAEMON_NOT_PRESENT,))
        self._monitor_stop(host)
        self.try_run(host, "ha_stop_daemon")
        self.try_run(host, "ha_set_excluded")
        if not soft:
            self.local.set(uuid, **{"ha.armed": False})

    def assert_have_statefile_access(self, host: str) -> None:
        """With HA on, the host's own liveset must show statefile access, else ``HA_LOST_STATEFILE``."""
        if not self.pool()["ha_enabled"]:
            return
        uuid = self.host_uuid(host)
        try:
            me = self.query(host).hosts.get(uuid)
        except ApiError as e:
            log.warning("liveset query failed; assuming no statefile access", host=uuid, error=str(e))
            me = None
        if me is None or not me.statefile_access or me.statefile_corrupted:
            raise ApiError("HA_LOST_STATEFILE")

    def begin_shutdown(self, host: str) -> None:
        """The master counts ``host`` dead from now on, and never live again until it starts up."""
        with self._lifecycle_lock:
            self.shutting_down.add(host)
        with self.store.transaction() as tx:
            self.mark_dead(tx, host)
            update_allowed_operations(tx, host)

    def before_clean_shutdown(self, host: str) -> None:
        """The HA steps of a clean shutdown or reboot (xapi_ha.ml before_clean_shutdown_or_reboot).

        Checks statefile access (``HA_LOST_STATEFILE``, nothing done), then disarms fencing, stops the
        host's monitor and heartbeat and sets it excluded.  A failure after the check fences the host
        through its watchdog (xapi runs ``fence yesreally``) and raises INTERNAL_ERROR.  The host stays
        armed, so it rejoins when it boots.
        """
        if not self.pool()["ha_enabled"]:
            return
        self.assert_have_statefile_access(host)
        uuid = self.host_uuid(host)
        try:
            self.run_ok(host, "ha_disarm_fencing", MTC_DAEMON_NOT_PRESENT)
            self._monitor_stop(host)
            self.run_ok(host, "ha_stop_daemon", MTC_DAEMON_NOT_PRESENT)
            self.run(host, "ha_set_excluded")
        except ApiError as e:
            log.critical("error past the commit point of a clean shutdown; the host fences itself",
                         host=uuid, error=str(e))
            self.fence(host, f"clean shutdown failed after fencing was disarmed: {e}")
            raise internal(f"host {uuid} failed to leave HA cleanly and was fenced: {e}") from e
        log.info("host excluded from HA; proceeding to power off", host=uuid)

    def run_ok(self, host: str, script: str, *ok: int) -> None:
        """Run ``script``; the exit codes in ``ok`` count as success."""
        try:
            self.run(host, script)
        except ScriptError as e:
            if e.exit_code not in ok:
                raise

    def fence(self, host: str, reason: str) -> None:
        """Reset ``host`` now, as its watchdog would (xapi runs ``fence yesreally``)."""
        self.daemon.hw.fence(self.host_uuid(host), reason)

    def prepare_for_poweroff(self, host: str) -> None:
        """The local-db flags of a clean power-off: no re-enable before the boot; no fence message after it."""
        self.local.set(self.host_uuid(host), host_disabled_until_reboot=True, host_restarted_cleanly=True)
