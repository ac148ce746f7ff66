"""Fetch TUF targets from the broker's retained blob topics (the fan-out channel).

The cloud publishes every target file of a release once, retained, as chunks
under ``edgefleet/v1/blobs/<sha256>/`` (``cloud/fanout.py``; wire format in
``shared.blob_wire``), and the broker copies them to every device that
subscribes, whenever it subscribes. This fetcher works on the agent's own
MQTT connection (``BlobFetcher.for_session``: a secure broker allows one
connection per device). ``device.tuf_client.ReleaseClient`` uses it for the
targets of a release; metadata still comes from the configured repository.

* ``plan``/``locate``: subscribe to the ``meta`` topics of the wanted blobs and
  unsubscribe at once. The broker sends the retained messages while handling
  the SUBSCRIBE, before it answers the UNSUBSCRIBE, so the UNSUBACK says the
  broker has told all it holds: one round trip, no fixed wait
  (``probe_timeout`` bounds a silent link).
* ``fetch_target``: subscribe to a window of the chunk topics still missing;
  each chunk is checked (its index, its exact length) and written at its
  offset into ``<partial dir>/<sha256>.blob``, and after an fsync of the data
  it is marked in the ledger ``<sha256>.blobmap``. A cut link or a restarted
  agent asks only for the chunks it lacks. The assembled file goes through
  TUF (``Updater.find_cached_target``: signed length and hashes) before it is
  moved to where the release client wants it.

The broker is untrusted: the meta must announce exactly the signed length (at
most ``max_target_bytes``), every chunk must have the length its index
implies, and only TUF-verified bytes leave the partial file. No new chunk for
``stall_timeout`` seconds fails the download like the other transports do
(TUF ``SlowRetrievalError``, a ``DownloadError``: retried later).

Modes (``blob_source`` in the agent config): ``auto`` takes from the broker the
targets it holds and everything else, or whatever the broker got wrong (a
stall, a bad chunk, bytes TUF refuses), from the repository fetcher; ``mqtt``
takes targets only from the broker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from tuf.api import exceptions as tuf_errors

from device.mqtt_session import MqttSession, TlsSettings, tls_context
from device.tuf_client import MAX_TARGET_BYTES
from shared.blob_wire import MAX_BLOB_CHUNK_BYTES, MAX_META_BYTES, BlobMeta, decode_meta
from shared.errors import MessageError
from shared.topics import (
    SHA256_PATTERN,
    blob_chunk_topic,
    blob_filter,
    blob_meta_topic,
    parse_blob_topic,
)

if TYPE_CHECKING:
    from tuf.api._payload import TargetFile
    from tuf.ngclient.updater import Updater

__all__ = [
    "DATA_SUFFIX",
    "DEFAULT_PROBE_TIMEOUT_S",
    "DEFAULT_STALL_TIMEOUT_S",
    "LEDGER_SUFFIX",
    "BlobFetcher",
]

log = logging.getLogger(__name__)

#: How long finding out what the broker holds may take (normally one round trip).
DEFAULT_PROBE_TIMEOUT_S = 10.0
#: A blob download fails once no chunk has arrived for this long.
DEFAULT_STALL_TIMEOUT_S = 30.0
#: Chunk topics subscribed at once: bounds what the broker queues for this device.
DEFAULT_WINDOW = 16
#: Outstanding chunks are asked for again after this long without one (a dropped delivery).
RESUBSCRIBE_AFTER_S = 15.0
#: Bytes of chunks written between two fsyncs (bounds what a power cut loses).
FSYNC_EVERY = 1 << 20
DATA_SUFFIX = ".blob"
LEDGER_SUFFIX = ".blobmap"
_LEDGER = struct.Struct(">8sQI")  # magic, blob size, chunk size; then one byte per chunk
_LEDGER_MAGIC = b"EFBLOBM1"
_POLL_S = 0.05
_MODES = ("auto", "mqtt")


class _Partial:
    """A blob being assembled: the data file and the ledger of chunks present in it."""

    def __init__(self, directory: Path, meta: BlobMeta) -> None:
        self.meta = meta
        directory.mkdir(parents=True, exist_ok=True)
        self.data_path = directory / (meta.sha256 + DATA_SUFFIX)
        self.ledger_path = directory / (meta.sha256 + LEDGER_SUFFIX)
        self.have: set[int] = set()
        self._pending: list[int] = []
        self._pending_bytes = 0
        header = _LEDGER.pack(_LEDGER_MAGIC, meta.size, meta.chunk_bytes)
        self._data = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._ledger = os.open(self.ledger_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            os.close(self._data)
            raise
        try:
            want = len(header) + meta.chunks
            kept = os.pread(self._ledger, want + 1, 0)
            if (
                len(kept) == want
                and kept.startswith(header)
                and os.fstat(self._data).st_size == meta.size
            ):
                self.have = {i for i, b in enumerate(kept[len(header) :]) if b == 1}
            else:  # new, or kept for other chunking: start over
                os.ftruncate(self._data, 0)
                os.ftruncate(self._data, meta.size)
                os.ftruncate(self._ledger, 0)
                os.pwrite(self._ledger, header + bytes(meta.chunks), 0)
                os.fsync(self._data)
                os.fsync(self._ledger)
        except BaseException:
            self.close(sync=False)
            raise
        self._base = len(header)

    def write(self, index: int, data: bytes) -> None:
        offset, length = self.meta.chunk_range(index)
        if os.pwrite(self._data, data, offset) != length:
            raise OSError(f"short write of chunk {index} to {self.data_path}")
        self.have.add(index)
        self._pending.append(index)
        self._pending_bytes += length
        if self._pending_bytes >= FSYNC_EVERY:
            self.sync()

    def sync(self) -> None:
        """Make the written chunks durable, then mark them in the ledger (that order:
        the ledger never names a chunk a power cut could have lost)."""
        if not self._pending:
            return
        os.fsync(self._data)
        for index in self._pending:
            os.pwrite(self._ledger, b"\x01", self._base + index)
        os.fsync(self._ledger)
        self._pending.clear()
        self._pending_bytes = 0

    def close(self, *, sync: bool = True) -> None:
        try:
            if sync:
                self.sync()
        finally:
            for fd in (self._data, self._ledger):
                with contextlib.suppress(OSError):
                    os.close(fd)


class BlobFetcher:
    """Fetches TUF targets by sha256 from the broker's retained blobs (see module doc)."""

    def __init__(
        self,
        client: mqtt.Client,
        partial_dir: Path,
        *,
        mode: str = "auto",
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT_S,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT_S,
        window: int = DEFAULT_WINDOW,
        max_target_bytes: int = MAX_TARGET_BYTES,
        owns_client: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"blob fetcher mode must be one of {_MODES}, got {mode!r}")
        if not 1 <= window <= 1024:
            raise ValueError(f"window must be 1..1024 chunks, got {window}")
        self.partial_dir = Path(partial_dir)
        self.mode = mode
        self.probe_timeout = probe_timeout
        self.stall_timeout = stall_timeout
        self.window = window
        self.max_target_bytes = max_target_bytes
        self._client = client
        self._owns_client = owns_client
        self._clock = clock
        # (sha256, chunk index or None for meta, payload or None if oversized)
        self._last_arrival = 0.0
        self._queue: queue.Queue[tuple[str, int | None, bytes | None]] = queue.Queue(
            maxsize=2 * window + 16
        )
        self._lock = threading.Lock()
        self._wanted: frozenset[str] = frozenset()
        self._probing = False
        self._unsubacks: set[int] = set()
        self._generation = 0  # bumped on every (re)connect: subscriptions are per connection
        #: Set when a download started from kept chunks (a verification failure may be
        #: theirs); the caller resets it.
        self.used_partial = False
        #: Counters for tests and telemetry.
        self.received_chunks = 0
        self.received_bytes = 0
        self.resumed_bytes = 0
        self.duplicate_chunks = 0
        self.invalid_messages = 0
        self.dropped_messages = 0
        self.fallbacks = 0
        previous_connect = client.on_connect
        previous_unsubscribe = client.on_unsubscribe

        def on_connect(*args: Any) -> None:
            with self._lock:
                self._generation += 1
            if previous_connect is not None:
                previous_connect(*args)

        def on_unsubscribe(*args: Any) -> None:
            with self._lock:
                if self._probing:
                    self._unsubacks.add(int(args[2]))  # (client, userdata, mid, ...)
            if previous_unsubscribe is not None:
                previous_unsubscribe(*args)

        client.on_connect = on_connect
        client.on_unsubscribe = on_unsubscribe
        client.message_callback_add(blob_filter(), self._on_message)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def for_session(cls, session: MqttSession, partial_dir: Path, **options: Any) -> BlobFetcher:
        """A fetcher on the agent's own connection (required on a secure broker)."""
        return cls(session.mqtt_client, partial_dir, **options)

    @classmethod
    def connect(
        cls,
        client_id: str,
        host: str,
        port: int,
        partial_dir: Path,
        *,
        tls: TlsSettings | None = None,
        timeout: float = 10.0,
        **options: Any,
    ) -> BlobFetcher:
        """A fetcher with its own connection (plain brokers, tools, tests); ``close()`` ends it."""
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        if tls is not None:
            client.tls_set_context(tls_context(tls))
        fetcher = cls(client, partial_dir, owns_client=True, **options)
        client.connect_async(host, port, keepalive=30, clean_start=True)
        client.loop_start()
        deadline = time.monotonic() + timeout
        while not client.is_connected():
            if time.monotonic() > deadline:
                fetcher.close()
                raise tuf_errors.DownloadError(f"could not connect to {host}:{port} in {timeout}s")
            time.sleep(_POLL_S)
        return fetcher

    def close(self) -> None:
        """Stop listening to blob topics; disconnect if the fetcher owns its client."""
        self._client.message_callback_remove(blob_filter())
        if self._owns_client:
            self._client.disconnect()
            self._client.loop_stop()

    # -- partial files ---------------------------------------------------------------------
    def discard(self, sha256: str) -> None:
        for suffix in (DATA_SUFFIX, LEDGER_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                (self.partial_dir / (sha256 + suffix)).unlink()

    def discard_partials(self) -> None:
        """Forget every kept partial blob (after a commit, or a refused release)."""
        if not self.partial_dir.is_dir():
            return
        for suffix in (DATA_SUFFIX, LEDGER_SUFFIX):
            for p in self.partial_dir.glob("*" + suffix):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    # -- what the broker holds ---------------------------------------------------------------
    def locate(self, sha256s: Iterable[str]) -> dict[str, BlobMeta]:
        """The retained metas the broker holds for ``sha256s`` (well-formed ones only)."""
        wanted = frozenset(sha256s)
        found: dict[str, BlobMeta] = {}
        if not wanted:
            return found
        deadline = self._clock() + self.probe_timeout
        self._drain()
        with self._lock:
            self._wanted, self._probing, self._unsubacks = wanted, True, set()
        try:
            while not self._client.is_connected():
                if self._clock() > deadline:
                    return found
                time.sleep(_POLL_S)
            topics = [blob_meta_topic(s) for s in sorted(wanted)]
            rc, _ = self._client.subscribe([(t, 1) for t in topics])
            rc2, mid = self._client.unsubscribe(topics)
            if rc != mqtt.MQTT_ERR_SUCCESS or rc2 != mqtt.MQTT_ERR_SUCCESS or mid is None:
                return found
            while True:
                with self._lock:
                    done = mid in self._unsubacks
                self._take_metas(found, 0.0 if done else 0.01)
                if done or self._clock() > deadline:
                    return found
        finally:
            with self._lock:
                self._wanted, self._probing = frozenset(), False

    def _take_metas(self, found: dict[str, BlobMeta], timeout: float) -> None:
        while True:
            try:
                sha, index, payload = self._queue.get(timeout=timeout or None, block=timeout > 0)
            except queue.Empty:
                return
            timeout = 0.0
            if index is not None:
                continue
            if not payload:  # cleared (retired) while we looked, or oversized
                found.pop(sha, None)
                continue
            try:
                found[sha] = decode_meta(payload, sha256=sha)
            except MessageError as e:
                self.invalid_messages += 1
                log.warning("ignoring the broker's meta of blob %s…: %s", sha[:12], e)

    def plan(self, infos: Sequence[TargetFile]) -> dict[str, BlobMeta]:
        """Target path -> blob meta, for the targets to take from the broker.

        ``auto``: those the broker holds with the signed length. ``mqtt``: all of
        them, or a ``DownloadError`` naming what the broker lacks (a meta with
        another length than the signed one is a ``DownloadLengthMismatchError``)."""
        shas = {info.path: info.hashes.get("sha256", "") for info in infos}
        shas = {p: h if SHA256_PATTERN.match(h) else "" for p, h in shas.items()}
        found = self.locate(s for s in shas.values() if s)
        chosen: dict[str, BlobMeta] = {}
        for info in infos:
            meta = found.get(shas[info.path])
            if meta is not None and meta.size == info.length <= self.max_target_bytes:
                chosen[info.path] = meta
            elif self.mode == "mqtt" and meta is not None:
                raise tuf_errors.DownloadLengthMismatchError(
                    f"the broker announces {meta.size} bytes for {info.path}, signed are "
                    f"{info.length} (this device takes at most {self.max_target_bytes})"
                )
            elif self.mode == "mqtt":
                raise tuf_errors.DownloadError(
                    f"the broker holds no blob of {info.path} (sha256 "
                    f"{shas[info.path][:12]}…): is the cloud's fan-out on "
                    "(EDGEFLEET_FANOUT)? blob_source = mqtt takes targets only from the broker"
                )
        log.info(
            "release files from the broker: %d of %d",
            len(chosen),
            len(infos),
            extra={"mode": self.mode},
        )
        return chosen

    # -- one target --------------------------------------------------------------------------
    def fetch_target(
        self,
        updater: Updater,
        info: TargetFile,
        meta: BlobMeta,
        dest: Path,
        on_chunk: Callable[[int], None] | None = None,
    ) -> bool:
        """Assemble ``info`` from the broker, have TUF verify it, move it to ``dest``.

        ``False``: in ``auto`` mode the broker failed this target (the caller
        fetches it from the repository; progress reported so far is taken back).
        In ``mqtt`` mode such failures raise TUF's errors instead."""
        got = 0

        def count(n: int) -> None:
            nonlocal got
            got += n
            if on_chunk is not None:
                on_chunk(n)

        try:
            if meta.size != info.length or meta.size > self.max_target_bytes:
                raise tuf_errors.DownloadLengthMismatchError(
                    f"the broker announces {meta.size} bytes for {info.path}, signed are "
                    f"{info.length}"
                )
            assembled = self._assemble(meta, count)
            if updater.find_cached_target(info, str(assembled)) is None:
                self.discard(meta.sha256)
                raise tuf_errors.LengthOrHashMismatchError(
                    f"the broker's copy of {info.path} (blob {meta.sha256[:12]}…) does not "
                    "match its signed length and hashes"
                )
            os.replace(assembled, dest)
            self.discard(meta.sha256)  # the ledger; the data moved on
            return True
        except (tuf_errors.DownloadError, tuf_errors.RepositoryError) as e:
            if self.mode == "mqtt":
                raise
            self.fallbacks += 1
            log.warning("%s from the broker failed (%s); using the repository", info.path, e)
            if got and on_chunk is not None:
                on_chunk(-got)
            return False

    def _assemble(self, meta: BlobMeta, count: Callable[[int], None]) -> Path:
        part = _Partial(self.partial_dir, meta)
        sha = meta.sha256
        outstanding: set[int] = set()
        try:
            if part.have:
                self.used_partial = True
                kept = sum(meta.chunk_range(i)[1] for i in part.have)
                self.resumed_bytes += kept
                count(kept)
                log.info(
                    "resuming blob %s… with %d of %d chunks", sha[:12], len(part.have), meta.chunks
                )
            missing = [i for i in range(meta.chunks) if i not in part.have]
            self._drain()
            with self._lock:
                self._wanted = frozenset({sha})
            generation = -1
            last_progress = last_ask = self._clock()
            while missing or outstanding:
                now = self._clock()
                if now - last_progress > self.stall_timeout:
                    raise tuf_errors.SlowRetrievalError(
                        f"blob {sha[:12]}…: no chunk from the broker for "
                        f"{self.stall_timeout:.0f} s ({len(part.have)} of {meta.chunks} chunks)"
                    )
                if not self._client.is_connected():
                    time.sleep(_POLL_S)
                    continue
                with self._lock:
                    current = self._generation
                if current != generation:  # a new connection holds none of our subscriptions
                    generation = current
                    missing, outstanding = sorted({*missing, *outstanding}), set()
                elif (
                    outstanding
                    and now - max(last_progress, last_ask, self._last_arrival) > RESUBSCRIBE_AFTER_S
                ):
                    # Nothing arrived at all (not merely nothing consumed yet: a device
                    # short of CPU has chunks waiting in the queue): ask again.
                    self._unsubscribe(sha, outstanding)
                    missing, outstanding = sorted({*missing, *outstanding}), set()
                batch = missing[: self.window - len(outstanding)]
                if batch:
                    rc, _ = self._client.subscribe([(blob_chunk_topic(sha, i), 1) for i in batch])
                    if rc == mqtt.MQTT_ERR_SUCCESS:
                        del missing[: len(batch)]
                        outstanding.update(batch)
                        last_ask = now
                try:
                    msg_sha, index, payload = self._queue.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if msg_sha != sha or index is None:
                    continue
                if index not in outstanding:
                    self.duplicate_chunks += 1  # a chunk kept already, or republished
                    continue
                length = meta.chunk_range(index)[1]
                if payload is None or len(payload) != length:
                    raise tuf_errors.DownloadError(
                        f"blob {sha[:12]}…: the broker sent chunk {index} with "
                        f"{'too many' if payload is None else len(payload)} bytes, expected "
                        f"{length}"
                    )
                part.write(index, payload)
                outstanding.discard(index)
                self._client.unsubscribe(blob_chunk_topic(sha, index))
                self.received_chunks += 1
                self.received_bytes += length
                count(length)
                last_progress = self._clock()
            part.sync()
            return part.data_path
        finally:
            with self._lock:
                self._wanted = frozenset()
            if outstanding:
                self._unsubscribe(sha, outstanding)
            part.close()

    def _unsubscribe(self, sha: str, indices: Iterable[int]) -> None:
        topics = [blob_chunk_topic(sha, i) for i in sorted(indices)]
        if topics and self._client.is_connected():
            self._client.unsubscribe(topics)

    def _drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()

    # -- paho network thread: never raise ---------------------------------------------------
    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            sha, index = parse_blob_topic(message.topic)
        except ValueError:
            self.invalid_messages += 1
            return
        with self._lock:
            wanted = sha in self._wanted
        if not wanted:
            return  # a late delivery for a finished download, or noise
        self._last_arrival = self._clock()
        payload: bytes | None = bytes(message.payload)
        limit = MAX_META_BYTES if index is None else MAX_BLOB_CHUNK_BYTES
        if payload is not None and len(payload) > limit:
            self.invalid_messages += 1
            payload = None
        try:
            self._queue.put_nowait((sha, index, payload))
        except queue.Full:
            self.dropped_messages += 1  # asked for again after RESUBSCRIBE_AFTER_S
