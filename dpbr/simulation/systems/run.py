"""One run of a robust *system* (``dpbr train --system/--network/--staleness``): the loop and its shared steps.

:class:`SystemSimulation` is the engine's :class:`~dpbr.simulation.engine.Simulation` with another
step: the same data, gradient oracle, clipping, privacy pipeline, attack and rule, and the same
per-step metrics (:data:`~dpbr.simulation.metrics.STEP_COLUMNS`, from the vectors as sent), but each
step is the chosen system's protocol (:class:`Protocol`: :class:`SingleServer` here,
:class:`~dpbr.simulation.systems.draco.Draco`, :class:`~dpbr.simulation.systems.servers.GuanYu`,
:class:`~dpbr.simulation.systems.servers.LiuBei`) — a plain loop of one step at a time (no windows:
these runs measure systems, not the engine's throughput). Every step also records
:data:`SYSTEM_COLUMNS` (what the system did: groups decoded, packets lost, models rejected, the spread
of the honest servers' models, …) and the costs of :data:`~dpbr.simulation.systems.costs.COST_COLUMNS`
(gradient computations, messages, bytes, rounds and a simulated step time from the link model).

Conventions shared by the protocols: the honest workers are ``0..h−1`` and the Byzantine ones
``h..n−1`` (for DRACO's repetition code they are packed into the last group, the worst case for one
group); worker→server gradient messages cross the network (:func:`SystemSimulation.transmit`) after
the omniscient attack has forged its vectors; models sent by servers are not lost (AggregaThor's
lossy transport carries gradients). Everything random has its own generator seeded from
``(seed, purpose)`` — ``"network"``, ``"staleness"``, ``"servers"``, ``"quorum"``, ``"code"`` — so
the same spec and seed give the same records.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from dpbr import rng
from dpbr import system_catalog as catalog
from dpbr.simulation.buffers import StepBuffers
from dpbr.simulation.engine import RunResult, Simulation, _first_divergence
from dpbr.simulation.metrics import STEP_COLUMNS
from dpbr.simulation.systems import costs as cost_model
from dpbr.simulation.systems.network import transmit
from dpbr.simulation.timing import PHASES
from dpbr.spec import RunSpec

__all__ = ["SYSTEM_COLUMNS", "Protocol", "SingleServer", "StepOutcome", "SystemSimulation", "link_of",
           "plain_step_cost"]

#: Per-step columns every system run records beside the metrics and the costs (NaN where they do not apply).
SYSTEM_COLUMNS: tuple[str, ...] = (
    "update_applied",       # 1 when the (evaluated) server applied an update this step, 0 when it could not
    "decoded_fraction",     # DRACO: share of gradient groups (repetition) or of steps (cyclic) decoded
    "located_byzantine",    # DRACO: number of messages the decoder found corrupted (cyclic; votes lost: repetition)
    "packets_lost",         # share of the gradient packets lost on the network
    "messages_lost",        # gradient messages lost whole (fill=lost)
    "staleness_mean",       # mean age (steps) of the models the honest gradients were computed on
    "server_spread",        # max ‖θ_i − θ_1‖ over the honest servers (GuanYu, LiuBei)
    "worker_model_spread",  # max ‖w_j − θ_1‖ over the models the honest workers computed on
    "models_rejected",      # LiuBei: pulled models the workers' filters rejected
)


@dataclass
class StepOutcome:
    """What one step of a protocol leaves for the records.

    ``clean`` / ``sent`` are the honest gradients before / after the privacy pipeline (``(h, d)``),
    ``byz`` the forged vectors (``(f_real, d)`` or ``None``) — together what the metrics read;
    ``aggregate`` the update direction of the evaluated server; ``selected`` its rule's selection of the
    ``n`` rows (or ``None``); ``system`` the values of :data:`SYSTEM_COLUMNS` it sets; ``cost`` the step's
    :class:`~dpbr.simulation.systems.costs.StepCost`.
    """

    losses: Tensor
    clean: Tensor
    sent: Tensor
    byz: Tensor | None
    aggregate: Tensor
    selected: Tensor | None
    cost: Any
    system: dict[str, float] = field(default_factory=dict)


def link_of(network: catalog.NetworkSpec) -> cost_model.LinkModel:
    """The cost model's link for a parsed ``--network``."""
    return cost_model.LinkModel(latency_s=network.latency, bandwidth_bytes_per_s=network.bandwidth,
                                compute_s=network.compute)


def plain_step_cost(spec: RunSpec, dim: int, gradients_per_worker: int = 1) -> Any:
    """The cost of one step of the one trusted server (broadcast of θ, gather of the ``n`` gradients;
    ``gradients_per_worker`` mini-batch gradients per worker, ``r`` for DRACO): the cost columns of every
    run of the ordinary engine."""
    n = spec.workers
    transfers = [("servers", cost_model.broadcast(1, n, dim)), ("workers", cost_model.gather(n, 1, dim))]
    return cost_model.step_cost(gradients_per_worker, n, transfers, link_of(catalog.parse_network(spec.network)))


class Protocol:
    """One system's step. Subclasses set :attr:`name` and implement :meth:`step`; they read the run's
    shared pieces through ``self.sim`` (:class:`SystemSimulation`)."""

    name: ClassVar[str] = ""

    def __init__(self, sim: "SystemSimulation") -> None:
        self.sim = sim

    @property
    def theta(self) -> Tensor:
        """The model the run evaluates (θ of the trusted server, or of the first honest server)."""
        return self.sim.oracle.theta

    def step(self, s: int) -> StepOutcome:  # pragma: no cover - abstract
        """Run step ``s`` (0-based) and update the models."""
        raise NotImplementedError


class SingleServer(Protocol):
    """The one trusted parameter server, with the network's losses and bounded staleness.

    Step: every honest worker computes its gradient on the model of ``τ_i`` steps ago (``τ_i`` uniform
    in ``0..τ``, fewer at the start), the privacy pipeline runs, the attack forges its vectors, the
    ``n`` messages cross the network, and the server aggregates the delivered ones with ``--gar`` and
    the declared ``f``; when too few arrive for the rule's requirement it applies no update.
    """

    name = "server"

    def __init__(self, sim: "SystemSimulation") -> None:
        super().__init__(sim)
        self.momentum_buf = torch.zeros_like(sim.oracle.theta)
        self.gar_state: Any = None
        self.attack_state: Any = None
        self.history: collections.deque[Tensor] = collections.deque(maxlen=sim.spec.staleness + 1)

    def step(self, s: int) -> StepOutcome:
        sim = self.sim
        x, y = sim.honest_batches()
        ages = None
        if sim.spec.staleness:
            self.history.appendleft(self.theta.clone())
            ages = sim.draw_staleness(len(self.history) - 1)
            clean, losses = sim.gradients(x, y, models=torch.stack(list(self.history)), model_index=ages)
        else:
            clean, losses = sim.gradients(x, y)
        sent = sim.privatize(clean)
        byz, self.attack_state = sim.forge(sent, self.gar_state, self.attack_state)
        rows = sim.rows(sent, byz)
        received, delivered, network_values = sim.transmit(rows)
        agg, self.gar_state, applied = sim.aggregate_delivered(received, delivered, self.gar_state)
        if applied:
            sim.server_update(self.theta, self.momentum_buf, agg.value)
        values = {"update_applied": float(applied), **network_values}
        if ages is not None:
            values["staleness_mean"] = float(ages.double().mean())
        return StepOutcome(losses, clean, sent, byz, agg.value, agg.selected, sim.plain_cost, values)


class SystemSimulation(Simulation):
    """A run of the system, network and staleness of ``spec`` (module docstring)."""

    def __init__(self, spec: RunSpec, dataset: Any, device: torch.device, *, strategy: str = "auto",
                 chunk: int = 64) -> None:
        super().__init__(spec, dataset, device, strategy=strategy, chunk=chunk)
        from dpbr.simulation.systems import draco, servers

        self.system = catalog.parse_system(spec.system)  # checked, derived parameters filled in: RunSpec.create
        self.network = catalog.parse_network(spec.network)
        self.link = link_of(self.network)
        gen_dev = device if device.type == "cuda" else "cpu"
        self.network_gen = rng.generator(spec.seed, "network", None, gen_dev)
        self.staleness_gen = rng.generator(spec.seed, "staleness", None, "cpu")
        self.plain_cost = plain_step_cost(spec, self.dim)
        protocols: dict[str, Callable[[SystemSimulation], Protocol]] = {
            "server": SingleServer, "draco": draco.Draco, "guanyu": servers.GuanYu, "liubei": servers.LiuBei}
        self.protocol = protocols[self.system.name](self)

    # -- shared pieces of a step ------------------------------------------------------------------ #

    def honest_batches(self) -> tuple[Tensor, Tensor]:
        """The honest workers' mini-batches of this step (each from its own generator)."""
        return self._batch(self.sampler.sample(self._honest_workers))

    def draw_staleness(self, available: int) -> Tensor | None:
        """``(h,)`` int64 ages ``τ_i`` uniform in ``0..min(τ, available)`` (``None`` without staleness)."""
        if self.spec.staleness == 0:
            return None
        high = min(self.spec.staleness, available) + 1
        return torch.randint(high, (self.h,), generator=self.staleness_gen)

    def gradients(self, x: Tensor, y: Tensor, *, models: Tensor | None = None,
                  model_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Gradients ``(h, d)`` and losses ``(h,)`` of the batches ``x, y``: at the current θ, or worker ``i``
        at ``models[model_index[i]]`` (one gradient computation per distinct model; θ is restored)."""
        if models is None:
            grads, losses = self._raw_gradients(x, y)
            return grads.clone(), losses
        theta = self.oracle.theta
        saved = theta.clone()
        grads = torch.empty(x.shape[0], self.dim, dtype=self.dtype, device=self.device)
        losses = torch.empty(x.shape[0], dtype=self.dtype, device=self.device)
        try:
            for k in torch.unique(model_index).tolist():
                rows = (model_index == k).nonzero().flatten().to(x.device)
                theta.copy_(models[k])
                g, l = self._raw_gradients(x.index_select(0, rows), y.index_select(0, rows))
                grads[rows.to(self.device)] = g
                losses[rows.to(self.device)] = l
        finally:
            theta.copy_(saved)
        return grads, losses

    def privatize(self, clean: Tensor) -> Tensor:
        """Batch-mode clipping of ``clean`` (in place: it is the step's own tensor), then the privacy
        mechanisms with the honest workers' generators; returns the vectors sent."""
        honest = self._clip(clean)
        if self.mechanism is None:
            return honest.clone()
        return self.mechanism(honest, generator=self.noise_gens)

    def mechanise(self, rows: Tensor) -> Tensor:
        """The privacy mechanisms after clipping (noise, sparsification, quantization) on ``rows`` (one per
        honest worker, in worker order), without clipping them (DRACO clips the task gradients before
        encoding: clipping an encoded message would break the code)."""
        return rows.clone() if self.mechanism is None else self.mechanism(rows, generator=self.noise_gens)

    def forge(self, sent: Tensor, gar_state: Any, attack_state: Any) -> tuple[Tensor | None, Any]:
        """The ``f_real`` Byzantine vectors forged from the vectors sent (omniscient attack), and the
        attack's next state."""
        if self.f_real == 0:
            return None, attack_state
        forged = self._forge(sent, gar_state, attack_state)
        return forged.value, forged.state

    @staticmethod
    def rows(sent: Tensor, byz: Tensor | None) -> Tensor:
        """The ``n`` messages in worker order: honest rows, then the Byzantine ones."""
        return sent if byz is None else torch.cat([sent, byz])

    def transmit(self, rows: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        """The messages as received over the network: ``(values, delivered (n,) bool, system values)``."""
        delivered = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
        if self.network.name != "lossy":
            return rows, delivered, {}
        out = transmit(rows, self.network.drop, link=self.link, fill=self.network.fill_mode, generator=self.network_gen)
        lost = float(out.packets_lost.sum()) / max(out.packets * rows.shape[0], 1)
        return out.values, out.delivered, {"packets_lost": lost, "messages_lost": float((~out.delivered).sum())}

    def aggregate_delivered(self, received: Tensor, delivered: Tensor, state: Any,
                            rule: Any = None) -> tuple[Any, Any, bool]:
        """The rule (``--gar`` unless given) on the delivered rows with the declared ``f``: ``(aggregation
        with its selection spread over the n rows, next state, applied)``. When fewer rows arrive than the
        rule needs, the aggregate is 0 and ``applied`` is False."""
        from dpbr.robust.aggregators import Aggregation

        rule = self.rule if rule is None else rule
        n = received.shape[0]
        if bool(delivered.all()):
            agg = rule.aggregate(received, self.spec.byzantine, generator=self.gar_gen, state=state)
            return agg, agg.state, True
        rows = delivered.nonzero().flatten()
        try:
            rule.check(rows.numel(), self.spec.byzantine)
        except ValueError:
            return Aggregation(torch.zeros(self.dim, dtype=self.dtype, device=self.device)), state, False
        agg = rule.aggregate(received.index_select(0, rows), self.spec.byzantine, generator=self.gar_gen, state=state)
        selected = None
        if agg.selected is not None:
            selected = torch.zeros(n, dtype=torch.bool, device=received.device)
            selected[rows] = agg.selected
        return Aggregation(agg.value, selected, agg.state), agg.state, True

    def server_update(self, theta: Tensor, momentum_buf: Tensor, aggregate: Tensor) -> None:
        """A server's SGD step with momentum (PyTorch semantics, as the engine's): ``m ← μ·m + g``,
        ``θ ← θ − λ·m``, in place."""
        momentum_buf.mul_(self.spec.momentum).add_(aggregate)
        theta.add_(momentum_buf, alpha=-self.spec.lr)

    # -- the loop ---------------------------------------------------------------------------------- #

    def run(self, *, progress: Callable[[int, float | None], None] | None = None,
            checkpoint: Callable[[int, Tensor], None] | None = None,
            checkpoint_steps: frozenset[int] = frozenset()) -> RunResult:
        """Run ``spec.steps`` steps of the protocol; the records of :class:`RunResult` plus the per-step
        :data:`SYSTEM_COLUMNS` and cost columns in ``result.columns``."""
        with torch.no_grad():
            return self._run_system(progress, checkpoint, checkpoint_steps)

    def _run_system(self, progress: Callable[[int, float | None], None] | None,
                    checkpoint: Callable[[int, Tensor], None] | None, checkpoint_steps: frozenset[int]) -> RunResult:
        spec, steps, n = self.spec, self.spec.steps, self.spec.workers
        theta = self.oracle.theta
        buf = StepBuffers(1, self.h, self.f_real, self.dim, spec.batch_size, self.dtype, self.device,
                          clean=True, selected=self.rule.selects or self.system.name == "draco")
        slot = buf.slots[0]
        metrics = torch.full((steps, len(STEP_COLUMNS)), math.nan, dtype=torch.float64)
        norms = torch.full((steps, n), math.nan, dtype=torch.float64)
        selections = torch.zeros(steps, n, dtype=torch.bool) if buf.selected is not None else None
        system = torch.full((steps, len(SYSTEM_COLUMNS)), math.nan, dtype=torch.float64)
        costs = torch.full((steps, len(cost_model.COST_COLUMNS)), math.nan, dtype=torch.float64)
        # the protocols do not time their phases: the phase columns stay NaN, ``seconds_step`` holds the step
        phase_seconds = torch.full((steps, len(PHASES)), math.nan, dtype=torch.float64)
        step_seconds = torch.full((steps,), math.nan, dtype=torch.float64)
        evaluations: dict[int, tuple[float, float]] = {}
        status, diverged_at, done = "completed", None, 0
        if checkpoint is not None and 0 in checkpoint_steps:
            checkpoint(0, theta)
        if spec.eval_every > 0:
            evaluations[0] = tuple(float(v) for v in self.evaluate())  # type: ignore[assignment]
        last_acc = evaluations[0][0] if 0 in evaluations else None
        for s in range(steps):
            started = time.perf_counter()
            out = self.protocol.step(s)
            slot.clean.copy_(out.clean)
            slot.sent.copy_(out.sent)
            if out.byz is not None:
                slot.byz.copy_(out.byz)
            buf.record(0, out.losses, out.aggregate, out.selected, theta, self.theta0)
            metrics[s] = buf.metrics(1)[0].cpu()
            norms[s] = buf.worker_norms(1)[0].cpu()
            if selections is not None and out.selected is not None:
                selections[s] = out.selected.cpu()
            for key, value in out.system.items():
                system[s, SYSTEM_COLUMNS.index(key)] = value
            costs[s] = torch.tensor(list(out.cost.as_row().values()), dtype=torch.float64)
            step_seconds[s] = time.perf_counter() - started
            done = s + 1
            if done % 10 == 0 or done == steps:
                diverged_at = _first_divergence(metrics, done, 10)
                if diverged_at is not None:
                    status, done = "diverged", diverged_at
                    break
            if done in checkpoint_steps and checkpoint is not None:
                checkpoint(done, theta)
            if spec.eval_every > 0 and (done % spec.eval_every == 0 or done == steps):
                evaluations[done] = tuple(float(v) for v in self.evaluate())  # type: ignore[assignment]
                last_acc = evaluations[done][0]
            if progress is not None:
                progress(done, last_acc)
        if status == "completed" and spec.eval_every == 0:
            evaluations[done] = tuple(float(v) for v in self.evaluate())  # type: ignore[assignment]
        columns = {name: system[:done, j] for j, name in enumerate(SYSTEM_COLUMNS)}
        columns.update({name: costs[:done, j] for j, name in enumerate(cost_model.COST_COLUMNS)})
        columns["seconds_step"] = step_seconds[:done]
        return RunResult(
            steps_done=done, metrics=metrics[:done], phase_seconds=phase_seconds[:done],
            evaluations={k: v for k, v in evaluations.items() if k <= done}, status=status, diverged_at=diverged_at,
            facts={"strategy": self.strategy, "dim": self.dim, "noise_sigma": self.noise_sigma},
            worker_norms=norms[:done], selected=None if selections is None else selections[:done],
            columns=columns,
        )
