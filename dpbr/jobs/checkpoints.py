"""``dpbr train`` checkpoints: the one format, its writer and its loader.

``dpbr train --checkpoint-steps 0,500,1000`` saves the parameter vector θ at those steps into a folder
(default ``<out without .parquet>.ckpt``) as ``step=<S>.pt``; ``dpbr vn --checkpoint`` and
``dpbr reconstruct --state`` read them through :func:`load` (and :func:`folder_files` for a folder).

Format (``format = 2``)
-----------------------
Each file is a ``torch.save`` dictionary that ``torch.load(..., weights_only=True)`` reads::

    {"format": 2, "run_id": "<16 hex digits>", "step": S, "theta": Tensor (d,), "spec": {...RunSpec...},
     "sha256": "<64 hex digits>"}

* ``sha256`` is the SHA-256 of the header — the JSON (sorted keys) of ``format``, ``run_id``,
  ``step``, ``spec``, θ's dtype and shape — followed by a newline and θ's raw bytes (C order). A
  flipped bit anywhere in θ's data or in those fields no longer matches, and the file is refused.
* ``run_id`` is drawn afresh by every execution of ``dpbr train`` (it is *not*
  :func:`dpbr.spec.run_token`, which names the training configuration). It is also recorded in the
  run's Parquet metadata (``checkpoint_run_id``), so a metrics file and a checkpoint folder can be
  paired.

Writing (:class:`CheckpointWriter`): a run writes its checkpoints into a fresh hidden temporary folder
beside the destination and, once the run has finished, swaps it in by renaming (the previous folder,
if any, is renamed away first and then deleted). So a checkpoint folder always holds the checkpoints
of exactly one run: a rerun with fewer steps leaves no old files behind, a killed run leaves the
previous folder untouched, and when two runs write the same folder at once the one that finishes
last replaces the other's whole folder (never a mixture). An existing destination is replaced only
if it holds nothing but ``step=<S>.pt`` files (and Snakemake's ``.snakemake_timestamp`` marker).
``dpbr train`` writes its metrics file right after the swap; two runs racing for the same ``--out``
may still interleave those two renames, and ``checkpoint_run_id`` then tells whether the metrics
file and the folder come from the same run.
The temporary folder is named after its writer (``.NAME.HOST-PID-XXXXXXXX.tmp``); the next writer of
the same destination removes those whose process on this machine is gone
(:func:`remove_stale_folders`).

Loading (:func:`load`): a missing, unreadable, corrupt (checksum mismatch) or old-format file (written
before checksums, without ``sha256``) is a one-line :class:`~dpbr.errors.UsageError` naming the
option. Old-format checkpoints are refused rather than trusted unverified: regenerate them with
``dpbr train --checkpoint-steps``. :func:`folder_files` refuses a folder whose files carry different
run ids.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from dpbr.errors import UsageError

__all__ = ["FORMAT", "CheckpointWriter", "check_destination", "folder_files", "load", "new_run_id",
           "payload_digest", "remove_stale_folders", "save"]

#: Version of the checkpoint format written by :func:`save`.
FORMAT = 2

_FILE = re.compile(r"^step=(\d+)\.pt$")
_RUN_ID = re.compile(r"^[0-9a-f]{16}$")
#: Files a checkpoint folder may hold besides its checkpoints (Snakemake marks directory outputs).
_MARKERS = frozenset({".snakemake_timestamp"})
_REGENERATE = "regenerate it with 'dpbr train --checkpoint-steps'"


def new_run_id() -> str:
    """A fresh random run id: 16 hex digits (64 bits), different for every execution of ``dpbr train``."""
    return secrets.token_hex(8)


def payload_digest(*, run_id: str, step: int, theta: Tensor, spec: Mapping[str, Any], fmt: int = FORMAT) -> str:
    """SHA-256 (hex) of a checkpoint's header JSON, a newline and θ's raw bytes (see the module docstring)."""
    t = theta.detach().to("cpu").contiguous()
    header = json.dumps({"format": fmt, "run_id": run_id, "step": int(step), "spec": dict(spec),
                         "dtype": str(t.dtype), "shape": list(t.shape)}, sort_keys=True, default=str)
    h = hashlib.sha256(header.encode())
    h.update(b"\n")
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(path: str | Path, *, step: int, theta: Tensor, spec: Mapping[str, Any], run_id: str) -> Path:
    """Write one checkpoint (θ as a 1-D CPU copy) with its checksum to ``path``; returns ``path``.

    ``path`` is written in place: :class:`CheckpointWriter` writes into a private folder that is
    swapped in whole at the end.
    """
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run_id must be 16 hex digits, got {run_id!r}")
    flat = theta.detach().to("cpu").reshape(-1).clone()
    record = {"format": FORMAT, "run_id": run_id, "step": int(step), "theta": flat, "spec": dict(spec),
              "sha256": payload_digest(run_id=run_id, step=step, theta=flat, spec=spec)}
    torch.save(record, path)
    return Path(path)


def load(path: str | Path, *, option: str = "--checkpoint", missing: str | None = None) -> dict[str, Any]:
    """Read and verify one checkpoint: ``{"format", "run_id", "step", "theta" (d,), "spec", "sha256"}``.

    Raises
    ------
    UsageError
        ``option``: missing file (message ``missing`` when given), unreadable file, not a dpbr
        checkpoint, an old-format checkpoint without checksum, or a checksum mismatch (corrupt file).
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(option, missing or f"no such checkpoint file {str(p)!r}")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise UsageError(option, f"cannot read {str(p)!r} as a dpbr checkpoint ({type(exc).__name__}); "
                                 f"{_REGENERATE}") from None
    ok = (isinstance(ck, dict) and isinstance(ck.get("theta"), Tensor) and ck["theta"].dim() == 1
          and isinstance(ck.get("step"), int) and isinstance(ck.get("spec"), dict))
    if not ok:
        raise UsageError(option, f"{str(p)!r} is not a dpbr train checkpoint (step, theta, spec)")
    if "sha256" not in ck or "run_id" not in ck:
        raise UsageError(option, f"{str(p)!r} is an old-format checkpoint without a checksum; {_REGENERATE}")
    if ck.get("format") != FORMAT:
        raise UsageError(option, f"{str(p)!r} has checkpoint format {ck.get('format')!r}, this dpbr reads "
                                 f"format {FORMAT}; {_REGENERATE}")
    run_id = ck["run_id"]
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or not isinstance(ck["sha256"], str):
        raise UsageError(option, f"{str(p)!r} has a malformed run id or checksum; {_REGENERATE}")
    digest = payload_digest(run_id=run_id, step=ck["step"], theta=ck["theta"], spec=ck["spec"])
    if digest != ck["sha256"]:
        raise UsageError(option, f"{str(p)!r} is corrupt: its SHA-256 does not match the one recorded when it "
                                 f"was written; {_REGENERATE}")
    return ck


def _step_of(path: Path) -> int:
    m = _FILE.match(path.name)
    return int(m.group(1)) if m else -1


def folder_files(folder: str | Path, *, option: str = "--checkpoint") -> list[Path]:
    """The ``step=<S>.pt`` files of a checkpoint folder in step order, all of one run.

    Each file's run id is read without its tensor data (memory-mapped); the files themselves are
    verified when :func:`load` reads them.

    Raises
    ------
    UsageError
        ``option``: no checkpoints in the folder, an unreadable file, or files of several runs.
    """
    p = Path(folder)
    files = sorted((f for f in p.iterdir() if _FILE.match(f.name)), key=_step_of) if p.is_dir() else []
    if not files:
        raise UsageError(option, f"folder {str(p)!r} holds no step=<S>.pt checkpoints")
    ids: dict[Any, list[str]] = {}
    for f in files:
        try:
            ck = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(option, f"cannot read {str(f)!r} as a dpbr checkpoint ({type(exc).__name__}); "
                                     f"{_REGENERATE}") from None
        ids.setdefault(ck.get("run_id") if isinstance(ck, dict) else None, []).append(f.name)
    if len(ids) > 1:
        parts = "; ".join(f"{rid or 'no run id'}: {', '.join(names)}" for rid, names in ids.items())
        raise UsageError(option, f"folder {str(p)!r} mixes checkpoints of {len(ids)} runs ({parts}); a folder must "
                                 f"hold one run's checkpoints: rerun 'dpbr train --checkpoint-steps'")
    return files


def check_destination(folder: str | Path, option: str = "--checkpoint-dir") -> Path:
    """Check, before any work, that ``folder`` can receive a run's checkpoints; returns it as a Path.

    It may be absent or a folder of ``step=<S>.pt`` files only (and Snakemake's
    ``.snakemake_timestamp``); it is replaced whole. Anything else (a file, a folder holding other
    files) is refused rather than deleted, as is an unwritable parent.
    """
    p = Path(folder)
    if p.exists() or p.is_symlink():
        if not p.is_dir() or p.is_symlink():
            raise UsageError(option, f"{str(p)!r} exists and is not a folder; give a new folder or a checkpoint folder")
        others = sorted(f.name for f in p.iterdir()
                        if not ((_FILE.match(f.name) or f.name in _MARKERS) and f.is_file()))
        if others:
            raise UsageError(option, f"{str(p)!r} holds other files than step=<S>.pt checkpoints (e.g. {others[0]!r}); "
                                     "it would be replaced whole: give a new folder")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".probe", dir=p.parent)
        os.rmdir(probe)
    except OSError as exc:
        raise UsageError(option, f"cannot write checkpoints beside {str(p)!r}: {exc.strerror or exc}") from None
    return p


def _writer_token() -> str:
    """``HOST-PID`` of this process, part of its temporary folders' names (as :func:`dpbr.io.atomic_path`'s)."""
    from dpbr.io import host_token

    return f"{host_token()}-{os.getpid()}"


def remove_stale_folders(folder: str | Path) -> list[Path]:
    """Remove what killed writers of ``folder`` left beside it; returns the removed paths.

    Temporary folders ``.NAME.HOST-PID-XXXXXXXX.tmp`` are removed when written on this machine by a
    process that no longer exists (a live writer's folder is never touched, however old: a long
    run may write its checkpoints hours apart); ``.NAME.HOST-PID-XXXXXXXX.old`` folders (a replaced
    destination, renamed away before deletion) are removed whoever made them.
    """
    folder = Path(folder)
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>[0-9]+)-"
                         rf"[A-Za-z0-9_]{{8}}\.(?P<kind>tmp|old)")
    from dpbr.io import host_token, process_exists

    host = host_token()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        if m["kind"] == "tmp" and (m["host"] != host or process_exists(int(m["pid"]))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


class CheckpointWriter:
    """Write one run's checkpoints into a private temporary folder; :meth:`commit` swaps it in.

    Parameters
    ----------
    folder:
        The destination (checked by :func:`check_destination`).
    spec:
        The run's spec dictionary (``RunSpec.to_dict()``), stored in every file.
    run_id:
        This execution's id (default: :func:`new_run_id`).

    Use as a context manager: leaving it by an exception discards the temporary folder and leaves
    the destination as it was.
    """

    def __init__(self, folder: str | Path, *, spec: Mapping[str, Any], run_id: str | None = None,
                 option: str = "--checkpoint-dir") -> None:
        self.folder = check_destination(folder, option)
        self.spec = dict(spec)
        self.run_id = run_id or new_run_id()
        self.option = option
        remove_stale_folders(self.folder)
        self.tmp: Path | None = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.{_writer_token()}-", suffix=".tmp",
                                                      dir=self.folder.parent))

    def save(self, step: int, theta: Tensor) -> Path:
        """Write the checkpoint of ``step`` into the temporary folder."""
        if self.tmp is None:
            raise RuntimeError("checkpoint writer already committed or discarded")
        return save(self.tmp / f"step={int(step)}.pt", step=step, theta=theta, spec=self.spec, run_id=self.run_id)

    def commit(self) -> Path:
        """Replace the destination by the temporary folder (renames); returns the destination.

        The previous destination (if any) is renamed to a hidden name and then deleted; if another
        writer swaps its folder in meanwhile, the rename is retried, so the destination ends up as
        one writer's complete folder.
        """
        if self.tmp is None:
            raise RuntimeError("checkpoint writer already committed or discarded")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        trash: list[Path] = []
        try:
            for _ in range(1000):
                try:
                    os.rename(self.tmp, self.folder)  # atomic; succeeds when the destination is absent or empty
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                old = self.folder.parent / f".{self.folder.name}.{_writer_token()}-{secrets.token_hex(4)}.old"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.folder, old)
                    trash.append(old)
            else:
                raise UsageError(self.option, f"could not replace {str(self.folder)!r}: other writers kept replacing it")
        except BaseException:
            self.discard()
            raise
        finally:
            for old in trash:
                shutil.rmtree(old, ignore_errors=True)
        self.tmp = None
        return self.folder

    def discard(self) -> None:
        """Delete the temporary folder (the destination is left as it was)."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.discard()
