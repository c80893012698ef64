"""Rule bounds, minimal batch size and the η-approximated condition (dpbr.vn.bounds)."""

import math

import numpy as np
import pandas as pd
import pytest

from dpbr.vn.bounds import eta_table, minimal_b_table, minimal_batch_size, rule_bounds, table1_batch_size


def test_rule_bounds_at_the_study_setting():
    k = rule_bounds(11, 5)
    assert k["mda"] == pytest.approx(6 / (math.sqrt(8) * 5))  # (n − f)/(√8 f) = 0.4243
    assert k["median"] == pytest.approx(1 / math.sqrt(6))  # 1/sqrt(n − f)
    assert "krum" not in k and "bulyan" not in k  # need n ≥ 2f + 3 and n ≥ 4f + 3
    assert "average" not in k  # bound 0: never resilient with f > 0
    k2 = rule_bounds(11, 2)
    want = 1 / math.sqrt(2 * (9 + 2 * (11 + 2 * 7 - 2) / 5))
    assert k2["krum"] == pytest.approx(want) and k2["bulyan"] == pytest.approx(want)


def test_table1_scalings():
    assert table1_batch_size("krum", 11, 5, 69) == pytest.approx(math.sqrt(11 * 69))
    assert table1_batch_size("mda", 11, 5, 431080) == pytest.approx(5 * math.sqrt(431080) / 6)
    assert math.isnan(table1_batch_size("median", 11, 5, 69))


def _curve(b, A, D, M):
    return np.sqrt(A / np.asarray(b, float) + D / np.asarray(b, float) ** 2) / M


def _exact_b(k, A, D, M):
    """Root of A/b + D/b² = k² M² (x = 1/b: D x² + A x − k²M² = 0)."""
    T = k * k * M * M
    x = (-A + math.sqrt(A * A + 4 * D * T)) / (2 * D) if D > 0 else T / A
    return 1 / x


@pytest.mark.parametrize("A,D", [(4e-3, 0.0), (4e-4, 5e-2), (1e-5, 5.0)])
def test_extrapolation_solves_the_physics_model_exactly(A, D):
    M, k = 0.01, 0.4
    grid = [10, 20, 50]
    r = _curve(grid, A, D, M)
    b, method = minimal_batch_size(grid, r, k, A=A, D=D)
    assert method == "extrapolated"
    assert b == pytest.approx(_exact_b(k, A, D, M), rel=1e-9)


def test_below_grid_and_interpolation():
    A, D, M, k = 4e-4, 5e-2, 0.01, 0.4
    exact = _exact_b(k, A, D, M)  # ≈ 69.8
    b, method = minimal_batch_size([400, 800], _curve([400, 800], A, D, M), k, A=A, D=D)
    assert method == "below-grid" and b == pytest.approx(exact, rel=1e-9)
    grid = [10, 25, 50, 100, 250, 500]
    b, method = minimal_batch_size(grid, _curve(grid, A, D, M), k, A=A, D=D)
    assert method == "interpolated"
    assert 50 < b < 100 and b == pytest.approx(exact, rel=0.05)  # log-log chord of a smooth curve


def test_non_monotone_curve_answers_after_the_last_failure():
    b, method = minimal_batch_size([10, 20, 40, 80], [0.3, 0.6, 0.2, 0.1], 0.4, A=1.0, D=0.0)
    assert method == "interpolated" and 20 < b < 40
    assert minimal_batch_size([10, 20], [math.inf, 0.1], 0.4, A=1.0, D=0.0) == (20.0, "interpolated")
    assert minimal_batch_size([10], [0.1], math.inf, A=1.0, D=0.0) == (1.0, "no-condition")


def _rows(step, b, ratio, norm, var, noise=0.0, high=None):
    return {"dataset": "x", "model": "logit", "run": "abcdefabcdef", "step": step, "epsilon": None, "delta": 1e-6,
            "clip": 0.01, "clip_mode": "batch", "sparsify": None, "workers": 11, "byzantine": 5, "samples": 64,
            "reference": 0, "bootstrap": 100, "confidence": 0.95, "seed": 1, "batch_size": b, "privacy": "none",
            "dim": 69, "vn_ratio": ratio, "vn_ratio_ci_low": ratio * 0.9,
            "vn_ratio_ci_high": ratio * 1.1 if high is None else high, "mean_norm": norm, "var_total": var,
            "noise_var": noise}


def test_eta_is_the_largest_gradient_norm_where_the_condition_fails():
    k = rule_bounds(11, 5)["mda"]  # 0.424
    frame = pd.DataFrame([
        _rows(0, 50, 0.30, 0.010, 9e-6),    # holds
        _rows(100, 50, 0.60, 0.004, 5.8e-6),  # fails at ‖EG‖ = 0.004
        _rows(200, 50, 2.00, 0.001, 4e-6, high=2.2),   # fails at 0.001
        _rows(300, 50, 0.40, 0.006, 5.8e-6, high=0.5),  # holds, but its interval reaches above k
    ])
    eta = eta_table(frame).set_index("rule")
    assert eta.loc["mda", "eta_min"] == pytest.approx(0.004)
    assert eta.loc["mda", "eta_min_ci"] == pytest.approx(0.006)
    assert eta.loc["mda", "failing"] == 2 and eta.loc["mda", "checkpoints"] == 4
    assert not eta.loc["mda", "eta_vacuous"]
    assert eta.loc["mda", "eta_relative"] == pytest.approx(0.4)
    assert eta.loc["mda", "eta_uniform"] == pytest.approx(math.sqrt(9e-6) / k)
    frame2 = frame.assign(vn_ratio=5.0)
    assert bool(eta_table(frame2).set_index("rule").loc["mda", "eta_vacuous"])


def test_minimal_b_table_from_rows():
    A, D, M = 4e-4, 2e-2, 0.01
    grid = [10, 25, 50, 100, 250, 500]
    rows = [_rows(0, b, float(_curve([b], A, D, M)[0]), M, A / b + D / b**2, noise=D / b**2) for b in grid]
    table = minimal_b_table(pd.DataFrame(rows)).set_index("rule")
    for rule, k in rule_bounds(11, 5).items():
        assert table.loc[rule, "k"] == k
        assert table.loc[rule, "min_b"] == pytest.approx(_exact_b(k, A, D, M), rel=0.05)
        assert table.loc[rule, "min_b_ci_low"] < table.loc[rule, "min_b"] < table.loc[rule, "min_b_ci_high"]
        assert table.loc[rule, "min_b_noise_asymptote"] == pytest.approx(math.sqrt(D) / (k * M))
    assert table.loc["mda", "fit_A"] == pytest.approx(A) and table.loc["mda", "fit_D"] == pytest.approx(D)
    assert table.loc["mda", "b_measured"] == "10,25,50,100,250,500"
