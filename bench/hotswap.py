"""Hot-swap benchmark: does swapping models under continuous load drop or stall inferences?

N threads call ``ModelServer.infer`` back to back, which keeps every core busy.
An updater thread then builds, warms and swaps in a new ``LoadedModel``
``--swaps`` times (alternating two prebuilt ``.tflite`` files), and the bench
compares that with steady state (no updates). Short steady and swap blocks are
interleaved, so drifting background load on a shared machine hits both alike.

Building a model costs what serving would otherwise get: creating a MobileNet
interpreter packs its weights for XNNPACK (~2 ms) while holding the GIL, so
serving threads that finish an invoke meanwhile wait, and a swap costs about
twice its CPU time in serving capacity. With every core busy, back-to-back
updates therefore lower throughput whatever the switch itself does. The
updater is paced to use at most ``--duty`` of one core's CPU time (default 5%,
a plausible cap for a device's update process; ``--duty 1`` runs back to back),
and the bench prints the rate-independent cost of one swap. ``--control`` adds
blocks that build and discard models without swapping, which isolates the
switch from the build.

Every result is checked against both models' outputs for that input: a result
from neither is a torn inference. Printed with PASS/FAIL: failed inferences
(target 0), swap pause p99 (how long the reference switch holds the swap lock;
target < 1 ms), throughput during swaps / steady (target >= 0.95); and the
p99 latency during swaps / steady.

Models: ``mobilenet`` (Keras MobileNetV2 alpha 0.35, 96x96, random weights,
full int8, ~1.9 MB) or ``small`` (a digits-sized 28x28 CNN, int8, ~33 KB),
converted with TensorFlow once and cached in ``--cache-dir``.

    python bench/hotswap.py [--model mobilenet|small] [--threads 2] [--swaps 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device.runtime import LoadedModel, ModelMeta, ModelServer, interpreter_backend

MODELS = ("mobilenet", "small")


# -- models ------------------------------------------------------------------------


def _convert(kind: str, seed: int) -> bytes:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    if kind == "mobilenet":
        shape: tuple[int, ...] = (96, 96, 3)
        # Logits, not softmax: a near-uniform 1000-way softmax quantizes to the
        # same int8 output for every input and seed, and torn results would hide.
        model = tf.keras.applications.MobileNetV2(
            input_shape=shape, alpha=0.35, weights=None, classifier_activation=None
        )
    else:
        shape = (28, 28, 1)
        model = tf.keras.Sequential(
            [
                tf.keras.Input(shape),
                tf.keras.layers.Conv2D(8, 3, activation="relu"),
                tf.keras.layers.MaxPooling2D(),
                tf.keras.layers.Conv2D(16, 3, activation="relu"),
                tf.keras.layers.MaxPooling2D(),
                tf.keras.layers.Flatten(),
                tf.keras.layers.Dense(64, activation="relu"),
                tf.keras.layers.Dense(10),
            ]
        )
    rng = np.random.default_rng(seed)
    if kind == "mobilenet":
        # Freshly initialized, 50 layers deep, activations shrink to ~1e-11 and
        # every input gives the same output. Setting each batch norm's statistics
        # from one batch of inputs (momentum 0) keeps them at unit scale.
        for layer in model.layers:
            if isinstance(layer, tf.keras.layers.BatchNormalization):
                layer.momentum = 0.0
        model(rng.uniform(-1, 1, (16, *shape)).astype(np.float32), training=True)

    def representative() -> Any:
        for _ in range(8):
            yield [rng.uniform(-1, 1, (1, *shape)).astype(np.float32)]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    with contextlib.redirect_stdout(io.StringIO()):
        return bytes(conv.convert())


def model_bytes(kind: str, seed: int, cache_dir: Path) -> bytes:
    """The model, converted once with TensorFlow and then read from the cache."""
    path = cache_dir / f"{kind}-int8-v2-seed{seed}.tflite"
    if path.exists():
        return path.read_bytes()
    print(
        f"building {kind} seed {seed} with TensorFlow (once, cached in {cache_dir}) ...", flush=True
    )
    data = _convert(kind, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


# -- load ----------------------------------------------------------------------------


class Load:
    """Threads inferring back to back; each records (end time, latency) per call."""

    def __init__(
        self, server: ModelServer, inputs: np.ndarray, valid: list[set[bytes]], threads: int
    ) -> None:
        self.server, self.inputs, self.valid = server, inputs, valid
        self.stop = threading.Event()
        self.ends = [array("d") for _ in range(threads)]
        self.lats = [array("d") for _ in range(threads)]
        self.failed = [0] * threads
        self.torn = [0] * threads
        self.threads = [
            threading.Thread(target=self._run, args=(k,), name=f"load-{k}") for k in range(threads)
        ]

    def _run(self, k: int) -> None:
        ends, lats, n = self.ends[k], self.lats[k], len(self.inputs)
        infer, pc, i = self.server.infer, time.perf_counter, k
        while not self.stop.is_set():
            i = (i + 1) % n
            t0 = pc()
            try:
                y = infer(self.inputs[i])
            except Exception:
                self.failed[k] += 1
                continue
            t1 = pc()
            ends.append(t1)
            lats.append(t1 - t0)
            if y.tobytes() not in self.valid[i]:
                self.torn[k] += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def window(self, spans: list[tuple[float, float]]) -> tuple[float, float]:
        """Throughput (1/s) and p99 latency (s) of calls that ended inside ``spans``."""
        lat = []
        for e, la in zip(self.ends, self.lats, strict=True):
            # Slices copy: a buffer exported from a live array would stop its appends.
            ea, lt = np.frombuffer(e[:], dtype=np.float64), np.frombuffer(la[:], dtype=np.float64)
            n = min(len(ea), len(lt))  # a thread may be between its two appends
            ea, lt = ea[:n], lt[:n]
            for start, end in spans:
                lat.append(lt[(ea >= start) & (ea < end)])
        all_lat = np.concatenate(lat)
        seconds = sum(end - start for start, end in spans)
        return len(all_lat) / seconds, float(np.percentile(all_lat, 99))


@dataclass
class Updates:
    """What the updater thread did in the blocks of one kind."""

    spans: list[tuple[float, float]] = field(default_factory=list)
    builds: list[float] = field(default_factory=list)
    pauses: list[float] = field(default_factory=list)
    drains: list[float] = field(default_factory=list)
    count: int = 0


def update_block(
    blobs: list[bytes],
    count: int,
    pool: int,
    server: ModelServer | None,
    out: Updates,
    duty: float,
    nice: int,
) -> None:
    """In a new thread: build + warm ``count`` models, and swap each in if ``server``."""

    def run() -> None:
        if nice:  # Linux: a thread is a task with its own niceness
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        start = time.perf_counter()
        for _ in range(count):
            t0, cpu0 = time.perf_counter(), time.thread_time()
            out.count += 1
            model = LoadedModel(
                blobs[out.count % 2], pool_size=pool, meta=ModelMeta("bench", out.count + 1)
            )
            model.warmup(1)
            out.builds.append(time.perf_counter() - t0)
            if server is not None:
                report = server.swap(model)
                out.pauses.append(report.pause_s)
                out.drains.append(report.drain_s)
            else:
                model.close()
            if duty < 1:  # pace by CPU used, not wall time: the drain wait is mostly asleep
                time.sleep((time.thread_time() - cpu0) * (1 - duty) / duty)
        out.spans.append((start, time.perf_counter()))

    t = threading.Thread(target=run, name="updater")
    t.start()
    t.join()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="mobilenet")
    p.add_argument("--threads", type=int, default=2, help="inference threads (default 2)")
    p.add_argument("--swaps", type=int, default=1000)
    p.add_argument(
        "--duty",
        type=float,
        default=0.05,
        help="share of one core the updater may use (default 0.05; 1 = back to back)",
    )
    p.add_argument(
        "--seconds", type=float, default=10.0, help="steady-state time in total (default 10)"
    )
    p.add_argument(
        "--rounds", type=int, default=20, help="interleaved steady/swap blocks (default 20)"
    )
    p.add_argument("--control", action="store_true", help="add build-only blocks")
    p.add_argument("--nice", type=int, default=0, help="updater thread niceness (Linux)")
    p.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval for the run, seconds (default: Python's 0.005)",
    )
    p.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "edgefleet-bench-models"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 if any target fails")
    args = p.parse_args(argv)
    if not 0 < args.duty <= 1:
        p.error("--duty must be in (0, 1]")
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    blobs = [model_bytes(args.model, seed, args.cache_dir) for seed in (0, 1)]
    refs = [LoadedModel(b, pool_size=1) for b in blobs]
    spec = refs[0].input_spec
    rng = np.random.default_rng(42)
    inputs = rng.integers(-128, 128, size=(32, *spec.shape), dtype=np.int8)
    outs = [[m.run(x).tobytes() for x in inputs] for m in refs]
    valid = [{a, b} for a, b in zip(*outs, strict=True)]
    differ = sum(a != b for a, b in zip(*outs, strict=True))
    for m in refs:
        m.close()

    server = ModelServer()
    server.swap(LoadedModel(blobs[0], pool_size=args.threads, meta=ModelMeta("bench", 1)))
    print(
        f"model {args.model}: {len(blobs[0]) / 1e6:.2f} MB int8, input {spec.shape}; "
        f"{args.threads} inference threads; {os.cpu_count()} cores; "
        f"{interpreter_backend()[1]}; GIL switch interval {sys.getswitchinterval() * 1e3:g} ms; "
        f"the two models differ on {differ}/32 inputs"
    )

    steady, control, swaps = Updates(), Updates(), Updates()
    per_block = -(-args.swaps // args.rounds)
    with Load(server, inputs, valid, args.threads) as load:
        time.sleep(1.0)  # warm caches and the thread pool before measuring
        while swaps.count < args.swaps:
            n = min(per_block, args.swaps - swaps.count)
            t0 = time.perf_counter()
            time.sleep(args.seconds / args.rounds)
            steady.spans.append((t0, time.perf_counter()))
            if args.control:
                update_block(blobs, n, args.threads, None, control, args.duty, args.nice)
            update_block(blobs, n, args.threads, server, swaps, args.duty, args.nice)
            print(f"\r{swaps.count}/{args.swaps} swaps", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        steady_thr, steady_p99 = load.window(steady.spans)
        swap_thr, swap_p99 = load.window(swaps.spans)
        ctl = load.window(control.spans) if args.control else None
    server.close()

    failed, torn = sum(load.failed), sum(load.torn)
    pause_p99 = float(np.percentile(swaps.pauses, 99))
    swap_s = sum(e - s for s, e in swaps.spans)
    thr_ratio, p99_ratio = swap_thr / steady_thr, swap_p99 / steady_p99
    print(
        f"steady        : {steady_thr:9.0f} inferences/s  p99 {steady_p99 * 1e3:7.3f} ms  "
        f"({args.seconds:.1f} s in {len(steady.spans)} blocks)"
    )
    print(
        f"during swaps  : {swap_thr:9.0f} inferences/s  p99 {swap_p99 * 1e3:7.3f} ms  "
        f"({swaps.count} swaps in {swap_s:.1f} s, {swaps.count / swap_s:.1f}/s)"
    )
    if ctl is not None:
        print(
            f"build only    : {ctl[0]:9.0f} inferences/s  p99 {ctl[1] * 1e3:7.3f} ms  "
            f"(swaps/build-only: throughput {swap_thr / ctl[0]:.3f}, p99 {swap_p99 / ctl[1]:.2f})"
        )
    # Rate-independent: serving capacity one update takes, whatever the swap rate.
    lost = (steady_thr - swap_thr) * swap_s / swaps.count
    print(
        f"cost per swap : {lost:.1f} inferences = {lost / steady_thr * 1e3:.2f} ms of full-load "
        "serving (build + warm-up + switch + drain, incl. GIL stalls)"
    )
    print(
        f"updater       : build+warm median {np.median(swaps.builds) * 1e3:.2f} ms, "
        f"drain p99 {np.percentile(swaps.drains, 99) * 1e3:.2f} ms, duty {args.duty:.0%} of a core"
    )
    results = [
        ("failed inferences (errors + torn)", f"{failed} + {torn}", "0", failed + torn == 0),
        ("swap pause p99", f"{pause_p99 * 1e6:.1f} us", "< 1 ms", pause_p99 < 1e-3),
        ("throughput during swaps / steady", f"{thr_ratio:.3f}", ">= 0.95", thr_ratio >= 0.95),
    ]
    for name, value, target, ok in results:
        print(f"{name:34s} {value:>12s}   target {target:8s} {verdict(ok)}")
    print(f"{'p99 latency during swaps / steady':34s} {p99_ratio:12.2f}   (no target)")
    return 1 if args.strict and not all(ok for *_, ok in results) else 0


if __name__ == "__main__":
    sys.exit(main())
