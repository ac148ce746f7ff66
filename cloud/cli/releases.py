"""``release``, ``releases``: build, sign and list releases."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cloud.cli.common import local_args, settings_from

__all__ = ["register"]


def cmd_release_digits(args: argparse.Namespace) -> int:
    """Train the digits CNN, quantize, gate, and publish it as the next release."""
    from cloud.pipeline.artifacts import build_artifacts
    from cloud.pipeline.digits import load_digits_splits, train_digits_cnn
    from cloud.pipeline.gate import GateConfig, run_pipeline
    from cloud.releases import ReleaseService
    from cloud.tuf_repo import ReleaseRepository

    settings = settings_from(args)
    repo = ReleaseRepository.open_or_init(settings.repo_dir, settings.keys_dir)
    from cloud.db import Database

    db = Database(settings.db_url)
    db.create_all()
    # With the database, the release is also recorded in the model registry.
    service = ReleaseService(repo, db=db)
    splits = load_digits_splits(seed=args.seed)
    print(f"training digits CNN (variant {args.variant}, {args.epochs} epochs) ...", flush=True)
    model = train_digits_cnn(splits, epochs=args.epochs, seed=args.seed, variant=args.variant)
    result = run_pipeline(
        model,
        splits.x_calib,
        (splits.x_test, splits.y_test),
        mode=args.mode,
        gate=GateConfig(),
        seed=args.seed,
    )
    for line in result.decisions:
        print(f"  gate: {line}")
    artifacts = build_artifacts(result, seed=args.seed)
    manifest = service.publish(args.model_name, artifacts)
    print(
        json.dumps(
            {
                "model": manifest.model,
                "release": manifest.release,
                "quantization": manifest.quantization,
                "size_bytes": len(artifacts.model_bytes),
                "metrics": manifest.metrics,
            },
            indent=1,
        )
    )
    return 0


def cmd_releases(args: argparse.Namespace) -> int:
    from cloud.releases import ReleaseService
    from cloud.tuf_repo import ReleaseRepository

    settings = settings_from(args)
    service = ReleaseService(ReleaseRepository.open_or_init(settings.repo_dir, settings.keys_dir))
    print(f"{'model':<16} {'release':>7} {'quant':<8} {'accuracy':>8}")
    for m in service.releases(args.model):
        acc = m.metrics.get("accuracy")
        print(
            f"{m.model:<16} {m.release:>7} {m.quantization:<8} "
            f"{'' if acc is None else f'{acc:.3f}':>8}"
        )
    return 0


def register(sub: Any) -> None:
    rel = sub.add_parser("release", help="build and publish releases")
    rsub = rel.add_subparsers(dest="kind", required=True)
    s = local_args(rsub.add_parser("digits", help="train the digits CNN and publish it"))
    s.add_argument("--model-name", default="digits")
    s.add_argument("--variant", type=int, default=0, help="retraining variant (new seed)")
    s.add_argument("--epochs", type=int, default=12)
    s.add_argument(
        "--mode", default="int8", choices=["float32", "dynamic", "float16", "int8", "int16x8"]
    )
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_release_digits)

    s = local_args(sub.add_parser("releases", help="list published releases"))
    s.add_argument("--model")
    s.set_defaults(func=cmd_releases)
