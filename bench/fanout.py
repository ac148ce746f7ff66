"""Fan-out benchmark: 1,000 simulated devices updated on this machine, per-device HTTP vs broker.

The same fleet update runs once per mode, in one run, each on a fresh fleet
(``firmware_sim.massfleet``: a private Mosquitto, the cloud service, N real
agents as threads in ``--workers`` processes):

* ``http``: agents with ``blob_source = "http"`` and the cloud's broker fan-out
  off (``EDGEFLEET_FANOUT=false``): every device downloads every target from
  the cloud's HTTP server, the way Mender / hawkBit style updaters do;
* ``broker``: agents with ``blob_source = "mqtt"`` and fan-out on: the cloud
  publishes each target once as retained chunks and the broker copies them to
  every device (``cloud/fanout.py``, ``device/blob_fetcher.py``);
* ``auto`` (optional): the agent default, broker first with HTTP as fallback.

Each fleet first installs release 1 (not measured), then the bench publishes
release 2 (``edgefleet-cloud model release``) and deploys it to every device
with ``POST /api/v1/deployments``. Printed per mode: time from the deploy call
to the last device reporting release 2 committed (verified, self-tested,
swapped, probation passed); devices updated / failed / left without a working
model (checked inside each worker with a test inference on the serving model);
bytes on the wire per device, counted on the device's own sockets (TCP
payload, both directions, MQTT and HTTP, TUF metadata included) and their
ratio to the target size; the cloud's upstream bytes (HTTP bytes it served,
bytes it published to the broker, from Mosquitto's ``$SYS`` counters); CPU
seconds of each process and memory per device. Then broker/http ratios and a
verdict against the targets: fleet updated in <= 120 s, <= 1.05x the target
size per device, no device left without a working model.

The release is a Keras MobileNetV2 (alpha 0.35, 96x96, ``weights=None``)
quantized to int8 by the project's own pipeline (``firmware_sim.fanout_release``),
built once per run (or once per ``--cache-dir``); nothing is downloaded.

    python bench/fanout.py [--devices 1000] [--modes http,broker] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from firmware_sim.fanout_release import (  # noqa: E402
    MODEL,
    build_cloud_template,
    publish_candidate,
)
from firmware_sim.massfleet import MAX_AGENTS_PER_WORKER, MassFleet, MassOptions  # noqa: E402

#: mode -> (agent blob_source, cloud EDGEFLEET_FANOUT)
MODES: dict[str, tuple[str, str]] = {
    "http": ("http", "false"),
    "broker": ("mqtt", "true"),
    "auto": ("auto", "true"),
}
TARGET_SECONDS = 120.0
TARGET_WIRE_RATIO = 1.05
QUICK_DEVICES = 50


@dataclass
class Target:
    """The denominator: the signed target files of the release a device fetches."""

    files: dict[str, int]
    deltas: list[str]

    @property
    def size(self) -> int:
        return sum(self.files.values())


@dataclass
class ModeResult:
    mode: str
    devices: int
    workers: int = 0
    start_s: float = 0.0
    r1_s: float | None = None
    publish_s: float = 0.0
    deploy_call_s: float = 0.0
    #: deploy call -> last device committed release 2 (None: not all did in time)
    fleet_s: float | None = None
    swapped_last_s: float | None = None
    committed_p50_s: float | None = None
    updated: int = 0
    failed: int = 0
    no_model: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    per_device: list[dict[str, int]] = field(default_factory=list)
    unclaimed: dict[str, int] = field(default_factory=dict)
    cloud_http: int = 0
    cloud_broker: int = 0
    broker_sent: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    rss_mb: float = 0.0
    peak_mb: float = 0.0
    cloud_view_updated: int = 0

    def wire(self, d: dict[str, int]) -> int:
        return sum(d.values())

    @property
    def wire_mean(self) -> float:
        return sum(self.wire(d) for d in self.per_device) / max(len(self.per_device), 1)

    @property
    def wire_max(self) -> int:
        return max((self.wire(d) for d in self.per_device), default=0)

    def mean(self, key: str) -> float:
        return sum(d.get(key, 0) for d in self.per_device) / max(len(self.per_device), 1)


def release_target(cloud_dir: Path, model: str, release: int) -> Target:
    """Lengths of the signed targets of ``release`` (newest targets metadata)."""
    meta = cloud_dir / "repository" / "metadata"
    newest = max(meta.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
    targets = json.loads(newest.read_text())["signed"]["targets"]
    prefix = f"{model}/{release}/"
    files = {
        p[len(prefix) :]: int(t["length"])
        for p, t in targets.items()
        if p.startswith(prefix) and ".bsdiff4" not in p
    }
    deltas = [p[len(prefix) :] for p in targets if p.startswith(prefix) and ".bsdiff4" in p]
    return Target(files=files, deltas=deltas)


def _diff(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]], who: str) -> dict[str, int]:
    before = a.get(who, {})
    return {k: v - before.get(k, 0) for k, v in b.get(who, {}).items()}


def run_mode(
    mode: str,
    n: int,
    workdir: Path,
    template: Any,
    args: argparse.Namespace,
    log: Any = print,
) -> tuple[ModeResult, Target]:
    blob_source, fanout = MODES[mode]
    opts = MassOptions(
        devices=n,
        workers=args.workers,
        blob_source=blob_source,
        inference_interval=args.inference_interval,
        cloud_template=template.cloud_dir,
        cloud_env={"EDGEFLEET_FANOUT": fanout},
        device_cores=args.device_cores or None,
        switch_interval=args.switch_interval or None,
    )
    res = ModeResult(mode=mode, devices=n)
    started = time.monotonic()
    with MassFleet(workdir, opts) as fleet:
        assert fleet.monitor is not None and fleet.cloud is not None
        res.start_s = time.monotonic() - started
        res.workers = fleet.worker_count
        log(
            f"[{mode}] {n} devices in {res.workers} worker processes online in "
            f"{res.start_s:.1f} s; installing release 1 ..."
        )
        t0 = fleet.deploy(MODEL, 1)
        if fleet.wait_release(1, args.timeout):
            res.r1_s = max(t.done[1] for t in fleet.monitor.devices.values()) - t0
        log(
            f"[{mode}] release 1 on {fleet.monitor.done(1)}/{n} devices"
            + (f" in {res.r1_s:.1f} s" if res.r1_s is not None else " (timed out)")
            + "; publishing and deploying release 2 (measured) ..."
        )
        time.sleep(1.0)
        b0, s0, p0 = fleet.device_bytes(), fleet.monitor.sys_bytes(), fleet.process_stats()
        m0 = fleet.meter.snapshot() if fleet.meter else {}
        t = time.monotonic()
        publish_candidate(fleet.cloud.cloud_dir, template.candidate)
        res.publish_s = time.monotonic() - t
        target = release_target(fleet.cloud.cloud_dir, MODEL, 2)
        t0 = fleet.deploy(MODEL, 2)
        res.deploy_call_s = time.monotonic() - t0
        all_done = fleet.wait_release(2, args.timeout)
        tracks = fleet.monitor.devices.values()
        done = sorted(tr.done[2] - t0 for tr in tracks if 2 in tr.done)
        swapped = [tr.events[(2, "swapped")] - t0 for tr in tracks if (2, "swapped") in tr.events]
        res.fleet_s = done[-1] if all_done else None
        res.committed_p50_s = done[len(done) // 2] if done else None
        res.swapped_last_s = max(swapped) if swapped else None
        log(
            f"[{mode}] release 2 committed on {len(done)}/{n} devices"
            + (f" in {res.fleet_s:.1f} s" if res.fleet_s is not None else " (timed out)")
        )
        time.sleep(1.5)  # the last acknowledgements, and a $SYS tick
        b1, s1, p1 = fleet.device_bytes(), fleet.monitor.sys_bytes(), fleet.process_stats()
        m1 = fleet.meter.snapshot() if fleet.meter else {}
        status = fleet.device_status()
        base_mb = fleet.base_rss_mb()
        cloud_view = fleet.cloud.devices()

    res.per_device = [_diff(b0, b1, d) for d in fleet.ids]
    res.unclaimed = _diff(b0, b1, "?")
    bench = _diff(m0, m1, "bench")
    res.cloud_http = sum(d.get("http_rx", 0) for d in res.per_device) + res.unclaimed.get(
        "http_rx", 0
    )
    device_mqtt_tx = sum(d.get("mqtt_tx", 0) for d in res.per_device) + res.unclaimed.get(
        "mqtt_tx", 0
    )
    # What reached the broker from neither a device nor the bench came from the cloud.
    res.cloud_broker = (
        s1.get("received", 0) - s0.get("received", 0) - device_mqtt_tx - bench.get("mqtt_tx", 0)
    )
    res.broker_sent = s1.get("sent", 0) - s0.get("sent", 0)
    res.cpu = {k: p1[k]["cpu_s"] - p0.get(k, {}).get("cpu_s", 0.0) for k in p1}
    workers = [p1[k] for k in p1 if k.startswith("worker-")]
    res.rss_mb = (sum(w["rss_mb"] for w in workers) - base_mb) / n
    res.peak_mb = (sum(w["peak_mb"] for w in workers) - base_mb) / n
    for d in fleet.ids:
        st = status.get(d, {})
        tr = fleet.monitor.devices[d]
        ok = 2 in tr.done and st.get("release") == 2 and st.get("serving")
        res.updated += bool(ok)
        res.no_model += not st.get("serving")
        for release, r in tr.reasons:
            if release == 2:
                res.reasons[r] = res.reasons.get(r, 0) + 1
    res.failed = n - res.updated
    res.cloud_view_updated = sum(
        1 for d in cloud_view if d.get("release") == 2 and d.get("state") == "idle"
    )
    return res, target


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def report(results: list[ModeResult], target: Target, args: argparse.Namespace) -> list[str]:
    """The table and the verdict lines."""
    size = target.size
    files = " + ".join(f"{k} {v:,} B" for k, v in target.files.items())
    out = [
        f"release 2 of {MODEL}: {files} = {size:,} B. Denominator of every ratio: these "
        f"{len(target.files)} signed TUF targets, which each device fetches in full"
        + (f" (deltas offered: {', '.join(target.deltas)})" if target.deltas else " (no delta)"),
        "",
    ]
    w = 16
    head = f"{'':44}" + "".join(f"{r.mode:>{w}}" for r in results)
    out.append(head)

    def row(label: str, cells: list[str]) -> None:
        out.append(f"{label:44}" + "".join(f"{c:>{w}}" for c in cells))

    row("fleet up (agents started, online)", [_s(r.start_s) for r in results])
    row("release 1 installed (not measured)", [_s(r.r1_s) for r in results])
    row("release 2 published (CLI, not measured)", [_s(r.publish_s) for r in results])
    row("deploy call (REST, all devices)", [_s(r.deploy_call_s) for r in results])
    row("TIME TO FLEET UPDATED (deploy -> last commit)", [_s(r.fleet_s) for r in results])
    row("  median device committed", [_s(r.committed_p50_s) for r in results])
    row("  last device swapped", [_s(r.swapped_last_s) for r in results])
    row(
        "devices updated / failed / no working model",
        [f"{r.updated}/{r.failed}/{r.no_model}" for r in results],
    )
    row("  cloud's view: on release 2, idle", [str(r.cloud_view_updated) for r in results])
    row("WIRE BYTES PER DEVICE (mean, rx+tx)", [f"{r.wire_mean:,.0f}" for r in results])
    row("  / target size", [f"{r.wire_mean / size:.4f}x" for r in results])
    row("  worst device / target size", [f"{r.wire_max / size:.4f}x" for r in results])
    row(
        f"  devices over {TARGET_WIRE_RATIO}x",
        [str(sum(r.wire(d) > TARGET_WIRE_RATIO * size for d in r.per_device)) for r in results],
    )
    for key, label in (
        ("http_rx", "  HTTP received"),
        ("http_tx", "  HTTP sent"),
        ("mqtt_rx", "  MQTT received"),
        ("mqtt_tx", "  MQTT sent"),
    ):
        row(label, [f"{r.mean(key):,.0f}" for r in results])
    row("CLOUD UPSTREAM: HTTP bytes served", [_mb(r.cloud_http) for r in results])
    row("  published to the broker ($SYS)", [_mb(r.cloud_broker) for r in results])
    row(
        "  total / (target x devices)",
        [f"{(r.cloud_http + r.cloud_broker) / (size * r.devices):.4f}x" for r in results],
    )
    row("broker bytes sent (all clients)", [_mb(r.broker_sent) for r in results])
    for proc in ("cloud", "broker"):
        row(f"CPU s during the update: {proc}", [f"{r.cpu.get(proc, 0):.1f}" for r in results])
    row(
        "CPU s during the update: agents",
        [f"{sum(v for k, v in r.cpu.items() if k.startswith('worker')):.1f}" for r in results],
    )
    row(
        "agent memory per device: RSS / peak (MB)",
        [f"{r.rss_mb:.1f} / {r.peak_mb:.1f}" for r in results],
    )
    for r in results:
        if r.reasons:
            out.append(f"  {r.mode}: release 2 attempts that failed (then retried): {r.reasons}")
        if any(r.unclaimed.values()):
            out.append(f"  {r.mode}: bytes on connections no device claimed: {r.unclaimed}")
    by = {r.mode: r for r in results}
    h, b = by.get("http"), by.get("broker")
    if h is not None and b is not None and h.fleet_s and b.fleet_s:
        up_h, up_b = h.cloud_http + h.cloud_broker, b.cloud_http + b.cloud_broker
        out += [
            "",
            f"broker / http: time {b.fleet_s / h.fleet_s:.2f}x "
            f"({b.fleet_s:.1f} s vs {h.fleet_s:.1f} s); cloud upstream "
            f"{up_b / up_h:.4f}x ({_mb(up_b)} vs {_mb(up_h)}); wire per device "
            f"{b.wire_mean / h.wire_mean:.3f}x",
        ]
    out.append("")
    for r in results:
        checks = [
            (
                r.fleet_s is not None and r.fleet_s <= TARGET_SECONDS,
                f"time {_s(r.fleet_s)} <= {TARGET_SECONDS:.0f} s",
            ),
            (
                r.wire_mean / size <= TARGET_WIRE_RATIO,
                f"wire {r.wire_mean / size:.3f}x <= {TARGET_WIRE_RATIO}x",
            ),
            (
                r.no_model == 0 and r.failed == 0,
                f"{r.updated}/{r.devices} updated, {r.no_model} without a working model",
            ),
        ]
        verdict = "PASS" if all(ok for ok, _ in checks) else "FAIL"
        detail = "; ".join(f"{text} {'ok' if ok else 'MISSED'}" for ok, text in checks)
        out.append(f"verdict {r.mode:6} ({r.devices} devices): {verdict}: {detail}")
    passing = [r for r in results if r.fleet_s is not None and r.failed == 0]
    if len(passing) > 1:
        fastest = min(passing, key=lambda r: r.fleet_s or 0.0)
        leanest = min(passing, key=lambda r: r.cloud_http + r.cloud_broker)
        out.append(
            f"fastest to fleet updated: {fastest.mode} ({_s(fastest.fleet_s)}); least cloud "
            f"upstream: {leanest.mode} ({_mb(leanest.cloud_http + leanest.cloud_broker)}). "
            'Defaults: agent blob_source = "auto" (the broker\'s blobs where it holds them, '
            "else HTTP), cloud EDGEFLEET_FANOUT = true"
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_DEVICES} devices")
    p.add_argument("--modes", default="http,broker", help="comma list of http, broker, auto")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="agent processes (default 2; at least one per 250 devices)",
    )
    p.add_argument(
        "--inference-interval",
        type=float,
        default=2.0,
        help="seconds between a device's inferences (default 2)",
    )
    p.add_argument(
        "--device-cores",
        type=int,
        default=1,
        help="cores each simulated device has (sizes its interpreter pool; 0: this host's)",
    )
    p.add_argument(
        "--switch-interval",
        type=float,
        default=0.02,
        help="GIL switch interval of the agent processes, s (default 0.02; 0: Python's)",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="per rollout, seconds")
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    p.add_argument("--cache-dir", type=Path, help="built models and cloud template, reused")
    args = p.parse_args(argv)
    if args.quick:
        args.devices = QUICK_DEVICES
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"unknown modes {bad}: use {', '.join(MODES)}")
    if args.devices < 1 or args.workers < 1:
        p.error("--devices and --workers must be >= 1")
    return args


def run(args: argparse.Namespace, log: Any = print) -> tuple[list[ModeResult], Target]:
    """Build (or reuse) the releases, then run every mode; returns the results."""
    tmp = tempfile.mkdtemp(prefix="edgefleet-fanout-")
    try:
        work = Path(args.workdir or tmp)
        cache = Path(args.cache_dir or work / "cache")
        t = time.monotonic()
        template = build_cloud_template(cache / "cloud-template", cache / "models")
        log(f"releases built with the project's pipeline in {time.monotonic() - t:.0f} s")
        results, target = [], None
        for mode in args.modes:
            res, target = run_mode(mode, args.devices, work / mode, template, args, log)
            results.append(res)
            if args.workdir is None:  # 1,000 device dirs per mode: do not keep them
                shutil.rmtree(work / mode, ignore_errors=True)
        assert target is not None
        return results, target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A plain SIGTERM would skip the clean-up that stops a thousand agents.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(
        f"edgefleet fan-out bench: {args.devices} devices per mode ({', '.join(args.modes)}); "
        f"{max(args.workers, -(-args.devices // MAX_AGENTS_PER_WORKER))} agent processes, "
        f"{args.device_cores or os.cpu_count()} core(s) per "
        f"simulated device, one inference per {args.inference_interval:g} s; this machine: "
        f"{os.cpu_count()} cores, {mem:.1f} GiB",
        flush=True,
    )
    results, target = run(args, log=lambda s: print(s, flush=True))
    print()
    for line in report(results, target, args):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
