"""The pipeline's device-runtime check covers LiteRT's builtin kernels, not only XNNPACK.

XNNPACK clamps a fused ReLU6 whose bound does not fit the output's int32
range; LiteRT's own conv kernel refuses such a model at ``allocate_tensors``.
A device falls back to the builtin kernels whenever XNNPACK declines a node,
so the pipeline must refuse what only XNNPACK accepts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cloud.pipeline.evaluate import _interpreter, inspect_model
from shared.errors import PipelineError
from tests.helpers_models import mutate_tflite, tiny_tflite

pytestmark = pytest.mark.integration


def _xnnpack_only_model() -> bytes:
    """``tiny_tflite`` int8 with a ReLU6 conv whose output scale makes 6.0 overflow int32."""

    def change(tree: Any, schema: Any) -> None:
        sg = tree.subgraphs[0]
        for op in sg.operators:
            code = tree.operatorCodes[op.opcodeIndex]
            if max(code.builtinCode, code.deprecatedBuiltinCode) != schema.BuiltinOperator.CONV_2D:
                continue
            inp, weights, bias = (sg.tensors[i] for i in op.inputs)
            op.builtinOptions.fusedActivationFunction = schema.ActivationFunctionType.RELU6
            # Keep input*weight/output scales in XNNPACK's range; 6.0 / 1e-10 is not an int32.
            # float32 arrays: the flatbuffer packer writes the array's own dtype.
            weights.quantization.scale = np.full(len(weights.quantization.scale), 1e-12, np.float32)
            bias.quantization.scale = (
                weights.quantization.scale * inp.quantization.scale[0]
            ).astype(np.float32)
            sg.tensors[op.outputs[0]].quantization.scale = np.asarray([1e-10], np.float32)

    return mutate_tflite(tiny_tflite("int8"), change)


def test_model_only_xnnpack_can_prepare_is_refused() -> None:
    model = _xnnpack_only_model()
    _interpreter(model, 1)  # XNNPACK alone would have accepted it
    with pytest.raises(PipelineError, match=r"only through XNNPACK.*CONV_2D"):
        inspect_model(model)


def test_ordinary_model_passes_both_kernel_sets() -> None:
    assert inspect_model(tiny_tflite("int8")).quantization == "int8"
