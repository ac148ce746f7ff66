"""The steps of a guest image build (see ``firmware_sim.qemu.build``).

Each step runs host commands through ``BuildSteps.sh``, which appends their
output to the build log and turns a failure into a ``BuildError`` that names
the step and the log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from firmware_sim._system import SimError, unmount_under
from firmware_sim.qemu.cpio import write_cpio_gz
from firmware_sim.qemu.initscript import INIT_SCRIPT, MODULES

if TYPE_CHECKING:
    from firmware_sim.qemu.build import BuildConfig

__all__ = ["PLATFORMS", "BuildError", "BuildSteps"]

log = logging.getLogger(__name__)

#: Wheels for glibc 2.17 .. 2.36 (Debian 12): pip does not widen ``manylinux_2_X`` itself.
PLATFORMS = ("manylinux2014_aarch64", *(f"manylinux_2_{n}_aarch64" for n in range(17, 37)))
_TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/zoneinfo",
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/ensurepip",
)


class BuildError(SimError):
    """The guest image build failed at ``step``."""

    def __init__(self, step: str, message: str, log_path: Path | None = None) -> None:
        self.step = step
        self.log_path = log_path
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"QEMU guest build failed at step '{step}': {message}{where}")


class BuildSteps:
    """One build's state: its temp dir, log, timings and facts."""

    def __init__(
        self, cfg: BuildConfig, tmp: Path, downloads: Path, log_path: Path, install_host_tools: bool
    ) -> None:
        self.cfg, self.tmp, self.downloads = cfg, tmp, downloads
        self.log_path, self.install_host_tools = log_path, install_host_tools
        self.rootfs = tmp / "rootfs"
        self.timings: dict[str, float] = {}
        self.facts: dict[str, Any] = {}
        self.step = "host-tools"

    def sh(
        self, *cmd: str, timeout: float = 1800, cwd: Path | None = None, capture: bool = False
    ) -> str:
        """Run a build command; its output goes to the build log as it runs."""
        with self.log_path.open("a") as logf:
            logf.write(f"\n[{self.step}] $ {' '.join(cmd)}\n")
            logf.flush()
            start = logf.tell()
            try:
                out = subprocess.run(  # noqa: S603 - fixed commands
                    list(cmd),
                    stdout=subprocess.PIPE if capture else logf,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=timeout,
                    cwd=cwd,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise BuildError(self.step, f"`{cmd[0]}` could not run: {e}", self.log_path) from e
            if capture:
                logf.write(out.stdout)
        text = out.stdout if capture else _tail_from(self.log_path, start)
        if out.returncode != 0:
            tail = "\n".join(text.strip().splitlines()[-8:])
            raise BuildError(
                self.step,
                f"`{' '.join(cmd[:3])} ...` exited {out.returncode}:\n{tail}",
                self.log_path,
            )
        return text if capture else ""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.step = name
        t = time.monotonic()
        log.info("qemu build: %s ...", name)
        try:
            yield
        except BuildError:
            raise
        except Exception as e:
            raise BuildError(name, f"{type(e).__name__}: {e}", self.log_path) from e
        self.timings[name] = round(time.monotonic() - t, 1)
        log.info("qemu build: %s done in %.1fs", name, self.timings[name])

    # -- steps ------------------------------------------------------------------------
    def kernel(self) -> None:
        depends = self.sh("apt-cache", "depends", f"{self.cfg.kernel_package}:arm64", capture=True)
        image = next(
            (
                line.split()[-1]
                for line in depends.splitlines()
                if "Depends:" in line and "linux-image-" in line
            ),
            None,
        )
        package = image or f"{self.cfg.kernel_package}:arm64"
        debs = self.downloads / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        before = set(debs.glob("*.deb"))
        name = package.split(":")[0]
        cached = sorted(debs.glob(f"{name}_*_arm64.deb"))
        if not cached:
            self.sh("apt-get", "download", package, cwd=debs)
            cached = sorted(set(debs.glob(f"{name}_*_arm64.deb")) - before)
        if not cached:
            raise BuildError(self.step, f"apt-get download {package} produced no .deb")
        extracted = self.tmp / "kernel"
        extracted.mkdir()
        # Only the kernel and the few modules the guest loads (the package is ~60 MB).
        wanted = ["--wildcards", "./boot/vmlinuz-*", *(f"*/{name}.ko" for name in MODULES)]
        self.sh(
            "sh",
            "-c",
            'deb=$1 dir=$2; shift 2; dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir" "$@"',
            "sh",
            str(cached[-1]),
            str(extracted),
            *wanted,
        )
        vmlinuz = sorted((extracted / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise BuildError(self.step, f"{cached[-1].name} holds no /boot/vmlinuz-*")
        shutil.copy2(vmlinuz[-1], self.tmp / "vmlinuz")
        self.facts["kernel"] = vmlinuz[-1].name.removeprefix("vmlinuz-")
        self.facts["kernel_deb"] = cached[-1].name

    def rootfs_bootstrap(self) -> None:
        """Debian arm64 packages into ``rootfs`` with mmdebstrap.

        ``extract`` (default): the packages and their dependencies are unpacked on
        the host, no maintainer script runs, nothing is emulated; the few things
        those scripts would do for a one-program initramfs are done by ``_fixup``.
        ``minbase``: a complete Debian minbase whose maintainer scripts run under
        qemu-user (binfmt_misc). Measured on 2 cores: extract ~1 min, minbase
        ~8 min, debootstrap --foreign + --second-stage over 9 min (its dependency
        resolver in Perl runs emulated too).
        """
        self.sh(
            "mmdebstrap",
            "--mode=root",
            "--arch=arm64",
            f"--variant={self.cfg.variant}",
            f"--include={','.join(self.cfg.packages)}",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            '--aptopt=Acquire::Retries "3"',
            self.cfg.suite,
            str(self.rootfs),
            self.cfg.mirror,
            timeout=3600,
        )
        if self.cfg.variant == "extract":
            self._fixup()

    def _fixup(self) -> None:
        root = self.rootfs
        for name in ("proc", "sys", "dev", "run", "tmp", "root", "etc", "var/tmp"):
            (root / name).mkdir(parents=True, exist_ok=True)
        sh = root / "bin" / "sh"
        if not sh.exists() and not sh.is_symlink():
            sh.symlink_to("dash")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\n")
        # Debian compiles the stdlib in python3's postinst; do it here (same bytecode
        # magic as the host's 3.11), or every guest boot compiles it under TCG.
        stdlib = root / "usr" / "lib" / f"python{self.cfg.python_version}"
        self.sh(
            _python(),
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "-s",
            str(root),
            "-p",
            "/",
            "-x",
            r"(/test/|/lib2to3/tests/|/idlelib/)",
            str(stdlib),
        )

    def wheels(self) -> Path:
        reqs = sorted(self.cfg.requirements)
        tag = hashlib.sha256(
            json.dumps([reqs, PLATFORMS, self.cfg.python_version]).encode()
        ).hexdigest()[:12]
        final = self.downloads / f"wheels-{tag}"
        if (final / ".complete").exists():
            self.facts["wheels"] = "cached"
            return final
        partial = self.downloads / f".wheels-{tag}-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
        self.sh(
            _python(),
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            *platform_args,
            "--python-version",
            self.cfg.python_version,
            "--implementation",
            "cp",
            "-d",
            str(partial),
            *reqs,
        )
        (partial / ".complete").write_text(json.dumps(reqs))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        return final

    def python_deps(self, wheels: Path) -> None:
        target = self.rootfs / "opt" / "edgefleet" / "deps"
        platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
        self.sh(
            _python(),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-index",
            "--find-links",
            str(wheels),
            "--only-binary=:all:",
            *platform_args,
            "--python-version",
            self.cfg.python_version,
            "--implementation",
            "cp",
            "--target",
            str(target),
            *self.cfg.requirements,
        )
        self.facts["deps"] = sorted(p.name for p in target.glob("*.dist-info"))

    def assemble(self) -> None:
        root = self.rootfs
        for rel in _TRIM:
            shutil.rmtree(root / rel, ignore_errors=True)
        modules = root / "lib" / "modules" / "edgefleet"
        modules.mkdir(parents=True, exist_ok=True)
        found = {
            p.name.removesuffix(".ko"): p
            for p in (self.tmp / "kernel" / "lib" / "modules").rglob("*.ko")
        }
        for name in MODULES:
            if name not in found:
                raise BuildError(self.step, f"kernel module {name}.ko not in the kernel package")
            shutil.copy2(found[name], modules / f"{name}.ko")
        init = root / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        (root / "etc" / "hostname").write_text("edgefleet-qemu\n")
        if not (root / "usr" / "bin" / "python3").exists():
            raise BuildError(self.step, "the root file system has no /usr/bin/python3")

    def pack(self) -> None:
        count = write_cpio_gz(self.rootfs, self.tmp / "base.cpio.gz", level=1)
        self.facts["files"] = count
        self.facts["initrd_bytes"] = (self.tmp / "base.cpio.gz").stat().st_size
        unmount_under(self.rootfs)
        shutil.rmtree(self.rootfs)
        shutil.rmtree(self.tmp / "kernel")


def _tail_from(path: Path, offset: int, limit: int = 64 * 1024) -> str:
    with path.open("rb") as f:
        f.seek(max(offset, path.stat().st_size - limit))
        return f.read().decode(errors="replace")


def _python() -> str:
    return sys.executable
