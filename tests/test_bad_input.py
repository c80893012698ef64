"""Every bad input: one line ``dpbr: error: <option>: …`` on standard error, exit code 2, no output
file, no traceback — and user-facing text that cites papers, not documents users do not have.

The command line runs in this process (``dpbr.cli.main``, as in ``tests/test_vn_cli.py``); two checks
run ``python -m dpbr`` in a subprocess to see the real exit code and standard error end to end.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dpbr.cli import main
from dpbr.errors import UsageError
from dpbr.io import write_parquet
from dpbr.report import grid
from dpbr.spec import ReconSpec, RunSpec, VNSpec

REPO = Path(__file__).resolve().parents[1]
VEC = "synthetic(d=8,classes=2,n=400,n_test=40)"  # vector data for the logistic model: no data folder needed
TRAIN = ["train", "--dataset", VEC, "--model", "logit", "--workers", "3", "--byzantine", "0", "--steps", "1",
         "--batch-size", "4", "--eval-every", "0", "--quiet"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``dpbr <args>`` run in this process."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_one_line_error(args: list[str], option: str, capsys, *, says: str = "") -> str:
    """The command exits with 2 and one standard-error line naming ``option`` (and containing ``says``)."""
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dpbr: error: {option}: "), lines[0]
    assert says in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def cell_table(seed: int = 1, **kw) -> pd.DataFrame:
    """A small ``dpbr train`` cell table (the columns the aggregation reads), written by hand."""
    spec = RunSpec.create(**{"dataset": VEC, "model": "logit", "steps": 4, "eval_every": 2, "seed": seed, **kw})
    frame = pd.DataFrame({"step": np.arange(5, dtype=np.int64),
                          "train_loss": [np.nan, 0.7, 0.6, 0.5, 0.4],
                          "test_accuracy": [0.5, np.nan, 0.6, np.nan, 0.7],
                          "test_loss": [0.7, np.nan, 0.6, np.nan, 0.5],
                          "status": "completed"})
    for key, value in spec.columns().items():
        frame[key] = value
    return frame


@pytest.fixture()
def cell(tmp_path) -> Path:
    path = tmp_path / "cell.parquet"
    write_parquet(cell_table(), path)
    return path


@pytest.fixture()
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


# ----------------------------------------------------------------------------------------------- #
# dpbr aggregate: inputs that are Parquet, but not training cells


def _bad_cells(tmp_path: Path) -> dict[str, Path]:
    good = cell_table()
    files = {
        "other columns": pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}),
        "no seed column": good.drop(columns=["seed"]),
        "no train_loss column": good.drop(columns=["train_loss"]),
        "accuracy as text": good.assign(test_accuracy=good["test_accuracy"].astype(str)),
        "step as text": good.assign(step=good["step"].astype(str)),
        "no rows": good.iloc[:0],
    }
    out = {}
    for name, frame in files.items():
        out[name] = tmp_path / (name.replace(" ", "_") + ".parquet")
        frame.to_parquet(out[name])
    truncated = tmp_path / "truncated.parquet"
    write_parquet(good, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    out["truncated"] = truncated
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    out["empty"] = empty
    return out


@pytest.mark.parametrize("case", ["other columns", "no seed column", "no train_loss column", "accuracy as text",
                                  "step as text", "no rows", "truncated", "empty"])
def test_aggregate_refuses_files_that_are_not_training_cells(case, tmp_path, capsys):
    path = _bad_cells(tmp_path)[case]
    out = tmp_path / "summary"
    line = assert_one_line_error(["aggregate", path, "--out-dir", out], "PATHS", capsys)
    assert path.name in line
    assert not out.exists()


def test_aggregate_refuses_a_mix_of_a_training_cell_and_another_file(cell, tmp_path, capsys):
    other = tmp_path / "vn.parquet"
    pd.DataFrame({"cell_id": ["x"], "step": [0], "vn_ratio": [0.1]}).to_parquet(other)
    out = tmp_path / "summary"
    assert_one_line_error(["aggregate", cell, other, "--out-dir", out], "PATHS", capsys, says="vn.parquet")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- #
# Output folders that are files or cannot be created


@pytest.mark.parametrize("under", [False, True], ids=["is-a-file", "under-a-file"])
def test_aggregate_out_dir_that_cannot_be_a_folder(under, cell, a_file, capsys):
    out = a_file / "summary" if under else a_file
    assert_one_line_error(["aggregate", cell, "--out-dir", out], "--out-dir", capsys, says="a_file")
    assert a_file.read_text() == "not a folder"


@pytest.fixture()
def summary(cell, tmp_path, capsys) -> Path:
    out = tmp_path / "summary"
    assert run_cli(["aggregate", cell, "--out-dir", out, "--quiet"], capsys)[0] == 0
    return out


@pytest.mark.parametrize("under", [False, True], ids=["is-a-file", "under-a-file"])
def test_plot_out_dir_that_cannot_be_a_folder(under, summary, a_file, capsys):
    out = a_file / "figures" if under else a_file
    assert_one_line_error(["plot", "--summary-dir", summary, "--out-dir", out, "--formats", "svg"], "--out-dir",
                          capsys, says="a_file")


@pytest.mark.parametrize("under", [False, True], ids=["is-a-file", "under-a-file"])
def test_data_fetch_data_dir_that_cannot_be_a_folder(under, a_file, tmp_path, capsys):
    source = tmp_path / "phishing.libsvm"
    source.write_text("1 1:1\n")
    out = a_file / "data" if under else a_file
    assert_one_line_error(["data", "fetch", "phishing", "--data-dir", out, "--from", source], "--data-dir", capsys)
    assert a_file.read_text() == "not a folder"


def test_data_fetch_unknown_name_names_the_argument(tmp_path, capsys):
    out = tmp_path / "data"
    assert_one_line_error(["data", "fetch", "phishin", "--data-dir", out], "NAME", capsys, says="phishing")
    assert not out.exists()


@pytest.mark.parametrize("command", ["vn-report", "reconstruct-report"])
@pytest.mark.parametrize("option", ["--summary-dir", "--out-dir"])
def test_report_folders_that_cannot_be_folders(command, option, a_file, tmp_path, capsys):
    # the inputs are checked first, so give each command one valid-looking cell of its kind
    if command == "vn-report":
        cell = tmp_path / "vn.parquet"
        row = VNSpec.create(dataset=VEC, model="logit").columns()
        pd.DataFrame([{**row, "vn_ratio": 0.5, "vn_ratio_ci_low": 0.4, "vn_ratio_ci_high": 0.6}]).to_parquet(cell)
    else:
        cell = tmp_path / "rec.parquet"
        row = ReconSpec.create(dataset="synthetic").columns()
        row.update({"mse": 0.1, "psnr": 10.0, "ssim": 0.5, "success_1e-2": False, "success_1e-3": False,
                    "success_1e-4": False, "label_correct": True, "status": "ok", "seconds": 1.0})
        pd.DataFrame([row]).to_parquet(cell)
    other = "--out-dir" if option == "--summary-dir" else "--summary-dir"
    args = [command, cell, option, a_file / "x", other, tmp_path / "other", "--formats", "svg"]
    assert_one_line_error(args, option, capsys, says="a_file")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("command", ["vn-report", "reconstruct-report"])
def test_report_commands_refuse_cells_of_another_kind_and_a_bad_train_final(command, cell, tmp_path, capsys):
    out = tmp_path / "s"
    # a training cell is neither a VN nor a reconstruction cell
    assert_one_line_error([command, cell, "--summary-dir", out, "--out-dir", out], "PATHS", capsys)
    assert not out.exists()


def test_vn_report_checks_train_final_before_writing_anything(tmp_path, capsys):
    cell = tmp_path / "vn.parquet"
    row = VNSpec.create(dataset=VEC, model="logit").columns()
    pd.DataFrame([{**row, "vn_ratio": 0.5, "vn_ratio_ci_low": 0.4, "vn_ratio_ci_high": 0.6}]).to_parquet(cell)
    final = tmp_path / "final.parquet"
    final.write_bytes(b"PAR1 truncated")
    out = tmp_path / "s"
    assert_one_line_error(["vn-report", cell, "--train-final", final, "--summary-dir", out, "--out-dir", out],
                          "--train-final", capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- #
# dpbr plot on summaries that are not summaries


@pytest.mark.parametrize("damage", ["empty", "truncated", "other table"])
def test_plot_refuses_a_damaged_summary(damage, summary, tmp_path, capsys):
    curves = summary / "curves.parquet"
    if damage == "empty":
        curves.write_bytes(b"")
    elif damage == "truncated":
        curves.write_bytes(curves.read_bytes()[:300])
    else:
        pd.DataFrame({"a": [1]}).to_parquet(curves)
    figures = tmp_path / "figures"
    assert_one_line_error(["plot", "--summary-dir", summary, "--out-dir", figures, "--formats", "svg"],
                          "--summary-dir", capsys, says="curves.parquet")
    assert not figures.exists()


# ----------------------------------------------------------------------------------------------- #
# Numbers: non-finite values and overflow


@pytest.mark.parametrize("value", ["1e39", "inf", "-inf", "nan", "1e400"])
def test_train_lr_must_be_a_finite_float32(value, tmp_path, capsys):
    out = tmp_path / "cell.parquet"
    assert_one_line_error([*TRAIN, "--lr", value, "--out", out], "--lr", capsys)
    assert not out.exists()


def test_a_finite_but_huge_lr_is_accepted_and_the_run_reports_divergence(tmp_path, capsys):
    out = tmp_path / "cell.parquet"
    code, _, err = run_cli([*TRAIN, "--lr", "1e38", "--out", out], capsys)
    assert code == 0, err
    assert set(pd.read_parquet(out)["status"]) <= {"completed", "diverged"}


@pytest.mark.parametrize(("spec_cls", "options", "option"), [
    (RunSpec, {"clip": 1e39}, "--clip"),
    (RunSpec, {"clip": "1e400"}, "--clip"),
    (RunSpec, {"momentum": float("inf")}, "--momentum"),
    (RunSpec, {"lr": 10**400}, "--lr"),
    (RunSpec, {"seed": 10**30}, "--seed"),
    (RunSpec, {"steps": 10**30}, "--steps"),
    (RunSpec, {"workers": 10**30}, "--workers"),
    (RunSpec, {"attack": "little(factor=1e39)", "byzantine": 1}, "--attack"),
    (RunSpec, {"attack": "empire(factor=nan)", "byzantine": 1}, "--attack"),
    (RunSpec, {"gar": "cc(tau=inf)"}, "--gar"),
    (RunSpec, {"partition": "dirichlet(alpha=1e39)"}, "--partition"),
    (RunSpec, {"quantize": "qsgd(levels=99999999999999999999999)"}, "--quantize"),
    (VNSpec, {"clip": 1e39}, "--clip"),
    (VNSpec, {"seed": 10**30}, "--seed"),
    (ReconSpec, {"lr": 1e39, "dataset": "synthetic"}, "--lr"),
    (ReconSpec, {"tv": 1e39, "dataset": "synthetic"}, "--tv"),
    (ReconSpec, {"defence": "gaussian(sigma=1e39)", "dataset": "synthetic"}, "--defence"),
])
def test_numbers_beyond_float32_or_int64_are_refused_naming_the_option(spec_cls, options, option):
    base = {"dataset": VEC, "model": "logit"} if spec_cls is not ReconSpec else {}
    with pytest.raises(UsageError) as exc:
        spec_cls.create(**{**base, **options})
    assert exc.value.option == option
    assert "\n" not in str(exc.value)


def test_threads_beyond_the_limit_are_refused(tmp_path, capsys):
    out = tmp_path / "cell.parquet"
    assert_one_line_error([*TRAIN, "--threads", str(10**20), "--out", out], "Invalid value for '--threads'", capsys)


def test_a_clip_with_a_positive_exponent_builds_a_pipeline_that_parses(tmp_path, capsys):
    # 1e20 printed as "1e+20" put a "+" inside the privacy spec, which also joins mechanisms
    spec = RunSpec.create(dataset=VEC, model="logit", epsilon=0.5, clip=1e20)
    assert "e+" not in spec.privacy.mechanism_spec() and "e+" not in spec.cell_id()
    out = tmp_path / "cell.parquet"
    code, _, err = run_cli([*TRAIN, "--epsilon", "0.5", "--clip", "1e20", "--out", out], capsys)
    assert code == 0, err
    assert out.is_file()


# ----------------------------------------------------------------------------------------------- #
# Options named right


@pytest.mark.parametrize("value", ["uniform(bits=0)", "qsgd(levels=0)", "uniform(bits=64)", "foo", "sign(bits=4)"])
def test_quantize_errors_name_quantize(value, tmp_path, capsys):
    out = tmp_path / "cell.parquet"
    line = assert_one_line_error([*TRAIN, "--quantize", value, "--out", out], "--quantize", capsys)
    assert "--privacy" not in line
    assert not out.exists()


def test_vn_byzantine_without_any_rule_bound_is_refused_with_the_allowed_range(tmp_path, capsys):
    out = tmp_path / "vn.parquet"
    args = ["vn", "--dataset", VEC, "--model", "logit", "--samples", "16", "--bootstrap", "100", "--quiet",
            "--workers", "11", "--byzantine", "6", "--out", out]
    assert_one_line_error(args, "--byzantine", capsys, says="0 .. 5")
    assert not out.exists()


@pytest.mark.parametrize(("n", "f_max"), [(1, 0), (2, 0), (3, 1), (10, 4), (11, 5), (12, 5), (25, 12)])
def test_vn_allowed_byzantine_is_the_largest_f_with_n_at_least_2f_plus_1(n, f_max):
    # MDA and the coordinate-wise median have a VN bound while n >= 2f + 1 (Guerraoui et al. 2021,
    # arXiv 2102.08166); every other rule with a bound needs more workers.
    assert f_max == (n - 1) // 2
    VNSpec.create(dataset=VEC, model="logit", workers=n, byzantine=f_max)
    if f_max + 1 <= n - 1:
        with pytest.raises(UsageError) as exc:
            VNSpec.create(dataset=VEC, model="logit", workers=n, byzantine=f_max + 1)
        assert exc.value.option == "--byzantine" and f"0 .. {f_max}" in exc.value.message


# ----------------------------------------------------------------------------------------------- #
# Workflow grids: a misspelt key


@pytest.mark.parametrize(("section", "spec_cls"), [("train", RunSpec), ("vn", VNSpec), ("reconstruct", ReconSpec)])
def test_grid_key_typo_is_reported_as_an_unknown_key_with_a_suggestion(section, spec_cls):
    with pytest.raises(UsageError) as exc:
        grid.expand({"grid": [{"batch_sizes": [10, 50]}]}, spec_cls, section)
    msg = exc.value.one_line()
    assert msg.startswith(f"{section}.grid[0].batch_sizes: unknown key 'batch_sizes'; did you mean 'batch_size'?")


@pytest.mark.parametrize("value", [[10, 50], 10])
def test_schema_reports_the_grid_key_typo_as_an_unknown_key(value):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    with pytest.raises(WorkflowError) as exc:
        validate({"train": {"grid": [{"batch_sizes": value}]}}, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    msg = grid.schema_error_message(exc.value.__context__)
    assert msg.startswith("train.grid[0].batch_sizes: unknown key 'batch_sizes'; did you mean 'batch_size'?"), msg
    assert "is not of type" not in msg


def test_a_real_bundle_is_still_a_bundle():
    cells = grid.expand({"defaults": {"dataset": VEC, "model": "logit"},
                         "grid": [{"privacy": [{"epsilon": 0.2}, {"sparsify": 0.25}]}]}, RunSpec, "train")
    assert len(cells) == 2


# ----------------------------------------------------------------------------------------------- #
# Noise and sparsification together: composed, in the order clip → noise → sparsify


def test_noise_then_sparsify_is_the_composed_order():
    C, b, eps, delta, p = 1.0, 100, 0.5, 1e-5, 0.25
    spec = RunSpec.create(dataset=VEC, model="logit", epsilon=eps, delta=delta, clip=C, sparsify=p, batch_size=b)
    terms = [t.split("(")[0] for t in spec.privacy.mechanism_spec().split(")+")]
    assert terms == ["clip", "gaussian", "sparsify"]
    from dpbr.privacy import mechanisms

    pipeline = mechanisms.get(spec.privacy.mechanism_spec())
    X = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    Y = pipeline(X, generator=torch.Generator().manual_seed(7))
    # independent: clip each row to norm C, add N(0, σ²) drawn from the same seed, σ of the Gaussian mechanism
    sigma = 2 * C / b * math.sqrt(2 * math.log(1.25 / delta)) / eps
    Xc = X * torch.clamp(C / X.norm(dim=1, keepdim=True), max=1.0)
    Z = (torch.empty(3, 200).normal_(0.0, sigma, generator=torch.Generator().manual_seed(7)) + Xc).numpy()
    Y = Y.numpy()
    kept = Y != 0
    # the kept coordinates are the noised ones (noise came first) ...
    np.testing.assert_allclose(Y[kept], Z[kept], rtol=1e-5, atol=1e-6)
    # ... and the zeroed ones are, per row and sign, the round(p·count) smallest magnitudes of the noised vector
    for z, k in zip(Z, kept):
        for sign in (z > 0, z < 0):
            pruned, left = np.abs(z[sign & ~k]), np.abs(z[sign & k])
            assert len(pruned) == math.floor(p * sign.sum() + 0.5)
            assert pruned.max() <= left.min()


def test_no_shipped_configuration_combines_noise_and_sparsification():
    import yaml

    for path in sorted((REPO / "config").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        for section, spec_cls in (("train", RunSpec), ("vn", VNSpec)):
            cells = grid.expand(config.get(section), spec_cls, section)
            assert not any(c.epsilon is not None and c.sparsify is not None for c in cells.values()), (path, section)


# ----------------------------------------------------------------------------------------------- #
# End to end in a subprocess: exit code, one line, no traceback


@pytest.mark.parametrize(("args", "option"), [
    (["train", "--dataset", VEC, "--model", "logit", "--lr", "1e39"], "--lr"),
    (["train", "--dataset", VEC, "--model", "logit", "--quantize", "uniform(bits=0)"], "--quantize"),
])
def test_subprocess_exit_code_and_one_line(args, option, tmp_path):
    out = tmp_path / "cell.parquet"
    proc = subprocess.run([sys.executable, "-m", "dpbr", *args, "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"dpbr: error: {option}: "), proc.stderr
    assert not out.exists() and not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------------------------- #
# Words a user can follow: no internal documents cited in user-facing text

_INTERNAL = re.compile(r"seed 00\d|REFERENCE|§|\bissue \d|\(issue|DESIGN\.md|\.notes/")


def test_user_facing_text_cites_no_internal_documents():
    roots = [REPO / "dpbr", REPO / "workflow", REPO / "config", REPO / "README.md", REPO / "Snakefile"]
    found = []
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if path.suffix not in ("", ".py", ".md", ".yaml", ".yml", ".smk", ".rst", ".txt") or "__pycache__" in path.parts:
                continue
            for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if _INTERNAL.search(line):
                    found.append(f"{path.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize(("extra", "option", "says"), [
    (["--epsilon", "0.2", "--clip", "0.01", "--defence", "sparsify(p=0.1)"], "--defence", "not both"),
    (["--epsilon", "0.2"], "--clip", "required with --epsilon"),
    (["--clip", "1", "--clip-mode", "per-example"], "--clip-mode", "allowed: batch"),
    (["--epsilon", "2", "--clip", "1"], "--epsilon", ""),
])
def test_reconstruct_training_privacy_options(extra, option, says, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    assert_one_line_error(["reconstruct", "--dataset", "synthetic(n=40,n_test=20)", "--iterations", "1",
                           "--out", out, "--quiet", *extra], option, capsys, says=says)
    assert not out.exists()
