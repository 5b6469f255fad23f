"""Deduplication on the embeddings: SemDeDup (legacy 0.9 calls and the native form) and exact dedup.

Real components throughout: the session LocalCluster, real parquet and tar shards, real faiss
k-means, planted near-duplicate groups on the unit sphere (``semantic_dedup.synthetic``).
"""
import hashlib
import os
import textwrap

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.datasets.doc_dataset import DocumentDataset
from nemo_curator.modules.semantic_dedup import (ClusteringModel, ExactDeduplicator, SemanticClusterLevelDedup,
                                                 SemanticDeduplicator, dedup_report, write_removal_parquets)
from nemo_curator.modules.semantic_dedup.arrays import EmbeddingDimensionError
from nemo_curator.modules.semantic_dedup.kernel import KernelStats, max_similarity_to_earlier
from nemo_curator.modules.semantic_dedup.synthetic import planted_embeddings
from nemo_curator.utils.file_utils import write_parquet_atomic
from nemo_curator.utils.sample_data import Sample, make_samples, write_shard

EPS = 0.01
THRESHOLD = np.float32(1 - EPS)
BAND = 2e-4  # no planted pair lies this close to the threshold: float32 order of summation cannot flip one


# ----------------------------------------------------------------------------------------------
# Data
def write_embedding_shards(folder, ids, embeddings, n_shards, members=None, rows_extra=None):
    """Shards ``00000.tar``... whose parquets hold ``key`` and ``image_embedding`` (None rows kept as null).

    ``members``: {id: image bytes} (default: a 1-byte stand-in, the tars only need to exist)."""
    bounds = np.linspace(0, len(ids), n_shards + 1).astype(int)
    for s in range(n_shards):
        part = list(range(bounds[s], bounds[s + 1]))
        samples = [Sample(ids[i], {"jpg": (members or {}).get(ids[i], b"x")}, None) for i in part]
        paths = write_shard(folder, f"{s:05d}", samples)
        column = [None if embeddings[i] is None else np.asarray(embeddings[i], np.float32) for i in part]
        table = {"key": pa.array([ids[i] for i in part], pa.string()),
                 "image_embedding": pa.array(column, pa.list_(pa.float32()))}
        for name, values in (rows_extra or {}).items():
            table[name] = pa.array([values[i] for i in part])
        write_parquet_atomic(pa.table(table), paths["parquet"])
    return str(folder)


def planted_dataset(folder, planted, n_shards=4):
    write_embedding_shards(folder, list(planted.ids), list(planted.embeddings), n_shards)
    return ImageTextPairDataset.from_webdataset(str(folder), id_col="key")


@pytest.fixture(scope="module")
def planted20k():
    """20,000 rows, 50 topics; groups of 2-5 tight (similarity > 0.993) or loose (< 0.987) copies."""
    tight = planted_embeddings(20000, n_topics=50, duplicate_fraction=0.2, sigma=(0.02, 0.08), seed=11)
    loose = planted_embeddings(2000, n_topics=50, duplicate_fraction=1.0, sigma=(0.12, 0.16), seed=12)
    X = tight.embeddings.copy()
    group = tight.group.copy()
    singles = np.flatnonzero(group < 0)[:2000]  # replace 2,000 singletons by the loose groups
    X[singles] = loose.embeddings
    first_loose = group.max() + 1
    group[singles] = np.where(loose.group >= 0, loose.group + first_loose, -1)
    tight.embeddings, tight.group = X, group
    tight.loose = group >= first_loose  # rows of loose groups: not duplicates at eps=0.01
    return tight


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory, planted20k):
    folder = tmp_path_factory.mktemp("planted20k")
    write_embedding_shards(folder, list(planted20k.ids), list(planted20k.embeddings), 4)
    return folder


def brute_force_removed(X, ids, rank_key, ascending=False, threshold=THRESHOLD, band=BAND):
    """The SemDeDup answer by all pairs: rank rows by (rank_key, id), and remove every row that has a
    pair >= threshold with a row ranked before it. Asserts no pair lies within ``band`` of the threshold."""
    order = pd.DataFrame({"k": rank_key, "id": ids}).sort_values(["k", "id"], ascending=ascending).index.to_numpy()
    Xs = X[order]
    removed, chunk = set(), 2500
    for r0 in range(0, len(Xs), chunk):
        S = Xs[r0: r0 + chunk] @ Xs[r0:].T  # rows i of the chunk against every j >= r0
        S[np.tril_indices(len(S), m=S.shape[1])] = 0  # keep i < j only
        assert not ((S > threshold - band) & (S < threshold + band)).any(), "planted data too close to the threshold"
        i, j = np.nonzero(S >= threshold)
        removed.update(ids[order[j + r0]].tolist())  # j is ranked after i: j goes
    return removed


def stage_ids(removal_parquets_dir, duplicate_id_field="id"):
    """What ImageDuplicatesRemovalStage.setup() loads (NVIDIA-NeMo/Curator, stages/image/deduplication/removal.py)."""
    parquets = [f for f in os.listdir(removal_parquets_dir) if f.endswith(".parquet")]
    if not parquets:
        raise FileNotFoundError(f"No parquet files found in {removal_parquets_dir}")
    schema = pa.schema([pa.field(duplicate_id_field, pa.string())])
    table = pads.dataset(removal_parquets_dir, format="parquet", schema=schema).to_table(columns=[duplicate_id_field])
    return set(table[duplicate_id_field].to_pylist())


def removed_of(dataset, keep_column="is_unique"):
    meta = dataset.metadata[[dataset.id_col, keep_column]].compute()
    return set(meta.loc[~meta[keep_column], dataset.id_col])


# ----------------------------------------------------------------------------------------------
# The kernel
@pytest.mark.parametrize("block", [1, 7, 64, 300, 0])
def test_kernel_equals_dense_max_over_earlier_rows(block):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 32)).astype(np.float32)
    X[150] = X[20]  # exact copies: similarity 1 to an earlier row
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    best, arg = max_similarity_to_earlier(X, block_size=block)
    S = (X @ X.T).astype(np.float64)
    S[np.tril_indices(300)] = -np.inf  # S[i, j] for i < j only
    expected_best, expected_arg = S.max(axis=0), S.argmax(axis=0)
    assert best[0] == -np.inf and arg[0] == -1
    np.testing.assert_allclose(best[1:], expected_best[1:], atol=1e-5)
    np.testing.assert_array_equal(arg[1:], expected_arg[1:])
    assert arg[150] == 20 and best[150] == pytest.approx(1.0, abs=1e-6)


def test_kernel_memory_is_one_tile_not_the_cluster_squared():
    n, block = 5000, 256
    X = planted_embeddings(n, dim=64, seed=3).embeddings
    stats = KernelStats()
    best, _ = max_similarity_to_earlier(X, block_size=block, stats=stats)
    n_blocks = -(-n // block)
    assert stats.peak_tile_elements == block * block  # 65,536 floats, whatever n
    assert stats.peak_tile_elements * 300 < n * n
    assert stats.tiles == n_blocks * (n_blocks + 1) // 2  # the upper triangle of tiles only
    whole = KernelStats()
    best_whole, _ = max_similarity_to_earlier(X, block_size=0, stats=whole)
    assert whole.tiles == 1 and whole.peak_tile_elements == n * n  # batched_cosine_similarity <= 0: 0.9's n x n
    np.testing.assert_allclose(best, best_whole, atol=1e-5)


def test_sample_tree_is_the_rows_of_smallest_priority_and_checks_dimensions():
    from nemo_curator.modules.semantic_dedup.clustering import merge_scans, scan_partition

    rng = np.random.default_rng(0)
    frames = [pd.DataFrame({"e": list(rng.standard_normal((n, 4)).astype(np.float32)) + [None]}) for n in (50, 0, 70, 30)]
    scans = [scan_partition(f, "e", 40, 1, i) for i, f in enumerate(frames)]
    assert [len(s["keys"]) for s in scans] == [40, 0, 40, 30] and [s["nulls"] for s in scans] == [1, 1, 1, 1]
    merged = merge_scans([merge_scans(scans[:2], 40, "e"), merge_scans(scans[2:], 40, "e")], 40, "e")
    rows = np.concatenate([np.stack(f["e"].dropna()) / np.linalg.norm(np.stack(f["e"].dropna()), axis=1, keepdims=True)
                           for f in frames if len(f) > 1])
    keys = np.concatenate([np.random.default_rng([1, i]).random(len(f) - 1) for i, f in enumerate(frames)])
    np.testing.assert_allclose(merged["sample"], rows[np.argsort(keys)[:40]], rtol=1e-6)  # a uniform sample
    assert merged["usable"] == 150 and merged["rows"] == 154
    other = scan_partition(pd.DataFrame({"e": [np.ones(3, np.float32)]}), "e", 40, 1, 7)
    with pytest.raises(EmbeddingDimensionError, match=r"'e' mixes dimensions across partitions: 3 \(partition 7\), 4"):
        merge_scans([merged, other], 40, "e")


# ----------------------------------------------------------------------------------------------
# Section 4: correctness against all pairs
@pytest.fixture(scope="module")
def legacy_one_cluster(planted_dir, tmp_path_factory, client):
    """The tutorial's two steps with n_clusters=1 on the 20,000 planted rows."""
    out = tmp_path_factory.mktemp("legacy1")
    dataset = ImageTextPairDataset.from_webdataset(str(planted_dir), id_col="key")
    model = ClusteringModel(id_column="key", embedding_column="image_embedding", max_iter=10, n_clusters=1,
                            random_state=42, clustering_output_dir=str(out / "cluster_output"), logger=str(out))
    clustered = model(DocumentDataset(dataset.metadata))
    dedup = SemanticClusterLevelDedup(n_clusters=1, emb_by_clust_dir=str(out / "cluster_output" / "embs_by_nearest_center"),
                                      id_column="key", which_to_keep="hard", sim_metric="cosine",
                                      embedding_column="image_embedding", batched_cosine_similarity=1024,
                                      output_dir=str(out / "duplicates"), logger=str(out))
    dedup.compute_semantic_match_dfs()
    ids = dedup.extract_dedup_data(eps_to_extract=EPS)
    return {"out": out, "clustered": clustered, "dedup": dedup, "removed": set(ids.df["key"].compute()), "ids": ids}


def test_one_cluster_equals_brute_force_all_pairs(legacy_one_cluster, planted20k):
    out = legacy_one_cluster["out"]
    X, ids = planted20k.embeddings, planted20k.ids
    # k-means with one cluster: the centroid is the mean of the (unit) embeddings
    centroid = np.load(out / "cluster_output" / "kmeans_centroids.npy")
    assert centroid.shape == (1, 768)
    np.testing.assert_allclose(centroid[0], X.astype(np.float64).mean(axis=0), atol=1e-5)
    cluster = legacy_one_cluster["clustered"].df.compute().set_index("key").loc[list(ids)]
    mean = X.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(cluster["cosine_dist_to_cent"], 1 - X @ mean / np.linalg.norm(mean), atol=1e-5)
    reference = brute_force_removed(X, ids, cluster["cosine_dist_to_cent"].to_numpy())
    assert len(reference) > 2500  # the planted duplicates of the tight groups
    assert legacy_one_cluster["removed"] == reference
    # the reference itself: every tight group loses all rows but one, loose groups (similarity < 0.989) none
    tight = (planted20k.group >= 0) & ~planted20k.loose
    assert reference <= set(ids[tight])
    per_group = pd.Series(planted20k.group[tight], index=ids[tight])
    sizes = per_group.value_counts()
    assert (per_group.loc[sorted(reference)].value_counts().reindex(sizes.index, fill_value=0) == sizes - 1).all()


@pytest.fixture(scope="module")
def native_one_cluster(planted_dir, client):
    dataset = ImageTextPairDataset.from_webdataset(str(planted_dir), id_col="key")
    dedup = SemanticDeduplicator(eps=EPS, n_clusters=1, which_to_keep="hard", max_iter=10, random_state=42)
    return dataset, dedup, dedup(dataset)


def test_native_one_cluster_equals_brute_force_and_legacy(native_one_cluster, planted20k, legacy_one_cluster):
    dataset, dedup, result = native_one_cluster
    assert result.metadata.npartitions == dataset.metadata.npartitions
    meta = result.metadata.compute()
    assert {"duplicate_of", "max_similarity", "is_unique"} <= set(meta.columns)
    removed = set(meta.loc[~meta["is_unique"], "key"])
    assert removed == legacy_one_cluster["removed"]
    assert dedup.summary["removed"] == len(removed) and dedup.summary["rows"] == 20000
    # duplicate_of names a kept row of the same planted group; null for kept rows
    by_id = meta.set_index("key")
    group = pd.Series(planted20k.group, index=planted20k.ids)
    gone = by_id[~by_id["is_unique"]]
    assert by_id.loc[gone["duplicate_of"], "is_unique"].all()
    assert (group.loc[gone.index].to_numpy() == group.loc[gone["duplicate_of"]].to_numpy()).all()
    assert by_id.loc[by_id["is_unique"], "duplicate_of"].isna().all()
    assert (gone["max_similarity"] >= THRESHOLD).all() and (by_id.loc[by_id["is_unique"], "max_similarity"].fillna(0) < THRESHOLD).all()


def test_many_clusters_recall_against_the_reference(planted_dir, planted20k, legacy_one_cluster, client):
    reference = legacy_one_cluster["removed"]
    dataset = ImageTextPairDataset.from_webdataset(str(planted_dir), id_col="key")
    result = SemanticDeduplicator(eps=EPS, n_clusters=40, max_iter=20, random_state=42)(dataset)
    removed = removed_of(result)
    group = pd.Series(planted20k.group, index=planted20k.ids)
    expected = group.loc[sorted(reference)].value_counts()  # duplicates to find per planted group
    found = group.loc[sorted(removed)].value_counts().reindex(expected.index, fill_value=0)
    recall = np.minimum(found, expected).sum() / expected.sum()
    print(f"recall with 40 clusters: {recall:.4f} ({len(removed)} removed, reference {len(reference)})")
    assert recall >= 0.99
    assert removed <= set(group.index[group >= 0])  # nothing outside a planted group goes
    sizes = group[group >= 0].value_counts()
    assert (sizes - group.loc[sorted(removed)].value_counts().reindex(sizes.index, fill_value=0) >= 1).all()  # never all


# ----------------------------------------------------------------------------------------------
# which_to_keep: one row kept per group, the one the ranking puts first
@pytest.fixture(scope="module")
def tight_groups(tmp_path_factory, client):
    planted = planted_embeddings(3000, n_topics=8, duplicate_fraction=0.5, group_sizes=(2, 5), sigma=(0.005, 0.06),
                                 exact_fraction=0.2, seed=5)
    out = tmp_path_factory.mktemp("tight")
    ds = planted_dataset(out / "data", planted, n_shards=3)
    ClusteringModel(id_column="key", embedding_column="image_embedding", n_clusters=4, max_iter=10,
                    clustering_output_dir=str(out / "clusters"), logger=str(out))(DocumentDataset(ds.metadata))
    frame = pd.concat([pd.read_parquet(out / "clusters" / "embs_by_nearest_center" / f"nearest_cent={c}").assign(cluster=c)
                       for c in range(4)]).set_index("key")
    return {"planted": planted, "out": out, "frame": frame, "dataset": ds}


def _kept_by(tight_groups, which_to_keep, sim_metric="cosine"):
    out = tight_groups["out"]
    dedup = SemanticClusterLevelDedup(n_clusters=4, emb_by_clust_dir=str(out / "clusters" / "embs_by_nearest_center"),
                                      id_column="key", which_to_keep=which_to_keep, sim_metric=sim_metric,
                                      embedding_column="image_embedding",
                                      output_dir=str(out / f"dup_{which_to_keep}_{sim_metric}"), logger=str(out))
    dedup.compute_semantic_match_dfs()
    removed = set(dedup.extract_dedup_data(eps_to_extract=EPS).df["key"].compute())
    planted = tight_groups["planted"]
    members = pd.Series(planted.group, index=planted.ids)
    members = members[members >= 0]
    assert removed <= set(members.index)
    kept = members[~members.index.isin(list(removed))]
    return kept, members


@pytest.mark.parametrize("which_to_keep,sim_metric,ascending", [("hard", "cosine", False), ("easy", "cosine", True),
                                                                 ("hard", "l2", False), ("easy", "l2", True)])
def test_one_kept_per_group_chosen_by_which_to_keep(tight_groups, which_to_keep, sim_metric, ascending):
    kept, members = _kept_by(tight_groups, which_to_keep, sim_metric)
    frame = tight_groups["frame"]
    rows = frame.loc[members.index].rename_axis(None).assign(group=members.to_numpy(), key=members.index)
    parts = rows.groupby(["group", "cluster"])  # a group k-means split keeps one row per part
    assert parts.ngroups < 1.05 * members.nunique()
    assert kept.value_counts().sort_index().equals(rows.groupby("group")["cluster"].nunique().rename("count"))
    dist = "cosine_dist_to_cent" if sim_metric == "cosine" else "l2_dist_to_cent"
    expected = rows.sort_values([dist, "key"], ascending=ascending).groupby(["group", "cluster"])["key"].first()
    assert set(kept.index) == set(expected)  # the first row of each part by the ranking
    exact = rows.groupby("group")[dist].nunique() == 1  # exact copies: distance ties broken by id
    assert exact.sum() > 20


def test_random_keeps_one_per_group_reproducibly_and_not_the_hard_choice(tight_groups):
    kept, members = _kept_by(tight_groups, "random")
    rows = tight_groups["frame"].loc[members.index].assign(group=members.to_numpy())
    assert kept.value_counts().sort_index().equals(rows.groupby("group")["cluster"].nunique().rename("count"))
    again, _ = _kept_by(tight_groups, "random")
    assert set(again.index) == set(kept.index)
    hard, _ = _kept_by(tight_groups, "hard")
    easy, _ = _kept_by(tight_groups, "easy")
    same_as_hard = len(set(kept.index) & set(hard.index)) / len(kept)
    same_as_easy = len(set(kept.index) & set(easy.index)) / len(kept)
    assert 0.15 < same_as_hard < 0.6 and 0.15 < same_as_easy < 0.6  # groups of 2-5: about 1 / size


# ----------------------------------------------------------------------------------------------
# The tutorial of the issue, as written
TUTORIAL = textwrap.dedent('''
    import os
    from nemo_curator import ClusteringModel, SemanticClusterLevelDedup
    from nemo_curator.datasets import DocumentDataset

    embeddings_dataset = DocumentDataset(dataset.metadata)
    clustering_output = os.path.join(semantic_dedup_outputs, "cluster_output")
    clustering_model = ClusteringModel(
        id_column=id_col, embedding_column="image_embedding", max_iter=10, n_clusters=1,
        random_state=42, clustering_output_dir=clustering_output,
    )
    clustered_dataset = clustering_model(embeddings_dataset)

    semantic_dedup = SemanticClusterLevelDedup(
        n_clusters=1, emb_by_clust_dir=os.path.join(clustering_output, "embs_by_nearest_center"),
        id_column=id_col, which_to_keep="hard", sim_metric="cosine", embedding_column="image_embedding",
        batched_cosine_similarity=1024, output_dir=os.path.join(semantic_dedup_outputs, "duplicates"),
    )
    semantic_dedup.compute_semantic_match_dfs()
    deduplicated_dataset_ids = semantic_dedup.extract_dedup_data(eps_to_extract=0.01)

    dataset.metadata["is_unique"] = ~dataset.metadata["key"].isin(deduplicated_dataset_ids.df["key"].compute())
    dataset.to_webdataset("./deduplicated_dataset", "is_unique")
''')


def _run_tutorial(code, tmp_path, monkeypatch, n_clusters):
    planted = planted_embeddings(2000, n_topics=10, duplicate_fraction=0.3, seed=9)
    dataset = planted_dataset(tmp_path / "data", planted, n_shards=3)
    monkeypatch.chdir(tmp_path)
    code = code.replace("n_clusters=1,", f"n_clusters={n_clusters},")
    scope = {"dataset": dataset, "semantic_dedup_outputs": str(tmp_path / "semdedup"), "id_col": "key"}
    exec(compile(code, "tutorial", "exec"), scope)
    removed = set(scope["deduplicated_dataset_ids"].df["key"].compute())
    planted_dups = int(sum(np.bincount(planted.group[planted.group >= 0]) - 1))
    assert len(removed) == planted_dups  # tight planted groups: all but one row of each
    written = ImageTextPairDataset.from_webdataset(str(tmp_path / "deduplicated_dataset"), id_col="key")
    assert len(written.metadata) == 2000 - planted_dups
    # the output folder is what the removal stage reads, and it names the same rows
    assert stage_ids(tmp_path / "semdedup" / "duplicates") == removed
    assert os.path.exists(tmp_path / "SemanticClusterLevelDedup.log")  # logger="./", as in 0.9
    return removed


@pytest.mark.parametrize("n_clusters", [1, 10])
def test_tutorial_runs_as_written(tmp_path, monkeypatch, client, n_clusters):
    code = TUTORIAL.replace("from nemo_curator import", "from nemo_curator.modules.semantic_dedup import").replace(
        "from nemo_curator.datasets import DocumentDataset", "from nemo_curator.datasets.doc_dataset import DocumentDataset")
    _run_tutorial(code, tmp_path, monkeypatch, n_clusters)


def test_tutorial_runs_with_top_level_imports(tmp_path, monkeypatch, client):
    _run_tutorial(TUTORIAL, tmp_path, monkeypatch, 1)


# ----------------------------------------------------------------------------------------------
# The removal stage reads what both forms write
def test_legacy_output_dir_and_native_removal_dir_are_read_alike_by_the_removal_stage(legacy_one_cluster,
                                                                                      native_one_cluster, tmp_path):
    duplicates = legacy_one_cluster["out"] / "duplicates"
    assert stage_ids(duplicates) == legacy_one_cluster["removed"]
    result = native_one_cluster[2]
    summary = write_removal_parquets(result, tmp_path / "removal")
    assert sorted(os.listdir(tmp_path / "removal")) == ["00000.parquet", "00001.parquet", "00002.parquet", "00003.parquet"]
    assert stage_ids(tmp_path / "removal") == legacy_one_cluster["removed"] and summary["removed"] == len(legacy_one_cluster["removed"])
    table = pq.read_table(tmp_path / "removal" / "00000.parquet")
    assert table.schema.field("id").type == pa.string() and {"duplicate_of", "max_similarity"} <= set(table.column_names)
    # another eps replaces the stage's view (the former list is renamed, hidden from it)
    dedup = legacy_one_cluster["dedup"]
    looser = set(dedup.extract_dedup_data(eps_to_extract=0.02).df["key"].compute())
    assert looser >= legacy_one_cluster["removed"] and stage_ids(duplicates) == looser
    assert os.path.isdir(duplicates / "_unique_ids_0.01.parquet")
    dedup.extract_dedup_data(eps_to_extract=EPS)
    assert stage_ids(duplicates) == legacy_one_cluster["removed"]
    summary_csv = pd.read_csv(duplicates / "_dedup_summary_0.01.csv")
    removed = len(legacy_one_cluster["removed"])
    assert summary_csv.to_dict("records") == [{"eps": EPS, "kept": 20000 - removed, "removed": removed, "total": 20000}]
    with pytest.raises(FileExistsError, match="other parquet files"):
        write_removal_parquets(result, duplicates)


# ----------------------------------------------------------------------------------------------
# Section 6: bad input
def test_null_and_zero_embeddings_are_kept_and_never_removed(tmp_path, client):
    planted = planted_embeddings(600, n_topics=4, duplicate_fraction=0.4, sigma=(0.0, 0.03), seed=2)
    embeddings = list(planted.embeddings)
    group = planted.group
    first_of = {g: i for i, g in reversed(list(enumerate(group))) if g >= 0}
    nulled = [first_of[g] for g in list(first_of)[:20]]  # one member of 20 groups failed to embed
    for i in nulled:
        embeddings[i] = None
    zero = np.flatnonzero(group < 0)[:3]
    for i in zero:
        embeddings[i] = np.zeros(768, np.float32)
    ids = list(planted.ids)
    write_embedding_shards(tmp_path / "data", ids, embeddings, 3)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "data"), id_col="key")
    dedup = SemanticDeduplicator(eps=EPS, n_clusters=2, max_iter=5)
    meta = dedup(dataset).metadata.compute().set_index("key")
    failed = [ids[i] for i in nulled] + [ids[i] for i in zero]
    assert meta.loc[failed, "is_unique"].all() and meta.loc[failed, "duplicate_of"].isna().all()
    assert meta.loc[failed, "max_similarity"].isna().all()
    assert dedup.summary["null_embeddings"] == 20 and dedup.summary["unusable_embeddings"] == 3
    members = pd.Series(group, index=ids)
    still = members[(members >= 0) & ~members.index.isin(failed)]
    kept = still[meta.loc[still.index, "is_unique"].to_numpy()]
    assert kept.value_counts().max() == 1 and set(kept) == set(still)  # the other members: one kept per group
    # a shard of nulls only (every image failed) is not a crash either
    write_embedding_shards(tmp_path / "nulls", ids[:20], [None] * 10 + list(planted.embeddings[10:20]), 2)
    nulls = ImageTextPairDataset.from_webdataset(str(tmp_path / "nulls"), id_col="key")
    out = SemanticDeduplicator(eps=EPS, n_clusters=1, max_iter=5)(nulls).metadata.compute()
    assert out["is_unique"].iloc[:10].all()


def test_mixed_dimensions_raise_naming_the_column(tmp_path, client):
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(768).astype(np.float32) for _ in range(20)]
    ids = [f"{i:09d}" for i in range(20)]
    within = rows[:9] + [rng.standard_normal(512).astype(np.float32)] + rows[10:]
    write_embedding_shards(tmp_path / "within", ids, within, 1)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "within"), id_col="key")
    with pytest.raises(EmbeddingDimensionError, match="'image_embedding'.*mixes dimensions.*768.*512"):
        SemanticDeduplicator(n_clusters=2)(dataset)
    across = rows[:10] + [rng.standard_normal(512).astype(np.float32) for _ in range(10)]
    write_embedding_shards(tmp_path / "across", ids, across, 2)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "across"), id_col="key")
    with pytest.raises(ValueError, match=r"'image_embedding' mixes dimensions across partitions: 512 \(partition 1\), 768"):
        SemanticDeduplicator(n_clusters=2)(dataset)
    with pytest.raises(ValueError, match="'image_embedding'"):
        ClusteringModel(id_column="key", embedding_column="image_embedding", n_clusters=2, logger=str(tmp_path),
                        clustering_output_dir=str(tmp_path / "c"))(DocumentDataset(dataset.metadata))


@pytest.mark.parametrize("eps", [0, 0.0, 1, 1.0, -0.01, 1.5, float("nan")])
def test_eps_outside_zero_one_raises(eps):
    with pytest.raises(ValueError, match="eps must lie strictly between 0 and 1"):
        SemanticDeduplicator(eps=eps)


def test_legacy_argument_errors(legacy_one_cluster, tmp_path):
    dedup = legacy_one_cluster["dedup"]
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        dedup.extract_dedup_data(eps_to_extract=1.0)
    with pytest.raises(TypeError, match="eps_to_extract must be a float"):
        dedup.extract_dedup_data(eps_to_extract=1)  # 0.9: an int is a TypeError
    fresh = SemanticClusterLevelDedup(n_clusters=1, output_dir=str(tmp_path), logger=str(tmp_path))
    with pytest.raises(ValueError, match="Run compute_semantic_match_dfs before calling extract_dedup_data"):
        fresh.extract_dedup_data(0.01)
    with pytest.raises(ValueError, match="which_to_keep must be one of"):
        SemanticClusterLevelDedup(which_to_keep="hardest", logger=str(tmp_path))
    with pytest.raises(ValueError, match="Only cosine and l2 are supported"):
        SemanticDeduplicator(sim_metric="dot")
    with pytest.raises(FileNotFoundError, match="run ClusteringModel"):
        SemanticClusterLevelDedup(n_clusters=3, emb_by_clust_dir=str(tmp_path / "none"), output_dir=str(tmp_path / "o"),
                                  logger=str(tmp_path)).compute_semantic_match_dfs()


def test_too_many_clusters_and_missing_column(planted_dir, client):
    dataset = ImageTextPairDataset.from_webdataset(str(planted_dir), id_col="key")
    with pytest.raises(ValueError, match="Please reduce n_clusters to be less than or equal to 20000"):
        SemanticDeduplicator(n_clusters=20001, kmeans_sample_size=20001)(dataset)
    with pytest.raises(KeyError, match="'clip_embedding' is not in the dataset's metadata"):
        SemanticDeduplicator(embedding_column="clip_embedding")(dataset)


# ----------------------------------------------------------------------------------------------
# Exact duplicates by image bytes
@pytest.fixture
def byte_copies(tmp_path):
    rng = np.random.default_rng(4)
    samples = make_samples(12, 0, rng, sizes=[(32, 24)])
    samples[8].members["jpg"] = samples[1].members["jpg"]  # shard 1 copies an image of shard 0, twice
    samples[9].members["jpg"] = samples[1].members["jpg"]
    samples[4].members["jpg"] = samples[3].members["jpg"]  # a copy within shard 0
    write_shard(tmp_path / "data", "00000", samples[:6], extra_rows=[{"key": "000000099"}])  # a row without image
    write_shard(tmp_path / "data", "00001", samples[6:])
    return tmp_path, samples


def test_exact_dedup_hashes_the_tar_bytes(byte_copies, client):
    tmp_path, samples = byte_copies
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "data"), id_col="key")
    dedup = ExactDeduplicator()
    result = dedup(dataset)
    assert result.metadata.npartitions == 2
    meta = result.metadata.compute().set_index("key")
    dups = meta.loc[~meta["is_unique"], "duplicate_of"].to_dict()
    keys = [s.key for s in samples]
    assert dups == {keys[8]: keys[1], keys[9]: keys[1], keys[4]: keys[3]}
    assert meta.loc["000000099", "is_unique"] and pd.isna(meta.loc["000000099", "sha256"])
    assert meta.loc[keys[0], "sha256"] == hashlib.sha256(samples[0].members["jpg"]).hexdigest()
    assert dedup.summary == {"hashed": 12, "removed": 3, "hash_column_present": False}
    summary = result.to_webdataset(str(tmp_path / "curated"), filter_column="is_unique")
    assert summary["rows_kept"] == 10
    write_removal_parquets(result, tmp_path / "removal")
    assert stage_ids(tmp_path / "removal") == {keys[8], keys[9], keys[4]}


def test_exact_dedup_uses_the_sha256_column_and_fills_its_gaps(byte_copies, client):
    tmp_path, samples = byte_copies
    keys = [s.key for s in samples]
    for name in ("00000", "00001"):
        path = tmp_path / "data" / f"{name}.parquet"
        frame = pd.read_parquet(path)
        digest = {k: hashlib.sha256(s.members["jpg"]).hexdigest().upper() for k, s in zip(keys, samples)}
        frame["sha256"] = frame["key"].map(digest)
        frame.loc[frame["key"] == keys[2], "sha256"] = digest[keys[5]]  # the column says 2 and 5 are copies
        frame.loc[frame["key"] == keys[9], "sha256"] = None  # unknown: hashed from the tar (a copy of 1)
        write_parquet_atomic(frame, path)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "data"), id_col="key")
    meta = ExactDeduplicator()(dataset).metadata.compute().set_index("key")
    dups = meta.loc[~meta["is_unique"], "duplicate_of"].to_dict()
    assert dups == {keys[8]: keys[1], keys[9]: keys[1], keys[4]: keys[3], keys[5]: keys[2]}
    assert meta.loc[keys[9], "sha256"] == hashlib.sha256(samples[1].members["jpg"]).hexdigest()


# ----------------------------------------------------------------------------------------------
# Report section and command line
def test_report_section_counts_by_eps_and_shows_pairs(tmp_path, client):
    rng = np.random.default_rng(6)
    samples = make_samples(16, 0, rng, sizes=[(48, 32)])
    planted = planted_embeddings(16, n_topics=2, duplicate_fraction=0.5, group_sizes=(2, 2), sigma=(0.04, 0.1), seed=1)
    members = {s.key: s.members["jpg"] for s in samples}
    ids = [s.key for s in samples]
    write_embedding_shards(tmp_path / "data", ids, list(planted.embeddings), 2, members=members)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "data"), id_col="key")
    result = SemanticDeduplicator(eps=EPS, n_clusters=1, max_iter=5)(dataset)
    report = dedup_report(result, eps_values=(0.001, 0.01, 0.1), pairs=3)
    removed = len(removed_of(result))
    table = report.eps_table.set_index("eps")
    assert table.loc[0.01, "removed"] == removed == report.summary["removed"]
    assert list(table["removed"]) == sorted(table["removed"]) and table.loc[0.1, "removed"] >= 4
    assert table.loc[0.001, "removed"] < table.loc[0.1, "removed"]
    assert 1 <= len(report.pairs) <= 3 and report.pairs["kept_tar"].notna().all()
    assert {"eps", "pairs"} <= set(report.figures)
    assert "| eps | similarity >= |" in report.markdown
    files = report.write(tmp_path / "report")
    assert all(os.path.getsize(p) > 0 for p in files.values())


def _parser():
    from nemo_curator.scripts.cli import build_parser

    return build_parser()


def test_cli_dedup_writes_removal_dir_output_and_report(tmp_path, client, capsys):
    planted = planted_embeddings(400, n_topics=4, duplicate_fraction=0.3, seed=8)
    planted_dataset(tmp_path / "data", planted, n_shards=2)
    args = _parser().parse_args(["dedup", str(tmp_path / "data"), "--n-clusters", "4", "--max-iter", "5",
                                 "--removal-dir", str(tmp_path / "removal"), "--output", str(tmp_path / "out"),
                                 "--report", str(tmp_path / "report"), "--scheduler-address", client.scheduler.address])
    result = args.func(args)
    printed = capsys.readouterr().out
    planted_dups = int(sum(np.bincount(planted.group[planted.group >= 0]) - 1))
    assert result["removed"] == planted_dups and f"semantic dedup: {planted_dups} rows to remove" in printed
    assert "min_similarity" in printed  # the eps table
    assert len(stage_ids(tmp_path / "removal")) == planted_dups
    assert len(ImageTextPairDataset.from_webdataset(str(tmp_path / "out"), id_col="key").metadata) == 400 - planted_dups
    assert os.path.exists(tmp_path / "report" / "dedup.md")
    with pytest.raises(SystemExit):
        _parser().parse_args(["dedup", str(tmp_path / "data"), "--eps", "1.5"])
    assert "eps must lie strictly between 0 and 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_kernel_and_assignment_match_the_cpu():
    from nemo_curator.modules.semantic_dedup.clustering import kmeans_backend, nearest_centroids, train_kmeans

    X = planted_embeddings(4000, dim=128, seed=1).embeddings
    cpu = max_similarity_to_earlier(X, 512, device="cpu")
    gpu = max_similarity_to_earlier(X, 512, device="cuda")
    np.testing.assert_allclose(cpu[0][1:], gpu[0][1:], atol=1e-4)
    assert (cpu[1] == gpu[1]).mean() > 0.999
    centroids = train_kmeans(X, 16, 10, 0)
    for a, b in zip(nearest_centroids(X, centroids, "cpu"), nearest_centroids(X, centroids, "cuda")):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert kmeans_backend() in ("faiss-gpu", "cuml", "faiss")


def test_the_real_removal_stage_reads_only_the_removal_list_of_the_legacy_output_dir(legacy_one_cluster):
    from nemo_curator.stages.image.deduplication.removal import ImageDuplicatesRemovalStage

    duplicates = legacy_one_cluster["out"] / "duplicates"
    assert any(p.name.startswith("_") for p in duplicates.iterdir())  # the working tables live there too
    stage = ImageDuplicatesRemovalStage(removal_parquets_dir=str(duplicates))
    stage.setup()
    assert set(stage._ids) == legacy_one_cluster["removed"]
