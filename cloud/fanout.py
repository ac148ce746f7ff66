"""Fan release blobs out through the broker: published once, copied to every device.

Without this, every device downloads every target of a release from the
cloud (HTTP or MQTT request/response): a thousand devices, a thousand copies.
``BlobFanout`` publishes each target file of a release *once*, as retained
QoS 1 messages under ``edgefleet/v1/blobs/<sha256>/`` (chunks, then a
``meta`` message; wire format in ``shared.blob_wire``). The broker keeps them
and copies them to every device that subscribes, whenever it subscribes:
devices that were offline, retries and resumed downloads cost the cloud
nothing. Devices still verify every byte with TUF: the broker is untrusted.

It uses its own MQTT 5 connection, so a large blob never queues behind (or
delays) the control connection's desired states. On a secure broker the
client id is the certificate CN, so that connection needs its own service
identity (``edgefleet-fanout``; the ACL gives it write access to the blob
topics only).

* ``ensure_release(model, release)``: idempotent. Blobs it published (or
  found retained on the broker) are cached by hash; a reconnect clears the
  cache, since a broker that restarted without persistence has lost them.
* ``retire(model, release)``: clears (empty retained payloads) the blobs of a
  release that no newer release of the model, and no other model, uses.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from cloud.mqtt_bridge import client_tls_context
from cloud.releases import UnknownReleaseError
from shared.blob_wire import (
    DEFAULT_BLOB_CHUNK_BYTES,
    MAX_BLOB_CHUNK_BYTES,
    MAX_META_BYTES,
    MIN_BLOB_CHUNK_BYTES,
    BlobMeta,
    decode_meta,
    encode_meta,
)
from shared.errors import ConfigError, ManifestError, MessageError, TransferError
from shared.manifest import MODEL_FILE, ReleaseManifest, target_path
from shared.topics import blob_chunk_topic, blob_filter, blob_meta_topic, parse_blob_topic

if TYPE_CHECKING:
    from tuf.api.metadata import TargetFile

    from cloud.config import CloudSettings
    from cloud.tuf_repo import ReleaseRepository

__all__ = ["FANOUT_SERVICE", "BlobFanout"]

log = logging.getLogger(__name__)

#: The service identity (certificate CN) of the fan-out connection on a secure broker.
FANOUT_SERVICE = "edgefleet-fanout"
#: Each PUBACK is awaited at most this long.
DEFAULT_PUBLISH_TIMEOUT_S = 30.0
#: How long a look at what the broker retains may take (normally one round trip).
PROBE_TIMEOUT_S = 2.0
#: Chunks in flight at once: bounds memory while a large file streams out.
PUBLISH_WINDOW = 16


class BlobFanout:
    """Publishes the target files of releases once, retained, for the broker to copy."""

    def __init__(
        self,
        repo: ReleaseRepository,
        host: str,
        port: int,
        *,
        tls: Mapping[str, str] | None = None,
        client_id: str | None = None,
        chunk_bytes: int = DEFAULT_BLOB_CHUNK_BYTES,
        publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT_S,
    ) -> None:
        if not MIN_BLOB_CHUNK_BYTES <= chunk_bytes <= MAX_BLOB_CHUNK_BYTES:
            raise ConfigError(
                f"blob chunk size {chunk_bytes} is outside {MIN_BLOB_CHUNK_BYTES}.."
                f"{MAX_BLOB_CHUNK_BYTES} bytes (a chunk must fit the broker's max_packet_size)"
            )
        self.repo = repo
        self.host, self.port = host, port
        self.chunk_bytes = chunk_bytes
        self.publish_timeout = publish_timeout
        self.connected = threading.Event()
        #: Counters: what this process sent to the broker (tests, metrics, bench).
        self.published_blobs = 0
        self.published_chunks = 0
        self.published_bytes = 0
        self.cleared_blobs = 0
        self.skipped_blobs = 0
        self._lock = threading.Lock()  # one ensure/retire at a time
        self._state = threading.Lock()  # guards what the network thread touches
        #: sha256 -> meta of the blobs the broker holds (published or found there).
        self._published: dict[str, BlobMeta] = {}
        #: (model, release) -> sha256 of its targets, for retiring delisted releases.
        self._releases: dict[tuple[str, int], dict[str, int]] = {}
        self._acks: dict[int, ReasonCode] = {}
        self._unsubacks: set[int] = set()
        self._probing: frozenset[str] = frozenset()
        self._metas: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=4096)
        self._connects = 0
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{FANOUT_SERVICE}-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.max_inflight_messages_set(PUBLISH_WINDOW)
        if tls is not None:
            self._client.tls_set_context(client_tls_context(tls))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_unsubscribe = self._on_unsubscribe
        self._client.message_callback_add(blob_filter(), self._on_message)

    @classmethod
    def from_settings(cls, settings: CloudSettings, repo: ReleaseRepository) -> BlobFanout | None:
        """The fan-out the settings ask for, or ``None`` (off, or no identity for it).

        On a secure broker (``broker_tls`` with a client certificate) it connects
        as ``edgefleet-fanout``, issued from the CA in ``<data dir>/pki`` if need
        be, since sharing the cloud's identity would make the two connections
        kick each other off (client id = CN)."""
        if not settings.fanout:
            return None
        tls = settings.broker_tls
        client_id = None
        if tls is not None and tls.get("cert_file"):
            from cloud.pki import CertificateAuthority

            ca = CertificateAuthority(settings.data_dir / "pki")
            if not ca.initialized:
                log.warning(
                    "blob fan-out off: a secure broker needs the %s identity and there is no "
                    "CA in %s to issue it; devices fetch releases from the repository",
                    FANOUT_SERVICE,
                    ca.dir,
                )
                return None
            ident = ca.service_identity(FANOUT_SERVICE)
            if not ident.cert_file.is_file():
                ident = ca.issue_service_identity(FANOUT_SERVICE)
            tls, client_id = {**ident.as_tls_dict(), "ca_file": tls["ca_file"]}, FANOUT_SERVICE
        return cls(
            repo,
            settings.broker_host,
            settings.broker_port,
            tls=tls,
            client_id=client_id,
            chunk_bytes=settings.fanout_chunk_bytes,
        )

    # -- lifecycle -------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> BlobFanout:
        self._client.connect_async(self.host, self.port, keepalive=30, clean_start=True)
        self._client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            raise TransferError(
                f"the blob fan-out could not connect to the MQTT broker {self.host}:{self.port}"
            )
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()

    def __enter__(self) -> BlobFanout:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- releases ----------------------------------------------------------------------
    def release_targets(self, model: str, release: int) -> dict[str, TargetFile]:
        """The signed targets a device fetches for a release: model, vectors, baseline."""
        listed = self.repo.list_targets()
        path = target_path(model, release, MODEL_FILE)
        info = listed.get(path)
        if info is None:
            raise UnknownReleaseError(
                f"release {release} of model {model!r} is not in the signed repository"
            )
        manifest = ReleaseManifest.from_custom(info.custom, target=path)
        paths = [path, manifest.selftest.target]
        if manifest.drift is not None:
            paths.append(manifest.drift.target)
        missing = [p for p in paths if p not in listed]
        if missing:
            raise ManifestError(f"release {release} of {model} names unlisted targets {missing}")
        return {p: listed[p] for p in paths}

    def ensure_release(self, model: str, release: int) -> None:
        """Make sure the broker retains every target of a release; publish what it lacks.

        Cheap when done before (cached). Returns once the broker acknowledged
        every message; raises ``TransferError`` if it did not, or refused one.
        A file that does not match its signed hash on disk (a damaged or
        tampered repository) is logged and left out: devices fetch it from the
        repository instead, where TUF refuses it too."""
        targets = self.release_targets(model, release)
        with self._lock:
            self._releases[(model, release)] = {
                info.hashes["sha256"]: info.length for info in targets.values()
            }
            with self._state:
                todo = [i for i in targets.values() if i.hashes["sha256"] not in self._published]
            if not todo:
                return
            self._require_connection()
            found = self._probe({i.hashes["sha256"] for i in todo})
            for info in todo:
                sha = info.hashes["sha256"]
                meta = found.get(sha)
                if meta is None or meta.size != info.length:
                    meta = self._publish_blob(info)
                if meta is not None:
                    with self._state:
                        self._published[sha] = meta
        log.info("release blobs on the broker", extra={"model": model, "release": release})

    def retire(self, model: str, release: int) -> None:
        """Clear the retained blobs of a release that no newer release still uses.

        A blob stays if a newer release of ``model`` or any release of another
        model lists the same bytes (a fleet rollback re-releases old bytes)."""
        with self._lock:
            try:
                mine = {
                    info.hashes["sha256"]: info.length
                    for info in self.release_targets(model, release).values()
                }
            except UnknownReleaseError:
                if (model, release) not in self._releases:
                    raise
                mine = self._releases[(model, release)]  # delisted since it was published
            keep = self._still_needed(model, release)
            gone = sorted(set(mine) - keep)
            found: dict[str, BlobMeta] = {}
            if gone:
                self._require_connection()
                found = self._probe(set(gone))
            for sha in gone:
                with self._state:
                    meta = self._published.pop(sha, None)
                meta = found.get(sha) or meta or BlobMeta(sha, mine[sha], self.chunk_bytes)
                self._clear_blob(meta)
            self._releases.pop((model, release), None)
        log.info(
            "retired release blobs",
            extra={
                "model": model,
                "release": release,
                "cleared": len(gone),
                "kept": len(mine) - len(gone),
            },
        )

    def _still_needed(self, model: str, release: int) -> set[str]:
        keep: set[str] = set()
        for path, info in self.repo.list_targets().items():
            name, _, rest = path.partition("/")
            number = rest.partition("/")[0]
            if name != model or (number.isdigit() and int(number) > release):
                keep.add(info.hashes["sha256"])
        return keep

    # -- publishing ----------------------------------------------------------------------
    def _blob_file(self, info: TargetFile) -> Path:
        # Consistent snapshots: targets/<dir>/<sha256>.<basename> (cloud.tuf_repo).
        parent, _, name = info.path.rpartition("/")
        return self.repo.targets_dir / parent / f"{info.hashes['sha256']}.{name}"

    def _publish_blob(self, info: TargetFile) -> BlobMeta | None:
        sha = info.hashes["sha256"]
        path = self._blob_file(info)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as e:
            problem = f"cannot be read ({e})"
        else:
            problem = "" if digest.hexdigest() == sha else "does not hold the signed bytes"
        if problem:
            # Not the broker's problem, nor one a retry fixes: devices fetch this
            # file from the repository instead, where TUF refuses it just the same.
            self.skipped_blobs += 1
            log.error(
                "not fanning out %s: %s %s; restore the repository from backup",
                info.path,
                path,
                problem,
            )
            return None
        meta = BlobMeta(sha, info.length, self.chunk_bytes)
        window: collections.deque[tuple[mqtt.MQTTMessageInfo, str]] = collections.deque()
        with open(path, "rb") as f:
            for index in range(meta.chunks):
                chunk = f.read(meta.chunk_range(index)[1])
                what = f"chunk {index} of {info.path}"
                window.append((self._publish(blob_chunk_topic(sha, index), chunk), what))
                if len(window) >= PUBLISH_WINDOW:
                    self._await(*window.popleft())
                self.published_chunks += 1
                self.published_bytes += len(chunk)
        while window:
            self._await(*window.popleft())
        # Last: a retained meta tells devices that every chunk is there.
        self._await(self._publish(blob_meta_topic(sha), encode_meta(meta)), f"meta of {info.path}")
        self.published_blobs += 1
        log.info(
            "published blob",
            extra={"target": info.path, "sha256": sha, "bytes": meta.size, "chunks": meta.chunks},
        )
        return meta

    def _clear_blob(self, meta: BlobMeta) -> None:
        # Meta first: no device starts on a blob whose chunks are going away.
        window = [(self._publish(blob_meta_topic(meta.sha256), b""), "meta")]
        for index in range(meta.chunks):
            window.append((self._publish(blob_chunk_topic(meta.sha256, index), b""), f"{index}"))
            if len(window) >= PUBLISH_WINDOW:
                for msg, what in window:
                    self._await(msg, f"clearing {what} of blob {meta.sha256[:12]}")
                window.clear()
        for msg, what in window:
            self._await(msg, f"clearing {what} of blob {meta.sha256[:12]}")
        self.cleared_blobs += 1

    def _publish(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        return self._client.publish(topic, payload, qos=1, retain=True)

    def _await(self, msg: mqtt.MQTTMessageInfo, what: str) -> None:
        try:
            msg.wait_for_publish(timeout=self.publish_timeout)
        except (RuntimeError, ValueError) as e:
            raise TransferError(f"{what} was not published to the broker: {e}") from e
        if not msg.is_published():
            raise TransferError(
                f"the broker did not acknowledge {what} within {self.publish_timeout:.0f} s"
            )
        with self._state:
            reason = self._acks.pop(msg.mid, None)
        if reason is not None and reason.is_failure:
            raise TransferError(
                f"the broker refused {what} ({reason}): the fan-out's MQTT identity needs "
                f"write access to {blob_filter()} (service {FANOUT_SERVICE!r} or the cloud role)"
            )

    def _require_connection(self) -> None:
        if not self.connected.wait(self.publish_timeout):
            raise TransferError(
                f"the blob fan-out has no connection to the broker {self.host}:{self.port}"
            )

    # -- what the broker holds -----------------------------------------------------------
    def _probe(self, shas: Iterable[str]) -> dict[str, BlobMeta]:
        """Retained metas of ``shas``. The broker sends retained messages while it
        handles a SUBSCRIBE, before it answers the UNSUBSCRIBE that follows it, so
        the UNSUBACK marks the end of them: one round trip, no guessing."""
        wanted = frozenset(shas)
        found: dict[str, BlobMeta] = {}
        topics = [blob_meta_topic(s) for s in sorted(wanted)]
        with self._state:
            self._probing, self._unsubacks = wanted, set()
        try:
            while not self._metas.empty():
                self._metas.get_nowait()
            rc, _ = self._client.subscribe([(t, 1) for t in topics])
            rc2, mid = self._client.unsubscribe(topics)
            if rc != mqtt.MQTT_ERR_SUCCESS or rc2 != mqtt.MQTT_ERR_SUCCESS or mid is None:
                return found
            deadline = time.monotonic() + PROBE_TIMEOUT_S
            while time.monotonic() < deadline:
                with self._state:
                    done = mid in self._unsubacks
                self._take_metas(found, timeout=0 if done else 0.02)
                if done:
                    break
        finally:
            with self._state:
                self._probing = frozenset()
        return found

    def _take_metas(self, found: dict[str, BlobMeta], timeout: float) -> None:
        while True:
            try:
                sha, payload = (
                    self._metas.get(timeout=timeout) if timeout else self._metas.get_nowait()
                )
            except queue.Empty:
                return
            timeout = 0
            if not payload:
                found.pop(sha, None)
                continue
            try:
                found[sha] = decode_meta(payload, sha256=sha)
            except MessageError as e:
                log.warning("ignoring a malformed retained blob meta for %s: %s", sha[:12], e)

    # -- paho network thread: never raise ------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, props: Any
    ) -> None:
        if reason_code.is_failure:
            log.error("broker refused the blob fan-out: %s", reason_code)
            return
        with self._state:
            self._connects += 1
            if self._connects > 1:
                # A broker that restarted without persistence lost its retained
                # blobs: look again before trusting the cache.
                self._published.clear()
        self.connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, props: Any
    ) -> None:
        self.connected.clear()
        if reason_code != 0:
            log.warning("blob fan-out lost the broker: %s; reconnecting", reason_code)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, props: Any
    ) -> None:
        if reason_code.is_failure:
            with self._state:
                self._acks[mid] = reason_code

    def _on_unsubscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, props: Any
    ) -> None:
        with self._state:
            if self._probing:
                self._unsubacks.add(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            sha, index = parse_blob_topic(message.topic)
        except ValueError:
            return
        with self._state:
            wanted = index is None and sha in self._probing
        if wanted and len(message.payload) <= MAX_META_BYTES:
            try:
                self._metas.put_nowait((sha, bytes(message.payload)))
            except queue.Full:
                log.warning("blob meta dropped: probe queue full")
