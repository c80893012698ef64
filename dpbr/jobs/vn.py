"""``dpbr vn``: build the cells, load data and parameters, measure, write Parquet.

The command line parses options into lists and calls :func:`build_cells` then :func:`run_vn`;
everything a user can get wrong is checked here before any gradient is computed (one-line
:class:`~dpbr.errors.UsageError`). The measurement itself is :mod:`dpbr.vn`.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch

from dpbr.errors import UsageError
from dpbr.io import check_writable, write_parquet
from dpbr.jobs.checkpoints import folder_files, load as load_checkpoint
from dpbr.jobs.common import (build_model, check_choice, check_positive, load_dataset, resolve_device, run_metadata,
                              seed_everything, torch_threads)

__all__ = ["build_cells", "expand_checkpoints", "run_vn"]

#: Values of ``--grad-strategy`` (``auto``: :func:`dpbr.simulation.oracle.choose_strategy` with ``steps=None``).
STRATEGIES = ("auto", "loop", "vmap", "closed-form")


def expand_checkpoints(items: Iterable[str]) -> list[str]:
    """``init`` and files stay; a folder becomes its ``step=<S>.pt`` files in step order (all of one
    run: :func:`dpbr.jobs.checkpoints.folder_files` refuses a folder mixing runs)."""
    out: list[str] = []
    for item in items:
        text = item.strip()
        if not text:
            continue
        if text.lower() == "init":
            out.append("init")
            continue
        p = Path(text)
        if p.is_dir():
            out.extend(str(f) for f in folder_files(p, option="--checkpoint"))
        else:
            out.append(text)
    return out


def build_cells(checkpoints: Sequence[str], options: Mapping[str, Any], *, batch_sizes: Sequence[Any],
                epsilons: Sequence[Any], sparsities: Sequence[Any]) -> list[tuple[str, dict[str, Any] | None, list[Any]]]:
    """``[(checkpoint, loaded checkpoint or None, [VNSpec, ...]), ...]`` for every checkpoint × b × ε × p.

    ``checkpoints`` are ``init``, checkpoint files (read and verified by
    :func:`dpbr.jobs.checkpoints.load`) or their folders. ``options`` holds the other
    :class:`~dpbr.spec.VNSpec` fields (``dataset``/``model`` may be absent: then they come from the
    checkpoints, or the spec's defaults for ``init``). ``run``/``step`` in ``options`` are checked
    against the checkpoint (they exist so that ``VNSpec.cli_args()`` round-trips).
    """
    from dpbr.spec import VNSpec, run_token

    items = expand_checkpoints(checkpoints) or ["init"]
    if len(set(items)) != len(items):
        raise UsageError("--checkpoint", "the same checkpoint is listed twice")
    loaded = [None if c == "init" else load_checkpoint(c, option="--checkpoint") for c in items]
    base = {k: v for k, v in options.items() if v is not None and k not in ("run", "step")}
    for c, ck in zip(items, loaded):
        if ck is None:
            continue
        for key in ("dataset", "model"):
            theirs = ck["spec"].get(key)
            if key in base and theirs is not None and _canon(base[key]) != _canon(theirs):
                raise UsageError(f"--{key}", f"{base[key]!r} differs from the checkpoint's {theirs!r} ({c})")
            base.setdefault(key, theirs)
    want_run, want_step = options.get("run"), options.get("step")
    if want_run is not None:
        VNSpec.create(**{k: v for k, v in base.items() if k in ("dataset", "model")}, run=want_run,
                      step=want_step if (want_step is not None and str(want_run).strip().lower() != "init") else 0)
    out = []
    for c, ck in zip(items, loaded):
        run = "init" if ck is None else run_token(ck["spec"])
        step = 0 if ck is None else int(ck["step"])
        if want_run is not None and str(want_run).strip().lower() != run:
            raise UsageError("--run", f"{want_run!r} does not match {c!r} (run {run})")
        if want_step is not None and int(want_step) != step:
            raise UsageError("--step", f"{want_step!r} does not match {c!r} (step {step})")
        specs = [VNSpec.create(**base, run=run, step=step, batch_size=b, epsilon=e, sparsify=p)
                 for b, e, p in itertools.product(batch_sizes, epsilons, sparsities)]
        ids = [s.cell_id() for s in specs]
        if len(set(ids)) != len(ids):
            raise UsageError("--batch-size", "a batch size, epsilon or sparsify value is listed twice")
        out.append((c, ck, specs))
    models_seen = {(s.dataset, s.model) for _, _, specs in out for s in specs}
    if len(models_seen) > 1:
        raise UsageError("--checkpoint", f"all checkpoints of one call must share dataset and model, got {sorted(models_seen)}")
    return out


def _canon(text: Any) -> str:
    from dpbr.registry import canonical

    return canonical(str(text))


def run_vn(cells: list[tuple[str, dict[str, Any] | None, list[Any]]], *, data_dir: str | Path = "data",
           device: str = "auto", out: str | Path | None = None, root: str | Path = "results",
           min_b_out: str | Path | None = None, eta_out: str | Path | None = None, threads: int | None = None,
           strategy: str = "auto", chunk: int | None = None,
           progress: Callable[[int, int, float | None], None] | None = None) -> list[Path]:
    """Measure every cell of :func:`build_cells` and write the outputs; returns the paths written.

    ``out``: one Parquet with every row; without it each cell goes to ``spec.path(root)``.
    ``min_b_out`` / ``eta_out``: the minimal-b table (:func:`dpbr.vn.bounds.minimal_b_table`) and the
    η table (:func:`dpbr.vn.bounds.eta_table`) of the rows, when given. ``threads`` torch CPU threads
    are used during the measurement; the caller's count is restored afterwards.
    """
    from dpbr import models, rng
    from dpbr.simulation import choose_strategy
    from dpbr.vn.bounds import eta_table, minimal_b_table
    from dpbr.vn.measure import DEFAULT_CHUNK, make_problem, measure, reference_gradient

    dev = resolve_device(device)
    check_positive(threads, "--threads")
    check_choice(strategy, STRATEGIES, "--grad-strategy")
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    check_positive(chunk, "--chunk")
    specs_all = [s for _, _, specs in cells for s in specs]
    for p, opt in ((out, "--out"), (min_b_out, "--min-b-out"), (eta_out, "--eta-out")):
        if p is not None and Path(p).is_dir():
            raise UsageError(opt, f"{str(p)!r} is a directory; give a file path")
    first = specs_all[0]
    with torch_threads(threads) as used_threads:
        seed_everything(first.seed)
        dataset = load_dataset(first.dataset, data_dir, dev, batch_size=max(s.batch_size for s in specs_all))
        n_train = int(dataset.y_train.shape[0])
        if first.reference > n_train:
            raise UsageError("--reference", f"{first.reference} exceeds the {n_train} training examples (0 = all)")
        model = build_model(first.model, dataset, first.seed, dev)
        d = sum(p.numel() for p in model.parameters())
        theta_init = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(dev, torch.float32)
        for c, ck, _ in cells:
            if ck is not None and ck["theta"].shape[0] != d:
                raise UsageError("--checkpoint", f"{c!r} holds {ck['theta'].shape[0]} parameters; {first.model} on "
                                                 f"{first.dataset} has {d}")
        targets: list[Path] = []  # checked (and their folders made) only once every input is known to be valid
        if out is not None:
            targets.append(check_writable(out, "--out"))
        else:
            for s in specs_all:
                check_writable(s.path(root), "--root")
        for p, opt in ((min_b_out, "--min-b-out"), (eta_out, "--eta-out")):
            if p is not None:
                check_writable(p, opt)

        def pick(b: int) -> str:
            # the training run's policy without its run-length condition (steps=None): the model's
            # closed form, else vmap on CUDA and on the CPU while b·d ≤ 10⁷, a loop beyond
            return strategy if strategy != "auto" else choose_strategy(model, dev, b, d, steps=None)

        started = time.perf_counter()
        rows: list[dict[str, Any]] = []
        total = sum(len({(s.batch_size, s.samples) for s in specs}) for _, _, specs in cells)
        done = 0
        for c, ck, specs in cells:
            theta = theta_init if ck is None else ck["theta"].to(dev, torch.float32)
            problem = make_problem(model, models.loss(first.model), dataset.x_train, dataset.y_train, theta=theta,
                                   strategy=pick(max(s.batch_size for s in specs)),
                                   per_example_loss=models.per_example_loss(first.model))
            by_setting: dict[tuple, list[Any]] = {}
            for s in specs:
                by_setting.setdefault((s.clip, s.clip_mode, s.reference, s.seed), []).append(s)
            for group in by_setting.values():
                g0 = group[0]
                t_ref = time.perf_counter()
                ref = reference_gradient(problem, clip=g0.clip, clip_mode=g0.clip_mode, size=g0.reference,
                                         generator=rng.generator(g0.seed, "vn-reference"))
                t_ref = time.perf_counter() - t_ref

                def step(i: int, n: int, acc: float | None, _base: int = done) -> None:
                    if progress is not None:
                        progress(_base + i, total, acc)

                new = measure(problem, group, chunk=chunk, reference=ref, strategy=pick, progress=step)
                for r in new:
                    r["checkpoint"] = c
                    r["seconds_reference"] = t_ref
                rows.extend(new)
                done += len({(s.batch_size, s.samples) for s in group})
        wall = time.perf_counter() - started
    frame = pd.DataFrame(rows)
    meta_extra = dict(wall_seconds=wall, checkpoints=[c for c, _, _ in cells])

    def meta(spec: Any, **extra: Any) -> dict[str, Any]:
        return run_metadata(spec, dev, dataset, threads=used_threads, **extra, **meta_extra)

    written: list[Path] = []
    if out is not None:
        written.append(write_parquet(frame, targets[0], meta(first, cells=[s.cell_id() for s in specs_all])))
    else:
        for s in specs_all:
            part = frame[frame["cell_id"] == s.cell_id()].reset_index(drop=True)
            written.append(write_parquet(part, s.path(root), meta(s)))
    if min_b_out is not None:
        written.append(write_parquet(minimal_b_table(frame), min_b_out, meta(first, table="minimal-b")))
    if eta_out is not None:
        written.append(write_parquet(eta_table(frame), eta_out, meta(first, table="eta")))
    return written
