"""Transfers go where the storage is: a host that cannot see the SR answers ``302 Found`` to a host that
can (importexport.ml check_sr_availability, find_host_for_sr, return_302_redirect; export.ml;
import.ml), and xe follows it (newcli.ml HttpPut/HttpGet)."""

from __future__ import annotations

import http.client
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests

from tests.conftest import Xapid
from tests.integration.handlers.test_transfer import finished, make_vm, session_of, task
from tests.integration.test_xe_support import Xe
from tests.integration.vmkit import MIB, default_sr, new_vbd, new_vdi
from xapid.hw.faults import FaultClient


def local_sr_of(api: Any, name: str) -> str:
    """The SR only ``name``'s PBD reaches (its local storage)."""
    host = next(h for h in api.host.get_all() if api.host.get_name_label(h) == name)
    for sr in api.SR.get_all():
        pbds = api.SR.get_PBDs(sr)
        if len(pbds) == 1 and api.PBD.get_host(pbds[0]) == host and api.SR.get_content_type(sr) != "iso":
            return str(sr)
    raise AssertionError(f"no local SR on {name}")


def raw_request(d: Xapid, method: str, target: str, body: bytes = b"", host: str = "127.0.0.1") -> tuple[
        int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, urlsplit(d.url).port, timeout=30)
    try:
        conn.request(method, target, body=body or None, headers={"content-length": str(len(body))} if body else {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_a_disk_on_a_slaves_local_sr_is_redirected_there_and_the_task_waits(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    port = urlsplit(xapid.url).port
    vdi = new_vdi(api, local_sr_of(api, "host2"), 4 * MIB)
    t = task(api)
    query = urlencode({"session_id": session, "vdi": vdi, "task_id": t})
    body = os.urandom(MIB)
    status, headers, _ = raw_request(xapid, "PUT", f"/import_raw_vdi?{query}", body)
    assert status == 302
    assert headers["location"] == f"http://127.0.1.2:{port}/import_raw_vdi?{query}"
    assert headers["connection"] == "close"
    assert api.task.get_status(t) == "pending"  # the host the client goes to completes it
    # The slave's own address serves it.
    status, _, _ = raw_request(xapid, "PUT", f"/import_raw_vdi?{query}", body, host="127.0.1.2")
    assert status == 200
    assert finished(api, t)["status"] == "success"
    # An export asked of the master goes the same way; requests follows the redirect by itself.
    got = requests.get(f"{xapid.url}export_raw_vdi", params={"session_id": session, "vdi": vdi}, timeout=30)
    assert got.status_code == 200 and got.history[0].status_code == 302
    assert got.url.startswith(f"http://127.0.1.2:{port}/export_raw_vdi?")
    assert got.content[:MIB] == body
    # The shared SR is served wherever it is asked, slaves included.
    shared = new_vdi(api, default_sr(api), MIB)
    for host in ("127.0.0.1", "127.0.1.3"):
        status, _, data = raw_request(xapid, "GET", f"/export_raw_vdi?session_id={session}&vdi={shared}", host=host)
        assert (status, len(data)) == (200, MIB)


def test_vm_export_and_import_follow_the_vms_storage(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    port = urlsplit(xapid.url).port
    vm, _ = make_vm(api)
    local = new_vdi(api, local_sr_of(api, "host3"), MIB, "local")
    new_vbd(api, vm, local, "5")
    status, headers, _ = raw_request(xapid, "GET", f"/export?session_id={session}&ref={vm}")
    assert status == 302 and headers["location"].startswith(f"http://127.0.1.3:{port}/export?")
    status, headers, _ = raw_request(xapid, "PUT", f"/import?session_id={session}&sr_id={local_sr_of(api, 'host2')}",
                                     b"not an xva")
    assert status == 302 and headers["location"].startswith(f"http://127.0.1.2:{port}/import?")


def test_no_host_can_see_the_sr_fails_the_task(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    vdi = new_vdi(api, local_sr_of(api, "host2"), MIB)
    FaultClient(xapid.state_dir).crash("host2")
    for h in api.host.get_all():
        if api.host.get_name_label(h) == "host2":
            api.host.declare_dead(h)  # not live: no host can serve its local SR
    t = task(api)
    status, _, _ = raw_request(xapid, "GET", f"/export_raw_vdi?session_id={session}&vdi={vdi}&task_id={t}")
    assert status == 500
    assert finished(api, t)["error_info"] == ["NO_HOSTS_AVAILABLE"]


def test_xe_follows_the_redirect_both_ways(xapid: Xapid, tmp_path: Path) -> None:
    api, _ = session_of(xapid)
    vdi = new_vdi(api, local_sr_of(api, "host2"), 2 * MIB)
    uuid = api.VDI.get_uuid(vdi)
    image = tmp_path / "in.raw"
    image.write_bytes(os.urandom(2 * MIB))
    xe = Xe(tmp_path, xapid)
    assert xe.ok("vdi-import", f"uuid={uuid}", f"filename={image}") == ""
    out = tmp_path / "out.raw"
    assert xe.ok("vdi-export", f"uuid={uuid}", f"filename={out}") == ""
    assert out.read_bytes() == image.read_bytes()
