"""DaliShardReader: decode the images of a webdataset shard with DALI, in batches, on the worker.

The one reader of images in this package, used by ``TimmImageEmbedder`` and by the stage API:

- member selection: per sample the first image extension of ``image_extensions`` it has
  (``utils.webdataset.pick_image_member``), from the tar's headers or its DALI index file;
- the wanted members' bytes read from the tar (unwanted samples are never read or decoded) and
  fed to a DALI pipeline that decodes on the GPU ("mixed", nvJPEG) or the CPU; the pipeline is
  built once per process and setting, and reused by the next shards (``PIPELINES``);
- the preprocessing of a ``TransformSpec`` (timm's eval transform) inside the same DALI graph, or
  none (``transform=None``: the decoded RGB pictures);
- the member selection runs when ``read`` is called, the decoding when its items are taken (so
  that ``embed_shard`` takes its turn on the device only for the decoding and the model);
- failed-batch isolation: DALI cannot drop one sample from a batch and a pipeline that raised is
  dead, so a failed batch is redone image by image and each image that still fails is reported
  ``decode_failed`` while the others go on;
- the hand-over to torch on the right device: GPU output stays on the GPU (no host copy).

Every wanted id comes out in exactly one ``ShardItems``: in a batch, or with a status
(``decode_failed``, ``missing_image``); samples of the tar that are not wanted (or repeat a key)
come out once as ``extra_in_tar``.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterator, Sequence

from nemo_curator.image.transforms import TransformSpec, dali_preprocess
from nemo_curator.utils.constants import DECODE_FAILED, EXTRA_IN_TAR, MISSING_IMAGE, OK
from nemo_curator.utils.cpu_tuning import TRIM_EVERY_IMAGES, trim_heap
from nemo_curator.utils.device import check_device, worker_device
from nemo_curator.utils.distributed_utils import cpu_threads_per_worker, on_clear_worker_cache
from nemo_curator.utils.webdataset import (DEFAULT_IMAGE_EXTENSIONS, Shard, TarMember, iter_tar_samples,
                                           pick_image_member, read_dali_index, read_member_bytes)

logger = logging.getLogger(__name__)

_INPUT_NAME = "encoded"  # the pipeline's input: the encoded bytes of one batch of images


@dataclass
class ShardItems:
    """What a shard reader yields: a batch of images (or None) and the ids it covers.

    - ``batch`` not None: the N images of ``ids``, on the model's device: a float tensor
      (N, C, H, W) after a transform, or a list of N uint8 (H, W, 3) tensors without one.
    - ``batch`` None: ``ids`` whose samples could not be used, with ``status`` saying why
      (``decode_failed``, ``missing_image``, or ``extra_in_tar`` for samples without a metadata row)
      and ``error`` the decoder's message where there is one.
    """

    batch: Any
    ids: list[str]
    status: str = OK
    error: str | None = None


class DaliShardReader:
    """Decode (and preprocess) the images of webdataset tars with DALI.

    Args:
        transform: timm's eval preprocessing as a ``TransformSpec``; None gives decoded RGB images.
        batch_size: images per batch (any value >= 1).
        num_threads: DALI CPU threads; None: this machine's cores divided among the Dask workers
            on it, decided on the worker.
        device: "auto" (the worker's GPU when it has one), "cpu", "cuda" or "cuda:N".
        image_extensions: member extensions taken as the image, in order of preference.
        use_index_files: read ``NNNNN.idx`` beside each tar instead of scanning the tar's headers
            (a missing index file is an error).
        adjust_orientation: apply EXIF orientation when decoding (the picture a person sees).
        hw_decoder_load: on a GPU, the share of JPEGs given to the hardware JPEG decoder (A100,
            H100/H200) in [0, 1]; None: DALI's default (0.65). Ignored on the CPU.

    Picklable (it holds settings only): build it on the client, use it in the tasks.
    """

    def __init__(self, transform: TransformSpec | None, batch_size: int = 32, num_threads: int | None = None,
                 device: str = "auto", image_extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS,
                 use_index_files: bool = False, adjust_orientation: bool = True,
                 hw_decoder_load: float | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"num_threads must be a positive integer or None (decided on each worker), "
                             f"got {num_threads!r}")
        extensions = tuple(e.lower().lstrip(".") for e in image_extensions)
        if not extensions:
            raise ValueError("image_extensions must name at least one extension, e.g. ('jpg', 'png')")
        if hw_decoder_load is not None and not 0.0 <= hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1] (or None: DALI's default), got {hw_decoder_load!r}")
        self.transform = transform
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.device = check_device(device)
        self.image_extensions = extensions
        self.use_index_files = use_index_files
        self.adjust_orientation = adjust_orientation
        self.hw_decoder_load = hw_decoder_load

    # -- selection --------------------------------------------------------------------------------
    def image_members(self, tar_path: str) -> list[tuple[str, TarMember | None]]:
        """(key, image member or None) for each sample of the tar, in tar order."""
        if self.use_index_files:
            idx = Shard.of_file(tar_path).idx
            if not os.path.isfile(idx):
                raise FileNotFoundError(f"use_index_files=True but {idx} does not exist: write it with "
                                        f"`nemo-curator-image index {os.path.dirname(tar_path) or '.'}` or pass "
                                        f"use_index_files=False")
            samples = read_dali_index(idx)
        else:
            samples = iter_tar_samples(tar_path)
        return [(key, pick_image_member(members, self.image_extensions)) for key, members in samples]

    # -- reading ----------------------------------------------------------------------------------
    def read(self, tar_path: str, wanted_ids: Collection[str] | None = None,
             device: str | None = None) -> Iterator[ShardItems]:
        """``ShardItems`` for the wanted images of one tar (all of them when ``wanted_ids`` is None).

        The tar is scanned and the members chosen now, in this call; the iterator returned then
        decodes (so a caller can take its turn on the device after the scan: ``embed_shard``).
        ``device``: where batches go (default: this reader's ``device``, "auto" resolved here).
        """
        device = worker_device(device or self.device)
        selected, extra, no_image, seen = [], [], [], set()
        for key, member in self.image_members(tar_path):
            if (wanted_ids is not None and key not in wanted_ids) or key in seen:
                extra.append(key)
                continue
            seen.add(key)
            if member is None:
                no_image.append(key)
            else:
                selected.append((key, member))
        if wanted_ids is not None:
            no_image += [i for i in wanted_ids if i not in seen]
        return self._items(tar_path, selected, extra, no_image, device)

    def _items(self, tar_path, selected, extra, no_image, device) -> Iterator[ShardItems]:
        if extra:
            yield ShardItems(None, extra, EXTRA_IN_TAR)
        if no_image:
            yield ShardItems(None, no_image, MISSING_IMAGE)
        if selected:
            yield from self.read_members(tar_path, selected, device)

    def read_members(self, tar_path: str, samples: list[tuple[str, TarMember]],
                     device: str) -> Iterator[ShardItems]:
        """Yield ``ShardItems`` for the given ``(key, image member)`` pairs of one tar, in order."""
        threads = self.num_threads or cpu_threads_per_worker()
        yield from _ShardRun(self, tar_path, device, threads).read(samples, self.batch_size)

    def pipeline_key(self, device_id: int | None, threads: int) -> tuple:
        """What makes a built pipeline of this reader reusable by another: its settings."""
        return (type(self), device_id, threads, self.batch_size, self.transform, self.adjust_orientation,
                self.hw_decoder_load if device_id is not None else None)

    def build_pipeline(self, device_id: int | None, threads: int):
        """A built DALI pipeline: encoded images fed to ``"encoded"`` (batches of 1 to
        ``batch_size``) -> decoded (and preprocessed) images, on GPU ``device_id`` or the CPU."""
        from nvidia.dali import fn, pipeline_def, types

        gpu = device_id is not None

        # exec_dynamic: outputs own their memory, so the next batch runs while this one is used
        @pipeline_def(batch_size=self.batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=1,
                      exec_dynamic=True)
        def pipeline():
            encoded = fn.external_source(name=_INPUT_NAME, dtype=types.UINT8, ndim=1)
            decoder_options = {"hw_decoder_load": self.hw_decoder_load} if gpu and self.hw_decoder_load is not None else {}
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=self.adjust_orientation, **decoder_options)
            return dali_preprocess(images, self.transform) if self.transform is not None else images

        pipe = pipeline()
        pipe.build()
        return pipe


class _PipelinePool:
    """This process's idle built pipelines, by ``DaliShardReader.pipeline_key``: a shard checks one
    out and gives it back when it read every batch it scheduled, so that the next shard does not
    build one again (building cost ~25 ms of CPU per shard, most of a small shard's fixed cost).
    A pipeline that raised is never given back: DALI cannot run it again."""

    def __init__(self, max_idle_per_key: int = 2):
        self._idle: dict[tuple, list] = {}
        self._lock = threading.Lock()
        self._max_idle = max_idle_per_key

    def checkout(self, key: tuple, build: Callable[[], Any]):
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()
        return build()

    def give_back(self, key: tuple, pipe) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._max_idle:
                idle.append(pipe)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


PIPELINES = _PipelinePool()
on_clear_worker_cache(PIPELINES.clear)  # clear_worker_cache frees their memory too


class _ShardRun:
    """DALI over chosen members of one tar; on a failed batch, finds the bad images."""

    def __init__(self, reader: DaliShardReader, tar_path: str, device: str, threads: int):
        self.reader = reader
        self.tar_path = tar_path
        self.device = device
        self.device_id = _cuda_index(device)
        self.key = reader.pipeline_key(self.device_id, threads)
        self.threads = threads
        self.unreadable: dict[str, str] = {}  # key -> why its member's bytes could not be read

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
                    yield ShardItems(None, [key], DECODE_FAILED, failure.message)
                else:
                    yield from self.read(failed_batch, 1)
                start += done + failure.batch_len

    def _run(self, samples, batch_size: int):
        """Yield (ids, batch) for ``samples`` in order, batches of ``batch_size`` (the last one
        smaller: it is fed as it is, nothing is padded); raise _BatchFailed on a DALI error.

        The members' bytes are read here and fed to a pooled pipeline. While DALI decodes batch
        b, the bytes of b + 1 are read; b + 1 is scheduled before b is yielded, so that DALI
        decodes it while the caller uses b; never a batch past the last: the pipeline ends idle,
        ready for the next shard. A pipeline that raised, or holds a batch nobody will read (the
        caller stopped early), is dropped instead of given back.
        """
        batches = [samples[i: i + batch_size] for i in range(0, len(samples), batch_size)]
        pipe = PIPELINES.checkout(self.key, lambda: self.reader.build_pipeline(self.device_id, self.threads))
        pending = 0  # batches fed and not read yet
        since_trim = 0
        try:
            with open(self.tar_path, "rb") as tar:
                pending += 1
                self._feed(pipe, self._encoded(tar, batches[0]))
                for b, want in enumerate(batches):
                    following = self._encoded(tar, batches[b + 1]) if b + 1 < len(batches) else None
                    try:
                        (images,) = pipe.outputs()
                    except RuntimeError as err:
                        pipe, pending = None, 0  # dead: dropped, not given back
                        raise _BatchFailed(len(want), self._failure_message(want, err)) from None
                    pending -= 1
                    # ``images`` stays referenced until the next outputs(): a GPU copy into torch
                    # is queued on torch's stream, and must not see its source freed
                    batch = to_torch(images, len(want), self.device, uniform=self.reader.transform is not None)
                    if following is not None:
                        pending += 1
                        self._feed(pipe, following)
                    yield [k for k, _ in want], batch
                    since_trim += len(want)
                    if since_trim >= TRIM_EVERY_IMAGES:
                        trim_heap()
                        since_trim = 0
        finally:
            if pipe is not None and pending == 0:
                PIPELINES.give_back(self.key, pipe)

    def _encoded(self, tar, batch) -> list:
        """The encoded bytes of ``batch``'s members as uint8 arrays; a member that cannot be read
        (a tar cut short) becomes an empty array, which fails its batch, and is remembered."""
        import numpy as np

        arrays = []
        for key, member in batch:
            try:
                arrays.append(np.frombuffer(read_member_bytes(tar, member), dtype=np.uint8))
            except (EOFError, OSError) as err:
                self.unreadable[key] = f"{self.tar_path}: {err}"
                arrays.append(np.zeros(0, dtype=np.uint8))
        return arrays

    def _feed(self, pipe, arrays: list) -> None:
        pipe.feed_input(_INPUT_NAME, arrays)
        pipe.schedule_run()

    def _failure_message(self, batch, err: Exception) -> str:
        unreadable = [self.unreadable[k] for k, _ in batch if k in self.unreadable]
        return unreadable[0] if len(batch) == 1 and unreadable else _short_error(err)


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


def to_torch(images, n: int, device: str, uniform: bool):
    """DALI output -> torch on ``device``, GPU data staying on the GPU: one (N, C, H, W) float
    tensor when the samples share a shape (``uniform``), else a list of N (H, W, C) tensors."""
    import numpy as np
    import torch

    on_gpu = device.startswith("cuda")
    if on_gpu:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        def gpu_tensor(dali_tensor, dtype):
            out = torch.empty(tuple(dali_tensor.shape()), dtype=dtype, device=device)
            feed_ndarray(dali_tensor, out, cuda_stream=torch.cuda.current_stream(out.device))
            return out

    if uniform:
        tensor = images.as_tensor()
        if on_gpu:
            return gpu_tensor(tensor, torch.float32)[:n]
        return torch.from_numpy(np.array(tensor)[:n])
    if on_gpu:
        return [gpu_tensor(images[i], torch.uint8) for i in range(n)]
    return [torch.from_numpy(np.array(images[i])) for i in range(n)]
