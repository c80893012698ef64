"""Benchmark: DLG on LeNet, one MNIST training image, 300 L-BFGS steps, on the CPU.

Prints a Markdown table with the median (and min/max) wall time of ``--runs`` runs of

* ``dpbr``: the ``dpbr reconstruct`` attack (:class:`dpbr.inversion.lbfgs.BatchedLBFGS`, one restart,
  the hand-derived LeNet objective of :mod:`dpbr.inversion.closed_form`), timed from the prepared job
  (data loaded, model built, shared gradient computed) to the final point;
* ``dpbr, autograd evaluation``: the same with ``--strategy loop`` (the objective by autograd's double
  backward), to separate the optimiser's and the evaluation's share of the speed-up;
* ``reference``: the DLG script's loop — ``torch.optim.LBFGS([dummy_data, dummy_label])`` with its
  default settings and a closure that builds the gradient with ``create_graph=True``, sums the squared
  differences and calls ``backward()`` — on the same model, shared gradient and starting point, with
  PyTorch's default convolution backend (oneDNN), as the script runs;
* ``reference + dpbr's conv backend``: the same loop with the convolution backend dpbr chooses
  (PyTorch's native kernels for LeNet on one image), to separate the two sources of speed-up;

with the median CPU time of the process (one torch thread: equal to the wall time on an idle machine,
less sensitive to other load), the number of L-BFGS steps, parameter updates (``reference``: torch's
``n_iter``) and closure evaluations, the wall time per evaluation, the reconstruction's MSE and the
ratio of medians ``time / dpbr`` (reference median / dpbr median of the same case: the speed-up).

Cases (``--cases``): no defence, where DLG converges and dpbr freezes the converged run after a few
dozen steps; and Gaussian noise on the shared gradient (σ = 1e-2 by default, also σ = 0.1), where
DLG cannot match the gradient and keeps iterating for all 300 steps (about 5,000 evaluations, close
to the worst case of 300 × 20): the regime of the DLG script's "4–5 thousand closure evaluations"
and the case the ≤ 30 s target is about.

Usage::

    python bench/bench_inversion.py [--runs 3] [--reference-runs 3] [--backend-runs 1] [--loop-runs 1] [--seed 1]
        [--cases "none;gaussian(sigma=0.01)"] [--data-dir data]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dpbr  # noqa: E402,F401  (before torch: its OpenMP setting, dpbr.OPENMP_SPIN_COUNT)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dpbr import data  # noqa: E402
from dpbr.inversion import metrics  # noqa: E402
from dpbr.inversion.case import prepare  # noqa: E402
from dpbr.jobs.reconstruct import auto_threads  # noqa: E402
from dpbr.spec import ReconSpec  # noqa: E402


def run_dpbr(job):
    t, c = time.perf_counter(), time.process_time()
    res = job.run()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    rec = job.objective.images(res.z[:1])[0].clamp(0, 1)
    return wall, cpu, int(res.iterations[0]), int(res.updates[0]), int(res.evaluations[0]), float(metrics.mse(rec, job.x)[0])


def run_reference(job, steps: int, backend: bool = False):
    """The DLG script's optimisation loop (Zhu et al. 2019, ``main.py``) on ``job``'s problem."""
    obj = job.objective
    u0, l0 = obj.split(job.z0[:1])
    dummy_data = u0[0].clone().requires_grad_(True)            # DLG optimises the network input directly
    dummy_label = l0[0].clone().requires_grad_(True)
    params = list(job.model.parameters())
    target = obj.target
    mean, std = obj.mean, obj.std
    optimizer = torch.optim.LBFGS([dummy_data, dummy_label])
    count = [0]

    def closure():
        optimizer.zero_grad()
        count[0] += 1
        pred = job.model(mean + std * dummy_data)
        loss = torch.mean(torch.sum(-F.softmax(dummy_label, dim=-1) * F.log_softmax(pred, dim=-1), 1))
        dy_dx = torch.autograd.grad(loss, params, create_graph=True)
        grad_diff = 0
        for gx, gy in zip(dy_dx, target):
            grad_diff += ((gx - gy) ** 2).sum()
        grad_diff.backward()
        return grad_diff

    t, c = time.perf_counter(), time.process_time()
    with contextlib.ExitStack() as stack:
        if backend:
            stack.enter_context(obj._backend())
        for _ in range(steps):
            optimizer.step(closure)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    rec = (mean + std * dummy_data.detach()).clamp(0, 1)
    n_iter = optimizer.state[optimizer._params[0]]["n_iter"]
    return wall, cpu, steps, n_iter, count[0], float(metrics.mse(rec, job.x)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reference-runs", type=int, default=3)
    ap.add_argument("--backend-runs", type=int, default=1, help="runs of the reference loop with dpbr's conv backend")
    ap.add_argument("--loop-runs", type=int, default=1, help="runs of dpbr with autograd evaluation (--strategy loop)")
    ap.add_argument("--cases", default="none;gaussian(sigma=0.01)",
                    help="';'-separated defences ('none' = no defence) [default: %(default)s]")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--data-dir", default=os.environ.get("DPBR_DATA_DIR", str(ROOT / "data")))
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: dpbr's choice, 1 here]")
    args = ap.parse_args()

    ds = data.load("mnist", args.data_dir)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}; torch {torch.__version__}")
    print()
    print("| case | implementation | runs | median s | min s | max s | median CPU s | L-BFGS steps | updates | evaluations | ms / evaluation | MSE | time / dpbr |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [c.strip() for c in args.cases.split(";") if c.strip()]
    for case in cases:
        defence = None if case == "none" else case
        label = "no defence" if defence is None else defence
        spec = ReconSpec.create(attack="dlg", model="lenet", dataset="mnist", iterations=args.steps, seed=args.seed,
                                defence=defence)
        job = prepare(spec, dataset=ds, device=torch.device("cpu"))
        job_loop = prepare(spec, dataset=ds, device=torch.device("cpu"), strategy="loop")
        threads = args.threads or auto_threads(spec, job.info["dim"]) or torch.get_num_threads()
        torch.set_num_threads(threads)
        dpbr_median = None
        for name, fn, runs in (("dpbr", lambda: run_dpbr(job), args.runs),
                               ("dpbr, autograd evaluation", lambda: run_dpbr(job_loop), args.loop_runs),
                               ("reference", lambda: run_reference(job, args.steps), args.reference_runs),
                               ("reference + dpbr's conv backend", lambda: run_reference(job, args.steps, True),
                                args.backend_runs)):
            if runs <= 0:
                continue
            out = [fn() for _ in range(runs)]
            walls = [o[0] for o in out]
            med = statistics.median(walls)
            cpu = statistics.median(o[1] for o in out)
            _, _, steps, updates, evals, mse = out[0]
            if name == "dpbr":
                dpbr_median = med
            ratio = "1.00" if name == "dpbr" else (f"{med / dpbr_median:.2f}" if dpbr_median else "")
            print(f"| {label} | {name} | {runs} | {med:.2f} | {min(walls):.2f} | {max(walls):.2f} | {cpu:.2f} | {steps} | "
                  f"{updates} | {evals} | {1000 * med / max(evals, 1):.2f} | {mse:.2e} | {ratio} |", flush=True)
    print()
    print(f"threads: {torch.get_num_threads()}; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
