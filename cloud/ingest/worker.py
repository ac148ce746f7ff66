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
* messages are acknowledged only after the batch holding them is committed:
  a crash before the commit makes the broker redeliver, and the store's
  unique key makes a redelivery a no-op.

The flip side of a persistent session: a worker that never comes back keeps
its share queued until its session expires. Run workers under a supervisor
and keep their client ids stable.

One thread per worker does everything, in order: read what the socket holds
(``cloud.ingest.mqtt_reader``, many messages per ``recv``), validate a batch,
commit it, acknowledge it. While a batch commits, the broker keeps sending up
to the Receive Maximum into the socket buffer, so the next batch is waiting.

What is kept of a batch and why the rest is dropped is ``cloud.ingest.validate``;
a dropped message is counted, logged and acknowledged, never stored.
"""

from __future__ import annotations

import bisect
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cloud.broker import DEFAULT_MAX_PACKET
from cloud.db import Database
from cloud.ingest.mqtt_reader import BrokerConnectionError, MqttReader, Publish, ReaderConfig
from cloud.ingest.store import SeenUpdate, StoredWindow, TelemetryStore
from cloud.ingest.validate import (
    DEFAULT_GROUP,
    BatchValidator,
    ReleaseLookup,
    UnknownRelease,
    device_group,
)
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

#: Channels a storing worker reads: telemetry, and the announcements that make a device known.
STORE_CHANNELS = (Channel.TELEMETRY, Channel.STATUS, Channel.REPORTED)
#: Latency buckets (seconds) of the ingest lag histogram.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: A batch is written early once its payloads reach this many bytes (bounds memory).
MAX_BATCH_BYTES = 32 << 20
#: Reconnect backoff bounds (seconds).
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 10.0
#: How long a worker waits on an idle socket before looking at its stop flag.
_IDLE_WAIT = 0.25
#: A batch in hand is written once the socket stays quiet this long: waiting out
#: ``batch_interval`` at the end of a burst only adds latency (and measured 25 %
#: of a 20 000-message drain), while a busy stream fills batches anyway.
_QUIET = 0.005


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
    #: Unacknowledged messages the broker may have in flight to us (default: 64 batches,
    #: at most 65535). Mosquitto 2.0.11 measured: with 4 batches it spent 4.5-5.5 us of
    #: CPU per message refilling the window on every acknowledgement, with 64 batches
    #: 2 us. Our memory does not depend on it: a worker reads no more than a batch
    #: before it commits, and TCP flow control holds back the rest.
    receive_maximum: int | None = None
    #: Largest packet we accept: the broker's own limit, so an oversized payload still
    #: reaches us and is counted as invalid rather than silently discarded.
    max_packet_size: int = DEFAULT_MAX_PACKET
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

    def drop(self, reason: str, n: int = 1) -> None:
        with self.lock:
            self.dropped[reason] += n

    def observe_lag(self, seconds: float, n: int = 1) -> None:
        """Count ``n`` windows committed ``seconds`` after receipt (caller holds ``lock``)."""
        self.lag_buckets[bisect.bisect_left(LAG_BUCKETS, seconds)] += n
        self.lag_sum += seconds * n
        self.lag_count += n

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


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic cyclic GC while a batch is validated and written (re-entrant,
    across threads: collection resumes when the last pause ends).

    A batch allocates tens of thousands of short-lived containers, which trips
    CPython's generation-0 threshold (700) every few messages; each collection
    then walks everything young, and every few batches the whole heap. Nothing a
    batch makes forms a cycle, so reference counting frees all of it when the
    batch is done; cycles made meanwhile by other threads wait a few milliseconds."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


@dataclass
class _Batch:
    """Messages received on one connection and not yet acknowledged."""

    generation: int
    items: list[Publish] = field(default_factory=list)
    #: ``received_at`` of each item (one clock reading per ``recv``).
    times: list[float] = field(default_factory=list)
    nbytes: int = 0
    started: float = 0.0


class IngestWorker:
    """One broker session and one thread; see the module docstring."""

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
        self._validator = BatchValidator(db, releases)
        self._clock = clock
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        #: Failed batches in a row (reset by a commit).
        self._failures = 0
        receive_max = config.receive_maximum or min(0xFFFF, max(64 * config.batch_size, 100))
        self._reader = MqttReader(
            ReaderConfig(
                host=config.host,
                port=config.port,
                client_id=config.client_id,
                subscriptions=tuple(
                    subscription(ch, share_group=config.share_group) for ch in STORE_CHANNELS
                ),
                username=config.username,
                password=config.password,
                tls=config.tls,
                keepalive=config.keepalive,
                session_expiry=config.session_expiry,
                receive_maximum=receive_max,
                max_packet_size=config.max_packet_size,
            )
        )

    # -- lifecycle ------------------------------------------------------------
    def start(self, wait: float = 0.0) -> None:
        """Connect in the background; with ``wait`` block until subscribed (or time out)."""
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"ingest-{self.config.client_id}"
        )
        self._thread.start()
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
        if self._thread is not None:
            self._thread.join(timeout)
        with self.stats.lock:
            self.stats.connected = False

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the worker thread -------------------------------------------------------------
    def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while not self._stop.is_set():
            try:
                present = self._reader.connect()
            except BrokerConnectionError as e:
                log.warning("ingest worker %s cannot connect: %s", self.config.client_id, e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = _BACKOFF_MIN
            with self.stats.lock:
                self.stats.connected = True
            self.subscribed.set()
            log.info(
                "ingest worker %s subscribed (session present: %s)",
                self.config.client_id,
                present,
            )
            try:
                self._serve()
            except BrokerConnectionError as e:
                if not self._stop.is_set():
                    log.warning("ingest worker %s lost the broker: %s", self.config.client_id, e)
            except Exception:
                # A bug must not stop ingest: nothing of the batch in hand was
                # acknowledged, so reconnecting makes the broker deliver it again. The
                # wait grows while no batch gets through (a message that trips a bug
                # comes back every time).
                log.exception("ingest worker %s failed; reconnecting", self.config.client_id)
                self._reader.close()
                self._failures += 1
                self._stop.wait(min(_BACKOFF_MIN * 2 ** min(self._failures, 10), _BACKOFF_MAX))
            finally:
                with self.stats.lock:
                    self.stats.connected = False
        self._reader.close()

    def _serve(self) -> None:
        """Read, batch, write and acknowledge until stopped or disconnected."""
        reader, cfg = self._reader, self.config
        batch = _Batch(reader.generation)
        while True:
            stopping = self._stop.is_set()
            if stopping:
                timeout = 0.0
            elif batch.items:
                left = batch.started + cfg.batch_interval - time.monotonic()
                timeout = min(max(left, 0.0), _QUIET)
            else:
                timeout = _IDLE_WAIT
            before = len(batch.items)
            got = reader.read(batch.items, timeout)
            if got:
                now = self._clock()
                if not before:
                    batch.started = time.monotonic()
                batch.times.extend([now] * got)
                batch.nbytes += sum([len(p[1]) for p in batch.items[before:]])
                with self.stats.lock:
                    self.stats.received += got
            due = batch.items and (
                got == 0
                or stopping
                or len(batch.items) >= cfg.batch_size
                or batch.nbytes >= MAX_BATCH_BYTES
                or time.monotonic() >= batch.started + cfg.batch_interval
            )
            if due:
                if not self._commit(batch):
                    return  # stopping with a batch that could not be written: not acknowledged
                batch = _Batch(reader.generation)
            if stopping and not batch.items:
                reader.disconnect()
                return

    def _commit(self, batch: _Batch) -> bool:
        """Write ``batch`` and acknowledge it, in transactions of ``batch_size`` to twice
        that; ``False`` if stopped before one could be written."""
        n = len(batch.items)
        chunks = max(1, n // self.config.batch_size)
        for c in range(chunks):
            lo, hi = n * c // chunks, n * (c + 1) // chunks
            items, times = batch.items[lo:hi], batch.times[lo:hi]
            with gc_paused():
                prepared = self._validator.prepare(items, times)
                if prepared.dropped:
                    with self.stats.lock:
                        self.stats.dropped.update(prepared.dropped)
                written = self._write(prepared.windows, prepared.seen)
                del prepared
            if not written:
                return False
            self._failures = 0
            self._reader.ack([p[2] for p in items], batch.generation)
        return True

    def _write(self, windows: list[StoredWindow], seen: list[SeenUpdate]) -> bool:
        backoff = 0.5
        while True:
            try:
                result = self.store.write_batch(windows, seen)
                break
            except Exception:
                log.exception("ingest batch of %d windows failed; retrying", len(windows))
                deadline = time.monotonic() + backoff
                while time.monotonic() < deadline:
                    if self._stop.wait(min(1.0, backoff)):
                        return False  # not acknowledged: the broker redelivers
                    self._reader.ping_if_due()
                backoff = min(backoff * 2, 10.0)
        now = self._clock()
        lags = Counter([w.received_at for w in windows])
        with self.stats.lock:
            st = self.stats
            st.batches += 1
            st.stored += result.stored
            st.duplicates += result.duplicates
            st.seen += len(seen)
            if windows:
                st.last_stored_at = now
            for at, n in lags.items():
                st.observe_lag(max(now - at, 0.0), n)
        return True

    # -- validation ----------------------------------------------------------------------
