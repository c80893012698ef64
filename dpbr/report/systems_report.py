"""``dpbr systems-report``: the robust systems' table, their claims checked, and figures, from the training summaries.

The robust systems of ``dpbr train --system/--network/--staleness`` (:mod:`dpbr.system_catalog`) each come
with a claim of their paper; this module measures them against the one-server runs of the same grid:

* DRACO — Chen, Wang, Charles & Papailiopoulos 2018, "DRACO: Byzantine-resilient distributed training via
  redundant gradients", arXiv 1803.09877: exact recovery of the adversary-free model with redundancy
  ``r ≥ 2f + 1``, at ``r×`` the gradient computations, "several times faster than median-based approaches";
* GuanYu — El Mhamdi, Guerraoui, Guirguis & Rouault 2019, "SGD: Decentralized Byzantine resilience", arXiv
  1905.03853: Byzantine parameter servers too, at the price of a third communication round;
* LiuBei — El Mhamdi, Guerraoui & Guirguis, "Fast machine learning with Byzantine workers and servers",
  PODC 2020: Byzantine servers with an accuracy loss of about 5 % and no additional
  communication rounds on average;
* AggregaThor — Damaskinos, El Mhamdi, Guerraoui, Guirguis & Rouault, "AggregaThor: Byzantine machine
  learning via robust gradient aggregation", SysML 2019: robust rules over a lossy (UDP) transport and
  against malformed gradients, Multi-Krum at a small overhead over averaging (19 % for weak, 43 % for
  strong Byzantine resilience in its TensorFlow deployment);
* bounded staleness (as in Kardam: Damaskinos, El Mhamdi, Guerraoui, Patra & Taziki, "Asynchronous
  Byzantine machine learning (the case of SGD)", ICML 2018).

It reads ``metrics.parquet`` (every step of every cell, with the per-step costs
``gradient_computations, messages, bytes_workers, bytes_servers, rounds, step_seconds`` of
:mod:`dpbr.simulation.systems.costs` and, for system runs, the columns of
:data:`dpbr.simulation.systems.run.SYSTEM_COLUMNS`) and ``final_accuracy.parquet`` of
:mod:`dpbr.report.aggregate`, and writes (names in :data:`SUMMARY_FILES` and :data:`FIGURES`):

``systems_table.csv`` / ``.md``
    One row per group of seeds (every cell parameter but the seed): system, network, staleness, rule,
    attack, ε, final test accuracy (mean ± std over seeds), the per-step means of the costs
    (``bytes`` = ``bytes_workers + bytes_servers``), ``simulated_seconds`` = Σ_t ``step_seconds`` (the
    simulated time to the last step), ``updates_per_second`` = updates applied / ``simulated_seconds``, the
    means of what the system did (``decoded_fraction``, ``update_applied``, …, ``staleness_mean``), the
    largest ``server_spread`` and the measured (wall-clock) seconds per step of the aggregation
    (``seconds_aggregate``, engine runs) or of the whole system step (``seconds_step``, system runs). Each
    run is reduced over its steps ``t ≥ 1`` first, then the runs of a group are averaged (the spread: max)
    (:mod:`dpbr.report.systems_table`).
``systems_claims.csv`` / ``.md``
    One row per claim (:data:`dpbr.report.systems_claims.CLAIMS`): the measured evidence as text, the rule the
    verdict follows and the verdict — ``holds``, ``holds with a caveat``, ``does not hold`` or ``not measured
    (cells missing)`` when the grid lacks the cells a claim needs (nothing is invented). A claim made of several
    comparisons takes the weakest of their verdicts.
Figures
    ``draco_exact``, ``time_to_accuracy``, ``privacy_vote``, ``servers``, ``costs``, ``lossy``,
    ``staleness`` (:mod:`dpbr.report.systems_charts`); a figure whose cells are absent says so.

The workflow runs it when some training cell has a system, network or staleness other than the defaults
(:func:`applies`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from dpbr.errors import UsageError
from dpbr.io import atomic_path, check_folder, write_csv
from dpbr.report.aggregate import GROUP_FIELDS
from dpbr.report.charts import save_chart
from dpbr.report.inputs import read_table
from dpbr.report.layout import FORMATS, summary_paths
from dpbr.report.systems_charts import (costs_chart, draco_exact_chart, lossy_chart, privacy_vote_chart,
                                        servers_chart, staleness_chart, time_to_accuracy_chart)
from dpbr.report.systems_claims import (CAVEAT, CLAIMS, FAILS, HOLDS, MISSING, claims_markdown, evaluation_curves,
                                        systems_claims)
from dpbr.report.systems_table import (COST_COLUMNS, MEASURED, SYSTEM_MEANS, system_label, systems_table,
                                       table_markdown)
from dpbr.spec import default_system

__all__ = [
    "CAVEAT",
    "CLAIMS",
    "FAILS",
    "FIGURES",
    "HOLDS",
    "MISSING",
    "SUMMARY_FILES",
    "applies",
    "claims_markdown",
    "system_label",
    "systems_claims",
    "systems_report",
    "systems_table",
    "table_markdown",
]

#: Tables written into the summary folder (key → file name).
SUMMARY_FILES: dict[str, str] = {"table_csv": "systems_table.csv", "table_md": "systems_table.md",
                                 "claims_csv": "systems_claims.csv", "claims_md": "systems_claims.md"}
#: Figures written into the output folder (``<results>/figures/systems`` in the workflow).
FIGURES: tuple[str, ...] = ("draco_exact", "time_to_accuracy", "privacy_vote", "servers", "costs", "lossy",
                            "staleness")

#: Columns of metrics.parquet the report needs (the others it reads when present: _METRICS_OPTIONAL and the
#: remaining cell parameters), and of final_accuracy.parquet; text columns among them.
_KEY_FIELDS = ("system", "network", "staleness", "gar", "attack", "epsilon", "workers", "byzantine_real")
_METRICS_COLUMNS = ("group_id", "cell_id", "seed", "step", "test_accuracy", "param_distance", *_KEY_FIELDS,
                    *COST_COLUMNS)
_METRICS_OPTIONAL = (*SYSTEM_MEANS, "server_spread", *MEASURED)
_FINAL_COLUMNS = ("group_id", "accuracy_mean", "accuracy_std", "completed", "seeds")
_TEXTS = ("group_id", "cell_id", "system", "network", "gar", "attack", "seeds", "dataset", "model", "clip_mode",
          "quantize", "partition", "status")


def applies(specs: Iterable[Any]) -> bool:
    """Whether a training grid gets this report: some cell has a system, network or staleness other than the
    defaults (``server``, ``ideal``, 0). ``specs`` are :class:`dpbr.spec.RunSpec` (or anything with those fields)."""
    return any(not default_system(s) for s in specs)


# ----------------------------------------------------------------------------------------------- #


def _read_summary(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> pd.DataFrame:
    """The ``required`` (checked) and present ``optional`` columns of a summary file as a DataFrame."""
    if not path.exists():
        raise UsageError("--summary-dir", f"{str(path)!r} is missing; run `dpbr aggregate` first")
    table = read_table(path, "--summary-dir", "a summary of `dpbr aggregate` (run it again)", required=required,
                       texts=[c for c in (*required, *optional) if c in _TEXTS],
                       numbers=[c for c in (*required, *optional) if c not in _TEXTS])
    wanted = list(dict.fromkeys([*required, *optional]))
    return table.select([c for c in wanted if c in table.column_names]).to_pandas()


def systems_report(summary_dir: str | Path, out_dir: str | Path, *, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write :data:`SUMMARY_FILES` into ``summary_dir`` and :data:`FIGURES` into ``out_dir``; returns the paths.

    Reads ``metrics.parquet`` and ``final_accuracy.parquet`` of ``summary_dir`` (both required).

    Raises
    ------
    UsageError
        A missing or unusable summary (``--summary-dir``: a file missing, a column missing or of the wrong
        type), an unknown format (``--formats``), or an output folder that cannot be written (``--out-dir``).
    """
    for fmt in formats:
        if fmt not in FORMATS:
            raise UsageError("--formats", f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    summary = Path(summary_dir)
    paths = summary_paths(summary)
    metrics = _read_summary(paths["metrics"], _METRICS_COLUMNS,
                            (*_METRICS_OPTIONAL, *(f for f in GROUP_FIELDS if f not in _KEY_FIELDS)))
    final = _read_summary(paths["final"], _FINAL_COLUMNS)
    figures = check_folder(out_dir, "--out-dir")
    check_folder(summary, "--summary-dir")
    table = systems_table(metrics, final)
    claims = systems_claims(table, metrics)
    curves = evaluation_curves(metrics)
    charts = {
        "draco_exact": draco_exact_chart(table, curves),
        "time_to_accuracy": time_to_accuracy_chart(table, curves),
        "privacy_vote": privacy_vote_chart(table, curves, metrics),
        "servers": servers_chart(table, curves),
        "costs": costs_chart(table),
        "lossy": lossy_chart(table),
        "staleness": staleness_chart(table),
    }
    written = []
    for csv, md, frame, text in (("table_csv", "table_md", table, table_markdown(table)),
                                 ("claims_csv", "claims_md", claims, claims_markdown(claims))):
        written.append(write_csv(frame, summary / SUMMARY_FILES[csv]))
        path = summary / SUMMARY_FILES[md]
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        written.append(path)
    for name in FIGURES:
        for fmt in formats:
            written.append(save_chart(charts[name], figures / f"{name}.{fmt}", fmt))
    return written
