"""`dpbr train`: the simulated parameter server end to end on synthetic data (fast)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dpbr.cli import main
from dpbr.io import read_metadata
from dpbr.simulation import STEP_COLUMNS, GradientOracle, Simulation
from dpbr.spec import RunSpec

IMAGES = "synthetic(n=256,n_test=64,size=16)"      # 1×16×16 images, 10 classes
VECTORS = "synthetic(classes=2,d=68,n=512,n_test=128)"  # phishing-shaped binary vectors
METRICS = ["step", *STEP_COLUMNS, "test_accuracy", "test_loss"]


def run_cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def train_args(out: Path, **options: object) -> list[str]:
    base = {"dataset": VECTORS, "model": "logit", "workers": 7, "byzantine": 2, "batch-size": 16,
            "steps": 30, "eval-every": 10, "seed": 3}
    base.update({k.replace("_", "-"): v for k, v in options.items()})
    args = ["train", "--out", str(out), "--quiet", "--device", "cpu"]
    for key, value in base.items():
        args += [f"--{key}", str(value)]
    return args


def test_same_spec_and_seed_give_identical_metrics(tmp_path):
    opts = dict(gar="mda", attack="little(factor=1.5,negative=true)", epsilon=0.5)
    assert run_cli(train_args(tmp_path / "a.parquet", **opts)) == 0
    assert run_cli(train_args(tmp_path / "b.parquet", **opts)) == 0
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    pd.testing.assert_frame_equal(a[METRICS], b[METRICS])
    assert run_cli(train_args(tmp_path / "c.parquet", seed=4, **opts)) == 0
    c = pd.read_parquet(tmp_path / "c.parquet")
    assert not np.allclose(a["train_loss"].to_numpy()[1:], c["train_loss"].to_numpy()[1:])


def test_output_rows_columns_and_metadata(tmp_path):
    out = tmp_path / "run.parquet"
    assert run_cli(train_args(out, gar="mda", attack="empire(factor=1.1)", epsilon=0.2, steps=20, eval_every=5)) == 0
    frame = pd.read_parquet(out)
    assert frame["step"].tolist() == list(range(21))
    assert frame["test_accuracy"].notna().tolist() == [s % 5 == 0 for s in range(21)]
    assert frame.loc[1:, "train_loss"].notna().all() and math.isnan(frame.loc[0, "train_loss"])
    # every row carries the cell's parameters
    for col, value in {"gar": "mda", "attack": "empire(factor=1.1)", "epsilon": 0.2, "batch_size": 16,
                       "workers": 7, "byzantine": 2, "byzantine_real": 2, "clip_mode": "batch"}.items():
        assert (frame[col] == value).all(), col
    spec = RunSpec.create(dataset=VECTORS, model="logit", workers=7, byzantine=2, batch_size=16, steps=20,
                          eval_every=5, seed=3, gar="mda", attack="empire(factor=1.1)", epsilon=0.2)
    assert (frame["cell_id"] == spec.cell_id()).all()
    # per-step VN ratio is the deviation over the norm; noise makes the sent gradients spread more
    rows = frame.loc[1:]
    np.testing.assert_allclose(rows["vn_ratio"], rows["honest_deviation"] / rows["honest_norm"], rtol=1e-12)
    assert (rows["honest_deviation"] > rows["honest_deviation_clean"]).all()
    # the noise std is the study's formula: (2C/b) sqrt(2 ln(1.25/δ)) / ε
    sigma = 2 * 0.01 / 16 * math.sqrt(2 * math.log(1.25 / 1e-6)) / 0.2
    assert frame["noise_sigma"].iloc[0] == pytest.approx(sigma, rel=1e-12)
    assert frame["epsilon_composed"].iloc[0] > 0
    meta = read_metadata(out)
    assert meta["spec"]["gar"] == "mda" and meta["cell_id"] == spec.cell_id()
    assert {"torch", "numpy", "dpbr"} <= set(meta["versions"]) and meta["device"].startswith("cpu")
    assert meta["status"] == "completed"


def test_default_output_path_is_the_cell_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a for a in train_args(tmp_path / "unused.parquet", steps=3) if a not in ("--out",)]
    args.remove(str(tmp_path / "unused.parquet"))
    assert run_cli(args) == 0
    spec = RunSpec.create(dataset=VECTORS, model="logit", workers=7, byzantine=2, batch_size=16, steps=3,
                          eval_every=10, seed=3)
    assert (tmp_path / spec.path("results")).is_file()


def test_learning_happens_without_attack(tmp_path):
    out = tmp_path / "learn.parquet"
    assert run_cli(train_args(out, steps=60, eval_every=60, lr=2, momentum=0.9)) == 0
    acc = pd.read_parquet(out).dropna(subset=["test_accuracy"])["test_accuracy"].to_numpy()
    assert acc[0] < 0.8 and acc[-1] > 0.9  # separable synthetic classes: near-perfect after 60 steps


@pytest.mark.parametrize("attack", ["nan", "inf", "inf(negative=true)"])
def test_non_finite_byzantine_vectors_never_break_a_robust_run(tmp_path, attack):
    out = tmp_path / "robust.parquet"
    assert run_cli(train_args(out, gar="mda", attack=attack, steps=15)) == 0
    frame = pd.read_parquet(out)
    assert (frame["status"] == "completed").all()
    assert np.isfinite(frame.loc[1:, "aggregate_norm"]).all()
    assert (frame.loc[1:, "byzantine_selected"] == 0).all()


def test_a_diverging_run_is_recorded_as_diverged_and_stops(tmp_path):
    out = tmp_path / "diverged.parquet"
    assert run_cli(train_args(out, gar="average", attack="nan", steps=25)) == 0
    frame = pd.read_parquet(out)
    assert (frame["status"] == "diverged").all()
    meta = read_metadata(out)
    # step 1's average takes the NaN rows: θ is non-finite after its update, so the run stops there
    assert meta["status"] == "diverged" and meta["diverged_at"] == 1
    assert frame["step"].max() == 1 and not np.isfinite(frame["aggregate_norm"].iloc[-1])


@pytest.mark.parametrize(
    "options, option, allowed",
    [
        ({"gar": "krumm"}, "--gar", "allowed: "),
        ({"attack": "litle"}, "--attack", "allowed: "),
        ({"epsilon": 1.5}, "--epsilon", "< 1"),
        ({"epsilon": 0}, "--epsilon", "> 0"),
        ({"delta": 2}, "--delta", "< 1"),
        ({"gar": "krum", "workers": 7, "byzantine": 3}, "--byzantine", "n >= 2f + 3"),
        ({"batch_size": 100000}, "--batch-size", "exceeds"),
        ({"device": "cuda:0"}, "--device", "unavailable"),
        ({"dataset": "imagenet"}, "--dataset", "allowed: "),
        ({"model": "cnn"}, "--model", "images"),
        ({"clip_mode": "sample"}, "--clip-mode", "allowed: batch, per-example"),
        ({"workers": "many"}, "--workers", "integer"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, capsys, options, option, allowed):
    out = tmp_path / "never.parquet"
    if torch.cuda.is_available() and option == "--device":
        pytest.skip("a CUDA device exists here")
    assert run_cli(train_args(out, **options)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dpbr: error:")
    assert option in err and allowed in err
    assert not out.exists()
    assert not any(p.suffix == ".parquet" for p in tmp_path.rglob("*"))


def test_unwritable_output_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run_cli(train_args(blocker / "out.parquet")) == 2
    assert "--out: cannot write" in capsys.readouterr().err


def test_killed_run_leaves_no_file_and_a_rerun_gives_the_same_result(tmp_path):
    out = tmp_path / "killed.parquet"
    args = train_args(out, steps=100000, eval_every=0)
    args.remove("--quiet")
    proc = subprocess.Popen([sys.executable, "-m", "dpbr", *args], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.time() + 120
    for line in proc.stderr:  # wait until training runs
        if "step" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert run_cli(train_args(out, steps=10)) == 0
    assert run_cli(train_args(tmp_path / "again.parquet", steps=10)) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out)[METRICS], pd.read_parquet(tmp_path / "again.parquet")[METRICS])


def _oracle(model: str, dataset: str) -> tuple[GradientOracle, torch.Tensor, torch.Tensor]:
    from dpbr import data

    spec = RunSpec.create(dataset=dataset, model=model, workers=3, byzantine=0, batch_size=5, steps=1)
    ds = data.load(dataset, None)
    sim = Simulation(spec, ds, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(ds.y_train.shape[0], (3, 5), generator=g)
    return sim.oracle, ds.x_train[idx], ds.y_train[idx]


@pytest.mark.parametrize("model, dataset", [("logit", VECTORS), ("cnn", IMAGES)])
def test_gradient_strategies_agree_with_independent_backward_passes(model, dataset):
    oracle, x, y = _oracle(model, dataset)
    results = {}
    for strategy in ("loop", "vmap", "closed-form"):
        if strategy == "closed-form" and model != "logit":
            continue
        oracle.strategy = strategy
        results[strategy] = oracle.batch_gradients(x, y)
    expected = []
    for i in range(3):  # reference: a fresh backward pass per worker
        oracle.model.zero_grad()
        oracle.loss(oracle.model(x[i]), y[i]).backward()
        expected.append(torch.cat([p.grad.reshape(-1) for p in oracle.model.parameters()]))
    expected_t = torch.stack(expected)
    for strategy, (grads, losses) in results.items():
        torch.testing.assert_close(grads, expected_t, rtol=1e-5, atol=1e-7, msg=strategy)
        assert losses.shape == (3,)


def test_per_example_clipping_with_a_huge_norm_is_the_batch_gradient_and_clips_each_example():
    oracle, x, y = _oracle("logit", VECTORS)
    batch, _ = oracle.batch_gradients(x, y)
    unclipped, _ = oracle.clipped_per_example_gradients(x, y, clip=1e9)
    torch.testing.assert_close(unclipped, batch, rtol=1e-5, atol=1e-8)
    oracle.chunk = 4  # chunks that straddle workers must give the same answer
    tiny, _ = oracle.clipped_per_example_gradients(x, y, clip=1e-6)
    assert (torch.linalg.vector_norm(tiny, dim=1) <= 1e-6 * (1 + 1e-5)).all()


# ----------------------------------------------------------------------------------------------- #
# Speed paths (issue 3): they must not change what is computed.


def _sim(**options: object) -> Simulation:
    from dpbr import data

    base = dict(dataset=VECTORS, model="logit", workers=7, byzantine=2, batch_size=16, steps=30, eval_every=0,
                seed=3, gar="mda", attack="little(factor=1.5,negative=true)", epsilon=0.5)
    base.update(options)
    spec = RunSpec.create(**base)
    return Simulation(spec, data.load(str(spec.dataset), None), torch.device("cpu"))


def test_logistic_fast_path_is_bit_identical_to_the_models_closed_form():
    sim = _sim()
    assert sim.logistic is not None
    theta = sim.oracle.theta
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theta.add_(torch.randn(theta.shape, generator=gen))  # away from the initial point
        for b in (1, 7, 16):
            idx = torch.randint(sim.n_train, (5, b), generator=gen)
            want, want_loss = sim.model.worker_gradients(sim.data.x_train[idx], sim.data.y_train[idx])
            x, y = sim.logistic.gather(idx)
            out = torch.empty(5, sim.dim)
            got, got_loss = sim.logistic(x, y, out=out)
            assert got is out and torch.equal(got, want) and torch.equal(got_loss, want_loss)
            # integer labels (the label-flip attack's own gradients) give the same numbers
            assert torch.equal(sim.logistic(x, sim.data.y_train[idx])[0], want)


@pytest.mark.parametrize("partition", ["iid", "shards"])
def test_window_draw_of_indices_equals_per_step_draws(partition):
    a, b = _sim(partition=partition), _sim(partition=partition)
    per_step = torch.stack([a.sampler.sample(range(5)) for _ in range(7)])
    scratch, out = torch.empty(5, 9, 16, dtype=torch.int64), torch.empty(9, 5, 16, dtype=torch.int64)
    window = b.sampler.sample_window(range(5), 7, scratch, out)
    assert torch.equal(window, per_step)
    assert torch.equal(a.sampler.sample(range(5)), b.sampler.sample(range(5)))  # the generators end in the same state


def test_window_metrics_match_a_direct_float64_computation():
    gen = torch.Generator().manual_seed(1)
    c, h, f, d = 3, 4, 2, 10
    losses = torch.rand(c, h, generator=gen)
    clean = torch.randn(c, h, d, generator=gen)
    sent = clean + 0.5 * torch.randn(c, h, d, generator=gen)
    byz = torch.randn(c, f, d, generator=gen)
    agg = torch.randn(c, d, generator=gen)
    disp = torch.randn(c, d, generator=gen)
    selected = torch.tensor([[True] * h + [False] * f, [True] * (h - 1) + [False, True, True],
                             [False] * h + [True, False]])
    vectors = torch.empty(c, 5, d)
    vectors[:, 1], vectors[:, 3] = agg, disp
    from dpbr.simulation import window_metrics

    got = window_metrics(losses, sent, clean, byz, selected, vectors)
    S, C, B, A, T = (t.double() for t in (sent, clean, byz, agg, disp))
    g, gc, gb = S.mean(1), C.mean(1), B.mean(1)

    def cos(u, v):
        return (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))

    dev = ((S - g[:, None]) ** 2).sum((1, 2)).div(h - 1).sqrt()
    dev_c = ((C - gc[:, None]) ** 2).sum((1, 2)).div(h - 1).sqrt()
    want = torch.stack([losses.double().mean(1), g.norm(dim=1), dev, dev / g.norm(dim=1), gc.norm(dim=1), dev_c,
                        A.norm(dim=1), cos(A, g), cos(A, gb), T.norm(dim=1),
                        torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)], dim=1)
    assert got.shape == (c, len(STEP_COLUMNS)) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # no attack, no separate clean copy, one honest row: NaN where undefined, clean = sent
    vectors = torch.empty(c, 4, d)
    vectors[:, 1], vectors[:, 3] = agg, disp
    one = window_metrics(losses[:, :1], sent[:, :1], None, None, None, vectors)
    cols = {name: one[:, j] for j, name in enumerate(STEP_COLUMNS)}
    for name in ("honest_deviation", "vn_ratio", "honest_deviation_clean", "cos_aggregate_attack", "byzantine_selected"):
        assert torch.isnan(cols[name]).all(), name
    torch.testing.assert_close(cols["honest_norm_clean"], cols["honest_norm"])
    torch.testing.assert_close(cols["honest_norm"], S[:, 0].norm(dim=1), rtol=1e-6, atol=0)


def test_long_vector_metrics_are_accurate():
    # float32 sums over 6 × 431,080 numbers: blocked, they stay within 1e-6 of the float64 value
    gen = torch.Generator().manual_seed(2)
    h, d = 6, 431_080
    sent = torch.randn(1, h, d, generator=gen)
    vectors = torch.randn(1, 4, d, generator=gen)
    from dpbr.simulation import window_metrics

    for spread in (1.0, 1e-3):  # far-apart rows (Σ‖g_i‖² − h‖ḡ‖²) and nearly equal ones (centred rows)
        rows = 3.0 + spread * sent
        got = window_metrics(torch.zeros(1, h), rows, None, None, None, vectors)[0]
        S = rows.double()[0]
        dev = (S - S.mean(0)).pow(2).sum().div(h - 1).sqrt()
        assert abs(float(got[2]) / float(dev) - 1) < 2e-5, spread
        assert abs(float(got[1]) / float(S.mean(0).norm()) - 1) < 1e-6


def test_windowed_and_per_step_runs_give_the_same_trajectory_and_metrics(monkeypatch):
    from dpbr.simulation import engine

    windowed = _sim(steps=23).run()  # 23 steps: a window of 50 cut short
    monkeypatch.setattr(engine, "WINDOW_MAX_ENTRIES", 0)  # a window of one step
    per_step = _sim(steps=23).run()
    assert windowed.steps_done == per_step.steps_done == 23
    torch.testing.assert_close(windowed.metrics, per_step.metrics, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert windowed.evaluations == per_step.evaluations  # the same θ, bit for bit


def test_copies_gram_is_the_gram_matrix_of_the_stack():
    from dpbr.simulation import copies_gram

    G = torch.randn(11, 9_000, generator=torch.Generator().manual_seed(5))
    G[7:] = G[6]  # rows 6..10: one vector and its copies (h = 6)
    exact = G.double() @ G.double().T
    K, K64 = copies_gram(G, 6)
    assert K.dtype == torch.float32 and K.shape == (11, 11)
    assert K64.dtype == torch.float64 and K64.shape == (7, 7)
    scale = float(exact.diagonal().max())
    torch.testing.assert_close(K.double(), exact, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(K64, exact[:7, :7], rtol=0, atol=1e-6 * scale)  # float32 blocks summed in float64
    assert torch.equal(K[6:, 6:], K[6, 6].expand(5, 5))  # distances between copies are exactly 0


def _gram_case(h: int, f: int, d: int, seed: int, *, spread: float = 1.0, clean: bool = True):
    """Honest rows (clean and as sent), f copies of one Byzantine vector, θ − θ₀; float32."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen)
    clean_rows = base + spread * torch.randn(h, d, generator=gen)
    sent = clean_rows + 0.7 * torch.randn(h, d, generator=gen) if clean else clean_rows
    stacked = torch.cat([sent, (-1.5 * base).expand(f, d)])
    return stacked, clean_rows if clean else None, torch.randn(d, generator=gen), torch.rand(h, generator=gen)


@pytest.mark.parametrize("clean", [True, False])
@pytest.mark.parametrize("chosen", [[0, 1, 2, 3, 4, 5], [0, 2, 3, 7, 8, 9], [1], [6, 9]])
def test_metrics_from_the_gram_matrix_equal_the_metrics_from_the_vectors(chosen, clean):
    from dpbr.simulation import copies_gram, gram_step_metrics, window_metrics

    h, f, d = 6, 5, 50_000
    stacked, clean_rows, disp, losses = _gram_case(h, f, d, 7, clean=clean)
    selected = torch.zeros(h + f, dtype=torch.bool)
    selected[chosen] = True
    aggregate = stacked[selected].mean(0)
    _, K64 = copies_gram(stacked, h)
    got = gram_step_metrics(losses, K64, selected, clean_rows, disp, mean_out=torch.empty(d),
                            scratch=torch.empty(h, d))
    vectors = torch.empty(1, 5 if clean else 4, d)
    vectors[0, 1], vectors[0, 3] = aggregate, disp
    want = window_metrics(losses[None], stacked[None, :h], None if clean_rows is None else clean_rows[None],
                          stacked[None, h:], selected[None], vectors)
    assert got is not None and got.shape == (1, len(STEP_COLUMNS)) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and against float64 from the definitions
    S, A, B = stacked[:h].double(), aggregate.double(), stacked[h].double()
    g = S.mean(0)
    assert float(got[0, 1]) == pytest.approx(float(g.norm()), rel=1e-6)
    assert float(got[0, 2]) == pytest.approx(float((S - g).pow(2).sum().div(h - 1).sqrt()), rel=1e-5)
    assert float(got[0, 7]) == pytest.approx(float(A @ g / (A.norm() * g.norm())), abs=1e-6)
    assert float(got[0, 8]) == pytest.approx(float(A @ B / (A.norm() * B.norm())), abs=1e-6)
    assert float(got[0, 10]) == pytest.approx(sum(c >= h for c in chosen) / f)


def test_metrics_from_the_gram_matrix_step_aside_where_the_sums_lose_precision():
    from dpbr.simulation import copies_gram, gram_step_metrics

    h, f, d = 6, 5, 20_000
    work = dict(mean_out=torch.empty(d), scratch=torch.empty(h, d))
    everyone = torch.tensor([True] * h + [False] * f)

    def metrics(stacked, selected=everyone):
        return gram_step_metrics(torch.zeros(h), copies_gram(stacked, h)[1], selected, None, torch.zeros(d), **work)

    stacked, *_ = _gram_case(h, f, d, 8, clean=False)
    assert metrics(stacked) is not None
    nearly_equal = _gram_case(h, f, d, 8, spread=1e-3, clean=False)[0]  # deviation 1e-3 of the norms
    assert metrics(nearly_equal) is None
    opposite = stacked.clone()
    opposite[h // 2:h] = -opposite[:h // 2] + 1e-4 * opposite[h // 2:h]  # ḡ ≈ 0: the sum cancels
    assert metrics(opposite) is None
    broken = stacked.clone()
    broken[2, 5] = math.nan  # a non-finite honest row
    assert metrics(broken) is None
    # a non-finite Byzantine vector the rule left out: the honest and aggregate columns stay finite
    nan_byz = stacked.clone()
    nan_byz[h:] = math.nan
    row = metrics(nan_byz)
    assert row is not None and math.isnan(float(row[0, 8])) and float(row[0, 10]) == 0.0
    assert torch.isfinite(row[0, :8]).all()


def test_simulation_takes_the_metrics_from_the_gram_matrix_and_they_match_the_vectors(monkeypatch):
    from dpbr.simulation import engine, metrics

    monkeypatch.setattr(engine, "WINDOW_MAX_ENTRIES", 0)  # a window of one step: the large-model path
    used = []
    real = metrics.gram_step_metrics
    monkeypatch.setattr(engine, "gram_step_metrics", lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    from_gram = _sim(steps=12).run()
    assert len(used) == 12 and all(row is not None for row in used)
    monkeypatch.setattr(engine, "gram_step_metrics", lambda *a, **k: None)
    from_vectors = _sim(steps=12).run()
    torch.testing.assert_close(from_gram.metrics, from_vectors.metrics, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert from_gram.evaluations == from_vectors.evaluations  # the same θ

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("model, dataset", [("logit", VECTORS), ("cnn", IMAGES)])
def test_a_cuda_run_without_noise_follows_the_cpu_run(model, dataset):
    """The batches come from CPU generators on every device, so without noise a CUDA run computes
    the CPU run's steps up to float rounding. cuDNN's convolutions run in TF32 by default (10-bit
    mantissa, relative error ≈ 1e-3 per product) and lr 2 with momentum 0.99 amplifies it: the
    first step (same θ) agrees to 5e-3, five steps to 2e-2 — a different batch or selection would
    differ by O(1) (seen on an H100: 2.5e-3 at step 3 for the CNN)."""
    from dpbr import data

    spec = RunSpec.create(dataset=dataset, model=model, workers=7, byzantine=2, batch_size=16, steps=5,
                          eval_every=5, seed=3, gar="mda", attack="little(factor=1.5,negative=true)")
    ds = data.load(dataset, None)
    runs = {dev: Simulation(spec, ds.to(dev), torch.device(dev)).run() for dev in ("cpu", "cuda")}
    gpu, cpu = runs["cuda"].metrics, runs["cpu"].metrics
    torch.testing.assert_close(gpu[0], cpu[0], rtol=5e-3, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(gpu, cpu, rtol=2e-2, atol=1e-5, equal_nan=True)
    assert runs["cuda"].steps_done == 5


# ----------------------------------------------------------------------------------------------- #
# The composed ε written by a run, against Opacus' RDP accountant (an independent implementation)


def _opacus_epsilon(rdp, q: float, z: float, steps: int, delta: float, extra_orders=()) -> tuple[float, float]:
    """Opacus' RDP of the subsampled Gaussian (Mironov, Talwar & Zhang 2019, arXiv 1908.10530) and its
    conversion (``rdp``: its analysis module), minimised over a dense grid of orders (its default grid,
    integers to 2,048 geometrically, and ``extra_orders``)."""
    orders = sorted({*(1 + x / 10 for x in range(1, 100)), *(float(a) for a in range(12, 64)),
                     *np.unique(np.round(np.geomspace(64, 2_048, 60))).tolist(), *map(float, extra_orders)})
    curve = rdp.compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
    eps, order = rdp.get_privacy_spent(orders=orders, rdp=curve, delta=delta)
    return float(eps), float(order)


def test_composed_epsilon_is_opacus_rdp_accountant_for_the_runs_parameters(tmp_path, opacus_rdp):
    import warnings

    rdp = opacus_rdp
    out = tmp_path / "eps.parquet"
    epsilon, delta, b, steps, n_train = 0.5, 1e-5, 16, 30, 512
    assert run_cli(train_args(out, epsilon=epsilon, delta=delta, batch_size=b, steps=steps, eval_every=0)) == 0
    frame, meta = pd.read_parquet(out), read_metadata(out)
    got = float(frame["epsilon_composed"].iloc[0])
    assert (frame["epsilon_composed"] == got).all()
    # the documented multiplier: the noise std σ = (2C/b)·sqrt(2 ln(1.25/δ))/ε over the sensitivity 2C/b
    # of the mean; sampling rate b/N
    z, q = math.sqrt(2 * math.log(1.25 / delta)) / epsilon, b / n_train
    order = float(meta["rdp_order"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at_order, _ = rdp.get_privacy_spent(orders=[order], rdp=rdp.compute_rdp(q=q, noise_multiplier=z, steps=steps,
                                                                                 orders=[order]), delta=delta)
        best, best_order = _opacus_epsilon(rdp, q, z, steps, delta, extra_orders=[order])
    assert got == pytest.approx(at_order, rel=1e-6)  # same RDP and conversion at dpbr's order
    assert best <= got * (1 + 1e-9)  # a denser grid can only do as well or better …
    assert got == pytest.approx(best, rel=1e-2)  # … and dpbr's grid lands within 1 % of it
    assert 64 < best_order  # (the optimum lies above Opacus' default grid: the extended grid matters here)
    # steps enter the composition: half the steps, smaller ε
    half = tmp_path / "half.parquet"
    assert run_cli(train_args(half, epsilon=epsilon, delta=delta, batch_size=b, steps=steps // 2, eval_every=0)) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_half, _ = _opacus_epsilon(rdp, q, z, steps // 2, delta,
                                       extra_orders=[read_metadata(half)["rdp_order"]])
    assert float(pd.read_parquet(half)["epsilon_composed"].iloc[0]) == pytest.approx(want_half, rel=1e-2)


def test_composed_epsilon_of_a_split_training_set_uses_each_workers_sampling_rate(tmp_path, opacus_rdp):
    import warnings

    out = tmp_path / "shards.parquet"
    epsilon, delta, b, steps, n_train, h = 0.5, 1e-5, 16, 30, 512, 5  # 7 workers, 2 Byzantine
    assert run_cli(train_args(out, epsilon=epsilon, delta=delta, batch_size=b, steps=steps, eval_every=0,
                              partition="shards", attack="sign-flip")) == 0
    got = float(pd.read_parquet(out)["epsilon_composed"].iloc[0])
    smallest_share = n_train // h  # shards: near-equal contiguous parts of the label-sorted set
    z = math.sqrt(2 * math.log(1.25 / delta)) / epsilon
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, _ = _opacus_epsilon(opacus_rdp, b / smallest_share, z, steps, delta,
                                  extra_orders=[read_metadata(out)["rdp_order"]])
    assert got == pytest.approx(want, rel=1e-2)
