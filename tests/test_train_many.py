"""Several cells in one process: `dpbr train --seed 1-5` and `dpbr train-many CELLS.yaml` (fast).

Each cell's file must equal the file `dpbr train` writes for that cell alone (same spec and seed →
same rows), and every user error is one line naming the option or the cell, exit code 2, nothing
written.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from dpbr.cli import main
from dpbr.errors import UsageError
from dpbr.io import read_metadata
from dpbr.jobs.bundles import MAX_SEEDS, parse_seeds

VECTORS = "synthetic(classes=2,d=68,n=512,n_test=128)"
BASE = {"dataset": VECTORS, "model": "logit", "workers": 7, "byzantine": 2, "batch-size": 16, "steps": 12,
        "eval-every": 4, "gar": "mda", "attack": "little(factor=1.5,negative=true)", "epsilon": 0.5}
#: Metadata that legitimately differs between two runs of the same cell.
VOLATILE = {"wall_seconds", "argv", "created", "created_at", "timestamp"}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def train_args(**options: object) -> list[str]:
    args = ["train", "--quiet", "--device", "cpu"]
    for key, value in {**BASE, **{k.replace("_", "-"): v for k, v in options.items()}}.items():
        args += [f"--{key}", str(value)]
    return args


def same_run(a: Path, b: Path) -> None:
    """Two cell files hold the same run: equal rows (timing columns aside) and equal metadata."""
    fa, fb = pd.read_parquet(a), pd.read_parquet(b)
    cols = [c for c in fa.columns if not c.startswith("seconds_")]
    assert list(fa.columns) == list(fb.columns)
    pd.testing.assert_frame_equal(fa[cols], fb[cols])
    ma, mb = read_metadata(a), read_metadata(b)
    assert set(ma) == set(mb)
    assert {k: v for k, v in ma.items() if k not in VOLATILE} == {k: v for k, v in mb.items() if k not in VOLATILE}


# ----------------------------------------------------------------------------------------------- #
# --seed values


@pytest.mark.parametrize(("text", "seeds"), [
    ("3", [3]), ("1-5", [1, 2, 3, 4, 5]), ("1,2,3", [1, 2, 3]), ("1-3,7", [1, 2, 3, 7]), (" 4 - 6 , 0", [4, 5, 6, 0]),
    ("2-2", [2]),
])
def test_seed_values(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(("text", "says"), [
    ("5-1", "decreases"), ("a", "'a' is not a seed"), ("1,1", "seed 1 is named twice"), ("1-3,2", "seed 2 is named twice"),
    ("", "empty"), ("1,,2", "empty"), ("-1", "'-1' is not a seed"), ("1.5", "'1.5' is not a seed"),
    (f"0-{MAX_SEEDS}", f"more than {MAX_SEEDS}"),
])
def test_bad_seed_values_name_the_option(text, says):
    with pytest.raises(UsageError) as info:
        parse_seeds(text)
    assert info.value.option == "--seed" and says in info.value.message
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------- #
# dpbr train --seed 1-3


def test_several_seeds_write_one_file_each_equal_to_the_single_seed_runs(tmp_path, capsys):
    code, err = run_cli([*train_args(seed="1-3"), "--out", tmp_path / "many" / "s{seed}.parquet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["s1.parquet", "s2.parquet", "s3.parquet"]
    for seed in (1, 2, 3):
        assert run_cli([*train_args(seed=seed), "--out", tmp_path / f"one{seed}.parquet"], capsys)[0] == 0
        same_run(tmp_path / "many" / f"s{seed}.parquet", tmp_path / f"one{seed}.parquet")
    seeds = [int(pd.read_parquet(tmp_path / "many" / f"s{s}.parquet")["seed"].iloc[0]) for s in (1, 2, 3)]
    assert seeds == [1, 2, 3]


def test_several_seeds_without_out_go_to_each_cells_own_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli([*train_args(seed="2,5", batch="off")], capsys)[0] == 0
    files = sorted(tmp_path.glob("results/train/**/*.parquet"))
    assert [f.name for f in files] == ["seed=2.parquet", "seed=5.parquet"]
    assert len({f.parent for f in files}) == 1  # the same cell, one file per seed


def test_checkpoints_of_several_seeds_go_next_to_each_output(tmp_path, capsys):
    code, err = run_cli([*train_args(seed="1-2"), "--out", tmp_path / "s{seed}.parquet", "--checkpoint-steps", "0,12"],
                        capsys)
    assert code == 0, err
    for seed in (1, 2):
        assert sorted(p.name for p in (tmp_path / f"s{seed}.ckpt").glob("*.pt")) == ["step=0.pt", "step=12.pt"]
        assert read_metadata(tmp_path / f"s{seed}.parquet")["checkpoint_run_id"]


@pytest.mark.parametrize(("extra", "option", "says"), [
    (["--seed", "5-1"], "--seed", "decreases"),
    (["--seed", "x"], "--seed", "not a seed"),
    (["--seed", "1,1"], "--seed", "named twice"),
    (["--seed", ""], "--seed", "empty"),
    (["--seed", "1-3", "--out", "OUT/fixed.parquet"], "--out", "must contain {seed}"),
    (["--seed", "1-3", "--out", "OUT/s{seed}.parquet", "--checkpoint-steps", "0",
      "--checkpoint-dir", "OUT/ck"], "--checkpoint-dir", "must contain {seed}"),
    (["--seed", "1-2", "--batch", "sometimes"], "--batch", "allowed: auto, on, off"),
    (["--seed", "1-2", "--out", "OUT/s{seed}.parquet", "--checkpoint-steps", "99"], "cell 0: --checkpoint-steps",
     "0 .. 12"),
])
def test_bad_multi_seed_options_are_one_line_exit_2_and_write_nothing(extra, option, says, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(a).replace("OUT", str(out)) for a in extra]
    code, err = run_cli([*train_args(), *args], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"dpbr: error: {option}: ") and says in lines[0], lines[0]
    assert not out.exists() or not any(out.rglob("*"))


# ----------------------------------------------------------------------------------------------- #
# dpbr train-many


def _cells(tmp_path: Path) -> list[dict]:
    common = {"dataset": VECTORS, "model": "logit", "workers": 7, "byzantine": 2, "steps": 12, "eval_every": 4,
              "gar": "mda", "attack": "little(factor=1.5,negative=true)"}
    return [
        {**common, "batch_size": 16, "epsilon": 0.5, "seed": 1, "out": str(tmp_path / "m" / "a.parquet")},
        {**common, "batch_size": 16, "epsilon": 0.2, "seed": 2, "out": str(tmp_path / "m" / "b.parquet")},
        {**common, "batch_size": 8, "epsilon": None, "seed": 1, "out": str(tmp_path / "m" / "c.parquet")},
    ]


def _alone(cell: dict, out: Path) -> list[str]:
    args = ["train", "--quiet", "--device", "cpu", "--out", str(out)]
    for key, value in cell.items():
        if key != "out":
            args += ["--" + key.replace("_", "-"), "none" if value is None else str(value)]
    return args


@pytest.mark.parametrize("batch", ["auto", "off"])
def test_train_many_writes_each_cell_as_train_writes_it(batch, tmp_path, capsys):
    cells = _cells(tmp_path)
    listing = tmp_path / "cells.yaml"
    listing.write_text(yaml.safe_dump(cells))
    code, err = run_cli(["train-many", listing, "--device", "cpu", "--batch", batch, "--quiet"], capsys)
    assert code == 0, err
    for i, cell in enumerate(cells):
        assert run_cli(_alone(cell, tmp_path / f"alone{i}.parquet"), capsys)[0] == 0
        same_run(Path(cell["out"]), tmp_path / f"alone{i}.parquet")


def test_train_many_reads_standard_input(tmp_path, capsys, monkeypatch):
    import io
    import json

    cells = _cells(tmp_path)[:1]
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(cells)))
    code, err = run_cli(["train-many", "-", "--device", "cpu"], capsys)
    assert code == 0, err
    assert err.strip().splitlines()[-1] == f"wrote {cells[0]['out']}"


@pytest.mark.parametrize(("edit", "option", "says"), [
    (lambda c: c[1].update(gar="krumm"), "CELLS[1].gar", "krumm"),
    (lambda c: c[2].update(batch_sizes=4), "CELLS[2].batch_sizes", "unknown key"),
    (lambda c: c[2].update(out=c[0]["out"]), "CELLS[2].out", "also the output of cell 0"),
    (lambda c: c[0].update(batch_size=4096), "--batch-size", "exceeds the 512 training examples"),
    (lambda c: c.clear(), "CELLS", "non-empty list"),
])
def test_bad_cells_are_refused_before_any_cell_runs(edit, option, says, tmp_path, capsys):
    cells = _cells(tmp_path)
    edit(cells)
    listing = tmp_path / "cells.yaml"
    listing.write_text(yaml.safe_dump(cells))
    code, err = run_cli(["train-many", listing, "--device", "cpu", "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"dpbr: error: {option.replace('CELLS', str(listing))}: ") and says in lines[0], lines[0]
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_a_cell_failing_at_run_time_leaves_the_others_written(tmp_path, capsys):
    """Shards for 30 honest workers need at least 30 examples: a 20-example set fails when the
    partition is built (not knowable from the spec): that cell fails, the others are written."""
    cells = _cells(tmp_path)
    small = "synthetic(classes=2,d=68,n=20,n_test=8)"
    cells[1].update(dataset=small, partition="shards", attack="none", workers=30)
    listing = tmp_path / "cells.yaml"
    listing.write_text(yaml.safe_dump(cells))
    code, err = run_cli(["train-many", listing, "--device", "cpu", "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"dpbr: error: cell 1 ({cells[1]['out']}) failed: --partition: "), lines[0]
    assert Path(cells[0]["out"]).is_file() and Path(cells[2]["out"]).is_file()
    assert not Path(cells[1]["out"]).exists()


@pytest.mark.parametrize(("batch", "groups"), [("auto", [[1, 2]]), ("on", [[1, 2], [1]]), ("off", [])])
def test_cells_with_one_batch_key_run_as_one_batch(batch, groups, tmp_path, capsys, monkeypatch):
    """Cells 0 and 1 differ in seed and ε only (one :meth:`RunSpec.batch_key`): ``auto`` runs them as one
    :class:`SeedBatch` and cell 2 (another batch size) alone with :class:`Simulation`; ``on`` runs every
    group with the batched engine, ``off`` none. Each file equals the cell's run alone."""
    from dpbr.jobs import train as train_job
    from dpbr.simulation import SeedBatch

    seen: list[list[int]] = []

    def recording(specs, *args, **kwargs):
        seen.append([s.seed for s in specs])
        return SeedBatch(specs, *args, **kwargs)

    monkeypatch.setattr(train_job, "SeedBatch", recording)
    cells = _cells(tmp_path)
    listing = tmp_path / "cells.yaml"
    listing.write_text(yaml.safe_dump(cells))
    code, err = run_cli(["train-many", listing, "--device", "cpu", "--batch", batch, "--quiet"], capsys)
    assert code == 0, err
    assert seen == groups
    for i, cell in enumerate(cells):
        assert run_cli(_alone(cell, tmp_path / f"alone{i}.parquet"), capsys)[0] == 0
        same_run(Path(cell["out"]), tmp_path / f"alone{i}.parquet")
