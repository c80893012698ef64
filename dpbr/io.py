"""Outputs: Parquet with metadata, written atomically.

Every dpbr output is written to a temporary name in the destination folder and renamed into place, so
a killed job never leaves a half-written file under the final name. Parquet files carry, in their
schema metadata under the key ``dpbr``, the spec JSON, package versions, the device and the project's
version/commit (:func:`run_metadata`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dpbr.errors import UsageError

__all__ = [
    "atomic_path",
    "check_writable",
    "device_name",
    "read_metadata",
    "run_metadata",
    "write_parquet",
]

METADATA_KEY = b"dpbr"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error remove it.

    The temporary file lives in the same folder (same file system), so :func:`os.replace` is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the output the usual permissions (0666 minus the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def check_writable(path: str | Path, option: str = "--out") -> Path:
    """Fail early, before any work, when ``path`` cannot be written (one-line UsageError naming ``option``)."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise UsageError(option, f"{str(path)!r} is a directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UsageError(option, f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    return path


def write_parquet(frame: pd.DataFrame, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``frame`` to ``path`` atomically, with ``metadata`` (JSON) in the schema under ``dpbr``."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata is not None:
        existing = dict(table.schema.metadata or {})
        existing[METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(existing)
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` to ``path`` as CSV (no index) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``dpbr`` metadata of a Parquet file written by :func:`write_parquet` (empty dict if none)."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def device_name(device: Any) -> str:
    """Human name of a torch device: the GPU model for CUDA, the processor model for the CPU."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"cpu: {name} ({os.cpu_count()} cores)"


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that determine a result."""
    import numpy
    import torch

    import dpbr

    return {
        "dpbr": dpbr.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
    }


def run_metadata(spec: Any, device: Any, **extra: Any) -> dict[str, Any]:
    """File metadata: spec JSON, package versions, device name, project version and commit, plus ``extra``."""
    import dpbr

    return {
        "spec": json.loads(spec.to_json()) if hasattr(spec, "to_json") else spec,
        "cell_id": spec.cell_id() if hasattr(spec, "cell_id") else None,
        "versions": package_versions(),
        "device": device_name(device),
        "dpbr_version": dpbr.__version__,
        "commit": _git_commit(),
        **extra,
    }
