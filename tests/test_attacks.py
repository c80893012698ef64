"""Tests of dpbr.robust.attacks: known answers, contracts (shape, dtype, no mutation, RNG), line search."""

from __future__ import annotations

import math

import pytest
import torch

from dpbr.errors import UsageError
from dpbr.registry import canonical
from dpbr.robust import attacks

# --------------------------------------------------------------------------------------------- #
# Small local aggregators of the form agg(G, f, *, generator=None, state=None) -> Tensor[d]


def agg_mean(G, f, *, generator=None, state=None):
    return G.mean(dim=0)


def agg_median(G, f, *, generator=None, state=None):
    # coordinate median, even n: midpoint of the two middle values
    s = G.sort(dim=0).values
    n = G.shape[0]
    return s[(n - 1) // 2].add(s[n // 2]).div(2)


def agg_krum(G, f, *, generator=None, state=None):
    n = G.shape[0]
    sq = G.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * G @ G.T).clamp_min(0)
    dist.fill_diagonal_(math.inf)
    scores = dist.sort(dim=1).values[:, : n - f - 2].sum(1)
    return G[torch.argmin(scores)].clone()


def agg_bucket_mean(G, f, *, generator=None, state=None):
    # randomised: mean of the first bucket of a random permutation (uses the given generator only)
    perm = torch.randperm(G.shape[0], generator=generator)
    return G[perm[: max(1, G.shape[0] // 2)]].mean(0)


class Counting:
    """Wraps an aggregator and counts its calls."""

    def __init__(self, agg):
        self.agg, self.calls = agg, 0

    def __call__(self, G, f, *, generator=None, state=None):
        self.calls += 1
        return self.agg(G, f, generator=generator)


# --------------------------------------------------------------------------------------------- #
# Inputs with hand-computable statistics

# columns: [1, 3, 5] -> mu 3, sigma 2 ; [-1, 2, 5] -> mu 2, sigma 3 ; [4, 4, 4] -> mu 4, sigma 0
H0 = torch.tensor([[1.0, -1.0, 4.0], [3.0, 2.0, 4.0], [5.0, 5.0, 4.0]])


def rows(vec, f):
    return torch.tensor([vec] * f, dtype=torch.float32)


KNOWN = [
    ("none", {}, [3.0, 2.0, 4.0]),
    ("little", {}, [6.0, 6.5, 4.0]),  # mu + 1.5 sigma
    ("little(negative=true)", {}, [0.0, -2.5, 4.0]),  # LPD: mu - 1.5 sigma
    ("little(factor=1.5,negative=true)", {}, [0.0, -2.5, 4.0]),
    ("alie(factor=2)", {}, [7.0, 8.0, 4.0]),
    # n = 3 + 2 = 5, s = floor(5/2 + 1) - 2 = 1, z = Phi^-1(4/5) = 0.8416212335729143
    ("little(factor=zmax)", {}, [3.0 + 2 * 0.8416212335729143, 2.0 + 3 * 0.8416212335729143, 4.0]),
    ("little(factor=zmax,negative=true)", {}, [3.0 - 2 * 0.8416212335729143, 2.0 - 3 * 0.8416212335729143, 4.0]),
    ("empire", {}, [-0.3, -0.2, -0.4]),  # (1 - 1.1) mu
    ("empire(factor=3)", {}, [-6.0, -4.0, -8.0]),  # ByzFL's -tau mu, tau = 2
    ("ipm(factor=0)", {}, [3.0, 2.0, 4.0]),
    ("sign-flip", {}, [-3.0, -2.0, -4.0]),
    ("signflip(scale=0.5)", {}, [-1.5, -1.0, -2.0]),
    ("bulyan-coordinate", {}, [3.0, 2.0, 5.0]),  # mu + 1 e_{-1}
    ("bulyan(coordinate=0,factor=2.5)", {}, [5.5, 2.0, 4.0]),
    ("bulyan-coordinate(coordinate=1,factor=2,negative=true)", {}, [3.0, 0.0, 4.0]),
    ("bulyan-coordinate(coordinate=all,factor=0.5)", {}, [3.5, 2.5, 4.5]),
    ("mimic", {}, [1.0, -1.0, 4.0]),
    ("mimic(target=2)", {}, [5.0, 5.0, 4.0]),
]


@pytest.mark.parametrize("spec,params,expected", KNOWN)
def test_known_answers(spec, params, expected):
    f = 2
    out = attacks.get(spec, **params)(H0, f)
    torch.testing.assert_close(out, rows(expected, f), rtol=1e-6, atol=1e-6)


def test_known_answers_non_finite():
    assert torch.isnan(attacks.get("nan")(H0, 2)).all()
    out = attacks.get("inf")(H0, 2)
    assert out.shape == (2, 3) and (out == math.inf).all()
    assert (attacks.get("inf(negative=true)")(H0, 1) == -math.inf).all()


def test_known_answer_label_flip_returns_own():
    own = torch.tensor([[9.0, 8.0, 7.0], [6.0, 5.0, 4.0]], dtype=torch.float64)
    atk = attacks.get("label-flip")
    out = atk(H0, 2, own=own)
    assert out.dtype == H0.dtype
    torch.testing.assert_close(out, own.float())
    assert out.data_ptr() != own.data_ptr()
    assert atk.needs_own_gradients and not attacks.get("little").needs_own_gradients


def test_label_flip_errors():
    atk = attacks.get("label-flip")
    with pytest.raises(UsageError, match="own"):
        atk(H0, 2)
    with pytest.raises(UsageError, match=r"shape \(2, 3\)"):
        atk(H0, 2, own=torch.zeros(3, 3))
    assert atk(H0, 0).shape == (0, 3)  # f = 0 needs nothing


def test_label_map():
    lm = attacks.get("label-flip").label_map
    assert lm is attacks.flip_labels
    torch.testing.assert_close(lm(torch.tensor([0, 1, 2, 9]), 10), torch.tensor([9, 8, 7, 0]))
    torch.testing.assert_close(lm(torch.tensor([0.0, 1.0, 1.0]), 2), torch.tensor([1.0, 0.0, 0.0]))
    assert attacks.get("little").label_map is None
    with pytest.raises(UsageError):
        lm(torch.tensor([0]), 1)


# --------------------------------------------------------------------------------------------- #
# Registry and names


def test_names():
    assert attacks.names() == sorted(
        ["none", "nan", "inf", "little", "empire", "sign-flip", "gaussian", "bulyan-coordinate", "label-flip", "mimic",
         "bit-flip"]
    )


@pytest.mark.parametrize(
    "spec,name",
    [
        ("little", "little"),
        ("ALIE(negative=True, factor=1.50)", "little(factor=1.5,negative=true)"),
        ("little(factor=ZMAX)", "little(factor=zmax)"),
        ("ipm(factor=1.1)", "empire(factor=1.1)"),
        ("bulyan(factor=optimal,coordinate=ALL)", "bulyan-coordinate(coordinate=all,factor=optimal)"),
        ("mimic(target=Auto,warmup=3)", "mimic(target=auto,warmup=3)"),
        ("gaussian(std=2.0)", "gaussian(std=2)"),
        ("sign_flip", "sign-flip"),
    ],
)
def test_canonical_names(spec, name):
    atk = attacks.get(spec)
    assert atk.name == name
    assert canonical(atk.name) == atk.name
    assert attacks.get(atk.name).name == name
    assert name in repr(atk)


def test_params_as_keywords():
    a = attacks.get("little", factor=2, negative=True)
    b = attacks.get("little(negative=true)", factor=2.0)
    assert a.name == b.name == "little(factor=2,negative=true)"
    torch.testing.assert_close(a(H0, 1), b(H0, 1))
    assert a.params == {"factor": 2.0, "negative": True, "evals": 16}


@pytest.mark.parametrize(
    "spec,params,match",
    [
        ("krumm", {}, "unknown attack"),
        ("little(z=1)", {}, "no parameter 'z'"),
        ("little(factor=abc)", {}, "factor"),
        ("little(negative=3)", {}, "negative"),
        ("little(factor=1)", {"factor": 2}, "twice"),
        ("little(evals=0)", {}, "evals"),
        ("little+empire", {}, "compose"),
        ("empire(factor=zmax)", {}, "factor"),
        ("gaussian(std=-1)", {}, "std"),
        ("mimic(target=-1)", {}, "target"),
        ("mimic(warmup=0)", {}, "warmup"),
        ("inf(negative=maybe)", {}, "negative"),
        ("", {}, "empty"),
    ],
)
def test_bad_specs(spec, params, match):
    with pytest.raises(UsageError, match=match) as info:
        attacks.get(spec, **params)
    assert info.value.option == "--attack"


def test_bad_inputs():
    atk = attacks.get("little")
    with pytest.raises(UsageError):
        atk(H0[0], 1)  # 1-D
    with pytest.raises(UsageError):
        atk(H0.long(), 1)  # not floating
    with pytest.raises(UsageError):
        atk(H0, -1)
    with pytest.raises(UsageError):
        atk(H0, True)
    with pytest.raises(UsageError, match="at least 2"):
        atk(H0[:1], 1)  # unbiased sigma needs h >= 2
    with pytest.raises(UsageError, match="out of range"):
        attacks.get("bulyan-coordinate(coordinate=3)")(H0, 1)
    with pytest.raises(UsageError, match="not an honest row"):
        attacks.get("mimic(target=3)")(H0, 1)


# --------------------------------------------------------------------------------------------- #
# Contracts for every attack: shape, dtype, device, fresh memory, no mutation, no global RNG


def _call_kwargs(atk, H, f, seed=0):
    kw = {}
    if atk.needs_aggregator:
        kw["aggregator"] = agg_median
    if atk.needs_generator:
        kw["generator"] = torch.Generator(device=H.device).manual_seed(seed)
    if atk.needs_own_gradients:
        kw["own"] = torch.ones(f, H.shape[1], dtype=H.dtype, device=H.device)
    return kw


ALL_SPECS = [
    "none", "nan", "inf", "little", "little(factor=zmax)", "little(factor=optimal)", "empire",
    "empire(factor=optimal)", "sign-flip", "gaussian", "gaussian(identical=true,centred=true)",
    "bulyan-coordinate", "bulyan-coordinate(factor=optimal)", "label-flip", "bit-flip", "mimic", "mimic(target=auto)",
]
# CUDA cases exist everywhere and say why they are skipped where no CUDA device is present
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device (none here)"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_contract(spec, dtype, device):
    gen = torch.Generator().manual_seed(1)
    H = torch.randn(6, 7, generator=gen).to(dtype=dtype, device=device)
    before = H.clone()
    version = H._version
    atk = attacks.get(spec)
    rng = torch.get_rng_state()
    for f in (0, 1, 5):
        out = atk(H, f, **_call_kwargs(atk, H, f))
        assert out.shape == (f, 7)
        assert out.dtype == dtype and out.device.type == device
        assert out.is_contiguous()
        if f:
            assert out.untyped_storage().data_ptr() != H.untyped_storage().data_ptr()
    assert torch.equal(H, before) and H._version == version
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("spec", ["little", "empire", "sign-flip", "mimic(target=auto)", "none"])
def test_identical_rows_and_independent_memory(spec):
    out = attacks.get(spec)(H0, 4)
    assert torch.equal(out, out[:1].expand(4, -1))
    out[0].fill_(123.0)  # rows are real memory, not views of one another
    assert not torch.equal(out[1], out[0])


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_forge_into_out_gives_the_same_vectors(spec):
    H = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    atk = attacks.get(spec)
    want = atk.forge(H, 3, **_call_kwargs(atk, H, 3)).value
    stacked = torch.full((9, 7), -1.0)  # honest rows, then the Byzantine rows the attack writes
    stacked[:6] = H
    got = atk.forge(stacked[:6], 3, out=stacked[6:], **_call_kwargs(atk, H, 3))
    assert got.value.data_ptr() == stacked[6:].data_ptr()
    assert torch.equal(stacked[6:].nan_to_num(7.0), want.nan_to_num(7.0)) and torch.equal(stacked[:6], H)
    with pytest.raises(UsageError, match="shape"):
        atk.forge(H, 3, out=torch.empty(2, 7), **_call_kwargs(atk, H, 3))


def test_forge_returns_forged():
    forged = attacks.get("little").forge(H0, 2)
    assert isinstance(forged, attacks.Forged)
    assert forged.state is None and forged.info == {"factor": 1.5}
    with pytest.raises(Exception):
        forged.value = None  # frozen
    # f = 0 passes the state through untouched
    assert attacks.get("mimic(target=auto)").forge(H0, 0, state="s").state == "s"


# --------------------------------------------------------------------------------------------- #
# Randomness


def test_gaussian_generator_determinism():
    atk = attacks.get("gaussian(mean=1,std=2)")
    H = torch.zeros(3, 50)
    a = atk(H, 3, generator=torch.Generator().manual_seed(7))
    b = atk(H, 3, generator=torch.Generator().manual_seed(7))
    c = atk(H, 3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # rows independent by default
    # exactly the documented draw: mean + std * randn(f, d)
    expected = torch.randn(3, 50, generator=torch.Generator().manual_seed(7)).mul(2).add(1)
    torch.testing.assert_close(a, expected)


def test_gaussian_moments_centred_identical():
    H = torch.full((2, 200_000), 5.0)
    out = attacks.get("gaussian(mean=-1,std=0.5,centred=true,identical=true)")(
        H, 3, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out[0], out[2])
    assert abs(out[0].mean().item() - 4.0) < 0.01
    assert abs(out[0].std().item() - 0.5) < 0.01


def test_gaussian_needs_generator():
    with pytest.raises(UsageError, match="generator"):
        attacks.get("gaussian")(H0, 1)
    assert attacks.get("gaussian").needs_generator


def test_line_search_with_randomised_aggregator_is_deterministic():
    torch.manual_seed(0)
    H = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    atk = attacks.get("little(factor=optimal)")
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (11, 11, 12))
    state_before = g1.get_state()
    a = atk.forge(H, 5, aggregator=agg_bucket_mean, generator=g1)
    b = atk.forge(H, 5, aggregator=agg_bucket_mean, generator=g2)
    atk.forge(H, 5, aggregator=agg_bucket_mean, generator=g3)
    assert torch.equal(a.value, b.value) and a.info == b.info
    assert torch.equal(g1.get_state(), state_before)  # evaluations use copies of the generator


# --------------------------------------------------------------------------------------------- #
# sigma: unbiased, fast formulation sound


@pytest.mark.parametrize("chunk_rows", [True, False, None])
def test_mean_std_unbiased(chunk_rows):
    H = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, sigma = attacks.mean_std(H, chunk_rows=chunk_rows)
    torch.testing.assert_close(mu, H.mean(0))
    torch.testing.assert_close(sigma, H.std(0, unbiased=True))
    # hand value: [1, 3, 5] -> 2 (the biased estimate would be 1.633)
    assert attacks.mean_std(H0, chunk_rows=chunk_rows)[1].tolist() == [2.0, 3.0, 0.0]


@pytest.mark.parametrize("chunk_rows", [True, False])
def test_mean_std_large_offset_float32(chunk_rows):
    # |mu| >> sigma: the two-pass formula keeps float32 accuracy where E[x^2] - E[x]^2 would not
    H64 = 1e3 + 1e-2 * torch.randn(6, 4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    H = H64.float()
    _, sigma = attacks.mean_std(H, chunk_rows=chunk_rows)
    ref = H.double().std(0)
    assert ((sigma.double() - ref).abs() / ref).max() < 1e-2
    naive = ((H * H).mean(0) - H.mean(0) ** 2).clamp_min(0).mul(6 / 5).sqrt()
    assert ((naive.double() - ref).abs() / ref).max() > 1e-1  # what the formulation avoids


def test_little_uses_unbiased_sigma():
    H = torch.tensor([[0.0], [2.0]])  # mu 1, unbiased sigma sqrt(2)
    out = attacks.get("little(factor=1)")(H, 1)
    torch.testing.assert_close(out, torch.tensor([[1.0 + math.sqrt(2.0)]]))


# --------------------------------------------------------------------------------------------- #
# z_max


def test_zmax_n11_f5():
    # s = floor(11/2 + 1) - 5 = 1, z = Phi^-1(10/11)
    assert attacks.zmax(11, 5) == pytest.approx(1.3351777361189365, abs=1e-12)
    H = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]])  # h = 6, mu 2.5, sigma sqrt(3.5)
    forged = attacks.get("little(factor=zmax)").forge(H, 5)
    assert forged.info["factor"] == pytest.approx(1.3351777361189365)
    torch.testing.assert_close(forged.value, torch.full((5, 1), 2.5 + 1.3351777361189365 * math.sqrt(3.5)))


def test_zmax_other_values_and_errors():
    assert attacks.zmax(25, 5) == pytest.approx(0.46769879911450835)  # s = 13 - 5 = 8, Phi^-1(17/25)
    assert attacks.zmax(11, 1) == pytest.approx(0.11418529432142821)  # s = 6 - 1 = 5, Phi^-1(6/11)
    with pytest.raises(UsageError, match="s=0"):
        attacks.zmax(11, 6)
    with pytest.raises(UsageError):
        attacks.get("little(factor=zmax)")(torch.zeros(5, 2), 6)
    with pytest.raises(UsageError, match="n > s"):
        attacks.zmax(2, 0)  # s = 2: Phi^-1(0) is not finite


def test_zmax_among_the_honest_workers():
    # the quantile among the n - f honest workers: Phi^-1((n - f - s)/(n - f)), s = floor(n/2 + 1) - f
    # n = 11, f = 5: s = 1, Phi^-1(5/6); n = 25, f = 5: s = 8, Phi^-1(12/20) (paper: Phi^-1(17/25))
    # (values from scipy.stats.norm.ppf)
    assert attacks.zmax(11, 5, honest=True) == pytest.approx(0.967421566101701, abs=1e-12)
    assert attacks.zmax(25, 5, honest=True) == pytest.approx(0.2533471031357997, abs=1e-12)
    assert attacks.zmax(11, 1, honest=True) == pytest.approx(0.0, abs=1e-12)  # s = 5: Phi^-1(5/10)
    H = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]])  # h = 6, mu 2.5, sigma sqrt(3.5)
    forged = attacks.get("little(factor=zmax-honest,negative=true)").forge(H, 5)
    assert forged.info["factor"] == pytest.approx(0.967421566101701)
    torch.testing.assert_close(forged.value, torch.full((5, 1), 2.5 - 0.967421566101701 * math.sqrt(3.5)))
    assert attacks.get("alie(factor=ZMAX-HONEST)").name == "little(factor=zmax-honest)"
    with pytest.raises(UsageError, match="zmax-honest"):
        attacks.zmax(11, 6, honest=True)


# --------------------------------------------------------------------------------------------- #
# Optimal factor line search


def test_line_maximize_quadratic():
    calls = []
    x, y, n = attacks.line_maximize(lambda x: calls.append(x) or -((x - 5.0) ** 2), 16)
    assert n == len(calls) == 16
    assert calls[:4] == [0.0, 1.0, 3.0, 7.0]  # expansion: +1, +2, +4 (doubling)
    assert abs(x - 5.0) < 0.1 and y == pytest.approx(-((x - 5.0) ** 2))
    assert attacks.line_maximize(lambda x: 1.0, 1) == (0.0, 1.0, 1)
    assert min(calls) >= 0.0


@pytest.mark.parametrize("evals", [1, 2, 5, 16])
@pytest.mark.parametrize("agg", [agg_mean, agg_median, agg_krum])
def test_line_search_evaluation_bound(evals, agg):
    H = torch.randn(6, 20, generator=torch.Generator().manual_seed(2))
    counting = Counting(agg)
    forged = attacks.get(f"little(factor=optimal,evals={evals})").forge(H, 5, aggregator=counting)
    assert counting.calls == forged.info["evaluations"] <= evals
    assert forged.info["factor"] >= 0.0


def test_line_search_mean_known_answer():
    # with the average the damage grows with the factor: the expansion never fails and the search
    # ends at 1 + 2 + ... + 2^14 = 2^15 - 1 after 16 evaluations
    forged = attacks.get("little(factor=optimal)").forge(H0, 2, aggregator=Counting(agg_mean))
    assert forged.info["factor"] == 2.0**15 - 1 and forged.info["evaluations"] == 16
    torch.testing.assert_close(forged.value, rows([3.0 + 2 * 32767, 2.0 + 3 * 32767, 4.0], 2))
    f5 = attacks.get("empire(factor=optimal,evals=5)").forge(H0, 2, aggregator=agg_mean)
    assert f5.info["factor"] == 15.0  # 0, 1, 3, 7, 15
    torch.testing.assert_close(f5.value, rows([-42.0, -28.0, -56.0], 2))  # (1 - 15) mu


def test_line_search_needs_aggregator():
    atk = attacks.get("empire(factor=optimal)")
    assert atk.needs_aggregator and not attacks.get("empire").needs_aggregator
    with pytest.raises(UsageError, match="aggregator"):
        atk(H0, 2)
    assert atk(H0, 0).shape == (0, 3)  # f = 0 requires nothing


def _damage(G_honest, byz, agg, f):
    mu = G_honest.mean(0)
    out = agg(torch.cat([G_honest, byz]), f)
    return float((out - mu).double().pow(2).sum())


@pytest.mark.parametrize("agg", [agg_mean, agg_median, agg_krum])
@pytest.mark.parametrize("base,default", [("little", "little"), ("little(negative=true)", "little(negative=true)"),
                                          ("empire", "empire")])
def test_optimal_at_least_as_damaging_as_default(agg, base, default):
    gen = torch.Generator().manual_seed(4)
    H = torch.randn(6, 50, generator=gen) + 0.5
    f = 5
    name, _, rest = base.partition("(")
    opt = attacks.get(f"{name}(factor=optimal{',' + rest if rest else ')'}")
    byz_opt = opt(H, f, aggregator=agg)
    byz_def = attacks.get(default)(H, f)
    assert _damage(H, byz_opt, agg, f) >= _damage(H, byz_def, agg, f) * (1 - 1e-6)


def test_optimal_krum_prefers_small_factor():
    # Krum (n = 12 >= 2f + 3) rejects far-away vectors: the search must not simply blow the factor up
    H = torch.randn(9, 50, generator=torch.Generator().manual_seed(5))
    forged = attacks.get("little(factor=optimal)").forge(H, 3, aggregator=agg_krum)
    assert 0 < forged.info["factor"] < 10
    assert forged.info["objective"] >= _damage(H, attacks.get("little")(H, 3), agg_krum, 3) * (1 - 1e-6)
    assert forged.info["objective"] > _damage(H, attacks.get("little(factor=50)")(H, 3), agg_krum, 3)


def test_optimal_bulyan_coordinate():
    forged = attacks.get("bulyan-coordinate(factor=optimal,coordinate=0,evals=3)").forge(H0, 2, aggregator=agg_mean)
    assert forged.info["factor"] == 3.0  # 0, 1, 3
    torch.testing.assert_close(forged.value, rows([6.0, 2.0, 4.0], 2))


def test_aggregator_results_as_objects_or_tuples():
    class Out:
        def __init__(self, v):
            self.value = v

    base = attacks.get("little(factor=optimal,evals=4)").forge(H0, 2, aggregator=agg_median)
    for wrap in (lambda G, f: Out(agg_median(G, f)), lambda G, f: (agg_median(G, f), None)):
        assert attacks.get("little(factor=optimal,evals=4)").forge(H0, 2, aggregator=wrap).info == base.info
    with pytest.raises(UsageError, match="aggregator returned"):
        attacks.get("little(factor=optimal)")(H0, 2, aggregator=lambda G, f: 1.0)


def test_line_search_with_the_project_aggregators():
    from dpbr.robust import aggregators

    H = torch.randn(8, 30, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    mu, sigma = H.mean(0), H.std(0)  # unbiased sigma
    # n = 11, f = 3 satisfies every rule's requirement below (krum: n >= 2f + 3)
    for gar in ("average", "median", "krum", "trimmed-mean", "meamed", "multi-krum", "mda", "geometric-median"):
        rule = aggregators.get(gar)
        probes = []

        def recording(G, f, *, generator=None, state=None):
            probes.append(G[8:].clone())  # the Byzantine rows of this evaluation
            return rule(G, f, generator=generator)

        counting = Counting(recording)
        forged = attacks.get("little(factor=optimal,negative=true)").forge(
            H, 3, aggregator=counting, generator=torch.Generator().manual_seed(0)
        )
        assert 1 <= counting.calls <= 16 and len(probes) == counting.calls == forged.info["evaluations"]
        assert forged.value.shape == (3, 30) and torch.isfinite(forged.value).all()
        harm = _damage(H, forged.value, rule, 3)
        assert harm == pytest.approx(forged.info["objective"], rel=1e-12)
        # every probe is the fixed-factor attack little(factor=x, negative=true) for the probed x ≥ 0,
        # and the chosen vector does at least as much harm as each of them against the real rule
        for byz in probes:
            x = float(((mu - byz[0]) / sigma).mean())
            fixed = attacks.get(f"little(factor={x!r},negative=true)")(H, 3)
            assert x >= 0 and torch.allclose(fixed, byz, rtol=0, atol=1e-9)
            assert harm >= _damage(H, fixed, rule, 3) * (1 - 1e-9), (gar, x)
        assert len({round(float(((mu - b[0]) / sigma).mean()), 9) for b in probes}) >= min(3, counting.calls)


# --------------------------------------------------------------------------------------------- #
# Mimic


def test_mimic_fixed_target():
    atk = attacks.get("mimic(target=1)")
    assert not atk.stateful
    torch.testing.assert_close(atk(H0, 3), rows([3.0, 2.0, 4.0], 3))


def test_mimic_auto_known_target():
    # one spread coordinate: the top direction is e_0; the most extreme honest row is chosen
    H = torch.tensor([[0.0, 0.0], [2.0, 0.0], [7.0, 0.0]])  # centred: -3, -1, +4 -> row 2
    forged = attacks.get("mimic(target=auto)").forge(H, 2)
    assert int(forged.state.target) == 2
    torch.testing.assert_close(forged.value, rows([7.0, 0.0], 2))
    H = torch.tensor([[-7.0, 0.0], [-2.0, 0.0], [0.0, 0.0]])  # centred: -4, +1, +3 -> row 0
    forged = attacks.get("mimic(target=auto)").forge(H, 1)
    assert int(forged.state.target) == 0
    torch.testing.assert_close(forged.state.direction.abs(), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(forged.state.mean, torch.tensor([-3.0, 0.0]))


def test_mimic_auto_state_fixes_target_after_warmup():
    atk = attacks.get("mimic(target=auto)")  # warmup = 1 (reference default)
    assert atk.stateful
    H1 = torch.tensor([[0.0, 0.0], [2.0, 0.0], [7.0, 0.0]])
    H2 = torch.tensor([[9.0, 0.0], [2.0, 0.0], [0.0, 0.0]])  # alone, H2 would pick row 0
    s1 = atk.forge(H1, 2)
    assert s1.state.step == 1 and int(s1.state.target) == 2
    s2 = atk.forge(H2, 2, state=s1.state)
    assert s2.state.step == 2 and int(s2.state.target) == 2
    torch.testing.assert_close(s2.value, rows([0.0, 0.0], 2))  # H2[2]
    assert int(atk.forge(H2, 2).state.target) == 0  # fresh state: re-chosen
    torch.testing.assert_close(atk(H2, 1), rows([9.0, 0.0], 1))  # __call__ is stateless


def test_mimic_auto_warmup_updates_running_estimates():
    atk = attacks.get("mimic(target=auto,warmup=3)")
    H1 = torch.tensor([[0.0, 0.0], [2.0, 0.0], [7.0, 0.0]])
    H2 = torch.tensor([[9.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    s1 = atk.forge(H1, 2)
    s2 = atk.forge(H2, 2, state=s1.state)
    # running mean over the warm-up: (3 + 4) / 2 along e_0
    torch.testing.assert_close(s2.state.mean, torch.tensor([3.5, 0.0]))
    torch.testing.assert_close(s2.state.direction, torch.tensor([1.0, 0.0]))
    assert int(s2.state.target) == 0  # re-chosen within the warm-up: argmax <H2_i, e_0>
    s3 = atk.forge(H1, 2, state=s2.state)
    s4 = atk.forge(H2, 2, state=s3.state)  # warm-up over after 3 steps: keeps s3's target
    assert int(s3.state.target) == 2 and int(s4.state.target) == 2 and s4.state.step == 4
    assert torch.equal(s4.state.direction, s3.state.direction)


def test_mimic_auto_bad_state():
    atk = attacks.get("mimic(target=auto)")
    with pytest.raises(UsageError, match="MimicState"):
        atk.forge(H0, 1, state={"step": 1})
    s = atk.forge(H0, 1).state
    with pytest.raises(UsageError, match="does not match"):
        atk.forge(torch.zeros(3, 5), 1, state=s)


def test_mimic_auto_constant_honest_vectors():
    out = attacks.get("mimic(target=auto)").forge(torch.ones(4, 3), 2)
    assert torch.isfinite(out.value).all() and torch.isfinite(out.state.direction).all()


@pytest.mark.parametrize("spec", ["little", "little(factor=zmax)", "empire", "sign-flip"])
def test_copies_flag_means_every_row_is_the_same_vector(spec):
    H = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    forged = attacks.get(spec).forge(H, 5, out=torch.empty(5, 40))
    assert forged.copies
    assert all(torch.equal(row, forged.value[0]) for row in forged.value)


def test_attacks_with_different_rows_do_not_claim_copies():
    H = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    forged = attacks.get("gaussian").forge(H, 5, generator=torch.Generator().manual_seed(0))
    assert not forged.copies and not torch.equal(forged.value[0], forged.value[1])
