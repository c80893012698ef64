"""The simulated parameter server of ``dpbr train``: one :class:`~dpbr.spec.RunSpec` → per-step records.

Modules
-------
:mod:`~dpbr.simulation.engine`
    :class:`Simulation`: a run, whose step is its phases — data, gradients, privacy, attack,
    aggregation, update, record — and :class:`RunResult`.
:mod:`~dpbr.simulation.batch`
    :class:`SeedBatch`: the seeds of a cell, or cells that differ only in scalars (:func:`group_key`),
    as one simulation on ``(S, n, d)`` stacks; each member's records equal its single run's.
:mod:`~dpbr.simulation.oracle`
    How the gradients are computed: :func:`choose_strategy` (the one policy, also used by the VN
    measurement), :class:`GradientOracle`, the logistic model's closed form.
:mod:`~dpbr.simulation.partitions`
    Which examples each worker holds (:func:`partition`) and draws at each step.
:mod:`~dpbr.simulation.buffers`
    The tensors a run reuses at every step (a window of steps for small models).
:mod:`~dpbr.simulation.metrics`
    The per-step metrics (:data:`STEP_COLUMNS`), from the vectors or from the rule's Gram matrix.
:mod:`~dpbr.simulation.timing`
    Seconds per phase of each step (:data:`PHASES`).
"""

from __future__ import annotations

from dpbr.simulation.batch import SeedBatch, group_key
from dpbr.simulation.engine import RunResult, ServerRule, Simulation
from dpbr.simulation.metrics import STEP_COLUMNS, copies_gram, gram_step_metrics, window_metrics
from dpbr.simulation.oracle import GradientOracle, LogisticGradients, choose_strategy
from dpbr.simulation.partitions import partition
from dpbr.simulation.timing import PHASES

__all__ = ["GradientOracle", "LogisticGradients", "PHASES", "RunResult", "STEP_COLUMNS", "SeedBatch", "ServerRule",
           "Simulation", "group_key",
           "choose_strategy", "copies_gram", "gram_step_metrics", "partition", "window_metrics"]
