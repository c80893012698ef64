# Gradient-inversion cells (`dpbr reconstruct`) and their report.
#
# Cells come from the `reconstruct:` section (fields of dpbr.spec.ReconSpec). A grid cell attacks the
# model in its initial state (`state: initial`, as `dpbr train` with the same seed starts). The section
# may name `trajectories` (as `vn.trajectories`: training runs and steps); every grid cell of the same
# dataset and model is then also attacked at each of those checkpoints — the model in training, as the
# study attacks LeNet "in the middle of the training". The run is the `trajectory` job of vn.smk
# (`<results>/trajectories/<run id>.ckpt/step=S.pt`); the cell's state is that file (its id names the
# step and a digest of the path, which holds the run id), and its job reads the checkpoint folder, so
# it runs after the training job and again when the checkpoints change.

from dpbr.report import inversion_report as dpbr_inversion_report


def _with_checkpoint_states(cells):
    """The grid's cells (state initial only: any other state comes from `reconstruct.trajectories`), plus
    each of them at every checkpoint of every trajectory of its dataset and model; and
    ``{state path: run id}`` of those checkpoints."""
    out, tokens = dict(cells), {}
    for spec in cells.values():
        if spec.state != "initial":
            raise WorkflowError(
                f"config error: reconstruct: state {spec.state!r}: a grid cell attacks the initial model; name "
                "the training run and its steps under reconstruct.trajectories (or attack a checkpoint with "
                "`dpbr reconstruct --state FILE`)")
    for token, (run, steps) in RECON_TRAJECTORIES.items():
        matching = [s for s in cells.values() if (s.dataset, s.model) == (run.dataset, run.model)]
        if not matching:
            raise WorkflowError(f"config error: reconstruct.trajectories: no reconstruct cell has the run's dataset "
                                f"and model ({run.dataset}, {run.model})")
        for spec in matching:
            for step in steps:
                path = trajectory_checkpoint(token, step)
                try:
                    moved = replace_spec(spec, state=path)
                except UsageError as exc:
                    raise WorkflowError(f"config error: reconstruct.trajectories: {exc.one_line()}") from None
                out[moved.cell_id()] = moved
                tokens[path] = token
    return out, tokens


RECON, RECON_STATE_RUNS = _with_checkpoint_states(RECON)
RECON_CELLS = CellSection("reconstruct", ReconSpec, RECON)
RECON_FILES = RECON_CELLS.targets()


def recon_checkpoint(wildcards):
    """The checkpoint folder a reconstruction cell reads (none at the initial model)."""
    spec = RECON_CELLS.lookup(wildcards)
    return [] if spec.state == "initial" else [trajectory_dir(RECON_STATE_RUNS[spec.state])]


rule reconstruct:
    """One gradient-inversion cell (`dpbr reconstruct`): the attack on one batch's shared gradient
    under one defence → `<results>/reconstruct/<cell id>.parquet` (one row per image: MSE, PSNR, SSIM,
    label, success flags) and `.png` (originals above, reconstructions below). Named `reconstruct`
    so that the slurm-gpu profile gives it a GPU."""
    input:
        data_inputs(RECON_CELLS),
        checkpoint=recon_checkpoint,
    output:
        parquet=RECON_CELLS.pattern(),
        png=RECON_CELLS.pattern(suffix=".png"),
    wildcard_constraints:
        **RECON_CELLS.constraints(),
    params:
        args=lambda wc: shell_args(RECON_CELLS.lookup(wc).cli_args()),
        code_version=CODE_VERSION,
    log:
        RECON_CELLS.log(),
    threads: RECON_RESOURCES["threads"]
    resources:
        mem_mb=RECON_RESOURCES["mem_mb"],
        runtime=RECON_RESOURCES["runtime"],
        gpu=RECON_RESOURCES["gpu"],
    shell:
        "{PYTHON} -m dpbr reconstruct {params.args} --out {output.parquet:q} --png {output.png:q}"
        " --data-dir {DATA_DIR_Q} --device {DEVICE} --threads {threads} --quiet > {log:q} 2>&1"


def recon_report_outputs():
    """``{name: path}`` of the reconstruction report: tables, and every figure in every format."""
    out = {k: os.path.join(SUMMARY_DIR, f) for k, f in dpbr_inversion_report.SUMMARY_FILES.items()}
    for figure in report_figures(dpbr_inversion_report.FIGURES, bool(TRAIN)):
        for fmt in PLOT_FORMATS:
            path = os.path.join(RECON_FIGURES_DIR, f"{figure}.{fmt}")
            if fmt == _report_format():
                path = report(path, caption=f"../report/reconstruct_{figure}.rst", category="Gradient inversion",
                              labels={"figure": figure})
            out[f"{figure}_{fmt}"] = path
    out["table_csv"] = report(out["table_csv"], caption="../report/reconstruct_table.rst",
                              category="Gradient inversion", labels={"table": "reconstruction quality"})
    return out


rule reconstruct_report:
    """Summary of every reconstruction cell (`dpbr reconstruct-report`): all image rows, a table over
    seeds per cell, PSNR and success rate vs batch size per defence, and — with training cells — the
    privacy–utility chart."""
    input:
        cells=RECON_FILES,
        final=[summary_files()["final"]] if TRAIN else [],
    output:
        **recon_report_outputs(),
    params:
        train_final=["--train-final", summary_files()["final"]] if TRAIN else [],
        formats=",".join(PLOT_FORMATS),
    log:
        os.path.join(LOGS, "reconstruct_report.log"),
    localrule: True
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "printf '%s\\n' {input.cells:q} | {PYTHON} -m dpbr reconstruct-report --files-from - {params.train_final:q}"
        " --summary-dir {SUMMARY_DIR:q} --out-dir {RECON_FIGURES_DIR:q} --formats {params.formats} --quiet > {log:q} 2>&1"
