"""Disk and VM import/export over HTTP (issue 14): ``/import_raw_vdi``, ``/export_raw_vdi``, ``/export``,
``/import`` (xapi's import_raw_vdi.ml, export_raw_vdi.ml, export.ml, import.ml), through plain HTTP and
the SDK against a real daemon."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import REPO, Xapid
from tests.integration.vmkit import GIB, MIB, NULL, default_sr, new_vbd, new_vdi, new_vif, vdi_file, wait_for


def pieces(size: int) -> dict[int, bytes]:
    """Data at a few offsets of a ``size``-byte disk: the first sector, odd offsets, the very end."""
    return {0: b"boot sector", 5 * MIB + 17: b"x" * 70000, size // 3 * 2: os.urandom(MIB), size - 5: b"tail!"}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def sparse_image(path: Path, size: int, pieces: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    return path


def chunks(path: Path, piece: int = 4 * MIB) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(piece):
            yield data


def same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 * MIB), fb.read(8 * MIB)
            if x != y:
                return False
            if not x:
                return True


def task(api: Any, label: str = "transfer") -> str:
    return str(api.task.create(label, ""))


def finished(api: Any, t: str) -> dict[str, Any]:
    wait_for(lambda: api.task.get_status(t) != "pending", 10, "the task to end")
    return dict(api.task.get_record(t))


def session_of(d: Xapid) -> tuple[Any, str]:
    s = d.session()
    return s.xenapi, s._session  # type: ignore[attr-defined]


# -- raw disks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [pytest.param(GIB, marks=pytest.mark.slow), 256 * MIB], ids=["1GiB", "256MiB"])
def test_raw_round_trip_of_a_sparse_disk_keeps_bytes_and_holes_in_bounded_memory(xapid: Xapid, tmp_path: Path,
                                                                                 size: int) -> None:
    api, session = session_of(xapid)
    vdi = new_vdi(api, default_sr(api), size)
    source = sparse_image(tmp_path / "in.raw", size, pieces(size))
    pid = xapid.proc.pid  # type: ignore[union-attr]
    before = rss_kib(pid)
    t = task(api)
    r = requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": session, "vdi": vdi, "task_id": t},
                     data=chunks(source), timeout=120)  # a generator: sent chunked
    assert r.status_code == 200, r.text
    rec = finished(api, t)
    assert rec["status"] == "success" and rec["progress"] == 1.0 and vdi in rec["result"]
    target = vdi_file(xapid.state_dir, api, vdi)
    assert same_bytes(source, target)
    assert target.stat().st_blocks * 512 < 8 * MIB  # holes stayed holes
    assert int(api.VDI.get_physical_utilisation(vdi)) < 8 * MIB
    assert api.VDI.get_current_operations(vdi) == {}
    out = tmp_path / "out.raw"
    with requests.get(f"{xapid.url}export_raw_vdi", params={"session_id": session, "vdi": vdi}, stream=True,
                      timeout=120) as r:
        assert r.status_code == 200 and int(r.headers["content-length"]) == size
        assert r.headers["content-type"] == "application/octet-stream"
        with open(out, "wb") as f:
            for piece in r.iter_content(4 * MIB):
                f.write(piece)
    assert same_bytes(source, out)
    assert rss_kib(pid) - before < 64 * 1024, f"the daemon grew by more than 64 MiB for a {size} byte transfer"


def test_raw_import_by_content_length_and_export_by_uuid(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    vdi = new_vdi(api, default_sr(api), 16 * MIB)
    body = b"\0" * MIB + b"data" * 1000 + b"\0" * (3 * MIB)
    r = requests.put(f"{xapid.url}import_raw_vdi?session_id={session}&vdi={api.VDI.get_uuid(vdi)}&format=raw",
                     data=body, timeout=30)
    assert r.status_code == 200
    got = requests.get(f"{xapid.url}export_raw_vdi", params={"session_id": session, "vdi": vdi}, timeout=30)
    assert got.content == body.ljust(16 * MIB, b"\0")
    assert vdi_file(xapid.state_dir, api, vdi).stat().st_blocks * 512 <= 256 * 1024


def test_raw_import_into_an_sr_makes_a_vdi_and_a_failed_one_leaves_none(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    sr = default_sr(api)
    before = set(api.VDI.get_all())
    t = task(api)
    r = requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": session, "sr_id": sr, "task_id": t},
                     data=b"m" * (3 * MIB), timeout=10)
    assert r.status_code == 200
    (vdi,) = set(api.VDI.get_all()) - before
    assert vdi in finished(api, t)["result"]
    assert (api.VDI.get_name_label(vdi), api.VDI.get_virtual_size(vdi)) == ("Imported VDI", str(3 * MIB))
    assert vdi_file(xapid.state_dir, api, vdi).read_bytes() == b"m" * (3 * MIB)
    before = set(api.VDI.get_all())
    files = set(vdi_file(xapid.state_dir, api, vdi).parent.iterdir())
    t = task(api)
    url = urlsplit(xapid.url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        s.sendall((f"PUT /import_raw_vdi?session_id={session}&sr_uuid={api.SR.get_uuid(sr)}&task_id={t} HTTP/1.1"
                   f"\r\nhost: x\r\ncontent-length: {8 * MIB}\r\n\r\n").encode() + b"h" * MIB)
        wait_for(lambda: set(api.VDI.get_all()) - before, 10, "the new VDI")
    assert finished(api, t)["status"] == "failure"
    assert set(api.VDI.get_all()) == before
    assert set(vdi_file(xapid.state_dir, api, vdi).parent.iterdir()) == files


def test_raw_import_in_vhd_tools_chunked_format(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    vdi = new_vdi(api, default_sr(api), 16 * MIB)
    body = b"".join([struct.pack("<QI", 3 * MIB, 5), b"hello", struct.pack("<QI", 9 * MIB, 4), b"abcd",
                     struct.pack("<QI", 0, 0)])
    r = requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": session, "vdi": vdi, "chunked": ""},
                     data=body, timeout=10)
    assert r.status_code == 200
    data = vdi_file(xapid.state_dir, api, vdi).read_bytes()
    assert data[3 * MIB:3 * MIB + 5] == b"hello" and data[9 * MIB:9 * MIB + 4] == b"abcd"
    assert data.count(0) == 16 * MIB - 9
    r = requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": session, "vdi": vdi, "chunked": "",
                                                           "format": "vhd"}, data=body, timeout=10)
    assert r.status_code == 404


def test_vhd_import_and_export(xapid: Xapid, tmp_path: Path) -> None:
    from xapid.handlers import vhd  # the format module, used here only to build a VHD independently checked

    api, session = session_of(xapid)
    size = 40 * MIB
    image = bytearray(size)
    image[3 * MIB:3 * MIB + 5] = b"hello"
    image[30 * MIB:31 * MIB] = os.urandom(MIB)
    blocks = vhd.allocated_blocks([(3 * MIB, 5), (30 * MIB, MIB)], size)
    stream = b"".join(vhd.export_stream(size, blocks, lambda o, n: bytes(image[o:o + n])))
    vdi = new_vdi(api, default_sr(api), size)
    r = requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": session, "vdi": vdi, "format": "vhd"},
                     data=stream, timeout=30)
    assert r.status_code == 200, r.text
    assert vdi_file(xapid.state_dir, api, vdi).read_bytes() == bytes(image)
    got = requests.get(f"{xapid.url}export_raw_vdi", params={"session_id": session, "vdi": vdi, "format": "vhd"},
                       timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "application/vhd"
    vhd_out = got.content
    assert vhd_out[:8] == b"conectix" and vhd_out[-512:] == vhd_out[:512]
    entries = struct.unpack_from(">I", vhd_out, 512 + 28)[0]
    bat = struct.unpack_from(f">{entries}I", vhd_out, 1536)
    assert [i for i, s in enumerate(bat) if s != 0xFFFFFFFF] == blocks  # only the allocated blocks
    too_big = b"".join(vhd.export_stream(size * 2, [0], lambda o, n: b"\1" * n))
    t = task(api)
    r = requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": session, "vdi": vdi, "format": "vhd",
                                                           "task_id": t}, data=too_big, timeout=30)
    assert r.status_code == 500
    assert finished(api, t)["error_info"] == ["VDI_TOO_SMALL", vdi, str(size * 2)]


def test_a_cancelled_task_stops_the_upload_and_clears_the_operation(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    vdi = new_vdi(api, default_sr(api), 256 * MIB)
    t = task(api)
    url = urlsplit(xapid.url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        s.sendall((f"PUT /import_raw_vdi?session_id={session}&vdi={vdi}&task_id={t} HTTP/1.1\r\n"
                   f"host: x\r\ncontent-length: {256 * MIB}\r\n\r\n").encode())
        wait_for(lambda: api.VDI.get_current_operations(vdi), 10, "the VDI to be marked")
        api.task.cancel(t)
        deadline = time.monotonic() + 20
        try:
            while api.task.get_status(t) == "pending" and time.monotonic() < deadline:
                s.sendall(b"c" * MIB)
                time.sleep(0.05)
        except OSError:
            pass  # the server ended the connection
    assert finished(api, t)["status"] == "cancelled"
    wait_for(lambda: api.VDI.get_current_operations(vdi) == {}, 10, "the operation to clear")


def test_bodies_over_max_upload_size_are_refused_from_their_length(xapid_factory: Any) -> None:
    d = xapid_factory(**{"max-upload-size": str(MIB)})
    api, session = session_of(d)
    vdi = new_vdi(api, default_sr(api), 4 * MIB)
    r = requests.put(f"{d.url}import_raw_vdi", params={"session_id": session, "vdi": vdi}, data=b"v" * (MIB + 1),
                     timeout=10)
    assert r.status_code == 413
    r = requests.put(f"{d.url}import_raw_vdi", params={"session_id": session, "vdi": vdi}, data=b"v" * MIB,
                     timeout=10)
    assert r.status_code == 200


def test_bad_session_wrong_vdi_unknown_format_and_oversized_body(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    vdi = new_vdi(api, default_sr(api), MIB)
    r = requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": "OpaqueRef:nope", "vdi": vdi},
                     data=b"x", timeout=10)
    assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    r = requests.get(f"{xapid.url}export_raw_vdi", params={"vdi": vdi}, timeout=10)
    assert r.status_code == 401
    t = task(api)
    r = requests.get(f"{xapid.url}export_raw_vdi", params={"session_id": session, "vdi": "no-such-uuid",
                                                           "task_id": t}, timeout=10)
    assert r.status_code == 500 and finished(api, t)["error_info"] == ["UUID_INVALID", "VDI", "no-such-uuid"]
    t = task(api)
    r = requests.get(f"{xapid.url}export_raw_vdi", params={"session_id": session, "vdi": vdi, "format": "qcow3",
                                                           "task_id": t}, timeout=10)
    assert r.status_code == 404 and finished(api, t)["error_info"] == ["INTERNAL_ERROR", "Unknown format qcow3"]
    t = task(api)
    r = requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": session, "vdi": vdi, "task_id": t},
                     data=b"y" * (MIB + 1), timeout=10)
    assert r.status_code == 400
    assert finished(api, t)["error_info"] == ["VDI_TOO_SMALL", vdi, str(MIB + 1)]
    assert vdi_file(xapid.state_dir, api, vdi).stat().st_blocks == 0  # nothing was written
    t = task(api)

    def oversized() -> Iterator[bytes]:
        yield b"z" * MIB
        yield b"z" * 10

    r = requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": session, "vdi": vdi, "task_id": t},
                     data=oversized(), timeout=10)  # chunked: found while reading
    assert r.status_code == 500 and finished(api, t)["error_info"][0] == "VDI_TOO_SMALL"
    assert api.VDI.get_current_operations(vdi) == {}


def test_read_only_users_may_not_import_and_read_only_vdis_refuse_writes(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    vdi = new_vdi(api, default_sr(api), MIB)
    done = subprocess.run([sys.executable, "-m", "xapid.cli.xapid", "passwd", "--state-dir", str(xapid.state_dir),
                           "--role", "read-only", "auditor"], input="ro-Secret-1\n", text=True, capture_output=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    r = requests.put(f"{xapid.url}import_raw_vdi", params={"vdi": vdi}, auth=("auditor", "ro-Secret-1"),
                     data=b"x" * 10, timeout=10)
    assert r.status_code == 403  # http/put_import_raw_vdi is _R_VM_ADMIN, as in xapi's datamodel
    r = requests.put(f"{xapid.url}import", auth=("auditor", "ro-Secret-1"), data=b"x" * 10, timeout=10)
    assert r.status_code == 403
    assert vdi_file(xapid.state_dir, api, vdi).stat().st_blocks == 0
    r = requests.put(f"{xapid.url}import_raw_vdi", params={"vdi": vdi}, auth=("root", xapid.password),
                     data=b"x" * 10, timeout=10)  # basic auth works for those allowed
    assert r.status_code == 200
    ro = api.VDI.create({"name_label": "ro", "name_description": "", "SR": default_sr(api), "virtual_size": str(MIB),
                         "type": "user", "sharable": False, "read_only": True, "other_config": {},
                         "xenstore_data": {}, "sm_config": {}, "tags": []})
    t = task(api)
    r = requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": session, "vdi": ro, "task_id": t},
                     data=b"x" * 10, timeout=10)
    assert r.status_code == 500 and finished(api, t)["error_info"] == ["VDI_READONLY", ro]


def test_disconnect_mid_upload_fails_the_task_and_clears_the_operation(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    vdi = new_vdi(api, default_sr(api), 64 * MIB)
    t = task(api)
    url = urlsplit(xapid.url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        s.sendall((f"PUT /import_raw_vdi?session_id={session}&vdi={vdi}&task_id={t} HTTP/1.1\r\n"
                   f"host: x\r\ncontent-length: {64 * MIB}\r\n\r\n").encode() + b"q" * (3 * MIB))
        wait_for(lambda: api.VDI.get_current_operations(vdi), 10, "the VDI to be marked")
        assert list(api.VDI.get_current_operations(vdi).values()) == ["blocked"]
        t2 = task(api)
        r = requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": session, "vdi": vdi, "task_id": t2},
                         data=b"w", timeout=10)  # one writer at a time
        assert r.status_code == 500 and finished(api, t2)["error_info"][:3] == ["OTHER_OPERATION_IN_PROGRESS", "VDI",
                                                                                 vdi]
        r = requests.get(f"{xapid.url}export_raw_vdi", params={"session_id": session, "vdi": vdi}, timeout=10)
        assert r.status_code == 500  # nor a reader while it is written
    rec = finished(api, t)
    assert rec["status"] == "failure" and rec["error_info"][0] == "CLIENT_ERROR"
    wait_for(lambda: api.VDI.get_current_operations(vdi) == {}, 10, "the operation to clear")


# -- VMs ---------------------------------------------------------------------------------------------------


def make_vm(api: Any, name: str = "exported") -> tuple[str, list[str]]:
    vm = api.VM.create({"name_label": name, "name_description": "to be exported", "user_version": "1",
                        "is_a_template": False, "affinity": NULL, "memory_static_max": str(2 * GIB),
                        "memory_dynamic_max": str(GIB), "memory_dynamic_min": str(GIB // 2),
                        "memory_static_min": str(GIB // 4), "VCPUs_params": {}, "VCPUs_max": "4",
                        "VCPUs_at_startup": "2", "actions_after_shutdown": "destroy",
                        "actions_after_reboot": "restart", "actions_after_crash": "restart",
                        "PV_bootloader": "", "PV_kernel": "", "PV_ramdisk": "", "PV_args": "console=hvc0",
                        "PV_bootloader_args": "", "PV_legacy_args": "", "HVM_boot_policy": "BIOS order",
                        "HVM_boot_params": {"order": "cd"}, "platform": {"acpi": "1"}, "PCI_bus": "",
                        "other_config": {"purpose": "test"}, "recommendations": "", "tags": ["a"]})
    sr = default_sr(api)
    disks = [new_vdi(api, sr, 40 * MIB, "system"), new_vdi(api, sr, 8 * MIB, "data")]
    for i, vdi in enumerate(disks):
        new_vbd(api, vm, vdi, str(i), bootable=i == 0)
    new_vif(api, vm, "0")
    return vm, disks


VM_FIELDS = ("name_label", "name_description", "memory_static_max", "memory_dynamic_max", "memory_dynamic_min",
             "memory_static_min", "VCPUs_max", "VCPUs_at_startup", "PV_args", "HVM_boot_policy", "HVM_boot_params",
             "platform", "tags", "actions_after_crash", "user_version", "is_a_template")


def test_xva_export_import_round_trip_keeps_metadata_and_bytes(xapid: Xapid, tmp_path: Path) -> None:
    api, session = session_of(xapid)
    vm, disks = make_vm(api)
    host = api.pool.get_master(api.pool.get_all()[0])
    iso_sr = api.SR.create(host, {"location": "/srv/isos"}, "0", "ISOs", "", "iso", "iso", False, {})
    iso = new_vdi(api, iso_sr, 300 * MIB, "install.iso")
    new_vbd(api, vm, iso, "3", vbd_type="CD", mode="RO")
    sparse_image(vdi_file(xapid.state_dir, api, disks[0]), 40 * MIB, {0: b"MBR", 33 * MIB + 1: b"z" * 5000})
    sparse_image(vdi_file(xapid.state_dir, api, disks[1]), 8 * MIB, {7 * MIB: b"data disk"})
    xva_path = tmp_path / "vm.xva"
    t = task(api)
    with requests.get(f"{xapid.url}export", params={"session_id": session, "uuid": api.VM.get_uuid(vm),
                                                    "task_id": t}, stream=True, timeout=30) as r:
        assert r.status_code == 200 and "export.xva" in r.headers["content-disposition"]
        with open(xva_path, "wb") as f:
            for piece in r.iter_content(MIB):
                f.write(piece)
    assert finished(api, t)["status"] == "success"
    assert api.VM.get_current_operations(vm) == {}
    with tarfile.open(xva_path) as tar:  # a real XVA's layout
        names = tar.getnames()
        assert names[0] == "ova.xml"
        ova = tar.extractfile("ova.xml").read()  # type: ignore[union-attr]
    assert b"<name>export_vsn</name>" in ova and b"<name>objects</name>" in ova
    from xapid.handlers.xva import parse_ova_xml

    _version, objects = parse_ova_xml(ova)
    assert sorted({o["class"] for o in objects}) == ["SR", "VBD", "VDI", "VIF", "VM", "VM_metrics", "network"]
    ids = {o["id"] for o in objects}

    def refs_in(value: Any) -> Iterator[str]:
        if isinstance(value, str) and value.startswith(("OpaqueRef:", "Ref:")):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from refs_in(v)
        elif isinstance(value, list):
            for v in value:
                yield from refs_in(v)

    dangling = {r for o in objects for r in refs_in(o["snapshot"]) if r != NULL and r not in ids}
    assert not dangling  # xapi's export.ml check_references: only export ids or the null ref
    disk_dirs = sorted({n.split("/")[0] for n in names[1:]})
    assert len(disk_dirs) == 2 and all(d.startswith("Ref:") for d in disk_dirs)  # not the CD
    assert all(n.endswith(".checksum") or n.split("/")[1].isdigit() for n in names[1:])
    chunk_names = [n for n in names[1:] if not n.endswith(".checksum")]
    assert len(chunk_names) == 5  # only the first, the last and the data chunks travel: 0, 33, 39 and 0, 7
    assert xva_path.stat().st_size < 6 * MIB
    t = task(api)
    with open(xva_path, "rb") as f:
        r = requests.put(f"{xapid.url}import", params={"session_id": session, "task_id": t,
                                                       "sr_id": default_sr(api)}, data=f, timeout=30)
    assert r.status_code == 200, r.text
    rec = finished(api, t)
    assert rec["status"] == "success", rec["error_info"]
    assert rec["other_config"]["object_creation"] == "complete"
    new_vms = [v for v in api.VM.get_all() if f"<value>{v}</value>" in rec["result"]]
    assert len(new_vms) == 1 and new_vms[0] != vm
    new = new_vms[0]
    old_rec, new_rec = api.VM.get_record(vm), api.VM.get_record(new)
    # Every field is the same but the identities: uuid, refs, the MAC seed (new, as xapi without restore).
    differ = {k for k in old_rec if old_rec[k] != new_rec[k]}
    assert differ == {"uuid", "VBDs", "VIFs", "metrics", "other_config"}, differ
    assert {k: v for k, v in old_rec["other_config"].items() if k != "mac_seed"} == \
        {k: v for k, v in new_rec["other_config"].items() if k != "mac_seed"}
    assert new_rec["power_state"] == "Halted" and new_rec["current_operations"] == {}
    assert new_rec["uuid"] != old_rec["uuid"]
    assert new_rec["other_config"]["purpose"] == "test"
    cds = [b for b in new_rec["VBDs"] if api.VBD.get_type(b) == "CD"]
    assert [api.VBD.get_VDI(b) for b in cds] == [iso]  # the ISO is here: the CD keeps it, never streamed
    new_disks = sorted((api.VBD.get_userdevice(b), api.VBD.get_VDI(b)) for b in new_rec["VBDs"] if b not in cds)
    for (_dev, new_vdi_ref), old_vdi in zip(new_disks, disks, strict=True):
        old_vdi_rec, new_vdi_rec = api.VDI.get_record(old_vdi), api.VDI.get_record(new_vdi_ref)
        # physical_utilisation: the source's files were written behind the daemon's back here
        assert {k for k in old_vdi_rec if old_vdi_rec[k] != new_vdi_rec[k]} <= {"uuid", "VBDs", "location",
                                                                                "physical_utilisation"}
        assert int(new_vdi_rec["physical_utilisation"]) == \
            vdi_file(xapid.state_dir, api, new_vdi_ref).stat().st_blocks * 512
        assert same_bytes(vdi_file(xapid.state_dir, api, old_vdi), vdi_file(xapid.state_dir, api, new_vdi_ref))
        assert vdi_file(xapid.state_dir, api, new_vdi_ref).stat().st_blocks * 512 < 2 * MIB
    vifs = new_rec["VIFs"]
    old_vif, new_vif = api.VIF.get_record(old_rec["VIFs"][0]), api.VIF.get_record(vifs[0])
    assert {k for k in old_vif if old_vif[k] != new_vif[k]} == {"uuid", "VM", "MAC"}  # an autogenerated MAC
    assert new_vif["MAC_autogenerated"] and new_vif["network"] == old_vif["network"]
    for old_vbd in old_rec["VBDs"]:
        a = api.VBD.get_record(old_vbd)
        b = api.VBD.get_record(next(v for v in new_rec["VBDs"] if api.VBD.get_userdevice(v) == a["userdevice"]))
        assert {k for k in a if a[k] != b[k]} <= {"uuid", "VM", "VDI"}
    assert api.VBD.get_bootable([b for b in new_rec["VBDs"] if api.VBD.get_userdevice(b) == "0"][0])


@pytest.mark.slow
def test_xva_round_trip_of_a_1gib_sparse_disk_in_bounded_memory(xapid: Xapid, tmp_path: Path) -> None:
    api, session = session_of(xapid)
    vm = make_vm(api, "big")[0]
    big = new_vdi(api, default_sr(api), GIB, "big")
    new_vbd(api, vm, big, "2")
    source = sparse_image(vdi_file(xapid.state_dir, api, big), GIB, pieces(GIB))
    pid = xapid.proc.pid  # type: ignore[union-attr]
    before = rss_kib(pid)
    xva_path = tmp_path / "big.xva"
    with requests.get(f"{xapid.url}export", params={"session_id": session, "ref": vm}, stream=True,
                      timeout=120) as r, open(xva_path, "wb") as f:
        for piece in r.iter_content(4 * MIB):
            f.write(piece)
    t = task(api)
    with open(xva_path, "rb") as f:
        r = requests.put(f"{xapid.url}import", params={"session_id": session, "task_id": t}, data=f, timeout=120)
    assert r.status_code == 200 and finished(api, t)["status"] == "success"
    assert rss_kib(pid) - before < 64 * 1024
    new = next(v for v in api.VM.get_all() if v in api.task.get_result(t))
    copy = next(api.VBD.get_VDI(b) for b in api.VM.get_VBDs(new) if api.VBD.get_userdevice(b) == "2")
    assert same_bytes(source, vdi_file(xapid.state_dir, api, copy))
    assert vdi_file(xapid.state_dir, api, copy).stat().st_blocks * 512 < 8 * MIB


def test_xva_import_restore_keeps_uuid_and_a_truncated_archive_leaves_nothing(xapid: Xapid, tmp_path: Path) -> None:
    api, session = session_of(xapid)
    vm, disks = make_vm(api, "restored")
    sparse_image(vdi_file(xapid.state_dir, api, disks[0]), 40 * MIB, {20 * MIB: b"r" * MIB})
    data = requests.get(f"{xapid.url}export", params={"session_id": session, "ref": vm}, timeout=30).content
    uuid = api.VM.get_uuid(vm)
    seed, mac = api.VM.get_other_config(vm)["mac_seed"], api.VIF.get_MAC(api.VM.get_VIFs(vm)[0])
    vms_before, vdis_before = set(api.VM.get_all()), set(api.VDI.get_all())
    t = task(api)
    r = requests.put(f"{xapid.url}import", params={"session_id": session, "task_id": t}, data=data[:len(data) // 2],
                     timeout=30)
    rec = finished(api, t)
    assert rec["status"] == "failure" and rec["error_info"] == ["IMPORT_ERROR_PREMATURE_EOF"]
    assert set(api.VM.get_all()) == vms_before and set(api.VDI.get_all()) == vdis_before
    del r
    t = task(api)
    r = requests.put(f"{xapid.url}import", params={"session_id": session, "task_id": t, "restore": "true"},
                     data=data, timeout=30)
    assert finished(api, t)["error_info"] == ["DUPLICATE_VM", vm]
    api.VM.destroy(vm)
    t = task(api)
    r = requests.put(f"{xapid.url}import", params={"session_id": session, "task_id": t, "restore": "true"},
                     data=data, timeout=30)
    assert r.status_code == 200 and finished(api, t)["status"] == "success"
    restored = api.VM.get_by_uuid(uuid)
    assert api.VM.get_other_config(restored)["mac_seed"] == seed
    assert api.VIF.get_MAC(api.VM.get_VIFs(restored)[0]) == mac


def test_a_client_gone_mid_import_leaves_no_vm_or_vdi(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    vm, disks = make_vm(api, "half")
    sparse_image(vdi_file(xapid.state_dir, api, disks[0]), 40 * MIB, {i * MIB: b"d" * MIB for i in range(0, 40, 2)})
    data = requests.get(f"{xapid.url}export", params={"session_id": session, "ref": vm}, timeout=30).content
    vms_before, vdis_before = set(api.VM.get_all()), set(api.VDI.get_all())
    t = task(api)
    url = urlsplit(xapid.url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        s.sendall((f"PUT /import?session_id={session}&task_id={t} HTTP/1.1\r\nhost: x\r\n"
                   f"content-length: {len(data)}\r\n\r\n").encode() + data[:len(data) // 2])
        wait_for(lambda: set(api.VM.get_all()) - vms_before, 10, "the new VM")
        new = (set(api.VM.get_all()) - vms_before).pop()
        assert list(api.VM.get_current_operations(new).values()) == ["import"]
    rec = finished(api, t)
    assert rec["status"] == "failure" and rec["error_info"] == ["IMPORT_ERROR_PREMATURE_EOF"]
    assert set(api.VM.get_all()) == vms_before and set(api.VDI.get_all()) == vdis_before
    sr_dir = vdi_file(xapid.state_dir, api, disks[0]).parent
    assert sorted(p.name for p in sr_dir.iterdir()) == sorted(f"{api.VDI.get_location(v)}.img" for v in vdis_before
                                                              if api.VDI.get_SR(v) == default_sr(api))


def test_a_daemon_killed_mid_import_restarts_without_the_half_made_vm(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    vm, disks = make_vm(api, "killed")
    sparse_image(vdi_file(xapid.state_dir, api, disks[0]), 40 * MIB, {i * MIB: b"k" * MIB for i in range(0, 40, 2)})
    data = requests.get(f"{xapid.url}export", params={"session_id": session, "ref": vm}, timeout=30).content
    vms_before, vdis_before = set(api.VM.get_all()), set(api.VDI.get_all())
    files_before = sorted(p.name for p in vdi_file(xapid.state_dir, api, disks[0]).parent.iterdir())
    url = urlsplit(xapid.url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        s.sendall((f"PUT /import?session_id={session} HTTP/1.1\r\nhost: x\r\n"
                   f"content-length: {len(data)}\r\n\r\n").encode() + data[:len(data) // 2])
        wait_for(lambda: set(api.VM.get_all()) - vms_before, 10, "the new VM")
        xapid.kill()
    xapid.start()
    api, _session = session_of(xapid)
    assert set(api.VM.get_all()) == vms_before and set(api.VDI.get_all()) == vdis_before
    assert sorted(p.name for p in vdi_file(xapid.state_dir, api, disks[0]).parent.iterdir()) == files_before
    assert all(api.VM.get_current_operations(v) == {} for v in vms_before)


def xo_put(d: Xapid, target: str, data: bytes) -> None:
    """Xen Orchestra's putResource for a stream of unknown length: 1 PiB announced, the data, then a
    close without waiting for the answer (xen-api's index.mjs)."""
    url = urlsplit(d.url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        s.sendall((f"PUT {target} HTTP/1.1\r\nhost: x\r\ncontent-length: 1125899906842624\r\n\r\n").encode()
                  + data)


def test_xen_orchestra_style_uploads_of_unknown_length_succeed(xapid: Xapid) -> None:
    from xapid.handlers import vhd

    api, session = session_of(xapid)
    vm, disks = make_vm(api, "from-xo")
    sparse_image(vdi_file(xapid.state_dir, api, disks[0]), 40 * MIB, {9 * MIB: b"xo" * 1000})
    data = requests.get(f"{xapid.url}export/", params={"session_id": session, "ref": vm}, timeout=30).content
    t = task(api)
    xo_put(xapid, f"/import/?session_id={session}&task_id={t}&sr_id={default_sr(api)}", data)
    rec = finished(api, t)
    assert rec["status"] == "success", rec["error_info"]
    new = next(v for v in api.VM.get_all() if v in rec["result"])
    assert api.VM.get_name_label(new) == "from-xo"
    raw = new_vdi(api, default_sr(api), 8 * MIB)
    t = task(api)
    xo_put(xapid, f"/import_raw_vdi/?session_id={session}&task_id={t}&vdi={raw}", b"r" * (3 * MIB))
    assert finished(api, t)["status"] == "success"
    assert vdi_file(xapid.state_dir, api, raw).read_bytes() == (b"r" * (3 * MIB)).ljust(8 * MIB, b"\0")
    image = bytes(4 * MIB) + b"v" * MIB + bytes(3 * MIB)
    stream = b"".join(vhd.export_stream(8 * MIB, [2], lambda o, n: image[o:o + n]))
    t = task(api)
    xo_put(xapid, f"/import_raw_vdi/?session_id={session}&task_id={t}&vdi={raw}&format=vhd", stream)
    assert finished(api, t)["status"] == "success"
    assert vdi_file(xapid.state_dir, api, raw).read_bytes() == image


def test_exportimport_py_protocol_put_without_length_gets_its_200_first(xapid: Xapid) -> None:
    """The SDK's scripts/examples/python/exportimport.py: PUT HTTP/1.0 without content-length, wait
    for "200 OK", send the bytes, close; the outcome is read from the task."""
    api, session = session_of(xapid)
    src = new_vdi(api, default_sr(api), 4 * MIB)
    requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": session, "vdi": src},
                 data=os.urandom(4 * MIB), timeout=10)
    dst = api.VDI.create(api.VDI.get_record(src))
    export_task, import_task = task(api, "export"), task(api, "import")
    data = requests.get(f"{xapid.url}export_raw_vdi?session_id={session}&vdi={src}&task_id={export_task}",
                        stream=True, timeout=10)
    url = urlsplit(xapid.url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        s.sendall(f"PUT /import_raw_vdi?session_id={session}&vdi={dst}&task_id={import_task} HTTP/1.0\r\n"
                  "Connection:close\r\n\r\n".encode())
        head = s.recv(1024)
        assert head.startswith(b"HTTP/1.1 200 OK") and f"task-id: {import_task}".encode() in head
        for block in data.iter_content(65536):
            s.sendall(block)
    assert finished(api, import_task)["status"] == "success"
    assert finished(api, export_task)["status"] == "success"
    assert same_bytes(vdi_file(xapid.state_dir, api, src), vdi_file(xapid.state_dir, api, dst))
    t = task(api)  # an error found while reading lands in the task (the 200 is already out)
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        s.sendall(f"PUT /import_raw_vdi?session_id={session}&vdi={dst}&task_id={t} HTTP/1.0\r\n\r\n".encode())
        assert s.recv(1024).startswith(b"HTTP/1.1 200 OK")
        s.sendall(b"x" * (5 * MIB))
    assert finished(api, t)["error_info"] == ["VDI_TOO_SMALL", dst, str(5 * MIB)]
    r = requests.put(f"{xapid.url}import_raw_vdi", params={"session_id": "OpaqueRef:bad", "vdi": dst},
                     headers={"content-length": None}, data=b"", timeout=10)  # refused before the head
    assert r.status_code == 401


def test_xva_import_refuses_what_is_not_an_xva_and_an_export_of_a_running_vm(xapid: Xapid) -> None:
    api, session = session_of(xapid)
    t = task(api)
    member = tarfile.TarInfo("notes.txt")
    member.size = 3
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(member, io.BytesIO(b"abc"))
    requests.put(f"{xapid.url}import", params={"session_id": session, "task_id": t}, data=buf.getvalue(), timeout=10)
    assert finished(api, t)["error_info"] == ["IMPORT_ERROR_UNEXPECTED_FILE", "ova.xml", "notes.txt"]
    vm, _disks = make_vm(api, "runner")
    api.VM.start(vm, False, False)
    t = task(api)
    r = requests.get(f"{xapid.url}export", params={"session_id": session, "ref": vm, "task_id": t}, timeout=10)
    assert r.status_code == 500 and finished(api, t)["error_info"][0] == "VM_BAD_POWER_STATE"


def test_differential_vhd_export_relative_to_a_base_carries_only_the_changed_blocks(xapid: Xapid) -> None:
    """export_raw_vdi.ml with ``base=`` (vhd-tool --relative-to): what Xen Orchestra's delta backups read.
    The delta's blocks over the base give the disk back."""
    from xapid.handlers import vhd

    api, session = session_of(xapid)
    size = 40 * MIB
    block = vhd.BLOCK
    first = bytearray(size)
    for b in (3, 5, 9):
        first[b * block:b * block + MIB] = os.urandom(MIB)
    vdi = new_vdi(api, default_sr(api), size)
    put = {"session_id": session, "vdi": vdi}
    assert requests.put(f"{xapid.url}import_raw_vdi", params=put, data=bytes(first), timeout=30).status_code == 200
    base = api.VDI.snapshot(vdi, {})
    second = bytearray(first)
    second[3 * block:4 * block] = bytes(block)  # cleared
    second[5 * block + 100:5 * block + 200] = b"y" * 100  # changed
    second[15 * block:15 * block + 10] = b"new blocks"  # new
    assert requests.put(f"{xapid.url}import_raw_vdi", params=put, data=bytes(second), timeout=30).status_code == 200
    for name in (base, api.VDI.get_uuid(base)):  # by ref or uuid
        got = requests.get(f"{xapid.url}export_raw_vdi", params={**put, "format": "vhd", "base": name}, timeout=30)
        assert got.status_code == 200
        delta = got.content
        entries = struct.unpack_from(">I", delta, 512 + 28)[0]
        bat = struct.unpack_from(f">{entries}I", delta, 1536)
        assert [i for i, s in enumerate(bat) if s != 0xFFFFFFFF] == [3, 5, 15]
    # The delta's blocks laid over the base give the disk (as a backup tool merges a chain).
    merged = bytearray(first)
    for i, sector in enumerate(bat):
        if sector != 0xFFFFFFFF:
            start = sector * 512 + vhd.BITMAP
            merged[i * block:(i + 1) * block] = delta[start:start + block]
    assert merged == second
    # Against itself nothing changed; an unknown base is refused before a byte is sent.
    same = requests.get(f"{xapid.url}export_raw_vdi", params={**put, "format": "vhd", "base": vdi}, timeout=30)
    assert len(same.content) == vhd.export_layout(size, [])[2]
    t = task(api)
    bad = requests.get(f"{xapid.url}export_raw_vdi", params={**put, "format": "vhd", "base": "nope", "task_id": t},
                       timeout=30)
    assert bad.status_code == 500 and finished(api, t)["error_info"] == ["UUID_INVALID", "VDI", "nope"]
