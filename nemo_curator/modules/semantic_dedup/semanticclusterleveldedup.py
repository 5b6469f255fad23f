"""``SemanticClusterLevelDedup``: NeMo Curator 0.9's pairwise step of SemDeDup (CPU or GPU).

Reads the clusters ``ClusteringModel`` wrote and writes into ``output_dir``::

    _semdedup_pruning_tables/cluster_<c>.parquet   per cluster, in rank order: id, max_id, cosine_sim_score
    unique_ids_<eps>.parquet/part.<k>.parquet      the rows to REMOVE at eps (0.9's name), one part per
                                                   group of clusters: id (string), <id_column>,
                                                   cosine_dist_to_cent, cluster, duplicate_of, cosine_sim_score
    _dedup_summary_<eps>.csv                       eps, kept, removed, total

``output_dir`` is thereby the ``removal_parquets_dir`` of the stage API's
``ImageDuplicatesRemovalStage`` (column ``id``): everything else is hidden from it by the leading
underscore, and extracting another eps renames the previous ``unique_ids_<eps>.parquet`` to
``_unique_ids_<eps>.parquet`` so that the folder always lists the ids of ONE eps.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Literal

import dask
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nemo_curator.datasets.doc_dataset import DocumentDataset
from nemo_curator.modules.semantic_dedup.arrays import matrix_from_arrow
from nemo_curator.modules.semantic_dedup.clusteringmodel import cluster_dir, performance_report_to
from nemo_curator.modules.semantic_dedup.clustering import COSINE_DIST_TO_CENT_COL, NEAREST_CENT_COL
from nemo_curator.modules.semantic_dedup.deduplicator import REMOVAL_ID_COL
from nemo_curator.modules.semantic_dedup.logs import flush_logger, setup_logger
from nemo_curator.modules.semantic_dedup.matching import (LEGACY_RANDOM_SEED, check_choices, distance_column,
                                                          match_cluster, rank_cluster, resolve_duplicates)
from nemo_curator.utils.file_utils import atomic_write, write_parquet_atomic

PRUNING_TABLES = "_semdedup_pruning_tables"
CLUSTERS_PER_PART = 64  # clusters per file of unique_ids_<eps>.parquet


def removal_name(eps: float) -> str:
    return f"unique_ids_{eps}.parquet"


class SemanticClusterLevelDedup:
    """Pairwise similarities within each cluster and the ids to remove (NeMo Curator 0.9's API).

    Args:
        n_clusters: clusters written by ``ClusteringModel``. Default 1000.
        emb_by_clust_dir: its ``<clustering_output_dir>/embs_by_nearest_center``.
        id_column: the id column. Default "id".
        which_to_keep: "hard" (keep the row farthest from the centroid), "easy" (closest) or
            "random" (0.9's fixed seed 42). Default "hard".
        sim_metric: distance to the centroid used for that ranking: "cosine" or "l2".
        output_dir: where the tables go (module docstring); the removal stage's folder.
        embedding_column: the embedding column. Default "embeddings".
        batched_cosine_similarity: tile side of the similarity kernel (memory: its square in
            floats); <= 0 computes each cluster as one ``n x n`` tile. Default 1024.
        logger: a Logger, or a folder for ``SemanticClusterLevelDedup.log``. Default "./".
        profile_dir: folder for Dask performance reports, or None.
    """

    def __init__(self, n_clusters: int = 1000, emb_by_clust_dir: str = "./clustering_results/embs_by_nearest_center",
                 id_column: str = "id", which_to_keep: str = "hard", sim_metric: Literal["cosine", "l2"] = "cosine",
                 output_dir: str = "./clustering_results", embedding_column: str = "embeddings",
                 batched_cosine_similarity: int = 1024, logger: logging.Logger | str = "./",
                 profile_dir: str | None = None) -> None:
        check_choices(which_to_keep, sim_metric)
        self.n_clusters = n_clusters
        self.emb_by_clust_dir = emb_by_clust_dir
        self.id_col = id_column
        self.which_to_keep = which_to_keep
        self.sim_metric = sim_metric
        self.output_dir = output_dir
        self.semdedup_pruning_tables_dir = os.path.join(output_dir, PRUNING_TABLES)
        self.computed_semantic_match_dfs = False
        self.embedding_column = embedding_column
        self.batched_cosine_similarity = batched_cosine_similarity
        self.logger = setup_logger(logger, "SemanticClusterLevelDedup")
        self.profile_dir = profile_dir

    def compute_semantic_match_dfs(self) -> None:
        """Rank every cluster and find each row's most similar earlier row (one task per cluster)."""
        try:
            if not os.path.isdir(self.emb_by_clust_dir):
                raise FileNotFoundError(f"emb_by_clust_dir {self.emb_by_clust_dir} does not exist: run ClusteringModel "
                                        f"first and pass its <clustering_output_dir>/embs_by_nearest_center")
            if os.path.exists(self.semdedup_pruning_tables_dir):
                self.logger.info(f"Removing existing directory {self.semdedup_pruning_tables_dir}")
                shutil.rmtree(self.semdedup_pruning_tables_dir)
            os.makedirs(self.semdedup_pruning_tables_dir, exist_ok=True)
            t0 = time.time()
            with performance_report_to(self.profile_dir, "semantic-match-compute"):
                tasks = [dask.delayed(semantic_matches_per_cluster, pure=False)(
                    c, self.emb_by_clust_dir, self.id_col, self.semdedup_pruning_tables_dir, self.embedding_column,
                    self.which_to_keep, self.sim_metric, self.batched_cosine_similarity) for c in range(self.n_clusters)]
                dask.compute(*tasks)
            self.logger.info(f"Time taken for Computing Semantic Matches : {time.time() - t0}")
            self.computed_semantic_match_dfs = True
        finally:
            flush_logger(self.logger)

    def extract_dedup_data(self, eps_to_extract: float) -> DocumentDataset:
        """The rows to remove at ``eps_to_extract`` (cosine similarity >= 1 - eps to an earlier row of
        their cluster), written as ``unique_ids_<eps>.parquet``; returns them as a DocumentDataset
        with 0.9's columns ``<id_column>``, ``cosine_dist_to_cent``, ``cluster``."""
        try:
            return self._extract(eps_to_extract)
        finally:
            flush_logger(self.logger)

    def _extract(self, eps_to_extract: float) -> DocumentDataset:
        if not self.computed_semantic_match_dfs:
            msg = "Run compute_semantic_match_dfs before calling extract_dedup_data"
            self.logger.error(msg)
            raise ValueError(msg)
        if not isinstance(eps_to_extract, float):
            msg = f"eps_to_extract must be a float (e.g. 0.01), got {type(eps_to_extract).__name__} {eps_to_extract!r}"
            self.logger.error(msg)
            raise TypeError(msg)
        if not 0 < eps_to_extract < 1:
            msg = (f"eps_to_extract must lie strictly between 0 and 1 (rows with cosine similarity >= 1 - eps are "
                   f"removed; 0.01 is typical), got {eps_to_extract!r}")
            self.logger.error(msg)
            raise ValueError(msg)
        self._hide_other_extractions(eps_to_extract)
        out = os.path.join(self.output_dir, removal_name(eps_to_extract))
        if os.path.exists(out):
            shutil.rmtree(out)
        t0 = time.time()
        with performance_report_to(self.profile_dir, "extracting-pruned-from-clusters"):
            chunks = [list(range(s, min(s + CLUSTERS_PER_PART, self.n_clusters)))
                      for s in range(0, self.n_clusters, CLUSTERS_PER_PART)]
            counts = dask.compute(*[dask.delayed(prune_clusters, pure=False)(
                chunk, k, self.id_col, self.emb_by_clust_dir, self.semdedup_pruning_tables_dir, eps_to_extract, out)
                for k, chunk in enumerate(chunks)])
        removed, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
        self.logger.info(f"Time taken for Extracting Pruned Data : {time.time() - t0} and output written at {out}")
        self.logger.info(f"DONE saving {total - removed} out of {total}. Removed: {removed}. Epsilon: {eps_to_extract:.4f}")
        summary = pd.DataFrame({"eps": [eps_to_extract], "kept": [total - removed], "removed": [removed], "total": [total]})
        with atomic_write(os.path.join(self.output_dir, f"_dedup_summary_{eps_to_extract}.csv"), "w") as f:
            summary.to_csv(f, index=False)
        return DocumentDataset.read_parquet(out, columns=[self.id_col, COSINE_DIST_TO_CENT_COL, "cluster"],
                                            files_per_partition=1)

    def _hide_other_extractions(self, eps: float) -> None:
        """Rename earlier ``unique_ids_<other eps>.parquet`` so that the removal stage sees one eps."""
        if not os.path.isdir(self.output_dir):
            return
        for name in os.listdir(self.output_dir):
            if name.startswith("unique_ids_") and name.endswith(".parquet") and name != removal_name(eps):
                hidden = os.path.join(self.output_dir, "_" + name)
                if os.path.exists(hidden):
                    shutil.rmtree(hidden)
                os.replace(os.path.join(self.output_dir, name), hidden)
                self.logger.warning(f"{name} renamed to _{name}: the folder now lists the ids to remove at eps={eps} only")


def semantic_matches_per_cluster(cluster_id: int, emb_by_clust_dir: str, id_col: str, output_dir: str,
                                 embedding_col: str, which_to_keep: str, sim_metric: str,
                                 batched_cosine_similarity: int = 1024) -> int:
    """Rank one cluster, find each row's most similar earlier row and write
    ``<output_dir>/cluster_<c>.parquet`` (in rank order: ``id``, ``max_id``, ``cosine_sim_score``
    = max(0, that similarity), 0.9's table; the first row points to itself with 0). Returns its rows."""
    folder = cluster_dir(emb_by_clust_dir, cluster_id)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} does not exist: run ClusteringModel with n_clusters >= {cluster_id + 1} "
                                f"and this emb_by_clust_dir first")
    table = pq.read_table(folder, columns=[id_col, embedding_col, distance_column(sim_metric)])
    where = f" in {folder}"
    X = matrix_from_arrow(table.column(embedding_col), where)
    frame = table.drop_columns([embedding_col]).to_pandas()
    frame["_pos"] = np.arange(len(frame))
    frame[NEAREST_CENT_COL] = cluster_id
    ranked = rank_cluster(frame, id_col, which_to_keep, sim_metric, LEGACY_RANDOM_SEED)
    max_sim, argmax = match_cluster(ranked, batched_cosine_similarity, embeddings=X[ranked["_pos"].to_numpy()])
    ids = ranked[id_col].to_numpy(dtype=object)
    max_id = ids[np.where(argmax >= 0, argmax, np.arange(len(ids)))] if len(ids) else ids
    score = np.where(np.isfinite(max_sim), np.maximum(max_sim, 0), 0).astype(np.float32)
    write_parquet_atomic(pa.table({"id": pa.array(ids), "max_id": pa.array(max_id),
                                   "cosine_sim_score": pa.array(score, pa.float32()),
                                   "_argmax": pa.array(argmax)}), os.path.join(output_dir, f"cluster_{cluster_id}.parquet"))
    return len(ids)


def prune_clusters(cluster_ids: list[int], part: int, id_col: str, emb_by_clust_dir: str,
                   semdedup_pruning_tables_dir: str, eps: float, out_dir: str) -> tuple[int, int]:
    """Write the rows to remove at ``eps`` of ``cluster_ids`` as ``<out_dir>/part.<part>.parquet``;
    returns ``(removed, total rows)``."""
    frames, total = [], 0
    for c in cluster_ids:
        cluster = pq.read_table(cluster_dir(emb_by_clust_dir, c), columns=[id_col, COSINE_DIST_TO_CENT_COL]).to_pandas()
        table = pq.read_table(os.path.join(semdedup_pruning_tables_dir, f"cluster_{c}.parquet")).to_pandas()
        total += len(cluster)
        if len(table) < 2:
            continue
        score = table["cosine_sim_score"].to_numpy(np.float32)
        keep, root = resolve_duplicates(np.where(np.arange(len(table)) == 0, -np.inf, score).astype(np.float32),
                                        table["_argmax"].to_numpy(), eps)
        gone = table.loc[~keep, ["id"]].assign(duplicate_of=table["id"].to_numpy(dtype=object)[root[~keep]],
                                               cosine_sim_score=score[~keep])
        gone = gone.merge(cluster.rename(columns={id_col: "id"}) if id_col != "id" else cluster, on="id", how="left")
        frames.append(gone.assign(cluster=np.int32(c)))
    removed = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {"id": pd.Series([], dtype=object), "duplicate_of": pd.Series([], dtype=object),
         "cosine_sim_score": np.zeros(0, np.float32), COSINE_DIST_TO_CENT_COL: np.zeros(0, np.float32),
         "cluster": np.zeros(0, np.int32)})
    columns = {REMOVAL_ID_COL: pa.array(removed["id"].astype(str).tolist(), pa.string())}
    if id_col != REMOVAL_ID_COL:
        columns[id_col] = pa.array(removed["id"].to_numpy(dtype=object))
    columns[COSINE_DIST_TO_CENT_COL] = pa.array(removed[COSINE_DIST_TO_CENT_COL].to_numpy(np.float32))
    columns["cluster"] = pa.array(removed["cluster"].to_numpy(np.int32))
    columns["duplicate_of"] = pa.array(removed["duplicate_of"].astype(str).tolist(), pa.string())
    columns["cosine_sim_score"] = pa.array(removed["cosine_sim_score"].to_numpy(np.float32))
    write_parquet_atomic(pa.table(columns), os.path.join(out_dir, f"part.{part}.parquet"))
    return len(removed), total
