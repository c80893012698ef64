"""``dpbr plot``: the study's figures as Altair charts (self-contained HTML, PNG, SVG).

Per (dataset, model) group, from the summaries of :mod:`dpbr.report.aggregate` (already reduced
over seeds, so the charts stay far below Altair's row limit):

``accuracy``
    Test accuracy vs step; rows = privacy setting (``none``, ``ε=…``, ``sparsify=…``), columns =
    batch size ``b``, colour = rule/attack, line = mean over seeds, band = mean ± one standard
    deviation over seeds (the study's figures 2, 3 and 6: no noise, ε = 0.2, sparsification).
``loss``
    Training loss (honest workers' mini-batch loss, averaged over each evaluation window) vs step,
    same facets, log scale.
``final_accuracy``
    Final test accuracy vs batch size (log axis), one panel per privacy setting, colour =
    rule/attack, error bars = ± one standard deviation over seeds.

HTML files embed Vega, Vega-Lite and Vega-Embed (``inline=True``): they open offline. PNG and SVG
are rendered by vl-convert, also offline. Every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from dpbr.errors import UsageError
from dpbr.io import atomic_path, check_folder
from dpbr.report.aggregate import GROUP_FIELDS
from dpbr.report.inputs import read_frame
from dpbr.report.layout import FIGURES, FORMATS, figure_group, figure_path, summary_paths

__all__ = ["accuracy_chart", "final_accuracy_chart", "loss_chart", "note_chart", "plot", "save_chart", "series_labels"]

#: Columns of the summaries (dpbr.report.aggregate) the charts read; text columns among them.
CURVES_COLUMNS: tuple[str, ...] = ("dataset", "model", "pair", "privacy", "privacy_rank", "batch_size", "step",
                                   "accuracy_mean", "accuracy_std", "accuracy_n", "train_loss_mean",
                                   "train_loss_std", "train_loss_n")
FINAL_COLUMNS: tuple[str, ...] = ("dataset", "model", "pair", "privacy", "privacy_rank", "batch_size",
                                  "accuracy_mean", "accuracy_std", "accuracy", "completed", "diverged")
_TEXTS = ("dataset", "model", "pair", "privacy", "accuracy")

#: Fields shown by facets or colour; any other field that varies within a figure joins the series label.
_SHOWN = {"dataset", "model", "gar", "attack", "epsilon", "sparsify", "quantize", "batch_size"}
_PANEL = {"width": 160, "height": 110}


def series_labels(frame: pd.DataFrame) -> pd.Series:
    """The colour label of each row: ``gar/attack``, plus ``key=value`` of every other parameter that
    varies within a (pair, privacy, batch size) panel (e.g. ``mda/little · lr=0.5``), so that
    different cells never share a line."""
    varying = []
    panel = frame.groupby(["pair", "privacy", "batch_size"], sort=False, dropna=False)
    for field in GROUP_FIELDS:
        if field in _SHOWN or field not in frame.columns:
            continue
        if int(panel[field].nunique(dropna=False).max()) > 1:
            varying.append(field)
    labels = frame["pair"].astype(str)
    for field in varying:
        labels = labels + f" · {field}=" + frame[field].astype(str)
    return labels


def _privacy_order(frame: pd.DataFrame) -> list[str]:
    pairs = frame[["privacy", "privacy_rank"]].drop_duplicates().sort_values("privacy_rank")
    return [str(p) for p in pairs["privacy"]]


def _facets(layered: Any, frame: pd.DataFrame, title: str) -> Any:
    import altair as alt

    return layered.facet(
        row=alt.Row("privacy:N", sort=_privacy_order(frame), title="privacy",
                    header=alt.Header(labelAngle=0, labelAlign="left")),
        column=alt.Column("batch_size:O", sort="ascending", title="batch size b"),
    ).properties(title=title)


def _title(frame: pd.DataFrame, what: str) -> str:
    ds, model = str(frame["dataset"].iloc[0]), str(frame["model"].iloc[0])
    seeds = int(frame["seeds"].max()) if len(frame) else 0
    spread = "one seed, no band" if seeds <= 1 else f"mean ± std over up to {seeds} seeds"
    return f"{model} on {ds}: {what} ({spread})"


def _color() -> Any:
    """Colour by series; every layer uses the same encoding so the legends merge into one."""
    import altair as alt

    return alt.Color("series:N", title="rule / attack",
                     legend=alt.Legend(orient="bottom", columns=1, symbolOpacity=1, symbolStrokeWidth=3, labelLimit=0))


def accuracy_chart(curves: pd.DataFrame) -> Any:
    """Test accuracy vs step, faceted by privacy (rows) and batch size (columns); band = ± std over seeds.

    ``curves``: rows of :func:`dpbr.report.aggregate.curves_table` of one (dataset, model) group.
    """
    import altair as alt

    data = curves.loc[curves["accuracy_n"] > 0].copy()
    data["series"] = series_labels(data)
    std = data["accuracy_std"].fillna(0.0)
    data["lo"] = (data["accuracy_mean"] - std).clip(0.0, 1.0)
    data["hi"] = (data["accuracy_mean"] + std).clip(0.0, 1.0)
    data = data[["step", "accuracy_mean", "accuracy_std", "accuracy_n", "lo", "hi", "series", "privacy",
                 "privacy_rank", "batch_size", "dataset", "model"]].rename(columns={"accuracy_n": "seeds"})
    color = _color()
    x = alt.X("step:Q", title="step")
    band = alt.Chart().mark_area(opacity=0.22).encode(x=x, y=alt.Y("lo:Q"), y2="hi:Q", color=color)
    line = alt.Chart().mark_line(point=alt.OverlayMarkDef(size=14)).encode(
        x=x,
        y=alt.Y("accuracy_mean:Q", title="test accuracy", scale=alt.Scale(domain=[0, 1])),
        color=color,
        tooltip=["series:N", "privacy:N", "batch_size:O", "step:Q",
                 alt.Tooltip("accuracy_mean:Q", format=".4f", title="accuracy (mean)"),
                 alt.Tooltip("accuracy_std:Q", format=".4f", title="std"),
                 alt.Tooltip("seeds:Q", title="seeds")],
    )
    layered = alt.layer(band, line, data=data).properties(**_PANEL)
    return _facets(layered, data, _title(data, "test accuracy"))


def loss_chart(curves: pd.DataFrame) -> Any:
    """Training loss (window means) vs step, log scale, same facets and band as :func:`accuracy_chart`."""
    import altair as alt

    data = curves.loc[(curves["train_loss_n"] > 0) & np.isfinite(curves["train_loss_mean"])
                      & (curves["train_loss_mean"] > 0)].copy()
    data["series"] = series_labels(data)
    std = data["train_loss_std"].fillna(0.0)
    floor = float(data["train_loss_mean"].min()) / 2 if len(data) else 1e-6
    data["lo"] = (data["train_loss_mean"] - std).clip(lower=floor)
    data["hi"] = data["train_loss_mean"] + std
    data = data[["step", "train_loss_mean", "train_loss_std", "train_loss_n", "lo", "hi", "series", "privacy",
                 "privacy_rank", "batch_size", "dataset", "model"]].rename(columns={"train_loss_n": "seeds"})
    color = _color()
    x = alt.X("step:Q", title="step")
    y_scale = alt.Scale(type="log")
    band = alt.Chart().mark_area(opacity=0.22).encode(x=x, y=alt.Y("lo:Q", scale=y_scale), y2="hi:Q",
                                                      color=color)
    line = alt.Chart().mark_line().encode(
        x=x,
        y=alt.Y("train_loss_mean:Q", title="training loss", scale=y_scale, axis=alt.Axis(format=".0e")),
        color=color,
        tooltip=["series:N", "privacy:N", "batch_size:O", "step:Q",
                 alt.Tooltip("train_loss_mean:Q", format=".4g", title="loss (mean)"),
                 alt.Tooltip("train_loss_std:Q", format=".4g", title="std"),
                 alt.Tooltip("seeds:Q", title="seeds")],
    )
    layered = alt.layer(band, line, data=data).properties(**_PANEL)
    return _facets(layered, data, _title(data, "training loss"))


def final_accuracy_chart(final: pd.DataFrame) -> Any:
    """Final test accuracy vs batch size (log axis), one panel per privacy setting; bars = ± std over seeds.

    ``final``: rows of :func:`dpbr.report.aggregate.final_accuracy_table` of one (dataset, model) group.
    """
    import altair as alt

    data = final.copy()
    data["series"] = series_labels(data)
    std = data["accuracy_std"].fillna(0.0)
    data["lo"] = (data["accuracy_mean"] - std).clip(0.0, 1.0)
    data["hi"] = (data["accuracy_mean"] + std).clip(0.0, 1.0)
    data = data[["batch_size", "accuracy_mean", "accuracy_std", "lo", "hi", "completed", "diverged", "accuracy",
                 "series", "privacy", "privacy_rank", "dataset", "model"]].rename(columns={"completed": "seeds"})
    color = _color()
    sizes = data["batch_size"].astype(float)
    lo_b, hi_b = (float(sizes.min()), float(sizes.max())) if len(sizes) else (1.0, 10.0)
    if hi_b <= lo_b:
        lo_b, hi_b = lo_b / 2, hi_b * 2
    x = alt.X("batch_size:Q", title="batch size b",
              scale=alt.Scale(type="log", domain=[lo_b / 1.2, hi_b * 1.2], nice=False),
              axis=alt.Axis(values=sorted({int(b) for b in sizes})))
    bars = alt.Chart().mark_rule().encode(x=x, y=alt.Y("lo:Q"), y2="hi:Q", color=color)
    line = alt.Chart().mark_line(point=True).encode(
        x=x,
        y=alt.Y("accuracy_mean:Q", title="final test accuracy", scale=alt.Scale(domain=[0, 1])),
        color=color,
        tooltip=["series:N", "privacy:N", "batch_size:Q", "accuracy:N", "seeds:Q", "diverged:Q"],
    )
    layered = alt.layer(bars, line, data=data).properties(width=200, height=160)
    return layered.facet(
        column=alt.Column("privacy:N", sort=_privacy_order(data), title="privacy"),
    ).properties(title=_title(data, "final test accuracy vs batch size"))


def note_chart(text: str) -> Any:
    """A chart that only shows ``text`` (a figure whose data is absent says why instead of being missing)."""
    import altair as alt

    return alt.Chart(pd.DataFrame({"text": [text]})).mark_text(align="left", fontSize=13).encode(
        text="text:N").properties(width=520, height=40)


def save_chart(chart: Any, path: str | Path, fmt: str) -> Path:
    """Write ``chart`` as ``fmt`` (``html`` self-contained with inline scripts, ``png``, ``svg``) atomically."""
    import altair as alt

    if fmt not in FORMATS:
        raise UsageError("--formats", f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    path = Path(path)
    with alt.data_transformers.disable_max_rows(), atomic_path(path) as tmp:
        if fmt == "html":
            chart.save(str(tmp), format="html", inline=True)
        elif fmt == "png":
            chart.save(str(tmp), format="png", scale_factor=2)
        else:
            chart.save(str(tmp), format="svg")
    return path


def plot(summary_dir: str | Path, figures_dir: str | Path, *, dataset: str | None = None, model: str | None = None,
         formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write every figure of every (dataset, model) group (or of the one selected) and return the paths.

    Paths: :func:`dpbr.report.layout.figure_path` (``<figures_dir>/dataset=…,model=…/<figure>.<fmt>``).

    Raises
    ------
    UsageError
        Missing summaries (run ``dpbr aggregate`` first), an unknown format, or a selection with no cells.
    """
    for fmt in formats:
        if fmt not in FORMATS:
            raise UsageError("--formats", f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    paths = summary_paths(summary_dir)
    for key in ("curves", "final"):
        if not paths[key].exists():
            raise UsageError("--summary-dir", f"{str(paths[key])!r} is missing; run `dpbr aggregate` first")
    what = "a summary of `dpbr aggregate` (run it again)"
    curves = read_frame(paths["curves"], "--summary-dir", what, required=CURVES_COLUMNS,
                        numbers=[c for c in CURVES_COLUMNS if c not in _TEXTS], texts=_TEXTS)
    final = read_frame(paths["final"], "--summary-dir", what, required=FINAL_COLUMNS,
                       numbers=[c for c in FINAL_COLUMNS if c not in _TEXTS], texts=_TEXTS)
    check_folder(figures_dir, "--out-dir")
    all_final = final
    if dataset is not None:
        curves, final = curves[curves["dataset"] == dataset], final[final["dataset"] == dataset]
    if model is not None:
        curves, final = curves[curves["model"] == model], final[final["model"] == model]
    if curves.empty:
        known = ", ".join(sorted({figure_group(d, m) for d, m in zip(all_final["dataset"], all_final["model"])}))
        raise UsageError("--dataset/--model", f"no cells match; groups in the summary: {known or 'none'}")
    written: list[Path] = []
    for (ds, mdl), group_curves in curves.groupby(["dataset", "model"], sort=True):
        group = figure_group(str(ds), str(mdl))
        group_final = final[(final["dataset"] == ds) & (final["model"] == mdl)]
        charts = {
            "accuracy": accuracy_chart(group_curves),
            "loss": loss_chart(group_curves),
            "final_accuracy": final_accuracy_chart(group_final),
        }
        for fig in FIGURES:
            for fmt in formats:
                written.append(save_chart(charts[fig], figure_path(figures_dir, group, fig, fmt), fmt))
    return written
