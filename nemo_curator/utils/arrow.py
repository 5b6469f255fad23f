"""Partitions to Arrow: embedding columns (one float array per row) become ``list<float32>``.

The one place that turns metadata partitions into Arrow tables, for parquet files and for cuDF.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from nemo_curator.utils.frames import is_null, is_pandas, to_pandas


def partition_to_arrow(frame, compact_nulls: bool = False) -> pa.Table:
    """Convert a partition (pandas or cuDF) to Arrow; columns of float arrays become list<float32>.

    ``compact_nulls``: null lists take no values (for libcudf, which mishandles null lists over
    non-empty ranges; Arrow and parquet accept them), at the cost of a copy when there are nulls."""
    frame = to_pandas(frame)
    arrays, names = [], []
    for name in frame.columns:
        col = frame[name]
        if col.dtype == object and holds_float_arrays(col):
            arrays.append(float_list_array(col, compact_nulls))
        else:
            arrays.append(pa.Array.from_pandas(col))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def pandas_like(frame: pd.DataFrame, template):
    """``frame`` (pandas) in the kind of ``template``: pandas as it is, cuDF through Arrow (so that
    embeddings become a list<float32> column)."""
    if is_pandas(template):
        return frame
    return type(template).from_arrow(partition_to_arrow(frame, compact_nulls=True))


def float_list_array(col: pd.Series, compact_nulls: bool = False) -> pa.ListArray:
    """Object column of float arrays (or None/NaN) -> list<float32>.

    When the arrays are the rows of one (n, D) float32 matrix, each at its own row (what
    ``ImageEmbedder`` produces), Arrow gets the matrix itself: no copy (a null row then spans
    its D unused values, unless ``compact_nulls``). Otherwise one copy."""
    values = col.tolist()
    matrix, present = rows_of_one_matrix(values)
    if matrix is not None and compact_nulls and not present.all():
        matrix = None
    if matrix is not None:
        offsets = np.arange(len(values) + 1, dtype=np.int64) * matrix.shape[1]
        flat = matrix.reshape(-1)
    else:
        present = np.array([not is_null(v) for v in values], dtype=bool)
        rows = [np.asarray(v, dtype=np.float32).reshape(-1) for v, p in zip(values, present) if p]
        lengths = np.zeros(len(values), dtype=np.int64)
        lengths[np.flatnonzero(present)] = [len(r) for r in rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.concatenate(rows) if rows else np.zeros(0, np.float32)
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"column {col.name!r} holds {offsets[-1]:,} floats in one partition, more than an Arrow list "
                         f"column can address (2**31 - 1): write smaller shards")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat), mask=pa.array(~present))


def rows_of_one_matrix(values: list) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(matrix, present)`` when the non-null values are rows of one C-contiguous (len(values), D)
    float32 block of memory, each value at its own row r (a view, not a copy); else ``(None, None)``."""
    n, present, owner, start, row_bytes = len(values), np.zeros(len(values), dtype=bool), None, 0, 0
    for r, v in enumerate(values):
        if is_null(v):
            continue
        if not (isinstance(v, np.ndarray) and v.dtype == np.float32 and v.ndim == 1 and v.strides == (4,)
                and isinstance(v.base, np.ndarray)):
            return None, None
        address = v.__array_interface__["data"][0]
        if owner is None:
            owner, row_bytes = v.base, v.nbytes
            start = address - r * row_bytes
        if v.base is not owner or v.nbytes != row_bytes or address != start + r * row_bytes:
            return None, None
        present[r] = True
    if owner is None or not owner.flags.c_contiguous:
        return None, None
    owner_start = owner.__array_interface__["data"][0]
    first = start - owner_start
    if first < 0 or first + n * row_bytes > owner.nbytes:
        return None, None
    block = owner.reshape(-1).view(np.uint8)[first: first + n * row_bytes].view(np.float32)
    return block.reshape(n, row_bytes // 4), present


def holds_float_arrays(col: pd.Series) -> bool:
    """Whether the first non-null value of an object column is an array (or list) of floats."""
    for v in col:
        if is_null(v):
            continue
        return isinstance(v, (np.ndarray, list)) and np.asarray(v).dtype.kind == "f"
    return False
