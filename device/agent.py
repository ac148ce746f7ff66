"""The device agent: serve inferences, reconcile the desired release, report.

Threads:

* inference workers: take inputs from the source and run the current model,
  continuously, whatever else happens;
* the updater: when the retained desired state names a release this device
  does not run, it walks the update state machine (offered, downloading,
  verified, staged, selftest, swapped, committed), publishing an event and a
  ``reported`` state at each step and persisting the step first;
* telemetry: closes a statistics window every ``telemetry_interval``.

A release that fails verification or its self-test is remembered as rejected
and never retried; a failed transfer is retried with backoff. Whatever goes
wrong, the running model keeps serving.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device import __version__
from device.fsutil import atomic_write_json, read_json
from device.inputs import InputSource
from device.mqtt_session import MqttSession, TlsSettings
from device.runtime import LoadedModel, ModelServer, NoModelError, interpreter_backend
from device.store import SlotContents, SlotStore, StoreState
from device.telemetry import DriftContext, ProcessStats, TelemetryBuffer, TelemetryWindow
from device.tuf_client import ReleaseClient
from shared.drift import unpack_baseline
from shared.errors import EdgefleetError, ReleaseError, StorageError, TransferError
from shared.manifest import ReleaseManifest, TensorSpec, check_compatible
from shared.messages import (
    Desired,
    ErrorInfo,
    Event,
    EventKind,
    HardwareInfo,
    Reported,
    UpdateState,
)
from shared.selftest import check_outputs, unpack_vectors

__all__ = ["Agent", "AgentConfig", "quantize_input"]

log = logging.getLogger(__name__)

#: Rejected releases remembered (so a bad release is not retried forever).
MAX_REJECTED = 64


@dataclass
class AgentConfig:
    """Everything one agent needs; see ``device.config`` for the file form."""

    device_id: str
    data_dir: Path
    broker_host: str
    broker_port: int
    repo_url: str
    inference_threads: int = 1
    inference_interval: float = 0.0
    telemetry_interval: float = 10.0
    interpreter_threads: int = 1
    hardware_tags: list[str] = field(default_factory=list)
    tls: TlsSettings | None = None
    retry_min: float = 1.0
    retry_max: float = 60.0

    @property
    def root_path(self) -> Path:
        return self.data_dir / "trust" / "root.json"


def quantize_input(x: npt.NDArray[np.floating[Any]], spec: TensorSpec) -> npt.NDArray[Any]:
    """Map a real-valued sample to the model's input tensor (adds the batch axis)."""
    batch = np.asarray(x, dtype=np.float32)[None, ...]
    dtype = np.dtype(spec.dtype)
    if spec.scale is None or dtype.kind == "f":
        return batch.astype(dtype)
    info = np.iinfo(dtype)
    q = np.round(batch / spec.scale + float(spec.zero_point or 0))
    return np.clip(q, info.min, info.max).astype(dtype)


class Agent:
    """One device's agent. ``start()`` returns at once; ``stop()`` shuts down cleanly."""

    def __init__(self, cfg: AgentConfig, source: InputSource, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.source = source
        self.clock = clock
        self.store = SlotStore(cfg.data_dir)
        self.server = ModelServer()
        self.window = TelemetryWindow(clock=clock)
        self.buffer = TelemetryBuffer()
        self._stats = ProcessStats()
        self._journal_path = cfg.data_dir / "update.json"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._desired: Desired | None = None
        self._running: SlotContents | None = None
        self._state = UpdateState.IDLE
        self._target: Desired | None = None
        self._last_error: ErrorInfo | None = None
        self._event_seq = 0
        self._telemetry_seq = 0
        # "<model>/<release>" -> issued_at of the desired state it failed under.
        # A re-issued desired state (operator deploys again) retries; the same
        # retained message redelivered on reconnect or reboot does not.
        self._rejected: dict[str, float] = {}
        self._threads: list[threading.Thread] = []
        backend, self.runtime_name = interpreter_backend()
        self.hardware = HardwareInfo(machine=platform.machine()[:64], system=platform.system()[:64],
                                     runtime=self.runtime_name[:128], tags=cfg.hardware_tags)
        self.session = MqttSession(cfg.device_id, cfg.broker_host, cfg.broker_port,
                                   agent_version=__version__, on_desired=self._on_desired,
                                   tls=cfg.tls, clock=clock)

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self._load_journal()
        self._boot()
        self.session.start()
        specs: list[tuple[str, Callable[..., None], tuple[Any, ...]]] = [
            (f"infer-{i}", self._inference_loop, (i,)) for i in range(self.cfg.inference_threads)
        ]
        specs += [("updater", self._update_loop, ()), ("telemetry", self._telemetry_loop, ())]
        for name, target, args in specs:
            t = threading.Thread(target=target, args=args, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._report()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=10)
        self._flush_telemetry()
        self.session.stop()
        self.server.close()

    def wait(self) -> None:
        """Block until ``stop()`` is called from another thread or a signal handler."""
        while not self._stop.wait(0.5):
            pass

    # -- boot --------------------------------------------------------------
    def _boot(self) -> None:
        """Serve the active slot, else the previous one; never start without trying both."""
        state = self.store.state()
        for slot in (state.active, state.previous):
            if slot is None:
                continue
            contents = self.store.read(slot)
            if contents is None:
                continue
            try:
                model = self._load_and_test(contents)
            except EdgefleetError as e:
                log.error("slot %s does not serve (%s); trying the other", slot, e)
                self._last_error = ErrorInfo(code=e.code, message=str(e)[:1000])
                continue
            self._install(contents, model)
            if slot != state.active:
                self.store.set_state(StoreState(active=slot, previous=None))
            log.info("serving release %s from slot %s", contents.manifest.release, slot)
            return
        log.warning("no valid model on disk; waiting for a release")

    def _load_journal(self) -> None:
        if not self._journal_path.exists():
            return
        try:
            raw = read_json(self._journal_path)
            self._rejected = {str(k): float(v) for k, v in dict(raw.get("rejected", {})).items()}
            self._event_seq = int(raw.get("event_seq", 0))
            self._telemetry_seq = int(raw.get("telemetry_seq", 0))
        except (StorageError, AttributeError, TypeError, ValueError) as e:
            log.error("update journal unreadable (%s); starting a new one", e)

    def _save_journal(self) -> None:
        with self._lock:
            data = {"state": self._state.value,
                    "target": self._target.model_dump(mode="json", by_alias=True)
                    if self._target else None,
                    "rejected": dict(list(self._rejected.items())[-MAX_REJECTED:]),
                    "event_seq": self._event_seq, "telemetry_seq": self._telemetry_seq}
        try:
            atomic_write_json(self._journal_path, data)
        except StorageError as e:
            log.error("cannot persist update journal: %s", e)

    # -- model handling --------------------------------------------------
    def _load_and_test(self, contents: SlotContents) -> LoadedModel:
        manifest = contents.manifest
        model = LoadedModel(contents.model_path.read_bytes(),
                            num_threads=self.cfg.interpreter_threads)
        try:
            inputs, expected = unpack_vectors(contents.selftest_path.read_bytes(), manifest)
            actual = model.run_batch(inputs)
            report = check_outputs(actual, expected, manifest)
            log.info("self-test passed: %s", report.describe())
            model.warmup(3)
        except BaseException:
            model.close()
            raise
        return model

    def _install(self, contents: SlotContents, model: LoadedModel) -> None:
        drift = None
        manifest = contents.manifest
        if manifest.drift is not None and contents.baseline_path is not None:
            try:
                baseline = unpack_baseline(contents.baseline_path.read_bytes(), manifest.drift)
                drift = DriftContext(baseline=baseline, features=manifest.drift.features,
                                     n_classes=manifest.drift.n_classes,
                                     to_real=lambda x: np.asarray(x, dtype=np.float64))
            except EdgefleetError as e:
                log.warning("drift baseline unusable: %s", e)
        self.server.swap(model)
        with self._lock:
            self._running = contents
        self.window.set_drift(drift)

    # -- inference ---------------------------------------------------------
    def _inference_loop(self, index: int) -> None:
        interval = self.cfg.inference_interval
        while not self._stop.is_set():
            running = self._running
            if running is None:
                self._stop.wait(0.1)
                continue
            spec = running.manifest.input
            x = self.source.next(tuple(spec.shape[1:]))
            t0 = time.perf_counter()
            try:
                y = self.server.infer(quantize_input(x, spec))
            except NoModelError:
                self._stop.wait(0.05)
                continue
            except Exception:
                log.exception("inference failed")
                self.window.record_error()
            else:
                self.window.record(time.perf_counter() - t0, x, y)
            if interval > 0:
                self._stop.wait(interval)

    # -- desired state ---------------------------------------------------
    def _on_desired(self, desired: Desired) -> None:
        with self._lock:
            self._desired = desired
        self._wake.set()

    def _needs_update(self) -> Desired | None:
        with self._lock:
            desired, running = self._desired, self._running
        if desired is None:
            return None
        if running is not None and (running.manifest.model, running.manifest.release) == (
                desired.model, desired.release):
            return None
        if self._rejected.get(f"{desired.model}/{desired.release}") == desired.issued_at:
            return None
        return desired

    def _update_loop(self) -> None:
        delay = self.cfg.retry_min
        while not self._stop.is_set():
            self._wake.wait(timeout=delay if self._state == UpdateState.FAILED else 5.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            desired = self._needs_update()
            if desired is None:
                continue
            try:
                self._apply(desired)
                delay = self.cfg.retry_min
            except TransferError as e:
                self._fail(desired, e, reject=False)
                delay = min(delay * 2, self.cfg.retry_max)
            except ReleaseError as e:
                self._fail(desired, e, reject=True)
            except EdgefleetError as e:  # storage, config: retry later
                self._fail(desired, e, reject=False)
                delay = min(delay * 2, self.cfg.retry_max)
            except Exception as e:  # a bug must not kill the updater
                log.exception("update failed unexpectedly")
                self._fail(desired, EdgefleetError(f"internal error: {e}"), reject=False)
                delay = min(delay * 2, self.cfg.retry_max)

    def _apply(self, desired: Desired) -> None:
        running = self._running
        if running is not None and running.manifest.model == desired.model and \
                desired.release < running.manifest.release:
            raise _Downgrade(f"release {desired.release} is older than the running release "
                             f"{running.manifest.release}; versions only go up")
        self._step(desired, UpdateState.OFFERED, EventKind.OFFERED)
        self._step(desired, UpdateState.DOWNLOADING, EventKind.DOWNLOADING, progress=0.0)
        staging = self.cfg.data_dir / "download"
        client = ReleaseClient(self.cfg.data_dir / "tuf", self.cfg.root_path.read_bytes(),
                               self.cfg.repo_url)
        verified = client.fetch_release(desired.model, desired.release, staging)
        manifest = verified.manifest
        check_compatible(manifest, agent_version=__version__, runtime_ops=None,
                         hardware_tags=frozenset(self.cfg.hardware_tags))
        self._step(desired, UpdateState.VERIFIED, EventKind.VERIFIED)
        state = self.store.state()
        slot = self.store.other(state.active)
        contents = self.store.stage(
            slot, manifest, verified.model_path.read_bytes(), verified.selftest_path.read_bytes(),
            verified.baseline_path.read_bytes() if verified.baseline_path else None)
        self._step(desired, UpdateState.STAGED, EventKind.STAGED)
        model = self._load_and_test(contents)
        self._step(desired, UpdateState.SELFTEST, EventKind.SELFTEST)
        self.store.set_state(StoreState(active=slot, previous=state.active))
        self._install(contents, model)
        self._step(desired, UpdateState.SWAPPED, EventKind.SWAPPED)
        self._step(desired, UpdateState.COMMITTED, EventKind.COMMITTED)
        with self._lock:
            self._last_error = None
            self._state, self._target = UpdateState.IDLE, None
        self._save_journal()
        self._report()
        log.info("now serving release %s of %s", manifest.release, manifest.model)

    def _step(self, desired: Desired, state: UpdateState, kind: EventKind,
              progress: float | None = None, reason: ErrorInfo | None = None) -> None:
        with self._lock:
            self._state, self._target = state, desired
            self._event_seq += 1
            seq = self._event_seq
        self._save_journal()  # persist the step before telling anyone about it
        self.session.publish_event(Event(
            device_id=self.cfg.device_id, seq=seq, ts=self.clock(), kind=kind,
            model=desired.model, release=desired.release, rollout_id=desired.rollout_id,
            progress=progress, reason=reason))
        self._report()

    def _fail(self, desired: Desired, error: EdgefleetError, *, reject: bool) -> None:
        info = ErrorInfo(code=error.code, message=str(error)[:1000])
        log.error("update to %s/%s failed (%s): %s", desired.model, desired.release,
                  error.code, error)
        with self._lock:
            self._last_error = info
            if reject:
                self._rejected[f"{desired.model}/{desired.release}"] = desired.issued_at
        self._step(desired, UpdateState.FAILED, EventKind.FAILED, reason=info)

    # -- reporting ---------------------------------------------------------
    def _report(self) -> None:
        with self._lock:
            running, state, target, err = self._running, self._state, self._target, \
                self._last_error
        m = running.manifest if running else None
        self.session.publish_reported(Reported(
            device_id=self.cfg.device_id, agent_version=__version__,
            model=m.model if m else None, release=m.release if m else None,
            slot=running.slot if running else None, state=state,
            target_release=target.release if target else None,
            rollout_id=target.rollout_id if target else None,
            last_error=err, hardware=self.hardware, ts=self.clock()))

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.cfg.telemetry_interval):
            self._flush_telemetry()

    def _flush_telemetry(self) -> None:
        running = self._running
        with self._lock:
            self._telemetry_seq += 1
            seq = self._telemetry_seq
        msg = self.window.close(device_id=self.cfg.device_id, seq=seq,
                                model=running.manifest.model if running else None,
                                release=running.manifest.release if running else None,
                                stats=self._stats)
        self.buffer.push(msg)
        self.buffer.drain(self.session.publish_telemetry)

    # -- introspection (tests, CLI) ------------------------------------------
    @property
    def running_manifest(self) -> ReleaseManifest | None:
        r = self._running
        return r.manifest if r else None

    @property
    def state(self) -> UpdateState:
        return self._state


class _Downgrade(ReleaseError):
    code = "downgrade_refused"
