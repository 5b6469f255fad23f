"""The curation report: a summary table and histograms of the scores, from Python or the CLI.

``make_report(source, output_dir)`` reads the scored metadata of a dataset (a folder written by
``save_metadata``, or an ``ImageTextPairDataset``), its run statistics and optionally the summary
of the curated output (``to_webdataset``), and returns a :class:`Report`; with ``output_dir`` it
also writes ``report.md``, ``report.json``, ``report.png`` (histograms of ``aesthetic_score``
and ``nsfw_score`` with the thresholds marked) and ``examples.png`` (kept and dropped images).
Only the columns it needs are read (never the embeddings).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from nemo_curator.filtering import evaluate_filter, expression_columns
from nemo_curator.utils.constants import (AESTHETIC_COLUMN, DEFAULT_AESTHETIC_THRESHOLD, DEFAULT_NSFW_THRESHOLD,
                                          DEFAULT_ID_COL, KEEP_COLUMN, NSFW_COLUMN, OK, STATUS_COLUMN, STATUSES)
from nemo_curator.utils.file_utils import atomic_write, read_parquet_schema, read_parquet_table, write_json_atomic
from nemo_curator.utils.frames import to_pandas
from nemo_curator.utils.resume import read_json
from nemo_curator.utils.stats import RUN_SUMMARY_NAME
from nemo_curator.utils.webdataset import (DEFAULT_IMAGE_EXTENSIONS, find_shards, iter_tar_samples, pick_image_member,
                                           read_member_bytes)

TAR_COLUMN = "_tar"  # added by load_scores: the shard each row comes from
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class Threshold:
    """A score column and the cut a row must pass to be kept: ``> value`` (``keep_above``) or ``< value``."""

    column: str
    value: float
    keep_above: bool

    @property
    def condition(self) -> str:
        return f"{self.column} {'>' if self.keep_above else '<'} {self.value:g}"


def default_thresholds(aesthetic: float = DEFAULT_AESTHETIC_THRESHOLD, nsfw: float = DEFAULT_NSFW_THRESHOLD) -> list[Threshold]:
    """Keep ``aesthetic_score > aesthetic`` (AVA 1-10 scale; 5, 6, 6.5 are common) and ``nsfw_score < nsfw`` (0-1)."""
    return [Threshold(AESTHETIC_COLUMN, float(aesthetic), True), Threshold(NSFW_COLUMN, float(nsfw), False)]


def quantile_thresholds(dataset, quantiles: Mapping[str, float]) -> list[Threshold]:
    """The default cuts moved to quantiles of the dataset's own scores (``{column: q}``), so that a
    filter keeps some rows and drops others whatever the scale (smoke runs with random heads).
    Computes only the score columns."""
    scores = to_pandas(dataset.metadata[list(quantiles)].compute())
    cuts = []
    for t in default_thresholds():
        values = scores[t.column].dropna().to_numpy(dtype=np.float64)
        value = float(np.quantile(values, quantiles[t.column])) if len(values) else t.value
        cuts.append(Threshold(t.column, float(f"{value:.6g}"), t.keep_above))
    return cuts


def thresholds_expression(thresholds: Sequence[Threshold]) -> str:
    """The filter expression of ``thresholds``: ``"aesthetic_score > 6 and nsfw_score < 0.5"``."""
    return " and ".join(t.condition for t in thresholds)


@dataclass
class Report:
    """What ``make_report`` found.

    - ``summary``: flat numbers (rows, image statuses, kept/dropped, throughput, curated output).
    - ``scores``: one row per score column: count, mean, min, p5, p25, p50, p75, p95, max.
    - ``frame``: the rows read (id, status, scores, ``keep``, ``_tar``), for plots of your own.
    - ``files``: ``{"markdown", "json", "histograms", "examples"}`` paths written (when ``output_dir``).
    """

    summary: dict
    scores: pd.DataFrame
    frame: pd.DataFrame
    text: str
    files: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


# ----------------------------------------------------------------------------------------------
def make_report(source, output_dir: str | os.PathLike | None = None, *, curated: str | os.PathLike | None = None,
                filter_expr: str | None = None, thresholds: Sequence[Threshold] | None = None, id_col: str = DEFAULT_ID_COL,
                title: str | None = None, examples: int = 6) -> Report:
    """Summarise a scored dataset; with ``output_dir``, write the report files there.

    Args:
        source: a dataset folder (parquets written by ``save_metadata``) or an ``ImageTextPairDataset``
            (the needed columns of its metadata are computed: after ``save_metadata`` that reads the
            saved parquets; a dataset whose embedding has not run yet would run it).
        output_dir: where ``report.md``, ``report.json``, ``report.png`` and ``examples.png`` go.
        curated: the folder written by ``to_webdataset``: its ``_run_summary.json`` adds the
            output shards, samples written and resharding throughput.
        filter_expr: the keep condition (see ``nemo_curator.filtering``); default: the thresholds'.
        thresholds: the cuts drawn on the histograms (default aesthetic > 6, NSFW < 0.5).
        id_col: the id column (for a folder; a dataset knows its own).
        title: a line printed above the table and on the figures (e.g. a smoke-mode warning).
        examples: images per row of ``examples.png`` (0: none).
    """
    thresholds = list(default_thresholds() if thresholds is None else thresholds)
    id_col = getattr(source, "id_col", id_col)
    frame = load_scores(source, extra_columns=expression_columns(filter_expr) if filter_expr else (), id_col=id_col)
    present = [t for t in thresholds if t.column in frame.columns]
    expr = filter_expr or (thresholds_expression(present) if present else None)
    if expr is not None:
        frame["keep"] = evaluate_filter(frame, expr).to_numpy()
    folder = os.fspath(source) if isinstance(source, (str, os.PathLike)) else source.path
    summary = {"dataset": os.path.abspath(folder), "shards": int(frame[TAR_COLUMN].nunique()), "rows": len(frame),
               **_status_summary(frame), **_keep_summary(frame, expr),
               **_throughput(read_json(os.path.join(folder, RUN_SUMMARY_NAME)))}
    if curated is not None:
        summary.update(_curated_summary(curated))
    scores = score_quantiles(frame, [c for c in (AESTHETIC_COLUMN, NSFW_COLUMN) if c in frame.columns])
    text = format_report(summary, scores, title)
    report = Report(summary=summary, scores=scores, frame=frame, text=text)
    if output_dir is not None:
        report.files = _write_files(report, os.fspath(output_dir), present, id_col, title, examples)
    return report


def load_scores(source, extra_columns: Sequence[str] = (), id_col: str = DEFAULT_ID_COL) -> pd.DataFrame:
    """The rows of a dataset with only the columns a report needs, plus ``_tar`` (the row's shard).

    Columns read when present: ``id_col``, ``image_status``, ``aesthetic_score``, ``nsfw_score``,
    ``keep`` and ``extra_columns``. ``source``: a dataset folder or an ``ImageTextPairDataset``.
    """
    wanted = list(dict.fromkeys([id_col, STATUS_COLUMN, AESTHETIC_COLUMN, NSFW_COLUMN, KEEP_COLUMN, *extra_columns]))
    if isinstance(source, (str, os.PathLike)):
        shards = find_shards(source)
        schemas = [read_parquet_schema(shard.parquet).names for shard in shards]
        _check_columns(extra_columns, list(dict.fromkeys(n for names in schemas for n in names)), os.fspath(source))
        frames = []
        for shard, names in zip(shards, schemas):
            table = read_parquet_table(shard.parquet, columns=[c for c in wanted if c in names])
            frames.append(table.to_pandas().assign(**{TAR_COLUMN: shard.tar}))
        frame = pd.concat(frames, ignore_index=True)
    else:
        _check_columns(extra_columns, list(source.metadata.columns), source.path)  # before any work is computed
        columns = [c for c in wanted if c in source.metadata.columns]
        meta = source.metadata._meta[columns].assign(**{TAR_COLUMN: pd.Series([], dtype=object)})
        tagged = source.map_shards(_TagShard(columns), meta=meta, lineage_step="report-columns", name="report-columns")
        frame = tagged.metadata.compute()
        frame = to_pandas(frame).reset_index(drop=True)
    if id_col in frame.columns:
        frame[id_col] = frame[id_col].astype(str)
    return frame


def _check_columns(needed: Sequence[str], available: Sequence[str], where: str) -> None:
    """KeyError naming the ``needed`` columns (of a filter expression) that the dataset lacks, and
    the dataset's columns that can be used instead (all of them, not only those a report reads)."""
    missing = [c for c in needed if c not in available]
    if missing:
        raise KeyError(f"columns {missing} are not in the metadata of {where}; the columns you can use are "
                       f"{list(available)}")


class _TagShard:
    """Per-shard task of ``load_scores``: the chosen columns plus the shard's tar path."""

    def __init__(self, columns: Sequence[str]):
        self.columns = list(columns)

    def __call__(self, frame, tar_path: str):
        return frame[self.columns].assign(**{TAR_COLUMN: tar_path})


def score_quantiles(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """count, mean, min, p5, p25, p50, p75, p95, max of each column (NaN rows, i.e. failed images, left out)."""
    rows = {}
    for col in columns:
        values = frame[col].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        stats = {"count": len(values), "mean": values.mean() if len(values) else np.nan,
                 "min": values.min() if len(values) else np.nan}
        for q in QUANTILES:
            stats[f"p{round(q * 100)}"] = np.quantile(values, q) if len(values) else np.nan
        stats["max"] = values.max() if len(values) else np.nan
        rows[col] = stats
    return pd.DataFrame.from_dict(rows, orient="index")


# ----------------------------------------------------------------------------------------------
# Summary pieces
def _status_summary(frame: pd.DataFrame) -> dict:
    if STATUS_COLUMN not in frame.columns:
        return {}
    counts = frame[STATUS_COLUMN].value_counts()
    return {f"images_{s}": int(counts.get(s, 0)) for s in STATUSES}


def _keep_summary(frame: pd.DataFrame, expr: str | None) -> dict:
    if expr is None:
        return {}
    keep = frame["keep"].to_numpy()
    out = {"filter": expr, "kept": int(keep.sum()), "dropped": int((~keep).sum()),
           "kept_percent": round(100.0 * keep.mean(), 1) if len(keep) else 0.0}
    if STATUS_COLUMN in frame.columns:
        out["dropped_failed_image"] = int((~keep & (frame[STATUS_COLUMN] != OK).to_numpy()).sum())
    return out


def _throughput(run: dict | None) -> dict:
    """Embedding throughput from a ``save_metadata`` run summary whose shards carry embedder stats."""
    totals = (run or {}).get("totals", {})
    if not totals.get("embed_seconds"):
        return {}
    out = {"embedded": int(totals.get("embedded", 0)), "embed_worker_seconds": round(totals["embed_seconds"], 2),
           "images_per_second_per_worker": round(totals.get("embedded", 0) / totals["embed_seconds"], 2)}
    if run.get("shards_skipped", 0) == 0 and run.get("carried_stats", 0) == 0 and run.get("seconds"):
        out["run_seconds"] = run["seconds"]
        out["images_per_second"] = round(totals.get("embedded", 0) / run["seconds"], 2)
    if totals.get("extra_in_tar"):
        out["samples_without_row"] = int(totals["extra_in_tar"])
    return out


def _curated_summary(curated) -> dict:
    path = os.path.join(os.fspath(curated), RUN_SUMMARY_NAME)
    run = read_json(path)
    if run is None:
        raise FileNotFoundError(f"{path} does not exist: pass as curated= the folder written by to_webdataset "
                                "(`nemo-curator-image filter`)")
    totals = run.get("totals", {})
    written = int(totals.get("samples_written", 0))
    out = {"curated": run.get("path", os.path.abspath(curated)), "curated_shards": run.get("shards_total", 0),
           "curated_samples": written, "curated_seconds": run.get("seconds")}
    if totals.get("missing_sample"):
        out["curated_missing_sample"] = int(totals["missing_sample"])
    if run.get("seconds") and run.get("shards_skipped", 0) == 0:
        out["reshard_samples_per_second"] = round(written / run["seconds"], 1)
    return out


# ----------------------------------------------------------------------------------------------
# Text
_LABELS = {
    "dataset": "dataset", "shards": "shards", "rows": "rows", "images_ok": "images ok",
    "images_decode_failed": "images decode_failed", "images_missing_image": "images missing_image",
    "filter": "filter", "kept": "kept", "dropped": "dropped", "kept_percent": "kept %",
    "dropped_failed_image": "  of which failed image", "embedded": "embedded",
    "embed_worker_seconds": "embedding, worker seconds", "images_per_second_per_worker": "images/s per worker",
    "run_seconds": "embedding run, wall seconds", "images_per_second": "images/s (wall)",
    "samples_without_row": "tar samples without a row", "curated": "curated output",
    "curated_shards": "curated shards", "curated_samples": "curated samples", "curated_seconds": "reshard, wall seconds",
    "curated_missing_sample": "kept rows without a sample", "reshard_samples_per_second": "reshard samples/s",
}


def format_report(summary: Mapping, scores: pd.DataFrame, title: str | None = None) -> str:
    """The summary as an aligned two-column table, then the score quantiles."""
    width = max(len(label) for label in _LABELS.values())
    lines = [title, ""] if title else []
    lines += [f"{_LABELS.get(k, k):<{width}}  {v}" for k, v in summary.items()]
    if len(scores):
        lines += ["", scores.to_string(float_format=lambda v: f"{v:.4g}")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Files and figures
def _write_files(report: Report, out_dir: str, thresholds: Sequence[Threshold], id_col: str, title: str | None,
                 examples: int) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    files = {"markdown": os.path.join(out_dir, "report.md"), "json": os.path.join(out_dir, "report.json")}
    with atomic_write(files["markdown"], "w") as f:
        f.write(f"# Curation report\n\n```\n{report.text}\n```\n")
    write_json_atomic({"summary": report.summary, "scores": report.scores.to_dict(orient="index")}, files["json"])
    if len(report.scores):
        files["histograms"] = os.path.join(out_dir, "report.png")
        _save(plot_score_histograms(report.frame, list(report.scores.index), thresholds, title), files["histograms"])
    if examples and "keep" in report.frame.columns:
        files["examples"] = os.path.join(out_dir, "examples.png")
        _save(plot_image_grid(example_groups(report.frame, examples), id_col=id_col, title=title), files["examples"])
    return files


def _new_figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg backend (no pyplot, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def plot_score_histograms(frame: pd.DataFrame, columns: Sequence[str], thresholds: Sequence[Threshold] = (),
                          title: str | None = None, bins: int = 40):
    """A Figure with one histogram per score column; each threshold drawn as a red line, the kept side shaded."""
    fig = _new_figure(5.5 * len(columns), 4.0)
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    cuts = {t.column: t for t in thresholds}
    for ax, col in zip(axes, columns):
        values = frame[col].to_numpy(dtype=np.float64)
        finite = values[np.isfinite(values)]
        cut = cuts.get(col)
        view = _histogram_view(finite, None if cut is None else cut.value)
        ax.hist(finite, bins=bins, range=None if view is None else view[0], color="#4C72B0", edgecolor="white")
        ax.set_xlabel(col)
        ax.set_ylabel("images")
        ax.set_title(f"{col}: {len(finite)} scored, {len(values) - len(finite)} failed (NaN)")
        if view is not None:
            ax.set_xlim(*view[1])  # fixed: the lines and spans below do not rescale the axis
            ax.locator_params(axis="x", nbins=6)  # tiny ranges have long tick labels
        if cut is not None:
            kept = int((finite > cut.value).sum() if cut.keep_above else (finite < cut.value).sum())
            lo, hi = ax.get_xlim()
            ax.axvline(cut.value, color="#C44E52", linewidth=2, label=f"keep {cut.condition}: {kept}")
            edge = hi if cut.keep_above else lo
            if (edge - cut.value) * (1 if cut.keep_above else -1) > 0:  # some of the kept side is on the axis
                ax.axvspan(max(lo, min(hi, cut.value)), edge, color="#55A868", alpha=0.12)
            if not lo <= cut.value <= hi:  # far from every score: name it at the edge it lies beyond
                right = cut.value > hi
                ax.text(0.98 if right else 0.02, 0.8, f"cut at {cut.value:g} {'→' if right else '←'}",
                        transform=ax.transAxes, ha="right" if right else "left", va="center", color="#C44E52",
                        bbox={"facecolor": "white", "edgecolor": "#C44E52", "alpha": 0.9})
            ax.set_xlim(lo, hi)
            ax.legend(loc="upper right")
    if title:
        fig.suptitle(title, color="#C44E52" if "SMOKE" in title else "black")
    return fig


_HIST_MARGIN = 0.05  # of the scores' range, on each side of the axis
_THRESHOLD_REACH = 3.0  # a threshold is brought onto the axis if that widens it at most this many times


def _histogram_view(finite: np.ndarray, cut: float | None) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """(the bins' range, the axis limits) for a histogram of ``finite`` scores; None without scores.

    The bins span the scores (equal scores: a padding of 5% of their magnitude, at least 0.05), so
    scores in a tiny range still fill the bins. The axis adds a margin and reaches out to ``cut``
    when it is near the scores; a far one stays off the axis (the caller names it at the edge)."""
    if not len(finite):
        return None
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo <= 1e-12 * max(abs(lo), 1.0):
        pad = _HIST_MARGIN * max(abs(lo), 1.0)
        lo, hi = lo - pad, hi + pad
    margin = _HIST_MARGIN * (hi - lo)
    view = (lo - margin, hi + margin)
    if cut is not None and not view[0] <= cut <= view[1]:
        widened = (min(view[0], cut - margin), max(view[1], cut + margin))
        if widened[1] - widened[0] <= _THRESHOLD_REACH * (view[1] - view[0]):
            view = widened
    return (lo, hi), view


def example_groups(frame: pd.DataFrame, n: int) -> dict[str, pd.DataFrame]:
    """Up to ``n`` kept rows (highest aesthetic first) and ``n`` dropped rows, for ``plot_image_grid``."""
    order = AESTHETIC_COLUMN if AESTHETIC_COLUMN in frame.columns else None
    kept, dropped = frame[frame["keep"]], frame[~frame["keep"]]
    if order:
        kept = kept.sort_values(order, ascending=False)
        dropped = dropped.sort_values(order, ascending=True, na_position="first")
    return {f"kept ({len(kept)})": kept.head(n), f"dropped ({len(dropped)})": dropped.head(n)}


def plot_image_grid(groups: Mapping[str, pd.DataFrame], id_col: str = DEFAULT_ID_COL, title: str | None = None,
                    label_columns: Sequence[str] = (AESTHETIC_COLUMN, NSFW_COLUMN)):
    """A Figure with one row of thumbnails per group; rows need ``id_col`` and ``_tar`` (see ``load_scores``).

    Each thumbnail is titled with its id and the ``label_columns`` present; an image that cannot be
    read or decoded shows as a grey tile with its status.
    """
    ncols = max([len(g) for g in groups.values()] + [1])
    fig = _new_figure(2.2 * ncols, 2.6 * len(groups) + (0.4 if title else 0))
    axes = fig.subplots(len(groups), ncols, squeeze=False)
    for r, (name, rows) in enumerate(groups.items()):
        images = {}
        for tar, ids in rows.groupby(TAR_COLUMN)[id_col]:
            images.update(read_images(tar, ids))
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            if c == 0:
                ax.set_title(name, loc="left", fontsize=11, fontweight="bold", pad=18)
            if c >= len(rows):
                continue
            row = rows.iloc[c]
            key = str(row[id_col])
            picture = thumbnail(images.get(key))
            if picture is None:
                ax.imshow(np.full((8, 8, 3), 200, np.uint8))
                ax.text(4, 4, str(row.get(STATUS_COLUMN, "no image")), ha="center", va="center", fontsize=8)
            else:
                ax.imshow(picture)
            scores = " ".join(f"{c.replace('_score', '')}={row[c]:.3g}" for c in label_columns if c in rows.columns)
            ax.text(0.5, -0.02, f"{key}\n{scores}", transform=ax.transAxes, ha="center", va="top", fontsize=7)
    if title:
        fig.suptitle(title, color="#C44E52" if "SMOKE" in title else "black")
    return fig


def read_images(tar_path: str, ids: Sequence[str],
                image_extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS) -> dict[str, bytes]:
    """``{id: image bytes}`` for the wanted ids found in one tar (the first of ``image_extensions``
    each sample has); ids without an image are left out."""
    wanted = {str(i) for i in ids}
    found: dict[str, bytes] = {}
    with open(tar_path, "rb") as f:
        for key, members in iter_tar_samples(tar_path):
            image = pick_image_member(members, image_extensions)
            if key in wanted and key not in found and image is not None:
                found[key] = read_member_bytes(f, image)
    return found


def thumbnail(data: bytes | None, size: int = 256) -> np.ndarray | None:
    """An encoded image as an RGB array at most ``size`` pixels on a side; None when it cannot be decoded."""
    if data is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            return np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError):
        return None


__all__ = ["Report", "Threshold", "default_thresholds", "example_groups", "format_report", "load_scores",
           "make_report", "plot_image_grid", "plot_score_histograms", "quantile_thresholds", "read_images",
           "score_quantiles", "thresholds_expression", "thumbnail"]
