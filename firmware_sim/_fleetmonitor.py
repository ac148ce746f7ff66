"""What a mass fleet does, seen from the broker: ``FleetMonitor``.

One MQTT 5 subscriber follows every device's ``status``, ``reported`` and
``events`` topics (when each device went online, reported a release running and
idle, and each update event) and the broker's ``$SYS/broker/bytes/*`` counters.
Parsing is deliberately loose (plain JSON, a few fields): the agents' messages
are validated by the cloud; here only timing and outcome matter.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from firmware_sim._system import SimError

__all__ = ["DeviceTrack", "FleetMonitor"]


@dataclass
class DeviceTrack:
    """What the monitor saw of one device."""

    online: bool = False
    release: int | None = None
    state: str | None = None
    #: (release, event kind) -> first arrival time (monotonic)
    events: dict[tuple[int, str], float] = field(default_factory=dict)
    #: release -> time the device first reported it running and idle
    done: dict[int, float] = field(default_factory=dict)
    #: (release, "failed: <reason code>" | "rolled_back: <reason code>"), in order
    reasons: list[tuple[int, str]] = field(default_factory=list)


class FleetMonitor:
    """Watches every device's reports and the broker's byte counters over MQTT."""

    def __init__(self, host: str, port: int, ids: list[str]) -> None:
        import paho.mqtt.client as mqtt

        self.ids = set(ids)
        self.devices: dict[str, DeviceTrack] = {d: DeviceTrack() for d in ids}
        self.sys: dict[str, tuple[int, float]] = {}
        self.invalid = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=f"fanout-monitor-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._connected = threading.Event()
        self._host, self._port = host, port
        self._tick_topic = f"fanout-bench/{uuid.uuid4().hex}/tick"

    def start(self, timeout: float = 10.0) -> FleetMonitor:
        self._client.connect(self._host, self._port, keepalive=60)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            raise SimError("the fleet monitor could not subscribe to the broker")
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        root = "edgefleet/v1/devices/+/"
        client.subscribe(
            [
                (root + "reported", 1),
                (root + "events", 1),
                (root + "status", 1),
                ("$SYS/broker/bytes/#", 0),
            ]
        )
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.monotonic()
        topic: str = msg.topic
        if topic.startswith("$SYS/"):
            with contextlib.suppress(ValueError), self._lock:
                self.sys[topic.rsplit("/", 1)[1]] = (int(msg.payload), now)
                self._changed.notify_all()
            return
        parts = topic.split("/")
        if len(parts) != 5 or parts[3] not in self.ids or not msg.payload:
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            self.invalid += 1
            return
        if not isinstance(body, dict):
            self.invalid += 1
            return
        dev, channel = parts[3], parts[4]
        with self._lock:
            track = self.devices[dev]
            if channel == "status":
                track.online = bool(body.get("online"))
            elif channel == "reported":
                track.release, track.state = body.get("release"), body.get("state")
                if track.state == "idle" and isinstance(track.release, int):
                    track.done.setdefault(track.release, now)
            elif channel == "events":
                rel, kind = body.get("release"), body.get("kind")
                if isinstance(rel, int) and isinstance(kind, str):
                    track.events.setdefault((rel, kind), now)
                    reason = body.get("reason")
                    if kind in ("failed", "rolled_back") and isinstance(reason, dict):
                        track.reasons.append((rel, f"{kind}: {reason.get('code')}"))
            self._changed.notify_all()

    def wait(
        self,
        predicate: Callable[[FleetMonitor], bool],
        timeout: float,
        check: Callable[[], None] | None = None,
    ) -> bool:
        """Wait until ``predicate(self)`` holds (evaluated under the lock)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 1.0))
                if check is not None:
                    self._lock.release()
                    try:
                        check()
                    finally:
                        self._lock.acquire()
        return True

    def online(self) -> int:
        return sum(1 for t in self.devices.values() if t.online)

    def done(self, release: int) -> int:
        return sum(1 for t in self.devices.values() if release in t.done)

    def sys_bytes(self, timeout: float = 10.0) -> dict[str, int]:
        """The broker's ``bytes/received`` and ``bytes/sent`` counters, fresh.

        Mosquitto publishes a ``$SYS`` value only when it changed, so a small
        QoS 0 message to a topic nobody reads makes sure it changes; its bytes
        are the monitor's own (the bench's ``ByteMeter`` counts them)."""
        fresh_after = time.monotonic()
        self._client.publish(f"{self._tick_topic}", b"1")
        ok = self.wait(lambda m: m.sys.get("received", (0, 0.0))[1] > fresh_after, timeout)
        if not ok:
            raise SimError("the broker publishes no $SYS byte counters (sys_interval set?)")
        # "sent" changes at every $SYS tick (the ticks are sent to this monitor).
        self.wait(lambda m: m.sys.get("sent", (0, 0.0))[1] > fresh_after, 3.0)
        with self._lock:
            return {k: self.sys[k][0] for k in ("received", "sent") if k in self.sys}
