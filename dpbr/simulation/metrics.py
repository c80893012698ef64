"""The per-step metrics of a run (:data:`STEP_COLUMNS`), from the step's vectors or from a Gram matrix.

Two ways to the same numbers:

* :func:`window_metrics` reads the vectors: the honest rows as sent and before privacy, the
  Byzantine rows, the aggregate and ``θ − θ₀`` (about 34 reads of a ``d``-vector per step for the
  study's ``n = 11, h = 6``; 4 ms at ``d = 431,080`` on the project's 2-core CPU) — any rule, any
  attack, any device, batched over a window of steps for small models;
* :func:`gram_step_metrics` takes what the rule's Gram matrix already holds: when the attack sends
  ``f`` copies of one vector and the rule's aggregate is the mean of the rows it selected (Krum,
  Multi-Krum, MDA), every norm, deviation and cosine of the sent rows and of the aggregate is a sum
  of entries of the ``(h + 1) × (h + 1)`` Gram matrix of the distinct rows; only the clean rows and
  ``θ − θ₀`` are read (8 vector reads; 1.5–2 ms). It checks that the sums keep their precision and
  says when they do not (the caller then uses :func:`window_metrics`).

Beside the float columns, each step records one number per row the rule received
(:data:`WORKER_COLUMNS`): its norm (:func:`worker_norms` from the rows, :func:`copies_norms` from the
Gram matrix's diagonal on the second path) and whether the rule selected it. The heterogeneity of the
honest workers (:data:`HETEROGENEITY_COLUMNS`, Karimireddy, He & Jaggi 2022, arXiv 2006.09365) follows
from two of the float columns when the records are written (:func:`honest_dissimilarity`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from dpbr.linalg import GRAM_BLOCK, compute_view
from dpbr.linalg import gram as geo_gram

__all__ = ["STEP_COLUMNS", "HETEROGENEITY_COLUMNS", "WORKER_COLUMNS", "IDENTITY_MIN_ENTRIES", "IDENTITY_MIN_SHARE",
           "GRAM_MIN_SHARE", "window_metrics", "gram_step_metrics", "distinct_gram", "copies_gram", "copies_norms",
           "worker_norms", "honest_dissimilarity"]

#: Per-step metric columns, in the order they are recorded (see :meth:`dpbr.simulation.engine.Simulation.run`).
STEP_COLUMNS: tuple[str, ...] = (
    "train_loss",            # mean over honest workers of their mini-batch loss
    "honest_norm",           # ‖ḡ‖, ḡ = mean of the honest gradients as sent (after privacy)
    "honest_deviation",      # sqrt(Σ_i ‖g_i − ḡ‖² / (h − 1)) of the honest gradients as sent
    "vn_ratio",              # honest_deviation / honest_norm (the per-step variance-to-norm ratio)
    "honest_norm_clean",     # ‖ḡ‖ before the privacy mechanisms (after clipping)
    "honest_deviation_clean",  # deviation before the privacy mechanisms (after clipping)
    "aggregate_norm",        # ‖GAR(...)‖
    "cos_aggregate_honest",  # cos(GAR(...), ḡ)
    "cos_aggregate_attack",  # cos(GAR(...), mean of the Byzantine vectors); NaN without attack
    "param_distance",        # ‖θ_t − θ_0‖ after the update
    "byzantine_selected",    # fraction of Byzantine rows the rule selected (selecting rules), else NaN
)

#: Per-step columns derived from :data:`STEP_COLUMNS` when the records are written
#: (:func:`honest_dissimilarity`; Karimireddy, He & Jaggi 2022, arXiv 2006.09365).
HETEROGENEITY_COLUMNS: tuple[str, ...] = (
    "honest_dissimilarity",  # (1/h) Σ_i ‖g_i − ḡ‖² of the honest gradients before privacy (after clipping)
    "dissimilarity_ratio",   # honest_dissimilarity / ‖ḡ‖² (ḡ before privacy)
)

#: Per-step list columns, one entry per row the rule received (honest rows ``0..h−1`` as sent, then
#: the Byzantine rows ``h..n−1``).
WORKER_COLUMNS: tuple[str, ...] = (
    "worker_norms",          # list<double>: ‖x_i‖ of every row
    "selected_workers",      # list<bool>: the rule's selection mask (Aggregation.selected); null if it does not select
)

#: Rows (numbers) from which the deviation may come from ``Σ‖g_i‖² − h‖ḡ‖²`` (see :func:`window_metrics`).
IDENTITY_MIN_ENTRIES = 1 << 20

#: Smallest ``Σ‖g_i − ḡ‖² / Σ‖g_i‖²`` for which that difference is used (it loses ``log10(1/share)``
#: of float32's ~7 digits: 2 at 1 %).
IDENTITY_MIN_SHARE = 0.01

#: Smallest ``‖Σ_i w_i g_i‖² / (Σ_i |w_i| ‖g_i‖)²`` for which :func:`gram_step_metrics` takes the
#: squared norm of a mean (``ḡ``, the aggregate) as a weighted sum of Gram entries: the sum then
#: loses at most two of the entries' ~7 accurate digits.
GRAM_MIN_SHARE = 0.01


def _sum_of_squares(x: Tensor) -> Tensor:
    """``Σ x²`` over all but the first dimension of ``x`` ``(c, m, d)``, float64 ``(c,)``: float32
    norms of column blocks of :data:`GRAM_BLOCK` (accurate short sums), squared and added in float64."""
    c, m, d = x.shape
    main = d - d % GRAM_BLOCK
    total = torch.zeros(c, dtype=torch.float64, device=x.device)
    if main:
        blocks = torch.linalg.vector_norm(x[..., :main].reshape(c, m, main // GRAM_BLOCK, GRAM_BLOCK), dim=-1)
        total += blocks.double().square_().sum((1, 2))
    if main < d:
        total += torch.linalg.vector_norm(x[..., main:], dim=-1).double().square_().sum(1)
    return total


def _deviation(rows: Tensor, mean: Tensor, mean_sq: Tensor, scratch: Tensor) -> Tensor:
    """``sqrt(Σ_i ‖g_i − ḡ‖² / (h − 1))`` per step of ``rows`` ``(c, h, d)`` with means ``mean`` ``(c, d)``
    and ``‖ḡ‖²`` ``mean_sq`` ``(c,)``, float64 ``(c,)`` (NaN for ``h < 2``); see :func:`window_metrics`."""
    c, h = rows.shape[0], rows.shape[1]
    if h < 2:
        return torch.full((c,), math.nan, dtype=torch.float64, device=rows.device)
    if rows.device.type == "cpu" and rows.numel() >= IDENTITY_MIN_ENTRIES:
        # Σ‖g_i − ḡ‖² = Σ‖g_i‖² − h‖ḡ‖²: one read of the rows instead of writing and reading the
        # centred copy; used only where it keeps at least two of its ~7 accurate digits
        total = _sum_of_squares(rows)
        spread = total - h * mean_sq
        if bool((spread >= IDENTITY_MIN_SHARE * total).all()):  # a CPU tensor: no device sync
            return spread.clamp_min_(0).sqrt_().div_(math.sqrt(h - 1))
    centred = torch.sub(rows, mean.unsqueeze(1), out=scratch)
    return _sum_of_squares(centred).sqrt_().div_(math.sqrt(h - 1))


def worker_norms(rows: Tensor) -> Tensor:
    """``‖x_i‖`` of every row of ``rows`` ``(c, m, d)`` (each step's stack as the rule received it),
    float64 ``(c, m)`` on the device (no host sync): float32 norms of column blocks of
    :data:`GRAM_BLOCK`, squared and added in float64, as :func:`window_metrics` takes its sums (relative
    error about 1e-7; one float32 norm over 431,080 numbers is off by about 1e-4). A non-finite row has
    a non-finite norm."""
    c, m, d = rows.shape
    if d <= GRAM_BLOCK:  # one block: its float32 norm (two operations per window)
        return torch.linalg.vector_norm(rows, dim=-1).double()
    main = d - d % GRAM_BLOCK
    blocks = torch.linalg.vector_norm(rows[..., :main].reshape(c, m, main // GRAM_BLOCK, GRAM_BLOCK), dim=-1)
    total = blocks.double().square_().sum(2)
    if main < d:
        total += torch.linalg.vector_norm(rows[..., main:], dim=-1).double().square_()
    return total.sqrt_()


def copies_norms(K_distinct: Tensor, n: int) -> Tensor:
    """``‖x_i‖`` of the ``n`` rows of a stack whose rows ``h … n − 1`` are copies of row ``h``, float64
    ``(n,)``, from the float64 Gram matrix of its ``h + 1`` distinct rows (:func:`distinct_gram`):
    ``sqrt(K_ii)``, row ``h``'s for every copy (no vector is read again)."""
    h = K_distinct.shape[0] - 1
    return K_distinct.diagonal().clamp_min(0).sqrt().index_select(0, _copies_index(n, h, K_distinct.device))


def honest_dissimilarity(deviation_clean: Any, norm_clean: Any, h: int) -> tuple[Any, Any]:
    """The :data:`HETEROGENEITY_COLUMNS` from the recorded ``honest_deviation_clean`` and
    ``honest_norm_clean`` (arrays or tensors of equal shape) of a run with ``h`` honest workers.

    ``honest_dissimilarity = (1/h) Σ_i ‖g_i − ḡ‖² = (h − 1)/h · honest_deviation_clean²`` — the mean
    squared distance of the honest gradients (before privacy, after clipping) from their mean, the
    heterogeneity that bucketing reduces (Karimireddy, He & Jaggi 2022, "Byzantine-robust learning on
    heterogeneous datasets via bucketing", arXiv 2006.09365, assumption of (G, B)-dissimilarity
    ``(1/h) Σ_i ‖∇f_i(x) − ∇f(x)‖² ≤ G² + B²‖∇f(x)‖²``, measured here on the workers' mini-batch
    gradients); ``dissimilarity_ratio = honest_dissimilarity / ‖ḡ‖²`` (``ḡ`` before privacy). One
    honest worker: dissimilarity 0.
    """
    if h == 1:  # the deviation is NaN (no spread to estimate), the mean distance 0
        dissimilarity = norm_clean * 0.0
    else:
        dissimilarity = (h - 1) / h * deviation_clean ** 2
    return dissimilarity, dissimilarity / norm_clean ** 2


def window_metrics(losses: Tensor, sent: Tensor, clean: Tensor | None, byz: Tensor | None, selected: Tensor | None,
                   vectors: Tensor, *, scratch: Tensor | None = None) -> Tensor:
    """The :data:`STEP_COLUMNS` of ``c`` steps at once, ``(c, 11)`` float64 on the device (no host sync).

    Parameters
    ----------
    losses : (c, h)
        Honest mini-batch losses.
    sent : (c, h, d)
        Honest vectors as sent (after privacy); ``clean`` (c, h, d) the same before privacy (after
        clipping), or ``None`` when nothing lies between the two.
    byz : (c, f, d) or None
        The Byzantine vectors (``None`` or ``f = 0``: the attack columns are NaN).
    selected : (c, n) bool or None
        The rule's selection mask (``None`` for non-selecting rules: ``byzantine_selected`` is NaN).
    vectors : (c, m, d)
        Rows 1 (the aggregate ``GAR``) and 3 (``θ_t − θ₀``) filled by the caller; rows 0, 2 (and 4
        when ``m = 5``) are overwritten with the honest mean ``ḡ`` as sent, the Byzantine mean and
        (``m = 5``, needs ``clean``) the honest mean before privacy.
    scratch : (c, h, d), optional
        Work space for the centred rows (allocated when not given).

    Formulas: norms and cosines of ``ḡ``, ``GAR``, the Byzantine mean, ``θ − θ₀`` and ``ḡ_clean`` come
    from the ``m × m`` Gram matrix of ``vectors`` of each step (one batched matmul; for one step of a
    large model the column-blocked :func:`dpbr.linalg.gram`);
    ``deviation = sqrt(Σ_i ‖g_i − ḡ‖² / (h − 1))`` from the centred rows (no cancellation; NaN for
    ``h < 2``); ``vn_ratio = deviation / ‖ḡ‖``; ``cos(a, b) = ⟨a, b⟩ / (‖a‖‖b‖)``;
    ``byzantine_selected`` = fraction of the Byzantine rows (``h..n−1``) selected.

    Precision: float32 sums over long vectors are taken in blocks of
    :data:`dpbr.linalg.GRAM_BLOCK` and the blocks added in float64. A single float32
    ``vector_norm`` or ``mm`` over ``6 × 431,080`` numbers is off by about 1e-4 (relative); blocked,
    about 1e-7. On the CPU, for large inputs (``≥`` :data:`IDENTITY_MIN_ENTRIES` numbers), the
    deviation is taken from ``Σ‖g_i‖² − h‖ḡ‖²`` when that difference is at least
    :data:`IDENTITY_MIN_SHARE` of ``Σ‖g_i‖²`` (error ≤ about 2e-5 relative; always the case with
    privacy noise, whose rows are far apart), and from the centred rows otherwise.
    """
    c = sent.shape[0]
    dev = sent.device
    nan_col = torch.full((c,), math.nan, dtype=torch.float64, device=dev)
    has_byz = byz is not None and byz.shape[1] > 0
    torch.mean(sent, dim=1, out=vectors[:, 0])
    if has_byz:
        torch.mean(byz, dim=1, out=vectors[:, 2])  # type: ignore[arg-type]
    else:
        vectors[:, 2].zero_()
    if clean is not None:
        torch.mean(clean, dim=1, out=vectors[:, 4])
    if c == 1 and vectors.shape[2] > GRAM_BLOCK:
        gram = geo_gram(vectors[0]).unsqueeze(0).double()
    else:
        gram = torch.bmm(vectors, vectors.transpose(1, 2)).double()
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    cos_h = gram[:, 0, 1] / (norms[:, 0] * norms[:, 1])
    cos_a = gram[:, 1, 2] / (norms[:, 1] * norms[:, 2]) if has_byz else nan_col
    if scratch is None:
        scratch = torch.empty_like(sent)
    dev_sent = _deviation(sent, vectors[:, 0], gram[:, 0, 0], scratch)
    if clean is not None:
        norm_clean, dev_clean = norms[:, 4], _deviation(clean, vectors[:, 4], gram[:, 4, 4], scratch)
    else:
        norm_clean, dev_clean = norms[:, 0], dev_sent
    sel = selected[:, sent.shape[1]:].double().mean(1) if selected is not None and has_byz else nan_col
    return torch.stack([losses.double().mean(1), norms[:, 0], dev_sent, dev_sent / norms[:, 0], norm_clean,
                        dev_clean, norms[:, 1], cos_h, cos_a, norms[:, 3], sel], dim=1)


def distinct_gram(G: Tensor, h: int) -> Tensor:
    """The float64 Gram matrix of rows ``0 … h`` of ``G`` — the ``h`` honest rows and the one vector
    an attack that sends copies repeats in rows ``h … n − 1`` (:func:`dpbr.linalg.gram` with
    ``sum_dtype=torch.float64``: float32 products of column blocks, added in float64; relative error
    about 1e-7 of ``‖g_i‖‖g_j‖``)."""
    return geo_gram(G[: h + 1], sum_dtype=torch.float64)


def gram_step_metrics(losses: Tensor, K: Tensor, selected: Tensor, clean: Tensor | None, displacement: Tensor,
                      *, mean_out: Tensor, scratch: Tensor) -> Tensor | None:
    """The :data:`STEP_COLUMNS` of one step, ``(1, 11)`` float64 (CPU), from the Gram matrix of the
    distinct rows the rule aggregated — or ``None`` where those sums would lose precision.

    For a step whose ``f`` Byzantine rows are copies of one vector ``b`` (row ``h`` of the distinct
    rows) and whose aggregate is the mean of the rows the rule selected (``GAR = Σ_j w_j x_j`` with
    ``w_j = [j selected]/m`` over the ``n`` rows, gathered to weights ``ω`` over the ``h + 1``
    distinct rows; :attr:`dpbr.robust.aggregators.Aggregator.averages_selected`), with ``K`` their
    Gram matrix (:func:`distinct_gram`):

    * ``h²‖ḡ‖² = Σ_{i,j<h} K_ij``, ``Σ_i ‖g_i − ḡ‖² = Σ_{i<h} K_ii − h‖ḡ‖²``;
    * ``⟨GAR, x_i⟩ = (K ω)_i``, ``‖GAR‖² = ωᵀKω``, ``⟨GAR, ḡ⟩ = (1/h) Σ_{i<h} (K ω)_i``,
      ``⟨GAR, b⟩ = (K ω)_h`` (the Byzantine mean is ``b``);

    rows the rule did not select take no part (a non-finite Byzantine vector leaves the other
    columns finite; ``cos_aggregate_attack`` is then NaN, as with :func:`window_metrics`). The clean
    rows (``(h, d)``, or ``None`` when the rows were sent as they were) and ``θ − θ₀`` are read as in
    :func:`window_metrics`; ``mean_out`` ``(d,)`` and ``scratch`` ``(h, d)`` are work space.

    Precision: each ``K_ij`` is within about 1e-7 of ``‖g_i‖‖g_j‖``, so a sum for ``‖Σ_i w_i g_i‖²``
    is within about ``1e-7 (Σ_i |w_i| ‖g_i‖)²``. The sums are used only when
    ``‖ḡ‖² ≥`` :data:`GRAM_MIN_SHARE` ``· (mean_i ‖g_i‖)²``, the same for ``‖GAR‖²``, and the deviation's
    difference is at least :data:`IDENTITY_MIN_SHARE` of ``Σ‖g_i‖²`` (error ≤ about 1e-5 relative,
    and for the cosines 1e-5 absolute); otherwise — nearly opposite rows, nearly equal rows, a
    non-finite honest row — this returns ``None``.
    """
    k = K.tolist()  # (h + 1)² Python floats: the arithmetic below is a few hundred flops
    h = len(k) - 1
    sel = selected.tolist()
    n = len(sel)
    m = sum(sel)
    if h < 2 or m == 0:
        return None
    omega = [sel[i] / m for i in range(h)] + [sum(sel[h:]) / m]
    used = [j for j in range(h + 1) if omega[j] > 0]
    k_omega = [sum(k[i][j] * omega[j] for j in used) for i in range(h + 1)]
    agg_sq = sum(omega[i] * k_omega[i] for i in used)
    honest_sum = sum(sum(row[:h]) for row in k[:h])
    total = sum(k[i][i] for i in range(h))
    mean_sq = honest_sum / (h * h)
    spread = total - honest_sum / h
    row_norms = [math.sqrt(max(k[i][i], 0.0)) for i in range(h + 1)]
    honest_scale = sum(row_norms[:h]) / h
    agg_scale = sum(omega[i] * row_norms[i] for i in used)
    if not (mean_sq >= GRAM_MIN_SHARE * honest_scale ** 2 and agg_sq >= GRAM_MIN_SHARE * agg_scale ** 2
            and spread >= IDENTITY_MIN_SHARE * total and math.isfinite(total) and agg_sq > 0):
        return None
    norm_sent, norm_agg = math.sqrt(mean_sq), math.sqrt(agg_sq)
    dev_sent = math.sqrt(spread / (h - 1))
    cos_h = sum(k_omega[:h]) / h / (norm_agg * norm_sent)
    byz_norm = row_norms[h]
    cos_a = k_omega[h] / (norm_agg * byz_norm) if math.isfinite(k_omega[h]) and byz_norm > 0 else math.nan
    if clean is not None:
        torch.mean(clean, dim=0, out=mean_out)
        clean_sq = _sum_of_squares(mean_out.view(1, 1, -1))
        norm_clean = math.sqrt(float(clean_sq))
        dev_clean = float(_deviation(clean.unsqueeze(0), mean_out.unsqueeze(0), clean_sq, scratch.unsqueeze(0)))
    else:
        norm_clean, dev_clean = norm_sent, dev_sent
    distance = math.sqrt(float(_sum_of_squares(displacement.view(1, 1, -1))))
    loss = float(losses.double().mean())
    return torch.tensor([[loss, norm_sent, dev_sent, dev_sent / norm_sent, norm_clean, dev_clean, norm_agg,
                          cos_h, cos_a, distance, sum(sel[h:]) / (n - h)]], dtype=torch.float64)


def copies_gram(G: Tensor, h: int) -> tuple[Tensor, Tensor]:
    """``G Gᵀ`` of an ``(n, d)`` stack whose rows ``h, …, n − 1`` are copies of row ``h``, from its
    first ``h + 1`` rows: ``(K, K_distinct)`` — ``K`` the ``n × n`` matrix for the rule (in ``G``'s
    compute precision, float32 for float32 rows), ``K_distinct`` the float64 ``(h + 1) × (h + 1)``
    Gram matrix of the distinct rows (:func:`distinct_gram`), from which the step's
    metrics follow (:func:`gram_step_metrics`).

    ``(h + 1)²`` instead of ``n²`` products of ``d``-vectors: 7² against 11² for the study's
    ``n = 11, f = 5`` (the one costly operation of MDA at d = 431,080). Entries between copies are
    those of row ``h`` with itself, so distances between copies are exactly 0.
    """
    n = G.shape[0]
    X = compute_view(G)
    K64 = distinct_gram(X, h)
    idx = _copies_index(n, h, K64.device)
    return K64.to(X.dtype).index_select(0, idx).index_select(1, idx), K64


@functools.lru_cache(maxsize=16)
def _copies_index(n: int, h: int, device: torch.device) -> Tensor:
    """``[0, 1, …, h − 1, h, h, …, h]`` (``n`` entries): row ``i`` of the stack is row ``idx[i]`` of
    its first ``h + 1`` rows (a constant, cached per device)."""
    return torch.tensor([*range(h), *([h] * (n - h))], dtype=torch.long, device=device)
