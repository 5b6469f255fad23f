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

from nemo_curator.image.shard_reader import DaliShardReader, ShardItems
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
