r"""Gradient-privacy mechanisms applied by honest workers before they send their gradients.

Every mechanism is a callable ``mech(G, *, generator=None, out=None) -> Tensor`` on a stack ``G`` of
shape ``(h, d)`` — one row per honest worker — (a single vector of shape ``(d,)`` is treated as one row;
per-example clipping takes ``(h, b, d)``). Mechanisms never mutate ``G``, keep its dtype and device,
never call ``.item()`` and never loop in Python over rows or coordinates. ``out`` (optional) is a tensor
of the result's shape, dtype and device, sharing no memory with ``G``, that receives the result (and is
returned): the simulation passes the rows of the matrix the rule aggregates, so nothing is allocated
or copied per step (the Gaussian mechanism draws its noise straight into ``out``). Same values with or
without ``out``.

Look-up by name or spec string (:mod:`dpbr.registry` grammar)::

    get("gaussian", epsilon=0.2, delta=1e-6, clip=0.01, batch_size=50)
    get("gaussian", sigma=0.1)
    get("sparsify", p=0.25)
    get("quantize", bits=8)
    get("clip(c=0.01)+gaussian(epsilon=0.2,delta=1e-06,clip=0.01,batch_size=50)+sparsify(p=0.25)")

Attributes of every mechanism: ``name`` (canonical spec string, all parameters, sorted), ``stage``
(its place in a pipeline), ``sigma`` (per-coordinate Gaussian noise standard deviation it adds, ``0.0``
for mechanisms that add none) and ``randomized``.

Canonical order of a pipeline
-----------------------------
:func:`compose` (and ``get("a+b+c")``) always applies the stages in the order

    clip (0) → Gaussian noise (1) → sparsify / top-k (2) → quantize (3)

whatever order they were given in, and rejects two mechanisms of one stage. Why this order:

* clipping must come first — it bounds the sensitivity the noise is calibrated to;
* the noise must come straight after clipping: its (ε, δ) guarantee is for the clipped gradient, and
  by the *post-processing* property of differential privacy (Dwork & Roth 2014, Prop. 2.1) anything
  computed from the noised gradient alone — sparsification, quantization — keeps that guarantee.
  Sparsifying or quantizing *before* the noise would also be private, but then the noise would undo
  the compression (a dense noisy vector), and a data-dependent choice of coordinates made before the
  noise would need its own privacy analysis;
* sparsify before quantize: the quantization grid is then fitted to the values that are kept, and
  the zeros stay exactly zero under every quantizer here (except ``uniform``/``stochastic`` when 0 is
  not a grid point).

Randomness
----------
``generator`` is ``None`` (PyTorch's global generator), one :class:`torch.Generator` (the whole
``(h, d)`` block is drawn from it in one call) or a sequence of ``h`` generators (row ``i`` — worker
``i`` — is drawn from generator ``i``; the simulation seeds one generator per worker from
``(seed, purpose, worker)``, which makes the noise independent across workers and, because each call
advances the generators, across steps). A generator on another device than ``G`` works (the draw is
moved) but costs a copy. A pipeline passes the same generator(s) to each randomized stage in order.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar, Sequence, Union

from dpbr._lazy import LazyModule

if TYPE_CHECKING:
    import torch
else:  # imported on first use: validating mechanism names needs no torch (dpbr._lazy)
    torch = LazyModule("torch", globals())

from dpbr.errors import UsageError
from dpbr.privacy import accounting as _acc
from dpbr.registry import Registry, format_term, parse
from dpbr.validate import merge_params
from dpbr.validate import positive_finite as _positive_finite
from dpbr.validate import positive_int as _positive_int
from dpbr.validate import real as _number

__all__ = [
    "STAGES",
    "Mechanism",
    "Pipeline",
    "Identity",
    "Clip",
    "Gaussian",
    "Sparsify",
    "TopK",
    "Quantize",
    "gaussian_sigma",
    "clip_rows",
    "clip_per_example_mean",
    "clip_per_example_sum",
    "sparsify_rows",
    "compose",
    "get",
    "names",
    "registry",
]

GeneratorArg = Union["torch.Generator", Sequence["torch.Generator"], None]

#: Stage numbers: the order in which a pipeline applies its mechanisms.
STAGES: dict[str, int] = {"clip": 0, "noise": 1, "sparsify": 2, "quantize": 3}
_STAGE_NAMES = {v: k for k, v in STAGES.items()}

#: What a UsageError about a mechanism spec names. No command-line option takes a whole mechanism
#: spec except ``dpbr reconstruct --defence``; the commands re-raise these errors under their own
#: option (``--defence``, ``--quantize``), so this label only reaches direct library callers.
_OPTION = "mechanism"

#: The mechanisms: every mechanism class below registers itself with ``@registry.register(name, *aliases)``.
registry: Registry["Mechanism"] = Registry(kind="privacy mechanism", option=_OPTION)


def gaussian_sigma(clip: float, batch_size: int, epsilon: float, delta: float) -> float:
    r"""Per-coordinate noise standard deviation of the study's Gaussian mechanism.

    .. math:: \sigma = \frac{2C}{b} \cdot \frac{\sqrt{2 \ln(1.25/\delta)}}{\varepsilon}

    the classic Gaussian mechanism (Dwork & Roth 2014, Thm A.1) for a mean of ``b`` gradients of norm
    at most ``C`` (sensitivity ``2C/b``), as in the LPD code of Guerraoui et al. 2021. Requires
    ``0 < epsilon < 1`` and ``0 < delta < 1``.

    Raises
    ------
    dpbr.errors.UsageError
        Naming ``--epsilon``, ``--delta``, ``--clip`` or ``--batch-size``.

    >>> round(gaussian_sigma(0.01, 10, 0.1, 1e-6), 5)
    0.10598
    """
    z = _acc.noise_multiplier(epsilon, delta)
    c = _positive_finite(clip, "--clip", "clip")
    b = _positive_int(batch_size, "--batch-size", "batch size")
    return 2.0 * c / b * z


# --------------------------------------------------------------------------------------------------
# Tensor helpers


def _check_tensor(G: Any, who: str) -> torch.Tensor:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(G).__name__}")
    if not G.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point tensor, got dtype {G.dtype}")
    return G


def _as_rows(G: torch.Tensor, who: str) -> torch.Tensor:
    """``G`` as a 2-D ``(h, d)`` view (a vector becomes one row)."""
    _check_tensor(G, who)
    if G.dim() == 1:
        return G.unsqueeze(0)
    if G.dim() == 2:
        return G
    raise ValueError(f"{who}: expected a (h, d) stack of worker gradients or a (d,) vector, got shape {tuple(G.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reduced-precision inputs are processed in float32 (norms, grids) and cast back."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_out(out: Any, G: torch.Tensor, shape: tuple[int, ...], who: str) -> torch.Tensor:
    """``out`` if it can receive a result of ``shape`` computed from ``G``: a tensor of ``G``'s dtype and
    device and that shape, sharing no memory with ``G`` (the result is written while ``G`` is read)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{who}: out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != G.dtype or out.device != G.device:
        raise ValueError(
            f"{who}: out must have shape {shape}, dtype {G.dtype} and device {G.device}; got shape "
            f"{tuple(out.shape)}, dtype {out.dtype}, device {out.device}"
        )
    if out.numel() and G.numel():  # overlapping address ranges (the spans of strided views)
        lo, glo = out.data_ptr(), G.data_ptr()
        if lo < glo + _span(G) and glo < lo + _span(out):
            raise ValueError(f"{who}: out must not share memory with the input")
    return out


def _span(t: torch.Tensor) -> int:
    """Bytes from the first to just past the last element of ``t`` (non-negative strides)."""
    return (sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


def _generators(generator: GeneratorArg, h: int, who: str) -> list[torch.Generator] | torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (str, bytes)) or not isinstance(generator, Sequence):
        raise TypeError(
            f"{who}: generator must be a torch.Generator, a sequence of them or None, got {type(generator).__name__}"
        )
    gens = list(generator)
    if len(gens) != h:
        raise ValueError(f"{who}: got {len(gens)} generators for {h} rows; pass one generator per worker row")
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"{who}: generator sequence holds a {type(g).__name__}, expected torch.Generator")
    return gens


#: Numbers per row from which the rows of a sequence of CPU generators are drawn in parallel threads
#: (below it the threads' hand-over, ≈ 0.1 ms, costs more than it saves).
PARALLEL_DRAW_MIN = 1 << 16


@functools.lru_cache(maxsize=4)
def _draw_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads for :func:`_fill` (made on first use, then reused)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dpbr-draw")


def _draw_rows(rows: list[tuple[torch.Tensor, torch.Generator]], kind: str, a: float, b: float) -> None:
    """Fill each ``row`` from its own generator (``normal(a, b)`` or ``uniform(a, b)``), in order."""
    if kind == "normal":
        for row, g in rows:
            row.normal_(a, b, generator=g)
    else:
        for row, g in rows:
            row.uniform_(a, b, generator=g)


def _draw_rows_parallel(rows: list[tuple[torch.Tensor, torch.Generator]], kind: str, a: float, b: float,
                        threads: int) -> None:
    """:func:`_draw_rows` with the rows split into ``threads`` contiguous parts, one per thread (the
    calling thread takes the last part). Same numbers as drawing them in order: row ``i`` only ever
    advances generator ``i``. Each thread runs under the caller's grad and inference modes (they are
    thread-local, and an inference tensor may only be written in inference mode)."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def work(part: list[tuple[torch.Tensor, torch.Generator]]) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            _draw_rows(part, kind, a, b)

    bounds = [len(rows) * t // threads for t in range(threads + 1)]
    parts = [rows[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    pool = _draw_pool(threads - 1)
    futures = [pool.submit(work, part) for part in parts[:-1]]
    _draw_rows(parts[-1], kind, a, b)
    for fut in futures:
        fut.result()


def _fill(
    out: torch.Tensor, kind: str, generator: GeneratorArg, who: str, a: float = 0.0, b: float = 1.0
) -> torch.Tensor:
    """Fill the 2-D tensor ``out`` in place with ``normal(a, b)`` or ``uniform(a, b)`` draws.

    One generator draws the whole block in one call; a sequence draws row ``i`` from generator ``i``.

    Speed: PyTorch draws from one CPU generator on one core (the generator is sequential), so with
    a sequence of CPU generators and rows of at least :data:`PARALLEL_DRAW_MIN` numbers the rows are
    drawn in ``min(torch.get_num_threads(), h)`` threads at once (the kernels release the GIL). The
    numbers are the same either way.
    """
    gens = _generators(generator, out.shape[0], who)

    def draw(t: torch.Tensor, g: torch.Generator | None) -> None:
        if g is not None and g.device.type != t.device.type:
            tmp = torch.empty(t.shape, dtype=t.dtype, device=g.device)
            draw(tmp, g)
            t.copy_(tmp)
        elif kind == "normal":
            t.normal_(a, b, generator=g)
        else:
            t.uniform_(a, b, generator=g)

    if gens is None or isinstance(gens, torch.Generator):
        draw(out, gens)
    elif all(g.device.type == out.device.type for g in gens):
        # the common case, without the per-row checks (a step of a small model is Python overhead);
        # one call per worker, not per coordinate
        rows = list(zip(out.unbind(0), gens))
        threads = min(torch.get_num_threads(), len(rows))
        if out.device.type == "cpu" and threads > 1 and out.shape[1] >= PARALLEL_DRAW_MIN:
            _draw_rows_parallel(rows, kind, a, b, threads)
        else:
            _draw_rows(rows, kind, a, b)
    else:
        for row, g in zip(out.unbind(0), gens):
            draw(row, g)
    return out


# --------------------------------------------------------------------------------------------------
# Clipping


def clip_rows(X: torch.Tensor, c: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    r"""Scale each row (last dimension) of ``X`` to L2 norm at most ``c``: :math:`x \min(1, c/\|x\|_2)`.

    Works on any shape ``(..., d)`` — ``(m, d)`` worker gradients or ``(h, b, d)`` per-example
    gradients. Zero rows stay zero; rows with a non-finite entry become non-finite (NaN); no host
    synchronisation. Norms of float16/bfloat16 inputs are computed in float32. Returns a new tensor,
    or ``out`` (same shape and dtype as ``X``; ``out`` may be ``X`` itself for an in-place clip of a
    buffer the caller owns) filled with the result.
    """
    _check_tensor(X, "clip_rows")
    c = _positive_finite(c, "--clip", "clip")
    norms = torch.linalg.vector_norm(X, dim=-1, keepdim=True, dtype=_compute_dtype(X.dtype))
    # c/‖x‖ as torch computes ``c / norms`` (reciprocal, then times c), in place: no temporaries
    scale = norms.reciprocal_().mul_(c).clamp_(max=1.0)  # zero row: c/0 = inf -> 1
    return torch.mul(X, scale if scale.dtype == X.dtype else scale.to(X.dtype), out=out)


def clip_per_example_sum(per_example: torch.Tensor, c: float) -> torch.Tensor:
    r"""Sum over examples of per-example gradients clipped to ``c``: :math:`\sum_j \mathrm{clip}_c(g_j)`.

    ``per_example`` has shape ``(..., b, d)`` (e.g. ``(h, chunk, d)``); the result ``(..., d)``. Meant for
    chunked per-example gradients: add the sums of the chunks, divide by ``b`` at the end.
    """
    _check_tensor(per_example, "clip_per_example_sum")
    if per_example.dim() < 2:
        raise ValueError(
            f"clip_per_example_sum: expected (..., b, d) per-example gradients, got shape {tuple(per_example.shape)}"
        )
    return clip_rows(per_example, c).sum(dim=-2)


def clip_per_example_mean(per_example: torch.Tensor, c: float) -> torch.Tensor:
    r"""Mean over examples of per-example gradients clipped to ``c`` (Abadi et al. 2016, DP-SGD).

    :math:`\bar g = \frac1b \sum_{j=1}^b g_j \min(1, c/\|g_j\|_2)`; ``per_example`` has shape
    ``(..., b, d)``, the result ``(..., d)``. This bounds every example's contribution to the mean by
    ``c/b``, which is what makes ``2c/b`` the sensitivity of :func:`gaussian_sigma`.
    """
    _check_tensor(per_example, "clip_per_example_mean")
    if per_example.dim() < 2:
        raise ValueError(
            f"clip_per_example_mean: expected (..., b, d) per-example gradients, got shape {tuple(per_example.shape)}"
        )
    return clip_rows(per_example, c).mean(dim=-2)


# --------------------------------------------------------------------------------------------------
# Mechanisms


class Mechanism:
    """Base class: a named, stateless transformation of worker gradients.

    Subclasses register with ``@registry.register(name, *aliases)`` (which sets :attr:`key` and
    :attr:`aliases`), declare their parameters as the keyword parameters of ``__init__`` (validated
    there; :attr:`name` is then the canonical spec with every parameter) and implement :meth:`_apply`
    on a 2-D ``(h, d)`` tensor; :meth:`__call__` handles the ``(d,)`` case and the checks.
    """

    #: Registered name (set by the registry's decorator).
    key: ClassVar[str] = ""
    #: Registered aliases (set by the registry's decorator).
    aliases: ClassVar[tuple[str, ...]] = ()
    name: str = "mechanism"
    stage: int = -1
    sigma: float = 0.0
    randomized: bool = False

    def __call__(self, G: torch.Tensor, *, generator: GeneratorArg = None, out: torch.Tensor | None = None) -> torch.Tensor:
        X = _as_rows(G, self.name)
        if out is not None:
            target = _check_out(out, G, tuple(G.shape), self.name)
            self._apply_into(X, generator, target if G.dim() == 2 else target.unsqueeze(0))
            return out
        res = self._apply(X, generator)
        return res.reshape(G.shape) if G.dim() == 1 else res

    def _apply(self, X: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _apply_into(self, X: torch.Tensor, generator: GeneratorArg, out: torch.Tensor) -> None:
        """Write the result for the 2-D ``X`` into ``out`` (default: compute it, then copy)."""
        out.copy_(self._apply(X, generator))

    @property
    def stage_name(self) -> str:
        return _STAGE_NAMES.get(self.stage, "none")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mechanism) and type(other) is type(self) and other.name == self.name

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))


@registry.register("none", "identity", "off")
class Identity(Mechanism):
    """No privacy mechanism (``"none"``): returns a copy of the input (ε = ∞ in the study's grid)."""

    stage = -1

    def __init__(self) -> None:
        self.name = self.key

    def __call__(self, G: torch.Tensor, *, generator: GeneratorArg = None, out: torch.Tensor | None = None) -> torch.Tensor:
        _check_tensor(G, self.name)
        if out is not None:
            return _check_out(out, G, tuple(G.shape), self.name).copy_(G)
        return G.clone()


@registry.register("clip")
class Clip(Mechanism):
    r"""L2 clipping to norm ``c``: :math:`x \mapsto x \min(1, c / \|x\|_2)`.

    ``mode="batch"`` (the study's mode and the LPD code's): each worker's *mini-batch* gradient row of
    ``G (h, d)`` is clipped. This bounds what a worker sends, not each example's influence, so the
    ``2C/b`` sensitivity behind :func:`gaussian_sigma` is *not* guaranteed.

    ``mode="per-example"`` (DP-SGD, Abadi et al. 2016, "Deep Learning with Differential Privacy"): the
    input must be per-example gradients ``(h, b, d)``; each example is clipped, then the ``b`` clipped
    gradients are averaged, giving ``(h, d)`` (:func:`clip_per_example_mean`). A 2-D input is rejected:
    a mini-batch gradient cannot be clipped per example after the fact.
    """

    stage = STAGES["clip"]

    def __init__(self, c: float | None = None, mode: str = "batch") -> None:
        if c is None:
            raise UsageError(_OPTION, "clip: needs the clipping norm c, e.g. clip(c=0.01)")
        self.c = _positive_finite(c, "--clip", "clip")
        m = str(mode).strip().lower().replace("_", "-")
        if m in ("per-example", "example", "per-sample", "sample"):
            m = "per-example"
        if m not in ("batch", "per-example"):
            raise UsageError(_OPTION, f"clip: mode must be 'batch' or 'per-example', got {mode!r}")
        self.mode = m
        self.name = format_term(self.key, {"c": self.c, "mode": self.mode})

    def __call__(self, G: torch.Tensor, *, generator: GeneratorArg = None, out: torch.Tensor | None = None) -> torch.Tensor:
        _check_tensor(G, self.name)
        if self.mode == "per-example":
            if G.dim() != 3:
                raise ValueError(
                    f"{self.name}: per-example clipping needs per-example gradients of shape (h, b, d), got shape "
                    f"{tuple(G.shape)}; a mini-batch gradient cannot be clipped per example — compute per-example "
                    "gradients (or use clip_per_example_sum on chunks) or use mode=batch"
                )
            res = clip_per_example_mean(G, self.c)
            return res if out is None else _check_out(out, G, tuple(res.shape), self.name).copy_(res)
        return super().__call__(G, generator=generator, out=out)

    def _apply(self, X: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
        return clip_rows(X, self.c)

    def _apply_into(self, X: torch.Tensor, generator: GeneratorArg, out: torch.Tensor) -> None:
        clip_rows(X, self.c, out=out)


@registry.register("gaussian", "noise", "gauss")
class Gaussian(Mechanism):
    r"""Additive i.i.d. Gaussian noise: :math:`x \mapsto x + \mathcal N(0, \sigma^2 I_d)` per worker row.

    ``sigma`` is given directly or calibrated from ``(epsilon, delta, clip, batch_size)`` with the
    classic Gaussian mechanism, :math:`\sigma = \frac{2C}{b}\sqrt{2\ln(1.25/\delta)}/\varepsilon`
    (:func:`gaussian_sigma`; Dwork & Roth 2014, Thm A.1; the noise of Guerraoui et al. 2021's LPD code).
    ``sigma = 0`` returns a copy and draws nothing.

    Speed: the noise is drawn straight into the output with ``Tensor.normal_(0, σ, generator=…)`` and
    the input added in place (two passes over memory). Measured for ``(6, 431080)`` float32 on the
    2-core CPU of this project, ``normal_`` was the fastest option (≈25 ms; ``torch.randn`` the same,
    NumPy's ``standard_normal`` ≈2×, Box–Muller from ``torch.rand`` ≈1.5–2×, a float64 draw ≈5×).
    """

    stage = STAGES["noise"]
    randomized = True

    def __init__(
        self,
        sigma: float | None = None,
        epsilon: float | None = None,
        delta: float | None = None,
        clip: float | None = None,
        batch_size: int | None = None,
    ) -> None:
        calib = {"epsilon": epsilon, "delta": delta, "clip": clip, "batch_size": batch_size}
        given = {k: v for k, v in calib.items() if v is not None}
        if sigma is not None:
            if given:
                raise UsageError(
                    _OPTION,
                    "gaussian: give either sigma or epsilon, delta, clip and batch_size, not both "
                    f"(got sigma and {', '.join(sorted(given))})",
                )
            s = _number(sigma, "--sigma", "sigma")
            if not (s >= 0.0 and math.isfinite(s)):
                raise UsageError("--sigma", f"sigma must be a finite number >= 0, got {s!r}")
            self.sigma = s
            self.params: dict[str, Any] = {"sigma": s}
        else:
            missing = [k for k, v in calib.items() if v is None]
            if missing:
                raise UsageError(
                    _OPTION,
                    f"gaussian: needs sigma, or epsilon, delta, clip and batch_size (missing {', '.join(missing)})",
                )
            self.sigma = gaussian_sigma(clip, batch_size, epsilon, delta)  # type: ignore[arg-type]
            self.params = {
                "epsilon": float(epsilon),  # type: ignore[arg-type]
                "delta": float(delta),  # type: ignore[arg-type]
                "clip": float(clip),  # type: ignore[arg-type]
                "batch_size": int(batch_size),  # type: ignore[arg-type]
            }
        self.epsilon = self.params.get("epsilon")
        self.delta = self.params.get("delta")
        self.name = format_term(self.key, self.params)

    def _apply(self, X: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
        out = torch.empty_like(X, memory_format=torch.contiguous_format)
        self._apply_into(X, generator, out)
        return out

    def _apply_into(self, X: torch.Tensor, generator: GeneratorArg, out: torch.Tensor) -> None:
        if self.sigma == 0.0:
            out.copy_(X)
            return
        _fill(out, "normal", generator, self.name, 0.0, self.sigma)
        out.add_(X)


def sparsify_rows(X: torch.Tensor, p: float) -> torch.Tensor:
    r"""Zero the fraction ``p`` of smallest-magnitude coordinates, separately among the positive and
    among the negative coordinates of each row of ``X (h, d)``.

    Definition (per row and per sign; zeros belong to neither sign and stay zero): with ``n`` the
    number of coordinates of that sign, the ``k = ⌊p·n + ½⌋`` of smallest magnitude (``p·n`` rounded
    to the nearest integer, halves up) are set to 0. Ties in magnitude are broken by position: the
    lower index is pruned first, so exactly ``k`` coordinates of each sign are pruned. NaN coordinates
    are left untouched.

    Vectorized over rows with one ``torch.kthvalue``: per (sign, row) the ``k``-th smallest magnitude
    is found by prepending ``K − k`` copies of ``−inf`` (``K = ⌊p·d + ½⌋``, a static bound on ``k``) to
    the magnitudes masked with ``+inf`` outside the sign, so one common rank ``K`` selects every row's
    own threshold; coordinates strictly below the threshold are pruned, then ties at the threshold in
    index order (cumulative sum) until ``k`` are pruned. No sort and no host synchronisation. At
    ``(6, 431080)`` float32 on the 2-core CPU sandbox: ≈100–140 ms (median, light load), the
    ``kthvalue`` over ``(12, d + K)`` dominating; a full stable sort was ≈2× slower, and NumPy's
    ``partition`` degrades badly on repeated values (exact zeros), so it is not used.
    """
    _check_tensor(X, "sparsify")
    if X.dim() != 2:
        raise ValueError(f"sparsify: expected a (h, d) tensor, got shape {tuple(X.shape)}")
    h, d = X.shape
    K = int(math.floor(p * d + 0.5))
    if K == 0 or h == 0:
        return X.clone()
    members = torch.cat([X > 0, X < 0], dim=0)  # (2h, d): positive parts, then negative parts
    counts = members.sum(dim=1, dtype=torch.int32)  # (2h,); int32 reductions are ~4x faster than bool->int64
    k = torch.floor(counts.to(torch.float64) * p + 0.5).to(torch.int32).clamp_(max=K)
    mag = X.abs().repeat(2, 1).masked_fill_(~members, math.inf)
    pad = torch.arange(K, device=X.device).unsqueeze(0) < (K - k).unsqueeze(1)  # (2h, K)
    pad_vals = torch.full((2 * h, K), math.inf, dtype=X.dtype, device=X.device).masked_fill_(pad, -math.inf)
    thresh = torch.kthvalue(torch.cat([pad_vals, mag], dim=1), K, dim=1, keepdim=True).values  # (2h, 1)
    below = members & (mag < thresh)
    ties = members & (mag == thresh)
    need = (k - below.sum(dim=1, dtype=torch.int32)).unsqueeze(1)  # ties still to prune
    prune = below | (ties & (ties.cumsum(dim=1, dtype=torch.int32) <= need))
    prune = prune[:h] | prune[h:]
    return X.masked_fill(prune, 0.0)


@registry.register("sparsify", "prune", "sparsification")
class Sparsify(Mechanism):
    r"""Magnitude pruning, sign-separated: zero the fraction ``p`` of smallest-magnitude coordinates
    separately within the positive and the negative components of each worker row.

    The study's "gradient sparsification" (``p = 0.25``), following Dryden et al. 2016 ("Communication
    quantization for data-parallel training of deep neural networks", which selects a proportion of the
    positive and of the negative values separately) and DLG's pruning defence (Zhu et al. 2019:
    pruning > 20 % of the smallest gradients stops the attack). Rounding, ties: :func:`sparsify_rows`.
    Deterministic.
    """

    stage = STAGES["sparsify"]

    def __init__(self, p: float = 0.25) -> None:
        x = _number(p, _OPTION, "sparsify: p")
        if not 0.0 <= x <= 1.0:
            raise UsageError(_OPTION, f"sparsify: p must be in [0, 1], got {x!r}")
        self.p = x
        self.name = format_term(self.key, {"p": x})

    def _apply(self, X: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
        return sparsify_rows(X, self.p)


@registry.register("topk", "top-k")
class TopK(Mechanism):
    r"""Top-k sparsification: keep the ``k`` largest-magnitude coordinates of each row, zero the rest.

    Give ``k`` (an integer ≥ 1) or ``fraction`` in (0, 1] (``k = max(1, ⌊fraction·d + ½⌋)``). Signs are
    not separated (the plain option next to :class:`Sparsify`; Aji & Heafield 2017, Lin et al. 2018).
    Ties at the k-th magnitude are resolved by ``torch.topk`` (deterministic on one device, otherwise
    unspecified). Deterministic.
    """

    stage = STAGES["sparsify"]

    def __init__(self, k: int | None = None, fraction: float | None = None) -> None:
        if (k is None) == (fraction is None):
            raise UsageError(_OPTION, "topk: give exactly one of k (an integer >= 1) or fraction (in (0, 1])")
        if k is not None:
            self.k: int | None = _positive_int(k, _OPTION, "topk: k")
            self.fraction: float | None = None
            self.name = format_term(self.key, {"k": self.k})
        else:
            f = _number(fraction, _OPTION, "topk: fraction")
            if not 0.0 < f <= 1.0:
                raise UsageError(_OPTION, f"topk: fraction must be in (0, 1], got {f!r}")
            self.k, self.fraction = None, f
            self.name = format_term(self.key, {"fraction": f})

    def _apply(self, X: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
        d = X.shape[1]
        k = self.k if self.k is not None else max(1, int(math.floor(self.fraction * d + 0.5)))  # type: ignore[operator]
        if k >= d:
            return X.clone()
        idx = X.abs().topk(k, dim=1, sorted=False).indices
        return torch.zeros_like(X).scatter_(1, idx, X.gather(1, idx))


_QUANT_KINDS = ("uniform", "stochastic", "sign", "qsgd", "fp16", "bf16", "log2", "kmeans", "fixed")
#: Other spellings of the kinds (``--quantize k-means(levels=4)``); the canonical kind is recorded.
_QUANT_ALIASES = {"k-means": "kmeans", "fixed-point": "fixed", "fixedpoint": "fixed", "fixed_point": "fixed",
                  "log": "log2", "pow2": "log2", "power-of-two": "log2"}
_ROUNDINGS = ("nearest", "stochastic")
#: Largest ``bits`` of ``log2`` (2^16 - 1 exponents span far more than any float's range).
_LOG2_MAX_BITS = 16
#: Largest ``int_bits`` / ``frac_bits`` of ``fixed`` (2^±126 is within float32's normal range).
_FIXED_MAX_BITS = 126
#: Most levels of ``kmeans`` (the k-means++ seeding costs k passes over the row).
_KMEANS_MAX_LEVELS = 1 << 16
_KMEANS_MAX_ITERATIONS = 10_000


def _max_pow2_exponent(dtype: torch.dtype) -> int:
    """The largest ``e`` with ``2^e`` finite in ``dtype`` (127 for float32/bfloat16, 15 for float16)."""
    return math.frexp(torch.finfo(dtype).max)[1] - 1


def _log2_quantize(Y: torch.Tensor, bits: int, r: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    r"""Power-of-two quantization of each row (last dimension) of ``Y``; ``r`` holds one uniform number
    per coordinate for stochastic rounding (None: round to nearest in the log domain).

    Each finite, non-zero :math:`x = \mu 2^{E}` (:func:`torch.frexp`, :math:`\mu \in [\tfrac12, 1)`) gets
    the exponent :math:`p = E - 1 + [\mu \ge 2^{-1/2}]` (nearest: :math:`p = \mathrm{round}(\log_2|x|)`,
    the threshold between :math:`2^{p}` and :math:`2^{p+1}` being their geometric mean) or
    :math:`p = E - 1 + [r < 2\mu - 1]` (stochastic: unbiased, :math:`E[2^p] = |x|`). The row keeps the
    :math:`L = 2^{\text{bits}} - 1` exponents :math:`e_{top} - L + 1 \dots e_{top}` below its largest
    possible one :math:`e_{top}`; :math:`Q(x) = \mathrm{sign}(x)\,2^p` if :math:`p \ge e_{top} - L + 1`,
    else 0. Exponents are computed exactly (no logarithm), so powers of two map to themselves.
    """
    finite = torch.isfinite(Y)
    nz = finite & (Y != 0)
    mant, E = torch.frexp(Y.abs())
    E = E.to(Y.dtype)
    if r is None:
        p = E - 1.0 + (mant >= math.sqrt(0.5)).to(Y.dtype)
        top_candidate = p
    else:
        floor_e = E - 1.0
        p = floor_e + (r < 2.0 * mant - 1.0).to(Y.dtype)
        top_candidate = floor_e + (mant > 0.5).to(Y.dtype)  # the largest exponent the coordinate may take
    emax = float(_max_pow2_exponent(out_dtype))  # a magnitude rounding past the largest finite power stays there
    p = p.clamp(max=emax)
    top = torch.where(nz, top_candidate.clamp(max=emax), -math.inf).amax(dim=-1, keepdim=True)
    keep = nz & (p >= top - float(2**bits - 2))
    Q = torch.where(keep, torch.sign(Y) * torch.exp2(p), torch.zeros_like(Y))
    return torch.where(finite, Q, Y)


def _fixed_quantize(Y: torch.Tensor, int_bits: int, frac_bits: int, r: torch.Tensor | None) -> torch.Tensor:
    r"""Signed fixed point :math:`Q_{m.n}` with saturation (``m = int_bits``, ``n = frac_bits``).

    :math:`Q(x) = \mathrm{clamp}(\mathrm{rnd}(x 2^n) 2^{-n}, -2^m, 2^m - 2^{-n})`, the range of a
    two's-complement word of :math:`1 + m + n` bits; ``rnd`` is round-half-to-even (``r`` None) or
    stochastic rounding :math:`\lfloor u \rfloor + [r < u - \lfloor u \rfloor]` (Gupta et al. 2015).
    NaN stays NaN; ±inf saturate to the range's ends. Elementwise (any shape).
    """
    scale = 2.0**frac_bits
    u = Y * scale
    if r is None:
        j = torch.round(u)
    else:
        lower = torch.floor(u)
        j = lower + (r < (u - lower)).to(Y.dtype)
    lo, hi = -(2.0**int_bits), 2.0**int_bits - 2.0**-frac_bits
    return (j / scale).clamp_(lo, hi)


def _nearest_centroid(Y: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Index into the sorted ``C (h, k)`` of each entry's nearest centroid (ties: the smaller one)."""
    k = C.shape[-1]
    j = torch.searchsorted(C, Y)  # C[j-1] < y <= C[j]
    lo = (j - 1).clamp_(min=0)
    hi = j.clamp_(max=k - 1)
    d_lo = (Y - C.gather(-1, lo)).abs_()
    d_hi = (C.gather(-1, hi) - Y).abs_()
    return torch.where(d_hi < d_lo, hi, lo)


def _kmeans_quantize(Y: torch.Tensor, k: int, iterations: int, u: torch.Tensor) -> torch.Tensor:
    r"""Replace each finite entry of each row of ``Y (h, d)`` by its cluster centre of a 1-D k-means
    fitted to that row's finite entries; ``u (h, k)`` holds the seeding's uniform numbers.

    Seeding: k-means++ (Arthur & Vassilvitskii 2007) — the first centre is a uniformly drawn entry,
    each next one an entry drawn with probability proportional to its squared distance to the
    nearest centre so far (inverse-CDF sampling with ``u[:, j]``; once every entry is a centre the
    first centre is repeated). Then ``iterations`` Lloyd steps (Lloyd 1982): assign every entry to its
    nearest centre (ties to the smaller), move each centre to the mean of its entries (a centre
    without entries stays). The row is sorted once, so each cluster is an interval of the sorted row
    and a Lloyd step costs O(k log d) from prefix sums (float64). A centre whose entries are all equal
    is that value exactly, so a row with at most k distinct values is returned unchanged.

    Speed: the seeding's k passes and the one sort dominate; ``(11, 431080)`` float32 with k = 16 and
    T = 20 took ≈1.8 s on the shared 2-core CPU sandbox (log2 ≈0.26 s, uniform ≈0.09 s there).
    """
    h, d = Y.shape
    f64 = torch.float64
    finite = torch.isfinite(Y)
    n_fin = finite.sum(dim=-1, keepdim=True)  # (h, 1)
    Ys, _ = torch.sort(torch.where(finite, Y.to(f64), math.inf), dim=-1)  # finite entries first, ascending
    valid = torch.arange(d, device=Y.device).unsqueeze(0) < n_fin  # (h, d) positions of finite entries
    Yv = torch.where(valid, Ys, 0.0)
    prefix = torch.nn.functional.pad(torch.cumsum(Yv, dim=-1), (1, 0))  # (h, d + 1); prefix[:, i] = sum of Ys[:, :i]

    # k-means++ seeding on the sorted finite entries
    C = torch.empty(h, k, dtype=f64, device=Y.device)
    weights = valid.to(f64)
    D2: torch.Tensor | None = None
    u = u.to(f64)
    for j in range(k):  # k whole-row passes; k is the number of levels, not of coordinates
        cdf = torch.cumsum(weights, dim=-1)
        total = cdf[:, -1:]
        pick = torch.searchsorted(cdf, u[:, j:j + 1] * total, right=True).clamp_(max=d - 1)
        c = Yv.gather(-1, pick)
        C[:, j:j + 1] = c if j == 0 else torch.where(total > 0, c, C[:, :1])
        dist = (Yv - C[:, j:j + 1]).square_()
        D2 = dist.mul_(valid) if D2 is None else torch.minimum(D2, dist, out=D2)  # stays 0 off the finite entries
        weights = D2

    # Lloyd iterations on intervals of the sorted row
    for _ in range(iterations):
        C, _ = torch.sort(C, dim=-1)
        mids = (C[:, :-1] + C[:, 1:]) * 0.5  # (h, k - 1); an entry equal to a midpoint goes to the smaller centre
        inner = torch.searchsorted(Ys, mids, right=True)  # first sorted position of clusters 1..k-1
        starts = torch.cat([torch.zeros_like(n_fin), torch.minimum(inner, n_fin)], dim=-1)  # (h, k)
        ends = torch.cat([torch.minimum(inner, n_fin), n_fin], dim=-1)
        counts = ends - starts
        sums = prefix.gather(-1, ends) - prefix.gather(-1, starts)
        has = counts > 0
        first = Yv.gather(-1, starts.clamp(max=d - 1))
        last = Yv.gather(-1, (ends - 1).clamp(min=0))
        mean = (sums / counts.clamp(min=1).to(f64)).clamp(min=first, max=last)
        new = torch.where(first == last, first, mean)
        C = torch.where(has, new, C)
    C, _ = torch.sort(C, dim=-1)
    Yf = torch.where(finite, Y.to(f64), 0.0)
    Q = C.gather(-1, _nearest_centroid(Yf, C)).to(Y.dtype)
    return torch.where(finite, Q, Y)


@registry.register("quantize", "quantization")
class Quantize(Mechanism):
    r"""Gradient quantization (a defence against gradient inversion, e.g. DLG, Zhu et al. 2019, arXiv
    1906.08935), per worker row ``x ∈ R^d``.

    ``kind="uniform"`` (deterministic, ``bits`` = B, default 8): the ``L = 2^B`` grid points
    :math:`m + j\Delta`, :math:`j = 0..L-1`, :math:`m = \min x`, :math:`\Delta = (\max x - m)/(L-1)`;
    :math:`Q(x_i) = m + \mathrm{round}((x_i - m)/\Delta)\,\Delta` (round half to even). A constant row
    is returned unchanged.

    ``kind="stochastic"``: the same grid with stochastic rounding (Gupta et al. 2015): with
    :math:`u = (x_i - m)/\Delta`, :math:`Q(x_i) = m + (\lfloor u\rfloor + \xi)\Delta`,
    :math:`\xi \sim \mathrm{Bernoulli}(u - \lfloor u \rfloor)`; unbiased, :math:`E[Q(x)] = x`.

    ``kind="sign"``: :math:`Q(x) = \mathrm{sign}(x)\,\|x\|_1/d` — the sign scaled by the row's mean
    absolute value, as in EF-SGD / scaled signSGD (Karimireddy et al. 2019; signSGD, Bernstein et al.
    2018, sends the bare sign); deterministic and biased; zeros stay zero; no parameter.

    ``kind="qsgd"`` (Alistarh et al. 2017, "QSGD"), ``levels`` = s ≥ 1 (default 255, or
    :math:`2^{\text{bits}} - 1` when ``bits`` is given — the magnitude index 0..s then fits in
    ``bits`` bits plus a sign bit): :math:`Q(x_i) = \|x\|_2\,\mathrm{sign}(x_i)\,\xi_i/s`,
    :math:`\xi_i = \ell + \mathrm{Bernoulli}(s|x_i|/\|x\|_2 - \ell)`, :math:`\ell = \lfloor
    s|x_i|/\|x\|_2 \rfloor`; unbiased. A zero row stays zero.

    ``kind="fp16"`` / ``"bf16"``: round to half / bfloat16 precision and back (DLG reports fp16 does
    not defend).

    The next three are among the quantizers that Menon, Quaedvlieg & Bhadang (EPFL Optimization for
    Machine Learning project, "quantization as a privacy defence against DLG") compared with uniform,
    stochastic and QSGD quantization; the exact definitions and parameters here are this package's.

    ``kind="log2"`` (logarithmic / power-of-two quantization, Miyashita, Lee & Murmann 2016, arXiv
    1603.01025), ``bits`` = B (default 4), ``rounding`` = ``nearest`` (default) or ``stochastic``:
    :math:`Q(x_i) = \mathrm{sign}(x_i)\,2^{p_i}` with :math:`p_i = \mathrm{round}(\log_2|x_i|)` (nearest
    in the log domain: the threshold between :math:`2^p` and :math:`2^{p+1}` is their geometric mean
    :math:`2^{p+1/2}`) or, stochastic, :math:`p_i = \lfloor\log_2|x_i|\rfloor + \mathrm{Bernoulli}(|x_i|
    2^{-\lfloor\log_2|x_i|\rfloor} - 1)` (unbiased between the two neighbouring powers). Each row keeps
    the :math:`L = 2^B - 1` exponents :math:`e_{top}-L+1, \dots, e_{top}`, :math:`e_{top}` the largest
    exponent a coordinate of the row can round to; a coordinate whose exponent falls below this floor
    becomes 0 (so a sign bit and B bits code every value: 0 or one of L exponents). Zeros stay zero; a
    power of two within the window maps to itself, so with ``nearest`` :math:`Q(Q(x)) = Q(x)`. A
    magnitude rounding past the dtype's largest power of two is kept at that power.

    ``kind="kmeans"`` (k-means / weight-sharing quantization, as in Han, Mao & Dally 2016, "Deep
    Compression", arXiv 1510.00149), ``levels`` = k (default 16, or :math:`2^{\text{bits}}` when
    ``bits`` is given), ``iterations`` = T (default 20): the k levels are fitted **per row** — per
    worker's whole flattened gradient, i.e. per tensor that is sent (the ``dpbr reconstruct`` defence
    quantizes the model's whole gradient as one row) — by a 1-D k-means with k-means++ seeding (Arthur
    & Vassilvitskii 2007) drawn from the generator(s) (k uniform numbers per row) and exactly T Lloyd
    iterations (Lloyd 1982); every coordinate is replaced by its nearest level (ties: the smaller).
    At most k distinct values per row; a row with at most k distinct values is returned unchanged,
    so :math:`Q(Q(x))` has the same values as :math:`Q(x)`. Same input and seed give the same output
    (on CPU and on one GPU; the sums are prefix sums, no atomics).

    ``kind="fixed"`` (signed fixed point :math:`Q_{m.n}` with saturation, Gupta et al. 2015, "Deep
    Learning with Limited Numerical Precision", arXiv 1502.02551), ``int_bits`` = m ≥ 0 (default 3),
    ``frac_bits`` = n ≥ 0 (default 12; the defaults make Gupta et al.'s 16-bit word with 4 integer
    bits counting the sign), ``rounding`` = ``nearest`` (half to even, default) or ``stochastic``:
    :math:`Q(x_i) = \mathrm{clamp}(\mathrm{rnd}(x_i 2^n)\,2^{-n},\; -2^m,\; 2^m - 2^{-n})` — multiples
    of :math:`2^{-n}` within the range of a two's-complement word of 1 + m + n bits. Idempotent.

    Non-finite coordinates: ``log2`` and ``kmeans`` return NaN and ±inf unchanged and fit their scale
    (the top exponent, the levels) to the finite coordinates only; ``fixed`` keeps NaN and saturates
    ±inf to :math:`-2^m` / :math:`2^m - 2^{-n}`.

    Randomized kinds (stochastic, qsgd, kmeans, and log2/fixed with ``rounding=stochastic``) draw
    their uniform numbers from the generator(s), like :class:`Gaussian`. Grids and norms of
    float16/bfloat16 inputs are computed in float32 (``kmeans`` fits its levels in float64).
    """

    stage = STAGES["quantize"]

    #: The parameters each kind takes (besides ``kind``).
    PARAMETERS: ClassVar[dict[str, tuple[str, ...]]] = {
        "uniform": ("bits",), "stochastic": ("bits",), "sign": (), "qsgd": ("levels", "bits"), "fp16": (),
        "bf16": (), "log2": ("bits", "rounding"), "kmeans": ("levels", "bits", "iterations"),
        "fixed": ("int_bits", "frac_bits", "rounding"),
    }

    def __init__(self, kind: str = "uniform", bits: int | None = None, levels: int | None = None,
                 rounding: str | None = None, int_bits: int | None = None, frac_bits: int | None = None,
                 iterations: int | None = None) -> None:
        k = str(kind).strip().lower()
        k = _QUANT_ALIASES.get(k, k)
        if k not in _QUANT_KINDS:
            raise UsageError(_OPTION, f"quantize: kind must be one of {', '.join(_QUANT_KINDS)}, got {kind!r}")
        self.kind = k
        self.bits: int | None = None
        self.levels: int | None = None
        self.rounding: str | None = None
        self.int_bits: int | None = None
        self.frac_bits: int | None = None
        self.iterations: int | None = None
        newer = {"rounding": rounding, "int_bits": int_bits, "frac_bits": frac_bits, "iterations": iterations}
        if k in ("log2", "kmeans", "fixed"):  # the older kinds check bits and levels themselves, below
            newer.update(bits=bits, levels=levels)
        refused = [n for n, v in newer.items() if v is not None and n not in self.PARAMETERS[k]]
        if refused:
            takes = ", ".join(self.PARAMETERS[k]) or "no parameter"
            raise UsageError(_OPTION, f"quantize(kind={k}) takes no {', '.join(refused)} (it takes {takes})")
        if k in ("log2", "kmeans", "fixed"):
            params = self._init_study_kind(k, bits, levels, rounding, int_bits, frac_bits, iterations)
        elif k in ("uniform", "stochastic"):
            if levels is not None:
                raise UsageError(_OPTION, f"quantize(kind={k}): give bits (grid of 2^bits points), not levels")
            b = 8 if bits is None else _positive_int(bits, _OPTION, "quantize: bits")
            if b > 32:
                raise UsageError(_OPTION, f"quantize: bits must be in 1..32, got {b}")
            self.bits = b
            params: dict[str, Any] = {"kind": k, "bits": b}
        elif k == "qsgd":
            s_from_bits = None
            if bits is not None:
                b = _positive_int(bits, _OPTION, "quantize: bits")
                if b > 32:
                    raise UsageError(_OPTION, f"quantize: bits must be in 1..32, got {b}")
                s_from_bits = 2**b - 1
            if levels is not None:
                s = _positive_int(levels, _OPTION, "quantize: levels")
                if s_from_bits is not None and s != s_from_bits:
                    raise UsageError(
                        _OPTION, f"quantize(kind=qsgd): levels={s} contradicts bits={bits} (2^bits - 1 = {s_from_bits})"
                    )
            else:
                s = 255 if s_from_bits is None else s_from_bits
            self.levels = s
            params = {"kind": k, "levels": s}
        else:
            if levels is not None or (bits is not None and not (k == "sign" and bits == 1)):
                raise UsageError(_OPTION, f"quantize(kind={k}) takes no bits or levels")
            params = {"kind": k}
        self.randomized = k in ("stochastic", "qsgd", "kmeans") or self.rounding == "stochastic"
        self.name = format_term(self.key, params)

    def _init_study_kind(self, k: str, bits: Any, levels: Any, rounding: Any, int_bits: Any, frac_bits: Any,
                         iterations: Any) -> dict[str, Any]:
        """Validate and set the parameters of ``log2``, ``kmeans`` and ``fixed``; their canonical params."""
        who = f"quantize(kind={k})"
        if k in ("log2", "fixed"):
            r = "nearest" if rounding is None else str(rounding).strip().lower()
            if r not in _ROUNDINGS:
                raise UsageError(_OPTION, f"{who}: rounding must be one of {', '.join(_ROUNDINGS)}, got {rounding!r}")
            self.rounding = r
        if k == "log2":
            b = 4 if bits is None else _positive_int(bits, _OPTION, f"{who}: bits")
            if b > _LOG2_MAX_BITS:
                raise UsageError(_OPTION, f"{who}: bits must be in 1..{_LOG2_MAX_BITS}, got {b}")
            self.bits = b
            return {"kind": k, "bits": b, "rounding": self.rounding}
        if k == "fixed":
            m = 3 if int_bits is None else _positive_int(int_bits, _OPTION, f"{who}: int_bits", low=0)
            n = 12 if frac_bits is None else _positive_int(frac_bits, _OPTION, f"{who}: frac_bits", low=0)
            for what, v in (("int_bits", m), ("frac_bits", n)):
                if v > _FIXED_MAX_BITS:
                    raise UsageError(_OPTION, f"{who}: {what} must be in 0..{_FIXED_MAX_BITS}, got {v}")
            self.int_bits, self.frac_bits = m, n
            return {"kind": k, "int_bits": m, "frac_bits": n, "rounding": self.rounding}
        from_bits = None
        if bits is not None:
            b = _positive_int(bits, _OPTION, f"{who}: bits")
            if b > 16:
                raise UsageError(_OPTION, f"{who}: bits must be in 1..16, got {b}")
            from_bits = 2**b
        if levels is not None:
            L = _positive_int(levels, _OPTION, f"{who}: levels")
            if L > _KMEANS_MAX_LEVELS:
                raise UsageError(_OPTION, f"{who}: levels must be in 1..{_KMEANS_MAX_LEVELS}, got {L}")
            if from_bits is not None and L != from_bits:
                raise UsageError(_OPTION, f"{who}: levels={L} contradicts bits={bits} (2^bits = {from_bits})")
        else:
            L = 16 if from_bits is None else from_bits
        T = 20 if iterations is None else _positive_int(iterations, _OPTION, f"{who}: iterations", low=0)
        if T > _KMEANS_MAX_ITERATIONS:
            raise UsageError(_OPTION, f"{who}: iterations must be in 0..{_KMEANS_MAX_ITERATIONS}, got {T}")
        self.levels, self.iterations = L, T
        return {"kind": k, "levels": L, "iterations": T}

    def _apply(self, X: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
        k = self.kind
        if k == "fp16":
            return X.to(torch.float16).to(X.dtype)
        if k == "bf16":
            return X.to(torch.bfloat16).to(X.dtype)
        cd = _compute_dtype(X.dtype)
        Y = X.to(cd)
        if k in ("log2", "fixed"):
            r = _fill(torch.empty_like(Y), "uniform", generator, self.name) if self.rounding == "stochastic" else None
            if k == "log2":
                return _log2_quantize(Y, self.bits, r, X.dtype).to(X.dtype)  # type: ignore[arg-type]
            return _fixed_quantize(Y, self.int_bits, self.frac_bits, r).to(X.dtype)  # type: ignore[arg-type]
        if k == "kmeans":
            if Y.shape[-1] == 0:
                return X.clone()
            u = _fill(torch.empty(Y.shape[0], self.levels, dtype=torch.float64, device=Y.device),  # type: ignore[arg-type]
                      "uniform", generator, self.name)
            return _kmeans_quantize(Y, self.levels, self.iterations, u).to(X.dtype)  # type: ignore[arg-type]
        if k == "sign":
            scale = Y.abs().mean(dim=1, keepdim=True)
            return (torch.sign(Y) * scale).to(X.dtype)
        if k == "qsgd":
            s = float(self.levels)  # type: ignore[arg-type]
            norm = torch.linalg.vector_norm(Y, dim=1, keepdim=True)
            safe = torch.where(norm > 0, norm, torch.ones_like(norm))
            u = Y.abs() / safe * s  # in [0, s]
            lower = torch.floor(u)
            r = _fill(torch.empty_like(u), "uniform", generator, self.name)
            level = lower + (r < (u - lower)).to(cd)
            return (torch.sign(Y) * level * (safe / s)).to(X.dtype)
        # uniform / stochastic min-max grid
        L = 2.0 ** self.bits  # type: ignore[operator]
        lo, hi = torch.aminmax(Y, dim=1, keepdim=True)
        step = (hi - lo) / (L - 1.0)
        ok = step > 0  # constant (or non-finite) rows are returned unchanged
        safe = torch.where(ok, step, torch.ones_like(step))
        u = (Y - lo) / safe
        if k == "uniform":
            j = torch.round(u)
        else:
            lower = torch.floor(u)
            r = _fill(torch.empty_like(u), "uniform", generator, self.name)
            j = lower + (r < (u - lower)).to(cd)
        j = j.clamp_(0.0, L - 1.0)
        Q = torch.where(ok, lo + j * safe, Y)
        return Q.to(X.dtype)


# --------------------------------------------------------------------------------------------------
# Composition


class Pipeline(Mechanism):
    """Several mechanisms applied in the canonical stage order (module docstring): clip → noise →
    sparsify/top-k → quantize. ``name`` joins the parts' names with ``+`` in that order (``"none"`` when
    empty); ``sigma`` is the Gaussian stage's (0.0 without one); ``stage`` is ``-1``; ``mechanisms``
    holds the parts."""

    stage = -1

    def __init__(self, mechanisms: Sequence[Mechanism]) -> None:
        parts: list[Mechanism] = []
        for m in mechanisms:
            if isinstance(m, Pipeline):
                parts.extend(m.mechanisms)
            elif isinstance(m, Identity):
                continue
            elif isinstance(m, Mechanism):
                parts.append(m)
            else:
                raise TypeError(f"compose: expected privacy mechanisms, got {type(m).__name__}")
        parts.sort(key=lambda m: m.stage)
        for a, b in zip(parts, parts[1:]):
            if a.stage == b.stage:
                raise UsageError(
                    _OPTION,
                    f"{a.name} and {b.name} are both {a.stage_name} mechanisms; a pipeline has at most one per stage "
                    "(clip, noise, sparsify, quantize)",
                )
        self.mechanisms: tuple[Mechanism, ...] = tuple(parts)
        self.name = "+".join(m.name for m in parts) or "none"
        self.sigma = next((m.sigma for m in parts if isinstance(m, Gaussian)), 0.0)
        self.randomized = any(m.randomized for m in parts)

    def __call__(self, G: torch.Tensor, *, generator: GeneratorArg = None, out: torch.Tensor | None = None) -> torch.Tensor:
        _check_tensor(G, self.name)
        if not self.mechanisms:
            return G.clone() if out is None else _check_out(out, G, tuple(G.shape), self.name).copy_(G)
        X = G
        last = len(self.mechanisms) - 1
        for i, m in enumerate(self.mechanisms):  # the last stage writes into ``out``
            X = m(X, generator=generator if m.randomized else None, out=out if i == last else None)
        return X

    def __iter__(self):
        return iter(self.mechanisms)

    def __len__(self) -> int:
        return len(self.mechanisms)


def compose(*mechanisms: Mechanism) -> Pipeline:
    """Compose mechanisms into a :class:`Pipeline` applied in the canonical order, whatever the order
    given (clip → Gaussian noise → sparsify/top-k → quantize); two of one stage raise a UsageError."""
    return Pipeline(mechanisms)


# --------------------------------------------------------------------------------------------------
# Look-up


def names() -> list[str]:
    """Registered mechanism names (aliases excluded), sorted."""
    return registry.names()


def get(name: str, **params: Any) -> Mechanism:
    """Build a mechanism from a name and keyword parameters, or from a spec string.

    ``get("sparsify", p=0.25)``; ``get("sparsify(p=0.25)")``; ``get("clip(c=0.01)+gaussian(sigma=0.1)")``
    returns a :class:`Pipeline` (canonical order). Keyword parameters are only allowed with a single
    term; a parameter given both in the string and as a keyword is an error
    (:func:`dpbr.validate.merge_params`).

    Raises
    ------
    dpbr.errors.UsageError
        Unknown name or parameter, bad value, two mechanisms of one stage (labelled ``mechanism``, or
        ``--epsilon``/``--delta``/``--clip``/``--batch-size``/``--sigma`` for those values).
    """
    if isinstance(name, Mechanism):
        if params:
            raise UsageError(_OPTION, "cannot add parameters to an already built mechanism")
        return name
    terms = parse(name, option=_OPTION)
    if len(terms) > 1:
        if params:
            raise UsageError(
                _OPTION, f"keyword parameters {sorted(params)} are ambiguous with a composed spec {name!r}"
            )
        return compose(*(registry.build(n, **p) for n, p in terms))
    n, p = terms[0]
    return registry.build(n, **merge_params(_OPTION, n, p, params))
