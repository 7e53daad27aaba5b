"""Atomic files: a crash at any instant leaves either the old content or the new one, never a torn file.

Write to a temporary file in the same directory, flush and fsync it, ``os.replace`` it over the target,
then fsync the directory so the rename itself is durable (PITFALLS.md: OpenFL's aggregator could not restart
after being killed mid-save).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def atomic_write_json(path: Path, document: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    )


def atomic_write_arrays(path: Path, **arrays: npt.NDArray[Any]) -> None:
    """An ``.npz`` file written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buffer.getvalue())


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["atomic_write_arrays", "atomic_write_bytes", "atomic_write_json"]
