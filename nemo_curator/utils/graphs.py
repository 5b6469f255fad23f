"""Dask graphs of one task (or a few) per shard, built and merged in time linear in the shards.

Dask merges the graphs of many Delayed objects (``dask.compute``, ``Client.compute``, and
``dd.from_delayed`` when its result is turned back into Delayed objects) into one HighLevelGraph
and culls it layer by layer, each layer against every key still needed: O(layers x keys). Every
``dask.delayed(f)(...)`` call makes a layer of its own, so a job of one task per shard cost the
client O(shards²): 2.5 minutes to submit 10,000 shards, hours for 100,000
(``benchmarks/bench_client_scale.py``). The two helpers here do the same merge and cull in one
pass over the tasks.
"""
from __future__ import annotations

from typing import Any, Sequence

import dask
from dask._task_spec import convert_legacy_graph, cull
from dask.core import flatten
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

try:
    from dask._expr import _AnnotationsTombstone
except ImportError:  # another Dask version: no tombstones
    class _AnnotationsTombstone:  # type: ignore[no-redef]
        pass


def _layers(collections: Sequence[Any]) -> dict:
    """The layers of the collections' graphs, each once (by name, as ``HighLevelGraph.merge`` does)."""
    layers: dict = {}
    for collection in collections:
        graph = collection.__dask_graph__()
        if isinstance(graph, HighLevelGraph):
            for name, layer in graph.layers.items():
                layers.setdefault(name, layer)
        else:
            layers.setdefault(id(graph), graph)
    return layers


def merged_graph(collections: Sequence[Any]) -> tuple[dict, dict]:
    """``(graph, annotations)``: the tasks that ``collections`` (Delayed objects) need, as one dict
    of task-spec nodes, and the annotations of their layers (``dask.annotate``) as
    ``{kind: {key: value}}``. The same as ``dask.base.collections_to_expr(collections).optimize()``
    gives as ``__dask_graph__()`` and ``__dask_annotations__()`` (Delayed objects are optimized by
    culling only), in one pass over the tasks instead of one per layer."""
    layers = _layers(collections)
    flat: dict = {}
    for layer in layers.values():
        flat.update(layer)
    keys = list(flatten([collection.__dask_keys__() for collection in collections]))
    graph = cull(convert_legacy_graph(flat), keys)
    annotations: dict = {}
    for layer in layers.values():
        for kind, value in (getattr(layer, "annotations", None) or {}).items():
            by_key = annotations.setdefault(kind, {})
            for key in layer:
                if key in graph:
                    got = value(key) if callable(value) else value
                    if not isinstance(got, _AnnotationsTombstone):  # Dask's "not annotated"
                        by_key[key] = got
    return graph, {kind: by_key for kind, by_key in annotations.items() if by_key}


def share_one_layer(delayeds: Sequence[Delayed], name: str) -> list[Delayed]:
    """The same Delayed objects (same keys, same tasks) over one shared graph of one layer, so
    that Dask's layer-by-layer cull of a collection made of them (``dd.from_delayed``, then
    ``to_delayed``, ``compute``) costs O(tasks) instead of O(tasks x objects). Objects whose
    graphs carry annotations are returned as they are (one layer would merge them)."""
    delayeds = list(delayeds)
    layers = _layers(delayeds)
    if not delayeds or any(getattr(layer, "annotations", None) for layer in layers.values()):
        return delayeds
    flat: dict = {}
    for layer in layers.values():
        flat.update(layer)
    name = f"{name}-{dask.base.tokenize(*[d.key for d in delayeds])}"
    graph = HighLevelGraph({name: MaterializedLayer(flat)}, {name: set()})
    return [Delayed(d.key, graph, layer=name) for d in delayeds]

