"""utils/graphs: the merged, culled graph of many Delayed objects is Dask's own, built in one
pass (Dask culls layer by layer against every key: O(shards²) for one task per shard)."""
from __future__ import annotations

import dask
from dask.delayed import Delayed

from nemo_curator.utils.graphs import merged_graph, share_one_layer


def read(i):
    return [i, i + 1]


def total(xs, offset=0):
    return sum(xs) + offset


def per_shard_tasks(n: int) -> list[Delayed]:
    """n outputs of one chain each (a layer per call, as ``dask.delayed`` makes), all over one
    shared input."""
    offsets = dask.delayed(list(range(n)), pure=True)
    return [dask.delayed(total, pure=True)(dask.delayed(read, pure=True)(i), offset=offsets[i]) for i in range(n)]


def dask_merged(collections) -> tuple[dict, dict]:
    expr = dask.base.collections_to_expr(list(collections)).optimize()
    from dask._task_spec import convert_legacy_graph

    return convert_legacy_graph(dict(expr.__dask_graph__())), expr.__dask_annotations__()


def test_merged_graph_is_dasks_own_merge_and_cull():
    outputs = per_shard_tasks(20)
    with dask.annotate(resources={"GPU": 1}):
        gpu = dask.delayed(total, pure=True)([outputs[0]])
    asked = outputs[5:] + [gpu]  # outputs 1 to 4 are in the graphs (as dependencies) but not needed
    graph, annotations = merged_graph(asked)
    expected, expected_annotations = dask_merged(asked)
    assert graph.keys() == expected.keys()
    assert outputs[1].key not in graph and outputs[0].key in graph
    assert annotations == expected_annotations and annotations["resources"][gpu.key] == {"GPU": 1}
    results = dask.threaded.get(graph, [d.key for d in asked])
    assert list(results) == list(dask.compute(*asked, scheduler="sync"))


def count_culls(monkeypatch) -> list:
    """Count the calls of Dask's graph cull (one pass over the keys it is given)."""
    import dask._task_spec

    calls, cull = [], dask._task_spec.cull
    monkeypatch.setattr(dask._task_spec, "cull", lambda *a, **k: calls.append(1) or cull(*a, **k))
    monkeypatch.setattr("nemo_curator.utils.graphs.cull", dask._task_spec.cull)
    return calls


def test_merged_graph_culls_once_where_dask_culls_once_per_layer(monkeypatch):
    """One pass over the keys, whatever the number of shards; Dask's merge makes one pass per
    layer (a layer per ``dask.delayed`` call): O(shards²), 2.5 minutes for 10,000 shards."""
    tasks = per_shard_tasks(30)
    calls = count_culls(monkeypatch)
    merged_graph(tasks)
    assert len(calls) == 1
    calls.clear()
    dask_merged(tasks)
    assert len(calls) > 30  # what the helper avoids


def test_share_one_layer_keeps_keys_and_results_in_one_layer():
    outputs = per_shard_tasks(5)
    shared = share_one_layer(outputs, "test")
    assert [d.key for d in shared] == [d.key for d in outputs]
    assert {len(d.dask.layers) for d in shared} == {1} and len({id(d.dask) for d in shared}) == 1
    assert dask.compute(*shared, scheduler="sync") == dask.compute(*outputs, scheduler="sync")


def test_share_one_layer_leaves_annotated_graphs_alone():
    with dask.annotate(resources={"GPU": 1}):
        gpu = dask.delayed(total, pure=True)([1, 2])
    assert share_one_layer([gpu], "test")[0] is gpu
    assert share_one_layer([], "test") == []
