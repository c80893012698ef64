"""How the honest workers' gradients are computed: the strategy policy and the two oracles.

:func:`choose_strategy` is the one rule that picks the computation (``closed-form``, ``vmap`` or
``loop``) for a model, a device and a batch size — for the training run and for the VN measurement
(:mod:`dpbr.vn.measure`). :class:`GradientOracle` computes per-worker gradients of any model on
stacked mini-batches, with that strategy; :class:`LogisticGradients` is the logistic model's closed
form, taken straight from example indices (the fast path of a training step at ``d = 69``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["GradientOracle", "LogisticGradients", "VMAP_MIN_STEPS", "choose_strategy"]

#: Fewest steps of a CPU run for which ``vmap`` repays the cost of its first call (see
#: :func:`choose_strategy`).
VMAP_MIN_STEPS = 200


def choose_strategy(model: nn.Module, device: torch.device, batch_size: int, dim: int,
                    steps: int | None = None) -> str:
    """Pick how honest gradients are computed: ``"closed-form"``, ``"vmap"`` or ``"loop"``.

    Measured on the 2-core CPU sandbox (CNN, d = 431,080, h = 6, ms per step of gradients, one
    process alone): b = 10: loop 59, vmap 38; b = 50: loop 196, vmap 216; b = 100: loop 343, vmap
    376; b = 500: loop 1,839, vmap 5,874. Logistic model (d = 69): vmap 1.3 ms, loop 2.4 ms,
    closed form (:meth:`dpbr.models.Logit.worker_gradients`) 0.05 ms. The first ``vmap`` call of a
    process also imports TorchDynamo (3–15 s here), so a short run does better with the loop.
    Hence: the closed form where the model has one; on the CPU vmap while ``b·d ≤ 10⁷`` (and, when
    ``steps`` is given, the run is long enough — at least :data:`VMAP_MIN_STEPS` steps — to repay
    the import), a loop of backward passes otherwise; on CUDA vmap (one batched kernel per layer
    instead of h launches).

    Parameters
    ----------
    model : nn.Module
        The model; one with a ``worker_gradients`` method has a closed form.
    device : torch.device
        Where the gradients are computed.
    batch_size, dim : int
        Examples per mini-batch ``b`` and parameters ``d``.
    steps : int, optional
        How many steps the gradients serve (a training run's ``--steps``). ``None`` sets no
        length condition (the VN measurement's choice, :func:`dpbr.vn.measure.measure`).

    Returns
    -------
    str
        ``"closed-form"``, ``"vmap"`` or ``"loop"``.
    """
    if hasattr(model, "worker_gradients"):
        return "closed-form"
    if device.type == "cuda":
        return "vmap"
    long_enough = steps is None or steps >= VMAP_MIN_STEPS
    return "vmap" if batch_size * dim <= 10_000_000 and long_enough else "loop"


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
        self._stacked: Callable[..., tuple[dict[str, Tensor], Tensor]] | None = None  # made on first use

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

    def stacked_batch_gradients(self, thetas: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mini-batch gradients of ``S`` parameter vectors at once (the members of a
        :class:`~dpbr.simulation.batch.SeedBatch`): ``thetas`` (S, d), ``x`` (S, h, b, ...) and ``y``
        (S, h, b) → ``(G (S, h, d), losses (S, h))``.

        ``torch.func.vmap`` over the ``S`` vectors of the per-worker ``vmap`` of :meth:`batch_gradients`:
        one batched kernel per layer for all ``S·h`` workers. Row ``s`` equals :meth:`batch_gradients`
        at ``thetas[s]`` up to the float32 rounding of reordered sums (batched kernels).
        """
        if self._stacked is None:
            self._stacked = torch.func.vmap(self._vmapped, in_dims=(0, 0, 0))
        S, h = thetas.shape[0], x.shape[1]
        params, offset = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            params[name] = thetas[:, offset:offset + size].reshape(S, *shape)
            offset += size
        grads, losses = self._stacked(params, x, y)
        return torch.cat([g.reshape(S, h, -1) for g in grads.values()], dim=2), losses

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
