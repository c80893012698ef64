# VN-ratio cells (`dpbr vn`), the training runs whose checkpoints they (and the reconstruction cells of
# reconstruct.smk) measure, and the VN report.
#
# A `vn:` cell measures the initial parameters (`run: init`) unless the section names
# `trajectories`: training runs (RunSpec fields) and the steps at which to measure them. Every grid
# cell is then also measured at each of those checkpoints (same dataset and model). The training run
# of a trajectory is its own job (rule `trajectory`): `dpbr train --checkpoint-steps` into
# `<results>/trajectories/<run id>.ckpt/step=S.pt`, named by `dpbr.spec.run_token`, the id `dpbr vn`
# checks against the checkpoint's stored spec.

from dpbr.report import vn_report as dpbr_vn_report
from dpbr.spec import replace as replace_spec
from dpbr.spec import run_token


def _trajectories(section):
    """``{run id: (RunSpec, steps)}`` of the ``<section>.trajectories`` entries (``vn`` or ``reconstruct``)."""
    out = {}
    for i, entry in enumerate((config.get(section) or {}).get("trajectories") or []):
        try:
            spec = RunSpec.create(**entry["train"])
        except UsageError as exc:
            raise WorkflowError(f"config error: {section}.trajectories[{i}].train: {exc.one_line()}") from None
        steps = sorted({int(s) for s in entry["steps"]})
        bad = [s for s in steps if s > spec.steps]
        if bad:
            raise WorkflowError(f"config error: {section}.trajectories[{i}].steps: {bad[0]} is beyond the run's "
                                f"{spec.steps} steps")
        token = run_token(spec)
        known = out.get(token)
        out[token] = (spec, sorted(set(steps) | set(known[1] if known else ())))
    return out


def _merged(*sections):
    """One ``{run id: (RunSpec, steps)}`` of several sections' trajectories: one training job per run,
    saving every step any section asks for."""
    out = {}
    for trajectories in sections:
        for token, (spec, steps) in trajectories.items():
            known = out.get(token)
            out[token] = (spec, sorted(set(steps) | set(known[1] if known else ())))
    return out


VN_TRAJECTORIES = _trajectories("vn")
#: the runs whose checkpoints the `reconstruct:` cells attack (reconstruct.smk)
RECON_TRAJECTORIES = _trajectories("reconstruct")
TRAJECTORIES = _merged(VN_TRAJECTORIES, RECON_TRAJECTORIES)


def _with_trajectories(cells):
    """The grid's cells, plus each of them at every checkpoint of every trajectory of its model."""
    out = dict(cells)
    for token, (run, steps) in VN_TRAJECTORIES.items():
        for spec in cells.values():
            if (spec.dataset, spec.model) != (run.dataset, run.model):
                continue
            for step in steps:
                moved = replace_spec(spec, run=token, step=step)
                out[moved.cell_id()] = moved
    return out


VN = _with_trajectories(VN)
VN_CELLS = CellSection("vn", VNSpec, VN)
VN_FILES = VN_CELLS.targets()


def trajectory_dir(token):
    return os.path.join(RESULTS, "trajectories", f"{token}.ckpt")


def trajectory_checkpoint(token, step):
    """The checkpoint file of run ``token`` at ``step`` (``dpbr train --checkpoint-steps``)."""
    return os.path.join(trajectory_dir(token), f"step={step}.pt")


def vn_checkpoint(wildcards):
    """The checkpoint folder a VN cell reads (none at the initial parameters)."""
    spec = VN_CELLS.lookup(wildcards)
    data = [ancient(f) for f in dataset_files(spec.dataset)]
    return data if spec.run == "init" else data + [trajectory_dir(spec.run)]


def vn_args(wildcards, input):
    spec = VN_CELLS.lookup(wildcards)
    where = "init" if spec.run == "init" else trajectory_checkpoint(spec.run, spec.step)
    return shell_args([*spec.cli_args(), "--checkpoint", where])


rule trajectory:
    """A training run of `vn.trajectories` or `reconstruct.trajectories` with checkpoints at the requested steps
    (`<results>/trajectories/<run id>.ckpt/step=S.pt`; its metrics beside, `<run id>.parquet`)."""
    input:
        lambda wc: [ancient(f) for f in dataset_files(TRAJECTORIES[wc.token][0].dataset)],
    output:
        checkpoints=directory(os.path.join(RESULTS, "trajectories", "{token}.ckpt")),
        metrics=os.path.join(RESULTS, "trajectories", "{token}.parquet"),
    wildcard_constraints:
        token=r"[0-9a-f]{12}",
    params:
        args=lambda wc: shell_args(TRAJECTORIES[wc.token][0].cli_args()),
        steps=lambda wc: ",".join(str(s) for s in TRAJECTORIES[wc.token][1]),
        code_version=CODE_VERSION,
    log:
        os.path.join(LOGS, "trajectory", "{token}.log"),
    threads: TRAIN_RESOURCES["threads"]
    resources:
        mem_mb=TRAIN_RESOURCES["mem_mb"],
        runtime=TRAIN_RESOURCES["runtime"],
        gpu=TRAIN_RESOURCES["gpu"],
    shell:
        "{PYTHON} -m dpbr train {params.args} --checkpoint-steps {params.steps} --checkpoint-dir {output.checkpoints:q}"
        " --out {output.metrics:q} --data-dir {DATA_DIR_Q} --device {DEVICE} --threads {threads} --quiet > {log:q} 2>&1"


rule vn:
    """One VN-ratio cell (`dpbr vn`): the ratio of the honest gradients at one parameter vector, b
    and privacy setting, with its bootstrap interval and every rule's condition →
    `<results>/vn/<cell id>.parquet`."""
    input:
        vn_checkpoint,
    output:
        VN_CELLS.pattern(),
    wildcard_constraints:
        **VN_CELLS.constraints(),
    params:
        args=vn_args,
        code_version=CODE_VERSION,
    log:
        VN_CELLS.log(),
    threads: VN_RESOURCES["threads"]
    resources:
        mem_mb=VN_RESOURCES["mem_mb"],
        runtime=VN_RESOURCES["runtime"],
        gpu=VN_RESOURCES["gpu"],
    shell:
        "{PYTHON} -m dpbr vn {params.args} --out {output:q} --data-dir {DATA_DIR_Q}"
        " --device {DEVICE} --threads {threads} --quiet > {log:q} 2>&1"


def vn_report_outputs():
    """``{name: path}`` of the VN report: the tables, and every figure in every format."""
    out = {k: os.path.join(SUMMARY_DIR, f) for k, f in dpbr_vn_report.SUMMARY_FILES.items()}
    for figure in report_figures(dpbr_vn_report.FIGURES, bool(TRAIN)):
        for fmt in PLOT_FORMATS:
            path = os.path.join(VN_FIGURES_DIR, f"{figure}.{fmt}")
            if fmt == _report_format():
                path = report(path, caption=f"../report/vn_{figure}.rst", category="VN ratio",
                              labels={"figure": figure})
            out[f"{figure}_{fmt}"] = path
    out["min_b_csv"] = report(out["min_b_csv"], caption="../report/vn_min_b.rst", category="VN ratio",
                              labels={"table": "minimal batch size"})
    return out


rule vn_report:
    """Summary of every VN cell (`dpbr vn-report`): all rows, the minimal-b table per rule next to the
    Table-1 scaling, ratio vs b with the k_F lines, and — with training cells — final accuracy vs
    the measured ratio."""
    input:
        cells=VN_FILES,
        final=[summary_files()["final"]] if TRAIN else [],
    output:
        **vn_report_outputs(),
    params:
        train_final=["--train-final", summary_files()["final"]] if TRAIN else [],
        formats=",".join(PLOT_FORMATS),
    log:
        os.path.join(LOGS, "vn_report.log"),
    localrule: True
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "printf '%s\\n' {input.cells:q} | {PYTHON} -m dpbr vn-report --files-from - {params.train_final:q}"
        " --summary-dir {SUMMARY_DIR:q} --out-dir {VN_FIGURES_DIR:q} --formats {params.formats} --quiet > {log:q} 2>&1"
