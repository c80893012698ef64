"""The robust-systems study as a user runs it: a small grid of the shape of ``config/systems-quick.yaml``
(every system, a lossy link, staleness and the one-server baselines, on generated data) through
``snakemake`` and ``snakemake --report``, then the systems report's tables. Slow: ``pytest -m slow``.
"""

from __future__ import annotations

import re

import pandas as pd
import pytest

from test_workflow import SYNTH, write_config
from test_workflow_runs import job_counts, snakemake_cli

pytestmark = pytest.mark.slow

LINK = "ideal(compute=0.01)"


def systems_config() -> dict:
    """9 cells of the logistic model, 20 steps: DRACO (clean and attacked), GuanYu and LiuBei with a
    Byzantine server, a lossy link, staleness, and the one-server baselines (explicit link)."""
    return {
        "device": "cpu",
        "plots": {"formats": ["html", "png"]},
        "train": {
            "defaults": {"dataset": SYNTH, "model": "logit", "workers": 9, "byzantine": 1, "batch_size": 10,
                         "steps": 20, "eval_every": 10, "lr": 0.5, "momentum": 0, "network": LINK, "seed": 1},
            "grid": [
                {"system": ["draco(r=3)"], "attack": ["none", "sign-flip"]},
                {"pair": [{"gar": "average", "attack": "none"}, {"gar": "median", "attack": "sign-flip"},
                          {"gar": "multi-krum", "attack": "little"}]},
                {"gar": "multi-krum", "attack": "little",
                 "system": ["guanyu(m=6,byzantine=1,attack=random)", "liubei(m=4,byzantine=1,attack=negate)"]},
                {"gar": "median", "network": ["lossy(drop=0.1,fill=zeros,compute=0.01)"]},
                {"gar": "median", "staleness": [2]},
            ],
        },
    }


def test_systems_grid_runs_reports_and_checks_the_claims(tmp_path):
    cfg = write_config(tmp_path / "systems.yaml", systems_config())
    run = snakemake_cli(tmp_path, "--cores", "2", "--configfile", str(cfg))
    assert run.returncode == 0, run.stdout[-4000:]
    counts = job_counts(run.stdout)
    assert counts["systems_report"] == 1 and counts["aggregate"] == 1
    summary = tmp_path / "results" / "summary"
    table = pd.read_csv(summary / "systems_table.csv")
    assert len(table) == 9
    claims = pd.read_csv(summary / "systems_claims.csv")
    # DRACO's exact recovery is measured on this grid (a clean and an attacked DRACO cell) and holds
    draco = claims[claims.apply(lambda row: "DRACO" in " ".join(map(str, row.values)) and "exact" in
                                " ".join(map(str, row.values)).lower(), axis=1)]
    assert len(draco) >= 1
    assert draco.apply(lambda row: "holds" in " ".join(map(str, row.values)) and "does not" not in
                       " ".join(map(str, row.values)), axis=1).any()
    figures = tmp_path / "results" / "figures" / "systems"
    for name in ("draco_exact", "time_to_accuracy", "servers", "costs", "lossy", "staleness", "privacy_vote"):
        assert (figures / f"{name}.png").stat().st_size > 1000, name
    # the rerun does nothing; the report embeds the systems section offline
    again = snakemake_cli(tmp_path, "--cores", "2", "--configfile", str(cfg))
    assert again.returncode == 0 and job_counts(again.stdout) == {}, again.stdout[-2000:]
    report = snakemake_cli(tmp_path, "--configfile", str(cfg), "--report", "results/report.html")
    assert report.returncode == 0, report.stdout[-3000:]
    html = (tmp_path / "results" / "report.html").read_text()
    assert "Robust systems" in html and "systems_claims.csv" in html
    assert not re.search(r"<script[^>]+src=[\"']https?:", html)
