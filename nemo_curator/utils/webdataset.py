"""The shard layout: the one place that knows how a dataset folder and a webdataset tar look.

A dataset folder holds shards ``<name>.tar`` (webdataset members ``<key>.<ext>``) each with a
metadata file ``<name>.parquet`` (one row per sample) and optionally a DALI index ``<name>.idx``.
This is what img2dataset writes. Tars and parquets are paired by their file name, never by position.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from nemo_curator.utils.file_utils import atomic_write

TAR_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"
INDEX_SUFFIX = ".idx"
STATS_SUFFIX = ".stats.json"  # per-shard statistics and completion marker (see utils.resume)
DEFAULT_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

_MEMBER_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")


@dataclass(frozen=True)
class Shard:
    """One shard of a dataset folder: its name (file stem) and the paths of its files."""

    name: str
    tar: str
    parquet: str
    idx: str

    @classmethod
    def in_folder(cls, folder: str | os.PathLike, name: str) -> "Shard":
        folder = os.fspath(folder)
        return cls(
            name=name,
            tar=os.path.join(folder, name + TAR_SUFFIX),
            parquet=os.path.join(folder, name + PARQUET_SUFFIX),
            idx=os.path.join(folder, name + INDEX_SUFFIX),
        )

    @classmethod
    def of_file(cls, path: str | os.PathLike) -> "Shard":
        """The shard that a file of it (``NNNNN.tar``, ``.parquet``, ``.idx`` or ``.stats.json``) belongs to."""
        folder, file_name = os.path.split(os.fspath(path))
        for suffix in (TAR_SUFFIX, PARQUET_SUFFIX, INDEX_SUFFIX, STATS_SUFFIX):
            if file_name.endswith(suffix) and len(file_name) > len(suffix):
                return cls.in_folder(folder, file_name[: -len(suffix)])
        raise ValueError(f"{path} is not a shard file (NNNNN{TAR_SUFFIX}, {PARQUET_SUFFIX}, {INDEX_SUFFIX} "
                         f"or {STATS_SUFFIX})")

    @property
    def stats(self) -> str:
        """``NNNNN.stats.json`` beside the shard's files."""
        return os.path.join(os.path.dirname(self.tar), self.name + STATS_SUFFIX)

    def moved_to(self, folder: str | os.PathLike) -> "Shard":
        """The shard of the same name in another folder."""
        return Shard.in_folder(folder, self.name)


def shard_name(index: int, digits: int) -> str:
    """Zero-padded shard name: ``shard_name(42, 5) == "00042"``."""
    return f"{index:0{digits}d}"


def find_shards(path: str | os.PathLike, require_parquet: bool = True) -> list[Shard]:
    """List the shards of a dataset folder, sorted by name, pairing files by name.

    Raises FileNotFoundError for a missing folder, a folder without shards, a tar without its
    parquet or a parquet without its tar (all such files are named in the message).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist (or is not a folder): pass the folder "
                                f"that holds the NNNNN.tar + NNNNN.parquet shards")
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))  # names, not Path objects: 100,000s of files
    tars = {n[: -len(TAR_SUFFIX)] for n in names if n.endswith(TAR_SUFFIX)}
    parquets = {n[: -len(PARQUET_SUFFIX)] for n in names if n.endswith(PARQUET_SUFFIX)}
    if not tars and (require_parquet and not parquets):
        raise FileNotFoundError(f"no shards in {folder}: expected webdataset files NNNNN.tar with NNNNN.parquet "
                                f"beside each (the layout img2dataset writes)")
    if not tars and not require_parquet:
        raise FileNotFoundError(f"no shards in {folder}: expected webdataset files NNNNN.tar")
    if require_parquet:
        lonely_tars = sorted(tars - parquets)
        lonely_parquets = sorted(parquets - tars)
        problems = []
        if lonely_tars:
            problems.append("tar without its parquet: " + ", ".join(str(folder / (n + TAR_SUFFIX)) for n in lonely_tars[:10]))
        if lonely_parquets:
            problems.append("parquet without its tar: " + ", ".join(str(folder / (n + PARQUET_SUFFIX)) for n in lonely_parquets[:10]))
        if problems:
            raise FileNotFoundError(
                f"unpaired shard files in {folder}: " + "; ".join(problems)
                + ". Every NNNNN.tar needs a NNNNN.parquet with one row per sample (and vice versa); "
                "`nemo-curator-image index-metadata` writes a parquet for tars that have none."
            )
    return [Shard.in_folder(folder, n) for n in sorted(tars)]


def split_member_name(name: str) -> tuple[str, str] | None:
    """Split a tar member name into (key, extension) the webdataset way.

    The key is everything up to the first dot of the file name (directories kept), the extension
    the rest, lower-cased: ``"a/000123.seg.png" -> ("a/000123", "seg.png")``. Returns None for
    names without an extension.
    """
    match = _MEMBER_RE.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


@dataclass
class TarMember:
    """One file of a sample: its member name, extension and where its bytes lie in the tar."""

    name: str
    ext: str
    offset_data: int
    size: int


def pick_image_member(members: Iterable[TarMember],
                      extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS) -> TarMember | None:
    """The member of a sample that holds its image: the first of ``extensions`` (in that order of
    preference, lower case, without dot) that the sample has; None when it has none."""
    rank = {ext: r for r, ext in enumerate(extensions)}
    images = [m for m in members if m.ext in rank]
    return min(images, key=lambda m: rank[m.ext]) if images else None


def iter_tar_samples(tar_path: str | os.PathLike) -> Iterator[tuple[str, list[TarMember]]]:
    """Stream (key, members) for each sample of a tar, in tar order, reading headers only.

    File bodies are skipped by seeking, so the cost does not grow with image size. Members of one
    sample are consecutive in a webdataset tar; a key that reappears later is reported again as a
    new group (callers decide whether that is an error). A damaged tar raises ``tarfile.ReadError``
    naming the file.
    """
    try:
        files = list(_scan_tar_headers(tar_path))
    except _UnusualTar:
        files = list(_scan_with_tarfile(tar_path))
    key, members = None, []
    for name, offset_data, size in files:
        parsed = split_member_name(name)
        if parsed is None:
            continue
        member_key, ext = parsed
        if member_key != key and members:
            yield key, members
            members = []
        key = member_key
        members.append(TarMember(name, ext, offset_data, size))
    if members:
        yield key, members


class _UnusualTar(Exception):
    """A header kind the fast scanner does not handle: use ``tarfile`` instead."""


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6", b"g", b"K")  # links, devices, dirs, fifos, global PAX, long link


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
        raise _UnusualTar
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _UnusualTar from None


def _scan_tar_headers(tar_path) -> Iterator[tuple[str, int, int]]:
    """(member name, data offset, size) of each regular file, from the raw 512-byte headers.

    About 8x faster than ``tarfile`` (which builds a TarInfo per member); handles ustar, GNU long
    names and PAX ``path``/``size`` records, and raises ``_UnusualTar`` for anything else.
    """
    with open(tar_path, "rb") as f:
        offset, long_name, pax = 0, None, {}
        while True:
            f.seek(offset)
            header = f.read(_BLOCK)
            if len(header) < _BLOCK or header == b"\0" * _BLOCK:
                if offset == 0:
                    raise _UnusualTar  # empty or not a tar: tarfile gives the error
                return
            checksum = _octal(header[148:156])
            unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
            if checksum != unsigned:  # signed-sum headers, or not a tar: let tarfile decide
                raise _UnusualTar
            size, kind = _octal(header[124:136]), header[156:157]
            data = offset + _BLOCK
            if kind in (b"x", b"L"):
                f.seek(data)
                body = f.read(size)
                if kind == b"L":
                    long_name = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    pax = _parse_pax(body)
            elif kind in _REGULAR:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") if header[257:262] == b"ustar" else ""
                if prefix:
                    name = prefix + "/" + name
                name = pax.get("path", long_name or name)
                size = int(pax.get("size", size))
                yield name, data, size
                long_name, pax = None, {}
            elif kind in _SKIPPED:
                long_name, pax = None, {}
            else:
                raise _UnusualTar
            offset = data + (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _parse_pax(body: bytes) -> dict[str, str]:
    """PAX extended header records ``"<len> key=value\\n"`` as a dict."""
    records, pos = {}, 0
    while pos < len(body) and body[pos:pos + 1] != b"\0":
        space = body.index(b" ", pos)
        length = int(body[pos:space])
        key, _, value = body[space + 1: pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    if any(k.startswith("GNU.sparse") for k in records):
        raise _UnusualTar
    return records


def _scan_with_tarfile(tar_path) -> Iterator[tuple[str, int, int]]:
    try:
        with tarfile.open(tar_path, "r:") as stream:
            for info in stream:
                if info.isfile():
                    yield info.name, info.offset_data, info.size
    except tarfile.ReadError as err:
        raise tarfile.ReadError(f"{tar_path} is not a readable tar file ({err}): re-download or rewrite the shard") from err


def read_member_bytes(f, member: TarMember) -> bytes:
    """Read one member's bytes from an open binary file of the tar."""
    f.seek(member.offset_data)
    data = f.read(member.size)
    if len(data) != member.size:
        raise EOFError(f"tar member {member.name} of {getattr(f, 'name', 'the tar')} is truncated ({len(data)} of "
                       f"{member.size} bytes): the tar was cut short (an interrupted copy or download?)")
    return data


def read_dali_index(idx_path: str | os.PathLike) -> list[tuple[str, list[TarMember]]]:
    """Parse a DALI webdataset index (v1.2: ``ext offset size name`` groups) into (key, members).

    Raises ValueError naming the file when it is not a v1.2 index (rewrite it with
    ``write_dali_index`` / ``nemo-curator-image index``).
    """
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != "v1.2":
            raise ValueError(f"{idx_path} is not a DALI v1.2 webdataset index (header {header!r}); "
                             "rewrite it with `nemo-curator-image index <folder>`")
        samples = []
        for line_no, line in enumerate(f, start=2):
            fields = line.split()
            if not fields:
                continue
            if len(fields) % 4:
                raise ValueError(f"{idx_path}:{line_no}: expected groups of 'ext offset size name', got {line.strip()!r}")
            members = [TarMember(fields[i + 3], fields[i], int(fields[i + 1]), int(fields[i + 2]))
                       for i in range(0, len(fields), 4)]
            parsed = split_member_name(members[0].name)
            samples.append((parsed[0] if parsed else members[0].name, members))
    if len(samples) != int(header[1]):
        raise ValueError(f"{idx_path}: header announces {header[1]} samples but lists {len(samples)}; rewrite the index")
    return samples


def dali_index_lines(samples: Iterable[tuple[str, list[TarMember]]]) -> list[str]:
    """Lines of a DALI webdataset index (format v1.2): header, then one line per sample.

    Each sample line lists ``ext data_offset size member_name`` for each of its members.
    """
    lines = []
    for _, members in samples:
        lines.append(" ".join(f"{m.ext} {m.offset_data} {m.size} {m.name}" for m in members))
    return [f"v1.2 {len(lines)}"] + lines


def write_dali_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> str:
    """Write the DALI index of ``tar_path`` (default: beside it as ``.idx``) atomically; return its path."""
    idx_path = os.fspath(idx_path) if idx_path else Shard.of_file(tar_path).idx
    text = "\n".join(dali_index_lines(iter_tar_samples(tar_path))) + "\n"
    with atomic_write(idx_path, "w") as f:
        f.write(text)
    return idx_path


class TarWriter:
    """Write webdataset members to a binary file object, recording the index as it goes.

    ``add(name, data)`` appends one regular file; ``index_lines()`` gives the DALI index of what
    was written. Use ``tarfile`` headers (USTAR/PAX) so any tar reader opens the result.
    """

    def __init__(self, fileobj):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT)
        self._samples: list[tuple[str, list[TarMember]]] = []

    def add(self, name: str, data: bytes, mtime: float = 0.0) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = mtime
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))
        parsed = split_member_name(name)
        if parsed is None:
            return
        key, ext = parsed
        # offset_data is where the body starts: the tar's offset after addfile minus the padded body.
        padded = (len(data) + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE
        member = TarMember(name, ext, self._tar.offset - padded, len(data))
        if self._samples and self._samples[-1][0] == key:
            self._samples[-1][1].append(member)
        else:
            self._samples.append((key, [member]))

    def index_lines(self) -> list[str]:
        return dali_index_lines(self._samples)

    def close(self) -> None:
        self._tar.close()
