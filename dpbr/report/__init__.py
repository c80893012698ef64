"""From cells to results and back: the workflow's grid, the summaries over cells, the figures.

- :mod:`dpbr.report.grid` — a configuration section (``defaults`` + a list of sub-grids) → the
  cells it names (one validated spec each); readable configuration errors.
- :mod:`dpbr.report.layout` — the names of the summary files and figures (one source of truth
  for ``dpbr aggregate``/``dpbr plot`` and the Snakemake rules).
- :mod:`dpbr.report.aggregate` — ``dpbr aggregate``: all cell files → a tidy metrics table, a
  final-accuracy table (mean ± std over seeds) and per-step curves.
- :mod:`dpbr.report.charts` — ``dpbr plot``: Altair charts (self-contained HTML, PNG, SVG).

Only :mod:`~dpbr.report.grid` and :mod:`~dpbr.report.layout` are imported by the Snakefile; they
avoid pandas and Altair so that parsing the workflow stays fast.
"""
