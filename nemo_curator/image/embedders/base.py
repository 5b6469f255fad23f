"""ImageEmbedder: the shard-by-shard embedding job shared by every embedder.

A subclass says how to build the model (``load_embedding_model``) and how to read a shard
(``iter_shard``, or the legacy ``load_dataset_shard``); this class runs one Dask task per shard on
the worker, loads the model and the attached classifier heads once per worker, and joins
embeddings and scores to the shard's metadata rows BY ID.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from nemo_curator.image.shard_reader import ShardItems
from nemo_curator.utils.arrow import pandas_like
from nemo_curator.utils.constants import (DECODE_FAILED, EMBEDDING_COLUMN, EXTRA_IN_TAR, MISSING_IMAGE, OK,
                                          STATUS_COLUMN)
from nemo_curator.utils.device import device_turn, worker_device
from nemo_curator.utils.distributed_utils import cached_keys, evict_from_worker_cache, load_object_on_worker
from nemo_curator.utils.frames import to_pandas
from nemo_curator.utils.resume import LineageStep, unidentified_weights
from nemo_curator.utils.stats import EmbedStats

logger = logging.getLogger(__name__)

KEY_FIELD = "__key__"  # webdataset's name for a sample's key, used in metadata dicts
_ASK = object()  # get_model/embed_shard without a planned weights identity: ask weights_identity() now

__all__ = ["EXTRA_IN_TAR", "KEY_FIELD", "ImageEmbedder", "RowResults", "ShardItems"]


class ImageEmbedder(ABC):
    """Adds an embedding column (and one column per attached classifier) to a dataset, lazily.

    Args:
        model_name: name of the embedding model (part of the worker cache key).
        image_embedding_column: column that receives float32 embeddings (one array per row).
        classifiers: ``ImageClassifier`` heads run on the embeddings on the same device.

    A subclass implements ``load_embedding_model(device)`` → callable mapping a batch to (N, D)
    embeddings, and reads shards with ``iter_shard(tar_path, wanted_ids, id_col, device)`` →
    ``ShardItems`` (a ``DaliShardReader`` does it for images), or with the legacy
    ``load_dataset_shard(tar_path)`` → ``(batch, metadata)`` pairs (metadata: one dict per image
    holding its id under the dataset's id column or ``"__key__"``).
    """

    status_column = STATUS_COLUMN

    def __init__(self, model_name: str, image_embedding_column: str = EMBEDDING_COLUMN,
                 classifiers: Sequence[Any] = ()):
        if type(self).iter_shard is ImageEmbedder.iter_shard and \
                type(self).load_dataset_shard is ImageEmbedder.load_dataset_shard:
            raise TypeError(f"{type(self).__name__} must implement iter_shard(tar_path, wanted_ids, id_col, device) "
                            f"(or the legacy load_dataset_shard(tar_path)) to read a shard")
        self.model_name = model_name
        self.image_embedding_column = image_embedding_column
        self.classifiers = list(classifiers)
        pred_columns = [c.pred_column for c in self.classifiers]
        clashes = {image_embedding_column, self.status_column} & set(pred_columns)
        if len(set(pred_columns)) != len(pred_columns) or clashes:
            raise ValueError(f"classifier pred_columns {pred_columns} must be distinct and differ from "
                             f"{image_embedding_column!r} and {self.status_column!r}")
        for clf in self.classifiers:
            if clf.embedding_column != image_embedding_column:
                raise ValueError(f"{type(clf).__name__} reads embedding_column={clf.embedding_column!r} but this embedder "
                                 f"writes {image_embedding_column!r}: make them the same")

    # -- the subclass API ---------------------------------------------------------------------------
    @abstractmethod
    def load_embedding_model(self, device: str) -> Callable[[Any], Any]:
        """Return a callable mapping a batch to an (N, D) tensor of embeddings on ``device``."""

    def iter_shard(self, tar_path: str, wanted_ids: set[str] | None, id_col: str, device: str) -> Iterator[ShardItems]:
        """Yield ``ShardItems`` for one shard: batches on ``device`` with their ids, and ids that
        could not be used with their status. The default wraps the legacy ``load_dataset_shard``."""
        for batch, metadata in self.load_dataset_shard(tar_path):
            ids = [str(m[id_col] if id_col in m else m[KEY_FIELD]) for m in metadata]
            yield ShardItems(batch, ids)

    def load_dataset_shard(self, tar_path: str) -> Iterable[tuple[Any, list[dict]]]:
        """Legacy reader (NeMo Curator 0.x): yield ``(batch, metadata)`` for the images of one tar,
        batch (N, ...) on the model's device, metadata a list of N dicts each holding the sample's id."""
        raise NotImplementedError(f"{type(self).__name__} reads shards with iter_shard")

    # -- hooks ----------------------------------------------------------------------------------
    def config(self) -> dict:
        """Everything that changes the embeddings: the worker cache key and the lineage come from it."""
        return {"class": type(self).__qualname__, "model_name": self.model_name}

    def runtime_config(self) -> dict:
        """Settings that change how the model runs but not its embeddings (e.g. compilation):
        part of the worker cache key, not of the lineage. Empty by default."""
        return {}

    def weights_identity(self) -> dict | None:
        """What identifies the model's weights beyond ``config()`` (a file's size and mtime, a hub
        revision), or None when nothing does (random weights): outputs of such a run are then never
        resumed by another. ``{}`` by default: the configuration says it all (override it when the
        weights come from a file or a hub)."""
        return {}

    def check_weights_unchanged(self, planned: dict) -> None:
        """On the worker, before loading: raise if the weights differ from ``planned`` (the identity
        taken on the client when the job was planned). Nothing to check by default."""

    def normalize(self, embeddings):
        """Post-process (N, D) embeddings before the heads; identity by default."""
        return embeddings

    def worker_device(self) -> str:
        """The device this worker computes on: its GPU when it has one, else the CPU."""
        return worker_device("auto")

    device_turns_on_cpu = False  # see takes_device_turns

    def takes_device_turns(self, device: str) -> bool:
        """Whether a shard decodes and runs the model in its thread's turn on ``device``
        (``utils.device.device_turn``): on a GPU, so that a worker's two threads never put two
        shards' batches on it at once; on the CPU only where ``device_turns_on_cpu`` (the threads
        of a CPU worker otherwise compute side by side, as they always did)."""
        return device.startswith("cuda") or self.device_turns_on_cpu

    # -- the job ----------------------------------------------------------------------------------
    def __call__(self, dataset):
        """Return a new dataset whose metadata gains the embedding, ``image_status`` and score
        columns; lazy (one task per shard)."""
        meta = dataset.metadata._meta.copy()
        meta[self.image_embedding_column] = pd.Series([], dtype=object)
        meta[self.status_column] = pd.Series([], dtype=meta[dataset.id_col].dtype)
        for clf in self.classifiers:
            meta[clf.pred_column] = pd.Series([], dtype=np.float32)
        planned = self.weights_identity()
        identity = planned
        if planned is None:
            identity = unidentified_weights()
            logger.info("%s: weights without an identity (random): outputs of this run will not be resumed by another",
                        type(self).__name__)
        detail = repr(sorted(self.config().items())) + "|" + "|".join(repr(c.cache_key()) for c in self.classifiers)
        step = LineageStep("embed", detail, identity=repr(identity))
        return dataset.map_shards(_ShardTask(self, dataset.id_col, step.key, planned), meta=meta, lineage_step=step,
                                  returns_stats=True, name="embed-shard")

    def get_model(self, device: str, weights=_ASK):
        """The model on ``device``, loaded once per worker process, configuration and weights.

        ``weights``: the identity planned on the client (a job passes it; default: asked now). The
        weights are checked against it (``check_weights_unchanged``) before a load, and a model of
        the same configuration cached under other weights (a file replaced since) is dropped."""
        weights = self.weights_identity() if weights is _ASK else weights
        base = tuple(sorted({**self.config(), **self.runtime_config()}.items())) + (("device", device),)
        key = base + (("weights", repr(weights)),)

        if key not in cached_keys():  # a first load, or other weights than the cached model's
            if isinstance(weights, dict):
                self.check_weights_unchanged(weights)
            evict_from_worker_cache(lambda k: isinstance(k, tuple) and k[:len(base)] == base and k != key)
        return load_object_on_worker(key, lambda: self.load_embedding_model(device))

    def embed_shard(self, frame, tar_path: str, id_col: str, weights=_ASK) -> tuple[Any, dict]:
        """Embed and score one shard; return (frame with new columns, stats: ``EmbedStats`` as a dict).
        ``weights``: the planned weights identity (see ``get_model``).

        Rows are matched to images by id. Rows without an image get status ``missing_image``;
        images that fail to decode ``decode_failed``; both keep their row with a null embedding
        and NaN scores. Samples in the tar without a row are skipped and counted.
        """
        import torch

        started = time.time()
        device = self.worker_device()
        model = self.get_model(device, weights)
        heads = [clf.get_model(device) for clf in self.classifiers]
        pdf = to_pandas(frame)
        ids = pdf[id_col].astype(str).tolist()
        wanted = set(ids)

        results = RowResults(ids, n_scores=len(self.classifiers))
        failed: dict[str, str] = {}
        extra = 0
        first_error = None
        # our reader scans the tar in this call; the decoding and the model then run in this
        # thread's turn on a GPU (utils.device.device_turn), while another thread prepares its shard
        items = iter(self.iter_shard(tar_path, wanted, id_col, device))
        turn = device_turn(device) if self.takes_device_turns(device) else None
        with turn.hold() if turn is not None else contextlib.nullcontext():
            try:
                for item in items:
                    if item.batch is None:
                        if item.status == EXTRA_IN_TAR:
                            extra += len(item.ids)
                        else:
                            failed.update({i: item.status for i in item.ids})
                            first_error = first_error or item.error
                        continue
                    with torch.inference_mode():
                        emb = self.normalize(model(item.batch)).float()
                        if emb.ndim != 2 or emb.shape[0] != len(item.ids):
                            raise RuntimeError(f"{type(self).__name__}: the model returned shape {tuple(emb.shape)} "
                                               f"for a batch of {len(item.ids)} images; expected (N, D)")
                        batch_scores = [clf.score_tensor(head, emb).float().cpu().numpy().reshape(-1)
                                        for clf, head in zip(self.classifiers, heads)]
                    extra += results.add(item.ids, emb.cpu().numpy(), batch_scores)
            finally:  # a reader stopped by an error gives its pipeline back (or drops it) now
                if callable(getattr(items, "close", None)):
                    items.close()

        out, counts = self._output_frame(pdf, id_col, results.finish(), failed)
        seconds = time.time() - started
        turns = turn.log() if turn is not None else {}
        stats = EmbedStats(tar=tar_path, samples_in=len(pdf), embedded=counts["embedded"],
                           decode_failed=counts[DECODE_FAILED], missing_image=counts[MISSING_IMAGE],
                           extra_in_tar=extra, embed_seconds=round(seconds, 3),
                           images_per_second=round(counts["embedded"] / seconds, 2) if seconds > 0 else None,
                           first_error=first_error[:500] if first_error else None,
                           started_at=round(started, 4), device_wait_seconds=_rounded(turns.get("waited_seconds")),
                           device_turn_at=_rounded(turns.get("turn_at")),
                           device_released_at=_rounded(turns.get("released_at")))
        level = logging.WARNING if stats.decode_failed or stats.missing_image or stats.extra_in_tar else logging.INFO
        logger.log(level, "embedded %s: %s", os.path.basename(tar_path),
                   {k: v for k, v in stats.to_dict().items() if k != "first_error"})
        return pandas_like(out, frame), stats.to_dict()

    def _output_frame(self, pdf, id_col: str, results: "RowResults", failed: dict[str, str]):
        """``pdf`` plus the embedding, status and score columns; and the row status counts."""
        n = len(pdf)
        emb_col = np.empty(n, dtype=object)  # row views of results.embeddings: no copy of the values
        for r in np.flatnonzero(results.has):
            emb_col[r] = results.embeddings[r]
        status = np.full(n, MISSING_IMAGE, dtype=object)
        status[results.has] = OK
        if failed:
            for r, i in enumerate(results.row_ids):
                if i in failed and not results.has[r]:
                    status[r] = failed[i]
        out = pdf.copy(deep=False)
        out[self.image_embedding_column] = emb_col
        out[self.status_column] = pd.Series(status, index=pdf.index).astype(pdf[id_col].dtype)
        for clf, col in zip(self.classifiers, results.scores):
            out[clf.pred_column] = clf.postprocess(pd.Series(col, index=pdf.index)).astype(np.float32)
        counts = {"embedded": int(results.has.sum()),
                  DECODE_FAILED: int((status == DECODE_FAILED).sum()),
                  MISSING_IMAGE: int((status == MISSING_IMAGE).sum())}
        return out, counts


class RowResults:
    """A shard's embeddings and scores, placed on their metadata rows as the batches arrive.

    ``embeddings`` is one (n_rows, D) float32 array in row order, allocated at the first batch:
    the values are held once, and ``partition_to_arrow`` hands them to Arrow without a copy.
    Row r holds its id's embedding where ``has[r]``; its scores are in ``scores[k][r]`` (NaN where
    not ``has``). Rows that repeat an id get the embedding of the id's first row (``finish``).
    """

    def __init__(self, row_ids: Sequence[str], n_scores: int):
        self.row_ids = list(row_ids)
        n = len(self.row_ids)
        codes, uniques = pd.factorize(pd.Series(self.row_ids, dtype=object))
        self._codes = codes
        self._unique_ids = pd.Index(uniques)
        self._first_row = np.unique(codes, return_index=True)[1]  # per id (code 0, 1, ...): its first row
        self.embeddings: np.ndarray | None = None
        self.has = np.zeros(n, dtype=bool)
        self.scores = [np.full(n, np.nan, dtype=np.float32) for _ in range(n_scores)]

    def add(self, ids: Sequence[str], embeddings: np.ndarray, scores: Sequence[np.ndarray]) -> int:
        """Place one batch: ``embeddings`` (N, D) float32 and one (N,) array per score for the N
        ``ids``. Ids without a metadata row are dropped; return how many were."""
        codes = self._unique_ids.get_indexer(pd.Index(ids, dtype=object))
        known = codes >= 0
        rows = self._first_row[codes[known]]
        if len(np.unique(rows)) != len(rows) or self.has[rows].any():
            repeated = [i for i, r in zip(np.asarray(ids, dtype=object)[known], rows) if self.has[r]] or _first_dups(list(ids))
            raise RuntimeError(f"the shard reader yielded duplicate ids {repeated[:5]}: an embedder must yield each id once")
        if self.embeddings is None:
            self.embeddings = np.zeros((len(self.row_ids), embeddings.shape[1]), dtype=np.float32)
        elif embeddings.shape[1] != self.embeddings.shape[1]:
            raise RuntimeError(f"the model returned {embeddings.shape[1]}-d embeddings after {self.embeddings.shape[1]}-d "
                               f"ones in the same shard")
        self.embeddings[rows] = embeddings[known]
        self.has[rows] = True
        for column, values in zip(self.scores, scores):
            column[rows] = values[known]
        return int((~known).sum())

    def finish(self) -> "RowResults":
        """Copy each id's results to the rows that repeat it; return self."""
        if self.embeddings is None:
            self.embeddings = np.zeros((len(self.row_ids), 0), dtype=np.float32)
        source = self._first_row[self._codes]
        repeats = np.flatnonzero(source != np.arange(len(source)))
        if len(repeats):
            self.embeddings[repeats] = self.embeddings[source[repeats]]
            self.has[repeats] = self.has[source[repeats]]
            for column in self.scores:
                column[repeats] = column[source[repeats]]
        return self


def _rounded(epoch: float | None) -> float | None:
    return None if epoch is None else round(epoch, 4)


def _first_dups(ids: list[str]) -> list[str]:
    seen, dups = set(), []
    for i in ids:
        if i in seen:
            dups.append(i)
        seen.add(i)
    return dups[:5]


class _ShardTask:
    """The picklable per-shard callable: ``(partition, tar_path) -> (partition, stats dict)``."""

    def __init__(self, embedder: ImageEmbedder, id_col: str, lineage_detail: str, weights: dict | None):
        self.embedder = embedder
        self.id_col = id_col
        self.lineage_detail = lineage_detail  # config, heads and weights: what makes the results
        self.weights = weights  # the weights identity planned on the client

    def __call__(self, frame, tar_path: str):
        return self.embedder.embed_shard(frame, tar_path, self.id_col, self.weights)

    def __dask_tokenize__(self):
        return (type(self.embedder).__qualname__, self.lineage_detail, self.id_col)
