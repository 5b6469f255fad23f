"""``nemo-curator-image``: the whole curation job from the command line.

Subcommands: ``sample`` (build a sample dataset), ``embed`` (embeddings + heads), ``score``
(heads over an existing embedding column), ``filter`` (keep rows by an expression, reshard),
``index`` (DALI index files), ``index-metadata`` (a parquet for tars without one), ``report``,
``dedup`` (semantic or exact duplicates), ``demo``. Exit status: 0 on success, 1 on an error (one line on stderr; ``--debug`` adds the
traceback), 2 on a usage error, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from nemo_curator._version import __version__
from nemo_curator.scripts.common import open_client, positive_int, say
from nemo_curator.scripts.dedup_cli import add_dedup_parser
from nemo_curator.scripts.demo import DEMO_THRESHOLDS
from nemo_curator.utils.constants import (DEFAULT_AESTHETIC_THRESHOLD, DEFAULT_FILTER, DEFAULT_ID_COL, DEFAULT_MODEL,
                                          DEFAULT_NSFW_THRESHOLD, EMBEDDING_COLUMN, HEAD_NAMES, KEEP_COLUMN,
                                          PRECISIONS, SMOKE_WARNING)
from nemo_curator.utils.distributed_utils import CLUSTER_TYPES
from nemo_curator.utils.sample_data import shared_photos_dir

PROG = "nemo-curator-image"
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Options shared by several subcommands
def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """--debug and --verbose, accepted before or after the subcommand."""
    default = {} if defaults else {"default": argparse.SUPPRESS}
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", help="on an error, print the full traceback", **default)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO level)", **default)
    return p


def _cluster_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("cluster (default: a local cluster on this machine, GPU workers if it has a GPU)")
    g.add_argument("--cluster", choices=CLUSTER_TYPES, default="auto",
                   help="local cluster kind: 'cpu' (distributed.LocalCluster), 'gpu' (dask_cuda.LocalCUDACluster, "
                        "one worker per GPU) or 'auto' (gpu when a GPU and dask-cuda are present). Default: auto")
    g.add_argument("--scheduler-file", metavar="PATH",
                   help="connect to a running cluster through the JSON file of `dask scheduler --scheduler-file` "
                        "(Slurm, PBS, dask-mpi) instead of starting one")
    g.add_argument("--scheduler-address", metavar="ADDR",
                   help="connect to a running scheduler, e.g. tcp://10.0.0.1:8786, instead of starting a cluster")
    g.add_argument("--n-workers", type=positive_int, metavar="N",
                   help="workers of the local cluster. Default: one per CPU core (cpu), one per GPU (gpu)")
    g.add_argument("--rmm-pool-size", default="1024M", metavar="SIZE",
                   help="GPU workers: RMM pool allocated up front per GPU, e.g. 24GB. Default: 1024M")
    return p


def _model_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"timm model name (its 768-d output feeds the heads). Default: {DEFAULT_MODEL}")
    g.add_argument("--checkpoint", metavar="PATH", help="a local weights file for the model instead of the hub")
    g.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                   help="images per model call on each worker (GPU: 256-1024, see docs/gpu.md). Default: 32")
    g.add_argument("--threads", type=positive_int, metavar="N",
                   help="DALI decoding threads per worker. Default: the machine's cores divided among the workers "
                        "on it (decided on each worker)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="model precision: 'bf16' (bf16 autocast, obeyed everywhere, with a warning where the CPU "
                        "emulates it: several times slower than fp32), 'fp32', or 'auto': bf16 where the hardware "
                        "computes it natively (GPUs; CPUs with AVX512-BF16 or AMX), decided on each worker, else "
                        "fp32. Default: auto")
    _head_options(g)
    return p


def _head_options(g) -> None:
    g.add_argument("--aesthetic-weights", metavar="PATH",
                   help="local sac+logos+ava1-l14-linearMSE.pth. Default: $NEMO_CURATOR_HOME/weights, downloaded once")
    g.add_argument("--nsfw-weights", metavar="PATH",
                   help="local clip_autokeras_binary_nsfw.pth. Default: $NEMO_CURATOR_HOME/weights, downloaded once")
    g.add_argument("--offline", action="store_true",
                   help="never download: use only local files and caches (also implied by HF_HUB_OFFLINE=1)")


def _head_list(text: str) -> list[str]:
    names = [] if text.strip().lower() == "none" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in HEAD_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown head(s) {unknown}: use a comma-separated subset of "
                                         f"{','.join(HEAD_NAMES)}, or 'none'")
    return names


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common, cluster, model = _common_options(False), _cluster_options(), _model_options()
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[_common_options(True)],
        description="Curate image-text webdataset shards on Dask: DALI decoding, timm CLIP embeddings, LAION "
                    "aesthetic and NSFW scores, filtering and resharding.",
        epilog="Typical job: `embed DATA`, then `filter DATA OUT --expr '...'`, then `report DATA --curated OUT`. "
               f"`{PROG} demo --output DIR --smoke` shows it all on generated data. See docs/getting_started.md.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("sample", parents=[common], help="write a small sample dataset (generated pictures)",
                       description="Write NNNNN.tar + NNNNN.parquet shards of generated pictures (and your photos).")
    p.add_argument("output", help="folder to create (must be empty or absent)")
    p.add_argument("--shards", type=positive_int, default=2, metavar="N", help="number of shards. Default: 2")
    p.add_argument("--samples-per-shard", type=positive_int, default=16, metavar="N", help="samples per shard. Default: 16")
    p.add_argument("--photos", metavar="DIR", help="a folder of *.jpg used before generated pictures")
    p.add_argument("--formats", default="jpg", help="image formats to cycle through, e.g. jpg,png,webp. Default: jpg")
    p.add_argument("--index", action="store_true", help="also write DALI index files NNNNN.idx")
    p.add_argument("--seed", type=int, default=0, help="random seed. Default: 0")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("embed", parents=[common, cluster, model],
                       help="add image embeddings and aesthetic / NSFW scores to a dataset's parquets",
                       description="Embed every image with a timm model, score the embeddings with the heads on the "
                                   "same device, and rewrite each NNNNN.parquet in place (atomically) with the columns "
                                   "image_embedding, image_status and one score column per head. A rerun resumes.")
    p.add_argument("dataset", help="folder of NNNNN.tar + NNNNN.parquet shards")
    _dataset_options(p)
    p.add_argument("--heads", type=_head_list, default=list(HEAD_NAMES), metavar="LIST",
                   help="heads to run on the embeddings: aesthetic,nsfw (default), one of them, or none")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="random model weights (for tests; the scores then mean nothing)")
    p.add_argument("--model-kwargs", type=_json_dict, metavar="JSON",
                   help="extra timm.create_model arguments, e.g. '{\"embed_dim\": 64, \"depth\": 2, \"num_heads\": 2}'")
    p.add_argument("--use-index-files", action="store_true", help="read NNNNN.idx instead of scanning each tar")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="recompute every shard (default: skip shards this same job already wrote)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("score", parents=[common, cluster],
                       help="score an existing embedding column with the heads",
                       description="Run the aesthetic and/or NSFW heads over an embedding column already in the "
                                   "parquets (written by `embed`), and rewrite the parquets in place.")
    p.add_argument("dataset", help="folder of NNNNN.tar + NNNNN.parquet shards with an embedding column")
    _dataset_options(p)
    g = p.add_argument_group("heads")
    g.add_argument("--heads", type=_head_list, default=list(HEAD_NAMES), metavar="LIST",
                   help="heads to run: aesthetic,nsfw (default) or one of them")
    g.add_argument("--embedding-column", default=EMBEDDING_COLUMN, help=f"Default: {EMBEDDING_COLUMN}")
    _head_options(g)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("filter", parents=[common, cluster],
                       help="keep the rows an expression selects and write them as new shards",
                       description="Evaluate EXPR on each shard's metadata (pandas DataFrame.eval: column names, "
                                   "numbers, comparisons, and/or/not) and copy the kept samples, byte for byte, into "
                                   "new shards in OUTPUT (tar + parquet + DALI index). Rows whose score is NaN (failed "
                                   "image) are dropped.")
    p.add_argument("dataset", help="folder of scored shards")
    p.add_argument("output", help="folder for the new shards")
    p.add_argument("--expr", default=DEFAULT_FILTER, help=f"the keep condition. Default: {DEFAULT_FILTER!r}")
    p.add_argument("--keep-column", default=KEEP_COLUMN,
                   help=f"bool column the condition is stored in (written to the new parquets). Default: {KEEP_COLUMN}")
    p.add_argument("--samples-per-shard", type=positive_int, default=10000, metavar="N", help="Default: 10000")
    p.add_argument("--max-shards", type=positive_int, default=5,
                   help="digits of the output shard number (new ids are shard digits + sample digits). Default: 5")
    p.add_argument("--old-id-col", help="column that receives each sample's old id (default: not kept)")
    p.add_argument("--overwrite", action="store_true", help="delete shard files already in OUTPUT first")
    _dataset_options(p)
    p.set_defaults(func=cmd_filter)

    p = sub.add_parser("index", parents=[common], help="write DALI index files (NNNNN.idx) beside the tars",
                       description="Write the DALI webdataset index (v1.2) of every .tar in FOLDER, atomically.")
    p.add_argument("folder", help="folder of .tar shards")
    p.add_argument("--threads", type=positive_int, default=8, help="tars indexed at once. Default: 8")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("index-metadata", parents=[common], help="write a parquet for tars that have none",
                       description="For every NNNNN.tar without NNNNN.parquet, write one with a row per sample: the "
                                   "id (the member name before the extension) and the caption of its .txt, if any.")
    p.add_argument("folder", help="folder of .tar shards")
    p.add_argument("--id-col", default=DEFAULT_ID_COL, help=f"name of the id column. Default: {DEFAULT_ID_COL}")
    p.set_defaults(func=cmd_index_metadata)

    p = sub.add_parser("report", parents=[common], help="summary table and score histograms of a scored dataset",
                       description="Print the counts, score quantiles, kept/dropped rows, failed images and "
                                   "throughput; write report.md, report.json, report.png (histograms with the "
                                   "thresholds) and examples.png to --output.")
    p.add_argument("dataset", help="folder of scored shards")
    p.add_argument("--output", default="report", help="folder for the report files. Default: ./report")
    p.add_argument("--curated", metavar="DIR", help="the output folder of `filter`, to add its summary")
    p.add_argument("--aesthetic-threshold", type=float, default=DEFAULT_AESTHETIC_THRESHOLD,
                   help=f"keep above it (AVA 1-10). Default: {DEFAULT_AESTHETIC_THRESHOLD:g}")
    p.add_argument("--nsfw-threshold", type=float, default=DEFAULT_NSFW_THRESHOLD,
                   help=f"keep below it (0-1). Default: {DEFAULT_NSFW_THRESHOLD:g}")
    p.add_argument("--expr", help="the keep condition, if not the thresholds' (e.g. the one given to `filter`)")
    p.add_argument("--examples", type=int, default=6, help="kept and dropped images shown in examples.png (0: none). Default: 6")
    p.add_argument("--id-col", default=DEFAULT_ID_COL, help=f"the id column. Default: {DEFAULT_ID_COL}")
    p.set_defaults(func=cmd_report)

    add_dedup_parser(sub, [common, cluster])

    p = sub.add_parser("demo", parents=[common, cluster, model],
                       help="the whole job on a small sample: build, embed + score, filter, reshard, report",
                       description="Build a sample dataset (generated pictures and --photos) in OUTPUT/dataset, embed "
                                   f"and score it with the real model and heads, keep aesthetic > {DEMO_THRESHOLDS[0]:g} and NSFW < 0.5, "
                                   "reshard into OUTPUT/curated and write OUTPUT/report. The weights are checked "
                                   "(and downloaded if possible) first. --smoke uses a tiny random model and random "
                                   "heads instead: no download, about a minute on 2 CPU cores.")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (cleared and rebuilt on a rerun)")
    p.add_argument("--smoke", action="store_true", help="tiny random model and random heads: the scores mean nothing")
    photos = _default_photos()
    p.add_argument("--photos", metavar="DIR", default=photos,
                   help=f"a folder of *.jpg photographs used before generated pictures. Default: {photos or 'none'}")
    p.add_argument("--shards", type=positive_int, default=3, metavar="N", help="shards in the sample dataset. Default: 3")
    p.add_argument("--aesthetic-threshold", type=float, default=DEMO_THRESHOLDS[0], metavar="X",
                   help="keep aesthetic_score above X (AVA 1-10; 5, 6 and 6.5 are common cuts; the demo takes the "
                        "loosest, so that a small sample keeps something). Ignored with --smoke. "
                        f"Default: {DEMO_THRESHOLDS[0]:g}")
    p.add_argument("--nsfw-threshold", type=float, default=DEMO_THRESHOLDS[1], metavar="X",
                   help=f"keep nsfw_score below X (0-1). Ignored with --smoke. Default: {DEMO_THRESHOLDS[1]:g}")
    p.add_argument("--samples-per-shard", type=positive_int, default=16, metavar="N", help="Default: 16")
    p.set_defaults(func=cmd_demo)
    return parser


def _dataset_options(p) -> None:
    p.add_argument("--id-col", default=DEFAULT_ID_COL, help=f"the column holding each sample's key. Default: {DEFAULT_ID_COL}")


def _default_photos() -> str | None:
    folder = shared_photos_dir()
    return str(folder) if folder else None


def cmd_sample(args) -> None:
    from nemo_curator.utils.sample_data import make_sample_dataset

    if os.path.isdir(args.output) and os.listdir(args.output):
        raise FileExistsError(f"{args.output} is not empty: pass a new folder")
    photos = sorted(str(p) for p in _jpgs(args.photos)) if args.photos else []
    formats = tuple(f.strip().lower() for f in args.formats.split(",") if f.strip())
    tars = make_sample_dataset(args.output, n_shards=args.shards, samples_per_shard=args.samples_per_shard,
                               seed=args.seed, image_formats=formats, photos=photos, write_index=args.index)
    say(f"wrote {len(tars)} shards x {args.samples_per_shard} samples ({len(photos)} photos) to {args.output}")


def _jpgs(folder: str):
    from pathlib import Path

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--photos {folder} is not a folder")
    return Path(folder).glob("*.jpg")


def _head_paths(args) -> dict:
    return {"aesthetic": args.aesthetic_weights, "nsfw": args.nsfw_weights}


def cmd_embed(args) -> None:
    from nemo_curator.datasets import ImageTextPairDataset
    from nemo_curator.image.classifiers import build_heads
    from nemo_curator.image.weights import check_weights
    from nemo_curator.scripts.demo import build_embedder

    dataset = ImageTextPairDataset.from_webdataset(args.dataset, id_col=args.id_col)
    check_weights(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, heads=args.heads,
                  head_paths=_head_paths(args), offline=args.offline)
    heads = build_heads(args.heads, _head_paths(args))
    with open_client(args):
        embedder = build_embedder(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                                  model_kwargs=args.model_kwargs, batch_size=args.batch_size, threads=args.threads,
                                  heads=heads, use_index_files=args.use_index_files, precision=args.precision)
        summary = embedder(dataset).save_metadata(resume=args.resume)
    totals = summary["totals"]
    say(f"embedded {int(totals.get('embedded', 0))} of {int(totals.get('rows', 0))} rows in "
        f"{summary['shards_total']} shards ({summary['shards_skipped']} already done); decode_failed "
        f"{int(totals.get('decode_failed', 0))}, missing_image {int(totals.get('missing_image', 0))}; "
        f"{summary['seconds']} s. Parquets rewritten in {summary['path']}")


def cmd_score(args) -> None:
    from nemo_curator.datasets import ImageTextPairDataset
    from nemo_curator.image.classifiers import build_heads
    from nemo_curator.image.weights import check_weights

    if not args.heads:
        raise ValueError("--heads none leaves nothing to score: name at least one head")
    dataset = ImageTextPairDataset.from_webdataset(args.dataset, id_col=args.id_col)
    if args.embedding_column not in dataset.metadata.columns:
        raise KeyError(f"column {args.embedding_column!r} is not in the parquets of {args.dataset} (columns "
                       f"{list(dataset.metadata.columns)}): run `{PROG} embed` first, or pass --embedding-column")
    check_weights(None, heads=args.heads, head_paths=_head_paths(args), offline=args.offline)
    for head in build_heads(args.heads, _head_paths(args), embedding_column=args.embedding_column):
        dataset = head(dataset)
    with open_client(args):
        summary = dataset.save_metadata()
    say(f"scored {int(summary['totals'].get('rows', 0))} rows in {summary['shards_total']} shards with "
        f"{', '.join(args.heads)}; {summary['seconds']} s. Parquets rewritten in {summary['path']}")


def cmd_filter(args) -> None:
    from nemo_curator.datasets import ImageTextPairDataset
    from nemo_curator.filtering import add_filter_column

    dataset = ImageTextPairDataset.from_webdataset(args.dataset, id_col=args.id_col)
    dataset = add_filter_column(dataset, args.expr, args.keep_column)
    with open_client(args), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nothing kept" is reported below
        summary = dataset.to_webdataset(args.output, filter_column=args.keep_column,
                                        samples_per_shard=args.samples_per_shard, max_shards=args.max_shards,
                                        old_id_col=args.old_id_col, overwrite=args.overwrite)
    say(f"kept {summary['rows_kept']} of {summary['rows_in']} rows ({args.expr}); wrote "
        f"{int(summary['totals'].get('samples_written', 0))} samples in {summary['shards_total']} shards to "
        f"{summary['path']}; {summary['seconds']} s")


def cmd_index(args) -> None:
    from nemo_curator.utils.webdataset import find_shards, write_dali_index

    tars = [s.tar for s in find_shards(args.folder, require_parquet=False)]
    started = time.time()
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        written = list(pool.map(write_dali_index, tars))
    say(f"wrote {len(written)} DALI index files in {args.folder} ({time.time() - started:.1f} s)")


def cmd_index_metadata(args) -> None:
    from nemo_curator.datasets.tar_metadata import write_tar_metadata
    from nemo_curator.utils.webdataset import find_shards

    shards = [s for s in find_shards(args.folder, require_parquet=False) if not os.path.exists(s.parquet)]
    for shard in shards:
        write_tar_metadata(shard.tar, shard.parquet, args.id_col)
    say(f"wrote {len(shards)} parquet files in {args.folder}"
        + ("" if shards else " (every tar already has its parquet)"))


def cmd_report(args) -> None:
    from nemo_curator.report import default_thresholds, make_report

    report = make_report(args.dataset, args.output, curated=args.curated, filter_expr=args.expr,
                         thresholds=default_thresholds(args.aesthetic_threshold, args.nsfw_threshold),
                         id_col=args.id_col, examples=args.examples)
    say(report.text)
    say("\nwritten: " + ", ".join(report.files.values()))


def cmd_demo(args) -> None:
    from nemo_curator.scripts.demo import prepare_demo, run_demo

    if args.smoke:
        say(f"*** {SMOKE_WARNING} ***")
    plan = prepare_demo(args.output, smoke=args.smoke, photos=args.photos, model=args.model,
                        checkpoint=args.checkpoint, head_paths=_head_paths(args), batch_size=args.batch_size,
                        threads=args.threads, precision=args.precision, shards=args.shards,
                        samples_per_shard=args.samples_per_shard, offline=args.offline,
                        thresholds=(args.aesthetic_threshold, args.nsfw_threshold))
    say(f"sample dataset: {plan.dataset}")
    with open_client(args), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = run_demo(plan, show_progress=True)
    say("\n" + report.text)
    say(f"\ncurated shards: {plan.curated}\nreport: {', '.join(report.files.values())}")
    if args.smoke:
        say(f"*** {SMOKE_WARNING} ***")


# ----------------------------------------------------------------------------------------------
def _configure_logging(verbose: bool) -> bool:
    """INFO logs with --verbose; otherwise warnings only, and errors only from Dask and the HF hub client.

    Only when logging is not configured yet (a console run; not inside an application or pytest).
    The level is set on the root handler too, as Dask sets levels on its own loggers when it starts.
    Returns whether it configured logging.
    """
    if logging.getLogger().handlers:
        return False
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    if not verbose:
        for name in ("distributed", "dask", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return True


def one_line(err: BaseException) -> str:
    """The error's message on one line (KeyError's quotes removed); its type name when it has none."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(str(text).split())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 error, 2 usage, 130 interrupted).

    An error prints one line, ``nemo-curator-image COMMAND: error: REASON``, followed by the
    error's ``hint`` lines when it has them (how to supply missing weights).
    """
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        args.func(args)
        return 0
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every error becomes one line (or a traceback with --debug)
        if args.debug:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {one_line(err)}", file=sys.stderr)
        for line in getattr(err, "hint", None) or ():
            print(line, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
