"""Cluster and Cluster_host: clustered pools over real corosync (xapi_cluster.ml, xapi_cluster_host.ml).

The checks and errors are xapi's (xapi_clustering.ml): only the ``corosync`` stack
(INVALID_CLUSTER_STACK), ``token_timeout`` at least 1 s and ``token_timeout_coefficient`` at least
0.65 s (INVALID_VALUE), a PIF that cannot be unplugged (PIF_ALLOWS_UNPLUG), is attached
(REQUIRED_PIF_IS_UNPLUGGED) and has an IP (PIF_HAS_NO_NETWORK_CONFIGURATION), one Cluster_host per
host, destroy only of an enabled non-last Cluster_host (CLUSTERING_DISABLED, CLUSTER_HOST_IS_LAST),
disable/destroy refused while an attached SR needs the stack (CLUSTER_STACK_IN_USE), and
Cluster.destroy only with at most one Cluster_host left (CLUSTER_DOES_NOT_HAVE_ONE_NODE).  What
xapi-clusterd does on each host is :mod:`xapid.clusterd`: each node is a real corosync in the
host's network namespace.  A joining Cluster_host gets ``disallow_unplug`` set on its PIF, as
xapi's join does.
"""

from __future__ import annotations

import secrets
from typing import Any

from xapid.api import Call, handler
from xapid.errors import ApiError, internal
from xapid.ha import stack as stack_rules

STACKS = ("corosync",)
MIN_TOKEN_TIMEOUT = 1.0
MIN_TOKEN_COEFFICIENT = 0.65


def _validate(token_timeout: float, coefficient: float) -> None:
    if float(token_timeout) < MIN_TOKEN_TIMEOUT:
        raise ApiError("INVALID_VALUE", "token_timeout", str(float(token_timeout)))
    if float(coefficient) < MIN_TOKEN_COEFFICIENT:
        raise ApiError("INVALID_VALUE", "token_timeout_coefficient", str(float(coefficient)))


def _assert_pif(call: Call, pif: str) -> None:
    rec = call.store.get("PIF", pif)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "PIF", pif)
    if not rec["disallow_unplug"]:
        raise ApiError("PIF_ALLOWS_UNPLUG", pif)
    if not rec["currently_attached"]:
        raise ApiError("REQUIRED_PIF_IS_UNPLUGGED", pif)
    if not rec["IP"]:
        raise ApiError("PIF_HAS_NO_NETWORK_CONFIGURATION", pif)


def _pif_of_host(call: Call, network: str, host: str) -> str:
    pifs = [r for r, p in call.store.items("PIF") if p["host"] == host and p["network"] == network]
    if len(pifs) != 1:
        raise internal(f"No PIF found for host:{host} and network:{network}")
    return pifs[0]


def _host_uuid(call: Call, host: str) -> str:
    rec = call.store.get("host", host)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "host", host)
    return str(rec["uuid"])


def _assert_no_sr_needs_stack(call: Call, cluster_host: str) -> None:
    """xapi_clustering.ml assert_cluster_host_has_no_attached_sr_which_requires_cluster_stack."""
    rec = call.store.get("Cluster_host", cluster_host)
    cluster = call.store.get("Cluster", rec["cluster"]) if rec else None
    if rec is None or cluster is None:
        return
    with call.store.transaction() as tx:
        for _sr, alternatives in stack_rules.attached_requirements(tx, rec["host"]):
            if cluster["cluster_stack"] in alternatives:
                raise ApiError("CLUSTER_STACK_IN_USE", cluster["cluster_stack"])


def _cluster_host(call: Call, ref: str) -> dict[str, Any]:
    rec = call.store.get("Cluster_host", ref)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "Cluster_host", ref)
    return rec


# -- Cluster --------------------------------------------------------------------------------------


@handler("Cluster.create")
def create(call: Call, PIF: str, cluster_stack: str, pool_auto_join: bool, token_timeout: float,  # noqa: N803
           token_timeout_coefficient: float) -> str:
    """A one-node cluster on the master (xapi_cluster.ml create)."""
    if cluster_stack not in STACKS:
        raise ApiError("INVALID_CLUSTER_STACK", cluster_stack)
    _validate(token_timeout, token_timeout_coefficient)
    if call.store.refs("Cluster"):
        raise internal("Cluster cannot be created because it already exists")
    master = call.daemon.master_ref()
    _assert_pif(call, PIF)
    if call.store.get("PIF", PIF)["host"] != master:
        raise ApiError("PIF_NOT_ATTACHED_TO_HOST", PIF, master)
    uuid = _host_uuid(call, master)
    settings = {"token_timeout": float(token_timeout), "token_timeout_coefficient": float(token_timeout_coefficient)}
    clusterd = call.daemon.clusterd
    try:
        clusterd.start(uuid, [uuid], settings)
    except ApiError:
        clusterd.stop(uuid)
        _release_network(call)
        raise
    with call.store.transaction() as tx:
        cluster = tx.create("Cluster", {
            "cluster_token": secrets.token_hex(16), "cluster_stack": cluster_stack, "cluster_stack_version": 3,
            "pool_auto_join": bool(pool_auto_join), **settings, "allowed_operations": ["add", "remove", "enable",
                                                                                       "disable", "destroy"]})
        tx.create("Cluster_host", {"cluster": cluster, "host": master, "enabled": True, "PIF": PIF, "joined": True,
                                   "live": True, "allowed_operations": ["enable", "disable", "destroy"]})
    clusterd.sync()
    return cluster


def _release_network(call: Call) -> None:
    pool = call.store.get("pool", call.daemon.pool_ref()) or {}
    if not call.store.refs("Cluster") and not pool.get("ha_enabled"):
        call.daemon.hw.release_cluster_network()


@handler("Cluster.destroy")
def destroy(call: Call, self: str) -> None:
    rec = call.store.get("Cluster", self)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "Cluster", self)
    hosts = call.store.referrers("Cluster_host", "cluster", self)
    if len(hosts) > 1:
        raise ApiError("CLUSTER_DOES_NOT_HAVE_ONE_NODE", str(len(hosts)))
    for ch in hosts:
        _assert_no_sr_needs_stack(call, ch)
        _force_destroy(call, ch)
    with call.store.transaction() as tx:
        tx.delete("Cluster", self)
    _release_network(call)


@handler("Cluster.pool_create")
def pool_create(call: Call, network: str, cluster_stack: str, token_timeout: float,
                token_timeout_coefficient: float) -> str:
    """Cluster.create on the master, then Cluster_host.create for every other host (xapi_cluster.ml)."""
    _validate(token_timeout, token_timeout_coefficient)
    master = call.daemon.master_ref()
    pif = _pif_of_host(call, network, master)
    cluster = create(call, pif, cluster_stack, True, token_timeout, token_timeout_coefficient)
    try:
        for host in call.store.refs("host"):
            if host != master:
                cluster_host_create(call, cluster, host, _pif_of_host(call, network, host))
    except ApiError:
        pool_force_destroy(call, cluster)
        raise
    return cluster


@handler("Cluster.pool_destroy")
def pool_destroy(call: Call, self: str) -> None:
    """Every slave's Cluster_host leaves, then the cluster goes (xapi_cluster.ml pool_destroy)."""
    if call.store.get("Cluster", self) is None:
        raise ApiError("HANDLE_INVALID", "Cluster", self)
    with call.store.transaction() as tx:
        tx.update("Cluster", self, pool_auto_join=False)
    master = call.daemon.master_ref()
    for ch in call.store.referrers("Cluster_host", "cluster", self):
        if call.store.get("Cluster_host", ch)["host"] != master:
            cluster_host_destroy(call, ch)
    destroy(call, self)


@handler("Cluster.pool_force_destroy")
def pool_force_destroy(call: Call, self: str) -> None:
    if call.store.get("Cluster", self) is None:
        raise ApiError("HANDLE_INVALID", "Cluster", self)
    for ch in call.store.referrers("Cluster_host", "cluster", self):
        _force_destroy(call, ch)
    with call.store.transaction() as tx:
        tx.delete("Cluster", self)
    _release_network(call)


@handler("Cluster.get_network")
def get_network(call: Call, self: str) -> str:
    networks = {call.store.get("PIF", call.store.get("Cluster_host", ch)["PIF"])["network"]
                for ch in call.store.referrers("Cluster_host", "cluster", self)}
    if len(networks) != 1:
        raise internal(f"No common network found for cluster {self}")
    return str(networks.pop())


@handler("Cluster.pool_resync")
def pool_resync(call: Call, self: str) -> None:
    """Start the node of every enabled Cluster_host of a running host that is not running."""
    for host in call.store.refs("host"):
        if call.daemon.hw.is_running(_host_uuid(call, host)):
            call.daemon.clusterd.resync_host(host)


# -- Cluster_host ---------------------------------------------------------------------------------


def _settings(call: Call, cluster: str) -> dict[str, Any]:
    rec = call.store.get("Cluster", cluster)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "Cluster", cluster)
    return rec


@handler("Cluster_host.create")
def cluster_host_create(call: Call, cluster: str, host: str, pif: str) -> str:
    """A record for ``host``, then its join (xapi_cluster_host.ml create, join_internal)."""
    settings = _settings(call, cluster)
    uuid = _host_uuid(call, host)
    pif_rec = call.store.get("PIF", pif)
    if pif_rec is None or pif_rec["host"] != host:
        raise ApiError("PIF_NOT_ATTACHED_TO_HOST", pif, host)
    if any(rec["host"] == host for _r, rec in call.store.items("Cluster_host")):
        raise internal("Cluster host cannot be created because it already exists")
    with call.store.transaction() as tx:
        ref = tx.create("Cluster_host", {"cluster": cluster, "host": host, "PIF": pif, "joined": False,
                                         "enabled": False, "live": False,
                                         "allowed_operations": ["enable", "disable", "destroy"]})
    # join_internal: fix_pif_prerequisites, then a peer must have an address.
    with call.store.transaction() as tx:
        tx.update("PIF", pif, disallow_unplug=True)
    _assert_pif(call, pif)
    peers = [u for u in call.daemon.clusterd.members(cluster) if u != uuid]
    if not peers:
        raise ApiError("NO_CLUSTER_HOSTS_REACHABLE", cluster)
    members = [*peers, uuid]
    clusterd = call.daemon.clusterd
    clusterd.reload(peers, members, settings)
    clusterd.start(uuid, members, settings)
    with call.store.transaction() as tx:
        tx.update("Cluster_host", ref, joined=True, enabled=True)
    clusterd.sync()
    return ref


@handler("Cluster_host.enable")
def cluster_host_enable(call: Call, self: str) -> None:
    rec = _cluster_host(call, self)
    _assert_pif(call, rec["PIF"])
    call.daemon.clusterd.start(_host_uuid(call, rec["host"]), call.daemon.clusterd.members(rec["cluster"]),
                               _settings(call, rec["cluster"]))
    with call.store.transaction() as tx:
        tx.update("Cluster_host", self, enabled=True)
    call.daemon.clusterd.sync()


@handler("Cluster_host.disable")
def cluster_host_disable(call: Call, self: str) -> None:
    rec = _cluster_host(call, self)
    _assert_no_sr_needs_stack(call, self)
    call.daemon.clusterd.stop(_host_uuid(call, rec["host"]))
    with call.store.transaction() as tx:
        tx.update("Cluster_host", self, enabled=False)
    call.daemon.clusterd.sync()


@handler("Cluster_host.destroy")
def cluster_host_destroy(call: Call, self: str) -> None:
    """Leave the cluster (xapi_cluster_host.ml destroy): enabled, not the last, no SR needing the stack."""
    rec = _cluster_host(call, self)
    if not rec["enabled"]:
        raise ApiError("CLUSTERING_DISABLED", self)
    if len(call.store.referrers("Cluster_host", "cluster", rec["cluster"])) == 1:
        raise ApiError("CLUSTER_HOST_IS_LAST", self)
    _assert_no_sr_needs_stack(call, self)
    _force_destroy(call, self)


@handler("Cluster_host.force_destroy")
def cluster_host_force_destroy(call: Call, self: str) -> None:
    _cluster_host(call, self)
    _force_destroy(call, self)


def _force_destroy(call: Call, self: str) -> None:
    rec = _cluster_host(call, self)
    clusterd = call.daemon.clusterd
    uuid = _host_uuid(call, rec["host"])
    clusterd.stop(uuid)
    with call.store.transaction() as tx:
        tx.delete("Cluster_host", self)
    cluster = call.store.get("Cluster", rec["cluster"])
    if cluster is not None:
        rest = clusterd.members(rec["cluster"])
        if rest:
            clusterd.reload(rest, rest, cluster)
    clusterd.sync()


@handler("Cluster_host.forget")
def cluster_host_forget(call: Call, self: str) -> None:
    forget_cluster_host(call, self)


def forget_cluster_host(call: Call, self: str) -> None:
    """Declare a dead member permanently gone (xapi_cluster_host.ml forget, message_forwarding.ml).

    Its address goes to ``Cluster.pending_forget`` until the survivors' corosync runs without it
    (nodelist rewritten and reloaded, so the expected votes drop), then the record is destroyed.
    """
    rec = _cluster_host(call, self)
    cluster = _settings(call, rec["cluster"])
    pif = call.store.get("PIF", rec["PIF"]) or {}
    with call.store.transaction() as tx:
        tx.update("Cluster_host", self, joined=False)
        pending = sorted({*cluster["pending_forget"], str(pif.get("IP", ""))})
        tx.update("Cluster", rec["cluster"], pending_forget=pending)
    clusterd = call.daemon.clusterd
    clusterd.stop(_host_uuid(call, rec["host"]))  # a member declared dead never runs again
    rest = clusterd.members(rec["cluster"])
    if rest:
        clusterd.reload(rest, rest, _settings(call, rec["cluster"]))
    with call.store.transaction() as tx:
        tx.update("Cluster", rec["cluster"], pending_forget=[])
        tx.delete("Cluster_host", self)
    clusterd.sync()
