"""HA that acts (ha.md 4.9; xapi_ha_vm_failover.ml restart_auto_run_vms, xapi_ha.ml on_master_failure).

Every test breaks a running pool with ``xapid fault`` (through :class:`FaultClient`, the module the
command line uses) and watches it through the SDK only.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.integration.ha.conftest import HaPool, wait_for

FAILOVER = 40.0  # seconds: T = 10 detection, fencing margin and a start, with room for a loaded machine


def test_crashed_slave_restarts_protected_and_best_effort_vms(ha_pool: HaPool) -> None:
    p = ha_pool
    x = p.api
    protected = p.vm("protected", "restart", on="host2")
    best = p.vm("best", "best-effort", on="host2")
    plain = p.vm("plain", "", on="host2")
    elsewhere = p.vm("elsewhere", "", on="host3")
    victim = p.uuid("host2")
    assert p.fault.crash("host2") == ["host2: on -> off"]
    wait_for(lambda: p.where(protected)[0] == "Running" and p.where(protected)[1] != "host2",
             timeout=FAILOVER, what="the protected VM to run on a survivor")
    assert not p.live("host2")
    wait_for(lambda: p.where(best)[0] == "Running", timeout=10, what="the best-effort VM to restart")
    assert p.where(best)[1] in ("host1", "host3")
    assert p.where(plain) == ("Halted", "-")
    assert x.VM_metrics.get_state(x.VM.get_metrics(plain)) == [] or p.where(plain)[0] == "Halted"
    assert p.where(elsewhere) == ("Running", "host3")
    failed = p.messages("HA_HOST_FAILED")
    assert [(m["obj_uuid"], m["cls"], int(m["priority"]), m["body"]) for m in failed] == [
        (victim, "Host", 3, "Server 'host2' has failed")]
    assert p.messages("HA_PROTECTED_VM_RESTART_FAILED") == []


def test_master_crash_elects_a_new_master_and_monitoring_goes_on(ha_pool: HaPool) -> None:
    p = ha_pool
    x = p.api
    assert p.master() == "host1"
    on_master = p.vm("on-master", "restart", on="host1")
    p.fault.crash("host1")
    started = time.monotonic()
    wait_for(lambda: p.master() != "host1", timeout=FAILOVER, what="a new master")
    elapsed = time.monotonic() - started
    new_master = p.master()
    assert new_master in ("host2", "host3")
    transitions = p.messages("POOL_MASTER_TRANSITION")
    assert [(m["obj_uuid"], m["cls"], int(m["priority"])) for m in transitions] == [
        (p.uuid(new_master), "Host", 4)]
    wait_for(lambda: p.where(on_master)[0] == "Running" and p.where(on_master)[1] != "host1", timeout=FAILOVER,
             what="the old master's VM to restart")
    assert p.where(on_master)[1] in ("host2", "host3")
    assert not p.live("host1")
    # The new master's monitor acts too: lose the other survivor.
    other = "host3" if new_master == "host2" else "host2"
    vm2 = p.vm("on-other", "restart", on=other)
    p.fault.crash(other)
    wait_for(lambda: p.where(vm2) == ("Running", new_master), timeout=FAILOVER, what="restart on the last host")
    assert len(x.host.get_all()) == 3  # the API answered throughout
    assert elapsed < FAILOVER


def test_prevent_restarts_for_holds_then_releases(ha_pool: HaPool) -> None:
    p = ha_pool
    x = p.api
    vm = p.vm("held", "restart", on="host3")
    x.pool.ha_prevent_restarts_for("3600")
    p.fault.crash("host3")
    time.sleep(3)
    assert p.where(vm) == ("Running", "host3")  # nothing acts while restarts are prevented
    assert p.messages("HA_HOST_FAILED") == []
    x.pool.ha_prevent_restarts_for("0")
    wait_for(lambda: p.where(vm)[0] == "Running" and p.where(vm)[1] != "host3", timeout=FAILOVER,
             what="the restart once prevention is lifted")


def test_restart_groups_follow_vm_order(ha_pool: HaPool) -> None:
    p = ha_pool
    x = p.api
    late = p.vm("late", "restart", on="host2", order=5)
    first = p.vm("first", "restart", on="host2", order=1, start_delay=2)
    last = p.vm("last", "restart", on="host2", order=-1)
    p.fault.crash("host2")
    wait_for(lambda: all(p.where(v)[0] == "Running" and p.where(v)[1] != "host2" for v in (late, first, last)),
             timeout=FAILOVER, what="all three restarted")

    def started(vm: str) -> float:
        stamp = x.VM_metrics.get_start_time(x.VM.get_metrics(vm))
        return time.mktime(time.strptime(str(stamp)[:17], "%Y%m%dT%H:%M:%S"))

    # Groups start one after another: order 1 (then its 2 s start_delay), then 5, then the negative order last.
    assert started(first) + 2 <= started(late) <= started(last)


def test_declare_dead_hooks_run_with_xapis_arguments_and_a_failing_one_skips_the_post_hook(
        ha_pool: HaPool, tmp_path: Path) -> None:
    """xapi_ha_vm_failover.ml restart_auto_run_vms: ``host-pre-declare-dead -hostuuid U -reason fenced``
    before live := false and ``host-post-declare-dead`` after the VMs are reset.  A pre hook that fails
    drops that host from the round's dead hosts (no post hook); the VMs still restart, and the liveset
    pass that follows (xapi_ha.ml) still records the host as not live."""
    p = ha_pool
    log = tmp_path / "hooks.log"
    pre = p.xapid.state_dir / "hooks" / "host-pre-declare-dead" / "10-fence"
    post = p.xapid.state_dir / "hooks" / "host-post-declare-dead" / "10-note"
    for script in (pre, post):
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(f'#!/bin/sh\necho "{script.parent.name} $@" >> {log}\n'
                          f'[ "$2" = "{p.uuid("host2")}" ] && exit 3\nexit 0\n')
        script.chmod(0o755)
    vms = {name: p.vm(f"protected-{name}", "restart", on=name) for name in ("host2", "host3")}
    p.fault.crash("host2", "host3")
    for name, vm in vms.items():
        wait_for(lambda vm=vm: p.where(vm) == ("Running", "host1"), timeout=FAILOVER,
                 what=f"the protected VM of {name} to run on host1")
        wait_for(lambda n=name: not p.live(n), timeout=10, what=f"{name} not live")
    wait_for(lambda: "host-post-declare-dead" in log.read_text(), timeout=5, what="the post hook")
    h2, h3 = p.uuid("host2"), p.uuid("host3")
    lines = log.read_text().splitlines()
    pre2, pre3, post3 = (f"host-pre-declare-dead -hostuuid {h2} -reason fenced",
                         f"host-pre-declare-dead -hostuuid {h3} -reason fenced",
                         f"host-post-declare-dead -hostuuid {h3} -reason fenced")
    assert sorted(lines) == sorted([pre2, pre3, post3])  # host2's pre hook failed: no post hook, no retry
    assert lines.index(pre3) < lines.index(post3)
