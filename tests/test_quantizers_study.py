"""The log2, k-means and fixed-point quantizers (``quantize(kind=log2|kmeans|fixed)``).

Known answers are written by hand or computed with plain NumPy in the test, never with dpbr. Then the
properties that must hold (idempotence, at most k values per row, saturation), the handling of zeros,
NaN and ±inf, determinism with a seed, per-worker generators, and both uses from the command line:
``dpbr train --quantize`` and ``dpbr reconstruct --defence`` on synthetic data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dpbr.cli import main
from dpbr.errors import UsageError
from dpbr.privacy import mechanisms as M

VECTORS = "synthetic(classes=2,d=68,n=512,n_test=128)"  # phishing-shaped binary vectors
IMAGES = "synthetic(n=64,n_test=8,size=12)"


def gens(h: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(h)]


# ------------------------------------------------------------------------------------------------
# Known answers


def np_log2_nearest(x: np.ndarray, bits: int) -> np.ndarray:
    """Reference: sign(x) 2^round(log2|x|) per row, exponents below top - (2^bits - 2) -> 0."""
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        nz = row != 0
        p = np.round(np.log2(np.abs(row[nz])))
        top = p.max()
        q = np.sign(row[nz]) * 2.0**p
        q[p < top - (2**bits - 2)] = 0.0
        out[i, nz] = q
    return out


def test_log2_known_answer_by_hand():
    # log2|x| = 1.585, -0.515, -, -4.32, 2.585, -6.64, 0.585 -> exponents 2, -1, -, -4, 3, -7, 1; top 3;
    # bits=3 keeps 2^3 - 1 = 7 exponents: -3..3, so 0.05 (2^-4) and 0.01 (2^-7) fall below the floor
    x = torch.tensor([3.0, -0.7, 0.0, 0.05, -6.0, 0.01, 1.5])
    want = torch.tensor([4.0, -0.5, 0.0, 0.0, -8.0, 0.0, 2.0])
    assert torch.equal(M.get("quantize(kind=log2,bits=3)")(x), want)
    # the threshold between 2^0 and 2^1 is their geometric mean sqrt(2) (nearest in the log domain)
    y = torch.tensor([1.41, 1.42, -1.41, -1.42])
    assert torch.equal(M.get("quantize(kind=log2)")(y), torch.tensor([1.0, 2.0, -1.0, -2.0]))
    # the window is per row: the second row, 1000x smaller, keeps its own 7 exponents
    X = torch.stack([x, x * 2.0**-10])
    assert torch.equal(M.get("quantize(kind=log2,bits=3)")(X), torch.stack([want, want * 2.0**-10]))


@pytest.mark.parametrize("bits", [1, 2, 4, 6])
def test_log2_matches_numpy_on_random_rows(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((3, 500)) * np.exp(rng.uniform(-8, 3, (3, 500)))
    x[:, ::17] = 0.0
    got = M.get(f"quantize(kind=log2,bits={bits})")(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, np_log2_nearest(x, bits))


def test_fixed_point_known_answer_and_saturation():
    # Q1.2: multiples of 1/4 in [-2, 1.75]; x*4 = 1.2, -2.8, 4, 0, 20, -12, 0.5, 1.5, -0.5
    # -> round half to even 1, -3, 4, 0, 20, -12, 0, 2, -0 -> /4 and clamp
    x = torch.tensor([0.3, -0.7, 1.0, 0.0, 5.0, -3.0, 0.125, 0.375, -0.125])
    want = torch.tensor([0.25, -0.75, 1.0, 0.0, 1.75, -2.0, 0.0, 0.5, 0.0])
    assert torch.equal(M.get("quantize(kind=fixed,int_bits=1,frac_bits=2)")(x), want)
    # Q0.0: only -1 and 0 are representable
    assert torch.equal(M.get("quantize(kind=fixed,int_bits=0,frac_bits=0)")(torch.tensor([0.7, -0.7, 3.0, -3.0])),
                       torch.tensor([0.0, -1.0, 0.0, -1.0]))


@pytest.mark.parametrize("m,n", [(3, 12), (0, 7), (5, 2)])
def test_fixed_point_matches_numpy(m, n):
    rng = np.random.default_rng(m * 10 + n)
    x = rng.standard_normal((4, 300)) * 10.0 ** rng.uniform(-4, 2, (4, 300))
    got = M.get(f"quantize(kind=fixed,int_bits={m},frac_bits={n})")(torch.from_numpy(x)).numpy()
    want = np.clip(np.round(x * 2.0**n) / 2.0**n, -(2.0**m), 2.0**m - 2.0**-n)
    np.testing.assert_array_equal(got, want)
    assert got.max() <= 2.0**m - 2.0**-n and got.min() >= -(2.0**m)  # saturated, never beyond the range


def test_kmeans_known_answer_three_separated_groups():
    # three groups; the optimal 3-level quantizer maps each to its mean: -5.1, 0.1, 10.2
    x = [0.0, 10.0, -5.0, 0.1, 10.2, 0.2, 10.4, -5.2]
    want = [0.1, 10.2, -5.1, 0.1, 10.2, 0.1, 10.2, -5.1]
    row2 = [100.0 * v + 1.0 for v in x]  # its own levels: 11, 1021, -509
    X = torch.tensor([x, row2], dtype=torch.float64)
    for seed in range(5):  # k-means++ seeding from each seed finds the three groups
        Q = M.get("quantize(kind=kmeans,levels=3)")(X, generator=gens(2, 10 * seed))
        np.testing.assert_allclose(Q[0].numpy(), want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(Q[1].numpy(), [100.0 * v + 1.0 for v in want], rtol=0, atol=1e-10)


def test_kmeans_one_level_is_the_row_mean_and_enough_levels_change_nothing():
    x = torch.tensor([[1.0, 2.0, 4.0, 9.0], [3.0, 3.0, -3.0, -3.0]], dtype=torch.float64)
    Q1 = M.get("quantize(kind=kmeans,levels=1)")(x, generator=gens(2))
    assert torch.equal(Q1, torch.tensor([[4.0] * 4, [0.0] * 4], dtype=torch.float64))
    for k in (2, 4, 16):
        assert torch.equal(M.get(f"quantize(kind=kmeans,levels={k},iterations=3)")(x[1:], generator=gens(1)), x[1:])
    assert torch.equal(M.get("quantize(kind=kmeans,levels=4)")(x, generator=gens(2)), x)


# ------------------------------------------------------------------------------------------------
# Properties: idempotence, at most k values per row


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", ["quantize(kind=log2,bits=3)", "quantize(kind=log2,bits=5)",
                                  "quantize(kind=fixed,int_bits=1,frac_bits=6)",
                                  "quantize(kind=fixed,int_bits=2,frac_bits=5,rounding=stochastic)"])
def test_log2_and_fixed_point_are_idempotent(spec, dtype):
    X = (torch.randn(4, 2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
         * torch.logspace(-5, 1, 2000, dtype=torch.float64)).to(dtype)
    mech = M.get(spec)
    Q = mech(X, generator=gens(4))
    assert torch.equal(mech(Q, generator=gens(4, 50)), Q)
    assert not torch.equal(Q, X)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("k", [1, 3, 8, 16])
def test_kmeans_at_most_k_values_per_row_and_requantizing_keeps_them(k, dtype):
    X = (torch.randn(3, 5000, generator=torch.Generator().manual_seed(k), dtype=torch.float64) ** 3).to(dtype)
    mech = M.get(f"quantize(kind=kmeans,levels={k},iterations=10)")
    Q = mech(X, generator=gens(3))
    for row in Q:
        assert 1 <= torch.unique(row).numel() <= k
    assert torch.equal(mech(Q, generator=gens(3, 99)), Q)  # other seeds: the same values come back


def test_kmeans_levels_reduce_the_error_and_lloyd_iterations_do_not_increase_it():
    X = torch.randn(2, 4000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    err = {}
    for k, t in [(2, 0), (2, 20), (8, 0), (8, 20)]:
        Q = M.get(f"quantize(kind=kmeans,levels={k},iterations={t})")(X, generator=gens(2, 3))
        err[k, t] = float(((Q - X) ** 2).sum())
    assert err[2, 20] <= err[2, 0] + 1e-9 and err[8, 20] <= err[8, 0] + 1e-9
    assert err[8, 20] < 0.2 * err[2, 20]
    # the optimal 2-level quantizer of N(0, 1) has levels ±sqrt(2/pi) and MSE 1 - 2/pi
    assert abs(err[2, 20] / X.numel() - (1 - 2 / math.pi)) < 0.03


# ------------------------------------------------------------------------------------------------
# Randomness: stochastic rounding unbiased, determinism, per-worker generators


def test_stochastic_log2_is_unbiased_between_neighbouring_powers():
    n = 20000
    x = torch.cat([torch.tensor([1.0]), torch.full((n,), 0.75), torch.full((n,), -0.3)]).unsqueeze(0)
    Q = M.get("quantize(kind=log2,rounding=stochastic)")(x, generator=torch.Generator().manual_seed(0))[0]
    a, b = Q[1:n + 1], Q[n + 1:]
    assert set(a.unique().tolist()) == {0.5, 1.0} and set(b.unique().tolist()) == {-0.5, -0.25}
    # standard errors 0.25/sqrt(n) = 0.0018 and 0.125/sqrt(n) = 0.0009: tolerances are > 5 of them
    assert abs(float(a.mean()) - 0.75) < 0.01 and abs(float(b.mean()) + 0.3) < 0.005


def test_stochastic_fixed_point_is_unbiased_inside_the_range():
    x = torch.full((1, 40000), 0.3)
    Q = M.get("quantize(kind=fixed,int_bits=1,frac_bits=2,rounding=stochastic)")(
        x, generator=torch.Generator().manual_seed(0))
    assert set(Q.unique().tolist()) == {0.25, 0.5}
    assert abs(float(Q.mean()) - 0.3) < 0.01  # standard error 0.25 * 0.4 / sqrt(n) = 0.0005


RANDOMIZED = ["quantize(kind=kmeans,levels=4)", "quantize(kind=log2,rounding=stochastic)",
              "quantize(kind=fixed,frac_bits=4,rounding=stochastic)"]


@pytest.mark.parametrize("spec", RANDOMIZED)
def test_same_seed_same_output_and_one_generator_per_worker_row(spec):
    mech = M.get(spec)
    assert mech.randomized
    X = torch.randn(3, 400, generator=torch.Generator().manual_seed(2))
    a, b = mech(X, generator=gens(3, 7)), mech(X, generator=gens(3, 7))
    assert torch.equal(a, b)
    assert not torch.equal(a, mech(X, generator=gens(3, 70)))
    for i in range(3):  # row i depends on generator i only
        assert torch.equal(mech(X[i:i + 1], generator=[torch.Generator().manual_seed(7 + i)]), a[i:i + 1])


def test_deterministic_kinds_draw_nothing():
    for spec in ("quantize(kind=log2)", "quantize(kind=fixed)"):
        assert not M.get(spec).randomized


# ------------------------------------------------------------------------------------------------
# Zeros, NaN and inf


def test_zero_rows_and_zeros_stay_zero():
    Z = torch.zeros(2, 7)
    for spec in ("quantize(kind=log2)", "quantize(kind=fixed)", "quantize(kind=kmeans,levels=3)"):
        assert torch.equal(M.get(spec)(Z, generator=gens(2)), Z)
    x = torch.tensor([[0.0, 0.5, 0.0, -0.25]])
    assert torch.equal(M.get("quantize(kind=log2)")(x)[x == 0], torch.zeros(2))


def test_non_finite_values():
    nan, inf = math.nan, math.inf
    x = torch.tensor([[inf, nan, 2.0, -inf, 0.3, 0.0]])
    # log2: non-finite unchanged; window from the finite values (top exponent 1)
    q = M.get("quantize(kind=log2)")(x)
    torch.testing.assert_close(q, torch.tensor([[inf, nan, 2.0, -inf, 0.25, 0.0]]), equal_nan=True, rtol=0, atol=0)
    # fixed point: NaN stays, ±inf saturate
    q = M.get("quantize(kind=fixed,int_bits=2,frac_bits=3)")(x)
    torch.testing.assert_close(q, torch.tensor([[3.875, nan, 2.0, -4.0, 0.25, 0.0]]), equal_nan=True, rtol=0, atol=0)
    # k-means: non-finite unchanged; levels fitted to the finite values only
    q = M.get("quantize(kind=kmeans,levels=2)")(x, generator=gens(1))
    torch.testing.assert_close(q, torch.tensor([[inf, nan, 2.0, -inf, 0.15, 0.15]]), equal_nan=True, rtol=0, atol=1e-7)
    allbad = torch.tensor([[nan, inf, -inf]])
    torch.testing.assert_close(M.get("quantize(kind=kmeans,levels=2)")(allbad, generator=gens(1)), allbad,
                               equal_nan=True, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Contracts shared with the other mechanisms


SPECS = ["quantize(kind=log2)", "quantize(kind=log2,bits=2,rounding=stochastic)", "quantize(kind=kmeans)",
         "quantize(kind=kmeans,bits=2,iterations=0)", "quantize(kind=fixed)",
         "quantize(kind=fixed,int_bits=0,frac_bits=8,rounding=stochastic)",
         "clip(c=1)+gaussian(sigma=0.1)+sparsify(p=0.25)+quantize(kind=kmeans,levels=8)"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS)
def test_no_mutation_dtype_kept_vector_is_one_row_and_out(spec, dtype):
    G = (torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 0.1).to(dtype)
    before = G.clone()
    m = M.get(spec)
    out = m(G, generator=gens(3))
    assert torch.equal(G, before)
    assert out.dtype == dtype and out.shape == G.shape and torch.isfinite(out.float()).all()
    v = m(G[0], generator=gens(1))
    assert v.shape == G[0].shape and torch.equal(v, out[0])
    buffer = torch.full((2, 3, 40), math.nan, dtype=dtype)
    row = buffer[1]
    assert m(G, generator=gens(3), out=row) is row
    assert torch.equal(row, out) and torch.isnan(buffer[0].float()).all()


def test_names_aliases_and_defaults():
    assert M.get("quantize(kind=log2)").name == "quantize(bits=4,kind=log2,rounding=nearest)"
    assert M.get("quantize(kind=k-means)").name == "quantize(iterations=20,kind=kmeans,levels=16)"
    assert M.get("quantize(kind=kmeans,bits=3)").name == "quantize(iterations=20,kind=kmeans,levels=8)"
    assert M.get("quantize(kind=fixed-point)").name == "quantize(frac_bits=12,int_bits=3,kind=fixed,rounding=nearest)"


@pytest.mark.parametrize("spec,needle", [
    ("quantize(kind=log2,bits=0)", "bits must be a positive integer"),
    ("quantize(kind=log2,bits=17)", "bits must be in 1..16"),
    ("quantize(kind=log2,levels=4)", "takes no levels (it takes bits, rounding)"),
    ("quantize(kind=log2,rounding=up)", "rounding must be one of nearest, stochastic"),
    ("quantize(kind=fixed,int_bits=-1)", "int_bits must be a non-negative integer"),
    ("quantize(kind=fixed,frac_bits=1.5)", "frac_bits must be a non-negative integer"),
    ("quantize(kind=fixed,frac_bits=127)", "frac_bits must be in 0..126"),
    ("quantize(kind=fixed,bits=8)", "takes no bits"),
    ("quantize(kind=kmeans,levels=0)", "levels must be a positive integer"),
    ("quantize(kind=kmeans,levels=4,bits=3)", "contradicts"),
    ("quantize(kind=kmeans,iterations=-1)", "iterations must be a non-negative integer"),
    ("quantize(kind=kmeans,rounding=nearest)", "takes no rounding (it takes levels, bits, iterations)"),
    ("quantize(kind=uniform,rounding=nearest)", "takes no rounding"),
    ("quantize(kind=qsgd,iterations=3)", "takes no iterations"),
])
def test_bad_parameters_are_usage_errors(spec, needle):
    with pytest.raises(UsageError) as exc:
        M.get(spec)
    assert needle in exc.value.message and "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------------------
# Command line: training and reconstruction


def _run(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _train(out: Path, quantize: str) -> int:
    return _run(["train", "--out", str(out), "--quiet", "--device", "cpu", "--dataset", VECTORS, "--model", "logit",
                 "--workers", "5", "--byzantine", "1", "--batch-size", "16", "--steps", "6", "--eval-every", "3",
                 "--seed", "2", "--quantize", quantize])


TRAIN = [("log2(bits=3)", "log2(bits=3)", "log2_bits=3"),
         ("kmeans(levels=4,iterations=5)", "kmeans(iterations=5,levels=4)", "kmeans_iterations=5_levels=4"),
         ("fixed(int_bits=0,frac_bits=6,rounding=stochastic)", "fixed(frac_bits=6,int_bits=0,rounding=stochastic)",
          "fixed_frac_bits=6_int_bits=0_rounding=stochastic"),
         ("quantize(kind=k-means,levels=2)", "kmeans(levels=2)", "kmeans_levels=2")]


@pytest.mark.parametrize("given,label,token", TRAIN)
def test_train_with_each_quantizer(tmp_path, given, label, token):
    from dpbr.io import read_metadata
    from dpbr.spec import RunSpec

    out = tmp_path / "q.parquet"
    assert _train(out, given) == 0
    frame = pd.read_parquet(out)
    assert (frame["quantize"] == label).all()
    assert np.isfinite(frame["train_loss"].to_numpy()[1:]).all()
    spec = RunSpec.create(dataset=VECTORS, model="logit", workers=5, byzantine=1, batch_size=16, steps=6,
                          eval_every=3, seed=2, quantize=given)
    assert frame["cell_id"].iloc[0] == spec.cell_id() and f",quantize={token}/" in spec.cell_id()
    assert spec.privacy.label() == f"quantize={label}"
    assert read_metadata(out)["spec"]["quantize"] == label
    # the quantizer changes the run
    assert _train(tmp_path / "none.parquet", "none") == 0
    plain = pd.read_parquet(tmp_path / "none.parquet")
    assert not np.array_equal(plain["train_loss"].to_numpy()[1:], frame["train_loss"].to_numpy()[1:])


def test_train_refuses_a_bad_quantizer_in_one_line(tmp_path, capsys):
    out = tmp_path / "bad.parquet"
    assert _train(out, "log2(bits=0)") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quantize" in err and "bits must be a positive integer" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("defence", ["quantize(kind=log2,bits=3)", "quantize(kind=kmeans,levels=4)",
                                     "quantize(kind=fixed,int_bits=0,frac_bits=8)"])
def test_reconstruct_with_each_quantizer_as_defence(tmp_path, defence):
    from dpbr.privacy.spec import PrivacySpec

    out = tmp_path / "r.parquet"
    assert _run(["reconstruct", "--dataset", IMAGES, "--iterations", "2", "--out", str(out), "--quiet",
                 "--defence", defence]) == 0
    frame = pd.read_parquet(out)
    canonical = M.get(defence).name
    assert (frame["defence"] == canonical).all() and (tmp_path / "r.png").exists()
    kind = canonical.split("kind=")[1].split(",")[0].rstrip(")")
    assert PrivacySpec.from_mechanism_spec(canonical).label().startswith(f"quantize={kind}(")


def test_reconstruct_refuses_a_bad_defence_in_one_line(tmp_path, capsys):
    out = tmp_path / "r.parquet"
    assert _run(["reconstruct", "--dataset", IMAGES, "--out", str(out), "--quiet",
                 "--defence", "quantize(kind=kmeans,levels=0)"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--defence" in err and "levels must be a positive integer" in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_shared_gradient_is_quantized_as_one_row():
    from dpbr.inversion.case import shared_gradient

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2])
    clean, shared = shared_gradient(model, torch.nn.functional.cross_entropy, x, y,
                                    "quantize(kind=kmeans,levels=3)", torch.Generator().manual_seed(1))
    flat = torch.cat([g.reshape(-1) for g in shared])
    assert torch.unique(flat).numel() <= 3  # one set of 3 levels for the whole gradient, not per tensor
    _, shared = shared_gradient(model, torch.nn.functional.cross_entropy, x, y, "quantize(kind=log2,bits=2)", None)
    flat = torch.cat([g.reshape(-1) for g in shared]).abs()
    nz = flat[flat > 0]
    assert torch.equal(torch.exp2(torch.log2(nz).round()), nz) and torch.unique(nz).numel() <= 3


def test_the_quantizer_config_gives_training_and_reconstruction_the_same_labels():
    """config/quantizers.yaml: every quantizer trained is also a reconstruction defence with the same
    privacy label (what the privacy–utility chart joins on), and each cell is valid."""
    import yaml

    from dpbr.privacy.spec import PrivacySpec
    from dpbr.report import grid
    from dpbr.spec import ReconSpec, RunSpec

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "quantizers.yaml").read_text())
    train = grid.expand(config["train"], RunSpec, "train").values()
    recon = grid.expand(config["reconstruct"], ReconSpec, "reconstruct").values()
    train_labels = {c.privacy.label() for c in train}
    recon_labels = {PrivacySpec.from_mechanism_spec(c.defence).label() for c in recon}
    assert train_labels == recon_labels and len(train_labels) == 14
    kinds = {label.split("=", 1)[1].split("(")[0] for label in train_labels if label != "none"}
    assert kinds == {"uniform", "stochastic", "sign", "qsgd", "fp16", "bf16", "log2", "kmeans", "fixed"}
