"""ImageReaderStage (real DALI on CPU): webdataset keys as ids, the parquet row and the .txt/.json
as metadata, every image extension, corrupt images and missing samples reported, and the legacy
``id_field`` spelling of the dataset reader."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.stages.image.io.image_reader import ImageReaderStage
from nemo_curator.tasks import FileGroupTask, ImageBatch
from nemo_curator.utils.constants import DECODE_FAILED, MISSING_IMAGE, OK
from nemo_curator.utils.sample_data import Sample, encode_image, make_samples, synthetic_image, write_shard


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """One tar: jpg, png, webp and jpeg images, a garbage .jpg, a sample with only a .txt, a parquet
    row without a sample, and a sample without a parquet row."""
    folder = tmp_path_factory.mktemp("reader_stage")
    rng = np.random.default_rng(3)
    samples = make_samples(4, 0, rng, image_formats=("jpg", "png", "webp", "jpeg"), sizes=[(64, 48), (48, 64)])
    samples.insert(2, Sample("broken", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"broken caption"}, {"caption": "broken"}))
    samples.append(Sample("textonly", {"txt": b"no image here"}, {"caption": "no image"}))
    samples.append(Sample("norow", {"png": encode_image(synthetic_image(rng, 40, 30), "png"),
                                    "json": json.dumps({"note": "no parquet row"}).encode()}, None))
    write_shard(folder, "00000", samples, extra_rows=[{"key": "ghost", "caption": "row without a sample"}])
    return folder / "00000.tar", samples


def read(tar, **kwargs) -> list[ImageBatch]:
    stage = ImageReaderStage(num_threads=1, verbose=False, **kwargs)
    group = FileGroupTask(dataset_name="d", data=[str(tar)], task_id="g", _metadata={"source_files": [str(tar)]})
    return stage.process(group)


def test_ids_are_the_webdataset_keys_and_metadata_is_row_txt_and_json(shard):
    tar, samples = shard
    objects = {o.image_id: o for b in read(tar) for o in b.data}
    assert set(objects) == {s.key for s in samples} | {"ghost"}
    first = samples[0]
    obj = objects[first.key]
    assert obj.status == OK and obj.tar_path == str(tar) and obj.image_path == f"{tar}/{first.key}.jpg"
    assert obj.metadata["caption"] == first.row["caption"] and obj.metadata["url"] == first.row["url"]
    assert obj.metadata["key"] == first.key
    assert obj.metadata["txt"] == first.members["txt"].decode()
    assert obj.metadata["json"] == json.loads(first.members["json"])
    assert objects["norow"].metadata == {"json": {"note": "no parquet row"}} and objects["norow"].status == OK


def test_every_image_extension_is_decoded_to_its_pixels(shard):
    tar, samples = shard
    objects = {o.image_id: o for b in read(tar) for o in b.data}
    for sample in samples[:2] + samples[3:5]:
        ext = next(e for e in sample.members if e not in ("txt", "json"))
        obj = objects[sample.key]
        assert obj.image_path.endswith("." + ext) and obj.status == OK
        reference = np.asarray(Image.open(io.BytesIO(sample.members[ext])).convert("RGB"))
        assert obj.image_data.dtype == np.uint8 and obj.image_data.shape == reference.shape
        if ext in ("png",):  # lossless: the exact pixels
            assert np.array_equal(obj.image_data, reference)
        else:
            assert np.abs(obj.image_data.astype(int) - reference).mean() < 3


def test_corrupt_and_missing_images_get_a_status_and_the_rest_goes_on(shard):
    tar, _ = shard
    batches = read(tar, dali_batch_size=2)
    objects = {o.image_id: o for b in batches for o in b.data}
    assert objects["broken"].status == DECODE_FAILED and objects["broken"].image_data is None
    assert objects["broken"].error and objects["broken"].metadata["caption"] == "broken"
    assert objects["textonly"].status == MISSING_IMAGE and objects["textonly"].image_path == ""
    assert objects["ghost"].status == MISSING_IMAGE and "no sample" in objects["ghost"].error
    assert sum(o.status == OK for o in objects.values()) == 5
    assert [b.num_items for b in batches] == [2, 2, 2, 2]  # 8 objects, dali_batch_size=2
    assert [b.task_id for b in batches] == ["g_0", "g_1", "g_2", "g_3"]
    assert all(b._metadata["source_files"] == [str(tar)] and b._metadata["id_col"] == "key" for b in batches)


def test_batches_span_the_tars_of_a_group(tmp_path):
    rng = np.random.default_rng(0)
    tars = []
    for s in range(2):
        tars.append(write_shard(tmp_path, f"{s:05d}", make_samples(3, s * 10, rng, sizes=[(32, 32)]))["tar"])
    stage = ImageReaderStage(dali_batch_size=4, num_threads=1, verbose=False)
    batches = stage.process(FileGroupTask(dataset_name="d", data=tars))
    assert [b.num_items for b in batches] == [4, 2]
    assert [o.image_id for b in batches for o in b.data] == [f"{i:09d}" for i in (0, 1, 2, 10, 11, 12)]


def test_a_group_of_empty_tars_still_yields_one_batch(tmp_path):
    tar = write_shard(tmp_path, "00000", [])["tar"]
    batches = ImageReaderStage(num_threads=1).process(FileGroupTask(dataset_name="d", data=[tar]))
    assert [b.num_items for b in batches] == [0]


def test_image_extensions_choose_the_member(shard):
    tar, samples = shard
    objects = {o.image_id: o for b in read(tar, image_extensions=("png",)) for o in b.data}
    assert objects[samples[1].key].status == OK  # the png sample
    assert objects[samples[0].key].status == MISSING_IMAGE  # a jpg: not an image for this reader


def test_legacy_id_field_spelling_opens_the_dataset(shard):
    tar, _ = shard
    folder = str(tar.parent)
    assert ImageTextPairDataset.from_webdataset(path=folder, id_field="key").id_col == "key"
    assert ImageTextPairDataset.from_webdataset(folder, id_col="key", id_field="key").id_col == "key"
    with pytest.raises(ValueError, match="legacy spelling"):
        ImageTextPairDataset.from_webdataset(folder, id_col="key", id_field="caption")
