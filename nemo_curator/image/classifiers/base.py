"""ImageClassifier: a head that turns image embeddings into one score per row.

Two ways to run a head, with the same arithmetic (``score_tensor``):
- fused: an embedder calls ``get_model`` / ``score_tensor`` / ``postprocess`` on the embeddings it
  has just computed, on the same device;
- standalone: ``classifier(dataset)`` adds ``pred_column`` lazily, one task per shard, from an
  embedding column already in the metadata (e.g. written earlier by ``save_metadata``).

Scores are float32 (``pred_type``); rows whose embedding is null (the image failed) get NaN.
"""
from __future__ import annotations

import abc
import os
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from nemo_curator.utils.device import worker_device
from nemo_curator.utils.distributed_utils import load_object_on_worker
from nemo_curator.utils.download import WeightsSpec, load_weights
from nemo_curator.utils.frames import is_null, object_columns, to_pandas
from nemo_curator.utils.resume import LineageStep, file_identity

if TYPE_CHECKING:
    from nemo_curator.datasets import ImageTextPairDataset


class ImageClassifier(abc.ABC):
    """Base of the classifier heads.

    Args:
        model_name: name of the head (its weights), part of the cache key and lineage.
        embedding_column: metadata column with one embedding per row: a 1-d float array of
            ``embedding_size`` values, or None/NaN where the image failed.
        pred_column: the column the scores go to.
        pred_type: numpy float dtype of ``pred_column`` (float so that failed rows can hold NaN).
        batch_size: rows per forward pass; ``-1`` scores a whole partition (or fused batch) at once.
        embedding_size: D, the embedding length the head expects.
    """

    def __init__(self, model_name: str, embedding_column: str, pred_column: str, pred_type: Any, batch_size: int,
                 embedding_size: int):
        for arg, value in (("model_name", model_name), ("embedding_column", embedding_column),
                           ("pred_column", pred_column)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{arg} must be a non-empty string, got {value!r}")
        if not _is_int(batch_size) or (batch_size != -1 and batch_size < 1):
            raise ValueError(f"batch_size must be -1 (a whole partition at once) or a positive int, got {batch_size!r}")
        if not _is_int(embedding_size) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        pred_type = np.dtype(pred_type)
        if pred_type.kind != "f":
            raise ValueError(f"pred_type must be a float dtype (failed rows hold NaN), got {pred_type}")
        self.model_name = model_name
        self.embedding_column = embedding_column
        self.pred_column = pred_column
        self.pred_type = pred_type
        self.batch_size = int(batch_size)
        self.embedding_size = int(embedding_size)

    # ------------------------------------------------------------------------------------------
    # Configuration and identity
    def config(self) -> dict[str, Any]:
        """The whole configuration, in order (subclasses extend it); it defines cache key, token and repr."""
        return {"model_name": self.model_name, "embedding_column": self.embedding_column,
                "pred_column": self.pred_column, "pred_type": str(self.pred_type), "batch_size": self.batch_size,
                "embedding_size": self.embedding_size}

    def cache_key(self) -> tuple:
        """Hashable key of the whole configuration: ``(qualified class name, (name, value), ...)``."""
        cls = type(self)
        return (f"{cls.__module__}.{cls.__qualname__}", *self.config().items())

    def __dask_tokenize__(self):
        return self.cache_key()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------------------------------
    # Model
    @abc.abstractmethod
    def load_model(self, device: torch.device | str) -> nn.Module:
        """Build the head with its weights on ``device``: maps (N, embedding_size) to (N,) or (N, 1)."""

    def get_model(self, device: torch.device | str) -> nn.Module:
        """The head on ``device`` in eval mode, loaded once per worker process and configuration."""
        device = torch.device(device)
        return load_object_on_worker((*self.cache_key(), str(device)),
                                     lambda: self.load_model(device).to(device).eval().requires_grad_(False))

    def postprocess(self, series: pd.Series) -> pd.Series:
        """Hook on each partition's scores (NaN for failed rows) before they are stored; identity by default.

        Must return a series of the same length and order; it is cast to ``pred_type``.
        """
        return series

    # ------------------------------------------------------------------------------------------
    # Scoring
    def score_tensor(self, model: nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
        """Score a (N, D) batch: returns (N,) float32 on the model's device.

        Chunks of ``batch_size`` rows; runs in float32 under ``torch.inference_mode`` with autocast
        disabled (the heads are tiny, and bf16 would shift the scores). N = 0 and N = 1 are fine.
        """
        if embeddings.ndim != 2:
            raise ValueError(f"{type(self).__name__} scores a (N, D) batch of embeddings, got shape "
                             f"{tuple(embeddings.shape)}")
        self._check_size({int(embeddings.shape[1])})
        param = next(model.parameters())
        x = embeddings.to(device=param.device, dtype=param.dtype)
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32, device=x.device)
        step = x.shape[0] if self.batch_size == -1 else self.batch_size
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
            scores = [model(chunk).reshape(-1) for chunk in x.split(step)]
        return torch.cat(scores).float()

    def score_frame(self, frame, device: torch.device | str = "cpu"):
        """Standalone per-partition work: ``frame`` with ``pred_column`` (``pred_type``) added.

        Non-null embeddings are stacked and scored; null ones (None/NaN) give NaN. The model is
        loaded only when the partition has at least one embedding. ``frame`` is not modified.
        """
        column = to_pandas(self._embedding_series(frame))
        valid = np.fromiter((not is_null(v) for v in column), dtype=bool, count=len(column))
        scores = np.full(len(column), np.nan, dtype=self.pred_type)
        if valid.any():
            batch = torch.from_numpy(self.stack_embeddings(column[valid]))
            model = self.get_model(device)
            scores[valid] = self.score_tensor(model, batch.to(device)).cpu().numpy()
        series = self.postprocess(pd.Series(scores, index=column.index, name=self.pred_column))
        return frame.assign(**{self.pred_column: np.asarray(series, dtype=self.pred_type)})

    def stack_embeddings(self, values: Iterable) -> np.ndarray:
        """Stack per-row 1-d embeddings (arrays or lists, none null) into a (n, D) float32 array."""
        arrays = [np.asarray(v, dtype=np.float32) for v in values]
        self._check_size({a.shape[0] if a.ndim == 1 else a.shape for a in arrays})
        return np.stack(arrays) if arrays else np.zeros((0, self.embedding_size), np.float32)

    def __call__(self, dataset: "ImageTextPairDataset", device: str | None = None) -> "ImageTextPairDataset":
        """Lazily add ``pred_column`` to ``dataset``'s metadata, one task per shard.

        ``device``: where the head runs on each worker; ``None`` picks CUDA when the worker sees a
        GPU, else the CPU. Nothing is loaded or computed until the metadata is.
        """
        metadata = dataset.metadata
        if self.embedding_column not in metadata.columns:
            raise KeyError(f"{type(self).__name__}: column {self.embedding_column!r} is not in the metadata "
                           f"(columns {list(metadata.columns)}): run an embedder first (or load metadata saved "
                           f"by one), or pass embedding_column= the column that holds the embeddings")
        meta = metadata._meta.assign(**{self.pred_column: np.array([], dtype=self.pred_type)})
        with object_columns():
            scored = metadata.map_partitions(_score_partition, self, device, meta=meta)
        return dataset.with_metadata(scored, lineage_step=LineageStep("classify", repr(self), text=repr(self)))

    # ------------------------------------------------------------------------------------------
    def _embedding_series(self, frame):
        if self.embedding_column not in frame.columns:
            raise KeyError(f"{type(self).__name__}: column {self.embedding_column!r} is not in the partition "
                           f"(columns {list(frame.columns)}): pass embedding_column= the column with the embeddings")
        return frame[self.embedding_column]

    def _check_size(self, sizes: set) -> None:
        """Raise a ValueError naming the column and both sizes unless ``sizes`` is only ``embedding_size``."""
        wrong = sorted((s for s in sizes if s != self.embedding_size), key=str)
        if wrong:
            raise ValueError(
                f"{type(self).__name__} ({self.model_name}) expects embeddings of size {self.embedding_size}, but "
                f"column {self.embedding_column!r} holds embeddings of size {', '.join(map(str, wrong))}: compute "
                f"them with the model this head was trained for (CLIP ViT-L/14 gives {self.embedding_size}), or "
                f"pass embedding_column= the right column")


class PretrainedHeadClassifier(ImageClassifier):
    """A head defined by an ``nn.Module`` class (``module_class``) and its weights (``weights``).

    ``model_path=None`` downloads the weights once into the cache folder (see
    ``nemo_curator.utils.download``); a path uses that file. Either way they are read on the
    worker, when the model is first needed, and checked for keys and shapes.
    """

    weights: WeightsSpec
    module_class: type[nn.Module]
    embedding_size: int

    def __init__(self, model_name: str, embedding_column: str, pred_column: str, batch_size: int,
                 model_path: str | os.PathLike | None = None):
        super().__init__(model_name=model_name, embedding_column=embedding_column, pred_column=pred_column,
                         pred_type=np.float32, batch_size=batch_size, embedding_size=type(self).embedding_size)
        self.model_path = None if model_path is None else os.path.abspath(os.path.expanduser(os.fspath(model_path)))

    def config(self) -> dict[str, Any]:
        """With ``model_path``, also the file's (size, mtime_ns) (``model_file``): a file replaced at the
        same path is another configuration (worker cache, resume). Downloaded weights are verified
        against the sha256 of ``weights``."""
        config = {**super().config(), "model_path": self.model_path}
        if self.model_path is not None:
            identity = file_identity(self.model_path)
            config["model_file"] = None if identity is None else (identity["size"], identity["mtime_ns"])
        return config

    def load_model(self, device: torch.device | str) -> nn.Module:
        model = self.module_class()
        model.load_state_dict(load_weights(self.weights, self.model_path))
        return model.to(device).eval()


def state_dict_shapes(module_class: type[nn.Module]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a module's state_dict, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in module_class().state_dict().items()}


def _score_partition(frame, classifier: ImageClassifier, device: str | None):
    """Dask task: score one partition on the worker (its GPU if it has one and ``device`` is None)."""
    return classifier.score_frame(frame, device=worker_device(device or "auto"))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
