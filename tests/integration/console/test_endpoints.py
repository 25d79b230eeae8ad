"""The console's HTTP surface without a browser: pages, static files, CSP, the hardware feed, faults over TCP."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests

from tests.conftest import Xapid
from tests.integration.console.conftest import add_user, fault, hardware, host_uuids, login, watchdog
from tests.integration.ha.conftest import wait_for
from xapid.console import CSP
from xapid.hw.faults import FaultClient


def test_root_is_a_page_linking_to_the_console(xapid: Xapid) -> None:
    r = requests.get(xapid.url, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert 'href="/console"' in r.text
    assert r.headers["Content-Security-Policy"] == CSP


def test_console_and_its_files_have_their_content_types_and_a_strict_csp(xapid: Xapid) -> None:
    for path in ("console", "console/"):
        page = requests.get(xapid.url + path, timeout=10)
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert '<script type="module" src="/console/static/js/main.js">' in page.text
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    types = {"console/static/js/main.js": "text/javascript; charset=utf-8",
             "console/static/js/xapi.js": "text/javascript; charset=utf-8",
             "console/static/console.css": "text/css; charset=utf-8",
             "console/static/favicon.svg": "image/svg+xml"}
    for path, ctype in types.items():
        r = requests.get(xapid.url + path, timeout=10)
        assert (r.status_code, r.headers["content-type"]) == (200, ctype), path
        assert r.headers["Content-Security-Policy"] == CSP


def test_nothing_outside_the_static_folder_is_served(xapid: Xapid) -> None:
    for path in ("console/static/../__init__.py", "console/static/%2e%2e/__init__.py", "console/static/js/",
                 "console/static/nope.js", "console/feed.py", "xapid/fault", "console/static/js/main.js/x"):
        r = requests.get(xapid.url + path, timeout=10)
        assert r.status_code == 404, path
        assert "HardwareFeed" not in r.text


def test_hardware_needs_a_valid_session(xapid: Xapid) -> None:
    for session in (None, "", "OpaqueRef:00000000-0000-0000-0000-000000000000"):
        r = hardware(xapid, session)
        assert r.status_code == 401
        assert r.json()["code"] == "SESSION_INVALID"
    assert hardware(xapid, login(xapid), timeout="soon").status_code == 400
    assert hardware(xapid, login(xapid), timeout="-1").status_code == 400


def test_hardware_shows_each_host_and_who_is_asking(xapid: Xapid) -> None:
    uuids = host_uuids(xapid)
    doc = hardware(xapid, login(xapid)).json()
    assert doc["ok"] and doc["reset"] and doc["log"] == []
    assert (doc["user"], doc["role"]) == ("root", "pool-admin")
    assert set(doc["hosts"]) == set(uuids.values())
    assert doc["hosts"][uuids["host2"]] == {"power": "on", "last_stop_reason": "", "last_stop_clean": True,
                                           "network": "0", "statefile": "ok", "armed": False}
    assert {"xhad", "melio"} <= set(doc["cluster_stacks"])
    assert doc["felt_faults"] is None  # HA off: every fault is allowed
    # The session may also come as xapi's HTTP handlers take it (the console itself never does this).
    by_query = requests.get(xapid.url + "console/api/hardware", params={"session_id": login(xapid)}, timeout=10)
    assert by_query.status_code == 200 and by_query.json()["hosts"] == doc["hosts"]


def test_a_long_poll_wakes_on_a_fault_with_the_fault_and_the_power_change(xapid: Xapid) -> None:
    session = login(xapid)
    uuids = host_uuids(xapid)
    token = hardware(xapid, session).json()["token"]
    answers: list[dict[str, Any]] = []
    started = time.monotonic()
    poll = threading.Thread(target=lambda: answers.append(hardware(xapid, session, since=token, timeout=30).json()))
    poll.start()
    time.sleep(0.5)
    assert not answers  # nothing happened: it blocks
    FaultClient(xapid.state_dir).crash("host3")  # the Unix-socket form, as `xapid fault` sends it
    poll.join(10)
    assert answers and time.monotonic() - started < 10
    doc = answers[0]
    assert not doc["reset"] and doc["hosts"][uuids["host3"]]["power"] == "off"
    assert doc["hosts"][uuids["host3"]]["last_stop_reason"] == "xapid fault crash"
    kinds = [(e["kind"], e.get("verb") or e.get("new")) for e in doc["log"]]
    assert kinds == [("power", "off")] or kinds == [("power", "off"), ("fault", "crash")]
    everything = hardware(xapid, session, since=token).json()["log"]
    power, crash = everything
    assert (power["host"], power["old"], power["new"], power["reason"], power["clean"]) == (
        uuids["host3"], "on", "off", "xapid fault crash", False)
    assert (crash["verb"], crash["hosts"], crash["origin"]) == ("crash", ["host3"], "xapid fault")
    assert crash["time"] <= power["time"]  # the fault is timed from its start: it comes first
    # A token of another boot (or none) gives everything again, flagged as a reset.
    stale = hardware(xapid, session, since="feedbeef:1", timeout=30).json()
    assert stale["reset"] and [e["seq"] for e in stale["log"]] == [power["seq"], crash["seq"]]


def test_fences_are_shown_with_their_reason(xapid_factory: Any) -> None:
    d = xapid_factory(**{"fence-reboot-delay": "0.5"})
    session = login(d)
    host2 = host_uuids(d)["host2"]
    token = hardware(d, session).json()["token"]
    watchdog(d, host2, "fence lost the statefile and the network")

    def fenced_then_booted() -> list[dict[str, Any]]:
        log = hardware(d, session, since=token).json()["log"]
        return log if [e["new"] for e in log] == ["fenced", "on"] else []

    log = wait_for(fenced_then_booted, timeout=10, what="the fence and the reboot")
    reason = "the cluster stack asked its watchdog to fence: lost the statefile and the network"
    assert log[0]["reason"] == reason and not log[0]["clean"]
    assert log[1]["reason"] == "boot"
    assert hardware(d, session).json()["hosts"][host2]["last_stop_reason"] == reason


def test_faults_over_tcp_need_a_pool_admin_session(xapid: Xapid) -> None:
    uuids = host_uuids(xapid)
    add_user(xapid, "viewer", "viewer-pw", "read-only")
    viewer = login(xapid, "viewer", "viewer-pw")
    refused = fault(xapid, viewer, {"verb": "crash", "hosts": ["host2"]})
    assert refused.status_code == 403
    assert refused.json()["code"] == "RBAC_PERMISSION_DENIED" and not refused.json()["ok"]
    assert fault(xapid, None, {"verb": "crash", "hosts": ["host2"]}).status_code == 401
    assert fault(xapid, "OpaqueRef:nope", {"verb": "crash", "hosts": ["host2"]}).status_code == 401
    assert "power=on" in FaultClient(xapid.state_dir).status()[1]  # nothing changed
    root = login(xapid)
    done = fault(xapid, root, {"verb": "crash", "hosts": [uuids["host2"]], "origin": "spoofed"})
    assert done.status_code == 200 and done.json() == {"ok": True, "lines": ["host2: on -> off"]}
    assert hardware(xapid, root).json()["log"][-1]["origin"] == "http:root"
    # The same service and its errors, as `xapid fault` would print them.
    assert fault(xapid, root, {"verb": "explode", "hosts": ["host1"]}).json()["error"].startswith("unknown fault")
    assert fault(xapid, root, b"{not json").json()["error"].startswith("malformed request")
    assert fault(xapid, root, {"verb": "boot", "hosts": ["host2"]}).json()["lines"] == ["host2: off -> on"]
    # The XML-RPC and JSON-RPC endpoints are untouched.
    assert xapid.session().xenapi.host.get_all()


def test_a_viewer_reads_the_feed_and_its_long_poll_does_not_hold_a_stop(
        xapid: Xapid) -> None:
    add_user(xapid, "viewer", "viewer-pw", "read-only")
    viewer = login(xapid, "viewer", "viewer-pw")
    doc = hardware(xapid, viewer).json()
    assert (doc["user"], doc["role"]) == ("viewer", "read-only")
    outcome: list[object] = []

    def long_poll() -> None:
        try:
            outcome.append(hardware(xapid, viewer, since=doc["token"], timeout=60).status_code)
        except requests.ConnectionError as e:  # the stop closed the parked poll: a browser polls again
            outcome.append(e)

    poll = threading.Thread(target=long_poll, daemon=True)
    poll.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert xapid.stop() == 0
    assert time.monotonic() - started < 10
    poll.join(10)
    assert len(outcome) == 1  # the poll ended with the daemon, answered or cut
