"""Benchmark of ``dpbr train``'s simulation loop against an LPD-style reference, side by side in one run.

Prints Markdown tables (the README's "Benchmarks" section):

1. steps/s of dpbr's simulation loop (:class:`dpbr.simulation.Simulation`, what ``dpbr train`` runs)
   and of the reference (``bench/reference_lpd.py``) on the same cells, their ratio, and dpbr's share
   of a step spent outside the gradient computation — data sampling + clipping and privacy + attack
   + rule + update and metrics (the phases of :data:`dpbr.simulation.PHASES` other than
   ``gradient``). Cells:

   * (logit, phishing, n=11, f=5, b=50, mda, little, ε=0.2) — target ≥ 10× the reference;
   * (cnn, mnist, b ∈ {10, 50, 100, 500}, same rule/attack/ε) — target: outside-gradient share
     ≤ 10 % at b ≥ 100 and ≤ 20 % at b = 50.

   The machine is shared, so dpbr and the reference run in alternating *rounds* (dpbr for a few
   steps, then the reference for a few steps, ``--rounds`` times): a busy phase of the machine slows
   both alike. Reported: the median over rounds of each rate and of the per-round ratio (with its
   range), and the median over all of dpbr's steps of the per-step outside-gradient share.

2. Peak resident memory of ``dpbr train --clip-mode per-example`` at (cnn, mnist, b = 500, 6 honest
   workers), run as a child process and read with ``getrusage(RUSAGE_CHILDREN)`` (the child's whole
   address space, torch's allocations included; ``tracemalloc`` would not see them). Target < 4 GB.

Usage::

    python bench/bench_train.py [--quick] [--rounds R] [--data-dir data] [--threads 1]
                                [--phishing PATH] [--cells logit,cnn10,cnn50,cnn100,cnn500] [--no-memory]
                                [--device cuda] [--strategy auto|loop|vmap]

On a GPU the reference runs there too (its model, data and noise on the device).

A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dpbr  # noqa: E402,F401  (before torch, as the dpbr command: its OpenMP setting, dpbr.OPENMP_SPIN_COUNT)
import torch  # noqa: E402

from reference_lpd import ReferenceServer  # noqa: E402

from dpbr import data  # noqa: E402
from dpbr.io import device_name  # noqa: E402
from dpbr.simulation import PHASES, Simulation  # noqa: E402
from dpbr.spec import RunSpec  # noqa: E402

ATTACK = "little(factor=1.5,negative=true)"

#: name -> (model, dataset, b, dpbr steps per round, reference steps per round)
CELLS: dict[str, tuple[str, str, int, int, int]] = {
    "logit": ("logit", "phishing", 50, 400, 40),
    "cnn10": ("cnn", "mnist", 10, 20, 5),
    "cnn50": ("cnn", "mnist", 50, 8, 3),
    "cnn100": ("cnn", "mnist", 100, 6, 2),
    "cnn500": ("cnn", "mnist", 500, 3, 1),
}


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def dpbr_round(spec: RunSpec, ds, device: torch.device, steps: int,
               strategy: str = "auto") -> tuple[float, torch.Tensor, str]:
    """(steps/s, per-step phase seconds ``(steps, len(PHASES))``, gradient strategy) of one run of
    ``steps`` steps of dpbr's simulation loop (built outside the timing; no evaluation)."""
    spec = RunSpec.create(**{**spec.to_dict(), "steps": steps, "eval_every": 0})
    sim = Simulation(spec, ds, device, strategy=strategy)
    sim.evaluate = lambda chunk=2000: (torch.tensor(0.0), torch.tensor(0.0))  # type: ignore[method-assign]
    start = time.perf_counter()
    result = sim.run()
    elapsed = time.perf_counter() - start
    return steps / elapsed, result.phase_seconds, sim.strategy


def reference_round(ref: ReferenceServer, steps: int) -> float:
    """Steps/s of ``steps`` steps of the reference loop."""
    start = time.perf_counter()
    for _ in range(steps):
        ref.step()
    if ref.device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def bench_cell(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Alternate dpbr and reference rounds on one cell; returns the medians."""
    model, dataset, b, steps, ref_steps = CELLS[name]
    if args.quick:
        steps, ref_steps = max(2, steps // 2), max(1, ref_steps // 2)
    ds = data.load(dataset, args.data_dir, device=device)
    spec = RunSpec.create(dataset=dataset, model=model, gar="mda", attack=ATTACK, epsilon=0.2, batch_size=b)
    chosen = args.strategy if model != "logit" else "auto"  # logit: always its closed form
    dpbr_round(spec, ds, device, 2, chosen)  # warm-up: first-call costs (allocator, tables)
    ref = ReferenceServer(spec, ds, device=device)
    ref.step()
    rates, ref_rates, ratios, phases = [], [], [], []
    strategy = ""
    for _ in range(args.rounds):
        rate, ph, strategy = dpbr_round(spec, ds, device, steps, chosen)
        ref_rate = reference_round(ref, ref_steps)
        rates.append(rate)
        ref_rates.append(ref_rate)
        ratios.append(rate / ref_rate)
        phases.append(ph)
    ph = torch.cat(phases)
    grad = PHASES.index("gradient")
    share = 1 - ph[:, grad] / ph.sum(1)
    return {
        "cell": name, "model": model, "dataset": dataset, "b": b, "strategy": strategy,
        "dpbr_steps_per_s": statistics.median(rates), "reference_steps_per_s": statistics.median(ref_rates),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "outside_share": float(share.median()), "outside_share_of_means": float(1 - ph[:, grad].mean() / ph.sum(1).mean()),
        "phase_ms": {p: float(ph[:, i].median()) * 1e3 for i, p in enumerate(PHASES)},
        "rounds": args.rounds, "dpbr_steps_per_round": steps, "reference_steps_per_round": ref_steps,
    }


def peak_memory_per_example(data_dir: str, threads: int) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of ``dpbr train --clip-mode per-example`` at (cnn, mnist, b = 500, h = 6),
    2 steps, in a child process: ``ru_maxrss`` of the waited-for children (KiB on Linux)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dpbr", "train", "--dataset", "mnist", "--model", "cnn", "--gar", "mda",
               "--attack", ATTACK, "--epsilon", "0.2", "--clip-mode", "per-example", "--batch-size", "500",
               "--steps", "2", "--eval-every", "0", "--device", "cpu", "--threads", str(threads),
               "--data-dir", str(data_dir), "--out", str(Path(tmp) / "run.parquet"), "--quiet"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="half the steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating dpbr/reference rounds per cell")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--phishing", default=None, help="local phishing file to import if not cached")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strategy", default="auto", choices=["auto", "loop", "vmap"],
                        help="dpbr's gradient strategy for the CNN cells (auto: what `dpbr train` picks)")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated subset of {', '.join(CELLS)}")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.phishing and not data.cache_paths("phishing", args.data_dir)[0].exists():
        data.fetch("phishing", args.data_dir, source=Path(args.phishing))
    load_start = load_average()
    print(f"device: {device_name(device)} ({platform.machine()}, {os.cpu_count()} cores); torch {torch.__version__}, "
          f"{args.threads} thread(s); load average at start: {load_start}")
    print(f"{args.rounds} alternating rounds per cell; rates and ratio: medians over rounds [ratio range]; "
          "outside-gradient share: median over dpbr's steps; ms per phase: medians over steps.")
    print()
    print("| cell | b | dpbr steps/s | reference steps/s | ratio [range] | outside-gradient share | "
          "dpbr ms per phase (" + "/".join(PHASES) + ") | strategy |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    results = []
    for name in args.cells.split(","):
        r = bench_cell(name, args, device)
        ms = " / ".join(f"{r['phase_ms'][p]:.3g}" for p in PHASES)
        print(f"| {r['model']}, {r['dataset']}, mda/little, ε=0.2 | {r['b']} | {r['dpbr_steps_per_s']:.3g} | "
              f"{r['reference_steps_per_s']:.3g} | {r['ratio']:.1f}× [{r['ratio_min']:.1f}–{r['ratio_max']:.1f}] | "
              f"{r['outside_share']:.1%} | {ms} | {r['strategy']} |", flush=True)
        results.append(r)
    memory = None
    if not args.no_memory:
        peak, seconds = peak_memory_per_example(args.data_dir, args.threads)
        memory = {"peak_rss_gb": peak, "seconds": seconds}
        print()
        print(f"per-example clipping, `dpbr train --clip-mode per-example` (cnn, mnist, b = 500, 6 honest workers, "
              f"chunk 64, 2 steps): peak RSS {peak:.2f} GB (target < 4 GB), {seconds:.0f} s")
    load_end = load_average()
    print()
    print(f"load average at end: {load_end}")
    out = {"results": results, "memory": memory, "load_start": load_start, "load_end": load_end,
           "threads": args.threads, "torch": torch.__version__}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
