"""ImageWriterStage: the source members byte for byte, exactly images_per_tar per tar across the
batches of a file group, a parquet per tar that ImageTextPairDataset opens, corrupt images left
out and counted, and resume (file groups already written are skipped) through utils/shard_job."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.image.shard_reader import DaliShardReader
from nemo_curator.pipeline import Pipeline, stage_timings
from nemo_curator.stages.file_partitioning import FilePartitioningStage
from nemo_curator.stages.image.embedders.clip_embedder import ImageEmbeddingStage
from nemo_curator.stages.image.filters.aesthetic_filter import ImageAestheticFilterStage
from nemo_curator.stages.image.io.image_reader import ImageReaderStage
from nemo_curator.stages.image.io.image_writer import ImageWriterStage
from nemo_curator.tasks import FileGroupTask, ImageBatch, ImageObject
from nemo_curator.utils.sample_data import Sample, make_samples, write_shard
from nemo_curator.utils.webdataset import iter_tar_samples, read_member_bytes
from stage_fixtures import tiny_model_dir


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """3 shards of 5 samples (jpg, png, webp; a .cls member too) plus, in the first, a corrupt
    image and a sample without an image."""
    folder = tmp_path_factory.mktemp("writer_source")
    rng = np.random.default_rng(11)
    for s in range(3):
        samples = make_samples(5, s * 100, rng, image_formats=("jpg", "png", "webp"), sizes=[(48, 40), (40, 48)])
        for sample in samples:
            sample.members["cls"] = str(s).encode()
        if s == 0:
            samples.insert(2, Sample("000000077", {"jpg": b"not an image", "txt": b"bad"}, {"caption": "bad"}))
            samples.append(Sample("000000088", {"txt": b"text only"}, {"caption": "text only"}))
        write_shard(folder, f"{s:05d}", samples)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_checkpoint):
    return tiny_model_dir(tmp_path_factory.mktemp("writer_models"), tiny_checkpoint)


def pipeline(source, models, out, threshold=-1e9, images_per_tar=4, **writer) -> Pipeline:
    return Pipeline("write", stages=[
        FilePartitioningStage(file_paths=str(source), files_per_partition=2, file_extensions=[".tar"]),
        ImageReaderStage(dali_batch_size=3, num_threads=1, verbose=False),
        ImageEmbeddingStage(model_dir=str(models)),
        ImageAestheticFilterStage(model_dir=str(models), score_threshold=threshold),
        ImageWriterStage(output_dir=str(out), images_per_tar=images_per_tar, **writer),
    ])


def members_of(tar) -> dict[str, dict[str, bytes]]:
    out = {}
    with open(tar, "rb") as f:
        for key, members in iter_tar_samples(tar):
            out[key] = {m.ext: read_member_bytes(f, m) for m in members}
    return out


def test_written_shards_are_byte_exact_packed_and_a_dataset(client, source, models, tmp_path):
    out = tmp_path / "out"
    results = pipeline(source, models, out).run()
    assert [type(r) for r in results] == [FileGroupTask, FileGroupTask]  # groups: 2 tars, 1 tar
    sources = {k: v for t in sorted(source.glob("*.tar")) for k, v in members_of(t).items()}
    counts = []
    for result in results:
        tars = [p for p in result.data if p.endswith(".tar")]
        counts.append([len(members_of(t)) for t in tars])
        for tar in tars:
            for key, members in members_of(tar).items():
                assert members == sources[key]  # every member, byte for byte (image, txt, json, cls)
    assert counts == [[4, 4, 2], [4, 1]]  # 10 good images of group 1 in tars of 4 across batches of 3; 5 in group 2
    first = results[0]._metadata["writer_stats"]
    assert first["images_written"] == 10 and results[0]._metadata["num_images"] == 10
    timings = stage_timings(results)  # the failures are counted where they happen: reader, then filter
    assert timings["image_reader"].custom_metrics["decode_failed"] == 1
    assert timings["image_reader"].custom_metrics["missing_image"] == 1
    assert timings["image_aesthetic_filter"].custom_metrics["unscored"] == 2

    dataset = ImageTextPairDataset.from_webdataset(str(out), id_col="key")
    frame = dataset.metadata.compute().set_index("key")
    assert len(frame) == 15 and set(frame.index) == set(sources) - {"000000077", "000000088"}
    row = frame.loc["000000101"]
    assert row["caption"] == json.loads(sources["000000101"]["json"])["caption"]
    assert row["url"].endswith("000000101.png") and row["image_status"] == "ok"
    assert len(row["image_embedding"]) == 768 and np.isfinite(row["aesthetic_score"])
    assert "txt" not in frame.columns and "json" not in frame.columns  # those are in the tar
    assert frame["aesthetic_score"].dtype == np.float32

    tar = next(p for p in results[1].data if p.endswith("000000.tar"))
    items = list(DaliShardReader(None, batch_size=4, num_threads=1, use_index_files=True).read(tar))
    assert sum(len(i.ids) for i in items if i.batch is not None) == 4  # the .idx beside it is a valid DALI index

    assert timings["image_writer"].custom_metrics["written"] == 15 and timings["image_reader"].num_items_processed == 17
    assert json.loads((out / "_run_summary.json").read_text())["totals"]["images_written"] == 15


def test_rerun_skips_the_file_groups_already_written(client, source, models, tmp_path):
    out = tmp_path / "out"
    first = pipeline(source, models, out).run()
    files = sorted(n for n in os.listdir(out) if n != "_run_summary.json")
    stamps = {name: os.stat(out / name).st_mtime_ns for name in files}
    again = pipeline(source, models, out).run()
    assert [r.data for r in again] == [r.data for r in first]
    assert {name: os.stat(out / name).st_mtime_ns for name in files} == stamps  # nothing rewritten
    summary = json.loads((out / "_run_summary.json").read_text())
    assert summary["shards_skipped"] == 2 and summary["shards_written"] == 0
    assert again[0].stage_perf_totals()["image_embedding"].process_time > 0  # timings kept from the run that wrote

    # an interrupted run: one group's marker gone and a temporary left behind; another input changed
    second = first[1]._metadata["writer_stats"]
    os.unlink(out / f"{second['group']}.stats.json")
    (out / f".{second['group']}-000000.tar.deadbeef.tmp").write_bytes(b"partial")
    rerun = pipeline(source, models, out).run()
    assert [r.data for r in rerun] == [r.data for r in first]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert os.stat(out / os.path.basename(first[0].data[0])).st_mtime_ns == stamps[os.path.basename(first[0].data[0])]
    assert json.loads((out / "_run_summary.json").read_text())["shards_skipped"] == 1


def test_another_filter_redoes_every_group_and_leaves_no_stale_tar(client, source, models, tmp_path):
    out = tmp_path / "out"
    pipeline(source, models, out).run()
    scores = ImageTextPairDataset.from_webdataset(str(out), id_col="key").metadata.compute()["aesthetic_score"]
    cut = float(np.sort(scores)[10])
    strict = pipeline(source, models, out, threshold=cut).run()
    assert sum(r._metadata["num_images"] for r in strict) == int((scores >= cut).sum()) == 5
    frame = ImageTextPairDataset.from_webdataset(str(out), id_col="key").metadata.compute()
    assert len(frame) == 5 and (frame["aesthetic_score"] >= cut).all()  # the earlier, longer run left nothing
    nothing = pipeline(source, models, out, threshold=1e9).run()
    assert [r._metadata["num_images"] for r in nothing] == [0, 0]
    assert [len([p for p in r.data if p.endswith(".tar")]) for r in nothing] == [1, 1]  # one empty shard per group
    assert len(ImageTextPairDataset.from_webdataset(str(out), id_col="key").metadata.compute()) == 0
    assert json.loads((out / "_run_summary.json").read_text())["shards_written"] == 2
    pipeline(source, models, out, threshold=1e9).run()
    assert json.loads((out / "_run_summary.json").read_text())["shards_skipped"] == 2  # empty groups resume too


def test_random_names_and_hand_made_batches(tmp_path, source):
    """deterministic_name=False adds a per-run part; a batch made by hand (plain image files, or
    pixels only) is written too, pixels as lossless PNG."""
    from PIL import Image

    image = tmp_path / "photo.jpg"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(image)
    pixels = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    batch = ImageBatch(dataset_name="hand", data=[ImageObject(image_path=str(image), image_id="a", metadata={"x": 1}),
                                                  ImageObject(image_id="b", image_data=pixels),
                                                  ImageObject(image_id="c", status="decode_failed", error="bad")])
    writer = ImageWriterStage(output_dir=str(tmp_path / "hand"), images_per_tar=5, deterministic_name=False)
    out = writer.process(batch)
    tar = out.data[0]
    assert len(os.path.basename(tar).split("-")) == 4  # images-<group>-<run>-<index>.tar
    written = members_of(tar)
    assert written["a"]["jpg"] == image.read_bytes()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(written["b"]["png"]))), pixels)
    stats = out._metadata["writer_stats"]
    assert stats["reencoded"] == 1 and stats["not_written"] == 1 and stats["status_decode_failed"] == 1
    rows = pq.read_table(out.data[1]).to_pandas()
    assert rows["key"].tolist() == ["a", "b"] and rows["x"].tolist()[0] == 1
    with pytest.raises(ValueError, match="images_per_tar"):
        ImageWriterStage(output_dir=str(tmp_path / "x"), images_per_tar=0)
    assert isinstance(pd.read_parquet(out.data[1]), pd.DataFrame)
