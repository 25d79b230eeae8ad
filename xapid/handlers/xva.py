"""The XVA format: a tar stream of ``ova.xml`` then each disk in 1 MiB chunks (xapi's export.ml,
stream_vdi.ml, import.ml).

* ``ova.xml`` is one XML-RPC value: a struct ``{version: {...}, objects: [{class, id, snapshot}]}``
  whose ``id`` are export-local references ``Ref:N`` and whose snapshots are the records with every
  reference rewritten to one of those ids (or the null ref).
* Disk ``Ref:N`` is the files ``Ref:N/00000000``, ``Ref:N/00000001``... of :data:`CHUNK` bytes
  (the last one shorter), each followed by ``<name>.checksum`` (the chunk's SHA-1 in hex, as xapi up
  to 8.2 wrote; xapi since writes ``.xxhash`` and reads both).  All-zero chunks are left out but
  for the first and the last, so the holes of a sparse disk cost nothing; the importer seeks over
  the missing numbers (xapi's ``recv_all_vdi``).
* The stream ends with two zero blocks; no checksum table (``export_vsn`` 2).

Everything here is streamed: one chunk is held at a time.
"""

from __future__ import annotations

import hashlib
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from defusedxml import ElementTree as SafeET

from xapid.wire import BadRequest, XDateTime, _decode_value, escape

CHUNK = 1024 * 1024
BLOCK = 512
OVA_XML = "ova.xml"
MAX_OVA_XML = 8 * 1024 * 1024  # metadata larger than this is refused rather than parsed (a VM's is ~50 KiB)
EXPORT_VSN = 2
ZERO = bytes(CHUNK)


class XvaError(Exception):
    """The stream is not an XVA this reader can take; ``code`` and ``params`` are xapi's error."""

    def __init__(self, code: str, *params: str) -> None:
        super().__init__(code, *params)
        self.code = code
        self.params = list(params)


# -- tar ---------------------------------------------------------------------------------------------


def tar_header(name: str, size: int, mtime: int | None = None) -> bytes:
    """A ustar header block for a regular file ``name`` of ``size`` bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(time.time() if mtime is None else mtime)
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def tar_file(name: str, data: bytes, mtime: int | None = None) -> bytes:
    """A whole tar member: header, data, padding."""
    return tar_header(name, len(data), mtime) + data + padding(len(data))


END = b"\0" * (2 * BLOCK)


class TarReader:
    """Reads tar members from ``read(n)`` (up to ``n`` bytes, b"" at the end), front to back."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._left = 0  # unread bytes of the current member's data
        self._pad = 0

    def exact(self, n: int) -> bytes:
        parts = []
        left = n
        while left:
            data = self._read(min(left, CHUNK))
            if not data:
                raise EOFError("the archive ended early")
            parts.append(data)
            left -= len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def next(self) -> tuple[str, int] | None:
        """Skip the rest of the current member; the (name, size) of the next, None at the end."""
        self.skip()
        while True:
            block = self.exact(BLOCK)
            if block == b"\0" * BLOCK:
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.TarError as e:
                raise XvaError("IMPORT_ERROR", f"bad tar header: {e}") from None
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME):
                self._left, self._pad = info.size, -info.size % BLOCK
                self.skip()  # extended headers carry nothing xapi's archives need
                continue
            self._left, self._pad = info.size, -info.size % BLOCK
            return info.name, info.size

    def data(self, n: int | None = None) -> bytes:
        """Up to ``n`` bytes (all that is left of the member without ``n``) of the current member."""
        want = self._left if n is None else min(n, self._left)
        out = self.exact(want) if want else b""
        self._left -= want
        return out

    def skip(self) -> None:
        while self._left:
            self.data(CHUNK)
        if self._pad:
            self.exact(self._pad)
            self._pad = 0


# -- compression (xapi's use_compression=true|gzip; zstd is not read or written here) ---------------


GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def gzip_stream(pieces: Iterator[bytes], level: int = 6) -> Iterator[bytes]:
    """``pieces`` gzip-compressed as they come (closing the result closes ``pieces``)."""
    packer = zlib.compressobj(level, zlib.DEFLATED, 31)
    try:
        for piece in pieces:
            out = packer.compress(piece)
            if out:
                yield out
        yield packer.flush()
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


def opened(read: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """``read`` as a plain tar stream: a gzip-compressed one (xapi's ``with_open_archive`` sniffs
    the first block) is decompressed as it is read, at most ``n`` bytes of output per call."""
    first = b""
    while len(first) < len(ZSTD_MAGIC):
        data = read(CHUNK)
        if not data:
            break
        first += data
    if first.startswith(ZSTD_MAGIC):
        raise XvaError("IMPORT_ERROR", "zstd-compressed archives are not supported")
    if not first.startswith(GZIP_MAGIC):
        pending = [first]

        def plain(n: int) -> bytes:
            if pending:
                data = pending.pop()
                if len(data) > n:
                    pending.append(data[n:])
                    data = data[:n]
                if data:
                    return data
            return read(n)

        return plain
    unpacker = zlib.decompressobj(47)  # a gzip or zlib header, found by itself
    state = {"raw": first}

    def gunzip(n: int) -> bytes:
        while True:
            raw = unpacker.unconsumed_tail or state["raw"] or (b"" if unpacker.eof else read(CHUNK))
            state["raw"] = b""
            if not raw:
                return b""  # the end (or a truncated stream: the tar reader sees it end early)
            try:
                out = unpacker.decompress(raw, n)
            except zlib.error as e:
                raise XvaError("IMPORT_ERROR", f"bad gzip data: {e}") from None
            if out:
                return out
            if unpacker.eof:
                return b""

    return gunzip


# -- ova.xml ------------------------------------------------------------------------------------------


def version_struct(hostname: str, product_version: str, product_brand: str, build_number: str,
                   xapi_major: int, xapi_minor: int) -> str:
    """The ``version`` member of ova.xml (Importexport.rpc_of_version: the ints typed, as xapi)."""
    date = time.strftime("%Y-%m-%d", time.gmtime())
    members = [("hostname", f"<value>{escape(hostname)}</value>"), ("date", f"<value>{date}</value>"),
               ("product_version", f"<value>{escape(product_version)}</value>"),
               ("product_brand", f"<value>{escape(product_brand)}</value>"),
               ("build_number", f"<value>{escape(build_number)}</value>"),
               ("xapi_major", f"<value><i4>{xapi_major}</i4></value>"),
               ("xapi_minor", f"<value><i4>{xapi_minor}</i4></value>"),
               ("export_vsn", f"<value><i4>{EXPORT_VSN}</i4></value>")]
    return "<value><struct>" + "".join(f"<member><name>{k}</name>{v}</member>" for k, v in members) + \
        "</struct></value>"


def ova_xml(version: str, objects: list[tuple[str, str, str]]) -> bytes:
    """ova.xml from the version value and (class, id, snapshot value XML) objects."""
    parts = ["<value><struct><member><name>version</name>", version,
             "</member><member><name>objects</name><value><array><data>"]
    for cls, ident, snapshot in objects:
        parts.append(f"<value><struct><member><name>class</name><value>{escape(cls)}</value></member>"
                     f"<member><name>id</name><value>{escape(ident)}</value></member>"
                     f"<member><name>snapshot</name>{snapshot}</member></struct></value>")
    parts.append("</data></array></value></member></struct></value>")
    return "".join(parts).encode("utf-8")


def parse_ova_xml(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(version, objects) of ova.xml; each object a dict with ``class``, ``id`` and ``snapshot``."""
    try:
        root = SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
        if root.tag != "value":
            raise BadRequest("the root element is not a value")
        doc = _decode_value(root, 0)
    except BadRequest as e:
        raise XvaError("IMPORT_ERROR", f"ova.xml: {e}") from None
    except Exception as e:  # noqa: BLE001 - any parse failure of foreign metadata is one error
        raise XvaError("IMPORT_ERROR", f"ova.xml: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), dict) or \
            not isinstance(doc.get("objects"), list):
        raise XvaError("IMPORT_ERROR", "ova.xml: expected a struct with version and objects")
    objects = []
    for obj in doc["objects"]:
        if not (isinstance(obj, dict) and isinstance(obj.get("class"), str) and isinstance(obj.get("id"), str)
                and isinstance(obj.get("snapshot"), dict)):
            raise XvaError("IMPORT_ERROR", "ova.xml: an object lacks class, id or snapshot")
        objects.append(obj)
    return doc["version"], objects


def plain(value: Any) -> Any:
    """A decoded XML-RPC value with date-times as their text (for coercion by field type)."""
    if isinstance(value, XDateTime):
        return value.value
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# -- disks ---------------------------------------------------------------------------------------------


def disk_members(prefix: str, size: int, read_at: Callable[[int, int], bytes],
                 mtime: int | None = None) -> Iterator[bytes]:
    """The tar members of one disk: its chunks (all-zero ones left out, but the first and the last)
    each with its ``.checksum``.  ``read_at(offset, n)`` reads the disk; it may skip holes cheaply by
    returning shared zero buffers."""
    count = (size + CHUNK - 1) // CHUNK
    for n in range(count):
        offset = n * CHUNK
        length = min(CHUNK, size - offset)
        data = read_at(offset, length)
        if n not in (0, count - 1) and data == (ZERO if length == CHUNK else bytes(length)):
            continue
        name = f"{prefix}/{n:08d}"
        csum = hashlib.sha1(data).hexdigest().encode()
        yield tar_header(name, length, mtime) + data + padding(length)
        yield tar_file(name + ".checksum", csum, mtime)


def read_disk(tar: TarReader, prefix: str, size: int, write_at: Callable[[int, bytes], None],
              progress: Callable[[int], None] | None = None, force: bool = False) -> None:
    """Read the chunks of disk ``prefix`` (``size`` bytes) and write them with ``write_at``.

    Checks names (increasing chunk numbers under ``prefix``) and checksums (``.checksum`` SHA-1; an
    ``.xxhash`` file is accepted unchecked: no XXH64 here); ``force`` ignores a mismatch, as xapi.
    """
    offset = 0
    last = -1
    chunk_length = -1
    while offset < size:
        head = tar.next()
        if head is None:
            raise EOFError("the archive ended before the disk did")
        name, length = head
        if not name.startswith(prefix + "/"):
            raise XvaError("IMPORT_ERROR", f"expected a chunk of {prefix}, got {name}")
        suffix = name[len(prefix) + 1:]
        if not suffix.isdigit() or int(suffix) <= last:
            raise XvaError("IMPORT_ERROR", f"chunk {name} out of order")
        number = int(suffix)
        if chunk_length < 0:
            chunk_length = length  # xapi sizes the skipped chunks by the first one
        offset += (number - last - 1) * max(chunk_length, 0)
        digest = ""
        if length:  # a zero-length chunk is the keep-alive xapi sends from a slow disk: no data
            if offset + length > size:
                raise XvaError("IMPORT_ERROR", f"chunk {name} runs past the disk's {size} bytes")
            data = tar.data()
            write_at(offset, data)
            digest = hashlib.sha1(data).hexdigest()
            offset += length
        last = number
        check = tar.next()
        if check is None:
            raise EOFError("the archive ended before a checksum")
        check_name, _ = check
        if check_name == name + ".checksum":
            if digest and tar.data().decode("ascii", "replace").strip().lower() != digest and not force:
                raise XvaError("IMPORT_ERROR_SOME_CHECKSUMS_FAILED")
        elif check_name != name + ".xxhash":
            raise XvaError("IMPORT_ERROR", f"expected the checksum of {name}, got {check_name}")
        if progress is not None:
            progress(offset)
