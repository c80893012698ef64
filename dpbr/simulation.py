"""The simulated parameter server: one :class:`RunSpec` → per-step records.

One step (the setting of Guerraoui, Gupta, Pinot, Rouault and Stephan 2021, "Differential privacy and
Byzantine resilience in SGD: do they add up?", arXiv 2102.08166, and of its public code):

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
copied to the host once at the end (no host sync per step; the divergence check reads one flag every
10 steps on the CPU, 25 on CUDA, or once per window for small models — a diverged run is cut at its
first non-finite step either way).

Speed. A step reuses preallocated buffers (:class:`StepBuffers`): the privacy pipeline writes
the vectors sent straight into rows ``0..h-1`` of the ``(n, d)`` matrix the rule aggregates and the
attack's rows are copied under them, so no ``(n, d)`` tensor is allocated or concatenated per step. For
small models (``n·d ≤`` :data:`WINDOW_MAX_ENTRIES`, e.g. the logistic model, ``d = 69``) a step costs
per-operation overhead (5–10 µs per tensor operation on the 2-core CPU sandbox) rather than
arithmetic, so the buffers hold a *window* of :data:`WINDOW_STEPS` steps and the metrics of the whole
window are computed by one batched call of :func:`window_metrics` (about 55 operations per window
instead of about 40 per step), and the logistic model's gradients come from
:class:`LogisticGradients` (the model's closed form without its per-step normalisation). Large models
use a window of one step. Trajectories (θ at every step) are bit-identical to the straightforward
loop; the windowed metrics may differ from per-step ones in the last float32 bit (batched products).
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
from dpbr.robust._geometry import compute_view
from dpbr.errors import UsageError
from dpbr.spec import RunSpec
from dpbr.step_metrics import STEP_COLUMNS, distinct_gram, gram_step_metrics, window_metrics

__all__ = ["GradientOracle", "RunResult", "Simulation", "STEP_COLUMNS", "StepBuffers", "WINDOW_MAX_ENTRIES",
           "choose_strategy", "window_metrics"]

_DIVERGENCE_COLUMNS = [STEP_COLUMNS.index("train_loss"), STEP_COLUMNS.index("aggregate_norm")]

#: Seconds spent per phase of a step: ``data`` draws the example indices and gathers the batch;
#: ``gradient`` computes the per-worker gradients (and nothing else, except per-example clipping,
#: which is part of that computation); ``privacy`` clips (batch mode), applies worker momentum and
#: the privacy mechanisms; ``attack`` forges the Byzantine vectors; ``aggregate`` runs the rule;
#: ``update`` takes the momentum step and records the metrics.
PHASES: tuple[str, ...] = ("data", "gradient", "privacy", "attack", "aggregate", "update")

#: Largest ``n·d`` for which a window of steps is buffered and its metrics computed in one batched call
#: (see the module docstring); larger models compute the metrics of every step at once.
WINDOW_MAX_ENTRIES = 1 << 16

#: Steps per window for small models (the divergence check then runs at the end of each window).
WINDOW_STEPS = 50


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

    def _flatten(self, grads: dict[str, Tensor] | tuple[Tensor, ...], rows: int, out: Tensor | None = None) -> Tensor:
        parts = grads.values() if isinstance(grads, dict) else grads
        return torch.cat([g.reshape(rows, -1) for g in parts], dim=1, out=out)

    def batch_gradients(self, x: Tensor, y: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mini-batch gradients: ``x`` (h, b, ...) and ``y`` (h, b) → ``(G (h, d), losses (h,))``.

        ``out``, when given, is an ``(h, d)`` tensor the gradients are written to (and returned); it
        saves allocating ``G`` at every step of a large model.
        """
        h = x.shape[0]
        if self.strategy == "closed-form":
            grads, losses = self.model.worker_gradients(x, y)
            return (grads if out is None else out.copy_(grads)), losses
        if self.strategy == "vmap":
            params = self.views(self.theta.detach())
            grads, losses = self._vmapped(params, x, y)
            return self._flatten(grads, h, out), losses
        plist = list(self.model.parameters())
        if out is None:
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


class LogisticGradients:
    """Closed-form per-worker gradients of the logistic model straight from example indices.

    The operations of :meth:`dpbr.models.Logit.worker_gradients`, in the same order — so the same bits
    (``tests/test_train.py`` checks it) — minus the work that does not change between steps: the
    inputs of the whole training split are normalised once (normalisation is elementwise, so
    gathering normalised rows gives the same numbers) and the labels converted to floats once; the
    batch product runs as one ``bmm`` (what ``einsum("hb,hbd->hd")`` reduces to) and the result is
    written into the caller's buffer. At ``d = 69`` a step is per-operation overhead, and this halves
    the operations of the gradient phase.

    With ``z = w·x + b``, ``ŷ = σ(z)`` and ``L = (1/b) Σ_i (ŷ_i − y_i)²``:
    ``∂L/∂z_i = (2/b)(ŷ_i − y_i) ŷ_i (1 − ŷ_i)``, ``∇_w L = Σ_i ∂L/∂z_i x_i``, ``∇_b L = Σ_i ∂L/∂z_i``.
    """

    def __init__(self, model: nn.Module, x_train: Tensor, y_train: Tensor) -> None:
        with torch.no_grad():
            self.inputs = model.normalize(x_train.reshape(x_train.shape[0], -1)).contiguous()
        self.targets = y_train.to(self.inputs.dtype)
        self.weight = model.linear.weight.detach().reshape(-1)  # views of θ: follow its updates
        self.bias = model.linear.bias.detach()
        self.features = self.inputs.shape[1]
        self._one = torch.ones((), dtype=self.inputs.dtype, device=self.inputs.device)
        self._two_over: dict[int, Tensor] = {}

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """Whether ``model`` is the logistic model this closed form is written for."""
        from dpbr.models import Logit

        return isinstance(model, Logit)

    def gather(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised inputs ``(h, b, D)`` and float labels ``(h, b)`` of the examples ``idx`` ``(h, b)``."""
        flat = idx.reshape(-1)
        return (self.inputs.index_select(0, flat).view(*idx.shape, self.features),
                self.targets.index_select(0, flat).view(idx.shape))

    def __call__(self, x: Tensor, y: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(G (h, d), losses (h,))`` for the gathered batch ``(x, y)`` (:meth:`gather`); ``G`` written to
        ``out`` if given. ``y`` may also be integer 0/1 labels (same numbers)."""
        b = y.shape[1]
        if b not in self._two_over:  # constants as 0-d tensors: same numbers, no per-call conversion
            self._two_over[b] = torch.tensor(2.0 / b, dtype=self.inputs.dtype, device=self.inputs.device)
        h = y.shape[0]
        # ``x @ w`` of a (h, b, D) batch is this matrix-vector product (without matmul's reshaping layers)
        prob = torch.sigmoid(torch.mv(x.reshape(h * b, self.features), self.weight).view(h, b) + self.bias)
        err = prob - y
        dz = self._two_over[b] * err * prob * (self._one - prob)
        grads = torch.cat([torch.bmm(dz.unsqueeze(1), x).squeeze(1), dz.sum(1, keepdim=True)], dim=1, out=out)
        return grads, err.pow(2).mean(1)


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
        self.logistic = (LogisticGradients(self.model, dataset.x_train, dataset.y_train)
                         if self.strategy == "closed-form" and LogisticGradients.applies(self.model) else None)
        # the fast path computes batch-mode (or no) clipping; per-example clipping needs the oracle
        self._fast_logistic = self.logistic is not None and (spec.clip is None or spec.clip_mode == "batch")
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
        # Worker data. IID: everybody samples from the whole training set. Non-IID (shards, Dirichlet):
        # the training set is split among the h honest workers only (all n when f_real = 0), as in the
        # code of Karimireddy, He & Jaggi (2022, arXiv 2006.09365), so every example belongs to exactly
        # one honest worker; the Byzantine workers that compute on data (label flipping) sample IID
        # from the whole set (worker_indices has h rows only, see _data_of).
        n_train = dataset.y_train.shape[0]
        part_gen = rng.generator(spec.seed, "partition")
        self.worker_indices: list[Tensor] | None = None
        labels = dataset.y_train.cpu()
        if spec.partition != "iid":
            self.worker_indices = [ix.cpu() for ix in data_mod.partition(labels, h, spec.partition, generator=part_gen)]
        #: ``(h, classes)`` int64: how many training examples of each class each honest worker holds
        #: (IID: every row is the whole set's histogram); recorded in the run's metadata.
        classes = max(int(dataset.num_classes), int(labels.max()) + 1 if labels.numel() else 0)
        if self.worker_indices is None:
            self.honest_class_counts = torch.bincount(labels, minlength=classes).expand(h, -1).clone()
        else:
            self.honest_class_counts = torch.stack(
                [torch.bincount(labels.index_select(0, ix), minlength=classes) for ix in self.worker_indices])
        self.n_train = n_train
        self.input_size = math.prod(dataset.x_train.shape[1:])
        self.batch_gens = rng.worker_generators(spec.seed, "batch", spec.workers)
        noise_dev = device if device.type == "cuda" else "cpu"
        self.noise_gens = rng.worker_generators(spec.seed, "privacy", h, noise_dev)
        self.attack_gen = rng.generator(spec.seed, "attack", None, noise_dev)
        self.gar_gen = rng.generator(spec.seed, "aggregator", None, noise_dev)

    # ------------------------------------------------------------------------------------------- #

    def _data_of(self, worker: int) -> Tensor | None:
        """The training indices worker ``worker`` samples from, or None for the whole set (IID
        partition, or a Byzantine worker ``worker >= h`` under a non-IID one)."""
        if self.worker_indices is None or worker >= len(self.worker_indices):
            return None
        return self.worker_indices[worker]

    def _sample(self, workers: range, out: Tensor | None = None) -> Tensor:
        """Indices ``(len(workers), b)`` of the training examples each worker draws this step.

        Row ``i`` comes from worker ``workers[i]``'s own generator (the same draws with or without
        ``out``, a CPU int64 buffer that saves the per-step allocation and stacking): from its share
        of the data (:meth:`_data_of`), or IID from the whole training set.
        """
        b = self.spec.batch_size
        rows = torch.empty(len(workers), b, dtype=torch.int64) if out is None else out
        for row, w in zip(rows.unbind(0), workers):
            own = self._data_of(w)
            if own is None:
                torch.randint(self.n_train, (b,), generator=self.batch_gens[w], out=row)
            else:
                torch.index_select(own, 0, torch.randint(own.shape[0], (b,), generator=self.batch_gens[w]), out=row)
        return rows.to(self.device)

    def _sample_window(self, workers: range, count: int, scratch: Tensor, out: Tensor) -> Tensor:
        """The indices of the next ``count`` steps at once: ``out[:count]`` ``(count, len(workers), b)``.

        Worker ``i`` draws its ``count·b`` indices in one call of its own generator — the same
        numbers, in the same order, as ``count`` calls of :meth:`_sample` (``torch.randint`` fills
        serially from the generator; checked in ``tests/test_train.py``) — into ``scratch[i]``
        (``(len(workers), window, b)``); one copy puts them in step-major order. Saves ``len(workers)``
        generator calls per step for small models.
        """
        b = self.spec.batch_size
        for block, w in zip(scratch.unbind(0), workers):
            block = block[:count]
            own = self._data_of(w)
            if own is None:
                torch.randint(self.n_train, (count, b), generator=self.batch_gens[w], out=block)
            else:
                drawn = torch.randint(own.shape[0], (count * b,), generator=self.batch_gens[w])
                torch.index_select(own, 0, drawn, out=block.view(-1))
        out[:count].copy_(scratch[:, :count].transpose(0, 1))
        return out[:count].to(self.device)

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
        spec = self.spec
        if self._fast_logistic:
            return self.logistic(x, y, out=out)  # type: ignore[misc]
        if spec.clip is not None and spec.clip_mode == "per-example":
            grads, losses = self.oracle.clipped_per_example_gradients(x, y, spec.clip)
            return (grads if out is None else out.copy_(grads)), losses
        raw, losses = self.oracle.batch_gradients(x, y, out=out)
        return (raw if out is None or raw is out else out.copy_(raw)), losses

    def _clip(self, grads: Tensor) -> Tensor:
        """Clip each row of ``grads`` (a buffer of the simulation's) to norm ``C`` in place (batch mode)."""
        if self.spec.clip is not None and self.spec.clip_mode == "batch":
            from dpbr.privacy.mechanisms import clip_rows

            clip_rows(grads, self.spec.clip, out=grads)
        return grads

    def _gradients(self, idx: Tensor, labels: Tensor | None = None, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Clipped gradients ``(h, d)`` (written to ``out`` when given) and losses ``(h,)`` of the batches ``idx``."""
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
        momentum_buf = torch.zeros_like(theta)
        worker_mom = torch.zeros(h, self.dim, dtype=self.dtype, device=dev) if spec.worker_momentum > 0 else None
        metrics = torch.full((steps, len(STEP_COLUMNS)), math.nan, dtype=torch.float64, device=dev)
        timer = PhaseTimer(dev)
        evaluations: dict[int, tuple[Tensor, Tensor]] = {}
        gar_state: Any = None
        attack_state: Any = None
        status, diverged_at, done = "completed", None, 0
        small = (h + f_real) * self.dim <= WINDOW_MAX_ENTRIES
        window = WINDOW_STEPS if small else 1
        check_every = WINDOW_STEPS if small else 10 if dev.type == "cpu" else 25
        buf = StepBuffers(window, h, f_real, self.dim, spec.batch_size, self.dtype, dev,
                          clean=self.mechanism is not None or worker_mom is not None,
                          selected=self.rule.selects and f_real > 0)
        mechanism, attack, rule = self.mechanism, self.attack, self.rule
        momentum = torch.tensor(spec.momentum, dtype=self.dtype, device=dev)  # 0-d: no conversion per step
        # the rule's Gram matrix over the h + 1 distinct rows when the attack sends f copies of one
        # vector (ALIE, IPM, …): worth it for large models only (for small ones a step is per-operation
        # overhead, and the expansion adds two operations)
        share_gram = rule.uses_gram and f_real > 1 and not small
        # and the step's metrics from it where the aggregate is the mean of the selected rows (on the
        # CPU: the precision checks read the small matrix on the host); large models have windows of
        # one step, so a step that falls back to the vectors never mixes with one that did not
        metrics_from_gram = share_gram and rule.averages_selected and dev.type == "cpu"
        if checkpoint is not None and 0 in checkpoint_steps:
            checkpoint(0, theta)
        if spec.eval_every > 0:
            evaluations[0] = self.evaluate()
        last_acc: float | None = float(evaluations[0][0]) if 0 in evaluations else None
        honest_workers = range(h)
        idx_window, batch_window = buf.idx, None
        for s in range(steps):
            k = s % window
            slot = buf.slots[k]
            stacked, sent, clean = slot.stacked, slot.sent, slot.clean
            timer.start()
            if k == 0:
                count = min(window, steps - s)
                idx_window = self._sample_window(honest_workers, count, buf.idx_scratch, buf.idx)
                # small batches: gather the whole window's examples at once too
                batch_window = self._batch(idx_window) if window > 1 and idx_window.numel() * self.input_size <= (1 << 22) else None
            x, y = (batch_window[0][k], batch_window[1][k]) if batch_window is not None else self._batch(idx_window[k])
            timer.mark()
            _, losses = self._raw_gradients(x, y, out=clean)
            timer.mark()
            honest = self._clip(clean)
            if worker_mom is not None:
                worker_mom = spec.worker_momentum * worker_mom + (1 - spec.worker_momentum) * clean
                honest = worker_mom
            if mechanism is not None:
                mechanism(honest, generator=self.noise_gens, out=sent)
            elif honest is not sent:
                sent.copy_(honest)
            timer.mark()
            if f_real > 0:
                own = None
                if attack.needs_own_gradients:
                    bidx = self._sample(range(h, spec.workers))
                    labels = attack.label_map(self.data.y_train[bidx], self.data.num_classes)
                    own, _ = self._gradients(bidx, labels)
                target = ServerRule(rule, spec.byzantine, gar_state) if attack.needs_aggregator else None
                forged = attack.forge(sent, f_real, aggregator=target, generator=self.attack_gen,
                                      own=own, state=attack_state, out=slot.byz)
                attack_state = forged.state
            timer.mark()
            gram, gram_distinct = copies_gram(stacked, h) if share_gram and forged.copies else (None, None)
            agg = rule.aggregate(stacked, spec.byzantine, generator=self.gar_gen, state=gar_state, gram=gram)
            gar_state = agg.state
            timer.mark()
            momentum_buf.mul_(momentum).add_(agg.value)
            theta.add_(momentum_buf, alpha=-spec.lr)
            row = None
            if gram_distinct is not None and metrics_from_gram:
                torch.sub(theta, self.theta0, out=slot.displacement)
                row = gram_step_metrics(losses, gram_distinct, agg.selected, clean if buf.clean is not None else None,
                                        slot.displacement, mean_out=buf.vectors[0, 0], scratch=buf.scratch[0])
            if row is not None:
                metrics[s:s + 1] = row
            else:
                buf.record(k, losses, agg.value, agg.selected, theta, self.theta0)
                if k == window - 1 or s + 1 == steps:
                    metrics[s - k:s + 1] = buf.metrics(k + 1)
            timer.mark()
            timer.end()
            done = s + 1
            if (s + 1) % check_every == 0 or s + 1 == steps:
                # The honest loss and the aggregate norm are finite at every step of a healthy run;
                # θ stays finite as long as every aggregate was.
                window_rows = metrics[max(0, s + 1 - check_every):s + 1][:, _DIVERGENCE_COLUMNS]
                if not bool(torch.isfinite(window_rows).all()):
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


def copies_gram(G: Tensor, h: int) -> tuple[Tensor, Tensor]:
    """``G Gᵀ`` of an ``(n, d)`` stack whose rows ``h, …, n − 1`` are copies of row ``h``, from its
    first ``h + 1`` rows: ``(K, K_distinct)`` — ``K`` the ``n × n`` matrix for the rule (in ``G``'s
    compute precision, float32 for float32 rows), ``K_distinct`` the float64 ``(h + 1) × (h + 1)``
    Gram matrix of the distinct rows (:func:`dpbr.step_metrics.distinct_gram`), from which the step's
    metrics follow (:func:`dpbr.step_metrics.gram_step_metrics`).

    ``(h + 1)²`` instead of ``n²`` products of ``d``-vectors: 7² against 11² for the study's
    ``n = 11, f = 5`` (the one costly operation of MDA at d = 431,080). Entries between copies are
    those of row ``h`` with itself, so distances between copies are exactly 0.
    """
    n = G.shape[0]
    X = compute_view(G)
    K64 = distinct_gram(X, h)
    idx = _copies_index(n, h, K64.device)
    return K64.to(X.dtype).index_select(0, idx).index_select(1, idx), K64


@functools.lru_cache(maxsize=16)
def _copies_index(n: int, h: int, device: torch.device) -> Tensor:
    """``[0, 1, …, h − 1, h, h, …, h]`` (``n`` entries): row ``i`` of the stack is row ``idx[i]`` of
    its first ``h + 1`` rows (a constant, cached per device)."""
    return torch.tensor([*range(h), *([h] * (n - h))], dtype=torch.long, device=device)


@dataclass
class _Slot:
    """Views of one step's slot of :class:`StepBuffers` (made once: indexing costs an operation)."""

    stacked: Tensor
    sent: Tensor
    byz: Tensor
    clean: Tensor
    displacement: Tensor


class StepBuffers:
    """The tensors a run reuses at every step, for a window of ``window`` steps (slot ``k`` = step
    ``s mod window``); nothing of size ``(n, d)`` is allocated per step.

    Attributes
    ----------
    stacked : Tensor (window, n, d)
        Slot ``k`` is what the rule aggregates: rows ``0..h-1`` the vectors the honest workers sent
        (written there by the privacy pipeline), rows ``h..n-1`` the Byzantine vectors.
    clean : Tensor (window, h, d) or None
        The clipped honest gradients before the privacy mechanisms, when something (a mechanism,
        worker momentum) lies between them and what is sent; ``None`` otherwise (the gradients are
        then clipped straight into ``stacked``).
    vectors : Tensor (window, m, d)
        Per step the vectors whose norms and cosines are recorded: honest mean sent, aggregate,
        Byzantine mean, ``θ − θ₀`` and (``m = 5``, with ``clean``) the honest mean before privacy.
    losses : Tensor (window, h); selected : Tensor (window, n) bool or None
        Filled by :meth:`record` (one step) or :meth:`metrics` (a window: the steps' own tensors are
        kept until then and stacked once, instead of three copies per step).
    idx, idx_scratch : Tensor (window, h, b) and (h, window, b) int64 (CPU)
        The example indices of the window's steps, drawn once per window (:meth:`Simulation._sample_window`).
    slots : list of per-step views of the above (``slots[k].sent``, ``.byz``, ``.clean``, ``.aggregate``, …)
    scratch : Tensor (window, h, d)
        Work space for the centred rows of the deviations.
    """

    def __init__(self, window: int, h: int, f: int, dim: int, batch_size: int, dtype: torch.dtype,
                 device: torch.device, *, clean: bool, selected: bool) -> None:
        n = h + f
        self.window, self.h, self.f = window, h, f
        # every entry is written in its step before it is read (uninitialised memory costs nothing:
        # zeroing the (n, d) buffers of a large model took 25 ms)
        self.stacked = torch.empty(window, n, dim, dtype=dtype, device=device)
        self.clean = torch.empty(window, h, dim, dtype=dtype, device=device) if clean else None
        self.vectors = torch.empty(window, 5 if clean else 4, dim, dtype=dtype, device=device)
        self.scratch = torch.empty(window, h, dim, dtype=dtype, device=device)
        self.losses = torch.zeros(window, h, dtype=dtype, device=device)
        self.selected = torch.zeros(window, n, dtype=torch.bool, device=device) if selected else None
        self.idx = torch.empty(window, h, batch_size, dtype=torch.int64)
        self.idx_scratch = torch.empty(h, window, batch_size, dtype=torch.int64)
        #: per-slot views (``slots[k].sent`` is ``stacked[k, :h]``, …), made once
        self.slots = [
            _Slot(stacked=self.stacked[k], sent=self.stacked[k, :h], byz=self.stacked[k, h:],
                  clean=self.stacked[k, :h] if self.clean is None else self.clean[k],
                  displacement=self.vectors[k, 3])
            for k in range(window)
        ]
        self._kept: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def record(self, k: int, losses: Tensor, aggregate: Tensor, selected: Tensor | None, theta: Tensor,
               theta0: Tensor) -> None:
        """Keep what step ``k`` of the window needs for its metrics besides ``stacked`` and ``clean``.

        ``θ − θ₀`` is written now (θ changes in place); the step's losses, aggregate and selection
        are fresh tensors of the step, kept as they are until :meth:`metrics` (copied now for a
        window of one step, whose buffers are reused at once).
        """
        torch.sub(theta, theta0, out=self.slots[k].displacement)
        if self.window == 1:
            self.losses[0].copy_(losses)
            self.vectors[0, 1].copy_(aggregate)
            if self.selected is not None and selected is not None:
                self.selected[0].copy_(selected)
        else:
            if k == 0:
                self._kept.clear()
            self._kept.append((losses, aggregate, selected))

    def metrics(self, count: int) -> Tensor:
        """``(count, len(STEP_COLUMNS))`` float64 rows of the first ``count`` slots (:func:`window_metrics`)."""
        h = self.h
        if self.window > 1:
            kept = self._kept[:count]
            torch.stack([t[0] for t in kept], out=self.losses[:count])
            self.vectors[:count, 1] = torch.stack([t[1] for t in kept])
            if self.selected is not None and all(t[2] is not None for t in kept):
                torch.stack([t[2] for t in kept], out=self.selected[:count])  # type: ignore[misc]
        return window_metrics(
            self.losses[:count], self.stacked[:count, :h],
            None if self.clean is None else self.clean[:count],
            self.stacked[:count, h:] if self.f > 0 else None,
            None if self.selected is None else self.selected[:count],
            self.vectors[:count], scratch=self.scratch[:count])
