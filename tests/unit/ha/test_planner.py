"""The pure HA planner (xapid.ha.planner) against xapi's rules.

Sources: xapi's memory_check.ml (capacity), binpack.ml (packer, heuristics), xapi_ha_vm_failover.ml
(compute_restart_plan, plan_for_n_failures, compute_max_host_failures_to_tolerate), agility.ml,
xapi_pool.ml (ha_compute_vm_failover_plan), xapi_clustering.ml (corosync cap), Helpers.bisect.
"""

from __future__ import annotations

import itertools
import time

import pytest

from xapid.ha import planner
from xapid.ha.planner import (
    NULL_REF,
    Change,
    Config,
    Host,
    Pool,
    Topology,
    Verdict,
    Vm,
)

GIB = 1024**3
_ids = itertools.count(1)


def host(i: int, total: int = 64 * GIB, **kw: object) -> Host:
    return Host(ref=f"h{i}", uuid=f"uuid-h{i:03d}", memory_total=total, **kw)  # type: ignore[arg-type]


def dom0(h: Host) -> Vm:
    return Vm(ref=f"dom0-{h.ref}", uuid=f"uuid-dom0-{h.ref}", static_max=4 * GIB, dynamic_max=4 * GIB,
              dynamic_min=4 * GIB, power_state="Running", resident_on=h.ref, is_control_domain=True)


def vm(gib: float, on: str = NULL_REF, protected: bool = True, **kw: object) -> Vm:
    n = next(_ids)
    size = int(gib * GIB)
    fields: dict[str, object] = dict(ref=f"vm{n}", uuid=f"uuid-vm{n:05d}", static_max=size, dynamic_max=size,
                                     dynamic_min=size, power_state="Running" if on != NULL_REF else "Halted",
                                     resident_on=on, always_run=protected,
                                     restart_priority="restart" if protected else "")
    fields.update(kw)
    return Vm(**fields)  # type: ignore[arg-type]


def pool_of(hosts: list[Host], vms: list[Vm], topology: Topology | None = None) -> Pool:
    everything = {v.ref: v for v in [*(dom0(h) for h in hosts), *vms]}
    topo = topology or Topology(enabled_hosts=frozenset(h.ref for h in hosts if h.enabled))
    return Pool({h.ref: h for h in hosts}, everything, topo)


def protected(pool: Pool) -> list[str]:
    return [r for r, v in pool.vms.items() if planner.is_protected(v)]


def verdict(pool: Pool, n: int, **kw: object) -> Verdict:
    return planner.plan_for_n_failures(pool, protected(pool), n, **kw)  # type: ignore[arg-type]


# -- capacity (memory_check.ml) ---------------------------------------------------------------------


def test_host_free_counts_every_resident_at_static_max_with_overheads() -> None:
    h = host(1, memory_overhead=1 * GIB)
    residents = [dom0(h), vm(10, h.ref, protected=False, dynamic_min=2 * GIB), vm(5, h.ref, overhead=GIB // 2)]
    assert planner.host_free(h, residents, planner.STATIC_MAX) == (64 - 1 - 4 - 10 - 5.5) * GIB
    assert planner.host_free(h, residents, planner.DYNAMIC_MIN) == (64 - 1 - 4 - 2 - 5.5) * GIB
    assert planner.host_free(h, residents, planner.STATIC_MAX, ignore=residents[1].ref) == (64 - 1 - 4 - 5.5) * GIB
    assert planner.host_free(h, [vm(100, h.ref)], planner.STATIC_MAX) == 0  # never negative


def test_start_memory_is_dynamic_min_except_for_pvh() -> None:
    """Xapi_vm_helpers.assert_enough_memory_available: Dynamic_min for hvm/pv, Static_max for pv_in_pvh."""
    hvm = vm(8, dynamic_min=2 * GIB, overhead=GIB)
    assert hvm.start_memory() == 3 * GIB
    assert vm(8, dynamic_min=2 * GIB, domain_type="pv_in_pvh").start_memory() == 8 * GIB


def test_balloon_gives_dynamic_max_when_it_fits_and_squeezes_proportionally_otherwise() -> None:
    h = host(1, total=16 * GIB)
    a = vm(8, h.ref, dynamic_max=6 * GIB, dynamic_min=2 * GIB)
    b = vm(8, h.ref, dynamic_max=4 * GIB, dynamic_min=4 * GIB)
    targets, free = planner.balloon(h, [a, b])
    assert targets == {a.ref: 6 * GIB, b.ref: 4 * GIB} and free == 6 * GIB
    c = vm(8, h.ref, dynamic_max=8 * GIB, dynamic_min=2 * GIB)
    targets, free = planner.balloon(h, [a, b, c])  # max 18 > 16 > min 8: 8 of the 10 GiB of slack
    assert targets[b.ref] == 4 * GIB
    assert targets[a.ref] == 2 * GIB + int(4 * GIB * 0.8) and targets[c.ref] == 2 * GIB + int(6 * GIB * 0.8)
    assert free == 16 * GIB - sum(targets.values()) and 0 <= free < 16
    d = vm(11, h.ref)
    targets, free = planner.balloon(h, [a, b, d])  # even the minimums (17 GiB) do not fit
    assert targets == {a.ref: 2 * GIB, b.ref: 4 * GIB, d.ref: 11 * GIB} and free == 0


def test_protection_needs_always_run_and_restart_and_a_real_vm() -> None:
    """Helpers.vm_should_always_run; templates and control domains are never protected."""
    assert planner.is_protected(vm(1, "h1"))
    assert not planner.is_protected(vm(1, always_run=False))  # a halted VM with priority restart
    assert not planner.is_protected(vm(1, "h1", restart_priority="best-effort"))
    assert not planner.is_protected(vm(1, "h1", is_template=True))
    assert not planner.is_protected(vm(1, "h1", is_control_domain=True))


# -- the packer (binpack.ml) ------------------------------------------------------------------------


def test_biggest_fit_decreasing_puts_the_biggest_vm_on_the_roomiest_host() -> None:
    plan = planner.biggest_fit_decreasing([("s", 4), ("b", 6), ("m", 5)], [("x", 10), ("y", 7)])
    assert plan == {"b": "x", "m": "y", "s": "x"}
    # What does not fit in the roomiest host fits nowhere: it is left out, smaller ones still go.
    assert planner.biggest_fit_decreasing([("big", 6), ("small", 3)], [("x", 5)]) == {"small": "x"}
    assert planner.biggest_fit_decreasing([("a", 1)], []) == {}


def test_heuristic_choice_follows_xapis_threshold() -> None:
    assert planner.uses_exhaustive(32, 2)  # 496 * 2 = 992
    assert not planner.uses_exhaustive(32, 3)  # 4960 * 6
    assert not planner.uses_exhaustive(33, 1)  # more than 32 hosts
    assert planner.uses_exhaustive(6, 6) and not planner.uses_exhaustive(7, 7)  # 720, 5040
    assert planner.uses_exhaustive(3, 0)


def test_the_approximation_is_pessimistic_where_the_exhaustive_search_finds_a_plan() -> None:
    """One 20 GiB VM on A, five 1 GiB VMs on B: every real failure is survivable, but the
    approximation assumes five 20 GiB VMs must move onto the 4 slots left."""
    placement = {"big": "A", **{f"s{i}": "B" for i in range(5)}}
    sizes = {"big": 20 * GIB, **{f"s{i}": GIB for i in range(5)}}
    config = Config({"A": 40 * GIB, "B": 55 * GIB, "C": 60 * GIB}, sizes, placement, 3, 1)
    assert planner.exhaustive(config) is True
    assert planner.approximate(config) is False
    tight = Config({"A": 0, "B": 0, "C": 4 * GIB}, sizes, placement, 3, 1)
    assert planner.exhaustive(tight) is False  # B's five VMs do not fit in A (full) and C (4 GiB)


def test_trivially_impossible_and_empty_configurations() -> None:
    assert planner.exhaustive(Config({"A": 1, "B": 1}, {}, {}, 2, 2)) is True  # nothing to protect
    assert planner.exhaustive(Config({"A": 10}, {"v": 1}, {"v": "A"}, 1, 1)) is False
    assert planner.approximate(Config({"A": 10}, {"v": 1}, {"v": "A"}, 2, 2)) is False  # fewer hosts


# -- n-failure plans (xapi_ha_vm_failover.ml) --------------------------------------------------------


def three_hosts_with(vms_per_host: list[int], gib: float = 20) -> tuple[list[Host], list[Vm]]:
    hosts = [host(i) for i in (1, 2, 3)]
    vms = [vm(gib, h.ref) for h, count in zip(hosts, vms_per_host, strict=True) for _ in range(count)]
    return hosts, vms


def test_six_20gib_vms_on_three_hosts_survive_one_failure_seven_do_not() -> None:
    hosts, vms = three_hosts_with([2, 2, 2])
    pool = pool_of(hosts, vms)
    assert verdict(pool, 0) is Verdict.ALL and verdict(pool, 1) is Verdict.ALL
    assert verdict(pool, 2) is Verdict.NONE
    assert planner.max_failures(pool, protected(pool)) == 1
    hosts, vms = three_hosts_with([3, 2, 2])
    pool = pool_of(hosts, vms)
    assert verdict(pool, 1) is Verdict.NONE and verdict(pool, 0) is Verdict.ALL
    assert planner.max_failures(pool, protected(pool)) == 0


def test_unprotected_vms_take_capacity_too() -> None:
    hosts, vms = three_hosts_with([2, 2, 2])
    assert verdict(pool_of(hosts, vms), 1) is Verdict.ALL
    hog = vm(20, "h3", protected=False)
    assert verdict(pool_of(hosts, [*vms, hog]), 1) is Verdict.NONE


def test_offline_protected_vms_are_placed_before_failures_are_considered() -> None:
    """A halted VM still marked always_run (its host died) must first fit somewhere."""
    hosts, vms = three_hosts_with([2, 2, 2])
    offline = vm(20, always_run=True)
    pool = pool_of(hosts, [*vms, offline])
    assert verdict(pool, 0) is Verdict.ALL  # it fits on any host at 0 failures...
    assert verdict(pool, 1) is Verdict.NONE  # ...but then 7 VMs do not survive a failure
    too_big = vm(61, always_run=True)
    assert verdict(pool_of(hosts, [*vms, too_big]), 0) is Verdict.NONE


def test_failures_beyond_the_host_count_have_no_plan() -> None:
    hosts = [host(1), host(2)]
    empty = pool_of(hosts, [])
    assert verdict(empty, 2) is Verdict.ALL and verdict(empty, 3) is Verdict.NONE and verdict(empty, -1) is Verdict.NONE
    one = pool_of(hosts, [vm(1, "h1")])
    assert verdict(one, 1) is Verdict.ALL and verdict(one, 2) is Verdict.NONE


def test_disabled_and_dead_hosts_offer_nothing() -> None:
    hosts, vms = three_hosts_with([2, 2, 0])
    assert verdict(pool_of(hosts, vms), 1) is Verdict.ALL
    hosts[2] = host(3, enabled=False)
    assert verdict(pool_of(hosts, vms), 1) is Verdict.NONE
    hosts[2] = host(3, live=False)
    assert verdict(pool_of(hosts, vms), 1) is Verdict.NONE
    hosts[2] = host(3)
    assert verdict(pool_of(hosts, vms), 1, live_set=["h1", "h2"]) is Verdict.NONE


def test_configuration_changes() -> None:
    """configuration_change: arriving VMs take memory, disabled hosts vanish, n can be overridden."""
    hosts, vms = three_hosts_with([2, 2, 1])
    pool = pool_of(hosts, vms)
    small, big = vm(20, protected=False), vm(40, protected=False)
    pool.vms.update({small.ref: small, big.ref: big})
    assert verdict(pool, 1) is Verdict.ALL
    assert verdict(pool, 1, change=Change(arriving={small.ref: "h3"})) is Verdict.ALL  # h3 as full as the others
    assert verdict(pool, 1, change=Change(arriving={big.ref: "h3"})) is Verdict.NONE  # h1's two fit nowhere
    assert verdict(pool, 1, change=Change(hosts_to_disable=frozenset({"h3"}))) is Verdict.NONE
    assert verdict(pool, 0, change=Change(num_failures=2)) is Verdict.NONE
    hosts, vms = three_hosts_with([2, 2, 2])
    hog = vm(20, "h3", protected=False)
    pool = pool_of(hosts, [*vms, hog])
    assert verdict(pool, 1) is Verdict.NONE
    assert verdict(pool, 1, change=Change(leaving={hog.ref: "h3"})) is Verdict.ALL
    # A VM about to be protected is placed by the planner, wherever it fits.
    hosts, vms = three_hosts_with([2, 2, 1])
    pool = pool_of(hosts, vms)
    halted = vm(20, always_run=False)
    pool.vms[halted.ref] = halted
    assert verdict(pool, 1, change=Change(new_vms_to_protect=(halted.ref,))) is Verdict.ALL
    second = vm(20, always_run=False)
    pool.vms[second.ref] = second
    assert verdict(pool, 1, change=Change(new_vms_to_protect=(halted.ref, second.ref))) is Verdict.NONE


# -- maximum failures: bisection and caps -------------------------------------------------------------


def test_bisect_is_xapis() -> None:
    asked: list[int] = []

    def ok(k: int) -> bool:
        asked.append(k)
        return k <= 5

    assert planner.bisect(ok, 0, 64) == 5
    assert 0 not in asked and len(asked) <= 8
    assert planner.bisect(lambda k: False, 0, 10) == 0  # 0 is the answer when nothing works
    assert planner.bisect(lambda k: True, 0, 1) == 1


def test_max_failures_without_protected_vms_is_the_host_count_or_the_cap() -> None:
    pool = pool_of([host(i) for i in range(1, 6)], [vm(8, "h1", protected=False)])
    assert planner.max_failures(pool, []) == 5
    assert planner.max_failures(pool, [], cap=2) == 2
    assert planner.max_failures(pool, [], cap=0) == 0


@pytest.mark.parametrize(("hosts", "without", "cap"), [(3, 0, 1), (4, 0, 1), (5, 0, 2), (6, 0, 2), (7, 0, 3),
                                                       (3, 1, 1), (4, 2, 2), (1, 0, 0), (1, 1, 1), (0, 0, 0)])
def test_corosync_cap(hosts: int, without: int, cap: int) -> None:
    """xapi_clustering.ml compute_corosync_max_host_failures (OCaml division truncates)."""
    assert planner.corosync_cap(hosts, without) == cap


def test_max_failures_matches_a_linear_search_on_varied_pools() -> None:
    for layout in ([1, 1, 1], [2, 2, 2], [3, 1, 0], [2, 1, 1], [0, 0, 0], [1, 0, 0]):
        hosts, vms = three_hosts_with(layout, gib=25)
        pool = pool_of(hosts, vms)
        linear = 0
        for k in range(1, 4):
            if verdict(pool, k) is not Verdict.ALL:
                break
            linear = k
        assert planner.max_failures(pool, protected(pool)) == linear, layout


def test_sixty_four_hosts_and_a_thousand_protected_vms_in_well_under_a_second() -> None:
    """The approximation (64 > 32 hosts): 2 GiB VMs, 16 or 15 per host.  r failures move 16r VMs
    onto the 64 - r hosts left, 14 slots each once the 24 roomiest are gone: r <= 29."""
    hosts = [host(i) for i in range(64)]
    vms = [vm(2, hosts[i % 64].ref) for i in range(1000)]
    pool = pool_of(hosts, vms)
    t0 = time.perf_counter()
    best = planner.max_failures(pool, protected(pool))
    elapsed = time.perf_counter() - t0
    print(f"\nplanner: max failures of 64 hosts x 1000 protected VMs = {best} in {elapsed * 1e3:.1f} ms")
    assert best == 29
    assert elapsed < 1.0


# -- agility (agility.ml) ------------------------------------------------------------------------------


def topology(hosts: list[Host], **kw: object) -> Topology:
    fields: dict[str, object] = dict(
        enabled_hosts=frozenset(h.ref for h in hosts if h.enabled),
        sr_shared={"nfs": True, "local1": False, "half": True},
        sr_attached={"nfs": frozenset(h.ref for h in hosts), "local1": frozenset({"h1"}),
                     "half": frozenset({"h1", "h2"})},
        network_hosts={"net": frozenset(h.ref for h in hosts), "partial": frozenset({"h1"})})
    fields.update(kw)
    return Topology(**fields)  # type: ignore[arg-type]


def test_agility_needs_properly_shared_storage_and_networks() -> None:
    hosts = [host(1), host(2), host(3)]
    topo = topology(hosts)
    assert planner.agility_error(vm(1, srs=("nfs",), networks=("net",)), topo) is None
    assert planner.agility_error(vm(1, srs=("local1",)), topo) == (planner.SR_NOT_SHARED, "local1")
    assert planner.agility_error(vm(1, srs=("half",)), topo) == (planner.SR_NOT_SHARED, "half")
    assert planner.agility_error(vm(1, networks=("partial",)), topo) == (planner.NETWORK_NOT_SHARED, "partial")
    # Only enabled hosts must reach the SR.
    hosts[2] = host(3, enabled=False)
    assert planner.agility_error(vm(1, srs=("half",)), topology(hosts)) is None


def test_a_non_agile_protected_vm_prevents_a_plan_for_all() -> None:
    hosts = [host(1), host(2), host(3)]
    running = vm(4, "h1", srs=("local1",))
    pool = pool_of(hosts, [running, vm(4, "h2", srs=("nfs",))], topology(hosts))
    assert verdict(pool, 1) is Verdict.EXCLUDING_NON_AGILE
    assert planner.max_failures(pool, protected(pool)) == 0
    # Offline, it is pinned to the first host that can boot it but never counts as restarted.
    offline = vm(4, srs=("local1",), always_run=True)
    pool = pool_of(hosts, [offline], topology(hosts))
    assert verdict(pool, 0) is Verdict.NONE
    rp = planner.restart_plan(pool, protected(pool))
    assert rp.plan == {offline.ref: "h1"} and rp.config.hosts["h1"] == 56 * GIB


# -- restart placement and failover plans -----------------------------------------------------------


def test_restart_placement_onto_the_live_hosts() -> None:
    hosts, vms = three_hosts_with([0, 1, 0])
    hosts[0] = host(1, live=False)
    dead = [vm(20, always_run=True) for _ in range(3)]  # were on h1, reset to Halted, still protected
    pool = pool_of(hosts, [*vms, *dead])
    placement, unplaced = planner.restart_placement(pool, protected(pool), [v.ref for v in dead], ["h2", "h3"])
    assert unplaced == [] and sorted(placement.values()) == ["h2", "h3", "h3"]
    placement, unplaced = planner.restart_placement(pool, protected(pool), [v.ref for v in dead], ["h2"])
    assert list(placement.values()) == ["h2", "h2"] and len(unplaced) == 1


def test_failover_plan_reports_a_host_or_an_error_code_per_vm() -> None:
    """xapi_pool.ml ha_compute_vm_failover_plan: dynamic_min into maximum-compression free memory."""
    hosts = [host(1), host(2), host(3)]
    on_h1 = [vm(30, "h1", dynamic_min=10 * GIB), vm(30, "h1", protected=False, dynamic_min=10 * GIB)]
    local = vm(8, "h1", srs=("local1",), dynamic_min=8 * GIB)
    huge = vm(70, "h1", dynamic_min=70 * GIB)
    pool = pool_of(hosts, [*on_h1, local, huge], topology(hosts))
    plan = planner.failover_plan(pool, ["h1"], [v.ref for v in [*on_h1, local, huge]])
    assert {plan[v.ref]["host"] for v in on_h1} <= {"h2", "h3"}
    assert plan[huge.ref] == {"error_code": planner.NOT_ENOUGH_MEMORY}
    # As in xapi, the packing does not skip non-agile VMs: this one fits, so it gets a host.
    assert "host" in plan[local.ref]
    pool.vms[local.ref] = Vm(**{**local.__dict__, "dynamic_min": 61 * GIB})
    plan = planner.failover_plan(pool, ["h1"], [local.ref])
    assert plan[local.ref] == {"error_code": planner.SR_NOT_SHARED}
    plan = planner.failover_plan(pool, ["h1", "h2", "h3"], [on_h1[0].ref])
    assert plan[on_h1[0].ref] == {"error_code": planner.NOT_ENOUGH_MEMORY}
