"""The pandas / cuDF boundary: the one place that converts partitions and tests values for null.

Partitions of a dataset's metadata are pandas DataFrames, or cuDF ones with ``backend="cudf"``.
Code that needs pandas calls ``to_pandas``; code that hands a partition back in the caller's kind
calls ``nemo_curator.utils.arrow.pandas_like`` (cuDF gets its embeddings through Arrow). Dask's string conversion is switched off only where this package builds a collection
(``object_columns``), never globally.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import pandas as pd

from nemo_curator.utils.import_utils import gpu_only_import


def is_pandas(frame) -> bool:
    """True for a pandas DataFrame or Series (False for cuDF ones)."""
    return isinstance(frame, (pd.DataFrame, pd.Series))


def to_pandas(frame):
    """``frame`` (DataFrame or Series, pandas or cuDF) as pandas; pandas objects are returned as they are."""
    return frame if is_pandas(frame) else frame.to_pandas()


def to_cudf(frame: pd.DataFrame, feature: str = "backend='cudf'"):
    """A pandas DataFrame as cuDF (needs the ``gpu`` extra)."""
    return gpu_only_import("cudf", feature).from_pandas(frame)


def is_null(value) -> bool:
    """True for a missing per-row value: None, NaN, pd.NA or NaT (an array or list is never null)."""
    return value is None or (np.ndim(value) == 0 and bool(pd.isna(value)))


def id_dtype():
    """The dtype of id and status columns: pandas' string dtype."""
    return pd.StringDtype() if pd.__version__ < "3" else "str"


@contextlib.contextmanager
def object_columns() -> Iterator[None]:
    """Build Dask collections inside this block so that object columns stay objects.

    Dask would otherwise convert them to Arrow strings when it builds a collection, turning each
    embedding (a numpy array per row) into its text form. Scoped: the user's own Dask work keeps
    the configuration it has.
    """
    import dask

    with dask.config.set({"dataframe.convert-string": False}):
        yield
