"""Emulated performance counters of hosts and running VMs, archived as xcp-rrdd archives them.

**The generator.**  Every value is a pure function of ``(seed, object uuid, data source name, t)``:
nothing ticks.  A data source's *level* at time ``t`` (a multiple of the 5 s step) is

    level(t) = clamp(0.5 + 0.22 sin(2 pi t / 86400 + p0) + 0.12 sin(2 pi t / P1 + p1)
                     + 0.06 sin(2 pi t / P2 + p2) + 0.10 (u(t / 5) - 0.5), 0, 1)

a daily swing, an hourly-ish and a few-minute wave (``P1`` in 30..120 min, ``P2`` in 2..10 min) and
white noise ``u`` (uniform in [0, 1) per 5 s step), where the phases, periods and noise come from
splitmix64 over a BLAKE2b digest of ``(seed, uuid, name)``.  Metrics are scaled levels:

* VM: ``cpu_usage`` = min(1, 2 a level) with the VM's activity ``a`` in 0.05..0.55 (from its uuid);
  ``cpu<i>`` = min(1, cpu_usage x (0.7 + 0.6 level_i)); ``memory`` = ``memory_actual``,
  ``memory_target`` = ``memory_target`` (bytes); ``memory_internal_free`` = memory x (0.25 + 0.5 level)
  (KiB); ``vif_<device>_rx/tx`` = peak x level^2 (B/s, peak 0.2..2.2 MB/s); ``vbd_<device>_read/write``
  = peak x level^3 (B/s, peak 2..22 MB/s), ``vbd_<device>_iops_read/write`` = that / 4 KiB x 1..4.
* Host (load follows what runs): ``load(t)`` = the sum of ``cpu_usage x VCPUs`` over the VMs that
  ran on it at ``t`` (from their start or arrival; stops and migrations are remembered while xapid
  runs, the last 64 per host, so a restart of xapid forgets the VMs that had stopped before it);
  ``cpu<i>`` = min(1, 0.02 + 0.03 level_i + load / pCPUs x (0.8 + 0.4 level_i)), ``cpu_avg`` their
  mean, ``loadavg`` = load + 0.1 + 0.2 level, ``memory_free_kib`` = total - the memory of those VMs,
  ``pif_<device>_rx/tx`` = the VMs' VIF traffic plus 1..5 KB/s, ``running_vcpus``,
  ``running_domains`` the count.

**Archives** (``rrdd_shared.ml`` timescales, ``rrdd_monitor.ml create_rras``): step 5 s; 120 rows of
1 step (AVERAGE, xff 0.5), 120 of 12 (1 min), 168 of 720 (1 h), 366 of 17280 (1 day).  Host RRDs
always have MIN and MAX beside AVERAGE for the coarse ones (xff 1.0); VM RRDs only when the pool's
``other_config:create_min_max_in_new_VM_RRDs`` is ``true`` (else AVERAGE, xff 0.5).  A row of ``n``
steps ending at ``T`` consolidates the 5 s values at ``min(n, 12)`` evenly spread steps of
``(T - 5n, T]`` (every step for ``n <= 12``); coarse rows are kept in memory per object once computed.
A value is unknown (NaN) before the object existed (a VM's ``start_time``) and while its host was
not powered on: a crashed host's statistics and its VMs' stop at the crash.
"""

from __future__ import annotations

import calendar
import hashlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xapid.daemon import Daemon
    from xapid.store import Change, Record

STEP = 5
# (rows, steps per row): rrdd_shared.ml ``timescales``.
TIMESCALES = ((120, 1), (120, 12), (168, 720), (366, 17280))
SAMPLES = 12  # at most this many 5 s values consolidated per coarse row (every one for 1 min rows)
MRHB = 300.0  # rrdd_monitor.ml: every data source's minimal heartbeat
NAN = float("nan")
INF = float("inf")
_MASK = (1 << 64) - 1
_TWO_PI = 2 * math.pi
MIN_MAX_KEY = "create_min_max_in_new_VM_RRDs"  # Xapi_globs, in pool.other_config
RUNNING = ("Running", "Paused")
PAST_RUNS = 64  # stopped VMs remembered per host (in memory)


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit value for any 64-bit input."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def digest(seed: int, *parts: str) -> int:
    """A 64-bit key for ``parts`` under ``seed`` (BLAKE2b, so it is the same in every process)."""
    h = hashlib.blake2b(digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    h.update("\0".join(parts).encode())
    return int.from_bytes(h.digest(), "little")


def unit(key: int, n: int) -> float:
    """The ``n``-th uniform number in [0, 1) of the stream ``key``."""
    return _mix(key ^ ((n * 0xD1B54A32D192ED03) & _MASK)) / 2.0**64


class Wave:
    """The level (0..1) of one data source of one object over time (see the module docstring)."""

    __slots__ = ("key", "p0", "p1", "p2", "w1", "w2")

    def __init__(self, key: int) -> None:
        self.key = key
        self.p0 = _TWO_PI * unit(key, -1)
        self.p1 = _TWO_PI * unit(key, -2)
        self.p2 = _TWO_PI * unit(key, -3)
        self.w1 = _TWO_PI / (1800 + 5400 * unit(key, -4))
        self.w2 = _TWO_PI / (120 + 480 * unit(key, -5))

    def level(self, t: int) -> float:
        x = (0.5 + 0.22 * math.sin(_TWO_PI * t / 86400 + self.p0) + 0.12 * math.sin(self.w1 * t + self.p1)
             + 0.06 * math.sin(self.w2 * t + self.p2) + 0.10 * (unit(self.key, t // STEP) - 0.5))
        return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def memo(fn: Callable[[int], float]) -> Callable[[int], float]:
    """``fn`` remembering its values (a host's columns read each other's values at the same times)."""
    seen: dict[int, float] = {}

    def cached(t: int) -> float:
        v = seen.get(t)
        if v is None:
            if len(seen) > 50_000:
                seen.clear()
            v = seen[t] = fn(t)
        return v

    return cached


# -- data sources -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """What xcp-rrdd knows of a data source (``Ds.ds_make``), as ``data_source`` records show it."""

    name: str
    description: str
    units: str
    type: str = "GAUGE"  # GAUGE, DERIVE or ABSOLUTE (as in the RRD dump)
    min: float = -INF
    max: float = INF
    default: bool = True  # recorded from the start (``standard``); others only after record_data_source


@dataclass
class Source:
    ds: DataSource
    value: Callable[[int], float]  # the 5 s value at a step time


@dataclass(frozen=True)
class RRA:
    cf: str
    rows: int
    pdp: int  # steps per row
    xff: float


def archives(min_max: bool) -> tuple[RRA, ...]:
    """``rrdd_monitor.ml create_rras``: MIN/MAX beside AVERAGE for coarse timescales when asked."""
    out: list[RRA] = []
    for rows, pdp in TIMESCALES:
        if pdp > 1 and min_max:
            out += [RRA("AVERAGE", rows, pdp, 1.0), RRA("MIN", rows, pdp, 1.0), RRA("MAX", rows, pdp, 1.0)]
        else:
            out.append(RRA("AVERAGE", rows, pdp, 0.5))
    return tuple(out)


@dataclass
class VmProfile:
    """What the generator needs to know of a running VM (read from the store)."""

    uuid: str
    vcpus: int
    memory: int
    target: int
    vifs: tuple[str, ...]
    vbds: tuple[str, ...]
    start: float  # epoch seconds: its start (in a host's profile: when it came to that host)
    host: str  # resident host's uuid
    stop: float = INF  # in a host's profile: when it stopped running there (INF: it still runs)

    def fingerprint(self) -> tuple[object, ...]:
        return (self.vcpus, self.memory, self.target, self.vifs, self.vbds, self.start, self.stop)

    def runs(self, t: float) -> bool:
        return self.start <= t < self.stop


@dataclass
class HostProfile:
    uuid: str
    cpus: int
    memory_total: int
    pifs: tuple[str, ...]
    vms: tuple[VmProfile, ...]

    def fingerprint(self) -> tuple[object, ...]:
        return (self.cpus, self.memory_total, self.pifs, tuple((v.uuid, *v.fingerprint()) for v in self.vms))


def _iso_epoch(text: str) -> float:
    try:
        return float(calendar.timegm(time.strptime(text, "%Y%m%dT%H:%M:%SZ")))
    except (ValueError, OverflowError):
        return 0.0


class Generator:
    """The data sources of hosts and VMs as functions of time (pure: seed, uuid, name, t)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._waves: dict[tuple[str, str], Wave] = {}

    def wave(self, owner: str, name: str) -> Wave:
        w = self._waves.get((owner, name))
        if w is None:
            if len(self._waves) > 100_000:
                self._waves.clear()
            w = self._waves[(owner, name)] = Wave(digest(self.seed, owner, name))
        return w

    def activity(self, owner: str) -> float:
        return 0.05 + 0.5 * unit(digest(self.seed, owner, "activity"), 0)

    def _peak(self, owner: str, name: str, low: float, span: float) -> float:
        return low + span * unit(digest(self.seed, owner, name, "peak"), 0)

    # -- VMs -------------------------------------------------------------------------------------------

    def vm_cpu(self, vm: VmProfile) -> Callable[[int], float]:
        a = 2 * self.activity(vm.uuid)
        level = self.wave(vm.uuid, "cpu_usage").level
        return lambda t: min(1.0, a * level(t))

    def vm_sources(self, vm: VmProfile) -> list[Source]:
        """Every data source of ``vm`` (xcp-rrdd's names, units and ranges), in the RRD's order."""
        usage = self.vm_cpu(vm)
        out: list[Source] = []
        for i in range(vm.vcpus):
            level = self.wave(vm.uuid, f"cpu{i}").level
            out.append(Source(DataSource(f"cpu{i}", f"CPU{i} usage", "(fraction)", "DERIVE", 0.0, 1.0),
                              lambda t, level=level: min(1.0, usage(t) * (0.7 + 0.6 * level(t)))))
        out.append(Source(DataSource("cpu_usage", "Domain CPU usage", "(fraction)", "DERIVE", 0.0, 1.0), usage))
        memory, target = float(vm.memory), float(vm.target)
        out.append(Source(DataSource("memory", "Memory currently allocated to VM", "B", min=0.0),
                          lambda t: memory))
        out.append(Source(DataSource("memory_target", "Target of VM balloon driver", "B", min=0.0),
                          lambda t: target))
        free = self.wave(vm.uuid, "memory_internal_free").level
        out.append(Source(DataSource("memory_internal_free", "Memory used as reported by the guest agent", "KiB",
                                     min=0.0),
                          lambda t: math.floor(memory / 1024 * (0.25 + 0.5 * free(t)))))
        for dev in vm.vifs:
            for way, text in (("rx", "received"), ("tx", "sent")):
                name = f"vif_{dev}_{way}"
                out.append(Source(DataSource(name, f"Bytes per second {text} on virtual interface number '{dev}'",
                                             "B/s", "DERIVE", 0.0), self._traffic(vm.uuid, name, 2e5, 2e6, 2)))
            for way in ("rx", "tx"):
                out.append(Source(DataSource(f"vif_{dev}_{way}_errors",
                                             f"{way.upper()} errors per second on virtual interface number '{dev}'",
                                             "err/s", "DERIVE", 0.0, default=False), lambda t: 0.0))
        for dev in vm.vbds:
            for way, text in (("read", "Reads from"), ("write", "Writes to")):
                name = f"vbd_{dev}_{way}"
                rate = self._traffic(vm.uuid, name, 2e6, 2e7, 3)
                out.append(Source(DataSource(name, f"{text} device '{dev}' in bytes per second", "B/s", "DERIVE",
                                             0.0), rate))
                size = 4096 * self._peak(vm.uuid, name + "_iosize", 1.0, 3.0)
                out.append(Source(DataSource(f"vbd_{dev}_iops_{way}", f"{text} device '{dev}' in requests per second",
                                             "requests/s", "DERIVE", 0.0),
                                  lambda t, rate=rate, size=size: rate(t) / size))
        return out

    def _traffic(self, owner: str, name: str, low: float, span: float, power: int) -> Callable[[int], float]:
        peak = self._peak(owner, name, low, span)
        level = self.wave(owner, name).level
        return lambda t: peak * level(t) ** power

    # -- hosts -----------------------------------------------------------------------------------------

    def host_sources(self, host: HostProfile) -> list[Source]:
        """Every data source of ``host``; its load is what its resident VMs do."""
        vms = [(vm.runs, vm.vcpus, self.vm_cpu(vm), float(vm.memory),
                [self._traffic(vm.uuid, f"vif_{d}_{w}", 2e5, 2e6, 2) for d in vm.vifs for w in ("rx", "tx")])
               for vm in host.vms]
        @memo
        def load(t: int) -> float:
            return sum(n * cpu(t) for runs, n, cpu, _m, _x in vms if runs(t))

        n = max(1, host.cpus)
        cpus = []
        out: list[Source] = []
        for i in range(n):
            level = self.wave(host.uuid, f"cpu{i}").level

            @memo  # cpu_avg reads every cpu at the times their own columns were read
            def cpu(t: int, level: Callable[[int], float] = level) -> float:
                x = level(t)
                return min(1.0, 0.02 + 0.03 * x + load(t) / n * (0.8 + 0.4 * x))

            cpus.append(cpu)
            out.append(Source(DataSource(f"cpu{i}", f"Physical cpu usage for cpu {i}", "(fraction)", "DERIVE",
                                         0.0, 1.0), cpu))
        out.append(Source(DataSource("cpu_avg", "Average physical cpu usage", "(fraction)", "DERIVE", 0.0, 1.0),
                          lambda t: sum(c(t) for c in cpus) / n))
        la = self.wave(host.uuid, "loadavg").level
        out.append(Source(DataSource("loadavg", "Domain0 loadavg", "(fraction)"),
                          lambda t: load(t) + 0.1 + 0.2 * la(t)))
        total = host.memory_total / 1024
        out.append(Source(DataSource("memory_total_kib", "Total amount of memory in the host", "KiB", min=0.0),
                          lambda t: total))
        out.append(Source(DataSource("memory_free_kib", "Total amount of free memory", "KiB", min=0.0),
                          lambda t: max(0.0, total - sum(m for runs, _n, _c, m, _x in vms if runs(t)) / 1024)))
        out.append(Source(DataSource("memory_reclaimed", "Host memory reclaimed by squeezed", "B"), lambda t: 0.0))
        out.append(Source(DataSource("memory_reclaimed_max", "Host memory that could be reclaimed by squeezed", "B"),
                          lambda t: 0.0))
        vif_sums = [sum((x[k::2] for *_r, x in vms), []) for k in (0, 1)]
        spans = [runs for runs, *_r in vms]
        pif_rates: dict[str, list[Callable[[int], float]]] = {"rx": [], "tx": []}
        for idx, dev in enumerate(host.pifs):
            for k, (way, text) in enumerate((("rx", "received"), ("tx", "sent"))):
                base = self._traffic(host.uuid, f"pif_{dev}_{way}", 1e3, 4e3, 1)
                # every VM's traffic is carried by the host's first PIF
                guests = vif_sums[k] if idx == 0 else []
                guest_spans = [runs for runs, *_r, x in vms for _ in x[k::2]] if idx == 0 else []

                @memo  # pif_aggr_* reads it again
                def rate(t: int, base: Callable[[int], float] = base, guests: Sequence[Callable[[int], float]] = guests,
                         guest_spans: Sequence[Callable[[float], bool]] = guest_spans) -> float:
                    return base(t) + sum(g(t) for g, runs in zip(guests, guest_spans, strict=True) if runs(t))

                pif_rates[way].append(rate)
                out.append(Source(DataSource(f"pif_{dev}_{way}", f"Bytes per second {text} on physical interface {dev}",
                                             "B/s", "DERIVE", 0.0), rate))
        for way, text in (("rx", "received"), ("tx", "sent")):
            rates = pif_rates[way]
            out.append(Source(DataSource(f"pif_aggr_{way}", f"Bytes per second {text} on all physical interfaces",
                                         "B/s", "DERIVE", 0.0),
                              lambda t, rates=rates: sum(r(t) for r in rates)))
        vcpus = [(vm.runs, vm.vcpus) for vm in host.vms]
        out.append(Source(DataSource("running_vcpus", "The total number of running vCPUs per host", "count", min=0.0),
                          lambda t: float(sum(c for runs, c in vcpus if runs(t)))))
        out.append(Source(DataSource("running_domains", "The total number of running domains per host", "count",
                                     min=0.0), lambda t: float(sum(1 for runs in spans if runs(t)))))
        xm = self.wave(host.uuid, "xapi_memory").level
        out.append(Source(DataSource("xapi_memory_usage_kib", "Total memory allocated used by xapi daemon", "KiB",
                                     min=0.0), lambda t: math.floor(180_000 + 40_000 * xm(t))))
        out.append(Source(DataSource("xapi_open_fds", "Number of open file descriptors held by xapi", "count",
                                     min=0.0), lambda t: float(math.floor(60 + 40 * xm(t)))))
        return out


# -- round-robin archives, computed on demand -----------------------------------------------------------


@dataclass
class RRD:
    """One object's archives at ``last_updated`` (a step time): its enabled sources and xapi's RRAs.

    Values are computed when read (:meth:`row`); coarse rows come from the owner's cache.
    """

    uuid: str
    last_updated: int
    sources: list[Source]
    rras: tuple[RRA, ...]
    known: Callable[[int], bool]  # whether the object produced data at a step time
    cache: dict[tuple[str, int, int], tuple[float, float, float]] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)  # per source: first step time recorded

    @property
    def names(self) -> list[str]:
        return [s.ds.name for s in self.sources]

    def last_cdp(self, rra: RRA) -> int:
        span = STEP * rra.pdp
        return self.last_updated // span * span

    def cdp(self, src: Source, rra: RRA, end: int) -> float:
        """The ``rra.cf`` consolidation of ``src`` over the row ending at ``end``."""
        first = self.starts.get(src.ds.name, 0)
        if rra.pdp == 1:
            return src.value(end) if end >= first and self.known(end) else NAN
        if end < first:
            return NAN  # the whole row is before the source was recorded (not cached: most rows of a new VM)
        key = (src.ds.name, rra.pdp, end)
        hit = self.cache.get(key)
        if hit is None:
            m = min(rra.pdp, SAMPLES)
            values = []
            for j in range(m):
                t = end - STEP * rra.pdp + STEP * (int((j + 0.5) * rra.pdp / m) + 1)
                if t >= first and self.known(t):
                    values.append(src.value(t))
            if len(values) < m * (1 - rra.xff) or not values:
                hit = (NAN, NAN, NAN)
            else:
                hit = (sum(values) / len(values), min(values), max(values))
            self.cache[key] = hit  # every row read is complete: it ends at or before last_updated
        return hit[1] if rra.cf == "MIN" else hit[2] if rra.cf == "MAX" else hit[0]

    def row(self, rra: RRA, i: int) -> tuple[int, list[float]]:
        """Row ``i`` of ``rra`` counted back from the newest: its time and one value per source."""
        end = self.last_cdp(rra) - i * STEP * rra.pdp
        return end, [self.cdp(s, rra, end) for s in self.sources]

    def latest(self, name: str) -> float:
        """``Rrd.query_named_ds``: the newest 5 s AVERAGE value of ``name`` (KeyError if not recorded)."""
        src = next(s for s in self.sources if s.ds.name == name) if name in self.names else None
        if src is None:
            raise KeyError(name)
        return self.cdp(src, self.rras[0], self.last_cdp(self.rras[0]))


@dataclass
class _Owner:
    fingerprint: tuple[object, ...] = ()
    cache: dict[tuple[str, int, int], tuple[float, float, float]] = field(default_factory=dict)
    recorded: dict[str, int] = field(default_factory=dict)  # non-default sources enabled, since when
    forgotten: dict[str, int] = field(default_factory=dict)  # default sources forgotten: history restarts then


class Metrics:
    """The daemon's statistics: profiles from the store, power history from the hardware, RRDs on demand."""

    def __init__(self, daemon: Daemon, seed: int = 0) -> None:
        self.daemon = daemon
        self.generator = Generator(seed)
        self._lock = threading.Lock()
        self._owners: dict[str, _Owner] = {}
        # Per host uuid: [(from, to | None)] spans during which it was not powered on.
        self._down: dict[str, list[tuple[float, float | None]]] = {}
        # Per host uuid: VMs that ran there and stopped (or left); per VM ref: (host uuid, since) of its
        # current stay when it came by a start or a migration while xapid ran.
        self._past: dict[str, list[VmProfile]] = {}
        self._arrivals: dict[str, tuple[str, float]] = {}
        now = time.time()
        for _ref, rec in daemon.store.items("host"):
            if not daemon.hw.is_running(rec["uuid"]):
                self._down[rec["uuid"]] = [(now, None)]
        daemon.hw.on_power_change(self._power)
        daemon.store.listeners.append(self._on_commit)

    def _power(self, uuid: str, old: str, new: str) -> None:
        now = time.time()
        with self._lock:
            spans = self._down.setdefault(uuid, [])
            if new != "on" and not (spans and spans[-1][1] is None):
                spans.append((now, None))
            elif new == "on" and spans and spans[-1][1] is None:
                spans[-1] = (spans[-1][0], now)
            del spans[:-16]  # the recent history is enough

    def stopped_at(self, host_uuid: str) -> float | None:
        """When ``host_uuid`` went down, if it is down now."""
        with self._lock:
            spans = self._down.get(host_uuid)
            return spans[-1][0] if spans and spans[-1][1] is None else None

    def _known(self, host_uuid: str) -> Callable[[int], bool]:
        with self._lock:
            spans = list(self._down.get(host_uuid, ()))
        if not spans:
            return lambda t: True
        return lambda t: not any(a <= t and (b is None or t < b) for a, b in spans)

    # -- profiles from the store -------------------------------------------------------------------------

    def vm_profile(self, vm_ref: str) -> VmProfile | None:
        """The profile of a running or paused VM with a resident host, else None."""
        rec = self.daemon.store.get("VM", vm_ref)
        if rec is None:
            return None
        return self._profile_of(vm_ref, rec, self.daemon.store.get("VM_metrics", rec["metrics"]))

    def _profile_of(self, vm_ref: str, rec: Record, metrics: Record | None) -> VmProfile | None:
        store = self.daemon.store
        if rec["power_state"] not in RUNNING:
            return None
        host = store.get("host", rec["resident_on"])
        if host is None:
            return None
        vcpus = int(metrics["VCPUs_number"]) if metrics and metrics["VCPUs_number"] else int(rec["VCPUs_at_startup"])
        memory = int(metrics["memory_actual"]) if metrics and metrics["memory_actual"] else int(
            rec["memory_dynamic_max"])
        target = int(rec["memory_target"]) or int(rec["memory_dynamic_max"])
        start = _iso_epoch(str(metrics["start_time"])) if metrics else 0.0
        vifs = sorted(str(v["device"]) for v in (store.get("VIF", r) for r in store.referrers("VIF", "VM", vm_ref))
                      if v is not None and v["currently_attached"] is not False)
        vbds = sorted(str(b["device"]) for b in (store.get("VBD", r) for r in store.referrers("VBD", "VM", vm_ref))
                      if b is not None and b["device"] and not b["empty"])
        return VmProfile(rec["uuid"], max(1, vcpus), memory, target, tuple(vifs), tuple(vbds), start, host["uuid"])

    def resident_vms(self, host_ref: str) -> list[str]:
        store = self.daemon.store
        return [ref for ref in store.referrers("VM", "resident_on", host_ref)
                if (store.get("VM", ref) or {}).get("power_state") in RUNNING]

    def _on_commit(self, _gen: int, changes: list[Change]) -> None:
        """Remember when VMs stop running on a host, or come to one, so a host's history keeps what ran.

        Called under the store lock after every commit: only VM changes are looked at.
        """
        now = time.time()
        old_metrics = {ref: old for cls, ref, _op, old, _new in changes if cls == "VM_metrics" and old is not None}
        for cls, ref, _op, old, new in changes:
            if cls != "VM" or old is None or old.get("is_a_template"):
                continue
            was = old.get("power_state") in RUNNING
            still = new is not None and new.get("power_state") in RUNNING
            moved = still and new is not None and new.get("resident_on") != old.get("resident_on")
            if was and (not still or moved):
                metrics = old_metrics.get(old["metrics"]) or self.daemon.store.get("VM_metrics", old["metrics"])
                profile = self._profile_of(ref, old, metrics)
                if profile is not None:
                    with self._lock:
                        came = self._arrivals.pop(ref, None)
                        if came is not None and came[0] == profile.host:
                            profile.start = max(profile.start, came[1])
                        profile.stop = now
                        runs = self._past.setdefault(profile.host, [])
                        runs.append(profile)
                        del runs[:-PAST_RUNS]
            if still and new is not None and (not was or moved):
                host = self.daemon.store.get("host", new["resident_on"])
                if host is not None:
                    with self._lock:
                        self._arrivals[ref] = (host["uuid"], now)

    def host_profile(self, host_ref: str) -> HostProfile | None:
        store = self.daemon.store
        rec = store.get("host", host_ref)
        if rec is None:
            return None
        metrics = store.get("host_metrics", rec["metrics"])
        try:
            cpus = int(rec["cpu_info"].get("cpu_count", "1"))
        except ValueError:
            cpus = 1
        pif_recs = (store.get("PIF", r) for r in store.referrers("PIF", "host", host_ref))
        pifs = sorted(str(p["device"]) for p in pif_recs if p is not None)
        vms: list[VmProfile] = []
        for ref in self.resident_vms(host_ref):
            p = self.vm_profile(ref)
            if p is not None:
                with self._lock:
                    came = self._arrivals.get(ref)
                if came is not None and came[0] == p.host:
                    p.start = max(p.start, came[1])  # it migrated here: from then on
                vms.append(p)
        with self._lock:
            vms.extend(self._past.get(rec["uuid"], ()))
        total = int(metrics["memory_total"]) if metrics else 0
        return HostProfile(rec["uuid"], max(1, cpus), total, tuple(pifs), tuple(vms))

    # -- RRDs ---------------------------------------------------------------------------------------------

    def _owner(self, uuid: str, fingerprint: tuple[object, ...]) -> _Owner:
        with self._lock:
            owner = self._owners.setdefault(uuid, _Owner())
            if owner.fingerprint != fingerprint or len(owner.cache) > 200_000:
                owner.fingerprint = fingerprint
                owner.cache = {}
            return owner

    def _rrd(self, uuid: str, host_uuid: str, sources: list[Source], fingerprint: tuple[object, ...],
             rras: tuple[RRA, ...], start: float, now: float | None) -> RRD:
        owner = self._owner(uuid, fingerprint)
        now = time.time() if now is None else now
        stopped = self.stopped_at(host_uuid)
        last = int(min(now, stopped) if stopped is not None else now) // STEP * STEP
        first = math.ceil(start / STEP) * STEP
        with self._lock:
            recorded = dict(owner.recorded)
            forgotten = dict(owner.forgotten)
        enabled = [s for s in sources if s.ds.default or s.ds.name in recorded]
        starts = {s.ds.name: max(first, recorded.get(s.ds.name, 0), forgotten.get(s.ds.name, 0)) for s in enabled}
        return RRD(uuid, last, enabled, rras, self._known(host_uuid), owner.cache, starts)

    def vm_rrd(self, vm_ref: str, now: float | None = None) -> RRD | None:
        """The RRD of a running VM (None if it does not run); frozen at its host's stop if that is down."""
        vm = self.vm_profile(vm_ref)
        if vm is None:
            return None
        pool = self.daemon.store.get("pool", self.daemon.pool_ref())
        min_max = bool(pool and pool["other_config"].get(MIN_MAX_KEY) == "true")
        return self._rrd(vm.uuid, vm.host, self.generator.vm_sources(vm), (vm.fingerprint(), min_max),
                         archives(min_max), vm.start, now)

    def host_rrd(self, host_ref: str, now: float | None = None) -> RRD | None:
        """The RRD of a host (always with MIN/MAX archives, as xcp-rrdd makes the host's)."""
        host = self.host_profile(host_ref)
        if host is None:
            return None
        return self._rrd(host.uuid, host.uuid, self.generator.host_sources(host), host.fingerprint(),
                         archives(True), 0.0, now)

    def vm_sources(self, vm_ref: str) -> tuple[str, list[Source]] | None:
        """(uuid, every possible source) of a running VM, else None."""
        vm = self.vm_profile(vm_ref)
        return None if vm is None else (vm.uuid, self.generator.vm_sources(vm))

    def host_sources(self, host_ref: str) -> tuple[str, list[Source]] | None:
        host = self.host_profile(host_ref)
        return None if host is None else (host.uuid, self.generator.host_sources(host))

    # -- data source management (host/VM.record_data_source, forget_data_source_archives) -------------------

    def possible(self, uuid: str, sources: list[Source]) -> list[tuple[DataSource, bool]]:
        """Every data source with whether it is recorded (``query_possible_dss``), by name."""
        with self._lock:
            owner = self._owners.get(uuid) or _Owner()
            recorded = set(owner.recorded)
        return sorted(((s.ds, s.ds.default or s.ds.name in recorded) for s in sources), key=lambda p: p[0].name)

    def record(self, uuid: str, name: str, sources: list[Source]) -> bool:
        """Start recording ``name`` (history from now); False if there is no such source."""
        if name not in {s.ds.name for s in sources}:
            return False
        with self._lock:
            owner = self._owners.setdefault(uuid, _Owner())
            default = any(s.ds.name == name and s.ds.default for s in sources)
            if not default and name not in owner.recorded:
                owner.recorded[name] = int(time.time()) // STEP * STEP + STEP
        return True

    def forget(self, uuid: str, name: str, sources: list[Source]) -> None:
        """Drop ``name``'s archives: a default source starts again from now, another stops being recorded."""
        with self._lock:
            owner = self._owners.setdefault(uuid, _Owner())
            owner.recorded.pop(name, None)
            if any(s.ds.name == name and s.ds.default for s in sources):
                owner.forgotten[name] = int(time.time()) // STEP * STEP + STEP
            owner.cache = {k: v for k, v in owner.cache.items() if k[0] != name}


# -- the XenAPI face (host/VM.get_data_sources, query, record, forget) ----------------------------------


def data_source_record(ds: DataSource, enabled: bool) -> dict[str, object]:
    """xapi's ``data_source`` record (``Rrdd_helper.to_API_data_source``: ``value`` is always 0)."""
    return {"name_label": ds.name, "name_description": ds.description, "enabled": enabled, "standard": ds.default,
            "units": ds.units, "min": float(ds.min), "max": float(ds.max), "value": 0.0}


def invalid_data_source(name: str) -> str:
    """The INTERNAL_ERROR text xapi gives for a data source that is not recorded."""
    return f'Rrd_interface.Rrdd_error(Rrdd_internal_error("Rrd.Invalid_data_source(\\"{name}\\")"))'


def missing_data_source(name: str) -> str:
    """The INTERNAL_ERROR text xapi gives for a data source nobody provides."""
    return f'Rrd_interface.Rrdd_error(Datasource_missing("{name}"))'
