"""Per-shard statistics as typed records, and the run summary: the one place stats are written from.

Each per-shard job records a dataclass for every shard it completes; ``to_dict`` gives the flat
JSON object stored as ``NNNNN.stats.json`` (with the resume record, see ``utils.resume``), and
``summarize_stats`` adds a run's shards up into ``_run_summary.json``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from nemo_curator.utils.constants import DECODE_FAILED, MISSING_IMAGE, STATUS_COLUMN
from nemo_curator.utils.resume import RESUME_KEY

RUN_SUMMARY_NAME = "_run_summary.json"  # beside the shards of every per-shard job's output folder


def _flat(record) -> dict:
    """A record as a flat dict: ``status_counts`` merged in, ``None`` values left out."""
    out = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name == "status_counts":
            out.update(value)
        elif value is not None:
            out[f.name] = value
    return out


@dataclass
class EmbedStats:
    """What an embedder records for one shard (counts of rows; seconds of worker time).

    A field that a step did not record is None and is left out of the stats file."""

    tar: str | None = None
    samples_in: int | None = None  # metadata rows of the shard
    embedded: int | None = None  # rows with an embedding
    decode_failed: int | None = None
    missing_image: int | None = None
    extra_in_tar: int | None = None  # samples of the tar without a metadata row (skipped)
    embed_seconds: float | None = None
    images_per_second: float | None = None
    first_error: str | None = None  # the first decode error, at most 500 characters
    # the task on its worker (``*_at``: epoch seconds, left out of the run's totals): when it started,
    # and its turns on the device (utils.device.device_turn): seconds waited for them (another
    # thread's shard computing), when the first began and the last ended (None: nothing decoded)
    started_at: float | None = None
    device_wait_seconds: float | None = None
    device_turn_at: float | None = None
    device_released_at: float | None = None

    @classmethod
    def from_dict(cls, stats: Mapping[str, Any] | None) -> "EmbedStats | None":
        """The embedder's fields of a stats dict (e.g. a stored ``NNNNN.stats.json``); None when it
        has no embedding count."""
        if not stats or "embedded" not in stats:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in stats.items() if k in names})

    def to_dict(self) -> dict:
        return _flat(self)


@dataclass
class MetadataShardStats:
    """``save_metadata``: one shard's parquet written (the stats of the steps that made its rows,
    e.g. ``EmbedStats``, are stored beside these in the same file)."""

    shard: str
    rows: int
    write_seconds: float
    status_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _flat(self)


@dataclass
class ReshardShardStats:
    """``to_webdataset``: one output shard (its samples, members and bytes) and the input pieces it took."""

    shard: str
    samples_in: int = 0  # kept rows assigned to this output shard
    samples_written: int = 0
    missing_sample: int = 0  # kept rows whose sample is not in their tar (skipped)
    duplicate_keys: int = 0  # keys that appear again later in an input tar (first group used)
    members_written: int = 0
    json_rewritten: int = 0
    json_unreadable: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    inputs: list[dict] = field(default_factory=list)  # {"tar", "start", "stop"} per piece
    status_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _flat(self)


def merge_stats(previous: Mapping[str, Any] | None, new) -> dict:
    """A shard's stats after one more pipeline step: ``new`` (a record or a dict) over ``previous``,
    values replaced except ``*seconds``, which add up."""
    new = new.to_dict() if dataclasses.is_dataclass(new) else dict(new or {})
    merged = dict(previous or {})
    for key, value in new.items():
        if key.endswith("seconds") and isinstance(value, (int, float)) and isinstance(merged.get(key), (int, float)):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged


def status_counts(frame) -> dict[str, int]:
    """``{"decode_failed": n, "missing_image": n}`` from the ``image_status`` column ({} without it)."""
    if STATUS_COLUMN not in frame.columns:
        return {}
    status = frame[STATUS_COLUMN]
    return {s: int((status == s).sum()) for s in (DECODE_FAILED, MISSING_IMAGE)}


def summarize_stats(shard_stats: Sequence[dict], seconds: float, skipped: int = 0, **extra) -> dict:
    """The run summary: numeric per-shard counters summed under ``totals`` (rates ``*_per_second``,
    epoch times ``*_at``, strings and resume records left out), ``shards_written`` (computed now), ``shards_skipped``
    (already complete, their stored stats included) and each shard's stats under ``shards``.
    ``extra`` keys are added as they are; ``seconds`` is this run's wall time.
    """
    totals: dict[str, float] = {}
    for stats in shard_stats:
        for key, value in stats.items():
            if (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and not key.endswith(("_per_second", "_at"))):
                totals[key] = totals.get(key, 0) + value
    for key in [k for k in totals if k.endswith("seconds")]:
        totals[key] = round(totals[key], 4)
    return {**extra, "shards_total": len(shard_stats), "shards_written": len(shard_stats) - skipped,
            "shards_skipped": skipped, "seconds": round(seconds, 3), "totals": totals,
            "shards": [{k: v for k, v in stats.items() if k != RESUME_KEY} for stats in shard_stats]}
