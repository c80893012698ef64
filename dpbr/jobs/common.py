"""What every job sets up the same way: device, torch threads, seeding, data and model, metadata.

Each check raises a one-line :class:`~dpbr.errors.UsageError` naming the option, so a job can run
them all before its first costly step. :func:`torch_threads` sets torch's CPU thread count for the
duration of a job and restores the caller's count afterwards, also when the job fails, so jobs run
one after another in one process (tests, notebooks) do not leak their ``--threads``.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from dpbr import io
from dpbr.errors import UsageError

__all__ = ["build_model", "check_choice", "check_positive", "load_dataset", "resolve_device", "run_metadata",
           "seed_everything", "torch_threads"]


def resolve_device(text: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:i``; unavailable → UsageError."""
    t = str(text).strip().lower()
    if t == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if t == "cpu":
        return torch.device("cpu")
    if t == "cuda" or t.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError("--device", f"{text!r} is unavailable (no CUDA device here); allowed: auto, cpu")
        dev = torch.device(t)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError("--device", f"{text!r} is unavailable; allowed: cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return dev
    raise UsageError("--device", f"unknown device {text!r}; allowed: auto, cpu, cuda, cuda:<i>")


def check_positive(value: int | None, option: str) -> None:
    """``value`` is ``None`` (the default applies) or at least 1; otherwise UsageError naming ``option``."""
    if value is not None and value < 1:
        raise UsageError(option, f"must be >= 1, got {value}")


def check_choice(value: str, allowed: Iterable[str], option: str, what: str = "strategy") -> None:
    """``value`` is one of ``allowed`` (listed in that order in the message); otherwise UsageError."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise UsageError(option, f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


@contextlib.contextmanager
def torch_threads(threads: int | None, option: str = "--threads") -> Iterator[int]:
    """Run the block with ``threads`` torch CPU threads (``None``: leave the count as it is).

    Yields the count in effect inside the block; on leaving it (normally or by an exception) the
    count from before is restored.
    """
    check_positive(threads, option)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (belt and braces: dpbr draws from its own generators)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_dataset(name: str, data_dir: str | Path, device: torch.device, *, batch_size: int | None = None) -> Any:
    """The dataset ``name`` from the cache ``data_dir``, on ``device`` (:func:`dpbr.data.load`).

    With ``batch_size`` (the largest a job draws), a batch larger than the training split is refused
    (``--batch-size``).
    """
    from dpbr import data

    dataset = data.load(name, Path(data_dir), device=device)
    n_train = int(dataset.y_train.shape[0])
    if batch_size is not None and batch_size > n_train:
        raise UsageError("--batch-size", f"{batch_size} exceeds the {n_train} training examples of {name}")
    return dataset


def build_model(name: str, dataset: Any, seed: int, device: torch.device) -> torch.nn.Module:
    """The model ``name`` for ``dataset`` as ``dpbr train`` initialises it for ``seed``, on ``device``.

    Inputs are normalised with the dataset's mean and standard deviation; the parameters are drawn
    from the generator ``(seed, "model")`` (:func:`dpbr.rng.derive_seed`).
    """
    from dpbr import models

    return models.for_run(name, dataset, seed).to(device)


def run_metadata(spec: Any, device: torch.device, dataset: Any, *, threads: int, **extra: Any) -> dict[str, Any]:
    """A job's file metadata: :func:`dpbr.io.run_metadata` (spec, versions, device, commit) with ``extra``,
    the dataset's source and checksum, the torch CPU ``threads`` used, the command line and the host."""
    return io.run_metadata(
        spec, device, **extra,
        dataset_source=getattr(dataset, "source", None), dataset_checksum=getattr(dataset, "checksum", None),
        threads=threads, argv=" ".join(sys.argv), host=os.uname().nodename,
    )
