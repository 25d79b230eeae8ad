"""The emulated metrics generator: deterministic, in range, moving, load following the VMs, xapi's archives."""

from __future__ import annotations

import math
import statistics

from xapid.hw.metrics import (
    RRD,
    STEP,
    TIMESCALES,
    Generator,
    HostProfile,
    Source,
    VmProfile,
    archives,
)

T0 = 1_800_000_000  # a step time
GIB = 1024**3


def vm(uuid: str = "vm-1", start: float = 0.0, vcpus: int = 2, memory: int = 2 * GIB) -> VmProfile:
    return VmProfile(uuid, vcpus, memory, memory, ("0", "1"), ("xvda", "xvdb"), start, "host-1")


def host(vms: tuple[VmProfile, ...] = ()) -> HostProfile:
    return HostProfile("host-1", 8, 64 * GIB, ("eth0",), vms)


def by_name(sources: list[Source]) -> dict[str, Source]:
    return {s.ds.name: s for s in sources}


def test_the_same_seed_gives_the_same_values_and_another_seed_others() -> None:
    times = [T0 + STEP * i for i in range(200)]
    a = by_name(Generator(7).vm_sources(vm()))
    b = by_name(Generator(7).vm_sources(vm()))
    c = by_name(Generator(8).vm_sources(vm()))
    for name in ("cpu0", "cpu_usage", "vif_0_rx", "vbd_xvda_write", "memory_internal_free"):
        assert [a[name].value(t) for t in times] == [b[name].value(t) for t in times], name
        assert [a[name].value(t) for t in times] != [c[name].value(t) for t in times], name


def test_a_vm_has_one_source_per_vcpu_vif_and_vbd_within_their_ranges_and_moving() -> None:
    sources = by_name(Generator(1).vm_sources(vm(vcpus=3)))
    for name in ("cpu0", "cpu1", "cpu2", "cpu_usage", "memory", "memory_target", "memory_internal_free",
                 "vif_0_rx", "vif_0_tx", "vif_1_rx", "vif_1_tx", "vbd_xvda_read", "vbd_xvda_write",
                 "vbd_xvdb_iops_read", "vbd_xvdb_iops_write"):
        assert name in sources, name
    assert "cpu3" not in sources
    assert not sources["vif_0_rx_errors"].ds.default  # recorded only when asked
    times = [T0 + STEP * i for i in range(2000)]
    for s in sources.values():
        values = [s.value(t) for t in times]
        assert all(s.ds.min <= v <= s.ds.max for v in values), s.ds.name
    for name in ("cpu0", "cpu_usage", "vif_0_rx", "vbd_xvda_read", "memory_internal_free"):
        assert statistics.pstdev(sources[name].value(t) for t in times) > 0, name
    assert {sources["memory"].value(t) for t in times} == {2 * GIB}
    assert all(0 < sources["memory_internal_free"].value(t) < 2 * GIB / 1024 for t in times)


def test_host_load_and_memory_follow_the_vms_that_run_on_it() -> None:
    gen = Generator(3)
    busy = tuple(vm(f"vm-{i}", vcpus=4) for i in range(6))
    idle_host = by_name(gen.host_sources(host()))
    busy_host = by_name(gen.host_sources(host(busy)))
    times = [T0 + 60 * i for i in range(500)]
    idle = statistics.mean(idle_host["cpu_avg"].value(t) for t in times)
    loaded = statistics.mean(busy_host["cpu_avg"].value(t) for t in times)
    assert idle < 0.06 < loaded
    expected_load = statistics.mean(sum(4 * gen.vm_cpu(v)(t) for v in busy) for t in times)
    assert abs(statistics.mean(busy_host["loadavg"].value(t) for t in times) - expected_load - 0.2) < 0.05
    assert idle_host["memory_free_kib"].value(T0) - busy_host["memory_free_kib"].value(T0) == 6 * 2 * GIB / 1024
    assert busy_host["running_vcpus"].value(T0) == 24 and busy_host["running_domains"].value(T0) == 6
    cpus = [busy_host[f"cpu{i}"].value(T0) for i in range(8)]
    assert busy_host["cpu_avg"].value(T0) == sum(cpus) / 8
    assert all(0 <= c <= 1 for c in cpus)


def test_a_vm_counts_on_its_host_only_from_its_start() -> None:
    gen = Generator(3)
    later = vm("late", start=T0 + 3600, vcpus=8)
    h = by_name(gen.host_sources(host((later,))))
    assert h["running_vcpus"].value(T0) == 0 and h["running_vcpus"].value(T0 + 3600) == 8
    assert h["memory_free_kib"].value(T0) > h["memory_free_kib"].value(T0 + 3600)


def test_the_archives_are_xapis() -> None:
    """rrdd_shared.ml timescales, rrdd_monitor.ml create_rras (min/max: host always, VMs when asked)."""
    assert TIMESCALES == ((120, 1), (120, 12), (168, 720), (366, 17280))
    host_rras = archives(True)
    assert [(r.cf, r.rows, r.pdp, r.xff) for r in host_rras] == [
        ("AVERAGE", 120, 1, 0.5),
        ("AVERAGE", 120, 12, 1.0), ("MIN", 120, 12, 1.0), ("MAX", 120, 12, 1.0),
        ("AVERAGE", 168, 720, 1.0), ("MIN", 168, 720, 1.0), ("MAX", 168, 720, 1.0),
        ("AVERAGE", 366, 17280, 1.0), ("MIN", 366, 17280, 1.0), ("MAX", 366, 17280, 1.0)]
    assert [(r.cf, r.rows, r.pdp, r.xff) for r in archives(False)] == [
        ("AVERAGE", 120, 1, 0.5), ("AVERAGE", 120, 12, 0.5), ("AVERAGE", 168, 720, 0.5), ("AVERAGE", 366, 17280, 0.5)]


def rrd_of(sources: list[Source], last: int, start: int = 0, down: tuple[int, int] | None = None) -> RRD:
    def known(t: int) -> bool:
        return down is None or not down[0] <= t < down[1]

    return RRD("x", last, sources, archives(True), known, {}, {s.ds.name: start for s in sources})


def test_a_minute_row_is_the_average_min_and_max_of_its_twelve_5s_values() -> None:
    sources = Generator(5).vm_sources(vm())
    rrd = rrd_of(sources, T0 + 3)
    fine, avg, low, high = rrd.rras[0], rrd.rras[1], rrd.rras[2], rrd.rras[3]
    end = rrd.last_cdp(avg)
    assert end % 60 == 0 and end <= T0 + 3
    for s in sources:
        five = [rrd.cdp(s, fine, end - STEP * k) for k in range(12)]
        assert math.isclose(rrd.cdp(s, avg, end), sum(five) / 12, rel_tol=1e-12, abs_tol=1e-12), s.ds.name
        assert rrd.cdp(s, low, end) == min(five) and rrd.cdp(s, high, end) == max(five)
    hour = rrd.rras[4]
    for s in sources:
        a, lo, hi = (rrd.cdp(s, rrd.rras[k], rrd.last_cdp(hour)) for k in (4, 5, 6))
        assert lo <= a <= hi


def test_values_are_unknown_before_the_start_and_while_the_host_was_down() -> None:
    sources = Generator(5).vm_sources(vm())
    rrd = rrd_of(sources, T0 + 600, start=T0, down=(T0 + 100, T0 + 200))
    fine = rrd.rras[0]
    cpu = sources[0]
    assert math.isnan(rrd.cdp(cpu, fine, T0 - 5))
    assert not math.isnan(rrd.cdp(cpu, fine, T0 + 50))
    assert math.isnan(rrd.cdp(cpu, fine, T0 + 150))
    assert not math.isnan(rrd.cdp(cpu, fine, T0 + 250))
    times = [t for t, _v in (rrd.row(fine, i) for i in range(120))]
    assert times == [T0 + 600 - STEP * i for i in range(120)]
    assert rrd.latest("cpu0") == rrd.cdp(cpu, fine, T0 + 600)


def test_a_stopped_vm_counts_only_while_it_ran() -> None:
    gen = Generator(3)
    gone = vm("gone", start=T0, vcpus=2)
    gone.stop = T0 + 600
    h = by_name(gen.host_sources(host((gone,))))
    assert [h["running_vcpus"].value(t) for t in (T0 - 5, T0, T0 + 595, T0 + 600)] == [0, 2, 2, 0]
