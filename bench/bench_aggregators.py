"""Benchmark of the aggregation rules against loop-based references of the kind the public anchors use.

    python bench/bench_aggregators.py [--quick] [--devices cpu,cuda] [--sizes 11x69,11x431080]

For every rule, times one aggregation (median of repeated runs, CUDA synchronised) at
``(n, d) ∈ {(11, 69), (11, 431080), (25, 431080), (11, 10_000_000)}`` on every available device, next
to a straightforward reference written the way LPD (DifferentialByzantine) and ByzFL write them — a
per-pair ``.norm().item()`` distance loop, a Python loop over MDA's subsets, Weiszfeld on the full
``n × d`` differences — and prints a Markdown table with the speed-up. ``f = 5`` unless the rule's
requirement forbids it, then the largest ``f`` it allows (the ``f`` column says which). Also prints
MDA at ``(11, 431080)`` divided by the time of one Gram matrix of the same input.

``--quick`` uses fewer repetitions and runs each reference once at ``d = 10⁷`` (about two minutes
on a 2-core CPU). On a machine shared with other jobs, ``--threads 1 --clock cpu`` measures process
CPU time instead of elapsed time, which other jobs barely disturb. A script, not a test.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dpbr  # noqa: E402,F401  (before torch: its OpenMP setting, dpbr.OPENMP_SPIN_COUNT)
import torch  # noqa: E402

from dpbr import linalg  # noqa: E402
from dpbr.robust import aggregators as A  # noqa: E402

SIZES = [(11, 69), (11, 431_080), (25, 431_080), (11, 10_000_000)]
RULES = [
    "average", "krum", "multi-krum", "median", "trimmed-mean", "meamed", "mda", "bulyan",
    "geometric-median", "centered-clipping", "bucketing(s=2)+median", "nnm+mda",
]
F_DEFAULT = 5
CLOCK = "wall"


# ----------------------------------------------------------------------------------------------- #
# Loop-based references (LPD / ByzFL style). Same definitions as dpbr's rules, written plainly.


def _pair_distances(G: torch.Tensor) -> list[list[float]]:
    """LPD's idiom: one ``.norm().item()`` per pair (a host sync each), squared."""
    n = G.shape[0]
    D = [[0.0] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        d = G[i].sub(G[j]).norm().item() ** 2
        D[i][j] = D[j][i] = d if math.isfinite(d) else math.inf
    return D


def ref_average(G, f):
    return sum(G[i] for i in range(G.shape[0])) / G.shape[0]


def _krum_scores(D, rows, f, k=None):
    k = len(rows) - f - 2 if k is None else k
    return {i: sum(sorted(D[i][j] for j in rows if j != i)[: max(k, 0)]) for i in rows}


def ref_multi_krum(G, f, m=None):
    n = G.shape[0]
    m = n - f if m is None else m
    D = _pair_distances(G)
    scores = _krum_scores(D, list(range(n)), f)
    best = sorted(scores, key=lambda i: (scores[i], sum(D[i]), i))[:m]
    return sum(G[i] for i in best) / m


def ref_krum(G, f):
    return ref_multi_krum(G, f, 1)


def ref_median(G, f):
    return G.median(dim=0).values if G.shape[0] % 2 else G.quantile(0.5, dim=0)


def ref_trimmed_mean(G, f):
    return G.sort(dim=0).values[f:G.shape[0] - f].mean(dim=0)


def ref_meamed(G, f):
    med = ref_median(G, f)
    idx = (G - med).abs().argsort(dim=0)[: G.shape[0] - f]
    return G.gather(0, idx).mean(dim=0)


def ref_mda(G, f):
    """LPD ``brute.py``: pairwise ``.item()`` distances, Python loop over all subsets."""
    n = G.shape[0]
    D = _pair_distances(G)
    best, best_key = None, (math.inf, math.inf)
    for S in itertools.combinations(range(n), n - f):
        diam = tot = 0.0
        for i, j in itertools.combinations(S, 2):
            diam = max(diam, D[i][j])
            tot += D[i][j]
        if (diam, tot) < best_key:
            best, best_key = S, (diam, tot)
    return sum(G[i] for i in best) / (n - f)


def ref_bulyan(G, f):
    n = G.shape[0]
    D = _pair_distances(G)
    full = _krum_scores(D, list(range(n)), f)
    remaining, picks = list(range(n)), []
    for t in range(n - 2 * f):
        scores = _krum_scores(D, remaining, f, n - t - f - 2)
        pick = min(remaining, key=lambda i: (scores[i], full[i], i))
        picks.append(pick)
        remaining.remove(pick)
    X = G[picks]
    beta = n - 4 * f
    med = ref_median(X, f)
    idx = (X - med).abs().argsort(dim=0)[:beta]
    return X.gather(0, idx).mean(dim=0)


def ref_geometric_median(G, f, nu=0.1, iters=8):
    """ByzFL ``GeometricMedian``: Weiszfeld on the full ``n × d`` differences every iteration."""
    z = torch.zeros_like(G[0])
    for _ in range(iters):
        w = 1.0 / torch.linalg.vector_norm(G - z, dim=1).clamp_min(nu)
        z = (w[:, None] * G).sum(0) / w.sum()
    return z


def ref_centered_clipping(G, f, tau=10.0, iters=3):
    """ByzFL ``CenteredClipping`` (without its hidden state)."""
    v = torch.zeros_like(G[0])
    for _ in range(iters):
        diff = G - v
        scale = (tau / torch.linalg.vector_norm(diff, dim=1)).clamp(max=1.0)
        v = v + (diff * scale[:, None]).mean(0)
    return v


def ref_bucketing_median(G, f, s=2):
    """Karimireddy et al.'s ``bucketing_wrapper``: Python loop over buckets, then the inner rule."""
    n = G.shape[0]
    idx = torch.randperm(n).tolist()
    buckets = [sum(G[i] for i in idx[t * s:(t + 1) * s]) / len(idx[t * s:(t + 1) * s]) for t in range(math.ceil(n / s))]
    return ref_median(torch.stack(buckets), f)


def ref_nnm_mda(G, f):
    """ByzFL ``NNM`` (cdist, argpartition, gather ``n × (n−f) × d``), then LPD's brute MDA."""
    dist = torch.cdist(G, G)
    idx = dist.argsort(dim=1)[:, : G.shape[0] - f]
    return ref_mda(G[idx].mean(dim=1), f)


REFERENCES: dict[str, Callable] = {
    "average": ref_average, "krum": ref_krum, "multi-krum": ref_multi_krum, "median": ref_median,
    "trimmed-mean": ref_trimmed_mean, "meamed": ref_meamed, "mda": ref_mda, "bulyan": ref_bulyan,
    "geometric-median": ref_geometric_median, "centered-clipping": ref_centered_clipping,
    "bucketing(s=2)+median": ref_bucketing_median, "nnm+mda": ref_nnm_mda,
}


# ----------------------------------------------------------------------------------------------- #


def timeit(fns: list[Callable[[], object]], device: torch.device, repeats: list[int]) -> list[float]:
    """Median wall time (s) of each function, after one warm-up each, synchronising CUDA.

    The functions are timed round-robin (``fns[0]``, ``fns[1]``, ``fns[0]``, ...; each until it has
    its ``repeats``), so that a slow phase of a shared machine hits all of them alike.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.process_time if CLOCK == "cpu" and device.type == "cpu" else time.perf_counter
    for fn in fns:
        fn()
        sync()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(max(repeats)):
        for k, fn in enumerate(fns):
            if r < repeats[k]:
                t0 = clock()
                fn()
                sync()
                times[k].append(clock() - t0)
    return [statistics.median(t) for t in times]


def choose_f(rule: A.Aggregator, n: int) -> int | None:
    """``F_DEFAULT`` if allowed, else the largest ``f`` the requirement allows (``None`` if none)."""
    for f in range(F_DEFAULT, -1, -1):
        if rule.min_workers(f) <= n:
            return f
    return None


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (about two minutes)")
    ap.add_argument("--devices", default=None, help="comma-separated, default: cpu and cuda if available")
    ap.add_argument("--sizes", default=None, help="comma-separated nxd, e.g. 11x69,25x431080")
    ap.add_argument("--rules", default=None, help="comma-separated rule specs (default: all)")
    ap.add_argument("--no-reference", action="store_true", help="skip the loop-based references")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time (default); cpu: process CPU time (user + system) on the CPU "
                         "device, robust to other jobs on a shared machine; use with --threads 1")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = args.clock
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")] if args.sizes else SIZES
    rules = args.rules.split(",") if args.rules else RULES
    print(f"# dpbr aggregation benchmark ({'quick' if args.quick else 'full'})\n")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch thread(s), {args.clock} clock"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print("float32 inputs ~ N(0, 1); median of repeated calls after a warm-up, dpbr and reference "
          f"interleaved; load average at start {' '.join(open('/proc/loadavg').read().split()[:3]) if Path('/proc/loadavg').exists() else 'n/a'}.\n")
    print("| rule | device | n | d | f | dpbr | reference | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dev_name in devices:
        device = torch.device(dev_name)
        for n, d in sizes:
            G = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(device)
            big = n * d >= 50_000_000
            reps = (2 if big else 7) if args.quick else (5 if big else 21)
            ref_reps = 1 if big else (3 if args.quick else 7)
            jobs = [(spec, None) for spec in rules]
            if "mda" in rules and n >= 25:
                jobs.append(("mda", (n - 1) // 2))  # the largest f MDA's requirement allows: over the limit
            for spec, f_fixed in jobs:
                rule = A.get(spec)
                f = choose_f(rule, n) if f_fixed is None else f_fixed
                row = f"| {spec} | {dev_name} | {n} | {d:,} | {'—' if f is None else f} |"
                if f is None:
                    print(f"{row} n/a ({rule.requirement}) | | |")
                    continue
                try:
                    rule.check(n, f)
                except ValueError:
                    print(f"{row} refused (limit) | | |")
                    continue
                gen = torch.Generator(device=device).manual_seed(0)
                fns, counts = [lambda: rule(G, f, generator=gen)], [reps]
                if not args.no_reference and spec in REFERENCES:
                    fns.append(lambda: REFERENCES[spec](G, f))
                    counts.append(ref_reps)
                ours, *rest = timeit(fns, device, counts)
                ref = rest[0] if rest else None
                ratio = f"{ref / ours:.1f}×" if ref else "—"
                print(f"{row} {fmt(ours)} | {fmt(ref)} | {ratio} |", flush=True)
            del G

    print()
    for dev_name in devices:
        device = torch.device(dev_name)
        G = torch.randn(11, 431_080, generator=torch.Generator().manual_seed(1)).to(device)
        reps = 15 if args.quick else 51
        mda = A.get("mda")
        t_mda, t_gram, t_mm = timeit([lambda: mda(G, 5), lambda: linalg.gram(G), lambda: G @ G.T], device, [reps] * 3)
        print(f"MDA (n = 11, d = 431,080, f = 5) on {dev_name}: {fmt(t_mda)}; one Gram matrix: {fmt(t_gram)} "
              f"(blocked, as used inside) / {fmt(t_mm)} (G @ G.T) → MDA / Gram = {t_mda / t_gram:.2f} "
              f"(vs G @ G.T: {t_mda / t_mm:.2f})")


if __name__ == "__main__":
    main()
