"""The daemon object: loads configuration, schema and store, and owns every service."""

from __future__ import annotations

import gc
import secrets
from pathlib import Path

import structlog

from xapid import features, nbd_exports, operations, statefiles, templates
from xapid import schema as schema_mod
from xapid.api import role as role_api
from xapid.auth import Sessions, Users
from xapid.clusterd import Clusterd
from xapid.collector import Collector
from xapid.config import Config, validate_runtime
from xapid.console.feed import HardwareFeed
from xapid.dispatch import Dispatcher
from xapid.events import Events
from xapid.ha.manager import HaManager
from xapid.handlers import leftovers
from xapid.hw import Hardware
from xapid.hw.faults import FaultService
from xapid.hw.guest import GuestAgents
from xapid.hw.metrics import Metrics
from xapid.liveness import HostLiveness
from xapid.nbd_exports import NbdService
from xapid.record_cache import RecordCache
from xapid.seed import seed
from xapid.statefiles import ensure_private_dir
from xapid.storage import Disks, load_descriptors, reconcile, sync_sm_table
from xapid.store import Store
from xapid.tasks import Tasks
from xapid.wire import Encoder

log = structlog.get_logger("xapid.daemon")


__all__ = ["Daemon", "ensure_private_dir"]

# SQLite opens these by path; in a state dir nobody else can write, checking them first is enough.
STORE_FILES = ("xapid.db", "xapid.db-wal", "xapid.db-shm", "xapid.db-journal", "xapid.db-snapshot",
               "xapid.db-snapshot.tmp")


class Daemon:
    """Everything one running xapid holds; the HTTP server calls into :attr:`dispatcher`."""

    def __init__(self, config: Config, state_dir: Path, hosts: int = 3) -> None:
        # Start-up builds a large, long-lived heap (every stored record): collections while it grows
        # would rescan it again and again, so the cyclic GC waits until it is built.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._build(config, state_dir, hosts)
        finally:
            if was_enabled:
                gc.enable()

    def _build(self, config: Config, state_dir: Path, hosts: int) -> None:
        validate_runtime(config)
        self.config = config
        self.tls_cert: Path | None = None  # the certificate HTTPS is served with (host.get_server_certificate)
        self.tls_key: Path | None = None  # its key (None: in the certificate's file)
        # Refused before anything is written; later, a symbolic link or a foreign file met at start-up
        # is UnsafePath.  Both are ConfigErrors: start-up stops with their message and exit status 2.
        self.state_dir = ensure_private_dir(state_dir)
        for name in STORE_FILES:
            statefiles.check_regular_or_absent(self.state_dir / name)
        self.schema = schema_mod.load()
        self.encoder = Encoder(self.schema)
        self.store = Store(self.schema, self.state_dir / "xapid.db")
        # Where the records came from: "snapshot" after a clean stop, "rows" otherwise (and why).
        log.info("store loaded", source=self.store.loaded_from,
                 objects=sum(self.store.count(name) for name in self.schema.classes),
                 **({"snapshot_unused": self.store.snapshot_note} if self.store.snapshot_note else {}))
        # The loaded records live as long as the daemon (or until replaced, freed by reference count):
        # out of the collector's sight at once, so no later collection walks them.
        gc.freeze()
        self.disks = Disks(self.state_dir)
        sync_sm_table(self.store, load_descriptors(Path(config["sm-dir"])))
        if not self.store.refs("pool"):
            seed(self.store, self.disks, hosts)
            log.info("seeded demo pool", hosts=hosts)
        reconcile(self.store, self.disks)  # before serving: files no record owns (crash leftovers)
        templates.ensure(self.store)
        features.ensure(self.store)
        role_api.ensure(self.store)
        leftovers.discard(self.store, self.disks)  # VMs a killed daemon was importing: before ops are cleared
        nbd_exports.discard_leftovers(self.store, self.state_dir)  # VBDs of a killed daemon's NBD clients
        operations.install(self.store)
        self.users = Users(self.state_dir / "users.json")
        if not self.users.users:
            self._create_root()
        self.sessions = Sessions(self.store, self.users, config["session-idle-timeout"],
                                 config["login-failure-delay"], self.master_ref, limit=config["session-limit"],
                                 tasks_pending=lambda ref: self.tasks.session_busy(ref),
                                 master_address=self.master_address)
        self.events = Events(self.store, self.sessions)
        self.tasks = Tasks(self)
        self.collector = Collector(self)
        self.dispatcher = Dispatcher(self)
        self.records = RecordCache(self.store, self.encoder, int(config["record-cache-size"]) * 1024 * 1024)
        # Where the hosts' own addresses answer (set once listening): redirects name them.
        self.api_scheme = "http"
        self.api_port = 0
        self.hw = Hardware(self.state_dir, float(config["fence-reboot-delay"]))
        self.hw.attach([h["uuid"] for _r, h in self.store.items("host")])
        self.hw.on_power_change(self._on_power_change)
        self.nbd = NbdService(self, int(config["nbd-port"]))
        self.hw.toolstack.on_change(self._on_toolstack)
        self.faults = FaultService(self)
        self.guests = GuestAgents(self)
        self.metrics = Metrics(self, int(config["metrics-seed"]))
        self.liveness = HostLiveness(self)
        self.clusterd = Clusterd(self)
        self.ha = HaManager(self)
        self.console = HardwareFeed(self)
        # Everything loaded so far lives as long as the daemon: keep the cyclic GC from rescanning a
        # large store's records on every full collection (write latency must not grow with size).
        gc.collect()
        gc.freeze()

    def _create_root(self) -> None:
        password = secrets.token_urlsafe(18)
        path = self.state_dir / "root-password"
        # The password file first: a crash before users.json leaves no root without a known password.
        statefiles.write_atomic(path, (password + "\n").encode(), mode=0o600)
        self.users.set_password("root", password, "pool-admin")
        log.info("created user root; its password is in the file named here", path=str(path))

    def pool_ref(self) -> str:
        return self.store.refs("pool")[0]

    def master_ref(self) -> str:
        pool = self.store.get("pool", self.pool_ref())
        assert pool is not None
        return str(pool["master"])

    def master_address(self, host: str | None = None) -> str:
        """The address of the master as ``host`` knows it (its pool.conf: what it names in
        ``HOST_IS_SLAVE``); None, or a host that follows the pool's master: the master's ``host.address``.

        A slave left behind by ``pool.emergency_transition_to_master`` still names the old master
        until ``pool.recover_slaves`` or ``pool.emergency_reset_master`` (``pool_master_address`` in
        its local database).
        """
        master = self.master_ref()
        if host is not None and host != master:
            rec = self.store.get("host", host)
            known = self.ha.local.get(rec["uuid"], "pool_master_address") if rec is not None else None
            if known:
                return str(known)
        return str((self.store.get("host", master) or {}).get("address", ""))

    def _on_power_change(self, host_uuid: str, old: str, new: str) -> None:
        """A host that loses power loses its xapi, and the sessions that xapi held in memory."""
        if new not in ("off", "fenced"):
            return
        ref = self.store.by_uuid("host", host_uuid)
        if ref is None:
            return
        self.sessions.drop_local(ref)
        if ref == self.master_ref():
            self.sessions.drop_all()

    def _on_toolstack(self, host_uuid: str, event: str) -> None:
        """One host's xapi stopped (its sessions and HA monitor end with it) or started again (its
        xapi start-up runs: ``system_boot`` false, as xapi_ha.ml on_server_restart after a restart)."""
        ref = self.store.by_uuid("host", host_uuid)
        if ref is None:
            return
        if event == "down":
            self.sessions.drop_local(ref)
            if ref == self.master_ref():
                self.sessions.drop_all()  # the pool's sessions and tasks live in the master's xapi only
                self.tasks.drop_all("the master's xapi restarted")
            self.ha.monitor.signal_stop(ref)
        elif event == "up" and self.hw.is_running(host_uuid):
            self.ha.spawn_start(ref, system_boot=False)

    def forget_host(self, host_uuid: str) -> None:
        """A host whose records were destroyed: its emulated machine goes too."""
        self.hw.detach(host_uuid)

    def start(self) -> None:
        """Services that run in the background (watchdogs, the HA re-arm and monitors, garbage collection)."""
        self.hw.start()
        self.clusterd.start_watcher()
        self.ha.start()
        self.collector.start()

    def stop(self) -> None:
        self.nbd.stop()
        self.guests.stop()
        self.collector.stop()
        self.console.stop()
        self.hw.prepare_stop()
        self.ha.stop()
        self.clusterd.stop_all()
        self.liveness.stop()
        self.hw.stop()
        self.tasks.wait_all(10.0)
        self.store.close()
        # How well commits shared their disk writes (group commit), for whoever tunes a deployment.
        log.info("store closed", disk_writes=self.store.flushes, rows_written=self.store.flushed_rows)
