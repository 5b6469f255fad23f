"""CPU process tuning for inference in a worker: what the CPU computes natively (the bf16 probe,
``cpu_has_fast_bf16``) and glibc's malloc settings (``keep_freed_memory_for_reuse``)."""
from __future__ import annotations

import os

TRIM_EVERY_IMAGES = 512  # the shard reader gives free heap back to the OS after this many images
_LIBC = None  # glibc, once keep_freed_memory_for_reuse has tuned it in this process


def keep_freed_memory_for_reuse() -> bool:
    """Tune glibc's malloc in this process for CPU inference; return whether it was changed.

    Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``. Like any explicit
    malloc setting, that also freezes the mmap threshold at 128 KiB, so each activation tensor of
    a CPU forward pass (MBs, allocated and freed every batch) becomes a fresh ``mmap``: page
    faults and zeroing on every batch, +70 % CPU per image for the tiny CLIP model on 2 cores
    (docs/benchmarks.md). Allocations up to 32 MiB are served from the heap again and up to
    64 MiB of freed heap is kept for the next batch; the shard reader calls ``trim_heap`` every
    ``TRIM_EVERY_IMAGES`` images so that the heap does not grow with the shard (the embeddings
    kept between batches fragment it). Skipped where ``MALLOC_MMAP_THRESHOLD_`` is set (the user
    chose) or the C library is not glibc. Called when a CPU model is loaded.
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
