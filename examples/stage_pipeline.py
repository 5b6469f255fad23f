"""The stage API of NeMo Curator 1.x on Dask: the docs' aesthetic-filtering pipeline, then an NSFW
filter and a writer (see docs/stages.md).

    python examples/stage_pipeline.py /data/shards /data/curated --model-dir /models
    python examples/stage_pipeline.py /data/shards /data/curated --scheduler-file s.json   # a running cluster
    python examples/stage_pipeline.py /tmp/sample /tmp/curated --smoke        # tiny random model and heads, offline

INPUT is a folder of webdataset shards ``NNNNN.tar`` (``NNNNN.parquet`` beside each is read as
the samples' metadata; make a sample with ``nemo-curator-image sample /tmp/sample``). MODEL_DIR
holds the weights in 1.x's layout (``openai/clip-vit-large-patch14``, ...); missing files are
taken from the Hugging Face cache or ``$NEMO_CURATOR_HOME/weights``, else downloaded. OUTPUT
receives the kept images as tars of ``--images-per-tar`` samples with a parquet beside each; a
rerun skips the file groups already written.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from nemo_curator import get_client
from nemo_curator.image.model_dir import write_random_model_dir
from nemo_curator.pipeline import Pipeline, stage_timings
from nemo_curator.stages.file_partitioning import FilePartitioningStage
from nemo_curator.stages.image.embedders.clip_embedder import ImageEmbeddingStage
from nemo_curator.stages.image.filters.aesthetic_filter import ImageAestheticFilterStage
from nemo_curator.stages.image.filters.nsfw_filter import ImageNSFWFilterStage
from nemo_curator.stages.image.io.image_reader import ImageReaderStage
from nemo_curator.stages.image.io.image_writer import ImageWriterStage
from nemo_curator.utils.constants import DEFAULT_AESTHETIC_THRESHOLD, DEFAULT_NSFW_THRESHOLD, SMOKE_WARNING


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="folder of NNNNN.tar shards (NNNNN.parquet beside each, optional)")
    p.add_argument("output", help="folder for the curated shards")
    p.add_argument("--model-dir", help="weights folder (1.x layout); default $NEMO_CURATOR_HOME/models")
    p.add_argument("--scheduler-file", help="JSON file of a running `dask scheduler --scheduler-file`")
    p.add_argument("--scheduler-address", help="address of a running scheduler, e.g. tcp://10.0.0.1:8786")
    p.add_argument("--tars-per-group", type=int, default=1, help="tars per file group (one Dask task each)")
    p.add_argument("--batch-size", type=int, default=100, help="images per DALI batch")
    p.add_argument("--threads", type=int, default=8, help="DALI threads per task")
    p.add_argument("--aesthetic-threshold", type=float, default=DEFAULT_AESTHETIC_THRESHOLD,
                   help="keep aesthetic_score >= it")
    p.add_argument("--nsfw-threshold", type=float, default=DEFAULT_NSFW_THRESHOLD, help="keep nsfw_score < it")
    p.add_argument("--images-per-tar", type=int, default=1000)
    p.add_argument("--gpus-per-task", type=float, default=0.25, help="GPU share of one task (num_gpus_per_worker)")
    p.add_argument("--smoke", action="store_true", help="tiny random CLIP and random heads (offline; scores mean nothing)")
    return p.parse_args(argv)


def build_pipeline(args, model_dir: str | None, aesthetic_threshold: float, nsfw_threshold: float,
                   write: bool = True) -> Pipeline:
    """The docs' pipeline (partition, read, embed, aesthetic filter), an NSFW filter and a writer."""
    pipeline = Pipeline(name="image_curation", description="Embed, filter by aesthetics and NSFW, write")
    pipeline.add_stage(FilePartitioningStage(file_paths=args.input, files_per_partition=args.tars_per_group,
                                             file_extensions=[".tar"]))
    pipeline.add_stage(ImageReaderStage(dali_batch_size=args.batch_size, num_threads=args.threads,
                                        num_gpus_per_worker=args.gpus_per_task, verbose=False))
    pipeline.add_stage(ImageEmbeddingStage(model_dir=model_dir, model_inference_batch_size=32,
                                           num_gpus_per_worker=args.gpus_per_task, remove_image_data=True))
    pipeline.add_stage(ImageAestheticFilterStage(model_dir=model_dir, score_threshold=aesthetic_threshold,
                                                 num_gpus_per_worker=args.gpus_per_task))
    pipeline.add_stage(ImageNSFWFilterStage(model_dir=model_dir, score_threshold=nsfw_threshold,
                                            num_gpus_per_worker=args.gpus_per_task))
    if write:
        pipeline.add_stage(ImageWriterStage(output_dir=args.output, images_per_tar=args.images_per_tar))
    return pipeline


def smoke_thresholds(args, model_dir: str) -> tuple[float, float]:
    """With random heads the scores mean nothing: cut at score quantiles (aesthetic 40 %, NSFW
    80 %), so that some images are kept and some dropped. A first run without a writer returns
    every image's scores (without pixels)."""
    results = build_pipeline(args, model_dir, float("-inf"), float("inf"), write=False).run()
    aesthetic = sorted(o.aesthetic_score for r in results for o in r.data)
    nsfw = sorted(o.nsfw_score for r in results for o in r.data)
    if not aesthetic:
        return 0.0, 1.0
    return aesthetic[int(0.4 * len(aesthetic))], nsfw[min(int(0.8 * len(nsfw)), len(nsfw) - 1)]


def main(argv=None) -> list:
    args = parse_args(argv)
    client = None
    if args.scheduler_file or args.scheduler_address:
        client = get_client(scheduler_file=args.scheduler_file, scheduler_address=args.scheduler_address)
    # else: Pipeline.run() starts a local cluster (GPU workers where there is a GPU)
    model_dir, thresholds = args.model_dir, (args.aesthetic_threshold, args.nsfw_threshold)
    if args.smoke:
        print(SMOKE_WARNING)
        model_dir = model_dir or tempfile.mkdtemp(prefix="smoke-models-",
                                                  dir=os.path.dirname(os.path.abspath(args.output)) or None)
        write_random_model_dir(model_dir)
        thresholds = smoke_thresholds(args, model_dir)
    results = build_pipeline(args, model_dir, *thresholds).run()
    timings = stage_timings(results)
    seen = int(timings["image_reader"].custom_metrics.get("images", 0))
    kept = sum(r._metadata["num_images"] for r in results)
    tars = sum(1 for r in results for p in r.data if p.endswith(".tar"))
    print(f"kept {kept} of {seen} images in {tars} tars under {args.output}")
    for name, perf in timings.items():
        print(f"  {name}: {perf.process_time:.2f} s, {perf.num_items_processed} items, "
              f"{ {k: int(v) for k, v in perf.custom_metrics.items()} }")
    if client is not None:
        client.close()  # ours; a cluster Pipeline.run() started goes when this process ends
    return results


if __name__ == "__main__":
    main()
