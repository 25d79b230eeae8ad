"""xapi's external hooks (``/etc/xapi.d/<hook>/``): here ``<state-dir>/hooks/<hook>/``.

Every executable regular file in the hook's folder runs, in name order, with xapi's arguments
(``xapi_hooks.ml``): ``-hostuuid <uuid> -reason <reason>`` for host hooks, ``-reason none`` for
pool hooks.  Exit status 0 is success and 1 means "logged, carry on"; any other status (or a
script that cannot run or outlives its timeout) fails the hook with ``XAPI_HOOK_FAILED``, which
an API call such as ``host.declare_dead`` passes to its caller.  Where xapi itself ignores a
failing hook (the HA restart thread), :func:`run` logs it and carries on.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import structlog

from xapid.errors import ApiError

log = structlog.get_logger("xapid.ha.hooks")

HOST_PRE_DECLARE_DEAD = "host-pre-declare-dead"
HOST_POST_DECLARE_DEAD = "host-post-declare-dead"
POOL_PRE_HA_VM_RESTART = "pool-pre-ha-vm-restart"
POOL_HA_OVERCOMMITTED = "pool-ha-overcommitted"
POOL_EJECT = "pool-eject"
REASON_FENCED = "fenced"
REASON_USER = "user"  # host.declare_dead
REASON_DBDESTROY = "dbdestroy"  # host.destroy
REASON_NONE = "none"  # every pool hook
HOOK_TIMEOUT = 30.0
EXIT_LOG_AND_CONTINUE = 1


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


def run_checked(root: Path, hook: str, reason: str, host_uuid: str | None = None) -> None:
    """Run every script of ``hook``; the first that fails raises ``XAPI_HOOK_FAILED`` (the rest do not run)."""
    args = (["-hostuuid", host_uuid] if host_uuid else []) + ["-reason", reason]
    for script in scripts(root, hook):
        try:
            done = subprocess.run([str(script), *args], stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=HOOK_TIMEOUT, env={"PATH": os.environ.get("PATH", os.defpath)})
        except subprocess.TimeoutExpired as e:
            log.warning("hook timed out", hook=hook, script=script.name, seconds=HOOK_TIMEOUT)
            raise ApiError("XAPI_HOOK_FAILED", f"{hook}/{script.name}", reason, _text(e.stdout), "timeout") from None
        except OSError as e:
            log.warning("hook cannot run", hook=hook, script=script.name, error=str(e))
            raise ApiError("XAPI_HOOK_FAILED", f"{hook}/{script.name}", reason, str(e), "-1") from None
        log.info("hook ran", hook=hook, script=script.name, exit_code=done.returncode, reason=reason, host=host_uuid)
        if done.returncode not in (0, EXIT_LOG_AND_CONTINUE):
            raise ApiError("XAPI_HOOK_FAILED", f"{hook}/{script.name}", reason, _text(done.stdout),
                           str(done.returncode))


def run(root: Path, hook: str, reason: str, host_uuid: str | None = None) -> None:
    """As :func:`run_checked`, but a failure is logged, never raised."""
    try:
        run_checked(root, hook, reason, host_uuid)
    except ApiError as e:
        log.warning("hook failed; carrying on", hook=hook, error=e.code, params=e.params)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")
