"""Seconds per phase of each training step (:data:`PHASES`), without a host sync per step."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

__all__ = ["PHASES", "PhaseTimer"]

#: Seconds spent per phase of a step: ``data`` draws the example indices and gathers the batch;
#: ``gradient`` computes the per-worker gradients (and nothing else, except per-example clipping,
#: which is part of that computation); ``privacy`` clips (batch mode), applies worker momentum and
#: the privacy mechanisms; ``attack`` forges the Byzantine vectors; ``aggregate`` runs the rule;
#: ``update`` takes the momentum step and records the metrics.
PHASES: tuple[str, ...] = ("data", "gradient", "privacy", "attack", "aggregate", "update")


class PhaseTimer:
    """Seconds per phase of each step; CUDA events on a GPU (no host sync until :meth:`seconds`)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.rows: list[list[Any]] = []
        self._marks: list[Any] = []

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        """Mark the start of a step."""
        self._marks = [self._now()]

    def mark(self) -> None:
        """Mark the end of the current phase."""
        self._marks.append(self._now())

    def end(self) -> None:
        """Finish the current step."""
        self.rows.append(self._marks)

    def seconds(self, rows: int) -> Tensor:
        """``(rows, len(PHASES))`` seconds (synchronises CUDA once)."""
        out = torch.zeros(rows, len(PHASES), dtype=torch.float64)
        if self.cuda:
            torch.cuda.synchronize()
        for i, m in enumerate(self.rows[:rows]):
            if self.cuda:
                out[i] = torch.tensor([m[j].elapsed_time(m[j + 1]) / 1000 for j in range(len(PHASES))])
            else:
                out[i] = torch.tensor([m[j + 1] - m[j] for j in range(len(PHASES))])
        return out
