"""Speed of the bucketing experiments' cell: PyTorch's MNIST-example network with 20 honest workers × b = 32.

The setting of Karimireddy, He & Jaggi, *Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing* (ICLR 2022, arXiv 2006.09365) as ``config/bucketing.yaml`` runs it: MNIST, ``mnist-example``
(1,199,882 parameters), n = 25, f = 5, mimic, b = 32 (640 honest examples a step), no clipping, no
noise, non-IID shards. Prints a Markdown table: steps/s of dpbr's simulation loop
(:class:`dpbr.simulation.Simulation`, what ``dpbr train`` runs; no evaluation inside the timing) per
rule and gradient strategy, the milliseconds per phase of a step (medians over steps), and the time of
one evaluation on the whole test split (10,000 images), which the workflow runs every 30 steps.

How the honest gradients are computed (:mod:`dpbr.simulation.oracle`): the 20 workers' mini-batches
are stacked into one ``(h, b, 1, 28, 28)`` tensor; ``vmap`` computes all 20 gradients in one batched
call (``torch.func.vmap`` of ``torch.func.grad`` over the workers: one batched kernel per layer),
``loop`` runs one forward and backward pass per worker. ``auto`` is what ``dpbr train`` picks
(:func:`dpbr.simulation.oracle.choose_strategy`): on the CPU ``loop`` here (b·d = 38 M exceeds its
10⁷ limit for vmap), ``vmap`` on CUDA.

Usage::

    python bench/bench_hetero.py [--steps 10] [--repeats 3] [--rules krum,bucketing(s=2)+krum,...]
                                 [--strategies auto,vmap] [--threads 1] [--device cpu|cuda] [--data-dir data]

A script, not a test. The machine may be shared: steps/s are the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dpbr  # noqa: E402,F401  (before torch, as the dpbr command: its OpenMP setting)
import torch  # noqa: E402

from dpbr import data  # noqa: E402
from dpbr.io import device_name  # noqa: E402
from dpbr.simulation import PHASES, Simulation  # noqa: E402
from dpbr.spec import RunSpec  # noqa: E402

DEFAULT_RULES = "average,krum,bucketing(s=2)+krum,median,cc"


def cell(gar: str, steps: int) -> RunSpec:
    """The exp2 cell of ``config/bucketing.yaml`` (non-IID) with rule ``gar``, ``steps`` steps, no evaluation."""
    return RunSpec.create(dataset="mnist", model="mnist-example", workers=25, byzantine=5, batch_size=32, lr=0.01,
                          momentum=0, clip="none", epsilon="none", gar=gar, attack="mimic(target=auto)",
                          partition="shards", steps=steps, eval_every=0, seed=0)


def run(spec: RunSpec, ds, device: torch.device, strategy: str) -> tuple[float, torch.Tensor, str, Simulation]:
    """(steps/s, per-step phase seconds ``(steps, len(PHASES))``, strategy used, the simulation) of one run."""
    sim = Simulation(spec, ds, device, strategy=strategy)
    sim.evaluate = lambda chunk=2000: (torch.tensor(0.0), torch.tensor(0.0))  # type: ignore[method-assign]
    start = time.perf_counter()
    result = sim.run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return spec.steps / (time.perf_counter() - start), result.phase_seconds, sim.strategy, sim


def evaluation_seconds(spec: RunSpec, ds, device: torch.device, repeats: int) -> float:
    """Median seconds of one evaluation on the whole test split (the simulation's own ``evaluate``)."""
    sim = Simulation(spec, ds, device, strategy="loop")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        acc, _ = sim.evaluate()
        float(acc)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    parser.add_argument("--rules", default=DEFAULT_RULES, help="comma-separated rules (a rule's own commas are kept)")
    parser.add_argument("--strategies", default="auto,vmap", help="comma-separated: auto, loop, vmap")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ds = data.load("mnist", args.data_dir, device=device)
    rules = [r for r in _split_rules(args.rules) if r]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    print(f"device: {device_name(device)} ({platform.machine()}, {os.cpu_count()} cores); torch {torch.__version__}, "
          f"{args.threads} thread(s); load average at start: {_load()}")
    print(f"mnist-example (d = 1,199,882), n = 25, f = 5, mimic, b = 32 (20 honest workers: 640 examples a step), "
          f"non-IID shards, no clipping or noise; {args.steps} steps per run, median of {args.repeats} runs; "
          "ms per phase: medians over steps.")
    print()
    print("| rule | strategy | steps/s | ms per step | ms per phase (" + " / ".join(PHASES) + ") |")
    print("|---|---|---:|---:|---|")
    for rule in rules:
        for strategy in strategies:
            run(cell(rule, 2), ds, device, strategy)  # warm-up: first-call costs (vmap's compilation, allocator)
            rates, phases, used = [], [], ""
            for _ in range(args.repeats):
                rate, ph, used, _ = run(cell(rule, args.steps), ds, device, strategy)
                rates.append(rate)
                phases.append(ph)
            ph = torch.cat(phases)
            ms = " / ".join(f"{float(ph[:, i].median()) * 1e3:.3g}" for i in range(len(PHASES)))
            rate = statistics.median(rates)
            label = f"{strategy} ({used})" if strategy == "auto" else used
            print(f"| {rule} | {label} | {rate:.3g} | {1e3 / rate:.0f} | {ms} |", flush=True)
    evals = evaluation_seconds(cell("average", 1), ds, device, args.repeats)
    print()
    print(f"one evaluation on the 10,000 test images: {evals * 1e3:.0f} ms (median of {args.repeats}); "
          f"load average at end: {_load()}")


def _split_rules(text: str) -> list[str]:
    """Split at commas outside parentheses: ``"krum,bucketing(s=2)+krum"`` → two rules."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*parts, cur.strip()]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
