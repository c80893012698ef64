"""Non-IID worker data: the training set is split among the honest workers only.

As in the code of Karimireddy, He & Jaggi (2022, arXiv 2006.09365), ``--partition shards|dirichlet``
splits the training set among the ``h = n − f_real`` honest workers (among all ``n`` when
``f_real = 0``); Byzantine workers that compute on data draw IID from the whole set. Expected values
are computed here with plain NumPy from the labels, never with dpbr's partition code.
"""

import numpy as np
import pytest
import torch

from dpbr import data
from dpbr.errors import UsageError
from dpbr.io import read_metadata
from dpbr.simulation import Simulation, partitions
from dpbr.spec import RunSpec

IMAGES = "synthetic(classes=10,n=1000,n_test=50,size=8)"  # 10 balanced classes, 100 examples each
BASE = dict(dataset=IMAGES, model="lenet", workers=25, byzantine=5, gar="median", batch_size=8, steps=2,
            eval_every=0, seed=3)


def _sim(**options):
    spec = RunSpec.create(**{**BASE, **options})
    return spec, Simulation(spec, data.load(IMAGES, None), torch.device("cpu"))


@pytest.mark.parametrize("partition", ["shards", "dirichlet(alpha=0.5)"])
def test_honest_workers_hold_every_training_example_exactly_once(partition):
    spec, sim = _sim(attack="label-flip", partition=partition)
    assert (spec.workers, spec.byzantine_real, spec.honest) == (25, 5, 20)
    y = data.load(IMAGES, None).y_train.numpy()
    honest = [sim.sampler.worker_indices[w].numpy() for w in range(spec.honest)]
    union = np.concatenate(honest)
    assert np.array_equal(np.sort(union), np.arange(len(y)))  # every index once: disjoint and covering
    assert set(y[union].tolist()) == set(range(10))           # every class reaches an honest worker


def test_honest_workers_draw_only_their_own_shard_and_byzantine_workers_draw_from_everything():
    spec, sim = _sim(attack="label-flip", partition="shards")
    h, n = spec.honest, spec.workers
    y = data.load(IMAGES, None).y_train.numpy()
    draws = torch.stack([sim.sampler.sample(range(n)) for _ in range(200)])  # (200 steps, n, b=8)
    for w in range(h):
        assert set(draws[:, w].reshape(-1).tolist()) <= set(sim.sampler.worker_indices[w].tolist())
    byz = draws[:, h:].reshape(-1).numpy()
    # IID from the whole set: each Byzantine worker's 1,600 draws meet about 1000·(1 − e^{-1.6}) ≈ 798
    # distinct indices of every class (a shard of its own would hold 40 indices of one class); the
    # 8,000 draws of all five about 1000·(1 − e^{-8}) ≈ 999.7 (the seeds are fixed: no flakiness)
    for w in range(h, n):
        mine = draws[:, w].reshape(-1).numpy()
        assert set(y[mine].tolist()) == set(range(10))          # a 40-example shard holds 1 class
        assert len(np.unique(mine)) > 700                         # E = 1000·(1 − e^{-1.6}) ≈ 798
    assert len(np.unique(byz)) > 990                              # E = 1000·(1 − e^{-8}) ≈ 999.7


def test_without_byzantine_workers_the_data_is_split_among_all_n():
    spec, sim = _sim(attack="none", partition="shards")
    assert spec.honest == spec.workers == 25
    assert len(sim.sampler.worker_indices) == 25
    union = np.concatenate([ix.numpy() for ix in sim.sampler.worker_indices])
    assert np.array_equal(np.sort(union), np.arange(1000))


def _expected_shard_counts(y: np.ndarray, h: int, classes: int) -> list[list[int]]:
    """Label-sorted shards: cut the sorted labels into h contiguous near-equal pieces (the first
    ``len % h`` one longer) and count classes — independent of how ties are ordered."""
    pieces = np.array_split(np.sort(y), h)
    return [[int((p == c).sum()) for c in range(classes)] for p in pieces]


def test_class_histogram_of_each_honest_worker_is_in_the_run_metadata(tmp_path):
    from dpbr.cli import main

    out = tmp_path / "r.parquet"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", IMAGES, "--model", "lenet", "--workers", "25", "--byzantine", "5",
              "--attack", "label-flip", "--gar", "median", "--partition", "shards", "--batch-size", "8",
              "--steps", "2", "--eval-every", "0", "--device", "cpu", "--out", str(out), "--quiet"])
        raise SystemExit(0)
    assert exc.value.code == 0
    meta = read_metadata(out)
    y = data.load(IMAGES, None).y_train.numpy()
    expected = _expected_shard_counts(y, 20, 10)
    assert meta["honest_class_counts"] == expected
    assert sum(map(sum, meta["honest_class_counts"])) == 1000
    # 20 shards of 50 over 10 classes of 100: every class is held by exactly two honest workers
    assert all(sum(1 for row in expected if row[c]) == 2 for c in range(10))


def test_iid_histogram_rows_are_the_whole_training_set():
    spec, sim = _sim(attack="label-flip", partition="iid")
    y = data.load(IMAGES, None).y_train.numpy()
    whole = [int((y == c).sum()) for c in range(10)]
    assert sim.honest_class_counts.tolist() == [whole] * spec.honest


# -- partition schemes ---------------------------------------------------------------------------- #


def _labels(n_per: int = 30, k: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.arange(n_per * k) % k)[torch.randperm(n_per * k, generator=g)]


def test_partition_iid_gives_everyone_everything():
    y = _labels()
    parts = partitions.partition(y, 4, "iid", generator=torch.Generator().manual_seed(0))
    assert len(parts) == 4 and all(torch.equal(p, torch.arange(len(y))) for p in parts)


def test_partition_shards_are_label_sorted_disjoint_and_covering():
    y = _labels()
    parts = partitions.partition(y, 10, "shards", generator=torch.Generator().manual_seed(0))
    allidx = torch.cat(parts).sort().values
    assert torch.equal(allidx, torch.arange(len(y)))
    assert [len(p) for p in parts] == [30] * 10
    assert all(len(y[p].unique()) == 1 for p in parts)  # one class per worker here
    again = partitions.partition(y, 10, "shards", generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    five = partitions.partition(y, 5, "shards", generator=torch.Generator().manual_seed(0))
    assert all(len(y[p].unique()) == 2 for p in five)


def test_partition_dirichlet():
    y = _labels(100)
    for scheme, kw in (("dirichlet(alpha=0.1)", {}), ("dirichlet(0.1)", {}), ("dirichlet", {"alpha": 0.1})):
        parts = partitions.partition(y, 8, scheme, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(y)))
        assert min(len(p) for p in parts) >= 1

    def skew(alpha: float) -> float:
        parts = partitions.partition(y, 8, f"dirichlet(alpha={alpha})", generator=torch.Generator().manual_seed(0))
        # mean over workers of the largest class share
        return float(np.mean([torch.bincount(y[p], minlength=10).max().item() / len(p) for p in parts]))

    assert skew(0.05) > skew(100.0) + 0.3
    a = partitions.partition(y, 8, "dirichlet(alpha=0.5)", generator=torch.Generator().manual_seed(3))
    b = partitions.partition(y, 8, "dirichlet(alpha=0.5)", generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    with pytest.raises(UsageError, match="--partition.*alpha > 0"):
        partitions.partition(y, 8, "dirichlet", generator=torch.Generator())
    with pytest.raises(UsageError, match="--partition.*unknown"):
        partitions.partition(y, 8, "zipf", generator=torch.Generator())
    with pytest.raises(UsageError, match="--partition"):
        partitions.partition(y[:3], 8, "shards", generator=torch.Generator())
