# Training cells: one `dpbr train` job per cell of the `train:` grid.


rule train:
    """One simulated parameter-server run → `<results>/train/<cell id>.parquet`.

    Every value of the cell reaches the job through `params.args` (the spec's own command-line
    form, shell-quoted), and the package/code version through `params.code_version`, so Snakemake's params
    trigger reruns exactly the cells whose values changed (a changed value also changes the cell's
    path: it is a new cell). Data folder, device and threads are execution settings, not part of
    the cell. The output is written atomically by dpbr (never half a file); the log is
    `logs/train/<cell id>.log`. The rule is named `train` because the slurm-gpu profile gives GPUs
    to rules of that name.
    """
    input:
        data=data_inputs(TRAIN_CELLS),
    output:
        TRAIN_CELLS.pattern(),
    wildcard_constraints:
        **TRAIN_CELLS.constraints(),
    params:
        args=lambda wc: shell_args(TRAIN_CELLS.lookup(wc).cli_args()),
        code_version=CODE_VERSION,
    log:
        TRAIN_CELLS.log(),
    threads: TRAIN_RESOURCES["threads"]
    resources:
        mem_mb=TRAIN_RESOURCES["mem_mb"],
        runtime=TRAIN_RESOURCES["runtime"],
        gpu=TRAIN_RESOURCES["gpu"],
    shell:
        "{PYTHON} -m dpbr train {params.args} --out {output:q} --data-dir {DATA_DIR_Q}"
        " --device {DEVICE} --threads {threads} > {log:q} 2>&1"
