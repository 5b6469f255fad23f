"""The curation flow of docs/getting_started.md as a script: embed + score, save, filter, reshard, report.

    python examples/curate.py /data/shards /data/curated                       # local cluster (GPU if any)
    python examples/curate.py /data/shards /data/curated --scheduler-file s.json  # a running cluster (Slurm)
    python examples/curate.py /tmp/sample /tmp/curated --smoke                 # tiny random model and heads

INPUT is a folder of webdataset shards ``NNNNN.tar`` with ``NNNNN.parquet`` beside each (make one
with ``nemo-curator-image sample /tmp/sample``). Its parquets gain ``image_embedding``,
``image_status``, ``aesthetic_score`` and ``nsfw_score``; OUTPUT receives the kept samples.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from nemo_curator import get_client
from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.image.classifiers import AestheticClassifier, NsfwClassifier, write_random_heads
from nemo_curator.image.embedders import TimmImageEmbedder
from nemo_curator.report import default_thresholds, make_report, quantile_thresholds
from nemo_curator.utils.constants import (DEFAULT_AESTHETIC_THRESHOLD, DEFAULT_MODEL, DEFAULT_NSFW_THRESHOLD, SMOKE_WARNING,
                                          TINY_MODEL_KWARGS)
from nemo_curator.utils.device import cuda_available


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="folder of NNNNN.tar + NNNNN.parquet shards")
    p.add_argument("output", help="folder for the curated shards")
    p.add_argument("--scheduler-file", help="JSON file of a running `dask scheduler --scheduler-file`")
    p.add_argument("--scheduler-address", help="address of a running scheduler, e.g. tcp://10.0.0.1:8786")
    p.add_argument("--wait-for-workers", type=int, default=1, help="with a running cluster: workers to wait for")
    p.add_argument("--batch-size", type=int, default=256 if cuda_available() else 32)
    p.add_argument("--threads", type=int, help="DALI threads per worker (default: the cores per worker)")
    p.add_argument("--aesthetic-threshold", type=float, default=DEFAULT_AESTHETIC_THRESHOLD, help="keep aesthetic_score above it")
    p.add_argument("--nsfw-threshold", type=float, default=DEFAULT_NSFW_THRESHOLD, help="keep nsfw_score below it")
    # auto: bf16 where the hardware computes it (GPUs, AVX512-BF16/AMX CPUs), decided on each worker
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny random model and random heads (offline; scores mean nothing)")
    return p.parse_args(argv)


def connect(args):
    """A client to the running cluster named by the arguments, or to a new local one (GPU if there is one)."""
    if args.scheduler_file or args.scheduler_address:
        client = get_client(scheduler_file=args.scheduler_file, scheduler_address=args.scheduler_address)
        client.wait_for_workers(args.wait_for_workers, timeout=600)
        return client
    return get_client(cluster_type="auto")  # GPU workers when this machine has a GPU and dask-cuda


def models(args, scratch: str) -> tuple[dict, list]:
    """(embedder arguments, heads): the real ones, or with --smoke a tiny random model and random heads."""
    if not args.smoke:
        return dict(pretrained=True), [AestheticClassifier(), NsfwClassifier()]  # weights downloaded once
    print(SMOKE_WARNING)
    heads = write_random_heads(scratch)
    return (dict(pretrained=False, model_kwargs=TINY_MODEL_KWARGS),
            [AestheticClassifier(model_path=heads["aesthetic"]), NsfwClassifier(model_path=heads["nsfw"])])


def main(argv=None) -> dict:
    args = parse_args(argv)
    client = connect(args)
    scratch = tempfile.mkdtemp(prefix="curate-", dir=os.path.dirname(os.path.abspath(args.output)) or None)
    try:
        model_args, heads = models(args, scratch)
        dataset = ImageTextPairDataset.from_webdataset(path=args.input, id_col="key")
        embedder = TimmImageEmbedder(DEFAULT_MODEL, batch_size=args.batch_size, num_threads_per_worker=args.threads,
                                     normalize_embeddings=True, classifiers=heads, precision=args.precision,
                                     **model_args)
        dataset = embedder(dataset)        # lazy: a Dask graph, one task per shard
        dataset.save_metadata()            # runs it (a rerun skips the shards already written); from now
                                           # on `dataset` reads the saved parquets
        if args.smoke:  # random heads: cut at score quantiles so that some samples are kept and some dropped
            thresholds = quantile_thresholds(dataset, {"aesthetic_score": 0.4, "nsfw_score": 0.8})
        else:
            thresholds = default_thresholds(args.aesthetic_threshold, args.nsfw_threshold)
        aesthetic, nsfw = (t.value for t in thresholds)
        dataset.metadata["keep"] = (dataset.metadata.aesthetic_score > aesthetic) & (dataset.metadata.nsfw_score < nsfw)
        summary = dataset.to_webdataset(args.output, filter_column="keep")
        print(make_report(args.input, curated=args.output, thresholds=thresholds))
        return summary
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":  # the guard matters: local Dask workers are started as new processes
    main()
