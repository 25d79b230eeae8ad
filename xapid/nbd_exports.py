"""Every emulated host's ``xapi-nbd``: VDIs served read-only over NBD (protocol: :mod:`xapid.nbd`).

As xapi-nbd does (``src/main.ml``), a connection is served only if a network of the pool has the
purpose ``nbd`` (TLS required, with the host's server certificate) or ``insecure_nbd``
(cleartext), never both.  The export name is what ``VDI.get_nbd_info`` hands out,
``/<vdi-uuid>?session_id=<ref>``: the session must be valid, and its user must be allowed to
create and plug a VBD, because for as long as the client is connected the VDI is attached
read-only to the host's control domain through a VBD made with that session (xapi-nbd's
``Cleanup.VBD.with_vbd``), which the disconnection unplugs and destroys.  The VDI's SR must be
attached on the host.  Each host listens on its own address at ``nbd-port`` (10809, as xapi-nbd;
0 picks a free port, the same for every host), and only while the machine has power.

The VBDs in use are listed in ``<state-dir>/nbd-vbds.json`` before they are made; a start after
a crash destroys those still there (xapi-nbd's persistent ``Vbd_store`` cleanup).
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from xapid import generic, statefiles
from xapid.api import Call
from xapid.api import vdi as vdi_api
from xapid.api.host import get_server_certificate
from xapid.api.vbd import create_vbd, plug_vbd
from xapid.certificates import server_key_pair
from xapid.errors import ApiError
from xapid.nbd import NbdServer, Refused, bind
from xapid.store import Store, new_uuid

if TYPE_CHECKING:
    from xapid.daemon import Daemon

log = structlog.get_logger("xapid.nbd")

TRACKING_FILE = "nbd-vbds.json"
NBD_PURPOSES = ("nbd", "insecure_nbd")


def purposes(store: Store) -> set[str]:
    """The NBD purposes any network of the pool has."""
    return {p for _ref, rec in store.items("network") for p in rec["purpose"] if p in NBD_PURPOSES}


def discard_leftovers(store: Store, state_dir: Path) -> int:
    """Destroy the VBDs a killed daemon's NBD connections left (listed in the tracking file); how many."""
    path = state_dir / TRACKING_FILE
    data = statefiles.read_bytes(path)
    if data is None:
        return 0
    try:
        uuids = [u for u in json.loads(data) if isinstance(u, str)]
    except (ValueError, TypeError):
        uuids = []
    gone = 0
    with store.transaction() as tx:
        for uuid in uuids:
            ref = tx.by_uuid("VBD", uuid)
            if ref is not None:
                tx.delete("VBD", ref)
                gone += 1
    statefiles.remove(path)
    if gone:
        log.info("destroyed the VBDs of NBD connections a crash left", vbds=gone)
    return gone


class _Tracking:
    """The tracking file: the uuids of the VBDs NBD connections hold, written before each exists."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.uuids: set[str] = set()
        self.lock = threading.Lock()

    def _write(self) -> None:
        if self.uuids:
            statefiles.write_atomic(self.path, json.dumps(sorted(self.uuids)).encode())
        else:
            statefiles.remove(self.path)

    def add(self, uuid: str) -> None:
        with self.lock:
            self.uuids.add(uuid)
            self._write()

    def discard(self, uuid: str) -> None:
        with self.lock:
            self.uuids.discard(uuid)
            self._write()


class VdiExport:
    """One connection's VDI: a read-only descriptor on its file and the control domain's VBD."""

    def __init__(self, service: NbdService, vbd: str, vbd_uuid: str, path: Path, size: int) -> None:
        self.service = service
        self.vbd = vbd
        self.vbd_uuid = vbd_uuid
        self.size = size
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))  # a file shorter than the disk reads as zeroes

    def close(self) -> None:
        os.close(self.fd)
        self.service.release(self.vbd, self.vbd_uuid)


class HostExports:
    """What one host's NBD listener serves (see the module docstring)."""

    def __init__(self, service: NbdService, host_uuid: str) -> None:
        self.service = service
        self.host_uuid = host_uuid

    def tls(self) -> ssl.SSLContext | None:
        found = purposes(self.service.daemon.store)
        if found == {"nbd", "insecure_nbd"}:
            raise Refused("contradictory configuration: networks with purposes nbd and insecure_nbd")
        if not found:
            raise Refused("no network has the purpose nbd or insecure_nbd")
        return self.service.tls_context(self.host_uuid) if "nbd" in found else None

    def open(self, name: str) -> VdiExport:
        daemon = self.service.daemon
        parsed = urllib.parse.urlsplit(name)
        session = (urllib.parse.parse_qs(parsed.query).get("session_id") or [""])[0]
        if not session:
            raise Refused("no session_id parameter provided")
        try:
            daemon.sessions.check(session)
        except ApiError as e:
            raise Refused(f"{e.code}: {session}") from None
        store = daemon.store
        vdi = store.by_uuid("VDI", parsed.path[1:] if parsed.path.startswith("/") else parsed.path)
        host = store.by_uuid("host", self.host_uuid)
        rec = store.get("VDI", vdi) if vdi is not None else None
        host_rec = store.get("host", host) if host is not None else None
        if vdi is None or rec is None or host is None or host_rec is None:
            raise Refused(f"no VDI {parsed.path!r} on this host")
        sr = store.get("SR", rec["SR"]) or {}
        attached = any((p := store.get("PBD", ref)) is not None and p["host"] == host and p["currently_attached"]
                       for ref in store.referrers("PBD", "SR", rec["SR"]))
        if not attached:
            raise Refused(f"the SR of VDI {rec['uuid']} is not attached on this host")
        vbd_uuid = new_uuid()
        self.service.tracking.add(vbd_uuid)
        try:
            vbd = self.service.attach(session, host_rec["control_domain"], vdi, vbd_uuid)
        except BaseException:
            self.service.tracking.discard(vbd_uuid)
            raise
        try:
            path = daemon.disks.vdi_path(str(sr.get("uuid", "")), vdi_api.file_of(rec))
            return VdiExport(self.service, vbd, vbd_uuid, path, int(rec["virtual_size"]))
        except OSError as e:
            self.service.release(vbd, vbd_uuid)
            raise Refused(f"cannot open the disk of VDI {rec['uuid']}: {e}") from None


class NbdService:
    """The hosts' NBD listeners, opened and closed as the hosts' power comes and goes."""

    def __init__(self, daemon: Daemon, port: int) -> None:
        self.daemon = daemon
        self.port = port
        self.tracking = _Tracking(daemon.state_dir / TRACKING_FILE)
        self.servers: dict[str, NbdServer] = {}  # host uuid -> its listener while it has power
        self._addresses: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stopping = False
        daemon.hw.on_power_change(self._on_power_change)

    def start(self, addresses: list[str]) -> None:
        """Listen on every host whose address is in ``addresses`` (those the daemon serves)."""
        by_address = {str(rec["address"]): str(rec["uuid"]) for _ref, rec in self.daemon.store.items("host")}
        for address in addresses:
            if address in by_address:
                self._addresses[by_address[address]] = address
        for uuid in list(self._addresses):
            if self.daemon.hw.is_running(uuid):
                self._open(uuid)

    def port_of(self, host_uuid: str) -> int | None:
        """The port the host's NBD service listens on, None while it does not."""
        with self._lock:
            server = self.servers.get(host_uuid)
        return server.port if server is not None else None

    def _open(self, uuid: str) -> None:
        address = self._addresses[uuid]
        port = self.port
        if port == 0:  # one free port for every host, found on the first one opened
            port = next((s.port for s in self.servers.values()), 0)
        try:
            sock = bind(address, port)
        except OSError as e:
            log.warning("no NBD on this host: cannot listen", host=uuid, address=f"{address}:{port}",
                        error=e.strerror or str(e))
            return
        with self._lock:
            if self._stopping or uuid in self.servers:
                sock.close()
                return
            self.servers[uuid] = NbdServer(sock, HostExports(self, uuid), address)
            if self.port == 0:
                self.port = self.servers[uuid].port

    def _on_power_change(self, uuid: str, old: str, new: str) -> None:
        if new in ("off", "fenced"):
            with self._lock:
                server = self.servers.pop(uuid, None)
            if server is not None:
                server.stop()
        elif new == "on" and uuid in self._addresses and not self._stopping:
            self._open(uuid)

    def stop(self) -> None:
        """Close every listener and connection (their VBDs are destroyed on the way)."""
        with self._lock:
            self._stopping = True
            servers = list(self.servers.values())
            self.servers.clear()
        for server in servers:
            server.stop()

    # -- the control domain's VBD -----------------------------------------------------------------

    def attach(self, session: str, dom0: str, vdi: str, vbd_uuid: str) -> str:
        """``VBD.create`` and ``VBD.plug`` on the control domain, allowed to the client's session as
        for xapi-nbd, in one transaction that gives the VBD the uuid already tracked (a crash leaves
        no VBD the next start cannot find); :class:`Refused` with the XenAPI error otherwise."""
        daemon = self.daemon
        table = daemon.dispatcher.table
        args: dict[str, Any] = {
            "VM": dom0, "VDI": vdi, "userdevice": "autodetect", "bootable": False, "mode": "RO", "type": "Disk",
            "unpluggable": True, "empty": False, "other_config": {}, "qos_algorithm_type": "",
            "qos_algorithm_params": {}, "device": "", "currently_attached": False,
        }
        try:
            daemon.sessions.authorise(session, table["VBD.create"])
            daemon.sessions.authorise(session, table["VBD.plug"])
            values = generic.create_values(Call(daemon, "VBD.create", session=session), daemon.schema.classes["VBD"],
                                           args, daemon.dispatcher.coerce)
            with daemon.store.transaction() as tx:
                vbd = create_vbd(tx, values)
                tx.update("VBD", vbd, uuid=vbd_uuid)
                plug_vbd(tx, vbd)
        except ApiError as e:
            raise Refused(" ".join(e.description)) from None
        return vbd

    def release(self, vbd: str, vbd_uuid: str) -> None:
        """Unplug and destroy a connection's VBD (as root: the client's session may be gone)."""
        try:
            with self.daemon.store.transaction() as tx:
                if tx.find("VBD", vbd) is not None:
                    tx.update("VBD", vbd, currently_attached=False, device="")
                    tx.delete("VBD", vbd)
        except ApiError as e:
            log.warning("cannot destroy an NBD connection's VBD; the next start will", vbd=vbd_uuid,
                        error=" ".join(e.description))
            return
        self.tracking.discard(vbd_uuid)

    # -- TLS --------------------------------------------------------------------------------------

    def tls_context(self, host_uuid: str) -> ssl.SSLContext:
        """The server context of the host's certificate (the daemon's ``--tls-cert`` if given)."""
        daemon = self.daemon
        if daemon.tls_cert is not None:
            cert, key = daemon.tls_cert, daemon.tls_key
        else:
            host = daemon.store.by_uuid("host", host_uuid)
            rec = daemon.store.get("host", host) if host is not None else None
            name = str((rec or {}).get("hostname") or (rec or {}).get("name_label") or "localhost")
            try:
                cert, key = server_key_pair(daemon.hw.host_dir(host_uuid), name)
            except ApiError as e:
                raise Refused(" ".join(e.description)) from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(cert), str(key) if key is not None else None)
        except (OSError, ssl.SSLError) as e:
            raise Refused(f"cannot load the host's certificate: {e}") from None
        return context


def nbd_info(daemon: Daemon, vdi: str, session: str) -> list[dict[str, Any]]:
    """``VDI.get_nbd_info`` (xapi_vdi.ml ``_get_nbd_info``): one entry per address of an attached PIF
    on an NBD network, on every host where the VDI's SR is attached and NBD listens."""
    store = daemon.store
    rec = store.get("VDI", vdi)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "VDI", vdi)
    if rec["type"] == "cbt_metadata":
        raise ApiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
    hosts = [p["host"] for ref in store.referrers("PBD", "SR", rec["SR"])
             if (p := store.get("PBD", ref)) is not None and p["currently_attached"]]
    networks = {ref for ref, net in store.items("network") if any(x in NBD_PURPOSES for x in net["purpose"])}
    exportname = f"/{rec['uuid']}?session_id={session}"
    out: list[dict[str, Any]] = []
    for host in hosts:
        host_rec = store.get("host", host)
        if host_rec is None or host_rec["uuid"] is None:
            continue
        ips: list[str] = []
        for pif in store.referrers("PIF", "host", host):
            pif_rec = store.get("PIF", pif)
            if pif_rec is None or not pif_rec["currently_attached"] or pif_rec["network"] not in networks:
                continue
            ips += ([pif_rec["IP"]] if pif_rec["IP"] else []) + [a for a in pif_rec["IPv6"] if a]
        port = daemon.nbd.port_of(str(host_rec["uuid"]))
        if not ips or port is None:
            continue
        cert = get_server_certificate(Call(daemon, "host.get_server_certificate"), host)
        subject = str(host_rec["hostname"] or host_rec["name_label"])
        out += [{"exportname": exportname, "address": ip, "port": port, "cert": cert, "subject": subject}
                for ip in ips]
    return out

