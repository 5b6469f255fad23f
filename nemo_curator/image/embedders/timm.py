"""TimmImageEmbedder: DALI decode + timm eval transform on every worker, a timm model embeds."""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Sequence

from nemo_curator.image.embedders.base import ImageEmbedder
from nemo_curator.image.shard_reader import DaliShardReader, ShardItems
from nemo_curator.image.transforms import TransformSpec
from nemo_curator.image.weights import timm_hub_weights
from nemo_curator.utils.constants import EMBEDDING_COLUMN
from nemo_curator.utils.cpu_tuning import keep_freed_memory_for_reuse
from nemo_curator.utils.device import check_device, check_precision, resolve_bf16, worker_device
from nemo_curator.utils.resume import file_identity
from nemo_curator.utils.webdataset import DEFAULT_IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)


class TimmImageEmbedder(ImageEmbedder):
    """Embed images with a timm model; DALI decodes and preprocesses (GPU "mixed", or CPU).

    Args:
        model_name: timm model name, e.g. ``"vit_large_patch14_clip_quickgelu_224.openai"``.
        pretrained: load timm's pretrained weights (Hugging Face cache; ``HF_HUB_OFFLINE=1`` works).
        batch_size: images per model call (any value ≥ 1).
        num_threads_per_worker: DALI CPU threads per worker; None: the machine's cores divided
            among the Dask workers on it (decided on each worker).
        image_embedding_column: output column of float32 arrays (D values each).
        normalize_embeddings: L2-normalise each embedding (the heads expect it).
        classifiers: ``ImageClassifier`` heads, run on the embeddings on the same device.
        autocast: False runs fp32 everywhere (``precision="fp32"``); True lets ``precision`` decide.
        precision: "auto" (default): bf16 autocast where the hardware computes bf16 natively (every
            GPU; a CPU only with AVX512-BF16 or AMX), decided on each worker; "bf16": always (a
            warning where the CPU emulates it, several times slower than fp32); "fp32": never.
        use_index_files: read ``NNNNN.idx`` beside each tar instead of scanning the tar's headers;
            a missing index file is an error.
        image_extensions: member extensions taken as the image, in order of preference.
        checkpoint_path: a local weights file (timm or original format) instead of the hub.
        model_kwargs: extra ``timm.create_model`` arguments (part of the cache key).
        adjust_orientation: apply EXIF orientation when decoding (timm's PIL path does not).
        device: "auto" (GPU when the worker has one), "cpu" or "cuda".
        compile_model: ``torch.compile`` the model on each worker. Its first batch then takes the
            compile time (~20 s for the tiny test model on 2 CPU cores, minutes for ViT-L/14) and a
            shard's smaller last batch one more compile (the batch dimension then becomes dynamic).
            Same embeddings up to float rounding, so not part of the lineage: a rerun that only
            toggles it resumes. Worth it for long jobs (see docs/benchmarks.md).

    Reading is done by a ``DaliShardReader`` (``self.reader``). On CPU, loading the model also
    tunes glibc's malloc of the worker process for inference (``utils.cpu_tuning``).
    The weights' identity (the checkpoint's size and mtime, the hub revision in the cache) is part
    of the lineage: a rerun with other weights at the same path is redone, and a run with random
    weights (``pretrained=False`` and no checkpoint) never resumes another.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        batch_size: int = 1,
        num_threads_per_worker: int | None = 4,
        image_embedding_column: str = EMBEDDING_COLUMN,
        normalize_embeddings: bool = True,
        classifiers: Sequence[Any] = (),
        autocast: bool = True,
        use_index_files: bool = False,
        image_extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS,
        checkpoint_path: str | None = None,
        model_kwargs: dict | None = None,
        adjust_orientation: bool = True,
        device: str = "auto",
        compile_model: bool = False,
        precision: str | None = None,
    ):
        super().__init__(model_name, image_embedding_column, classifiers)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_threads_per_worker is not None and num_threads_per_worker < 1:
            raise ValueError(f"num_threads_per_worker must be at least 1 (or None), got {num_threads_per_worker}")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if precision is not None:
            check_precision(precision)
            if not autocast and precision != "fp32":
                raise ValueError(f"autocast=False means fp32, but precision={precision!r}: pass one of the two")
        if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"checkpoint_path {checkpoint_path} does not exist")
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.num_threads_per_worker = num_threads_per_worker
        self.normalize_embeddings = normalize_embeddings
        self.precision = precision or ("auto" if autocast else "fp32")
        self.autocast = self.precision != "fp32"
        self.use_index_files = use_index_files
        self.image_extensions = tuple(e.lower().lstrip(".") for e in image_extensions)
        self.checkpoint_path = os.path.abspath(checkpoint_path) if checkpoint_path else None
        self.model_kwargs = dict(model_kwargs or {})
        self.adjust_orientation = adjust_orientation
        self.device = check_device(device)
        self.compile_model = compile_model
        # The transform comes from timm's pretrained config: no model is built on the client.
        overlay = {"input_size": (3, self.model_kwargs["img_size"], self.model_kwargs["img_size"])} \
            if isinstance(self.model_kwargs.get("img_size"), int) else None
        self.transform = TransformSpec.from_timm(model_name, overlay)
        self.reader = DaliShardReader(self.transform, batch_size=batch_size, num_threads=num_threads_per_worker,
                                      device=device, image_extensions=self.image_extensions,
                                      use_index_files=use_index_files, adjust_orientation=adjust_orientation)

    def config(self) -> dict:
        return {
            **super().config(),
            "pretrained": self.pretrained,
            "checkpoint_path": self.checkpoint_path,
            "autocast": self.autocast,
            "precision": self.precision,
            "normalize_embeddings": self.normalize_embeddings,
            "model_kwargs": repr(sorted(self.model_kwargs.items())),
        }

    def runtime_config(self) -> dict:
        return {"compile_model": self.compile_model}

    def weights_identity(self) -> dict | None:
        """The checkpoint's path, size and mtime; or the hub repository and the revision its file
        has in this machine's Hugging Face cache; None for random weights, or pretrained weights
        that are not in the cache here (they are downloaded on the workers, unseen)."""
        if self.checkpoint_path:
            return {"checkpoint": self.checkpoint_path, **(file_identity(self.checkpoint_path) or {})}
        if not self.pretrained:
            return None
        return hub_weights_identity(self.model_name)

    def check_weights_unchanged(self, planned: dict) -> None:
        """The checkpoint must still be the file the job was planned with (same size and mtime)."""
        if "checkpoint" not in planned:
            return
        now = file_identity(planned["checkpoint"])
        if now is None or any(now[k] != planned.get(k) for k in now):
            raise RuntimeError(f"checkpoint {planned['checkpoint']} changed while the job ran (planned size "
                               f"{planned.get('size')} B, mtime_ns {planned.get('mtime_ns')}; now {now}): its "
                               f"results would mix two models. Leave the file alone during a run, then run again")

    def worker_device(self) -> str:
        return worker_device(self.device)

    # -- model -------------------------------------------------------------------------------------
    def uses_bf16(self, device: str) -> bool:
        """Whether the model runs under bf16 autocast on ``device`` (see ``precision``)."""
        return resolve_bf16(self.precision, device)

    def load_embedding_model(self, device: str):
        """Build the timm model on ``device`` in eval mode; return ``batch (N,3,H,W) -> (N,D) float``."""
        import timm
        import torch

        kwargs = dict(self.model_kwargs)
        if self.checkpoint_path:
            kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": self.checkpoint_path}
        try:
            # random weights (no pretrained, no checkpoint) from a fixed seed: every worker of a run
            # builds the same model (still never resumed by another run: they have no identity)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = timm.create_model(self.model_name, pretrained=self.pretrained or bool(self.checkpoint_path),
                                          **kwargs)
        except Exception as err:  # hub unreachable, cache empty, corrupt file
            if not (self.pretrained or self.checkpoint_path):
                raise
            raise RuntimeError(
                f"could not load the weights of {self.model_name!r} "
                f"({'from ' + self.checkpoint_path if self.checkpoint_path else 'from the Hugging Face hub or its cache'}): "
                f"{type(err).__name__}: {err}. Supply them with checkpoint_path=<local file>, or place timm's "
                f"model.safetensors in the Hugging Face cache ($HF_HOME/hub/models--timm--<name>/snapshots/<rev>/) "
                f"and set HF_HUB_OFFLINE=1 on every worker"
            ) from err
        return self.run_model(model, device)

    def run_model(self, model, device: str):
        """A built timm model, ready to embed: moved to ``device`` in eval mode, channels_last on a
        GPU (malloc tuned on a CPU), compiled if asked; returns ``batch (N,3,H,W) -> (N,D)`` under
        the precision policy. The one place a subclass that builds its model otherwise goes through."""
        import torch

        model = model.eval().to(device)
        use_autocast = self.uses_bf16(device)
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        if device_type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        else:
            keep_freed_memory_for_reuse()
        if self.compile_model:
            model = torch.compile(model)

        def embed(batch):
            if device_type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_autocast):
                return model(batch)

        return embed

    def normalize(self, embeddings):
        import torch

        embeddings = embeddings.float()
        return torch.nn.functional.normalize(embeddings, dim=-1) if self.normalize_embeddings else embeddings

    # -- data ----------------------------------------------------------------------------------------
    def iter_shard(self, tar_path: str, wanted_ids, id_col: str, device: str) -> Iterator[ShardItems]:
        """Decode the wanted images of a shard in batches (``self.reader``); undecodable ones are reported."""
        return self.reader.read(tar_path, wanted_ids, device)


def hub_weights_identity(model_name: str) -> dict | None:
    """``{"hub": repo, "revision": commit, "file": name, "size": bytes}`` of timm's pretrained
    weights of ``model_name`` as this machine's Hugging Face cache holds them; None when they are
    not there (or the model has no hub weights)."""
    hub = timm_hub_weights(model_name)
    path = hub.cached_file() if hub else None
    if path is None:
        return None
    snapshot = os.path.basename(os.path.dirname(path))  # .../snapshots/<commit>/<file>
    return {"hub": hub.repo, "revision": snapshot, "file": os.path.basename(path), "size": os.path.getsize(path)}
