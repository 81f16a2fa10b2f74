"""Staging, durability and atomic publication of a checkpoint directory.

A save writes into ``<parent>/.<name>.staging`` (same filesystem as the target). Only when every rank has
finished (and, when durable, every file and the directory are fsynced) is the staging directory swapped
into place with one ``rename`` -- an atomic ``renameat2(RENAME_EXCHANGE)`` when the target already exists,
so the path always names a complete checkpoint, the old or the new one. Files in an existing target that
are not safetensors weights (tokenizer files, READMEs...) are hard-linked into the new directory first.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from pathlib import Path

from .errors import CheckpointExistsError, HFStorageError
from .layout import INDEX_NAME

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_path(target: str | os.PathLike) -> Path:
    t = Path(os.path.abspath(target))
    return t.parent / f".{t.name}.staging"


def _old_path(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def is_complete(directory: str | os.PathLike) -> bool:
    """A checkpoint is complete when its index exists (or, for a single-file checkpoint, its one file)."""
    d = Path(directory)
    return (d / INDEX_NAME).is_file() or (d / "model.safetensors").is_file()


def check_target(target: str | os.PathLike, overwrite: bool) -> Path:
    """Validate the output path before any byte is written. Returns it absolute."""
    t = Path(os.path.abspath(target))
    if t.exists() and not t.is_dir():
        raise HFStorageError(f"output path {str(t)!r} exists and is not a directory; choose a directory path")
    if not overwrite and t.is_dir() and is_complete(t):
        raise CheckpointExistsError(
            f"{str(t)!r} already holds a checkpoint; pass overwrite=True (launcher: output.overwrite=replace) "
            "or choose another output directory"
        )
    return t


def recover(target: str | os.PathLike) -> None:
    """Undo a publish interrupted between its two renames (filesystems without RENAME_EXCHANGE).

    Then the target is missing and ``.<name>.old`` is the only complete copy of the previous checkpoint:
    put it back before anything else touches the leftovers.
    """
    t = Path(os.path.abspath(target))
    old = _old_path(t)
    if not t.exists() and old.is_dir() and is_complete(old):
        log.warning("restoring %s from %s, left by a publish that was interrupted", t, old)
        os.rename(old, t)


def begin(target: str | os.PathLike, overwrite: bool = True) -> Path:
    """Create a fresh staging directory for ``target``; remove leftovers of an interrupted save."""
    recover(target)
    t = check_target(target, overwrite)
    t.parent.mkdir(parents=True, exist_ok=True)
    for leftover in (staging_path(t), _old_path(t)):
        if leftover.exists():
            log.warning("removing %s left by an interrupted save", leftover)
            shutil.rmtree(leftover)
    st = staging_path(t)
    st.mkdir()
    return st


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(directory: Path, name: str, data: bytes, durable: bool) -> None:
    """Write a small file (index, config.json) completely, via a temporary name and rename."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise HFStorageError(f"extra file name {name!r} must be a plain file name inside the checkpoint directory")
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
        if _is_weights(entry.name) or (new / entry.name).exists() or entry.name.startswith(".") and entry.name.endswith(".tmp"):
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


def _exchange(a: Path, b: Path) -> bool:
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


def publish(staging: Path, target: str | os.PathLike, durable: bool) -> None:
    """Make the staged checkpoint visible at ``target`` in one atomic step."""
    t = Path(os.path.abspath(target))
    if durable:
        fsync_path(staging, directory=True)
    if t.is_dir():
        _carry_over(t, staging)
        if not _exchange(staging, t):
            old = _old_path(t)
            os.rename(t, old)
            os.rename(staging, t)
            staging = old
        shutil.rmtree(staging)
    else:
        os.rename(staging, t)
    if durable:
        fsync_path(t.parent, directory=True)


def abort(staging: Path) -> None:
    """Remove a staging directory after a failed save (best effort; the next save also cleans it)."""
    shutil.rmtree(staging, ignore_errors=True)
