"""A pack folder's description: its format, its figures (PackInfo) and how to tell one from any other folder.

    info = load_pack_info("packs/")      # -> PackInfo: num_batches, cached_rows, blowup, preprocess_s, ...
    pack_info_dict(info)                 # JSON-ready, for metrics and benchmark lines

prepare_packed (gnn/offline.py) writes pack folders; PackedLoader (gnn/packed_loader.py) reads them.

A pack checks itself: packs.feat and cache.feat are feature files (a crc32 per 4 KiB block, checked as blocks are
read); index_crc.npy holds a crc32 of each batch's index entries (``batch_crc``: its seeds, n_id, loc and
edges, checked as the batch is read), and meta.json's ``index_crc`` one of the small index arrays
(``SMALL_INDEX``, checked when a loader opens the folder).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from plait.storage.errors import ProblemAndFix
from plait.storage.folders import ForeignFolderError, read_meta

FORMAT = "plait-gnn-pack"
VERSION = 2  # 2: index checksums (index_crc.npy, meta.json's index_crc)
REBUILD = "run prepare_packed again to rebuild it"
SMALL_INDEX = ("seeds_ptr", "n_id_ptr", "edge_ptr", "sizes", "pack_page", "pack_rows", "index_crc")  # held in RAM

NotAPackError = ForeignFolderError  # a path that is not a pack folder written here


class CorruptPackError(ProblemAndFix, RuntimeError):
    """A pack folder is incomplete, inconsistent or altered: ``CorruptPackError(problem, fix, folder)``."""


def corrupt_pack(folder: Path, problem: str) -> CorruptPackError:
    return CorruptPackError(problem, REBUILD, folder)


def batch_crc(seeds: np.ndarray, n_id: np.ndarray, loc: np.ndarray, edge_rows: list[np.ndarray]) -> int:
    """crc32 of one batch's index entries, as stored: seeds, n_id, loc, then each layer's source and target row."""
    crc = 0
    for a in (seeds, n_id, loc, *edge_rows):
        crc = zlib.crc32(np.ascontiguousarray(a), crc)
    return crc


def small_index_crc(arrays: dict[str, np.ndarray]) -> int:
    """crc32 of the SMALL_INDEX arrays, in that order."""
    crc = 0
    for name in SMALL_INDEX:
        crc = zlib.crc32(np.ascontiguousarray(arrays[name]), crc)
    return crc


@dataclass(frozen=True)
class PackInfo:
    path: Path
    num_batches: int  # batches in one epoch (all ranks); the folder holds pack_epochs x num_batches
    world_size: int
    batches_per_rank: int  # num_batches // world_size: every rank steps this many times per epoch
    num_layers: int
    seed: int  # sampling seed; also orders the batches of each epoch
    batch_size: int
    cache_rows: int  # asked for
    cached_rows: int  # held (<= cache_rows: rows no batch asks for are not cached)
    rows_needed: int  # sum over all stored batches of len(n_id)
    pack_rows: int  # rows written to packs (the non-cached part of rows_needed)
    row_bytes: int
    feature_bytes: int  # the feature file's data bytes (num_rows x row_bytes)
    pack_bytes: int  # packs.feat data bytes (page-padded packs)
    cache_bytes: int  # cache.feat data bytes
    blowup: float  # pack_bytes / feature_bytes: the disk space packing costs (all pack_epochs together)
    preprocess_s: float  # wall time of prepare_packed
    sample_s: float  # of which sampling (both passes)
    read_s: float  # of which reading feature rows
    write_s: float  # of which writing packs, cache and index
    index_crc: int  # small_index_crc of the folder's SMALL_INDEX arrays
    num_nodes: int  # rows of the feature file the pack was made from
    pack_epochs: int = 1  # sampled epochs held: training epoch e replays sampled epoch e % pack_epochs
    distinct_rows: tuple[int, ...] = ()  # per sampled epoch: distinct rows its batches ask for
    distinct_pack_rows: tuple[int, ...] = ()  # per sampled epoch: of those, the rows not in the host cache

    @property
    def total_batches(self) -> int:
        """Batches stored: pack_epochs x num_batches (batch i of sampled epoch s is s * num_batches + i)."""
        return self.pack_epochs * self.num_batches

    @property
    def cache_hit_rate(self) -> float:
        """Share of the rows an epoch needs that the host cache serves."""
        return 1 - self.pack_rows / self.rows_needed if self.rows_needed else 0.0


def is_pack_folder(path: Path) -> bool:
    meta = read_meta(path)
    return meta is not None and meta.get("format") == FORMAT


def load_pack_info(pack_dir) -> PackInfo:
    """The PackInfo of an existing pack folder (raises NotAPackError for anything else)."""
    pack_dir = Path(pack_dir)
    meta = read_meta(pack_dir)
    if meta is None or meta.get("format") != FORMAT:
        what = "has no readable meta.json" if meta is None else f"holds format {meta.get('format')!r}"
        raise NotAPackError(f"{pack_dir} is not a pack folder written by prepare_packed ({what}); pass the "
                            "out_dir of prepare_packed")
    if meta.get("version") != VERSION:
        raise corrupt_pack(pack_dir, f"{pack_dir / 'meta.json'}: pack version {meta.get('version')!r}, this code "
                                     f"reads version {VERSION}")
    return info_from_meta(pack_dir, meta)


def info_from_meta(path: Path, meta: dict) -> PackInfo:
    """The PackInfo that a pack folder's meta.json describes."""
    optional = ("pack_epochs", "distinct_rows", "distinct_pack_rows")  # absent from packs of one epoch made before
    names = [f for f in PackInfo.__dataclass_fields__ if f != "path" and f not in optional]
    try:
        more = {k: tuple(meta[k]) if isinstance(meta[k], list) else meta[k] for k in optional if k in meta}
        return PackInfo(path=path, **{k: meta[k] for k in names}, **more)
    except KeyError as e:
        raise corrupt_pack(path, f"{path / 'meta.json'} lacks {e}") from None


def pack_info_dict(info: PackInfo) -> dict:
    """PackInfo as a JSON-ready dict (metrics, benchmark lines)."""
    return {**asdict(info), "path": str(info.path), "cache_hit_rate": info.cache_hit_rate}
