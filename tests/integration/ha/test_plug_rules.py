"""Storage rules around cluster stacks: PBD.plug and SR.create (design + ha.md 7)."""

from __future__ import annotations

from typing import Any

import pytest
import XenAPI


def create_shared(x: Any, sr_type: str, label: str) -> str:
    master = x.pool.get_master(x.pool.get_all()[0])
    return x.SR.create(master, {}, str(2 * 1024**4), label, "", sr_type, "user", True, {})


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def test_sr_create_incompatible_with_active_stack_leaves_nothing(api: Any) -> None:
    """ha.md 7.3: creating a Melio SR while xhad HA runs fails in PBD.plug; no SR or PBD remains."""
    api.pool.enable_ha([], {"timeout": "10"})
    srs, pbds = set(api.SR.get_all()), set(api.PBD.get_all())
    assert failure(create_shared, api, "melio", "Melio") == ["INCOMPATIBLE_CLUSTER_STACK_ACTIVE", "melio"]
    assert set(api.SR.get_all()) == srs and set(api.PBD.get_all()) == pbds
    api.pool.disable_ha()


def test_pbd_plug_refused_while_incompatible_stack_active(api: Any) -> None:
    melio = create_shared(api, "melio", "Melio")
    pbds = api.SR.get_PBDs(melio)
    for p in pbds:
        api.PBD.unplug(p)
    api.pool.enable_ha([], {"timeout": "10"})
    assert api.pool.get_ha_cluster_stack(api.pool.get_all()[0]) == "xhad"
    assert failure(api.PBD.plug, pbds[0]) == ["INCOMPATIBLE_CLUSTER_STACK_ACTIVE", "melio"]
    assert api.PBD.get_currently_attached(pbds[0]) is False
    # Unconstrained storage still plugs.
    nfs_pbd = api.SR.get_PBDs(api.pool.get_default_SR(api.pool.get_all()[0]))[0]
    api.pool.disable_ha()
    api.PBD.plug(pbds[0])
    assert api.PBD.get_currently_attached(pbds[0]) is True
    api.PBD.plug(nfs_pbd)


def test_compatible_constrained_sr_plugs_while_its_stack_is_active(api: Any) -> None:
    melio = create_shared(api, "melio", "Melio")
    api.pool.enable_ha([melio], {"timeout": "10"})
    second = create_shared(api, "melio", "Melio 2")
    assert all(api.PBD.get_currently_attached(p) for p in api.SR.get_PBDs(second))
    api.pool.disable_ha()


def test_two_srs_needing_different_stacks_are_never_attached(api: Any) -> None:
    """Design: storage must never attach two SRs that need different cluster stacks."""
    melio = create_shared(api, "melio", "Melio")
    srs = set(api.SR.get_all())
    assert failure(create_shared, api, "ocfs2", "OCFS2") == ["CLUSTER_STACK_CONSTRAINT", melio, "melio"]
    assert set(api.SR.get_all()) == srs
    # Once Melio is detached, OCFS2 may attach, and then Melio may not.
    for p in api.SR.get_PBDs(melio):
        api.PBD.unplug(p)
    ocfs2 = create_shared(api, "ocfs2", "OCFS2")
    assert failure(api.PBD.plug, api.SR.get_PBDs(melio)[0]) == ["CLUSTER_STACK_CONSTRAINT", ocfs2, "corosync"]
