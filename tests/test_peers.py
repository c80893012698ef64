"""Cross-checks against a peer library: ByzFL (LPD-EPFL/byzfl), an independent implementation.

Every aggregation rule, pre-aggregator and attack that ByzFL and dpbr share is compared on random
inputs (outliers, duplicates and identical Byzantine rows, ties, and non-finite values where ByzFL
defines its behaviour). ByzFL is called with NumPy float64 arrays (its NumPy code path).

Deliberate differences, stated where they matter:

- Krum / Multi-Krum: ByzFL scores a row by the mean of its ``n − f − 1`` smallest squared distances
  to the others (its ``sort(dist)[:, 1:n−f]``); dpbr's default is the paper's ``n − f − 2``, so the
  comparison uses ``neighbours=n-f-1``. Multi-Krum's default ``m = n − f`` is ByzFL's. Ties between
  distinct rows: ByzFL takes the first index, dpbr the more central row — inputs avoid such ties
  (duplicated rows tie with identical vectors, which gives the same output either way).
- NaN: ByzFL's ``Median``, ``Meamed``, ``Krum``, ``MultiKrum``, ``GeometricMedian`` (which only drops
  ``±inf`` rows) and ``CenteredClipping`` propagate NaN; dpbr orders NaN as ``+inf`` (coordinate-wise
  rules), never selects a NaN row (distance-based) or gives it weight 0 (weighted). Where ByzFL is
  defined on ``±inf``, dpbr on NaN is compared with ByzFL on the same input with NaN → ``+inf``.
- Meamed / Bulyan ties at the boundary distance (values at ``median ± r``): dpbr takes the lower
  values, ByzFL whichever ``argpartition`` returns; only columns without such a tie are compared.
- MDA: ByzFL keeps the first minimum-diameter subset in ``itertools.combinations`` order, which is
  ``mda(ties=first)``; dpbr's default ``tightest`` agrees when the minimum is unique.
- Geometric median: ByzFL starts at 0 with ``T = 3`` iterations, dpbr at the medoid with 8; both
  iterate to the same smoothed-Weiszfeld fixed point, compared after many iterations.
- Centered clipping: ByzFL keeps its center between calls (hidden state); dpbr passes it as
  ``state=``. ByzFL's ``m=`` argument cannot be used (its type check rejects every array), so both
  start from 0.
- IPM: ByzFL's ``InnerProductManipulation(tau)`` sends ``−τ·μ`` = dpbr's ``empire(factor=1 + τ)``.
- ALIE: ByzFL's ``ALittleIsEnough(tau)`` = ``little(factor=tau)``; ByzFL has no ``z_max``.
- Optimal attacks: the objectives agree (ByzFL maximises ``‖GAR − μ‖``, dpbr its square), the
  searches differ (ByzFL: ``δ = 10``, 20 evaluations, contraction probing upwards only; dpbr: LPD's
  ``δ = 1``, 16 evaluations, both sides), so only the objective at dpbr's factor is compared.
- Gaussian attack: the same distribution, drawn from different generators (compared by moments).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

byzfl = pytest.importorskip("byzfl")

from dpbr.robust import aggregators as A  # noqa: E402
from dpbr.robust import attacks as K  # noqa: E402

RTOL = 1e-10
ATOL = 1e-10


def _dpbr(spec: str, X: np.ndarray, f: int, **kw) -> np.ndarray:
    return A.get(spec)(torch.from_numpy(X), f, **kw).numpy()


def _nan_as_inf(X: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(X), math.inf, X)


def _inputs(rng: np.random.Generator, n: int, f: int, d: int, kind: str) -> np.ndarray:
    """``n − f`` honest rows N(1, 1) and ``f`` Byzantine rows of the given kind."""
    X = 1.0 + rng.standard_normal((n, d))
    if f == 0:
        return X
    if kind == "outliers":  # far away, all different
        X[n - f:] += rng.choice([-1.0, 1.0]) * 30.0 * (1 + rng.random((f, d)))
    elif kind == "identical":  # f copies of one vector (as ALIE/IPM send), near the honest ones
        mu, sd = X[: n - f].mean(0), X[: n - f].std(0, ddof=1)
        X[n - f:] = mu - rng.uniform(0.5, 3.0) * sd
    elif kind == "duplicate":  # copies of an honest row (mimic)
        X[n - f:] = X[int(rng.integers(0, n - f))]
    return X


KINDS = ["outliers", "identical", "duplicate"]
SIZES = [(7, 2), (9, 3), (10, 3), (11, 4), (12, 2)]  # n ≥ 2f + 3 for every rule compared


def _cases(seed: int, sizes=SIZES, d: int = 6):
    rng = np.random.default_rng(seed)
    for (n, f), kind in itertools.product(sizes, KINDS):
        for _ in range(2):
            yield n, f, _inputs(rng, n, f, d, kind)


def _with_nonfinite_rows(X: np.ndarray, f: int, rng: np.random.Generator, values=(math.inf, -math.inf)) -> np.ndarray:
    X = X.copy()
    for r in rng.choice(X.shape[0], f, replace=False):
        X[r] = rng.choice(values)
    return X


def _with_nonfinite_entries(X: np.ndarray, f: int, rng: np.random.Generator, values) -> np.ndarray:
    """Up to ``f`` non-finite entries per column, in any rows."""
    X = X.copy()
    for c in range(X.shape[1]):
        for r in rng.choice(X.shape[0], int(rng.integers(0, f + 1)), replace=False):
            X[r, c] = rng.choice(values)
    return X


# ----------------------------------------------------------------------------------------------- #
# Coordinate-wise rules


def test_average():
    for n, f, X in _cases(0):
        np.testing.assert_allclose(_dpbr("average", X, f), byzfl.Average()(X), rtol=RTOL, atol=ATOL)


def test_median_including_ties_and_non_finite_entries():
    rng = np.random.default_rng(1)
    for n, f, X in _cases(1, sizes=SIZES + [(8, 3)]):
        np.testing.assert_allclose(_dpbr("median", X, f), byzfl.Median()(X), rtol=RTOL, atol=ATOL)
        G = np.round(X * 2) / 2  # a grid: ties and duplicates
        np.testing.assert_allclose(_dpbr("median", G, f), byzfl.Median()(G), rtol=RTOL, atol=ATOL)
        # ±inf entries (at most f per column); NaN → +inf for ByzFL (np.median propagates NaN)
        B = _with_nonfinite_entries(X, f, rng, (math.inf, -math.inf, math.nan))
        np.testing.assert_allclose(_dpbr("median", B, f), byzfl.Median()(_nan_as_inf(B)), rtol=RTOL, atol=ATOL)


def test_trimmed_mean_including_ties_nan_and_inf():
    rng = np.random.default_rng(2)
    for n, f, X in _cases(2):
        for G in (X, np.round(X * 2) / 2, _with_nonfinite_entries(X, f, rng, (math.inf, -math.inf, math.nan))):
            # np.sort puts NaN last: ByzFL's TrMean orders NaN as +inf, as dpbr does
            np.testing.assert_allclose(_dpbr("trimmed-mean", G, f), byzfl.TrMean(f)(G), rtol=RTOL, atol=ATOL)


def _boundary_tie(col: np.ndarray, k: int) -> bool:
    """Whether values at median − r and median + r (r the k-th smallest distance) compete for the last places."""
    s = np.sort(col)
    n = len(s)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    dist = np.abs(col - med)
    r = np.sort(dist)[k - 1]
    at_r = col[dist == r]
    return bool((at_r < med).any() and (at_r > med).any() and (dist <= r).sum() > k)


def test_meamed_including_duplicates_grid_values_and_non_finite_entries():
    # the example of a tie at the far end of the window: ByzFL and dpbr both give −0.125
    X = np.array([[-2.0], [-2.0], [0.0], [0.5], [1.0]])
    assert _dpbr("meamed", X, 1).tolist() == byzfl.Meamed(1)(X).tolist() == [-0.125]
    rng = np.random.default_rng(3)
    compared = 0
    for n, f, X in _cases(3, sizes=SIZES + [(8, 3), (5, 2)], d=20):
        for G in (X, np.round(X * 2) / 2, _with_nonfinite_entries(X, f, rng, (math.inf, -math.inf, math.nan))):
            ours, theirs = _dpbr("meamed", G, f), byzfl.Meamed(f)(_nan_as_inf(G))
            keep = [c for c in range(G.shape[1]) if not _boundary_tie(_nan_as_inf(G[:, c]), n - f)]
            np.testing.assert_allclose(ours[keep], theirs[keep], rtol=RTOL, atol=ATOL)
            compared += len(keep)
    assert compared > 1500  # most columns have no genuine boundary tie


# ----------------------------------------------------------------------------------------------- #
# Distance-based rules


def test_krum_with_byzfl_neighbour_count():
    rng = np.random.default_rng(4)
    for n, f, X in _cases(4):
        np.testing.assert_allclose(_dpbr("krum(neighbours=n-f-1)", X, f), byzfl.Krum(f)(X), rtol=RTOL, atol=ATOL)
        # ±inf rows: ByzFL's sorted distances push them past its n − f − 1 neighbours; NaN rows would
        # make its argmin return the NaN row, so dpbr on NaN rows is compared with ByzFL on +inf rows
        B = _with_nonfinite_rows(X, f, rng, (math.inf, -math.inf, math.nan))
        np.testing.assert_allclose(_dpbr("krum(neighbours=n-f-1)", B, f), byzfl.Krum(f)(_nan_as_inf(B)),
                                   rtol=RTOL, atol=ATOL)


def test_krum_default_differs_from_byzfl_only_by_the_neighbour_count():
    # n = 5, f = 1, values 0, 1, 2.5, 4, 10: the paper's 2 nearest pick 1, ByzFL's 3 nearest pick 2.5
    X = np.array([[0.0], [1.0], [2.5], [4.0], [10.0]])
    assert byzfl.Krum(1)(X).tolist() == [2.5] == _dpbr("krum(neighbours=n-f-1)", X, 1).tolist()
    assert _dpbr("krum", X, 1).tolist() == [1.0]


def test_multi_krum_with_byzfl_neighbour_count():
    rng = np.random.default_rng(5)
    for n, f, X in _cases(5):
        # ByzFL averages the m = n − f best rows: dpbr's default m
        np.testing.assert_allclose(_dpbr("multi-krum(neighbours=n-f-1)", X, f), byzfl.MultiKrum(f)(X),
                                   rtol=RTOL, atol=ATOL)
        B = _with_nonfinite_rows(X, f, rng)
        np.testing.assert_allclose(_dpbr("multi-krum(neighbours=n-f-1)", B, f), byzfl.MultiKrum(f)(B),
                                   rtol=RTOL, atol=ATOL)


def test_mda_first_subset_and_non_finite_rows():
    rng = np.random.default_rng(6)
    for n, f, X in _cases(6, sizes=[(7, 2), (9, 3), (9, 4), (10, 3)]):
        np.testing.assert_allclose(_dpbr("mda(ties=first)", X, f), byzfl.MDA(f)(X), rtol=RTOL, atol=ATOL)
        # ByzFL's loop never keeps a subset whose diameter is inf or NaN: NaN and ±inf rows alike
        B = _with_nonfinite_rows(X, f, rng, (math.inf, -math.inf, math.nan))
        np.testing.assert_allclose(_dpbr("mda(ties=first)", B, f), byzfl.MDA(f)(B), rtol=RTOL, atol=ATOL)
    # with all rows distinct the minimum is unique and the default tie-break agrees too
    for n, f, X in _cases(7, sizes=[(7, 2), (9, 4)]):
        if len(np.unique(X, axis=0)) == n:
            np.testing.assert_allclose(_dpbr("mda", X, f), byzfl.MDA(f)(X), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------- #
# Weighted rules


def test_geometric_median_fixed_point_and_inf_rows():
    rng = np.random.default_rng(8)
    for n, f, X in _cases(8, sizes=[(7, 2), (11, 4)]):
        for G in (X, _with_nonfinite_rows(X, f, rng)):  # ByzFL drops ±inf rows, dpbr gives them weight 0
            # (from 0 ByzFL needs up to ~1,000 iterations on these inputs to settle to 1e-13)
            ours = _dpbr("geometric-median(iters=1200)", G, f)
            theirs = byzfl.GeometricMedian(nu=0.1, T=1200)(G)
            np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10)
    # few iterations from different starts are different approximations (not compared)


def test_centered_clipping_and_its_state():
    for n, f, X in _cases(9, sizes=[(7, 2), (11, 4)]):
        for tau, iters in ((100.0, 1), (1.0, 3), (5.0, 2)):
            ours = A.get(f"cc(tau={tau},iters={iters})")
            theirs = byzfl.CenteredClipping(L=iters, tau=tau)  # starts from 0 and keeps its center
            first = ours.aggregate(torch.from_numpy(X), f)
            np.testing.assert_allclose(first.value.numpy(), theirs(X), rtol=RTOL, atol=ATOL)
            # ByzFL's second call starts from its first output: dpbr's explicit state= does the same
            Y = X[::-1].copy() + 0.5
            second = ours.aggregate(torch.from_numpy(Y), f, state=first.state)
            np.testing.assert_allclose(second.value.numpy(), theirs(Y), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------- #
# Pre-aggregators


@pytest.mark.parametrize("spec, peer", [
    ("nnm+average", lambda f: byzfl.Average()),
    ("nnm+median", lambda f: byzfl.Median()),
    ("nnm+trimmed-mean", lambda f: byzfl.TrMean(f)),
    ("nnm+krum(neighbours=n-f-1)", lambda f: byzfl.Krum(f)),
    ("nnm+multi-krum(neighbours=n-f-1)", lambda f: byzfl.MultiKrum(f)),
    ("nnm+meamed", lambda f: byzfl.Meamed(f)),
    ("nnm+cc(tau=1,iters=2)", lambda f: byzfl.CenteredClipping(L=2, tau=1.0)),
])
def test_nnm_then_rule(spec, peer):
    for n, f, X in _cases(10, sizes=[(7, 2), (11, 4)]):
        theirs = peer(f)(byzfl.NNM(f)(X))
        np.testing.assert_allclose(_dpbr(spec, X, f), theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize("spec, peer", [
    ("average", lambda f: byzfl.Average()),
    ("median", lambda f: byzfl.Median()),
    ("trimmed-mean", lambda f: byzfl.TrMean(f)),
    ("krum(neighbours=n-f-1)", lambda f: byzfl.Krum(f)),
    ("cc(tau=2,iters=1)", lambda f: byzfl.CenteredClipping(L=1, tau=2.0)),
])
def test_bucketing_then_rule(spec, peer, s):
    # Both draw a permutation (ByzFL from NumPy's global RNG, dpbr from its generator). The rows are
    # placed so that dpbr's permutation meets them in ByzFL's order: then the buckets are the same.
    f = 1  # n ≥ 13: ⌈n/3⌉ ≥ 2f + 3 buckets for Krum
    for seed, (n, X) in enumerate((n, _inputs(np.random.default_rng(n), n, f, 5, "outliers")) for n in (13, 14, 16)):
        np.random.seed(seed)
        theirs = peer(f)(byzfl.Bucketing(s)(X))
        np.random.seed(seed)
        perm_byzfl = np.random.permutation(n)
        perm_dpbr = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        Y = np.empty_like(X)
        Y[perm_dpbr] = X[perm_byzfl]
        ours = _dpbr(f"bucketing(s={s})+{spec}", Y, f, generator=torch.Generator().manual_seed(seed))
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------- #
# Attacks


def _honest(seed: int, h: int = 7, d: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((h, d)) * 2 + 0.5


def _rows_equal(ours: torch.Tensor, vector: np.ndarray, f: int) -> None:
    assert tuple(ours.shape) == (f, vector.shape[0])
    for row in ours.numpy():
        np.testing.assert_allclose(row, vector, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_fixed_attacks(seed):
    H = _honest(seed)
    Ht, f = torch.from_numpy(H), 4
    _rows_equal(K.get("sign-flip")(Ht, f), byzfl.SignFlipping()(H), f)
    for tau in (2.0, 0.5, 0.1):
        # ByzFL's −τ·μ is (1 − factor)·μ with factor = 1 + τ
        _rows_equal(K.get("empire", factor=1.0 + tau)(Ht, f), byzfl.InnerProductManipulation(tau)(H), f)
    for tau in (1.5, 0.3, 4.0):
        _rows_equal(K.get("little", factor=tau)(Ht, f), byzfl.ALittleIsEnough(tau)(H), f)
        _rows_equal(K.get("little", factor=tau, negative=True)(Ht, f), byzfl.ALittleIsEnough(-tau)(H), f)
    for target in range(H.shape[0]):
        _rows_equal(K.get("mimic", target=target)(Ht, f), byzfl.Mimic(target)(H), f)
    _rows_equal(K.get("inf")(Ht, f), byzfl.Inf()(H), f)


def test_gaussian_attack_has_the_same_distribution():
    # same parameterisation (location, standard deviation), different generators: compare the draws
    from scipy.stats import ks_2samp

    H = np.zeros((3, 20000))
    np.random.seed(0)
    theirs = byzfl.Gaussian(mu=0.5, sigma=2.0)(H)
    ours = K.get("gaussian(mean=0.5,std=2)")(torch.from_numpy(H), 1, generator=torch.Generator().manual_seed(0))
    ours = ours.numpy()[0]
    for sample in (ours, theirs):
        assert abs(sample.mean() - 0.5) < 5 * 2.0 / math.sqrt(20000)
        assert abs(sample.std() - 2.0) < 5 * 2.0 / math.sqrt(2 * 20000)
    assert ks_2samp(ours, theirs).pvalue > 1e-3


@pytest.mark.parametrize("spec, rule, peer", [
    ("little(factor=optimal)", "trimmed-mean", lambda f: byzfl.TrMean(f)),
    ("little(factor=optimal,negative=true)", "median", lambda f: byzfl.Median()),
    ("little(factor=optimal,negative=true)", "krum(neighbours=n-f-1)", lambda f: byzfl.Krum(f)),
    ("empire(factor=optimal)", "trimmed-mean", lambda f: byzfl.TrMean(f)),
    ("empire(factor=optimal)", "multi-krum(neighbours=n-f-1)", lambda f: byzfl.MultiKrum(f)),
])
def test_optimal_attack_objective_matches_byzfl(spec, rule, peer):
    # dpbr's objective ‖GAR(H ∪ byz) − μ‖² at the factor it chose equals ByzFL's ‖GAR − μ‖², squared,
    # for the same vector built by ByzFL's attack (honest rows first, then f copies)
    f = 3
    H = _honest(11, h=8, d=10)
    forged = K.get(spec).forge(torch.from_numpy(H), f, aggregator=A.get(rule))
    x = forged.info["factor"]
    if spec.startswith("little"):
        vector = byzfl.ALittleIsEnough(-x if "negative" in spec else x)(H)
    else:
        vector = byzfl.InnerProductManipulation(x - 1.0)(H)
    _rows_equal(forged.value, vector, f)
    out = peer(f)(np.concatenate([H, np.stack([vector] * f)]))
    assert forged.info["objective"] == pytest.approx(float(np.linalg.norm(out - H.mean(0))) ** 2, rel=1e-9)
