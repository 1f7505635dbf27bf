"""Folders committed atomically: build beside the target, fsync, rename in; never replace a folder that is not ours.

    write_folder(path, build, is_ours, "graph")     # build(tmp) fills a fresh folder; then it replaces `path`

``path`` must be absent, an empty folder, or a folder ``is_ours(path)`` accepts (a folder this code wrote);
anything else (a user's folder, a file, a symbolic link) is refused with the reason and left untouched. The
build runs under ``dataset_lock(path)``; leftovers of a crashed build are removed by the next one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from plait.storage.row_shards import dataset_lock


class ForeignFolderError(ValueError):
    """The target path holds something this code did not write: it is never replaced."""


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
        suffix = f"{os.getpid()}-{threading.get_native_id()}"
        tmp = path.with_name(f"{path.name}.tmp-{suffix}")
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            fsync_tree(tmp)
            if path.exists():
                old = path.with_name(f"{path.name}.old-{suffix}")
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)
                    raise
                shutil.rmtree(old)  # checked above: only our own files
            else:
                os.rename(tmp, path)
            fsync_path(path.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def _remove_stale(path: Path, is_ours: Callable[[Path], bool]) -> None:
    """Folders aside from a crashed build of ``path`` (the lock is held: nobody else is building it)."""
    pattern = re.compile(re.escape(path.name) + r"\.(tmp|old)-\d+-\d+")
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                if entry.name.startswith(f"{path.name}.tmp-") or is_ours(entry):
                    shutil.rmtree(entry)


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
