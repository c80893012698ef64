"""The workflow's `train.bundle` setting: several missing cells per job, one file per cell, per-cell reruns.

Fast: dry-run job counts through Snakemake's API, and one tiny real run (2 cells × 3 seeds of the
logistic model on generated data, 10 steps) whose files the later dry runs look at. Slow: the files of
a bundled run equal those of one job per cell, and a bundle whose cell fails at run time fails its
job with a one-line reason while the other bundle's files are complete.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dpbr.jobs.bundles import MAX_BUNDLE, Bundle, chunks, compatibility_key, plan
from dpbr.report import grid
from dpbr.spec import RunSpec
from tests.test_workflow import REPO, SNAKEFILE, SYNTH, snakemake_api, write_config

LITTLE = "little(factor=1.5,negative=true)"
REPORTS = {"aggregate": 1, "plot": 1, "all": 1}


def seeds_config(seeds=(1, 2, 3), bundle="seeds", little_epsilon=None) -> dict:
    """Two cells (average/none, mda/little) × ``seeds``, 10 steps each."""
    mda = {"gar": "mda", "attack": LITTLE, "batch_size": [10], "seed": list(seeds)}
    if little_epsilon is not None:
        mda["epsilon"] = little_epsilon
    return {
        "device": "cpu", "plots": {"formats": ["html"]},
        "train": {"bundle": bundle,
                  "defaults": {"dataset": SYNTH, "model": "logit", "steps": 10, "eval_every": 5},
                  "grid": [{"gar": "average", "attack": "none", "batch_size": [10], "seed": list(seeds)}, mda]},
    }


def specs_of(config: dict) -> list[RunSpec]:
    return list(grid.expand(config["train"], RunSpec, "train").values())


# ----------------------------------------------------------------------------------------------- #
# Planning (no Snakemake)


def test_groups_are_fixed_by_the_configured_cells():
    specs = specs_of(seeds_config())
    assert [len(g) for g in chunks(specs, "none")] == [1] * 6
    seeds = chunks(specs, "seeds")
    assert [[s.seed for s in g] for g in seeds] == [[1, 2, 3], [1, 2, 3]]
    assert all(len({(s.gar, s.attack) for s in g}) == 1 for g in seeds)
    # cells of one dataset and model share a job whatever their rule; the seeds of a cell stay adjacent
    assert [[(s.gar, s.seed) for s in g] for g in chunks(specs, {"cells": 2})] == [
        [("average", 1), ("average", 2)], [("average", 3), ("mda", 1)], [("mda", 2), ("mda", 3)]]
    # cells differing only in the privacy scalars are compatible: adjacent, so the job batches them
    eps = specs_of(seeds_config(seeds=(1,), little_epsilon=[0.1, 0.2, 0.5]))
    mda = [s for s in eps if s.gar == "mda"]
    assert len({compatibility_key(s) for s in mda}) == 1
    assert [[s.gar for s in g] for g in chunks(eps, {"cells": 64})] == [["average", "mda", "mda", "mda"]]
    # another dataset never shares a job
    other = [RunSpec.create(dataset=SYNTH, model="logit", seed=1),
             RunSpec.create(dataset=SYNTH.replace("n=300", "n=200"), model="logit", seed=1)]
    assert [len(g) for g in chunks(other, {"cells": 64})] == [1, 1]
    # a bundle's rule name has one bit per cell of its group: groups stop at MAX_BUNDLE cells
    many = [RunSpec.create(dataset=SYNTH, model="logit", seed=k) for k in range(MAX_BUNDLE + 2)]
    for mode in ("seeds", {"cells": 10_000}):
        assert [len(g) for g in chunks(many, mode)] == [MAX_BUNDLE, 2]
    assert len(Bundle(chunks(many, "seeds")[0], 2 ** MAX_BUNDLE - 1).name) < 100


def test_the_workflow_groups_cells_as_the_batched_engine_does():
    """Within a `{cells: K}` job, the batches are the batched engine's groups (its key needs torch; the
    workflow's not)."""
    from dpbr.simulation.batch import group_key

    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    specs = list(grid.expand(config["train"], RunSpec, "train").values())
    extra = [RunSpec.create(dataset=SYNTH, model="logit", gar="mda", attack=a, epsilon=e, worker_momentum=m, seed=k)
             for a in (LITTLE, "little(factor=3,negative=true)", "little(factor=1.5,negative=false)", "empire")
             for e in (None, 0.2, 0.5) for m in (0.0, 0.9) for k in (1, 2)]

    def partition(key):
        blocks: dict = {}
        for i, s in enumerate(specs + extra):
            blocks.setdefault(key(s), []).append(i)
        return sorted(blocks.values())

    assert partition(compatibility_key) == partition(group_key)
    assert len(partition(group_key)) > 10


def test_only_missing_cells_are_bundled_and_a_bundle_name_rebuilds_it():
    groups = chunks(specs_of(seeds_config()), "seeds")
    present = {groups[0][0].cell_id(), groups[1][0].cell_id(), groups[1][1].cell_id()}
    alone, bundles = plan(groups, lambda s: s.cell_id() not in present)
    # group 0: seeds 2 and 3 missing → one bundle; group 1: only seed 3 missing → alone
    assert [[s.seed for s in b.specs] for b in bundles] == [[2, 3]]
    assert sorted((s.gar, s.seed) for s in alone) == [("average", 1), ("mda", 1), ("mda", 2), ("mda", 3)]
    name = bundles[0].name
    assert name == f"train_bundle_{bundles[0].group_id}_6"
    # a cluster job sees other files (here: none missing) and still rebuilds the bundle it was sent
    _, rebuilt = plan(groups, lambda s: False, [name])
    assert [b.name for b in rebuilt] == [name] and rebuilt[0].specs == bundles[0].specs
    assert Bundle(groups[0], 7).name != name


# ----------------------------------------------------------------------------------------------- #
# Dry runs


@pytest.mark.parametrize(("bundle", "counts"), [
    ("seeds", {"train_bundle": 2}),
    ("none", {"train": 6}),
    ({"cells": 2}, {"train_bundle": 3}),
])
def test_dry_run_counts_per_bundle_setting(tmp_path, bundle, counts):
    cfg = write_config(tmp_path / "c.yaml", seeds_config(bundle=bundle))
    expected = {**counts, **REPORTS, "total": sum(counts.values()) + 3}
    assert snakemake_api(tmp_path, [cfg], dryrun=True) == expected


@pytest.mark.parametrize("bundle", [{"cells": 0}, {"cells": 257}, "seed", {"size": 3}])
def test_bad_bundle_setting_names_the_key(tmp_path, bundle):
    from snakemake.exceptions import WorkflowError

    cfg = write_config(tmp_path / "c.yaml", seeds_config(bundle=bundle))
    with pytest.raises(WorkflowError, match=r"config error: train\.bundle"):
        snakemake_api(tmp_path, [cfg], dryrun=True)


def test_bundle_jobs_get_the_resources_a_profile_gives_rule_train(tmp_path):
    """The slurm-gpu profile sets `set-resources: train: gpu: 1`; bundles are `train` jobs too."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings

    cfg = write_config(tmp_path / "c.yaml", {**seeds_config(), "resources": {"train": {"mem_mb": 1234, "threads": 2}}})
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=2, overwrite_resources={"train": {"gpu": 1}}),
                          config_settings=ConfigSettings(configfiles=[cfg]), snakefile=SNAKEFILE, workdir=tmp_path)
        rules = [r for r in wf._workflow.rules if r.name.startswith("train")]
        seen = {r.name: (r.resources["gpu"].value, r.resources["mem_mb"].value, r.resources["_cores"].value)
                for r in rules}
    assert len(seen) == 3 and set(seen.values()) == {(1, 1234, 2)}, seen


# ----------------------------------------------------------------------------------------------- #
# After a real run: what a change reruns


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bundled")
    config = write_config(workdir / "c.yaml", seeds_config())
    counts = snakemake_api(workdir, [config], dryrun=False, cores=2)
    return workdir, counts


def test_bundles_write_one_file_per_cell_and_a_log_per_bundle(seeds_run):
    workdir, counts = seeds_run
    assert counts == {"train_bundle": 2, **REPORTS, "total": 5}
    for spec in specs_of(seeds_config()):
        frame = pd.read_parquet(workdir / spec.path("results"))
        assert list(frame["step"]) == list(range(11)) and (frame["cell_id"] == spec.cell_id()).all()
    logs = sorted((workdir / "logs" / "train" / "bundles").glob("train_bundle_*.log"))
    assert len(logs) == 2 and all(log.read_text().count("\nwrote ") == 3 for log in logs)


def test_files_written_by_bundles_are_not_rerun(seeds_run):
    workdir, _ = seeds_run
    cfg = write_config(workdir / "same.yaml", seeds_config())
    assert snakemake_api(workdir, [cfg], dryrun=True).get("total", 0) == 0


def test_adding_a_seed_runs_only_the_new_seed(seeds_run, tmp_path):
    workdir, _ = seeds_run
    cfg = write_config(tmp_path / "more.yaml", seeds_config(seeds=(1, 2, 3, 4)))
    assert snakemake_api(workdir, [cfg], dryrun=True) == {"train": 2, **REPORTS, "total": 5}
    cfg = write_config(tmp_path / "more2.yaml", seeds_config(seeds=(1, 2, 3, 4, 5)))
    assert snakemake_api(workdir, [cfg], dryrun=True) == {"train_bundle": 2, **REPORTS, "total": 5}


def test_changing_epsilon_of_one_cell_reruns_only_its_bundle(seeds_run, tmp_path):
    workdir, _ = seeds_run
    cfg = write_config(tmp_path / "eps.yaml", seeds_config(little_epsilon=0.5))
    assert snakemake_api(workdir, [cfg], dryrun=True) == {"train_bundle": 1, **REPORTS, "total": 4}


def test_new_code_version_reruns_every_cell(seeds_run):
    workdir, _ = seeds_run
    cfg = write_config(workdir / "same.yaml", seeds_config())
    assert snakemake_api(workdir, [cfg], dryrun=True, config={"code_version": "fix-1"})["train"] == 6


# ----------------------------------------------------------------------------------------------- #
# Slow: bundled = one job per cell, and a failing bundle


def _snakemake(workdir: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--cores", "2",
                           "--configfile", str(config), *extra], cwd=workdir, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_bundled_files_equal_one_job_per_cell_and_a_failing_bundle_fails_alone(tmp_path):
    good = seeds_config(seeds=(1, 2))
    bad = {"gar": "average", "attack": "none", "batch_size": [10], "seed": [1, 2], "workers": 400,
           "partition": "shards"}  # 400 honest workers cannot each get one of the 300 examples: fails in the job
    bundled = {**good, "train": {**good["train"], "grid": [*good["train"]["grid"], bad]}}
    single = {**good, "train": {**good["train"], "bundle": "none"}}

    a, b = tmp_path / "bundled", tmp_path / "single"
    a.mkdir(), b.mkdir()
    run = _snakemake(a, write_config(a / "c.yaml", bundled), "--keep-going")
    assert run.returncode != 0
    assert _snakemake(b, write_config(b / "c.yaml", single)).returncode == 0

    failing = [s for s in specs_of(bundled) if s.workers == 400]
    for spec in failing:
        assert not (a / spec.path("results")).exists()
    (log,) = [p for p in (a / "logs" / "train" / "bundles").glob("*.log") if "--partition" in p.read_text()]
    errors = [line for line in log.read_text().splitlines() if line.startswith("dpbr: error:")]
    assert len(errors) == 1 and "400 workers" in errors[0] and "failed: --partition:" in errors[0]
    assert "Traceback" not in log.read_text()

    for spec in specs_of(good):
        fa, fb = pd.read_parquet(a / spec.path("results")), pd.read_parquet(b / spec.path("results"))
        cols = [c for c in fa.columns if not c.startswith("seconds_")]
        pd.testing.assert_frame_equal(fa[cols], fb[cols])
