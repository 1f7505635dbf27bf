"""DiskGNN's offline stage: sample E epochs of mini-batches, cache the hottest rows, pack the rest per batch.

    info = prepare_packed(graph, "features.bin", split.train, fanouts=[10, 10], batch_size=1024, seed=0,
                          cache_rows=200_000, out_dir="packs/", epochs=4)  # -> PackInfo (blowup, preprocess_s, ...)
    loader = PackedLoader("packs/")                                  # gnn/packed_loader.py: the online stage

``epochs`` (E, default 1) distinct epochs are sampled: sampled epoch s splits the train ids as online sampling's
epoch s does (``batch_seeds(train_ids, batch_size, seed, s)``) and samples its batch i with ``batch_rng(seed, s,
i)``, so training epoch e, which replays sampled epoch e mod E (in an order shuffled by e), sees the very batches
online sampling would while e < E; the packs take E times the disk space of one epoch's. Batch i of sampled
epoch s is stored as batch s * B + i (B = num_batches, the batches of one epoch). Pass 1 samples the E epochs and
counts how many batches ask for each row; the host cache is the ``cache_rows`` most-asked rows over all E epochs
(rows never asked are not cached). Pass 2
samples the same batches again (deterministic, so nothing from pass 1 but the counts and sizes is kept) a group at
a time: the group's distinct non-cached rows are read from the feature file in one sorted, coalesced read, and each
batch's non-cached rows are written, in ``n_id`` order, as one contiguous pack starting on a 4 KiB page, so the
loader reads a batch with one aligned sequential direct read. Memory: O(num_nodes) for the counts plus about
``memory_bytes`` of rows and one group of batches.

A pack folder (written beside ``out_dir`` and renamed in; only a pack folder is ever replaced) holds:
  meta.json      format, version, sampling arguments, sizes, figures (preprocess_s, pack_bytes, blowup, ...)
  cache.feat     the cached rows (a feature file; slot s holds row cache_ids[s]); cache_ids.npy (int64)
  packs.feat     the packs: a feature file of 4 KiB uint8 rows (pages), per-block crc32 checked on read
  seeds.npy / seeds_ptr.npy          batch b's seeds are seeds[seeds_ptr[b]:seeds_ptr[b + 1]]
  n_id.npy / n_id_ptr.npy            its input nodes, likewise
  loc.npy                            per n_id position: cache slot (>= 0) or -(1 + row in the batch's pack)
  edges_<l>.npy / edge_ptr.npy       layer l's edge_index (2, E) int32; batch b: [:, edge_ptr[b, l]:edge_ptr[b + 1, l]]
  sizes.npy                          (B, L, 2) int64: each block's (num_src, num_dst)
  pack_page.npy / pack_rows.npy      batch b's pack: pages [pack_page[b], pack_page[b + 1]) holding pack_rows[b] rows
  index_crc.npy                      uint32 (B,): crc32 of batch b's seeds, n_id, loc and edges (pack_info.batch_crc)
Arrays are plain .npy files (``np.load(allow_pickle=False)``); the loader memory-maps them. meta.json's
``index_crc`` covers the small ones (pack_info.SMALL_INDEX), which the loader holds in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from pathlib import Path

import numpy as np
from plait.gnn.graph import CSCGraph
from plait.gnn.link_batches import write_pair_index
from plait.gnn.pack_info import (  # noqa: F401  (re-exported: the pack API in one import)
    FORMAT,
    SMALL_INDEX,
    VERSION,
    CorruptPackError,
    NotAPackError,
    PackInfo,
    batch_crc,
    info_from_meta,
    is_pack_folder,
    load_pack_info,
    pack_info_dict,
    small_index_crc,
)
from plait.gnn.sampler import MiniBatch, NeighborSampler, batch_rng, batch_seeds
from plait.storage.cache_policy import top_k_ids
from plait.storage.disk_reader import DiskStore
from plait.storage.feature_file import PAGE, FeatureWriter, open_feature_file, read_checksums
from plait.storage.folders import dataset_lock, read_meta, write_atomic, write_folder

READ_CHUNK_IDS = 1 << 13  # distinct rows per read of the feature file while packing (its buffer: <= 8 KiB a row)


def prepare_packed(graph, features_path, train_ids, fanouts, batch_size: int, seed: int, cache_rows: int,
                   out_dir, world_size: int = 1, memory_bytes: int = 256 << 20, read_mode: str = "direct",
                   reuse: bool = False, epochs: int = 1, link=None) -> PackInfo:
    """Sample ``epochs`` epochs of batches over ``train_ids``, cache the ``cache_rows`` most-asked rows and pack the
    rest per batch into the pack folder ``out_dir`` (see the module doc). ``graph``: a CSCGraph or a graph
    folder; ``features_path``: a feature file. ``memory_bytes`` bounds the rows held while packing; the
    feature file is read with a ``DiskStore`` in ``read_mode``. ``reuse=True`` returns the pack already at
    ``out_dir`` when it was made from the same graph, features (checksums), train ids and arguments. ``link``: a
    LinkPlan (gnn/link_batches.py) whose link batches (each sampled epoch's own negatives) are packed instead,
    their pairs in the index."""
    start = time.perf_counter()
    graph = graph if isinstance(graph, CSCGraph) else CSCGraph.load(graph)
    world_size, cache_rows, epochs = int(world_size), int(cache_rows), int(epochs)
    if cache_rows < 0 or world_size < 1 or memory_bytes < 1 or epochs < 1:
        raise ValueError(f"need cache_rows >= 0, world_size >= 1, memory_bytes >= 1 and epochs >= 1, got "
                         f"{cache_rows}, {world_size}, {memory_bytes} and {epochs}")
    finfo = open_feature_file(features_path)
    if finfo.num_rows != graph.num_nodes:
        raise ValueError(f"{finfo.path} holds {finfo.num_rows} rows but the graph has {graph.num_nodes} nodes; "
                         "pass the feature file of this graph")
    sampler = NeighborSampler(graph, fanouts)
    key = _pack_key(graph, finfo, [] if link else train_ids, sampler.fanouts, batch_size, seed, cache_rows,
                    world_size, epochs, link.key() if link else None)
    if reuse and is_pack_folder(Path(out_dir)):
        meta = read_meta(Path(out_dir))
        if meta.get("version") == VERSION and meta.get("key") == key:
            return info_from_meta(Path(out_dir), meta)
    if link:  # batch e * B + i: epoch e's link batch i (its negatives drawn for that epoch)
        seeds = [link.seeds(e, i) for e in range(epochs) for i in range(link.num_batches)]
    else:
        seeds = [s for e in range(epochs) for s in batch_seeds(train_ids, batch_size, seed, e)]  # batch e * B + i
    per_epoch = len(seeds) // epochs
    if per_epoch < world_size:
        what = "link batches" if link else f"batches (train ids {len(np.asarray(train_ids))}"
        raise ValueError(f"{per_epoch} {what}, batch_size {batch_size}{'' if link else ')'} "
                         f"cannot give each of {world_size} ranks one; use a smaller batch_size or fewer ranks")
    t = {"sample": 0.0, "read": 0.0, "write": 0.0}

    def sample(i: int) -> MiniBatch:
        t0 = time.perf_counter()
        e, j = divmod(i, per_epoch)
        mb = link.sample(e, j) if link else sampler.sample(seeds[i], batch_rng(seed, e, j))
        t["sample"] += time.perf_counter() - t0
        return mb

    counts = np.zeros(graph.num_nodes, dtype=np.int64)
    layers = len(sampler.fanouts)
    n_len = np.zeros(len(seeds), dtype=np.int64)
    e_len = np.zeros((len(seeds), layers), dtype=np.int64)
    sizes = np.zeros((len(seeds), layers, 2), dtype=np.int64)
    seen, distinct_rows = np.zeros(graph.num_nodes, dtype=bool), []  # rows each sampled epoch asks for
    for i in range(len(seeds)):  # pass 1: counts and sizes
        mb = sample(i)
        counts[mb.n_id] += 1  # n_id holds distinct ids
        seen[mb.n_id] = True
        if (i + 1) % per_epoch == 0:
            distinct_rows.append(int(np.count_nonzero(seen)))
            seen[:] = False
        n_len[i] = len(mb.n_id)
        e_len[i] = [b.edge_index.shape[1] for b in mb.blocks]
        sizes[i] = [b.size for b in mb.blocks]
    cache_ids = np.sort(top_k_ids(counts, min(cache_rows, int(np.count_nonzero(counts)))))
    miss_share = 1 - counts[cache_ids].sum() / max(1, int(n_len.sum()))  # of the rows asked, the packed share
    slot_of = np.full(graph.num_nodes, -1, dtype=np.int64)
    slot_of[cache_ids] = np.arange(len(cache_ids))
    del counts

    def build(tmp: Path) -> None:
        src = DiskStore(finfo.path, mode=read_mode)
        try:
            _write_cache(tmp, src, cache_ids, t)
            budget = int(memory_bytes / max(miss_share, 1e-3))  # groups hold ~memory_bytes of packed rows
            pages, pack_rows, distinct_pack_rows = _write_packs_and_index(tmp, src, sample, seeds, per_epoch, slot_of,
                                                                          n_len, e_len, sizes, budget, t, seen)
        finally:
            src.close()
        meta = {"format": FORMAT, "version": VERSION, "key": key, "num_batches": per_epoch, "pack_epochs": epochs,
                "world_size": world_size, "batches_per_rank": per_epoch // world_size, "num_layers": layers,
                "fanouts": sampler.fanouts,
                "batch_size": int(batch_size), "seed": int(seed), "num_nodes": graph.num_nodes,
                "num_train": int(sum(len(s) for s in seeds[:per_epoch])), "features": str(finfo.path),
                "row_shape": list(finfo.row_shape), "dtype": finfo.dtype.str, "row_bytes": finfo.row_bytes,
                "cache_rows": cache_rows, "cached_rows": len(cache_ids), "rows_needed": int(n_len.sum()),
                "distinct_rows": distinct_rows, "distinct_pack_rows": distinct_pack_rows,
                "pack_rows": pack_rows, "feature_bytes": finfo.data_bytes, "pack_bytes": pages * PAGE,
                "cache_bytes": len(cache_ids) * finfo.row_bytes,
                "blowup": pages * PAGE / finfo.data_bytes if finfo.data_bytes else 0.0,
                "sample_s": t["sample"], "read_s": t["read"], "write_s": t["write"],
                "preprocess_s": time.perf_counter() - start,
                "index_crc": small_index_crc({name: np.load(tmp / f"{name}.npy") for name in SMALL_INDEX})}
        if link:
            meta["link"] = write_pair_index(tmp, link, epochs)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    out_dir = Path(out_dir)
    write_folder(out_dir, build, is_pack_folder, "pack")
    with dataset_lock(out_dir):  # preprocess_s with the fsyncs and the rename, committed like the rest
        meta = read_meta(out_dir)
        meta["preprocess_s"] = time.perf_counter() - start
        write_atomic(out_dir / "meta.json", json.dumps(meta, indent=1))
    return info_from_meta(out_dir, meta)


def _pack_key(graph: CSCGraph, finfo, train_ids, fanouts, batch_size, seed, cache_rows, world_size, epochs,
              link=None) -> dict:
    """What a pack is made from: a pack with the same key can be reused."""
    train = np.ascontiguousarray(np.asarray(train_ids, dtype=np.int64))
    return {"features": str(finfo.path), "features_crc": zlib.crc32(read_checksums(finfo).tobytes()),
            "graph_nodes": graph.num_nodes, "graph_edges": graph.num_edges,
            "graph_crc": zlib.crc32(np.asarray(graph.indptr[:: max(1, graph.num_nodes // 4096)]).tobytes()),
            "train_sha256": hashlib.sha256(train.tobytes()).hexdigest(), "fanouts": list(fanouts),
            "batch_size": int(batch_size), "seed": int(seed), "cache_rows": int(cache_rows),
            "world_size": int(world_size), "pack_epochs": int(epochs), **({"link": link} if link else {})}


def _read_rows(src: DiskStore, ids: np.ndarray, t: dict) -> np.ndarray:
    """Rows ``ids`` (sorted, distinct) as an (n, row_bytes) uint8 array, read READ_CHUNK_IDS ids at a time."""
    out = np.empty((len(ids), src.row_bytes), dtype=np.uint8)
    t0 = time.perf_counter()
    for a in range(0, len(ids), READ_CHUNK_IDS):
        chunk = ids[a : a + READ_CHUNK_IDS]
        out[a : a + len(chunk)] = src.read(chunk).reshape(len(chunk), -1).view(np.uint8)
    t["read"] += time.perf_counter() - t0
    return out


def _write_cache(tmp: Path, src: DiskStore, cache_ids: np.ndarray, t: dict) -> None:
    _save(tmp / "cache_ids.npy", cache_ids)
    with FeatureWriter(tmp / "cache.feat", src.row_shape, src.dtype, meta={"what": "pack host cache"}) as w:
        for a in range(0, len(cache_ids), READ_CHUNK_IDS):
            rows = _read_rows(src, cache_ids[a : a + READ_CHUNK_IDS], t)
            t0 = time.perf_counter()
            w.append(rows.view(src.dtype).reshape(len(rows), *src.row_shape))
            t["write"] += time.perf_counter() - t0


def _write_packs_and_index(tmp: Path, src: DiskStore, sample, seeds, per_epoch: int, slot_of, n_len, e_len, sizes,
                           memory_bytes: int, t: dict, seen: np.ndarray) -> tuple[int, int, list[int]]:
    """Pass 2: resample the batches a group at a time, write their packs and index arrays; returns the pages
    and rows written to packs, and each sampled epoch's distinct packed rows (``seen``: a cleared bitmap)."""
    nb, layers = e_len.shape
    seeds_ptr = np.r_[0, np.cumsum([len(s) for s in seeds])]
    n_ptr, e_ptr = np.r_[0, np.cumsum(n_len)], np.vstack([np.zeros((1, layers), np.int64), np.cumsum(e_len, 0)])
    _save(tmp / "seeds_ptr.npy", seeds_ptr)
    _save(tmp / "n_id_ptr.npy", n_ptr)
    _save(tmp / "edge_ptr.npy", e_ptr)
    _save(tmp / "sizes.npy", sizes)
    mm = {"seeds": _open(tmp / "seeds.npy", np.int64, (int(seeds_ptr[-1]),)),
          "n_id": _open(tmp / "n_id.npy", np.int64, (int(n_ptr[-1]),)),
          "loc": _open(tmp / "loc.npy", np.int64, (int(n_ptr[-1]),))}
    edges = [_open(tmp / f"edges_{layer}.npy", np.int32, (2, int(e_ptr[-1, layer]))) for layer in range(layers)]
    pack_page, pack_rows = np.zeros(nb + 1, dtype=np.int64), np.zeros(nb, dtype=np.int64)
    index_crc = np.zeros(nb, dtype=np.uint32)
    row_bytes, distinct_pack_rows = src.row_bytes, []
    groups = _groups(n_len * row_bytes, memory_bytes)
    with FeatureWriter(tmp / "packs.feat", (PAGE,), np.uint8, meta={"what": "per-batch packs"}) as w:
        for group in groups:
            batches, wanted = [], []
            for i in group:
                mb = sample(i)
                if len(mb.n_id) != n_len[i]:
                    raise RuntimeError(f"batch {i} resampled to {len(mb.n_id)} nodes, first sampled {n_len[i]}: "
                                       "sampling is not deterministic; report this as a bug")
                loc = slot_of[mb.n_id]
                miss = np.flatnonzero(loc < 0)
                loc[miss] = -1 - np.arange(len(miss))
                batches.append((i, mb, loc, mb.n_id[miss]))
                wanted.append(mb.n_id[miss])
                seen[mb.n_id[miss]] = True
                if (i + 1) % per_epoch == 0:
                    distinct_pack_rows.append(int(np.count_nonzero(seen)))
                    seen[:] = False
            uniq = np.unique(np.concatenate(wanted)) if wanted else np.empty(0, np.int64)
            rows = _read_rows(src, uniq, t)
            t0 = time.perf_counter()
            for i, mb, loc, ids in batches:
                mm["seeds"][seeds_ptr[i] : seeds_ptr[i + 1]] = mb.seeds
                mm["n_id"][n_ptr[i] : n_ptr[i + 1]] = mb.n_id
                mm["loc"][n_ptr[i] : n_ptr[i + 1]] = loc
                for layer, block in enumerate(mb.blocks):
                    edges[layer][:, e_ptr[i, layer] : e_ptr[i + 1, layer]] = block.edge_index.numpy()
                s0, s1, n0, n1 = seeds_ptr[i], seeds_ptr[i + 1], n_ptr[i], n_ptr[i + 1]
                edge_rows = [row for k, e in enumerate(edges) for row in e[:, e_ptr[i, k] : e_ptr[i + 1, k]]]
                index_crc[i] = batch_crc(mm["seeds"][s0:s1], mm["n_id"][n0:n1], mm["loc"][n0:n1], edge_rows)
                pages = -(-len(ids) * row_bytes // PAGE)
                if pages:
                    buf = np.zeros(pages * PAGE, dtype=np.uint8)
                    buf[: len(ids) * row_bytes] = rows[np.searchsorted(uniq, ids)].ravel()
                    w.append(buf.reshape(pages, PAGE))
                pack_rows[i], pack_page[i + 1] = len(ids), pack_page[i] + pages
            t["write"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    for a in [*mm.values(), *edges]:
        if isinstance(a, np.memmap):
            a.flush()
    del mm, edges
    _save(tmp / "pack_page.npy", pack_page)
    _save(tmp / "pack_rows.npy", pack_rows)
    _save(tmp / "index_crc.npy", index_crc)
    t["write"] += time.perf_counter() - t0
    return int(pack_page[-1]), int(pack_rows.sum()), distinct_pack_rows


def _groups(batch_bytes: np.ndarray, budget: int) -> list[list[int]]:
    """Consecutive batches whose rows together stay within ``budget`` bytes (at least one batch each)."""
    groups, cur, used = [], [], 0
    for i, b in enumerate(batch_bytes.tolist()):
        if cur and used + b > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += b
    return groups + ([cur] if cur else [])


def _save(file: Path, array: np.ndarray) -> None:
    with open(file, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _open(file: Path, dtype, shape) -> np.ndarray:
    """A new .npy file of ``shape`` to fill in place (memory-mapped; an empty one is written at once)."""
    if 0 in shape:
        empty = np.empty(shape, dtype=dtype)
        _save(file, empty)
        return empty
    return np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
