"""The image-native form: ``SemanticDeduplicator(eps=0.01, n_clusters=...)(dataset)``.

No files to juggle: the call returns a new ``ImageTextPairDataset`` whose metadata gains

- ``duplicate_of``: the id of the row kept in this row's place (null for kept rows),
- ``max_similarity``: float32, the row's largest cosine similarity to a row ranked before it in its
  cluster (NaN for the first row of a cluster and for rows without an embedding),
- a bool keep column (``is_unique``): False for the rows to remove,

ready for ``to_webdataset(path, filter_column="is_unique")``. ``write_removal_parquets`` writes the
removed ids in the layout ``ImageDuplicatesRemovalStage`` reads. Rows with a null embedding
(failed images), or one of zeros/NaN, are kept and never removed as duplicates.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import pandas as pd
from dask.utils import parse_bytes

from nemo_curator.utils.constants import DEDUP_KEEP_COLUMN
from nemo_curator.modules.semantic_dedup.clustering import (NEAREST_CENT_COL, PART_COL, assign_partitions,
                                                            fit_centroids, group_by_cluster)
from nemo_curator.modules.semantic_dedup.matching import (check_choices, check_eps, match_cluster, rank_cluster,
                                                          resolve_duplicates)
from nemo_curator.modules.semantic_dedup.shards import attach_to_dataset, persist_and_wait, to_shard_partitions
from nemo_curator.utils.file_utils import write_parquet_atomic
from nemo_curator.utils.frames import object_columns, to_pandas
from nemo_curator.utils.webdataset import PARQUET_SUFFIX, TAR_SUFFIX

logger = logging.getLogger(__name__)

DUPLICATE_OF_COL = "duplicate_of"
MAX_SIMILARITY_COL = "max_similarity"
DEFAULT_KEEP_COLUMN = DEDUP_KEEP_COLUMN
REMOVAL_ID_COL = "id"  # the column ImageDuplicatesRemovalStage reads (its duplicate_id_field default)


class SemanticDeduplicator:
    """SemDeDup over a dataset's embeddings (Abbas et al., 2023), distributed over the Dask cluster.

    Args:
        eps: rows with cosine similarity >= ``1 - eps`` to a row ranked before them in their
            cluster are duplicates; strictly between 0 and 1 (0.01 is typical).
        n_clusters: k-means clusters; pairs are compared only within a cluster. More clusters:
            less work (about ``rows**2 / n_clusters`` similarities) and slightly lower recall.
        which_to_keep: ``"hard"`` (keep the row farthest from its centroid), ``"easy"`` (closest)
            or ``"random"``; see ``matching``.
        sim_metric: distance to the centroid used for that ranking: ``"cosine"`` or ``"l2"``.
        embedding_column: the column of embeddings (float arrays; null for failed images).
        keep_column: name of the bool column added (True: keep).
        max_iter: k-means iterations.
        random_state: seed of the k-means sample and initialisation and of ``"random"``.
        kmeans_sample_size: rows k-means trains on (uniform sample); default
            ``max(100_000, 100 * n_clusters)``, all rows when there are fewer.
        block_size: the similarity kernel's tile side; working memory is ``block_size**2`` floats.
        partition_size: target size of the shuffled partitions (embeddings only), e.g. "256MB";
            a partition always holds whole clusters.
    """

    def __init__(self, eps: float = 0.01, n_clusters: int = 1000, which_to_keep: str = "hard",
                 sim_metric: str = "cosine", embedding_column: str = "image_embedding",
                 keep_column: str = DEFAULT_KEEP_COLUMN, max_iter: int = 100, random_state: int = 1234,
                 kmeans_sample_size: int | None = None, block_size: int = 1024, partition_size: str | int = "256MB"):
        self.eps = check_eps(eps)
        check_choices(which_to_keep, sim_metric)
        if not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer, got {n_clusters!r}")
        if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if kmeans_sample_size is not None and kmeans_sample_size < n_clusters:
            raise ValueError(f"kmeans_sample_size ({kmeans_sample_size}) must be at least n_clusters ({n_clusters})")
        if block_size < 1:
            raise ValueError(f"block_size must be a positive number of rows (1024 is typical), got {block_size}")
        if keep_column in (DUPLICATE_OF_COL, MAX_SIMILARITY_COL):
            raise ValueError(f"keep_column cannot be {keep_column!r}: that column is written too")
        self.n_clusters = int(n_clusters)
        self.which_to_keep = which_to_keep
        self.sim_metric = sim_metric
        self.embedding_column = embedding_column
        self.keep_column = keep_column
        self.max_iter = int(max_iter)
        self.random_state = int(random_state)
        self.kmeans_sample_size = kmeans_sample_size
        self.block_size = int(block_size)
        self.partition_bytes = parse_bytes(partition_size) if isinstance(partition_size, str) else int(partition_size)
        self.summary: dict = {}

    def lineage_step(self) -> str:
        """This operation and every parameter that changes its result (for resume fingerprints)."""
        return (f"semantic_dedup:eps={self.eps!r},n_clusters={self.n_clusters},which_to_keep={self.which_to_keep},"
                f"sim_metric={self.sim_metric},embedding_column={self.embedding_column},keep_column={self.keep_column},"
                f"max_iter={self.max_iter},random_state={self.random_state},"
                f"kmeans_sample_size={self.kmeans_sample_size},block_size={self.block_size}")

    def __call__(self, dataset):
        """Deduplicate ``dataset`` (an ``ImageTextPairDataset``); returns the new dataset.

        Computes now: one pass to sample and train k-means, one to assign, shuffle and compare
        (results kept in worker memory: ids and two numbers per row, never the embeddings on the
        client). The returned metadata joins them to each shard lazily. Call it on saved metadata
        (after ``save_metadata()``): each pass reads the metadata again.
        """
        id_col, metadata = dataset.id_col, dataset.metadata
        for col in (id_col, self.embedding_column):
            if col not in metadata.columns:
                raise KeyError(f"column {col!r} is not in the dataset's metadata (columns {list(metadata.columns)}): "
                               f"run the embedder first, or pass embedding_column=")
        started = time.time()
        fit = fit_centroids(metadata, self.embedding_column, self.n_clusters, self.max_iter, self.random_state,
                            self.kmeans_sample_size)
        fitted = time.time()
        assigned = assign_partitions(metadata, fit["centroids"], self.embedding_column, id_col)
        grouped = group_by_cluster(assigned, self.n_clusters, fit["usable"], fit["dim"], self.partition_bytes)
        with object_columns():
            matched = grouped.map_partitions(dedup_partition, id_col, self.which_to_keep, self.sim_metric,
                                             self.block_size, self.eps, self.random_state,
                                             meta=_matched_meta(id_col), enforce_metadata=False)
        results = persist_and_wait(to_shard_partitions(matched, metadata.npartitions))
        removed = int((~results["keep"]).sum().compute())
        self.summary = {"rows": fit["rows"], "usable": fit["usable"], "null_embeddings": fit["nulls"],
                        "unusable_embeddings": fit["unusable"], "removed": removed, "kept": fit["rows"] - removed,
                        "n_clusters": self.n_clusters, "kmeans_sample_rows": fit["sample_rows"],
                        "kmeans_backend": fit["backend"], "eps": self.eps,
                        "fit_seconds": round(fitted - started, 2), "match_seconds": round(time.time() - fitted, 2)}
        logger.info("semantic dedup: %s", self.summary)
        columns = {DUPLICATE_OF_COL: (None, None), MAX_SIMILARITY_COL: (np.nan, np.float32),
                   self.keep_column: (True, bool)}
        renamed = results.rename(columns={"keep": self.keep_column})
        return attach_to_dataset(dataset, renamed, columns, self.lineage_step())


def dedup_partition(frame: pd.DataFrame, id_col: str, which_to_keep: str, sim_metric: str, block_size: int,
                    eps: float, seed: int) -> pd.DataFrame:
    """The clusters of one shuffled partition deduplicated: ``_part``, ``id_col``, ``duplicate_of``,
    ``max_similarity`` (NaN for a cluster's first row) and ``keep`` for each row."""
    out = []
    for _, cluster in frame.groupby(NEAREST_CENT_COL, sort=True):
        ranked = rank_cluster(cluster, id_col, which_to_keep, sim_metric, seed)
        max_sim, argmax = match_cluster(ranked, block_size)
        keep, root = resolve_duplicates(max_sim, argmax, eps)
        ids = ranked[id_col].to_numpy(dtype=object)
        duplicate_of = np.where(keep, None, ids[np.maximum(root, 0)])
        out.append(pd.DataFrame({PART_COL: ranked[PART_COL].to_numpy(), id_col: ids, DUPLICATE_OF_COL: duplicate_of,
                                 MAX_SIMILARITY_COL: np.where(np.isfinite(max_sim), max_sim, np.nan).astype(np.float32),
                                 "keep": keep}))
    if not out:
        return _matched_meta(id_col)
    return pd.concat(out, ignore_index=True)


def _matched_meta(id_col: str) -> pd.DataFrame:
    return pd.DataFrame({PART_COL: np.zeros(0, np.int32), id_col: pd.Series([], dtype=object),
                         DUPLICATE_OF_COL: pd.Series([], dtype=object), MAX_SIMILARITY_COL: np.zeros(0, np.float32),
                         "keep": np.zeros(0, bool)})


# ----------------------------------------------------------------------------------------------
def write_removal_parquets(dataset, path: str | os.PathLike, keep_column: str = DEFAULT_KEEP_COLUMN) -> dict:
    """Write the ids of the rows whose ``keep_column`` is False as ``<path>/<shard>.parquet``, one
    file per shard (each atomic; shards with nothing to remove get an empty file).

    The layout ``ImageDuplicatesRemovalStage(removal_parquets_dir=path)`` reads: column ``id``
    (string), plus ``duplicate_of`` and ``max_similarity`` when the metadata has them. Other
    ``*.parquet`` files already in ``path`` would be read by that stage too: the folder must be new
    or hold only a previous run of this function (its files are replaced). Returns
    ``{"path", "removed", "shards"}``.
    """
    path = os.path.abspath(os.fspath(path))
    metadata, id_col = dataset.metadata, dataset.id_col
    if keep_column not in metadata.columns:
        raise KeyError(f"column {keep_column!r} is not in the metadata (columns {list(metadata.columns)}): run "
                       f"SemanticDeduplicator or ExactDeduplicator first, or pass keep_column=")
    names = [os.path.basename(t)[: -len(TAR_SUFFIX)] for t in dataset.tar_files]
    stale = sorted(set(f for f in os.listdir(path) if f.endswith(PARQUET_SUFFIX)) - {n + PARQUET_SUFFIX for n in names}
                   ) if os.path.isdir(path) else []
    if stale:
        raise FileExistsError(f"{path} already holds other parquet files ({stale[:3]}...), which the removal stage "
                              f"would read as ids to remove: pass a new folder")
    extra = [c for c in (DUPLICATE_OF_COL, MAX_SIMILARITY_COL) if c in metadata.columns]
    os.makedirs(path, exist_ok=True)
    with object_columns():
        counts = metadata.map_partitions(_write_removed, id_col, keep_column, extra, path, names,
                                         meta=pd.DataFrame({"removed": np.zeros(0, np.int64)}), enforce_metadata=False)
    removed = int(counts["removed"].sum().compute())
    return {"path": path, "removed": removed, "shards": len(names)}


def _write_removed(frame, id_col: str, keep_column: str, extra: list[str], folder: str, names: list[str],
                   partition_info: dict | None = None) -> pd.DataFrame:
    import pyarrow as pa

    pdf = to_pandas(frame)
    gone = pdf[~pdf[keep_column].fillna(True).astype(bool)]
    columns = {REMOVAL_ID_COL: pa.array(gone[id_col].astype(str).tolist(), pa.string())}
    if DUPLICATE_OF_COL in extra:
        columns[DUPLICATE_OF_COL] = pa.array(gone[DUPLICATE_OF_COL].astype(object).where(gone[DUPLICATE_OF_COL].notna(), None).tolist(), pa.string())
    if MAX_SIMILARITY_COL in extra:
        columns[MAX_SIMILARITY_COL] = pa.array(gone[MAX_SIMILARITY_COL].to_numpy(np.float32))
    write_parquet_atomic(pa.table(columns), os.path.join(folder, names[partition_info["number"]] + PARQUET_SUFFIX))
    return pd.DataFrame({"removed": [len(gone)]})
