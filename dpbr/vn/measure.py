r"""Measuring the VN ratio of a model at given parameters: gradients, privacy, one row per cell.

What an honest worker sends (the simulation's steps 1–3, :mod:`dpbr.simulation`): ``b`` examples
drawn i.i.d. (with replacement) from the training split, their mean gradient ``g_b``, clipped to norm
``C`` (``clip_mode="batch"``, the study's) — or the mean of per-example gradients each clipped to
``C`` (``"per-example"``, DP-SGD) — then the privacy mechanism (Gaussian noise ``σ = 2C/b ·
sqrt(2 ln(1.25/δ))/ε``, sparsification).

What is measured, per cell (:class:`dpbr.spec.VNSpec`):

* ``K`` clipped mini-batch gradients ``G_1..G_K`` of size ``b`` (one seeded ``(K, b)`` index draw;
  computed together — ``torch.func.vmap`` over chunks of mini-batches, see :func:`minibatch_gradients`);
* **the expectation of the clipped gradient.** Clipping is non-linear: ``E[clip(g_b)]`` is neither
  ``∇Q`` nor ``clip(∇Q)`` (with ``C = 0.01`` nearly every mini-batch gradient is clipped, and
  ``‖E clip(g_b)‖ = C·‖E[g_b/‖g_b‖]‖`` measures how aligned the mini-batch directions are). The VN
  condition is about the vectors actually sent, so the **primary estimate is the K-sample one**:
  ``‖E G‖`` from the unbiased pair statistic of the ``K`` clipped gradients (:mod:`dpbr.vn.stats`).
  The reference gradient on the full training split (or a seeded subset of ``reference`` examples) is
  reported next to it: ``grad_norm_full = ‖∇Q‖`` (unclipped), ``mean_norm_reference`` = the norm of
  ``clip(∇Q)`` (batch mode: the clipped gradient of a batch that is the whole split) or of the mean of
  clipped per-example gradients (per-example mode — there this *is* ``E G`` exactly, clipping being
  per example), ``cos_mean_reference`` between it and the K-sample mean, and ``vn_ratio_reference``
  with it as the denominator (the reading "‖EG‖ from a full-data gradient" of the issue). Without
  clipping both estimate ``‖∇Q‖`` and agree within sampling error (tested);
* ``E‖G − EG‖²``: ``var_clean`` from the ``K`` clipped gradients, plus the Gaussian noise's
  ``noise_var = d·σ²`` computed analytically and reported separately (``var_total`` is their sum);
  the real mechanism is also applied to the ``K`` gradients with per-row seeded generators and its
  empirical distortion compared with ``d·σ²`` (``noise_var_empirical``, ``noise_z``), and the ratio
  recomputed from those noised vectors (``vn_ratio_empirical``);
* non-additive mechanisms (sparsification, alone or after noise) have no analytic form: then the
  ratio, its interval and ``var_total`` come from the ``K`` vectors as sent (``estimator="empirical"``;
  ``"analytic-noise"`` otherwise);
* the ratio with its percentile-bootstrap interval, and for every rule with a bound ``k_F(n, f)``
  whether the condition holds (``holds_<rule>``; ``holds_ci_<rule>`` when the whole interval is below).

Common random numbers: the batch indices depend only on ``(seed, b)``, so every privacy setting and
every checkpoint of a batch size sees the same mini-batches (differences between them are not
sampling noise), and every cell's own random streams (indices, bootstrap, noise) depend only on its
spec — a cell computed alone or together with others gives the same row.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from dpbr import linalg, rng
from dpbr.vn.stats import estimate_ratio, noise_check

__all__ = [
    "Problem",
    "measure",
    "minibatch_gradients",
    "reference_gradient",
    "sample_indices",
]

#: Default number of examples per vmapped call (``K`` is split into chunks of ``max(1, chunk // b)``
#: mini-batches so that activations of at most this many examples are alive at once).
DEFAULT_CHUNK = 8192


@dataclass
class Problem:
    """A model at fixed parameters and the data its gradients are taken on.

    ``oracle`` is a :class:`dpbr.simulation.GradientOracle` whose model's parameters are views of
    ``oracle.theta``; ``x``, ``y`` the training split (on the model's device).
    """

    oracle: Any
    x: Tensor
    y: Tensor

    @property
    def dim(self) -> int:
        return int(self.oracle.dim)

    @property
    def size(self) -> int:
        return int(self.y.shape[0])


def make_problem(model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, *,
                 theta: Tensor | None = None, strategy: str = "vmap",
                 per_example_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
                 chunk: int = 64) -> Problem:
    """Wrap ``model`` (its parameters replaced by views of ``theta``, default: its current values)."""
    from dpbr.simulation import GradientOracle

    if theta is None:
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    theta = theta.detach().clone()
    oracle = GradientOracle(model, loss, per_example_loss or loss, theta, strategy=strategy, chunk=chunk)
    return Problem(oracle=oracle, x=x, y=y)


def sample_indices(n: int, samples: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """``(samples, batch_size)`` i.i.d. uniform indices in ``0 .. n-1`` (with replacement, as the simulation)."""
    return torch.randint(n, (samples, batch_size), generator=generator)


def minibatch_gradients(problem: Problem, idx: Tensor, *, clip: float | None, clip_mode: str = "batch",
                        chunk: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor]:
    """Clipped mini-batch gradients of the index rows ``idx`` ``(K, b)``: ``(G (K, d), raw_norms (K,))``.

    Batched over mini-batches: the oracle computes ``k_c = max(1, chunk // b)`` mini-batch gradients
    per call (``vmap`` over the stacked ``(k_c, b, ...)`` inputs, or its loop strategy); ``raw_norms``
    are the norms before clipping (NaN in per-example mode, where no mini-batch norm is clipped).
    """
    K, b = idx.shape
    oracle = problem.oracle
    out = torch.empty(K, problem.dim, dtype=oracle.theta.dtype, device=oracle.theta.device)
    norms = torch.full((K,), math.nan, dtype=torch.float64, device=oracle.theta.device)
    step = max(1, int(chunk) // b)
    idx = idx.to(problem.x.device)
    for start in range(0, K, step):
        rows = idx[start:start + step]
        x, y = problem.x[rows], problem.y[rows]
        if clip is not None and clip_mode == "per-example":
            g, _ = oracle.clipped_per_example_gradients(x, y, clip)
        else:
            g, _ = oracle.batch_gradients(x, y)
            norms[start:start + rows.shape[0]] = torch.linalg.vector_norm(g, dim=1).double()
            if clip is not None:
                from dpbr.privacy.mechanisms import clip_rows

                g = clip_rows(g, clip)
        out[start:start + rows.shape[0]] = g
    return out, norms


def reference_gradient(problem: Problem, *, clip: float | None, clip_mode: str = "batch", size: int = 0,
                       generator: torch.Generator | None = None, chunk: int = 4096) -> tuple[Tensor, Tensor, float]:
    """``(∇Q (d,), reference (d,), loss)`` on the whole training split (``size = 0``) or a subset.

    ``reference`` is ``clip(∇Q)`` in batch mode, the mean of clipped per-example gradients in
    per-example mode, ``∇Q`` without clipping. The subset (``0 < size < n``) is drawn without
    replacement from ``generator``. Computed in chunks of ``chunk`` examples.
    """
    from dpbr.privacy.mechanisms import clip_rows

    n = problem.size
    if 0 < size < n:
        if generator is None:
            raise ValueError("a generator is required for a reference subset")
        sel = torch.randperm(n, generator=generator)[:size].to(problem.x.device)
    else:
        sel = torch.arange(n, device=problem.x.device)
    total = sel.shape[0]
    oracle = problem.oracle
    params = list(oracle.model.parameters())
    full = torch.zeros(problem.dim, dtype=torch.float64, device=oracle.theta.device)
    per_ex = torch.zeros_like(full) if (clip is not None and clip_mode == "per-example") else None
    loss_sum = 0.0
    for start in range(0, total, chunk):
        rows = sel[start:start + chunk]
        x, y = problem.x[rows], problem.y[rows]
        with torch.enable_grad():
            loss = oracle.loss(oracle.model(x), y)
            grads = torch.autograd.grad(loss, params)
        full += torch.cat([g.reshape(-1) for g in grads]).double() * rows.shape[0]
        loss_sum += float(loss.detach()) * rows.shape[0]
        if per_ex is not None:
            g, _ = oracle.clipped_per_example_gradients(x.unsqueeze(0), y.unsqueeze(0), clip)
            per_ex += g[0].double() * rows.shape[0]
    full /= total
    if per_ex is not None:
        ref = per_ex / total
    elif clip is not None:
        ref = clip_rows(full.unsqueeze(0), clip)[0]
    else:
        ref = full
    return full.to(oracle.theta.dtype), ref.to(oracle.theta.dtype), loss_sum / total


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(torch.linalg.vector_norm(a.double())), float(torch.linalg.vector_norm(b.double()))
    return float(torch.dot(a.double(), b.double())) / (na * nb) if na > 0 and nb > 0 else math.nan


def measure(problem: Problem, specs: Sequence[Any], *, chunk: int = DEFAULT_CHUNK,
            reference: tuple[Tensor, Tensor, float] | None = None,
            strategy: Callable[[int], str] | None = None,
            progress: Callable[[int, int, float | None], None] | None = None) -> list[dict[str, Any]]:
    """One result row per :class:`~dpbr.spec.VNSpec` in ``specs``, all at ``problem``'s parameters.

    Cells that share ``(batch_size, clip, clip_mode, samples, seed)`` share their ``K`` clipped
    gradients (computed once); the reference gradient is computed once for the call (or passed in).
    ``strategy(b)``, when given, picks the oracle's gradient strategy per batch size (``vmap``,
    ``loop``, ``closed-form``). Rows hold the measured columns (module docstring) and every spec field (``spec.columns()``).
    """
    from dpbr.privacy import mechanisms
    from dpbr.vn.bounds import rule_bounds

    if not specs:
        return []
    first = specs[0]
    for s in specs:
        if (s.clip, s.clip_mode, s.reference, s.seed) != (first.clip, first.clip_mode, first.reference, first.seed):
            raise ValueError("measure(): every spec of one call must share clip, clip_mode, reference and seed")
    d, n = problem.dim, problem.size
    seconds_reference = math.nan  # unknown when the reference is passed in
    if reference is None:
        t0 = time.perf_counter()
        reference = reference_gradient(problem, clip=first.clip, clip_mode=first.clip_mode, size=first.reference,
                                       generator=rng.generator(first.seed, "vn-reference"))
        seconds_reference = time.perf_counter() - t0
    full, ref, ref_loss = reference
    groups: dict[tuple, list[Any]] = {}
    for s in specs:
        groups.setdefault((s.batch_size, s.samples), []).append(s)
    rows: list[dict[str, Any]] = []
    for done, ((b, K), cells) in enumerate(sorted(groups.items())):
        t1 = time.perf_counter()
        if strategy is not None:
            problem.oracle.strategy = strategy(b)
        idx = sample_indices(n, K, b, rng.generator(first.seed, "vn-batch", b))
        G, raw_norms = minibatch_gradients(problem, idx, clip=first.clip, clip_mode=first.clip_mode, chunk=chunk)
        gram = linalg.gram(G, dtype=torch.float64).cpu()
        mean = G.double().mean(0)
        seconds_gradients = time.perf_counter() - t1
        for spec in cells:
            t2 = time.perf_counter()
            mech_text = spec.privacy.after_clip_spec()
            mech = mechanisms.get(mech_text) if mech_text else None
            sigma = float(getattr(mech, "sigma", 0.0) or 0.0) if mech is not None else 0.0
            linear = spec.sparsify is None  # only additive Gaussian noise (or nothing) after clipping
            noise_var = d * sigma * sigma
            boot_gen = rng.generator(spec.seed, "vn-bootstrap", b)
            row: dict[str, Any] = {}
            if mech is not None:
                # The pipeline is clip → Gaussian → sparsify (canonical order): apply the Gaussian stage
                # alone first, so the noise check sees the noise only, then the rest on its output.
                parts = list(mech) if isinstance(mech, mechanisms.Pipeline) else [mech]
                noise_parts = [m for m in parts if isinstance(m, mechanisms.Gaussian)]
                rest = [m for m in parts if not isinstance(m, mechanisms.Gaussian)]
                gens = [rng.generator(spec.seed, f"vn-noise-b{b}", i) for i in range(K)]
                noised = noise_parts[0](G, generator=gens) if noise_parts else G
                sent = mechanisms.compose(*rest)(noised, generator=gens) if rest else noised
                gram_sent = linalg.gram(sent, dtype=torch.float64).cpu()
                noise_emp, _, z = noise_check(G, noised, sigma) if noise_parts else (0.0, 0.0, math.nan)
                emp = noise_check(G, sent, sigma)[0] if rest else noise_emp
            else:
                sent, gram_sent, emp, noise_emp, z = G, gram, 0.0, 0.0, math.nan
            if linear:
                est = estimate_ratio(gram=gram, noise_variance=noise_var, bootstrap=spec.bootstrap,
                                     confidence=spec.confidence, generator=boot_gen)
                var_clean, var_total = est.variance, est.variance + noise_var
                emp_est = estimate_ratio(gram=gram_sent, bootstrap=0, confidence=spec.confidence)
                ratio_clean = est.ratio_clean
                estimator = "analytic-noise"
            else:
                clean = estimate_ratio(gram=gram, bootstrap=0, confidence=spec.confidence)
                est = estimate_ratio(gram=gram_sent, bootstrap=spec.bootstrap, confidence=spec.confidence,
                                     generator=boot_gen)
                emp_est = est
                var_clean, var_total = clean.variance, est.variance
                ratio_clean = clean.ratio_clean
                estimator = "empirical"
            ref_norm = float(torch.linalg.vector_norm(ref.double()))
            clipped = raw_norms[~torch.isnan(raw_norms)]
            row.update(
                privacy=spec.privacy.label(ascii=True),
                mechanism=mech_text or "none",
                estimator=estimator,
                ci_method="percentile",
                dim=d,
                train_size=n,
                sigma=sigma,
                noise_var=noise_var if spec.epsilon is not None else math.nan,
                noise_var_empirical=noise_emp if spec.epsilon is not None else math.nan,
                noise_z=z if spec.epsilon is not None else math.nan,
                distortion=emp,
                loss_reference=ref_loss,
                grad_norm_full=float(torch.linalg.vector_norm(full.double())),
                mean_norm_reference=ref_norm,
                mean_norm=est.mean_norm,
                mean_norm_sq=est.mean_norm_sq,
                mean_norm_plugin=est.mean_norm_plugin,
                cos_mean_reference=_cos(mean if linear else sent.double().mean(0), ref),
                clip_fraction=(float((clipped > spec.clip).double().mean())
                               if (spec.clip is not None and clipped.numel()) else math.nan),
                batch_grad_norm=float(clipped.mean()) if clipped.numel() else math.nan,
                var_clean=var_clean,
                var_total=var_total,
                vn_ratio=est.ratio,
                vn_ratio_ci_low=est.ci_low,
                vn_ratio_ci_high=est.ci_high,
                vn_ratio_clean=ratio_clean,
                vn_ratio_reference=(math.sqrt(max(var_total, 0.0)) / ref_norm) if ref_norm > 0 else math.inf,
                vn_ratio_empirical=emp_est.ratio,
            )
            for rule, k in rule_bounds(spec.workers, spec.byzantine).items():
                row[f"k_{rule}"] = k
                row[f"holds_{rule}"] = bool(est.ratio <= k)
                row[f"holds_ci_{rule}"] = bool(est.ci_high <= k) if spec.bootstrap > 0 else None
            row["grad_strategy"] = problem.oracle.strategy
            row["seconds_gradients"] = seconds_gradients
            row["seconds_reference"] = seconds_reference
            row["seconds_cell"] = time.perf_counter() - t2
            row.update(spec.columns())
            rows.append(row)
        if progress is not None:
            progress(done + 1, len(groups), None)
    return rows
