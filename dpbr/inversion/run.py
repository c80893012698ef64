"""``dpbr reconstruct``: one gradient-inversion job — attack one batch, score it, write Parquet + PNG.

The threat model follows ``breaching``'s user / server split: the *user* (an honest worker) holds
``B`` training images, computes the mean-loss gradient of the model on them (in training mode) and
applies the defence to it (:mod:`dpbr.privacy.mechanisms` on the flattened gradient, one row); the
*attacker* (the server) sees only the model and that shared gradient, and runs the attack
(:mod:`dpbr.inversion.attacks`). Only the scoring looks at the originals.

Steps of :func:`reconstruct`
----------------------------
1. Check everything a user can get wrong (device, output paths, checkpoint) before any work.
2. Load the dataset; build the model as ``dpbr train`` would (``models.build(..., mean, std,
   seed=derive_seed(seed, "model"))``) or rebuild it from a checkpoint (``theta`` loaded into it).
   Batch-norm layers, if any, use batch statistics and keep no running statistics
   (``torch.func.replace_all_batch_norm_modules_``), as a worker computing a training gradient.
3. Draw ``B`` distinct training images (generator ``(seed, "inversion-images")``), compute the shared
   gradient, apply the defence (generator ``(seed, "inversion-defence")``).
4. Labels: ``soft`` (DLG optimises them), ``infer`` (iDLG rule on the shared gradient's last layer) or
   ``known``. Dummy variables ``~ N(0, 1)`` (generator ``(seed, "inversion-init")``), one per restart.
5. Run the attack; score every restart by its final matching distance (without the TV term) and keep
   the best finite one (IG's choice rule; the attacker cannot see the MSE).
6. Clip the reconstruction to ``[0, 1]``, match it to the originals (Hungarian on MSE), compute MSE,
   PSNR, SSIM (standard Gaussian-window SSIM, :mod:`dpbr.inversion.metrics`), label correctness and
   success flags; write one Parquet row per image and the PNG grid, both atomically.

If every restart's objective became non-finite, the job is recorded with ``status = "diverged"``
(metrics NaN, success false) rather than failing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from dpbr.errors import UsageError
from dpbr.inversion import metrics
from dpbr.inversion.attacks import AttackResult, inverting_gradients, lbfgs_attack
from dpbr.inversion.grid import save_grid
from dpbr.inversion.lbfgs import LBFGSSettings
from dpbr.inversion.objective import GradientMatching, infer_labels, last_layer_weight
from dpbr.io import check_writable, run_metadata, write_parquet
from dpbr.spec import ReconSpec

__all__ = ["Job", "auto_threads", "build_model", "load_checkpoint", "prepare", "reconstruct", "result_frame", "shared_gradient", "use_mkldnn"]

Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------- #
# Model state


def load_checkpoint(path: str | Path, spec: ReconSpec) -> dict[str, Any]:
    """Read and verify a ``dpbr train`` checkpoint (:func:`dpbr.checkpoints.load`) and check it fits ``spec``.

    Raises
    ------
    UsageError
        ``--state``: missing, unreadable, corrupt (checksum mismatch) or old-format file, wrong
        content, or a checkpoint of another model/dataset than ``spec``'s.
    """
    from dpbr import checkpoints

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


def build_model(spec: ReconSpec, dataset: Any, device: torch.device, checkpoint: dict[str, Any] | None) -> nn.Module:
    """The attacked model: as ``dpbr train`` builds it (state ``initial``) or with the checkpoint's ``theta``."""
    from dpbr import models, rng

    seed = int(checkpoint["spec"]["seed"]) if checkpoint is not None else spec.seed
    mean, std = spec.normalization(dataset)
    model = models.build(spec.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                         mean=mean, std=std, seed=rng.derive_seed(seed, "model"), device=device)
    if checkpoint is not None:
        theta = checkpoint["theta"].reshape(-1)
        d = models.num_params(model)
        if theta.numel() != d:
            raise UsageError("--state", f"checkpoint has {theta.numel()} parameters, the model {spec.model} on "
                                        f"{spec.dataset} has {d}")
        ref = next(model.parameters())
        torch.nn.utils.vector_to_parameters(theta.to(device=ref.device, dtype=ref.dtype), model.parameters())
    torch.func.replace_all_batch_norm_modules_(model)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------------- #
# The user side: the shared gradient


def shared_gradient(model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                    defence: str | None, generator: torch.Generator | None) -> tuple[list[Tensor], list[Tensor]]:
    """``(clean, shared)`` per-parameter gradients of ``loss(model(x), y)``; ``shared`` = defence(clean).

    The defence (a :mod:`dpbr.privacy.mechanisms` spec string) is applied to the flattened gradient
    as one worker row ``(1, d)`` and the result is unflattened.
    """
    params = list(model.parameters())
    with torch.enable_grad():
        clean = [g.detach() for g in torch.autograd.grad(loss(model(x), y), params)]
    if defence is None:
        return clean, [g.clone() for g in clean]
    from dpbr.privacy import mechanisms

    mech = mechanisms.get(defence)
    flat = torch.cat([g.reshape(-1) for g in clean]).unsqueeze(0)
    out = mech(flat, generator=generator).reshape(-1)
    shared, start = [], 0
    for g in clean:
        shared.append(out[start:start + g.numel()].reshape(g.shape).clone())
        start += g.numel()
    return clean, shared


# ----------------------------------------------------------------------------------------------- #
# The job


class Job:
    """Everything one reconstruction job needs, prepared by :func:`prepare` (no attack run yet)."""

    def __init__(self, spec: ReconSpec, model: nn.Module, objective: GradientMatching, x: Tensor, y: Tensor,
                 indices: Tensor, z0: Tensor, clean: list[Tensor], shared: list[Tensor], inferred: Tensor | None,
                 device: torch.device, info: dict[str, Any]) -> None:
        self.spec, self.model, self.objective = spec, model, objective
        self.x, self.y, self.indices, self.z0 = x, y, indices, z0
        self.clean, self.shared, self.inferred = clean, shared, inferred
        self.device, self.info = device, info

    def run(self, progress: Progress | None = None) -> AttackResult:
        """Run the attack of the spec on this job."""
        s = self.spec
        if s.attack in ("dlg", "idlg"):
            return lbfgs_attack(self.objective, self.z0, steps=s.iterations, settings=LBFGSSettings(lr=s.lr),
                                progress=progress)
        return inverting_gradients(self.objective, self.z0, iterations=s.iterations, lr=s.lr, progress=progress)


def prepare(spec: ReconSpec, *, dataset: Any, device: torch.device, checkpoint: dict[str, Any] | None = None,
            strategy: str = "auto") -> Job:
    """Build the model, draw the batch, compute the shared gradient and the attacker's objective."""
    from dpbr import models, rng

    n_train = int(dataset.y_train.shape[0])
    if spec.batch_size > n_train:
        raise UsageError("--batch-size", f"{spec.batch_size} exceeds the {n_train} training images of {spec.dataset}")
    model = build_model(spec, dataset, device, checkpoint)
    loss = models.loss(spec.model)
    g_img = rng.generator(spec.seed, "inversion-images")
    indices = torch.randperm(n_train, generator=g_img)[: spec.batch_size].to(dataset.y_train.device)
    x = dataset.x_train[indices].to(device)
    y = dataset.y_train[indices].to(device)
    g_def = rng.generator(spec.seed, "inversion-defence", device=device)
    clean, shared = shared_gradient(model, loss, x, y, spec.defence, g_def)
    inferred = None
    if spec.labels == "infer":
        inferred = infer_labels(shared[last_layer_weight(model, dataset.num_classes)], spec.batch_size)
        labels = inferred
    elif spec.labels == "known":
        labels = y
    else:
        labels = None
    mean, std = spec.normalization(dataset)
    objective = GradientMatching(
        model, shared, loss=loss, batch=spec.batch_size, image_shape=dataset.input_shape,
        num_classes=dataset.num_classes, labels=labels, mean=mean, std=std,
        distance="l2" if spec.attack in ("dlg", "idlg") else "cosine", tv=spec.tv, strategy=strategy,
        mkldnn=use_mkldnn(spec, dataset.input_shape, device),
    )
    g_init = rng.generator(spec.seed, "inversion-init")
    ref = next(model.parameters())
    z0 = torch.randn(spec.restarts, objective.numel, generator=g_init).to(device=device, dtype=ref.dtype)
    info = {
        "dim": int(sum(p.numel() for p in model.parameters())),
        "grad_norm": float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in clean]))),
        "shared_grad_norm": float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in shared]))),
    }
    return Job(spec, model, objective, x, y, indices, z0, clean, shared, inferred, device, info)


def _thresholds_columns(prefix: str, values: np.ndarray) -> dict[str, Any]:
    return {f"{prefix}_{metrics.threshold_label(t)}": v for t, v in zip(metrics.THRESHOLDS, values)}


def result_frame(job: Job, result: AttackResult) -> tuple[pd.DataFrame, Tensor, Tensor, dict[str, Any]]:
    """Score ``result``: ``(frame, originals, matched reconstructions, summary)``.

    One row per original image (in batch order) with its matched reconstruction's metrics; the
    job-level facts (status, chosen restart, distance, counts, rates) repeat on every row.
    """
    spec, obj = job.spec, job.objective
    B = spec.batch_size
    distances = obj.distance_only(result.z)
    valid = ~result.failed & torch.isfinite(distances)
    status = "ok" if bool(valid.any()) else "diverged"
    if status == "ok":
        chosen = int(torch.argmin(torch.where(valid, distances, torch.full_like(distances, math.inf))))
    else:
        chosen = -1
    originals = job.x.detach()
    if chosen >= 0:
        z = result.z[chosen]
        rec = obj.images(z.unsqueeze(0))[0].clamp(0.0, 1.0)
        perm = metrics.match(rec, originals)
        perm_t = torch.as_tensor(perm, device=rec.device)
        rec_m = rec[perm_t]
        mse_v = metrics.mse(rec_m, originals).double().cpu().numpy()
        psnr_v = metrics.psnr(rec_m, originals).double().cpu().numpy()
        ssim_v = metrics.ssim(rec_m, originals).double().cpu().numpy()
        _, lab = obj.split(z.unsqueeze(0))
        if lab is not None:
            pred = lab[0].argmax(dim=-1)
        else:
            pred = obj.labels
        pred_m = pred[perm_t].cpu().numpy()
        distance = float(distances[chosen])
        objective_value = float(result.objective[chosen])
        counts = {k: int(getattr(result, k)[chosen]) for k in ("iterations", "updates", "evaluations")}
    else:
        perm = np.arange(B)
        rec_m = torch.full_like(originals, float("nan"))
        mse_v = psnr_v = ssim_v = np.full(B, np.nan)
        pred_m = np.full(B, -1, dtype=np.int64)
        distance = objective_value = float("nan")
        counts = {k: int(getattr(result, k).max()) for k in ("iterations", "updates", "evaluations")}
    y = job.y.cpu().numpy()
    frame = pd.DataFrame({
        "image": np.arange(B, dtype=np.int64),
        "index": job.indices.cpu().numpy().astype(np.int64),
        "label": y.astype(np.int64),
        "label_pred": pred_m.astype(np.int64),
        "label_correct": pred_m == y,
        "matched": perm.astype(np.int64),
        "mse": mse_v,
        "psnr": psnr_v,
        "ssim": ssim_v,
    })
    for t in metrics.THRESHOLDS:
        frame[f"success_{metrics.threshold_label(t)}"] = np.nan_to_num(mse_v, nan=np.inf) < t
    rates = {f"success_rate_{metrics.threshold_label(t)}": float(frame[f"success_{metrics.threshold_label(t)}"].mean())
             for t in metrics.THRESHOLDS}
    summary: dict[str, Any] = {
        "status": status,
        "restart": chosen,
        "restarts_failed": int(result.failed.sum()),
        "distance": distance,
        "objective": objective_value,
        "iterations_run": counts["iterations"],
        "updates": counts["updates"],
        "evaluations": counts["evaluations"],
        "seconds": float(result.seconds),
        **rates,
        "label_accuracy": float(frame["label_correct"].mean()),
        **job.info,
    }
    for key, value in summary.items():
        frame[key] = value
    for key, value in spec.columns().items():
        frame[key] = value if value is not None else "none"
    return frame, originals, rec_m, summary


def _base_model(model: str) -> str:
    from dpbr.spec import _base

    return _base(model, "--model")


def use_mkldnn(spec: ReconSpec, input_shape: Any, device: torch.device) -> bool | None:
    """CPU convolution backend of the attacker's evaluations (a fixed rule, so results are reproducible).

    oneDNN off (PyTorch's native kernels) for ``lenet``/``cnn`` with at most 4,096 input pixels in
    the batch (``B·C·H·W``): measured about 2× faster for LeNet on one MNIST image, on par at B = 8;
    left on otherwise (ResNets: oneDNN measured 1.5× faster). ``None`` (untouched) off the CPU.
    """
    if device.type != "cpu":
        return None
    from dpbr.spec import _base

    pixels = spec.batch_size * math.prod(int(s) for s in input_shape)
    small = _base(spec.model, "--model") in ("lenet", "cnn") and pixels <= 4096
    return False if small else True


def auto_threads(spec: ReconSpec, dim: int) -> int | None:
    """Torch CPU threads for a job when none is given: 1 for small problems (one thread avoids the
    synchronisation cost of tiny kernels; measured faster for LeNet on MNIST), else torch's default."""
    work = dim * spec.batch_size * spec.restarts
    return 1 if work <= 2_000_000 else None


def reconstruct(spec: ReconSpec, *, out: str | Path, png: str | Path | None = None, data_dir: str | Path = "data",
                device: str = "auto", threads: int | None = None, strategy: str = "auto",
                progress: Progress | None = None) -> tuple[Path, Path]:
    """Run the job ``spec`` and write ``out`` (Parquet) and ``png`` (default: ``out`` with ``.png``).

    Everything a user can get wrong (device, output paths, threads, checkpoint, data) is checked
    before the attack starts and raised as :class:`UsageError`; nothing is written then.
    """
    from dpbr import data as data_mod
    from dpbr.train import resolve_device

    dev = resolve_device(device)
    out = check_writable(out, "--out")
    png_path = check_writable(png if png is not None else Path(out).with_suffix(".png"), "--png")
    if png_path.resolve() == out.resolve():
        raise UsageError("--png", "must differ from --out")
    if threads is not None and threads < 1:
        raise UsageError("--threads", f"must be >= 1, got {threads}")
    if strategy not in ("auto", "analytic", "loop", "vmap"):
        raise UsageError("--strategy", f"unknown strategy {strategy!r}; allowed: auto, analytic, loop, vmap")
    if strategy == "analytic" and _base_model(spec.model) != "lenet":
        raise UsageError("--strategy", f"'analytic' is implemented for lenet only, not {spec.model}; "
                                       "use auto, loop or vmap")
    checkpoint = load_checkpoint(spec.checkpoint, spec) if spec.checkpoint is not None else None
    dataset = data_mod.load(spec.dataset, Path(data_dir), device=dev)
    previous_threads = torch.get_num_threads()
    try:
        job = prepare(spec, dataset=dataset, device=dev, checkpoint=checkpoint, strategy=strategy)
        n_threads = threads if threads is not None else (auto_threads(spec, job.info["dim"]) if dev.type == "cpu" else None)
        if n_threads is not None:
            torch.set_num_threads(n_threads)
        started = time.perf_counter()
        result = job.run(progress)
        frame, originals, rec, summary = result_frame(job, result)
        wall = time.perf_counter() - started
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    meta = run_metadata(
        spec, dev, status=summary["status"], wall_seconds=wall, threads=used_threads, strategy=strategy,
        evaluation=job.objective.evaluation(spec.restarts),
        dataset_source=getattr(dataset, "source", None), dataset_checksum=getattr(dataset, "checksum", None),
        checkpoint=None if checkpoint is None else {"path": str(spec.checkpoint), "step": checkpoint.get("step"),
                                                      "train_spec": checkpoint["spec"]},
        images=job.indices.cpu().tolist(), inferred_labels=None if job.inferred is None else job.inferred.cpu().tolist(),
        lbfgs=None if spec.attack == "ig" else dataclasses.asdict(LBFGSSettings(lr=spec.lr)),
        ssim="standard Gaussian-window SSIM (Wang et al. 2004; 11x11, sigma 1.5, K1 0.01, K2 0.03, L 1)",
        png=str(png_path), argv=" ".join(sys.argv), host=os.uname().nodename,
    )
    save_grid(originals, rec, png_path)
    write_parquet(frame, out, meta)
    return out, png_path
