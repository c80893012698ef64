"""Behaviours that mutation testing (``bench/mutation.py``) found no test pinning down.

Each test names the fault it catches (a mutant of the code that every other fast test let through).
Expected values are known answers worked out by hand or written out in NumPy here — never dpbr's own
output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpbr import data
from dpbr.errors import UsageError
from dpbr.privacy import mechanisms
from dpbr.robust import aggregators
from dpbr.simulation import STEP_COLUMNS, Simulation
from dpbr.spec import RunSpec

VECTORS = "synthetic(classes=2,d=20,n=200,n_test=40)"  # logistic model: d = 21


def _simulation(**options: object) -> Simulation:
    base = dict(dataset=VECTORS, model="logit", workers=5, byzantine=0, batch_size=8, steps=3, eval_every=0,
                clip=None, seed=4)
    base.update(options)
    spec = RunSpec.create(**base)
    return Simulation(spec, data.load(str(spec.dataset), None), torch.device("cpu"))


def _column(result, name: str) -> np.ndarray:
    return result.metrics[:, STEP_COLUMNS.index(name)].numpy()


# ----------------------------------------------------------------------------------------------- #
# The simulation loop


def test_progress_is_reported_once_per_step_in_order():
    """Catches ``if progress is not None`` negated (no progress reported when a callback is given)."""
    calls: list[int] = []
    _simulation(steps=4).run(progress=lambda step, acc: calls.append(step))
    assert calls == [1, 2, 3, 4]


def test_without_periodic_evaluation_the_run_is_evaluated_once_at_its_end():
    """``eval_every = 0``: one evaluation, after the last step. Catches ``eval_every > 0`` → ``>= 0``
    (an extra evaluation of the initial model at step 0)."""
    result = _simulation(steps=3, eval_every=0).run()
    assert sorted(result.evaluations) == [3]


def test_periodic_evaluation_includes_the_initial_model():
    result = _simulation(steps=4, eval_every=2).run()
    assert sorted(result.evaluations) == [0, 2, 4]


def test_checkpoints_are_written_only_at_the_requested_steps():
    """Catches ``checkpoint is not None and 0 in checkpoint_steps`` → ``or`` (a step-0 checkpoint
    nobody asked for)."""
    seen: list[int] = []
    _simulation(steps=3).run(checkpoint=lambda step, theta: seen.append(step), checkpoint_steps=frozenset({2}))
    assert seen == [2]


def test_worker_momentum_without_privacy_sends_the_momentum():
    """Worker momentum ``v ← β v + (1 − β) g`` from ``v = 0`` without any privacy mechanism: at the first
    step every worker sends ``(1 − β) g_i``, so ``‖mean sent‖ = (1 − β)‖mean g‖`` and the same for the
    deviation, where ``honest_norm_clean``/``honest_deviation_clean`` are those of the clipped gradients
    ``g`` (before momentum). Catches ``sent.copy_(honest)`` dropped (the rows sent are never written)
    and ``worker_mom is not None`` → ``is None`` (no separate buffer for ``g``, so the clean metrics
    read the momentum)."""
    beta = 0.75
    result = _simulation(steps=2, worker_momentum=beta).run()
    norm, norm_clean = _column(result, "honest_norm")[0], _column(result, "honest_norm_clean")[0]
    dev, dev_clean = _column(result, "honest_deviation")[0], _column(result, "honest_deviation_clean")[0]
    assert norm_clean > 0 and dev_clean > 0
    assert norm == pytest.approx((1 - beta) * norm_clean, rel=1e-5)
    assert dev == pytest.approx((1 - beta) * dev_clean, rel=1e-5)


def test_byzantine_selected_is_recorded_on_the_one_step_window_path(monkeypatch):
    """Large models record each step's selection through ``StepBuffers.record`` (a window of one step;
    forced here by lowering the windowing threshold). Multi-Krum with the declared ``f = 0`` keeps
    ``m = n − f = n`` rows, i.e. every row: ``byzantine_selected`` is exactly 1 at every step. Catches
    either ``is not None`` of ``if self.selected is not None and selected is not None`` turned into
    ``is None`` (the selection is never copied: 0)."""
    import dpbr.simulation as simulation

    monkeypatch.setattr(simulation, "WINDOW_MAX_ENTRIES", 0)
    result = _simulation(workers=6, byzantine=0, byzantine_real=1, gar="multi-krum", attack="little(factor=0)",
                         steps=3).run()
    assert _column(result, "byzantine_selected").tolist() == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------------------------- #
# Privacy mechanisms


def _clipped_rows(g: np.ndarray, c: float) -> np.ndarray:
    norms = np.linalg.norm(g, axis=-1, keepdims=True)
    return g * np.minimum(1.0, c / np.where(norms > 0, norms, 1.0))


def test_per_example_clipping_accepts_a_single_batch_of_rows():
    """``(b, d)`` per-example gradients (no worker axis): ``(1/b) Σ_j clip_c(g_j)`` and ``Σ_j clip_c(g_j)``.
    Catches the shape check ``dim() < 2`` → ``< 3`` (a plain batch refused)."""
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 4)) * np.array([[0.1], [3.0], [0.5], [10.0], [1.0], [0.01]])
    c = 1.0
    expected = _clipped_rows(g, c)
    G = torch.tensor(g, dtype=torch.float64)
    np.testing.assert_allclose(mechanisms.clip_per_example_mean(G, c).numpy(), expected.mean(0), rtol=1e-12)
    np.testing.assert_allclose(mechanisms.clip_per_example_sum(G, c).numpy(), expected.sum(0), rtol=1e-12)


@pytest.mark.parametrize("fn", [lambda X: mechanisms.sparsify_rows(X, 0.5), lambda X: mechanisms.clip_rows(X, 1.0)],
                         ids=["sparsify_rows", "clip_rows"])
def test_mechanism_kernels_refuse_integer_tensors_and_non_tensors(fn):
    """Catches the ``_check_tensor`` call dropped (an integer tensor would be pruned or clipped silently)."""
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.tensor([[3, -1, 2], [1, 1, -4]]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn([[3.0, -1.0, 2.0]])


# ----------------------------------------------------------------------------------------------- #
# Aggregation rules


def test_krum_with_one_neighbour_scores_by_the_nearest_other_row():
    """``n = 3, f = 0``: a Krum score is the squared distance to the ``k = n − f − 2 = 1`` nearest other
    row. Rows (10, 0), (0, 0), (1, 0): scores 81, 1, 1 — the far row is never chosen. Catches
    ``if k > 0`` → ``if k > 1`` in the score (all scores 0 at ``k = 1``: the first row wins)."""
    G = torch.tensor([[10.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    out = aggregators.get("krum")(G, 0)
    assert out.tolist() in ([0.0, 0.0], [1.0, 0.0])


def test_multi_krum_has_the_krum_vn_bound_only_up_to_m_equal_n_minus_f_minus_2():
    """The VN bound of Multi-Krum is Krum's ``1/sqrt(2(n − f + f(n + f(n − f − 2) − 2)/(n − 2f − 2)))``
    for ``m ≤ n − f − 2`` and unknown (``None``) above. Catches ``m <= n − f − 2`` → ``<= n − f − 3``."""
    n, f = 11, 2
    krum = 1.0 / math.sqrt(2.0 * (n - f + f * (n + f * (n - f - 2) - 2) / (n - 2 * f - 2)))
    assert aggregators.get("multi-krum", m=n - f - 2).vn_bound(n, f) == pytest.approx(krum, rel=1e-12)
    assert aggregators.get("multi-krum", m=n - f - 1).vn_bound(n, f) is None


def _mda_entries(n: int, f: int) -> int:
    r = n - f
    return math.comb(n, f) * r * (r - 1) // 2


def test_mda_refuses_searches_above_its_documented_limit():
    """The limit is ``C(n, f)·(n − f)(n − f − 1)/2 ≤ 16,777,216`` entries: ``n = 21`` allows ``f = 8``
    (15,872,220 entries) and refuses ``f = 9`` (19,399,380). Catches the limit ``1 << 24`` → ``1 << 25``."""
    rule = aggregators.get("mda")
    assert _mda_entries(21, 8) == 15_872_220 and _mda_entries(21, 9) == 19_399_380
    rule.check(21, 8)
    with pytest.raises(UsageError, match="MDA_MAX_ENTRIES"):
        rule.check(21, 9)


def test_mda_limit_is_inclusive(monkeypatch):
    """A search of exactly ``MDA_MAX_ENTRIES`` entries is allowed, one more is not. Catches ``>`` → ``>=``."""
    rule = aggregators.get("mda")
    entries = _mda_entries(9, 3)
    monkeypatch.setattr(aggregators, "MDA_MAX_ENTRIES", entries)
    rule.check(9, 3)
    monkeypatch.setattr(aggregators, "MDA_MAX_ENTRIES", entries - 1)
    with pytest.raises(UsageError, match="MDA_MAX_ENTRIES"):
        rule.check(9, 3)


@pytest.mark.parametrize("name", ["average", "centered-clipping", "geometric-median", "median"])
def test_every_rule_needs_at_least_one_worker(name):
    """Catches ``max([1] + …)`` → ``max([0] + …)`` in :meth:`Aggregator.min_workers`."""
    assert aggregators.get(name).min_workers(0) >= 1
