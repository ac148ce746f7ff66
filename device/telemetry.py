"""Telemetry windows: what the device tells the cloud about its inferences.

Inference threads call ``record`` (cheap: a lock, a few appends). Every
window the agent calls ``close_window`` which turns the window into a
``Telemetry`` message: counts, latency percentiles, process CPU and RSS,
per-feature input histograms on the release's drift bin edges and a
histogram of predicted classes. Raw inputs never leave the device: inputs are
sampled into a bounded buffer that only this module sees and histograms are
computed from it.

Windows that cannot be sent (link down) wait in a bounded buffer, the oldest
dropped first and counted; while windows wait, the buffer is also persisted
(``TelemetryBuffer.save``) so an offline device's windows survive a reboot.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from device.fsutil import atomic_write_json, read_json
from shared.drift import Baseline, extract_features, histogram, pack_counts
from shared.errors import StorageError
from shared.messages import LatencyStats, PackedCounts, Telemetry

__all__ = ["DriftContext", "ProcessStats", "TelemetryWindow", "TelemetryBuffer"]

log = logging.getLogger(__name__)

#: Inputs sampled per window for drift histograms (reservoir sampling).
MAX_SAMPLED_INPUTS = 512
#: Latencies kept per window for percentiles (reservoir sampling beyond this).
MAX_LATENCIES = 20_000
#: Telemetry windows kept while offline.
MAX_BUFFERED_WINDOWS = 256


@dataclass(frozen=True)
class DriftContext:
    """How to turn inputs into drift histograms for the running release."""

    baseline: Baseline
    features: str
    n_classes: int
    #: Maps a raw input sample to real values (dequantize) before feature extraction.
    to_real: Callable[[npt.NDArray[np.generic]], npt.NDArray[np.float64]]


class ProcessStats:
    """CPU percent since the last call, and resident memory, of this process."""

    def __init__(self) -> None:
        self._last_cpu = time.process_time()
        self._last_wall = time.monotonic()

    def sample(self) -> tuple[float, int]:
        cpu, wall = time.process_time(), time.monotonic()
        dt = max(wall - self._last_wall, 1e-9)
        pct = 100.0 * (cpu - self._last_cpu) / dt
        self._last_cpu, self._last_wall = cpu, wall
        return max(pct, 0.0), rss_bytes()


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class TelemetryWindow:
    """Accumulates one window of inference statistics; thread-safe."""

    def __init__(
        self, *, seed: int = 0, clock: Callable[[], float] = time.time, packed: bool = True
    ) -> None:
        """``packed``: send the input histogram as ``PackedCounts`` (clouds before it
        understood only nested lists: ``packed_histograms = false`` for those)."""
        self._lock = threading.Lock()
        self._packed = packed
        self._clock = clock
        self._rng = random.Random(seed)  # noqa: S311 - sampling, not security
        self._drift: DriftContext | None = None
        self._reset(clock())

    def _reset(self, start: float) -> None:
        self.start = start
        self.inferences = 0
        self.errors = 0
        self._latencies: list[float] = []
        self._inputs: list[npt.NDArray[np.generic]] = []
        self._classes: collections.Counter[int] = collections.Counter()

    def set_drift(self, ctx: DriftContext | None) -> None:
        with self._lock:
            self._drift = ctx
            self._inputs = []
            self._classes.clear()

    def record(
        self, latency_s: float, x: npt.NDArray[np.generic] | None, y: npt.NDArray[np.generic] | None
    ) -> None:
        """One successful inference: its latency, input and output."""
        with self._lock:
            self.inferences += 1
            n = self.inferences
            if len(self._latencies) < MAX_LATENCIES:
                self._latencies.append(latency_s)
            else:
                j = self._rng.randrange(n)
                if j < MAX_LATENCIES:
                    self._latencies[j] = latency_s
            if self._drift is None:
                return
            if x is not None:
                if len(self._inputs) < MAX_SAMPLED_INPUTS:
                    self._inputs.append(x)
                else:
                    j = self._rng.randrange(n)
                    if j < MAX_SAMPLED_INPUTS:
                        self._inputs[j] = x
            if y is not None and self._drift.n_classes > 0:
                self._classes[int(np.argmax(y))] += 1

    def record_error(self) -> None:
        with self._lock:
            self.errors += 1

    def close(
        self,
        *,
        device_id: str,
        seq: int,
        model: str | None,
        release: int | None,
        stats: ProcessStats | None,
    ) -> Telemetry:
        """Turn the current window into a message and start a new window."""
        now = self._clock()
        with self._lock:
            start, inferences, errors = self.start, self.inferences, self.errors
            lat, inputs, classes, drift = self._latencies, self._inputs, self._classes, self._drift
            self._reset(now)
        latency = None
        if lat:
            ms = np.asarray(lat) * 1000.0
            p50, p95, p99 = np.percentile(ms, [50, 95, 99])
            latency = LatencyStats(
                p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99), max_ms=float(ms.max())
            )
        input_hist = output_hist = None
        packed: PackedCounts | None = None
        if drift is not None:
            if inputs:
                real = np.stack([drift.to_real(x) for x in inputs])
                feats = extract_features(real, drift.features)
                if feats.shape[1] == drift.baseline.n_features:
                    counts = histogram(feats, drift.baseline.edges)
                    if self._packed:
                        packed = pack_counts(counts)
                    else:
                        input_hist = counts.tolist()
                else:
                    log.warning(
                        "input features %d do not match baseline %d",
                        feats.shape[1],
                        drift.baseline.n_features,
                    )
            if drift.n_classes > 0:
                output_hist = [classes.get(i, 0) for i in range(drift.n_classes)]
        cpu, rss = stats.sample() if stats is not None else (None, None)
        return Telemetry(
            device_id=device_id,
            seq=seq,
            window_start=start,
            window_end=max(now, start),
            model=model,
            release=release,
            inferences=inferences,
            errors=errors,
            latency=latency,
            cpu_percent=cpu,
            rss_bytes=rss,
            input_hist=input_hist,
            input_hist_packed=packed,
            output_hist=output_hist,
        )


class TelemetryBuffer:
    """Windows waiting for the link; bounded, oldest dropped first."""

    def __init__(self, maxlen: int = MAX_BUFFERED_WINDOWS) -> None:
        self._q: collections.deque[Telemetry] = collections.deque()
        self._maxlen = maxlen
        self.dropped = 0
        self._lock = threading.Lock()

    def push(self, msg: Telemetry) -> None:
        with self._lock:
            if len(self._q) >= self._maxlen:
                self._q.popleft()
                self.dropped += 1
            self._q.append(msg)

    def drain(self, send: Callable[[Telemetry], bool]) -> int:
        """Send buffered windows in order until ``send`` returns False."""
        sent = 0
        while True:
            with self._lock:
                if not self._q:
                    return sent
                msg = self._q[0]
            if not send(msg):
                return sent
            with self._lock:
                if self._q and self._q[0] is msg:
                    self._q.popleft()
            sent += 1

    def __len__(self) -> int:
        return len(self._q)

    def save(self, path: Path) -> None:
        """Persist the waiting windows (atomically), or remove the file when none wait.

        Called after each drain: it writes only while the link is down, so windows
        survive a reboot of an offline device; at most ``maxlen`` are kept."""
        with self._lock:
            pending = [m.model_dump(mode="json", by_alias=True) for m in self._q]
        try:
            if pending:
                atomic_write_json(path, {"dropped": self.dropped, "windows": pending})
            elif path.exists():
                path.unlink()
        except (StorageError, OSError) as e:
            log.warning("cannot persist %d telemetry windows: %s", len(pending), e)

    def load(self, path: Path) -> int:
        """Queue windows a previous run persisted; returns how many (bad entries skipped)."""
        if not path.exists():
            return 0
        try:
            raw = read_json(path)
            windows = list(raw.get("windows", []))[-self._maxlen :]
            self.dropped += int(raw.get("dropped", 0))
        except (StorageError, AttributeError, TypeError, ValueError) as e:
            log.warning("discarding unreadable telemetry buffer %s: %s", path, e)
            return 0
        n = 0
        for w in windows:
            try:
                self.push(Telemetry.model_validate(w))
                n += 1
            except ValueError:
                continue
        return n
