"""Unit tests of the pipeline's pure parts: data loading, sampling, quantizing
inputs, the gate's rules, flatbuffer refusal, progress. No TensorFlow here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloud.pipeline.convert import InputSignature, check_calibration_shape, sample_calibration
from cloud.pipeline.evaluate import Evaluation, ModelInfo, quantize_input
from cloud.pipeline.gate import GateConfig, _Progress
from cloud.pipeline.sources import Dataset, arrays_sha256, load_dataset, load_model
from cloud.pipeline.tflite_info import builtin_op_names, read_structure
from shared.errors import ConfigError, PipelineError
from shared.manifest import TensorSpec
from shared.selftest import dequantize

SPEC_F32 = TensorSpec(name="x", shape=[1, 10], dtype="float32")


def _evaluation(
    accuracy: float | None,
    agreement: float | None = None,
    error: float | None = None,
    latency_s: float = 1e-3,
) -> Evaluation:
    info = ModelInfo(
        size_bytes=1000,
        quantization="int8",
        ops=("SOFTMAX",),
        input_spec=SPEC_F32,
        output_spec=SPEC_F32,
    )
    return Evaluation(
        info=info,
        outputs=np.zeros((1, 10)),
        latency_s=latency_s,
        accuracy=accuracy,
        top1_agreement=agreement,
        max_abs_error=error,
    )


def test_importing_the_pipeline_does_not_import_tensorflow() -> None:
    code = (
        "import sys, cloud.pipeline, cloud.pipeline.gate, cloud.pipeline.artifacts, "
        "cloud.pipeline.digits; assert 'tensorflow' not in sys.modules, 'tf imported'; "
        "assert 'keras' not in sys.modules, 'keras imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_npz_dataset_with_and_without_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).uniform(size=(5, 4, 4, 1))
    np.savez(tmp_path / "xy.npz", x=x, y=np.arange(5))
    np.savez(tmp_path / "x.npz", x=x)
    with_labels = load_dataset(tmp_path / "xy.npz")
    without = load_dataset(str(tmp_path / "x.npz"))
    assert with_labels is not None and without is not None
    assert with_labels.x.dtype == np.float32 and with_labels.x.shape == (5, 4, 4, 1)
    assert with_labels.y is not None and with_labels.y.tolist() == [0, 1, 2, 3, 4]
    assert without.y is None


def test_npz_without_x_and_pickled_npz_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", inputs=np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="no array 'x'"):
        load_dataset(tmp_path / "bad.npz")
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, {"b": 2}]
    np.savez(tmp_path / "pickled.npz", x=objects)
    with pytest.raises(ConfigError, match="cannot read"):
        load_dataset(tmp_path / "pickled.npz")


def test_tuple_callable_and_array_sources() -> None:
    x = np.ones((3, 2), dtype=np.float64)
    onehot = np.eye(3)
    from_tuple = load_dataset((x, onehot))
    from_callable = load_dataset(lambda: x)
    from_array = load_dataset(x)
    assert from_tuple is not None and from_tuple.y is not None
    assert from_tuple.y.tolist() == [0, 1, 2]  # one-hot labels become class indices
    assert from_callable is not None and from_callable.y is None
    assert from_array is not None and from_array.x.dtype == np.float32
    assert load_dataset(None) is None


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ((np.ones((3, 2)), np.arange(4)), "expected 3 labels"),
        (np.ones(3), "must be a batch"),
        (np.array([[np.nan, 1.0]]), "NaN"),
        ((np.ones((2, 2)), np.array([0.5, 1.0])), "class indices"),
        (np.array([["a", "b"]]), "numeric"),
    ],
)
def test_bad_data_is_refused(source: object, match: str) -> None:
    with pytest.raises(PipelineError, match=match):
        load_dataset(source)  # type: ignore[arg-type]


def test_failing_data_callable_is_a_pipeline_error() -> None:
    def broken() -> np.ndarray:
        raise OSError("sensor log missing")

    with pytest.raises(PipelineError, match="sensor log missing"):
        load_dataset(broken, what="calibration data")


def test_model_sources_that_are_not_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(tmp_path / "missing.tflite")
    (tmp_path / "model.onnx").write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match="unsupported model file"):
        load_model(tmp_path / "model.onnx")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match="not a SavedModel"):
        load_model(tmp_path / "dir")
    with pytest.raises(ConfigError, match="cannot load a model"):
        load_model(42)


def test_tflite_source_is_hashed_by_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(b"not really a model")
    loaded = load_model(path)
    assert loaded.kind == "tflite" and loaded.tflite_bytes == b"not really a model"
    assert len(loaded.sha256) == 64


def test_array_hash_covers_dtype_and_shape() -> None:
    a = np.zeros((2, 3), dtype=np.float32)
    assert arrays_sha256([a]) != arrays_sha256([a.reshape(3, 2)])
    assert arrays_sha256([a]) != arrays_sha256([a.astype(np.int32)])
    assert arrays_sha256([a]) == arrays_sha256([a.copy()])
    ds = Dataset(x=a, y=np.zeros(2, dtype=np.int64))
    assert ds.sha256 != Dataset(x=a).sha256


def test_calibration_sample_is_bounded_seeded_and_ordered() -> None:
    x = np.arange(1000, dtype=np.float32).reshape(1000, 1)
    a = sample_calibration(x, max_samples=100, seed=7)
    b = sample_calibration(x, max_samples=100, seed=7)
    c = sample_calibration(x, max_samples=100, seed=8)
    assert a.shape == (100, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.diff(a[:, 0]) > 0)
    assert len(sample_calibration(x[:10], max_samples=100, seed=0)) == 10


def test_calibration_shape_check_names_expected_and_actual_shape() -> None:
    sig = InputSignature(
        signature_key="serving_default", name="image", shape=(1, 8, 8, 1), dtype="float"
    )
    check_calibration_shape(np.zeros((4, 8, 8, 1)), sig)
    with pytest.raises(PipelineError, match=r"\(4, 8, 8\).*'image'.*\(8, 8, 1\)"):
        check_calibration_shape(np.zeros((4, 8, 8)), sig)
    with pytest.raises(PipelineError, match="no samples"):
        check_calibration_shape(np.zeros((0, 8, 8, 1)), sig)
    dynamic = InputSignature(signature_key="s", name="x", shape=(-1, -1, 3), dtype="float")
    check_calibration_shape(np.zeros((2, 17, 3)), dynamic)


def test_quantize_input_rounds_clips_and_round_trips() -> None:
    spec = TensorSpec(name="x", shape=[1, 4], dtype="int8", scale=1 / 255, zero_point=-128)
    x = np.array([[0.0, 0.5, 1.0, 2.0]])
    q = quantize_input(x, spec)
    assert q.dtype == np.int8
    assert q.tolist() == [[-128, 0, 127, 127]]  # 2.0 is out of range: clipped
    np.testing.assert_allclose(dequantize(q, spec)[0, :3], [0.0, 0.5, 1.0], atol=1 / 255)
    assert quantize_input(x, SPEC_F32.model_copy(update={"shape": [1, 4]})).dtype == np.float32


def test_gate_passes_within_limits_and_names_every_failure() -> None:
    gate = GateConfig(
        max_accuracy_drop=0.01, min_top1_agreement=0.98, max_abs_error=0.1, max_latency_ratio=1.5
    )
    reference = _evaluation(accuracy=0.98)
    assert gate.failures(_evaluation(0.975, 0.99, 0.05, 1.2e-3), reference) == []
    # Exactly at the limit passes: limits are inclusive.
    assert gate.failures(_evaluation(0.97, 0.98), reference) == []
    reasons = gate.failures(_evaluation(0.90, 0.90, 0.5, 3e-3), reference)
    assert len(reasons) == 4
    assert "8.00 points below" in reasons[0]
    assert "top-1 agreement" in reasons[1]
    assert "max |output error|" in reasons[2]
    assert "latency is 3.00x" in reasons[3]


def test_gate_without_reference_applies_only_absolute_checks() -> None:
    assert GateConfig().failures(_evaluation(0.5, None), None) == []
    reasons = GateConfig(min_accuracy=0.9).failures(_evaluation(0.5), None)
    assert reasons == ["accuracy 50.00% is below the floor 90.00%"]


def test_gate_config_rejects_percent_instead_of_fraction() -> None:
    with pytest.raises(ValueError, match="fractions"):
        GateConfig(max_accuracy_drop=1.5)


def test_garbage_bytes_are_not_a_tflite_model() -> None:
    with pytest.raises(PipelineError, match="TFL3"):
        read_structure(b"PK\x03\x04 a zip file, not a model")
    with pytest.raises(PipelineError, match="not a readable TFLite model"):
        read_structure(b"\xff\xff\xff\x7fTFL3" + b"\0" * 8)


def test_builtin_op_names_come_from_the_runtime_schema() -> None:
    names = builtin_op_names()
    assert {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= names
    assert "CUSTOM" not in names


def test_progress_stays_monotonic_when_the_plan_grows() -> None:
    seen: list[tuple[str, float]] = []
    progress = _Progress(lambda s, f: seen.append((s, f)), total=2)
    progress.step("a")
    progress.step("b")
    progress.grow(4)
    progress.step("c")
    progress.finish()
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [s for s, _ in seen] == ["a", "b", "c", "done"]
