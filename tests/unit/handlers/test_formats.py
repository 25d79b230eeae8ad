"""The disk formats of the import/export handlers: dynamic VHD, the XVA tar, sparse writes
(xapid/handlers/vhd.py, xva.py, sparse.py; xapi's vhd-tool, stream_vdi.ml, export.ml)."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from xapid.handlers import sparse, vhd, xva

MIB = 1024**2


def reader_of(data: bytes, piece: int = 7777) -> Callable[[int], bytes]:
    """``read(n)`` over ``data`` that returns short pieces, as a socket does."""
    stream = io.BytesIO(data)
    return lambda n: stream.read(min(n, piece))


def disk(size: int, pieces: dict[int, bytes]) -> bytes:
    out = bytearray(size)
    for offset, data in pieces.items():
        out[offset:offset + len(data)] = data
    return bytes(out)


def checksum_ok(block: bytes, at: int) -> bool:
    stored, = struct.unpack_from(">I", block, at)
    return stored == ~(sum(block[:at]) + sum(block[at + 4:])) & 0xFFFFFFFF


# -- VHD ------------------------------------------------------------------------------------------------


def test_vhd_export_is_a_spec_dynamic_vhd_with_only_the_allocated_blocks() -> None:
    size = 20 * MIB + 4096  # not a whole number of blocks
    image = disk(size, {0: b"boot", 9 * MIB: b"x" * 3000, size - 10: b"end"})
    blocks = vhd.allocated_blocks([(0, 4), (9 * MIB, 3000), (size - 10, 10)], size)
    assert blocks == [0, 4, 10]
    out = b"".join(vhd.export_stream(size, blocks, lambda o, n: image[o:o + n]))
    assert len(out) == vhd.export_layout(size, blocks)[2]
    head_copy, dyn, tail = out[:512], out[512:1536], out[-512:]
    assert head_copy == tail and head_copy[:8] == b"conectix" and checksum_ok(tail, 64)
    assert struct.unpack_from(">QQI", tail, 40)[:2] == (size, size)
    assert struct.unpack_from(">I", tail, 60)[0] == 3  # dynamic
    assert dyn[:8] == b"cxsparse" and checksum_ok(dyn, 36)
    table, entries, block_size = struct.unpack_from(">Q", dyn, 16)[0], *struct.unpack_from(">II", dyn, 28)
    assert (entries, block_size) == (11, 2 * MIB)
    bat = struct.unpack_from(f">{entries}I", out, table)
    assert [i for i, s in enumerate(bat) if s != 0xFFFFFFFF] == blocks
    # Each block: a full bitmap then the data, read back through the BAT as any VHD reader would.
    for n in blocks:
        at = bat[n] * 512 + 512
        assert out[at:at + 2 * MIB] == image[n * 2 * MIB:(n + 1) * 2 * MIB].ljust(2 * MIB, b"\0")


def test_vhd_round_trip_through_the_streaming_reader() -> None:
    size = 9 * MIB
    image = disk(size, {5: b"hello", 4 * MIB + 512: os.urandom(70000)})
    blocks = vhd.allocated_blocks([(0, 10), (4 * MIB, 80000)], size)
    out = b"".join(vhd.export_stream(size, blocks, lambda o, n: image[o:o + n]))
    reader = vhd.VhdReader(reader_of(out))
    assert reader.read_header() == size
    back = bytearray(size + 2 * MIB)
    for offset, data in reader.blocks():
        back[offset:offset + len(data)] = data
    assert bytes(back[:size]) == image


def test_vhd_reader_honours_sector_bitmaps() -> None:
    size = 2 * MIB
    out = bytearray(b"".join(vhd.export_stream(size, [0], lambda o, n: b"\x01" * n)))
    bat_at = 1536
    block_at = struct.unpack_from(">I", out, bat_at)[0] * 512
    out[block_at:block_at + 512] = b"\0" * 512
    out[block_at] = 0b01000000  # only sector 1 present
    reader = vhd.VhdReader(reader_of(bytes(out)))
    reader.read_header()
    assert [(o, len(d)) for o, d in reader.blocks()] == [(512, 512)]


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b"x" * 512 + b[512:], "not a VHD"),
    (lambda b: b[:40] + b"\xff" + b[41:], "checksum"),
    (lambda b: b[:512] + b"x" + b[513:], "dynamic disk header"),
])
def test_vhd_reader_refuses_what_is_not_a_dynamic_vhd(damage: Callable[[bytes], bytes], message: str) -> None:
    out = b"".join(vhd.export_stream(4 * MIB, [1], lambda o, n: b"\x02" * n))
    with pytest.raises(vhd.VhdError, match=message):
        vhd.VhdReader(reader_of(damage(out))).read_header()


def test_vhd_reader_refuses_a_truncated_stream() -> None:
    out = b"".join(vhd.export_stream(4 * MIB, [1], lambda o, n: b"\x02" * n))
    reader = vhd.VhdReader(reader_of(out[:-600000]))
    reader.read_header()
    with pytest.raises(EOFError):
        list(reader.blocks())


def test_vhd_geometry_matches_the_specification_examples() -> None:
    assert vhd.geometry(8 * MIB) == (240, 4, 17)  # 16384 sectors: 963 per head-track, 4 heads
    assert vhd.geometry(127 * 1024 * MIB)[1:] == (16, 255)


# -- XVA ------------------------------------------------------------------------------------------------


def test_xva_disk_members_are_a_tar_that_tarfile_reads_with_xapi_names_and_sha1_checksums() -> None:
    size = 5 * MIB + 100
    image = disk(size, {2 * MIB + 3: b"data"})
    stream = b"".join([xva.tar_file("ova.xml", b"<value/>"), *xva.disk_members("Ref:3", size,
                                                                              lambda o, n: image[o:o + n]), xva.END])
    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        names = tar.getnames()
        assert names == ["ova.xml", "Ref:3/00000000", "Ref:3/00000000.checksum", "Ref:3/00000002",
                         "Ref:3/00000002.checksum", "Ref:3/00000005", "Ref:3/00000005.checksum"]
        chunk = tar.extractfile("Ref:3/00000002").read()  # type: ignore[union-attr]
        assert chunk == image[2 * MIB:3 * MIB]
        assert tar.extractfile("Ref:3/00000002.checksum").read() == hashlib.sha1(chunk).hexdigest().encode()  # type: ignore[union-attr]
        assert tar.getmember("Ref:3/00000005").size == 100


def test_xva_disk_round_trip_seeks_over_the_missing_chunks() -> None:
    size = 6 * MIB
    image = disk(size, {1: b"a", 3 * MIB + 5: b"b" * 1000})
    stream = b"".join([*xva.disk_members("Ref:1", size, lambda o, n: image[o:o + n]), xva.END])
    back = bytearray(size)
    writes: list[int] = []

    def write_at(offset: int, data: bytes) -> None:
        writes.append(offset)
        back[offset:offset + len(data)] = data

    tar = xva.TarReader(reader_of(stream))
    xva.read_disk(tar, "Ref:1", size, write_at)
    assert bytes(back) == image and writes == [0, 3 * MIB, 5 * MIB]
    assert tar.next() is None


def test_xva_bad_checksum_fails_unless_forced() -> None:
    stream = bytearray(b"".join([*xva.disk_members("Ref:1", MIB, lambda o, n: b"z" * n), xva.END]))
    stream[600] ^= 1  # a byte of the chunk's data
    with pytest.raises(xva.XvaError) as e:
        xva.read_disk(xva.TarReader(reader_of(bytes(stream))), "Ref:1", MIB, lambda o, d: None)
    assert e.value.code == "IMPORT_ERROR_SOME_CHECKSUMS_FAILED"
    xva.read_disk(xva.TarReader(reader_of(bytes(stream))), "Ref:1", MIB, lambda o, d: None, force=True)


def test_xva_chunks_out_of_order_or_of_another_disk_are_refused() -> None:
    a = list(xva.disk_members("Ref:1", 3 * MIB, lambda o, n: b"q" * n))
    swapped = b"".join([a[2], a[3], a[0], a[1], *a[4:], xva.END])
    with pytest.raises(xva.XvaError, match="out of order"):
        xva.read_disk(xva.TarReader(reader_of(swapped)), "Ref:1", 3 * MIB, lambda o, d: None)
    with pytest.raises(xva.XvaError, match="expected a chunk of Ref:2"):
        xva.read_disk(xva.TarReader(reader_of(b"".join(a))), "Ref:2", 3 * MIB, lambda o, d: None)


def test_ova_xml_round_trip() -> None:
    version = xva.version_struct("h", "8.4.0", "XCP-ng", "1", 25, 6)
    doc = xva.ova_xml(version, [("VM", "Ref:0", "<value><struct><member><name>name_label</name>"
                                                  "<value>a &amp; b</value></member></struct></value>")])
    got_version, objects = xva.parse_ova_xml(doc)
    assert got_version["export_vsn"] == 2 and got_version["xapi_major"] == 25
    assert objects == [{"class": "VM", "id": "Ref:0", "snapshot": {"name_label": "a & b"}}]
    with pytest.raises(xva.XvaError):
        xva.parse_ova_xml(b"<!DOCTYPE x [<!ENTITY a 'b'>]><value>&a;</value>")


# -- sparse writes ----------------------------------------------------------------------------------------


def test_sparse_writer_skips_zeros_and_punches_old_data(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
        f.seek(10 * MIB)
        f.write(b"\xee" * MIB)  # old data that the import overwrites with zeros
    fd = os.open(path, os.O_RDWR)
    try:
        w = sparse.SparseWriter(fd)
        w.write_at(0, b"\0" * MIB)
        w.write_at(10 * MIB, b"\0" * MIB)
        w.write_at(20 * MIB, b"\0" * 100000 + b"x" + b"\0" * 200000)
        assert w.written == sparse.GRAIN  # only the grain holding the "x"
        r = sparse.SparseReader(fd, 64 * MIB)
        assert r.read_at(10 * MIB, MIB) == b"\0" * MIB
        assert r.read_at(20 * MIB + 100000, 1) == b"x"
        assert not r.has_data(0, 20 * MIB)
    finally:
        os.close(fd)
    assert os.stat(path).st_blocks * 512 <= 2 * sparse.GRAIN


def test_xva_gzip_stream_is_read_back_transparently_and_plain_streams_pass_through() -> None:
    import gzip

    image = disk(3 * MIB, {MIB + 1: os.urandom(5000)})
    members = [xva.tar_file("ova.xml", b"<value/>"), *xva.disk_members("Ref:0", 3 * MIB, lambda o, n: image[o:o + n]),
               xva.END]
    packed = b"".join(xva.gzip_stream(iter(members)))
    assert gzip.decompress(packed) == b"".join(members)  # a real gzip file
    for stream in (packed, b"".join(members)):
        tar = xva.TarReader(xva.opened(reader_of(stream)))
        assert tar.next() == ("ova.xml", 8)
        back = bytearray(3 * MIB)

        def write_at(offset: int, data: bytes, back: bytearray = back) -> None:
            back[offset:offset + len(data)] = data

        xva.read_disk(tar, "Ref:0", 3 * MIB, write_at)
        assert bytes(back) == image
    with pytest.raises(xva.XvaError, match="zstd"):
        xva.opened(reader_of(xva.ZSTD_MAGIC + b"\0" * 100))
    truncated = xva.TarReader(xva.opened(reader_of(packed[:len(packed) // 2])))
    truncated.next()
    with pytest.raises(EOFError):
        xva.read_disk(truncated, "Ref:0", 3 * MIB, lambda o, d: None)
