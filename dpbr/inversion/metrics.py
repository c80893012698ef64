r"""Image-reconstruction metrics on ``[0, 1]`` pixels, and matching reconstructions to originals.

* MSE: :math:`\frac{1}{CHW}\sum (\hat x - x)^2` per image.
* PSNR: :math:`10\log_{10}(1/\mathrm{MSE})` dB (peak 1; ``inf`` for a perfect reconstruction).
* SSIM: the *standard* structural similarity of Wang, Bovik, Sheikh & Simoncelli (2004), "Image
  quality assessment: from error visibility to structural similarity", with their settings: an
  11×11 Gaussian window with σ = 1.5 (normalised to sum 1), :math:`K_1 = 0.01`, :math:`K_2 = 0.03`,
  dynamic range :math:`L = 1`, local statistics :math:`\mu, \sigma^2, \sigma_{xy}` weighted by the
  window, the map computed where the window fits inside the image ("valid"), averaged over the map
  and then over channels:

  .. math:: \mathrm{SSIM} = \mathrm{mean}\,
            \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}{(\mu_x^2+\mu_y^2+C_1)(\sigma_x^2+\sigma_y^2+C_2)},
            \quad C_1 = (K_1 L)^2,\ C_2 = (K_2 L)^2.

  (This equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)``. It is *not* the complex-wavelet CW-SSIM that the
  ``breaching`` library reports as "SSIM".) Images smaller than 11 pixels on a side use the largest
  odd window that fits, with the same σ.
* Matching (batches): reconstructions come in no particular order, so each is assigned to one
  original by the Hungarian algorithm on the MSE cost matrix (``scipy.optimize.linear_sum_assignment``),
  minimising the total MSE, before any metric is reported.
* Success: a reconstruction *succeeds* at threshold τ when its MSE < τ (iDLG's convention), for
  τ ∈ :data:`THRESHOLDS`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["THRESHOLDS", "mse", "psnr", "ssim", "gaussian_window", "match", "threshold_label"]

THRESHOLDS: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
"""MSE thresholds of the success flags and rates (iDLG's convention)."""

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def threshold_label(t: float) -> str:
    """Column suffix of a threshold: ``1e-3 -> "1e-3"``."""
    exp = int(round(math.log10(t)))
    if not math.isclose(10.0 ** exp, t):
        return repr(t)
    return f"1e{exp}"


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per image of ``(N, C, H, W)`` tensors → ``(N,)``."""
    return (a - b).pow(2).reshape(a.shape[0], -1).mean(dim=1)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB for images in ``[0, 1]`` (peak 1): ``10·log10(1/MSE)``; ``inf`` when equal."""
    return 10.0 * torch.log10(1.0 / mse(a, b))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype: torch.dtype = torch.float64) -> Tensor:
    """The ``size × size`` Gaussian window ``w_ij ∝ exp(−(i² + j²)/(2σ²))`` (centred), summing to 1."""
    c = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(c * c) / (2 * sigma * sigma))
    w = torch.outer(g, g)
    return w / w.sum()


def ssim(a: Tensor, b: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Standard Gaussian-window SSIM (Wang et al. 2004; module docstring) per image of ``(N, C, H, W)`` → ``(N,)``.

    Computed in float64. Identical images give exactly 1.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) tensors of the same shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    n, c, h, w = a.shape
    size = min(SSIM_WINDOW, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if size < 1:
        raise ValueError("ssim needs images of at least 1×1")
    x = a.detach().to(torch.float64).reshape(n * c, 1, h, w)
    y = b.detach().to(torch.float64).reshape(n * c, 1, h, w)
    win = gaussian_window(size, SSIM_SIGMA).to(x.device).reshape(1, 1, size, size)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x = F.conv2d(x, win)
    mu_y = F.conv2d(y, win)
    sxx = F.conv2d(x * x, win) - mu_x * mu_x
    syy = F.conv2d(y * y, win) - mu_y * mu_y
    sxy = F.conv2d(x * y, win) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    per_channel = (num / den).reshape(n, c, -1).mean(dim=2)
    return per_channel.mean(dim=1).to(a.dtype if a.is_floating_point() else torch.float32)


def match(reconstructions: Tensor, originals: Tensor) -> np.ndarray:
    """Hungarian assignment of reconstructions to originals on MSE.

    Returns
    -------
    numpy.ndarray
        ``perm`` of shape ``(B,)``: reconstruction ``perm[i]`` is matched to original ``i``
        (minimises ``Σ_i MSE(rec[perm[i]], orig[i])``; non-finite costs count as +∞, i.e. a huge number).
    """
    from scipy.optimize import linear_sum_assignment

    B = originals.shape[0]
    if reconstructions.shape[0] != B:
        raise ValueError(f"{reconstructions.shape[0]} reconstructions for {B} originals")
    r = reconstructions.detach().to(torch.float64).reshape(B, -1)
    o = originals.detach().to(torch.float64).reshape(B, -1)
    cost = torch.cdist(o, r).pow(2) / r.shape[1]     # cost[i, j] = MSE(orig i, rec j)
    cost = cost.cpu().numpy()
    cost = np.where(np.isfinite(cost), cost, 1e300)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(B, dtype=np.int64)
    perm[rows] = cols
    return perm
