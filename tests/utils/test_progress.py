"""compute_with_progress on a real LocalCluster: results in order, and the graph it sends with each
shard's chain fused into one task (``fuse_shard_chains``)."""
from __future__ import annotations

import os
import time

import dask
import pytest
from dask._task_spec import Task
from distributed import Event

from nemo_curator.utils import progress
from nemo_curator.utils.progress import compute_with_progress, fuse_shard_chains, group_outputs, submission_chunks


def read(i):
    return list(range(i + 1))


def double(xs):
    return [2 * x for x in xs]


def total(xs, offset=0):
    return sum(xs) + offset


def gather(*parts):
    return sum(parts)


def tasks_of(graph) -> dict:
    return {k: v for k, v in dict(graph).items() if isinstance(v, Task)}


def shard_chains(n: int):
    """n outputs, each a diamond on one source: read -> (double, total) -> total."""
    outputs = []
    for i in range(n):
        rows = dask.delayed(read, pure=True)(i)
        doubled = dask.delayed(double, pure=True)(rows)
        outputs.append(dask.delayed(total, pure=True)(doubled, offset=dask.delayed(total, pure=True)(rows)))
    return outputs


def test_each_shard_chain_becomes_one_task_with_its_key():
    outputs = shard_chains(4)
    graph = tasks_of(fuse_shard_chains(outputs))
    assert sorted(graph) == sorted(o.key for o in outputs)


def test_an_output_gathering_several_sources_keeps_one_task_per_source_chain():
    sources = [dask.delayed(double, pure=True)(dask.delayed(read, pure=True)(i)) for i in range(3)]
    shared = dask.delayed(read, pure=True)(10)  # needed by both outputs: computed once, on its own
    outputs = [dask.delayed(gather, pure=True)(*(dask.delayed(total, pure=True)(s) for s in sources), dask.delayed(total)(shared)),
               dask.delayed(total, pure=True)(shared)]
    graph = tasks_of(fuse_shard_chains(outputs))
    # output 0: its own task + 3 source chains (read -> double -> total each) + the shared read's
    # total (a chain of its own); output 1 and the shared read stay tasks of their own
    assert len(graph) == 1 + 3 + 1 + 1 + 1
    assert shared.key in graph and all(o.key in graph for o in outputs)


def test_results_come_back_in_order_on_the_cluster(client):
    outputs = shard_chains(6)
    expected = [total(double(read(i)), offset=total(read(i))) for i in range(6)]
    with client.as_current():
        assert compute_with_progress(outputs, desc="test", show=False) == expected
    assert dask.compute(*outputs, scheduler="sync") == tuple(expected)


def test_a_data_root_does_not_make_an_output_gather_sources():
    """A literal shared by the reads of one output (as Dask's dataframe graphs have) is not a
    source: the reads stay separate chains and run in parallel."""
    config = dask.delayed({"scale": 1}, pure=True)
    sources = [dask.delayed(read, pure=True)(i, dask_key_name=f"read-{i}") for i in range(3)]
    sources = [dask.delayed(lambda xs, c: xs, pure=True)(s, config) for s in sources]
    output = dask.delayed(gather, pure=True)(*(dask.delayed(total, pure=True)(s) for s in sources))
    assert len(tasks_of(fuse_shard_chains([output]))) == 1 + 3


def test_resources_of_the_fused_parts_are_kept_for_the_fused_task():
    with dask.annotate(resources={"GPU": 0.5}):
        rows = dask.delayed(read, pure=True)(3)
    output = dask.delayed(total, pure=True)(rows)
    graph = fuse_shard_chains([output])
    assert tasks_of(graph).keys() == {output.key}
    assert [layer.annotations for layer in graph.layers.values()] == [{"resources": {"GPU": 0.5}}]


def test_only_delayed_objects_are_taken():
    with pytest.raises(TypeError, match="Delayed"):
        compute_with_progress([1, 2], desc="test", show=False)


def test_resources_go_to_the_chain_that_asked_for_them_not_to_the_gather():
    chains = []
    for i in range(2):
        rows = dask.delayed(read, pure=True)(i)
        with dask.annotate(resources={"GPU": 1}):
            embedded = dask.delayed(double, pure=True)(rows)
        chains.append(dask.delayed(total, pure=True)(embedded, dask_key_name=f"pick-{i}"))
    output = dask.delayed(gather, pure=True)(*chains)
    graph = fuse_shard_chains([output])
    by_key = {k: layer.annotations for layer in graph.layers.values() for k in layer}
    assert by_key["pick-0"] == by_key["pick-1"] == {"resources": {"GPU": 1}}
    assert by_key[output.key] is None  # the gather asks for nothing


def test_a_global_value_shared_by_every_shard_stays_one_task_and_each_shard_is_one_more():
    """A filter against a global figure (a mean over all shards): that figure and the reads
    under it are shared; each shard's own chain is fused above them."""
    reads = [dask.delayed(read, pure=True)(i) for i in range(50)]
    mean = dask.delayed(lambda *xs: sum(map(sum, xs)) / len(xs), pure=True)(*reads)
    outputs = [dask.delayed(total, pure=True)(dask.delayed(double, pure=True)(r), offset=mean) for r in reads]
    graph = tasks_of(fuse_shard_chains(outputs))
    assert len(graph) == 50 + 1 + 50  # the reads, the mean, one fused task per shard
    expected = dask.compute(*outputs, scheduler="sync")
    assert expected[3] == total(double(read(3)), offset=sum(map(sum, (read(i) for i in range(50)))) / 50)


# -- the graph sent in chunks, the results gathered in batches -----------------------------------
def count_call(path, value):
    """``value``, after appending a line to ``path`` (how often a task ran, across processes)."""
    with open(path, "a") as f:
        f.write("ran\n")
    return value


def test_chunks_take_the_outputs_in_order_and_each_task_once():
    reads = [dask.delayed(read, pure=True)(i) for i in range(5)]
    mean = dask.delayed(lambda *xs: sum(map(sum, xs)), pure=True)(*reads)
    with dask.annotate(resources={"GPU": 1}):
        outputs = [dask.delayed(total, pure=True)(dask.delayed(double, pure=True)(r), offset=mean) for r in reads]
    graph = fuse_shard_chains(outputs)
    chunks = submission_chunks(graph, [o.key for o in outputs], first=1, size=2)
    assert [c.outputs for c in chunks] == [[outputs[0].key], [outputs[1].key, outputs[2].key],
                                           [outputs[3].key, outputs[4].key]]
    per_chunk = [set(dict(c.graph)) for c in chunks]
    assert set().union(*per_chunk) == set(dict(graph)) and sum(map(len, per_chunk)) == len(dict(graph))
    # the mean needs every read: all in the first chunk, and held for the later chunks that need them
    assert {mean.key, *(r.key for r in reads)} <= per_chunk[0]
    assert set(chunks[0].held) == {mean.key, *(r.key for r in reads[1:])}
    assert chunks[1].held == chunks[2].held == [] and chunks[0].releases == []
    assert set(chunks[1].releases) == {reads[1].key, reads[2].key}  # then no later chunk needs them
    assert set(chunks[2].releases) == {mean.key, reads[3].key, reads[4].key}
    for chunk in chunks:
        for key in chunk.outputs:
            layer = next(layer for layer in chunk.graph.layers.values() if key in layer)
            assert layer.annotations == {"resources": {"GPU": 1}}


def test_an_output_a_later_chunk_needs_is_held_for_it():
    first = dask.delayed(read, pure=True)(3)
    second = dask.delayed(total, pure=True)(first)
    chunks = submission_chunks(fuse_shard_chains([first, second]), [first.key, second.key], first=1, size=1)
    assert [c.outputs for c in chunks] == [[first.key], [second.key]]
    assert chunks[0].held == [first.key] and first.key not in dict(chunks[1].graph)
    assert chunks[1].releases == [first.key]


def test_chunked_submission_computes_every_output_in_order_and_shared_tasks_once(client, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "SUBMIT_FIRST", 1)
    monkeypatch.setattr(progress, "SUBMIT_CHUNK", 2)
    monkeypatch.setattr(progress, "GATHER_SECONDS", 0.0)
    runs = tmp_path / "runs"
    shared = dask.delayed(count_call, pure=True)(str(runs), 100)
    outputs = [dask.delayed(total, pure=True)(dask.delayed(read, pure=True)(i), offset=shared) for i in range(9)]
    outputs.append(outputs[4])  # a task asked for twice
    first, then = dask.delayed(read, pure=True)(2), None
    then = dask.delayed(total, pure=True)(first)  # an output that needs an earlier chunk's output
    outputs += [first, then]
    with client.as_current():
        results = compute_with_progress(outputs, desc="test", show=False)
    assert results == [total(read(i), offset=100) for i in range(9)] + [total(read(4), offset=100), read(2), total(read(2))]
    assert runs.read_text() == "ran\n"
    ours = {str(o.key) for o in outputs} | {str(shared.key)}
    deadline = time.monotonic() + 10
    while client.run_on_scheduler(lambda dask_scheduler: sorted(str(k) for k in dask_scheduler.tasks if str(k) in ours)) \
            and time.monotonic() < deadline:  # the releases are asynchronous
        time.sleep(0.1)
    assert not client.run_on_scheduler(lambda dask_scheduler: [k for k in dask_scheduler.tasks if str(k) in ours])


def test_results_are_gathered_in_batches_and_an_error_is_raised_at_once(client, monkeypatch):
    monkeypatch.setattr(progress, "GATHER_SECONDS", 3600.0)
    calls = []
    gather = client.gather
    monkeypatch.setattr(client, "gather", lambda futures, *a, **k: calls.append(len(futures)) or gather(futures, *a, **k))
    outputs = [dask.delayed(read, pure=True)(i) for i in range(12)]
    with client.as_current():
        assert compute_with_progress(outputs, desc="test", show=False) == [read(i) for i in range(12)]
    assert calls == [12]  # the last result arrived: one gather, not one per result

    released = Event("test-progress-release", client=client)
    started = time.monotonic()
    slow = dask.delayed(wait_for, pure=False)("test-progress-release")
    try:
        with client.as_current(), pytest.raises(ValueError, match="shard 3 is broken"):
            compute_with_progress([slow, dask.delayed(fail, pure=False)()], desc="test", show=False)
        assert time.monotonic() - started < 45  # while the slow task still ran, not after GATHER_SECONDS
    finally:
        released.set()


def wait_for(name):
    from distributed import Event

    return Event(name).wait(60)


def fail():
    raise ValueError("shard 3 is broken")


# -- small outputs run several to a task ---------------------------------------------------------
class Blob:
    """A shard's intermediate value (its partition's place)."""


LIVE: list = []  # weak references to the Blobs made in this process


def make_blob(i, log):
    import weakref

    with open(log, "a") as f:  # how many earlier Blobs are still alive when this shard starts
        f.write(f"{os.getpid()} start {i} alive {sum(ref() is not None for ref in LIVE)}\n")
    blob = Blob()
    LIVE.append(weakref.ref(blob))
    return blob


def finish_blob(blob, i, log):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} end {i}\n")
    return i


def test_self_contained_outputs_alike_are_grouped_in_order_with_their_annotations():
    shared = dask.delayed(total, pure=True)(dask.delayed(read, pure=True)(9))  # every output needs it: computed once
    outputs = []
    for i in range(7):
        with dask.annotate(resources={"GPU": 0.5 if i == 5 else 1}, retries=1):
            outputs.append(dask.delayed(total, pure=True)(dask.delayed(read, pure=True)(i), offset=shared))
    gather_output = dask.delayed(gather, pure=True)(*(dask.delayed(read, pure=True)(10 + i) for i in range(2)))
    outputs.insert(3, gather_output)  # not self-contained (its sources are its own): alone, and it splits the run
    graph, units = group_outputs(fuse_shard_chains(outputs), [o.key for o in outputs], size=2)
    keys = [o.key for o in outputs]
    # the output that asks for other resources (keys[6]) is not grouped with its neighbours
    assert list(units.values()) == [keys[0:2], [keys[2]], [keys[3]], keys[4:6], [keys[6]], [keys[7]]]
    tasks = dict(graph)
    group = next(k for k, members in units.items() if members == keys[0:2])
    assert group in tasks and not set(keys[0:2]) & set(tasks) and shared.key in tasks
    by_key = {k: layer.annotations for layer in graph.layers.values() for k in layer}
    assert by_key[group] == {"resources": {"GPU": 1}, "retries": 1}
    assert by_key[keys[6]] == {"resources": {"GPU": 0.5}, "retries": 1}
    assert dask.get(tasks, group) == tuple(total(read(i), offset=total(read(9))) for i in range(2))
    assert group_outputs(graph, keys, size=1)[1] == {k: [k] for k in keys}


def test_grouped_outputs_run_one_after_the_other_and_keep_only_their_results(client, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "SHARDS_PER_TASK", 5)
    monkeypatch.setattr(progress, "TASKS_PER_THREAD", 1)
    log = str(tmp_path / "log")
    outputs = [dask.delayed(finish_blob, pure=True)(dask.delayed(make_blob, pure=True)(i, log), i, log) for i in range(20)]
    outputs.append(outputs[7])
    with client.as_current():
        assert compute_with_progress(outputs, desc="test", show=False) == list(range(20)) + [7]
    by_process: dict = {}
    for line in open(log).read().splitlines():
        pid, event, i, *alive = line.split()
        by_process.setdefault(pid, []).append((event, int(i), alive))
    shards = []
    for events in by_process.values():  # in each worker: a shard ends before the next one starts
        assert [e for e, _, _ in events] == ["start", "end"] * (len(events) // 2)
        assert all(start[1] == end[1] for start, end in zip(events[::2], events[1::2]))
        assert all(alive == ["alive", "0"] for e, _, alive in events if e == "start")  # the previous Blob was let go
        order = [i for e, i, _ in events if e == "start"]
        for g in range(0, len(order), 5):  # whole groups of 5 consecutive shards, in order
            assert order[g:g + 5] == list(range(order[g], order[g] + 5)) and order[g] % 5 == 0
        shards += order
    assert sorted(shards) == list(range(20))


def test_a_failing_member_fails_the_job(client, monkeypatch):
    monkeypatch.setattr(progress, "SHARDS_PER_TASK", 4)
    monkeypatch.setattr(progress, "TASKS_PER_THREAD", 1)
    outputs = [dask.delayed(read, pure=True)(i) for i in range(8)] + [dask.delayed(fail, pure=True)()]
    with client.as_current(), pytest.raises(ValueError, match="shard 3 is broken"):
        compute_with_progress(outputs, desc="test", show=False)
