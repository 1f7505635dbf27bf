"""Read rows of a feature file by id: direct I/O from a small thread pool, buffered pread, or mmap.

    store = DiskStore(path)                  # mode="direct": O_DIRECT, aligned buffers, 4 preadv threads
    rows = store.read(np.array([7, 3, 7]))   # (3, *row_shape), in the order asked, duplicates kept
    pack = store.read_rows(1000, 2024)       # rows [1000, 2024) with one sequential aligned read
    store.stats()                            # rows_read, bytes_read (asked of the disk), reads, ios, ...
    drop_page_cache(path)                    # cold start: fsync, then POSIX_FADV_DONTNEED

``read(ids)`` sorts the distinct ids, maps each row to the 4 KiB pages holding it (whole checksum blocks
when verifying), merges rows whose pages are at most ``gap_pages`` apart into one run, and reads each run
with ``os.preadv`` into a page-aligned buffer; runs are split in pieces of at most ``max_io_bytes`` and
shared among ``threads`` threads (the caller's thread is one of them). Each block read is checked against
its crc32 when ``verify`` is set. ``bytes_read`` counts the aligned bytes asked of the disk.

Modes: "direct" opens with O_DIRECT (no page cache; what is asked is what the disk reads) and falls back
to "pread" with one warning where the filesystem refuses it (EINVAL); ``self.mode`` says which is used.
"pread" reads through the page cache with readahead off (POSIX_FADV_RANDOM): cached pages cost no disk
reads. "mmap" maps the file (``advise="random"`` sets MADV_RANDOM) and indexes it like ``np.memmap``; the
kernel decides what it reads, so its ``bytes_read`` is only the bytes of the distinct rows asked
(rows x row_bytes), a lower bound of the disk's work; it checks each block the first time a read touches it (the
mapping is the file: a block checked once stays checked for this store).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from plait.storage.feature_file import PAGE, FeatureFileError, open_feature_file, read_checksums
from plait.storage.store import check_ids

MODES = ("direct", "pread", "mmap")
ADVICE = {None: None, "normal": mmap.MADV_NORMAL, "random": mmap.MADV_RANDOM,
          "sequential": mmap.MADV_SEQUENTIAL, "willneed": mmap.MADV_WILLNEED}


def drop_page_cache(path: str | Path) -> None:
    """Write back and evict ``path`` from the page cache (pages still mapped by a live mmap stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def process_read_bytes(pid: int | str = "self") -> int | None:
    """read_bytes of /proc/<pid>/io: the bytes the process made the block layer read (page-cache hits are not
    counted); None where the kernel does not say (no /proc, or not allowed)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))
    except (OSError, StopIteration, ValueError):
        return None


def aligned_empty(nbytes: int, align: int = PAGE) -> np.ndarray:
    """An uninitialised uint8 array of ``nbytes`` whose first byte sits on an ``align`` boundary."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    skip = (-raw.ctypes.data) % align
    return raw[skip : skip + nbytes]


def plan_runs(starts: np.ndarray, length: int, unit: int, gap_units: int):
    """Coalesce rows at ascending byte offsets ``starts`` (each ``length`` bytes) into aligned runs.

    Returns (run_lo, run_len, buf_off, row_pos): run byte ranges aligned to ``unit``, where each run lands
    in one buffer holding all runs back to back, and where each row sits in that buffer. Rows whose units
    are at most ``gap_units`` apart share a run (the gap is read and thrown away)."""
    lo = starts // unit
    hi = (starts + length - 1) // unit + 1  # ascending too: rows have one length
    brk = np.ones(len(starts), dtype=bool)
    brk[1:] = lo[1:] - hi[:-1] > gap_units
    first = np.flatnonzero(brk)
    last = np.append(first[1:], len(starts)) - 1
    run_lo, run_len = lo[first] * unit, (hi[last] - lo[first]) * unit
    buf_off = np.cumsum(run_len) - run_len
    run_of = np.cumsum(brk) - 1
    return run_lo, run_len, buf_off, buf_off[run_of] + starts - run_lo[run_of]


def _pieces(run_lo, run_len, buf_off, max_io: int):
    """Split runs into reads of at most ``max_io`` bytes: (offset, buffer offset, nbytes) arrays."""
    k = -(-run_len // max_io)
    which = np.repeat(np.arange(len(run_len)), k)
    step = (np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)) * max_io
    return run_lo[which] + step, buf_off[which] + step, np.minimum(max_io, run_len[which] - step)


def _gather(buf: np.ndarray, pos: np.ndarray, row_bytes: int) -> np.ndarray:
    """Rows of ``row_bytes`` bytes starting at byte positions ``pos`` of ``buf``, as one void array."""
    view = np.ndarray((buf.size - row_bytes + 1,), dtype=np.dtype((np.void, row_bytes)), buffer=buf,
                      strides=(1,))
    return view[pos]


class DiskStore:
    """A feature file as a RowStore (see the module doc). Thread-safe: read() may run on several threads."""

    def __init__(self, path: str | Path, mode: str = "direct", threads: int = 4, verify: bool = True,
                 advise: str | None = None, gap_pages: int = 1, max_io_bytes: int = 1 << 20):
        if mode not in MODES:
            raise ValueError(f"DiskStore mode must be one of {MODES}, got {mode!r}")
        if advise not in ADVICE:
            raise ValueError(f"advise must be one of {list(ADVICE)}, got {advise!r}")
        if threads < 1 or gap_pages < 0:
            raise ValueError(f"threads must be >= 1 and gap_pages >= 0, got {threads} and {gap_pages}")
        self.info = info = open_feature_file(path)
        self.path, self.num_rows, self.row_shape = info.path, info.num_rows, info.row_shape
        self.dtype, self.row_bytes, self.verify = info.dtype, info.row_bytes, verify
        self.requested_mode, self.mode, self.threads, self.advise = mode, mode, threads, advise
        self.gap_pages = gap_pages
        self.unit = info.block_size if verify else PAGE  # reads cover whole blocks when they are checked
        self.gap_units = -(-gap_pages * PAGE // self.unit)
        self.max_io = max(self.unit, max_io_bytes // self.unit * self.unit)
        self._sums = read_checksums(info).tolist() if verify else None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._old_fds: list[int] = []
        self.rows_read = self.bytes_read = self.reads = self.ios = self.blocks_verified = 0
        self._mm = None
        if mode == "direct":
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except (OSError, AttributeError) as e:  # AttributeError: no O_DIRECT on this platform
                self._fd = self._fall_back(e)
        else:
            self._fd = os.open(self.path, os.O_RDONLY)
        if mode == "pread":
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        if mode == "mmap":
            self._mm = mmap.mmap(self._fd, info.file_bytes, access=mmap.ACCESS_READ)
            if ADVICE[advise] is not None:
                self._mm.madvise(ADVICE[advise])
            self._bytes = np.frombuffer(self._mm, dtype=np.uint8)
            self._view = memoryview(self._mm)
            self._rows = np.ndarray((self.num_rows,), dtype=np.dtype((np.void, self.row_bytes)), buffer=self._mm,
                                    offset=info.data_offset)
            self._checked = np.zeros(info.num_blocks if verify else 0, dtype=bool)  # blocks already checked

    def __reduce__(self):  # pickles as its arguments; the copy opens the file again
        return DiskStore, (self.path, self.requested_mode, self.threads, self.verify, self.advise,
                           self.gap_pages, self.max_io)

    def __repr__(self) -> str:
        return f"DiskStore({str(self.path)!r}, mode={self.mode!r}, rows={self.num_rows}, row_shape={self.row_shape})"

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fall_back(self, err: BaseException) -> int:
        """Switch to buffered preads (once) and return the new descriptor."""
        warnings.warn(f"{self.path}: the filesystem refuses direct I/O ({err}); DiskStore reads it through the "
                      "page cache (mode 'pread') instead, so bytes_read may differ from what the disk reads",
                      RuntimeWarning, stacklevel=3)
        fd = os.open(self.path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.mode = "pread"
        return fd

    def stats(self) -> dict[str, int]:
        return {"rows_read": self.rows_read, "bytes_read": self.bytes_read, "reads": self.reads, "ios": self.ios,
                "blocks_verified": self.blocks_verified}

    def read(self, ids) -> np.ndarray:
        """Rows ``ids`` in the order asked (duplicates kept), as a fresh (len(ids), *row_shape) array."""
        ids = check_ids(ids, self.num_rows, f"DiskStore.read({self.path})")
        if ids.size == 0:
            return np.empty((0, *self.row_shape), dtype=self.dtype)
        if self.mode == "mmap":
            return self._read_mmap(ids)
        uniq, inverse = np.unique(ids, return_inverse=True)
        run_lo, run_len, buf_off, row_pos = plan_runs(uniq * self.row_bytes, self.row_bytes, self.unit,
                                                      self.gap_units)
        buf = aligned_empty(int(run_len.sum()))
        self._read_runs(buf, run_lo, run_len, buf_off)
        with self._lock:
            self.rows_read += int(ids.size)
            self.reads += 1
        return self._as_rows(_gather(buf, row_pos[inverse], self.row_bytes))

    def read_range(self, offset: int, nbytes: int) -> np.ndarray:
        """Bytes [offset, offset + nbytes) of the data region (row r starts at r * row_bytes) as a uint8
        array, read with one aligned sequential read (split among the threads when large)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.info.data_bytes:
            raise IndexError(f"DiskStore.read_range({self.path}): bytes [{offset}, {offset + nbytes}) are outside "
                             f"the data region [0, {self.info.data_bytes})")
        if nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        if self.mode == "mmap":
            start = self.info.data_offset + offset
            self._verify_mmap(offset // self.info.block_size, (offset + nbytes - 1) // self.info.block_size)
            with self._lock:
                self.bytes_read += nbytes
                self.reads += 1
            return self._bytes[start : start + nbytes].copy()
        lo, hi = offset // self.unit * self.unit, -(-(offset + nbytes) // self.unit) * self.unit
        buf = aligned_empty(hi - lo)
        self._read_runs(buf, np.array([lo]), np.array([hi - lo]), np.array([0]))
        with self._lock:
            self.reads += 1
        return buf[offset - lo : offset - lo + nbytes]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) with one sequential read: a (stop - start, *row_shape) array."""
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"DiskStore.read_rows({self.path}): rows [{start}, {stop}) are outside [0, "
                             f"{self.num_rows})")
        data = self.read_range(start * self.row_bytes, (stop - start) * self.row_bytes)
        with self._lock:
            self.rows_read += stop - start
        return self._as_rows(data)

    def _as_rows(self, data: np.ndarray) -> np.ndarray:
        return data.view(self.dtype).reshape(-1, *self.row_shape)

    def _read_runs(self, buf, run_lo, run_len, buf_off) -> None:
        """Read data-region runs into ``buf`` on up to ``threads`` threads; verify blocks; count bytes."""
        offs, boffs, sizes = _pieces(run_lo, run_len, buf_off, self.max_io)
        n = min(self.threads, len(sizes))
        cut = np.linspace(0, len(sizes), n + 1).astype(int)
        parts = [(offs[a:b], boffs[a:b], sizes[a:b]) for a, b in zip(cut[:-1], cut[1:], strict=True)]
        futures = []
        if n > 1:
            if self._pool is None:
                with self._lock:
                    self._pool = self._pool or ThreadPoolExecutor(self.threads - 1, thread_name_prefix="plait-disk")
            futures = [self._pool.submit(self._read_pieces, buf, *p) for p in parts[1:]]
        try:
            verified = self._read_pieces(buf, *parts[0])
        finally:
            wait(futures)
        verified += sum(f.result() for f in futures)
        with self._lock:
            self.bytes_read += int(run_len.sum())
            self.ios += len(sizes)
            self.blocks_verified += verified

    def _read_pieces(self, buf: np.ndarray, offs, boffs, sizes) -> int:
        base, b, sums, verified = self.info.data_offset, self.info.block_size, self._sums, 0
        whole, crc32 = memoryview(buf), zlib.crc32
        for off, boff, size in zip(offs.tolist(), boffs.tolist(), sizes.tolist(), strict=True):
            view = whole[boff : boff + size]
            self._pread_into(view, base + off)
            if sums is not None:
                got, want = [crc32(view[i : i + b]) for i in range(0, size, b)], sums[off // b : (off + size) // b]
                if got != want:
                    i = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
                    self._raise_bad_block(off // b + i, got[i], want[i])
                verified += len(got)
        return verified

    def _pread_into(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            fd, mode = self._fd, self.mode
            try:
                got = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL or mode != "direct":
                    raise
                with self._lock:
                    if self.mode == "direct":  # the first thread to see it switches; the others retry
                        self._old_fds.append(self._fd)
                        self._fd = self._fall_back(e)
                continue
            if got == 0:
                raise FeatureFileError(f"{self.path}: reading byte {offset + done} returned nothing: the file was "
                                       "truncated after it was opened", "rewrite it with write_features", self.path)
            done += got

    def _raise_bad_block(self, block: int, got: int, want: int) -> None:
        start = self.info.data_offset + block * self.info.block_size
        raise FeatureFileError(f"{self.path}: data block {block} (file bytes {start} to "
                               f"{start + self.info.block_size}) fails its checksum (crc32 {got:08x}, stored "
                               f"{want:08x}): the file changed after it was written", "rewrite it with write_features",
                               self.path)

    def _read_mmap(self, ids: np.ndarray) -> np.ndarray:
        uniq = np.unique(ids)
        if self._sums is not None:
            b = self.info.block_size
            first, last = uniq * self.row_bytes // b, ((uniq + 1) * self.row_bytes - 1) // b
            counts = last - first + 1
            blocks = np.repeat(first, counts) + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts,
                                                                                         counts)
            self._verify_blocks(np.unique(blocks))
        out = self._rows[ids]
        with self._lock:
            self.rows_read += int(ids.size)
            self.bytes_read += int(uniq.size) * self.row_bytes
            self.reads += 1
        return self._as_rows(out)

    def _verify_mmap(self, first: int, last: int) -> None:
        if self._sums is not None:
            self._verify_blocks(np.arange(first, last + 1))

    def _verify_blocks(self, blocks: np.ndarray) -> None:
        """Mode "mmap": check the blocks not checked before (the mapping is the file, so once is enough)."""
        blocks = blocks[~self._checked[blocks]]
        if not blocks.size:
            return
        b, base, data, crc32 = self.info.block_size, self.info.data_offset, self._view, zlib.crc32
        starts = (base + blocks * b).tolist()
        got, want = [crc32(data[i : i + b]) for i in starts], [self._sums[k] for k in blocks.tolist()]
        if got != want:
            i = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
            self._raise_bad_block(int(blocks[i]), got[i], want[i])
        self._checked[blocks] = True
        with self._lock:
            self.blocks_verified += len(blocks)

    def release_mapped_pages(self) -> None:
        """Mode "mmap": unmap the file's pages from this process (MADV_DONTNEED), so that drop_page_cache can
        evict them; the next read faults them in again. Other modes map nothing: a no-op."""
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED)

    def __del__(self) -> None:  # a store dropped without close(): its reader threads and descriptors go with it
        try:
            pool, self._pool = getattr(self, "_pool", None), None
            if pool is not None:
                pool.shutdown(wait=False)  # never join from a finalizer (it may run on any thread)
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown or a half-built store: nothing left to release
            pass

    def close(self) -> None:
        """Release the threads, descriptors and mapping; the store cannot read afterwards."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._mm is not None:
            self._view.release()
            del self._rows, self._bytes, self._view
            self._mm.close()
            self._mm = None
        for fd in [self._fd, *self._old_fds]:
            if fd >= 0:
                os.close(fd)
        self._fd, self._old_fds = -1, []
