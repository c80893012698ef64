"""The claims of the robust-systems papers, checked on a grid (``dpbr systems-report``'s claims table).

One row per claim of :data:`CLAIMS` — DRACO (Chen, Wang, Charles & Papailiopoulos 2018, arXiv 1803.09877):
exact recovery, ``r×`` the gradient computations, "several times faster than median-based approaches",
its vote under per-worker DP noise; GuanYu (El Mhamdi, Guerraoui, Guirguis & Rouault 2019, arXiv
1905.03853): accuracy with Byzantine servers and its overhead; LiuBei (El Mhamdi, Guerraoui & Guirguis,
PODC 2020): Byzantine servers tolerated with the two rounds per step of a vanilla parameter server;
AggregaThor (Damaskinos, El Mhamdi, Guerraoui, Guirguis & Rouault, SysML 2019): robust rules over a
lossy transport and malformed gradients, Multi-Krum at 19 % (weak) / 43 % (strong resilience) overhead
over averaging; bounded staleness (Kardam: Damaskinos, El Mhamdi, Guerraoui, Patra & Taziki, ICML 2018)
— with the measured evidence as text, the rule the verdict follows, and the verdict: ``holds``,
``holds with a caveat``, ``does not hold``, or ``not measured (cells missing)`` when the grid lacks the
cells the claim needs (nothing is invented). A claim made of several comparisons takes the weakest of
their verdicts. Counterparts are found by equal parameters (:class:`Groups`): e.g. a DRACO group under
an attack and the DRACO group with attack ``none`` and every other parameter equal.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from dpbr.report.aggregate import GROUP_FIELDS
from dpbr.report.systems_table import (canon, epsilon_text, markdown_table, network_label, number_text,
                                       parse_network_text, parse_system_text, rule_base, system_label, system_name)

__all__ = [
    "CAVEAT",
    "CLAIMS",
    "FAILS",
    "Groups",
    "HOLDS",
    "MISSING",
    "claims_markdown",
    "condition_label",
    "evaluation_curves",
    "lossy_baseline",
    "lossy_conditions",
    "systems_claims",
]

#: The verdicts, strongest first.
HOLDS, CAVEAT, FAILS, MISSING = "holds", "holds with a caveat", "does not hold", "not measured (cells missing)"
_RANK = {HOLDS: 0, CAVEAT: 1, FAILS: 2}

#: The thresholds of the verdict rules (stated in each claim's ``rule``).
ACCURACY_MARGIN = 0.05      # "as accurate as": at most 0.05 below the baseline's final accuracy
EXACT_RELATIVE = 1e-4       # DRACO's cyclic code: float32 decoding, equal to rounding
TARGET_FRACTION = 0.9       # time to accuracy: target = 0.9 × the best final accuracy compared
SPEEDUP = 2.0               # "several times faster": at least 2×
DECODED_NONE, DECODED_FEW = 0.01, 0.1          # the exact vote under noise decodes "(almost) nothing"
GUANYU_RATIO, GUANYU_RATIO_CAVEAT = 2.0, 3.0   # GuanYu's step time over one server's
LIUBEI_EXTRA_ROUNDS = 0.25  # LiuBei's "(almost) no" overhead: at most a quarter round per step beyond 2 + 1/T
AGGREGATHOR_WEAK, AGGREGATHOR_STRONG = 0.19, 0.43  # AggregaThor's overheads (weak, strong resilience)
#: The median-based rules DRACO is compared with.
MEDIAN_BASED: tuple[str, ...] = ("median", "geometric-median", "multi-krum")

_DRACO = "Chen, Wang, Charles & Papailiopoulos 2018 (arXiv 1803.09877)"
_GUANYU = "El Mhamdi, Guerraoui, Guirguis & Rouault 2019 (arXiv 1905.03853)"
_LIUBEI = "El Mhamdi, Guerraoui & Guirguis, PODC 2020"
_AGGREGATHOR = "Damaskinos, El Mhamdi, Guerraoui, Guirguis & Rouault, SysML 2019"
_KARDAM = "bounded staleness (Damaskinos, El Mhamdi, Guerraoui, Patra & Taziki, ICML 2018)"

#: ``(id, name, paper, claim)`` of every claim, in the order of the claims table.
CLAIMS: tuple[tuple[str, str, str, str], ...] = (
    ("a", "DRACO exact recovery", _DRACO,
     "with r ≥ 2f + 1 the model trained under any attack is the adversary-free one"),
    ("b", "DRACO compute", _DRACO, "every worker computes r gradients: r× the gradient computations of one server"),
    ("c", "DRACO time to accuracy", _DRACO,
     "several times faster to a given accuracy than median-based rules under the same attack"),
    ("d", "DRACO and privacy noise", _DRACO,
     "with per-worker DP noise the replicas differ, so the exact vote decodes (almost) nothing"),
    ("e", "GuanYu with Byzantine servers", _GUANYU,
     "trains as well as one trusted server while a minority of the servers is Byzantine"),
    ("f", "GuanYu overhead", _GUANYU, "the price of Byzantine servers: three rounds per step and m-fold messages"),
    ("g", "LiuBei", _LIUBEI,
     "tolerates Byzantine servers with (almost) no communication overhead: the two rounds of a vanilla "
     "parameter server per step (plus the servers' gather every T steps)"),
    ("h", "AggregaThor lossy transport and malformed gradients", _AGGREGATHOR,
     "robust rules train over dropped packets (UDP) and NaN gradients without losing accuracy"),
    ("i", "AggregaThor Multi-Krum overhead", _AGGREGATHOR, "Multi-Krum costs little over averaging"),
    ("j", "Bounded staleness", _KARDAM, "the rules still train on gradients up to τ steps stale"),
)


# ----------------------------------------------------------------------------------------------- #
# Matching groups


class Groups:
    """The table's groups with canonical texts of their parameters, for finding a group's counterparts."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.table = table.reset_index(drop=True)
        self.fields = [f for f in GROUP_FIELDS if f in table.columns]
        self.keys = pd.DataFrame({f: [canon(v) for v in self.table[f]] for f in self.fields})
        self.system = [parse_system_text(s) for s in self.table["system"]]
        self.network = [parse_network_text(n) for n in self.table["network"]]

    def like(self, i: int, *, free: Sequence[str] = (), **want: Any) -> list[int]:
        """Groups equal to group ``i`` on every parameter but ``free`` and those of ``want``; a ``want``
        value is a value (compared as canonical text) or a predicate on the group's index."""
        mask = np.ones(len(self.table), dtype=bool)
        for f in self.fields:
            if f in want:
                w = want[f]
                if callable(w):
                    mask &= np.array([bool(w(j)) for j in range(len(self.table))], dtype=bool)
                else:
                    mask &= (self.keys[f] == canon(w)).to_numpy()
            elif f not in free:
                mask &= (self.keys[f] == self.keys.at[i, f]).to_numpy()
        return [j for j in np.flatnonzero(mask) if j != i]

    def name(self, j: int) -> str:
        spec = self.system[j]
        return spec.name if spec is not None else system_name(self.table.at[j, "system"])

    def is_server(self, j: int) -> bool:
        return self.name(j) == "server"

    def ideal(self, j: int) -> bool:
        net = self.network[j]
        return net is not None and not net.lossy

    def noise(self, j: int) -> bool:
        return not pd.isna(self.table.at[j, "epsilon"])

    def value(self, j: int, column: str) -> float:
        v = self.table.at[j, column]
        return float(v) if v is not None and not pd.isna(v) else math.nan

    def label(self, j: int, *, rule: bool = True, attack: bool = True) -> str:
        r = self.table.loc[j]
        parts = [r["setup"]]
        if rule and (self.is_server(j) or self.name(j) in ("guanyu", "liubei")):
            parts.append(str(r["gar"]))
        if attack:
            parts.append(f"attack {r['attack']}")
        if self.noise(j):
            parts.append(f"ε={epsilon_text(r['epsilon'])}")
        return ", ".join(parts)

    def server_costs(self, j: int) -> list[int]:
        """One-server groups with the same n and network as group ``j`` (any rule, attack or τ)."""
        return self.like(j, free=[f for f in self.fields if f not in ("workers", "network", "dataset", "model",
                                                                        "batch_size")],
                         system=lambda k: self.is_server(k))


def _weakest(verdicts: Sequence[str]) -> str:
    return max(verdicts, key=lambda v: _RANK[v]) if verdicts else MISSING


def _claim(cid: str, evidence: Sequence[str], rule: str, verdict: str, cells: str) -> dict[str, str]:
    name, paper, statement = next((n, p, s) for i, n, p, s in CLAIMS if i == cid)
    return {"id": cid, "claim": name, "paper": paper, "statement": statement, "cells": cells,
            "evidence": "; ".join(evidence) if evidence else "–", "rule": rule, "verdict": verdict}


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _mean_of(groups: Groups, rows: Sequence[int], column: str) -> float:
    vals = [groups.value(j, column) for j in rows]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


# ----------------------------------------------------------------------------------------------- #
# Curves


def evaluation_curves(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per group and evaluation step: mean (and std, count) over seeds of the test accuracy, and of the
    simulated seconds elapsed to that step (Σ ``step_seconds`` over steps ``1..t`` of each run)."""
    m = metrics.sort_values(["cell_id", "step"], kind="stable")
    elapsed = m["step_seconds"].astype(float).fillna(0.0).groupby(m["cell_id"], sort=False).cumsum()
    ev = m.assign(seconds=elapsed).loc[m["test_accuracy"].notna()]
    g = ev.groupby(["group_id", "step"], sort=True)
    return pd.DataFrame({
        "accuracy": g["test_accuracy"].mean(),
        "accuracy_std": g["test_accuracy"].std(ddof=1),
        "runs": g["test_accuracy"].count(),
        "seconds": g["seconds"].mean(),
    }).reset_index()


def _time_to(curves: pd.DataFrame, group_id: str, target: float) -> tuple[float, float]:
    """``(seconds, step)`` at the first evaluation where the mean accuracy reaches ``target``; ``(inf, nan)``
    when it never does."""
    c = curves.loc[(curves["group_id"] == group_id) & (curves["accuracy"] >= target)]
    if c.empty:
        return math.inf, math.nan
    first = c.sort_values("step").iloc[0]
    return float(first["seconds"]), float(first["step"])


def _max_deltas(metrics: pd.DataFrame, a: str, b: str, column: str) -> tuple[float, float, int]:
    """Max over the rows of ``column`` (per seed and step) of ``|a − b|`` between groups ``a`` and ``b``, that
    divided by max ``|b|``, and the number of rows compared. A value present in one run only counts as ∞."""
    cols = ["seed", "step", column]
    x = metrics.loc[metrics["group_id"] == a, cols]
    y = metrics.loc[metrics["group_id"] == b, cols]
    both = x.merge(y, on=["seed", "step"], suffixes=("_a", "_b"))
    va = both[f"{column}_a"].to_numpy(dtype=float)
    vb = both[f"{column}_b"].to_numpy(dtype=float)
    keep = ~(np.isnan(va) & np.isnan(vb))
    va, vb = va[keep], vb[keep]
    if va.size == 0:
        return math.nan, math.nan, 0
    diff = np.where(np.isnan(va) | np.isnan(vb), np.inf, np.abs(va - vb))
    scale = np.nanmax(np.abs(vb)) if np.any(~np.isnan(vb)) else math.nan
    top = float(diff.max())
    return top, (top / scale if scale and not math.isnan(scale) else (0.0 if top == 0 else math.inf)), int(va.size)


# ----------------------------------------------------------------------------------------------- #
# The claims


def _claim_draco_exact(groups: Groups, metrics: pd.DataFrame) -> dict[str, str]:
    rule = (f"per DRACO group under an attack (exact vote, no noise) and its adversary-free twin (attack none, "
            f"same other fields, paired by seed): max over evaluations of |Δ test accuracy| and max over steps of "
            f"|Δ ‖θ_t − θ_0‖|; repetition code: holds if both are 0, cyclic code: if both are ≤ {EXACT_RELATIVE:g} "
            f"of the twin's largest value; the claim takes the weakest")
    cells = "DRACO under attack vs DRACO with attack none"
    evidence, verdicts, missing = [], [], []
    for i in range(len(groups.table)):
        spec = groups.system[i]
        if groups.name(i) != "draco" or spec is None or spec["vote"] != "exact" or groups.noise(i):
            continue
        if groups.table.at[i, "attack"] == "none":
            continue
        twins = groups.like(i, attack="none", byzantine_real=0)
        if not twins:
            missing.append(groups.label(i))
            continue
        a, b = groups.table.at[i, "group_id"], groups.table.at[twins[0], "group_id"]
        acc, acc_rel, compared = _max_deltas(metrics, a, b, "test_accuracy")
        dist, dist_rel, _ = _max_deltas(metrics, a, b, "param_distance")
        if compared == 0:
            missing.append(groups.label(i) + " (no seed in common)")
            continue
        if spec["code"] == "repetition":
            ok = acc == 0 and dist == 0
        else:
            ok = acc_rel <= EXACT_RELATIVE and dist_rel <= EXACT_RELATIVE
        verdict = HOLDS if ok else FAILS
        verdicts.append(verdict)
        evidence.append(f"{groups.label(i)}: max |Δ accuracy| = {number_text(acc)}, "
                        f"max |Δ ‖θ−θ0‖| = {number_text(dist)} (relative {number_text(dist_rel)}) → {verdict}")
    if missing:
        evidence.append("no adversary-free twin for " + ", ".join(missing))
    return _claim("a", evidence, rule, _weakest(verdicts), cells)


def _claim_draco_compute(groups: Groups) -> dict[str, str]:
    rule = ("mean gradient computations per step of each DRACO group / those of the one-server groups with the same "
            "n and network; holds if the ratio equals r for every DRACO group")
    evidence, verdicts, seen = [], [], set()
    for i in range(len(groups.table)):
        spec = groups.system[i]
        if groups.name(i) != "draco" or spec is None:
            continue
        base = groups.server_costs(i)
        label = f"{system_label(groups.table.at[i, 'system'])}, n={groups.table.at[i, 'workers']}"
        if not base:
            if label not in seen:
                evidence.append(f"{label}: no one-server group with the same n and network")
            seen.add(label)
            continue
        ratio = _ratio(groups.value(i, "gradient_computations"), _mean_of(groups, base, "gradient_computations"))
        verdict = HOLDS if abs(ratio - spec["r"]) <= 1e-9 else FAILS
        verdicts.append(verdict)
        if label not in seen:
            evidence.append(f"{label}: {number_text(groups.value(i, 'gradient_computations'))} vs "
                            f"{number_text(_mean_of(groups, base, 'gradient_computations'))} per step = "
                            f"{number_text(ratio)}× (r = {spec['r']}) → {verdict}")
        seen.add(label)
    return _claim("b", evidence, rule, _weakest(verdicts), "DRACO vs one server, same n")


def _claim_draco_time(groups: Groups, curves: pd.DataFrame) -> dict[str, str]:
    rule = (f"per DRACO group under an attack, without noise: target = {TARGET_FRACTION:g} × the best final accuracy "
            f"among it and the one-server {', '.join(MEDIAN_BASED)} groups with the same other fields; time = "
            f"simulated seconds (Σ step_seconds, mean over seeds) at the first evaluation whose mean accuracy "
            f"reaches the target (the link model's time: aggregation and decoding are not timed); holds if DRACO "
            f"gets there ≥ {SPEEDUP:g}× sooner than every median-based rule, "
            f"with a caveat if sooner than every one but < {SPEEDUP:g}× for some, does not hold otherwise; the "
            f"claim takes the weakest")
    evidence, verdicts, missing = [], [], []
    for i in range(len(groups.table)):
        if groups.name(i) != "draco" or groups.noise(i) or groups.table.at[i, "attack"] == "none":
            continue
        rivals = groups.like(i, free=("gar",), system=lambda k: groups.is_server(k),
                             gar=lambda k: rule_base(groups.table.at[k, "gar"]) in MEDIAN_BASED)
        if not rivals:
            missing.append(groups.label(i))
            continue
        finals = [groups.value(k, "accuracy_mean") for k in (i, *rivals)]
        finals = [f for f in finals if not math.isnan(f)]
        if not finals:
            missing.append(groups.label(i) + " (no final accuracy)")
            continue
        target = TARGET_FRACTION * max(finals)
        t_draco, _ = _time_to(curves, groups.table.at[i, "group_id"], target)
        parts, speedups = [], []
        for k in rivals:
            t_k, _ = _time_to(curves, groups.table.at[k, "group_id"], target)
            speedup = _speedup(t_k, t_draco)
            speedups.append(speedup)
            parts.append(f"{groups.table.at[k, 'gar']} {_seconds(t_k)} ({number_text(speedup)}×)")
        if math.isinf(t_draco) or any(math.isnan(s) or s <= 1 for s in speedups):
            verdict = FAILS
        elif all(s >= SPEEDUP for s in speedups):
            verdict = HOLDS
        else:
            verdict = CAVEAT
        verdicts.append(verdict)
        evidence.append(f"{groups.label(i)}: target {number_text(target)}, DRACO {_seconds(t_draco)} vs "
                        + ", ".join(parts) + f" → {verdict}")
    if missing:
        evidence.append("no one-server median-based group under the same attack for " + ", ".join(missing))
    return _claim("c", evidence, rule, _weakest(verdicts), "DRACO vs median, geometric median, Multi-Krum")


def _speedup(t_rival: float, t_draco: float) -> float:
    """``t_rival / t_draco`` with the edge cases: ∞ when only DRACO gets there (or at 0 s), 0 when only the rival
    does, NaN when neither."""
    if math.isinf(t_draco):
        return math.nan if math.isinf(t_rival) else 0.0
    if math.isinf(t_rival) or (t_draco == 0 and t_rival > 0):
        return math.inf
    return 1.0 if t_draco == 0 else t_rival / t_draco


def _seconds(t: float) -> str:
    return "never" if math.isinf(t) else f"{number_text(t)} s"


def _claim_draco_privacy(groups: Groups) -> dict[str, str]:
    rule = (f"mean decoded_fraction (steps and seeds) of every DRACO group with noise (ε set) and the exact vote: "
            f"holds if ≤ {DECODED_NONE:g} for all, with a caveat if ≤ {DECODED_FEW:g}, does not hold above; the "
            f"tolerance vote and the one-server groups with the same noise are shown beside")
    evidence, verdicts, others = [], [], []
    for i in range(len(groups.table)):
        spec = groups.system[i]
        if groups.name(i) != "draco" or spec is None or not groups.noise(i):
            continue
        decoded = groups.value(i, "decoded_fraction")
        text = (f"{groups.label(i)}: decoded {number_text(decoded)}, accuracy {groups.table.at[i, 'accuracy']}")
        if spec["vote"] == "exact":
            verdict = (FAILS if math.isnan(decoded) else HOLDS if decoded <= DECODED_NONE
                       else CAVEAT if decoded <= DECODED_FEW else FAILS)
            verdicts.append(verdict)
            evidence.append(f"{text} → {verdict}")
        else:
            others.append(text)
        if spec["vote"] == "exact":
            for k in groups.like(i, free=("gar",), system=lambda k: groups.is_server(k)):
                others.append(f"{groups.label(k)}: accuracy {groups.table.at[k, 'accuracy']}")
    evidence += list(dict.fromkeys(others))
    return _claim("d", evidence, rule, _weakest(verdicts), "DRACO with per-worker noise, exact and tolerance vote")


def _server_groups(groups: Groups, name: str, byzantine: bool) -> list[int]:
    out = []
    for i in range(len(groups.table)):
        spec = groups.system[i]
        if groups.name(i) == name and spec is not None and (int(spec["byzantine"]) >= 1) == byzantine:
            out.append(i)
    return out


def _accuracy_vs_baseline(groups: Groups, i: int) -> tuple[str, str | None]:
    """Evidence and verdict of group ``i`` against the one-server group with the same other fields."""
    base = groups.like(i, system=lambda k: groups.is_server(k))
    if not base:
        return f"{groups.label(i)}: no one-server group with the same rule and attack", None
    a, b = groups.value(i, "accuracy_mean"), groups.value(base[0], "accuracy_mean")
    delta = a - b
    verdict = HOLDS if not math.isnan(delta) and delta >= -ACCURACY_MARGIN else FAILS
    text = f"{groups.label(i)}: {number_text(a)} vs one server {number_text(b)} (Δ {_signed(delta)})"
    return f"{text} → {verdict}", verdict


def _signed(x: float) -> str:
    if math.isnan(x):
        return "–"
    return ("+" if x >= 0 else "−") + number_text(abs(x))


def _claim_guanyu(groups: Groups) -> dict[str, str]:
    rule = (f"per GuanYu group with ≥ 1 Byzantine server: final accuracy (mean over seeds) − that of the one-server "
            f"group with the same other fields (rule, attack, network, …); holds if ≥ −{ACCURACY_MARGIN:g} for every "
            f"server behaviour, does not hold otherwise")
    evidence, verdicts = [], []
    for i in _server_groups(groups, "guanyu", True):
        text, verdict = _accuracy_vs_baseline(groups, i)
        evidence.append(text)
        if verdict:
            verdicts.append(verdict)
    return _claim("e", evidence, rule, _weakest(verdicts), "GuanYu with Byzantine servers vs one server")


def _cost_text(groups: Groups, i: int, base: Sequence[int]) -> tuple[str, float]:
    """``messages, bytes, rounds and simulated seconds per step: value (ratio×)`` of group ``i`` over ``base``."""
    parts, ratios = [], {}
    for col, name in (("messages", "messages"), ("bytes", "bytes"), ("rounds", "rounds"), ("step_seconds", "s")):
        v, b = groups.value(i, col), _mean_of(groups, base, col)
        ratios[col] = _ratio(v, b)
        parts.append(f"{number_text(v)} {name} ({number_text(ratios[col])}×)")
    return ", ".join(parts), ratios["step_seconds"]


def _claim_guanyu_overhead(groups: Groups) -> dict[str, str]:
    rule = (f"per GuanYu group: messages, bytes, rounds and simulated seconds per step over those of the one-server "
            f"groups with the same n and network; holds if the step-time ratio ≤ {GUANYU_RATIO:g} for every group, "
            f"with a caveat if ≤ {GUANYU_RATIO_CAVEAT:g}, does not hold above")
    evidence, verdicts, bases = [], [], {}
    for i in (*_server_groups(groups, "guanyu", False), *_server_groups(groups, "guanyu", True)):
        base = groups.server_costs(i)
        if not base:
            evidence.append(f"{groups.label(i)}: no one-server group with the same n and network")
            continue
        text, ratio = _cost_text(groups, i, base)
        verdict = (FAILS if math.isnan(ratio) else HOLDS if ratio <= GUANYU_RATIO
                   else CAVEAT if ratio <= GUANYU_RATIO_CAVEAT else FAILS)
        verdicts.append(verdict)
        evidence.append(f"{groups.label(i, attack=False)}: {text} → {verdict}")
        bases.setdefault(tuple(base), None)
    for base in reversed(list(bases)):
        evidence.insert(0, f"one server (n={groups.table.at[base[0], 'workers']}): "
                           f"{number_text(_mean_of(groups, base, 'messages'))} messages, "
                           f"{number_text(_mean_of(groups, base, 'bytes'))} bytes, "
                           f"{number_text(_mean_of(groups, base, 'rounds'))} rounds, "
                           f"{number_text(_mean_of(groups, base, 'step_seconds'))} s per step")
    return _claim("f", evidence, rule, _weakest(verdicts), "GuanYu vs one server, same n and network")


def _claim_liubei(groups: Groups) -> dict[str, str]:
    rule = (f"(1) per LiuBei group with ≥ 1 Byzantine server: final accuracy ≥ that of the one-server group with the "
            f"same other fields − {ACCURACY_MARGIN:g}; (2) its communication rounds per step ≤ 2 + 1/T + "
            f"{LIUBEI_EXTRA_ROUNDS:g} (a vanilla parameter server's two rounds, the gather every T steps, at most a "
            f"quarter of a retry round per step); holds if (1) and (2) for every group, with a caveat if (1) holds "
            f"and its rounds stay below GuanYu's three, does not hold otherwise; messages, bytes and simulated "
            f"seconds per step are given against one server and GuanYu")
    evidence, verdicts = [], []
    guanyu = [*_server_groups(groups, "guanyu", True), *_server_groups(groups, "guanyu", False)]
    for i in _server_groups(groups, "liubei", True):
        acc_text, acc_verdict = _accuracy_vs_baseline(groups, i)
        base = groups.server_costs(i)
        if acc_verdict is None or not base:
            evidence.append(acc_text if acc_verdict is None else
                            f"{groups.label(i)}: no one-server group with the same n and network")
            continue
        cost, _ = _cost_text(groups, i, base)
        rivals = [k for k in guanyu if groups.keys.at[k, "workers"] == groups.keys.at[i, "workers"]
                  and groups.keys.at[k, "network"] == groups.keys.at[i, "network"]]
        vs = _ratio(groups.value(i, "step_seconds"), _mean_of(groups, rivals, "step_seconds")) if rivals else math.nan
        vs_msgs = _ratio(groups.value(i, "messages"), _mean_of(groups, rivals, "messages")) if rivals else math.nan
        rounds = groups.value(i, "rounds")
        spec = groups.system[i]
        period = float(spec.params["gather"]) if spec is not None else math.inf
        allowed = 2 + 1 / period + LIUBEI_EXTRA_ROUNDS
        if acc_verdict == HOLDS and rounds <= allowed:
            verdict = HOLDS
        elif acc_verdict == HOLDS and rounds < 3:
            verdict = CAVEAT
        else:
            verdict = FAILS
        verdicts.append(verdict)
        guan = (f"; vs GuanYu {number_text(vs_msgs)}× messages, {number_text(vs)}× s per step" if rivals
                else "; no GuanYu group")
        evidence.append(f"{acc_text.rsplit(' → ', 1)[0]}; per step {cost}{guan} → {verdict}")
    return _claim("g", evidence, rule, _weakest(verdicts), "LiuBei vs one server and vs GuanYu")


def _claim_lossy(groups: Groups) -> dict[str, str]:
    rule = (f"per rule and condition (a lossy network, or the nan attack): final accuracy − that of the same rule "
            f"with no loss and no attack (same other fields); the claim is on the robust rules (all but average): "
            f"holds if every such difference is ≥ −{ACCURACY_MARGIN:g}, does not hold otherwise; averaging is shown "
            f"for comparison")
    evidence, verdicts, missing = [], [], []
    for i in lossy_conditions(groups):
        base = lossy_baseline(groups, i)
        label = f"{groups.table.at[i, 'gar']} under {condition_label(groups, i)}"
        if not base:
            missing.append(label)
            continue
        a, b = groups.value(i, "accuracy_mean"), groups.value(base[0], "accuracy_mean")
        delta = a - b
        robust = rule_base(groups.table.at[i, "gar"]) != "average"
        verdict = HOLDS if not math.isnan(delta) and delta >= -ACCURACY_MARGIN else FAILS
        if robust:
            verdicts.append(verdict)
        evidence.append(f"{label}: {number_text(a)} vs {number_text(b)} (Δ {_signed(delta)})"
                        + (f" → {verdict}" if robust else " (not robust: shown only)"))
    if missing:
        evidence.append("no lossless, attack-free counterpart for " + ", ".join(missing))
    return _claim("h", evidence, rule, _weakest(verdicts), "one server: lossy networks and the nan attack vs none")


def lossy_conditions(groups: Groups) -> list[int]:
    """One-server groups without staleness on a lossy network or under the nan attack."""
    return [i for i in range(len(groups.table))
            if groups.is_server(i) and int(groups.table.at[i, "staleness"]) == 0
            and (not groups.ideal(i) or groups.table.at[i, "attack"] == "nan")]


def lossy_baseline(groups: Groups, i: int) -> list[int]:
    """The same rule with no packet loss (an ideal network of the same link) and no malformed input (attack
    ``none`` instead of ``nan``; another attack stays)."""
    want: dict[str, Any] = {}
    if groups.table.at[i, "attack"] == "nan":
        want.update(attack="none", byzantine_real=0)
    net = groups.network[i]
    if net is not None and net.lossy:
        def same_link(k: int) -> bool:
            other = groups.network[k]
            return (other is not None and not other.lossy and other.latency == net.latency
                    and other.bandwidth == net.bandwidth and other.compute == net.compute)
        want["network"] = same_link
    return groups.like(i, **want)


def condition_label(groups: Groups, i: int) -> str:
    parts = []
    if not groups.ideal(i):
        parts.append(network_label(groups.table.at[i, "network"]))
    if groups.table.at[i, "attack"] != "none":
        parts.append(f"attack {groups.table.at[i, 'attack']}")
    return ", ".join(parts) or "no loss"


def _claim_multikrum(groups: Groups) -> dict[str, str]:
    rule = (f"one-server engine groups (ideal network, τ = 0) of multi-krum and average with the same other fields: "
            f"ratio of the measured seconds_aggregate, and the overhead of a step = (step_seconds + seconds_aggregate) "
            f"of multi-krum / that of average − 1 (simulated link and compute, measured aggregation); holds if ≤ "
            f"{AGGREGATHOR_WEAK:.0%} (AggregaThor's weak resilience), with a caveat if ≤ {AGGREGATHOR_STRONG:.0%} (its "
            f"strong resilience), does not hold above; the claim takes the weakest")
    evidence, verdicts = [], []
    for i in range(len(groups.table)):
        if (rule_base(groups.table.at[i, "gar"]) != "multi-krum" or not groups.is_server(i) or not groups.ideal(i)
                or int(groups.table.at[i, "staleness"]) or math.isnan(groups.value(i, "seconds_aggregate"))):
            continue
        avg = [k for k in groups.like(i, gar="average") if not math.isnan(groups.value(k, "seconds_aggregate"))]
        if not avg:
            continue
        mk_agg, avg_agg = groups.value(i, "seconds_aggregate"), groups.value(avg[0], "seconds_aggregate")
        step = (groups.value(i, "step_seconds") + mk_agg) / (groups.value(avg[0], "step_seconds") + avg_agg) - 1
        verdict = (FAILS if math.isnan(step) else HOLDS if step <= AGGREGATHOR_WEAK
                   else CAVEAT if step <= AGGREGATHOR_STRONG else FAILS)
        verdicts.append(verdict)
        evidence.append(f"attack {groups.table.at[i, 'attack']}: aggregation {number_text(mk_agg * 1e3)} ms vs "
                        f"{number_text(avg_agg * 1e3)} ms ({number_text(_ratio(mk_agg, avg_agg))}×), step overhead "
                        f"{number_text(100 * step)} % → {verdict}")
    return _claim("i", evidence, rule, _weakest(verdicts), "multi-krum vs average, one-server engine runs")


def _claim_staleness(groups: Groups) -> dict[str, str]:
    rule = (f"per rule and τ > 0 (one server): final accuracy − that at τ = 0 with the same other fields; holds if "
            f"≥ −{ACCURACY_MARGIN:g} for every (rule, τ), with a caveat if so at each rule's smallest τ only, does "
            f"not hold otherwise")
    evidence, missing = [], []
    by_rule: dict[str, list[tuple[int, str]]] = {}
    for i in range(len(groups.table)):
        tau = int(groups.table.at[i, "staleness"])
        if not groups.is_server(i) or tau == 0:
            continue
        base = groups.like(i, staleness=0)
        label = f"{groups.table.at[i, 'gar']} τ={tau}"
        if groups.table.at[i, "attack"] != "none":
            label += f" attack {groups.table.at[i, 'attack']}"
        if not base:
            missing.append(label)
            continue
        a, b = groups.value(i, "accuracy_mean"), groups.value(base[0], "accuracy_mean")
        delta = a - b
        verdict = HOLDS if not math.isnan(delta) and delta >= -ACCURACY_MARGIN else FAILS
        rule_key = "|".join(groups.keys.loc[i, [f for f in groups.fields if f != "staleness"]])
        by_rule.setdefault(rule_key, []).append((tau, verdict))
        evidence.append(f"{label}: {number_text(a)} vs τ=0 {number_text(b)} (Δ {_signed(delta)}) → {verdict}")
    if missing:
        evidence.append("no τ = 0 counterpart for " + ", ".join(missing))
    if not by_rule:
        verdict = MISSING
    elif all(v == HOLDS for runs in by_rule.values() for _, v in runs):
        verdict = HOLDS
    elif all(min(runs)[1] == HOLDS for runs in by_rule.values()):
        verdict = CAVEAT
    else:
        verdict = FAILS
    return _claim("j", evidence, rule, verdict, "one server, τ > 0 vs τ = 0")


# ----------------------------------------------------------------------------------------------- #


def systems_claims(table: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """The claims table: one row per claim of :data:`CLAIMS`, columns ``id, claim, paper, statement, cells,
    evidence, rule, verdict``, from the table of :func:`systems_table` and the metrics it came from (the
    per-step values for DRACO's exact recovery and the accuracy-vs-time curves). A claim none of whose
    comparisons can be made is ``not measured (cells missing)``; its evidence says which cells lack a
    counterpart when some do."""
    groups = Groups(table)
    curves = evaluation_curves(metrics)
    rows = [
        _claim_draco_exact(groups, metrics),
        _claim_draco_compute(groups),
        _claim_draco_time(groups, curves),
        _claim_draco_privacy(groups),
        _claim_guanyu(groups),
        _claim_guanyu_overhead(groups),
        _claim_liubei(groups),
        _claim_lossy(groups),
        _claim_multikrum(groups),
        _claim_staleness(groups),
    ]
    return pd.DataFrame(rows, columns=["id", "claim", "paper", "statement", "cells", "evidence", "rule", "verdict"])


def claims_markdown(claims: pd.DataFrame) -> str:
    """The claims as one Markdown table: claim, paper, verdict, evidence, rule."""
    lines = markdown_table(["claim", "paper", "verdict", "evidence", "rule"],
                      [(f"{r['id']}. {r['claim']}: {r['statement']}", r["paper"], f"**{r['verdict']}**",
                        r["evidence"], r["rule"]) for r in claims.to_dict("records")])
    intro = ("The robust systems' claims against the one-server runs of this grid (accuracy = final test accuracy, "
             "mean over seeds; simulated seconds from the link model of dpbr.simulation.systems.costs). "
             f"\"{MISSING}\": the grid lacks the cells the claim needs.")
    return "\n".join([intro, "", *lines]) + "\n"
