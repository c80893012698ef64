"""Heterogeneity made visible: the honest workers' dissimilarity, every row's norm and the rule's selection
per step, and the selection counts of ``dpbr aggregate`` (Karimireddy, He & Jaggi 2022, "Byzantine-robust
learning on heterogeneous datasets via bucketing", arXiv 2006.09365).

Known answers come from plain torch/numpy written here: a logistic run whose two honest workers each hold
copies of one example (so every mini-batch gradient is a closed form of θ, followed step by step in
float64 here), hand-made masks fed to the aggregation, and norms of random rows.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dpbr.data import load
from dpbr.data.dataset import Dataset
from dpbr.io import write_parquet
from dpbr.jobs.train import records_frame
from dpbr.linalg import GRAM_BLOCK
from dpbr.report.aggregate import aggregate, load_metrics, selections_table
from dpbr.simulation import SeedBatch, Simulation
from dpbr.simulation.metrics import copies_norms, distinct_gram, honest_dissimilarity, worker_norms
from dpbr.spec import RunSpec

CPU = torch.device("cpu")
VECTORS = "synthetic(classes=2,d=20,n=200,n_test=40)"
A = [1.0, -2.0, 0.5]   # the one example of class 0
B = [-0.5, 1.5, 2.0]   # the one example of class 1


def two_point_dataset(per_class: int = 4) -> Dataset:
    """``per_class`` copies of ``A`` (label 0) and of ``B`` (label 1), interleaved; no normalisation."""
    x = torch.tensor([A, B] * per_class, dtype=torch.float32)
    y = torch.tensor([0, 1] * per_class, dtype=torch.int64)
    return Dataset(name="two-points", x_train=x, y_train=y, x_test=x[:4].clone(), y_test=y[:4].clone(), num_classes=2,
                   input_shape=(3,), mean=(0.0,), std=(1.0,), source="test", checksum="")


def reference_gradient(theta: torch.Tensor, x: list[float], y: float) -> torch.Tensor:
    """``∇_θ (σ(w·x + c) − y)²`` at ``θ = (w, c)`` in float64 (plain autograd)."""
    t = theta.detach().double().clone().requires_grad_(True)
    p = torch.sigmoid(t[:3] @ torch.tensor(x, dtype=torch.float64) + t[3])
    ((p - y) ** 2).backward()
    return t.grad.detach()


# ----------------------------------------------------------------------------------------------- #
# Known answers on a real run


def test_dissimilarity_and_norms_follow_the_closed_form_trajectory():
    """Shards put worker 0 on ``A`` and worker 1 on ``B``: ``g_0 = ∇ℓ(θ; A, 0)``, ``g_1 = ∇ℓ(θ; B, 1)``
    whatever the mini-batch; the attack sends ``−3ḡ``; the average is ``(g_0 + g_1 − 3ḡ)/3 = −ḡ/3``;
    the server's SGD with momentum is followed here in float64 for 55 steps (a window of 50 and 5;
    measured: dpbr's float32 run within 1.3e-6 relative, swapping the two workers' norms is off by 0.76)."""
    spec = RunSpec.create(dataset="synthetic(classes=2,d=3,n=8,n_test=4)", model="logit", gar="average",
                          attack="sign-flip(scale=3)", workers=3, byzantine=1, byzantine_real=1, batch_size=2,
                          steps=55, lr=0.1, momentum=0.5, clip=None, partition="shards", eval_every=0, seed=5)
    sim = Simulation(spec, two_point_dataset(), CPU)
    result = sim.run()
    assert result.status == "completed" and result.selected is None
    theta, m = sim.theta0.double().clone(), torch.zeros(4, dtype=torch.float64)
    norms, dissimilarity, ratio = [], [], []
    for _ in range(spec.steps):
        g0, g1 = reference_gradient(theta, A, 0.0), reference_gradient(theta, B, 1.0)
        mean = (g0 + g1) / 2
        norms.append([float(g0.norm()), float(g1.norm()), 3 * float(mean.norm())])
        dissimilarity.append(float(((g0 - mean).norm() ** 2 + (g1 - mean).norm() ** 2) / 2))
        ratio.append(dissimilarity[-1] / float(mean.norm()) ** 2)
        m = 0.5 * m + (g0 + g1 - 3 * mean) / 3
        theta = theta - 0.1 * m
    assert result.worker_norms.shape == (55, 3) and result.worker_norms.dtype == torch.float64
    np.testing.assert_allclose(result.worker_norms.numpy(), np.array(norms), rtol=1e-5)
    frame = records_frame(spec, result, {"honest_workers": sim.h})
    assert math.isnan(frame["honest_dissimilarity"].iloc[0]) and pd.isna(frame["worker_norms"].iloc[0])
    np.testing.assert_allclose(frame["honest_dissimilarity"].to_numpy()[1:], dissimilarity, rtol=1e-5)
    np.testing.assert_allclose(frame["dissimilarity_ratio"].to_numpy()[1:], ratio, rtol=1e-5)
    np.testing.assert_allclose(np.stack(frame["worker_norms"].iloc[1:].to_numpy()), np.array(norms), rtol=1e-5)
    assert frame["selected_workers"].isna().all()  # the average selects nothing


def _list_of(kind: pa.DataType) -> pa.DataType | None:
    """The item type of an Arrow list type (None for another type)."""
    return kind.value_type if pa.types.is_list(kind) else None


def test_the_columns_reach_the_parquet_file_with_their_types(tmp_path):
    spec = RunSpec.create(dataset=VECTORS, model="logit", gar="krum", attack="sign-flip(scale=100)", workers=7,
                          byzantine=2, byzantine_real=2, batch_size=8, steps=6, eval_every=3, seed=2)
    result = Simulation(spec, load(VECTORS, tmp_path / "data", device=CPU), CPU).run()
    path = write_parquet(records_frame(spec, result, {"honest_workers": 5}), tmp_path / "cell.parquet")
    schema = pq.read_schema(path)
    assert _list_of(schema.field("worker_norms").type) == pa.float64()
    assert _list_of(schema.field("selected_workers").type) == pa.bool_()
    assert schema.field("honest_dissimilarity").type == schema.field("dissimilarity_ratio").type == pa.float64()
    back = pd.read_parquet(path)
    assert pd.isna(back["worker_norms"].iloc[0]) and pd.isna(back["selected_workers"].iloc[0])
    assert [len(v) for v in back["worker_norms"].iloc[1:]] == [7] * 6
    assert [list(v) for v in back["selected_workers"].iloc[1:]] == result.selected.tolist()
    # a rule that does not select: the column is all null
    plain = RunSpec.create(**{**spec.to_dict(), "gar": "median"})
    result = Simulation(plain, load(VECTORS, tmp_path / "data", device=CPU), CPU).run()
    path = write_parquet(records_frame(plain, result, {"honest_workers": 5}), tmp_path / "plain.parquet")
    assert pd.read_parquet(path)["selected_workers"].isna().all()
    assert pd.read_parquet(path)["worker_norms"].iloc[1:].notna().all()


@pytest.mark.parametrize("partition", ["iid", "shards"])
def test_krum_never_selects_far_away_byzantine_rows(tmp_path, partition):
    """Krum picks one row a step; rows sent 100 times the honest mean's norm away are never picked."""
    data = load(VECTORS, tmp_path / "data", device=CPU)
    spec = RunSpec.create(dataset=VECTORS, model="logit", gar="krum", attack="sign-flip(scale=100)", workers=7,
                          byzantine=2, byzantine_real=2, batch_size=8, steps=60, eval_every=0, seed=3,
                          partition=partition)
    result = Simulation(spec, data, CPU).run()
    chosen = result.selected.numpy()
    assert chosen.shape == (60, 7) and chosen.dtype == bool
    assert (chosen.sum(1) == 1).all() and not chosen[:, 5:].any()
    honest_sent = result.worker_norms.numpy()[:, :5]
    # the Byzantine rows are copies of −100ḡ: their norms are 100‖ḡ‖ (‖ḡ‖ is the honest_norm column)
    byz = result.worker_norms.numpy()[:, 5:]
    honest_norm = result.metrics.numpy()[:, 1]
    np.testing.assert_allclose(byz, 100 * honest_norm[:, None] * np.ones((1, 2)), rtol=1e-5)
    assert (honest_sent < byz.min(1, keepdims=True)).all()
    frame = records_frame(spec, result, {"honest_workers": 5})
    write_parquet(frame, tmp_path / "train" / "a.parquet")
    table = pd.read_parquet(aggregate([tmp_path / "train" / "a.parquet"], tmp_path / "summary")["selections"])
    assert list(table["worker"]) == list(range(7))
    assert list(table["byzantine"]) == [False] * 5 + [True] * 2
    assert list(table["selected_steps"]) == [int(c) for c in chosen.sum(0)]
    assert table["selected_steps"].iloc[5:].sum() == 0 and table["selected_steps"].sum() == 60
    assert (table["steps"] == 60).all()
    np.testing.assert_allclose(table["selected_share"], chosen.sum(0) / 60)
    assert set(table["gar"]) == {"krum"} and set(table["partition"]) == {partition}
    assert set(table["seed"]) == {3} and set(table["batch_size"]) == {8}


def test_a_selecting_rule_without_byzantine_workers_records_its_selection(tmp_path):
    data = load(VECTORS, tmp_path / "data", device=CPU)
    spec = RunSpec.create(dataset=VECTORS, model="logit", gar="krum", attack="none", workers=7, byzantine=2,
                          byzantine_real=0, batch_size=8, steps=12, eval_every=0, seed=1)
    result = Simulation(spec, data, CPU).run()
    assert result.selected.shape == (12, 7) and (result.selected.sum(1) == 1).all()
    assert np.isnan(result.metrics.numpy()[:, -1]).all()  # byzantine_selected: no Byzantine rows


def test_bucketed_krum_selects_whole_buckets(tmp_path):
    """bucketing(s=2)+krum with n = 9: Krum picks one of ⌈9/2⌉ = 5 buckets, the mask its 1 or 2 rows."""
    data = load(VECTORS, tmp_path / "data", device=CPU)
    spec = RunSpec.create(dataset=VECTORS, model="logit", gar="bucketing(s=2)+krum", attack="sign-flip(scale=100)",
                          workers=9, byzantine=1, byzantine_real=1, batch_size=8, steps=20, eval_every=0, seed=1)
    chosen = Simulation(spec, data, CPU).run().selected.numpy()
    assert chosen.shape == (20, 9) and set(chosen.sum(1)) <= {1, 2} and 2 in set(chosen.sum(1))


# ----------------------------------------------------------------------------------------------- #
# The batched engine


@pytest.mark.parametrize("options", [
    dict(gar="krum", attack="sign-flip(scale=100)", partition="shards"),
    dict(gar="bucketing(s=2)+krum", attack="little", workers=9, byzantine=1, byzantine_real=1),
    dict(gar="average", attack="none", byzantine_real=0),
])
def test_batched_members_equal_single_runs_for_the_new_columns(tmp_path, options):
    data = load(VECTORS, tmp_path / "data", device=CPU)
    base = dict(dataset=VECTORS, model="logit", workers=7, byzantine=2, byzantine_real=2, batch_size=8, steps=55,
                eval_every=0)
    specs = [RunSpec.create(**{**base, **options, "seed": s}) for s in (1, 2)]
    batched = SeedBatch(specs, data, CPU).run()
    for spec, got in zip(specs, batched):
        single = Simulation(spec, data, CPU).run()
        assert torch.equal(got.worker_norms, single.worker_norms)
        assert (got.selected is None) == (single.selected is None)
        assert got.selected is None or torch.equal(got.selected, single.selected)
        a = records_frame(spec, got, {"honest_workers": spec.honest})
        b = records_frame(spec, single, {"honest_workers": spec.honest})
        for col in ("honest_dissimilarity", "dissimilarity_ratio"):
            np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy())


def test_gram_path_norms_agree_with_the_recorded_spread(tmp_path):
    """A CNN with MDA against copies (the metrics from the Gram matrix of the distinct rows): the rows'
    norms satisfy ``Σ_i ‖g_i‖² = h‖ḡ‖² + (h − 1)·deviation²`` and the copies share one norm."""
    images = "synthetic(n=160,n_test=20,size=16)"
    spec = RunSpec.create(dataset=images, model="cnn", workers=7, byzantine=2, byzantine_real=2, batch_size=8,
                          steps=3, eval_every=0, gar="mda", attack="little(factor=1.5,negative=true)", seed=1)
    result = Simulation(spec, load(images, tmp_path / "data", device=CPU), CPU, strategy="loop").run()
    norms, metrics = result.worker_norms.numpy(), result.metrics.numpy()
    h = 5
    expected = h * metrics[:, 1] ** 2 + (h - 1) * metrics[:, 2] ** 2
    np.testing.assert_allclose((norms[:, :h] ** 2).sum(1), expected, rtol=1e-5)
    assert (norms[:, 5] == norms[:, 6]).all()
    assert result.selected.shape == (3, 7) and (result.selected.sum(1) == 7 - 2).all()  # MDA keeps n − f rows


# ----------------------------------------------------------------------------------------------- #
# The helpers on hand-made inputs


def test_dissimilarity_from_deviation_and_norm():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 40))
    mean = g.mean(0)
    spread = ((g - mean) ** 2).sum()
    deviation = math.sqrt(spread / 5)                 # the honest_deviation_clean column's definition
    diss, ratio = honest_dissimilarity(np.array([deviation, np.nan]), np.array([np.linalg.norm(mean), 1.0]), 6)
    assert diss[0] == pytest.approx(spread / 6, rel=1e-12)
    assert ratio[0] == pytest.approx(spread / 6 / (mean @ mean), rel=1e-12)
    assert np.isnan(diss[1]) and np.isnan(ratio[1])
    diss, ratio = honest_dissimilarity(np.array([2.0]), np.array([4.0]), 5)
    assert diss[0] == pytest.approx(3.2) and ratio[0] == pytest.approx(0.2)
    diss, ratio = honest_dissimilarity(np.array([np.nan]), np.array([2.0]), 1)  # one worker: no spread
    assert diss[0] == 0.0 and ratio[0] == 0.0


@pytest.mark.parametrize("d", [69, GRAM_BLOCK, 3 * GRAM_BLOCK + 17])
def test_worker_norms_match_float64(d):
    gen = torch.Generator().manual_seed(d)
    rows = torch.randn(3, 5, d, generator=gen) * torch.tensor([1.0, 1e-3, 10.0, 1.0, 1e3]).view(1, 5, 1)
    rows[1, 4] = math.inf
    got = worker_norms(rows)
    assert got.dtype == torch.float64 and got.shape == (3, 5)
    expected = np.linalg.norm(rows.double().numpy(), axis=2)
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-7)


def test_copies_norms_from_the_distinct_gram_matrix():
    gen = torch.Generator().manual_seed(1)
    distinct = torch.randn(4, 5000, generator=gen)        # h = 3 honest rows and the copied row
    stack = torch.cat([distinct, distinct[3:].expand(2, -1)])  # n = 6
    got = copies_norms(distinct_gram(stack, 3), 6)
    expected = np.linalg.norm(stack.double().numpy(), axis=1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7)


# ----------------------------------------------------------------------------------------------- #
# dpbr aggregate: selections.parquet


def _cell(spec: RunSpec, steps: int, masks: list[list[bool]] | None, *, columns: bool = True,
          status: str = "completed") -> pd.DataFrame:
    """A minimal cell file: ``steps + 1`` rows, the selection ``masks`` (one per step) when given."""
    frame = pd.DataFrame({"step": np.arange(steps + 1, dtype=np.int64)})
    frame["train_loss"] = [np.nan, *([1.0] * steps)]
    frame["test_accuracy"] = [0.5] + [np.nan] * (steps - 1) + [0.75]
    frame["test_loss"] = [1.0] + [np.nan] * (steps - 1) + [0.5]
    frame["status"] = status
    if columns:
        frame["honest_dissimilarity"] = [np.nan, *([0.25] * steps)]
        frame["honest_workers"] = spec.honest
        frame["selected_workers"] = [None] + (list(masks) if masks is not None else [None] * steps)
    for key, value in spec.columns().items():
        frame[key] = value
    return frame


SYNTH = "synthetic(d=68,classes=2)"


def _spec(**kw) -> RunSpec:
    return RunSpec.create(**{**dict(dataset=SYNTH, model="logit", workers=5, byzantine=1, attack="little", steps=3,
                                    eval_every=3), **kw})


def test_selection_counts_of_hand_made_cells(tmp_path):
    T, F = True, False
    frames = [
        _cell(_spec(gar="mda", seed=1), 3, [[T, T, F, T, F], [T, F, T, T, F], [F, T, T, T, T]]),
        _cell(_spec(gar="mda", seed=2), 3, [[T, T, T, T, F], [T, T, T, F, T], [F, T, T, T, T]]),
        _cell(_spec(gar="krum", seed=1, partition="shards"), 3, [[F, F, T, F, F], [F, F, F, F, T], [F, F, T, F, F]]),
        _cell(_spec(gar="krum", seed=2, partition="shards"), 3,  # diverged after 2 steps
              [[T, F, F, F, F], [F, T, F, F, F], [T, T, T, T, T]], status="diverged").iloc[:3],
        _cell(_spec(gar="average", seed=1), 3, None),                  # selects nothing: no rows
        _cell(_spec(gar="median", seed=1), 3, None, columns=False),    # a file from before the columns
    ]
    files = [write_parquet(f, tmp_path / "train" / f"{i}.parquet") for i, f in enumerate(frames)]
    written = aggregate(files, tmp_path / "summary")
    table = pd.read_parquet(written["selections"])
    assert len(table) == 4 * 5
    expected = {  # (gar, seed) → selected_steps per worker, steps
        ("mda", 1): ([2, 2, 2, 3, 1], 3), ("mda", 2): ([2, 3, 3, 2, 2], 3),
        ("krum", 1): ([0, 0, 2, 0, 1], 3), ("krum", 2): ([1, 1, 0, 0, 0], 2),
    }
    for (gar, seed), (counts, steps) in expected.items():
        rows = table[(table["gar"] == gar) & (table["seed"] == seed)].sort_values("worker")
        assert list(rows["worker"]) == [0, 1, 2, 3, 4]
        assert list(rows["byzantine"]) == [False, False, False, False, True]
        assert list(rows["selected_steps"]) == counts
        assert list(rows["steps"]) == [steps] * 5
        np.testing.assert_allclose(rows["selected_share"], np.array(counts) / steps)
    assert set(table.loc[table["gar"] == "krum", "partition"]) == {"shards"}
    assert {"cell_id", "group_id", "attack", "batch_size", "epsilon", "privacy", "pair"} <= set(table.columns)
    assert table["worker"].dtype == np.int64 and table["byzantine"].dtype == bool
    assert set(table["byzantine_declared"]) == {1} and set(table["byzantine_real"]) == {1}
    # the old file aggregates: its new columns are null, its metrics rows are there
    metrics = pd.read_parquet(written["metrics"])
    old = metrics[metrics["gar"] == "median"]
    assert len(old) == 4 and old["honest_dissimilarity"].isna().all() and old["selected_workers"].isna().all()
    assert len(pd.read_parquet(written["final"])) == 4  # mda, krum/shards, average, median


def test_no_selecting_rule_gives_an_empty_table_with_the_columns(tmp_path):
    frames = [_cell(_spec(gar="average", seed=1), 3, None), _cell(_spec(gar="median", seed=2), 3, None, columns=False)]
    files = [write_parquet(f, tmp_path / "train" / f"{i}.parquet") for i, f in enumerate(frames)]
    table = pd.read_parquet(aggregate(files, tmp_path / "summary")["selections"])
    assert len(table) == 0
    assert {"gar", "attack", "partition", "batch_size", "seed", "worker", "byzantine", "selected_steps", "steps",
            "selected_share"} <= set(table.columns)
    old_only = [write_parquet(frames[1], tmp_path / "old" / "0.parquet")]
    assert len(selections_table(load_metrics(old_only))) == 0
