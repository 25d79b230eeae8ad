"""HA planning as pure functions (ha.md 4.10): capacity, placement, failure plans, failover plans.

Records in, answers out: nothing here reads the store (:mod:`xapid.ha.planning` builds the
:class:`Pool` snapshot and writes the answers back).  The rules are xapi's:

* memory (``memory_check.ml``): a host offers ``memory_total - memory_overhead`` to guests; a
  VM uses the memory its accounting policy names (``static_max``, ``dynamic_max`` or
  ``dynamic_min``) plus its ``memory_overhead``.  HA planning is "ultra-conservative": every VM
  resident on (or scheduled to) a host counts with ``static_max``, and so does every protected
  VM to restart.  Starting a VM needs ``dynamic_min`` (``static_max`` for PVH guests) against
  the host's free memory at maximum compression (every resident at ``dynamic_min``);
* protection (``Helpers.vm_should_always_run``): ``ha_always_run`` and priority ``restart``;
* agility (``agility.ml``): every disk on a properly shared SR (``shared`` and a plugged PBD
  on every enabled host), every VIF on a network with a PIF on every enabled host;
* the restart plan and the n-failure question (``xapi_ha_vm_failover.ml``
  ``compute_restart_plan`` / ``plan_for_n_failures``) and the bin packer (``binpack.ml``):
  offline protected VMs are placed first, biggest VM into the host with the most free memory;
  then every ordered sequence of n host failures is simulated when ``binomial(hosts, n) * n!
  < 3500`` and the pool has at most 32 hosts, otherwise a pessimistic approximation is used
  (every VM as big as the biggest, the fullest hosts fail, the biggest hosts fail);
* the maximum failures to tolerate by xapi's bisection (``Helpers.bisect``), capped at the
  host count or, with a ``Cluster``, at corosync's quorum limit (``xapi_clustering.ml``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum

NULL_REF = "OpaqueRef:NULL"

STATIC_MAX = "static_max"
DYNAMIC_MAX = "dynamic_max"
DYNAMIC_MIN = "dynamic_min"

EXHAUSTIVE_LIMIT = 3500  # binpack.ml choose_heuristic: binomial(n, r) * r! below this
EXHAUSTIVE_MAX_HOSTS = 32

NOT_ENOUGH_MEMORY = "HOST_NOT_ENOUGH_FREE_MEMORY"
SR_NOT_SHARED = "HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED"
NETWORK_NOT_SHARED = "HA_CONSTRAINT_VIOLATION_NETWORK_NOT_SHARED"


# -- records ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """What planning needs of a host (``host`` plus its ``host_metrics``)."""

    ref: str
    uuid: str
    memory_total: int
    memory_overhead: int = 0
    enabled: bool = True
    live: bool = True


@dataclass(frozen=True)
class Vm:
    """What planning needs of a VM; ``srs``/``networks`` are those of its disks and VIFs."""

    ref: str
    uuid: str
    static_max: int
    dynamic_max: int | None = None
    dynamic_min: int | None = None
    overhead: int = 0
    domain_type: str = "hvm"
    power_state: str = "Halted"
    resident_on: str = NULL_REF
    scheduled_on: str = NULL_REF
    always_run: bool = False
    restart_priority: str = ""
    is_control_domain: bool = False
    is_template: bool = False
    srs: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()

    def memory(self, policy: str) -> int:
        """Bytes this VM uses (or needs) under an accounting policy, overhead included."""
        if policy == DYNAMIC_MIN:
            base = self.dynamic_min if self.dynamic_min is not None else self.static_max
        elif policy == DYNAMIC_MAX:
            base = self.dynamic_max if self.dynamic_max is not None else self.static_max
        else:
            base = self.static_max
        return int(base) + int(self.overhead)

    def start_memory(self) -> int:
        """What VM.start needs free (``Xapi_vm_helpers.assert_enough_memory_available``)."""
        return self.memory(STATIC_MAX if self.domain_type in ("pv_in_pvh", "pvh") else DYNAMIC_MIN)


@dataclass(frozen=True)
class Topology:
    """Storage and network reachability, for agility and for pinning non-agile VMs."""

    enabled_hosts: frozenset[str] = frozenset()
    sr_shared: Mapping[str, bool] = field(default_factory=dict)
    sr_attached: Mapping[str, frozenset[str]] = field(default_factory=dict)  # hosts with a plugged PBD
    network_hosts: Mapping[str, frozenset[str]] = field(default_factory=dict)  # hosts with a PIF on it


@dataclass
class Pool:
    """A snapshot of the pool: every host, every VM (residents count for capacity), the topology."""

    hosts: dict[str, Host]
    vms: dict[str, Vm]
    topology: Topology = field(default_factory=Topology)
    _residents: dict[str, list[Vm]] | None = field(default=None, repr=False)
    _free: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    def residents(self, host: str) -> list[Vm]:
        """VMs resident on or scheduled to ``host`` (what Memory_check counts)."""
        if self._residents is None:
            by_host: dict[str, list[Vm]] = {h: [] for h in self.hosts}
            for vm in self.vms.values():
                for h in {vm.resident_on, vm.scheduled_on}:
                    if h in by_host:
                        by_host[h].append(vm)
            self._residents = by_host
        return self._residents.get(host, [])

    def free(self, host: str, policy: str) -> int:
        """:func:`host_free` of ``host`` with every resident counted (cached: a snapshot is immutable)."""
        key = (host, policy)
        if key not in self._free:
            self._free[key] = host_free(self.hosts[host], self.residents(host), policy)
        return self._free[key]

    def sorted_hosts(self) -> list[Host]:
        return sorted(self.hosts.values(), key=lambda h: h.uuid)


def is_protected(vm: Vm) -> bool:
    """``Helpers.vm_should_always_run``; templates and control domains never are."""
    return (vm.always_run and vm.restart_priority == "restart"
            and not vm.is_template and not vm.is_control_domain)


# -- capacity --------------------------------------------------------------------------------------


def guest_capacity(host: Host) -> int:
    """``memory_total - memory_overhead``: what guests (dom0 included) may use on the host."""
    return int(host.memory_total) - int(host.memory_overhead)


def host_free(host: Host, residents: Iterable[Vm], policy: str, ignore: str | None = None) -> int:
    """Free memory counting every resident VM under ``policy`` (never below 0)."""
    used = sum(vm.memory(policy) for vm in residents if vm.ref != ignore)
    return max(0, guest_capacity(host) - used)


def balloon(host: Host, residents: Iterable[Vm]) -> tuple[dict[str, int], int]:
    """Memory each resident VM gets and the host's ``memory_free``, as squeezed shares it out.

    Every VM gets ``dynamic_max`` while that fits; otherwise all are ballooned down by the same
    fraction of their ``dynamic_max - dynamic_min`` range, never below ``dynamic_min``.
    Returns (VM ref -> memory actual, free memory).
    """
    vms = list(residents)
    cap = guest_capacity(host)
    low = sum(vm.memory(DYNAMIC_MIN) for vm in vms)
    high = sum(vm.memory(DYNAMIC_MAX) for vm in vms)
    if high <= cap:
        fraction = 1.0
    elif low >= cap:
        fraction = 0.0
    else:
        fraction = (cap - low) / (high - low)
    targets = {}
    for vm in vms:
        lo = vm.memory(DYNAMIC_MIN) - vm.overhead
        hi = max(lo, vm.memory(DYNAMIC_MAX) - vm.overhead)
        targets[vm.ref] = lo + math.floor((hi - lo) * fraction)
    used = sum(targets[vm.ref] + vm.overhead for vm in vms)
    return targets, max(0, cap - used)


# -- agility ---------------------------------------------------------------------------------------


def agility_error(vm: Vm, topology: Topology) -> tuple[str, str] | None:
    """Why ``vm`` could not restart on every enabled host (``Agility.vm_assert_agile``), or None."""
    for sr in vm.srs:
        attached = topology.sr_attached.get(sr, frozenset())
        if not topology.sr_shared.get(sr, False) or not topology.enabled_hosts <= attached:
            return (SR_NOT_SHARED, sr)
    for net in vm.networks:
        if not topology.enabled_hosts <= topology.network_hosts.get(net, frozenset()):
            return (NETWORK_NOT_SHARED, net)
    return None


def can_boot_on(vm: Vm, host: str, topology: Topology) -> bool:
    """Storage and networks reachable from ``host`` (the boot check without memory)."""
    return (all(host in topology.sr_attached.get(sr, frozenset()) for sr in vm.srs)
            and all(host in topology.network_hosts.get(net, frozenset()) for net in vm.networks))


# -- the bin packer (binpack.ml) -------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """A planning configuration: live hosts' free memory, VM sizes, where VMs are now."""

    hosts: dict[str, int]  # live host -> free bytes, in a deterministic order
    vms: dict[str, int]  # VM -> bytes it needs
    placement: dict[str, str]  # VM -> live host it is on
    total_hosts: int
    num_failures: int


def biggest_fit_decreasing(things: Iterable[tuple[str, int]], bins: Iterable[tuple[str, int]]) -> dict[str, str]:
    """Each thing, biggest first, into the bin with the most room; things that fit nowhere are left out."""
    ordered = sorted(things, key=lambda t: -t[1])  # stable: ties keep the caller's order
    heap = [(-free, i, b) for i, (b, free) in enumerate(bins)]
    heapq.heapify(heap)
    placed: dict[str, str] = {}
    seq = 0
    for thing, size in ordered:
        if not heap or -heap[0][0] < size:
            continue
        free, _i, b = heapq.heappop(heap)
        seq -= 1  # a refilled bin goes before bins of equal room, as binpack.ml's insert does
        heapq.heappush(heap, (free + size, seq, b))
        placed[thing] = b
    return placed


def pack(config: Config, failed: Iterable[str]) -> dict[str, str]:
    """``pack_failed_vms_onto_live_hosts``: a (possibly partial) VM -> host plan."""
    return biggest_fit_decreasing(((vm, config.vms[vm]) for vm in failed), config.hosts.items())


def account(hosts: Mapping[str, int], sizes: Mapping[str, int], plan: Mapping[str, str]) -> dict[str, int]:
    """Host free memory after the VMs of ``plan`` start where it says (unknown hosts ignored)."""
    out = dict(hosts)
    for vm, host in plan.items():
        if host in out:
            out[host] -= sizes[vm]
    return out


def apply_plan(config: Config, plan: Mapping[str, str]) -> Config:
    placement = dict(config.placement)
    placement.update(plan)
    return replace(config, hosts=account(config.hosts, config.vms, plan), placement=placement)


def trivially_impossible(config: Config) -> bool:
    """Fewer live hosts than failures, or exactly as many while there is something to protect."""
    n = len(config.hosts)
    return n < config.num_failures or (n == config.num_failures and bool(config.vms))


def exhaustive(config: Config) -> bool:
    """Every ordered sequence of ``num_failures`` distinct live hosts failing can be survived."""
    if trivially_impossible(config):
        return False
    on_host: dict[str, list[str]] = {h: [] for h in config.hosts}
    for vm, h in config.placement.items():
        on_host[h].append(vm)

    def survive(free: dict[str, int], where: dict[str, list[str]], left: int) -> bool:
        if left == 0:
            return True
        for dead in list(free):
            rest = {h: f for h, f in free.items() if h != dead}
            failed = where[dead]
            plan = biggest_fit_decreasing(((vm, config.vms[vm]) for vm in failed), rest.items())
            if len(plan) != len(failed):
                return False
            moved = dict(where)
            del moved[dead]
            for vm, h in plan.items():
                rest[h] -= config.vms[vm]
                moved[h] = [*moved[h], vm]
            if not survive(rest, moved, left - 1):
                return False
        return True

    return survive(dict(config.hosts), on_host, config.num_failures)


def approximate(config: Config) -> bool:
    """The pessimistic single bin pack: biggest VMs, fullest hosts failing, biggest hosts gone."""
    if trivially_impossible(config):
        return False
    if not config.vms:
        return True
    biggest = max(config.vms.values())
    r = config.num_failures
    if biggest <= 0:
        return True  # nothing needs memory (xapi divides by zero here and finds no plan)
    # How many of the biggest VM each host could still take (OCaml's division truncates toward 0).
    capacity = sorted((int(free / biggest) if free < 0 else free // biggest for free in config.hosts.values()),
                      reverse=True)
    counts: dict[str, int] = dict.fromkeys(config.hosts, 0)
    for h in config.placement.values():
        counts[h] += 1
    to_move = sum(sorted(counts.values(), reverse=True)[:r])
    return to_move <= sum(capacity[r:])


def uses_exhaustive(total_hosts: int, r: int) -> bool:
    """binpack.ml ``choose_heuristic``."""
    if total_hosts > EXHAUSTIVE_MAX_HOSTS or r > total_hosts:
        return False
    return math.comb(total_hosts, r) * math.factorial(r) < EXHAUSTIVE_LIMIT


def plan_always_possible(config: Config) -> bool:
    if uses_exhaustive(config.total_hosts, config.num_failures):
        return exhaustive(config)
    return approximate(config)


# -- restart plans and n-failure plans (xapi_ha_vm_failover.ml) -------------------------------------


@dataclass(frozen=True)
class Change:
    """A proposed change to reason about (``configuration_change``)."""

    leaving: Mapping[str, str] = field(default_factory=dict)  # VM -> host it leaves
    arriving: Mapping[str, str] = field(default_factory=dict)  # VM -> host it arrives on
    hosts_to_disable: frozenset[str] = frozenset()
    num_failures: int | None = None
    new_vms_to_protect: tuple[str, ...] = ()


NO_CHANGE = Change()


class Verdict(Enum):
    ALL = "plan exists for all protected VMs"
    EXCLUDING_NON_AGILE = "plan exists only when non-agile protected VMs are ignored"
    NONE = "no plan exists"


@dataclass(frozen=True)
class RestartPlan:
    plan: dict[str, str]  # offline protected VM -> host (non-agile ones: their pinned host)
    config: Config  # the world after the plan, for questions about future failures
    not_restarted: tuple[str, ...]
    non_agile: bool  # some protected VM is not agile


class PlanError(Exception):
    """A configuration the planner refuses (more failures than hosts, a negative count)."""


def live_hosts(pool: Pool, live_set: Iterable[str] | None, change: Change = NO_CHANGE) -> list[Host]:
    """Enabled, live hosts of the live set (all of them when None), not about to be disabled; by uuid."""
    allowed = None if live_set is None else set(live_set)
    return [h for h in pool.sorted_hosts()
            if h.enabled and h.live and h.ref not in change.hosts_to_disable
            and (allowed is None or h.ref in allowed)]


def _arrival_memory(vm: Vm) -> int:
    return vm.memory(DYNAMIC_MAX if vm.is_control_domain else STATIC_MAX)


def restart_plan(pool: Pool, protected: Iterable[str], live_set: Iterable[str] | None = None,
                 change: Change = NO_CHANGE, num_failures: int = 0) -> RestartPlan:
    """Place every offline protected VM (``compute_restart_plan``); raises PlanError on a bad count."""
    n = change.num_failures if change.num_failures is not None else num_failures
    refs = list(dict.fromkeys([*protected, *change.new_vms_to_protect]))
    vms: list[Vm] = []
    for ref in refs:
        vm = pool.vms[ref]
        if ref in change.arriving:
            vm = replace(vm, resident_on=change.arriving[ref])
        elif ref in change.leaving:
            vm = replace(vm, resident_on=NULL_REF)
        vms.append(vm)
    vms.sort(key=lambda v: v.uuid)
    hosts = live_hosts(pool, live_set, change)
    live = {h.ref for h in hosts}

    def accounted(vm: Vm) -> str | None:
        if vm.resident_on in live:
            return vm.resident_on
        if vm.scheduled_on in live:
            return vm.scheduled_on
        return None

    free: dict[str, int] = {}
    for h in hosts:
        amount = pool.free(h.ref, STATIC_MAX)
        for ref, dest in change.arriving.items():
            if dest == h.ref:
                amount -= _arrival_memory(pool.vms[ref])
        for ref, src in change.leaving.items():
            if src == h.ref:
                amount += _arrival_memory(pool.vms[ref])
        free[h.ref] = amount
    sizes = {vm.ref: vm.memory(STATIC_MAX) for vm in vms}
    agile: list[Vm] = []
    non_agile: list[Vm] = []
    for vm in vms:
        (agile if agility_error(vm, pool.topology) is None else non_agile).append(vm)
    # A non-agile VM is pinned to the first host (all hosts, by uuid) that could boot it, and its
    # memory is charged there if it must be restarted; one that fits nowhere is simply dropped.
    everywhere = [h.ref for h in pool.sorted_hosts()]
    pinned: dict[str, str] = {}
    for vm in non_agile:
        host = next((h for h in everywhere if can_boot_on(vm, h, pool.topology)), None)
        if host is not None and accounted(vm) is None:
            pinned[vm.ref] = host
    free = account(free, sizes, pinned)
    placement = {vm.ref: h for vm in agile if (h := accounted(vm)) is not None}
    failed = [vm.ref for vm in agile if vm.ref not in placement]
    if n < 0 or n > len(pool.hosts):
        raise PlanError(f"cannot plan for {n} failures of {len(pool.hosts)} hosts")
    config = Config({h: free[h] for h in free}, {vm.ref: sizes[vm.ref] for vm in agile}, placement,
                    len(pool.hosts), n)
    agile_plan = pack(config, failed)
    not_restarted = tuple(vm.ref for vm in vms if accounted(vm) is None and vm.ref not in agile_plan)
    return RestartPlan({**pinned, **agile_plan}, apply_plan(config, agile_plan), not_restarted, bool(non_agile))


def verdict(rp: RestartPlan, n: int) -> Verdict:
    """Whether the world of ``rp`` survives any ``n`` host failures (the rest of plan_for_n_failures)."""
    if rp.not_restarted:
        return Verdict.NONE
    if n < 0 or n > rp.config.total_hosts:
        return Verdict.NONE
    if not plan_always_possible(replace(rp.config, num_failures=n)):
        return Verdict.NONE
    return Verdict.EXCLUDING_NON_AGILE if rp.non_agile else Verdict.ALL


def plan_for_n_failures(pool: Pool, protected: Iterable[str], n: int, live_set: Iterable[str] | None = None,
                        change: Change = NO_CHANGE) -> Verdict:
    """Whether every protected VM survives any ``n`` host failures (after the proposed ``change``)."""
    n = change.num_failures if change.num_failures is not None else n
    try:
        rp = restart_plan(pool, protected, live_set, change, n)
    except PlanError:
        return Verdict.NONE
    return verdict(rp, n)


def bisect(ok: Callable[[int], bool], lower: int, upper: int) -> int:
    """The largest k in [lower, upper] with ``ok(k)`` for a monotonic ``ok`` (``Helpers.bisect``).

    As in xapi, ``ok(lower)`` is never asked: ``lower`` is the answer when nothing above works.
    """
    while upper - lower >= 2:
        mid = (upper + lower) // 2
        if ok(mid):
            lower = mid
        else:
            upper = mid
    return upper if ok(upper) else lower


def corosync_cap(hosts: int, without_enabled_cluster_host: int) -> int:
    """``compute_corosync_max_host_failures``: fewer than half the clustered hosts may fail."""
    clustered = hosts - without_enabled_cluster_host - 1
    return int(clustered / 2) + without_enabled_cluster_host  # OCaml's division truncates toward 0


def max_failures(pool: Pool, protected: Iterable[str], live_set: Iterable[str] | None = None,
                 cap: int | None = None) -> int:
    """``compute_max_host_failures_to_tolerate``: bisection over [0, cap or the host count]."""
    upper = len(pool.hosts) if cap is None else cap
    try:
        rp = restart_plan(pool, protected, live_set, NO_CHANGE, 0)
    except PlanError:
        return 0
    return max_failures_of(rp, upper)


def max_failures_of(rp: RestartPlan, upper: int) -> int:
    """:func:`max_failures` for an already computed restart plan."""
    if upper <= 0:
        return 0
    return bisect(lambda k: verdict(rp, k) is Verdict.ALL, 0, upper)


def restart_placement(pool: Pool, protected: Iterable[str], vms: Iterable[str], live_set: Iterable[str],
                      num_failures: int = 0) -> tuple[dict[str, str], list[str]]:
    """Where to restart ``vms`` on the live set, planning every protected VM as well.

    Returns (VM -> host for the ``vms`` that fit, the ``vms`` that do not), both in ``vms`` order.
    A non-agile VM goes to its pinned host only if that host is live.
    """
    wanted = list(dict.fromkeys(vms))
    live = set(live_set)
    n = max(0, min(num_failures, len(pool.hosts)))
    rp = restart_plan(pool, protected, live, Change(new_vms_to_protect=tuple(wanted)), n)
    placement = {vm: rp.plan[vm] for vm in wanted if rp.plan.get(vm) in live}
    return placement, [vm for vm in wanted if vm not in placement]


def failover_plan(pool: Pool, failed_hosts: Iterable[str], failed_vms: Iterable[str]) -> dict[str, dict[str, str]]:
    """``Pool.ha_compute_vm_failover_plan``: each VM -> ``{host: ref}`` or ``{error_code: code}``.

    As xapi's ``compute_evacuation_plan``: the live hosts outside ``failed_hosts`` offer their
    free memory at maximum compression, each VM needs its start memory, biggest first into the
    roomiest host.  A VM left out gets its agility error code, or HOST_NOT_ENOUGH_FREE_MEMORY.
    """
    dead = set(failed_hosts)
    vms = [pool.vms[ref] for ref in dict.fromkeys(failed_vms)]
    hosts = [h for h in pool.sorted_hosts() if h.live and h.ref not in dead]
    bins = [(h.ref, pool.free(h.ref, DYNAMIC_MIN)) for h in hosts]
    plan = biggest_fit_decreasing(((vm.ref, vm.start_memory()) for vm in sorted(vms, key=lambda v: v.uuid)), bins)
    out: dict[str, dict[str, str]] = {}
    for vm in vms:
        if vm.ref in plan:
            out[vm.ref] = {"host": plan[vm.ref]}
        else:
            error = agility_error(vm, pool.topology)
            out[vm.ref] = {"error_code": error[0] if error else NOT_ENOUGH_MEMORY}
    return out
