"""The model pipeline end to end with real TensorFlow and real LiteRT: no mocks.

The digits CNN is trained once per module (a few seconds) and reused; every
test writes only under its own ``tmp_path`` so the module runs under xdist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from cloud.pipeline.artifacts import ReleaseArtifacts, build_artifacts, make_manifest
from cloud.pipeline.convert import convert
from cloud.pipeline.digits import (
    DIGITS_LABELS,
    DigitsSplits,
    build_digits_cnn,
    load_digits_splits,
    train_digits_cnn,
)
from cloud.pipeline.evaluate import inspect_model
from cloud.pipeline.gate import GateConfig, PipelineResult, run_pipeline
from cloud.pipeline.tflite_info import read_structure
from shared.drift import extract_features, histogram, unpack_baseline
from shared.errors import PipelineError, SelfTestError
from shared.manifest import QUANTIZATION_MODES, ReleaseManifest
from shared.selftest import check_outputs, unpack_vectors

EXPECTED_INPUT_DTYPE = {
    "float32": np.float32,
    "dynamic": np.float32,
    "float16": np.float32,
    "int8": np.int8,
    "int16x8": np.float32,
}


@pytest.fixture(scope="module")
def splits() -> DigitsSplits:
    return load_digits_splits(seed=0)


@pytest.fixture(scope="module")
def model(splits: DigitsSplits) -> Any:
    return train_digits_cnn(splits, epochs=15, seed=0)


@pytest.fixture(scope="module")
def int8_result(model: Any, splits: DigitsSplits) -> PipelineResult:
    return run_pipeline(model, splits.x_calib, (splits.x_test, splits.y_test), mode="int8")


@pytest.fixture(scope="module")
def strict_gate() -> GateConfig:
    # Out of int8's reach on purpose: its output step alone is 1/256 and its
    # measured error against float32 is several times that.
    return GateConfig(max_accuracy_drop=0.0, min_top1_agreement=1.0, max_abs_error=0.01)


@pytest.fixture(scope="module")
def fallback_result(model: Any, splits: DigitsSplits, strict_gate: GateConfig) -> PipelineResult:
    return run_pipeline(
        model, splits.x_calib, (splits.x_test, splits.y_test), mode="int8", gate=strict_gate
    )


def _manifest(artifacts: ReleaseArtifacts, release: int = 1) -> ReleaseManifest:
    manifest = make_manifest(artifacts, "digits", release, created_at=1_700_000_000.0)
    # What the device sees: the manifest as it comes out of signed TUF metadata.
    return ReleaseManifest.from_custom(manifest.to_custom(), target=manifest.model_target)


def _run_on_fresh_interpreter(model_bytes: bytes, inputs: np.ndarray) -> np.ndarray:
    """Run vectors the way a device does: a new LiteRT interpreter, one sample at a time."""
    interpreter = Interpreter(model_content=model_bytes)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    results = []
    for row in inputs:
        interpreter.set_tensor(inp["index"], row[np.newaxis])
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(results)


def test_digits_cnn_is_small_and_accurate(model: Any, splits: DigitsSplits) -> None:
    assert 26_000 <= model.count_params() <= 30_000
    probs = model.predict(splits.x_test, verbose=0)
    assert float(np.mean(probs.argmax(axis=1) == splits.y_test)) >= 0.95
    # A retrained "v2" is a different network, not only different weights.
    assert build_digits_cnn(1, dense_units=48).count_params() != model.count_params()


@pytest.mark.parametrize("mode", QUANTIZATION_MODES)
def test_each_mode_converts_to_a_loadable_model(
    mode: str, model: Any, splits: DigitsSplits
) -> None:
    data = convert(model, mode, splits.x_calib, seed=0, max_calibration_samples=100)
    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    assert inp["dtype"] == EXPECTED_INPUT_DTYPE[mode]
    assert list(inp["shape"]) == [1, 8, 8, 1]
    assert out["dtype"] == EXPECTED_INPUT_DTYPE[mode]
    structure = read_structure(data)
    assert structure.quantization == mode
    assert "CONV_2D" in structure.ops and not structure.custom_ops


def test_conversion_is_reproducible_for_a_seed(model: Any, splits: DigitsSplits) -> None:
    first = convert(model, "int8", splits.x_calib, seed=3, max_calibration_samples=50)
    again = convert(model, "int8", splits.x_calib, seed=3, max_calibration_samples=50)
    assert first == again


def test_int8_accuracy_drop_within_gate_on_digits(int8_result: PipelineResult) -> None:
    metrics = int8_result.metrics()
    assert int8_result.mode == "int8"
    assert metrics["accuracy"] >= 0.95
    assert metrics["accuracy_drop"] <= GateConfig().max_accuracy_drop
    assert metrics["top1_agreement"] >= GateConfig().min_top1_agreement
    assert metrics["size_ratio"] < 0.35
    assert int8_result.evaluation.info.input_spec.dtype == "int8"
    assert int8_result.evaluation.info.ops == (
        "CONV_2D",
        "FULLY_CONNECTED",
        "MAX_POOL_2D",
        "RESHAPE",
        "SOFTMAX",
    )


def test_progress_reports_rising_fractions_ending_at_one(
    model: Any, splits: DigitsSplits, tmp_path: Path
) -> None:
    seen: list[tuple[str, float]] = []
    run_pipeline(
        model,
        splits.x_calib,
        (splits.x_test, splits.y_test),
        mode="float16",
        progress=lambda step, fraction: seen.append((step, fraction)),
        latency_runs=5,
    )
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions)
    assert seen[-1] == ("done", 1.0)
    assert {"export", "convert float32", "convert float16"} <= {s for s, _ in seen}


def test_fallback_picks_smallest_passing_mode_and_records_why_int8_failed(
    fallback_result: PipelineResult, strict_gate: GateConfig
) -> None:
    result = fallback_result
    assert result.requested_mode == "int8"
    assert result.mode != "int8"
    tried = {c.mode: c for c in result.candidates}
    assert list(tried) == ["int8", "int16x8", "dynamic", "float16"]
    assert not tried["int8"].passed
    assert any("max |output error|" in r for r in tried["int8"].reasons)
    assert any(d.startswith("int8: failed") for d in result.decisions)
    passing = [c for c in result.candidates if c.passed]
    assert result.mode == min(passing, key=lambda c: len(c.model_bytes or b"")).mode
    assert strict_gate.failures(result.evaluation, result.reference) == []
    assert any(d.startswith(f"chose {result.mode}") for d in result.decisions)


def test_impossible_gate_without_fallback_raises_with_reason(
    model: Any, splits: DigitsSplits, strict_gate: GateConfig
) -> None:
    with pytest.raises(PipelineError, match=r"int8: .*max \|output error\|") as info:
        run_pipeline(
            model,
            splits.x_calib,
            (splits.x_test, splits.y_test),
            mode="int8",
            gate=strict_gate,
            fallback=False,
            latency_runs=5,
        )
    assert "fallback was off" in str(info.value)


def test_wrong_calibration_shape_is_refused_naming_both_shapes(
    model: Any, splits: DigitsSplits
) -> None:
    wrong = splits.x_calib[..., 0]  # (N, 8, 8): the channel axis is missing
    with pytest.raises(PipelineError, match=r"\(8, 8\).*\(8, 8, 1\)"):
        convert(model, "int8", wrong)
    # The pipeline must not hide the mistake by falling back to a mode
    # that needs no calibration.
    with pytest.raises(PipelineError, match=r"\(8, 8\).*\(8, 8, 1\)"):
        run_pipeline(model, wrong, (splits.x_test, splits.y_test), mode="int8")


def test_model_with_custom_op_is_refused_naming_the_op(
    splits: DigitsSplits, tmp_path: Path
) -> None:
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 1], tf.float32)])
    def erfinv_model(x: Any) -> Any:
        # Erfinv has no TFLite builtin; allow_custom_ops emits it as a custom op.
        return tf.reshape(tf.math.erfinv(x * 0.5), [1, 64])

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [erfinv_model.get_concrete_function()], erfinv_model
    )
    converter.allow_custom_ops = True
    data = converter.convert()
    assert read_structure(data).custom_ops == ("Erfinv",)

    with pytest.raises(PipelineError, match="Erfinv"):
        inspect_model(data)
    path = tmp_path / "custom.tflite"
    path.write_bytes(data)
    with pytest.raises(PipelineError, match=r"lacks op.*Erfinv"):
        run_pipeline(path, splits.x_calib, (splits.x_test, splits.y_test), latency_runs=5)


def test_selftest_vectors_pass_on_a_fresh_interpreter(
    int8_result: PipelineResult, fallback_result: PipelineResult
) -> None:
    for result in (int8_result, fallback_result):
        artifacts = build_artifacts(result, seed=1, selftest_count=24)
        manifest = _manifest(artifacts)
        inputs, expected = unpack_vectors(artifacts.selftest_bytes, manifest)
        assert inputs.dtype == np.dtype(manifest.input.dtype)
        actual = _run_on_fresh_interpreter(artifacts.model_bytes, inputs)
        report = check_outputs(actual, expected, manifest)
        assert report.passed and report.count == 24
        # The check has teeth: outputs of a different model fail it.
        wrong = np.roll(actual, 1, axis=1)
        with pytest.raises(SelfTestError):
            check_outputs(wrong, expected, manifest)


def test_int8_selftest_tolerance_is_two_output_steps(int8_result: PipelineResult) -> None:
    artifacts = build_artifacts(int8_result)
    scale = artifacts.output_spec.scale
    assert scale is not None and artifacts.output_spec.dtype == "int8"
    assert artifacts.selftest_spec_kwargs["atol"] == pytest.approx(2 * scale)
    assert artifacts.selftest_spec_kwargs["min_top1_agreement"] == 1.0


def test_drift_baseline_unpacks_and_matches_calibration(
    int8_result: PipelineResult, splits: DigitsSplits
) -> None:
    artifacts = build_artifacts(int8_result, labels=DIGITS_LABELS)
    manifest = _manifest(artifacts)
    assert manifest.drift is not None and artifacts.baseline_bytes is not None
    assert (manifest.drift.features, manifest.drift.n_features) == ("flatten", 64)
    assert (manifest.drift.bins, manifest.drift.n_classes) == (10, 10)
    baseline = unpack_baseline(artifacts.baseline_bytes, manifest.drift)
    features = extract_features(splits.x_calib, "flatten")
    np.testing.assert_array_equal(baseline.counts, histogram(features, baseline.edges))
    assert manifest.labels == list(DIGITS_LABELS)


def test_manifest_records_specs_ops_and_lineage(int8_result: PipelineResult) -> None:
    artifacts = build_artifacts(int8_result)
    manifest = _manifest(artifacts, release=3)
    assert manifest.model_target == "digits/3/model.tflite"
    assert manifest.selftest.target == "digits/3/selftest.npz"
    assert manifest.quantization == "int8"
    assert manifest.input.shape == [1, 8, 8, 1] and manifest.input.dtype == "int8"
    assert manifest.input.scale is not None and manifest.input.zero_point is not None
    assert manifest.runtime.ops == list(int8_result.evaluation.info.ops)
    assert {"accuracy", "float_accuracy", "accuracy_drop", "size_ratio"} <= set(manifest.metrics)
    for key in ("source_sha256", "dataset_sha256", "tensorflow", "litert", "mode", "seed"):
        assert manifest.source[key], key
    assert manifest.source["mode"] == "int8"


def test_tflite_file_is_released_as_is_with_detected_mode(
    int8_result: PipelineResult, splits: DigitsSplits, tmp_path: Path
) -> None:
    path = tmp_path / "digits_int8.tflite"
    path.write_bytes(int8_result.model_bytes)
    result = run_pipeline(
        path, splits.x_calib, (splits.x_test, splits.y_test), mode="float16", latency_runs=5
    )
    assert result.mode == "int8" and result.reference is None
    assert result.model_bytes == int8_result.model_bytes
    assert any("requested mode float16 ignored" in d for d in result.decisions)
    assert result.metrics()["accuracy"] == pytest.approx(int8_result.metrics()["accuracy"])


def test_keras_file_and_saved_model_sources_convert(
    model: Any, splits: DigitsSplits, tmp_path: Path
) -> None:
    keras_path = tmp_path / "digits.keras"
    model.save(keras_path)
    saved_model = tmp_path / "saved_model"
    model.export(str(saved_model), verbose=False)
    for source in (keras_path, saved_model):
        data = convert(source, "dynamic", None)
        assert read_structure(data).quantization == "dynamic"
    result = run_pipeline(saved_model, splits.x_calib, None, mode="int8", latency_runs=5)
    assert result.mode == "int8"
    assert result.evaluation.accuracy is None  # no labels: judged on agreement only
    assert result.evaluation.top1_agreement is not None
