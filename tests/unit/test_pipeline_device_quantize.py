"""The device's per-inference input quantization: fast, and the same numbers as the formula.

``LoadedModel.quantize`` runs on every inference of an int8 model, so it was
rewritten with in-place ufuncs (bench/quantize.py: 5.8 -> 2.8 us for the
digits CNN, whose whole int8 invoke is 2 us). These tests pin it to the
plain float32 formula ``clip(round(x / scale + zero_point))``, bit for bit,
including halfway points (round half to even) and values out of range.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from device.runtime import LoadedModel
from tests.helpers_models import tiny_tflite

pytestmark = pytest.mark.timeout(120)


def reference(x: np.ndarray, scale: float, zero_point: int, dtype: np.dtype) -> np.ndarray:
    """The formula as the device wrote it before, in float32."""
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, np.float32) / np.float32(scale) + np.float32(zero_point))
    return np.clip(q, info.min, info.max).astype(dtype)


@pytest.fixture(scope="module")
def int8_model() -> Iterator[LoadedModel]:
    model = LoadedModel(tiny_tflite("int8"), pool_size=1)
    assert model.input_spec.dtype == "int8" and model.input_spec.scale is not None
    yield model
    model.close()


def test_quantize_matches_the_formula_bit_for_bit(int8_model: LoadedModel) -> None:
    spec = int8_model.input_spec
    scale, zp = float(spec.scale or 0.0), int(spec.zero_point or 0)
    shape = tuple(spec.shape[1:])
    rng = np.random.default_rng(0)
    samples = [
        rng.normal(0, 1, shape).astype(np.float32),
        # Exact halfway points between two quantized values, both signs.
        ((rng.integers(-300, 300, shape) + 0.5) * scale - zp * scale).astype(np.float32),
        # Far out of range on both sides: clipped, never wrapped.
        rng.choice([-1e6, 1e6], size=shape).astype(np.float32),
        np.full(shape, np.inf, np.float32),
        rng.normal(0, 3, shape),  # float64 in, as a sensor may give it
    ]
    for x in samples:
        got = int8_model.quantize(x)
        want = reference(x.reshape(1, *shape), scale, zp, np.dtype(np.int8))
        assert got.dtype == np.int8 and got.shape == (1, *shape)
        np.testing.assert_array_equal(got, want)


def test_quantize_keeps_a_batch_axis_and_leaves_the_input_alone(int8_model: LoadedModel) -> None:
    shape = tuple(int8_model.input_spec.shape)
    x = np.random.default_rng(1).normal(0, 1, shape).astype(np.float32)
    before = x.copy()
    out = int8_model.quantize(x)
    assert out.shape == shape
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(out, int8_model.quantize(x[0]))


def test_float_model_input_is_only_cast() -> None:
    model = LoadedModel(tiny_tflite("float32"), pool_size=1)
    x = np.random.default_rng(2).normal(0, 1, model.input_spec.shape[1:])
    out = model.quantize(x)
    assert out.dtype == np.float32 and out.shape == tuple(model.input_spec.shape)
    np.testing.assert_array_equal(out[0], x.astype(np.float32))
    model.close()


def test_quantized_input_runs(int8_model: LoadedModel) -> None:
    x = np.random.default_rng(3).normal(0, 1, int8_model.input_spec.shape[1:])
    out = int8_model.run(int8_model.quantize(x))
    assert out.shape == tuple(int8_model.output_spec.shape)
