"""``edgefleet-device``: provision a device and run its agent."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from shared.errors import EdgefleetError

__all__ = ["main"]


def _source(spec: str):  # type: ignore[no-untyped-def]
    from device.inputs import NpzReplaySource, RandomSource

    if spec == "random":
        return RandomSource()
    if spec.startswith("npz:"):
        return NpzReplaySource(Path(spec[4:]))
    raise EdgefleetError(f"unknown input source {spec!r}: use `random` or `npz:<file>`")


def run_agent(agent) -> int:  # type: ignore[no-untyped-def]
    """Run an agent until SIGTERM/SIGINT, then stop it cleanly."""

    def _stop(signum: int, frame: FrameType | None) -> None:
        agent._stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    agent.start()
    agent.wait()
    agent.stop()
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from device.config import provision

    path = provision(
        args.data_dir,
        device_id=args.device_id,
        root_file=args.root,
        broker_host=args.broker_host,
        broker_port=args.broker_port,
        repo_url=args.repo_url,
        inference_threads=args.inference_threads,
        inference_interval=args.inference_interval,
        telemetry_interval=args.telemetry_interval,
    )
    print(f"provisioned {args.device_id}: {path}")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    """Make the device key (on the device; it never leaves) and get a certificate."""
    from device.config import create_csr, enroll_with_token, install_certificate

    if args.cert is not None or args.ca is not None:
        if args.cert is None or args.ca is None:
            raise EdgefleetError("give both --cert and --ca to install a certificate")
        files = install_certificate(args.data_dir, args.cert.read_bytes(), args.ca.read_bytes())
        print(f"installed certificate {files.cert_file}; the agent now uses mutual TLS")
        return 0
    if args.token is not None or args.cloud is not None:
        if args.token is None or args.cloud is None:
            raise EdgefleetError("give both --cloud and --token to enroll online")
        pinned = args.pin_ca.read_bytes() if args.pin_ca is not None else None
        files = enroll_with_token(
            args.data_dir, args.cloud, args.token, expected_ca=pinned, new_key=args.new_key
        )
        print(f"enrolled: certificate {files.cert_file}; the agent now uses mutual TLS")
        return 0
    csr = create_csr(args.data_dir, new_key=args.new_key)
    if args.csr_out is None or str(args.csr_out) == "-":
        sys.stdout.write(csr.decode())
    else:
        args.csr_out.write_bytes(csr)
        print(
            f"wrote {args.csr_out}: have it signed with `edgefleet-cloud device enroll --csr`, "
            "then run `edgefleet-device enroll --cert <cert> --ca <ca>`"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from device.agent import Agent
    from device.config import load_config

    cfg = load_config(args.data_dir)
    return run_agent(Agent(cfg, _source(args.source)))


def cmd_status(args: argparse.Namespace) -> int:
    from device.store import SLOTS, SlotStore

    store = SlotStore(args.data_dir)
    state = store.state()
    for slot in SLOTS:
        c = store.read(slot)
        mark = "*" if slot == state.active else ("<" if slot == state.previous else " ")
        desc = f"{c.manifest.model} release {c.manifest.release}" if c else "empty"
        print(f"{mark} slot {slot}: {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet-device", description=__doc__)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("provision", help="create a device data dir with config and trust anchor")
    s.add_argument("--data-dir", type=Path, required=True)
    s.add_argument("--device-id", required=True)
    s.add_argument("--root", type=Path, required=True, help="TUF root.json from the cloud")
    s.add_argument("--broker-host", default="127.0.0.1")
    s.add_argument("--broker-port", type=int, default=1883)
    s.add_argument("--repo-url", required=True, help="e.g. http://cloud:8080/tuf/")
    s.add_argument("--inference-threads", type=int, default=1)
    s.add_argument("--inference-interval", type=float, default=0.0)
    s.add_argument("--telemetry-interval", type=float, default=10.0)
    s.set_defaults(func=cmd_provision)

    s = sub.add_parser("enroll", help="make the device key and CSR, or install a certificate")
    s.add_argument("--data-dir", type=Path, required=True)
    s.add_argument("--csr-out", type=Path, help="write the CSR here (default stdout)")
    s.add_argument("--new-key", action="store_true", help="replace the device key")
    s.add_argument("--cert", type=Path, help="install this certificate (from the cloud CA)")
    s.add_argument("--ca", type=Path, help="the cloud CA certificate to install with --cert")
    s.add_argument("--cloud", help="enroll online at this cloud URL (with --token)")
    s.add_argument("--token", help="one-time bootstrap token (`edgefleet-cloud device issue`)")
    s.add_argument("--pin-ca", type=Path, help="refuse an online answer with another CA")
    s.set_defaults(func=cmd_enroll)

    s = sub.add_parser("run", help="run the agent until SIGTERM")
    s.add_argument("--data-dir", type=Path, required=True)
    s.add_argument("--source", default="random", help="`random` or `npz:<file>` (array x)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="show the local A/B slots")
    s.add_argument("--data-dir", type=Path, required=True)
    s.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except EdgefleetError as e:
        print(f"edgefleet-device: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
