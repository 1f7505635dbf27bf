"""Feature files: fixed-width rows on disk, 4 KiB aligned, checksummed per block, committed atomically.

    write_features(path, array)                           # (N, *row_shape) numpy array -> file
    write_features_from_parquet(path, "x.parquet")        # feature_ingest.py: Parquet by record batches
    with FeatureWriter(path) as w:                        # chunk by chunk, from any generator
        w.append(chunk)
    info = open_feature_file(path)                        # parsed, validated header -> FeatureFileInfo

Layout (all offsets multiples of 4096, so every read can be a direct, aligned one)::

    [0, 4096)                         header page: b"PLAITFEA", u32 json length, u32 crc32 of the json,
                                      the json (format, version, dtype, shape, row_bytes, data_offset,
                                      data_bytes, block_size, num_blocks, checksum_offset, meta), zeros
    [data_offset, checksum_offset)    rows, row-major, back to back; zero-padded to whole blocks
    [checksum_offset, file end)       num_blocks little-endian u32: zlib.crc32 of each block_size block

A block is ``block_size`` bytes of the data region (4096 by default), so a random row read verifies only
the pages it touched. The file is built as ``<name>.tmp-<pid>-<thread>`` beside its final name, fsynced,
then renamed over it: a reader sees the old file or the new one, never a half-written one.
A row is a row: this module knows nothing of what the values mean.
"""

from __future__ import annotations

import json
import math
import os
import threading
import zlib
from array import array as packed_array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from plait.storage.errors import ProblemAndFix
from plait.storage.folders import fsync_path
from plait.storage.row_shards import CorruptDataError

MAGIC = b"PLAITFEA"
FORMAT = "plait-feature-file"
VERSION = 1
PAGE = 4096  # header size, data alignment and the alignment of every direct read
_PREFIX = len(MAGIC) + 8  # magic, u32 json length, u32 json crc32


class FeatureFileError(ProblemAndFix, CorruptDataError):
    """A feature file is truncated, altered or not a feature file: ``FeatureFileError(problem, fix, path)``, the
    problem naming the file (storage/errors.py: a caller that knows how the file was made restates the fix)."""


@dataclass(frozen=True)
class FeatureFileInfo:
    """What a feature file's header says, checked against the file's size."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    row_bytes: int
    data_offset: int
    data_bytes: int
    block_size: int
    num_blocks: int
    checksum_offset: int
    file_bytes: int
    version: int = VERSION
    meta: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.shape[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]


def _fix(path) -> str:
    return f"rewrite {path} with write_features (or the writer that made it)"


def _error(path, problem: str) -> FeatureFileError:
    return FeatureFileError(problem, _fix(path), path)


def read_header(path: str | Path) -> dict:
    """The JSON header of the feature file at ``path``, checked against its own crc32 (not against the rest of
    the file: a file truncated after its header still shows what wrote it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file {path} not found; write it with write_features first")
    size = path.stat().st_size
    with open(path, "rb") as f:
        page = f.read(PAGE)
    if len(page) < len(MAGIC) and MAGIC.startswith(page):
        raise _error(path, f"{path} holds {size} bytes, less than its {PAGE}-byte header: the file is truncated")
    if page[: len(MAGIC)] != MAGIC:
        raise _error(path, f"{path} is not a Plait feature file: it starts with {page[:8]!r}, expected {MAGIC!r}")
    if len(page) < PAGE:
        raise _error(path, f"{path} holds {size} bytes, less than its {PAGE}-byte header: the file is truncated")
    n, crc = int.from_bytes(page[8:12], "little"), int.from_bytes(page[12:16], "little")
    raw = page[_PREFIX : _PREFIX + n]
    if n > PAGE - _PREFIX or zlib.crc32(raw) != crc:
        raise _error(path, f"{path}: the header fails its checksum (json length {n}, crc32 {crc:08x}): it was "
                           "altered after writing")
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise _error(path, f"{path}: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _error(path, f"{path}: the header holds a {type(header).__name__}, not a JSON object")
    return header


def open_feature_file(path: str | Path) -> FeatureFileInfo:
    """Parse and validate the header of the feature file at ``path``; raise FeatureFileError naming what is wrong."""
    path = Path(path)
    h = read_header(path)
    size = path.stat().st_size
    if h.get("format") != FORMAT or h.get("version") != VERSION:
        raise _error(path, f"{path}: format {h.get('format')!r} version {h.get('version')!r}, this reader reads "
                           f"{FORMAT!r} version {VERSION}")
    try:
        info = FeatureFileInfo(path=path, dtype=np.dtype(h["dtype"]), shape=tuple(int(s) for s in h["shape"]),
                               row_bytes=int(h["row_bytes"]), data_offset=int(h["data_offset"]),
                               data_bytes=int(h["data_bytes"]), block_size=int(h["block_size"]),
                               num_blocks=int(h["num_blocks"]), checksum_offset=int(h["checksum_offset"]),
                               file_bytes=size, version=int(h["version"]), meta=dict(h.get("meta", {})))
    except (KeyError, TypeError, ValueError) as e:
        raise _error(path, f"{path}: the header is incomplete ({type(e).__name__}: {e})") from None
    _check_layout(info, size)
    return info


def _check_layout(info: FeatureFileInfo, size: int) -> None:
    path, b = info.path, info.block_size
    rules = [
        (len(info.shape) >= 1 and min(info.shape) >= 0, f"shape {info.shape} is not a row count and row shape"),
        (info.row_bytes == math.prod(info.row_shape) * info.dtype.itemsize > 0,
         f"row_bytes {info.row_bytes} != {math.prod(info.row_shape)} values x {info.dtype.itemsize} bytes"),
        (info.data_bytes == info.num_rows * info.row_bytes,
         f"data_bytes {info.data_bytes} != {info.num_rows} rows x {info.row_bytes} bytes"),
        (b > 0 and b % PAGE == 0, f"block_size {b} is not a positive multiple of {PAGE}"),
        (info.data_offset >= PAGE and info.data_offset % PAGE == 0,
         f"data_offset {info.data_offset} is not a multiple of {PAGE} after the header"),
        (b > 0 and info.num_blocks == -(-info.data_bytes // b),
         f"num_blocks {info.num_blocks} != ceil({info.data_bytes} / {b})"),
        (info.checksum_offset == info.data_offset + info.num_blocks * b,
         f"checksum_offset {info.checksum_offset} != {info.data_offset} + {info.num_blocks} x {b}"),
    ]
    for ok, what in rules:
        if not ok:
            raise _error(path, f"{path}: the header is inconsistent ({what})")
    expected = info.checksum_offset + 4 * info.num_blocks
    if size < expected:
        where = (f"it ends inside data block {(size - info.data_offset) // b} of {info.num_blocks}"
                 if size < info.checksum_offset else "it ends inside the checksum table")
        raise _error(path, f"{path}: expected {expected} bytes ({info.data_bytes} data bytes in {info.num_blocks} "
                           f"blocks of {b} + {4 * info.num_blocks} checksum bytes after the {info.data_offset}-byte "
                           f"header), file holds {size}: the file is truncated ({where})")
    if size > expected:
        raise _error(path, f"{path}: expected {expected} bytes, file holds {size} ({size - expected} extra): "
                           "something was appended to it")


def read_checksums(info: FeatureFileInfo) -> np.ndarray:
    """The per-block crc32 table of the file, as uint32 (num_blocks,)."""
    with open(info.path, "rb") as f:
        f.seek(info.checksum_offset)
        raw = f.read(4 * info.num_blocks)
    if len(raw) != 4 * info.num_blocks:
        raise _error(info.path, f"{info.path}: the checksum table holds {len(raw)} bytes, expected "
                                f"{4 * info.num_blocks}: the file is truncated")
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


def _check_dtype(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biufcV" or dtype.itemsize == 0:
        raise TypeError(f"feature rows must be plain numeric values, got dtype {dtype}; cast them first "
                        "(e.g. array.astype(np.float32))")
    return dtype


class FeatureWriter:
    """Stream rows into a feature file: ``append`` chunks of shape (n, *row_shape), then ``commit``.

    ``row_shape`` and ``dtype`` default to those of the first chunk; later chunks are cast to that dtype
    (same-kind casts only). Memory held: one partial block. Used as a context manager it commits on a clean
    exit and removes its temporary file if the block raises; the final path is only touched by the rename.
    """

    def __init__(self, path: str | Path, row_shape: tuple[int, ...] | None = None, dtype=None,
                 block_size: int = PAGE, meta: dict | None = None):
        if block_size <= 0 or block_size % PAGE:
            raise ValueError(f"block_size must be a positive multiple of {PAGE}, got {block_size}")
        self.path, self.block_size, self.meta = Path(path), block_size, dict(meta or {})
        self.row_shape = None if row_shape is None else tuple(int(s) for s in row_shape)
        self.dtype = None if dtype is None else _check_dtype(dtype)
        self.num_rows, self.committed = 0, False
        self._crcs = packed_array("I")  # crc32 of each block written
        self._pending = bytearray()  # bytes of the data region not yet a whole block
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}-{threading.get_native_id()}")
        self._file = open(self._tmp, "wb")
        self._file.write(bytes(PAGE))  # the header is written last, once the row count is known

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            if not self.committed:
                self.commit()
        else:
            self.abort()

    def append(self, chunk) -> None:
        """Add rows ``chunk`` (n, *row_shape) after those appended so far."""
        if self.committed or self._file.closed:
            raise RuntimeError(f"FeatureWriter for {self.path} is already committed or aborted; open a new one")
        chunk = np.asarray(chunk)
        if self.dtype is None:
            self.dtype = _check_dtype(chunk.dtype)
        if self.row_shape is None:
            self.row_shape = tuple(chunk.shape[1:])
        if chunk.ndim == 0 or tuple(chunk.shape[1:]) != self.row_shape:
            raise ValueError(f"{self.path}: chunk of shape {chunk.shape} does not hold rows of shape "
                             f"{self.row_shape}; pass an array of shape (n, *{self.row_shape})")
        if math.prod(self.row_shape) == 0:
            raise ValueError(f"{self.path}: rows of shape {self.row_shape} hold no values")
        try:
            chunk = np.ascontiguousarray(chunk.astype(self.dtype, casting="same_kind", copy=False))
        except TypeError as e:
            raise TypeError(f"{self.path}: cannot store a {chunk.dtype} chunk in a {self.dtype} file ({e}); "
                            "cast it first") from None
        self._write_data(memoryview(chunk.reshape(-1)).cast("B"))
        self.num_rows += len(chunk)

    def _write_data(self, data: memoryview) -> None:
        b = self.block_size
        if self._pending:
            take = min(b - len(self._pending), len(data))
            self._pending += data[:take]
            data = data[take:]
            if len(self._pending) < b:
                return
            self._crcs.append(zlib.crc32(self._pending))
            self._file.write(self._pending)
            self._pending = bytearray()
        whole = len(data) - len(data) % b
        self._crcs.extend(zlib.crc32(data[i : i + b]) for i in range(0, whole, b))
        self._file.write(data[:whole])
        self._pending += data[whole:]

    def commit(self) -> FeatureFileInfo:
        """Pad the last block, write the checksum table and header, fsync, rename into place."""
        if self.committed:
            raise RuntimeError(f"FeatureWriter for {self.path} is already committed")
        if self.row_shape is None or self.dtype is None:
            self.abort()
            raise ValueError(f"{self.path}: no rows appended and no row_shape/dtype given; a feature file needs "
                             "both (pass them to FeatureWriter to write an empty file)")
        try:
            if self._pending:
                self._pending += bytes(self.block_size - len(self._pending))
                self._crcs.append(zlib.crc32(self._pending))
                self._file.write(self._pending)
                self._pending = bytearray()
            self._file.write(np.frombuffer(self._crcs, dtype=np.uint32).astype("<u4").tobytes())
            self._file.seek(0)
            self._file.write(self._header())
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
            fsync_path(self.path.parent)
        except BaseException:
            self.abort()
            raise
        self.committed = True
        return open_feature_file(self.path)

    def _header(self) -> bytes:
        row_bytes = math.prod(self.row_shape) * self.dtype.itemsize
        num_blocks = len(self._crcs)
        h = {"format": FORMAT, "version": VERSION, "dtype": self.dtype.str,
             "shape": [self.num_rows, *self.row_shape], "row_bytes": row_bytes, "data_offset": PAGE,
             "data_bytes": self.num_rows * row_bytes, "block_size": self.block_size, "num_blocks": num_blocks,
             "checksum_offset": PAGE + num_blocks * self.block_size, "meta": self.meta}
        raw = json.dumps(h, separators=(",", ":")).encode()
        if len(raw) > PAGE - _PREFIX:
            raise ValueError(f"{self.path}: the header is {len(raw)} bytes, more than {PAGE - _PREFIX}; "
                             "keep meta small (store large metadata beside the file)")
        head = MAGIC + len(raw).to_bytes(4, "little") + zlib.crc32(raw).to_bytes(4, "little") + raw
        return head + bytes(PAGE - len(head))

    def abort(self) -> None:
        """Drop what was written; the final path is left as it was."""
        if not self._file.closed:
            self._file.close()
        if self._tmp.exists():
            self._tmp.unlink()


def write_features(path: str | Path, array, block_size: int = PAGE, meta: dict | None = None,
                   chunk_rows: int = 65536) -> FeatureFileInfo:
    """Write ``array`` (N, *row_shape), e.g. an ndarray or np.memmap, as the feature file ``path``, atomically.
    Copies at most ``chunk_rows`` rows at a time."""
    array = np.asarray(array) if not hasattr(array, "shape") else array
    if len(array.shape) < 1:
        raise ValueError(f"features must have a row axis, got shape {array.shape}")
    with FeatureWriter(path, tuple(array.shape[1:]), array.dtype, block_size, meta) as w:
        for start in range(0, array.shape[0], chunk_rows):
            w.append(np.asarray(array[start : start + chunk_rows]))
    return open_feature_file(path)
