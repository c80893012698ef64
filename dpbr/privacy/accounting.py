r"""Privacy accounting: the per-step Gaussian mechanism and RDP composition over a run.

Two guarantees are reported for a run of DP-SGD-style training.

**Per step (what the study configures).** Each honest worker releases its clipped mini-batch
gradient plus i.i.d. Gaussian noise of standard deviation

.. math:: \sigma = \Delta_2 \cdot \frac{\sqrt{2 \ln(1.25/\delta)}}{\varepsilon},
          \qquad \Delta_2 = \frac{2C}{b},

the classic Gaussian mechanism (Dwork & Roth 2014, Theorem A.1; valid for :math:`0 < \varepsilon < 1`).
``2C/b`` is the L2 sensitivity of a mean of ``b`` gradients each of norm at most ``C`` when one example
is *replaced* by another. The per-step guarantee is therefore exactly the configured
:math:`(\varepsilon, \delta)` — :func:`per_step_epsilon_delta` just validates and returns it — and it
holds only if every *per-example* gradient has norm at most ``C`` (per-example clipping, Abadi et al.
2016). The study (and the LPD code it follows) clips the mini-batch gradient instead, which does not
bound the per-example norms: in that mode the numbers are a noise *calibration*, not a proof.
:func:`noise_multiplier` is :math:`\sigma / \Delta_2 = \sqrt{2\ln(1.25/\delta)}/\varepsilon`.

**Over the run (composition).** ``T`` steps with mini-batches sampled at rate ``q`` compose to a much
larger :math:`\varepsilon`. We account with Rényi differential privacy (Mironov 2017) of the
Poisson-subsampled Gaussian mechanism (Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of the
Sampled Gaussian Mechanism", arXiv:1908.10530, Section 3.3): for noise multiplier ``z`` (noise standard
deviation divided by the L2 sensitivity of the *sum* under add/remove-one adjacency) and order
:math:`\alpha > 1`,

.. math:: \mathrm{RDP}(\alpha) = \frac{\log A_\alpha}{\alpha - 1}, \qquad
          A_\alpha = \mathbb{E}_{x \sim \mathcal N(0, z^2)}
          \Big[\big(1 - q + q\, e^{(2x - 1)/(2z^2)}\big)^\alpha\Big],

evaluated exactly by the binomial series of that paper — a finite sum for integer :math:`\alpha`, two
infinite series with :math:`\mathrm{erfc}` factors for fractional :math:`\alpha` — in log space (see
:func:`rdp_subsampled_gaussian`). RDP composes additively over steps, and the conversion to
:math:`(\varepsilon, \delta)` is the improved bound of Balle, Barthe, Gaboardi, Hsu & Sato 2020
("Hypothesis testing interpretations and Rényi differential privacy", AISTATS, arXiv:1905.09982,
Theorem 21; also Canonne, Kamath & Steinke 2020, Proposition 12 of "The Discrete Gaussian for DP"):

.. math:: \varepsilon = \min_\alpha\; T\,\mathrm{RDP}(\alpha) + \log\frac{\alpha - 1}{\alpha}
          - \frac{\log \delta + \log \alpha}{\alpha - 1},

the same conversion Opacus (``opacus.accountants.analysis.rdp.get_privacy_spent``) uses; the classic
:math:`\varepsilon = T\,\mathrm{RDP}(\alpha) + \log(1/\delta)/(\alpha - 1)` (Mironov 2017, Prop. 3) is
always larger. With ``q = 1`` (no subsampling) the RDP is the closed form :math:`\alpha/(2z^2)`.

Adjacency and the noise multiplier. The subsampled-Gaussian analysis is for add/remove-one adjacency,
where the sum of per-example gradients clipped to ``C`` has sensitivity ``C``. The study's noise, whose
per-coordinate standard deviation on the *mean* is ``σ``, is ``σ·b`` on the sum, so the multiplier for
that analysis is :func:`dpsgd_noise_multiplier` ``= σ·b/C = 2·noise_multiplier(ε, δ)``
(:func:`dpsgd_epsilon` does this). Sampling fixed-size mini-batches (as the simulation does) instead of
Poisson sampling is the usual approximation, as in Opacus and TF Privacy.

All functions here are plain NumPy/SciPy on the host (accounting is a handful of scalars per run).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import numpy as np

from dpbr._lazy import LazyModule

#: scipy.special, imported on first use (half a second; validating an ε needs none of it)
special = LazyModule("scipy.special", globals(), "special")

from dpbr.errors import UsageError
from dpbr.validate import positive_int, positive_integral
from dpbr.validate import real as _real

__all__ = [
    "DEFAULT_ORDERS",
    "OPACUS_ORDERS",
    "check_epsilon",
    "check_delta",
    "noise_multiplier",
    "per_step_epsilon_delta",
    "dpsgd_noise_multiplier",
    "rdp_gaussian",
    "rdp_subsampled_gaussian",
    "rdp_to_epsilon",
    "composed_rdp",
    "composed_epsilon",
    "dpsgd_epsilon",
]

#: The orders Opacus' ``RDPAccountant`` uses by default: 1.1, 1.2, …, 10.9, 12, 13, …, 63.
OPACUS_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])

#: Default orders: Opacus' grid extended with large integer orders up to 16384. The large orders matter
#: in the strong-privacy regime of the study (noise multipliers of tens, few hundred steps), where the
#: optimal order lies far above 63 and Opacus' default grid gives a loose ε with an "optimal order is
#: the largest alpha" warning.
DEFAULT_ORDERS: tuple[float, ...] = OPACUS_ORDERS + tuple(
    float(a)
    for a in (
        64, 72, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
        1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 8192, 10240, 12288, 16384,
    )
)

_LOG_HALF = math.log(0.5)
#: Stop a fractional-order series once its terms fall below exp(-37) ≈ 8.5e-17 of the running total
#: (the tail of an alternating series with decreasing terms is smaller than its first omitted term).
_SERIES_REL_CUTOFF = -37.0
_SERIES_MAX_TERMS = 20_000_000


# --------------------------------------------------------------------------------------------------
# Validation


def check_epsilon(epsilon: object, option: str = "--epsilon") -> float:
    """Validate the per-step ε of the classic Gaussian mechanism: a real number in (0, 1)."""
    e = _real(epsilon, option, "epsilon")
    if not 0.0 < e < 1.0:
        raise UsageError(
            option,
            f"epsilon must be in (0, 1) for the classic Gaussian mechanism, got {e!r}"
            " (use no privacy mechanism for epsilon = inf)",
        )
    return e


def check_delta(delta: object, option: str = "--delta") -> float:
    """Validate δ: a real number in (0, 1)."""
    d = _real(delta, option, "delta")
    if not 0.0 < d < 1.0:
        raise UsageError(option, f"delta must be in (0, 1), got {d!r}")
    return d


def _check_steps(steps: object) -> int:
    return positive_int(steps, "--steps", "steps", low=0)


def _check_rate(q: object) -> float:
    x = _real(q, "--sample-rate", "sample rate")
    if not 0.0 <= x <= 1.0:
        raise UsageError("--sample-rate", f"sample rate must be in [0, 1], got {x!r}")
    return x


def _check_multiplier(z: object) -> float:
    x = _real(z, "--noise-multiplier", "noise multiplier")
    if x < 0.0:
        raise UsageError("--noise-multiplier", f"noise multiplier must be >= 0, got {x!r}")
    return x


def _check_orders(orders: Iterable[float] | float | None) -> np.ndarray:
    if orders is None:
        return np.asarray(DEFAULT_ORDERS, dtype=float)
    arr = np.atleast_1d(np.asarray(orders, dtype=float))
    if arr.ndim != 1 or arr.size == 0 or np.isnan(arr).any() or (arr <= 1.0).any():
        raise UsageError("--orders", "RDP orders must be a non-empty list of numbers > 1")
    return arr


# --------------------------------------------------------------------------------------------------
# Per-step Gaussian mechanism


def noise_multiplier(epsilon: float, delta: float) -> float:
    r"""Noise multiplier of the classic Gaussian mechanism: :math:`\sqrt{2\ln(1.25/\delta)}/\varepsilon`.

    This is σ divided by the L2 sensitivity ``2C/b`` of the study's calibration
    (:func:`dpbr.privacy.gaussian_sigma`). ``epsilon`` and ``delta`` must lie in (0, 1).

    >>> round(noise_multiplier(0.2, 1e-6), 4)
    26.494
    """
    e = check_epsilon(epsilon)
    d = check_delta(delta)
    return math.sqrt(2.0 * math.log(1.25 / d)) / e


def per_step_epsilon_delta(epsilon: float, delta: float) -> tuple[float, float]:
    """The per-step guarantee of the study's mechanism: just the configured ``(epsilon, delta)``.

    The noise is calibrated with the classic Gaussian mechanism, so each release is
    ``(epsilon, delta)``-DP by construction (replace-one adjacency, per-example norms at most ``C``);
    nothing is computed beyond validation. See :func:`composed_epsilon` for the whole run.
    """
    return check_epsilon(epsilon), check_delta(delta)


def dpsgd_noise_multiplier(sigma: float, clip: float, batch_size: int) -> float:
    """Noise multiplier for the add/remove RDP analysis: ``sigma * batch_size / clip``.

    ``sigma`` is the per-coordinate standard deviation added to the *mean* of ``batch_size`` per-example
    gradients clipped to ``clip``; on the sum it is ``sigma * batch_size``, and the sum's add/remove
    sensitivity is ``clip``. For the study's calibration this equals ``2 * noise_multiplier(ε, δ)``.
    """
    s = _real(sigma, "--sigma", "sigma")
    c = _real(clip, "--clip", "clip")
    if s < 0 or not math.isfinite(s):
        raise UsageError("--sigma", f"sigma must be finite and >= 0, got {s!r}")
    if c <= 0 or not math.isfinite(c):
        raise UsageError("--clip", f"clip must be finite and > 0, got {c!r}")
    return s * positive_integral(batch_size, "--batch-size", "batch size") / c


# --------------------------------------------------------------------------------------------------
# RDP of the (subsampled) Gaussian mechanism


def rdp_gaussian(noise_multiplier: float, orders: Iterable[float] | float | None = None) -> np.ndarray:
    r"""RDP of the Gaussian mechanism without subsampling: :math:`\alpha / (2 z^2)` (Mironov 2017, Prop. 7)."""
    z = _check_multiplier(noise_multiplier)
    a = _check_orders(orders)
    if z == 0.0:
        return np.full(a.shape, np.inf)
    return a / (2.0 * z * z)


def _logsumexp(x: np.ndarray) -> float:
    """``log(sum(exp(x)))`` of a 1-D array, shifted by its maximum (``scipy.special.logsumexp`` is
    ~100x slower on the short arrays used here because of its array-API dispatch)."""
    if x.size == 0:
        return -math.inf
    m = float(np.max(x))
    if m == -math.inf or m == math.inf:
        return m
    return m + math.log(float(np.sum(np.exp(x - m))))


def _log_expm1(x: np.ndarray) -> np.ndarray:
    """``log(exp(x) - 1)`` for ``x > 0`` without overflow or loss for small ``x``."""
    x = np.asarray(x, dtype=float)
    out = np.empty_like(x)
    big = x > 30.0
    out[big] = x[big] + np.log1p(-np.exp(-x[big]))
    out[~big] = np.log(np.expm1(x[~big]))
    return out


def _log_a_int(q: float, z: float, alpha: int) -> float:
    r"""``log A_α`` for integer α ≥ 2 and 0 < q < 1 (Mironov et al. 2019, Section 3.3).

    :math:`A_\alpha = \sum_{i=0}^{\alpha} \binom{\alpha}{i} q^i (1-q)^{\alpha-i} e^{(i^2-i)/(2z^2)}`.
    The binomial weights sum to one and the ``i = 0, 1`` exponents vanish, so
    :math:`A_\alpha = 1 + \sum_{i \ge 2} \binom{\alpha}{i} q^i (1-q)^{\alpha-i}\,
    \mathrm{expm1}((i^2-i)/(2z^2))`: a sum of positive terms, evaluated with ``logsumexp`` and then
    ``log1p`` — accurate even when :math:`\log A_\alpha` is ~1e-12 (small ``q``, large ``z``).
    """
    i = np.arange(2, alpha + 1, dtype=float)
    # log C(alpha, i) = -log(alpha + 1) - log B(alpha - i + 1, i + 1)
    log_binom = -math.log(alpha + 1.0) - special.betaln(alpha - i + 1.0, i + 1.0)
    log_terms = log_binom + i * math.log(q) + (alpha - i) * math.log1p(-q) + _log_expm1((i * i - i) / (2.0 * z * z))
    log_rest = _logsumexp(log_terms)
    return float(np.logaddexp(0.0, log_rest))


def _log_a_frac(q: float, z: float, alpha: float) -> float:
    r"""``log A_α`` for fractional α > 1 and 0 < q < 1 (Mironov et al. 2019, Section 3.3).

    With :math:`z_0 = z^2 \ln(1/q - 1) + 1/2` and :math:`\Phi` the standard normal CDF,

    .. math:: A_\alpha = \sum_{i \ge 0} \binom{\alpha}{i}\Big[
              q^i (1-q)^{\alpha-i} e^{(i^2-i)/(2z^2)} \Phi\big(\tfrac{z_0 - i}{z}\big)
              + q^{\alpha-i} (1-q)^{i} e^{(j^2-j)/(2z^2)} \Phi\big(\tfrac{j - z_0}{z}\big)\Big],
              \quad j = \alpha - i,

    where :math:`\Phi(x) = \tfrac12\mathrm{erfc}(-x/\sqrt2)` (``scipy.special.log_ndtr``). The generalized
    binomial coefficients change sign for ``i > α`` (``scipy.special.gammasgn``). Terms are evaluated
    in vectorized chunks; positive and negative terms are accumulated separately in log space and
    subtracted once. The series is cut once ``i > α + 1`` and every term of a chunk is below
    ``exp(-37)`` times the running total; past ``α + 1`` the series alternates with decreasing terms, so
    the cut-off error is below the first omitted term.
    """
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = z * z * (math.log1p(-q) - math.log(q)) + 0.5
    two_z2 = 2.0 * z * z
    log_gamma_a1 = special.gammaln(alpha + 1.0)
    log_pos, log_neg = -np.inf, -np.inf
    start, size = 0, 32
    while True:
        i = np.arange(start, start + size, dtype=float)
        j = alpha - i
        log_binom = log_gamma_a1 - special.gammaln(i + 1.0) - special.gammaln(j + 1.0)
        sign = special.gammasgn(j + 1.0)
        s0 = log_binom + i * log_q + j * log_1mq + (i * i - i) / two_z2 + special.log_ndtr((z0 - i) / z)
        s1 = log_binom + j * log_q + i * log_1mq + (j * j - j) / two_z2 + special.log_ndtr((j - z0) / z)
        terms = np.logaddexp(s0, s1)
        pos = sign > 0
        if pos.any():
            log_pos = np.logaddexp(log_pos, _logsumexp(terms[pos]))
        if (~pos).any():
            log_neg = np.logaddexp(log_neg, _logsumexp(terms[~pos]))
        start += size
        if start > alpha + 1 and np.max(terms) < log_pos + _SERIES_REL_CUTOFF:
            break
        if start >= _SERIES_MAX_TERMS:  # pragma: no cover - only for absurd parameters
            warnings.warn(
                f"RDP series at order {alpha} did not converge in {start} terms (q={q}, z={z});"
                " the value may be inaccurate",
                RuntimeWarning,
                stacklevel=3,
            )
            break
        size = min(size * 2, 1 << 16)
    if log_neg == -np.inf:
        return float(log_pos)
    if log_neg >= log_pos:  # rounding only: A_alpha >= 1 mathematically
        return 0.0
    return float(log_pos + math.log1p(-math.exp(log_neg - log_pos)))


def rdp_subsampled_gaussian(
    sample_rate: float, noise_multiplier: float, orders: Iterable[float] | float | None = None
) -> np.ndarray:
    r"""Per-step RDP of the Poisson-subsampled Gaussian mechanism at each order.

    Parameters
    ----------
    sample_rate:
        ``q`` in [0, 1], the probability that an example is in a mini-batch (``b / N``).
    noise_multiplier:
        ``z``, noise standard deviation divided by the L2 sensitivity of the summed, clipped per-example
        gradients (add/remove adjacency). ``0`` means no noise (infinite RDP).
    orders:
        Orders :math:`\alpha > 1` (integers use the finite sum, others the series); default
        :data:`DEFAULT_ORDERS`.

    Returns
    -------
    numpy.ndarray
        RDP :math:`\log(A_\alpha)/(\alpha - 1)` per order (Mironov, Talwar & Zhang 2019); ``0`` for
        ``q = 0``, :math:`\alpha/(2z^2)` for ``q = 1``, ``inf`` for ``z = 0`` or ``α = inf``.
    """
    q = _check_rate(sample_rate)
    z = _check_multiplier(noise_multiplier)
    a = _check_orders(orders)
    out = np.empty(a.shape, dtype=float)
    for k, alpha in enumerate(a):
        if q == 0.0:
            out[k] = 0.0
        elif z == 0.0 or math.isinf(alpha):
            out[k] = np.inf
        elif q == 1.0:
            out[k] = alpha / (2.0 * z * z)
        elif float(alpha).is_integer():
            out[k] = _log_a_int(q, z, int(alpha)) / (alpha - 1.0)
        else:
            out[k] = _log_a_frac(q, z, float(alpha)) / (alpha - 1.0)
    return np.maximum(out, 0.0)


def composed_rdp(
    sample_rate: float, noise_multiplier: float, steps: int, orders: Iterable[float] | float | None = None
) -> np.ndarray:
    """RDP after ``steps`` compositions: ``steps * rdp_subsampled_gaussian(...)`` (RDP adds up)."""
    t = _check_steps(steps)
    rdp = rdp_subsampled_gaussian(sample_rate, noise_multiplier, orders)
    return np.zeros_like(rdp) if t == 0 else rdp * t


def rdp_to_epsilon(
    orders: Sequence[float] | np.ndarray,
    rdp: Sequence[float] | np.ndarray,
    delta: float,
    *,
    warn: bool = True,
    _stacklevel: int = 2,
) -> tuple[float, float]:
    r"""Convert RDP curves to :math:`(\varepsilon, \delta)`-DP: the best order of Balle et al. 2020, Thm 21.

    :math:`\varepsilon(\alpha) = \mathrm{rdp}(\alpha) + \log\frac{\alpha-1}{\alpha} -
    \frac{\log\delta + \log\alpha}{\alpha - 1}`, minimised over the given orders and clamped at 0.

    Returns
    -------
    (epsilon, order):
        ``(inf, nan)`` when every order has infinite RDP. With ``warn`` a ``RuntimeWarning`` says when
        the optimum is the smallest or largest order given (a wider grid could give a smaller ε).
    """
    d = check_delta(delta)
    a = np.atleast_1d(np.asarray(orders, dtype=float))
    r = np.atleast_1d(np.asarray(rdp, dtype=float))
    if a.shape != r.shape:
        raise ValueError(f"orders and rdp must have the same length, got {a.shape} and {r.shape}")
    with np.errstate(invalid="ignore"):
        eps = r + np.log1p(-1.0 / a) - (math.log(d) + np.log(a)) / (a - 1.0)
    eps = np.where(np.isnan(eps), np.inf, eps)
    if not np.isfinite(eps).any():
        return math.inf, math.nan
    k = int(np.argmin(eps))
    if warn and a.size > 1 and (k == 0 or k == a.size - 1):
        side = "smallest" if k == 0 else "largest"
        warnings.warn(
            f"optimal RDP order is the {side} one given ({a[k]:g}); widen the orders for a tighter epsilon",
            RuntimeWarning,
            stacklevel=_stacklevel,
        )
    return max(float(eps[k]), 0.0), float(a[k])


def composed_epsilon(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    orders: Iterable[float] | float | None = None,
) -> tuple[float, float]:
    r"""ε after ``steps`` steps of the Poisson-subsampled Gaussian mechanism, and the order attaining it.

    RDP of Mironov, Talwar & Zhang 2019 composed over ``steps`` and converted with Balle et al. 2020
    (Theorem 21) — the same analysis as Opacus' ``RDPAccountant``, computed here independently (see the
    module docstring). ``steps = 0`` or ``sample_rate = 0`` give ``(0.0, nan)``; ``noise_multiplier = 0``
    gives ``(inf, nan)``.

    >>> eps, order = composed_epsilon(1.0, 1.0, 1, 1e-5, orders=[2, 4, 8, 16, 32])
    >>> round(eps, 3), order
    (5.088, 4.0)
    """
    t = _check_steps(steps)
    d = check_delta(delta)
    a = _check_orders(orders)
    q = _check_rate(sample_rate)
    z = _check_multiplier(noise_multiplier)
    if t == 0 or q == 0.0:  # nothing released about any example
        return 0.0, math.nan
    if z == 0.0:
        return math.inf, math.nan
    rdp = composed_rdp(q, z, t, a)
    return rdp_to_epsilon(a, rdp, d, warn=True, _stacklevel=3)


def dpsgd_epsilon(
    *,
    sigma: float,
    clip: float,
    batch_size: int,
    dataset_size: int,
    steps: int,
    delta: float,
    orders: Iterable[float] | float | None = None,
) -> tuple[float, float]:
    """Composed ε of a run of per-example-clipped DP-SGD with the study's noise.

    ``sigma`` is the per-coordinate noise standard deviation on the mean of ``batch_size`` gradients
    clipped per example to ``clip`` (:func:`dpbr.privacy.gaussian_sigma`), batches drawn from
    ``dataset_size`` examples: ``q = batch_size / dataset_size``, ``z = sigma * batch_size / clip``
    (add/remove adjacency, :func:`dpsgd_noise_multiplier`). Meaningless for batch-level clipping, whose
    per-example sensitivity is unbounded.
    """
    positive_integral(dataset_size, "--dataset-size", "dataset size")
    z = dpsgd_noise_multiplier(sigma, clip, batch_size)
    if batch_size > dataset_size:
        raise UsageError("--batch-size", f"batch size {batch_size} exceeds the dataset size {dataset_size}")
    return composed_epsilon(batch_size / int(dataset_size), z, steps, delta, orders)
