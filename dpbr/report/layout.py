"""Names of the summary files and figures: the one place they are built.

``dpbr aggregate``/``dpbr plot`` write these files and the Snakemake rules declare them as outputs,
both through the functions here (DESIGN: one source of truth for names). No heavy imports: the
Snakefile imports this module while parsing.

Layout under the results root (default ``results``)::

    results/train/<cell id>.parquet                       one file per cell (dpbr.spec.CellSpec.path)
    results/summary/metrics.parquet                       every row of every cell
    results/summary/final_accuracy.{parquet,csv}          mean ± std over seeds per cell
    results/summary/curves.parquet                        per-step means ± std over seeds (for plots)
    results/summary/selections.parquet                    per cell and worker: steps the rule selected it
    results/figures/<group>/<figure>.{html,png,svg}       group = "dataset=<d>,model=<m>"
"""

from __future__ import annotations

from pathlib import Path

from dpbr.spec import path_token

__all__ = [
    "FIGURES",
    "FORMATS",
    "SUMMARY_FILES",
    "figure_group",
    "figure_path",
    "figure_paths",
    "summary_paths",
]

#: Summary tables written by ``dpbr aggregate`` (key → file name in the summary folder).
SUMMARY_FILES: dict[str, str] = {
    "metrics": "metrics.parquet",
    "final": "final_accuracy.parquet",
    "final_csv": "final_accuracy.csv",
    "curves": "curves.parquet",
    "selections": "selections.parquet",
}

#: Figures written by ``dpbr plot`` for each (dataset, model) group.
FIGURES: tuple[str, ...] = ("accuracy", "loss", "final_accuracy")

#: File formats of each figure: self-contained HTML (inline scripts), PNG and SVG (vl-convert).
FORMATS: tuple[str, ...] = ("html", "png", "svg")


def summary_paths(summary_dir: str | Path) -> dict[str, Path]:
    """``{key: <summary_dir>/<file>}`` for every entry of :data:`SUMMARY_FILES`."""
    return {key: Path(summary_dir) / name for key, name in SUMMARY_FILES.items()}


def figure_group(dataset: str, model: str) -> str:
    """Folder name of a (dataset, model) group: ``dataset=mnist,model=cnn``.

    The same text as the first level of a training cell id (:class:`dpbr.spec.RunSpec` layout), so
    figures and cells of one model sit under matching names.
    """
    return f"dataset={path_token(dataset)},model={path_token(model)}"


def figure_path(figures_dir: str | Path, group: str, figure: str, fmt: str) -> Path:
    """``<figures_dir>/<group>/<figure>.<fmt>``."""
    if figure not in FIGURES:
        raise ValueError(f"unknown figure {figure!r}; known: {', '.join(FIGURES)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return Path(figures_dir) / group / f"{figure}.{fmt}"


def figure_paths(figures_dir: str | Path, group: str, formats: tuple[str, ...] | list[str] = FORMATS) -> list[Path]:
    """Every figure file of one group, figures in :data:`FIGURES` order, then formats."""
    return [figure_path(figures_dir, group, fig, fmt) for fig in FIGURES for fmt in formats]
