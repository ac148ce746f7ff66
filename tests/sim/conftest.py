"""Fixtures for the simulator tests: one cloud data dir with a published digits
release, shared by every test (and every xdist worker) so the model is trained
once; and a guard that no test leaves a namespace, veth or mount behind."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_sim.api import published_releases
from firmware_sim.procs import python_cmd


def _sim_resources(tmp: Path) -> set[str]:
    """Namespaces, links and mounts this process's simulators created (other xdist
    workers run their own simulators at the same time)."""
    from firmware_sim.netlab import CREATED_RUN_IDS

    found: set[str] = set()
    if shutil.which("ip") and CREATED_RUN_IDS:
        ns = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=False
        ).stdout
        links = subprocess.run(
            ["ip", "-o", "link"], capture_output=True, text=True, check=False
        ).stdout
        for run_id in CREATED_RUN_IDS:
            found |= {
                f"netns {line.split()[0]}"
                for line in ns.splitlines()
                if line.startswith(f"edgefleet-{run_id}-")
            }
            found |= {
                f"link {part.strip()}"
                for part in links.split(":")
                if part.strip().startswith(f"e{run_id}")
            }
    with open("/proc/self/mounts") as f:
        found |= {f"mount {line.split()[1]}" for line in f if line.split()[1].startswith(str(tmp))}
    return found


@pytest.fixture(autouse=True)
def no_leftover_host_resources(tmp_path: Path) -> Iterator[None]:
    yield
    left = _sim_resources(tmp_path)
    assert not left, f"test left host resources behind: {sorted(left)}"


def _shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # Under xdist every worker has its own basetemp below one shared parent.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def cloud_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cloud data dir (keys, TUF repository) with digits release 1 published."""
    root = _shared_dir(tmp_path_factory)
    template = root / "sim-cloud-template"
    with open(root / "sim-cloud-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if 1 not in published_releases(template, "digits"):
            out = subprocess.run(
                python_cmd(
                    "cloud.cli", "release", "digits", "--data-dir", str(template), "--epochs", "2"
                ),
                capture_output=True,
                text=True,
                check=False,
                timeout=900,
            )
            assert out.returncode == 0, f"training the template release failed:\n{out.stderr}"
    return template
