"""Telemetry ingest workers: MQTT 5 shared subscription in, batched SQL out.

Several workers (threads of the cloud service, or ``edgefleet-cloud ingest``
processes on other hosts) join one shared-subscription group, so the broker
splits the device streams between them. Nothing is lost when a worker or the
broker restarts:

* each worker has a fixed client id and an MQTT 5 persistent session
  (``clean_start=False`` plus a session expiry), so while it is away the
  broker keeps its subscriptions and queues its share of the QoS 1 stream
  (measured with Mosquitto 2.0.11: an offline member of a share group keeps
  receiving its round-robin share, and a persistent broker keeps the queue
  across its own restart);
* messages are acknowledged by hand, only after the batch holding them is
  committed (``manual_ack``): a crash before the commit makes the broker
  redeliver, and the store's unique key makes a redelivery a no-op.

The flip side of a persistent session: a worker that never comes back keeps
its share queued until its session expires. Run workers under a supervisor
and keep their client ids stable.

Messages are validated by ``shared.messages``; telemetry must also come from a
device that announced itself (status or reported), name a published release,
and carry histograms of that release's shape with plausible counts. Anything
else is counted under a reason, logged and acknowledged (dropped), never stored.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import select

from cloud.db import Database
from cloud.ingest.fastpath import decode_fast
from cloud.ingest.store import SeenUpdate, StoredWindow, TelemetryStore
from cloud.ingest.tables import DeviceSeen
from cloud.mqtt_bridge import client_tls_context
from shared.errors import MessageError
from shared.manifest import DriftSpec
from shared.messages import Reported, Status, Telemetry
from shared.topics import Channel, subscription

__all__ = [
    "DEFAULT_GROUP",
    "IngestConfig",
    "IngestStats",
    "IngestWorker",
    "ReleaseLookup",
    "UnknownRelease",
    "device_group",
]

log = logging.getLogger(__name__)

DEFAULT_GROUP = "default"
#: A device joins a group with a hardware tag ``group:<name>`` (or ``group=<name>``).
_GROUP_TAG = re.compile(r"^group[:=]([A-Za-z0-9][A-Za-z0-9._-]{0,63})$")
#: Channels a storing worker reads: telemetry, and the announcements that make a device known.
STORE_CHANNELS = (Channel.TELEMETRY, Channel.STATUS, Channel.REPORTED)
#: How long a "known device" answer is trusted before the table is asked again.
_KNOWN_TTL = 30.0
_UNKNOWN_TTL = 2.0
_MAX_CACHED = 100_000
#: Latency buckets (seconds) of the ingest lag histogram.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class UnknownRelease(Exception):
    """The telemetry names a release the repository does not have."""


#: ``(model, release) -> DriftSpec | None``; raises ``UnknownRelease``.
ReleaseLookup = Callable[[str, int], DriftSpec | None]


def device_group(reported: Reported) -> str:
    """The device group a reported state puts its device in (``default`` if none)."""
    for tag in reported.hardware.tags:
        m = _GROUP_TAG.match(tag)
        if m:
            return m.group(1)
    return DEFAULT_GROUP


@dataclass
class IngestConfig:
    """Where a worker connects and how it batches."""

    host: str = "127.0.0.1"
    port: int = 1883
    share_group: str = "edgefleet-store"
    client_id: str = "edgefleet-ingest-0"
    username: str | None = None
    password: str | None = None
    tls: dict[str, str] | None = None
    #: How long the broker keeps this worker's session (and queue) while it is away.
    session_expiry: int = 7 * 24 * 3600
    batch_size: int = 500
    batch_interval: float = 0.2
    queue_size: int = 20_000
    bucket_seconds: float = 60.0
    keepalive: int = 30


@dataclass
class IngestStats:
    """Counters of one worker (read by ``cloud.metrics``)."""

    worker: str
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    seen: int = 0
    batches: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    lag_buckets: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS) + 1))
    lag_sum: float = 0.0
    lag_count: int = 0
    last_stored_at: float | None = None
    connected: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def drop(self, reason: str) -> None:
        with self.lock:
            self.dropped[reason] += 1

    def observe_lag(self, seconds: float) -> None:
        i = next((k for k, b in enumerate(LAG_BUCKETS) if seconds <= b), len(LAG_BUCKETS))
        self.lag_buckets[i] += 1
        self.lag_sum += seconds
        self.lag_count += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "worker": self.worker,
                "connected": self.connected,
                "received": self.received,
                "stored": self.stored,
                "duplicates": self.duplicates,
                "seen": self.seen,
                "batches": self.batches,
                "dropped": dict(self.dropped),
                "last_stored_at": self.last_stored_at,
                "lag_mean_s": self.lag_sum / self.lag_count if self.lag_count else None,
            }


@dataclass(frozen=True)
class _Item:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int
    received_at: float


class _KnownDevices:
    """Which device ids announced themselves, and their groups; cached over the table."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._cache: dict[str, tuple[str | None, float]] = {}

    def remember(self, device_id: str, group: str | None, now: float) -> None:
        old = self._cache.get(device_id)
        if group is None and old is not None and old[0] is not None:
            group = old[0]
        self._set(device_id, group or DEFAULT_GROUP, now + _KNOWN_TTL)

    def group(self, device_id: str, now: float) -> str | None:
        hit = self._cache.get(device_id)
        if hit is not None and hit[1] > now:
            return hit[0]
        with self._db.session() as s:
            group = s.scalar(select(DeviceSeen.group).where(DeviceSeen.device_id == device_id))
        self._set(device_id, group, now + (_KNOWN_TTL if group is not None else _UNKNOWN_TTL))
        return group

    def _set(self, device_id: str, group: str | None, until: float) -> None:
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()  # bounded: spoofed ids must not grow memory
        self._cache[device_id] = (group, until)


class IngestWorker:
    """One broker session and one writer thread; see the module docstring."""

    def __init__(
        self,
        db: Database,
        config: IngestConfig,
        *,
        releases: ReleaseLookup | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.config = config
        self.stats = IngestStats(worker=config.client_id)
        self.store = TelemetryStore(
            db, worker=config.client_id, bucket_seconds=config.bucket_seconds
        )
        self._releases = releases
        self._clock = clock
        self._known = _KnownDevices(db)
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=config.queue_size)
        self._stop = threading.Event()
        self._generation = 0
        #: Held while acknowledging, and while a new connection bumps ``_generation``.
        self._ack_lock = threading.Lock()
        self.subscribed = threading.Event()
        self._writer: threading.Thread | None = None
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        if config.username is not None:
            self._client.username_pw_set(config.username, config.password)
        if config.tls is not None:
            self._client.tls_set_context(client_tls_context(config.tls))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -- lifecycle ------------------------------------------------------------
    def start(self, wait: float = 0.0) -> None:
        """Connect in the background; with ``wait`` block until subscribed (or time out)."""
        self._writer = threading.Thread(
            target=self._write_loop, daemon=True, name=f"ingest-writer-{self.config.client_id}"
        )
        self._writer.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.config.session_expiry
        self._client.connect_async(
            self.config.host,
            self.config.port,
            keepalive=self.config.keepalive,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()
        if wait and not self.subscribed.wait(wait):
            log.warning(
                "ingest worker %s not subscribed after %.0fs; still trying",
                self.config.client_id,
                wait,
            )

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, then leave; unacknowledged messages stay queued at the
        broker for this worker's next session."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout)
        self._client.disconnect()
        self._client.loop_stop()
        with self.stats.lock:
            self.stats.connected = False

    # -- paho callbacks (network thread: never raise) --------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            log.error("broker refused ingest worker %s: %s", self.config.client_id, reason_code)
            return
        with self._ack_lock:
            self._generation += 1
        with self.stats.lock:
            self.stats.connected = True
        # Subscriptions survive in a persistent session; renewing them is harmless and
        # covers a session the broker dropped (expired, or a broker without persistence).
        client.subscribe(
            [(subscription(ch, share_group=self.config.share_group), 1) for ch in STORE_CHANNELS]
        )
        log.info(
            "ingest worker %s connected (session present: %s)",
            self.config.client_id,
            getattr(flags, "session_present", None),
        )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: Sequence[ReasonCode],
        properties: Any,
    ) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("broker refused ingest subscriptions: %s", reason_codes)
            return
        self.subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        with self._ack_lock:
            self._generation += 1  # nothing of that connection may be acknowledged
        with self.stats.lock:
            self.stats.connected = False
        if not self._stop.is_set():
            log.warning("ingest worker %s lost the broker: %s", self.config.client_id, reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        item = _Item(
            message.topic,
            bytes(message.payload),
            message.mid,
            message.qos,
            self._generation,
            self._clock(),
        )
        with self.stats.lock:
            self.stats.received += 1
        # A full queue blocks the network thread: TCP back-pressure, the broker queues.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    # -- writer thread ------------------------------------------------------------------
    def _write_loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            if not batch:
                continue
            backoff = 0.5
            while True:
                try:
                    self._write(batch)
                    break
                except Exception:
                    log.exception("ingest batch of %d failed; retrying", len(batch))
                    if self._stop.wait(backoff):
                        return  # not acknowledged: the broker redelivers to the next session
                    backoff = min(backoff * 2, 10.0)
            self._ack(batch)

    def _take_batch(self) -> list[_Item]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.config.batch_interval
        while len(batch) < self.config.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
        return batch

    def _ack(self, batch: list[_Item]) -> None:
        # A packet id is only meaningful on the connection that delivered it; messages
        # of an older connection are redelivered by the broker and deduplicated. The lock
        # keeps a reconnect from slipping in between the check and the acknowledgement.
        with self._ack_lock:
            generation = self._generation
            for item in batch:
                if item.qos > 0 and item.generation == generation:
                    self._client.ack(item.mid, item.qos)

    def _write(self, batch: list[_Item]) -> None:
        windows: list[StoredWindow] = []
        seen: list[SeenUpdate] = []
        for item in batch:
            accepted = self._accept(item, seen)
            if accepted is not None:
                windows.append(accepted)
        result = self.store.write_batch(windows, seen)
        now = self._clock()
        with self.stats.lock:
            self.stats.batches += 1
            self.stats.stored += result.stored
            self.stats.duplicates += result.duplicates
            self.stats.seen += len(seen)
            if windows:
                self.stats.last_stored_at = now
            for w in windows:
                self.stats.observe_lag(max(now - w.received_at, 0.0))

    def _accept(self, item: _Item, seen: list[SeenUpdate]) -> StoredWindow | None:
        if not item.payload:  # a cleared retained message
            return None
        try:
            msg = decode_fast(item.topic, item.payload)
        except MessageError as e:
            self.stats.drop("invalid")
            log.warning("dropped invalid message on %s: %s", item.topic, e)
            return None
        if isinstance(msg, Status):
            if msg.online:
                seen.append(SeenUpdate(msg.device_id, item.received_at, None))
                self._known.remember(msg.device_id, None, item.received_at)
            return None
        if isinstance(msg, Reported):
            group = device_group(msg)
            seen.append(SeenUpdate(msg.device_id, item.received_at, group))
            self._known.remember(msg.device_id, group, item.received_at)
            return None
        if not isinstance(msg, Telemetry):
            return None
        known = self._known.group(msg.device_id, item.received_at)
        if known is None:
            self.stats.drop("unknown_device")
            log.warning("dropped telemetry of unknown device %s", msg.device_id)
            return None
        reason = self._check_telemetry(msg)
        if reason is not None:
            self.stats.drop(reason)
            log.warning("dropped telemetry of %s seq %d: %s", msg.device_id, msg.seq, reason)
            return None
        return StoredWindow(msg, item.received_at, known)

    def _check_telemetry(self, msg: Telemetry) -> str | None:
        """A reason to drop a schema-valid window, or ``None``."""
        hist, out = msg.input_hist, msg.output_hist
        if hist:
            totals = {sum(row) for row in hist}
            # Every sampled input is counted once per feature, and only inferences are sampled.
            if len(totals) != 1 or totals.pop() > msg.inferences:
                return "inconsistent_histogram"
        if out and sum(out) > msg.inferences:
            return "inconsistent_histogram"
        if (hist or out) and (msg.model is None or msg.release is None):
            return "histogram_without_release"
        if msg.model is None or msg.release is None or self._releases is None:
            return None
        try:
            spec = self._releases(msg.model, msg.release)
        except UnknownRelease:
            return "unknown_release"
        if hist and (spec is None or (len(hist), len(hist[0])) != (spec.n_features, spec.bins)):
            return "histogram_shape"
        if out and (spec is None or len(out) != spec.n_classes):
            return "histogram_shape"
        return None
