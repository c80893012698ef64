"""dpbr: the experiment workflow (Snakemake >= 9).

    snakemake --cores all                                  # the default grid (config/config.yaml)
    snakemake --cores all --configfile config/paper.yaml   # the study (arXiv 2102.08166)
    snakemake --profile slurm                              # on a SLURM cluster
    snakemake --report results/report.html                 # figures with captions, offline

Without --configfile the default config/config.yaml is used; with one (or several, merged in
order) only those are used: each config file describes a whole experiment. The configuration is
checked against workflow/schemas/config.schema.yaml (defaults filled in) and every cell is built
with its spec before any job starts. Rules live in workflow/rules/; the README ("The workflow")
explains outputs, reruns and cluster use.

Every snakemake command also reads the workflow profile profiles/default (a link to
workflow/profiles/default): rerun-incomplete, keep-going, greedy scheduler, so an interrupted run
resumes with the same command. After `kill -9` of Snakemake: `snakemake --unlock` once.
"""

import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from dpbr.report.grid import schema_error_message

min_version("9.0")

if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config", "config.yaml")


try:
    validate(config, "workflow/schemas/config.schema.yaml")
except WorkflowError as exc:
    cause = exc.__context__
    detail = schema_error_message(cause) if hasattr(cause, "validator") else " ".join(str(exc).split())
    raise WorkflowError(f"config error: {detail}") from None


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/plots.smk"
include: "workflow/rules/vn.smk"
include: "workflow/rules/reconstruct.smk"


rule all:
    """Every configured cell (training, VN ratio, reconstruction), the summaries and the figures."""
    input:
        all_targets(),
    localrule: True
    default_target: True
