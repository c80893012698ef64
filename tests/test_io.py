"""Atomic Parquet outputs with metadata (dpbr.io)."""

import os

import pandas as pd
import pytest

from dpbr.errors import UsageError
from dpbr.io import atomic_path, check_writable, read_metadata, write_parquet


def test_write_parquet_round_trip_with_metadata(tmp_path):
    frame = pd.DataFrame({"step": [0, 1, 2], "loss": [1.0, 0.5, 0.25]})
    path = write_parquet(frame, tmp_path / "sub" / "x.parquet", {"spec": {"seed": 3}, "device": "cpu"})
    assert pd.read_parquet(path).equals(frame)
    assert read_metadata(path) == {"device": "cpu", "spec": {"seed": 3}}
    assert os.listdir(tmp_path / "sub") == ["x.parquet"]  # no temporary left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask  # readable like any file, not mkstemp's 0600


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_existing_file_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_check_writable_rejects_directories_and_unwritable_places(tmp_path):
    with pytest.raises(UsageError, match="--out: .* is a directory"):
        check_writable(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="--out: cannot write"):
        check_writable(blocker / "child.parquet")
    assert check_writable(tmp_path / "new" / "ok.parquet").parent.is_dir()
