"""Worker data: which training examples each worker holds (:func:`partition`: IID, label-sorted
shards, Dirichlet, long-tailed classes) and which ones it draws at each step (:class:`WorkerSampler`)."""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from dpbr.errors import UsageError

__all__ = ["WorkerSampler", "class_counts", "partition"]

_DIRICHLET_POSITIONAL = re.compile(r"^\s*dirichlet\s*\(\s*([0-9.eE+\-]+)\s*\)\s*$", re.I)


def partition(
    labels: torch.Tensor,
    num_workers: int,
    scheme: str,
    *,
    generator: torch.Generator,
    alpha: float | None = None,
    min_size: int = 1,
) -> list[torch.Tensor]:
    """Training-set indices for each of ``num_workers`` workers (sorted ``int64`` tensors on ``labels.device``).

    Schemes
    -------
    ``iid``
        Every worker gets the *whole* training set and samples its mini-batches IID from it, as in the
        study (the same index tensor is returned for every worker).
    ``shards``
        Non-IID, as in the bucketing paper (Karimireddy, He, Jaggi 2022, arXiv 2006.09365): indices sorted by label
        (ties in a random order drawn from ``generator``) and cut into ``num_workers`` contiguous shards
        of near-equal size, so each worker sees about ``classes / num_workers`` classes. Disjoint, covering.
    ``dirichlet(alpha=A)`` (also ``dirichlet(A)`` or ``scheme="dirichlet", alpha=A``)
        For every class, worker proportions ``p ~ Dirichlet(A·1)`` split that class's (shuffled)
        indices; small ``A`` is very skewed, large ``A`` tends to IID. Disjoint and covering; redrawn
        (up to 1,000 times) until every worker has at least ``min_size`` samples.
    ``longtail(beta=B, shards=false)``
        The long-tailed training set of the bucketing paper's first experiment (its code's
        ``NONIIDLTSampler``, ``B = 0.5`` there): of class ``c = 0, 1, …`` only the first
        ``⌊N_c · B^c⌋`` examples in dataset order are kept (``B = 1`` keeps all). Every worker samples
        from that whole subset (``shards=false``, the paper's IID arm), or the subset is cut into
        label-sorted contiguous shards as ``shards`` does (``shards=true``, its non-IID arm). Only the
        training set is affected: the paper also thins its test set the same way, while dpbr evaluates
        on the whole test split.

    ``generator`` (a CPU ``torch.Generator``) is the only source of randomness.

    ``dpbr train`` passes the number of *honest* workers ``h = n − f_real`` (all ``n`` without
    Byzantine workers), as in the code of Karimireddy, He & Jaggi (2022, arXiv 2006.09365): every
    example then belongs to exactly one honest worker, and the Byzantine workers that compute on data
    sample IID from the whole set (:class:`WorkerSampler`, :class:`dpbr.simulation.engine.Simulation`).

    Raises
    ------
    UsageError
        ``--partition`` for an unknown scheme, a bad ``alpha``, or more workers than samples.
    """
    from dpbr.registry import parse

    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise UsageError("--workers", f"must be a positive integer, got {num_workers!r}")
    if labels.ndim != 1 or labels.dtype.is_floating_point:
        raise ValueError("labels must be a 1-D integer tensor")
    m = _DIRICHLET_POSITIONAL.match(scheme) if isinstance(scheme, str) else None
    if m:
        kind, params = "dirichlet", {"alpha": float(m.group(1))}
    else:
        (kind, params), *rest = parse(scheme, option="--partition")
        if rest:
            raise UsageError("--partition", f"expected one scheme, got {scheme!r}")
    device = labels.device
    y = labels.detach().to("cpu", torch.int64)
    n = int(y.numel())
    if kind == "iid":
        if params:
            raise UsageError("--partition", "iid takes no parameters")
        full = torch.arange(n, device=device)
        return [full] * num_workers
    if kind == "longtail":
        return _longtail(y, num_workers, params, generator, min_size, device)
    if n < num_workers * max(min_size, 1):
        raise UsageError("--partition", f"{n} samples cannot give {num_workers} workers {min_size} sample(s) each")
    if kind == "shards":
        if params:
            raise UsageError("--partition", "shards takes no parameters")
        perm = torch.randperm(n, generator=generator)
        order = perm[torch.argsort(y[perm], stable=True)]
        return [s.sort().values.to(device) for s in torch.tensor_split(order, num_workers)]
    if kind == "dirichlet":
        unknown = [k for k in params if k != "alpha"]
        if unknown:
            raise UsageError("--partition", f"dirichlet has no parameter {unknown[0]!r}; allowed: alpha")
        a = params.get("alpha", alpha)
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            raise UsageError("--partition", f"dirichlet needs alpha > 0, got {a!r}")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        yn = y.numpy()
        classes = np.unique(yn)
        by_class = [np.flatnonzero(yn == c) for c in classes]
        for _ in range(1000):
            parts: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
            for idx in by_class:
                idx = rng.permutation(idx)
                p = rng.dirichlet(np.full(num_workers, float(a)))
                cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
                for w, chunk in enumerate(np.split(idx, cuts)):
                    parts[w].append(chunk)
            sizes = [sum(len(c) for c in ps) for ps in parts]
            if min(sizes) >= min_size:
                return [torch.from_numpy(np.sort(np.concatenate(ps))).to(torch.int64).to(device) for ps in parts]
        raise UsageError("--partition", f"dirichlet(alpha={a}) left a worker with fewer than {min_size} samples "
                                        f"in 1000 draws; raise alpha or use fewer workers")
    raise UsageError("--partition", f"unknown partition {scheme!r}; allowed: iid, shards, dirichlet(alpha=A), "
                                    f"longtail(beta=B,shards=false)")


def _longtail(y: Tensor, num_workers: int, params: dict, generator: torch.Generator, min_size: int,
              device: torch.device) -> list[Tensor]:
    """The ``longtail`` scheme of :func:`partition` on CPU int64 labels ``y``."""
    unknown = [k for k in params if k not in ("beta", "shards")]
    if unknown:
        raise UsageError("--partition", f"longtail has no parameter {unknown[0]!r}; allowed: beta, shards")
    beta = params.get("beta", 0.5)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
        raise UsageError("--partition", f"longtail needs 0 < beta <= 1, got {beta!r}")
    sharded = params.get("shards", False)
    if not isinstance(sharded, bool):
        raise UsageError("--partition", f"longtail shards must be true or false, got {sharded!r}")
    # rank of each example within its class (dataset order), kept while rank < ⌊N_c · β^c⌋
    classes = int(y.max()) + 1 if y.numel() else 0
    counts = torch.bincount(y, minlength=classes)
    keep_per_class = torch.floor(counts.double() * float(beta) ** torch.arange(classes, dtype=torch.float64)).long()
    order = torch.argsort(y, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(y)
    rank[order] = torch.arange(y.numel()) - starts[y[order]]
    kept = torch.nonzero(rank < keep_per_class[y]).flatten()
    if kept.numel() < num_workers * max(min_size, 1):
        raise UsageError("--partition", f"longtail(beta={beta}) keeps {kept.numel()} samples, too few for "
                                        f"{num_workers} workers with {min_size} sample(s) each")
    if not sharded:
        kept = kept.to(device)
        return [kept] * num_workers
    perm = kept[torch.randperm(kept.numel(), generator=generator)]
    sorted_ix = perm[torch.argsort(y[perm], stable=True)]
    return [s.sort().values.to(device) for s in torch.tensor_split(sorted_ix, num_workers)]


def class_counts(labels: Tensor, shares: Sequence[Tensor] | None, workers: int, num_classes: int) -> Tensor:
    """``(workers, classes)`` int64: how many training examples of each class each worker holds.

    ``shares`` are the workers' training indices (:func:`partition`), or ``None`` when every worker
    samples from the whole set (IID: every row is the whole set's histogram). ``classes`` is
    ``num_classes``, or more when a label exceeds it.
    """
    classes = max(int(num_classes), int(labels.max()) + 1 if labels.numel() else 0)
    if shares is None:
        return torch.bincount(labels, minlength=classes).expand(workers, -1).clone()
    return torch.stack([torch.bincount(labels.index_select(0, ix), minlength=classes) for ix in shares])


class WorkerSampler:
    """The example indices each worker draws at each step: ``b`` of them, uniformly with replacement,
    from its share of the training set (non-IID partitions) or from the whole set.

    Worker ``w`` draws with its own generator ``generators[w]`` (seeded from ``(seed, "batch", w)``),
    so a worker's draws do not depend on the others'. ``shares`` (CPU int64 tensors, one per honest
    worker) come from :func:`partition`; workers beyond them (the Byzantine workers that compute on
    data, under a non-IID partition) and every worker when ``shares`` is ``None`` (IID) sample from
    the whole set.

    Attributes
    ----------
    worker_indices : list of Tensor or None
        ``shares``: the training indices of each honest worker, ``None`` for IID.
    """

    def __init__(self, n_train: int, batch_size: int, generators: Sequence[torch.Generator],
                 shares: list[Tensor] | None, device: torch.device) -> None:
        self.n_train = int(n_train)
        self.batch_size = int(batch_size)
        self.generators = generators
        self.worker_indices = shares
        self.device = device

    def data_of(self, worker: int) -> Tensor | None:
        """The training indices worker ``worker`` samples from, or None for the whole set (IID
        partition, or a Byzantine worker ``worker >= h`` under a non-IID one)."""
        if self.worker_indices is None or worker >= len(self.worker_indices):
            return None
        return self.worker_indices[worker]

    def sample(self, workers: range, out: Tensor | None = None) -> Tensor:
        """Indices ``(len(workers), b)`` of the training examples each worker draws this step, on the device.

        Row ``i`` comes from worker ``workers[i]``'s own generator (the same draws with or without
        ``out``, a CPU int64 buffer that saves the per-step allocation and stacking): from its share
        of the data (:meth:`data_of`), or IID from the whole training set.
        """
        b = self.batch_size
        rows = torch.empty(len(workers), b, dtype=torch.int64) if out is None else out
        for row, w in zip(rows.unbind(0), workers):
            own = self.data_of(w)
            if own is None:
                torch.randint(self.n_train, (b,), generator=self.generators[w], out=row)
            else:
                torch.index_select(own, 0, torch.randint(own.shape[0], (b,), generator=self.generators[w]), out=row)
        return rows.to(self.device)

    def sample_window(self, workers: range, count: int, scratch: Tensor, out: Tensor) -> Tensor:
        """The indices of the next ``count`` steps at once: ``out[:count]`` ``(count, len(workers), b)``.

        Worker ``i`` draws its ``count·b`` indices in one call of its own generator — the same
        numbers, in the same order, as ``count`` calls of :meth:`sample` (``torch.randint`` fills
        serially from the generator; checked in ``tests/test_train.py``) — into ``scratch[i]``
        (``(len(workers), window, b)``); one copy puts them in step-major order. Saves ``len(workers)``
        generator calls per step for small models.
        """
        b = self.batch_size
        for block, w in zip(scratch.unbind(0), workers):
            block = block[:count]
            own = self.data_of(w)
            if own is None:
                torch.randint(self.n_train, (count, b), generator=self.generators[w], out=block)
            else:
                drawn = torch.randint(own.shape[0], (count * b,), generator=self.generators[w])
                torch.index_select(own, 0, drawn, out=block.view(-1))
        out[:count].copy_(scratch[:, :count].transpose(0, 1))
        return out[:count].to(self.device)
