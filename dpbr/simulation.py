"""The simulated parameter server: one :class:`RunSpec` → per-step records.

One step (REFERENCE §1–2, seed 001 §4.1):

1. each of the ``h = n − f_real`` honest workers draws ``b`` examples IID from its data with its own
   generator (seeded from ``(seed, "batch", worker)``);
2. their gradients are computed together (:class:`GradientOracle`: a loop of backward passes or
   ``torch.func.vmap``, whichever measured faster for the size; per-example gradients in chunks for
   per-example clipping);
3. each gradient is clipped to norm ``C`` (the study clips each worker's mini-batch gradient), then the
   rest of the privacy pipeline runs (Gaussian noise with per-worker generators, sparsification,
   quantization — :mod:`dpbr.privacy.mechanisms`);
4. the attack sees the honest gradients as sent (omniscient) and forges ``f_real`` vectors;
5. the rule aggregates the ``n`` vectors with the declared ``f``;
6. the server takes an SGD step with momentum (PyTorch semantics, dampening 0):
   ``m ← μ·m + g``, ``θ ← θ − λ·m``.

Everything random comes from generators seeded from ``(seed, purpose, worker)`` (:mod:`dpbr.rng`), so
the same spec and seed give identical records on the CPU. Per-step metrics stay on the device and are
copied to the host once at the end (no host sync per step except the divergence check on the CPU).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from dpbr import rng
from dpbr.errors import UsageError
from dpbr.spec import RunSpec

__all__ = ["GradientOracle", "RunResult", "Simulation", "STEP_COLUMNS", "choose_strategy"]

#: Per-step metric columns, in the order they are recorded (see :meth:`Simulation.run`).
STEP_COLUMNS: tuple[str, ...] = (
    "train_loss",            # mean over honest workers of their mini-batch loss
    "honest_norm",           # ‖ḡ‖, ḡ = mean of the honest gradients as sent (after privacy)
    "honest_deviation",      # sqrt(Σ_i ‖g_i − ḡ‖² / (h − 1)) of the honest gradients as sent
    "vn_ratio",              # honest_deviation / honest_norm (the per-step variance-to-norm ratio)
    "honest_norm_clean",     # ‖ḡ‖ before the privacy mechanisms (after clipping)
    "honest_deviation_clean",  # deviation before the privacy mechanisms (after clipping)
    "aggregate_norm",        # ‖GAR(...)‖
    "cos_aggregate_honest",  # cos(GAR(...), ḡ)
    "cos_aggregate_attack",  # cos(GAR(...), mean of the Byzantine vectors); NaN without attack
    "param_distance",        # ‖θ_t − θ_0‖ after the update
    "byzantine_selected",    # fraction of Byzantine rows the rule selected (selecting rules), else NaN
)

_DIVERGENCE_COLUMNS = [STEP_COLUMNS.index("train_loss"), STEP_COLUMNS.index("aggregate_norm")]

#: Seconds spent per phase of a step.
PHASES: tuple[str, ...] = ("data", "gradient", "privacy", "attack", "aggregate", "update")


def choose_strategy(model: nn.Module, device: torch.device, batch_size: int, dim: int, steps: int) -> str:
    """Pick how honest gradients are computed: ``"closed-form"``, ``"vmap"`` or ``"loop"``.

    Measured on the 2-core CPU sandbox (CNN, d = 431,080, h = 6, ms per step of gradients, one
    process alone): b = 10: loop 59, vmap 38; b = 50: loop 196, vmap 216; b = 100: loop 343, vmap
    376; b = 500: loop 1,839, vmap 5,874. Logistic model (d = 69): vmap 1.3 ms, loop 2.4 ms,
    closed form (:meth:`dpbr.models.Logit.worker_gradients`) 0.05 ms. The first ``vmap`` call of a
    process also imports TorchDynamo (3–15 s here), so a short run does better with the loop.
    Hence: the closed form where the model has one; on the CPU vmap while ``b·d ≤ 10⁷`` and the run
    is long enough (≥ 200 steps) to repay the import, a loop of backward passes otherwise; on CUDA
    vmap (one batched kernel per layer instead of h launches).
    """
    if hasattr(model, "worker_gradients"):
        return "closed-form"
    if device.type == "cuda":
        return "vmap"
    return "vmap" if batch_size * dim <= 10_000_000 and steps >= 200 else "loop"


class GradientOracle:
    """Per-worker gradients of a model on stacked mini-batches, as one ``(h, d)`` tensor.

    Parameters are a flat vector ``theta`` (``d``,); the model's parameters are views into it, so an
    in-place update of ``theta`` updates the model.
    """

    def __init__(self, model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor],
                 per_example_loss: Callable[[Tensor, Tensor], Tensor], theta: Tensor,
                 strategy: str = "loop", chunk: int = 64) -> None:
        self.model = model
        self.loss = loss
        self.per_example_loss = per_example_loss
        self.strategy = strategy
        self.chunk = int(chunk)
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        self.dim = int(sum(self.sizes))
        self.theta = theta
        views = self.views(theta)
        for (name, p), v in zip(list(model.named_parameters()), views.values()):
            p.data = v
        self._vmapped = torch.func.vmap(torch.func.grad(self._batch_loss, has_aux=True), in_dims=(None, 0, 0))
        self._per_example = torch.func.vmap(torch.func.grad(self._example_loss, has_aux=True), in_dims=(None, 0, 0))

    def views(self, theta: Tensor) -> dict[str, Tensor]:
        """``{parameter name: view of theta}`` in the model's parameter order."""
        out, offset = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = theta[offset:offset + size].view(shape)
            offset += size
        return out

    def _batch_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = torch.func.functional_call(self.model, params, (x,))
        loss = self.loss(out, y)
        return loss, loss.detach()

    def _example_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = torch.func.functional_call(self.model, params, (x.unsqueeze(0),))
        loss = self.loss(out, y.unsqueeze(0))
        return loss, loss.detach()

    def _flatten(self, grads: dict[str, Tensor] | tuple[Tensor, ...], rows: int) -> Tensor:
        parts = grads.values() if isinstance(grads, dict) else grads
        return torch.cat([g.reshape(rows, -1) for g in parts], dim=1)

    def batch_gradients(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mini-batch gradients: ``x`` (h, b, ...) and ``y`` (h, b) → ``(G (h, d), losses (h,))``."""
        h = x.shape[0]
        if self.strategy == "closed-form":
            return self.model.worker_gradients(x, y)
        if self.strategy == "vmap":
            params = self.views(self.theta.detach())
            grads, losses = self._vmapped(params, x, y)
            return self._flatten(grads, h), losses
        plist = list(self.model.parameters())
        out = torch.empty(h, self.dim, dtype=self.theta.dtype, device=self.theta.device)
        losses = torch.empty(h, dtype=self.theta.dtype, device=self.theta.device)
        for i in range(h):  # one backward pass per worker (a loop over workers, not coordinates)
            with torch.enable_grad():
                loss = self.loss(self.model(x[i]), y[i])
                grads = torch.autograd.grad(loss, plist)
            torch.cat([g.reshape(-1) for g in grads], out=out[i])
            losses[i] = loss.detach()
        return out, losses

    def clipped_per_example_gradients(self, x: Tensor, y: Tensor, clip: float) -> tuple[Tensor, Tensor]:
        """Mean over each worker's batch of per-example gradients clipped to norm ``clip``.

        Per-example gradients (Abadi et al. 2016) are computed for chunks of ``self.chunk`` examples
        of the flattened ``h·b`` batch, clipped, and summed into their worker's row, so memory stays
        ``O(chunk · d)`` whatever ``b`` is. Returns ``(G (h, d), losses (h,))``.
        """
        from dpbr.privacy.mechanisms import clip_rows

        h, b = y.shape
        xf, yf = x.reshape(h * b, *x.shape[2:]), y.reshape(h * b)
        owner = torch.arange(h, device=y.device).repeat_interleave(b)
        total = torch.zeros(h, self.dim, dtype=self.theta.dtype, device=self.theta.device)
        loss_sum = torch.zeros(h, dtype=self.theta.dtype, device=self.theta.device)
        params = self.views(self.theta.detach())
        for start in range(0, h * b, self.chunk):
            sl = slice(start, start + self.chunk)
            grads, losses = self._per_example(params, xf[sl], yf[sl])
            rows = clip_rows(self._flatten(grads, losses.shape[0]), clip)
            total.index_add_(0, owner[sl], rows)
            loss_sum.index_add_(0, owner[sl], losses)
        return total / b, loss_sum / b


class PhaseTimer:
    """Seconds per phase of each step; CUDA events on a GPU (no host sync until :meth:`seconds`)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.rows: list[list[Any]] = []
        self._marks: list[Any] = []

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        """Mark the start of a step."""
        self._marks = [self._now()]

    def mark(self) -> None:
        """Mark the end of the current phase."""
        self._marks.append(self._now())

    def end(self) -> None:
        """Finish the current step."""
        self.rows.append(self._marks)

    def seconds(self, rows: int) -> Tensor:
        """``(rows, len(PHASES))`` seconds (synchronises CUDA once)."""
        out = torch.zeros(rows, len(PHASES), dtype=torch.float64)
        if self.cuda:
            torch.cuda.synchronize()
        for i, m in enumerate(self.rows[:rows]):
            if self.cuda:
                out[i] = torch.tensor([m[j].elapsed_time(m[j + 1]) / 1000 for j in range(len(PHASES))])
            else:
                out[i] = torch.tensor([m[j + 1] - m[j] for j in range(len(PHASES))])
        return out


@dataclass
class RunResult:
    """What a run produced: per-step metrics, evaluations, status and facts for the metadata."""

    steps_done: int
    metrics: Tensor                 # (steps_done, len(STEP_COLUMNS)) float64, host
    phase_seconds: Tensor           # (steps_done, len(PHASES)) float64, host
    evaluations: dict[int, tuple[float, float]]  # step -> (test_accuracy, test_loss)
    status: str                     # "completed" | "diverged"
    diverged_at: int | None
    facts: dict[str, Any] = field(default_factory=dict)


class Simulation:
    """Everything one run needs, built once from a :class:`RunSpec` and a loaded dataset."""

    def __init__(self, spec: RunSpec, dataset: Any, device: torch.device, *, strategy: str = "auto",
                 chunk: int = 64) -> None:
        from dpbr import data as data_mod
        from dpbr import models
        from dpbr.privacy import mechanisms
        from dpbr.robust import aggregators, attacks

        self.spec = spec
        self.data = dataset
        self.device = device
        self.dtype = torch.float32
        model = models.build(spec.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                             mean=dataset.mean, std=dataset.std, seed=rng.derive_seed(spec.seed, "model"))
        self.model = model.to(device)
        d = sum(p.numel() for p in self.model.parameters())
        theta = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).to(device, self.dtype)
        self.theta0 = theta.clone()
        self.strategy = choose_strategy(self.model, device, spec.batch_size, d, spec.steps) if strategy == "auto" else strategy
        if self.strategy == "closed-form" and not hasattr(self.model, "worker_gradients"):
            raise UsageError("--grad-strategy", f"closed-form needs a model with a closed-form gradient (logit), not {spec.model}")
        self.oracle = GradientOracle(self.model, models.loss(spec.model), models.per_example_loss(spec.model), theta,
                                     strategy=self.strategy, chunk=chunk)
        self.correct = functools.partial(models.correct, spec.model)
        self.loss = models.loss(spec.model)
        self.rule = aggregators.get(spec.gar)
        self.attack = attacks.get(spec.attack)
        privacy = spec.privacy_spec()
        # Clipping is applied by the simulation itself (batch mode on rows, per-example inside the
        # oracle); the rest of the pipeline (noise, sparsification, quantization) runs on the rows.
        after_clip = "+".join(t for t in (privacy or "").split("+") if t and not t.startswith("clip("))
        self.mechanism = mechanisms.get(after_clip) if after_clip else None
        self.noise_sigma = float(getattr(self.mechanism, "sigma", 0.0) or 0.0) if self.mechanism else 0.0
        h, f_real = spec.honest, spec.byzantine_real
        self.h, self.f_real = h, f_real
        self.dim = d
        # Worker data: index sets per worker (IID: the whole training set for everybody).
        n_train = dataset.y_train.shape[0]
        part_gen = rng.generator(spec.seed, "partition")
        self.worker_indices: list[Tensor] | None = None
        if spec.partition != "iid":
            self.worker_indices = [ix.cpu() for ix in data_mod.partition(
                dataset.y_train.cpu(), spec.workers, spec.partition, generator=part_gen)]
        self.n_train = n_train
        self.batch_gens = rng.worker_generators(spec.seed, "batch", spec.workers)
        noise_dev = device if device.type == "cuda" else "cpu"
        self.noise_gens = rng.worker_generators(spec.seed, "privacy", h, noise_dev)
        self.attack_gen = rng.generator(spec.seed, "attack", None, noise_dev)
        self.gar_gen = rng.generator(spec.seed, "aggregator", None, noise_dev)

    # ------------------------------------------------------------------------------------------- #

    def _sample(self, workers: range) -> Tensor:
        """Indices ``(len(workers), b)`` of the training examples each worker draws this step."""
        b = self.spec.batch_size
        rows = []
        for w in workers:
            if self.worker_indices is None:
                rows.append(torch.randint(self.n_train, (b,), generator=self.batch_gens[w]))
            else:
                own = self.worker_indices[w]
                rows.append(own[torch.randint(own.shape[0], (b,), generator=self.batch_gens[w])])
        return torch.stack(rows).to(self.device)

    def _gradients(self, idx: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.data.x_train[idx]
        y = self.data.y_train[idx] if labels is None else labels
        spec = self.spec
        if spec.clip is not None and spec.clip_mode == "per-example":
            return self.oracle.clipped_per_example_gradients(x, y, spec.clip)
        grads, losses = self.oracle.batch_gradients(x, y)
        if spec.clip is not None:
            from dpbr.privacy.mechanisms import clip_rows

            grads = clip_rows(grads, spec.clip)
        return grads, losses

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

    def run(self, *, progress: Callable[[int, float | None], None] | None = None,
            checkpoint: Callable[[int, Tensor], None] | None = None,
            checkpoint_steps: frozenset[int] = frozenset()) -> RunResult:
        """Run ``spec.steps`` steps; returns the records (see :data:`STEP_COLUMNS`)."""
        spec, dev = self.spec, self.device
        steps, h, f_real = spec.steps, self.h, self.f_real
        theta = self.oracle.theta
        momentum_buf = torch.zeros_like(theta)
        worker_mom = torch.zeros(h, self.dim, dtype=self.dtype, device=dev) if spec.worker_momentum > 0 else None
        metrics = torch.full((steps, len(STEP_COLUMNS)), math.nan, dtype=torch.float64, device=dev)
        timer = PhaseTimer(dev)
        evaluations: dict[int, tuple[Tensor, Tensor]] = {}
        gar_state: Any = None
        attack_state: Any = None
        nan = torch.tensor(math.nan, dtype=torch.float64, device=dev)
        status, diverged_at, done = "completed", None, 0
        check_every = 10 if dev.type == "cpu" else 25
        if checkpoint is not None and 0 in checkpoint_steps:
            checkpoint(0, theta)
        if spec.eval_every > 0:
            evaluations[0] = self.evaluate()
        last_acc: float | None = float(evaluations[0][0]) if 0 in evaluations else None
        for s in range(steps):
            timer.start()
            idx = self._sample(range(h))
            timer.mark()
            honest, losses = self._gradients(idx)
            timer.mark()
            clean = honest
            if worker_mom is not None:
                worker_mom = spec.worker_momentum * worker_mom + (1 - spec.worker_momentum) * honest
                honest = worker_mom
            sent = self.mechanism(honest, generator=self.noise_gens) if self.mechanism is not None else honest
            timer.mark()
            byz = None
            if f_real > 0:
                own = None
                if self.attack.needs_own_gradients:
                    bidx = self._sample(range(h, spec.workers))
                    labels = self.attack.label_map(self.data.y_train[bidx], self.data.num_classes)
                    own, _ = self._gradients(bidx, labels)
                forged = self.attack.forge(sent, f_real, aggregator=self.rule, generator=self.attack_gen,
                                           own=own, state=attack_state)
                byz, attack_state = forged.value, forged.state
                stacked = torch.cat([sent, byz.to(sent.dtype)], dim=0)
            else:
                stacked = sent
            timer.mark()
            agg = self.rule.aggregate(stacked, spec.byzantine, generator=self.gar_gen, state=gar_state)
            gar_state = agg.state
            timer.mark()
            g = agg.value
            momentum_buf.mul_(spec.momentum).add_(g)
            theta.add_(momentum_buf, alpha=-spec.lr)
            metrics[s] = self._step_metrics(losses, clean, sent, g, byz, agg.selected, theta, nan)
            timer.mark()
            timer.end()
            done = s + 1
            if (s + 1) % check_every == 0 or s + 1 == steps:
                # The honest loss and the aggregate norm are finite at every step of a healthy run;
                # θ stays finite as long as every aggregate was.
                window = metrics[max(0, s + 1 - check_every):s + 1][:, _DIVERGENCE_COLUMNS]
                if not bool(torch.isfinite(window).all()):
                    status = "diverged"
                    rows = torch.isfinite(metrics[:s + 1][:, _DIVERGENCE_COLUMNS]).all(1)
                    diverged_at = int((~rows).nonzero()[0, 0]) + 1
                    done = diverged_at
                    break
            step_no = s + 1
            if step_no in checkpoint_steps and checkpoint is not None:
                checkpoint(step_no, theta)
            if spec.eval_every > 0 and (step_no % spec.eval_every == 0 or step_no == steps):
                evaluations[step_no] = self.evaluate()
                last_acc = float(evaluations[step_no][0]) if progress is not None else None
            if progress is not None:
                progress(step_no, last_acc)
        if status == "completed" and spec.eval_every == 0:
            evaluations[done] = self.evaluate()
        evals = {k: (float(a), float(l)) for k, (a, l) in evaluations.items() if k <= done}
        return RunResult(
            steps_done=done,
            metrics=metrics[:done].cpu(),
            phase_seconds=timer.seconds(done).clone(),
            evaluations=evals,
            status=status,
            diverged_at=diverged_at,
            facts={"strategy": self.strategy, "dim": self.dim, "noise_sigma": self.noise_sigma},
        )

    def _step_metrics(self, losses: Tensor, clean: Tensor, sent: Tensor, agg: Tensor, byz: Tensor | None,
                      selected: Tensor | None, theta: Tensor, nan: Tensor) -> Tensor:
        """One row of :data:`STEP_COLUMNS` (on the device; no host sync).

        Norms and cosines of the honest mean ḡ, the aggregate, the Byzantine mean and θ − θ₀ come
        from one small Gram matrix of those vectors (few kernel launches for small models, one pass
        over memory for large ones); deviations from the centred rows (no cancellation).
        """
        h = sent.shape[0]
        mean_sent = sent.mean(0)
        has_byz = byz is not None and byz.shape[0] > 0
        rows = [mean_sent, agg, byz.mean(0).to(agg.dtype) if has_byz else mean_sent, theta - self.theta0]
        if clean is not sent:
            mean_clean = clean.mean(0)
            rows.append(mean_clean)
        stacked = torch.stack(rows)
        gram = (stacked @ stacked.T).double()
        norms = gram.diagonal().clamp_min(0).sqrt()
        cos_h = gram[0, 1] / (norms[0] * norms[1])
        cos_a = gram[1, 2] / (norms[1] * norms[2]) if has_byz else nan
        dev_sent = _deviation(sent, mean_sent, h)
        if clean is not sent:
            norm_clean, dev_clean = norms[4], _deviation(clean, mean_clean, h)
        else:
            norm_clean, dev_clean = norms[0], dev_sent
        sel = selected[h:].double().mean() if selected is not None and has_byz else nan
        return torch.stack([losses.double().mean(), norms[0], dev_sent, dev_sent / norms[0], norm_clean, dev_clean,
                            norms[1], cos_h, cos_a, norms[3], sel])


def _deviation(rows: Tensor, mean: Tensor, h: int) -> Tensor:
    """``sqrt(Σ_i ‖g_i − ḡ‖² / (h − 1))`` (NaN for a single row): the Frobenius norm of the centred rows."""
    if h < 2:
        return torch.tensor(math.nan, dtype=torch.float64, device=rows.device)
    return torch.linalg.vector_norm(rows - mean).double() / math.sqrt(h - 1)
