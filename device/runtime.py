"""The device model runtime: LiteRT models served from many threads, with a zero-drop hot swap.

``LoadedModel`` (in ``device._model``, re-exported here) is one verified
``.tflite`` model, built, allocated and warmed before it serves: each owns a
pool of interpreters so that no interpreter ever runs two invokes at once.

``ModelServer`` holds the model that answers ``infer``. ``swap`` switches one
reference; the new model was fully built and warmed before, off the request
path. The old model, once replaced, refuses new inferences and is closed (its
interpreters released) only when the last inference running on it has
finished. ``infer`` never takes the swap lock; a caller that read the old
reference just as it was retired retries on the new one.

Backend discovery and op support live in ``device._litert`` (re-exported).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from device._litert import interpreter_backend, model_ops, supported_builtin_ops
from device._model import DEFAULT_POOL_SIZE, LoadedModel, ModelMeta
from shared.errors import EdgefleetError

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_LATENCY_CAPACITY",
    "DEFAULT_POOL_SIZE",
    "LoadedModel",
    "ModelMeta",
    "ModelServer",
    "NoModelError",
    "SwapReport",
    "WindowStats",
    "interpreter_backend",
    "model_ops",
    "supported_builtin_ops",
]

log = logging.getLogger(__name__)

#: Latencies kept between two telemetry windows; older ones are overwritten.
DEFAULT_LATENCY_CAPACITY = 8192
#: How long ``swap`` waits for inferences on the old model before leaving its
#: release to the last one of them.
DEFAULT_DRAIN_TIMEOUT = 5.0

Array = npt.NDArray[Any]


class NoModelError(EdgefleetError):
    """``infer`` was called while no model is loaded (before the first swap, after close)."""

    code = "no_model"


@dataclass(frozen=True)
class SwapReport:
    """What one ``ModelServer.swap`` did and how long each part took."""

    old: ModelMeta | None
    new: ModelMeta
    #: Time the reference switch held the swap lock (``infer`` never waits on it).
    pause_s: float
    #: Warm-up done by ``swap`` itself (0 if the model came warmed).
    warmup_s: float
    #: Wait for inferences still running on the old model.
    drain_s: float
    #: The old model was closed before ``swap`` returned (else its last inference closes it).
    drained: bool


@dataclass(frozen=True)
class WindowStats:
    """Counters and latencies of one telemetry window."""

    inferences: int
    errors: int
    swaps: int
    duration_s: float
    #: Seconds per successful inference, oldest first; the most recent
    #: ``DEFAULT_LATENCY_CAPACITY`` (or the server's capacity) at most.
    latencies_s: npt.NDArray[np.float64] = field(repr=False)

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile latency in seconds; NaN for an empty window."""
        if not len(self.latencies_s):
            return float("nan")
        return float(np.percentile(self.latencies_s, q))


class ModelServer:
    """Serves ``infer`` from many threads and swaps models under them without a drop.

    The server owns every model handed to ``swap`` and closes each one once it
    is replaced and drained. ``NoModelError`` until the first swap.
    """

    def __init__(
        self,
        *,
        latency_capacity: int = DEFAULT_LATENCY_CAPACITY,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        if latency_capacity < 1:
            raise ValueError("latency_capacity must be >= 1")
        self.drain_timeout = drain_timeout
        self._current: LoadedModel | None = None
        self._swap_lock = threading.Lock()
        # Counters and the latency ring share one lock, taken once per inference.
        self._stats_lock = threading.Lock()
        self._inferences = self._errors = self._swaps = 0
        self._w_inferences = self._w_errors = self._w_swaps = 0
        self._w_start = time.perf_counter()
        self._ring = [0.0] * latency_capacity
        self._ring_pos = 0
        self._ring_len = 0

    @property
    def current(self) -> LoadedModel | None:
        """The model serving now (its ``meta`` says which release and slot)."""
        return self._current

    def infer(self, x: Array) -> Array:
        """Run one sample on the current model (see ``LoadedModel.run``).

        Raises ``NoModelError`` if no model is loaded; input errors
        (``ValueError``) and interpreter failures propagate and count as errors.
        """
        return self._serve(x, real=False)[0]

    def infer_real(self, x: Array) -> tuple[Array, LoadedModel]:
        """Run one *real-valued* sample; returns the output and the model that served it.

        The serving model quantizes ``x`` with its own input quantization
        (``LoadedModel.quantize``), after it was picked: an inference racing a
        swap to a model with other input parameters is never fed with the old
        model's. Errors as ``infer``.
        """
        return self._serve(x, real=True)

    def _serve(self, x: Array, *, real: bool) -> tuple[Array, LoadedModel]:
        t0 = time.perf_counter()
        try:
            while True:
                model = self._current
                if model is None:
                    raise NoModelError("no model is loaded (none swapped in yet, or server closed)")
                out = model._try_run(model.quantize(x) if real else x)
                if out is not None:
                    break
                # ``model`` was retired between reading it and checking out: a swap
                # already published its successor, so go again on that one.
                if model is self._current:
                    raise NoModelError(f"{model.meta.describe()} was closed while current")
        except NoModelError:
            raise
        except Exception:
            with self._stats_lock:
                self._errors += 1
                self._w_errors += 1
            raise
        latency = time.perf_counter() - t0
        with self._stats_lock:
            self._inferences += 1
            self._w_inferences += 1
            self._ring[self._ring_pos] = latency
            self._ring_pos = (self._ring_pos + 1) % len(self._ring)
            self._ring_len += 1
        return out, model

    def swap(
        self,
        new: LoadedModel,
        *,
        warmup: int = 1,
        drain_timeout: float | None = None,
        retire_old: bool = True,
    ) -> SwapReport:
        """Make ``new`` the current model; drain and close the one it replaces.

        ``new`` is warmed here first (``warmup`` invokes per interpreter) unless
        it already was. Only the reference switch is serialized: inferences that
        started on the old model finish on it, new ones run on ``new``. Returns
        once the old model is closed or ``drain_timeout`` passed (then its last
        inference closes it).

        ``retire_old=False`` hands the replaced model back to the caller instead:
        it stays loaded and warm (a probation keeps it for an instant rollback,
        ``swap`` it back in) and the caller closes it when done with it.
        """
        if new.retired:
            raise ValueError(f"{new.meta.describe()} is closed and cannot be swapped in")
        warm_s = 0.0
        if not new.warmed and warmup > 0:
            warm_s = new.warmup(warmup)
        with self._swap_lock:  # serializes swappers only; infer() never takes it
            if new is self._current:
                raise ValueError(f"{new.meta.describe()} is already the current model")
            t0 = time.perf_counter()
            old, self._current = self._current, new
            pause = time.perf_counter() - t0
        with self._stats_lock:
            self._swaps += 1
            self._w_swaps += 1
        t1 = time.perf_counter()
        drained = (
            old.close(self.drain_timeout if drain_timeout is None else drain_timeout)
            if old is not None and retire_old
            else old is None
        )
        drain = time.perf_counter() - t1
        log.info(
            "swapped %s -> %s: pause %.1f us, warm-up %.1f ms, drain %.1f ms%s",
            old.meta.describe() if old else "nothing",
            new.meta.describe(),
            pause * 1e6,
            warm_s * 1e3,
            drain * 1e3,
            "" if drained else (" (still draining)" if retire_old else " (old kept loaded)"),
        )
        return SwapReport(
            old=old.meta if old else None,
            new=new.meta,
            pause_s=pause,
            warmup_s=warm_s,
            drain_s=drain,
            drained=drained,
        )

    def close(self, timeout: float | None = None) -> None:
        """Unload: ``infer`` raises ``NoModelError`` from now on; the model drains and closes."""
        with self._swap_lock:
            old, self._current = self._current, None
        if old is not None:
            old.close(self.drain_timeout if timeout is None else timeout)

    # -- counters -----------------------------------------------------------
    @property
    def inferences(self) -> int:
        """Successful inferences since start."""
        return self._inferences

    @property
    def errors(self) -> int:
        """Failed inferences since start (``NoModelError`` is not counted: no model to blame)."""
        return self._errors

    @property
    def swaps(self) -> int:
        return self._swaps

    def window(self, reset: bool = True) -> WindowStats:
        """Counters and latencies since the last reset; ``reset`` starts a new window."""
        now = time.perf_counter()
        with self._stats_lock:
            n = min(self._ring_len, len(self._ring))
            end = self._ring_pos
            lat = (
                self._ring[end - n : end] if n <= end else self._ring[end - n :] + self._ring[:end]
            )
            stats = WindowStats(
                inferences=self._w_inferences,
                errors=self._w_errors,
                swaps=self._w_swaps,
                duration_s=now - self._w_start,
                latencies_s=np.array(lat, dtype=np.float64),
            )
            if reset:
                self._w_inferences = self._w_errors = self._w_swaps = 0
                self._ring_len = 0
                self._w_start = now
        return stats
