"""Fixed-width integer rows in Parquet shards: replaced atomically, verified by checksum, read by row index.

    write_row_shards(path, rows)          # rows: (N, width) integer array; commits by rename, under a lock
    shards = RowShards(path)              # reads manifest.json, opens every shard
    shards.verify()                       # each shard's size and CRC-32 against the manifest
    shards.read(np.array([3, 17, 5]))     # -> (3, width) array, in the order asked

A folder holds ``manifest.json`` (format, rows, width, dtype, rows per group, each shard's file, rows, bytes
and crc32, the caller's ``meta``) and ``shard_NNNNN.parquet`` files in row groups of ``rows_per_group`` rows.
``read`` decodes only the row groups holding the rows asked (``rows_decoded`` counts them; a bounded LRU
keeps recent ones): its cost follows the number of rows asked, not the size of the dataset.

Replacing: the new dataset is built in ``<path>.tmp-<pid>-<thread>`` beside the old one, which is then
renamed aside (``<path>.old-<pid>-<thread>``); the new one is renamed in and the old one removed. A reader
sees a finished dataset or none, never a half-written one, and a RowShards opened earlier keeps reading
the old files (it holds them open; POSIX keeps removed files readable). ``dataset_lock(path)`` (flock on
``<path>.lock``, removed when released) serialises builders of one path across processes and threads. Only an
absent path, an empty folder or a dataset this module wrote, with nothing else in it, is ever replaced.
A row is a row: this module knows nothing of what the integers mean.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from plait.storage.folders import dataset_lock, new_build_folder, stale_builds, swap_in

MANIFEST = "manifest.json"
FORMAT = "plait-row-shards-v2"  # v2: row groups of rows_per_group rows, per-shard bytes and crc32
ROWS_PER_GROUP = 128
_SHARD = re.compile(r"shard_\d{5}\.parquet")


class CorruptDataError(RuntimeError):
    """A dataset file is missing, truncated or altered; the message names it and the fix."""

    user_error = True  # the user's data, not Plait, is at fault: the CLI prints the message and exits 2


class NotRowShardsError(ValueError):
    """A folder holds files this module did not write: it is never replaced or deleted."""

    user_error = True


def read_manifest(path: str | Path) -> dict | None:
    """The manifest in folder ``path``; None when it has no manifest.json."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptDataError(f"{file} is not valid JSON ({e}); delete {path} and rebuild it") from None
    if not isinstance(manifest, dict):
        raise CorruptDataError(f"{file} holds a {type(manifest).__name__}, not a JSON object; delete {path} "
                               "and rebuild it")
    return manifest


def is_row_shards(manifest: dict | None) -> bool:
    """Whether a manifest was written by this module (any format version)."""
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("plait-row-shards-")


def foreign_entries(path: str | Path) -> list[str]:
    """Names in folder ``path`` that write_row_shards did not write (all of them without its manifest)."""
    names = sorted(os.listdir(path))
    try:
        ours = is_row_shards(read_manifest(path))
    except CorruptDataError:
        ours = False
    return [n for n in names if not ours or (n != MANIFEST and not _SHARD.fullmatch(n))]


def describe_entries(names: list[str], limit: int = 5) -> str:
    """``"3 entries: a, b, c"``, the first ``limit`` names of a folder listing."""
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}"


def check_replaceable(path: str | Path) -> None:
    """Raise NotRowShardsError unless ``path`` is absent, an empty folder, or only a dataset written here."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        kind = "a symbolic link" if path.is_symlink() else "a file"
        raise NotRowShardsError(f"{path} is {kind}, not a dataset folder: it is never replaced; choose another path")
    if path.exists() and (foreign := foreign_entries(path)):
        raise NotRowShardsError(f"{path} holds files that are not part of a row-shard dataset "
                                f"({describe_entries(foreign)}); they are never deleted: move them out or "
                                "choose another path")


def write_row_shards(path: str | Path, rows: np.ndarray, rows_per_shard: int = 8192, meta: dict | None = None,
                     rows_per_group: int = ROWS_PER_GROUP) -> Path:
    """Write ``rows`` as the dataset at ``path``, replacing the one there; holds dataset_lock(path)."""
    with dataset_lock(path):
        return replace_row_shards(path, rows, rows_per_shard, meta, rows_per_group)


def replace_row_shards(path: str | Path, rows: np.ndarray, rows_per_shard: int = 8192, meta: dict | None = None,
                       rows_per_group: int = ROWS_PER_GROUP) -> Path:
    """write_row_shards for a caller that already holds dataset_lock(path)."""
    rows = np.ascontiguousarray(rows)
    if rows.ndim != 2 or rows.shape[1] < 1 or not np.issubdtype(rows.dtype, np.integer) or min(
            rows_per_shard, rows_per_group) < 1:
        raise ValueError(f"rows must be a 2-D integer array, got shape {rows.shape} dtype {rows.dtype}; "
                         f"rows_per_shard={rows_per_shard} and rows_per_group={rows_per_group} must be >= 1")
    path = Path(path)
    check_replaceable(path)
    _remove_stale_builds(path)
    tmp, suffix = new_build_folder(path)
    try:
        _write_shards(tmp, rows, rows_per_shard, rows_per_group, meta or {})
        swap_in(tmp, path, suffix, _remove_own_files)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _write_shards(folder: Path, rows: np.ndarray, rows_per_shard: int, rows_per_group: int, meta: dict) -> None:
    shards = []
    for i, start in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[start : start + rows_per_shard]
        column = pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), chunk.shape[1])
        name = f"shard_{i:05d}.parquet"
        pq.write_table(pa.table({"row": column}), folder / name, row_group_size=rows_per_group)
        with open(folder / name, "rb") as f:
            size, crc = _size_and_crc32(f.read)
        shards.append({"file": name, "rows": len(chunk), "bytes": size, "crc32": crc})
    manifest = {"format": FORMAT, "rows": len(rows), "width": rows.shape[1], "dtype": str(rows.dtype),
                "rows_per_group": rows_per_group, "shards": shards, "meta": meta}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _size_and_crc32(read) -> tuple[int, int]:
    size, crc = 0, 0
    while chunk := read(1 << 22):
        size, crc = size + len(chunk), zlib.crc32(chunk, crc)
    return size, crc


def _remove_own_files(folder: Path) -> None:
    """Delete what write_row_shards writes in ``folder``, then the folder if nothing else is left in it."""
    for name in os.listdir(folder):
        if name == MANIFEST or _SHARD.fullmatch(name):
            os.unlink(folder / name)
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def _remove_stale_builds(path: Path) -> None:
    """Builds aside from a crashed builder (only one builder holds the lock at a time)."""
    for entry in stale_builds(path):
        _remove_own_files(entry)


class RowShards:
    """An opened dataset. Every shard file is held open, so this object reads the dataset it opened even if
    the folder is replaced meanwhile. The last ``cache_rows`` rows' row groups decoded are kept (LRU);
    ``rows_decoded`` counts the rows decoded from Parquet so far."""

    def __init__(self, path: str | Path, cache_rows: int = 16384):
        self.path, self.cache_rows = Path(path), cache_rows
        self._fix = f"delete {self.path} and rebuild it"
        m = read_manifest(self.path)
        if m is None:
            raise CorruptDataError(f"{self.path / MANIFEST} not found: {self.path} is not a finished row-shard "
                                   "dataset; delete the folder and let the job rebuild it")
        if m.get("format") != FORMAT:
            raise CorruptDataError(f"{self.path / MANIFEST}: format {m.get('format')!r}, expected {FORMAT!r} "
                                   f"(written by another version); {self._fix}")
        try:
            self.num_rows, self.width, self.meta = int(m["rows"]), int(m["width"]), m.get("meta", {})
            self.dtype, self.rows_per_group = np.dtype(m["dtype"]), int(m["rows_per_group"])
            self.shards = [{k: int(s[k]) for k in ("rows", "bytes", "crc32")} for s in m["shards"]]
            self.files = [self.path / s["file"] for s in m["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptDataError(f"{self.path / MANIFEST} is incomplete ({type(e).__name__}: {e}); "
                                   f"{self._fix}") from None
        self.offsets = np.cumsum([0] + [s["rows"] for s in self.shards])
        self.rows_decoded = 0
        self._handles = [self._open(f) for f in self.files]
        self._readers: dict[int, pq.ParquetFile] = {}
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # (shard, group) -> rows, LRU
        self._cached_rows = 0

    def __len__(self) -> int:
        return self.num_rows

    def __reduce__(self):  # pickles as its path; the copy opens the files again
        return RowShards, (self.path, self.cache_rows)

    def _open(self, file: Path) -> pa.NativeFile:
        try:
            return pa.OSFile(str(file), "r")
        except OSError as e:
            raise CorruptDataError(f"{file} is missing or unreadable ({e}); {self._fix}") from None

    def verify(self) -> None:
        """Check that every shard exists and has the size and CRC-32 the manifest recorded; reads all bytes."""
        for file, shard, handle in zip(self.files, self.shards, self._handles, strict=True):
            if not file.is_file():
                raise CorruptDataError(f"{file} is missing; {self._fix}")
            size = handle.size()
            if size != shard["bytes"]:
                raise CorruptDataError(f"{file} is {size} bytes, the manifest says {shard['bytes']}: it was "
                                       f"truncated or overwritten; {self._fix}")
            handle.seek(0)
            _, crc = _size_and_crc32(handle.read)
            if crc != shard["crc32"]:
                raise CorruptDataError(f"{file} fails its checksum (crc32 {crc:08x}, the manifest says "
                                       f"{shard['crc32']:08x}): its bytes changed after it was written; "
                                       f"{self._fix}")

    def _reader(self, s: int) -> pq.ParquetFile:
        if s not in self._readers:
            reader = pq.ParquetFile(self._handles[s])
            if reader.metadata.num_rows != self.shards[s]["rows"]:
                raise ValueError(f"it holds {reader.metadata.num_rows} rows, the manifest says "
                                 f"{self.shards[s]['rows']}")
            self._readers[s] = reader
        return self._readers[s]

    def _read_groups(self, s: int, groups: np.ndarray) -> np.ndarray:
        """Rows of row groups ``groups`` (ascending) of shard ``s``, concatenated, decoded now."""
        g, rows = self.rows_per_group, self.shards[s]["rows"]
        expected = int(sum(min(g, rows - k * g) for k in groups))
        try:
            table = self._reader(s).read_row_groups([int(k) for k in groups], columns=["row"])
            flat = table.column("row").combine_chunks().flatten().to_numpy()
        except (OSError, ValueError, KeyError) as e:  # ArrowInvalid is a ValueError
            raise CorruptDataError(f"{self.files[s]} is unreadable ({e}); {self._fix}") from None
        if flat.size != expected * self.width:
            raise CorruptDataError(f"{self.files[s]} row groups {groups.tolist()} hold {flat.size} values, the "
                                   f"manifest says {expected} rows x {self.width}; {self._fix}")
        self.rows_decoded += expected
        return flat.reshape(expected, self.width).astype(self.dtype, copy=False)

    def _groups(self, s: int, groups: np.ndarray) -> dict[int, np.ndarray]:
        """Rows of each of row groups ``groups`` of shard ``s``: from the cache, the others decoded at once."""
        missing = [int(g) for g in groups if (s, int(g)) not in self._cache]
        if missing:
            block, start = self._read_groups(s, np.array(missing)), 0
            for g in missing:
                n = min(self.rows_per_group, self.shards[s]["rows"] - g * self.rows_per_group)
                self._cache[(s, g)], start = block[start : start + n].copy(), start + n
                self._cached_rows += n
        found = {}
        for g in groups:
            self._cache.move_to_end((s, int(g)))
            found[int(g)] = self._cache[(s, int(g))]
        while self._cached_rows > self.cache_rows and len(self._cache) > 1:
            self._cached_rows -= len(self._cache.popitem(last=False)[1])
        return found

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids``, in the order asked; decodes only the row groups that hold them (and are not cached)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
            raise IndexError(f"row ids must be in [0, {self.num_rows}), got range [{ids.min()}, {ids.max()}]")
        out = np.empty((len(ids), self.width), dtype=self.dtype)
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            group, within = np.divmod(ids[where] - self.offsets[s], self.rows_per_group)
            for g, rows in self._groups(int(s), np.unique(group)).items():
                here = group == g
                out[where[here]] = rows[within[here]]
        return out
