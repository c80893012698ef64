"""Privacy accounting: per-step Gaussian mechanism, RDP of the subsampled Gaussian, ε over a run.

Cross-checks against Opacus' RDP accountant (imported here only; skipped when missing) and against
an independent numerical integration of A_α (scipy.integrate.quad).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import integrate

from dpbr.errors import UsageError
from dpbr.privacy import accounting as acc

Z_STUDY = acc.noise_multiplier(0.2, 1e-6)  # 26.494...


# ------------------------------------------------------------------------------------------------
# per step


def test_noise_multiplier_known_value():
    # sqrt(2 ln(1.25e6)) = sqrt(28.0773...) = 5.298802... ; / 0.2
    assert acc.noise_multiplier(0.2, 1e-6) == pytest.approx(26.494012634, rel=1e-9)
    assert acc.noise_multiplier(0.5, 1e-5) == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 0.5, rel=1e-15)


def test_per_step_is_the_configured_pair():
    assert acc.per_step_epsilon_delta(0.2, 1e-6) == (0.2, 1e-6)


@pytest.mark.parametrize(
    "eps, delta, option",
    [
        (0.0, 1e-6, "--epsilon"),
        (1.0, 1e-6, "--epsilon"),
        (float("nan"), 1e-6, "--epsilon"),
        (float("inf"), 1e-6, "--epsilon"),
        (True, 1e-6, "--epsilon"),
        ("0.2", 1e-6, "--epsilon"),
        (0.2, 0.0, "--delta"),
        (0.2, 1.0, "--delta"),
        (0.2, float("nan"), "--delta"),
        (0.2, False, "--delta"),
        (0.2, None, "--delta"),
    ],
)
def test_epsilon_delta_validation(eps, delta, option):
    with pytest.raises(UsageError) as info:
        acc.noise_multiplier(eps, delta)
    assert info.value.option == option
    with pytest.raises(UsageError):
        acc.per_step_epsilon_delta(eps, delta)


def test_dpsgd_noise_multiplier_is_twice_the_study_multiplier():
    from dpbr.privacy import gaussian_sigma

    for b in (10, 50, 500):
        sigma = gaussian_sigma(0.01, b, 0.2, 1e-6)
        assert acc.dpsgd_noise_multiplier(sigma, 0.01, b) == pytest.approx(2 * Z_STUDY, rel=1e-12)


def test_dpsgd_epsilon_matches_composed_epsilon():
    from dpbr.privacy import gaussian_sigma

    sigma = gaussian_sigma(0.01, 50, 0.2, 1e-6)
    got = acc.dpsgd_epsilon(sigma=sigma, clip=0.01, batch_size=50, dataset_size=8400, steps=1000, delta=1e-6)
    want = acc.composed_epsilon(50 / 8400, 50 * sigma / 0.01, 1000, 1e-6)
    assert got == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# RDP


def test_no_subsampling_closed_form():
    orders = [1.5, 2, 3.25, 10, 64, 1000]
    z = 1.7
    np.testing.assert_allclose(acc.rdp_subsampled_gaussian(1.0, z, orders), np.array(orders) / (2 * z * z), rtol=1e-15)
    np.testing.assert_allclose(acc.rdp_gaussian(z, orders), np.array(orders) / (2 * z * z), rtol=1e-15)
    # composed eps with q = 1 from the closed form T·α/(2z²) and Balle et al.'s conversion, by hand
    T, delta = 50, 1e-5
    a = np.array(acc.DEFAULT_ORDERS)
    eps_by_hand = np.min(T * a / (2 * z * z) + np.log((a - 1) / a) - (np.log(delta) + np.log(a)) / (a - 1))
    eps, order = acc.composed_epsilon(1.0, z, T, delta)
    assert eps == pytest.approx(eps_by_hand, rel=1e-12)
    # one hand-computed value: q = 1, z = 1, T = 1, δ = 1e-5, α = 4: 2 + log(3/4) + (log(1e5) - log 4)/3
    eps4, order4 = acc.composed_epsilon(1.0, 1.0, 1, 1e-5, orders=[4])
    assert order4 == 4
    assert eps4 == pytest.approx(2 + math.log(0.75) + (math.log(1e5) - math.log(4)) / 3, rel=1e-14)


def test_integer_order_small_case_by_hand():
    # α = 2: A_2 = (1-q)² + 2q(1-q) + q² e^{1/z²} = 1 + q²(e^{1/z²} − 1)
    q, z = 0.1, 2.0
    want = math.log1p(q * q * math.expm1(1 / z**2))
    assert acc.rdp_subsampled_gaussian(q, z, [2])[0] == pytest.approx(want, rel=1e-13)
    # α = 3: A_3 = 1 + 3q²(1-q)(e^{1/z²} − 1) + q³(e^{3/z²} − 1)
    want3 = math.log1p(3 * q * q * (1 - q) * math.expm1(1 / z**2) + q**3 * math.expm1(3 / z**2)) / 2
    assert acc.rdp_subsampled_gaussian(q, z, [3])[0] == pytest.approx(want3, rel=1e-13)


def _rdp_by_quadrature(q: float, z: float, alpha: float) -> float:
    """Independent value: A_α − 1 = E_{x~N(0,z²)}[(1+u)^α − 1 − αu], u = q·expm1((2x−1)/(2z²))
    (the linear term has mean 0; the integrand is >= 0, so no cancellation)."""

    def f(x: float) -> float:
        u = q * math.expm1((2 * x - 1) / (2 * z * z))
        density = math.exp(-x * x / (2 * z * z)) / (z * math.sqrt(2 * math.pi))
        return (math.expm1(alpha * math.log1p(u)) - alpha * u) * density

    hi = max(12 * z, alpha * 1.0 + 12 * z)  # the mass moves right with α
    pts = np.linspace(-12 * z, hi, 41)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        total = sum(
            integrate.quad(f, lo_, hi_, epsabs=0, epsrel=1e-13, limit=200)[0] for lo_, hi_ in zip(pts[:-1], pts[1:])
        )
    return math.log1p(total) / (alpha - 1)


@pytest.mark.parametrize(
    "q, z, alpha",
    [
        (50 / 8400, Z_STUDY, 1.2),
        (50 / 8400, 2 * Z_STUDY, 1.2),
        (1e-4, 0.7, 1.1),
        (0.01, 4.0, 2.5),
        (0.01, 4.0, 7.0),
        (0.1, 1.1, 3.7),
        (0.3, 5.0, 12.0),
    ],
)
def test_rdp_against_numerical_integration(q, z, alpha):
    assert acc.rdp_subsampled_gaussian(q, z, [alpha])[0] == pytest.approx(_rdp_by_quadrature(q, z, alpha), rel=1e-8)


def test_monotone_in_steps_and_noise():
    e1, _ = acc.composed_epsilon(0.01, 1.0, 100, 1e-5)
    e2, _ = acc.composed_epsilon(0.01, 1.0, 1000, 1e-5)
    e3, _ = acc.composed_epsilon(0.01, 2.0, 1000, 1e-5)
    assert e1 < e2 and e3 < e2


def test_edge_cases():
    assert acc.composed_epsilon(0.0, 1.0, 100, 1e-5)[0] == 0.0
    assert acc.composed_epsilon(0.5, 1.0, 0, 1e-5)[0] == 0.0
    assert acc.composed_epsilon(0.5, 0.0, 10, 1e-5)[0] == math.inf
    assert np.all(acc.rdp_subsampled_gaussian(0.0, 1.0, [2, 3.5]) == 0)
    assert np.all(np.isinf(acc.rdp_subsampled_gaussian(0.5, 0.0, [2, 3.5])))


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(sample_rate=1.5), "--sample-rate"),
        (dict(sample_rate=-0.1), "--sample-rate"),
        (dict(noise_multiplier=-1.0), "--noise-multiplier"),
        (dict(steps=-1), "--steps"),
        (dict(steps=2.5), "--steps"),
        (dict(delta=0.0), "--delta"),
        (dict(orders=[1.0, 2.0]), "--orders"),
    ],
)
def test_accounting_validation(kwargs, option):
    args = dict(sample_rate=0.01, noise_multiplier=1.0, steps=10, delta=1e-5)
    args.update(kwargs)
    with pytest.raises(UsageError) as info:
        acc.composed_epsilon(**args)
    assert info.value.option == option


def test_default_orders_are_at_least_as_tight_as_opacus_grid():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        wide, order = acc.composed_epsilon(50 / 8400, Z_STUDY, 1000, 1e-6)
        narrow, edge = acc.composed_epsilon(50 / 8400, Z_STUDY, 1000, 1e-6, orders=acc.OPACUS_ORDERS)
    assert wide <= narrow
    assert edge == 63 and order > 63  # the study's regime needs orders above Opacus' default range


def test_edge_order_warns():
    with pytest.warns(RuntimeWarning, match="largest"):
        acc.composed_epsilon(50 / 8400, Z_STUDY, 1000, 1e-6, orders=acc.OPACUS_ORDERS)


# ------------------------------------------------------------------------------------------------
# Cross-check with Opacus

CROSS_CHECK = [
    # (q, z, T, delta)
    (50 / 8400, Z_STUDY, 1000, 1e-6),  # the study: b = 50 of 8,400 phishing rows, ε = 0.2 calibration
    (50 / 8400, 2 * Z_STUDY, 1000, 1e-6),  # same with the add/remove multiplier σ·b/C
    (10 / 8400, Z_STUDY, 1000, 1e-6),
    (500 / 8400, Z_STUDY, 1000, 1e-6),
    (0.01, 4.0, 10000, 1e-5),  # Abadi et al. 2016 example
    (256 / 60000, 1.1, 14063, 1e-5),  # DP-SGD MNIST, 60 epochs
    (0.1, 0.8, 100, 1e-6),
    (1.0, 5.0, 100, 1e-5),  # no subsampling
    (1.0, Z_STUDY, 1000, 1e-6),
]


@pytest.mark.parametrize("q, z, T, delta", CROSS_CHECK)
def test_composed_epsilon_matches_opacus(q, z, T, delta):
    rdp_mod = pytest.importorskip("opacus.accountants.rdp")
    accountant = rdp_mod.RDPAccountant()
    accountant.history = [(z, q, T)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus (and we) warn when the optimum is an edge order
        want_eps, want_order = accountant.get_privacy_spent(delta=delta, alphas=list(acc.OPACUS_ORDERS))
        eps, order = acc.composed_epsilon(q, z, T, delta, orders=acc.OPACUS_ORDERS)
    assert eps == pytest.approx(want_eps, rel=1e-6)
    assert order == want_order


@pytest.mark.parametrize("q, z", sorted({(q, z) for q, z, _, _ in CROSS_CHECK}))
def test_rdp_curve_matches_opacus(q, z):
    analysis = pytest.importorskip("opacus.accountants.analysis.rdp")
    want = np.asarray(analysis.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(acc.OPACUS_ORDERS)))
    got = acc.rdp_subsampled_gaussian(q, z, acc.OPACUS_ORDERS)
    # rtol 1e-6 plus atol 1e-13: at fractional orders where the per-step RDP is ~1e-9..1e-8, Opacus'
    # own value is off by up to ~2e-6 relative (~1.5e-14 absolute: it adds and subtracts the series'
    # terms one by one in log space); against the quadrature above ours agree to < 1e-9 there. An
    # absolute 1e-13 per step is < 1e-9 in ε after 10,000 steps.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-13)


def test_abadi_example_sanity():
    # Abadi et al. 2016 (Sec. 3.1): q = 0.01, σ = 4, 10,000 steps, δ = 1e-5 -> ε ≈ 1.26 with the moments
    # accountant, whose conversion is the classic ε = RDP + log(1/δ)/(α − 1): the same RDP gives 1.2586.
    # Balle et al.'s conversion is tighter: 1.0355 (at α = 17).
    a = np.asarray(acc.DEFAULT_ORDERS)
    rdp = acc.composed_rdp(0.01, 4.0, 10000, a)
    assert np.min(rdp + math.log(1e5) / (a - 1)) == pytest.approx(1.26, abs=0.005)
    eps, order = acc.composed_epsilon(0.01, 4.0, 10000, 1e-5)
    assert eps == pytest.approx(1.0355, abs=1e-4) and order == 17
