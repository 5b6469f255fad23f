"""Per-shard stats records, their merge across pipeline steps and the run summary."""
from __future__ import annotations

import pandas as pd

from nemo_curator.utils.stats import (EmbedStats, MetadataShardStats, ReshardShardStats, merge_stats, status_counts,
                                      summarize_stats)


def test_records_flatten_to_the_stats_file_form():
    embed = EmbedStats(tar="a.tar", samples_in=3, embedded=2, decode_failed=1, missing_image=0, extra_in_tar=0,
                       embed_seconds=0.5, images_per_second=4.0)
    assert embed.to_dict() == {"tar": "a.tar", "samples_in": 3, "embedded": 2, "decode_failed": 1, "missing_image": 0,
                               "extra_in_tar": 0, "embed_seconds": 0.5, "images_per_second": 4.0}  # no first_error
    frame = pd.DataFrame({"image_status": ["ok", "decode_failed", "missing_image", "ok"]})
    written = MetadataShardStats(shard="00000", rows=4, write_seconds=0.1, status_counts=status_counts(frame))
    assert written.to_dict() == {"shard": "00000", "rows": 4, "write_seconds": 0.1, "decode_failed": 1, "missing_image": 1}
    assert ReshardShardStats(shard="00001").to_dict()["samples_written"] == 0
    assert status_counts(pd.DataFrame({"x": [1]})) == {}


def test_stored_stats_keep_only_the_embedders_fields():
    stored = {"embedded": 4, "embed_seconds": 0.25, "rows": 4, "write_seconds": 0.1, "samples_written": 9}
    assert EmbedStats.from_dict(stored).to_dict() == {"embedded": 4, "embed_seconds": 0.25}
    assert EmbedStats.from_dict({"rows": 4}) is None and EmbedStats.from_dict(None) is None


def test_a_later_step_replaces_counts_and_adds_seconds():
    first = EmbedStats(embedded=2, embed_seconds=1.0)
    merged = merge_stats(merge_stats(None, first), {"embedded": 3, "embed_seconds": 0.5, "note": "x"})
    assert merged == {"embedded": 3, "embed_seconds": 1.5, "note": "x"}


def test_summary_sums_counters_and_leaves_rates_and_markers_out():
    shards = [{"rows": 2, "embed_seconds": 0.12345, "images_per_second": 9.0, "resume": {"job": "j"}, "tar": "a"},
              {"rows": 3, "embed_seconds": 0.1, "ok": True}]
    summary = summarize_stats(shards, seconds=1.23456, skipped=1, operation="save_metadata")
    assert summary["totals"] == {"rows": 5, "embed_seconds": 0.2235}
    assert summary["shards_total"] == 2 and summary["shards_written"] == 1 and summary["shards_skipped"] == 1
    assert summary["seconds"] == 1.235 and "resume" not in summary["shards"][0] and summary["operation"] == "save_metadata"
