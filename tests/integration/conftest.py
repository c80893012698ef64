"""Fixtures for tests that run Snakemake against a real single-node SLURM cluster.

``slurm_cluster`` (session scope) brings the cluster up with ``scripts/slurm-local.sh start``
(installing ``slurm-wlm`` and ``munge`` with apt-get when they are missing) and stops it at
the end of the session, unless it was already running before (then it is left running) or
``DPBR_SLURM_KEEP=1`` is set. It needs root; without root, or without SLURM and apt-get,
the tests that use it are skipped with the reason.

``run_snakemake_slurm(workdir, snakefile, extra_args=(), timeout=240, profiles=("slurm",),
fast=True)`` runs ``python -m snakemake`` with the repository's SLURM profile, wrapped in
``timeout -k 10`` (a hung Snakemake ignores SIGTERM), and returns a :class:`SnakemakeRun`.
``fast=True`` adds :data:`FAST_ARGS`, which shorten the plugin's status-check delays so a
toy workflow takes seconds, not minutes. Example::

    def test_my_workflow(run_snakemake_slurm, tmp_path):
        run = run_snakemake_slurm(tmp_path, REPO / "Snakefile", ["--configfile", cfg])
        assert run.returncode == 0, run.output
        assert run.slurm_job_ids
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_SCRIPT = REPO / "scripts" / "slurm-local.sh"
PROFILES = REPO / "workflow" / "profiles"

#: Command-line overrides for tests: first status check 1 s after a submission (the profile
#: says 20 s; the plugin backs off by +10 s per check while nothing finishes), short
#: latency wait, no submission throttling, and keep every job's SLURM log for assertions.
FAST_ARGS: tuple[str, ...] = (
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--latency-wait",
    "5",
    "--max-jobs-per-timespan",
    "100/1s",
    "--slurm-keep-successful-logs",
)

_SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")


@dataclass(frozen=True)
class SlurmCluster:
    """What ``scripts/slurm-local.sh start`` reported."""

    node: str
    partition: str
    cpus: int
    mem_mb: int
    gpus: int
    state_dir: Path
    summary: str


@dataclass
class SnakemakeRun:
    """Outcome of one ``run_snakemake_slurm`` call."""

    args: list[str]
    returncode: int
    output: str  # stdout and stderr, interleaved
    seconds: float
    workdir: Path
    jobname_prefix: str
    _job_cache: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

    @property
    def timed_out(self) -> bool:
        return self.returncode in (124, 137)

    @property
    def slurm_job_ids(self) -> list[str]:
        """SLURM job ids of every job Snakemake submitted, in submission order."""
        return _SUBMITTED.findall(self.output)

    def slurm_job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` fields of a job (JobState, MinMemoryNode, TimeLimit, ...).

        Finished jobs stay queryable for MinJobAge (300 s on the local cluster).
        """
        if job_id not in self._job_cache:
            out = subprocess.run(
                ["scontrol", "-o", "show", "job", job_id],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            fields = dict(
                tok.split("=", 1) for tok in out.split() if "=" in tok and not tok.startswith("=")
            )
            self._job_cache[job_id] = fields
        return self._job_cache[job_id]

    def slurm_logs(self) -> list[Path]:
        """Per-job SLURM logs (``.snakemake/slurm_logs/rule_<rule>/<wildcards>/<id>.log``)."""
        return sorted((self.workdir / ".snakemake" / "slurm_logs").rglob("*.log"))


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (apt-get, /etc/slurm, daemons)"
    have_slurm = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have_slurm and not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is not available to install it"
    if not shutil.which("timeout"):
        return "coreutils 'timeout' is missing"
    return None


def _parse_summary(line: str) -> SlurmCluster:
    kv = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
    return SlurmCluster(
        node=kv["node"],
        partition=kv["partition"],
        cpus=int(kv["cpus"]),
        mem_mb=int(kv["mem_mb"]),
        gpus=int(kv.get("gpus", "0")),
        state_dir=Path(kv["dir"]),
        summary=line,
    )


def _script(command: str, timeout: float, env: dict[str, str] | None = None):
    return subprocess.run(
        ["bash", str(SLURM_SCRIPT), command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterable[SlurmCluster]:
    """A running single-node SLURM cluster (partition ``debug``, 1 fake GPU by default)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    was_running = _script("status", 60).returncode == 0
    env = dict(os.environ)
    # One fake GPU lets tests check that GPU requests are accepted and scheduled.
    env.setdefault("SLURM_LOCAL_GPUS", "1")
    proc = _script("start", 900, env)
    if proc.returncode != 0:
        msg = f"scripts/slurm-local.sh start failed (rc={proc.returncode}):\n{proc.stderr}"
        if "apt-get failed" in proc.stderr or "no apt-get" in proc.stderr:
            pytest.skip("could not install SLURM: " + msg)
        pytest.fail(msg, pytrace=False)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("slurm-local: up:"))
    try:
        yield _parse_summary(line)
    finally:
        if not was_running and os.environ.get("DPBR_SLURM_KEEP", "") in ("", "0"):
            _script("stop", 180)


def _cancel_jobs_named(prefix: str) -> None:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=30
    ).stdout
    ids = [i for i, _, name in (ln.partition(" ") for ln in out.splitlines()) if name.startswith(prefix)]
    if ids:
        subprocess.run(["scancel", *ids], timeout=30, check=False)


def run_snakemake(
    workdir: Path,
    snakefile: Path,
    extra_args: Sequence[str] = (),
    timeout: int = 240,
    profiles: Sequence[str | Path] = ("slurm",),
    fast: bool = True,
) -> SnakemakeRun:
    """Run Snakemake with the SLURM profile(s) in ``workdir``; see the module docstring.

    ``profiles`` are names under ``workflow/profiles`` or paths (relative ones to the
    repository root), applied in order (a later profile replaces the keys it sets). Cancels the run's SLURM
    jobs (by job-name prefix) when it times out.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = "dpbrtest" + uuid.uuid4().hex[:8]
    args: list[str] = []
    for p in profiles:
        path = Path(p)
        if not path.is_absolute():
            path = PROFILES / path if (PROFILES / path).is_dir() else REPO / path
        args += ["--profile", str(path)]
    args += ["--snakefile", str(Path(snakefile).resolve()), "--directory", str(workdir)]
    if fast:
        args += list(FAST_ARGS)
    args += ["--slurm-jobname-prefix", prefix, *extra_args]
    cmd = ["timeout", "-k", "10", str(timeout), sys.executable, "-m", "snakemake", *args]
    env = dict(os.environ)
    # Jobs inherit this environment (sbatch --export=ALL): make `python` the venv's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    start = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout + 60,
    )
    run = SnakemakeRun(
        args=cmd,
        returncode=proc.returncode,
        output=proc.stdout,
        seconds=time.monotonic() - start,
        workdir=workdir,
        jobname_prefix=prefix,
    )
    if run.timed_out:
        _cancel_jobs_named(prefix)
    return run


@pytest.fixture
def run_snakemake_slurm(slurm_cluster: SlurmCluster) -> Callable[..., SnakemakeRun]:
    """:func:`run_snakemake`, with the cluster guaranteed to be up."""
    return run_snakemake
