"""``--from PATH``: a local copy of a dataset, in any of the forms :mod:`dpbr.data` lists ("Sources
and ``--from``"), read by the format modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpbr.data.sources.base import Raw, SourceError, file_sha256
from dpbr.data.sources.cifar import CIFAR, cifar_arrays, cifar_from_tar
from dpbr.data.sources.idx import find_idx_folder, idx_arrays
from dpbr.data.sources.libsvm import phishing_raw
from dpbr.data.sources.mnist_csv import find_csv_pair, parse_mnist_csv, read_mnist_zip

__all__ = ["import_local"]


def import_local(base: str, path: Path) -> Raw:
    """Read a local copy of ``base`` (accepted forms in :mod:`dpbr.data`)."""
    src = str(path.resolve())
    if base in ("mnist", "fashion-mnist"):
        if path.is_file() and path.suffix.lower() in (".whl", ".zip"):
            arrays = read_mnist_zip(path)
            return Raw(arrays, source=f"local zip {src}", source_kind="local",
                       details={"file_sha256": file_sha256(path.read_bytes())})
        if path.is_dir():
            found = find_idx_folder(path, base)
            if found is not None:
                arrays = idx_arrays({k: p.read_bytes() for k, p in found.items()})
                return Raw(arrays, source=f"local IDX files {found['train-images'].parent.resolve()}", source_kind="local",
                           details={"files": {k: p.name for k, p in found.items()}})
        pair = find_csv_pair(path)
        if pair is not None and pair[0].is_file() and pair[1].is_file():
            out: dict[str, np.ndarray] = {}
            for key, p in (("train", pair[0]), ("test", pair[1])):
                with open(p, "rb") as fh:
                    out[f"x_{key}"], out[f"y_{key}"] = parse_mnist_csv(fh)
            return Raw(out, source=f"local CSV files {pair[0].resolve()} and {pair[1].name}", source_kind="local",
                       details={})
        raise SourceError("expected a folder with the four IDX files (train-images-idx3-ubyte[.gz], ...), "
                          "a .whl/.zip with mnist_train.csv and mnist_test.csv, or those CSV files")
    if base in CIFAR:
        folder = CIFAR[base][2]
        if path.is_file():
            return Raw(cifar_from_tar(base, path.read_bytes()), source=f"local archive {src}", source_kind="local",
                       details={"archive_sha256": file_sha256(path.read_bytes())})
        for cand in (path, path / folder):
            if (cand / CIFAR[base][3][0]).is_file():
                return Raw(cifar_arrays(base, lambda m, c=cand: (c / m).read_bytes()),
                           source=f"local folder {cand.resolve()}", source_kind="local", details={})
        raise SourceError(f"expected {Path(CIFAR[base][0]).name} or its extracted {folder} folder")
    if base == "phishing":
        if not path.is_file():
            raise SourceError("expected a LIBSVM file (plain or .gz)")
        return phishing_raw(path.read_bytes(), f"local file {src}", "local", {})
    raise SourceError(f"no local import for {base}")  # pragma: no cover
