"""The device agent: serve inferences, reconcile the desired release, report.

Threads:

* inference workers (``inference_threads``): take real-valued inputs from the
  source and run them on whatever model serves, continuously, whatever else
  happens. The serving model quantizes each input with its own parameters
  (``ModelServer.infer_real``), so a swap never feeds a model another one's
  quantization;
* the updater (``device._updater.UpdateMachine``): walks the update state
  machine, persisting each step first, then publishing an event and the
  retained ``reported`` state; a new model is built, self-tested and warmed
  off the request path, switched in atomically, and serves on probation with
  the previous model kept loaded for an instant rollback;
* telemetry: closes a statistics window every ``telemetry_interval``.

Boot order: the journal is read and the slot pointer made to agree with it
(``UpdateMachine.recover``), the active slot is loaded and self-tested (the
previous slot if the active one is missing, corrupt or fails), then the
interrupted update, if any, goes on (``UpdateMachine.after_boot``). Whatever
goes wrong, a loaded model keeps serving.
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

from device import __version__
from device._model import DEFAULT_POOL_SIZE
from device._probation import LatencyRing, ProbationWindow
from device._updater import UpdateMachine
from device.inputs import InputSource
from device.mqtt_session import MqttSession, TlsSettings
from device.runtime import LoadedModel, ModelMeta, ModelServer, NoModelError, interpreter_backend
from device.store import SlotContents, SlotStore, StoreState
from device.telemetry import DriftContext, ProcessStats, TelemetryBuffer, TelemetryWindow
from shared.drift import unpack_baseline
from shared.errors import ConfigError, EdgefleetError
from shared.manifest import ReleaseManifest
from shared.messages import Desired, ErrorInfo, HardwareInfo, Reported, UpdateState
from shared.selftest import check_outputs, unpack_vectors

__all__ = ["BLOB_SOURCES", "Agent", "AgentConfig"]

log = logging.getLogger(__name__)

#: Telemetry windows waiting for the link, persisted across restarts.
TELEMETRY_BUFFER = "telemetry-buffer.json"
#: Inference errors logged with a traceback: the first, then one in this many.
ERROR_LOG_EVERY = 1000
#: Where release files come from (``AgentConfig.blob_source``; ``device.blob_fetcher``).
BLOB_SOURCES = ("auto", "mqtt", "http")


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
    #: Probation: at least this long and this many inferences on the new model ...
    probation_s: float = 10.0
    probation_min_inferences: int = 100
    #: ... but at most this long when the device serves too little to judge.
    probation_max_s: float = 120.0
    #: Roll back above this error rate, or when p99 latency exceeds this
    #: multiple of the previous model's.
    probation_max_error_rate: float = 0.01
    probation_max_latency_ratio: float = 3.0
    #: Deaths of the agent with a new model loaded before it is blamed on the model.
    max_update_crashes: int = 3
    #: Use signed binary deltas against the running model when a release offers one.
    use_deltas: bool = True
    #: Release files (TUF targets) from the broker's retained blobs, which the cloud
    #: publishes once for the whole fleet: ``auto`` when the broker holds them, else
    #: from ``repo_url``; ``mqtt`` only from the broker; ``http`` never from it.
    #: Metadata always comes from ``repo_url``, and TUF verifies every byte.
    blob_source: str = "auto"
    #: Send drift histograms packed (``shared.messages.PackedCounts``): a third of the
    #: bytes and of the cloud's ingest work. ``false`` for a cloud older than the format.
    packed_histograms: bool = True

    def __post_init__(self) -> None:
        if self.blob_source not in BLOB_SOURCES:
            raise ConfigError(
                f"blob_source = {self.blob_source!r}: use one of {', '.join(BLOB_SOURCES)}"
            )

    @property
    def root_path(self) -> Path:
        return self.data_dir / "trust" / "root.json"


class Agent:
    """One device's agent. ``start()`` returns at once; ``stop()`` shuts down cleanly."""

    def __init__(
        self, cfg: AgentConfig, source: InputSource, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.clock = clock
        self.store = SlotStore(cfg.data_dir)
        self.server = ModelServer()
        self.window = TelemetryWindow(clock=clock, packed=cfg.packed_histograms)
        self.buffer = TelemetryBuffer()
        self._buffer_path = cfg.data_dir / TELEMETRY_BUFFER
        self.buffer.load(self._buffer_path)
        self._stats = ProcessStats()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._desired: Desired | None = None
        self._running: SlotContents | None = None
        self._last_error: ErrorInfo | None = None
        #: Recent latencies of the serving model: the reference of the next probation.
        self._latency = LatencyRing()
        #: The probation window while a new model is on probation.
        self._probe: ProbationWindow | None = None
        self._errors_seen = 0
        self._threads: list[threading.Thread] = []
        _, self.runtime_name = interpreter_backend()
        self.hardware = HardwareInfo(
            machine=platform.machine()[:64],
            system=platform.system()[:64],
            runtime=self.runtime_name[:128],
            tags=cfg.hardware_tags,
        )
        self.updater = UpdateMachine(self)
        self.session = MqttSession(
            cfg.device_id,
            cfg.broker_host,
            cfg.broker_port,
            agent_version=__version__,
            on_desired=self._on_desired,
            tls=cfg.tls,
            clock=clock,
        )

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self.updater.recover()
        self._boot()
        self.updater.after_boot()
        self.session.start()
        specs: list[tuple[str, Callable[..., None], tuple[Any, ...]]] = [
            (f"infer-{i}", self._inference_loop, (i,)) for i in range(self.cfg.inference_threads)
        ]
        specs += [("updater", self.updater.run, ()), ("telemetry", self._telemetry_loop, ())]
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
        self.updater.close()
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
                log.error("slot %s is missing or corrupt", slot)
                self._last_error = ErrorInfo(
                    code="slot_invalid", message=f"slot {slot} is missing or corrupt"
                )
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

    # -- model handling --------------------------------------------------
    def _load_and_test(self, contents: SlotContents) -> LoadedModel:
        """Load a slot's model off the request path, check it against its signed
        manifest, run the signed self-test vectors and warm every interpreter."""
        manifest = contents.manifest
        try:
            data = contents.model_path.read_bytes()
            vectors = contents.selftest_path.read_bytes()
        except OSError as e:
            raise EdgefleetError(f"slot {contents.slot} is unreadable: {e}") from e
        model = LoadedModel(
            data,
            meta=ModelMeta(name=manifest.model, release=manifest.release, slot=contents.slot),
            num_threads=self.cfg.interpreter_threads,
            # One warm interpreter per inference thread (the pool grows on demand).
            pool_size=max(1, min(self.cfg.inference_threads, DEFAULT_POOL_SIZE)),
        )
        try:
            model.check_manifest(manifest)
            inputs, expected = unpack_vectors(vectors, manifest)
            report = check_outputs(model.run_batch(inputs), expected, manifest)
            log.info("self-test passed: %s", report.describe())
            model.warmup(3)
        except BaseException:
            model.close()
            raise
        return model

    def _install(
        self, contents: SlotContents, model: LoadedModel, *, keep_old: bool = False
    ) -> LoadedModel | None:
        """Switch serving to ``model``; returns the replaced model if ``keep_old``."""
        drift = None
        manifest = contents.manifest
        if manifest.drift is not None and contents.baseline_path is not None:
            try:
                baseline = unpack_baseline(contents.baseline_path.read_bytes(), manifest.drift)
                # Inputs are real-valued (sensor domain), like the baseline's.
                drift = DriftContext(
                    baseline=baseline,
                    features=manifest.drift.features,
                    n_classes=manifest.drift.n_classes,
                    to_real=lambda x: np.asarray(x, dtype=np.float64),
                )
            except (EdgefleetError, OSError) as e:
                log.warning("drift baseline unusable: %s", e)
        old = self.server.current
        self.server.swap(model, retire_old=not keep_old)
        with self._lock:
            self._running = contents
        self._latency.clear()
        self.window.set_drift(drift)
        return old if keep_old else None

    # -- inference ---------------------------------------------------------
    def _inference_loop(self, index: int) -> None:
        interval = self.cfg.inference_interval
        while not self._stop.is_set():
            model = self.server.current
            if model is None:
                self._stop.wait(0.1)
                continue
            shape = tuple(model.input_spec.shape[1:])
            x = self.source.next(shape)
            t0 = time.perf_counter()
            try:
                y, served = self.server.infer_real(x)
            except NoModelError:
                self._stop.wait(0.05)
                continue
            except Exception:
                now = self.server.current
                if now is not model and now is not None and now.input_spec.shape != [1, *shape]:
                    continue  # raced a swap to a model with another input shape
                self._errors_seen += 1
                if self._errors_seen % ERROR_LOG_EVERY == 1:
                    log.exception("inference failed (%d so far)", self._errors_seen)
                self.window.record_error()
                probe = self._probe
                if probe is not None and probe.model is model:
                    probe.record_error()
            else:
                dt = time.perf_counter() - t0
                self.window.record(dt, x, y)
                probe = self._probe
                if probe is not None and probe.model is served:
                    probe.record(dt)
                elif probe is None:
                    self._latency.add(dt)
            if interval > 0:
                self._stop.wait(interval)

    # -- desired state ---------------------------------------------------
    def _on_desired(self, desired: Desired) -> None:
        with self._lock:
            self._desired = desired
        self._wake.set()

    def _resume(self, desired: Desired) -> None:
        """Go on with an update the journal says was under way (before MQTT says anything)."""
        with self._lock:
            if self._desired is None:
                self._desired = desired
        self._wake.set()

    def _needs_update(self) -> Desired | None:
        with self._lock:
            desired, running = self._desired, self._running
        if desired is None:
            return None
        if running is not None and (running.manifest.model, running.manifest.release) == (
            desired.model,
            desired.release,
        ):
            # Told to run what it runs after a refused or rolled-back update (a fleet
            # rollback pointing it back): that update is over, the device is settled.
            if self.updater.j.state in (UpdateState.FAILED, UpdateState.ROLLED_BACK):
                self.updater.settle()
            return None
        if self.updater.j.is_rejected(desired):
            return None
        return desired

    # -- reporting ---------------------------------------------------------
    def _report(self) -> None:
        j = self.updater.j
        with self._lock:
            running, err = self._running, self._last_error
        target = j.target if j.state != UpdateState.IDLE else None
        m = running.manifest if running else None
        self.session.publish_reported(
            Reported(
                device_id=self.cfg.device_id,
                agent_version=__version__,
                model=m.model if m else None,
                release=m.release if m else None,
                slot=running.slot if running else None,
                state=j.state,
                target_release=target.release if target else None,
                rollout_id=target.rollout_id if target else None,
                last_error=err,
                hardware=self.hardware,
                ts=self.clock(),
            )
        )

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.cfg.telemetry_interval):
            self._flush_telemetry()

    def _flush_telemetry(self) -> None:
        running = self._running
        msg = self.window.close(
            device_id=self.cfg.device_id,
            seq=self.updater.next_telemetry_seq(),
            model=running.manifest.model if running else None,
            release=running.manifest.release if running else None,
            stats=self._stats,
        )
        self.buffer.push(msg)
        self.buffer.drain(self.session.publish_telemetry)
        self.buffer.save(self._buffer_path)

    # -- introspection (tests, CLI) ------------------------------------------
    @property
    def running_manifest(self) -> ReleaseManifest | None:
        r = self._running
        return r.manifest if r else None

    @property
    def state(self) -> UpdateState:
        return self.updater.j.state
