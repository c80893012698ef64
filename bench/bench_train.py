"""Benchmark of ``dpbr train`` against an LPD-style reference, side by side in one process.

Prints a Markdown table: steps/s of dpbr's simulation and of the reference (bench/reference_lpd.py)
on the same cells, their ratio, and dpbr's share of a step spent outside the gradient computation
(data sampling + privacy + attack + rule + update and bookkeeping). Cells (issue 3):

* (logit, phishing, n=11, f=5, b=50, mda, little, ε=0.2) — target ≥ 10× the reference;
* (cnn, mnist, b ∈ {10, 100, 500}, same rule/attack/ε) — target: outside-gradient share ≤ 10 % at
  b ≥ 100 and ≤ 20 % at b = 50.

Also measures the peak memory of per-example clipping at (cnn, b=500, 6 honest workers) in a child
process (target < 4 GB). Usage::

    python bench/bench_train.py [--quick] [--data-dir data] [--threads N] [--phishing PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_lpd import ReferenceServer  # noqa: E402

from dpbr import data  # noqa: E402
from dpbr.io import device_name  # noqa: E402
from dpbr.simulation import PHASES, Simulation  # noqa: E402
from dpbr.spec import RunSpec  # noqa: E402

ATTACK = "little(factor=1.5,negative=true)"


def time_dpbr(spec: RunSpec, ds, device: torch.device, steps: int) -> tuple[float, dict[str, float]]:
    """(steps/s, median seconds per phase) of dpbr's simulation loop (evaluation excluded)."""
    spec = RunSpec.create(**{**spec.to_dict(), "steps": steps, "eval_every": 0})
    sim = Simulation(spec, ds, device)
    sim.evaluate = lambda chunk=2000: (torch.tensor(0.0), torch.tensor(0.0))  # type: ignore[method-assign]
    warm = RunSpec.create(**{**spec.to_dict(), "steps": 2})
    Simulation(warm, ds, device).run()  # warm-up: first-call costs (vmap, allocator)
    start = time.perf_counter()
    result = sim.run()
    elapsed = time.perf_counter() - start
    phases = {p: float(result.phase_seconds[:, i].median()) for i, p in enumerate(PHASES)}
    phases["_strategy"] = sim.strategy  # type: ignore[assignment]
    return steps / elapsed, phases


def time_reference(spec: RunSpec, ds, steps: int) -> float:
    """Steps/s of the reference loop."""
    ref = ReferenceServer(spec, ds)
    ref.step()
    start = time.perf_counter()
    for _ in range(steps):
        ref.step()
    return steps / (time.perf_counter() - start)


def peak_memory_per_example(data_dir: str, threads: int) -> float:
    """Peak resident memory (GB) of a child process running per-example clipping at (cnn, b=500, h=6)."""
    code = f"""
import resource, torch
torch.set_num_threads({threads})
from dpbr import data
from dpbr.simulation import Simulation
from dpbr.spec import RunSpec
spec = RunSpec.create(dataset="mnist", model="cnn", gar="mda", attack="{ATTACK}", epsilon=0.2,
                      clip_mode="per-example", batch_size=500, steps=2, eval_every=0)
ds = data.load("mnist", "{data_dir}")
Simulation(spec, ds, torch.device("cpu")).run()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024 / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps per cell")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--phishing", default=None, help="local phishing file to import if not cached")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.phishing and not data.cache_paths("phishing", args.data_dir)[0].exists():
        data.fetch("phishing", args.data_dir, source=Path(args.phishing))
    q = args.quick
    cells = [
        ("logit", "phishing", 50, 100 if q else 300, 20 if q else 50),
        ("cnn", "mnist", 10, 10 if q else 30, 3 if q else 10),
        ("cnn", "mnist", 50, 5 if q else 15, 2 if q else 5),
        ("cnn", "mnist", 100, 4 if q else 10, 2 if q else 4),
        ("cnn", "mnist", 500, 2 if q else 5, 1 if q else 2),
    ]
    print(f"device: {device_name(device)}; torch threads: {args.threads}; torch {torch.__version__}")
    print()
    print("| cell | b | dpbr steps/s | reference steps/s | ratio | dpbr outside-gradient share | dpbr ms per phase (data/grad/privacy/attack/rule/update) | strategy |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for model, dataset, b, steps, ref_steps in cells:
        ds = data.load(dataset, args.data_dir, device=device)
        spec = RunSpec.create(dataset=dataset, model=model, gar="mda", attack=ATTACK, epsilon=0.2, batch_size=b)
        rate, phases = time_dpbr(spec, ds, device, steps)
        ref_rate = time_reference(spec, ds.to("cpu"), ref_steps)
        strategy = phases.pop("_strategy")
        total = sum(phases.values())
        outside = 1 - phases["gradient"] / total
        ms = "/".join(f"{phases[p] * 1000:.1f}" for p in PHASES)
        print(f"| {model}, {dataset}, mda/little, ε=0.2 | {b} | {rate:.1f} | {ref_rate:.2f} | {rate / ref_rate:.1f}× | {outside:.1%} | {ms} | {strategy} |", flush=True)
        results.append({"model": model, "b": b, "dpbr": rate, "reference": ref_rate, "outside": outside, **phases})
    if not args.no_memory:
        peak = peak_memory_per_example(args.data_dir, args.threads)
        print()
        print(f"per-example clipping, (cnn, mnist, b=500, 6 honest workers, chunk 64): peak RSS {peak:.2f} GB (target < 4 GB)")
    print()
    print(json.dumps({"results": results, "load": list(__import__("os").getloadavg())}))


if __name__ == "__main__":
    main()
