"""``LoadedModel``: one ``.tflite`` model, loaded from bytes into a pool of interpreters.

A LiteRT interpreter must never run two invokes at once, so a model owns a
small pool of single-threaded interpreters and a serving thread checks one
out for the length of one inference. Measured on 2 cores with 2 serving
threads (MobileNetV2 0.35 int8, 96x96): a pool of ``num_threads=1``
interpreters did 2,590 inferences/s at p99 1.1 ms; one interpreter behind a
lock did 1,170/s (``num_threads=1``) or 1,460/s (``num_threads=2``) with p99
15-17 ms (threads queue on the lock). The interpreters share the model bytes,
so each extra one costs a tensor arena (and XNNPACK's packed weights).

The pool doubles as the in-flight count that ``device.runtime.ModelServer``
drains on a swap: ``close`` refuses new check-outs and releases the
interpreters only once all of them are back. Public names are re-exported by
``device.runtime``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from device._litert import interpreter_backend, model_ops, tensor_spec
from shared.errors import ManifestError, ModelLoadError
from shared.manifest import ReleaseManifest, TensorSpec

__all__ = ["DEFAULT_POOL_SIZE", "LoadedModel", "ModelMeta"]

log = logging.getLogger(__name__)

#: Interpreters built up front per model: one per core, as more serving threads
#: than cores add no throughput; capped because each holds its own tensor arena.
DEFAULT_POOL_SIZE = max(1, min(4, os.cpu_count() or 1))

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class ModelMeta:
    """What a loaded model is, for logs, reports and telemetry."""

    name: str = ""
    release: int | None = None
    #: A/B store slot the bytes came from.
    slot: str | None = None

    def describe(self) -> str:
        name = self.name or "model"
        rel = f" release {self.release}" if self.release is not None else ""
        slot = f" (slot {self.slot})" if self.slot is not None else ""
        return f"{name}{rel}{slot}"


def _brief(e: BaseException) -> str:
    """LiteRT error text without its trailing 'Registration failed.' style noise lines."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return " ".join(lines[:2]) or type(e).__name__


class LoadedModel:
    """One ``.tflite`` model, loaded from bytes into a pool of allocated interpreters.

    Thread-safe: any number of threads may call ``run``; each inference runs on an
    interpreter no other thread is using. Loading failures (corrupt bytes, an
    unsupported or custom op, a failed allocation, more than one input or output)
    raise ``ModelLoadError`` with the interpreter's own diagnosis as cause.
    """

    def __init__(
        self,
        model: bytes,
        *,
        meta: ModelMeta | None = None,
        num_threads: int = 1,
        pool_size: int = DEFAULT_POOL_SIZE,
        max_pool: int | None = None,
        check_inputs: bool = True,
    ) -> None:
        if num_threads < 1 or pool_size < 1:
            raise ValueError(
                f"num_threads and pool_size must be >= 1, got {num_threads}, {pool_size}"
            )
        max_pool = 2 * pool_size if max_pool is None else max_pool
        if max_pool < pool_size:
            raise ValueError(f"max_pool {max_pool} is below pool_size {pool_size}")
        # The interpreter keeps pointing into this buffer instead of copying it:
        # it must be immutable (not a caller's bytearray) and live as long as we do.
        self._content = bytes(model)
        self.meta = meta or ModelMeta()
        if not self._content:
            raise ModelLoadError(f"{self.meta.describe()}: the model file is empty")
        self._cls, self.backend = interpreter_backend()
        self.num_threads = num_threads
        self.max_pool = max_pool
        self._check = check_inputs
        # One lock guards the pool and the in-flight count; it is held only for a
        # few list operations, never across an invoke.
        self._cond = threading.Condition(threading.Lock())
        self._free: list[Any] = []
        self._created = 0
        self._in_flight = 0
        self._waiting = 0
        self._retired = False  # no new check-outs; set by close()
        self._closed = False  # interpreters released
        self._close_when_idle = False  # close() timed out: the last check-in releases
        self.warmed = False

        t0 = time.perf_counter()
        first = self._new_interpreter()
        ins, outs = first.get_input_details(), first.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise ModelLoadError(
                f"{self.meta.describe()} has {len(ins)} inputs and {len(outs)} outputs; "
                "edgefleet serves models with exactly one of each"
            )
        self.input_spec: TensorSpec = tensor_spec(ins[0])
        self.output_spec: TensorSpec = tensor_spec(outs[0])
        for role, spec in (("input", self.input_spec), ("output", self.output_spec)):
            if len(spec.shape) < 2 or spec.shape[0] != 1:
                raise ModelLoadError(
                    f"{self.meta.describe()} {role} shape {spec.shape} has no batch axis of 1; "
                    "edgefleet runs one sample per invoke"
                )
        self._in_index = int(ins[0]["index"])
        self._out_index = int(outs[0]["index"])
        self._in_shape = tuple(self.input_spec.shape)
        self._in_dtype = np.dtype(self.input_spec.dtype)
        self._out_shape = tuple(self.output_spec.shape)
        self._quant = self._quant_constants()
        self._free.append(first)
        self._created = 1
        for _ in range(pool_size - 1):
            self._free.append(self._new_interpreter())
            self._created += 1
        self.load_s = time.perf_counter() - t0
        log.info(
            "loaded %s: %d bytes, input %s%s, output %s%s, %d interpreters x %d threads, "
            "%.1f ms, backend %s",
            self.meta.describe(),
            len(self._content),
            self.input_spec.dtype,
            self.input_spec.shape,
            self.output_spec.dtype,
            self.output_spec.shape,
            pool_size,
            num_threads,
            self.load_s * 1e3,
            self.backend,
        )

    # -- pool ---------------------------------------------------------------
    def _new_interpreter(self) -> Any:
        try:
            interp = self._cls(model_content=self._content, num_threads=self.num_threads)
            interp.allocate_tensors()
        except Exception as e:  # the backend's ValueError/RuntimeError, or worse: all mean "no"
            raise ModelLoadError(
                f"{self.meta.describe()} cannot be loaded by {self.backend}: {_brief(e)}"
            ) from e
        return interp

    def _checkout(self) -> Any | None:
        """An interpreter for this thread alone, or ``None`` once the model is retired."""
        with self._cond:
            if self._retired:
                return None
            self._in_flight += 1
            if self._free:
                return self._free.pop()
            if self._created >= self.max_pool:
                self._waiting += 1
                try:
                    while not self._free:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                return self._free.pop()
            self._created += 1
        # More serving threads than interpreters: grow once, outside the lock so
        # other threads keep checking in and out meanwhile.
        log.debug("%s: growing interpreter pool to %d", self.meta.describe(), self._created)
        try:
            return self._new_interpreter()
        except BaseException:
            with self._cond:
                self._created -= 1
                self._in_flight -= 1
                self._cond.notify_all()
            raise

    def _checkin(self, interp: Any) -> None:
        with self._cond:
            self._free.append(interp)
            self._in_flight -= 1
            idle = self._in_flight == 0
            if self._waiting or (self._retired and idle):
                self._cond.notify_all()
            release = self._close_when_idle and idle
        if release:
            self._release()

    def _release(self) -> None:
        with self._cond:
            if self._closed:
                return
            interps, self._free = self._free, []
            self._closed = True
            self._close_when_idle = False
        del interps  # the last references: the interpreters and their arenas go here
        log.debug("closed %s", self.meta.describe())

    # -- inference ----------------------------------------------------------
    def _prepare(self, x: Array) -> Array:
        if not self._check:
            return x
        if not isinstance(x, np.ndarray):
            raise ValueError(f"input must be a numpy array, got {type(x).__name__}")
        if x.dtype != self._in_dtype:
            hint = ""
            if self.input_spec.scale is not None:
                hint = (
                    f" (quantize real values: q = round(x / {self.input_spec.scale:.6g}) + "
                    f"{self.input_spec.zero_point})"
                )
            raise ValueError(
                f"input dtype is {x.dtype}, {self.meta.describe()} expects {self._in_dtype}{hint}"
            )
        if x.shape != self._in_shape:
            if x.shape == self._in_shape[1:]:
                return x.reshape(self._in_shape)
            raise ValueError(
                f"input shape is {list(x.shape)}, {self.meta.describe()} expects "
                f"{list(self._in_shape)} (or {list(self._in_shape[1:])} without the "
                "batch axis)"
            )
        return x

    def _invoke(self, interp: Any, x: Array) -> Array:
        """One inference on an interpreter this thread has checked out (a seam for tests)."""
        interp.set_tensor(self._in_index, x)
        interp.invoke()
        out: Array = interp.get_tensor(self._out_index)  # a copy: the arena is reused next call
        return out

    def _try_run(self, x: Array) -> Array | None:
        """``run``, or ``None`` without doing anything if the model is retired."""
        x = self._prepare(x)
        interp = self._checkout()
        if interp is None:
            return None
        try:
            return self._invoke(interp, x)
        finally:
            self._checkin(interp)

    def run(self, x: Array) -> Array:
        """Run one sample; returns the output tensor as the model gives it (batch axis 1).

        ``x`` has the input's dtype and its full shape, or its shape without the
        batch axis. Raises ``ValueError`` for a wrong dtype or shape and
        ``RuntimeError`` once the model is closed.
        """
        out = self._try_run(x)
        if out is None:
            raise RuntimeError(f"{self.meta.describe()} is closed")
        return out

    def run_batch(self, xs: Array) -> Array:
        """Run samples one by one: ``(n, *sample)`` in, ``(n, *output sample)`` out.

        The layout of signed self-test vectors, so ``shared.selftest.check_outputs``
        takes the result as is.
        """
        sample = self._in_shape[1:]
        if self._check and (
            not isinstance(xs, np.ndarray) or xs.shape[1:] != sample or xs.dtype != self._in_dtype
        ):
            got = f"{xs.dtype}{list(xs.shape)}" if isinstance(xs, np.ndarray) else type(xs).__name__
            raise ValueError(
                f"batch is {got}, {self.meta.describe()} expects "
                f"{self._in_dtype}[n, {', '.join(map(str, sample))}]"
            )
        out = np.empty((len(xs), *self._out_shape[1:]), dtype=self.output_spec.dtype)
        interp = self._checkout()
        if interp is None:
            raise RuntimeError(f"{self.meta.describe()} is closed")
        try:
            for i in range(len(xs)):
                out[i] = self._invoke(interp, xs[i].reshape(self._in_shape))[0]
        finally:
            self._checkin(interp)
        return out

    def warmup(self, n: int = 1) -> float:
        """Invoke every idle interpreter ``n`` times on zeros; returns the seconds spent.

        The first invoke of an interpreter pays one-off costs (arena pages,
        kernel set-up: 14 us instead of 3 us for an 8x8 int8 CNN; nothing
        measurable for MobileNet, whose XNNPACK set-up happens at creation);
        doing it here keeps it off the request path. Later invokes cost the
        same as serving ones, so one is enough.
        """
        t0 = time.perf_counter()
        with self._cond:
            if self._retired:
                raise RuntimeError(f"{self.meta.describe()} is closed")
            batch, self._free = self._free, []
            self._in_flight += len(batch)
        zeros = np.zeros(self._in_shape, dtype=self._in_dtype)
        try:
            for interp in batch:
                for _ in range(n):
                    self._invoke(interp, zeros)
        finally:
            for interp in batch:
                self._checkin(interp)
        self.warmed = True
        return time.perf_counter() - t0

    # -- lifecycle ----------------------------------------------------------
    def close(self, timeout: float | None = None) -> bool:
        """Refuse new inferences, wait for running ones, then release the interpreters.

        Returns ``True`` if the model is closed on return. If ``timeout`` passes
        first, the last running inference closes it when it finishes; nothing is
        torn down under a running invoke either way.
        """
        with self._cond:
            self._retired = True
            idle = self._cond.wait_for(lambda: self._in_flight == 0, timeout)
            if not idle:
                self._close_when_idle = True
                # timeout=0 means "do not wait": only a real wait running out is news.
                log.log(
                    logging.WARNING if timeout else logging.DEBUG,
                    "%s: %d inferences still running after %.1f s; it closes when they finish",
                    self.meta.describe(),
                    self._in_flight,
                    timeout or 0.0,
                )
                return False
        self._release()
        return True

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """The interpreters are released (all inferences on it have finished)."""
        return self._closed

    @property
    def retired(self) -> bool:
        """``close`` was called: no new inference starts on this model."""
        return self._retired

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def interpreters(self) -> int:
        """Interpreters built so far (the pool grows up to ``max_pool`` on demand)."""
        return self._created

    @property
    def size_bytes(self) -> int:
        return len(self._content)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self._content).hexdigest()

    @cached_property
    def ops(self) -> frozenset[str] | None:
        """Op names the model uses (see ``model_ops``)."""
        return model_ops(self._content)

    def _quant_constants(self) -> tuple[np.float32, np.float32, np.float32, np.float32] | None:
        """``(scale, zero_point, lo, hi)`` as float32 for an integer input, else ``None``."""
        spec = self.input_spec
        if spec.scale is None or self._in_dtype.kind not in "iu":
            return None
        info = np.iinfo(self._in_dtype)
        return (
            np.float32(spec.scale),
            np.float32(spec.zero_point or 0),
            np.float32(info.min),
            np.float32(info.max),
        )

    def quantize(self, x: Array) -> Array:
        """Map a real-valued sample to this model's input tensor (adds the batch axis).

        Sensors give real values; the quantization is this model's own, so a
        caller never quantizes with the parameters of another model (the one
        that was current a moment ago, before a swap). Affine quantization
        ``q = clip(round(x / scale + zero_point))`` in float32; float inputs are cast.
        """
        arr = np.asarray(x, dtype=np.float32)
        if arr.shape == self._in_shape[1:]:
            arr = arr.reshape(self._in_shape)
        if self._quant is None:
            return arr.astype(self._in_dtype)
        # This runs on every inference. np.round/np.clip/np.iinfo cost ~5 us of
        # Python per call, more than a small int8 model's whole invoke (2 us for
        # the digits CNN), which made int8 slower than float32 end to end; the
        # same float32 steps as in-place ufuncs cost ~2 us (bench/quantize.py).
        scale, zero_point, lo, hi = self._quant
        q = np.divide(arr, scale)
        np.add(q, zero_point, out=q)
        np.rint(q, out=q)  # what np.round does for 0 decimals: half to even
        q.clip(lo, hi, out=q)
        out: Array = q.astype(self._in_dtype)
        return out

    def check_manifest(self, manifest: ReleaseManifest) -> None:
        """Raise ``ManifestError`` unless the model's input/output match its signed manifest."""
        for role, have, want in (
            ("input", self.input_spec, manifest.input),
            ("output", self.output_spec, manifest.output),
        ):
            same_q = (have.scale is None) == (want.scale is None) and (
                have.scale is None
                or (
                    np.isclose(have.scale, want.scale or 0.0, rtol=1e-6, atol=0.0)
                    and have.zero_point == want.zero_point
                )
            )
            if have.shape != want.shape or have.dtype != want.dtype or not same_q:
                raise ManifestError(
                    f"release {manifest.release}: the model's {role} is {have.dtype}{have.shape} "
                    f"(scale {have.scale}, zero point {have.zero_point}) but the manifest says "
                    f"{want.dtype}{want.shape} (scale {want.scale}, zero point {want.zero_point})"
                )
