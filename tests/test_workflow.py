"""The Snakemake workflow: grids → cells, configuration errors, dry-run job counts, a tiny real run
and which jobs a change reruns.

Fast by default: Snakemake runs in this process through its API (the Snakefile's imports — torch,
dpbr — are paid once per session). The tiny end-to-end run trains 2 cells of the logistic model on
generated data with 2 cores; executed reruns, interruption, --keep-going, the report and the CLI are
in ``test_workflow_runs.py`` (marked slow).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import pytest
import yaml

from dpbr.errors import UsageError
from dpbr.report import grid
from dpbr.report.layout import figure_group, figure_paths, summary_paths
from dpbr.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"

LITTLE = "little(factor=1.5,negative=true)"
SYNTH = "synthetic(d=68,classes=2,n=300,n_test=100)"


# ----------------------------------------------------------------------------------------------- #
# Helpers (also used by test_workflow_runs.py)


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """Write ``config`` as YAML to ``path`` and return the path."""
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


def tiny_config(**train_overrides: Any) -> dict[str, Any]:
    """Two cells of the logistic model on generated data (one per sub-grid), 10 steps each."""
    train: dict[str, Any] = {
        "defaults": {"dataset": SYNTH, "model": "logit", "steps": 10, "eval_every": 5, "seed": 1},
        "grid": [
            {"gar": "average", "attack": "none", "batch_size": [10]},
            {"gar": "mda", "attack": LITTLE, "batch_size": [10]},
        ],
    }
    train.update(train_overrides)
    return {"device": "cpu", "plots": {"formats": ["html", "png"]}, "train": train}


def snakemake_api(workdir: Path, configfiles: Sequence[Path], *, dryrun: bool, cores: int = 2,
                  config: Mapping[str, Any] | None = None, keep_going: bool = False) -> dict[str, int]:
    """Run (or dry-run) the workflow in this process; returns the job counts per rule (and ``total``).

    After a real run the counts are the jobs that ran; after a dry run, the jobs that would run. The
    training bundles' rules (``train_bundle_<group>_<members>``, one per bundle) count together as
    ``train_bundle``.
    """
    from snakemake.api import SnakemakeApi
    from snakemake.scheduling.greedy import SchedulerSettings as GreedySettings
    from snakemake.settings.types import (ConfigSettings, ExecutionSettings, OutputSettings, Quietness,
                                          ResourceSettings, SchedulingSettings)

    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wf = api.workflow(
            resource_settings=ResourceSettings(cores=cores),
            config_settings=ConfigSettings(configfiles=[Path(c).resolve() for c in configfiles],
                                           config=dict(config or {})),
            snakefile=SNAKEFILE,
            workdir=Path(workdir),
        )
        dag = wf.dag()
        dag.execute_workflow(executor="local", pseudo_executor="dryrun" if dryrun else None,
                             execution_settings=ExecutionSettings(keep_going=keep_going),
                             scheduling_settings=SchedulingSettings(scheduler="greedy"),
                             scheduler_settings=GreedySettings())
        counts: dict[str, int] = {}
        for rule, n in wf._workflow.dag.stats()[1].items():
            name = "train_bundle" if str(rule).startswith("train_bundle_") else str(rule)
            counts[name] = counts.get(name, 0) + int(n)
        return counts


def cells_of(config: Mapping[str, Any]) -> dict[str, RunSpec]:
    return grid.expand(config.get("train"), RunSpec, "train")  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- #
# Grid expansion


def test_bundles_and_fields_give_the_cartesian_product():
    section = {
        "defaults": {"dataset": SYNTH, "model": "logit", "steps": 7},
        "grid": [{
            "pair": [{"gar": "average", "attack": "none"}, {"gar": "mda", "attack": LITTLE}],
            "privacy": [{"epsilon": "none"}, {"epsilon": 0.2}, {"sparsify": 0.25}],
            "batch_size": [10, 50],
        }],
    }
    cells = grid.expand(section, RunSpec, "train")
    assert len(cells) == 2 * 3 * 2
    specs = list(cells.values())
    assert {(s.gar, s.attack) for s in specs} == {("average", "none"), ("mda", LITTLE)}
    # average is never combined with an attack; epsilon and sparsify never together
    assert all(s.byzantine_real == 0 for s in specs if s.gar == "average")
    assert all(s.byzantine_real == 5 for s in specs if s.gar == "mda")
    assert not any(s.epsilon is not None and s.sparsify is not None for s in specs)
    assert {s.steps for s in specs} == {7}
    # order: first dimension varies slowest
    assert [s.batch_size for s in specs[:2]] == [10, 50]
    assert specs[0].gar == "average" and specs[-1].gar == "mda"
    # ids are the spec's own
    assert all(cid == s.cell_id() for cid, s in cells.items())


def test_sub_grids_union_and_duplicates_collapse():
    section = {
        "defaults": {"dataset": SYNTH, "model": "logit"},
        "grid": [
            {"gar": "average", "attack": "none", "batch_size": [10, 20], "lr": [2]},
            # the same two cells spelled differently (lr 2.0, one value without a list) + one new
            {"gar": ["average"], "attack": ["none"], "batch_size": [20, 10, 30], "lr": 2.0},
        ],
    }
    cells = grid.expand(section, RunSpec, "train")
    assert [s.batch_size for s in cells.values()] == [10, 20, 30]


def test_grid_values_override_defaults_and_defaults_fill_in():
    section = {"defaults": {"dataset": SYNTH, "model": "logit", "batch_size": 99, "seed": 4},
               "grid": [{"batch_size": [5]}]}
    (spec,) = grid.expand(section, RunSpec, "train").values()
    assert (spec.batch_size, spec.seed) == (5, 4)
    assert spec == RunSpec.create(dataset=SYNTH, model="logit", batch_size=5, seed=4)


def test_no_grid_means_no_cells():
    assert grid.expand(None, RunSpec, "train") == {}
    assert grid.expand({"defaults": {"steps": 3}}, RunSpec, "train") == {}


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ({"grid": [{"batch_size": [10, "ten"]}]}, "train.grid[0].batch_size[1]", "'ten'", "expected an integer"),
        ({"grid": [{"pair": [{"gar": "average", "attack": "none"}, {"gar": "krumm", "attack": "none"}]}]},
         "train.grid[0].pair[1].gar", "'krumm'", "allowed: "),
        ({"defaults": {"epsilon": 1.5}, "grid": [{"seed": [1]}]}, "train.defaults.epsilon", "1.5", "< 1"),
        ({"grid": [{"privacy": [{"epsilon": 0.2}, {"sparsify": "lots"}]}]}, "train.grid[0].privacy[1].sparsify",
         "'lots'", "expected a number"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(section, key, value, allowed):
    with pytest.raises(UsageError) as info:
        grid.expand(section, RunSpec, "train")
    msg = info.value.one_line()
    assert msg.startswith(key + ":"), msg
    assert value in msg and allowed in msg, msg
    assert "\n" not in str(info.value)


def test_cross_field_error_names_the_offending_key():
    # MDA needs n > 2f: f = 6 of 11 is refused, and the message points at the key that set f.
    section = {"defaults": {"byzantine": 6}, "grid": [{"gar": ["mda"], "attack": ["empire"]}]}
    with pytest.raises(UsageError) as info:
        grid.expand(section, RunSpec, "train")
    assert info.value.option == "train.defaults.byzantine"
    assert "6" in info.value.message


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ({"defaults": {"bach_size": 10}}, "train.defaults.bach_size: unknown parameter; allowed: dataset, model"),
        ({"grid": [{"pair": [{"gar": "mda", "atack": "empire"}]}]}, "train.grid[0].pair[0].atack: unknown parameter"),
        ({"grid": [{"pair": ["mda"]}]}, "train.grid[0].pair[0]: 'pair' is not a parameter, so it must be a bundle"),
        ({"grid": [{"epsilon": [0.2], "privacy": [{"epsilon": 0.1}]}]},
         "train.grid[0]: 'epsilon' is set by both 'epsilon' and 'privacy'"),
        ({"grid": [{"batch_size": []}]}, "train.grid[0].batch_size: lists no value"),
        ({"grid": {"batch_size": [1]}}, "train.grid: must be a list of sub-grids"),
    ],
)
def test_structural_errors(section, fragment):
    with pytest.raises(UsageError) as info:
        grid.expand(section, RunSpec, "train")
    assert fragment in info.value.one_line()


# ----------------------------------------------------------------------------------------------- #
# Schema


def _schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA.read_text())


def test_schema_lists_exactly_the_runspec_fields():
    fields = [f.name for f in dataclasses.fields(RunSpec)]
    defs = _schema()["$defs"]
    assert list(defs["run_values"]["properties"]) == fields
    assert list(defs["run_subgrid"]["properties"]) == fields


def _validate(config: dict[str, Any]) -> dict[str, Any]:
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, str(SCHEMA))
    except WorkflowError as exc:
        raise AssertionError(grid.schema_error_message(exc.__context__)) from None
    return config


def test_schema_fills_defaults():
    config = _validate({"train": {"grid": [{"batch_size": [10]}]}})
    assert config["results"] == "results" and config["data"] == {"dir": "data", "sources": {}}
    assert config["resources"]["train"] == {"threads": 1, "mem_mb": 3000, "runtime": 60, "gpu": 0}
    assert config["plots"]["formats"] == ["html", "png", "svg"]
    assert config["code_version"] is None and config["device"] == "auto"
    assert config["train"]["defaults"] == {}


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"trian": {}}, "trian: unknown key; allowed: code_version, data, device, plots, reconstruct, resources, results, train, vn"),
        ({"resources": {"train": {"threads": "two"}}}, "resources.train.threads: 'two' is not allowed"),
        ({"train": {"defaults": {"batch_size": "ten"}}}, "train.defaults.batch_size: 'ten' is not allowed"),
        ({"train": {"grid": [{"batch_size": ["ten"]}]}}, "train.grid[0].batch_size"),
        ({"device": "gpu"}, "device: 'gpu' is not allowed"),
        ({"plots": {"formats": ["pdf"]}}, "plots.formats[0]: 'pdf' is not allowed"),
        ({"train": {"grid": [{"pair": [{"gar": "mda", "atack": "x"}]}]}}, "atack"),
    ],
)
def test_schema_errors_name_the_key(config, fragment):
    with pytest.raises(AssertionError) as info:
        _validate(config)
    msg = str(info.value)
    assert fragment in msg, msg
    assert "\n" not in msg


def test_yaml_exponent_without_dot_is_accepted_as_a_number():
    # YAML 1.1 reads 1e-6 as a string; the schema accepts numeric strings and dpbr parses them.
    config = _validate(yaml.safe_load("train: {defaults: {delta: 1e-6}, grid: [{seed: [1]}]}"))
    assert config["train"]["defaults"]["delta"] == "1e-6"
    (spec,) = cells_of(config).values()
    assert spec.delta == 1e-6


# ----------------------------------------------------------------------------------------------- #
# The shipped configurations


def test_default_config_is_the_issue_grid():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cells = list(cells_of(config).values())
    assert len(cells) == 18
    assert {(s.dataset, s.model, s.workers, s.byzantine) for s in cells} == {("mnist", "cnn", 11, 5)}
    assert {(s.gar, s.attack) for s in cells} == {("average", "none"), ("mda", LITTLE), ("mda", "empire(factor=1.1)")}
    assert {(s.epsilon, s.sparsify) for s in cells} == {(None, None), (0.2, None), (None, 0.25)}
    assert len({s.batch_size for s in cells}) >= 2


def test_paper_config_is_the_study():
    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    cells = list(cells_of(config).values())
    assert len(cells) == 2 * 3 * 5 * 6 * 5
    assert {(s.model, s.dataset) for s in cells} == {("logit", "phishing"), ("cnn", "mnist")}
    assert {s.batch_size for s in cells} == {10, 25, 50, 100, 250, 500}
    assert {s.epsilon for s in cells} == {None, 0.1, 0.2, 0.5}
    assert {s.seed for s in cells} == {1, 2, 3, 4, 5}
    assert {(s.steps, s.eval_every, s.lr, s.momentum, s.clip, s.delta) for s in cells} == {(1000, 50, 2.0, 0.99, 0.01, 1e-6)}
    assert not any(s.epsilon is not None and s.sparsify is not None for s in cells)


def test_claims_configs_are_the_issue_results_grid():
    """config/claims.yaml (CPU) and config/claims-gpu.yaml name the cells of issue 3's "Results to
    report": 1000 steps, average/none and mda/little at ε ∈ {none, 0.2}, logit at b ∈ {10, 100, 500}
    × 3 seeds, CNN at b ∈ {10, 100} × seed 1 on the CPU and b ∈ {10, 100, 500} × 3 seeds on a GPU."""
    pairs = {("average", "none"), ("mda", LITTLE)}
    cpu = list(cells_of(yaml.safe_load((REPO / "config" / "claims.yaml").read_text())).values())
    gpu = list(cells_of(yaml.safe_load((REPO / "config" / "claims-gpu.yaml").read_text())).values())
    assert len(cpu) == 3 * 3 * 2 * 2 + 2 * 2 * 2 and len(gpu) == 3 * 3 * 2 * 2
    for cells in (cpu, gpu):
        assert {(s.gar, s.attack) for s in cells} == pairs
        assert {s.epsilon for s in cells} == {None, 0.2}
        assert {(s.steps, s.workers, s.byzantine, s.delta) for s in cells} == {(1000, 11, 5, 1e-6)}
    assert {(s.batch_size, s.seed) for s in cpu if s.model == "logit"} == {(b, k) for b in (10, 100, 500) for k in (1, 2, 3)}
    assert {(s.batch_size, s.seed) for s in cpu if s.model == "cnn"} == {(10, 1), (100, 1)}
    assert {(s.model, s.dataset) for s in gpu} == {("cnn", "mnist")}
    assert {(s.batch_size, s.seed) for s in gpu} == {(b, k) for b in (10, 100, 500) for k in (1, 2, 3)}


# ----------------------------------------------------------------------------------------------- #
# Dry runs (Snakemake API, in process)


def test_dry_run_counts_default_config(tmp_path):
    counts = snakemake_api(tmp_path, [REPO / "config" / "config.yaml"], dryrun=True)
    # a fresh folder: MNIST is prepared once, before the 18 training cells, 9 VN cells and 8 reconstructions
    assert counts == {"data": 1, "train": 18, "aggregate": 1, "plot": 1, "vn": 9, "vn_report": 1,
                      "reconstruct": 8, "reconstruct_report": 1, "all": 1, "total": 41}


def test_dry_run_counts_paper_config(tmp_path):
    counts = snakemake_api(tmp_path, [REPO / "config" / "paper.yaml"], dryrun=True)
    # VN: 70 cells at the initial parameters and at 5 checkpoints of each model's trajectory (2 runs);
    # reconstruction: DLG 3 b × 12 defences × 10 seeds, iDLG 4 × 10, IG 3 b × 2 defences × 3 seeds
    # training: the 5 seeds of each of the 180 cells run as one job (train.bundle: seeds, the default)
    assert counts == {"data": 2, "train_bundle": 180, "aggregate": 1, "plot": 2, "vn": 420, "trajectory": 2,
                      "vn_report": 1, "reconstruct": 418, "reconstruct_report": 1, "all": 1, "total": 1028}


def test_dry_run_counts_test_config(tmp_path):
    counts = snakemake_api(tmp_path, [REPO / "config" / "test.yaml"], dryrun=True)
    assert counts == {"train": 4, "aggregate": 1, "plot": 1, "all": 1, "total": 7}


def test_bucketing_config_is_the_papers_exp2_and_exp3_grids():
    """config/bucketing.yaml: Karimireddy, He & Jaggi (arXiv 2006.09365) exp2 (mimic, β = 0, IID and
    non-IID, 5 rules × s ∈ {0, 2}) and exp3 (non-IID, β ∈ {0, 0.9}, 5 attacks, 4 rules × s ∈ {0, 2}),
    seeds 0-2, the 24 cells the two share counted once."""
    cells = list(cells_of(yaml.safe_load((REPO / "config" / "bucketing.yaml").read_text())).values())
    assert len(cells) == 60 + 240 - 24
    assert {(s.dataset, s.model, s.workers, s.byzantine, s.byzantine_real, s.batch_size, s.steps, s.eval_every)
            for s in cells} == {("mnist", "mnist-example", 25, 5, 5, 32, 600, 30)}
    assert {(s.momentum, s.clip, s.epsilon, s.sparsify, s.quantize) for s in cells} == {(0.0, None, None, None, None)}
    assert {s.seed for s in cells} == {0, 1, 2}
    rules = {"average", "krum", "median", "geometric-median", "centered-clipping"}
    exp2 = [s for s in cells if s.attack == "mimic(target=auto)" and s.worker_momentum == 0]
    assert {s.gar for s in exp2} == rules | {f"bucketing(s=2)+{r}" for r in rules}
    assert {s.partition for s in exp2} == {"iid", "shards"}
    exp3 = [s for s in cells if s.partition == "shards" and s.gar.split("+")[-1] != "average"]
    assert {s.attack for s in exp3} == {"label-flip", "bit-flip", "mimic(target=auto)", "empire(factor=1.1)",
                                        "little(factor=zmax-honest,negative=true)"}
    # dampened worker momentum: lr 0.01 / (1 - β) reproduces the paper's undampened momentum at lr 0.01
    assert {(s.worker_momentum, s.lr) for s in exp3} == {(0.0, 0.01), (0.9, 0.1)}
    assert len(exp3) == 2 * 5 * 8 * 3


#: config/bucketing-quick.yaml: MNIST once, 8 training cells (krum, median × s ∈ {0, 2} × {IID, non-IID},
#: one seed: one job each), the summaries, one group's figures and the heterogeneous-data report.
QUICK_BUCKETING_JOBS = {"data": 1, "train": 8, "aggregate": 1, "plot": 1, "hetero_report": 1, "all": 1, "total": 13}


def test_dry_run_counts_bucketing_configs(tmp_path):
    """Both bucketing configs add the heterogeneous-data report (rule hetero_report) to the usual jobs;
    the training cells' seeds run as one job each (train.bundle: seeds)."""
    full = snakemake_api(tmp_path / "full", [REPO / "config" / "bucketing.yaml"], dryrun=True)
    assert full == {"data": 1, "train_bundle": 92, "aggregate": 1, "plot": 1, "hetero_report": 1, "all": 1,
                    "total": 97}
    quick = snakemake_api(tmp_path / "quick", [REPO / "config" / "bucketing-quick.yaml"], dryrun=True)
    assert quick == QUICK_BUCKETING_JOBS



def test_only_the_fields_that_vary_are_wildcards(tmp_path):
    """Fields equal in every cell are written out in the patterns (Snakemake's cost per job grows with
    the wildcards); the files are still exactly the specs' paths."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                          config_settings=ConfigSettings(configfiles=[REPO / "config" / "config.yaml"]),
                          snakefile=SNAKEFILE, workdir=tmp_path)
        rules = {rule.name: rule for rule in wf._workflow.rules}
        train_wildcards = set(rules["train"].wildcard_names)
        vn_wildcards = set(rules["vn"].wildcard_names)
    assert train_wildcards == {"gar", "attack", "epsilon", "sparsify", "batch_size", "byzantine_real"}
    assert vn_wildcards == {"epsilon", "sparsify", "batch_size"}

@pytest.mark.parametrize("where", ["repository root", "elsewhere with --snakefile"])
@pytest.mark.parametrize("profiles", [(), ("slurm",), ("slurm", "workflow/profiles/slurm-gpu"),
                                      ("workflow/profiles/local",)])
def test_plain_command_reads_the_default_workflow_profile(monkeypatch, tmp_path, where, profiles):
    """`snakemake --cores all` resumes after an interruption without extra flags: Snakemake reads
    profiles/default (next to the Snakefile, or in the working directory) as the workflow profile, and
    applies it on top of --profile key by key without changing what the SLURM or local profile sets."""
    from snakemake.cli import parse_args

    argv = ["--cores", "2"] if not profiles else [a for p in profiles for a in ("--profile", str(REPO / p))]
    if where == "repository root":
        monkeypatch.chdir(REPO)
    else:
        monkeypatch.chdir(tmp_path)
        argv += ["--snakefile", str(SNAKEFILE)]
    _, args = parse_args(argv)
    assert args.rerun_incomplete and args.keep_going and args.printshellcmds and args.show_failed_logs
    assert args.scheduler == "greedy"
    if "slurm" in profiles:
        assert args.executor == "slurm" and args.jobs == 100 and args.latency_wait == 60
        assert args.cores is None and not args.resources  # nothing local leaks into cluster runs
        assert ("train" in args.set_resources) == ("workflow/profiles/slurm-gpu" in profiles)
    else:
        assert args.executor is None and args.latency_wait == 5
    _, off = parse_args([*argv, "--workflow-profile", "none"])  # the documented way to leave it out
    assert off.scheduler == ("greedy" if profiles else "ilp")
    assert off.rerun_incomplete == bool(profiles)


def test_smoke_config_has_the_default_configs_shape(tmp_path):
    """CI's smoke run (README block ci:smoke) runs every rule of the main job: the same sections and
    dataset/models as config/config.yaml, a few cells each."""
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    smoke = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    sections = ("train", "vn", "reconstruct")
    assert all(s in default for s in sections) and all(s in smoke for s in sections)
    for s in sections:
        assert {k: smoke[s]["defaults"][k] for k in ("dataset", "model")} == \
            {k: default[s]["defaults"][k] for k in ("dataset", "model")}
    counts = snakemake_api(tmp_path, [REPO / "config" / "smoke.yaml"], dryrun=True)
    assert counts == {"data": 1, "train": 4, "aggregate": 1, "plot": 1, "vn": 4, "vn_report": 1,
                      "reconstruct": 2, "reconstruct_report": 1, "all": 1, "total": 16}


def _readme_ci_blocks() -> dict[str, str]:
    """``{name: commands}`` of the README's fenced blocks after ``<!-- ci:NAME -->`` markers, in order."""
    text = (REPO / "README.md").read_text()
    return dict(re.findall(r"^<!-- ci:([a-z]+) -->\n```bash\n(.*?)^```", text, flags=re.M | re.S))


def test_ci_runs_every_readme_block_and_the_slow_tests_and_smoke_run():
    blocks = _readme_ci_blocks()
    run = (REPO / ".ci" / "run").read_text()
    assert re.findall(r"^run_block (\w+)$", run, flags=re.M) == list(blocks)
    assert list(blocks) == ["setup", "test", "slow", "smoke", "integration"]
    assert blocks["slow"].strip() == ".venv/bin/python -m pytest -m slow"
    smoke = blocks["smoke"].strip().splitlines()
    assert smoke[0] == ".venv/bin/snakemake --cores all --configfile config/smoke.yaml"
    assert smoke[1].startswith(".venv/bin/snakemake --configfile config/smoke.yaml --report ")


def test_without_configfile_the_default_config_is_used(tmp_path):
    counts = snakemake_api(tmp_path, [], dryrun=True)
    assert counts["train"] == 18


def test_local_copy_of_a_dataset_is_an_input_of_the_data_job(tmp_path):
    cfg = {"data": {"sources": {"phishing": str(tmp_path / "missing.libsvm")}},
           "train": {"defaults": {"model": "logit", "dataset": "phishing", "steps": 1}, "grid": [{"seed": [1]}]}}
    from snakemake.exceptions import MissingInputException

    with pytest.raises(MissingInputException, match="missing.libsvm"):
        snakemake_api(tmp_path, [write_config(tmp_path / "c.yaml", cfg)], dryrun=True)


@pytest.mark.parametrize(
    ("train", "fragment"),
    [
        ({"grid": [{"gar": ["krumm"]}]}, "config error: train.grid[0].gar[0]: 'krumm' is not allowed: "),
        ({"defaults": {"batch_size": "ten"}}, "config error: train.defaults.batch_size: 'ten' is not allowed"),
    ],
)
def test_config_errors_stop_the_workflow_before_any_job(tmp_path, train, fragment):
    from snakemake.exceptions import WorkflowError

    cfg = write_config(tmp_path / "bad.yaml", {"train": train})
    with pytest.raises(WorkflowError) as info:
        snakemake_api(tmp_path, [cfg], dryrun=True)
    assert fragment in str(info.value)
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------------------------- #
# A tiny real run (2 cells, --cores 2) and what a change would rerun


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    config = write_config(workdir / "tiny.yaml", tiny_config())
    counts = snakemake_api(workdir, [config], dryrun=False, cores=2)
    return workdir, config, counts


def test_tiny_run_produces_cells_summaries_and_figures(tiny_run):
    workdir, config, counts = tiny_run
    assert counts == {"train": 2, "aggregate": 1, "plot": 1, "all": 1, "total": 5}
    cells = cells_of(yaml.safe_load(config.read_text()))
    for spec in cells.values():
        frame = pd.read_parquet(workdir / spec.path("results"))
        assert list(frame["step"]) == list(range(11)) and (frame["cell_id"] == spec.cell_id()).all()
        assert (workdir / "logs" / "train" / f"{spec.cell_id()}.log").read_text().strip().endswith(".parquet")
    summary = summary_paths(workdir / "results" / "summary")
    metrics = pd.read_parquet(summary["metrics"])
    assert len(metrics) == 2 * 11 and set(metrics["cell_id"]) == set(cells)
    final = pd.read_csv(summary["final_csv"])
    assert sorted(final["pair"]) == ["average/none", f"mda/{LITTLE}"]
    assert (final["runs"] == 1).all() and final["accuracy_mean"].between(0, 1).all()
    group = figure_group(SYNTH.replace("d=68,classes=2", "classes=2,d=68"), "logit")
    for path in figure_paths(workdir / "results" / "figures", group, ["html", "png"]):
        data = path.read_bytes()
        assert len(data) > 1000, path
        if path.suffix == ".png":
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert b"<script src=\"http" not in data and b"cdn.jsdelivr" not in data


def test_unchanged_config_runs_nothing(tiny_run):
    workdir, config, _ = tiny_run
    assert snakemake_api(workdir, [config], dryrun=True).get("total", 0) == 0


def test_adding_a_grid_value_runs_only_the_new_cell(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    cfg = tiny_config()
    cfg["train"]["grid"][1]["batch_size"] = [10, 20]
    counts = snakemake_api(workdir, [write_config(tmp_path / "more.yaml", cfg)], dryrun=True)
    assert counts == {"train": 1, "aggregate": 1, "plot": 1, "all": 1, "total": 4}


def test_changing_one_cells_parameter_reruns_only_that_cell(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    cfg = tiny_config()
    cfg["train"]["grid"][1]["attack"] = "little(factor=2,negative=true)"
    counts = snakemake_api(workdir, [write_config(tmp_path / "changed.yaml", cfg)], dryrun=True)
    assert counts["train"] == 1


def test_new_code_version_reruns_every_cell_and_device_reruns_none(tiny_run, tmp_path):
    workdir, config, _ = tiny_run
    assert snakemake_api(workdir, [config], dryrun=True, config={"code_version": "fix-1"})["train"] == 2
    assert snakemake_api(workdir, [config], dryrun=True, config={"device": "auto"}).get("total", 0) == 0


def test_summary_std_is_over_seeds(tiny_run):
    workdir, _, _ = tiny_run
    final = pd.read_parquet(summary_paths(workdir / "results" / "summary")["final"])
    assert final["accuracy_std"].isna().all()  # one seed: undefined, not 0
    assert all(math.isfinite(v) for v in final["accuracy_mean"])
