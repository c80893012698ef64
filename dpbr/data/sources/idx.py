"""IDX files (LeCun's format): the official MNIST and Fashion-MNIST downloads and local IDX folders."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np

from dpbr.data.sources.base import Raw, SourceError, maybe_gunzip
from dpbr.data.sources.download import download_any

__all__ = ["FASHION_MIRRORS", "MNIST_MIRRORS", "find_idx_folder", "idx_arrays", "official_idx", "parse_idx"]

# Official files (same mirrors and MD5 sums as torchvision.datasets).
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_MNIST_FILES = (
    ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
)
FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_FASHION_FILES = (
    ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
)

_IDX_NAMES = {
    "train-images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train-labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "t10k-images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "t10k-labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def parse_idx(data: bytes) -> np.ndarray:
    """An IDX file (LeCun's format; unsigned-byte data only) as a NumPy array; gzip is undone first."""
    data = maybe_gunzip(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SourceError("not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise SourceError(f"IDX data type 0x{data[2]:02x} is not unsigned byte")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise SourceError("truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(shape)
    if len(data) != header + count:
        raise SourceError(f"IDX size {len(data) - header} bytes does not match shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def idx_arrays(files: Mapping[str, bytes]) -> dict[str, np.ndarray]:
    xtr = parse_idx(files["train-images"])
    ytr = parse_idx(files["train-labels"])
    xte = parse_idx(files["t10k-images"])
    yte = parse_idx(files["t10k-labels"])
    for x, y in ((xtr, ytr), (xte, yte)):
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise SourceError(f"IDX images {x.shape} and labels {y.shape} do not match")
    return {
        "x_train": xtr[:, None], "y_train": ytr.astype(np.int64),
        "x_test": xte[:, None], "y_test": yte.astype(np.int64),
    }


def official_idx(base: str) -> Raw:
    mirrors, files = (MNIST_MIRRORS, _MNIST_FILES) if base == "mnist" else (FASHION_MIRRORS, _FASHION_FILES)
    got: dict[str, bytes] = {}
    urls = []
    for filename, md5 in files:
        data, url = download_any(mirrors, filename, md5)
        got[filename.split("-idx")[0]] = data
        urls.append(url)
    return Raw(idx_arrays(got), source=f"official download ({urls[0].rsplit('/', 1)[0]}/)", source_kind="official",
               details={"urls": urls, "verified_md5": True})


def find_idx_folder(path: Path, base: str) -> dict[str, Path] | None:
    sub = "MNIST" if base == "mnist" else "FashionMNIST"
    for folder in (path, path / "raw", path / sub / "raw", path / sub):
        found: dict[str, Path] = {}
        for key, stems in _IDX_NAMES.items():
            for stem in stems:
                for cand in (folder / stem, folder / f"{stem}.gz"):
                    if cand.is_file():
                        found.setdefault(key, cand)
        if len(found) == 4:
            return found
    return None
