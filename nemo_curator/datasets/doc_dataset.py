"""DocumentDataset: a Dask DataFrame of records as ``.df`` (the NeMo Curator 0.9 container).

The deduplication modules take and return it: ``DocumentDataset(dataset.metadata)`` wraps an
image dataset's metadata; ``extract_dedup_data`` returns the ids to remove as one.
"""
from __future__ import annotations

import os
from typing import Literal, Sequence

import dask.dataframe as dd
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nemo_curator.utils.file_utils import write_parquet_atomic
from nemo_curator.utils.frames import object_columns, to_pandas
from nemo_curator.utils.import_utils import gpu_only_import

PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")


class DocumentDataset:
    """A collection of records (rows) and their columns, distributed as a Dask DataFrame ``df``."""

    def __init__(self, dataset_df: dd.DataFrame):
        self.df = dataset_df

    def __len__(self) -> int:
        return len(self.df)

    def persist(self) -> "DocumentDataset":
        return DocumentDataset(self.df.persist())

    def repartition(self, *args, **kwargs) -> "DocumentDataset":
        return self.__class__(self.df.repartition(*args, **kwargs))

    def head(self, n: int = 5):
        return self.df.head(n)

    @classmethod
    def read_parquet(cls, input_files: str | Sequence[str], backend: Literal["pandas", "cudf"] = "pandas",
                     files_per_partition: int | None = None, blocksize: str | None = "1gb",
                     add_filename: bool | str = False, columns: list[str] | None = None, **kwargs) -> "DocumentDataset":
        """Read parquet files: a file, a folder of them (searched recursively, hidden and ``_``
        files skipped) or a list of either.

        With ``files_per_partition`` or ``add_filename`` each partition holds that many whole files
        (``add_filename``: a column ``file_name``, or the name given, holds each row's file name);
        otherwise Dask's reader splits them by ``blocksize``. ``backend="cudf"`` needs dask_cudf.
        """
        files = parquet_files(input_files)
        with object_columns():
            if files_per_partition is None and not add_filename:
                df = dd.read_parquet(files, columns=columns, blocksize=blocksize, **kwargs)
            else:
                per = files_per_partition or 1
                groups = [files[i: i + per] for i in range(0, len(files), per)]
                name = "file_name" if add_filename is True else (add_filename or None)
                df = dd.from_map(_read_files, groups, columns=columns, filename_column=name, label="read-parquet-files")
        if backend == "cudf":
            gpu_only_import("dask_cudf", "DocumentDataset.read_parquet(backend='cudf')")
            df = df.to_backend("cudf")
        elif backend != "pandas":
            raise ValueError(f"backend must be 'pandas' or 'cudf', got {backend!r}")
        return cls(df)

    def to_parquet(self, output_path: str, partition_on: str | None = None) -> None:
        """Write one ``part.<i>.parquet`` per partition into ``output_path`` (each atomic); with
        ``partition_on``, into ``<output_path>/<column>=<value>/`` folders, the column left out of
        the files (hive layout, as Dask writes it)."""
        os.makedirs(output_path, exist_ok=True)
        with object_columns():
            written = self.df.map_partitions(_write_partition, os.path.abspath(output_path), partition_on,
                                             meta=pd.DataFrame({"rows": pd.Series([], dtype="int64")}),
                                             enforce_metadata=False)
        written.compute()

    @classmethod
    def from_pandas(cls, data: pd.DataFrame, npartitions: int | None = 1, chunksize: int | None = None,
                    sort: bool | None = True) -> "DocumentDataset":
        with object_columns():
            return cls(dd.from_pandas(data, npartitions=npartitions, chunksize=chunksize, sort=sort))

    def to_pandas(self) -> pd.DataFrame:
        return self.df.to_backend("pandas").compute()

    def __repr__(self) -> str:
        return f"DocumentDataset(partitions={self.df.npartitions}, columns={list(self.df.columns)})"


def parquet_files(input_files: str | Sequence[str]) -> list[str]:
    """The parquet files named by ``input_files`` (files, folders searched recursively), sorted per folder.

    Raises FileNotFoundError naming the path when a path does not exist or a folder holds none.
    """
    paths = [input_files] if isinstance(input_files, (str, os.PathLike)) else list(input_files)
    files: list[str] = []
    for path in map(os.fspath, paths):
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = sorted(os.path.join(root, f) for root, dirs, names in os.walk(path)
                           for f in names if f.endswith(PARQUET_EXTENSIONS) and not f.startswith((".", "_"))
                           and not any(p.startswith((".", "_")) for p in os.path.relpath(root, path).split(os.sep) if p != "."))
            if not found:
                raise FileNotFoundError(f"no parquet files in {path}")
            files.extend(found)
        else:
            raise FileNotFoundError(f"{path} does not exist: pass parquet files or folders of them")
    return files


def _read_files(files: list[str], columns: list[str] | None = None, filename_column: str | None = None) -> pd.DataFrame:
    frames = []
    for f in files:
        frame = pq.read_table(f, columns=columns).to_pandas()
        if filename_column:
            frame[filename_column] = os.path.basename(f)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _write_partition(frame, folder: str, partition_on: str | None, partition_info: dict | None = None) -> pd.DataFrame:
    pdf = to_pandas(frame)
    name = f"part.{partition_info['number'] if partition_info else 0}.parquet"
    if partition_on is None:
        write_parquet_atomic(pa.Table.from_pandas(pdf, preserve_index=False), os.path.join(folder, name))
    else:
        for value, group in pdf.groupby(partition_on, sort=True):
            table = pa.Table.from_pandas(group.drop(columns=[partition_on]), preserve_index=False)
            write_parquet_atomic(table, os.path.join(folder, f"{partition_on}={value}", name))
    return pd.DataFrame({"rows": [len(pdf)]})
