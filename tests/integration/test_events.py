"""event.from, event.inject and the legacy register/next (wire.md 6)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import xmlrpc.client
from typing import Any

import pytest
import XenAPI

from tests.conftest import REPO, Xapid


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def test_empty_token_replays_every_object_as_add(api: Any) -> None:
    batch = api.event_from(["*"], "", 1.0)
    assert set(batch) == {"events", "valid_ref_counts", "token"}
    adds = {(e["class"], e["ref"]) for e in batch["events"]}
    assert {e["operation"] for e in batch["events"]} == {"add"}
    assert ("pool", api.pool.get_all()[0]) in adds
    assert {("vm", r) for r in api.VM.get_all()} <= adds
    assert batch["valid_ref_counts"]["host"] == 3  # <i4>: a real int, unlike every other int
    assert batch["valid_ref_counts"]["vm"] == len(api.VM.get_all())
    first = batch["events"][0]
    assert first["timestamp"] == "0.0" and first["id"].isdigit()
    assert set(first["snapshot"]) == set(api.__getattr__(first["class"].upper() if first["class"] in
                                                          ("pbd", "sr", "vm", "sm", "pif", "vif", "vdi", "vbd")
                                                          else first["class"]).get_record(first["ref"]))
    token = batch["token"]
    assert len(token) == 41 and token[20] == ","


def test_changes_are_coalesced_in_order(api: Any) -> None:
    token = api.event_from(["*"], "", 0.0)["token"]
    pool = api.pool.get_all()[0]
    net = api.network.create({"name_label": "n1", "name_description": "", "MTU": "1500", "other_config": {},
                              "bridge": "xapi9"})
    api.network.set_name_label(net, "n1-renamed")
    gone = api.network.create({"name_label": "n2", "name_description": "", "MTU": "1500", "other_config": {},
                               "bridge": "xapi8"})
    api.network.destroy(gone)
    api.pool.set_name_label(pool, "renamed")
    events = api.event_from(["network", "pool"], token, 1.0)["events"]
    summary = [(e["class"], e["ref"], e["operation"]) for e in events]
    # Created then renamed: one add with the latest snapshot; created then destroyed: nothing.
    assert summary == [("network", net, "add"), ("pool", pool, "mod")]
    assert events[0]["snapshot"]["name_label"] == "n1-renamed"
    token = api.event_from(["*"], token, 0.0)["token"]
    api.network.destroy(net)
    events = api.event_from(["network"], token, 1.0)["events"]
    assert [(e["operation"], "snapshot" in e) for e in events] == [("del", False)]


def test_class_and_object_filters(api: Any) -> None:
    token = api.event_from(["*"], "", 0.0)["token"]
    hosts = api.host.get_all()
    api.host.set_name_description(hosts[0], "a")
    api.host.set_name_description(hosts[1], "b")
    api.pool.set_name_description(api.pool.get_all()[0], "c")
    only_one = api.event_from([f"host/{hosts[1]}"], token, 1.0)["events"]
    assert [e["ref"] for e in only_one] == [hosts[1]]
    hosts_only = api.event_from(["HOST", "no_such_class"], token, 1.0)["events"]
    assert [e["ref"] for e in hosts_only] == hosts[:2]


def test_timeout_is_honoured_and_bad_token_refused(api: Any) -> None:
    token = api.event_from(["*"], "", 0.0)["token"]
    start = time.monotonic()
    batch = api.event_from(["vm"], token, 0.6)
    assert batch["events"] == [] and 0.5 < time.monotonic() - start < 3
    assert failure(api.event_from, ["*"], "garbage", 0.1) == ["EVENT_FROM_TOKEN_PARSE_FAILURE", "garbage"]


def test_waiting_clients_wake_on_a_write(xapid: Xapid, api: Any) -> None:
    """50 clients block in event.from; one write wakes all of them within a bounded delay."""
    token = api.event_from(["*"], "", 0.0)["token"]
    pool = api.pool.get_all()[0]
    results: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(51)

    def waiter() -> None:
        s = xapid.session()
        ready.wait()
        batch = s.xenapi.event_from(["pool"], token, 30.0)
        with lock:
            results.append(time.monotonic())
        assert [e["ref"] for e in batch["events"]] == [pool]
        s.xenapi.session.logout()

    threads = [threading.Thread(target=waiter) for _ in range(50)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.5)
    written = time.monotonic()
    api.pool.set_name_label(pool, "wake up")
    for t in threads:
        t.join(30)
    assert len(results) == 50
    assert max(results) - written < 5.0


def test_logout_wakes_a_blocked_call_with_session_invalid(xapid: Xapid) -> None:
    s = xapid.session()
    ref = s._session
    token = s.xenapi.event_from(["*"], "", 0.0)["token"]
    proxy = xmlrpc.client.ServerProxy(xapid.url)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(r=proxy.event.__getattr__("from")(ref, ["vm"], token, 30.0)))
    t.start()
    time.sleep(0.5)
    s.xenapi.session.logout()
    t.join(10)
    assert out["r"] == {"Status": "Failure", "ErrorDescription": ["SESSION_INVALID", ref]}


def test_inject_gives_a_token_before_a_mod(api: Any) -> None:
    pool = api.pool.get_all()[0]
    token = api.event.inject("pool", pool)
    events = api.event_from(["pool"], token, 1.0)["events"]
    assert [(e["class"], e["operation"], e["ref"]) for e in events] == [("pool", "mod", pool)]
    assert failure(api.event.inject, "pool", "OpaqueRef:nope") == ["HANDLE_INVALID", "pool", "OpaqueRef:nope"]


def test_derived_set_changes_produce_a_mod_of_the_parent(api: Any) -> None:
    """Creating a PBD changes SR.PBDs and host.PBDs: both get a mod event."""
    master = api.pool.get_master(api.pool.get_all()[0])
    sr = api.SR.introduce("5a1d0c3e-0000-4000-8000-000000000001", "intro", "", "nfs", "user", True, {})
    token = api.event_from(["*"], "", 0.0)["token"]
    pbd = api.PBD.create({"host": master, "SR": sr, "device_config": {}, "other_config": {}})
    events = {(e["class"], e["ref"], e["operation"]) for e in api.event_from(["*"], token, 1.0)["events"]}
    assert {("pbd", pbd, "add"), ("sr", sr, "mod"), ("host", master, "mod")} <= events


def test_ha_writes_produce_events(xapid: Xapid, api: Any) -> None:
    token = api.event_from(["*"], "", 0.0)["token"]
    api.pool.enable_ha([], {"timeout": "10"})
    events = api.event_from(["pool"], token, 1.0)["events"]
    assert events[-1]["snapshot"]["ha_enabled"] is True
    token = api.event_from(["*"], token, 0.0)["token"]
    victim = api.host.get_all()[2]
    from tests.integration.ha.conftest import kill_heartbeat

    kill_heartbeat(xapid, api.host.get_uuid(victim))
    metrics = api.host.get_metrics(victim)
    deadline = time.monotonic() + 20
    seen = False
    while time.monotonic() < deadline and not seen:
        batch = api.event_from(["host_metrics"], token, 5.0)
        token = batch["token"]
        seen = any(e["ref"] == metrics and e["snapshot"]["live"] is False for e in batch["events"])
    assert seen
    api.pool.disable_ha()
    events = api.event_from(["pool"], token, 1.0)["events"]
    assert events[-1]["snapshot"]["ha_enabled"] is False


def test_legacy_register_next(api: Any) -> None:
    assert failure(api.event.next)[0] == "SESSION_NOT_REGISTERED"
    api.event.register(["vm"])
    vm = api.VM.get_all()[0]
    api.VM.set_name_description(vm, "legacy")
    api.pool.set_name_description(api.pool.get_all()[0], "not subscribed")
    events = api.event.next()
    assert [(e["class"], e["ref"], e["operation"]) for e in events] == [("vm", vm, "mod")]
    assert float(events[0]["timestamp"]) > 0
    api.event.unregister(["vm"])
    assert isinstance(api.event.get_current_id(), str)


def test_example_client_prints_ha_changes(xapid: Xapid, api: Any) -> None:
    proc = subprocess.Popen([sys.executable, str(REPO / "examples" / "ha_watch.py"), xapid.url, "root",
                             xapid.password, "--seconds", "6"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        api.pool.enable_ha([], {"timeout": "10"})
        api.pool.disable_ha()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "ha_enabled=True" in out and "ha_enabled=False" in out


def test_stopping_answers_blocked_event_calls_at_once(xapid: Xapid, api: Any) -> None:
    """A client blocked in event.from (the console, Xen Orchestra) does not hold a SIGTERM for its timeout."""
    token = api.event_from(["pool"], "", 0.0)["token"]
    answers: list[Any] = []
    blocked = threading.Thread(target=lambda: answers.append(api.event_from(["pool"], token, 60.0)), daemon=True)
    blocked.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert xapid.stop() == 0
    took = time.monotonic() - started
    blocked.join(5)
    assert took < 10, f"stopping took {took:.1f} s"
    assert answers and answers[0]["events"] == []
