"""``dpbr hetero-report``: the table and figures of the bucketing paper from the training summaries.

Karimireddy, He & Jaggi, *Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing*, ICLR
2022 (arXiv 2006.09365), measure each rule with and without bucketing (average random groups of
``s`` vectors, then apply the rule), on IID and on label-sorted (non-IID) data. This module reads
the summaries of :mod:`dpbr.report.aggregate` — ``final_accuracy.parquet``, ``curves.parquet`` and,
when present, ``selections.parquet`` (one row per cell × worker: how many steps the rule selected the
worker's vector) — and writes (names in :data:`SUMMARY_FILES` and :data:`FIGURES`):

``bucketing_table.csv``
    One row per (setting, rule, partition, ``s``): the mean ± sample std (ddof 1) over seeds of each
    run's mean test accuracy over its last 5 evaluations (``last_k_accuracy``, the value of the
    paper's tables), as fractions and as text in percent. ``s = 0`` means no bucketing, as in the
    paper. *Setting* = the other parameters that vary in the grid (attack, worker momentum, …).
``bucketing_table.md``
    The same as Markdown: one table per setting, rows = rule, columns = partition × ``s`` — the
    layout of the paper's exp2 table (IID / non-IID, without and with bucketing).
``bucketing_table`` (figure)
    Those numbers as points with ± std bars: x = rule, colour = ``s``, columns = partition, rows =
    setting.
``accuracy_by_attack`` (figure)
    Test accuracy vs step (mean over seeds, band ± std): rows = rule, columns = attack, colour =
    ``s``, dash = the other varying parameters (partition, worker momentum β) — the paper's exp3
    figure.
``selections`` (figure)
    For the rules that select vectors (Krum, …): the share of steps each worker's vector was
    selected, mean over seeds, one bar per worker, Byzantine workers in red; rows = rule, columns =
    setting. A note instead when the grid has no selecting rule or the summary has no selections.

The workflow runs it when a training grid has a non-IID partition or a bucketing rule
(:func:`applies`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from dpbr.errors import UsageError
from dpbr.io import atomic_path, check_folder, write_csv
from dpbr.registry import format_float, format_term, parse
from dpbr.report.aggregate import GROUP_FIELDS, mean_std_text
from dpbr.report.charts import note_chart, save_chart
from dpbr.report.inputs import read_frame
from dpbr.report.layout import FORMATS, summary_paths

__all__ = [
    "FIGURES",
    "SUMMARY_FILES",
    "accuracy_by_attack_chart",
    "applies",
    "bucketing_table",
    "bucketing_table_chart",
    "hetero_report",
    "markdown_tables",
    "selection_shares",
    "selections_chart",
    "split_bucketing",
]

#: Tables written into the summary folder (key → file name).
SUMMARY_FILES: dict[str, str] = {"table_csv": "bucketing_table.csv", "table_md": "bucketing_table.md"}
#: Figures written into the output folder (``<results>/figures/hetero`` in the workflow).
FIGURES: tuple[str, ...] = ("bucketing_table", "accuracy_by_attack", "selections")

#: The paper's names of dpbr's rules (its tables say AVG, KRUM, CM, RFA, CCLIP).
PAPER_NAMES: dict[str, str] = {"average": "AVG", "krum": "Krum", "median": "CM", "geometric-median": "RFA",
                               "centered-clipping": "CClip"}
_RULE_ORDER = ("average", "krum", "median", "geometric-median", "centered-clipping")
_SHORT = {"worker_momentum": "β", "batch_size": "b", "byzantine": "f", "workers": "n"}
_PANEL = {"width": 150, "height": 95}

_FINAL_COLUMNS = ("dataset", "model", "gar", "attack", "partition", "last_k_accuracy_mean", "last_k_accuracy_std",
                  "completed", "seeds")
_CURVES_COLUMNS = ("dataset", "model", "gar", "attack", "partition", "step", "accuracy_mean", "accuracy_std",
                   "accuracy_n")
_SELECTION_COLUMNS = ("gar", "worker", "byzantine", "selected_share")
_TEXTS = ("dataset", "model", "gar", "attack", "partition", "seeds", "clip_mode", "quantize")


# ----------------------------------------------------------------------------------------------- #
# Names


def split_bucketing(gar: str) -> tuple[str, int]:
    """``(rule, s)`` of a rule spec: ``"bucketing(s=2)+krum" → ("krum", 2)``, ``"krum" → ("krum", 0)``.

    ``s = 0`` is the paper's notation for no bucketing. Only a leading ``bucketing`` term is split
    off (``nnm+krum`` stays whole); its ``s`` defaults to 2, :class:`dpbr.robust.aggregators.Bucketing`'s.
    """
    terms = parse(str(gar), option="--gar")
    if len(terms) > 1 and terms[0][0] == "bucketing":
        s = int(terms[0][1].get("s", 2))
        return "+".join(format_term(n, p) for n, p in terms[1:]), s
    return "+".join(format_term(n, p) for n, p in terms), 0


def applies(specs: Iterable[Any]) -> bool:
    """Whether a training grid gets this report: some cell has a non-IID partition or a bucketing
    rule. ``specs`` are :class:`dpbr.spec.RunSpec` (or anything with ``partition`` and ``gar``)."""
    return any(str(s.partition) != "iid" or split_bucketing(s.gar)[1] > 0 for s in specs)


def _rule_key(rule: str) -> tuple[int, str]:
    base = rule.split("(")[0]
    return (_RULE_ORDER.index(base) if base in _RULE_ORDER else len(_RULE_ORDER), rule)


def _rule_label(rule: str) -> str:
    paper = PAPER_NAMES.get(rule)
    return f"{rule} ({paper})" if paper else rule


def _partition_label(partition: str) -> str:
    return "IID" if partition == "iid" else "non-IID (label shards)" if partition == "shards" else partition


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return format_float(value)
    return str(value)


def _varying(frame: pd.DataFrame, candidates: Sequence[str]) -> list[str]:
    """The columns among ``candidates`` whose values differ between rows (NaN counts as a value)."""
    return [c for c in candidates if c in frame.columns and frame[c].nunique(dropna=False) > 1]


def _labels(frame: pd.DataFrame, fields: Sequence[str], empty: str = "all cells") -> pd.Series:
    """``key=value · key=value`` of ``fields`` per row (``β`` for worker momentum); ``empty`` without fields."""
    if not fields:
        return pd.Series(empty, index=frame.index)
    parts = [frame[f].map(lambda v, f=f: f"{_SHORT.get(f, f)}={_value_text(v)}") for f in fields]
    out = parts[0]
    for p in parts[1:]:
        out = out + " · " + p
    return out


def _with_rule_columns(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    split = [split_bucketing(g) for g in out["gar"]]
    out["rule"] = [r for r, _ in split]
    out["s"] = np.array([s for _, s in split], dtype=np.int64)
    return out


def _setting_fields(frame: pd.DataFrame, exclude: Sequence[str]) -> list[str]:
    """The grid parameters, other than ``exclude``, that vary between the rows (the *setting*)."""
    candidates = [f for f in GROUP_FIELDS if f not in {"gar", *exclude}]
    return _varying(frame, candidates)


# ----------------------------------------------------------------------------------------------- #
# The table


def bucketing_table(final: pd.DataFrame) -> pd.DataFrame:
    """Long form of the paper's table from ``final`` (:func:`dpbr.report.aggregate.final_accuracy_table`).

    Columns: ``setting`` (the other varying parameters as ``key=value · …``) and those parameters,
    ``rule``, ``paper_rule``, ``partition``, ``s``, ``accuracy_mean``, ``accuracy_std`` (of
    ``last_k_accuracy``: fractions), ``completed``, ``seeds``, ``accuracy`` (text in percent,
    ``53.2 ± 4.0``). Sorted by setting, rule (the paper's order: AVG, Krum, CM, RFA, CClip, then
    others), partition (IID first) and ``s``.
    """
    data = _with_rule_columns(final)
    fields = _setting_fields(data, ("partition",))
    data["setting"] = _labels(data, fields)
    out = pd.DataFrame({
        "setting": data["setting"],
        **{f: data[f] for f in fields},
        "rule": data["rule"],
        "paper_rule": [PAPER_NAMES.get(r, "") for r in data["rule"]],
        "partition": data["partition"].astype(str),
        "s": data["s"],
        "accuracy_mean": data["last_k_accuracy_mean"].astype(float),
        "accuracy_std": data["last_k_accuracy_std"].astype(float),
        "completed": data["completed"].astype(np.int64),
        "seeds": data["seeds"].astype(str),
    })
    out["accuracy"] = [mean_std_text(m, s, n, percent=True) for m, s, n in
                       zip(out["accuracy_mean"], out["accuracy_std"], out["completed"])]
    order = pd.DataFrame({
        "setting": out["setting"],
        "rule": [_rule_key(r) for r in out["rule"]],
        "partition": [(p != "iid", p) for p in out["partition"]],
        "s": out["s"],
    })
    index = sorted(range(len(out)), key=lambda i: tuple(order.iloc[i]))
    return out.iloc[index].reset_index(drop=True)


def markdown_tables(table: pd.DataFrame) -> str:
    """The table as Markdown: per setting a heading line and a table, rows = rule, columns =
    partition × ``s`` (``s = 0`` is no bucketing); cells ``mean ± std`` in percent over seeds."""
    blocks = [
        "Test accuracy (%), mean ± std over seeds of each run's mean over its last 5 evaluations "
        "(Karimireddy, He & Jaggi, arXiv 2006.09365); s = 0: no bucketing, s > 0: bucketing(s) then the rule.",
    ]
    for setting, rows in table.groupby("setting", sort=False):
        columns = sorted({(p, s) for p, s in zip(rows["partition"], rows["s"])},
                         key=lambda c: (c[0] != "iid", c[0], c[1]))
        header = ["rule", *[f"{_partition_label(p)}, s = {s}" for p, s in columns]]
        lines = ["", f"**{setting}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for rule, by_rule in rows.groupby("rule", sort=False):
            cells = {(p, s): text for p, s, text in zip(by_rule["partition"], by_rule["s"], by_rule["accuracy"])}
            lines.append("| " + " | ".join([_rule_label(str(rule)), *[cells.get(c, "–") for c in columns]]) + " |")
        blocks.append("\n".join(lines))
    return "\n".join(blocks) + "\n"


def bucketing_table_chart(table: pd.DataFrame) -> Any:
    """The table as points with ± std bars: x = rule, colour and offset = ``s``, columns = partition,
    rows = setting."""
    import altair as alt

    data = table.copy()
    data["rule_label"] = [_rule_label(r) for r in data["rule"]]
    data["partition_label"] = [_partition_label(p) for p in data["partition"]]
    data["bucketing"] = ["none (s = 0)" if s == 0 else f"s = {s}" for s in data["s"]]
    std = data["accuracy_std"].fillna(0.0)
    data["lo"] = (data["accuracy_mean"] - std).clip(0.0, 1.0)
    data["hi"] = (data["accuracy_mean"] + std).clip(0.0, 1.0)
    data = data[["rule_label", "partition_label", "bucketing", "setting", "accuracy_mean", "accuracy_std", "lo", "hi",
                 "accuracy", "seeds", "rule", "partition", "s"]]
    rules = list(dict.fromkeys(_rule_label(r) for r in sorted(set(table["rule"]), key=_rule_key)))
    partitions = [_partition_label(p) for p in sorted(set(table["partition"]), key=lambda p: (p != "iid", p))]
    x = alt.X("rule_label:N", title="rule", sort=rules, axis=alt.Axis(labelAngle=-30))
    offset = alt.XOffset("bucketing:N")
    color = alt.Color("bucketing:N", title="bucketing", legend=alt.Legend(orient="bottom"))
    bars = alt.Chart().mark_rule().encode(x=x, xOffset=offset, y=alt.Y("lo:Q"), y2="hi:Q", color=color)
    points = alt.Chart().mark_point(filled=True, size=50).encode(
        x=x, xOffset=offset,
        y=alt.Y("accuracy_mean:Q", title="accuracy (last 5 evals)", scale=alt.Scale(domain=[0, 1])),
        color=color,
        tooltip=["rule_label:N", "partition_label:N", "bucketing:N", "setting:N", "accuracy:N", "seeds:N"],
    )
    layered = alt.layer(bars, points, data=data).properties(width=max(160, 34 * len(rules)), height=160)
    facet = {"column": alt.Column("partition_label:N", title="data", sort=partitions)}
    if data["setting"].nunique() > 1:
        facet["row"] = alt.Row("setting:N", title=None, header=alt.Header(labelAngle=0, labelAlign="left"))
    return layered.facet(**facet).properties(
        title="Final test accuracy with and without bucketing (mean ± std over seeds; Karimireddy, He & Jaggi, "
              "arXiv 2006.09365)")


# ----------------------------------------------------------------------------------------------- #
# Curves per attack


def accuracy_by_attack_chart(curves: pd.DataFrame) -> Any:
    """Test accuracy vs step: rows = rule, columns = attack, colour = ``s``, dash = the other varying
    parameters; line = mean over seeds, band = ± std."""
    import altair as alt

    data = _with_rule_columns(curves.loc[curves["accuracy_n"] > 0])
    if data.empty:
        return note_chart("No evaluations in the summary (every run diverged before its first evaluation?).")
    variant_fields = _setting_fields(data, ("attack",))
    data["variant"] = _labels(data, variant_fields, empty="")
    data["bucketing"] = ["none (s = 0)" if s == 0 else f"s = {s}" for s in data["s"]]
    data["rule_label"] = [_rule_label(r) for r in data["rule"]]
    std = data["accuracy_std"].fillna(0.0)
    data["lo"] = (data["accuracy_mean"] - std).clip(0.0, 1.0)
    data["hi"] = (data["accuracy_mean"] + std).clip(0.0, 1.0)
    data["series"] = data["bucketing"] + np.where(data["variant"] != "", " · " + data["variant"], "")
    data = data[["step", "accuracy_mean", "accuracy_std", "accuracy_n", "lo", "hi", "rule_label", "attack", "bucketing",
                 "variant", "series"]].rename(columns={"accuracy_n": "seeds"})
    rules = list(dict.fromkeys(_rule_label(r) for r in sorted(set(_with_rule_columns(curves)["rule"]), key=_rule_key)))
    color = alt.Color("bucketing:N", title="bucketing",
                      legend=alt.Legend(orient="bottom", symbolType="stroke", symbolStrokeWidth=3, symbolOpacity=1))
    x = alt.X("step:Q", title="step")
    y = alt.Y("accuracy_mean:Q", title="test accuracy", scale=alt.Scale(domain=[0, 1]))
    enc: dict[str, Any] = {"color": color, "detail": "series:N"}
    if variant_fields:
        enc["strokeDash"] = alt.StrokeDash("variant:N", title=", ".join(_SHORT.get(f, f) for f in variant_fields),
                                           legend=alt.Legend(orient="bottom", columns=1, labelLimit=0))
    band = alt.Chart().mark_area(opacity=0.15).encode(x=x, y=alt.Y("lo:Q"), y2="hi:Q", color=color, detail="series:N")
    line = alt.Chart().mark_line().encode(x=x, y=y, **enc)
    # the evaluations as points (a run with one evaluation is a point, not an invisible line)
    points = alt.Chart().mark_point(filled=True, size=12).encode(
        x=x, y=y, color=alt.Color("bucketing:N", legend=None), detail="series:N",
        tooltip=["rule_label:N", "attack:N", "series:N", "step:Q",
                 alt.Tooltip("accuracy_mean:Q", format=".4f", title="accuracy (mean)"),
                 alt.Tooltip("accuracy_std:Q", format=".4f", title="std"), alt.Tooltip("seeds:Q", title="seeds")],
    )
    layered = alt.layer(band, line, points, data=data).properties(**_PANEL)
    return layered.facet(
        row=alt.Row("rule_label:N", title="rule", sort=rules, header=alt.Header(labelAngle=0, labelAlign="left")),
        column=alt.Column("attack:N", title="attack"),
    ).properties(title="Test accuracy per attack and rule, with and without bucketing (mean ± std over seeds)")


# ----------------------------------------------------------------------------------------------- #
# Selections


def selection_shares(selections: pd.DataFrame) -> pd.DataFrame:
    """Per group of seeds and worker: the share of steps the rule selected the worker's vector, over
    all seeds' steps (``Σ selected_share·steps / Σ steps``; the mean of ``selected_share`` without a
    ``steps`` column).

    A group is ``group_id`` when the table has it, else every grid parameter present but the seed.
    Rows whose share is NaN and groups where no worker was ever selected (rules that do not select)
    are dropped. Columns: the groups' parameters present in ``selections``, ``worker``,
    ``byzantine``, ``share``, ``runs``.
    """
    data = selections.loc[selections["selected_share"].notna()].copy()
    # "byzantine" and "steps" are the worker's flag and the steps counted (dpbr aggregate names the
    # declared f "byzantine_declared"); "steps" may also count fewer steps for a diverged run
    fields = [f for f in GROUP_FIELDS if f in data.columns and f not in ("steps", "byzantine")]
    keys = ["group_id"] if "group_id" in data.columns else fields
    # weights: the steps each run counted (its share is selected_steps / steps), 1 when not given
    weight = data["steps"].astype(float) if "steps" in data.columns else pd.Series(1.0, index=data.index)
    data["_selected"] = data["selected_share"].astype(float) * weight
    data["_weight"] = weight
    data["_byzantine"] = data["byzantine"].astype(bool)
    group = data.groupby([*keys, "worker"], sort=True, dropna=False)
    out = pd.DataFrame({
        **{f: group[f].first() for f in fields if f not in keys},
        "share": group["_selected"].sum() / group["_weight"].sum().replace(0.0, np.nan),
        "byzantine": group["_byzantine"].max(),
        "runs": group.size(),
    }).reset_index()
    # a rule that selects picks some worker at every step: a group with no selection at all does not select
    total = out.groupby(keys, sort=False, dropna=False)["share"].transform("sum")
    return out.loc[total > 0].reset_index(drop=True)


def selections_chart(selections: pd.DataFrame | None, why_missing: str = "") -> Any:
    """Share of steps each worker was selected: bars per worker, Byzantine in red; rows = rule,
    columns = setting. A note when there is nothing to show."""
    import altair as alt

    if selections is None:
        return note_chart(why_missing or "No selection counts in the summary.")
    shares = selection_shares(selections)
    if shares.empty:
        return note_chart("No rule of this grid selects workers' vectors (Krum, multi-Krum, MDA, Bulyan do).")
    fields = _setting_fields(shares, ("byzantine", "steps"))
    shares["setting"] = _labels(shares, fields)
    shares["worker_kind"] = np.where(shares["byzantine"], "Byzantine", "honest")
    data = shares[["gar", "setting", "worker", "worker_kind", "share", "runs"]]
    color = alt.Color("worker_kind:N", title="worker", scale=alt.Scale(domain=["honest", "Byzantine"],
                                                                       range=["#7f7f7f", "#d62728"]),
                      legend=alt.Legend(orient="bottom"))
    bars = alt.Chart(data).mark_bar().encode(
        x=alt.X("worker:O", title="worker (honest 0 … h − 1, then Byzantine)"),
        y=alt.Y("share:Q", title="share of steps selected", scale=alt.Scale(domain=[0, 1])),
        color=color,
        tooltip=["gar:N", "setting:N", "worker:O", "worker_kind:N", alt.Tooltip("share:Q", format=".3f"),
                 alt.Tooltip("runs:Q", title="seeds")],
    ).properties(width=220, height=90)
    facet: dict[str, Any] = {"row": alt.Row("gar:N", title="rule", header=alt.Header(labelAngle=0, labelAlign="left"))}
    if data["setting"].nunique() > 1:
        facet["column"] = alt.Column("setting:N", title=None)
    return bars.facet(**facet).properties(title="How often the rule selected each worker's vector (mean over seeds)")


# ----------------------------------------------------------------------------------------------- #


def _read_summary(path: Path, required: Sequence[str]) -> pd.DataFrame:
    if not path.exists():
        raise UsageError("--summary-dir", f"{str(path)!r} is missing; run `dpbr aggregate` first")
    return read_frame(path, "--summary-dir", "a summary of `dpbr aggregate` (run it again)", required=required,
                      texts=[c for c in required if c in _TEXTS],
                      numbers=[c for c in required if c not in _TEXTS])


def hetero_report(summary_dir: str | Path, out_dir: str | Path, *, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write :data:`SUMMARY_FILES` into ``summary_dir`` and :data:`FIGURES` into ``out_dir``; returns the paths.

    Reads ``final_accuracy.parquet`` and ``curves.parquet`` of ``summary_dir`` (required) and
    ``selections.parquet`` (optional: without it the selection figure says so).

    Raises
    ------
    UsageError
        A missing or unusable summary (``--summary-dir``), an unknown format (``--formats``), or an
        output folder that cannot be written (``--out-dir``).
    """
    for fmt in formats:
        if fmt not in FORMATS:
            raise UsageError("--formats", f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    summary = Path(summary_dir)
    paths = summary_paths(summary)
    final = _read_summary(paths["final"], _FINAL_COLUMNS)
    curves = _read_summary(paths["curves"], _CURVES_COLUMNS)
    selection_path = paths.get("selections", summary / "selections.parquet")
    selections = None
    why = ""
    if Path(selection_path).exists():
        selections = read_frame(selection_path, "--summary-dir", "the selection counts of `dpbr aggregate`",
                                required=_SELECTION_COLUMNS, texts=("gar",),
                                numbers=("worker", "byzantine", "selected_share"), allow_empty=True)
    else:
        why = f"{str(selection_path)!r} is missing: this dpbr version's `dpbr aggregate` writes no selection counts."
    figures = check_folder(out_dir, "--out-dir")
    check_folder(summary, "--summary-dir")
    table = bucketing_table(final)
    charts = {
        "bucketing_table": bucketing_table_chart(table),
        "accuracy_by_attack": accuracy_by_attack_chart(curves),
        "selections": selections_chart(selections, why),
    }
    written = [write_csv(table, summary / SUMMARY_FILES["table_csv"])]
    md = summary / SUMMARY_FILES["table_md"]
    with atomic_path(md) as tmp:
        Path(tmp).write_text(markdown_tables(table), encoding="utf-8")
    written.append(md)
    for name in FIGURES:
        for fmt in formats:
            written.append(save_chart(charts[name], figures / f"{name}.{fmt}", fmt))
    return written
