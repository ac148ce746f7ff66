"""``deploy``, ``devices``: steer and look up the fleet through the service API.

``devices`` lists the registry (filter by group, tag, model, release, online);
``devices show|history|label`` look at and label one device; ``devices ran``
finds every device that ever ran a release (incident response).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
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


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def cmd_devices(args: argparse.Namespace) -> int:
    params = {
        k: v
        for k, v in {
            "group": args.group,
            "tag": args.tag,
            "model": args.model,
            "release": args.release,
            "online": None if args.online is None else str(args.online == "yes").lower(),
        }.items()
        if v is not None
    }
    devices = api_call(args, "GET", "/api/v1/devices", params=params)
    if args.json:
        print(json.dumps(devices, indent=1))
        return 0
    print(
        f"{'device':<14} {'online':<6} {'group':<10} {'model':<8} {'release':>7} "
        f"{'state':<11} {'slot':<4} {'inferences':>10}"
    )
    for d in devices:
        print(
            f"{d['device_id']:<14} {'yes' if d['online'] else 'no':<6} "
            f"{d.get('group') or '-':<10} {d['model'] or '-':<8} {d['release'] or '-':>7} "
            f"{d['state'] or '-':<11} {d.get('slot') or '-':<4} "
            f"{d.get('inferences_total') or 0:>10}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print(json.dumps(api_call(args, "GET", f"/api/v1/devices/{args.device_id}"), indent=1))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    rows = api_call(
        args, "GET", f"/api/v1/devices/{args.device_id}/history", params={"limit": args.limit}
    )
    for h in rows:
        why = f" {h['reason']['code']}: {h['reason']['message']}" if h["reason"] else ""
        rel = f"{h['model']} {h['release']}" if h["model"] else ""
        print(f"{_when(h['ts'])} {h['kind']:<17} {rel:<12} {h['rollout_id'] or '':<16}{why}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "add_labels": args.add or [],
        "remove_labels": args.remove or [],
        "clear_group": args.clear_group,
    }
    if args.group:
        body["group"] = args.group
    d = api_call(args, "PATCH", f"/api/v1/devices/{args.device_id}", json=body)
    print(f"{d['device_id']}: group {d['group']}, tags {', '.join(d['tags']) or '-'}")
    return 0


def cmd_ran(args: argparse.Namespace) -> int:
    rows = api_call(args, "GET", f"/api/v1/releases/{args.model}/{args.release}/devices")
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{len(rows)} devices ran release {args.release} of {args.model}")
    for r in rows:
        now = "still runs it" if r["running_now"] else f"now on {r['current_release'] or '-'}"
        print(
            f"{r['device_id']:<14} first {_when(r['first_seen_running'])}  {now}"
            f"{'' if r['online'] else '  (offline)'}"
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

    s = remote_args(sub.add_parser("devices", help="the device registry"))
    s.add_argument("--group")
    s.add_argument("--tag")
    s.add_argument("--model")
    s.add_argument("--release", type=int)
    s.add_argument("--online", choices=["yes", "no"])
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_devices)
    dsub = s.add_subparsers(dest="devices_action", required=False)

    d = remote_args(dsub.add_parser("show", help="one device, with its recent history"))
    d.add_argument("device_id")
    d.set_defaults(func=cmd_show)
    d = remote_args(dsub.add_parser("history", help="a device's update history"))
    d.add_argument("device_id")
    d.add_argument("--limit", type=int, default=50)
    d.set_defaults(func=cmd_history)
    d = remote_args(dsub.add_parser("label", help="set a device's group and labels"))
    d.add_argument("device_id")
    d.add_argument("--group")
    d.add_argument("--clear-group", action="store_true")
    d.add_argument("--add", action="append", help="add a label (repeatable)")
    d.add_argument("--remove", action="append", help="remove a label (repeatable)")
    d.set_defaults(func=cmd_label)
    d = remote_args(dsub.add_parser("ran", help="every device that ever ran a release"))
    d.add_argument("--model", required=True)
    d.add_argument("--release", type=int, required=True)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_ran)
