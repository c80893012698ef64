"""Outputs: Parquet with metadata, written atomically.

Every dpbr output is written to a temporary name in the destination folder and renamed into place, so
a killed job never leaves a half-written file under the final name. A job killed with SIGKILL (or a
node that fails) during that write leaves its hidden temporary behind; the next write of the same
output removes it (:func:`remove_stale_temporaries`). Parquet files carry, in their
schema metadata under the key ``dpbr``, the spec JSON, package versions, the device and the project's
version/commit (:func:`run_metadata`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import socket
import subprocess
import time
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dpbr.errors import UsageError

__all__ = [
    "atomic_path",
    "check_folder",
    "check_writable",
    "device_name",
    "host_token",
    "process_exists",
    "read_metadata",
    "remove_stale_temporaries",
    "run_metadata",
    "write_parquet",
]

METADATA_KEY = b"dpbr"


#: A temporary older than this (seconds since its last write) is stale whoever wrote it. A live write
#: lasts seconds (one Parquet file, figure or CSV), so an hour leaves a wide margin for slow file
#: systems while still cleaning up after writers on other machines, whose process ids mean nothing here.
STALE_TEMPORARY_SECONDS = 3600.0


def host_token() -> str:
    """This machine's short host name in the characters a temporary's name allows (``[A-Za-z0-9-]``)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


def _temporary_pattern(name: str) -> re.Pattern[str]:
    """The names of ``name``'s temporaries: ``.NAME.HOST-PID-XXXXXXXX.tmp`` (written by :func:`atomic_path`)
    and ``.NAME.XXXXXXXX.tmp`` (earlier dpbr versions: no writer recorded), XXXXXXXX being
    :func:`tempfile.mkstemp`'s 8 random characters. Neither host nor random part contains a dot, so the
    temporaries of another output whose name merely starts with ``name`` never match."""
    return re.compile(
        rf"\.{re.escape(name)}\.(?:(?P<host>[A-Za-z0-9-]+)-(?P<pid>[0-9]+)-)?[a-z0-9_]{{8}}\.tmp"
    )


def process_exists(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 checks without sending)."""
    if pid <= 0:
        return True  # not a real writer id: never treat as gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return True
    return True


def remove_stale_temporaries(path: str | Path, *, max_age: float = STALE_TEMPORARY_SECONDS,
                             now: float | None = None) -> list[Path]:
    """Remove the temporaries that killed writers of ``path`` left behind; returns the removed paths.

    Only names of ``path``'s own temporaries (:func:`_temporary_pattern`) are considered, and one is
    removed when its writer is gone:

    * it was written on this machine (the host in its name) by a process id that no longer exists, or
    * it was last modified more than ``max_age`` seconds ago (writers on other machines of a shared
      file system, and temporaries of earlier versions, which record no writer).

    So a temporary younger than ``max_age`` whose writer runs (or may run, on another machine) is
    never touched; a process id reused by an unrelated process only delays the removal until the
    temporary is ``max_age`` old. Files that vanish meanwhile are skipped.
    """
    path = Path(path)
    pattern = _temporary_pattern(path.name)
    host = host_token()
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            gone = match["pid"] is not None and match["host"] == host and not process_exists(int(match["pid"]))
            stale = gone or now - entry.stat(follow_symlinks=False).st_mtime > max_age
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            continue
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error remove it.

    The temporary file lives in the same folder (same file system), so :func:`os.replace` is atomic. It
    is named ``.NAME.HOST-PID-XXXXXXXX.tmp`` (host and process id of the writer), so that the next
    write of ``path`` can tell the temporaries of killed writers from live ones and removes them
    (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{host_token()}-{os.getpid()}-", suffix=".tmp",
                               dir=path.parent)
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
    blocker = next((p for p in path.parents if p.exists()), None)  # say which file is in the way
    if blocker is not None and not blocker.is_dir():
        raise UsageError(option, f"cannot write {str(path)!r}: {str(blocker)!r} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UsageError(option, f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    return path


def check_folder(path: str | Path, option: str) -> Path:
    """Fail early, before any work and without creating anything, when the folder ``path`` can be neither
    used nor created: it is a file, one of its parents is a file, or the nearest existing parent is not
    writable (one-line UsageError naming ``option``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(option, f"{str(path)!r} is a file; give a folder")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)  # "x/y" ends at "."
    if existing is None or not existing.is_dir():
        raise UsageError(option, f"cannot create the folder {str(path)!r}: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(option, f"cannot create or write the folder {str(path)!r}: {str(existing)!r} is not writable")
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
