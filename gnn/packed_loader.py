"""DiskGNN's online stage: the batches ``prepare_packed`` sampled (gnn/offline.py), read one pack at a time.

    loader = PackedLoader("packs/", rank, world_size)
    for mb, x in loader.epoch(epoch): ...      # the EpochLoader interface (gnn/epoch_loader.py)

Epoch ``e`` replays the batches of sampled epoch ``e % pack_epochs`` (gnn/offline.py: a pack may hold several
epochs' samples, so training sees fresh neighbourhoods until the cycle repeats) in an order shuffled by
``(seed, e)``. The cached rows are loaded into a host buffer
(pinned when CUDA is available) once; then per batch the loader makes one aligned sequential direct read of its
pack and assembles x by index from cache and pack. ``stats()`` adds ``index_bytes``: bytes of the
memory-mapped batch index (n_id, loc, seeds, edges) read, which the page cache serves or the disk reads on top
of ``bytes_read``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from plait.gnn.epoch_loader import LoaderBase, check_rank, rank_batches
from plait.gnn.link_batches import open_pair_index
from plait.gnn.pack_info import REBUILD, SMALL_INDEX, batch_crc, corrupt_pack, load_pack_info, small_index_crc
from plait.gnn.sampler import Block, MiniBatch
from plait.storage.cache import host_buffer
from plait.storage.disk_reader import DiskStore
from plait.storage.feature_file import PAGE, FeatureFileError, open_feature_file

_ORDER = 7  # stream tag of PackedLoader's epoch order
CACHE_LOAD_ROWS = 1 << 16


class PackedLoader(LoaderBase):
    """DiskGNN's online stage over a pack folder written by ``prepare_packed`` (see the module doc)."""

    _name = "packed-loader"

    def __init__(self, pack_dir, rank: int = 0, world_size: int = 1, prefetch: int = 2, verify: bool = True,
                 read_threads: int = 4):
        self.path = Path(pack_dir)
        self.info = info = load_pack_info(self.path)
        self.rank, self.world_size = int(rank), int(world_size)
        check_rank(self.rank, self.world_size, info.num_batches, f"PackedLoader({self.path})")
        self.verify = verify
        idx = {name: _load_index(self.path, name) for name in ("seeds", "n_id", "loc", *SMALL_INDEX)}
        idx["edges"] = [_load_index(self.path, f"edges_{layer}") for layer in range(info.num_layers)]
        for name in SMALL_INDEX:  # small: in RAM
            idx[name] = np.array(idx[name])
        if verify and small_index_crc(idx) != info.index_crc:
            raise corrupt_pack(self.path, f"{self.path}: the small index arrays ({', '.join(SMALL_INDEX)}) fail "
                                          f"their checksum (meta.json's index_crc {info.index_crc:08x}): the pack "
                                          "folder changed after it was written")
        self._idx = idx
        self._pairs = open_pair_index(self.path, info.total_batches, verify)  # link batches: their pairs
        try:
            self.packs = DiskStore(self.path / "packs.feat", mode="direct", threads=read_threads, verify=verify)
        except FeatureFileError as e:
            raise FeatureFileError(f"{e.problem} (part of the pack folder {self.path})", REBUILD, e.path) from None
        try:
            self._check_index(idx)
            self._load_cache(verify)
        except FeatureFileError as e:
            self.packs.close()
            raise FeatureFileError(f"{e.problem} (part of the pack folder {self.path})", REBUILD, e.path) from None
        except BaseException:
            self.packs.close()
            raise
        self.row_shape, self.dtype, self.row_bytes = self._cache_rows.shape[1:], self._cache_rows.dtype, info.row_bytes
        self._cache_t = torch.from_numpy(self._cache_rows)  # shares the (pinned) host buffer
        self._torch_dtype = self._cache_t.dtype
        self.pin = torch.cuda.is_available()
        super().__init__(prefetch, info.num_nodes)

    def _check_index(self, idx: dict) -> None:
        b, layers, info = self.info.total_batches, self.info.num_layers, self.info
        rules = [
            ("seeds_ptr", idx["seeds_ptr"].shape == (b + 1,) and idx["seeds_ptr"][-1] == len(idx["seeds"])),
            ("n_id_ptr", idx["n_id_ptr"].shape == (b + 1,) and idx["n_id_ptr"][-1] == len(idx["n_id"])
             == len(idx["loc"]) == info.rows_needed),
            ("edge_ptr", idx["edge_ptr"].shape == (b + 1, layers)
             and all(idx["edge_ptr"][-1, k] == idx["edges"][k].shape[1] for k in range(layers))),
            ("sizes", idx["sizes"].shape == (b, layers, 2)),
            ("pack_page", idx["pack_page"].shape == (b + 1,) and idx["pack_page"][-1] == self.packs.num_rows
             and self.packs.row_bytes == PAGE),
            ("pack_rows", idx["pack_rows"].shape == (b,) and int(np.sum(idx["pack_rows"])) == info.pack_rows),
            ("index_crc", idx["index_crc"].shape == (b,)),
        ]
        for name, ok in rules:
            if not ok:
                raise corrupt_pack(self.path, f"{self.path / (name + '.npy')} does not agree with meta.json and the "
                                              f"other index files ({b} batches, {layers} layers, {info.rows_needed} "
                                              f"rows, {self.packs.num_rows} pack pages)")

    def _load_cache(self, verify: bool) -> None:
        """The cached rows into a host buffer (pinned when CUDA is available), read sequentially once."""
        file = self.path / "cache.feat"
        finfo = open_feature_file(file)
        if finfo.num_rows != self.info.cached_rows or finfo.row_bytes != self.info.row_bytes:
            raise corrupt_pack(self.path, f"{file} holds {finfo.num_rows} rows of {finfo.row_bytes} bytes, meta.json "
                                          f"says {self.info.cached_rows} of {self.info.row_bytes}")
        self._cache_owner, self._cache_rows = host_buffer(finfo.num_rows, finfo.row_shape, finfo.dtype, None)
        t0 = time.perf_counter()
        self.cache_load_bytes = 0
        if finfo.num_rows:
            with DiskStore(file, mode="direct", verify=verify) as store:
                for a in range(0, finfo.num_rows, CACHE_LOAD_ROWS):
                    b = min(a + CACHE_LOAD_ROWS, finfo.num_rows)
                    self._cache_rows[a:b] = store.read_rows(a, b)
                self.cache_load_bytes = store.stats()["bytes_read"]
        self.cache_load_s = time.perf_counter() - t0

    def num_batches(self) -> int:
        return self.info.num_batches // self.world_size

    def reset_stats(self) -> None:
        super().reset_stats()
        self._t.update(rows_read=0, bytes_needed=0, host_hits=0, host_rows_read=0, index_bytes=0)
        self._bytes0 = self.packs.stats()["bytes_read"]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every batch of ``epoch`` (all ranks): those of sampled epoch ``epoch % pack_epochs``, in the order of
        ``epoch``."""
        b = self.info.num_batches
        return epoch % self.info.pack_epochs * b + np.random.default_rng([self.info.seed, epoch, _ORDER]).permutation(b)

    def rank_order(self, epoch: int) -> list[int]:
        """This rank's batches of ``epoch``, in the order ``epoch(epoch)`` yields them."""
        return rank_batches(self.epoch_order(epoch), self.rank, self.world_size)

    def _order(self, epoch: int) -> list:
        return self.rank_order(epoch)

    def touch_index(self) -> int:
        """Read every byte of the memory-mapped batch index once (so its pages are resident, e.g. to count them
        as working memory before a measurement); returns the bytes touched."""
        arrays = [a for v in self._idx.values() for a in (v if isinstance(v, list) else [v])]
        for a in arrays:
            np.asarray(a).sum()
        return sum(a.nbytes for a in arrays)

    def _produce(self, epoch: int, b: int) -> tuple[MiniBatch, torch.Tensor]:
        idx = self._idx
        t0 = time.perf_counter()
        rows = int(idx["pack_rows"][b])
        try:
            raw = self.packs.read_range(int(idx["pack_page"][b]) * PAGE, rows * self.row_bytes)
        except FeatureFileError as e:
            raise FeatureFileError(f"{e.problem} (the pack of batch {b} of the pack folder {self.path})", REBUILD,
                                   e.path) from None
        t1 = time.perf_counter()
        index = self._index(b)
        mb, loc = self._minibatch(b, index), index[2]
        x = torch.empty((len(loc), *self.row_shape), dtype=self._torch_dtype, pin_memory=self.pin)
        hit_pos, miss_pos = np.flatnonzero(loc >= 0), np.flatnonzero(loc < 0)
        if hit_pos.size:
            x.index_copy_(0, torch.from_numpy(hit_pos), self._cache_t.index_select(0, torch.from_numpy(loc[hit_pos])))
        if rows:
            pack = torch.from_numpy(raw.view(self.dtype).reshape(rows, *self.row_shape))
            order = -1 - loc[miss_pos]
            if not np.array_equal(order, np.arange(rows)):  # prepare_packed writes them in n_id order
                pack = pack[torch.from_numpy(order)]
            x.index_copy_(0, torch.from_numpy(miss_pos), pack)
        t2 = time.perf_counter()
        self._count_distinct(mb.n_id, mb.n_id[miss_pos], self.row_bytes)
        with self._lock:
            t = self._t
            t["read_s"] += t1 - t0
            t["assemble_s"] += t2 - t1
            t["rows_read"] += rows
            t["bytes_needed"] += rows * self.row_bytes
            t["host_hits"] += len(loc) - rows
            t["host_rows_read"] += len(loc)
            t["index_bytes"] += loc.nbytes * 2 + mb.seeds.nbytes + sum(4 * blk.edge_index.shape[1] * 2
                                                                       for blk in mb.blocks)
        return mb, x

    def batch(self, b: int) -> MiniBatch:
        """Batch ``b`` of the pack (seeds, n_id, blocks), without its features."""
        return self._minibatch(b, self._index(b))

    def _index(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """Batch ``b``'s entries of the memory-mapped index: seeds, n_id, loc and each layer's (2, E) edges; checked
        against index_crc.npy when verifying."""
        idx = self._idx
        s0, s1 = idx["seeds_ptr"][b], idx["seeds_ptr"][b + 1]
        n0, n1 = idx["n_id_ptr"][b], idx["n_id_ptr"][b + 1]
        seeds, n_id, loc = (np.asarray(idx[name][a:z]) for name, a, z in (("seeds", s0, s1), ("n_id", n0, n1),
                                                                          ("loc", n0, n1)))
        e0, e1 = idx["edge_ptr"][b], idx["edge_ptr"][b + 1]
        edges = [np.asarray(e[:, e0[k] : e1[k]]) for k, e in enumerate(idx["edges"])]
        if self.verify:
            got, want = batch_crc(seeds, n_id, loc, [row for e in edges for row in e]), int(idx["index_crc"][b])
            if got != want:
                raise corrupt_pack(self.path, f"{self.path}: the index entries of batch {b} (in seeds.npy, n_id.npy, "
                                              f"loc.npy, edges_*.npy) fail their checksum (crc32 {got:08x}, stored "
                                              f"{want:08x} in index_crc.npy): the pack folder changed after it was "
                                              "written")
        return seeds, n_id, loc, edges

    def _minibatch(self, b: int, index) -> MiniBatch:
        seeds, n_id, _, edges = index
        blocks = [Block(torch.from_numpy(e.astype(np.int64)), (int(size[0]), int(size[1])))
                  for e, size in zip(edges, self._idx["sizes"][b], strict=True)]
        mb = MiniBatch(np.array(seeds), np.array(n_id), blocks)
        return self._pairs.attach(b, mb) if self._pairs else mb

    def stats(self) -> dict:
        with self._lock:
            out = dict(self._t)
        out["bytes_read"] = self.packs.stats()["bytes_read"] - self._bytes0
        out["host_hit_rate"] = out["host_hits"] / out["host_rows_read"] if out["host_rows_read"] else 0.0
        out["host_capacity_rows"] = self.info.cached_rows
        return out

    def close(self) -> None:
        super().close()
        self.packs.close()


def _load_index(path: Path, name: str) -> np.ndarray:
    file = path / f"{name}.npy"
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise corrupt_pack(path, f"{file}: cannot read this index array ({type(e).__name__}: {e})") from None
