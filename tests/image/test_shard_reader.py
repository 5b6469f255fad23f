"""The public DALI shard reader: member selection, every wanted id reported once, failed-batch
isolation, decoded pictures without a transform, threads decided on the worker (real DALI on CPU)."""
from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from nemo_curator.image.shard_reader import PIPELINES, DaliShardReader, ShardItems
from nemo_curator.image.transforms import TransformSpec
from nemo_curator.utils.constants import DECODE_FAILED, DEFAULT_MODEL, EXTRA_IN_TAR, MISSING_IMAGE, OK
from nemo_curator.utils.distributed_utils import DEFAULT_THREADS_OUTSIDE_CLUSTER, cpu_threads_per_worker
from nemo_curator.utils.sample_data import Sample, encode_image, make_samples, synthetic_image, write_shard


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """A tar with 5 good images (png and jpg), one garbage image, one sample without an image member."""
    folder = tmp_path_factory.mktemp("reader")
    rng = np.random.default_rng(0)
    samples = make_samples(5, 0, rng, image_formats=("png", "jpg"), sizes=[(40, 30), (30, 40)])
    samples.insert(2, Sample("bad", {"jpg": b"not a picture", "txt": b"broken"}, {"caption": "broken"}))
    samples.append(Sample("textonly", {"txt": b"no image here"}, {"caption": "no image"}))
    write_shard(folder, "00000", samples)
    return folder / "00000.tar", samples


def items_by_status(items: list[ShardItems]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        out.setdefault(item.status, []).extend(item.ids)
    return out


def test_every_wanted_id_comes_out_once_with_its_status(shard):
    tar, samples = shard
    good = [s.key for s in samples if s.key not in ("bad", "textonly")]
    reader = DaliShardReader(TransformSpec.from_timm(DEFAULT_MODEL), batch_size=2, num_threads=1)
    wanted = set(good[1:]) | {"bad", "textonly", "not-in-tar"}
    items = list(reader.read(str(tar), wanted))
    statuses = items_by_status(items)
    assert sorted(statuses[OK]) == sorted(good[1:])
    assert statuses[DECODE_FAILED] == ["bad"]
    assert sorted(statuses[MISSING_IMAGE]) == ["not-in-tar", "textonly"]
    assert statuses[EXTRA_IN_TAR] == [good[0]]  # in the tar, not wanted: never decoded
    failed = next(i for i in items if i.status == DECODE_FAILED)
    assert failed.batch is None and failed.error
    for item in items:
        if item.batch is not None:
            assert item.batch.dtype == torch.float32 and item.batch.shape == (len(item.ids), 3, 224, 224)


def test_without_a_transform_the_decoded_pictures_come_out(shard):
    tar, samples = shard
    reader = DaliShardReader(None, batch_size=3, num_threads=1, image_extensions=("png", "jpg"))
    pictures = {}
    for item in reader.read(str(tar)):
        if item.batch is not None:
            assert isinstance(item.batch, list) and len(item.batch) == len(item.ids)
            pictures.update(zip(item.ids, item.batch))
    for sample in samples:
        if "png" in sample.members:  # lossless: DALI's pixels are PIL's
            expected = np.asarray(Image.open(io.BytesIO(sample.members["png"])).convert("RGB"))
            got = pictures[sample.key]
            assert got.dtype == torch.uint8 and tuple(got.shape) == expected.shape
            np.testing.assert_array_equal(got.numpy(), expected)
    assert "bad" not in pictures and len(pictures) == 5


def test_member_preference_follows_image_extensions(tmp_path):
    rng = np.random.default_rng(1)
    png, jpg = synthetic_image(rng, 20, 10), synthetic_image(rng, 10, 20)
    write_shard(tmp_path, "00000", [Sample("both", {"png": encode_image(png, "png"), "jpg": encode_image(jpg, "jpg")})])
    tar = str(tmp_path / "00000.tar")
    for extensions, shape in ((("png", "jpg"), (10, 20, 3)), ((".JPG", "png"), (20, 10, 3))):
        [item] = list(DaliShardReader(None, num_threads=1, image_extensions=extensions).read(tar))
        assert tuple(item.batch[0].shape) == shape


def test_arguments_are_checked_up_front_and_the_reader_pickles():
    with pytest.raises(ValueError, match="batch_size"):
        DaliShardReader(None, batch_size=0)
    with pytest.raises(ValueError, match="num_threads"):
        DaliShardReader(None, num_threads=0)
    with pytest.raises(ValueError, match="device"):
        DaliShardReader(None, device="tpu")
    with pytest.raises(ValueError, match="image_extensions"):
        DaliShardReader(None, image_extensions=())
    reader = pickle.loads(pickle.dumps(DaliShardReader(TransformSpec.from_timm(DEFAULT_MODEL), batch_size=4)))
    assert reader.batch_size == 4 and reader.transform.crop_size == 224


def test_threads_are_the_cores_divided_among_the_workers_of_the_host(client):
    assert cpu_threads_per_worker() == DEFAULT_THREADS_OUTSIDE_CLUSTER  # not in a worker
    cores = len(os.sched_getaffinity(0))
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    assert client.submit(cpu_threads_per_worker, pure=False).result() == max(1, cores // workers)


# -- one built pipeline per process and setting, reused by the next shards -----------------------
@pytest.fixture
def three_shards(tmp_path):
    """Three tars of 5 lossless pictures each (png: DALI's pixels are exactly PIL's)."""
    rng = np.random.default_rng(7)
    tars = []
    for s in range(3):
        samples = make_samples(5, s, rng, image_formats=("png",), sizes=[(40, 30), (30, 40)])
        write_shard(tmp_path, f"{s:05d}", samples)
        tars.append((str(tmp_path / f"{s:05d}.tar"), samples))
    return tars


def decoded(reader, tar) -> dict[str, np.ndarray]:
    return {k: b.numpy() for item in reader.read(tar) if item.batch is not None for k, b in zip(item.ids, item.batch)}


def expected_pictures(samples) -> dict[str, np.ndarray]:
    return {s.key: np.asarray(Image.open(io.BytesIO(s.members["png"])).convert("RGB")) for s in samples}


def assert_same_pictures(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_the_next_shard_reuses_the_built_pipeline_with_the_right_pictures(three_shards):
    PIPELINES.clear()
    reader = DaliShardReader(None, batch_size=2, num_threads=1)  # batches of 2, 2 and 1: the last one not padded
    key = reader.pipeline_key(None, 1)
    built = []
    for tar, samples in three_shards:
        assert_same_pictures(decoded(reader, tar), expected_pictures(samples))
        built.append(PIPELINES._idle[key][-1])
        assert len(PIPELINES._idle[key]) == 1
    assert built[0] is built[1] is built[2]
    other = DaliShardReader(None, batch_size=3, num_threads=1)  # other settings: a pipeline of its own
    assert_same_pictures(decoded(other, three_shards[0][0]), expected_pictures(three_shards[0][1]))
    assert PIPELINES._idle[other.pipeline_key(None, 1)][0] is not built[0]


def test_a_reader_stopped_early_does_not_hand_its_batch_in_flight_to_the_next_shard(three_shards):
    PIPELINES.clear()
    reader = DaliShardReader(None, batch_size=2, num_threads=1)
    items = reader.read(three_shards[0][0])
    first = next(items)  # the second batch is being decoded now
    assert first.ids == [s.key for s in three_shards[0][1][:2]]
    items.close()
    assert not PIPELINES._idle.get(reader.pipeline_key(None, 1))  # dropped: it held an unread batch
    assert_same_pictures(decoded(reader, three_shards[1][0]), expected_pictures(three_shards[1][1]))


def test_after_a_failed_batch_the_next_shard_is_read_right(shard, three_shards):
    PIPELINES.clear()
    reader = DaliShardReader(None, batch_size=2, num_threads=1, image_extensions=("png", "jpg"))
    statuses = items_by_status(list(reader.read(str(shard[0]))))
    assert statuses[DECODE_FAILED] == ["bad"]  # its pipeline raised: dropped, a new one went on
    assert_same_pictures(decoded(reader, three_shards[2][0]), expected_pictures(three_shards[2][1]))


def test_a_tar_cut_short_in_its_last_image_reports_that_image_and_names_the_tar(tmp_path):
    rng = np.random.default_rng(11)
    samples = make_samples(4, 0, rng, image_formats=("jpg",), sizes=[(48, 40)])
    write_shard(tmp_path, "00000", [Sample(s.key, {"jpg": s.members["jpg"]}) for s in samples])
    tar = tmp_path / "00000.tar"
    reader = DaliShardReader(TransformSpec.from_timm(DEFAULT_MODEL), batch_size=4, num_threads=1)
    last = reader.image_members(str(tar))[-1][1]
    os.truncate(tar, last.offset_data + last.size // 2)  # an interrupted copy: the last image is half there
    items = list(reader.read(str(tar)))
    statuses = items_by_status(items)
    assert sorted(statuses[OK]) == sorted(s.key for s in samples[:3]) and statuses[DECODE_FAILED] == [samples[3].key]
    failed = next(i for i in items if i.status == DECODE_FAILED)
    assert str(tar) in failed.error and "truncated" in failed.error


def test_clear_worker_cache_drops_the_built_pipelines(three_shards):
    from nemo_curator.utils.distributed_utils import clear_worker_cache

    reader = DaliShardReader(None, batch_size=2, num_threads=1)
    decoded(reader, three_shards[0][0])
    assert PIPELINES._idle.get(reader.pipeline_key(None, 1))
    clear_worker_cache()
    assert not PIPELINES._idle.get(reader.pipeline_key(None, 1))
