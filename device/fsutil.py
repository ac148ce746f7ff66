"""Crash-safe file writes for the device.

Every file the agent persists (state, slots, telemetry buffer) is written as a
temp file in the same directory, fsynced, renamed over the target with
``os.replace`` and the directory fsynced, so a power cut at any instant leaves
either the old or the new file, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from shared.errors import StorageError

__all__ = ["atomic_write_bytes", "atomic_write_json", "fsync_dir", "read_json"]


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (rename, create) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    Raises ``StorageError`` (e.g. disk full) and leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        reason = "disk full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise StorageError(f"could not write {path}: {reason}") from e


def atomic_write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically and durably."""
    atomic_write_bytes(path, json.dumps(value, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    """Read a JSON file; ``StorageError`` if it is unreadable or corrupt."""
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise StorageError(f"could not read {path}: {e}") from e
