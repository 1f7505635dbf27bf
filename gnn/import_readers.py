"""Reading the files of a graph to import in bounded memory (gnn/import_sources.py says which files they are).

    for s, d in edge_chunks(ref, num_nodes, rows):   # int64 chunks, ids checked: file and row named
    rows, row_shape = feature_shape(ref)              # cheap: headers only (CSV: None until it is read)
    for x in feature_chunks(ref, rows): ...           # float32 (n, dim) rows
    ids = read_column(ref)                            # a 1-D column (labels, split node ids), in RAM: O(num_nodes)

Edge files: CSV (``.gz`` decompressed as it streams; no header unless ``header: true``), Parquet (integer columns
``src`` and ``dst``, or those named by ``src:``/``dst:``, or the first two; read a row group at a time), .npy of
shape (2, E) or (E, 2) (memory-mapped). Features: .npy (memory-mapped), Parquet (a list column or numeric columns),
zarr, CSV. A truncated .gz, a damaged file or a wrong type raises GraphImportError naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from plait.storage.errors import ProblemAndFix


class GraphImportError(ProblemAndFix, ValueError):
    """A graph to import is malformed: ``GraphImportError(problem, fix, path)``; nothing was written."""


@dataclass(frozen=True)
class FileRef:
    path: Path
    format: str
    options: dict = field(default_factory=dict)  # header (csv), src / dst / column (parquet)


def _csv_reader(ref: FileRef, names: list[str] | None, types, block: int):
    import pyarrow.csv as pc

    read = pc.ReadOptions(block_size=block, column_names=None if ref.options.get("header") else names,
                          autogenerate_column_names=names is None and not ref.options.get("header"))
    convert = pc.ConvertOptions(column_types=types) if types else None
    return pc.open_csv(str(ref.path), read_options=read, convert_options=convert)


def _stream_error(ref: FileRef, e: Exception) -> GraphImportError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "runcated" in text or isinstance(e, EOFError):
        return GraphImportError(f"{ref.path} is truncated ({text})", "copy or download the file again, whole",
                                ref.path)
    return GraphImportError(f"{ref.path} cannot be read as {ref.format} ({type(e).__name__}: {text})",
                            "fix the file, or its format in the metadata", ref.path)


def edge_chunks(ref: FileRef, num_nodes: int | None, rows: int = 1 << 20) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The edges of one file as int64 (src, dst) chunks of up to ``rows``; an id outside [0, num_nodes) (or not
    an integer) raises GraphImportError naming the file and the row."""
    first = 0
    for s, d in _raw_edges(ref, rows):
        for name, col in (("src", s), ("dst", d)):
            if col.dtype.kind not in "iu":
                raise GraphImportError(f"{ref.path}: {name} ids are {col.dtype}, not integers", "write node ids "
                                       "as integers", ref.path)
            bad = (col < 0) | (col >= (num_nodes if num_nodes is not None else 2**31 - 1))
            if bad.any():
                i = int(np.argmax(bad))
                raise GraphImportError(f"{ref.path}: edge row {first + i} has {name}={int(col[i])}, outside "
                                       f"[0, {num_nodes}) (the graph's nodes)", "fix the edge list, or graph.nodes' "
                                       "num in the metadata", ref.path)
        first += len(s)
        yield s.astype(np.int64, copy=False), d.astype(np.int64, copy=False)


def _raw_edges(ref: FileRef, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    import pyarrow as pa

    if ref.format == "numpy":
        a = _npy(ref)
        if a.ndim != 2 or 2 not in a.shape:
            raise GraphImportError(f"{ref.path} holds an array of shape {a.shape}", "save the edges as (2, E) "
                                   "(row 0 sources) or (E, 2)", ref.path)
        pairs_first = a.shape[0] == 2 and a.shape[1] != 2
        for lo in range(0, a.shape[1] if pairs_first else a.shape[0], rows):
            part = a[:, lo : lo + rows] if pairs_first else a[lo : lo + rows].T
            yield np.asarray(part[0]), np.asarray(part[1])
        return
    try:
        if ref.format == "csv":
            reader = _csv_reader(ref, ["src", "dst"], None, 1 << 22)
            it = iter(reader)
        else:
            it = _parquet_batches(ref, rows)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            if batch.num_columns < 2:
                raise GraphImportError(f"{ref.path} holds {batch.num_columns} column(s)", "write two: src, dst",
                                       ref.path)
            out = []
            for k in range(2):
                col = batch.column(k)
                if col.null_count:
                    raise GraphImportError(f"{ref.path}: {col.null_count} edge(s) miss an endpoint",
                                           "every edge needs both ends", ref.path)
                out.append(col.to_numpy(zero_copy_only=False))
            yield out[0], out[1]
    except GraphImportError:
        raise
    except (OSError, EOFError, pa.ArrowException, ValueError) as e:
        raise _stream_error(ref, e) from None


def _parquet_batches(ref: FileRef, rows: int):
    """Record batches of the two endpoint columns, file by file (a folder: its .parquet files by name), one row
    group at a time: pyarrow.dataset's scanner reads many batches ahead (hundreds of MB on a large edge list)."""
    import pyarrow.parquet as pq

    files = sorted(ref.path.glob("*.parquet")) if ref.path.is_dir() else [ref.path]
    for file in files:
        pf = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)
        names = pf.schema_arrow.names
        cols = [ref.options.get("src", "src"), ref.options.get("dst", "dst")]
        if not set(cols) <= set(names):
            if "src" in ref.options or len(names) < 2:
                raise GraphImportError(f"{file} has columns {names}, not {cols}", "name the endpoint columns with "
                                       "src: and dst: in the metadata", file)
            cols = names[:2]
        yield from pf.iter_batches(batch_size=rows, columns=cols, use_threads=False)


def _npy(ref: FileRef) -> np.ndarray:
    try:
        return np.load(ref.path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise GraphImportError(f"{ref.path} cannot be read as a .npy array ({e})", "save it with np.save",
                               ref.path) from None


def feature_shape(ref: FileRef) -> tuple[int | None, tuple[int, ...] | None]:
    """(rows, row shape) from the file's header; (None, None) for CSV, known only once it is read."""
    if ref.format == "numpy":
        a = _npy(ref)
        return a.shape[0], tuple(a.shape[1:]) or (1,)
    if ref.format == "zarr":
        import zarr

        try:
            a = zarr.open_array(str(ref.path), mode="r")
        except Exception as e:  # noqa: BLE001
            raise GraphImportError(f"{ref.path} cannot be opened as a zarr array ({e})", "write it with "
                                   "zarr.create_array", ref.path) from None
        return a.shape[0], tuple(a.shape[1:]) or (1,)
    if ref.format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(ref.path).metadata.num_rows, None
    return None, None


def feature_chunks(ref: FileRef, rows: int = 1 << 16) -> Iterator[np.ndarray]:
    """The feature rows as float32 (n, dim) chunks of up to ``rows``."""
    import pyarrow as pa

    try:
        if ref.format in ("numpy", "zarr"):
            if ref.format == "numpy":
                a = _npy(ref)
            else:
                import zarr

                a = zarr.open_array(str(ref.path), mode="r")
            for lo in range(0, a.shape[0], rows):
                yield _float_rows(ref, np.asarray(a[lo : lo + rows]))
        elif ref.format == "parquet":
            import pyarrow.parquet as pq
            from plait.storage.feature_ingest import _batch_rows

            pf = pq.ParquetFile(ref.path)
            names = pf.schema_arrow.names
            is_list = len(names) == 1 and not pa.types.is_floating(pf.schema_arrow.field(0).type) and \
                not pa.types.is_integer(pf.schema_arrow.field(0).type)
            for batch in pf.iter_batches(batch_size=rows):
                yield _float_rows(ref, _batch_rows(batch, names, is_list, ref.path))
        else:
            for batch in _csv_reader(ref, None, None, 1 << 22):
                cols = [c.to_numpy(zero_copy_only=False) for c in batch.columns]
                yield _float_rows(ref, np.stack(cols, axis=1))
    except GraphImportError:
        raise
    except (OSError, EOFError, pa.ArrowException, ValueError, TypeError) as e:
        raise _stream_error(ref, e) from None


def _float_rows(ref: FileRef, x: np.ndarray) -> np.ndarray:
    if x.ndim == 1:
        x = x[:, None]
    if x.dtype.kind not in "fiub":
        raise GraphImportError(f"{ref.path} holds {x.dtype} features, not numbers", "write numeric features",
                               ref.path)
    return x.reshape(len(x), -1).astype(np.float32, copy=False)


def read_column(ref: FileRef) -> np.ndarray:
    """A one-column file (labels, node ids) as a 1-D array, in RAM; its own dtype (the caller checks it)."""
    import pyarrow as pa

    try:
        if ref.format == "numpy":
            a = np.load(ref.path, allow_pickle=False)
        elif ref.format == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(ref.path)
            col = table.column(ref.options.get("column", table.column_names[0]))
            if col.null_count:
                raise GraphImportError(f"{ref.path}: {col.null_count} empty value(s)", "give a value on every "
                                       "row", ref.path)
            a = col.to_numpy()
        else:
            import pyarrow.csv as pc

            read = pc.ReadOptions(autogenerate_column_names=not ref.options.get("header"))
            table = pc.read_csv(str(ref.path), read_options=read)
            if table.num_columns != 1:
                raise GraphImportError(f"{ref.path} holds {table.num_columns} columns", "write one value a row",
                                       ref.path)
            col = table.column(0)
            if col.null_count:
                raise GraphImportError(f"{ref.path}: {col.null_count} empty value(s) (unlabelled nodes?)",
                                       "give a value on every row", ref.path)
            a = col.to_numpy()
    except GraphImportError:
        raise
    except (OSError, EOFError, pa.ArrowException, ValueError) as e:
        raise _stream_error(ref, e) from None
    a = np.asarray(a)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise GraphImportError(f"{ref.path} holds an array of shape {a.shape}", "write one value per node", ref.path)
    return a
