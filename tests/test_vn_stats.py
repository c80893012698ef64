"""The VN-ratio estimator (dpbr.vn.stats): pair U-statistics, bootstrap interval, noise check."""

import math

import pytest
import torch

from dpbr import linalg
from dpbr.privacy import mechanisms
from dpbr.vn.stats import bootstrap_counts, estimate_ratio, noise_check, pair_statistics, ratio_from


def _explicit(G: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """The resampled U-statistics written out: pairs of positions whose original samples differ."""
    rows = torch.repeat_interleave(torch.arange(G.shape[0]), counts.long())
    X = G[rows]
    m = X.shape[0]
    cross, spread, pairs = 0.0, 0.0, 0
    for i in range(m):
        for j in range(m):
            if rows[i] != rows[j]:
                cross += float(X[i] @ X[j])
                spread += 0.5 * float(((X[i] - X[j]) ** 2).sum())
                pairs += 1
    return cross / pairs, spread / pairs


def test_pair_statistics_are_the_unbiased_mean_norm_and_variance():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(7, 5, generator=g, dtype=torch.float64) + 2.0
    m2, v = pair_statistics(linalg.gram(G, dtype=torch.float64))
    mean = G.mean(0)
    var = ((G - mean) ** 2).sum(1).sum() / (7 - 1)  # unbiased sample variance (trace)
    assert float(v[0]) == pytest.approx(float(var), rel=1e-12)
    assert float(m2[0]) == pytest.approx(float(mean @ mean - var / 7), rel=1e-12)  # plug-in minus its bias V/K


def test_resampled_statistics_skip_pairs_of_the_same_original_sample():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(6, 3, generator=g, dtype=torch.float64)
    counts = bootstrap_counts(6, 5, g)
    assert torch.all(counts.sum(1) == 6)
    m2, v = pair_statistics(linalg.gram(G, dtype=torch.float64), counts)
    for b in range(5):
        want_m2, want_v = _explicit(G, counts[b])
        assert float(m2[b]) == pytest.approx(want_m2, rel=1e-10, abs=1e-12)
        assert float(v[b]) == pytest.approx(want_v, rel=1e-10)


def test_gram_in_blocks_equals_one_product(monkeypatch):
    monkeypatch.setattr(linalg, "GRAM_BLOCK", 128)
    G = torch.randn(9, 1000, dtype=torch.float32)
    ref = G.double() @ G.double().T
    assert torch.allclose(linalg.gram(G, dtype=torch.float64), ref, rtol=1e-12, atol=1e-9)


def test_ratio_without_detectable_mean_is_infinite():
    assert float(ratio_from(-1e-3, 1.0)) == math.inf
    assert float(ratio_from(0.0, 1.0)) == math.inf
    assert float(ratio_from(4.0, 1.0, noise=8.0)) == pytest.approx(1.5)


def _coverage(d: int, r: float, noise: float, reps: int, K: int = 64, B: int = 400) -> tuple[float, float, float]:
    """Fraction of intervals holding the true ratio; mean half-width/1.96 and sd of the estimates."""
    hits, widths, ests = 0, [], []
    mu = torch.zeros(d, dtype=torch.float64)
    mu[0] = 1.0
    truth = math.sqrt(r * r + noise)  # ‖μ‖ = 1, E‖Z‖² = r², analytic noise variance `noise`
    for s in range(reps):
        g = torch.Generator().manual_seed(10_000 + s)
        G = mu + r * torch.randn(K, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        est = estimate_ratio(G, noise_variance=noise, bootstrap=B, generator=torch.Generator().manual_seed(s))
        hits += est.ci_low <= truth <= est.ci_high
        widths.append((est.ci_high - est.ci_low) / (2 * 1.96))
        ests.append(est.ratio)
    e = torch.tensor(ests)
    return hits / reps, float(torch.tensor(widths).mean()), float(e.std())


@pytest.mark.parametrize("d,r,noise", [(5, 1.0, 0.0), (400, 0.5, 0.0), (20, 0.5, 2.0)])
def test_bootstrap_interval_covers_the_true_ratio_at_its_level(d, r, noise):
    """Gaussian rows G = μ + r·Z/sqrt(d), ‖μ‖ = 1, so r_true = sqrt(r² + noise) exactly.

    Tolerance: over 80 replications the coverage of the nominal 95 % interval must be >= 0.85
    (0.95 minus 4 binomial standard deviations, 0.024 each, minus 0.02 for the percentile method's
    known small-K under-coverage), and the interval's half-width / 1.96 must match the spread of the
    estimates across replications within a factor 0.7–1.4 (so the interval is not merely wide).
    The high-dimensional case (d = 400) is where a plug-in bootstrap would fail: its ‖Ḡ‖² is biased by
    V/K, far more than its standard error.
    """
    cover, half, sd = _coverage(d, r, noise, reps=80)
    assert cover >= 0.85
    assert 0.7 <= half / sd <= 1.4


def test_plugin_norm_is_biased_upwards_in_high_dimension_and_the_pair_statistic_is_not():
    g = torch.Generator().manual_seed(3)
    d, K = 2000, 32
    mu = torch.zeros(d, dtype=torch.float64)
    mu[0] = 1.0
    est = [estimate_ratio(mu + 2.0 * torch.randn(K, d, generator=g, dtype=torch.float64) / math.sqrt(d), bootstrap=0)
           for _ in range(20)]
    plugin = sum(e.mean_norm_plugin ** 2 for e in est) / 20
    unbiased = sum(e.mean_norm_sq for e in est) / 20
    assert plugin == pytest.approx(1.0 + 4.0 / K, rel=0.02)  # E‖Ḡ‖² = ‖μ‖² + V/K
    assert unbiased == pytest.approx(1.0, abs=0.03)


def test_estimate_is_reproducible_from_the_generator_seed():
    G = torch.randn(16, 4, dtype=torch.float64) + 1
    a = estimate_ratio(G, bootstrap=200, generator=torch.Generator().manual_seed(5))
    b = estimate_ratio(G, bootstrap=200, generator=torch.Generator().manual_seed(5))
    c = estimate_ratio(G, bootstrap=200, generator=torch.Generator().manual_seed(6))
    assert a == b
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    with pytest.raises(ValueError):
        estimate_ratio(G, bootstrap=200)  # no generator


def test_noise_only_contribution_of_the_real_mechanism_matches_d_sigma_squared():
    """Constant rows (zero sampling variance) through the study's Gaussian mechanism.

    ``sent − clean`` is N(0, σ² I_d) per row, so mean_i ‖·‖² / (dσ²) has mean 1 and standard deviation
    sqrt(2/(dK)); the tolerance is |z| < 4 (z = the standardized difference, two-sided p ≈ 6e-5).
    The ratio of the noised rows, estimated without any analytic term, must then agree with the
    analytic sqrt(dσ²)/‖μ‖ within its own bootstrap interval.
    """
    K, d = 64, 500
    mech = mechanisms.get("gaussian", epsilon=0.5, delta=1e-6, clip=0.01, batch_size=50)
    sigma = mech.sigma
    assert sigma == pytest.approx(2 * 0.01 / 50 * math.sqrt(2 * math.log(1.25e6)) / 0.5)
    mu = torch.full((d,), 0.01 / math.sqrt(d))  # ‖μ‖ = C, as a clipped gradient
    clean = mu.expand(K, d).clone()
    gens = [torch.Generator().manual_seed(100 + i) for i in range(K)]
    sent = mech(clean, generator=gens)
    emp, analytic, z = noise_check(clean, sent, sigma)
    assert analytic == pytest.approx(d * sigma**2)
    assert abs(z) < 4
    assert emp == pytest.approx(analytic, rel=4 * math.sqrt(2 / (d * K)))
    est = estimate_ratio(sent, bootstrap=500, generator=torch.Generator().manual_seed(0))
    truth = math.sqrt(d) * sigma / 0.01
    assert est.ci_low <= truth <= est.ci_high
    assert est.variance == pytest.approx(d * sigma**2, rel=0.05)
