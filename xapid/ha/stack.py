"""Which cluster stack the pool needs (ha.md 1.4) and the storage rules around it.

Choosing follows xapi's ``choose_cluster_stack`` exactly: the attached PBDs
of the master, each SR's SM ``required_cluster_stack`` alternatives,
intersected in the first list's order; with no SR constraint, the stacks of
``Cluster`` objects; otherwise the configured default.  The design's extra
rules (an explicit stack must satisfy every constraint; two SRs needing
different stacks are never attached together) live here too.
"""

from __future__ import annotations

from xapid.errors import ApiError, internal
from xapid.schema import NULL_REF
from xapid.storage import sm_of
from xapid.store import Transaction


def sr_requirement(tx: Transaction, sr: str) -> list[str]:
    """The stacks any one of which the SR's driver accepts ([] = no constraint)."""
    rec = tx.read("SR", sr)
    if rec is None:
        return []
    sm = sm_of(tx, rec["type"])
    if sm is None:
        raise internal("SR type not found in SM table.")
    return list(sm[1].get("required_cluster_stack") or [])


def attached_requirements(tx: Transaction, host: str | None) -> list[tuple[str, list[str]]]:
    """(SR ref, alternatives) for every constrained SR with an attached PBD (on ``host``, or anywhere)."""
    out: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for _ref, pbd in tx.items("PBD"):
        if not pbd["currently_attached"] or (host is not None and pbd["host"] != host):
            continue
        sr = pbd["SR"]
        if sr in seen or sr == NULL_REF:
            continue
        seen.add(sr)
        alts = sr_requirement(tx, sr)
        if alts:
            out.append((sr, alts))
    return out


def choose(tx: Transaction, master: str, default: str) -> str:
    """The stack ``pool.enable_ha`` must use when the caller does not name one."""
    reqs = attached_requirements(tx, master)
    if not reqs:
        stacks: list[str] = []
        for _ref, cluster in tx.items("Cluster"):
            if cluster["cluster_stack"] not in stacks:
                stacks.append(cluster["cluster_stack"])
        if len(stacks) > 1:
            raise internal("Conflicting cluster stack demands.")
        return stacks[0] if stacks else default
    common = list(reqs[0][1])
    for _sr, alts in reqs[1:]:
        common = [s for s in common if s in alts]
    if not common:
        raise internal("Conflicting cluster stack demands.")
    return common[0]


def check_explicit(tx: Transaction, master: str, stack: str) -> None:
    """An explicitly requested stack must satisfy every attached SR (``CLUSTER_STACK_CONSTRAINT``)."""
    for sr, alts in attached_requirements(tx, master):
        if stack not in alts:
            raise ApiError("CLUSTER_STACK_CONSTRAINT", sr, ",".join(alts))


def check_plug(tx: Transaction, pbd: str) -> None:
    """Refuse to attach a PBD whose SR conflicts with the active or another attached stack demand."""
    rec = tx.get("PBD", pbd)
    sr = tx.get("SR", rec["SR"])
    sm = sm_of(tx, sr["type"])
    if sm is None:
        raise ApiError("SR_UNKNOWN_DRIVER", sr["type"])
    alts = list(sm[1].get("required_cluster_stack") or [])
    if not alts:
        return
    pool_ref = tx.refs("pool")[0]
    pool = tx.read("pool", pool_ref)
    assert pool is not None
    if pool["ha_enabled"] and pool["ha_cluster_stack"] not in alts:
        raise ApiError("INCOMPATIBLE_CLUSTER_STACK_ACTIVE", ",".join(alts))
    for other_sr, other_alts in attached_requirements(tx, None):
        if other_sr != rec["SR"] and not set(alts) & set(other_alts):
            raise ApiError("CLUSTER_STACK_CONSTRAINT", other_sr, ",".join(other_alts))
