"""DaliShardReader: decode the images of a webdataset shard with DALI, in batches, on the worker.

The one reader of images in this package, used by ``TimmImageEmbedder`` and by the stage API:

- member selection: per sample the first image extension of ``image_extensions`` it has
  (``utils.webdataset.pick_image_member``), from the tar's headers or its DALI index file;
- DALI's webdataset reader over an index of just the wanted members (unwanted samples are never
  read or decoded), decoding on the GPU ("mixed", nvJPEG) or the CPU;
- the preprocessing of a ``TransformSpec`` (timm's eval transform) inside the same DALI graph, or
  none (``transform=None``: the decoded RGB pictures);
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
import tempfile
from dataclasses import dataclass
from typing import Any, Collection, Iterator, Sequence

from nemo_curator.image.transforms import TransformSpec, dali_preprocess
from nemo_curator.utils.constants import DECODE_FAILED, EXTRA_IN_TAR, MISSING_IMAGE, OK
from nemo_curator.utils.cpu_tuning import TRIM_EVERY_IMAGES, trim_heap
from nemo_curator.utils.device import check_device, worker_device
from nemo_curator.utils.distributed_utils import cpu_threads_per_worker
from nemo_curator.utils.webdataset import (DEFAULT_IMAGE_EXTENSIONS, Shard, TarMember, iter_tar_samples,
                                           pick_image_member, read_dali_index, split_member_name)

logger = logging.getLogger(__name__)

_DALI_EXT = "img"  # every image member is listed under this extension in the index given to DALI
_PREFETCH_DEPTH = 2  # DALI iterations in flight ahead of the batch being read (DALI's default)


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
        """Yield ``ShardItems`` for the wanted images of one tar (all of them when ``wanted_ids`` is None).

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
        with tempfile.TemporaryDirectory(prefix="nemo-curator-dali-") as tmp:
            run = _ShardRun(self, tar_path, tmp, device, threads)
            yield from run.read(samples, self.batch_size)


class _ShardRun:
    """DALI over chosen members of one tar; on a failed batch, finds the bad images."""

    def __init__(self, reader: DaliShardReader, tar_path: str, tmp_dir: str, device: str, threads: int):
        self.reader = reader
        self.tar_path = tar_path
        self.tmp_dir = tmp_dir
        self.device = device
        self.device_id = _cuda_index(device)
        self.threads = threads
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
                    yield ShardItems(None, [key], DECODE_FAILED, failure.message)
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
            yield expected, to_torch(images, len(want), self.device, uniform=self.reader.transform is not None)
            since_trim += len(want)
            if since_trim >= TRIM_EVERY_IMAGES:
                trim_heap()
                since_trim = 0

    def _build(self, samples, batch_size: int, exact: bool, depth: int = 2):
        from nvidia.dali import fn, pipeline_def, types

        self._segment += 1
        idx_path = os.path.join(self.tmp_dir, f"segment{self._segment}.idx")
        with open(idx_path, "w") as f:
            f.write(f"v1.2 {len(samples)}\n")
            f.writelines(f"{_DALI_EXT} {m.offset_data} {m.size} {m.name}\n" for _, m in samples)
        reader = self.reader
        gpu = self.device_id is not None
        extra = ({"exec_async": False, "exec_pipelined": False, "prefetch_queue_depth": 1} if exact
                 else {"prefetch_queue_depth": depth})

        @pipeline_def(batch_size=batch_size, num_threads=self.threads, device_id=self.device_id, **extra)
        def pipeline():
            # dont_use_mmap: a mapped tar's pages count in the worker's RSS (Dask's memory monitor
            # reads it) and grow with the shard; reading costs no measurable time here
            encoded = fn.readers.webdataset(paths=[self.tar_path], index_paths=[idx_path], ext=[_DALI_EXT],
                                            missing_component_behavior="error", pad_last_batch=True, name="reader",
                                            dont_use_mmap=True)
            decoder_options = ({"hw_decoder_load": reader.hw_decoder_load}
                               if gpu and reader.hw_decoder_load is not None else {})
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=reader.adjust_orientation, **decoder_options)
            if reader.transform is not None:
                images = dali_preprocess(images, reader.transform)
            return images, encoded

        pipe = pipeline()
        pipe.build()
        return pipe


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
