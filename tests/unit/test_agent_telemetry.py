"""Telemetry windows and the offline buffer (pure: no broker, no model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device.telemetry import DriftContext, TelemetryBuffer, TelemetryWindow
from shared.drift import build_baseline, extract_features
from shared.messages import Telemetry


def window(seq: int) -> Telemetry:
    return Telemetry(
        device_id="dev-t", seq=seq, window_start=1.0, window_end=2.0, inferences=seq, errors=0
    )


def test_offline_buffer_is_bounded_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "telemetry-buffer.json"
    buf = TelemetryBuffer(maxlen=2)
    for seq in (1, 2, 3):
        buf.push(window(seq))
    assert buf.drain(lambda m: False) == 0  # link down
    buf.save(path)
    again = TelemetryBuffer(maxlen=2)
    assert again.load(path) == 2 and again.dropped == 1
    sent: list[int] = []
    assert again.drain(lambda m: sent.append(m.seq) is None) == 2
    assert sent == [2, 3]
    again.save(path)
    assert not path.exists(), "nothing waits: nothing persisted"


def test_corrupt_buffer_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "telemetry-buffer.json"
    path.write_bytes(b"{not json")
    assert TelemetryBuffer().load(path) == 0


def _window(real: np.ndarray, bins: int, n_classes: int, packed: bool = True) -> TelemetryWindow:
    """A window whose drift baseline is ``real``'s own distribution."""
    w = TelemetryWindow(clock=lambda: 10.0, packed=packed)
    w.set_drift(
        DriftContext(
            baseline=build_baseline(extract_features(real, "flatten"), bins),
            features="flatten",
            n_classes=n_classes,
            to_real=lambda x: np.asarray(x, dtype=np.float64),
        )
    )
    return w


def test_window_histograms_real_inputs_on_the_baseline_edges() -> None:
    rng = np.random.default_rng(0)
    real = rng.random((500, 4, 4, 1))
    w = _window(real, bins=8, n_classes=3)
    for i in range(300):
        w.record(0.001 * (1 + i % 3), real[i], np.eye(3)[i % 3])
    w.record_error()
    msg = w.close(device_id="dev-t", seq=1, model="m", release=1, stats=None)
    assert msg.inferences == 300 and msg.errors == 1
    assert msg.latency is not None and msg.latency.p50_ms == 2.0
    # Packed by default, a byte per count: no bin of 8 gets 256 of the 300 samples.
    assert msg.input_hist is None and msg.input_hist_packed is not None
    assert msg.input_hist_packed.dtype == "u1"
    rows = msg.input_rows()
    assert rows is not None and len(rows) == 16
    assert all(sum(row) == 300 for row in rows)
    # Same distribution as the baseline: every bin is populated.
    assert min(min(row) for row in rows) > 0
    assert msg.output_hist == [100, 100, 100]
    assert "x" not in msg.model_dump() and len(msg.model_dump_json()) < 5000


def test_unpacked_window_sends_the_same_counts_as_lists() -> None:
    """``packed_histograms = false`` (a cloud older than the packed form) changes the
    encoding only."""
    rng = np.random.default_rng(1)
    real = rng.random((400, 2, 2, 1))
    msgs = []
    for packed in (True, False):
        w = _window(real, bins=4, n_classes=2, packed=packed)
        for i in range(400):
            w.record(0.001, real[i], np.eye(2)[i % 2])
        msgs.append(w.close(device_id="dev-t", seq=1, model="m", release=1, stats=None))
    packed_msg, lists_msg = msgs
    assert lists_msg.input_hist_packed is None and lists_msg.input_hist is not None
    assert packed_msg.input_hist is None and packed_msg.input_hist_packed is not None
    assert packed_msg.input_rows() == lists_msg.input_hist
    assert sum(lists_msg.input_hist[0]) == 400
