"""``edgefleet-sim qemu``: build (or reuse) the arm64 guest and run a release through it.

The run: a private broker and the cloud on the host (loopback; the guest
reaches them at 10.0.2.2), a digits release published (or taken from
``--cloud-template``), a device ``qemu-arm64`` provisioned for the guest, the
guest booted, the release deployed; success when the cloud reports the guest
on the release, idle, with ``machine = aarch64``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["QEMU_DEVICE_ID", "register", "run_qemu_device"]

log = logging.getLogger(__name__)

QEMU_DEVICE_ID = "qemu-arm64"


def run_qemu_device(
    workdir: Path,
    *,
    cache_dir: Path | None = None,
    rebuild: bool = False,
    install_host_tools: bool = False,
    cloud_template: Path | None = None,
    epochs: int = 2,
    timeout: float = 900.0,
    say: Any = print,
) -> dict[str, float]:
    """Boot the guest and roll a release out to it; returns the timings (seconds)."""
    from device.config import provision
    from firmware_sim.api import published_releases
    from firmware_sim.fleet import FleetOptions, SimFleet
    from firmware_sim.qemu.build import ensure_image
    from firmware_sim.qemu.guest import (
        GUEST_HOST_IP,
        QemuDevice,
        build_agent_wheel,
        make_overlay,
    )
    from firmware_sim.qemu.hosttools import boot_tools_missing

    timings: dict[str, float] = {}
    t = time.monotonic()
    image = ensure_image(
        cache_dir, rebuild=rebuild, install_host_tools=install_host_tools, progress=say
    )
    timings["image (build or cache)"] = time.monotonic() - t
    if (why := boot_tools_missing()) is not None:
        raise RuntimeError(why)
    t = time.monotonic()
    wheel = build_agent_wheel(workdir / "wheel")
    timings["agent wheel"] = time.monotonic() - t
    t = time.monotonic()
    with SimFleet(workdir, FleetOptions(devices=0, cloud_template=cloud_template)) as fleet:
        assert fleet.cloud is not None and fleet.broker is not None
        cloud = fleet.cloud
        timings["broker + cloud up"] = time.monotonic() - t
        if 1 not in published_releases(cloud.cloud_dir, "digits"):
            t = time.monotonic()
            cloud.release_digits(0, epochs)
            timings["publish release 1"] = time.monotonic() - t
        http_port = cloud.api.rsplit(":", 1)[1]
        data = workdir / "guest-data"
        provision(
            data,
            device_id=QEMU_DEVICE_ID,
            root_file=cloud.cloud_dir / "repository" / "metadata" / "root.json",
            broker_host=GUEST_HOST_IP,
            broker_port=fleet.broker.port,
            repo_url=f"http://{GUEST_HOST_IP}:{http_port}/tuf/",
            inference_interval=0.05,
            telemetry_interval=2.0,
        )
        overlay = make_overlay(workdir / "overlay.cpio.gz", wheel, data, QEMU_DEVICE_ID)
        deadline = time.monotonic() + timeout
        with QemuDevice(image, overlay, workdir / "qemu") as vm:
            say(f"booting the arm64 guest (console: {vm.console})")
            boot = vm.wait_boot(timeout=max(1.0, deadline - time.monotonic()))
            timings["boot to init"] = boot["init"]
            timings["boot to network"] = boot["network"]

            def alive() -> None:
                vm.check_running()

            t = time.monotonic()
            cloud.wait_for(
                lambda devs: any(d["device_id"] == QEMU_DEVICE_ID and d["online"] for d in devs),
                "the guest's agent online",
                max(1.0, deadline - time.monotonic()),
                check=alive,
                interval=1.0,
            )
            timings["agent online (after network)"] = time.monotonic() - t
            say("the guest's agent is online; deploying digits release 1")
            t = time.monotonic()
            cloud.deploy("digits", 1, [QEMU_DEVICE_ID])
            devices = cloud.wait_for(
                lambda devs: any(
                    d["device_id"] == QEMU_DEVICE_ID and d["release"] == 1 and d["state"] == "idle"
                    for d in devs
                ),
                "the guest on release 1",
                max(1.0, deadline - time.monotonic()),
                check=alive,
                interval=1.0,
            )
            timings["release verified, self-tested, swapped"] = time.monotonic() - t
            guest = next(d for d in devices if d["device_id"] == QEMU_DEVICE_ID)
            machine = (guest.get("hardware") or {}).get("machine")
            if machine != "aarch64":
                raise RuntimeError(
                    f"the device on release 1 reports machine {machine!r}, not aarch64"
                )
            events = [e["kind"] for e in guest.get("recent_events", [])]
            say(f"guest events: {', '.join(events)}")
            (workdir / "result.json").write_text(
                json.dumps({"timings": timings, "device": guest, "image": image.manifest}, indent=1)
            )
    return timings


def cmd_qemu(args: argparse.Namespace) -> int:
    from firmware_sim.qemu.build import ensure_image

    if args.build_only:
        t = time.monotonic()
        image = ensure_image(
            args.cache_dir,
            rebuild=args.rebuild,
            install_host_tools=args.install_host_tools,
            progress=print,
        )
        print(f"guest image ready in {time.monotonic() - t:.1f}s: {image.path}")
        print(json.dumps(image.manifest.get("timings", {}), indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="edgefleet-qemu-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        timings = run_qemu_device(
            workdir,
            cache_dir=args.cache_dir,
            rebuild=args.rebuild,
            install_host_tools=args.install_host_tools,
            cloud_template=args.cloud_template,
            epochs=args.epochs,
            timeout=args.timeout,
        )
    for name, seconds in timings.items():
        print(f"  {name}: {seconds:.1f}s")
    print("QEMU DEVICE OK: the arm64 guest verified, self-tested and swapped to release 1")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("qemu", help="boot an arm64 guest under QEMU and update it")
    s.add_argument(
        "--cache-dir",
        type=Path,
        help="image cache (default $EDGEFLEET_QEMU_CACHE or ~/.cache/edgefleet/qemu)",
    )
    s.add_argument("--rebuild", action="store_true", help="build the image even if cached")
    s.add_argument("--build-only", action="store_true", help="build/check the image and exit")
    s.add_argument(
        "--install-host-tools",
        action="store_true",
        help="apt-get install qemu/mmdebstrap and enable arm64 + binfmt (root)",
    )
    s.add_argument("--workdir", type=Path, help="keep logs and the console here")
    s.add_argument(
        "--cloud-template", type=Path, help="cloud data dir with digits release 1 already published"
    )
    s.add_argument("--epochs", type=int, default=2)
    s.add_argument(
        "--timeout", type=float, default=900.0, help="seconds from boot to the guest on the release"
    )
    s.set_defaults(func=cmd_qemu)
