"""Users (salted scrypt hashes in ``<state-dir>/users.json``) and sessions.

Sessions are ``session`` objects in the store's memory-only table, as in
xapi: a restart invalidates every session ref.  Logging never shows a
password, and a session ref only in its shortened form (:func:`short_ref`).

Failed logins cost bounded work: every scrypt computation runs on a pool of
:data:`HASH_WORKERS` threads (so at most that many 16 MiB scrypt work areas
exist, however many logins arrive at once), an unknown user costs exactly
one hash like a known one (against a dummy record made at start), and the
failure counters that lengthen the delay live in a table of at most
:data:`MAX_FAILURE_COUNTERS` entries keyed by a digest of the user name.

Sessions made by ``session.login_with_password`` live in the master's memory (xapi's session
table is never persisted nor replicated): every master transition and every restart of the
master's xapi ends them all (:meth:`Sessions.drop_all`).  Local sessions
(``session.slave_local_login_with_password``) live in one host's xapi only, are valid only on
that host's own address, and end when that host's xapi does (:meth:`Sessions.drop_local`).  A
session of the master used on a slave's address is ``HOST_IS_SLAVE [master address]``
(session_check.ml).

Sessions are capped as in xapi's ``Db_gc_util.timeout_sessions``: at most
``session-limit`` per originator (root and nameless logins) or per user name,
the least recently used idle ones destroyed first; idle sessions are
destroyed by the daemon's periodic collection (:meth:`Sessions.expire_idle`),
not only when next used.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
import uuid as uuidlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from xapid import statefiles
from xapid.errors import ApiError
from xapid.schema import NULL_REF
from xapid.timeutil import now_iso

if TYPE_CHECKING:
    from collections.abc import Callable

    from xapid.dispatch import Method
    from xapid.store import Store

log = structlog.get_logger("xapid.auth")

ROLES = ("pool-admin", "pool-operator", "vm-power-admin", "vm-admin", "vm-operator", "read-only")
SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # 16 MiB of work area per computation
HASH_WORKERS = 2
MAX_FAILURE_COUNTERS = 4096
MAX_USERS_FILE = 4 << 20  # bytes

_hasher = ThreadPoolExecutor(max_workers=HASH_WORKERS, thread_name_prefix="scrypt")


def short_ref(ref: object) -> str:
    """A session ref safe for logs: the prefix and the first uuid group only."""
    text = str(ref)
    return text[: len("OpaqueRef:") + 8] + "..." if text.startswith("OpaqueRef:") else "<redacted>"


def _scrypt(password: str, salt: bytes) -> bytes:
    """One scrypt computation, run on the fixed hashing pool (the caller waits for it)."""
    return _hasher.submit(hashlib.scrypt, password.encode("utf-8"), salt=salt, dklen=32,
                          **SCRYPT).result()


def hash_password(password: str, salt: bytes | None = None) -> dict[str, str]:
    salt = salt or secrets.token_bytes(16)
    return {"scheme": "scrypt", "salt": salt.hex(), "hash": _scrypt(password, salt).hex()}


def verify_password(password: str, stored: dict[str, str]) -> bool:
    """Whether ``password`` matches ``stored``: one scrypt computation whatever the record holds."""
    try:
        salt = bytes.fromhex(stored.get("salt", ""))
        ok = stored.get("scheme") == "scrypt" and len(salt) >= 8
    except (ValueError, AttributeError):
        salt, ok = b"", False
    digest = _scrypt(password, salt if ok else b"\0" * 16).hex()
    return ok and hmac.compare_digest(digest, str(stored.get("hash", "")))


@dataclass
class User:
    name: str
    role: str
    password: dict[str, str]


class Users:
    """The user table, persisted atomically with owner-only permissions.

    ``xapid passwd`` edits the file under a running daemon, so :meth:`check` re-reads it when it
    changed, through :func:`xapid.statefiles.read_bytes` (no symbolic link, the daemon's user's own
    file, nobody else can write it).  A file that fails those checks at start stops start-up; while
    running it is ignored (the table read last stays) and logged.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.users: dict[str, User] = {}
        self._seen: tuple[int, int, int] | None = None
        self._dummy: dict[str, str] | None = None
        self._reload(strict=True)

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload(self, strict: bool = False) -> None:
        """Re-read the file if it changed since last seen."""
        sig = self._signature()
        if sig == self._seen:
            return
        try:
            data = statefiles.read_bytes(self.path, MAX_USERS_FILE)
            users: dict[str, User] = {}
            if data is not None:
                doc = json.loads(data)
                for name, u in doc.get("users", {}).items():
                    if u["role"] not in ROLES:
                        raise ValueError(f"user {name!r} has unknown role {u['role']!r}")
                    users[name] = User(name, u["role"], dict(u["password"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            if strict:
                raise statefiles.UntrustedStateDir(f"cannot use the user table {self.path}: {e}") from None
            log.error("user table not reloaded; the previous one stays", path=str(self.path), error=str(e))
            self._seen = sig
            return
        self.users, self._seen = users, sig

    def _save(self) -> None:
        doc = {"users": {u.name: {"role": u.role, "password": u.password} for u in self.users.values()}}
        statefiles.write_atomic(self.path, json.dumps(doc).encode(), mode=0o600)
        self._seen = self._signature()

    def set_password(self, name: str, password: str, role: str | None = None) -> None:
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        record = hash_password(password)
        with self.lock:
            self._reload()
            old = self.users.get(name)
            role = role or (old.role if old else ("pool-admin" if name == "root" else "read-only"))
            self.users[name] = User(name, role, record)
            self._save()

    def check(self, name: str, password: str) -> User | None:
        """The user if ``password`` is right; None otherwise, after the same single hash either way."""
        with self.lock:
            self._reload()
            u = self.users.get(name)
            if self._dummy is None:
                self._dummy = {"scheme": "scrypt", "salt": secrets.token_bytes(16).hex(), "hash": ""}
            dummy = self._dummy
        # An unknown name is verified against a dummy record: one hash, so timing does not tell names apart.
        ok = verify_password(password, u.password if u is not None else dummy)
        return u if ok and u is not None else None


class FailureCounters:
    """Consecutive failed logins per user name, in a bounded table (least recently failed evicted).

    Names are kept only as a 16-byte digest: a client sending megabyte-long names holds no memory.
    """

    def __init__(self, limit: int = MAX_FAILURE_COUNTERS) -> None:
        self.limit = limit
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(name: str) -> bytes:
        return hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def failed(self, name: str) -> int:
        """Count one more failure for ``name``; return the count."""
        key = self._key(name)
        with self._lock:
            count = self._counts.pop(key, 0) + 1
            self._counts[key] = count
            while len(self._counts) > self.limit:
                self._counts.popitem(last=False)
            return count

    def reset(self, name: str) -> None:
        with self._lock:
            self._counts.pop(self._key(name), None)

    def __len__(self) -> int:
        return len(self._counts)


class Sessions:
    """Login, validation, RBAC, limits and expiry of sessions."""

    def __init__(self, store: Store, users: Users, idle_timeout: float, failure_delay: float,
                 master: Callable[[], str], limit: int = 500, tasks_pending: Callable[[str], bool] | None = None,
                 master_address: Callable[[str], str] | None = None) -> None:
        self.store = store
        self.master_address = master_address or (lambda host: "")
        self._local: dict[str, tuple[str, str]] = {}  # local session ref -> (holding host, user name)
        self.users = users
        self.idle_timeout = idle_timeout
        self.failure_delay = failure_delay
        self.master = master
        self.limit = limit
        # Whether a session still has pending tasks (those are not destroyed to make room; xapi's rule).
        self.tasks_pending = tasks_pending or (lambda ref: False)
        self._last_seen: dict[str, float] = {}
        self._roles: dict[str, str] = {}
        self._groups: dict[tuple[str, str], set[str]] = {}
        self._group_of: dict[str, tuple[str, str]] = {}
        self.failures = FailureCounters()
        self._lock = threading.Lock()

    @staticmethod
    def group(name: str, originator: str) -> tuple[str, str]:
        """xapi's session group: root and nameless logins by originator, everyone else by user name."""
        return ("originator", originator) if name in ("", "root") else ("user", name)

    def _authenticate(self, uname: str, pwd: str, local: bool) -> User:
        """The user, or ``SESSION_AUTHENTICATION_FAILED`` after the failure delay."""
        user = User(uname, "pool-admin", {}) if local else self.users.check(uname, pwd)
        if user is None:
            count = self.failures.failed(uname)
            # xapi waits 5 s before refusing; repeated failures wait longer (capped).
            time.sleep(min(self.failure_delay * min(count, 4), 30.0))
            raise ApiError("SESSION_AUTHENTICATION_FAILED", uname, "Authentication failure")
        self.failures.reset(uname)
        return user

    def local_login(self, uname: str, pwd: str, host: str, local: bool = False) -> str:
        """A session held by ``host``'s xapi alone (xapi_local_session.ml): not in the pool database,
        valid only on ``host``'s own address (or the Unix socket, if ``host`` is the master)."""
        user = self._authenticate(uname, pwd, local)
        ref = "OpaqueRef:" + str(uuidlib.uuid4())
        with self._lock:
            self._local[ref] = (host, user.name)
            self._last_seen[ref] = time.monotonic()
            self._roles[ref] = user.role
        log.info("local session created", host=host, user=user.name, session=short_ref(ref))
        return ref

    def alive(self, ref: str) -> bool:
        """Whether ``ref`` is a session that has not ended (of the pool database or local)."""
        return ref in self._local or self.store.exists("session", ref)

    def local_host(self, ref: object) -> str | None:
        """The host holding local session ``ref`` (None: not a local session)."""
        entry = self._local.get(ref) if isinstance(ref, str) else None
        return entry[0] if entry is not None else None

    def drop_local(self, host: str) -> int:
        """``host``'s xapi stopped: its local sessions end; how many."""
        with self._lock:
            refs = [r for r, (h, _user) in self._local.items() if h == host]
        for ref in refs:
            self.logout(ref)
        return len(refs)

    def drop_all(self) -> int:
        """The master's xapi restarted (a transition, a crash): every pool-database session ends."""
        refs = self.store.refs("session")
        for ref in refs:
            self.logout(ref)
        if refs:
            log.warning("sessions ended: the master's xapi restarted", count=len(refs))
        return len(refs)

    def login(self, uname: str, pwd: str, originator: str, local: bool = False) -> str:
        """Create a session; on the local socket any credentials are accepted as root (wire.md 1.3)."""
        user = self._authenticate(uname, pwd, local)
        stamp = now_iso()
        with self.store.transaction() as tx:
            ref = tx.create("session", {
                "this_host": self.master(), "this_user": NULL_REF, "last_active": stamp, "pool": False,
                "is_local_superuser": local or user.name == "root", "validation_time": stamp,
                "auth_user_name": user.name, "originator": originator,
            })
        key = self.group(user.name, originator)
        with self._lock:
            self._last_seen[ref] = time.monotonic()
            self._roles[ref] = user.role
            members = self._groups.setdefault(key, set())
            members.add(ref)
            self._group_of[ref] = key
            excess = len(members) - self.limit
            victims: list[str] = []
            if excess > 0:
                idle = sorted((r for r in members if r != ref), key=lambda r: self._last_seen.get(r, 0.0))
                victims = [r for r in idle if not self.tasks_pending(r)][:excess]
        for victim in victims:
            log.info("session destroyed: too many in its group", group=key[0], session=short_ref(victim))
            self.logout(victim)
        return ref

    def check(self, ref: object, endpoint: str | None = None) -> None:
        """Raise ``SESSION_INVALID [ref]`` unless ``ref`` is a live session valid where the call
        arrived; refresh its idle timer.

        ``endpoint`` is the host whose own address received the call (None: the master's).  A
        local session is valid only on its own host; a pool-database session on a slave's address
        is ``HOST_IS_SLAVE [master address]`` (session_check.ml).
        """
        holder = self.local_host(ref)
        if holder is not None:
            if holder != (endpoint if endpoint is not None else self.master()):
                raise ApiError("SESSION_INVALID", str(ref))
        elif not isinstance(ref, str) or not self.store.exists("session", ref):
            raise ApiError("SESSION_INVALID", ref if isinstance(ref, str) else str(ref))
        elif endpoint is not None and endpoint != self.master():
            raise ApiError("HOST_IS_SLAVE", self.master_address(endpoint))
        assert isinstance(ref, str)
        now = time.monotonic()
        # Single dict operations are atomic: no lock on this per-call path.
        expired = now - self._last_seen.get(ref, 0.0) > self.idle_timeout
        if not expired:
            self._last_seen[ref] = now
        if expired:
            self.logout(ref)
            raise ApiError("SESSION_INVALID", ref)

    def expire_idle(self, now: float | None = None) -> int:
        """Destroy every session unused for longer than the idle timeout; return how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [ref for ref, seen in self._last_seen.items() if now - seen > self.idle_timeout]
        for ref in idle:
            self.logout(ref)
        if idle:
            log.info("idle sessions expired", count=len(idle))
        return len(idle)

    def count(self) -> int:
        return len(self._last_seen)

    def role(self, ref: str) -> str:
        return self._roles.get(ref, "read-only")

    def user(self, ref: str | None) -> str:
        local = self._local.get(ref) if ref else None
        if local is not None:
            return local[1]
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
        if self._local.pop(ref, None) is None:
            with self.store.transaction() as tx:
                if tx.find("session", ref) is not None:
                    tx.delete("session", ref)
        with self._lock:
            self._last_seen.pop(ref, None)
            self._roles.pop(ref, None)
            key = self._group_of.pop(ref, None)
            if key is not None:
                members = self._groups.get(key)
                if members is not None:
                    members.discard(ref)
                    if not members:
                        del self._groups[key]

