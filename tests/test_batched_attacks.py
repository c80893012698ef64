"""Every attack on an ``(S, h, d)`` batch equals the attack applied to each slice.

The expected values are the 2-D calls on each slice (``atk.forge(H[s], f, generator=gens[s],
own=own[s], state=states[s])`` with a generator seeded like slice ``s``'s): the 2-D path is the
reference that ``tests/test_attacks.py`` checks against hand-computed and independent values, and this
file checks only that batching changes nothing.

Exactness. On the CPU every batched kernel rounds like the 2-D one per slice — row sums and centred
squares reduce each slice's rows in the same order, ``addcmul`` with a per-slice coefficient rounds
the fused product as ``add(alpha=)`` does, the per-slice norms of the factor search reduce alike, and
the random draws are each slice's own generator's — so values, factors, scores, states and generator
states are compared **bit for bit** (``rtol = atol = 0``, NaN equal to NaN).
"""

from __future__ import annotations

import math

import pytest
import torch

from dpbr.errors import UsageError
from dpbr.robust import aggregators, attacks
from dpbr.simulation.engine import ServerRule
from tests.test_attacks import agg_bucket_mean, agg_krum, agg_mean, agg_median

S = 3
H_ROWS = 5
D = 6
F = 2

EXACT = dict(rtol=0, atol=0, equal_nan=True)

#: every registered attack at its defaults, and variants of their parameters
SPECS = attacks.names() + [
    "little(factor=zmax)",
    "little(factor=zmax-honest,negative=true)",
    "empire(factor=3)",
    "sign-flip(scale=2.5)",
    "inf(negative=true)",
    "gaussian(mean=1,std=0.5,centred=true)",
    "gaussian(identical=true)",
    "bulyan-coordinate(coordinate=all,negative=true)",
    "bulyan-coordinate(coordinate=1,factor=2)",
    "mimic(target=4)",
    "mimic(target=auto)",
]

OPTIMAL = [
    "little(factor=optimal)",
    "little(factor=optimal,negative=true,evals=9)",
    "empire(factor=optimal)",
    "bulyan-coordinate(factor=optimal,coordinate=0)",
    "bulyan-coordinate(factor=optimal,coordinate=all,negative=true,evals=5)",
]


def _stack(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """``(S, h, d)`` honest vectors with slices of different scales; ``ties``: small integers (equal
    values within columns) and a duplicated row in every slice."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        H = torch.randint(-2, 3, (S, H_ROWS, D), generator=g).to(dtype)
        H[:, 3] = H[:, 1]
        H[1, :, 2] = 1.0  # a constant column: zero spread
    else:
        H = torch.randn((S, H_ROWS, D), generator=g, dtype=torch.float64).to(dtype)
    return H * torch.tensor([1.0, 3.0, 0.25], dtype=dtype).reshape(S, 1, 1)


def _gens(seed: int = 100) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + s) for s in range(S)]


def _own(H: torch.Tensor, f: int = F) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn((S, f, H.shape[-1]), generator=g, dtype=torch.float64).to(H.dtype)


def _assert_same_info(batched: dict, slices: list[dict]) -> None:
    assert set(batched) == set(slices[0])
    for key, values in batched.items():
        assert values == [info[key] for info in slices], key


# --------------------------------------------------------------------------------------------- #
# Aggregators (2-D kernels written in the tests, applied slice by slice to a batch)


def _within(G, f, *, generator=None):
    # mean of the rows within distance 2 of the coordinate (lower) median: a bounded objective whose
    # maximiser depends on the spread of the slice
    med = G.sort(dim=0).values[(G.shape[0] - 1) // 2]
    keep = (G - med).norm(dim=1) <= 2.0
    return G[keep].mean(0)


class SliceLoop:
    """``agg(G, f, *, generator=None)`` for ``(n, d)`` and ``(S, n, d)`` (slice ``s`` with generator
    ``s``); counts its calls."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __call__(self, G, f, *, generator=None):
        self.calls += 1
        if G.dim() == 2:
            return self.kernel(G, f, generator=generator)
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * G.shape[0]
        return torch.stack([self.kernel(G[s], f, generator=gens[s]) for s in range(G.shape[0])])


KERNELS = {"mean": agg_mean, "median": agg_median, "krum": agg_krum, "bucket-mean": agg_bucket_mean, "within": _within}


# --------------------------------------------------------------------------------------------- #
# Every attack, fixed parameters


def test_specs_cover_the_registry():
    assert set(attacks.names()) <= {attacks.get(s).key for s in SPECS}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("spec", SPECS)
def test_batch_equals_slices(spec, kind, dtype):
    atk = attacks.get(spec)
    if atk.needs_aggregator:
        pytest.skip("searched factors: test_optimal_factor_batch_equals_slices")
    H = _stack(kind, dtype)
    H_before = H.clone()
    own = _own(H) if atk.needs_own_gradients else None
    gens = _gens()
    batched = atk.forge(H, F, generator=gens, own=own)
    assert torch.equal(H, H_before)
    ref_gens = _gens()
    slices = [atk.forge(H[s], F, generator=ref_gens[s], own=None if own is None else own[s]) for s in range(S)]
    assert batched.value.shape == (S, F, D) and batched.value.dtype == dtype and batched.value.is_contiguous()
    torch.testing.assert_close(batched.value, torch.stack([r.value for r in slices]), **EXACT)
    assert batched.copies == all(r.copies for r in slices)
    if slices[0].info:
        _assert_same_info(dict(batched.info), [r.info for r in slices])
    for g, ref in zip(gens, ref_gens):  # the same draws from every slice's generator
        assert torch.equal(g.get_state(), ref.get_state())
    # __call__ gives the same (S, f, d) vectors, with fresh generators
    torch.testing.assert_close(atk(H, F, generator=_gens(), own=own), batched.value, **EXACT)


@pytest.mark.parametrize("spec", SPECS)
def test_batch_out_and_f_zero(spec):
    atk = attacks.get(spec)
    if atk.needs_aggregator:
        pytest.skip("searched factors: test_optimal_factor_batch_equals_slices")
    H = _stack("normal")
    own = _own(H) if atk.needs_own_gradients else None
    out = torch.empty((S, F, D), dtype=torch.float64)
    forged = atk.forge(H, F, generator=_gens(), own=own, out=out)
    assert forged.value is out
    torch.testing.assert_close(out, atk(H, F, generator=_gens(), own=own).to(torch.float64), **EXACT)
    empty = atk.forge(H, 0, generator=_gens(), own=None if own is None else own[:, :0])
    assert empty.value.shape == (S, 0, D)


def test_one_generator_is_drawn_from_in_slice_order():
    atk = attacks.get("gaussian(std=2)")
    H = _stack("normal")
    batched = atk(H, F, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    expected = torch.stack([atk(H[s], F, generator=g) for s in range(S)])
    torch.testing.assert_close(batched, expected, **EXACT)
    assert not torch.equal(batched[0], batched[1])


# --------------------------------------------------------------------------------------------- #
# Searched factors (factor=optimal): each slice finds its own factor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("spec", OPTIMAL)
def test_optimal_factor_batch_equals_slices(spec, kernel, kind, dtype):
    atk = attacks.get(spec)
    H = _stack(kind, dtype, seed=3)
    agg = SliceLoop(KERNELS[kernel])
    gens = _gens()
    batched = atk.forge(H, F, aggregator=agg, generator=gens)
    evals = atk.params["evals"]
    assert agg.calls == evals  # one call on the whole batch per round of the S searches
    ref_gens = _gens()
    slices = [atk.forge(H[s], F, aggregator=SliceLoop(KERNELS[kernel]), generator=ref_gens[s]) for s in range(S)]
    torch.testing.assert_close(batched.value, torch.stack([r.value for r in slices]), **EXACT)
    _assert_same_info(dict(batched.info), [r.info for r in slices])
    assert batched.info["evaluations"] == [evals] * S
    assert batched.copies
    for g, ref in zip(gens, ref_gens):  # the search hands the rule copies: the callers' generators stay put
        assert torch.equal(g.get_state(), ref.get_state())


def test_optimal_factor_differs_between_slices():
    # the slices' spreads differ (scales 1, 3, 0.25) and the rule keeps rows within a fixed distance
    # of the median, so the best factor differs between slices: each slice must find its own
    atk = attacks.get("little(factor=optimal,evals=16)")
    H = _stack("normal", torch.float64, seed=3)
    found = atk.forge(H, F, aggregator=SliceLoop(_within)).info["factor"]
    assert len(set(found)) == S, found


@pytest.mark.parametrize(
    "rule", ["average", "median", "krum", "trimmed-mean", "mda", "bucketing(s=2)+average", "nnm+meamed"]
)
@pytest.mark.parametrize("spec", ["little(factor=optimal)", "empire(factor=optimal,evals=10)"])
def test_optimal_factor_against_the_server_rule(spec, rule):
    # the engine's ServerRule around a registered rule, taking (S, n, d) and returning (S, d)
    atk = attacks.get(spec)
    H = _stack("normal", torch.float32, seed=11)
    r = aggregators.get(rule)
    batched = atk.forge(H, F, aggregator=ServerRule(r, F, None), generator=_gens())
    ref_gens = _gens()
    slices = [atk.forge(H[s], F, aggregator=ServerRule(r, F, None), generator=ref_gens[s]) for s in range(S)]
    torch.testing.assert_close(batched.value, torch.stack([x.value for x in slices]), **EXACT)
    _assert_same_info(dict(batched.info), [x.info for x in slices])


# --------------------------------------------------------------------------------------------- #
# Mimic's state over several steps, label flipping's own gradients


@pytest.mark.parametrize("warmup", [1, 3])
def test_mimic_auto_state_over_steps(warmup):
    atk = attacks.get(f"mimic(target=auto,warmup={warmup})")
    g = torch.Generator().manual_seed(21)
    batched_state, slice_states = None, [None] * S
    for step in range(5):
        H = torch.randn((S, H_ROWS, D), generator=g) * (1 + step)
        H[:, 4] = H[:, 0]  # a duplicated row: ties in the projections
        forged = atk.forge(H, F, state=batched_state)
        refs = [atk.forge(H[s], F, state=slice_states[s]) for s in range(S)]
        torch.testing.assert_close(forged.value, torch.stack([r.value for r in refs]), **EXACT)
        batched_state, slice_states = forged.state, [r.state for r in refs]
        assert batched_state.step == step + 1 == slice_states[0].step
        torch.testing.assert_close(batched_state.mean, torch.stack([st.mean for st in slice_states]), **EXACT)
        torch.testing.assert_close(batched_state.direction, torch.stack([st.direction for st in slice_states]), **EXACT)
        assert batched_state.target.tolist() == [int(st.target) for st in slice_states]
        assert forged.copies == all(r.copies for r in refs)
    # a sequence of per-slice states is accepted as well
    H = torch.randn((S, H_ROWS, D), generator=g)
    from_list = atk.forge(H, F, state=slice_states)
    torch.testing.assert_close(from_list.value, atk.forge(H, F, state=batched_state).value, **EXACT)


def test_label_flip_own_per_slice():
    atk = attacks.get("label-flip")
    H = _stack("normal", torch.float16)
    own = _own(H.to(torch.float64))
    forged = atk.forge(H, F, own=own)
    assert forged.value.dtype == torch.float16
    torch.testing.assert_close(forged.value, torch.stack([atk(H[s], F, own=own[s]) for s in range(S)]), **EXACT)
    assert forged.value.data_ptr() != own.data_ptr()


# --------------------------------------------------------------------------------------------- #
# A subclass without a vectorised form forges slice by slice


class _Drift(attacks.Attack):
    """Test-only: a random draw plus a counter carried in the state."""

    needs_generator = True
    stateful = True

    def __init__(self) -> None:
        super().__init__()

    def _forge(self, H, f, *, generator, state, **_):
        t = 0 if state is None else state
        noise = torch.rand((f, H.shape[1]), generator=generator, dtype=H.dtype)
        return attacks.Forged(noise + t + H.mean(0), t + 1, {"t": t})


def test_slice_by_slice_default():
    atk = _Drift()
    H = _stack("normal")
    gens, ref_gens = _gens(), _gens()
    first = atk.forge(H, F, generator=gens)
    second = atk.forge(H, F, generator=gens, state=first.state)
    states = [None] * S
    for forged in (first, second):
        refs = [atk.forge(H[s], F, generator=ref_gens[s], state=states[s]) for s in range(S)]
        torch.testing.assert_close(forged.value, torch.stack([r.value for r in refs]), **EXACT)
        assert forged.state == [r.state for r in refs]
        assert forged.info == {"t": [r.info["t"] for r in refs]}
        states = [r.state for r in refs]


# --------------------------------------------------------------------------------------------- #
# Bad input: one clear UsageError naming --attack


@pytest.mark.parametrize("shape", [(D,), (2, S, H_ROWS, D), (0, H_ROWS, D), (S, 0, D)])
def test_bad_ndim_or_empty(shape):
    with pytest.raises(UsageError, match="--attack"):
        attacks.get("little").forge(torch.zeros(shape), F)


@pytest.mark.parametrize("generator", [[torch.Generator()] * (S - 1), [torch.Generator()] * (S + 1), "seed", [1, 2, 3]])
def test_bad_generators(generator):
    with pytest.raises(UsageError, match="--attack.*generator"):
        attacks.get("gaussian").forge(_stack("normal"), F, generator=generator)


def test_missing_generator_in_a_slice():
    gens = _gens()
    gens[1] = None
    with pytest.raises(UsageError, match="draws random numbers"):
        attacks.get("gaussian").forge(_stack("normal"), F, generator=gens)


@pytest.mark.parametrize("shape", [(F, D), (S, F + 1, D), (S + 1, F, D)])
def test_bad_out_and_own(shape):
    H = _stack("normal")
    with pytest.raises(UsageError, match=r"--attack.*out must be a Tensor of shape \(3, 2, 6\)"):
        attacks.get("none").forge(H, F, out=torch.empty(shape))
    with pytest.raises(UsageError, match=r"--attack.*own must have shape \(3, 2, 6\)"):
        attacks.get("label-flip").forge(H, F, own=torch.empty(shape))
    with pytest.raises(UsageError, match="own gradients"):
        attacks.get("label-flip").forge(H, F)


def test_bad_mimic_state_and_aggregator():
    H = _stack("normal")
    atk = attacks.get("mimic(target=auto)")
    state = atk.forge(H[:2], F).state  # a batch of 2
    with pytest.raises(UsageError, match="does not match"):
        atk.forge(H, F, state=state)
    with pytest.raises(UsageError, match="MimicState"):
        atk.forge(H, F, state=[state])
    with pytest.raises(UsageError, match=r"returned shape \(6,\) for a batch"):
        attacks.get("little(factor=optimal)").forge(H, F, aggregator=lambda G, f: G[0].mean(0))
    with pytest.raises(UsageError, match="needs the aggregation rule"):
        attacks.get("empire(factor=optimal)").forge(H, F)
