"""Probation: the health window a new model serves under before it is committed.

After a swap the new model serves real traffic while ``ProbationWindow``
counts its inferences, errors and latencies (only those it served itself).
``judge`` decides, from the window and the previous model's p99 latency:

* fail as soon as the error rate is over ``max_error_rate`` with at least
  ``min_inferences`` attempts (or ``max_errors_absolute`` errors, whatever the
  count: a model that errs on everything must not wait for the window);
* once ``duration_s`` has passed *and* ``min_inferences`` were served, fail
  if p99 latency is over ``max_latency_ratio`` times the previous model's p99
  plus ``latency_slack_ms`` (additive: on a busy CPU the p99 of a sub-millisecond
  model is scheduling jitter of a few milliseconds, not the model; a real
  regression of a model that takes tens of milliseconds still stands out),
  else pass;
* a device that serves too little to judge passes after ``max_duration_s``:
  the signed self-test already vouched for the outputs.

``LatencyRing`` keeps the serving model's recent latencies so that, at the
next swap, its p99 is the reference the successor is judged against.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np

__all__ = ["LatencyRing", "ProbationPolicy", "ProbationWindow", "Verdict", "judge"]

#: Latencies kept per window and per ring (older ones are overwritten).
MAX_LATENCIES = 4096
#: Fewest latency samples a p99 is computed from (fewer: no latency verdict).
MIN_LATENCY_SAMPLES = 50


@dataclass(frozen=True)
class ProbationPolicy:
    """When a new model has proven itself, and when it has failed."""

    duration_s: float = 10.0
    min_inferences: int = 100
    max_duration_s: float = 120.0
    max_error_rate: float = 0.01
    max_errors_absolute: int = 50
    max_latency_ratio: float = 3.0
    latency_slack_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.duration_s < 0 or self.max_duration_s < self.duration_s:
            raise ValueError("probation needs 0 <= duration_s <= max_duration_s")
        if self.min_inferences < 0 or not 0 <= self.max_error_rate <= 1:
            raise ValueError("probation needs min_inferences >= 0 and 0 <= max_error_rate <= 1")
        if self.max_latency_ratio < 1:
            raise ValueError("probation max_latency_ratio must be >= 1")


class Outcome(Enum):
    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    #: Reason code (``probation_errors``, ``probation_latency``) when failed.
    code: str = ""
    detail: str = ""


def _p99_ms(samples: list[float]) -> float | None:
    if len(samples) < MIN_LATENCY_SAMPLES:
        return None
    return float(np.percentile(np.asarray(samples), 99) * 1000.0)


class LatencyRing:
    """The most recent latencies of one model; thread-safe."""

    def __init__(self, capacity: int = MAX_LATENCIES) -> None:
        self._lock = threading.Lock()
        self._buf: list[float] = []
        self._pos = 0
        self._cap = capacity

    def add(self, latency_s: float) -> None:
        with self._lock:
            if len(self._buf) < self._cap:
                self._buf.append(latency_s)
            else:
                self._buf[self._pos] = latency_s
                self._pos = (self._pos + 1) % self._cap

    def p99_ms(self) -> float | None:
        with self._lock:
            samples = list(self._buf)
        return _p99_ms(samples)

    def clear(self) -> None:
        with self._lock:
            self._buf, self._pos = [], 0


class ProbationWindow:
    """Counts of the new model's own inferences since the swap; thread-safe."""

    def __init__(self, model: object, *, clock: Callable[[], float] = time.monotonic) -> None:
        #: The ``LoadedModel`` on probation: inferences by any other model are not counted.
        self.model = model
        self._clock = clock
        self.started = clock()
        self._lock = threading.Lock()
        self.inferences = 0
        self.errors = 0
        self._latencies = LatencyRing()

    def record(self, latency_s: float) -> None:
        with self._lock:
            self.inferences += 1
        self._latencies.add(latency_s)

    def record_error(self) -> None:
        with self._lock:
            self.errors += 1

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started

    def p99_ms(self) -> float | None:
        return self._latencies.p99_ms()


def judge(window: ProbationWindow, policy: ProbationPolicy, prev_p99_ms: float | None) -> Verdict:
    """The probation's verdict so far (see the module docstring)."""
    with window._lock:
        ok, errors = window.inferences, window.errors
    attempts = ok + errors
    rate = errors / attempts if attempts else 0.0
    if errors >= policy.max_errors_absolute or (
        attempts >= max(policy.min_inferences, 1) and rate > policy.max_error_rate
    ):
        return Verdict(
            Outcome.FAILED,
            "probation_errors",
            f"{errors} of {attempts} inferences failed ({rate:.1%}; allowed "
            f"{policy.max_error_rate:.1%})",
        )
    elapsed = window.elapsed
    if elapsed < policy.duration_s:
        return Verdict(Outcome.PENDING)
    if ok < policy.min_inferences:
        if elapsed < policy.max_duration_s:
            return Verdict(Outcome.PENDING)
        return Verdict(
            Outcome.PASSED,
            detail=f"only {ok} inferences in {elapsed:.0f} s: too few to judge, self-test stands",
        )
    p99 = window.p99_ms()
    if prev_p99_ms is not None and p99 is not None:
        limit = prev_p99_ms * policy.max_latency_ratio + policy.latency_slack_ms
        if p99 > limit:
            return Verdict(
                Outcome.FAILED,
                "probation_latency",
                f"p99 latency {p99:.2f} ms is over {policy.max_latency_ratio:g}x the previous "
                f"model's {prev_p99_ms:.2f} ms + {policy.latency_slack_ms:g} ms "
                f"(limit {limit:.2f} ms)",
            )
    lat = f", p99 {p99:.2f} ms" if p99 is not None else ""
    ref = f" (previous {prev_p99_ms:.2f} ms)" if prev_p99_ms is not None else ""
    return Verdict(
        Outcome.PASSED, detail=f"{ok} inferences, {errors} errors in {elapsed:.1f} s{lat}{ref}"
    )
