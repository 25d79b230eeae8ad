"""Helpers the xhad engine and fork server tests share: processes found through ``/proc``, exit codes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xapid.ha.scripts import ScriptError


def processes_under(directory: Path, is_it: Callable[[list[bytes]], bool]) -> list[int]:
    """Pids of running processes whose command line names a path below ``directory`` and passes ``is_it``."""
    marker = os.fsencode(directory)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parts = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if is_it(parts) and any(part.startswith(marker) for part in parts):
            found.append(int(entry))
    return found


def heartbeat_pids_under(directory: Path) -> list[int]:
    """Pids of running heartbeat processes whose xhad.conf lies below ``directory``."""
    return processes_under(directory, lambda parts: b"--heartbeat" in parts)


def servers_under(directory: Path) -> list[int]:
    """Live xhad fork servers whose folder lies below ``directory``."""
    return processes_under(directory, lambda parts: any(p.endswith(b"xapid-forkserver") for p in parts))


def code(pool: Any, host: str, script: str, *args: str) -> int:
    """The MTC exit code of one script run on an engine pool (0 on success)."""
    try:
        pool.run(host, script, *args)
    except ScriptError as exc:
        return exc.exit_code
    return 0
