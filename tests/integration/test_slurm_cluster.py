"""The SLURM profiles and the local single-node cluster (scripts/slurm-local.sh).

The profile tests are fast and run by default; the cluster test is marked ``integration``
(run with ``pytest -m integration tests/integration``): it brings the cluster up (root
only; installs SLURM with apt-get when missing), runs a throwaway 4-job workflow through
``--executor slurm`` and checks that every job ran as a SLURM job with the requested
memory, time limit and GPU.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "workflow" / "profiles"

snakemake_cli = pytest.importorskip("snakemake.cli")


# --- profiles: resolution and option names (no cluster needed) ---------------------------


def _parse(monkeypatch: pytest.MonkeyPatch, *argv: str):
    monkeypatch.chdir(REPO)
    _, args = snakemake_cli.parse_args([*argv, "--dry-run"])
    return args


def test_bare_profile_name_slurm_resolves_from_repo_root(monkeypatch):
    # `snakemake --profile slurm` looks for ./slurm, then ~/.config/snakemake/slurm and
    # /etc/xdg/snakemake/slurm; the repository ships ./slurm -> workflow/profiles/slurm.
    monkeypatch.chdir(REPO)
    found = snakemake_cli.get_profile_dir("slurm")
    assert found is not None, "ship the ./slurm -> workflow/profiles/slurm link"
    assert found[1].resolve() == (PROFILES / "slurm" / "config.yaml").resolve()


def test_slurm_profile_options_are_known(monkeypatch):
    # parse_args exits (SystemExit 2) on a key that is no snakemake/plugin option.
    args = _parse(monkeypatch, "--profile", "slurm")
    assert args.executor == "slurm"
    assert args.slurm_status_command == "squeue"  # sacct needs slurmdbd accounting
    assert int(args.slurm_init_seconds_before_status_checks) >= 10  # production pace
    assert args.scheduler == "greedy"
    assert {"mem_mb", "runtime"} <= set(args.default_resources.keys())
    assert args.keep_going and args.rerun_incomplete and args.printshellcmds


def test_slurm_gpu_overlay_requests_gpus(monkeypatch):
    args = _parse(
        monkeypatch, "--profile", "slurm", "--profile", "workflow/profiles/slurm-gpu"
    )
    assert args.executor == "slurm"  # kept from the first profile
    assert args.set_resources["train"]["gpu"].value == 1


def test_local_profile_options_are_known(monkeypatch):
    args = _parse(monkeypatch, "--profile", "workflow/profiles/local")
    assert isinstance(args.cores, int) and args.cores >= 1  # cores: all (resolved)
    assert args.executor in (None, "local")
    assert args.scheduler == "greedy"


def test_command_line_overrides_profile(monkeypatch):
    args = _parse(
        monkeypatch, "--profile", "slurm", "--slurm-init-seconds-before-status-checks", "1"
    )
    assert int(args.slurm_init_seconds_before_status_checks) == 1


# --- a real SLURM cluster ---------------------------------------------------------------

TOY_SNAKEFILE = textwrap.dedent(
    r"""
    rule all:
        input:
            expand("out/work_{i}.txt", i=range(3)),
            "out/train.txt",

    rule work:
        output:
            "out/work_{i}.txt",
        threads: 1
        resources:
            mem_mb=300,
            runtime=5,
        shell:
            "hostname > {output} && "
            "python -c 'import os; print(os.environ[\"SLURM_JOB_ID\"])' >> {output}"

    # `train` gets gpu=1 from workflow/profiles/slurm-gpu (set-resources).
    rule train:
        output:
            "out/train.txt",
        threads: 1
        resources:
            mem_mb=400,
            runtime=7,
        shell:
            "python -c 'import os; print(os.environ[\"SLURM_JOB_ID\"],"
            " os.environ.get(\"CUDA_VISIBLE_DEVICES\", \"none\"))' > {output}"
    """
)


@pytest.mark.integration
def test_toy_workflow_runs_through_slurm(slurm_cluster, run_snakemake_slurm, tmp_path):
    assert slurm_cluster.gpus >= 1, slurm_cluster.summary
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(TOY_SNAKEFILE)

    run = run_snakemake_slurm(
        tmp_path, snakefile, profiles=("slurm", "slurm-gpu"), timeout=180
    )
    print(f"snakemake via SLURM: {run.seconds:.1f} s, {slurm_cluster.summary}")
    assert not run.timed_out, f"snakemake hung ({run.seconds:.0f} s):\n{run.output[-4000:]}"
    assert run.returncode == 0, run.output[-6000:]

    ids = run.slurm_job_ids
    assert len(ids) == 4 and len(set(ids)) == 4, run.output[-4000:]

    # Each output was written inside a SLURM job that Snakemake submitted.
    seen = {}
    for i in range(3):
        host, job_id = (tmp_path / f"out/work_{i}.txt").read_text().split()
        assert host == os.uname().nodename.split(".")[0] or host == slurm_cluster.node
        seen[f"work_{i}"] = job_id
    train_job_id, cuda = (tmp_path / "out/train.txt").read_text().split()
    seen["train"] = train_job_id
    assert sorted(seen.values()) == sorted(ids)
    assert cuda != "none", "the GPU job step got no CUDA_VISIBLE_DEVICES"

    # SLURM itself saw the requests: memory, time limit, GPU, partition, final state.
    for name, job_id in seen.items():
        job = run.slurm_job(job_id)
        assert job["JobState"] == "COMPLETED", job
        assert job["Partition"] == slurm_cluster.partition
        assert job["JobName"].startswith(run.jobname_prefix)
        if name == "train":
            assert job["MinMemoryNode"] == "400M" and job["TimeLimit"] == "00:07:00"
            assert "gpu:1" in job.get("TresPerJob", ""), job
        else:
            assert job["MinMemoryNode"] == "300M" and job["TimeLimit"] == "00:05:00"
            assert "gpu" not in job.get("TresPerJob", "")

    # The plugin kept one SLURM log per job, named after the SLURM job id.
    logs = run.slurm_logs()
    assert sorted(p.stem for p in logs) == sorted(ids), logs
    rel = [p.relative_to(run.workdir / ".snakemake" / "slurm_logs").parts[0] for p in logs]
    assert sorted(rel) == ["rule_train"] + ["rule_work"] * 3, logs

    # Rerun: nothing to do, and nothing submitted.
    again = run_snakemake_slurm(tmp_path, snakefile, profiles=("slurm", "slurm-gpu"), timeout=60)
    assert again.returncode == 0, again.output[-3000:]
    assert again.slurm_job_ids == []
