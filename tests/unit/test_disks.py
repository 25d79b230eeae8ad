"""Sparse-aware VDI file copies, reflink clones and resizes (xapid/storage.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xapid.errors import ApiError
from xapid.storage import Disks

MIB = 1024**2


def test_copy_keeps_bytes_and_holes(tmp_path: Path) -> None:
    disks = Disks(tmp_path)
    src = disks.create_vdi("sr1", "a", 256 * MIB)
    with open(src, "r+b") as f:
        f.seek(3 * MIB)
        f.write(b"x" * 5000)
        f.seek(200 * MIB)
        f.write(b"y" * 70000)
    for share in (False, True):
        dst = disks.copy_vdi(("sr1", "a"), ("sr2", f"b{share}"), 256 * MIB, share=share)
        assert os.path.getsize(dst) == 256 * MIB and dst.read_bytes() == src.read_bytes()
        assert disks.allocated("sr2", f"b{share}") < 4 * MIB          # holes stayed holes
    grown = disks.copy_vdi(("sr1", "a"), ("sr2", "c"), 512 * MIB)
    assert os.path.getsize(grown) == 512 * MIB


def test_resize_and_failures_leave_nothing(tmp_path: Path) -> None:
    disks = Disks(tmp_path)
    disks.create_vdi("sr1", "a", MIB)
    disks.resize_vdi("sr1", "a", 8 * MIB)
    assert os.path.getsize(disks.vdi_path("sr1", "a")) == 8 * MIB
    with pytest.raises(ApiError) as info:
        disks.copy_vdi(("sr1", "missing"), ("sr1", "z"), MIB)
    assert info.value.code == "SR_BACKEND_FAILURE" and not disks.vdi_path("sr1", "z").exists()
    with pytest.raises(ApiError):
        disks.copy_vdi(("sr1", "a"), ("sr1", "a"), MIB)               # never overwrites an existing file
    assert os.path.getsize(disks.vdi_path("sr1", "a")) == 8 * MIB
