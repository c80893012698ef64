"""The long-tailed partition of the bucketing paper's first experiment (Karimireddy, He & Jaggi, arXiv 2006.09365)."""

from __future__ import annotations

import math

import pytest
import torch

from dpbr.errors import UsageError
from dpbr.simulation.partitions import partition
from dpbr.spec import RunSpec


def _labels() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 4, (400,), generator=g)


def _expected_kept(y: list[int], beta: float) -> list[int]:
    """Plain loops: of class c keep the first ⌊N_c·β^c⌋ examples in dataset order."""
    counts = {c: y.count(c) for c in set(y)}
    seen = {c: 0 for c in counts}
    kept = []
    for i, c in enumerate(y):
        if seen[c] < math.floor(counts[c] * beta**c):
            kept.append(i)
        seen[c] += 1
    return kept


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_every_worker_samples_the_same_long_tailed_subset():
    y = _labels()
    parts = partition(y, 3, "longtail(beta=0.5)", generator=_gen())
    expected = _expected_kept(y.tolist(), 0.5)
    assert len(parts) == 3 and all(p.tolist() == expected for p in parts)
    counts = torch.bincount(y, minlength=4).tolist()
    kept_counts = torch.bincount(y[parts[0]], minlength=4).tolist()
    assert kept_counts == [math.floor(counts[c] * 0.5**c) for c in range(4)]
    assert partition(y, 3, "longtail", generator=_gen())[0].tolist() == expected  # β = 0.5 by default
    assert partition(y, 2, "longtail(beta=1)", generator=_gen())[0].tolist() == list(range(400))


def test_sharded_long_tail_is_disjoint_covering_and_label_sorted():
    y = _labels()
    expected = _expected_kept(y.tolist(), 0.5)
    parts = partition(y, 4, "longtail(beta=0.5,shards=true)", generator=_gen())
    assert sorted(torch.cat(parts).tolist()) == expected
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 1
    labels = [sorted(set(y[p].tolist())) for p in parts]
    for a, b in zip(labels, labels[1:]):  # contiguous in label order
        assert a[-1] <= b[0]
    again = partition(y, 4, "longtail(beta=0.5,shards=true)", generator=_gen())
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def test_errors_and_spec():
    y = _labels()
    for bad, fragment in [("longtail(beta=0)", "0 < beta <= 1"), ("longtail(beta=1.5)", "0 < beta <= 1"),
                          ("longtail(alpha=1)", "no parameter 'alpha'"), ("longtail(shards=2)", "true or false")]:
        with pytest.raises(UsageError, match=f"--partition.*{fragment}"):
            partition(y, 2, bad, generator=_gen())
    with pytest.raises(UsageError, match="too few"):
        partition(torch.tensor([0, 1, 1, 1]), 3, "longtail(beta=0.5)", generator=_gen())
    spec = RunSpec.create(dataset="synthetic(d=68,classes=2)", model="logit", partition="longtail(beta=0.5)")
    assert spec.partition == "longtail(beta=0.5)"
