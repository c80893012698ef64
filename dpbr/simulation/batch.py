"""Several compatible cells as one simulation: parameters ``(S, d)``, every phase on ``(S, ·, d)`` stacks.

The seeds of one cell (or cells that differ only in the scalars ε, δ, C, the attack's factor, λ, μ and
the worker momentum β; :func:`group_key`) run as *members* of one :class:`SeedBatch`. Each member is a
:class:`~dpbr.simulation.engine.Simulation` built exactly as a single run builds it — model
initialisation, partition, batch sampler, noise, attack and rule generators from ``(seed, purpose,
worker)`` (:mod:`dpbr.rng`), in the same order — so each member draws the same random numbers as
its single run; its parameters become row ``i`` of one ``(S, d)`` tensor θ (its model's parameters
are views of that row). A step, for all members at once:

1. *data*: each member's sampler draws its workers' indices for a window of steps (one call per
   member and window, as its single run does); the examples of all members are gathered at once;
2. *gradients*: the logistic model's closed form on ``(S, h, b, D)`` (batched matrix products);
   other models ``torch.func.vmap`` over the ``S`` parameter vectors of the per-worker ``vmap``
   (:meth:`~dpbr.simulation.oracle.GradientOracle.stacked_batch_gradients`); per-example clipping
   of torch models and the ``loop`` strategy call each member's own oracle;
3. *privacy*: batch clipping, worker momentum and the mechanisms on the ``S·h`` rows; the noise is
   drawn row by row from the ``S·h`` per-worker generators in member-major order, as each single run
   draws it (members with different mechanisms — another σ — in one call per run of equal ones);
4. *attack*: one batched :meth:`~dpbr.robust.attacks.Attack.forge` on the ``(S, h, d)`` honest
   rows with the members' generators and states (member by member when their attacks' factors differ);
5. *aggregation*: one batched :meth:`~dpbr.robust.aggregators.Aggregator.aggregate` on the
   ``(S, n, d)`` stack with the members' generators and states;
6. *update*: ``m ← μ m + g``, ``θ ← θ − λ m`` with per-member ``μ`` (an ``(S, 1)`` tensor) and ``λ``
   (one call per run of equal ``λ``);
7. *record*: θ − θ₀ of all members at once; the metrics with
   :func:`~dpbr.simulation.metrics.window_metrics` (or :func:`~dpbr.simulation.metrics.gram_step_metrics`)
   and the rows' norms with :func:`~dpbr.simulation.metrics.worker_norms` (or
   :func:`~dpbr.simulation.metrics.copies_norms`) once per member and window, on the member's own
   buffers; the selection masks of all members at once.

What loops per member: the samplers' draws (once per window), the noise (one draw per worker row,
as in a single run), the metrics (once per window: about 55 operations for 50 steps), evaluations
(the member's own model on the test split), per-example clipping of torch models, the divergence
check and checkpoints.

Identity. For the logistic closed form on the CPU every member's records, evaluations, status and
final θ are *bit-identical* to ``Simulation(spec).run()`` (``tests/test_seed_batch.py``; with
``h·b·D`` a multiple of 4, as for the 68 features of phishing). A batched kernel is not always the
same arithmetic as the single one, so:

* PyTorch's CPU elementwise kernels run vectorised code on blocks of a contiguous range and scalar
  code on its tail, and the two differ in the last bit for ``sigmoid`` (a vectorised ``exp``) and
  for ``add(alpha=…)`` (a fused multiply-add). θ and the logistic probabilities are kept in
  *padded* rows (row stride larger than the row), so the kernels cannot merge the members' rows
  into one range and each row is processed as the single run's vector is;
* BLAS products (``mv``, ``mm``, ``bmm``) round differently with the alignment of their operands
  (measured: a Gram matrix of ``5 × 69`` rows changes with the offset of its first row modulo 4
  floats). Each member's buffers are therefore a block of its own that starts on a 64-byte boundary
  and is laid out as its single run's (:func:`_member_buffers`), and ``torch.mv`` (the single run's
  ``x·w``) is a ``bmm`` of the row ``w`` by ``xᵀ`` per member, which is the same BLAS call where
  ``D·h·b ≥ 400`` (below, ``bmm`` has a kernel of its own and each member calls ``mv``).

For torch models the batched ``vmap`` reorders float32 sums: a member's gradients differ from its
single run's by float32 rounding, and the trajectories drift apart from there (measured after 6
steps of the CNN and LeNet with MDA: at most 3e-7 relative in the metrics and θ; the test allows
1e-5). With the ``loop`` strategy (and for per-example clipping) they are identical.

Divergence: a member whose honest loss or aggregate norm turns non-finite is cut at its first
non-finite step, decided at the same checks as its single run
(:func:`~dpbr.simulation.engine._first_divergence`); its records after the cut are dropped, its θ
is the one its single run ends with, and the others go on (its slice keeps being stepped: every
operation is per slice, so nothing of it reaches another member). Time per phase
(:attr:`RunResult.phase_seconds`) is the batch's time for the step divided by ``S``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from dpbr.errors import UsageError
from dpbr.simulation.buffers import _Slot
from dpbr.simulation.engine import (_WINDOW_GATHER_MAX, WINDOW_MAX_ENTRIES, WINDOW_STEPS, RunResult, ServerRule,
                                    Simulation, _first_divergence, _Run)
from dpbr.simulation.metrics import (STEP_COLUMNS, copies_gram, copies_norms, gram_step_metrics, window_metrics,
                                     worker_norms)
from dpbr.simulation.timing import PhaseTimer
from dpbr.spec import RunSpec

__all__ = ["SCALAR_FIELDS", "SeedBatch", "group_key"]

#: Spec fields in which the members of one batch may differ (besides the attack's ``factor``).
SCALAR_FIELDS: tuple[str, ...] = RunSpec.BATCH_SCALARS

#: Extra numbers per row of the padded tensors (θ, the logistic probabilities): see the module docstring.
_PAD = 16

#: Smallest ``D·h·b`` for which ``bmm`` takes the BLAS path and equals ``torch.mv`` bit for bit.
_BMM_BLAS_MIN = 400


def group_key(spec: RunSpec) -> tuple[Any, ...]:
    """What the members of one :class:`SeedBatch` must share (:meth:`dpbr.spec.RunSpec.batch_key`):
    two specs with equal keys run as one batch, each member's output equal to its single run."""
    return spec.batch_key()


def _runs(values: Sequence[Any]) -> list[tuple[int, int, Any]]:
    """Maximal runs ``(start, stop, value)`` of equal consecutive ``values``."""
    out: list[tuple[int, int, Any]] = []
    for i, v in enumerate(values):
        if out and out[-1][2] == v:
            out[-1] = (out[-1][0], i + 1, v)
        else:
            out.append((i, i + 1, v))
    return out


def _member_buffers(S: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(S, *shape)`` uninitialised, member ``i``'s block ``[i]`` contiguous and starting on a 64-byte
    boundary, as a single run's freshly allocated buffer does (see the module docstring)."""
    size = math.prod(shape)
    store = torch.empty(S, -(-size // _PAD) * _PAD, dtype=dtype, device=device)
    return store[:, :size].view(S, *shape)


def _bind(sim: Simulation, row: Tensor) -> None:
    """Make ``row`` (a view of the batch's θ) the parameters of ``sim``: its oracle's θ, its model's
    parameter views and the logistic closed form's weight and bias views."""
    sim.oracle.theta = row
    for p, view in zip(sim.model.parameters(), sim.oracle.views(row).values()):
        p.data = view
    if sim.logistic is not None:
        sim.logistic.weight = sim.model.linear.weight.detach().reshape(-1)
        sim.logistic.bias = sim.model.linear.bias.detach()


class SeedBatch:
    """``S`` compatible cells (equal :func:`group_key`) run as one simulation (module docstring).

    Parameters
    ----------
    specs : sequence of RunSpec
        The members, in order; all with the same :func:`group_key`.
    dataset, device, strategy, chunk
        As for :class:`~dpbr.simulation.engine.Simulation`.

    Attributes
    ----------
    members : list of Simulation
        Member ``i``'s single-run object (its ``noise_sigma``, ``dim``, ``h``, ``honest_class_counts``,
        ``strategy`` are what its output records); its model's parameters are views of ``theta[i]``.
    theta : Tensor (S, d)
        The members' parameters (rows of a padded buffer).

    Raises
    ------
    UsageError
        ``--batch`` when the specs do not share one :func:`group_key`.
    """

    def __init__(self, specs: Sequence[RunSpec], dataset: Any, device: torch.device, *, strategy: str = "auto",
                 chunk: int = 64) -> None:
        specs = list(specs)
        if not specs:
            raise ValueError("SeedBatch needs at least one spec")
        if len({group_key(s) for s in specs}) > 1:
            raise UsageError("--batch", "cells run as one batch must differ only in seed, epsilon, delta, clip, lr, "
                                        "momentum, worker_momentum and the attack's factor")
        self.specs = specs
        self.device = device
        self.members = [Simulation(s, dataset, device, strategy=strategy, chunk=chunk) for s in specs]
        first = self.members[0]
        self.S, self.dim, self.h, self.f_real = len(specs), first.dim, first.h, first.f_real
        self.n = specs[0].workers
        self.strategy = first.strategy
        self.dtype = first.dtype
        S, d = self.S, self.dim
        self._theta_store = torch.zeros(S, (d // _PAD + 1) * _PAD, dtype=self.dtype, device=device)
        self.theta = self._theta_store[:, :d]
        self.theta0 = torch.stack([m.theta0 for m in self.members])
        for i, sim in enumerate(self.members):
            self.theta[i].copy_(sim.oracle.theta)
            _bind(sim, self.theta[i])
        privacy = first.privacy
        self._per_example = privacy.clip is not None and privacy.clip_mode == "per-example"
        if first._fast_logistic:
            self._gradient_mode = "closed-form"
        elif self.strategy == "vmap" and not self._per_example:
            self._gradient_mode = "vmap"
        else:
            self._gradient_mode = "member"
        # the gather reads member 0's normalised inputs for everybody when they are the same numbers
        self._shared_inputs = (first.logistic is None
                               or all(torch.equal(m.logistic.inputs, first.logistic.inputs) for m in self.members))
        self._clip_runs = (_runs([m.privacy.clip for m in self.members])
                           if privacy.clip is not None and privacy.clip_mode == "batch" else [])
        self._mechanism_runs = ([(a, b, self.members[a].mechanism)
                                 for a, b, _ in _runs([m.privacy.after_clip_spec() for m in self.members])]
                                if first.mechanism is not None else [])
        self._noise_gens = [g for m in self.members for g in m.noise_gens]
        self._attack_gens = [m.attack_gen for m in self.members]
        self._gar_gens = [m.gar_gen for m in self.members]
        # one batched attack when the members' attacks are the same (the factor may differ)
        self._batched_attack = len({m.attack.name for m in self.members}) == 1
        self._gar_state: Any = None
        self._attack_state: Any = None
        self._lr_runs = _runs([s.lr for s in specs])
        self._momentum = torch.tensor([s.momentum for s in specs], dtype=self.dtype, device=device).view(S, 1)
        betas = [s.worker_momentum for s in specs]
        self._beta = torch.tensor(betas, dtype=self.dtype, device=device).view(S, 1, 1)
        self._one_minus_beta = torch.tensor([1 - b for b in betas], dtype=self.dtype, device=device).view(S, 1, 1)
        b = specs[0].batch_size
        self._two_over = torch.tensor(2.0 / b, dtype=self.dtype, device=device)
        self._one = torch.ones((), dtype=self.dtype, device=device)
        self._prob = torch.empty(S, (self.h * b // _PAD + 1) * _PAD, dtype=self.dtype, device=device)

    # -- the phases of a step, for all members ------------------------------------------------- #

    def _gather(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The members' examples ``idx`` (``(..., S, h, b)``): inputs ``(..., S, h, b, ...)`` and labels."""
        first = self.members[0]
        if self._shared_inputs:
            return first._batch(idx)
        parts = [m._batch(idx.select(-3, i)) for i, m in enumerate(self.members)]
        dim = idx.dim() - 3
        return torch.stack([p[0] for p in parts], dim=dim), torch.stack([p[1] for p in parts], dim=dim)

    def _logistic(self, x: Tensor, y: Tensor, out: Tensor, losses: Tensor) -> None:
        """The closed form of :class:`~dpbr.simulation.oracle.LogisticGradients` for all members:
        ``x`` (S, h, b, D) normalised inputs, ``y`` (S, h, b) float labels; gradients into ``out``
        (S, h, d) and losses into ``losses`` (S, h) — the same operations per member, batched."""
        S, h, b, D = x.shape
        hb = h * b
        w = self.theta[:, :D]
        if D * hb >= _BMM_BLAS_MIN:
            z = torch.bmm(w.unsqueeze(1), x.reshape(S, hb, D).transpose(1, 2)).view(S, hb)
        else:
            z = torch.stack([torch.mv(x[i].reshape(hb, D), w[i]) for i in range(S)])
        z = z + self.theta[:, D:D + 1]
        prob = torch.sigmoid(z, out=self._prob[:, :hb]).view(S, h, b)
        err = prob - y
        dz = self._two_over * err * prob * (self._one - prob)
        out.copy_(torch.cat([torch.bmm(dz.reshape(S * h, 1, b), x.reshape(S * h, b, D)).squeeze(1),
                             dz.reshape(S * h, b).sum(1, keepdim=True)], dim=1).view(S, h, self.dim))
        losses.copy_(err.pow(2).mean(2))

    def _gradients(self, x: Tensor, y: Tensor, out: Tensor, losses: Tensor) -> None:
        """Phase *gradients*: the honest gradients of all members into ``out`` (S, h, d) (clipped per
        example in that mode), their losses into ``losses`` (S, h)."""
        if self._gradient_mode == "closed-form":
            self._logistic(x, y, out, losses)
        elif self._gradient_mode == "vmap":
            grads, loss = self.members[0].oracle.stacked_batch_gradients(self.theta, x, y)
            out.copy_(grads)
            losses.copy_(loss)
        else:
            for i, sim in enumerate(self.members):
                losses[i].copy_(sim._raw_gradients(x[i], y[i], out=out[i])[1])

    def _privacy(self, clean: Tensor, sent: Tensor, noised: Tensor | None, worker_mom: Tensor | None) -> Tensor | None:
        """Phase *privacy*: batch clipping of ``clean`` (S, h, d) in place, worker momentum, then the
        mechanisms; the vectors sent land in ``sent`` (S, h, d). Returns the new worker momentum."""
        if self._clip_runs:
            from dpbr.privacy.mechanisms import clip_rows

            for a, b, c in self._clip_runs:
                clip_rows(clean[a:b], c, out=clean[a:b])
        honest = clean
        if worker_mom is not None:
            worker_mom = self._beta * worker_mom + self._one_minus_beta * clean
            honest = worker_mom
        if noised is not None:
            h, rows = self.h, honest.reshape(-1, self.dim)
            for a, b, mechanism in self._mechanism_runs:
                mechanism(rows[a * h:b * h], generator=self._noise_gens[a * h:b * h], out=noised[a * h:b * h])
            sent.copy_(noised.view_as(sent))
        else:
            sent.copy_(honest)
        return worker_mom

    def _forge_batch(self, runs: list[_Run], slots: list[_Slot], stacked: Tensor) -> list[bool]:
        """Phase *attack* for all members: the Byzantine rows ``stacked[:, h:]`` forged from the sent
        rows ``stacked[:, :h]`` (``stacked``: the step's ``(S, n, d)``), each member with its attack
        generator and state; per member whether its rows are copies of one vector.

        One batched :meth:`~dpbr.robust.attacks.Attack.forge` on the ``(S, h, d)`` stack when the
        members share the attack's parameters (against the batched rule with each member's state
        when the attack searches against it); otherwise each member's own phase
        (:meth:`Simulation._attack <dpbr.simulation.engine.Simulation._attack>`).
        """
        if self.f_real == 0:
            return [False] * self.S
        if not self._batched_attack:
            return [sim._attack(run, slot) for sim, run, slot in zip(self.members, runs, slots)]
        first, h = self.members[0], self.h
        attack = first.attack
        own = None
        if attack.needs_own_gradients:  # each member's Byzantine workers draw from their own samplers
            parts = []
            for sim in self.members:
                bidx = sim.sampler.sample(sim._byzantine_workers)
                labels = attack.label_map(sim.data.y_train[bidx], sim.data.num_classes)
                parts.append(sim._own_gradients(bidx, labels)[0])
            own = torch.stack(parts)
        target = ServerRule(first.rule, self.specs[0].byzantine, self._gar_state) if attack.needs_aggregator else None
        forged = attack.forge(stacked[:, :h], self.f_real, aggregator=target, generator=self._attack_gens, own=own,
                              state=self._attack_state, out=stacked[:, h:])
        self._attack_state = forged.state
        return [bool(forged.copies)] * self.S

    def _aggregate_batch(self, runs: list[_Run], slots: list[_Slot], copies: list[bool], stacked: Tensor,
                         aggregate: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
        """Phase *aggregation* for all members: the rule on each member's ``n`` rows of ``stacked``
        ``(S, n, d)`` with its generator and state, in one batched
        :meth:`~dpbr.robust.aggregators.Aggregator.aggregate`; the aggregates land in ``aggregate``
        ``(S, d)``. Returns the selection masks ``(S, n)`` (or ``None``) and, per member, the Gram
        matrix of its distinct rows where its single run shares one
        (:func:`~dpbr.simulation.metrics.copies_gram`, passed to the rule as an ``(S, n, n)`` stack).

        Members whose attack sends copies and members whose attack does not (possible only with
        per-member attacks) are aggregated member by member, as their single runs do.
        """
        rule, h = self.members[0].rule, self.h
        shared = [run.share_gram and c for run, c in zip(runs, copies)]
        if any(shared) and not all(shared):
            results = [sim._aggregate(run, slot, c) for sim, run, slot, c in zip(self.members, runs, slots, copies)]
            self._gar_state = None if runs[0].gar_state is None else torch.stack([run.gar_state for run in runs])
            aggregate.copy_(torch.stack([r[0].value for r in results]))
            masks = [r[0].selected for r in results]
            return (None if masks[0] is None else torch.stack(masks)), [r[1] for r in results]
        grams = [copies_gram(slot.stacked, h) for slot in slots] if all(shared) else None
        agg = rule.aggregate(stacked, self.specs[0].byzantine, generator=self._gar_gens, state=self._gar_state,
                             gram=None if grams is None else torch.stack([g[0] for g in grams]))
        self._gar_state = agg.state
        for i, run in enumerate(runs):  # the members' own phases (attacks against the rule) read it there
            run.gar_state = None if agg.state is None else agg.state[i]
        aggregate.copy_(agg.value)
        return agg.selected, [None] * self.S if grams is None else [g[1] for g in grams]

    def _update(self, momentum_buf: Tensor, aggregate: Tensor) -> None:
        """Phase *update*: ``m ← μ m + g``, ``θ ← θ − λ m`` for every member (θ's padded rows keep each
        row's arithmetic that of a single run)."""
        momentum_buf.mul_(self._momentum).add_(aggregate)
        for a, b, lr in self._lr_runs:
            self.theta[a:b].add_(momentum_buf[a:b], alpha=-lr)

    # ------------------------------------------------------------------------------------------- #

    def run(self, *, progress: Callable[[int, float | None], None] | None = None,
            checkpoint: Callable[[int, int, Tensor], None] | None = None,
            checkpoint_steps: frozenset[int] = frozenset()) -> list[RunResult]:
        """Run every member ``steps`` steps (or to its divergence); one :class:`RunResult` per member, in order.

        ``progress(done, last accuracy)`` is called after every step of the batch (the accuracy of
        the first member still running); ``checkpoint(member, step, θ row)`` at ``checkpoint_steps``
        for each member still running. Gradients run under ``torch.inference_mode()`` for the closed
        form and ``torch.no_grad()`` otherwise, as in a single run.
        """
        context = torch.inference_mode() if self.strategy == "closed-form" else torch.no_grad()
        with context:
            return self._run(progress, checkpoint, checkpoint_steps)

    def _run(self, progress: Callable[[int, float | None], None] | None,
             checkpoint: Callable[[int, int, Tensor], None] | None,
             checkpoint_steps: frozenset[int]) -> list[RunResult]:
        spec, dev, members = self.specs[0], self.device, self.members
        S, h, f, n, d = self.S, self.h, self.f_real, self.n, self.dim
        steps, b, dt = spec.steps, spec.batch_size, self.dtype
        first = members[0]
        small = n * d <= WINDOW_MAX_ENTRIES
        W = WINDOW_STEPS if small else 1
        check_every = WINDOW_STEPS if small else 10 if dev.type == "cpu" else 25
        has_clean = first.mechanism is not None or spec.worker_momentum > 0
        selects = first.rule.selects
        # each member's buffers laid out as its single run's (module docstring)
        stacked = _member_buffers(S, (W, n, d), dt, dev)
        grads = _member_buffers(S, (W, h, d), dt, dev)
        noised = torch.empty(S * h, d, dtype=dt, device=dev) if self._mechanism_runs else None
        vectors = _member_buffers(S, (W, 5 if has_clean else 4, d), dt, dev)
        scratch = _member_buffers(S, (W, h, d), dt, dev)
        losses = torch.zeros(S, W, h, dtype=dt, device=dev)
        selected = torch.zeros(S, W, n, dtype=torch.bool, device=dev) if selects else None
        idx = torch.empty(W, S, h, b, dtype=torch.int64)
        idx_scratch = [torch.empty(h, W, b, dtype=torch.int64) for _ in members]
        metrics = torch.full((S, steps, len(STEP_COLUMNS)), math.nan, dtype=torch.float64, device=dev)
        norms = torch.full((S, steps, n), math.nan, dtype=torch.float64, device=dev)
        selections = torch.zeros(S, steps, n, dtype=torch.bool, device=dev) if selects else None
        momentum_buf = torch.zeros(S, d, dtype=dt, device=dev)
        worker_mom = torch.zeros(S, h, d, dtype=dt, device=dev) if spec.worker_momentum > 0 else None
        share_gram = first.rule.uses_gram and f > 1 and not small
        from_gram = share_gram and first.rule.averages_selected and dev.type == "cpu"
        runs = [_Run(gar_state=None, attack_state=None, share_gram=share_gram) for _ in members]
        slots = [[_Slot(stacked=stacked[i, k], sent=stacked[i, k, :h], byz=stacked[i, k, h:],
                        clean=grads[i, k], displacement=vectors[i, k, 3]) for i in range(S)] for k in range(W)]
        input_size = first.input_size

        timer = PhaseTimer(dev)
        evaluations: list[dict[int, tuple[Tensor, Tensor]]] = [{} for _ in members]
        live = [True] * S
        status, cut = ["completed"] * S, [None] * S
        last_acc: list[float | None] = [None] * S
        final: list[Tensor | None] = [None] * S
        if checkpoint is not None and 0 in checkpoint_steps:
            for i in range(S):
                checkpoint(i, 0, self.theta[i])
        if spec.eval_every > 0:
            for i, sim in enumerate(members):
                evaluations[i][0] = sim.evaluate()
                last_acc[i] = float(evaluations[i][0][0])
        batch_window: tuple[Tensor, Tensor] | None = None
        window_idx = idx
        ran = 0
        for s in range(steps):
            k = s % W
            timer.start()
            if k == 0:  # phase data: the window's indices, member by member, and its examples at once
                count = min(W, steps - s)
                for i, sim in enumerate(members):
                    sim.sampler.sample_window(sim._honest_workers, count, idx_scratch[i], idx[:, i])
                window_idx = idx[:count].to(dev)
                batch_window = (self._gather(window_idx)
                                if W > 1 and window_idx.numel() * input_size <= _WINDOW_GATHER_MAX else None)
            x, y = (batch_window[0][k], batch_window[1][k]) if batch_window is not None else self._gather(window_idx[k])
            timer.mark()
            self._gradients(x, y, grads[:, k], losses[:, k])
            timer.mark()
            worker_mom = self._privacy(grads[:, k], stacked[:, k, :h], noised, worker_mom)
            timer.mark()
            copies = self._forge_batch(runs, slots[k], stacked[:, k])
            timer.mark()
            chosen, distinct = self._aggregate_batch(runs, slots[k], copies, stacked[:, k], vectors[:, k, 1])
            timer.mark()
            self._update(momentum_buf, vectors[:, k, 1])
            torch.sub(self.theta, self.theta0, out=vectors[:, k, 3])
            if selected is not None:
                selected[:, k].copy_(chosen)
            pending = list(range(S))
            if from_gram:
                pending = [i for i in pending if not self._gram_row(metrics, norms, s, k, i, chosen[i], distinct[i],
                                                                    losses, grads if has_clean else None, vectors,
                                                                    scratch)]
            if k == W - 1 or s + 1 == steps:
                self._window_metrics(metrics, norms, s, k + 1, pending, losses, stacked,
                                     grads if has_clean else None, selected, vectors, scratch)
                if selections is not None:
                    selections[:, s - k:s + 1] = selected[:, :k + 1]  # type: ignore[index]
            timer.mark()
            timer.end()
            done = ran = s + 1
            if done % check_every == 0 or done == steps:
                for i in range(S):
                    if live[i]:
                        at = _first_divergence(metrics[i], done, check_every)
                        if at is not None:  # its single run stops here: keep its θ as that run ends
                            live[i], status[i], cut[i] = False, "diverged", at
                            final[i] = self.theta[i].clone()
            for i, sim in enumerate(members):
                if not live[i]:
                    continue
                if checkpoint is not None and done in checkpoint_steps:
                    checkpoint(i, done, self.theta[i])
                if spec.eval_every > 0 and (done % spec.eval_every == 0 or done == steps):
                    evaluations[i][done] = sim.evaluate()
                    last_acc[i] = float(evaluations[i][done][0]) if progress is not None else None
            if not any(live):
                break
            if progress is not None:
                progress(done, next(a for a, alive in zip(last_acc, live) if alive))
        seconds = timer.seconds(ran) / S
        for i, row in enumerate(final):
            if row is not None:
                self.theta[i].copy_(row)
        results = []
        for i, sim in enumerate(members):
            done = cut[i] if cut[i] is not None else steps
            if status[i] == "completed" and spec.eval_every == 0:
                evaluations[i][done] = sim.evaluate()
            results.append(RunResult(
                steps_done=done,
                metrics=metrics[i, :done].cpu().clone(),
                phase_seconds=seconds[:done].clone(),
                evaluations={k: (float(a), float(l)) for k, (a, l) in evaluations[i].items() if k <= done},
                status=status[i],
                diverged_at=cut[i],
                facts={"strategy": sim.strategy, "dim": sim.dim, "noise_sigma": sim.noise_sigma},
                worker_norms=norms[i, :done].cpu().clone(),
                selected=None if selections is None else selections[i, :done].cpu().clone(),
            ))
        return results

    def _gram_row(self, metrics: Tensor, norms: Tensor, s: int, k: int, i: int, chosen: Tensor,
                  distinct: Tensor | None, losses: Tensor, clean: Tensor | None, vectors: Tensor,
                  scratch: Tensor) -> bool:
        """Member ``i``'s metrics and rows' norms of step ``s`` from the Gram matrix of its distinct
        rows, where its single run takes them from there (:func:`~dpbr.simulation.metrics.gram_step_metrics`,
        :func:`~dpbr.simulation.metrics.copies_norms`); whether it did."""
        if distinct is None:
            return False
        row = gram_step_metrics(losses[i, k], distinct, chosen, None if clean is None else clean[i, k],
                                vectors[i, k, 3], mean_out=vectors[i, k, 0], scratch=scratch[i, k])
        if row is None:
            return False
        metrics[i, s:s + 1] = row
        norms[i, s] = copies_norms(distinct, self.n)
        return True

    def _window_metrics(self, metrics: Tensor, norms: Tensor, s: int, count: int, members: list[int],
                        losses: Tensor, stacked: Tensor, clean: Tensor | None, selected: Tensor | None,
                        vectors: Tensor, scratch: Tensor) -> None:
        """The metrics and rows' norms of the window's ``count`` steps ending at step ``s`` for
        ``members`` (:func:`~dpbr.simulation.metrics.window_metrics` and
        :func:`~dpbr.simulation.metrics.worker_norms` on each member's buffers, which are laid out as
        its single run's: one call each per member and window)."""
        h, f = self.h, self.n - self.h
        first = s + 1 - count
        for i in members:
            metrics[i, first:s + 1] = window_metrics(
                losses[i, :count], stacked[i, :count, :h], None if clean is None else clean[i, :count],
                stacked[i, :count, h:] if f > 0 else None, None if selected is None else selected[i, :count],
                vectors[i, :count], scratch=scratch[i, :count])
            norms[i, first:s + 1] = worker_norms(stacked[i, :count])
