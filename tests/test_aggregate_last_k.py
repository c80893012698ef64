"""The last-k evaluation mean of ``dpbr aggregate`` (the table value of Karimireddy, He & Jaggi, arXiv 2006.09365)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dpbr.io import write_parquet
from dpbr.report.aggregate import LAST_K, aggregate, final_accuracy_table, load_metrics, run_table
from dpbr.spec import RunSpec

SYNTH = "synthetic(d=68,classes=2)"


def _cell(spec: RunSpec, accs: list[float], status: str = "completed") -> pd.DataFrame:
    """A hand-made cell table: evaluations at steps 0, 2, 4, … with accuracies ``accs``."""
    steps = 2 * (len(accs) - 1)
    frame = pd.DataFrame({"step": np.arange(steps + 1, dtype=np.int64)})
    frame["train_loss"] = [np.nan] + [1.0] * steps
    acc = {2 * i: a for i, a in enumerate(accs)}
    frame["test_accuracy"] = [acc.get(s, np.nan) for s in range(steps + 1)]
    frame["test_loss"] = [1 - acc[s] if s in acc else np.nan for s in range(steps + 1)]
    frame["status"] = status
    for key, value in spec.columns().items():
        frame[key] = value
    return frame


def _spec(**kw) -> RunSpec:
    return RunSpec.create(**{**dict(dataset=SYNTH, model="logit", steps=14, eval_every=2), **kw})


@pytest.fixture
def files(tmp_path):
    frames = [
        _cell(_spec(seed=0), [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]),
        _cell(_spec(seed=1), [0.1, 0.1, 0.1, 0.5, 0.6, 0.7, 0.8, 1.0]),
        _cell(_spec(seed=2), [0.1, 0.3, 0.2], status="diverged").iloc[:5],
        _cell(_spec(gar="median", steps=4, seed=0), [0.2, 0.4, 0.9]),  # fewer evaluations than k
    ]
    out = []
    for frame in frames:
        out.append(write_parquet(frame, tmp_path / "train" / f"{frame['cell_id'].iloc[0]}.parquet"))
    return out


def test_last_k_default_is_the_papers_five():
    assert LAST_K == 5


def test_run_table_means_the_last_k_evaluations(files):
    runs = run_table(load_metrics(files)).set_index(["gar", "seed"])
    assert runs.loc[("average", 0), "last_k_accuracy"] == pytest.approx((0.4 + 0.5 + 0.6 + 0.7 + 0.8) / 5)
    assert runs.loc[("average", 1), "last_k_accuracy"] == pytest.approx((0.5 + 0.6 + 0.7 + 0.8 + 1.0) / 5)
    assert runs.loc[("average", 0), "last_k_evals"] == 5
    assert math.isnan(runs.loc[("average", 2), "last_k_accuracy"])  # diverged: no table value
    assert runs.loc[("median", 0), "last_k_accuracy"] == pytest.approx((0.2 + 0.4 + 0.9) / 3)
    assert runs.loc[("median", 0), "last_k_evals"] == 3
    two = run_table(load_metrics(files), last_k=2).set_index(["gar", "seed"])
    assert two.loc[("average", 1), "last_k_accuracy"] == pytest.approx(0.9)
    # the final accuracy is unchanged: the last evaluation
    assert runs.loc[("average", 1), "final_accuracy"] == pytest.approx(1.0)


def test_final_table_carries_mean_and_std_over_seeds(files):
    final = final_accuracy_table(load_metrics(files)).set_index("gar")
    avg = final.loc["average"]
    per_seed = [0.6, 0.72]
    assert avg["last_k"] == 5
    assert avg["last_k_accuracy_mean"] == pytest.approx(0.66)
    assert avg["last_k_accuracy_std"] == pytest.approx(math.sqrt(2 * 0.06**2))  # ddof 1
    assert avg["last_k_accuracy_std"] == pytest.approx(float(np.std(per_seed, ddof=1)))
    assert avg["last_k_accuracy"] == "0.6600 ± 0.0849"
    assert avg["accuracy_mean"] == pytest.approx(0.9)  # last evaluations 0.8 and 1.0
    assert final.loc["median", "last_k_accuracy"] == "0.5000 (1 seed)"
    with pytest.raises(ValueError, match="last_k must be a positive integer"):
        final_accuracy_table(load_metrics(files), last_k=0)


def test_aggregate_writes_the_column_to_parquet_and_csv(files, tmp_path):
    written = aggregate(files, tmp_path / "summary", last_k=3)
    final = pd.read_parquet(written["final"]).set_index("gar")
    assert final.loc["average", "last_k"] == 3
    assert final.loc["average", "last_k_accuracy_mean"] == pytest.approx(((0.6 + 0.7 + 0.8) + (0.7 + 0.8 + 1.0)) / 6)
    csv = pd.read_csv(written["final_csv"])
    assert {"last_k", "last_k_accuracy_mean", "last_k_accuracy_std", "last_k_accuracy"} <= set(csv.columns)
