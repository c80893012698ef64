"""DRACO's redundancy kernels (Chen, Wang, Charles, Papailiopoulos 2018, arXiv 1803.09877): the
fractional repetition code with its majority vote, and the cyclic gradient code (Tandon, Lei, Dimakis,
Karampatziakis 2017, arXiv 1612.03301) with its locator and decoder.

Expected values are built by hand or with plain NumPy / torch here (the honest sum is ``G.sum(0)``,
windows and supports are written out, row spans are checked with ``numpy.linalg.lstsq``), never with
``dpbr.simulation.systems.codes`` itself; the encoding matrix that :func:`cyclic_decode` is given is an
input, not an expected value.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dpbr.simulation.systems import codes


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor (bitwise comparison, NaN included)."""
    return x.view({torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}[x.dtype])


# ----------------------------------------------------------------------------------------------------
# repetition_groups
# ----------------------------------------------------------------------------------------------------


def test_repetition_groups_are_consecutive_blocks_of_r_workers():
    assert codes.repetition_groups(6, 3).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert codes.repetition_groups(4, 1).tolist() == [[0], [1], [2], [3]]
    assert codes.repetition_groups(5, 5).tolist() == [[0, 1, 2, 3, 4]]
    groups = codes.repetition_groups(15, 5)
    assert groups.dtype == torch.int64 and tuple(groups.shape) == (3, 5)
    assert groups.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]


@pytest.mark.parametrize("workers, r, match", [(7, 3, "must divide"), (3, 6, "must divide"), (6, 0, "r must be ≥ 1"),
                                               (6, -2, "r must be ≥ 1"), (0, 1, "workers must be ≥ 1")])
def test_repetition_groups_refuse_impossible_shapes(workers, r, match):
    with pytest.raises(ValueError, match=match):
        codes.repetition_groups(workers, r)


# ----------------------------------------------------------------------------------------------------
# majority_vote, exact
# ----------------------------------------------------------------------------------------------------


def test_exact_vote_honest_majority_wins_even_against_agreeing_adversaries():
    """r = 5, s = 2: three honest replicas beat two adversaries, whatever the adversaries send and
    wherever they sit (two agreeing adversaries first, NaN/inf adversaries in the middle)."""
    h = torch.tensor([[1.5, -2.0, 3.25], [0.0, 7.0, -1.0], [4.0, 4.0, 4.0]], dtype=torch.float64)
    a = torch.tensor([9.0, 9.0, 9.0], dtype=torch.float64)
    nan = torch.tensor([float("nan"), 1.0, 1.0], dtype=torch.float64)
    inf = torch.tensor([float("inf"), 0.0, 0.0], dtype=torch.float64)
    replicas = torch.stack([
        torch.stack([h[0], h[0], h[0], a, a]),      # adversaries agree with each other, last
        torch.stack([nan, h[1], inf, h[1], h[1]]),  # non-finite adversaries
        torch.stack([a, a, h[2], h[2], h[2]]),      # agreeing adversaries first
    ])
    before = replicas.clone()
    decoded, ok = codes.majority_vote(replicas)
    assert ok.tolist() == [True, True, True]
    assert decoded.dtype == torch.float64 and tuple(decoded.shape) == (3, 3)
    for g in range(3):
        assert torch.equal(decoded[g], h[g])
        assert torch.equal(_bits(decoded[g]), _bits(h[g]))
    assert torch.equal(_bits(replicas), _bits(before))  # not mutated


def test_exact_vote_ties_and_minorities_fail_with_zeros():
    x, y, z = (torch.full((2,), v, dtype=torch.float32) for v in (1.0, 2.0, 3.0))
    replicas = torch.stack([
        torch.stack([x, x, y, y]),  # 2 vs 2: no strict majority
        torch.stack([x, y, x, x]),  # 3 of 4
        torch.stack([x, y, z, x]),  # 2 of 4
        torch.stack([y, y, y, y]),  # unanimous
    ])
    decoded, ok = codes.majority_vote(replicas)
    assert ok.tolist() == [False, True, False, True]
    assert decoded.tolist() == [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]
    assert decoded.dtype == torch.float32


def test_exact_vote_nan_replicas_never_count():
    nan_row = torch.tensor([float("nan"), 1.0])
    ok_row = torch.tensor([2.0, 1.0])
    replicas = torch.stack([
        torch.stack([nan_row, nan_row, nan_row]),  # identical NaN replicas: NaN never equals
        torch.stack([nan_row, ok_row, ok_row]),    # two finite agree: 2 of 3
        torch.stack([nan_row, nan_row, ok_row]),   # the finite one alone: 1 of 3
    ])
    decoded, ok = codes.majority_vote(replicas)
    assert ok.tolist() == [False, True, False]
    assert torch.equal(decoded[1], ok_row)
    assert torch.equal(decoded[0], torch.zeros(2)) and torch.equal(decoded[2], torch.zeros(2))
    assert not decoded.isnan().any()


def test_exact_vote_treats_signed_zeros_as_equal_and_returns_the_lowest_index_replica():
    neg = torch.tensor([-0.0, 1.0], dtype=torch.float64)
    pos = torch.tensor([0.0, 1.0], dtype=torch.float64)
    far = torch.tensor([5.0, 5.0], dtype=torch.float64)
    decoded, ok = codes.majority_vote(torch.stack([torch.stack([neg, pos, far]), torch.stack([far, pos, neg])]))
    assert ok.tolist() == [True, True]
    assert torch.signbit(decoded[0, 0]).item() is True   # replica 0 (−0.0) is the lowest winner
    assert torch.signbit(decoded[1, 0]).item() is False  # replica 1 (+0.0) is the lowest winner


def test_exact_vote_with_one_replica_returns_it_unless_it_holds_a_nan():
    """r = 1: the replica is its own majority; ``inf == inf`` under IEEE ``==``, so an infinite
    replica wins the exact vote (it never counts in the tolerance vote); a NaN one never does."""
    x = torch.tensor([[[1.0, -3.0]], [[float("inf"), 0.0]], [[2.0, float("nan")]]], dtype=torch.float16)
    decoded, ok = codes.majority_vote(x)
    assert ok.tolist() == [True, True, False]
    assert decoded.dtype == torch.float16
    assert decoded.tolist() == [[1.0, -3.0], [float("inf"), 0.0], [0.0, 0.0]]
    _, ok_tol = codes.majority_vote(x, tolerance=0.5)
    assert ok_tol.tolist() == [True, False, False]


# ----------------------------------------------------------------------------------------------------
# majority_vote, with a tolerance
# ----------------------------------------------------------------------------------------------------


def _noisy_group(rng: np.random.Generator, honest: np.ndarray, radius: float, r: int, adversaries: list[int],
                 far: np.ndarray) -> np.ndarray:
    """r replicas: honest + noise of norm exactly ``radius`` (random direction), adversaries ``far``."""
    out = np.empty((r, honest.size))
    for k in range(r):
        if k in adversaries:
            out[k] = far
        else:
            e = rng.standard_normal(honest.size)
            out[k] = honest + radius * e / np.linalg.norm(e)
    return out


def test_tolerance_vote_decodes_noisy_honest_replicas_within_tolerance():
    """r = 5, s = 2: honest replicas with noise of norm 0.45τ (pairwise ≤ 0.9τ) and two agreeing
    adversaries far away → ok, and the decoded vector is within τ of an honest replica. The exact
    vote on the same replicas fails: any noise breaks exact agreement."""
    rng = np.random.default_rng(0)
    tau, r, d = 0.1, 5, 50
    groups, honest_idx = [], []
    for adv in ([3, 4], [0, 1], [0, 4], [2]):
        honest = rng.standard_normal(d)
        far = honest + 10.0  # both adversaries send the same far vector
        groups.append(_noisy_group(rng, honest, 0.45 * tau, r, adv, far))
        honest_idx.append([k for k in range(r) if k not in adv])
    x = np.stack(groups)
    for g, idx in enumerate(honest_idx):  # premise: honest replicas pairwise within τ
        assert max(np.linalg.norm(x[g, i] - x[g, j]) for i in idx for j in idx) <= tau
    replicas = torch.from_numpy(x)
    decoded, ok = codes.majority_vote(replicas, tolerance=tau)
    assert ok.all()
    for g, idx in enumerate(honest_idx):
        assert min(np.linalg.norm(decoded[g].numpy() - x[g, i]) for i in idx) <= tau
        # decoded is one of the replicas, bitwise
        assert any(torch.equal(_bits(decoded[g]), _bits(replicas[g, k])) for k in range(r))
    _, ok_exact = codes.majority_vote(replicas)
    assert not ok_exact.any()


def test_tolerance_vote_fails_when_honest_noise_exceeds_tolerance():
    """Noise of norm 3τ per honest replica (pairwise distances > τ, checked) → no majority."""
    rng = np.random.default_rng(1)
    tau, r, d = 0.1, 5, 50
    honest = rng.standard_normal(d)
    x = _noisy_group(rng, honest, 3 * tau, r, [3, 4], honest + 10.0)[None]
    assert min(np.linalg.norm(x[0, i] - x[0, j]) for i in range(3) for j in range(3) if i != j) > tau
    decoded, ok = codes.majority_vote(torch.from_numpy(x), tolerance=tau)
    assert ok.tolist() == [False]
    assert torch.equal(decoded, torch.zeros(1, d, dtype=torch.float64))


def test_tolerance_vote_ignores_non_finite_replicas_and_counts_by_radius():
    # 1-d replicas: counts by hand with τ = 1: 0 and 0.9 and 1.8 → c = [2, 3, 2]: replica 1 wins
    x = torch.tensor([[[0.0], [0.9], [1.8], [float("nan")], [float("inf")]]])
    decoded, ok = codes.majority_vote(x, tolerance=1.0)
    assert ok.tolist() == [True] and decoded.tolist() == [[pytest.approx(0.9)]]
    # two far groups of two and a NaN: c = [2, 2, 2, 2, 0] < 3 → fail
    y = torch.tensor([[[0.0], [0.5], [10.0], [10.5], [float("nan")]]])
    decoded, ok = codes.majority_vote(y, tolerance=1.0)
    assert ok.tolist() == [False] and decoded.tolist() == [[0.0]]


@pytest.mark.parametrize("bad, match", [
    (dict(replicas=torch.zeros(3, 4)), "groups, r, d"),
    (dict(replicas=torch.zeros(2, 0, 3)), "at least one replica"),
    (dict(replicas=torch.zeros(2, 3, 3), tolerance=-1.0), "tolerance"),
    (dict(replicas=torch.zeros(2, 3, 3), tolerance=float("nan")), "tolerance"),
])
def test_majority_vote_refuses_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        codes.majority_vote(**bad)


# ----------------------------------------------------------------------------------------------------
# cyclic_assignment and cyclic_encoding
# ----------------------------------------------------------------------------------------------------


def _windows(p: int, r: int) -> np.ndarray:
    """Support mask of the cyclic code, written out: row j holds j, j+1, …, j+r−1 (mod P)."""
    mask = np.zeros((p, p), dtype=bool)
    for j in range(p):
        for k in range(r):
            mask[j, (j + k) % p] = True
    return mask


def test_cyclic_assignment_lists_each_workers_window():
    got = codes.cyclic_assignment(7, 3)
    assert got.dtype == torch.int64
    assert got.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [5, 6, 0], [6, 0, 1]]
    assert codes.cyclic_assignment(3, 1).tolist() == [[0], [1], [2]]
    assert codes.cyclic_assignment(3, 3).tolist() == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]


@pytest.mark.parametrize("fn", [codes.cyclic_assignment, lambda p, r: codes.cyclic_encoding(p, r, _gen(0))])
@pytest.mark.parametrize("p, r", [(5, 0), (5, 6), (5, -1), (0, 1)])
def test_cyclic_code_refuses_impossible_redundancy(fn, p, r):
    with pytest.raises(ValueError, match="must be"):
        fn(p, r)


@pytest.mark.parametrize("p, r", [(7, 3), (9, 5), (5, 2), (6, 6), (4, 1)])
def test_cyclic_encoding_rows_are_supported_on_the_cyclic_windows(p, r):
    b = codes.cyclic_encoding(p, r, _gen(p * 10 + r)).numpy()
    assert b.dtype == np.float64 and b.shape == (p, p)
    np.testing.assert_array_equal(np.abs(b) > 1e-12, _windows(p, r))
    np.testing.assert_array_equal(np.diag(b), np.ones(p))
    assert np.linalg.matrix_rank(b) == p - r + 1


def test_cyclic_encoding_extremes_are_identity_and_all_ones():
    np.testing.assert_array_equal(codes.cyclic_encoding(5, 1, _gen(0)).numpy(), np.eye(5))
    np.testing.assert_allclose(codes.cyclic_encoding(5, 5, _gen(0)).numpy(), np.ones((5, 5)), atol=1e-12)


def _ones_residual(rows: np.ndarray) -> float:
    """‖Aᵀ x − 1‖ at the least-squares x: zero iff the all-ones vector is in the row span of A."""
    ones = np.ones(rows.shape[1])
    x = np.linalg.lstsq(rows.T, ones, rcond=None)[0]
    return float(np.linalg.norm(rows.T @ x - ones))


@pytest.mark.parametrize("p, r", [(7, 3), (9, 5)])
def test_any_p_minus_r_plus_one_rows_span_the_all_ones_vector(p, r):
    """Every subset of P − (r − 1) rows (all of them: 21 for P = 7, 126 for P = 9) has the all-ones
    vector in its row span, so the sum is decodable from any P − 2s workers when r = 2s + 1; subsets
    one row smaller do not (the code is not trivially redundant)."""
    b = codes.cyclic_encoding(p, r, _gen(2)).numpy()
    for rows in itertools.combinations(range(p), p - r + 1):
        assert _ones_residual(b[list(rows)]) < 1e-9, rows
    for rows in itertools.combinations(range(p), p - r):
        assert _ones_residual(b[list(rows)]) > 1e-6, rows


def test_cyclic_encoding_is_deterministic_for_a_seed():
    assert torch.equal(codes.cyclic_encoding(9, 5, _gen(7)), codes.cyclic_encoding(9, 5, _gen(7)))
    assert not torch.equal(codes.cyclic_encoding(9, 5, _gen(7)), codes.cyclic_encoding(9, 5, _gen(8)))


# ----------------------------------------------------------------------------------------------------
# cyclic_decode
# ----------------------------------------------------------------------------------------------------

P, R, S, D = 9, 5, 2, 20


def _corruptions(b: torch.Tensor, g: torch.Tensor, rng: torch.Generator) -> dict:
    """Ways a Byzantine worker j may replace its row (each changes the row)."""
    other = torch.randn(g.shape, generator=rng, dtype=torch.float64)
    direction = torch.randn(g.shape[1], generator=rng, dtype=torch.float64)
    direction = direction / direction.norm()
    return {
        "large": lambda j: 1e3 * torch.randn(g.shape[1], generator=rng, dtype=torch.float64),
        "nan": lambda j: (b[j] @ g).index_fill(0, torch.tensor([3]), float("nan")),
        "inf": lambda j: (b[j] @ g).index_fill(0, torch.tensor([0]), -float("inf")),
        "scaled": lambda j: 3.0 * (b[j] @ g),
        "codeword": lambda j: b[j] @ other,  # a valid-looking combination of other gradients
        # small: 1e-3 of the row's norm, in a dense random direction
        "nudge": lambda j: (b[j] @ g) + 1e-3 * (b[j] @ g).norm() * direction,
    }


def _expected_adversaries(sent: torch.Tensor, honest: torch.Tensor) -> list[bool]:
    return (~(sent == honest).all(dim=1)).tolist()  # NaN rows differ; unchanged rows are honest


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_cyclic_decode_locates_up_to_s_adversaries_anywhere_and_returns_the_exact_sum(dtype, atol):
    """P = 9, r = 5, s = 2: no adversary, one at every position, two at every pair of positions
    (wrap-around windows included), with every kind of corruption → ok, the located rows are exactly
    the corrupted ones, and the decoded sum equals ``G.sum(0)`` (float64 within 1e-8; float32 messages,
    computed by the workers in float32, within 1e-4 — measured errors ≈ 1e-7 relative)."""
    rng = _gen(11)
    b = codes.cyclic_encoding(P, R, rng)
    g = torch.randn(P, D, generator=rng, dtype=torch.float64)
    honest = (b.to(dtype) @ g.to(dtype))
    total = g.sum(0).numpy()
    kinds = _corruptions(b, g, rng)
    names = sorted(kinds)
    cases = [()] + [(j,) for j in range(P)] + list(itertools.combinations(range(P), 2))
    for i, positions in enumerate(cases):
        for k, name in enumerate(names):
            sent = honest.clone()
            assert names[k] == name
            for q, j in enumerate(positions):
                sent[j] = kinds[names[(k + q * (i + 1)) % len(names)]](j).to(dtype)  # q = 0: ``name``
            before = sent.clone()
            decoded, adversaries, ok = codes.cyclic_decode(sent, b, S, generator=_gen(100 + i))
            assert ok, positions
            assert adversaries.dtype == torch.bool
            assert adversaries.tolist() == _expected_adversaries(sent, honest), (positions, name)
            assert decoded.dtype == dtype and tuple(decoded.shape) == (D,)
            np.testing.assert_allclose(decoded.double().numpy(), total, rtol=0, atol=atol)
            assert torch.equal(_bits(sent), _bits(before))  # not mutated
            if not positions:
                break


def test_cyclic_decode_is_relative_to_the_scale_of_the_gradients():
    rng = _gen(12)
    b = codes.cyclic_encoding(P, R, rng)
    for scale in (1e-30, 1e30):
        g = scale * torch.randn(P, D, generator=rng, dtype=torch.float64)
        sent = b @ g
        sent[4] = 5.0 * sent[4]
        decoded, adversaries, ok = codes.cyclic_decode(sent, b, S, generator=rng)
        assert ok and adversaries.nonzero().flatten().tolist() == [4]
        np.testing.assert_allclose(decoded.numpy(), g.sum(0).numpy(), rtol=1e-9, atol=0)


def test_cyclic_decode_accepts_a_corruption_below_the_tolerance():
    """A change of 1e-10 of the row's norm is below the relative tolerance 1e-6: the row is not
    located, ok is True, and the sum is off by at most that change through b (here < 1e-8)."""
    rng = _gen(16)
    b = codes.cyclic_encoding(P, R, rng)
    g = torch.randn(P, D, generator=rng, dtype=torch.float64)
    sent = b @ g
    sent[3] = sent[3] + 1e-10 * sent[3].norm()
    decoded, adversaries, ok = codes.cyclic_decode(sent, b, S, generator=rng)
    assert ok and not adversaries.any()
    np.testing.assert_allclose(decoded.numpy(), g.sum(0).numpy(), rtol=0, atol=1e-8)


def test_cyclic_decode_fails_cleanly_with_more_non_finite_rows_than_s():
    b = codes.cyclic_encoding(P, R, _gen(3))
    sent = b @ torch.randn(P, D, generator=_gen(4), dtype=torch.float64)
    sent[[1, 4, 8], 0] = float("nan")
    decoded, adversaries, ok = codes.cyclic_decode(sent, b, S, generator=_gen(5))
    assert ok is False
    assert torch.equal(decoded, torch.zeros(D, dtype=torch.float64))
    assert adversaries.nonzero().flatten().tolist() == [1, 4, 8]


def test_cyclic_decode_with_three_random_adversaries_and_s_2_refuses():
    """Beyond s: three random (or scaled) corruptions are never consistent with the code at
    |T| ≤ 2 → ok False, zeros, no rows located."""
    rng = _gen(6)
    b = codes.cyclic_encoding(P, R, rng)
    g = torch.randn(P, D, generator=rng, dtype=torch.float64)
    for positions in itertools.combinations(range(P), 3):
        sent = b @ g
        sent[positions[0]] = torch.randn(D, generator=rng, dtype=torch.float64)
        sent[positions[1]] = 2.0 * sent[positions[1]]
        sent[positions[2]] = b[positions[2]] @ torch.randn(P, D, generator=rng, dtype=torch.float64)
        decoded, adversaries, ok = codes.cyclic_decode(sent, b, S, generator=rng)
        assert ok is False, positions
        assert not decoded.any() and not adversaries.any()


def test_cyclic_decode_can_be_fooled_by_s_plus_one_colluding_workers():
    """The documented limit: three colluders (s = 2) who know G send ``B_A (G + w uᵀ)`` with ``w`` in
    the row space of B and ``B_{S_h} w = 0`` on four honest rows ``S_h``; the locator then blames the
    two *other* honest rows and returns ok with the wrong sum ``G.sum(0) + (1ᵀw) u``."""
    rng = _gen(9)
    b = codes.cyclic_encoding(P, R, rng)
    g = torch.randn(P, D, generator=rng, dtype=torch.float64)
    bn = b.numpy()
    colluders, blamed = [0, 3, 6], [1, 2]
    kept_honest = [j for j in range(P) if j not in colluders + blamed]
    basis = np.linalg.svd(bn)[2][: P - R + 1]  # orthonormal basis of the row space (= null(H))
    coeff = np.linalg.svd(bn[kept_honest] @ basis.T)[2][-1]  # 4 × 5 system: its null vector
    w = basis.T @ coeff
    u = np.random.default_rng(0).standard_normal(D)
    assert abs(w.sum()) > 1e-3
    sent = b @ g
    sent[colluders] = torch.from_numpy(bn[colluders] @ (g.numpy() + np.outer(w, u)))
    decoded, adversaries, ok = codes.cyclic_decode(sent, b, S, generator=rng)
    assert ok is True
    assert adversaries.nonzero().flatten().tolist() == blamed
    np.testing.assert_allclose(decoded.numpy(), g.sum(0).numpy() + w.sum() * u, rtol=0, atol=1e-8)
    assert np.abs(decoded.numpy() - g.sum(0).numpy()).max() > 1e-3


def test_cyclic_decode_with_s_0_detects_but_cannot_locate():
    b = codes.cyclic_encoding(P, R, _gen(13))
    g = torch.randn(P, D, generator=_gen(14), dtype=torch.float64)
    decoded, adversaries, ok = codes.cyclic_decode(b @ g, b, 0, generator=_gen(15))
    assert ok and not adversaries.any()
    np.testing.assert_allclose(decoded.numpy(), g.sum(0).numpy(), rtol=0, atol=1e-9)
    sent = b @ g
    sent[2] += 1.0
    decoded, adversaries, ok = codes.cyclic_decode(sent, b, 0, generator=_gen(15))
    assert not ok and not adversaries.any() and not decoded.any()


def test_cyclic_decode_breaks_under_per_worker_noise():
    """Redundancy breaks under per-worker privacy noise: Gaussian noise (σ = 1e-3, rows of order 1)
    on every honest row makes the rows inconsistent with the code, so at the default tolerance no set
    passes (ok False) even with no adversary at all. With a loose tolerance (10× the noise's relative
    size ‖E‖/‖BG‖), the noisy rows are accepted: a gross adversary is still located, but the decoded
    sum is ``bᵀ(BG + E)_S = G.sum(0) + bᵀE_S`` (b: the minimum-norm solution of ``bᵀB_S = 1ᵀ``), off
    by the noise propagated through b."""
    rng = _gen(21)
    b = codes.cyclic_encoding(P, R, rng)
    g = torch.randn(P, D, generator=rng, dtype=torch.float64)
    sigma = 1e-3
    noise = sigma * torch.randn(P, D, generator=rng, dtype=torch.float64)
    sent = b @ g + noise
    _, adversaries, ok = codes.cyclic_decode(sent, b, S, generator=_gen(1))
    assert ok is False and not adversaries.any()
    loose = 10 * float(noise.norm() / (b @ g).norm())
    attacked = sent.clone()
    attacked[7] = 1e3 * torch.randn(D, generator=rng, dtype=torch.float64)
    for msg, blamed in ((sent, []), (attacked, [7])):
        decoded, adversaries, ok = codes.cyclic_decode(msg, b, S, generator=_gen(1), tolerance=loose)
        assert ok is True and adversaries.nonzero().flatten().tolist() == blamed
        rows = [j for j in range(P) if j not in blamed]
        weights = np.linalg.lstsq(b.numpy()[rows].T, np.ones(P), rcond=None)[0]
        expected = g.sum(0).numpy() + weights @ noise.numpy()[rows]
        np.testing.assert_allclose(decoded.numpy(), expected, rtol=0, atol=1e-9)
        assert np.abs(decoded.numpy() - g.sum(0).numpy()).max() > sigma  # the noise is not removed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_identity_code_decodes_the_plain_sum(dtype):
    b = codes.cyclic_encoding(6, 1, _gen(0))
    g = torch.randn(6, D, generator=_gen(1), dtype=torch.float64).to(dtype)
    decoded, adversaries, ok = codes.cyclic_decode(g, b, 0, generator=_gen(2))
    assert ok and not adversaries.any() and decoded.dtype == dtype
    expected = g.double().numpy().sum(axis=0)
    np.testing.assert_allclose(decoded.double().numpy(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-12)


def test_cyclic_decode_is_deterministic_for_a_generator_seed():
    b = codes.cyclic_encoding(P, R, _gen(0))
    sent = b @ torch.randn(P, D, generator=_gen(1), dtype=torch.float64)
    sent[0] = -sent[0]
    one = codes.cyclic_decode(sent, b, S, generator=_gen(5))
    two = codes.cyclic_decode(sent, b, S, generator=_gen(5))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]) and one[2] == two[2]


def test_locator_checks_counts_candidate_sets():
    assert codes.locator_checks(9, 2) == 1 + 9 + 36
    assert codes.locator_checks(30, 3) == 1 + 30 + 435 + 4060
    assert codes.locator_checks(4, 0) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(received=torch.zeros(P), s=1), r"\(P, d\)"),
    (dict(received=torch.zeros(P - 1, 3), s=1), "encoding must be"),
    (dict(received=torch.zeros(P, 3), s=-1), "s must be"),
    (dict(received=torch.zeros(P, 3), s=P + 1), "s must be"),
    (dict(received=torch.zeros(P, 3), s=1, tolerance=-1e-3), "tolerance"),
])
def test_cyclic_decode_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        codes.cyclic_decode(encoding=torch.eye(P), generator=_gen(0), **kwargs)
