"""The simulated parameter server: one :class:`RunSpec` → per-step records.

One step (the setting of Guerraoui, Gupta, Pinot, Rouault and Stephan 2021, "Differential privacy and
Byzantine resilience in SGD: do they add up?", arXiv 2102.08166, and of its public code), each phase a
method of :class:`Simulation` called from the loop of :meth:`Simulation.run`:

1. *data* (:meth:`Simulation._data`): each of the ``h = n − f_real`` honest workers draws ``b``
   examples IID from its data with its own generator (seeded from ``(seed, "batch", worker)``;
   :class:`~dpbr.simulation.partitions.WorkerSampler`);
2. *gradients* (:meth:`Simulation._gradient`): their gradients are computed together
   (:class:`~dpbr.simulation.oracle.GradientOracle`: a loop of backward passes or ``torch.func.vmap``,
   whichever measured faster for the size; per-example gradients in chunks for per-example clipping);
3. *privacy* (:meth:`Simulation._privacy`): each gradient is clipped to norm ``C`` (the study clips
   each worker's mini-batch gradient), then the rest of the privacy pipeline runs (Gaussian noise with
   per-worker generators, sparsification, quantization — :mod:`dpbr.privacy.mechanisms`);
4. *attack* (:meth:`Simulation._attack`): the attack sees the honest gradients as sent (omniscient)
   and forges ``f_real`` vectors;
5. *aggregation* (:meth:`Simulation._aggregate`): the rule aggregates the ``n`` vectors with the
   declared ``f``;
6. *update* (:meth:`Simulation._update`): the server takes an SGD step with momentum (PyTorch
   semantics, dampening 0): ``m ← μ·m + g``, ``θ ← θ − λ·m``;
7. *record* (:meth:`Simulation._record`): the step's metrics (:data:`~dpbr.simulation.metrics.STEP_COLUMNS`),
   the norm of every row the rule received and the rule's selection mask
   (:data:`~dpbr.simulation.metrics.WORKER_COLUMNS`).

Everything random comes from generators seeded from ``(seed, purpose, worker)`` (:mod:`dpbr.rng`), so
the same spec and seed give identical records on the CPU. Per-step metrics stay on the device and are
copied to the host once at the end (no host sync per step; the divergence check reads one flag every
10 steps on the CPU, 25 on CUDA, or once per window for small models — a diverged run is cut at its
first non-finite step either way).

Speed. A step reuses preallocated buffers (:class:`~dpbr.simulation.buffers.StepBuffers`): the privacy
pipeline writes the vectors sent straight into rows ``0..h-1`` of the ``(n, d)`` matrix the rule
aggregates and the attack's rows are copied under them, so no ``(n, d)`` tensor is allocated or
concatenated per step. For small models (``n·d ≤`` :data:`WINDOW_MAX_ENTRIES`, e.g. the logistic
model, ``d = 69``) a step costs per-operation overhead (5–10 µs per tensor operation on the 2-core CPU
sandbox) rather than arithmetic, so the buffers hold a *window* of :data:`WINDOW_STEPS` steps and the
metrics of the whole window are computed by one batched call of
:func:`~dpbr.simulation.metrics.window_metrics` (about 55 operations per window instead of about 40
per step), and the logistic model's gradients come from
:class:`~dpbr.simulation.oracle.LogisticGradients` (the model's closed form without its per-step
normalisation). Large models use a window of one step. Trajectories (θ at every step) are
bit-identical to the straightforward loop; the windowed metrics may differ from per-step ones in the
last float32 bit (batched products). The phases are plain method calls on tensors the run already
holds: they add no tensor operation, allocation or host sync to the step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from dpbr import rng
from dpbr.errors import UsageError
from dpbr.simulation.buffers import StepBuffers, _Slot
from dpbr.simulation.metrics import STEP_COLUMNS, copies_gram, copies_norms, gram_step_metrics
from dpbr.simulation.oracle import GradientOracle, LogisticGradients, choose_strategy
from dpbr.simulation.partitions import WorkerSampler, class_counts, partition
from dpbr.simulation.timing import PhaseTimer
from dpbr.spec import RunSpec

__all__ = ["RunResult", "ServerRule", "Simulation", "WINDOW_MAX_ENTRIES", "WINDOW_STEPS"]

_DIVERGENCE_COLUMNS = [STEP_COLUMNS.index("train_loss"), STEP_COLUMNS.index("aggregate_norm")]

#: Largest ``n·d`` for which a window of steps is buffered and its metrics computed in one batched call
#: (see the module docstring); larger models compute the metrics of every step at once.
WINDOW_MAX_ENTRIES = 1 << 16

#: Steps per window for small models (the divergence check then runs at the end of each window).
WINDOW_STEPS = 50

#: Largest number of input numbers of a window's examples gathered at once (small batches).
_WINDOW_GATHER_MAX = 1 << 22


@dataclass
class RunResult:
    """What a run produced: per-step metrics, evaluations, status and facts for the metadata.

    ``worker_norms`` and ``selected`` are the per-row columns of
    :data:`~dpbr.simulation.metrics.WORKER_COLUMNS`: row ``s`` holds step ``s + 1``'s ``n`` rows in the
    order the rule received them (honest ``0..h−1`` as sent, then Byzantine); ``selected`` is ``None``
    for a rule that does not select.
    """

    steps_done: int
    metrics: Tensor                 # (steps_done, len(STEP_COLUMNS)) float64, host
    phase_seconds: Tensor           # (steps_done, len(PHASES)) float64, host (dpbr.simulation.timing)
    evaluations: dict[int, tuple[float, float]]  # step -> (test_accuracy, test_loss)
    status: str                     # "completed" | "diverged"
    diverged_at: int | None
    facts: dict[str, Any] = field(default_factory=dict)
    worker_norms: Tensor | None = None  # (steps_done, n) float64, host: ‖x_i‖ of every row the rule received
    selected: Tensor | None = None      # (steps_done, n) bool, host: the rule's selection; None if it does not select
    #: further per-step columns ``{name: (steps_done,) float64}`` (system runs: what the system did and its costs)
    columns: dict[str, Tensor] | None = None


class _Run:
    """What one run carries from step to step (made by :meth:`Simulation._run`, read by the phases)."""

    __slots__ = ("steps", "window", "buf", "metrics", "norms", "selections", "momentum_buf", "momentum", "worker_mom",
                 "gar_state", "attack_state", "idx_window", "batch_window", "share_gram", "metrics_from_gram")

    def __init__(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)


class Simulation:
    """Everything one run needs, built once from a :class:`RunSpec` and a loaded dataset."""

    def __init__(self, spec: RunSpec, dataset: Any, device: torch.device, *, strategy: str = "auto",
                 chunk: int = 64) -> None:
        from dpbr import models
        from dpbr.robust import aggregators, attacks

        self.spec = spec
        #: the cell's privacy setting: the clipping norm and mode the simulation applies itself, and
        #: the mechanisms after clipping (:class:`~dpbr.privacy.spec.PrivacySpec`)
        self.privacy = spec.privacy
        self.data = dataset
        self.device = device
        self.dtype = torch.float32
        self.model = models.for_run(spec.model, dataset, spec.seed).to(device)
        d = sum(p.numel() for p in self.model.parameters())
        theta = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).to(device, self.dtype)
        self.theta0 = theta.clone()
        self.strategy = (choose_strategy(self.model, device, spec.batch_size, d, spec.steps)
                         if strategy == "auto" else strategy)
        if self.strategy == "closed-form" and not hasattr(self.model, "worker_gradients"):
            raise UsageError("--grad-strategy", f"closed-form needs a model with a closed-form gradient (logit), not {spec.model}")
        self.oracle = GradientOracle(self.model, models.loss(spec.model), models.per_example_loss(spec.model), theta,
                                     strategy=self.strategy, chunk=chunk)
        self.logistic = (LogisticGradients(self.model, dataset.x_train, dataset.y_train)
                         if self.strategy == "closed-form" and LogisticGradients.applies(self.model) else None)
        # the fast path computes batch-mode (or no) clipping; per-example clipping needs the oracle
        self._fast_logistic = self.logistic is not None and (self.privacy.clip is None
                                                                or self.privacy.clip_mode == "batch")
        self.correct = functools.partial(models.correct, spec.model)
        self.loss = models.loss(spec.model)
        self.rule = aggregators.get(spec.gar)
        self.attack = attacks.get(spec.attack)
        # Clipping is applied by the simulation itself (batch mode on rows, per-example inside the
        # oracle); the rest of the pipeline (noise, sparsification, quantization) runs on the rows.
        self.mechanism = self.privacy.after_clip_mechanism()
        self.noise_sigma = float(getattr(self.mechanism, "sigma", 0.0) or 0.0) if self.mechanism else 0.0
        h, f_real = spec.honest, spec.byzantine_real
        self.h, self.f_real = h, f_real
        self.dim = d
        # Worker data. IID: everybody samples from the whole training set. Non-IID (shards, Dirichlet):
        # the training set is split among the h honest workers only (all n when f_real = 0), as in the
        # code of Karimireddy, He & Jaggi (2022, arXiv 2006.09365), so every example belongs to exactly
        # one honest worker; the Byzantine workers that compute on data (label flipping) sample IID
        # from the whole set (the sampler's shares have h rows only).
        self.n_train = dataset.y_train.shape[0]
        labels = dataset.y_train.cpu()
        shares = None
        if spec.partition != "iid":
            part_gen = rng.generator(spec.seed, "partition")
            shares = [ix.cpu() for ix in partition(labels, h, spec.partition, generator=part_gen)]
        batch_gens = rng.worker_generators(spec.seed, "batch", spec.workers)
        self.sampler = WorkerSampler(self.n_train, spec.batch_size, batch_gens, shares, device)
        #: ``(h, classes)`` int64: how many training examples of each class each honest worker holds
        #: (IID: every row is the whole set's histogram); recorded in the run's metadata.
        self.honest_class_counts = class_counts(labels, shares, h, dataset.num_classes)
        self.input_size = math.prod(dataset.x_train.shape[1:])
        noise_dev = device if device.type == "cuda" else "cpu"
        self.noise_gens = rng.worker_generators(spec.seed, "privacy", h, noise_dev)
        self.attack_gen = rng.generator(spec.seed, "attack", None, noise_dev)
        self.gar_gen = rng.generator(spec.seed, "aggregator", None, noise_dev)
        self._honest_workers = range(h)
        self._byzantine_workers = range(h, spec.workers)

    # ------------------------------------------------------------------------------------------- #

    def _batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and labels of the examples ``idx`` ``(h, b)`` (for the logistic closed form, its
        normalised inputs and float labels)."""
        if self._fast_logistic:
            return self.logistic.gather(idx)  # type: ignore[union-attr]
        flat = idx.reshape(-1)
        x = self.data.x_train.index_select(0, flat).view(*idx.shape, *self.data.x_train.shape[1:])
        return x, self.data.y_train.index_select(0, flat).view(idx.shape)

    def _raw_gradients(self, x: Tensor, y: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-worker gradients ``(h, d)`` (written to ``out`` when given) and losses ``(h,)``: clipped
        per example in that mode (inseparable from the computation), otherwise not clipped yet."""
        if self._fast_logistic:
            return self.logistic(x, y, out=out)  # type: ignore[misc]
        if self.privacy.clip is not None and self.privacy.clip_mode == "per-example":
            grads, losses = self.oracle.clipped_per_example_gradients(x, y, self.privacy.clip)
            return (grads if out is None else out.copy_(grads)), losses
        raw, losses = self.oracle.batch_gradients(x, y, out=out)
        return (raw if out is None or raw is out else out.copy_(raw)), losses

    def _clip(self, grads: Tensor) -> Tensor:
        """Clip each row of ``grads`` (a buffer of the simulation's) to norm ``C`` in place (batch mode)."""
        if self.privacy.clip is not None and self.privacy.clip_mode == "batch":
            from dpbr.privacy.mechanisms import clip_rows

            clip_rows(grads, self.privacy.clip, out=grads)
        return grads

    def _own_gradients(self, idx: Tensor, labels: Tensor | None = None,
                       out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Clipped gradients ``(h, d)`` (written to ``out`` when given) and losses ``(h,)`` of the batches
        ``idx`` (the Byzantine workers' own gradients, for attacks that compute on data)."""
        x, y = self._batch(idx)
        grads, losses = self._raw_gradients(x, y if labels is None else labels, out)
        return self._clip(grads), losses

    def evaluate(self, chunk: int = 2000) -> tuple[Tensor, Tensor]:
        """(test accuracy, mean test loss) of the current parameters on the whole test split."""
        x, y = self.data.x_test, self.data.y_test
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for s in range(0, y.shape[0], chunk):
                out = self.model(x[s:s + chunk])
                correct += self.correct(out, y[s:s + chunk]).sum()
                loss_sum += self.loss(out, y[s:s + chunk]).double() * y[s:s + chunk].shape[0]
        n = y.shape[0]
        return correct / n, loss_sum / n

    # -- the phases of a step (module docstring), in order ---------------------------------------- #

    def _data(self, run: _Run, s: int, k: int) -> tuple[Tensor, Tensor]:
        """Phase *data*: the honest workers' mini-batches ``(h, b, ...)`` and labels ``(h, b)`` of step
        ``s`` (slot ``k`` of its window). The indices of a whole window are drawn at its first step,
        and for small batches its examples gathered at once too."""
        if k == 0:
            count = min(run.window, run.steps - s)
            run.idx_window = self.sampler.sample_window(self._honest_workers, count, run.buf.idx_scratch, run.buf.idx)
            run.batch_window = (self._batch(run.idx_window)
                                if run.window > 1 and run.idx_window.numel() * self.input_size <= _WINDOW_GATHER_MAX
                                else None)
        if run.batch_window is not None:
            return run.batch_window[0][k], run.batch_window[1][k]
        return self._batch(run.idx_window[k])

    def _gradient(self, x: Tensor, y: Tensor, slot: _Slot) -> Tensor:
        """Phase *gradients*: the honest gradients, written to ``slot.clean`` (clipped there per example
        in that mode); returns the workers' losses ``(h,)``."""
        return self._raw_gradients(x, y, out=slot.clean)[1]

    def _privacy(self, run: _Run, slot: _Slot) -> None:
        """Phase *privacy*: batch-mode clipping of ``slot.clean`` in place, worker momentum
        ``m_i ← β m_i + (1 − β) g_i``, then the privacy mechanisms; the vectors the honest workers send
        land in ``slot.sent`` (rows ``0..h-1`` of the matrix the rule aggregates)."""
        honest = self._clip(slot.clean)
        if run.worker_mom is not None:
            beta = self.spec.worker_momentum
            run.worker_mom = beta * run.worker_mom + (1 - beta) * slot.clean
            honest = run.worker_mom
        if self.mechanism is not None:
            self.mechanism(honest, generator=self.noise_gens, out=slot.sent)
        elif honest is not slot.sent:
            slot.sent.copy_(honest)

    def _attack(self, run: _Run, slot: _Slot) -> bool:
        """Phase *attack*: the ``f_real`` Byzantine vectors, forged from the vectors sent into ``slot.byz``
        (rows ``h..n-1``); returns whether they are copies of one vector (none: ``False``)."""
        if self.f_real == 0:
            return False
        forged = self._forge(slot.sent, run.gar_state, run.attack_state, out=slot.byz)
        run.attack_state = forged.state
        return forged.copies

    def _forge(self, sent: Tensor, gar_state: Any, attack_state: Any, out: Tensor | None = None) -> Any:
        """The attack's ``Forged`` (``f_real`` vectors from the honest vectors ``sent``, written to ``out`` when
        given): the Byzantine workers' own gradients for attacks that compute on data, the server's rule with
        its state ``gar_state`` for attacks that search against it."""
        attack = self.attack
        own = None
        if attack.needs_own_gradients:
            bidx = self.sampler.sample(self._byzantine_workers)
            labels = attack.label_map(self.data.y_train[bidx], self.data.num_classes)
            own, _ = self._own_gradients(bidx, labels)
        target = ServerRule(self.rule, self.spec.byzantine, gar_state) if attack.needs_aggregator else None
        return attack.forge(sent, self.f_real, aggregator=target, generator=self.attack_gen, own=own,
                            state=attack_state, out=out)

    def _aggregate(self, run: _Run, slot: _Slot, copies: bool) -> tuple[Any, Tensor | None]:
        """Phase *aggregation*: the rule on the ``n`` rows of ``slot.stacked`` with the declared ``f``.

        Returns the rule's result (``.value``, ``.selected``) and, when the Byzantine rows are copies
        and the run shares the Gram matrix (large models, rules that use one), the float64 Gram matrix
        of the ``h + 1`` distinct rows (:func:`~dpbr.simulation.metrics.copies_gram`), else ``None``.
        """
        gram, gram_distinct = copies_gram(slot.stacked, self.h) if run.share_gram and copies else (None, None)
        agg = self.rule.aggregate(slot.stacked, self.spec.byzantine, generator=self.gar_gen, state=run.gar_state,
                                  gram=gram)
        run.gar_state = agg.state
        return agg, gram_distinct

    def _update(self, run: _Run, aggregate: Tensor) -> None:
        """Phase *update*: ``m ← μ·m + g``, ``θ ← θ − λ·m`` (in place: the model's parameters are views
        of θ)."""
        run.momentum_buf.mul_(run.momentum).add_(aggregate)
        self.oracle.theta.add_(run.momentum_buf, alpha=-self.spec.lr)

    def _record(self, run: _Run, s: int, k: int, slot: _Slot, losses: Tensor, agg: Any,
                gram_distinct: Tensor | None) -> None:
        """Phase *record*: the metrics of step ``s`` into row ``s`` of ``run.metrics`` (and the rows'
        norms and the selection mask into ``run.norms``, ``run.selections``) — from the Gram matrix of
        the distinct rows where that is exact enough (:func:`~dpbr.simulation.metrics.gram_step_metrics`,
        :func:`~dpbr.simulation.metrics.copies_norms`), otherwise from the vectors, for the whole window
        at its last step (:meth:`~dpbr.simulation.buffers.StepBuffers.metrics`,
        :meth:`~dpbr.simulation.buffers.StepBuffers.worker_norms`)."""
        buf, theta = run.buf, self.oracle.theta
        if gram_distinct is not None and run.metrics_from_gram:
            torch.sub(theta, self.theta0, out=slot.displacement)
            row = gram_step_metrics(losses, gram_distinct, agg.selected, slot.clean if buf.clean is not None else None,
                                    slot.displacement, mean_out=buf.vectors[0, 0], scratch=buf.scratch[0])
            if row is not None:
                run.metrics[s:s + 1] = row
                run.norms[s] = copies_norms(gram_distinct, self.spec.workers)
                if run.selections is not None:
                    run.selections[s] = agg.selected
                return
        buf.record(k, losses, agg.value, agg.selected, theta, self.theta0)
        if k == run.window - 1 or s + 1 == run.steps:
            run.metrics[s - k:s + 1] = buf.metrics(k + 1)
            run.norms[s - k:s + 1] = buf.worker_norms(k + 1)
            if run.selections is not None:
                run.selections[s - k:s + 1] = buf.selected[:k + 1]

    # ------------------------------------------------------------------------------------------- #

    def run(self, *, progress: Callable[[int, float | None], None] | None = None,
            checkpoint: Callable[[int, Tensor], None] | None = None,
            checkpoint_steps: frozenset[int] = frozenset()) -> RunResult:
        """Run ``spec.steps`` steps; returns the records (see :data:`STEP_COLUMNS`).

        No step records an autograd graph: the closed-form strategy runs under
        ``torch.inference_mode()`` (no autograd dispatch at all: about 20 % less per-operation
        overhead at ``d = 69``), the others under ``torch.no_grad()`` (their gradient computations
        switch autograd back on locally, or use ``torch.func``, which ignores the outer mode).
        """
        context = torch.inference_mode() if self.strategy == "closed-form" else torch.no_grad()
        with context:
            return self._run(progress, checkpoint, checkpoint_steps)


    def _run(self, progress: Callable[[int, float | None], None] | None,
             checkpoint: Callable[[int, Tensor], None] | None, checkpoint_steps: frozenset[int]) -> RunResult:
        spec, dev = self.spec, self.device
        steps, h, f_real = spec.steps, self.h, self.f_real
        theta = self.oracle.theta
        small = (h + f_real) * self.dim <= WINDOW_MAX_ENTRIES
        window = WINDOW_STEPS if small else 1
        check_every = WINDOW_STEPS if small else 10 if dev.type == "cpu" else 25
        worker_mom = torch.zeros(h, self.dim, dtype=self.dtype, device=dev) if spec.worker_momentum > 0 else None
        buf = StepBuffers(window, h, f_real, self.dim, spec.batch_size, self.dtype, dev,
                          clean=self.mechanism is not None or worker_mom is not None,
                          selected=self.rule.selects)
        # the rule's Gram matrix over the h + 1 distinct rows when the attack sends f copies of one
        # vector (ALIE, IPM, …): worth it for large models only (for small ones a step is per-operation
        # overhead, and the expansion adds two operations)
        share_gram = self.rule.uses_gram and f_real > 1 and not small
        run = _Run(
            steps=steps, window=window, buf=buf,
            metrics=torch.full((steps, len(STEP_COLUMNS)), math.nan, dtype=torch.float64, device=dev),
            norms=torch.full((steps, spec.workers), math.nan, dtype=torch.float64, device=dev),
            selections=torch.zeros(steps, spec.workers, dtype=torch.bool, device=dev) if self.rule.selects else None,
            momentum_buf=torch.zeros_like(theta),
            momentum=torch.tensor(spec.momentum, dtype=self.dtype, device=dev),  # 0-d: no conversion per step
            worker_mom=worker_mom, gar_state=None, attack_state=None, idx_window=buf.idx, batch_window=None,
            share_gram=share_gram,
            # and the step's metrics from it where the aggregate is the mean of the selected rows (on
            # the CPU: the precision checks read the small matrix on the host); large models have
            # windows of one step, so a step that falls back to the vectors never mixes with one that
            # did not
            metrics_from_gram=share_gram and self.rule.averages_selected and dev.type == "cpu",
        )
        timer = PhaseTimer(dev)
        evaluations: dict[int, tuple[Tensor, Tensor]] = {}
        status, diverged_at, done = "completed", None, 0
        if checkpoint is not None and 0 in checkpoint_steps:
            checkpoint(0, theta)
        if spec.eval_every > 0:
            evaluations[0] = self.evaluate()
        last_acc: float | None = float(evaluations[0][0]) if 0 in evaluations else None
        slots = buf.slots
        for s in range(steps):
            k = s % window
            slot = slots[k]
            timer.start()
            x, y = self._data(run, s, k)
            timer.mark()
            losses = self._gradient(x, y, slot)
            timer.mark()
            self._privacy(run, slot)
            timer.mark()
            copies = self._attack(run, slot)
            timer.mark()
            agg, gram_distinct = self._aggregate(run, slot, copies)
            timer.mark()
            self._update(run, agg.value)
            self._record(run, s, k, slot, losses, agg, gram_distinct)
            timer.mark()
            timer.end()
            done = s + 1
            if done % check_every == 0 or done == steps:
                diverged_at = _first_divergence(run.metrics, done, check_every)
                if diverged_at is not None:
                    status, done = "diverged", diverged_at
                    break
            if done in checkpoint_steps and checkpoint is not None:
                checkpoint(done, theta)
            if spec.eval_every > 0 and (done % spec.eval_every == 0 or done == steps):
                evaluations[done] = self.evaluate()
                last_acc = float(evaluations[done][0]) if progress is not None else None
            if progress is not None:
                progress(done, last_acc)
        if status == "completed" and spec.eval_every == 0:
            evaluations[done] = self.evaluate()
        evals = {k: (float(a), float(l)) for k, (a, l) in evaluations.items() if k <= done}
        return RunResult(
            steps_done=done,
            metrics=run.metrics[:done].cpu(),
            phase_seconds=timer.seconds(done).clone(),
            evaluations=evals,
            status=status,
            diverged_at=diverged_at,
            facts={"strategy": self.strategy, "dim": self.dim, "noise_sigma": self.noise_sigma},
            worker_norms=run.norms[:done].cpu(),
            selected=None if run.selections is None else run.selections[:done].cpu(),
        )


def _first_divergence(metrics: Tensor, done: int, check_every: int) -> int | None:
    """The first step (1-based) among the first ``done`` rows of ``metrics`` whose honest loss or aggregate
    norm is not finite, or ``None``; reads one flag of the last ``check_every`` rows unless one is.

    The honest loss and the aggregate norm are finite at every step of a healthy run; θ stays finite
    as long as every aggregate was.
    """
    window_rows = metrics[max(0, done - check_every):done][:, _DIVERGENCE_COLUMNS]
    if bool(torch.isfinite(window_rows).all()):
        return None
    rows = torch.isfinite(metrics[:done][:, _DIVERGENCE_COLUMNS]).all(1)
    return int((~rows).nonzero()[0, 0]) + 1


class ServerRule:
    """The aggregation rule as the server applies it at one step, for attacks that search against it.

    An omniscient attack that optimises its vector (``factor=optimal``) evaluates ``GAR(H ∪ byz)``: the
    server's rule with the server's *declared* ``f`` and the rule's current state (centered clipping's
    center), whatever number of vectors the attack forges — as LPD's ``attacks/identical.py`` does
    (``defense(..., f=f_decl)``; Guerraoui et al. 2021, arXiv 2102.08166).
    """

    def __init__(self, rule: Any, f_declared: int, state: Any) -> None:
        self.rule, self.f_declared, self.state = rule, f_declared, state

    def __call__(self, G: Tensor, f: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``rule(G, f_declared, state)``; the ``f`` the attack passes (its own count) is not used."""
        return self.rule(G, self.f_declared, generator=generator, state=self.state)
