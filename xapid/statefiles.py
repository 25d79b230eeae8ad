"""Safe file I/O in the state dir: the trust check at start, and reads and writes that follow no symlink.

The state dir holds the root password, the user table and the database, so the daemon uses a folder
only if nobody else can change it (:func:`ensure_private_dir`): a real directory owned by the daemon's
user, not writable by group or others, reached through folders and symbolic links that only root or
that user control.  Below it, every path is walked one component at a time with ``O_NOFOLLOW``
(:func:`_open_dir`), so a symbolic link planted anywhere is refused rather than followed; new files
are created with ``O_EXCL``; a write goes to a temporary file that is fsynced, renamed over the target
and followed by an fsync of the folder (:func:`write_atomic`), so readers and crashes see the old or
the new content, never a mix.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from pathlib import Path

from xapid.config import ConfigError

# Traversal needs no read permission on the folders walked through (O_PATH where the OS has it).
_WALK = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY)
_MAX_LINKS = 40  # symbolic links followed while checking the state dir's own path (Linux's limit)


class UnsafePath(OSError, ConfigError):
    """A path in the state dir is a symbolic link, not the expected kind of file, or owned by someone else.

    An OSError where files are handled; met during start-up it is also a ConfigError (exit status 2).
    """

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class UntrustedStateDir(ConfigError):
    """The state dir (or a folder above it) can be changed by someone other than root and the daemon's user."""


def _trusted_owner(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def _walk_trusted(path: Path) -> Path:
    """The real path of ``path``, checking every folder and symbolic link met on the way.

    Each must belong to root or the daemon's user; a folder writable by group or others must have the
    sticky bit (``/tmp``), so nobody else can rename or replace what lies in it.  Missing trailing
    components are allowed (the caller creates them).  Raises :class:`UntrustedStateDir`.
    """
    pending = list(Path(os.path.abspath(path)).parts[1:])
    real = Path("/")
    links = 0
    while pending:
        name = pending.pop(0)
        if name == "..":
            real = real.parent
            continue
        if name == ".":
            continue
        here = real / name
        try:
            st = os.lstat(here)
        except FileNotFoundError:  # the rest is to be created: nothing there to follow
            return Path(os.path.normpath(Path(real, name, *pending)))
        if not _trusted_owner(st):
            raise UntrustedStateDir(f"state dir {path}: {here} belongs to uid {st.st_uid}, not to root or "
                                    f"the daemon's user (uid {os.geteuid()})")
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise UntrustedStateDir(f"state dir {path}: too many symbolic links")
            target = Path(os.readlink(here))
            pending[:0] = list(target.parts[1:] if target.is_absolute() else target.parts)
            if target.is_absolute():
                real = Path("/")
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UntrustedStateDir(f"state dir {path}: {here} is not a folder")
        last = not pending  # the state dir itself: ensure_private_dir judges it (no sticky exception)
        if not last and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise UntrustedStateDir(f"state dir {path}: {here} is writable by group or others "
                                    f"(mode {stat.S_IMODE(st.st_mode):04o})")
        real = here
    return real


def ensure_private_dir(path: Path) -> Path:
    """Create the state dir (mode 0700), or accept an existing one only if it is safe; return its real path.

    Safe: a folder owned by the daemon's (effective) user and not writable by group or others, every
    folder and symbolic link above it controlled by root or that user (:func:`_walk_trusted`).  An
    accepted folder is tightened to 0700.  Anything else raises :class:`UntrustedStateDir` before
    anything is written.
    """
    real = _walk_trusted(path)
    missing: list[Path] = []
    probe = real
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700 if folder == real else 0o755)
        except FileExistsError:  # someone raced us: judged below like any existing folder
            pass
    fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise UntrustedStateDir(f"state dir {real} belongs to uid {st.st_uid}; the daemon runs as uid "
                                    f"{os.geteuid()} and uses only a folder of its own")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UntrustedStateDir(f"state dir {real} is writable by group or others (mode "
                                    f"{stat.S_IMODE(st.st_mode):04o}); make it private (chmod 700) or use "
                                    f"another folder")
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    _walk_trusted(real)  # the folders above cannot have changed hands meanwhile without showing here
    return real


def _open_dir(path: Path, create: bool = False, mode: int = 0o700) -> int:
    """A descriptor of folder ``path`` reached from ``/`` without following any symbolic link.

    With ``create``, missing folders are made (``mode``).  Raises :class:`UnsafePath` for a symbolic
    link or a non-folder on the way, ``FileNotFoundError`` for a missing one.
    """
    fd = os.open("/", _WALK)
    try:
        for name in Path(os.path.abspath(path)).parts[1:]:
            try:
                try:
                    child = os.open(name, _WALK, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(name, mode, dir_fd=fd)
                    except FileExistsError:
                        pass
                    child = os.open(name, _WALK, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(e.errno, f"{path}: {name} is a symbolic link or not a folder") from None
                raise
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` durable (a new or renamed file in it)."""
    fd = _open_dir(path)
    try:
        _fsync_dir(fd)
    finally:
        os.close(fd)


def list_dir(path: Path) -> list[tuple[str, str]]:
    """The entries of folder ``path`` as (name, kind), kind ``dir``, ``file`` or ``other`` (links are
    ``other``, never followed); a missing folder has none."""
    try:
        fd = _open_dir(path)
    except FileNotFoundError:
        return []
    try:
        read_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)
    out = []
    try:
        with os.scandir(read_fd) as entries:
            for e in entries:
                kind = "dir" if e.is_dir(follow_symlinks=False) else "file" if e.is_file(follow_symlinks=False) \
                    else "other"
                out.append((e.name, kind))
    finally:
        os.close(read_fd)
    return sorted(out)


def _fsync_dir(dir_fd: int) -> None:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path, mode: int = 0o700) -> Path:
    """Create folder ``path`` and its missing parents without following symbolic links; return it."""
    os.close(_open_dir(path, create=True, mode=mode))
    return path


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (mode ``mode`` whatever the umask).

    The data goes to a new temporary file (``O_EXCL | O_NOFOLLOW``) in the same folder, is fsynced,
    renamed over ``path`` (a symbolic link there is replaced, never followed) and the folder is fsynced.
    Missing parent folders are created (0700).
    """
    path = Path(path)
    dir_fd = _open_dir(path.parent, create=True)
    tmp = f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                     dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        _fsync_dir(dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(dir_fd)


def read_bytes(path: Path, limit: int = 1 << 20) -> bytes | None:
    """The content of the regular file ``path`` (None if it does not exist), read without following links.

    Raises :class:`UnsafePath` if ``path`` or a folder on the way is a symbolic link, if it is not a
    regular file, if it belongs to another user or is writable by group or others, or if it holds
    more than ``limit`` bytes.
    """
    path = Path(path)
    try:
        dir_fd = _open_dir(path.parent)
    except FileNotFoundError:
        return None
    try:
        try:
            fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePath(e.errno, f"{path} is a symbolic link") from None
            raise
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(errno.EINVAL, f"{path} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafePath(errno.EPERM, f"{path} belongs to uid {st.st_uid} with mode "
                                          f"{stat.S_IMODE(st.st_mode):04o}; only a file of the daemon's "
                                          f"user that nobody else can write is trusted")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise UnsafePath(errno.EFBIG, f"{path} is larger than {limit} bytes")
    finally:
        os.close(fd)


def create_new(path: Path, mode: int = 0o600) -> int:
    """A write descriptor of a new file ``path`` (``O_EXCL | O_NOFOLLOW``; parents made as needed)."""
    path = Path(path)
    dir_fd = _open_dir(path.parent, create=True)
    try:
        return os.open(path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                       dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def remove(path: Path) -> None:
    """Remove the file ``path`` (a symbolic link itself, never its target); missing is fine."""
    path = Path(path)
    try:
        dir_fd = _open_dir(path.parent)
    except FileNotFoundError:
        return
    try:
        os.unlink(path.name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dir_fd)


def remove_tree(path: Path) -> None:
    """Remove folder ``path`` and everything in it without following symbolic links; missing is fine."""
    path = Path(path)
    try:
        dir_fd = _open_dir(path.parent)
    except FileNotFoundError:
        return
    try:
        st = os.lstat(path.name, dir_fd=dir_fd)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path.name, dir_fd=dir_fd)
        else:
            os.unlink(path.name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dir_fd)


def move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (parents of ``dst`` made as needed), following no symbolic link."""
    src_fd = _open_dir(Path(src).parent)
    try:
        dst_fd = _open_dir(Path(dst).parent, create=True)
        try:
            os.rename(Path(src).name, Path(dst).name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            _fsync_dir(dst_fd)
            _fsync_dir(src_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def check_regular_or_absent(path: Path) -> None:
    """Raise :class:`UnsafePath` unless ``path`` is missing or a regular file of the daemon's user.

    For files opened by libraries that take a path (SQLite): in a state dir nobody else can write,
    what this sees is what the library will open.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(errno.EINVAL, f"{path} is a symbolic link or not a regular file")
    if st.st_uid != os.geteuid():
        raise UnsafePath(errno.EPERM, f"{path} belongs to uid {st.st_uid}, not the daemon's user")
