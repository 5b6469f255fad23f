"""The resumable per-shard job: the one loop that every operation writing shards runs.

A job is a list of ``ShardWork`` (one per output shard) and a fingerprint (``utils.resume``).
``run_shard_job`` skips the shards this same job already completed, removes the temporaries a
killed run left for the others, computes their tasks on the Dask cluster with a progress bar,
writes the run summary ``_run_summary.json`` and returns it. On the worker, a task writes its
output files (each atomically) and then calls ``commit_shard``, which writes the stats file with
the completion marker LAST: a shard is complete exactly when its marker matches.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from nemo_curator.utils.file_utils import remove_stale_temporaries, stale_temporaries, write_json_atomic
from nemo_curator.utils.progress import compute_with_progress
from nemo_curator.utils.resume import RESUME_KEY, completed_stats, make_record
from nemo_curator.utils.stats import RUN_SUMMARY_NAME, summarize_stats

logger = logging.getLogger(__name__)


@dataclass
class ShardWork:
    """One output shard of a job.

    Args:
        name: the shard's name, for messages.
        stats_path: its ``NNNNN.stats.json``, written last (the completion marker).
        inputs: identities of the files it is made from (``utils.resume.identities``), taken now.
        outputs: the paths its task writes (their stale temporaries are removed before it runs).
        make_task: builds the Dask task (Delayed) that writes the shard and returns its stats dict
            (from ``commit_shard``); called only for shards that are not complete.
    """

    name: str
    stats_path: str
    inputs: Mapping[str, dict | None]
    outputs: Sequence[str]
    make_task: Callable[[], Any]


def run_shard_job(works: Sequence[ShardWork], job: str, folder: str, operation: str, resume: bool = True,
                  show_progress: bool = True, planned_extra: Callable[[], dict] | None = None,
                  started: float | None = None, **summary_extra) -> dict:
    """Run the shards of ``works`` that this ``job`` has not completed; return the run summary.

    The summary (``utils.stats.summarize_stats`` with ``operation``, ``path=folder``,
    ``summary_extra`` and what ``planned_extra()`` returns once the tasks are built) covers every
    shard, skipped ones with their stored stats, and is written to ``<folder>/_run_summary.json``;
    its ``seconds`` count from ``started`` (default: now; give the time planning began). An error in a task is raised here; shards completed
    before it keep their markers, so a rerun goes on from there.
    """
    started = time.time() if started is None else started
    results: list[dict | None] = [None] * len(works)
    tasks, todo = [], []
    temporaries = stale_temporaries(folder)  # one scan of the folder, not one per shard
    for i, work in enumerate(works):
        done = completed_stats(work.stats_path, job, work.inputs) if resume else None
        if done is not None:
            results[i] = done
            continue
        remove_stale_temporaries(folder, [os.path.basename(p) for p in (*work.outputs, work.stats_path)], temporaries)
        tasks.append(work.make_task())
        todo.append(i)
    if todo and len(todo) < len(works):
        logger.info("%s: %d of %d shards already written by this job, skipped", operation, len(works) - len(todo),
                    len(works))
    if planned_extra is not None:
        summary_extra.update(planned_extra())
    for i, result in zip(todo, compute_with_progress(tasks, desc=operation, show=show_progress)):
        results[i] = result
    summary = summarize_stats(results, seconds=time.time() - started, skipped=len(works) - len(todo),
                              operation=operation, path=folder, **summary_extra)
    write_summary(summary, folder)
    logger.info("%s: %s", operation, {k: v for k, v in summary.items() if k not in ("shards", "inputs")})
    return summary


def write_summary(summary: dict, folder: str) -> None:
    """Write a run summary as ``<folder>/_run_summary.json`` (atomically)."""
    write_json_atomic(summary, os.path.join(folder, RUN_SUMMARY_NAME))


def commit_shard(stats: dict, stats_path: str, job: str, inputs: Mapping[str, dict | None],
                 outputs: Sequence[str]) -> dict:
    """On the worker, after the shard's ``outputs`` are written: write ``stats`` with the
    completion marker to ``stats_path`` (last, atomically); return the stats as written."""
    stats = {**stats, RESUME_KEY: make_record(job, inputs, outputs)}
    # not fsynced: the outputs are (atomic_write), and a marker lost in a crash only redoes the shard
    write_json_atomic(stats, stats_path, durable=False)
    return stats
