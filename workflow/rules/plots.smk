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


# --- Heterogeneous data: the bucketing paper's table and figures ---------------------------------
#
# Only for grids with a non-IID partition or a bucketing rule (dpbr.report.hetero_report.applies), so
# the other configurations' jobs are unchanged.

from dpbr.report import hetero_report as dpbr_hetero_report

HETERO_FIGURES_DIR = os.path.join(FIGURES_DIR, "hetero")
#: Whether the training grid gets the heterogeneous-data report (rule hetero_report).
HETERO = bool(TRAIN) and dpbr_hetero_report.applies(TRAIN.values())


def hetero_report_outputs():
    """``{name: path}`` of the heterogeneous-data report: the table (CSV, Markdown) and every figure
    in every format; the report format and the CSV are flagged for `snakemake --report`."""
    out = {k: os.path.join(SUMMARY_DIR, f) for k, f in dpbr_hetero_report.SUMMARY_FILES.items()}
    out["table_csv"] = report(out["table_csv"], caption="../report/hetero_table.rst", category="Heterogeneous data",
                              labels={"table": "accuracy with and without bucketing"})
    for figure in dpbr_hetero_report.FIGURES:
        for fmt in PLOT_FORMATS:
            path = os.path.join(HETERO_FIGURES_DIR, f"{figure}.{fmt}")
            if fmt == _report_format():
                path = report(path, caption=f"../report/hetero_{figure}.rst", category="Heterogeneous data",
                              labels={"figure": figure})
            out[f"{figure}_{fmt}"] = path
    return out


rule hetero_report:
    """The bucketing paper's exp2 table (rule × {IID, non-IID} × bucket size s: mean ± std over seeds of
    the last-5-evaluation accuracy) as CSV and Markdown, and its figures: that table, accuracy curves
    per attack and rule, and how often each worker was selected (`dpbr hetero-report`; Karimireddy, He
    & Jaggi 2022, arXiv 2006.09365). Reads the selection counts when `dpbr aggregate` writes them."""
    input:
        final=summary_files()["final"],
        curves=summary_files()["curves"],
        selections=[summary_files()["selections"]] if "selections" in summary_files() else [],
    output:
        **hetero_report_outputs(),
    params:
        formats=",".join(PLOT_FORMATS),
    log:
        os.path.join(LOGS, "hetero_report.log"),
    localrule: True
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "{PYTHON} -m dpbr hetero-report --summary-dir {SUMMARY_DIR:q} --out-dir {HETERO_FIGURES_DIR:q}"
        " --formats {params.formats} --quiet > {log:q} 2>&1"


# --- Robust systems: DRACO, GuanYu, LiuBei, lossy networks, staleness ----------------------------
#
# Only for grids with a system, network or staleness other than the defaults
# (dpbr.report.systems_report.applies), so the other configurations' jobs are unchanged.

from dpbr.report import systems_report as dpbr_systems_report

SYSTEMS_FIGURES_DIR = os.path.join(FIGURES_DIR, "systems")
#: Whether the training grid gets the robust-systems report (rule systems_report).
SYSTEMS_REPORT = bool(TRAIN) and dpbr_systems_report.applies(TRAIN.values())


def systems_report_outputs():
    """``{name: path}`` of the robust-systems report: the table and the claims (CSV, Markdown) and every
    figure in every format; the report format and the CSVs are flagged for `snakemake --report`."""
    out = {k: os.path.join(SUMMARY_DIR, f) for k, f in dpbr_systems_report.SUMMARY_FILES.items()}
    out["table_csv"] = report(out["table_csv"], caption="../report/systems_table.rst", category="Robust systems",
                              labels={"table": "systems: accuracy and costs"})
    out["claims_csv"] = report(out["claims_csv"], caption="../report/systems_claims.rst", category="Robust systems",
                               labels={"table": "systems: claims checked"})
    for figure in dpbr_systems_report.FIGURES:
        for fmt in PLOT_FORMATS:
            path = os.path.join(SYSTEMS_FIGURES_DIR, f"{figure}.{fmt}")
            if fmt == _report_format():
                path = report(path, caption=f"../report/systems_{figure}.rst", category="Robust systems",
                              labels={"figure": figure})
            out[f"{figure}_{fmt}"] = path
    return out


rule systems_report:
    """The robust systems against the one-server runs (`dpbr systems-report`): a table of every group's
    accuracy, costs per step (gradients, messages, bytes, rounds, simulated seconds) and what the system
    did; the papers' claims with the measured evidence and a verdict (DRACO, Chen et al. 2018, arXiv
    1803.09877; GuanYu, El Mhamdi et al. 2019, arXiv 1905.03853; LiuBei, El Mhamdi, Guerraoui, Guirguis,
    PODC 2020; AggregaThor, Damaskinos et al., SysML 2019); and their figures."""
    input:
        metrics=summary_files()["metrics"],
        final=summary_files()["final"],
    output:
        **systems_report_outputs(),
    params:
        formats=",".join(PLOT_FORMATS),
    log:
        os.path.join(LOGS, "systems_report.log"),
    localrule: True
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{PYTHON} -m dpbr systems-report --summary-dir {SUMMARY_DIR:q} --out-dir {SYSTEMS_FIGURES_DIR:q}"
        " --formats {params.formats} --quiet > {log:q} 2>&1"
