"""A worker with two threads prepares the next shard while this one computes (what a GPU worker
does: ``get_client(cluster_type="gpu")`` starts them with ``GPU_WORKER_THREADS``): the parquet read
and the tar scan run outside the device's turn (``utils.device.device_turn``), the decoding and
the model inside it, one shard at a time. Real LocalCluster, real DALI on the CPU, a tiny timm
model made deliberately slow; the proof is in the per-shard timestamps the embedder records."""
from __future__ import annotations

import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest
from distributed import Client, LocalCluster

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.image.embedders import TimmImageEmbedder
from nemo_curator.image.shard_reader import DaliShardReader
from nemo_curator.utils.constants import DEFAULT_MODEL, TINY_MODEL_KWARGS
from nemo_curator.utils.device import DeviceTurn
from nemo_curator.utils.sample_data import make_samples, write_shard

SLOW_SECONDS = 0.4  # per model call: 2 batches per shard, so a shard holds the device ~0.8 s
PREP_SECONDS = 0.3  # per tar scan: the preparation that must not hold the device

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers do not import the tests


class SlowScanReader(DaliShardReader):
    """DALI's reader, its tar scan made ``PREP_SECONDS`` slower (a stand-in for a big tar on a
    network file system)."""

    def image_members(self, tar_path):
        time.sleep(PREP_SECONDS)
        return super().image_members(tar_path)


class SlowEmbedder(TimmImageEmbedder):
    """The tiny model, each call made ``SLOW_SECONDS`` slower (a stand-in for a GPU's model time),
    reading with ``SlowScanReader``, taking turns on the CPU as every embedder does on a GPU."""

    device_turns_on_cpu = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reader = SlowScanReader(self.transform, batch_size=self.batch_size, num_threads=1)

    def load_embedding_model(self, device: str):
        embed = super().load_embedding_model(device)

        def slow(batch):
            time.sleep(SLOW_SECONDS)
            return embed(batch)

        return slow


@pytest.fixture
def two_thread_client():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


def test_the_next_shard_is_prepared_while_this_one_holds_the_device(tmp_path, two_thread_client):
    rng = np.random.default_rng(3)
    for s in range(4):
        write_shard(tmp_path, f"{s:05d}", make_samples(4, s, rng, sizes=[(48, 40)]))
    embedder = SlowEmbedder(DEFAULT_MODEL, model_kwargs=TINY_MODEL_KWARGS, batch_size=2, num_threads_per_worker=1)
    with two_thread_client.as_current():
        two_thread_client.run(lambda: embedder.get_model("cpu") and None)  # loading is not what is measured
        dataset = ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key")
        summary = embedder(dataset).save_metadata(show_progress=False, resume=False)
    assert summary["totals"]["embedded"] == 16
    shards = sorted(summary["shards"], key=lambda s: s["device_turn_at"])
    for k, (current, following) in enumerate(zip(shards, shards[1:])):
        # one shard at a time on the device ...
        assert following["device_turn_at"] >= current["device_released_at"] - 1e-3
        # ... and the next one read its parquet and scanned its tar (PREP_SECONDS) before it asked
        # for its turn, before the current shard released the device
        asked_at = following["device_turn_at"] - following["device_wait_seconds"]
        assert following["started_at"] + PREP_SECONDS * 0.9 < asked_at < current["device_released_at"]
        assert following["device_wait_seconds"] > SLOW_SECONDS / 2
        if k > 0:  # the first two start together; each later one starts when a thread is free,
            # i.e. while the current shard holds the device: its preparation overlaps that shard's model work
            assert following["started_at"] > current["device_turn_at"] - 0.05
    held = [s["device_released_at"] - s["device_turn_at"] for s in shards]
    assert min(held) >= 2 * SLOW_SECONDS * 0.9  # the model calls ran inside the turn


def test_a_thread_reenters_its_turn_and_another_thread_waits_for_it():
    turn = DeviceTurn()
    order = []

    def other():
        with turn.hold():
            order.append("other")

    with turn.hold():
        with turn.hold():  # the reader holds it, the model call inside takes it again: no deadlock
            thread = threading.Thread(target=other)
            thread.start()
            time.sleep(0.2)
            order.append("this")
    thread.join(5)
    assert order == ["this", "other"]
    log = turn.log()
    assert log["waited_seconds"] < 0.05 and log["released_at"] >= log["turn_at"] + 0.2


def test_a_cpu_worker_does_not_take_turns_unless_asked():
    plain = TimmImageEmbedder(DEFAULT_MODEL, model_kwargs=TINY_MODEL_KWARGS)
    assert not plain.takes_device_turns("cpu") and plain.takes_device_turns("cuda:0")
    assert SlowEmbedder(DEFAULT_MODEL, model_kwargs=TINY_MODEL_KWARGS).takes_device_turns("cpu")


def test_a_failed_shard_gives_its_turn_back_to_the_other_thread(tmp_path, two_thread_client):
    """A shard whose model raises: the task fails, and both threads of the worker can still take
    the turn afterwards (it is held in embed_shard's frame, never across a generator's yield)."""
    rng = np.random.default_rng(4)
    write_shard(tmp_path, "00000", make_samples(4, 0, rng, sizes=[(48, 40)]))
    embedder = FailingEmbedder(DEFAULT_MODEL, model_kwargs=TINY_MODEL_KWARGS, batch_size=2, num_threads_per_worker=1)
    with two_thread_client.as_current():
        dataset = ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key")
        with pytest.raises(RuntimeError, match="the model broke"):
            embedder(dataset).save_metadata(show_progress=False, resume=False)
        free = two_thread_client.gather([two_thread_client.submit(_turn_is_free, i, pure=False) for i in range(4)])
    assert free == [True] * 4


class FailingEmbedder(TimmImageEmbedder):
    device_turns_on_cpu = True

    def load_embedding_model(self, device: str):
        def broken(batch):
            raise RuntimeError("the model broke")

        return broken


def _turn_is_free(_) -> bool:
    from nemo_curator.utils.device import device_turn

    lock = device_turn("cpu")._lock
    if not lock.acquire(timeout=5):
        return False
    lock.release()
    time.sleep(0.2)  # keep this thread busy so that the next call runs on the other one
    return True
