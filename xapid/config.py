"""xapi.conf: the one table of defaults, parsing and validation.

The file is ``key = value`` lines with ``#`` comments, as xapi's own.
Relative paths resolve against the folder of the config file.  Unknown keys
are logged and ignored; a malformed line stops start-up with a message that
names the file and line.
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
    "max-request-size": ("int", 4 * 1024 * 1024, "largest request body accepted, in bytes"),
    "worker-threads": ("int", 256, "most connections served at once (each on its own thread)"),
}


@dataclass
class Config:
    values: dict[str, Any]
    source: Path | None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def default_config_path() -> Path:
    """The shipped ``etc/xapi.conf`` (packaged as ``xapid/data/etc`` in a wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "data" / "etc" / "xapi.conf", here.parent / "etc" / "xapi.conf"):
        if candidate.is_file():
            return candidate
    raise ConfigError("the shipped etc/xapi.conf was not found; pass --config")


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
    """Read ``path`` (default: the shipped file) over the defaults table and validate it."""
    path = path or default_config_path()
    base = path.resolve().parent
    values: dict[str, Any] = {}
    for key, (kind, default, _doc) in DEFAULTS.items():
        values[key] = _convert(kind, str(default), base, "default") if kind == "path" else default
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
