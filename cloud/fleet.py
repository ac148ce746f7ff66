"""What the cloud knows about each device, folded from the MQTT streams.

Ingest hands every validated message to ``FleetView.apply``; the API and the
dashboard read snapshots. This is the live view; the durable registry (devices,
rollouts, telemetry aggregates in SQL) builds on it.
"""

from __future__ import annotations

import threading
from collections import deque
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
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))

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
    """Thread-safe map of device id to ``DeviceView``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceView] = {}
        self.invalid_messages = 0
        self.messages = 0

    def _get(self, device_id: str) -> DeviceView:
        view = self._devices.get(device_id)
        if view is None:
            view = self._devices[device_id] = DeviceView(device_id)
        return view

    def apply(self, msg: Message, received_at: float) -> None:
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
            elif isinstance(msg, Event):
                view.events.append(msg)
            elif isinstance(msg, Telemetry):
                view.inferences_total += msg.inferences
                view.errors_total += msg.errors
                view.last_telemetry = msg
            elif isinstance(msg, Desired):
                view.desired = msg

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
