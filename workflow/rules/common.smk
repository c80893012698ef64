# Shared by every rule file: the configuration's grids → cells → paths.
#
# Cells come from `dpbr.report.grid.expand` (defaults + a list of sub-grids, each cell built and
# validated with its spec's `create`), and every path from the spec itself (`spec.path(root)`, the
# function `dpbr train` uses), so the workflow and the command line cannot disagree on names.
# A new section (vn:, reconstruct:) needs: its spec class in SECTION_SPECS, `section_cells(...)`,
# a `CellSection` of its cells, a rule whose output is `section.pattern()`, its targets in
# `all_targets()`, and its schema.

import functools
import os
import shlex
import sys

import dpbr
from dpbr import data as dpbr_data
from dpbr.errors import UsageError
from dpbr.registry import parse as parse_spec_string
from dpbr.report import grid as dpbr_grid
from dpbr.report import layout
from dpbr.spec import ReconSpec, RunSpec, VNSpec, path_token
from snakemake.exceptions import WorkflowError


# --- settings (validated, defaults filled in by the schema) -------------------------------------

#: The interpreter running Snakemake (the venv's): jobs call `python -m dpbr`, no activation needed.
PYTHON = shlex.quote(sys.executable)
RESULTS = config["results"]
SUMMARY_DIR = os.path.join(RESULTS, "summary")
FIGURES_DIR = os.path.join(RESULTS, "figures")
LOGS = "logs"
DATA_DIR = config["data"]["dir"]
DATA_DIR_Q = shlex.quote(DATA_DIR)
#: Execution setting, not part of a cell: used in the shell command only (changing it reruns nothing).
DEVICE = shlex.quote(config["device"])
#: Recorded with every cell through `params:` — a new value reruns every cell (code changes, see the notes).
CODE_VERSION = str(config["code_version"] or dpbr.__version__)
TRAIN_RESOURCES = config["resources"]["train"]
VN_RESOURCES = config["resources"]["vn"]
RECON_RESOURCES = config["resources"]["reconstruct"]
PLOT_FORMATS = list(config["plots"]["formats"])

wildcard_constraints:
    dataset=r"[^/]+",
    group=r"[^/]+",


def shell_args(args):
    """A cell's command-line arguments as one shell-quoted string (``shlex.join``), used as
    ``{params.args}`` in `shell:`: formatting one string is several times cheaper than Snakemake
    quoting a list item by item (``{params.args:q}``), three times per job in a dry run."""
    return shlex.join(args)


# --- grid → cells ------------------------------------------------------------------------------

#: Spec class of each configuration section that names cells.
SECTION_SPECS = {"train": RunSpec, "vn": VNSpec, "reconstruct": ReconSpec}


def section_cells(section, spec_cls=None):
    """``{cell id: spec}`` of one configuration section (defaults + sub-grids); a bad value stops
    the workflow with one line naming the key, the value and what is allowed."""
    spec_cls = spec_cls or SECTION_SPECS[section]
    try:
        return dpbr_grid.expand(config.get(section), spec_cls, section)
    except UsageError as exc:
        raise WorkflowError(f"config error: {exc.one_line()}") from None


@functools.cache
def spec_field_names(spec_cls):
    """The fields of a spec class, as a tuple."""
    return tuple(dpbr_grid.spec_fields(spec_cls))


def varying_fields(spec_cls, cells):
    """The fields whose values differ between the cells (every field when there is no cell).

    Only these become wildcards of a section's patterns; the others are written out as they are in
    every cell's path. Snakemake's cost per job grows with the number of wildcards (matching,
    wildcard containers, formatting): the paper grid's training cells vary in 9 of 21 fields.
    """
    specs = list(cells.values())
    if not specs:
        return spec_field_names(spec_cls)
    first = specs[0]
    return tuple(name for name in spec_field_names(spec_cls)
                 if any(getattr(spec, name) != getattr(first, name) for spec in specs[1:]))


def _wildcard_form(spec_cls, cells, render):
    """``render(stand_in)`` for a stand-in spec whose varying fields are the wildcards ``{field}``
    and whose other fields are those of the section's cells.

    The stand-in's varying fields are alphanumeric sentinels (left alone by the spec's path-token
    formatting), replaced by ``{field}`` afterwards: the pattern is produced by the spec's own
    ``cell_id``/``path`` code, not rebuilt here.
    """
    varying = varying_fields(spec_cls, cells)
    first = next(iter(cells.values()), None)
    sentinels = {name: f"QQwildcard{i}QQ" for i, name in enumerate(varying)}

    class _StandIn:
        kind = spec_cls.kind
        layout = spec_cls.layout

        def cell_id(self):
            return spec_cls.cell_id(self)

        def state_token(self):  # ReconSpec names its model state by a token; in a pattern it is the wildcard
            return self.state if "state" in sentinels else first.state_token()

    stand_in = _StandIn()
    for name in spec_field_names(spec_cls):
        setattr(stand_in, name, sentinels[name] if name in sentinels else getattr(first, name))
    text = str(render(stand_in))
    for name, sentinel in sentinels.items():
        text = text.replace(sentinel, "{" + name + "}")
    return text


class CellSection:
    """The cells of one configuration section and the Snakemake patterns that name them.

    ``id_pattern`` is the cell id with one wildcard per *varying* field (``seed={seed},...``; fields
    equal in every cell are written out). One wildcard per field, not one for the whole id: a cell id
    contains commas and is longer than a file name may be, and cluster executors pass wildcards as
    ``key=value,...`` (Snakemake 9.27 splits that at every comma) and the SLURM plugin names a log
    folder after the joined wildcards. Field tokens contain neither ``,`` nor ``/``
    (``dpbr.spec.path_token``).
    """

    def __init__(self, name, spec_cls, cells):
        self.name = name
        self.spec_cls = spec_cls
        self.cells = cells
        self.fields = varying_fields(spec_cls, cells)
        self.id_pattern = _wildcard_form(spec_cls, cells, lambda s: s.cell_id())

    def pattern(self, root=RESULTS, suffix=".parquet"):
        """Output pattern of the cells: ``spec.path(root, suffix)`` with the wildcards."""
        return _wildcard_form(self.spec_cls, self.cells, lambda s: self.spec_cls.path(s, root, suffix))

    def log(self):
        """Log pattern: ``logs/<section>/<cell id>.log``."""
        return os.path.join(LOGS, self.name, self.id_pattern + ".log")

    def constraints(self):
        """Wildcard constraints of the patterns: a field token never contains ``,`` or ``/``."""
        return {name: r"[^,/]+" for name in self.fields}

    def targets(self, root=RESULTS):
        """The output files of the cells (``spec.path(root)``), in configuration order."""
        return [str(spec.path(root)) for spec in self.cells.values()]

    def lookup(self, wildcards):
        """The spec of the cell named by a job's wildcards; a file that is not a configured cell is an
        error, not a guess."""
        cell = self.id_pattern.format(**{k: getattr(wildcards, k) for k in self.fields})
        try:
            return self.cells[cell]
        except KeyError:
            raise WorkflowError(
                f"{self.name} cell {cell!r} is not in the configured grid (every cell's path comes from its "
                "spec; add it to the config to run it)"
            ) from None


TRAIN = section_cells("train")
TRAIN_CELLS = CellSection("train", RunSpec, TRAIN)
TRAIN_FILES = TRAIN_CELLS.targets()
VN = section_cells("vn")  # with the trajectories' checkpoints added in vn.smk (VN_CELLS)
RECON = section_cells("reconstruct")
RECON_CELLS = CellSection("reconstruct", ReconSpec, RECON)
RECON_FILES = RECON_CELLS.targets()


# --- datasets ----------------------------------------------------------------------------------


def is_generated(dataset):
    """Whether a dataset is generated in memory (``synthetic(...)``): no data job, no cache file."""
    return parse_spec_string(dataset, option="--dataset")[0][0] == "synthetic"


def _cache_stem(dataset):
    npz, _ = dpbr_data.cache_paths(dataset, DATA_DIR)
    return npz.name[: -len(".npz")]


def _datasets():
    """``{cache stem: dataset name}`` of every stored dataset the cells use."""
    cells = [*TRAIN.values(), *VN.values(), *RECON.values()]
    names = {spec.dataset for spec in cells if not is_generated(spec.dataset)}
    return {_cache_stem(name): name for name in sorted(names)}


def _sources():
    """``{canonical dataset name: local file}`` from ``data.sources``."""
    out = {}
    for name, path in config["data"]["sources"].items():
        try:
            canonical = dpbr_data.canonical_name(str(name))
        except UsageError as exc:
            raise WorkflowError(f"config error: data.sources.{name}: {exc.message}") from None
        if is_generated(canonical):
            raise WorkflowError(f"config error: data.sources.{name}: synthetic data is generated, not imported")
        out[canonical] = path
    return out


DATASETS = _datasets()
DATA_SOURCES = _sources()


@functools.cache
def dataset_files(dataset):
    """``[npz, manifest]`` cache files of a stored dataset (``dpbr.data.cache_paths``); [] if generated."""
    if is_generated(dataset):
        return ()
    return tuple(str(p) for p in dpbr_data.cache_paths(dataset, DATA_DIR))


def data_inputs(section):
    """The dataset cache files a section's jobs read, as `ancient` inputs (a job waits for the data
    job, but a re-fetched cache — same verified content, newer time stamp — reruns nothing).

    Plain paths or patterns where they can be: one literal pair when every cell uses the same stored
    dataset, ``<data dir>/{dataset}.npz``/``.json`` when the cells' datasets differ and each cache
    file is named by the dataset's path token (``mnist``, ``phishing``). Otherwise (generated data,
    other names) a function of the job's cell. Snakemake calls and inspects an input function once
    per job, which costs as much as the rest of the job's entry in a dry run.
    """
    datasets = {spec.dataset for spec in section.cells.values()}
    if datasets and not any(is_generated(name) for name in datasets):
        if "dataset" not in section.fields:
            (name,) = datasets
            return [ancient(f) for f in dataset_files(name)]
        patterns = tuple(os.path.join(DATA_DIR, "{dataset}" + ext) for ext in (".npz", ".json"))
        if "{" not in DATA_DIR and "}" not in DATA_DIR and all(
            dataset_files(name) == tuple(str(p.format(dataset=path_token(name))) for p in patterns)
            for name in datasets
        ):
            return [ancient(p) for p in patterns]

    def cell_data(wildcards):
        return [ancient(f) for f in dataset_files(section.lookup(wildcards).dataset)]

    return cell_data


# --- figures -----------------------------------------------------------------------------------

#: ``{group: (dataset, model)}``: one set of figures per (dataset, model) of the training cells.
FIGURE_GROUPS = {layout.figure_group(s.dataset, s.model): (s.dataset, s.model) for s in TRAIN.values()}


def figure_files(group):
    """Every figure file of one group (``dpbr.report.layout.figure_paths``)."""
    return [str(p) for p in layout.figure_paths(FIGURES_DIR, group, PLOT_FORMATS)]


def summary_files():
    """``{key: path}`` of the tables written by ``dpbr aggregate``."""
    return {k: str(p) for k, p in layout.summary_paths(SUMMARY_DIR).items()}


# --- targets -----------------------------------------------------------------------------------


#: Figures of the VN and reconstruction reports (``dpbr vn-report``, ``dpbr reconstruct-report``); the
#: last of each compares with the training grid and exists only when there are training cells.
VN_FIGURES_DIR = os.path.join(FIGURES_DIR, "vn")
RECON_FIGURES_DIR = os.path.join(FIGURES_DIR, "reconstruct")


def report_figures(names, with_training):
    """Figure names of a report: all of them with training cells, else all but the comparison."""
    return list(names) if with_training else list(names[:-1])


def all_targets():
    """Every cell, and for each section with cells its summaries and figures.

    Plain paths: the report outputs come back from ``vn_report_outputs()`` and
    ``recon_report_outputs()`` flagged with ``report(caption=...)``, and Snakemake resolves a caption
    against the folder of the file that *uses* the flagged path. Used as inputs of rule ``all`` (in
    the Snakefile, one folder above the rule files), the flags would point the report at
    ``<repo>/../report/…`` and ``snakemake --report`` would fail; ``str()`` drops them, so only the
    producing rules (in ``workflow/rules/``) register figures and captions.
    """
    targets = list(TRAIN_FILES) + list(VN_FILES) + list(RECON_FILES)
    if TRAIN:
        targets += list(summary_files().values())
        for group in FIGURE_GROUPS:
            targets += figure_files(group)
        if HETERO:  # plots.smk: non-IID partitions or bucketing rules
            targets += hetero_report_outputs().values()
        if SYSTEMS_REPORT:  # plots.smk: a system, network or staleness other than the defaults
            targets += systems_report_outputs().values()
    if VN:
        targets += vn_report_outputs().values()
    if RECON:
        targets += recon_report_outputs().values()
    return [str(target) for target in targets]
