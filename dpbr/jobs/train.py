"""``dpbr train`` and ``dpbr train-many``: run cells and write one Parquet file per cell (one row per step).

This job joins the pieces — data, simulation, accounting, output — for one :class:`RunSpec` or a
list of them; the command line only parses options into specs and calls :func:`train` (one cell)
or :func:`train_many` (several: the seeds of ``dpbr train --seed 1-5``, or a ``train-many`` list).
Both go through the same checks, runs and writer.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from dpbr.errors import UsageError
from dpbr.io import check_writable, write_parquet
from dpbr.jobs import checkpoints
from dpbr.jobs.bundles import BATCH_MODES, CellJob
from dpbr.jobs.common import (check_choice, check_positive, load_dataset, resolve_device, run_metadata,
                              seed_everything, torch_threads)
from dpbr.simulation import PHASES, STEP_COLUMNS, RunResult, SeedBatch, Simulation
from dpbr.simulation.metrics import honest_dissimilarity
from dpbr.spec import RunSpec

__all__ = ["BATCH_MODES", "ManyReport", "composed_epsilon", "records_frame", "train", "train_many"]

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

    Columns: ``step``, the metrics of :data:`dpbr.simulation.STEP_COLUMNS`, the heterogeneity of the
    honest workers (:data:`dpbr.simulation.metrics.HETEROGENEITY_COLUMNS`:
    ``honest_dissimilarity = (h − 1)/h · honest_deviation_clean²`` and ``dissimilarity_ratio``, from
    :func:`dpbr.simulation.metrics.honest_dissimilarity`), the per-row lists of
    :data:`dpbr.simulation.metrics.WORKER_COLUMNS` (``worker_norms`` list<double>, ``selected_workers``
    list<bool>, ``n`` entries; null at step 0, and ``selected_workers`` an all-null column for a rule
    that does not select), ``seconds_<phase>`` for each phase, ``test_accuracy`` and ``test_loss`` (NaN except at
    evaluation steps), ``status``, the constant facts in ``extra`` and every spec field (plus ``cell_id``).
    """
    n = result.steps_done
    frame = pd.DataFrame({"step": np.arange(0, n + 1, dtype=np.int64)})
    metrics = np.full((n + 1, len(STEP_COLUMNS)), np.nan)
    metrics[1:] = result.metrics.numpy()
    for j, col in enumerate(STEP_COLUMNS):
        frame[col] = metrics[:, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        dissimilarity, ratio = honest_dissimilarity(metrics[:, STEP_COLUMNS.index("honest_deviation_clean")],
                                                    metrics[:, STEP_COLUMNS.index("honest_norm_clean")], spec.honest)
    frame["honest_dissimilarity"] = dissimilarity
    frame["dissimilarity_ratio"] = ratio
    frame["worker_norms"] = _list_column(result.worker_norms, n)
    frame["selected_workers"] = _list_column(result.selected, n)
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
    for name, values in _per_step_columns(spec, result).items():
        column = np.full(n + 1, np.nan)
        column[1:] = values
        frame[name] = column
    frame["status"] = result.status
    for key, value in extra.items():
        frame[key] = value
    for key, value in spec.columns().items():
        frame[key] = value
    return frame


def _per_step_columns(spec: RunSpec, result: RunResult) -> dict[str, Any]:
    """The run's further per-step columns: a system run's own (what the system did, its costs;
    :data:`dpbr.simulation.systems.run.SYSTEM_COLUMNS`), otherwise the one trusted server's constant
    costs (:func:`dpbr.simulation.systems.run.plain_step_cost`)."""
    if result.columns is not None:
        return {name: values.numpy() for name, values in result.columns.items()}
    from dpbr.simulation.systems.costs import COST_COLUMNS
    from dpbr.simulation.systems.run import plain_step_cost

    row = plain_step_cost(spec, int(result.facts["dim"])).as_row()
    return {name: np.full(result.steps_done, value, dtype=np.float64) for name, value in zip(COST_COLUMNS, row.values())}


def _list_column(values: Any, steps: int) -> list[Any]:
    """A list column of ``steps + 1`` rows: ``None`` at step 0, then row ``s − 1`` of ``values``
    (``(steps, n)`` tensor) at step ``s`` as a NumPy array (Parquet: a list of its item type); all
    ``None`` when ``values`` is ``None`` (an all-null column)."""
    if values is None:
        return [None] * (steps + 1)
    return [None, *values.numpy()]


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

    This is :func:`train_many` with one cell (an error in the run is raised, not collected).
    """
    cell = CellJob(spec, Path(out), frozenset(checkpoint_steps),
                   Path(checkpoint_dir) if checkpoint_dir is not None else None)
    report = train_many([cell], data_dir=data_dir, device=device, threads=threads, strategy=strategy, chunk=chunk,
                        batch="off", progress=progress, keep_going=False)
    return report.paths[0]  # type: ignore[return-value]


@dataclass
class ManyReport:
    """What :func:`train_many` did: ``paths[i]`` is cell i's written file (None if it failed) and
    ``failures`` lists ``(i, one-line reason)`` of the cells whose run failed."""

    paths: list[Path | None]
    failures: list[tuple[int, str]] = field(default_factory=list)

    def summary(self, cells: list[CellJob]) -> str:
        """One line naming the first failed cell, its reason, and how many others failed."""
        i, reason = self.failures[0]
        more = f" (and {len(self.failures) - 1} more cells)" if len(self.failures) > 1 else ""
        return f"cell {i} ({cells[i].out}) failed: {reason}{more}"


def _check_cells(cells: list[CellJob]) -> list[Path | None]:
    """Per cell: its output checked writable and its checkpoint folder (None without checkpoints)."""
    several = len(cells) > 1
    dirs: list[Path | None] = []
    seen: dict[Path, str] = {}
    for i, cell in enumerate(cells):
        where = f"cell {i}: " if several else ""
        try:
            out = check_writable(cell.out, "--out")
            ckpt_dir: Path | None = None
            if cell.checkpoint_steps:
                bad = sorted(s for s in cell.checkpoint_steps if s < 0 or s > cell.spec.steps)
                if bad:
                    raise UsageError("--checkpoint-steps", f"steps must lie in 0 .. {cell.spec.steps}, got {bad[0]}")
                ckpt_dir = cell.checkpoint_dir if cell.checkpoint_dir is not None else out.with_suffix(".ckpt")
                if ckpt_dir.resolve() == out.resolve():
                    raise UsageError("--checkpoint-dir", f"{str(ckpt_dir)!r} must differ from --out")
                checkpoints.check_destination(ckpt_dir, "--checkpoint-dir")
        except UsageError as exc:
            raise UsageError(f"{where}{exc.option}", exc.message) from None
        for path, option in ((out, "--out"), (ckpt_dir, "--checkpoint-dir")):
            if path is None:
                continue
            key = path.resolve()
            if key in seen:
                raise UsageError(f"{where}{option}", f"{str(path)!r} is also written by {seen[key]}")
            seen[key] = f"cell {i}" if several else option
        dirs.append(ckpt_dir)
    return dirs


def _groups(cells: list[CellJob], batch: str) -> list[tuple[list[int], bool]]:
    """``(indices, batched)`` of the cells run together, in order of first appearance.

    With ``batch`` off every cell runs alone with :class:`Simulation`. Otherwise cells with equal
    :meth:`~dpbr.spec.RunSpec.batch_key` form a group, run by the batched engine when it has several cells
    (or ``batch`` is on). Cells that save checkpoints run alone (the checkpoint writer follows one
    run)."""
    if batch == "off":
        return [([i], False) for i in range(len(cells))]
    groups: dict[Any, list[int]] = {}
    for i, cell in enumerate(cells):
        key = None if cell.checkpoint_steps or not cell.spec.plain_server else cell.spec.batch_key()
        groups.setdefault(("alone", i) if key is None else ("batch", key), []).append(i)
    return [(group, key[0] == "batch" and (len(group) > 1 or batch == "on")) for key, group in groups.items()]


def train_many(cells: list[CellJob], *, data_dir: str | Path = "data", device: str = "auto",
               threads: int | None = None, strategy: str = "auto", chunk: int = 64, batch: str = "auto",
               progress: Callable[[int, int, float | None], None] | None = None,
               keep_going: bool = True) -> ManyReport:
    """Run several cells in this process and write each one's Parquet file as :func:`train` does.

    Every cell is checked before the first runs (outputs, checkpoints, options, and each dataset,
    loaded once per dataset, against the cells' batch sizes): a problem raises :class:`UsageError`
    and nothing is written. Then the cells run in groups: with ``batch`` ``auto`` the cells that
    :func:`dpbr.simulation.batch.group_key` finds compatible run as one batched problem
    (:class:`~dpbr.simulation.batch.SeedBatch`; each cell's output equals its run alone), ``on``
    runs every group with the batched engine, ``off`` runs one cell after another. A group whose run
    raises is recorded in the report's ``failures`` (``keep_going``; otherwise the error is raised)
    while the other groups still run and write their files. A diverging cell is no failure: its
    file records the step (``status``, ``diverged_at``).

    ``progress(done, total, last accuracy)`` counts steps over all cells.
    """
    dev = resolve_device(device)
    check_choice(batch, BATCH_MODES, "--batch", what="mode")
    ckpt_dirs = _check_cells(cells)
    check_positive(threads, "--threads")
    check_choice(strategy, STRATEGIES, "--grad-strategy")
    check_positive(chunk, "--chunk")
    report = ManyReport(paths=[None] * len(cells))
    total = sum(c.spec.steps for c in cells)
    offset = 0
    with torch_threads(threads) as used_threads:
        seed_everything(cells[0].spec.seed)
        datasets: dict[str, Any] = {}
        for name in dict.fromkeys(c.spec.dataset for c in cells):
            largest = max(c.spec.batch_size for c in cells if c.spec.dataset == name)
            datasets[name] = load_dataset(name, data_dir, dev, batch_size=largest)
        for group, batched in _groups(cells, batch):
            members = [cells[i] for i in group]
            dataset = datasets[members[0].spec.dataset]
            done_before = offset
            offset += sum(c.spec.steps for c in members)

            def tick(step: int, acc: Any, base: int = done_before, width: int = len(members)) -> None:
                if progress is not None:  # a batched run may report one accuracy per member: none shown
                    progress(base + step * width, total, acc if acc is None or isinstance(acc, float) else None)

            try:
                if batched:
                    outcome = _run_batched(members, dataset, dev, strategy, chunk, tick)
                else:
                    outcome = [_run_alone(members[0], ckpt_dirs[group[0]], dataset, dev, strategy, chunk, tick)]
            except Exception as exc:  # noqa: BLE001 - one cell's failure must not lose the others' files
                if not keep_going:
                    raise
                reason = (exc.one_line() if isinstance(exc, UsageError)
                          else f"{type(exc).__name__}: {' '.join(str(exc).split())}")[:500]
                report.failures += [(i, reason) for i in group]
                continue
            for i, (result, facts, wall, run_id) in zip(group, outcome):
                report.paths[i] = _write(cells[i], result, facts, dev, dataset, used_threads, wall, run_id)
    return report


@dataclass(frozen=True)
class _Facts:
    """What the output records about a run besides its metrics (from a Simulation or a batch member)."""

    noise_sigma: float
    dim: int
    h: int
    honest_class_counts: Any
    strategy: str

    @classmethod
    def of(cls, run: Any) -> "_Facts":
        return cls(run.noise_sigma, run.dim, run.h, run.honest_class_counts, run.strategy)


def _run_alone(cell: CellJob, ckpt_dir: Path | None, dataset: Any, dev: Any, strategy: str, chunk: int,
               tick: Callable[[int, float | None], None]) -> tuple[RunResult, _Facts, float, str | None]:
    """One cell with :class:`Simulation` (and its checkpoints): ``(result, facts, wall seconds, run id)``."""
    spec = cell.spec
    seed_everything(spec.seed)
    if spec.plain_server:
        sim = Simulation(spec, dataset, dev, strategy=strategy, chunk=chunk)
    else:
        from dpbr.simulation.systems.run import SystemSimulation

        sim = SystemSimulation(spec, dataset, dev, strategy=strategy, chunk=chunk)
    writer = checkpoints.CheckpointWriter(ckpt_dir, spec=spec.to_dict()) if ckpt_dir is not None else None
    with contextlib.ExitStack() as stack:
        if writer is not None:
            stack.enter_context(writer)  # an exception discards the temporary folder
        started = time.perf_counter()
        result = sim.run(
            progress=tick,
            checkpoint=writer.save if writer is not None else None,
            checkpoint_steps=frozenset(cell.checkpoint_steps),
        )
        wall = time.perf_counter() - started
        if writer is not None:
            writer.commit()
    return result, _Facts.of(sim), wall, writer.run_id if writer is not None else None


def _run_batched(members: list[CellJob], dataset: Any, dev: Any, strategy: str, chunk: int,
                 tick: Callable[[int, float | None], None]) -> list[tuple[RunResult, _Facts, float, str | None]]:
    """Cells of one group as one batched problem (:class:`dpbr.simulation.batch.SeedBatch`). Each
    member's ``wall_seconds`` is its share of the batch's wall time (the time / the number of members,
    as the batch divides its phase times), so the members' times add up to the batch's."""
    seed_everything(members[0].spec.seed)
    run = SeedBatch([c.spec for c in members], dataset, dev, strategy=strategy, chunk=chunk)
    started = time.perf_counter()
    results = run.run(progress=tick)
    wall = (time.perf_counter() - started) / len(members)
    return [(result, _Facts.of(member), wall, None) for result, member in zip(results, run.members)]


def _write(cell: CellJob, result: RunResult, facts: _Facts, dev: Any, dataset: Any, threads: int, wall: float,
           run_id: str | None) -> Path:
    """The cell's Parquet file (rows of :func:`records_frame`, metadata of :func:`run_metadata`), atomically."""
    spec = cell.spec
    smallest_share = int(facts.honest_class_counts.sum(dim=1).min())  # IID: the whole training set
    eps, order = composed_epsilon(spec, smallest_share, result.steps_done)
    extra = {
        "noise_sigma": facts.noise_sigma,
        "epsilon_composed": eps,
        "dim": facts.dim,
        "honest_workers": facts.h,
    }
    frame = records_frame(spec, result, extra)
    meta = run_metadata(
        spec, dev, dataset, threads=threads, status=result.status, diverged_at=result.diverged_at,
        wall_seconds=wall, gradient_strategy=facts.strategy, rdp_order=order,
        honest_class_counts=facts.honest_class_counts.tolist(),
        checkpoint_run_id=run_id,
    )
    return write_parquet(frame, cell.out, meta)
