"""The workflow's `vn:` and `reconstruct:` sections and their reports.

Dry-run job counts of the default and paper configurations, a tiny real run on generated data (VN
cells along a training trajectory, reconstruction cells, both reports and the training comparison),
configuration errors, and known answers of the report functions.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dpbr.report import inversion_report, vn_report
from dpbr.spec import ReconSpec, RunSpec, VNSpec, run_token
from tests.test_workflow import REPO, SNAKEFILE, SYNTH, snakemake_api, tiny_config, write_config

IMAGES = "synthetic(n=40,n_test=20)"


# ----------------------------------------------------------------------------------------------- #
# Dry-run job counts


def test_paper_config_counts():
    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    from dpbr.report import grid

    vn = grid.expand(config["vn"], VNSpec, "vn")
    recon = grid.expand(config["reconstruct"], ReconSpec, "reconstruct")
    # logit: 8 b × 5 privacy; CNN: 6 b × 5 privacy
    assert len(vn) == 8 * 5 + 6 * 5
    # DLG: 3 b × 12 defences × 10 seeds; iDLG: 4 defences × 10 seeds; IG: 3 b × 2 defences × 3 seeds
    assert len(recon) == 3 * 12 * 10 + 4 * 10 + 3 * 2 * 3
    assert len(config["vn"]["trajectories"]) == 2


# ----------------------------------------------------------------------------------------------- #
# A tiny real run


def _sections_config() -> dict:
    config = tiny_config()
    config["train"]["grid"] = [{"gar": "average", "attack": "none", "batch_size": [10],
                                "privacy": [{"epsilon": "none"}, {"epsilon": 0.2}]}]
    config["vn"] = {
        "defaults": {"dataset": SYNTH, "model": "logit", "samples": 8, "bootstrap": 100, "reference": 100},
        "grid": [{"batch_size": [10, 40], "epsilon": ["none", 0.2]}],
        "trajectories": [{"train": {"dataset": SYNTH, "model": "logit", "gar": "average", "attack": "none",
                                    "batch_size": 10, "steps": 4}, "steps": [2, 4]}],
    }
    config["reconstruct"] = {
        "defaults": {"dataset": IMAGES, "model": "lenet", "iterations": 2, "seed": 1},
        "grid": [{"defence": ["none", "sparsify(p=0.25)"], "batch_size": [1, 2]},
                 {"noise": [{"batch_size": 1, "defence": "gaussian(epsilon=0.2,delta=1e-06,clip=0.01,batch_size=1)"}]}],
    }
    return config


def report_captions(workdir: Path, configfiles: list[Path]) -> list[tuple[str, str, Path]]:
    """``(rule, file, caption)`` of every file flagged for ``snakemake --report`` among the inputs and
    outputs of every job of the workflow's DAG — the files and captions the report collects."""
    from snakemake.api import SnakemakeApi
    from snakemake.io import get_flag_value, is_flagged
    from snakemake.scheduling.greedy import SchedulerSettings as GreedySettings
    from snakemake.settings.types import (ConfigSettings, ExecutionSettings, OutputSettings, Quietness,
                                          ResourceSettings, SchedulingSettings)

    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                          config_settings=ConfigSettings(configfiles=[Path(c).resolve() for c in configfiles]),
                          snakefile=SNAKEFILE, workdir=Path(workdir))
        wf.dag().execute_workflow(executor="local", pseudo_executor="dryrun", execution_settings=ExecutionSettings(),
                                  scheduling_settings=SchedulingSettings(scheduler="greedy"),
                                  scheduler_settings=GreedySettings())
        return [(job.rule.name, str(f), Path(get_flag_value(f, "report").caption.get_path_or_uri(secret_free=True)))
                for job in wf._workflow.dag.jobs for f in [*job.output, *job.input] if is_flagged(f, "report")]


def test_every_report_caption_resolves_to_the_workflows_report_folder(tmp_path):
    """Train + VN + reconstruction sections (the default config's shape): every file the report collects
    has its caption in workflow/report/, whichever job (producer or rule `all`) the report meets it in.
    Rule `all`'s inputs once carried the report flags with captions resolved from the Snakefile's
    folder (`<repo>/../report/…`), and `snakemake --report` failed after the default run."""
    cfg = write_config(tmp_path / "config.yaml", _sections_config())
    captions = report_captions(tmp_path, [cfg])
    report_dir = (REPO / "workflow" / "report").resolve()
    rules = {rule for rule, _, _ in captions}
    assert rules == {"aggregate", "plot", "vn_report", "reconstruct_report"}  # producers only, not `all`
    for rule, path, caption in captions:
        assert caption.resolve().parent == report_dir and caption.is_file(), (rule, path, caption)
    names = {Path(path).name for _, path, _ in captions}
    assert {"accuracy_vs_ratio.png", "privacy_utility.png", "vn_min_b.csv", "reconstruct_table.csv"} <= names


def test_heterogeneous_data_report_captions_resolve(tmp_path):
    """A grid with non-IID partitions and bucketing (config/bucketing-quick.yaml) adds rule
    hetero_report, whose table and figures have their captions in workflow/report/."""
    captions = report_captions(tmp_path, [REPO / "config" / "bucketing-quick.yaml"])
    report_dir = (REPO / "workflow" / "report").resolve()
    assert {rule for rule, _, _ in captions} == {"aggregate", "plot", "hetero_report"}
    for rule, path, caption in captions:
        assert caption.resolve().parent == report_dir and caption.is_file(), (rule, path, caption)
    names = {Path(path).name for rule, path, _ in captions if rule == "hetero_report"}
    assert names == {"bucketing_table.csv", "bucketing_table.png", "accuracy_by_attack.png", "selections.png"}


@pytest.mark.slow
def test_tiny_run_of_vn_trajectory_and_reconstruction_with_reports(tmp_path):
    cfg = write_config(tmp_path / "config.yaml", _sections_config())
    counts = snakemake_api(tmp_path, [cfg], dryrun=False)
    assert counts["vn"] == 4 * 3  # 4 cells at init and at steps 2 and 4
    assert counts["trajectory"] == 1
    assert counts["reconstruct"] == 5
    results = tmp_path / "results"

    rows = pd.read_parquet(results / "summary" / "vn.parquet")
    assert len(rows) == 12
    token = run_token(RunSpec.create(dataset=SYNTH, model="logit", gar="average", attack="none", batch_size=10, steps=4))
    assert set(rows["run"]) == {"init", token}
    assert sorted(set(rows.loc[rows["run"] == token, "step"])) == [2, 4]
    assert (tmp_path / "results" / "trajectories" / f"{token}.ckpt" / "step=4.pt").is_file()
    min_b = pd.read_csv(results / "summary" / "vn_min_b.csv")
    assert {"mda", "median", "krum", "bulyan"} <= set(min_b["rule"])

    table = pd.read_csv(results / "summary" / "reconstruct_table.csv")
    assert len(table) == 5 and set(table["seeds"]) == {1}
    for name in ("psnr_vs_batch", "success_vs_batch", "privacy_utility"):
        for fmt in ("html", "png"):
            assert (results / "figures" / "reconstruct" / f"{name}.{fmt}").stat().st_size > 1000
    for name in ("ratio_vs_b", "accuracy_vs_ratio"):
        assert (results / "figures" / "vn" / f"{name}.png").stat().st_size > 1000
    html = (results / "figures" / "vn" / "ratio_vs_b.html").read_text()
    assert "<script" in html and "cdn.jsdelivr" not in html  # self-contained: works offline
    pngs = list((results / "reconstruct").rglob("*.png"))
    assert len(pngs) == 5

    # the offline report of all three sections, as the README builds it
    report = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory",
                             str(tmp_path), "--configfile", str(cfg), "--report", "results/report.html"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-3000:]
    html = (results / "report.html").read_text()
    for caption in ("vn_accuracy_vs_ratio", "vn_min_b", "reconstruct_privacy_utility", "accuracy"):
        first_words = " ".join((REPO / "workflow" / "report" / f"{caption}.rst").read_text().split()[:4])
        assert first_words in html, caption
    assert not re.search(r"<script[^>]+src=[\"']https?:", html)  # offline


def test_tiny_run_of_one_vn_and_one_reconstruction_cell(tmp_path):
    """Fast version without training cells: the reports leave out the training comparisons."""
    config = {"device": "cpu", "plots": {"formats": ["html"]},
              "vn": {"defaults": {"dataset": SYNTH, "model": "logit", "samples": 4, "bootstrap": 0, "reference": 50},
                     "grid": [{"batch_size": [10]}]},
              "reconstruct": {"defaults": {"dataset": IMAGES, "model": "lenet", "iterations": 1},
                              "grid": [{"defence": ["none"]}]}}
    cfg = write_config(tmp_path / "config.yaml", config)
    counts = snakemake_api(tmp_path, [cfg], dryrun=False)
    assert counts["vn"] == 1 and counts["reconstruct"] == 1 and "train" not in counts
    figures = tmp_path / "results" / "figures"
    assert sorted(p.name for p in (figures / "vn").iterdir()) == ["ratio_vs_b.html"]
    assert sorted(p.name for p in (figures / "reconstruct").iterdir()) == ["psnr_vs_batch.html", "success_vs_batch.html"]
    row = pd.read_parquet(tmp_path / "results" / "summary" / "vn.parquet").iloc[0]
    assert row["batch_size"] == 10 and row["samples"] == 4


def test_checkpoint_state_is_refused_with_the_key(tmp_path):
    config = _sections_config()
    config["reconstruct"]["defaults"]["state"] = "runs/x.ckpt/step=1.pt"
    cfg = write_config(tmp_path / "config.yaml", config)
    with pytest.raises(Exception, match="a grid cell attacks the initial model; name the training run and its "
                                        "steps under reconstruct.trajectories"):
        snakemake_api(tmp_path, [cfg], dryrun=True)


def _recon_trajectory_config() -> dict:
    """Two reconstruction cells (b = 1, 2) of LeNet on generated images, also attacked at steps 2 and 4 of
    one training run of the same dataset and model."""
    run = {"dataset": IMAGES, "model": "lenet", "gar": "average", "attack": "none", "workers": 3, "byzantine": 0,
           "batch_size": 4, "steps": 4, "eval_every": 0, "lr": 0.1, "momentum": 0.0}
    return {"device": "cpu", "plots": {"formats": ["html"]},
            "reconstruct": {"defaults": {"dataset": IMAGES, "model": "lenet", "iterations": 2, "seed": 1},
                            "grid": [{"batch_size": [1, 2]}],
                            "trajectories": [{"train": run, "steps": [2, 4]}]}}


def test_reconstruct_cells_at_training_checkpoints_dry_run(tmp_path):
    """The cells at each checkpoint join the grid, name the step and the run in their ids, and wait for the
    training job that writes the checkpoints."""
    cfg = write_config(tmp_path / "config.yaml", _recon_trajectory_config())
    counts = snakemake_api(tmp_path, [cfg], dryrun=True)
    assert counts["trajectory"] == 1 and counts["reconstruct"] == 2 * 3  # initial, step 2, step 4
    run = RunSpec.create(**_recon_trajectory_config()["reconstruct"]["trajectories"][0]["train"])
    state = f"results/trajectories/{run_token(run)}.ckpt/step=4.pt"
    spec = ReconSpec.create(dataset=IMAGES, model="lenet", iterations=2, seed=1, batch_size=1, state=state)
    assert f"state={run_token(run)}-step=4-" in spec.cell_id()  # the run and the step
    bad = _recon_trajectory_config()
    bad["reconstruct"]["trajectories"][0]["train"]["model"] = "cnn"
    with pytest.raises(Exception, match="no reconstruct cell has the run's dataset and model"):
        snakemake_api(tmp_path, [write_config(tmp_path / "bad.yaml", bad)], dryrun=True)


@pytest.mark.slow
def test_reconstruct_at_training_checkpoints_runs_and_reruns_when_they_change(tmp_path):
    cfg = write_config(tmp_path / "config.yaml", _recon_trajectory_config())
    counts = snakemake_api(tmp_path, [cfg], dryrun=False)
    assert counts["trajectory"] == 1 and counts["reconstruct"] == 6
    table = pd.read_parquet(tmp_path / "results" / "summary" / "reconstruct.parquet")
    states = set(table["state"])
    assert len(states) == 3 and "initial" in states and any(s.endswith("step=2.pt") for s in states)
    assert snakemake_api(tmp_path, [cfg], dryrun=True).get("total", 0) == 0  # nothing left to do
    # new checkpoints (the training job rerun by hand): the cells attacking them rerun, the others do not
    run = RunSpec.create(**_recon_trajectory_config()["reconstruct"]["trajectories"][0]["train"])
    folder = tmp_path / "results" / "trajectories" / f"{run_token(run)}.ckpt"
    import os
    import time
    later = time.time() + 5
    stamp = folder / ".snakemake_timestamp"  # what Snakemake dates a directory output by
    for path in (folder, *([stamp] if stamp.exists() else [])):
        os.utime(path, (later, later))
    counts = snakemake_api(tmp_path, [cfg], dryrun=True)
    assert counts["reconstruct"] == 4 and "trajectory" not in counts


def test_trajectory_steps_beyond_the_run_are_refused(tmp_path):
    config = _sections_config()
    config["vn"]["trajectories"][0]["steps"] = [2, 9]
    cfg = write_config(tmp_path / "config.yaml", config)
    with pytest.raises(Exception, match=r"vn.trajectories\[0\].steps: 9 is beyond the run's 4 steps"):
        snakemake_api(tmp_path, [cfg], dryrun=True)


def test_bad_vn_value_names_the_key(tmp_path):
    config = _sections_config()
    config["vn"]["grid"][0]["epsilon"] = ["none", 2]
    cfg = write_config(tmp_path / "config.yaml", config)
    with pytest.raises(Exception, match=r"vn.grid\[0\].epsilon"):
        snakemake_api(tmp_path, [cfg], dryrun=True)


# ----------------------------------------------------------------------------------------------- #
# Report functions: known answers


def test_recon_spec_command_line_round_trips_through_the_cli(tmp_path, capsys):
    from dpbr.cli import main

    spec = ReconSpec.create(dataset=IMAGES, model="lenet", normalize=False, iterations=1, batch_size=1)
    out = tmp_path / "r.parquet"
    main(["reconstruct", *spec.cli_args(), "--out", str(out), "--quiet"])
    row = pd.read_parquet(out).iloc[0]
    assert not bool(row["normalize"]) and row["cell_id"] == spec.cell_id()


@pytest.mark.parametrize("defence, label", [
    (None, "none"), ("none", "none"),
    ("gaussian(batch_size=4,clip=0.01,delta=1e-06,epsilon=0.2)", "ε=0.2"),
    ("sparsify(p=0.25)", "sparsify=0.25"),
    ("quantize(bits=8,kind=uniform)", "quantize=uniform(bits=8)"),
    ("gaussian(sigma=0.01)", None),
    ("clip(c=1)+gaussian(sigma=0.1)", None),
    # the whole training pipeline, as `dpbr reconstruct --epsilon … --clip …` writes it
    ("clip(c=0.01,mode=batch)+gaussian(batch_size=4,clip=0.01,delta=1e-06,epsilon=0.5)+sparsify(p=0.1)",
     "ε=0.5 + sparsify=0.1"),
    ("sparsify(p=0.2)+clip(c=1)", None),        # not the training order
    ("clip(c=1)+quantize(kind=sign)", "quantize=sign"),
])
def test_defence_maps_to_the_training_privacy_label(defence, label):
    assert inversion_report.defence_privacy(defence) == label


def test_reconstruct_takes_a_training_privacy_setting():
    """``--epsilon/--clip`` give the training cell's pipeline at the attacked batch size, and the
    reconstruction's privacy label is the training cell's."""
    recon = ReconSpec.create(dataset=IMAGES, model="lenet", batch_size=4, epsilon=0.2, clip=0.01)
    assert recon.defence == "clip(c=0.01,mode=batch)+gaussian(batch_size=4,clip=0.01,delta=1e-06,epsilon=0.2)"
    train = RunSpec.create(dataset="synthetic(d=8,classes=2,n=400,n_test=40)", model="logit", epsilon=0.2,
                           clip=0.01, batch_size=4)
    assert recon.privacy.label() == train.privacy.label() == "ε=0.2"
    assert recon.privacy.mechanism_spec() == recon.defence
    # a raw mechanism has no training setting
    assert ReconSpec.create(dataset=IMAGES, model="lenet", defence="gaussian(sigma=0.01)").privacy is None
    plain = ReconSpec.create(dataset=IMAGES, model="lenet")
    assert plain.defence is None and plain.privacy.label() == "none"


def _image_rows(psnrs: list[float], **fields) -> pd.DataFrame:
    n = len(psnrs)
    mse = [10 ** (-p / 10) for p in psnrs]
    base = dict(dataset="mnist", model="lenet", normalize=True, state="initial", attack="dlg", labels="soft",
                defence="none", batch_size=1, iterations=300, restarts=1, lr=1.0, tv=0.0)
    base.update(fields)
    return pd.DataFrame({**{k: [v] * n for k, v in base.items()}, "seed": list(range(1, n + 1)), "psnr": psnrs,
                         "mse": mse, "ssim": [0.5] * n, "label_correct": [True] * (n - 1) + [False],
                         "status": ["ok"] * n, "seconds": [1.0] * n,
                         **{f"success_{t}": [m < float(t) for m in mse] for t in ("1e-2", "1e-3", "1e-4")}})


def test_reconstruction_table_reduces_over_seeds():
    rows = pd.concat([_image_rows([10, 20, 30, 40]), _image_rows([5, 5], defence="sparsify(p=0.5)")])
    table = inversion_report.reconstruction_table(rows).set_index("defence")
    assert table.loc["none", "seeds"] == 4 and table.loc["none", "psnr_median"] == 25
    assert table.loc["none", "psnr_q25"] == pytest.approx(17.5)
    # PSNR 10/20/30/40 dB ↔ MSE 1e-1/1e-2/1e-3/1e-4: below 1e-3 only the 40 dB image (strict)
    assert table.loc["none", "success_1e-3"] == pytest.approx(0.25)
    assert table.loc["none", "success_1e-2"] == pytest.approx(0.5)
    assert table.loc["none", "label_accuracy"] == pytest.approx(0.75)
    assert table.loc["sparsify(p=0.5)", "psnr_median"] == 5


def test_privacy_utility_joins_matching_settings_only():
    rows = pd.concat([_image_rows([30, 40]), _image_rows([3, 5], defence="gaussian(batch_size=1,clip=0.01,delta=1e-06,epsilon=0.2)"),
                      _image_rows([8], defence="gaussian(sigma=0.1)")])
    table = inversion_report.reconstruction_table(rows)
    final = pd.DataFrame({"dataset": ["mnist"] * 3, "model": ["cnn"] * 3, "pair": ["average/none"] * 3,
                          "privacy": ["none", "ε=0.2", "ε=0.5"], "batch_size": [10] * 3,
                          "accuracy_mean": [0.9, 0.2, 0.5]})
    joined = inversion_report.privacy_utility_table(table, final).set_index("privacy")
    assert set(joined.index) == {"none", "ε=0.2"}
    assert joined.loc["none", "psnr"] == 35 and joined.loc["none", "accuracy_mean"] == 0.9
    assert joined.loc["ε=0.2", "psnr"] == 4


def _vn_rows(ratios: dict[int, float], privacy_eps=None) -> pd.DataFrame:
    b = sorted(ratios)
    r = [ratios[x] for x in b]
    return pd.DataFrame({"dataset": "phishing", "model": "logit", "run": "init", "step": 0, "epsilon": privacy_eps,
                         "sparsify": None, "batch_size": b, "vn_ratio": r, "vn_ratio_ci_low": [x * 0.9 for x in r],
                         "vn_ratio_ci_high": [x * 1.1 for x in r], "privacy": "none", "parameters": "init"})


def test_crossing_is_the_interpolated_minimal_b_inside_the_range():
    rows = _vn_rows({10: 4.0, 100: 0.4})
    k = 0.8
    min_b = pd.DataFrame({"dataset": ["phishing"], "model": ["logit"], "run": ["init"], "step": [0], "privacy": ["none"],
                          "rule": ["mda"], "byzantine": [5], "k": [k], "min_b": [50.0]})
    cross = vn_report.crossings(rows, min_b)
    assert len(cross) == 1 and cross.iloc[0]["min_b"] == 50.0 and cross.iloc[0]["label"] == "mda f=5"
    outside = min_b.assign(min_b=500.0)
    assert vn_report.crossings(rows, outside).empty


def test_join_accuracy_uses_the_rules_bound_and_the_same_cell():
    rows = _vn_rows({10: 3.0, 50: 0.3})
    final = pd.DataFrame({"dataset": ["phishing"] * 3, "model": ["logit"] * 3, "batch_size": [10, 50, 50],
                          "privacy": ["none"] * 3, "pair": ["mda/little", "mda/little", "average/none"],
                          "gar": ["mda", "mda", "average"], "workers": [11] * 3, "byzantine": [5] * 3,
                          "accuracy_mean": [0.5, 0.9, 0.95], "accuracy_std": [0.0] * 3, "runs": [3] * 3})
    joined = vn_report.join_accuracy(rows, final).sort_values(["pair", "batch_size"])
    mda = joined[joined["gar"] == "mda"]
    assert list(mda["vn_ratio"]) == [3.0, 0.3]
    assert mda["k"].iloc[0] == pytest.approx(0.4242640687, rel=1e-9)  # MDA at n=11, f=5
    assert list(mda["holds"]) == [False, True]
    assert math.isnan(joined[joined["gar"] == "average"]["k"].iloc[0])  # average: no positive bound
