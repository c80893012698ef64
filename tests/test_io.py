"""Atomic Parquet outputs with metadata (dpbr.io)."""

import os
import re
import socket
import subprocess
import sys
import time

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


# ----------------------------------------------------------------------------------------------- #
# Temporaries left by killed writers


def _gone_pid() -> int:
    """The id of a process that has exited and been reaped (so no process has it, barring reuse)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


def test_a_write_removes_only_its_outputs_stale_temporaries(tmp_path):
    target = tmp_path / "x.parquet"
    host, dead, live = _host(), _gone_pid(), os.getpid()
    two_hours_ago = time.time() - 7200
    names = {
        "dead_here": f".x.parquet.{host}-{dead}-abcd1234.tmp",        # killed writer on this machine: stale
        "live_here": f".x.parquet.{host}-{live}-abcd1234.tmp",        # running writer: kept
        "old_live_here": f".x.parquet.{host}-{live}-old_1234.tmp",    # > 1 h untouched: stale whoever wrote it
        "young_elsewhere": f".x.parquet.othernode-{dead}-abcd1234.tmp",   # pid means nothing here: kept
        "old_elsewhere": f".x.parquet.othernode-{dead}-efgh5678.tmp",     # > 1 h: stale
        "young_legacy": ".x.parquet.k2j4h5g6.tmp",                    # no writer recorded, recent: kept
        "old_legacy": ".x.parquet.q1w2e3r4.tmp",                      # no writer recorded, > 1 h: stale
        "other_output": f".x.parquet.bak.{host}-{dead}-abcd1234.tmp",  # another output's temporary: kept
        "other_old": ".y.parquet.q1w2e3r4.tmp",                       # another output's temporary: kept
        "not_a_temp": ".x.parquet.notes.txt",                         # not a temporary name: kept
    }
    for key, name in names.items():
        (tmp_path / name).write_text("half")
        if key.startswith("old") or key == "other_old":
            os.utime(tmp_path / name, (two_hours_ago, two_hours_ago))
    frame = pd.DataFrame({"step": [0, 1]})
    write_parquet(frame, target)
    stale = {"dead_here", "old_live_here", "old_elsewhere", "old_legacy"}
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"x.parquet"} | {name for key, name in names.items() if key not in stale}
    assert pd.read_parquet(target).equals(frame)


def test_the_temporary_of_a_writer_killed_with_sigkill_is_removed_by_the_next_write(tmp_path):
    """A real writer, killed (SIGKILL: no clean-up runs) while inside the atomic write."""
    target = tmp_path / "out.csv"
    script = ("import sys, time\n"
              "from dpbr.io import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n"
              "    tmp.write_text('half')\n"
              "    print(tmp.name, flush=True)\n"
              "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        temp_name = proc.stdout.readline().strip()  # the writer is inside atomic_path once it prints
        assert temp_name.startswith(".out.csv.") and temp_name.endswith(".tmp")
        assert (tmp_path / temp_name).read_text() == "half"
        # while the writer runs, another write of the same output leaves its temporary alone
        with atomic_path(target) as tmp:
            tmp.write_text("first")
        assert (tmp_path / temp_name).exists() and target.read_text() == "first"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert (tmp_path / temp_name).exists()  # SIGKILL: the writer could not clean up
    with atomic_path(target) as tmp:
        tmp.write_text("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
    assert target.read_text() == "second"
