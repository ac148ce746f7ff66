"""Input sources: where a device's inference inputs come from.

On a real device the application feeds its own sensor data; for a device that
runs unattended for testing, ``RandomSource`` and ``NpzReplaySource`` produce
inputs. Sources return *real-valued* samples (the model's float domain, without
the batch axis); the agent quantizes them for whichever model serves.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError

__all__ = ["InputSource", "NpzReplaySource", "RandomSource"]


class InputSource(Protocol):
    """Produces one real-valued input sample of the given shape (no batch axis)."""

    def next(self, shape: tuple[int, ...]) -> npt.NDArray[np.float32]: ...


class RandomSource:
    """Uniform noise in ``[low, high)``: keeps a device busy without data."""

    def __init__(self, low: float = 0.0, high: float = 1.0, seed: int = 0) -> None:
        self.low, self.high = low, high
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # Generator is not thread-safe

    def next(self, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
        with self._lock:
            return self._rng.uniform(self.low, self.high, size=shape).astype(np.float32)


class NpzReplaySource:
    """Replays samples (array ``x``) from an ``.npz`` file, round robin."""

    def __init__(self, path: Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as npz:
                self._x = np.asarray(npz["x"], dtype=np.float32)
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"cannot read input samples from {path}: {e}") from e
        if len(self._x) == 0:
            raise ConfigError(f"{path} holds no samples")
        self._i = 0
        self._lock = threading.Lock()

    def next(self, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
        with self._lock:
            x = self._x[self._i % len(self._x)]
            self._i += 1
        if x.shape != shape:
            x = x.reshape(shape)
        return np.asarray(x, dtype=np.float32)
