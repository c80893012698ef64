"""The robust systems' table (``dpbr systems-report``): one row per group of seeds, with its accuracy, its
costs per step and what its system did; and the short names of systems and networks the report uses.

Read from ``dpbr aggregate``'s ``metrics.parquet`` (every step of every cell, with the per-step costs of
:mod:`dpbr.simulation.systems.costs` and, for system runs, :data:`dpbr.simulation.systems.run.SYSTEM_COLUMNS`)
and ``final_accuracy.parquet``. Each run is reduced over its steps ``t ≥ 1`` first (means; Σ
``step_seconds`` = the simulated time to its last step), then the runs of a group are averaged (the
servers' spread: the largest). Systems: DRACO (Chen, Wang, Charles & Papailiopoulos 2018, arXiv
1803.09877), GuanYu (El Mhamdi, Guerraoui, Guirguis & Rouault 2019, arXiv 1905.03853), LiuBei (El Mhamdi,
Guerraoui & Guirguis, PODC 2020), lossy networks as in AggregaThor (Damaskinos, El Mhamdi, Guerraoui,
Guirguis & Rouault, SysML 2019).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from dpbr import system_catalog
from dpbr.errors import UsageError
from dpbr.registry import format_float
from dpbr.report.aggregate import GROUP_FIELDS, mean_std_text

__all__ = [
    "COST_COLUMNS",
    "MEASURED",
    "SYSTEM_MEANS",
    "TABLE_VALUES",
    "canon",
    "epsilon_text",
    "markdown_table",
    "network_label",
    "number_text",
    "parse_network_text",
    "parse_system_text",
    "rule_base",
    "setup_label",
    "system_label",
    "system_name",
    "systems_table",
    "table_markdown",
]

#: Per-step cost columns every train cell records (:data:`dpbr.simulation.systems.costs.COST_COLUMNS`).
COST_COLUMNS: tuple[str, ...] = ("gradient_computations", "messages", "bytes_workers", "bytes_servers", "rounds",
                                 "step_seconds")
#: What system runs record (:data:`dpbr.simulation.systems.run.SYSTEM_COLUMNS`); absent or NaN for engine runs.
SYSTEM_MEANS: tuple[str, ...] = ("decoded_fraction", "update_applied", "located_byzantine", "packets_lost",
                                 "messages_lost", "models_rejected", "staleness_mean")

#: Measured wall-clock seconds per step: the aggregation (engine runs), the whole system step (system runs).
MEASURED: tuple[str, ...] = ("seconds_aggregate", "seconds_step")
#: The table's columns after the group's parameters.
TABLE_VALUES: tuple[str, ...] = (
    "accuracy_mean", "accuracy_std", "accuracy", "completed", "seeds", "gradient_computations", "messages", "bytes",
    "rounds", "step_seconds", "simulated_seconds", "updates_per_second", *SYSTEM_MEANS, "server_spread_max",
    *MEASURED)


# ----------------------------------------------------------------------------------------------- #
# Names


def canon(value: Any) -> str:
    """One text per value, for matching groups: NaN/None → ``none``, floats canonical, the rest ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "none"
    if isinstance(value, (float, np.floating)):
        return format_float(float(value))
    if isinstance(value, (np.integer,)):
        return str(int(value))
    return str(value)


def parse_system_text(text: str) -> system_catalog.SystemSpec | None:
    try:
        return system_catalog.parse_system(text)
    except UsageError:  # a name of another dpbr version: shown as it is
        return None


def parse_network_text(text: str) -> system_catalog.NetworkSpec | None:
    try:
        return system_catalog.parse_network(text)
    except UsageError:
        return None


def system_label(text: str) -> str:
    """Short name of a ``--system`` text: ``DRACO repetition r=3``, ``GuanYu m=6 (1 Byzantine: random)``,
    ``server``."""
    spec = parse_system_text(text)
    if spec is None:
        return str(text)
    p = spec.params
    if spec.name == "draco":
        label = f"DRACO {p['code']} r={p['r']}"
        if p["vote"] == "tolerance":
            label += f" tolerance vote tol={format_float(p['tol'])}"
        elif p["tol"]:
            label += f" tol={format_float(p['tol'])}"
        return label
    if spec.name in ("guanyu", "liubei"):
        label = f"{'GuanYu' if spec.name == 'guanyu' else 'LiuBei'} m={p['m']}"
        if spec.name == "liubei" and p["gather"] != system_catalog.SYSTEMS["liubei"]["gather"]:
            label += f" T={p['gather']}"
        return label + (f" ({p['byzantine']} Byzantine: {p['attack']})" if p["byzantine"] else " (no Byzantine server)")
    return spec.name


def network_label(text: str) -> str:
    """``ideal`` or ``lossy drop=0.01 fill=zeros`` (the link's latency, bandwidth and compute left out)."""
    net = parse_network_text(text)
    if net is None:
        return str(text)
    return "ideal" if not net.lossy else f"lossy drop={format_float(net.drop)} fill={net.fill}"


def system_name(text: str) -> str:
    spec = parse_system_text(text)
    return spec.name if spec is not None else str(text).split("(")[0]


def rule_base(gar: str) -> str:
    return str(gar).split("(")[0]


def setup_label(row: Mapping[str, Any]) -> str:
    """The system, with the network when lossy and τ when > 0: ``server · lossy drop=0.1 fill=zeros``."""
    parts = [system_label(row["system"])]
    network = network_label(row["network"])
    if network != "ideal":
        parts.append(network)
    if int(row["staleness"]):
        parts.append(f"τ={int(row['staleness'])}")
    return " · ".join(parts)


def epsilon_text(value: Any) -> str:
    return "none" if pd.isna(value) else format_float(float(value))


def number_text(x: Any) -> str:
    """A number as short text: ``–`` for NaN, thousands separated from 10,000, else 4 significant digits."""
    if x is None or pd.isna(x):
        return "–"
    x = float(x)
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if abs(x) >= 1e4:
        return f"{x:,.0f}"
    if x == int(x):
        return str(int(x))
    return f"{x:.4g}"


# ----------------------------------------------------------------------------------------------- #
# The table


def _runs(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per run (cell): the means over its steps ``t ≥ 1`` of the costs and of what the system did,
    ``simulated_seconds`` = Σ ``step_seconds``, ``updates`` (steps whose update was applied; a step of an
    engine run, without ``update_applied``, applies one), the largest ``server_spread``."""
    cells = metrics.drop_duplicates("cell_id").set_index("cell_id")["group_id"]
    rows = metrics.loc[metrics["step"] >= 1].copy()
    rows["bytes"] = rows["bytes_workers"].astype(float) + rows["bytes_servers"].astype(float)
    for col in (*SYSTEM_MEANS, "server_spread", *MEASURED):
        if col not in rows.columns:
            rows[col] = np.nan
    g = rows.groupby("cell_id", sort=False)
    out = pd.DataFrame(index=cells.index)
    out["group_id"] = cells
    for col in ("gradient_computations", "messages", "bytes", "rounds", "step_seconds", *SYSTEM_MEANS, *MEASURED):
        out[col] = g[col].mean()
    out["simulated_seconds"] = g["step_seconds"].sum(min_count=1)
    out["updates"] = rows["update_applied"].astype(float).fillna(1.0).groupby(rows["cell_id"], sort=False).sum()
    out["updates"] = out["updates"].fillna(0.0)
    out["updates_per_second"] = out["updates"] / out["simulated_seconds"].where(out["simulated_seconds"] > 0)
    out["server_spread_max"] = g["server_spread"].max()
    return out.reset_index()


def systems_table(metrics: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """The table of every group of seeds (module docstring): its parameters, ``setup`` (:func:`system_label`,
    the network when lossy, τ when > 0), then :data:`TABLE_VALUES`, and ``group_id``.

    ``metrics`` is ``dpbr aggregate``'s ``metrics.parquet``, ``final`` its ``final_accuracy.parquet`` (the
    accuracy at each run's last evaluation, mean ± sample std over the completed runs). Runs are reduced
    over their steps first (:func:`_runs`), then averaged over the group's runs (``server_spread_max``: the
    largest). Sorted by system (server, DRACO, GuanYu, LiuBei), network, τ, rule, attack and ε.
    """
    runs = _runs(metrics)
    g = runs.groupby("group_id", sort=False)
    values = g[[c for c in runs.columns if c not in ("cell_id", "group_id", "server_spread_max", "updates")]].mean()
    values["server_spread_max"] = g["server_spread_max"].max()
    fields = [f for f in GROUP_FIELDS if f in metrics.columns]
    info = metrics.drop_duplicates("group_id").set_index("group_id")[fields]
    acc = final.drop_duplicates("group_id").set_index("group_id")[["accuracy_mean", "accuracy_std", "completed",
                                                                    "seeds"]]
    table = info.join(acc).join(values).reset_index()
    table["completed"] = table["completed"].fillna(0).astype(np.int64)
    table["seeds"] = table["seeds"].fillna("").astype(str)
    table["accuracy"] = [mean_std_text(m, s, int(n)) for m, s, n in
                         zip(table["accuracy_mean"], table["accuracy_std"], table["completed"])]
    table["setup"] = [setup_label(r) for r in table[["system", "network", "staleness"]].to_dict("records")]
    order = {"server": 0, "draco": 1, "guanyu": 2, "liubei": 3}
    key = pd.DataFrame({
        "system": [(order.get(system_name(s), 4), s) for s in table["system"]],
        "network": [(network_label(n) != "ideal", n) for n in table["network"]],
        "staleness": table["staleness"].astype(int),
        "gar": table["gar"].astype(str),
        "attack": [(a != "none", a) for a in table["attack"]],
        "epsilon": [(not pd.isna(e), 0.0 if pd.isna(e) else -float(e)) for e in table["epsilon"]],
        "group_id": table["group_id"],
    })
    index = sorted(range(len(table)), key=lambda i: tuple(key.iloc[i]))
    head = ["setup", "system", "network", "staleness", "gar", "attack", "epsilon"]
    rest = [f for f in fields if f not in head]
    columns = [*head, *rest, *TABLE_VALUES, "group_id"]
    return table.iloc[index][columns].reset_index(drop=True)


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


_COST_SHOWN = ("gradient_computations", "messages", "bytes", "rounds", "step_seconds", "simulated_seconds",
               "updates_per_second")


def table_markdown(table: pd.DataFrame) -> str:
    """The table as two Markdown tables: accuracy and costs; what each system did and the measured seconds."""
    ident = [(r["setup"], r["gar"], r["attack"], epsilon_text(r["epsilon"])) for r in table.to_dict("records")]
    costs = markdown_table(
        ["system", "rule", "attack", "ε", "final accuracy", "gradients/step", "messages/step", "bytes/step",
         "rounds/step", "simulated s/step", "simulated s (run)", "updates/simulated s"],
        [(*i, r["accuracy"], *(number_text(r[c]) for c in _COST_SHOWN))
         for i, r in zip(ident, table.to_dict("records"))])
    did = markdown_table(
        ["system", "rule", "attack", "ε", "decoded", "update applied", "located Byzantine", "packets lost",
         "messages lost", "models rejected", "staleness", "max server spread", "measured s aggregate",
         "measured s step"],
        [(*i, *(number_text(r[c]) for c in (*SYSTEM_MEANS, "server_spread_max", *MEASURED)))
         for i, r in zip(ident, table.to_dict("records"))])
    intro = ("Final test accuracy: mean ± std over seeds of the last evaluation. Costs per step (means over the "
             "steps, then over seeds) from the link model of dpbr.simulation.systems.costs: bytes = workers' + "
             "servers'; simulated s (run) = Σ step_seconds; updates/simulated s = updates applied / that.")
    did_intro = ("What the system did (means over steps and seeds; – = not applicable): DRACO's decoded share and "
                 "located Byzantine messages, packets and whole messages lost on a lossy network, LiuBei's "
                 "rejected models, the mean staleness, the largest spread of the honest servers' models, and the "
                 "measured wall-clock seconds per step of the aggregation (one-server engine runs) or of the "
                 "whole system step (system runs), on the machine that ran the cells.")
    return "\n".join([intro, "", *costs, "", did_intro, "", *did]) + "\n"
