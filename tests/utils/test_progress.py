"""compute_with_progress on a real LocalCluster: results in order, and the graph it sends with each
shard's chain fused into one task (``fuse_shard_chains``)."""
from __future__ import annotations

import dask
import pytest
from dask._task_spec import Task

from nemo_curator.utils.progress import compute_with_progress, fuse_shard_chains


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
