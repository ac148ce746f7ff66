"""Release artifacts: the files and manifest fields a pipeline result becomes.

``build_artifacts`` turns a ``PipelineResult`` into everything a release
carries: the model, signed self-test vectors, the drift baseline, the
input/output specs and the lineage. ``make_manifest`` adds the release's
name, number and time and yields the ``ReleaseManifest`` that TUF signs.

How a device feeds the model: inputs go in the model's input dtype. For a
quantized input (``TensorSpec.scale`` set) a real value ``x`` becomes
``q = clip(round(x / scale + zero_point), dtype min, dtype max)``; outputs
map back with ``real = scale * (q - zero_point)``. The drift baseline is
built on *real* inputs, so a device dequantizes its inputs before counting
them into the baseline's bins.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.pipeline.evaluate import Runner, litert_version, quantize_input
from cloud.pipeline.gate import PipelineResult
from shared.drift import build_baseline, extract_features, pack_baseline
from shared.errors import PipelineError
from shared.manifest import (
    BASELINE_FILE,
    SELFTEST_FILE,
    DriftSpec,
    ReleaseManifest,
    RuntimeNeeds,
    SelfTestSpec,
    TensorSpec,
    target_path,
)
from shared.selftest import dequantize, pack_vectors

__all__ = [
    "DEFAULT_DRIFT_BINS",
    "DEFAULT_SELFTEST_COUNT",
    "FLOAT_ATOL",
    "ReleaseArtifacts",
    "build_artifacts",
    "make_manifest",
    "toolchain_versions",
]

log = logging.getLogger(__name__)

DEFAULT_SELFTEST_COUNT = 32
DEFAULT_DRIFT_BINS = 10
#: Limits of ``SelfTestSpec.count`` and ``DriftSpec.bins`` in the manifest schema.
MAX_SELFTEST_COUNT = 10_000
MAX_DRIFT_BINS = 64
#: Inputs with at most this many elements are drift-tracked element by element.
FLATTEN_MAX_ELEMENTS = 1024
#: Tolerance on float outputs: far above float32 rounding differences
#: between CPUs, far below any real change of the model.
FLOAT_ATOL = 1e-4
FLOAT_RTOL = 1e-4
#: A quantized output may differ by a rounding step or so between kernels
#: (x86 vs Arm, XNNPACK vs reference); two steps leave room for that.
QUANTIZED_ATOL_STEPS = 2
#: Bounds on work: candidates screened for self-test, samples for the baseline.
_SELFTEST_POOL_FACTOR = 8
_MAX_BASELINE_SAMPLES = 20_000
_MAX_SOURCE_VALUE = 256


@dataclass(frozen=True)
class ReleaseArtifacts:
    """Everything one release publishes, before it has a name and number."""

    model_bytes: bytes
    selftest_bytes: bytes
    #: ``SelfTestSpec`` fields except ``target``: count, atol, rtol, min_top1_agreement.
    selftest_spec_kwargs: dict[str, Any]
    #: ``None`` when the input is too wide for a drift baseline.
    baseline_bytes: bytes | None
    #: ``DriftSpec`` fields except ``target``.
    drift_spec_kwargs: dict[str, Any] | None
    input_spec: TensorSpec
    output_spec: TensorSpec
    quantization: str
    metrics: dict[str, float]
    ops: list[str]
    source: dict[str, str]
    decisions: list[str] = field(default_factory=list)
    labels: list[str] | None = None


def _package_version(*names: str) -> str:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "unknown"


def toolchain_versions() -> dict[str, str]:
    """Versions of the converter and runtime that built and judged a release."""
    return {
        "tensorflow": _package_version("tensorflow-cpu", "tensorflow"),
        "keras": _package_version("keras"),
        "litert": litert_version(),
    }


def _selftest_tolerance(result: PipelineResult, spec: TensorSpec) -> tuple[float, float]:
    if spec.scale is not None:
        return QUANTIZED_ATOL_STEPS * spec.scale, 0.0
    atol = FLOAT_ATOL
    err = result.evaluation.max_abs_error
    if result.mode in ("dynamic", "float16", "int16x8") and err is not None:
        # Float outputs of these modes depend on how a CPU's kernels quantize
        # activations or widen float16 weights; another valid runtime may
        # deviate from ours by up to what quantization itself costs.
        atol = max(atol, float(err))
    return atol, FLOAT_RTOL


def _reference_inputs(result: PipelineResult) -> npt.NDArray[np.float32]:
    # Calibration data stands for what the device will see; the evaluation
    # set only when no calibration data was given.
    data = result.calibration if result.calibration is not None else result.eval_set
    return data.x


def _select_vectors(
    runner: Runner, pool: npt.NDArray[np.float32], count: int, atol: float
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], int]:
    """Pick ``count`` vectors, preferring ones whose top-1 survives the tolerance.

    A vector whose two best outputs are within ``2 * atol`` may legitimately
    flip its arg-max on another CPU; requiring top-1 agreement on it would
    fail good devices. Returns (inputs, expected, number of clear vectors).
    """
    inputs = quantize_input(pool, runner.input_spec)
    expected = runner.run_raw(inputs)
    real = dequantize(expected, runner.output_spec).reshape(len(pool), -1)
    if real.shape[1] > 1:
        top2 = np.sort(real, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * atol
    else:
        clear = np.ones(len(pool), dtype=bool)
    # Stable order: clear vectors first, each group in the seeded pool order.
    order = np.argsort(~clear, kind="stable")[:count]
    return inputs[order], expected[order], int(np.count_nonzero(clear[order]))


def _drift(
    result: PipelineResult, input_spec: TensorSpec, output_spec: TensorSpec, bins: int, seed: int
) -> tuple[bytes | None, dict[str, Any] | None]:
    x = _reference_inputs(result)
    if len(x) > _MAX_BASELINE_SAMPLES:
        rng = np.random.default_rng(seed)
        x = x[np.sort(rng.choice(len(x), size=_MAX_BASELINE_SAMPLES, replace=False))]
    elements = int(np.prod(input_spec.shape[1:]))
    mode = "flatten" if elements <= FLATTEN_MAX_ELEMENTS else "channel_mean"
    features = extract_features(x, mode)
    n_features = features.shape[1]
    if n_features > FLATTEN_MAX_ELEMENTS:
        log.warning(
            "no drift baseline: too many features", extra={"features": n_features, "mode": mode}
        )
        return None, None
    baseline = build_baseline(features, bins)
    outputs = int(np.prod(output_spec.shape[1:]))
    n_classes = outputs if 1 < outputs <= FLATTEN_MAX_ELEMENTS else 0
    kwargs = {"features": mode, "n_features": n_features, "bins": bins, "n_classes": n_classes}
    return pack_baseline(baseline), kwargs


def _lineage(result: PipelineResult, seed: int) -> dict[str, str]:
    source = {
        "source_kind": result.source.kind,
        "source": result.source.description,
        "source_sha256": result.source.sha256,
        "dataset_sha256": result.dataset_sha256,
        **toolchain_versions(),
        "mode": result.mode,
        "requested_mode": result.requested_mode,
        "seed": str(seed),
    }
    return {k: v[:_MAX_SOURCE_VALUE] for k, v in source.items()}


def build_artifacts(
    result: PipelineResult,
    *,
    seed: int | None = None,
    selftest_count: int = DEFAULT_SELFTEST_COUNT,
    drift_bins: int = DEFAULT_DRIFT_BINS,
    labels: Sequence[str] | None = None,
) -> ReleaseArtifacts:
    """Build the release files and manifest fields for ``result``.

    Self-test vectors are ``selftest_count`` seeded calibration samples,
    quantized into the input dtype, with the chosen model's own LiteRT
    outputs as the expectation. ``seed`` defaults to the pipeline's seed.
    """
    seed = result.seed if seed is None else seed
    # The same bounds the manifest schema enforces, caught before any work.
    if not 1 <= selftest_count <= MAX_SELFTEST_COUNT:
        raise PipelineError(f"selftest_count must be 1..{MAX_SELFTEST_COUNT}, got {selftest_count}")
    if not 2 <= drift_bins <= MAX_DRIFT_BINS:
        raise PipelineError(f"drift_bins must be 2..{MAX_DRIFT_BINS}, got {drift_bins}")
    runner = Runner(result.model_bytes)
    in_spec, out_spec = runner.input_spec, runner.output_spec
    atol, rtol = _selftest_tolerance(result, out_spec)

    source_x = _reference_inputs(result)
    rng = np.random.default_rng(seed)
    pool_size = min(len(source_x), selftest_count * _SELFTEST_POOL_FACTOR)
    pool = source_x[rng.choice(len(source_x), size=pool_size, replace=False)]
    inputs, expected, clear = _select_vectors(runner, pool, selftest_count, atol)
    count = len(inputs)
    # If too few vectors are clear-cut, ask only for the share that is.
    min_top1 = 1.0 if clear == count else float(np.floor(clear / count * 100) / 100)
    selftest_kwargs = {
        "count": count,
        "atol": float(atol),
        "rtol": float(rtol),
        "min_top1_agreement": min_top1,
    }
    baseline_bytes, drift_kwargs = _drift(result, in_spec, out_spec, drift_bins, seed)
    n_outputs = int(np.prod(out_spec.shape[1:]))
    if labels is not None and len(labels) != n_outputs:
        raise PipelineError(f"{len(labels)} labels given for a model with {n_outputs} outputs")
    artifacts = ReleaseArtifacts(
        model_bytes=result.model_bytes,
        selftest_bytes=pack_vectors(inputs, expected),
        selftest_spec_kwargs=selftest_kwargs,
        baseline_bytes=baseline_bytes,
        drift_spec_kwargs=drift_kwargs,
        input_spec=in_spec,
        output_spec=out_spec,
        quantization=result.mode,
        metrics=result.metrics(),
        ops=list(result.evaluation.info.ops),
        source=_lineage(result, seed),
        decisions=list(result.decisions),
        labels=None if labels is None else list(labels),
    )
    log.info(
        "built release artifacts",
        extra={"mode": result.mode, "selftest": selftest_kwargs, "drift": drift_kwargs},
    )
    return artifacts


def make_manifest(
    artifacts: ReleaseArtifacts,
    model_name: str,
    release: int,
    created_at: float,
    *,
    min_agent_version: str | None = None,
) -> ReleaseManifest:
    """The signed manifest of release ``release`` of ``model_name`` built from ``artifacts``."""
    try:
        selftest = SelfTestSpec(
            target=target_path(model_name, release, SELFTEST_FILE), **artifacts.selftest_spec_kwargs
        )
        drift = None
        if artifacts.drift_spec_kwargs is not None and artifacts.baseline_bytes is not None:
            drift = DriftSpec(
                target=target_path(model_name, release, BASELINE_FILE),
                **artifacts.drift_spec_kwargs,
            )
        runtime = RuntimeNeeds(ops=list(artifacts.ops))
        if min_agent_version is not None:
            runtime = RuntimeNeeds(ops=list(artifacts.ops), min_agent_version=min_agent_version)
        return ReleaseManifest(
            model=model_name,
            release=release,
            created_at=created_at,
            quantization=artifacts.quantization,
            input=artifacts.input_spec,
            output=artifacts.output_spec,
            metrics=dict(artifacts.metrics),
            runtime=runtime,
            selftest=selftest,
            drift=drift,
            labels=artifacts.labels,
            source=dict(artifacts.source),
        )
    except ValueError as e:
        # pydantic's ValidationError is a ValueError too.
        raise PipelineError(f"cannot make a release manifest: {e}") from e
