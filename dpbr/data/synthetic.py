"""Synthetic datasets, generated from a seed (never downloaded): class-conditional images or vectors.

The parameters of ``synthetic(...)`` and their checks are part of the dataset name
(:data:`dpbr.data.catalogue.SYNTHETIC_DEFAULTS`); this module makes the arrays.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from dpbr._lazy import LazyModule
from dpbr.data.catalogue import SYNTHETIC_DEFAULTS
from dpbr.data.verify import channel_stats, label_counts

if TYPE_CHECKING:
    import torch
else:  # imported on first use: naming and checking datasets needs no torch (dpbr._lazy)
    torch = LazyModule("torch", globals())

__all__ = ["generate"]


def generate(p: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Deterministic class-conditional data from ``seed``.

    Images (``d`` absent): one smooth random prototype per class in ``[0, 1]`` (a 7×7 uniform field
    upsampled bilinearly), each sample ``clip(prototype + noise · N(0, 1), 0, 1)`` quantised to 8 bits.
    Vectors (``d`` given): class means ``2 · N(0, I/d)`` (about 2.8 apart), each sample
    ``mean + 2 · noise · N(0, I)``, ``float32`` (the default noise gives a few percent Bayes error). Labels are balanced (``i mod classes``, then
    shuffled). Train and test come from the same distribution.
    """
    from dpbr.rng import derive_seed

    g = torch.Generator().manual_seed(derive_seed(int(p["seed"]), "synthetic-data"))
    k, n, n_test = int(p["classes"]), int(p["n"]), int(p["n_test"])
    noise = float(p["noise"])

    def labels(m: int) -> torch.Tensor:
        return (torch.arange(m) % k)[torch.randperm(m, generator=g)]

    ytr, yte = labels(n), labels(n_test)
    if p["d"] is None:
        c, s = int(p["channels"]), int(p["size"])
        low = torch.rand(k, c, 7, 7, generator=g)
        proto = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)
        lo = proto.amin(dim=(1, 2, 3), keepdim=True)
        hi = proto.amax(dim=(1, 2, 3), keepdim=True)
        proto = (proto - lo) / (hi - lo).clamp_min(1e-6)

        def sample(y: torch.Tensor) -> np.ndarray:
            x = (proto[y] + noise * torch.randn(len(y), c, s, s, generator=g)).clamp(0, 1)
            return (x * 255).round().to(torch.uint8).numpy()

        xtr, xte = sample(ytr), sample(yte)
        mean, std = channel_stats(xtr)
        shape = [c, s, s]
    else:
        d = int(p["d"])
        means = torch.randn(k, d, generator=g) * (2.0 / math.sqrt(d))

        def sample_v(y: torch.Tensor) -> np.ndarray:
            return (means[y] + 2.0 * noise * torch.randn(len(y), d, generator=g)).numpy().astype(np.float32)

        xtr, xte = sample_v(ytr), sample_v(yte)
        mean, std = (0.0,), (1.0,)
        shape = [d]
    arrays = {"x_train": xtr, "y_train": ytr.numpy().astype(np.int64), "x_test": xte, "y_test": yte.numpy().astype(np.int64)}
    params = {key: p[key] for key in SYNTHETIC_DEFAULTS}
    meta = {
        "source": f"generated ({json.dumps(params, sort_keys=True)})",
        "source_kind": "generated",
        "details": {"params": params},
        "verification": "generated deterministically from the seed",
        "official": None,
        "split": "generated train and test samples",
        "counts": {"train": n, "test": n_test},
        "label_counts": {"train": label_counts(arrays["y_train"], k), "test": label_counts(arrays["y_test"], k)},
        "input_shape": shape,
        "num_classes": k,
        "mean": list(mean),
        "std": list(std),
        "storage": "images uint8 (N, C, H, W), divided by 255 on load" if p["d"] is None else "float32 (N, D)",
    }
    return arrays, meta
