"""``dpbr train --checkpoint-steps`` checkpoints that can be trusted (format: :mod:`dpbr.jobs.checkpoints`).

Tiny synthetic runs: a corrupted file, a folder mixing two runs, a rerun with fewer steps, two writers
of the same folder, old-format files. Errors are one line naming the option, exit code 2, no output.
"""

import shutil

import pandas as pd
import pytest
import torch

from dpbr.cli import main
from dpbr.io import read_metadata

VECTORS = "synthetic(d=8,classes=2,n=400,n_test=40)"
IMAGES = "synthetic(n=64,n_test=8,size=12)"
TRAIN = ["train", "--dataset", VECTORS, "--model", "logit", "--workers", "5", "--byzantine", "1",
         "--gar", "median", "--attack", "little(factor=1.5)", "--batch-size", "8", "--steps", "4",
         "--eval-every", "0", "--device", "cpu", "--quiet"]
VN = ["vn", "--samples", "8", "--bootstrap", "100", "--batch-size", "8", "--device", "cpu", "--quiet"]


def _run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err


def _train(tmp_path, capsys, name="r", steps="0,2,4", extra=()):
    out = tmp_path / f"{name}.parquet"
    code, err = _run([*TRAIN, "--out", str(out), "--checkpoint-steps", steps, *extra], capsys)
    assert code == 0, err
    return out, tmp_path / f"{name}.ckpt"


def _one_line_error(code, err, option):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dpbr: error: {option}:"), err
    assert "Traceback" not in err


def _flip_a_bit_of_theta(path):
    """Flip one bit in the middle of θ's raw bytes inside the file (found by content, not by format)."""
    theta = torch.load(path, map_location="cpu", weights_only=True)["theta"]
    raw = bytearray(path.read_bytes())
    payload = theta.contiguous().view(torch.uint8).numpy().tobytes()
    at = raw.find(payload)
    assert at > 0 and raw.find(payload, at + 1) == -1
    raw[at + len(payload) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    changed = torch.load(path, map_location="cpu", weights_only=True)["theta"]
    assert not torch.equal(changed, theta)  # torch itself reads the damaged tensor without complaint


def test_a_flipped_bit_in_the_tensor_data_is_refused_by_dpbr_vn(tmp_path, capsys):
    _, folder = _train(tmp_path, capsys)
    _flip_a_bit_of_theta(folder / "step=2.pt")
    out = tmp_path / "vn.parquet"
    for where in (folder / "step=2.pt", folder):
        code, err = _run([*VN, "--checkpoint", str(where), "--out", str(out)], capsys)
        _one_line_error(code, err, "--checkpoint")
        assert "corrupt" in err and "step=2.pt" in err
    assert not out.exists()
    # the intact files of the same run are still accepted
    code, err = _run([*VN, "--checkpoint", str(folder / "step=4.pt"), "--out", str(out)], capsys)
    assert code == 0, err
    assert out.exists()


def test_a_flipped_bit_is_refused_by_dpbr_reconstruct(tmp_path, capsys):
    out = tmp_path / "t.parquet"
    code, err = _run(["train", "--dataset", IMAGES, "--model", "lenet", "--workers", "3", "--byzantine", "1",
                      "--batch-size", "4", "--steps", "1", "--eval-every", "0", "--device", "cpu", "--quiet",
                      "--out", str(out), "--checkpoint-steps", "1"], capsys)
    assert code == 0, err
    state = tmp_path / "t.ckpt" / "step=1.pt"
    _flip_a_bit_of_theta(state)
    rec = tmp_path / "rec.parquet"
    code, err = _run(["reconstruct", "--dataset", IMAGES, "--state", str(state), "--iterations", "2",
                      "--out", str(rec), "--quiet"], capsys)
    _one_line_error(code, err, "--state")
    assert "corrupt" in err and not rec.exists() and not rec.with_suffix(".png").exists()


def test_a_folder_mixing_two_runs_is_refused(tmp_path, capsys):
    _, a = _train(tmp_path, capsys, "a", "0,2,4")
    _, b = _train(tmp_path, capsys, "b", "1,3", ["--seed", "2"])
    shutil.copy(b / "step=3.pt", a / "step=3.pt")
    out = tmp_path / "vn.parquet"
    code, err = _run([*VN, "--checkpoint", str(a), "--out", str(out)], capsys)
    _one_line_error(code, err, "--checkpoint")
    assert "mixes checkpoints of 2 runs" in err and not out.exists()
    # run b's own folder is fine, and files of two runs named one by one may be compared
    code, err = _run([*VN, "--checkpoint", str(b), "--out", str(out)], capsys)
    assert code == 0, err
    code, err = _run([*VN, "--checkpoint", str(a / "step=2.pt"), "--checkpoint", str(b / "step=3.pt"),
                      "--out", str(tmp_path / "two.parquet")], capsys)
    assert code == 0, err
    assert pd.read_parquet(tmp_path / "two.parquet")["run"].nunique() == 2


def test_a_rerun_with_fewer_checkpoint_steps_leaves_only_its_own(tmp_path, capsys):
    out, folder = _train(tmp_path, capsys, "r", "0,1,2,3,4")
    first = torch.load(folder / "step=4.pt", weights_only=True)
    out, folder = _train(tmp_path, capsys, "r", "2", ["--seed", "7"])
    assert sorted(p.name for p in folder.iterdir()) == ["step=2.pt"]
    ck = torch.load(folder / "step=2.pt", weights_only=True)
    assert ck["spec"]["seed"] == 7
    assert ck.get("run_id") == read_metadata(out)["checkpoint_run_id"] != first.get("run_id")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_two_writers_of_one_folder_leave_exactly_one_runs_checkpoints(tmp_path):
    """Simulated concurrency: run A is paused after step 1 while run B (other seed, other steps) writes
    the same --out from start to end; then A finishes. The folder must be A's alone (the last to
    finish), paired with A's metrics — not a mixture of both runs' files."""
    from dpbr.spec import RunSpec
    from dpbr.jobs.train import train

    common = dict(dataset=VECTORS, model="logit", workers=5, byzantine=1, gar="median", attack="little(factor=1.5)",
                  batch_size=8, steps=4, eval_every=0)
    spec_a, spec_b = RunSpec.create(**common, seed=1), RunSpec.create(**common, seed=2)
    out = tmp_path / "same.parquet"
    folder = tmp_path / "same.ckpt"

    def interleave(step, total, acc):
        if step == 1:
            train(spec_b, out=out, device="cpu", checkpoint_steps=frozenset({0, 2, 3}))
            assert sorted(p.name for p in folder.iterdir()) == ["step=0.pt", "step=2.pt", "step=3.pt"]

    train(spec_a, out=out, device="cpu", checkpoint_steps=frozenset({0, 1, 4}), progress=interleave)
    files = sorted(folder.iterdir())
    assert [p.name for p in files] == ["step=0.pt", "step=1.pt", "step=4.pt"]
    loaded = [torch.load(p, weights_only=True) for p in files]
    assert all(ck["spec"] == spec_a.to_dict() for ck in loaded)
    meta = read_metadata(out)
    assert meta["spec"]["seed"] == 1
    assert {ck.get("run_id") for ck in loaded} == {meta["checkpoint_run_id"]}
    # the metrics file is A's and pairs with the folder: its ‖θ_4 − θ_0‖ is that of the checkpoints
    frame = pd.read_parquet(out).set_index("step")
    assert (frame["seed"] == 1).all()
    distance = float(torch.linalg.vector_norm(loaded[2]["theta"].double() - loaded[0]["theta"].double()))
    assert frame.loc[4, "param_distance"] == pytest.approx(distance, rel=1e-5)


def test_writers_committing_in_any_order_leave_one_complete_folder(tmp_path):
    """The writer itself: two writers of one folder, interleaved saves, the later commit wins whole."""
    from dpbr.jobs import checkpoints

    folder = tmp_path / "x.ckpt"
    a = checkpoints.CheckpointWriter(folder, spec={"seed": 1})
    b = checkpoints.CheckpointWriter(folder, spec={"seed": 2})
    a.save(0, torch.zeros(3))
    b.save(0, torch.ones(3))
    b.save(5, torch.ones(3))
    a.save(1, torch.zeros(3))
    b.commit()
    assert sorted(p.name for p in folder.iterdir()) == ["step=0.pt", "step=5.pt"]
    a.commit()
    assert sorted(p.name for p in folder.iterdir()) == ["step=0.pt", "step=1.pt"]
    assert {checkpoints.load(p)["run_id"] for p in checkpoints.folder_files(folder)} == {a.run_id}
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]


def test_an_interrupted_run_leaves_the_previous_folder_untouched(tmp_path, capsys):
    from dpbr.spec import RunSpec
    from dpbr.jobs.train import train

    out, folder = _train(tmp_path, capsys, "r", "0,4")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    spec = RunSpec.create(dataset=VECTORS, model="logit", workers=5, byzantine=1, gar="median",
                          attack="little(factor=1.5)", batch_size=8, steps=4, eval_every=0, seed=9)

    def stop(step, total, acc):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(spec, out=out, device="cpu", checkpoint_steps=frozenset({0, 1, 2, 3}), progress=stop)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.ckpt", "r.parquet"]


def test_the_next_writer_removes_what_killed_writers_left_and_nothing_else(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from dpbr.jobs import checkpoints

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid no longer exists
    host = "".join(c if c.isascii() and (c.isalnum() or c == "-") else "-" for c in socket.gethostname().split(".")[0])
    stale = tmp_path / f".x.ckpt.{host}-{gone.pid}-abcd1234.tmp"
    live = tmp_path / f".x.ckpt.{host}-{os.getpid()}-abcd1234.tmp"          # a writer still running
    elsewhere = tmp_path / f".x.ckpt.otherhost-{gone.pid}-abcd1234.tmp"    # cannot be checked from here
    trash = tmp_path / f".x.ckpt.{host}-{os.getpid()}-0badf00d.old"
    other = tmp_path / f".y.ckpt.{host}-{gone.pid}-abcd1234.tmp"           # another destination's
    for p in (stale, live, elsewhere, trash, other):
        p.mkdir()
        (p / "step=0.pt").write_bytes(b"x")
    writer = checkpoints.CheckpointWriter(tmp_path / "x.ckpt", spec={})
    writer.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, elsewhere, other))


def test_old_format_checkpoints_are_refused_with_a_hint_to_regenerate(tmp_path, capsys):
    from dpbr.spec import RunSpec

    run = RunSpec.create(dataset=VECTORS, model="logit", steps=10)
    old = tmp_path / "old.ckpt" / "step=5.pt"
    old.parent.mkdir()
    torch.save({"step": 5, "theta": torch.zeros(9), "spec": run.to_dict()}, old)  # the format before checksums
    out = tmp_path / "vn.parquet"
    for where in (old, old.parent):
        code, err = _run([*VN, "--checkpoint", str(where), "--out", str(out)], capsys)
        _one_line_error(code, err, "--checkpoint")
        assert "old-format" in err and "dpbr train --checkpoint-steps" in err
    assert not out.exists()


def test_a_checkpoint_folder_holding_other_files_is_not_replaced(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    out = tmp_path / "r.parquet"
    code, err = _run([*TRAIN, "--out", str(out), "--checkpoint-steps", "0", "--checkpoint-dir", str(folder)], capsys)
    _one_line_error(code, err, "--checkpoint-dir")
    assert (folder / "notes.txt").read_text() == "keep me" and not out.exists()
    # a checkpoint folder that Snakemake marked as a directory output is replaced
    marked = tmp_path / "marked.ckpt"
    marked.mkdir()
    (marked / ".snakemake_timestamp").write_text("")
    (marked / "step=9.pt").write_bytes(b"old")
    code, err = _run([*TRAIN, "--out", str(out), "--checkpoint-steps", "0", "--checkpoint-dir", str(marked)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in marked.iterdir()) == ["step=0.pt"]
