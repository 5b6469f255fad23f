"""TimmImageEmbedder on a real LocalCluster with real DALI (CPU) and a tiny CLIP-shaped timm model."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.image import status as st
from nemo_curator.image.embedders import ImageEmbedder, TimmImageEmbedder
from nemo_curator.utils.device import cpu_has_fast_bf16
from nemo_curator.utils.distributed_utils import cached_keys
from nemo_curator.utils.sample_data import make_samples, write_shard
from nemo_curator.utils.webdataset import write_dali_index

MODEL = "vit_large_patch14_clip_quickgelu_224.openai"
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}


def reference_embeddings(checkpoint, images):
    """timm's own path: PIL eval transform + the same weights in fp32, L2-normalised. (N, 768)."""
    import timm
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(MODEL, pretrained=False, **TINY).eval()
    model.load_state_dict(load_file(checkpoint))
    transform = create_transform(**resolve_data_config({}, model=model))
    batch = torch.stack([transform(im.convert("RGB")) for im in images])
    with torch.inference_mode():
        return torch.nn.functional.normalize(model(batch), dim=-1).numpy()


def embedder(checkpoint, **kwargs):
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("autocast", False)
    kwargs.setdefault("num_threads_per_worker", 1)
    return TimmImageEmbedder(MODEL, checkpoint_path=checkpoint, model_kwargs=TINY, **kwargs)


def embed_folder(folder, emb, id_col="key"):
    ds = ImageTextPairDataset.from_webdataset(str(folder), id_col=id_col)
    summary = emb(ds).save_metadata(show_progress=False)
    return ImageTextPairDataset.from_webdataset(str(folder), id_col=id_col).metadata.compute(), summary


def decoded(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))


def test_embeddings_match_timm_reference_by_id_on_real_photos(tmp_path, client, tiny_checkpoint, sample_photos):
    rng = np.random.default_rng(0)
    samples = make_samples(len(sample_photos) + 3, 0, rng, photos=[str(p) for p in sample_photos],
                           image_formats=("png", "webp", "jpg"))
    # parquet rows in another order than the tar: rows must meet images by id, not position
    write_shard(tmp_path, "00000", samples[::-1] and samples)
    frame = pd.read_parquet(tmp_path / "00000.parquet").sample(frac=1, random_state=3)
    frame.to_parquet(tmp_path / "00000.parquet", index=False)
    out, summary = embed_folder(tmp_path, embedder(tiny_checkpoint, batch_size=3))
    ref = reference_embeddings(tiny_checkpoint, [decoded(next(iter(s.members.values()))) for s in samples])
    got = np.stack(out.set_index("key").loc[[s.key for s in samples], "image_embedding"].to_list())
    assert got.dtype == np.float32 and got.shape == (len(samples), 768)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    cosine = (got * ref).sum(1)
    assert cosine.min() >= 0.999, cosine
    assert (out["image_status"] == st.OK).all()
    assert summary["totals"]["embedded"] == len(samples)


def test_after_save_the_dataset_reads_saved_results(tmp_path, client, tiny_checkpoint):
    rng = np.random.default_rng(9)
    write_shard(tmp_path, "00000", make_samples(3, 0, rng, sizes=[(64, 64)]))
    ds = embedder(tiny_checkpoint)(ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key"))
    assert any("embed-shard" in str(k) for k in dict(ds.metadata.__dask_graph__()))
    ds.save_metadata(show_progress=False)
    assert not any("embed-shard" in str(k) for k in dict(ds.metadata.__dask_graph__()))
    assert ds.metadata.image_embedding.compute().map(len).tolist() == [768] * 3


def test_bad_images_keep_their_rows(tmp_path, client, tiny_checkpoint):
    rng = np.random.default_rng(1)
    samples = make_samples(9, 0, rng, sizes=[(96, 64)])
    jpg = samples[1].members["jpg"]
    samples[1].members["jpg"] = jpg[: len(jpg) // 2]              # truncated
    samples[4].members["jpg"] = b"<html>not an image</html>" * 20  # garbage
    samples[5].members.pop("jpg")                                  # row without image
    samples[7].row = None                                          # sample without row
    write_shard(tmp_path, "00000", samples, extra_rows=[{"key": "999999999", "caption": "ghost"}])
    out, summary = embed_folder(tmp_path, embedder(tiny_checkpoint, batch_size=4))
    out = out.set_index("key")
    assert len(out) == 9  # 8 rows of samples with a row + 1 row with no sample at all
    expected = {samples[1].key: st.DECODE_FAILED, samples[4].key: st.DECODE_FAILED,
                samples[5].key: st.MISSING_IMAGE, "999999999": st.MISSING_IMAGE}
    for key, row in out.iterrows():
        want = expected.get(key, st.OK)
        assert row["image_status"] == want, key
        assert isinstance(row["image_embedding"], np.ndarray) == (want == st.OK), key
    stats = json.loads((tmp_path / "00000.stats.json").read_text())
    assert (stats["embedded"], stats["decode_failed"], stats["missing_image"], stats["extra_in_tar"]) == (5, 2, 2, 1)
    assert stats["samples_in"] == 9 and "first_error" in stats
    # the good images got the same embeddings as in a shard without bad neighbours
    good = [s for i, s in enumerate(samples) if i in (0, 2, 3, 6, 8)]
    ref = reference_embeddings(tiny_checkpoint, [decoded(s.members["jpg"]) for s in good])
    got = np.stack(out.loc[[s.key for s in good], "image_embedding"].to_list())
    assert (got * ref).sum(1).min() >= 0.999


def test_a_shard_result_holds_its_embeddings_once(tmp_path, tiny_checkpoint):
    """embed_shard (in this process): the embedding column is row views of one matrix, which
    Arrow takes without a copy; a row without image is null there and in the parquet."""
    from nemo_curator.utils.arrow import partition_to_arrow, rows_of_one_matrix as _rows_of_one_matrix

    rng = np.random.default_rng(2)
    samples = make_samples(7, 0, rng, sizes=[(64, 48)])
    samples[3].members.pop("jpg")
    write_shard(tmp_path, "00000", samples)
    frame = pd.read_parquet(tmp_path / "00000.parquet").sample(frac=1, random_state=0)  # rows not in tar order
    frame["key"] = frame["key"].astype(str)
    out, stats = embedder(tiny_checkpoint, batch_size=3).embed_shard(frame, str(tmp_path / "00000.tar"), "key")
    matrix, present = _rows_of_one_matrix(out["image_embedding"].tolist())
    assert matrix is not None and matrix.shape == (7, 768) and present.sum() == 6 == stats["embedded"]
    assert out.set_index("key").loc[samples[3].key, "image_embedding"] is None
    column = partition_to_arrow(out).column("image_embedding").chunk(0)
    assert column.values.buffers()[1].address == matrix.ctypes.data and column.null_count == 1


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_any_batch_size_and_empty_shard(tmp_path, client, tiny_checkpoint, batch_size):
    rng = np.random.default_rng(2)
    write_shard(tmp_path, "00000", make_samples(7, 0, rng, sizes=[(64, 80)]))   # 7 = 2*3 + a last batch of 1
    write_shard(tmp_path, "00001", [])                                          # empty shard
    write_shard(tmp_path, "00002", make_samples(1, 20_000, rng, sizes=[(80, 64)]))
    out, summary = embed_folder(tmp_path, embedder(tiny_checkpoint, batch_size=batch_size))
    assert len(out) == 8 and (out["image_status"] == st.OK).all()
    assert all(e.shape == (768,) for e in out["image_embedding"])
    assert summary["totals"]["embedded"] == 8


def test_index_files(tmp_path, client, tiny_checkpoint):
    rng = np.random.default_rng(3)
    write_shard(tmp_path, "00000", make_samples(5, 0, rng, sizes=[(64, 64)]))
    emb = embedder(tiny_checkpoint, use_index_files=True)
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key")
    with pytest.raises(FileNotFoundError, match=r"00000.idx does not exist"):
        emb(ds).metadata.compute()
    write_dali_index(tmp_path / "00000.tar")
    with_index, _ = embed_folder(tmp_path, emb)
    without, _ = embed_folder(tmp_path, embedder(tiny_checkpoint))
    np.testing.assert_allclose(np.stack(with_index.image_embedding), np.stack(without.image_embedding), atol=1e-6)


def test_original_fixture_shard(tmp_path, client, tiny_checkpoint, shared_dir):
    """The one-sample shard of the original tests: ids not zero-padded, no parquet (we write one)."""
    import shutil

    src = shared_dir / "sample_images" / "nemo_fixture"
    shutil.copy(src / "00000.tar", tmp_path)
    shutil.copy(src / "00000.idx", tmp_path)
    pd.DataFrame({"id": ["0"], "caption": ["x"]}).to_parquet(tmp_path / "00000.parquet", index=False)
    out, _ = embed_folder(tmp_path, embedder(tiny_checkpoint, use_index_files=True), id_col="id")
    assert out["id"].tolist() == ["0"] and out["image_status"].tolist() == [st.OK]


def test_model_cache_key_is_the_whole_config(tmp_path, client, tiny_checkpoint):
    rng = np.random.default_rng(4)
    write_shard(tmp_path, "00000", make_samples(2, 0, rng, sizes=[(64, 64)]))
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key")
    a = embedder(tiny_checkpoint, autocast=False)(ds).metadata.compute()
    b = embedder(tiny_checkpoint, autocast=True)(ds).metadata.compute()
    c = embedder(tiny_checkpoint, normalize_embeddings=False)(ds).metadata.compute()
    keys = [k for ks in client.run(cached_keys).values() for k in ks]
    configs = {tuple(x for x in k if x[0] in ("autocast", "normalize_embeddings")) for k in keys if ("model_name", MODEL) in k}
    assert {(("autocast", False), ("normalize_embeddings", True)), (("autocast", True), ("normalize_embeddings", True)),
            (("autocast", False), ("normalize_embeddings", False))} <= configs
    ea, eb, ec = (np.stack(f.image_embedding) for f in (a, b, c))
    assert (ea * eb).sum(1).min() > 0.99
    if cpu_has_fast_bf16():
        assert not np.allclose(ea, eb)  # bf16 differs slightly, but is close
    else:
        np.testing.assert_array_equal(ea, eb)  # emulated bf16 is slow: autocast=True stays fp32 here
    assert not np.allclose(np.linalg.norm(ec, axis=1), 1)             # un-normalised really is


def test_no_model_is_built_on_the_client(monkeypatch):
    import timm

    def forbidden(*a, **k):
        raise AssertionError("create_model called on the client")

    monkeypatch.setattr(timm, "create_model", forbidden)
    emb = TimmImageEmbedder(MODEL, model_kwargs=TINY)
    assert emb.transform.crop_size == 224 and emb.transform.interpolation == "bicubic"


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        TimmImageEmbedder(MODEL, batch_size=0)
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        TimmImageEmbedder(MODEL, checkpoint_path=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="no pretrained config"):
        TimmImageEmbedder("not_a_model")


HF_SCRIPT = textwrap.dedent("""
    import sys, torch
    from nemo_curator.image.embedders import TimmImageEmbedder
    emb = TimmImageEmbedder("%s", pretrained=True, model_kwargs=%r)
    try:
        model = emb.load_embedding_model("cpu")
    except RuntimeError as err:
        print("ERROR", err); sys.exit(3)
    out = model(torch.zeros(1, 3, 224, 224))
    print("SHAPE", tuple(out.shape), float(out.float().abs().sum()))
    print("IDENTITY", emb.weights_identity())
""" % (MODEL, TINY))


def _run_offline(hf_home):
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", HF_SCRIPT], env=env, capture_output=True, text=True, timeout=300)


def test_pretrained_from_offline_hf_cache(tmp_path, tiny_checkpoint):
    import shutil

    snapshot = tmp_path / "hub" / "models--timm--vit_large_patch14_clip_224.openai" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, snapshot / "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    done = _run_offline(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SHAPE (1, 768)" in done.stdout
    # the hub revision the cache holds identifies the weights in the lineage
    assert "'revision': 'abc123'" in done.stdout and "'hub': 'timm/vit_large_patch14_clip_224.openai'" in done.stdout


def test_missing_weights_say_how_to_supply_them(tmp_path):
    done = _run_offline(tmp_path)  # empty cache, offline
    assert done.returncode == 3, done.stderr[-2000:]
    assert MODEL in done.stdout and "checkpoint_path=" in done.stdout and "HF_HUB_OFFLINE" in done.stdout


class PilEmbedder(ImageEmbedder):
    """A custom embedder written against the abstract API: PIL decode, a fixed linear model."""

    def __init__(self, **kw):
        super().__init__("pil-mean-rgb", "image_embedding", **kw)

    def load_dataset_shard(self, tar_path):
        import tarfile

        from PIL import Image

        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    img = np.asarray(Image.open(tar.extractfile(m)).convert("RGB").resize((8, 8)), np.float32)
                    yield torch.from_numpy(img).reshape(1, -1), [{"key": m.name[:-4]}]

    def load_embedding_model(self, device):
        return lambda batch: batch[:, :768] / 255.0


def test_custom_subclass_works(tmp_path, client):
    rng = np.random.default_rng(5)
    write_shard(tmp_path, "00000", make_samples(4, 0, rng, sizes=[(32, 32)]))
    parquet = tmp_path / "00000.parquet"
    pd.read_parquet(parquet).iloc[1:].to_parquet(parquet)  # the tar's first sample loses its row
    out, summary = embed_folder(tmp_path, PilEmbedder())
    assert len(out) == 3 and (out["image_status"] == st.OK).all() and out.image_embedding.iloc[0].shape == (192,)
    assert summary["totals"]["extra_in_tar"] == 1  # yielded by load_dataset_shard, counted, not joined


def test_row_results_place_batches_on_their_rows():
    from nemo_curator.image.embedders.base import RowResults

    results = RowResults(["a", "b", "c", "a"], n_scores=1)  # "a" on two rows
    assert results.add(["c", "zz"], np.array([[3, 3], [9, 9]], np.float32), [np.array([0.3, 0.9], np.float32)]) == 1
    assert results.add(["a"], np.array([[1, 1]], np.float32), [np.array([0.1], np.float32)]) == 0
    with pytest.raises(RuntimeError, match=r"duplicate ids \['c'\]"):
        results.add(["c"], np.array([[4, 4]], np.float32), [np.array([0.4], np.float32)])
    with pytest.raises(RuntimeError, match="3-d embeddings after 2-d"):
        results.add(["b"], np.ones((1, 3), np.float32), [np.ones(1, np.float32)])
    results.finish()
    np.testing.assert_array_equal(results.embeddings, [[1, 1], [0, 0], [3, 3], [1, 1]])
    np.testing.assert_array_equal(results.has, [True, False, True, True])
    np.testing.assert_array_equal(results.scores[0], np.array([0.1, np.nan, 0.3, 0.1], np.float32))


def test_fused_heads_equal_standalone_heads(tmp_path, client, tiny_checkpoint, shared_dir):
    from nemo_curator.image.classifiers import AestheticClassifier, NsfwClassifier

    weights = shared_dir / "weights"
    heads = lambda: [AestheticClassifier(model_path=str(weights / "sac+logos+ava1-l14-linearMSE.pth")),  # noqa: E731
                     NsfwClassifier(model_path=str(weights / "clip_autokeras_binary_nsfw.pth"))]
    rng = np.random.default_rng(6)
    samples = make_samples(6, 0, rng, sizes=[(96, 64)])
    samples[2].members["jpg"] = b"garbage" * 50
    write_shard(tmp_path, "00000", samples)
    write_shard(tmp_path, "00001", make_samples(1, 10_000, rng, sizes=[(64, 96)]))
    fused, _ = embed_folder(tmp_path, embedder(tiny_checkpoint, batch_size=4, classifiers=heads()))
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key")
    ds = ds.with_metadata(ds.metadata.drop(columns=["aesthetic_score", "nsfw_score"]))
    for head in heads():
        ds = head(ds)
    standalone = ds.metadata.compute()
    for col in ("aesthetic_score", "nsfw_score"):
        assert fused[col].dtype == np.float32
        np.testing.assert_allclose(fused[col].to_numpy(), standalone[col].to_numpy(), rtol=1e-5, atol=1e-5)
    bad = fused.set_index("key").loc[samples[2].key]
    assert np.isnan(bad["aesthetic_score"]) and np.isnan(bad["nsfw_score"])
    ok = fused[fused.image_status == st.OK]
    assert ok.nsfw_score.between(0, 1).all() and ok.aesthetic_score.notna().all()


def test_compiled_model_gives_the_same_embeddings(tiny_checkpoint):
    plain = embedder(tiny_checkpoint)
    compiled_embedder = embedder(tiny_checkpoint, compile_model=True)
    assert compiled_embedder.config() == plain.config()  # not in the lineage: toggling it keeps resume
    assert compiled_embedder.runtime_config() != plain.runtime_config()  # but a separate cached model
    eager, compiled = plain.load_embedding_model("cpu"), compiled_embedder.load_embedding_model("cpu")
    torch.manual_seed(3)
    for n in (4, 3):  # the second size stands for a shard's smaller last batch
        batch = torch.randn(n, 3, 224, 224)
        with torch.inference_mode():
            np.testing.assert_allclose(compiled(batch).numpy(), eager(batch).numpy(), atol=1e-4, rtol=1e-4)


def test_head_reading_another_column_is_rejected(tiny_checkpoint):
    from nemo_curator.image.classifiers import AestheticClassifier

    with pytest.raises(ValueError, match="embedding_column"):
        embedder(tiny_checkpoint, classifiers=[AestheticClassifier(embedding_column="other")])


@pytest.mark.gpu
def test_gpu_mixed_decode_hands_gpu_tensors_to_torch(tmp_path, tiny_checkpoint, sample_photos):
    """The GPU path: DALI "mixed" decode, the batch reaches the model as a CUDA tensor (no host copy)."""
    rng = np.random.default_rng(7)
    samples = make_samples(len(sample_photos) + 2, 0, rng, photos=[str(p) for p in sample_photos])
    samples[-1].members["jpg"] = b"garbage" * 50
    write_shard(tmp_path, "00000", samples)
    emb = embedder(tiny_checkpoint, batch_size=4, device="cuda")
    items = list(emb.iter_shard(str(tmp_path / "00000.tar"), {s.key for s in samples}, "key", "cuda"))
    batches = [i.batch for i in items if i.batch is not None]
    assert batches and all(b.is_cuda and b.dtype == torch.float32 and b.shape[1:] == (3, 224, 224) for b in batches)
    assert [i.ids for i in items if i.batch is None] == [[samples[-1].key]]
    cpu_items = list(embedder(tiny_checkpoint, batch_size=4, device="cpu").iter_shard(
        str(tmp_path / "00000.tar"), {s.key for s in samples}, "key", "cpu"))
    gpu_all = torch.cat([b.cpu() for b in batches])
    cpu_all = torch.cat([i.batch for i in cpu_items if i.batch is not None])
    assert (gpu_all - cpu_all).abs().mean() < 0.02  # nvJPEG vs libjpeg-turbo differ slightly


@pytest.mark.gpu
def test_gpu_end_to_end_matches_cpu(tmp_path, tiny_checkpoint):
    from nemo_curator import get_client

    rng = np.random.default_rng(8)
    write_shard(tmp_path, "00000", make_samples(9, 0, rng))
    gpu_client = get_client(cluster_type="gpu", rmm_pool_size=None)
    try:
        gpu, _ = embed_folder(tmp_path, embedder(tiny_checkpoint, batch_size=4))
    finally:
        cluster = gpu_client.cluster
        gpu_client.close()
        cluster.close()
    cpu, _ = embed_folder(tmp_path, embedder(tiny_checkpoint, batch_size=4, device="cpu"))
    assert ((np.stack(gpu.image_embedding) * np.stack(cpu.image_embedding)).sum(1) > 0.99).all()


def test_autocast_uses_bf16_only_where_the_hardware_has_it():
    on = TimmImageEmbedder(MODEL, model_kwargs=TINY, autocast=True)
    off = TimmImageEmbedder(MODEL, model_kwargs=TINY, autocast=False)
    assert on.uses_bf16("cuda") and on.uses_bf16("cuda:1")
    assert on.uses_bf16("cpu") is cpu_has_fast_bf16()
    assert not off.uses_bf16("cuda") and not off.uses_bf16("cpu")


def test_precision_is_one_policy_with_autocast_as_its_legacy_switch():
    assert TimmImageEmbedder(MODEL, model_kwargs=TINY).precision == "auto"
    assert TimmImageEmbedder(MODEL, model_kwargs=TINY, autocast=False).precision == "fp32"
    forced = TimmImageEmbedder(MODEL, model_kwargs=TINY, precision="bf16")
    assert forced.uses_bf16("cpu") and forced.config()["precision"] == "bf16"
    with pytest.raises(ValueError, match="autocast=False means fp32"):
        TimmImageEmbedder(MODEL, model_kwargs=TINY, autocast=False, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        TimmImageEmbedder(MODEL, model_kwargs=TINY, precision="half")


def test_an_embedder_must_say_how_it_reads_a_shard():
    class NoReader(ImageEmbedder):
        def load_embedding_model(self, device):
            return lambda batch: batch

    with pytest.raises(TypeError, match="must implement iter_shard"):
        NoReader("m")


def test_weights_identity_names_the_checkpoint_file_and_none_for_random_weights(tiny_checkpoint):
    random = TimmImageEmbedder(MODEL, model_kwargs=TINY)
    assert random.weights_identity() is None
    ident = TimmImageEmbedder(MODEL, model_kwargs=TINY, checkpoint_path=tiny_checkpoint).weights_identity()
    assert ident["checkpoint"] == tiny_checkpoint and ident["size"] == os.path.getsize(tiny_checkpoint)


def test_a_replaced_checkpoint_is_refused_mid_run_and_evicts_the_old_model(tmp_path, tiny_checkpoint):
    import shutil
    import time

    from nemo_curator.utils.distributed_utils import cached_keys, clear_worker_cache

    clear_worker_cache()
    path = shutil.copy(tiny_checkpoint, tmp_path / "m.safetensors")
    emb = TimmImageEmbedder(MODEL, model_kwargs=TINY, checkpoint_path=str(path), autocast=False)
    planned = emb.weights_identity()
    emb.get_model("cpu", planned)
    time.sleep(0.01)
    os.utime(path)  # the file "changes" after planning
    assert emb.get_model("cpu", planned) is not None  # a worker that has the planned model keeps using it
    clear_worker_cache()  # another worker, which has not loaded it yet, must not load the changed file
    with pytest.raises(RuntimeError, match="changed while the job ran"):
        emb.get_model("cpu", planned)
    emb.get_model("cpu", emb.weights_identity())  # a new plan: loaded again, the old model dropped
    assert sum(1 for k in cached_keys() if ("checkpoint_path", str(path)) in k) == 1


def test_random_weights_are_the_same_on_every_worker():
    import torch

    a = TimmImageEmbedder(MODEL, model_kwargs=TINY, autocast=False).load_embedding_model("cpu")
    torch.manual_seed(123)  # another state of the global generator (another worker)
    b = TimmImageEmbedder(MODEL, model_kwargs=TINY, autocast=False).load_embedding_model("cpu")
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
