"""``BaseFilterStage``: score the embeddings of a batch with a head and keep the images that pass."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from nemo_curator.image.model_dir import ensure_model_dir
from nemo_curator.stages.base import NodeInfo, ProcessingStage, WorkerMetadata
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import ImageBatch, ImageObject
from nemo_curator.utils.device import worker_device

logger = logging.getLogger(__name__)


@dataclass
class BaseFilterStage(ProcessingStage[ImageBatch, ImageBatch]):
    """Score each image's embedding and keep those that pass ``keep(score)``.

    Args:
        model_dir: the weights folder (see ``nemo_curator.image.model_dir``); None:
            ``$NEMO_CURATOR_HOME/models``.
        num_gpus_per_worker: GPU share of one task.
        model_inference_batch_size: embeddings per forward pass of the head.
        score_threshold: the cut (see the subclass for which side is kept).
        verbose: log each filtered image and each batch's counts.

    Images without an embedding (they failed to decode, or no embedding stage ran before) cannot
    be scored: they are dropped and counted (``unscored`` in the stage's timings).
    """

    model_dir: str | None = None
    num_gpus_per_worker: float = 0.25
    model_inference_batch_size: int = 32
    score_threshold: float = 0.5
    verbose: bool = False
    name: str = "image_filter"

    score_attribute: ClassVar[str] = ""  # the ImageObject attribute the score goes to
    model_name: ClassVar[str] = ""  # the model_dir entry ("aesthetic", "nsfw")
    fingerprint_excludes = ("name", "verbose", "num_gpus_per_worker", "model_inference_batch_size", "model_dir")

    def __post_init__(self) -> None:
        if isinstance(self.num_gpus_per_worker, bool) or not isinstance(self.num_gpus_per_worker, (int, float)) \
                or self.num_gpus_per_worker < 0:
            raise ValueError(f"num_gpus_per_worker must be a number >= 0, got {self.num_gpus_per_worker!r}")
        if isinstance(self.model_inference_batch_size, bool) or not isinstance(self.model_inference_batch_size, int) \
                or self.model_inference_batch_size < 1:
            raise ValueError(f"model_inference_batch_size must be a positive integer, got "
                             f"{self.model_inference_batch_size!r}")
        if isinstance(self.score_threshold, bool) or not isinstance(self.score_threshold, (int, float)):
            raise ValueError(f"score_threshold must be a number, got {self.score_threshold!r}")
        self.resources = Resources(gpus=self.num_gpus_per_worker)
        self._classifier = None

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], ["embedding"]

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], [self.score_attribute]

    # -- to implement -----------------------------------------------------------------------------
    def classifier(self):
        """The ``ImageClassifier`` head over ``model_dir``'s weights."""
        raise NotImplementedError

    def keep(self, score: float) -> bool:
        """Whether an image with this score stays."""
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------------
    def setup_on_node(self, node_info: NodeInfo | None = None, worker_metadata: WorkerMetadata | None = None) -> None:
        ensure_model_dir(self.model_dir, (self.model_name,))

    def setup(self, worker_metadata: WorkerMetadata | None = None) -> None:
        self._classifier = self.classifier()
        self._classifier.get_model(worker_device("auto"))  # loaded once per worker (cached by config)

    def weights_identity(self) -> dict | None:
        return {"head": self.classifier().cache_key()}

    # -- work -------------------------------------------------------------------------------------
    def score(self, objects: list[ImageObject]) -> None:
        """Set ``score_attribute`` of the objects that have an embedding."""
        import torch

        if self._classifier is None:
            self.setup()
        clf = self._classifier
        device = worker_device("auto")
        head = clf.get_model(device)
        todo = [o for o in objects if o.embedding is not None]
        for start in range(0, len(todo), self.model_inference_batch_size):
            chunk = todo[start:start + self.model_inference_batch_size]
            emb = torch.from_numpy(clf.stack_embeddings([o.embedding for o in chunk])).to(device)
            scores = clf.score_tensor(head, emb).cpu().numpy()
            for obj, value in zip(chunk, scores):
                setattr(obj, self.score_attribute, float(value))

    def process(self, task: ImageBatch) -> ImageBatch:
        self.score(task.data)
        kept, dropped, unscored = [], 0, 0
        for obj in task.data:
            value = getattr(obj, self.score_attribute)
            if value is None or np.isnan(value):
                unscored += 1
            elif self.keep(value):
                kept.append(obj)
                continue
            else:
                dropped += 1
                if self.verbose:
                    logger.info("%s: %s (%s) has %s %.3f: filtered out", self.name, obj.image_id, obj.image_path,
                                self.score_attribute, value)
        self._log_metrics({"kept": len(kept), "filtered": dropped, "unscored": unscored})
        if self.verbose:
            logger.info("%s: %d/%d images passed, %d filtered out, %d without an embedding", self.name, len(kept),
                        len(task.data), dropped, unscored)
        return ImageBatch(dataset_name=task.dataset_name, data=kept, _metadata=dict(task._metadata),
                          _stage_perf=list(task._stage_perf), task_id=task.task_id)


__all__ = ["BaseFilterStage"]
