"""``edgefleet-sim``: the end-to-end demo, simulated devices and fleets, faults,
scenarios, and the QEMU arm64 device."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from firmware_sim import commands
from firmware_sim.qemu import cli as qemu_cli
from shared.errors import EdgefleetError

__all__ = ["main"]


def cmd_demo(args: argparse.Namespace) -> int:
    from firmware_sim.demo import run_demo

    return run_demo(n_devices=args.devices, workdir=args.workdir, epochs=args.epochs)


def cmd_device(args: argparse.Namespace) -> int:
    """One provisioned device agent fed by a simulated digits sensor."""
    from device.agent import Agent
    from device.cli import run_agent
    from device.config import load_config
    from firmware_sim.control import ControlledSensor
    from firmware_sim.sensors import Drift

    cfg = load_config(args.data_dir)
    sensor = ControlledSensor(
        cfg.device_id, args.drift_file, seed=args.seed, drift=Drift(args.drift, args.drift_amount)
    )
    return run_agent(Agent(cfg, sensor))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet-sim", description=__doc__)
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="broker + cloud + simulated devices; release v1 then v2")
    s.add_argument("--devices", type=int, default=3)
    s.add_argument("--workdir", type=Path, help="keep files here instead of a temp dir")
    s.add_argument("--epochs", type=int, default=12)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("device", help="run one provisioned agent with a simulated sensor")
    s.add_argument("--data-dir", type=Path, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--drift", default="none", choices=["none", "noise", "shift", "rotation"])
    s.add_argument("--drift-amount", type=float, default=0.0)
    s.add_argument(
        "--drift-file",
        type=Path,
        help="follow this drift control file at run time (see docs/SIMULATOR.md)",
    )
    s.set_defaults(func=cmd_device)

    commands.register(sub)
    qemu_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except EdgefleetError as e:
        print(f"edgefleet-sim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
