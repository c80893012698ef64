"""The PNG grid of one reconstruction job: originals above, their matched reconstructions below.

Images are ``(B, C, H, W)`` in ``[0, 1]`` (values outside are clipped, NaN shown as mid-grey). With
``B`` images and ``columns = min(B, 10)`` per row, the grid has ``ceil(B / columns)`` rows of
originals, a separator, and the same number of rows of reconstructions in the same positions, so the
reconstruction matched to an original sits at the same place in the lower half. Each image is
enlarged by an integer factor (nearest neighbour) so that small images stay visible. Written with
Pillow, atomically (:func:`dpbr.io.atomic_path`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dpbr.io import atomic_path

__all__ = ["grid_array", "save_grid"]


def _to_uint8(images: Tensor) -> np.ndarray:
    x = images.detach().to(torch.float32).cpu()
    x = torch.nan_to_num(x, nan=0.5).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.uint8).numpy()


def grid_array(originals: Tensor, reconstructions: Tensor, *, columns: int | None = None, scale: int | None = None,
               pad: int = 2, separator: int = 6) -> np.ndarray:
    """The grid as an ``(H, W, 3)`` ``uint8`` array (layout in the module docstring).

    Parameters
    ----------
    originals, reconstructions:
        ``(B, C, H, W)`` tensors, ``C`` = 1 (grey) or 3 (RGB); reconstruction ``i`` is drawn under original ``i``.
    columns:
        Images per row (default ``min(B, 10)``).
    scale:
        Integer enlargement (default: the smallest making an image at least 64 pixels high, at most 8).
    pad, separator:
        White pixels between images, and between the two halves.
    """
    if originals.shape != reconstructions.shape or originals.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of one shape, got {tuple(originals.shape)}, {tuple(reconstructions.shape)}")
    B, C, H, W = originals.shape
    if C not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {C}")
    cols = max(1, min(B, columns or 10))
    rows = math.ceil(B / cols)
    s = scale or max(1, min(8, math.ceil(64 / H)))
    h, w = H * s, W * s
    half = rows * h + (rows + 1) * pad
    out = np.full((2 * half + separator, cols * w + (cols + 1) * pad, 3), 255, dtype=np.uint8)
    out[half:half + separator] = 200  # light grey separator
    for which, images in enumerate((originals, reconstructions)):
        arr = _to_uint8(images)                              # (B, C, H, W)
        arr = np.repeat(np.repeat(arr, s, axis=2), s, axis=3)
        arr = np.transpose(arr, (0, 2, 3, 1))               # (B, h, w, C)
        if C == 1:
            arr = np.repeat(arr, 3, axis=3)
        top0 = which * (half + separator)
        for i in range(B):
            r, c = divmod(i, cols)
            top = top0 + pad + r * (h + pad)
            left = pad + c * (w + pad)
            out[top:top + h, left:left + w] = arr[i]
    return out


def save_grid(originals: Tensor, reconstructions: Tensor, path: str | Path, **kwargs) -> Path:
    """Write :func:`grid_array` to ``path`` as PNG, atomically; returns the path."""
    from PIL import Image

    array = grid_array(originals, reconstructions, **kwargs)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path
