"""Atomic outputs that concurrent writers cannot damage: the one implementation behind every stage output.

A writer builds its output in a hidden sibling whose name is unique to it,
``.<name>.tmp-<pid>-<token>-<host>``, and then renames it over the destination; the rename is the commit
point. The commit runs under an exclusive lock on ``.<name>.tmp-lock``, so two writers of one destination
commit one after the other: the later one waits for the lock (a rename and a directory swap, a moment)
and then replaces the earlier one's output with its own complete one. Nobody deletes a temporary that a
live process owns: a stale temporary is removed only when the pid in its name is gone from this host.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"
LOCK_SUFFIX = TMP_MARK + "lock"
_HOST = re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname()) or "host"
_OWNER = re.compile(r"^(\d+)-[0-9a-f]+-(.+)$")


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path`` that no other writer (process, thread or host) will choose."""
    return path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(6)}-{_HOST}"


def lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_stale(tmp: Path) -> bool:
    """True when the temporary's owner (pid on this host) has exited; unknown owners are never stale."""
    m = _OWNER.match(tmp.name.rsplit(TMP_MARK, 1)[-1])
    return bool(m) and m.group(2) == _HOST and not _pid_alive(int(m.group(1)))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the leftovers of writers of ``path`` that died (crash, SIGKILL); returns what was removed."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}{TMP_MARK}*"):
        if tmp.name != lock_path(path).name and is_stale(tmp):
            _remove(tmp)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def commit_lock(path: Path) -> Iterator[None]:
    """Exclusive lock of ``path``'s commit; waits for another writer's commit to finish."""
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; the lock file stays (deleting it would race with a waiting writer)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (AttributeError, OSError):
        return False


@contextlib.contextmanager
def read_lock(path: Path) -> Iterator[None]:
    """Shared lock for reading ``path`` as a whole: no commit swaps it in the middle of the read.

    Only where a writer has committed here before (its lock file exists); a read-only location needs none.
    """
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to ``path``, replacing a file or directory there; call under ``commit_lock``.

    A directory cannot be renamed over a non-empty one, so an existing one is swapped with ``tmp`` in one step
    where the system allows it (readers see the old or the new store, never none) and then removed.
    """
    if path.is_symlink() and tmp.is_dir():  # a link (a DVC symlink checkout) cannot be renamed over by a directory
        path.unlink()
    if not (path.is_dir() and not path.is_symlink()):
        os.replace(tmp, path)
        return
    if _exchange(tmp, path):
        _remove(tmp)  # now the old store
        return
    old = temporary_name(path)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; when the block succeeds it replaces ``path``.

    The caller writes a file or a directory at the yielded path. On failure or interruption the temporary
    is removed (or, after SIGKILL, left for the next writer to remove) and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary output {tmp} of {path}")
        with commit_lock(path):
            commit(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def is_temporary(path: Path) -> bool:
    """A hidden temporary of an atomic write (never a finished output)."""
    return path.name.startswith(".") and TMP_MARK in path.name

