"""The blockwise similarity kernel of SemDeDup: for each row, its most similar EARLIER row.

Rows of one cluster come in rank order (the row to keep first, see ``ranking.py``). Row ``j`` is
a duplicate when ``max_{i<j} x_i . x_j >= 1 - eps``. The kernel never forms the ``n x n`` matrix:
it walks the upper triangle in ``block_size x block_size`` tiles, so its working memory is one
tile (``block_size**2`` floats) plus the ``n``-long running maxima, whatever the cluster size.
It runs with torch on the GPU when the worker has one, else on the CPU (BLAS matmul per tile).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class KernelStats:
    """Bookkeeping of one kernel call: tiles computed and the largest tile, in elements."""

    tiles: int = 0
    peak_tile_elements: int = 0


def worker_device() -> str:
    """``"cuda"`` when this process sees a CUDA GPU (a dask-cuda worker owns one), else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def max_similarity_to_earlier(embeddings: np.ndarray, block_size: int = 1024, device: str | None = None,
                              stats: KernelStats | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each row ``j`` of ``embeddings`` (``(n, d)`` float32, unit rows, in rank order): the
    largest cosine similarity to a row ``i < j`` and that ``i``.

    Returns ``(max_sim, argmax)``: ``(n,)`` float32 and ``(n,)`` int64; row 0 has ``-inf`` and
    ``-1``. Between tiles, ties go to the earlier one. Memory: a ``block_size x block_size`` tile (two
    while the diagonal is masked) on
    ``device`` (default: ``worker_device()``) besides the embeddings; ``block_size <= 0`` means
    one tile for the whole cluster (``n x n``, as NeMo Curator's ``batched_cosine_similarity=0``).
    ``stats``, when given, receives the tile count and the peak tile size.
    """
    X = np.ascontiguousarray(embeddings, dtype=np.float32)
    if not X.flags.writeable:  # torch wants writable memory (rows decoded from shuffle bytes are read-only)
        X = X.copy()
    if X.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d (rows, dim) array, got shape {X.shape}")
    n = X.shape[0]
    best = np.full(n, -np.inf, dtype=np.float32)
    arg = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return best, arg
    block = n if block_size <= 0 else int(block_size)
    dev = torch.device(device or worker_device())
    x = torch.from_numpy(X).to(dev)
    best_t = torch.full((n,), -float("inf"), dtype=torch.float32, device=dev)
    arg_t = torch.full((n,), -1, dtype=torch.int64, device=dev)
    with torch.no_grad():
        for j0 in range(0, n, block):
            j1 = min(j0 + block, n)
            cols = x[j0:j1]
            for i0 in range(0, j1, block):  # row tiles up to the diagonal: only i < j matters
                i1 = min(i0 + block, j1)
                tile = x[i0:i1] @ cols.T  # (i1 - i0, j1 - j0)
                if i1 > j0:  # the tile crosses the diagonal: hide i >= j
                    rows = torch.arange(i0, i1, device=dev)[:, None]
                    cols_idx = torch.arange(j0, j1, device=dev)[None, :]
                    tile = tile.masked_fill(rows >= cols_idx, -float("inf"))
                values, index = tile.max(dim=0)
                better = values > best_t[j0:j1]  # strict: an earlier tile keeps ties
                best_t[j0:j1] = torch.where(better, values, best_t[j0:j1])
                arg_t[j0:j1] = torch.where(better, index + i0, arg_t[j0:j1])
                if stats is not None:
                    stats.tiles += 1
                    stats.peak_tile_elements = max(stats.peak_tile_elements, tile.numel())
                del tile
    best[:] = best_t.cpu().numpy()
    arg[:] = arg_t.cpu().numpy()
    arg[best == -np.inf] = -1
    return best, arg
