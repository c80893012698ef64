"""Every rule and pre-aggregator on an ``(S, n, d)`` batch equals the rule applied to each slice.

The expected values are the 2-D calls on each slice (``rule.aggregate(G[s].clone(), f,
generator=gens[s], state=states[s])``, a fresh tensor as a single run passes it: BLAS products round
differently on a misaligned view): the 2-D path is the reference that the other test files check
against independent implementations, and this file checks only that batching changes nothing.

Exactness. Every kernel but two is the same per slice — the Gram matrices on the CPU are the 2-D
products of each slice, sorts and ``topk``/``argmin`` selections are exact, and sums and means of
rows run the same ``embedding_bag`` bags or reductions — so values, selections and states are
compared **bit for bit** (``rtol = atol = 0``, NaN equal to NaN). The exceptions are the geometric
median and centered clipping, whose iterations take matrix-vector products in the float64
coefficient space: the batched product (``bmm``) rounds differently from the 2-D ``gemv``. Measured
on 60 stacks like these: float64 results within 7e-14 of the largest value, float32 results
identical (the float64 differences vanish in the cast). Rules whose chain ends in one of them are
compared with ``rtol = 1e-6`` and ``atol = 1e-6 · max|value|`` in float32 (an ulp-level allowance,
as the float32 cast of a float64 difference can still cross a rounding boundary) and ``1e-12`` in
float64; everything else they return (selections: none; the state) is held to the same bound.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpbr import linalg
from dpbr.robust import aggregators as A

S = 4
F = 2
D = 7

#: every registered rule with its default parameters, some parameter variants, and compositions
SPECS = sorted(A.rules.names()) + [
    "multi-krum(m=3)",
    "krum(neighbours=n-f-1)",
    "mda(ties=first)",
    "geometric-median(iters=3)",
    "centered-clipping(tau=1,iters=2)",
    "centered-clipping(tau=0.5,scale=sqrt,beta=0.9)",
    "bucketing(s=2)+krum",
    "bucketing(s=2)+median",
    "bucketing(s=3)+cc",
    "bucketing(s=2)+multi-krum",
    "bucketing(s=1)+mda",
    "nnm+meamed",
    "nnm+krum",
    "nnm+cc",
    "nnm+geometric-median",
    "bucketing(s=2)+nnm+trimmed-mean",
    "bucketing(s=2)+bucketing(s=2)+average",
]


def test_specs_cover_the_registry():
    keys = {r.key for spec in SPECS for r in _chain(A.get(spec))}
    assert set(A.rules.names()) | set(A.pre_aggregators.names()) <= keys
    assert set(A.names()) <= keys


def _chain(rule: A.Aggregator) -> list[A.Aggregator]:
    out = [rule]
    while hasattr(out[-1], "inner"):
        out.append(out[-1].inner)
    return out


def _iterative(rule: A.Aggregator) -> bool:
    return isinstance(_chain(rule)[-1], (A.GeometricMedian, A.CenteredClipping))


def _size(rule: A.Aggregator) -> int:
    return max(rule.min_workers(F), 9)


def _stack(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Four slices: plain Gaussian; ties (integer entries, duplicated rows); outliers and a NaN row;
    ±inf rows and a partly non-finite row (at most ``F`` non-finite rows per slice)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(S, n, d, generator=gen, dtype=torch.float64)
    G[1] = torch.randint(-2, 3, (n, d), generator=gen).double()  # many equal values per coordinate
    G[1, 1] = G[1, 0]
    G[1, n - 3:] = G[1, 2]  # three identical rows, as an attack sends them
    G[2, 0] = 1e6
    G[2, 1] = math.nan
    G[2, 3, 0] = -1e5
    G[3, 0] = math.inf
    G[3, 2, : d // 2] = -math.inf
    G[3, 4] = G[3, 5]
    return G.to(dtype)


def _per_slice(rule, G, f, gens=None, states=None, gram=None):
    outs = []
    for s in range(G.shape[0]):
        kw = {}
        if gram is not None:
            kw["gram"] = gram[s]
        outs.append(rule.aggregate(
            G[s].clone(), f, generator=None if gens is None else gens[s],
            state=None if states is None else states[s], **kw,
        ))
    return outs


def _assert_matches(rule, batched, outs, dtype):
    value = torch.stack([o.value for o in outs])
    assert batched.value.shape == value.shape and batched.value.dtype == value.dtype
    if _iterative(rule):
        rtol = 1e-6 if dtype == torch.float32 else 1e-12
        scale = value[torch.isfinite(value)].abs().max()
        torch.testing.assert_close(batched.value, value, rtol=rtol, atol=rtol * float(scale), equal_nan=True)
    else:
        torch.testing.assert_close(batched.value, value, rtol=0, atol=0, equal_nan=True)
    if outs[0].selected is None:
        assert batched.selected is None
    else:
        assert batched.selected.shape == (len(outs), outs[0].selected.shape[0])
        assert torch.equal(batched.selected, torch.stack([o.selected for o in outs]))
    if outs[0].state is None:
        assert batched.state is None
    else:
        rtol = 1e-6 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(
            batched.state, torch.stack([o.state for o in outs]),
            rtol=rtol, atol=rtol * float(value.abs().max()), equal_nan=True,
        )


def _gens(seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + 17 * s) for s in range(S)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", SPECS)
def test_batch_equals_per_slice(spec, dtype):
    rule = A.get(spec)
    n = _size(rule)
    G = _stack(n, D, dtype)
    before = G.clone()
    batched = rule.aggregate(G, F, generator=_gens(5))
    assert torch.equal(G.nan_to_num(), before.nan_to_num())  # not modified
    outs = _per_slice(rule, G, F, gens=_gens(5))
    _assert_matches(rule, batched, outs, dtype)
    if not isinstance(_chain(rule)[-1], A.Average):  # robust: finite despite <= F non-finite rows per slice
        assert torch.isfinite(batched.value).all()
    assert torch.equal(rule(G, F, generator=_gens(5)).nan_to_num(), batched.value.nan_to_num())


@pytest.mark.parametrize(("spec", "d"), [
    ("median", 9000), ("trimmed-mean", 9000), ("meamed", 9000), ("bulyan", 9000), ("bucketing(s=2)+median", 9000),
    ("median", 33000), ("meamed", 33000),
])
def test_batch_with_many_columns_uses_the_same_order(spec, d):
    """``S·d`` past the CPU sorting network's threshold: with ``d = 9000`` per slice the batch sorts
    with the network (in column chunks across slices), the 2-D calls with ``torch.sort``; with
    ``d = 33000`` both use the network. Both are exact."""
    rule = A.get(spec)
    n = _size(rule)
    G = _stack(n, d, torch.float32, seed=3)
    _assert_matches(rule, rule.aggregate(G, F, generator=_gens(1)), _per_slice(rule, G, F, gens=_gens(1)), torch.float32)


@pytest.mark.parametrize("spec", ["krum", "multi-krum", "mda", "bulyan", "nnm+krum"])
def test_batch_accepts_given_gram(spec):
    rule = A.get(spec)
    n = _size(rule)
    G = _stack(n, D, torch.float64, seed=4)
    gram = G @ G.mT
    _assert_matches(rule, rule.aggregate(G, F, gram=gram), _per_slice(rule, G, F, gram=gram), torch.float64)


@pytest.mark.parametrize("spec", ["cc", "centered-clipping(tau=0.5,iters=1)", "bucketing(s=3)+cc", "nnm+cc"])
def test_centered_clipping_state_per_slice_over_steps(spec):
    rule = A.get(spec)
    n = _size(rule)
    gb, gs = _gens(11), _gens(11)
    state_b = torch.randn(S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    states = list(state_b.unbind(0))
    for step in range(4):
        G = _stack(n, D, torch.float64, seed=20 + step) + step
        out = rule.aggregate(G, F, generator=gb, state=state_b)
        outs = _per_slice(rule, G, F, gens=gs, states=states)
        _assert_matches(rule, out, outs, torch.float64)
        assert out.state.shape == (S, D)
        state_b, states = out.state, [o.state for o in outs]
    # a list of S per-slice centers is accepted as well
    listed = rule.aggregate(G, F, generator=_gens(3), state=list(state_b.unbind(0)))
    torch.testing.assert_close(listed.value, rule.aggregate(G, F, generator=_gens(3), state=state_b).value, rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["bucketing(s=2)+krum", "bucketing(s=3)+median", "bucketing(s=2)+bucketing(s=2)+average"])
def test_bucketing_draws_from_each_slice_generator(spec):
    """Slice ``s`` makes exactly the draws of the 2-D call with generator ``s``: same result, and the
    generators end in the same state."""
    rule = A.get(spec)
    n = _size(rule)
    G = _stack(n, D, torch.float32, seed=6)
    gb, gs = _gens(40), _gens(40)
    for _ in range(3):  # consecutive calls keep drawing in step
        _assert_matches(rule, rule.aggregate(G, F, generator=gb), _per_slice(rule, G, F, gens=gs), torch.float32)
    for a, b in zip(gb, gs):
        assert torch.equal(a.get_state(), b.get_state())
    # different slices really draw differently: identical slices with different generators differ
    same = G[:1].expand(S, -1, -1).contiguous()
    values = rule.aggregate(same, F, generator=_gens(40)).value
    assert not all(torch.equal(values[0], values[s]) for s in range(1, S))


def test_one_shared_generator_is_drawn_in_turn():
    rule = A.get("bucketing(s=2)+median")
    G = _stack(9, D, torch.float32, seed=8)
    out = rule.aggregate(G, F, generator=torch.Generator().manual_seed(9))
    shared = torch.Generator().manual_seed(9)
    ref = [rule.aggregate(G[s], F, generator=shared).value for s in range(S)]
    assert torch.equal(out.value, torch.stack(ref))


def test_selected_marks_rows_per_slice():
    """A batch where each slice's outlier sits in a different row: Krum never selects it."""
    rule = A.get("multi-krum")
    G = torch.randn(S, 9, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for s in range(S):
        G[s, s] = 1e3
    out = rule.aggregate(G, F)
    assert out.selected.shape == (S, 9) and out.selected.dtype == torch.bool
    assert out.selected.sum(1).tolist() == [9 - F] * S
    assert [bool(out.selected[s, s]) for s in range(S)] == [False] * S


@pytest.mark.parametrize(
    ("kwargs", "shape", "message"),
    [
        ({}, (2, 3, 9, D), "expects an \\(n, d\\) tensor or an \\(S, n, d\\) batch"),
        ({}, (D,), "expects an \\(n, d\\) tensor or an \\(S, n, d\\) batch"),
        ({}, (0, 9, D), "at least one slice"),
        ({"generator": "gens3"}, (S, 9, D), "needs 4 generators"),
        ({"generator": "bad"}, (S, 9, D), "needs 4 generators"),
        ({"generator": 7}, (S, 9, D), "generator must be None, a torch.Generator or a sequence"),
    ],
)
def test_batch_validation(kwargs, shape, message):
    rule = A.get("bucketing(s=2)+median")
    if kwargs.get("generator") == "gens3":
        kwargs = {"generator": _gens(0)[:3]}
    elif kwargs.get("generator") == "bad":
        kwargs = {"generator": [torch.Generator()] * 3 + ["x"]}
    with pytest.raises((ValueError, TypeError), match=f"bucketing\\(s=2\\)\\+median'.*{message}|{message}") as err:
        rule.aggregate(torch.zeros(shape), F, **kwargs)
    assert "bucketing(s=2)+median" in str(err.value)


def test_batch_validation_of_state_gram_and_n():
    cc = A.get("cc")
    G = torch.zeros(S, 9, D)
    for bad in (torch.zeros(D), torch.zeros(S + 1, D), [torch.zeros(D)] * (S - 1), "x"):
        with pytest.raises(ValueError, match="'centered-clipping'.*state of a batch of 4"):
            cc.aggregate(G, F, state=bad)
    with pytest.raises(ValueError, match="'krum'.*gram of a batch must be a floating \\(4, 9, 9\\)"):
        A.get("krum").aggregate(G, F, gram=torch.zeros(9, 9))
    with pytest.raises(ValueError, match="'krum' needs n >= 2f \\+ 3; got n = 6, f = 2"):
        A.get("krum").aggregate(torch.zeros(S, 6, D), F)
    with pytest.raises(TypeError, match="'median' expects a floating-point tensor"):
        A.get("median").aggregate(torch.zeros(S, 9, D, dtype=torch.int64), F)


@pytest.mark.parametrize("d", [69, 2 * linalg.GRAM_BLOCK, 2 * linalg.GRAM_BLOCK + 5])
def test_batched_gram_products(d):
    """The CPU's per-slice Gram matrices equal the 2-D ones bit for bit (also for a misaligned batch);
    the batched product used on other devices equals a plain float64 ``X Xᵀ`` to float32 rounding."""
    X = torch.randn(S, 5, d, generator=torch.Generator().manual_seed(d))
    for batch in (X, torch.randn(S * 5 * d + 1)[1:].view(S, 5, d).copy_(X)):  # the second is misaligned
        K = linalg.gram(batch)
        assert K.shape == (S, 5, 5)
        for s in range(S):
            assert torch.equal(K[s], linalg.gram(X[s].clone()))
    ref = X.double() @ X.double().mT
    for sum_dtype in (None, torch.float64):
        Kb = linalg._gram_batched_product(X, sum_dtype)
        assert Kb.dtype == (sum_dtype or torch.float32)
        torch.testing.assert_close(Kb.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    K64 = linalg.gram(X, dtype=torch.float64)
    torch.testing.assert_close(K64, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


def test_batched_linalg_helpers_match_slices():
    X = _stack(9, 11, torch.float64, seed=12)
    finite = torch.isfinite(X).all(-1)
    W = torch.rand(S, 3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * finite[:, None, :]
    rows = torch.tensor([[1, 3, 4], [0, 2, 8], [2, 3, 4], [1, 4, 5]])
    got_c, got_m = linalg.combine(W, X, finite), linalg.mean_rows(X, rows)
    got_med, got_sorted = linalg.coordinate_median(X), linalg.sorted_rows(X)
    for s in range(S):
        x = X[s].clone()
        assert torch.equal(got_c[s], linalg.combine(W[s], x, finite[s]))
        assert torch.equal(got_m[s], linalg.mean_rows(x, rows[s]))
        torch.testing.assert_close(got_med[s], linalg.coordinate_median(x), rtol=0, atol=0, equal_nan=True)
        assert all(torch.equal(a[s], b) for a, b in zip(got_sorted, linalg.sorted_rows(x)))
    # independent check of the batched weighted sums on the finite rows
    ref = torch.einsum("smn,snd->smd", W, torch.where(finite[:, :, None], X, 0))
    torch.testing.assert_close(got_c, ref, rtol=1e-12, atol=1e-12)


def test_rule_without_batched_kernel_runs_slice_by_slice():
    """A rule class that only implements the 2-D kernel still accepts a batch (the base class's
    fallback), with per-slice states."""

    class Shifted(A.Aggregator):
        key = "shifted"

        def _aggregate(self, G, f, generator, state):
            value = G.mean(dim=0) + (0 if state is None else state)
            return A.Aggregation(value, torch.arange(G.shape[0]) < 2, state=value.clone())

    rule = Shifted()
    G = torch.randn(S, 5, D, dtype=torch.float64)
    states = torch.randn(S, D, dtype=torch.float64)
    out = rule.aggregate(G, 0, state=states)
    assert torch.equal(out.value, G.mean(dim=1) + states)
    assert torch.equal(out.state, out.value) and out.selected.shape == (S, 5)
    with pytest.raises(ValueError, match="'shifted': a batch of 4 slices needs 4 states, got 3"):
        rule.aggregate(G, 0, state=states[:3])
