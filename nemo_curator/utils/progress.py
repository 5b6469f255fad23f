"""Compute Dask collections with a progress bar a person can see (terminal and Jupyter)."""
from __future__ import annotations

import collections
import logging
import time
from typing import Any, NamedTuple, Sequence

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
    needs fused into it (``fuse_shard_chains``), small self-contained ones several to a Dask task
    (``group_outputs``), the graph sent in chunks as the cluster needs work
    (``submission_chunks``), and a tqdm bar advances as they finish; without one they run on the
    local threaded scheduler. An error in any task is raised here (after the others were cancelled).
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
    return _compute_on_cluster(client, tasks, desc, unit, show)


# the finished tasks' results are fetched from the workers at most this often (s), or at once
# after an error: a gather per result cost each worker ~0.6 ms of its event loop per task
GATHER_SECONDS = 0.5
# the graph goes to the scheduler in chunks of tasks: the first small (the workers start after
# its update, not after the whole graph's: 30 s at 100,000 shards), the next ones when fewer than
# max(SUBMIT_CHUNK, 4 x the cluster's threads) tasks are still to run (the scheduler holds what
# is submitted, not the whole job; 128 tasks of 16 shards of ~4 KB: under Dask's 10 MB
# "large graph" warning)
SUBMIT_FIRST = 64
SUBMIT_CHUNK = 128
# small outputs (shards) run up to SHARDS_PER_TASK to a task, as long as the cluster still gets
# TASKS_PER_THREAD tasks per thread: a task costs Dask ~7 ms of worker, scheduler and client
# time, a 2-image shard's own work ~7 ms (benchmark 6)
SHARDS_PER_TASK = 16
TASKS_PER_THREAD = 8


def _compute_on_cluster(client, tasks: list[Delayed], desc: str, unit: str, show: bool) -> list[Any]:
    from distributed import as_completed

    keys = [task.key for task in tasks]
    distinct = list(dict.fromkeys(keys))  # a task passed twice is computed once
    threads = sum(client.nthreads().values())
    per_task = max(1, min(SHARDS_PER_TASK, len(distinct) // (TASKS_PER_THREAD * max(threads, 1))))
    graph, units = group_outputs(fuse_shard_chains(tasks), distinct, per_task)
    chunks = collections.deque(submission_chunks(graph, list(units), SUBMIT_FIRST, SUBMIT_CHUNK))
    low_water, counted_at = max(SUBMIT_CHUNK, 4 * threads), time.monotonic()
    places: dict = {}  # output key -> its places in ``keys``
    for i, key in enumerate(keys):
        places.setdefault(key, []).append(i)
    results: list[Any] = [None] * len(keys)
    running: dict = {}  # task key -> its future, until its result is here
    held: dict = {}  # key -> the future of a task that chunks not yet submitted need (it stays in memory)
    finished: list = []  # finished output futures not gathered yet
    completed = as_completed()

    def submit_while_short():
        nonlocal low_water, counted_at
        if chunks and time.monotonic() - counted_at > 10:  # the workers that joined since (a cluster starting up)
            low_water, counted_at = max(SUBMIT_CHUNK, 4 * sum(client.nthreads().values())), time.monotonic()
        while chunks and len(running) - len(finished) < low_water:
            chunk = chunks.popleft()  # its graph is let go once sent
            futures = []
            try:
                futures = client.get(chunk.graph, chunk.outputs + chunk.held, sync=False)  # a HighLevelGraph: keeps annotations
            finally:  # (an interrupt just after the submission: the futures are cancelled with the others)
                running.update(zip(chunk.outputs, futures))
                held.update(zip(chunk.held, futures[len(chunk.outputs):]))
            completed.update(futures[:len(chunk.outputs)])
            for key in chunk.releases:  # the scheduler keeps it for the submitted tasks that need it
                del held[key]

    try:
        with tqdm(total=len(distinct), desc=desc, unit=unit, disable=not show) as bar:
            submit_while_short()
            gathered_at = time.monotonic()
            for batch in completed.batches():
                finished += batch
                bar.update(sum(len(units[future.key]) for future in batch))
                submit_while_short()
                if (time.monotonic() - gathered_at >= GATHER_SECONDS or len(finished) == len(running)
                        or any(future.status in ("error", "cancelled") for future in batch)):
                    for future, result in zip(finished, client.gather(finished)):
                        members = units[future.key]
                        for key, value in zip(members, result if len(members) > 1 else [result]):
                            for i in places[key]:
                                results[i] = value
                        del running[future.key]  # the scheduler forgets it (unless held)
                    finished, gathered_at = [], time.monotonic()
    except BaseException:
        client.cancel(list(running.values()) + list(held.values()))
        raise
    return results


def group_outputs(graph: HighLevelGraph, outputs: Sequence, size: int) -> tuple[HighLevelGraph, dict]:
    """``graph`` with consecutive ``outputs`` run ``size`` to a task, and ``{task key: [the output
    keys it returns, in order]}`` (a group task returns their results as a tuple).

    Only a self-contained output is grouped: a task that nothing else needs, whose dependencies
    other outputs need too (computed once, before); and only with outputs annotated alike
    (resources, retries, workers: the group has their annotations). A group runs its members one
    after the other and keeps only their results (a shard's partition is let go when its write
    returns).
    """
    if size <= 1:
        return graph, {key: [key] for key in outputs}
    nodes = {key: node for layer in graph.layers.values() for key, node in layer.items()}
    annotations = {key: layer.annotations for layer in graph.layers.values() for key in layer}
    dependents: dict = {}
    for node in nodes.values():
        for dep in node.dependencies:
            dependents[dep] = dependents.get(dep, 0) + 1

    def self_contained(key) -> bool:
        node = nodes.get(key)
        return (isinstance(node, Task) and not dependents.get(key)
                and all(dependents.get(dep, 0) > 1 for dep in node.dependencies))

    units: dict = {}
    members: list = []

    def close():
        if len(members) > 1:
            units[f"shard-group-{dask.base.tokenize(*members)}"] = list(members)
        elif members:
            units[members[0]] = list(members)
        members.clear()

    for key in outputs:
        if self_contained(key):
            if members and _signature(annotations[key]) != _signature(annotations[members[0]]):
                close()
            members.append(key)
            if len(members) == size:
                close()
        else:
            close()
            units[key] = [key]
    close()
    grouped = {key: node for key, node in nodes.items() if key not in units or units[key] == [key]}
    for unit, keys in units.items():
        if len(keys) > 1:
            for key in keys:
                del grouped[key]
            grouped[unit] = Task(unit, _results, *(nodes[key] for key in keys))
            annotations[unit] = annotations[keys[0]]
    by_kind: dict = {}
    for key in grouped:
        for kind, value in (annotations.get(key) or {}).items():
            by_kind.setdefault(kind, {})[key] = value
    return _annotated_graph(grouped, by_kind), units


def _results(*results):
    """A group task's value: its members' results, in order."""
    return results


class SubmissionChunk(NamedTuple):
    graph: HighLevelGraph  # the tasks that no earlier chunk has (the layers' annotations kept)
    outputs: list  # the output keys it computes, in the order asked for
    held: list  # its keys that later chunks need: asked for, so that they stay in memory
    releases: list  # earlier chunks' held keys that no chunk after this one needs


def submission_chunks(graph: HighLevelGraph, outputs: Sequence, first: int, size: int) -> list[SubmissionChunk]:
    """``graph`` split for submission in the order of ``outputs``: the first ``first`` outputs,
    then ``size`` at a time, each chunk with the tasks no earlier chunk has. A task of an earlier
    chunk that a later one needs is asked for by the earlier one (computed once, kept in memory).
    O(tasks + dependencies)."""
    layer_of = {key: name for name, layer in graph.layers.items() for key in layer}
    bounds = sorted({0, *range(min(first, len(outputs)), len(outputs), size), len(outputs)})
    chunk_of: dict = {}
    members: list[list] = []  # per chunk: its keys
    asked: list[dict] = []  # per chunk: {key: None} of the outputs it computes (ordered)
    held: list[dict] = []  # per chunk: {key: None} of its keys that later chunks need
    last_needed: dict = {}  # held key -> the last chunk that needs it
    for lo, hi in zip(bounds, bounds[1:]):
        c = len(members)
        members.append([]), asked.append({}), held.append({})
        for output in outputs[lo:hi]:
            owner = chunk_of.get(output)
            if owner is not None:  # computed by an earlier chunk, as another output's dependency
                asked[owner][output] = None
                continue
            stack = [output]
            chunk_of[output] = c
            while stack:
                key = stack.pop()
                members[c].append(key)
                for dep in graph.layers[layer_of[key]][key].dependencies:
                    if dep not in layer_of:  # the key of a future
                        continue
                    owner = chunk_of.get(dep)
                    if owner is None:
                        chunk_of[dep] = c
                        stack.append(dep)
                    elif owner < c:  # (an output too: its future is let go once its result is here)
                        held[owner][dep] = None
                        last_needed[dep] = c
            asked[c][output] = None
    releases: list[list] = [[] for _ in members]
    for key, c in last_needed.items():
        releases[c].append(key)
    chunks = []
    for keys, outs, kept, released in zip(members, asked, held, releases):
        by_layer: dict = {}
        for key in keys:
            by_layer.setdefault(layer_of[key], {})[key] = graph.layers[layer_of[key]][key]
        layers = {name: MaterializedLayer(tasks, annotations=graph.layers[name].annotations)
                  for name, tasks in by_layer.items()}
        chunks.append(SubmissionChunk(HighLevelGraph(layers, {name: set() for name in layers}), list(outs), list(kept), released))
    return chunks


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
        groups.setdefault(_signature({kind: by_key[key] for kind, by_key in annotations.items() if key in by_key}),
                          []).append(key)
    layers, dependencies = {}, {}
    for i, keys in enumerate(groups.values()):
        name = f"fused-shard-chains-{i}"
        layer_annotations = {kind: by_key[keys[0]] for kind, by_key in annotations.items() if keys[0] in by_key}
        layers[name] = MaterializedLayer({k: graph[k] for k in keys}, annotations=layer_annotations or None)
        dependencies[name] = set()
    return HighLevelGraph(layers, dependencies)


def _signature(annotations: dict | None) -> tuple:
    """A task's annotations ({kind: value}) as a comparable value: tasks annotated alike share a
    layer (``_annotated_graph``) and may share a group task (``group_outputs``)."""
    return tuple(sorted((kind, repr(value)) for kind, value in (annotations or {}).items()))


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
