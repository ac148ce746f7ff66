"""Tiny real ``.tflite`` models for tests, built with TensorFlow (never on a device).

``tiny_tflite`` converts a small Keras CNN (conv -> flatten -> dense -> softmax)
to float32 or full-int8 TFLite. Weights come from ``seed``, so two seeds give
two models with the same signature and different outputs: what a hot-swap test
needs. Results are cached per process and, because importing TensorFlow
alone takes 5-10 s, on disk too (``$EDGEFLEET_TEST_MODEL_CACHE``, default a
per-user temp directory), keyed by the arguments, the TensorFlow version and
this file's text; writes are atomic, so parallel workers can share it.

``mutate_tflite`` rewrites a model's flatbuffer (with LiteRT's generated
schema) to make models that must fail to load in a specific way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import io
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["custom_op_tflite", "mutate_tflite", "op_version_tflite", "tiny_tflite"]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_build_lock = threading.Lock()  # Keras seeds and graph building are process-global


def _tf_version() -> str:
    for dist in ("tensorflow", "tensorflow-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def _cache_path(*key: object) -> Path:
    root = os.environ.get("EDGEFLEET_TEST_MODEL_CACHE") or os.path.join(
        tempfile.gettempdir(), f"edgefleet-test-models-{os.getuid()}"
    )
    digest = hashlib.sha256(repr((key, _tf_version())).encode())
    digest.update(Path(__file__).read_bytes())
    return Path(root) / f"{digest.hexdigest()[:24]}.tflite"


@functools.cache
def tiny_tflite(
    kind: Literal["int8", "float32"] = "int8",
    seed: int = 0,
    in_shape: tuple[int, ...] = (8, 8, 1),
    n_out: int = 10,
) -> bytes:
    """A small CNN as ``.tflite`` bytes: float32 I/O, or int8 I/O with int8 kernels."""
    if kind not in ("int8", "float32"):
        raise ValueError(f"kind must be 'int8' or 'float32', got {kind!r}")
    path = _cache_path(kind, seed, tuple(in_shape), n_out)
    with contextlib.suppress(OSError):
        cached = path.read_bytes()
        if cached[4:8] == b"TFL3":  # the flatbuffer identifier: a whole model file
            return cached
    data = _build(kind, seed, tuple(in_shape), n_out)
    with contextlib.suppress(OSError):  # no cache is only slower
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return data


def _build(kind: str, seed: int, in_shape: tuple[int, ...], n_out: int) -> bytes:
    import tensorflow as tf

    with _build_lock:
        tf.keras.utils.set_random_seed(seed)
        model = tf.keras.Sequential(
            [
                tf.keras.Input(in_shape),
                tf.keras.layers.Conv2D(4, 3, activation="relu"),
                tf.keras.layers.Flatten(),
                tf.keras.layers.Dense(n_out),
                tf.keras.layers.Softmax(),
            ]
        )
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if kind == "int8":
            rng = np.random.default_rng(seed)

            def representative() -> Any:
                for _ in range(16):
                    yield [rng.random((1, *in_shape), dtype=np.float32)]

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        # Keras prints "Saved artifact at ..." while exporting; keep test output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            return bytes(converter.convert())


def mutate_tflite(model: bytes, change: Callable[[Any, Any], None]) -> bytes:
    """Re-serialize ``model`` after ``change(model_t, schema)`` edits its object tree."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    tree = schema.ModelT.InitFromPackedBuf(model, 0)
    change(tree, schema)
    builder = flatbuffers.Builder(len(model) + 1024)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def custom_op_tflite(kind: Literal["int8", "float32"] = "float32") -> bytes:
    """``tiny_tflite`` whose first op is turned into a custom op no runtime registers."""

    def change(tree: Any, schema: Any) -> None:
        code = tree.operatorCodes[0]
        code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
        code.customCode = "EdgefleetNoSuchOp"

    return mutate_tflite(tiny_tflite(kind), change)


def op_version_tflite(kind: Literal["int8", "float32"] = "float32") -> bytes:
    """``tiny_tflite`` whose first op asks for a kernel version no runtime has."""

    def change(tree: Any, schema: Any) -> None:
        tree.operatorCodes[0].version = 999

    return mutate_tflite(tiny_tflite(kind), change)
