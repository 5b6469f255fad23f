"""K-means on the embeddings, distributed: sample, train on one worker, assign every partition, shuffle.

1. ``fit_centroids``: one pass over the partitions; each returns its counts and a uniform random
   sample of its usable rows (each row draws a priority key, the smallest keys win), merged
   pairwise in a tree on the workers into one sample of ``sample_size`` rows (a merge task holds
   at most three samples: about ``3 * sample_size * d * 4`` bytes); k-means trains on that sample
   in one task (faiss, on the GPU when the worker has one and faiss was built for it, else cuML
   when installed, else faiss on the CPU). The client receives only the ``(k, d)`` centroids.
2. ``assign_partitions``: every partition, in parallel, gets its rows' nearest centroid (L2, as
   k-means) and their L2 and cosine distances to it (torch, in row blocks).
3. ``group_by_cluster``: Dask's shuffle on the cluster id, so that each output partition holds
   whole clusters.
"""
from __future__ import annotations

import importlib.util
import logging
import math

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import torch

from nemo_curator.modules.semantic_dedup.arrays import EmbeddingDimensionError, rows_to_bytes, unit_rows
from nemo_curator.modules.semantic_dedup.kernel import worker_device
from nemo_curator.utils.frames import object_columns, to_pandas
from nemo_curator.utils.import_utils import gpu_only_import

logger = logging.getLogger(__name__)

NEAREST_CENT_COL = "nearest_cent"
L2_DIST_TO_CENT_COL = "l2_dist_to_cent"
COSINE_DIST_TO_CENT_COL = "cosine_dist_to_cent"
PART_COL = "_part"  # partition (shard) index of the row
EMB_COL = "_emb"  # the unit embedding as float32 bytes
POINTS_PER_CENTROID = 100  # default sample: this many rows per cluster, at least MIN_SAMPLE
MIN_SAMPLE = 100_000
ASSIGN_BLOCK_ROWS = 8192  # rows per centroid-distance matmul: (8192, k) floats at a time
MERGE_FAN_IN = 2  # samples merged per task: a merge holds at most 3 samples (2 in, 1 out)


def default_sample_size(n_clusters: int) -> int:
    """Rows k-means trains on by default: ``max(100_000, 100 * n_clusters)``."""
    return max(MIN_SAMPLE, POINTS_PER_CENTROID * n_clusters)


# ----------------------------------------------------------------------------------------------
# 1. Sample and train
def scan_partition(frame, column: str, sample_size: int, seed: int, part: int) -> dict:
    """Counts and a random sample of one partition's usable embeddings.

    Returns ``{"rows", "usable", "nulls", "unusable", "dims": {d: part}, "keys": (s,) float64,
    "sample": (s, d) float32}`` with ``s <= sample_size`` (the rows of smallest key).
    """
    pdf = to_pandas(frame)
    X, positions, unusable = unit_rows(pdf, column, where=f" (partition {part})")
    keys = np.random.default_rng([seed, part]).random(len(positions))
    if len(keys) > sample_size:
        chosen = np.argpartition(keys, sample_size - 1)[:sample_size]
        keys, X = keys[chosen], X[chosen]
    nulls = len(pdf) - len(positions) - unusable
    return {"rows": len(pdf), "usable": len(positions), "nulls": nulls, "unusable": unusable,
            "dims": {X.shape[1]: part} if len(positions) else {}, "keys": keys, "sample": X}


def merge_scans(scans: list[dict], sample_size: int, column: str) -> dict:
    """Merge ``scan_partition`` results: counts summed, the ``sample_size`` smallest keys kept.

    Raises ``EmbeddingDimensionError`` naming ``column`` when partitions disagree on the dimension.
    """
    dims: dict[int, int] = {}
    for scan in scans:
        for d, part in scan["dims"].items():
            dims.setdefault(d, part)
    if len(dims) > 1:
        found = ", ".join(f"{d} (partition {p})" for d, p in sorted(dims.items()))
        raise EmbeddingDimensionError(
            f"embedding column {column!r} mixes dimensions across partitions: {found}; every embedding must come "
            f"from one model (re-embed, or drop the other rows before deduplicating)")
    with_rows = [s for s in scans if len(s["keys"])]
    keys = np.concatenate([s["keys"] for s in with_rows]) if with_rows else np.zeros(0)
    order = np.argsort(keys, kind="stable")[:sample_size]
    # gather the chosen rows straight from the inputs: no concatenated copy of every input sample
    source = np.concatenate([np.full(len(s["keys"]), i) for i, s in enumerate(with_rows)]) if with_rows else order
    offset = np.concatenate([np.arange(len(s["keys"])) for s in with_rows]) if with_rows else order
    dim = with_rows[0]["sample"].shape[1] if with_rows else 0
    sample = np.empty((len(order), dim), np.float32)
    for i, s in enumerate(with_rows):
        chosen = source[order] == i
        sample[chosen] = s["sample"][offset[order][chosen]]
    merged = {k: sum(s[k] for s in scans) for k in ("rows", "usable", "nulls", "unusable")}
    return {**merged, "dims": dims, "keys": keys[order], "sample": sample}


def kmeans_backend() -> str:
    """``"faiss-gpu"``, ``"cuml"`` or ``"faiss"``: what ``train_kmeans`` uses in this process."""
    faiss = _import_faiss()
    if torch.cuda.is_available():
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            return "faiss-gpu"
        if importlib.util.find_spec("cuml") is not None:
            return "cuml"
        logger.warning("a GPU is visible but neither faiss-gpu nor cuML is installed: k-means runs on the CPU")
    return "faiss"


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError("deduplication needs faiss for k-means: pip install faiss-cpu (on GPUs: faiss-gpu-cu12, "
                          "or cuML from the gpu extra)") from err
    return faiss


def train_kmeans(sample: np.ndarray, n_clusters: int, max_iter: int, seed: int) -> np.ndarray:
    """Lloyd's k-means (L2) on ``sample`` ``(s, d)`` float32: ``(n_clusters, d)`` float32 centroids.

    One initialisation (random rows of the sample, drawn with ``seed``), ``max_iter`` iterations,
    every sample row used (faiss does not subsample further).
    """
    backend = kmeans_backend()
    X = np.ascontiguousarray(sample, dtype=np.float32)
    if backend == "cuml":
        cupy = gpu_only_import("cupy", "k-means with cuML")
        from cuml.cluster import KMeans

        model = KMeans(n_clusters=n_clusters, max_iter=max_iter, random_state=seed, n_init=1)
        model.fit(cupy.asarray(X))
        return cupy.asnumpy(model.cluster_centers_).astype(np.float32)
    faiss = _import_faiss()
    kmeans = faiss.Kmeans(X.shape[1], n_clusters, niter=max_iter, seed=seed, gpu=backend == "faiss-gpu",
                          verbose=False, spherical=False, min_points_per_centroid=1,
                          max_points_per_centroid=math.ceil(len(X) / n_clusters) + 1)
    kmeans.train(X)
    return np.asarray(kmeans.centroids, dtype=np.float32).reshape(n_clusters, X.shape[1])


def _train_from_scan(scan: dict, n_clusters: int, max_iter: int, seed: int, column: str) -> dict:
    if scan["usable"] == 0:
        raise ValueError(f"no usable embeddings in column {column!r} ({scan['rows']} rows: {scan['nulls']} null, "
                         f"{scan['unusable']} zero or NaN): embed the images first")
    if scan["usable"] < n_clusters:
        raise ValueError(f"Number of clusters is greater than the number of documents in your dataset: dataset length "
                         f"is {scan['usable']} while n_clusters is set to {n_clusters}. Please reduce n_clusters to be "
                         f"less than or equal to {scan['usable']}.")
    centroids = train_kmeans(scan["sample"], n_clusters, max_iter, seed)
    counts = {k: scan[k] for k in ("rows", "usable", "nulls", "unusable")}
    return {"centroids": centroids, "sample_rows": len(scan["sample"]), "dim": int(scan["sample"].shape[1]),
            "backend": kmeans_backend(), **counts}


def fit_centroids(df: dd.DataFrame, column: str, n_clusters: int, max_iter: int, seed: int,
                  sample_size: int | None = None) -> dict:
    """Train k-means on a uniform sample of ``df[column]``'s usable rows (computes; see module doc).

    Returns ``{"centroids": (k, d) float32, "rows", "usable", "nulls", "unusable", "sample_rows",
    "dim", "backend"}``. Raises for mixed dimensions, no usable rows, or fewer rows than clusters.
    """
    size = sample_size or default_sample_size(n_clusters)
    parts = df[[column]].to_delayed()
    level = [dask.delayed(scan_partition, pure=True)(p, column, size, seed, i) for i, p in enumerate(parts)]
    while len(level) > 1:
        level = [dask.delayed(merge_scans, pure=True)(level[i: i + MERGE_FAN_IN], size, column)
                 for i in range(0, len(level), MERGE_FAN_IN)]
    merged = dask.delayed(merge_scans, pure=True)(level, size, column)
    fitted = dask.delayed(_train_from_scan, pure=True)(merged, n_clusters, max_iter, seed, column)
    return dask.compute(fitted)[0]


# ----------------------------------------------------------------------------------------------
# 2. Assign
def nearest_centroids(X: np.ndarray, centroids: np.ndarray, device: str | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For unit rows ``X`` ``(m, d)``: nearest centroid by L2 ``(m,)`` int32, the L2 distance to it
    and the cosine distance ``1 - x.c/|c|`` to it (``(m,)`` float32 each)."""
    m = X.shape[0]
    nearest = np.zeros(m, np.int32)
    l2 = np.zeros(m, np.float32)
    cos = np.zeros(m, np.float32)
    if m == 0:
        return nearest, l2, cos
    dev = torch.device(device or worker_device())
    C = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(dev)
    c_sq = (C * C).sum(dim=1)
    c_norm = c_sq.sqrt().clamp_min(1e-30)
    with torch.no_grad():
        for r0 in range(0, m, ASSIGN_BLOCK_ROWS):
            x = torch.from_numpy(X[r0: r0 + ASSIGN_BLOCK_ROWS]).to(dev)
            dots = x @ C.T  # (b, k)
            best = torch.argmax(2 * dots - c_sq[None, :], dim=1)  # min |x - c|^2 = 1 - 2 x.c + |c|^2
            dot = dots.gather(1, best[:, None])[:, 0]
            r1 = r0 + len(x)
            nearest[r0:r1] = best.cpu().numpy()
            l2[r0:r1] = (1 - 2 * dot + c_sq[best]).clamp_min(0).sqrt().cpu().numpy()
            cos[r0:r1] = (1 - dot / c_norm[best]).cpu().numpy()
    return nearest, l2, cos


def assign_partition(frame, centroids: np.ndarray, column: str, id_col: str, carry: list[str] = (),
                     partition_info: dict | None = None) -> pd.DataFrame:
    """One partition's usable rows with their cluster: ``_part``, ``id_col``, ``_emb``
    (unit float32 bytes), ``nearest_cent``, ``l2_dist_to_cent``, ``cosine_dist_to_cent`` and the
    ``carry`` columns. Rows without a usable embedding are left out."""
    part = int(partition_info["number"]) if partition_info else 0
    pdf = to_pandas(frame)
    X, positions, _ = unit_rows(pdf, column, where=f" (partition {part})")
    if len(positions) and X.shape[1] != centroids.shape[1]:
        raise EmbeddingDimensionError(f"embedding column {column!r} (partition {part}) has {X.shape[1]} values per row, "
                                      f"the centroids {centroids.shape[1]}: the data changed since k-means was trained")
    nearest, l2, cos = nearest_centroids(X, centroids)
    out = pd.DataFrame({
        PART_COL: np.full(len(positions), part, np.int32),
        id_col: pdf[id_col].iloc[positions].to_numpy(),
        EMB_COL: pd.Series(rows_to_bytes(X), dtype=object),
        NEAREST_CENT_COL: nearest,
        L2_DIST_TO_CENT_COL: l2,
        COSINE_DIST_TO_CENT_COL: cos,
    })
    for col in carry:
        out[col] = pdf[col].iloc[positions].to_numpy()
    return out


def assigned_meta(meta, id_col: str, carry: list[str] = ()) -> pd.DataFrame:
    """The (empty) frame ``assign_partition`` returns, for Dask's ``meta``."""
    meta = to_pandas(meta)
    frame = pd.DataFrame({
        PART_COL: np.zeros(0, np.int32), id_col: meta[id_col].iloc[:0].to_numpy(),
        EMB_COL: pd.Series([], dtype=object), NEAREST_CENT_COL: np.zeros(0, np.int32),
        L2_DIST_TO_CENT_COL: np.zeros(0, np.float32), COSINE_DIST_TO_CENT_COL: np.zeros(0, np.float32)})
    frame[id_col] = frame[id_col].astype(meta[id_col].dtype)
    for col in carry:
        frame[col] = meta[col].iloc[:0]
    return frame


def assign_partitions(df: dd.DataFrame, centroids: np.ndarray, column: str, id_col: str,
                      carry: list[str] = ()) -> dd.DataFrame:
    """Lazy: ``assign_partition`` on every partition (the centroids are sent once, not per task)."""
    for col in [id_col, column, *carry]:
        if col not in df.columns:
            raise KeyError(f"column {col!r} is not in the data; its columns are {list(df.columns)}")
    centroids_ref = dask.delayed(np.asarray(centroids, dtype=np.float32), pure=True)
    with object_columns():
        return df.map_partitions(assign_partition, centroids_ref, column, id_col, list(carry),
                                 meta=assigned_meta(df._meta, id_col, carry), enforce_metadata=False)


# ----------------------------------------------------------------------------------------------
# 3. Group
def group_by_cluster(assigned: dd.DataFrame, n_clusters: int, usable_rows: int, dim: int,
                     partition_bytes: int | None) -> dd.DataFrame:
    """Dask's shuffle on ``nearest_cent``: every cluster ends up whole in one output partition.

    Output partitions: ``ceil(usable_rows * 4 * dim / partition_bytes)`` (the embeddings' size over
    the target), or as many as the input with ``partition_bytes=None``; never more than the clusters.
    """
    if partition_bytes:
        n_out = math.ceil(usable_rows * 4 * dim / partition_bytes)
    else:
        n_out = assigned.npartitions
    n_out = max(1, min(n_clusters, n_out))
    with object_columns():
        return assigned.shuffle(on=NEAREST_CENT_COL, npartitions=n_out)
