r"""The estimator of the variance-to-norm ratio from ``K`` independent gradient samples.

Quantity (the variance-to-norm ratio of Guerraoui et al. 2021, arXiv 2102.08166). For the vector ``G`` an honest worker sends,

.. math:: r = \frac{\sqrt{\mathbb E\|G - \mathbb E G\|^2}}{\|\mathbb E G\|},

and with additive Gaussian privacy noise ``G = G^s + O``, ``O ~ N(0, σ² I_d)`` independent of the
clipped mini-batch gradient ``G^s``, :math:`\mathbb E G = \mathbb E G^s` and
:math:`\mathbb E\|G - \mathbb E G\|^2 = V + dσ^2` with :math:`V = \mathbb E\|G^s - \mathbb E G^s\|^2`.

Estimator. From ``K`` i.i.d. samples :math:`G_1..G_K` (rows of a ``(K, d)`` tensor) everything is a
function of the Gram matrix :math:`\Gamma_{ij} = \langle G_i, G_j\rangle` (computed once in float64,
``O(K² d)``), through two *U-statistics over pairs of distinct samples*:

.. math:: \widehat{M^2} = \frac{1}{K(K-1)} \sum_{i \ne j} \langle G_i, G_j \rangle, \qquad
          \widehat V = \frac{1}{K(K-1)} \sum_{i \ne j} \tfrac12 \|G_i - G_j\|^2 .

Both are unbiased: :math:`\mathbb E\langle G_i, G_j\rangle = \|\mathbb E G\|^2` for independent
``i ≠ j``, and :math:`\widehat V` is the usual unbiased sample variance (trace of the sample covariance
with ``K − 1``). The plug-in :math:`\|\bar G\|^2 = \widehat{M^2} + \widehat V / K` is biased upward by
``V/K``, which matters in high dimension (and when ``r`` is large): it is reported only as a diagnostic
(``mean_norm_plugin``). The ratio estimate is :math:`\hat r = \sqrt{\widehat V + dσ^2} / \sqrt{\widehat{M^2}}`
(``+inf`` when :math:`\widehat{M^2} \le 0`, i.e. no detectable mean).

Confidence interval: *percentile bootstrap* (Efron & Tibshirani 1993, ch. 13) over the ``K`` samples,
``B`` resamples drawn from a seeded generator. Each resample is a vector of counts ``w`` (multinomial,
``Σ w = K``); it is evaluated with the *same* U-statistics restricted to pairs of distinct original
samples (a resample's duplicated draws are not independent pairs):

.. math:: \widehat{M^2}(w) = \frac{w^\top \Gamma w - \sum_a w_a^2 \Gamma_{aa}}{K^2 - \sum_a w_a^2}, \qquad
          \widehat V(w) = \frac{\sum_a w_a (K - w_a)\Gamma_{aa} - (w^\top \Gamma w - \sum_a w_a^2 \Gamma_{aa})}{K^2 - \sum_a w_a^2}.

In the bootstrap world these are exactly unbiased for the original estimates (a pair of distinct
originals is uniform over the ``K(K−1)`` ordered pairs), so the bootstrap distribution is centred on
:math:`\hat r` — re-applying the plug-in to resamples would centre it on the biased plug-in instead
and, in high dimension, push the whole interval below the true value. The analytic noise term
``dσ²`` is a constant (no sampling error). The interval is ``[q_{α/2}, q_{1−α/2}]`` of the ``B``
resampled ratios (order statistics, no interpolation, so ``+inf`` resamples are handled).
Coverage is checked statistically in ``tests/test_vn_stats.py``.

Privacy-noise check: :func:`noise_check` compares the empirical distortion ``mean_i ‖G_i^{sent} −
G_i‖²`` of the real mechanism applied to the ``K`` samples with ``dσ²``; for Gaussian noise each
``‖O_i‖²/σ²`` is χ²_d, so the z-score uses the standard error ``σ² sqrt(2d/K)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from dpbr import linalg

__all__ = [
    "RatioEstimate",
    "bootstrap_counts",
    "estimate_ratio",
    "noise_check",
    "pair_statistics",
    "ratio_from",
]

def pair_statistics(gram: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""``(M²̂, V̂)`` of the module docstring for count vectors ``weights`` ``(B, K)`` (None = all ones).

    Returns two float64 tensors of shape ``(B,)`` (``(1,)`` without weights). ``NaN`` where a resample
    holds a single distinct sample (no pair; probability ``K^{1−K}``).
    """
    K = gram.shape[0]
    diag = gram.diagonal()
    if weights is None:
        weights = torch.ones(1, K, dtype=torch.float64)
    w = weights.to(torch.float64)
    quad = ((w @ gram) * w).sum(1)
    w2 = w * w
    tie = (w2 * diag).sum(1)
    pairs = (w.sum(1) ** 2 - w2.sum(1))
    cross = quad - tie
    spread = (w * (w.sum(1, keepdim=True) - w) * diag).sum(1)
    pairs = torch.where(pairs > 0, pairs, torch.full_like(pairs, math.nan))
    return cross / pairs, (spread - cross) / pairs


def ratio_from(mean_sq: Tensor | float, variance: Tensor | float, noise: float = 0.0) -> Tensor:
    """``sqrt(variance + noise) / sqrt(mean_sq)``, ``+inf`` where ``mean_sq <= 0`` (or NaN)."""
    m = torch.as_tensor(mean_sq, dtype=torch.float64)
    v = torch.as_tensor(variance, dtype=torch.float64).clamp(min=0.0) + float(noise)
    out = v.sqrt() / m.clamp(min=0.0).sqrt()
    bad = ~(m > 0)
    return torch.where(bad, torch.full_like(out, math.inf), out)


def bootstrap_counts(K: int, B: int, generator: torch.Generator) -> Tensor:
    """``(B, K)`` float64 resampling counts (each row multinomial with ``K`` draws), from ``generator``."""
    idx = torch.randint(K, (B, K), generator=generator)
    counts = torch.zeros(B, K, dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones(B, K, dtype=torch.float64))
    return counts


@dataclass(frozen=True)
class RatioEstimate:
    """Result of :func:`estimate_ratio` (all float; ``mean_norm`` is ``sqrt(max(M²̂, 0))``)."""

    samples: int
    mean_norm: float
    mean_norm_sq: float
    mean_norm_plugin: float
    variance: float
    noise_variance: float
    ratio: float
    ci_low: float
    ci_high: float
    confidence: float
    bootstrap: int
    ratio_clean: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def estimate_ratio(G: Tensor | None = None, *, gram: Tensor | None = None, noise_variance: float = 0.0,
                   bootstrap: int = 1000, confidence: float = 0.95,
                   generator: torch.Generator | None = None) -> RatioEstimate:
    """Estimate the VN ratio of the distribution the rows of ``G`` ``(K, d)`` are drawn from.

    Parameters
    ----------
    G, gram:
        The ``K`` samples, or their float64 Gram matrix on the CPU
        (``dpbr.linalg.gram(G, dtype=torch.float64).cpu()``) when it is already computed.
    noise_variance:
        Analytic variance added to the numerator (``d·σ²`` of Gaussian privacy noise; 0 for none).
    bootstrap, confidence:
        Number of bootstrap resamples ``B`` (0: no interval, NaN bounds) and the interval's level.
    generator:
        Seeded generator of the resampling (required when ``bootstrap > 0``).
    """
    if gram is None:
        if G is None:
            raise ValueError("give G or gram")
        gram = linalg.gram(G, dtype=torch.float64).cpu()
    K = gram.shape[0]
    if K < 2:
        raise ValueError(f"need at least 2 samples, got {K}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    m2, v = pair_statistics(gram)
    m2, v = float(m2[0]), float(v[0])
    ratio = float(ratio_from(m2, v, noise_variance))
    plugin = math.sqrt(max(float(gram.sum()) / K**2, 0.0))
    lo = hi = math.nan
    if bootstrap > 0:
        if generator is None:
            raise ValueError("a seeded generator is required for the bootstrap")
        vals = []
        for start in range(0, bootstrap, 4096):  # bound the (B, K) count matrix
            w = bootstrap_counts(K, min(4096, bootstrap - start), generator)
            bm2, bv = pair_statistics(gram, w)
            r = ratio_from(bm2, bv, noise_variance)
            vals.append(torch.where(torch.isnan(r), torch.full_like(r, math.inf), r))
        sample = torch.cat(vals).numpy()
        alpha = 1.0 - confidence
        lo = float(np.quantile(sample, alpha / 2, method="inverted_cdf"))
        hi = float(np.quantile(sample, 1 - alpha / 2, method="inverted_cdf"))
    return RatioEstimate(
        samples=K, mean_norm=math.sqrt(max(m2, 0.0)), mean_norm_sq=m2, mean_norm_plugin=plugin, variance=v,
        noise_variance=float(noise_variance), ratio=ratio, ci_low=lo, ci_high=hi, confidence=confidence,
        bootstrap=int(bootstrap), ratio_clean=float(ratio_from(m2, v, 0.0)),
    )


def noise_check(clean: Tensor, sent: Tensor, sigma: float) -> tuple[float, float, float]:
    r"""Empirical privacy distortion of a mechanism versus its analytic Gaussian variance.

    Returns ``(empirical, analytic, z)``: ``empirical = mean_i ‖sent_i − clean_i‖²``,
    ``analytic = d σ²`` and ``z = (empirical − dσ²) / (σ² sqrt(2d/K))`` — the standard score under the
    hypothesis that ``sent − clean`` is i.i.d. ``N(0, σ²)`` (each row's ``‖·‖²/σ²`` is χ²_d, variance
    ``2d``). ``z`` is NaN when ``σ = 0``.
    """
    K, d = clean.shape
    # the difference in the inputs' precision, its squared norms accumulated in float64
    emp = float(torch.linalg.vector_norm(sent - clean, dim=1, dtype=torch.float64).square().mean())
    analytic = d * sigma * sigma
    z = (emp - analytic) / (sigma * sigma * math.sqrt(2.0 * d / K)) if sigma > 0 else math.nan
    return emp, analytic, z
