"""Simulated sensors: model inputs with drift that can be switched at run time.

``DigitsSensor`` replays scikit-learn's bundled handwritten digits (no
download) as 8x8x1 images in [0, 1], optionally corrupted by a drift mode:

* ``noise``: additive Gaussian noise of standard deviation ``amount``;
* ``shift``: a brightness offset of ``amount`` (a mean shift);
* ``rotation``: rotation by ``amount`` degrees.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["DRIFT_MODES", "DigitsSensor", "Drift"]

DRIFT_MODES = ("none", "noise", "shift", "rotation")


@dataclass(frozen=True)
class Drift:
    mode: str = "none"
    amount: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in DRIFT_MODES:
            raise ValueError(f"unknown drift mode {self.mode!r}; use one of {DRIFT_MODES}")


def _load_digits() -> npt.NDArray[np.float32]:
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0
    return images[..., None]


class DigitsSensor:
    """A thread-safe input source for the device agent."""

    def __init__(self, seed: int = 0, drift: Drift | None = None) -> None:
        self._images = _load_digits()
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.drift = drift or Drift()

    def set_drift(self, drift: Drift) -> None:
        with self._lock:
            self.drift = drift

    def next(self, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
        with self._lock:
            x = self._images[self._rng.integers(len(self._images))].copy()
            drift = self.drift
            noise = (
                self._rng.normal(0.0, max(drift.amount, 0.0), size=x.shape)
                if drift.mode == "noise"
                else None
            )
        if drift.mode == "noise" and noise is not None:
            x = x + noise.astype(np.float32)
        elif drift.mode == "shift":
            x = x + np.float32(drift.amount)
        elif drift.mode == "rotation":
            from scipy.ndimage import rotate

            x = rotate(x, drift.amount, axes=(0, 1), reshape=False, order=1, mode="constant")
        x = np.clip(x, 0.0, 1.0).astype(np.float32)
        if x.shape != shape:
            raise ValueError(
                f"the model wants inputs of shape {shape}; this sensor makes {x.shape} digit images"
            )
        return x
