"""Each emulated host's local database (ha.md 5.6) and its folder under the state dir.

Real xapi keeps ``ha.armed``, ``ha_cluster_stack``, ``ha_peers`` and
``ha_base_t`` in a host-local store that survives restarts; xapid keeps one
small JSON file per host in ``<state-dir>/hosts/<host-uuid>/`` beside that
host's ``xhad.conf``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


class LocalDb:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "hosts"
        self._lock = threading.Lock()

    def host_dir(self, host_uuid: str) -> Path:
        return self.root / host_uuid

    def conf_path(self, host_uuid: str) -> Path:
        return self.host_dir(host_uuid) / "xhad.conf"

    def _path(self, host_uuid: str) -> Path:
        return self.host_dir(host_uuid) / "local.json"

    def read(self, host_uuid: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self._path(host_uuid).read_text()))
        except (OSError, ValueError):
            return {}

    def get(self, host_uuid: str, key: str, default: Any = None) -> Any:
        return self.read(host_uuid).get(key, default)

    def set(self, host_uuid: str, **values: Any) -> None:
        """Update keys durably (write to a temp file, fsync, rename)."""
        with self._lock:
            doc = self.read(host_uuid)
            doc.update(values)
            path = self._path(host_uuid)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
