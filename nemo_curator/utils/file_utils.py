"""Atomic file writes: the one place that knows how to make a file appear complete or not at all."""
from __future__ import annotations

import contextlib
import json
import re
import os
import secrets
from pathlib import Path
from typing import IO, Iterable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


# atomic_write's temporaries: ``<folder>/.<final name>.<random>.tmp`` (hidden, never the final name)
_TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    ``durable=False`` skips the fsync (0.5 to several ms per file): only for a file whose loss or
    emptiness after a machine crash is harmless, such as a shard's completion marker written after
    its durable outputs (a marker that cannot be read means the shard is done again).

    A crash or an exception inside the block leaves ``path`` untouched (old content or absent) and
    removes the temporary file, so a reader never sees a truncated file under the final name.
    The file gets the mode a plain ``open(path, "w")`` of a new file gives (``0o666`` less the
    process's umask, or what a default ACL of the folder says), not ``tempfile.mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# mkstemp's flags (exclusive create, no symlink followed, not inherited by children); the mode
# passed is 0o666 like open()'s, so the kernel applies the umask (or a default ACL) exactly as it
# does for open(): no umask read (os.umask can only be read by setting it, which races with threads).
_TMP_FLAGS = (os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
              | getattr(os, "O_BINARY", 0))
_TMP_ATTEMPTS = 100


def _create_temporary(path: Path) -> tuple[int, str]:
    """Create ``<folder>/.<name>.<random>.tmp`` exclusively, mode 0o666 less the umask; return (fd, its path)."""
    for _ in range(_TMP_ATTEMPTS):
        tmp = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
        try:
            return os.open(tmp, _TMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}: {_TMP_ATTEMPTS} names taken")


ROW_GROUP_BYTES = 4 * 2**20  # in-memory (Arrow) bytes per parquet row group


def write_parquet_atomic(df: pd.DataFrame | pa.Table, path: str | os.PathLike) -> None:
    """Write a DataFrame (index dropped) or Arrow table to ``path`` atomically.

    Row groups hold about ``ROW_GROUP_BYTES`` each: the writer buffers a whole row group, so
    one-group files of embeddings would need twice their size in memory. Lists of floats
    (embeddings) are written without dictionary encoding, which cannot shrink them."""
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    float_lists = {field.name for field in table.schema if _is_float_list(field.type)}
    dictionary_columns = [path for path in _parquet_leaf_paths(table.schema) if path.split(".", 1)[0] not in float_lists]
    bytes_per_row = table.nbytes / max(table.num_rows, 1)
    rows_per_group = max(64, int(ROW_GROUP_BYTES // max(bytes_per_row, 1)))
    with atomic_write(path) as f:
        pq.write_table(table, f, use_dictionary=dictionary_columns, row_group_size=rows_per_group)


def _parquet_leaf_paths(schema: pa.Schema) -> list[str]:
    """Parquet's dotted leaf column paths for ``schema`` (``tags.list.element`` for a list column):
    the names ``use_dictionary`` matches. Read from the footer of an empty file written in memory."""
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    parquet_schema = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return [parquet_schema.column(i).path for i in range(len(parquet_schema))]


def _is_float_list(arrow_type) -> bool:
    return (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)) and pa.types.is_floating(arrow_type.value_type)


def read_parquet_schema(path: str | os.PathLike) -> pa.Schema:
    """The schema of a parquet file; a file that is not parquet raises ValueError naming it."""
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(_not_parquet(path, err)) from err


def read_parquet_table(path: str | os.PathLike, columns=None, only_present: bool = False) -> pa.Table:
    """A parquet file as an Arrow table (``columns``: those only; with ``only_present`` the ones of
    them that the file has), on one thread (a task reads one shard: Arrow's pool would only add
    memory); a file that is not parquet raises ValueError naming it."""
    try:
        with pq.ParquetFile(path) as f:  # 0.1 ms for a small file; pq.read_table's dataset layer costs 0.5
            if columns is not None and only_present:
                names = set(f.schema_arrow.names)
                columns = [c for c in columns if c in names]
            return f.read(columns=columns, use_threads=False)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(_not_parquet(path, err)) from err


def _not_parquet(path, err: BaseException) -> str:
    return (f"{path} is not a readable parquet file ({type(err).__name__}: {err}): restore it, or move it away and "
            f"write a new one from its tar with `nemo-curator-image index-metadata` (that loses its other columns)")


def write_json_atomic(obj, path: str | os.PathLike, durable: bool = True) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (``durable``: see ``atomic_write``)."""
    with atomic_write(path, "w", durable=durable) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def remove_stale_temporaries(folder: str | os.PathLike, file_names: Iterable[str],
                             temporaries: dict[str, list[str]] | None = None) -> int:
    """Remove the temporaries of ``atomic_write`` that a killed run left for ``file_names`` in
    ``folder`` (hidden, never mistaken for a complete file); return how many. ``temporaries``: the
    folder's listing from ``stale_temporaries`` (one scan for many shards), else it is scanned now."""
    listing = stale_temporaries(folder) if temporaries is None else temporaries
    removed = 0
    for name in set(file_names):
        for path in listing.pop(name, ()):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
    return removed


def stale_temporaries(folder: str | os.PathLike) -> dict[str, list[str]]:
    """``{final file name: [paths of its atomic_write temporaries]}`` in ``folder`` (one scan)."""
    found: dict[str, list[str]] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            match = _TMP_NAME.match(entry.name)
            if match:
                found.setdefault(match.group("name"), []).append(entry.path)
    return found
