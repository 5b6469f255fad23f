"""``ClusteringModel``: NeMo Curator 0.9's clustering step of semantic deduplication (CPU or GPU).

Writes into ``clustering_output_dir``::

    kmeans_centroids.npy                       (n_clusters, d) float32
    embs_by_nearest_center/nearest_cent=<c>/part.0.parquet   one folder per cluster c in 0..n_clusters-1

Each cluster file holds that cluster's rows with a usable embedding: ``<id_column>``,
``<embedding_column>`` (list<float32>, L2-normalised), the other columns when
``keep_all_columns``, ``l2_dist_to_cent`` and ``cosine_dist_to_cent`` (float32); the cluster id is
in the folder name (hive layout), as with 0.9. Empty clusters get an empty file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from dask.utils import parse_bytes

from nemo_curator.datasets.doc_dataset import DocumentDataset
from nemo_curator.modules.semantic_dedup.arrays import arrow_list_from_matrix, bytes_to_rows
from nemo_curator.modules.semantic_dedup.clustering import (COSINE_DIST_TO_CENT_COL, EMB_COL, L2_DIST_TO_CENT_COL,
                                                            NEAREST_CENT_COL, assign_partitions, fit_centroids,
                                                            group_by_cluster)
from nemo_curator.modules.semantic_dedup.logs import flush_logger, setup_logger
from nemo_curator.utils.file_utils import atomic_write, write_parquet_atomic
from nemo_curator.utils.frames import object_columns, to_pandas

EMBS_BY_NEAREST_CENTER = "embs_by_nearest_center"
CENTROIDS_FILE = "kmeans_centroids.npy"
CLUSTER_FILE = "part.0.parquet"


def cluster_dir(emb_by_clust_dir: str, cluster_id: int) -> str:
    return os.path.join(emb_by_clust_dir, f"{NEAREST_CENT_COL}={cluster_id}")


@contextlib.contextmanager
def performance_report_to(profile_dir: str | None, name: str):
    """Dask's performance report of the block as ``<profile_dir>/<name>-<timestamp>.html`` (written
    atomically), or nothing when ``profile_dir`` is None."""
    if profile_dir is None:
        yield
        return
    from distributed import performance_report

    with tempfile.TemporaryDirectory() as tmp:
        html = os.path.join(tmp, "report.html")
        with performance_report(filename=html):
            yield
        with open(html, "rb") as src, atomic_write(os.path.join(profile_dir, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.html")) as dst:
            shutil.copyfileobj(src, dst)


class ClusteringModel:
    """K-means clustering of the embeddings, the first step of SemDeDup (NeMo Curator 0.9's API).

    Args:
        id_column: the id column. Default "id".
        max_iter: k-means iterations. Default 100.
        n_clusters: number of clusters. Default 1000.
        clustering_output_dir: where the centroids and the per-cluster files go (module docstring).
        embedding_column: the embedding column (float arrays; nulls are left out). Default "embeddings".
        random_state: seed of the k-means sample and initialisation. Default 1234.
        clustering_input_partition_size: target size of the partitions after grouping by cluster
            (embeddings only), e.g. "2gb"; None keeps as many partitions as the input. Default "2gb".
        logger: a Logger, or a folder for ``ClusteringModel.log``. Default "./".
        profile_dir: folder for Dask performance reports, or None.
        keep_all_columns: also write the input's other columns into the cluster files.
        kmeans_sample_size: rows k-means trains on (uniform sample; not in 0.9); default
            ``max(100_000, 100 * n_clusters)``.
    """

    def __init__(self, id_column: str = "id", max_iter: int = 100, n_clusters: int = 1000,
                 clustering_output_dir: str = "./clustering_results", embedding_column: str = "embeddings",
                 random_state: int = 1234, clustering_input_partition_size: str | None = "2gb",
                 logger: logging.Logger | str = "./", profile_dir: str | None = None, keep_all_columns: bool = False,
                 kmeans_sample_size: int | None = None):
        if not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer, got {n_clusters!r}")
        if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        self.id_col = id_column
        self.max_iter = int(max_iter)
        self.n_clusters = int(n_clusters)
        self.clustering_output_dir = clustering_output_dir
        self.embedding_column = embedding_column
        self.random_state = int(random_state)
        self.clustering_input_partition_size = clustering_input_partition_size
        self.logger = setup_logger(logger, "ClusteringModel")
        self.profile_dir = profile_dir
        self.keep_all_columns = keep_all_columns
        self.kmeans_sample_size = kmeans_sample_size
        if os.path.exists(clustering_output_dir):
            self.logger.warning(f"Clustering output directory {clustering_output_dir} already exists and will be overwritten")
        os.makedirs(clustering_output_dir, exist_ok=True)

    def __call__(self, embeddings_dataset: DocumentDataset) -> DocumentDataset:
        """Cluster ``embeddings_dataset.df``; returns a DocumentDataset with one partition per cluster
        (read from the files written, with ``nearest_cent``)."""
        try:
            return self._run(embeddings_dataset.df)
        finally:
            flush_logger(self.logger)

    def _run(self, df: dd.DataFrame) -> DocumentDataset:
        if self.embedding_column not in df.columns:
            raise ValueError(f'Expected embedding column "{self.embedding_column}" to be in dataset. Only found '
                             f"columns {list(df.columns)}")
        if self.id_col not in df.columns:
            raise ValueError(f'Expected id column "{self.id_col}" to be in dataset. Only found columns {list(df.columns)}: '
                             f"pass id_column=")
        carry = [c for c in df.columns if c not in (self.id_col, self.embedding_column)] if self.keep_all_columns else []
        out_dir = os.path.join(self.clustering_output_dir, EMBS_BY_NEAREST_CENTER)
        with performance_report_to(self.profile_dir, "clustering-model"):
            t0 = time.time()
            fit = fit_centroids(df, self.embedding_column, self.n_clusters, self.max_iter, self.random_state,
                                self.kmeans_sample_size)
            self.logger.info(f"KMeans fit on {fit['sample_rows']} of {fit['usable']} usable rows ({fit['nulls']} null and "
                             f"{fit['unusable']} zero/NaN embeddings left out, backend {fit['backend']}): "
                             f"{time.time() - t0:.1f} s")
            with atomic_write(os.path.join(self.clustering_output_dir, CENTROIDS_FILE)) as f:
                np.save(f, fit["centroids"])
            if os.path.exists(out_dir):
                self.logger.warning(f"Output directory {out_dir} already exists and will be overwritten")
                shutil.rmtree(out_dir)
            t0 = time.time()
            assigned = assign_partitions(df, fit["centroids"], self.embedding_column, self.id_col, carry)
            size = self.clustering_input_partition_size
            grouped = group_by_cluster(assigned, self.n_clusters, fit["usable"], fit["dim"],
                                       parse_bytes(size) if isinstance(size, str) else size)
            with object_columns():
                written = grouped.map_partitions(write_clusters, out_dir, self.id_col, self.embedding_column, carry,
                                                 meta=pd.DataFrame({NEAREST_CENT_COL: np.zeros(0, np.int32)}),
                                                 enforce_metadata=False).compute()
            present = set(written[NEAREST_CENT_COL].tolist())
            schema = _cluster_schema(df._meta, self.id_col, self.embedding_column, carry)
            for c in range(self.n_clusters):
                if c not in present:
                    write_parquet_atomic(schema.empty_table(), os.path.join(cluster_dir(out_dir, c), CLUSTER_FILE))
            self.logger.info(f"Assigned {fit['usable']} rows to {len(present)} non-empty of {self.n_clusters} clusters, "
                             f"written at {out_dir}: {time.time() - t0:.1f} s")
        return DocumentDataset(read_clusters(out_dir, self.n_clusters))


def write_clusters(frame: pd.DataFrame, out_dir: str, id_col: str, embedding_col: str, carry: list[str]) -> pd.DataFrame:
    """Write each cluster of a shuffled partition to ``<out_dir>/nearest_cent=<c>/part.0.parquet``;
    returns the cluster ids written."""
    done = []
    for cluster_id, rows in frame.groupby(NEAREST_CENT_COL, sort=True):
        rows = rows.sort_values(id_col, kind="stable")
        columns = {id_col: pa.array(rows[id_col].to_numpy(dtype=object)),
                   embedding_col: arrow_list_from_matrix(bytes_to_rows(rows[EMB_COL]))}
        for col in carry:
            columns[col] = pa.array(rows[col].to_numpy(dtype=object) if rows[col].dtype == object else rows[col].to_numpy())
        columns[L2_DIST_TO_CENT_COL] = pa.array(rows[L2_DIST_TO_CENT_COL].to_numpy(np.float32))
        columns[COSINE_DIST_TO_CENT_COL] = pa.array(rows[COSINE_DIST_TO_CENT_COL].to_numpy(np.float32))
        write_parquet_atomic(pa.table(columns), os.path.join(cluster_dir(out_dir, int(cluster_id)), CLUSTER_FILE))
        done.append(int(cluster_id))
    return pd.DataFrame({NEAREST_CENT_COL: np.array(done, np.int32)})


def _cluster_schema(meta, id_col: str, embedding_col: str, carry: list[str]) -> pa.Schema:
    pdf = to_pandas(meta)
    id_type = pa.Schema.from_pandas(pdf[[id_col]], preserve_index=False).field(id_col).type
    fields = [pa.field(id_col, pa.string() if pa.types.is_null(id_type) else id_type),
              pa.field(embedding_col, pa.list_(pa.float32()))]
    for col in carry:
        field_type = pa.Schema.from_pandas(pdf[[col]], preserve_index=False).field(col).type
        fields.append(pa.field(col, field_type))
    fields += [pa.field(L2_DIST_TO_CENT_COL, pa.float32()), pa.field(COSINE_DIST_TO_CENT_COL, pa.float32())]
    return pa.schema(fields)


def read_cluster(emb_by_clust_dir: str, cluster_id: int, columns: list[str] | None = None) -> pd.DataFrame:
    """One cluster's rows (``columns``, default all) with ``nearest_cent``; FileNotFoundError names
    the folder when the cluster was not written."""
    folder = cluster_dir(emb_by_clust_dir, cluster_id)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} does not exist: run ClusteringModel with the same n_clusters and "
                                f"clustering_output_dir first (emb_by_clust_dir is <clustering_output_dir>/{EMBS_BY_NEAREST_CENTER})")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet") and not f.startswith("."))
    tables = [pq.read_table(f, columns=columns) for f in files]
    frame = pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(columns=columns or [])
    frame[NEAREST_CENT_COL] = np.int32(cluster_id)
    return frame


def read_clusters(emb_by_clust_dir: str, n_clusters: int) -> dd.DataFrame:
    """The per-cluster files as a Dask DataFrame, one partition per cluster."""
    with object_columns():
        return dd.from_map(read_cluster, [emb_by_clust_dir] * n_clusters, list(range(n_clusters)),
                           label="read-cluster", enforce_metadata=False)
