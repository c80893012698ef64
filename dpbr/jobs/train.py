"""``dpbr train``: run one cell and write its Parquet file (one row per step).

This job joins the pieces — data, simulation, accounting, output — for one :class:`RunSpec`; the
command line only parses options into a spec and calls :func:`train`.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from dpbr.errors import UsageError
from dpbr.io import check_writable, write_parquet
from dpbr.jobs import checkpoints
from dpbr.jobs.common import (check_choice, check_positive, load_dataset, resolve_device, run_metadata,
                              seed_everything, torch_threads)
from dpbr.simulation import PHASES, STEP_COLUMNS, RunResult, Simulation
from dpbr.spec import RunSpec

__all__ = ["train", "records_frame", "composed_epsilon"]

#: Values of ``--grad-strategy`` (``auto``: :func:`dpbr.simulation.choose_strategy`).
STRATEGIES = ("auto", "closed-form", "loop", "vmap")


def composed_epsilon(spec: RunSpec, sample_size: int, steps: int) -> tuple[float, float]:
    """(ε over ``steps`` steps by the RDP accountant of the subsampled Gaussian mechanism, best order).

    The noise multiplier is ``σ / (2C/b) = sqrt(2 ln(1.25/δ))/ε`` (the classic Gaussian mechanism's
    σ with sensitivity ``2C/b``; Dwork & Roth 2014) and the sampling rate ``q = b / N_i``, where
    ``N_i = sample_size`` is the number of examples the worker samples from: the whole training set
    (IID), or under a non-IID split the smallest honest worker's share — the worker whose examples are
    sampled most often, so the run's ε is the worst worker's (Mironov, Talwar, Zhang 2019,
    arXiv 1908.10530). NaN without noise.
    """
    if spec.epsilon is None:
        return math.nan, math.nan
    from dpbr.privacy import accounting

    z = accounting.noise_multiplier(spec.epsilon, spec.delta)
    q = min(1.0, spec.batch_size / sample_size)
    eps, order = accounting.composed_epsilon(q, z, steps, spec.delta)
    return float(eps), float(order)


def records_frame(spec: RunSpec, result: RunResult, extra: dict[str, Any]) -> pd.DataFrame:
    """The output table: step 0 (evaluation of the initial model) then one row per step.

    Columns: ``step``, the metrics of :data:`dpbr.simulation.STEP_COLUMNS`, ``seconds_<phase>`` for
    each phase, ``test_accuracy`` and ``test_loss`` (NaN except at evaluation steps), ``status``, the
    constant facts in ``extra`` and every spec field (plus ``cell_id``).
    """
    n = result.steps_done
    frame = pd.DataFrame({"step": np.arange(0, n + 1, dtype=np.int64)})
    metrics = np.full((n + 1, len(STEP_COLUMNS)), np.nan)
    metrics[1:] = result.metrics.numpy()
    for j, col in enumerate(STEP_COLUMNS):
        frame[col] = metrics[:, j]
    seconds = np.full((n + 1, len(PHASES)), np.nan)
    seconds[1:] = result.phase_seconds.numpy()
    for j, phase in enumerate(PHASES):
        frame[f"seconds_{phase}"] = seconds[:, j]
    acc = np.full(n + 1, np.nan)
    loss = np.full(n + 1, np.nan)
    for step, (a, l) in result.evaluations.items():
        acc[step], loss[step] = a, l
    frame["test_accuracy"] = acc
    frame["test_loss"] = loss
    frame["status"] = result.status
    for key, value in extra.items():
        frame[key] = value
    for key, value in spec.columns().items():
        frame[key] = value
    return frame


def train(spec: RunSpec, *, out: str | Path, data_dir: str | Path = "data", device: str = "auto",
          threads: int | None = None, strategy: str = "auto", chunk: int = 64,
          checkpoint_steps: frozenset[int] = frozenset(), checkpoint_dir: str | Path | None = None,
          progress: Callable[[int, int, float | None], None] | None = None) -> Path:
    """Run the cell ``spec`` and write ``out`` (Parquet) atomically; returns the path.

    Everything a user can get wrong (device, data, batch size larger than the data, unwritable
    output) is checked before the first step and raised as :class:`UsageError`. ``threads`` torch
    CPU threads are used during the run; the caller's count is restored afterwards.

    With ``checkpoint_steps``, θ at those steps goes to ``checkpoint_dir`` (default ``out`` with the
    suffix ``.ckpt``) in the format of :mod:`dpbr.jobs.checkpoints`: written into a temporary folder
    and swapped in whole when the run ends, so the folder holds this run's checkpoints only; the run
    id is recorded in ``out``'s metadata as ``checkpoint_run_id``. The metadata also holds
    ``honest_class_counts``: per honest worker, its number of training examples of each class.
    """
    dev = resolve_device(device)
    out = check_writable(out, "--out")
    ckpt_dir: Path | None = None
    if checkpoint_steps:
        bad = sorted(s for s in checkpoint_steps if s < 0 or s > spec.steps)
        if bad:
            raise UsageError("--checkpoint-steps", f"steps must lie in 0 .. {spec.steps}, got {bad[0]}")
        ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out.with_suffix(".ckpt")
        if ckpt_dir.resolve() == out.resolve():
            raise UsageError("--checkpoint-dir", f"{str(ckpt_dir)!r} must differ from --out")
        checkpoints.check_destination(ckpt_dir, "--checkpoint-dir")
    check_positive(threads, "--threads")
    check_choice(strategy, STRATEGIES, "--grad-strategy")
    check_positive(chunk, "--chunk")
    with torch_threads(threads) as used_threads:
        seed_everything(spec.seed)
        dataset = load_dataset(spec.dataset, data_dir, dev, batch_size=spec.batch_size)
        sim = Simulation(spec, dataset, dev, strategy=strategy, chunk=chunk)

        writer = checkpoints.CheckpointWriter(ckpt_dir, spec=spec.to_dict()) if ckpt_dir is not None else None
        with contextlib.ExitStack() as stack:
            if writer is not None:
                stack.enter_context(writer)  # an exception discards the temporary folder
            started = time.perf_counter()
            result = sim.run(
                progress=(lambda s, acc: progress(s, spec.steps, acc)) if progress else None,
                checkpoint=writer.save if writer is not None else None,
                checkpoint_steps=frozenset(checkpoint_steps),
            )
            wall = time.perf_counter() - started
            if writer is not None:
                writer.commit()
    smallest_share = int(sim.honest_class_counts.sum(dim=1).min())  # IID: the whole training set
    eps, order = composed_epsilon(spec, smallest_share, result.steps_done)
    extra = {
        "noise_sigma": sim.noise_sigma,
        "epsilon_composed": eps,
        "dim": sim.dim,
        "honest_workers": sim.h,
    }
    frame = records_frame(spec, result, extra)
    meta = run_metadata(
        spec, dev, dataset, threads=used_threads, status=result.status, diverged_at=result.diverged_at,
        wall_seconds=wall, gradient_strategy=sim.strategy, rdp_order=order,
        honest_class_counts=sim.honest_class_counts.tolist(),
        checkpoint_run_id=writer.run_id if writer is not None else None,
    )
    return write_parquet(frame, out, meta)
