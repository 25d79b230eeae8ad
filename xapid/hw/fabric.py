"""The emulated heartbeat network and storage paths: ``<state>/hw/fabric.json``.

Stacks read this file (README "Writing a cluster stack"): two hosts exchange heartbeat
packets iff their network groups are equal; a host cannot reach any file under a folder
listed for it in ``storage_blocked``.  xapid replaces the file atomically on every change.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

from xapid import statefiles

DEFAULT_GROUP = "0"


class Fabric:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.network: dict[str, str] = {}
        self.storage_blocked: dict[str, list[str]] = {}
        self._listeners: list[Callable[[dict[str, str]], None]] = []
        self._load()

    def on_change(self, listener: Callable[[dict[str, str]], None]) -> None:
        """Call ``listener(network groups)`` after every partition or heal (emulated links follow it)."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        network = dict(self.network)
        for listener in self._listeners:
            listener(network)

    def _load(self) -> None:
        try:
            data = statefiles.read_bytes(self.path)
            if data is None:
                raise FileNotFoundError(self.path)
            doc = json.loads(data)
            network = doc.get("network", {})
            blocked = doc.get("storage_blocked", {})
            self.network = {str(k): str(v) for k, v in network.items()}
            self.storage_blocked = {str(k): [str(p) for p in v] for k, v in blocked.items() if v}
        except (OSError, ValueError, AttributeError, TypeError):
            self.network, self.storage_blocked = {}, {}

    def _save(self) -> None:
        doc = {"network": self.network, "storage_blocked": self.storage_blocked}
        statefiles.write_atomic(self.path, json.dumps(doc, indent=1, sort_keys=True).encode(), mode=0o644)

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
        self._notify()

    def heal(self) -> None:
        with self._lock:
            self.network = {}
            self._save()
        self._notify()

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
