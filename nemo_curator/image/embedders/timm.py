"""TimmImageEmbedder: DALI decode + timm eval transform on every worker, a timm model embeds."""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Iterator, Sequence

from nemo_curator.image import status as image_status
from nemo_curator.image.embedders.base import EXTRA_IN_TAR, KEY_FIELD, ImageEmbedder, ShardItems
from nemo_curator.image.transforms import TransformSpec, dali_preprocess
from nemo_curator.utils.webdataset import (
    DEFAULT_IMAGE_EXTENSIONS, INDEX_SUFFIX, TAR_SUFFIX, TarMember, iter_tar_samples, read_dali_index, split_member_name,
)

logger = logging.getLogger(__name__)

_DALI_EXT = "img"  # every image member is listed under this extension in the index we give DALI
_PREFETCH_DEPTH = 2  # DALI iterations in flight ahead of the batch being read (DALI's default)


def cpu_has_fast_bf16() -> bool:
    """Whether this machine's CPU computes bf16 in hardware (AVX512-BF16 or AMX).

    Without it, bf16 autocast on the CPU is emulated and much slower than fp32: ViT-L/14 on 2 AVX2
    cores ran at 0.13 img/s with autocast against 0.99 img/s in fp32.
    """
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume the common case, no bf16 hardware
        return False


class TimmImageEmbedder(ImageEmbedder):
    """Embed images with a timm model; DALI decodes and preprocesses (GPU "mixed", or CPU).

    Args:
        model_name: timm model name, e.g. ``"vit_large_patch14_clip_quickgelu_224.openai"``.
        pretrained: load timm's pretrained weights (Hugging Face cache; ``HF_HUB_OFFLINE=1`` works).
        batch_size: images per model call (any value ≥ 1).
        num_threads_per_worker: DALI CPU threads per worker.
        image_embedding_column: output column of float32 arrays (D values each).
        normalize_embeddings: L2-normalise each embedding (the heads expect it).
        classifiers: ``ImageClassifier`` heads, run on the embeddings on the same device.
        autocast: bf16 autocast where the hardware computes bf16 natively: always on a GPU, on a CPU
            only with AVX512-BF16 or AMX (decided on each worker; emulated bf16 is several times
            slower than fp32). False: fp32 everywhere.
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

    On CPU, loading the model also tunes glibc's malloc of the worker process for inference (see
    ``keep_freed_memory_for_reuse``), and ``autocast=False`` is much faster on CPUs without native
    bf16 (no AVX512-BF16/AMX; see docs/benchmarks.md).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        batch_size: int = 1,
        num_threads_per_worker: int = 4,
        image_embedding_column: str = "image_embedding",
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
    ):
        super().__init__(model_name, image_embedding_column, classifiers)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_threads_per_worker < 1:
            raise ValueError(f"num_threads_per_worker must be at least 1, got {num_threads_per_worker}")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"checkpoint_path {checkpoint_path} does not exist")
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.num_threads_per_worker = num_threads_per_worker
        self.normalize_embeddings = normalize_embeddings
        self.autocast = autocast
        self.use_index_files = use_index_files
        self.image_extensions = tuple(e.lower().lstrip(".") for e in image_extensions)
        self.checkpoint_path = os.path.abspath(checkpoint_path) if checkpoint_path else None
        self.model_kwargs = dict(model_kwargs or {})
        self.adjust_orientation = adjust_orientation
        self.device = device
        self.compile_model = compile_model
        # The transform comes from timm's pretrained config: no model is built on the client.
        overlay = {"input_size": (3, self.model_kwargs["img_size"], self.model_kwargs["img_size"])} \
            if isinstance(self.model_kwargs.get("img_size"), int) else None
        self.transform = TransformSpec.from_timm(model_name, overlay)

    def config(self) -> dict:
        return {
            **super().config(),
            "pretrained": self.pretrained,
            "checkpoint_path": self.checkpoint_path,
            "autocast": self.autocast,
            "normalize_embeddings": self.normalize_embeddings,
            "model_kwargs": repr(sorted(self.model_kwargs.items())),
        }

    def runtime_config(self) -> dict:
        return {"compile_model": self.compile_model}

    def worker_device(self) -> str:
        return super().worker_device() if self.device == "auto" else self.device

    # -- model -------------------------------------------------------------------------------------
    def uses_bf16(self, device: str) -> bool:
        """Whether the model runs under bf16 autocast on ``device`` (see ``autocast``)."""
        if not self.autocast:
            return False
        return device.startswith("cuda") or cpu_has_fast_bf16()

    def load_embedding_model(self, device: str):
        """Build the timm model on ``device`` in eval mode; return ``batch (N,3,H,W) -> (N,D) float``."""
        import timm
        import torch

        kwargs = dict(self.model_kwargs)
        if self.checkpoint_path:
            kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": self.checkpoint_path}
        try:
            model = timm.create_model(self.model_name, pretrained=self.pretrained or bool(self.checkpoint_path), **kwargs)
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
    def load_dataset_shard(self, tar_path: str):
        """Yield ``(batch, metadata)`` for every image of ``tar_path`` (metadata: ``{"__key__": id}``).

        Images that fail to decode are skipped here; ``embed_shard`` reports them per row.
        """
        for item in self.iter_shard(tar_path, None, KEY_FIELD, self.worker_device()):
            if item.batch is not None:
                yield item.batch, [{KEY_FIELD: i} for i in item.ids]

    def image_members(self, tar_path: str) -> list[tuple[str, TarMember | None]]:
        """(key, image member or None) for each sample of the tar, in tar order."""
        if self.use_index_files:
            idx = tar_path[: -len(TAR_SUFFIX)] + INDEX_SUFFIX
            if not os.path.isfile(idx):
                raise FileNotFoundError(f"use_index_files=True but {idx} does not exist: write it with "
                                        f"`nemo-curator-image index {os.path.dirname(tar_path) or '.'}` or pass use_index_files=False")
            samples = read_dali_index(idx)
        else:
            samples = iter_tar_samples(tar_path)
        rank = {ext: r for r, ext in enumerate(self.image_extensions)}
        result = []
        for key, members in samples:
            images = sorted((m for m in members if m.ext in rank), key=lambda m: rank[m.ext])
            result.append((key, images[0] if images else None))
        return result

    def iter_shard(self, tar_path: str, wanted_ids, id_col: str, device: str) -> Iterator[ShardItems]:
        """Decode the wanted images of a shard in batches; isolate and report undecodable ones."""
        members = self.image_members(tar_path)
        selected, extra, seen = [], [], set()
        for key, member in members:
            if (wanted_ids is not None and key not in wanted_ids) or key in seen:
                extra.append(key)
            elif member is not None:
                selected.append((key, member))
                seen.add(key)
        if extra:
            yield ShardItems(None, extra, EXTRA_IN_TAR)
        if not selected:
            return
        with tempfile.TemporaryDirectory(prefix="nemo-curator-dali-") as tmp:
            yield from _DaliShardReader(self, tar_path, tmp, device).read(selected, self.batch_size)


class _DaliShardReader:
    """Runs DALI over chosen members of one tar; on a failed batch, finds the bad images.

    DALI cannot drop one sample from a batch, and a pipeline that raised is dead. A failed batch
    is therefore redone image by image (batch size 1, no prefetch): each image that still fails
    is reported ``decode_failed``; a fresh pipeline then carries on after it.
    """

    def __init__(self, embedder: TimmImageEmbedder, tar_path: str, tmp_dir: str, device: str):
        self.embedder = embedder
        self.tar_path = tar_path
        self.tmp_dir = tmp_dir
        self.device = device
        self.device_id = _cuda_index(device)
        self._segment = 0

    def read(self, samples: list[tuple[str, TarMember]], batch_size: int) -> Iterator[ShardItems]:
        start = 0
        while start < len(samples):
            segment = samples[start:]
            done = 0
            try:
                for ids, batch in self._run(segment, batch_size):
                    yield ShardItems(batch, ids)
                    done += len(ids)
                return
            except _BatchFailed as failure:
                failed_batch = segment[done: done + failure.batch_len]
                if failure.batch_len == 1:
                    key = failed_batch[0][0]
                    logger.warning("%s: image of %s could not be decoded: %s", self.tar_path, key, failure.message)
                    yield ShardItems(None, [key], image_status.DECODE_FAILED, failure.message)
                else:
                    yield from self.read(failed_batch, 1)
                start += done + failure.batch_len

    def _run(self, samples, batch_size: int):
        """Yield (ids, batch) for ``samples`` in order; raise _BatchFailed on a DALI error.

        Whole batches come from one pipeline and a last partial batch from a second one of
        exactly its size: DALI's reader pads a partial batch with copies of its last sample, and
        every copy would be decoded and preprocessed for nothing.
        """
        bs = min(batch_size, len(samples))
        whole = len(samples) // bs * bs
        yield from self._run_pipeline(samples[:whole], bs)
        if whole < len(samples):
            yield from self._run_pipeline(samples[whole:], len(samples) - whole)

    def _run_pipeline(self, samples, bs: int):
        """Run one pipeline over ``samples``, a whole number of batches of ``bs``.

        Iterations are scheduled by hand, ``_PREFETCH_DEPTH`` ahead of the one being read and
        never past the last batch: ``pipe.run()`` would start one iteration more than it returns,
        decoding a batch that nobody reads (and that the pipeline's teardown waits for).
        """
        import torch

        n_batches = len(samples) // bs
        exact = bs == 1
        depth = 1 if exact else max(1, min(_PREFETCH_DEPTH, n_batches))
        pipe = self._build(samples, bs, exact=exact, depth=depth)
        scheduled = 0  # iterations started; the first schedule_run() starts `depth` of them
        since_trim = 0
        for b in range(n_batches):
            want = samples[b * bs: (b + 1) * bs]
            try:
                if scheduled < min(b + depth, n_batches):
                    pipe.schedule_run()
                    scheduled = depth if scheduled == 0 else scheduled + 1
                images, encoded = pipe.outputs()
            except RuntimeError as err:
                del pipe
                raise _BatchFailed(len(want), _short_error(err)) from None
            sources = [encoded[i].source_info() for i in range(len(want))]
            got = [split_member_name(s.rsplit(":", 1)[-1])[0] for s in sources]
            expected = [k for k, _ in want]
            if got != expected:
                raise RuntimeError(f"DALI returned samples {got[:3]}... where {expected[:3]}... were expected in {self.tar_path}")
            yield expected, _to_torch(images, len(want), self.device, torch)
            since_trim += len(want)
            if since_trim >= _TRIM_EVERY_IMAGES:
                trim_heap()
                since_trim = 0

    def _build(self, samples, batch_size: int, exact: bool, depth: int = 2):
        from nvidia.dali import fn, pipeline_def, types

        self._segment += 1
        idx_path = os.path.join(self.tmp_dir, f"segment{self._segment}.idx")
        with open(idx_path, "w") as f:
            f.write(f"v1.2 {len(samples)}\n")
            f.writelines(f"{_DALI_EXT} {m.offset_data} {m.size} {m.name}\n" for _, m in samples)
        embedder = self.embedder
        gpu = self.device_id is not None
        extra = ({"exec_async": False, "exec_pipelined": False, "prefetch_queue_depth": 1} if exact
                 else {"prefetch_queue_depth": depth})

        @pipeline_def(batch_size=batch_size, num_threads=embedder.num_threads_per_worker, device_id=self.device_id, **extra)
        def pipeline():
            # dont_use_mmap: a mapped tar's pages count in the worker's RSS (Dask's memory monitor
            # reads it) and grow with the shard; reading costs no measurable time here
            encoded = fn.readers.webdataset(paths=[self.tar_path], index_paths=[idx_path], ext=[_DALI_EXT],
                                            missing_component_behavior="error", pad_last_batch=True, name="reader",
                                            dont_use_mmap=True)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=embedder.adjust_orientation)
            return dali_preprocess(images, embedder.transform), encoded

        pipe = pipeline()
        pipe.build()
        return pipe


def keep_freed_memory_for_reuse() -> bool:
    """Tune glibc's malloc in this process for CPU inference; return whether it was changed.

    Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``. Like any explicit
    malloc setting, that also freezes the mmap threshold at 128 KiB, so each activation tensor of
    a CPU forward pass (MBs, allocated and freed every batch) becomes a fresh ``mmap``: page
    faults and zeroing on every batch, +70 % CPU per image for the tiny CLIP model on 2 cores
    (docs/benchmarks.md). Allocations up to 32 MiB are served from the heap again and up to
    64 MiB of freed heap is kept for the next batch; the shard reader calls ``trim_heap`` every
    ``_TRIM_EVERY_IMAGES`` images so that the heap does not grow with the shard (the
    embeddings kept between batches fragment it). Skipped where ``MALLOC_MMAP_THRESHOLD_`` is set
    (the user chose) or the C library is not glibc. Called when a CPU model is loaded.
    """
    global _LIBC
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 64 << 20):
            _LIBC = libc
            return True
    except (OSError, AttributeError):
        pass
    return False


def trim_heap() -> None:
    """Give the free pages of the heap back to the OS (``malloc_trim``) where
    ``keep_freed_memory_for_reuse`` tuned malloc in this process; else nothing."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_LIBC = None  # glibc, once keep_freed_memory_for_reuse has tuned it in this process
_TRIM_EVERY_IMAGES = 512


class _BatchFailed(Exception):
    def __init__(self, batch_len: int, message: str):
        super().__init__(message)
        self.batch_len = batch_len
        self.message = message


def _short_error(err: Exception) -> str:
    """The cause of a DALI pipeline error, without the Python traceback DALI wraps around it."""
    text = str(err)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    text = text.split("C++ context", 1)[0].split("Current pipeline object", 1)[0]
    return " ".join(text.split())[:500]


def _cuda_index(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()


def _to_torch(images, n: int, device: str, torch):
    """DALI output (N, C, H, W) float -> torch tensor on ``device``; GPU data stays on the GPU."""
    tensor = images.as_tensor()
    if device.startswith("cuda"):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(tuple(tensor.shape()), dtype=torch.float32, device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(out.device))
        return out[:n]
    import numpy as np

    return torch.from_numpy(np.array(tensor)[:n])
