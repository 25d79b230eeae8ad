"""Heartbeat SR checks, the HA VDIs and ``ha_supported_srs`` (ha.md 1.5, 4.1 steps 11-13)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import XenAPI

from tests.conftest import Xapid

GIB = 1024**3


def nfs_sr(x: Any) -> str:
    return x.pool.get_default_SR(x.pool.get_all()[0])


def create_shared(x: Any, sr_type: str, size: int = 2 * 1024**4, label: str = "shared") -> str:
    master = x.pool.get_master(x.pool.get_all()[0])
    return x.SR.create(master, {}, str(size), label, "", sr_type, "user", True, {})


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def test_melio_sr_makes_enable_choose_melio(api: Any) -> None:
    """The design's example: a Melio SR demands the melio stack, whose statefile must be on Melio."""
    pool = api.pool.get_all()[0]
    melio = create_shared(api, "melio", label="Melio")
    assert failure(api.pool.enable_ha, [nfs_sr(api)], {"timeout": "10"}) == ["INCOMPATIBLE_STATEFILE_SR", "melio"]
    assert api.pool.get_ha_enabled(pool) is False
    api.pool.enable_ha([melio], {"timeout": "10"})
    record = api.pool.get_record(pool)
    assert record["ha_enabled"] is True
    assert record["ha_cluster_stack"] == "melio"
    statefile = record["ha_statefiles"][0]
    assert api.VDI.get_SR(statefile) == melio
    api.pool.disable_ha()


def test_statefile_and_metadata_vdis_are_real_and_reused(xapid: Xapid, api: Any) -> None:
    pool = api.pool.get_all()[0]
    sr = nfs_sr(api)
    api.pool.enable_ha([sr], {"timeout": "10"})
    statefile = api.pool.get_ha_statefiles(pool)[0]
    rec = api.VDI.get_record(statefile)
    assert (rec["type"], rec["virtual_size"], rec["name_label"]) == ("ha_statefile", "266240", "Statefile for HA")
    assert rec["sharable"] is True and rec["sm_config"] == {"type": "raw"}
    metadata = [v for v in api.SR.get_VDIs(sr) if api.VDI.get_type(v) == "redo_log"]
    assert len(metadata) == 1 and api.VDI.get_virtual_size(metadata[0]) == "3988783104"
    sr_uuid = api.SR.get_uuid(sr)
    path = xapid.state_dir / "sr" / sr_uuid / f"{rec['uuid']}.img"
    assert path.stat().st_size == 266240
    for h in api.host.get_all():
        conf = (xapid.state_dir / "hosts" / api.host.get_uuid(h) / "xhad.conf").read_text()
        assert f"<StateFile>{path}</StateFile>" in conf
    # HA VDIs cannot be destroyed while HA is on (ha.md 6 HA_IS_ENABLED).
    assert failure(api.VDI.destroy, statefile) == ["HA_IS_ENABLED"]
    api.pool.disable_ha()
    api.pool.enable_ha([sr], {"timeout": "10"})
    assert api.pool.get_ha_statefiles(pool) == [statefile]
    assert [v for v in api.SR.get_VDIs(sr) if api.VDI.get_type(v) == "redo_log"] == metadata
    api.pool.disable_ha()
    # disable keeps ha_statefiles and ha_configuration (ha.md 4.4).
    assert api.pool.get_ha_statefiles(pool) == [statefile]
    assert api.pool.get_ha_configuration(pool) == {"timeout": "10"}


def test_sr_missing_a_pbd_is_refused(api: Any) -> None:
    local = [s for s in api.SR.get_all() if api.SR.get_type(s) == "ext"][0]
    assert failure(api.pool.enable_ha, [local], {}) == ["SR_HAS_NO_PBDS", local]


def test_sr_with_unplugged_pbd_is_refused(api: Any) -> None:
    sr = nfs_sr(api)
    api.PBD.unplug(api.SR.get_PBDs(sr)[1])
    assert failure(api.pool.enable_ha, [sr], {}) == ["SR_HAS_NO_PBDS", sr]


def test_no_usable_sr_cannot_create_state_file(api: Any) -> None:
    api.PBD.unplug(api.SR.get_PBDs(nfs_sr(api))[0])
    assert failure(api.pool.enable_ha, [], {}) == ["CANNOT_CREATE_STATE_FILE"]


def test_small_sr_has_insufficient_space(api: Any) -> None:
    small = create_shared(api, "nfs", size=GIB, label="small")
    assert failure(api.pool.enable_ha, [small], {}) == ["SR_SOURCE_SPACE_INSUFFICIENT", small]


def test_sr_without_offline_attach_is_not_supported(api: Any) -> None:
    iso = create_shared(api, "iso", label="ISO library")
    assert failure(api.pool.enable_ha, [iso], {}) == ["SR_OPERATION_NOT_SUPPORTED", iso]


def test_automatic_choice_skips_unusable_srs(api: Any) -> None:
    pool = api.pool.get_all()[0]
    api.pool.enable_ha([], {"timeout": "10"})
    statefile = api.pool.get_ha_statefiles(pool)[0]
    assert api.VDI.get_SR(statefile) == nfs_sr(api)
    api.pool.disable_ha()


def test_supported_srs_file_restricts_heartbeat_sr(xapid_factory: Any, stack_root: Path) -> None:
    """ha_supported_srs lists the types a stack accepts; the error names them (the design's parameter)."""
    (stack_root / "xhad" / "ha_supported_srs").write_text("lvmoiscsi\n  melio\n")
    d = xapid_factory(stack_root=stack_root)
    x = d.session().xenapi
    assert failure(x.pool.enable_ha, [nfs_sr(x)], {}) == ["INCOMPATIBLE_STATEFILE_SR", "lvmoiscsi,melio"]
    iscsi = create_shared(x, "lvmoiscsi", label="iSCSI")
    x.pool.enable_ha([iscsi], {"timeout": "10"})
    assert x.pool.get_ha_enabled(x.pool.get_all()[0]) is True
    x.pool.disable_ha()


def test_symlinked_supported_srs_and_scripts_work_and_an_escaping_link_is_refused(
        xapid_factory: Any, stack_root: Path, tmp_path: Path) -> None:
    """ha-gaps bug 4: links are followed; one leading outside the root is an INTERNAL_ERROR naming it,
    never "no file" (which would lift the restriction)."""
    xhad = stack_root / "xhad"
    (stack_root / "types").write_text("lvmoiscsi\n")
    (xhad / "ha_supported_srs").symlink_to(stack_root / "types")
    (xhad / "ha_query_liveset").unlink()  # the melio shim runs xhad's engine as well
    (xhad / "ha_query_liveset").symlink_to(stack_root / "melio" / "ha_query_liveset")
    d = xapid_factory(stack_root=stack_root)
    x = d.session().xenapi
    pool = x.pool.get_all()[0]
    assert failure(x.pool.enable_ha, [nfs_sr(x)], {}) == ["INCOMPATIBLE_STATEFILE_SR", "lvmoiscsi"]
    iscsi = create_shared(x, "lvmoiscsi", label="iSCSI")
    x.pool.enable_ha([iscsi], {"timeout": "10"})
    x.pool.disable_ha()
    (tmp_path / "elsewhere").write_text("nfs\n")
    (xhad / "ha_supported_srs").unlink()
    (xhad / "ha_supported_srs").symlink_to(tmp_path / "elsewhere")
    details = failure(x.pool.enable_ha, [nfs_sr(x)], {})
    assert details[0] == "INTERNAL_ERROR"
    assert str(xhad / "ha_supported_srs") in details[1] and "outside the cluster-stack root" in details[1]
    assert x.pool.get_ha_enabled(pool) is False


def test_bad_timeout_is_refused_before_any_script(api: Any) -> None:
    pool = api.pool.get_all()[0]
    details = failure(api.pool.enable_ha, [], {"timeout": "5"})
    assert details[0] == "INTERNAL_ERROR"
    assert api.pool.get_ha_enabled(pool) is False
