"""LIBSVM text and the phishing dataset: the parser, the train/test split rule, the cleaning of a
phishing file (labels to ``{0, 1}``, a truncated last row dropped) and the official download.

The split rule and the handling of a truncated row are told in :mod:`dpbr.data` ("Phishing split").
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from dpbr.data.catalogue import KNOWN_CHECKSUMS, PHISHING_FEATURES
from dpbr.data.sources.base import Raw, SourceError, file_sha256, maybe_gunzip, one_line
from dpbr.data.sources.download import download
from dpbr.data.verify import array_checksum

__all__ = [
    "PHISHING_OFFICIAL_ROWS",
    "PHISHING_SPLIT_SEED",
    "PHISHING_TRAIN_ROWS",
    "PHISHING_URL",
    "official_phishing",
    "parse_libsvm",
    "phishing_raw",
    "phishing_split",
]

PHISHING_SPLIT_SEED = 0
"""Seed of the split of a phishing copy other than the official file (see :mod:`dpbr.data`)."""

PHISHING_OFFICIAL_ROWS = 11055
PHISHING_TRAIN_ROWS = 8400

PHISHING_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/phishing"


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
        data = maybe_gunzip(data).decode("utf-8", errors="strict")
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
        raise SourceError(f"not a phishing LIBSVM file: {one_line(exc, 160)}") from None
    dropped = 0
    nnz = facts["nnz"]
    if (not facts["last_line_terminated"] and len(nnz) > 2 and np.all(nnz[:-1] == nnz[0]) and nnz[-1] != nnz[0]):
        x, labels, dropped = x[:-1], labels[:-1], 1
    uniq = set(np.unique(labels).tolist())
    if not uniq <= {-1.0, 0.0, 1.0} or {-1.0, 0.0} <= uniq:
        raise SourceError(f"labels {sorted(uniq)} are not binary (expected 0/1 or -1/+1)")
    y = (labels == 1.0).astype(np.int64)
    if len(y) < 4 or len(np.unique(y)) != 2:
        raise SourceError(f"{len(y)} rows with labels {sorted(uniq)}: too few rows or a single class")
    if not np.isfinite(x).all():
        raise SourceError("non-finite feature values")
    return x, y, {"dropped_truncated_rows": dropped, "rows": int(len(y))}


def phishing_raw(data: bytes, source: str, kind: str, details: Mapping[str, Any]) -> Raw:
    x, y, facts = _phishing_arrays(data)
    n = len(y)
    official = False
    if n == PHISHING_OFFICIAL_ROWS:
        tr, te, _ = phishing_split(n, official=True)
        official = array_checksum({"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}) == KNOWN_CHECKSUMS["phishing"]
    tr, te, rule = phishing_split(n, official=official)
    arrays = {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}
    return Raw(arrays, source=source, source_kind=kind,
               details={**details, **facts, "official": official, "split": rule, "source_sha256": file_sha256(data)})


def official_phishing() -> Raw:
    data = download(PHISHING_URL)
    return phishing_raw(data, f"official download ({PHISHING_URL})", "official", {"urls": [PHISHING_URL]})
