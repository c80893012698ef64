"""One gradient-inversion case: the attacked model, the batch, the shared gradient, the attack, its score.

The threat model follows ``breaching``'s user / server split: the *user* (an honest worker) holds
``B`` training images, computes the mean-loss gradient of the model on them (in training mode) and
applies the defence to it (:mod:`dpbr.privacy.mechanisms` on the flattened gradient, one row); the
*attacker* (the server) sees only the model and that shared gradient, and runs the attack
(:mod:`dpbr.inversion.attacks`). Only the scoring looks at the originals.

Steps
-----
1. :func:`build_model`: the model as ``dpbr train`` builds it (:func:`dpbr.models.for_run`), or with a checkpoint's ``theta`` loaded into it.
   Batch-norm layers, if any, use batch statistics and keep no running statistics
   (``torch.func.replace_all_batch_norm_modules_``), as a worker computing a training gradient.
2. :func:`prepare`: draw ``B`` distinct training images (generator ``(seed, "inversion-images")``),
   compute the shared gradient, apply the defence (generator ``(seed, "inversion-defence")``).
   Labels: ``soft`` (DLG optimises them), ``infer`` (iDLG rule on the shared gradient's last layer)
   or ``known``. Dummy variables ``~ N(0, 1)`` (generator ``(seed, "inversion-init")``), one per
   restart.
3. :meth:`Case.run`: run the attack.
4. :func:`result_frame`: score every restart by its final matching distance (without the TV term)
   and keep the best finite one (IG's choice rule; the attacker cannot see the MSE); clip the
   reconstruction to ``[0, 1]``, match it to the originals (Hungarian on MSE), compute MSE, PSNR,
   SSIM (standard Gaussian-window SSIM, :mod:`dpbr.inversion.metrics`), label correctness and
   success flags, one row per image.

If every restart's objective became non-finite, the case is scored with ``status = "diverged"``
(metrics NaN, success false) rather than failing. Checking a job's options, loading a checkpoint
file and writing the Parquet file and PNG grid is :mod:`dpbr.jobs.reconstruct`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from dpbr.errors import UsageError
from dpbr.inversion import metrics
from dpbr.inversion.attacks import AttackResult, inverting_gradients, lbfgs_attack
from dpbr.inversion.lbfgs import LBFGSSettings
from dpbr.inversion.objective import GradientMatching, infer_labels, last_layer_weight
from dpbr.spec import ReconSpec

__all__ = ["Case", "build_model", "prepare", "result_frame", "shared_gradient", "use_mkldnn"]

Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------- #
# Model state


def build_model(spec: ReconSpec, dataset: Any, device: torch.device, checkpoint: dict[str, Any] | None) -> nn.Module:
    """The attacked model: as ``dpbr train`` builds it (state ``initial``) or with the checkpoint's ``theta``."""
    from dpbr import models

    seed = int(checkpoint["spec"]["seed"]) if checkpoint is not None else spec.seed
    mean, std = spec.normalization(dataset)
    model = models.for_run(spec.model, dataset, seed, device=device, normalization=(mean, std))
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
# The case: prepared, attacked, scored


class Case:
    """Everything one reconstruction needs, prepared by :func:`prepare` (no attack run yet)."""

    def __init__(self, spec: ReconSpec, model: nn.Module, objective: GradientMatching, x: Tensor, y: Tensor,
                 indices: Tensor, z0: Tensor, clean: list[Tensor], shared: list[Tensor], inferred: Tensor | None,
                 device: torch.device, info: dict[str, Any]) -> None:
        self.spec, self.model, self.objective = spec, model, objective
        self.x, self.y, self.indices, self.z0 = x, y, indices, z0
        self.clean, self.shared, self.inferred = clean, shared, inferred
        self.device, self.info = device, info

    def run(self, progress: Progress | None = None) -> AttackResult:
        """Run the attack of the spec on this case."""
        s = self.spec
        if s.attack in ("dlg", "idlg"):
            return lbfgs_attack(self.objective, self.z0, steps=s.iterations, settings=LBFGSSettings(lr=s.lr),
                                progress=progress)
        return inverting_gradients(self.objective, self.z0, iterations=s.iterations, lr=s.lr, progress=progress)


def prepare(spec: ReconSpec, *, dataset: Any, device: torch.device, checkpoint: dict[str, Any] | None = None,
            strategy: str = "auto") -> Case:
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
    return Case(spec, model, objective, x, y, indices, z0, clean, shared, inferred, device, info)


def result_frame(case: Case, result: AttackResult) -> tuple[pd.DataFrame, Tensor, Tensor, dict[str, Any]]:
    """Score ``result``: ``(frame, originals, matched reconstructions, summary)``.

    One row per original image (in batch order) with its matched reconstruction's metrics; the
    case-level facts (status, chosen restart, distance, counts, rates) repeat on every row.
    """
    spec, obj = case.spec, case.objective
    B = spec.batch_size
    distances = obj.distance_only(result.z)
    valid = ~result.failed & torch.isfinite(distances)
    status = "ok" if bool(valid.any()) else "diverged"
    if status == "ok":
        chosen = int(torch.argmin(torch.where(valid, distances, torch.full_like(distances, math.inf))))
    else:
        chosen = -1
    originals = case.x.detach()
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
    y = case.y.cpu().numpy()
    frame = pd.DataFrame({
        "image": np.arange(B, dtype=np.int64),
        "index": case.indices.cpu().numpy().astype(np.int64),
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
        **case.info,
    }
    for key, value in summary.items():
        frame[key] = value
    for key, value in spec.columns().items():
        frame[key] = value if value is not None else "none"
    return frame, originals, rec_m, summary


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
