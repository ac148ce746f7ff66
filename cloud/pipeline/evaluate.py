"""Evaluation of a TFLite model on the host with LiteRT, the runtime devices use.

Everything a release records about a model is measured here: accuracy (with
labels), top-1 agreement and the largest output error against the float
reference, size, single-sample latency, the input/output ``TensorSpec`` and
the ops it needs. Before any of that, ``inspect_model`` proves the device
runtime can load the model at all: a model with an op LiteRT lacks is refused
with a ``PipelineError`` that names the op.

Inputs are always given as real values; ``quantize_input`` maps them into the
model's input dtype the way a device must (``q = round(x / scale + zp)``,
clipped to the dtype's range).

Latency is the CPU time of one ``invoke`` on the calling thread (LiteRT with
one thread runs XNNPACK inline), the median over rounds after a warm-up. On
an idle core that *is* the wall-clock latency; on a shared build machine wall
clock also counts the time other processes held the core, which made the
int8/float32 ratio swing by +-40% between runs (see ``bench/quantize.py``).
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.pipeline.sources import Dataset
from cloud.pipeline.tflite_info import read_structure
from shared.errors import PipelineError
from shared.manifest import TensorSpec
from shared.selftest import dequantize

__all__ = [
    "DEFAULT_LATENCY_RUNS",
    "Evaluation",
    "ModelInfo",
    "Runner",
    "evaluate",
    "inspect_model",
    "litert_version",
    "quantize_input",
]

log = logging.getLogger(__name__)

#: Invokes timed for the latency median; warm-up invokes are not counted.
DEFAULT_LATENCY_RUNS = 200
_WARMUP_RUNS = 10
#: Latency rounds; the median of their per-invoke means is reported.
_LATENCY_ROUNDS = 20
_MAX_NAME = 256
_UNRESOLVED = re.compile(r"unresolved custom op: ([^\s.]+)|builtin opcode '([^']+)'", re.I)


def litert_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-edge-litert")
    except PackageNotFoundError:
        return "unknown"


def _interpreter(model_bytes: bytes, num_threads: int, *, xnnpack: bool = True) -> Any:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(
        model_content=model_bytes, num_threads=num_threads, experimental_op_resolver_type=resolver
    )
    interpreter.allocate_tensors()
    return interpreter


def _spec(detail: dict[str, Any], role: str) -> TensorSpec:
    signature = [int(d) for d in detail.get("shape_signature", detail["shape"])]
    if any(d < 1 for d in signature[1:]):
        raise PipelineError(
            f"model {role} {detail['name']!r} has dynamic dimensions {signature}; "
            "give the model a fixed input shape (only the batch may vary)"
        )
    shape = [1, *signature[1:]] if signature else [1]
    dtype = np.dtype(detail["dtype"]).name
    params = detail.get("quantization_parameters", {})
    scales = np.asarray(params.get("scales", []))
    zero_points = np.asarray(params.get("zero_points", []))
    if len(scales) > 1:
        raise PipelineError(
            f"model {role} {detail['name']!r} is quantized per channel; a release needs "
            "one scale and zero point per input and output tensor"
        )
    scale = float(scales[0]) if len(scales) == 1 and scales[0] > 0 else None
    zero_point = int(zero_points[0]) if scale is not None and len(zero_points) else None
    if scale is not None and zero_point is None:
        zero_point = 0
    try:
        return TensorSpec(
            name=str(detail["name"])[:_MAX_NAME],
            shape=shape,
            dtype=dtype,
            scale=scale,
            zero_point=zero_point,
        )
    except ValueError as e:
        raise PipelineError(f"model {role} cannot be described in a manifest: {e}") from e


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about a converted model that the device runtime accepted."""

    size_bytes: int
    quantization: str
    ops: tuple[str, ...]
    input_spec: TensorSpec
    output_spec: TensorSpec


def inspect_model(model_bytes: bytes) -> ModelInfo:
    """Read the model's structure and prove LiteRT can load and allocate it.

    Raises ``PipelineError`` naming the op(s) when the runtime lacks an op
    the model uses, or describing what else stops the model from loading.
    """
    structure = read_structure(model_bytes)
    try:
        interpreter = _interpreter(model_bytes, num_threads=1)
    except (RuntimeError, ValueError) as e:
        named = {a or b for a, b in _UNRESOLVED.findall(str(e))}
        missing = sorted(named | set(structure.custom_ops))
        detail = " ".join(str(e).split())[:500]
        if missing:
            raise PipelineError(
                f"the device runtime (LiteRT {litert_version()}) lacks op(s) "
                f"{', '.join(missing)} used by this model; convert without custom ops "
                f"(runtime said: {detail})"
            ) from e
        raise PipelineError(f"the device runtime cannot load this model: {detail}") from e
    try:
        # Devices run XNNPACK (the default delegate) too, but it may decline an op on
        # another CPU or build; LiteRT's own kernels must then prepare it, and they
        # check more (e.g. quantization multipliers that would overflow).
        _interpreter(model_bytes, num_threads=1, xnnpack=False)
    except (RuntimeError, ValueError) as e:
        detail = " ".join(str(e).split())[:500]
        raise PipelineError(
            "the device runtime loads this model only through XNNPACK; its builtin kernels "
            f"refuse it, so a device where XNNPACK declines an op could not run it: {detail}"
        ) from e
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise PipelineError(
            f"model has {len(inputs)} inputs and {len(outputs)} outputs; edgefleet releases "
            "models with exactly one of each"
        )
    return ModelInfo(
        size_bytes=len(model_bytes),
        quantization=structure.quantization,
        ops=structure.ops,
        input_spec=_spec(inputs[0], "input"),
        output_spec=_spec(outputs[0], "output"),
    )


def quantize_input(x: npt.NDArray[np.generic], spec: TensorSpec) -> npt.NDArray[Any]:
    """Map real values to ``spec.dtype``: ``q = round(x / scale + zero_point)``, clipped."""
    dtype = np.dtype(spec.dtype)
    real = np.asarray(x, dtype=np.float64)
    if spec.scale is None:
        return real.astype(dtype)
    q = np.round(real / spec.scale + float(spec.zero_point or 0))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        q = np.clip(q, info.min, info.max)
    return q.astype(dtype)


class Runner:
    """A LiteRT interpreter run one sample at a time, as a device runs it.

    One thread: latency then compares modes fairly and resembles a single
    small core; it also keeps parallel test workers from fighting over cores.
    """

    def __init__(self, model_bytes: bytes, *, num_threads: int = 1) -> None:
        self.num_threads = num_threads
        self._interpreter = _interpreter(model_bytes, num_threads)
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self.input_spec = _spec(self._input, "input")
        self.output_spec = _spec(self._output, "output")

    def run_raw(self, inputs: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Run inputs already in the input dtype ``(N, ...)``; outputs in the output dtype."""
        want = tuple(self.input_spec.shape[1:])
        arr = np.asarray(inputs)
        if arr.dtype != np.dtype(self.input_spec.dtype) or tuple(arr.shape[1:]) != want:
            raise PipelineError(
                f"inputs are {arr.dtype}{list(arr.shape)}; the model takes "
                f"{self.input_spec.dtype}[N, {', '.join(map(str, want))}]"
            )
        out = np.empty((len(arr), *self.output_spec.shape[1:]), dtype=self.output_spec.dtype)
        for i in range(len(arr)):
            self._interpreter.set_tensor(self._input["index"], arr[i : i + 1])
            self._interpreter.invoke()
            out[i] = self._interpreter.get_tensor(self._output["index"])[0]
        return out

    def run(self, x: npt.NDArray[np.generic]) -> npt.NDArray[np.float64]:
        """Run real-valued inputs and return real-valued (dequantized) outputs."""
        return dequantize(self.run_raw(quantize_input(x, self.input_spec)), self.output_spec)

    def latency_s(self, sample: npt.NDArray[np.generic], runs: int) -> float:
        """Seconds of one ``invoke`` on one real-valued sample: the median over rounds.

        ``runs`` invokes are timed in up to ``_LATENCY_ROUNDS`` rounds (timing
        each invoke alone would add the clock's own cost to a 10 us model).
        With one thread the clock is the thread's CPU time, which other
        processes on the machine cannot inflate; with more, wall clock.
        """
        self._interpreter.set_tensor(
            self._input["index"], quantize_input(np.asarray(sample)[np.newaxis], self.input_spec)
        )
        for _ in range(_WARMUP_RUNS):
            self._interpreter.invoke()
        runs = max(1, runs)
        rounds = min(runs, _LATENCY_ROUNDS)
        per_round = max(1, runs // rounds)
        clock = time.thread_time_ns if self.num_threads == 1 else time.perf_counter_ns
        times = []
        for _ in range(rounds):
            started = clock()
            for _ in range(per_round):
                self._interpreter.invoke()
            times.append((clock() - started) / per_round)
        return statistics.median(times) / 1e9


def _top1(outputs: npt.NDArray[np.generic]) -> npt.NDArray[np.intp]:
    top: npt.NDArray[np.intp] = np.asarray(outputs).reshape(len(outputs), -1).argmax(axis=1)
    return top


@dataclass(frozen=True)
class Evaluation:
    """Measurements of one model on one evaluation set."""

    info: ModelInfo
    #: Real-valued outputs on the evaluation inputs, ``(N, ...)``.
    outputs: npt.NDArray[np.float64]
    latency_s: float
    accuracy: float | None = None
    top1_agreement: float | None = None
    max_abs_error: float | None = None

    @property
    def mode(self) -> str:
        return self.info.quantization

    @property
    def size_bytes(self) -> int:
        return self.info.size_bytes

    def metrics(self) -> dict[str, float]:
        """Measured values by name, omitting what could not be measured."""
        out = {"size_bytes": float(self.size_bytes), "latency_ms": self.latency_s * 1e3}
        for key in ("accuracy", "top1_agreement", "max_abs_error"):
            value = getattr(self, key)
            if value is not None:
                out[key] = float(value)
        return out

    def describe(self) -> str:
        parts = [f"{self.mode}", f"{self.size_bytes / 1024:.1f} KiB"]
        if self.accuracy is not None:
            parts.append(f"accuracy {self.accuracy:.2%}")
        if self.top1_agreement is not None:
            parts.append(f"top-1 agreement {self.top1_agreement:.2%}")
        if self.max_abs_error is not None:
            parts.append(f"max |error| {self.max_abs_error:.3g}")
        parts.append(f"latency {self.latency_s * 1e6:.1f} us")
        return ", ".join(parts)


def evaluate(
    model_bytes: bytes,
    eval_set: Dataset,
    *,
    reference: Evaluation | None = None,
    latency_runs: int = DEFAULT_LATENCY_RUNS,
) -> Evaluation:
    """Measure ``model_bytes`` on ``eval_set`` (real-valued inputs, labels optional).

    With a ``reference`` evaluation (the float model on the same set) the
    top-1 agreement and the largest absolute output error are computed too.
    """
    info = inspect_model(model_bytes)
    runner = Runner(model_bytes)
    if tuple(eval_set.x.shape[1:]) != tuple(info.input_spec.shape[1:]):
        raise PipelineError(
            f"evaluation inputs have samples of shape {tuple(eval_set.x.shape[1:])}; the model "
            f"input {info.input_spec.name!r} expects {tuple(info.input_spec.shape[1:])}"
        )
    started = time.perf_counter()
    outputs = runner.run(eval_set.x)
    accuracy = top1 = max_err = None
    if eval_set.y is not None:
        accuracy = float(np.mean(_top1(outputs) == eval_set.y))
    if reference is not None:
        if reference.outputs.shape != outputs.shape:
            raise PipelineError(
                f"outputs {outputs.shape} differ in shape from the reference "
                f"{reference.outputs.shape}"
            )
        top1 = float(np.mean(_top1(outputs) == _top1(reference.outputs)))
        max_err = float(np.max(np.abs(outputs - reference.outputs))) if outputs.size else 0.0
    latency = runner.latency_s(eval_set.x[0], latency_runs)
    result = Evaluation(
        info=info,
        outputs=outputs,
        latency_s=latency,
        accuracy=accuracy,
        top1_agreement=top1,
        max_abs_error=max_err,
    )
    log.info(
        "evaluated model",
        extra={
            "mode": info.quantization,
            "samples": len(eval_set),
            "summary": result.describe(),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return result
