# Figures: one plot job per (dataset, model) group of training cells.


def _report_format():
    """The format shown in `snakemake --report` (PNG when produced; else SVG; else HTML)."""
    return next(f for f in ("png", "svg", "html") if f in PLOT_FORMATS)


def plot_outputs():
    """Named outputs `<figure>_<format>`; the report format is marked for `snakemake --report`."""
    shown = _report_format()
    outputs = {}
    for figure in layout.FIGURES:
        for fmt in PLOT_FORMATS:
            path = str(layout.figure_path(FIGURES_DIR, "{group}", figure, fmt))
            if fmt == shown:
                path = report(
                    path,
                    caption=f"../report/{figure}.rst",
                    category="Figures",
                    subcategory="{group}",
                    labels={"group": "{group}", "figure": figure},
                )
            outputs[f"{figure}_{fmt}"] = path
    return outputs


rule plot:
    """The study's figures for one (dataset, model) group (`dpbr plot`): test accuracy and training
    loss vs step faceted by privacy (rows) and batch size (columns), colour = rule/attack, band =
    ± std over seeds (figures 2, 3, 6); final accuracy vs batch size per privacy setting. HTML is
    self-contained (works offline); PNG/SVG come from vl-convert.
    """
    input:
        curves=summary_files()["curves"],
        final=summary_files()["final"],
    output:
        **plot_outputs(),
    params:
        dataset=lambda wc: FIGURE_GROUPS[wc.group][0],
        model=lambda wc: FIGURE_GROUPS[wc.group][1],
        formats=",".join(PLOT_FORMATS),
        summary_dir=SUMMARY_DIR,
        out_dir=FIGURES_DIR,
    log:
        os.path.join(LOGS, "plot", "{group}.log"),
    localrule: True
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "{PYTHON} -m dpbr plot --summary-dir {params.summary_dir:q} --out-dir {params.out_dir:q}"
        " --dataset {params.dataset:q} --model {params.model:q} --formats {params.formats} > {log:q} 2>&1"
