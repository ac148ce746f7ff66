"""Inject faults into a running ``SimFleet``, on a timer or on a device's update state.

``FaultInjector.schedule`` starts one thread per fault: it waits for the
trigger (``at`` seconds after the rollout started, or the device persisting
``on_state``), applies the fault, and undoes it after ``duration`` (power
comes back after ``restore_after``). ``close()`` cancels pending triggers and
undoes every fault still applied, so a fleet is never left with a cut link or
a full disk.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from firmware_sim.fleet import SimFleet
from firmware_sim.scenario import FaultSpec
from firmware_sim.watch import StateWatcher

__all__ = ["FaultInjector", "FaultRecord"]

log = logging.getLogger(__name__)


@dataclass
class FaultRecord:
    """What happened to one scheduled fault."""

    spec: FaultSpec
    fired_at: float | None = None  # seconds after the rollout started
    detail: str = ""
    error: str | None = None
    applied: bool = False  # currently in effect (not yet undone)
    finished: bool = False

    def describe(self) -> str:
        if self.error:
            return f"{self.spec.describe()}: ERROR {self.error}"
        if self.fired_at is None:
            return f"{self.spec.describe()}: never fired"
        return f"{self.spec.describe()}: fired at +{self.fired_at:.2f}s, {self.detail}"


class FaultInjector:
    """Runs faults against ``fleet``; use as a context manager."""

    def __init__(self, fleet: SimFleet) -> None:
        self.fleet = fleet
        self.records: list[FaultRecord] = []
        self._threads: list[threading.Thread] = []
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    def schedule(self, spec: FaultSpec, t0: float, trigger_timeout: float) -> FaultRecord:
        """Arm ``spec``; ``t0`` is the rollout start (``time.monotonic()``)."""
        record = FaultRecord(spec)
        self.records.append(record)
        t = threading.Thread(
            target=self._run,
            args=(record, t0, trigger_timeout),
            name=f"fault-{spec.kind}-{spec.line}",
            daemon=True,
        )
        t.start()
        self._threads.append(t)
        return record

    @property
    def done(self) -> bool:
        return all(r.finished for r in self.records)

    def _run(self, record: FaultRecord, t0: float, trigger_timeout: float) -> None:
        spec = record.spec
        try:
            if spec.on_state is not None:
                assert spec.device is not None
                with StateWatcher(self.fleet.data_dir(spec.device)) as watcher:
                    seen = watcher.wait({spec.on_state}, trigger_timeout, cancel=self._cancel)
                if seen is None:
                    record.detail = f"{spec.device} never persisted state {spec.on_state}"
                    return
            elif self._cancel.wait(max(0.0, t0 + (spec.at or 0.0) - time.monotonic())):
                return
            record.fired_at = time.monotonic() - t0
            with self._lock:
                record.detail = self._apply(spec)
                record.applied = True
            log.info("fault %s", record.describe())
            hold = spec.restore_after if spec.kind == "power_cut" else spec.duration
            if hold is None:
                record.applied = False  # a power cut without restore stays off for good
                return
            if self._cancel.wait(hold) and spec.kind == "power_cut":
                return  # shutting down: no point booting the device again
            with self._lock:
                if record.applied:
                    self._undo(spec)
                    record.applied = False
                    record.detail += f"; undone after {hold:g}s"
        except Exception as e:  # a failed fault is reported, never crashes the run
            log.exception("fault %s failed", spec.describe())
            record.error = f"{type(e).__name__}: {e}"
        finally:
            record.finished = True

    def _apply(self, spec: FaultSpec) -> str:
        fleet, dev = self.fleet, spec.device
        if spec.kind == "power_cut":
            assert dev is not None
            state = fleet.power_cut(dev)
            return f"killed {dev} with update state {state!r} on disk"
        if spec.kind == "link_cut":
            assert dev is not None
            fleet.net().set_link(dev, up=False)
            return f"cut {dev}'s link"
        if spec.kind == "slow_link":
            assert dev is not None
            fleet.net().set_rate(dev, spec.rate)
            return f"limited {dev} to {spec.rate}"
        if spec.kind == "packet_loss":
            assert dev is not None
            fleet.net().set_loss(dev, spec.percent)
            return f"{dev} drops {spec.percent:g}% of packets"
        if spec.kind == "full_disk":
            assert dev is not None
            n = fleet.disk(dev).fill()
            return f"filled {dev}'s disk ({n // 1024} KiB ballast)"
        if spec.kind == "broker_restart":
            assert fleet.broker is not None
            fleet.broker.stop()
            return "broker stopped"
        raise ValueError(f"unknown fault kind {spec.kind!r}")

    def _undo(self, spec: FaultSpec) -> None:
        fleet, dev = self.fleet, spec.device
        if spec.kind == "power_cut":
            assert dev is not None
            fleet.power_on(dev)
        elif spec.kind == "link_cut":
            assert dev is not None
            fleet.net().set_link(dev, up=True)
        elif spec.kind == "slow_link":
            assert dev is not None
            fleet.net().set_rate(dev, None)
        elif spec.kind == "packet_loss":
            assert dev is not None
            fleet.net().set_loss(dev, None)
        elif spec.kind == "full_disk":
            assert dev is not None
            fleet.disk(dev).free()
        elif spec.kind == "broker_restart":
            assert fleet.broker is not None
            fleet.broker.start()
        log.info("undid %s", spec.describe())

    def close(self) -> None:
        """Cancel pending faults and undo those still applied."""
        self._cancel.set()
        for t in self._threads:
            t.join(timeout=30)
        with self._lock:
            for record in self.records:
                if record.applied and record.spec.kind != "power_cut":
                    try:
                        self._undo(record.spec)
                    except Exception:
                        log.exception("could not undo %s", record.spec.describe())
                    record.applied = False

    def __enter__(self) -> FaultInjector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
