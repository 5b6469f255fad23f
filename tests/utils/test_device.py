"""The device and autocast policies (decided where the hardware is) and the CPU malloc tuning."""
from __future__ import annotations

import logging

import pytest

from nemo_curator.utils import device as device_policy
from nemo_curator.utils.device import check_device, cpu_has_fast_bf16, cuda_available, resolve_bf16, worker_device


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu():
    assert worker_device("auto") == ("cuda" if cuda_available() else "cpu")
    assert worker_device("cpu") == "cpu" and worker_device("cuda:1") == "cuda:1"
    for bad in ("tpu", "cuda:x", "", None):
        with pytest.raises(ValueError, match="device must be one of"):
            check_device(bad)


def test_precision_auto_follows_the_hardware_and_explicit_choices_are_obeyed(caplog, monkeypatch):
    assert resolve_bf16("auto", "cuda") is True and resolve_bf16("auto", "cuda:0") is True
    assert resolve_bf16("auto", "cpu") is cpu_has_fast_bf16()
    assert resolve_bf16("fp32", "cuda") is False and resolve_bf16("fp32", "cpu") is False
    monkeypatch.setattr(device_policy, "_warned_emulated", False)
    with caplog.at_level(logging.WARNING, logger="nemo_curator.utils.device"):
        assert resolve_bf16("bf16", "cpu") is True and resolve_bf16("bf16", "cpu") is True
    emulated = [r for r in caplog.records if "emulated" in r.getMessage()]
    assert len(emulated) == (0 if cpu_has_fast_bf16() else 1)  # once per process, only where it is emulated
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_bf16("fp16", "cuda")


def test_malloc_tuning_is_left_to_the_user_who_set_it(monkeypatch):
    from nemo_curator.utils.cpu_tuning import keep_freed_memory_for_reuse

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory_for_reuse() is False
