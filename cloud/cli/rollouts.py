"""``rollout start|status|list|events|pause|resume|abort``, ``recall``, ``takedown``.

Through the running service's API (``--api``, ``EDGEFLEET_TOKEN``). ``status
--watch`` (and ``start --watch``) redraws the rollout's progress every second
until it completes or aborts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from cloud.cli.common import api_call, remote_args

__all__ = ["register", "render_status"]

TERMINAL = ("completed", "aborted")
_BAR = 30


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"a comma-separated list of numbers: {text!r}") from e


def _bar(fraction: float) -> str:
    n = max(0, min(_BAR, round(fraction * _BAR)))
    return "#" * n + "." * (_BAR - n)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def render_status(st: dict[str, Any]) -> str:
    """The progress view of one rollout (``GET /api/v1/rollouts/{id}``) as text."""
    c = st["counts"]
    lines = [
        f"rollout {st['id']}: release {st['release']} of {st['model']} — {st['state'].upper()}"
        f" (wave {st['wave']}/{st['waves']}, {st['devices']} devices)",
        f"  {st['reason']}",
        f"  [{_bar(st['progress'])}] {st['progress']:.0%} updated   "
        + "  ".join(f"{k} {v}" for k, v in sorted(c.items())),
    ]
    for w in st.get("wave_detail", []):
        wc = w["counts"]
        done = wc.get("updated", 0)
        lines.append(
            f"  wave {w['wave']} ({w['percent']:g}%, {w['devices']} devices, {w['state']}): "
            f"[{_bar(done / w['devices'] if w['devices'] else 0)}] "
            + "  ".join(f"{k} {v}" for k, v in sorted(wc.items()))
        )
    h = st.get("health") or {}
    if h:
        parts = [f"{h.get('inferences', 0)} inferences"]
        if h.get("error_rate") is not None:
            parts.append(f"error rate {h['error_rate']:.2%}")
        if h.get("latency_ratio") is not None:
            parts.append(f"p99 {h['latency_ratio']:.2f}x previous")
        if h.get("drift_psi") is not None:
            parts.append(f"drift PSI {h['drift_psi']:.3f}")
        lines.append("  health: " + ", ".join(parts))
    if st.get("rollback"):
        lines.append(
            "  rollback: "
            + ", ".join(f"{k} re-released as {v}" for k, v in sorted(st["rollback"].items()))
        )
    for e in st.get("events", [])[-8:]:
        lines.append(f"  {_when(e['ts'])} {e['kind']:<15} {e['reason']}")
    return "\n".join(lines)


def _watch(args: argparse.Namespace, rid: str) -> int:
    tty = sys.stdout.isatty()
    last = ""
    while True:
        st = api_call(args, "GET", f"/api/v1/rollouts/{rid}")
        text = render_status(st)
        if text != last:
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(text + ("" if tty else "\n"), flush=True)
            last = text
        if st["state"] in TERMINAL or (st["state"] == "paused" and not args.follow_paused):
            return 0 if st["state"] == "completed" else 1
        time.sleep(args.interval)


def _target(args: argparse.Namespace) -> dict[str, Any]:
    t: dict[str, Any] = {}
    if args.all:
        t["all"] = True
    if args.group:
        t["group"] = args.group
    if args.tag:
        t["tags"] = args.tag
    if args.device:
        t["devices"] = args.device
    if args.percent is not None:
        t["percentage"] = args.percent
    return t


def cmd_start(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "model": args.model,
        "release": args.release,
        "target": _target(args),
        "waves": args.waves,
        "success_threshold": args.success,
        "failure_threshold": args.failure,
        "wave_timeout_s": args.wave_timeout,
        "on_timeout": args.on_timeout,
        "soak_s": args.soak,
        "deadline_s": args.deadline,
        "auto_rollback": not args.no_auto_rollback,
        "reason": args.reason,
        "gates": {
            "max_error_rate": args.max_error_rate,
            "max_latency_ratio": args.max_latency_ratio,
            "latency_slack_ms": args.latency_slack_ms,
            "max_drift_psi": args.max_drift_psi,
            "min_inferences": args.min_inferences,
            "require_telemetry": args.require_telemetry,
        },
    }
    st = api_call(args, "POST", "/api/v1/rollouts", json=body)
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    if args.watch:
        return _watch(args, st["id"])
    print(render_status(st))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        return _watch(args, args.rollout)
    st = api_call(args, "GET", f"/api/v1/rollouts/{args.rollout}")
    print(json.dumps(st, indent=1) if args.json else render_status(st))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    params = {"state": args.state} if args.state else {}
    rows = api_call(args, "GET", "/api/v1/rollouts", params=params)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"{'rollout':<12} {'model':<10} {'release':>7} {'state':<10} {'wave':>5} "
        f"{'updated':>9}  reason"
    )
    for r in rows:
        print(
            f"{r['id']:<12} {r['model']:<10} {r['release']:>7} {r['state']:<10} "
            f"{r['wave']:>2}/{r['waves']:<2} {r['progress']:>8.0%}  {r['reason'][:60]}"
        )
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    for e in api_call(args, "GET", f"/api/v1/rollouts/{args.rollout}/events"):
        wave = f"wave {e['wave']}" if e["wave"] else ""
        print(f"{_when(e['ts'])} {e['kind']:<16} {wave:<7} {e['reason']}")
    return 0


def _action(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        body: dict[str, Any] = {"reason": args.reason}
        if name == "resume":
            body["advance"] = args.advance
        if name == "abort":
            body["rollback"] = not args.no_rollback
        st = api_call(args, "POST", f"/api/v1/rollouts/{args.rollout}/{name}", json=body)
        print(render_status(st))
        return 0

    return run


def cmd_recall(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"reason": args.reason, "take_down": args.take_down}
    if args.to is not None:
        body["to_release"] = args.to
    out = api_call(args, "POST", f"/api/v1/releases/{args.model}/{args.release}/recall", json=body)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for rid in out["aborted"]:
        print(f"aborted rollout {rid} (devices it updated are rolled back)")
    recall = out["recall"]
    if recall is None:
        print(f"no other device runs or wants release {args.release} of {args.model}")
    else:
        print(
            f"recall rollout {recall['id']}: {recall['devices']} devices go to release "
            f"{recall['release']} ({recall['reason']})"
        )
    for path in out["taken_down"]:
        print(f"took down {path}")
    if args.watch and recall is not None:
        return _watch(args, recall["id"])
    return 0


def cmd_takedown(args: argparse.Namespace) -> int:
    out = api_call(args, "DELETE", f"/api/v1/releases/{args.model}/{args.release}")
    print(f"release {args.release} of {args.model} taken down: " + ", ".join(out["taken_down"]))
    return 0


def _watch_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--watch", action="store_true", help="redraw the progress until it ends")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    s.add_argument("--follow-paused", action="store_true", help="keep watching a paused rollout")
    s.add_argument("--json", action="store_true")


def register(sub: Any) -> None:
    ro = sub.add_parser("rollout", help="roll a release out to the fleet in waves")
    rsub = ro.add_subparsers(dest="rollout_action", required=True)

    s = remote_args(rsub.add_parser("start", help="start a rollout"))
    s.add_argument("--model", required=True)
    s.add_argument("--release", type=int, required=True)
    s.add_argument("--all", action="store_true", help="every known device")
    s.add_argument("--group", help="devices of this group")
    s.add_argument("--tag", action="append", help="devices carrying this tag (repeatable: all)")
    s.add_argument("--device", action="append", help="this device (repeatable)")
    s.add_argument("--percent", type=float, help="only this percentage of the selection")
    s.add_argument(
        "--waves",
        type=_floats,
        default=[1.0, 10.0, 50.0, 100.0],
        help="cumulative percentages per wave (default 1,10,50,100)",
    )
    s.add_argument("--success", type=float, default=0.95, help="updated share to pass a wave")
    s.add_argument("--failure", type=float, default=0.05, help="failed share that aborts")
    s.add_argument("--wave-timeout", type=float, default=1800.0, help="seconds per wave")
    s.add_argument("--on-timeout", choices=["pause", "abort"], default="pause")
    s.add_argument("--soak", type=float, default=0.0, help="seconds to watch a passed wave")
    s.add_argument(
        "--deadline",
        type=float,
        default=7 * 86400.0,
        help="seconds after which devices not updated are marked missed",
    )
    s.add_argument("--max-error-rate", type=float, default=0.02)
    s.add_argument("--max-latency-ratio", type=float, default=1.5)
    s.add_argument(
        "--latency-slack-ms",
        type=float,
        default=1.0,
        help="the latency gate also needs p99 this much slower (ms)",
    )
    s.add_argument("--max-drift-psi", type=float, default=None)
    s.add_argument("--min-inferences", type=int, default=200)
    s.add_argument(
        "--require-telemetry",
        action="store_true",
        help="a wave waits for enough telemetry to judge its gates",
    )
    s.add_argument(
        "--no-auto-rollback",
        action="store_true",
        help="an automatic abort stops the rollout but rolls nothing back",
    )
    s.add_argument("--reason", default="", help="why (kept with the rollout)")
    _watch_args(s)
    s.set_defaults(func=cmd_start)

    s = remote_args(rsub.add_parser("status", help="a rollout's progress"))
    s.add_argument("rollout")
    _watch_args(s)
    s.set_defaults(func=cmd_status)

    s = remote_args(rsub.add_parser("list", help="rollouts, newest first"))
    s.add_argument("--state", choices=["running", "paused", "completed", "aborted"])
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    s = remote_args(rsub.add_parser("events", help="every decision of a rollout, with reasons"))
    s.add_argument("rollout")
    s.set_defaults(func=cmd_events)

    for name, text in (
        ("pause", "stop starting new waves"),
        ("resume", "go on with a paused rollout"),
        ("abort", "stop it and roll updated devices back"),
    ):
        s = remote_args(rsub.add_parser(name, help=text))
        s.add_argument("rollout")
        s.add_argument("--reason", default="")
        if name == "resume":
            s.add_argument("--advance", action="store_true", help="start the next wave now")
        if name == "abort":
            s.add_argument(
                "--no-rollback", action="store_true", help="leave devices where they are"
            )
        s.set_defaults(func=_action(name))

    s = remote_args(
        sub.add_parser("recall", help="stop a bad release fleet-wide and roll every device back")
    )
    s.add_argument("--model", required=True)
    s.add_argument("--release", type=int, required=True)
    s.add_argument("--reason", required=True)
    s.add_argument("--to", type=int, help="release to go back to (default: the one before)")
    s.add_argument("--take-down", action="store_true", help="also delist the bad release")
    _watch_args(s)
    s.set_defaults(func=cmd_recall)

    s = remote_args(
        sub.add_parser("takedown", help="delist a release: no device can fetch it any more (admin)")
    )
    s.add_argument("--model", required=True)
    s.add_argument("--release", type=int, required=True)
    s.set_defaults(func=cmd_takedown)
