"""Conversion of a TensorFlow/Keras model to a TFLite flatbuffer in one quantization mode.

Keras 3 models are exported to a temporary SavedModel (``model.export``) and
converted with ``tf.lite.TFLiteConverter.from_saved_model``: the same path
Keras' own LiteRT export takes, and one that also serves users who bring a
SavedModel. TensorFlow is imported inside functions so that importing the
pipeline package stays cheap.

Modes (names from ``shared.manifest.QUANTIZATION_MODES``):

* ``float32``  no quantization: the reference every other mode is judged against
* ``dynamic``  int8 weights, float activations (no calibration data needed)
* ``float16``  float16 weights, float compute
* ``int8``     full integer: int8 weights and activations, int8 input and output
* ``int16x8``  int16 activations with int8 weights; float input and output
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.pipeline.sources import ModelSource, load_model
from shared.errors import PipelineError
from shared.manifest import QUANTIZATION_MODES

__all__ = [
    "CALIBRATED_MODES",
    "DEFAULT_MAX_CALIBRATION_SAMPLES",
    "InputSignature",
    "check_calibration_shape",
    "convert",
    "exported_saved_model",
    "read_input_signature",
    "sample_calibration",
]

log = logging.getLogger(__name__)

#: Modes whose activation ranges come from a representative dataset.
CALIBRATED_MODES = frozenset({"int8", "int16x8"})
#: Enough samples for stable activation ranges; more only slows conversion.
DEFAULT_MAX_CALIBRATION_SAMPLES = 500
#: Converter error texts run to pages of MLIR; keep the part a person reads.
_MAX_ERROR_CHARS = 1500
_SERVING_KEY = "serving_default"


@dataclass(frozen=True)
class InputSignature:
    """The single input of a SavedModel serving signature; ``-1`` marks an unknown dim."""

    signature_key: str
    name: str
    shape: tuple[int, ...]
    dtype: str

    def matches_sample(self, sample_shape: tuple[int, ...]) -> bool:
        want = self.shape[1:]
        return len(want) == len(sample_shape) and all(
            w in (-1, g) for w, g in zip(want, sample_shape, strict=True)
        )


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."


def _batch_one_signature(keras_model: Any) -> list[Any] | None:
    """A batch-1 input signature for a single-input Keras model, else ``None``.

    Devices run one sample at a time. A fixed batch lets the converter fold
    the shape arithmetic that a dynamic batch leaves in the graph (SHAPE,
    STRIDED_SLICE, PACK before every RESHAPE), so the model is smaller,
    faster and needs fewer ops on the device.
    """
    import tensorflow as tf

    try:
        inputs = keras_model.inputs
    except (AttributeError, ValueError):
        return None  # A subclassed model that was never called has no symbolic inputs.
    if not inputs or len(inputs) != 1:
        return None  # Let Keras infer; multi-input models are refused later.
    tensor = inputs[0]
    shape = tuple(tensor.shape)
    if len(shape) < 2 or any(d is None for d in shape[1:]):
        return None
    return [tf.TensorSpec((1, *shape[1:]), dtype=tensor.dtype, name=tensor.name)]


@contextlib.contextmanager
def exported_saved_model(model: ModelSource) -> Iterator[Path]:
    """Yield a SavedModel directory for ``model``, exporting Keras models to a temp dir.

    A SavedModel source is used in place; a temporary export is removed on exit.
    """
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        yield Path(model)
        return
    loaded = load_model(model)
    if loaded.kind == "tflite":
        raise PipelineError(
            f"{loaded.description} is already converted; it is released as it is, "
            "not converted again"
        )
    if loaded.kind == "saved_model":
        assert loaded.saved_model_dir is not None
        yield loaded.saved_model_dir
        return
    with tempfile.TemporaryDirectory(prefix="edgefleet-export-") as tmp:
        target = Path(tmp) / "saved_model"
        started = time.perf_counter()
        try:
            loaded.keras_model.export(
                str(target),
                format="tf_saved_model",
                input_signature=_batch_one_signature(loaded.keras_model),
                verbose=False,
            )
        except Exception as e:
            raise PipelineError(
                f"cannot export {loaded.description} to a SavedModel: {_short(e)}"
            ) from e
        log.debug("exported Keras model", extra={"seconds": time.perf_counter() - started})
        yield target


def read_input_signature(saved_model_dir: Path) -> InputSignature:
    """Read the serving signature's only input from ``saved_model.pb`` without loading TF graphs."""
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    except Exception as e:
        raise PipelineError(f"{saved_model_dir} holds no readable saved_model.pb: {e}") from e
    signatures: dict[str, Any] = {}
    for meta_graph in proto.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            signatures = dict(meta_graph.signature_def)
            break
    if _SERVING_KEY in signatures:
        key = _SERVING_KEY
    elif len(signatures) == 1:
        key = next(iter(signatures))
    else:
        raise PipelineError(
            f"{saved_model_dir} has no {_SERVING_KEY!r} signature to convert "
            f"(signatures: {sorted(signatures) or 'none'})"
        )
    inputs = signatures[key].inputs
    outputs = signatures[key].outputs
    if len(inputs) != 1 or len(outputs) != 1:
        # The release manifest describes exactly one input and one output tensor.
        raise PipelineError(
            f"signature {key!r} has {len(inputs)} inputs and {len(outputs)} outputs; "
            "edgefleet releases models with exactly one of each"
        )
    name, info = next(iter(inputs.items()))
    shape = tuple(int(d.size) for d in info.tensor_shape.dim)
    dtype = types_pb2.DataType.Name(info.dtype).removeprefix("DT_").lower()
    return InputSignature(signature_key=key, name=name, shape=shape, dtype=dtype)


def sample_calibration(
    x: npt.NDArray[np.generic], *, max_samples: int, seed: int
) -> npt.NDArray[np.float32]:
    """A seeded sample of at most ``max_samples`` rows, kept in their original order."""
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    arr = np.asarray(x, dtype=np.float32)
    if len(arr) <= max_samples:
        return arr
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(arr), size=max_samples, replace=False))
    return arr[idx]


def check_calibration_shape(
    calibration: npt.NDArray[np.generic], signature: InputSignature
) -> None:
    """Raise ``PipelineError`` naming both shapes unless ``calibration`` is a batch of inputs."""
    arr = np.asarray(calibration)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise PipelineError(f"calibration data holds no samples (shape {tuple(arr.shape)})")
    sample_shape = tuple(arr.shape[1:])
    if not signature.matches_sample(sample_shape):
        want = tuple(None if d == -1 else d for d in signature.shape[1:])
        raise PipelineError(
            f"calibration data has shape {tuple(arr.shape)} (samples of shape {sample_shape}); "
            f"the model input {signature.name!r} expects samples of shape {want} "
            f"(full input shape {list(signature.shape)}, batch first)"
        )


def _check_calibration(
    calibration: npt.NDArray[np.generic] | None, signature: InputSignature, mode: str
) -> npt.NDArray[np.float32]:
    if calibration is None:
        raise PipelineError(
            f"mode {mode} needs calibration data (representative inputs) to set "
            "activation ranges; none was given"
        )
    arr = np.asarray(calibration)
    check_calibration_shape(arr, signature)
    if signature.dtype != "float":
        raise PipelineError(
            f"mode {mode} calibrates float inputs; the model input {signature.name!r} "
            f"is {signature.dtype}"
        )
    if arr.dtype.kind not in "biuf" or not np.all(np.isfinite(arr)):
        raise PipelineError("calibration data must be finite numbers")
    return np.asarray(arr, dtype=np.float32)


def convert(
    model: ModelSource | Path,
    mode: str,
    calibration: npt.NDArray[np.generic] | None,
    *,
    seed: int = 0,
    max_calibration_samples: int = DEFAULT_MAX_CALIBRATION_SAMPLES,
    per_channel: bool = True,
) -> bytes:
    """Convert ``model`` to TFLite flatbuffer bytes in quantization ``mode``.

    ``model`` is a Keras model, a ``.keras`` file, a SavedModel directory or a
    ``LoadedModel``. ``calibration`` holds real-valued inputs ``(N, ...)``; it
    is required for ``int8`` and ``int16x8`` and ignored otherwise. At most
    ``max_calibration_samples`` of them are used, chosen with ``seed``.
    ``per_channel=False`` quantizes conv/dense weights with one scale per tensor
    instead of one per output channel: smaller (no per-channel scales and int64
    zero points) but usually less accurate; ``bench/quantize.py`` measures both.

    Raises ``PipelineError`` for an unknown mode, calibration data of the
    wrong shape, or a model the converter cannot handle (the converter's own
    message is kept, and the exception is chained).
    """
    if mode not in QUANTIZATION_MODES:
        raise PipelineError(f"unknown quantization mode {mode!r}; choose from {QUANTIZATION_MODES}")
    with exported_saved_model(model) as saved_model_dir:
        signature = read_input_signature(saved_model_dir)
        samples = None
        if mode in CALIBRATED_MODES:
            checked = _check_calibration(calibration, signature, mode)
            samples = sample_calibration(checked, max_samples=max_calibration_samples, seed=seed)
        return _convert_saved_model(saved_model_dir, signature, mode, samples, per_channel)


def _convert_saved_model(
    saved_model_dir: Path,
    signature: InputSignature,
    mode: str,
    samples: npt.NDArray[np.float32] | None,
    per_channel: bool = True,
) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=[signature.signature_key]
    )
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if not per_channel:
        # Private converter switch (TF 2.x); it only exists as an underscore attribute.
        converter._experimental_disable_per_channel = True
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if samples is not None:
        calib = samples

        def representative_dataset() -> Iterator[list[npt.NDArray[np.float32]]]:
            # One sample per step, batch 1: the shape the device will run.
            for row in calib:
                yield [row[np.newaxis]]

        converter.representative_dataset = representative_dataset
    if mode == "int8":
        # Full integer with int8 at the edges too, so a device without float
        # support runs it and no QUANTIZE/DEQUANTIZE ops are left at the ends.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif mode == "int16x8":
        # Float at the edges: the int16 kernels quantize inside the graph.
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
    started = time.perf_counter()
    try:
        data = converter.convert()
    except Exception as e:
        raise PipelineError(f"conversion to {mode} failed: {_short(e)}") from e
    log.info(
        "converted model",
        extra={
            "mode": mode,
            "bytes": len(data),
            "calibration_samples": 0 if samples is None else len(samples),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return bytes(data)
