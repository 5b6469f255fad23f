"""The device policy and the autocast policy: where a worker computes and in which precision.

- ``worker_device(requested)``: "auto" is the worker's GPU when it has one, else the CPU.
- ``resolve_bf16(precision, device)``: "auto" runs bf16 autocast where the hardware computes bf16
  natively (every CUDA GPU this package supports; a CPU with AVX512-BF16 or AMX), "bf16" always
  (with a warning where the CPU emulates it: several times slower than fp32), "fp32" never.

- ``device_turn(device)``: the tasks of one worker process take turns on a device, so that a GPU
  worker with two threads computes one shard while the other thread prepares the next.

Both policies are decided on the worker, where the hardware is, never on the client.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Iterator

from nemo_curator.utils.constants import PRECISIONS
from nemo_curator.utils.cpu_tuning import cpu_has_fast_bf16

__all__ = ["DEVICES", "DeviceTurn", "check_device", "check_precision", "cpu_has_fast_bf16", "cuda_available",
           "cuda_device_count", "device_turn", "resolve_bf16", "worker_device"]

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
_warned_emulated = False


def cuda_available() -> bool:
    """Whether this process sees a CUDA GPU through torch (False for a torch without CUDA)."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken CUDA install reads as "no GPU"
        return False


def cuda_device_count() -> int:
    """CUDA GPUs visible to this process (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def check_device(device: str) -> str:
    """``device`` if it is one of ``DEVICES`` (or "cuda:N"), else a ValueError saying which are."""
    if device in DEVICES or (isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ValueError(f"device must be one of {DEVICES} (or 'cuda:N'), got {device!r}")


def worker_device(requested: str = "auto") -> str:
    """The device to compute on in this process: ``requested``, or for "auto" "cuda" when a GPU is
    visible, else "cpu"."""
    check_device(requested)
    if requested != "auto":
        return requested
    return "cuda" if cuda_available() else "cpu"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def resolve_bf16(precision: str, device: str) -> bool:
    """Whether to run under bf16 autocast on ``device`` for ``precision`` ("auto", "bf16", "fp32")."""
    global _warned_emulated
    check_precision(precision)
    on_cuda = device.startswith("cuda")
    if precision == "fp32":
        return False
    if precision == "auto":
        return on_cuda or cpu_has_fast_bf16()
    if not on_cuda and not cpu_has_fast_bf16() and not _warned_emulated:
        _warned_emulated = True
        logger.warning("precision='bf16' on a CPU without bf16 hardware (no AVX512-BF16/AMX): bf16 is emulated, "
                       "several times slower than fp32; precision='auto' would run fp32 here")
    return True


class DeviceTurn:
    """Turns on one device among the threads of this process (re-entrant in a thread).

    A task holds the turn while it decodes and runs the model (``hold``, entered and left in the
    same frame), and does the rest of a shard (its parquet read, its tar scan, its writes)
    without it: with two threads per GPU worker the next shard is prepared while this one
    computes, and the device never holds two shards' batches at once. ``log()`` says, for this
    thread's last outermost hold, how long it waited for the turn (``waited_seconds``) and when it
    got and released it (``turn_at``, ``released_at``: epoch seconds).
    """

    def __init__(self):
        self._lock = threading.RLock()
        self._local = threading.local()

    def log(self) -> dict:
        """This thread's last completed outermost hold (see the class docstring)."""
        return dict(getattr(self._local, "last", None) or {})

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        asked = time.time()
        with self._lock:
            got = time.time()
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
                if depth == 0:
                    self._local.last = {"waited_seconds": got - asked, "turn_at": got, "released_at": time.time()}


_TURNS: dict[str, DeviceTurn] = {}
_TURNS_LOCK = threading.Lock()


def device_turn(device: str) -> DeviceTurn:
    """This process's ``DeviceTurn`` of ``device`` ("cpu", "cuda" (the current GPU), "cuda:N")."""
    if device == "cuda":
        import torch

        device = f"cuda:{torch.cuda.current_device()}"
    with _TURNS_LOCK:
        return _TURNS.setdefault(device, DeviceTurn())
