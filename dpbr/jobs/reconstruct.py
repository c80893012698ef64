"""``dpbr reconstruct``: one gradient-inversion job — attack one batch, score it, write Parquet + PNG.

Steps of :func:`reconstruct`
----------------------------
1. Check everything a user can get wrong (device, output paths, threads, strategy, checkpoint)
   before any work.
2. Load the dataset and the model state (``initial``, or a ``dpbr train`` checkpoint checked against
   the spec by :func:`load_checkpoint`).
3. Prepare, attack and score the case (:mod:`dpbr.inversion.case`), with ``threads`` torch CPU
   threads (default :func:`auto_threads`); the caller's count is restored afterwards.
4. Write one Parquet row per image and the PNG grid (originals above, matched reconstructions
   below), both atomically.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from dpbr.errors import UsageError
from dpbr.inversion.case import Progress, prepare, result_frame
from dpbr.inversion.grid import save_grid
from dpbr.inversion.lbfgs import LBFGSSettings
from dpbr.io import check_writable, write_parquet
from dpbr.jobs import checkpoints
from dpbr.jobs.common import check_choice, check_positive, load_dataset, resolve_device, run_metadata, torch_threads
from dpbr.spec import ReconSpec

__all__ = ["auto_threads", "load_checkpoint", "reconstruct"]

#: Values of ``--strategy`` (how the attacker evaluates its restarts).
STRATEGIES = ("auto", "analytic", "loop", "vmap")


def load_checkpoint(path: str | Path, spec: ReconSpec) -> dict[str, Any]:
    """Read and verify a ``dpbr train`` checkpoint (:func:`dpbr.jobs.checkpoints.load`) and check it fits ``spec``.

    Raises
    ------
    UsageError
        ``--state``: missing, unreadable, corrupt (checksum mismatch) or old-format file, wrong
        content, or a checkpoint of another model/dataset than ``spec``'s.
    """
    p = Path(path)
    ckpt = checkpoints.load(p, option="--state",
                            missing=f"checkpoint {str(p)!r} not found; give 'initial' or a file written by "
                                    "'dpbr train --checkpoint-steps' (…/step=S.pt)")
    from dpbr import data
    from dpbr.registry import canonical

    cs = ckpt["spec"]
    try:
        c_model = canonical(str(cs.get("model")), option="--state")
        c_data = data.canonical_name(str(cs.get("dataset")))
    except UsageError:
        raise UsageError("--state", f"{str(p)!r} names an unknown model or dataset") from None
    if c_model != spec.model or c_data != spec.dataset:
        raise UsageError("--state", f"checkpoint is for model {c_model} on {c_data}, not {spec.model} on {spec.dataset}; "
                                    "pass the same --model and --dataset")
    if "seed" not in cs:
        raise UsageError("--state", f"{str(p)!r} has no training seed in its spec")
    return ckpt


def auto_threads(spec: ReconSpec, dim: int) -> int | None:
    """Torch CPU threads for a job when none is given: 1 for small problems (one thread avoids the
    synchronisation cost of tiny kernels; measured faster for LeNet on MNIST), else torch's default."""
    work = dim * spec.batch_size * spec.restarts
    return 1 if work <= 2_000_000 else None


def _base_model(model: str) -> str:
    from dpbr.spec import _base

    return _base(model, "--model")


def reconstruct(spec: ReconSpec, *, out: str | Path, png: str | Path | None = None, data_dir: str | Path = "data",
                device: str = "auto", threads: int | None = None, strategy: str = "auto",
                progress: Progress | None = None) -> tuple[Path, Path]:
    """Run the job ``spec`` and write ``out`` (Parquet) and ``png`` (default: ``out`` with ``.png``).

    Everything a user can get wrong (device, output paths, threads, checkpoint, data) is checked
    before the attack starts and raised as :class:`UsageError`; nothing is written then.
    """
    dev = resolve_device(device)
    out = check_writable(out, "--out")
    png_path = check_writable(png if png is not None else Path(out).with_suffix(".png"), "--png")
    if png_path.resolve() == out.resolve():
        raise UsageError("--png", "must differ from --out")
    check_positive(threads, "--threads")
    check_choice(strategy, STRATEGIES, "--strategy")
    if strategy == "analytic" and _base_model(spec.model) != "lenet":
        raise UsageError("--strategy", f"'analytic' is implemented for lenet only, not {spec.model}; "
                                       "use auto, loop or vmap")
    checkpoint = load_checkpoint(spec.checkpoint, spec) if spec.checkpoint is not None else None
    dataset = load_dataset(spec.dataset, data_dir, dev)  # prepare() checks the batch size against the images
    case = prepare(spec, dataset=dataset, device=dev, checkpoint=checkpoint, strategy=strategy)
    if threads is None and dev.type == "cpu":
        threads = auto_threads(spec, case.info["dim"])
    with torch_threads(threads) as used_threads:
        started = time.perf_counter()
        result = case.run(progress)
        frame, originals, rec, summary = result_frame(case, result)
        wall = time.perf_counter() - started
    meta = run_metadata(
        spec, dev, dataset, threads=used_threads, status=summary["status"], wall_seconds=wall, strategy=strategy,
        evaluation=case.objective.evaluation(spec.restarts),
        checkpoint=None if checkpoint is None else {"path": str(spec.checkpoint), "step": checkpoint.get("step"),
                                                      "train_spec": checkpoint["spec"]},
        images=case.indices.cpu().tolist(), inferred_labels=None if case.inferred is None else case.inferred.cpu().tolist(),
        lbfgs=None if spec.attack == "ig" else dataclasses.asdict(LBFGSSettings(lr=spec.lr)),
        ssim="standard Gaussian-window SSIM (Wang et al. 2004; 11x11, sigma 1.5, K1 0.01, K2 0.03, L 1)",
        png=str(png_path),
    )
    save_grid(originals, rec, png_path)
    write_parquet(frame, out, meta)
    return out, png_path
