"""What every source shares: its result (:class:`Raw`), its failure (:class:`SourceError`), its entry
in the registry (:class:`Source`) and small byte helpers."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["Raw", "Source", "SourceError", "file_sha256", "maybe_gunzip", "one_line"]


class SourceError(Exception):
    """One source failed (network down, bad file, verification failed); the next one is tried."""


@dataclass(frozen=True)
class Raw:
    """What a source produces: the four arrays (cache dtypes) and provenance."""

    arrays: dict[str, np.ndarray]
    source: str
    source_kind: str  # "official", "pypi-wheel", "local", "generated"
    details: dict[str, Any]


@dataclass(frozen=True)
class Source:
    label: str
    load: Callable[[], Raw]


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def maybe_gunzip(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise SourceError(f"bad gzip data: {exc}") from None
    return data
