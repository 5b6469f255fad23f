"""Compute Dask collections with a progress bar a person can see (terminal and Jupyter)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import dask
from dask._task_spec import Alias, DataNode, Task
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from tqdm.auto import tqdm

from nemo_curator.utils.graphs import merged_graph

logger = logging.getLogger(__name__)


def _current_client():
    try:
        from distributed import get_client as _get_client

        return _get_client()
    except (ImportError, ValueError):
        return None


def compute_with_progress(tasks: Sequence[Delayed], desc: str, unit: str = "shard", show: bool = True) -> list[Any]:
    """Compute ``tasks`` (Delayed objects) and return their results in order.

    With a ``distributed`` client the tasks run on the cluster, each with the tasks that it alone
    needs fused into it (``fuse_shard_chains``), and a tqdm bar advances as each finishes;
    without one they run on the local threaded scheduler. An error in any task is raised
    here (after the others were cancelled).
    """
    tasks = list(tasks)
    if any(not isinstance(t, Delayed) for t in tasks):
        raise TypeError(f"compute_with_progress takes Delayed objects, got {sorted({type(t).__name__ for t in tasks})}")
    if not tasks:
        return []
    client = _current_client()
    if client is None:
        with tqdm(total=len(tasks), desc=desc, unit=unit, disable=not show) as bar:
            graph, _ = merged_graph(tasks)  # not dask.compute(*tasks): its merge is O(shards²)
            import dask.threaded

            results = (dask.base.get_scheduler() or dask.threaded.get)(graph, [t.key for t in tasks])
            bar.update(len(tasks))
        return list(results)
    from distributed import as_completed

    keys = [task.key for task in tasks]
    futures = client.get(fuse_shard_chains(tasks), keys, sync=False)  # a HighLevelGraph: keeps annotations
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    try:
        with tqdm(total=len(futures), desc=desc, unit=unit, disable=not show) as bar:
            # the results of the tasks finished since the last turn in one gather: a future.result()
            # each cost the client a round trip (3 ms of CPU per shard, beside the workers)
            for batch in as_completed(futures).batches():
                for future, result in zip(batch, client.gather(batch)):
                    results[index[future.key]] = result
                bar.update(len(batch))
    except BaseException:
        client.cancel(futures)
        raise
    return results


_UNSEEN = object()  # fuse_shard_chains: a key no output has reached yet


def fuse_shard_chains(tasks: Sequence[Delayed]) -> HighLevelGraph:
    """The optimized graph of ``tasks``, with the tasks that only one of them needs fused.

    Each task costs the scheduler and a worker a few ms and a round trip: most of a small
    shard's fixed cost when a shard took eight (read its parquet, embed, pick the partition and
    the stats, write). So:

    - an output whose own tasks start from one source (a shard's chain) becomes one task;
    - an output that gathers several sources (an output shard made of many input shards) keeps
      its task, and each source's own chain that feeds it through one task becomes one task:
      the sources are still read in parallel on the workers.

    Tasks needed by several outputs stay on their own (computed once). The keys of ``tasks`` are
    kept, and so are the annotations (``dask.annotate``): a fused task asks for the most of each
    resource that its parts asked for, and keeps the other annotations of its output.
    """
    # what collections_to_expr(tasks).optimize() gives, without its layer-by-layer cull (O(shards²))
    graph, annotations = merged_graph(tasks)  # annotations: {kind: {key: value}}
    # a converted alias ``key -> other key`` (or a literal) can carry another key as its own: give it its own back
    graph = {key: node if node.key == key else Alias(key, node.target) if isinstance(node, Alias)
             else node.substitute({}, key=key) for key, node in graph.items()}
    outputs = [task.key for task in tasks]
    owner: dict = {}  # graph key -> the one output that needs it, or None when several do
    for output in outputs:
        # each key is expanded at most twice: once owned, once shared (then all above it are shared)
        stack = [(output, False)]
        while stack:
            key, shared = stack.pop()
            current = owner.get(key, _UNSEEN)
            if current is None or (current == output and not shared):
                continue
            shared = shared or current is not _UNSEEN
            owner[key] = None if shared else output
            stack.extend((d, shared) for d in graph[key].dependencies if d in graph)  # not: keys of futures
    own: dict = {}
    for key, output in owner.items():
        if output is not None:
            own.setdefault(output, set()).add(key)
    fused = {key: graph[key] for key, output in owner.items() if output is None}  # shared: computed once
    dependents: dict = {}
    for key in owner:
        for dep in graph[key].dependencies:
            dependents.setdefault(dep, set()).add(key)
    parts: dict = {}  # fused key -> the keys fused into it
    for output, keys in own.items():
        if len(_sources(graph, keys)) <= 1:
            fused[output] = _fuse(graph, keys, output)
            parts[output] = keys
            continue
        fused[output] = graph[output]
        # literals (e.g. a dataframe's shared arguments) do not join chains: each chain fuses a copy
        data = {k for k in keys if isinstance(graph[k], DataNode)}
        kept_data = data & graph[output].dependencies
        for chain in _connected(graph, keys - data - {output}):
            needs = {d for k in chain for d in graph[k].dependencies & data}
            sinks = [k for k in chain if not dependents.get(k, set()) & chain]  # they feed the output
            if len(sinks) == 1:
                fused[sinks[0]] = _fuse(graph, chain | needs, sinks[0])
                parts[sinks[0]] = chain | needs
            else:
                fused.update({k: graph[k] for k in chain})
                kept_data |= needs
        fused.update({k: graph[k] for k in kept_data})
    merged = {kind: dict(by_key) for kind, by_key in annotations.items()}
    for key, keys in parts.items():
        for kind, by_key in annotations.items():
            asked = [by_key[k] for k in sorted(keys, key=str) if k in by_key]
            if kind == "resources" and asked:
                merged[kind][key] = {r: max(a.get(r, 0) for a in asked) for a in asked for r in a}
            elif key not in by_key and asked:  # the fused key's own, else its parts' (in key order)
                merged[kind][key] = asked[0]
    return _annotated_graph(fused, merged)


def _annotated_graph(graph: dict, annotations: dict) -> HighLevelGraph:
    """``graph`` as a HighLevelGraph whose layers carry ``annotations`` ({kind: {key: value}}):
    one layer per distinct set of annotations."""
    groups: dict = {}
    for key in graph:
        signature = tuple(sorted((kind, repr(by_key[key])) for kind, by_key in annotations.items() if key in by_key))
        groups.setdefault(signature, []).append(key)
    layers, dependencies = {}, {}
    for i, keys in enumerate(groups.values()):
        name = f"fused-shard-chains-{i}"
        layer_annotations = {kind: by_key[keys[0]] for kind, by_key in annotations.items() if keys[0] in by_key}
        layers[name] = MaterializedLayer({k: graph[k] for k in keys}, annotations=layer_annotations or None)
        dependencies[name] = set()
    return HighLevelGraph(layers, dependencies)


def _fuse(graph: dict, keys: set, output):
    return Task.fuse(*(graph[k] for k in keys), key=output) if len(keys) > 1 else graph[output]


def _sources(graph: dict, keys: set) -> list:
    """The tasks of ``keys`` that no other task of ``keys`` runs before (data and aliases do not count)."""
    computes: dict = {}  # key -> whether a task of ``keys`` is it or runs before it

    def computed(key) -> bool:
        if key not in computes:
            computes[key] = False  # (no cycles in a graph; guards the recursion anyway)
            computes[key] = isinstance(graph[key], Task) or any(computed(d) for d in graph[key].dependencies & keys)
        return computes[key]

    return [k for k in keys if isinstance(graph[k], Task) and not any(computed(d) for d in graph[k].dependencies & keys)]


def _connected(graph: dict, keys: set) -> list[set]:
    """``keys`` split into the groups that dependencies among them connect."""
    parent = {k: k for k in keys}

    def root(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for key in keys:
        for dep in graph[key].dependencies & keys:
            parent[root(dep)] = root(key)
    groups: dict = {}
    for key in keys:
        groups.setdefault(root(key), set()).add(key)
    return list(groups.values())
