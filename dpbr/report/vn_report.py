"""``dpbr vn-report``: summary tables and figures of VN-ratio cells.

Inputs are ``dpbr vn`` cell files (one row per model × b × privacy × checkpoint, see
:mod:`dpbr.vn.measure`) and, optionally, the training grid's final-accuracy table
(:func:`dpbr.report.aggregate.final_accuracy_table`). Outputs (names in :data:`SUMMARY_FILES`,
:data:`FIGURES`):

``vn.parquet``
    Every row of every cell.
``vn_min_b.{parquet,csv}``
    The smallest batch size meeting ``r(b) ≤ k_F(n, f)`` per (model, parameters, privacy, rule) —
    :func:`dpbr.vn.minimal_b_table` — for the rules with a bound at the cells' ``(n, f)`` (MDA,
    median at n = 11, f = 5) and for Krum and Bulyan at the largest f they accept (f = 2 at n = 11:
    ``n ≥ 4f + 3``), next to the batch-size scaling derived by Guerraoui et al. 2021, arXiv 2102.08166 (``sqrt(n·d)`` for Krum/Bulyan,
    ``f·sqrt(d)/(n − f)`` for MDA).
``ratio_vs_b``
    VN ratio vs b on log-log axes with its bootstrap interval, one panel per (model, parameters) row
    and privacy column, a dashed line at each rule's ``k_F`` and a marker where the curve crosses it
    (the minimal b, when it lies inside the measured range).
``accuracy_vs_ratio``
    Final test accuracy of the training cells against the ratio measured for the same (dataset,
    model, b, privacy) at the initial parameters: does meeting the condition predict convergence?
    A vertical line at ``k_F`` of the rule each training cell used (when it has a bound).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from dpbr.errors import UsageError
from dpbr.io import check_folder, write_csv, write_parquet
from dpbr.privacy.spec import privacy_label
from dpbr.report.grid import spec_fields
from dpbr.report.inputs import read_frame, read_train_final
from dpbr.spec import VNSpec
from dpbr.report.charts import note_chart, save_chart

__all__ = [
    "FIGURES",
    "SUMMARY_FILES",
    "accuracy_vs_ratio_chart",
    "crossings",
    "join_accuracy",
    "load_vn",
    "min_b_summary",
    "ratio_vs_b_chart",
    "vn_report",
]

SUMMARY_FILES: dict[str, str] = {"rows": "vn.parquet", "min_b": "vn_min_b.parquet", "min_b_csv": "vn_min_b.csv"}
#: Columns every ``dpbr vn`` cell file must have to be reported (the spec's fields and the ratio).
VN_COLUMNS: tuple[str, ...] = (*spec_fields(VNSpec), "cell_id", "vn_ratio", "vn_ratio_ci_low", "vn_ratio_ci_high")
_VN_TEXTS = ("dataset", "model", "run", "clip_mode", "cell_id")
#: Columns of the training grid's final-accuracy table (``--train-final``) that the comparison reads.
TRAIN_FINAL_COLUMNS: tuple[str, ...] = ("dataset", "model", "batch_size", "privacy", "pair", "gar", "workers",
                                        "byzantine", "accuracy_mean")
FIGURES: tuple[str, ...] = ("ratio_vs_b", "accuracy_vs_ratio")
_PANEL = {"width": 220, "height": 160}


def load_vn(files: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate ``dpbr vn`` cell files and add ``privacy`` (the training grid's label, e.g. ``ε=0.2``)
    and ``parameters`` (``init`` or ``run <id> step <S>``)."""
    if not files:
        raise UsageError("PATHS", "no VN cell files given; run `dpbr vn` or the workflow first")
    frames = [read_frame(path, "PATHS", "a dpbr vn cell file", required=VN_COLUMNS, texts=_VN_TEXTS,
                         numbers=[c for c in VN_COLUMNS if c not in _VN_TEXTS]) for path in files]
    rows = pd.concat(frames, ignore_index=True)
    rows["privacy"] = [privacy_label(e, s) for e, s in zip(rows["epsilon"], rows["sparsify"])]
    rows["parameters"] = np.where(rows["run"] == "init", "init",
                                  "run " + rows["run"].astype(str) + " step " + rows["step"].astype(str))
    return rows


def min_b_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Minimal-b table for the rules with a bound at the cells' (n, f), plus Krum and Bulyan at the
    largest f they tolerate for each n (``f = ⌊(n − 3)/4⌋``, Bulyan's requirement ``n ≥ 4f + 3``,
    which Krum's ``n ≥ 2f + 3`` also meets)."""
    from dpbr.vn import minimal_b_table

    tables = [minimal_b_table(rows)]
    small_f = rows.assign(byzantine=((rows["workers"] - 3) // 4).clip(lower=0))
    small_f = small_f[small_f["byzantine"] > 0]
    if not small_f.empty:
        tables.append(minimal_b_table(small_f, rules=["krum", "bulyan"]))
    table = pd.concat([t for t in tables if not t.empty], ignore_index=True) if any(len(t) for t in tables) else tables[0]
    if "privacy" in table.columns:
        table["privacy"] = [privacy_label(e, s) for e, s in zip(table["epsilon"], table["sparsify"])]
    return table


def crossings(rows: pd.DataFrame, min_b: pd.DataFrame) -> pd.DataFrame:
    """Points where each curve crosses its rule's ``k_F`` inside the measured b range: ``(min_b, k)``.

    A minimal b that was extrapolated beyond the largest measured b (or is below the smallest) has
    no crossing on the chart; the table reports it.
    """
    keys = ["dataset", "model", "parameters", "privacy"]
    spans = rows.groupby(keys, dropna=False)["batch_size"].agg(["min", "max"]).reset_index()
    table = min_b.copy()
    table["parameters"] = np.where(table["run"] == "init", "init",
                                   "run " + table["run"].astype(str) + " step " + table["step"].astype(str))
    merged = table.merge(spans, on=keys, how="inner")
    inside = merged["min_b"].notna() & (merged["min_b"] >= merged["min"]) & (merged["min_b"] <= merged["max"])
    out = merged[inside].copy()
    out["label"] = out["rule"] + " f=" + out["byzantine"].astype(str)
    return out[keys + ["rule", "byzantine", "label", "k", "min_b"]]


def _rule_lines(min_b: pd.DataFrame) -> pd.DataFrame:
    lines = min_b[["rule", "byzantine", "k"]].drop_duplicates().copy()
    lines["label"] = lines["rule"] + " f=" + lines["byzantine"].astype(str)
    return lines


def ratio_vs_b_chart(rows: pd.DataFrame, min_b: pd.DataFrame) -> Any:
    """VN ratio vs b (log-log) with the bootstrap interval, ``k_F`` lines and the crossings marked.

    Facets need one data source, so curves, rule lines and crossings are stacked into one long table
    with a ``layer`` column that each mark filters on.
    """
    import altair as alt

    def panel(frame: pd.DataFrame) -> pd.Series:
        return frame["model"] + " on " + frame["dataset"] + " · " + frame["parameters"]

    curve = rows.assign(panel=panel(rows), layer="curve", label="")[
        ["panel", "privacy", "layer", "label", "batch_size", "vn_ratio", "vn_ratio_ci_low", "vn_ratio_ci_high"]]
    parts = [curve]
    lines = _rule_lines(min_b)
    if not lines.empty:
        rule_rows = curve[["panel", "privacy"]].drop_duplicates().merge(lines, how="cross")
        parts.append(rule_rows.assign(layer="rule", vn_ratio=rule_rows["k"])[["panel", "privacy", "layer", "label", "vn_ratio"]])
        cross = crossings(rows, min_b)
        if not cross.empty:
            parts.append(cross.assign(panel=panel(cross), layer="cross", batch_size=cross["min_b"], vn_ratio=cross["k"])[
                ["panel", "privacy", "layer", "label", "batch_size", "vn_ratio"]])
    data = pd.concat(parts, ignore_index=True)
    order = sorted(data["privacy"].unique(), key=lambda p: (p != "none", p))
    x = alt.X("batch_size:Q", scale=alt.Scale(type="log"), title="batch size b")
    y = alt.Y("vn_ratio:Q", scale=alt.Scale(type="log"), title="VN ratio sqrt(E‖G−EG‖²)/‖EG‖")
    color = alt.Color("label:N", title="rule, f: k_F(n, f)", legend=alt.Legend(orient="bottom"))
    base = alt.Chart(data)
    band = base.transform_filter(alt.datum.layer == "curve").mark_area(opacity=0.25, color="#4c78a8").encode(
        x=x, y=alt.Y("vn_ratio_ci_low:Q", scale=alt.Scale(type="log")), y2="vn_ratio_ci_high:Q")
    line = base.transform_filter(alt.datum.layer == "curve").mark_line(point=True, color="#4c78a8").encode(
        x=x, y=y, tooltip=["batch_size:Q", "vn_ratio:Q", "vn_ratio_ci_low:Q", "vn_ratio_ci_high:Q"])
    rule = base.transform_filter(alt.datum.layer == "rule").mark_rule(strokeDash=[6, 3]).encode(y=y, color=color)
    cross = base.transform_filter(alt.datum.layer == "cross").mark_point(shape="diamond", size=120, filled=True).encode(
        x=x, y=y, color=color, tooltip=["label:N", alt.Tooltip("batch_size:Q", title="minimal b"), "vn_ratio:Q"])
    return alt.layer(band, line, rule, cross, data=data).properties(**_PANEL).facet(
        row=alt.Row("panel:N", title=None, header=alt.Header(labelAngle=0, labelAlign="left")),
        column=alt.Column("privacy:N", sort=order, title="privacy"),
    ).resolve_scale(y="independent").properties(
        title="VN ratio of the honest gradients vs batch size (band: bootstrap interval; ◆: minimal b)")


def join_accuracy(rows: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """Training cells' final accuracy next to the ratio measured at the same (dataset, model, b,
    privacy) at the initial parameters; ``k`` is the bound of the training cell's rule at its (n, f)
    (NaN for rules without a positive one, e.g. average, whose bound is 0 for f ≥ 1)."""
    from dpbr.robust import aggregators

    init = rows[rows["run"] == "init"]
    keys = ["dataset", "model", "batch_size", "privacy"]
    ratio = init.groupby(keys, dropna=False)[["vn_ratio", "vn_ratio_ci_low", "vn_ratio_ci_high"]].mean().reset_index()
    cols = keys + ["pair", "gar", "workers", "byzantine", "accuracy_mean", "accuracy_std", "runs"]
    joined = final[[c for c in cols if c in final.columns]].merge(ratio, on=keys, how="inner")

    def bound(gar: str, n: int, f: int) -> float:
        try:
            value = aggregators.get(gar).vn_bound(int(n), int(f))
        except ValueError:
            return math.nan
        return math.nan if value is None or value <= 0 else float(value)

    joined["k"] = [bound(g, n, f) for g, n, f in zip(joined["gar"], joined["workers"], joined["byzantine"])]
    joined["holds"] = joined["vn_ratio"] <= joined["k"]
    return joined


def accuracy_vs_ratio_chart(joined: pd.DataFrame) -> Any:
    """Final test accuracy vs measured VN ratio (log x), colour = rule/attack, shape = privacy;
    a vertical line at ``k_F`` of each rule with a bound."""
    import altair as alt

    x = alt.X("vn_ratio:Q", scale=alt.Scale(type="log"), title="VN ratio at the initial parameters (log)")
    color = alt.Color("pair:N", title="rule / attack", legend=alt.Legend(orient="bottom", columns=1))
    points = alt.Chart(joined).mark_point(size=90, filled=True).encode(
        x=x, y=alt.Y("accuracy_mean:Q", title="final test accuracy", scale=alt.Scale(domain=[0, 1])),
        color=color, shape=alt.Shape("privacy:N", title="privacy"),
        tooltip=["pair", "privacy", "batch_size", "vn_ratio", "accuracy_mean", "k"])
    labels = alt.Chart(joined).mark_text(dx=8, dy=-8, fontSize=10).encode(
        x=x, y="accuracy_mean:Q", text=alt.Text("batch_size:Q", format="d"))
    layers = [points, labels]
    bounds = joined.dropna(subset=["k"])[["pair", "k"]].drop_duplicates()
    if not bounds.empty:
        layers.append(alt.Chart(bounds).mark_rule(strokeDash=[6, 3]).encode(x="k:Q", color=color))
    model = ", ".join(sorted(set(joined["model"] + " on " + joined["dataset"])))
    return alt.layer(*layers).properties(
        width=420, height=260,
        title=f"Does the VN condition predict convergence? {model} (labels: b; dashed: k_F of the rule)")


def vn_report(files: Sequence[str | Path], summary_dir: str | Path, figures_dir: str | Path, *,
              train_final: str | Path | None = None, formats: Sequence[str] = ("html", "png", "svg")) -> list[Path]:
    """Write the VN summary tables and figures; return the paths written.

    ``accuracy_vs_ratio`` is written only when ``train_final`` is given (a note instead of points when
    no training cell shares dataset, model, b and privacy with the VN cells).
    """
    rows = load_vn(files)
    final = None if train_final is None else read_train_final(train_final, TRAIN_FINAL_COLUMNS)
    summary_dir = check_folder(summary_dir, "--summary-dir")
    figures_dir = check_folder(figures_dir, "--out-dir")
    min_b = min_b_summary(rows)
    written = [
        write_parquet(rows, summary_dir / SUMMARY_FILES["rows"]),
        write_parquet(min_b, summary_dir / SUMMARY_FILES["min_b"]),
        write_csv(min_b, summary_dir / SUMMARY_FILES["min_b_csv"]),
    ]
    charts = {"ratio_vs_b": ratio_vs_b_chart(rows, min_b)}
    if final is not None:
        joined = join_accuracy(rows, final)
        charts["accuracy_vs_ratio"] = accuracy_vs_ratio_chart(joined) if not joined.empty else note_chart(
            "No training cell shares (dataset, model, b, privacy) with the VN cells: nothing to compare.")
    for name, chart in charts.items():
        for fmt in formats:
            written.append(save_chart(chart, figures_dir / f"{name}.{fmt}", fmt))
    return written
