"""xe's file transfers: ``vm-export``, ``vm-import``, ``vdi-export``, ``vdi-import`` (cli_operations.ml,
cli_util.ml ``track_http_operation``, newcli.ml ``HttpPut``/``HttpGet``).

As real xe: the command creates a task, streams the file with an HTTP ``PUT``/``GET`` to the
daemon's handler (``/import``, ``/export``, ``/import_raw_vdi``, ``/export_raw_vdi``) naming
``session_id`` and ``task_id``, then waits for the task and reports its error if it failed.  A
regular file is sent with its ``content-length``, anything else (a pipe) chunked; an export never
overwrites an existing file (created exclusively, mode 0600).  ``progress=true`` on the VDI commands
draws xe's progress bar (``\\r NN% | ###``) on stderr from the task's progress.
"""

from __future__ import annotations

import http.client
import os
import re
import ssl
import stat
import sys
import threading
import time
from typing import BinaryIO
from urllib.parse import urlencode, urlsplit

from .xe_commands import Args, Command, Context, select_vms
from .xe_errors import ApiFailure, XeError

PIECE = 1 << 20
TASK_WAIT = 60.0  # seconds to wait for the handler to end the task after the transfer
_REF = re.compile(r"OpaqueRef:[0-9A-Za-z-]+")


MAX_REDIRECTS = 5


def _connection(ctx: Context) -> tuple[http.client.HTTPConnection, str]:
    return _connect(getattr(ctx.rpc, "url", "")), str(getattr(ctx.rpc, "session", ""))


def _connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "127.0.0.1", parts.port or 443, timeout=60,
            context=ssl._create_unverified_context())  # as xe's stunnel: the certificate is not checked
    else:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=60)
    return conn


def progress_bar(progress: float) -> str:
    """xe's bar (cli_operations.ml ``progress_bar``)."""
    progress = max(0.0, min(progress, 1.0))
    return "\r %3d%% %s %s" % (int(progress * 100), "|/-\\"[int(progress * 100) % 4], "#" * int(progress * 70))


class _Bar:
    """Draws the progress bar from the task while the transfer runs (its own poll of the task)."""

    def __init__(self, ctx: Context, task: str, enabled: bool) -> None:
        self.ctx = ctx
        self.task = task
        self.enabled = enabled
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Bar:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        from .xe import Connection

        conn = Connection(getattr(self.ctx.rpc, "url", ""))
        conn.session = getattr(self.ctx.rpc, "session", None)
        while not self._stop.wait(0.5):
            try:
                value = float(conn.call("task.get_progress", self.task))
            except Exception:  # noqa: BLE001 - the bar is cosmetic; the task outcome is checked after
                return
            sys.stderr.write(progress_bar(value))
            sys.stderr.flush()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
            sys.stderr.write(progress_bar(1.0) + "\n")


def transfer(ctx: Context, method: str, path: str, query: dict[str, str], filename: str, label: str,
             bar: bool = False) -> str:
    """Stream ``filename`` to (PUT) or from (GET) the handler at ``path`` through a new task; return the
    task's result, or raise the task's error."""
    task = str(ctx.rpc.call("task.create", label, ""))
    try:
        conn, session = _connection(ctx)
        target = path + "?" + urlencode({"session_id": session, "task_id": task, **query})
        with _Bar(ctx, task, bar):
            try:
                for _ in range(MAX_REDIRECTS):  # newcli.ml: a 302 is followed to its Location
                    location = _put(conn, target, filename) if method == "PUT" else _get(conn, target, filename)
                    if location is None:
                        break
                    conn.close()
                    conn = _connect(location)
                    parts = urlsplit(location)
                    target = parts.path + (f"?{parts.query}" if parts.query else "")
                else:
                    raise OSError("too many redirects")
            except OSError as e:
                if isinstance(e, FileExistsError):
                    raise XeError(f"Operation failed. Error: file '{filename}' already exists") from None
                client_error = str(e)
            else:
                client_error = ""
            finally:
                conn.close()
        return _outcome(ctx, task, client_error)
    finally:
        try:
            ctx.rpc.call("task.destroy", task)
        except ApiFailure:
            pass


def _put(conn: http.client.HTTPConnection, target: str, filename: str) -> str | None:
    """Send the file; the Location of a redirect, else None."""
    try:
        f: BinaryIO = open(filename, "rb")  # noqa: SIM115 - closed below, after the body is sent
    except OSError as e:
        raise XeError(f"Operation failed. Error: file '{filename}' does not exist: {e.strerror}") from None
    with f:
        st = os.fstat(f.fileno())
        regular = stat.S_ISREG(st.st_mode)
        conn.putrequest("PUT", target)
        if regular:
            conn.putheader("content-length", str(st.st_size))
        else:
            conn.putheader("transfer-encoding", "chunked")
        conn.putheader("content-type", "application/octet-stream")
        conn.endheaders()
        while piece := f.read(PIECE):
            conn.send(piece if regular else b"%x\r\n%b\r\n" % (len(piece), piece))
        if not regular:
            conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    response.read()
    return response.getheader("location") if response.status == 302 else None


def _get(conn: http.client.HTTPConnection, target: str, filename: str) -> str | None:
    """Receive into the file; the Location of a redirect, else None."""
    conn.request("GET", target)
    response = conn.getresponse()
    if response.status == 302:
        response.read()
        return response.getheader("location")
    if response.status != 200:
        response.read()
        raise OSError(f"the server answered HTTP {response.status}")
    fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # newcli.ml: Open_excl, 0o600
    with os.fdopen(fd, "wb") as out:
        while piece := response.read(PIECE):
            out.write(piece)
    return None


def _outcome(ctx: Context, task: str, client_error: str) -> str:
    deadline = time.monotonic() + TASK_WAIT
    while True:
        status = ctx.rpc.call("task.get_status", task)
        if status != "pending":
            break
        if client_error and time.monotonic() > deadline - TASK_WAIT + 1.0:
            raise ApiFailure("CLIENT_ERROR", [client_error])  # the handler never took the task
        if time.monotonic() > deadline:
            raise XeError("Operation failed: the server did not complete the task")
        time.sleep(0.1)
    if status == "success":
        return str(ctx.rpc.call("task.get_result", task))
    error = [str(e) for e in ctx.rpc.call("task.get_error_info", task)] or ["INTERNAL_ERROR"]
    if status == "cancelled":
        raise XeError("Operation cancelled")
    raise ApiFailure(error[0], error[1:])


# -- commands --------------------------------------------------------------------------------------------


def vm_export(ctx: Context, args: Args) -> None:
    filename = args.require("filename")
    compress = (args.get("compress") or "false").lower()
    if compress not in ("false", "true", "gzip"):
        raise XeError(f"Operation failed. Error: unsupported compression {compress} (xapid writes gzip only)")
    vms = select_vms(ctx, args, ("filename", "compress", "preserve-power-state", "include-snapshots",
                                 "metadata", "excluded-device-types"), templates=True)
    for n, vm in enumerate(vms, 1):
        name = filename if n == 1 else f"{filename}{n}"
        query = {"ref": vm, **({"use_compression": "true"} if compress != "false" else {})}
        transfer(ctx, "GET", "/export", query, name, "Export of VM")
        ctx.out.write("Export succeeded\n")


def vm_import(ctx: Context, args: Args) -> None:
    filename = args.require("filename")
    if filename.lower().endswith("ova.xml"):  # cli_operations.ml: the user meant the folder
        filename = filename[:-len("ova.xml")]
    query = {"restore": str(args.flag("preserve")).lower(), "force": str(args.flag("force")).lower()}
    if args.get("sr-uuid"):
        query["sr_id"] = ctx.db.ref_of("SR", args.require("sr-uuid"))
    result = transfer(ctx, "PUT", "/import", query, filename, "VM import")
    uuids = [str(ctx.rpc.call("VM.get_uuid", ref)) for ref in _REF.findall(result)]
    ctx.out.write(",".join(uuids) + "\n")


def _vdi_query(ctx: Context, args: Args) -> dict[str, str]:
    query = {"vdi": ctx.db.ref_of("VDI", args.require("uuid"))}
    if args.get("format"):
        query["format"] = args.require("format")
    return query


def vdi_import(ctx: Context, args: Args) -> None:
    transfer(ctx, "PUT", "/import_raw_vdi", _vdi_query(ctx, args), args.require("filename"), "VDI import",
             bar=args.flag("progress"))


def vdi_export(ctx: Context, args: Args) -> None:
    transfer(ctx, "GET", "/export_raw_vdi", _vdi_query(ctx, args), args.require("filename"), "VDI export",
             bar=args.flag("progress"))


def transfer_commands() -> list[Command]:
    return [
        Command("vm-export", vm_export, ("filename",), ("vm", "uuid", "multiple", "compress", "preserve-power-state",
                                                        "include-snapshots"),
                "Export the selected VM(s) to a file (an XVA); several VMs go to filename, filename2..."),
        Command("vm-import", vm_import, ("filename",), ("sr-uuid", "preserve", "force"),
                "Import a VM from an XVA file; prints the new VM's uuid."),
        Command("vdi-import", vdi_import, ("uuid", "filename"), ("format", "progress"),
                "Import a raw or VHD image (format=raw|vhd) into an existing VDI."),
        Command("vdi-export", vdi_export, ("uuid", "filename"), ("format", "progress"),
                "Export a VDI to a raw or VHD file (format=raw|vhd)."),
    ]

