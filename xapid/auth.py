"""Users (salted scrypt hashes in ``<state-dir>/users.json``) and sessions.

Sessions are ``session`` objects in the store's memory-only table, as in
xapi: a restart invalidates every session ref.  Logging never shows a
password, and a session ref only in its shortened form (:func:`short_ref`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from xapid.errors import ApiError
from xapid.schema import NULL_REF
from xapid.timeutil import now_iso

if TYPE_CHECKING:
    from xapid.dispatch import Method
    from xapid.store import Store

ROLES = ("pool-admin", "pool-operator", "vm-power-admin", "vm-admin", "vm-operator", "read-only")
SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def short_ref(ref: object) -> str:
    """A session ref safe for logs: the prefix and the first uuid group only."""
    text = str(ref)
    return text[: len("OpaqueRef:") + 8] + "..." if text.startswith("OpaqueRef:") else "<redacted>"


def hash_password(password: str, salt: bytes | None = None) -> dict[str, str]:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=32, **SCRYPT)
    return {"scheme": "scrypt", "salt": salt.hex(), "hash": digest.hex()}


def verify_password(password: str, stored: dict[str, str]) -> bool:
    if stored.get("scheme") != "scrypt":
        return False
    digest = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(stored["salt"]), dklen=32, **SCRYPT)
    return hmac.compare_digest(digest.hex(), stored["hash"])


@dataclass
class User:
    name: str
    role: str
    password: dict[str, str]


class Users:
    """The user table, persisted atomically with owner-only permissions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.users: dict[str, User] = {}
        self._seen: tuple[int, int, int] | None = None
        self._reload()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload(self) -> None:
        """Re-read the file if it changed since last seen (``xapid passwd`` edits it under a running daemon)."""
        sig = self._signature()
        if sig == self._seen:
            return
        users: dict[str, User] = {}
        if sig is not None:
            doc = json.loads(self.path.read_text())
            for name, u in doc.get("users", {}).items():
                users[name] = User(name, u["role"], u["password"])
        self.users, self._seen = users, sig

    def _save(self) -> None:
        doc = {"users": {u.name: {"role": u.role, "password": u.password} for u in self.users.values()}}
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._seen = self._signature()

    def set_password(self, name: str, password: str, role: str | None = None) -> None:
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        with self.lock:
            self._reload()
            old = self.users.get(name)
            role = role or (old.role if old else ("pool-admin" if name == "root" else "read-only"))
            self.users[name] = User(name, role, hash_password(password))
            self._save()

    def check(self, name: str, password: str) -> User | None:
        with self.lock:
            self._reload()
            u = self.users.get(name)
        if u is None:
            # Spend the same time as a real check so user names cannot be probed by timing.
            verify_password(password, hash_password("x", b"0" * 16))
            return None
        return u if verify_password(password, u.password) else None


class Sessions:
    """Login, validation, RBAC and expiry of sessions."""

    def __init__(self, store: Store, users: Users, idle_timeout: float, failure_delay: float,
                 master: callable) -> None:  # type: ignore[valid-type]
        self.store = store
        self.users = users
        self.idle_timeout = idle_timeout
        self.failure_delay = failure_delay
        self.master = master
        self._last_seen: dict[str, float] = {}
        self._roles: dict[str, str] = {}
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()

    def login(self, uname: str, pwd: str, originator: str, local: bool = False) -> str:
        """Create a session; on the local socket any credentials are accepted as root (wire.md 1.3)."""
        user = User(uname, "pool-admin", {}) if local else self.users.check(uname, pwd)
        if user is None:
            with self._lock:
                count = self._failures.get(uname, 0) + 1
                self._failures[uname] = count
            # xapi waits 5 s before refusing; repeated failures wait longer (capped).
            time.sleep(min(self.failure_delay * min(count, 4), 30.0))
            raise ApiError("SESSION_AUTHENTICATION_FAILED", uname, "Authentication failure")
        with self._lock:
            self._failures.pop(uname, None)
        stamp = now_iso()
        with self.store.transaction() as tx:
            ref = tx.create("session", {
                "this_host": self.master(), "this_user": NULL_REF, "last_active": stamp, "pool": False,
                "is_local_superuser": local or user.name == "root", "validation_time": stamp,
                "auth_user_name": user.name, "originator": originator,
            })
        with self._lock:
            self._last_seen[ref] = time.monotonic()
            self._roles[ref] = user.role
        return ref

    def check(self, ref: object) -> None:
        """Raise ``SESSION_INVALID [ref]`` unless ``ref`` is a live session; refresh its idle timer."""
        if not isinstance(ref, str) or not self.store.exists("session", ref):
            raise ApiError("SESSION_INVALID", ref if isinstance(ref, str) else str(ref))
        now = time.monotonic()
        # Single dict operations are atomic: no lock on this per-call path.
        expired = now - self._last_seen.get(ref, 0.0) > self.idle_timeout
        if not expired:
            self._last_seen[ref] = now
        if expired:
            self.logout(ref)
            raise ApiError("SESSION_INVALID", ref)

    def role(self, ref: str) -> str:
        return self._roles.get(ref, "read-only")

    def user(self, ref: str | None) -> str:
        rec = self.store.get("session", ref) if ref else None
        return rec["auth_user_name"] if rec else ""

    def authorise(self, ref: str, method: Method) -> None:
        role = self.role(ref)
        if role == "pool-admin" or role in method.roles:
            return
        allowed = ", ".join(r for r in method.roles if r in ROLES) or "none"
        raise ApiError(
            "RBAC_PERMISSION_DENIED", method.name.lower(),
            f"No permission in user session. (Roles with this permission: {allowed})",
        )

    def logout(self, ref: str) -> None:
        with self.store.transaction() as tx:
            if tx.find("session", ref) is not None:
                tx.delete("session", ref)
        with self._lock:
            self._last_seen.pop(ref, None)
            self._roles.pop(ref, None)
