"""Host prerequisites of the QEMU device: check them, or install them (root).

Needed: ``qemu-system-aarch64`` (boot), and for a build also ``mmdebstrap``,
qemu-user with a binfmt_misc handler for aarch64 (run the guest's maintainer
scripts), ``dpkg-deb``/``apt-get`` with the arm64 architecture enabled (fetch
the Debian arm64 kernel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from firmware_sim._system import SimError

__all__ = ["BOOT_PACKAGES", "BUILD_PACKAGES", "boot_tools_missing", "ensure_host_tools"]

BOOT_PACKAGES = ("qemu-system-arm",)
BUILD_PACKAGES = (
    "qemu-system-arm",
    "qemu-user-static",
    "binfmt-support",
    "mmdebstrap",
    "arch-test",
)
_BINFMT = Path("/proc/sys/fs/binfmt_misc")


def boot_tools_missing() -> str | None:
    """Why a cached image cannot boot here, or None."""
    if shutil.which("qemu-system-aarch64") is None:
        return "qemu-system-aarch64 is missing (Debian: apt-get install qemu-system-arm)"
    return None


def _binfmt_ready() -> bool:
    return (_BINFMT / "qemu-aarch64").exists() and (
        _BINFMT / "qemu-aarch64"
    ).read_text().startswith("enabled")


def _arm64_enabled() -> bool:
    out = subprocess.run(
        ["dpkg", "--print-foreign-architectures"],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    return "arm64" in out.stdout.split()


def _missing() -> list[str]:
    missing = []
    for tool, package in (
        ("qemu-system-aarch64", "qemu-system-arm"),
        ("mmdebstrap", "mmdebstrap"),
        ("update-binfmts", "binfmt-support"),
        ("arch-test", "arch-test"),
    ):
        if shutil.which(tool) is None:
            missing.append(package)
    if (
        not Path("/usr/libexec/qemu-binfmt/aarch64-binfmt-P").exists()
        and shutil.which("qemu-aarch64-static") is None
    ):
        missing.append("qemu-user-static")
    return missing


def ensure_host_tools(sh: Callable[..., str], install: bool) -> None:
    """Make sure a build can run; with ``install`` (root), fix what is missing."""
    missing = _missing()
    root = os.geteuid() == 0
    if missing:
        if not (install and root):
            raise SimError(
                f"missing Debian packages: {' '.join(missing)} (run as root with "
                "--install-host-tools, or apt-get install them)"
            )
        sh("apt-get", "update", "-q")
        sh(
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            *BUILD_PACKAGES,
        )
    if not root:
        raise SimError("building the guest image needs root (mmdebstrap --mode=root, chroot)")
    if not (_BINFMT / "register").exists():
        sh("mount", "-t", "binfmt_misc", "binfmt_misc", str(_BINFMT))
    if not _binfmt_ready():
        sh("update-binfmts", "--enable", "qemu-aarch64")
    if not _binfmt_ready():
        raise SimError("no binfmt_misc handler for aarch64 after update-binfmts")
    if not _arm64_enabled():
        if not install:
            raise SimError(
                "dpkg has no arm64 architecture (dpkg --add-architecture arm64 && "
                "apt-get update, or pass --install-host-tools)"
            )
        sh("dpkg", "--add-architecture", "arm64")
        sh("apt-get", "update", "-q")
