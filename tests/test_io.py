"""routelib.io: the one atomic-write helper (files, folders, failures, races) and sha256_file."""

import hashlib

import pytest

from routelib.io import atomic_write, atomic_write_bytes, is_temporary, sha256_file, temporary_path


def test_a_file_is_replaced_whole_and_no_temporary_stays(tmp_path):
    atomic_write_bytes(tmp_path / "x.json", b"{}")
    atomic_write_bytes(tmp_path / "x.json", b"[]", sync=False)
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"] and (tmp_path / "x.json").read_bytes() == b"[]"


def test_a_folder_replaces_the_old_folder(tmp_path):
    target = tmp_path / "step_000002"
    for text in ("old", "new"):
        with atomic_write(target) as tmp:
            tmp.mkdir()
            (tmp / "state.json").write_text(text)
    assert (target / "state.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["step_000002"]


def test_a_failing_block_leaves_the_old_version_and_no_temporary(tmp_path):
    atomic_write_bytes(tmp_path / "x.bin", b"old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert (tmp_path / "x.bin").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_a_block_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="wrote nothing"):
        with atomic_write(tmp_path / "x.bin"):
            pass
    assert not list(tmp_path.iterdir())


def test_keep_existing_keeps_the_first_finished_copy(tmp_path):
    target = tmp_path / "cache"
    with atomic_write(target, keep_existing=True) as first:
        first.mkdir()
        (first / "a").write_text("first")
        with atomic_write(target, keep_existing=True) as second:  # another process finishes first
            second.mkdir()
            (second / "a").write_text("second")
    assert (target / "a").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_temporaries_are_hidden_unique_and_recognised(tmp_path):
    a, b = temporary_path(tmp_path / "shard.parquet"), temporary_path(tmp_path / "shard.parquet")
    assert a != b and a.parent == tmp_path and a.name.startswith(".shard.parquet.tmp-")
    assert is_temporary(a) and not is_temporary(tmp_path / "shard.parquet") and not is_temporary(tmp_path / ".git")
    assert not list(tmp_path.glob("*.parquet"))


def test_sha256_file(tmp_path):
    data = bytes(range(256)) * 9000  # more than one read block
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
