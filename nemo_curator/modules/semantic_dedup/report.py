"""The report section of a dataset's dedup results: rows removed at several eps, duplicate pairs.

``dedup_report(dataset)`` reads the columns ``SemanticDeduplicator`` / ``ExactDeduplicator`` added
(``duplicate_of``, ``max_similarity``, the keep column) and returns a ``DedupReport``: a table of
the rows that go at each eps (computed from ``max_similarity``: a row goes at eps when it is
>= 1 - eps, exactly what a rerun with that eps and the same clusters removes), a table and a
figure of example pairs (removed image beside the image kept in its place) and markdown.
Counts are summed on the workers; only the example rows reach the client.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from nemo_curator.modules.semantic_dedup.deduplicator import DEFAULT_KEEP_COLUMN, DUPLICATE_OF_COL, MAX_SIMILARITY_COL
from nemo_curator.modules.semantic_dedup.matching import similarity_threshold
from nemo_curator.utils.file_utils import atomic_write
from nemo_curator.utils.frames import object_columns, to_pandas
from nemo_curator.report import read_images, thumbnail
from nemo_curator.utils.webdataset import DEFAULT_IMAGE_EXTENSIONS

DEFAULT_EPS_VALUES = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1)


@dataclass
class DedupReport:
    """What ``dedup_report`` found.

    - ``summary``: rows, rows removed by the keep column, rows with a similarity.
    - ``eps_table``: one row per eps: ``eps``, ``min_similarity`` (= float32(1 - eps)), ``removed``,
      ``kept``, ``removed_fraction`` (empty without ``max_similarity``).
    - ``pairs``: example removed rows: ``id``, ``duplicate_of``, ``max_similarity``, ``tar``, ``kept_tar``.
    - ``figures``: ``{"eps": Figure, "pairs": Figure}`` (matplotlib; ``pairs`` only with examples).
    - ``markdown``: the section as text; ``files``: what ``write`` wrote.
    """

    summary: dict
    eps_table: pd.DataFrame
    pairs: pd.DataFrame
    figures: dict
    markdown: str
    files: dict = field(default_factory=dict)

    def write(self, output_dir: str | os.PathLike) -> dict[str, str]:
        """Write ``dedup.md`` and ``dedup_<figure>.png`` into ``output_dir`` (atomically); returns the paths."""
        os.makedirs(output_dir, exist_ok=True)
        files = {"markdown": os.path.join(output_dir, "dedup.md")}
        with atomic_write(files["markdown"], "w") as f:
            f.write(self.markdown)
        for name, fig in self.figures.items():
            files[name] = os.path.join(output_dir, f"dedup_{name}.png")
            with atomic_write(files[name]) as f:
                fig.savefig(f, format="png", dpi=100)
        self.files = files
        return files


def dedup_report(dataset, eps_values=DEFAULT_EPS_VALUES, keep_column: str = DEFAULT_KEEP_COLUMN, pairs: int = 8,
                 image_extensions=DEFAULT_IMAGE_EXTENSIONS) -> DedupReport:
    """The dedup section for an ``ImageTextPairDataset`` whose metadata has ``keep_column`` and
    ``duplicate_of`` (and ``max_similarity`` for the eps table). ``pairs``: example pairs shown
    (0: none), spread over the similarity range of the removed rows."""
    metadata, id_col = dataset.metadata, dataset.id_col
    missing = [c for c in (keep_column, DUPLICATE_OF_COL) if c not in metadata.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in the metadata (columns {list(metadata.columns)}): run "
                       f"SemanticDeduplicator or ExactDeduplicator on the dataset first")
    eps_values = sorted(float(e) for e in eps_values)
    has_sim = MAX_SIMILARITY_COL in metadata.columns
    columns = [id_col, keep_column, DUPLICATE_OF_COL] + ([MAX_SIMILARITY_COL] if has_sim else [])
    with object_columns():
        stats = metadata[columns].map_partitions(_partition_stats, keep_column, eps_values if has_sim else [], pairs,
                                                 id_col, meta=_stats_meta(id_col, len(eps_values) if has_sim else 0),
                                                 enforce_metadata=False).compute()
    counts = stats[stats["kind"] == "counts"]
    rows, removed_now = int(counts["rows"].sum()), int(counts["removed"].sum())
    summary = {"rows": rows, "removed": removed_now, "kept": rows - removed_now,
               "with_similarity": int(counts["with_similarity"].sum()) if has_sim else 0}
    eps_table = pd.DataFrame({
        "eps": eps_values, "min_similarity": [float(similarity_threshold(e)) for e in eps_values],
        "removed": [int(counts[f"eps_{i}"].sum()) for i in range(len(eps_values))]}) if has_sim else pd.DataFrame(
        columns=["eps", "min_similarity", "removed"])
    eps_table["kept"] = rows - eps_table["removed"]
    eps_table["removed_fraction"] = eps_table["removed"] / max(rows, 1)
    examples = _pick_pairs(stats[stats["kind"] == "pair"], pairs, dataset.tar_files)
    examples = _locate_kept(metadata, id_col, examples, dataset.tar_files)
    figures = {"eps": _eps_figure(eps_table)} if has_sim else {}
    if len(examples):
        figures["pairs"] = _pairs_figure(examples, image_extensions)
    return DedupReport(summary, eps_table, examples, figures, _markdown(summary, eps_table, examples, keep_column))


def _partition_stats(frame, keep_column: str, eps_values: list[float], pairs: int, id_col: str,
                     partition_info: dict | None = None) -> pd.DataFrame:
    """One row of counts for the partition, then up to ``pairs`` removed rows as examples."""
    pdf = to_pandas(frame)
    part = int(partition_info["number"]) if partition_info else 0
    keep = pdf[keep_column].fillna(True).astype(bool).to_numpy()
    row = {"kind": "counts", "part": part, "rows": len(pdf), "removed": int((~keep).sum())}
    sim = pdf[MAX_SIMILARITY_COL].to_numpy(np.float32) if MAX_SIMILARITY_COL in pdf.columns else None
    if sim is not None:
        row["with_similarity"] = int(np.isfinite(sim).sum())
        for i, eps in enumerate(eps_values):
            row[f"eps_{i}"] = int((sim >= similarity_threshold(eps)).sum())
    counts = pd.DataFrame([row])
    gone = pdf[~keep & pdf[DUPLICATE_OF_COL].notna().to_numpy()]
    if sim is not None:
        gone = gone.assign(_sim=sim[~keep & pdf[DUPLICATE_OF_COL].notna().to_numpy()]).sort_values("_sim", kind="stable")
    else:
        gone = gone.assign(_sim=np.nan)
    if pairs and len(gone):
        picks = np.unique(np.linspace(0, len(gone) - 1, min(pairs, len(gone))).round().astype(int))
        chosen = gone.iloc[picks]
        examples = pd.DataFrame({"kind": "pair", "part": part, "id": chosen[id_col].astype(str).to_numpy(),
                                 "duplicate_of": chosen[DUPLICATE_OF_COL].astype(str).to_numpy(),
                                 "max_similarity": chosen["_sim"].to_numpy(np.float64)})
        counts = pd.concat([counts, examples], ignore_index=True)
    return counts.reindex(columns=_stats_meta(id_col, len(eps_values)).columns)


def _stats_meta(id_col: str, n_eps: int) -> pd.DataFrame:
    """Rows of ``_partition_stats``: ``kind`` "counts" (rows, removed, with_similarity, eps_<i>) or "pair"."""
    return pd.DataFrame({"kind": pd.Series([], dtype=object), "part": np.zeros(0, np.int64),
                         "rows": np.zeros(0, np.float64), "removed": np.zeros(0, np.float64),
                         "with_similarity": np.zeros(0, np.float64), "id": pd.Series([], dtype=object),
                         "duplicate_of": pd.Series([], dtype=object), "max_similarity": np.zeros(0, np.float64),
                         **{f"eps_{i}": np.zeros(0, np.float64) for i in range(n_eps)}})


def _pick_pairs(candidates: pd.DataFrame, pairs: int, tar_files: list[str]) -> pd.DataFrame:
    if not pairs or not len(candidates):
        return pd.DataFrame(columns=["id", "duplicate_of", "max_similarity", "tar", "kept_tar"])
    ordered = candidates.sort_values("max_similarity", kind="stable", na_position="last").reset_index(drop=True)
    picks = np.unique(np.linspace(0, len(ordered) - 1, min(pairs, len(ordered))).round().astype(int))
    chosen = ordered.iloc[picks]
    return pd.DataFrame({"id": chosen["id"].to_numpy(), "duplicate_of": chosen["duplicate_of"].to_numpy(),
                         "max_similarity": chosen["max_similarity"].to_numpy(),
                         "tar": [tar_files[int(p)] for p in chosen["part"]]})


def _locate_kept(metadata, id_col: str, examples: pd.DataFrame, tar_files: list[str]) -> pd.DataFrame:
    """Add ``kept_tar``: the shard holding each ``duplicate_of`` id (one pass over the id column)."""
    if not len(examples):
        return examples.assign(kept_tar=pd.Series([], dtype=object))
    wanted = sorted(set(examples["duplicate_of"]))
    with object_columns():
        found = metadata[[id_col]].map_partitions(_find_ids, id_col, wanted, meta=pd.DataFrame(
            {"id": pd.Series([], dtype=object), "part": np.zeros(0, np.int64)}), enforce_metadata=False).compute()
    where = dict(zip(found["id"], found["part"]))
    return examples.assign(kept_tar=[tar_files[where[i]] if i in where else None for i in examples["duplicate_of"]])


def _find_ids(frame, id_col: str, wanted: list[str], partition_info: dict | None = None) -> pd.DataFrame:
    ids = to_pandas(frame)[id_col].astype(str)
    hits = ids[ids.isin(wanted)].to_numpy(dtype=object)
    return pd.DataFrame({"id": hits, "part": np.full(len(hits), partition_info["number"] if partition_info else 0)})


def _pairs_figure(examples: pd.DataFrame, image_extensions):
    from matplotlib.figure import Figure

    wanted: dict[str, set[str]] = {}
    for _, row in examples.iterrows():
        wanted.setdefault(row["tar"], set()).add(row["id"])
        if row["kept_tar"]:
            wanted.setdefault(row["kept_tar"], set()).add(row["duplicate_of"])
    images: dict[tuple[str, str], bytes] = {}
    for tar, ids in wanted.items():
        images.update({(tar, k): v for k, v in read_images(tar, ids, image_extensions).items()})
    n = len(examples)
    fig = Figure(figsize=(2.2 * n, 5.0))
    axes = fig.subplots(2, n, squeeze=False)
    for c, (_, row) in enumerate(examples.iterrows()):
        for r, (tar, key, label) in enumerate([(row["tar"], row["id"], "removed"),
                                               (row["kept_tar"], row["duplicate_of"], "kept")]):
            ax = axes[r][c]
            ax.axis("off")
            picture = thumbnail(images.get((tar, key)), 192)
            ax.imshow(picture if picture is not None else np.full((8, 8, 3), 200, np.uint8))
            sim = "" if r or not np.isfinite(row["max_similarity"]) else f"\nsim {row['max_similarity']:.4f}"
            ax.set_title(f"{label} {key}{sim}", fontsize=7)
    fig.suptitle("duplicate pairs: removed (top) and the image kept in its place (bottom)")
    return fig


def _eps_figure(eps_table: pd.DataFrame):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.plot(eps_table["eps"], 100 * eps_table["removed_fraction"], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("eps (removed when similarity >= 1 - eps)")
    ax.set_ylabel("rows removed (%)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def _markdown(summary: dict, eps_table: pd.DataFrame, examples: pd.DataFrame, keep_column: str) -> str:
    lines = ["## Deduplication", "",
             f"{summary['removed']:,} of {summary['rows']:,} rows removed ({keep_column} False), "
             f"{summary['kept']:,} kept.", ""]
    if len(eps_table):
        lines += ["| eps | similarity >= | removed | kept | removed % |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r.eps:g} | {r.min_similarity:.4f} | {r.removed:,} | {r.kept:,} | {100 * r.removed_fraction:.2f} |"
                  for r in eps_table.itertuples()]
        lines.append("")
    if len(examples):
        lines += ["| removed | kept in its place | similarity |", "| --- | --- | --- |"]
        lines += [f"| {r.id} | {r.duplicate_of} | {r.max_similarity:.4f} |" for r in examples.itertuples()]
        lines.append("")
    return "\n".join(lines)
