"""LiteRT backend discovery and the low-level helpers ``device.runtime`` builds on.

The device never imports TensorFlow at module level: the interpreter class is
found at first use, in order of preference,

1. ``ai_edge_litert.interpreter.Interpreter`` (LiteRT, the maintained runtime),
2. ``tflite_runtime.interpreter.Interpreter`` (armv7 boards; needs ``numpy<2``),
3. ``tensorflow.lite.Interpreter`` (deprecated, last resort: a development host
   that has TensorFlow but neither runtime wheel).

Also here: turning interpreter tensor details into ``shared.manifest.TensorSpec``,
and reading op names from a model's flatbuffer with the backend's own schema.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from pydantic import ValidationError

from shared.errors import ModelLoadError
from shared.manifest import TensorSpec

__all__ = [
    "BACKENDS",
    "Backend",
    "interpreter_backend",
    "model_ops",
    "supported_builtin_ops",
    "tensor_spec",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """Where one interpreter implementation lives."""

    module: str
    #: Dotted attribute path of the class inside ``module``.
    attr: str
    #: Distribution names to ask ``importlib.metadata`` for the version.
    dists: tuple[str, ...]
    #: The flatbuffer schema module shipped with the same runtime, if any.
    schema: str | None


BACKENDS: tuple[Backend, ...] = (
    Backend(
        "ai_edge_litert.interpreter",
        "Interpreter",
        ("ai-edge-litert",),
        "ai_edge_litert.schema_py_generated",
    ),
    # tflite-runtime ships no Python schema module, so op support is unknown there.
    Backend("tflite_runtime.interpreter", "Interpreter", ("tflite-runtime",), None),
    # Importing TensorFlow costs seconds and ~1 GB on a board: only if nothing else exists.
    Backend(
        "tensorflow",
        "lite.Interpreter",
        ("tensorflow", "tensorflow-cpu"),
        "tensorflow.lite.python.schema_py_generated",
    ),
)

# Op codes in the schema enum that are not real kernels: they never name a
# builtin a model can ask the runtime for.
_NOT_OPS = frozenset({"CUSTOM", "DELEGATE", "PLACEHOLDER_FOR_GREATER_OP_CODES"})

_lock = threading.Lock()
_chosen: tuple[type[Any], str, Backend] | None = None
_ops_cache: dict[str, frozenset[str] | None] = {}


def _version(backend: Backend, module: ModuleType) -> str:
    for dist in backend.dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    root = importlib.import_module(backend.module.split(".")[0])
    return str(getattr(module, "__version__", getattr(root, "__version__", "unknown")))


def _import_backend(candidates: Sequence[Backend]) -> tuple[type[Any], str, Backend]:
    """The first candidate that imports, with ``"<dist> <version>"``."""
    failures: list[str] = []
    for backend in candidates:
        try:
            module = importlib.import_module(backend.module)
            cls: Any = module
            for part in backend.attr.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError) as e:
            # ImportError also covers tflite-runtime built for numpy<2 ("_ARRAY_API not found").
            failures.append(f"{backend.module}: {e}")
            continue
        return cls, f"{backend.dists[0]} {_version(backend, module)}", backend
    raise ImportError(
        "no TFLite interpreter is installed; install the device extra "
        "(ai-edge-litert, or tflite-runtime with numpy<2 on armv7). Tried: " + "; ".join(failures)
    )


def _chosen_backend() -> tuple[type[Any], str, Backend]:
    global _chosen
    with _lock:
        if _chosen is None:
            _chosen = _import_backend(BACKENDS)
            if _chosen[2].module == "tensorflow":
                log.warning("using the deprecated tf.lite.Interpreter: install ai-edge-litert")
            log.info(
                "interpreter backend: %s (%s.%s)", _chosen[1], _chosen[2].module, _chosen[2].attr
            )
        return _chosen


def interpreter_backend() -> tuple[type[Any], str]:
    """The interpreter class in use and ``"<distribution> <version>"``.

    Chosen once per process and logged once. Raises ``ImportError`` with install
    advice when no backend is present.
    """
    cls, name, _ = _chosen_backend()
    return cls, name


def _schema() -> ModuleType | None:
    module = _chosen_backend()[2].schema
    if module is None:
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _op_names(schema: ModuleType) -> dict[int, str]:
    enum = schema.BuiltinOperator
    return {v: k for k, v in vars(enum).items() if k.isupper() and isinstance(v, int)}


def supported_builtin_ops() -> frozenset[str] | None:
    """Builtin op names this runtime knows (``"CONV_2D"``, ...), or ``None`` if it cannot tell.

    The set is the ``BuiltinOperator`` enum of the schema the runtime was built
    with, so it is an upper bound: an op added to TFLite after this runtime is
    missing from it (the release is refused before download), while an op that
    is named here but whose kernel version is too old still fails at load,
    which the self-test step reports. A superset never wrongly refuses a
    release. ``None`` for ``tflite-runtime``, which ships no schema module.
    Costs ~0.2 s once (the schema module import), then cached.
    """
    schema = _schema()
    if schema is None:
        return None
    key = schema.__name__
    with _lock:
        if key not in _ops_cache:
            _ops_cache[key] = frozenset(_op_names(schema).values()) - _NOT_OPS
        return _ops_cache[key]


def model_ops(model: bytes) -> frozenset[str] | None:
    """Op names a ``.tflite`` model uses, in the naming of ``supported_builtin_ops``.

    Builtin ops by their ``BuiltinOperator`` name, custom ops by their custom
    code (as the cloud pipeline lists them in a manifest). This runtime
    registers no custom ops, so a model using one is incompatible. ``None`` if
    the backend has no schema module; ``ModelLoadError`` if the bytes are not
    a readable TFLite flatbuffer.
    """
    schema = _schema()
    if schema is None:
        return None
    if len(model) < 8 or not schema.Model.ModelBufferHasIdentifier(model, 0):
        raise ModelLoadError("the model is not a TFLite flatbuffer (no TFL3 identifier)")
    names = _op_names(schema)
    custom = schema.BuiltinOperator.CUSTOM
    ops: set[str] = set()
    try:
        root = schema.Model.GetRootAs(model, 0)
        for i in range(root.OperatorCodesLength()):
            code = root.OperatorCodes(i)
            # Codes above 127 live only in BuiltinCode; older models only fill the
            # deprecated int8 field. The real code is the larger of the two.
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin == custom:
                ops.add((code.CustomCode() or b"").decode("utf-8", "replace"))
            else:
                ops.add(names.get(builtin, f"UNKNOWN_{builtin}"))
    except Exception as e:
        # The flatbuffers reader trusts offsets: a corrupt table surfaces as
        # IndexError, struct.error, TypeError, UnicodeError ...
        raise ModelLoadError(f"the model's operator table is unreadable: {e!r}") from e
    return frozenset(ops)


def tensor_spec(detail: Mapping[str, Any]) -> TensorSpec:
    """A ``TensorSpec`` from one entry of ``get_input_details()``/``get_output_details()``.

    Raises ``ModelLoadError`` for tensors a release manifest cannot describe
    (scalars, unsupported dtypes, names over 256 characters).
    """
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quantized = bool(scale)  # LiteRT reports (0.0, 0) for float tensors
    try:
        return TensorSpec(
            name=str(detail["name"]),
            shape=[int(d) for d in np.asarray(detail["shape"]).tolist()],
            dtype=np.dtype(detail["dtype"]).name,  # validated: only dtypes a manifest can name
            scale=float(scale) if quantized else None,
            zero_point=int(zero_point) if quantized else None,
        )
    except (ValidationError, TypeError) as e:
        raise ModelLoadError(
            f"tensor {detail.get('name')!r} ({detail.get('dtype')}, shape "
            f"{list(np.asarray(detail.get('shape', [])).tolist())}) cannot be described by a "
            f"release manifest: {e}"
        ) from e
