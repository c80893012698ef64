r"""Gradient-inversion attacks: DLG, iDLG and Inverting Gradients, restarts batched.

=========  ====================================================================================
``dlg``    Deep Leakage from Gradients (Zhu et al. 2019): dummy images ``u ~ N(0, 1)`` and dummy
           label logits ``l ~ N(0, 1)`` (soft label ``softmax(l)``), squared gradient distance
           summed over layers, L-BFGS with DLG's (= PyTorch's default) settings, ``lr = 1``,
           300 steps (:mod:`dpbr.inversion.lbfgs` says exactly what a step is).
``idlg``   improved DLG (Zhao et al. 2020): the label is read from the last layer's gradient
           (:func:`~dpbr.inversion.objective.infer_labels`), then DLG on the images only.
``ig``     Inverting Gradients (Geiping et al. 2020): cosine distance between the concatenated
           gradients plus ``tv ·`` total variation; Adam (lr 0.1) on the *sign* of the gradient; the
           learning rate is multiplied by 0.1 at 3/8, 5/8 and 7/8 of the iterations (IG's
           ``MultiStepLR`` milestones ``N // 2.667, N // 1.6, N // 1.142``); after every step the
           images are projected onto the box of valid pixels ``[0, 1]``; labels known or inferred.
=========  ====================================================================================

Restarts are independent problems optimised together: for L-BFGS each restart keeps its own state
(:class:`~dpbr.inversion.lbfgs.BatchedLBFGS`); Adam is coordinate-wise, so one Adam on the stacked
restarts *is* independent Adam runs (same step counter and learning rate for all). A restart whose
objective becomes non-finite is frozen and flagged ``failed``; it never stops the others.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from dpbr.inversion.lbfgs import BatchedLBFGS, LBFGSSettings
from dpbr.inversion.objective import GradientMatching

__all__ = ["ATTACKS", "AttackResult", "lbfgs_attack", "inverting_gradients", "ig_lr", "ig_milestones"]

ATTACKS: tuple[str, ...] = ("dlg", "idlg", "ig")

Progress = Callable[[int, int], None]


@dataclass
class AttackResult:
    """The outcome of one attack over ``R`` restarts.

    Attributes
    ----------
    z:
        Final variables ``(R, n)`` (see :class:`~dpbr.inversion.objective.GradientMatching`).
    objective:
        The objective value (with the TV term for IG) at the last point each restart evaluated,
        ``(R,)`` (the caller scores the final points themselves).
    failed:
        ``(R,)``: the objective became non-finite (the restart stopped there).
    iterations:
        L-BFGS steps (DLG/iDLG) or Adam iterations (IG) each restart was active, ``(R,)``.
    updates, evaluations:
        Parameter updates and objective evaluations per restart, ``(R,)``.
    seconds:
        Wall-clock time of the optimisation (all restarts together).
    """

    z: Tensor
    objective: Tensor
    failed: Tensor
    iterations: Tensor
    updates: Tensor
    evaluations: Tensor
    seconds: float


def lbfgs_attack(objective: GradientMatching, z0: Tensor, *, steps: int,
                 settings: LBFGSSettings = LBFGSSettings(), progress: Progress | None = None) -> AttackResult:
    """DLG / iDLG: ``steps`` L-BFGS steps on each restart ``z0 (R, n)`` (independent runs, batched).

    The objective decides which attack it is: soft labels (``labels=None``) → DLG; fixed labels → iDLG.
    """
    started = time.perf_counter()
    opt = BatchedLBFGS(z0, lambda z, rows: objective.value_and_grad(z), settings)
    opt.run(steps, callback=(lambda i: progress(i, steps)) if progress else None)
    if progress:
        progress(steps, steps)
    c = opt.counters
    return AttackResult(z=opt.z, objective=opt.value.clone(), failed=opt.failed.clone(), iterations=c.steps.clone(),
                        updates=c.updates.clone(), evaluations=c.evaluations.clone(),
                        seconds=time.perf_counter() - started)


def ig_milestones(iterations: int) -> tuple[float, float, float]:
    """IG's learning-rate milestones ``(N // 2.667, N // 1.6, N // 1.142)`` ≈ 3/8, 5/8, 7/8 of ``N``."""
    return (iterations // 2.667, iterations // 1.6, iterations // 1.142)


def ig_lr(lr: float, iteration: int, iterations: int) -> float:
    """Learning rate of (0-based) ``iteration``: ``lr · 0.1^{#milestones ≤ iteration}`` (``MultiStepLR``)."""
    return lr * 0.1 ** sum(1 for m in ig_milestones(iterations) if m <= iteration)


def inverting_gradients(objective: GradientMatching, z0: Tensor, *, iterations: int, lr: float = 0.1,
                        signed: bool = True, boxed: bool = True, decay: bool = True,
                        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                        progress: Progress | None = None) -> AttackResult:
    r"""Inverting Gradients (Geiping et al. 2020): Adam on the signed gradient, box projection, step decay.

    Adam as ``torch.optim.Adam`` (defaults ``β = (0.9, 0.999)``, ``ε = 1e-8``):
    :math:`m \leftarrow \beta_1 m + (1-\beta_1) s`, :math:`v \leftarrow \beta_2 v + (1-\beta_2) s^2`,
    :math:`u \leftarrow u - \frac{\eta_t}{1-\beta_1^t}\, m / (\sqrt{v}/\sqrt{1-\beta_2^t} + \varepsilon)`
    with :math:`s = \mathrm{sign}(\nabla)` (``signed``), then ``u`` is clamped to the box of pixels in
    ``[0, 1]`` (``boxed``; soft-label logits, when optimised, are not clamped). :math:`\eta_t` =
    :func:`ig_lr` (``decay``) or ``lr``.
    """
    started = time.perf_counter()
    z = z0.detach().clone()
    R, n = z.shape
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    lo, hi = objective.box()
    nu = objective.layout.image_numel
    failed = torch.zeros(R, dtype=torch.bool, device=z.device)
    value = torch.full((R,), float("nan"), device=z.device, dtype=z.dtype)
    active_iters = torch.zeros(R, dtype=torch.long, device=z.device)
    evaluations = torch.zeros(R, dtype=torch.long, device=z.device)
    b1, b2 = betas
    for it in range(iterations):
        ok = ~failed
        if not bool(ok.any()):
            break
        if bool(ok.all()):
            val, g = objective.value_and_grad(z)
        else:
            rows = ok.nonzero().squeeze(1)
            val_r, g_r = objective.value_and_grad(z[rows])
            val = value.clone()
            val[rows] = val_r
            g = torch.zeros_like(z)
            g[rows] = g_r
        evaluations += ok.long()
        bad = ok & ~(torch.isfinite(val) & torch.isfinite(g).all(1))
        value = torch.where(ok, val, value)
        failed |= bad
        ok &= ~bad
        active_iters += ok.long()
        g = torch.where(ok.unsqueeze(1), g, torch.zeros_like(g))
        s = torch.sign(g) if signed else g
        t = it + 1
        eta = ig_lr(lr, it, iterations) if decay else lr
        m_new = m * b1 + (1 - b1) * s
        v_new = v * b2 + (1 - b2) * s * s
        denom = (v_new.sqrt() / math.sqrt(1 - b2 ** t)) + eps
        z_new = z - (eta / (1 - b1 ** t)) * m_new / denom
        if boxed:
            u_new = torch.maximum(torch.minimum(objective.split(z_new)[0], hi), lo)
            z_new = torch.cat([u_new.reshape(R, nu), z_new[:, nu:]], dim=1)
        keep = ok.unsqueeze(1)
        z = torch.where(keep, z_new, z)
        m = torch.where(keep, m_new, m)
        v = torch.where(keep, v_new, v)
        if progress and (it + 1) % max(1, iterations // 100) == 0:
            progress(it + 1, iterations)
    if progress:
        progress(iterations, iterations)
    return AttackResult(z=z, objective=value, failed=failed, iterations=active_iters, updates=active_iters.clone(),
                        evaluations=evaluations, seconds=time.perf_counter() - started)
