"""Compute Dask collections with a progress bar a person can see (terminal and Jupyter)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import dask
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def _current_client():
    try:
        from distributed import get_client as _get_client

        return _get_client()
    except (ImportError, ValueError):
        return None


def compute_with_progress(tasks: Sequence[Any], desc: str, unit: str = "shard", show: bool = True) -> list[Any]:
    """Compute ``tasks`` (Delayed objects or collections) and return their results in order.

    With a ``distributed`` client the tasks run on the cluster and a tqdm bar advances as each
    finishes; without one they run on the local threaded scheduler. An error in any task is raised
    here (after the others were cancelled).
    """
    tasks = list(tasks)
    if not tasks:
        return []
    client = _current_client()
    if client is None:
        with tqdm(total=len(tasks), desc=desc, unit=unit, disable=not show) as bar:
            results = dask.compute(*tasks)
            bar.update(len(tasks))
        return list(results)
    from distributed import as_completed

    futures = client.compute(tasks)
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    try:
        with tqdm(total=len(futures), desc=desc, unit=unit, disable=not show) as bar:
            for future in as_completed(futures):
                results[index[future.key]] = future.result()
                bar.update(1)
    except BaseException:
        client.cancel(futures)
        raise
    return results
