"""Changed block tracking (xapi_vdi.ml enable_cbt, disable_cbt, data_destroy, list_changed_blocks and
check_operation_error): what backup tools use to copy only what changed between two snapshots."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest
import requests
import XenAPI

from tests.conftest import Xapid
from tests.integration.corosync_kit import ocfs2_sr
from tests.integration.vmkit import MIB, default_sr, new_vbd, new_vdi

CBT_BLOCK = 64 * 1024


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def write_blocks(d: Xapid, session: str, vdi: str, *blocks: int) -> None:
    """Write a few bytes into each 64 KiB block, in vhd-tool's chunked format (only those bytes are written)."""
    body = b"".join(struct.pack("<QI", b * CBT_BLOCK + 7, 3) + b"abc" for b in blocks) + struct.pack("<QI", 0, 0)
    r = requests.put(f"{d.url}import_raw_vdi", params={"session_id": session, "vdi": vdi, "chunked": ""},
                     data=body, timeout=30)
    assert r.status_code == 200, r.text


def changed(api: Any, a: str, b: str) -> list[int]:
    bitmap = base64.b64decode(api.VDI.list_changed_blocks(a, b))
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (0x80 >> (i % 8))]


def test_list_changed_blocks_between_snapshots_survives_data_destroy_and_a_restart(xapid: Xapid) -> None:
    s = xapid.session()
    api, session = s.xenapi, s._session  # type: ignore[attr-defined]
    size = 4 * MIB  # 64 blocks: an 8-byte bitmap
    vdi = new_vdi(api, default_sr(api), size)
    assert "enable_cbt" in api.VDI.get_allowed_operations(vdi)
    write_blocks(xapid, session, vdi, 1)  # before CBT: not tracked
    api.VDI.enable_cbt(vdi)
    assert api.VDI.get_cbt_enabled(vdi) is True
    write_blocks(xapid, session, vdi, 2, 40)
    s1 = api.VDI.snapshot(vdi, {})
    assert api.VDI.get_cbt_enabled(s1) is True
    write_blocks(xapid, session, vdi, 5)
    s2 = api.VDI.snapshot(vdi, {})
    write_blocks(xapid, session, vdi, 7, 63)
    assert len(base64.b64decode(api.VDI.list_changed_blocks(s1, s2))) == 8
    assert changed(api, s1, s2) == [5]
    assert changed(api, s1, vdi) == [5, 7, 63]
    assert changed(api, s2, vdi) == [7, 63]

    # A backup tool drops the old snapshot's data and keeps asking what changed since.
    api.VDI.data_destroy(s1)
    assert api.VDI.get_type(s1) == "cbt_metadata"
    assert int(api.VDI.get_physical_utilisation(s1)) == 0
    assert changed(api, s1, s2) == [5]
    vm = api.VM.get_all()[0]
    assert failure(new_vbd, api, vm, s1) == ["VDI_INCOMPATIBLE_TYPE", s1, "cbt_metadata"]
    assert failure(api.VDI.clone, s1, {}) == ["VDI_INCOMPATIBLE_TYPE", s1, "cbt_metadata"]
    got = requests.get(f"{xapid.url}export_raw_vdi", params={"session_id": session, "vdi": s1}, timeout=30)
    assert got.status_code == 500
    api.VDI.data_destroy(s1)  # again: nothing to do

    xapid.restart()  # the logs are on disk beside the disks, and a restart keeps them
    api = xapid.session().xenapi
    assert changed(api, s1, vdi) == [5, 7, 63]
    assert api.VDI.get_type(s1) == "cbt_metadata"


def test_cbt_refusals_follow_xapi(xapid: Xapid) -> None:
    api = xapid.session().xenapi
    vdi = new_vdi(api, default_sr(api), MIB)
    plain = new_vdi(api, default_sr(api), MIB)
    assert failure(api.VDI.list_changed_blocks, vdi, plain) == ["VDI_NO_CBT_METADATA", vdi]
    api.VDI.enable_cbt(vdi)
    api.VDI.enable_cbt(vdi)  # already on: nothing happens
    snap = api.VDI.snapshot(vdi, {})
    assert failure(api.VDI.data_destroy, vdi) == ["OPERATION_NOT_ALLOWED", f"VDI is not a snapshot: {vdi}"]
    assert failure(api.VDI.enable_cbt, snap) == ["OPERATION_NOT_ALLOWED", f"VDI is a snapshot: {snap}"]
    assert failure(api.VDI.disable_cbt, snap) == ["OPERATION_NOT_ALLOWED", f"VDI is a snapshot: {snap}"]
    plain_snap = api.VDI.snapshot(plain, {})
    assert api.VDI.get_cbt_enabled(plain_snap) is False
    assert failure(api.VDI.data_destroy, plain_snap) == ["VDI_NO_CBT_METADATA", plain_snap]
    # Two CBT VDIs' logs do not chain: the SM says they are unrelated.
    api.VDI.enable_cbt(plain)
    assert failure(api.VDI.list_changed_blocks, snap, plain)[0] == "SR_BACKEND_FAILURE_460"
    # Clones and copies do not inherit CBT; disabling drops the VDI's log, its snapshots keep theirs.
    assert api.VDI.get_cbt_enabled(api.VDI.clone(vdi, {})) is False
    api.VDI.disable_cbt(vdi)
    assert api.VDI.get_cbt_enabled(vdi) is False
    assert failure(api.VDI.list_changed_blocks, snap, vdi) == ["VDI_NO_CBT_METADATA", vdi]
    assert api.VDI.get_cbt_enabled(api.VDI.snapshot(vdi, {})) is False
    # An SR whose driver has no VDI_CONFIG_CBT refuses (xapid's OCFS2 driver, say).
    ocfs2 = ocfs2_sr(api)
    other = new_vdi(api, ocfs2, MIB)
    assert failure(api.VDI.enable_cbt, other) == ["SR_OPERATION_NOT_SUPPORTED", ocfs2]
    assert "enable_cbt" not in api.VDI.get_allowed_operations(other)
