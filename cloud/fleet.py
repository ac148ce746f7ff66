"""What the cloud knows about each device, folded from the MQTT streams.

Ingest hands every validated message to ``FleetView.apply``; the API and the
dashboard read snapshots. This is the live view; the durable registry (devices,
rollouts, telemetry aggregates in SQL) builds on it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.messages import Desired, Event, Message, Reported, Status, Telemetry

__all__ = ["DeviceView", "FleetView"]

#: Lifecycle events kept per device for the API (older ones live in the registry).
EVENTS_KEPT = 50


@dataclass
class DeviceView:
    """The latest known state of one device."""

    device_id: str
    online: bool = False
    agent_version: str | None = None
    reported: Reported | None = None
    desired: Desired | None = None
    last_seen: float | None = None
    inferences_total: int = 0
    errors_total: int = 0
    last_telemetry: Telemetry | None = None
    last_telemetry_at: float | None = None
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    #: ``issued_at`` of the desired state this device was last seen to reach (metrics).
    reached_issued_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        r, t = self.reported, self.last_telemetry
        return {
            "device_id": self.device_id,
            "online": self.online,
            "agent_version": self.agent_version or (r.agent_version if r else None),
            "model": r.model if r else None,
            "release": r.release if r else None,
            "slot": r.slot if r else None,
            "state": r.state.value if r else None,
            "last_error": r.last_error.model_dump() if r and r.last_error else None,
            "desired_release": self.desired.release if self.desired else None,
            "last_seen": self.last_seen,
            "inferences_total": self.inferences_total,
            "errors_total": self.errors_total,
            "latency_p99_ms": t.latency.p99_ms if t and t.latency else None,
            "last_telemetry_at": self.last_telemetry_at,
            "hardware": r.hardware.model_dump() if r else None,
            "recent_events": [
                {
                    "kind": e.kind.value,
                    "release": e.release,
                    "ts": e.ts,
                    "reason": e.reason.model_dump() if e.reason else None,
                }
                for e in list(self.events)[-10:]
            ],
        }


class FleetView:
    """Thread-safe map of device id to ``DeviceView``.

    Observers (``cloud.metrics``) may set ``on_event`` (a new lifecycle event:
    kind) and ``on_update_reached`` (seconds from a desired state being issued
    to the device reporting it runs that release); they run under the lock and
    must be quick.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceView] = {}
        self.invalid_messages = 0
        self.messages = 0
        self.on_event: Callable[[str], None] | None = None
        self.on_update_reached: Callable[[float], None] | None = None
        #: Called with every applied message, outside the lock (the device registry).
        self.listeners: list[Callable[[Message, float], None]] = []

    def _get(self, device_id: str) -> DeviceView:
        view = self._devices.get(device_id)
        if view is None:
            view = self._devices[device_id] = DeviceView(device_id)
        return view

    def apply(self, msg: Message, received_at: float) -> None:
        self._apply(msg, received_at)
        for listener in self.listeners:
            listener(msg, received_at)

    def _apply(self, msg: Message, received_at: float) -> None:
        with self._lock:
            self.messages += 1
            view = self._get(msg.device_id)
            if isinstance(msg, Status):
                view.online = msg.online
                view.agent_version = msg.agent_version or view.agent_version
                if msg.online:
                    view.last_seen = received_at
                return
            view.last_seen = received_at
            if isinstance(msg, Reported):
                view.reported = msg
                self._check_reached(view, received_at)
            elif isinstance(msg, Event):
                # QoS 1 may deliver twice: count an event once, by its sequence number.
                new = not view.events or msg.seq > view.events[-1].seq
                if new and self.on_event is not None:
                    self.on_event(msg.kind.value)
                view.events.append(msg)
            elif isinstance(msg, Telemetry):
                view.inferences_total += msg.inferences
                view.errors_total += msg.errors
                view.last_telemetry = msg
                view.last_telemetry_at = received_at
            elif isinstance(msg, Desired):
                view.desired = msg

    def _check_reached(self, view: DeviceView, now: float) -> None:
        d, r = view.desired, view.reported
        if d is None or r is None or view.reached_issued_at == d.issued_at:
            return
        running = r.state.value in ("idle", "committed")
        if running and r.model == d.model and r.release == d.release:
            view.reached_issued_at = d.issued_at
            if self.on_update_reached is not None:
                self.on_update_reached(max(now - d.issued_at, 0.0))

    def release_counts(self) -> dict[tuple[str, int], int]:
        """How many devices report running each (model, release)."""
        with self._lock:
            out: dict[tuple[str, int], int] = {}
            for v in self._devices.values():
                r = v.reported
                if r is not None and r.model is not None and r.release is not None:
                    out[(r.model, r.release)] = out.get((r.model, r.release), 0) + 1
            return out

    def online_count(self) -> tuple[int, int]:
        """(online devices, known devices)."""
        with self._lock:
            return sum(1 for v in self._devices.values() if v.online), len(self._devices)

    def telemetry_ages(self, now: float) -> list[float]:
        """Seconds since the newest telemetry of each online device that sent any."""
        with self._lock:
            return [
                now - v.last_telemetry_at
                for v in self._devices.values()
                if v.online and v.last_telemetry_at is not None
            ]

    def record_invalid(self) -> None:
        with self._lock:
            self.invalid_messages += 1

    def record_desired(self, msg: Desired) -> None:
        with self._lock:
            self._get(msg.device_id).desired = msg

    def device(self, device_id: str) -> dict[str, Any] | None:
        with self._lock:
            view = self._devices.get(device_id)
            return view.to_json() if view else None

    def devices(self) -> list[dict[str, Any]]:
        with self._lock:
            return [v.to_json() for _, v in sorted(self._devices.items())]

    def device_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._devices)

    def reported_many(self, device_ids: list[str]) -> list[Reported]:
        """The latest reported state of each of ``device_ids`` that has one."""
        with self._lock:
            out = []
            for d in device_ids:
                view = self._devices.get(d)
                if view is not None and view.reported is not None:
                    out.append(view.reported)
            return out

    def devices_on(self, model: str, release: int) -> list[str]:
        """Devices told to run ``model`` release ``release`` (or running it, untold)."""
        with self._lock:
            out = []
            for d, v in sorted(self._devices.items()):
                r, want = v.reported, v.desired
                # The desired state decides (a device already sent elsewhere is not
                # "on" it any more); a device with none is judged by what it runs.
                on = want if want is not None else r
                if on is not None and (on.model, on.release) == (model, release):
                    out.append(d)
            return out
