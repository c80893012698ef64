"""The workflow run as a user runs it (``snakemake`` command line, ``--cores 2``): executed reruns,
an interrupted run resumed, ``--keep-going`` with a failing cell, configuration errors as printed,
and the offline report. Slow (each Snakemake start costs seconds here): ``pytest -m slow``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dpbr.report import grid
from dpbr.spec import RunSpec
from test_workflow import LITTLE, SNAKEFILE, SYNTH, tiny_config, write_config

pytestmark = pytest.mark.slow


def snakemake_cli(workdir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m snakemake --snakefile <repo>/Snakefile --directory <workdir> ARGS`` (stdout+stderr)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *args]
    return subprocess.run(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    """The first "Job stats" table of a Snakemake log: ``{rule: count, "total": n}`` (empty: nothing to do)."""
    match = re.search(r"Job stats:\njob\s+count\n[- ]+\n((?:\S+\s+\d+\n)+)", output)
    if not match:
        return {}
    return {name: int(n) for name, n in (line.split() for line in match.group(1).splitlines())}


def cells(config_path: Path) -> dict[str, RunSpec]:
    return grid.expand(yaml.safe_load(config_path.read_text())["train"], RunSpec, "train")  # type: ignore[return-value]


def test_run_rerun_and_report_from_the_command_line(tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config())
    first = snakemake_cli(tmp_path, "--cores", "2", "--configfile", str(cfg))
    assert first.returncode == 0, first.stdout[-3000:]
    assert job_counts(first.stdout) == {"train": 2, "aggregate": 1, "plot": 1, "all": 1, "total": 5}
    paths = {cid: tmp_path / s.path("results") for cid, s in cells(cfg).items()}
    stamps = {cid: p.stat().st_mtime_ns for cid, p in paths.items()}

    # a new grid value: only the new cell trains; the finished cells are not touched
    more = tiny_config()
    more["train"]["grid"][0]["batch_size"] = [10, 20]
    cfg2 = write_config(tmp_path / "more.yaml", more)
    second = snakemake_cli(tmp_path, "--cores", "2", "--configfile", str(cfg2))
    assert second.returncode == 0, second.stdout[-3000:]
    assert job_counts(second.stdout)["train"] == 1
    assert {cid: p.stat().st_mtime_ns for cid, p in paths.items()} == stamps
    final = pd.read_csv(tmp_path / "results" / "summary" / "final_accuracy.csv")
    assert sorted(final["batch_size"]) == [10, 10, 20]

    # the report: self-contained, offline, with the figures and captions
    report = snakemake_cli(tmp_path, "--configfile", str(cfg2), "--report", "results/report.html")
    assert report.returncode == 0, report.stdout[-3000:]
    html = (tmp_path / "results" / "report.html").read_text()
    assert len(html) > 100_000
    assert not re.search(r"<script[^>]+src=[\"']https?:", html)
    assert not re.search(r"<link[^>]+href=[\"']https?:", html)
    assert "accuracy.png" in html and "Test accuracy on the whole test split" in html


class BackgroundRun:
    """``snakemake ARGS`` started in its own process group (as a shell starts a foreground job), with its
    output collected by a thread, so a test can wait for a condition and then signal the whole group."""

    def __init__(self, workdir: Path, *args: str):
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *args]
        self.proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, condition, timeout: float = 300) -> None:
        """Poll ``condition()`` until it holds; fails if the run ends first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before the condition held:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.02)

    def signal_group(self, sig: int) -> int:
        """Send ``sig`` to the run's process group (Ctrl-C: SIGINT; ``kill -9 -PGID``: SIGKILL); its exit code."""
        os.killpg(self.proc.pid, sig)
        code = self.proc.wait(timeout=120)
        self.reader.join(timeout=30)
        if sig == signal.SIGKILL:  # jobs of the group die with it; make sure none outlives the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        return code


def _four_cells(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Four logistic cells on generated data (each job ~4 s here, mostly start-up), run two at a time."""
    cfg = tiny_config()
    cfg["train"]["grid"][0]["batch_size"] = [10, 20]
    cfg["train"]["grid"][1]["batch_size"] = [10, 20]
    cfg["train"]["defaults"]["steps"] = 300
    cfg["train"]["defaults"]["eval_every"] = 100
    cfg["plots"] = {"formats": ["html"]}  # no PNG rendering: the run is about the cells
    path = write_config(tmp_path / "four.yaml", cfg)
    targets = [tmp_path / s.path("results") for s in cells(path).values()]
    assert len(targets) == 4
    return path, targets


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp")]


def _check_resumed(resumed: subprocess.CompletedProcess, targets: list[Path], stamps: dict[Path, int],
                   root: Path) -> None:
    """The resumed run succeeded, made every cell and reran only missing cells and those that were still
    running when the first run was stopped (at most 2 jobs at a time): every other finished cell keeps
    its file."""
    first_error = resumed.stdout.find("Error in rule")
    assert resumed.returncode == 0, resumed.stdout[max(first_error, 0):][:6000] or resumed.stdout[-3000:]
    assert all(t.exists() for t in targets)
    for t in targets:
        assert len(pd.read_parquet(t)) == 301  # never half a file: steps 0..300
    missing = len(targets) - len(stamps)
    trained = job_counts(resumed.stdout)["train"]
    assert missing <= trained <= missing + 2, (missing, trained)
    kept = [t for t, stamp in stamps.items() if t.stat().st_mtime_ns == stamp]
    assert len(kept) == len(stamps) - (trained - missing)
    assert not _temporaries(root), "temporary files left behind"


def test_interrupted_run_resumes_with_the_same_command(tmp_path):
    """Ctrl-C (SIGINT to the foreground group) as soon as a first cell's file appears — the moment a job
    has just written its output and Snakemake has not yet registered it as finished (the file is
    complete but still flagged incomplete). The same command, without extra flags, resumes: the
    workflow profile (profiles/default) sets rerun-incomplete."""
    path, targets = _four_cells(tmp_path)
    command = ("--cores", "2", "--configfile", str(path))
    run = BackgroundRun(tmp_path, *command)
    run.wait_until(lambda: any(t.exists() for t in targets))
    code = run.signal_group(signal.SIGINT)
    assert code != 0, run.output()[-2000:]
    done = [t for t in targets if t.exists()]
    assert 1 <= len(done) < len(targets), run.output()[-2000:]  # interrupted for real
    stamps = {t: t.stat().st_mtime_ns for t in done}

    resumed = snakemake_cli(tmp_path, *command)  # the same command again
    assert "IncompleteFilesException" not in resumed.stdout
    _check_resumed(resumed, targets, stamps, tmp_path / "results")


def test_killed_run_resumes_after_unlock(tmp_path):
    """SIGKILL to Snakemake and its jobs (``kill -9``, a lost node) while cells run: the working directory
    stays locked (Snakemake 9 has no stale-lock detection), so the same command stops with the lock
    message; ``snakemake --unlock`` (the README's one line) and then the same command resume."""
    path, targets = _four_cells(tmp_path)
    command = ("--cores", "2", "--configfile", str(path))
    run = BackgroundRun(tmp_path, *command)
    run.wait_until(lambda: any(t.exists() for t in targets))
    assert run.signal_group(signal.SIGKILL) == -signal.SIGKILL
    done = [t for t in targets if t.exists()]
    assert 1 <= len(done) < len(targets)
    stamps = {t: t.stat().st_mtime_ns for t in done}

    locked = snakemake_cli(tmp_path, *command)
    assert locked.returncode != 0 and "Directory cannot be locked" in locked.stdout, locked.stdout[-3000:]
    assert all(t.stat().st_mtime_ns == stamp for t, stamp in stamps.items())  # it touched nothing
    unlock = snakemake_cli(tmp_path, "--configfile", str(path), "--unlock")
    assert unlock.returncode == 0, unlock.stdout[-3000:]
    resumed = snakemake_cli(tmp_path, *command)
    assert "IncompleteFilesException" not in resumed.stdout
    _check_resumed(resumed, targets, stamps, tmp_path / "results")


def test_keep_going_finishes_the_other_cells_and_logs_why_one_failed(tmp_path):
    cfg = tiny_config()
    cfg["train"]["grid"][0]["batch_size"] = [10, 500]  # 500 > the 300 training examples: fails at run time
    path = write_config(tmp_path / "failing.yaml", cfg)
    run = snakemake_cli(tmp_path, "--cores", "2", "--keep-going", "--configfile", str(path))
    assert run.returncode != 0
    specs = list(cells(path).values())
    bad = next(s for s in specs if s.batch_size == 500)
    good = [s for s in specs if s.batch_size != 500]
    assert all((tmp_path / s.path("results")).exists() for s in good)
    assert not (tmp_path / bad.path("results")).exists()
    log = (tmp_path / "logs" / "train" / f"{bad.cell_id()}.log").read_text()
    assert "dpbr: error: --batch-size: 500 exceeds the 300 training examples" in log
    assert not (tmp_path / "results" / "summary" / "metrics.parquet").exists()  # needs every cell


def test_config_error_as_the_user_sees_it(tmp_path):
    cfg = tiny_config()
    cfg["train"]["grid"][1]["attack"] = "empyre"
    path = write_config(tmp_path / "bad.yaml", cfg)
    run = snakemake_cli(tmp_path, "-n", "--configfile", str(path))
    assert run.returncode == 1
    assert "config error: train.grid[1].attack: 'empyre' is not allowed: " in run.stdout
    assert "allowed: " in run.stdout.split("config error:", 1)[1]
    assert "Traceback" not in run.stdout
