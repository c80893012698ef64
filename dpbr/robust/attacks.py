"""Byzantine attacks: the ``f`` vectors the Byzantine workers send, forged from the honest ones.

Every attack is a callable object built by name::

    from dpbr.robust import attacks
    atk = attacks.get("little(factor=1.5,negative=true)")
    byz = atk(H, f)                                   # Tensor[f, d]
    forged = atk.forge(H, f, state=previous.state)    # Forged(value=Tensor[f, d], state=...)

Conventions shared by all attacks
---------------------------------
- ``H`` (``h × d``) holds the honest vectors *as sent* — after clipping, noise, sparsification — in
  worker order (row ``i`` is honest worker ``i``). The attackers are omniscient: they see all of ``H``.
- The result is one new ``(f, d)`` tensor of ``H``'s dtype and device (contiguous, never a view of
  ``H``); ``H`` is never modified. ``f = 0`` gives an empty ``(0, d)`` tensor and requires nothing else.
- Randomness comes only from the ``generator`` argument; an attack that draws random numbers raises a
  :class:`~dpbr.errors.UsageError` when it gets none (it never touches the global RNG).
- State is explicit: :meth:`Attack.forge` takes the previous ``state`` and returns the next one in
  :class:`Forged` (only ``mimic(target=auto)`` has one). :meth:`Attack.__call__` always starts fresh.
- The ``μ`` and ``σ`` below are the per-coordinate mean and *unbiased* (``h − 1``) standard deviation
  of the rows of ``H``; ``n = h + f``.
- Statistics are computed in ``float32`` for half-precision inputs (``float64`` stays ``float64``)
  and the result is cast back to ``H``'s dtype.

Batches
-------
Every attack also takes a batch of ``S`` independent problems (e.g. ``S`` seeds of one cell):
``H`` of shape ``(S, h, d)`` gives ``(S, f, d)``, and slice ``s`` is the 2-D call on ``H[s]``::

    byz = atk(H, f, generator=[g0, g1, g2])                   # H: Tensor[3, h, d] -> Tensor[3, f, d]
    forged = atk.forge(H, f, generator=gens, own=own, state=previous.state, out=out)

- ``generator`` is one generator per slice (a sequence of ``S``); a single generator stands for
  ``[generator] * S``, drawn from slice after slice. Slice ``s`` makes exactly the draws the 2-D call
  with ``gens[s]`` makes.
- ``own`` and ``out`` are ``(S, f, d)``; ``aggregator`` takes the ``(S, n, d)`` stack (and a sequence of
  ``S`` generators) and returns ``(S, d)`` — the server's rule with its batched state.
- ``Forged.copies`` holds for the batch when it holds for every slice; ``Forged.info`` maps each key to
  the list of the ``S`` slices' values; the state is per slice (``mimic(target=auto)``: one
  :class:`MimicState` whose tensors have a leading ``S``; a sequence of ``S`` per-slice states is
  accepted too).
- Vectorised: ``none``, ``nan``, ``inf``, ``sign-flip``, ``little``, ``empire``, ``bulyan-coordinate``
  (``factor=optimal`` included: the ``S`` line searches run in lockstep, one aggregator call on the
  whole stack per evaluation, each slice keeping its own factor), ``gaussian`` (the draws alone loop
  over the slices' generators), ``label-flip``, ``mimic`` (``target=auto``: its ``warmup`` estimation
  steps — an eigendecomposition or a power step — run slice by slice with the 2-D code; the steps
  after it are one gather). An attack class that defines only the 2-D ``_forge`` forges a batch slice by
  slice (:meth:`Attack._forge_batch`).
- On the CPU a batched call equals the 2-D calls bit for bit (same reductions, fused ``addcmul`` for
  the per-slice factors); batched GPU kernels may round differently.

Attacks (``attacks.names()``; aliases in brackets; all ``f`` rows equal unless said otherwise)
-------------------------------------------------------------------------------------------------
- ``none``: ``μ`` (harmless; see :class:`NoAttack`).
- ``nan``: ``NaN`` everywhere. ``inf``: ``+∞`` everywhere (``−∞`` with ``negative=true``).
- ``little`` [alie]: ``μ + z·σ`` (``μ − z·σ`` with ``negative=true``);
  ``factor=1.5|zmax|zmax-honest|optimal``, ``evals=16``.
- ``empire`` [ipm]: ``(1 − factor)·μ``; ``factor=1.1|optimal``, ``evals=16``.
- ``sign-flip`` [signflip, sign_flip]: ``−scale·μ`` (the negated honest mean); ``scale=1``.
- ``bit-flip`` [bitflip, bit_flip]: ``−g_j``, each Byzantine worker's negated gradient on its own data
  (Karimireddy, He & Jaggi 2022; rows differ).
- ``gaussian``: i.i.d. rows ``N(mean, std²)`` (``+ μ`` with ``centred=true``; one row for all with
  ``identical=true``); ``mean=0``, ``std=1``.
- ``bulyan-coordinate`` [bulyan]: ``μ ± factor·e_j``; ``factor=1|optimal``, ``coordinate=-1|all``,
  ``negative=false``, ``evals=16``.
- ``label-flip`` [labelflip, label_flip]: the Byzantine workers' own gradients on labels ``y → C − 1 − y``.
- ``mimic``: ``H[target]``; ``target=0|auto``, ``warmup=1``.

The *optimal factor* attack of LPD (``identical.py`` with a negative factor) and ByzFL
(``Optimal_ALittleIsEnough``, ``Optimal_InnerProductManipulation``) is spelled ``factor=optimal`` on
``little``, ``empire`` and ``bulyan-coordinate``: ``little(factor=optimal)`` searches the factor that
maximises ``‖GAR(H ∪ byz) − μ‖²`` with at most ``evals`` aggregator calls (see :func:`line_maximize`).

Names
-----
``atk.name`` is the canonical spec string (:func:`dpbr.registry.canonical` form) of the *given*
parameters, with aliases resolved and values normalised: ``get("ALIE(negative=True, factor=1.50)").name
== "little(factor=1.5,negative=true)"``. Parameters left at their default are not added, so ``"little"``
and ``"little(factor=1.5)"`` build the same attack under two names — write specs one way.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generator, Mapping, Sequence

from dpbr._lazy import LazyModule

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:  # imported on first use: validating attack names needs no torch (dpbr._lazy)
    torch = LazyModule("torch", globals())

from dpbr.errors import UsageError
from dpbr.registry import Registry, format_term, parse
from dpbr.validate import merge_params, param_bool, param_factor, param_float, param_int

__all__ = [
    "Attack",
    "Forged",
    "MimicState",
    "flip_labels",
    "get",
    "line_maximize",
    "mean_std",
    "names",
    "registry",
    "zmax",
]

OPTION = "--attack"

Aggregator = Callable[..., Any]
"""``agg(G: Tensor[n, d], f: int, *, generator=None, state=None) -> Tensor[d]`` (or an object with
``.value``, or a tuple whose first item is the aggregate); for a batch ``G: Tensor[S, n, d] ->
Tensor[S, d]`` with ``generator`` a list of ``S``."""

#: The attacks: every attack class below registers itself with ``@registry.register(name, *aliases)``.
registry: Registry["Attack"] = Registry(kind="attack", option=OPTION)


# ----------------------------------------------------------------------------------------------- #
# Public helpers


@dataclass(frozen=True)
class Forged:
    """What :meth:`Attack.forge` returns.

    Attributes
    ----------
    value:
        The ``(f, d)`` Byzantine vectors (dtype and device of ``H``); ``(S, f, d)`` for a batch.
    state:
        The state to pass to the next call of :meth:`Attack.forge` (``None`` for stateless attacks).
    info:
        Plain facts about this step worth logging, e.g. ``{"factor": 2.6, "evaluations": 16}`` for a
        factor attack. Never read back by the attack. For a batch, each key maps to the list of the
        ``S`` slices' values.
    copies:
        True when every row of ``value`` is the same vector (ALIE, IPM, sign flip, …): a caller may
        then compute distances and Gram matrices over one of them (see
        :meth:`dpbr.robust.aggregators.Aggregator.aggregate`'s ``gram``). For a batch: within every
        slice.
    """

    value: Tensor
    state: Any = None
    info: Mapping[str, Any] = field(default_factory=dict)
    copies: bool = False


@dataclass(frozen=True)
class MimicState:
    """Explicit state of ``mimic(target=auto)`` between steps (Karimireddy et al. 2022).

    For a batch of ``S`` slices (which advance together) the tensors have a leading ``S``: ``mean`` and
    ``direction`` ``(S, d)``, ``target`` ``(S,)``.

    Attributes
    ----------
    step:
        Number of steps seen so far (``t``).
    mean:
        Running mean ``μ̄_t`` of the honest mean over the warm-up steps, shape ``(d,)``.
    direction:
        Unit-norm running estimate ``z_t`` of the top principal direction of the honest vectors, ``(d,)``.
    target:
        0-d ``int64`` tensor: the honest row being copied (fixed once the warm-up is over). Kept on the
        device of ``H`` so that no host synchronisation is needed; ``int(state.target)`` reads it.
    """

    step: int
    mean: Tensor
    direction: Tensor
    target: Tensor


def mean_std(H: Tensor, *, chunk_rows: bool | None = None) -> tuple[Tensor, Tensor]:
    """Per-coordinate mean ``μ`` and unbiased standard deviation ``σ`` of the rows of ``H``.

    ``μ = (1/h) Σ_i H_i`` and ``σ = sqrt( Σ_i (H_i − μ)² / (h − 1) )`` — the two-pass (centred) formula,
    numerically sound when ``|μ| ≫ σ`` (unlike ``E[x²] − E[x]²``).

    ``torch.std(H, 0)`` reduces over the leading, strided dimension and is slow for a short and wide
    ``H`` (about 30–40× slower than this for ``h = 6, d = 431,080``). Here the mean is one
    contiguous sum over rows, and the centred squares are accumulated row by row into one ``d``-vector
    (``2h`` elementwise kernels, no ``(h, d)`` temporary) for large inputs, or with one ``(h, d)``
    temporary when ``h·d`` is small (fewer kernel launches).

    Parameters
    ----------
    H:
        ``(h, d)`` floating tensor, ``h ≥ 2``, or a batch ``(S, h, d)`` (statistics of each slice's rows,
        with the kernels of the 2-D call).
    chunk_rows:
        Force the row-by-row (``True``) or the vectorised (``False``) accumulation; ``None`` picks
        row by row when ``h·d > 2**18``.

    Returns
    -------
    (mu, sigma):
        Two ``(d,)`` tensors (``(S, d)`` for a batch) of ``H``'s dtype.
    """
    h = H.shape[-2]
    if h < 2:
        raise UsageError(OPTION, f"the unbiased standard deviation needs at least 2 honest vectors, got {h}")
    mu = H.sum(dim=-2).div_(h)
    if chunk_rows is None:
        chunk_rows = h * H.shape[-1] > (1 << 18)
    if chunk_rows:
        acc = torch.zeros_like(mu)
        tmp = torch.empty_like(mu)
        for i in range(h):  # loop over rows (workers), never over coordinates
            torch.sub(H[..., i, :], mu, out=tmp)
            acc.addcmul_(tmp, tmp)
    else:
        centred = H - (mu if H.dim() == 2 else mu.unsqueeze(-2))
        acc = centred.mul_(centred).sum(dim=-2)
    return mu, acc.div_(h - 1).sqrt_()


def zmax(n: int, f: int, *, honest: bool = False) -> float:
    """The "A Little Is Enough" factor ``z_max = Φ⁻¹((n − s)/n)`` with ``s = ⌊n/2 + 1⌋ − f``.

    Baruch, Baruch and Goldberg, *A Little Is Enough* (NeurIPS 2019, arXiv:1902.06156), Algorithm 1:
    ``s`` is the number of honest workers the ``f`` attackers must win over to form a majority;
    ``z_max`` is the largest ``z`` such that ``s`` workers are farther from the mean than ``μ + zσ``
    (under a normal model). ``n = 11, f = 5`` gives ``s = 1`` and ``z = Φ⁻¹(10/11) ≈ 1.3352``.

    With ``honest=True`` the quantile is taken among the ``n − f`` honest workers only,
    ``z = Φ⁻¹((n − f − s)/(n − f))`` — what the code of Karimireddy, He and Jaggi (ICLR 2022,
    arXiv:2006.09365) computes for its ALIE attacker. It is smaller: ``n = 11, f = 5`` gives
    ``Φ⁻¹(5/6) ≈ 0.9674``; ``n = 25, f = 5`` gives ``Φ⁻¹(12/20) ≈ 0.2533`` against the paper's
    ``Φ⁻¹(17/25) ≈ 0.4677``.

    Raises
    ------
    UsageError
        When ``s < 1`` (the attackers already hold a majority: ``z`` would be infinite), when the
        quantile is not strictly between 0 and 1 (``n ≤ 2``), or when ``n ≤ 0`` or ``f ∉ [0, n]``.
    """
    n, f = int(n), int(f)
    word = "zmax-honest" if honest else "zmax"
    if n <= 0 or f < 0 or f > n:
        raise UsageError(OPTION, f"little(factor={word}) needs 0 <= f <= n and n >= 1, got n={n}, f={f}")
    s = n // 2 + 1 - f
    if s < 1:
        raise UsageError(
            OPTION, f"little(factor={word}) needs s = floor(n/2 + 1) - f >= 1, got s={s} for n={n}, f={f}"
        )
    pool = n - f if honest else n
    if pool <= s:
        raise UsageError(
            OPTION, f"little(factor={word}) needs {'n - f' if honest else 'n'} > s = {s}, got n={n}, f={f}"
        )
    return NormalDist().inv_cdf((pool - s) / pool)


def flip_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Label flipping ``y → C − 1 − y`` (a new tensor of the same dtype and device).

    For binary labels in ``{0, 1}`` (``C = 2``) this is ``1 − y``; it also works for float targets.
    """
    num_classes = int(num_classes)
    if num_classes < 2:
        raise UsageError(OPTION, f"label-flip needs at least 2 classes, got {num_classes}")
    return torch.sub(num_classes - 1, labels)


def line_maximize(
    objective: Callable[[float], float],
    evals: int = 16,
    *,
    start: float = 0.0,
    delta: float = 1.0,
    ratio: float = 0.8,
) -> tuple[float, float, int]:
    """Best-effort maximiser of ``objective`` on ``x ≥ 0`` with at most ``evals`` evaluations.

    The search of LPD's ``tools.line_maximize`` (used by its ``identical`` attacks, 16 evaluations by
    default; ByzFL's ``Optimal_*`` attacks use the same expansion): evaluate ``start``; *expand* —
    try ``best + δ``, and while that improves, move there and double ``δ``; at the first failure
    multiply ``δ`` by ``ratio`` and *contract* — alternately probe just above and just below the last
    probe (folding probes below 0 back towards it), keep any improvement, and shrink ``δ`` by
    ``ratio`` after every probe. Non-finite or NaN values never count as improvements except ``+∞``.

    Returns
    -------
    (best_x, best_y, evaluations):
        The best point, its value, and the number of calls made (``≤ evals``).
    """
    search = _line_search(evals, start, delta, ratio)
    x = next(search)
    try:
        while True:
            x = search.send(_score(objective(x)))
    except StopIteration as stop:
        return stop.value


def _score(y: Any) -> float:
    """An objective value as :func:`line_maximize` compares it (``NaN`` never improves: ``−∞``)."""
    y = float(y)
    return -math.inf if math.isnan(y) else y


def _line_search(
    evals: int, start: float, delta: float, ratio: float
) -> Generator[float, float, tuple[float, float, int]]:
    """The steps of :func:`line_maximize` as a coroutine: it yields each probe ``x``, is sent the probe's
    score (:func:`_score`) and returns ``(best_x, best_y, evaluations)``. Several searches run in lockstep
    this way, one per slice of a batch, with one aggregator call per round (:func:`_search_factors`)."""
    if evals < 1:
        raise UsageError(OPTION, f"evals must be >= 1, got {evals}")
    if not 0.5 < ratio < 1.0:
        raise UsageError(OPTION, f"ratio must be in (0.5, 1), got {ratio}")
    best_x = float(start)
    best_y = yield best_x
    calls = 1
    probe = best_x
    while calls < evals:  # expansion
        probe = best_x + delta
        y = yield probe
        calls += 1
        if y > best_y:
            best_x, best_y = probe, y
            delta *= 2.0
        else:
            delta *= ratio
            break
    while calls < evals:  # contraction around the best point
        if probe < best_x:
            probe = probe + delta
        else:
            x = probe - delta
            while x < 0.0:
                x = (x + probe) / 2.0
            probe = x
        y = yield probe
        calls += 1
        if y > best_y:
            best_x, best_y = probe, y
        delta *= ratio
    return best_x, best_y, calls


# ----------------------------------------------------------------------------------------------- #
# Registry front end


def names() -> list[str]:
    """Registered attack names (aliases excluded), sorted."""
    return registry.names()


def get(name: str, **params: Any) -> "Attack":
    """Build the attack ``name`` (a spec such as ``"little(factor=1.5,negative=true)"``).

    Parameters may be given in the spec string, as keyword arguments, or both (a key given both ways is
    an error). Unknown names, unknown parameters and bad values raise :class:`~dpbr.errors.UsageError`
    naming ``--attack`` and what is allowed.
    """
    if isinstance(name, Attack) and not params:
        return name
    terms = parse(name, option=OPTION)
    if len(terms) != 1:
        raise UsageError(OPTION, f"attacks do not compose; got {len(terms)} terms in {name!r}")
    key, given = terms[0]
    given = merge_params(OPTION, key, given, params)
    key = registry.resolve(key)
    atk = registry.build(key, **given)
    atk.name = format_term(key, {k: atk.params[k] for k in given})
    return atk


# ----------------------------------------------------------------------------------------------- #
# Base class


class Attack:
    """A Byzantine attack: ``atk(H, f) -> Tensor[f, d]``; build instances with :func:`get`.

    Attributes
    ----------
    name:
        Canonical spec string (see the module docstring).
    params:
        Every parameter with its validated value (defaults included).
    needs_aggregator:
        True when the attack evaluates the aggregation rule (``factor=optimal``): pass ``aggregator``.
    needs_own_gradients:
        True for ``label-flip`` and ``bit-flip``: the simulation computes the Byzantine workers' gradients on their own
        data with labels mapped by :attr:`label_map` and passes them as ``own``.
    needs_generator:
        True when the attack draws random numbers (pass ``generator``).
    stateful:
        True when :meth:`forge` carries state between steps (pass ``state=previous.state``).
    label_map:
        ``(labels, num_classes) -> labels`` for data-poisoning attacks, else ``None``.

    Subclasses register with ``@registry.register(name, *aliases)`` (which sets :attr:`key` and
    :attr:`aliases`), declare their parameters as the keyword parameters of ``__init__`` (validated
    there and stored in :attr:`params`) and implement :meth:`_forge`.
    """

    #: Registered name (set by the registry's decorator).
    key: ClassVar[str] = ""
    #: Registered aliases (set by the registry's decorator).
    aliases: ClassVar[tuple[str, ...]] = ()
    needs_aggregator: bool = False
    needs_own_gradients: bool = False
    needs_generator: bool = False
    stateful: bool = False
    label_map: Callable[[Tensor, int], Tensor] | None = None

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = dict(params)
        self.name: str = self.key

    def __repr__(self) -> str:
        return f"attacks.get({self.name!r})"

    def __call__(
        self,
        H: Tensor,
        f: int,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
        own: Tensor | None = None,
    ) -> Tensor:
        """The ``(f, d)`` Byzantine vectors for honest vectors ``H`` (stateless: a fresh state);
        ``(S, f, d)`` for a batch ``(S, h, d)`` (see :meth:`forge`)."""
        return self.forge(H, f, aggregator=aggregator, generator=generator, own=own).value

    def forge(
        self,
        H: Tensor,
        f: int,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
        own: Tensor | None = None,
        state: Any = None,
        out: Tensor | None = None,
    ) -> Forged:
        """Forge the ``(f, d)`` Byzantine vectors and the next state.

        A batch ``H`` of shape ``(S, h, d)`` gives ``(S, f, d)`` vectors, slice ``s`` equal to the 2-D
        call on ``H[s]`` with ``generator[s]``, ``own[s]`` and slice ``s``'s state; the shapes of the
        other arguments for a batch are given with each (see also the module docstring, *Batches*).

        Parameters
        ----------
        H:
            ``(h, d)`` honest vectors as sent, in worker order, or ``(S, h, d)``. Not modified.
        f:
            Number of Byzantine vectors to forge (``≥ 0``); also the ``f`` passed to ``aggregator``.
        aggregator:
            The rule to defeat, ``agg(G, f, *, generator=None) -> Tensor[d]``; only used when
            :attr:`needs_aggregator`. Bind any aggregator state beforehand (``functools.partial``).
            For a batch it takes ``G`` of shape ``(S, n, d)`` (and a list of ``S`` generators) and
            returns ``(S, d)``: the rule with its batched state.
        generator:
            Source of every random draw (on ``H``'s device). For a batch, a sequence of ``S`` (slice
            ``s`` draws from ``generator[s]`` only), or one generator drawn from slice after slice.
        own:
            ``(f, d)`` gradients the Byzantine workers computed on their own data (``label-flip``);
            ``(S, f, d)`` for a batch.
        state:
            The ``state`` of the previous :class:`Forged` (``None`` on the first step). For a batch, the
            batched state the previous batched call returned (per slice; see the attack).
        out:
            Optional ``(f, d)`` tensor (``(S, f, d)`` for a batch; any floating dtype, sharing no memory
            with ``H``) that receives the vectors and becomes ``value`` — the simulation passes the
            Byzantine rows of the matrix the rule aggregates, which saves a copy per step. Same values as
            without it (cast to ``out``'s dtype).
        """
        H = _check_honest(H)
        f = _check_f(f)
        if H.dim() == 3:
            return self._forge_stack(H, f, aggregator, generator, own, state, out)
        if f == 0:
            return Forged(H.new_empty((0, H.shape[1])), state)
        self._check_call(H, aggregator, [generator], out, (f, H.shape[1]))
        forged = self._forge(H, f, aggregator=aggregator, generator=generator, own=own, state=state, out=out)
        return _written_into(out, forged)

    def _check_call(
        self, H: Tensor, aggregator: Aggregator | None, gens: list[Any], out: Any, shape: tuple[int, ...]
    ) -> None:
        """The checks of :meth:`forge` that need ``f > 0``: aggregator, generators, ``out``'s shape."""
        if self.needs_aggregator and aggregator is None:
            raise UsageError(OPTION, f"attack {self.name!r} needs the aggregation rule: pass aggregator=")
        if self.needs_generator:
            for g in gens:
                _check_generator(g, H, self.name)
        if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != shape):
            raise UsageError(OPTION, f"out must be a Tensor of shape {shape}, got "
                                     f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")

    def _forge(
        self,
        H: Tensor,
        f: int,
        *,
        aggregator: Aggregator | None,
        generator: torch.Generator | None,
        own: Tensor | None,
        state: Any,
        out: Tensor | None = None,
    ) -> Forged:
        """The vectors (written into ``out`` when the attack can do so directly; :meth:`forge` copies
        them there otherwise)."""
        raise NotImplementedError

    def _forge_stack(
        self, H: Tensor, f: int, aggregator: Aggregator | None, generator: Any, own: Any, state: Any, out: Any
    ) -> Forged:
        """:meth:`forge` on a batch ``H`` of shape ``(S, h, d)``: the checks, then :meth:`_forge_batch`."""
        S, _, d = H.shape
        gens = _generators(generator, S)
        if f == 0:
            return Forged(H.new_empty((S, 0, d)), state)
        self._check_call(H, aggregator, gens, out, (S, f, d))
        forged = self._forge_batch(H, f, aggregator=aggregator, gens=gens, own=own, state=state, out=out)
        return _written_into(out, forged)

    def _forge_batch(
        self,
        H: Tensor,
        f: int,
        *,
        aggregator: Aggregator | None,
        gens: list[torch.Generator | None],
        own: Tensor | None,
        state: Any,
        out: Tensor | None = None,
    ) -> Forged:
        """The ``(S, f, d)`` vectors of a batch, slice ``s`` drawing from ``gens[s]``.

        This default forges slice by slice with :meth:`_forge` (``state``: ``None`` or a sequence of
        ``S`` per-slice states; the next state is the list of them; ``info`` maps each key to the list
        of the slices' values). Attacks with a vectorised form override it."""
        S = H.shape[0]
        if self.needs_aggregator:
            raise UsageError(OPTION, f"attack {self.name!r} has no batched form against an aggregation rule")
        states = _slice_states(state, S, self.name)
        parts = [
            self._forge(H[s], f, aggregator=None, generator=gens[s], own=None if own is None else own[s],
                        state=states[s])
            for s in range(S)
        ]
        next_states = None if all(p.state is None for p in parts) else [p.state for p in parts]
        info = {k: [p.info.get(k) for p in parts] for k in parts[0].info}
        return Forged(torch.stack([p.value for p in parts]), next_states, info, all(p.copies for p in parts))


# ----------------------------------------------------------------------------------------------- #
# Attacks


@registry.register("none")
class NoAttack(Attack):
    """No attack: every Byzantine row is the honest mean ``μ = (1/h) Σ_i H_i``.

    With ``--attack none`` the simulation has no Byzantine workers (``f = 0``; the study's baseline of
    ``n`` honest workers). Should it still ask for ``f > 0`` vectors, sending ``μ`` is harmless: it
    leaves the average unchanged and sits at the centre of the honest vectors for robust rules.
    """

    def __init__(self) -> None:
        super().__init__()

    def _forge(self, H, f, **_: Any) -> Forged:
        return Forged(_rows(_mean(H), f, H.dtype), copies=True)

    def _forge_batch(self, H, f, **_: Any) -> Forged:
        return self._forge(H, f)  # shape-generic


@registry.register("nan")
class NanAttack(Attack):
    """Non-finite attack: every coordinate of every Byzantine row is ``NaN`` (LPD ``attacks/nan.py``).

    Tests every rule's handling of non-finite inputs (a robust rule must not return NaN).
    """

    def __init__(self) -> None:
        super().__init__()

    def _forge(self, H, f, **_: Any) -> Forged:
        return Forged(torch.full((f, H.shape[1]), math.nan, dtype=H.dtype, device=H.device))

    def _forge_batch(self, H, f, **_: Any) -> Forged:
        return Forged(torch.full((H.shape[0], f, H.shape[2]), math.nan, dtype=H.dtype, device=H.device))


@registry.register("inf")
class InfAttack(Attack):
    """Non-finite attack: every coordinate is ``+∞`` (``−∞`` with ``negative=true``) (ByzFL ``Inf``).

    Parameters
    ----------
    negative:
        Send ``−∞`` instead of ``+∞``.
    """

    def __init__(self, negative: Any = False) -> None:
        super().__init__(negative=_as_bool("negative", negative))

    def _forge(self, H, f, **_: Any) -> Forged:
        value = -math.inf if self.params["negative"] else math.inf
        return Forged(torch.full((f, H.shape[1]), value, dtype=H.dtype, device=H.device))

    def _forge_batch(self, H, f, **_: Any) -> Forged:
        value = -math.inf if self.params["negative"] else math.inf
        return Forged(torch.full((H.shape[0], f, H.shape[2]), value, dtype=H.dtype, device=H.device))


class _FactorAttack(Attack):
    """``μ + s·x·a`` for a base direction ``a``, a sign ``s = ±1`` and a factor ``x`` (fixed or searched).

    This is LPD's ``identical`` attack template (``attacks/identical.py``): all Byzantine workers send
    ``μ + factor·a``; with ``factor=optimal`` the factor ``x ≥ 0`` maximising
    ``‖GAR(H ∪ {byz}×f) − μ‖²`` is searched with :func:`line_maximize` (``evals`` aggregator calls,
    Byzantine rows placed after the honest ones, as LPD and ByzFL do). When a ``generator`` is given,
    every evaluation hands the aggregator a *copy* of it (common random numbers: all factors are
    compared under the same draw, and the caller's generator is not advanced).

    Sign. With ``negative=true`` and ``factor=optimal`` the search evaluates ``μ − x·a`` and the
    attack sends ``μ − x·a`` with the best ``x`` found: what is sent is what was scored. LPD's
    ``identical.py`` negates the factor inside its objective but not the factor it returns, so it
    searches ``μ − x·a`` and sends ``μ + x·a`` — a vector it never evaluated. Fixed factors agree with
    LPD (``μ − factor·a``).

    Differences from ByzFL's ``Optimal_ALittleIsEnough`` / ``Optimal_InnerProductManipulation``:
    those maximise ``‖GAR − μ‖`` (same maximiser) from ``δ = 10`` with 20 evaluations, and their
    contraction only probes above the best point; :func:`line_maximize` follows LPD (``δ = 1``,
    ``evals`` evaluations, probes on both sides). So the two searches may settle on different
    factors for the same objective.

    The search needs one host synchronisation per evaluation (the control flow depends on the values).
    """

    def _direction(self, H: Tensor, f: int) -> tuple[Tensor, Tensor]:
        """``(μ, a)`` in the compute dtype."""
        raise NotImplementedError

    def _sign(self) -> float:
        return -1.0 if self.params.get("negative") else 1.0

    def _combine(self, mu: Tensor, direction: Tensor, coef: float) -> Tensor:
        """``μ + coef·a`` (a new tensor)."""
        return torch.add(mu, direction, alpha=coef)

    def _fixed_factor(self, h: int, f: int) -> float:
        return float(self.params["factor"])

    @property
    def needs_aggregator(self) -> bool:  # type: ignore[override]
        return self.params.get("factor") == "optimal"

    def _forge(self, H, f, *, aggregator, generator, out=None, **_: Any) -> Forged:
        mu, direction = self._direction(H, f)
        sign = self._sign()
        info: dict[str, Any] = {}
        if self.params["factor"] == "optimal":
            x, y, calls = _search_factor(
                H, f, mu, lambda x: self._combine(mu, direction, sign * x), aggregator, generator, self.params["evals"]
            )
            info = {"factor": x, "objective": y, "evaluations": calls}
        else:
            x = self._fixed_factor(H.shape[0], f)
            info = {"factor": x}
        vector = self._combine(mu, direction, sign * x)
        return Forged(_rows(vector, f, H.dtype, out), None, info, copies=True)

    def _combine_batch(self, mu: Tensor, direction: Tensor, coefs: list[float]) -> Tensor:
        """``μ_s + coefs[s]·a_s`` for every slice (``(S, d)``; on the CPU bit for bit :meth:`_combine`
        per slice: ``addcmul`` and ``add(alpha=)`` round the same fused product)."""
        coef = torch.tensor(coefs, dtype=mu.dtype, device=mu.device).unsqueeze(-1)
        return torch.addcmul(mu, direction, coef)

    def _forge_batch(self, H, f, *, aggregator, gens, out=None, **_: Any) -> Forged:
        mu, direction = self._direction(H, f)
        sign = self._sign()
        S = H.shape[0]
        if self.params["factor"] == "optimal":
            found = _search_factors(
                H, f, mu, lambda xs: self._combine_batch(mu, direction, [sign * x for x in xs]), aggregator, gens,
                self.params["evals"],
            )
            xs = [x for x, _, _ in found]
            info: dict[str, Any] = {"factor": xs, "objective": [y for _, y, _ in found],
                                    "evaluations": [c for _, _, c in found]}
            vector = self._combine_batch(mu, direction, [sign * x for x in xs])
        else:
            x = self._fixed_factor(H.shape[1], f)
            info = {"factor": [x] * S}
            vector = self._combine(mu, direction, sign * x)
        return Forged(_rows(vector, f, H.dtype, out), None, info, copies=True)


@registry.register("little", "alie")
class LittleAttack(_FactorAttack):
    """"A Little Is Enough" (ALIE): ``μ + z·σ``, or ``μ − z·σ`` with ``negative=true``.

    Baruch, Baruch and Goldberg, *A Little Is Enough: Circumventing Defenses For Distributed Learning*,
    NeurIPS 2019 (arXiv:1902.06156). ``σ`` is the unbiased per-coordinate standard deviation of the
    honest vectors (:func:`mean_std`; LPD ``grad_stck.var(dim=0).sqrt_()``, ByzFL ``ddof=1``). The
    study's anchor runs ``little(factor=1.5,negative=true)`` (LPD ``reproduce.py``): ``μ − 1.5σ``.
    ByzFL's ``ALittleIsEnough(tau)`` is ``little(factor=tau)``.

    Parameters
    ----------
    factor:
        ``z`` (a number, default 1.5); ``zmax`` for the paper's ``z_max = Φ⁻¹((n − s)/n)`` with
        ``s = ⌊n/2 + 1⌋ − f`` and ``n = h + f`` (Algorithm 1; :func:`zmax`); ``zmax-honest`` for
        ``Φ⁻¹((n − f − s)/(n − f))``, the quantile among the honest workers that the code of
        Karimireddy, He and Jaggi (ICLR 2022, arXiv:2006.09365) uses (``zmax(..., honest=True)``;
        that code sends ``μ − zσ``: add ``negative=true`` for its vector); or ``optimal`` for the
        line search.
    negative:
        Use ``μ − zσ`` (LPD's ``negative`` flag).
    evals:
        Aggregator evaluations of the ``optimal`` line search (default 16, as LPD).
    """

    def __init__(self, factor: Any = 1.5, negative: Any = False, evals: Any = 16) -> None:
        super().__init__(
            factor=_as_factor("factor", factor, ("zmax", "zmax-honest", "optimal")),
            negative=_as_bool("negative", negative),
            evals=_as_int("evals", evals, low=1),
        )

    def _direction(self, H, f):
        return mean_std(_work(H))

    def _fixed_factor(self, h, f):
        factor = self.params["factor"]
        if factor in ("zmax", "zmax-honest"):
            return zmax(h + f, f, honest=factor == "zmax-honest")
        return float(factor)


@registry.register("empire", "ipm")
class EmpireAttack(_FactorAttack):
    """"Fall of Empires" / inner-product manipulation (IPM): ``μ + factor·(−μ) = (1 − factor)·μ``.

    Xie, Koyejo and Gupta, *Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
    Manipulation*, UAI 2019 (their ``−ε·μ``, ``ε = factor − 1``). The study's anchor runs
    ``empire(factor=1.1)`` = ``−0.1·μ`` (LPD ``reproduce.py``). ByzFL's
    ``InnerProductManipulation(tau)`` sends ``−τ·μ`` with ``τ = 2`` by default, i.e. ``factor = 1 + τ = 3``
    here. Its ``Optimal_InnerProductManipulation`` searches ``τ ≥ 0`` (``factor ≥ 1``, from ``0``),
    this attack's ``optimal`` searches ``factor ≥ 0`` (from ``μ`` itself).

    Parameters
    ----------
    factor:
        A number (default 1.1) or ``optimal`` (line search over ``factor ≥ 0``, from ``μ`` itself).
    evals:
        Aggregator evaluations of the ``optimal`` line search (default 16).
    """

    def __init__(self, factor: Any = 1.1, evals: Any = 16) -> None:
        super().__init__(factor=_as_factor("factor", factor, ("optimal",)), evals=_as_int("evals", evals, low=1))

    def _direction(self, H, f):
        mu = _mean(H)
        return mu, mu

    def _combine(self, mu, direction, coef):
        return mu * (1.0 - coef)  # = μ + coef·(−μ), without the cancellation of μ − coef·μ

    def _combine_batch(self, mu, direction, coefs):
        return mu * torch.tensor([1.0 - c for c in coefs], dtype=mu.dtype, device=mu.device).unsqueeze(-1)


@registry.register("bulyan-coordinate", "bulyan")
class BulyanCoordinateAttack(_FactorAttack):
    """Single-coordinate attack of "The Hidden Vulnerability": ``μ + factor·e_j`` (``−`` with ``negative``).

    El Mhamdi, Guerraoui and Rouault, *The Hidden Vulnerability of Distributed Learning in Byzantium*,
    ICML 2018: the Byzantine vectors agree with the honest mean everywhere but on one coordinate ``j``,
    so that distance-based rules (Krum, Bulyan's selection) keep them while that coordinate drifts
    (LPD ``identical.py``, ``bulyan``). With ``coordinate=all`` the direction is the all-ones vector.

    Parameters
    ----------
    factor:
        A number (default 1: in gradient units, so scale-dependent) or ``optimal`` (line search,
        recommended).
    coordinate:
        ``j`` (Python indexing, default ``-1``: the last coordinate, as LPD) or ``all``.
    negative:
        Subtract instead of add.
    evals:
        Aggregator evaluations of the ``optimal`` line search (default 16).
    """

    def __init__(self, factor: Any = 1.0, coordinate: Any = -1, negative: Any = False, evals: Any = 16) -> None:
        if isinstance(coordinate, str) and coordinate.strip().lower() == "all":
            coordinate = "all"
        else:
            coordinate = _as_int("coordinate", coordinate)
        super().__init__(
            factor=_as_factor("factor", factor, ("optimal",)),
            coordinate=coordinate,
            negative=_as_bool("negative", negative),
            evals=_as_int("evals", evals, low=1),
        )

    def _direction(self, H, f):
        mu = _mean(H)
        j = self.params["coordinate"]
        if j == "all":
            return mu, torch.ones_like(mu)
        d = mu.shape[-1]
        if not -d <= j < d:
            raise UsageError(OPTION, f"bulyan-coordinate: coordinate {j} is out of range for d = {d}")
        direction = torch.zeros_like(mu)
        direction[..., j] = 1.0
        return mu, direction


@registry.register("sign-flip", "signflip", "sign_flip")
class SignFlipAttack(Attack):
    """Sign flipping: ``−scale·μ`` (ByzFL ``SignFlipping`` with ``scale = 1``; Allen-Zhu et al. 2020).

    Every Byzantine worker sends the negated mean ``μ`` of the honest vectors (an omniscient attack;
    all rows equal). Karimireddy, He & Jaggi's *bit flip* (arXiv 2006.09365) is different: each
    Byzantine worker negates the gradient it computes on its own data — that is ``bit-flip``.

    Parameters
    ----------
    scale:
        Multiplier of the flipped mean (default 1).
    """

    def __init__(self, scale: Any = 1.0) -> None:
        super().__init__(scale=_as_float("scale", scale))

    def _forge(self, H, f, **_: Any) -> Forged:
        return Forged(_rows(_mean(H).mul_(-self.params["scale"]), f, H.dtype), copies=True)

    def _forge_batch(self, H, f, **_: Any) -> Forged:
        return self._forge(H, f)  # shape-generic


@registry.register("gaussian")
class GaussianAttack(Attack):
    """Gaussian attack: coordinates drawn i.i.d. from ``N(mean, std²)`` (ByzFL ``Gaussian``).

    Each of the ``f`` rows is an independent draw (``identical=true``: one draw sent by all). With
    ``centred=true`` the honest mean is added: ``μ + N(mean, std²)``. Draws come from ``generator``
    (required) as ``torch.randn(rows, d)`` in the compute dtype.

    Parameters
    ----------
    mean, std:
        Location and scale of the noise (defaults 0 and 1; ``std ≥ 0``).
    centred:
        Add the honest mean ``μ``.
    identical:
        Draw one vector and send it from every Byzantine worker.
    """

    needs_generator = True

    def __init__(self, mean: Any = 0.0, std: Any = 1.0, centred: Any = False, identical: Any = False) -> None:
        super().__init__(
            mean=_as_float("mean", mean),
            std=_as_float("std", std, low=0.0),
            centred=_as_bool("centred", centred),
            identical=_as_bool("identical", identical),
        )

    def _forge(self, H, f, *, generator, **_: Any) -> Forged:
        p = self.params
        work = _work_dtype(H.dtype)
        rows = 1 if p["identical"] else f
        noise = torch.randn((rows, H.shape[1]), generator=generator, dtype=work, device=H.device)
        noise.mul_(p["std"]).add_(p["mean"])
        if p["centred"]:
            noise.add_(_mean(H))
        noise = noise.to(H.dtype)
        if rows != f:
            noise = noise.expand(f, -1).contiguous()
        return Forged(noise)

    def _forge_batch(self, H, f, *, gens, **_: Any) -> Forged:
        p = self.params
        work = _work_dtype(H.dtype)
        S, _, d = H.shape
        rows = 1 if p["identical"] else f
        # slice s draws exactly what the 2-D call draws from gens[s] (a loop over slices, for the draws only)
        noise = torch.stack([torch.randn((rows, d), generator=g, dtype=work, device=H.device) for g in gens])
        noise.mul_(p["std"]).add_(p["mean"])
        if p["centred"]:
            noise.add_(_mean(H).unsqueeze(-2))
        noise = noise.to(H.dtype)
        if rows != f:
            noise = noise.expand(S, f, d).contiguous()
        return Forged(noise)



class _OwnGradientsAttack(Attack):
    """An attack whose vectors come from the gradients the Byzantine workers compute on their own data
    (the simulation passes them as ``own``, ``(f, d)``; ``(S, f, d)`` for a batch): :meth:`_send` maps
    them to what is sent; ``own_note`` says in the error how they must be computed."""

    needs_own_gradients = True
    own_note = ""

    def _send(self, own: Tensor, H: Tensor) -> Tensor:
        raise NotImplementedError

    def _own(self, own: Any, shape: tuple[int, ...], where: str = "") -> Tensor:
        if own is None:
            raise UsageError(OPTION, f"{self.name} needs the Byzantine workers' own gradients ({self.own_note}): "
                                     "pass own=")
        if not isinstance(own, torch.Tensor) or tuple(own.shape) != shape:
            got = tuple(own.shape) if isinstance(own, torch.Tensor) else type(own).__name__
            raise UsageError(OPTION, f"{self.name}: own must have shape {shape}{where}, got {got}")
        return own

    def _forge(self, H, f, *, own, **_: Any) -> Forged:
        return Forged(self._send(self._own(own, (f, H.shape[1])), H))

    def _forge_batch(self, H, f, *, own, **_: Any) -> Forged:
        S, _, d = H.shape
        shape = (f, d) if own is None else (S, f, d)  # None: the error of the 2-D call
        return Forged(self._send(self._own(own, shape, "" if own is None else " for a batch"), H))


@registry.register("label-flip", "labelflip", "label_flip")
class LabelFlipAttack(_OwnGradientsAttack):
    """Label flipping: the Byzantine workers send honest-looking gradients of mislabelled data.

    Each Byzantine worker samples a batch of its *own* data, maps the labels with
    :attr:`label_map` = :func:`flip_labels` (``y → C − 1 − y``; the bucketing repository's
    ``LableFlippingWorker`` uses ``9 − y`` on MNIST) and computes its gradient. The simulation does this
    (it owns models and data) and passes the ``(f, d)`` result as ``own``; the attack returns a copy
    of it. Whether those gradients are clipped/noised like the honest ones is the simulation's choice.
    """

    label_map = staticmethod(flip_labels)
    own_note = "computed with labels y -> C-1-y"

    def __init__(self) -> None:
        super().__init__()

    def _send(self, own: Tensor, H: Tensor) -> Tensor:
        return own.to(dtype=H.dtype, device=H.device, copy=True).contiguous()


def _same_labels(labels: Tensor, num_classes: int) -> Tensor:
    """The labels unchanged (a copy): the label map of attacks that compute on correctly labelled data."""
    return labels.clone()


@registry.register("bit-flip", "bitflip", "bit_flip")
class BitFlipAttack(_OwnGradientsAttack):
    """Bit flipping as Karimireddy, He & Jaggi define it (*Byzantine-Robust Learning on Heterogeneous
    Datasets via Bucketing*, ICLR 2022, arXiv 2006.09365; ``BitFlippingWorker`` of their code): each
    Byzantine worker ``j`` sends ``−g_j``, the negation of the gradient it computes on a batch of its
    *own* (IID) data with the true labels.

    The rows differ (each worker negates its own gradient). This is not ``sign-flip``, which sends
    ``−μ``, the negated mean of the honest vectors (an omniscient attack; all rows equal). As with
    ``label-flip``, the simulation computes the gradients (:attr:`label_map` is the identity) and
    passes the ``(f, d)`` result as ``own``; whether they are clipped/noised like the honest ones is
    the simulation's choice.
    """

    label_map = staticmethod(_same_labels)
    own_note = "true labels"

    def __init__(self) -> None:
        super().__init__()

    def _send(self, own: Tensor, H: Tensor) -> Tensor:
        return torch.neg(own.to(device=H.device)).to(H.dtype).contiguous()


@registry.register("mimic")
class MimicAttack(Attack):
    """Mimic (Karimireddy, He and Jaggi, *Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing*, ICLR 2022): every Byzantine worker copies one honest worker, ``byz = H[target]``.

    Under non-IID data this over-weights one worker's data and under-represents the others, yet every
    sent vector is a genuine honest vector, so no robust rule can single it out.

    ``target=auto`` implements the paper's heuristic (its ``MimicVariantAttacker``): copy the honest
    worker lying farthest along the direction of largest variance of the honest vectors, estimated over
    the first ``warmup`` steps, then keep that worker:

    - step ``t = 0``: ``μ̄ = μ_0``; ``z`` = the top eigenvector of the scatter matrix
      ``S = Σ_i (H_i − μ̄)(H_i − μ̄)ᵀ`` (computed exactly from the ``h × h`` Gram matrix; the reference
      code takes one power step from a fixed random vector instead), with its sign chosen so that the
      most extreme projection is positive;
    - steps ``0 < t < warmup``: ``μ̄ ← t/(t+1)·μ̄ + μ_t/(t+1)``,
      ``z ← normalise(t/(t+1)·z + (S z/‖S z‖)/(t+1))`` (an online power iteration);
    - steps ``t < warmup``: ``target = argmax_i ⟨H_i, z⟩``; afterwards the last target is kept.

    The running estimate and the chosen target live in :class:`MimicState`, returned as
    ``forge(...).state`` and passed back by the caller; nothing is kept on the attack object.
    ``__call__`` starts from ``t = 0`` every time. The reference default is ``warmup = 1`` (target chosen
    on the first step, then fixed).

    Parameters
    ----------
    target:
        Honest row index to copy (``0 ≤ target < h``, default 0 as ByzFL's ``Mimic``) or ``auto``.
    warmup:
        Number of steps over which ``target=auto`` re-estimates its direction (``≥ 1``, default 1).
    """

    def __init__(self, target: Any = 0, warmup: Any = 1) -> None:
        if isinstance(target, str) and target.strip().lower() == "auto":
            target = "auto"
        else:
            target = _as_int("target", target, low=0)
        super().__init__(target=target, warmup=_as_int("warmup", warmup, low=1))

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return self.params["target"] == "auto"

    def _forge(self, H, f, *, state, **_: Any) -> Forged:
        h, d = H.shape
        target = self.params["target"]
        if target != "auto":
            if target >= h:
                raise UsageError(OPTION, f"mimic: target {target} is not an honest row (h = {h})")
            return Forged(_rows(H[target], f, H.dtype), state, copies=True)
        return self._auto(H, f, state)

    def _forge_batch(self, H, f, *, state, **_: Any) -> Forged:
        S, h, d = H.shape
        target = self.params["target"]
        if target != "auto":
            if target >= h:
                raise UsageError(OPTION, f"mimic: target {target} is not an honest row (h = {h})")
            return Forged(_rows(H[:, target], f, H.dtype), state, copies=True)
        state = _stack_mimic_states(state, S)
        t = 0 if state is None else int(state.step)
        if t < self.params["warmup"]:
            # warm-up steps (an eigendecomposition or a power step per slice, `warmup` steps in a run):
            # slice by slice with the 2-D code, so that each slice's direction and target are its own
            parts = [
                self._auto(H[s], f, None if state is None else
                           MimicState(step=t, mean=state.mean[s], direction=state.direction[s], target=state.target[s]))
                for s in range(S)
            ]
            stacked = MimicState(
                step=t + 1,
                mean=torch.stack([p.state.mean for p in parts]),
                direction=torch.stack([p.state.direction for p in parts]),
                target=torch.stack([p.state.target for p in parts]),
            )
            return Forged(torch.stack([p.value for p in parts]), stacked)
        if tuple(state.direction.shape) != (S, d) or tuple(state.target.shape) != (S,):
            raise UsageError(OPTION, "mimic(target=auto): the state does not match H (batch size or dimension)")
        target = state.target if state.target.device == H.device else state.target.to(H.device)
        value = _rows(H[torch.arange(S, device=H.device), target], f, H.dtype)
        return Forged(value, MimicState(step=t + 1, mean=state.mean, direction=state.direction, target=target))

    def _auto(self, H: Tensor, f: int, state: MimicState | None) -> Forged:
        X = _work(H)
        h, d = X.shape
        if state is not None:
            if not isinstance(state, MimicState):
                raise UsageError(OPTION, f"mimic(target=auto): state must be a MimicState, got {type(state).__name__}")
            if tuple(state.direction.shape) != (d,) or state.direction.device != X.device:
                raise UsageError(OPTION, "mimic(target=auto): the state does not match H (dimension or device)")
        t = 0 if state is None else int(state.step)
        warmup = self.params["warmup"]
        if t == 0:
            mean = X.sum(dim=0).div_(h)
            C = X - mean
            gram = (C @ C.T).to(torch.float64)
            _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues: the last column is the top one
            z = _normalise(vecs[:, -1].to(C.dtype) @ C)
            proj = C @ z
            z = z * torch.where(proj.max() >= -proj.min(), 1.0, -1.0).to(z.dtype)
        elif t < warmup:
            mean = state.mean.to(X.dtype) * (t / (t + 1)) + X.sum(dim=0).div_(h) * (1 / (t + 1))
            C = X - mean
            u = _normalise((C @ state.direction.to(X.dtype)) @ C)
            z = _normalise(state.direction.to(X.dtype) * (t / (t + 1)) + u * (1 / (t + 1)))
        else:
            mean, z = state.mean, state.direction
        if t < warmup:
            target = torch.argmax(X @ z)
        else:
            target = state.target
            if target.device != X.device:
                target = target.to(X.device)
        value = _rows(H.index_select(0, target.reshape(1)).squeeze(0), f, H.dtype)
        return Forged(value, MimicState(step=t + 1, mean=mean, direction=z, target=target))


# ----------------------------------------------------------------------------------------------- #
# Internals


def _check_honest(H: Any) -> Tensor:
    if not isinstance(H, torch.Tensor):
        raise UsageError(OPTION, f"honest vectors must be a torch.Tensor, got {type(H).__name__}")
    if H.dim() not in (2, 3):
        raise UsageError(OPTION, f"honest vectors must be a 2-D (h, d) tensor or a 3-D (S, h, d) batch, got shape "
                                 f"{tuple(H.shape)}")
    if not H.dtype.is_floating_point:
        raise UsageError(OPTION, f"honest vectors must be floating point, got {H.dtype}")
    if H.shape[-2] < 1:
        raise UsageError(OPTION, "at least one honest vector is needed")
    if H.dim() == 3 and H.shape[0] < 1:
        raise UsageError(OPTION, "a batch of honest vectors needs at least one slice (S >= 1)")
    return H


def _written_into(out: Tensor | None, forged: Forged) -> Forged:
    """``forged`` with its vectors in ``out`` (copied there unless the attack wrote them in place)."""
    if out is None or forged.value is out:
        return forged
    out.copy_(forged.value)
    return Forged(out, forged.state, forged.info, forged.copies)


def _generators(generator: Any, S: int) -> list[torch.Generator | None]:
    """One generator (or ``None``) per slice of a batch: a single one stands for ``[generator] * S``
    (the slices draw from it in turn, in slice order)."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * S
    if not isinstance(generator, (list, tuple)):
        raise UsageError(OPTION, f"generator must be a torch.Generator or a sequence of {S} of them (one per "
                                 f"slice), got {type(generator).__name__}")
    if len(generator) != S:
        raise UsageError(OPTION, f"a batch of {S} slices needs {S} generators (one per slice), got {len(generator)}")
    for g in generator:
        if g is not None and not isinstance(g, torch.Generator):
            raise UsageError(OPTION, f"generator must be a torch.Generator, got {type(g).__name__}")
    return list(generator)


def _slice_states(state: Any, S: int, name: str) -> list[Any]:
    """The per-slice states of a batch: ``None`` (all fresh) or a sequence of ``S``."""
    if state is None:
        return [None] * S
    if not isinstance(state, (list, tuple)) or len(state) != S:
        raise UsageError(OPTION, f"attack {name!r}: the state of a batch of {S} slices must be a sequence of {S} "
                                 f"per-slice states, got {type(state).__name__}")
    return list(state)


def _stack_mimic_states(state: Any, S: int) -> MimicState | None:
    """The state of ``mimic(target=auto)`` for a batch of ``S``: ``None``, a batched :class:`MimicState`
    (tensors with a leading ``S``), or a sequence of ``S`` per-slice states at the same step (stacked)."""
    if state is None or isinstance(state, MimicState):
        return state
    if isinstance(state, (list, tuple)) and len(state) == S:
        if all(s is None for s in state):
            return None
        if all(isinstance(s, MimicState) for s in state) and len({int(s.step) for s in state}) == 1:
            return MimicState(
                step=int(state[0].step),
                mean=torch.stack([s.mean for s in state]),
                direction=torch.stack([s.direction for s in state]),
                target=torch.stack([s.target.reshape(()) for s in state]),
            )
    raise UsageError(OPTION, f"mimic(target=auto): the state of a batch of {S} slices must be a MimicState or a "
                             f"sequence of {S} MimicStates at the same step, got {type(state).__name__}")


def _check_f(f: Any) -> int:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise UsageError(OPTION, f"f must be a non-negative integer, got {f!r}")
    return f


def _check_generator(generator: Any, H: Tensor, name: str) -> None:
    if generator is None:
        raise UsageError(OPTION, f"attack {name!r} draws random numbers: pass generator=torch.Generator(...)")
    if not isinstance(generator, torch.Generator):
        raise UsageError(OPTION, f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != H.device.type:
        raise UsageError(OPTION, f"generator is on {generator.device}, honest vectors on {H.device}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _work(H: Tensor) -> Tensor:
    """``H`` in the compute dtype (a copy only for half precision)."""
    return H if H.dtype in (torch.float32, torch.float64) else H.to(torch.float32)


def _mean(H: Tensor) -> Tensor:
    """Honest mean in the compute dtype (a new ``(d,)`` tensor, ``(S, d)`` for a batch)."""
    return _work(H).sum(dim=-2).div_(H.shape[-2])


def _rows(vector: Tensor, f: int, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``f`` copies of ``vector`` as a new contiguous ``(f, d)`` tensor of ``dtype`` (one copy of an
    expanded view: ``Tensor.repeat`` costs 4× more for small vectors), or written into ``out``; a batch
    of vectors ``(S, d)`` gives ``(S, f, d)``."""
    if vector.dim() == 1:
        rows = vector.expand(f, vector.shape[-1])
    else:
        rows = vector.unsqueeze(-2).expand(*vector.shape[:-1], f, vector.shape[-1])
    if out is not None:
        return out.copy_(rows)
    return rows.clone(memory_format=torch.contiguous_format) if vector.dtype == dtype else rows.to(dtype, copy=True)


def _normalise(z: Tensor) -> Tensor:
    norm = torch.linalg.vector_norm(z)
    return torch.where(norm > 0, z / torch.where(norm > 0, norm, torch.ones_like(norm)), z)


def _aggregate_value(out: Any) -> Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    value = getattr(out, "value", None)
    if isinstance(value, torch.Tensor):
        return value
    raise UsageError(OPTION, f"the aggregator returned {type(out).__name__}, expected a Tensor[d]")


def _accepts_generator(aggregator: Aggregator) -> bool:
    try:
        params = inspect.signature(aggregator).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "generator" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _fork(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def _search_factor(
    H: Tensor,
    f: int,
    mu: Tensor,
    vector: Callable[[float], Tensor],
    aggregator: Aggregator,
    generator: torch.Generator | None,
    evals: int,
) -> tuple[float, float, int]:
    """Line search of ``x ≥ 0`` maximising ``‖agg([H; vector(x)×f], f) − μ‖²``."""
    h, d = H.shape
    G = H.new_empty((h + f, d))
    G[:h] = H
    pass_generator = generator is not None and _accepts_generator(aggregator)

    def objective(x: float) -> float:
        G[h:] = vector(x).to(H.dtype)
        kwargs = {"generator": _fork(generator)} if pass_generator else {}
        out = _aggregate_value(aggregator(G, f, **kwargs))
        diff = out.to(mu.dtype) - mu
        return float(torch.linalg.vector_norm(diff, dtype=torch.float64) ** 2)

    return line_maximize(objective, evals)


def _search_factors(
    H: Tensor,
    f: int,
    mu: Tensor,
    vectors: Callable[[list[float]], Tensor],
    aggregator: Aggregator,
    gens: list[torch.Generator | None],
    evals: int,
) -> list[tuple[float, float, int]]:
    """:func:`_search_factor` for a batch ``H`` of shape ``(S, h, d)``: ``S`` line searches in lockstep.

    Round ``k`` places every slice's ``k``-th probe ``vectors(xs)[s]`` (``(S, d)``) in its Byzantine rows
    and calls ``aggregator`` once on the ``(S, h + f, d)`` stack (``generator``: a copy of each slice's
    generator); each slice's search sees only its own score, so it probes and returns what the 2-D
    search on that slice does with the same aggregate values."""
    S, h, d = H.shape
    G = H.new_empty((S, h + f, d))
    G[:, :h] = H
    pass_generator = any(g is not None for g in gens) and _accepts_generator(aggregator)
    searches = [_line_search(evals, 0.0, 1.0, 0.8) for _ in range(S)]
    probes = [next(search) for search in searches]
    found: list[tuple[float, float, int] | None] = [None] * S
    while any(r is None for r in found):
        G[:, h:] = vectors(probes).to(H.dtype).unsqueeze(-2)
        kwargs = {"generator": [None if g is None else _fork(g) for g in gens]} if pass_generator else {}
        value = _aggregate_value(aggregator(G, f, **kwargs))
        if tuple(value.shape) != (S, d):
            raise UsageError(
                OPTION, f"the aggregator returned shape {tuple(value.shape)} for a batch, expected {(S, d)}"
            )
        scores = (torch.linalg.vector_norm(value.to(mu.dtype) - mu, dim=-1, dtype=torch.float64) ** 2).tolist()
        for s, search in enumerate(searches):
            if found[s] is None:
                try:
                    probes[s] = search.send(_score(scores[s]))
                except StopIteration as stop:
                    found[s] = stop.value
    return found  # type: ignore[return-value]


# Parameter checks of this family: :mod:`dpbr.validate`'s, naming ``--attack``.
_as_bool = functools.partial(param_bool, OPTION)
_as_float = functools.partial(param_float, OPTION)
_as_int = functools.partial(param_int, OPTION)
_as_factor = functools.partial(param_factor, OPTION)
