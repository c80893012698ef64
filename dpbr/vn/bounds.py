r"""The rules' bounds ``k_F(n, f)``, the smallest batch size that meets them, and the η-approximated variant.

Minimal batch size
------------------
For one model, parameter vector and privacy setting the ratio ``r(b)`` is measured on a grid of batch
sizes ``b_1 < … < b_m``. The condition of rule ``F`` is ``r(b) ≤ k_F(n, f)``. The smallest ``b`` that
satisfies it (:func:`minimal_batch_size`) is

* **interpolated** on a log-log scale between the last measured ``b`` where the condition fails and
  the next one (so the condition holds at every measured ``b`` above the answer);
* **extrapolated** beyond the grid with the *physics* of the estimator, not a generic curve fit:
  the variance of a worker's vector is ``V(b) = A/b + D/b²`` — sampling variance of a mean of ``b``
  examples (``A/b``; exact without clipping for i.i.d. draws, the large-``b`` behaviour with
  clipping) plus the Gaussian noise ``d·σ(b)²`` with ``σ ∝ 1/b`` (``D = d·σ(b)²·b²``, known
  exactly) — and the norm of the mean is held at its value ``M`` at the grid's end. ``A`` is the
  geometric mean of ``b·(V_total(b) − dσ(b)²)`` over the upper half of the grid. The curve is
  anchored at the grid's last (or, below the grid, first) point, ``r(b) = r_a·sqrt(s(b)/s(b_a))``
  with ``s(b) = A/b + D/b²``, and ``r(b) = k`` is solved exactly: with ``x = 1/b``,
  ``D x² + A x − s(b_a)(k/r_a)² = 0``. Holding ``M`` at the last grid value is slightly conservative
  under clipping (``‖E clip(g_b)‖`` still grows with ``b`` towards ``‖clip(∇Q)‖``).

When noise dominates, ``b* ≈ sqrt(D)/(k·M) = sqrt(d)·σ_1/(k·M)`` (``σ_1`` = σ at ``b = 1``): this is the
batch-size scaling derived by Guerraoui et al. 2021 (arXiv 2102.08166) — "Table 1" below (Krum/Bulyan ``k ∝ 1/sqrt(n)`` → ``b ∈ Ω(sqrt(n·d))``; MDA
``k = (n−f)/(√8 f)`` → ``f/(n−f) ≲ b·M/(√8·σ_1·sqrt(d))``, i.e. ``f/n ∈ O(b/(sqrt(d) + b))``), reported as
``min_b_noise_asymptote`` next to the Table-1 expressions (``table1_b``: ``sqrt(n·d)`` for Krum and
Bulyan, ``f·sqrt(d)/(n−f)`` for MDA — orders of magnitude, the constants are not in the table).

η-approximated VN condition (Guerraoui et al. 2021b, arXiv 2110.03991)
----------------------------------------------------------------------
Along a training trajectory (checkpoints ``t``), the condition with threshold ``η`` holds when
``r_t ≤ k`` at every checkpoint with ``‖E G_t‖ > η``. The smallest such ``η`` is
``η* = max{‖E G_t‖ : r_t > k}`` (0 when the condition holds everywhere) — :func:`eta_table`.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "GROUP_COLUMNS",
    "TRAJECTORY_COLUMNS",
    "eta_table",
    "minimal_batch_size",
    "minimal_b_table",
    "rule_bounds",
    "table1_batch_size",
]

#: Columns that identify one ratio-versus-b curve (everything but the batch size).
GROUP_COLUMNS: tuple[str, ...] = (
    "dataset", "model", "run", "step", "epsilon", "delta", "clip", "clip_mode", "sparsify", "workers",
    "byzantine", "samples", "reference", "bootstrap", "confidence", "seed",
)
#: Columns that identify one trajectory (everything but the step).
TRAJECTORY_COLUMNS: tuple[str, ...] = tuple(c for c in GROUP_COLUMNS if c != "step") + ("batch_size",)


def rule_bounds(n: int, f: int, rules: Iterable[str] | None = None) -> dict[str, float]:
    """``{rule: k_F(n, f)}`` for every rule (default: all registered) with a known positive bound.

    Rules whose :meth:`~dpbr.robust.aggregators.Aggregator.vn_bound` is ``None`` (no constant known, or
    ``(n, f)`` outside the rule's requirement — e.g. Krum at ``n = 11, f = 5`` needs ``n ≥ 2f + 3``) or
    ``0`` (``average`` with ``f > 0``: never resilient) are left out; ``inf`` (``f = 0``) is kept.
    """
    from dpbr.errors import UsageError
    from dpbr.robust import aggregators

    out: dict[str, float] = {}
    for name in (aggregators.names() if rules is None else rules):
        try:
            rule = aggregators.get(name)
        except UsageError:
            if rules is not None:
                raise
            continue  # pre-aggregators (bucketing, nnm) are not rules on their own
        k = rule.vn_bound(int(n), int(f))
        if k is not None and k > 0:
            out[rule.name] = float(k)
    return out


def table1_batch_size(rule: str, n: int, f: int, d: int) -> float:
    """The batch size named by the report's Table 1 (orders of magnitude, constants unknown).

    Krum, Bulyan: ``b ∈ Ω(sqrt(n·d))`` → ``sqrt(n·d)``. MDA: ``f/n ∈ O(b/(sqrt(d) + b))`` → the ``b`` at
    which ``b/(sqrt(d) + b) = f/n``, ``f·sqrt(d)/(n − f)``. NaN for rules not in the table.
    """
    base = rule.split("(")[0]
    if base in ("krum", "bulyan"):
        return math.sqrt(n * d)
    if base == "mda" and n > f:
        return f * math.sqrt(d) / (n - f)
    return math.nan


def _solve_shape(A: float, D: float, target: float) -> float:
    """Positive root ``b = 1/x`` of ``D x² + A x = target`` (``inf`` when ``target <= 0``)."""
    if not target > 0 or not math.isfinite(target):
        return math.inf if not target > 0 else 0.0
    if D <= 0:
        return A / target if A > 0 else 0.0
    x = (-A + math.sqrt(A * A + 4.0 * D * target)) / (2.0 * D)
    if x <= 0:  # loss of precision when 4·D·target << A² : use the series x ≈ target/A
        x = target / A if A > 0 else math.sqrt(target / D)
    return 1.0 / x


def _extrapolate(b_a: float, r_a: float, k: float, A: float, D: float) -> float:
    """Solve ``r_a·sqrt(s(b)/s(b_a)) = k`` for ``b`` with ``s(b) = A/b + D/b²``."""
    if not (math.isfinite(r_a) and r_a > 0):
        return math.inf if not math.isfinite(r_a) else 1.0
    s_a = A / b_a + D / b_a**2
    if s_a <= 0:
        return 1.0
    return _solve_shape(A, D, s_a * (k / r_a) ** 2)


def minimal_batch_size(batch_sizes: Sequence[float], ratios: Sequence[float], k: float, *,
                       A: float, D: float) -> tuple[float, str]:
    """Smallest ``b`` with ``r(b) ≤ k`` (module docstring): ``(b, method)``.

    ``method`` is ``"interpolated"``, ``"extrapolated"`` (beyond the largest measured ``b``),
    ``"below-grid"`` (already met at the smallest measured ``b``; extrapolated downwards, at least 1)
    or ``"none"`` (no finite answer: no ratio measured, or no detectable mean at the grid's end and no
    model to extrapolate with). ``k = inf`` gives ``(1, "no-condition")``.
    """
    if math.isinf(k):
        return 1.0, "no-condition"
    order = np.argsort(np.asarray(batch_sizes, dtype=float))
    b = np.asarray(batch_sizes, dtype=float)[order]
    r = np.asarray(ratios, dtype=float)[order]
    keep = ~np.isnan(r)
    b, r = b[keep], r[keep]
    if b.size == 0:
        return math.nan, "none"
    fails = r > k
    if not fails.any():
        est = _extrapolate(b[0], r[0], k, A, D)
        return max(1.0, min(est, b[0])), "below-grid"
    j = int(np.nonzero(fails)[0][-1])
    if j == b.size - 1:
        est = _extrapolate(b[-1], r[-1], k, A, D)
        if not math.isfinite(est):
            return math.inf, "none"
        return max(est, b[-1]), "extrapolated"
    b0, b1, r0, r1 = b[j], b[j + 1], r[j], r[j + 1]
    if not math.isfinite(r0) or r1 <= 0 or r0 <= r1:
        return float(b1), "interpolated"
    t = (math.log(r0) - math.log(k)) / (math.log(r0) - math.log(r1))
    return float(math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))), "interpolated"


def _physics(group: pd.DataFrame) -> tuple[float, float, float]:
    """``(A, D, M)`` of the extrapolation model for one curve (rows sorted by batch size)."""
    b = group["batch_size"].to_numpy(float)
    noise = group["noise_var"].fillna(0.0).to_numpy(float)
    D = float(np.median(noise * b * b)) if (noise > 0).any() else 0.0
    sampling = (group["var_total"].to_numpy(float) - noise).clip(min=0.0)
    upper = b >= np.median(b)
    vals = b[upper] * sampling[upper]
    vals = vals[vals > 0]
    A = float(np.exp(np.mean(np.log(vals)))) if vals.size else 0.0
    M = float(group["mean_norm"].to_numpy(float)[-1])
    return A, D, M


def minimal_b_table(frame: pd.DataFrame, rules: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per curve (:data:`GROUP_COLUMNS`) × rule with a bound: the smallest batch size.

    Input: rows of ``dpbr vn`` (columns ``batch_size``, ``vn_ratio``, ``vn_ratio_ci_low/high``,
    ``var_total``, ``noise_var``, ``mean_norm``, ``dim`` and the cell parameters). Output columns:
    the group columns, ``privacy``, ``rule``, ``k``, ``b_measured`` (the grid), ``ratio_at_max_b``,
    ``min_b`` and ``min_b_method``, ``min_b_ci_low``/``min_b_ci_high`` (the same computation on the
    interval's bounds: a smaller ratio needs a smaller b), ``beyond_train_size`` (the answer exceeds
    the training split: a mini-batch that large only exists with replacement), ``min_b_noise_asymptote``
    (``sqrt(D)/(k·M)``), ``table1_b`` and the fitted ``A``, ``D``, ``M``.
    """
    rows = []
    keys = [c for c in GROUP_COLUMNS if c in frame.columns]
    for key, g in frame.groupby(keys, dropna=False, sort=True):
        g = g.sort_values("batch_size")
        first = g.iloc[0]
        A, D, M = _physics(g)
        bounds = rule_bounds(int(first["workers"]), int(first["byzantine"]), rules)
        for rule, k in bounds.items():
            best, method = minimal_batch_size(g["batch_size"], g["vn_ratio"], k, A=A, D=D)
            lo, _ = minimal_batch_size(g["batch_size"], g["vn_ratio_ci_low"], k, A=A, D=D)
            hi, _ = minimal_batch_size(g["batch_size"], g["vn_ratio_ci_high"], k, A=A, D=D)
            rows.append({
                **dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                "privacy": first.get("privacy"),
                "dim": int(first["dim"]),
                "rule": rule,
                "k": k,
                "b_measured": ",".join(str(int(v)) for v in g["batch_size"]),
                "ratio_at_max_b": float(g["vn_ratio"].iloc[-1]),
                "min_b": best,
                "min_b_method": method,
                "min_b_ci_low": lo,
                "min_b_ci_high": hi,
                "beyond_train_size": bool(best > float(first["train_size"])) if "train_size" in g else None,
                "min_b_noise_asymptote": (math.sqrt(D) / (k * M)) if (D > 0 and M > 0 and math.isfinite(k)) else math.nan,
                "table1_b": table1_batch_size(rule, int(first["workers"]), int(first["byzantine"]), int(first["dim"])),
                "fit_A": A,
                "fit_D": D,
                "fit_M": M,
            })
    return pd.DataFrame(rows)


def eta_table(frame: pd.DataFrame, rules: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per trajectory (:data:`TRAJECTORY_COLUMNS`) × rule: the η-approximated VN condition.

    ``eta_min = max{mean_norm_t : vn_ratio_t > k}`` (0 if none) is the smallest η for which the
    condition holds at every checkpoint with ``‖E G_t‖ > η``; ``eta_min_ci`` uses the upper bound of the
    interval (a checkpoint counts as satisfying only when its whole interval is below ``k``);
    ``eta_vacuous`` is true when ``eta_min`` reaches the largest ``‖E G_t‖`` (the condition is met
    nowhere it is required); ``eta_uniform = max_t sqrt(var_total_t)/k`` is the η a uniform variance
    bound would give (the theory's ``η ≥ v/k``).
    """
    rows = []
    keys = [c for c in TRAJECTORY_COLUMNS if c in frame.columns]
    for key, g in frame.groupby(keys, dropna=False, sort=True):
        g = g.sort_values("step")
        first = g.iloc[0]
        norms = g["mean_norm"].to_numpy(float)
        ratio = g["vn_ratio"].to_numpy(float)
        high = g["vn_ratio_ci_high"].to_numpy(float)
        var = g["var_total"].to_numpy(float)
        for rule, k in rule_bounds(int(first["workers"]), int(first["byzantine"]), rules).items():
            fail = ~(ratio <= k)
            fail_ci = ~(high <= k)
            eta = float(norms[fail].max()) if fail.any() else 0.0
            eta_ci = float(norms[fail_ci].max()) if fail_ci.any() else 0.0
            rows.append({
                **dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                "privacy": first.get("privacy"),
                "rule": rule,
                "k": k,
                "steps": ",".join(str(int(s)) for s in g["step"]),
                "checkpoints": int(len(g)),
                "failing": int(fail.sum()),
                "max_mean_norm": float(norms.max()),
                "eta_min": eta,
                "eta_min_ci": eta_ci,
                "eta_relative": eta / float(norms.max()) if norms.max() > 0 else math.nan,
                "eta_vacuous": bool(fail.any() and eta >= float(norms.max())),
                "eta_uniform": float(np.sqrt(var.max()) / k) if math.isfinite(k) else 0.0,
            })
    return pd.DataFrame(rows)
