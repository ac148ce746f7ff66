"""The drift monitor's statistics, its k-of-m rule, alerts and prediction drift,
on a SQLite file and a synthetic release (no broker, no clock: time is passed in)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud.db import Database
from cloud.drift_monitor import AlertInfo, DriftMonitor, DriftRule, k_of_m, score_window
from cloud.ingest import queries
from cloud.ingest.store import StoredWindow, TelemetryStore
from cloud.ingest.testing import FakeDevice, SyntheticRelease, publish_synthetic_release
from cloud.releases import ReleaseService
from cloud.retrain import estimate_shift
from cloud.tuf_repo import ReleaseRepository
from shared.drift import build_baseline, extract_features, histogram

WINDOW = 60.0
T0 = 1_800_000_000.0  # a bucket boundary (multiple of 60)


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = Database(f"sqlite:///{tmp_path / 'drift.db'}")
    db.create_all()
    repo = ReleaseRepository.open_or_init(tmp_path / "repo", tmp_path / "keys")
    rel = publish_synthetic_release(repo, n_features=8, bins=10, n_classes=4)
    monitor = DriftMonitor(db, ReleaseService(repo), window_seconds=WINDOW, rule=DriftRule())
    yield db, rel, monitor
    db.dispose()


def _fill(
    db: Database,
    rel: SyntheticRelease,
    bucket: int,
    *,
    shift: float = 0.0,
    probs: np.ndarray | None = None,
    devices: int = 2,
    group: str = "default",
) -> None:
    """Two devices' windows (300 samples each) received inside bucket ``bucket``."""
    store = TelemetryStore(db, worker="w0", bucket_seconds=WINDOW)
    windows = []
    for i in range(devices):
        dev = FakeDevice(f"{group}-{i}", release=rel, seed=bucket * 10 + i)
        dev.seq = bucket * 100
        at = T0 + bucket * WINDOW + 10 + i
        windows.append(
            StoredWindow(
                dev.telemetry(samples=300, shift=shift, at=at, class_probs=probs), at, group
            )
        )
    store.write_batch(windows)


def _tick(monitor: DriftMonitor, bucket: int) -> list[AlertInfo]:
    """Run the monitor just after ``bucket`` closed."""
    return monitor.tick(now=T0 + (bucket + 1) * WINDOW + monitor.grace + 1)


def test_identical_counts_score_zero_and_a_shift_scores_high() -> None:
    rng = np.random.default_rng(0)
    b = build_baseline(rng.normal(size=(20_000, 4)), 10)
    same = score_window(b, b.counts)
    assert same.psi_mean == pytest.approx(0.0) and same.samples == 20_000
    shifted = score_window(b, histogram(rng.normal(size=(500, 4)) + 0.5, b.edges))
    assert shifted.psi_mean is not None and shifted.psi_mean > 0.2
    assert shifted.input_exceeded(DriftRule()) is True
    few = score_window(b, histogram(rng.normal(size=(100, 4)) + 0.5, b.edges))
    assert few.input_exceeded(DriftRule()) is None  # too few samples to judge
    assert score_window(b, np.zeros((3, 10), dtype=np.int64)).samples == 0  # wrong shape


def test_k_of_m_rule() -> None:
    assert not k_of_m([True], 2, 3)
    assert k_of_m([True, False, True], 2, 3)
    assert not k_of_m([True, False, False, True], 2, 3)  # only the newest m count
    with pytest.raises(ValueError, match="k <= m"):
        DriftRule(k=4, m=3)


def test_one_noisy_window_does_not_alert_two_of_three_do(setup) -> None:  # type: ignore[no-untyped-def]
    db, rel, monitor = setup
    heard: list[AlertInfo] = []
    monitor.listeners.append(heard.append)
    for b in range(3):
        _fill(db, rel, b)
    _fill(db, rel, 3, shift=0.8)  # one odd window
    _fill(db, rel, 4)
    assert _tick(monitor, 4) == [] and heard == []
    _fill(db, rel, 5, shift=0.8)
    _fill(db, rel, 6, shift=0.8)
    opened = _tick(monitor, 6)
    assert [a.kind for a in opened] == ["input"] and heard == opened
    alert = opened[0]
    assert (alert.model, alert.release, alert.group) == ("synth", 1, "default")
    assert "mean PSI" in alert.message and alert.statistic > 0.2
    assert _tick(monitor, 6) == []  # evaluated once; no second alert while open
    for b in (7, 8, 9):
        _fill(db, rel, b)
    _tick(monitor, 9)
    assert [a["state"] for a in queries.alerts(db)] == ["resolved"]
    series = queries.drift_series(db, T0)
    assert len(series) == 10 and series[6]["input_exceeded"] is True
    assert series[6]["top_features"] and len(series[6]["top_features"]) == 5


def test_groups_are_judged_apart(setup) -> None:  # type: ignore[no-untyped-def]
    db, rel, monitor = setup
    for b in range(3):
        _fill(db, rel, b, group="north")
        _fill(db, rel, b, shift=1.0, group="south")
    opened = _tick(monitor, 2)
    assert [(a.kind, a.group) for a in opened] == [("input", "south")]


def test_prediction_drift_against_a_reference_learnt_in_burn_in(setup) -> None:  # type: ignore[no-untyped-def]
    db, rel, monitor = setup
    for b in range(3):  # burn-in: the release's first windows become the reference
        _fill(db, rel, b)
    assert _tick(monitor, 2) == []
    skewed = np.array([0.7, 0.1, 0.1, 0.1])
    for b in range(3, 5):
        _fill(db, rel, b, probs=skewed)  # inputs unchanged, predictions skewed
    opened = _tick(monitor, 4)
    assert [a.kind for a in opened] == ["prediction"]
    latest = queries.drift_latest(db, T0)[0]
    assert latest["pred_psi"] > 0.2 and latest["input_exceeded"] is False


def test_stale_alert_resolves_when_the_release_stops_reporting(setup) -> None:  # type: ignore[no-untyped-def]
    db, rel, monitor = setup
    for b in range(3):
        _fill(db, rel, b, shift=1.0)
    assert len(_tick(monitor, 2)) == 1
    monitor.tick(now=T0 + 30 * WINDOW)  # nothing reported for a long time
    assert queries.alerts(db, "open") == []


def test_estimate_shift_recovers_a_brightness_offset() -> None:
    rng = np.random.default_rng(3)
    calib = rng.uniform(0.1, 0.7, size=(400, 4, 4, 1)).astype(np.float32)
    feats = extract_features(calib, "flatten")
    b = build_baseline(feats, 10)
    live = np.clip(rng.uniform(0.1, 0.7, size=(2000, 4, 4, 1)) + 0.2, 0, 1)
    counts = histogram(extract_features(live, "flatten"), b.edges)
    assert estimate_shift(calib, counts, b.edges) == pytest.approx(0.2, abs=0.021)
