"""Benchmark of the Snakemake workflow: dry-run time of big grids and the cost of one job.

    .venv/bin/python bench/bench_workflow.py [--repeats 3] [--cells 10000] [--trivial 4]

Prints a table (medians over ``--repeats`` runs, wall-clock seconds, each a fresh ``python -m
snakemake`` as a user runs it, in a temporary folder):

- start-up: a dry run of an empty grid (Python, Snakemake and its plugins, torch and dpbr imports);
- dry run of the paper grid (config/paper.yaml, 900 cells) and of a generated grid of ``--cells``
  cells (logistic model on generated data, 100 batch sizes × N seeds), with the per-job cost
  ``(dry run − start-up) / jobs``;
- a trivial cell (logistic model, 1 step, no evaluation): run directly with ``python -m dpbr
  train`` and through the workflow (``--trivial`` cells, ``--cores 1``); the workflow's own cost per
  job is ``(run − start-up) / cells − direct``.

Also reports the machine load and speed (a fixed pure-Python loop, before and after: this
shared machine's speed varies up to threefold), and how long the SLURM client tools take to answer:
the SLURM executor plugin asks them once per Snakemake start; where the tools are installed but no
controller runs (this machine after the integration test) that is a fixed ~9 s delay of every start,
so the timings are taken with a stand-in ``scontrol`` that fails at once, plus one paper dry run
with the real probe.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
SYNTH = "synthetic(d=68,classes=2,n=200,n_test=50)"


def wall(cmd: list[str], cwd: Path, timeout: float = 1800, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall seconds and output of one command (fails loudly on a non-zero exit)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    return seconds, proc.stdout


def snakemake(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *args]


def median_wall(cmd: list[str], cwd: Path, repeats: int, env: dict[str, str] | None = None) -> tuple[float, str]:
    runs = [wall(cmd, cwd, env=env) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), runs[-1][1]


def total_jobs(output: str) -> int:
    for line in output.splitlines():
        if line.startswith("total"):
            return int(line.split()[1])
    return 0


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Table:
    """Markdown table rows printed as they are measured (a failure keeps what was measured)."""

    WIDTH = 66

    def header(self) -> None:
        print(f"| {'measurement'.ljust(self.WIDTH)} | value |", flush=True)
        print(f"|{'-' * (self.WIDTH + 2)}|-------|", flush=True)

    def append(self, row: tuple[str, str]) -> None:
        print(f"| {row[0].ljust(self.WIDTH)} | {row[1]} |", flush=True)


def python_speed(loops: int = 10_000_000) -> float:
    """Seconds of a fixed pure-Python loop: the machine's speed at the moment (this shared machine's
    single-core speed varies up to threefold with its neighbours; 0.6–0.7 s is its normal)."""
    start = time.perf_counter()
    total = 0
    for i in range(loops):
        total += i
    return time.perf_counter() - start


def perf_counts(cmd: list[str], cwd: Path, env: dict[str, str] | None) -> tuple[float, float] | None:
    """``(instructions, CPU seconds)`` of one run of ``cmd`` under ``perf stat``, or None without perf.

    Instructions retired hardly depend on the machine's neighbours (wall and CPU time do, up to
    threefold here): the figure to compare between versions of the workflow.
    """
    perf = shutil.which("perf")
    if perf is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".csv") as out:
        proc = subprocess.run([perf, "stat", "-x,", "-e", "instructions,task-clock", "-o", out.name, *cmd], cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, timeout=1800)
        values = {}
        for line in Path(out.name).read_text().splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[0].replace(".", "", 1).isdigit():
                values[parts[2]] = float(parts[0])
    if proc.returncode != 0 or "instructions" not in values or "task-clock" not in values:
        return None
    return values["instructions"], values["task-clock"] / 1000.0


def fake_probe_env(work: Path) -> dict[str, str] | None:
    """An environment whose ``scontrol`` fails at once, where SLURM's client tools are installed.

    The SLURM executor plugin runs ``scontrol show config`` when Snakemake loads it, at every
    start. With the tools installed but no controller (this machine after the integration test)
    that waits ~9 s; on a cluster it answers at once, and without the tools it is skipped. The
    stand-in isolates Snakemake's and dpbr's own time; the probe is measured on its own.
    """
    if not shutil.which("scontrol"):
        return None
    fake = work / "fake-bin"
    fake.mkdir(exist_ok=True)
    (fake / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    (fake / "scontrol").chmod(0o755)
    return {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ.get('PATH', '')}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--trivial", type=int, default=4)
    args = parser.parse_args()

    rows = Table()
    load_before = os.getloadavg()
    speed_before = python_speed()
    print(f"dpbr workflow benchmark — {os.cpu_count()}-core machine, load average {load_before[0]:.1f} at start, "
          f"medians of {args.repeats} runs; machine speed: a 10M-iteration Python loop takes "
          f"{speed_before:.2f} s (normal here: 0.6–0.7 s)\n", flush=True)
    rows.header()
    with tempfile.TemporaryDirectory(prefix="dpbr-bench-") as tmp:
        work = Path(tmp)
        env = fake_probe_env(work)
        note = " (SLURM probe answered at once)" if env else ""
        base = {"device": "cpu", "plots": {"formats": ["png"]}}
        empty = write(work / "empty.yaml", {**base, "train": {"grid": []}})
        paper_cfg = str(REPO / "config" / "paper.yaml")
        startup, _ = median_wall(snakemake(work, "-n", "--quiet", "rules", "--configfile", str(empty)), work,
                                 args.repeats, env)
        rows.append((f"start-up (dry run, empty grid){note}", f"{startup:.2f} s"))

        paper, out = median_wall(snakemake(work, "-n", "--quiet", "rules", "--configfile", paper_cfg), work,
                                 args.repeats, env)
        jobs = total_jobs(out)
        rows.append((f"dry run, paper grid ({jobs} jobs){note}", f"{paper:.2f} s"))
        rows.append(("  per job beyond start-up", f"{1000 * (paper - startup) / jobs:.2f} ms"))
        counted = perf_counts(snakemake(work, "-n", "--quiet", "rules", "--configfile", paper_cfg), work, env)
        if counted is not None:
            rows.append(("  the same, CPU instructions and CPU time (`perf stat`, 1 run)",
                         f"{counted[0] / 1e9:.1f} G, {counted[1]:.2f} s"))
        if env is not None:
            probed, _ = median_wall(snakemake(work, "-n", "--quiet", "rules", "--configfile", paper_cfg), work, 1)
            rows.append(("dry run, paper grid, with the SLURM probe waiting (1 run)", f"{probed:.2f} s"))

        seeds = -(-args.cells // 100)
        big = write(work / "big.yaml", {**base, "train": {
            "defaults": {"dataset": SYNTH, "model": "logit", "steps": 1, "eval_every": 0},
            "grid": [{"batch_size": list(range(1, 101)), "seed": list(range(1, seeds + 1))}]}})
        big_s, out = median_wall(snakemake(work, "-n", "--quiet", "rules", "--configfile", str(big)), work,
                                 max(1, args.repeats - 1), env)
        jobs = total_jobs(out)
        rows.append((f"dry run, generated grid ({jobs - 3} cells, {jobs} jobs){note}", f"{big_s:.2f} s"))
        rows.append(("  per job beyond start-up", f"{1000 * (big_s - startup) / jobs:.2f} ms"))

        trivial_cfg = {"defaults": {"dataset": SYNTH, "model": "logit", "steps": 1, "eval_every": 0},
                       "grid": [{"seed": list(range(1, args.trivial + 1))}]}
        trivial = write(work / "trivial.yaml", {**base, "train": trivial_cfg})
        from dpbr.report.grid import expand
        from dpbr.spec import RunSpec

        specs = list(expand(trivial_cfg, RunSpec, "train").values())
        direct_cmd = [sys.executable, "-m", "dpbr", "train", *specs[0].cli_args(), "--out",
                      str(work / "direct.parquet"), "--device", "cpu", "--threads", "1", "--quiet"]
        # direct and workflow runs alternate, so that both see the same phases of the machine
        directs, runs, overheads = [], [], []
        for _ in range(max(1, args.repeats - 1)):
            directs.append(wall(direct_cmd, work)[0])
            shutil.rmtree(work / "results", ignore_errors=True)
            shutil.rmtree(work / ".snakemake", ignore_errors=True)
            targets = [str(s.path("results")) for s in specs]
            # targets before --configfile (which takes several values)
            runs.append(wall(snakemake(work, *targets, "--cores", "1", "--configfile", str(trivial)), work, env=env)[0])
            overheads.append((runs[-1] - startup) / len(specs) - directs[-1])
        direct, run = statistics.median(directs), statistics.median(runs)
        rows.append(("trivial cell, `python -m dpbr train` directly", f"{direct:.2f} s"))
        rows.append((f"trivial cells through the workflow ({len(specs)} cells, --cores 1){note}", f"{run:.2f} s"))
        rows.append(("  per cell (beyond start-up)", f"{(run - startup) / len(specs):.2f} s"))
        rows.append(("  Snakemake's own cost per job (median of paired differences; ± noise)",
                     f"{statistics.median(overheads):.2f} s [{min(overheads):.2f} to {max(overheads):.2f}]"))

        probe = shutil.which("scontrol")
        if probe:
            t = time.perf_counter()
            subprocess.run([probe, "show", "config"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=120)
            rows.append(("SLURM probe at each start (`scontrol show config`)", f"{time.perf_counter() - t:.2f} s"))
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}; machine speed at the end: "
          f"{python_speed():.2f} s for the 10M-iteration loop")


if __name__ == "__main__":
    main()
