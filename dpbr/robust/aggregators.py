"""Robust aggregation rules (GARs) on stacked ``(n, d)`` tensors, and the pre-aggregators that compose with them.

Usage::

    from dpbr.robust import aggregators
    rule = aggregators.get("bucketing(s=2)+krum")
    g = rule(G, f, generator=gen)                       # Tensor[d]
    out = rule.aggregate(G, f, generator=gen, state=s)   # Aggregation(value, selected, state)
    out = rule.aggregate(GS, f, generator=[g0, g1, g2])  # a batch GS (3, n, d): value (3, d)
    rule.requirement, rule.min_workers(f), rule.check(n, f), rule.vn_bound(n, f)

Rules (``names()``; aliases in brackets; requirement on ``n`` workers and ``f`` Byzantine ones)
-------------------------------------------------------------------------------------------
- ``average`` [mean, avg]: ``(1/n) Σ x_i``. ``n ≥ 1``.
- ``krum(neighbours)``: the ``x_k`` minimising ``Σ_{j ∈ N_k} ‖x_k − x_j‖²`` over its ``n − f − 2``
  nearest other rows ``N_k`` (``neighbours=n-f-1``: ByzFL's count). ``n ≥ 2f + 3``.
- ``multi-krum(m, neighbours)``: mean of the ``m`` best Krum scores (default ``m = n − f``).
  ``n ≥ 2f + 3``, ``n ≥ f + m``.
- ``median`` [cm]: coordinate-wise median (even ``n``: midpoint). ``n ≥ 2f + 1``.
- ``trimmed-mean`` [tm]: per coordinate, drop the ``f`` largest and ``f`` smallest values and
  average the rest. ``n ≥ 2f + 1``.
- ``meamed``: per coordinate, the mean of the ``n − f`` values closest to the median. ``n ≥ 2f + 1``.
- ``mda(ties)`` [brute]: mean of the ``n − f`` rows of minimum diameter (ties: the tightest subset,
  or LPD's first). ``n ≥ 2f + 1``.
- ``bulyan``: ``θ = n − 2f`` rows by repeated Krum, then per coordinate the mean of the
  ``β = θ − 2f`` values closest to the median. ``n ≥ 4f + 3``.
- ``geometric-median(nu, iters)`` [rfa, gm]: smoothed Weiszfeld (``ν = 0.1``, 8 iterations).
  ``n ≥ 2f + 1``.
- ``centered-clipping(tau, iters, scale, beta)`` [cc]: ``v ← v + (1/n) Σ clip_τ(x_i − v)`` from
  ``v₀ = state`` (``τ = 10``, 3 iterations; ``scale=linear|sqrt`` with ``beta`` uses ``τ/(1 − β)`` or
  ``τ/sqrt(1 − β)``). ``n ≥ 1``.

Pre-aggregators, written before a rule and joined with ``+`` (``"bucketing(s=2)+nnm+cc(tau=1)"``):
``bucketing(s)`` (random buckets of ``s``, averaged; Karimireddy et al. 2022) and ``nnm`` (nearest
neighbour mixing; Allouah et al. 2023). See :class:`Bucketing` and :class:`NNM` for how they combine
the requirement and the VN bound of the rule they wrap.

Contract of every rule
----------------------
- Input ``G``: ``(n, d)`` tensor of any floating dtype on any device; output ``(d,)`` of the same dtype
  and device, a new tensor (never a view of ``G``); ``G`` is never modified.
- Batch form: ``G`` of shape ``(S, n, d)`` holds ``S`` independent problems (e.g. ``S`` seeds of one
  cell). The result is ``Aggregation(value (S, d), selected (S, n) bool or None, state (S, d) or
  None)`` and slice ``s`` equals ``rule.aggregate(G[s], f, generator=gens[s], state=states[s])``
  (``rule(G, f)`` returns the ``(S, d)`` values). ``generator`` is ``None`` or one generator (shared:
  the slices draw from it in turn, slice 0 first) or a sequence of ``S`` generators (slice ``s`` makes
  exactly the draws of the 2-D call with generator ``s``); ``state`` is ``None`` or per slice
  (centered clipping: a ``(S, d)`` tensor, or ``S`` tensors ``(d,)``); ``gram`` may be ``(S, n, n)``.
  Non-finite rows are handled per slice as below. Every rule and pre-aggregator runs a batch as one
  vectorised computation — batched distances, ``topk``, sorts and selections, one ``embedding_bag``
  for the means — with loops only where the 2-D kernel has them, plus: drawing the bucketing
  permutations (one ``randperm`` per slice, so that each slice draws from its own generator, then one
  batched gather), the Gram matrices on the CPU (one blocked product per slice,
  :func:`dpbr.linalg.gram`, so that they equal the 2-D ones bit for bit) and MDA's subset table in
  chunks of slices that keep the gathered table within :data:`MDA_MAX_ENTRIES`. On the CPU a batch
  then equals the per-slice 2-D results (on fresh ``(n, d)`` tensors) bit for bit, except the
  geometric median and centered clipping, whose float64 coefficient iterations use batched
  matrix-vector products (``bmm``, not ``gemv``), which round differently: float64 results differ
  by up to about 1e-13 of the largest value (float32 results came out identical in our checks).
  Errors name the rule: a shape that is not ``(n, d)`` or ``(S, n, d)``, an empty batch, a generator
  sequence not of length ``S``, a state or ``gram`` of the wrong shape.
- ``f``: declared number of Byzantine rows; :meth:`Aggregator.check` raises a ``ValueError``
  (:class:`dpbr.errors.UsageError`) naming the rule, ``n``, ``f`` and the requirement when ``n, f`` do
  not fit (also for ``f < 0`` or ``n < 1``); every call checks.
- State is explicit: only centered clipping has one (its center), passed in as ``state=`` and
  returned in :attr:`Aggregation.state`; stateless rules ignore ``state`` and return ``None``.
  Randomness (bucketing) only comes from ``generator=`` (the global RNG when ``None``).
- No host synchronisation (no ``.item()``), no Python loop over pairs, subsets or coordinates. The
  only Python loops run a fixed number of whole-tensor steps: Weiszfeld / clipping iterations,
  Bulyan's ``θ`` selection rounds, the compare-exchanges of the CPU sorting network and the
  ``n − k + 1`` candidate windows of the closest-to-median means (``f + 1`` for meamed, ``2f + 1``
  for Bulyan; :func:`dpbr.linalg.mean_closest`).
  Pairwise distances all come from one blocked Gram matrix.
- Non-finite inputs: when at most ``f`` rows hold a NaN or ±inf, every rule but ``average`` returns a
  finite vector determined by the finite rows, as follows.

  * Distance-based selection (krum, multi-krum, mda, bulyan, and nnm's neighbourhoods): a non-finite
    row is at distance ``+inf`` from every row, so it is never selected, never a neighbour, and every
    subset that contains it has infinite diameter. The result equals what the rule gives when such
    rows are replaced by points far away from all others.
  * Coordinate-wise (median, trimmed-mean, meamed, Bulyan's second phase): entries are ordered with
    ``NaN`` as ``+inf`` (``±inf`` keep their sign), i.e. beyond every finite value, so at most ``f``
    of them never reach the middle of a coordinate's order. The result equals what the rule gives
    with NaN/+inf entries replaced by a huge positive and -inf by a huge negative value. Finite
    entries of a partly non-finite row still count in their coordinates.
  * Weighted rules (geometric-median, centered-clipping): a non-finite row gets weight 0 — the limit
    of the Weiszfeld weight ``1/‖x_i − z‖`` and of the clipping factor ``τ/‖x_i − v‖`` as the row
    goes to infinity. The geometric median is then that of the finite rows; centered clipping counts
    the row as a zero update (as if it sat at the current center) but still divides by ``n``.
  * Pre-aggregators keep non-finiteness visible to the rule they wrap: a bucket holding a non-finite
    row has a non-finite mean (at most ``f`` such buckets); NNM's mixed vector of a non-finite row
    is NaN, while those of the finite rows only average finite rows.
  * ``average`` propagates non-finite values by design (it is not robust).

  Combinations never touch a non-finite row arithmetically (``0 · NaN = NaN``): means of selected
  rows and weighted sums go through ``embedding_bag``, which reads only the rows it is given.

Registration
------------
Each rule is one class, registered where it is defined by ``@rules.register(name, *aliases)``
(pre-aggregators by ``@pre_aggregators.register``), which also sets the class's :attr:`~Aggregator.key`.
The class declares everything else beside its kernel ``_aggregate``: its spec parameters (the keyword
parameters of ``__init__``, validated there; a pre-aggregator's first argument, the rule it wraps,
comes from the composition and is no spec parameter), its requirement on ``n, f`` (``_clauses``, plus
``_problem`` for MDA's size limit) and its VN constant (``_vn``). :func:`get` builds rules by name;
errors and bounds come from these declarations only.

VN bounds
---------
:meth:`Aggregator.vn_bound` returns ``k_F(n, f)``, the largest ratio
``sqrt(E‖G − EG‖²) / ‖EG‖`` of the honest vectors for which the rule is proven (α, f)-Byzantine
resilient (Guerraoui et al. 2021, arXiv 2102.08166; the constants of the ``upper_bound`` functions of
their public code, LPD-EPFL/DifferentialByzantine), or ``None`` where no such
constant is known to us or where ``n, f`` violate the rule's requirement. ``math.inf`` means that no
condition is needed (``f = 0`` for average and MDA, which then average all rows).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from dpbr._lazy import LazyModule

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:  # imported on first use: validating rule names needs no torch (dpbr._lazy)
    torch = LazyModule("torch", globals())

from dpbr import linalg
from dpbr.errors import UsageError
from dpbr.registry import Registry, format_term, parse
from dpbr.validate import count as _count
from dpbr.validate import merge_params
from dpbr.validate import positive_index as _positive_int
from dpbr.validate import positive_number as _positive_float

__all__ = [
    "MDA_MAX_ENTRIES",
    "Aggregation",
    "Aggregator",
    "Average",
    "Bucketing",
    "Bulyan",
    "CenteredClipping",
    "GeometricMedian",
    "Krum",
    "MDA",
    "MeaMed",
    "Median",
    "MultiKrum",
    "NNM",
    "TrimmedMean",
    "get",
    "krum_vn_bound",
    "mda_tables",
    "names",
    "pre_aggregators",
    "rules",
    "subset_pairs",
]

OPTION = "--gar"

#: The aggregation rules: every rule class below registers itself with ``@rules.register(name, *aliases)``.
rules: Registry[Aggregator] = Registry(kind="aggregation rule", option=OPTION)
#: The pre-aggregators, written before a rule and joined with ``+``; built with the rule they wrap.
pre_aggregators: Registry[Aggregator] = Registry(kind="pre-aggregator", option=OPTION)

MDA_MAX_ENTRIES = 1 << 24
"""Largest MDA subset × pair table, ``C(n, f) · (n−f)(n−f−1)/2`` entries (16,777,216).

The table of pair indices is cached as int32 (≤ 64 MiB per ``(n, f, device)``) and the gathered
distances are one tensor of the same number of entries (≤ 64 MiB in float32, 128 MiB in float64).
``n = 11, f = 5``: 462 × 15 = 6,930; ``n = 25, f = 5``: 53,130 × 190 = 10,094,700 (allowed);
``n = 25, f = 6``: 177,100 × 171 = 30,284,100 and ``n = 25, f = 12``: 5,200,300 × 78 = 405,623,400
(refused)."""


@dataclass(frozen=True)
class Aggregation:
    """What one aggregation returns.

    Attributes
    ----------
    value:
        The aggregate, ``Tensor[d]`` (input dtype and device); ``Tensor[S, d]`` for a batch.
    selected:
        ``Tensor[n]`` bool, the input rows the rule selected (krum, multi-krum, mda, bulyan, and
        pre-aggregated compositions of them), ``Tensor[S, n]`` for a batch; ``None`` for rules that do
        not select rows.
    state:
        The new explicit state (centered clipping: its new center, a fresh tensor, ``Tensor[S, d]``
        for a batch); ``None`` for stateless rules.
    """

    value: Tensor
    selected: Tensor | None = None
    state: Any = None


def krum_vn_bound(n: int, f: int) -> float | None:
    """``1/sqrt(2(n−f + f(n + f(n−f−2) − 2)/(n−2f−2)))``: VN bound of Krum and Bulyan (LPD ``upper_bound``).

    ``None`` when ``n ≤ 2f + 2`` (the denominator vanishes or turns negative).
    """
    if n <= 2 * f + 2:
        return None
    return 1.0 / math.sqrt(2.0 * (n - f + f * (n + f * (n - f - 2) - 2) / (n - 2 * f - 2)))


class Aggregator:
    """Base class: an aggregation rule with its requirement on ``(n, f)`` and its VN bound.

    Subclasses register with ``@rules.register(name, *aliases)`` (which sets :attr:`key`), set
    :attr:`selects`, the requirement clauses (:meth:`_clauses`), implement :meth:`_aggregate` (and
    its batched form :meth:`_aggregate_batch`, else slices run one by one) and, where the literature
    has one, :meth:`_vn`.
    """

    #: Registered name (set by the registry's decorator).
    key: ClassVar[str] = ""
    #: Registered aliases (set by the registry's decorator).
    aliases: ClassVar[tuple[str, ...]] = ()
    #: Whether :attr:`Aggregation.selected` is a row mask (``True``) or ``None``.
    selects: ClassVar[bool] = False
    #: Whether the rule works from the Gram matrix ``G Gᵀ`` of its whole input (Krum, Multi-Krum,
    #: MDA, Bulyan): a caller that already has it may pass it as ``gram=`` to :meth:`aggregate`.
    uses_gram: ClassVar[bool] = False
    #: Whether the aggregate is the plain mean of the selected rows (Krum, Multi-Krum, MDA): its inner
    #: products with every row then follow from the Gram matrix and the selection
    #: (:func:`dpbr.simulation.metrics.gram_step_metrics`). Bulyan selects, then takes a trimmed mean.
    averages_selected: ClassVar[bool] = False

    def __init__(self) -> None:
        #: canonical spec string; :func:`get` sets it to the canonical form of the spec it parsed
        self.name: str = self.key

    def _name(self, **params: Any) -> None:
        """Set :attr:`name` from the parameters that differ from their defaults (``None`` = default)."""
        self.name = format_term(self.key, {k: v for k, v in params.items() if v is not None})

    # -- requirement --------------------------------------------------------------------------- #

    def _clauses(self) -> list[tuple[str, Callable[[int], int]]]:
        """``[(rhs text, f ↦ smallest n)]``, read as ``n >= rhs`` and joined with "and"."""
        return [("1", lambda f: 1)]

    def requirement_for(self, nsym: str) -> str:
        """The requirement with ``nsym`` standing for the number of vectors this rule receives."""
        return " and ".join(dict.fromkeys(f"{nsym} >= {rhs}" for rhs, _ in self._clauses()))

    @property
    def requirement(self) -> str:
        """Human-readable requirement on ``n`` and ``f``, e.g. ``"n >= 2f + 3"``."""
        return self.requirement_for("n")

    def min_workers(self, f: int) -> int:
        """Smallest ``n`` allowed for this ``f`` (``f ≥ 0``)."""
        f = _count(f, "f")
        if f < 0:
            raise UsageError("", f"aggregation rule {self.name!r} needs f >= 0; got f = {f}")
        return max([1] + [fn(f) for _, fn in self._clauses()])

    def _problem(self, n: int, f: int) -> str | None:
        """Why ``(n, f)`` is not allowed (text after the rule's name), or ``None``."""
        if n < self.min_workers(f):
            return f"needs {self.requirement}; got n = {n}, f = {f}"
        return None

    def check(self, n: int, f: int) -> None:
        """Raise a ``ValueError`` (:class:`~dpbr.errors.UsageError`) when ``n`` workers cannot tolerate ``f``.

        The message names the rule, ``n``, ``f`` and the requirement.
        """
        n = _count(n, f"aggregation rule {self.name!r}: n")
        f = _count(f, f"aggregation rule {self.name!r}: f")
        if n < 1 or f < 0:
            raise UsageError(
                "", f"aggregation rule {self.name!r} needs n >= 1 and f >= 0 (and {self.requirement}); "
                f"got n = {n}, f = {f}"
            )
        problem = self._problem(n, f)
        if problem is not None:
            raise UsageError("", f"aggregation rule {self.name!r} {problem}")

    # -- VN bound ------------------------------------------------------------------------------ #

    def vn_bound(self, n: int, f: int) -> float | None:
        """``k_F(n, f)`` (the VN bound, module docstring), or ``None`` (no known constant, or ``(n, f)`` not allowed).

        ``math.inf`` where no condition is needed (``f = 0`` for average and MDA).
        """
        n, f = _count(n, "n"), _count(f, "f")
        if n < 1 or f < 0 or n < self.min_workers(f):
            return None
        return self._vn(n, f)

    def _vn(self, n: int, f: int) -> float | None:
        return None

    # -- aggregation --------------------------------------------------------------------------- #

    def aggregate(
        self, G: Tensor, f: int, *, generator: torch.Generator | None = None, state: Any = None,
        gram: Tensor | None = None,
    ) -> Aggregation:
        """Aggregate the rows of ``G`` (``n × d``) tolerating ``f`` Byzantine rows; or each slice of a
        batch ``(S, n, d)`` (module docstring, "Batch form").

        Parameters
        ----------
        G:
            ``(n, d)`` floating tensor, any dtype and device, or an ``(S, n, d)`` batch; not modified.
        f:
            Declared number of Byzantine rows (the same for every slice).
        generator:
            Source of randomness (bucketing); the global RNG when ``None``. For a batch also a
            sequence of ``S`` generators, one per slice.
        state:
            Previous state (centered clipping's center); ignored by stateless rules. For a batch the
            per-slice states (centered clipping: ``(S, d)``).
        gram:
            ``G Gᵀ`` (``n × n``, float32 or float64; ``(S, n, n)`` for a batch) when the caller has
            it — e.g. from fewer rows when several rows of ``G`` are copies of one vector, as
            omniscient attacks send them; used by the rules with :attr:`uses_gram`, ignored by the
            others. It must be the Gram matrix of ``G`` (the rules trust it).
        """
        if not isinstance(G, torch.Tensor):
            raise TypeError(f"aggregation rule {self.name!r} expects a torch.Tensor, got {type(G).__name__}")
        if G.ndim == 3:
            return self._aggregate_stack(G, f, generator, state, gram)
        if G.ndim != 2:
            raise ValueError(
                f"aggregation rule {self.name!r} expects an (n, d) tensor or an (S, n, d) batch, got shape "
                f"{tuple(G.shape)}"
            )
        if not G.is_floating_point():
            raise TypeError(f"aggregation rule {self.name!r} expects a floating-point tensor, got {G.dtype}")
        self.check(G.shape[0], f)
        if gram is not None and self.uses_gram:
            n = G.shape[0]
            if not isinstance(gram, torch.Tensor) or tuple(gram.shape) != (n, n) or not gram.is_floating_point():
                raise ValueError(f"aggregation rule {self.name!r}: gram must be a floating ({n}, {n}) tensor")
            return self._aggregate(G, int(f), generator, state, gram)
        return self._aggregate(G, int(f), generator, state)

    def _aggregate_stack(
        self, G: Tensor, f: int, generator: Any, state: Any, gram: Tensor | None
    ) -> Aggregation:
        """Validate a batch ``(S, n, d)`` and its per-slice arguments, then run :meth:`_aggregate_batch`."""
        if not G.is_floating_point():
            raise TypeError(f"aggregation rule {self.name!r} expects a floating-point tensor, got {G.dtype}")
        S, n, _ = G.shape
        if S < 1:
            raise ValueError(f"aggregation rule {self.name!r}: a batch needs at least one slice, got shape {tuple(G.shape)}")
        self.check(n, f)
        gens = self._generators(generator, S)
        if gram is not None and self.uses_gram:
            if not isinstance(gram, torch.Tensor) or tuple(gram.shape) != (S, n, n) or not gram.is_floating_point():
                raise ValueError(f"aggregation rule {self.name!r}: gram of a batch must be a floating ({S}, {n}, {n}) tensor")
            return self._aggregate_batch(G, int(f), gens, state, gram)
        return self._aggregate_batch(G, int(f), gens, state)

    def _generators(self, generator: Any, S: int) -> list[torch.Generator | None]:
        """One generator (or ``None``: the global RNG) per slice: ``None`` and a single generator are
        shared by all slices (drawn from in turn), a sequence gives slice ``s`` its ``s``-th."""
        if generator is None or isinstance(generator, torch.Generator):
            return [generator] * S
        if not isinstance(generator, (list, tuple)):
            raise TypeError(
                f"aggregation rule {self.name!r}: generator must be None, a torch.Generator or a sequence of "
                f"{S} of them, got {type(generator).__name__}"
            )
        if len(generator) != S or not all(g is None or isinstance(g, torch.Generator) for g in generator):
            raise ValueError(
                f"aggregation rule {self.name!r}: a batch of {S} slices needs {S} generators (torch.Generator "
                f"or None), got a sequence of {len(generator)}"
            )
        return list(generator)

    def __call__(
        self, G: Tensor, f: int, *, generator: Any = None, state: Any = None
    ) -> Tensor:
        """The aggregate, ``Tensor[d]`` (``Tensor[S, d]`` for a batch; see :meth:`aggregate`)."""
        return self.aggregate(G, f, generator=generator, state=state).value

    def _aggregate(self, G: Tensor, f: int, generator: torch.Generator | None, state: Any) -> Aggregation:
        raise NotImplementedError

    def _aggregate_batch(
        self, G: Tensor, f: int, gens: list[torch.Generator | None], state: Any, gram: Tensor | None = None
    ) -> Aggregation:
        """The kernel on a batch ``(S, n, d)`` with one generator (or ``None``) per slice in ``gens``.

        This fallback runs :meth:`_aggregate` slice by slice (``state``: ``None`` or a sequence of ``S``
        per-slice states) and stacks the results; every registered rule overrides it with a batched
        kernel.
        """
        S = G.shape[0]
        states = [None] * S if state is None else list(state)
        if len(states) != S:
            raise ValueError(f"aggregation rule {self.name!r}: a batch of {S} slices needs {S} states, got {len(states)}")
        outs = [
            self._aggregate(G[s], f, gens[s], states[s], *(() if gram is None else (gram[s],)))
            for s in range(S)
        ]
        selected = None if outs[0].selected is None else torch.stack([o.selected for o in outs])
        new = [o.state for o in outs]
        new_state = None if all(x is None for x in new) else (
            torch.stack(new) if all(isinstance(x, torch.Tensor) for x in new) else new
        )
        return Aggregation(torch.stack([o.value for o in outs]), selected, new_state)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {self.requirement}>"


# ----------------------------------------------------------------------------------------------- #
# Helpers shared by the rules


def _distances(G: Tensor, gram: Tensor | None = None) -> Tensor:
    """``D²`` of the rows of ``G`` from one Gram matrix (``gram`` when given, see :meth:`Aggregator.aggregate`;
    :func:`dpbr.linalg.squared_distances`)."""
    return linalg.squared_distances(linalg.gram(linalg.compute_view(G)) if gram is None else gram)


def _krum_scores(D2: Tensor, k: int) -> Tensor:
    """Krum scores: sum of the ``k`` smallest squared distances to the *other* rows, plus ``D²_ii``.

    Adding the diagonal (0 for a finite row, inf otherwise) makes a non-finite row's score infinite
    even when ``k = 0``.
    """
    n = D2.shape[-1]
    if D2.dim() > 2:  # a batch (S, n, n)
        eye = torch.eye(n, dtype=torch.bool, device=D2.device)
        near = D2.masked_fill(eye, math.inf).topk(k, dim=-1, largest=False).values.sum(-1) if k > 0 else 0
        return near + D2.diagonal(dim1=-2, dim2=-1)
    if k > 0:
        eye = torch.eye(n, dtype=torch.bool, device=D2.device)
        near = D2.masked_fill(eye, math.inf).topk(k, dim=1, largest=False).values.sum(1)
    else:
        near = torch.zeros(n, dtype=D2.dtype, device=D2.device)
    return near + D2.diagonal()


def _neighbours(x: Any) -> str:
    """Validated Krum neighbour convention (``None`` → the paper's ``"n-f-2"``)."""
    if x is None:
        return "n-f-2"
    if x not in MultiKrum.NEIGHBOURS:
        raise ValueError(f"neighbours must be one of {', '.join(MultiKrum.NEIGHBOURS)}, got {x!r}")
    return x


def _centrality(D2: Tensor) -> Tensor:
    """Sum of squared distances to the finite rows (``inf`` for a non-finite row): a tie-breaker."""
    if D2.dim() > 2:
        return torch.where(torch.isfinite(D2), D2, 0).sum(-1) + D2.diagonal(dim1=-2, dim2=-1)
    return torch.where(torch.isfinite(D2), D2, 0).sum(1) + D2.diagonal()


def _lexargmin(primary: Tensor, secondary: Tensor) -> Tensor:
    """Index minimising ``primary``; exact ties go to the smaller ``secondary``, then the lower index.

    Along the last dimension: a batch ``(S, m)`` gives the ``(S,)`` indices."""
    if primary.dim() > 1:
        least = primary.amin(-1, keepdim=True)
        return torch.where(primary == least, secondary, linalg.constant(math.inf, secondary)).argmin(-1)
    return torch.where(primary == primary.min(), secondary, linalg.constant(math.inf, secondary)).argmin()


def _lexorder(primary: Tensor, secondary: Tensor) -> Tensor:
    """Indices sorted by ``(primary, secondary, index)`` (two stable sorts), along the last dimension."""
    if primary.dim() > 1:
        first = torch.sort(secondary, dim=-1, stable=True).indices
        return first.gather(-1, torch.sort(primary.gather(-1, first), dim=-1, stable=True).indices)
    first = torch.sort(secondary, stable=True).indices
    return first.index_select(0, torch.sort(primary.index_select(0, first), stable=True).indices)


def _take_rows(G: Tensor, rows: Tensor) -> Tensor:
    """``G[s, rows[s]]`` for each slice of a batch ``G (S, n, d)``, ``rows (S, m)``: one ``index_select``
    of whole rows (``gather`` with an index expanded over ``d`` is several times slower)."""
    S, n, d = G.shape
    flat = (rows + torch.arange(0, S * n, n, device=rows.device).unsqueeze(1)).reshape(-1)
    return G.reshape(S * n, d).index_select(0, flat).view(S, rows.shape[1], d)


def _mask(n: int, rows: Tensor) -> Tensor:
    """Bool ``Tensor[n]`` with ``True`` at ``rows`` (a batch ``(S, m)``: ``Tensor[S, n]``)."""
    if rows.dim() > 1:
        return torch.zeros(rows.shape[0], n, dtype=torch.bool, device=rows.device).scatter_(1, rows, True)
    return torch.zeros(n, dtype=torch.bool, device=rows.device).index_fill(0, rows, True)


# ----------------------------------------------------------------------------------------------- #
# Rules


@rules.register("average", "mean", "avg")
class Average(Aggregator):
    """Arithmetic mean ``(1/n) Σ_i x_i``; not robust (propagates NaN/inf by design).

    VN bound: ``inf`` for ``f = 0``; ``0`` for ``f ≥ 1`` — no linear combination of the inputs
    tolerates a single Byzantine vector (Blanchard et al. 2017, Lemma 1), so no VN ratio suffices.
    """

    def _aggregate(self, G, f, generator, state):
        return Aggregation(G.mean(dim=0))

    def _aggregate_batch(self, G, f, gens, state, gram=None):
        return Aggregation(G.mean(dim=1))

    def _vn(self, n, f):
        return math.inf if f == 0 else 0.0


@rules.register("multi-krum", "multikrum", "multi_krum")
class MultiKrum(Aggregator):
    """Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): mean of the ``m`` best-scored rows.

    ``score_i = Σ_{j ∈ N_i} ‖x_i − x_j‖²`` over the ``k`` nearest *other* rows ``N_i`` — by default
    ``k = n − f − 2`` with squared distances, as in the paper (Blanchard et al. 2017). Peers
    count differently: ByzFL's ``Krum``/``MultiKrum`` average the ``n − f − 1`` nearest squared
    distances (same ranking as their sum), LPD's ``krum.py`` sums the ``n − f − 1`` nearest
    *non-squared* distances; ``neighbours="n-f-1"`` reproduces ByzFL's ranking. The ``m`` lowest
    scores are averaged; exact ties (certain when ``k = 1``: the two rows of the closest pair) go to
    the smaller sum of squared distances to all rows, then to the lower index, so that the result does
    not depend on the order of the rows (ByzFL's ``argmin``/``argpartition`` take whichever comes
    first).

    Parameters
    ----------
    m:
        Number of rows averaged, ``1 ≤ m ≤ n − f``. Default ``None`` means ``m = n − f`` (ByzFL's
        ``MultiKrum``); LPD's ``krum`` rule defaults to ``m = n − f − 2``; ``m = 1`` is Krum.
    neighbours:
        Number ``k`` of nearest other rows in a score: ``"n-f-2"`` (default ``None``: the paper's) or
        ``"n-f-1"`` (ByzFL's). Left at its default it does not appear in the rule's name.

    Requirement ``n ≥ 2f + 3`` (and ``n ≥ f + m``, so that the ``m`` selected rows can all be finite
    when at most ``f`` rows are not) for either ``neighbours``. VN bound: :func:`krum_vn_bound`
    (LPD's ``krum.upper_bound``, proven for the paper's score and applied by LPD to its ``n − f − 1``
    variant and to every ``m ≤ n − f − 2``); ``None`` for larger ``m``, the default included.
    """

    selects = True
    uses_gram = True
    averages_selected = True

    NEIGHBOURS = ("n-f-2", "n-f-1")

    def __init__(self, m: int | None = None, neighbours: str | None = None) -> None:
        self.m = None if m is None else _positive_int(m, "m")
        self.neighbours = _neighbours(neighbours)
        super().__init__()
        self._name(m=self.m, neighbours=None if self.neighbours == "n-f-2" else self.neighbours)

    def _clauses(self):
        clauses = [("2f + 3", lambda f: 2 * f + 3)]
        if self.m is not None:
            m = self.m
            clauses.append((f"f + {m}", lambda f: f + m))
        return clauses

    def _m(self, n: int, f: int) -> int:
        return n - f if self.m is None else self.m

    def _k(self, n: int, f: int) -> int:
        """Number of nearest other rows in a score."""
        return n - f - (1 if self.neighbours == "n-f-1" else 2)

    def _vn(self, n, f):
        return krum_vn_bound(n, f) if self._m(n, f) <= n - f - 2 else None

    def _aggregate(self, G, f, generator, state, gram=None):
        n = G.shape[0]
        D2 = _distances(G, gram)
        scores = _krum_scores(D2, self._k(n, f))
        m = self._m(n, f)
        if m == 1:
            rows = _lexargmin(scores, _centrality(D2)).reshape(1)
        else:
            rows = _lexorder(scores, _centrality(D2))[:m]
        return Aggregation(linalg.mean_rows(G, rows), _mask(n, rows))

    def _aggregate_batch(self, G, f, gens, state, gram=None):
        S, n, _ = G.shape
        D2 = _distances(G, gram)  # (S, n, n)
        scores = _krum_scores(D2, self._k(n, f))
        m = self._m(n, f)
        if m == 1:
            rows = _lexargmin(scores, _centrality(D2)).reshape(S, 1)
        else:
            rows = _lexorder(scores, _centrality(D2))[:, :m]
        return Aggregation(linalg.mean_rows(G, rows), _mask(n, rows))


@rules.register("krum")
class Krum(MultiKrum):
    """Krum (Blanchard et al. 2017): the row with the lowest Krum score (see :class:`MultiKrum`).

    Parameters
    ----------
    neighbours:
        ``"n-f-2"`` (default ``None``: the paper's score over the ``n − f − 2`` nearest other rows) or
        ``"n-f-1"`` (ByzFL's ``Krum``); see :class:`MultiKrum`.

    Requirement ``n ≥ 2f + 3``. VN bound :func:`krum_vn_bound` (LPD ``upper_bound``).
    """

    def __init__(self, neighbours: str | None = None) -> None:
        self.m = 1
        self.neighbours = _neighbours(neighbours)
        Aggregator.__init__(self)
        self._name(neighbours=None if self.neighbours == "n-f-2" else self.neighbours)

    def _clauses(self):
        return [("2f + 3", lambda f: 2 * f + 3)]

    def _vn(self, n, f):
        return krum_vn_bound(n, f)


@rules.register("median", "cm", "coordinate-median")
class Median(Aggregator):
    """Coordinate-wise median (Yin et al. 2018); even ``n``: midpoint of the two middle values.

    Requirement ``n ≥ 2f + 1``. VN bound ``1/sqrt(n − f)`` (LPD ``median.upper_bound``).
    NaN entries count as ``+inf`` (see the module docstring).
    """

    def _clauses(self):
        return [("2f + 1", lambda f: 2 * f + 1)]

    def _vn(self, n, f):
        return 1.0 / math.sqrt(n - f)

    def _aggregate(self, G, f, generator, state):
        return Aggregation(linalg.coordinate_median(G))

    def _aggregate_batch(self, G, f, gens, state, gram=None):
        return Aggregation(linalg.coordinate_median(G))


@rules.register("trimmed-mean", "tm", "trimmed_mean")
class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate drop the ``f`` largest and the
    ``f`` smallest values and average the ``n − 2f`` others (never silently lowers ``f``).

    Requirement ``n ≥ 2f + 1``. VN bound: ``None``. NaN entries count as ``+inf``.
    """

    def _clauses(self):
        return [("2f + 1", lambda f: 2 * f + 1)]

    def _aggregate(self, G, f, generator, state):
        n = G.shape[0]
        S = linalg.sorted_rows(G)
        return Aggregation(linalg.sum_rows(S[f:n - f]).div_(n - 2 * f))

    def _aggregate_batch(self, G, f, gens, state, gram=None):
        n = G.shape[1]
        S = linalg.sorted_rows(G)  # n rows of shape (S, d)
        return Aggregation(linalg.sum_rows(S[f:n - f]).div_(n - 2 * f))


@rules.register("meamed")
class MeaMed(Aggregator):
    """Mean around the median (Xie, Koyejo, Gupta 2018): per coordinate, the mean of the ``n − f``
    values closest to the coordinate-wise median (even ``n``: midpoint median).

    Requirement ``n ≥ 2f + 1``. VN bound: ``None``. NaN entries count as ``+inf`` (infinitely far from
    the median). Ties: when values at ``m − r`` and ``m + r`` (``m`` the median, ``r`` the
    ``(n − f)``-th smallest distance to it) compete for the last places, the lower ones are taken —
    the first ``n − f`` values of the column stably sorted by ``(|x − m|, x)``
    (:func:`dpbr.linalg.mean_closest`). ByzFL's ``Meamed`` takes whichever its
    ``argpartition`` returns first; elsewhere the two agree.
    """

    def _clauses(self):
        return [("2f + 1", lambda f: 2 * f + 1)]

    def _aggregate(self, G, f, generator, state):
        S = linalg.sorted_rows(G)
        return Aggregation(linalg.mean_closest(S, linalg.median_of_sorted(S), G.shape[0] - f))

    def _aggregate_batch(self, G, f, gens, state, gram=None):
        S = linalg.sorted_rows(G)  # n rows of shape (S, d); mean_closest works element-wise
        return Aggregation(linalg.mean_closest(S, linalg.median_of_sorted(S), G.shape[1] - f))


def subset_pairs(n: int, r: int) -> int:
    """Number of entries ``C(n, r) · P`` of the MDA subset × pair table, ``P = r(r−1)/2`` (1 if ``r = 1``)."""
    pairs = r * (r - 1) // 2 if r > 1 else 1
    return math.comb(n, r) * pairs


@functools.lru_cache(maxsize=16)
def _mda_tables_cpu(n: int, f: int) -> tuple[Tensor, Tensor]:
    r = n - f
    members = np.fromiter(
        itertools.chain.from_iterable(itertools.combinations(range(n), r)),
        dtype=np.int64,
        count=math.comb(n, r) * r,
    ).reshape(-1, r)
    members_t = torch.from_numpy(members)
    a, b = torch.triu_indices(r, r, offset=1 if r > 1 else 0)
    flat = (members_t[:, a] * n + members_t[:, b]).T.contiguous().to(torch.int32)
    return members_t, flat


@functools.lru_cache(maxsize=16)
def mda_tables(n: int, f: int, device: str) -> tuple[Tensor, Tensor]:
    """Constant index tables of the MDA subset search: the ``C(n, f)`` subsets of ``r = n − f`` rows.

    Returns ``(members, pairs)``: ``members[c]`` (int64, ``C(n, f) × r``) lists the rows of subset
    ``c`` in ``itertools.combinations(range(n), r)`` order; ``pairs[:, c]`` (int32, ``P × C(n, f)``,
    pair-major) the flat indices ``i·n + j`` (``i < j``) of its ``P = r(r−1)/2`` pairs in the
    ``n × n`` distance matrix (for ``r = 1`` the single "pair" ``(i, i)``, whose entry is 0 for a
    finite row and inf otherwise). Pair-major so that the per-subset maximum and sum reduce over
    the leading dimension — contiguous, vectorised rows; 3× faster than over a short trailing one.
    Cached per ``(n, f, device)`` (module-level ``lru_cache``): constants, not state of any rule.
    """
    members, flat = _mda_tables_cpu(n, f)
    dev = torch.device(device)
    return members.to(dev), flat.to(dev)


@rules.register("mda", "brute")
class MDA(Aggregator):
    """Minimum-diameter averaging (El Mhamdi et al. 2018; LPD's "brute"): the mean of the subset ``S``
    of ``n − f`` rows whose diameter ``max_{i,j ∈ S} ‖x_i − x_j‖`` is smallest.

    All ``C(n, f)`` subsets are scored in one gather from the ``n × n`` distance matrix through a cached
    table of pair indices (:func:`mda_tables`); sizes whose table exceeds
    :data:`MDA_MAX_ENTRIES` are refused by :meth:`check`. A subset containing a non-finite row has
    infinite diameter, so it is never chosen while an all-finite subset exists — LPD's behaviour (it
    drops such subsets).

    Ties. The minimum-diameter subset is often not unique — two subsets that share the longest pair
    tie exactly (about 40 % of Gaussian draws at ``n = 11, f = 5``) — so the tie-break matters:

    - ``ties="tightest"`` (default): the tied subset with the smallest sum of squared pairwise
      distances (the minimum-variance one; MVA among the minimum-diameter subsets), then the first in
      ``itertools.combinations(range(n), n − f)`` order. Independent of the order of the rows.
    - ``ties="first"``: the first tied subset in ``itertools.combinations`` order, as LPD's and ByzFL's
      loops do. The result then depends on the row order: with the honest rows first (as in those
      simulations) honest subsets win ties — an advantage a real adversary could take for itself by
      arriving first. Use it to reproduce LPD exactly.

    Identical Byzantine vectors make a subset tighter, so ``tightest`` could let them win ties that
    ``first`` (with honest rows first) gives to honest rows; either choice keeps MDA's guarantee,
    which holds for every minimum-diameter subset. In the study's setting (``n = 11, f = 5``, five
    identical "little" or "empire" vectors, ``d`` = 69 or 5,000) the two selected the same subset in
    all of 2,400 simulated aggregations; ties come from i.i.d. inputs.

    Requirement ``n ≥ 2f + 1`` (LPD additionally refuses ``f = 0``; here ``f = 0`` averages all rows).
    VN bound ``(n − f)/(√8·f)`` (LPD ``brute.upper_bound``; Garfield uses ``(n − f)/(2f)``), ``inf`` for
    ``f = 0``.
    """

    selects = True
    uses_gram = True
    averages_selected = True
    TIES = ("tightest", "first")

    def __init__(self, ties: str = "tightest") -> None:
        if ties not in self.TIES:
            raise ValueError(f"ties must be one of {', '.join(self.TIES)}, got {ties!r}")
        self.ties = ties
        super().__init__()
        self._name(ties=None if ties == "tightest" else ties)

    def _clauses(self):
        return [("2f + 1", lambda f: 2 * f + 1)]

    def _problem(self, n, f):
        problem = super()._problem(n, f)
        if problem is not None:
            return problem
        r = n - f
        entries = subset_pairs(n, r)
        if entries > MDA_MAX_ENTRIES:
            pairs = entries // math.comb(n, r)
            return (
                f"cannot search n = {n}, f = {f}: C({n}, {f}) = {math.comb(n, f)} subsets x {pairs} pairs "
                f"= {entries} entries exceed the limit MDA_MAX_ENTRIES = {MDA_MAX_ENTRIES}"
            )
        return None

    def _vn(self, n, f):
        return math.inf if f == 0 else (n - f) / (math.sqrt(8.0) * f)

    def _aggregate(self, G, f, generator, state, gram=None):
        n = G.shape[0]
        D2 = _distances(G, gram)
        members, pairs = mda_tables(n, f, str(D2.device))
        within = D2.view(-1).index_select(0, pairs.view(-1)).view(pairs.shape)  # (pairs, subsets)
        diameters = within.amax(dim=0)
        best = diameters.argmin() if self.ties == "first" else _lexargmin(diameters, within.sum(dim=0))
        rows = members.index_select(0, best.view(1)).view(-1)  # no host sync (members[best] would)
        return Aggregation(linalg.mean_rows(G, rows), _mask(n, rows))

    def _aggregate_batch(self, G, f, gens, state, gram=None):
        S, n, _ = G.shape
        D2 = _distances(G, gram).reshape(S, n * n)
        members, pairs = mda_tables(n, f, str(D2.device))
        # slices in chunks whose gathered table stays within MDA_MAX_ENTRIES (a loop over chunks of
        # slices, not over subsets; one chunk for the study's sizes)
        step = max(1, MDA_MAX_ENTRIES // pairs.numel())
        best = []
        for lo in range(0, S, step):
            D = D2[lo:lo + step]
            within = D.index_select(1, pairs.view(-1)).view(D.shape[0], *pairs.shape)  # (S', pairs, subsets)
            diameters = within.amax(dim=1)
            best.append(diameters.argmin(-1) if self.ties == "first" else _lexargmin(diameters, within.sum(dim=1)))
        rows = members.index_select(0, best[0] if len(best) == 1 else torch.cat(best))  # (S, n − f)
        return Aggregation(linalg.mean_rows(G, rows), _mask(n, rows))


@rules.register("bulyan")
class Bulyan(Aggregator):
    """Bulyan (El Mhamdi et al. 2018) over Krum.

    1. Select ``θ = n − 2f`` rows by repeated Krum: in round ``t`` (``t`` rows already taken) score the
       ``n − t`` remaining rows with Krum among themselves (``k_t = n − t − f − 2`` nearest remaining
       others), take the argmin, remove it. Ties — certain when ``k_t = 1`` (the two rows of the
       closest remaining pair) or ``k_t ≤ 0`` (the last round when ``f = 1``: every score is 0) — go
       to the lower full-set Krum score (round 0's), then to the lower index.
    2. Per coordinate, average the ``β = θ − 2f`` selected values closest to their median (even
       ``θ``: midpoint median); values tied at the boundary distance on both sides of the median:
       the lower ones, as in :class:`MeaMed`.

    The ``θ`` rounds are a Python loop of ``n × n`` tensor operations (no host synchronisation).
    LPD's ``bulyan.py`` differs: it averages Multi-Krum picks and selects ``n − 2f − 2`` rows.

    Requirement ``n ≥ 4f + 3``. VN bound :func:`krum_vn_bound` (LPD ``bulyan.upper_bound``).
    """

    selects = True
    uses_gram = True

    def _clauses(self):
        return [("4f + 3", lambda f: 4 * f + 3)]

    def _vn(self, n, f):
        return krum_vn_bound(n, f)

    def _aggregate(self, G, f, generator, state, gram=None):
        # the batched selection on a batch of one (same values; the loop costs the same)
        one = self._aggregate_batch(G.unsqueeze(0), f, [generator], state, None if gram is None else gram.unsqueeze(0))
        return Aggregation(one.value[0], one.selected[0])

    def _aggregate_batch(self, G, f, gens, state, gram=None):
        B, n, d = G.shape
        theta, beta = n - 2 * f, n - 4 * f
        D2 = _distances(G, gram)  # (B, n, n)
        dev = D2.device
        huge = torch.finfo(D2.dtype).max
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        others = D2.masked_fill(eye, math.inf)
        diag = D2.diagonal(dim1=-2, dim2=-1)
        full = _krum_scores(D2, n - f - 2).nan_to_num(nan=huge, posinf=huge)
        removed = torch.zeros(B, n, dtype=torch.bool, device=dev)
        arange = torch.arange(n, device=dev)
        picks = []
        for t in range(theta):
            k = n - t - f - 2
            if t == 0:
                scores = full
            elif k > 0:
                near = others.masked_fill(removed[:, None, :], math.inf).topk(k, dim=-1, largest=False).values
                scores = (near.sum(-1) + diag).nan_to_num(nan=huge, posinf=huge)
            else:
                scores = diag.nan_to_num(nan=huge, posinf=huge)
            # finite-capped scores: a remaining row always beats a removed one
            scores = torch.where(removed, math.inf, scores)
            pick = _lexargmin(scores, full)  # (B,)
            picks.append(pick)
            removed = removed | (arange == pick[:, None])
        rows = torch.stack(picks, dim=1)  # (B, θ)
        S = linalg.sorted_rows(_take_rows(G, rows))
        return Aggregation(linalg.mean_closest(S, linalg.median_of_sorted(S), beta), _mask(n, rows))


@rules.register("geometric-median", "rfa", "geometric_median", "gm")
class GeometricMedian(Aggregator):
    """Geometric median by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2022).

    ``z ← Σ_i w_i x_i / Σ_i w_i`` with ``w_i = 1/max(ν, ‖x_i − z‖)``, ``iters`` times, starting from the
    medoid (the row with the smallest sum of distances to the others: robust and translation
    equivariant; ByzFL starts from 0 with ``T = 3``, Karimireddy et al. use ``T = 8``). The iterations
    run on the Gram matrix in the ``n``-dimensional coefficient space ``z = Σ a_i x_i`` (each costs
    ``O(n²)``, so more iterations are nearly free); ``d``-dimensional data is read twice in total.

    Parameters
    ----------
    nu:
        Smoothing ``ν > 0`` (default 0.1), in the units of the inputs.
    iters:
        Number of Weiszfeld iterations (default 8).

    Requirement ``n ≥ 2f + 1`` (breakdown point 1/2; ``f`` is otherwise unused). VN bound: ``None``.
    Non-finite rows get weight 0 (the result is the geometric median of the finite rows).
    """

    def __init__(self, nu: float = 0.1, iters: int = 8) -> None:
        self.nu = _positive_float(nu, "nu")
        self.iters = _positive_int(iters, "iters")
        super().__init__()
        self._name(nu=self.nu if self.nu != 0.1 else None, iters=self.iters if self.iters != 8 else None)

    def _clauses(self):
        return [("2f + 1", lambda f: 2 * f + 1)]

    def _aggregate(self, G, f, generator, state):
        X = linalg.compute_view(G)
        K = linalg.gram(X)
        D2, finite = linalg.sqdist(K)
        ok = finite[:, None] & finite[None, :]
        Kd = torch.where(ok, K, 0).double()
        sq = Kd.diagonal()
        dist_sum = torch.where(ok, D2.double().sqrt(), 0).sum(1)
        start = torch.where(finite, dist_sum, math.inf).argmin()
        a = (torch.arange(G.shape[0], device=G.device) == start).double()
        alive = finite.double()
        nu2 = self.nu**2
        for _ in range(self.iters):
            Ka = Kd @ a
            # w_i = 1 / max(ν, ‖x_i − z‖), ‖x_i − z‖² = K_ii − 2 (K a)_i + aᵀ K a
            w = torch.add(sq, Ka, alpha=-2).add_(a @ Ka).clamp_min_(nu2).rsqrt_().mul_(alive)
            a = w / w.sum()
        return Aggregation(linalg.combine(a, X, finite).to(G.dtype))

    def _aggregate_batch(self, G, f, gens, state, gram=None):
        X = linalg.compute_view(G)
        K = linalg.gram(X)  # (S, n, n)
        D2, finite = linalg.sqdist(K)
        ok = finite[:, :, None] & finite[:, None, :]
        Kd = torch.where(ok, K, 0).double()
        sq = Kd.diagonal(dim1=-2, dim2=-1)
        dist_sum = torch.where(ok, D2.double().sqrt(), 0).sum(-1)
        start = torch.where(finite, dist_sum, math.inf).argmin(-1)
        a = (torch.arange(G.shape[1], device=G.device) == start[:, None]).double()
        alive = finite.double()
        nu2 = self.nu**2
        for _ in range(self.iters):
            Ka = torch.matmul(Kd, a.unsqueeze(-1)).squeeze(-1)
            aKa = torch.matmul(a.unsqueeze(-2), Ka.unsqueeze(-1)).squeeze(-1)  # (S, 1)
            w = torch.add(sq, Ka, alpha=-2).add_(aKa).clamp_min_(nu2).rsqrt_().mul_(alive)
            a = w / w.sum(-1, keepdim=True)
        return Aggregation(linalg.combine(a, X, finite).to(G.dtype))


@rules.register("centered-clipping", "cc", "centered_clipping", "centeredclipping")
class CenteredClipping(Aggregator):
    """Centered clipping (Karimireddy, He, Jaggi 2021).

    ``v ← v + (1/n) Σ_i clip_τ(x_i − v)``, ``clip_τ(y) = y · min(1, τ/‖y‖)``, ``iters`` times, from
    ``v₀ = state`` (the previous aggregate; zeros when ``state`` is ``None``). The new center is
    returned in :attr:`Aggregation.state` — explicit, never kept in the object (ByzFL's
    ``CenteredClipping`` keeps it hidden between calls).

    The inputs are centred on ``v₀`` once (``x_i − v₀``, which also keeps the distances accurate when
    ``v₀`` is close to the inputs), and the iterations run in the coefficient space of their Gram
    matrix (``O(n²)`` each).

    Parameters
    ----------
    tau:
        Clipping radius ``τ > 0`` before scaling (default 10, as in Karimireddy et al.'s bucketing
        experiments, arXiv 2006.09365; ByzFL's default is 100).
    iters:
        Number of clipping iterations ``L`` (default 3 as in those experiments; ByzFL uses 1).
    scale:
        How the radius grows with the workers' momentum ``β`` (the paper's momentum and clipping-radius
        experiments, exp5/exp6 of its code): ``none`` (default) ``τ_eff = τ``, ``linear``
        ``τ_eff = τ/(1 − β)``, ``sqrt`` ``τ_eff = τ/sqrt(1 − β)``. The clipping uses ``τ_eff``
        (:attr:`radius`).
    beta:
        The workers' momentum ``β ∈ [0, 1)`` the radius is scaled with — required by ``linear`` and
        ``sqrt``, unused by ``none``. The rule does not see the run's ``--worker-momentum``: give the
        same value here.

    Those formulas are the paper's, for its workers' *undampened* momentum ``m ← βm + g`` (from
    ``m = g``), whose size grows like ``1/(1 − β)``. dpbr's ``--worker-momentum`` is *dampened*,
    ``m ← βm + (1 − β)g`` from 0, which is exactly ``(1 − β)`` times the undampened one. Centered
    clipping is positively homogeneous (``clip_τ(c·y) = c·clip_{τ/c}(y)``, ``c > 0``), so a paper run
    with radius ``τ_p`` and learning rate ``λ`` is a dpbr run with radius ``(1 − β)·τ_p`` and learning
    rate ``λ/(1 − β)``: the paper's ``linear`` arm is ``scale=none`` here, its ``sqrt`` arm radius
    ``τ·sqrt(1 − β)`` and its ``none`` arm radius ``τ·(1 − β)``.

    Requirement ``n ≥ 1`` (``f`` is unused). VN bound: ``None``. A non-finite row contributes a zero
    update (weight 0) and still counts in ``1/n``; ``state`` must be finite.
    """

    #: Ways of scaling the radius with the workers' momentum (``scale=``).
    SCALES: ClassVar[tuple[str, ...]] = ("none", "linear", "sqrt")

    def __init__(self, tau: float = 10.0, iters: int = 3, scale: str | None = "none", beta: float | None = None) -> None:
        self.tau = _positive_float(tau, "tau")
        self.iters = _positive_int(iters, "iters")
        self.scale = "none" if scale is None else scale  # the spec grammar reads "none" as None
        if self.scale not in self.SCALES:
            raise ValueError(f"scale must be one of {', '.join(self.SCALES)}, got {scale!r}")
        if beta is not None:
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
                raise ValueError(f"beta (the workers' momentum) must be a number in [0, 1), got {beta!r}")
            beta = float(beta)
        elif self.scale != "none":
            raise ValueError(f"scale={self.scale} needs beta, the workers' momentum in [0, 1) (e.g. beta=0.9)")
        self.beta = beta
        #: The clipping radius used, ``τ_eff``.
        self.radius = (self.tau if self.scale == "none" else self.tau / (1 - beta) if self.scale == "linear"
                       else self.tau / math.sqrt(1 - beta))
        super().__init__()
        self._name(tau=self.tau if self.tau != 10.0 else None, iters=self.iters if self.iters != 3 else None,
                   scale=None if self.scale == "none" else self.scale, beta=beta)

    def _aggregate(self, G, f, generator, state):
        n, d = G.shape
        X = linalg.compute_view(G)
        if state is None:
            center = None
            Y = X
        else:
            if not isinstance(state, torch.Tensor) or tuple(state.shape) != (d,):
                raise ValueError(
                    f"aggregation rule {self.name!r}: state must be the previous center, a Tensor[{d}], got "
                    f"{type(state).__name__}{tuple(state.shape) if isinstance(state, torch.Tensor) else ''}"
                )
            center = state.to(device=X.device, dtype=X.dtype)
            Y = X - center
        K = linalg.gram(Y)
        finite = torch.isfinite(K.diagonal())
        ok = finite[:, None] & finite[None, :]
        Kd = torch.where(ok, K, 0).double()
        sq = Kd.diagonal()
        alive = finite.double()
        # v = v0 + Σ c_i (x_i − v0): coefficients c over the centred rows y_i = x_i − v0
        c = torch.zeros(n, dtype=torch.float64, device=X.device)
        tau = self.radius
        tau2 = tau**2
        for _ in range(self.iters):
            Kc = Kd @ c
            # λ_i = min(1, τ/‖y_i − v‖) (0 for a non-finite row), ‖y_i − v‖² = K_ii − 2 (K c)_i + cᵀ K c
            lam = torch.add(sq, Kc, alpha=-2).add_(c @ Kc).clamp_min_(tau2).rsqrt_().mul_(tau * alive)
            c = c * (1 - lam.sum() / n) + lam / n
        value = linalg.combine(c, Y, finite)
        if center is not None:
            value = value + center
        value = value.to(G.dtype)
        return Aggregation(value, state=value.clone())

    def _aggregate_batch(self, G, f, gens, state, gram=None):
        S, n, d = G.shape
        X = linalg.compute_view(G)
        if state is None:
            center = None
            Y = X
        else:
            if isinstance(state, (list, tuple)) and len(state) == S and all(
                isinstance(s, torch.Tensor) and tuple(s.shape) == (d,) for s in state
            ):
                state = torch.stack([s.to(device=X.device, dtype=X.dtype) for s in state])
            if not isinstance(state, torch.Tensor) or tuple(state.shape) != (S, d):
                got = tuple(state.shape) if isinstance(state, torch.Tensor) else f" of length {len(state)}" if isinstance(
                    state, (list, tuple)) else ""
                raise ValueError(
                    f"aggregation rule {self.name!r}: the state of a batch of {S} must be the previous centers, a "
                    f"Tensor[{S}, {d}] (or {S} Tensor[{d}]), got {type(state).__name__}{got}"
                )
            center = state.to(device=X.device, dtype=X.dtype)
            Y = X - center[:, None, :]
        K = linalg.gram(Y)  # (S, n, n)
        finite = torch.isfinite(K.diagonal(dim1=-2, dim2=-1))
        ok = finite[:, :, None] & finite[:, None, :]
        Kd = torch.where(ok, K, 0).double()
        sq = Kd.diagonal(dim1=-2, dim2=-1)
        alive = finite.double()
        c = torch.zeros(S, n, dtype=torch.float64, device=X.device)
        tau = self.radius
        tau2 = tau**2
        for _ in range(self.iters):
            Kc = torch.matmul(Kd, c.unsqueeze(-1)).squeeze(-1)
            cKc = torch.matmul(c.unsqueeze(-2), Kc.unsqueeze(-1)).squeeze(-1)  # (S, 1)
            lam = torch.add(sq, Kc, alpha=-2).add_(cKc).clamp_min_(tau2).rsqrt_().mul_(tau * alive)
            c = c * (1 - lam.sum(-1, keepdim=True) / n) + lam / n
        value = linalg.combine(c, Y, finite)
        if center is not None:
            value = value + center
        value = value.to(G.dtype)
        return Aggregation(value, state=value.clone())


# ----------------------------------------------------------------------------------------------- #
# Pre-aggregators


@pre_aggregators.register("bucketing")
class Bucketing(Aggregator):
    """Bucketing (Karimireddy, He, Jaggi 2022), then ``inner`` on the bucket means with the same ``f``.

    A random permutation ``π`` (from ``generator``) splits the rows into ``⌈n/s⌉`` buckets of ``s``
    consecutive permuted rows, the last one holding the ``n − s(⌈n/s⌉ − 1)`` left over; each bucket is
    averaged and ``inner`` aggregates the bucket means with the *same* ``f``: each Byzantine row can
    spoil at most one bucket. This is what the authors' code (``bucketing_wrapper``: ``T = ⌈n/s⌉``,
    Krum built with ``n = T`` and the original ``f``) and ByzFL's ``Bucketing`` (``⌊n/s⌋`` full buckets
    plus the remainder) do. The result is invariant to row order only in distribution.

    Requirement: ``inner``'s with ``n`` replaced by ``⌈n/s⌉`` (e.g. ``ceil(n/2) >= 2f + 3``), so
    ``min_workers(f) = s·(inner.min_workers(f) − 1) + 1``. VN bound:
    ``sqrt(r)·inner.vn_bound(⌈n/s⌉, f)`` with ``r = n − s(⌈n/s⌉ − 1)`` the smallest bucket size — the
    mean of ``r`` i.i.d. honest vectors has ``1/sqrt(r)`` of their VN ratio (a derived bound, assuming
    i.i.d. honest vectors; ``None`` when ``inner`` has none). ``selected`` marks the rows of the
    buckets ``inner`` selected.

    Parameters
    ----------
    s:
        Bucket size ``s ≥ 1`` (default 2, the paper's choice; ``s = 1`` only permutes).
    """

    def __init__(self, inner: Aggregator, s: int = 2) -> None:
        self.inner = inner
        self.s = _positive_int(s, "s")
        self.name = f"{format_term(self.key, {'s': self.s})}+{inner.name}"

    @property
    def selects(self) -> bool:  # type: ignore[override]
        return self.inner.selects

    def _buckets(self, n: int) -> int:
        return -(-n // self.s)

    def requirement_for(self, nsym: str) -> str:
        return self.inner.requirement_for(f"ceil({nsym}/{self.s})")

    def min_workers(self, f: int) -> int:
        return self.s * (self.inner.min_workers(f) - 1) + 1

    def _problem(self, n, f):
        problem = super()._problem(n, f)
        if problem is not None:
            return problem
        inner = self.inner._problem(self._buckets(n), f)
        return None if inner is None else f"after bucketing n = {n} into {self._buckets(n)}: {inner}"

    def _vn(self, n, f):
        nb = self._buckets(n)
        k = self.inner.vn_bound(nb, f)
        return None if k is None else math.sqrt(n - self.s * (nb - 1)) * k

    def _aggregate(self, G, f, generator, state):
        n, d = G.shape
        s, nb = self.s, self._buckets(n)
        if generator is None:
            perm = torch.randperm(n, device=G.device)
        else:
            perm = torch.randperm(n, generator=generator, device=generator.device).to(G.device)
        X = linalg.compute_view(G).index_select(0, perm)
        full = n // s
        parts = []
        if full:
            parts.append(X[: full * s].reshape(full, s, d).mean(dim=1))
        if full * s < n:
            parts.append(X[full * s:].mean(dim=0, keepdim=True))
        means = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(G.dtype)
        out = self.inner._aggregate(means, f, generator, state)
        selected = None
        if out.selected is not None:
            bucket_of = torch.empty_like(perm).scatter_(0, perm, torch.arange(n, device=G.device) // s)
            selected = out.selected.index_select(0, bucket_of)
        return Aggregation(out.value, selected, out.state)

    def _aggregate_batch(self, G, f, gens, state, gram=None):
        B, n, d = G.shape
        s, nb = self.s, self._buckets(n)
        # each slice draws its permutation from its own generator, exactly as the 2-D call does
        perm = torch.stack([
            torch.randperm(n, device=G.device) if g is None
            else torch.randperm(n, generator=g, device=g.device).to(G.device)
            for g in gens
        ])  # (B, n)
        X = _take_rows(linalg.compute_view(G), perm)
        full = n // s
        parts = []
        if full:
            parts.append(X[:, : full * s].reshape(B, full, s, d).mean(dim=2))
        if full * s < n:
            parts.append(X[:, full * s:].mean(dim=1, keepdim=True))
        means = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).to(G.dtype)
        out = self.inner._aggregate_batch(means, f, gens, state)
        selected = None
        if out.selected is not None:
            bucket_of = torch.empty_like(perm).scatter_(
                1, perm, (torch.arange(n, device=G.device) // s).expand(B, n)
            )
            selected = out.selected.gather(1, bucket_of)
        return Aggregation(out.value, selected, out.state)


@pre_aggregators.register("nnm")
class NNM(Aggregator):
    """Nearest-neighbour mixing (Allouah et al. 2023), then ``inner`` on the mixed vectors with the same ``f``.

    Each row ``x_i`` is replaced by the mean of its ``n − f`` nearest rows (itself included; squared
    distances from one Gram matrix) — one ``(n × n) @ (n × d)`` product. The mixed vector of a
    non-finite row is NaN (so ``inner`` still sees at most ``f`` non-finite rows); those of finite rows
    only average finite rows.

    Requirement: ``n ≥ 2f + 1`` (the paper's ``n > 2f``) and ``inner``'s. VN bound: ``None`` (mixed
    vectors are dependent; no constant is known to us). ``selected`` is ``inner``'s selection of mixed
    vectors, indexed by the row each was centred on.
    """

    def __init__(self, inner: Aggregator) -> None:
        self.inner = inner
        self.name = f"{self.key}+{inner.name}"

    @property
    def selects(self) -> bool:  # type: ignore[override]
        return self.inner.selects

    def requirement_for(self, nsym: str) -> str:
        clauses = [f"{nsym} >= 2f + 1"] + self.inner.requirement_for(nsym).split(" and ")
        return " and ".join(dict.fromkeys(c for c in clauses if c != f"{nsym} >= 1"))

    def min_workers(self, f: int) -> int:
        return max(2 * _count(f, "f") + 1, self.inner.min_workers(f))

    def _problem(self, n, f):
        return super()._problem(n, f) or self.inner._problem(n, f)

    def _aggregate(self, G, f, generator, state):
        n = G.shape[0]
        X = linalg.compute_view(G)
        D2, finite = linalg.sqdist(linalg.gram(X))
        near = D2.topk(n - f, dim=1, largest=False).indices
        W = torch.zeros(n, n, dtype=X.dtype, device=X.device).scatter_(1, near, 1.0 / (n - f))
        mixed = linalg.combine(W, X, finite)
        mixed.add_(torch.where(finite, 0.0, math.nan).to(mixed.dtype)[:, None])  # NaN rows stay NaN
        return self.inner._aggregate(mixed.to(G.dtype), f, generator, state)

    def _aggregate_batch(self, G, f, gens, state, gram=None):
        S, n, _ = G.shape
        X = linalg.compute_view(G)
        D2, finite = linalg.sqdist(linalg.gram(X))  # (S, n, n), (S, n)
        near = D2.topk(n - f, dim=-1, largest=False).indices
        W = torch.zeros(S, n, n, dtype=X.dtype, device=X.device).scatter_(-1, near, 1.0 / (n - f))
        mixed = linalg.combine(W, X, finite)  # (S, n, d)
        mixed.add_(torch.where(finite, 0.0, math.nan).to(mixed.dtype)[:, :, None])
        return self.inner._aggregate_batch(mixed.to(G.dtype), f, gens, state)


# ----------------------------------------------------------------------------------------------- #
# Look-up


def names() -> list[str]:
    """Every registered rule and pre-aggregator name (aliases excluded), sorted."""
    return sorted(set(rules.names()) | set(pre_aggregators.names()))


def get(name: str, **params: Any) -> Aggregator:
    """Build the aggregator described by the spec string ``name``.

    ``name`` is ``[pre+]...rule``: zero or more pre-aggregators (``bucketing(s=2)``, ``nnm``) joined
    by ``+`` before one rule, each ``name`` or ``name(key=value, ...)``. ``params``, if given, are
    added to the parameters of the last term, the rule (a key given both ways is an error:
    :func:`dpbr.validate.merge_params`).

    The result's :attr:`~Aggregator.name` is the canonical spec (:func:`dpbr.registry.format_term`
    of each term: lower case, aliases resolved, the given parameters sorted and canonically
    formatted; defaults are not added), e.g. ``get("CC(tau=1.0)").name == "centered-clipping(tau=1)"``.

    Raises
    ------
    dpbr.errors.UsageError
        Unknown names or parameters, bad parameter values, a rule before ``+`` or a pre-aggregator
        last; the message names ``--gar`` and lists what is allowed.
    """
    terms = parse(name, option=OPTION)
    *pres, (rule_name, rule_params) = terms
    if rule_name in pre_aggregators and rule_name not in rules:
        raise UsageError(OPTION, f"{rule_name!r} is a pre-aggregator; end the spec with a rule, e.g. '{rule_name}+krum'")
    for pre_name, _ in pres:
        if pre_name in rules and pre_name not in pre_aggregators:
            raise UsageError(
                OPTION,
                f"{pre_name!r} is a rule; only pre-aggregators ({', '.join(pre_aggregators.names())}) may precede '+'",
            )
    rule_params = merge_params(OPTION, rule_name, rule_params, params)
    agg = rules.build(rule_name, **rule_params)
    agg.name = format_term(agg.key, rule_params)
    for pre_name, pre_params in reversed(pres):
        agg = pre_aggregators.build(pre_name, agg, **pre_params)
        agg.name = f"{format_term(agg.key, pre_params)}+{agg.inner.name}"
    return agg
