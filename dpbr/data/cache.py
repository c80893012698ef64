"""The on-disk cache of a dataset: ``<data_dir>/<stem>.npz`` (the four arrays) and ``<stem>.json``
(the manifest: source, checksums, counts, split, normalisation), each written atomically with
:func:`dpbr.io.atomic_path`. Reading recomputes the checksum, so a corrupted cache is caught.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np

from dpbr.data.catalogue import ARRAY_KEYS, KNOWN_CHECKSUMS, canonical_name
from dpbr.data.verify import array_checksum
from dpbr.errors import UsageError

__all__ = ["FORMAT_VERSION", "cache_paths", "is_valid", "manifest", "read", "stamp", "write"]

FORMAT_VERSION = 1
"""Version of the cache layout (``.npz`` keys and manifest fields)."""


def cache_paths(name: str, data_dir: str | Path) -> tuple[Path, Path]:
    """``(<data_dir>/<stem>.npz, <data_dir>/<stem>.json)`` for dataset ``name``.

    The stem is the canonical name made path-safe: ``synthetic(classes=2,d=68) -> synthetic_classes=2_d=68``.
    """
    stem = canonical_name(name).replace("(", "_").replace(",", "_").replace(")", "")
    d = Path(data_dir)
    return d / f"{stem}.npz", d / f"{stem}.json"


def manifest(name: str, data_dir: str | Path) -> dict[str, Any] | None:
    """The cache manifest of ``name`` in ``data_dir`` (``None`` when not cached)."""
    _, man = cache_paths(name, data_dir)
    try:
        return json.loads(man.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError("--data-dir", f"cannot read {man}: {exc}") from None


def stamp() -> dict[str, Any]:
    """The manifest fields of the cache itself: layout version, creation time, dpbr version."""
    from dpbr import __version__

    return {
        "format": FORMAT_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dpbr_version": __version__,
    }


def _write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through :func:`dpbr.io.atomic_path`, synced to disk before the rename."""
    from dpbr.io import atomic_path  # dpbr.io imports pandas and pyarrow: not needed to name or read a dataset

    # A file object, not the temporary's name: np.savez would append ".npz" to a name.
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def write(name: str, data_dir: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Cache ``arrays`` and the manifest ``meta`` (plus :func:`stamp`) of ``name``; returns the ``.npz`` path.

    The ``.npz`` is written first, so a manifest never describes arrays that are not there.
    """
    npz, man = cache_paths(name, data_dir)
    _write_atomic(npz, lambda fh: np.savez(fh, **{k: np.ascontiguousarray(arrays[k]) for k in ARRAY_KEYS}))
    text = json.dumps({**meta, **stamp()}, indent=2, sort_keys=True) + "\n"
    _write_atomic(man, lambda fh: fh.write(text.encode()))
    return npz


def read(name: str, data_dir: Path, *, verify: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and manifest from the cache; a checksum mismatch is a UsageError (corrupted cache)."""
    npz, man = cache_paths(name, data_dir)
    meta = manifest(name, data_dir)
    if meta is None or not npz.exists():
        raise FileNotFoundError(npz)
    repair = f"delete {npz.name} and {man.name} in {data_dir} and run `dpbr data fetch {canonical_name(name)}`"
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ARRAY_KEYS}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a corrupted cache
        raise UsageError("--data-dir", f"cached dataset {npz} is unreadable ({type(exc).__name__}: {exc}); {repair}") from None
    if verify:
        got = array_checksum(arrays)
        want = meta.get("checksum")
        if got != want:
            raise UsageError("--data-dir", f"cached dataset {npz} is corrupted (checksum {got[:12]}… differs from the manifest's {str(want)[:12]}…); {repair}")
        known = KNOWN_CHECKSUMS.get(meta.get("name", ""))
        if meta.get("official") and known is not None and got != known:
            raise UsageError("--data-dir", f"cached dataset {npz} claims to be the official {meta['name']} but its checksum differs; {repair}")
    return arrays, meta


def is_valid(name: str, data_dir: Path) -> bool:
    """Whether ``name`` is cached in ``data_dir`` and its arrays match the manifest's checksum."""
    try:
        read(name, data_dir)
        return True
    except (FileNotFoundError, UsageError):
        return False
