"""``deploy``, ``devices``: steer and watch the fleet through the service API."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cloud.cli.common import api_call, remote_args

__all__ = ["register"]


def cmd_deploy(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model, "release": args.release}
    if args.all:
        body["all_devices"] = True
    else:
        body["devices"] = args.device
    out = api_call(args, "POST", "/api/v1/deployments", json=body)
    print(f"release {out['release']} of {out['model']} desired on {len(out['devices'])} devices")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    devices = api_call(args, "GET", "/api/v1/devices")
    if args.json:
        print(json.dumps(devices, indent=1))
        return 0
    print(
        f"{'device':<14} {'online':<6} {'model':<8} {'release':>7} {'state':<11} "
        f"{'slot':<4} {'inferences':>10}"
    )
    for d in devices:
        print(
            f"{d['device_id']:<14} {'yes' if d['online'] else 'no':<6} "
            f"{d['model'] or '-':<8} {d['release'] or '-':>7} {d['state'] or '-':<11} "
            f"{d['slot'] or '-':<4} {d['inferences_total']:>10}"
        )
    return 0


def register(sub: Any) -> None:
    s = remote_args(sub.add_parser("deploy", help="set the desired release of devices"))
    s.add_argument("--model", required=True)
    s.add_argument("--release", type=int, required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--device", action="append", help="device id (repeatable)")
    g.add_argument("--all", action="store_true", help="every known device")
    s.set_defaults(func=cmd_deploy)

    s = remote_args(sub.add_parser("devices", help="show the fleet"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_devices)
