"""Test doubles for telemetry: a release with a synthetic drift baseline, and device
messages, for tests and benchmarks that need a fleet's telemetry without devices.

``publish_synthetic_release`` signs a release into a real TUF repository whose
model bytes are a placeholder (ingest and the drift monitor never load the
model); its baseline is built from standard-normal features, so
``FakeDevice.telemetry(shift=...)`` can produce windows with a known drift.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from cloud.tuf_repo import ReleaseRepository
from shared.drift import Baseline, build_baseline, histogram, pack_baseline, pack_counts
from shared.manifest import (
    BASELINE_FILE,
    SELFTEST_FILE,
    DriftSpec,
    ReleaseManifest,
    SelfTestSpec,
    TensorSpec,
    target_path,
)
from shared.messages import (
    HardwareInfo,
    LatencyStats,
    Reported,
    Status,
    Telemetry,
    UpdateState,
    encode,
)
from shared.topics import Channel, device_topic

__all__ = ["FakeDevice", "SyntheticRelease", "publish_synthetic_release"]


@dataclass(frozen=True)
class SyntheticRelease:
    manifest: ReleaseManifest
    baseline: Baseline
    #: Reference class probabilities the fake devices predict from.
    class_probs: np.ndarray


def publish_synthetic_release(
    repo: ReleaseRepository,
    *,
    model: str = "synth",
    release: int = 1,
    n_features: int = 8,
    bins: int = 10,
    n_classes: int = 4,
    reference_samples: int = 20_000,
    seed: int = 0,
) -> SyntheticRelease:
    """Sign a release whose drift baseline is ``n_features`` standard normals."""
    rng = np.random.default_rng(seed)
    baseline = build_baseline(rng.normal(size=(reference_samples, n_features)), bins)
    manifest = ReleaseManifest(
        model=model,
        release=release,
        created_at=time.time(),
        quantization="float32",
        input=TensorSpec(name="x", shape=[1, n_features], dtype="float32"),
        output=TensorSpec(name="y", shape=[1, n_classes], dtype="float32"),
        selftest=SelfTestSpec(target=target_path(model, release, SELFTEST_FILE), count=1, atol=0.0),
        drift=DriftSpec(
            target=target_path(model, release, BASELINE_FILE),
            features="flatten",
            n_features=n_features,
            bins=bins,
            n_classes=n_classes,
        ),
    )
    files = {
        manifest.model_target: f"placeholder model {model} {release}".encode(),
        target_path(model, release, SELFTEST_FILE): b"placeholder vectors",
        target_path(model, release, BASELINE_FILE): pack_baseline(baseline),
    }
    repo.publish(files, {manifest.model_target: manifest.to_custom()}, now=datetime.now(UTC))
    probs = np.full(n_classes, 1.0 / n_classes)
    return SyntheticRelease(manifest, baseline, probs)


@dataclass
class FakeDevice:
    """Makes one device's status, reported state and telemetry windows."""

    device_id: str
    release: SyntheticRelease | None = None
    group: str | None = None
    seed: int = 0
    seq: int = 0
    #: Input histograms packed, as current agents send them; ``False``: nested lists.
    packed: bool = True
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def topic(self, channel: Channel) -> str:
        return device_topic(self.device_id, channel)

    def status(self, online: bool = True) -> bytes:
        return encode(
            Status(device_id=self.device_id, online=online, agent_version="0.1.0", ts=time.time())
        )

    def reported(self) -> bytes:
        m = self.release.manifest if self.release else None
        tags = [f"group:{self.group}"] if self.group else []
        return encode(
            Reported(
                device_id=self.device_id,
                agent_version="0.1.0",
                model=m.model if m else None,
                release=m.release if m else None,
                slot="a" if m else None,
                state=UpdateState.IDLE,
                hardware=HardwareInfo(machine="x86_64", system="Linux", runtime="sim", tags=tags),
                ts=time.time(),
            )
        )

    def telemetry(
        self,
        *,
        samples: int = 500,
        shift: float = 0.0,
        inferences: int | None = None,
        errors: int = 0,
        latency_ms: float = 1.0,
        at: float | None = None,
        class_probs: np.ndarray | None = None,
    ) -> Telemetry:
        """The next window: ``samples`` inputs with every feature shifted by ``shift`` sigma."""
        self.seq += 1
        now = time.time() if at is None else at
        hist = out = packed = None
        model = release = None
        if self.release is not None:
            m, b = self.release.manifest, self.release.baseline
            model, release = m.model, m.release
            x = self.rng.normal(size=(samples, b.n_features)) + shift
            counts = histogram(x, b.edges)
            if self.packed:
                packed = pack_counts(counts)
            else:
                hist = counts.tolist()
            probs = self.release.class_probs if class_probs is None else class_probs
            out = self.rng.multinomial(samples, probs).tolist()
        lat = latency_ms * (1 + 0.1 * self.rng.random())
        return Telemetry(
            device_id=self.device_id,
            seq=self.seq,
            window_start=now - 1.0,
            window_end=now,
            model=model,
            release=release,
            inferences=samples if inferences is None else inferences,
            errors=errors,
            latency=LatencyStats(p50_ms=lat, p95_ms=1.5 * lat, p99_ms=2 * lat, max_ms=3 * lat),
            cpu_percent=12.5,
            rss_bytes=80 << 20,
            input_hist=hist,
            input_hist_packed=packed,
            output_hist=out,
        )
