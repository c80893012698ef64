"""CIFAR-10 and CIFAR-100 as their official pickled batches: the downloaded ``.tar.gz`` archive, a
local copy of it or its extracted folder. The pickles are read with a restricted unpickler that only
builds NumPy arrays."""

from __future__ import annotations

import io
import pickle
import tarfile
from typing import Any, Callable

import numpy as np

from dpbr.data.sources.base import Raw, SourceError, file_sha256, one_line
from dpbr.data.sources.download import download

__all__ = ["CIFAR", "cifar_arrays", "cifar_from_tar", "load_cifar_batch", "official_cifar"]

CIFAR = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python", ("train",), ("test",), "fine_labels"),
}
"""Per dataset: URL, MD5 (torchvision's), archive folder, train batches, test batches, label key."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: builds dicts, lists, strings and NumPy arrays, nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def load_cifar_batch(data: bytes, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"cannot read CIFAR batch: {one_line(exc, 120)}") from None
    if not isinstance(entry, dict):
        raise SourceError("CIFAR batch is not a dict")
    entry = {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise SourceError(f"CIFAR batch lacks 'data' or {label_key!r}")
    x = np.asarray(entry["data"], dtype=np.uint8)
    y = np.asarray(entry[label_key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.shape[0] != y.shape[0]:
        raise SourceError(f"CIFAR batch has data {x.shape} and labels {y.shape}")
    return x.reshape(-1, 3, 32, 32), y


def cifar_arrays(base: str, read: Callable[[str], bytes]) -> dict[str, np.ndarray]:
    _, _, _, train_files, test_files, label_key = CIFAR[base]
    out: dict[str, np.ndarray] = {}
    for split, files in (("train", train_files), ("test", test_files)):
        xs, ys = zip(*(load_cifar_batch(read(f), label_key) for f in files))
        out[f"x_{split}"] = np.concatenate(xs)
        out[f"y_{split}"] = np.concatenate(ys)
    return out


def cifar_from_tar(base: str, data: bytes) -> dict[str, np.ndarray]:
    folder = CIFAR[base][2]
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except tarfile.TarError as exc:
        raise SourceError(f"not a tar archive: {exc}") from None
    with tf:
        def read(member: str) -> bytes:
            try:
                fh = tf.extractfile(f"{folder}/{member}")
            except KeyError:
                fh = None
            if fh is None:
                raise SourceError(f"archive lacks {folder}/{member}")
            return fh.read()

        return cifar_arrays(base, read)


def official_cifar(base: str) -> Raw:
    url, md5 = CIFAR[base][0], CIFAR[base][1]
    data = download(url, md5)
    return Raw(cifar_from_tar(base, data), source=f"official download ({url})", source_kind="official",
               details={"urls": [url], "verified_md5": True, "archive_sha256": file_sha256(data)})
