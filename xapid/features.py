"""Licensed features: the ``restrictions`` map a pool and its hosts carry (xapi-types/features.ml).

xapi derives ``pool.restrictions`` and each ``host.license_params`` from the edition's feature
set; ``restrict_*`` keys are negative (``"false"``: the feature is available), ``enable_xha``
is positive.  An emulated pool has every feature of a licensed one.  :func:`ensure` brings a
store up to that map at start (a pool seeded by an older xapid carried one made-up key only);
keys the user cannot set are the only thing it writes, so it changes nothing once current.
"""

from __future__ import annotations

from xapid.errors import ApiError
from xapid.store import Store, Transaction

# (key, positive): features.ml props_of_feature, in its order.
FEATURES: tuple[tuple[str, bool], ...] = tuple((key, key == "enable_xha") for key in (
    "restrict_vlan", "restrict_qos", "restrict_pool_attached_storage", "restrict_netapp",
    "restrict_equalogic", "restrict_pooling", "enable_xha", "restrict_marathon", "restrict_email_alerting",
    "restrict_historical_performance", "restrict_wlb", "restrict_rbac", "restrict_dmc", "restrict_checkpoint",
    "restrict_cpu_masking", "restrict_connection", "platform_filter", "regular_nag_dialog", "restrict_vmpr",
    "restrict_vmss", "restrict_intellicache", "restrict_gpu", "restrict_dr", "restrict_vif_locking",
    "restrict_storage_xen_motion", "restrict_vgpu", "restrict_integrated_gpu_passthrough", "restrict_vss",
    "restrict_guest_agent_auto_update", "restrict_pci_device_for_auto_update", "restrict_xen_motion",
    "restrict_guest_ip_setting", "restrict_ad", "restrict_nested_virt", "restrict_live_patching",
    "restrict_set_vcpus_number_live", "restrict_pvs_proxy", "restrict_igmp_snooping", "restrict_rpu",
    "restrict_pool_size", "restrict_cbt", "restrict_usb_passthrough", "restrict_network_sriov",
    "restrict_corosync", "restrict_cluster_address", "restrict_zstd_export", "restrict_pool_secret_rotation",
    "restrict_certificate_verification", "restrict_updates", "restrict_internal_repo_access",
    "restrict_vtpm", "restrict_vm_groups", "restrict_vm_start", "restrict_vm_appliance_start",
))


def licensed() -> dict[str, str]:
    """The restrictions map of an edition with every feature (features.ml to_assoc_list)."""
    return {key: "true" if positive else "false" for key, positive in FEATURES}


def assert_available(tx: Transaction, pool: str, key: str) -> None:
    """``FEATURE_RESTRICTED [key]`` unless the pool's restrictions leave ``key`` available
    (a missing key counts as restricted, as xapi_vtpm.ml assert_not_restricted reads it)."""
    rec = tx.read("pool", pool)
    positive = dict(FEATURES).get(key, False)
    value = (rec or {}).get("restrictions", {}).get(key)
    if value != ("true" if positive else "false"):
        raise ApiError("FEATURE_RESTRICTED", key)


def ensure(store: Store) -> None:
    """Give the pool and every host the licensed map (other keys of license_params are kept)."""
    want = licensed()
    with store.transaction() as tx:
        for ref in tx.refs("pool"):
            if tx.read("pool", ref)["restrictions"] != want:  # type: ignore[index]
                tx.update("pool", ref, restrictions=dict(want))
        for ref in tx.refs("host"):
            params = tx.read("host", ref)["license_params"]  # type: ignore[index]
            if any(params.get(k) != v for k, v in want.items()):
                tx.update("host", ref, license_params={**params, **want})
