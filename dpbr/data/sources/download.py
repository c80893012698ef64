"""Downloads of the official files: a short socket timeout, an overall deadline, MD5 checks, and
``DPBR_OFFLINE`` to fail at once without touching the network."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Sequence

from dpbr.data.sources.base import SourceError

__all__ = ["DOWNLOAD_DEADLINE_S", "DOWNLOAD_TIMEOUT_S", "download", "download_any", "offline"]

DOWNLOAD_TIMEOUT_S = float(os.environ.get("DPBR_DOWNLOAD_TIMEOUT", "10"))
"""Socket timeout of one download attempt (connect and each read), seconds. Env ``DPBR_DOWNLOAD_TIMEOUT``."""

DOWNLOAD_DEADLINE_S = 900.0
"""Upper bound on the whole transfer of one file, seconds (a trickling connection cannot hang a job)."""


def offline() -> bool:
    return os.environ.get("DPBR_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def download(url: str, md5: str | None = None) -> bytes:
    """GET ``url`` with a short socket timeout and an overall deadline; check the MD5 when given."""
    if offline():
        raise SourceError("DPBR_OFFLINE is set")
    import urllib.request  # with http.client and email: only a download needs them, not `import dpbr.data`

    from dpbr import __version__

    req = urllib.request.Request(url, headers={"User-Agent": f"dpbr/{__version__}"})
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
    chunks: list[bytes] = []
    try:
        with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT_S) as resp:  # noqa: S310 - fixed https/http URLs
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise SourceError(f"{url}: transfer exceeded {DOWNLOAD_DEADLINE_S:.0f} s")
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - every network failure means "try the next source"
        raise SourceError(f"{url}: {type(exc).__name__}: {exc}") from None
    data = b"".join(chunks)
    if md5 is not None:
        got = hashlib.md5(data).hexdigest()  # noqa: S324 - integrity check against published sums
        if got != md5:
            raise SourceError(f"{url}: MD5 {got} differs from the published {md5}")
    return data


def download_any(mirrors: Sequence[str], filename: str, md5: str | None) -> tuple[bytes, str]:
    errors = []
    for mirror in mirrors:
        url = mirror + filename
        try:
            return download(url, md5), url
        except SourceError as exc:
            errors.append(str(exc))
    raise SourceError("; ".join(errors))
