"""Each emulated host's local database (ha.md 5.6) and its folder under the state dir.

Real xapi keeps ``ha.armed``, ``ha_cluster_stack``, ``ha_peers`` and
``ha_base_t`` in a host-local store that survives restarts; xapid keeps one
small JSON file per host in ``<state-dir>/hosts/<host-uuid>/`` beside that
host's ``xhad.conf``.  Only xapid writes it: each file is read once (through
:func:`xapid.statefiles.read_bytes`, which follows no symbolic link and trusts
only the daemon's own files) and then served from memory; every update is
written through atomically (:func:`xapid.statefiles.write_atomic`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import structlog

from xapid import statefiles

log = structlog.get_logger("xapid.ha.localdb")

MAX_BYTES = 1 << 20


class LocalDb:
    """Thread-safe; writes of different hosts run in parallel (a 64-host enable writes each host's file)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "hosts"
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._cache: dict[str, dict[str, Any]] = {}

    def _lock(self, host_uuid: str) -> threading.Lock:
        """The lock serialising the reads and writes of ``host_uuid``'s file."""
        with self._guard:
            return self._locks.setdefault(host_uuid, threading.Lock())

    def host_dir(self, host_uuid: str) -> Path:
        return self.root / host_uuid

    def conf_path(self, host_uuid: str) -> Path:
        return self.host_dir(host_uuid) / "xhad.conf"

    def _path(self, host_uuid: str) -> Path:
        return self.host_dir(host_uuid) / "local.json"

    def _load(self, host_uuid: str) -> dict[str, Any]:
        """The host's table, read from its file the first time (unreadable or untrusted: empty, logged)."""
        doc = self._cache.get(host_uuid)
        if doc is None:
            try:
                data = statefiles.read_bytes(self._path(host_uuid), MAX_BYTES)
                doc = dict(json.loads(data)) if data is not None else {}
            except (OSError, ValueError, TypeError) as e:
                log.error("host-local database unusable; starting it empty", host=host_uuid, error=str(e))
                doc = {}
            self._cache[host_uuid] = doc
        return doc

    def read(self, host_uuid: str) -> dict[str, Any]:
        with self._lock(host_uuid):
            return dict(self._load(host_uuid))

    def get(self, host_uuid: str, key: str, default: Any = None) -> Any:
        with self._lock(host_uuid):
            return self._load(host_uuid).get(key, default)

    def set(self, host_uuid: str, **values: Any) -> None:
        """Update keys durably (write to a temp file, fsync, rename, fsync the folder)."""
        with self._lock(host_uuid):
            doc = dict(self._load(host_uuid))
            doc.update(values)
            statefiles.write_atomic(self._path(host_uuid), json.dumps(doc).encode(), mode=0o600)
            self._cache[host_uuid] = doc
