"""``ImageEmbeddingStage``: CLIP ViT-L/14 image embeddings of the decoded images (1.x API).

The model is ``TimmImageEmbedder``'s (timm's ``vit_large_patch14_clip_quickgelu_224`` with the
OpenAI weights, read from ``model_dir``), and so is the preprocessing: the same DALI operators
(``nemo_curator.image.transforms.dali_preprocess``: torchvision's resize geometry, bicubic,
centre crop, CLIP normalisation) run on the decoded pictures, on the worker's GPU or CPU, and the
embeddings are L2-normalised. So the stage and the legacy ``TimmImageEmbedder`` give the same
embeddings for the same images (the tests check it), and the heads of either path see the same
inputs.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from nemo_curator.image.embedders.timm import TimmImageEmbedder
from nemo_curator.image.model_dir import ClipWeights, ensure_model_dir, resolve_model_dir
from nemo_curator.image.shard_reader import to_torch
from nemo_curator.image.transforms import TransformSpec, dali_preprocess
from nemo_curator.stages.base import NodeInfo, ProcessingStage, WorkerMetadata
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import ImageBatch
from nemo_curator.utils.constants import DEFAULT_MODEL, OK
from nemo_curator.utils.device import check_precision
from nemo_curator.utils.distributed_utils import cpu_threads_per_worker

logger = logging.getLogger(__name__)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_gpus(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"num_gpus_per_worker must be a number >= 0 (a fraction shares a GPU), got {value!r}")


@dataclass
class ImageEmbeddingStage(ProcessingStage[ImageBatch, ImageBatch]):
    """Set ``ImageObject.embedding`` (768 float32, L2-normalised) for every decoded image.

    Args:
        model_dir: the folder of the weights (``openai/clip-vit-large-patch14``, 1.x's layout, or
            timm's; see ``nemo_curator.image.model_dir``); None: ``$NEMO_CURATOR_HOME/models``.
            Missing weights are taken from the local caches or downloaded, once, when the
            pipeline starts.
        num_gpus_per_worker: GPU share of one task (a Dask ``GPU`` resource where workers
            declare one; ignored, with one log line, on a cluster without GPUs).
        model_inference_batch_size: images per forward pass.
        verbose: log each batch.
        remove_image_data: drop ``image_data`` once embedded (less memory for later stages).
        precision: "auto" (bf16 autocast where the hardware computes bf16 natively, as
            ``TimmImageEmbedder``), "bf16" or "fp32" (1.x's choice, slower).

    Images without pixels (``status`` not "ok") keep ``embedding=None``.
    """

    model_dir: str | None = None
    num_gpus_per_worker: float = 0.25
    model_inference_batch_size: int = 32
    verbose: bool = False
    remove_image_data: bool = False
    name: str = "image_embedding"
    precision: str = "auto"

    fingerprint_excludes = ("name", "verbose", "num_gpus_per_worker", "model_inference_batch_size",
                            "remove_image_data", "model_dir")

    def __post_init__(self) -> None:
        _check_gpus(self.num_gpus_per_worker)
        _check_positive_int("model_inference_batch_size", self.model_inference_batch_size)
        check_precision(self.precision)
        self.resources = Resources(gpus=self.num_gpus_per_worker)
        self._embedder: _ClipEmbedder | None = None

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], ["image_data"]

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], ["embedding"]

    # -- lifecycle --------------------------------------------------------------------------------
    def setup_on_node(self, node_info: NodeInfo | None = None, worker_metadata: WorkerMetadata | None = None) -> None:
        """Make sure ``model_dir`` holds the CLIP weights (from the caches or a download)."""
        ensure_model_dir(self.model_dir, ("clip",))

    def setup(self, worker_metadata: WorkerMetadata | None = None) -> None:
        self._embedder = self.embedder()
        self._embedder.get_model(self._embedder.worker_device())  # loaded once per worker (cached by config)
        if self.verbose:
            logger.info("CLIP model ready for %s (%s)", self.name, self._embedder.clip.weights)

    def embedder(self) -> "_ClipEmbedder":
        """The ``TimmImageEmbedder`` this stage computes with (model, precision and transform)."""
        clip = ensure_model_dir(self.model_dir, ("clip",))["clip"]
        return _ClipEmbedder(clip, batch_size=self.model_inference_batch_size, precision=self.precision)

    def weights_identity(self) -> dict | None:
        return {"model_dir": str(resolve_model_dir(self.model_dir)), **self.embedder().weights_identity()}

    # -- work -------------------------------------------------------------------------------------
    def process(self, task: ImageBatch) -> ImageBatch:
        import torch

        if self._embedder is None:
            self.setup()
        embedder = self._embedder
        device = embedder.worker_device()
        model = embedder.get_model(device)
        todo = [o for o in task.data if o.status == OK and o.image_data is not None]
        lost = sum(1 for o in task.data if o.status == OK and o.image_data is None and o.embedding is None)
        if lost:
            logger.warning("%s: %d images have no image_data (a stage before removed it): not embedded", self.name, lost)
        step = self.model_inference_batch_size
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            batch = preprocess([o.image_data for o in chunk], embedder.transform, device, step)
            with torch.inference_mode():
                emb = embedder.normalize(model(batch)).float().cpu().numpy()
            if emb.shape != (len(chunk), emb.shape[1]):
                raise RuntimeError(f"{self.name}: the model returned shape {emb.shape} for {len(chunk)} images")
            for obj, row in zip(chunk, emb):
                obj.embedding = np.array(row, dtype=np.float32)
                if self.remove_image_data:
                    obj.image_data = None
            if self.verbose:
                logger.info("%s: embedded %d images", self.name, len(chunk))
        self._log_metrics({"embedded": len(todo), "not_embedded": len(task.data) - len(todo)})
        return task


class _ClipEmbedder(TimmImageEmbedder):
    """``TimmImageEmbedder`` over the CLIP weights of a ``model_dir`` (transformers layout mapped
    onto timm's ViT, or timm's own); the model is built on the meta device and takes the weights
    without a copy (no random initialisation of 300M parameters)."""

    def __init__(self, clip: ClipWeights, batch_size: int, precision: str = "auto"):
        super().__init__(DEFAULT_MODEL, pretrained=False, batch_size=batch_size, num_threads_per_worker=None,
                         normalize_embeddings=True, model_kwargs=clip.timm_model_kwargs(), precision=precision)
        self.clip = clip

    def config(self) -> dict:
        return {**super().config(), "weights_file": str(self.clip.weights), "layout": self.clip.layout}

    def weights_identity(self) -> dict | None:
        return self.clip.identity()

    def check_weights_unchanged(self, planned: dict) -> None:
        """The weights files must still be those the run was planned with (same sizes and mtimes)."""
        now = self.clip.identity()
        if now != planned:
            raise RuntimeError(f"the CLIP weights {self.clip.weights} changed while the pipeline ran (planned "
                               f"{planned}, now {now}): its results would mix two models. Leave model_dir alone "
                               f"during a run, then run again")

    def load_embedding_model(self, device: str):
        import timm
        import torch

        state = self.clip.timm_state_dict()
        with torch.device("meta"):
            model = timm.create_model(self.model_name, pretrained=False, **self.model_kwargs)
        model.load_state_dict(state, strict=True, assign=True)
        del state
        return self.run_model(model, device)  # device, precision, memory layout: as TimmImageEmbedder


# ----------------------------------------------------------------------------------------------
# DALI preprocessing of decoded pictures (the operators of the legacy path, fed from memory)
_PIPELINES = threading.local()  # per thread: {(spec, device, max batch): DALI pipeline}; not thread-safe objects


def preprocess(images: list[Any], spec: TransformSpec, device: str, max_batch: int):
    """(H, W, 3) uint8 pictures (numpy, or torch on ``device``) -> (N, 3, S, S) float32 on
    ``device``: ``dali_preprocess`` in a DALI pipeline fed from memory (one per thread, reused)."""
    import torch

    on_gpu = device.startswith("cuda")
    if on_gpu:
        data = [img if isinstance(img, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(img)) for img in images]
        data = [t.to(device).contiguous() for t in data]
    else:
        data = [np.ascontiguousarray(img.cpu().numpy() if isinstance(img, torch.Tensor) else img) for img in images]
    pipe = _pipeline(spec, device, max(max_batch, len(data)))
    stream = torch.cuda.current_stream(torch.device(device)).cuda_stream if on_gpu else None
    pipe.feed_input("images", data, layout="HWC", cuda_stream=stream) if on_gpu else \
        pipe.feed_input("images", data, layout="HWC")
    (out,) = pipe.run()
    return to_torch(out, len(data), device, uniform=True)


def _pipeline(spec: TransformSpec, device: str, max_batch: int):
    cache = _PIPELINES.__dict__.setdefault("pipes", {})
    key = (spec, device, max_batch)
    if key not in cache:
        from nvidia.dali import fn, pipeline_def, types

        on_gpu = device.startswith("cuda")
        device_id = None
        if on_gpu:
            import torch

            index = torch.device(device).index
            device_id = index if index is not None else torch.cuda.current_device()

        @pipeline_def(batch_size=max_batch, num_threads=cpu_threads_per_worker(), device_id=device_id,
                      exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        def pipeline():
            images = fn.external_source(name="images", device="gpu" if on_gpu else "cpu", dtype=types.UINT8,
                                        layout="HWC")
            return dali_preprocess(images, spec)

        pipe = pipeline()
        pipe.build()
        cache[key] = pipe
    return cache[key]
