"""``edgefleet-cloud``: run the service, build and publish releases, deploy them.

Commands that change the repository (``init``, ``release``) work on the data
directory directly (the repository takes a file lock, so they are safe next
to a running server); commands that talk to devices (``deploy``, ``devices``)
go through the running service's HTTP API, which owns the broker connection.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import httpx

from cloud.config import CloudSettings
from shared.errors import EdgefleetError

__all__ = ["main"]

log = logging.getLogger("edgefleet.cloud")


def _settings(args: argparse.Namespace) -> CloudSettings:
    overrides: dict[str, Any] = {}
    for name in ("data_dir", "broker_host", "broker_port", "http_host", "http_port"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return CloudSettings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cloud.app import create_app

    settings = _settings(args)
    app = create_app(settings)
    uvicorn.run(app, host=settings.http_host, port=settings.http_port,
                log_level=args.log_level.lower(), access_log=False)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from cloud.tuf_repo import ReleaseRepository

    settings = _settings(args)
    repo = ReleaseRepository.open_or_init(settings.repo_dir, settings.keys_dir)
    print(f"TUF repository ready in {settings.repo_dir}")
    print(f"device trust anchor (root metadata): {repo.root_path}")
    return 0


def cmd_root(args: argparse.Namespace) -> int:
    from cloud.tuf_repo import ReleaseRepository

    settings = _settings(args)
    repo = ReleaseRepository.open_or_init(settings.repo_dir, settings.keys_dir)
    data = repo.root_bytes()
    if args.out == "-":
        sys.stdout.buffer.write(data)
    else:
        Path(args.out).write_bytes(data)
    return 0


def cmd_release_digits(args: argparse.Namespace) -> int:
    """Train the digits CNN, quantize, gate, and publish it as the next release."""
    from cloud.pipeline.artifacts import build_artifacts
    from cloud.pipeline.digits import load_digits_splits, train_digits_cnn
    from cloud.pipeline.gate import GateConfig, run_pipeline
    from cloud.releases import ReleaseService
    from cloud.tuf_repo import ReleaseRepository

    settings = _settings(args)
    repo = ReleaseRepository.open_or_init(settings.repo_dir, settings.keys_dir)
    service = ReleaseService(repo)
    splits = load_digits_splits(seed=args.seed)
    print(f"training digits CNN (variant {args.variant}, {args.epochs} epochs) ...", flush=True)
    model = train_digits_cnn(splits, epochs=args.epochs, seed=args.seed, variant=args.variant)
    result = run_pipeline(model, splits.x_calib, (splits.x_test, splits.y_test),
                          mode=args.mode, gate=GateConfig(), seed=args.seed)
    for line in result.decisions:
        print(f"  gate: {line}")
    artifacts = build_artifacts(result, seed=args.seed)
    manifest = service.publish(args.model_name, artifacts)
    print(json.dumps({"model": manifest.model, "release": manifest.release,
                      "quantization": manifest.quantization,
                      "size_bytes": len(artifacts.model_bytes),
                      "metrics": manifest.metrics}, indent=1))
    return 0


def cmd_releases(args: argparse.Namespace) -> int:
    from cloud.releases import ReleaseService
    from cloud.tuf_repo import ReleaseRepository

    settings = _settings(args)
    service = ReleaseService(ReleaseRepository.open_or_init(settings.repo_dir, settings.keys_dir))
    print(f"{'model':<16} {'release':>7} {'quant':<8} {'accuracy':>8}")
    for m in service.releases(args.model):
        acc = m.metrics.get("accuracy")
        print(f"{m.model:<16} {m.release:>7} {m.quantization:<8} "
              f"{'' if acc is None else f'{acc:.3f}':>8}")
    return 0


def _api(args: argparse.Namespace, method: str, path: str, **kw: Any) -> Any:
    try:
        r = httpx.request(method, args.api.rstrip("/") + path, timeout=30, **kw)
    except httpx.HTTPError as e:
        raise EdgefleetError(f"cloud API at {args.api} is unreachable: {e}") from e
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text
        raise EdgefleetError(f"{method} {path} failed ({r.status_code}): {detail}")
    return r.json()


def cmd_deploy(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model, "release": args.release}
    if args.all:
        body["all_devices"] = True
    else:
        body["devices"] = args.device
    out = _api(args, "POST", "/api/v1/deployments", json=body)
    print(f"release {out['release']} of {out['model']} desired on {len(out['devices'])} devices")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    devices = _api(args, "GET", "/api/v1/devices")
    if args.json:
        print(json.dumps(devices, indent=1))
        return 0
    print(f"{'device':<14} {'online':<6} {'model':<8} {'release':>7} {'state':<11} "
          f"{'slot':<4} {'inferences':>10}")
    for d in devices:
        print(f"{d['device_id']:<14} {'yes' if d['online'] else 'no':<6} "
              f"{d['model'] or '-':<8} {d['release'] or '-':>7} {d['state'] or '-':<11} "
              f"{d['slot'] or '-':<4} {d['inferences_total']:>10}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet-cloud", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default="WARNING",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    def local(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--data-dir", type=Path, help="keys, repository (default var/cloud)")
        return sp

    def remote(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--api", default="http://127.0.0.1:8080", help="cloud service URL")
        return sp

    s = local(sub.add_parser("serve", help="run the HTTP API, TUF repository and ingest"))
    s.add_argument("--broker-host")
    s.add_argument("--broker-port", type=int)
    s.add_argument("--http-host")
    s.add_argument("--http-port", type=int)
    s.set_defaults(func=cmd_serve)

    local(sub.add_parser("init", help="create keys and the TUF repository")).set_defaults(
        func=cmd_init)

    s = local(sub.add_parser("root", help="export root metadata (device trust anchor)"))
    s.add_argument("--out", default="-")
    s.set_defaults(func=cmd_root)

    rel = sub.add_parser("release", help="build and publish releases")
    rsub = rel.add_subparsers(dest="kind", required=True)
    s = local(rsub.add_parser("digits", help="train the digits CNN and publish it"))
    s.add_argument("--model-name", default="digits")
    s.add_argument("--variant", type=int, default=0, help="retraining variant (new seed)")
    s.add_argument("--epochs", type=int, default=12)
    s.add_argument("--mode", default="int8",
                   choices=["float32", "dynamic", "float16", "int8", "int16x8"])
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_release_digits)

    s = local(sub.add_parser("releases", help="list published releases"))
    s.add_argument("--model")
    s.set_defaults(func=cmd_releases)

    s = remote(sub.add_parser("deploy", help="set the desired release of devices"))
    s.add_argument("--model", required=True)
    s.add_argument("--release", type=int, required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--device", action="append", help="device id (repeatable)")
    g.add_argument("--all", action="store_true", help="every known device")
    s.set_defaults(func=cmd_deploy)

    s = remote(sub.add_parser("devices", help="show the fleet"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_devices)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except EdgefleetError as e:
        print(f"edgefleet-cloud: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
