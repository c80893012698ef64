"""The dpbr workflow through the repository's SLURM profile on a real single-node cluster.

Brings the cluster up (``slurm_cluster`` fixture: scripts/slurm-local.sh, root only), runs a tiny
grid (2 training cells of the logistic model on generated data) with
``snakemake --profile slurm --profile workflow/profiles/slurm-gpu`` (fast status checks), checks
that every training cell ran as a SLURM job with the resources of the configuration (memory, time
limit, one GPU from the overlay), that summaries and figures were produced on the submitting
machine, and the fixture stops every daemon it started. The run is wrapped in ``timeout -k``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "device": "cpu",
    "plots": {"formats": ["png"]},
    "resources": {"train": {"threads": 1, "mem_mb": 700, "runtime": 7, "gpu": 0}},
    "train": {
        "defaults": {"dataset": "synthetic(d=68,classes=2,n=300,n_test=100)", "model": "logit", "steps": 10,
                     "eval_every": 5, "seed": 1},
        "grid": [{"pair": [{"gar": "average", "attack": "none"},
                           {"gar": "mda", "attack": "little(factor=1.5,negative=true)"}],
                  "batch_size": [10]}],
    },
}


@pytest.mark.integration
def test_tiny_grid_runs_through_the_slurm_profile(slurm_cluster, run_snakemake_slurm, tmp_path):
    from dpbr.report.grid import expand
    from dpbr.report.layout import figure_group, figure_paths, summary_paths
    from dpbr.spec import RunSpec

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY, sort_keys=False))
    profiles = ("slurm", "slurm-gpu") if slurm_cluster.gpus >= 1 else ("slurm",)
    run = run_snakemake_slurm(tmp_path, REPO / "Snakefile", ["--configfile", str(config)], profiles=profiles,
                              timeout=480)
    print(f"workflow via SLURM: {run.seconds:.1f} s, {slurm_cluster.summary}")
    assert not run.timed_out, f"snakemake hung ({run.seconds:.0f} s):\n{run.output[-4000:]}"
    assert run.returncode == 0, run.output[-4000:]

    cells = expand(TINY["train"], RunSpec, "train")
    for spec in cells.values():
        assert (tmp_path / spec.path("results")).stat().st_size > 0
    # only the training cells are SLURM jobs; aggregate, plot and all run on the submitting machine
    ids = run.slurm_job_ids
    assert len(ids) == len(cells) == 2, run.output[-4000:]
    for job_id in ids:
        job = run.slurm_job(job_id)
        assert job["JobState"] == "COMPLETED", job
        assert job["MinMemoryNode"] in ("700M", "700"), job
        assert job["TimeLimit"] == "00:07:00", job
        if slurm_cluster.gpus >= 1:
            assert "gpu:1" in job.get("TresPerJob", ""), job
    for path in summary_paths(tmp_path / "results" / "summary").values():
        assert path.stat().st_size > 0
    spec = next(iter(cells.values()))
    for path in figure_paths(tmp_path / "results" / "figures", figure_group(spec.dataset, spec.model), ["png"]):
        assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
def test_bundles_of_seeds_run_as_slurm_jobs(slurm_cluster, run_snakemake_slurm, tmp_path):
    """With `train.bundle: seeds` the 2 seeds of each cell are one SLURM job: the job parses the workflow
    again on the node and rebuilds its bundle rule from the rule's name, with rule `train`'s resources."""
    from dpbr.report.grid import expand
    from dpbr.spec import RunSpec

    defaults = {k: v for k, v in TINY["train"]["defaults"].items() if k != "seed"}
    tiny = {**TINY, "train": {"bundle": "seeds", "defaults": defaults,
                              "grid": [{**TINY["train"]["grid"][0], "seed": [1, 2]}]}}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny, sort_keys=False))
    run = run_snakemake_slurm(tmp_path, REPO / "Snakefile", ["--configfile", str(config)], profiles=("slurm",),
                              timeout=480)
    assert not run.timed_out, f"snakemake hung ({run.seconds:.0f} s):\n{run.output[-4000:]}"
    assert run.returncode == 0, run.output[-4000:]
    cells = expand(tiny["train"], RunSpec, "train")
    assert len(cells) == 4
    for spec in cells.values():
        assert (tmp_path / spec.path("results")).stat().st_size > 0
    ids = run.slurm_job_ids
    assert len(ids) == 2, run.output[-4000:]  # one job per cell's seeds
    for job_id in ids:
        job = run.slurm_job(job_id)
        assert job["JobState"] == "COMPLETED", job
        assert job["MinMemoryNode"] in ("700M", "700"), job
        assert job["TimeLimit"] == "00:07:00", job
    logs = sorted((tmp_path / "logs" / "train" / "bundles").glob("train_bundle_*.log"))
    assert len(logs) == 2 and all(log.read_text().count("\nwrote ") == 2 for log in logs)
