"""Replicated parameter servers, some Byzantine: GuanYu and LiuBei as steps of the simulation.

* **GuanYu** — El Mhamdi, Guerraoui, Guirguis & Rouault 2019, "SGD: Decentralized Byzantine
  resilience", arXiv 1905.03853. ``m`` servers, ``f̄`` of them Byzantine. One step, three rounds:
  (1) every honest worker takes the coordinate-wise median of a quorum of ``q̄`` server models;
  (2) it computes its gradient there and sends it to every server; every honest server aggregates a
  quorum of ``q`` gradients with the run's rule (``--gar``, e.g. Multi-Krum) and takes an SGD step with
  its own momentum; (3) the servers exchange models and every honest server keeps the coordinate-wise
  median of a quorum of ``q̄`` of them. Quorums are filled adversarially: every Byzantine reply that is
  sent is in the quorum, the rest are honest replies in a random order (seeded). With ``f̄ = 0`` and
  full quorums (``q = n``, ``q̄ = m``) every server holds the single trusted server's model.
* **LiuBei** — El Mhamdi, Guerraoui & Guirguis 2020, "Fast machine learning with Byzantine workers and
  servers", PODC 2020. Every honest worker pulls the model of *one* server (server ``(j + t) mod m``
  for worker ``j`` at step ``t``) and keeps it only if it passes two filters, otherwise it asks the
  next server (one more round and one more gradient computation):
  the *Lipschitz filter* — the growth coefficient ``k = ‖g(θ_pulled) − g_prev‖ / ‖θ_local − θ_prev‖``,
  ``θ_local = θ_prev − λ·g_prev`` the worker's own estimate of the next model, must not exceed the
  ``(m − f̄)/m`` quantile of every coefficient the worker computed before, from any server (accepted
  while it has none: with at most ``f̄`` of ``m`` servers Byzantine their coefficients fall above that
  quantile, and with a stationary spread of honest ``k`` an honest model is refused about ``f̄/m`` of
  the time, by design); and the *model filter* —
  ``‖θ_prev − λ·g_prev − θ_pulled‖ ≤ λ‖g_prev‖·((3T + 2)(n − f)/(4f) + 2((t − 1) mod T))`` (``g_prev``
  clipped as the worker sent it: the rule's guarantee bounds the update by what was sent) with
  ``T`` the gather period (no bound when ``f = 0``); at the first step, when there is no gradient yet,
  only the common initial model passes. Gradients go to every server, which aggregates all ``n`` with
  the rule; every ``T`` steps the servers median their models (the gather phase). (A worker whose
  ``m`` pulls all fail takes the coordinate-wise median of the ``m`` models, as GuanYu's workers do:
  dpbr's choice, so that a worker is never left on a model no server holds.) The model filter's
  bound assumes plain SGD: with server momentum the honest models move further than it allows, which
  the run records as rejected models.

Byzantine servers (``attack=``): ``random`` — each sends ``θ̄ + σ·ξ`` with ``ξ ~ N(0, I)`` and
``σ = 10·max(‖θ̄‖, 1)/√d`` (``θ̄`` the honest servers' mean model), the same to every recipient;
``negate`` — ``−θ̄``; ``equivocate`` — a different random model (as ``random``) to every recipient;
``silent`` — no reply (quorums wait for honest servers; LiuBei's worker asks the next server).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from dpbr import rng
from dpbr.robust import aggregators
from dpbr.simulation.systems import costs
from dpbr.simulation.systems.run import Protocol, StepOutcome

__all__ = ["GuanYu", "LiuBei", "byzantine_models", "coordinate_median"]


def coordinate_median(models: Tensor) -> Tensor:
    """Coordinate-wise median of the rows of ``models`` (``(k, d)``, or ``(S, k, d)`` → ``(S, d)``), as dpbr's
    ``median`` rule computes it (the mean of the two middle values for an even ``k``)."""
    return aggregators.get("median").aggregate(models, 0).value


def byzantine_models(honest: Tensor, count: int, recipients: int, attack: str,
                     generator: torch.Generator) -> Tensor | None:
    """The models ``count`` Byzantine servers send to each of ``recipients``: ``(recipients, count, d)``,
    or ``None`` when they are silent (module docstring: ``random``, ``negate``, ``equivocate``)."""
    if count == 0 or attack == "silent":
        return None
    mean = honest.mean(0)
    d = mean.numel()
    if attack == "negate":
        return (-mean).expand(recipients, count, d)
    sigma = 10.0 * max(float(mean.norm()), 1.0) / math.sqrt(d)
    draws = 1 if attack == "random" else recipients
    noise = torch.randn(draws, count, d, generator=generator, device=generator.device, dtype=mean.dtype)
    return (mean + sigma * noise.to(mean.device)).expand(recipients, count, d)


class _Servers(Protocol):
    """What both replicated-server systems hold: the honest servers' models and momenta, the rule's
    state per server, the Byzantine servers' generator."""

    def __init__(self, sim) -> None:  # noqa: ANN001 - SystemSimulation (import cycle)
        super().__init__(sim)
        p = sim.system.params
        self.m, self.fbar, self.server_attack = int(p["m"]), int(p["byzantine"]), p["attack"]
        self.honest_servers = self.m - self.fbar
        theta = sim.oracle.theta
        self.models = theta.expand(self.honest_servers, -1).clone()
        self.momenta = torch.zeros_like(self.models)
        self.gar_states: list[Any] = [None] * self.honest_servers
        self.attack_state: Any = None
        gen_dev = sim.device if sim.device.type == "cuda" else "cpu"
        self.server_gen = rng.generator(sim.spec.seed, "servers", None, gen_dev)
        self.quorum_gen = rng.generator(sim.spec.seed, "quorum", None, "cpu")

    @property
    def speaking(self) -> int:
        """How many servers send messages: all ``m``, or the honest ones when the Byzantine ones are silent."""
        return self.honest_servers if self.server_attack == "silent" else self.m

    def exchange(self) -> costs.Transfer:
        """The servers' all-to-all round: every speaking server sends its model to the ``m − 1`` others."""
        if self.speaking == self.m:
            return costs.exchange(self.m, values=self.sim.dim)
        messages = self.speaking * (self.m - 1)
        return costs.Transfer(senders=self.speaking, receivers=self.m, messages=messages,
                              values_per_message=self.sim.dim, max_in_messages=self.speaking,
                              max_out_messages=self.m - 1)

    def replies(self, recipients: int) -> Tensor | None:
        """The Byzantine servers' models for ``recipients`` (``(recipients, f̄, d)``) or ``None``."""
        return byzantine_models(self.models, self.fbar, recipients, self.server_attack, self.server_gen)

    def honest_order(self, count: int, total: int) -> Tensor:
        """``count`` rows of random orders of ``0..total−1`` (which honest replies arrive first)."""
        return torch.stack([torch.randperm(total, generator=self.quorum_gen) for _ in range(count)])

    def quorum_medians(self, recipients: int, quorum: int, models: Tensor | None = None) -> Tensor:
        """Each recipient's coordinate-wise median of a quorum of ``quorum`` server models (the honest servers'
        ``models``, their current ones by default): every Byzantine reply sent, then honest models in a
        random order. ``(recipients, d)``."""
        models = self.models if models is None else models
        byz = byzantine_models(models, self.fbar, recipients, self.server_attack, self.server_gen)
        nbyz = 0 if byz is None else byz.shape[1]
        take = quorum - nbyz
        order = self.honest_order(recipients, self.honest_servers)[:, :take].to(models.device)
        chosen = models[order]  # (recipients, take, d)
        stack = chosen if byz is None else torch.cat([byz.to(chosen.dtype), chosen], dim=1)
        return coordinate_median(stack)

    def aggregate_at(self, i: int, received: Tensor, delivered: Tensor, quorum: int) -> tuple[Any, bool]:
        """Server ``i``'s rule on a quorum of ``quorum`` delivered gradients (the Byzantine ones first):
        ``(aggregation over the n rows, applied)``."""
        sim, n, h = self.sim, received.shape[0], self.sim.h
        mask = delivered.clone()
        if quorum < n:
            keep = torch.zeros(n, dtype=torch.bool, device=received.device)
            byz_rows = torch.arange(h, n, device=received.device)
            keep[byz_rows[delivered[h:]]] = True
            honest_rows = self.honest_order(1, h)[0].to(received.device)
            honest_rows = honest_rows[delivered[honest_rows]]
            room = max(quorum - int(keep.sum()), 0)
            keep[honest_rows[:room]] = True
            mask = keep
        agg, self.gar_states[i], applied = sim.aggregate_delivered(received, mask, self.gar_states[i])
        return agg, applied

    def spread(self) -> float:
        """``max_i ‖θ_i − θ_1‖`` over the honest servers."""
        return float((self.models - self.models[0]).norm(dim=1).max())

    def publish(self) -> None:
        """The evaluated model (θ of the run) becomes the first honest server's."""
        self.sim.oracle.theta.copy_(self.models[0])


class GuanYu(_Servers):
    """GuanYu's step (module docstring)."""

    name = "guanyu"

    def __init__(self, sim) -> None:  # noqa: ANN001
        super().__init__(sim)
        p = sim.system.params
        self.q, self.qbar = int(p["q"]), int(p["qbar"])
        #: the honest servers' models of the last τ + 1 steps, newest first (bounded staleness)
        self.history: collections.deque[Tensor] = collections.deque(maxlen=sim.spec.staleness + 1)
        n, d = sim.spec.workers, sim.dim
        transfers = [("servers", costs.broadcast(self.speaking, n, d)), ("workers", costs.gather(n, self.m, d)),
                     ("servers", self.exchange())]
        self.cost = costs.step_cost(1, n, transfers, sim.link)

    def step(self, s: int) -> StepOutcome:
        sim, h = self.sim, self.sim.h
        ages = None
        if sim.spec.staleness:  # worker j computes on the servers' models of τ_j steps ago (asynchrony)
            self.history.appendleft(self.models.clone())
            ages = sim.draw_staleness(len(self.history) - 1)
            worker_models = torch.empty(h, sim.dim, dtype=sim.dtype, device=sim.device)
            for age in torch.unique(ages).tolist():
                rows = (ages == age).nonzero().flatten()
                worker_models[rows] = self.quorum_medians(rows.numel(), self.qbar, self.history[age])
        else:
            worker_models = self.quorum_medians(h, self.qbar)
        x, y = sim.honest_batches()
        same = bool((worker_models == worker_models[0]).all())
        theta = sim.oracle.theta
        if same:  # every worker computes on one model (no Byzantine server reached anyone): one batched call
            saved = theta.clone()
            theta.copy_(worker_models[0])
            clean, losses = sim.gradients(x, y)
            theta.copy_(saved)
        else:
            clean, losses = sim.gradients(x, y, models=worker_models,
                                          model_index=torch.arange(h, device=worker_models.device))
        worker_spread = float((worker_models - self.models[0]).norm(dim=1).max())
        sent = sim.privatize(clean)
        byz, self.attack_state = sim.forge(sent, self.gar_states[0], self.attack_state)
        rows = sim.rows(sent, byz)
        first = None
        network: dict[str, float] = {}
        applied_first = False
        for i in range(self.honest_servers):
            received, delivered, net = sim.transmit(rows)
            agg, applied = self.aggregate_at(i, received, delivered, self.q)
            if applied:
                sim.server_update(self.models[i], self.momenta[i], agg.value)
            if i == 0:
                first, network, applied_first = agg, net, applied
        self.models = self.quorum_medians(self.honest_servers, self.qbar) if self.m > 1 else self.models
        self.publish()
        values = {"update_applied": float(applied_first), "server_spread": self.spread(),
                  "worker_model_spread": worker_spread, **network}
        if ages is not None:
            values["staleness_mean"] = float(ages.double().mean())
        return StepOutcome(losses, clean, sent, byz, first.value, first.selected, self.cost, values)


class LiuBei(_Servers):
    """LiuBei's step (module docstring)."""

    name = "liubei"

    def __init__(self, sim) -> None:  # noqa: ANN001
        super().__init__(sim)
        self.period = int(sim.system.params["gather"])
        h = sim.h
        self.prev_models = sim.oracle.theta.expand(h, -1).clone()
        self.prev_grads: Tensor | None = None   # each worker's last gradient (before clipping): Lipschitz filter
        self.prev_steps: Tensor | None = None   # … after clipping (what bounds the update): model filter
        self.coefficients: list[list[float]] = [[] for _ in range(h)]
        self.quantile = (self.m - self.fbar) / self.m

    def _bound(self, s: int) -> float:
        """The model filter's factor ``(3T + 2)(n − f)/(4f) + 2((t − 1) mod T)`` (``inf`` when ``f = 0``)."""
        n, f, T = self.sim.spec.workers, self.sim.spec.byzantine, self.period
        if f == 0:
            return math.inf
        return (3 * T + 2) * (n - f) / (4 * f) + 2 * ((s - 1) % T)

    def _accepts(self, j: int, model: Tensor, grad: Tensor, s: int) -> tuple[bool, float]:
        """Both filters for worker ``j`` and a pulled ``model`` with its gradient ``grad``: (accepted, k)."""
        if self.prev_grads is None:  # first step: every honest server still holds the common initial model
            return bool(torch.equal(model, self.prev_models[j])), math.nan
        prev_model, prev_grad, lr = self.prev_models[j], self.prev_grads[j], self.sim.spec.lr
        step = self.prev_steps[j]  # type: ignore[index]
        local_step = lr * float(step.norm())  # ‖θ_local − θ_prev‖ of the local estimate θ_prev − λ·g_prev
        growth = float((grad - prev_grad).norm())
        k = 0.0 if growth == 0 else (math.inf if local_step == 0 else growth / local_step)
        if not math.isfinite(float(model.sum())):
            return False, k
        history = self.coefficients[j]
        lipschitz = not history or k <= _quantile(history, self.quantile)
        distance = float((prev_model - lr * step - model).norm())
        within = distance <= local_step * self._bound(s)
        return lipschitz and within, k

    def step(self, s: int) -> StepOutcome:
        sim, h, n, d = self.sim, self.sim.h, self.sim.spec.workers, self.sim.dim
        x, y = sim.honest_batches()
        byz = self.replies(1)  # what the Byzantine servers answer this step (one model each, or silent)
        offered = self.models if byz is None else torch.cat([self.models, byz[0].to(self.models.dtype)])
        # server p of the m: honest ones first in `offered`, Byzantine ones after (silent ones have no row)
        available = offered.shape[0]
        pulls = torch.tensor([(j + s) % self.m for j in range(h)])
        clean = torch.empty(h, d, dtype=sim.dtype, device=sim.device)
        losses = torch.empty(h, dtype=sim.dtype, device=sim.device)
        chosen = torch.empty(h, d, dtype=sim.dtype, device=sim.device)
        pending = list(range(h))
        computations, rejected, pulls_per_round = 0, 0, []
        for attempt in range(self.m + 1):
            if not pending:
                break
            if attempt < self.m:
                pulls_per_round.append(len(pending))
            rows = torch.tensor(pending)
            if attempt < self.m:
                servers = (pulls[rows] + attempt) % self.m
                reachable = servers < available
                models = offered[servers.clamp(max=available - 1)]
                # a silent server answers nothing: the worker moves on to the next one
                models[~reachable] = math.nan
            else:  # no server passed: the coordinate-wise median of every model offered (all m pulled)
                reachable = torch.ones(len(pending), dtype=torch.bool)
                models = coordinate_median(offered).expand(len(pending), -1).clone()
            live = reachable.nonzero().flatten()
            grads = torch.full((len(pending), d), math.nan, dtype=sim.dtype, device=sim.device)
            ls = torch.full((len(pending),), math.nan, dtype=sim.dtype, device=sim.device)
            if live.numel():
                g, l = sim.gradients(x[rows[live]], y[rows[live]], models=models[live],
                                     model_index=torch.arange(live.numel()))
                grads[live], ls[live] = g, l
                computations += live.numel()
            still = []
            for t, j in enumerate(pending):
                ok, k = (True, math.nan) if attempt == self.m else (
                    self._accepts(j, models[t], grads[t], s) if bool(reachable[t]) else (False, math.nan))
                if math.isfinite(k):  # every coefficient the worker computed, accepted or not
                    self.coefficients[j].append(k)
                if ok:
                    clean[j], losses[j], chosen[j] = grads[t], ls[t], models[t]
                else:
                    rejected += int(bool(reachable[t]))
                    still.append(j)
            pending = still
        self.prev_models, self.prev_grads = chosen.clone(), clean.clone()
        worker_spread = float((chosen - self.models[0]).norm(dim=1).max())
        sent = sim.privatize(clean)  # clips `clean` in place (batch mode)
        self.prev_steps = clean.clone()
        byz_rows, self.attack_state = sim.forge(sent, self.gar_states[0], self.attack_state)
        rows_all = sim.rows(sent, byz_rows)
        first, network, applied_first = None, {}, False
        for i in range(self.honest_servers):
            received, delivered, net = sim.transmit(rows_all)
            agg, applied = self.aggregate_at(i, received, delivered, n)
            if applied:
                sim.server_update(self.models[i], self.momenta[i], agg.value)
            if i == 0:
                first, network, applied_first = agg, net, applied
        gather = (s + 1) % self.period == 0 and self.m > 1
        if gather:
            self.models = self.quorum_medians(self.honest_servers, self.m - (self.fbar if self.server_attack == "silent" else 0))
        self.publish()
        # one pull round per attempt (the workers still looking ask their next server), the gradients to
        # every server, and the gather round every T steps; the slowest worker computed `attempts` gradients
        transfers = [("servers", costs.Transfer(senders=self.m, receivers=h, messages=count, values_per_message=d,
                                                max_in_messages=1, max_out_messages=-(-count // self.m)))
                     for count in pulls_per_round]
        transfers.append(("workers", costs.gather(n, self.m, d)))
        if gather:
            transfers.append(("servers", self.exchange()))
        cost = costs.step_cost(max(len(pulls_per_round), 1), n, transfers, sim.link)
        cost = dataclasses.replace(cost, gradient_computations=computations + sim.f_real)
        values = {"update_applied": float(applied_first), "server_spread": self.spread(),
                  "worker_model_spread": worker_spread, "models_rejected": float(rejected), **network}
        return StepOutcome(losses, clean, sent, byz_rows, first.value, first.selected, cost, values)


def _quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation, as ``numpy.quantile``'s default)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
