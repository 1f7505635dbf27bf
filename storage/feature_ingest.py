"""Feature files from Parquet, streamed by record batches in bounded memory (see feature_file.py for the format).

    write_features_from_parquet("features.feat", "x.parquet")                 # one list column, or
    write_features_from_parquet("features.feat", "x.parquet", columns=["a", "b", "c"])   # numeric columns
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from plait.storage.feature_file import PAGE, FeatureFileInfo, FeatureWriter, open_feature_file


def write_features_from_parquet(path: str | Path, parquet_path: str | Path, columns: list[str] | None = None,
                                batch_rows: int = 65536, dtype=None, block_size: int = PAGE,
                                meta: dict | None = None) -> FeatureFileInfo:
    """Write the rows of a Parquet file as a feature file, streaming ``batch_rows`` rows at a time.

    A row is either the values of one (nested) fixed-size-list column, or of a list column whose lists all
    have one length (row shape = the list sizes), or one value from each of several numeric columns (row
    shape = (len(columns),), dtype = their common type unless ``dtype`` is given). ``columns=None`` takes
    the file's only column if it is a list column, else all columns.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_path = Path(parquet_path)
    pf = pq.ParquetFile(parquet_path)
    schema = pf.schema_arrow
    names = list(columns) if columns is not None else [f.name for f in schema]
    missing = [c for c in names if c not in schema.names]
    if missing or not names:
        raise ValueError(f"{parquet_path}: columns {missing or names} not found; it has {schema.names}")
    types = [schema.field(c).type for c in names]
    is_list = [pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t) for t in types]
    if any(is_list) and len(names) > 1:
        raise ValueError(f"{parquet_path}: a row is one list column or several numeric columns, got {names} "
                         f"of types {[str(t) for t in types]}; pass columns=[one list column]")
    for c, t in zip(names, types, strict=True):
        leaf = t
        while pa.types.is_list(leaf) or pa.types.is_fixed_size_list(leaf) or pa.types.is_large_list(leaf):
            leaf = leaf.value_type
        if not (pa.types.is_integer(leaf) or pa.types.is_floating(leaf) or pa.types.is_boolean(leaf)):
            raise TypeError(f"{parquet_path}: column {c!r} holds {t}, not numbers; choose numeric columns")
    if dtype is None and not is_list[0]:
        dtype = np.result_type(*[t.to_pandas_dtype() for t in types])
    with FeatureWriter(path, None, dtype, block_size, meta) as w:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=names):
            w.append(_batch_rows(batch, names, is_list[0], parquet_path))
        if w.row_shape is None:  # an empty Parquet file: the row shape comes from the schema
            if is_list[0]:
                raise ValueError(f"{parquet_path} holds no rows: the row shape of list column {names[0]!r} is "
                                 "unknown; write at least one row")
            w.row_shape = (len(names),)
    return open_feature_file(path)


def _batch_rows(batch, names: list[str], is_list: bool, source: Path) -> np.ndarray:
    """A record batch as an (n, *row_shape) array."""
    import pyarrow as pa

    if not is_list:
        cols = [batch.column(c) for c in names]
        if any(c.null_count for c in cols):
            raise ValueError(f"{source}: columns {names} hold nulls; fill or drop them first")
        return np.stack([c.to_numpy(zero_copy_only=False) for c in cols], axis=1)
    arr, shape = batch.column(names[0]), [len(batch)]
    while pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type) or pa.types.is_large_list(arr.type):
        if arr.null_count:
            raise ValueError(f"{source}: column {names[0]!r} holds null lists; fill or drop them first")
        if pa.types.is_fixed_size_list(arr.type):
            width = arr.type.list_size
        else:
            lengths = np.diff(np.asarray(arr.offsets))
            if lengths.size and (lengths != lengths[0]).any():
                raise ValueError(f"{source}: column {names[0]!r} holds lists of lengths {lengths.min()} to "
                                 f"{lengths.max()}; every row must hold the same number of values")
            width = int(lengths[0]) if lengths.size else 0
        shape.append(width)
        arr = arr.flatten()
    if arr.null_count:
        raise ValueError(f"{source}: column {names[0]!r} holds null values; fill or drop them first")
    return arr.to_numpy(zero_copy_only=False).reshape(shape)
