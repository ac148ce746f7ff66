"""The end-to-end demo behind ``make demo``.

Everything real, on one machine: a private Mosquitto on a free port, the
cloud service, and N device agents as separate processes fed by simulated
digit sensors. The cloud trains a digits CNN, quantizes it to int8, signs it
as release 1 and rolls it out; then a retrained release 2. The demo prints
each device's running release and inference count, and stops every process
it started, whatever happens.

The drift phase (``drift_phase=True``, the default) then brightens every
simulated sensor (through the fleet's drift control file): the cloud's drift
monitor raises an alert, the retrain loop fits the shift, retrains the CNN on
it and publishes release 3, which goes to one canary device and then to the
fleet; the drift score of release 3 is back under the threshold.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cloud.broker import MosquittoProcess, free_port
from device.config import provision
from firmware_sim.api import start_cloud
from firmware_sim.procs import ProcessGroup, python_cmd

__all__ = ["DemoFleet", "run_demo"]

log = logging.getLogger(__name__)


@dataclass
class DemoFleet:
    """Handles to a running demo fleet (used by the demo and the e2e tests)."""

    workdir: Path
    broker: MosquittoProcess
    procs: ProcessGroup
    api: str
    device_ids: list[str]
    cloud_dir: Path
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def devices(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.api}/api/v1/devices", timeout=10, headers=self.headers)
        r.raise_for_status()
        return list(r.json())

    def release_digits(self, variant: int, epochs: int = 12) -> dict[str, Any]:
        """Train and publish the next digits release (in a separate process, like an operator)."""
        import json
        import subprocess

        out = subprocess.run(  # noqa: S603 - our own CLI
            python_cmd(
                "cloud.cli",
                "release",
                "digits",
                "--data-dir",
                str(self.cloud_dir),
                "--variant",
                str(variant),
                "--epochs",
                str(epochs),
            ),
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if out.returncode != 0:
            raise RuntimeError(f"release failed:\n{out.stdout}\n{out.stderr[-3000:]}")
        start = out.stdout.index("{")
        return dict(json.loads(out.stdout[start:]))

    def deploy(self, model: str, release: int) -> None:
        r = httpx.post(
            f"{self.api}/api/v1/deployments",
            timeout=30,
            headers=self.headers,
            json={"model": model, "release": release, "devices": self.device_ids},
        )
        if r.status_code != 200:
            raise RuntimeError(f"deploy failed ({r.status_code}): {r.text}")

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], what: str, timeout: float = 120.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        devices: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            devices = self.devices()
            if predicate(devices):
                return devices
            self._check_alive()
            time.sleep(0.3)
        raise TimeoutError(f"timed out waiting for {what}; fleet: {devices}")

    def wait_release(self, release: int, timeout: float = 120.0) -> list[dict[str, Any]]:
        def done(devs: list[dict[str, Any]]) -> bool:
            by_id = {d["device_id"]: d for d in devs}
            return all(
                by_id.get(i, {}).get("release") == release and by_id[i].get("state") == "idle"
                for i in self.device_ids
            )

        return self.wait_for(done, f"all devices on release {release}", timeout)

    def _check_alive(self) -> None:
        for name, proc in self.procs.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode}:\n{self.procs.log_tail(name)}"
                )


class _Demo:
    def __init__(
        self,
        workdir: Path,
        n_devices: int,
        telemetry_interval: float,
        cloud_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.n_devices = n_devices
        self.telemetry_interval = telemetry_interval
        self.cloud_env = cloud_env

    def __enter__(self) -> DemoFleet:
        self.procs = ProcessGroup(self.workdir / "logs")
        self.broker = MosquittoProcess(self.workdir / "broker").start()
        try:
            return self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _start(self) -> DemoFleet:
        cloud_dir = self.workdir / "cloud"
        cloud = start_cloud(
            self.procs, cloud_dir, self.broker.port, free_port(), env=self.cloud_env
        )
        api, token = cloud.api, cloud.token
        root = cloud_dir / "repository" / "metadata" / "root.json"
        ids = [f"dev-{i:03d}" for i in range(1, self.n_devices + 1)]
        for i, device_id in enumerate(ids):
            data = self.workdir / "devices" / device_id
            provision(
                data,
                device_id=device_id,
                root_file=root,
                broker_host="127.0.0.1",
                broker_port=self.broker.port,
                repo_url=f"{api}/tuf/",
                inference_interval=0.005,
                telemetry_interval=self.telemetry_interval,
            )
            self.procs.start(
                device_id,
                python_cmd(
                    "firmware_sim.cli",
                    "device",
                    "--data-dir",
                    str(data),
                    "--seed",
                    str(i),
                    "--drift-file",
                    str(self.workdir / "control" / "drift.json"),
                ),
            )
        fleet = DemoFleet(
            workdir=self.workdir,
            broker=self.broker,
            procs=self.procs,
            api=api,
            device_ids=ids,
            cloud_dir=cloud_dir,
            token=token,
        )
        fleet.wait_for(
            lambda devs: sum(1 for d in devs if d["online"]) >= len(ids),
            "devices online",
            timeout=60,
        )
        return fleet

    def __exit__(self, *exc: object) -> None:
        self.procs.stop_all()
        self.broker.stop()


def demo_fleet(
    workdir: Path,
    n_devices: int = 3,
    telemetry_interval: float = 1.0,
    cloud_env: dict[str, str] | None = None,
) -> _Demo:
    """Context manager: a broker, a cloud and ``n_devices`` agents, all stopped on exit.

    ``cloud_env`` adds ``EDGEFLEET_*`` settings to the cloud process (the drift phase
    uses short drift windows and the ``digits-shift`` retraining job)."""
    return _Demo(workdir, n_devices, telemetry_interval, cloud_env)


def _table(devices: list[dict[str, Any]]) -> str:
    lines = [
        f"{'device':<10} {'online':<6} {'release':>7} {'state':<9} {'slot':<4} "
        f"{'inferences':>10} {'errors':>6}"
    ]
    for d in devices:
        lines.append(
            f"{d['device_id']:<10} {'yes' if d['online'] else 'no':<6} "
            f"{d['release'] or '-':>7} {d['state'] or '-':<9} {d['slot'] or '-':<4} "
            f"{d['inferences_total']:>10} {d['errors_total']:>6}"
        )
    return "\n".join(lines)


#: Cloud settings of the drift phase: short drift windows so the demo stays short, and
#: the retraining job the drift alert starts.
DRIFT_CLOUD_ENV = {"EDGEFLEET_DRIFT_WINDOW_SECONDS": "3", "EDGEFLEET_RETRAIN_JOB": "digits-shift"}
#: The injected drift: every sensor reads this much brighter (pixels are in [0, 1]).
DRIFT_SHIFT = 0.3


def _get(fleet: DemoFleet, path: str) -> Any:
    r = httpx.get(f"{fleet.api}{path}", timeout=10, headers=fleet.headers)
    r.raise_for_status()
    return r.json()


def _poll(fleet: DemoFleet, what: str, probe: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        fleet._check_alive()
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def _latest_drift(fleet: DemoFleet, release: int) -> dict[str, Any] | None:
    for e in _get(fleet, "/api/v1/drift?minutes=10")["latest"]:
        if e["model"] == "digits" and e["release"] == release and e["psi_mean"] is not None:
            return dict(e)
    return None


def _drift_phase(fleet: DemoFleet, release: int) -> int:
    """Drift -> alert -> retrain -> canary -> fleet. Returns the fleet's final release."""
    from firmware_sim.control import write_drift

    base = _poll(
        fleet, "a drift window of the running release", lambda: _latest_drift(fleet, release), 60
    )
    print(
        f"\n[drift] release {release}: mean PSI {base['psi_mean']:.3f} over "
        f"{base['samples']} inputs (threshold 0.2); injecting a +{DRIFT_SHIFT} brightness "
        "shift into every sensor ...",
        flush=True,
    )
    injected = time.monotonic()
    write_drift(fleet.workdir, "shift", DRIFT_SHIFT)

    def alert() -> dict[str, Any] | None:
        return next(
            (
                a
                for a in _get(fleet, "/api/v1/alerts?state=open")
                if a["kind"] == "input" and a["release"] == release
            ),
            None,
        )

    a = _poll(fleet, "a drift alert", alert, 90)
    print(f"[drift] alert after {time.monotonic() - injected:.0f}s: {a['message']}", flush=True)

    def run(state: str) -> dict[str, Any] | None:
        runs = _get(fleet, "/api/v1/retrain")["runs"]
        r = next((r for r in runs if r["from_release"] == release), None)
        if r is not None and r["state"] == "failed":
            raise RuntimeError(f"retraining failed: {r['detail']}")
        order = ["training", "published", "canary", "fleet", "done"]
        return r if r is not None and order.index(r["state"]) >= order.index(state) else None

    print("[retrain] fitting the drift and retraining the digits CNN on it ...", flush=True)
    r = _poll(fleet, "the retrained release", lambda: run("canary"), 300)
    new = int(r["new_release"])
    rollout = str(r["detail"]).split(":")[0].removeprefix("rollout ")
    print(
        f"[retrain] published release {new}; rollout {rollout} (canary wave, then the fleet)",
        flush=True,
    )
    print(f"[canary] release {new} goes to {', '.join(r['canary'])} first", flush=True)
    r = _poll(fleet, "a healthy canary", lambda: run("fleet"), 300)
    print(
        f"[canary] {', '.join(r['canary'])} verified, self-tested and runs release {new}; "
        "rolling out to the fleet",
        flush=True,
    )
    _poll(fleet, "the fleet on the new release", lambda: run("done"), 300)
    fleet.wait_release(new, timeout=120)
    print(f"[fleet] every device runs release {new}", flush=True)
    after = _poll(fleet, "a drift window of the new release", lambda: _latest_drift(fleet, new), 60)
    print(
        f"[drift] release {new}: mean PSI {after['psi_mean']:.3f} on the drifted inputs "
        "(was above 0.2 for the old release)",
        flush=True,
    )
    return new


def run_demo(
    n_devices: int = 3, workdir: Path | None = None, epochs: int = 12, drift_phase: bool = True
) -> int:
    """Run the demo; 0 if every device ends on the last release (2, or 3 after drift)."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"edgefleet demo: {n_devices} simulated devices, workdir {root}", flush=True)
        started = time.monotonic()
        env = DRIFT_CLOUD_ENV if drift_phase else None
        with demo_fleet(root, n_devices, cloud_env=env) as fleet:
            print(
                f"broker on 127.0.0.1:{fleet.broker.port}, cloud at {fleet.api} "
                f"(dashboard: {fleet.api}/dashboard/)",
                flush=True,
            )
            for variant, release in ((0, 1), (1, 2)):
                what = "training" if release == 1 else "retraining"
                print(
                    f"\n[{release}] {what} the digits CNN, quantizing to int8, signing ...",
                    flush=True,
                )
                info = fleet.release_digits(variant, epochs)
                print(
                    f"[{release}] published release {info['release']} "
                    f"({info['quantization']}, {info['size_bytes']} bytes, "
                    f"accuracy {info['metrics'].get('accuracy', float('nan')):.3f})",
                    flush=True,
                )
                fleet.deploy("digits", info["release"])
                fleet.wait_release(info["release"])
                print(
                    f"[{release}] every device verified, self-tested and swapped to "
                    f"release {info['release']}",
                    flush=True,
                )
            time.sleep(2.5)  # let a telemetry window or two arrive
            devices = fleet.devices()
            print("\n" + _table(devices), flush=True)
            final = 2
            ok = (
                all(d["release"] == 2 and d["inferences_total"] > 0 for d in devices)
                and len(devices) == n_devices
            )
            if ok and drift_phase:
                final = _drift_phase(fleet, 2)
                devices = fleet.devices()
                print("\n" + _table(devices), flush=True)
                ok = all(d["release"] == final for d in devices) and len(devices) == n_devices
        print(
            f"\nall processes stopped after {time.monotonic() - started:.0f}s.",
            "DEMO OK" if ok else "DEMO FAILED",
            flush=True,
        )
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_demo())
