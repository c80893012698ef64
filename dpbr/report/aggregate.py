"""``dpbr aggregate``: every training cell file → tidy summary tables.

Inputs are the Parquet files of ``dpbr train`` (one row per step; every row carries the cell's
parameters, so their concatenation is already a tidy table). Outputs (names from
:mod:`dpbr.report.layout`), each written atomically:

``metrics.parquet``
    All rows of all cells, plus the labels ``privacy`` (``none``, ``ε=0.2``, ``sparsify=0.25``, …),
    ``pair`` (``gar/attack``) and ``group_id`` (the cell id without its seed).
``final_accuracy.parquet`` / ``.csv``
    One row per group of seeds (every parameter but the seed): the test accuracy at the last
    evaluation of each run, mean and sample standard deviation (``ddof = 1``; undefined for one
    seed) over the completed runs, min and max, the test loss likewise, the number of runs and how
    many diverged. A run that diverged has no final accuracy (NaN): its last evaluation before the
    divergence is not a result of the configured number of steps. Also the mean ± std over seeds of
    each run's mean accuracy over its last ``k = 5`` evaluations (``last_k_accuracy_*``), the table
    value of Karimireddy, He & Jaggi (arXiv 2006.09365).
``curves.parquet``
    Per group and step: mean, standard deviation and count over seeds of the test accuracy and test
    loss at each evaluation step, and of the training loss averaged over windows ``(s − w, s]`` of
    ``w = ⌈steps / 20⌉`` steps (at most 20 points per run). Small enough to plot (the figures'
    data), whatever the number of steps.
``selections.parquet``
    One row per cell and worker of a rule that selects rows (Krum, Multi-Krum, MDA, Bulyan, and their
    bucketed compositions): the cell's parameters, ``worker``, ``byzantine`` (``worker ≥ h``),
    ``selected_steps`` (steps at which the rule selected the worker's vector), ``steps`` (steps
    recorded) and ``selected_share = selected_steps / steps``, from the cells' ``selected_workers``
    column. No rows (but the columns) when no cell has a selecting rule, or the cell files predate
    the column.

Cell files written before a column existed (``honest_dissimilarity``, ``worker_norms``,
``selected_workers``, …) still aggregate: the column is null for their rows.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from dpbr.errors import UsageError
from dpbr.io import atomic_path, check_folder, write_parquet
from dpbr.privacy.spec import privacy_label
from dpbr.report.grid import spec_fields
from dpbr.report.inputs import read_table
from dpbr.report.layout import summary_paths
from dpbr.spec import RunSpec

__all__ = [
    "GROUP_FIELDS",
    "LAST_K",
    "aggregate",
    "curves_table",
    "final_accuracy_table",
    "find_cell_files",
    "mean_std_text",
    "load_metrics",
    "loss_window",
    "read_file_list",
    "run_table",
    "selections_table",
]

#: The parameters that identify a group of seeds: every RunSpec field except ``seed``.
GROUP_FIELDS: tuple[str, ...] = tuple(f for f in spec_fields(RunSpec) if f != "seed")

#: Evaluations averaged by the ``last_k_accuracy`` columns: the last 5, as in the tables of
#: Karimireddy, He & Jaggi (arXiv 2006.09365).
LAST_K = 5

#: Columns every ``dpbr train`` cell file must have to be aggregated (the tables below read them).
#: (Files written before the system fields existed lack ``system``, ``network`` and ``staleness``: they were
#: one-server runs, and are read with those fields' defaults.)
CELL_COLUMNS: tuple[str, ...] = ("cell_id", "step", "train_loss", "test_accuracy", "test_loss", "status",
                                 *(f for f in spec_fields(RunSpec) if f not in RunSpec.SYSTEM_FIELDS))
_CELL_TEXTS = ("cell_id", "status", "dataset", "model", "gar", "attack", "clip_mode", "quantize", "partition",
               "system", "network")
_CELL_NUMBERS = tuple(c for c in CELL_COLUMNS if c not in _CELL_TEXTS)


# ----------------------------------------------------------------------------------------------- #
# Finding and reading cell files


def read_file_list(source: str | Path) -> list[str]:
    """Paths listed one per line in ``source`` (``"-"`` = standard input); blank lines are skipped."""
    if str(source) == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise UsageError("--files-from", f"cannot read {str(source)!r}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def find_cell_files(paths: Iterable[str | Path]) -> list[Path]:
    """Cell files from files and folders (folders are searched recursively for ``*.parquet``).

    Hidden files (temporary names of atomic writes start with ``.``) are skipped. Order is kept,
    duplicates are dropped.

    Raises
    ------
    UsageError
        A path that does not exist, or no file at all.
    """
    found: dict[Path, None] = {}
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for f in sorted(path.rglob("*.parquet")):
                if not f.name.startswith("."):
                    found.setdefault(f, None)
        elif path.is_file():
            found.setdefault(path, None)
        else:
            raise UsageError("PATHS", f"{str(path)!r} does not exist (give cell files or folders of them)")
    if not found:
        raise UsageError("PATHS", "no cell files (*.parquet) found; run `dpbr train` or the workflow first")
    return list(found)


def _privacy_rank(epsilon: float, sparsify: float, quantize: object) -> tuple:
    """Sort key of privacy settings: none, then ε from weak to strong noise, sparsify, quantize, mixes."""
    has_eps = not pd.isna(epsilon)
    has_sp = not pd.isna(sparsify) and sparsify > 0
    has_q = not pd.isna(quantize)
    kind = {(False, False, False): 0, (True, False, False): 1, (False, True, False): 2, (False, False, True): 3}
    return (kind.get((has_eps, has_sp, has_q), 4), -epsilon if has_eps else 0.0, sparsify if has_sp else 0.0,
            str(quantize) if has_q else "")


def _group_id(cell_id: str) -> str:
    head, _, last = cell_id.rpartition("/")
    return head if last.startswith("seed=") else cell_id


def _with_system_fields(table: pa.Table) -> pa.Table:
    """``table`` with the system fields a file written before they existed lacks, at their defaults."""
    for name in RunSpec.SYSTEM_FIELDS:
        if name not in table.column_names:
            default = getattr(RunSpec, name)
            kind = pa.int64() if isinstance(default, int) else pa.string()
            table = table.append_column(name, pa.array([default] * table.num_rows, type=kind))
    return table


def load_metrics(files: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate cell files into one table and add the labels ``privacy``, ``pair``, ``group_id``.

    Columns present in some files only are filled with nulls (types are promoted, e.g. an all-null
    ``epsilon`` column and a float one give floats). ``privacy_rank`` orders privacy settings.
    """
    if not files:
        raise UsageError("PATHS", "no cell files to aggregate")
    tables = [_with_system_fields(read_table(f, "PATHS", "a dpbr train cell file", required=CELL_COLUMNS,
                                             numbers=_CELL_NUMBERS, texts=_CELL_TEXTS)) for f in files]
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as exc:  # e.g. a column of integers in one file and text in another
        raise UsageError("PATHS", f"the cell files do not share column types: {' '.join(str(exc).split())}") from None
    frame = table.to_pandas()
    cells = frame.drop_duplicates("cell_id")[["cell_id", "epsilon", "sparsify", "quantize", "gar", "attack"]]
    labels = pd.DataFrame({
        "cell_id": cells["cell_id"].to_numpy(),
        "privacy": [privacy_label(e, s, q) for e, s, q in zip(cells["epsilon"], cells["sparsify"], cells["quantize"])],
        "privacy_rank": [_privacy_rank(e, s, q) for e, s, q in zip(cells["epsilon"], cells["sparsify"], cells["quantize"])],
        "pair": [f"{g}/{a}" for g, a in zip(cells["gar"], cells["attack"])],
        "group_id": [_group_id(c) for c in cells["cell_id"]],
    })
    ranks = sorted(set(labels["privacy_rank"]))
    labels["privacy_rank"] = [ranks.index(r) for r in labels["privacy_rank"]]
    return frame.merge(labels, on="cell_id", how="left", validate="many_to_one")


# ----------------------------------------------------------------------------------------------- #
# Tables


_GROUP_INFO = (*GROUP_FIELDS, "privacy", "privacy_rank", "pair")


def _last_k(last_k: int) -> int:
    if isinstance(last_k, bool) or not isinstance(last_k, (int, np.integer)) or last_k < 1:
        raise ValueError(f"last_k must be a positive integer, got {last_k!r}")
    return int(last_k)


def run_table(metrics: pd.DataFrame, last_k: int = LAST_K) -> pd.DataFrame:
    """One row per run (cell): its last evaluation (``final_step``, ``final_accuracy``, ``final_test_loss``)
    and the mean test accuracy of its last ``last_k`` evaluations (``last_k_accuracy``; over all of them
    when a run has fewer, their number in ``last_k_evals``).

    ``last_k_accuracy`` is the table value of Karimireddy, He & Jaggi (arXiv 2006.09365): the mean of
    the last 5 evaluations, which smooths the step-to-step noise of the final one. Runs whose
    ``status`` is not ``completed`` (diverged) get NaN final values and NaN ``last_k_accuracy``.
    """
    k = _last_k(last_k)
    info = metrics.drop_duplicates("cell_id").set_index("cell_id")[[*_GROUP_INFO, "seed", "status", "group_id"]]
    steps_done = metrics.groupby("cell_id", sort=False)["step"].max().rename("steps_done")
    evals = metrics.loc[metrics["test_accuracy"].notna(), ["cell_id", "step", "test_accuracy", "test_loss"]]
    ordered = evals.sort_values(["cell_id", "step"]).groupby("cell_id", sort=False)
    last = (ordered.tail(1)
            .set_index("cell_id").rename(columns={"step": "final_step", "test_accuracy": "final_accuracy",
                                                  "test_loss": "final_test_loss"}))
    tail = ordered.tail(k).groupby("cell_id", sort=False)["test_accuracy"]
    last_k_table = pd.DataFrame({"last_k_accuracy": tail.mean(), "last_k_evals": tail.count()})
    runs = info.join(steps_done).join(last).join(last_k_table)
    runs["last_k_evals"] = runs["last_k_evals"].fillna(0).astype(np.int64)
    runs["completed"] = runs["status"].astype(str) == "completed"
    runs.loc[~runs["completed"], ["final_accuracy", "final_test_loss", "last_k_accuracy"]] = np.nan
    return runs.reset_index()


def final_accuracy_table(metrics: pd.DataFrame, last_k: int = LAST_K) -> pd.DataFrame:
    """Final test accuracy per group of seeds: mean ± std (ddof 1) over completed runs, and counts.

    Columns: the group's parameters, ``privacy``, ``pair``, ``runs``, ``completed``, ``diverged``,
    ``seeds``, ``accuracy_mean``, ``accuracy_std``, ``accuracy_min``, ``accuracy_max``,
    ``test_loss_mean``, ``test_loss_std``, ``final_step``, ``accuracy`` (text ``0.9123 ± 0.0041``),
    ``last_k``, ``last_k_accuracy_mean``, ``last_k_accuracy_std`` and ``last_k_accuracy`` (text): the
    same over seeds of each run's mean accuracy over its last ``last_k`` evaluations (default 5, the
    table value of Karimireddy, He & Jaggi, arXiv 2006.09365; see :func:`run_table`), ``group_id``.
    Sorted by dataset, model, privacy, pair, batch size.
    """
    runs = run_table(metrics, last_k)
    g = runs.groupby("group_id", sort=False)
    out = g[list(_GROUP_INFO)].first()
    out["runs"] = g.size()
    out["completed"] = g["completed"].sum().astype(int)
    out["diverged"] = out["runs"] - out["completed"]
    out["seeds"] = g["seed"].agg(lambda s: ",".join(str(int(v)) for v in sorted(s)))
    acc = g["final_accuracy"]
    out["accuracy_mean"] = acc.mean()
    out["accuracy_std"] = acc.std(ddof=1)
    out["accuracy_min"] = acc.min()
    out["accuracy_max"] = acc.max()
    out["test_loss_mean"] = g["final_test_loss"].mean()
    out["test_loss_std"] = g["final_test_loss"].std(ddof=1)
    out["final_step"] = g["final_step"].max()
    out["accuracy"] = [mean_std_text(m, s, n) for m, s, n in zip(out["accuracy_mean"], out["accuracy_std"], out["completed"])]
    out["last_k"] = np.int64(_last_k(last_k))
    tail = g["last_k_accuracy"]
    out["last_k_accuracy_mean"] = tail.mean()
    out["last_k_accuracy_std"] = tail.std(ddof=1)
    out["last_k_accuracy"] = [mean_std_text(m, s, n) for m, s, n in
                              zip(out["last_k_accuracy_mean"], out["last_k_accuracy_std"], out["completed"])]
    out = out.reset_index()
    order = ["dataset", "model", "privacy_rank", "pair", "batch_size", "group_id"]
    return out.sort_values(order, kind="stable").reset_index(drop=True)


#: The columns of :func:`selections_table` after the cells' parameters.
SELECTION_COLUMNS: tuple[str, ...] = ("worker", "byzantine", "selected_steps", "steps", "selected_share")

_SELECTION_DTYPES = {"worker": np.int64, "byzantine": bool, "selected_steps": np.int64, "steps": np.int64,
                     "selected_share": np.float64}


def selections_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """How often the rule selected each worker's vector: one row per cell and worker.

    Columns: ``cell_id``, ``group_id``, the cell's parameters (every :class:`~dpbr.spec.RunSpec` field,
    with ``seed``; the declared ``f`` as ``byzantine_declared``, since ``byzantine`` and ``steps`` name
    columns below), ``privacy``, ``privacy_rank``, ``pair``, then
    :data:`SELECTION_COLUMNS`: ``worker`` ``i`` (rows ``0..h−1`` honest, then Byzantine),
    ``byzantine = i ≥ h`` (``h`` the cell's ``honest_workers``, else ``workers − byzantine_real``),
    ``selected_steps = Σ_s [i selected at step s]`` over the steps whose ``selected_workers`` mask was
    recorded, ``steps`` their number (the configured steps, or fewer for a diverged run) and
    ``selected_share = selected_steps / steps``. Cells without masks (rules that do not select, files
    without the column) have no rows; with none at all the table is empty but has the columns.
    Sorted like the final-accuracy table, then by seed and worker.
    """
    info_cols = ["cell_id", "group_id", *(c for c in _GROUP_INFO if c not in ("steps", "byzantine")), "seed",
                 "byzantine_declared"]
    first = metrics.drop_duplicates("cell_id").set_index("cell_id", drop=False)
    first = first.assign(byzantine_declared=first["byzantine"])
    info = first[info_cols]
    parts: list[pd.DataFrame] = []
    if "selected_workers" in metrics.columns:
        masks = metrics.loc[metrics["selected_workers"].notna(), ["cell_id", "selected_workers"]]
        for cell_id, rows in masks.groupby("cell_id", sort=False)["selected_workers"]:
            chosen = np.stack([np.asarray(m, dtype=bool) for m in rows])  # (steps, n)
            steps, n = chosen.shape
            cell = first.loc[cell_id]
            h = cell["honest_workers"] if "honest_workers" in first.columns else None
            if h is None or pd.isna(h):
                h = int(cell["workers"]) - int(cell["byzantine_real"])
            counts = chosen.sum(axis=0).astype(np.int64)
            part = pd.DataFrame({c: [cell[c]] * n for c in info_cols})
            part["worker"] = np.arange(n, dtype=np.int64)
            part["byzantine"] = part["worker"] >= int(h)
            part["selected_steps"] = counts
            part["steps"] = np.int64(steps)
            part["selected_share"] = counts / steps
            parts.append(part)
    if not parts:
        empty = info.iloc[:0].reset_index(drop=True)
        for col in SELECTION_COLUMNS:
            empty[col] = pd.Series(dtype=_SELECTION_DTYPES[col])
        return empty
    table = pd.concat(parts, ignore_index=True).astype(_SELECTION_DTYPES)
    for col in info_cols:  # the parameters keep the types they have in the metrics table
        table[col] = table[col].astype(info[col].dtype)
    order = ["dataset", "model", "privacy_rank", "pair", "batch_size", "group_id", "seed", "worker"]
    return table.sort_values(order, kind="stable").reset_index(drop=True)


def mean_std_text(mean: float, std: float, n: int, *, percent: bool = False) -> str:
    """``"0.9123 ± 0.0040"`` (``percent``: ``"91.2 ± 0.4"``) for a mean and std over ``n`` seeds;
    ``"… (1 seed)"`` for one, ``"diverged"`` for none."""
    scale, digits = (100.0, 1) if percent else (1.0, 4)
    if n == 0 or pd.isna(mean):
        return "diverged"
    if n == 1 or pd.isna(std):
        return f"{scale * mean:.{digits}f} (1 seed)"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def loss_window(steps: np.ndarray | int) -> np.ndarray:
    """Steps per training-loss window: ``⌈steps / 20⌉`` (so a curve has at most 20 points), at least 1."""
    return np.maximum(1, -(-np.asarray(steps, dtype=np.int64) // 20))


def curves_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per group and step: mean/std/count over seeds of accuracy, test loss and windowed training loss.

    Evaluation steps give ``accuracy_*`` and ``test_loss_*``; the training loss of each run is first
    averaged over the window ``(s − w, s]`` ending at ``s``, ``w = ⌈steps / 20⌉`` (non-finite values
    dropped; the last window ends at ``steps``), then over seeds (``train_loss_*``). ``*_std`` is the sample standard deviation (NaN for one seed).
    """
    keys = ["group_id", "step"]
    ev = metrics.loc[metrics["test_accuracy"].notna(), [*keys, "test_accuracy", "test_loss"]]
    eg = ev.groupby(keys, sort=False)
    evals = pd.DataFrame({
        "accuracy_mean": eg["test_accuracy"].mean(),
        "accuracy_std": eg["test_accuracy"].std(ddof=1),
        "accuracy_n": eg["test_accuracy"].count(),
        "test_loss_mean": eg["test_loss"].mean(),
        "test_loss_std": eg["test_loss"].std(ddof=1),
    })
    tl = metrics.loc[metrics["step"] >= 1, ["group_id", "cell_id", "step", "train_loss", "steps"]]
    window = loss_window(tl["steps"].to_numpy())
    end = np.minimum(np.ceil(tl["step"].to_numpy() / window) * window, tl["steps"].to_numpy()).astype(np.int64)
    loss = tl["train_loss"].to_numpy(dtype=float, copy=True)
    loss[~np.isfinite(loss)] = np.nan
    per_run = (pd.DataFrame({"group_id": tl["group_id"].to_numpy(), "cell_id": tl["cell_id"].to_numpy(),
                             "step": end, "train_loss": loss})
               .groupby(["group_id", "cell_id", "step"], sort=False)["train_loss"].mean().reset_index())
    tg = per_run.groupby(keys, sort=False)["train_loss"]
    train = pd.DataFrame({"train_loss_mean": tg.mean(), "train_loss_std": tg.std(ddof=1), "train_loss_n": tg.count()})
    curves = evals.join(train, how="outer").reset_index()
    info = metrics.drop_duplicates("group_id").set_index("group_id")[list(_GROUP_INFO)]
    curves = curves.join(info, on="group_id")
    for col in ("accuracy_n", "train_loss_n"):
        curves[col] = curves[col].fillna(0).astype(np.int64)
    return curves.sort_values(["dataset", "model", "privacy_rank", "pair", "batch_size", "group_id", "step"],
                              kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- #


def aggregate(files: Sequence[str | Path], out_dir: str | Path, last_k: int = LAST_K) -> dict[str, Path]:
    """Write the summary tables of ``files`` into ``out_dir`` (atomically); returns ``{key: path}``.

    Keys and names: :data:`dpbr.report.layout.SUMMARY_FILES`. ``last_k``: the number of last
    evaluations averaged by the ``last_k_accuracy`` columns of the final-accuracy table.

    Raises
    ------
    UsageError
        An unusable input file (``PATHS``) or an ``out_dir`` that cannot be created or written
        (``--out-dir``); both are checked before anything is written.
    """
    import dpbr

    metrics = load_metrics(files)
    final = final_accuracy_table(metrics, last_k)
    curves = curves_table(metrics)
    selections = selections_table(metrics)
    paths = summary_paths(check_folder(out_dir, "--out-dir"))
    for path in paths.values():
        if path.is_dir():
            raise UsageError("--out-dir", f"{str(path)!r} is a folder; the summary file cannot be written there")
    meta = {"kind": "summary", "cells": int(metrics["cell_id"].nunique()), "groups": int(len(final)),
            "dpbr_version": dpbr.__version__}
    write_parquet(metrics, paths["metrics"], meta)
    write_parquet(final, paths["final"], meta)
    with atomic_path(paths["final_csv"]) as tmp:
        final.drop(columns=["privacy_rank"]).to_csv(tmp, index=False)
    write_parquet(curves, paths["curves"], meta)
    write_parquet(selections, paths["selections"], meta)
    return paths
