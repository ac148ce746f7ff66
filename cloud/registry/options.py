"""Build options of a registry candidate: the mode, the gate and the bounds on work.

Stored as JSON on the candidate (``to_json``) so a build can be redone exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cloud.pipeline.artifacts import DEFAULT_DRIFT_BINS, DEFAULT_SELFTEST_COUNT
from cloud.pipeline.convert import DEFAULT_MAX_CALIBRATION_SAMPLES
from cloud.pipeline.gate import GateConfig
from shared.errors import ConfigError
from shared.manifest import QUANTIZATION_MODES

__all__ = ["QuantizeOptions"]

_MAX_LABELS = 1024
#: Upper bound on calibration samples a request may ask for.
MAX_CALIBRATION_SAMPLES = 100_000


@dataclass(frozen=True)
class QuantizeOptions:
    """How to build a candidate: the mode, the gate and the bounds on work."""

    mode: str = "int8"
    gate: GateConfig = field(default_factory=GateConfig)
    fallback: bool = True
    seed: int = 0
    labels: tuple[str, ...] | None = None
    max_calibration_samples: int = DEFAULT_MAX_CALIBRATION_SAMPLES
    selftest_count: int = DEFAULT_SELFTEST_COUNT
    drift_bins: int = DEFAULT_DRIFT_BINS

    def check(self) -> None:
        """Raise ``ConfigError`` for values no build could use."""
        if self.mode not in QUANTIZATION_MODES:
            raise ConfigError(
                f"unknown quantization mode {self.mode!r}; choose from {list(QUANTIZATION_MODES)}"
            )
        if not 1 <= self.max_calibration_samples <= MAX_CALIBRATION_SAMPLES:
            raise ConfigError(f"max_calibration_samples must be 1..{MAX_CALIBRATION_SAMPLES}")
        if self.labels is not None and not 1 <= len(self.labels) <= _MAX_LABELS:
            raise ConfigError(f"give 1..{_MAX_LABELS} labels")
        if not 0 <= self.seed < 2**32:
            raise ConfigError("seed must be in 0..2**32-1")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["labels"] = None if self.labels is None else list(self.labels)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantizeOptions:
        data = dict(data)
        data["gate"] = GateConfig(**data["gate"])
        data["labels"] = None if data.get("labels") is None else tuple(data["labels"])
        return cls(**data)
