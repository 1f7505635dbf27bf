"""Feature rows in a zarr v3 array: the alternative backend to feature files, same RowStore interface.

    write_zarr_features(path, array, chunk_rows=1024)   # built beside, fsynced, renamed into place
    store = ZarrStore(path)
    store.read(np.array([7, 3, 7]))                      # (3, *row_shape), in the order asked

Chunks hold ``chunk_rows`` whole rows, uncompressed, each followed by a crc32c checksum that zarr verifies
on read (``checksum=False`` leaves it out). ``bytes_read`` counts the stored bytes of the distinct chunks a
read touched: zarr reads whole chunks, so small chunks suit random rows and large ones sequential scans.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
from plait.storage.feature_file import FeatureFileError
from plait.storage.store import check_ids

MARK = "plait_features"  # attribute naming an array this module wrote: only those are ever replaced


def _is_ours(path: Path) -> bool:
    try:
        return MARK in json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


def write_zarr_features(path: str | Path, array, chunk_rows: int = 1024, checksum: bool = True) -> Path:
    """Write ``array`` (N, *row_shape), e.g. an ndarray or np.memmap, as a zarr v3 array at folder ``path``,
    copying about 64k rows at a time. Replaces only a folder this function wrote."""
    import zarr
    from zarr.codecs import Crc32cCodec

    path = Path(path)
    if path.exists() and not _is_ours(path):
        raise FileExistsError(f"{path} exists and is not a feature array written by write_zarr_features; it is "
                              "never replaced: move it or choose another path")
    if chunk_rows < 1 or len(array.shape) < 1:
        raise ValueError(f"chunk_rows must be >= 1 and the array must have a row axis, got {chunk_rows} and "
                         f"shape {array.shape}")
    shape, dtype = tuple(array.shape), np.dtype(array.dtype)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_native_id()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        z = zarr.create_array(store=str(tmp), shape=shape, dtype=dtype, chunks=(chunk_rows, *shape[1:]),
                              filters=None, compressors=[Crc32cCodec()] if checksum else None,
                              attributes={MARK: 1}, zarr_format=3)
        step = chunk_rows * max(1, 65536 // chunk_rows)
        for start in range(0, shape[0], step):
            z[start : start + step] = np.asarray(array[start : start + step])
        for folder, _, files in os.walk(tmp):
            for name in files:
                _fsync(os.path.join(folder, name))
        if path.exists():
            old = path.with_name(f"{path.name}.old-{os.getpid()}-{threading.get_native_id()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ZarrStore:
    """A zarr v3 feature array as a RowStore; reads the distinct ids sorted (``oindex``), then reorders."""

    def __init__(self, path: str | Path):
        import zarr

        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a zarr array (no zarr.json); write it with "
                                    "write_zarr_features")
        self.array = zarr.open_array(str(self.path), mode="r")
        self.num_rows, self.row_shape = int(self.array.shape[0]), tuple(self.array.shape[1:])
        self.dtype = np.dtype(self.array.dtype)
        self.chunk_rows = int(self.array.chunks[0])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.rows_read = self.bytes_read = 0

    def __reduce__(self):
        return ZarrStore, (self.path,)

    def read(self, ids) -> np.ndarray:
        ids = check_ids(ids, self.num_rows, f"ZarrStore.read({self.path})")
        if ids.size == 0:
            return np.empty((0, *self.row_shape), dtype=self.dtype)
        uniq, inverse = np.unique(ids, return_inverse=True)
        try:
            rows = self.array.oindex[uniq]
        except Exception as e:  # zarr raises its own types for a failed checksum or a missing chunk
            self._raise_bad_chunk(np.unique(uniq // self.chunk_rows), e)
        self.rows_read += int(ids.size)
        self.bytes_read += int(np.unique(uniq // self.chunk_rows).size) * self.chunk_rows * self.row_bytes
        return rows[inverse]

    def _raise_bad_chunk(self, chunks: np.ndarray, error: Exception) -> None:
        """Find the first chunk of ``chunks`` that fails on its own and raise naming it."""
        for c in chunks.tolist():
            try:
                self.array[c * self.chunk_rows : (c + 1) * self.chunk_rows]
            except Exception as e:
                error = e
                break
        else:
            c = None
        which = f"chunk {c} (rows {c * self.chunk_rows} to {(c + 1) * self.chunk_rows})" if c is not None else (
            f"chunks {chunks[:8].tolist()}")
        raise FeatureFileError(f"{self.path}: reading {which} failed ({type(error).__name__}: {error})",
                               "rewrite it with write_zarr_features", self.path) from error

    def stats(self) -> dict[str, int]:
        return {"rows_read": self.rows_read, "bytes_read": self.bytes_read}
