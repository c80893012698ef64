"""Gradient inversion: reconstruct training images from the gradient a worker shares — DLG (Zhu, Liu,
Han 2019, arXiv 1906.08935), iDLG (Zhao, Mopuri, Bilen 2020, arXiv 2001.02610), Inverting Gradients
(Geiping et al. 2020, arXiv 2003.14053).

Modules
-------
:mod:`~dpbr.inversion.objective`  the gradient-matching objective (L2 for DLG, cosine + TV for IG),
                                  label inference (iDLG), batched over restarts
:mod:`~dpbr.inversion.lbfgs`      independent L-BFGS runs batched together (DLG's optimiser)
:mod:`~dpbr.inversion.attacks`    ``dlg``, ``idlg`` and ``ig`` (Inverting Gradients)
:mod:`~dpbr.inversion.metrics`    MSE, PSNR, standard Gaussian-window SSIM, Hungarian matching
:mod:`~dpbr.inversion.grid`       the PNG grid (originals above, reconstructions below)
:mod:`~dpbr.inversion.case`       one case: the attacked model, the batch, the shared gradient
                                  (the user side), the attack and its score
"""

from dpbr.inversion.attacks import ATTACKS, AttackResult, inverting_gradients, lbfgs_attack
from dpbr.inversion.lbfgs import BatchedLBFGS, LBFGSSettings
from dpbr.inversion.metrics import THRESHOLDS, match, mse, psnr, ssim
from dpbr.inversion.objective import GradientMatching, infer_labels, total_variation

__all__ = [
    "ATTACKS",
    "AttackResult",
    "BatchedLBFGS",
    "GradientMatching",
    "LBFGSSettings",
    "THRESHOLDS",
    "infer_labels",
    "inverting_gradients",
    "lbfgs_attack",
    "match",
    "mse",
    "psnr",
    "ssim",
    "total_variation",
]
