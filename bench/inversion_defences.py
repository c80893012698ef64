"""Does each defence stop DLG? Success rates of DLG on LeNet / MNIST at batch size 1, per defence.

For every defence and seed this runs one ``dpbr reconstruct`` job in-process (DLG, DLG's LeNet in its
initial state, one MNIST training image chosen by the seed, 300 L-BFGS steps, one restart) and prints
a Markdown table: the share of seeds whose reconstruction has MSE < 1e-2, 1e-3, 1e-4 on ``[0, 1]``
pixels (iDLG's success convention), the label accuracy, and medians of MSE, PSNR, SSIM and run time.
The raw per-job rows go to a Parquet file (``--out``).

Defences (those DLG — Zhu, Liu, Han 2019, arXiv 1906.08935 — reports on, and quantization): none; magnitude sparsification ``sparsify(p)`` (the study's,
per sign) for p ∈ {0.1, 0.2, 0.3, 0.5}; Gaussian noise ``gaussian(sigma=σ)`` for σ ∈ {1e-4, 1e-3,
1e-2, 1e-1} (variance σ² from 1e-8 to 1e-2 — DLG reports that variance ≥ 1e-2 defends), plus
σ = 10^-1.5 and 10^-0.5 so that the variances 1e-4 … 1e-1 of DLG's figure are covered too; uniform
min–max quantization with 8, 4 and 2 bits, deterministic (round to nearest) and stochastic rounding;
fp16 rounding (DLG: does not defend). The table also gives the median relative distortion of the
shared gradient, ``‖g̃ − g‖ / ‖g‖``, which says how strong a setting is for this model.

Usage::

    python bench/inversion_defences.py [--seeds 10] [--iterations 300] [--workers 1] [--out results/inversion_defences.parquet]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFENCES: list[tuple[str, str | None]] = [
    ("none", None),
    ("sparsify p=0.1", "sparsify(p=0.1)"),
    ("sparsify p=0.2", "sparsify(p=0.2)"),
    ("sparsify p=0.3", "sparsify(p=0.3)"),
    ("sparsify p=0.5", "sparsify(p=0.5)"),
    ("gaussian σ=1e-4 (var 1e-8)", "gaussian(sigma=0.0001)"),
    ("gaussian σ=1e-3 (var 1e-6)", "gaussian(sigma=0.001)"),
    ("gaussian σ=1e-2 (var 1e-4)", "gaussian(sigma=0.01)"),
    ("gaussian σ=3.16e-2 (var 1e-3)", "gaussian(sigma=0.0316227766)"),
    ("gaussian σ=1e-1 (var 1e-2)", "gaussian(sigma=0.1)"),
    ("gaussian σ=3.16e-1 (var 1e-1)", "gaussian(sigma=0.316227766)"),
    ("quantize 8 bits", "quantize(bits=8,kind=uniform)"),
    ("quantize 4 bits", "quantize(bits=4,kind=uniform)"),
    ("quantize 2 bits", "quantize(bits=2,kind=uniform)"),
    ("quantize 8 bits stochastic", "quantize(bits=8,kind=stochastic)"),
    ("quantize 4 bits stochastic", "quantize(bits=4,kind=stochastic)"),
    ("quantize 2 bits stochastic", "quantize(bits=2,kind=stochastic)"),
    ("fp16", "quantize(kind=fp16)"),
]

_DATASET = None


def _init(data_dir: str) -> None:
    global _DATASET
    import torch

    torch.set_num_threads(1)
    from dpbr import data

    _DATASET = data.load("mnist", data_dir)


def _spec(defence: str | None, seed: int, iterations: int, restarts: int, normalize: bool):
    from dpbr.spec import ReconSpec

    return ReconSpec.create(attack="dlg", model="lenet", dataset="mnist", batch_size=1, iterations=iterations,
                            restarts=restarts, defence=defence, seed=seed, normalize=normalize)


def distortion(job) -> float:
    """Relative distortion of the shared gradient, ``‖g̃ − g‖ / ‖g‖`` (flattened over all layers)."""
    import torch

    clean = torch.cat([g.reshape(-1) for g in job.clean])
    shared = torch.cat([g.reshape(-1) for g in job.shared])
    return float(torch.linalg.vector_norm(shared - clean) / torch.linalg.vector_norm(clean))


def add_distortion(frame, dataset):
    """Fill a missing ``distortion`` column (rows written before it existed) by preparing each job
    again — the shared gradient only, no attack."""
    import torch

    from dpbr.inversion.case import prepare

    if "distortion" in frame and frame["distortion"].notna().all():
        return frame
    defence_of = dict(DEFENCES)
    values = []
    for _, r in frame.iterrows():
        if "distortion" in frame and r["distortion"] == r["distortion"]:
            values.append(r["distortion"])
            continue
        spec = _spec(defence_of[r["defence_label"]], int(r["seed"]), int(r["iterations"]), int(r["restarts"]),
                     bool(r["normalize"]))
        values.append(distortion(prepare(spec, dataset=dataset, device=torch.device("cpu"))))
    return frame.assign(distortion=values)


def _job(label: str, defence: str | None, seed: int, iterations: int, restarts: int, normalize: bool = True) -> dict:
    import torch

    from dpbr.inversion.case import prepare, result_frame

    job = prepare(_spec(defence, seed, iterations, restarts, normalize), dataset=_DATASET, device=torch.device("cpu"))
    t = time.perf_counter()
    result = job.run()
    frame, _, _, _ = result_frame(job, result)
    row = frame.iloc[0].to_dict()
    row["distortion"] = distortion(job)
    row["defence_label"] = label
    row["wall"] = time.perf_counter() - t
    return row


def table(frame) -> str:
    """The Markdown table of per-defence rates and medians."""
    lines = [
        "| defence | seeds | ‖g̃−g‖/‖g‖ | success MSE<1e-2 | success MSE<1e-3 | success MSE<1e-4 | label acc. | median MSE | median PSNR dB | median SSIM | diverged | median evaluations | median s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, _ in DEFENCES:
        f = frame[frame["defence_label"] == label]
        if f.empty:
            continue
        n = len(f)

        def rate(col: str) -> str:
            k = int(f[col].sum())
            return f"{k}/{n} ({100 * k / n:.0f} %)"

        psnr = f["psnr"].replace(math.inf, float("nan")).median()
        lines.append(
            f"| {label} | {n} | {f['distortion'].median():.2g} | {rate('success_1e-2')} | {rate('success_1e-3')} | {rate('success_1e-4')} | "
            f"{100 * f['label_correct'].mean():.0f} % | {f['mse'].median():.2e} | {psnr:.1f} | {f['ssim'].median():.3f} | "
            f"{int((f['status'] == 'diverged').sum())} | {f['evaluations'].median():.0f} | {f['wall'].median():.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10, help="number of seeds per defence")
    ap.add_argument("--first-seed", type=int, default=1, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--iterations", type=int, default=300, help="L-BFGS steps")
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="processes (one torch thread each)")
    ap.add_argument("--data-dir", default=os.environ.get("DPBR_DATA_DIR", str(ROOT / "data")))
    ap.add_argument("--out", default=str(ROOT / "results" / "inversion_defences.parquet"))
    ap.add_argument("--only", default=None, help="comma-separated defence labels to run (default: all)")
    ap.add_argument("--table-only", default=None, metavar="PARQUET[,PARQUET...]",
                    help="print the table of earlier runs' --out files (concatenated) and exit")
    ap.add_argument("--no-normalize", action="store_true",
                    help="DLG's original LeNet on raw [0, 1] pixels instead of dpbr's normalising model")
    args = ap.parse_args()

    from dpbr import data
    from dpbr.io import write_parquet

    if args.table_only:
        frame = pd.concat([pd.read_parquet(p) for p in args.table_only.split(",")], ignore_index=True)
        frame = frame.drop_duplicates(subset=["defence_label", "seed"], keep="last")
        frame = add_distortion(frame, data.load("mnist", args.data_dir))
        print(table(frame))
        return
    data.load("mnist", args.data_dir)  # fetch once, before the workers start
    chosen = DEFENCES if args.only is None else [d for d in DEFENCES if d[0] in args.only.split(",")]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    tasks = [(label, d, s) for s in seeds for label, d in chosen]
    started = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_init, initargs=(args.data_dir,)) as pool:
        futures = {pool.submit(_job, label, d, s, args.iterations, args.restarts, not args.no_normalize): (label, s) for label, d, s in tasks}
        for i, fut in enumerate(as_completed(futures), 1):
            rows.append(fut.result())
            label, s = futures[fut]
            r = rows[-1]
            print(f"[{i}/{len(tasks)}] {label} seed {s}: mse {r['mse']:.2e} label {'ok' if r['label_correct'] else 'wrong'} "
                  f"{r['wall']:.1f} s", file=sys.stderr, flush=True)
    frame = pd.DataFrame(rows)
    write_parquet(frame, args.out, {"script": "bench/inversion_defences.py", "args": vars(args)})
    model = "DLG's un-normalised LeNet" if args.no_normalize else "LeNet normalising its input (dpbr's default)"
    print(f"DLG on {model} / MNIST, batch size 1, initial model, {args.iterations} L-BFGS steps, {args.restarts} restart(s), "
          f"seeds {seeds.start}..{seeds.stop - 1}; success = MSE below the threshold on [0, 1] pixels. "
          f"Total {time.perf_counter() - started:.0f} s with {args.workers} worker(s) on {os.cpu_count()} cores.")
    print()
    print(table(frame))


if __name__ == "__main__":
    main()
