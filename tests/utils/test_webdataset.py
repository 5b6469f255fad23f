"""Shard layout helpers: member names, tar scanning, DALI index files."""
import io
import tarfile

import pytest

from nemo_curator.utils.webdataset import (
    TarWriter, dali_index_lines, iter_tar_samples, read_dali_index, split_member_name, write_dali_index,
)


@pytest.mark.parametrize("name, expected", [
    ("000123.jpg", ("000123", "jpg")),
    ("a/b/000123.seg.PNG", ("a/b/000123", "seg.png")),
    ("noext", None),
])
def test_split_member_name(name, expected):
    assert split_member_name(name) == expected


def test_index_of_the_original_fixture_matches_its_shipped_index(shared_dir, tmp_path):
    tar = shared_dir / "sample_images" / "nemo_fixture" / "00000.tar"
    ours = write_dali_index(tar, tmp_path / "00000.idx")
    assert open(ours).read().split() == (tar.parent / "00000.idx").read_text().split()
    assert read_dali_index(ours) == list(iter_tar_samples(tar))


def test_tar_writer_records_the_index_it_writes(tmp_path):
    path = tmp_path / "x.tar"
    with open(path, "wb") as f:
        w = TarWriter(f)
        w.add("a" * 120 + ".jpg", b"\xff" * 1000)  # a long name needs a PAX header
        w.add("a" * 120 + ".txt", b"hi")
        w.add("b.jpg", b"x" * 513)
        lines = w.index_lines()
        w.close()
    assert lines == dali_index_lines(iter_tar_samples(path))
    samples = list(iter_tar_samples(path))
    assert [k for k, _ in samples] == ["a" * 120, "b"]
    data = path.read_bytes()
    m = samples[1][1][0]
    assert data[m.offset_data: m.offset_data + m.size] == b"x" * 513


def test_broken_index_and_tar_name_the_file(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_text("v1.1 1\njpg 0 10\n")
    with pytest.raises(ValueError, match="bad.idx"):
        read_dali_index(bad)
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar" * 100)
    with pytest.raises(tarfile.ReadError, match="broken.tar"):
        list(iter_tar_samples(broken))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_header_scan_agrees_with_tarfile(tmp_path, fmt):
    """The raw-header scanner gives tarfile's names, offsets and sizes (long names, dirs, links)."""
    from nemo_curator.utils.webdataset import _scan_tar_headers, _scan_with_tarfile

    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        d = tarfile.TarInfo("subdir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        long_dir = "d" * 90 + "/" if fmt != tarfile.USTAR_FORMAT else "dd/"
        for i, size in enumerate([0, 1, 511, 512, 513, 5000]):
            for ext in ("jpg", "json"):
                info = tarfile.TarInfo(f"{long_dir}{'k' * (60 if fmt != tarfile.USTAR_FORMAT else 8)}{i:03d}.{ext}")
                info.size = size
                tar.addfile(info, io.BytesIO(bytes([i]) * size))
        link = tarfile.TarInfo("subdir/link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "x"
        tar.addfile(link)
    fast = list(_scan_tar_headers(path))
    assert fast == list(_scan_with_tarfile(path))
    assert len(fast) == 12


def test_fixture_shard_scans_the_same_both_ways(shared_dir):
    from nemo_curator.utils.webdataset import _scan_tar_headers, _scan_with_tarfile

    tar = shared_dir / "sample_images" / "nemo_fixture" / "00000.tar"
    assert list(_scan_tar_headers(tar)) == list(_scan_with_tarfile(tar))
