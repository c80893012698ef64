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


_QUANT_KINDS = ("uniform", "stochastic", "sign", "qsgd", "fp16", "bf16")


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

    Randomized kinds (stochastic, qsgd) draw one uniform number per coordinate from the
    generator(s), like :class:`Gaussian`. Grids and norms of float16/bfloat16 inputs are computed in
    float32.
    """

    stage = STAGES["quantize"]

    def __init__(self, kind: str = "uniform", bits: int | None = None, levels: int | None = None) -> None:
        k = str(kind).strip().lower()
        if k not in _QUANT_KINDS:
            raise UsageError(_OPTION, f"quantize: kind must be one of {', '.join(_QUANT_KINDS)}, got {kind!r}")
        self.kind = k
        self.bits: int | None = None
        self.levels: int | None = None
        if k in ("uniform", "stochastic"):
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
        self.randomized = k in ("stochastic", "qsgd")
        self.name = format_term(self.key, params)

    def _apply(self, X: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
        k = self.kind
        if k == "fp16":
            return X.to(torch.float16).to(X.dtype)
        if k == "bf16":
            return X.to(torch.bfloat16).to(X.dtype)
        cd = _compute_dtype(X.dtype)
        Y = X.to(cd)
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
