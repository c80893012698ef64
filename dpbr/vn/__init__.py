r"""VN-ratio estimation: the condition the study's theory rests on, measured.

The variance-to-norm ratio of the vectors honest workers send (Guerraoui, Gupta, Pinot, Rouault,
Stephan 2021, arXiv 2102.08166),

.. math:: r(b) = \frac{\sqrt{\mathbb E\|G - \mathbb E G\|^2}}{\|\mathbb E G\|}
          = \frac{\sqrt{V(b) + d\,\sigma(b)^2}}{\|\mathbb E G^s\|},

is a sufficient condition for a rule ``F`` to be (α, f)-Byzantine resilient when ``r ≤ k_F(n, f)``.
Here ``G^s`` is the clipped mini-batch gradient of size ``b`` and ``σ(b) = (2C/b)·sqrt(2 ln(1.25/δ))/ε``
the Gaussian privacy noise.

Modules:

* :mod:`dpbr.vn.stats` — the estimator from ``K`` samples (pair U-statistics over one Gram matrix)
  and its percentile-bootstrap interval; the noise check against ``d·σ²``;
* :mod:`dpbr.vn.measure` — clipped mini-batch gradients of a model at given parameters (batched over
  mini-batches), the reference (full-data) gradient, one result row per :class:`dpbr.spec.VNSpec`;
* :mod:`dpbr.vn.bounds` — ``k_F(n, f)`` of every rule with a bound, the smallest batch size meeting it
  (interpolated, or extrapolated with ``V(b) = A/b + D/b²``), Table-1 scalings, the η-approximated
  condition along a trajectory;
* the ``dpbr vn`` job (cells × checkpoints → Parquet) is :mod:`dpbr.jobs.vn`.
"""

from dpbr.vn.bounds import eta_table, minimal_b_table, minimal_batch_size, rule_bounds, table1_batch_size
from dpbr.vn.measure import Problem, make_problem, measure, minibatch_gradients, reference_gradient
from dpbr.vn.stats import RatioEstimate, estimate_ratio, noise_check, pair_statistics

__all__ = [
    "Problem",
    "RatioEstimate",
    "estimate_ratio",
    "eta_table",
    "make_problem",
    "measure",
    "minibatch_gradients",
    "minimal_b_table",
    "minimal_batch_size",
    "noise_check",
    "pair_statistics",
    "reference_gradient",
    "rule_bounds",
    "table1_batch_size",
]
