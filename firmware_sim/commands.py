"""The ``edgefleet-sim`` subcommands for fleets, faults, drift and scenarios.

``fleet`` runs until interrupted (or ``--duration``) and, while it runs,
executes fault requests that ``edgefleet-sim fault`` drops into its work dir
and follows the drift that ``edgefleet-sim drift`` writes there (see
``firmware_sim.control``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from firmware_sim._system import SimError, cleanup_stale
from firmware_sim.control import submit_request, take_requests, write_drift, write_result
from firmware_sim.scenario import ScenarioError, load_scenario, parse_scenario

__all__ = ["cmd_cleanup", "cmd_drift", "cmd_fault", "cmd_fleet", "cmd_scenario"]

log = logging.getLogger(__name__)

_REQUEST_KEYS = ("kind", "device", "at", "on_state", "duration", "restore_after", "rate", "percent")


def _table(devices: list[dict[str, Any]]) -> str:
    lines = [
        f"{'device':<9} {'online':<6} {'release':>7} {'state':<11} {'inferences':>10} {'errors':>6}"
    ]
    for d in devices:
        lines.append(
            f"{d['device_id']:<9} {'yes' if d['online'] else 'no':<6} "
            f"{d['release'] or '-':>7} {d['state'] or '-':<11} "
            f"{d['inferences_total']:>10} {d['errors_total']:>6}"
        )
    return "\n".join(lines)


def _request_spec(request: dict[str, Any], devices: int, mode: str) -> Any:
    """Validate an on-demand fault request exactly like a scenario's ``[[fault]]``."""
    unknown = set(request) - set(_REQUEST_KEYS)
    if unknown:
        raise ScenarioError(f"unknown fault request keys: {sorted(unknown)}")
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in request.items())
    if "at" not in request and "on_state" not in request:
        body += "at = 0\n"
    text = f'[fleet]\ndevices = {devices}\nmode = "{mode}"\n[[fault]]\n{body}'
    return parse_scenario(text, "<fault request>").faults[0]


def cmd_fleet(args: argparse.Namespace) -> int:
    """N agents, a broker and the cloud, until Ctrl-C or ``--duration``."""
    from firmware_sim.api import published_releases
    from firmware_sim.faults import FaultInjector
    from firmware_sim.fleet import FleetOptions, SimFleet
    from firmware_sim.scenario import device_id_for

    ids = [device_id_for(i) for i in range(1, args.devices + 1)]
    opts = FleetOptions(
        devices=args.devices,
        mode=args.mode,
        telemetry_interval=args.telemetry_interval,
        inference_interval=args.inference_interval,
        netns_devices=frozenset(ids) if args.netns else frozenset(),
        small_disks={i: args.disk_mb for i in ids} if args.small_disks else {},
        cloud_template=args.cloud_template,
    )
    stop = {"now": False}

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with tempfile.TemporaryDirectory(prefix="edgefleet-fleet-") as tmp:
        workdir = Path(args.workdir or tmp)
        t0 = time.monotonic()
        with SimFleet(workdir, opts) as fleet, FaultInjector(fleet) as injector:
            assert fleet.cloud is not None
            print(
                f"{args.devices} {args.mode} devices online in {time.monotonic() - t0:.1f}s; "
                f"workdir {workdir}; cloud {fleet.cloud.api}",
                flush=True,
            )
            if args.release:
                have = published_releases(fleet.cloud.cloud_dir, "digits")
                release = (
                    max(have)
                    if have
                    else int(fleet.cloud.release_digits(0, args.epochs)["release"])
                )
                fleet.cloud.deploy("digits", release, ids)
                print(f"deployed digits release {release} to every device", flush=True)
            deadline = time.monotonic() + args.duration if args.duration else None
            next_table = 0.0
            while not stop["now"] and (deadline is None or time.monotonic() < deadline):
                for result, request in take_requests(workdir):
                    try:
                        if isinstance(request, str):
                            raise ScenarioError(request)
                        spec = _request_spec(request, args.devices, args.mode)
                        injector.schedule(spec, time.monotonic(), trigger_timeout=3600)
                        write_result(result, True, f"scheduled {spec.describe()}")
                    except (ScenarioError, SimError) as e:
                        # "<fault request>:5: [[fault]] #1: ..." -> the part a person wants
                        write_result(result, False, str(e).split("]] #1: ", 1)[-1])
                if time.monotonic() >= next_table:
                    print(_table(fleet.cloud.devices()), flush=True)
                    next_table = time.monotonic() + args.show_every
                time.sleep(0.2)
            devices = fleet.cloud.devices()
        print(_table(devices), "\nfleet stopped.", sep="\n", flush=True)
    return 0


def cmd_fault(args: argparse.Namespace) -> int:
    """Ask a running ``edgefleet-sim fleet`` to inject a fault."""
    request = {k: getattr(args, k) for k in _REQUEST_KEYS if getattr(args, k) is not None}
    result = submit_request(args.workdir, request)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if result.exists():
            answer = json.loads(result.read_text())
            print(answer["message"])
            return 0 if answer["ok"] else 2
        time.sleep(0.1)
    print(
        f"edgefleet-sim: no fleet answered in {args.wait:g}s: is `edgefleet-sim fleet "
        f"--workdir {args.workdir}` running?",
        file=sys.stderr,
    )
    return 2


def cmd_drift(args: argparse.Namespace) -> int:
    path = write_drift(args.workdir, args.mode, args.amount, args.device)
    print(f"drift {args.mode} {args.amount:g} for {args.device or 'every device'} ({path})")
    return 0


def cmd_scenario(args: argparse.Namespace) -> int:
    from firmware_sim.runner import run_scenario

    scenario = load_scenario(args.file)
    if args.check:
        print(
            f"{args.file}: OK ({scenario.fleet.devices} {scenario.fleet.mode} devices, "
            f"{len(scenario.faults)} faults)"
        )
        return 0
    with tempfile.TemporaryDirectory(prefix="edgefleet-scenario-") as tmp:
        result = run_scenario(scenario, Path(args.workdir or tmp), args.cloud_template)
        print(result.summary(), flush=True)
    return result.exit_code


def cmd_cleanup(args: argparse.Namespace) -> int:
    done = cleanup_stale()
    print("\n".join(done) if done else "nothing left behind by dead simulators")
    return 0


def register(sub: Any) -> None:
    """Add the fleet, fault, drift, scenario and cleanup subcommands."""
    s = sub.add_parser("fleet", help="run N simulated devices with a broker and the cloud")
    s.add_argument("--devices", type=int, default=3)
    s.add_argument(
        "--mode",
        choices=["process", "thread"],
        default="process",
        help="agents as processes (default) or as threads of this process",
    )
    s.add_argument("--workdir", type=Path, help="keep files here (control files live here)")
    s.add_argument(
        "--release",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deploy the newest digits release (training release 1 if there is none; default: yes)",
    )
    s.add_argument("--epochs", type=int, default=2)
    s.add_argument("--duration", type=float, help="stop after this many seconds")
    s.add_argument("--telemetry-interval", type=float, default=2.0)
    s.add_argument("--inference-interval", type=float, default=0.02)
    s.add_argument(
        "--netns",
        action="store_true",
        help="each process device in its own network namespace (root)",
    )
    s.add_argument(
        "--small-disks",
        action="store_true",
        help="each data dir on a small tmpfs, for full-disk faults (root)",
    )
    s.add_argument("--disk-mb", type=int, default=8)
    s.add_argument(
        "--cloud-template",
        type=Path,
        help="cloud data dir with releases already published, to copy",
    )
    s.add_argument("--show-every", type=float, default=10.0, help="print the fleet this often")
    s.set_defaults(func=cmd_fleet)

    s = sub.add_parser("fault", help="inject a fault into a running fleet")
    s.add_argument(
        "kind",
        choices=[
            "power_cut",
            "link_cut",
            "slow_link",
            "packet_loss",
            "full_disk",
            "broker_restart",
        ],
    )
    s.add_argument("--workdir", type=Path, required=True, help="the running fleet's workdir")
    s.add_argument("--device", help="device id, e.g. dev-002")
    s.add_argument("--at", type=float, help="seconds from now (default: now)")
    s.add_argument("--on-state", help="fire when the device persists this update state")
    s.add_argument("--duration", type=float, help="undo after this many seconds")
    s.add_argument("--restore-after", type=float, help="power_cut: boot again after this")
    s.add_argument("--rate", help="slow_link: e.g. 64kbit")
    s.add_argument("--percent", type=float, help="packet_loss: percent dropped")
    s.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the fleet")
    s.set_defaults(func=cmd_fault)

    s = sub.add_parser("drift", help="change the sensor drift of a running fleet")
    s.add_argument("mode", choices=["none", "noise", "shift", "rotation"])
    s.add_argument("amount", type=float, nargs="?", default=0.0)
    s.add_argument("--workdir", type=Path, required=True)
    s.add_argument("--device", help="one device (default: every device)")
    s.set_defaults(func=cmd_drift)

    s = sub.add_parser("scenario", help="run a scenario file and check its expectations")
    s.add_argument("file", type=Path)
    s.add_argument("--check", action="store_true", help="only validate the file")
    s.add_argument("--workdir", type=Path)
    s.add_argument(
        "--cloud-template",
        type=Path,
        help="cloud data dir with the releases already published (skips training)",
    )
    s.set_defaults(func=cmd_scenario)

    s = sub.add_parser("cleanup", help="remove namespaces/mounts left by killed simulators")
    s.set_defaults(func=cmd_cleanup)
