"""The MobileNetV2 int8 releases the fan-out bench rolls out, built with the project's pipeline.

``build_cloud_template(dir, cache)`` makes a cloud data dir (keys, TUF
repository, registry) holding:

* release 1 of ``mobilenet``: a Keras MobileNetV2 (alpha 0.35, 96x96x3,
  ``weights=None``, 1000 logits) quantized to full int8 by the model
  registry, the steps ``edgefleet-cloud model add`` + ``model quantize
  --release`` run (about 1.9 MB of model, plus the signed self-test vectors and
  drift baseline the pipeline adds);
* a *ready candidate* for release 2 (the same network with another seed, as a
  retraining would give), which the bench publishes with ``edgefleet-cloud
  model release`` only once the fleet runs release 1, so the devices see the
  metadata change a real release makes.

TensorFlow runs only in one child process (``python -m firmware_sim.fanout_release
template CLOUD_DIR CACHE``), never in the caller. Nothing is downloaded: the
weights are random, batch-norm statistics are set from one batch of inputs so
activations keep their scale (a fresh MobileNet collapses every input to the
same output otherwise), and the "labels" of the evaluation set are the float
model's own top-1, so the quantization gate compares int8 with float32.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from firmware_sim._system import SimError
from firmware_sim.procs import python_cmd

__all__ = ["MODEL", "ReleaseTemplate", "build_cloud_template", "build_keras", "publish_candidate"]

#: The model name the releases are published under.
MODEL = "mobilenet"
#: Calibration / evaluation samples written next to each Keras file.
_SAMPLES = 32
#: Seeds of release 1 and of the release-2 candidate.
SEEDS = (1, 2)
_CLI_TIMEOUT = 900


class ReleaseTemplate:
    """A built cloud template: its dir and the candidate id that becomes release 2."""

    def __init__(self, cloud_dir: Path, candidate: int) -> None:
        self.cloud_dir = Path(cloud_dir)
        self.candidate = candidate

    @classmethod
    def load(cls, cloud_dir: Path) -> ReleaseTemplate | None:
        marker = Path(cloud_dir) / "fanout-template.json"
        try:
            return cls(Path(cloud_dir), int(json.loads(marker.read_text())["candidate"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def build_keras(out_dir: Path, seed: int) -> Path:
    """Build and save ``mobilenet-<seed>.keras`` plus its ``.calib.npz`` / ``.eval.npz``
    (this imports TensorFlow: call it in a child process)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # type: ignore[import-untyped]
    import numpy as np

    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None, classifier_activation=None
    )
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (2 * _SAMPLES, 96, 96, 3)).astype(np.float32)
    norms = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    saved = [la.momentum for la in norms]
    for la in norms:
        la.momentum = 0.0
    model(x[:_SAMPLES], training=True)
    for la, m in zip(norms, saved, strict=True):
        la.momentum = m
    y = np.argmax(model.predict(x[_SAMPLES:], verbose=0), axis=1).astype(np.int64)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"mobilenet-{seed}.keras"
    model.save(path)
    np.savez(path.with_suffix(".calib.npz"), x=x[:_SAMPLES])
    np.savez(path.with_suffix(".eval.npz"), x=x[_SAMPLES:], y=y)
    return path


def _run(cmd: list[str], what: str) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(  # noqa: S603 - our own modules
        cmd, capture_output=True, text=True, check=False, timeout=_CLI_TIMEOUT, env=env
    )
    if out.returncode != 0:
        raise SimError(
            f"{what} failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        )
    return out.stdout


def _publish_template(cloud_dir: Path, cache: Path) -> int:
    """In this (TensorFlow) process: the Keras files, then the registry steps that
    ``edgefleet-cloud model add`` / ``model quantize [--release]`` run. Returns the
    release-2 candidate id."""
    from cloud.config import CloudSettings
    from cloud.pipeline.gate import GateConfig
    from cloud.registry import QuantizeOptions, Registry

    files = [
        path if (path := cache / f"mobilenet-{seed}.keras").exists() else build_keras(cache, seed)
        for seed in SEEDS
    ]
    registry = Registry.from_settings(CloudSettings(data_dir=cloud_dir))
    # Random weights: the quantization gate is not what the bench measures; int8 is.
    options = QuantizeOptions(
        mode="int8",
        gate=GateConfig(max_accuracy_drop=1.0, min_top1_agreement=0.0),
        fallback=False,
    )
    who = "bench:fanout"
    candidate = 0
    try:
        for i, keras_file in enumerate(files):
            registry.add_model(MODEL, keras_file, who=who)
            candidate = registry.quantize(
                MODEL,
                options,
                who=who,
                calibration=keras_file.with_suffix(".calib.npz"),
                eval_set=keras_file.with_suffix(".eval.npz"),
            ).id
            if i == 0:
                registry.release(candidate, who=who)
    finally:
        registry.db.dispose()
    return candidate


def build_cloud_template(cloud_dir: Path, cache: Path) -> ReleaseTemplate:
    """Release 1 published and the release-2 candidate ready in ``cloud_dir`` (reused
    if a previous call completed it); Keras files cached in ``cache``. TensorFlow
    runs in one child process."""
    found = ReleaseTemplate.load(cloud_dir)
    if found is not None:
        return found
    shutil.rmtree(cloud_dir, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    out = _run(
        python_cmd("firmware_sim.fanout_release", "template", str(cloud_dir), str(cache)),
        "building the MobileNetV2 releases",
    )
    candidate = int(out.strip().splitlines()[-1])
    (cloud_dir / "fanout-template.json").write_text(
        json.dumps({"candidate": candidate, "build_s": round(time.monotonic() - started, 1)})
    )
    return ReleaseTemplate(cloud_dir, candidate)


def publish_candidate(cloud_dir: Path, candidate: int) -> dict[str, object]:
    """``edgefleet-cloud model release``: sign the candidate as the next release."""
    out = _run(
        python_cmd(
            "cloud.cli",
            "model",
            "release",
            MODEL,
            str(candidate),
            "--data-dir",
            str(cloud_dir),
            "--json",
        ),
        "model release",
    )
    return dict(json.loads(out[out.index("{") :]))


def _main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "keras":
        build_keras(Path(argv[1]), int(argv[2]))
    elif len(argv) == 3 and argv[0] == "template":
        print(_publish_template(Path(argv[1]), Path(argv[2])))
    else:
        print(
            "usage: python -m firmware_sim.fanout_release keras OUT_DIR SEED | "
            "template CLOUD_DIR CACHE_DIR",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
