# Summaries over all training cells.


rule aggregate:
    """Concatenate every configured cell into `<results>/summary/metrics.parquet` and tabulate the
    final test accuracy (mean ± std over seeds) as Parquet and CSV, plus the per-step curves the
    figures need and the selection counts per cell and worker (`dpbr aggregate`; names from
    `dpbr.report.layout`).

    Only the configured cells are read (their paths are piped in with a shell built-in, so no
    command-line length limit applies): files of cells removed from the grid stay on disk but do
    not enter the summaries.
    """
    input:
        TRAIN_FILES,
    output:
        metrics=summary_files()["metrics"],
        final=summary_files()["final"],
        final_csv=report(
            summary_files()["final_csv"],
            caption="../report/final_table.rst",
            category="Summary",
            labels={"table": "final test accuracy"},
        ),
        curves=summary_files()["curves"],
        selections=summary_files()["selections"],
    params:
        out_dir=SUMMARY_DIR,
    log:
        os.path.join(LOGS, "aggregate.log"),
    localrule: True
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "printf '%s\\n' {input:q} | {PYTHON} -m dpbr aggregate --files-from - --out-dir {params.out_dir:q} > {log:q} 2>&1"
