"""Run a scenario: build the fleet, roll out a release under faults, check expectations.

The run: check capabilities (a scenario with namespace faults on a host
without root + ``ip netns`` is *skipped*, with the reason); start the fleet;
make sure the releases exist (train and publish them, unless a cloud template
already has them); optionally roll out release 1 cleanly (``baseline``); arm
every fault; deploy the target release to every device; then poll the cloud
until the expectations hold or ``[expect] within`` runs out.

``ScenarioResult.exit_code``: 0 every expectation held, 1 one did not,
77 skipped (missing capability), 2 the run itself broke (see ``error``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from firmware_sim._system import SimError
from firmware_sim.api import published_releases
from firmware_sim.disk import mounts_unavailable
from firmware_sim.faults import FaultInjector, FaultRecord
from firmware_sim.fleet import FleetOptions, SimFleet
from firmware_sim.netlab import netns_unavailable
from firmware_sim.scenario import Scenario

__all__ = ["EXIT_SKIPPED", "Check", "ScenarioResult", "run_scenario"]

log = logging.getLogger(__name__)

EXIT_SKIPPED = 77


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class ScenarioResult:
    scenario: Scenario
    checks: list[Check] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    devices: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.skipped is None and self.error is None and all(c.ok for c in self.checks)

    @property
    def exit_code(self) -> int:
        if self.skipped is not None:
            return EXIT_SKIPPED
        if self.error is not None:
            return 2
        return 0 if self.passed else 1

    def summary(self) -> str:
        s = self.scenario
        head = f"scenario {s.name!r}: {s.fleet.devices} {s.fleet.mode} devices"
        if self.skipped is not None:
            return f"{head}\nSKIPPED: {self.skipped}"
        lines = [head]
        lines += [f"  {k}: {v:.1f}s" for k, v in self.timings.items()]
        lines += [f"  fault {r.describe()}" for r in self.faults]
        for d in self.devices:
            lines.append(
                f"  {d['device_id']:<8} online={'yes' if d['online'] else 'no ':<3} "
                f"release={d['release'] or '-'} state={d['state'] or '-'} "
                f"inferences={d['inferences_total']}"
            )
        lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        if self.error is not None:
            lines.append(f"ERROR: {self.error}")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _options(s: Scenario, cloud_template: Path | None) -> FleetOptions:
    return FleetOptions(
        devices=s.fleet.devices,
        mode=s.fleet.mode,
        telemetry_interval=s.fleet.telemetry_interval,
        inference_interval=s.fleet.inference_interval,
        netns_devices=frozenset(f.device for f in s.faults if f.needs_netns and f.device),
        small_disks={
            f.device: s.fleet.disk_mb for f in s.faults if f.kind == "full_disk" and f.device
        },
        cloud_template=cloud_template,
    )


def _evaluate(
    s: Scenario, fleet: SimFleet, devices: list[dict[str, Any]], injector: FaultInjector
) -> list[Check]:
    want, state = s.expected_release, s.expect.state
    by_id = {d["device_id"]: d for d in devices}
    live = [i for i in s.device_ids if i not in fleet.powered_off]
    behind = [
        i
        for i in live
        if by_id.get(i, {}).get("release") != want or by_id.get(i, {}).get("state") != state
    ]
    checks = [
        Check(
            f"release {want} ({state})",
            len(behind) <= s.expect.max_failed,
            f"{len(live) - len(behind)}/{len(live)} powered devices; "
            f"allowed to miss: {s.expect.max_failed}"
            + (f"; behind: {', '.join(behind)}" if behind else ""),
        )
    ]
    if s.expect.serving:
        idle = [i for i in live if not by_id.get(i, {}).get("inferences_total")]
        checks.append(
            Check(
                "serving",
                not idle,
                "every device reported inferences"
                if not idle
                else f"no inferences reported by {', '.join(idle)}",
            )
        )
    if s.expect.faults_fired:
        bad = [r for r in injector.records if r.fired_at is None or r.error]
        checks.append(
            Check(
                "faults fired",
                not bad,
                f"{len(injector.records) - len(bad)}/{len(injector.records)} fired"
                + "".join(f"; {r.describe()}" for r in bad),
            )
        )
    return checks


def run_scenario(s: Scenario, workdir: Path, cloud_template: Path | None = None) -> ScenarioResult:
    """Run ``s`` in ``workdir``; never raises for a failed expectation."""
    result = ScenarioResult(s)
    if s.needs_netns and (why := netns_unavailable()):
        result.skipped = why
        return result
    if s.needs_mounts and (why := mounts_unavailable()):
        result.skipped = why
        return result
    t_start = time.monotonic()
    try:
        with SimFleet(workdir, _options(s, cloud_template)) as fleet:
            result.timings["fleet up"] = time.monotonic() - t_start
            assert fleet.cloud is not None
            cloud = fleet.cloud
            have = published_releases(cloud.cloud_dir, s.release.model)
            for release in range(1, s.release.target + 1):
                if release not in have:
                    t = time.monotonic()
                    info = cloud.release_digits(release - 1, s.release.epochs, s.release.model)
                    result.timings[f"publish release {info['release']}"] = time.monotonic() - t
            if s.release.baseline:
                t = time.monotonic()
                cloud.deploy(s.release.model, 1, list(s.device_ids))
                cloud.wait_for(
                    lambda devs: (
                        all(
                            d["release"] == 1 and d["state"] == "idle"
                            for d in devs
                            if d["device_id"] in s.device_ids
                        )
                        and len(devs) >= len(s.device_ids)
                    ),
                    "the baseline release on every device",
                    s.expect.within,
                    check=fleet.check_alive,
                )
                result.timings["baseline rollout"] = time.monotonic() - t
            with FaultInjector(fleet) as injector:
                t0 = time.monotonic()
                for spec in s.faults:
                    injector.schedule(spec, t0, trigger_timeout=s.expect.within)
                cloud.deploy(s.release.model, s.release.target, list(s.device_ids))
                deadline = t0 + s.expect.within
                while True:
                    devices = cloud.devices()
                    checks = _evaluate(s, fleet, devices, injector)
                    if (
                        injector.done and all(c.ok for c in checks)
                    ) or time.monotonic() >= deadline:
                        break
                    fleet.check_alive()  # a process that died by itself ends the run
                    time.sleep(0.5)
                result.timings["rollout under faults"] = time.monotonic() - t0
            result.faults = list(injector.records)
            result.checks = _evaluate(s, fleet, devices, injector)
            result.devices = devices
    except (SimError, TimeoutError, OSError, httpx.HTTPError) as e:
        log.exception("scenario run failed")
        result.error = str(e)
    result.timings["total"] = time.monotonic() - t_start
    return result
