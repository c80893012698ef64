"""Deterministic random generators: one per ``(seed, purpose, worker)``.

Every random draw in dpbr comes from a generator built here, never from the global RNG, so that the
same spec and seed give the same result, and so that streams for different purposes (batch sampling,
privacy noise, attacks, bucketing, model initialisation) and different workers are independent.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "generator", "worker_generators"]


def derive_seed(seed: int, purpose: str, worker: int | None = None) -> int:
    """A 63-bit seed derived from ``(seed, purpose, worker)`` by SHA-256 (stable across runs and platforms)."""
    text = f"dpbr|{int(seed)}|{purpose}|{'' if worker is None else int(worker)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, purpose: str, worker: int | None = None, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed`."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(derive_seed(seed, purpose, worker))
    return g


def worker_generators(seed: int, purpose: str, workers: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One independent generator per worker ``0 .. workers-1`` for ``purpose``."""
    return [generator(seed, purpose, w, device) for w in range(workers)]
