r"""Gradient matching: the objective every gradient-inversion attack here minimises.

The attacker knows the model (parameters :math:`\theta`, architecture, training loss :math:`\ell`) and
the gradient the worker shared, :math:`g^* = \tilde\nabla_\theta \frac1B\sum_i \ell(f_\theta(x_i), y_i)`
(possibly altered by a defence). It looks for dummy images :math:`\hat x` (and, for DLG, dummy soft
labels :math:`\hat y = \mathrm{softmax}(\hat\ell)`) whose gradient matches:

* ``distance="l2"`` (DLG, Zhu et al. 2019):
  :math:`D = \sum_{\text{layers}} \lVert \nabla_\theta \ell(f(\hat x), \hat y) - g^* \rVert_2^2`;
* ``distance="cosine"`` (Inverting Gradients, Geiping et al. 2020):
  :math:`D = 1 - \langle \hat g, g^*\rangle / (\lVert \hat g\rVert\,\lVert g^*\rVert)` over the
  concatenation of all layers' gradients, plus :math:`\alpha\,\mathrm{TV}(\hat u)` with
  :math:`\mathrm{TV}(u) = \mathrm{mean}|u_{:,:,:,j+1} - u_{:,:,:,j}| + \mathrm{mean}|u_{:,:,i+1,:} - u_{:,:,i,:}|`.

Variables
---------
The optimisation variable of one *restart* is a flat vector ``z = [u.flatten(), l.flatten()]`` with
``u`` the ``B`` dummy images in the model's *normalised input space* (``x = mean + std · u``; the
model computes ``(x − mean)/std = u``), and ``l`` the dummy label logits (DLG's soft label) when the
labels are not fixed. So ``u ~ N(0, 1)`` is DLG's and IG's ``randn`` initialisation of the network's
input whatever the dataset's normalisation (with no normalisation ``u = x``).

Batching over restarts
----------------------
:meth:`GradientMatching.value_and_grad` evaluates ``k`` restarts at once and returns one value and
one gradient per restart. The restarts are *independent problems*: restart ``r``'s value depends
only on ``z_r``, so the gradient of their sum is exactly the stack of per-restart gradients. Two
evaluation strategies give the same numbers:

* ``"loop"``: plain autograd (``create_graph=True`` double backward) per restart — fastest for one
  restart on a CPU;
* ``"vmap"``: ``torch.func.vmap`` over restarts of ``grad_and_value`` of a function that itself takes
  ``torch.func.grad`` of the training loss — one batched kernel per layer for all restarts (grouped
  convolutions), better for several restarts, especially on a GPU.

``"auto"`` picks ``analytic`` where it applies (:func:`dpbr.inversion.closed_form.supports`), else
``loop`` for one restart and ``vmap`` for several.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GradientMatching", "total_variation", "infer_labels", "last_layer_weight"]

DISTANCES = ("l2", "cosine")
STRATEGIES = ("auto", "analytic", "loop", "vmap")


def total_variation(u: Tensor) -> Tensor:
    r"""Anisotropic total variation of Inverting Gradients (Geiping et al. 2020, ``inversefed.metrics``):
    :math:`\mathrm{mean}|\Delta_x u| + \mathrm{mean}|\Delta_y u|` over a ``(..., C, H, W)`` tensor."""
    dx = (u[..., :, :, 1:] - u[..., :, :, :-1]).abs().mean()
    dy = (u[..., :, 1:, :] - u[..., :, :-1, :]).abs().mean()
    return dx + dy


def last_layer_weight(model: nn.Module, num_classes: int) -> int:
    """Index (in ``model.parameters()`` order) of the last 2-D parameter with ``num_classes`` rows:
    the weight ``W ∈ R^{K×F}`` of the final linear layer, which the iDLG label rule reads."""
    found = None
    for i, p in enumerate(model.parameters()):
        if p.dim() == 2 and p.shape[0] == num_classes:
            found = i
    if found is None:
        raise ValueError("the model has no final linear layer with one row per class (iDLG needs one)")
    return found


def infer_labels(weight_grad: Tensor, batch_size: int) -> Tensor:
    r"""Labels from the gradient of the last linear layer's weight ``W ∈ R^{K×F}`` (iDLG, Zhao et al. 2020).

    For cross-entropy, :math:`\partial L/\partial W_{c,:} = \frac1B\sum_i (p_{ic} - y_{ic})\,h_i`.
    With non-negative features :math:`h_i` (after a sigmoid or ReLU) the row sum
    :math:`s_c = \sum_j \partial L/\partial W_{c,j}` is negative only for classes present in the batch
    (:math:`p_{ic} - 1 < 0`). For ``B = 1`` the label is :math:`\arg\min_c s_c` — iDLG's rule, exact.
    For ``B > 1`` (a heuristic; exact when the labels are distinct and every other class has
    :math:`s_c \ge 0`): the classes with negative :math:`s_c`, most negative first, up to ``B``; when
    fewer than ``B`` are negative the list is filled by repeating them in that order (duplicate labels
    cannot be told apart from this layer alone).

    Returns
    -------
    Tensor
        ``int64`` labels, shape ``(batch_size,)``.
    """
    s = weight_grad.reshape(weight_grad.shape[0], -1).sum(dim=1)
    order = torch.argsort(s)
    if batch_size == 1:
        return order[:1].clone()
    negative = int((s < 0).sum())
    k = max(1, min(negative, batch_size, s.numel()))
    picked = order[:k]
    reps = math.ceil(batch_size / k)
    return picked.repeat(reps)[:batch_size].clone()


@dataclass
class _Layout:
    batch: int
    image_shape: tuple[int, ...]
    num_classes: int
    soft_labels: bool

    @property
    def image_numel(self) -> int:
        return self.batch * math.prod(self.image_shape)

    @property
    def numel(self) -> int:
        return self.image_numel + (self.batch * self.num_classes if self.soft_labels else 0)


class GradientMatching:
    """The batched gradient-matching objective (module docstring).

    Parameters
    ----------
    model:
        The attacked model (its parameters are read, never changed). It is evaluated as it is
        (``train()``/``eval()`` mode chosen by the caller).
    target:
        The shared gradient, one tensor per parameter (``model.parameters()`` order).
    loss:
        The training loss ``loss(output, labels)`` (batch mean) used with fixed labels; with soft
        labels the loss is cross-entropy against ``softmax(l)`` (DLG's ``cross_entropy_for_onehot``).
    batch, image_shape, num_classes:
        ``B`` dummy images of shape ``(C, H, W)``; ``K`` classes.
    labels:
        Fixed labels ``(B,)`` (iDLG / IG / known labels), or ``None`` to optimise soft labels (DLG).
    mean, std:
        Per-channel normalisation of the model (``x = mean + std · u``); ``None`` = identity.
    distance:
        ``"l2"`` (DLG) or ``"cosine"`` (IG).
    tv:
        Total-variation weight on ``u`` (IG; 0 for none).
    strategy:
        ``"analytic"``, ``"loop"``, ``"vmap"`` or ``"auto"`` (analytic where it applies, else loop for
        one restart and vmap for several).
    mkldnn:
        Whether CPU convolutions may use oneDNN (mkldnn) during evaluations: ``None`` leaves PyTorch's
        global setting, ``False`` uses PyTorch's native kernels — about twice as fast for LeNet-sized
        problems (oneDNN's per-call overhead dominates tiny convolutions), slower for ResNets. The
        choice changes rounding only.
    """

    def __init__(self, model: nn.Module, target: Sequence[Tensor], *, loss, batch: int,
                 image_shape: Sequence[int], num_classes: int, labels: Tensor | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 distance: str = "l2", tv: float = 0.0, strategy: str = "auto", mkldnn: bool | None = None) -> None:
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.model = model
        self.params = [p for p in model.parameters()]
        self.names = [n for n, _ in model.named_parameters()]
        if len(target) != len(self.params):
            raise ValueError(f"target has {len(target)} tensors, the model {len(self.params)} parameters")
        self.target = [t.detach() for t in target]
        self.loss = loss
        self.layout = _Layout(int(batch), tuple(int(s) for s in image_shape), int(num_classes), labels is None)
        self.labels = None if labels is None else labels.detach()
        self.distance = distance
        self.tv = float(tv)
        self.strategy = strategy
        self.mkldnn = mkldnn
        ref = self.params[0]
        c = self.layout.image_shape[0]
        shape = (1, c) + (1,) * (len(self.layout.image_shape) - 1)
        m = torch.zeros(c) if mean is None else torch.as_tensor(list(mean), dtype=torch.float32).expand(c)
        s = torch.ones(c) if std is None else torch.as_tensor(list(std), dtype=torch.float32).expand(c)
        self.mean = m.reshape(shape).to(device=ref.device, dtype=ref.dtype)
        self.std = s.reshape(shape).to(device=ref.device, dtype=ref.dtype)
        self.target_flat = torch.cat([t.reshape(-1) for t in self.target])
        self.target_norm = torch.linalg.vector_norm(self.target_flat)
        self._vmapped = None
        from dpbr.inversion import closed_form

        self._closed_form = None
        if strategy in ("auto", "analytic") and closed_form.supports(model, getattr(loss, "name", None), distance):
            self._closed_form = closed_form.LeNetMatching(model, self.target, image_shape=self.layout.image_shape,
                                                          labels=self.labels,
                                                          num_classes=self.layout.num_classes, distance=distance)
        elif strategy == "analytic":
            raise ValueError("strategy 'analytic' needs DLG's LeNet with cross-entropy and the l2 or cosine distance")

    # -- variables ---------------------------------------------------------------------------- #

    @property
    def numel(self) -> int:
        """Length ``n`` of one restart's variable vector."""
        return self.layout.numel

    def split(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(u, l)`` views of ``z (..., n)``: images ``(..., B, C, H, W)``, label logits ``(..., B, K)`` or None."""
        L = self.layout
        lead = z.shape[:-1]
        u = z[..., :L.image_numel].reshape(*lead, L.batch, *L.image_shape)
        lab = z[..., L.image_numel:].reshape(*lead, L.batch, L.num_classes) if L.soft_labels else None
        return u, lab

    def images(self, z: Tensor) -> Tensor:
        """Pixel-space images ``mean + std · u`` (not clipped) of ``z (..., n)``."""
        u, _ = self.split(z)
        return self.mean + self.std * u

    def u_from_images(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`images` for the image part: ``(x − mean) / std``."""
        return (x - self.mean) / self.std

    def box(self) -> tuple[Tensor, Tensor]:
        """Bounds of ``u`` that keep pixels in ``[0, 1]``: ``(−mean/std, (1−mean)/std)`` (IG's box)."""
        return -self.mean / self.std, (1.0 - self.mean) / self.std

    # -- one restart, plain autograd --------------------------------------------------------- #

    def _train_loss(self, out: Tensor, lab: Tensor | None) -> Tensor:
        if lab is None:
            return self.loss(out, self.labels)
        return F.cross_entropy(out, F.softmax(lab, dim=-1))

    def _distance(self, grads: Sequence[Tensor]) -> Tensor:
        flat = torch.cat([g.reshape(-1) for g in grads])   # one op (and one in each backward) per term
        if self.distance == "l2":
            return (flat - self.target_flat).pow(2).sum()
        dot = (flat * self.target_flat).sum()
        return 1.0 - dot / (torch.linalg.vector_norm(flat) * self.target_norm)

    def _row(self, z_row: Tensor, with_grad: bool) -> tuple[Tensor, Tensor | None]:
        with torch.enable_grad():
            z = z_row.detach().requires_grad_(with_grad)
            u, lab = self.split(z)
            out = self.model(self.mean + self.std * u)
            loss = self._train_loss(out, lab)
            grads = torch.autograd.grad(loss, self.params, create_graph=with_grad)
            dist = self._distance(grads)
            if not with_grad:
                return dist.detach(), None
            value = dist + self.tv * total_variation(u) if self.tv else dist
            (gz,) = torch.autograd.grad(value, z)
        return value.detach(), gz

    # -- several restarts, torch.func -------------------------------------------------------- #

    def _build_vmapped(self):
        from torch.func import functional_call, grad, grad_and_value, vmap

        model = self.model
        pdict = {n: p.detach() for n, p in zip(self.names, self.params)}
        bdict = {n: b for n, b in model.named_buffers()}
        mean, std, tv = self.mean, self.std, self.tv

        def objective(z: Tensor) -> Tensor:
            u, lab = self.split(z)
            x = mean + std * u

            def train_loss(p):
                out = functional_call(model, (p, bdict), (x,))
                return self._train_loss(out, lab)

            g = grad(train_loss)(pdict)
            value = self._distance([g[n] for n in self.names])
            if tv:
                value = value + tv * total_variation(u)
            return value

        return vmap(grad_and_value(objective)), vmap(objective)

    # -- public ------------------------------------------------------------------------------ #

    def use_vmap(self, k: int) -> bool:
        return self.strategy == "vmap" or (self.strategy == "auto" and k > 1)

    @contextlib.contextmanager
    def _backend(self):
        if self.mkldnn is None:
            yield
            return
        previous = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = self.mkldnn
        try:
            yield
        finally:
            torch.backends.mkldnn.enabled = previous

    def value_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Objective values ``(k,)`` and gradients ``(k, n)`` of the ``k`` restarts ``z (k, n)``."""
        if z.shape[-1] != self.numel:
            raise ValueError(f"z must have {self.numel} entries per restart, got {z.shape[-1]}")
        with self._backend():
            return self._value_and_grad(z)

    def evaluation(self, k: int) -> str:
        """The evaluation :meth:`value_and_grad` uses for ``k`` restarts: ``analytic``, ``loop`` or ``vmap``."""
        if self._closed_form is not None and self.strategy in ("auto", "analytic"):
            return "analytic"
        return "vmap" if self.use_vmap(k) else "loop"

    def _value_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mode = self.evaluation(z.shape[0])
        if mode == "analytic":
            return self._analytic(z)
        if mode == "vmap":
            if self._vmapped is None:
                self._vmapped = self._build_vmapped()
            g, v = self._vmapped[0](z.detach())
            return v.detach(), g.detach()
        values, grads = [], []
        for r in range(z.shape[0]):
            v, g = self._row(z[r], True)
            values.append(v)
            grads.append(g)
        return torch.stack(values), torch.stack(grads)

    def _analytic(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """:mod:`~dpbr.inversion.closed_form`'s value and gradient, plus the TV term by autograd on ``u``."""
        k = z.shape[0]
        u, lab = self.split(z.detach())
        value, gu, gl = self._closed_form.value_and_grad(u, lab)
        if self.tv:
            with torch.enable_grad():
                uu = u.detach().requires_grad_(True)
                tv = torch.stack([total_variation(uu[r]) for r in range(k)])
                (g_tv,) = torch.autograd.grad(tv.sum(), uu)
            value = value + self.tv * tv.detach()
            gu = gu + self.tv * g_tv
        parts = [gu.reshape(k, -1)] + ([gl.reshape(k, -1)] if gl is not None else [])
        return value, torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def distance_only(self, z: Tensor) -> Tensor:
        """The matching distance (without the TV term) of each restart ``z (k, n)`` — the score by
        which the best restart is chosen (IG's ``_score_trial``)."""
        out = []
        with self._backend():
            for r in range(z.shape[0]):
                v, _ = self._row(z[r], False)
                out.append(v)
        return torch.stack(out)
