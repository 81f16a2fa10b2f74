"""The target directory of a save: its lock, a unique staging directory, durability and atomic publication.

A save locks the target (``<parent>/.<name>.lock``, a POSIX record lock that the kernel drops when the
process dies, holding the saver's host, pid and start time), then writes into its own
``<parent>/.<name>.staging-<id>`` (same filesystem as the target). A second save of the same target fails
with :class:`CheckpointLockedError` naming the first (or waits for it, by option) and never touches its
files; staging directories of dead saves are removed only by a save that holds the lock, which proves their
owner gone. Only when every rank has finished (and, when durable, every file and the directory are
fsynced) is the staging directory swapped into place with one ``rename``: an atomic
``renameat2(RENAME_EXCHANGE)`` when the target already exists, so the path always names a complete
checkpoint, the old or the new one. Non-weight files of an existing target (tokenizer files, READMEs...)
are hard-linked into the new directory first.

A target that is a symbolic link (``latest -> step-1000``) is followed: the directory it names is
replaced and the link is kept.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointExistsError, CheckpointLockedError, HFStorageError
from .layout import INDEX_NAME

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def resolve(target: str | os.PathLike) -> Path:
    """The directory a save replaces: ``target`` made absolute, symbolic links followed."""
    return Path(os.path.realpath(os.path.abspath(target)))


def staging_dirs(target: str | os.PathLike) -> list[Path]:
    """The staging directories of saves to ``target`` (in progress, or left by a dead save)."""
    t = resolve(target)
    return sorted(t.parent.glob(f".{t.name}.staging-*"))


def _old_path(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def is_complete(directory: str | os.PathLike) -> bool:
    """A checkpoint is complete when its index exists (or, for a single-file checkpoint, its one file)."""
    d = Path(directory)
    return (d / INDEX_NAME).is_file() or (d / "model.safetensors").is_file()


def check_target(target: str | os.PathLike, overwrite: bool) -> Path:
    """Validate the output path before any byte is written. Returns it resolved."""
    t = resolve(target)
    if t.exists() and not t.is_dir():
        raise HFStorageError(f"output path {str(t)!r} exists and is not a directory; choose a directory path")
    if not overwrite and t.is_dir() and is_complete(t):
        raise CheckpointExistsError(
            f"{str(t)!r} already holds a checkpoint; pass overwrite=True (launcher: output.overwrite=replace) "
            "or choose another output directory"
        )
    return t


@dataclass
class Lock:
    """An exclusive lock on a target, held by this process until :meth:`release` (or its death)."""

    path: Path
    fd: int | None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # still ours: a waiter that opened it re-checks the name after locking
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


_HELD: dict[Path, float] = {}  # targets this process is saving: a second save in one process is refused too


def lock(target: Path, wait: float = 0.0) -> Lock:
    """Lock ``target`` for one save. Raises :class:`CheckpointLockedError` naming the holder if another save
    holds it after ``wait`` seconds. Where the filesystem has no locks, warn and go on unlocked."""
    deadline = time.monotonic() + wait
    while True:
        held = _try_lock(target)
        if held is not None:
            return held
        if time.monotonic() >= deadline:
            raise CheckpointLockedError(
                f"another save of {str(target)!r} is in progress ({_holder(target)}); wait for it to finish, "
                "save to another directory, or pass lock_wait=<seconds> to wait for it"
            )
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _try_lock(target: Path) -> Lock | None:
    if target in _HELD:
        return None
    path = _lock_path(target)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise HFStorageError(
            f"cannot create the lock file {str(path)!r} beside the target ({e.strerror}); the directory that "
            "holds the checkpoint must be writable"
        ) from e
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return None
        if e.errno in _NO_LOCKS:
            log.warning("%s: the filesystem has no file locks (%s); saving without one", target, e.strerror)
            return Lock(path, None)
        raise
    if not _same_file(fd, path):  # the holder released (and unlinked) it between our open and lock: retry
        os.close(fd)
        return _try_lock(target)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": time.time()}).encode(), 0)
    _HELD[target] = time.time()
    return Lock(path, fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder(target: Path) -> str:
    if target in _HELD:
        return f"in this process (pid {os.getpid()}), started {_when(_HELD[target])}"
    try:
        info = json.loads(_lock_path(target).read_text())
        return f"host {info['host']}, pid {info['pid']}, started {_when(info['start'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its details yet"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@dataclass
class Staging:
    """A locked save in progress: where its files go and the lock on its target."""

    directory: Path
    target: Path
    lock: Lock


def prepare(target: str | os.PathLike, overwrite: bool = True, lock_wait: float = 0.0) -> Staging:
    """Lock ``target``, remove what dead saves left, create this save's own staging directory."""
    t = check_target(target, overwrite)
    t.parent.mkdir(parents=True, exist_ok=True)
    held = lock(t, lock_wait)
    try:
        recover(t)
        check_target(t, overwrite)  # again under the lock: another save may have published meanwhile
        for leftover in (*staging_dirs(t), _old_path(t)):
            if leftover.exists():
                log.warning("removing %s left by an interrupted save", leftover)
                shutil.rmtree(leftover)
        directory = t.parent / f".{t.name}.staging-{uuid.uuid4().hex[:12]}"
        directory.mkdir()
    except BaseException:
        _unlock(t, held)
        raise
    return Staging(directory, t, held)


def sweep(parent: str | os.PathLike) -> list[Path]:
    """Remove the staging directories in ``parent`` whose saves are dead (their target's lock is free); a save
    in progress keeps its own. Returns what was removed."""
    removed = []
    for staging in sorted(Path(parent).glob(".*.staging-*")):
        target = staging.parent / staging.name[1:].rsplit(".staging-", 1)[0]
        held = _try_lock(target)
        if held is None:
            continue  # a live save holds it
        try:
            if staging.exists():
                log.warning("removing %s left by an interrupted save", staging)
                shutil.rmtree(staging, ignore_errors=True)
                removed.append(staging)
        finally:
            _unlock(target, held)
    return removed


def _unlock(target: Path, held: Lock) -> None:
    _HELD.pop(target, None)
    held.release()


def recover(target: Path) -> None:
    """Undo a publish interrupted between its two renames (filesystems without RENAME_EXCHANGE).

    Then the target is missing and ``.<name>.old`` is the only complete copy of the previous checkpoint:
    put it back before anything else touches the leftovers.
    """
    old = _old_path(target)
    if not target.exists() and old.is_dir() and is_complete(old):
        log.warning("restoring %s from %s, left by a publish that was interrupted", target, old)
        os.rename(old, target)


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_name(name: str) -> None:
    """An extra file's name must be a plain name inside the checkpoint directory (or prefix)."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise HFStorageError(f"extra file name {name!r} must be a plain file name inside the checkpoint directory")


def write_file(directory: Path, name: str, data: bytes, durable: bool) -> None:
    """Write a small file (index, config.json) completely, via a temporary name and rename."""
    check_name(name)
    tmp = directory / f".{name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, directory / name)


def _is_weights(name: str) -> bool:
    return name.endswith(".safetensors") or name.endswith(".safetensors.index.json")


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link every non-weight entry of ``old`` that ``new`` does not have into ``new``."""
    for entry in old.iterdir():
        temporary = entry.name.startswith(".") and entry.name.endswith(".tmp")
        if _is_weights(entry.name) or (new / entry.name).exists() or temporary:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _swap(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def publish(staging: Staging, durable: bool) -> None:
    """Make the staged checkpoint visible at its target in one atomic step, then release the lock."""
    t, directory = staging.target, staging.directory
    if durable:
        fsync_path(directory, directory=True)
    if t.is_dir():
        _carry_over(t, directory)
        if not _swap(directory, t):
            old = _old_path(t)
            os.rename(t, old)
            os.rename(directory, t)
            directory = old
        shutil.rmtree(directory)
    else:
        os.rename(directory, t)
    if durable:
        fsync_path(t.parent, directory=True)
    _unlock(t, staging.lock)


def abort(staging: Staging) -> None:
    """Remove a failed save's staging directory and release its lock (best effort; the next save also cleans)."""
    shutil.rmtree(staging.directory, ignore_errors=True)
    _unlock(staging.target, staging.lock)
