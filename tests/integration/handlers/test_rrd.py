"""Performance statistics over plain HTTP, as XO, the SDK examples and monitoring checks read them.

``/rrd_updates`` (XML and JSON), ``/host_rrd``, ``/vm_rrd`` and the ``*data_source*`` calls against a
real daemon: columns per vCPU, VIF and VBD of the running VMs, rows per interval, values in range,
the same numbers through ``query_data_source``, xapi's answers to bad credentials, and statistics
that stop when a host crashes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import XenAPI

from tests.conftest import REPO, Xapid
from tests.integration.test_sessions import xapid_passwd
from tests.integration.vmkit import failure, install, new_vif, wait_for

TIMEOUT = 30


@pytest.fixture(scope="module")
def pool(shared_xapid: Xapid) -> Iterator[dict[str, Any]]:
    """Two running VMs on the master (one with 2 VIFs), a halted one, a root session."""
    s = shared_xapid.session()
    api = s.xenapi
    master = api.pool.get_master(api.pool.get_all()[0])
    web = install(api, "Debian Bookworm 12", "web")
    new_vif(api, web, "0")
    new_vif(api, web, "1")
    api.VM.set_VCPUs_max(web, "3")
    api.VM.set_VCPUs_at_startup(web, "3")
    api.VM.start_on(web, master, False, False)
    db = install(api, "Debian Bookworm 12", "db")
    api.VM.start_on(db, master, False, False)
    off = install(api, "Debian Bookworm 12", "off")
    # a started VM's first values come at the next 5 s step, as from xcp-rrdd
    for vm in (web, db):
        wait_for(lambda vm=vm: not math.isnan(api.VM.query_data_source(vm, "memory")), what="first sample")
    yield {"api": api, "session": s._session, "url": shared_xapid.url.rstrip("/"), "master": master,
           "web": web, "db": db, "off": off, "xapid": shared_xapid}
    s.xenapi.session.logout()


def get(pool: dict[str, Any], path: str, **params: Any) -> requests.Response:
    params.setdefault("session_id", pool["session"])
    return requests.get(pool["url"] + path, params=params, timeout=TIMEOUT, headers={"Accept": ""})


def xport(text: str) -> tuple[dict[str, str], list[str], list[tuple[int, list[float]]]]:
    root = ET.fromstring(text)
    meta = root.find("meta")
    assert root.tag == "xport" and meta is not None
    fields = {k: meta.findtext(k) or "" for k in ("start", "step", "end", "rows", "columns")}
    legend = [e.text or "" for e in meta.iter("entry")]
    rows = [(int(r.findtext("t") or 0), [float(v.text or "") for v in r.findall("v")])
            for r in root.findall("data/row")]
    assert int(fields["rows"]) == len(rows) and int(fields["columns"]) == len(legend)
    assert all(len(values) == len(legend) for _t, values in rows)
    return fields, legend, rows


def columns(legend: list[str], uuid: str) -> set[str]:
    return {e.split(":", 3)[3] for e in legend if e.split(":")[2] == uuid}


def test_rrd_updates_has_a_column_per_vcpu_vif_and_vbd_of_every_running_vm(pool: dict[str, Any]) -> None:
    api = pool["api"]
    start = int(time.time()) - 60
    r = get(pool, "/rrd_updates", start=start, host="true", cf="AVERAGE")
    assert r.status_code == 200 and r.headers["content-type"] == "text/xml"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    fields, legend, rows = xport(r.text)
    assert fields["step"] == "5" and all(e.startswith("AVERAGE:") for e in legend)
    host_uuid = api.host.get_uuid(pool["master"])
    assert {"cpu0", "cpu7", "cpu_avg", "loadavg", "memory_total_kib", "memory_free_kib", "pif_eth0_rx",
            "pif_eth0_tx"} <= columns(legend, host_uuid)
    for vm in (pool["web"], pool["db"]):
        uuid = api.VM.get_uuid(vm)
        vcpus = int(api.VM_metrics.get_VCPUs_number(api.VM.get_metrics(vm)))
        vifs = [api.VIF.get_device(v) for v in api.VM.get_VIFs(vm)]
        vbds = [api.VBD.get_device(b) for b in api.VM.get_VBDs(vm) if api.VBD.get_type(b) == "Disk"]
        assert vbds and all(vbds)
        expected = {f"cpu{i}" for i in range(vcpus)} | {"cpu_usage", "memory", "memory_target",
                                                         "memory_internal_free"}
        expected |= {f"vif_{d}_{w}" for d in vifs for w in ("rx", "tx")}
        expected |= {f"vbd_{d}_{w}" for d in vbds for w in ("read", "write", "iops_read", "iops_write")}
        assert columns(legend, uuid) == expected
    assert len(api.VM.get_VIFs(pool["web"])) == 2
    assert api.VM.get_uuid(pool["off"]) not in {e.split(":")[2] for e in legend}
    # rows: newest first, every 5 s back to start
    times = [t for t, _v in rows]
    assert times == sorted(times, reverse=True) and all(a - b == 5 for a, b in zip(times, times[1:], strict=False))
    assert times[-1] >= start and times[-1] - start < 5 and len(rows) in (12, 13)
    for name, values in zip(legend, zip(*(v for _t, v in rows), strict=True), strict=True):
        known = [v for v in values if not math.isnan(v)]
        if ":host:" in name:
            assert len(known) == len(values), name  # the host ran all along
        if name.rsplit(":", 1)[1].startswith("cpu"):
            assert all(0.0 <= v <= 1.0 for v in known), name
        else:
            assert all(v >= 0.0 for v in known), name
    web_mem = legend.index(f"AVERAGE:vm:{api.VM.get_uuid(pool['web'])}:memory")
    known_memory = {v[web_mem] for _t, v in rows if not math.isnan(v[web_mem])}  # none before the VM started
    assert known_memory <= {float(api.VM_metrics.get_memory_actual(api.VM.get_metrics(pool["web"])))}


def test_intervals_pick_xapis_archives_and_json_has_the_same_shape(pool: dict[str, Any]) -> None:
    now = int(time.time())
    fields, legend, rows = xport(get(pool, "/rrd_updates", start=now - 3600, interval=60, host="true").text)
    assert fields["step"] == "60" and len(rows) in (60, 61) and all(t % 60 == 0 for t, _v in rows)
    assert {e.split(":")[0] for e in legend if ":host:" in e} == {"AVERAGE", "MIN", "MAX"}
    assert {e.split(":")[0] for e in legend if ":vm:" in e} == {"AVERAGE"}  # VMs: no min/max by default
    fields, _legend, rows = xport(get(pool, "/rrd_updates", start=now - 86400, interval=3600, cf="MAX",
                                      host="true", vm_uuid="none").text)
    assert fields["step"] == "3600" and len(rows) in (24, 25)
    # as in xapi (Rrd.find_best_rras): a CF some RRD lacks (VMs have no MAX archive by default) fails it all
    assert get(pool, "/rrd_updates", start=now - 600, cf="MAX", host="true").status_code == 500
    r = get(pool, "/rrd_updates", start=-30, host="true", json="true")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert set(doc) == {"meta", "data"} and doc["meta"]["step"] == "5"
    assert doc["meta"]["columns"] == str(len(doc["meta"]["legend"])) == str(len(doc["data"][0]["values"]))
    assert len(doc["data"]) in (6, 7) and all(isinstance(v, str) for v in doc["data"][0]["values"])
    xml_legend = xport(get(pool, "/rrd_updates", start=-30, host="true").text)[1]
    assert doc["meta"]["legend"] == xml_legend


def test_vm_uuid_and_host_filter_the_columns(pool: dict[str, Any]) -> None:
    api = pool["api"]
    web = api.VM.get_uuid(pool["web"])
    _f, legend, _rows = xport(get(pool, "/rrd_updates", start=-10, vm_uuid=web).text)
    assert {tuple(e.split(":")[1:3]) for e in legend} == {("vm", web)}
    _f, legend, _rows = xport(get(pool, "/rrd_updates", start=-10, host="false").text)
    assert not [e for e in legend if ":host:" in e] and legend


def test_query_data_source_answers_from_the_same_numbers(pool: dict[str, Any]) -> None:
    api = pool["api"]
    web = pool["web"]
    uuid = api.VM.get_uuid(web)
    for _attempt in range(5):  # read both within one 5 s step
        before = int(time.time()) // 5
        _f, legend, rows = xport(get(pool, "/rrd_updates", start=-10, host="true").text)
        cpu0 = api.VM.query_data_source(web, "cpu0")
        avg = api.host.query_data_source(pool["master"], "cpu_avg")
        if int(time.time()) // 5 == before:
            break
    host_uuid = api.host.get_uuid(pool["master"])
    assert cpu0 == pytest.approx(rows[0][1][legend.index(f"AVERAGE:vm:{uuid}:cpu0")], rel=1e-12)
    assert avg == pytest.approx(rows[0][1][legend.index(f"AVERAGE:host:{host_uuid}:cpu_avg")], rel=1e-12)
    assert 0 <= cpu0 <= 1
    names = {d["name_label"]: d for d in api.VM.get_data_sources(web)}
    assert names["cpu0"]["enabled"] and names["cpu0"]["standard"] and names["cpu0"]["units"] == "(fraction)"
    assert names["vif_0_rx"]["units"] == "B/s" and not names["vif_0_rx_errors"]["enabled"]
    assert failure(api.VM.query_data_source, pool["off"], "cpu0") == [
        "VM_BAD_POWER_STATE", pool["off"], "running", "halted"]
    assert api.VM.get_data_sources(pool["off"]) == []
    assert failure(api.host.query_data_source, pool["master"], "no_such")[0] == "INTERNAL_ERROR"


def test_record_and_forget_a_data_source(pool: dict[str, Any]) -> None:
    api = pool["api"]
    db = pool["db"]
    assert "vif_0_rx_errors" not in {d["name_label"] for d in api.VM.get_data_sources(db)}  # db has no VIF
    web = pool["web"]
    web_uuid = api.VM.get_uuid(web)
    api.VM.record_data_source(web, "vif_1_tx_errors")
    assert {d["name_label"]: d["enabled"] for d in api.VM.get_data_sources(web)}["vif_1_tx_errors"] is True
    legend = xport(get(pool, "/rrd_updates", start=-10, vm_uuid=web_uuid).text)[1]
    assert f"AVERAGE:vm:{web_uuid}:vif_1_tx_errors" in legend
    api.VM.forget_data_source_archives(web, "vif_1_tx_errors")
    legend = xport(get(pool, "/rrd_updates", start=-10, vm_uuid=web_uuid).text)[1]
    assert f"AVERAGE:vm:{web_uuid}:vif_1_tx_errors" not in legend
    assert failure(api.VM.record_data_source, web, "no_such")[0] == "INTERNAL_ERROR"


def test_host_and_vm_rrd_dumps(pool: dict[str, Any]) -> None:
    api = pool["api"]
    r = get(pool, "/host_rrd")
    assert r.status_code == 200 and r.headers["content-type"] == "text/xml"
    root = ET.fromstring(r.text)
    assert root.tag == "rrd" and root.findtext("step") == "5"
    assert abs(int(root.findtext("lastupdate") or 0) - time.time()) < 30
    rras = root.findall("rra")
    assert [(x.findtext("cf"), x.findtext("pdp_per_row"), len(x.findall("database/row"))) for x in rras] == [
        ("AVERAGE", "1", 120), ("AVERAGE", "12", 120), ("MIN", "12", 120), ("MAX", "12", 120),
        ("AVERAGE", "720", 168), ("MIN", "720", 168), ("MAX", "720", 168),
        ("AVERAGE", "17280", 366), ("MIN", "17280", 366), ("MAX", "17280", 366)]
    names = [d.findtext("name") for d in root.findall("ds")]
    assert "cpu_avg" in names and all(len(row.findall("v")) == len(names) for row in rras[0].findall("database/row"))
    vm = get(pool, "/vm_rrd", uuid=api.VM.get_uuid(pool["web"]))
    assert vm.status_code == 200
    vroot = ET.fromstring(vm.text)
    assert [x.findtext("pdp_per_row") for x in vroot.findall("rra")] == ["1", "12", "720", "17280"]
    newest = [float(v.text or "") for v in vroot.findall("rra")[0].findall("database/row")[-1].findall("v")]
    assert not any(math.isnan(v) for v in newest)
    as_json = get(pool, "/vm_rrd", uuid=api.VM.get_uuid(pool["web"]), json="1").json()
    assert [d["name"] for d in as_json["ds"]] == [d.findtext("name") for d in vroot.findall("ds")]
    assert get(pool, "/vm_rrd", uuid=api.VM.get_uuid(pool["off"])).status_code == 404
    assert get(pool, "/vm_rrd").status_code == 400
    assert get(pool, "/rrd_updates").status_code == 400  # start is required


UNAUTHORISED = b"<html><body><h1>HTTP 401 unauthorised</h1>Please check your credentials and retry.</body></html>"


def test_credentials_as_xapi_checks_them(pool: dict[str, Any]) -> None:
    url = pool["url"] + "/rrd_updates?start=-5&host=true"
    missing = requests.get(url, timeout=TIMEOUT)
    assert missing.status_code == 401 and missing.content == UNAUTHORISED
    assert missing.headers["WWW-Authenticate"] == 'Basic realm="get_rrd_updates"'
    bad = requests.get(url + "&session_id=OpaqueRef:00000000-0000-0000-0000-000000000000", timeout=TIMEOUT)
    assert bad.status_code == 401 and b"Traceback" not in bad.content
    password = pool["xapid"].password
    assert requests.get(url, auth=("root", password), timeout=TIMEOUT).status_code == 200
    assert requests.get(url, auth=("root", "wrong"), timeout=TIMEOUT).status_code == 401
    assert requests.get(url, cookies={"session_id": pool["session"]}, timeout=TIMEOUT).status_code == 200
    done = xapid_passwd(pool["xapid"].state_dir, "watcher", "w pass", "--role", "read-only")
    assert done.returncode == 0, done.stderr
    reader = XenAPI.Session(pool["xapid"].url)
    reader.login_with_password("watcher", "w pass", "2.21", "pytest")
    try:
        r = requests.get(url + f"&session_id={reader._session}", timeout=TIMEOUT)
        assert r.status_code == 200  # read-only may read statistics (http/get_rrd_updates: _R_READ_ONLY)
        assert reader.xenapi.host.query_data_source(pool["master"], "cpu0") >= 0
        assert failure(reader.xenapi.host.record_data_source, pool["master"], "cpu0")[0] == "RBAC_PERMISSION_DENIED"
    finally:
        reader.xenapi.session.logout()


def test_a_task_reports_the_outcome(pool: dict[str, Any]) -> None:
    api = pool["api"]
    task = api.task.create("stats", "")
    assert get(pool, "/rrd_updates", start=-5, task_id=task).status_code == 200
    assert api.task.get_status(task) == "success" and api.task.get_progress(task) == 1.0
    task = api.task.create("stats", "")
    r = get(pool, "/rrd_updates", start=-5, task_id=task, session_id="OpaqueRef:bad")
    assert r.status_code == 401
    assert api.task.get_status(task) == "failure"
    assert api.task.get_error_info(task) == ["SESSION_AUTHENTICATION_FAILED"]


def fault(state_dir: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xapid.cli.xapid", "fault", "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_statistics_stop_when_the_host_crashes(xapid: Xapid, api: Any) -> None:
    host2 = api.host.get_by_name_label("host2")[0]
    vm = install(api, "Debian Bookworm 12", "victim")
    api.VM.start_on(vm, host2, False, False)
    uuid = api.VM.get_uuid(vm)
    sid = xapid.session()._session
    url = xapid.url.rstrip("/")

    def legend() -> list[str]:
        r = requests.get(url + "/rrd_updates", params={"session_id": sid, "start": -10}, timeout=TIMEOUT,
                         headers={"Accept": "text/xml"})
        assert r.status_code == 200
        return xport(r.text)[1]

    assert any(f":vm:{uuid}:" in e for e in legend())
    wait_for(lambda: api.VM.query_data_source(vm, "memory") > 0, what="first sample")
    crashed_at = time.time()
    done = fault(xapid.state_dir, "crash", "host2")
    assert done.returncode == 0, done.stderr
    assert not any(f":vm:{uuid}:" in e for e in legend())  # its host's statistics are gone with it
    assert failure(api.VM.query_data_source, vm, "cpu0") == ["HOST_OFFLINE", host2]
    assert failure(api.host.query_data_source, host2, "cpu0") == ["HOST_OFFLINE", host2]
    time.sleep(max(0.0, crashed_at + 5.5 - time.time()))  # a whole 5 s step past the crash
    r = requests.get(url + "/vm_rrd", params={"session_id": sid, "uuid": uuid}, timeout=TIMEOUT,
                     headers={"Accept": "text/xml"})
    assert r.status_code == 200  # the RRD left behind (xapi's master would unarchive one)...
    last = int(ET.fromstring(r.text).findtext("lastupdate") or 0)
    assert crashed_at - 6 < last <= crashed_at < time.time() - 5  # ...stops at the crash
    wait_for(lambda: fault(xapid.state_dir, "boot", "host2").returncode == 0, what="boot")
    assert json.dumps(legend())  # the pool address answers again with what runs


def test_the_xml_walks_as_the_public_parse_rrd_example_walks_it(pool: dict[str, Any]) -> None:
    """xen-api's scripts/examples/python/parse_rrd.py indexes DOM children directly: no whitespace nodes,
    ``<xport>`` first, then ``<meta>`` and ``<data>``, ``<entry>`` per legend column, ``<t>`` then ``<v>``s."""
    from xml.dom import minidom

    doc = minidom.parseString(get(pool, "/rrd_updates", start=-20, host="true", cf="AVERAGE", interval=5).content)
    xport_node = doc.firstChild
    assert xport_node is not None and xport_node.nodeName == "xport"
    meta, data = xport_node.childNodes
    assert (meta.nodeName, data.nodeName) == ("meta", "data")
    columns = int(meta.getElementsByTagName("columns")[0].firstChild.toxml())
    legend = meta.getElementsByTagName("legend")[0]
    assert [n.nodeName for n in legend.childNodes] == ["entry"] * columns
    for entry in legend.childNodes:
        cf, kind, _uuid, _name = entry.firstChild.toxml().split(":")
        assert cf == "AVERAGE" and kind in ("host", "vm")
    rows = int(meta.getElementsByTagName("rows")[0].firstChild.toxml())
    assert len(data.childNodes) == rows
    for row in data.childNodes:
        assert [n.nodeName for n in row.childNodes] == ["t"] + ["v"] * columns
        int(row.childNodes[0].firstChild.toxml())
        [float(v.firstChild.toxml()) for v in row.childNodes[1:]]


def test_values_move_and_are_reproducible(pool: dict[str, Any]) -> None:
    """Rows of the same instant read twice are equal (a pure function of seed, object, time); they differ
    from row to row."""
    first = xport(get(pool, "/rrd_updates", start=-300, host="true", cf="AVERAGE").text)
    time.sleep(1)
    second = xport(get(pool, "/rrd_updates", start=-300, host="true", cf="AVERAGE").text)
    assert first[1] == second[1]
    earlier = dict(first[2])
    shared = [(values, earlier[t]) for t, values in second[2] if t in earlier]
    assert len(shared) > 50
    assert all(a == b or (math.isnan(a) and math.isnan(b)) for values, old in shared for a, b in zip(values, old,
                                                                                                      strict=True))
    cpu = first[1].index(next(e for e in first[1] if e.endswith(":cpu_avg")))
    assert len({values[cpu] for _t, values in first[2]}) > 10


def test_a_hosts_load_follows_what_runs_on_it(pool: dict[str, Any]) -> None:
    api = pool["api"]
    host3 = api.host.get_by_name_label("host3")[0]
    before = api.host.query_data_source(host3, "running_vcpus")
    free_before = api.host.query_data_source(host3, "memory_free_kib")
    vm = install(api, "Debian Bookworm 12", "busy")
    api.VM.set_VCPUs_max(vm, "4")
    api.VM.set_VCPUs_at_startup(vm, "4")
    api.VM.start_on(vm, host3, False, False)
    try:
        wait_for(lambda: api.host.query_data_source(host3, "running_vcpus") == before + 4, what="the VM's vCPUs")
        memory = int(api.VM_metrics.get_memory_actual(api.VM.get_metrics(vm)))
        assert api.host.query_data_source(host3, "memory_free_kib") == free_before - memory / 1024
    finally:
        api.VM.hard_shutdown(vm)
    wait_for(lambda: api.host.query_data_source(host3, "running_vcpus") == before, what="the next step")


def test_a_hosts_history_keeps_a_vm_that_stopped(xapid: Xapid, api: Any) -> None:
    master = api.pool.get_master(api.pool.get_all()[0])
    # A fresh daemon has no sample yet: the baseline is read once the first 5 s step exists.
    wait_for(lambda: api.host.query_data_source(master, "memory_total_kib") > 0, timeout=20, what="first sample")
    time.sleep(5.5)
    base = api.host.query_data_source(master, "running_vcpus")
    vm = install(api, "Debian Bookworm 12", "brief")
    api.VM.start_on(vm, master, False, False)
    vcpus = int(api.VM_metrics.get_VCPUs_number(api.VM.get_metrics(vm)))
    wait_for(lambda: api.host.query_data_source(master, "running_vcpus") == base + vcpus, timeout=20,
             what="the VM's vCPUs")
    api.VM.hard_shutdown(vm)
    assert api.host.query_data_source(master, "running_vcpus") in (base, base + vcpus)  # this 5 s step may have it
    wait_for(lambda: api.host.query_data_source(master, "running_vcpus") == base, timeout=20, what="the next step")
    session = xapid.session()
    try:
        r = requests.get(xapid.url.rstrip("/") + "/rrd_updates", timeout=TIMEOUT, headers={"Accept": "text/xml"},
                         params={"session_id": session._session, "start": -60, "host": "true"})
        _f, legend, rows = xport(r.text)
        col = legend.index(f"AVERAGE:host:{api.host.get_uuid(master)}:running_vcpus")
        seen = [values[col] for _t, values in rows]
        assert seen[0] == base and base + vcpus in seen  # the past still has the VM
    finally:
        session.xenapi.session.logout()


def test_a_hosts_own_address_answers_for_that_host(pool: dict[str, Any]) -> None:
    """At a host's own address (issue 11) /rrd_updates is that host's rrdd: its columns, its VMs."""
    from tests.integration.endpoint_support import host_url

    api = pool["api"]
    host2 = api.host.get_by_name_label("host2")[0]
    vm = install(api, "Debian Bookworm 12", "on-host2")
    api.VM.start_on(vm, host2, False, False)
    try:
        url = host_url(pool["xapid"], api.host.get_address(host2)).rstrip("/")
        r = requests.get(url + "/rrd_updates", timeout=TIMEOUT, headers={"Accept": "text/xml"},
                         params={"session_id": pool["session"], "start": -10, "host": "true"})
        assert r.status_code == 200, r.text[:300]
        legend = xport(r.text)[1]
        owners = {tuple(e.split(":")[1:3]) for e in legend}
        assert ("host", api.host.get_uuid(host2)) in owners
        assert ("host", api.host.get_uuid(pool["master"])) not in owners
        assert ("vm", api.VM.get_uuid(vm)) in owners
        assert ("vm", api.VM.get_uuid(pool["web"])) not in owners  # it runs on the master
        assert ("vm", api.VM.get_uuid(api.host.get_control_domain(host2))) in owners
    finally:
        api.VM.hard_shutdown(vm)
