"""Performance statistics over HTTP in xcp-rrdd's formats: ``/rrd_updates``, ``/host_rrd``, ``/vm_rrd``.

The numbers come from the emulated metrics (:mod:`xapid.hw.metrics`); this module is the wire side:

* ``GET /rrd_updates?start=&cf=&interval=&host=true&vm_uuid=...&json`` (``rrdd_http_handler.ml``,
  ``Rrd_updates.export``): rrdtool's ``xport`` document, XML or JSON.  ``start`` is required (else
  400) and may be negative (relative to the last update); ``interval`` picks the archive (the first,
  in xapi's order, whose step is at least ``interval`` and which still holds ``start``); ``cf``
  (AVERAGE, MIN, MAX) restricts the archives, without it every CF of that step is a column.  Columns
  are ``<CF>:host:<uuid>:<name>`` (with ``host=true``) and ``<CF>:vm:<uuid>:<name>`` for every VM
  (or only those named by repeated ``vm_uuid``), rows newest first.  JSON when the ``Accept``
  header prefers ``application/json`` to ``text/xml`` (``*/*`` does, as in xapi), or without a
  usable Accept header when a ``json`` parameter is present (any value).
* ``GET /host_rrd`` and ``GET /vm_rrd?uuid=`` (``Rrd.xml_to_output`` / ``Rrd.Json``): the whole
  RRD: data sources, every archive with its rows oldest first.  ``/vm_rrd`` of an unknown or halted
  VM is 404, without ``uuid`` 400.

Which host answers: the one whose own address received the request (``Request.endpoint``) answers
as its rrdd (its columns, its VMs); the pool address answers for the master (``host=true`` gives
the master's columns) and, unlike one real xapi host, for the running VMs of every host that is
powered on (every host is behind this one address).  ``/vm_rrd`` answers for any running VM
(xapi would redirect to its host).  A host that is not powered on has no statistics: its VMs'
columns disappear and their RRDs stop at the moment it went down.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from xapid.handlers.access import Access, bad_request, internal_error, not_found, route
from xapid.hw.metrics import MRHB, RRA, RRD, STEP
from xapid.server import Response

if TYPE_CHECKING:
    from xapid.daemon import Daemon
    from xapid.server import Route

XML_DECL = '<?xml version="1.0" encoding="UTF-8"?>'
MIME_JSON = "application/json"
MIME_XML = "text/xml"
CFS = ("AVERAGE", "MIN", "MAX", "LAST")


class NoRRA(Exception):
    """``Rrd.No_RRA_Available``: no archive answers the request."""


def f_to_s(x: float) -> str:
    """xapi-rrd's ``Utils.f_to_s``: ``%0.15g``, ``0.0`` for zero, ``NaN``, ``Infinity``, ``-Infinity``."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "0.0"
    return "%0.15g" % x


# -- xport (rrd_updates.ml) -----------------------------------------------------------------------


@dataclass
class Updates:
    start: int
    step: int
    end: int
    legend: list[str]
    rows: list[tuple[int, list[float]]]


def best_rras(rrd: RRD, pdp_interval: int, cf: str | None, start: int) -> list[RRA]:
    """``Rrd.find_best_rras``: the archives (same step and size) that hold ``start`` at ``pdp_interval``."""
    rras = [r for r in rrd.rras if cf is None or r.cf == cf]
    if not rras:
        raise NoRRA
    last_pdp = rrd.last_updated // STEP * STEP

    def holds(t: int, rra: RRA) -> bool:
        return rra.pdp >= pdp_interval and t > last_pdp - STEP * rra.rows * rra.pdp

    first = next((r for r in rras if holds(start, r)), None)
    if first is not None:
        return [r for r in rras if r.rows == first.rows and r.pdp == first.pdp]
    last = rras[-1]
    newstart = 1 + last_pdp - STEP * last.rows * last.pdp
    return [r for r in rras if holds(newstart, r)]


def updates(objects: list[tuple[str, RRD]], start: int, interval: int, cf: str | None) -> Updates:
    """``Rrd_updates.create_multi``: the rows since ``start`` of every ``(prefix, rrd)``, one archive step."""
    if not objects:
        raise NoRRA
    last_updated = objects[0][1].last_updated
    pdp_interval = interval // STEP
    if start < 0:
        start = min(start + rrd.last_updated for _p, rrd in objects)
    chosen = [best_rras(rrd, pdp_interval, cf, start) for _p, rrd in objects]
    first = next((r[0] for r in chosen if r), None)
    if first is None:
        raise NoRRA
    chosen = [[r for r in rras if r.pdp == first.pdp and r.rows == first.rows] for rras in chosen]
    legend = [f"{rra.cf}:{prefix}{name}" for (prefix, rrd), rras in zip(objects, chosen, strict=True)
              for rra in rras for name in rrd.names]
    span = STEP * first.pdp
    last_cdp = last_updated // span * span
    first_cdp = start // span * span + span
    rows: list[tuple[int, list[float]]] = []
    i = 0
    while i < first.rows:
        t = last_cdp - i * span
        if t < start:
            break
        values: list[float] = []
        for (_prefix, rrd), rras in zip(objects, chosen, strict=True):
            for rra in rras:
                values.extend(rrd.cdp(src, rra, t) for src in rrd.sources)
        rows.append((t, values))
        i += 1
    return Updates(first_cdp, span, last_cdp, legend, rows)


def xport_xml(u: Updates) -> bytes:
    """``Rrd_updates.xml_of``."""
    out = [XML_DECL, "<xport><meta>", f"<start>{u.start}</start><step>{u.step}</step><end>{u.end}</end>",
           f"<rows>{len(u.rows)}</rows><columns>{len(u.legend)}</columns><legend>"]
    out.extend(f"<entry>{escape(e)}</entry>" for e in u.legend)
    out.append("</legend></meta><data>")
    for t, values in u.rows:
        out.append(f"<row><t>{t}</t>")
        out.extend(f"<v>{f_to_s(v)}</v>" for v in values)
        out.append("</row>")
    out.append("</data></xport>")
    return "".join(out).encode()


def xport_json(u: Updates) -> bytes:
    """``Rrd_updates.json_of_t``: the same structure, every scalar a string (xapi-rrd's ``Json``)."""
    doc = {
        "meta": {"start": str(u.start), "step": str(u.step), "end": str(u.end), "rows": str(len(u.rows)),
                 "columns": str(len(u.legend)), "legend": u.legend},
        "data": [{"t": str(t), "values": [f_to_s(v) for v in values]} for t, values in u.rows],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


# -- RRD dumps (rrd.ml xml_to_output, Json) ---------------------------------------------------------------


def _columns(rrd: RRD, rra: RRA) -> Iterable[tuple[int, list[float]]]:
    """Every row of ``rra``, oldest first."""
    for i in range(rra.rows - 1, -1, -1):
        yield rrd.row(rra, i)


def rrd_xml(rrd: RRD) -> bytes:
    out = [XML_DECL, "<rrd><version>0003</version>", f"<step>{STEP}</step><lastupdate>{rrd.last_updated}</lastupdate>"]
    latest = {s.ds.name: rrd.cdp(s, rrd.rras[0], rrd.last_cdp(rrd.rras[0])) for s in rrd.sources}
    for s in rrd.sources:
        ds = s.ds
        v = f_to_s(latest[ds.name])
        out.append(f"<ds><name>{escape(ds.name)}</name><type>{ds.type}</type>"
                   f"<minimal_heartbeat>{f_to_s(MRHB)}</minimal_heartbeat><min>{f_to_s(ds.min)}</min>"
                   f"<max>{f_to_s(ds.max)}</max><last_ds>{v}</last_ds><value>{v}</value>"
                   f"<unknown_sec>0</unknown_sec></ds>")
    for rra in rrd.rras:
        out.append(f"<rra><cf>{rra.cf}</cf><pdp_per_row>{rra.pdp}</pdp_per_row><params><xff>{f_to_s(rra.xff)}"
                   "</xff></params><cdp_prep>")
        out.extend("<ds><primary_value>0.0</primary_value><secondary_value>0.0</secondary_value>"
                   "<value>0.0</value><unknown_datapoints>0</unknown_datapoints></ds>" for _s in rrd.sources)
        out.append("</cdp_prep><database>")
        for _t, values in _columns(rrd, rra):
            out.append("<row>" + "".join(f"<v>{f_to_s(v)}</v>" for v in values) + "</row>")
        out.append("</database></rra>")
    out.append("</rrd>")
    return "".join(out).encode()


def rrd_json(rrd: RRD) -> bytes:
    latest = {s.ds.name: rrd.cdp(s, rrd.rras[0], rrd.last_cdp(rrd.rras[0])) for s in rrd.sources}
    doc = {
        "version": "0003", "step": str(STEP), "lastupdate": f_to_s(float(rrd.last_updated)),
        "ds": [{"name": s.ds.name, "type": s.ds.type, "minimal_heartbeat": f_to_s(MRHB), "min": f_to_s(s.ds.min),
                "max": f_to_s(s.ds.max), "last_ds": f_to_s(latest[s.ds.name]), "value": f_to_s(latest[s.ds.name]),
                "unknown_sec": "0.0", "last_updated": f_to_s(float(rrd.last_updated))} for s in rrd.sources],
        "rra": [{"cf": rra.cf, "pdp_per_row": str(rra.pdp), "params": {"xff": f_to_s(rra.xff)},
                 "cdp_prep": {"ds": [{"primary_value": "0.0", "secondary_value": "0.0", "value": "0.0",
                                      "unknown_datapoints": "0"} for _s in rrd.sources]},
                 "database": [[f_to_s(v) for v in values] for _t, values in _columns(rrd, rra)]}
                for rra in rrd.rras],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


# -- content negotiation (rrdd_http_handler.ml client_prefers_json, Http.Accept) ---------------------------


def _accept(header: str) -> list[tuple[int, str | None, str | None]] | None:
    """Parsed ``Accept`` entries (q in thousandths, type, subtype; None for ``*``), None if malformed."""
    out = []
    for item in header.split(","):
        item = item.strip()
        if not item:
            continue
        ty_subty, *params = [p.strip() for p in item.split(";")]
        ty, sep, subty = ty_subty.partition("/")
        if not sep or not ty or not subty:
            return None
        q = 1000
        for p in params:
            k, _, v = p.partition("=")
            if k.strip() == "q":
                try:
                    q = round(float(v) * 1000)
                except ValueError:
                    return None
        if ty == "*":
            out.append((q, None, None))
        else:
            out.append((q, ty, None if subty == "*" else subty))
    return out


def prefers_json(accept: str, query: str) -> bool:
    """``client_prefers_json``: the Accept header's choice between JSON and XML (``*/*`` picks JSON,
    the first of xapi's list), else whether the query has a ``json`` parameter."""
    accepted = _accept(accept) if accept else None
    if accepted:
        for q in sorted({q for q, _t, _s in accepted}, reverse=True):
            best = [(t, s) for qq, t, s in accepted if qq == q]
            for mime in (MIME_JSON, MIME_XML):
                ty, subty = mime.split("/")
                if any(t is None or (t == ty and (s is None or s == subty)) for t, s in best):
                    return mime == MIME_JSON
    return "json" in parse_qs(query, keep_blank_values=True)


def _json(access: Access) -> bool:
    return prefers_json(access.request.header("accept"), access.request.query)


# -- the handlers ----------------------------------------------------------------------------------------


def served_host(access: Access) -> str:
    """The host whose statistics this request reads (its endpoint's, else the master)."""
    endpoint = getattr(access.request, "endpoint", None)
    return str(endpoint) if endpoint else access.daemon.master_ref()


def served_vms(daemon: Daemon, host: str, pool_address: bool) -> list[tuple[str, str]]:
    """(uuid, ref) of the running VMs whose statistics are served, by uuid."""
    metrics = daemon.metrics
    hosts = [ref for ref, rec in daemon.store.items("host")
             if daemon.hw.is_running(rec["uuid"])] if pool_address else [host]
    out = []
    for h in hosts:
        for ref in metrics.resident_vms(h):
            rec = daemon.store.get("VM", ref)
            if rec is not None:
                out.append((rec["uuid"], ref))
    return sorted(out)


def _answer(body: bytes, as_json: bool, close: bool = False) -> Response:
    return Response(200, body, MIME_JSON if as_json else MIME_XML, close=close)


def rrd_updates(access: Access) -> Response:
    daemon = access.daemon
    query = parse_qs(access.request.query, keep_blank_values=True)
    try:
        start = int(query["start"][0])
    except KeyError:
        return bad_request("get_rrd_updates: missing the 'start' parameter")
    except ValueError:
        return bad_request("get_rrd_updates: 'start' must be an integer")
    try:
        interval = int((query.get("interval") or ["0"])[0])
    except ValueError:
        interval = 0  # as xapi: an unreadable interval is 0
    cf_text = (query.get("cf") or [""])[0].upper()
    cf = cf_text if cf_text in CFS else None  # as xapi: an unknown CF means every CF
    host = served_host(access)
    pool_address = getattr(access.request, "endpoint", None) is None
    objects: list[tuple[str, RRD]] = []
    host_rec = daemon.store.get("host", host)
    if (query.get("host") or [""])[0] == "true" and host_rec is not None and daemon.hw.is_running(host_rec["uuid"]):
        rrd = daemon.metrics.host_rrd(host)
        if rrd is not None:
            objects.append((f"host:{host_rec['uuid']}:", rrd))
    wanted = set(query.get("vm_uuid", ()))
    for uuid, ref in served_vms(daemon, host, pool_address):
        if wanted and uuid not in wanted:
            continue
        rrd = daemon.metrics.vm_rrd(ref)
        if rrd is not None:
            objects.append((f"vm:{uuid}:", rrd))
    try:
        result = updates(objects, start, interval, cf)
    except NoRRA:
        return internal_error("Rrd.No_RRA_Available")
    as_json = _json(access)
    return _answer(xport_json(result) if as_json else xport_xml(result), as_json)


def host_rrd(access: Access) -> Response:
    rrd = access.daemon.metrics.host_rrd(served_host(access))
    if rrd is None:
        return not_found()
    as_json = _json(access)
    return _answer(rrd_json(rrd) if as_json else rrd_xml(rrd), as_json, close=True)


def vm_rrd(access: Access) -> Response:
    uuid = access.param("uuid")
    if not uuid:
        return bad_request("get_vm_rrd: missing the 'uuid' parameter")
    daemon = access.daemon
    ref = daemon.store.by_uuid("VM", uuid)
    rrd = daemon.metrics.vm_rrd(ref) if ref is not None else None
    if rrd is None:
        return not_found()
    as_json = _json(access)
    return _answer(rrd_json(rrd) if as_json else rrd_xml(rrd), as_json, close=True)


def routes() -> list[Route]:
    """The statistics routes (and xapi's older plural aliases of the dumps)."""
    return [
        route("get_rrd_updates", rrd_updates),
        route("get_host_rrd", host_rrd),
        route("get_host_rrds", host_rrd),
        route("get_vm_rrd", vm_rrd),
        route("get_vm_rrds", vm_rrd),
    ]
