"""Gram matrices, pairwise distances and sorted columns of stacked ``(n, d)`` vectors.

One home for the linear algebra that the aggregation rules (:mod:`dpbr.robust.aggregators`), the
per-step metrics (:mod:`dpbr.simulation.metrics`) and the variance-to-norm estimator (:mod:`dpbr.vn.stats`)
share. Every distance-based rule (Krum, Multi-Krum, MDA, Bulyan, geometric median, centered
clipping, NNM) starts from the Gram matrix ``K = X Xᵀ`` of its ``n`` inputs, computed once by
:func:`gram`; all pairwise squared distances follow from it (:func:`sqdist`) in ``O(n²)`` extra work,
and iterative rules (Weiszfeld, centered clipping) run in the ``n``-dimensional coefficient space of
``K`` so that the ``d``-dimensional data is read only twice (Gram, final combination). The
coordinate-wise rules sort columns with :func:`sorted_rows` and average around a center with
:func:`mean_closest`.

Non-finite rows. A row holding a NaN or ±inf makes its own row and column of ``K`` non-finite and
nothing else (every entry of ``K`` is the dot product of its two rows). Its squared norm ``K_ii`` is
then non-finite, so the *finite mask* is read off the diagonal for free. A finite row whose doubled
squared norm overflows (``‖x‖ > 1.3e19`` in float32 or bfloat16 after the float32 promotion below) is
treated as non-finite as well: its distances cannot be measured. :func:`sqdist` sets every distance
that involves a non-finite row to ``+inf`` (never ``NaN``: ``inf − inf`` is sanitised), so such rows
are never anyone's neighbour and never part of a finite-diameter subset.

Precision. Half-precision inputs are promoted to float32 for the geometry (float16's range would
overflow squared norms of ordinary gradients); float32 and float64 stay as they are. The Gram matrix
is accumulated over column blocks of :data:`GRAM_BLOCK` (a batched matmul whose partial products are
summed): on a 2-core CPU this is 2–3× faster than one ``X @ X.T`` for ``n = 11`` and, because each
block's sum is short, about 10⁴ times more accurate in float32 at ``d = 10⁷`` (max abs error 1.2 vs
2·10⁴ on squared norms ≈ 10⁷ for MKL's single GEMM). ``gram(X, sum_dtype=torch.float64)`` adds the
float32 block products in float64; ``gram(X, dtype=torch.float64)`` takes the products themselves in
float64 (the VN estimator, whose U-statistics cancel), casting one block at a time. Distances from a
Gram matrix still cancel when the vectors are far from the origin relative to their spread: the
relative error of ``D²_ij`` is about ``ε·(‖x_i‖² + ‖x_j‖²)/D²_ij`` (``ε = 6e-8`` in float32).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from dpbr._lazy import LazyModule

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:  # imported on first use (dpbr._lazy)
    torch = LazyModule("torch", globals())

__all__ = [
    "GRAM_BLOCK",
    "NETWORK_MIN_COLUMNS",
    "combine",
    "compute_view",
    "constant",
    "coordinate_median",
    "gram",
    "mean_closest",
    "mean_rows",
    "median_of_sorted",
    "nan_as_posinf",
    "sorted_rows",
    "sorting_network",
    "sum_rows",
    "sqdist",
    "squared_distances",
]

GRAM_BLOCK = 4096
"""Columns per block of the blocked Gram product :func:`gram` (see the module docstring) and of the
blocked float32 norms of :mod:`dpbr.simulation.metrics`."""


def compute_view(X: Tensor) -> Tensor:
    """``X`` itself for float32/float64, a float32 copy for half precision (float16, bfloat16)."""
    return X if X.dtype in (torch.float32, torch.float64) else X.float()


def gram(X: Tensor, *, dtype: torch.dtype | None = None, sum_dtype: torch.dtype | None = None) -> Tensor:
    """The Gram matrix ``K = X Xᵀ`` (``n × n``, ``K_ij = ⟨x_i, x_j⟩``), accumulated over column blocks of
    :data:`GRAM_BLOCK`.

    Parameters
    ----------
    X:
        ``(n, d)`` tensor on any device; not modified.
    dtype:
        Precision of the block products. ``None`` (default): ``X``'s, which must then be float32 or
        float64 (use :func:`compute_view`); the columns are split into ``⌊d / GRAM_BLOCK⌋`` blocks
        multiplied as one batched matmul and summed, plus one product for the remainder, and no copy
        of ``X`` is made when it is contiguous. Another dtype (e.g. ``torch.float64`` for float32
        gradients) casts one ``(n, GRAM_BLOCK)`` block at a time and adds its product into the result,
        so memory stays ``O(n · GRAM_BLOCK)`` for any ``d``.
    sum_dtype:
        Precision in which the block products are added (default: the products'). With
        ``sum_dtype=torch.float64`` each entry of a float32 ``X`` is within about 1e-7 of
        ``‖x_i‖‖x_j‖`` (a float32 sum over the blocks adds their rounding, about 1e-6 at
        ``d = 431,080``), at the same cost.

    Returns
    -------
    Tensor[n, n]
        On ``X``'s device, of dtype ``sum_dtype`` (or the products' dtype).
    """
    if X.dim() == 3:
        return _gram_batch(X, dtype=dtype, sum_dtype=sum_dtype)
    if X.dim() != 2:
        raise ValueError(f"gram: expected an (n, d) tensor or an (S, n, d) batch, got shape {tuple(X.shape)}")
    n, d = X.shape
    if dtype is not None and dtype != X.dtype:
        K = torch.zeros(n, n, dtype=sum_dtype or dtype, device=X.device)
        for start in range(0, d, GRAM_BLOCK):  # a loop over column blocks, not over coordinates
            part = X[:, start:start + GRAM_BLOCK].to(dtype)
            if K.dtype == dtype:
                K.addmm_(part, part.T)
            else:
                K += (part @ part.T).to(K.dtype)
        return K
    main = d - d % GRAM_BLOCK
    if main == 0:
        K = X @ X.T
        return K if sum_dtype is None else K.to(sum_dtype)
    blocks = X[:, :main].reshape(n, main // GRAM_BLOCK, GRAM_BLOCK).transpose(0, 1)
    K = torch.bmm(blocks, blocks.transpose(1, 2)).sum(0, dtype=sum_dtype)
    if main < d:
        rest = X[:, main:]
        K = torch.addmm(K, rest, rest.T) if K.dtype == X.dtype else K + (rest @ rest.T).to(K.dtype)
    return K


#: Alignment in bytes of torch's CPU allocations (``c10::gAlignment``), hence of every fresh tensor.
_ALIGN = 64


def _gram_batch(X: Tensor, *, dtype: torch.dtype | None, sum_dtype: torch.dtype | None) -> Tensor:
    """:func:`gram` of each slice of an ``(S, n, d)`` batch, ``(S, n, n)``.

    On the CPU each slice's Gram matrix is the 2-D :func:`gram` of that slice (one blocked BLAS
    product per slice, stacked), so that it equals the 2-D result on a fresh ``(n, d)`` tensor bit for
    bit: a batched GEMM rounds differently from the single product, and so does a single product on
    a slice whose address is not aligned as a fresh allocation is (BLAS kernels pick their path by
    alignment) — such slices are copied first. On other devices, one batched blocked product (same
    blocks and the same order of their sums; equal to the 2-D result up to rounding).
    """
    S, n, d = X.shape
    if X.device.type == "cpu" or (dtype is not None and dtype != X.dtype):
        return torch.stack([
            gram(x if x.data_ptr() % _ALIGN == 0 else x.clone(memory_format=torch.contiguous_format),
                 dtype=dtype, sum_dtype=sum_dtype)
            for x in X.unbind(0)
        ])
    return _gram_batched_product(X, sum_dtype)


def _gram_batched_product(X: Tensor, sum_dtype: torch.dtype | None) -> Tensor:
    """The blocked Gram matrices of an ``(S, n, d)`` float32/float64 batch as batched products."""
    S, n, d = X.shape
    main = d - d % GRAM_BLOCK
    if main == 0:
        K = torch.matmul(X, X.mT)
        return K if sum_dtype is None else K.to(sum_dtype)
    blocks = X[:, :, :main].reshape(S, n, main // GRAM_BLOCK, GRAM_BLOCK).transpose(1, 2)
    K = torch.matmul(blocks, blocks.mT).sum(1, dtype=sum_dtype)
    if main < d:
        rest = X[:, :, main:]
        K = torch.baddbmm(K, rest, rest.mT) if K.dtype == X.dtype else K + torch.matmul(rest, rest.mT).to(K.dtype)
    return K


def squared_distances(K: Tensor) -> Tensor:
    """The pairwise squared distances ``D2`` of :func:`sqdist`, without the finite-row mask (``K`` may
    carry leading batch dimensions)."""
    if K.dim() == 2:
        sq = K.diagonal()
        return torch.add(sq.unsqueeze(1), sq).sub_(K + K.T).clamp_min_(0).nan_to_num_(nan=math.inf, posinf=math.inf)
    sq = K.diagonal(dim1=-2, dim2=-1)
    return torch.add(sq.unsqueeze(-1), sq.unsqueeze(-2)).sub_(K + K.mT).clamp_min_(0).nan_to_num_(nan=math.inf, posinf=math.inf)


def sqdist(K: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise squared distances and the finite-row mask from a Gram matrix.

    ``D²_ij = (K_ii + K_jj) − (K_ij + K_ji)``, clamped at 0: exactly symmetric (floating-point addition
    commutes), and its diagonal is exactly ``2K_ii − 2K_ii = 0`` for a finite row and ``inf − inf``
    (NaN, then ``+inf``) for a row whose squared norm is not finite — so the diagonal *is* the
    non-finite penalty, without a separate pass. Five tensor operations (the per-call overhead
    dominates for the small ``n × n`` matrix).

    Returns
    -------
    D2 : Tensor[n, n]
        The squared distances; ``+inf`` wherever row ``i`` or ``j`` is non-finite or the value
        overflowed; diagonal ``0`` for finite rows, ``+inf`` for the others (so adding the diagonal to
        a score disqualifies a non-finite row).
    finite : Tensor[n] bool
        ``True`` for rows whose (doubled) squared norm is finite.
    """
    D2 = squared_distances(K)
    return D2, (D2.diagonal() if D2.dim() == 2 else D2.diagonal(dim1=-2, dim2=-1)) == 0


def combine(W: Tensor, X: Tensor, finite: Tensor) -> Tensor:
    """``W @ X`` with the non-finite rows of ``X`` treated as absent (their weights must be 0).

    ``0 · NaN`` is ``NaN``, so a plain matmul cannot skip a row. ``torch.nn.functional.embedding_bag``
    (mode ``sum`` with per-sample weights) reads only the rows it is given: each non-finite row's
    index is replaced by that of a finite row (its weight 0 stays 0), so non-finite rows are never
    read and ``X`` is never copied — at ``d = 10⁷`` about 4× faster than masking a copy first.
    ``W`` is ``(n,)`` (result ``(d,)``) or ``(m, n)`` (result ``(m, d)``); it is cast to ``X``'s dtype.
    For a batch, ``X`` is ``(S, n, d)``, ``finite`` ``(S, n)`` and ``W`` ``(S, n)`` or ``(S, m, n)``
    (result ``(S, d)`` or ``(S, m, d)``): one ``embedding_bag`` over the flattened rows, each bag the
    same weighted sum as the 2-D call on its slice.
    """
    if X.dim() == 3:
        return _combine_batch(W, X, finite)
    n = X.shape[0]
    arange = torch.arange(n, device=X.device)
    idx = torch.where(finite, arange, finite.to(torch.uint8).argmax())
    W2 = W.reshape(-1, n).to(X.dtype)
    m = W2.shape[0]
    offsets = torch.arange(0, m * n, n, device=X.device)
    out = torch.embedding_bag(X, idx.repeat(m), offsets, False, 0, False, W2.reshape(-1))[0]
    return out.reshape(*W.shape[:-1], X.shape[1])


def _combine_batch(W: Tensor, X: Tensor, finite: Tensor) -> Tensor:
    """:func:`combine` of each slice of an ``(S, n, d)`` batch (see there)."""
    S, n, d = X.shape
    arange = torch.arange(n, device=X.device)
    idx = torch.where(finite, arange, finite.to(torch.uint8).argmax(-1, keepdim=True))
    idx = idx + torch.arange(0, S * n, n, device=X.device).unsqueeze(1)  # rows of the flattened batch
    W2 = W.reshape(S, -1, n).to(X.dtype)
    m = W2.shape[1]
    offsets = torch.arange(0, S * m * n, n, device=X.device)
    bags = idx.unsqueeze(1).expand(S, m, n).reshape(-1)
    out = torch.embedding_bag(X.reshape(S * n, d), bags, offsets, False, 0, False, W2.reshape(-1))[0]
    return out.reshape(*W.shape[:-1], d)


def mean_rows(X: Tensor, rows: Tensor) -> Tensor:
    """Mean of the rows ``rows`` of ``X`` (``(d,)``): their sum in the order given, divided by their
    number, reading only those rows and copying nothing (``embedding_bag``; 5× faster than
    ``index_select`` + ``mean`` at ``d = 10⁷``). The ATen op is called directly (the
    ``torch.nn.functional`` wrapper's argument checks cost more than the op itself at small ``d``),
    in "sum" mode followed by the division — bit-identical to its "mean" mode (checked on 2,000
    random cases), which is 4× slower on the CPU for small inputs.

    For a batch, ``X`` is ``(S, n, d)`` and ``rows`` ``(S, m)``: the ``(S, d)`` means of each slice's
    rows, one bag per slice of the same ``embedding_bag``."""
    if X.dim() == 3:
        S, n, d = X.shape
        m = rows.shape[-1]
        idx = (rows + torch.arange(0, S * n, n, device=rows.device).unsqueeze(1)).reshape(-1)
        offsets = torch.arange(0, S * m, m, device=rows.device)
        return torch.embedding_bag(X.reshape(S * n, d), idx, offsets, False, 0)[0].div_(m)
    idx = rows.reshape(-1)
    # mode "sum", then the division: the same bits as mode "mean", whose CPU kernel is 4× slower
    return torch.embedding_bag(X, idx, _zero_offset(idx.device), False, 0)[0][0].div_(idx.shape[0])


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def constant(value: float, like: Tensor) -> Tensor:
    """A cached 0-d tensor holding ``value`` with ``like``'s dtype and device (a constant, not state:
    passing a Python number to an operation makes torch build and convert a tensor for it each call)."""
    return _constant(value, like.dtype, like.device)


@functools.lru_cache(maxsize=8)
def _zero_offset(device: torch.device) -> Tensor:
    """The constant offsets ``[0]`` of a single bag (cached per device: a constant, not state)."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def nan_as_posinf(X: Tensor) -> Tensor:
    """A copy of ``X`` with NaN replaced by ``+inf``: the order used by the coordinate-wise rules.

    A NaN entry is thus placed beyond every finite value of its coordinate (as a ``+inf`` already
    is), so at most ``f`` non-finite entries per coordinate never reach the middle of the order.
    """
    return torch.nan_to_num(X, nan=math.inf, posinf=math.inf, neginf=-math.inf)


NETWORK_MIN_COLUMNS = 32768
"""On the CPU, columns are sorted with a sorting network (:func:`sorted_rows`) from this many columns on."""


@functools.lru_cache(maxsize=64)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators ``(i, j)``, ``i < j``, of Batcher's merge-exchange sort of ``n`` items (Knuth, TAOCP
    vol. 3, section 5.2.2, Algorithm M): 9 comparators for ``n = 5``, 37 for 11, 138 for 25."""
    pairs: list[tuple[int, int]] = []
    if n < 2:
        return ()
    t = (n - 1).bit_length()
    p = 1 << (t - 1)
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while True:
            pairs.extend((i, i + d) for i in range(n - d) if i & p == r)
            if q == p:
                break
            d, q, r = q - p, q >> 1, p
        p >>= 1
    return tuple(pairs)


def sorted_rows(X: Tensor) -> list[Tensor]:
    """The rows of ``X`` sorted per column, as a list of ``n`` row tensors, with NaN counted as ``+inf``.

    ``X`` is not modified. ``torch.sort`` along dim 0 walks each column with stride ``d``; on the CPU
    with many columns a sorting network of element-wise ``minimum``/``maximum`` over whole rows is
    2–5× faster (37 vectorised compare-exchanges for ``n = 11``, 138 for ``n = 25``: a fixed schedule
    that depends on ``n`` only; min/max are exact, so the result is identical). The network works in
    one ``(n + 1) × d`` buffer — the copy that also maps NaN to ``+inf``, plus one spare row the
    compare-exchanges rotate through — so it allocates nothing per step (at ``d = 10⁷`` every fresh
    40 MB row would cost page faults).

    For an ``(S, n, d)`` batch the rows are ``(S, d)`` tensors: the columns of all slices are sorted as
    one ``(n, S·d)`` matrix (the values of each column are exactly those the 2-D call sorts), see
    :func:`_sorted_rows_batch`.
    """
    if X.dim() == 3:
        return _sorted_rows_batch(X)
    n, d = X.shape
    if X.device.type != "cpu" or d < NETWORK_MIN_COLUMNS or n < 2:
        return list(nan_as_posinf(X).sort(dim=0).values.unbind(0))
    buf = torch.empty((n + 1, d), dtype=X.dtype, device=X.device)
    torch.nan_to_num(X, nan=math.inf, posinf=math.inf, neginf=-math.inf, out=buf[:n])
    rows, spare = list(buf[:n].unbind(0)), buf[n]
    for i, j in sorting_network(n):
        lo, hi = rows[i], rows[j]
        torch.minimum(lo, hi, out=spare)
        torch.maximum(lo, hi, out=lo)
        rows[i], rows[j], spare = spare, lo, hi
    return rows


def _sorted_rows_batch(X: Tensor) -> list[Tensor]:
    """:func:`sorted_rows` of an ``(S, n, d)`` batch: ``n`` sorted rows of shape ``(S, d)``.

    The slices are laid out as one ``(n, S·d)`` matrix (``n + 1`` rows with the spare of the sorting
    network), written once by the NaN-mapping copy. With fewer than :data:`NETWORK_MIN_COLUMNS`
    columns in all (or off the CPU), one ``torch.sort``; else the sorting network runs over column
    chunks of ``max(d, NETWORK_MIN_COLUMNS)`` — the rows of one chunk stay in cache as those of a 2-D
    call do, where whole ``S·d`` rows would not (5× slower at ``S = 5, d = 10⁵``). The network's
    schedule does not depend on the data, so every chunk ends with its sorted rows in the same
    buffer rows. Values are exact either way (sorts and min/max select, they do not round).
    """
    S, n, d = X.shape
    cols = S * d
    network = X.device.type == "cpu" and cols >= NETWORK_MIN_COLUMNS and n >= 2
    buf = torch.empty((n + 1 if network else n, S, d), dtype=X.dtype, device=X.device)
    torch.nan_to_num(X.transpose(0, 1), nan=math.inf, posinf=math.inf, neginf=-math.inf, out=buf[:n])
    flat = buf.view(-1, cols)
    if not network:
        return [row.view(S, d) for row in flat.sort(dim=0).values.unbind(0)]
    ids = list(range(n + 1))  # ids[i]: the buffer row holding sorted row i; ids[n]: the spare
    chunk = max(d, NETWORK_MIN_COLUMNS)
    for start in range(0, cols, chunk):  # a loop over column chunks, not over coordinates
        rows = [flat[k, start:start + chunk] for k in range(n + 1)]
        order, spare = list(range(n)), n
        for i, j in sorting_network(n):
            lo, hi = rows[order[i]], rows[order[j]]
            torch.minimum(lo, hi, out=rows[spare])
            torch.maximum(lo, hi, out=lo)
            order[i], order[j], spare = spare, order[i], order[j]
        ids = order
    return [flat[k].view(S, d) for k in ids]


def median_of_sorted(S: list[Tensor]) -> Tensor:
    """Median of sorted rows: the middle row, or for even ``n`` the midpoint ``lo/2 + hi/2`` of the two
    middle rows (no overflow for huge finite values). A new tensor."""
    n = len(S)
    if n % 2 == 1:
        return S[n // 2].clone()
    return torch.add(S[n // 2 - 1] * 0.5, S[n // 2], alpha=0.5)


def coordinate_median(X: Tensor) -> Tensor:
    """Coordinate-wise median along dim 0 (NaN counted as ``+inf``; even ``n``: midpoint).

    Uses the sorting network where :func:`sorted_rows` would, else ``torch.median`` (odd ``n``) or two
    ``torch.kthvalue`` (even ``n``), which select without a full sort. For an ``(S, n, d)`` batch,
    the ``(S, d)`` medians along dim 1, the columns of all slices taken as one ``(n, S·d)`` matrix.
    """
    if X.dim() == 3:
        S, n, d = X.shape
        if X.device.type == "cpu" and S * d >= NETWORK_MIN_COLUMNS and n > 1:
            return median_of_sorted(_sorted_rows_batch(X))
        return coordinate_median(X.transpose(0, 1).reshape(n, S * d)).view(S, d)
    n, d = X.shape
    if X.device.type == "cpu" and d >= NETWORK_MIN_COLUMNS and n > 1:
        return median_of_sorted(sorted_rows(X))
    X = nan_as_posinf(X)
    if n % 2 == 1:
        return X.median(dim=0).values
    lo = X.kthvalue(n // 2, dim=0).values
    return torch.add(lo * 0.5, X.kthvalue(n // 2 + 1, dim=0).values, alpha=0.5)


def sum_rows(rows: list[Tensor], out: Tensor | None = None) -> Tensor:
    """``Σ rows`` accumulated into ``out`` (a new tensor when ``None``)."""
    out = torch.add(rows[0], rows[1], out=out) if len(rows) > 1 else rows[0].clone() if out is None else out.copy_(rows[0])
    for r in rows[2:]:
        out.add_(r)
    return out


def mean_closest(S: list[Tensor], center: Tensor, k: int) -> Tensor:
    """Per column, the mean of the ``k`` values of the sorted rows ``S`` closest to ``center``.

    Definition: with ``m = center`` and ``r`` the ``k``-th smallest distance ``|x − m|`` of a column,
    the mean of every value at distance ``< r`` and of as many values at distance exactly ``r`` as
    make ``k``. When values at ``m − r`` and at ``m + r`` tie for the last places (a genuine tie of the
    definition), the lower ones are taken — the mean of the first ``k`` values of the column stably
    sorted by ``(|x − m|, x)``.

    The ``k`` nearest values form a window ``S[s], …, S[s+k−1]`` of consecutive sorted values. A
    window qualifies when neither value next to it is nearer than its farthest end: with
    ``c_s = max(m − S[s], S[s+k−1] − m)``,

        ``m − S[s−1] ≥ c_s``  and  ``S[s+k] − m ≥ c_s``  (a missing neighbour always qualifies).

    Every qualifying window is a set of ``k`` nearest values, and the lowest one holds the values of
    the tie convention above. (Signed differences: a neighbour on the far side of ``m`` fails — the
    window then lies on one side of ``m`` and can be moved towards it, over equal values at worst.
    Comparing ``c_s`` alone is not enough: ``[−2, −2, 0, 0.5, 1]`` around 0 with ``k = 4`` has
    ``c_0 = c_1 = 2``, but window 0 leaves out 1, which is nearer than −2.) The ``n − k + 1``
    offsets are scanned by a Python loop of whole-row operations in preallocated buffers (no
    ``argmin`` along dim 0, several times slower on the CPU; no host synchronisation), and each
    window is summed directly — no prefix sums, whose differences would lose everything next to a
    huge (Byzantine) value.

    Non-finite values: ``S`` orders NaN as ``+inf`` (:func:`sorted_rows`); ``±inf`` are infinitely far
    from a finite ``m``, so a window holding one qualifies only when more than ``n − k`` values of the
    column are infinite. When no window qualifies — only possible when ``m`` itself is not finite,
    i.e. when most values of the column are — the lowest window is used.
    """
    n = len(S)
    total = sum_rows(S[:k])
    if n == k:
        return total.div_(k)
    lo = torch.sub(center, S[0])  # m − S[s]: distance of the window's low end (signed)
    hi = torch.sub(S[k - 1], center)  # S[s+k−1] − m: of its high end
    above = torch.sub(S[k], center)  # S[s+k] − m: of the value just above the window
    cost = torch.maximum(lo, hi)
    ok = torch.ge(above, cost)  # s = 0 has nothing below it
    open_ = ok.logical_not()  # columns whose window is still to be found
    below, window = torch.empty_like(lo), torch.empty_like(total)
    ok_above = torch.empty_like(ok)
    for s in range(1, n - k + 1):
        below, lo = lo, below  # the previous low end S[s−1] is now the value just below the window
        torch.sub(center, S[s], out=lo)
        hi, above = above, hi  # the previous "just above" S[s+k−1] is now the high end
        torch.maximum(lo, hi, out=cost)
        torch.ge(below, cost, out=ok)
        if s + k < n:
            torch.ge(torch.sub(S[s + k], center, out=above), cost, out=ok_above)
            ok.logical_and_(ok_above)
        ok.logical_and_(open_)
        torch.where(ok, sum_rows(S[s:s + k], out=window), total, out=total)
        open_.logical_xor_(ok)
    return total.div_(k)
