"""Redundancy kernels of DRACO: the gradient codes that let a server recover the exact honest gradient
sum despite Byzantine workers, by having every task computed by several workers.

Chen, Wang, Charles and Papailiopoulos 2018, "DRACO: Byzantine-resilient distributed training via
redundant gradients" (arXiv 1803.09877). Setting: ``P`` workers and ``P`` gradient tasks (task ``k`` =
the gradient ``g_k ∈ R^d`` of one mini-batch); at most ``s`` workers are Byzantine; each worker
computes ``r`` tasks, with ``r ≥ 2s + 1``. DRACO describes two codes:

*Fractional repetition code* (:func:`repetition_groups`, :func:`majority_vote`)
    The workers form ``P / r`` groups of ``r``; every worker of a group computes the same task and
    the server keeps, per group, the value that a majority of the group sent. With ``s ≤ (r − 1)/2``
    Byzantine replicas per group the majority is honest.
*Cyclic code* (:func:`cyclic_assignment`, :func:`cyclic_encoding`, :func:`cyclic_decode`)
    Worker ``j`` computes tasks ``j, j+1, …, j+r−1 (mod P)`` and sends one linear combination of
    them, ``Σ_k B[j, k] g_k``; the server locates the Byzantine rows and decodes ``Σ_k g_k`` from
    the others. dpbr builds ``B`` as the real cyclic *gradient code* of Tandon, Lei, Dimakis and
    Karampatziakis 2017, "Gradient coding" (arXiv 1612.03301), which has the same supports and
    redundancy as DRACO's code (see :func:`cyclic_decode` for the difference).

Every function is pure: no hidden state, inputs never modified; randomness only from the generator
given.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

__all__ = [
    "cyclic_assignment",
    "cyclic_decode",
    "cyclic_encoding",
    "locator_checks",
    "majority_vote",
    "repetition_groups",
]

#: Random directions of ``R^d`` onto which :func:`cyclic_decode` projects what the workers sent.
PROJECTIONS = 2
#: Columns per block when the ``(P, d)`` rows are combined in float64 (bounds the float64 copy).
_BLOCK = 1 << 16
#: Singular values of ``B_S`` below this fraction of the largest are treated as zero (rank of ``B_S``).
_RANK_RTOL = 1e-9
#: Largest ``‖B_Sᵀ b − 1‖ / √P`` for which the all-ones vector counts as in the row span of ``B_S``.
_SPAN_RTOL = 1e-8


# ----------------------------------------------------------------------------------------------------
# Fractional repetition code
# ----------------------------------------------------------------------------------------------------


def repetition_groups(workers: int, r: int) -> Tensor:
    """Groups of DRACO's fractional repetition code: ``(workers // r, r)`` int64 worker indices.

    Group ``g`` is workers ``g·r, g·r + 1, …, g·r + r − 1``; every worker of a group computes the
    same task (the group's mini-batch), so each task is replicated ``r`` times and there are
    ``P / r`` distinct tasks (Chen et al. 2018, arXiv 1803.09877, Section 4).

    Raises
    ------
    ValueError
        When ``r < 1``, ``workers < 1`` or ``r`` does not divide ``workers``.

    Examples
    --------
    >>> repetition_groups(6, 3).tolist()
    [[0, 1, 2], [3, 4, 5]]
    """
    if r < 1:
        raise ValueError(f"repetition code: redundancy r must be ≥ 1, got r={r}")
    if workers < 1:
        raise ValueError(f"repetition code: the number of workers must be ≥ 1, got {workers}")
    if workers % r != 0:
        raise ValueError(f"repetition code: redundancy r={r} must divide the number of workers {workers} "
                         f"(each group has r workers)")
    return torch.arange(workers, dtype=torch.int64).reshape(workers // r, r)


def majority_vote(replicas: Tensor, tolerance: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per group, the value a strict majority of its ``r`` replicas agree on (DRACO's repetition decoder).

    ``replicas`` is ``(G, r, d)``: group ``g``'s replicas ``x_1 … x_r ∈ R^d`` (any float dtype; may
    hold NaN or ±inf). For every replica ``k`` the vote counts its supporters

    * ``tolerance == 0`` (exact vote): ``c_k = #{j : x_j == x_k in every coordinate}`` (IEEE ``==``:
      a replica holding a NaN equals nothing, not even itself, so it never counts; ``-0.0 == 0.0``;
      ``inf == inf``, so identical infinite replicas do count);
    * ``tolerance > 0``: ``c_k = #{j : ‖x_j − x_k‖₂ ≤ tolerance}`` (``k`` itself included; a
      non-finite distance never counts, so a replica with a NaN or an infinity supports nothing);

    then ``k* = argmax_k c_k`` (lowest index on ties) and the group is decoded when
    ``c_{k*} ≥ ⌊r/2⌋ + 1``: ``decoded[g] = x_{k*}`` (bitwise that replica's values), ``ok[g] = True``.
    Otherwise ``decoded[g] = 0`` and ``ok[g] = False``. In the exact vote ``k*`` is the lowest index
    of the replicas equal to the strict-majority value (a strict majority is unique).

    Guarantee (Chen et al. 2018, arXiv 1803.09877, Section 4): if at most ``s ≤ (r − 1)/2`` replicas of
    a group are Byzantine and the honest replicas are pairwise within ``tolerance`` (equal, for the
    exact vote), the vote succeeds and ``decoded[g]`` is within ``tolerance`` of an honest replica
    (exact vote: equal to the honest value). Proof: every honest ``k`` has ``c_k ≥ r − s ≥ ⌊r/2⌋ + 1``;
    the ``> r/2`` supporters of ``k*`` and the ``> r/2`` honest replicas share one honest replica.
    Byzantine replicas that agree with each other still lose to the honest majority; any
    perturbation of the honest replicas larger than ``tolerance`` (per-worker privacy noise, in
    particular, with the exact vote) makes the vote fail.

    Parameters
    ----------
    replicas : Tensor (G, r, d), floating point; not modified.
    tolerance : float ≥ 0
        Radius of agreement (Euclidean); 0 for the exact vote.

    Returns
    -------
    decoded : Tensor (G, d), ``replicas``' dtype and device.
    ok : Tensor (G,) bool.

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 2.0], [9.0, 9.0], [1.0, 2.0]]])
    >>> decoded, ok = majority_vote(x)
    >>> decoded.tolist(), ok.tolist()
    ([[1.0, 2.0]], [True])
    """
    if replicas.ndim != 3:
        raise ValueError(f"majority_vote: replicas must be (groups, r, d), got shape {tuple(replicas.shape)}")
    groups, r, _ = replicas.shape
    if r < 1:
        raise ValueError("majority_vote: each group needs at least one replica (r ≥ 1)")
    if not tolerance >= 0.0:  # also refuses NaN
        raise ValueError(f"majority_vote: tolerance must be ≥ 0, got {tolerance}")
    norm_dtype = torch.float32 if replicas.dtype in (torch.float16, torch.bfloat16) else None
    counts = torch.empty(groups, r, dtype=torch.int64, device=replicas.device)
    for k in range(r):  # r is small: one (G, r, d) comparison per replica
        if tolerance == 0.0:
            agree = (replicas == replicas[:, k:k + 1]).all(dim=-1)
        else:
            dist = torch.linalg.vector_norm(replicas - replicas[:, k:k + 1], dim=-1, dtype=norm_dtype)
            agree = dist <= tolerance  # NaN distances compare False
        counts[:, k] = agree.sum(dim=-1)
    best = torch.argmax(counts, dim=1)  # first maximal index
    ok = counts.gather(1, best[:, None])[:, 0] >= r // 2 + 1
    chosen = replicas[torch.arange(groups, device=replicas.device), best]
    decoded = torch.where(ok[:, None], chosen, torch.zeros((), dtype=replicas.dtype, device=replicas.device))
    return decoded, ok


# ----------------------------------------------------------------------------------------------------
# Cyclic code
# ----------------------------------------------------------------------------------------------------


def _check_cyclic(workers: int, r: int, name: str) -> None:
    if workers < 1:
        raise ValueError(f"{name}: the number of workers must be ≥ 1, got {workers}")
    if not 1 <= r <= workers:
        raise ValueError(f"{name}: redundancy r must be between 1 and the number of workers {workers}, got r={r}")


def cyclic_assignment(workers: int, r: int) -> Tensor:
    """Tasks of each worker in the cyclic code: ``(P, r)`` int64, row ``j`` = ``(j + k) mod P``, ``k = 0 … r−1``.

    Worker ``j`` computes the gradients of the ``r`` consecutive tasks of its cyclic window
    ``W_j = {j, j+1, …, j+r−1} (mod P)``, so every task is computed by ``r`` workers (Tandon et al.
    2017, arXiv 1612.03301, Section 3; Chen et al. 2018, arXiv 1803.09877, Section 5).

    Examples
    --------
    >>> cyclic_assignment(4, 2).tolist()
    [[0, 1], [1, 2], [2, 3], [3, 0]]
    """
    _check_cyclic(workers, r, "cyclic_assignment")
    return (torch.arange(workers, dtype=torch.int64)[:, None] + torch.arange(r, dtype=torch.int64)) % workers


def cyclic_encoding(workers: int, r: int, generator: torch.Generator) -> Tensor:
    """Encoding matrix ``B`` (``(P, P)`` float64, CPU) of the cyclic gradient code, random construction.

    Tandon, Lei, Dimakis and Karampatziakis 2017, "Gradient coding" (arXiv 1612.03301), Algorithm 2:
    draw ``H ∈ R^{(r−1)×P}`` with IID standard Gaussian entries from ``generator`` and subtract each
    row's mean, so ``H·1 = 0``. Row ``j`` of ``B`` is supported on worker ``j``'s cyclic window
    ``W_j = {j, …, j+r−1} (mod P)`` (:func:`cyclic_assignment`): ``B[j, j] = 1`` and the other
    ``r − 1`` entries solve ``H[:, W_j ∖ {j}] x = −H[:, j]``. Hence ``H Bᵀ = 0``: every row lies in
    ``null(H)``, which contains ``1`` and has dimension ``P − r + 1``, and (almost surely) any
    ``P − (r − 1)`` rows of ``B`` are linearly independent, so they span ``null(H)`` and the
    all-ones vector is a combination of them. With ``r = 2s + 1`` the sum ``Σ_k g_k`` is therefore
    a combination of the messages of any ``P − 2s`` workers. ``r = 1`` gives ``B = I``; ``r = P``
    gives the all-ones matrix.

    Raises
    ------
    ValueError
        When ``r < 1`` or ``r > P``.
    """
    _check_cyclic(workers, r, "cyclic_encoding")
    if r == 1:
        return torch.eye(workers, dtype=torch.float64)
    h = torch.randn(r - 1, workers, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    h = h - h.mean(dim=1, keepdim=True)
    windows = cyclic_assignment(workers, r)  # (P, r): column 0 is j itself
    others = windows[:, 1:]  # (P, r-1)
    a = h[:, others].permute(1, 0, 2)  # (P, r-1, r-1): a[j] = H[:, W_j ∖ {j}]
    rhs = -h.T  # (P, r-1): rhs[j] = −H[:, j]
    x = torch.linalg.solve(a, rhs)
    b = torch.eye(workers, dtype=torch.float64)
    return b.scatter(1, others, x)


def locator_checks(workers: int, s: int) -> int:
    """Number of candidate sets the locator of :func:`cyclic_decode` may test: ``Σ_{k=0}^{s} C(P, k)``.

    Examples
    --------
    >>> locator_checks(9, 2)
    46
    """
    return sum(math.comb(workers, k) for k in range(min(s, workers) + 1))


def _project(received: Tensor, generator: torch.Generator) -> Tensor:
    """``received @ R`` in float64 (``R``: ``(d, PROJECTIONS)`` IID Gaussian from ``generator``, drawn per block)."""
    p, d = received.shape
    y = torch.zeros(p, PROJECTIONS, dtype=torch.float64, device=received.device)
    for start in range(0, d, _BLOCK):
        stop = min(start + _BLOCK, d)
        proj = torch.randn(stop - start, PROJECTIONS, generator=generator, dtype=torch.float64,
                           device=generator.device).to(received.device)
        y = y + received[:, start:stop].to(torch.float64) @ proj
    return y


def _combine(weights: Tensor, rows: Tensor, index: Tensor) -> Tensor:
    """``weights @ rows[index]`` computed in float64, one column block at a time."""
    w = weights.to(rows.device)
    idx = index.to(rows.device)
    out = [w @ rows[:, start:start + _BLOCK].index_select(0, idx).to(torch.float64)
           for start in range(0, rows.shape[1], _BLOCK)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=rows.device)


def _row_coordinates(b: Tensor) -> Tensor:
    """``C = B N`` (``(P, K)``): the rows of ``B`` in an orthonormal basis ``N`` of its row space.

    ``K`` is the numerical rank of ``B`` (singular values above ``_RANK_RTOL`` times the largest);
    ``B_S`` and ``C_S`` have the same column space, and ``C_S`` has fewer columns.
    """
    _, sv, vh = torch.linalg.svd(b)
    rank = int((sv > _RANK_RTOL * sv[0]).sum()) if sv.numel() and sv[0] > 0 else 0
    return b @ vh[:rank].T


def _consistent(c: Tensor, y: Tensor, kept: Tensor, tolerance: float) -> Tensor:
    """For every candidate ``S`` (rows ``kept[m]``): ``‖y_S − B_S z*‖ ≤ tolerance·max(‖y_S‖, tiny)``.

    The least-squares residual is ``y_S`` minus its orthogonal projection on the column space of
    ``B_S`` (= that of ``C_S``, :func:`_row_coordinates`), for all candidates of one size at once: a
    reduced QR of ``C_S``, or an SVD (singular values above ``_RANK_RTOL`` times the largest) where
    ``C_S`` is wider than tall or the QR shows it rank-deficient (a diagonal of ``R`` at most
    ``_RANK_RTOL`` times the largest).
    """
    cs = c[kept]  # (M, m, K)
    ys = y[kept]  # (M, m, PROJECTIONS)
    m, k = cs.shape[1], cs.shape[2]
    basis = torch.zeros(cs.shape[0], m, min(m, k), dtype=cs.dtype)
    mask = torch.zeros(cs.shape[0], min(m, k), dtype=torch.bool)
    deficient = torch.ones(cs.shape[0], dtype=torch.bool)
    if 0 < k <= m:
        q, rr = torch.linalg.qr(cs)
        diag = rr.diagonal(dim1=1, dim2=2).abs()
        deficient = (diag <= _RANK_RTOL * diag.amax(dim=1, keepdim=True)).any(dim=1)
        basis, mask = q, torch.ones_like(diag, dtype=torch.bool)
    if bool(deficient.any()) and k > 0:
        u, sv, _ = torch.linalg.svd(cs[deficient], full_matrices=False)
        basis[deficient] = u
        mask[deficient] = sv > _RANK_RTOL * sv[:, :1]
    coef = (basis.transpose(1, 2) @ ys) * mask[:, :, None]
    resid = torch.linalg.vector_norm(ys - basis @ coef, dim=(1, 2))
    scale = torch.linalg.vector_norm(ys, dim=(1, 2)).clamp_min(torch.finfo(torch.float64).tiny)
    return resid <= tolerance * scale


def cyclic_decode(received: Tensor, encoding: Tensor, s: int, *, generator: torch.Generator,
                  tolerance: float = 1e-6) -> tuple[Tensor, Tensor, bool]:
    """Locate up to ``s`` Byzantine rows of a cyclic-code message and decode the task sum ``Σ_k g_k``.

    ``received`` is ``(P, d)``: row ``j`` is what worker ``j`` sent, ``Σ_k B[j, k] g_k`` (``B`` =
    ``encoding``, e.g. :func:`cyclic_encoding`) for an honest worker, anything (NaN and ±inf
    included) for a Byzantine one. Algorithm:

    1. Rows holding a non-finite value are adversarial (set ``N``); more than ``s`` of them → failure.
    2. Project the finite rows on ``PROJECTIONS`` (= 2) random Gaussian directions of ``R^d``, drawn
       in float64 from ``generator``: ``y = received·R ∈ R^{P×2}`` (honest rows: ``y_j = B[j]·(G R)``).
    3. Search the candidate sets ``T ⊇ N`` with ``|T| ≤ s`` in increasing size, then in lexicographic
       order, for the first one whose complement ``S`` is consistent with the code:
       ``‖y_S − B_S z*‖₂ ≤ tolerance · max(‖y_S‖₂, tiny)``, ``z*`` the least-squares solution (all
       candidates of one size are tested at once; :func:`locator_checks` counts them).
    4. Solve ``bᵀ B_S = 1ᵀ`` (least squares, minimum norm, float64) and return ``bᵀ received[S]``,
       computed in float64 and cast to ``received``'s dtype, with ``adversaries`` = the rows of ``T``.

    When no ``T`` passes (or ``1`` is not in the row span of ``B_S``): ``ok = False``, ``decoded = 0``
    and ``adversaries`` = the non-finite rows.

    Why it works (``r ≥ 2s + 1``, at most ``s`` Byzantine rows ``A``): a passing ``T`` leaves at least
    ``P − 2s ≥ P − r + 1`` honest rows in ``S``, which span ``null(H)`` (:func:`cyclic_encoding`), so
    ``B_S z* = B_S G R``: every row of ``S`` agrees with the honest value on the projection. A row
    whose corruption changes it therefore lands in ``T`` (almost surely over ``R``: the adversary
    does not know the projection), the corrupted set itself passes, and the smallest passing ``T``
    is exactly the set of corrupted rows; the decoded sum is then exact up to rounding. With more
    than ``s`` Byzantine rows nothing is guaranteed: random corruptions make it fail (``ok = False``),
    but ``s + 1`` colluding workers can send a consistent codeword of other gradients and be decoded
    silently. The check is exact only up to ``tolerance``: a corruption whose projection is below
    ``tolerance · ‖y_S‖`` is accepted (not located) and enters the sum through ``b`` (a change of one
    coordinate meets only that coordinate's two random weights, so a sparse change of 1e-4 of the
    rows' norm can slip through the default tolerance); a perturbation of the honest rows larger
    than ``tolerance`` relative to ``‖y_S‖`` (per-worker privacy noise, say) makes every set fail,
    and a looser tolerance accepts the noisy rows and returns ``bᵀ`` (noisy rows), whose error is
    ``bᵀ`` times the noise.

    Deliberate difference from DRACO (Chen et al. 2018, arXiv 1803.09877, Section 5): DRACO's cyclic
    code uses a complex inverse-DFT encoding and a linear-time Fourier locator; dpbr uses the real
    cyclic gradient code of Tandon et al. 2017 (arXiv 1612.03301), with the same supports and
    redundancy, and a combinatorial locator (``Σ_{k≤s} C(P, k)`` small least-squares checks on the
    2-column projection: fine for ``P ≤ ~30``, ``s ≤ 3``).

    Parameters
    ----------
    received : Tensor (P, d), floating point; not modified.
    encoding : Tensor (P, P)
        ``B``; row ``j`` is worker ``j``'s combination of the tasks.
    s : int, 0 ≤ s ≤ P
        Largest number of Byzantine rows located (the guarantee needs ``2s + 1 ≤ r``).
    generator : torch.Generator
        Source of the random projection (the only randomness).
    tolerance : float ≥ 0
        Relative residual below which a candidate ``S`` counts as consistent (float64 rounding is far
        below the default 1e-6; for float32 messages, see the tests).

    Returns
    -------
    decoded : Tensor (d,), ``received``'s dtype and device.
    adversaries : Tensor (P,) bool, ``received``'s device.
    ok : bool.
    """
    if received.ndim != 2:
        raise ValueError(f"cyclic_decode: received must be (P, d), got shape {tuple(received.shape)}")
    p, d = received.shape
    if tuple(encoding.shape) != (p, p):
        raise ValueError(f"cyclic_decode: encoding must be ({p}, {p}) for {p} received rows, "
                         f"got shape {tuple(encoding.shape)}")
    if not 0 <= s <= p:
        raise ValueError(f"cyclic_decode: s must be between 0 and the number of workers {p}, got s={s}")
    if not tolerance >= 0.0:
        raise ValueError(f"cyclic_decode: tolerance must be ≥ 0, got {tolerance}")
    device = received.device
    finite = torch.isfinite(received).all(dim=1)
    y = _project(received, generator)
    y = torch.where(finite[:, None], y, torch.zeros((), dtype=y.dtype, device=device)).cpu()
    b = encoding.detach().to("cpu", torch.float64)
    c = _row_coordinates(b)
    bad = [i for i, f in enumerate(finite.cpu().tolist()) if not f]
    good = [i for i in range(p) if i not in bad]
    failure = (torch.zeros(d, dtype=received.dtype, device=device), ~finite, False)
    if len(bad) > s:
        return failure
    for size in range(len(bad), s + 1):
        candidates = sorted(tuple(sorted(bad + list(extra))) for extra in itertools.combinations(good, size - len(bad)))
        kept = torch.tensor([[i for i in range(p) if i not in t] for t in candidates], dtype=torch.int64)
        if kept.shape[1] == 0:  # s = P: every row discarded, nothing to decode from
            return failure
        passed = _consistent(c, y, kept, tolerance)
        if bool(passed.any()):
            first = int(torch.argmax(passed.to(torch.int8)))
            rows = kept[first]
            bs = b[rows]  # (m, P)
            weights = torch.linalg.lstsq(bs.T, torch.ones(p, 1, dtype=torch.float64), driver="gelsd").solution[:, 0]
            span_resid = torch.linalg.vector_norm(bs.T @ weights - 1.0) / math.sqrt(p)
            if not bool(span_resid <= _SPAN_RTOL):
                return failure
            decoded = _combine(weights, received, rows).to(received.dtype)
            adversaries = torch.ones(p, dtype=torch.bool)
            adversaries[rows] = False
            return decoded, adversaries.to(device), True
    return failure
