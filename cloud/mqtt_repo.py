"""Serve the TUF repository directory over MQTT 5, for devices without HTTP.

The counterpart of ``device/mqtt_fetcher.py`` (wire format: ``shared.repo_wire``).
Workers subscribe with a shared subscription (``$share/<group>/...``), so
several cloud processes split the requests. Each request is answered on the
requesting device's own ``.../repo/resp`` topic with the request's correlation
data; the response topic a request proposes is used only if it is exactly
that topic, so no device can make the server publish anywhere else.

What a hostile device cannot do: read outside ``metadata/`` and ``targets/``
of the repository directory (plain path segments, and the resolved path must
stay inside; no dot files, no directories), make the server read more than
``MAX_CHUNK_BYTES`` per request, or hog it: each device has a token bucket of
requests and bytes, and a bounded queue feeds a fixed pool of worker threads;
past either limit the answer is ``busy`` and the device backs off.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud.mqtt_bridge import client_tls_context
from shared.errors import MessageError, TransferError
from shared.repo_wire import (
    MAX_CHUNK_BYTES,
    MAX_CORRELATION_BYTES,
    RepoRequest,
    RepoResponse,
    decode_request,
    encode_response,
)
from shared.topics import parse_repo_request_topic, repo_request_subscription, repo_response_topic

__all__ = ["DeviceBudget", "MqttRepoServer"]

log = logging.getLogger(__name__)

DEFAULT_SHARE_GROUP = "edgefleet-repo"
#: Devices tracked by the rate limiter at once; the least recently seen go first.
MAX_TRACKED_DEVICES = 100_000


@dataclass(frozen=True)
class DeviceBudget:
    """Per-device token buckets: sustained rates and bursts."""

    requests_per_s: float = 50.0
    request_burst: float = 100.0
    bytes_per_s: float = 4 * 1024 * 1024
    byte_burst: float = 16 * 1024 * 1024


class _Bucket:
    __slots__ = ("bytes", "requests", "stamp")

    def __init__(self, budget: DeviceBudget, now: float) -> None:
        self.requests, self.bytes, self.stamp = budget.request_burst, budget.byte_burst, now

    def take(self, budget: DeviceBudget, now: float, nbytes: int) -> bool:
        elapsed = max(0.0, now - self.stamp)
        self.stamp = now
        self.requests = min(budget.request_burst, self.requests + elapsed * budget.requests_per_s)
        self.bytes = min(budget.byte_burst, self.bytes + elapsed * budget.bytes_per_s)
        if self.requests < 1 or self.bytes < nbytes:
            return False
        self.requests -= 1
        self.bytes -= nbytes
        return True


@dataclass(frozen=True)
class _Job:
    device_id: str
    request: RepoRequest
    correlation: bytes


class MqttRepoServer:
    """One worker serving ``repo_dir`` to devices over MQTT. ``start()`` / ``stop()``."""

    def __init__(
        self,
        repo_dir: Path,
        host: str,
        port: int,
        *,
        tls: dict[str, str] | None = None,
        client_id: str | None = None,
        share_group: str | None = DEFAULT_SHARE_GROUP,
        budget: DeviceBudget | None = None,
        workers: int = 4,
        queue_size: int = 1000,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
    ) -> None:
        self.repo_dir = Path(repo_dir).resolve()
        self.host, self.port = host, port
        self.budget = budget or DeviceBudget()
        self.max_chunk_bytes = min(max_chunk_bytes, MAX_CHUNK_BYTES)
        self._subscription = repo_request_subscription(share_group=share_group)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._bucket_lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._work, name=f"repo-mqtt-{i}", daemon=True)
            for i in range(workers)
        ]
        self.connected = threading.Event()
        #: Counters: served requests and bytes, refusals by reason.
        self.served = 0
        self.served_bytes = 0
        self.refused: dict[str, int] = {}
        self._stats_lock = threading.Lock()
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"edgefleet-repo-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.max_inflight_messages_set(1000)
        if tls is not None:
            self._client.tls_set_context(client_tls_context(tls))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- lifecycle --------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> MqttRepoServer:
        for t in self._workers:
            t.start()
        self._client.connect_async(self.host, self.port, keepalive=30, clean_start=True)
        self._client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            raise TransferError(f"repository server could not connect to {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        for _ in self._workers:
            self._jobs.put(None)
        for t in self._workers:
            if t.is_alive():
                t.join(timeout=5)
        self.connected.clear()

    def __enter__(self) -> MqttRepoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- paho network thread: never raise ----------------------------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            log.error("broker refused the repository server: %s", reason_code)
            return
        client.subscribe(self._subscription, qos=1)
        self.connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        self.connected.clear()
        if reason_code != 0:
            log.warning("repository server lost the broker: %s; reconnecting", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._accept(message)
        except Exception:
            log.exception("repository request handling failed on %s", message.topic)

    def _accept(self, message: mqtt.MQTTMessage) -> None:
        try:
            device_id = parse_repo_request_topic(message.topic)
        except ValueError:
            self._refuse("bad_topic", None, None)
            return
        props = message.properties
        correlation = bytes(getattr(props, "CorrelationData", b"") or b"")
        response_topic = getattr(props, "ResponseTopic", None)
        if not correlation or len(correlation) > MAX_CORRELATION_BYTES:
            self._refuse("bad_correlation", device_id, None)
            return
        if response_topic != repo_response_topic(device_id):
            # Answer only on the requester's own topic, never where a request points.
            self._refuse("bad_response_topic", device_id, None)
            return
        try:
            request = decode_request(bytes(message.payload))
        except MessageError as e:
            self._refuse("bad_request", device_id, correlation, str(e))
            return
        nbytes = min(request.length, self.max_chunk_bytes)
        if not self._take(device_id, nbytes):
            self._refuse("rate_limited", device_id, correlation, "slow down", status="busy")
            return
        try:
            self._jobs.put_nowait(_Job(device_id, request, correlation))
        except queue.Full:
            self._refuse("overloaded", device_id, correlation, "server busy", status="busy")

    # -- workers ------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._reply(job.device_id, job.correlation, self._read(job.request))
            except Exception:
                log.exception("serving a repository request failed")
                self._reply(
                    job.device_id,
                    job.correlation,
                    RepoResponse(status="error", message="internal error"),
                )

    def _read(self, req: RepoRequest) -> RepoResponse:
        path = self.repo_dir / req.path
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return RepoResponse(status="not_found", message=req.path[:200])
        if not resolved.is_relative_to(self.repo_dir) or not resolved.is_file():
            self._count("outside_repository")
            return RepoResponse(status="not_found", message=req.path[:200])
        length = min(req.length, self.max_chunk_bytes)
        try:
            with open(resolved, "rb") as f:
                total = os.fstat(f.fileno()).st_size
                if req.offset > total:
                    return RepoResponse(
                        status="bad_request", message=f"offset {req.offset} beyond {total} bytes"
                    )
                f.seek(req.offset)
                data = f.read(length)
        except FileNotFoundError:
            return RepoResponse(status="not_found", message=req.path[:200])
        # The file may have been replaced (timestamp.json) since fstat: clamp.
        data = data[: max(0, total - req.offset)]
        with self._stats_lock:
            self.served += 1
            self.served_bytes += len(data)
        return RepoResponse(status="ok", offset=req.offset, total=total, data=data)

    def _reply(self, device_id: str, correlation: bytes, resp: RepoResponse) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = correlation
        self._client.publish(
            repo_response_topic(device_id), encode_response(resp), qos=1, properties=props
        )

    def _refuse(
        self,
        reason: str,
        device_id: str | None,
        correlation: bytes | None,
        message: str = "",
        *,
        status: str = "bad_request",
    ) -> None:
        self._count(reason)
        log.debug("refused repository request", extra={"reason": reason, "device": device_id})
        if device_id is not None and correlation is not None:
            self._reply(
                device_id,
                correlation,
                RepoResponse(
                    status=status,  # type: ignore[arg-type]
                    message=message[:300],
                ),
            )

    def _count(self, reason: str) -> None:
        with self._stats_lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    def _take(self, device_id: str, nbytes: int) -> bool:
        now = time.monotonic()
        with self._bucket_lock:
            bucket = self._buckets.get(device_id)
            if bucket is None:
                bucket = self._buckets[device_id] = _Bucket(self.budget, now)
                if len(self._buckets) > MAX_TRACKED_DEVICES:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(device_id)
            return bucket.take(self.budget, now, nbytes)
