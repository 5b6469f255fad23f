"""Classifier heads: real weights against reference outputs, edge cases, standalone over a real cluster."""
from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.image.classifiers import AestheticClassifier, ImageClassifier, NsfwClassifier
from nemo_curator.utils.distributed_utils import cached_keys, clear_worker_cache
from nemo_curator.utils.download import WeightsDownloadError
from nemo_curator.utils.sample_data import Sample, write_shard


@pytest.fixture(scope="module")
def reference(shared_dir) -> dict[str, np.ndarray]:
    with np.load(shared_dir / "weights" / "head_reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def weights(shared_dir):
    return {"aesthetic": str(shared_dir / "weights" / "sac+logos+ava1-l14-linearMSE.pth"),
            "nsfw": str(shared_dir / "weights" / "clip_autokeras_binary_nsfw.pth")}


@pytest.fixture
def aesthetic(weights):
    return AestheticClassifier(model_path=weights["aesthetic"])


@pytest.fixture
def nsfw(weights):
    return NsfwClassifier(model_path=weights["nsfw"])


def score(clf: ImageClassifier, embeddings: np.ndarray) -> np.ndarray:
    return clf.score_tensor(clf.get_model("cpu"), torch.from_numpy(embeddings)).numpy()


def embedding_frame(embeddings, index=None) -> pd.DataFrame:
    column = pd.Series(list(embeddings), index=index, dtype=object)
    return pd.DataFrame({"key": [f"k{i}" for i in range(len(column))], "image_embedding": column}, index=index)


# ----------------------------------------------------------------------------------------------
# Real weights against the reference outputs
def test_aesthetic_matches_reference(aesthetic, reference):
    scores = score(aesthetic, reference["embeddings"])
    assert scores.shape == (1024,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, reference["aesthetic_score"], rtol=0, atol=1e-5)


def test_nsfw_matches_torch_port_reference(nsfw, reference):
    scores = score(nsfw, reference["embeddings"])
    assert scores.shape == (1024,) and scores.dtype == np.float32
    assert scores.min() >= 0 and scores.max() <= 1
    np.testing.assert_allclose(scores, reference["port_nsfw_score"], rtol=0, atol=2e-6)


def test_nsfw_agrees_with_original_keras_model(nsfw, reference):
    """The statistics of weights/README.md (mean 3.7e-4, p99 4.8e-3, max 0.11), with some headroom."""
    diff = np.abs(score(nsfw, reference["embeddings"]) - reference["keras_nsfw_score"])
    assert diff.mean() < 1e-3
    assert np.percentile(diff, 99) < 1e-2
    assert diff.max() < 0.2


@pytest.mark.parametrize("batch_size", [1, 7, -1])
def test_batch_sizes_and_single_rows(weights, reference, batch_size):
    clf = AestheticClassifier(model_path=weights["aesthetic"], batch_size=batch_size)
    embeddings = reference["embeddings"][:20]
    np.testing.assert_allclose(score(clf, embeddings), reference["aesthetic_score"][:20], rtol=0, atol=1e-5)
    one = score(clf, embeddings[:1])
    assert one.shape == (1,)  # never squeezed to 0-d
    np.testing.assert_allclose(one, reference["aesthetic_score"][:1], rtol=0, atol=1e-5)
    none = score(clf, embeddings[:0])
    assert none.shape == (0,) and none.dtype == np.float32


def test_scores_stay_float32_under_bf16_autocast(nsfw, aesthetic, reference):
    """Fused mode calls the heads inside the embedder's bf16 autocast; they must still run in float32."""
    embeddings = torch.from_numpy(reference["embeddings"][:64])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = aesthetic.score_tensor(aesthetic.get_model("cpu"), embeddings)
        n = nsfw.score_tensor(nsfw.get_model("cpu"), embeddings.bfloat16())
    assert a.dtype == n.dtype == torch.float32
    np.testing.assert_allclose(a.numpy(), reference["aesthetic_score"][:64], rtol=0, atol=1e-5)
    # bf16 input embeddings lose precision themselves; the head's arithmetic is float32.
    np.testing.assert_allclose(n.numpy(), reference["port_nsfw_score"][:64], rtol=0, atol=5e-3)


# ----------------------------------------------------------------------------------------------
# Wrong inputs
def test_wrong_embedding_size_names_both_sizes_and_column(aesthetic):
    model = aesthetic.get_model("cpu")
    with pytest.raises(ValueError, match=r"size 768.*'image_embedding'.*size 512"):
        aesthetic.score_tensor(model, torch.zeros(3, 512))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        aesthetic.score_tensor(model, torch.zeros(768))
    frame = embedding_frame([np.zeros(768, np.float32), np.zeros(512, np.float32)])
    with pytest.raises(ValueError, match=r"size 768.*'image_embedding'.*size 512"):
        aesthetic.score_frame(frame)


def test_missing_embedding_column_is_named(aesthetic):
    clf = AestheticClassifier(embedding_column="clip_embedding", model_path=aesthetic.model_path)
    with pytest.raises(KeyError, match="'clip_embedding' is not in the partition"):
        clf.score_frame(embedding_frame([np.zeros(768, np.float32)]))


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": -2}, {"batch_size": 1.5}, {"batch_size": True},
                                    {"pred_column": ""}, {"embedding_column": None}])
def test_invalid_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        NsfwClassifier(**kwargs)


# ----------------------------------------------------------------------------------------------
# score_frame: the standalone per-partition work
def test_score_frame_gives_nan_for_failed_rows(aesthetic, reference):
    emb = reference["embeddings"]
    values = [emb[0], None, np.nan, emb[3].tolist(), pd.NA, emb[5]]
    frame = embedding_frame(values, index=[10, 11, 12, 13, 14, 15])
    out = aesthetic.score_frame(frame)
    assert "aesthetic_score" not in frame.columns  # input untouched
    assert list(out.index) == [10, 11, 12, 13, 14, 15] and list(out.key) == list(frame.key)
    assert out["aesthetic_score"].dtype == np.float32
    scores = out["aesthetic_score"].to_numpy()
    assert np.isnan(scores[[1, 2, 4]]).all()
    np.testing.assert_allclose(scores[[0, 3, 5]], reference["aesthetic_score"][[0, 3, 5]], rtol=0, atol=1e-5)


def test_empty_and_all_null_partitions_do_not_load_the_model(tmp_path):
    clf = NsfwClassifier(model_path=tmp_path / "absent.pth")  # loading would raise FileNotFoundError
    empty = clf.score_frame(embedding_frame([]))
    assert len(empty) == 0 and empty["nsfw_score"].dtype == np.float32
    nulls = clf.score_frame(embedding_frame([None, np.nan]))
    assert nulls["nsfw_score"].isna().all()
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        clf.score_frame(embedding_frame([np.zeros(768, np.float32)]))


def test_postprocess_hook_is_applied(weights, reference):
    class Rounded(AestheticClassifier):
        def postprocess(self, series):
            return series.round(0)

    frame = embedding_frame([reference["embeddings"][0], None])
    out = Rounded(model_path=weights["aesthetic"]).score_frame(frame)["aesthetic_score"]
    assert out.iloc[0] == np.round(reference["aesthetic_score"][0]) and np.isnan(out.iloc[1])
    assert out.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# Identity: cache key, dask token, repr, model cache
def test_cache_key_token_and_repr_cover_the_whole_config(weights, tmp_path, monkeypatch):
    base = AestheticClassifier(model_path=weights["aesthetic"])
    same = AestheticClassifier(model_path=weights["aesthetic"])
    others = [AestheticClassifier(model_path=weights["aesthetic"], pred_column="score"),
              AestheticClassifier(model_path=weights["aesthetic"], batch_size=8),
              AestheticClassifier(model_path=weights["aesthetic"], embedding_column="emb"),
              AestheticClassifier(model_path=tmp_path / "other.pth"),
              AestheticClassifier(),
              NsfwClassifier(model_path=weights["aesthetic"], pred_column="aesthetic_score")]
    keys = {base.cache_key(), *(o.cache_key() for o in others)}
    assert len(keys) == 1 + len(others)
    assert base.cache_key() == same.cache_key() and hash(base.cache_key()) == hash(same.cache_key())
    assert dask.base.tokenize(base) == dask.base.tokenize(same)
    assert len({dask.base.tokenize(o) for o in [base, *others]}) == 1 + len(others)
    assert repr(base).startswith("AestheticClassifier(model_name='sac+logos+ava1-l14-linearMSE'")
    for part in ("embedding_column='image_embedding'", "pred_column='aesthetic_score'", "batch_size=-1",
                 "embedding_size=768", "pred_type='float32'", f"model_path={weights['aesthetic']!r}"):
        assert part in repr(base)
    monkeypatch.chdir(tmp_path)
    assert AestheticClassifier(model_path="w.pth").model_path == str(tmp_path / "w.pth")  # absolute for workers


def test_get_model_loads_once_per_config_in_eval_mode(weights):
    a = AestheticClassifier(model_path=weights["aesthetic"])
    model = a.get_model("cpu")
    assert a.get_model(torch.device("cpu")) is model
    assert AestheticClassifier(model_path=weights["aesthetic"]).get_model("cpu") is model
    assert AestheticClassifier(model_path=weights["aesthetic"], pred_column="s").get_model("cpu") is not model
    assert (*a.cache_key(), "cpu") in cached_keys()
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_nothing_downloads_until_the_model_is_needed(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_CURATOR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NEMO_CURATOR_WEIGHTS_URL_NSFW", "http://127.0.0.1:9/unreachable.zip")
    clf = NsfwClassifier(pred_column="nsfw_unreachable")
    repr(clf), clf.cache_key(), dask.base.tokenize(clf)
    assert not (tmp_path / "home").exists()
    with pytest.raises(WeightsDownloadError, match="unreachable.zip.*model_path="):
        clf.get_model("cpu")


# ----------------------------------------------------------------------------------------------
# Standalone over a real dataset on a real LocalCluster
@pytest.fixture
def embedded_dataset(tmp_path, reference):
    """Shards: 00000 (4 rows, one null embedding), 00001 (empty), 00002 (1 row), 00003 (2 rows, one null)."""
    emb = reference["embeddings"]
    layout = {"00000": [0, 1, None, 3], "00001": [], "00002": [4], "00003": [None, 5]}
    expected = {}
    for name, rows in layout.items():
        samples = []
        for i, ref_row in enumerate(rows):
            key = f"{name}{i:04d}"
            embedding = None if ref_row is None else emb[ref_row]
            samples.append(Sample(key, {"jpg": b"not decoded here", "txt": b"caption"},
                                  {"caption": "caption", "image_embedding": embedding}))
            expected[key] = ref_row
        write_shard(tmp_path / "data", name, samples)
    assert pq.read_schema(tmp_path / "data" / "00000.parquet").field("image_embedding").type.value_type == "float"
    return ImageTextPairDataset.from_webdataset(str(tmp_path / "data"), id_col="key"), expected


def build_pipeline(dataset, weights, aesthetic_batch_size=2):
    aesthetic = AestheticClassifier(model_path=weights["aesthetic"], batch_size=aesthetic_batch_size)
    nsfw = NsfwClassifier(model_path=weights["nsfw"])
    return nsfw(aesthetic(dataset)), aesthetic, nsfw


def test_standalone_scores_a_dataset_on_a_cluster(client, embedded_dataset, weights, reference, tmp_path):
    dataset, expected = embedded_dataset
    clear_worker_cache()
    scored, aesthetic, nsfw = build_pipeline(dataset, weights)
    assert scored.metadata.npartitions == dataset.metadata.npartitions == 4
    assert scored.tar_files == dataset.tar_files
    assert scored.lineage == dataset.lineage + (repr(aesthetic), repr(nsfw))
    assert scored.metadata["aesthetic_score"].dtype == np.float32
    # the graph is deterministic, and depends on the config
    assert dask.base.tokenize(build_pipeline(dataset, weights)[0].metadata) == dask.base.tokenize(scored.metadata)
    assert dask.base.tokenize(build_pipeline(dataset, weights, 3)[0].metadata) != dask.base.tokenize(scored.metadata)

    scored.save_metadata(str(tmp_path / "out"), show_progress=False)

    sizes = {}
    for name in ("00000", "00001", "00002", "00003"):
        table = pq.read_table(tmp_path / "out" / f"{name}.parquet")
        assert table.schema.field("aesthetic_score").type == "float"
        frame = table.to_pandas()
        sizes[name] = len(frame)
        for key, a, n in zip(frame.key, frame.aesthetic_score, frame.nsfw_score):
            ref_row = expected[key]
            if ref_row is None:
                assert np.isnan(a) and np.isnan(n)
            else:
                assert abs(a - reference["aesthetic_score"][ref_row]) < 1e-5
                assert abs(n - reference["port_nsfw_score"][ref_row]) < 2e-6
    assert sizes == {"00000": 4, "00001": 0, "00002": 1, "00003": 2}

    # models were loaded on the workers (once per worker and config), never on the client
    per_worker = client.run(cached_keys)
    for clf in (aesthetic, nsfw):
        loads = [sum(k[:-1] == clf.cache_key() for k in keys) for keys in per_worker.values()]
        assert max(loads) == 1 and sum(loads) >= 1
        assert not any(k[:-1] == clf.cache_key() for k in cached_keys())


def test_standalone_requires_the_embedding_column(embedded_dataset):
    dataset, _ = embedded_dataset
    with pytest.raises(KeyError, match="'clip_embedding' is not in the metadata"):
        AestheticClassifier(embedding_column="clip_embedding")(dataset)
