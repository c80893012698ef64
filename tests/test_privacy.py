"""Gradient-privacy mechanisms: known answers on hand-computed inputs, statistics of the random ones,
independence across workers, canonical composition order, no mutation, dtype/device kept."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpbr.errors import UsageError
from dpbr.privacy import gaussian_sigma, mechanisms as M

# CUDA cases exist everywhere and say why they are skipped where no CUDA device is present
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device (none here)"))]


def gens(n: int, base: int = 0, device: str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(base + i) for i in range(n)]


# ------------------------------------------------------------------------------------------------
# gaussian_sigma and validation


def test_gaussian_sigma_known_values():
    # (2·0.01/10)·sqrt(2 ln(1.25e6))/0.1 = 0.002·5.2988026/0.1 = 0.10597605
    assert gaussian_sigma(0.01, 10, 0.1, 1e-6) == pytest.approx(0.1059760505, rel=1e-9)
    # REFERENCE.md §2: σ = 0.10598/(b·ε) with C = 0.01, δ = 1e-6
    for b in (10, 50, 100, 500):
        assert gaussian_sigma(0.01, b, 0.2, 1e-6) == pytest.approx(0.10597605 / (b * 0.2), rel=1e-7)
    mech = M.get("gaussian", epsilon=0.2, delta=1e-6, clip=0.01, batch_size=50)
    assert mech.sigma == gaussian_sigma(0.01, 50, 0.2, 1e-6)


@pytest.mark.parametrize(
    "kw, option, text",
    [
        (dict(epsilon=0.0), "--epsilon", "(0, 1)"),
        (dict(epsilon=1.0), "--epsilon", "(0, 1)"),
        (dict(epsilon=-0.2), "--epsilon", "(0, 1)"),
        (dict(epsilon=float("inf")), "--epsilon", "(0, 1)"),
        (dict(epsilon=float("nan")), "--epsilon", "number"),
        (dict(epsilon=True), "--epsilon", "number"),
        (dict(epsilon="0.2"), "--epsilon", "number"),
        (dict(delta=0.0), "--delta", "(0, 1)"),
        (dict(delta=1.5), "--delta", "(0, 1)"),
        (dict(delta=float("nan")), "--delta", "number"),
        (dict(delta=False), "--delta", "number"),
        (dict(clip=0.0), "--clip", "> 0"),
        (dict(clip=float("inf")), "--clip", "> 0"),
        (dict(batch_size=0), "--batch-size", "positive integer"),
        (dict(batch_size=2.5), "--batch-size", "positive integer"),
        (dict(batch_size=True), "--batch-size", "positive integer"),
    ],
)
def test_gaussian_sigma_validation(kw, option, text):
    args = dict(clip=0.01, batch_size=50, epsilon=0.2, delta=1e-6)
    args.update(kw)
    with pytest.raises(UsageError) as info:
        gaussian_sigma(**args)
    assert info.value.option == option and text in str(info.value)
    with pytest.raises(UsageError) as info2:  # the same through the registry
        M.get("gaussian", **args)
    assert info2.value.option == option


@pytest.mark.parametrize(
    "spec, text",
    [
        ("sparsifyy", "unknown privacy mechanism"),
        ("sparsify(q=0.1)", "no parameter 'q'"),
        ("sparsify(p=1.5)", "[0, 1]"),
        ("gaussian(sigma=0.1,epsilon=0.2)", "not both"),
        ("gaussian(epsilon=0.2)", "missing"),
        ("gaussian(sigma=-1)", ">= 0"),
        ("quantize(bits=0)", "positive integer"),
        ("quantize(kind=foo)", "kind must be one of"),
        ("quantize(kind=uniform,levels=4)", "give bits"),
        ("quantize(kind=qsgd,bits=2,levels=4)", "contradicts"),
        ("topk", "exactly one"),
        ("topk(k=2,fraction=0.5)", "exactly one"),
        ("clip(c=1,mode=foo)", "mode"),
        ("clip", "needs the clipping norm c"),
        ("gaussian(sigma=0.1)+gaussian(sigma=0.2)", "at most one per stage"),
        ("sparsify(p=0.1)+topk(k=3)", "at most one per stage"),
        ("quantize(bits=8)+quantize(kind=sign)", "at most one per stage"),
    ],
)
def test_spec_errors(spec, text):
    with pytest.raises(UsageError) as info:
        M.get(spec)
    assert text in str(info.value)


def test_names_and_canonical_spec_roundtrip():
    assert M.names() == ["clip", "gaussian", "none", "quantize", "sparsify", "topk"]
    specs = [
        "clip(c=0.01)",
        "clip(c=0.01,mode=per-example)",
        "gaussian(epsilon=0.2,delta=1e-06,clip=0.01,batch_size=50)",
        "gaussian(sigma=0.1)",
        "sparsify(p=0.25)",
        "topk(k=10)",
        "topk(fraction=0.1)",
        "quantize(bits=8)",
        "quantize(kind=stochastic,bits=4)",
        "quantize(kind=sign)",
        "quantize(kind=qsgd,levels=16)",
        "quantize(kind=fp16)",
        "none",
    ]
    for spec in specs:
        m = M.get(spec)
        assert M.get(m.name).name == m.name
    assert M.get("gaussian(epsilon=0.2,delta=1e-06,clip=0.01,batch_size=50)").name == (
        "gaussian(batch_size=50,clip=0.01,delta=1e-06,epsilon=0.2)"
    )
    assert M.get("clip", c=0.01).name == "clip(c=0.01,mode=batch)"
    assert M.get("quantize", bits=8).name == "quantize(bits=8,kind=uniform)"
    assert M.get("quantize", kind="qsgd", bits=4).name == "quantize(kind=qsgd,levels=15)"
    assert M.get("sparsify", p=0.25) == M.get("sparsify(p=0.25)")
    # sigma attribute
    assert M.get("sparsify(p=0.25)").sigma == 0.0
    assert M.get("gaussian(sigma=0.1)").sigma == 0.1


# ------------------------------------------------------------------------------------------------
# clip


def test_clip_rows_known_answer():
    X = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4], [-6.0, 8.0]])
    want = torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.3, 0.4], [-0.6, 0.8]])
    torch.testing.assert_close(M.clip_rows(X, 1.0), want)
    torch.testing.assert_close(M.get("clip", c=1.0)(X), want)
    # any leading shape: (h, b, d)
    torch.testing.assert_close(M.clip_rows(X.reshape(2, 2, 2), 1.0), want.reshape(2, 2, 2))
    with pytest.raises(UsageError):
        M.clip_rows(X, 0.0)


def test_clip_per_example_known_answer():
    # worker 0: examples [3,4] (norm 5 -> [0.6,0.8]) and [0.3,0.4] (kept): mean [0.45, 0.6]
    # worker 1: examples [0,0] and [0,-2] (-> [0,-1]): mean [0, -0.5]
    P = torch.tensor([[[3.0, 4.0], [0.3, 0.4]], [[0.0, 0.0], [0.0, -2.0]]])
    want = torch.tensor([[0.45, 0.6], [0.0, -0.5]])
    torch.testing.assert_close(M.clip_per_example_mean(P, 1.0), want)
    torch.testing.assert_close(M.get("clip", c=1.0, mode="per-example")(P), want)
    torch.testing.assert_close(M.clip_per_example_sum(P, 1.0), 2 * want)
    # batch mode clips the mean instead: mean [[1.65, 2.2], [0, -1]] -> norms 2.75, 1 -> [[0.6,0.8],[0,-1]]
    torch.testing.assert_close(M.get("clip", c=1.0)(P.mean(1)), torch.tensor([[0.6, 0.8], [0.0, -1.0]]))


def test_clip_per_example_chunked_equals_full():
    P = torch.randn(3, 10, 7, generator=torch.Generator().manual_seed(0))
    chunks = sum(M.clip_per_example_sum(P[:, i : i + 4], 0.5) for i in range(0, 10, 4)) / 10
    torch.testing.assert_close(chunks, M.clip_per_example_mean(P, 0.5))


def test_per_example_mode_rejects_2d():
    with pytest.raises(ValueError, match="per-example"):
        M.get("clip", c=1.0, mode="per-example")(torch.ones(3, 4))
    pipe = M.get("clip(c=1,mode=per-example)+gaussian(sigma=0.1)")
    assert pipe(torch.ones(3, 5, 4), generator=gens(3)).shape == (3, 4)


# ------------------------------------------------------------------------------------------------
# Gaussian noise


def test_gaussian_noise_std_statistically():
    # 10^6 draws: the sample std has relative standard error 1/sqrt(2n) = 0.07 %; tolerance 0.5 %
    # (7 SE). The mean's SE is σ/1000; tolerance 5 SE. Seeded, so deterministic.
    sigma = gaussian_sigma(0.01, 10, 0.2, 1e-6)
    G = torch.full((4, 250_000), 0.25)
    out = M.get("gaussian", epsilon=0.2, delta=1e-6, clip=0.01, batch_size=10)(G, generator=gens(4, 7))
    noise = (out - G).double()
    assert abs(noise.std().item() / sigma - 1) < 0.005
    assert abs(noise.mean().item()) < 5 * sigma / 1000


def test_gaussian_per_worker_generators_reproduce_and_are_independent():
    h, d = 4, 100_000
    G = torch.zeros(h, d)
    mech = M.get("gaussian", sigma=1.0)
    a = mech(G, generator=gens(h, 100))
    b = mech(G, generator=gens(h, 100))
    assert torch.equal(a, b)  # same generator states -> identical noise
    # row i is generator i's stream
    torch.testing.assert_close(a[2], torch.randn(d, generator=torch.Generator().manual_seed(102)))
    # different generators -> uncorrelated rows: |corr| < 0.02 (SE 1/sqrt(d) = 0.003)
    C = torch.corrcoef(a)
    off = C - torch.diag(torch.diag(C))
    assert off.abs().max().item() < 0.02
    # the same generators advance: the next call gives fresh, uncorrelated noise
    gs = gens(h, 100)
    first, second = mech(G, generator=gs), mech(G, generator=gs)
    assert not torch.equal(first, second)
    assert abs(torch.corrcoef(torch.stack([first[0], second[0]]))[0, 1].item()) < 0.02
    # identically seeded workers would share their noise (the anchor bug this design avoids)
    same = mech(G, generator=[torch.Generator().manual_seed(5) for _ in range(h)])
    assert torch.equal(same[0], same[1])


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_rows_drawn_in_parallel_threads_equal_the_rows_drawn_in_turn(threads, kind, monkeypatch):
    # rows long enough for the threaded path; 5 rows over 2 or 3 threads (uneven parts)
    h, d = 5, M.PARALLEL_DRAW_MIN + 3
    want = torch.stack([
        (torch.empty(d).normal_(1.0, 2.0, generator=g) if kind == "normal" else torch.empty(d).uniform_(1.0, 2.0, generator=g))
        for g in gens(h, 40)])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        calls = []
        real = M._draw_rows_parallel
        monkeypatch.setattr(M, "_draw_rows_parallel", lambda *a: calls.append(a[-1]) or real(*a))
        got = M._fill(torch.empty(h, d), kind, gens(h, 40), "test", 1.0, 2.0)
        # the simulation's buffers are inference tensors: the threads must write them in inference mode
        with torch.inference_mode():
            buf = torch.empty(h, d)
            M._fill(buf, kind, gens(h, 40), "test", 1.0, 2.0)
    finally:
        torch.set_num_threads(previous)
    assert calls == [threads, threads]
    assert torch.equal(got, want) and torch.equal(buf, want)


def test_short_rows_and_one_thread_are_drawn_in_turn(monkeypatch):
    monkeypatch.setattr(M, "_draw_rows_parallel", lambda *a: pytest.fail("threaded draw"))
    out = M._fill(torch.empty(3, M.PARALLEL_DRAW_MIN - 1), "normal", gens(3, 7), "test")
    assert torch.equal(out[1], torch.randn(M.PARALLEL_DRAW_MIN - 1, generator=torch.Generator().manual_seed(8)))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        M._fill(torch.empty(3, M.PARALLEL_DRAW_MIN - 1), "normal", gens(3, 7), "test")  # short rows
        torch.set_num_threads(1)
        M._fill(torch.empty(3, M.PARALLEL_DRAW_MIN), "normal", gens(3, 7), "test")  # one thread
    finally:
        torch.set_num_threads(previous)


def test_gaussian_single_generator_draws_the_block():
    G = torch.randn(3, 50)
    out = M.get("gaussian", sigma=0.5)(G, generator=torch.Generator().manual_seed(3))
    want = torch.empty(3, 50).normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3)) + G
    torch.testing.assert_close(out, want)


def test_gaussian_generator_errors_and_sigma_zero():
    G = torch.randn(3, 5)
    with pytest.raises(ValueError, match="one generator per worker"):
        M.get("gaussian", sigma=1.0)(G, generator=gens(2))
    with pytest.raises(TypeError):
        M.get("gaussian", sigma=1.0)(G, generator=[1, 2, 3])
    out = M.get("gaussian", sigma=0.0)(G, generator=gens(3))
    assert torch.equal(out, G) and out.data_ptr() != G.data_ptr()


# ------------------------------------------------------------------------------------------------
# sparsify / top-k


def test_sparsify_sign_separated_known_answer():
    # positives 0.1..0.4 are all smaller than every negative: sign-separated pruning with p = 0.25
    # removes one of each sign (k = ⌊0.25·4 + ½⌋ = 1): 0.1 and -1; a global 25 % pruning would have
    # removed 0.1 and 0.2 instead.
    x = torch.tensor([[0.1, 0.2, 0.3, 0.4, -1.0, -2.0, -3.0, -4.0]])
    want = torch.tensor([[0.0, 0.2, 0.3, 0.4, 0.0, -2.0, -3.0, -4.0]])
    assert torch.equal(M.get("sparsify", p=0.25)(x), want)


def test_sparsify_rounding_ties_zeros_and_rows():
    X = torch.tensor(
        [
            # 6 positives -> k = ⌊1.5 + ½⌋ = 2 (halves round up): 1, 2; 3 negatives -> k = ⌊0.75 + ½⌋ = 1: -1
            [6.0, 1.0, 5.0, 2.0, 4.0, 3.0, -3.0, -1.0, -2.0],
            # one of each sign -> k = ⌊0.25 + ½⌋ = 0: unchanged; zeros belong to neither sign
            [0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.1],
            # ties: positives 1,1,1,1,5,5 -> k = 2: the two 1's of lowest index; negatives -2,-2 -> k = 1:
            # the first -2
            [1.0, 1.0, 1.0, 1.0, -2.0, -2.0, 5.0, 5.0, 0.0],
        ]
    )
    want = torch.tensor(
        [
            [6.0, 0.0, 5.0, 0.0, 4.0, 3.0, -3.0, 0.0, -2.0],
            [0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.1],
            [0.0, 0.0, 1.0, 1.0, 0.0, -2.0, 5.0, 5.0, 0.0],
        ]
    )
    assert torch.equal(M.get("sparsify", p=0.25)(X), want)
    for i in range(3):  # vectorized over rows == row by row
        assert torch.equal(M.get("sparsify", p=0.25)(X[i]), want[i])
    assert torch.equal(M.get("sparsify", p=0.0)(X), X)
    assert torch.equal(M.get("sparsify", p=1.0)(X), torch.zeros_like(X))


def _sparsify_reference(x: list[float], p: float) -> list[float]:
    """Plain-Python statement of the definition (for the randomized comparison)."""
    out = list(x)
    for member in (lambda v: v > 0, lambda v: v < 0):
        idx = [i for i, v in enumerate(x) if member(v)]
        k = math.floor(p * len(idx) + 0.5)
        for i in sorted(idx, key=lambda i: (abs(x[i]), i))[:k]:
            out[i] = 0.0
    return out


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_sparsify_matches_reference_with_many_ties(p):
    g = torch.Generator().manual_seed(int(p * 100))
    X = torch.randint(-4, 5, (7, 40), generator=g).float()  # integers: lots of ties and zeros
    got = M.get("sparsify", p=p)(X)
    want = torch.tensor([_sparsify_reference(row, p) for row in X.tolist()])
    assert torch.equal(got, want)


def test_sparsify_leaves_nan():
    x = torch.tensor([[float("nan"), 1.0, 2.0, 3.0, 4.0]])
    out = M.get("sparsify", p=0.25)(x)
    assert math.isnan(out[0, 0].item()) and out[0, 1:].tolist() == [0.0, 2.0, 3.0, 4.0]


def test_topk_known_answer():
    x = torch.tensor([[0.1, -3.0, 2.0, -0.5], [1.0, 2.0, 3.0, 4.0]])
    want = torch.tensor([[0.0, -3.0, 2.0, 0.0], [0.0, 0.0, 3.0, 4.0]])
    assert torch.equal(M.get("topk", k=2)(x), want)
    assert torch.equal(M.get("topk", fraction=0.5)(x), want)
    assert torch.equal(M.get("topk", k=10)(x), x)


# ------------------------------------------------------------------------------------------------
# quantizers


def test_uniform_quantize_known_answer():
    # bits = 2: grid of 4 points from min 0 to max 3, step 1; 0.4 -> 0, 0.6 -> 1, 2.5 -> 2 (half to even)
    x = torch.tensor([[0.0, 0.4, 0.6, 2.5, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    want = torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])  # constant row unchanged
    assert torch.equal(M.get("quantize", bits=2)(x), want)
    # bits = 1: {min, max}
    out = M.get("quantize", bits=1)(torch.tensor([-1.0, -0.2, 0.1, 1.0]))
    assert torch.equal(out, torch.tensor([-1.0, -1.0, 1.0, 1.0]))


def test_sign_quantize_known_answer():
    x = torch.tensor([[1.0, -2.0, 0.0, 3.0]])  # mean |x| = 1.5
    assert torch.equal(M.get("quantize", kind="sign")(x), torch.tensor([[1.5, -1.5, 0.0, 1.5]]))


def test_half_precision_quantizers():
    x = torch.tensor([1.0 / 3.0], dtype=torch.float32)
    assert M.get("quantize", kind="fp16")(x).item() == 0.333251953125
    assert M.get("quantize", kind="bf16")(x).item() == 0.333984375


def test_stochastic_quantizers_output_grid_and_unbiased():
    n = 20_000
    # stochastic, bits = 2, grid {0, 1, 2, 3}: 0.4 -> 0 or 1 (P(1) = 0.4), 2.5 -> 2 or 3
    x = torch.tensor([0.0, 0.4, 0.6, 2.5, 3.0])
    X = x.expand(n, -1)  # n independent rows, drawn from one generator
    Q = M.get("quantize", kind="stochastic", bits=2)(X, generator=torch.Generator().manual_seed(1))
    assert set(Q.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert torch.all((Q - x).abs() < 1.0)
    frac = x - x.floor()
    se = torch.sqrt(frac * (1 - frac) / n)  # Δ = 1
    assert torch.all((Q.double().mean(0) - x).abs() <= 5 * se + 1e-12)
    # QSGD, s = 2, x = [3, 4], ‖x‖ = 5: |x_i|·s/‖x‖ = 1.2, 1.6 -> values in {2.5, 5}; E = x
    y = torch.tensor([3.0, -4.0, 0.0])
    Y = y.expand(n, -1)
    Q = M.get("quantize", kind="qsgd", levels=2)(Y, generator=torch.Generator().manual_seed(2))
    assert set(Q[:, 0].unique().tolist()) == {2.5, 5.0} and set(Q[:, 1].unique().tolist()) == {-2.5, -5.0}
    assert torch.all(Q[:, 2] == 0)
    u = torch.tensor([0.2, 0.6, 0.0])  # fractional parts of 1.2, 1.6
    se = 2.5 * torch.sqrt(u * (1 - u) / n)  # each step is ‖x‖/s = 2.5
    assert torch.all((Q.double().mean(0) - y).abs() <= 5 * se + 1e-12)
    # zero row stays zero
    assert torch.equal(M.get("quantize", kind="qsgd")(torch.zeros(2, 3), generator=gens(2)), torch.zeros(2, 3))


def test_stochastic_quantizers_take_per_worker_generators():
    X = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    for spec in ("quantize(kind=stochastic,bits=3)", "quantize(kind=qsgd,levels=4)"):
        m = M.get(spec)
        a, b = m(X, generator=gens(3, 9)), m(X, generator=gens(3, 9))
        assert torch.equal(a, b)
        c = m(X, generator=gens(3, 50))
        assert not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# composition


def test_composition_order_is_canonical():
    parts = [
        M.get("quantize", bits=6),
        M.get("sparsify", p=0.25),
        M.get("gaussian", sigma=0.05),
        M.get("clip", c=1.0),
    ]
    pipe = M.compose(*parts)
    assert pipe.name == "clip(c=1,mode=batch)+gaussian(sigma=0.05)+sparsify(p=0.25)+quantize(bits=6,kind=uniform)"
    assert M.compose(*reversed(parts)).name == pipe.name
    assert M.get("quantize(bits=6)+sparsify(p=0.25)+gaussian(sigma=0.05)+clip(c=1)").name == pipe.name
    assert [m.stage for m in pipe.mechanisms] == [0, 1, 2, 3]
    assert pipe.sigma == 0.05 and pipe.randomized
    G = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    out = pipe(G, generator=gens(4, 1))
    # by hand, in the canonical order, each mechanism's definition written out here (no dpbr code),
    # the noise of row i from a fresh generator seeded like gens(4, 1)[i]
    manual = _by_hand_clip_noise_sparsify_quantize(G, c=1.0, sigma=0.05, p=0.25, bits=6, seeds=[1, 2, 3, 4])
    torch.testing.assert_close(out, manual, rtol=1e-6, atol=1e-7)
    for row in out.numpy():  # a quarter of each row pruned (then all on the grid point nearest 0), 2^6 points
        values, counts = np.unique(row, return_counts=True)
        assert len(values) <= 2**6 and counts.max() >= 14
    assert torch.equal(M.compose(*reversed(parts))(G, generator=gens(4, 1)), out)


def _by_hand_clip_noise_sparsify_quantize(G: torch.Tensor, *, c: float, sigma: float, p: float, bits: int,
                                          seeds: list[int]) -> torch.Tensor:
    """clip → Gaussian → sign-separated magnitude pruning → uniform min–max quantization, one row at a time
    from the definitions (float32 NumPy; the noise drawn with ``torch.normal`` from ``Generator(seed)``)."""
    rows = []
    for x, seed in zip(G.numpy().astype(np.float32), seeds):
        norm = np.sqrt(np.sum(x.astype(np.float64) ** 2))
        x = (x * np.float32(min(1.0, c / norm))).astype(np.float32)                     # clip to norm c
        noise = torch.normal(0.0, sigma, size=x.shape, generator=torch.Generator().manual_seed(seed)).numpy()
        x = (noise + x).astype(np.float32)                                               # + N(0, σ²)
        for sign in (1, -1):                                                             # prune per sign
            members = np.flatnonzero(np.sign(x) == sign)
            k = int(math.floor(p * len(members) + 0.5))
            order = np.lexsort((members, np.abs(x[members])))  # by magnitude, then by index
            x[members[order[:k]]] = 0.0
        lo, hi = np.float32(x.min()), np.float32(x.max())                                # 2^bits grid points
        step = np.float32((hi - lo) / np.float32(2**bits - 1))
        j = np.clip(np.round((x - lo) / step), 0, 2**bits - 1).astype(np.float32)        # round half to even
        rows.append((lo + j * step).astype(np.float32))
    return torch.from_numpy(np.stack(rows))


def test_none_and_empty_pipeline():
    G = torch.randn(2, 3)
    for m in (M.get("none"), M.compose(), M.compose(M.get("none"))):
        out = m(G)
        assert torch.equal(out, G) and out.data_ptr() != G.data_ptr()
    assert M.compose().name == "none"
    assert M.get("none+sparsify(p=0.5)").name == "sparsify(p=0.5)"


# ------------------------------------------------------------------------------------------------
# contracts: no mutation, dtype and device kept

ALL_SPECS = [
    "clip(c=0.5)",
    "gaussian(sigma=0.1)",
    "sparsify(p=0.25)",
    "topk(k=5)",
    "quantize(bits=4)",
    "quantize(kind=stochastic,bits=4)",
    "quantize(kind=sign)",
    "quantize(kind=qsgd,levels=8)",
    "quantize(kind=fp16)",
    "quantize(kind=bf16)",
    "clip(c=0.5)+gaussian(sigma=0.1)+sparsify(p=0.25)+quantize(kind=stochastic,bits=8)",
    "none",
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_no_mutation_dtype_device(spec, dtype, device):
    G = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)).to(dtype=dtype, device=device)
    before = G.clone()
    m = M.get(spec)
    out = m(G, generator=gens(3, device=device))
    assert torch.equal(G, before)
    assert out.dtype == dtype and out.device == G.device and out.shape == G.shape
    assert torch.isfinite(out.float()).all()
    # a single vector is one row
    v = m(G[0], generator=gens(1, device=device))
    assert v.shape == G[0].shape and v.dtype == dtype


def test_per_example_clip_no_mutation():
    P = torch.randn(2, 3, 4)
    before = P.clone()
    M.get("clip", c=0.1, mode="per-example")(P)
    M.clip_per_example_sum(P, 0.1)
    assert torch.equal(P, before)


def test_bad_inputs():
    with pytest.raises(TypeError):
        M.get("sparsify")(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        M.get("sparsify")(torch.ones(2, 3, 4))


# ------------------------------------------------------------------------------------------------
# ``out=``: the result written into a caller's buffer (the simulation's rows), same values


@pytest.mark.parametrize(
    "spec",
    ["gaussian(sigma=0.3)", "gaussian(sigma=0)", "sparsify(p=0.25)", "quantize(kind=stochastic,bits=3)",
     "clip(c=1)", "none", "gaussian(sigma=0.3)+sparsify(p=0.5)+quantize(kind=qsgd,levels=4)"],
)
def test_out_receives_the_same_values(spec):
    G = torch.randn(4, 30, generator=torch.Generator().manual_seed(0)) * 2
    before = G.clone()
    mech = M.get(spec)
    want = mech(G, generator=gens(4, 7))
    buffer = torch.full((2, 4, 30), math.nan)
    got = mech(G, generator=gens(4, 7), out=buffer[1])
    assert got.data_ptr() == buffer[1].data_ptr()
    assert torch.equal(buffer[1], want) and torch.isnan(buffer[0]).all()
    assert torch.equal(G, before)
    # a single vector (d,) with a (d,) buffer
    v = torch.randn(30, generator=torch.Generator().manual_seed(1))
    out = torch.empty(30)
    assert torch.equal(mech(v, generator=gens(1, 3), out=out), mech(v, generator=gens(1, 3)))


def test_out_is_checked():
    G = torch.randn(3, 5)
    mech = M.get("gaussian(sigma=1)")
    with pytest.raises(ValueError, match="share memory"):
        mech(G, generator=gens(3), out=G)
    stacked = torch.zeros(6, 5)
    with pytest.raises(ValueError, match="share memory"):
        mech(stacked[:3], generator=gens(3), out=stacked[2:5])  # overlapping row 2
    mech(stacked[:3], generator=gens(3), out=stacked[3:])  # adjacent, not overlapping: fine
    with pytest.raises(ValueError, match="shape"):
        mech(G, generator=gens(3), out=torch.empty(3, 6))
    with pytest.raises(ValueError, match="dtype"):
        mech(G, generator=gens(3), out=torch.empty(3, 5, dtype=torch.float64))
    per_example = M.get("clip(c=1,mode=per-example)")
    P = torch.randn(2, 4, 5)
    assert torch.equal(per_example(P, out=torch.empty(2, 5)), per_example(P))


def test_clip_rows_out_and_in_place():
    X = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [math.nan, 1.0]])
    want = M.clip_rows(X, 1.0)
    torch.testing.assert_close(want[:3], torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))
    assert torch.isnan(want[3]).all()
    out = torch.empty(4, 2)
    assert M.clip_rows(X, 1.0, out=out) is out and torch.equal(out.nan_to_num(7.0), want.nan_to_num(7.0))
    Y = X.clone()
    M.clip_rows(Y, 1.0, out=Y)  # in place on a buffer the caller owns
    assert torch.equal(Y.nan_to_num(7.0), want.nan_to_num(7.0))
