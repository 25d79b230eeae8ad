"""32 clients doing mixed reads and writes while others enable and disable HA.

Promises checked: no call blocks for more than a minute (a watchdog thread fails the test);
every HA enable/disable either succeeds or is refused with HA_IS_ENABLED, HA_NOT_ENABLED,
HA_ENABLE_IN_PROGRESS or HA_DISABLE_IN_PROGRESS; ``pool.current_operations`` never shows two
HA operations at once; clients only ever get the errors their operation can legitimately
produce; every acknowledged write is visible at the end; the database invariants hold and HA
is either fully enabled (3 heartbeats) or fully disabled (none).
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import XenAPI

from tests.conftest import Xapid
from tests.integration.ha.conftest import running_heartbeats
from tests.integration.hardening.conftest import armed_hosts, clean_log, invariants
from xapid.schema import Schema

CLIENTS = 32
HA_THREADS = 3
WATCHDOG_LIMIT = 60.0
HA_REFUSALS = {"HA_IS_ENABLED", "HA_NOT_ENABLED", "HA_ENABLE_IN_PROGRESS", "HA_DISABLE_IN_PROGRESS"}


@dataclass
class Shared:
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    inflight: dict[str, tuple[str, float]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)
    max_ops: int = 0
    samples: int = 0

    def call(self, who: str, method: str, fn: Callable[..., Any], *args: Any, allowed: frozenset[str] = frozenset(),
             ) -> tuple[bool, Any]:
        """Run one SDK call under the watchdog; (True, value) or (False, error code)."""
        with self.lock:
            self.inflight[who] = (method, time.monotonic())
        try:
            value = fn(*args)
            ok, result = True, value
            code = "Success"
        except XenAPI.Failure as e:
            ok, result = False, e.details[0]
            code = e.details[0]
            if code not in allowed:
                with self.lock:
                    self.unexpected.append(f"{who} {method}: {e.details}")
        finally:
            with self.lock:
                self.inflight.pop(who, None)
        with self.lock:
            self.calls[method] += 1
            self.outcomes[code] += 1
        return ok, result


def client_loop(x: Xapid, sh: Shared, who: str, vm_template: dict[str, Any], sr: str, host: str,
                acked: dict[str, str], seed: int) -> None:
    rng = random.Random(seed)
    s = x.session()
    api = s.xenapi
    mine: list[str] = []
    vdis: list[str] = []
    n = 0
    try:
        while not sh.stop.is_set():
            n += 1
            op = rng.random()
            if op < 0.40:  # reads
                what = rng.choice(["pool", "host", "SR", "VM", "PBD"])
                sh.call(who, f"{what}.get_all_records", getattr(api, what).get_all_records)
            elif op < 0.50:
                sh.call(who, "VM.get_all_records_where", api.VM.get_all_records_where,
                        'field "is_control_domain" = "false"')
            elif op < 0.60 or not mine:
                ok, vm = sh.call(who, "VM.create", api.VM.create, dict(vm_template, name_label=f"{who}-{n}"))
                if ok:
                    mine.append(vm)
                    acked[vm] = f"{who}-{n}"
            elif op < 0.72:
                vm = rng.choice(mine)
                label = f"{who}-{n}-renamed"
                ok, _ = sh.call(who, "VM.set_name_label", api.VM.set_name_label, vm, label)
                if ok:
                    acked[vm] = label
            elif op < 0.78:
                vm = rng.choice(mine)
                sh.call(who, "VM.add_to_other_config", api.VM.add_to_other_config, vm, f"k{n}", "v",
                        allowed=frozenset({"MAP_DUPLICATE_KEY"}))
            elif op < 0.84:
                vm = rng.choice(mine)
                ok, state = sh.call(who, "VM.get_power_state", api.VM.get_power_state, vm)
                if ok and state == "Halted":
                    sh.call(who, "VM.start", api.VM.start, vm, False, False,
                            allowed=frozenset({"HOST_OFFLINE", "NO_HOSTS_AVAILABLE"}))
                elif ok:
                    sh.call(who, "VM.hard_shutdown", api.VM.hard_shutdown, vm)
            elif op < 0.90:
                ok, vdi = sh.call(who, "VDI.create", api.VDI.create, {
                    "SR": sr, "virtual_size": str(1 << 20), "type": "user", "sharable": False, "read_only": False,
                    "other_config": {}, "name_label": f"{who}-vdi-{n}"})
                if ok:
                    vdis.append(vdi)
            elif op < 0.95 and vdis:
                sh.call(who, "VDI.destroy", api.VDI.destroy, vdis.pop())
            elif len(mine) > 1:
                vm = mine.pop(0)
                ok, state = sh.call(who, "VM.get_power_state", api.VM.get_power_state, vm)
                if ok and state != "Halted":
                    sh.call(who, "VM.hard_shutdown", api.VM.hard_shutdown, vm)
                ok, _ = sh.call(who, "VM.destroy", api.VM.destroy, vm)
                if ok:
                    acked.pop(vm, None)
    finally:
        s.xenapi.session.logout()


def ha_loop(x: Xapid, sh: Shared, who: str, pool: str, seed: int, record: list[str]) -> None:
    rng = random.Random(seed)
    s = x.session()
    api = s.xenapi
    try:
        while not sh.stop.is_set():
            if rng.random() < 0.5:
                ok, code = sh.call(who, "pool.enable_ha", api.pool.enable_ha, [], {"timeout": "10"},
                                   allowed=frozenset(HA_REFUSALS))
                record.append("enable" if ok else code)
            else:
                ok, code = sh.call(who, "pool.disable_ha", api.pool.disable_ha, allowed=frozenset(HA_REFUSALS))
                record.append("disable" if ok else code)
            time.sleep(rng.random() * 0.3)
    finally:
        s.xenapi.session.logout()


def sampler(x: Xapid, sh: Shared, pool: str) -> None:
    s = x.session()
    try:
        while not sh.stop.is_set():
            ops = sh.call("sampler", "pool.get_current_operations", s.xenapi.pool.get_current_operations, pool)[1]
            with sh.lock:
                sh.samples += 1
                sh.max_ops = max(sh.max_ops, len(ops))
                if len(ops) > 1 or not set(ops.values()) <= {"ha_enable", "ha_disable"}:
                    sh.alarms.append(f"pool.current_operations held {ops}")
            time.sleep(0.02)
    finally:
        s.xenapi.session.logout()


def watchdog(sh: Shared, done: threading.Event) -> None:
    while not done.wait(0.5):
        now = time.monotonic()
        with sh.lock:
            for who, (method, started) in sh.inflight.items():
                if now - started > WATCHDOG_LIMIT:
                    sh.alarms.append(f"{who} blocked in {method} for {now - started:.0f} s")
        if sh.alarms:
            sh.stop.set()


@pytest.fixture
def socket_timeout() -> Iterator[None]:
    """No SDK call may hang the test for ever, even if the daemon deadlocks."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(WATCHDOG_LIMIT + 30)
    yield
    socket.setdefaulttimeout(old)


@pytest.mark.parametrize("seconds", [10, pytest.param(60, marks=pytest.mark.slow)])
def test_mixed_load_with_ha_toggling(xapid_factory: Callable[..., Xapid], socket_timeout: None, schema: Schema,
                                     vm_args: Callable[..., dict[str, Any]], seconds: int) -> None:
    x = xapid_factory()
    s = x.session()
    api = s.xenapi
    pool = api.pool.get_all()[0]
    sr = api.pool.get_default_SR(pool)
    host = api.host.get_all()[0]
    template = vm_args("load")
    sh = Shared()
    acked: dict[str, str] = {}
    ha_record: list[str] = []
    threads = [threading.Thread(target=client_loop, args=(x, sh, f"c{i}", template, sr, host, acked, i),
                                name=f"c{i}", daemon=True) for i in range(CLIENTS)]
    threads += [threading.Thread(target=ha_loop, args=(x, sh, f"ha{i}", pool, 1000 + i, ha_record),
                                 name=f"ha{i}", daemon=True) for i in range(HA_THREADS)]
    threads.append(threading.Thread(target=sampler, args=(x, sh, pool), name="sampler", daemon=True))
    done = threading.Event()
    dog = threading.Thread(target=watchdog, args=(sh, done), daemon=True)
    dog.start()
    for t in threads:
        t.start()
    sh.stop.wait(seconds)
    sh.stop.set()
    deadline = time.monotonic() + WATCHDOG_LIMIT + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    done.set()
    dog.join()
    stuck = [t.name for t in threads if t.is_alive()]
    total = sum(sh.calls.values())
    print(f"\nconcurrency ({seconds} s): {total} calls by {CLIENTS} clients + {HA_THREADS} HA togglers; "
          f"HA: {Counter(ha_record)}; current_operations sampled {sh.samples} times")
    assert not stuck, f"threads still blocked: {stuck}"
    assert sh.alarms == []
    assert sh.unexpected == [], sh.unexpected[:10]
    assert sh.max_ops <= 1 and sh.samples > 0
    assert set(ha_record) <= {"enable", "disable"} | HA_REFUSALS
    assert "enable" in ha_record, ha_record
    assert sh.calls["VM.create"] > 0 and sh.calls["VM.set_name_label"] > 0
    # The end state: consistent database, every acknowledged write visible, HA whole or off.
    assert invariants(api, schema) == []
    records = api.VM.get_all_records()
    missing = {vm: label for vm, label in acked.items() if records.get(vm, {}).get("name_label") != label}
    assert missing == {}, list(missing.items())[:5]
    rec = api.pool.get_record(pool)
    assert rec["current_operations"] == {}
    if rec["ha_enabled"]:
        assert len(running_heartbeats(x)) == 3 and len(armed_hosts(x)) == 3
        api.pool.disable_ha()
    assert running_heartbeats(x) == [] and armed_hosts(x) == []
    s.xenapi.session.logout()
    clean_log(x)
