"""VNSpec validation and naming, and the ``dpbr vn`` command (synthetic data: no data folder needed)."""

import pandas as pd
import pytest
import torch

from dpbr.cli import main
from dpbr.errors import UsageError
from dpbr.io import read_metadata
from dpbr.spec import RunSpec, VNSpec, run_token

DATA = "synthetic(d=8,classes=2,n=400,n_test=40)"
BASE = ["vn", "--dataset", DATA, "--model", "logit", "--samples", "16", "--bootstrap", "100", "--quiet"]


def _run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr()


# --------------------------------------------------------------------------------------------- spec


def test_vnspec_defaults_and_canonical_forms():
    s = VNSpec.create(dataset="phishing", model="logit", epsilon="inf", sparsify=0, batch_size="50")
    assert (s.epsilon, s.sparsify, s.clip, s.run, s.step, s.samples) == (None, None, 0.01, "init", 0, 64)
    assert s.privacy.label(ascii=True) == "none" and s.privacy.after_clip_spec() is None
    assert s.cell_id().split("/")[1] == "run=init,step=0"
    t = VNSpec.create(dataset="phishing", model="logit", epsilon=0.2, sparsify=0.25, batch_size=100)
    assert t.privacy.label(ascii=True) == "eps=0.2+sparsify=0.25"
    assert t.privacy.after_clip_spec() == "gaussian(batch_size=100,clip=0.01,delta=1e-06,epsilon=0.2)+sparsify(p=0.25)"
    assert VNSpec.from_dict(t.to_dict()) == t
    assert t.path("res").parts[:2] == ("res", "vn")


@pytest.mark.parametrize("options,option", [
    ({"batch_size": 0}, "--batch-size"),
    ({"epsilon": 1.0}, "--epsilon"),
    ({"epsilon": 0.2, "clip": "none"}, "--clip"),
    ({"samples": 1}, "--samples"),
    ({"bootstrap": 50}, "--bootstrap"),
    ({"confidence": 1.5}, "--confidence"),
    ({"run": "xyz"}, "--run"),
    ({"run": "init", "step": 3}, "--step"),
    ({"byzantine": 11}, "--byzantine"),
    ({"clip_mode": "row"}, "--clip-mode"),
    ({"model": "cnn"}, "--model"),  # images model on vector data
    ({"sparsify": 1.0}, "--sparsify"),
    ({"colour": 1}, "--colour"),
])
def test_vnspec_rejects_bad_values_naming_the_option(options, option):
    with pytest.raises(UsageError) as exc:
        VNSpec.create(**{"dataset": "phishing", "model": "logit", **options})
    assert exc.value.option == option


def test_run_token_is_the_same_from_the_spec_and_from_a_checkpoint_dict():
    run = RunSpec.create(dataset="phishing", model="logit", steps=10)
    tok = run_token(run)
    assert tok == run_token(run.to_dict()) and len(tok) == 12 and int(tok, 16) >= 0
    assert tok != run_token(RunSpec.create(dataset="phishing", model="logit", steps=11))
    assert VNSpec.create(dataset="phishing", model="logit", run=tok, step=5).cell_id().split("/")[1] == f"run={tok},step=5"


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_writes_one_file_per_cell_at_the_spec_path(tmp_path, capsys):
    code, _ = _run(BASE + ["--batch-size", "5,20", "--epsilon", "none,0.5", "--root", str(tmp_path)], capsys)
    assert code == 0
    files = sorted(tmp_path.rglob("*.parquet"))
    assert len(files) == 4
    spec = VNSpec.create(dataset=DATA, model="logit", samples=16, bootstrap=100, batch_size=20, epsilon=0.5)
    path = spec.path(tmp_path)
    frame = pd.read_parquet(path)
    assert len(frame) == 1 and frame["cell_id"][0] == spec.cell_id()
    for col in ("vn_ratio", "vn_ratio_ci_low", "vn_ratio_ci_high", "noise_var", "var_clean", "mean_norm",
                "mean_norm_reference", "k_mda", "holds_mda", "batch_size", "epsilon", "privacy", "dim"):
        assert col in frame.columns
    assert frame["noise_var"][0] == pytest.approx(9 * frame["sigma"][0] ** 2)  # d = 8 + 1 bias
    assert read_metadata(path)["spec"]["batch_size"] == 20
    # the spec's own command-line options rebuild the same cell
    code, _ = _run(["vn", *spec.cli_args(), "--quiet", "--root", str(tmp_path / "again")], capsys)
    assert code == 0 and spec.path(tmp_path / "again").is_file()


def test_same_seed_same_result(tmp_path, capsys):
    args = BASE + ["--batch-size", "4,16", "--epsilon", "none,0.3", "--sparsify", "none,0.25"]
    _run(args + ["--out", str(tmp_path / "a.parquet")], capsys)
    _run(args + ["--out", str(tmp_path / "b.parquet")], capsys)
    _run(args + ["--out", str(tmp_path / "c.parquet"), "--seed", "2"], capsys)
    drop = lambda f: f.drop(columns=[c for c in f.columns if c.startswith("seconds")])  # noqa: E731
    a, b, c = (drop(pd.read_parquet(tmp_path / f"{x}.parquet")) for x in "abc")
    assert len(a) == 8
    pd.testing.assert_frame_equal(a, b)
    assert not a["vn_ratio"].equals(c["vn_ratio"])


def _fake_checkpoints(folder, steps=(0, 5, 10)):
    run = RunSpec.create(dataset=DATA, model="logit", steps=10)
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    from dpbr.jobs import checkpoints

    run_id = checkpoints.new_run_id()
    for s in steps:
        theta = torch.randn(9, generator=g) * (1 + s)
        checkpoints.save(folder / f"step={s}.pt", step=s, theta=theta, spec=run.to_dict(), run_id=run_id)
    return run


def test_trajectory_from_a_checkpoint_folder_with_tables(tmp_path, capsys):
    folder = tmp_path / "dataset=x,model=logit.ckpt"  # dpbr train's default folder names hold commas
    run = _fake_checkpoints(folder)
    out, minb, eta = tmp_path / "t.parquet", tmp_path / "m.parquet", tmp_path / "e.parquet"
    code, err = _run(["vn", "--checkpoint", str(folder), "--samples", "16", "--bootstrap", "100",
                      "--batch-size", "4,8,32", "--out", str(out), "--min-b-out", str(minb), "--eta-out", str(eta),
                      "--quiet"], capsys)
    assert code == 0, err.err
    frame = pd.read_parquet(out)
    assert sorted(frame["step"].unique()) == [0, 5, 10]
    assert set(frame["run"]) == {run_token(run)} and set(frame["dataset"]) == {run.dataset}
    m, e = pd.read_parquet(minb), pd.read_parquet(eta)
    assert set(m["rule"]) == {"mda", "median"} and len(m) == 2 * 3  # rules × checkpoints
    assert len(e) == 2 * 3 and set(e["checkpoints"]) == {3}  # rules × batch sizes
    # init and one file, as two options; the file's rows equal those of the folder run
    code, err = _run(["vn", "--checkpoint", "init", "--checkpoint", str(folder / "step=5.pt"), "--samples", "16",
                      "--bootstrap", "100", "--batch-size", "4,8,32", "--out", str(tmp_path / "two.parquet"),
                      "--quiet", "--dataset", DATA], capsys)
    assert code == 0, err.err
    two = pd.read_parquet(tmp_path / "two.parquet")
    assert set(zip(two["run"], two["step"])) == {("init", 0), (run_token(run), 5)}
    a = two[two["step"] == 5].sort_values("batch_size")["vn_ratio"].to_numpy()
    b = frame[frame["step"] == 5].sort_values("batch_size")["vn_ratio"].to_numpy()
    assert (a == b).all()


@pytest.mark.parametrize("extra", [
    ["--batch-size", "0"],
    ["--batch-size", "10,x"],
    ["--batch-size", "10,10"],
    ["--epsilon", "2"],
    ["--epsilon", "0.2", "--clip", "none"],
    ["--model", "krum"],
    ["--gar", "mda"],
    ["--samples", "1"],
    ["--bootstrap", "10"],
    ["--checkpoint", "missing.pt"],
    ["--run", "0123456789ab"],
    ["--batch-size", "100000"],
    ["--reference", "100000"],
    ["--device", "cuda:7"],
    ["--grad-strategy", "magic"],
    ["--chunk", "0"],
    ["--threads", "0"],
])
def test_cli_errors_exit_2_with_one_line_and_no_output(tmp_path, capsys, extra, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, captured = _run(BASE + ["--root", str(tmp_path / "res"), "--out", str(tmp_path / "o.parquet")] + extra, capsys)
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpbr: error: ")
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoints_are_usage_errors(tmp_path, capsys, monkeypatch):
    _fake_checkpoints(tmp_path / "ck")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": [1, 2]}, bad)
    wrong = tmp_path / "wrong.pt"
    run = RunSpec.create(dataset=DATA, model="logit", steps=10)
    torch.save({"step": 1, "theta": torch.zeros(5), "spec": run.to_dict()}, wrong)
    before = set(tmp_path.rglob("*"))
    for args in (["--checkpoint", str(bad)], ["--checkpoint", str(wrong)],
                 ["--checkpoint", str(tmp_path / "ck"), "--dataset", "phishing"],
                 ["--checkpoint", str(tmp_path / "ck" / "step=5.pt"), "--step", "4"],
                 ["--checkpoint", str(tmp_path / "ck" / "step=5.pt") + ",init,init"]):
        code, captured = _run(["vn", "--quiet", "--out", str(tmp_path / "o.parquet")] + args, capsys)
        assert code == 2, args
        assert len(captured.err.strip().splitlines()) == 1
    assert set(tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_phishing_logit_at_initial_parameters(tmp_path, capsys):
    """Real data (the project's phishing mirror in the shared data folder beside the repository; where it is
    absent, a phishing-shaped file made here: 8,404 rows of 30 one-hot features out of 68, as the real
    file's rows are): the study's setting at θ₀. Clipping (C = 0.01) binds for every mini-batch, the
    noise is d·σ², and the ratio falls with b (sqrt(A/b + D/b²) shape)."""
    import gzip
    from pathlib import Path

    import numpy as np

    src = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "phishing-8404.libsvm.gz"
    if not src.is_file():
        rng = np.random.default_rng(0)
        feats = np.sort(np.argsort(rng.random((8404, 68)), axis=1)[:, :30], axis=1) + 1
        labels = ((feats <= 34).sum(axis=1) > 15).astype(int)  # labels that depend on the features
        lines = [f"{y} " + " ".join(f"{j}:0.18257" for j in row) for y, row in zip(labels.tolist(), feats.tolist())]
        src = tmp_path / "phishing-8404.libsvm.gz"
        src.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    code, _ = _run(["data", "fetch", "phishing", "--from", str(src), "--data-dir", str(tmp_path / "data")], capsys)
    out = tmp_path / "p.parquet"
    code, captured = _run(["vn", "--dataset", "phishing", "--model", "logit", "--data-dir", str(tmp_path / "data"),
                           "--batch-size", "10,100,500", "--epsilon", "none,0.2", "--out", str(out), "--quiet"], capsys)
    assert code == 0, captured.err
    f = pd.read_parquet(out).set_index(["batch_size", "privacy"])
    assert (f["clip_fraction"] == 1.0).all()
    assert f.loc[(500, "eps=0.2"), "noise_var"] == pytest.approx(69 * (0.10598 / (500 * 0.2)) ** 2, rel=1e-3)  # σ = 0.10598/(b·ε)
    r = f.xs("none", level="privacy")["vn_ratio"]
    assert r[10] > r[100] > r[500]
    assert f.loc[(10, "eps=0.2"), "vn_ratio"] > 10 * f.loc[(10, "none"), "vn_ratio"]
    assert (f["noise_z"].dropna().abs() < 4).all()
