"""Quantization benchmark: what each mode costs and saves, against float32.

For the digits CNN and a Keras MobileNetV2 (alpha 0.35, 96x96x3, no
pretrained weights, trained briefly on generated images) this converts every
mode once, evaluates it with LiteRT and prints, per mode: the size ratio to
float32, the accuracy change (MobileNet: top-1 agreement with float32, since
its labels are synthetic) and the single-sample latency ratio to float32,
all measured in one run. Latencies are measured in interleaved rounds so a
burst of load on a shared machine hits every mode alike.

Targets (PASS/FAIL): MobileNetV2 int8 size <= 0.30x float32; digits int8
accuracy drop <= 1.0 point; int8 latency <= 1.0x float32. Exit status is 0
unless ``--strict`` is given and a target fails.

    python bench/quantize.py [--strict] [--skip-mobilenet] [--mobilenet-classes 10]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

MODES = ("float32", "int8", "int16x8", "dynamic", "float16")
_ROUNDS = 10


@dataclass
class ModeRow:
    mode: str
    size: int
    accuracy: float | None
    agreement: float | None
    latency_s: float
    quant_param_bytes: int


@dataclass
class Target:
    name: str
    value: float
    limit: float
    unit: str

    @property
    def passed(self) -> bool:
        return self.value <= self.limit + 1e-12


def _quant_param_bytes(model_bytes: bytes) -> int:
    """Bytes of scales (float32) and zero points (int64) stored in the flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(model_bytes, 0)
    total = 0
    for s in range(model.SubgraphsLength()):
        sg = model.Subgraphs(s)
        for t in range(sg.TensorsLength()):
            q = sg.Tensors(t).Quantization()
            if q is not None:
                total += 4 * q.ScaleLength() + 8 * q.ZeroPointLength()
    return total


def _synthetic_images(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """96x96 RGB images whose class is a colour under blocky texture and noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    palette = np.random.default_rng(1234).uniform(0.1, 0.9, (classes, 3)).astype(np.float32)
    texture = rng.uniform(0.7, 1.0, (n, 12, 12, 1)).repeat(8, axis=1).repeat(8, axis=2)
    x = palette[y][:, None, None, :] * texture + rng.normal(0, 0.05, (n, 96, 96, 3))
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)


def _refresh_batchnorm(model: Any, x: np.ndarray) -> None:
    """Set every BatchNorm's moving statistics to those of ``x``.

    MobileNetV2's BatchNorm momentum (0.999) leaves the inference statistics
    near their initial values after a few training steps, which makes the
    inference model nearly constant and any agreement figure meaningless.
    """
    import keras

    layers = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    saved = [la.momentum for la in layers]
    for la in layers:
        la.momentum = 0.0
    model(x, training=True)
    for la, m in zip(layers, saved, strict=True):
        la.momentum = m


def _measure(
    name: str,
    keras_model: Any,
    calibration: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    *,
    max_calibration_samples: int,
    latency_runs: int,
    seed: int,
) -> list[ModeRow]:
    from cloud.pipeline.convert import convert, exported_saved_model
    from cloud.pipeline.evaluate import Runner, evaluate
    from cloud.pipeline.sources import Dataset

    evals = Dataset(x=eval_x, y=eval_y)
    models: dict[str, bytes] = {}
    results: dict[str, Any] = {}
    with exported_saved_model(keras_model) as saved_model:
        for mode in MODES:
            started = time.perf_counter()
            models[mode] = convert(
                saved_model,
                mode,
                calibration,
                seed=seed,
                max_calibration_samples=max_calibration_samples,
            )
            results[mode] = evaluate(
                models[mode], evals, reference=results.get("float32"), latency_runs=1
            )
            print(
                f"  {name}: {mode:<8} converted and evaluated in "
                f"{time.perf_counter() - started:5.1f} s",
                file=sys.stderr,
                flush=True,
            )
    runners = {mode: Runner(data) for mode, data in models.items()}
    per_round = max(1, latency_runs // _ROUNDS)
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(_ROUNDS):
        for mode in MODES:
            samples[mode].append(runners[mode].latency_s(eval_x[0], per_round))
    return [
        ModeRow(
            mode=mode,
            size=len(models[mode]),
            accuracy=results[mode].accuracy,
            agreement=results[mode].top1_agreement,
            latency_s=statistics.median(samples[mode]),
            quant_param_bytes=_quant_param_bytes(models[mode]),
        )
        for mode in MODES
    ]


def _print_table(title: str, rows: list[ModeRow], use_agreement: bool) -> None:
    ref = rows[0]
    print(f"\n{title}")
    quality = "top-1 agree" if use_agreement else "accuracy"
    print(
        f"  {'mode':<8} {'size KiB':>9} {'size x':>7} {quality:>11} {'delta pt':>9} "
        f"{'latency us':>11} {'latency x':>9}"
    )
    for r in rows:
        if use_agreement:
            q = 1.0 if r.mode == "float32" else (r.agreement or 0.0)
            delta = (q - 1.0) * 100
        else:
            q = r.accuracy or 0.0
            delta = (q - (ref.accuracy or 0.0)) * 100
        print(
            f"  {r.mode:<8} {r.size / 1024:9.1f} {r.size / ref.size:7.3f} {q:11.2%} "
            f"{delta:+9.2f} {r.latency_s * 1e6:11.1f} {r.latency_s / ref.latency_s:9.2f}"
        )


def _digits(args: argparse.Namespace) -> tuple[list[ModeRow], list[Target]]:
    from cloud.pipeline.digits import load_digits_splits, train_digits_cnn

    splits = load_digits_splits(seed=args.seed)
    started = time.perf_counter()
    model = train_digits_cnn(splits, seed=args.seed)
    print(f"  digits: trained in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    rows = _measure(
        "digits",
        model,
        splits.x_calib,
        splits.x_test,
        splits.y_test,
        max_calibration_samples=500,
        latency_runs=args.latency_runs,
        seed=args.seed,
    )
    _print_table(
        f"digits CNN ({model.count_params():,} params; {len(splits.x_test)} test "
        "images, real labels)",
        rows,
        use_agreement=False,
    )
    by = {r.mode: r for r in rows}
    drop = ((by["float32"].accuracy or 0.0) - (by["int8"].accuracy or 0.0)) * 100
    return rows, [
        Target("digits int8 accuracy drop (points)", drop, 1.0, " pt"),
        Target(
            "digits int8 latency / float32",
            by["int8"].latency_s / by["float32"].latency_s,
            1.0,
            "x",
        ),
    ]


def _mobilenet(args: argparse.Namespace) -> tuple[list[ModeRow], list[Target]]:
    import keras

    keras.utils.set_random_seed(args.seed)
    model = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=args.mobilenet_classes
    )
    x_train, y_train = _synthetic_images(384, args.mobilenet_classes, args.seed)
    x_calib, _ = _synthetic_images(200, args.mobilenet_classes, args.seed + 1)
    x_test, y_test = _synthetic_images(200, args.mobilenet_classes, args.seed + 2)
    started = time.perf_counter()
    if args.mobilenet_epochs > 0:
        model.compile(
            keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy", jit_compile=False
        )
        model.fit(x_train, y_train, epochs=args.mobilenet_epochs, batch_size=32, verbose=0)
    _refresh_batchnorm(model, x_calib[:128])
    print(f"  mobilenetv2: trained in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    rows = _measure(
        "mobilenetv2",
        model,
        x_calib,
        x_test,
        y_test,
        max_calibration_samples=100,
        latency_runs=args.latency_runs,
        seed=args.seed,
    )
    _print_table(
        f"MobileNetV2 alpha 0.35 96x96x3, {args.mobilenet_classes} classes "
        f"({model.count_params():,} params; {args.mobilenet_epochs} epochs on "
        "generated images; quality = top-1 agreement with float32)",
        rows,
        use_agreement=True,
    )
    by = {r.mode: r for r in rows}
    q = by["int8"].quant_param_bytes
    print(
        f"  note: the int8 model stores {q / 1024:.1f} KiB of quantization parameters "
        f"({q / by['int8'].size:.0%} of it): per-channel float32 scales and int64 zero "
        "points for every weight and bias tensor"
    )
    return rows, [
        Target("mobilenetv2 int8 size / float32", by["int8"].size / by["float32"].size, 0.30, "x"),
        Target(
            "mobilenetv2 int8 latency / float32",
            by["int8"].latency_s / by["float32"].latency_s,
            1.0,
            "x",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    parser.add_argument("--skip-mobilenet", action="store_true")
    parser.add_argument("--mobilenet-classes", type=int, default=10)
    parser.add_argument("--mobilenet-epochs", type=int, default=2)
    parser.add_argument("--latency-runs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from cloud.pipeline.artifacts import toolchain_versions

    versions = toolchain_versions()
    print(
        f"edgefleet quantization benchmark: TensorFlow {versions['tensorflow']}, "
        f"LiteRT {versions['litert']}, "
        f"{platform.machine()}, {os.cpu_count()} cores; LiteRT on 1 thread, batch 1"
    )
    targets: list[Target] = []
    _, t = _digits(args)
    targets += t
    if not args.skip_mobilenet:
        _, t = _mobilenet(args)
        targets += t
    print("\ntargets")
    for tg in targets:
        verdict = "PASS" if tg.passed else "FAIL"
        print(f"  {verdict}  {tg.name}: {tg.value:.3f}{tg.unit} (target <= {tg.limit}{tg.unit})")
    failed = [tg for tg in targets if not tg.passed]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
