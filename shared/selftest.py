"""Self-test vectors: packing on the cloud, checking on the device.

A release ships ``selftest.npz`` (signed by TUF like the model) holding
``inputs`` in the model's input dtype and the ``expected`` outputs the cloud
got from the same LiteRT runtime. Before a device swaps a model in, it runs the
inputs and compares dequantized outputs within the manifest's tolerance. The
check is pure: arrays in, report out.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shared.errors import ManifestError, SelfTestError
from shared.manifest import ReleaseManifest, TensorSpec

__all__ = ["SelfTestReport", "check_outputs", "dequantize", "pack_vectors", "unpack_vectors"]


def pack_vectors(inputs: npt.NDArray[np.generic], expected: npt.NDArray[np.generic]) -> bytes:
    """Serialize self-test vectors to ``.npz`` bytes (uncompressed, no pickles)."""
    if len(inputs) != len(expected):
        raise ValueError(f"{len(inputs)} inputs but {len(expected)} expected outputs")
    buf = io.BytesIO()
    np.savez(buf, inputs=inputs, expected=expected)
    return buf.getvalue()


def _check_array(name: str, arr: npt.NDArray[np.generic], spec: TensorSpec, count: int) -> None:
    want = (count, *spec.shape[1:])
    if arr.dtype != np.dtype(spec.dtype) or tuple(arr.shape) != want:
        raise ManifestError(
            f"self-test {name} are {arr.dtype}{list(arr.shape)}, the manifest says "
            f"{spec.dtype}{list(want)}"
        )


def unpack_vectors(
    data: bytes, manifest: ReleaseManifest
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.generic]]:
    """Load verified ``selftest.npz`` bytes and check them against the manifest."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            inputs, expected = npz["inputs"], npz["expected"]
    except (OSError, ValueError, KeyError) as e:
        raise ManifestError(f"self-test vectors are unreadable: {e}") from e
    _check_array("inputs", inputs, manifest.input, manifest.selftest.count)
    _check_array("expected outputs", expected, manifest.output, manifest.selftest.count)
    return inputs, expected


def dequantize(arr: npt.NDArray[np.generic], spec: TensorSpec) -> npt.NDArray[np.float64]:
    """Map a tensor to real values using its affine quantization, if any."""
    out = np.asarray(arr, dtype=np.float64)
    if spec.scale is not None:
        out = spec.scale * (out - float(spec.zero_point or 0))
    return out


@dataclass(frozen=True)
class SelfTestReport:
    """Outcome of comparing a model's outputs with the signed expectations."""

    count: int
    max_abs_error: float
    out_of_tolerance: int
    top1_agreement: float
    passed: bool

    def describe(self) -> str:
        return (
            f"{self.count} vectors: max |error| {self.max_abs_error:.4g}, "
            f"{self.out_of_tolerance} elements out of tolerance, "
            f"top-1 agreement {self.top1_agreement:.1%}"
        )


def check_outputs(
    actual: npt.NDArray[np.generic], expected: npt.NDArray[np.generic], manifest: ReleaseManifest
) -> SelfTestReport:
    """Compare outputs; raise ``SelfTestError`` (with the report in its text) on failure."""
    spec, tol = manifest.output, manifest.selftest
    a, e = dequantize(actual, spec), dequantize(expected, spec)
    if a.shape != e.shape:
        raise SelfTestError(f"self-test output shape {a.shape} differs from expected {e.shape}")
    if not np.all(np.isfinite(a)):
        raise SelfTestError("self-test produced non-finite outputs")
    err = np.abs(a - e)
    bad = int(np.count_nonzero(err > tol.atol + tol.rtol * np.abs(e)))
    n = len(a)
    flat_a, flat_e = a.reshape(n, -1), e.reshape(n, -1)
    agree = float(np.mean(flat_a.argmax(axis=1) == flat_e.argmax(axis=1))) if n else 1.0
    report = SelfTestReport(
        count=n,
        max_abs_error=float(err.max()) if err.size else 0.0,
        out_of_tolerance=bad,
        top1_agreement=agree,
        passed=bad == 0 and agree >= tol.min_top1_agreement,
    )
    if not report.passed:
        raise SelfTestError(
            f"release {manifest.release} failed its self-test: {report.describe()} "
            f"(allowed: atol {tol.atol}, rtol {tol.rtol}, top-1 >= {tol.min_top1_agreement:.0%})"
        )
    return report
