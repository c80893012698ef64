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


def test_progress_is_reported_once_per_step_with_the_latest_test_accuracy():
    """``progress(step, accuracy)`` after every step, with the accuracy of the latest evaluation (the
    initial model's until the first periodic one). Catches ``if progress is not None`` negated, and the
    accuracy read from the wrong evaluation or the wrong field (the loss)."""
    calls: list[tuple[int, float | None]] = []
    result = _simulation(steps=4, eval_every=2).run(progress=lambda step, acc: calls.append((step, acc)))
    acc = {k: a for k, (a, _) in result.evaluations.items()}
    assert calls == [(1, acc[0]), (2, acc[2]), (3, acc[2]), (4, acc[4])]


@pytest.mark.parametrize("eval_every, steps, expected", [(0, 3, [3]), (1, 3, [0, 1, 2, 3]), (2, 4, [0, 2, 4]),
                                                         (2, 3, [0, 2, 3])])
def test_evaluations_happen_at_the_initial_model_every_eval_every_steps_and_at_the_end(eval_every, steps, expected):
    """``eval_every = 0``: one evaluation, after the last step; otherwise at step 0, every ``eval_every``
    steps and at the last step. Catches ``eval_every > 0`` → ``>= 0``/``> 1``, ``step % eval_every == 0`` →
    ``== 1`` and the final evaluation of an ``eval_every = 0`` run dropped."""
    result = _simulation(steps=steps, eval_every=eval_every).run()
    assert sorted(result.evaluations) == expected


@pytest.mark.parametrize("wanted", [frozenset({2}), frozenset({0, 2})])
def test_checkpoints_are_written_only_at_the_requested_steps(wanted):
    """Catches ``checkpoint is not None and 0 in checkpoint_steps`` → ``or`` or ``1 in`` (a step-0
    checkpoint nobody asked for, or none when asked) and ``step in checkpoint_steps and checkpoint is not
    None`` → ``or`` (a checkpoint at every step)."""
    seen: list[int] = []
    _simulation(steps=3).run(checkpoint=lambda step, theta: seen.append(step), checkpoint_steps=wanted)
    assert seen == sorted(wanted)


def test_run_facts_name_the_strategy_the_dimension_and_the_noise():
    """The logistic model on 20 features has ``d = 21`` parameters and a closed-form gradient; no
    mechanism, no noise. Catches the ``facts`` of :class:`RunResult` dropped (empty metadata facts)."""
    facts = _simulation(steps=1).run().facts
    assert facts == {"strategy": "closed-form", "dim": 21, "noise_sigma": 0.0}


@pytest.mark.parametrize("strategy", ["vmap"])  # not the oracle's default (the loop)
def test_the_gradients_are_computed_the_way_the_run_facts_report(strategy):
    """The strategy recorded in the run's facts is the one the gradient oracle runs. Catches the
    oracle built without ``strategy=`` (it would run its default, the loop, while the metadata says
    ``vmap``)."""
    spec = RunSpec.create(dataset=VECTORS, model="logit", workers=3, byzantine=0, batch_size=4, steps=1,
                          eval_every=0, clip=None, seed=4)
    sim = Simulation(spec, data.load(str(spec.dataset), None), torch.device("cpu"), strategy=strategy)
    assert sim.oracle.strategy == strategy == sim.run().facts["strategy"]


def test_a_run_that_diverges_at_its_last_step_is_reported_diverged():
    """A NaN-sending attack against the average makes step 1's aggregate NaN: a one-step run has
    diverged at step 1, and (no periodic evaluation) no evaluation of a diverged model is recorded.
    Catches the divergence check's window ending one row early (``[…:s + 1]`` → ``[…:s]``), starting one
    row late, and the final evaluation run for a diverged run too."""
    result = _simulation(workers=5, byzantine=1, gar="average", attack="nan", steps=1).run()
    assert (result.status, result.diverged_at, result.steps_done) == ("diverged", 1, 1)
    assert result.evaluations == {}


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


@pytest.mark.parametrize("one_step_windows", [False, True], ids=["windowed", "one-step"])
def test_byzantine_selected_is_the_fraction_of_byzantine_rows_the_rule_kept(monkeypatch, one_step_windows):
    """Multi-Krum with the declared ``f = 0`` keeps ``m = n − f = n`` rows, i.e. every row:
    ``byzantine_selected`` is exactly 1 at every step; a rule that selects nothing (the average) records
    NaN. Small models record a window of steps at once (``StepBuffers.metrics``), large ones each step
    (``StepBuffers.record``; forced here by lowering the windowing threshold). Catches the selection
    never copied or stacked (0 instead of 1), the selection buffer missing for one Byzantine worker
    (NaN) or allocated for a non-selecting rule (0 instead of NaN), and ``self.selected is not None and
    selected is not None`` → ``or`` (a copy into a buffer that a non-selecting rule does not have)."""
    from dpbr.simulation import engine

    if one_step_windows:
        monkeypatch.setattr(engine, "WINDOW_MAX_ENTRIES", 0)
    options = dict(workers=6, byzantine=0, byzantine_real=1, attack="little(factor=0)", steps=3)
    selected = _column(_simulation(gar="multi-krum", **options).run(), "byzantine_selected")
    assert selected.tolist() == [1.0, 1.0, 1.0]
    assert np.isnan(_column(_simulation(gar="average", **options).run(), "byzantine_selected")).all()
    # no Byzantine worker: nothing to count (and no selection buffer to fill)
    honest_only = _simulation(gar="multi-krum", workers=6, byzantine=0, steps=3).run()
    assert np.isnan(_column(honest_only, "byzantine_selected")).all()


@pytest.mark.parametrize("path", ["windowed", "one-step vectors", "one-step gram"])
def test_aggregate_norm_is_the_length_of_each_update(monkeypatch, path):
    """Without momentum ``θ_s = θ_{s−1} − λ·GAR_s``, so ``aggregate_norm`` at step ``s`` equals
    ``‖θ_s − θ_{s−1}‖/λ`` (θ from a checkpoint at every step, differences in float64; float32 rounding
    of θ bounds the agreement to ~1e-5 here). 55 steps: more than one window of 50 steps, so the second
    window's metrics are checked too. The paths: a window of steps (small models); one step per window
    with the metrics from the vectors (MDA against a Gaussian attack, whose vectors are not copies);
    one step with the metrics from the Gram matrix of the distinct rows (MDA against ALIE's copies).
    Catches the window's kept tensors never cleared (the second window records the first one's
    aggregates) and the Gram-matrix metrics taken when the step has no such matrix."""
    from dpbr.simulation import engine

    if path != "windowed":
        monkeypatch.setattr(engine, "WINDOW_MAX_ENTRIES", 0)
    attack = "gaussian" if path == "one-step vectors" else "little"
    lr, steps = 0.5, 55
    thetas: dict[int, torch.Tensor] = {}
    sim = _simulation(workers=7, byzantine=2, gar="mda", attack=attack, momentum=0.0, lr=lr, steps=steps)
    result = sim.run(checkpoint=lambda step, theta: thetas.__setitem__(step, theta.detach().double().clone()),
                     checkpoint_steps=frozenset(range(steps + 1)))
    assert result.steps_done == steps
    moved = np.array([float(torch.linalg.vector_norm(thetas[s] - thetas[s - 1])) / lr for s in range(1, steps + 1)])
    assert moved.min() > 0
    np.testing.assert_allclose(_column(result, "aggregate_norm"), moved, rtol=1e-4)


def test_centered_clipping_starts_each_step_from_the_previous_center():
    """Centered clipping (Karimireddy, He, Jaggi 2021) with one iteration moves its center by at most
    ``τ`` per step: from the previous step's center, ``‖v_s‖ ≤ s·τ``; the honest gradients of nearby θ
    point the same way, so the center keeps moving and ``‖v_s‖`` grows past ``τ`` — from a zero center
    at every step it could never exceed ``τ``. Catches the rule's ``state`` not passed between steps."""
    tau = 1e-3
    result = _simulation(gar=f"centered-clipping(tau={tau},iters=1)", steps=5).run()
    norms = _column(result, "aggregate_norm")
    assert (norms <= tau * np.arange(1, 6) * (1 + 1e-5)).all()
    assert norms[-1] > 2 * tau


def test_an_attacks_state_is_handed_from_each_step_to_the_next():
    """A stateful attack (``mimic(target=auto)``, Karimireddy, He, Jaggi 2022) returns its state with its
    vectors; the next step must receive exactly that state (``None`` at the first step). Catches the
    ``state=`` of the attack's call dropped (the attack restarts at every step)."""
    sim = _simulation(workers=6, byzantine=1, gar="median", attack="mimic(target=auto)", steps=4)
    forge, seen = sim.attack.forge, []

    def spy(*args, state=None, **kwargs):
        out = forge(*args, state=state, **kwargs)
        seen.append((state, out.state))
        return out

    sim.attack.forge = spy
    sim.run()
    assert len(seen) == 4 and seen[0][0] is None
    assert all(seen[s][0] is seen[s - 1][1] for s in range(1, 4))
    assert seen[-1][1] is not None


def test_the_rule_an_attack_evaluates_is_the_servers_with_its_state():
    """An attack that evaluates the aggregator (``factor=optimal``) gets :class:`ServerRule`: the server's
    rule with the declared ``f`` and the server's current state. Centered clipping with one iteration
    from the state ``s``: ``v = s + (1/n) Σ_i (x_i − s)·min(1, τ/‖x_i − s‖)`` (written out here). Catches
    the ``state=`` of that call dropped (the centre would be 0)."""
    from dpbr.simulation import ServerRule

    rng = np.random.default_rng(3)
    G, s, tau = rng.normal(size=(5, 3)), rng.normal(size=3), 0.1
    diff = G - s
    expected = s + (diff * np.minimum(1.0, tau / np.linalg.norm(diff, axis=1, keepdims=True))).mean(0)
    rule = aggregators.get(f"centered-clipping(tau={tau},iters=1)")
    server = ServerRule(rule, 0, torch.tensor(s))
    np.testing.assert_allclose(server(torch.tensor(G), 2).numpy(), expected, rtol=1e-10)


def test_the_rule_an_attack_evaluates_draws_from_the_generator_it_is_given():
    """A randomised rule (bucketing) evaluated through :class:`ServerRule` draws its buckets from the
    generator passed to it, never from the global RNG: the same generator state gives the same value
    whatever the global RNG's state. Catches ``generator=`` of that call dropped."""
    from dpbr.simulation import ServerRule

    G = torch.tensor(np.random.default_rng(5).normal(size=(8, 4)))
    server = ServerRule(aggregators.get("bucketing(s=2)+median"), 1, None)
    values = []
    for global_seed in (0, 1, 2):
        torch.manual_seed(global_seed)
        values.append(server(G, 1, generator=torch.Generator().manual_seed(7)))
    for value in values[1:]:
        torch.testing.assert_close(value, values[0], rtol=0, atol=0)
    torch.manual_seed(0)
    other = [server(G, 1, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(not torch.equal(o, values[0]) for o in other)  # the generator does decide the buckets


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


def test_multi_krum_has_the_krum_vn_bound_only_up_to_m_equal_n_minus_f_minus_2():
    """The VN bound of Multi-Krum is Krum's ``1/sqrt(2(n − f + f(n + f(n − f − 2) − 2)/(n − 2f − 2)))``
    for ``m ≤ n − f − 2`` and unknown (``None``) above. Catches ``m <= n − f − 2`` → ``<= n − f − 3``."""
    n, f = 11, 2
    krum = 1.0 / math.sqrt(2.0 * (n - f + f * (n + f * (n - f - 2) - 2) / (n - 2 * f - 2)))
    assert aggregators.get("multi-krum", m=n - f - 2).vn_bound(n, f) == pytest.approx(krum, rel=1e-12)
    assert aggregators.get("multi-krum", m=n - f - 1).vn_bound(n, f) is None


@pytest.mark.parametrize("name", ["average", "mda"])
def test_a_single_honest_worker_needs_no_vn_condition(name):
    """``n = 1, f = 0`` is allowed for the average and MDA, and with ``f = 0`` neither needs a VN
    condition: ``k_F = ∞``. Catches ``n < 1`` → ``n <= 1`` in :meth:`Aggregator.vn_bound` (``None``)."""
    assert aggregators.get(name).vn_bound(1, 0) == math.inf


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


# ----------------------------------------------------------------------------------------------- #
# Step metrics


def test_window_deviation_stays_accurate_when_one_step_has_nearly_equal_rows():
    """``honest_deviation = sqrt(Σ_i ‖g_i − ḡ‖²/(h − 1))``. For long rows the window may take it from
    ``Σ‖g_i‖² − h‖ḡ‖²``, which keeps its digits only where the spread is a fair share of ``Σ‖g_i‖²`` —
    for *every* step of the window. Step 0 here has independent rows, step 1 rows equal up to
    1e-4 (spread ≈ 1e-8 of ``Σ‖g_i‖²``); both must match the centred float64 formula. Catches the
    check ``.all()`` → ``.any()`` (the cancelling difference used for step 1 too)."""
    from dpbr.simulation import window_metrics

    rng = np.random.default_rng(1)
    c, h, d = 2, 4, 1 << 18  # c·h·d = 2²¹ entries: the long-row regime
    rows = rng.normal(size=(c, h, d)).astype(np.float32)
    rows[1] = rng.normal(size=d).astype(np.float32) + 1e-4 * rng.normal(size=(h, d)).astype(np.float32)
    r64 = rows.astype(np.float64)
    expected = np.sqrt(((r64 - r64.mean(1, keepdims=True)) ** 2).sum((1, 2)) / (h - 1))
    vectors = torch.tensor(rng.normal(size=(c, 4, d)).astype(np.float32))
    out = window_metrics(torch.zeros(c, h), torch.tensor(rows), None, None, None, vectors,
                         scratch=torch.empty(c, h, d))
    np.testing.assert_allclose(out[:, STEP_COLUMNS.index("honest_deviation")].numpy(), expected, rtol=1e-4)


def test_window_deviation_from_the_difference_of_sums_is_not_clamped_at_one():
    """Long rows whose spread is a fair share of ``Σ‖g_i‖²`` but below 1 (independent rows of scale
    1e-3: ``Σ‖g_i − ḡ‖² ≈ 0.8``): the deviation comes from ``Σ‖g_i‖² − h‖ḡ‖²`` clamped at 0 and must
    equal the centred float64 formula. Catches the clamp ``clamp_min_(0)`` → ``clamp_min_(1)``."""
    from dpbr.simulation import window_metrics

    rng = np.random.default_rng(2)
    h, d = 4, 1 << 18  # h·d = 2²⁰ entries
    rows = (1e-3 * rng.normal(size=(1, h, d))).astype(np.float32)
    r64 = rows.astype(np.float64)
    spread = ((r64 - r64.mean(1, keepdims=True)) ** 2).sum()
    assert 0.1 < spread < 1
    out = window_metrics(torch.zeros(1, h), torch.tensor(rows), None, None, None,
                         torch.zeros(1, 4, d), scratch=torch.empty(1, h, d))
    assert float(out[0, STEP_COLUMNS.index("honest_deviation")]) == pytest.approx(math.sqrt(spread / (h - 1)),
                                                                                  rel=1e-4)


def test_gram_metrics_cosine_with_a_zero_byzantine_vector_is_nan():
    """``cos_aggregate_attack`` is undefined (NaN) when the Byzantine rows are 0, on the Gram-matrix
    path as on the vector path. Catches ``byz_norm > 0`` → ``>= 0`` (a division by zero)."""
    from dpbr.simulation import gram_step_metrics

    x = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.2, 0.0], [1.1, -0.1, 0.1], [0.0, 0.0, 0.0]], dtype=torch.float64)
    K = x @ x.T  # three honest rows, then the (zero) Byzantine row
    selected = torch.tensor([True, True, True, True, True])  # n = 5: two copies of the zero row
    out = gram_step_metrics(torch.zeros(3), K, selected, None, torch.zeros(3), mean_out=torch.empty(3),
                            scratch=torch.empty(3, 3))
    assert out is not None
    row = out[0].tolist()
    assert math.isnan(row[STEP_COLUMNS.index("cos_aggregate_attack")])
    # the aggregate is the mean of the 5 rows: 3/5 of the honest mean
    assert row[STEP_COLUMNS.index("aggregate_norm")] == pytest.approx(0.6 * float(x[:3].mean(0).norm()), rel=1e-12)
