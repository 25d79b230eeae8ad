"""``xe vm-export``/``vm-import``/``vdi-export``/``vdi-import`` through the HTTP handlers, as real xe
(cli_operations.ml: a task, then an HTTP GET/PUT of the file naming session_id and task_id)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import REPO, Xapid
from tests.integration.handlers.test_transfer import VM_FIELDS, make_vm, same_bytes, sparse_image
from tests.integration.test_xe_support import Xe, xe_argv0
from tests.integration.vmkit import MIB, default_sr, new_vdi, vdi_file


def test_xe_vm_export_then_vm_import_makes_the_same_vm(xapid: Xapid, api: Any, tmp_path: Path) -> None:
    xe = Xe(tmp_path, xapid)
    vm, disks = make_vm(api, "xe-exported")
    sparse_image(vdi_file(xapid.state_dir, api, disks[0]), 40 * MIB, {MIB: b"payload" * 100})
    out = tmp_path / "vm.xva"
    assert xe.ok("vm-export", f"uuid={api.VM.get_uuid(vm)}", f"filename={out}") == "Export succeeded\n"
    assert out.stat().st_mode & 0o777 == 0o600
    assert "already exists" in xe.fail("vm-export", "vm=xe-exported", f"filename={out}")  # never overwritten
    uuid = xe.ok("vm-import", f"filename={out}", f"sr-uuid={api.SR.get_uuid(default_sr(api))}").strip()
    new = api.VM.get_by_uuid(uuid)
    assert new != vm
    old_rec, new_rec = api.VM.get_record(vm), api.VM.get_record(new)
    assert {k: old_rec[k] for k in VM_FIELDS} == {k: new_rec[k] for k in VM_FIELDS}
    new_vdis = {api.VBD.get_userdevice(b): api.VBD.get_VDI(b) for b in new_rec["VBDs"]}
    assert same_bytes(vdi_file(xapid.state_dir, api, disks[0]), vdi_file(xapid.state_dir, api, new_vdis["0"]))
    assert api.task.get_all() == [] or all(api.task.get_name_label(t) != "VM import" for t in api.task.get_all())
    packed = tmp_path / "vm.xva.gz"
    xe.ok("vm-export", f"uuid={api.VM.get_uuid(vm)}", f"filename={packed}", "compress=true")
    assert packed.read_bytes()[:2] == b"\x1f\x8b" and packed.stat().st_size < out.stat().st_size
    again = api.VM.get_by_uuid(xe.ok("vm-import", f"filename={packed}").strip())
    assert api.VM.get_name_label(again) == "xe-exported"
    bad = tmp_path / "bad.xva"
    bad.write_bytes(b"\0" * 1024)
    assert "IMPORT_ERROR" in xe.fail("vm-import", f"filename={bad}")


def test_xe_vdi_import_and_export_raw_and_vhd_with_a_progress_bar(xapid: Xapid, api: Any, tmp_path: Path) -> None:
    xe = Xe(tmp_path, xapid)
    vdi = new_vdi(api, default_sr(api), 32 * MIB)
    uuid = api.VDI.get_uuid(vdi)
    image = sparse_image(tmp_path / "in.raw", 32 * MIB, {0: b"hd", 20 * MIB: os.urandom(MIB)})
    r = xe("vdi-import", f"uuid={uuid}", f"filename={image}", "progress=true")
    assert r.rc == 0, r.err
    assert "100% " in r.err and "#" * 70 in r.err  # xe's bar on stderr
    assert same_bytes(image, vdi_file(xapid.state_dir, api, vdi))
    as_vhd = tmp_path / "out.vhd"
    xe.ok("vdi-export", f"uuid={uuid}", f"filename={as_vhd}", "format=vhd")
    assert as_vhd.read_bytes()[:8] == b"conectix"
    other = new_vdi(api, default_sr(api), 32 * MIB)
    xe.ok("vdi-import", f"uuid={api.VDI.get_uuid(other)}", f"filename={as_vhd}", "format=vhd")
    assert same_bytes(image, vdi_file(xapid.state_dir, api, other))
    raw = tmp_path / "out.raw"
    xe.ok("vdi-export", f"uuid={api.VDI.get_uuid(other)}", f"filename={raw}")
    assert same_bytes(image, raw)
    piped = subprocess.run([*xe_argv0(), "-s", "127.0.0.1", "-p", xe.port, "-pwf", str(xe.pwf), "--nossl",
                            "vdi-import", f"uuid={api.VDI.get_uuid(other)}", "filename=/dev/stdin"],
                           input=b"p" * (2 * MIB), capture_output=True, timeout=60, cwd=REPO, env=xe.env())
    assert piped.returncode == 0, piped.stderr  # not a regular file: sent chunked
    assert vdi_file(xapid.state_dir, api, other).read_bytes()[:2 * MIB + 1] == b"p" * (2 * MIB) + b"\0"
    big = sparse_image(tmp_path / "big.raw", 33 * MIB, {})
    assert "VDI_TOO_SMALL" in xe.fail("vdi-import", f"uuid={uuid}", f"filename={big}")
