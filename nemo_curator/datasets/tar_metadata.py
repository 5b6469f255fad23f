"""A parquet for a tar that has none (``nemo-curator-image index-metadata``): one row per sample."""
from __future__ import annotations

import pandas as pd

from nemo_curator.utils.constants import DEFAULT_ID_COL
from nemo_curator.utils.file_utils import write_parquet_atomic
from nemo_curator.utils.webdataset import iter_tar_samples, read_member_bytes


def write_tar_metadata(tar_path: str, parquet_path: str, id_col: str = DEFAULT_ID_COL) -> int:
    """Write a parquet with one row per sample of ``tar_path``: ``id_col`` and ``caption`` (its .txt,
    or null), atomically; return the number of rows."""
    rows = []
    with open(tar_path, "rb") as f:
        for key, members in iter_tar_samples(tar_path):
            txt = next((m for m in members if m.ext == "txt"), None)
            caption = read_member_bytes(f, txt).decode("utf-8", errors="replace") if txt else None
            rows.append({id_col: key, "caption": caption})
    write_parquet_atomic(pd.DataFrame(rows, columns=[id_col, "caption"]).astype({id_col: str}), parquet_path)
    return len(rows)
