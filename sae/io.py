"""Small file helpers shared by every writer and reader: atomic writes, so an interrupted or
failed write never leaves a half-written file under the final name, and file checksums."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync and rename it into place.

    On any error (including disk full) the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def slug(text: object, limit: int = 60) -> str:
    """`text` as a file-name part: runs of characters other than letters, digits, _ . - become
    "_", and only the last `limit` characters are kept (the distinctive end of a path)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))[-limit:]


def cache_dir(*parts: str) -> Path:
    """The sae-circuits cache: $SAE_CIRCUITS_CACHE, else ~/.cache/sae-circuits (created)."""
    root = Path(os.environ.get("SAE_CIRCUITS_CACHE") or Path.home() / ".cache" / "sae-circuits")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()
