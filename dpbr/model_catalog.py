"""Model names, their parameters, training defaults and input checks — without importing torch.

The catalogue half of :mod:`dpbr.models` (which builds the modules): the specs validate ``--model``
with it, and the workflow validates whole grids with the specs before any job starts, where
importing torch would cost seconds (see :mod:`dpbr._lazy`). :mod:`dpbr.models` re-exports
:func:`names`, :func:`default_hparams` and :func:`check_input`.
"""

from __future__ import annotations

from typing import Any, Sequence

from dpbr.errors import UsageError

__all__ = ["OPTION", "check_input", "cnn_spatial", "default_hparams", "lenet_spatial", "mnist_example_spatial", "names",
           "resolve"]

OPTION = "--model"


# ----------------------------------------------------------------------------------------------- #
# Names and parameters


_PARAMS: dict[str, dict[str, Any]] = {
    "logit": {},
    "cnn": {},
    "lenet": {},
    "resnet": {"depth": 20, "width": 1, "norm": "group"},
    "mnist-example": {"width": 1},
}
_NORMS = ("group", "batch", "none")


def names() -> list[str]:
    """Model names (``resnet`` takes ``depth``, ``width`` and ``norm`` parameters, ``mnist-example``
    takes ``width``)."""
    return sorted(_PARAMS)


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """``(base name, parameters with defaults)`` of a model spec such as ``resnet(depth=32)``;
    :class:`UsageError` (``--model``) for an unknown name or parameter or a bad value."""
    from dpbr.registry import parse

    terms = parse(name, option=OPTION)
    if len(terms) != 1:
        raise UsageError(OPTION, f"expected one model name, got {name!r}")
    base, params = terms[0]
    if base not in _PARAMS:
        raise UsageError(OPTION, f"unknown model {name!r}; allowed: {', '.join(names())}")
    allowed = _PARAMS[base]
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise UsageError(OPTION, f"model {base!r} has no parameter {unknown[0]!r}; allowed: {', '.join(allowed) or 'none'}")
    params = {**allowed, **params}
    if base == "resnet" and params["norm"] is None:  # the spec grammar reads "none" as None
        params["norm"] = "none"
    if base == "resnet":
        depth, width, norm = params["depth"], params["width"], params["norm"]
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise UsageError(OPTION, f"resnet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise UsageError(OPTION, f"resnet width must be a positive integer, got {width!r}")
        if norm not in _NORMS:
            raise UsageError(OPTION, f"resnet norm must be one of {', '.join(_NORMS)}, got {norm!r}")
    if base == "mnist-example":
        width = params["width"]
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise UsageError(OPTION, f"mnist-example width must be a positive integer, got {width!r}")
    return base, params


def default_hparams(model_name: str) -> dict[str, Any]:
    """Training defaults of ``model_name``: ``lr``, ``momentum``, ``dampening``, ``clip``,
    ``weight_decay``, ``steps``, ``eval_every``, ``delta``.

    * ``logit``: the constants of ``reproduce.py`` in LPD-EPFL/DifferentialByzantine, the public code of
      Guerraoui et al. 2021 (arXiv 2102.08166): lr 2 (constant),
      server momentum 0.99 with dampening 0, gradient clip 0.01, 1,000 steps, evaluation every 50
      steps, δ = 1e-6, no weight decay.
    * ``cnn``: the same constants. The student study that reproduced that paper on MNIST says its CNN runs used LPD's
      ``reproduce.py``; its modified copy is not public, so no CNN-specific value is known. Only the
      loss differs (cross-entropy; LPD ``nll`` on ``log_softmax``). Treat these as the study's
      setting, not as tuned values.
    * ``mnist-example``: the setting of Karimireddy, He & Jaggi's bucketing experiments (arXiv
      2006.09365, their public code ``epfml/byzantine-robust-noniid-optimizer``): server SGD with lr
      0.01 and no server momentum, 600 steps, evaluation every 30 steps; no gradient clipping in that
      paper (``clip`` is only read by the privacy mechanisms, set to 1.0 here), no weight decay.
    * ``lenet``, ``resnet``: *not from the study* — common choices: SGD lr 0.1, momentum 0.9,
      clip 1.0 (resnet: weight decay 5e-4, He et al.'s CIFAR setting). DLG/IG attack untrained or
      briefly trained models, so these only matter for training runs.
    """
    base, _ = resolve(model_name)
    study = {"lr": 2.0, "momentum": 0.99, "dampening": 0.0, "clip": 0.01, "weight_decay": 0.0,
             "steps": 1000, "eval_every": 50, "delta": 1e-6}
    if base in ("logit", "cnn"):
        return dict(study)
    if base == "lenet":
        return {**study, "lr": 0.1, "momentum": 0.9, "clip": 1.0}
    if base == "mnist-example":
        return {**study, "lr": 0.01, "momentum": 0.0, "clip": 1.0, "steps": 600, "eval_every": 30}
    return {**study, "lr": 0.1, "momentum": 0.9, "clip": 1.0, "weight_decay": 5e-4}


def cnn_spatial(h: int) -> int:
    """Side of the CNN's last feature map for an input side ``h`` (two 5×5 valid convs, two 2×2 pools)."""
    return ((h - 4) // 2 - 4) // 2


def mnist_example_spatial(h: int) -> int:
    """Side of the MNIST-example network's pooled feature map for an input side ``h`` (two 3×3 valid
    convs, one 2×2 pool): 12 for 28."""
    return (h - 4) // 2


def lenet_spatial(h: int) -> int:
    """Side of LeNet's last feature map for an input side ``h`` (5×5 convs, padding 2, strides 2, 2, 1)."""
    for stride in (2, 2, 1):
        h = (h + 2 * 2 - 5) // stride + 1
    return h


def check_input(name: str, input_shape: Sequence[int], num_classes: int) -> None:
    """Raise ``ValueError`` (one line) when model ``name`` cannot take ``input_shape`` / ``num_classes``."""
    base, _ = resolve(name)
    shape = tuple(int(s) for s in input_shape)
    if num_classes < 2:
        raise ValueError(f"{base} needs at least 2 classes, got {num_classes}")
    if base == "logit":
        if num_classes != 2:
            raise ValueError(f"logit is a binary model (sigmoid output); the dataset has {num_classes} classes")
        return
    if len(shape) != 3:
        raise ValueError(f"{base} takes images (C, H, W); the dataset's inputs have shape {shape}")
    c, h, w = shape
    if base == "cnn" and (cnn_spatial(h) < 1 or cnn_spatial(w) < 1):
        raise ValueError(f"cnn needs images of at least 16×16, got {h}×{w}")
    if base == "mnist-example" and (mnist_example_spatial(h) < 1 or mnist_example_spatial(w) < 1):
        raise ValueError(f"mnist-example needs images of at least 6×6, got {h}×{w}")
    if base in ("lenet", "resnet") and min(h, w) < 2:
        raise ValueError(f"{base} needs images of at least 2×2, got {h}×{w}")
