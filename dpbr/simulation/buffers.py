"""The tensors a training run reuses at every step (:class:`StepBuffers`): nothing of size ``(n, d)``
is allocated per step, and small models keep a window of steps whose metrics are computed at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dpbr.simulation.metrics import window_metrics, worker_norms

__all__ = ["StepBuffers"]


@dataclass
class _Slot:
    """Views of one step's slot of :class:`StepBuffers` (made once: indexing costs an operation)."""

    stacked: Tensor
    sent: Tensor
    byz: Tensor
    clean: Tensor
    displacement: Tensor


class StepBuffers:
    """The tensors a run reuses at every step, for a window of ``window`` steps (slot ``k`` = step
    ``s mod window``); nothing of size ``(n, d)`` is allocated per step.

    Attributes
    ----------
    stacked : Tensor (window, n, d)
        Slot ``k`` is what the rule aggregates: rows ``0..h-1`` the vectors the honest workers sent
        (written there by the privacy pipeline), rows ``h..n-1`` the Byzantine vectors.
    clean : Tensor (window, h, d) or None
        The clipped honest gradients before the privacy mechanisms, when something (a mechanism,
        worker momentum) lies between them and what is sent; ``None`` otherwise (the gradients are
        then clipped straight into ``stacked``).
    vectors : Tensor (window, m, d)
        Per step the vectors whose norms and cosines are recorded: honest mean sent, aggregate,
        Byzantine mean, ``θ − θ₀`` and (``m = 5``, with ``clean``) the honest mean before privacy.
    losses : Tensor (window, h); selected : Tensor (window, n) bool or None
        Filled by :meth:`record` (one step) or :meth:`metrics` (a window: the steps' own tensors are
        kept until then and stacked once, instead of three copies per step); ``selected`` exists for
        rules that select (the run records the mask from it), ``None`` otherwise.
    idx, idx_scratch : Tensor (window, h, b) and (h, window, b) int64 (CPU)
        The example indices of the window's steps, drawn once per window
        (:meth:`dpbr.simulation.partitions.WorkerSampler.sample_window`).
    slots : list of per-step views of the above (``slots[k].sent``, ``.byz``, ``.clean``, ``.aggregate``, …)
    scratch : Tensor (window, h, d)
        Work space for the centred rows of the deviations.
    """

    def __init__(self, window: int, h: int, f: int, dim: int, batch_size: int, dtype: torch.dtype,
                 device: torch.device, *, clean: bool, selected: bool) -> None:
        n = h + f
        self.window, self.h, self.f = window, h, f
        # every entry is written in its step before it is read (uninitialised memory costs nothing:
        # zeroing the (n, d) buffers of a large model took 25 ms)
        self.stacked = torch.empty(window, n, dim, dtype=dtype, device=device)
        self.clean = torch.empty(window, h, dim, dtype=dtype, device=device) if clean else None
        self.vectors = torch.empty(window, 5 if clean else 4, dim, dtype=dtype, device=device)
        self.scratch = torch.empty(window, h, dim, dtype=dtype, device=device)
        self.losses = torch.zeros(window, h, dtype=dtype, device=device)
        self.selected = torch.zeros(window, n, dtype=torch.bool, device=device) if selected else None
        self.idx = torch.empty(window, h, batch_size, dtype=torch.int64)
        self.idx_scratch = torch.empty(h, window, batch_size, dtype=torch.int64)
        #: per-slot views (``slots[k].sent`` is ``stacked[k, :h]``, …), made once
        self.slots = [
            _Slot(stacked=self.stacked[k], sent=self.stacked[k, :h], byz=self.stacked[k, h:],
                  clean=self.stacked[k, :h] if self.clean is None else self.clean[k],
                  displacement=self.vectors[k, 3])
            for k in range(window)
        ]
        self._kept: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def record(self, k: int, losses: Tensor, aggregate: Tensor, selected: Tensor | None, theta: Tensor,
               theta0: Tensor) -> None:
        """Keep what step ``k`` of the window needs for its metrics besides ``stacked`` and ``clean``.

        ``θ − θ₀`` is written now (θ changes in place); the step's losses, aggregate and selection
        are fresh tensors of the step, kept as they are until :meth:`metrics` (copied now for a
        window of one step, whose buffers are reused at once).
        """
        torch.sub(theta, theta0, out=self.slots[k].displacement)
        if self.window == 1:
            self.losses[0].copy_(losses)
            self.vectors[0, 1].copy_(aggregate)
            if self.selected is not None and selected is not None:
                self.selected[0].copy_(selected)
        else:
            if k == 0:
                self._kept.clear()
            self._kept.append((losses, aggregate, selected))

    def metrics(self, count: int) -> Tensor:
        """``(count, len(STEP_COLUMNS))`` float64 rows of the first ``count`` slots (:func:`window_metrics`;
        columns :data:`dpbr.simulation.metrics.STEP_COLUMNS`)."""
        h = self.h
        if self.window > 1:
            kept = self._kept[:count]
            torch.stack([t[0] for t in kept], out=self.losses[:count])
            self.vectors[:count, 1] = torch.stack([t[1] for t in kept])
            if self.selected is not None and all(t[2] is not None for t in kept):
                torch.stack([t[2] for t in kept], out=self.selected[:count])  # type: ignore[misc]
        return window_metrics(
            self.losses[:count], self.stacked[:count, :h],
            None if self.clean is None else self.clean[:count],
            self.stacked[:count, h:] if self.f > 0 else None,
            None if self.selected is None else self.selected[:count],
            self.vectors[:count], scratch=self.scratch[:count])

    def worker_norms(self, count: int) -> Tensor:
        """``(count, n)`` float64: ``‖x_i‖`` of every row the rule received in the first ``count`` slots
        (:func:`~dpbr.simulation.metrics.worker_norms`; one call per window)."""
        return worker_norms(self.stacked[:count])
