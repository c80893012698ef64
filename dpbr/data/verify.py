"""Checksums and the verification of a source's arrays (shapes, dtypes, value ranges, label counts,
known checksums), which also yields the manifest's facts and the normalisation constants.

The checksum of a dataset is the SHA-256 of its cached arrays (:func:`array_checksum`); how the
known ones were obtained is told in :mod:`dpbr.data`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Mapping

import numpy as np

from dpbr.data.catalogue import ARRAY_KEYS, KNOWN_CHECKSUMS, info
from dpbr.data.sources.base import Raw, SourceError

__all__ = ["array_checksum", "channel_stats", "finalize", "label_counts"]

log = logging.getLogger("dpbr.data")

_MNIST_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
_MNIST_TEST_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)


def array_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the four arrays ``x_train, y_train, x_test, y_test``, each as
    ``"<key>|<dtype>|<shape>\\n"`` followed by its C-order bytes (dtype with explicit byte order)."""
    h = hashlib.sha256()
    for key in ARRAY_KEYS:
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{','.join(str(s) for s in a.shape)}\n".encode())
        h.update(a.data.cast("B") if a.size else b"")
    return h.hexdigest()


def label_counts(y: np.ndarray, k: int) -> list[int]:
    return np.bincount(y, minlength=k).tolist()


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def finalize(base: str, raw: Raw) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Verify a source's arrays against what ``base`` must look like; return arrays and manifest.

    The manifest lacks the cache's own fields (format, creation time, version), which
    :func:`dpbr.data.cache.write` adds.
    """
    st = info(base)
    a = raw.arrays
    for key in ARRAY_KEYS:
        if key not in a:
            raise SourceError(f"missing {key}")
    xtr, ytr, xte, yte = (a[k] for k in ARRAY_KEYS)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise SourceError("images and labels differ in number")
    if st.kind == "image":
        if xtr.dtype != np.uint8 or xte.dtype != np.uint8:
            raise SourceError("images must be uint8")
        for x in (xtr, xte):
            if tuple(x.shape[1:]) != st.input_shape:
                raise SourceError(f"images have shape {tuple(x.shape[1:])}, expected {st.input_shape}")
        if (len(ytr), len(yte)) != (st.train_size, st.test_size):
            raise SourceError(f"{len(ytr)}/{len(yte)} train/test samples, expected {st.train_size}/{st.test_size}")
    else:
        if xtr.dtype != np.float32 or tuple(xtr.shape[1:]) != st.input_shape or tuple(xte.shape[1:]) != st.input_shape:
            raise SourceError(f"features must be float32 with shape (N, {st.input_shape[0]})")
    for y in (ytr, yte):
        if y.dtype != np.int64 or (len(y) and (y.min() < 0 or y.max() >= st.num_classes)):
            raise SourceError(f"labels must be int64 in 0..{st.num_classes - 1}")
    counts = {"train": label_counts(ytr, st.num_classes), "test": label_counts(yte, st.num_classes)}
    if base == "mnist" and (tuple(counts["train"]) != _MNIST_TRAIN_COUNTS or tuple(counts["test"]) != _MNIST_TEST_COUNTS):
        raise SourceError(f"label counts {counts['train']} / {counts['test']} are not MNIST's")
    if base in ("fashion-mnist", "cifar10", "cifar100"):
        per_tr, per_te = st.train_size // st.num_classes, st.test_size // st.num_classes
        if set(counts["train"]) != {per_tr} or set(counts["test"]) != {per_te}:
            raise SourceError(f"label counts are not {per_tr}/{per_te} per class")
    checksum = array_checksum(a)
    known = KNOWN_CHECKSUMS.get(base)
    official = bool(raw.details.get("official", False)) if base == "phishing" else None
    if base == "mnist":
        if checksum != known:
            raise SourceError(f"arrays differ from the official MNIST (checksum {checksum[:12]}… != {known[:12]}…)")
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
        mean, std = channel_stats(xtr)
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
    }
    return {k: np.ascontiguousarray(a[k]) for k in ARRAY_KEYS}, meta
