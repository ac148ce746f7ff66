"""Build (once) and cache a minimal arm64 Debian guest for the QEMU device.

The guest is a kernel plus an initramfs: a Debian ``minbase`` root file system
with python3, the device agent's dependencies (aarch64 wheels fetched on the
host, so the guest needs no network for pip) installed in
``/opt/edgefleet/deps``, the virtio network modules, and an ``/init`` that
brings up the network and runs whatever the per-run overlay provides (see
``firmware_sim.qemu.guest``). The agent itself is *not* in the cached image: it
changes with every commit, so each boot adds it in a small overlay archive.

Steps (each named in logs and in a ``BuildError``): ``host-tools``,
``kernel``, ``rootfs``, ``wheels``, ``python-deps``, ``assemble``, ``pack``,
``commit``. A build happens in a temp dir inside the cache dir and is renamed
into place only when complete, so the cache holds whole images or nothing;
a failed build removes its temp dir (unmounting anything left mounted there).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from firmware_sim._system import SimError, unmount_under
from firmware_sim.qemu.hosttools import ensure_host_tools
from firmware_sim.qemu.steps import BuildError, BuildSteps

__all__ = [
    "BuildConfig",
    "BuildError",
    "GuestImage",
    "default_cache_dir",
    "ensure_image",
    "requirements_for_guest",
]

log = logging.getLogger(__name__)

#: Bump when the image layout changes, to invalidate old caches.
BUILDER_VERSION = 3
STEPS = ("host-tools", "kernel", "rootfs", "wheels", "python-deps", "assemble", "pack", "commit")


def default_cache_dir() -> Path:
    env = os.environ.get("EDGEFLEET_QEMU_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgefleet" / "qemu"


def requirements_for_guest() -> list[str]:
    """The agent's runtime requirements (``edgefleet[device]``) for an aarch64 guest.

    Read from the checkout's ``pyproject.toml`` (installed metadata can be stale
    in an editable install), markers evaluated for Linux aarch64, CPython 3.11.
    """
    import tomllib

    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise SimError(f"cannot read the agent's requirements from {pyproject}: {e}") from e
    env = {
        "platform_machine": "aarch64",
        "sys_platform": "linux",
        "python_version": "3.11",
        "python_full_version": "3.11.2",
        "platform_system": "Linux",
        "implementation_name": "cpython",
        "os_name": "posix",
        "extra": "device",
    }
    out = []
    for text in [
        *project.get("dependencies", []),
        *project.get("optional-dependencies", {}).get("device", []),
    ]:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            out.append(str(req))
    return sorted(set(out))


@dataclass(frozen=True)
class BuildConfig:
    """What goes into the guest image; every field is part of the cache key."""

    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    #: mmdebstrap variant: ``extract`` (fast, no maintainer scripts) or ``minbase``.
    variant: str = "extract"
    packages: tuple[str, ...] = (
        "python3",
        "libstdc++6",
        "dash",
        "coreutils",
        "mount",
        "kmod",
        "iproute2",
    )
    kernel_package: str = "linux-image-arm64"
    python_version: str = "3.11"
    requirements: tuple[str, ...] = field(default_factory=lambda: tuple(requirements_for_guest()))

    def key(self) -> str:
        blob = json.dumps({"v": BUILDER_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GuestImage:
    """A complete cached image: boot ``kernel`` with ``initrd`` (+ an overlay)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "base.cpio.gz"


def _locked(path: Path) -> contextlib.AbstractContextManager[Any]:
    @contextlib.contextmanager
    def cm() -> Iterator[None]:
        with path.open("w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    return cm()


def cached_image(cache_dir: Path, cfg: BuildConfig) -> GuestImage | None:
    final = Path(cache_dir) / f"image-{cfg.key()}"
    manifest = final / "manifest.json"
    if not manifest.exists():
        return None
    return GuestImage(final, json.loads(manifest.read_text()))


def ensure_image(
    cache_dir: Path | None = None,
    cfg: BuildConfig | None = None,
    *,
    rebuild: bool = False,
    install_host_tools: bool = False,
    progress: Callable[[str], None] | None = None,
) -> GuestImage:
    """The cached guest image for ``cfg``, building it first if needed."""
    cfg = cfg or BuildConfig()
    cache = Path(cache_dir or default_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: log.info("%s", msg))
    if not rebuild and (image := cached_image(cache, cfg)) is not None:
        return image
    with _locked(cache / "build.lock"):  # one build per cache at a time
        if not rebuild and (image := cached_image(cache, cfg)) is not None:
            return image
        key = cfg.key()
        (cache / "logs").mkdir(exist_ok=True)
        log_path = cache / "logs" / f"build-{key}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        tmp = cache / f".build-{key}-{os.getpid()}"
        _remove(tmp)
        tmp.mkdir()
        build = BuildSteps(cfg, tmp, cache / "downloads", log_path, install_host_tools)
        t0 = time.monotonic()
        try:
            with build.stage("host-tools"):
                ensure_host_tools(build.sh, install=install_host_tools)
            say(f"building the arm64 guest image (once; cached in {cache}); log: {log_path}")
            with build.stage("kernel"):
                build.kernel()
            with build.stage("rootfs"):
                build.rootfs_bootstrap()
            with build.stage("wheels"):
                wheels = build.wheels()
            with build.stage("python-deps"):
                build.python_deps(wheels)
            with build.stage("assemble"):
                build.assemble()
            with build.stage("pack"):
                build.pack()
            with build.stage("commit"):
                manifest = {
                    "key": key,
                    "config": asdict(cfg),
                    "built_at": time.time(),
                    "build_seconds": round(time.monotonic() - t0, 1),
                    "timings": build.timings,
                    **build.facts,
                }
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
                final = cache / f"image-{key}"
                old = cache / f".old-{key}-{os.getpid()}"
                if final.exists():
                    os.replace(final, old)
                os.replace(tmp, final)
                _remove(old)
        except BaseException:
            _remove(tmp)
            raise
        say(f"guest image built in {time.monotonic() - t0:.0f}s: {final}")
        return GuestImage(final, manifest)


def _remove(path: Path) -> None:
    if path.exists():
        unmount_under(path)
        shutil.rmtree(path, ignore_errors=True)
