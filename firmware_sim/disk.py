"""A full disk on demand: a device's data dir on a small tmpfs that can be filled.

``SmallDisk`` mounts a tmpfs of a few MB over a device data dir before the
device is provisioned. ``fill()`` writes a ballast file until the file system
has no space left (the agent's next write fails with ENOSPC, its
``StorageError``); ``free()`` deletes the ballast. ``close()`` unmounts it,
whatever happened (and a ledger entry covers a simulator killed outright).
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from pathlib import Path

from firmware_sim._system import Ledger, SimError, run, unmount_under

__all__ = ["SmallDisk", "mounts_unavailable"]

log = logging.getLogger(__name__)

_BALLAST = ".edgefleet-sim-ballast"


def mounts_unavailable() -> str | None:
    """Why a full-disk fault cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "a full-disk fault needs root (it mounts a small tmpfs over the data dir)"
    return None


class SmallDisk:
    """A tmpfs of ``size_mb`` mounted at ``path`` (created if missing)."""

    def __init__(self, path: Path, size_mb: int = 8) -> None:
        self.path = Path(path)
        self.size_mb = size_mb
        self.ledger = Ledger(f"disk-{uuid.uuid4().hex[:8]}")
        self.mounted = False

    def open(self) -> SmallDisk:
        why = mounts_unavailable()
        if why:
            raise SimError(why)
        self.path.mkdir(parents=True, exist_ok=True)
        self.ledger.add("mounts", str(self.path.resolve()))
        run(
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={self.size_mb}m,mode=0755",
            "edgefleet-sim",
            str(self.path),
        )
        self.mounted = True
        return self

    def fill(self) -> int:
        """Fill the file system; returns the bytes written."""
        written = 0
        chunk = b"\0" * (64 * 1024)
        try:
            with open(self.path / _BALLAST, "ab") as f:
                while True:
                    f.write(chunk)
                    f.flush()
                    written += len(chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise SimError(f"could not fill {self.path}: {e}") from e
        # Fill the last partial block too.
        try:
            with open(self.path / _BALLAST, "ab", buffering=0) as f:
                while f.write(b"\0" * 512):
                    written += 512
        except OSError:
            pass
        log.info("filled %s (%d bytes of ballast)", self.path, written)
        return written

    def free(self) -> None:
        (self.path / _BALLAST).unlink(missing_ok=True)
        log.info("freed %s", self.path)

    def close(self) -> None:
        if self.mounted:
            unmount_under(self.path)
            self.mounted = False
        self.ledger.remove("mounts", str(self.path.resolve()))

    def __enter__(self) -> SmallDisk:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
