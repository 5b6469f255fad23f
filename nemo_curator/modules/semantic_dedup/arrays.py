"""Embedding columns to matrices and back: validation (nulls, dimension), normalisation, Arrow.

A partition's embedding column holds one float array per row (``None`` for an image that failed).
``unit_rows`` turns it into an ``(m, d)`` float32 matrix of unit rows plus the positions of the
rows it came from; rows between Dask tasks travel as raw float32 bytes (one ``bytes`` per row),
which Dask's P2P shuffle moves several times faster than arrays of objects.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from nemo_curator.utils.frames import is_null


class EmbeddingDimensionError(ValueError):
    """An embedding column holds vectors of different lengths."""


def unit_rows(frame: pd.DataFrame, column: str, where: str = "") -> tuple[np.ndarray, np.ndarray, int]:
    """The usable embeddings of ``frame[column]`` as unit rows.

    Returns ``(X, positions, n_unusable)``: ``X`` ``(m, d)`` float32 with unit L2 norm, ``positions``
    ``(m,)`` int64 row positions in ``frame``, and the count of non-null rows left out because they
    are all zeros or hold NaN/inf. Null rows (failed images) are left out silently. Raises
    ``EmbeddingDimensionError`` naming ``column`` (and ``where``, e.g. the partition) when the
    vectors do not all have one length, and ``KeyError`` when the column is absent.
    """
    if column not in frame.columns:
        raise KeyError(f"embedding column {column!r} is not in the data{where}; its columns are {list(frame.columns)}")
    values = frame[column].to_numpy(dtype=object)
    present = np.fromiter((not is_null(v) for v in values), dtype=bool, count=len(values))
    positions = np.flatnonzero(present)
    if len(positions) == 0:
        return np.zeros((0, 0), np.float32), positions.astype(np.int64), 0
    rows = [np.asarray(values[p], dtype=np.float32).reshape(-1) for p in positions]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    if (lengths != lengths[0]).any():
        other = int(np.flatnonzero(lengths != lengths[0])[0])
        raise EmbeddingDimensionError(
            f"embedding column {column!r}{where} mixes dimensions: row {positions[0]} has {lengths[0]} values, row "
            f"{positions[other]} has {lengths[other]}; every embedding must come from one model (re-embed, or drop "
            f"the other rows before deduplicating)")
    X = np.stack(rows)
    norms = np.linalg.norm(X, axis=1)
    usable = np.isfinite(norms) & (norms > 0)
    X = X[usable] / norms[usable, None]
    return np.ascontiguousarray(X, dtype=np.float32), positions[usable].astype(np.int64), int((~usable).sum())


def rows_to_bytes(X: np.ndarray) -> list[bytes]:
    """``(m, d)`` float32 → m ``bytes`` objects of ``4 d`` bytes (what the shuffle carries)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    return [row.tobytes() for row in X]


def bytes_to_rows(values, dim: int | None = None) -> np.ndarray:
    """Inverse of ``rows_to_bytes``: a sequence of m ``bytes`` → ``(m, d)`` float32 (one copy)."""
    values = list(values)
    if not values:
        return np.zeros((0, dim or 0), np.float32)
    flat = np.frombuffer(b"".join(values), dtype=np.float32)
    return flat.reshape(len(values), -1)


def arrow_list_from_matrix(X: np.ndarray) -> pa.ListArray:
    """``(m, d)`` float32 → Arrow ``list<float32>`` of m rows, without copying the values."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    offsets = pa.array(np.arange(X.shape[0] + 1, dtype=np.int32) * X.shape[1])
    return pa.ListArray.from_arrays(offsets, pa.array(X.reshape(-1)))


def matrix_from_arrow(column: pa.ChunkedArray | pa.Array, where: str = "") -> np.ndarray:
    """An Arrow list column of equal-length float vectors (no nulls) → ``(m, d)`` float32."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    if array.null_count:
        raise ValueError(f"{array.null_count} null embeddings{where}: the clustering output holds usable rows only")
    lengths = np.diff(array.offsets.to_numpy()) if hasattr(array, "offsets") else None
    if lengths is not None and (lengths != lengths[0]).any():
        raise EmbeddingDimensionError(f"embeddings of different lengths{where}")
    flat = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, -1)
