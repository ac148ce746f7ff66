"""Write Linux initramfs archives (cpio "newc") from a directory tree.

The kernel unpacks the initrd as a concatenation of (optionally compressed)
cpio archives, so the QEMU device boots ``base.cpio.gz`` (the cached guest)
followed by a small per-run overlay (the agent and its provisioned data dir)
without rebuilding the base. Written here rather than with ``cpio(1)`` so the
archive is deterministic (sorted, owned by root, fixed mtime) and needs no tool.
"""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_cpio", "write_cpio_gz"]

_TRAILER = "TRAILER!!!"


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _header(
    out: BinaryIO,
    name: str,
    mode: int,
    size: int,
    ino: int,
    nlink: int = 1,
    rdev: tuple[int, int] = (0, 0),
) -> None:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
    out.write(b"070701" + b"".join(f"{f:08X}".encode() for f in fields))
    out.write(encoded)
    out.write(_pad(110 + len(encoded)))


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            yield base / name


def write_cpio(root: Path, out: BinaryIO, prefix: str = "") -> int:
    """Archive everything under ``root`` (as ``prefix/...``); returns the entry count.

    Hard links are stored as separate files; sockets and fifos are skipped;
    device nodes keep their numbers (``/dev`` is a devtmpfs in the guest anyway).
    """
    root = Path(root)
    ino = 1
    count = 0
    if prefix:
        parts = prefix.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            _header(out, "/".join(parts[:i]), stat.S_IFDIR | 0o755, 0, ino, nlink=2)
            ino += 1
    for path in _walk(root):
        rel = path.relative_to(root).as_posix()
        name = f"{prefix.strip('/')}/{rel}" if prefix else rel
        st = path.lstat()
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            target = os.readlink(path).encode()
            _header(out, name, mode, len(target), ino)
            out.write(target + _pad(len(target)))
        elif stat.S_ISREG(mode):
            _header(out, name, mode, st.st_size, ino)
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    out.write(chunk)
            out.write(_pad(st.st_size))
        elif stat.S_ISDIR(mode):
            _header(out, name, mode, 0, ino, nlink=2)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            _header(out, name, mode, 0, ino, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
        else:
            continue
        ino += 1
        count += 1
    _header(out, _TRAILER, 0, 0, 0)
    return count


def write_cpio_gz(root: Path, dest: Path, prefix: str = "", level: int = 6) -> int:
    """``write_cpio`` into a gzip file (the kernel's ``CONFIG_RD_GZIP``)."""
    with gzip.open(dest, "wb", compresslevel=level) as gz:
        return write_cpio(root, gz, prefix)  # type: ignore[arg-type]
