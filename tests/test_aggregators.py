"""Robust aggregation rules (dpbr.robust.aggregators): known answers, properties, references, non-finite inputs."""

from __future__ import annotations

import inspect
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpbr import linalg as geo
from dpbr.errors import UsageError
from dpbr.registry import canonical
from dpbr.robust import aggregators as A

F64 = torch.float64
CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
DEVICES = ["cpu"] + CUDA

# (spec, n, f) triples that satisfy every rule's requirement; used by the property tests
CASES = [
    ("average", 7, 2),
    ("krum", 9, 3),
    ("multi-krum", 9, 3),
    ("multi-krum(m=3)", 9, 3),
    ("median", 7, 3),
    ("median", 8, 3),
    ("trimmed-mean", 7, 3),
    ("meamed", 7, 3),
    ("meamed", 8, 3),
    ("mda", 9, 4),
    ("bulyan", 11, 2),
    ("bulyan", 12, 2),
    ("geometric-median", 7, 3),
    ("centered-clipping", 7, 3),
    ("nnm+krum", 9, 3),
    ("nnm+mda", 9, 4),
    ("nnm+median", 7, 3),
    ("nnm+cc(tau=1)", 7, 3),
    ("bucketing(s=2)+krum", 13, 2),
    ("bucketing(s=2)+median", 9, 2),
    ("bucketing(s=3)+mda", 14, 2),
    ("bucketing(s=2)+nnm+cc(tau=1)", 9, 2),
    ("bucketing(s=2)+trimmed-mean", 11, 2),
]
ROBUST = [c for c in CASES if c[0] != "average"] + [("mda(ties=first)", 9, 4)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clustered(n: int, d: int, seed: int = 0, dtype=F64, outliers: int = 0) -> torch.Tensor:
    """``n − outliers`` rows ~ N(1, 0.1²) and ``outliers`` rows far away (well separated, no ties)."""
    g = _gen(seed)
    X = 1.0 + 0.1 * torch.randn(n, d, generator=g, dtype=F64)
    if outliers:
        X[n - outliers:] += 20.0 * torch.randn(outliers, d, generator=g, dtype=F64)
    return X.to(dtype)


# ----------------------------------------------------------------------------------------------- #
# Known answers (hand-computed)


def test_average_known_answer():
    G = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]], dtype=F64)
    # (1+3+5)/3 = 3, (2+4+9)/3 = 5
    assert torch.equal(A.get("average")(G, 0), torch.tensor([3.0, 5.0], dtype=F64))


# Krum example: n = 5, f = 1, first coordinate 0, 1, 2.5, 4, 10, second coordinate 7 everywhere.
# k = n − f − 2 = 2 nearest others, squared distances:
#   0   : 1, 6.25, 16, 100      → 1 + 6.25   = 7.25
#   1   : 1, 2.25, 9, 81        → 1 + 2.25   = 3.25   ← Krum
#   2.5 : 6.25, 2.25, 2.25, 56.25 → 2.25 + 2.25 = 4.5
#   4   : 16, 9, 2.25, 36       → 2.25 + 9   = 11.25
#   10  : 100, 81, 56.25, 36    → 36 + 56.25 = 92.25
KRUM_G = torch.tensor([[0.0, 7.0], [1.0, 7.0], [2.5, 7.0], [4.0, 7.0], [10.0, 7.0]], dtype=F64)


def test_krum_known_answer():
    out = A.get("krum").aggregate(KRUM_G, 1)
    assert torch.equal(out.value, torch.tensor([1.0, 7.0], dtype=F64))
    assert out.selected.tolist() == [False, True, False, False, False]


def test_multi_krum_known_answers():
    # m = 3: scores 3.25, 4.5, 7.25 → rows 1, 2.5, 0 → (1 + 2.5 + 0)/3 = 7/6
    out = A.get("multi-krum(m=3)").aggregate(KRUM_G, 1)
    assert torch.allclose(out.value, torch.tensor([7.0 / 6.0, 7.0], dtype=F64))
    assert out.selected.tolist() == [True, True, True, False, False]
    # default m = n − f = 4: adds 4 (11.25) → (0 + 1 + 2.5 + 4)/4 = 1.875
    out = A.get("multi-krum").aggregate(KRUM_G, 1)
    assert torch.allclose(out.value, torch.tensor([1.875, 7.0], dtype=F64))
    assert out.selected.tolist() == [True, True, True, True, False]


def test_median_known_answers():
    # odd n: columns (1, 3, 2) → 2 and (5, −1, 0) → 0
    G = torch.tensor([[1.0, 5.0], [3.0, -1.0], [2.0, 0.0]], dtype=F64)
    assert torch.equal(A.get("median")(G, 1), torch.tensor([2.0, 0.0], dtype=F64))
    # even n: sorted columns (1, 2, 4, 8) → (2 + 4)/2 = 3 and (0, 1, 3, 10) → (1 + 3)/2 = 2
    G = torch.tensor([[1.0, 10.0], [4.0, 0.0], [2.0, 3.0], [8.0, 1.0]], dtype=F64)
    assert torch.equal(A.get("median")(G, 1), torch.tensor([3.0, 2.0], dtype=F64))


def test_trimmed_mean_known_answer():
    # f = 1. Column 0 = (100, 1, 3, 2, 4): drop 1 and 100 → (2 + 3 + 4)/3 = 3.
    # Column 1 = (0, 6, −50, 1, 2): drop −50 and 6 → (0 + 1 + 2)/3 = 1.
    G = torch.tensor([[100.0, 0.0], [1.0, 6.0], [3.0, -50.0], [2.0, 1.0], [4.0, 2.0]], dtype=F64)
    assert torch.allclose(A.get("trimmed-mean")(G, 1), torch.tensor([3.0, 1.0], dtype=F64))
    # f = 2 keeps only the median
    assert torch.allclose(A.get("trimmed-mean")(G, 2), torch.tensor([3.0, 1.0], dtype=F64))


def test_meamed_known_answer():
    # f = 2, keep the n − f = 3 values closest to the median.
    # Column 0 = (0, 1, 2, 6, 7): median 2, distances 2, 1, 0, 4, 5 → 0, 1, 2 → mean 1.
    # Column 1 = (10, 11, 13, 14, −100): median 11, distances 1, 0, 2, 3, 111 → 10, 11, 13 → 34/3.
    G = torch.tensor([[0.0, 10.0], [1.0, 11.0], [2.0, 13.0], [6.0, 14.0], [7.0, -100.0]], dtype=F64)
    assert torch.allclose(A.get("meamed")(G, 2), torch.tensor([1.0, 34.0 / 3.0], dtype=F64))


def test_mda_known_answer():
    # n = 5, f = 2: subsets of 3. {(0,0), (1,0), (0,1)} has diameter √2 (between (1,0) and (0,1));
    # every other subset contains (5,5) or (6,5) with a point of the first three: diameter ≥ √41.
    G = torch.tensor([[5.0, 5.0], [0.0, 0.0], [1.0, 0.0], [6.0, 5.0], [0.0, 1.0]], dtype=F64)
    out = A.get("mda").aggregate(G, 2)
    assert torch.allclose(out.value, torch.tensor([1.0 / 3.0, 1.0 / 3.0], dtype=F64))
    assert out.selected.tolist() == [False, True, True, False, True]
    # alias "brute" (LPD's name)
    assert torch.equal(A.get("brute")(G, 2), out.value)


def test_bulyan_known_answer():
    # n = 7, f = 1: θ = 5 rounds of Krum, β = 3. Values 0, 1, 3, 5, 8 and outliers ±100.
    # Round 0 (k = 4 nearest others, squared): 0: 1+9+25+64 = 99; 1: 1+4+16+49 = 70;
    #   3: 9+4+4+25 = 42 ← ; 5: 25+16+4+9 = 54; 8: 64+49+25+9 = 147; 100: 36699; −100: 41835.
    # Round 1 (k = 3, without 3): 0: 1+25+64 = 90; 1: 1+16+49 = 66; 5: 25+16+9 = 50 ←; 8: 122.
    # Round 2 (k = 2, without 3, 5): 0: 1+64 = 65; 1: 1+49 = 50 ←; 8: 64+49 = 113.
    # Round 3 (k = 1): 0: 64; 8: 64 (tie) → lower round-0 score: 0 (99 < 147) ←.
    # Round 4 (k = 0): every score 0 → lower round-0 score: 8 (147 < 36699 < 41835) ←.
    # Selected 0, 1, 3, 5, 8: median 3, distances 3, 2, 0, 2, 5 → 1, 3, 5 → mean 3.
    G = torch.tensor([[100.0], [0.0], [1.0], [-100.0], [3.0], [5.0], [8.0]], dtype=F64)
    out = A.get("bulyan").aggregate(G, 1)
    assert torch.equal(out.value, torch.tensor([3.0], dtype=F64))
    assert out.selected.tolist() == [False, True, True, False, True, True, True]


def test_geometric_median_known_answers():
    # Points (0,0), (4,0), (0,3). Medoid: sums of distances 4+3 = 7, 4+5 = 9, 3+5 = 8 → (0,0).
    # One Weiszfeld step from (0,0): weights 1/max(0.1, 0) = 10, 1/4, 1/3 (sum 127/12);
    # z = (10·(0,0) + (1/4)(4,0) + (1/3)(0,3)) / (127/12) = (1, 1)·12/127.
    G = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]], dtype=F64)
    expected = torch.tensor([12.0 / 127.0, 12.0 / 127.0], dtype=F64)
    assert torch.allclose(A.get("geometric-median(iters=1)")(G, 1), expected)
    # 1-D (0, 1, 10): the medoid 1 is a fixed point: weights 1, 10, 1/9 →
    # (0 + 10 + 10/9) / (1 + 10 + 1/9) = (100/9)/(100/9) = 1 (the median).
    G = torch.tensor([[0.0], [1.0], [10.0]], dtype=F64)
    assert torch.allclose(A.get("rfa")(G, 1), torch.tensor([1.0], dtype=F64))


def test_centered_clipping_known_answers():
    G = torch.tensor([[0.0], [1.0], [10.0]], dtype=F64)
    # v0 = 0, τ = 2: clip(0, 1, 10) = (0, 1, 2) → v = 3/3 = 1
    assert torch.allclose(A.get("cc(tau=2,iters=1)")(G, 1), torch.tensor([1.0], dtype=F64))
    # second iteration from 1: clip(−1, 0, 9) = (−1, 0, 2) → v = 1 + 1/3 = 4/3
    assert torch.allclose(A.get("cc(tau=2,iters=2)")(G, 1), torch.tensor([4.0 / 3.0], dtype=F64))
    # from the state v0 = 5: clip(−5, −4, 5) = (−2, −2, 2) → v = 5 − 2/3 = 13/3
    out = A.get("cc(tau=2,iters=1)").aggregate(G, 1, state=torch.tensor([5.0], dtype=F64))
    assert torch.allclose(out.value, torch.tensor([13.0 / 3.0], dtype=F64))
    assert torch.equal(out.state, out.value)
    # by norm: (3, 4) has norm 5 → clipped to τ = 1: (0.6, 0.8); (0, 0) → 0; v = (0.3, 0.4)
    G = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=F64)
    assert torch.allclose(A.get("cc(tau=1,iters=1)")(G, 0), torch.tensor([0.3, 0.4], dtype=F64))


def test_nnm_known_answers():
    # n = 3, f = 1: each value → mean of its 2 nearest (itself included):
    # 0 → {0, 1} = 0.5; 1 → {1, 0} = 0.5 (|1−0| = 1 < |1−10| = 9); 10 → {10, 1} = 5.5.
    G = torch.tensor([[0.0], [1.0], [10.0]], dtype=F64)
    assert torch.allclose(A.get("nnm+average")(G, 1), torch.tensor([6.5 / 3.0], dtype=F64))
    assert torch.allclose(A.get("nnm+median")(G, 1), torch.tensor([0.5], dtype=F64))


def test_bucketing_known_answers():
    G = torch.tensor([[0.0], [2.0], [4.0], [6.0]], dtype=F64)
    # two buckets of two, whatever the permutation: mean of the bucket means = (0+2+4+6)/4 = 3, and
    # the median of two values is their midpoint, also 3
    for seed in range(5):
        assert torch.allclose(A.get("bucketing(s=2)+average")(G, 0, generator=_gen(seed)), torch.tensor([3.0], dtype=F64))
        assert torch.allclose(A.get("bucketing(s=2)+median")(G, 0, generator=_gen(seed)), torch.tensor([3.0], dtype=F64))
    # explicit permutation: rows π(0), π(1) | π(2), π(3) | π(4) with n = 5, s = 2 (last bucket of 1)
    G = torch.tensor([[0.0], [10.0], [20.0], [30.0], [40.0]], dtype=F64)
    perm = torch.randperm(5, generator=_gen(7))
    means = [G[perm[0:2]].mean(0), G[perm[2:4]].mean(0), G[perm[4:5]].mean(0)]
    got = A.get("bucketing(s=2)+average")(G, 0, generator=_gen(7))
    assert torch.allclose(got, sum(means) / 3)


# ----------------------------------------------------------------------------------------------- #
# References on random inputs (loop-based, float64)


def _sqd(G: torch.Tensor) -> list[list[float]]:
    n = G.shape[0]
    return [[float(((G[i] - G[j]) ** 2).sum()) for j in range(n)] for i in range(n)]


def _ref_krum_scores(D: list[list[float]], rows: list[int], f: int, k: int | None = None) -> dict[int, float]:
    k = len(rows) - f - 2 if k is None else k
    return {i: sum(sorted(D[i][j] for j in rows if j != i)[: max(k, 0)]) for i in rows}


def _ref_multi_krum(G, f, m):
    D = _sqd(G)
    scores = _ref_krum_scores(D, list(range(G.shape[0])), f)
    # ties → smaller sum of squared distances to all rows → lower index
    chosen = sorted(scores, key=lambda i: (scores[i], sum(D[i]), i))[:m]
    return G[chosen].mean(0), set(chosen)


def _ref_mda(G, f, ties="tightest"):
    """LPD's loop (first strictly smaller diameter wins), plus the "tightest" tie-break."""
    n = G.shape[0]
    D = _sqd(G)
    best, best_key = None, (math.inf, math.inf)
    for S in itertools.combinations(range(n), n - f):
        within = [D[i][j] for i, j in itertools.combinations(S, 2)]
        key = (max(within, default=0.0), sum(within) if ties == "tightest" else 0.0)
        if key < best_key:
            best, best_key = S, key
    return G[list(best)].mean(0), set(best)


def _ref_bulyan(G, f):
    n = G.shape[0]
    D = _sqd(G)
    full = _ref_krum_scores(D, list(range(n)), f)
    remaining, picks = list(range(n)), []
    for t in range(n - 2 * f):
        scores = _ref_krum_scores(D, remaining, f, n - t - f - 2)
        pick = min(remaining, key=lambda i: (scores[i], full[i], i))
        picks.append(pick)
        remaining.remove(pick)
    X = G[picks]
    beta = n - 4 * f
    out = torch.empty(G.shape[1], dtype=G.dtype)
    for c in range(G.shape[1]):
        col = sorted(X[:, c].tolist())
        med = col[len(col) // 2] if len(col) % 2 else (col[len(col) // 2 - 1] + col[len(col) // 2]) / 2
        out[c] = sum(sorted(col, key=lambda v: abs(v - med))[:beta]) / beta
    return out, set(picks)


def _ref_geometric_median(G, nu=0.1, iters=8):
    n = G.shape[0]
    dist = torch.cdist(G, G)
    z = G[int(dist.sum(1).argmin())].clone()
    for _ in range(iters):
        w = 1.0 / torch.linalg.vector_norm(G - z, dim=1).clamp_min(nu)
        z = (w[:, None] * G).sum(0) / w.sum()
    return z


def _ref_cc(G, tau=10.0, iters=3, v=None):
    v = torch.zeros(G.shape[1], dtype=G.dtype) if v is None else v.clone()
    finite = torch.isfinite(G).all(1)
    for _ in range(iters):
        step = torch.zeros_like(v)
        for i in range(G.shape[0]):
            if finite[i]:
                y = G[i] - v
                step += y * min(1.0, tau / max(float(torch.linalg.vector_norm(y)), 1e-300))
        v = v + step / G.shape[0]
    return v


def _ref_nnm(G, f):
    """Mixed vectors; NaN rows for non-finite inputs (the documented semantics)."""
    n = G.shape[0]
    finite = torch.isfinite(G).all(1)
    out = torch.full_like(G, math.nan)
    for i in range(n):
        if finite[i]:
            d = [(float(((G[i] - G[j]) ** 2).sum()) if finite[j] else math.inf, j) for j in range(n)]
            near = [j for _, j in sorted(d)[: n - f]]
            out[i] = G[near].mean(0)
    return out


# ----------------------------------------------------------------------------------------------- #
# NumPy references of every rule and pre-aggregator (float64, loops), written from the definitions in
# the module docstring of dpbr.robust.aggregators, including its non-finite semantics:
# distance-based selection never selects a row holding a NaN/±inf (its distances are +inf);
# coordinate-wise rules order NaN as +inf; weighted rules give such a row weight 0.
# Tie conventions: Krum scores → smaller sum of squared distances to the finite rows → lower index;
# MDA → (diameter, sum of squared pairwise distances) for "tightest", the first subset for "first";
# closest-to-median means → among values at the boundary distance, the lower ones.


def _np_sqdist(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances by explicit differences; +inf for every pair that involves a non-finite row."""
    n = X.shape[0]
    finite = np.isfinite(X).all(axis=1)
    D = np.full((n, n), math.inf)
    for i in range(n):
        for j in range(n):
            if finite[i] and finite[j]:
                D[i, j] = float(np.sum((X[i] - X[j]) ** 2))
    return D, finite


def _np_krum_scores(D: np.ndarray, rows: list[int], k: int) -> dict[int, float]:
    """Sum of the ``k`` smallest squared distances to the other ``rows`` (+inf for a non-finite row)."""
    return {i: sum(sorted(D[i, j] for j in rows if j != i)[: max(k, 0)]) + (0.0 if D[i, i] == 0 else math.inf)
            for i in rows}


def _np_centrality(D: np.ndarray, i: int) -> float:
    return float(sum(v for v in D[i] if math.isfinite(v))) if D[i, i] == 0 else math.inf


def _np_multi_krum(X, f, m=None, neighbours="n-f-2"):
    n = X.shape[0]
    D, _ = _np_sqdist(X)
    k = n - f - (1 if neighbours == "n-f-1" else 2)
    scores = _np_krum_scores(D, list(range(n)), k)
    chosen = sorted(range(n), key=lambda i: (scores[i], _np_centrality(D, i), i))[: (n - f if m is None else m)]
    return X[chosen].mean(axis=0)


def _np_sorted_nan_last(X: np.ndarray) -> np.ndarray:
    return np.sort(np.where(np.isnan(X), math.inf, X), axis=0)


def _np_median(X):
    S = _np_sorted_nan_last(X)
    n = S.shape[0]
    return S[n // 2] if n % 2 else (S[n // 2 - 1] + S[n // 2]) / 2


def _np_trimmed_mean(X, f):
    S = _np_sorted_nan_last(X)
    return S[f: S.shape[0] - f].mean(axis=0)


def _np_mean_closest_to_median(X: np.ndarray, k: int) -> np.ndarray:
    """Per column, the mean of the first ``k`` values stably sorted by ``(|x − median|, x)`` (NaN as +inf)."""
    V = np.where(np.isnan(X), math.inf, X)
    med = _np_median(X)
    out = np.empty(X.shape[1])
    with np.errstate(invalid="ignore"):
        for c in range(X.shape[1]):
            order = np.lexsort((V[:, c], np.abs(V[:, c] - med[c])))  # primary key last
            out[c] = V[order[:k], c].sum() / k
    return out


def _np_mda(X, f, ties="tightest"):
    n = X.shape[0]
    D, _ = _np_sqdist(X)
    best, best_key = None, (math.inf, math.inf)
    for S in itertools.combinations(range(n), n - f):
        within = [D[i, j] for i, j in itertools.combinations(S, 2)] or [D[S[0], S[0]]]
        key = (max(within), sum(within) if ties == "tightest" else 0.0)
        if best is None or key < best_key:
            best, best_key = S, key
    return X[list(best)].mean(axis=0)


def _np_bulyan(X, f):
    n = X.shape[0]
    D, _ = _np_sqdist(X)
    full = _np_krum_scores(D, list(range(n)), n - f - 2)
    remaining, picks = list(range(n)), []
    for t in range(n - 2 * f):
        scores = _np_krum_scores(D, remaining, n - t - f - 2)
        pick = min(remaining, key=lambda i: (scores[i], full[i], i))
        picks.append(pick)
        remaining.remove(pick)
    return _np_mean_closest_to_median(X[picks], n - 4 * f)


def _np_geometric_median(X, nu=0.1, iters=8):
    Y = X[np.isfinite(X).all(axis=1)]
    dist = np.array([[np.linalg.norm(a - b) for b in Y] for a in Y])
    z = Y[int(np.argmin(dist.sum(axis=1)))].copy()
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(Y - z, axis=1), nu)
        z = (w[:, None] * Y).sum(axis=0) / w.sum()
    return z


def _np_cc(X, tau=10.0, iters=3, v=None):
    n = X.shape[0]
    v = np.zeros(X.shape[1]) if v is None else np.array(v, dtype=np.float64)
    for _ in range(iters):
        step = np.zeros_like(v)
        for i in range(n):
            if np.isfinite(X[i]).all():
                y = X[i] - v
                norm = np.linalg.norm(y)
                step += y * (1.0 if norm <= tau else tau / norm)
        v = v + step / n
    return v


def _np_nnm(X, f):
    n = X.shape[0]
    D, finite = _np_sqdist(X)
    out = np.full_like(X, math.nan)
    for i in range(n):
        if finite[i]:
            near = sorted(range(n), key=lambda j: (D[i, j], j))[: n - f]
            out[i] = X[near].mean(axis=0)
    return out


def _np_buckets(X, s, seed):
    """Bucket means in the order of ``torch.randperm(n, generator=seed)`` (the draw the rule makes)."""
    perm = torch.randperm(X.shape[0], generator=_gen(seed)).numpy()
    P = X[perm]
    return np.stack([P[i:i + s].mean(axis=0) for i in range(0, X.shape[0], s)])


def _terms(spec: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for term in spec.split("+"):
        name, _, args = term.partition("(")
        params = dict(kv.split("=") for kv in args.rstrip(")").split(",") if kv)
        out.append((name.strip(), params))
    return out


def _np_ref(spec: str, X: np.ndarray, f: int, seed: int | None = None, state: np.ndarray | None = None) -> np.ndarray:
    """The NumPy reference of the composed rule ``spec`` (bucketing draws from ``_gen(seed)``)."""
    (name, p), *rest = _terms(spec)
    tail = "+".join(f"{n}({','.join(f'{k}={v}' for k, v in q.items())})" if q else n for n, q in rest)
    if name == "bucketing":
        return _np_ref(tail, _np_buckets(X, int(p.get("s", 2)), seed), f, seed, state)
    if name == "nnm":
        return _np_ref(tail, _np_nnm(X, f), f, seed, state)
    if name == "average":
        return X.mean(axis=0)
    if name in ("krum", "multi-krum"):
        m = 1 if name == "krum" else (int(p["m"]) if "m" in p else None)
        return _np_multi_krum(X, f, m, p.get("neighbours", "n-f-2"))
    if name == "median":
        return _np_median(X)
    if name == "trimmed-mean":
        return _np_trimmed_mean(X, f)
    if name == "meamed":
        return _np_mean_closest_to_median(X, X.shape[0] - f)
    if name == "mda":
        return _np_mda(X, f, p.get("ties", "tightest"))
    if name == "bulyan":
        return _np_bulyan(X, f)
    if name == "geometric-median":
        return _np_geometric_median(X, float(p.get("nu", 0.1)), int(p.get("iters", 8)))
    if name in ("cc", "centered-clipping"):
        return _np_cc(X, float(p.get("tau", 10.0)), int(p.get("iters", 3)), state)
    raise KeyError(spec)


@pytest.mark.parametrize("seed", range(6))
def test_krum_and_multi_krum_match_loop_reference(seed):
    g = _gen(seed)
    n = 7 + seed
    f = (n - 3) // 2
    G = torch.randn(n, 5, generator=g, dtype=F64)
    for m in (1, 2, n - f):
        want, rows = _ref_multi_krum(G, f, m)
        out = A.get(f"multi-krum(m={m})").aggregate(G, f)
        assert torch.allclose(out.value, want)
        assert set(out.selected.nonzero().flatten().tolist()) == rows
    assert torch.allclose(A.get("krum")(G, f), _ref_multi_krum(G, f, 1)[0])


@pytest.mark.parametrize("ties", ["tightest", "first"])
@pytest.mark.parametrize("n, f", [(1, 0), (3, 0), (3, 1), (5, 2), (6, 2), (7, 3), (8, 3), (9, 4), (10, 2), (11, 5)])
def test_mda_matches_brute_force_itertools(n, f, ties):
    rule = A.get(f"mda(ties={ties})")
    for seed in range(4):
        G = torch.randn(n, 4, generator=_gen(100 * n + seed), dtype=F64)
        want, rows = _ref_mda(G, f, ties)
        out = rule.aggregate(G, f)
        assert torch.allclose(out.value, want)
        assert set(out.selected.nonzero().flatten().tolist()) == rows


def test_mda_tie_breaks():
    # A = (0,0), B = (2,0), P = (1,1.7), Q = (1,−1.5), O = (9,9); n = 5, f = 2 (subsets of 3).
    # {A,B,P}: |AB| = 2, |AP| = |BP| = √3.89 ≈ 1.97 → diameter 2, sum of squares 4 + 2·3.89 = 11.78
    # {A,B,Q}: |AQ| = |BQ| = √3.25 ≈ 1.80        → diameter 2, sum of squares 4 + 2·3.25 = 10.5
    # {A,P,Q}, {B,P,Q}: |PQ| = 3.2; anything with O is farther. Tie at 2: "tightest" takes {A,B,Q},
    # "first" the first in combinations order, {A,B,P}.
    G = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.7], [1.0, -1.5], [9.0, 9.0]], dtype=F64)
    assert A.get("mda").aggregate(G, 2).selected.tolist() == [True, True, False, True, False]
    assert A.get("mda(ties=first)").aggregate(G, 2).selected.tolist() == [True, True, True, False, False]
    # rows reordered to B, A, Q, P, O: "tightest" still takes {A,B,Q}; "first" now takes {B,A,Q} too,
    # a different subset than before (the order decided)
    perm = torch.tensor([1, 0, 3, 2, 4])
    assert A.get("mda").aggregate(G[perm], 2).selected.tolist() == [True, True, True, False, False]
    first = A.get("mda(ties=first)")
    assert not torch.allclose(first(G[perm], 2), first(G, 2))


@pytest.mark.parametrize("n, f", [(7, 1), (8, 1), (11, 2), (12, 2), (15, 3), (5, 0)])
def test_bulyan_matches_loop_reference(n, f):
    for seed in range(3):
        G = torch.randn(n, 6, generator=_gen(10 * n + seed), dtype=F64)
        want, rows = _ref_bulyan(G, f)
        out = A.get("bulyan").aggregate(G, f)
        assert torch.allclose(out.value, want)
        assert set(out.selected.nonzero().flatten().tolist()) == rows


@pytest.mark.parametrize("seed", range(4))
def test_geometric_median_matches_weiszfeld_reference(seed):
    G = torch.randn(9, 5, generator=_gen(seed), dtype=F64) * 3
    for iters in (1, 3, 8):
        assert torch.allclose(A.get(f"geometric-median(iters={iters})")(G, 2), _ref_geometric_median(G, iters=iters))
    # many iterations reach the fixed point: the smoothed objective's gradient vanishes there
    z = A.get("geometric-median(iters=200)")(G, 2)
    w = 1.0 / torch.linalg.vector_norm(G - z, dim=1).clamp_min(0.1)
    assert torch.allclose((w[:, None] * (G - z)).sum(0), torch.zeros(5, dtype=F64), atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_centered_clipping_matches_loop_reference(seed):
    G = torch.randn(8, 5, generator=_gen(seed), dtype=F64) * 4
    state = torch.randn(5, generator=_gen(seed + 50), dtype=F64)
    for tau, iters in ((1.0, 1), (2.0, 3), (100.0, 2)):
        rule = A.get(f"cc(tau={tau},iters={iters})")
        assert torch.allclose(rule(G, 2), _ref_cc(G, tau, iters))
        assert torch.allclose(rule(G, 2, state=state), _ref_cc(G, tau, iters, state))


@pytest.mark.parametrize("seed", range(3))
def test_nnm_matches_loop_reference(seed):
    G = torch.randn(9, 4, generator=_gen(seed), dtype=F64)
    assert torch.allclose(A.get("nnm+average")(G, 3), _ref_nnm(G, 3).mean(0))
    # selected rows of nnm+krum are indexed by the row each mixed vector was centred on. Rows with the
    # same neighbourhood mix to the same vector (up to rounding), so Krum's choice among them is a tie
    # decided by the last bits: check that the selected row's mixed vector is Krum's output.
    mixed = _ref_nnm(G, 3)
    out = A.get("nnm+krum").aggregate(G, 3)
    assert torch.allclose(out.value, A.get("krum")(mixed, 3))
    assert int(out.selected.sum()) == 1
    assert torch.allclose(mixed[out.selected][0], out.value)
    ref = A.get("krum").aggregate(mixed, 3).selected
    assert torch.allclose(mixed[ref][0], mixed[out.selected][0])


def test_coordinate_rules_match_sorting_reference():
    G = torch.randn(9, 50, generator=_gen(3), dtype=F64)
    S = G.sort(0).values
    assert torch.allclose(A.get("median")(G, 4), S[4])
    assert torch.allclose(A.get("trimmed-mean")(G, 3), S[3:6].mean(0))
    G8 = G[:8]
    S8 = G8.sort(0).values
    assert torch.allclose(A.get("median")(G8, 3), (S8[3] + S8[4]) / 2)


@pytest.mark.parametrize("n", range(1, 13))
def test_sorting_network_sorts_every_zero_one_input(n):
    # 0-1 principle: a comparator network sorts everything iff it sorts all 2^n 0-1 sequences
    net = geo.sorting_network(n)
    assert all(i < j for i, j in net)
    for bits in range(1 << n):
        v = [(bits >> k) & 1 for k in range(n)]
        for i, j in net:
            if v[i] > v[j]:
                v[i], v[j] = v[j], v[i]
        assert v == sorted(v)


@pytest.mark.parametrize("spec, n, f", [("median", 11, 5), ("median", 12, 5), ("trimmed-mean", 25, 5),
                                        ("meamed", 11, 5), ("meamed", 26, 5), ("bulyan", 25, 5),
                                        ("bucketing(s=2)+median", 11, 2)])
def test_cpu_sorting_network_path_matches_torch_sort(spec, n, f, monkeypatch):
    G = torch.randn(n, 300, generator=_gen(n), dtype=F64)
    G[0, :7] = math.inf
    G[1, 3:9] = -math.inf
    G[2, 5] = math.nan
    before = G.clone()
    S = torch.stack(geo.sorted_rows(G))  # 300 columns: torch.sort
    want = A.get(spec)(G, f, generator=_gen(1))
    monkeypatch.setattr(geo, "NETWORK_MIN_COLUMNS", 1)
    assert torch.equal(torch.stack(geo.sorted_rows(G)), S)
    assert torch.equal(G.nan_to_num(), before.nan_to_num())  # not modified
    got = A.get(spec)(G, f, generator=_gen(1))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    for m in (13, 20, 31):
        X = torch.randn(m, 50, generator=_gen(m), dtype=F64)
        assert torch.equal(torch.stack(geo.sorted_rows(X)), X.sort(0).values)


def test_mean_closest_is_exact_next_to_huge_values():
    # a huge finite Byzantine value below the window must not wash out the window's sum
    G = torch.tensor([[-1.0e30], [1.0], [2.0], [3.0], [1.0e30]], dtype=torch.float32)
    assert A.get("meamed")(G, 2).item() == 2.0  # (1 + 2 + 3)/3
    assert A.get("trimmed-mean")(G, 1).item() == 2.0
    G = torch.tensor([[-3.0e38], [1.0], [2.0], [4.0], [3.0e38]], dtype=torch.float32)
    assert A.get("median")(G, 2).item() == 2.0


# Closest-to-median means with ties. Definition (MeaMed; Bulyan's second phase): per coordinate the
# mean of the k values nearest the median; when values at median − r and median + r compete for the
# last places, the lower ones are taken (the first k values stably sorted by (|x − median|, x)).


def test_meamed_tie_at_the_far_end_known_answer():
    # f = 1, k = 4, median 0, distances 2, 2, 0, 0.5, 1: the four nearest are 0, 0.5, 1 and one −2
    # → (−2 + 0 + 0.5 + 1)/4 = −0.125 (windows [−2, −2, 0, 0.5] and [−2, 0, 0.5, 1] both reach 2;
    # only the second is a set of nearest values — the first leaves out 1 for a farther −2)
    G = torch.tensor([[-2.0], [-2.0], [0.0], [0.5], [1.0]], dtype=F64)
    assert A.get("meamed")(G, 1).tolist() == [-0.125]
    assert A.get("meamed")(-G, 1).tolist() == [0.125]  # mirrored
    # a genuine tie: median 0, k = 2 among −1, 0, 1 at distances 1, 0, 1 → 0 and the lower −1
    G = torch.tensor([[1.0], [-1.0], [0.0]], dtype=F64)
    assert A.get("meamed")(G, 1).tolist() == [-0.5]


def test_bulyan_tie_at_the_far_end_known_answer():
    # n = 7, f = 1: θ = 5, β = 3. Krum (k = 4) keeps the five rows with second coordinate 0 (the two
    # others are ≥ 100 away from everything). Coordinate 0 of the selection: −1, −1, 0, 0.9, 2,
    # median 0, distances 1, 1, 0, 0.9, 2 → 0, 0.9 and one −1 → −0.1/3. Coordinate 1: all 0.
    G = torch.tensor([[-1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.9, 0.0], [2.0, 0.0], [100.0, 100.0],
                      [-100.0, 100.0]], dtype=F64)
    out = A.get("bulyan").aggregate(G, 1)
    assert out.selected.tolist() == [True] * 5 + [False] * 2
    torch.testing.assert_close(out.value, torch.tensor([-0.1 / 3, 0.0], dtype=F64), rtol=0, atol=1e-15)


def _grid_case(rng: np.random.Generator, n: int, f: int, d: int, nonfinite: bool) -> np.ndarray:
    """Values on a coarse grid (ties, duplicates), sometimes f identical Byzantine rows, and up to f
    non-finite entries (NaN, ±inf) per column."""
    X = rng.integers(-3, 4, size=(n, d)) * rng.choice([0.25, 0.5, 1.0])
    if f and rng.random() < 0.4:
        X[n - f:] = X[int(rng.integers(0, n - f))] + rng.choice([0.0, 0.5])
    if nonfinite:
        for c in range(d):
            for r in rng.choice(n, int(rng.integers(0, f + 1)), replace=False):
                X[r, c] = rng.choice([math.nan, math.inf, -math.inf])
    return X


@pytest.mark.parametrize("nonfinite", [False, True])
def test_meamed_matches_brute_force_with_ties(nonfinite):
    rng = np.random.default_rng(11 + nonfinite)
    for _ in range(300):
        n = int(rng.integers(1, 14))
        f = int(rng.integers(0, (n - 1) // 2 + 1))
        X = _grid_case(rng, n, f, int(rng.integers(1, 7)), nonfinite)
        got = A.get("meamed")(torch.from_numpy(X), f).numpy()
        np.testing.assert_allclose(got, _np_mean_closest_to_median(X, n - f), rtol=0, atol=1e-12, err_msg=str(X))


def test_meamed_matches_brute_force_under_identical_alie_rows():
    # f identical "little(negative=true)" rows μ − 1.5σ next to 6 honest rows: the Byzantine value
    # ties with itself f times at the low end of many coordinates
    from dpbr.robust import attacks

    H = torch.randn(6, 2000, generator=_gen(0), dtype=F64)
    X = torch.cat([H, attacks.get("little(negative=true)")(H, 5)])
    np.testing.assert_allclose(A.get("meamed")(X, 5).numpy(), _np_mean_closest_to_median(X.numpy(), 6),
                               rtol=0, atol=1e-12)


def test_bulyan_matches_brute_force_with_ties():
    rng = np.random.default_rng(5)
    for _ in range(120):
        f = int(rng.integers(0, 3))
        n = 4 * f + 3 + int(rng.integers(0, 4))
        X = _grid_case(rng, n, f, int(rng.integers(1, 5)), nonfinite=False)
        np.testing.assert_allclose(A.get("bulyan")(torch.from_numpy(X), f).numpy(), _np_bulyan(X, f),
                                   rtol=0, atol=1e-12, err_msg=str(X))


def test_mean_closest_sorting_network_path_with_ties(monkeypatch):
    monkeypatch.setattr(geo, "NETWORK_MIN_COLUMNS", 1)
    rng = np.random.default_rng(8)
    for _ in range(60):
        n = int(rng.integers(3, 14))
        f = int(rng.integers(0, (n - 1) // 2 + 1))
        X = _grid_case(rng, n, f, 40, nonfinite=True)
        got = A.get("meamed")(torch.from_numpy(X), f).numpy()
        np.testing.assert_allclose(got, _np_mean_closest_to_median(X, n - f), rtol=0, atol=1e-12)


def test_krum_neighbours_convention():
    # KRUM_G with n − f − 1 = 3 nearest others (squared): 0: 1+6.25+16 = 23.25; 1: 1+2.25+9 = 12.25;
    # 2.5: 6.25+2.25+2.25 = 10.75 ← ; 4: 16+9+2.25 = 27.25; 10: 36+56.25+81 = 173.25.
    # (The paper's n − f − 2 = 2 picks 1, see test_krum_known_answer.)
    out = A.get("krum(neighbours=n-f-1)").aggregate(KRUM_G, 1)
    assert out.value.tolist() == [2.5, 7.0] and out.selected.tolist() == [False, False, True, False, False]
    assert A.get("krum(neighbours=n-f-2)")(KRUM_G, 1).tolist() == [1.0, 7.0]
    # multi-krum m = 2 with n − f − 1: 2.5 and 1 → 1.75
    assert A.get("multi-krum(m=2,neighbours=n-f-1)")(KRUM_G, 1).tolist() == [1.75, 7.0]
    # the default is not part of the name (cell ids of existing specs are unchanged)
    assert A.get("krum").name == "krum" and A.Krum().name == "krum" and A.MultiKrum(m=3).name == "multi-krum(m=3)"
    assert A.Krum("n-f-1").name == "krum(neighbours=n-f-1)"
    assert A.MultiKrum(neighbours="n-f-1").name == "multi-krum(neighbours=n-f-1)"
    assert A.get("krum(neighbours=n-f-1)").requirement == "n >= 2f + 3"
    with pytest.raises(UsageError, match="neighbours must be one of n-f-2, n-f-1"):
        A.get("krum(neighbours=n-f)")
    # random inputs against the NumPy reference
    for seed in range(5):
        G = torch.randn(11, 4, generator=_gen(seed), dtype=F64)
        for spec in ("krum(neighbours=n-f-1)", "multi-krum(neighbours=n-f-1)", "multi-krum(m=3,neighbours=n-f-1)"):
            np.testing.assert_allclose(A.get(spec)(G, 3).numpy(), _np_ref(spec, G.numpy(), 3), rtol=1e-12)


# ----------------------------------------------------------------------------------------------- #
# Properties


@pytest.mark.parametrize("spec, n, f", [c for c in CASES if not c[0].startswith("bucketing")])
def test_permutation_invariance(spec, n, f):
    G = torch.randn(n, 6, generator=_gen(n), dtype=F64)
    perm = torch.randperm(n, generator=_gen(n + 1))
    rule = A.get(spec)
    a, b = rule.aggregate(G, f), rule.aggregate(G[perm], f)
    assert torch.allclose(a.value, b.value)
    # (NNM often mixes two rows into the same vector; which of the equal copies is "selected" is then
    # a tie between identical vectors, so only the value is compared there)
    if rule.selects and not spec.startswith("nnm"):
        assert torch.equal(a.selected[perm], b.selected)


@pytest.mark.parametrize("spec, n, f", [c for c in CASES if c[0].startswith("bucketing")])
def test_bucketing_is_permutation_invariant_in_distribution(spec, n, f):
    # π ∘ σ is uniform when π is: over all seeds, the multiset of outputs on G and on G[σ] agree.
    # Checked exactly on a small case by enumerating the generator's permutations is impractical, so
    # compare the means over many draws (common set of seeds, independent permutations).
    G = _clustered(n, 3, seed=n, outliers=f)
    sigma = torch.randperm(n, generator=_gen(99))
    rule = A.get(spec)
    a = torch.stack([rule(G, f, generator=_gen(s)) for s in range(300)]).mean(0)
    b = torch.stack([rule(G[sigma], f, generator=_gen(s + 1000)) for s in range(300)]).mean(0)
    assert torch.allclose(a, b, atol=0.02)


def test_bucketing_uses_only_the_given_generator():
    G = torch.randn(12, 5, generator=_gen(1), dtype=F64)
    rule = A.get("bucketing(s=2)+median")
    torch.manual_seed(0)
    a = rule(G, 2, generator=_gen(5))
    torch.manual_seed(1)
    b = rule(G, 2, generator=_gen(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, rule(G, 2, generator=_gen(6)))
    out = A.get("bucketing(s=2)+krum").aggregate(torch.randn(14, 3, generator=_gen(2), dtype=F64), 2, generator=_gen(3))
    assert out.selected.sum() == 2  # Krum picks one bucket = the two rows in it


@pytest.mark.parametrize("spec, n, f", CASES)
def test_equal_inputs_give_that_input(spec, n, f):
    x = torch.randn(5, generator=_gen(0), dtype=F64)
    G = x.repeat(n, 1)
    state = x if "cc" in spec else None  # centered clipping moves ≤ τ per iteration from its center
    assert torch.allclose(A.get(spec)(G, f, generator=_gen(0), state=state), x)
    small = 0.1 * x  # within τ of the zero center
    assert torch.allclose(A.get(spec)(small.repeat(n, 1), f, generator=_gen(0)), small)


@pytest.mark.parametrize("spec, n, f", CASES)
def test_translation_equivariance(spec, n, f):
    # Holds for every rule; centered clipping needs its center translated too (state=None is the
    # zero vector, which does not move), and bucketing needs the same generator.
    G = _clustered(n, 6, seed=n, outliers=f)
    t = torch.randn(6, generator=_gen(7), dtype=F64) * 5
    rule = A.get(spec)
    s0 = torch.randn(6, generator=_gen(8), dtype=F64)
    a = rule(G, f, generator=_gen(1), state=s0)
    b = rule(G + t, f, generator=_gen(1), state=s0 + t)
    assert torch.allclose(a + t, b, atol=1e-9)


@given(n=st.integers(3, 12), d=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), data=st.data())
@settings(max_examples=40, deadline=None)
def test_hypothesis_permutation_and_translation(n, d, seed, data):
    rules = [("krum", 2, 3), ("mda", 2, 1), ("median", 2, 1), ("meamed", 2, 1), ("trimmed-mean", 2, 1),
             ("bulyan", 4, 3), ("geometric-median", 2, 1), ("multi-krum", 2, 3)]
    # (in one dimension with even n the geometric median is not unique: any point between the two
    # middle values; which one Weiszfeld reaches depends on its start, so d = 1 is left out there)
    spec, a_, b_ = data.draw(st.sampled_from([r for r in rules if n >= r[2] and (d > 1 or r[0] != "geometric-median")]))
    f = data.draw(st.integers(0, (n - b_) // a_))
    if spec == "mda" and A.subset_pairs(n, n - f) > A.MDA_MAX_ENTRIES:
        return
    G = torch.randn(n, d, generator=_gen(seed), dtype=F64)
    perm = torch.randperm(n, generator=_gen(seed + 1))
    t = torch.randn(d, generator=_gen(seed + 2), dtype=F64)
    rule = A.get(spec)
    y = rule(G, f)
    assert torch.allclose(rule(G[perm], f), y)
    assert torch.allclose(rule(G + t, f), y + t, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec, n, f", CASES)
def test_dtype_and_shape_preserved(spec, n, f, dtype):
    G = _clustered(n, 9, seed=n, outliers=f, dtype=dtype)
    rule = A.get(spec)
    out = rule.aggregate(G, f, generator=_gen(0))
    assert out.value.dtype == dtype and out.value.shape == (9,) and out.value.device == G.device
    assert torch.isfinite(out.value).all()
    # the float64 NumPy reference on the same (rounded) input, up to the dtype's precision
    want = torch.from_numpy(_np_ref(spec, G.double().numpy(), f, seed=0))
    tol = {torch.float32: 1e-5, F64: 1e-12, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert torch.allclose(out.value.double(), want, rtol=tol, atol=tol)
    if rule.selects:
        assert out.selected.dtype == torch.bool and out.selected.shape == (n,)
    else:
        assert out.selected is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec, n, f", CASES)
def test_device_preserved_and_input_not_mutated(spec, n, f, device):
    G = _clustered(n, 7, seed=1, outliers=f).to(device)
    G[0, 0] = math.nan if spec != "average" and f > 0 else G[0, 0]
    before = G.clone()
    gen = torch.Generator(device=device).manual_seed(0)
    state = torch.zeros(7, dtype=F64, device=device)
    out = A.get(spec).aggregate(G, f, generator=gen, state=state)
    assert out.value.device == G.device
    assert torch.equal(G.isnan(), before.isnan()) and torch.equal(G.nan_to_num(), before.nan_to_num())
    assert torch.equal(state, torch.zeros(7, dtype=F64, device=device))
    assert out.value.data_ptr() != G.data_ptr()
    if isinstance(out.state, torch.Tensor):
        assert out.state.data_ptr() != out.value.data_ptr()


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("spec, n, f", CASES)
def test_no_host_synchronisation_on_cuda(spec, n, f, device):
    G = _clustered(n, 7, seed=1, outliers=f).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rule = A.get(spec)
    rule(G, f, generator=gen)  # warm-up: the MDA tables are built once, outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rule(G, f, generator=gen, state=torch.zeros(7, dtype=F64, device=device))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_hot_paths_have_no_item_or_host_conversion():
    import ast

    for module in (A, geo):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert node.func.attr not in ("item", "tolist", "cpu", "numpy", "nonzero"), (module.__name__, node.lineno)


# ----------------------------------------------------------------------------------------------- #
# Non-finite inputs

def _corrupt(G: torch.Tensor, rows: list[int], kind: str) -> torch.Tensor:
    G = G.clone()
    kinds = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
    for j, r in enumerate(rows):
        k = kind if kind != "mixed" else ("nan", "inf", "-inf", "partial")[j % 4]
        if k == "partial":
            G[r, 1] = math.nan
            G[r, 3] = -math.inf
        else:
            G[r] = kinds[k]
    return G


KINDS = ["nan", "inf", "-inf", "partial", "mixed"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec, n, f", ROBUST)
def test_non_finite_rows_are_handled(spec, n, f, kind):
    for count in sorted({1, f}):
        if count > f:
            continue
        G = torch.randn(n, 5, generator=_gen(n + count), dtype=F64)
        rows = torch.randperm(n, generator=_gen(count))[:count].tolist()
        bad = _corrupt(G, rows, kind)
        rule = A.get(spec)
        out = rule.aggregate(bad, f, generator=_gen(4))
        assert torch.isfinite(out.value).all(), (spec, kind, count)
        if rule.selects:
            assert not out.selected[rows].any() or spec.startswith(("nnm", "bucketing"))
        # the NumPy reference applies the documented semantics directly (never the rule under test)
        want = torch.from_numpy(_np_ref(spec, bad.numpy(), f, seed=4))
        assert torch.isfinite(want).all(), (spec, kind, count)
        assert torch.allclose(out.value, want, rtol=1e-12, atol=1e-9), (spec, kind, count)


def test_average_propagates_non_finite_values():
    G = torch.randn(5, 3, dtype=F64)
    G[2, 1] = math.nan
    out = A.get("average")(G, 0)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


def test_more_than_f_non_finite_rows_still_give_a_value_of_the_right_shape():
    G = torch.randn(9, 4, dtype=F64)
    G[:5] = math.nan
    for spec, n, f in [("krum", 9, 3), ("mda", 9, 4), ("bulyan", 9, 1), ("median", 9, 4)]:
        assert A.get(spec)(G, f).shape == (4,)
    # Bulyan never picks a row twice, even when every score is infinite
    out = A.get("bulyan").aggregate(G, 1)
    assert out.selected.sum() == 9 - 2


def test_overflowing_finite_rows_count_as_non_finite_for_distances():
    G = torch.randn(7, 3, dtype=torch.float32)
    G[0] = 3.0e38  # finite, but its squared norm overflows float32
    out = A.get("mda").aggregate(G, 2)
    assert torch.isfinite(out.value).all() and not out.selected[0]


def test_squared_distances_known_answer_and_exact_properties():
    # rows (0,0), (3,4), (1,0) → squared distances 25, 1, 20; a NaN row and an inf row are infinitely far
    G = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [math.nan, 1.0], [math.inf, 0.0]])
    D2, finite = geo.sqdist(geo.gram(G))
    torch.testing.assert_close(D2[:3, :3], torch.tensor([[0.0, 25.0, 1.0], [25.0, 0.0, 20.0], [1.0, 20.0, 0.0]]))
    assert finite.tolist() == [True, True, True, False, False]
    assert torch.isinf(D2[3:]).all() and torch.isinf(D2[:, 3:]).all() and not torch.isnan(D2).any()
    # random inputs: exactly symmetric, exactly zero diagonal, close to the float64 brute force
    X = torch.randn(9, 50, generator=_gen(4)) * 10
    D2 = geo.squared_distances(geo.gram(X))
    assert torch.equal(D2, D2.T) and torch.equal(D2.diagonal(), torch.zeros(9)) and (D2 >= 0).all()
    torch.testing.assert_close(D2.double(), torch.cdist(X.double(), X.double()) ** 2, rtol=1e-5, atol=1e-3)


def test_mean_rows_is_the_in_order_sum_divided_by_the_count():
    X = torch.randn(11, 37, generator=_gen(5)) * 1e3
    rows = torch.tensor([1, 4, 5, 9])
    total = X[1] + X[4] + X[5] + X[9]
    assert torch.equal(geo.mean_rows(X, rows), total / 4)
    assert torch.equal(geo.mean_rows(X, rows), torch.nn.functional.embedding_bag(rows[None], X, mode="mean")[0])
    assert torch.equal(geo.mean_rows(X.double(), rows[:1]), X[1].double())


# ----------------------------------------------------------------------------------------------- #
# Centered-clipping state


def test_centered_clipping_state_round_trip():
    rule = A.get("cc(tau=0.5,iters=2)")
    G1 = torch.randn(6, 4, generator=_gen(1), dtype=F64)
    G2 = torch.randn(6, 4, generator=_gen(2), dtype=F64)
    first = rule.aggregate(G1, 1)
    assert torch.allclose(first.value, _ref_cc(G1, 0.5, 2))
    second = rule.aggregate(G2, 1, state=first.state)
    assert torch.allclose(second.value, _ref_cc(G2, 0.5, 2, first.value))
    assert torch.equal(second.state, second.value)
    # no hidden state: the same call gives the same answer, and state=None starts from zeros again
    assert torch.equal(rule.aggregate(G2, 1, state=first.state).value, second.value)
    assert torch.equal(rule.aggregate(G1, 1).value, first.value)
    # the returned state is not the returned value (mutating one leaves the other)
    second.value.zero_()
    assert not torch.equal(second.state, second.value)
    # the state passes through pre-aggregators
    composed = A.get("bucketing(s=2)+cc(tau=0.5,iters=2)").aggregate(G1, 1, generator=_gen(0), state=first.state)
    assert torch.equal(composed.state, composed.value)
    with pytest.raises(ValueError, match="state"):
        rule(G1, 1, state=torch.zeros(3, dtype=F64))


def test_stateless_rules_ignore_state():
    G = torch.randn(7, 3, dtype=F64)
    out = A.get("mda").aggregate(G, 2, state="anything")
    assert out.state is None


# ----------------------------------------------------------------------------------------------- #
# Requirements, errors, VN bounds


@pytest.mark.parametrize(
    "spec, f, min_n, text",
    [
        ("average", 5, 1, "n >= 1"),
        ("krum", 5, 13, "n >= 2f + 3"),
        ("multi-krum", 5, 13, "n >= 2f + 3"),
        ("multi-krum(m=10)", 2, 12, "n >= 2f + 3 and n >= f + 10"),
        ("median", 5, 11, "n >= 2f + 1"),
        ("trimmed-mean", 5, 11, "n >= 2f + 1"),
        ("meamed", 5, 11, "n >= 2f + 1"),
        ("mda", 5, 11, "n >= 2f + 1"),
        ("bulyan", 5, 23, "n >= 4f + 3"),
        ("geometric-median", 5, 11, "n >= 2f + 1"),
        ("cc", 5, 1, "n >= 1"),
        ("bucketing(s=2)+krum", 2, 13, "ceil(n/2) >= 2f + 3"),
        ("bucketing(s=3)+mda", 2, 13, "ceil(n/3) >= 2f + 1"),
        ("nnm+krum", 2, 7, "n >= 2f + 1 and n >= 2f + 3"),
        ("nnm+cc", 2, 5, "n >= 2f + 1"),
        ("bucketing(s=2)+nnm+cc(tau=1)", 2, 9, "ceil(n/2) >= 2f + 1"),
    ],
)
def test_requirements_and_min_workers(spec, f, min_n, text):
    rule = A.get(spec)
    assert rule.requirement == text
    assert rule.min_workers(f) == min_n
    rule.check(min_n, f)
    if min_n > 1:
        with pytest.raises(ValueError) as err:
            rule.check(min_n - 1, f)
        msg = str(err.value)
        assert rule.name in msg and text in msg and f"n = {min_n - 1}" in msg and f"f = {f}" in msg
        with pytest.raises(ValueError):
            rule(torch.zeros(min_n - 1, 3), f)


@pytest.mark.parametrize("n, f", [(0, 0), (5, -1), (3, 1.5), (True, 0)])
def test_check_rejects_bad_counts(n, f):
    with pytest.raises(ValueError, match="krum"):
        A.get("krum").check(n, f)


def test_mda_refuses_sizes_beyond_the_table_limit():
    assert A.subset_pairs(11, 6) == 462 * 15
    A.get("mda").check(25, 5)  # 53,130 × 190 entries: allowed
    with pytest.raises(ValueError, match="MDA_MAX_ENTRIES") as err:
        A.get("mda").check(25, 12)
    assert "n = 25" in str(err.value) and "f = 12" in str(err.value)
    with pytest.raises(ValueError, match="after bucketing"):
        A.get("bucketing(s=2)+mda").check(50, 12)


def test_mda_subset_tables_are_cached_constants():
    a = A.mda_tables(11, 5, "cpu")
    assert A.mda_tables(11, 5, "cpu") is a
    members, pairs = a
    assert members.shape == (462, 6) and pairs.shape == (15, 462) and pairs.dtype == torch.int32
    assert members[0].tolist() == [0, 1, 2, 3, 4, 5] and members[-1].tolist() == [5, 6, 7, 8, 9, 10]
    # pair-major: column c lists the flat indices i*n + j (i < j) of subset c's pairs
    assert pairs[:, 0].tolist() == [i * 11 + j for i, j in itertools.combinations(range(6), 2)]
    assert pairs[:, -1].tolist() == [i * 11 + j for i, j in itertools.combinations(range(5, 11), 2)]


def test_input_validation():
    rule = A.get("median")
    with pytest.raises(TypeError):
        rule([[1.0, 2.0]], 0)
    with pytest.raises(ValueError):
        rule(torch.zeros(3), 0)
    with pytest.raises(TypeError):
        rule(torch.zeros(3, 2, dtype=torch.int64), 0)


def test_vn_bounds():
    s8 = math.sqrt(8)
    mda, krum, bulyan, median = (A.get(x) for x in ("mda", "krum", "bulyan", "median"))
    assert mda.vn_bound(11, 5) == pytest.approx(6 / (s8 * 5)) and round(mda.vn_bound(11, 5), 3) == 0.424
    assert mda.vn_bound(11, 0) == math.inf
    assert mda.vn_bound(11, 6) is None  # n < 2f + 1
    # Krum/Bulyan: 1/sqrt(2(n − f + f(n + f(n − f − 2) − 2)/(n − 2f − 2)))
    # n = 13, f = 5: 2·(8 + 5·(13 + 5·6 − 2)/1) = 2·213 = 426
    assert krum.vn_bound(13, 5) == pytest.approx(1 / math.sqrt(426))
    assert krum.vn_bound(12, 5) is None and A.krum_vn_bound(12, 5) is None  # n ≤ 2f + 2
    assert krum.vn_bound(11, 0) == pytest.approx(1 / math.sqrt(22))
    # n = 23, f = 5: 2·(18 + 5·(23 + 5·16 − 2)/11) = 2·(18 + 505/11)
    assert bulyan.vn_bound(23, 5) == pytest.approx(1 / math.sqrt(2 * (18 + 505 / 11)))
    assert bulyan.vn_bound(22, 5) is None
    assert median.vn_bound(11, 5) == pytest.approx(1 / math.sqrt(6))
    assert A.get("average").vn_bound(11, 0) == math.inf and A.get("average").vn_bound(11, 1) == 0.0
    for spec in ("trimmed-mean", "meamed", "geometric-median", "cc", "nnm+mda"):
        assert A.get(spec).vn_bound(11, 5) is None
    # multi-krum: LPD's constant for m ≤ n − f − 2 only
    assert A.get("multi-krum(m=2)").vn_bound(13, 5) == pytest.approx(1 / math.sqrt(426))
    assert A.get("multi-krum").vn_bound(13, 5) is None
    # bucketing: sqrt(smallest bucket) · inner bound on ⌈n/s⌉ buckets
    assert A.get("bucketing(s=2)+median").vn_bound(12, 2) == pytest.approx(math.sqrt(2) / math.sqrt(4))
    assert A.get("bucketing(s=2)+median").vn_bound(11, 2) == pytest.approx(1 / math.sqrt(4))
    assert A.get("bucketing(s=2)+mda").vn_bound(12, 0) == math.inf
    assert A.get("bucketing(s=2)+krum").vn_bound(11, 2) is None  # 6 buckets < 2f + 3


# ----------------------------------------------------------------------------------------------- #
# Names and composition parsing


def test_names_lists_rules_and_pre_aggregators():
    assert A.names() == sorted([
        "average", "bucketing", "bulyan", "centered-clipping", "geometric-median", "krum", "mda", "meamed",
        "median", "multi-krum", "nnm", "trimmed-mean",
    ])


@pytest.mark.parametrize(
    "spec, name",
    [
        ("krum", "krum"),
        ("Multi-Krum( m = 4 )", "multi-krum(m=4)"),
        ("trimmed-mean", "trimmed-mean"),
        ("bucketing(s=2)+krum", "bucketing(s=2)+krum"),
        ("nnm+mda", "nnm+mda"),
        ("bucketing(s=2)+nnm+cc(tau=1)", "bucketing(s=2)+nnm+centered-clipping(tau=1)"),
        ("rfa(iters=20,nu=0.5)", "geometric-median(iters=20,nu=0.5)"),
        ("brute", "mda"),
        ("CC(tau=1.0)", "centered-clipping(tau=1)"),
        ("mda(ties=first)", "mda(ties=first)"),
    ],
)
def test_spec_names_are_canonical(spec, name):
    rule = A.get(spec)
    assert rule.name == name
    assert A.get(rule.name).name == name
    assert canonical(rule.name) == rule.name


def test_composition_structure_and_params():
    rule = A.get("bucketing(s=3)+nnm+multi-krum(m=2)")
    assert isinstance(rule, A.Bucketing) and rule.s == 3
    assert isinstance(rule.inner, A.NNM) and isinstance(rule.inner.inner, A.MultiKrum)
    assert rule.inner.inner.m == 2 and rule.selects
    # **params go to the last term; one given there already is an error (as in every family)
    assert A.get("multi-krum", m=4).name == "multi-krum(m=4)"
    assert A.get("bucketing(s=2)+cc", tau=2.0, iters=5).inner.tau == 2.0
    assert A.get("bucketing(s=2)+cc", tau=2.0).name == "bucketing(s=2)+centered-clipping(tau=2)"
    with pytest.raises(UsageError, match="parameter 'tau' of 'cc' given twice"):
        A.get("bucketing(s=2)+cc(tau=1)", tau=2.0)
    assert A.get("bucketing+krum").s == 2  # the paper's default bucket size


@pytest.mark.parametrize(
    "spec, params, match",
    [
        ("nnm", {}, "pre-aggregator"),
        ("krum+mda", {}, "only pre-aggregators"),
        ("kurm", {}, "unknown aggregation rule"),
        ("foo+krum", {}, "unknown pre-aggregator"),
        ("multi-krum(m=0)", {}, "m must be"),
        ("multi-krum(m=2.5)", {}, "m must be"),
        ("krum(m=2)", {}, "no parameter"),
        ("cc(tau=-1)", {}, "tau must be"),
        ("geometric-median(nu=0)", {}, "nu must be"),
        ("bucketing(s=0)+krum", {}, "s must be"),
        ("median", {"iters": 3}, "no parameter"),
        ("mda(ties=last)", {}, "ties must be"),
        ("", {}, "empty"),
    ],
)
def test_bad_specs_raise_usage_errors(spec, params, match):
    with pytest.raises(UsageError, match=match) as err:
        A.get(spec, **params)
    assert "--gar" in str(err.value)


def test_public_callable_signature_matches_the_interface():
    rule = A.get("mda")
    sig = inspect.signature(rule)
    assert list(sig.parameters) == ["G", "f", "generator", "state"]
    assert sig.parameters["generator"].kind is inspect.Parameter.KEYWORD_ONLY
    out = rule.aggregate(torch.randn(11, 3), 5)
    assert isinstance(out, A.Aggregation)
    with pytest.raises(Exception):
        out.value = None  # frozen


# ----------------------------------------------------------------------------------------------- #
# A Gram matrix given by the caller (gram=)


@pytest.mark.parametrize("spec", ["mda", "krum", "multi-krum", "bulyan"])
def test_given_gram_gives_the_same_aggregate(spec):
    n, f = 11, 2
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(n, 50, generator=gen, dtype=torch.float64)
    G[8:] = G[7]  # copies, as the omniscient attacks send them
    rule = A.get(spec)
    assert rule.uses_gram
    direct = rule.aggregate(G, f)
    given = rule.aggregate(G, f, gram=G @ G.T)
    torch.testing.assert_close(given.value, direct.value, rtol=0, atol=1e-12)
    assert torch.equal(given.selected, direct.selected)


def test_gram_decides_for_the_rules_that_use_it_and_is_ignored_by_the_others():
    G = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    wrong = torch.zeros(7, 7, dtype=torch.float64)  # all distances 0: every subset ties
    assert torch.equal(A.get("mda").aggregate(G, 2, gram=wrong).selected,
                       torch.tensor([True] * 5 + [False] * 2))  # the first subset: the rule trusts gram
    for spec in ("average", "median", "trimmed-mean", "bucketing(s=2)+mda"):
        rule = A.get(spec)
        assert not rule.uses_gram
        torch.testing.assert_close(rule.aggregate(G, 1, gram=wrong, generator=torch.Generator().manual_seed(1)).value,
                                   rule.aggregate(G, 1, generator=torch.Generator().manual_seed(1)).value)


def test_a_gram_of_the_wrong_shape_is_refused():
    G = torch.randn(7, 5)
    with pytest.raises(ValueError, match="gram must be a floating \\(7, 7\\) tensor"):
        A.get("krum").aggregate(G, 1, gram=torch.zeros(6, 6))
