"""xcp-rrdd's wire formats: xport (rrd_updates.ml) in XML and JSON, the RRD dump, archive choice, Accept."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import pytest

from xapid.handlers.rrd import (
    NoRRA,
    best_rras,
    f_to_s,
    prefers_json,
    rrd_json,
    rrd_xml,
    updates,
    xport_json,
    xport_xml,
)
from xapid.hw.metrics import RRD, STEP, Generator, HostProfile, VmProfile, archives

T0 = 1_800_000_000
GIB = 1024**3


def vm_rrd(last: int = T0, min_max: bool = False) -> RRD:
    profile = VmProfile("vm-a", 2, GIB, GIB, ("0",), ("xvda",), 0.0, "h")
    sources = Generator(1).vm_sources(profile)
    return RRD("vm-a", last, [s for s in sources if s.ds.default], archives(min_max), lambda t: True, {})


def host_rrd(last: int = T0) -> RRD:
    sources = Generator(1).host_sources(HostProfile("h", 2, 8 * GIB, ("eth0",), ()))
    return RRD("h", last, sources, archives(True), lambda t: True, {})


def test_numbers_are_printed_as_xapi_rrd_prints_them() -> None:
    assert [f_to_s(x) for x in (0.0, 1.0, 300.0, 0.5, 1 / 3, float("nan"), float("inf"), -float("inf"))] == [
        "0.0", "1", "300", "0.5", "0.333333333333333", "NaN", "Infinity", "-Infinity"]


def test_the_archive_is_the_first_one_fine_enough_that_still_holds_start() -> None:
    rrd = host_rrd()
    assert [(r.cf, r.pdp) for r in best_rras(rrd, 0, None, T0 - 300)] == [("AVERAGE", 1)]
    # older than the 10 minutes of 5 s rows: the minute rows, every CF of that step
    assert [(r.cf, r.pdp) for r in best_rras(rrd, 0, None, T0 - 3600)] == [("AVERAGE", 12), ("MIN", 12),
                                                                             ("MAX", 12)]
    assert [(r.cf, r.pdp) for r in best_rras(rrd, 60 // STEP, "AVERAGE", T0 - 300)] == [("AVERAGE", 12)]
    assert [(r.cf, r.pdp) for r in best_rras(rrd, 0, "MIN", T0 - 60)] == [("MIN", 12)]  # no 5 s MIN archive
    assert [(r.cf, r.pdp) for r in best_rras(rrd, 3600 // STEP, "MAX", T0 - 86400)] == [("MAX", 720)]
    assert [(r.cf, r.pdp) for r in best_rras(rrd, 0, "AVERAGE", T0 - 10 * 365 * 86400)] == [("AVERAGE", 17280)]
    with pytest.raises(NoRRA):
        best_rras(rrd, 0, "LAST", T0)


def test_updates_rows_run_newest_first_from_the_last_update_back_to_start() -> None:
    vm, host = vm_rrd(T0 + 7), host_rrd(T0 + 7)
    u = updates([("host:h:", host), ("vm:vm-a:", vm)], T0 - 60, 0, "AVERAGE")
    assert u.step == 5 and u.end == T0 + 5 and u.start == T0 - 55
    assert [t for t, _v in u.rows] == [T0 + 5 - 5 * i for i in range(14)]
    assert u.legend[:2] == ["AVERAGE:host:h:cpu0", "AVERAGE:host:h:cpu1"]
    assert "AVERAGE:vm:vm-a:vif_0_rx" in u.legend and "AVERAGE:vm:vm-a:vbd_xvda_write" in u.legend
    assert all(len(values) == len(u.legend) for _t, values in u.rows)
    # negative start: relative to the last update
    assert len(updates([("vm:vm-a:", vm)], -600, 0, None).rows) == 120
    minute = updates([("vm:vm-a:", vm)], T0 - 3600, 60, None)  # rows at or after start: both ends
    assert minute.step == 60 and len(minute.rows) == 61 and all(t % 60 == 0 for t, _v in minute.rows)
    assert {e.split(":")[0] for e in updates([("host:h:", host)], T0 - 3600, 60, None).legend} == {
        "AVERAGE", "MIN", "MAX"}
    with pytest.raises(NoRRA):
        updates([], T0, 0, None)


def test_xport_xml_and_json_carry_the_same_document() -> None:
    u = updates([("vm:vm-a:", vm_rrd())], T0 - 30, 0, None)
    root = ET.fromstring(xport_xml(u))
    assert root.tag == "xport"
    meta = root.find("meta")
    assert meta is not None
    assert [meta.findtext(k) for k in ("start", "step", "end", "rows", "columns")] == [
        str(u.start), "5", str(u.end), str(len(u.rows)), str(len(u.legend))]
    assert [e.text for e in meta.iter("entry")] == u.legend
    rows = root.findall("data/row")
    assert [int(r.findtext("t") or 0) for r in rows] == [t for t, _v in u.rows]
    assert [float(v.text or "") for v in rows[0].findall("v")] == pytest.approx(u.rows[0][1])
    doc = json.loads(xport_json(u))
    assert set(doc) == {"meta", "data"}
    assert doc["meta"]["legend"] == u.legend and doc["meta"]["rows"] == str(len(u.rows))
    assert doc["data"][0]["t"] == str(u.rows[0][0])
    assert doc["data"][0]["values"] == [v.text for v in rows[0].findall("v")]


def test_the_rrd_dump_has_every_archive_with_its_rows_oldest_first() -> None:
    rrd = host_rrd(T0)
    root = ET.fromstring(rrd_xml(rrd))
    assert root.findtext("version") == "0003" and root.findtext("step") == "5"
    assert root.findtext("lastupdate") == str(T0)
    names = [ds.findtext("name") for ds in root.findall("ds")]
    assert names == rrd.names
    cpu = root.find("ds")
    assert cpu is not None and [cpu.findtext(k) for k in ("type", "minimal_heartbeat", "min", "max")] == [
        "DERIVE", "300", "0.0", "1"]
    rras = root.findall("rra")
    assert [(r.findtext("cf"), r.findtext("pdp_per_row"), len(r.findall("database/row"))) for r in rras] == [
        (x.cf, str(x.pdp), x.rows) for x in rrd.rras]
    newest = rras[0].findall("database/row")[-1]
    assert [float(v.text or "") for v in newest.findall("v")] == pytest.approx(rrd.row(rrd.rras[0], 0)[1])
    assert all(len(r.findall("cdp_prep/ds")) == len(names) for r in rras)
    doc = json.loads(rrd_json(rrd))
    assert [d["name"] for d in doc["ds"]] == names and len(doc["rra"]) == 10
    assert len(doc["rra"][3]["database"]) == 120 and doc["rra"][0]["params"] == {"xff": "0.5"}


def test_a_vm_started_recently_has_nan_before_its_start() -> None:
    profile = VmProfile("vm-b", 1, GIB, GIB, (), (), float(T0 - 20), "h")
    rrd = RRD("vm-b", T0, Generator(1).vm_sources(profile), archives(False), lambda t: True, {},
              {"cpu0": T0 - 20, "cpu_usage": T0 - 20, "memory": T0 - 20})
    rows = updates([("vm:vm-b:", rrd)], T0 - 60, 0, None).rows
    cpu = [values[0] for _t, values in rows]
    assert not any(math.isnan(v) for v in cpu[:5]) and all(math.isnan(v) for v in cpu[5:])


@pytest.mark.parametrize(("accept", "query", "expected"), [
    ("", "start=0", False),
    ("", "start=0&json=true", True),
    ("", "json=false", True),  # xapi looks only at the parameter's presence
    ("*/*", "start=0", True),  # */* accepts both: the first of xapi's list, JSON
    ("text/xml", "json=true", False),
    ("application/json;q=0.5, text/xml", "", False),
    ("text/html", "json", True),  # nothing acceptable: the parameter decides
    ("garbage", "", False),
])
def test_json_or_xml_as_client_prefers_json_decides(accept: str, query: str, expected: bool) -> None:
    assert prefers_json(accept, query) is expected
