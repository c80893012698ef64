"""The figures of ``dpbr systems-report`` (Altair): DRACO's exact recovery, time to accuracy, the vote under
privacy noise, Byzantine servers, costs per step, lossy networks and staleness.

Each function takes the table of :func:`dpbr.report.systems_table.systems_table` (and the evaluation curves
of :func:`dpbr.report.systems_claims.evaluation_curves`) and returns a chart; a figure whose cells are
absent from the grid is a chart that says so (:func:`dpbr.report.charts.note_chart`). Papers: DRACO (Chen,
Wang, Charles & Papailiopoulos 2018, arXiv 1803.09877), GuanYu (El Mhamdi, Guerraoui, Guirguis & Rouault
2019, arXiv 1905.03853), LiuBei (El Mhamdi, Guerraoui & Guirguis, PODC 2020), AggregaThor (Damaskinos,
El Mhamdi, Guerraoui, Guirguis & Rouault, SysML 2019).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from dpbr.report.aggregate import loss_window
from dpbr.report.charts import note_chart
from dpbr.report.systems_claims import Groups, condition_label, lossy_baseline, lossy_conditions
from dpbr.report.systems_table import epsilon_text

__all__ = [
    "costs_chart",
    "draco_exact_chart",
    "lossy_chart",
    "privacy_vote_chart",
    "servers_chart",
    "staleness_chart",
    "time_to_accuracy_chart",
]
#: The size of one facet panel.
_PANEL = {"width": 170, "height": 110}


def _curve_data(table: pd.DataFrame, curves: pd.DataFrame, rows: Sequence[int]) -> pd.DataFrame:
    info = table.iloc[list(rows)][["group_id", "setup", "system", "gar", "attack", "epsilon"]]
    return curves.merge(info, on="group_id", how="inner")


def _accuracy_y() -> Any:
    import altair as alt

    return alt.Y("accuracy:Q", title="test accuracy", scale=alt.Scale(domain=[0, 1]))


def draco_exact_chart(table: pd.DataFrame, curves: pd.DataFrame) -> Any:
    """Test accuracy vs step of the DRACO groups without noise: one panel per DRACO setup (code, r), colour =
    attack. Exact recovery draws every attack on the adversary-free line (one visible line)."""
    import altair as alt

    groups = Groups(table)
    rows = [i for i in range(len(table)) if groups.name(i) == "draco" and not groups.noise(i)]
    if not rows:
        return note_chart("No DRACO cells without privacy noise in this grid (--system draco(...)).")
    data = _curve_data(table, curves, rows)
    if data.empty:
        return note_chart("The DRACO cells have no evaluations (every run diverged before its first one?).")
    data = data[["setup", "attack", "step", "accuracy", "runs"]]
    color = alt.Color("attack:N", title="attack", legend=alt.Legend(orient="bottom"))
    line = alt.Chart().mark_line().encode(x=alt.X("step:Q", title="step"), y=_accuracy_y(), color=color)
    points = alt.Chart().mark_point(filled=True, size=14).encode(
        x="step:Q", y="accuracy:Q", color=alt.Color("attack:N", legend=None),
        tooltip=["setup:N", "attack:N", "step:Q", alt.Tooltip("accuracy:Q", format=".4f"),
                 alt.Tooltip("runs:Q", title="seeds")])
    return alt.layer(line, points, data=data).properties(**_PANEL).facet(
        column=alt.Column("setup:N", title="DRACO")).properties(
        title="DRACO: test accuracy per attack (mean over seeds; exact recovery = one line; Chen et al., "
              "arXiv 1803.09877)")


def time_to_accuracy_chart(table: pd.DataFrame, curves: pd.DataFrame) -> Any:
    """Test accuracy vs simulated seconds at the evaluation steps: DRACO (no noise) and the one-server rules
    under the attacks DRACO runs under (ideal network, τ = 0, no noise); one panel per attack."""
    import altair as alt

    groups = Groups(table)
    draco = [i for i in range(len(table)) if groups.name(i) == "draco" and not groups.noise(i)]
    attacks = {table.at[i, "attack"] for i in draco}
    server = [i for i in range(len(table)) if groups.is_server(i) and groups.ideal(i) and not groups.noise(i)
              and int(table.at[i, "staleness"]) == 0 and table.at[i, "attack"] in attacks]
    if not draco or not server:
        return note_chart("Needs DRACO cells and one-server cells under the same attack (ideal network, no noise).")
    data = _curve_data(table, curves, [*draco, *server])
    data["who"] = [s if s != "server" else f"server, {g}" for s, g in zip(data["setup"], data["gar"])]
    data = data[["who", "attack", "step", "seconds", "accuracy", "runs"]]
    line = alt.Chart().mark_line(point=alt.OverlayMarkDef(filled=True, size=14)).encode(
        x=alt.X("seconds:Q", title="simulated seconds"), y=_accuracy_y(),
        color=alt.Color("who:N", title="system / rule", legend=alt.Legend(orient="bottom", columns=3, labelLimit=0)),
        tooltip=["who:N", "attack:N", "step:Q", alt.Tooltip("seconds:Q", format=".3f"),
                 alt.Tooltip("accuracy:Q", format=".4f"), alt.Tooltip("runs:Q", title="seeds")])
    return line.properties(**_PANEL).facet(data=data, column=alt.Column("attack:N", title="attack")).properties(
        title="Test accuracy vs simulated time: DRACO vs one-server rules at equal compute per gradient")


def _windows(metrics: pd.DataFrame, group_ids: Sequence[str], column: str) -> pd.DataFrame:
    """Mean of ``column`` over windows ``(s − w, s]`` of ``w = ⌈steps/20⌉`` steps, and over seeds, per group."""
    rows = metrics.loc[metrics["group_id"].isin(list(group_ids)) & (metrics["step"] >= 1)]
    if column not in rows.columns or rows.empty:
        return pd.DataFrame(columns=["group_id", "step", column])
    steps = int(rows["step"].max())
    w = int(loss_window(steps))
    end = np.minimum(np.ceil(rows["step"].to_numpy() / w) * w, steps).astype(np.int64)
    return (pd.DataFrame({"group_id": rows["group_id"].to_numpy(), "step": end,
                          column: rows[column].to_numpy(dtype=float)})
            .groupby(["group_id", "step"], sort=True)[column].mean().reset_index())


def privacy_vote_chart(table: pd.DataFrame, curves: pd.DataFrame, metrics: pd.DataFrame) -> Any:
    """DRACO with per-worker noise: the decoded fraction (windows of ⌈steps/20⌉ steps) and the test accuracy vs
    step, colour = DRACO setup (vote), with the one-server rules of the same noise and attack in the accuracy
    panel."""
    import altair as alt

    groups = Groups(table)
    draco = [i for i in range(len(table)) if groups.name(i) == "draco" and groups.noise(i)]
    if not draco:
        return note_chart("No DRACO cells with privacy noise (epsilon) in this grid.")
    server = sorted({k for i in draco for k in groups.like(i, free=("gar",), system=lambda k: groups.is_server(k))})

    def who(rows: pd.DataFrame) -> list[str]:
        return [f"{s} ({g}, ε={epsilon_text(e)})" if s == "server" else f"{s} (ε={epsilon_text(e)})"
                for s, g, e in zip(rows["setup"], rows["gar"], rows["epsilon"])]

    info = table.iloc[[*draco, *server]][["group_id", "setup", "gar", "epsilon", "attack"]].copy()
    info["who"] = who(info)
    decoded = _windows(metrics, table.iloc[draco]["group_id"], "decoded_fraction").merge(info, on="group_id")
    accuracy = curves.merge(info, on="group_id")
    color = alt.Color("who:N", title="system", legend=alt.Legend(orient="bottom", columns=1, labelLimit=0))
    top = alt.Chart(decoded[["who", "attack", "step", "decoded_fraction"]]).mark_line(point=True).encode(
        x=alt.X("step:Q", title="step"),
        y=alt.Y("decoded_fraction:Q", title="decoded fraction", scale=alt.Scale(domain=[0, 1])), color=color,
        tooltip=["who:N", "attack:N", "step:Q", alt.Tooltip("decoded_fraction:Q", format=".3f")],
    ).properties(width=320, height=110, title="decoded fraction (window means)")
    bottom = alt.Chart(accuracy[["who", "attack", "step", "accuracy", "runs"]]).mark_line(point=True).encode(
        x=alt.X("step:Q", title="step"), y=_accuracy_y(), color=color,
        tooltip=["who:N", "attack:N", "step:Q", alt.Tooltip("accuracy:Q", format=".4f"),
                 alt.Tooltip("runs:Q", title="seeds")],
    ).properties(width=320, height=110, title="test accuracy")
    return alt.vconcat(top, bottom).properties(
        title="DRACO under per-worker DP noise: exact vs tolerance vote (Chen et al., arXiv 1803.09877)")


def servers_chart(table: pd.DataFrame, curves: pd.DataFrame) -> Any:
    """Test accuracy vs step of GuanYu and LiuBei per server behaviour (colour), one panel per system and
    rule/attack, with the one-server baseline of the same rule and attack (black, dashed)."""
    import altair as alt

    groups = Groups(table)
    rows = [i for i in range(len(table)) if groups.name(i) in ("guanyu", "liubei")]
    if not rows:
        return note_chart("No GuanYu or LiuBei cells in this grid (--system guanyu(...) / liubei(...)).")
    parts = []
    for i in rows:
        spec = groups.system[i]
        panel = f"{'GuanYu' if groups.name(i) == 'guanyu' else 'LiuBei'} m={spec['m'] if spec else '?'}, " \
                f"{table.at[i, 'gar']}/{table.at[i, 'attack']}"
        behaviour = (f"{spec['attack']} ({spec['byzantine']} Byzantine)" if spec is not None and int(spec["byzantine"])
                     else "no Byzantine server")
        c = curves.loc[curves["group_id"] == table.at[i, "group_id"]].assign(panel=panel, series=behaviour)
        parts.append(c)
        for k in groups.like(i, system=lambda k: groups.is_server(k)):
            parts.append(curves.loc[curves["group_id"] == table.at[k, "group_id"]].assign(
                panel=panel, series="one trusted server"))
    data = pd.concat(parts, ignore_index=True).drop_duplicates(["panel", "series", "step"])
    data = data[["panel", "series", "step", "accuracy", "runs"]]
    series = sorted(set(data["series"]) - {"one trusted server"})
    domain = [*series, "one trusted server"]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    colors = [palette[k % len(palette)] for k in range(len(series))] + ["#000000"]
    line = alt.Chart().mark_line().encode(
        x=alt.X("step:Q", title="step"), y=_accuracy_y(),
        color=alt.Color("series:N", title="server behaviour", scale=alt.Scale(domain=domain, range=colors),
                        legend=alt.Legend(orient="bottom", columns=3, labelLimit=0)),
        strokeDash=alt.condition(alt.datum.series == "one trusted server", alt.value([5, 3]), alt.value([1, 0])),
        tooltip=["panel:N", "series:N", "step:Q", alt.Tooltip("accuracy:Q", format=".4f"),
                 alt.Tooltip("runs:Q", title="seeds")])
    return line.properties(**_PANEL).facet(data=data, column=alt.Column("panel:N", title=None)).properties(
        title="Byzantine servers: GuanYu (arXiv 1905.03853) and LiuBei (PODC 2020) vs one trusted server")


def costs_chart(table: pd.DataFrame) -> Any:
    """Messages, bytes and simulated seconds per step of every setup (mean over its groups), log scales."""
    import altair as alt

    data = table[["setup", "messages", "bytes", "step_seconds", "gradient_computations"]].copy()
    data = data.groupby("setup", sort=False).mean().reset_index()
    long = data.melt(id_vars=["setup"], value_vars=["messages", "bytes", "step_seconds"], var_name="cost",
                     value_name="value")
    long = long.loc[long["value"] > 0]
    if long.empty:
        return note_chart("No cost columns with values in the summary.")
    names = {"messages": "messages per step", "bytes": "bytes per step", "step_seconds": "simulated s per step"}
    long["cost"] = long["cost"].map(names)
    order = list(dict.fromkeys(table["setup"]))
    chart = alt.Chart().mark_point(filled=True, size=60).encode(
        y=alt.Y("setup:N", title=None, sort=order, axis=alt.Axis(labelLimit=320)),
        x=alt.X("value:Q", title=None, scale=alt.Scale(type="log")),
        color=alt.Color("setup:N", legend=None),
        tooltip=["setup:N", "cost:N", alt.Tooltip("value:Q", format=".4g")])
    rules = alt.Chart().mark_rule(opacity=0.3).encode(y=alt.Y("setup:N", sort=order), x=alt.X("value:Q"))
    return alt.layer(rules, chart, data=long).properties(width=200, height=max(80, 16 * len(order))).facet(
        column=alt.Column("cost:N", title=None, sort=list(names.values()))).resolve_scale(x="independent").properties(
        title="Cost per step of each system (link model of dpbr.simulation.systems.costs; log scales)")


def _diverged(x: Any, color: Any, **encoding: Any) -> Any:
    """Crosses at accuracy 0 for the groups without a final accuracy (every run diverged)."""
    import altair as alt

    return alt.Chart().transform_filter("!isValid(datum.accuracy_mean)").transform_calculate(zero="0").mark_point(
        shape="cross", filled=True, size=70).encode(x=x, y=alt.Y("zero:Q"), color=color,
                                                     tooltip=[alt.Tooltip("accuracy:N", title="final accuracy")],
                                                     **encoding)


def lossy_chart(table: pd.DataFrame) -> Any:
    """Final accuracy per rule (colour) and condition (x): no loss and no attack, each lossy network, the nan
    attack (AggregaThor's dropped packets and malformed gradients); bars = ± std over seeds."""
    import altair as alt

    groups = Groups(table)
    conditions = lossy_conditions(groups)
    if not conditions:
        return note_chart("No lossy-network (--network lossy(...)) or nan-attack one-server cells in this grid.")
    rows = list(dict.fromkeys([b for i in conditions for b in lossy_baseline(groups, i)[:1]] + conditions))
    data = table.iloc[rows][["gar", "accuracy_mean", "accuracy_std", "accuracy", "seeds"]].copy()
    data["condition"] = [condition_label(groups, i) for i in rows]
    std = data["accuracy_std"].fillna(0.0)
    data["lo"] = (data["accuracy_mean"] - std).clip(0, 1)
    data["hi"] = (data["accuracy_mean"] + std).clip(0, 1)
    order = list(dict.fromkeys(["no loss", *data["condition"]]))
    x = alt.X("condition:N", title="condition", sort=order, axis=alt.Axis(labelAngle=-30, labelLimit=240))
    color = alt.Color("gar:N", title="rule", legend=alt.Legend(orient="bottom"))
    bars = alt.Chart().mark_rule().encode(x=x, xOffset="gar:N", y="lo:Q", y2="hi:Q", color=color)
    points = alt.Chart().mark_point(filled=True, size=50).encode(
        x=x, xOffset="gar:N", y=alt.Y("accuracy_mean:Q", title="final test accuracy", scale=alt.Scale(domain=[0, 1])),
        color=color, tooltip=["gar:N", "condition:N", "accuracy:N", "seeds:N"])
    layered = alt.layer(bars, points, _diverged(x, color, xOffset="gar:N"), data=data)
    return layered.properties(width=max(200, 60 * len(order)), height=170).properties(
        title="Dropped packets and malformed gradients (AggregaThor, SysML 2019): final accuracy per rule (+ at 0: "
              "diverged)")


def staleness_chart(table: pd.DataFrame) -> Any:
    """Final accuracy vs τ per rule (one server), from τ = 0; bars = ± std over seeds."""
    import altair as alt

    groups = Groups(table)
    stale = [i for i in range(len(table)) if groups.is_server(i) and int(table.at[i, "staleness"]) > 0]
    if not stale:
        return note_chart("No cells with staleness (--staleness τ > 0) in this grid.")
    rows = list(dict.fromkeys([*(b for i in stale for b in groups.like(i, staleness=0)[:1]), *stale]))
    data = table.iloc[rows][["gar", "attack", "staleness", "accuracy_mean", "accuracy_std", "accuracy", "seeds"]].copy()
    data["rule"] = [g if a == "none" else f"{g}/{a}" for g, a in zip(data["gar"], data["attack"])]
    std = data["accuracy_std"].fillna(0.0)
    data["lo"] = (data["accuracy_mean"] - std).clip(0, 1)
    data["hi"] = (data["accuracy_mean"] + std).clip(0, 1)
    data = data.drop(columns=["gar", "attack"])
    x = alt.X("staleness:O", title="staleness bound τ (steps)", axis=alt.Axis(labelAngle=0))
    color = alt.Color("rule:N", title="rule", legend=alt.Legend(orient="bottom"))
    line = alt.Chart().mark_line(point=alt.OverlayMarkDef(filled=True, size=50)).encode(
        x=x, y=alt.Y("accuracy_mean:Q", title="final test accuracy", scale=alt.Scale(domain=[0, 1])), color=color,
        tooltip=["rule:N", "staleness:O", "accuracy:N", "seeds:N"])
    bars = alt.Chart().mark_rule().encode(x=x, y="lo:Q", y2="hi:Q", color=color)
    return alt.layer(bars, line, _diverged(x, color), data=data).properties(width=220, height=160).properties(
        title="Bounded staleness: final accuracy vs τ per rule (one server; + at 0: diverged)")
