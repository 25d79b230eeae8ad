"""The emulated heartbeat network and storage paths: ``<state>/hw/fabric.json``.

Stacks read this file (README "Writing a cluster stack"): two hosts exchange heartbeat
packets iff their network groups are equal; a host cannot reach any file under a folder
listed for it in ``storage_blocked``.  xapid replaces the file atomically on every change.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

DEFAULT_GROUP = "0"


class Fabric:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.network: dict[str, str] = {}
        self.storage_blocked: dict[str, list[str]] = {}
        self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            network = doc.get("network", {})
            blocked = doc.get("storage_blocked", {})
            self.network = {str(k): str(v) for k, v in network.items()}
            self.storage_blocked = {str(k): [str(p) for p in v] for k, v in blocked.items() if v}
        except (OSError, ValueError, AttributeError, TypeError):
            self.network, self.storage_blocked = {}, {}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        doc = {"network": self.network, "storage_blocked": self.storage_blocked}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def group(self, uuid: str) -> str:
        with self._lock:
            return self.network.get(uuid, DEFAULT_GROUP)

    def blocked(self, uuid: str) -> list[str]:
        with self._lock:
            return list(self.storage_blocked.get(uuid, []))

    def partition(self, groups: list[list[str]], everyone: list[str]) -> None:
        """Split the network into ``groups`` (hosts named in none form one more group together)."""
        with self._lock:
            network = {}
            for index, group in enumerate(groups, start=1):
                for uuid in group:
                    network[uuid] = str(index)
            for uuid in everyone:
                network.setdefault(uuid, DEFAULT_GROUP)
            self.network = network
            self._save()

    def heal(self) -> None:
        with self._lock:
            self.network = {}
            self._save()

    def block_storage(self, uuids: list[str], folders: list[str]) -> None:
        with self._lock:
            for uuid in uuids:
                current = self.storage_blocked.setdefault(uuid, [])
                current.extend(f for f in folders if f not in current)
            self._save()

    def restore_storage(self, uuids: list[str], folders: list[str] | None = None) -> None:
        """Give ``uuids`` their storage back (only ``folders``, when given)."""
        with self._lock:
            for uuid in uuids:
                left = [f for f in self.storage_blocked.get(uuid, []) if folders is not None and f not in folders]
                if left:
                    self.storage_blocked[uuid] = left
                else:
                    self.storage_blocked.pop(uuid, None)
            self._save()
