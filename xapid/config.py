"""xapi.conf: the one table of defaults, parsing and validation.

The file is ``key = value`` lines with ``#`` comments, as xapi's own.
A relative path written in a file resolves against that file's folder; the
defaults of path keys resolve against the shipped data (``etc/`` of the
checkout, ``xapid/data/etc`` of a wheel), so they mean the same whichever file
is given.  Unknown keys are logged and ignored; a malformed line stops start-up
with a message that names the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("xapid.config")


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


# key -> (kind, default, description).  Kinds: str, path, int, float.
DEFAULTS: dict[str, tuple[str, Any, str]] = {
    "cluster-stack-root": ("path", "../scripts/cluster-stack",
                           "folder with one sub-folder per cluster stack (xapi: /usr/libexec/xapi/cluster-stack)"),
    "cluster-stack-default": ("str", "xhad", "stack used when no attached SR demands one"),
    "metrics-seed": ("int", 0, "seed of the emulated performance statistics (xapid/hw/metrics.py)"),
    "sm-dir": ("path", "sm.d", "folder of storage driver descriptors (one JSON file per driver)"),
    "ha-monitor-interval": ("float", 20.0, "seconds between liveset queries while HA is enabled"),
    "ha-script-timeout": ("float", 60.0, "seconds a cluster-stack script may run"),
    "ha-start-daemon-timeout": ("float", 180.0, "seconds ha_start_daemon may run"),
    "ha-disable-retries": ("int", 3, "attempts of the HA disable procedure before giving up (xapi: forever)"),
    "ha-disable-retry-delay": ("float", 1.0, "seconds between HA disable attempts (xapi: 30)"),
    "ha-boot-retry-delay": ("float", 10.0,
                            "seconds an armed host waits before retrying ha_start_daemon at start-up (xapi: 10)"),
    "ha_default_timeout_base": ("int", 60, "HA base timeout T when neither pool field gives one"),
    "ha_xapi_healthcheck_interval": ("int", 60, "xhad.conf XapiHealthCheckInterval"),
    "ha_xapi_healthcheck_timeout": ("int", 120, "xhad.conf XapiHealthCheckTimeout"),
    "ha_xapi_restart_attempts": ("int", 1, "xhad.conf XapiRestartAttempts"),
    "ha_xapi_restart_timeout": ("int", 300, "xhad.conf XapiRestartTimeout"),
    "fence-reboot-delay": ("float", 5.0, "seconds a fenced host stays down before it boots again (0 = stays off)"),
    "host-assumed-dead-interval": ("float", 600.0,
                                   "without HA: seconds after a host stops before it is marked not live (xapi: 600)"),
    "session-idle-timeout": ("float", 86400.0, "seconds an unused session stays valid (xapi: 24 h)"),
    "login-failure-delay": ("float", 5.0, "seconds a failed login waits before answering (xapi: 5)"),
    # Garbage collection (xapi: Db_gc every 30 s; Xapi_globs max_tasks, message_limit, max_sessions_per_*).
    "gc-interval": ("float", 30.0, "seconds between garbage-collection passes (xapi: 30)"),
    "task-limit-per-user": ("int", 200, "finished tasks kept per user; the oldest are destroyed (xapi: 200)"),
    "completed_task_timeout": ("float", 3900.0, "seconds a finished task is kept (xapi: 65 min)"),
    "pending_task_timeout": ("float", 86400.0, "seconds before a pending task that makes no progress is "
                                                 "destroyed (xapi: 24 h)"),
    "message_limit": ("int", 10000, "messages kept; the oldest are destroyed (xapi: 10,000)"),
    "session-limit": ("int", 500, "sessions kept per originator (root) or per user name; the least recently "
                                  "used idle ones are destroyed (xapi: 500)"),
    # The connection side (xapid/server.py).  xapi: Constants.http_limit_max_rpc_size = 300 KiB
    # (ocaml/xapi-consts/constants.ml), conn_limit_tcp = 800, header_total_timeout_tcp = 60 s.
    "max-request-size": ("int", 300 * 1024, "largest RPC request body accepted, in bytes (xapi: 300 KiB)"),
    "max-upload-size": ("int", 1024**5, "largest body of PUT /import and /import_raw_vdi, in bytes (1 PiB: what "
                                         "Xen Orchestra announces for a stream of unknown length)"),
    "max-header-size": ("int", 8192, "largest request line plus headers, in bytes"),
    "max-connections": ("int", 512, "most open connections per listener"),
    "max-connections-per-ip": ("int", 128, "most open connections from one client address"),
    "header-timeout": ("float", 10.0, "seconds from a request's first byte to the end of its headers"),
    "body-timeout": ("float", 30.0, "seconds to receive a request body (and to send an answer)"),
    "keepalive-timeout": ("float", 60.0, "seconds an idle connection is kept between requests"),
    "worker-threads": ("int", 64, "most ordinary calls running at once"),
    "login-threads": ("int", 64, "most logins running at once (a failed one waits login-failure-delay)"),
    "max-waiting-calls": ("int", 256, "most event.from/event.next calls parked at once"),
    "max-waiting-calls-per-user": ("int", 64, "most parked event.from/event.next calls of one user"),
    "shutdown-timeout": ("float", 5.0, "seconds a stop waits for calls in progress"),
    "inline-reads": ("int", 1, "1: idle keep-alive connections wait in one event loop, which answers the "
                               "plain reads and field writes itself; 0: a thread per connection"),
    "record-cache-size": ("int", 128, "MiB of encoded records kept for get_record/get_all_records (0: none)"),
    "nbd-port": ("int", 10809, "port of every host's NBD service (xapi-nbd: 10809; 0: a free port)"),
    "guest-agent-delay": ("float", 5.0,
                          "seconds after a start or resume before a guest's agent reports VM_guest_metrics"),
}


# Keys whose value has a floor (a zero collection interval would spin; a limit below it keeps nothing).
MINIMUM: dict[str, float] = {
    "gc-interval": 0.01, "task-limit-per-user": 0, "record-cache-size": 0, "nbd-port": 0, "message_limit": 0,
    "session-limit": 1,
    "completed_task_timeout": 0, "pending_task_timeout": 0,
}


@dataclass
class Config:
    values: dict[str, Any]
    source: Path | None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def shipped_etc() -> Path | None:
    """The shipped ``etc/`` folder (``xapid/data/etc`` in a wheel), or None if this install has none."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "data" / "etc", here.parent / "etc"):
        if (candidate / "xapi.conf").is_file():
            return candidate
    return None


def default_config_path() -> Path:
    """The shipped ``etc/xapi.conf`` (packaged as ``xapid/data/etc`` in a wheel)."""
    etc = shipped_etc()
    if etc is None:
        raise ConfigError("the shipped etc/xapi.conf was not found; pass --config")
    return etc / "xapi.conf"


def _convert(kind: str, raw: str, base: Path, where: str) -> Any:
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {raw!r}") from None
    if kind == "path":
        p = Path(raw).expanduser()
        return (base / p).resolve() if not p.is_absolute() else p
    return raw


def load(path: Path | None = None, overrides: dict[str, str] | None = None) -> Config:
    """Read ``path`` (default: the shipped file) over the defaults table and validate it.

    Path values written in the file resolve against its folder; path defaults against the shipped
    ``etc/`` (whatever file is given); overrides against the working directory.
    """
    path = path or default_config_path()
    base = path.resolve().parent
    shipped = shipped_etc()
    values: dict[str, Any] = {}
    for key, (kind, default, _doc) in DEFAULTS.items():
        if kind == "path":
            # Without shipped data (a bare install) a path default stays relative; validate_runtime names it.
            values[key] = _convert(kind, str(default), shipped, "default") if shipped else Path(default)
        else:
            values[key] = default
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{path}:{number}"
        if "=" not in text:
            raise ConfigError(f"{where}: malformed line (expected 'key = value'): {line.strip()!r}")
        key, raw = (part.strip() for part in text.split("=", 1))
        if not key:
            raise ConfigError(f"{where}: malformed line (empty key): {line.strip()!r}")
        if key not in DEFAULTS:
            log.warning("unknown config key ignored", key=key, where=where)
            continue
        values[key] = _convert(DEFAULTS[key][0], raw, base, where)
    for key, raw in (overrides or {}).items():
        values[key] = _convert(DEFAULTS[key][0], raw, Path.cwd(), f"override {key}")
    for key, minimum in MINIMUM.items():
        if values[key] < minimum:
            raise ConfigError(f"{path}: {key} must be at least {minimum}, got {values[key]}")
    return Config(values, path)


def validate_runtime(config: Config) -> None:
    """Checks that need the filesystem: the cluster-stack root must exist and be readable."""
    root = Path(config["cluster-stack-root"])
    if not root.is_dir():
        raise ConfigError(f"cluster-stack-root {root} does not exist or is not a directory")
    try:
        list(root.iterdir())
    except OSError as e:
        raise ConfigError(f"cluster-stack-root {root} cannot be read: {e.strerror}") from None
    sm_dir = Path(config["sm-dir"])
    if not sm_dir.is_dir():
        raise ConfigError(f"sm-dir {sm_dir} does not exist or is not a directory")
