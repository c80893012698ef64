"""Dataset names, shapes, classes and known checksums — without importing torch or NumPy.

The specs validate ``--dataset`` with this module, and the workflow validates whole grids with the
specs before any job starts, where importing torch would cost seconds (see :mod:`dpbr._lazy`).
:mod:`dpbr.data` re-exports :func:`names`, :func:`canonical_name`, :func:`info`,
:class:`DatasetInfo` and :data:`KNOWN_CHECKSUMS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpbr.errors import UsageError

__all__ = [
    "ARRAY_KEYS",
    "DatasetInfo",
    "KNOWN_CHECKSUMS",
    "PHISHING_FEATURES",
    "SYNTHETIC_DEFAULTS",
    "canonical_name",
    "info",
    "names",
    "resolve",
]

PHISHING_FEATURES = 68

KNOWN_CHECKSUMS: dict[str, str] = {
    # SHA-256 of the cached arrays (array_checksum): x uint8 (N, 1, 28, 28), y int64.
    "mnist": "449a094534356df9b2c099a59ac06ac302c1ffcf0d0e8b151cf4e4a769457d36",
    # Official LIBSVM phishing, LPD split: x float32 (8400|2655, 68), y int64.
    "phishing": "5539a16ca4e3e2ec243afc8b1c36642eb7111059d14f94d58e3603b02c035645",
}
"""Checksums of the official data (see :mod:`dpbr.data` for how they were obtained)."""

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
"""The four arrays of every dataset, in the order the checksum covers them."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a dataset, known without loading it (used to validate model/dataset pairs)."""

    name: str
    kind: str  # "image" or "vector"
    input_shape: tuple[int, ...]
    num_classes: int
    train_size: int | None
    test_size: int | None


_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "svm-phishing": "phishing",
}

_STATIC: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", "image", (1, 28, 28), 10, 60000, 10000),
    "fashion-mnist": DatasetInfo("fashion-mnist", "image", (1, 28, 28), 10, 60000, 10000),
    "cifar10": DatasetInfo("cifar10", "image", (3, 32, 32), 10, 50000, 10000),
    "cifar100": DatasetInfo("cifar100", "image", (3, 32, 32), 100, 50000, 10000),
    "phishing": DatasetInfo("phishing", "vector", (PHISHING_FEATURES,), 2, None, None),
}

SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "n": 2000, "n_test": 500, "classes": 10, "d": None, "channels": 1, "size": 28, "noise": 0.35, "seed": 0,
}
"""Parameters of ``synthetic(...)`` and their defaults (the data itself: :mod:`dpbr.data.synthetic`)."""


def names() -> list[str]:
    """Dataset names (``synthetic`` takes optional parameters, see :func:`dpbr.data.load`)."""
    return sorted([*_STATIC, "synthetic"])


def resolve(name: str, option: str = "--dataset") -> tuple[str, dict[str, Any]]:
    """``(base name, parameters)`` of a dataset spec string; unknown names give a UsageError."""
    from dpbr.registry import parse

    terms = parse(name, option=option)
    if len(terms) != 1:
        raise UsageError(option, f"expected one dataset name, got {name!r}")
    base, params = terms[0]
    base = _ALIASES.get(base, base)
    if base not in _STATIC and base != "synthetic":
        raise UsageError(option, f"unknown dataset {name!r}; allowed: {', '.join(names())}")
    if base == "synthetic":
        unknown = [k for k in params if k not in SYNTHETIC_DEFAULTS]
        if unknown:
            raise UsageError(option, f"synthetic has no parameter {unknown[0]!r}; allowed: {', '.join(SYNTHETIC_DEFAULTS)}")
        params = _check_synthetic({**SYNTHETIC_DEFAULTS, **params}, option)
    elif params:
        raise UsageError(option, f"dataset {base!r} takes no parameters, got {name!r}")
    return base, params


def _check_synthetic(p: dict[str, Any], option: str) -> dict[str, Any]:
    def need_int(key: str, low: int) -> None:
        v = p[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UsageError(option, f"synthetic {key} must be an integer >= {low}, got {v!r}")

    need_int("n", 1)
    need_int("n_test", 1)
    need_int("classes", 2)
    need_int("channels", 1)
    need_int("size", 4)
    need_int("seed", 0)
    if p["d"] is not None:
        need_int("d", 1)
    if isinstance(p["noise"], bool) or not isinstance(p["noise"], (int, float)) or not 0 <= p["noise"] < 10:
        raise UsageError(option, f"synthetic noise must be a number in [0, 10), got {p['noise']!r}")
    p["noise"] = float(p["noise"])
    if p["n"] < p["classes"]:
        raise UsageError(option, f"synthetic n={p['n']} must be >= classes={p['classes']}")
    return p


def canonical_name(name: str) -> str:
    """Canonical text of a dataset name: aliases resolved, synthetic parameters equal to the default dropped.

    ``"svm-phishing" -> "phishing"``, ``"synthetic(seed=0)" -> "synthetic"``,
    ``"synthetic(d=68,classes=2)" -> "synthetic(classes=2,d=68)"``.
    """
    from dpbr.registry import format_term

    base, params = resolve(name)
    if base != "synthetic":
        return base
    given = {k: v for k, v in params.items() if v != SYNTHETIC_DEFAULTS[k]}
    return format_term("synthetic", given)


def info(name: str) -> DatasetInfo:
    """Static facts (input shape, number of classes, sizes) of ``name`` without loading it."""
    base, params = resolve(name)
    if base != "synthetic":
        return _STATIC[base]
    if params["d"] is not None:
        shape: tuple[int, ...] = (params["d"],)
        kind = "vector"
    else:
        shape = (params["channels"], params["size"], params["size"])
        kind = "image"
    return DatasetInfo(canonical_name(name), kind, shape, params["classes"], params["n"], params["n_test"])
