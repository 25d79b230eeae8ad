"""Every host's NBD service (xapi-nbd src/main.ml on the nbd library's lib/server.ml) and
``VDI.get_nbd_info`` (xapi_vdi.ml), against a real daemon: a small fixed-newstyle client written
here from the NBD specification, and libnbd's ``nbdinfo``/``nbdcopy`` where installed (CI)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import XenAPI

from tests.conftest import CI, REPO, Xapid
from tests.integration.vmkit import MIB, default_sr, new_vdi, vdi_file, wait_for

IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9


class NbdClient:
    """Fixed newstyle, EXPORT_NAME (what xapi-nbd serves), optional STARTTLS; simple replies."""

    def __init__(self, address: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection((address, port), timeout=10)
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (0x4E42444D41474943, IHAVEOPT) and flags & 1
        self.sock.sendall(struct.pack(">I", 1))  # NBD_FLAG_C_FIXED_NEWSTYLE
        if tls is not None:
            assert self.option(5) == (5, 1, b"")  # NBD_OPT_STARTTLS -> ACK
            self.sock = tls.wrap_socket(self.sock, server_hostname=None)

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            got = self.sock.recv(n - len(data))
            if not got:
                raise ConnectionError("closed by the server")
            data += got
        return data

    def option(self, option: int, data: bytes = b"") -> tuple[int, int, bytes]:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        magic, opt, reply, length = struct.unpack(">QIII", self.recv(20))
        assert magic == OPTION_REPLY_MAGIC
        return opt, reply, self.recv(length)

    def export(self, name: str) -> tuple[int, int]:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, 1, len(name)) + name.encode())
        size, flags = struct.unpack(">QH", self.recv(10))
        assert self.recv(124) == bytes(124)
        return size, flags

    def request(self, command: int, offset: int, length: int, handle: int = 7, payload: bytes = b"") -> int:
        self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, command, handle, offset, length) + payload)
        magic, error, got = struct.unpack(">IIQ", self.recv(16))
        assert magic == 0x67446698 and got == handle
        return int(error)

    def read(self, offset: int, length: int) -> bytes:
        assert self.request(0, offset, length) == 0
        return self.recv(length)

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 1, 0, 0))  # NBD_CMD_DISC
        finally:
            self.sock.close()


def nbd_network(api: Any, purpose: str) -> str:
    network = next(n for n in api.network.get_all() if api.network.get_bridge(n) == "xenbr0")
    api.network.add_purpose(network, purpose)
    return str(network)


def disk_with_data(xapid: Xapid, api: Any) -> tuple[str, dict[int, bytes]]:
    vdi = new_vdi(api, default_sr(api), 16 * MIB, "nbd-disk")
    pieces = {0: b"boot sector".ljust(512, b"\0"), 5 * MIB: os.urandom(4096), 16 * MIB - 512: b"E" * 512}
    with open(vdi_file(xapid.state_dir, api, vdi), "r+b") as f:
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    return vdi, pieces


def dom0_vbds(api: Any, vdi: str) -> list[dict[str, Any]]:
    """The VDI's VBDs on a control domain, read in one call (a VBD may go between two calls)."""
    dom0s = {api.host.get_control_domain(h) for h in api.host.get_all()}
    return [r for r in api.VBD.get_all_records().values() if r["VDI"] == vdi and r["VM"] in dom0s]


def test_nbd_info_needs_a_purpose_and_names_each_host_with_the_sr(xapid: Xapid) -> None:
    s = xapid.session()
    api, session = s.xenapi, s._session  # type: ignore[attr-defined]
    vdi, _ = disk_with_data(xapid, api)
    assert api.VDI.get_nbd_info(vdi) == []  # no network has an NBD purpose yet
    network = nbd_network(api, "insecure_nbd")
    infos = api.VDI.get_nbd_info(vdi)
    hosts = {api.host.get_address(h): h for h in api.host.get_all()}
    assert sorted(i["address"] for i in infos) == sorted(hosts)  # the shared SR is attached on all three
    uuid = api.VDI.get_uuid(vdi)
    for info in infos:
        assert info["exportname"] == f"/{uuid}?session_id={session}"
        assert int(info["port"]) > 0 and info["cert"].startswith("-----BEGIN CERTIFICATE-----")
        assert info["cert"] == api.host.get_server_certificate(hosts[info["address"]])
        assert info["subject"] == api.host.get_hostname(hosts[info["address"]])
    # xapi_network.ml assert_can_add_purpose: nbd and insecure_nbd never together.
    with pytest.raises(XenAPI.Failure) as e:
        api.network.add_purpose(network, "nbd")
    assert e.value.details == ["NETWORK_INCOMPATIBLE_PURPOSES", "nbd", "insecure_nbd"]
    api.network.remove_purpose(network, "insecure_nbd")
    assert api.network.get_purpose(network) == [] and api.VDI.get_nbd_info(vdi) == []


def test_an_export_reads_the_disk_read_only_and_holds_a_dom0_vbd_meanwhile(xapid: Xapid) -> None:
    s = xapid.session()
    api = s.xenapi
    vdi, pieces = disk_with_data(xapid, api)
    nbd_network(api, "insecure_nbd")
    info = api.VDI.get_nbd_info(vdi)[0]
    client = NbdClient(info["address"], int(info["port"]))
    assert client.option(3)[1] == 0x80000002  # NBD_OPT_LIST: refused by policy
    assert client.option(6)[1] == 0x80000001  # NBD_OPT_INFO: unsupported, as xapi-nbd
    size, flags = client.export(info["exportname"])
    assert size == 16 * MIB and flags & 2  # NBD_FLAG_READ_ONLY
    (vbd,) = wait_for(lambda: dom0_vbds(api, vdi), 20, "the control domain's VBD")
    host = next(h for h in api.host.get_all() if api.host.get_address(h) == info["address"])
    assert vbd["mode"] == "RO" and vbd["currently_attached"] and vbd["VM"] == api.host.get_control_domain(host)
    for offset, data in pieces.items():
        start = offset - offset % 512
        assert client.read(start, 8192 if start + 8192 <= size else size - start)[offset - start:][:len(data)] == data
    assert client.read(MIB, 4096) == bytes(4096)  # a hole reads as zeroes
    assert client.request(1, 0, 512, payload=b"x" * 512) == 1  # NBD_CMD_WRITE: EPERM
    assert client.request(0, 1, 512) == 22  # not sector-aligned: EINVAL
    assert client.request(0, size, 512) == 22  # past the end: EINVAL
    assert client.read(0, 512) == pieces[0]  # still serving after the refusals
    with pytest.raises(XenAPI.Failure) as e:
        api.VDI.destroy(vdi)  # attached to dom0 while the client holds it
    assert e.value.details == ["VDI_IN_USE", vdi, "destroy"]
    client.close()
    wait_for(lambda: dom0_vbds(api, vdi) == [], 20, "the VBD to go with the client")
    assert not (xapid.state_dir / "nbd-vbds.json").exists()


def test_bad_sessions_names_and_read_only_users_are_refused(xapid: Xapid) -> None:
    s = xapid.session()
    api, session = s.xenapi, s._session  # type: ignore[attr-defined]
    vdi, _ = disk_with_data(xapid, api)
    nbd_network(api, "insecure_nbd")
    info = api.VDI.get_nbd_info(vdi)[0]
    uuid = api.VDI.get_uuid(vdi)
    for name in (f"/{uuid}", f"/{uuid}?session_id=OpaqueRef:bogus", f"/no-such-vdi?session_id={session}"):
        client = NbdClient(info["address"], int(info["port"]))
        with pytest.raises((ConnectionError, OSError)):
            client.export(name)
        client.sock.close()
    done = subprocess.run([sys.executable, "-m", "xapid.cli.xapid", "passwd", "--state-dir", str(xapid.state_dir),
                           "--role", "read-only", "auditor"], input="ro-Secret-1\n", text=True, capture_output=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    auditor = XenAPI.Session(xapid.url)
    auditor.login_with_password("auditor", "ro-Secret-1", "2.21", "test")
    ro_name = f"/{uuid}?session_id={auditor._session}"  # type: ignore[attr-defined]
    assert auditor.xenapi.VDI.get_uuid(vdi) == uuid  # a valid session, that may not make the VBD
    client = NbdClient(info["address"], int(info["port"]))
    with pytest.raises((ConnectionError, OSError)):
        client.export(ro_name)
    client.sock.close()
    assert dom0_vbds(api, vdi) == []


def test_tls_is_required_when_a_network_has_the_nbd_purpose(xapid: Xapid) -> None:
    s = xapid.session()
    api = s.xenapi
    vdi, pieces = disk_with_data(xapid, api)
    nbd_network(api, "nbd")
    info = api.VDI.get_nbd_info(vdi)[0]
    plain = NbdClient(info["address"], int(info["port"]))
    assert plain.option(3)[1] == 0x80000005  # any option before STARTTLS: NBD_REP_ERR_TLS_REQD
    with pytest.raises((ConnectionError, OSError)):
        plain.export(info["exportname"])  # cleartext export: the server hangs up
    plain.sock.close()
    context = ssl.create_default_context(cadata=info["cert"])
    context.check_hostname = False  # the certificate names the host, not its loopback address
    secure = NbdClient(info["address"], int(info["port"]), tls=context)
    size, _flags = secure.export(info["exportname"])
    assert size == 16 * MIB and secure.read(0, 512) == pieces[0]
    secure.close()


def test_a_host_that_loses_power_closes_its_nbd_service(xapid: Xapid) -> None:
    s = xapid.session()
    api = s.xenapi
    vdi, _ = disk_with_data(xapid, api)
    nbd_network(api, "insecure_nbd")
    slave = next(h for h in api.host.get_all() if h != api.pool.get_master(api.pool.get_all()[0]))
    address = api.host.get_address(slave)
    info = next(i for i in api.VDI.get_nbd_info(vdi) if i["address"] == address)
    client = NbdClient(address, int(info["port"]))
    client.export(info["exportname"])
    crashed = subprocess.run([sys.executable, "-m", "xapid.cli.xapid", "fault", "--state-dir", str(xapid.state_dir),
                              "crash", api.host.get_uuid(slave)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert crashed.returncode == 0, crashed.stderr
    with pytest.raises((ConnectionError, OSError)):
        client.read(0, 512)
    with pytest.raises(OSError):
        socket.create_connection((address, int(info["port"])), timeout=2)
    assert address not in [i["address"] for i in api.VDI.get_nbd_info(vdi)]
    wait_for(lambda: dom0_vbds(api, vdi) == [], 20, "the VBD to go with the connection")


def test_a_stop_or_a_kill_with_a_client_connected_leaves_no_vbd_after_the_next_start(xapid: Xapid) -> None:
    api = xapid.session().xenapi
    vdi, _ = disk_with_data(xapid, api)
    nbd_network(api, "insecure_nbd")
    for end in ("stop", "kill"):
        info = api.VDI.get_nbd_info(vdi)[0]
        client = NbdClient(info["address"], int(info["port"]))
        client.export(info["exportname"])
        wait_for(lambda: dom0_vbds(api, vdi), 20, "the control domain's VBD")  # noqa: B023
        if end == "stop":
            assert xapid.stop() == 0  # the clean stop destroys the VBD itself
            assert not (xapid.state_dir / "nbd-vbds.json").exists()
        else:
            xapid.kill()
            assert (xapid.state_dir / "nbd-vbds.json").exists()
        client.sock.close()
        xapid.start()
        api = xapid.session().xenapi
        assert dom0_vbds(api, vdi) == [] and not (xapid.state_dir / "nbd-vbds.json").exists(), end


@pytest.mark.skipif(shutil.which("nbdcopy") is None and not CI, reason="libnbd-bin (nbdinfo, nbdcopy) not installed")
def test_libnbd_copies_the_disk_byte_for_byte(xapid: Xapid, tmp_path: Path) -> None:
    assert shutil.which("nbdcopy") and shutil.which("nbdinfo"), "CI installs libnbd-bin"
    s = xapid.session()
    api = s.xenapi
    vdi, _ = disk_with_data(xapid, api)
    nbd_network(api, "insecure_nbd")
    info = api.VDI.get_nbd_info(vdi)[0]
    from urllib.parse import quote

    uri = f"nbd://{info['address']}:{info['port']}/{quote(info['exportname'][1:], safe='')}"
    out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0 and out.stdout.strip() == str(16 * MIB), out.stderr
    copy = tmp_path / "copy.raw"
    done = subprocess.run(["nbdcopy", uri, str(copy)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert copy.read_bytes() == vdi_file(xapid.state_dir, api, vdi).read_bytes()
