"""The demo: the whole job on a small sample (``nemo-curator-image demo --output DIR [--smoke]``).

``prepare_demo`` runs on the client before any cluster starts: it checks the weights (or writes
random ones with ``smoke=True``), clears the output folder and writes a sample dataset.
``run_demo`` then needs a running Dask client: embed + score, save, filter, reshard, report.

Output folder::

    DIR/dataset/   sample shards NNNNN.{tar,idx,parquet,stats.json}, scored in place
    DIR/curated/   the kept samples, resharded (to_webdataset)
    DIR/report/    report.md, report.json, report.png (score histograms), examples.png
    DIR/smoke_heads/   random head weights (smoke mode only)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from nemo_curator.utils.constants import (DEFAULT_ID_COL, DEFAULT_MODEL, HEAD_NAMES, KEEP_COLUMN, TINY_MODEL_KWARGS,
                                          SMOKE_WARNING)
from nemo_curator.utils.sample_data import shared_photos_dir

logger = logging.getLogger(__name__)

MARKER_NAME = ".nemo-curator-demo"  # marks a folder the demo may clear and rebuild
ID_COL = DEFAULT_ID_COL
# (aesthetic, nsfw) cuts: keep aesthetic_score above the first, nsfw_score below the second. 5, the
# loosest common aesthetic cut (others: 6, 6.5), so that a small sample of mostly generated pictures
# keeps something to reshard.
DEMO_THRESHOLDS = (5.0, 0.5)
# Smoke thresholds: random heads give arbitrary values, so the cuts are these quantiles of the scores.
SMOKE_QUANTILES = {"aesthetic_score": 0.4, "nsfw_score": 0.8}


def build_embedder(model: str = DEFAULT_MODEL, pretrained: bool = True, checkpoint: str | None = None,
                   model_kwargs: dict | None = None, batch_size: int = 32, threads: int | None = None,
                   heads: Sequence = (), use_index_files: bool = False, precision: str = "auto"):
    """The command line's ``TimmImageEmbedder`` (L2-normalised embeddings) with ``heads`` attached."""
    from nemo_curator.image.embedders import TimmImageEmbedder

    return TimmImageEmbedder(model, pretrained=pretrained, batch_size=batch_size, num_threads_per_worker=threads,
                             normalize_embeddings=True, classifiers=list(heads), precision=precision,
                             use_index_files=use_index_files, checkpoint_path=checkpoint,
                             model_kwargs=dict(model_kwargs or {}))


@dataclass
class DemoPlan:
    """What ``run_demo`` runs: folders, the embedder settings and whether it is a smoke run."""

    output: Path
    smoke: bool
    embedder_kwargs: dict
    head_paths: dict = field(default_factory=dict)
    thresholds: tuple[float, float] = DEMO_THRESHOLDS
    samples_per_output_shard: int = 16

    @property
    def dataset(self) -> Path:
        return self.output / "dataset"

    @property
    def curated(self) -> Path:
        return self.output / "curated"

    @property
    def report(self) -> Path:
        return self.output / "report"


def prepare_demo(output: str | os.PathLike, smoke: bool = False, photos: str | os.PathLike | None = None,
                 model: str = DEFAULT_MODEL, checkpoint: str | None = None, head_paths: dict | None = None,
                 batch_size: int = 32, threads: int | None = None, precision: str = "auto", shards: int = 3,
                 samples_per_shard: int = 16, offline: bool = False, seed: int = 0,
                 thresholds: tuple[float, float] = DEMO_THRESHOLDS) -> DemoPlan:
    """Check (or fake) the weights, clear ``output`` and write the sample dataset; no cluster needed.

    ``thresholds``: (aesthetic, nsfw) cuts of the filter; smoke runs use score quantiles instead.
    ``photos``: a folder of ``*.jpg`` used first (default: ``shared_photos_dir()``), then generated
    pictures; one shard also gets an undecodable image and a row without an image, so that the
    report shows both failure kinds. Raises WeightsUnavailableError (nothing written) when the
    real weights cannot be had, FileExistsError for a folder the demo did not write.
    """
    # torch comes with the heads: imported when a demo runs, not when the command line starts
    from nemo_curator.image.classifiers import write_random_heads
    from nemo_curator.image.weights import check_weights

    output = Path(output).resolve()
    head_paths = dict(head_paths or {})
    if not smoke:
        check_weights(model, pretrained=True, checkpoint=checkpoint, heads=HEAD_NAMES, head_paths=head_paths,
                      offline=offline)
    clear_output(output)
    plan = DemoPlan(output=output, smoke=smoke, thresholds=tuple(thresholds), samples_per_output_shard=samples_per_shard,
                    head_paths=write_random_heads(output / "smoke_heads", seed=seed) if smoke else head_paths,
                    embedder_kwargs=dict(model=model, pretrained=not smoke, checkpoint=None if smoke else checkpoint,
                                         model_kwargs=TINY_MODEL_KWARGS if smoke else None, batch_size=batch_size,
                                         threads=threads, precision=precision, use_index_files=True))
    photo_dir = Path(photos) if photos else shared_photos_dir()
    photo_files = sorted(str(p) for p in photo_dir.glob("*.jpg")) if photo_dir else []
    build_demo_dataset(plan.dataset, photo_files, shards, samples_per_shard, seed)
    return plan


def clear_output(output: Path) -> None:
    """Empty ``output`` for a fresh run (create it if absent); refuse a folder the demo did not write."""
    if output.exists():
        if not output.is_dir():
            raise NotADirectoryError(f"--output {output} is a file: pass a folder")
        if any(output.iterdir()) and not (output / MARKER_NAME).is_file():
            raise FileExistsError(f"--output {output} holds files the demo did not write; pass an empty or new "
                                  "folder (the demo deletes and rebuilds its own output folders only)")
        shutil.rmtree(output)
    output.mkdir(parents=True)
    (output / MARKER_NAME).write_text("written by `nemo-curator-image demo`; rerunning the demo clears this folder\n")


def build_demo_dataset(folder: Path, photos: list[str], shards: int, samples_per_shard: int, seed: int = 0) -> None:
    """``shards`` shards of ``samples_per_shard`` samples (photos first), with DALI index files.

    The last shard also holds one sample whose ``.jpg`` is not an image (``decode_failed``) and
    one parquet row whose sample is absent from the tar (``missing_image``).
    """
    from nemo_curator.utils.sample_data import Sample, make_samples, write_shard
    from nemo_curator.utils.webdataset import shard_name

    rng = np.random.default_rng(seed)
    for s in range(shards):
        chunk, photos = photos[:samples_per_shard], photos[samples_per_shard:]
        samples = make_samples(samples_per_shard, s * 10_000, rng, photos=chunk)
        extra_rows = []
        if s == shards - 1:
            bad, lost = f"{s * 10_000 + samples_per_shard:09d}", f"{s * 10_000 + samples_per_shard + 1:09d}"
            samples.append(Sample(bad, {"jpg": b"these bytes are not a JPEG", "txt": b"a broken image",
                                        "json": json.dumps({"key": bad}).encode()},
                                  {"caption": "a broken image", "url": f"https://example.com/{bad}.jpg"}))
            extra_rows.append({"key": lost, "caption": "an image that was never downloaded",
                               "url": f"https://example.com/{lost}.jpg"})
        write_shard(folder, shard_name(s, 5), samples, write_index=True, extra_rows=extra_rows)


def run_demo(plan: DemoPlan, show_progress: bool = True):
    """Embed + score, save, filter, reshard and report, on the current Dask client; return the Report.

    In smoke mode the report's title says that the scores mean nothing.
    """
    from nemo_curator.datasets import ImageTextPairDataset
    from nemo_curator.filtering import add_filter_column
    from nemo_curator.report import default_thresholds, make_report, quantile_thresholds, thresholds_expression

    say = print if show_progress else logger.info
    dataset = ImageTextPairDataset.from_webdataset(plan.dataset, id_col=ID_COL)
    from nemo_curator.image.classifiers import build_heads

    embedder = build_embedder(heads=build_heads(HEAD_NAMES, plan.head_paths), **plan.embedder_kwargs)
    say(f"embedding {len(dataset.tar_files)} shards of {plan.dataset} with {embedder.model_name}"
        f"{' (tiny, random)' if plan.smoke else ''} + aesthetic and NSFW heads")
    dataset = embedder(dataset)
    dataset.save_metadata(show_progress=show_progress)  # from now on the dataset reads the saved parquets
    thresholds = quantile_thresholds(dataset, SMOKE_QUANTILES) if plan.smoke else default_thresholds(*plan.thresholds)
    expr = thresholds_expression(thresholds)
    say(f"filter: {expr}" + (" (smoke: quantiles of the random scores, not real cuts)" if plan.smoke else ""))
    dataset = add_filter_column(dataset, expr, KEEP_COLUMN)
    dataset.to_webdataset(str(plan.curated), filter_column=KEEP_COLUMN, samples_per_shard=plan.samples_per_output_shard,
                          overwrite=True, show_progress=show_progress)
    title = SMOKE_WARNING if plan.smoke else None
    return make_report(plan.dataset, plan.report, curated=plan.curated, filter_expr=expr, thresholds=thresholds,
                       id_col=ID_COL, title=title)
