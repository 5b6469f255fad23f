"""make_report on real shards with known scores: the summary numbers, quantiles, throughput, the
curated output of a real to_webdataset run, the files and the figures (thresholds drawn)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.utils.stats import RUN_SUMMARY_NAME, summarize_stats
from nemo_curator.filtering import add_filter_column
from nemo_curator.report import (TAR_COLUMN, Threshold, default_thresholds, example_groups, load_scores, make_report,
                                 plot_image_grid, plot_score_histograms)
from nemo_curator.utils.file_utils import write_json_atomic
from nemo_curator.utils.sample_data import make_samples, write_shard

# Per row: aesthetic, nsfw, status. Rows 5 and 6 failed (NaN scores); row 7 has no sample in its tar.
AESTHETIC = [7.0, 6.5, 5.0, 6.2, 4.0, np.nan, np.nan, np.nan]
NSFW = [0.1, 0.7, 0.2, 0.3, 0.05, np.nan, np.nan, np.nan]
STATUS = ["ok"] * 5 + ["decode_failed", "decode_failed", "missing_image"]
KEPT_BY_DEFAULT = 2  # aesthetic > 6 and nsfw < 0.5: rows 0 and 3


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Two shards whose parquets hold known scores, with the run summary save_metadata writes."""
    folder = tmp_path_factory.mktemp("scored")
    samples = make_samples(7, 0, np.random.default_rng(0), sizes=[(64, 48)])
    rows = [dict(aesthetic_score=np.float32(a), nsfw_score=np.float32(n), image_status=s)
            for a, n, s in zip(AESTHETIC, NSFW, STATUS)]
    for sample, row in zip(samples, rows):
        sample.row.update(row)
    samples[5].members["jpg"] = b"not an image"
    write_shard(folder, "00000", samples[:4])
    write_shard(folder, "00001", samples[4:], extra_rows=[dict(key="000000007", caption="lost", url="u", **rows[7])])
    stats = [{"shard": "00000", "rows": 4, "embedded": 4, "embed_seconds": 2.0},
             {"shard": "00001", "rows": 4, "embedded": 1, "embed_seconds": 0.5}]
    write_json_atomic(summarize_stats(stats, seconds=2.0), folder / RUN_SUMMARY_NAME)
    return folder


def test_summary_counts_quantiles_and_throughput(scored):
    report = make_report(scored)
    s = report.summary
    assert (s["shards"], s["rows"]) == (2, 8)
    assert (s["images_ok"], s["images_decode_failed"], s["images_missing_image"]) == (5, 2, 1)
    assert (s["kept"], s["dropped"], s["dropped_failed_image"]) == (KEPT_BY_DEFAULT, 6, 3)
    assert s["filter"] == "aesthetic_score > 6 and nsfw_score < 0.5"
    assert s["images_per_second_per_worker"] == round(5 / 2.5, 2)
    assert s["images_per_second"] == round(5 / 2.0, 2)
    finite = np.array(AESTHETIC[:5])
    row = report.scores.loc["aesthetic_score"]
    assert row["count"] == 5 and row["min"] == 4.0 and row["max"] == 7.0
    assert row["p25"] == pytest.approx(np.quantile(finite, 0.25))
    assert row["p50"] == pytest.approx(np.median(finite))
    assert "kept" in report.text and "p95" in report.text
    assert set(report.frame[TAR_COLUMN].map(lambda p: p[-9:])) == {"00000.tar", "00001.tar"}


def test_thresholds_and_expression_choose_what_is_kept(scored):
    loose = make_report(scored, thresholds=default_thresholds(aesthetic=5.0, nsfw=0.5))
    assert loose.summary["kept"] == 2 and loose.summary["filter"] == "aesthetic_score > 5 and nsfw_score < 0.5"
    custom = make_report(scored, filter_expr="nsfw_score < 0.25 or caption == 'lost'")
    assert custom.summary["kept"] == 4  # nsfw 0.1, 0.2, 0.05 and the lost row
    with pytest.raises(KeyError, match="beauty"):
        make_report(scored, filter_expr="beauty > 1")


def test_files_are_written_and_the_histograms_mark_the_thresholds(scored, tmp_path):
    report = make_report(scored, tmp_path, title="a title")
    assert set(report.files) == {"markdown", "json", "histograms", "examples"}
    assert json.loads((tmp_path / "report.json").read_text())["summary"]["kept"] == KEPT_BY_DEFAULT
    assert "a title" in (tmp_path / "report.md").read_text()
    for name in ("report.png", "examples.png"):
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG" and png.width > 400 and png.height > 200

    fig = plot_score_histograms(report.frame, ["aesthetic_score", "nsfw_score"], default_thresholds())
    ax_aesthetic, ax_nsfw = fig.axes
    assert ax_aesthetic.lines[0].get_xdata()[0] == 6.0 and ax_nsfw.lines[0].get_xdata()[0] == 0.5
    assert ax_aesthetic.get_legend().get_texts()[0].get_text() == "keep aesthetic_score > 6: 3"
    assert ax_nsfw.get_legend().get_texts()[0].get_text() == "keep nsfw_score < 0.5: 4"
    assert "3 failed" in ax_aesthetic.get_title()


def test_image_grid_shows_failed_and_missing_images_as_tiles(scored):
    frame = load_scores(str(scored))
    frame["keep"] = frame.aesthetic_score > 6
    groups = example_groups(frame, 4)
    assert [len(g) for g in groups.values()] == [3, 4]
    assert list(groups)[1] == "dropped (5)" and groups["dropped (5)"].aesthetic_score.isna().sum() == 3
    fig = plot_image_grid(groups)
    tiles = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "decode_failed" in tiles and "missing_image" in tiles


def test_report_of_a_dataset_object_equals_the_report_of_its_folder(scored):
    from_folder = make_report(scored)
    from_dataset = make_report(ImageTextPairDataset.from_webdataset(str(scored), id_col="key"))
    assert from_dataset.summary == from_folder.summary
    assert from_dataset.scores.equals(from_folder.scores)


def test_curated_output_of_a_real_reshard_is_summarised(scored, tmp_path):
    expr = "aesthetic_score > 6 and nsfw_score < 0.5"
    dataset = add_filter_column(ImageTextPairDataset.from_webdataset(str(scored), id_col="key"), expr)
    dataset.to_webdataset(str(tmp_path / "curated"), filter_column="keep", samples_per_shard=1, show_progress=False)
    report = make_report(scored, curated=tmp_path / "curated", filter_expr=expr)
    assert report.summary["curated_samples"] == report.summary["kept"] == KEPT_BY_DEFAULT
    assert report.summary["curated_shards"] == KEPT_BY_DEFAULT
    with pytest.raises(FileNotFoundError, match="to_webdataset"):
        make_report(scored, curated=tmp_path / "nowhere")


def test_unscored_dataset_gives_counts_only(tmp_path):
    write_shard(tmp_path, "00000", make_samples(3, 0, np.random.default_rng(1), sizes=[(32, 32)]))
    report = make_report(tmp_path, tmp_path / "report")
    assert report.summary["rows"] == 3 and "kept" not in report.summary and report.scores.empty
    assert set(report.files) == {"markdown", "json"}


def test_threshold_condition_text():
    assert Threshold("aesthetic_score", 6.5, True).condition == "aesthetic_score > 6.5"
    assert Threshold("nsfw_score", 0.5, False).condition == "nsfw_score < 0.5"


# ----------------------------------------------------------------------------------------------
# An unknown column in the filter expression: the message lists the columns one can use
def _listed_columns(message: str) -> str:
    """The last ``[...]`` of the message: the columns it lists."""
    return message[message.rindex("["):]


def test_unknown_expression_column_lists_the_datasets_columns(scored):
    with pytest.raises(KeyError) as info:
        make_report(scored, filter_expr="beauty > 1")
    message = str(info.value)
    assert "beauty" in message
    listed = _listed_columns(message)
    for column in ("key", "caption", "url", "aesthetic_score", "nsfw_score", "image_status"):
        assert repr(column) in listed, message  # the parquet's columns, not only those the report reads
    assert TAR_COLUMN not in message  # the report's own bookkeeping column is no dataset column


def test_unknown_expression_column_of_a_dataset_object_lists_its_columns(scored):
    dataset = ImageTextPairDataset.from_webdataset(str(scored), id_col="key")
    with pytest.raises(KeyError) as info:
        make_report(dataset, filter_expr="beauty > 1 and caption == 'x'")
    listed = _listed_columns(str(info.value))
    assert "'beauty'" in str(info.value) and "'caption'" in listed and "'url'" in listed


def test_report_command_with_an_unknown_column_names_the_usable_columns(scored, tmp_path, capsys):
    from nemo_curator.scripts.cli import main

    assert main(["report", str(scored), "--output", str(tmp_path / "r"), "--expr", "beauty > 1"]) == 1
    err = capsys.readouterr().err
    assert "beauty" in err and "'caption'" in err and "'url'" in err


# ----------------------------------------------------------------------------------------------
# Histograms: the axis follows the data, so scores in a tiny range still show bars
def _bars_visible(ax, values) -> None:
    lo, hi = ax.get_xlim()
    (histogram,) = ax.containers  # the bars (not the shaded kept side)
    bars = [p for p in histogram.patches if p.get_height() > 0]
    assert sum(p.get_height() for p in bars) == len(values)
    assert lo <= min(values) and max(values) <= hi
    widest = max(p.get_width() for p in bars)
    assert widest / (hi - lo) > 1 / 200, (ax.get_xlim(), widest)  # wide enough to be drawn as a bar
    for p in bars:  # every bar inside the axis
        assert lo <= p.get_x() and p.get_x() + p.get_width() <= hi


def _frame(nsfw) -> "pd.DataFrame":
    import pandas as pd

    return pd.DataFrame({"nsfw_score": np.asarray(nsfw, dtype=np.float32)})


def test_nsfw_scores_in_a_tiny_range_show_bars_and_the_threshold(tmp_path):
    nsfw = np.linspace(0.0001, 0.0003, 50)
    fig = plot_score_histograms(_frame(nsfw), ["nsfw_score"], default_thresholds())
    (ax,) = fig.axes
    _bars_visible(ax, nsfw)
    assert ax.get_xlim()[1] - ax.get_xlim()[0] < 0.01  # the axis is the data's, not [0, 0.5]
    assert ax.lines[0].get_xdata()[0] == 0.5  # the threshold is still drawn (off the axis) ...
    assert ax.get_legend().get_texts()[0].get_text() == "keep nsfw_score < 0.5: 50"  # ... and named
    notes = [t.get_text() for t in ax.texts]
    assert any("0.5" in t for t in notes), notes  # and where it lies is written on the axis
    fig.savefig(tmp_path / "h.png")


def test_equal_scores_get_a_padded_axis(tmp_path):
    for value in (0.0, 0.25, 7.0):
        fig = plot_score_histograms(_frame([value] * 10), ["nsfw_score"])
        (ax,) = fig.axes
        _bars_visible(ax, [value] * 10)
        lo, hi = ax.get_xlim()
        assert lo < value < hi and hi - lo <= 0.2 * max(1.0, abs(value))  # padded, yet the data's scale
        fig.savefig(tmp_path / "h.png")


def test_a_threshold_near_the_data_widens_the_axis_to_show_it():
    nsfw = np.linspace(0.2, 0.45, 30)  # threshold 0.5 is just above the data
    fig = plot_score_histograms(_frame(nsfw), ["nsfw_score"], default_thresholds())
    (ax,) = fig.axes
    _bars_visible(ax, nsfw)
    lo, hi = ax.get_xlim()
    assert lo < 0.2 and 0.5 < hi < 0.6  # the cut is on the axis
    assert ax.get_legend().get_texts()[0].get_text() == "keep nsfw_score < 0.5: 30"


def test_histogram_of_no_finite_score_still_draws():
    fig = plot_score_histograms(_frame([np.nan, np.nan]), ["nsfw_score"], default_thresholds())
    assert "2 failed" in fig.axes[0].get_title()


def test_a_parquet_that_is_not_parquet_is_named_by_the_report(tmp_path):
    from nemo_curator.utils.sample_data import make_sample_dataset

    make_sample_dataset(tmp_path / "d", n_shards=2, samples_per_shard=2, sizes=[(16, 16)])
    (tmp_path / "d" / "00001.parquet").write_bytes(b"garbage" * 20)
    with pytest.raises(ValueError, match=r"00001\.parquet is not a readable parquet file"):
        make_report(str(tmp_path / "d"))
