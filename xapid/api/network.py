"""network and VLAN: referential integrity on destroy, VLANs on a PIF (xapi_network.ml, xapi_vlan.ml)."""

from __future__ import annotations

from typing import Any

from xapid.api import Call, handler
from xapid.errors import ApiError
from xapid.schema import NULL_REF
from xapid.store import Transaction

VLAN_MAC = "fe:ff:ff:ff:ff:ff"  # the dummy MAC of a VLAN's untagged PIF


@handler("network.destroy")
def destroy(call: Call, self: str) -> None:
    """Refused while a VIF on it is attached (``NETWORK_CONTAINS_VIF [vifs]``) or a PIF uses it
    (``NETWORK_CONTAINS_PIF [pifs]``); its unattached VIFs go with it."""
    with call.store.transaction() as tx:
        tx.get("network", self)
        vifs = tx.referrers("VIF", "network", self)
        attached = [v for v in vifs if (tx.read("VIF", v) or {}).get("currently_attached")]
        if attached:
            raise ApiError("NETWORK_CONTAINS_VIF", *attached)
        pifs = tx.referrers("PIF", "network", self)
        if pifs:
            raise ApiError("NETWORK_CONTAINS_PIF", *pifs)
        if tx.get("network", self)["other_config"].get("is_host_internal_management_network", "") == "true":
            raise ApiError("CANNOT_DESTROY_SYSTEM_NETWORK", self)
        for vif in vifs:
            tx.delete("VIF", vif)
        tx.delete("network", self)


def create_vlan(tx: Transaction, tagged_pif: str, tag: int, network: str) -> str:
    """A VLAN and its untagged PIF on the tagged PIF's host, plugged (``Xapi_vlan.create``)."""
    net = tx.get("network", network)
    pif = tx.get("PIF", tagged_pif)
    if not net["managed"]:
        raise ApiError("NETWORK_UNMANAGED", network)
    host = pif["host"]
    for other in tx.referrers("PIF", "network", network):
        if (tx.read("PIF", other) or {}).get("host") == host:
            raise ApiError("NETWORK_ALREADY_CONNECTED", host, other)
    if not pif["managed"]:
        raise ApiError("PIF_UNMANAGED", tagged_pif)
    if int(pif["VLAN"]) >= 0:
        raise ApiError("PIF_IS_VLAN", tagged_pif)
    if pif["bond_slave_of"] != NULL_REF and tx.read("Bond", pif["bond_slave_of"]) is not None:
        raise ApiError("CANNOT_ADD_VLAN_TO_BOND_SLAVE", tagged_pif)
    if tag < 0 or tag > 4094:
        raise ApiError("VLAN_TAG_INVALID", tag)
    for vlan in tx.referrers("VLAN", "tagged_PIF", tagged_pif):
        if int((tx.read("VLAN", vlan) or {}).get("tag", -1)) == tag:
            raise ApiError("PIF_VLAN_EXISTS", pif["device"])
    vlan = tx.create("VLAN", {"tagged_PIF": tagged_pif, "tag": tag, "other_config": {}})
    untagged = tx.create("PIF", {
        "device": pif["device"], "network": network, "host": host, "MAC": VLAN_MAC, "MTU": pif["MTU"], "VLAN": tag,
        "metrics": pif["metrics"], "physical": False, "currently_attached": True, "ip_configuration_mode": "None",
        "VLAN_master_of": vlan, "management": False, "primary_address_type": pif["primary_address_type"],
        "managed": True, "ipv6_configuration_mode": "None", "IPv6": [""],
    })
    tx.update("VLAN", vlan, untagged_PIF=untagged)
    return vlan


@handler("VLAN.create")
def vlan_create(call: Call, tagged_PIF: str, tag: int, network: str) -> str:  # noqa: N803
    with call.store.transaction() as tx:
        return create_vlan(tx, tagged_PIF, tag, network)


@handler("VLAN.destroy")
def vlan_destroy(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        rec = tx.get("VLAN", self)
        untagged = rec["untagged_PIF"]
        pif = tx.read("PIF", untagged) if untagged != NULL_REF else None
        if pif is not None:
            if int(pif["VLAN"]) < 0:
                raise ApiError("PIF_IS_PHYSICAL")
            if pif["management"]:
                raise ApiError("PIF_IS_MANAGEMENT_INTERFACE", untagged)
            tx.delete("PIF", untagged)
        tx.delete("VLAN", self)


def _pool_vlans(tx: Transaction, pif_rec: dict[str, Any], network: str, tag: int) -> list[str]:
    device = pif_rec["device"]
    made = []
    for host in tx.refs("host"):
        for pif in tx.referrers("PIF", "host", host):
            rec = tx.read("PIF", pif)
            if rec is not None and rec["device"] == device and int(rec["VLAN"]) < 0:
                vlan = create_vlan(tx, pif, tag, network)
                made.append(tx.get("VLAN", vlan)["untagged_PIF"])
    return made


@handler("pool.create_VLAN_from_PIF")
def pool_create_vlan_from_pif(call: Call, pif: str, network: str, VLAN: int) -> list[str]:  # noqa: N803
    """A VLAN on the PIF of the same device on every host; returns the new untagged PIFs."""
    with call.store.transaction() as tx:
        return _pool_vlans(tx, tx.get("PIF", pif), network, VLAN)


@handler("pool.create_VLAN")
def pool_create_vlan(call: Call, device: str, network: str, VLAN: int) -> list[str]:  # noqa: N803
    with call.store.transaction() as tx:
        pifs = [rec for _r, rec in tx.items("PIF") if rec["device"] == device and int(rec["VLAN"]) < 0]
        if not pifs:
            raise ApiError("INVALID_VALUE", "device", device)
        return _pool_vlans(tx, pifs[0], network, VLAN)


# -- purposes (xapi_network.ml add_purpose, remove_purpose, assert_can_add_purpose) -----------------

# A purpose that no network may have while another has the first (xapi-nbd serves either TLS or not).
_CONFLICTS = {"nbd": "insecure_nbd", "insecure_nbd": "nbd"}


@handler("network.add_purpose")
def add_purpose(call: Call, self: str, value: str) -> None:
    """Add ``value`` unless the network is unmanaged or another network holds the conflicting purpose."""
    with call.store.transaction() as tx:
        rec = tx.get("network", self)
        if not rec["managed"]:
            raise ApiError("NETWORK_UNMANAGED", self)
        if value in rec["purpose"]:
            return
        conflicting = _CONFLICTS.get(value)
        for _ref, other in tx.items("network"):
            if conflicting is not None and conflicting in other["purpose"]:
                raise ApiError("NETWORK_INCOMPATIBLE_PURPOSES", value, conflicting)
        rec["purpose"] = [value, *rec["purpose"]]


@handler("network.remove_purpose")
def remove_purpose(call: Call, self: str, value: str) -> None:
    with call.store.transaction() as tx:
        rec = tx.get("network", self)
        if value in rec["purpose"]:
            rec["purpose"] = [p for p in rec["purpose"] if p != value]
