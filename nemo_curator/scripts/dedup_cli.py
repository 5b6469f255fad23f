"""``nemo-curator-image dedup``: semantic (SemDeDup) or exact deduplication of a dataset.

``add_dedup_parser(subparsers, parents)`` registers the subcommand (``parents``: the shared
option parsers, e.g. ``[common, cluster]`` of ``cli.py``; the cluster options are read from
``args`` when present); ``cmd_dedup(args)`` runs it. It prints the rows removed (and, for the
semantic method, at several eps), and writes what is asked: ``--removal-dir`` (the ids to
remove, the layout of ``ImageDuplicatesRemovalStage``), ``--output`` (the kept samples
resharded), ``--save-metadata`` (the dataset's parquets rewritten with the new columns) and
``--report`` (the dedup report section). Errors are raised with their reason; ``cli.main``
prints them on one line.
"""
from __future__ import annotations

import argparse

from nemo_curator.scripts.common import open_client, positive_int, say
from nemo_curator.utils.constants import (DEDUP_KEEP_COLUMN as DEFAULT_KEEP_COLUMN, DEFAULT_ID_COL, EMBEDDING_COLUMN,
                                          HASH_COLUMN as DEFAULT_HASH_COLUMN, SIM_METRICS, WHICH_TO_KEEP)


def _eps(text: str) -> float:
    from nemo_curator.modules.semantic_dedup.matching import check_eps  # the dedup modules load only when used

    try:
        return check_eps(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_dedup_parser(subparsers, parents: list) -> argparse.ArgumentParser:
    """Add the ``dedup`` subcommand to ``subparsers``; returns its parser (``func`` = ``cmd_dedup``)."""
    p = subparsers.add_parser(
        "dedup", parents=parents, help="flag semantic (SemDeDup) or exact duplicates and write the ids to remove",
        description="Semantic: k-means on the embeddings, then within each cluster a row goes when its cosine "
                    "similarity to a row ranked before it is >= 1 - EPS. Exact: identical image bytes (the sha256 "
                    "column, or hashed from the tars). Prints the counts; writes what --removal-dir, --output, "
                    "--save-metadata and --report ask for. See docs/dedup.md.")
    p.add_argument("dataset", help="folder of NNNNN.tar + NNNNN.parquet shards (with embeddings for --method semantic)")
    p.add_argument("--id-col", default=DEFAULT_ID_COL, help=f"the column holding each sample's key. Default: {DEFAULT_ID_COL}")
    p.add_argument("--method", choices=("semantic", "exact"), default="semantic", help="Default: semantic")
    g = p.add_argument_group("semantic")
    g.add_argument("--eps", type=_eps, default=0.01, help="duplicates have similarity >= 1 - EPS. Default: 0.01")
    g.add_argument("--n-clusters", type=positive_int, default=1000, metavar="K", help="k-means clusters. Default: 1000")
    g.add_argument("--which-to-keep", choices=WHICH_TO_KEEP, default="hard",
                   help="hard: keep the row farthest from its centroid; easy: the closest; random. Default: hard")
    g.add_argument("--sim-metric", choices=SIM_METRICS, default="cosine",
                   help="distance to the centroid used to rank rows. Default: cosine")
    g.add_argument("--max-iter", type=positive_int, default=100, metavar="N", help="k-means iterations. Default: 100")
    g.add_argument("--sample-size", type=positive_int, metavar="N",
                   help="rows k-means trains on. Default: max(100000, 100 * K)")
    g.add_argument("--random-state", type=int, default=1234, help="seed. Default: 1234")
    g.add_argument("--embedding-column", default=EMBEDDING_COLUMN, help=f"Default: {EMBEDDING_COLUMN}")
    g = p.add_argument_group("exact")
    g.add_argument("--hash-column", default=DEFAULT_HASH_COLUMN,
                   help=f"hex SHA-256 of the image bytes, computed from the tars where absent. Default: {DEFAULT_HASH_COLUMN}")
    g = p.add_argument_group("outputs")
    g.add_argument("--keep-column", default=DEFAULT_KEEP_COLUMN, help=f"bool column added. Default: {DEFAULT_KEEP_COLUMN}")
    g.add_argument("--removal-dir", metavar="DIR",
                   help="write the ids to remove as DIR/NNNNN.parquet (column id): ImageDuplicatesRemovalStage's input")
    g.add_argument("--output", metavar="DIR", help="reshard the kept samples into DIR (as `filter` does)")
    g.add_argument("--samples-per-shard", type=positive_int, default=10000, metavar="N", help="with --output. Default: 10000")
    g.add_argument("--overwrite", action="store_true", help="with --output: delete shard files already in DIR first")
    g.add_argument("--save-metadata", action="store_true",
                   help="rewrite the dataset's parquets in place with duplicate_of, max_similarity and the keep column")
    g.add_argument("--report", metavar="DIR", help="write the dedup report section (dedup.md, dedup_*.png) to DIR")
    p.set_defaults(func=cmd_dedup)
    return p


def cmd_dedup(args) -> dict:
    """Run ``dedup``; returns what it printed as a dict (``removed``, ``rows``, files written)."""
    from nemo_curator.datasets import ImageTextPairDataset
    from nemo_curator.modules.semantic_dedup import (ExactDeduplicator, SemanticDeduplicator, dedup_report,
                                                     write_removal_parquets)

    if args.method == "semantic":
        step = SemanticDeduplicator(eps=args.eps, n_clusters=args.n_clusters, which_to_keep=args.which_to_keep,
                                    sim_metric=args.sim_metric, embedding_column=args.embedding_column,
                                    keep_column=args.keep_column, max_iter=args.max_iter,
                                    random_state=args.random_state, kmeans_sample_size=args.sample_size)
    else:
        step = ExactDeduplicator(hash_column=args.hash_column, keep_column=args.keep_column)
    dataset = ImageTextPairDataset.from_webdataset(args.dataset, id_col=args.id_col)
    result: dict = {}
    with open_client(args):
        dataset = step(dataset)
        summary = dict(step.summary)
        rows = summary.get("rows", summary.get("hashed"))
        say(f"{args.method} dedup: {summary['removed']} rows to remove in {args.dataset} "
              + (f"(eps={args.eps}, {args.n_clusters} clusters, {summary['null_embeddings']} null embeddings kept)"
                 if args.method == "semantic" else f"({rows} images hashed)"))
        report = dedup_report(dataset, keep_column=args.keep_column, pairs=8 if args.report else 0)
        if len(report.eps_table):
            say(report.eps_table.to_string(index=False))
        if args.report:
            result["report"] = report.write(args.report)
            say(f"report: {', '.join(result['report'].values())}")
        if args.removal_dir:
            result["removal"] = write_removal_parquets(dataset, args.removal_dir, keep_column=args.keep_column)
            say(f"ids to remove: {result['removal']['path']} ({result['removal']['removed']} ids)")
        if args.output:
            result["output"] = dataset.to_webdataset(args.output, filter_column=args.keep_column,
                                                     samples_per_shard=args.samples_per_shard, overwrite=args.overwrite)
            say(f"kept samples resharded into {args.output}")
        if args.save_metadata:
            dataset.save_metadata()
            say(f"parquets of {args.dataset} rewritten with duplicate_of and {args.keep_column}")
    result.update(summary)
    return result
