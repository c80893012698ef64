"""The workflow run as a user runs it (``snakemake`` command line, ``--cores 2``): executed reruns,
an interrupted run resumed, ``--keep-going`` with a failing cell, configuration errors as printed,
and the offline report. Slow (each Snakemake start costs seconds here): ``pytest -m slow``.
"""

from __future__ import annotations

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


def test_interrupted_run_resumes_without_redoing_finished_cells(tmp_path):
    cfg = tiny_config()
    cfg["train"]["grid"][0]["batch_size"] = [10, 20, 30]
    cfg["train"]["defaults"]["steps"] = 2000
    path = write_config(tmp_path / "four.yaml", cfg)
    targets = [tmp_path / s.path("results") for s in cells(path).values()]
    assert len(targets) == 4
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path),
           "--cores", "1", "--configfile", str(path)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 400
    # wait until Snakemake has registered the first finished cell and started the next one
    def started_second() -> bool:
        text = "".join(lines)
        return "Finished jobid" in text and text.count("rule train:") >= 2

    while not started_second():
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-2000:]
        time.sleep(0.1)
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    proc.wait(timeout=120)
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode != 0, out[-2000:]
    done = [t for t in targets if t.exists()]
    assert len(done) == 1, out[-2000:]
    for t in done:  # never half a file
        assert len(pd.read_parquet(t)) == 2001
    assert not list((tmp_path / "results").rglob(".*.tmp")), "temporary files left behind"
    stamps = {t: t.stat().st_mtime_ns for t in done}

    resumed = snakemake_cli(tmp_path, "--cores", "2", "--configfile", str(path))  # the same command again
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert job_counts(resumed.stdout)["train"] == 3
    assert {t: t.stat().st_mtime_ns for t in done} == stamps
    assert all(t.exists() for t in targets)


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
