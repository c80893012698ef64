"""The dataset object: the cached arrays as tensors on one device, with their manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from dpbr._lazy import LazyModule

if TYPE_CHECKING:
    import torch
else:  # imported on first use: naming and checking datasets needs no torch (dpbr._lazy)
    torch = LazyModule("torch", globals())

__all__ = ["Dataset", "from_arrays"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset as tensors on one device.

    Attributes
    ----------
    x_train, x_test:
        Images ``float32`` in ``[0, 1]``, shape ``(N, C, H, W)``; or vectors ``float32`` ``(N, D)``.
    y_train, y_test:
        Labels ``int64`` in ``0 .. num_classes-1``.
    mean, std:
        Per-channel normalisation constants for the model (``(0,)``/``(1,)`` for vectors: no-op).
    source:
        Where the data came from (official download, PyPI wheel, local file, generated).
    checksum:
        SHA-256 of the arrays as cached (:func:`dpbr.data.array_checksum`).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    checksum: str
    manifest: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def train_size(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.y_test.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: str | torch.device) -> "Dataset":
        """The same dataset on ``device``."""
        d = torch.device(device)
        return Dataset(
            name=self.name, x_train=self.x_train.to(d), y_train=self.y_train.to(d), x_test=self.x_test.to(d),
            y_test=self.y_test.to(d), num_classes=self.num_classes, input_shape=self.input_shape,
            mean=self.mean, std=self.std, source=self.source, checksum=self.checksum, manifest=self.manifest,
        )


def _to_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Cache array → tensor on ``device``; ``uint8`` images become ``float32`` ``x / 255``.

    On the CPU the conversion is one NumPy pass (``np.divide`` in float32: bit-identical to
    ``x.float().div(255)``, about 2.5× faster on MNIST); elsewhere the bytes are moved first and
    converted on the device (4× less to transfer).
    """
    if a.dtype == np.uint8 and device.type == "cpu":
        return torch.from_numpy(np.divide(a, np.float32(255.0), dtype=np.float32))
    t = torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=False)
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    if t.is_floating_point():
        return t.to(torch.float32)
    return t.to(torch.int64)


def from_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], device: str | torch.device) -> Dataset:
    """The :class:`Dataset` of cached ``arrays`` and their manifest ``meta`` on ``device``."""
    dev = torch.device(device)
    return Dataset(
        name=str(meta["name"]),
        x_train=_to_tensor(arrays["x_train"], dev),
        y_train=_to_tensor(arrays["y_train"], dev),
        x_test=_to_tensor(arrays["x_test"], dev),
        y_test=_to_tensor(arrays["y_test"], dev),
        num_classes=int(meta["num_classes"]),
        input_shape=tuple(int(s) for s in meta["input_shape"]),
        mean=tuple(float(m) for m in meta["mean"]),
        std=tuple(float(s) for s in meta["std"]),
        source=str(meta["source"]),
        checksum=str(meta["checksum"]),
        manifest=dict(meta),
    )
