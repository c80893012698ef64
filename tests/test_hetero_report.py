"""dpbr hetero-report: the bucketing paper's table (last-5 mean over seeds), its figures and the selection
shares, on hand-made cells with answers computed here with plain numpy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dpbr.cli import main
from dpbr.io import write_parquet
from dpbr.report.aggregate import aggregate
from dpbr.report.hetero_report import (FIGURES, SUMMARY_FILES, applies, bucketing_table, hetero_report,
                                       markdown_tables, selection_shares, split_bucketing)
from dpbr.spec import RunSpec

SYNTH = "synthetic(d=68,classes=2)"
MIMIC = "mimic(target=auto)"


def spec(**kw) -> RunSpec:
    base = dict(dataset=SYNTH, model="logit", workers=11, byzantine=2, attack=MIMIC, steps=60, eval_every=10)
    return RunSpec.create(**{**base, **kw})


def cell_frame(s: RunSpec, accuracies: list[float]) -> pd.DataFrame:
    """A ``dpbr train`` table with evaluations at steps 0, 10, …, 60 (``accuracies``, 7 values)."""
    frame = pd.DataFrame({"step": np.arange(s.steps + 1, dtype=np.int64)})
    evals = dict(zip(range(0, s.steps + 1, s.eval_every), accuracies))
    frame["train_loss"] = [np.nan, *[1.0] * s.steps]
    frame["test_accuracy"] = [evals.get(k, np.nan) for k in frame["step"]]
    frame["test_loss"] = [1 - evals[k] if k in evals else np.nan for k in frame["step"]]
    frame["status"] = "completed"
    for key, value in s.columns().items():
        frame[key] = value
    return frame


def curve(start: float, slope: float) -> list[float]:
    return [start + slope * k for k in range(7)]


#: (gar, partition) → accuracies per seed 0 and 1 (7 evaluations each)
RUNS = {
    ("median", "iid"): (curve(0.50, 0.05), curve(0.52, 0.05)),
    ("bucketing(s=2)+median", "iid"): (curve(0.55, 0.05), curve(0.53, 0.06)),
    ("median", "shards"): (curve(0.20, 0.03), curve(0.10, 0.05)),
    ("bucketing(s=2)+median", "shards"): (curve(0.40, 0.04), curve(0.30, 0.06)),
}


def expected(gar: str, partition: str) -> tuple[float, float]:
    """Mean and sample std over the seeds of each run's mean over its last 5 evaluations."""
    per_run = [np.mean(acc[-5:]) for acc in RUNS[(gar, partition)]]
    return float(np.mean(per_run)), float(np.std(per_run, ddof=1))


@pytest.fixture
def summary(tmp_path):
    files = []
    for (gar, partition), seeds in RUNS.items():
        for seed, acc in enumerate(seeds):
            s = spec(gar=gar, partition=partition, seed=seed)
            files.append(write_parquet(cell_frame(s, acc), tmp_path / "train" / f"{s.cell_id()}.parquet"))
    aggregate(files, tmp_path / "summary")
    return tmp_path


def test_split_bucketing_and_when_the_report_applies():
    assert split_bucketing("bucketing(s=2)+krum") == ("krum", 2)
    assert split_bucketing("bucketing(s=5)+centered-clipping(tau=20)") == ("centered-clipping(tau=20)", 5)
    assert split_bucketing("krum") == ("krum", 0)
    assert split_bucketing("nnm+mda") == ("nnm+mda", 0)
    iid = spec(gar="median")
    assert not applies([iid])
    assert applies([iid, spec(gar="median", partition="shards")])
    assert applies([spec(gar="bucketing(s=2)+median")])
    assert not applies([])


def test_table_is_the_last_five_mean_over_seeds(summary):
    final = pd.read_parquet(summary / "summary" / "final_accuracy.parquet")
    table = bucketing_table(final)
    assert len(table) == 4 and set(table["setting"]) == {"all cells"}  # nothing but rule and partition varies
    assert list(zip(table["rule"], table["partition"], table["s"])) == [
        ("median", "iid", 0), ("median", "iid", 2), ("median", "shards", 0), ("median", "shards", 2)]
    for row in table.itertuples():
        gar = "median" if row.s == 0 else "bucketing(s=2)+median"
        mean, std = expected(gar, row.partition)
        assert row.accuracy_mean == pytest.approx(mean) and row.accuracy_std == pytest.approx(std)
        assert row.accuracy == f"{100 * mean:.1f} ± {100 * std:.1f}"
        assert row.paper_rule == "CM" and row.completed == 2 and row.seeds == "0,1"
    # e.g. median on shards: seed 0 → mean(0.26, 0.29, 0.32, 0.35, 0.38) = 0.32, seed 1 → 0.30; mean 0.31
    assert expected("median", "shards")[0] == pytest.approx(0.31)


def test_markdown_lays_out_rule_rows_and_partition_by_s_columns(summary):
    final = pd.read_parquet(summary / "summary" / "final_accuracy.parquet")
    md = markdown_tables(bucketing_table(final))
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert lines[0] == ("| rule | IID, s = 0 | IID, s = 2 | non-IID (label shards), s = 0 | "
                        "non-IID (label shards), s = 2 |")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "median (CM)"
    order = [("median", "iid"), ("bucketing(s=2)+median", "iid"),
             ("median", "shards"), ("bucketing(s=2)+median", "shards")]
    assert cells[1:] == [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in (expected(*k) for k in order)]


def test_settings_split_the_table_by_the_other_varying_parameters(summary, tmp_path):
    final = pd.read_parquet(summary / "summary" / "final_accuracy.parquet")
    other = final.assign(attack="label-flip", worker_momentum=0.9)
    table = bucketing_table(pd.concat([final, other], ignore_index=True))
    assert set(table["setting"]) == {"attack=mimic(target=auto) · β=0", "attack=label-flip · β=0.9"}
    assert markdown_tables(table).count("**attack=") == 2


def test_selection_shares_weigh_seeds_by_their_steps_and_drop_non_selecting_rules():
    rows = []
    # krum, 2 seeds: worker 3 is Byzantine; seed 0 ran 10 steps, seed 1 ran 30
    picks = {0: {0: 2, 1: 0, 2: 0, 3: 8}, 1: {0: 6, 1: 3, 2: 3, 3: 18}}
    for seed, steps in ((0, 10), (1, 30)):
        for worker in range(4):
            n = picks[seed][worker]
            rows.append({"gar": "krum", "attack": MIMIC, "partition": "shards", "seed": seed, "worker": worker,
                         "byzantine": worker == 3, "selected_steps": n, "steps": steps, "selected_share": n / steps})
    for worker in range(4):  # a rule that never selects
        rows.append({"gar": "median", "attack": MIMIC, "partition": "shards", "seed": 0, "worker": worker,
                     "byzantine": worker == 3, "selected_steps": 0, "steps": 10, "selected_share": 0.0})
    shares = selection_shares(pd.DataFrame(rows))
    assert set(shares["gar"]) == {"krum"} and list(shares["worker"]) == [0, 1, 2, 3]
    assert list(shares["share"]) == pytest.approx([8 / 40, 3 / 40, 3 / 40, 26 / 40])
    assert list(shares["byzantine"]) == [False, False, False, True] and set(shares["runs"]) == {2}


def test_report_writes_tables_and_figures_and_notes_missing_selections(summary):
    out = summary / "figures" / "hetero"
    written = hetero_report(summary / "summary", out, formats=["svg", "html"])
    names = {p.name for p in written}
    assert names == {*SUMMARY_FILES.values(), *(f"{f}.{fmt}" for f in FIGURES for fmt in ("svg", "html"))}
    csv = pd.read_csv(summary / "summary" / SUMMARY_FILES["table_csv"])
    assert len(csv) == 4
    assert "<svg" in (out / "accuracy_by_attack.svg").read_text()[:300]
    # median selects nothing: dpbr aggregate's selections table is empty, the figure says so
    assert "No rule of this grid selects" in (out / "selections.html").read_text()
    (summary / "summary" / "selections.parquet").unlink()  # a summary written before selection counts
    hetero_report(summary / "summary", out, formats=["html"])
    text = (out / "selections.html").read_text()
    assert "selections.parquet' is missing" in text


def test_report_draws_selections_when_the_summary_has_them(summary):
    rows = [{"gar": "median", "attack": MIMIC, "partition": "iid", "seed": 0, "worker": w, "byzantine": w >= 9,
             "selected_steps": 60, "steps": 60, "selected_share": 1.0} for w in range(11)]
    write_parquet(pd.DataFrame(rows), summary / "summary" / "selections.parquet")
    hetero_report(summary / "summary", summary / "fig", formats=["html"])
    text = (summary / "fig" / "selections.html").read_text()
    assert "is missing:" not in text and "No rule of this grid" not in text and "share of steps selected" in text


def test_cli_hetero_report_and_its_one_line_error(summary, capsys, tmp_path):
    main(["hetero-report", "--summary-dir", str(summary / "summary"), "--out-dir", str(tmp_path / "h"),
          "--formats", "svg", "--quiet"])
    assert len(list((tmp_path / "h").glob("*.svg"))) == len(FIGURES)
    with pytest.raises(SystemExit) as info:
        main(["hetero-report", "--summary-dir", str(tmp_path / "nothing")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpbr: error: --summary-dir: ") and "\n" not in err


def test_train_help_lists_every_model_and_partition(capsys):
    try:
        main(["train", "--help"])
    except SystemExit as exc:  # click may end --help with an exit
        assert not exc.code
    text = " ".join(capsys.readouterr().out.split())
    for name in ("logit", "cnn", "lenet", "resnet", "mnist-example(width=1)", "iid", "shards", "dirichlet", "longtail"):
        assert name in text, name
