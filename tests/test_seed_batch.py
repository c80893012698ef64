"""Seeds (and cells differing only in scalars) as one batched simulation: every member's records equal
its single run's (:mod:`dpbr.simulation.batch`).

The reference is the single-run engine itself: the batched engine's specification is that member
``i`` of ``SeedBatch(specs)`` produces what ``Simulation(specs[i]).run()`` produces — bit for bit for
the logistic model on the CPU, within a stated float32 tolerance for the batched ``vmap`` gradients of
torch models.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dpbr.data import load
from dpbr.errors import UsageError
from dpbr.simulation import SeedBatch, Simulation, group_key
from dpbr.spec import RunSpec

VECTORS = "synthetic(classes=2,d=68,n=512,n_test=128)"  # phishing-shaped binary vectors
IMAGES = "synthetic(n=256,n_test=64,size=16)"           # 1×16×16 images, 10 classes
CPU = torch.device("cpu")
BASE = dict(dataset=VECTORS, model="logit", workers=7, byzantine=2, batch_size=16, steps=60, eval_every=20)


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    return load(VECTORS, tmp_path_factory.mktemp("data"), device=CPU)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return load(IMAGES, tmp_path_factory.mktemp("data"), device=CPU)


def cells(*members: dict, **shared) -> list[RunSpec]:
    return [RunSpec.create(**{**BASE, **shared, **m}) for m in members]


def seeds(*values: int, **shared) -> list[RunSpec]:
    return cells(*({"seed": s} for s in values), **shared)


def run_both(specs: list[RunSpec], dataset, **options):
    batch = SeedBatch(specs, dataset, CPU, **options)
    results = batch.run()
    singles = []
    for spec in specs:
        sim = Simulation(spec, dataset, CPU, **options)
        singles.append((sim, sim.run()))
    return batch, results, singles


def assert_identical(specs: list[RunSpec], dataset, **options) -> list:
    """Every member's metrics, evaluations, status, step count and final θ equal its single run's."""
    batch, results, singles = run_both(specs, dataset, **options)
    assert len(results) == len(specs)
    for i, ((sim, single), got) in enumerate(zip(singles, results)):
        assert got.status == single.status and got.diverged_at == single.diverged_at, i
        assert got.steps_done == single.steps_done, i
        torch.testing.assert_close(got.metrics, single.metrics, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got.worker_norms, single.worker_norms, rtol=0, atol=0, equal_nan=True)
        assert (got.selected is None) == (single.selected is None), i
        assert got.selected is None or torch.equal(got.selected, single.selected), i
        assert got.evaluations == single.evaluations, i
        assert torch.equal(batch.theta[i], sim.oracle.theta), i
        assert got.phase_seconds.shape == single.phase_seconds.shape
        assert got.facts == single.facts
        member = batch.members[i]
        facts = (member.noise_sigma, member.dim, member.h, member.strategy)
        assert facts == (sim.noise_sigma, sim.dim, sim.h, sim.strategy)
        assert torch.equal(member.honest_class_counts, sim.honest_class_counts)
    # the members are different runs (a batch that ran one member S times would fail here)
    if len({s.seed for s in specs}) > 1 and all(r.status == "completed" for r in results):
        assert not torch.equal(results[0].metrics, results[1].metrics)
    return results


@pytest.mark.parametrize("options", [
    dict(gar="average", attack="none"),
    dict(gar="mda", attack="little(factor=1.5,negative=true)", epsilon=0.5),
    dict(gar="mda", attack="empire"),
    dict(gar="median", attack="gaussian"),
    dict(gar="cc", attack="mimic"),                                   # stateful rule and attack
    dict(gar="average", attack="little", clip=0.5),                   # batch clipping that binds
    dict(gar="mda", attack="little", epsilon=0.3, clip=0.5, clip_mode="per-example"),
    dict(gar="mda", attack="little", epsilon=0.2, worker_momentum=0.9),
    dict(gar="mda", attack="little(factor=1.5,negative=true)", partition="shards"),
    dict(gar="krum", attack="label-flip"),                            # Byzantine gradients on own data
    dict(gar="mda", attack="empire(factor=optimal)", steps=20),       # the attack searches against the rule
], ids=["average-none", "mda-little-eps", "mda-empire", "median-gaussian", "cc-mimic", "batch-clip",
        "per-example-clip", "worker-momentum", "shards", "krum-labelflip", "mda-empire-optimal"])
def test_members_equal_single_runs_logistic(vectors, options):
    assert_identical(seeds(1, 2, 3, **options), vectors)


def test_members_differing_in_scalars_equal_single_runs(vectors):
    specs = cells({"seed": 1, "epsilon": 0.1}, {"seed": 2, "epsilon": 0.1}, {"seed": 1, "epsilon": 0.5},
                  {"seed": 3, "epsilon": 0.9, "delta": 1e-5, "clip": 0.02},
                  {"seed": 4, "epsilon": 0.2, "lr": 0.5, "momentum": 0.5, "attack": "little(factor=2,negative=true)"},
                  gar="mda", attack="little(factor=1.5,negative=true)")
    assert len({group_key(s) for s in specs}) == 1
    results = assert_identical(specs, vectors)
    assert not torch.equal(results[0].metrics, results[2].metrics)  # same seed, another ε
    specs = cells({"seed": 1, "worker_momentum": 0.9}, {"seed": 1, "worker_momentum": 0.5}, epsilon=0.2)
    assert_identical(specs, vectors)


def test_a_diverging_member_is_cut_and_the_others_go_on(vectors):
    # the attack's factor may differ inside a batch; -1e38 overflows the mean: the aggregate is not finite
    specs = cells({"seed": 1, "attack": "empire(factor=1.1)"}, {"seed": 2, "attack": "empire(factor=-1e38)"},
                  {"seed": 3, "attack": "empire(factor=2)"}, gar="average")
    results = assert_identical(specs, vectors)
    assert [r.status for r in results] == ["completed", "diverged", "completed"]
    assert results[1].diverged_at == 1 and results[1].metrics.shape[0] == 1
    assert all(torch.isfinite(r.metrics[:, 0]).all() for r in (results[0], results[2]))


def test_checkpoints_and_progress(vectors):
    specs = seeds(1, 2, gar="mda", attack="little", epsilon=0.3)
    saved: dict[tuple[int, int], torch.Tensor] = {}
    ticks: list[int] = []
    batch = SeedBatch(specs, vectors, CPU)
    batch.run(progress=lambda done, acc: ticks.append(done),
              checkpoint=lambda i, step, row: saved.__setitem__((i, step), row.clone()),
              checkpoint_steps=frozenset({0, 25, 60}))
    assert ticks == list(range(1, 61))
    assert sorted(saved) == [(i, s) for i in (0, 1) for s in (0, 25, 60)]
    for i, spec in enumerate(specs):
        own: dict[int, torch.Tensor] = {}
        Simulation(spec, vectors, CPU).run(checkpoint=lambda step, theta: own.__setitem__(step, theta.clone()),
                                           checkpoint_steps=frozenset({0, 25, 60}))
        for step, theta in own.items():
            assert torch.equal(saved[(i, step)], theta)


def test_group_key_separates_structure_not_scalars():
    base = RunSpec.create(**BASE, gar="mda", attack="little(factor=1.5,negative=true)", epsilon=0.1)
    same = [dict(seed=9), dict(epsilon=0.7), dict(delta=1e-5), dict(clip=0.5), dict(lr=0.1), dict(momentum=0.5),
            dict(attack="little(factor=3,negative=true)")]
    for change in same:
        assert group_key(RunSpec.create(**{**base.to_dict(), **change})) == group_key(base), change
    different = [dict(gar="krum"), dict(epsilon=None), dict(batch_size=17), dict(steps=61), dict(partition="shards"),
                 dict(attack="little(factor=zmax,negative=true)"), dict(attack="little(factor=1.5)"),
                 dict(worker_momentum=0.5), dict(clip_mode="per-example"), dict(workers=9)]
    for change in different:
        assert group_key(RunSpec.create(**{**base.to_dict(), **change})) != group_key(base), change


def test_incompatible_cells_are_refused(vectors):
    with pytest.raises(UsageError, match="--batch"):
        SeedBatch(cells({"gar": "mda"}, {"gar": "krum"}), vectors, CPU)


# -- torch models: batched vmap gradients reorder float32 sums --------------------------------- #

#: Largest relative difference allowed between a member and its single run after 6 steps of the
#: batched ``vmap`` gradients (measured on the 2-core CPU: at most 3e-7 for the CNN and LeNet).
VMAP_RTOL = 1e-5


@pytest.mark.parametrize("model", ["cnn", "lenet"])
def test_torch_models_within_float_tolerance(images, model):
    specs = [RunSpec.create(dataset=IMAGES, model=model, workers=5, byzantine=1, batch_size=8, steps=6, eval_every=3,
                            gar="mda", attack="little(factor=1.5,negative=true)", epsilon=0.5, seed=s)
             for s in (1, 2, 3)]
    batch, results, singles = run_both(specs, images, strategy="vmap")
    for i, ((sim, single), got) in enumerate(zip(singles, results)):
        assert got.status == single.status == "completed"
        torch.testing.assert_close(got.metrics, single.metrics, rtol=VMAP_RTOL, atol=1e-9, equal_nan=True)
        torch.testing.assert_close(got.worker_norms, single.worker_norms, rtol=VMAP_RTOL, atol=1e-9)
        torch.testing.assert_close(batch.theta[i], sim.oracle.theta, rtol=VMAP_RTOL,
                                   atol=VMAP_RTOL * float(sim.oracle.theta.abs().max()))
        for step, (acc, loss) in single.evaluations.items():
            assert got.evaluations[step][0] == pytest.approx(acc, abs=1 / 64)  # one test example at most
            assert got.evaluations[step][1] == pytest.approx(loss, rel=VMAP_RTOL)
    assert not torch.equal(results[0].metrics, results[1].metrics)


def test_torch_model_loop_strategy_is_identical(images):
    # n = 7, f = 2: the rule shares the Gram matrix of the distinct rows, and the metrics come from it
    specs = [RunSpec.create(dataset=IMAGES, model="cnn", workers=7, byzantine=2, batch_size=8, steps=4, eval_every=2,
                            gar="mda", attack="little(factor=1.5,negative=true)", epsilon=0.5, seed=s) for s in (1, 2)]
    assert_identical(specs, images, strategy="loop")


# -- real data ------------------------------------------------------------------------------------ #

def _phishing_source() -> Path | None:
    given = os.environ.get("DPBR_PHISHING")
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "phishing-8404.libsvm.gz"
    src = Path(given) if given else shared
    return src if src.is_file() else None


@pytest.mark.slow
def test_phishing_seeds_equal_single_runs(tmp_path):
    """The study's logistic cell on the phishing data (``DPBR_PHISHING`` or the shared data folder beside
    the repository): 5 seeds, 300 steps, MDA against ALIE with ε = 0.1."""
    src = _phishing_source()
    if src is None:
        pytest.skip("phishing data not found: set DPBR_PHISHING to a phishing libsvm file")
    from dpbr.cli import main

    try:
        main(["data", "fetch", "phishing", "--from", str(src), "--data-dir", str(tmp_path)])
    except SystemExit as exc:
        assert not exc.code
    dataset = load("phishing", tmp_path, device=CPU)
    specs = [RunSpec.create(dataset="phishing", model="logit", workers=11, byzantine=5, batch_size=50, steps=300,
                            gar="mda", attack="little(factor=1.5,negative=true)", epsilon=0.1, seed=s)
             for s in range(1, 6)]
    assert_identical(specs, dataset)
