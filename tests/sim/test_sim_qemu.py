"""The QEMU arm64 device: build (or reuse) the guest, boot it, and update it.

Runs in CI. The first run on a machine builds the image (measured 72 s idle,
up to 205 s beside the other test worker; cached under $EDGEFLEET_QEMU_CACHE or
~/.cache/edgefleet/qemu) after installing missing host tools with apt (root);
later runs reuse it. Boot plus update take about 1.5-2 minutes under TCG: the
whole test took 262 s cold and 103-121 s warm. A cold cache needs the Debian
and PyPI registries. Bounded by EDGEFLEET_QEMU_TIMEOUT (default 1500 s).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from firmware_sim.qemu.build import BuildConfig, BuildError, default_cache_dir, ensure_image

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.xdist_group("qemu")]

TIMEOUT = float(os.environ.get("EDGEFLEET_QEMU_TIMEOUT", "1500"))


def _why_not() -> str | None:
    if os.geteuid() != 0 and not any(default_cache_dir().glob("image-*/manifest.json")):
        return "building the guest image needs root, and no image is cached"
    if shutil.which("apt-get") is None and not shutil.which("qemu-system-aarch64"):
        return "neither qemu-system-aarch64 nor apt-get (to install it) is here"
    return None


@pytest.mark.timeout(TIMEOUT + 120)
def test_arm64_guest_verifies_selftests_and_swaps(tmp_path: Path, cloud_template: Path) -> None:
    if (why := _why_not()) is not None:
        pytest.skip(why)
    from firmware_sim.qemu.cli import QEMU_DEVICE_ID, run_qemu_device

    timings = run_qemu_device(
        tmp_path,
        install_host_tools=True,
        cloud_template=cloud_template,
        timeout=TIMEOUT,
        say=lambda msg: None,
    )
    result = json.loads((tmp_path / "result.json").read_text())
    device = result["device"]
    assert device["device_id"] == QEMU_DEVICE_ID
    assert device["release"] == 1 and device["state"] == "idle"
    assert device["hardware"]["machine"] == "aarch64"
    kinds = [e["kind"] for e in device["recent_events"]]
    for kind in ("downloading", "verified", "selftest", "swapped"):
        assert kind in kinds, kinds
    console = (tmp_path / "qemu" / "console.log").read_text(errors="replace")
    assert "EDGEFLEET-GUEST: python aarch64 3.11" in console
    print("qemu timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))


def test_failed_build_names_its_step_and_leaves_the_cache_clean(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-cache"):
        pytest.skip("the build needs root and apt")
    cfg = BuildConfig(
        kernel_package="linux-image-edgefleet-does-not-exist", requirements=("paho-mqtt>=2",)
    )
    with pytest.raises(BuildError) as e:
        ensure_image(tmp_path, cfg, install_host_tools=False)
    assert e.value.step in ("host-tools", "kernel"), str(e.value)
    assert f"step '{e.value.step}'" in str(e.value)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".build", "image-"))]
    assert leftovers == [], "a failed build must leave no partial image"
