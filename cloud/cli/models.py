"""``model add|quantize|release|list|show``: the model registry on the local data dir.

Like ``release digits`` these work on the data directory directly (database,
blob store, TUF repository; safe next to a running server). Long steps show
a progress bar on stderr, driven by the pipeline's progress callback; results
go to stdout (``--json`` for scripts).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from cloud.cli.common import local_args, settings_from

__all__ = ["ProgressBar", "register"]

_BAR_WIDTH = 28


class ProgressBar:
    """A one-line text progress bar: redrawn in place on a terminal, one line per step otherwise."""

    def __init__(self, stream: TextIO | None = None, width: int = _BAR_WIDTH) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._last_step: str | None = None
        self._drawn = False

    def render(self, step: str, fraction: float) -> str:
        fraction = min(1.0, max(0.0, fraction))
        filled = round(fraction * self.width)
        elapsed = time.monotonic() - self._started
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {fraction * 100:3.0f}%  {elapsed:5.1f}s  {step}"

    def __call__(self, step: str, fraction: float) -> None:
        line = self.render(step, fraction)
        if self._tty:
            self.stream.write("\r" + line.ljust(self.width + 48))
            self._drawn = True
        elif step != self._last_step:
            self.stream.write(line + "\n")
        self._last_step = step
        self.stream.flush()

    def close(self) -> None:
        if self._tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli"


def _registry(args: argparse.Namespace) -> Any:
    from cloud.registry import Registry

    return Registry.from_settings(settings_from(args))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=1, sort_keys=True))


def _print_candidate(c: Any) -> None:
    print(f"candidate {c.id} of {c.model}: {c.status} ({c.mode or c.requested_mode})")
    for line in c.decisions:
        print(f"  gate: {line}")
    for key in ("accuracy", "accuracy_drop", "top1_agreement", "size_ratio", "latency_ratio"):
        if key in c.metrics:
            print(f"  {key}: {c.metrics[key]:.4g}")
    if c.size_bytes is not None:
        print(f"  size: {c.size_bytes} bytes")


def cmd_add(args: argparse.Namespace) -> int:
    registry = _registry(args)
    try:
        src = registry.add_model(
            args.name, args.file, who=_who(), filename=args.file.name, description=args.description
        )
    finally:
        registry.db.dispose()
    if args.json:
        _print_json(src.model_dump(mode="json"))
    else:
        shape = "unknown" if src.input_shape is None else src.input_shape
        print(
            f"added {src.kind} source {src.id} to {src.model}: sha256 {src.sha256[:16]}..., "
            f"{src.size_bytes} bytes, input {shape}"
        )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from cloud.pipeline.gate import GateConfig
    from cloud.registry import QuantizeOptions

    labels = None
    if args.labels:
        labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
    try:
        gate = GateConfig(
            max_accuracy_drop=args.max_accuracy_drop,
            min_top1_agreement=args.min_top1_agreement,
            max_abs_error=args.max_abs_error,
            max_latency_ratio=args.max_latency_ratio,
            min_accuracy=args.min_accuracy,
        )
    except ValueError as e:
        from shared.errors import ConfigError

        raise ConfigError(str(e)) from e
    options = QuantizeOptions(
        mode=args.mode,
        gate=gate,
        fallback=not args.no_fallback,
        seed=args.seed,
        labels=labels,
        max_calibration_samples=args.max_calibration_samples,
    )
    registry = _registry(args)
    bar = ProgressBar()
    try:
        candidate = registry.quantize(
            args.name,
            options,
            who=_who(),
            calibration=args.calibration,
            eval_set=args.eval_set,
            source_id=args.source_id,
            progress=bar,
        )
        bar.close()
        release = registry.release(candidate.id, who=_who()) if args.release else None
    finally:
        bar.close()
        registry.db.dispose()
    if args.json:
        out = {"candidate": candidate.model_dump(mode="json")}
        if release is not None:
            out["release"] = release.model_dump(mode="json")
        _print_json(out)
        return 0
    _print_candidate(candidate)
    if release is not None:
        print(f"published release {release.release} of {release.model} ({release.target})")
    else:
        print(f"release it with: edgefleet-cloud model release {args.name} {candidate.id}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    registry = _registry(args)
    try:
        registry.candidate(args.candidate, model=args.name)
        release = registry.release(args.candidate, who=_who())
    finally:
        registry.db.dispose()
    if args.json:
        _print_json(release.model_dump(mode="json"))
    else:
        print(
            f"published release {release.release} of {release.model} "
            f"({release.quantization}, {release.size_bytes} bytes) from candidate "
            f"{release.candidate_id}"
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    try:
        models = registry.list_models()
    finally:
        registry.db.dispose()
    if args.json:
        _print_json([m.model_dump(mode="json") for m in models])
        return 0
    print(f"{'model':<20} {'sources':>7} {'candidates':>10} {'latest release':>14}")
    for m in models:
        latest = "-" if m.latest_release is None else str(m.latest_release)
        print(f"{m.name:<20} {m.sources:>7} {m.candidates:>10} {latest:>14}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    try:
        detail = registry.show(args.name)
    finally:
        registry.db.dispose()
    if args.json:
        _print_json(detail.model_dump(mode="json"))
        return 0
    m = detail.model
    print(f"model {m.name}: {m.description or '(no description)'}; added by {m.created_by}")
    print("sources:")
    for s in detail.sources:
        print(
            f"  {s.id:>3} {s.kind:<16} {s.sha256[:16]}... {s.size_bytes:>10} bytes "
            f"input {s.input_shape} by {s.created_by}"
        )
    print("candidates:")
    for c in detail.candidates:
        extra = f"release {c.release}" if c.release else (c.error or "")[:80]
        print(f"  {c.id:>3} {c.status:<9} {c.requested_mode:>8} -> {c.mode or '-':<8} {extra}")
    print("releases:")
    for r in detail.releases:
        acc = r.metrics.get("accuracy")
        acc_text = "" if acc is None else f"accuracy {acc:.3f}"
        print(
            f"  {r.release:>3} {r.quantization:<8} {r.size_bytes:>9} bytes {acc_text} "
            f"by {r.published_by} (candidate {r.candidate_id or '-'})"
        )
    return 0


def register(sub: Any) -> None:
    model = sub.add_parser("model", help="the model registry: add, quantize, release, list, show")
    msub = model.add_subparsers(dest="model_command", required=True)

    s = local_args(
        msub.add_parser(
            "add",
            help="add a model file (.keras, SavedModel .zip, .tflite) as a model's newest source",
        )
    )
    s.add_argument("name", help="model name (lowercase letters, digits, '_', '-')")
    s.add_argument("file", type=Path)
    s.add_argument("--description")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_add)

    s = local_args(
        msub.add_parser(
            "quantize", help="build a release candidate: quantize, evaluate, gate (with fallback)"
        )
    )
    s.add_argument("name")
    s.add_argument("--calibration", type=Path, help=".npz with x (representative inputs)")
    s.add_argument("--eval", dest="eval_set", type=Path, help=".npz with x and labels y")
    s.add_argument(
        "--mode", default="int8", choices=["float32", "dynamic", "float16", "int8", "int16x8"]
    )
    s.add_argument(
        "--no-fallback",
        action="store_true",
        help="fail instead of trying int16x8, dynamic, float16",
    )
    s.add_argument(
        "--max-accuracy-drop", type=float, default=0.01, help="fraction (0.01 = one point)"
    )
    s.add_argument("--min-top1-agreement", type=float, default=0.98)
    s.add_argument("--max-abs-error", type=float)
    s.add_argument("--max-latency-ratio", type=float)
    s.add_argument("--min-accuracy", type=float)
    s.add_argument("--max-calibration-samples", type=int, default=500)
    s.add_argument("--labels", help="comma-separated class names, one per output")
    s.add_argument("--source-id", type=int, help="default: the newest source")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--release", action="store_true", help="publish the candidate when it passes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_quantize)

    s = local_args(msub.add_parser("release", help="publish a ready candidate (signed, TUF)"))
    s.add_argument("name")
    s.add_argument("candidate", type=int)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_release)

    s = local_args(msub.add_parser("list", help="list registered models"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    s = local_args(msub.add_parser("show", help="a model's sources, candidates and releases"))
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)
