"""dpbr aggregate / dpbr plot: summaries over cells with known answers, offline charts, the CLI."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from dpbr.cli import main
from dpbr.io import write_parquet
from dpbr.privacy.spec import privacy_label
from dpbr.report.aggregate import (aggregate, curves_table, final_accuracy_table, find_cell_files, load_metrics,
                                   loss_window)
from dpbr.report.charts import plot, series_labels
from dpbr.report.layout import FIGURES, figure_group, figure_path, summary_paths
from dpbr.spec import RunSpec

SYNTH = "synthetic(d=68,classes=2)"


def cell_frame(spec: RunSpec, acc: dict[int, float], loss: list[float], status: str = "completed") -> pd.DataFrame:
    """A minimal ``dpbr train`` table: steps 0..len(loss), train_loss, evaluations at ``acc``'s steps."""
    n = len(loss)
    frame = pd.DataFrame({"step": np.arange(n + 1, dtype=np.int64)})
    frame["train_loss"] = [np.nan, *loss]
    frame["test_accuracy"] = [acc.get(s, np.nan) for s in range(n + 1)]
    frame["test_loss"] = [1 - acc[s] if s in acc else np.nan for s in range(n + 1)]
    frame["status"] = status
    for key, value in spec.columns().items():
        frame[key] = value
    return frame


def spec(**kw) -> RunSpec:
    base = dict(dataset=SYNTH, model="logit", steps=4, eval_every=2)
    return RunSpec.create(**{**base, **kw})


@pytest.fixture
def cells(tmp_path):
    """Three seeds of average/none b=10 (one diverged), one seed of mda/little ε=0.2 b=10."""
    frames = {
        "s1": cell_frame(spec(seed=1), {0: 0.5, 2: 0.7, 4: 0.8}, [1.0, 3.0, 5.0, 7.0]),
        "s2": cell_frame(spec(seed=2), {0: 0.5, 2: 0.6, 4: 0.9}, [2.0, 4.0, 6.0, 8.0]),
        "s3": cell_frame(spec(seed=3), {0: 0.5, 2: 0.4}, [1.0, math.inf], status="diverged").iloc[:3],
        "m1": cell_frame(spec(gar="mda", attack="little(factor=1.5,negative=true)", epsilon=0.2, seed=1),
                         {0: 0.5, 2: 0.55, 4: 0.6}, [9.0, 9.0, 9.0, 9.0]),
    }
    paths = {}
    for name, frame in frames.items():
        cid = frame["cell_id"].iloc[0]
        paths[name] = write_parquet(frame, tmp_path / "train" / f"{cid}.parquet")
    return tmp_path, paths


def test_privacy_labels():
    assert privacy_label(None, None) == "none"
    assert privacy_label(float("nan"), float("nan"), None) == "none"
    assert privacy_label(0.2, None) == "ε=0.2"
    assert privacy_label(None, 0.25) == "sparsify=0.25"
    assert privacy_label(0.5, 0.25, "uniform(bits=8)") == "ε=0.5 + sparsify=0.25 + quantize=uniform(bits=8)"


def test_final_accuracy_is_mean_and_sample_std_over_completed_seeds(cells):
    root, paths = cells
    final = final_accuracy_table(load_metrics(list(paths.values())))
    assert len(final) == 2
    avg = final[final["pair"] == "average/none"].iloc[0]
    # seeds 1, 2 completed with 0.8 and 0.9; seed 3 diverged: no final accuracy
    assert (avg["runs"], avg["completed"], avg["diverged"], avg["seeds"]) == (3, 2, 1, "1,2,3")
    assert avg["accuracy_mean"] == pytest.approx(0.85)
    assert avg["accuracy_std"] == pytest.approx(math.sqrt(((0.8 - 0.85) ** 2 + (0.9 - 0.85) ** 2) / 1))
    assert (avg["accuracy_min"], avg["accuracy_max"]) == pytest.approx((0.8, 0.9))
    assert avg["test_loss_mean"] == pytest.approx(0.15)
    assert avg["accuracy"] == "0.8500 ± 0.0707"
    assert avg["privacy"] == "none" and "seed=" not in avg["group_id"]
    mda = final[final["pair"] != "average/none"].iloc[0]
    assert mda["privacy"] == "ε=0.2" and mda["accuracy"] == "0.6000 (1 seed)" and math.isnan(mda["accuracy_std"])
    # ordering: privacy none before ε
    assert list(final["privacy"]) == ["none", "ε=0.2"]


def test_curves_average_over_seeds_and_loss_windows(cells):
    _, paths = cells
    curves = curves_table(load_metrics(list(paths.values())))
    avg = curves[curves["pair"] == "average/none"].set_index("step")
    # accuracy at step 2: seeds 0.7, 0.6, 0.4 (the diverged run counts until it diverged)
    assert avg.loc[2, "accuracy_mean"] == pytest.approx((0.7 + 0.6 + 0.4) / 3)
    assert avg.loc[2, "accuracy_n"] == 3 and avg.loc[4, "accuracy_n"] == 2
    assert avg.loc[4, "accuracy_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    # steps = 4 → window ⌈4/20⌉ = 1: the training loss per step, mean over seeds (inf dropped)
    assert loss_window(4) == 1 and loss_window(1000) == 50 and loss_window(21) == 2
    assert avg.loc[1, "train_loss_mean"] == pytest.approx((1.0 + 2.0 + 1.0) / 3)
    assert avg.loc[2, "train_loss_mean"] == pytest.approx((3.0 + 4.0) / 2) and avg.loc[2, "train_loss_n"] == 2
    assert math.isnan(avg.loc[0, "train_loss_mean"]) and avg.loc[0, "train_loss_n"] == 0


def test_loss_windows_average_within_each_run_first(tmp_path):
    s = spec(steps=40, eval_every=0)
    losses = [float(i) for i in range(1, 41)]
    write_parquet(cell_frame(s, {40: 0.9}, losses), tmp_path / "a.parquet")
    curves = curves_table(load_metrics([tmp_path / "a.parquet"])).set_index("step")
    # window 2: (0, 2] → mean(1, 2) = 1.5; (38, 40] → 39.5
    assert curves.loc[2, "train_loss_mean"] == pytest.approx(1.5)
    assert curves.loc[40, "train_loss_mean"] == pytest.approx(39.5)
    assert curves["train_loss_n"].max() == 1 and len(curves.dropna(subset=["train_loss_mean"])) == 20


def test_find_cell_files_skips_temporary_files_and_rejects_missing(cells, tmp_path):
    root, paths = cells
    (root / "train" / ".x.parquet.abc.tmp").write_text("half")
    (root / "train" / ".hidden.parquet").write_text("half")
    found = find_cell_files([root / "train", paths["s1"]])
    assert sorted(found) == sorted(paths.values())
    from dpbr.errors import UsageError

    with pytest.raises(UsageError, match="does not exist"):
        find_cell_files([root / "nope"])
    empty = root / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no cell files"):
        find_cell_files([empty])


def test_aggregate_writes_every_summary_and_the_csv_matches(cells):
    root, paths = cells
    written = aggregate(list(paths.values()), root / "summary")
    assert set(written) == {"metrics", "final", "final_csv", "curves", "selections"}
    metrics = pd.read_parquet(written["metrics"])
    assert len(metrics) == 5 + 5 + 3 + 5 and metrics["cell_id"].nunique() == 4
    final = pd.read_parquet(written["final"])
    csv = pd.read_csv(written["final_csv"])
    assert list(csv["accuracy"]) == list(final["accuracy"])
    assert not list(root.joinpath("summary").glob(".*"))


def test_plot_writes_offline_html_png_and_svg(cells):
    root, paths = cells
    aggregate(list(paths.values()), root / "summary")
    written = plot(root / "summary", root / "figures", formats=["html", "png", "svg"])
    group = figure_group(RunSpec.create(dataset=SYNTH, model="logit").dataset, "logit")
    assert sorted(written) == sorted(figure_path(root / "figures", group, f, fmt)
                                     for f in FIGURES for fmt in ("html", "png", "svg"))
    for path in written:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
        elif path.suffix == ".svg":
            assert b"<svg" in data[:200]
        else:
            text = data.decode()
            assert not re.search(r"<script[^>]+src=[\"']https?:", text), path
            assert "vega-lite" in text.lower() and len(text) > 100_000  # the library is inline
            assert "average/none" in text


def test_series_label_names_other_varying_parameters():
    frame = pd.DataFrame({"pair": ["mda/x", "mda/x", "avg/none"], "privacy": ["none"] * 3, "batch_size": [10] * 3,
                          "lr": [0.5, 2.0, 2.0], "steps": [100] * 3})
    assert list(series_labels(frame)) == ["mda/x · lr=0.5", "mda/x · lr=2.0", "avg/none · lr=2.0"]
    assert list(series_labels(frame.assign(lr=2.0))) == ["mda/x", "mda/x", "avg/none"]


def test_cli_aggregate_and_plot(cells, capsys):
    root, paths = cells
    listing = root / "files.txt"
    listing.write_text("\n".join(str(p) for p in list(paths.values())[:2]) + "\n\n")
    main(["aggregate", "--files-from", str(listing), "--out-dir", str(root / "s")])
    assert pd.read_parquet(summary_paths(root / "s")["metrics"])["cell_id"].nunique() == 2
    main(["plot", "--summary-dir", str(root / "s"), "--out-dir", str(root / "f"), "--formats", "svg", "--quiet"])
    assert len(list((root / "f").rglob("*.svg"))) == len(FIGURES)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["aggregate", "no/such/dir"], "dpbr: error: PATHS: 'no/such/dir' does not exist"),
        (["plot", "--summary-dir", "no/such/dir"], "dpbr: error: --summary-dir: "),
        (["plot", "--formats", "pdf"], "dpbr: error: --formats: unknown format 'pdf'; allowed: html, png, svg"),
    ],
)
def test_cli_errors_are_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(fragment) and "\n" not in err
