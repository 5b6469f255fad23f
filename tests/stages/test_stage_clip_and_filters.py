"""ImageEmbeddingStage and the filter stages against the legacy path: the same embeddings as
TimmImageEmbedder on the same shards (same model, same DALI preprocessing), the same scores as the
legacy heads, the real heads against their reference outputs, and the threshold semantics."""
from __future__ import annotations

import numpy as np
import pytest

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.image.classifiers import AestheticClassifier, NsfwClassifier
from nemo_curator.image.embedders import TimmImageEmbedder
from nemo_curator.pipeline import Pipeline
from nemo_curator.stages.file_partitioning import FilePartitioningStage
from nemo_curator.stages.image.embedders.clip_embedder import ImageEmbeddingStage
from nemo_curator.stages.image.filters.aesthetic_filter import ImageAestheticFilterStage
from nemo_curator.stages.image.filters.nsfw_filter import ImageNSFWFilterStage
from nemo_curator.stages.image.io.image_reader import ImageReaderStage
from nemo_curator.tasks import FileGroupTask, ImageBatch, ImageObject
from nemo_curator.utils.constants import DECODE_FAILED, DEFAULT_MODEL, OK, TINY_MODEL_KWARGS
from nemo_curator.utils.sample_data import Sample, make_samples, write_shard
from stage_fixtures import shared_head_paths, tiny_model_dir


@pytest.fixture(scope="module")
def shards(tmp_path_factory, sample_photos_or_none):
    """Two shards: real photographs when ../shared has them, synthetic jpg/png/webp, a corrupt jpg."""
    folder = tmp_path_factory.mktemp("clip_shards")
    rng = np.random.default_rng(7)
    photos = [str(p) for p in sample_photos_or_none[:3]]
    first = make_samples(5, 0, rng, image_formats=("jpg", "png", "webp"), photos=photos)
    first.insert(1, Sample("000000099", {"jpg": b"garbage", "txt": b"bad"}, {"caption": "bad"}))
    write_shard(folder, "00000", first)
    write_shard(folder, "00001", make_samples(4, 10000, rng, image_formats=("png", "jpg")))
    return folder


@pytest.fixture(scope="module")
def sample_photos_or_none():
    from nemo_curator.utils.sample_data import shared_photos_dir

    folder = shared_photos_dir()
    return sorted(folder.glob("*.jpg")) if folder else []


@pytest.fixture(scope="module")
def random_heads(tmp_path_factory):
    from nemo_curator.image.classifiers import write_random_heads

    return write_random_heads(tmp_path_factory.mktemp("heads"), seed=5)


def stage_results(data, model_dir, batch_size=3) -> dict[str, ImageObject]:
    pipeline = Pipeline("clip_vs_legacy", stages=[
        FilePartitioningStage(file_paths=str(data), file_extensions=[".tar"]),
        ImageReaderStage(dali_batch_size=batch_size, num_threads=1),
        ImageEmbeddingStage(model_dir=str(model_dir), model_inference_batch_size=2),
        ImageAestheticFilterStage(model_dir=str(model_dir), score_threshold=-1e9),  # keeps every scored image
        ImageNSFWFilterStage(model_dir=str(model_dir), score_threshold=2.0),
    ])
    return {o.image_id: o for r in pipeline.run() for o in r.data}


def legacy_results(data, tiny_checkpoint, heads):
    embedder = TimmImageEmbedder(DEFAULT_MODEL, checkpoint_path=tiny_checkpoint, model_kwargs=TINY_MODEL_KWARGS,
                                 batch_size=4, classifiers=[AestheticClassifier(model_path=heads["aesthetic"]),
                                                            NsfwClassifier(model_path=heads["nsfw"])])
    frame = embedder(ImageTextPairDataset.from_webdataset(str(data), id_col="key")).metadata.compute()
    return frame.set_index("key")


def test_stage_embeddings_and_scores_equal_the_legacy_path(client, shards, tmp_path, tiny_checkpoint, random_heads):
    model_dir = tiny_model_dir(tmp_path / "models", tiny_checkpoint, random_heads)
    stage = stage_results(shards, model_dir)
    legacy = legacy_results(shards, tiny_checkpoint, random_heads)
    ok = legacy.index[legacy.image_status == OK]
    assert sorted(stage) == sorted(ok) and len(ok) == 9  # the corrupt image: no embedding, so no score
    assert legacy.loc["000000099", "image_status"] == DECODE_FAILED
    for key in ok:
        obj = stage[key]
        np.testing.assert_allclose(obj.embedding, legacy.loc[key, "image_embedding"], atol=2e-6, rtol=0)
        assert obj.aesthetic_score == pytest.approx(float(legacy.loc[key, "aesthetic_score"]), abs=1e-5)
        assert obj.nsfw_score == pytest.approx(float(legacy.loc[key, "nsfw_score"]), abs=1e-6)
    embeddings = np.stack([stage[k].embedding for k in ok])
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    assert np.abs(embeddings[0] - embeddings[1]).max() > 1e-3  # different images: different embeddings


def test_real_heads_give_the_reference_scores(shared_dir, tmp_path, tiny_checkpoint):
    """The filter stages' heads read from model_dir (aesthetic as 1.x's model.safetensors) give the
    outputs of the original models on the reference embeddings."""
    reference = np.load(shared_dir / "weights" / "head_reference.npz")
    model_dir = tiny_model_dir(tmp_path / "models", tiny_checkpoint, shared_head_paths())
    objects = [ImageObject(image_id=str(i), embedding=e) for i, e in enumerate(reference["embeddings"][:256])]
    aesthetic = ImageAestheticFilterStage(model_dir=str(model_dir), score_threshold=-1e9, model_inference_batch_size=50)
    nsfw = ImageNSFWFilterStage(model_dir=str(model_dir), score_threshold=2.0, model_inference_batch_size=1)
    batch = nsfw.process(aesthetic.process(ImageBatch(dataset_name="ref", data=objects)))
    got_a = np.array([o.aesthetic_score for o in batch.data])
    got_n = np.array([o.nsfw_score for o in batch.data])
    np.testing.assert_allclose(got_a, reference["aesthetic_score"][:256], atol=1e-4)
    np.testing.assert_allclose(got_n, reference["port_nsfw_score"][:256], atol=1e-5)
    assert np.abs(got_n - reference["keras_nsfw_score"][:256]).mean() < 2e-3


def test_threshold_semantics(tmp_path, tiny_checkpoint, random_heads):
    model_dir = tiny_model_dir(tmp_path / "models", tiny_checkpoint, random_heads)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 768)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def batch():
        objects = [ImageObject(image_id=str(i), embedding=v) for i, v in enumerate(vectors)]
        return ImageBatch(dataset_name="t", data=objects + [ImageObject(image_id="failed", status=DECODE_FAILED)])

    scored = ImageAestheticFilterStage(model_dir=str(model_dir), score_threshold=-1e9).process(batch())
    a_scores = {o.image_id: o.aesthetic_score for o in scored.data}
    assert "failed" not in a_scores and len(a_scores) == 6  # without an embedding: dropped
    cut = sorted(a_scores.values())[2]
    kept = ImageAestheticFilterStage(model_dir=str(model_dir), score_threshold=cut).process(batch())
    assert sorted(o.image_id for o in kept.data) == sorted(k for k, v in a_scores.items() if v >= cut)
    assert len(kept.data) == 4  # the image exactly at the cut is kept (>=)

    probs = {o.image_id: o.nsfw_score for o in ImageNSFWFilterStage(model_dir=str(model_dir),
                                                                   score_threshold=2.0).process(batch()).data}
    assert all(0 <= p <= 1 for p in probs.values())
    cut = sorted(probs.values())[2]
    kept = ImageNSFWFilterStage(model_dir=str(model_dir), score_threshold=cut).process(batch())
    assert sorted(o.image_id for o in kept.data) == sorted(k for k, v in probs.items() if v < cut)
    assert len(kept.data) == 2  # the image exactly at the cut is dropped (<)


def test_one_image_batches_and_removed_image_data(client, shards, tmp_path, tiny_checkpoint, random_heads):
    model_dir = tiny_model_dir(tmp_path / "models", tiny_checkpoint, random_heads)
    stage = ImageEmbeddingStage(model_dir=str(model_dir), model_inference_batch_size=1, remove_image_data=True)
    batches = ImageReaderStage(num_threads=1, dali_batch_size=1).process(
        FileGroupTask(dataset_name="d", data=[str(shards / "00001.tar")]))
    out = [stage.process(b) for b in batches]
    objects = [o for b in out for o in b.data]
    assert len(objects) == 4 and all(o.embedding.shape == (768,) and o.image_data is None for o in objects)
    again = stage.process(out[0])  # nothing left to embed: embeddings kept, no error
    assert again.data[0].embedding is objects[0].embedding


@pytest.mark.gpu
def test_gpu_stage_embeddings_match_the_cpu_ones(client, shards, tmp_path, tiny_checkpoint, random_heads):
    """On a GPU worker: DALI "mixed" decode, pixels kept on the GPU, preprocessing there (bf16 autocast)."""
    import torch

    model_dir = tiny_model_dir(tmp_path / "models", tiny_checkpoint, random_heads)
    reader = ImageReaderStage(num_threads=2, dali_batch_size=4)
    group = FileGroupTask(dataset_name="d", data=[str(shards / "00001.tar")])
    gpu_batches = reader.process(group)
    assert all(o.image_data.is_cuda for b in gpu_batches for o in b.data)
    stage = ImageEmbeddingStage(model_dir=str(model_dir), precision="fp32")
    gpu = {o.image_id: o.embedding for b in gpu_batches for o in stage.process(b).data}
    legacy = legacy_results(shards, tiny_checkpoint, random_heads)
    for key, emb in gpu.items():
        assert torch.nn.functional.cosine_similarity(torch.tensor(emb), torch.tensor(
            legacy.loc[key, "image_embedding"]), dim=0) > 0.999
