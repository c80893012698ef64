"""Benchmark: a whole training grid through the workflow, end to end, with and without bundles.

    .venv/bin/python bench/bench_grid.py --phishing FILE [--bundles none,seeds,cells:24] [--quick]

The grid is the logistic half of the study's (Guerraoui, Gupta, Pinot, Rouault and Stephan 2021,
arXiv 2102.08166; ``config/paper.yaml``): phishing, 3 rule/attack pairs × 4 privacy settings (no
noise, ε ∈ {0.1, 0.2, 0.5}) × 6 batch sizes × 5 seeds = 360 runs of 1000 steps, evaluated every 50
steps (``--quick``: 2 batch sizes × 2 seeds × 200 steps = 48 runs). Each variant runs the same grid
in a fresh folder as a user would (``python -m snakemake --cores N``, phishing imported by the
workflow's data rule) with the ``dpbr`` next to this file first on ``PYTHONPATH`` (so that a snapshot,
``git archive HEAD | tar -x -C DIR``, benchmarks its own code while the working tree changes), one
after the other in one invocation so that their ratio is measured under
the same machine load:

- ``none``: one job (one Python process) per cell, as before bundles;
- ``seeds``: the seeds of a cell in one job (the default), run as one batched simulation;
- ``cells:K``: up to K compatible cells (same model, n, b, rule; any seed, ε, attack factor) per job.

Prints a Markdown table: jobs, wall-clock time, CPU time of all processes, and whether every
variant wrote the same numbers (the final accuracy of every cell, compared exactly).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def grid_config(results: str, phishing: Path, quick: bool, bundle: object) -> dict:
    """The workflow config of the benchmark grid with the given ``bundle`` setting."""
    batch_sizes = [10, 500] if quick else [10, 25, 50, 100, 250, 500]
    seeds = [1, 2] if quick else [1, 2, 3, 4, 5]
    return {
        "results": results,
        "data": {"dir": "data", "sources": {"phishing": str(phishing)}},
        "device": "cpu",
        "resources": {"train": {"threads": 1, "mem_mb": 2000, "runtime": 60, "gpu": 0}},
        "plots": {"formats": ["html"]},
        "train": {
            "bundle": bundle,
            "defaults": {"workers": 11, "byzantine": 5, "delta": 1.0e-6, "clip": 0.01, "lr": 2, "momentum": 0.99,
                         "steps": 200 if quick else 1000, "eval_every": 50},
            "grid": [{
                "task": [{"model": "logit", "dataset": "phishing"}],
                "pair": [{"gar": "average", "attack": "none"},
                         {"gar": "mda", "attack": "little(factor=1.5,negative=true)"},
                         {"gar": "mda", "attack": "empire(factor=1.1)"}],
                "privacy": [{"epsilon": "none"}, {"epsilon": 0.1}, {"epsilon": 0.2}, {"epsilon": 0.5}],
                "batch_size": batch_sizes,
                "seed": seeds,
            }],
        },
    }


def parse_bundle(text: str) -> object:
    """``none`` / ``seeds`` / ``cells:K`` → the config value."""
    if text.startswith("cells:"):
        return {"cells": int(text.split(":", 1)[1])}
    return text


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_variant(bundle: str, phishing: Path, quick: bool, cores: int, keep: Path | None) -> dict:
    """Run the grid once with ``bundle``; wall and CPU seconds, job count and the final accuracies."""
    work = Path(tempfile.mkdtemp(prefix=f"dpbr-grid-{bundle.replace(':', '')}-"))
    try:
        config = work / "grid.yaml"
        config.write_text(yaml.safe_dump(grid_config("results", phishing, quick, parse_bundle(bundle))))
        cmd = [sys.executable, "-m", "snakemake", "aggregate", "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(work), "--configfile", str(config), "--cores", str(cores), "--quiet", "all"]
        # the dpbr next to this file, whatever is installed (a snapshot of the repository benchmarks itself)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        cpu0, start = children_cpu(), time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - start
        cpu = children_cpu() - cpu0
        if proc.returncode != 0:
            failed = work
            work = None  # keep the folder: its logs/ say which job failed
            raise SystemExit(f"bundle={bundle}: snakemake failed ({proc.returncode}); logs in {failed / 'logs'}; "
                             f"its output ends:\n{proc.stdout[-4000:]}")
        logs = list((work / "logs").rglob("*.log")) if (work / "logs").exists() else []
        jobs = sum(1 for p in logs if "train" in p.parts)
        cells = sorted((work / "results" / "train").rglob("*.parquet"))
        final = {}
        for path in cells:
            frame = pd.read_parquet(path, columns=["step", "test_accuracy", "cell_id"])
            last = frame.dropna(subset=["test_accuracy"]).iloc[-1]
            final[str(last["cell_id"])] = float(last["test_accuracy"])
        if keep is not None:
            shutil.copytree(work / "results", keep / bundle.replace(":", ""), dirs_exist_ok=True)
        return {"bundle": bundle, "jobs": jobs, "cells": len(cells), "wall": wall, "cpu": cpu, "final": final}
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phishing", type=Path, required=True, help="a phishing libsvm file (.gz allowed)")
    parser.add_argument("--bundles", default="none,seeds,cells:24", help="comma-separated variants")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="48 runs of 200 steps instead of 360 of 1000")
    parser.add_argument("--keep", type=Path, default=None, help="copy each variant's results here")
    args = parser.parse_args()
    if not args.phishing.is_file():
        raise SystemExit(f"--phishing: {args.phishing} is not a file")
    load = os.getloadavg()[0]
    rows = [run_variant(b.strip(), args.phishing.resolve(), args.quick, args.cores, args.keep)
            for b in args.bundles.split(",") if b.strip()]
    reference = rows[0]["final"]
    print(f"\nGrid: {rows[0]['cells']} runs ({'quick' if args.quick else 'full'}), --cores {args.cores}, "
          f"load average before {load:.1f}, after {os.getloadavg()[0]:.1f}\n")
    print("| bundle | jobs | wall | CPU (all processes) | wall vs first | same final accuracies as first |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        same = row["final"] == reference
        print(f"| {row['bundle']} | {row['jobs']} | {row['wall'] / 60:.2f} min | {row['cpu'] / 60:.2f} min | "
              f"{row['wall'] / rows[0]['wall']:.2f}× | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
