"""A pack folder's description: its format, its figures (PackInfo) and how to tell one from any other folder.

    info = load_pack_info("packs/")      # -> PackInfo: num_batches, cached_rows, blowup, preprocess_s, ...
    pack_info_dict(info)                 # JSON-ready, for metrics and benchmark lines

prepare_packed (gnn/offline.py) writes pack folders; PackedLoader (gnn/packed_loader.py) reads them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from plait.storage.folders import ForeignFolderError, read_meta

FORMAT = "plait-gnn-pack"
VERSION = 1

NotAPackError = ForeignFolderError  # a path that is not a pack folder written here


class CorruptPackError(RuntimeError):
    """A pack folder is incomplete or inconsistent; the message names the file and the fix."""


@dataclass(frozen=True)
class PackInfo:
    path: Path
    num_batches: int  # batches in one epoch (all ranks)
    world_size: int
    batches_per_rank: int  # num_batches // world_size: every rank steps this many times per epoch
    num_layers: int
    seed: int  # sampling seed; also orders the batches of each epoch
    batch_size: int
    cache_rows: int  # asked for
    cached_rows: int  # held (<= cache_rows: rows no batch asks for are not cached)
    rows_needed: int  # sum over batches of len(n_id)
    pack_rows: int  # rows written to packs (the non-cached part of rows_needed)
    row_bytes: int
    feature_bytes: int  # the feature file's data bytes (num_rows x row_bytes)
    pack_bytes: int  # packs.feat data bytes (page-padded packs)
    cache_bytes: int  # cache.feat data bytes
    blowup: float  # pack_bytes / feature_bytes: the disk space packing costs
    preprocess_s: float  # wall time of prepare_packed
    sample_s: float  # of which sampling (both passes)
    read_s: float  # of which reading feature rows
    write_s: float  # of which writing packs, cache and index

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
        raise CorruptPackError(f"{pack_dir / 'meta.json'}: pack version {meta.get('version')!r}, this code reads "
                               f"version {VERSION}; run prepare_packed again")
    return info_from_meta(pack_dir, meta)


def info_from_meta(path: Path, meta: dict) -> PackInfo:
    """The PackInfo that a pack folder's meta.json describes."""
    names = [f for f in PackInfo.__dataclass_fields__ if f != "path"]
    try:
        return PackInfo(path=path, **{k: meta[k] for k in names})
    except KeyError as e:
        raise CorruptPackError(f"{path / 'meta.json'} lacks {e}; run prepare_packed again") from None


def pack_info_dict(info: PackInfo) -> dict:
    """PackInfo as a JSON-ready dict (metrics, benchmark lines)."""
    return {**asdict(info), "path": str(info.path), "cache_hit_rate": info.cache_hit_rate}
