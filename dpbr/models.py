"""Models of the study and of the gradient-inversion attacks, with their task facts.

==========  ===========================================================  ===============================
name        architecture                                                 parameters
==========  ===========================================================  ===============================
``logit``   ``sigmoid(Linear(D → 1))`` (LPD ``simples-logit``)           ``D + 1`` (69 on phishing)
``cnn``     ``Conv(C,20,5) → ReLU → MaxPool2 → Conv(20,50,5) → ReLU →    431,080 on 1×28×28, 10 classes
            MaxPool2 → Linear(F,500) → ReLU → Linear(500,K)``            (LPD ``simples-conv``)
``lenet``   DLG's LeNet: three 5×5 convs with 12 channels, strides       ``F = 12·h·w`` from the input
            2, 2, 1, padding 2, sigmoid; ``Linear(F → K)``; weights and  (588 for 28×28, 768 for 32×32)
            biases ~ U(−0.5, 0.5) (Zhu et al. 2019)
``resnet``  CIFAR ResNet (He et al. 2016): 3×3 stem, three stages of     resnet20 ≈ 0.27 M;
            ``(depth−2)/6`` basic blocks with ``16w, 32w, 64w`` channels,  ``resnet(depth=32,width=10)``
            strides 1, 2, 2, 1×1 projection shortcuts, global average      = ResNet32-10 of Inverting
            pooling, ``Linear(64w → K)``; ``norm=group|batch|none``        Gradients, 46.43 M (≈ 46.4 M)
``mnist-    PyTorch's MNIST example, as in Karimireddy, He & Jaggi's      1,199,882 on 1×28×28, 10
example``   bucketing experiments (arXiv 2006.09365): ``Conv(C,32w,3) →  classes (``width=1``)
            ReLU → Conv(32w,64w,3) → ReLU → MaxPool2 → Dropout(0.25) →
            Linear(F,128) → ReLU → Dropout(0.5) → Linear(128,K) →
            log_softmax``; ``width`` as their exp8 (see
            :class:`MNISTExample` for dropout)
==========  ===========================================================  ===============================

Inputs are in ``[0, 1]`` (images ``(N, C, H, W)``, vectors ``(N, D)``); every model first applies
``(x − mean) / std`` with per-channel constants held in *buffers* (not parameters, so ``d`` is
unchanged and image-space attacks and defences work on ``[0, 1]`` pixels). ``mean=std=None`` means no
normalisation (DLG's LeNet used none; LPD's MNIST CNN used 0.1307/0.3081, which :mod:`dpbr.data`
reproduces).

Initialisation is deterministic from ``seed``: the module is built inside
``torch.random.fork_rng`` seeded with ``dpbr.rng.derive_seed(seed, "model-init")``, so the global RNG
is left untouched. ``logit``, ``cnn`` and ``mnist-example`` keep PyTorch's default initialisation (as
LPD's and the bucketing code did);
``lenet`` uses DLG's ``U(−0.5, 0.5)``; ``resnet`` uses Kaiming-normal (fan-out) convolutions, unit/zero
norm affine parameters and PyTorch's default for the last layer.

Functional use (torch.func)
---------------------------
The simulation evaluates gradients with ``torch.func.vmap(torch.func.grad(loss))`` over a dict of
parameters (:func:`torch.func.functional_call`). Every model here is written for that: no in-place
operations on inputs or activations, no state updated in ``forward``. The only exception is
``resnet(norm=batch)``: BatchNorm in training mode updates running statistics in place and mixes the
samples of a batch, which ``vmap`` rejects; use the default ``norm=group`` (GroupNorm, per-sample,
vmap-safe) for training in the simulation, or put a batch-norm model in ``eval()`` mode, or call
``torch.func.replace_all_batch_norm_modules_(model)`` (batch statistics, no running statistics) before
vmapping. Inverting Gradients used batch norm; ``norm=batch`` is there to match it.

Task facts
----------
``logit``: the output is the sigmoid probability ``ŷ`` of shape ``(N,)``; loss is the MSE
``mean((ŷ − y)²)`` with ``y ∈ {0, 1}`` (LPD ``--loss mse --criterion sigmoid``); correct means
``|y − ŷ| < 0.5``. The others output logits ``(N, K)``; loss is cross-entropy (LPD: ``log_softmax`` +
NLL, the same thing); correct means ``argmax = y``. ``mnist-example`` outputs log-probabilities
``(N, K)`` (``log_softmax``) and its loss is the NLL ``−log p_y`` (``F.nll_loss``), as in the MNIST
example and the bucketing code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpbr.errors import UsageError
from dpbr.model_catalog import OPTION as _OPTION
from dpbr.model_catalog import check_input, default_hparams, names  # re-exported (see __all__)
from dpbr.model_catalog import cnn_spatial as _cnn_spatial
from dpbr.model_catalog import lenet_spatial as _lenet_spatial
from dpbr.model_catalog import mnist_example_spatial as _mnist_example_spatial
from dpbr.model_catalog import resolve as _resolve

__all__ = [
    "Loss",
    "MNISTExample",
    "build",
    "check_input",
    "correct",
    "default_hparams",
    "flat_params",
    "for_run",
    "loss",
    "names",
    "num_params",
    "param_shapes",
    "per_example_loss",
    "unflatten",
]


# ----------------------------------------------------------------------------------------------- #
# Building blocks


class Normalize(nn.Module):
    """``(x − mean) / std`` per channel (dim 1), constants in buffers; identity when ``mean`` is None."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None, ndim: int) -> None:
        super().__init__()
        self.enabled = mean is not None or std is not None
        mv = [float(v) for v in mean] if mean is not None else [0.0]
        sv = [float(v) for v in std] if std is not None else [1.0]
        if not all(v > 0 and math.isfinite(v) for v in sv) or not all(math.isfinite(v) for v in mv):
            raise ValueError("mean must be finite and std positive")
        m = torch.tensor(mv, dtype=torch.float32)
        s = torch.tensor(sv, dtype=torch.float32)
        shape = (1, -1) + (1,) * max(ndim - 1, 0)
        self.register_buffer("mean", m.reshape(shape))
        self.register_buffer("std", s.reshape(shape))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}" if self.enabled else "identity"


class Logit(nn.Module):
    """``sigmoid(Linear(D → 1))``, output ``(N,)`` probabilities."""

    def __init__(self, in_features: int, normalize: Normalize) -> None:
        super().__init__()
        self.normalize = normalize
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.linear(self.normalize(x).flatten(1))).squeeze(-1)

    def worker_gradients(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Closed-form mini-batch gradients of the MSE loss for ``h`` workers at once.

        With ``z = w·x + b``, ``ŷ = σ(z)`` and ``L = (1/b) Σ_i (ŷ_i − y_i)²``:
        ``∂L/∂z_i = (2/b)(ŷ_i − y_i) ŷ_i (1 − ŷ_i)``, ``∇_w L = Σ_i ∂L/∂z_i x_i``, ``∇_b L = Σ_i ∂L/∂z_i``.

        Parameters
        ----------
        x, y:
            ``(h, b, D)`` inputs and ``(h, b)`` 0/1 labels.

        Returns
        -------
        ``(G, losses)``: ``(h, D + 1)`` gradients in the parameter order (weight then bias) and
        ``(h,)`` mini-batch losses — the same numbers as ``h`` backward passes, without autograd.
        """
        h, b = y.shape
        xn = self.normalize(x.reshape(h * b, -1)).reshape(h, b, -1)
        w, bias = self.linear.weight.detach(), self.linear.bias.detach()
        prob = torch.sigmoid(xn @ w.reshape(-1) + bias)
        err = prob - y.to(prob.dtype)
        dz = (2.0 / b) * err * prob * (1 - prob)
        grads = torch.cat([torch.einsum("hb,hbd->hd", dz, xn), dz.sum(1, keepdim=True)], dim=1)
        return grads, err.pow(2).mean(1)


class CNN(nn.Module):
    """The study's CNN (LPD ``simples-conv``) with sizes derived from the input shape."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, normalize: Normalize) -> None:
        super().__init__()
        c, h, w = input_shape
        h2, w2 = _cnn_spatial(h), _cnn_spatial(w)
        self.normalize = normalize
        self.conv1 = nn.Conv2d(c, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(50 * h2 * w2, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class LeNet(nn.Module):
    """DLG's LeNet (Zhu et al. 2019): sigmoid activations, twice differentiable as DLG needs."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, normalize: Normalize) -> None:
        super().__init__()
        c, h, w = input_shape
        self.normalize = normalize
        self.body = nn.Sequential(
            nn.Conv2d(c, 12, kernel_size=5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1), nn.Sigmoid(),
        )
        self.features = 12 * _lenet_spatial(h) * _lenet_spatial(w)
        self.fc = nn.Linear(self.features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(self.normalize(x)).flatten(1))


class MNISTExample(nn.Module):
    """The network of PyTorch's MNIST example, as used by Karimireddy, He & Jaggi, *Byzantine-Robust
    Learning on Heterogeneous Datasets via Bucketing* (ICLR 2022, arXiv 2006.09365).

    ``Conv(C, 32w, 3) → ReLU → Conv(32w, 64w, 3) → ReLU → MaxPool2 → Dropout(0.25) → flatten →
    Linear(64w·s², 128) → ReLU → Dropout(0.5) → Linear(128, K) → log_softmax`` with ``s = (H − 4)/2``
    (12 on 28×28: ``64·144 = 9216`` features; 1,199,882 parameters for ``w = 1``, ``K = 10``). The
    width ``w`` multiplies the convolution channels as in the paper's model-size experiment (exp8).
    The output is log-probabilities; the loss is the NLL (:func:`loss`).

    Dropout
    -------
    Inverted dropout (kept units scaled by ``1/(1 − p)``) with ``p = 0.25`` and ``0.5`` runs only when
    the module is in training mode **and** :attr:`dropout_generator` is a ``torch.Generator``; its masks
    are ``torch.rand(shape, generator=g) ≥ p``, so the same generator seed gives the same masks. By
    default :attr:`dropout_generator` is ``None`` and the network has **no dropout**: it is a
    deterministic function of ``θ`` and ``x``, in training and evaluation alike.

    dpbr's simulation (``dpbr train``) keeps that default, so its runs train without dropout — a
    deliberate difference from the paper. The simulation computes the workers' gradients with
    ``torch.func.vmap``, which refuses random operations in its default ``randomness="error"`` mode,
    and evaluates without switching the module's mode; dropout off keeps every gradient strategy
    (vmap, a loop of backward passes, per-example gradients) and the evaluation exact and the run
    reproducible from its spec and seed. Code that computes gradients with ordinary autograd can set
    ``model.dropout_generator = torch.Generator().manual_seed(s)`` (and ``model.eval()`` to evaluate).
    The paper's copy of the network uses ``Dropout2d`` (whole channels of the pooled map); the
    current PyTorch example and this class drop single units.
    """

    #: Dropout rates after the pooling and after the first linear layer.
    P_POOL = 0.25
    P_HIDDEN = 0.5

    def __init__(self, input_shape: Sequence[int], num_classes: int, normalize: Normalize, width: int = 1) -> None:
        super().__init__()
        c, h, w = input_shape
        self.normalize = normalize
        self.conv1 = nn.Conv2d(c, 32 * width, 3, 1)
        self.conv2 = nn.Conv2d(32 * width, 64 * width, 3, 1)
        self.fc1 = nn.Linear(64 * width * _mnist_example_spatial(h) * _mnist_example_spatial(w), 128)
        self.fc2 = nn.Linear(128, num_classes)
        #: Source of the dropout masks; ``None`` (default) = no dropout (see the class docstring).
        self.dropout_generator: torch.Generator | None = None

    def _dropout(self, x: Tensor, p: float) -> Tensor:
        g = self.dropout_generator
        if not self.training or g is None:
            return x
        keep = torch.rand(x.shape, generator=g, device=g.device) >= p
        return x * keep.to(device=x.device, dtype=x.dtype) / (1 - p)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(self.normalize(x)))))
        x = self._dropout(F.max_pool2d(x, 2), self.P_POOL)
        x = self._dropout(F.relu(self.fc1(x.flatten(1))), self.P_HIDDEN)
        return F.log_softmax(self.fc2(x), dim=1)


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(_groups(channels), channels)
    return nn.Identity()


def _groups(channels: int) -> int:
    """GroupNorm groups: ``min(32, C/4)`` when it divides ``C`` (16→4, 32→8, 64→16, 160/320/640→32)."""
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return g


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with norm and ReLU, plus a (1×1 projection when needed) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.norm1 = _norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=bias)
        self.norm2 = _norm_layer(norm, cout)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=bias), _norm_layer(norm, cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, section 4.2) with width multiplier and projection shortcuts."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, normalize: Normalize, *,
                 depth: int, width: int, norm: str) -> None:
        super().__init__()
        c = input_shape[0]
        blocks = (depth - 2) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.normalize = normalize
        self.stem = nn.Conv2d(c, widths[0], 3, 1, 1, bias=norm == "none")
        self.stem_norm = _norm_layer(norm, widths[0])
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and b == 0) else 1, norm))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_norm(self.stem(self.normalize(x))))
        x = self.layers(x)
        return self.fc(x.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------- #
# Build


def for_run(
    name: str,
    dataset: Any,
    seed: int,
    *,
    device: str | torch.device | None = None,
    normalization: tuple[Sequence[float] | None, Sequence[float] | None] | None = None,
) -> nn.Module:
    """The model ``name`` of a run with ``seed`` on ``dataset`` — the same initial θ in ``dpbr train``,
    ``dpbr vn`` and ``dpbr reconstruct``.

    :func:`build` with the dataset's input shape and number of classes, inputs normalised with
    ``normalization = (mean, std)`` (default: the dataset's own), parameters drawn from the seed
    ``dpbr.rng.derive_seed(seed, "model")``.
    """
    from dpbr import rng

    mean, std = (dataset.mean, dataset.std) if normalization is None else normalization
    return build(name, input_shape=dataset.input_shape, num_classes=dataset.num_classes, mean=mean, std=std,
                 seed=rng.derive_seed(seed, "model"), device=device)


def build(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Build model ``name`` (e.g. ``"cnn"``, ``"resnet(depth=32,width=10)"``) with a deterministic init.

    Parameters
    ----------
    input_shape:
        ``(C, H, W)`` for images, ``(D,)`` for vectors (``Dataset.input_shape``).
    num_classes:
        Number of classes (2 for ``logit``).
    mean, std:
        Per-channel normalisation constants (``Dataset.mean``/``std``), or ``None`` for none.
    seed:
        Initialisation seed; the global RNG is not touched.
    device:
        Where to put the model (default CPU; initialisation always happens on the CPU).

    Raises
    ------
    UsageError
        ``--model`` for an unknown name or parameter, or an input the model cannot take.
    """
    from dpbr.rng import derive_seed

    base, params = _resolve(name)
    try:
        check_input(name, input_shape, num_classes)
    except ValueError as exc:
        raise UsageError(_OPTION, str(exc)) from None
    shape = tuple(int(s) for s in input_shape)
    if mean is not None and std is not None and len(tuple(mean)) != len(tuple(std)):
        raise UsageError(_OPTION, "mean and std must have the same length")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(int(seed), "model-init"))
        norm = Normalize(mean, std, ndim=len(shape))
        if base == "logit":
            model: nn.Module = Logit(math.prod(shape), norm)
        elif base == "cnn":
            model = CNN(shape, num_classes, norm)
        elif base == "lenet":
            model = LeNet(shape, num_classes, norm)
            for p in model.parameters():
                nn.init.uniform_(p, -0.5, 0.5)
        elif base == "mnist-example":
            model = MNISTExample(shape, num_classes, norm, width=params["width"])
        else:
            model = ResNet(shape, num_classes, norm, depth=params["depth"], width=params["width"], norm=params["norm"])
    model.model_name = name  # type: ignore[attr-defined]
    if device is not None:
        model = model.to(device)
    return model


# ----------------------------------------------------------------------------------------------- #
# Task facts


def _mse_per_example(output: Tensor, target: Tensor) -> Tensor:
    diff = output.reshape(output.shape[0], -1) - target.reshape(target.shape[0], -1).to(output.dtype)
    return diff.pow(2).mean(dim=1)


def _ce_per_example(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target, reduction="none")


def _nll_per_example(output: Tensor, target: Tensor) -> Tensor:
    return F.nll_loss(output, target, reduction="none")


@dataclass(frozen=True)
class Loss:
    """The training loss of a model: ``loss(output, target)`` is the batch mean; ``.per_example`` the vector."""

    name: str
    per_example: Callable[[Tensor, Tensor], Tensor]

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        return self.per_example(output, target).mean()


def loss(name: str) -> Loss:
    """The loss of model ``name``: MSE on the sigmoid output for ``logit``, NLL ``−log p_y`` on the
    log-probabilities of ``mnist-example``, cross-entropy on the logits otherwise."""
    base, _ = _resolve(name)
    if base == "mnist-example":
        return Loss("nll", _nll_per_example)
    if base == "logit":
        return Loss("mse", _mse_per_example)
    return Loss("cross-entropy", _ce_per_example)


def per_example_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-example losses ``(N,)`` of model ``name`` (see :func:`loss`)."""
    return loss(name).per_example


def correct(name: str, output: Tensor, target: Tensor) -> Tensor:
    """Boolean ``(N,)``: ``|y − ŷ| < 0.5`` for ``logit``, ``argmax(output) == y`` otherwise."""
    base, _ = _resolve(name)
    if base == "logit":
        return (output.reshape(-1) - target.reshape(-1).to(output.dtype)).abs() < 0.5
    return output.argmax(dim=1) == target


# ----------------------------------------------------------------------------------------------- #
# Flat parameter vectors (for torch.func)


def num_params(model: nn.Module) -> int:
    """Number of trainable scalars ``d`` (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def param_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """``{name: shape}`` of the parameters, in ``named_parameters()`` order."""
    return {n: p.shape for n, p in model.named_parameters()}


def flat_params(model_or_params: nn.Module | Mapping[str, Tensor]) -> Tensor:
    """All parameters concatenated into one vector (``named_parameters()`` order); keeps autograd."""
    tensors: Iterable[Tensor]
    if isinstance(model_or_params, nn.Module):
        tensors = (p for _, p in model_or_params.named_parameters())
    else:
        tensors = model_or_params.values()
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Inverse of :func:`flat_params`: views of ``vec[..., a:b]`` reshaped to ``shapes`` (leading dims kept)."""
    total = sum(math.prod(s) for s in shapes.values())
    if vec.shape[-1] != total:
        raise ValueError(f"vector has {vec.shape[-1]} entries, the shapes need {total}")
    out: dict[str, Tensor] = {}
    start = 0
    lead = tuple(vec.shape[:-1])
    for n, s in shapes.items():
        size = math.prod(s)
        out[n] = vec[..., start:start + size].reshape(*lead, *s)
        start += size
    return out
