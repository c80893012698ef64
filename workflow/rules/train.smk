# Training cells: one file per cell of the `train:` grid, written by `dpbr train-many` jobs that run
# one cell (rule `train`) or a bundle of cells (rules `train_bundle_<group>_<mask>`), as the setting
# `train.bundle` says:
#
#   seeds       (default) the missing seeds of a cell run as one job
#   {cells: K}  up to K missing cells of one dataset and model run as one job (the process starts
#               once; cells that can be batched together — same n, f, b, rule, attack structure:
#               dpbr.jobs.bundles.compatibility_key — run as one batched simulation)
#   none        one job per cell
#
# Only MISSING files are bundled: a cell whose file exists stays with rule `train`, where Snakemake's
# own triggers decide whether it reruns (a new code_version, an incomplete file). So adding a seed
# runs only the new seed, and a changed value (a new path: a new cell) runs only the cells that hold
# it. Bundles come from fixed groups of the configured cells (dpbr.jobs.bundles.chunks), and a
# bundle's rule name gives its group and members, so a cluster job, which parses this workflow
# again while other jobs write files, rebuilds exactly the rule it was sent to run.

import re

from dpbr.jobs import bundles as dpbr_bundles

#: The command of every training job, one cell or a bundle: the same text, so what Snakemake records
#: of a file (code, params, input) does not depend on the job that wrote it, and a cell written by a
#: bundle is not rerun when a later run gives it to rule `train`. The cells reach the job as JSON on
#: standard input through `params.cells`, derived from the job's outputs and so outside the params
#: trigger (a cell's values are in its path already); `params.code_version` is the tracked value.
TRAIN_SHELL = (
    "printf '%s\\n' {params.cells} | {PYTHON} -m dpbr train-many - --data-dir {DATA_DIR_Q}"
    " --device {DEVICE} --threads {threads} > {log:q} 2>&1"
)
_TRAIN_BY_PATH = {os.path.normpath(spec.path(RESULTS)): spec for spec in TRAIN.values()}


def train_cells_param(wildcards, output):
    """The job's cells as a shell-quoted ``dpbr train-many`` list (JSON): each output file's spec."""
    paths = [str(f) for f in output]
    return shlex.quote(dpbr_bundles.cells_json([_TRAIN_BY_PATH[os.path.normpath(p)] for p in paths], paths))


rule train:
    """One simulated parameter-server run → `<results>/train/<cell id>.parquet`.

    Every value of the cell reaches the job through `params.cells` (its spec as JSON) and the
    package/code version through `params.code_version`, whose change reruns every cell (a changed
    value of a cell changes its path: it is a new cell). Data folder, device and threads are
    execution settings, not part of the cell. The output is written atomically by dpbr (never half a
    file); the log is `logs/train/<cell id>.log`. The rule is named `train` because the slurm-gpu
    profile gives GPUs to rules of that name; the bundle rules take its threads and resources.
    """
    input:
        data=data_inputs(TRAIN_CELLS),
    output:
        TRAIN_CELLS.pattern(),
    wildcard_constraints:
        **TRAIN_CELLS.constraints(),
    params:
        cells=train_cells_param,
        code_version=CODE_VERSION,
    log:
        TRAIN_CELLS.log(),
    threads: TRAIN_RESOURCES["threads"]
    resources:
        mem_mb=TRAIN_RESOURCES["mem_mb"],
        runtime=TRAIN_RESOURCES["runtime"],
        gpu=TRAIN_RESOURCES["gpu"],
    shell:
        TRAIN_SHELL




def _bundles_to_run():
    """Bundle rule names a cluster (or subprocess) job was sent to run, from its command line
    (`--target-jobs`, `--allowed-rules`); none in the main Snakemake process."""
    if not (workflow.remote_exec or workflow.subprocess_exec):
        return []
    return sorted({m for arg in sys.argv for m in re.findall(r"train_bundle_[0-9a-f]{12}_[0-9a-f]+", arg)})


_TRAIN_TARGETS = _bundles_to_run()
TRAIN_GROUPS = dpbr_bundles.chunks(list(TRAIN.values()), config["train"]["bundle"])
TRAIN_ALONE, TRAIN_BUNDLES = dpbr_bundles.plan(
    TRAIN_GROUPS,
    # a cluster job builds only the bundle it runs (from its name), never one from the files it sees
    (lambda spec: False) if _TRAIN_TARGETS else (lambda spec: not os.path.exists(spec.path(RESULTS))),
    _TRAIN_TARGETS,
)
_TRAIN_RULE = rules.train.rule

for _bundle in TRAIN_BUNDLES:

    rule:
        name:
            _bundle.name
        input:
            data=[ancient(f) for f in dataset_files(_bundle.specs[0].dataset)],
        output:
            [str(spec.path(RESULTS)) for spec in _bundle.specs],
        params:
            cells=train_cells_param,
            code_version=CODE_VERSION,
        log:
            os.path.join(LOGS, "train", "bundles", _bundle.name + ".log"),
        shell:
            TRAIN_SHELL

    # the same threads and resources as rule `train`, with what a profile sets for it (set-resources,
    # set-threads: the slurm-gpu profile's GPU)
    workflow.get_rule(_bundle.name).resources = _TRAIN_RULE.resources.copy()
