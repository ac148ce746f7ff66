"""The simulator's view of the cloud: its HTTP API and its release CLI.

The simulator drives the cloud the way an operator does, through the HTTP API
(devices, deployments) and the ``edgefleet-cloud`` CLI (training and
publishing a digits release), never through its internals.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from firmware_sim._system import SimError
from firmware_sim.procs import ProcessGroup, python_cmd, wait_http

__all__ = ["CloudAPI", "published_releases", "start_cloud"]

log = logging.getLogger(__name__)

Devices = list[dict[str, Any]]


class CloudAPI:
    """A running cloud service: ``api`` URL, operator ``token``, and its data dir."""

    def __init__(self, api: str, token: str, cloud_dir: Path) -> None:
        self.api, self.token, self.cloud_dir = api, token, Path(cloud_dir)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def devices(self) -> Devices:
        r = httpx.get(f"{self.api}/api/v1/devices", timeout=10, headers=self.headers)
        r.raise_for_status()
        return list(r.json())

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {d["device_id"]: d for d in self.devices()}

    def deploy(self, model: str, release: int, devices: list[str]) -> None:
        r = httpx.post(
            f"{self.api}/api/v1/deployments",
            timeout=60,
            headers=self.headers,
            json={"model": model, "release": release, "devices": devices},
        )
        if r.status_code != 200:
            raise SimError(
                f"deploy of {model} release {release} failed ({r.status_code}): {r.text[:500]}"
            )

    def release_digits(
        self, variant: int = 0, epochs: int = 2, model: str = "digits"
    ) -> dict[str, Any]:
        """Train, quantize, sign and publish the next digits release (a CLI run)."""
        out = subprocess.run(  # noqa: S603 - our own CLI
            python_cmd(
                "cloud.cli",
                "release",
                "digits",
                "--data-dir",
                str(self.cloud_dir),
                "--model-name",
                model,
                "--variant",
                str(variant),
                "--epochs",
                str(epochs),
            ),
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        if out.returncode != 0 or "{" not in out.stdout:
            raise SimError(
                f"publishing a digits release failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
            )
        return dict(json.loads(out.stdout[out.stdout.index("{") :]))

    def wait_for(
        self,
        predicate: Callable[[Devices], bool],
        what: str,
        timeout: float,
        check: Callable[[], None] | None = None,
        interval: float = 0.3,
    ) -> Devices:
        """Poll the fleet until ``predicate`` holds; ``TimeoutError`` naming ``what``."""
        deadline = time.monotonic() + timeout
        devices: Devices = []
        while True:
            try:
                devices = self.devices()
            except httpx.HTTPError as e:
                log.debug("cloud API not answering: %s", e)
            else:
                if predicate(devices):
                    return devices
            if check is not None:
                check()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(interval)


def published_releases(cloud_dir: Path, model: str) -> list[int]:
    """Release numbers of ``model`` already published in ``cloud_dir`` (CLI listing)."""
    if not (Path(cloud_dir) / "repository").is_dir():
        return []
    out = subprocess.run(  # noqa: S603 - our own CLI
        python_cmd("cloud.cli", "releases", "--data-dir", str(cloud_dir), "--model", model),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if out.returncode != 0:
        raise SimError(f"cannot list releases in {cloud_dir}: {out.stderr[-1000:]}")
    found = []
    for line in out.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == model and parts[1].isdigit():
            found.append(int(parts[1]))
    return sorted(found)


def create_token(cloud_dir: Path, name: str, role: str = "operator") -> str:
    """A new API token of ``role`` for the cloud in ``cloud_dir`` (the CLI's secret)."""
    out = subprocess.run(  # noqa: S603 - our own CLI
        python_cmd(
            "cloud.cli",
            "token",
            "create",
            "--data-dir",
            str(cloud_dir),
            "--name",
            name,
            "--role",
            role,
        ),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if out.returncode != 0:
        raise SimError(f"cannot create an {role} token: {out.stderr[-2000:]}")
    return out.stdout.strip()


def start_cloud(
    procs: ProcessGroup,
    cloud_dir: Path,
    broker_port: int,
    http_port: int,
    *,
    template: Path | None = None,
    host: str = "127.0.0.1",
    log_level: str = "INFO",
    env: dict[str, str] | None = None,
) -> CloudAPI:
    """Start ``edgefleet-cloud serve`` as the process ``cloud`` of ``procs`` (from a
    copy of ``template`` if given) with a fresh operator token; wait until it answers."""
    if template is not None:
        import shutil

        shutil.copytree(template, cloud_dir, dirs_exist_ok=True)
    token = create_token(cloud_dir, f"sim-{time.time_ns()}")
    proc = procs.start(
        "cloud",
        python_cmd(
            "cloud.cli",
            "--log-level",
            log_level,
            "serve",
            "--data-dir",
            str(cloud_dir),
            "--broker-port",
            str(broker_port),
            "--http-host",
            host,
            "--http-port",
            str(http_port),
        ),
        env=env,
    )
    api = f"http://{host}:{http_port}"
    try:
        wait_http(f"{api}/healthz", proc=proc, timeout=120)
    except (RuntimeError, TimeoutError) as e:
        raise SimError(f"the cloud did not start ({e}):\n{procs.log_tail('cloud')}") from e
    return CloudAPI(api, token, cloud_dir)
