"""Static facts about a TFLite flatbuffer: the ops it uses and how it is quantized.

Read with the flatbuffer schema that ships inside ``ai_edge_litert`` (the
device runtime), so no TensorFlow is needed and op names are exactly the
runtime's: builtin ops by their ``BuiltinOperator`` name (``"CONV_2D"``),
custom ops by their custom code (``"Erfinv"``). Bytes in, values out; a
malformed buffer raises ``PipelineError``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from shared.errors import PipelineError

__all__ = ["MAX_TFLITE_BYTES", "ModelStructure", "builtin_op_names", "read_structure"]

log = logging.getLogger(__name__)

#: The flatbuffer file identifier of a TFLite model, at bytes 4..8.
_IDENTIFIER = b"TFL3"
#: Python flatbuffers cannot address more than 2 GiB, and no edge model is near that.
MAX_TFLITE_BYTES = 2**31 - 1
_CUSTOM = "CUSTOM"


@dataclass(frozen=True)
class ModelStructure:
    """What the flatbuffer says, independent of any runtime."""

    #: Every op the model's subgraphs use, sorted, without duplicates.
    ops: tuple[str, ...]
    #: The subset of ``ops`` that are custom (not builtin) ops.
    custom_ops: tuple[str, ...]
    #: One of ``shared.manifest.QUANTIZATION_MODES``, inferred from tensor types.
    quantization: str


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


@functools.cache
def _enum_names(enum_name: str) -> dict[int, str]:
    enum = getattr(_schema(), enum_name)
    return {v: k for k, v in vars(enum).items() if not k.startswith("_") and isinstance(v, int)}


def builtin_op_names() -> frozenset[str]:
    """Every builtin op name the installed LiteRT schema knows."""
    return frozenset(_enum_names("BuiltinOperator").values()) - {_CUSTOM}


def _op_name(opcode: Any) -> str:
    # Op codes above 127 live in ``builtin_code``; older files only fill the
    # deprecated int8 field. The larger of the two is the real code.
    code = max(opcode.BuiltinCode(), opcode.DeprecatedBuiltinCode())
    name = _enum_names("BuiltinOperator").get(code, f"BUILTIN_{code}")
    if name == _CUSTOM:
        custom = opcode.CustomCode()
        return custom.decode("utf-8", "replace") if custom else "CUSTOM(unnamed)"
    return name


def _quantization(model: Any) -> str:
    types = _enum_names("TensorType")
    activation_types: set[str] = set()
    constant_types: set[str] = set()
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for t in range(subgraph.TensorsLength()):
            tensor = subgraph.Tensors(t)
            buffer = model.Buffers(tensor.Buffer()) if tensor.Buffer() > 0 else None
            # Weights carry data inline or (for >2 GB files) at an offset.
            is_constant = buffer is not None and (buffer.DataLength() > 0 or buffer.Offset() > 1)
            name = types.get(tensor.Type(), "UNKNOWN")
            (constant_types if is_constant else activation_types).add(name)
    # Activation types decide the integer modes; weight types the float ones.
    if "INT16" in activation_types:
        return "int16x8"
    if activation_types & {"INT8", "UINT8"}:
        return "int8"
    if constant_types & {"INT8", "UINT8", "INT4"}:
        return "dynamic"
    if "FLOAT16" in constant_types:
        return "float16"
    return "float32"


def read_structure(model_bytes: bytes) -> ModelStructure:
    """Parse ``model_bytes`` as a TFLite model and list its ops and quantization."""
    if len(model_bytes) > MAX_TFLITE_BYTES:
        raise PipelineError(f"model is {len(model_bytes)} bytes; the limit is {MAX_TFLITE_BYTES}")
    if len(model_bytes) < 8 or model_bytes[4:8] != _IDENTIFIER:
        raise PipelineError("not a TFLite model: the flatbuffer identifier 'TFL3' is missing")
    try:
        model = _schema().Model.GetRootAs(model_bytes, 0)
        ops: set[str] = set()
        custom: set[str] = set()
        for s in range(model.SubgraphsLength()):
            subgraph = model.Subgraphs(s)
            for i in range(subgraph.OperatorsLength()):
                opcode = model.OperatorCodes(subgraph.Operators(i).OpcodeIndex())
                name = _op_name(opcode)
                ops.add(name)
                if max(opcode.BuiltinCode(), opcode.DeprecatedBuiltinCode()) == getattr(
                    _schema().BuiltinOperator, _CUSTOM
                ):
                    custom.add(name)
        quantization = _quantization(model)
    except PipelineError:
        raise
    except Exception as e:
        # The flatbuffers reader trusts offsets; a corrupt file surfaces as
        # any of IndexError, struct.error, TypeError ...
        raise PipelineError(f"not a readable TFLite model: {type(e).__name__}: {e}") from e
    return ModelStructure(
        ops=tuple(sorted(ops)), custom_ops=tuple(sorted(custom)), quantization=quantization
    )
