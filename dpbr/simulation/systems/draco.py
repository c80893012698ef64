"""DRACO as a step of the simulation: redundant gradient tasks, decoded by vote or by error location.

Chen, Wang, Charles & Papailiopoulos 2018, "DRACO: Byzantine-resilient distributed training via
redundant gradients", arXiv 1803.09877. The ``n`` workers compute gradient *tasks* (one mini-batch
gradient each) with redundancy ``r``:

* ``code=repetition`` — the workers form ``n/r`` groups of ``r`` consecutive workers; every worker of
  group ``g`` computes task ``g`` (the mini-batch drawn by the group's first worker) and sends it; the
  server takes the majority vote of each group (:func:`~dpbr.simulation.systems.codes.majority_vote`)
  and averages the decoded tasks. With ``r ≥ 2f + 1`` and at most ``f`` Byzantine workers every vote
  returns the honest value *exactly*, so the run is the adversary-free run bit for bit;
* ``code=cyclic`` — ``n`` tasks (task ``k`` drawn by worker ``k``), worker ``j`` computes tasks
  ``j..j+r−1 (mod n)`` and sends their combination ``Σ_k B_jk g_k`` with the cyclic gradient code ``B``
  of :func:`~dpbr.simulation.systems.codes.cyclic_encoding`; the server locates up to ``f`` corrupted
  messages and decodes ``Σ_k g_k`` (:func:`~dpbr.simulation.systems.codes.cyclic_decode`), the update
  being its mean. Exact in exact arithmetic; in float32 the decoded sum equals the adversary-free one
  to rounding (about 1e-6 relative).

Costs: every worker computes ``r`` gradients per step (``n·r`` in all), and sends one vector.

Privacy: each task gradient is clipped, then each honest worker applies the privacy mechanisms to
what it sends with its own generator — so with noise the replicas of a task differ and the exact vote
fails (no update that step), which is the survey's remark that redundancy and per-worker DP do not mix;
``vote=tolerance`` (``tol`` = the largest distance between agreeing replicas) restores the vote with the
guarantee stated in :func:`~dpbr.simulation.systems.codes.majority_vote`. A step whose groups all fail
(or whose cyclic decoding fails) applies no update.
"""

from __future__ import annotations

import torch

from dpbr import rng
from dpbr.simulation.systems import codes
from dpbr.simulation.systems.run import Protocol, StepOutcome, plain_step_cost

__all__ = ["Draco", "CYCLIC_TOLERANCE"]

#: Relative residual below which the cyclic decoder accepts a set of messages as consistent with the
#: code when ``tol`` is not given (float32 messages carry about 1e-7 relative rounding).
CYCLIC_TOLERANCE = 1e-4


class Draco(Protocol):
    """DRACO's step (module docstring)."""

    name = "draco"

    def __init__(self, sim) -> None:  # noqa: ANN001 - SystemSimulation (import cycle)
        super().__init__(sim)
        params = sim.system.params
        self.r, self.code = int(params["r"]), params["code"]
        self.tolerance = float(params["tol"])
        n = sim.spec.workers
        self.momentum_buf = torch.zeros_like(sim.oracle.theta)
        self.attack_state = None
        if self.code == "repetition":
            self.groups = codes.repetition_groups(n, self.r).to(sim.device)
            self.leaders = range(0, n, self.r)
            self.task_of = torch.arange(n, device=sim.device) // self.r
        else:
            self.encoding = codes.cyclic_encoding(n, self.r, rng.generator(sim.spec.seed, "code"))
            self.encoding_rows = self.encoding[:sim.h].to(sim.device)
            self.decode_gen = rng.generator(sim.spec.seed, "decode")
        self.cost = plain_step_cost(sim.spec, sim.dim, self.r)

    def step(self, s: int) -> StepOutcome:
        sim, n, h = self.sim, self.sim.spec.workers, self.sim.h
        tasks_range = self.leaders if self.code == "repetition" else range(n)
        x, y = sim._batch(sim.sampler.sample(tasks_range))
        tasks, task_losses = sim.gradients(x, y)
        sim._clip(tasks)  # each task gradient clipped (batch mode) before it is replicated or encoded
        if self.code == "repetition":
            clean = tasks.index_select(0, self.task_of[:h])
            losses = task_losses.index_select(0, self.task_of[:h])
        else:
            clean = (self.encoding_rows @ tasks.double()).to(tasks.dtype)
            losses = task_losses[:h]
        sent = sim.mechanise(clean)
        byz, self.attack_state = sim.forge(sent, None, self.attack_state)
        received, _, values = sim.transmit(sim.rows(sent, byz))
        if self.code == "repetition":
            aggregate, selected, extra = self._vote(received)
        else:
            aggregate, selected, extra = self._decode(received)
        applied = extra["decoded_fraction"] > 0
        if applied:
            sim.server_update(self.theta, self.momentum_buf, aggregate)
        values.update(extra, update_applied=float(applied))
        return StepOutcome(losses, clean, sent, byz, aggregate, selected, self.cost, values)

    def _vote(self, received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Majority vote per group; the mean of the decoded tasks, the rows that agree with their group's
        decoded value, and the decoded share and the count of rows that do not agree in decoded groups."""
        replicas = received[self.groups]  # (groups, r, d)
        decoded, ok = codes.majority_vote(replicas, self.tolerance)
        count = int(ok.sum())
        aggregate = (decoded[ok].mean(0) if count else torch.zeros_like(decoded[0]))
        if self.tolerance > 0:
            agree = (replicas - decoded[:, None]).norm(dim=2) <= self.tolerance
        else:
            agree = (replicas == decoded[:, None]).all(dim=2)
        agree &= ok[:, None]
        disagree = int((~agree & ok[:, None]).sum())
        return aggregate, agree.reshape(-1), {"decoded_fraction": count / ok.numel(), "located_byzantine": float(disagree)}

    def _decode(self, received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Locate and decode (cyclic code): the mean of the decoded tasks and the rows not located."""
        tol = self.tolerance if self.tolerance > 0 else CYCLIC_TOLERANCE
        total, adversaries, ok = codes.cyclic_decode(received, self.encoding, self.sim.spec.byzantine,
                                                     generator=self.decode_gen, tolerance=tol)
        n = received.shape[0]
        aggregate = total / n if ok else torch.zeros_like(total)
        return aggregate, ~adversaries.to(received.device), {"decoded_fraction": float(ok),
                                                             "located_byzantine": float(adversaries.sum())}
