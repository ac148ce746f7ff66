"""A content-addressed blob store on local disk: files named by their sha256.

``<root>/sha256/<first two hex digits>/<64 hex digits>``. A blob is written to
a temporary file in its final directory, fsynced and renamed into place, so a
reader never sees half a blob and a crash leaves at most a stray temp file.
Writing the same bytes twice is a no-op. Reads re-hash the bytes: a blob that
rotted or was tampered with on disk raises ``StorageError`` instead of being
released.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO

from cloud._files import fsync_dir as _fsync_dir
from shared.errors import ConfigError, StorageError

__all__ = ["BlobStore", "BlobTooLargeError"]

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class BlobTooLargeError(ConfigError):
    """A stream handed to ``put_stream`` exceeded its size limit."""

    code = "too_large"


class BlobStore:
    """Blobs under ``root``, addressed by the sha256 of their bytes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        """Where blob ``sha256`` lives (it may not exist)."""
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        if not self.exists(sha):
            self._write(sha, [data])
        return sha

    def put_stream(self, stream: BinaryIO, max_bytes: int) -> tuple[str, int]:
        """Store everything ``stream`` yields, at most ``max_bytes``; return (sha256, size).

        Raises ``BlobTooLargeError`` (nothing is kept) once the stream passes the limit.
        """
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := stream.read(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise BlobTooLargeError(
                            f"upload is larger than the limit of {max_bytes} bytes"
                        )
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            sha = h.hexdigest()
            final = self.path(sha)
            if final.is_file():
                tmp.unlink()
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
                _fsync_dir(final.parent)
            return sha, size
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_file(self, path: Path, max_bytes: int) -> tuple[str, int]:
        """Copy the file at ``path`` into the store; return (sha256, size)."""
        with Path(path).open("rb") as f:
            return self.put_stream(f, max_bytes)

    def read(self, sha256: str) -> bytes:
        """The bytes of blob ``sha256``, verified against their name."""
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise StorageError(f"blob {sha256} is missing from the store at {self.root}") from e
        except OSError as e:
            raise StorageError(f"cannot read blob {sha256}: {e}") from e
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            log.error("blob corrupt", extra={"sha256": sha256, "actual": actual})
            raise StorageError(
                f"blob {sha256} is corrupt on disk (its bytes hash to {actual}); "
                "restore it from a backup or add the file again"
            )
        return data

    def _write(self, sha: str, chunks: list[bytes]) -> None:
        final = self.path(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(name, final)
            _fsync_dir(final.parent)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
