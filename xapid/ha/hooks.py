"""xapi's external hooks (``/etc/xapi.d/<hook>/``): here ``<state-dir>/hooks/<hook>/``.

Every executable regular file in the hook's folder runs, in name order, with xapi's
arguments ``-reason <reason>`` and, for host hooks, ``-host-uuid <uuid>``.  A hook that
fails or runs longer than its timeout is logged and otherwise ignored, as in xapi
(``xapi_hooks.ml``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import structlog

log = structlog.get_logger("xapid.ha.hooks")

HOST_PRE_DECLARE_DEAD = "host-pre-declare-dead"
HOST_POST_DECLARE_DEAD = "host-post-declare-dead"
POOL_PRE_HA_VM_RESTART = "pool-pre-ha-vm-restart"
POOL_HA_OVERCOMMITTED = "pool-ha-overcommitted"
REASON_FENCED = "fenced"
REASON_OVERCOMMITTED = "overcommitted"
HOOK_TIMEOUT = 30.0


def scripts(root: Path, hook: str) -> list[Path]:
    """The executables of ``hook`` below ``root``, in name order."""
    folder = root / hook
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [p for p in entries if p.is_file() and os.access(p, os.X_OK)]


def exists(root: Path, hook: str) -> bool:
    return bool(scripts(root, hook))


def run(root: Path, hook: str, reason: str, host_uuid: str | None = None) -> None:
    """Run every script of ``hook``; failures are logged, never raised."""
    args = ["-reason", reason] + (["-host-uuid", host_uuid] if host_uuid else [])
    for script in scripts(root, hook):
        try:
            done = subprocess.run([str(script), *args], stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=HOOK_TIMEOUT, env={"PATH": os.environ.get("PATH", os.defpath)})
            log.info("hook ran", hook=hook, script=script.name, exit_code=done.returncode, reason=reason,
                     host=host_uuid)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("hook failed", hook=hook, script=script.name, error=str(e))
