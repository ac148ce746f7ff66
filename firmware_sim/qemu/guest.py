"""Boot the cached arm64 guest with this checkout's agent and a provisioned device.

Each boot packs a small overlay initramfs: the agent (this repo built as a
wheel and unpacked into ``/opt/edgefleet/app``), the device's provisioned data
dir (``/data/<id>``) and ``/opt/edgefleet/run.sh`` which starts
``edgefleet-device run``. The kernel unpacks the cached base and then the
overlay. The guest uses QEMU user networking: it reaches the host's loopback
services at 10.0.2.2, so the broker and the cloud need no other listener.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from firmware_sim._system import SimError
from firmware_sim.procs import ProcessGroup
from firmware_sim.qemu.build import GuestImage
from firmware_sim.qemu.cpio import write_cpio_gz
from firmware_sim.qemu.initscript import MARK_NET, MARK_READY

__all__ = ["GUEST_HOST_IP", "QemuDevice", "build_agent_wheel", "make_overlay", "repo_root"]

log = logging.getLogger(__name__)

#: The host as seen from the guest under QEMU user networking (slirp).
GUEST_HOST_IP = "10.0.2.2"
_SOURCES = ("pyproject.toml", "README.md", "shared", "device", "cloud", "firmware_sim")


def repo_root() -> Path:
    """The source checkout this package runs from (the wheel is built from it)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise SimError(
            f"the QEMU device packs the agent from a source checkout; {root} has no pyproject.toml"
        )
    return root


def build_agent_wheel(out_dir: Path) -> Path:
    """Build ``edgefleet-*.whl`` from a copy of the checkout (the tree is not touched)."""
    src = repo_root()
    with tempfile.TemporaryDirectory(prefix="edgefleet-wheel-") as tmp:
        copy = Path(tmp) / "src"
        copy.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "scenarios")
        for name in _SOURCES:
            p = src / name
            if p.is_dir():
                shutil.copytree(p, copy / name, ignore=ignore)
            elif p.is_file():
                shutil.copy2(p, copy / name)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--disable-pip-version-check",
            "-q",
            "--no-deps",
            "-w",
            str(out_dir),
            str(copy),
        ]
        # The environment's setuptools first (no download); if it is too old for
        # pyproject.toml, an isolated build with the pinned build requirements.
        for extra in (["--no-build-isolation"], []):
            out = subprocess.run(  # noqa: S603 - fixed commands
                [*cmd, *extra],
                capture_output=True,
                text=True,
                check=False,
                timeout=300,
            )
            if out.returncode == 0:
                break
        else:
            raise SimError(f"building the agent wheel failed: {out.stderr[-2000:]}")
    wheels = sorted(Path(out_dir).glob("edgefleet-*.whl"))
    if not wheels:
        raise SimError("pip wheel produced no edgefleet wheel")
    return wheels[-1]


def make_overlay(
    dest: Path, wheel: Path, data_dir: Path, device_id: str, log_level: str = "INFO"
) -> Path:
    """Pack the per-boot overlay archive at ``dest``."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-overlay-") as tmp:
        root = Path(tmp)
        app = root / "opt" / "edgefleet" / "app"
        app.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(app)  # a wheel we just built ourselves
        shutil.copytree(data_dir, root / "data" / device_id)
        run = root / "opt" / "edgefleet" / "run.sh"
        run.write_text(
            "#!/bin/sh\n"
            "export PYTHONPATH=/opt/edgefleet/app:/opt/edgefleet/deps PYTHONUNBUFFERED=1\n"
            "echo \"EDGEFLEET-GUEST: python $(python3 -c 'import platform; "
            "print(platform.machine(), platform.python_version())')\"\n"
            f"exec python3 -m device.cli --log-level {log_level} run "
            f"--data-dir /data/{device_id} --source random\n"
        )
        run.chmod(0o755)
        write_cpio_gz(root, dest, level=1)
    return dest


class QemuDevice:
    """``qemu-system-aarch64 -M virt -cpu cortex-a72`` (TCG) running the guest."""

    def __init__(
        self,
        image: GuestImage,
        overlay: Path,
        workdir: Path,
        *,
        memory_mb: int = 2048,
        smp: int = 2,
    ) -> None:
        self.image, self.overlay, self.workdir = image, overlay, Path(workdir)
        self.memory_mb, self.smp = memory_mb, smp
        self.console = self.workdir / "console.log"
        self.procs = ProcessGroup(self.workdir)
        self.started_at: float | None = None

    def command(self, initrd: Path) -> list[str]:
        return [
            "qemu-system-aarch64",
            "-M",
            "virt",
            "-cpu",
            "cortex-a72",
            "-smp",
            str(self.smp),
            "-m",
            str(self.memory_mb),
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{self.console}",
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyAMA0 rdinit=/init panic=-1 loglevel=4",
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
            "-device",
            "virtio-rng-pci",
        ]

    def start(self) -> None:
        initrd = self.workdir / "initrd.cpio.gz"
        with initrd.open("wb") as out:  # the kernel unpacks concatenated archives in order
            for part in (self.image.initrd, self.overlay):
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        self.console.write_text("")
        self.started_at = time.monotonic()
        self.procs.start("qemu", self.command(initrd))

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_console(self, marker: str, timeout: float) -> float:
        """Wait for ``marker`` on the serial console; seconds since start."""
        assert self.started_at is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.console_text():
                return time.monotonic() - self.started_at
            self.check_running()
            time.sleep(0.2)
        raise TimeoutError(
            f"no {marker!r} on the guest console within {timeout:g}s; "
            f"console tail:\n{self.console_text()[-3000:]}"
        )

    def check_running(self) -> None:
        proc = self.procs.procs.get("qemu")
        if proc is not None and proc.poll() is not None:
            raise SimError(
                f"qemu exited with code {proc.returncode}:\n"
                f"{self.procs.log_tail('qemu')}\nconsole:\n"
                f"{self.console_text()[-3000:]}"
            )

    def wait_boot(self, timeout: float) -> dict[str, float]:
        return {
            "init": self.wait_console(MARK_READY, timeout),
            "network": self.wait_console(MARK_NET, timeout),
        }

    def stop(self) -> None:
        self.procs.stop_all()

    def __enter__(self) -> QemuDevice:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
