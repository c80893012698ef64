"""``dpbr data fetch``: make one dataset available in the cache (download or import, verify, cache)."""

from __future__ import annotations

from pathlib import Path

from dpbr.errors import UsageError

__all__ = ["fetch"]


def fetch(name: str, data_dir: str | Path, *, source: str | Path | None = None) -> Path:
    """Fetch dataset ``name`` into ``data_dir`` (from ``source``, a local copy, when given); returns its cache file.

    An unknown name is refused (``NAME``) before anything is checked or written; then the folder must
    be writable (``--data-dir``); the download, import and verification are :func:`dpbr.data.fetch`.
    """
    from dpbr import data
    from dpbr.io import check_folder

    try:
        data.canonical_name(name)
    except UsageError as exc:
        raise UsageError("NAME", exc.message) from None
    check_folder(data_dir, "--data-dir")
    return data.fetch(name, data_dir, source=source)
