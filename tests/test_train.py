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
