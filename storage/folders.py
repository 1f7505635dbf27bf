"""Folders committed atomically: build beside the target, fsync, rename in; never replace a folder that is not ours.

    write_folder(path, build, is_ours, "graph")     # build(tmp) fills a fresh folder; then it replaces `path`
    with dataset_lock(path): ...                    # flock on <path>.lock: one builder of `path` at a time
    tmp, suffix = new_build_folder(path)            # the parts, for a builder with its own checks and cleanup
    swap_in(tmp, path, suffix, remove_old)          # (row_shards.py): rename aside, rename in, remove the old

``path`` must be absent, an empty folder, or a folder ``is_ours(path)`` accepts (a folder this code wrote);
anything else (a user's folder, a file, a symbolic link) is refused with the reason and left untouched. The
build runs under ``dataset_lock(path)`` (whose lock file goes when it is released); leftovers of a crashed build
are removed by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np


class ForeignFolderError(ValueError):
    """The target path holds something this code did not write: it is never replaced."""

    user_error = True  # the path the user chose is unusable: the CLI prints the message and exits 2


LOCK_MARK = b"plait build lock\n"  # what a lock file holds: a file of that name holding anything else is not ours


def lock_file(path: str | Path) -> Path:
    """The file ``dataset_lock(path)`` locks: ``<path>.lock`` beside ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.lock")


def is_lock_file(file: Path) -> bool:
    """Whether ``file`` is a lock file of dataset_lock (empty, as earlier versions left them, or marked)."""
    try:
        if not file.is_file() or file.is_symlink():
            return False
        with open(file, "rb") as f:
            return f.read(len(LOCK_MARK) + 1) in (b"", LOCK_MARK)
    except OSError:
        return False


@contextlib.contextmanager
def dataset_lock(path: str | Path) -> Iterator[None]:
    """Hold the exclusive build lock of ``path``: an flock on ``<path>.lock`` (blocks until free; not re-entrant).

    The holder removes the file as it lets go, so a finished build leaves nothing beside (or, for a folder built
    inside another, nothing inside) that folder. A waiter that wakes on the removed file sees that the name now
    points to another file or none and locks again: two builders never hold locks on two different files. A
    builder killed while holding the lock leaves the file behind; the next builder takes it and removes it. A
    file of that name that is not a lock file (is_lock_file) is locked but never removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file = lock_file(path)
    while True:
        fd = _open_lock(file)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, file):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # locked a file another holder had removed: try the one now at the name
    try:
        yield
    finally:
        try:
            if is_lock_file(file):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(file)
        finally:
            os.close(fd)  # releases the flock; waiters on the removed file will look again


def _open_lock(file: Path) -> int:
    """A descriptor of the lock file, created (and marked) when absent."""
    while True:
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                return os.open(file, os.O_RDONLY)
            except FileNotFoundError:
                continue  # its holder removed it in between: create it
        os.write(fd, LOCK_MARK)
        return fd


def _same_file(fd: int, file: Path) -> bool:
    try:
        now = os.stat(file)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev)


def new_build_folder(path: Path) -> tuple[Path, str]:
    """A fresh folder beside ``path`` to build in (``<path>.tmp-<pid>-<thread>``) and its suffix."""
    suffix = f"{os.getpid()}-{threading.get_native_id()}"
    tmp = path.with_name(f"{path.name}.tmp-{suffix}")
    tmp.mkdir(parents=True)
    return tmp, suffix


def swap_in(tmp: Path, path: Path, suffix: str, remove_old: Callable[[Path], None]) -> None:
    """Rename the finished folder ``tmp`` to ``path``. A folder already at ``path`` is renamed aside first
    (``<path>.old-<suffix>``), put back if the rename fails, and handed to ``remove_old`` after."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.with_name(f"{path.name}.old-{suffix}")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    remove_old(old)


def stale_builds(path: Path) -> list[Path]:
    """Folders a crashed build of ``path`` left beside it (``.tmp-`` and ``.old-`` ones; call under the lock)."""
    pattern = re.compile(re.escape(path.name) + r"\.(tmp|old)-\d+-\d+")
    if not path.parent.is_dir():
        return []
    return [entry for entry in path.parent.iterdir()
            if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()]


def read_meta(path: Path) -> dict | None:
    """The JSON object in ``path/meta.json``; None when absent or not a JSON object."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def write_folder(path: Path, build: Callable[[Path], None], is_ours: Callable[[Path], bool], what: str) -> None:
    """Run ``build(tmp)`` on a fresh folder beside ``path``, fsync it, and rename it to ``path``, under
    ``dataset_lock(path)``. ``path`` must be absent, an empty folder, or a folder ``is_ours`` accepts."""
    path = Path(path)
    with dataset_lock(path):
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            kind = "a symbolic link" if path.is_symlink() else "a file"
            raise ForeignFolderError(f"{path} is {kind}, not a {what} folder: it is never replaced; "
                                     "choose another path")
        if path.exists() and os.listdir(path) and not is_ours(path):
            names = sorted(os.listdir(path))
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ForeignFolderError(f"{path} is not a {what} folder written by Plait (it holds {shown}); it is never "
                                 "replaced or deleted: move it away or choose another path")
        _remove_stale(path, is_ours)
        tmp, suffix = new_build_folder(path)
        try:
            build(tmp)
            fsync_tree(tmp)
            swap_in(tmp, path, suffix, shutil.rmtree)  # checked above: only our own files
            fsync_path(path.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def _remove_stale(path: Path, is_ours: Callable[[Path], bool]) -> None:
    """Folders aside from a crashed build of ``path`` (the lock is held: nobody else is building it)."""
    for entry in stale_builds(path):
        if entry.name.startswith(f"{path.name}.tmp-") or is_ours(entry):
            shutil.rmtree(entry)


def write_atomic(path: str | Path, data: bytes | str, src: str | Path | None = None) -> Path:
    """The one durable write: ``data`` (or a copy of the file ``src``) into a temporary file beside ``path``,
    fsynced, renamed over ``path``, the folder fsynced: a reader sees the old file or all of the new one, and after a
    crash the file is one or the other. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_native_id()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if src is not None:
                with open(src, "rb") as source:
                    shutil.copyfileobj(source, f, 1 << 20)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)
    return path


def write_npy(file: Path, array: np.ndarray) -> None:
    with open(file, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files + dirs:
            with contextlib.suppress(OSError):
                fsync_path(Path(root) / name)
    fsync_path(folder)
