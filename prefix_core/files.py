"""Durable file operations, one helper each: an atomic file write, an atomic folder write, fsync of a folder (or a
tree), and an exclusive ``flock``. Standard library only (no torch), so ``infra`` and light commands import it.

Atomic means a reader sees the old content or the new one, never a part: the new content is written to a
temporary name beside the target, flushed to disk, then renamed over it, and the folder holding it is flushed so
the rename itself survives a crash.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """Flush every file under ``path``, and every folder, to disk."""
    for dirpath, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside the file ``path`` for the block to write (a download, a tool's output); when
    the block ends without error, that file is flushed and renamed over ``path``, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes, mode: int | None = None) -> Path:
    """Replace the file ``path`` with ``data`` (text is written as UTF-8) atomically; ``mode``: its permission bits,
    set before the content is written (so a secret is never readable by others). Creates missing parents."""
    with replacing(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)  # less the umask
        if mode is not None:
            os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def atomic_write_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a new temporary folder beside ``target``, flush it, then put it in place in one
    rename; an existing ``target`` is replaced only once the new one is complete. Nothing is left behind on
    failure."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def file_lock(path: str | Path, blocking: bool = True) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created, with its parents) for the block; yields the descriptor.
    ``blocking=False``: raise BlockingIOError at once when another process holds it. The lock goes with the
    descriptor: a process that dies releases it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        yield fd
    finally:
        os.close(fd)
