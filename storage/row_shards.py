"""Fixed-width integer rows in Parquet shards, written atomically, read by row index.

    write_row_shards(path, rows)          # rows: (N, width) integer array; commits by rename
    shards = RowShards(path)              # reads manifest.json, validates it
    shards.read(np.array([3, 17, 5]))     # -> (3, width) array, in the order asked

A dataset folder is complete or absent: it is built under ``<path>.tmp-<pid>`` and renamed into
place once every shard and the manifest are on disk. A row is a row: this module knows nothing of
what the integers mean.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
FORMAT = "plait-row-shards-v1"


class CorruptDataError(RuntimeError):
    """A dataset file is missing, truncated or inconsistent; the message names it and the fix."""


def write_row_shards(path: str | Path, rows: np.ndarray, rows_per_shard: int = 8192, meta: dict | None = None) -> Path:
    rows = np.ascontiguousarray(rows)
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must be a 2-D integer array, got shape {rows.shape} dtype {rows.dtype}")
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = []
    for i, start in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[start : start + rows_per_shard]
        flat = pa.array(chunk.reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(flat, chunk.shape[1])
        name = f"shard_{i:05d}.parquet"
        pq.write_table(pa.table({"row": column}), tmp / name)
        shards.append({"file": name, "rows": len(chunk)})
    manifest = {"format": FORMAT, "rows": len(rows), "width": rows.shape[1], "dtype": str(rows.dtype),
                "shards": shards, "meta": meta or {}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if path.exists():
        shutil.rmtree(path)
    os.rename(tmp, path)
    return path


class RowShards:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise CorruptDataError(f"{manifest_file} not found: {self.path} is not a finished row-shard dataset; "
                                   "delete the folder and let the job rebuild it")
        try:
            m = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as e:
            msg = f"{manifest_file} is not valid JSON ({e}); delete {self.path} and rebuild it"
            raise CorruptDataError(msg) from None
        if m.get("format") != FORMAT:
            raise CorruptDataError(f"{manifest_file}: format {m.get('format')!r}, expected {FORMAT!r}")
        self.num_rows, self.width, self.meta = m["rows"], m["width"], m.get("meta", {})
        self.dtype = np.dtype(m["dtype"])
        self.files = [self.path / s["file"] for s in m["shards"]]
        self.offsets = np.cumsum([0] + [s["rows"] for s in m["shards"]])
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_rows

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._cache:
            try:
                table = pq.read_table(self.files[i])
                flat = table.column("row").combine_chunks().flatten().to_numpy()
            except (OSError, pa.ArrowInvalid, KeyError) as e:
                raise CorruptDataError(
                    f"{self.files[i]} is unreadable ({e}); delete {self.path} and rebuild it"
                ) from None
            expected = int(self.offsets[i + 1] - self.offsets[i])
            if flat.size != expected * self.width:
                raise CorruptDataError(f"{self.files[i]} holds {flat.size} values, the manifest says "
                                       f"{expected} rows x {self.width}; delete {self.path} and rebuild it")
            if len(self._cache) >= 4:  # keep a few shards; sequential epochs touch them in order
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = flat.reshape(expected, self.width).astype(self.dtype, copy=False)
        return self._cache[i]

    def read(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
            raise IndexError(f"row ids must be in [0, {self.num_rows}), got range [{ids.min()}, {ids.max()}]")
        out = np.empty((len(ids), self.width), dtype=self.dtype)
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for s in np.unique(shard_of):
            where = shard_of == s
            out[where] = self._shard(int(s))[ids[where] - self.offsets[s]]
        return out
