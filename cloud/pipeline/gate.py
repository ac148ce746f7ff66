"""The pipeline: convert, evaluate against the float model, gate, fall back.

``run_pipeline`` turns a model and data into the bytes of one release
candidate plus the evidence for choosing it. The float32 conversion is the
reference; the requested mode must stay within ``GateConfig`` of it. When it
does not, the fallback chain ``int8 -> int16x8 -> dynamic -> float16`` is
tried from the next mode on and the smallest passing model wins. Every
failure is written to ``PipelineResult.decisions`` in words an operator can
act on; if nothing passes, ``PipelineError`` carries all of them.

A ``.tflite`` source is released as it is: its quantization is read from its
tensors, it must load in LiteRT, and only absolute checks apply (there is no
float model to compare with).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud.pipeline.convert import (
    CALIBRATED_MODES,
    DEFAULT_MAX_CALIBRATION_SAMPLES,
    check_calibration_shape,
    convert,
    exported_saved_model,
    read_input_signature,
)
from cloud.pipeline.evaluate import DEFAULT_LATENCY_RUNS, Evaluation, evaluate
from cloud.pipeline.sources import Dataset, DataSource, LoadedModel, load_dataset, load_model
from shared.errors import PipelineError
from shared.manifest import QUANTIZATION_MODES

__all__ = [
    "DEFAULT_MAX_EVAL_SAMPLES",
    "FALLBACK_CHAIN",
    "Candidate",
    "GateConfig",
    "PipelineResult",
    "ProgressCallback",
    "run_pipeline",
]

log = logging.getLogger(__name__)

#: Order in which modes are tried after the requested one fails, smallest first.
FALLBACK_CHAIN = ("int8", "int16x8", "dynamic", "float16")
#: Evaluation samples used per model; larger sets are sampled (seeded).
DEFAULT_MAX_EVAL_SAMPLES = 2000
#: ``progress(step, fraction)``: ``fraction`` rises from 0 to 1.
ProgressCallback = Callable[[str, float], None]
# Float comparisons of measured fractions against limits typed by a person.
_EPS = 1e-9


@dataclass(frozen=True)
class GateConfig:
    """What a quantized model must achieve relative to its float32 reference.

    ``max_accuracy_drop`` is a fraction: 0.01 is one percentage point.
    ``None`` switches an optional check off.
    """

    max_accuracy_drop: float = 0.01
    min_top1_agreement: float = 0.98
    max_abs_error: float | None = None
    max_latency_ratio: float | None = None
    #: Absolute floor; the only accuracy check for a ``.tflite`` source.
    min_accuracy: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.max_accuracy_drop <= 1 or not 0 <= self.min_top1_agreement <= 1:
            raise ValueError("max_accuracy_drop and min_top1_agreement are fractions in [0, 1]")

    def failures(self, candidate: Evaluation, reference: Evaluation | None) -> list[str]:
        """Why ``candidate`` fails the gate; empty if it passes."""
        reasons = []
        acc = candidate.accuracy
        if self.min_accuracy is not None and acc is not None and acc < self.min_accuracy - _EPS:
            reasons.append(f"accuracy {acc:.2%} is below the floor {self.min_accuracy:.2%}")
        if reference is None:
            return reasons
        if candidate.accuracy is not None and reference.accuracy is not None:
            drop = reference.accuracy - candidate.accuracy
            if drop > self.max_accuracy_drop + _EPS:
                reasons.append(
                    f"accuracy {candidate.accuracy:.2%} is {drop * 100:.2f} points below "
                    f"float32 {reference.accuracy:.2%} (allowed {self.max_accuracy_drop * 100:.2f})"
                )
        agreement = candidate.top1_agreement
        if agreement is not None and agreement < self.min_top1_agreement - _EPS:
            reasons.append(
                f"top-1 agreement with float32 is {agreement:.2%} "
                f"(needs {self.min_top1_agreement:.2%})"
            )
        err = candidate.max_abs_error
        if self.max_abs_error is not None and err is not None and err > self.max_abs_error:
            reasons.append(f"max |output error| {err:.4g} exceeds {self.max_abs_error:.4g}")
        if self.max_latency_ratio is not None and reference.latency_s > 0:
            ratio = candidate.latency_s / reference.latency_s
            if ratio > self.max_latency_ratio:
                reasons.append(
                    f"latency is {ratio:.2f}x float32 (allowed {self.max_latency_ratio:.2f}x)"
                )
        return reasons


@dataclass(frozen=True)
class Candidate:
    """One mode that was tried: its model and measurements, or why it failed."""

    mode: str
    passed: bool
    reasons: tuple[str, ...] = ()
    model_bytes: bytes | None = None
    evaluation: Evaluation | None = None


@dataclass(frozen=True)
class PipelineResult:
    """The chosen model, the evidence for it, and what it was built from."""

    mode: str
    requested_mode: str
    model_bytes: bytes
    evaluation: Evaluation
    #: The float32 reference; ``None`` for a ``.tflite`` source.
    reference: Evaluation | None
    candidates: tuple[Candidate, ...]
    decisions: list[str]
    source: LoadedModel
    calibration: Dataset | None
    eval_set: Dataset
    gate: GateConfig
    seed: int

    @property
    def dataset_sha256(self) -> str:
        from cloud.pipeline.sources import arrays_sha256

        parts: list[Any] = []
        for ds in (self.calibration, self.eval_set):
            if ds is not None:
                parts += [ds.x] + ([] if ds.y is None else [ds.y])
        return arrays_sha256(parts)

    def metrics(self) -> dict[str, float]:
        """Measurements of the chosen model, and ratios against float32 when known."""
        out = self.evaluation.metrics()
        ref = self.reference
        if ref is None:
            return out
        for key, value in ref.metrics().items():
            if key not in ("top1_agreement", "max_abs_error"):
                out[f"float_{key}"] = value
        if self.evaluation.accuracy is not None and ref.accuracy is not None:
            out["accuracy_drop"] = ref.accuracy - self.evaluation.accuracy
        out["size_ratio"] = self.evaluation.size_bytes / ref.size_bytes
        if ref.latency_s > 0:
            out["latency_ratio"] = self.evaluation.latency_s / ref.latency_s
        return {k: v for k, v in out.items() if math.isfinite(v)}


class _Progress:
    """Turns finished steps into a monotonic fraction, even when the plan grows."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self._callback, self._total, self._done, self._last = callback, total, 0, 0.0

    def grow(self, steps: int) -> None:
        self._total += steps

    def step(self, name: str) -> None:
        self._done += 1
        self._last = max(self._last, min(1.0, self._done / max(self._total, 1)))
        if self._callback is not None:
            self._callback(name, self._last)

    def finish(self) -> None:
        if self._callback is not None:
            self._callback("done", 1.0)


def _bounded(ds: Dataset, max_samples: int, seed: int) -> Dataset:
    if len(ds) <= max_samples:
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=max_samples, replace=False))
    return Dataset(x=ds.x[idx], y=None if ds.y is None else ds.y[idx])


def _try_mode(
    saved_model: Any,
    mode: str,
    calibration: Dataset | None,
    eval_set: Dataset,
    reference: Evaluation,
    gate: GateConfig,
    progress: _Progress,
    options: dict[str, Any],
) -> Candidate:
    try:
        data = convert(
            saved_model,
            mode,
            None if calibration is None else calibration.x,
            seed=options["seed"],
            max_calibration_samples=options["max_calibration_samples"],
        )
    except PipelineError as e:
        log.warning("mode did not convert", extra={"mode": mode, "reason": str(e)})
        progress.step(f"convert {mode}")
        progress.step(f"evaluate {mode}")
        return Candidate(mode=mode, passed=False, reasons=(str(e),))
    progress.step(f"convert {mode}")
    try:
        ev = evaluate(data, eval_set, reference=reference, latency_runs=options["latency_runs"])
    except PipelineError as e:
        log.warning("mode did not evaluate", extra={"mode": mode, "reason": str(e)})
        progress.step(f"evaluate {mode}")
        return Candidate(mode=mode, passed=False, reasons=(str(e),), model_bytes=data)
    progress.step(f"evaluate {mode}")
    reasons = gate.failures(ev, reference)
    if reasons:
        log.warning("mode failed the gate", extra={"mode": mode, "reasons": reasons})
    return Candidate(
        mode=mode, passed=not reasons, reasons=tuple(reasons), model_bytes=data, evaluation=ev
    )


def _describe(c: Candidate) -> str:
    if c.passed:
        assert c.evaluation is not None
        return f"{c.mode}: passed ({c.evaluation.describe()})"
    return f"{c.mode}: failed: {'; '.join(c.reasons)}"


def run_pipeline(
    model: Any,
    calibration: DataSource | None,
    eval_set: DataSource | None,
    mode: str = "int8",
    gate: GateConfig | None = None,
    fallback: bool = True,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    *,
    max_calibration_samples: int = DEFAULT_MAX_CALIBRATION_SAMPLES,
    max_eval_samples: int = DEFAULT_MAX_EVAL_SAMPLES,
    latency_runs: int = DEFAULT_LATENCY_RUNS,
) -> PipelineResult:
    """Convert ``model`` to ``mode``, check it against float32, fall back if needed.

    ``model``: a Keras model, ``.keras`` file, SavedModel directory or ``.tflite``
    file. ``calibration`` and ``eval_set``: anything ``load_dataset`` accepts;
    with labels in ``eval_set`` accuracy is gated, otherwise only agreement
    with float32. Without ``eval_set`` the calibration inputs are used.

    Raises ``PipelineError`` when no mode passes (with every reason), when
    the data does not fit the model, or when the model cannot be converted.
    """
    gate = gate or GateConfig()
    if mode not in QUANTIZATION_MODES:
        raise PipelineError(f"unknown quantization mode {mode!r}; choose from {QUANTIZATION_MODES}")
    source = load_model(model)
    calib = load_dataset(calibration, what="calibration data")
    evals = load_dataset(eval_set, what="evaluation data")
    decisions: list[str] = []
    if evals is None:
        if calib is None:
            raise PipelineError("no evaluation data and no calibration data to evaluate on")
        evals = Dataset(x=calib.x)
        decisions.append("no evaluation set given: judged on calibration inputs, without labels")
    evals = _bounded(evals, max_eval_samples, seed)
    options = {
        "seed": seed,
        "max_calibration_samples": max_calibration_samples,
        "latency_runs": latency_runs,
    }
    common = {"source": source, "calibration": calib, "eval_set": evals, "gate": gate, "seed": seed}

    if source.kind == "tflite":
        return _release_as_is(source, mode, evals, gate, decisions, progress, common, options)

    if mode in CALIBRATED_MODES and calib is None:
        # Falling back to a mode that needs no calibration would hide the mistake.
        raise PipelineError(f"mode {mode} needs calibration data; none was given")
    tracker = _Progress(progress, total=3 + (0 if mode == "float32" else 2))
    with exported_saved_model(source) as saved_model:
        if calib is not None:
            # A wrong shape is the caller's error, not a reason to fall back.
            check_calibration_shape(calib.x, read_input_signature(saved_model))
        tracker.step("export")
        reference_bytes = convert(saved_model, "float32", None, seed=seed)
        tracker.step("convert float32")
        reference = evaluate(reference_bytes, evals, latency_runs=latency_runs)
        tracker.step("evaluate float32")
        decisions.append(f"float32 reference: {reference.describe()}")
        if mode == "float32":
            decisions.append("float32 requested: released without quantization")
            tracker.finish()
            chosen = Candidate(
                mode="float32", passed=True, model_bytes=reference_bytes, evaluation=reference
            )
            return _result(chosen, mode, reference, (chosen,), decisions, common)

        tried = [_try_mode(saved_model, mode, calib, evals, reference, gate, tracker, options)]
        decisions.append(_describe(tried[0]))
        if not tried[0].passed and fallback and mode in FALLBACK_CHAIN:
            rest = FALLBACK_CHAIN[FALLBACK_CHAIN.index(mode) + 1 :]
            tracker.grow(2 * len(rest))
            for m in rest:
                tried.append(
                    _try_mode(saved_model, m, calib, evals, reference, gate, tracker, options)
                )
                decisions.append(f"fallback {_describe(tried[-1])}")
    passing = [c for c in tried if c.passed]
    if not passing:
        why = " | ".join(f"{c.mode}: {'; '.join(c.reasons)}" for c in tried)
        hint = "" if fallback else " (fallback was off)"
        raise PipelineError(f"no quantization mode passed the gate{hint}: {why}")
    chosen = min(passing, key=lambda c: len(c.model_bytes or b""))
    if chosen.mode != mode:
        decisions.append(
            f"chose {chosen.mode} ({len(chosen.model_bytes or b'')} bytes): the smallest of "
            f"the passing modes {[c.mode for c in passing]} after {mode} failed"
        )
    tracker.finish()
    return _result(chosen, mode, reference, tuple(tried), decisions, common)


def _result(
    chosen: Candidate,
    requested: str,
    reference: Evaluation | None,
    tried: tuple[Candidate, ...],
    decisions: list[str],
    common: dict[str, Any],
) -> PipelineResult:
    assert chosen.model_bytes is not None and chosen.evaluation is not None
    result = PipelineResult(
        mode=chosen.mode,
        requested_mode=requested,
        model_bytes=chosen.model_bytes,
        evaluation=chosen.evaluation,
        reference=reference,
        candidates=tried,
        decisions=decisions,
        **common,
    )
    log.info(
        "pipeline chose a model",
        extra={"mode": result.mode, "requested": requested, "bytes": len(result.model_bytes)},
    )
    return result


def _release_as_is(
    source: LoadedModel,
    mode: str,
    evals: Dataset,
    gate: GateConfig,
    decisions: list[str],
    progress: ProgressCallback | None,
    common: dict[str, Any],
    options: dict[str, Any],
) -> PipelineResult:
    assert source.tflite_bytes is not None
    tracker = _Progress(progress, total=1)
    # inspect_model inside evaluate refuses ops the device runtime lacks.
    ev = evaluate(source.tflite_bytes, evals, latency_runs=options["latency_runs"])
    tracker.step("evaluate tflite")
    decisions.append(
        f"{source.description} is released as it is ({ev.mode}); no float model to compare, "
        "so only absolute checks apply"
    )
    if mode != ev.mode:
        decisions.append(f"requested mode {mode} ignored: the model already is {ev.mode}")
    reasons = gate.failures(ev, None)
    if reasons:
        raise PipelineError(f"{source.description} failed the gate: {'; '.join(reasons)}")
    decisions.append(f"{ev.mode}: passed ({ev.describe()})")
    tracker.finish()
    chosen = Candidate(mode=ev.mode, passed=True, model_bytes=source.tflite_bytes, evaluation=ev)
    return _result(chosen, mode, None, (chosen,), decisions, common)
